//! brook: a Structured Streaming SQL engine over Apache Arrow and DataFusion.
//!
//! Files dropped into a directory become an unbounded table; SQL over it runs
//! micro-batch by micro-batch, incrementally, into console, memory, file or
//! user sinks. See docs/sql.md for the SQL dialect and docs/architecture.md
//! for the execution model and the layers of these modules.

mod catalog;
pub mod cli;
mod config;
pub mod dstream;
mod duration;
pub mod engine;
pub mod error;
mod exec;
mod memory;
mod options;
pub mod orders;
pub mod progress;
pub mod sink;
pub mod source;
mod sql;
mod state;
#[doc(hidden)]
pub mod testing;
pub mod ui;

pub use config::{OutputMode, Trigger, WatermarkPolicy};
pub use datafusion;
pub use engine::{Engine, EngineBuilder, Overrides};
pub use error::{BrookError, Result};
pub use exec::{QueryInfo, StreamingQuery};
pub use progress::QueryProgress;
