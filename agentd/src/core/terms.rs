//! Cluster mode: the cluster's jobs are kept by the elected leader. Each term of leadership
//! opens a core of its own (it rebuilds from the store and the executor before its first
//! pass: see [`super::Core::open_in`]) on the same channels, so the API's handle never changes;
//! the term's core stops when leadership is lost or the agent stops. While this agent does not
//! lead, job requests are answered from the cluster's `TrainingJob` objects where a follower
//! can answer them ([`FollowerJobs`]: submit, list, read, cancel), and every other request with
//! who leads.
//!
//! A deposed leader's core may still try to write once more as it stops; the store's writes
//! carry the version they read, so such a late write fails rather than overwriting the new
//! leader's.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Core, CoreError, CoreInputs};
use crate::cluster::election::Leadership;
use crate::cluster::jobs::FollowerJobs;
use crate::store::JobStore;

/// Runs terms until `stop` turns true: follows while another agent leads, and runs the core
/// `open` builds for each term this agent leads. `retry`: the pause after a term that could
/// not open (the API server down, say). `desk`: what answers job requests while this agent
/// follows (none: they are refused with who leads).
pub async fn run_terms(
    inputs: &mut CoreInputs,
    desk: Option<&Arc<FollowerJobs>>,
    leadership: &mut watch::Receiver<Leadership>,
    mut open: impl FnMut() -> Result<Core, CoreError>,
    retry: Duration,
    stop: &mut watch::Receiver<bool>,
) {
    loop {
        if !follow(inputs, desk, leadership, stop).await {
            return;
        }
        let core = match open() {
            Ok(core) => core,
            Err(e) => {
                tracing::error!("cannot take up the cluster's jobs: {e}; trying again");
                tokio::select! {
                    () = tokio::time::sleep(retry) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        tracing::info!("this agent leads: keeping the cluster's jobs");
        let (term_tx, term_rx) = watch::channel(false);
        let ended = async {
            tokio::select! {
                _ = leadership.wait_for(|l| l.term.is_none()) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            term_tx.send_replace(true);
        };
        let (store, ()) = tokio::join!(core.run(inputs, term_rx), ended);
        close(store);
        if *stop.borrow() {
            return;
        }
        tracing::info!("this agent no longer leads: the new leader keeps the cluster's jobs");
    }
}

/// Answers requests from the objects, or with who leads, until this agent does (true) or
/// stops (false).
async fn follow(
    inputs: &mut CoreInputs,
    desk: Option<&Arc<FollowerJobs>>,
    leadership: &mut watch::Receiver<Leadership>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        if leadership.borrow().term.is_some() {
            return true;
        }
        let leader = leadership.borrow().leader.clone();
        let refusal = || CoreError::NotLeader {
            leader: leader.clone(),
        };
        let answer = |command| {
            let unanswered = match desk {
                Some(desk) => desk.answer(command, leader.clone()),
                None => Some(command),
            };
            if let Some(command) = unanswered {
                command.refuse(refusal);
            }
        };
        tokio::select! {
            Some(command) = inputs.commands.recv() => answer(command),
            Some(command) = inputs.submits.recv() => answer(command),
            // What a past term's executor or stops still report has no core to go to; the next
            // term rebuilds from what exists.
            Some(_) = inputs.replicas.recv() => {}
            Some(_) = inputs.internal.recv() => {}
            Some(_) = inputs.health.recv() => {}
            changed = leadership.changed() => if changed.is_err() { return false },
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

fn close(store: Box<dyn JobStore>) {
    if let Err(e) = store.close() {
        tracing::warn!("closing the term's job store: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use agentd_api::NodeInventory;
    use tokio::sync::mpsc;

    use super::*;
    use crate::cluster::election::Term;
    use crate::core::{Command, CoreWiring, ManualClock, Nodes, TermParts};
    use crate::exec::memory::MemoryExecutor;
    use crate::store::memory::MemoryStore;

    fn leads(this: bool) -> Leadership {
        Leadership {
            leader: Some(if this { "node-a" } else { "node-b" }.to_owned()),
            term: this.then(|| Term {
                transitions: 1,
                resource_version: "7".to_owned(),
                valid_until: Instant::now() + Duration::from_hours(1),
            }),
        }
    }

    /// A follower answers with who leads; each term opens a core of its own on the same
    /// handle, and a lost term ends it.
    #[tokio::test]
    async fn each_term_of_leadership_runs_a_core_and_followers_name_the_leader() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = crate::config::Config {
            state_dir: dir.path().to_owned(),
            ..crate::config::Config::default()
        };
        let (wiring, mut inputs) = CoreWiring::new(mpsc::unbounded_channel().1);
        let handle = wiring.handle.clone();
        let (leadership_tx, mut leadership) = watch::channel(leads(false));
        let (stop_tx, mut stop) = watch::channel(false);
        let store = MemoryStore::default();
        let (_inventory_tx, inventory) = watch::channel(Arc::new(NodeInventory::default()));
        let mut opened = 0;
        let open = || {
            opened += 1;
            Core::open_in(
                &config,
                TermParts {
                    node: "node-a".to_owned(),
                    store: Box::new(store.clone()),
                    inventory: inventory.clone(),
                    nodes: Nodes::Local,
                    metrics: None,
                    clock: Arc::new(ManualClock::new(1_000_000.0)),
                },
                &wiring,
                Box::new(MemoryExecutor::new(wiring.reports())),
            )
        };
        let queues = || handle.ask(|reply| Command::Queues { reply });
        let script = async {
            let refused = queues().await.expect_err("a follower keeps no jobs");
            assert!(
                matches!(&refused, CoreError::NotLeader { leader: Some(l) } if l == "node-b"),
                "{refused}"
            );
            assert!(refused.to_string().contains("node-b"), "{refused}");
            for _ in 0..2 {
                leadership_tx.send_replace(leads(true));
                // A request that crosses the change may still be refused.
                while queues().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                leadership_tx.send_replace(leads(false));
                while queues().await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            stop_tx.send_replace(true);
        };
        tokio::join!(
            run_terms(
                &mut inputs,
                None,
                &mut leadership,
                open,
                Duration::from_millis(10),
                &mut stop
            ),
            script
        );
        assert_eq!(opened, 2, "one core a term");
    }
}
