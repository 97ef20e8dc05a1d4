//! agentd's integration tests: one binary, one module per subsystem.

mod gpu;
