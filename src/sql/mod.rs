//! The streaming SQL dialect: scripts, watermarks, windows, incremental plans.

pub mod depth;
pub mod incremental;
pub mod script;
pub mod window;
