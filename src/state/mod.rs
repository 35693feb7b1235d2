//! Keyed operator state, versioned by batch id.
//!
//! Each stateful operator keeps one table of rows keyed by its group columns.
//! A store holds, per operator, the version committed by the last batch; the
//! checkpoint layer persists the same interface.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;

use datafusion::arrow::array::RecordBatch;

use crate::error::{BrookError, Result};

/// The rows of one operator's state as of a batch.
#[derive(Debug, Clone, Default)]
pub struct StateVersion {
    pub version: u64,
    pub rows: Vec<RecordBatch>,
}

impl StateVersion {
    pub fn num_rows(&self) -> usize {
        self.rows.iter().map(RecordBatch::num_rows).sum()
    }

    pub fn memory_bytes(&self) -> usize {
        self.rows
            .iter()
            .map(RecordBatch::get_array_memory_size)
            .sum()
    }
}

pub trait StateStore: Send + Sync + Debug {
    /// The last committed state of `operator`, if it has any.
    fn load(&self, operator: &str) -> Result<Option<StateVersion>>;

    /// Makes `state` the committed state of `operator`.
    fn commit(&self, operator: &str, state: StateVersion) -> Result<()>;
}

/// State kept in process memory: lost with the process.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    operators: Mutex<HashMap<String, StateVersion>>,
}

impl MemoryStateStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, StateVersion>>> {
        self.operators
            .lock()
            .map_err(|_| BrookError::Plan("state store lock poisoned".into()))
    }
}

impl StateStore for MemoryStateStore {
    fn load(&self, operator: &str) -> Result<Option<StateVersion>> {
        Ok(self.lock()?.get(operator).cloned())
    }

    fn commit(&self, operator: &str, state: StateVersion) -> Result<()> {
        self.lock()?.insert(operator.to_string(), state);
        Ok(())
    }
}
