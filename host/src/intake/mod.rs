//! Event intake from backend services: the RabbitMQ consumer, and what every
//! intake shares (idempotency keys). The HTTP publish API is a route of the
//! gateway.

pub mod amqp;
pub mod emit;
mod idempotency;

pub use crate::store::Accepted;
pub use idempotency::Idempotency;
