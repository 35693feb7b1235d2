//! A join of two streams bounded in event time, as Spark's stream–stream join
//! (`StreamingSymmetricHashJoinExec`).
//!
//! Each side keeps the rows it has read in state. A batch emits its new left
//! rows joined with the right side's state and new rows, and the left side's
//! state joined with the new right rows: the user's plan runs twice over the
//! two slots, so each pair is emitted once, in the batch that brings its later
//! row. The time bound in the ON clause (`f.time BETWEEN o.time AND o.time +
//! INTERVAL '1' MINUTE`) tells when a row can no longer be matched by a row
//! not yet read (rows behind the watermark are dropped): it then leaves the
//! state, so the state stays flat however long the streams run.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, UInt64Array,
};
use datafusion::arrow::compute::kernels::cmp::gt_eq;
use datafusion::arrow::compute::{cast, filter_record_batch, not, prep_null_mask_filter};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt64Type};
use datafusion::catalog::TableProvider;
use datafusion::common::Column;
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::provider_as_source;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Between, BinaryExpr, Expr, Join, JoinType, LogicalPlan, LogicalPlanBuilder, Operator,
};
use datafusion::physical_plan::ExecutionPlan;

use super::stateful::{Watermarks, execute};
use crate::catalog::SourceDef;
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::sql::incremental::reads_stream;
use crate::sql::slot::Slot;
use crate::sql::window::unit_nanos;

/// The column of a side's state rows that tells rows apart (two equal rows are two rows).
const ID_COLUMN: &str = "__id";
/// The column of a side's state rows that tells whether a row of the other side matched it:
/// an outer join emits the preserved side's rows that none matched, padded with nulls.
const MATCHED_COLUMN: &str = "__matched";
/// The state columns before the slot's.
const STATE_PREFIX: usize = 2;

/// A join of two streams, and the conditions of a WHERE right above it (an
/// inner join's time bound may be written there, or a comma join's).
#[derive(Debug, Clone)]
pub struct StreamJoin {
    pub join: Join,
    above: Option<Expr>,
}

/// The one join of `plan` whose two sides read streams, if there is one.
pub fn find_stream_join(
    plan: &LogicalPlan,
    is_stream: &dyn Fn(&str) -> bool,
) -> Result<Option<StreamJoin>> {
    let both =
        |join: &Join| reads_stream(&join.left, is_stream) && reads_stream(&join.right, is_stream);
    let mut found = vec![];
    let mut above = None;
    plan.apply(|node| {
        match node {
            LogicalPlan::Join(join) if both(join) => found.push(join.clone()),
            LogicalPlan::Filter(filter) => {
                if let LogicalPlan::Join(join) = filter.input.as_ref()
                    && both(join)
                {
                    above = Some(filter.predicate.clone());
                }
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if found.len() > 1 {
        return Err(BrookError::sql(
            "a streaming query may join two streams once; join a third stream in a query \
             of its own, reading the first join's sink",
        ));
    }
    Ok(found.pop().map(|join| StreamJoin { join, above }))
}

/// A query's streaming source and the slot its rows are fed into.
pub type JoinInput<'a> = (&'a SourceDef, &'a Slot);

/// The inputs `plan` scans, by their index in `inputs`.
fn scanned(plan: &LogicalPlan, inputs: &[JoinInput]) -> Vec<usize> {
    let mut found = vec![];
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(i) = inputs
                .iter()
                .position(|(source, _)| source.name == scan.table_name.table())
        {
            found.push(i);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// One side of the join: its input and its event-time column.
#[derive(Debug, Clone)]
struct Side {
    /// Its index among the query's inputs.
    input: usize,
    slot: Slot,
    /// The watermark column among the source's (and the slot's) columns.
    time_column: usize,
    unit_nanos: i64,
}

/// What the join needs to know of its query: the sides and the time bound.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    join_type: JoinType,
    sides: [Side; 2],
    /// The bound on right time minus left time, in nanoseconds: `lower <= r - l <= upper`.
    lower_ns: i64,
    upper_ns: i64,
}

impl JoinSpec {
    /// The side an outer join preserves (0 left, 1 right), if it is one.
    pub fn preserved(&self) -> Option<usize> {
        match self.join_type {
            JoinType::Left => Some(0),
            JoinType::Right => Some(1),
            _ => None,
        }
    }

    /// The input (among the query's) of `side`.
    pub fn input(&self, side: usize) -> usize {
        self.sides[side].input
    }

    /// Checks a join of two streams against what can run, as Spark's rules
    /// for stream–stream joins, and finds its time bound.
    pub fn new(found: &StreamJoin, inputs: &[JoinInput], mode: OutputMode) -> Result<Self> {
        let join = &found.join;
        if mode != OutputMode::Append {
            return Err(BrookError::sql(format!(
                "a join of two streams runs in output mode 'append' (as in Spark): each \
                 pair is emitted once, when its later row arrives; output mode '{mode}' \
                 is not supported for it"
            )));
        }
        match join.join_type {
            JoinType::Inner => {}
            JoinType::Full => {
                return Err(BrookError::sql(
                    "a FULL OUTER join of two streams is not supported; write an inner join \
                     with an event-time bound in its ON clause",
                ));
            }
            JoinType::Left | JoinType::Right => {}
            _ => {
                return Err(BrookError::sql(
                    "a semi or anti join of two streams is not supported; write an inner join \
                     with an event-time bound in its ON clause",
                ));
            }
        }
        let side = |plan: &LogicalPlan, which: &str| -> Result<Side> {
            let read = scanned(plan, inputs);
            let [input] = read[..] else {
                return Err(BrookError::sql(format!(
                    "the {which} side of a join of two streams reads {} streams; each side \
                     must read one stream",
                    read.len()
                )));
            };
            let (source, slot) = inputs[input];
            let Some(wm) = &source.watermark else {
                return Err(BrookError::sql(format!(
                    "a join of two streams needs a watermark on both: '{}' has none; \
                     declare WATERMARK FOR <column> AS <column> - INTERVAL '...' on it, so \
                     that its rows can leave the join's state",
                    source.name
                )));
            };
            let schema = source.read_schema();
            let time_column = schema.index_of(&wm.column)?;
            Ok(Side {
                input,
                slot: slot.clone(),
                time_column,
                unit_nanos: unit_nanos(schema.field(time_column).data_type())?,
            })
        };
        if inputs.len() > 2 {
            return Err(BrookError::sql(format!(
                "a query that joins two streams reads those two only; this one reads {}: \
                 join or union the others in queries of their own",
                inputs
                    .iter()
                    .map(|(s, _)| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let left = side(&join.left, "left")?;
        let right = side(&join.right, "right")?;
        if left.input == right.input {
            return Err(BrookError::sql(format!(
                "a join of the stream '{}' with itself is not supported; declare the \
                 directory as a second source table and join the two",
                inputs[left.input].0.name
            )));
        }
        let time_name = |side: &Side| {
            inputs[side.input].0.read_schema().fields()[side.time_column]
                .name()
                .clone()
        };
        let (left_time, right_time) = (time_name(&left), time_name(&right));
        // A WHERE over an outer join filters its padded rows too: it bounds nothing.
        let above = found
            .above
            .iter()
            .filter(|_| join.join_type == JoinType::Inner);
        let conditions: Vec<&Expr> = join
            .filter
            .iter()
            .chain(above)
            .flat_map(split_conjunction)
            .collect();
        let bound = time_bound(join, &conditions, &left_time, &right_time);
        let (Some(lower_ns), Some(upper_ns)) = bound else {
            return Err(BrookError::sql(format!(
                "a join of two streams needs a time bound between the watermark columns \
                 of both sides ({}.{left_time} and {}.{right_time}), with a lower and an \
                 upper limit, in its ON clause (an inner join's may be in the WHERE \
                 clause), e.g. ON r.key = l.key AND r.time BETWEEN l.time AND l.time + \
                 INTERVAL '1' MINUTE: without it no row could ever leave the join's state",
                inputs[left.input].0.name, inputs[right.input].0.name
            )));
        };
        Ok(Self {
            join_type: join.join_type,
            sides: [left, right],
            lower_ns,
            upper_ns,
        })
    }
}

/// The tightest bounds `(lower, upper)` that `conditions` (all of which hold)
/// put on right time minus left time, in nanoseconds.
fn time_bound(
    join: &Join,
    conditions: &[&Expr],
    left_time: &str,
    right_time: &str,
) -> (Option<i64>, Option<i64>) {
    let mut lower: Option<i64> = None;
    let mut upper: Option<i64> = None;
    let mut add = |a: &Expr, op: Operator, b: &Expr| {
        // a op b, with a = ta + ca and b = tb + cb.
        let (Some((sa, ca)), Some((sb, cb))) = (
            time_term(join, a, left_time, right_time),
            time_term(join, b, left_time, right_time),
        ) else {
            return;
        };
        let (at_least, limit) = match (sa, sb, op) {
            // right - left op cb - ca
            (Which::Right, Which::Left, Operator::Gt | Operator::GtEq) => (true, cb - ca),
            (Which::Right, Which::Left, Operator::Lt | Operator::LtEq) => (false, cb - ca),
            // left - right op cb - ca, so right - left (flipped op) ca - cb
            (Which::Left, Which::Right, Operator::Gt | Operator::GtEq) => (false, ca - cb),
            (Which::Left, Which::Right, Operator::Lt | Operator::LtEq) => (true, ca - cb),
            _ => return,
        };
        if at_least {
            lower = Some(lower.map_or(limit, |l| l.max(limit)));
        } else {
            upper = Some(upper.map_or(limit, |u| u.min(limit)));
        }
    };
    let mut same_bin = vec![];
    for conjunct in conditions {
        match conjunct {
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) => {
                add(expr, Operator::GtEq, low);
                add(expr, Operator::LtEq, high);
            }
            Expr::BinaryExpr(BinaryExpr {
                left: a,
                op: Operator::Eq,
                right: b,
            }) if binned(join, a, left_time, right_time).is_some() => {
                // Both times in one bin: each at most a bin's width (less a
                // nanosecond) after the other.
                let bins = (
                    binned(join, a, left_time, right_time),
                    binned(join, b, left_time, right_time),
                );
                let ((Some((Which::Left, l)), Some((Which::Right, r)))
                | (Some((Which::Right, r)), Some((Which::Left, l)))) = bins
                else {
                    continue;
                };
                same_bin.push((1 - l, r - 1));
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => add(left, *op, right),
            _ => {}
        }
    }
    for (at_least, at_most) in same_bin {
        lower = Some(lower.map_or(at_least, |x| x.max(at_least)));
        upper = Some(upper.map_or(at_most, |x| x.min(at_most)));
    }
    (lower, upper)
}

/// `e` as the bin of a side's watermark column (`date_bin(INTERVAL '1
/// minute', t [, origin])`, `date_trunc('minute', t)`), with the bin's width
/// in nanoseconds, if it is one of a fixed width.
fn binned(join: &Join, e: &Expr, left_time: &str, right_time: &str) -> Option<(Which, i64)> {
    const SECOND: i64 = 1_000_000_000;
    let Expr::ScalarFunction(f) = e else {
        return None;
    };
    let (width, time) = match (f.func.name(), &f.args[..]) {
        ("date_bin", [width, time, ..]) => (interval_ns(width)?, time),
        ("date_trunc", [Expr::Literal(unit, _), time]) => {
            let width = match unit.try_as_str()??.to_lowercase().as_str() {
                "second" => SECOND,
                "minute" => 60 * SECOND,
                "hour" => 3600 * SECOND,
                "day" => 86_400 * SECOND,
                "week" => 7 * 86_400 * SECOND,
                _ => return None,
            };
            (width, time)
        }
        _ => return None,
    };
    match time_term(join, time, left_time, right_time)? {
        (which, 0) if width > 0 => Some((which, width)),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Which {
    Left,
    Right,
}

/// `e` as a side's watermark column plus a constant (nanoseconds), if it is one.
fn time_term(join: &Join, e: &Expr, left_time: &str, right_time: &str) -> Option<(Which, i64)> {
    match e {
        Expr::Column(c) => {
            if c.name == left_time && join.left.schema().has_column(c) {
                Some((Which::Left, 0))
            } else if c.name == right_time && join.right.schema().has_column(c) {
                Some((Which::Right, 0))
            } else {
                None
            }
        }
        Expr::Cast(c) => time_term(join, &c.expr, left_time, right_time),
        Expr::TryCast(c) => time_term(join, &c.expr, left_time, right_time),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Plus => match (interval_ns(right), interval_ns(left)) {
                (Some(n), _) => time_term(join, left, left_time, right_time)
                    .and_then(|(w, c)| Some((w, c.checked_add(n)?))),
                (None, Some(n)) => time_term(join, right, left_time, right_time)
                    .and_then(|(w, c)| Some((w, c.checked_add(n)?))),
                _ => None,
            },
            Operator::Minus => {
                let n = interval_ns(right)?;
                time_term(join, left, left_time, right_time)
                    .and_then(|(w, c)| Some((w, c.checked_sub(n)?)))
            }
            _ => None,
        },
        _ => None,
    }
}

/// A fixed interval literal in nanoseconds (months have no fixed length).
fn interval_ns(e: &Expr) -> Option<i64> {
    const DAY: i64 = 86_400_000_000_000;
    match e {
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _) if v.months == 0 => {
            i64::from(v.days)
                .checked_mul(DAY)?
                .checked_add(v.nanoseconds)
        }
        Expr::Literal(ScalarValue::IntervalDayTime(Some(v)), _) => i64::from(v.days)
            .checked_mul(DAY)?
            .checked_add(i64::from(v.milliseconds).checked_mul(1_000_000)?),
        Expr::Literal(ScalarValue::DurationNanosecond(Some(n)), _) => Some(*n),
        Expr::Cast(c) => interval_ns(&c.expr),
        _ => None,
    }
}

/// One side's rows in state, each with an id.
#[derive(Debug)]
struct SideState {
    schema: SchemaRef,
    rows: Vec<RecordBatch>,
    next_id: u64,
}

impl SideState {
    fn new(slot: &Slot) -> Self {
        let mut fields = vec![
            Arc::new(Field::new(ID_COLUMN, DataType::UInt64, false)),
            Arc::new(Field::new(MATCHED_COLUMN, DataType::Boolean, false)),
        ];
        fields.extend(slot.schema().fields().iter().cloned());
        Self {
            schema: Arc::new(Schema::new(fields)),
            rows: vec![],
            next_id: 0,
        }
    }

    /// The rows as the side's slot has them.
    fn slot_rows(&self) -> Result<Vec<RecordBatch>> {
        slot_rows(&self.rows)
    }

    /// Takes `rows` (in the slot's columns) into state; the state rows they became.
    fn add(&mut self, rows: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        let mut added = vec![];
        for batch in rows.iter().filter(|b| b.num_rows() > 0) {
            let n = batch.num_rows() as u64;
            let ids: ArrayRef = Arc::new(UInt64Array::from_iter_values(
                self.next_id..self.next_id + n,
            ));
            self.next_id += n;
            let matched: ArrayRef = Arc::new(BooleanArray::from(vec![false; batch.num_rows()]));
            let mut columns = vec![ids, matched];
            columns.extend(batch.columns().iter().cloned());
            added.push(RecordBatch::try_new(self.schema.clone(), columns)?);
        }
        self.rows.extend(added.iter().cloned());
        Ok(added)
    }
}

/// State rows (`rows`) as their side's slot has them.
fn slot_rows(rows: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
    Ok(rows
        .iter()
        .map(|b| b.project(&(STATE_PREFIX..b.num_columns()).collect::<Vec<_>>()))
        .collect::<std::result::Result<_, _>>()?)
}

/// The plans of an outer join besides the inner join that emits its matches.
#[derive(Debug)]
pub struct OuterPlans {
    /// The side whose unmatched rows are emitted: 0 left, 1 right.
    preserved: usize,
    /// The user's plan, the outer join: run over expired unmatched rows and
    /// nothing on the other side, it pads them with nulls.
    padded: Arc<dyn ExecutionPlan>,
    /// The ids of the preserved side's rows (fed into `marked`) that a row of
    /// the other side matches.
    semi: Arc<dyn ExecutionPlan>,
    /// The preserved side's rows with their ids last.
    marked: Slot,
}

/// The join's operator: its plan, its sides and their state.
#[derive(Debug)]
pub struct JoinOp {
    /// The inner join: the matched pairs.
    pub plan: Arc<dyn ExecutionPlan>,
    outer: Option<OuterPlans>,
    spec: JoinSpec,
    state: [SideState; 2],
}

/// What a batch of the join did.
#[derive(Debug, Default)]
pub struct JoinOutcome {
    pub output: Vec<RecordBatch>,
    pub late_rows: u64,
    /// Per side, the state rows added and removed.
    pub upserts: [Vec<RecordBatch>; 2],
    pub deletes: [Vec<RecordBatch>; 2],
    pub updated_rows: u64,
    pub removed_rows: u64,
}

impl OuterPlans {
    pub fn new(
        preserved: usize,
        padded: Arc<dyn ExecutionPlan>,
        semi: Arc<dyn ExecutionPlan>,
        marked: Slot,
    ) -> Self {
        Self {
            preserved,
            padded,
            semi,
            marked,
        }
    }
}

impl JoinOp {
    pub fn new(spec: JoinSpec, plan: Arc<dyn ExecutionPlan>, outer: Option<OuterPlans>) -> Self {
        let state = [
            SideState::new(&spec.sides[0].slot),
            SideState::new(&spec.sides[1].slot),
        ];
        Self {
            plan,
            outer,
            spec,
            state,
        }
    }

    /// The schema of the rows the join emits (an outer join's, with its padded side nullable).
    pub fn output_schema(&self) -> SchemaRef {
        match &self.outer {
            Some(outer) => outer.padded.schema(),
            None => self.plan.schema(),
        }
    }

    /// The inputs of the left and the right side, among the query's.
    pub fn inputs(&self) -> [usize; 2] {
        [self.spec.sides[0].input, self.spec.sides[1].input]
    }

    /// How far behind the watermark the event time of `side` (0 left, 1
    /// right) in a pair still to come can be: that side's rows state keeps
    /// for the other side's rows still to come.
    pub fn lag_ns(&self, side: usize) -> i64 {
        self.keep_from(side, 0).saturating_neg().max(0)
    }

    /// The state schemas of the left and right sides (their rows, with an id first).
    pub fn state_schemas(&self) -> [SchemaRef; 2] {
        [self.state[0].schema.clone(), self.state[1].schema.clone()]
    }

    /// Each side's state rows, as the checkpoint saves them.
    pub fn state(&self, side: usize) -> &[RecordBatch] {
        &self.state[side].rows
    }

    pub fn state_rows(&self) -> usize {
        self.state
            .iter()
            .flat_map(|s| &s.rows)
            .map(RecordBatch::num_rows)
            .sum()
    }

    pub fn state_bytes(&self) -> usize {
        self.state
            .iter()
            .flat_map(|s| &s.rows)
            .map(RecordBatch::get_array_memory_size)
            .sum()
    }

    /// Takes up the state a checkpoint saved, left side first.
    pub fn restore(&mut self, saved: [Vec<RecordBatch>; 2]) -> Result<()> {
        for (state, rows) in self.state.iter_mut().zip(saved) {
            let mut next = 0;
            for batch in &rows {
                // The store loads the state as its schema has it: ids first.
                let ids = batch
                    .column(0)
                    .as_primitive_opt::<UInt64Type>()
                    .ok_or_else(|| BrookError::internal("a join's state rows lost their ids"))?;
                if let Some(max) = datafusion::arrow::compute::max(ids) {
                    next = next.max(max.saturating_add(1));
                }
            }
            state.rows = rows;
            state.next_id = next;
        }
        Ok(())
    }

    /// Whether a batch without input must run once the watermark is at
    /// `watermark_ns`: some row of state can no longer be matched, so it is
    /// dropped (an outer join's, emitted padded first), as an aggregation's
    /// closed groups are, and a stream that went quiet holds no state it
    /// does not need.
    pub fn closes_state(&self, watermark_ns: i64) -> Result<bool> {
        for side in 0..2 {
            let spec = &self.spec.sides[side];
            let from = self.keep_from(side, watermark_ns);
            for batch in &self.state[side].rows {
                let keep = at_or_after(
                    batch,
                    spec.time_column + STATE_PREFIX,
                    spec.unit_nanos,
                    from,
                )?;
                if keep.true_count() < batch.num_rows() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The earliest event time (ns) a row of `side` must have to be matched by
    /// a row not read yet, all of which are at or after `watermark_ns`.
    fn keep_from(&self, side: usize, watermark_ns: i64) -> i64 {
        match side {
            // l can match a later r when r - l <= upper, r >= watermark.
            0 => watermark_ns.saturating_sub(self.spec.upper_ns),
            // r can match a later l when r - l >= lower, l >= watermark.
            _ => watermark_ns.saturating_add(self.spec.lower_ns),
        }
    }

    /// Runs one batch: `new` holds each side's rows read (in its slot's
    /// columns). As Spark's join: rows behind the late-events watermark are
    /// dropped, the rest are joined with the other side's state and new rows
    /// and kept, and only then does the state lose the rows the eviction
    /// watermark says no row still to come can match (an outer join's
    /// unmatched ones emitted padded), so that a row between the two
    /// watermarks meets the state rows it can still match.
    pub async fn run(
        &mut self,
        ctx: &Arc<TaskContext>,
        watermarks: Watermarks,
        new: [Vec<RecordBatch>; 2],
    ) -> Result<JoinOutcome> {
        let mut outcome = JoinOutcome::default();
        let mut fresh: [Vec<RecordBatch>; 2] = [vec![], vec![]];
        for (side, rows) in new.into_iter().enumerate() {
            let spec = &self.spec.sides[side];
            let Some(wm) = watermarks.late_ns else {
                fresh[side] = rows;
                continue;
            };
            // Rows behind the watermark are late, as in an aggregation.
            for batch in rows {
                let on_time = at_or_after(&batch, spec.time_column, spec.unit_nanos, wm)?;
                outcome.late_rows += (batch.num_rows() - on_time.true_count()) as u64;
                fresh[side].push(filter_record_batch(&batch, &on_time)?);
            }
        }
        let has_rows = |rows: &[RecordBatch]| rows.iter().any(|b| b.num_rows() > 0);
        let [left, right] = &self.spec.sides;
        let output_schema = self.output_schema();
        let ran = async {
            if has_rows(&fresh[0]) {
                let mut right_rows = self.state[1].slot_rows()?;
                right_rows.extend(fresh[1].iter().cloned());
                left.slot.set(&fresh[0])?;
                right.slot.set(&right_rows)?;
                outcome.output.extend(execute(&self.plan, ctx).await?);
            }
            if has_rows(&fresh[1]) {
                left.slot.set(&self.state[0].slot_rows()?)?;
                right.slot.set(&fresh[1])?;
                outcome.output.extend(execute(&self.plan, ctx).await?);
            }
            Ok::<_, BrookError>(())
        }
        .await;
        left.slot.set(&[])?;
        right.slot.set(&[])?;
        ran?;
        let first_new = self.state.each_ref().map(|s| s.next_id);
        for (side, rows) in fresh.iter().enumerate() {
            let added = self.state[side].add(rows)?;
            outcome.updated_rows += added.iter().map(|b| b.num_rows() as u64).sum::<u64>();
            outcome.upserts[side] = added;
        }
        if has_rows(&fresh[0]) || has_rows(&fresh[1]) {
            self.mark_matched(ctx, first_new, &mut outcome).await?;
        }
        if let Some(wm) = watermarks.evict_ns {
            self.evict(ctx, wm, &mut outcome).await?;
        }
        if self.outer.is_some() {
            // The inner plan's rows, as the outer join's schema (nullable on the padded side) has them.
            outcome.output = outcome
                .output
                .iter()
                .map(|b| RecordBatch::try_new(output_schema.clone(), b.columns().to_vec()))
                .collect::<std::result::Result<_, _>>()?;
        }
        Ok(outcome)
    }

    /// Drops the state rows that no row at or after the watermark `wm` can
    /// match, an outer join's unmatched ones emitted padded with nulls. A row
    /// the batch brought and drops at once was never saved: it leaves the
    /// batch's upserts.
    async fn evict(
        &mut self,
        ctx: &Arc<TaskContext>,
        wm: i64,
        outcome: &mut JoinOutcome,
    ) -> Result<()> {
        for side in 0..2 {
            let spec = &self.spec.sides[side];
            let from = self.keep_from(side, wm);
            let column = spec.time_column + STATE_PREFIX;
            let mut kept = vec![];
            for batch in std::mem::take(&mut self.state[side].rows) {
                let keep = at_or_after(&batch, column, spec.unit_nanos, from)?;
                let gone = filter_record_batch(&batch, &not(&keep)?)?;
                outcome.removed_rows += gone.num_rows() as u64;
                outcome.deletes[side].push(gone);
                kept.push(filter_record_batch(&batch, &keep)?);
            }
            self.state[side].rows = kept.into_iter().filter(|b| b.num_rows() > 0).collect();
            let mut upserts = vec![];
            for batch in &outcome.upserts[side] {
                let keep = at_or_after(batch, column, spec.unit_nanos, from)?;
                upserts.push(filter_record_batch(batch, &keep)?);
            }
            outcome.upserts[side] = upserts;
        }
        // The preserved side's expired rows that nothing matched are final now.
        let Some(outer) = &self.outer else {
            return Ok(());
        };
        let mut unmatched = vec![];
        for batch in &outcome.deletes[outer.preserved] {
            let matched = batch.column(1).as_boolean();
            let lonely = filter_record_batch(batch, &not(&nulls_false(matched))?)?;
            unmatched.extend(slot_rows(&[lonely])?);
        }
        if unmatched.iter().all(|b| b.num_rows() == 0) {
            return Ok(());
        }
        let preserved = &self.spec.sides[outer.preserved].slot;
        let other = &self.spec.sides[1 - outer.preserved].slot;
        preserved.set(&unmatched)?;
        other.set(&[])?;
        let padded = execute(&outer.padded, ctx).await;
        preserved.set(&[])?;
        outcome.output.extend(padded?);
        Ok(())
    }

    /// Marks the preserved side's state rows that a row of the other side
    /// matches (a row once matched stays so); the rows that changed, or are
    /// new (ids from `first_new`), become the side's upserts.
    async fn mark_matched(
        &mut self,
        ctx: &Arc<TaskContext>,
        first_new: [u64; 2],
        outcome: &mut JoinOutcome,
    ) -> Result<()> {
        let Some(outer) = &self.outer else {
            return Ok(());
        };
        let side = outer.preserved;
        let other = &self.spec.sides[1 - side];
        // The slot's columns, then the id.
        let marked: Vec<RecordBatch> = self.state[side]
            .rows
            .iter()
            .map(|b| {
                let mut columns: Vec<usize> = (STATE_PREFIX..b.num_columns()).collect();
                columns.push(0);
                b.project(&columns)
            })
            .collect::<std::result::Result<_, _>>()?;
        outer.marked.set(&marked)?;
        other.slot.set(&self.state[1 - side].slot_rows()?)?;
        let found = execute(&outer.semi, ctx).await;
        outer.marked.set(&[])?;
        other.slot.set(&[])?;
        let mut ids = std::collections::HashSet::new();
        for batch in found? {
            ids.extend(
                batch
                    .column(0)
                    .as_primitive::<UInt64Type>()
                    .iter()
                    .flatten(),
            );
        }
        let mut upserts = vec![];
        let state = &mut self.state[side];
        for batch in &mut state.rows {
            let id = batch.column(0).as_primitive::<UInt64Type>();
            let was = batch.column(1).as_boolean();
            let now: BooleanArray = (0..batch.num_rows())
                .map(|i| Some(was.value(i) || ids.contains(&id.value(i))))
                .collect();
            let changed: BooleanArray = (0..batch.num_rows())
                .map(|i| Some(now.value(i) != was.value(i) || id.value(i) >= first_new[side]))
                .collect();
            let mut columns = batch.columns().to_vec();
            columns[1] = Arc::new(now);
            *batch = RecordBatch::try_new(state.schema.clone(), columns)?;
            if changed.true_count() > 0 {
                upserts.push(filter_record_batch(batch, &changed)?);
            }
        }
        outcome.upserts[side] = upserts;
        Ok(())
    }
}

/// Which rows of `batch` have an event time (column `column`, in ticks of
/// `unit` ns) at or after `from_ns`; a null time never is.
fn at_or_after(
    batch: &RecordBatch,
    column: usize,
    unit: i64,
    from_ns: i64,
) -> Result<BooleanArray> {
    let ticks = cast(batch.column(column), &DataType::Int64)?;
    // The first tick at or after `from_ns`.
    let first = from_ns.div_euclid(unit) + i64::from(from_ns.rem_euclid(unit) != 0);
    let mask = gt_eq(
        ticks.as_primitive::<Int64Type>(),
        &Int64Array::new_scalar(first),
    )?;
    Ok(nulls_false(&mask))
}

fn nulls_false(mask: &BooleanArray) -> BooleanArray {
    if mask.null_count() == 0 {
        mask.clone()
    } else {
        prep_null_mask_filter(mask)
    }
}

/// A slot for the rows of `slot` with their state id last, which the outer
/// join's semi join reads.
pub fn marked_slot(slot: &Slot) -> Slot {
    let mut fields: Vec<Field> = slot
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(ID_COLUMN, DataType::UInt64, false));
    Slot::new(&Schema::new(fields))
}

/// For an outer join of two streams (`join`, within `plan`) preserving side
/// `preserved`: `plan` with the join made inner, which emits the matched
/// pairs, and a semi join giving the ids of the preserved side's rows (read
/// from `marked` instead of its source, `source`) that a row of the other side matches.
pub fn outer_plans(
    plan: &LogicalPlan,
    join: &Join,
    preserved: usize,
    source: &str,
    marked: Arc<dyn TableProvider>,
) -> Result<(LogicalPlan, LogicalPlan)> {
    let inner = plan
        .clone()
        .transform_up(|node| match node {
            LogicalPlan::Join(j) if j == *join => {
                let inner = Join::try_new(
                    j.left,
                    j.right,
                    j.on,
                    j.filter,
                    JoinType::Inner,
                    j.join_constraint,
                    j.null_equality,
                    j.null_aware,
                )?;
                Ok(Transformed::yes(LogicalPlan::Join(inner)))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data;
    let side = if preserved == 0 {
        &join.left
    } else {
        &join.right
    };
    let marked_side = side
        .as_ref()
        .clone()
        .transform_up(|node| match node {
            LogicalPlan::TableScan(scan) if scan.table_name.table() == source => {
                let scan = LogicalPlanBuilder::scan(
                    scan.table_name.clone(),
                    provider_as_source(marked.clone()),
                    None,
                )?
                .build()?;
                Ok(Transformed::yes(scan))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data;
    if marked_side
        .schema()
        .index_of_column_by_name(None, ID_COLUMN)
        .is_none()
    {
        return Err(BrookError::sql(format!(
            "an outer join of two streams joins the stream tables themselves: write \
             '{source}' (or '{source} AS alias') on its side of the join, not a subquery"
        )));
    }
    let (left, right, semi) = match preserved {
        0 => (
            Arc::new(marked_side),
            join.right.clone(),
            JoinType::LeftSemi,
        ),
        _ => (
            join.left.clone(),
            Arc::new(marked_side),
            JoinType::RightSemi,
        ),
    };
    let semi = Join::try_new(
        left,
        right,
        join.on.clone(),
        join.filter.clone(),
        semi,
        join.join_constraint,
        join.null_equality,
        join.null_aware,
    )?;
    let ids = LogicalPlanBuilder::from(LogicalPlan::Join(semi))
        .project(vec![Expr::Column(Column::from_name(ID_COLUMN))])?
        .build()?;
    Ok((inner, ids))
}
