//! Operators that keep something across batches: windows and per-key state.
//! Each registers its state with the context, which writes it to the
//! checkpoint with every committed batch and loads it on restart.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::keyed::{KeepFn, group, reduce_values};
use super::{DStream, Data};
use crate::error::{BrookError, Result};

/// State an operator keeps across batches, saved with each committed batch.
pub(crate) trait Checkpointed: Send + Sync {
    fn save(&self) -> Result<serde_json::Value>;
    fn load(&self, value: serde_json::Value) -> Result<()>;
}

/// A value behind a lock, checkpointed as JSON.
struct Cell<S>(Mutex<S>);

impl<S: Serialize + DeserializeOwned + Send> Checkpointed for Cell<S> {
    fn save(&self) -> Result<serde_json::Value> {
        serde_json::to_value(&*self.lock()?).map_err(|e| BrookError::serde("a DStream state", e))
    }

    fn load(&self, value: serde_json::Value) -> Result<()> {
        *self.lock()? = serde_json::from_value(value).map_err(|e| BrookError::CheckpointData {
            message: format!("unreadable DStream state in the checkpoint: {e}"),
            source: Some(Box::new(e)),
        })?;
        Ok(())
    }
}

impl<S> Cell<S> {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, S>> {
        self.0
            .lock()
            .map_err(|_| BrookError::poisoned("DStream state"))
    }
}

fn cell<T: Data, S: Serialize + DeserializeOwned + Send + Default + 'static>(
    stream: &DStream<T>,
) -> Arc<Cell<S>> {
    let cell = Arc::new(Cell(Mutex::new(S::default())));
    stream.ctx.register_state(cell.clone());
    cell
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a window sliding every `slide` ends at batch time `time`.
fn slides_at(time: i64, slide: i64) -> bool {
    slide > 0 && time % slide == 0
}

pub(crate) fn window<T: Data>(
    stream: &DStream<T>,
    length: Duration,
    slide: Duration,
) -> DStream<T> {
    stream.ctx.check_window(length, slide);
    let (length, slide) = (millis(length), millis(slide));
    let batches = cell::<T, VecDeque<(i64, Vec<T>)>>(stream);
    let parent = stream.clone();
    DStream::new(&stream.ctx, move |env| {
        let mut kept = batches.lock()?;
        if let Some(rdd) = parent.rdd(env)? {
            kept.push_back((env.time_ms, rdd.to_vec()));
        }
        while kept
            .front()
            .is_some_and(|(t, _)| *t <= env.time_ms - length)
        {
            kept.pop_front();
        }
        Ok(slides_at(env.time_ms, slide).then(|| {
            Arc::new(
                kept.iter()
                    .flat_map(|(_, rows)| rows.iter().cloned())
                    .collect(),
            )
        }))
    })
}

/// The window's running value per key, and each batch's reduced slice.
#[derive(Serialize, serde::Deserialize)]
#[serde(bound = "K: Data, V: Data")]
struct Running<K, V> {
    current: Vec<(K, V)>,
    slices: VecDeque<(i64, Vec<(K, V)>)>,
}

impl<K, V> Default for Running<K, V> {
    fn default() -> Self {
        Self {
            current: vec![],
            slices: VecDeque::new(),
        }
    }
}

fn fold_into<K: Data + Eq + Hash, V: Data>(
    current: &mut Vec<(K, V)>,
    slice: &[(K, V)],
    f: &impl Fn(&V, &V) -> V,
) {
    let index: HashMap<K, usize> = current
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.clone(), i))
        .collect();
    for (k, v) in slice {
        match index.get(k) {
            Some(&i) => current[i].1 = f(&current[i].1, v),
            None => current.push((k.clone(), v.clone())),
        }
    }
}

pub(crate) fn reduce_by_key_and_window_inv<K: Data + Eq + Hash, V: Data>(
    stream: &DStream<(K, V)>,
    f: impl Fn(&V, &V) -> V + Send + Sync + 'static,
    inverse: impl Fn(&V, &V) -> V + Send + Sync + 'static,
    length: Duration,
    slide: Duration,
    keep: Option<KeepFn<K, V>>,
) -> DStream<(K, V)> {
    stream.ctx.check_window(length, slide);
    let (length, slide) = (millis(length), millis(slide));
    let running = cell::<(K, V), Running<K, V>>(stream);
    let parent = stream.clone();
    DStream::new(&stream.ctx, move |env| {
        let mut state = running.lock()?;
        let state = &mut *state;
        if let Some(rdd) = parent.rdd(env)? {
            let slice: Vec<(K, V)> = group(&rdd)
                .into_iter()
                .filter_map(|(k, vs)| reduce_values(&vs, &f).map(|v| (k, v)))
                .collect();
            fold_into(&mut state.current, &slice, &f);
            state.slices.push_back((env.time_ms, slice));
        }
        let mut evicted = false;
        while state
            .slices
            .front()
            .is_some_and(|(t, _)| *t <= env.time_ms - length)
        {
            if let Some((_, old)) = state.slices.pop_front() {
                fold_into(&mut state.current, &old, &inverse);
                evicted = true;
            }
        }
        if evicted {
            // A key with no batch left in the window is gone, whatever its value.
            let live: std::collections::HashSet<&K> = state
                .slices
                .iter()
                .flat_map(|(_, slice)| slice.iter().map(|(k, _)| k))
                .collect();
            let current = std::mem::take(&mut state.current);
            state.current = current
                .into_iter()
                .filter(|(k, _)| live.contains(k))
                .collect();
        }
        if !slides_at(env.time_ms, slide) {
            return Ok(None);
        }
        let rows = match &keep {
            Some(keep) => state
                .current
                .iter()
                .filter(|kv| keep(kv))
                .cloned()
                .collect(),
            None => state.current.clone(),
        };
        Ok(Some(Arc::new(rows)))
    })
}

pub(crate) fn update_state_by_key<K: Data + Eq + Hash, V: Data, S: Data>(
    stream: &DStream<(K, V)>,
    f: impl Fn(&[V], Option<S>) -> Option<S> + Send + Sync + 'static,
) -> DStream<(K, S)> {
    let states = cell::<(K, V), Vec<(K, S)>>(stream);
    let parent = stream.clone();
    DStream::new(&stream.ctx, move |env| {
        let Some(rdd) = parent.rdd(env)? else {
            return Ok(None);
        };
        let mut new_values: HashMap<K, Vec<V>> = group(&rdd).into_iter().collect();
        let mut states = states.lock()?;
        let mut next = Vec::with_capacity(states.len());
        for (k, s) in states.drain(..) {
            let values = new_values.remove(&k).unwrap_or_default();
            if let Some(s) = f(&values, Some(s)) {
                next.push((k, s));
            }
        }
        for (k, _) in group(&rdd) {
            if let Some(values) = new_values.remove(&k)
                && let Some(s) = f(&values, None)
            {
                next.push((k, s));
            }
        }
        *states = next;
        Ok(Some(Arc::new(states.clone())))
    })
}

/// A key's state as `map_with_state`'s function sees it (Spark's `State`).
#[derive(Debug)]
pub struct State<S> {
    value: Option<S>,
    timing_out: bool,
}

impl<S> State<S> {
    pub fn exists(&self) -> bool {
        self.value.is_some()
    }

    pub fn get(&self) -> Option<&S> {
        self.value.as_ref()
    }

    pub fn update(&mut self, value: S) {
        self.value = Some(value);
    }

    pub fn remove(&mut self) {
        self.value = None;
    }

    /// The key is being called because it timed out; its state goes after this call.
    pub fn is_timing_out(&self) -> bool {
        self.timing_out
    }
}

type MapFn<K, V, S, U> = Arc<dyn Fn(&K, Option<&V>, &mut State<S>) -> U + Send + Sync>;

/// Spark's `StateSpec`: the function, an idle timeout and an initial state.
pub struct StateSpec<K, V, S, U> {
    function: MapFn<K, V, S, U>,
    timeout: Option<Duration>,
    initial: Vec<(K, S)>,
}

impl<K, V, S, U> StateSpec<K, V, S, U> {
    pub fn function(
        f: impl Fn(&K, Option<&V>, &mut State<S>) -> U + Send + Sync + 'static,
    ) -> Self {
        Self {
            function: Arc::new(f),
            timeout: None,
            initial: vec![],
        }
    }

    /// Keys without new values for this long are called once more with no
    /// value (`is_timing_out`), then dropped.
    pub fn timeout(mut self, idle: Duration) -> Self {
        self.timeout = Some(idle);
        self
    }

    pub fn initial_state(mut self, state: Vec<(K, S)>) -> Self {
        self.initial = state;
        self
    }
}

/// What `map_with_state` keeps: whether the initial state was taken, and per
/// key its state and when it last had a value.
type Keyed<K, S> = (bool, Vec<(K, S, i64)>);

/// The mapped values, and the state they were computed with.
pub struct MapWithStateDStream<K, S, U> {
    mapped: DStream<U>,
    snapshots: DStream<(K, S)>,
}

impl<K, S, U> MapWithStateDStream<K, S, U> {
    /// The function's results, one per new value (and per timed-out key).
    pub fn stream(&self) -> &DStream<U> {
        &self.mapped
    }

    /// Every key's state after each batch.
    pub fn state_snapshots(&self) -> &DStream<(K, S)> {
        &self.snapshots
    }
}

impl<K, S, U> std::ops::Deref for MapWithStateDStream<K, S, U> {
    type Target = DStream<U>;
    fn deref(&self) -> &DStream<U> {
        &self.mapped
    }
}

pub(crate) fn map_with_state<K: Data + Eq + Hash, V: Data, S: Data, U: Data>(
    stream: &DStream<(K, V)>,
    spec: StateSpec<K, V, S, U>,
) -> MapWithStateDStream<K, S, U> {
    let states = cell::<(K, V), Keyed<K, S>>(stream);
    let initial = Mutex::new(Some(spec.initial));
    let timeout = spec.timeout.map(millis);
    let function = spec.function;
    let parent = stream.clone();
    let kept = states.clone();
    let mapped = DStream::new(&stream.ctx, move |env| {
        let Some(rdd) = parent.rdd(env)? else {
            return Ok(None);
        };
        let mut kept = kept.lock()?;
        let (initialised, states) = &mut *kept;
        if !*initialised {
            if let Some(init) = initial.lock().ok().and_then(|mut i| i.take()) {
                *states = init.into_iter().map(|(k, s)| (k, s, env.time_ms)).collect();
            }
            *initialised = true;
        }
        let mut index: HashMap<K, usize> = states
            .iter()
            .enumerate()
            .map(|(i, (k, _, _))| (k.clone(), i))
            .collect();
        let mut slots: Vec<Option<(K, S, i64)>> = states.drain(..).map(Some).collect();
        let mut out = Vec::with_capacity(rdd.len());
        for (k, v) in rdd.iter() {
            let slot = match index.get(k) {
                Some(&i) => i,
                None => {
                    index.insert(k.clone(), slots.len());
                    slots.push(None);
                    slots.len() - 1
                }
            };
            let mut state = State {
                value: slots[slot].take().map(|(_, s, _)| s),
                timing_out: false,
            };
            out.push(function(k, Some(v), &mut state));
            slots[slot] = state.value.map(|s| (k.clone(), s, env.time_ms));
        }
        for slot in slots.iter_mut() {
            let idle = match (slot.as_ref(), timeout) {
                // Spark times a key out once idle for longer than the timeout.
                (Some((_, _, seen)), Some(t)) => env.time_ms - seen > t,
                _ => false,
            };
            if idle && let Some((k, s, _)) = slot.take() {
                let mut state = State {
                    value: Some(s),
                    timing_out: true,
                };
                out.push(function(&k, None, &mut state));
            }
        }
        *states = slots.into_iter().flatten().collect();
        Ok(Some(Arc::new(out)))
    });
    let after = mapped.clone();
    let snapshots = DStream::new(&stream.ctx, move |env| {
        if after.rdd(env)?.is_none() {
            return Ok(None);
        }
        let kept = states.lock()?;
        Ok(Some(Arc::new(
            kept.1
                .iter()
                .map(|(k, s, _)| (k.clone(), s.clone()))
                .collect(),
        )))
    });
    MapWithStateDStream { mapped, snapshots }
}
