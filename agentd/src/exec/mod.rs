//! Executors: how a placed gang's replicas are started and stopped. Standalone mode runs them as
//! local processes or transient systemd units (`local`, with process creation in `spawn`);
//! cluster mode will run them as pods. The core decides what to run; an executor only does it
//! and reports each replica started, failed to start, or ended.

pub mod cgroup;
pub mod local;
pub mod shim;
pub mod spawn;

pub use local::{
    AskedId, LaunchSpec, LocalExecutor, ReplicaEvent, ReplicaReport, RunAs, ShimCommand,
};
