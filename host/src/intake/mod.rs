//! Event intake from backend services: the HTTP publish API lives in the
//! gateway; what every intake shares (idempotency keys) lives here.

mod idempotency;

pub use idempotency::{Accepted, Idempotency};
