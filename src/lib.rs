//! brook: a Structured Streaming SQL engine over Apache Arrow and DataFusion.
//!
//! Files dropped into a directory become an unbounded table; SQL over it runs
//! micro-batch by micro-batch, incrementally, into console, memory, file or
//! user sinks. See docs/sql.md for the SQL dialect and docs/architecture.md
//! for the execution model.

pub mod catalog;
pub mod cli;
pub mod dstream;
pub mod duration;
pub mod engine;
pub mod error;
pub mod exec;
pub mod memory;
pub mod options;
pub mod orders;
pub mod progress;
pub mod sink;
pub mod source;
pub mod sql;
pub mod state;
pub mod ui;

pub use datafusion;
pub use engine::{Engine, Overrides};
pub use error::{BrookError, Result};
pub use exec::{OutputMode, StreamingQuery, Trigger};
pub use progress::QueryProgress;
