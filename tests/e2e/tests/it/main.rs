//! End-to-end tests: the real `agentd` and `agentctl` binaries, run as a user would run them.

mod agent;
mod gpus;
mod jobs;
mod lifecycle;
mod tensorflow;
