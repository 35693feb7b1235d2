//! Operators on streams of key-value pairs (Spark's `PairDStreamFunctions`).
//! Keys come out in the order they first appear in the batch.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use super::keyed::{KeepFn, group, reduce_values};
use super::stateful::{self, StateSpec};
use super::{DStream, Data};

/// Each key's values from both streams of a `cogroup`.
pub type Cogrouped<K, V, W> = (K, (Vec<V>, Vec<W>));

impl<K: Data + Eq + Hash, V: Data> DStream<(K, V)> {
    pub fn reduce_by_key(&self, f: impl Fn(&V, &V) -> V + Send + Sync + 'static) -> Self {
        self.derive(move |rows, _| {
            Ok(group(rows)
                .into_iter()
                .filter_map(|(k, vs)| reduce_values(&vs, &f).map(|v| (k, v)))
                .collect())
        })
    }

    pub fn group_by_key(&self) -> DStream<(K, Vec<V>)> {
        self.derive(|rows, _| Ok(group(rows)))
    }

    /// Spark's `combineByKey`: a combiner per key from its first value, then merged.
    pub fn combine_by_key<C: Data>(
        &self,
        create: impl Fn(&V) -> C + Send + Sync + 'static,
        merge_value: impl Fn(C, &V) -> C + Send + Sync + 'static,
    ) -> DStream<(K, C)> {
        self.derive(move |rows, _| {
            Ok(group(rows)
                .into_iter()
                .map(|(k, vs)| {
                    let first = create(&vs[0]);
                    (k, vs[1..].iter().fold(first, &merge_value))
                })
                .collect())
        })
    }

    pub fn map_values<U: Data>(
        &self,
        f: impl Fn(&V) -> U + Send + Sync + 'static,
    ) -> DStream<(K, U)> {
        self.map(move |(k, v)| (k.clone(), f(v)))
    }

    pub fn flat_map_values<U: Data, I: IntoIterator<Item = U>>(
        &self,
        f: impl Fn(&V) -> I + Send + Sync + 'static,
    ) -> DStream<(K, U)> {
        self.flat_map(move |(k, v)| f(v).into_iter().map(|u| (k.clone(), u)).collect::<Vec<_>>())
    }

    /// Per batch, each key's values in this stream and in `other`.
    pub fn cogroup<W: Data>(&self, other: &DStream<(K, W)>) -> DStream<Cogrouped<K, V, W>> {
        let (a, b) = (self.clone(), other.clone());
        DStream::new(&self.ctx, move |env| {
            let (Some(left), Some(right)) = (a.rdd(env)?, b.rdd(env)?) else {
                return Ok(None);
            };
            let mut out: Vec<Cogrouped<K, V, W>> = group(&left)
                .into_iter()
                .map(|(k, vs)| (k, (vs, vec![])))
                .collect();
            let mut index: HashMap<K, usize> = out
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect();
            for (k, ws) in group(&right) {
                match index.get(&k) {
                    Some(&i) => out[i].1.1 = ws,
                    None => {
                        index.insert(k.clone(), out.len());
                        out.push((k, (vec![], ws)));
                    }
                }
            }
            Ok(Some(Arc::new(out)))
        })
    }

    /// Inner join of the two streams' batches at the same time.
    pub fn join<W: Data>(&self, other: &DStream<(K, W)>) -> DStream<(K, (V, W))> {
        self.cogroup(other).flat_map(|(k, (vs, ws))| {
            vs.iter()
                .flat_map(|v| ws.iter().map(move |w| (k.clone(), (v.clone(), w.clone()))))
                .collect::<Vec<_>>()
        })
    }

    pub fn left_outer_join<W: Data>(
        &self,
        other: &DStream<(K, W)>,
    ) -> DStream<(K, (V, Option<W>))> {
        self.cogroup(other).flat_map(|(k, (vs, ws))| {
            let ws: Vec<Option<W>> = if ws.is_empty() {
                vec![None]
            } else {
                ws.iter().cloned().map(Some).collect()
            };
            vs.iter()
                .flat_map(|v| ws.iter().map(move |w| (k.clone(), (v.clone(), w.clone()))))
                .collect::<Vec<_>>()
        })
    }

    pub fn reduce_by_key_and_window(
        &self,
        f: impl Fn(&V, &V) -> V + Send + Sync + 'static,
        length: Duration,
        slide: Duration,
    ) -> Self {
        self.window(length, slide).reduce_by_key(f)
    }

    /// The incremental form: each slide adds the batches entering the window
    /// with `f` and takes out those leaving it with `inverse`, instead of
    /// reducing the whole window again. Keys are kept while `keep` says so
    /// (Spark's `filterFunc`; without it every key ever seen stays).
    pub fn reduce_by_key_and_window_inv(
        &self,
        f: impl Fn(&V, &V) -> V + Send + Sync + 'static,
        inverse: impl Fn(&V, &V) -> V + Send + Sync + 'static,
        length: Duration,
        slide: Duration,
        keep: Option<KeepFn<K, V>>,
    ) -> Self {
        stateful::reduce_by_key_and_window_inv(self, f, inverse, length, slide, keep)
    }

    /// Spark's `updateStateByKey`: every batch, each key's state is
    /// `f(new values, previous state)`; `None` removes the key. The stream is
    /// every key's state.
    pub fn update_state_by_key<S: Data>(
        &self,
        f: impl Fn(&[V], Option<S>) -> Option<S> + Send + Sync + 'static,
    ) -> DStream<(K, S)> {
        stateful::update_state_by_key(self, f)
    }

    /// Spark's `mapWithState`: `spec`'s function sees each new (key, value) with
    /// the key's state, and its results are the stream; `state_snapshots()`
    /// of the returned pair gives every key's state.
    pub fn map_with_state<S: Data, U: Data>(
        &self,
        spec: StateSpec<K, V, S, U>,
    ) -> stateful::MapWithStateDStream<K, S, U> {
        stateful::map_with_state(self, spec)
    }
}
