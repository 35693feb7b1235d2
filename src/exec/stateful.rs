//! One batch of a streaming aggregation: partial, late-row drop, merge, emit, evict.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::kernels::cmp::{gt, lt_eq};
use datafusion::arrow::compute::kernels::numeric::neg_wrapping;
use datafusion::arrow::compute::{
    and, cast, concat_batches, filter_record_batch, min, not, prep_null_mask_filter,
    sort_to_indices, sum, take_record_batch,
};
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::physical_plan::{ExecutionPlan, collect};

use super::session;
use crate::config::OutputMode;
use crate::error::Result;
use crate::sql::slot::Slot;
use crate::sql::window::WindowTicks;
pub use crate::state::checkpoint::Watermarks;

/// Runs a plan built once per query, resetting any state an earlier run left in it.
pub async fn execute(
    plan: &Arc<dyn ExecutionPlan>,
    ctx: &Arc<TaskContext>,
) -> Result<Vec<RecordBatch>> {
    let fresh = plan
        .clone()
        .transform_up(|p| Ok(Transformed::yes(p.reset_state()?)))?
        .data;
    Ok(collect(fresh, ctx.clone()).await?)
}

/// The group column that carries event time, so state can be closed by the watermark.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EventTimeKey {
    pub column: usize,
    /// A `window` struct (closed when its end passes) rather than a timestamp.
    pub is_window: bool,
    pub unit_nanos: i64,
}

impl EventTimeKey {
    /// When each row's group closes, in the key's units: its window's end, or its time.
    fn closes_at(&self, batch: &RecordBatch) -> Result<ArrayRef> {
        let key = batch.column(self.column);
        let time = if self.is_window {
            key.as_struct().column(1).clone()
        } else {
            key.clone()
        };
        Ok(cast(&time, &DataType::Int64)?)
    }

    /// Rows whose group the watermark has closed: window end (or time) <= watermark.
    fn closed(&self, batch: &RecordBatch, watermark_ns: i64) -> Result<BooleanArray> {
        let limit = Int64Array::new_scalar(watermark_ns.div_euclid(self.unit_nanos));
        Ok(nulls_false(&lt_eq(&self.closes_at(batch)?, &limit)?))
    }
}

/// What the driver knows of an aggregation's state that a cluster's executors
/// keep: what their last batch reported.
#[derive(Debug, Clone, Default)]
pub struct RemoteState {
    pub rows: u64,
    pub bytes: u64,
    /// The earliest time (ns) a group held closes at; `None` when none closes.
    pub earliest_close_ns: Option<i64>,
    /// False until a batch has reported since the query started: a restarted
    /// query does not know what its state holds.
    pub known: bool,
}

impl Watermarks {
    /// Both held back by `lag_ns` (an operator fed by a join, whose pairs lag).
    pub fn lagged(self, lag_ns: i64) -> Self {
        Self {
            late_ns: self.late_ns.map(|w| w.saturating_sub(lag_ns)),
            evict_ns: self.evict_ns.map(|w| w.saturating_sub(lag_ns)),
        }
    }
}

#[derive(Debug)]
pub struct StatefulOp {
    pub partial: Arc<dyn ExecutionPlan>,
    pub merge: Arc<dyn ExecutionPlan>,
    pub finalize: Arc<dyn ExecutionPlan>,
    pub state_slot: Slot,
    pub delta_slot: Slot,
    pub emit_slot: Slot,
    /// Key column holding window panes, expanded into windows after the partial.
    pub window_key: Option<usize>,
    pub event_time_key: Option<EventTimeKey>,
    /// Index of the input-row count in partial and state rows.
    pub rows_column: usize,
    /// The number of leading state columns that identify a group.
    pub keys: usize,
    pub state: Vec<RecordBatch>,
    /// Append mode over overlapping windows: state is kept per pane, and a
    /// window is summed from its panes once, when it closes.
    pub panes: bool,
    /// The watermark up to which windows have been emitted (pane state only).
    pub emitted_through_ns: Option<i64>,
    /// Sums only (see `AggregateSplit::invertible`): a closing window's sum is
    /// carried to the next one rather than summed again from its panes.
    pub invertible: bool,
    pub running: Option<RunningWindow>,
    /// SELECT DISTINCT (Spark's `dropDuplicates`): a batch emits the keys it is
    /// the first to see, and the state only remembers keys.
    pub dedup: bool,
    /// The columns of merged rows that state keeps (a deduplication's first
    /// rows are emitted, not kept).
    pub state_columns: Vec<usize>,
    /// The key column of a `session_window`, whose sessions merge (see [`session`]).
    pub session_key: Option<usize>,
    /// Set when the state is kept on a cluster's executors, not in `state`.
    pub remote: Option<RemoteState>,
}

#[derive(Debug, Default)]
pub struct StatefulOutcome {
    pub output: Vec<RecordBatch>,
    pub late_rows: u64,
    pub updated_rows: u64,
    pub removed_rows: u64,
    /// Input rows a SELECT DISTINCT dropped as duplicates of rows already seen.
    pub dropped_duplicates: u64,
    /// The state rows the batch changed or removed, for [`delta::changes`].
    pub upserts: Vec<RecordBatch>,
    pub deletes: Vec<RecordBatch>,
}

impl StatefulOp {
    pub fn state_rows(&self) -> usize {
        match &self.remote {
            Some(remote) => remote.rows as usize,
            None => self.state.iter().map(RecordBatch::num_rows).sum(),
        }
    }

    pub fn state_bytes(&self) -> usize {
        match &self.remote {
            Some(remote) => remote.bytes as usize,
            None => self
                .state
                .iter()
                .map(RecordBatch::get_array_memory_size)
                .sum(),
        }
    }

    /// The earliest time (ns) a group in `state` closes at, if any closes.
    pub fn earliest_close_ns(&self) -> Result<Option<i64>> {
        let Some(key) = &self.event_time_key else {
            return Ok(None);
        };
        let mut earliest: Option<i64> = None;
        for b in &self.state {
            let at = key.closes_at(b)?;
            if let Some(t) = min(at.as_primitive::<Int64Type>()) {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
        }
        Ok(earliest.map(|t| t.saturating_mul(key.unit_nanos)))
    }

    /// Whether the watermark `watermark_ns` closes a group held in state: a
    /// batch without input would then emit or drop rows, and is otherwise not run.
    pub fn closes_state(&self, watermark_ns: i64, window: Option<&WindowTicks>) -> Result<bool> {
        let Some(key) = &self.event_time_key else {
            return Ok(false);
        };
        if let Some(remote) = &self.remote {
            return Ok(!remote.known || remote.earliest_close_ns.is_some_and(|t| t <= watermark_ns));
        }
        if let (true, Some(ticks)) = (self.panes, window) {
            // Windows close in order of their starts, and a pane is dropped in the
            // batch that emits its last window.
            let wm = watermark_ns.div_euclid(key.unit_nanos);
            return Ok(self
                .first_open_window(ticks, key)?
                .is_some_and(|start| start.saturating_add(ticks.size()) <= wm));
        }
        for b in &self.state {
            if key.closed(b, watermark_ns)?.true_count() > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The start of the first window over pane state that no batch has emitted
    /// yet; `None` when the state holds no pane.
    fn first_open_window(&self, ticks: &WindowTicks, key: &EventTimeKey) -> Result<Option<i64>> {
        let mut first_pane: Option<i64> = None;
        for b in &self.state {
            if let Some(p) = min(&pane_starts(b, key.column)?) {
                first_pane = Some(first_pane.map_or(p, |f| f.min(p)));
            }
        }
        let Some(first_pane) = first_pane else {
            return Ok(None);
        };
        let mut start = ticks.covering(first_pane).0;
        if let Some(done) = self.emitted_through_ns {
            let after = done
                .div_euclid(key.unit_nanos)
                .saturating_sub(ticks.size())
                .saturating_add(1);
            start = start.max(ticks.start_at_or_after(after));
        }
        Ok(Some(start))
    }

    /// Takes up state loaded from a checkpoint, in one batch, and pane state
    /// sorted by pane as [`run_panes`](Self::run_panes) keeps it.
    pub fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        let mut all = concat_batches(self.state_slot.schema(), &state)?;
        if let (true, Some(key)) = (self.panes, &self.event_time_key) {
            all = by_pane(all, key.column)?;
        }
        self.state = if all.num_rows() > 0 {
            vec![all]
        } else {
            vec![]
        };
        self.running = None;
        Ok(())
    }

    /// Runs one batch over the rows already in the input slot, under `watermarks`.
    pub async fn run(
        &mut self,
        ctx: &Arc<TaskContext>,
        mode: OutputMode,
        watermarks: Watermarks,
        window: Option<&WindowTicks>,
    ) -> Result<StatefulOutcome> {
        let (mut outcome, emit) = self.advance(ctx, mode, watermarks, window).await?;
        outcome.output = self.finish(ctx, &emit).await?;
        Ok(outcome)
    }

    /// The query's rows from the state rows a batch emits.
    pub async fn finish(
        &self,
        ctx: &Arc<TaskContext>,
        emit: &[RecordBatch],
    ) -> Result<Vec<RecordBatch>> {
        self.emit_slot.set(emit)?;
        execute(&self.finalize, ctx).await
    }

    /// One batch's merge of the rows in the input slot into the state: the
    /// batch's outcome but its output, and the state rows it emits, which
    /// [`finish`](Self::finish) turns into the query's rows.
    pub async fn advance(
        &mut self,
        ctx: &Arc<TaskContext>,
        mode: OutputMode,
        watermarks: Watermarks,
        window: Option<&WindowTicks>,
    ) -> Result<(StatefulOutcome, Vec<RecordBatch>)> {
        if let (true, Some(ticks), Some(key)) = (self.panes, window, self.event_time_key.clone()) {
            return self.run_panes(ctx, ticks, &key, watermarks).await;
        }
        let mut outcome = StatefulOutcome::default();
        let mut delta = execute(&self.partial, ctx).await?;
        // Held until the batch ends, as long as the copies it accounts for.
        let mut expanded = MemoryConsumer::new("window expansion").register(ctx.memory_pool());
        if let (Some(col), Some(ticks)) = (self.window_key, window) {
            delta = delta
                .iter()
                .map(|b| ticks.expand(b, col, &mut expanded))
                .collect::<Result<_>>()?;
        }
        // Complete mode keeps every group forever, so nothing is ever late (as in Spark).
        let closing = match (&self.event_time_key, watermarks.evict_ns, mode) {
            (Some(key), Some(wm), OutputMode::Append | OutputMode::Update) => {
                Some((key.clone(), wm))
            }
            _ => None,
        };
        // A group between the two watermarks takes this batch's rows and is then
        // closed with them, once.
        if let (Some((key, _)), Some(late_wm)) = (&closing, watermarks.late_ns) {
            let mut kept = Vec::with_capacity(delta.len());
            for b in &delta {
                let late = key.closed(b, late_wm)?;
                if late.true_count() > 0 {
                    outcome.late_rows += self.count_rows(&filter_record_batch(b, &late)?)?;
                    kept.push(filter_record_batch(b, &not(&late)?)?);
                } else {
                    kept.push(b.clone());
                }
            }
            delta = kept;
        }
        if self.dedup {
            return self.run_dedup(ctx, delta, closing, outcome).await;
        }
        let mut state = self.state.clone();
        if let Some(col) = self.session_key {
            // The sessions a batch's rows bridge become one before their aggregates merge.
            let merged =
                session::merge_sessions(self.state_slot.schema(), &state, &delta, col, self.keys)?;
            outcome.removed_rows += merged.merged_away.num_rows() as u64;
            outcome.deletes.push(merged.merged_away);
            (state, delta) = (merged.state, merged.delta);
        }
        self.delta_slot.set(&delta)?;
        self.state_slot.set(&state)?;
        let merged = execute(&self.merge, ctx).await?;
        let mut emit = vec![];
        let mut keep = vec![];
        for b in &merged {
            let (rows, changed) = split_changed(b)?;
            outcome.updated_rows += changed.true_count() as u64;
            let closed = match &closing {
                Some((key, wm)) => Some(key.closed(&rows, *wm)?),
                None => None,
            };
            let upserted = match &closed {
                Some(closed) => and(&changed, &not(closed)?)?,
                None => changed.clone(),
            };
            outcome.upserts.push(filter_record_batch(&rows, &upserted)?);
            match mode {
                OutputMode::Complete => emit.push(rows.clone()),
                OutputMode::Update => emit.push(filter_record_batch(&rows, &changed)?),
                OutputMode::Append => {
                    if let Some(closed) = &closed {
                        emit.push(filter_record_batch(&rows, closed)?);
                    }
                }
            }
            match &closed {
                Some(closed) if closed.true_count() > 0 => {
                    outcome.removed_rows += closed.true_count() as u64;
                    outcome.deletes.push(filter_record_batch(&rows, closed)?);
                    keep.push(filter_record_batch(&rows, &not(closed)?)?);
                }
                _ => keep.push(rows),
            }
        }
        self.state = keep.into_iter().filter(|b| b.num_rows() > 0).collect();
        Ok((outcome, emit))
    }

    /// One batch of SELECT DISTINCT over a batch's distinct keys (`delta`, late
    /// rows already dropped). Each delta key counts as one: a merged count of one
    /// is a key no earlier batch had. Keys the watermark passed are forgotten.
    async fn run_dedup(
        &mut self,
        ctx: &Arc<TaskContext>,
        delta: Vec<RecordBatch>,
        closing: Option<(EventTimeKey, i64)>,
        mut outcome: StatefulOutcome,
    ) -> Result<(StatefulOutcome, Vec<RecordBatch>)> {
        let mut input_rows = 0;
        let mut once = Vec::with_capacity(delta.len());
        for b in &delta {
            input_rows += self.count_rows(b)?;
            let mut columns = b.columns().to_vec();
            columns[self.rows_column] = Arc::new(Int64Array::from_value(1, b.num_rows()));
            once.push(RecordBatch::try_new(b.schema(), columns)?);
        }
        self.delta_slot.set(&once)?;
        self.state_slot.set(&self.state)?;
        let merged = execute(&self.merge, ctx).await?;
        let (mut emit, mut keep) = (vec![], vec![]);
        let mut first_seen = 0;
        for b in &merged {
            let (rows, changed) = split_changed(b)?;
            let counts = cast(rows.column(self.rows_column), &DataType::Int64)?;
            let one = Int64Array::new_scalar(1);
            let new = and(&changed, &nulls_false(&lt_eq(&counts, &one)?))?;
            first_seen += new.true_count() as u64;
            // A key's count stays 1 in state: only new keys are written to the
            // checkpoint, so counting sightings in memory would make the state
            // after a restart differ from that of a run never interrupted.
            let mut columns = rows.columns().to_vec();
            let ones = Int64Array::from_value(1, rows.num_rows());
            columns[self.rows_column] =
                cast(&ones, rows.schema().field(self.rows_column).data_type())?;
            let rows = RecordBatch::try_new(rows.schema(), columns)?;
            let fresh = filter_record_batch(&rows, &new)?;
            let rows = rows.project(&self.state_columns)?;
            emit.push(fresh);
            match &closing {
                Some((key, wm)) => {
                    let closed = key.closed(&rows, *wm)?;
                    // A key between the two watermarks is emitted and forgotten at
                    // once: it is deleted, never upserted.
                    let kept = and(&new, &not(&closed)?)?;
                    outcome.upserts.push(filter_record_batch(&rows, &kept)?);
                    outcome.removed_rows += closed.true_count() as u64;
                    outcome.deletes.push(filter_record_batch(&rows, &closed)?);
                    keep.push(filter_record_batch(&rows, &not(&closed)?)?);
                }
                None => {
                    outcome.upserts.push(filter_record_batch(&rows, &new)?);
                    keep.push(rows);
                }
            }
        }
        outcome.updated_rows = first_seen;
        outcome.dropped_duplicates = input_rows.saturating_sub(first_seen);
        self.state = keep.into_iter().filter(|b| b.num_rows() > 0).collect();
        Ok((outcome, emit))
    }

    /// One batch of pane state. A batch touches only its own panes: it merges its
    /// rows into those panes' state rows and leaves the others as they are. A
    /// window is summed from its panes when the watermark closes it, and a pane is
    /// dropped once its last window is out.
    async fn run_panes(
        &mut self,
        ctx: &Arc<TaskContext>,
        ticks: &WindowTicks,
        key: &EventTimeKey,
        watermarks: Watermarks,
    ) -> Result<(StatefulOutcome, Vec<RecordBatch>)> {
        let mut outcome = StatefulOutcome::default();
        let col = key.column;
        let watermark = watermarks.evict_ns.map(|w| w.div_euclid(key.unit_nanos));
        let late_watermark = watermarks.late_ns.map(|w| w.div_euclid(key.unit_nanos));
        let mut delta = execute(&self.partial, ctx).await?;
        if let Some(wm) = late_watermark {
            // A (row, window) pair is late when its window has closed, as Spark counts
            // them; a row is dropped when all its windows have.
            let mut kept = Vec::with_capacity(delta.len());
            for b in &delta {
                let starts = pane_starts(b, col)?;
                let counts = cast(b.column(self.rows_column), &DataType::Int64)?;
                let counts = counts.as_primitive::<Int64Type>();
                let mut keep = Vec::with_capacity(b.num_rows());
                for (i, pane) in starts.iter().enumerate() {
                    let Some(pane) = pane else {
                        keep.push(true);
                        continue;
                    };
                    let covering = ticks.covering(pane);
                    let closed = ticks.count_starts(covering, wm.saturating_sub(ticks.size()));
                    let all = ticks.count_starts(covering, i64::MAX);
                    outcome.late_rows += (counts.value(i).max(0) * closed) as u64;
                    keep.push(closed < all);
                }
                kept.push(filter_record_batch(b, &BooleanArray::from(keep))?);
            }
            delta = kept;
        }
        let mut touched = HashSet::new();
        let mut null_touched = false;
        for b in &delta {
            let starts = pane_starts(b, col)?;
            null_touched |= starts.null_count() > 0;
            touched.extend(starts.iter().flatten());
        }
        let mut state = vec![];
        let mut merge_in = vec![];
        for b in &self.state {
            let starts = pane_starts(b, col)?;
            let hit: BooleanArray = starts
                .iter()
                .map(|p| Some(p.map_or(null_touched, |p| touched.contains(&p))))
                .collect();
            merge_in.push(filter_record_batch(b, &hit)?);
            state.push(filter_record_batch(b, &not(&hit)?)?);
        }
        self.delta_slot.set(&delta)?;
        self.state_slot.set(&merge_in)?;
        let mut merged = vec![];
        for b in execute(&self.merge, ctx).await? {
            let (rows, changed) = split_changed(&b)?;
            outcome.updated_rows += changed.true_count() as u64;
            merged.push(rows);
        }
        if self.invertible {
            self.add_to_running(ctx, ticks, &delta, col).await?;
        }
        // Appended in pane order, so that a state whose batches bring the newest
        // panes stays sorted for `close_windows`.
        let merged = concat_batches(self.state_slot.schema(), &merged)?;
        state.push(by_pane(merged, col)?);
        let merged_at = state.len() - 1;
        // The windows this batch closes are summed from the panes with its rows:
        // those between the two watermarks took them.
        let mut emit = vec![];
        if let Some(wm) = watermark {
            // The windows the late-events watermark closed are out: their pairs
            // were late, and what state they held was emitted before it moved.
            if let Some(late) = watermarks.late_ns {
                self.emitted_through_ns =
                    Some(self.emitted_through_ns.map_or(late, |e| e.max(late)));
            }
            self.state = state.clone();
            emit = self.close_windows(ctx, ticks, key, wm).await?;
            let mut open = Vec::with_capacity(state.len());
            for b in &state {
                let starts = pane_starts(b, col)?;
                let alive: BooleanArray = starts
                    .iter()
                    .map(|p| {
                        Some(
                            p.is_none_or(|p| ticks.covering(p).1.saturating_add(ticks.size()) > wm),
                        )
                    })
                    .collect();
                outcome.removed_rows += (b.num_rows() - alive.true_count()) as u64;
                outcome.deletes.push(filter_record_batch(b, &not(&alive)?)?);
                open.push(filter_record_batch(b, &alive)?);
            }
            state = open;
            self.emitted_through_ns = watermarks.evict_ns;
        }
        // The merged panes are the last piece, and what is left of them is upserted.
        outcome.upserts.push(state[merged_at].clone());
        // One batch: the pieces each batch leaves would otherwise pile up, and
        // every filter above pays per piece.
        let schema = self.state_slot.schema().clone();
        let state = concat_batches(&schema, &state)?;
        self.state = if state.num_rows() > 0 {
            vec![state]
        } else {
            vec![]
        };
        Ok((outcome, emit))
    }

    /// The windows the watermark `wm` closes that no earlier batch emitted, each
    /// summed from its panes in the state before this batch.
    async fn close_windows(
        &mut self,
        ctx: &Arc<TaskContext>,
        ticks: &WindowTicks,
        key: &EventTimeKey,
        wm: i64,
    ) -> Result<Vec<RecordBatch>> {
        let col = key.column;
        let Some(mut start) = self.first_open_window(ticks, key)? else {
            self.running = None;
            return Ok(vec![]);
        };
        let size = ticks.size();
        if start.saturating_add(size) > wm {
            return Ok(vec![]);
        }
        let panes = SortedPanes::new(self.state_slot.schema(), &self.state, col)?;
        // A backlog that closes many windows at once sums them in large slices
        // rather than one small merge per window, unless its windows are long
        // enough (many panes of many keys) for summing them to cost more.
        let closing = wm.saturating_sub(size).saturating_sub(start) / ticks.slide() + 1;
        let span_rows = panes.span(start, wm).num_rows() as i64;
        let pane_rows = span_rows.saturating_mul((size / ticks.slide()).min(closing));
        // Each step of a running sum merges the sum, the pane that leaves and the one that enters.
        let running_rows = closing
            .saturating_mul(RUNNING_WINDOW_ROWS)
            .saturating_add(span_rows.saturating_mul(3));
        let running_is_cheaper = running_rows <= pane_rows;
        if self.invertible && (closing <= RUNNING_WINDOWS_AT_ONCE || running_is_cheaper) {
            return self.close_running(ctx, ticks, &panes, start, wm).await;
        }
        self.running = None;
        let mut out = vec![];
        let mut windows = vec![];
        let mut rows_in = 0;
        while start.saturating_add(size) <= wm {
            let rows = panes.span(start, start.saturating_add(size));
            if rows.num_rows() > 0 {
                rows_in += rows.num_rows();
                windows.push(in_window(&rows, panes.col, ticks, start)?);
                start += ticks.slide();
            } else {
                let Some(next) = panes.next_window_after_gap(ticks, start) else {
                    break;
                };
                start = next;
            }
            // Many windows closing at once (a long backlog) are summed a slice at a time.
            if rows_in >= SUM_ROWS_AT_ONCE {
                out.extend(self.sum_windows(ctx, &std::mem::take(&mut windows)).await?);
                rows_in = 0;
            }
        }
        if rows_in > 0 {
            out.extend(self.sum_windows(ctx, &windows).await?);
        }
        Ok(out)
    }

    /// Closes windows from `start` on with a running sum: the next window is this
    /// one less the pane that leaves it plus the pane that enters, a few hundred
    /// rows instead of all the window's panes. The sum of the window after the
    /// last closed one is kept for the next batch, which adds its own rows to it.
    async fn close_running(
        &mut self,
        ctx: &Arc<TaskContext>,
        ticks: &WindowTicks,
        panes: &SortedPanes,
        mut start: i64,
        wm: i64,
    ) -> Result<Vec<RecordBatch>> {
        let (size, slide) = (ticks.size(), ticks.slide());
        let mut out = vec![];
        while start.saturating_add(size) <= wm {
            let rows = panes.span(start, start.saturating_add(size));
            if rows.num_rows() == 0 {
                self.running = None;
                let Some(next) = panes.next_window_after_gap(ticks, start) else {
                    break;
                };
                start = next;
                continue;
            }
            let summed = match self.running.take() {
                Some(running) if running.start == start => running.rows,
                _ => {
                    let window = in_window(&rows, panes.col, ticks, start)?;
                    self.sum_windows(ctx, &[window]).await?
                }
            };
            let next = start + slide;
            let leaving = self.negated(&panes.span(start, next))?;
            let entering = panes.span(start.saturating_add(size), next.saturating_add(size));
            let mut parts = vec![];
            for rows in summed.iter().chain([&leaving, &entering]) {
                parts.push(in_window(rows, panes.col, ticks, next)?);
            }
            let rows = self.live(self.sum_windows(ctx, &parts).await?)?;
            self.running = Some(RunningWindow { start: next, rows });
            out.extend(summed);
            start = next;
        }
        Ok(out)
    }

    /// Adds a batch's pane rows to the running sum of the next window to close.
    async fn add_to_running(
        &mut self,
        ctx: &Arc<TaskContext>,
        ticks: &WindowTicks,
        delta: &[RecordBatch],
        col: usize,
    ) -> Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let end = running.start.saturating_add(ticks.size());
        let mut parts = running.rows;
        let carried = parts.len();
        for b in delta {
            let inside: BooleanArray = pane_starts(b, col)?
                .iter()
                .map(|p| Some(p.is_some_and(|p| p >= running.start && p < end)))
                .collect();
            let rows = filter_record_batch(b, &inside)?;
            if rows.num_rows() > 0 {
                parts.push(in_window(&rows, col, ticks, running.start)?);
            }
        }
        let rows = if parts.len() > carried {
            self.sum_windows(ctx, &parts).await?
        } else {
            parts
        };
        self.running = Some(RunningWindow {
            start: running.start,
            rows,
        });
        Ok(())
    }

    /// `rows` with every summed column negated, so that merging them subtracts
    /// (wrapping, as DataFusion's sums do).
    fn negated(&self, rows: &RecordBatch) -> Result<RecordBatch> {
        let mut columns = rows.columns().to_vec();
        for c in columns.iter_mut().skip(self.keys) {
            *c = neg_wrapping(c.as_ref())?;
        }
        Ok(RecordBatch::try_new(rows.schema(), columns)?)
    }

    /// The rows of groups with input left: a group whose rows all left the window
    /// sums to zero rows.
    fn live(&self, rows: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        let mut out = vec![];
        for b in rows {
            let counts = cast(b.column(self.rows_column), &DataType::Int64)?;
            let zero = Int64Array::new_scalar(0);
            let alive = nulls_false(&gt(&counts, &zero)?);
            out.push(filter_record_batch(&b, &alive)?);
        }
        Ok(out)
    }

    /// Sums pane rows relabelled with their window into one row per window and key.
    async fn sum_windows(
        &self,
        ctx: &Arc<TaskContext>,
        windows: &[RecordBatch],
    ) -> Result<Vec<RecordBatch>> {
        self.state_slot.set(windows)?;
        self.delta_slot.set(&[])?;
        execute(&self.merge, ctx)
            .await?
            .iter()
            .map(|b| split_changed(b).map(|(rows, _)| rows))
            .collect()
    }

    /// The query's result over the whole state, as complete mode emits it.
    pub async fn emit_all(&self, ctx: &Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
        self.emit_slot.set(&self.state)?;
        execute(&self.finalize, ctx).await
    }

    fn count_rows(&self, batch: &RecordBatch) -> Result<u64> {
        let counts = cast(batch.column(self.rows_column), &DataType::Int64)?;
        Ok(sum(counts.as_primitive::<Int64Type>()).unwrap_or(0).max(0) as u64)
    }
}

/// Pane state sorted by pane, so that the panes of a span of time are one slice.
struct SortedPanes {
    rows: RecordBatch,
    /// The pane column.
    col: usize,
    /// The pane starts of the rows with one, ascending (rows without one sort first).
    starts: Vec<i64>,
    known_from: usize,
}

impl SortedPanes {
    fn new(schema: &SchemaRef, state: &[RecordBatch], col: usize) -> Result<Self> {
        let rows = by_pane(concat_batches(schema, state)?, col)?;
        let starts = pane_starts(&rows, col)?;
        let known_from = starts.null_count();
        Ok(Self {
            starts: starts.values()[known_from..].to_vec(),
            rows,
            col,
            known_from,
        })
    }

    /// The rows of the panes that start in `[from, to)`.
    fn span(&self, from: i64, to: i64) -> RecordBatch {
        let first = self.starts.partition_point(|&p| p < from);
        let last = self.starts.partition_point(|&p| p < to);
        self.rows
            .slice(self.known_from + first, last.saturating_sub(first))
    }

    /// The window after the empty one at `start` that can hold panes: the next
    /// one, or the first window of the next pane. `None` when no pane follows.
    fn next_window_after_gap(&self, ticks: &WindowTicks, start: i64) -> Option<i64> {
        let i = self
            .starts
            .partition_point(|&p| p < start.saturating_add(ticks.size()));
        let next = *self.starts.get(i)?;
        Some((start + ticks.slide()).max(ticks.covering(next).0))
    }
}

/// The sum of the next window to close, kept between batches (invertible
/// aggregates only), labelled with that window.
#[derive(Debug)]
pub struct RunningWindow {
    start: i64,
    rows: Vec<RecordBatch>,
}

/// `rows` with their pane column `col` replaced by the window starting at `start`.
fn in_window(
    rows: &RecordBatch,
    col: usize,
    ticks: &WindowTicks,
    start: i64,
) -> Result<RecordBatch> {
    let mut columns = rows.columns().to_vec();
    columns[col] = ticks.window_column(start, rows.num_rows())?;
    Ok(RecordBatch::try_new(rows.schema(), columns)?)
}

/// Windows closed one after another by a running sum in one batch, whatever they hold.
const RUNNING_WINDOWS_AT_ONCE: i64 = 64;

/// Pane rows that cost about as much to sum as the fixed part of one step of a
/// running sum (a merge of its own): 0.55 ms a window against 20 ns a pane row.
const RUNNING_WINDOW_ROWS: i64 = 25_000;

/// Pane rows summed into windows in one go, bounding memory when a backlog
/// closes many windows at once.
const SUM_ROWS_AT_ONCE: usize = 1 << 20;

/// `rows` ordered by pane, nulls first. In steady state a batch only adds the
/// newest panes, so the state is already in order and is not sorted again.
fn by_pane(rows: RecordBatch, col: usize) -> Result<RecordBatch> {
    let starts = pane_starts(&rows, col)?;
    let nulls = starts.null_count();
    let sorted = (0..nulls).all(|i| starts.is_null(i))
        && starts.values()[nulls..].windows(2).all(|w| w[0] <= w[1]);
    if sorted {
        return Ok(rows);
    }
    Ok(take_record_batch(
        &rows,
        &sort_to_indices(&starts, None, None)?,
    )?)
}

/// The start of each row's pane, in the time column's ticks.
fn pane_starts(batch: &RecordBatch, col: usize) -> Result<Int64Array> {
    let starts = cast(batch.column(col).as_struct().column(0), &DataType::Int64)?;
    Ok(starts.as_primitive::<Int64Type>().clone())
}

/// A merge output batch as state rows, and the mask of rows the batch changed
/// (its last column).
fn split_changed(merged: &RecordBatch) -> Result<(RecordBatch, BooleanArray)> {
    let last = merged.num_columns() - 1;
    let changed = nulls_false(merged.column(last).as_boolean());
    Ok((merged.project(&(0..last).collect::<Vec<_>>())?, changed))
}

/// A filter mask where null counts as false.
fn nulls_false(mask: &BooleanArray) -> BooleanArray {
    if mask.null_count() == 0 {
        mask.clone()
    } else {
        prep_null_mask_filter(mask)
    }
}
