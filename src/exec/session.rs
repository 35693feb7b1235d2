//! Session windows on a stream, as Spark's `session_window`: the rows of a key
//! whose `[time, time + gap)` spans overlap (or touch) are one session, which
//! ends a gap after its last row.
//!
//! The `session_window` column of each source row is computed in the plan (its
//! gap may be an expression over the row), and the partial aggregation groups
//! a batch's rows by key and span as any GROUP BY. Before the merge, the spans
//! of the batch and the sessions in state are merged per key (as Spark's
//! `MergingSessionsIterator` does over sorted rows), and every row is labelled
//! with its merged session: the merge plan then merges the partial aggregate
//! states of the sessions a row bridged into one, as it merges any group's.
//! The sessions merged away leave the state. A session closes when the
//! watermark passes its end.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StructArray,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{
    DataType, Field, Int64Type, IntervalMonthDayNano, IntervalUnit, Schema, SchemaRef, TimeUnit,
};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::provider_as_source;
use datafusion::execution::SessionState;
use datafusion::functions::core::expr_fn::named_struct;
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder, Operator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, binary_expr,
    cast as cast_expr, lit, when,
};
use datafusion::scalar::ScalarValue;

use crate::catalog::SourceDef;
use crate::error::{BrookError, Result};
use crate::sql::session::{Gap, SESSION_COLUMN, SessionSpec};
use crate::sql::slot::Slot;
use crate::sql::window::{unit_nanos, window_type};

/// The table a query over `slot`'s source is planned with: its columns and
/// `session_window`, of the time column's type.
pub fn planning_table(
    slot: &Slot,
    spec: &SessionSpec,
    partitions: usize,
) -> Arc<dyn TableProvider> {
    let schema = slot.schema();
    // A source without the time column gets a session too, so that the query
    // plans and the scan's rewrite names the column and the source.
    let time = schema
        .field_with_name(&spec.time_column)
        .map_or(DataType::Timestamp(TimeUnit::Nanosecond, None), |f| {
            f.data_type().clone()
        });
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(SESSION_COLUMN, window_type(&time), true));
    Slot::new(&Schema::new(fields)).table(partitions)
}

/// `plan`, planned over tables that have a `session_window` column, reading
/// the streams' slots (which have none) with the column computed from each
/// row: `[time, time + gap)`. Rows whose gap is not positive, or null, are
/// dropped (as Spark does), and so are rows without a time: `dropped` counts
/// those that reach the aggregation as the plan runs.
pub fn with_session_column(
    plan: LogicalPlan,
    spec: &SessionSpec,
    sources: &BTreeMap<String, SourceDef>,
    slots: &BTreeMap<String, Slot>,
    state: &SessionState,
    partitions: usize,
    dropped: &Arc<AtomicU64>,
) -> Result<LogicalPlan> {
    let has_session = ScalarUDF::new_from_impl(HasSession {
        signature: Signature::exact(vec![DataType::Boolean], Volatility::Volatile),
        dropped: dropped.clone(),
    });
    let mut refused = None;
    let rewritten = plan
        .transform_up(|node| match node {
            LogicalPlan::TableScan(scan) if slots.contains_key(scan.table_name.table()) => {
                let name = scan.table_name.table().to_string();
                match session_scan(
                    &scan.table_name,
                    &slots[&name],
                    spec,
                    &sources[&name],
                    state,
                    partitions,
                ) {
                    Ok(plan) => Ok(Transformed::yes(plan)),
                    Err(e) => {
                        refused.get_or_insert(e);
                        Ok(Transformed::no(LogicalPlan::TableScan(scan)))
                    }
                }
            }
            LogicalPlan::Aggregate(agg) => {
                // Only the rows that reach the aggregation count as without a
                // session: those the query's own filters removed do not.
                let Some(session) = agg
                    .group_expr
                    .iter()
                    .find(|e| matches!(e, Expr::Column(c) if c.name == SESSION_COLUMN))
                else {
                    return Ok(Transformed::yes(
                        LogicalPlan::Aggregate(agg).recompute_schema()?,
                    ));
                };
                // Computed in a projection and filtered on above it: a
                // filter's predicate would be merged with the query's into
                // one, evaluated also on the rows the query's filter removes.
                let kept = agg
                    .input
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .chain([has_session
                        .call(vec![session.clone().is_not_null()])
                        .alias(HAS_SESSION_COLUMN)]);
                let input = LogicalPlanBuilder::from(agg.input.as_ref().clone())
                    .project(kept)?
                    .filter(Expr::Column(Column::from_name(HAS_SESSION_COLUMN)))?
                    .build()?;
                Ok(Transformed::yes(LogicalPlan::Aggregate(
                    Aggregate::try_new(Arc::new(input), agg.group_expr, agg.aggr_expr)?,
                )))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data;
    match refused {
        Some(e) => Err(e),
        None => Ok(rewritten),
    }
}

/// A scan of `slot` as the table `table` with its `session_window` column.
fn session_scan(
    table: &datafusion::common::TableReference,
    slot: &Slot,
    spec: &SessionSpec,
    source: &SourceDef,
    state: &SessionState,
    partitions: usize,
) -> Result<LogicalPlan> {
    let scan = LogicalPlanBuilder::scan(
        table.clone(),
        provider_as_source(slot.table(partitions)),
        None,
    )?
    .build()?;
    let schema: &DFSchema = scan.schema();
    let time_type = slot
        .schema()
        .field_with_name(&spec.time_column)
        .map_err(|_| {
            BrookError::sql(format!(
                "session_window(...) uses '{}', which is not a column of '{}'",
                spec.time_column, source.name
            ))
        })?
        .data_type()
        .clone();
    if !matches!(time_type, DataType::Timestamp(..)) {
        return Err(BrookError::sql(format!(
            "session_window(...) takes a TIMESTAMP column first; '{}' of '{}' is {time_type}",
            spec.time_column, source.name
        )));
    }
    let gap = match &spec.gap {
        Gap::Fixed(d) => {
            // As a window's, a gap the time column cannot hold would be cut to it.
            if d.as_nanos() % unit_nanos(&time_type)? as u128 != 0 {
                return Err(BrookError::sql(format!(
                    "session_window gap {d:?} is finer than the time column's unit ({time_type})"
                )));
            }
            let nanos = i64::try_from(d.as_nanos())
                .map_err(|_| BrookError::sql(format!("session_window gap {d:?} is too long")))?;
            lit(ScalarValue::IntervalMonthDayNano(Some(
                IntervalMonthDayNano::new(0, 0, nanos),
            )))
        }
        Gap::PerRow(sql) => {
            let gap = state
                .create_logical_expr(sql, schema)
                .map_err(|e| BrookError::sql(format!("session_window gap {sql}: {e}")))?;
            match gap.get_type(schema)? {
                DataType::Interval(_) | DataType::Duration(_) => gap,
                DataType::Null => cast_expr(gap, DataType::Interval(IntervalUnit::MonthDayNano)),
                other => {
                    return Err(BrookError::sql(format!(
                        "session_window gap {sql} is {other}: a gap computed per row must be \
                         an INTERVAL (INTERVAL '10 seconds'); a fixed gap may be written \
                         '10 seconds'"
                    )));
                }
            }
        }
    };
    let time = Expr::Column(Column::new(Some(table.clone()), &spec.time_column));
    let end = binary_expr(time.clone(), Operator::Plus, gap);
    // A row without a session gets a null one here, and is dropped (and
    // counted) just below the aggregation, after the query's filters.
    let session = cast_expr(
        when(
            binary_expr(end.clone(), Operator::Gt, time.clone()),
            named_struct(vec![lit("start"), time.clone(), lit("end"), end]),
        )
        .end()?,
        window_type(&time_type),
    )
    .alias_qualified(Some(table.clone()), SESSION_COLUMN);
    let columns = schema
        .columns()
        .into_iter()
        .map(Expr::Column)
        .chain([session]);
    Ok(LogicalPlanBuilder::from(scan).project(columns)?.build()?)
}

/// The column, below the aggregation, of whether a row has a session.
const HAS_SESSION_COLUMN: &str = "brook_has_session";

/// Whether each row has a session (its `session_window` is not null), counting
/// those without one in `dropped`: volatile, so that the optimizer keeps it
/// where it is, just below the aggregation, evaluated once.
#[derive(Debug)]
struct HasSession {
    signature: Signature,
    dropped: Arc<AtomicU64>,
}

impl PartialEq for HasSession {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.dropped, &other.dropped)
    }
}

impl Eq for HasSession {}

impl Hash for HasSession {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl ScalarUDFImpl for HasSession {
    fn name(&self) -> &str {
        "brook_has_session"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        let rows = args.number_rows;
        let [kept] = &args.args[..] else {
            return datafusion::common::internal_err!("brook_has_session takes one argument");
        };
        let kept = kept.to_array(rows)?;
        let with_session = kept.as_boolean().true_count();
        self.dropped
            .fetch_add((rows - with_session) as u64, Ordering::Relaxed);
        Ok(ColumnarValue::Array(kept))
    }
}

/// The state and a batch's partial rows with every row's session replaced by
/// the session it belongs to once the overlapping ones of its key are merged,
/// and the state rows of the sessions merged into others (their old rows).
pub struct Merged {
    pub state: Vec<RecordBatch>,
    pub delta: Vec<RecordBatch>,
    pub merged_away: RecordBatch,
}

/// Merges the sessions of `state` and `delta` (rows of `schema`, whose first
/// `keys` columns are the group keys, the session struct at `column`).
pub fn merge_sessions(
    schema: &SchemaRef,
    state: &[RecordBatch],
    delta: &[RecordBatch],
    column: usize,
    keys: usize,
) -> Result<Merged> {
    let delta = concat_batches(schema, delta)?;
    if delta.num_rows() == 0 {
        // The sessions in state neither overlap nor touch: only new rows can merge them.
        return Ok(Merged {
            state: state.to_vec(),
            delta: vec![],
            merged_away: RecordBatch::new_empty(schema.clone()),
        });
    }
    let state = concat_batches(schema, state)?;
    let all = concat_batches(schema, [&state, &delta])?;
    let sessions = all.column(column).as_struct();
    let ticks = |i: usize| -> Result<Int64Array> {
        Ok(cast(sessions.column(i), &DataType::Int64)?
            .as_primitive::<Int64Type>()
            .clone())
    };
    let (starts, ends) = (ticks(0)?, ticks(1)?);
    // The rows of each key (the group keys but the session), in the order of
    // the keys' first rows.
    let others: Vec<usize> = (0..keys).filter(|&k| k != column).collect();
    let mut groups: Vec<Vec<usize>> = vec![];
    if others.is_empty() {
        groups.push((0..all.num_rows()).collect());
    } else {
        let converter = RowConverter::new(
            others
                .iter()
                .map(|&k| SortField::new(all.column(k).data_type().clone()))
                .collect(),
        )?;
        let columns: Vec<ArrayRef> = others.iter().map(|&k| all.column(k).clone()).collect();
        let rows = converter.convert_columns(&columns)?;
        let mut index: HashMap<&[u8], usize> = HashMap::new();
        for i in 0..all.num_rows() {
            let g = *index.entry(rows.row(i).data()).or_insert_with(|| {
                groups.push(vec![]);
                groups.len() - 1
            });
            groups[g].push(i);
        }
    }
    let mut new_starts: Vec<Option<i64>> = starts.iter().collect();
    let mut new_ends: Vec<Option<i64>> = ends.iter().collect();
    for mut rows in groups {
        // Rows without a session (none are fed) keep theirs.
        rows.retain(|&i| starts.is_valid(i) && ends.is_valid(i));
        rows.sort_by_key(|&i| starts.value(i));
        let mut first = 0;
        while first < rows.len() {
            let start = starts.value(rows[first]);
            let mut end = ends.value(rows[first]);
            let mut last = first + 1;
            // As Spark: a span starting at or before the session's end extends it.
            while last < rows.len() && starts.value(rows[last]) <= end {
                end = end.max(ends.value(rows[last]));
                last += 1;
            }
            for &i in &rows[first..last] {
                new_starts[i] = Some(start);
                new_ends[i] = Some(end);
            }
            first = last;
        }
    }
    let moved: BooleanArray = (0..state.num_rows())
        .map(|i| {
            let old = (
                starts.is_valid(i).then(|| starts.value(i)),
                ends.is_valid(i).then(|| ends.value(i)),
            );
            Some((new_starts[i], new_ends[i]) != old)
        })
        .collect();
    let relabelled = relabel(&all, column, new_starts, new_ends)?;
    Ok(Merged {
        merged_away: filter_record_batch(&state, &moved)?,
        state: vec![relabelled.slice(0, state.num_rows())],
        delta: vec![relabelled.slice(state.num_rows(), delta.num_rows())],
    })
}

/// `batch` with the session struct at `column` made of `starts` and `ends`.
fn relabel(
    batch: &RecordBatch,
    column: usize,
    starts: Vec<Option<i64>>,
    ends: Vec<Option<i64>>,
) -> Result<RecordBatch> {
    let sessions = batch.column(column).as_struct();
    let DataType::Struct(fields) = sessions.data_type() else {
        return Err(BrookError::internal("a session_window column is no struct"));
    };
    let time_type = fields[0].data_type();
    let start = cast(&Int64Array::from(starts), time_type)?;
    let end = cast(&Int64Array::from(ends), time_type)?;
    let mut columns = batch.columns().to_vec();
    columns[column] = Arc::new(StructArray::try_new(
        fields.clone(),
        vec![start, end],
        sessions.nulls().cloned(),
    )?);
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, TimestampSecondArray};
    use datafusion::arrow::datatypes::Fields;

    fn rows(schema: &SchemaRef, rows: &[(i32, i64, i64, i64)]) -> RecordBatch {
        let time = DataType::Timestamp(TimeUnit::Second, None);
        let DataType::Struct(fields) = window_type(&time) else {
            unreachable!()
        };
        let column = |f: fn(&(i32, i64, i64, i64)) -> i64| -> ArrayRef {
            Arc::new(TimestampSecondArray::from(
                rows.iter().map(f).collect::<Vec<_>>(),
            ))
        };
        let sessions = StructArray::new(
            Fields::from(fields.to_vec()),
            vec![column(|r| r.1), column(|r| r.2)],
            None,
        );
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int32Array::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(sessions),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn spans(batches: &[RecordBatch]) -> Vec<(i32, i64, i64, i64)> {
        let mut out = vec![];
        for b in batches {
            let keys = b
                .column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int32Type>();
            let sessions = b.column(1).as_struct();
            let tick = |i: usize| cast(sessions.column(i), &DataType::Int64).unwrap();
            let (starts, ends) = (tick(0), tick(1));
            let (starts, ends) = (
                starts.as_primitive::<Int64Type>(),
                ends.as_primitive::<Int64Type>(),
            );
            let counts = b.column(2).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                out.push((
                    keys.value(i),
                    starts.value(i),
                    ends.value(i),
                    counts.value(i),
                ));
            }
        }
        out
    }

    /// A batch's rows, out of order, join the sessions of their own key only:
    /// key 1's row at 8 bridges [0, 10) and [12, 22); a span starting where
    /// another ends extends it (key 2), and key 3's sessions stay apart.
    #[test]
    fn rows_bridging_sessions_of_their_key_merge_them() {
        let time = DataType::Timestamp(TimeUnit::Second, None);
        let schema = Arc::new(Schema::new(vec![
            Field::new("k0", DataType::Int32, true),
            Field::new("k1", window_type(&time), true),
            Field::new("__rows", DataType::Int64, true),
        ]));
        let state = rows(
            &schema,
            &[(1, 0, 10, 1), (1, 12, 22, 1), (3, 0, 10, 1), (3, 30, 40, 1)],
        );
        let delta = rows(
            &schema,
            &[(2, 15, 25, 1), (1, 8, 18, 1), (2, 5, 15, 1), (3, 15, 25, 1)],
        );
        let merged = merge_sessions(&schema, &[state], &[delta], 1, 2).unwrap();
        assert_eq!(
            spans(&merged.state),
            vec![(1, 0, 22, 1), (1, 0, 22, 1), (3, 0, 10, 1), (3, 30, 40, 1)]
        );
        assert_eq!(
            spans(&merged.delta),
            vec![(2, 5, 25, 1), (1, 0, 22, 1), (2, 5, 25, 1), (3, 15, 25, 1)]
        );
        assert_eq!(
            spans(&[merged.merged_away]),
            vec![(1, 0, 10, 1), (1, 12, 22, 1)]
        );
    }
}
