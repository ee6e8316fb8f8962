//! Delivery on this node: the registry of live connections and their
//! outbound queues, one delivery's frame fanned out to the connections its
//! recipients name, and the delivery ids pushed lately (so a delivery that
//! reaches the node twice is pushed once). Copies for users on other nodes
//! go through `crate::cluster`.

pub mod fanout;
pub mod recent;
pub mod registry;
