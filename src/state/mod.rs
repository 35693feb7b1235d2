//! Durable query progress: the checkpoint's logs and the operators' state.
//!
//! Without a checkpoint location a query keeps its state in memory only and
//! starts over when restarted; with one, every batch is logged ahead, its
//! state saved, and its completion committed, so a restart resumes exactly.

pub mod checkpoint;
pub mod delta;
mod files;
pub mod store;

pub use checkpoint::{Checkpoint, CommitEntry, EventTime, QueryFingerprint};
