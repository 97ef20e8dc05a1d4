//! Helpers shared by the end-to-end tests: build paths, a running agent, fake GPUs.
