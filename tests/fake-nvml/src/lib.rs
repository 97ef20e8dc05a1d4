//! A stand-in for NVML (to be filled in).
