//! Spark Streaming's DStream API over brook's micro-batch engine.
//!
//! A [`StreamingContext`] runs a batch every `batch_interval`: it plans each
//! input's next offset with the same [`StreamSource`]s as SQL queries (the
//! file source for `text_file_stream`, a socket source, Kafka), writes those
//! offsets ahead to the same checkpoint, reads them, and evaluates every
//! output operation. A [`DStream<T>`] is a per-batch computation over typed
//! values: closures (`map`, `filter`, ...) run on the batch's rows in the
//! process, `transform_df` hands a batch to DataFusion as a DataFrame, and
//! stateful operators keep their state in checkpointed snapshots, committed
//! with the batch as an SQL query's aggregation state is.
//!
//! [`StreamSource`]: crate::source::StreamSource

mod context;
mod dataframe;
mod keyed;
mod output;
mod pair;
mod stateful;

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use context::StreamingContext;
pub use keyed::KeepFn;
pub use output::SparkString;
pub use pair::Cogrouped;
pub use stateful::{MapWithStateDStream, State, StateSpec};

use crate::error::{BrookError, Result};

/// What a DStream can hold: values that can be copied between operators and
/// written to a checkpoint (windows and state keep them across batches).
pub trait Data: Clone + Send + Sync + Serialize + DeserializeOwned + 'static {}
impl<T: Clone + Send + Sync + Serialize + DeserializeOwned + 'static> Data for T {}

/// The batch being computed: its time, and each DStream's result, computed once.
pub(crate) struct BatchEnv {
    pub time_ms: i64,
    pub inputs: Vec<Arc<dyn Any + Send + Sync>>,
    results: Mutex<HashMap<usize, Option<Arc<dyn Any + Send + Sync>>>>,
}

impl BatchEnv {
    pub fn new(time_ms: i64, inputs: Vec<Arc<dyn Any + Send + Sync>>) -> Self {
        Self {
            time_ms,
            inputs,
            results: Mutex::default(),
        }
    }
}

/// A DStream's batch: `None` when it has none at this time (a window between slides).
pub(crate) type Rdd<T> = Option<Arc<Vec<T>>>;

type Compute<T> = Arc<dyn Fn(&BatchEnv) -> Result<Rdd<T>> + Send + Sync>;

/// A stream of batches of `T`, Spark's DStream.
pub struct DStream<T> {
    pub(crate) ctx: StreamingContext,
    id: usize,
    compute: Compute<T>,
}

impl<T> Clone for DStream<T> {
    fn clone(&self) -> Self {
        Self {
            ctx: self.ctx.clone(),
            id: self.id,
            compute: self.compute.clone(),
        }
    }
}

impl<T: Data> DStream<T> {
    pub(crate) fn new(
        ctx: &StreamingContext,
        compute: impl Fn(&BatchEnv) -> Result<Rdd<T>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            ctx: ctx.clone(),
            id: ctx.next_id(),
            compute: Arc::new(compute),
        }
    }

    /// This stream's batch at `env`'s time, computed at most once per batch.
    pub(crate) fn rdd(&self, env: &BatchEnv) -> Result<Rdd<T>> {
        let cached = env
            .results
            .lock()
            .map_err(|_| BrookError::poisoned("batch results"))?
            .get(&self.id)
            .cloned();
        if let Some(hit) = cached {
            return Ok(hit.and_then(|any| any.downcast::<Vec<T>>().ok()));
        }
        let rdd = (self.compute)(env)?;
        env.results
            .lock()
            .map_err(|_| BrookError::poisoned("batch results"))?
            .insert(
                self.id,
                rdd.clone().map(|r| r as Arc<dyn Any + Send + Sync>),
            );
        Ok(rdd)
    }

    /// A new stream whose batch is `f` of this stream's batch.
    pub(crate) fn derive<U: Data>(
        &self,
        f: impl Fn(&[T], i64) -> Result<Vec<U>> + Send + Sync + 'static,
    ) -> DStream<U> {
        let parent = self.clone();
        DStream::new(&self.ctx, move |env| {
            parent
                .rdd(env)?
                .map(|rdd| f(&rdd, env.time_ms).map(Arc::new))
                .transpose()
        })
    }

    pub fn map<U: Data>(&self, f: impl Fn(&T) -> U + Send + Sync + 'static) -> DStream<U> {
        self.derive(move |rows, _| Ok(rows.iter().map(&f).collect()))
    }

    pub fn flat_map<U: Data, I: IntoIterator<Item = U>>(
        &self,
        f: impl Fn(&T) -> I + Send + Sync + 'static,
    ) -> DStream<U> {
        self.derive(move |rows, _| Ok(rows.iter().flat_map(&f).collect()))
    }

    pub fn filter(&self, f: impl Fn(&T) -> bool + Send + Sync + 'static) -> DStream<T> {
        self.derive(move |rows, _| Ok(rows.iter().filter(|r| f(r)).cloned().collect()))
    }

    /// `f` over the whole batch (one partition here: the batch is not split).
    pub fn map_partitions<U: Data>(
        &self,
        f: impl Fn(&[T]) -> Vec<U> + Send + Sync + 'static,
    ) -> DStream<U> {
        self.derive(move |rows, _| Ok(f(rows)))
    }

    /// Spark's `transform`: any function of the batch and its time (ms).
    pub fn transform<U: Data>(
        &self,
        f: impl Fn(&[T], i64) -> Vec<U> + Send + Sync + 'static,
    ) -> DStream<U> {
        self.derive(move |rows, time| Ok(f(rows, time)))
    }

    /// A batch is computed in one process here, so the number of partitions
    /// changes nothing; kept so that Spark programs port unchanged.
    pub fn repartition(&self, _partitions: usize) -> DStream<T> {
        self.clone()
    }

    pub fn union(&self, other: &DStream<T>) -> DStream<T> {
        let (a, b) = (self.clone(), other.clone());
        DStream::new(&self.ctx, move |env| {
            Ok(match (a.rdd(env)?, b.rdd(env)?) {
                (None, None) => None,
                (x, y) => {
                    let mut rows: Vec<T> = x.map(|r| r.to_vec()).unwrap_or_default();
                    rows.extend(y.map(|r| r.to_vec()).unwrap_or_default());
                    Some(Arc::new(rows))
                }
            })
        })
    }

    /// One element per batch: the number of rows.
    pub fn count(&self) -> DStream<i64> {
        self.derive(|rows, _| Ok(vec![rows.len() as i64]))
    }

    /// Each batch reduced to one element (none for an empty batch), as Spark does.
    pub fn reduce(&self, f: impl Fn(&T, &T) -> T + Send + Sync + 'static) -> DStream<T> {
        self.derive(move |rows, _| {
            let mut it = rows.iter();
            Ok(it
                .next()
                .map(|first| it.fold(first.clone(), |acc, x| f(&acc, x)))
                .into_iter()
                .collect())
        })
    }

    /// Spark's `window(windowLength, slideInterval)`: every `slide`, the rows of
    /// the last `length` of batches. Both must be multiples of the batch interval.
    pub fn window(&self, length: std::time::Duration, slide: std::time::Duration) -> DStream<T> {
        stateful::window(self, length, slide)
    }

    pub fn count_by_window(
        &self,
        length: std::time::Duration,
        slide: std::time::Duration,
    ) -> DStream<i64> {
        self.window(length, slide).count()
    }

    pub fn reduce_by_window(
        &self,
        f: impl Fn(&T, &T) -> T + Send + Sync + 'static,
        length: std::time::Duration,
        slide: std::time::Duration,
    ) -> DStream<T> {
        self.window(length, slide).reduce(f)
    }
}

impl<T: Data + Eq + std::hash::Hash> DStream<T> {
    /// Each distinct value with how often it occurs in the batch.
    pub fn count_by_value(&self) -> DStream<(T, i64)> {
        self.map(|v| (v.clone(), 1_i64)).reduce_by_key(|a, b| a + b)
    }
}
