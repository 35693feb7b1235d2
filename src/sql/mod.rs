//! The streaming SQL dialect: scripts, watermarks, windows, incremental plans
//! over slots.

pub mod chain;
pub mod depth;
pub mod incremental;
pub mod partial;
pub mod script;
pub mod session;
pub mod slot;
pub mod window;
