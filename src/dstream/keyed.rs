//! What the pair and the stateful operators share: values grouped by key.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use super::Data;

/// Spark's `filterFunc` for the incremental windowed reduce: which keys stay.
pub type KeepFn<K, V> = Arc<dyn Fn(&(K, V)) -> bool + Send + Sync>;

/// The batch's values grouped by key, keys in order of first appearance.
pub(crate) fn group<K: Data + Eq + Hash, V: Clone>(rows: &[(K, V)]) -> Vec<(K, Vec<V>)> {
    let mut index: HashMap<&K, usize> = HashMap::new();
    let mut out: Vec<(K, Vec<V>)> = vec![];
    for (k, v) in rows {
        match index.get(k) {
            Some(&i) => out[i].1.push(v.clone()),
            None => {
                index.insert(k, out.len());
                out.push((k.clone(), vec![v.clone()]));
            }
        }
    }
    out
}

pub(crate) fn reduce_values<V: Clone>(values: &[V], f: &impl Fn(&V, &V) -> V) -> Option<V> {
    let mut it = values.iter();
    it.next()
        .map(|first| it.fold(first.clone(), |acc, x| f(&acc, x)))
}
