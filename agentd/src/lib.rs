//! agentd: a GPU node agent and gang scheduler for distributed TensorFlow training.
//!
//! The binary in `main.rs` only parses flags and calls into this library; everything a test may
//! want to drive lives here. `job` and `sched` are the pure core; the other modules are edges that
//! translate between that core and the outside world.

pub mod api;
pub mod cluster;
pub mod config;
pub mod core;
pub mod daemon;
pub mod exec;
pub mod fuzz;
pub mod inventory;
pub mod job;
pub mod logging;
pub mod metrics;
pub mod replay;
pub mod sched;
pub mod store;
pub mod systemd;
