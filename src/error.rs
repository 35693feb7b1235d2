//! Typed errors for every layer of the engine.

use std::path::PathBuf;

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

pub type Result<T, E = BrookError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum BrookError {
    /// The SQL text or a query shape that brook cannot run as a stream.
    #[error("SQL error: {0}")]
    Sql(String),

    /// A table or sink option with a bad or missing value; names the option.
    #[error("option '{option}': {message}")]
    Option { option: String, message: String },

    /// A source location that cannot be read (missing directory, bad URL).
    #[error("source '{location}': {message}")]
    Source { location: String, message: String },

    /// A row rejected under FAILFAST, naming file and line.
    #[error(
        "malformed record in {file} line {line}: {reason} (set option 'mode' to 'DROPMALFORMED' or 'PERMISSIVE' to keep going)"
    )]
    Malformed {
        file: String,
        line: u64,
        reason: String,
    },

    #[error("sink '{sink}': {message}")]
    Sink { sink: String, message: String },

    #[error("{0}")]
    Plan(String),

    /// A checkpoint that cannot be used: corrupted, locked, or from another query.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    DataFusion(#[from] DataFusionError),

    #[error(transparent)]
    Arrow(#[from] ArrowError),

    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),

    #[error(transparent)]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),

    /// The failure of work that several queries shared (one read of Kafka
    /// offsets), as each of them sees it.
    #[error(transparent)]
    Shared(std::sync::Arc<BrookError>),

    /// A query or streaming context that failed or panicked; the message names it.
    #[error("{0}")]
    Stopped(String),
}

impl BrookError {
    pub fn option(option: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Option {
            option: option.into(),
            message: message.into(),
        }
    }

    pub fn sql(message: impl Into<String>) -> Self {
        Self::Sql(message.into())
    }

    pub fn checkpoint(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
