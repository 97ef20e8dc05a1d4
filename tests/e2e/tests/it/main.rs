//! End-to-end tests: the real `agentd` and `agentctl` binaries, run as a user would run them.

mod agent;
mod auth;
mod chaos;
mod cluster;
mod gpus;
mod history;
mod jobs;
mod leader;
mod lifecycle;
mod limits;
mod lost_nodes;
mod owners;
mod placement;
mod queues;
mod remote;
mod sdk;
mod templates;
mod tensorflow;
