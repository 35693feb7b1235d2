//! The micro-batch engine: compiled queries, the stateful operator, the batch loop.

pub mod cluster;
pub mod compile;
pub mod join;
pub mod query;
pub mod read;
pub mod session;
pub mod stateful;

pub use query::{QueryInfo, QueryOptions, StreamingQuery};
