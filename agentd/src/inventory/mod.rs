//! (to be filled in)

pub mod gpu;
pub mod health;
