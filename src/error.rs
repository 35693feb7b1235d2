//! Typed errors for every layer of the engine.
//!
//! Every variant an embedder may want to act on is its own: bad SQL, options
//! and input ([`BrookError::Sql`], [`BrookError::Option`],
//! [`BrookError::Malformed`]), misuse of the API ([`BrookError::Usage`]),
//! checkpoints that cannot be used ([`BrookError::Checkpoint`],
//! [`BrookError::CheckpointData`]), and queries that failed
//! ([`BrookError::QueryFailed`], [`BrookError::ContextFailed`]), which keep
//! the error that stopped them. Errors from other crates are kept as
//! [`std::error::Error::source`]; [`BrookError::find_root`] walks down to the
//! innermost brook error.

use std::path::PathBuf;
use std::sync::Arc;

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

    /// A Delta Lake table that could not be read or written; the source is delta-rs's error.
    #[error("Delta table '{location}': {source}")]
    Delta {
        location: String,
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// The API called in a way its state does not allow: a streaming context
    /// started twice or awaited before it started, a DStream program that
    /// cannot run.
    #[error("{0}")]
    Usage(String),

    /// A checkpoint that cannot be used: corrupted, locked, or from another query.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },

    /// Data read back from a checkpoint that does not parse (an offset, a file
    /// path, a DStream state): the checkpoint is damaged, or was written by
    /// another program. The message includes the cause's.
    #[error("{message}")]
    CheckpointData {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A value that JSON could not carry, e.g. a DStream row that does not
    /// serialise, or a result row that does not fit its Rust type.
    #[error("{context}: {source}")]
    Serde {
        context: String,
        #[source]
        source: serde_json::Error,
    },

    #[error(transparent)]
    DataFusion(#[from] DataFusionError),

    #[error(transparent)]
    Arrow(#[from] ArrowError),

    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),

    #[error(transparent)]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),

    /// An error with what brook was doing when it happened.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<BrookError>,
    },

    /// The failure of work that several queries shared (one read of Kafka
    /// offsets), as each of them sees it.
    #[error(transparent)]
    Shared(Arc<BrookError>),

    /// A query that stopped with an error: `source` is that error, the same
    /// one each time the query is awaited or stopped.
    #[error("query '{query}' failed: {source}")]
    QueryFailed {
        query: String,
        #[source]
        source: Arc<BrookError>,
    },

    /// A DStream streaming context that stopped with an error.
    #[error("the streaming context failed: {source}")]
    ContextFailed {
        #[source]
        source: Arc<BrookError>,
    },

    /// A task of brook's own that panicked or was cancelled; `task` says which.
    #[error("{task} failed: {source}")]
    Task {
        task: String,
        #[source]
        source: tokio::task::JoinError,
    },

    /// Work given up before its end: a read no query wants any more, queries
    /// stopped at once by a second signal.
    #[error("{0}")]
    Cancelled(String),

    /// A broken invariant of brook's (a lock poisoned by a panic elsewhere, a
    /// plan without a part it was built with): a bug, never the input's fault.
    #[error("internal error: {0}")]
    Internal(String),
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

    pub fn delta(location: impl Into<String>, source: deltalake::DeltaTableError) -> Self {
        Self::Delta {
            location: location.into(),
            source: Box::new(source),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }

    /// A lock that a panic elsewhere left poisoned; `what` names the lock.
    pub fn poisoned(what: &str) -> Self {
        Self::Internal(format!("{what} lock poisoned by a panic"))
    }

    pub fn serde(context: impl Into<String>, source: serde_json::Error) -> Self {
        Self::Serde {
            context: context.into(),
            source,
        }
    }

    pub fn task(task: impl Into<String>, source: tokio::task::JoinError) -> Self {
        Self::Task {
            task: task.into(),
            source,
        }
    }

    /// The innermost brook error under this one: the malformed row under a
    /// failed query, say. Walks [`std::error::Error::source`], looking through
    /// the `Arc` and `Box` that hold shared and wrapped errors (as
    /// DataFusion's `find_root` does).
    pub fn find_root(&self) -> &BrookError {
        fn unshared(mut e: &BrookError) -> &BrookError {
            while let BrookError::Shared(inner) = e {
                e = inner;
            }
            e
        }
        let mut root = unshared(self);
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            let brook = e
                .downcast_ref::<BrookError>()
                .or_else(|| e.downcast_ref::<Arc<BrookError>>().map(|e| &**e))
                .or_else(|| e.downcast_ref::<Box<BrookError>>().map(|e| &**e));
            if let Some(brook) = brook {
                root = unshared(brook);
            }
            next = e.source();
        }
        root
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    fn malformed() -> BrookError {
        BrookError::Malformed {
            file: "/in/b.csv".into(),
            line: 3,
            reason: "cannot parse column 'price'".into(),
        }
    }

    /// Each link of the chain, as `anyhow` or a logger would print it.
    fn chain(e: &BrookError) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut next = e.source();
        while let Some(e) = next {
            out.push(e.to_string());
            next = e.source();
        }
        out
    }

    #[test]
    fn a_failed_query_keeps_the_error_that_stopped_it_as_its_source() {
        let err = BrookError::QueryFailed {
            query: "ff".into(),
            source: Arc::new(malformed()),
        };
        assert_eq!(
            err.to_string(),
            format!("query 'ff' failed: {}", malformed())
        );
        let source = err.source().map(ToString::to_string);
        assert_eq!(source, Some(malformed().to_string()));
        assert!(matches!(
            err.find_root(),
            BrookError::Malformed { line: 3, file, .. } if file == "/in/b.csv"
        ));
    }

    #[test]
    fn the_root_is_found_through_shared_and_wrapped_errors() {
        let shared = BrookError::Shared(Arc::new(malformed()));
        assert!(matches!(shared.find_root(), BrookError::Malformed { .. }));
        let failed = BrookError::ContextFailed {
            source: Arc::new(BrookError::Context {
                context: "reading".into(),
                source: Box::new(shared),
            }),
        };
        assert!(matches!(failed.find_root(), BrookError::Malformed { .. }));
        // A leaf is its own root.
        let usage = BrookError::usage("the streaming context was already started");
        assert!(matches!(usage.find_root(), BrookError::Usage(_)));
    }

    #[test]
    fn serde_and_io_errors_stay_reachable_from_the_brook_error() {
        let json = serde_json::from_str::<u32>("x").unwrap_err();
        let err = BrookError::serde("a DStream state", json);
        assert!(
            err.to_string()
                .starts_with("a DStream state: expected value")
        );
        assert!(err.source().unwrap().is::<serde_json::Error>());

        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let err = BrookError::ContextFailed {
            source: Arc::new(BrookError::io("/cp/offsets/3", io)),
        };
        assert_eq!(
            chain(&err),
            [
                "the streaming context failed: I/O error on /cp/offsets/3: gone",
                "I/O error on /cp/offsets/3: gone",
                "gone",
            ]
        );
        let io = err.find_root().source().unwrap();
        assert_eq!(
            io.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
    }

    #[tokio::test]
    async fn a_panicked_task_is_a_task_error_with_tokios_join_error() {
        let join = tokio::spawn(async { panic!("boom") }).await.unwrap_err();
        let err = BrookError::task("a checkpoint write task", join);
        assert!(
            err.to_string()
                .starts_with("a checkpoint write task failed: task ")
                && err.to_string().contains("panicked with message \"boom\""),
            "{err}"
        );
        let BrookError::Task { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(source.is_panic());
        assert!(err.source().unwrap().is::<tokio::task::JoinError>());
    }
}
