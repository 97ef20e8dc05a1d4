//! End-to-end tests: the real `agentd` and `agentctl` binaries, run as a user would run them.

mod agent;
mod cluster;
mod gpus;
mod jobs;
mod tensorflow;
