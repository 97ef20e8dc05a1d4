//! Executors: how a placed gang's replicas are started and stopped. Standalone mode runs them as
//! local processes (`local`); cluster mode will run them as pods. The core decides what to run;
//! an executor only does it and reports how each replica ended.

pub mod local;
mod spawn;

pub use local::{LaunchSpec, LocalExecutor, ReplicaEvent, ReplicaReport};
