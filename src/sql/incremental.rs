//! Incremental planning: a streaming aggregation becomes three bounded plans.
//!
//! * **partial** aggregates one batch's rows into each group's partial state
//!   (DataFusion's: a count for `count`, a count and a sum for `avg`, the
//!   distinct values for `count(DISTINCT x)`; see [`partial`](super::partial)),
//! * **merge** folds those partials into the keyed state (state ∪ delta,
//!   grouped again), flagging the groups the batch changed,
//! * **finalize** is the user's query above its `GROUP BY` (projection,
//!   HAVING, window functions, ORDER BY, LIMIT) run over the groups a batch
//!   emits, with each aggregate's value from its state.
//!
//! All three are DataFusion plans over [`Slot`]s, built once per query.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::provider_as_source;
use datafusion::error::DataFusionError;
use datafusion::functions::core::expr_fn::{get_field, named_struct};
use datafusion::functions_aggregate::count::{Count, count_udaf};
use datafusion::functions_aggregate::expr_fn::{bool_or, first_value};
use datafusion::functions_aggregate::string_agg::StringAgg;
use datafusion::functions_aggregate::sum::Sum;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, Distinct, DistinctOn, Expr, ExprSchemable, Filter, JoinType, LogicalPlan,
    LogicalPlanBuilder, Operator, Projection, SortExpr, SubqueryAlias, cast, col, lit,
};
use datafusion::logical_expr::{FetchType, SkipType};
use datafusion::optimizer::analyzer::type_coercion::TypeCoercionRewriter;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::scalar::ScalarValue;

use super::partial::{self, Layout};
use super::slot::Slot;
use crate::error::{BrookError, Result};

/// Column of the partial and state rows counting the input rows of a group.
pub const ROWS_COLUMN: &str = "__rows";
/// Column of a deduplication's rows holding each key's first row, less the keys.
const FIRST_ROW_COLUMN: &str = "__first";
/// Column of the merge output: did this batch touch the group?
pub const CHANGED_COLUMN: &str = "__changed";

/// The window key of an aggregation (the `window` struct of `start` and `end`)
/// and the width in ticks of the windows each plan groups.
#[derive(Debug, Clone, Copy)]
pub struct WindowWidths {
    /// Position of the window among the group keys.
    pub key: usize,
    /// The partial groups a batch's rows by pane.
    pub partial: i64,
    /// The merge groups the state's windows; `None` where it also sums panes
    /// into windows, rows of two widths.
    pub merge: Option<i64>,
}

/// The logical halves of a streaming aggregation, before physical planning.
pub struct AggregateSplit {
    pub partial: LogicalPlan,
    /// Holds the state before a batch merges into it.
    pub state_slot: Slot,
    /// Holds the partial rows of the batch.
    pub delta_slot: Slot,
    /// Holds the state rows a batch emits, read by `finalize`.
    pub emit_slot: Slot,
    pub merge: LogicalPlan,
    pub finalize: LogicalPlan,
    pub keys: usize,
    /// Every state column is an exact sum that subtracting undoes: DataFusion's
    /// counts, and its sums without FILTER of signed integers that are never null.
    /// A sum that may be null cannot be undone: nothing tells 0 from no value.
    pub invertible: bool,
    /// The columns of partial rows kept in state: all but a deduplication's
    /// first row, which only the batch that first sees its key emits.
    pub state_columns: Vec<usize>,
}

/// The partial aggregation grouped by the fields of a struct key (a window: by
/// its start, when its end is the start plus a width), with the struct rebuilt
/// after: the same rows, of the same types.
fn flat_partial(
    agg: &Aggregate,
    partial: Aggregate,
    window: Option<(usize, i64)>,
) -> Result<LogicalPlan> {
    let schema = partial.schema.clone();
    let keys = agg.group_expr.len();
    if !schema.fields()[..keys]
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Struct(_)))
    {
        return Ok(LogicalPlan::Aggregate(partial));
    }
    let (group, mut rebuilt) = flat_keys(
        agg.group_expr
            .iter()
            .cloned()
            .zip(schema.fields().iter().map(|f| f.as_ref())),
        window,
    );
    rebuilt.extend(
        schema.fields()[keys..]
            .iter()
            .map(|f| col(f.name().as_str())),
    );
    let flat = Aggregate::try_new(partial.input.clone(), group, partial.aggr_expr.clone())?;
    Ok(LogicalPlanBuilder::from(LogicalPlan::Aggregate(flat))
        .project(rebuilt)?
        .build()?)
}

/// Group expressions for keys (each an expression and the field it becomes)
/// that split a struct key (a window) into its fields, and the projection that
/// rebuilds the keys from them. DataFusion groups a struct through its
/// row-format fallback, primitive fields through typed columns. `window`
/// (key, width) names the key whose end is its start plus a width: grouping by
/// the start alone spares a column (a query grouped by a window alone groups
/// one typed column, DataFusion's fastest path).
fn flat_keys<'a>(
    keys: impl Iterator<Item = (Expr, &'a Field)>,
    window: Option<(usize, i64)>,
) -> (Vec<Expr>, Vec<Expr>) {
    let mut group = vec![];
    let mut rebuilt = vec![];
    for (i, (e, field)) in keys.enumerate() {
        let k = field.name();
        match field.data_type() {
            DataType::Struct(fields) => {
                let ends_after = window.filter(|&(key, _)| key == i).map(|(_, width)| width);
                let start = format!("{k}__start");
                let mut parts = vec![];
                for f in fields.iter() {
                    let value = match ends_after {
                        Some(width) if f.name() == "end" => cast(
                            cast(col(start.as_str()), DataType::Int64) + lit(width),
                            f.data_type().clone(),
                        ),
                        _ => {
                            let flat = format!("{k}__{}", f.name());
                            group.push(get_field(e.clone(), f.name().as_str()).alias(&flat));
                            col(flat.as_str())
                        }
                    };
                    parts.extend([lit(f.name().as_str()), value]);
                }
                rebuilt.push(cast(named_struct(parts), field.data_type().clone()).alias(k));
            }
            _ => {
                group.push(e.alias(k));
                rebuilt.push(col(k.as_str()));
            }
        }
    }
    (group, rebuilt)
}

/// Whether `plan` is a source table scan, perhaps under filters.
fn reads_source_directly(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::TableScan(_) => true,
        LogicalPlan::Filter(f) => reads_source_directly(&f.input),
        _ => false,
    }
}

/// Whether `plan` (with its subqueries) scans a table for which `is_stream` holds.
pub fn reads_stream(plan: &LogicalPlan, is_stream: &dyn Fn(&str) -> bool) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            found |= is_stream(scan.table_name.table());
        }
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// Where a join of a stream with a static table may preserve or probe which
/// side, as in Spark: the stream's rows can be emitted, matched or not, as
/// they arrive; the static rows no stream row matched never can be, since a
/// later stream row may still match them.
fn join_rule(join_type: JoinType, stream_left: bool) -> std::result::Result<(), String> {
    let (name, allowed) = match join_type {
        JoinType::Inner => return Ok(()),
        JoinType::Left => ("a LEFT OUTER join", stream_left),
        JoinType::Right => ("a RIGHT OUTER join", !stream_left),
        JoinType::Full => ("a FULL OUTER join", false),
        JoinType::LeftSemi | JoinType::LeftMark => ("a semi join (IN / EXISTS)", stream_left),
        JoinType::RightSemi | JoinType::RightMark => ("a semi join (IN / EXISTS)", !stream_left),
        JoinType::LeftAnti => ("an anti join (NOT IN / NOT EXISTS)", stream_left),
        JoinType::RightAnti => ("an anti join (NOT IN / NOT EXISTS)", !stream_left),
    };
    if allowed {
        return Ok(());
    }
    let side = if stream_left { "left" } else { "right" };
    Err(format!(
        "{name} between a stream (on the {side}) and a static table is not supported: \
         Spark's rule for stream-static joins is that only the stream's side may be \
         preserved (LEFT JOIN with the stream on the left, RIGHT JOIN with it on the \
         right) and only the stream's rows may be kept by IN / EXISTS, since the static \
         rows no stream row matched are never final; write an inner join, or put the \
         stream on the preserved side"
    ))
}

/// Refuses what a streaming query cannot do with its tables: a join that
/// preserves a static table's side, and a subquery over a stream. `is_stream` tells a streaming source's name.
pub fn check_tables(plan: &LogicalPlan, is_stream: &dyn Fn(&str) -> bool) -> Result<()> {
    let mut problem: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        node.apply_subqueries(|sub| {
            if reads_stream(sub, is_stream) {
                problem = Some(
                    "a subquery over a stream is not supported: a subquery (IN (SELECT ...), \
                     EXISTS, or a scalar subquery) may read static tables only; join the \
                     stream instead, or aggregate it in the outer query"
                        .into(),
                );
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        if let LogicalPlan::Join(join) = node {
            let left = reads_stream(&join.left, is_stream);
            let right = reads_stream(&join.right, is_stream);
            // A join of two streams has rules of its own, which its operator checks.
            if left != right
                && let Err(why) = join_rule(join.join_type, left)
            {
                problem = Some(why);
            }
        }
        Ok(if problem.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    problem.map_or(Ok(()), |p| Err(BrookError::sql(p)))
}

/// Finds the one aggregation of `plan` over a stream, or `None` for a stateless
/// query. Aggregations within static tables' subtrees are plain batch plans.
pub fn find_aggregate(
    plan: &LogicalPlan,
    is_stream: &dyn Fn(&str) -> bool,
) -> Result<Option<Aggregate>> {
    let mut found: Vec<Aggregate> = vec![];
    let mut problem: Option<String> = None;
    plan.apply(|node| {
        if !reads_stream(node, is_stream) {
            return Ok(TreeNodeRecursion::Jump);
        }
        match node {
            LogicalPlan::Aggregate(a) => found.push(a.clone()),
            LogicalPlan::RecursiveQuery(_) => problem = Some("recursive queries".into()),
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if let Some(p) = problem {
        return Err(BrookError::sql(format!(
            "{p} are not supported in streaming queries"
        )));
    }
    if found.len() > 1 {
        return Err(BrookError::sql(
            "a streaming query may have only one GROUP BY aggregation",
        ));
    }
    let Some(agg) = found.pop() else {
        return Ok(None);
    };
    agg.input.apply(|node| {
        if !reads_stream(node, is_stream) {
            return Ok(TreeNodeRecursion::Jump);
        }
        if matches!(
            node,
            LogicalPlan::Sort(_) | LogicalPlan::Limit(_) | LogicalPlan::Window(_)
        ) {
            problem = Some(format!(
                "{} below GROUP BY has no meaning on a stream",
                describe(node)
            ));
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if let Some(p) = problem {
        return Err(BrookError::sql(p));
    }
    if agg
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err(BrookError::sql(
            "GROUPING SETS, CUBE and ROLLUP are not supported on streams",
        ));
    }
    Ok(Some(agg))
}

const GROUP_BY_FEEDING_DISTINCT: &str = "a GROUP BY feeding a SELECT DISTINCT is not supported \
     on streams: the aggregation's rows change as its groups update (or are emitted once, final, \
     in append mode, so that a DISTINCT over them drops nothing); deduplicate the stream before \
     aggregating it instead";

/// Rewrites a deduplication over a stream into a `GROUP BY` and tells whether
/// it did: a `SELECT DISTINCT` into a `GROUP BY` of all its columns, without
/// aggregates; `DISTINCT ON` and the `ROW_NUMBER() ... = 1` idiom into a
/// `GROUP BY` of their keys keeping each key's first row. The stateful operator
/// then runs as Spark's `dropDuplicates`, emitting each key the first time it
/// is seen. A DISTINCT within a static table's subtree is left alone.
pub fn distinct_as_aggregate(
    plan: LogicalPlan,
    is_stream: &dyn Fn(&str) -> bool,
) -> Result<(LogicalPlan, bool)> {
    let mut found = false;
    let mut grouped_below = false;
    let mut refused = None;
    let rewritten = plan
        .transform_up(|node| match node {
            LogicalPlan::Filter(filter) if reads_stream(&filter.input, is_stream) => {
                let first = match first_row_column(&filter.predicate) {
                    Some(rn) => keep_first_rows(&filter.input, &rn).unwrap_or_else(|e| {
                        refused.get_or_insert(e);
                        None
                    }),
                    None => None,
                };
                match first {
                    Some(input) => {
                        found = true;
                        let filter = Filter::try_new(filter.predicate, Arc::new(input))?;
                        Ok(Transformed::yes(LogicalPlan::Filter(filter)))
                    }
                    None => Ok(Transformed::no(LogicalPlan::Filter(filter))),
                }
            }
            LogicalPlan::Distinct(Distinct::On(on)) if reads_stream(&on.input, is_stream) => {
                let grouped = on
                    .input
                    .exists(|n| {
                        Ok(matches!(n, LogicalPlan::Aggregate(_)) && reads_stream(n, is_stream))
                    })
                    .unwrap_or(false);
                let kept = match grouped {
                    true => Err(BrookError::sql(GROUP_BY_FEEDING_DISTINCT)),
                    false => distinct_on(&on),
                };
                match kept {
                    Ok(plan) => {
                        found = true;
                        Ok(Transformed::yes(plan))
                    }
                    Err(e) => {
                        refused.get_or_insert(e);
                        Ok(Transformed::no(LogicalPlan::Distinct(Distinct::On(on))))
                    }
                }
            }
            LogicalPlan::Distinct(Distinct::All(input)) if reads_stream(&input, is_stream) => {
                found = true;
                grouped_below |= input
                    .exists(|n| {
                        Ok(matches!(n, LogicalPlan::Aggregate(_)) && reads_stream(n, is_stream))
                    })
                    .unwrap_or(false);
                let keys = input.schema().columns().into_iter().map(Expr::Column);
                let agg = Aggregate::try_new(input, keys.collect(), vec![])?;
                Ok(Transformed::yes(LogicalPlan::Aggregate(agg)))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data;
    if let Some(e) = refused {
        return Err(e);
    }
    if !found {
        return Ok((rewritten, false));
    }
    let mut aggregates = 0;
    rewritten.apply(|node| {
        if !reads_stream(node, is_stream) {
            return Ok(TreeNodeRecursion::Jump);
        }
        aggregates += usize::from(matches!(node, LogicalPlan::Aggregate(_)));
        Ok(TreeNodeRecursion::Continue)
    })?;
    if aggregates > 1 && grouped_below {
        return Err(BrookError::sql(GROUP_BY_FEEDING_DISTINCT));
    }
    if aggregates > 1 {
        return Err(BrookError::sql(
            "this SELECT DISTINCT feeding a GROUP BY is not supported on streams: the \
             deduplication must be a subquery (or WITH table) in the FROM of the aggregating \
             SELECT, as in \
             SELECT k, count(*) FROM (SELECT DISTINCT ... FROM stream) GROUP BY k",
        ));
    }
    Ok((rewritten, true))
}

/// The column a filter keeps the first row by: `rn = 1`, `rn <= 1` or `rn < 2`.
fn first_row_column(predicate: &Expr) -> Option<String> {
    let Expr::BinaryExpr(b) = predicate else {
        return None;
    };
    let column = match b.left.as_ref() {
        Expr::Column(c) => c,
        Expr::Cast(c) => match c.expr.as_ref() {
            Expr::Column(c) => c,
            _ => return None,
        },
        _ => return None,
    };
    let Expr::Literal(value, _) = b.right.as_ref() else {
        return None;
    };
    let n = value.cast_to(&DataType::Int64).ok()?;
    let first = matches!(
        (b.op, n),
        (Operator::Eq | Operator::LtEq, ScalarValue::Int64(Some(1)))
            | (Operator::Lt, ScalarValue::Int64(Some(2)))
    );
    first.then(|| column.name.clone())
}

/// `plan` with the `ROW_NUMBER() OVER (PARTITION BY k ORDER BY time)` that its
/// column `rn` numbers rows by replaced by the first row of each key, numbered
/// 1: an aggregation by the keys keeping the other columns of the row first in
/// time, which runs as a deduplication. `None` when `rn` is no such number.
fn keep_first_rows(plan: &LogicalPlan, rn: &str) -> Result<Option<LogicalPlan>> {
    match plan {
        LogicalPlan::SubqueryAlias(s) => Ok(match keep_first_rows(&s.input, rn)? {
            Some(input) => Some(LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(
                Arc::new(input),
                s.alias.clone(),
            )?)),
            None => None,
        }),
        LogicalPlan::Projection(p) => {
            let source = p.expr.iter().find_map(|e| match e {
                Expr::Alias(a) if a.name == rn => match a.expr.as_ref() {
                    Expr::Column(c) => Some(c.name.clone()),
                    _ => None,
                },
                Expr::Column(c) if c.name == rn => Some(c.name.clone()),
                _ => None,
            });
            let Some(source) = source else {
                return Ok(None);
            };
            Ok(match keep_first_rows(&p.input, &source)? {
                Some(input) => Some(LogicalPlan::Projection(Projection::try_new(
                    p.expr.clone(),
                    Arc::new(input),
                )?)),
                None => None,
            })
        }
        LogicalPlan::Window(w) => {
            // Over an aggregation's rows it numbers groups, as a batch query would.
            if w.input
                .exists(|n| Ok(matches!(n, LogicalPlan::Aggregate(_))))?
            {
                return Ok(None);
            }
            let numbered = w.schema.fields().len() - 1;
            if w.window_expr.len() != 1 || w.schema.field(numbered).name() != rn {
                return Ok(None);
            }
            let Expr::WindowFunction(f) = &w.window_expr[0] else {
                return Ok(None);
            };
            if f.fun.name() != "row_number" {
                return Ok(None);
            }
            let refuse = |why: String| {
                BrookError::sql(format!(
                    "ROW_NUMBER() over a stream keeps the first row per key when it is \
                     compared with 1 (rn = 1) and numbers rows as PARTITION BY <key columns> \
                     ORDER BY <event-time column> [ASC]: {why}"
                ))
            };
            let [order] = f.params.order_by.as_slice() else {
                return Err(refuse("order by one event-time column".into()));
            };
            let firsts = first_rows(&w.input, &f.params.partition_by, order).map_err(refuse)?;
            // Numbered 1, as the rows the window would have kept.
            let mut columns: Vec<Expr> = firsts
                .schema()
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect();
            let (q, numbered) = w.schema.qualified_field(numbered);
            columns.push(
                cast(lit(1u64), numbered.data_type().clone())
                    .alias_qualified(q.cloned(), numbered.name()),
            );
            Ok(Some(
                LogicalPlanBuilder::from(firsts).project(columns)?.build()?,
            ))
        }
        _ => Ok(None),
    }
}

/// `SELECT DISTINCT ON (k) ... ORDER BY k, time` as the first row of each key.
fn distinct_on(on: &DistinctOn) -> Result<LogicalPlan> {
    let refuse = |why: String| {
        BrookError::sql(format!(
            "SELECT DISTINCT ON over a stream keeps the first row per key and needs \
             ORDER BY <the ON keys>, <event-time column> [ASC]: {why}"
        ))
    };
    let sort = on.sort_expr.clone().unwrap_or_default();
    let keys = on.on_expr.len();
    if sort.len() != keys + 1
        || sort[..keys]
            .iter()
            .zip(&on.on_expr)
            .any(|(s, k)| s.expr != *k)
    {
        return Err(refuse(
            "order by the keys, then by one event-time column".into(),
        ));
    }
    let firsts = first_rows(&on.input, &on.on_expr, &sort[keys]).map_err(refuse)?;
    Ok(LogicalPlanBuilder::from(firsts)
        .project(on.select_expr.clone())?
        .build()?)
}

/// The first row in event time (`order`) of each key of `input`, as rows of
/// `input`, or why there is none. Spark's `dropDuplicates` keeps each key's
/// first row seen: a batch's rows for a key are ordered by time, but a row
/// already emitted in an earlier batch cannot be taken back for an earlier one.
fn first_rows(
    input: &Arc<LogicalPlan>,
    keys: &[Expr],
    order: &SortExpr,
) -> std::result::Result<LogicalPlan, String> {
    let time = order
        .expr
        .get_type(input.schema())
        .map_err(|e| e.to_string())?;
    if !matches!(order.expr, Expr::Column(_)) || !matches!(time, DataType::Timestamp(..)) {
        return Err(format!("{} is not a TIMESTAMP column", order.expr));
    }
    if !order.asc {
        return Err(
            "ORDER BY ... DESC keeps each key's last row, which on a stream means \
             taking back a row already emitted whenever a later one arrives; that \
             retraction is not supported (ORDER BY time ASC keeps the first row)"
                .into(),
        );
    }
    if keys.is_empty() {
        return Err("no key to keep the first row of".into());
    }
    first_rows_by(input, keys, order).map_err(|e| e.to_string())
}

fn first_rows_by(input: &Arc<LogicalPlan>, keys: &[Expr], order: &SortExpr) -> Result<LogicalPlan> {
    let plan = input;
    let input = plan.schema();
    let key_columns: HashSet<&datafusion::common::Column> = keys
        .iter()
        .filter_map(|k| match k {
            Expr::Column(c) => Some(c),
            _ => None,
        })
        .collect();
    // The other columns are kept as one struct, so that they all come from one row.
    let mut parts = vec![];
    let mut kept = vec![];
    for (q, f) in input.iter() {
        let column = datafusion::common::Column::new(q.cloned(), f.name());
        if !key_columns.contains(&column) {
            let name = format!("c{}", kept.len());
            parts.extend([lit(name.as_str()), Expr::Column(column.clone())]);
            kept.push((column, name));
        }
    }
    let first = (!kept.is_empty())
        .then(|| first_value(named_struct(parts), vec![order.clone()]).alias(FIRST_ROW_COLUMN));
    let agg = Aggregate::try_new(plan.clone(), keys.to_vec(), first.into_iter().collect())?;
    let mut columns = vec![];
    for (q, f) in input.iter() {
        let column = datafusion::common::Column::new(q.cloned(), f.name());
        columns.push(match kept.iter().find(|(c, _)| *c == column) {
            Some((_, name)) => get_field(col(FIRST_ROW_COLUMN), name.as_str())
                .alias_qualified(q.cloned(), f.name()),
            None => Expr::Column(column),
        });
    }
    Ok(LogicalPlanBuilder::from(LogicalPlan::Aggregate(agg))
        .project(columns)?
        .build()?)
}

/// A refused plan node as the query wrote it (`window function row_number()
/// PARTITION BY ...`, `ORDER BY ...`, `LIMIT ...`), rather than as a plan.
fn describe(node: &LogicalPlan) -> String {
    let list = |items: Vec<String>| items.join(", ");
    match node {
        LogicalPlan::Window(w) => {
            let functions = list(w.window_expr.iter().map(|e| e.to_string()).collect());
            let plural = if w.window_expr.len() > 1 { "s" } else { "" };
            format!("window function{plural} {functions}")
        }
        LogicalPlan::Sort(sort) => {
            let keys = list(sort.expr.iter().map(|k| k.to_string()).collect());
            match sort.fetch {
                Some(n) => format!("ORDER BY {keys} LIMIT {n}"),
                None => format!("ORDER BY {keys}"),
            }
        }
        LogicalPlan::Limit(limit) => {
            let mut text = String::from("LIMIT");
            if let Ok(FetchType::Literal(Some(n))) = limit.get_fetch_type() {
                text.push_str(&format!(" {n}"));
            }
            if let Ok(SkipType::Literal(n)) = limit.get_skip_type()
                && n > 0
            {
                text.push_str(&format!(" OFFSET {n}"));
            }
            text
        }
        other => other.display().to_string(),
    }
}

/// Whether the aggregate `f` reads its rows in its ORDER BY's order, as
/// DataFusion sorts them for it (nth_value). Not an ordered-set aggregate,
/// whose `WITHIN GROUP (ORDER BY x)` names its argument, nor string_agg, whose
/// ordered accumulator is array_agg's and sorts by itself.
fn needs_sorted_rows(f: &AggregateFunction) -> bool {
    !f.params.order_by.is_empty()
        && f.func.order_sensitivity().hard_requires()
        && !f.func.supports_within_group_clause()
        && !f.func.inner().is::<StringAgg>()
}

/// Rejects operators that need all rows at once in a query without state.
pub fn check_stateless(plan: &LogicalPlan, is_stream: &dyn Fn(&str) -> bool) -> Result<()> {
    let mut problem = None;
    plan.apply(|node| {
        if !reads_stream(node, is_stream) {
            return Ok(TreeNodeRecursion::Jump);
        }
        if let LogicalPlan::Window(_) = node {
            problem = Some(format!(
                "{} needs an aggregation (GROUP BY) in a streaming query; the one window \
                 function a stream takes is ROW_NUMBER() OVER (PARTITION BY <keys> ORDER BY \
                 <event time>) kept where it is 1 (rn = 1 in an outer WHERE), which keeps \
                 the first row per key",
                describe(node)
            ));
        } else if matches!(node, LogicalPlan::Sort(_) | LogicalPlan::Limit(_)) {
            problem = Some(format!(
                "{} needs an aggregation (GROUP BY) in a streaming query; \
                 ORDER BY and LIMIT apply to the result of a GROUP BY",
                describe(node)
            ));
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    problem.map_or(Ok(()), |p| Err(BrookError::sql(p)))
}
/// How one aggregate of the query is kept in state.
enum Kept {
    /// A DataFusion aggregate's partial state, one column per state field.
    State {
        /// The aggregate over the aggregation's input, which makes its accumulators.
        f: Arc<AggregateFunctionExpr>,
        layout: Layout,
        /// The rows `f` was planned over.
        input: SchemaRef,
        columns: Vec<String>,
        /// The column the wrappers return: the state column, or a struct of them all.
        packed: String,
    },
    /// A deduplication's first row: only a new key's, from the batch, is emitted.
    First(String),
}

impl Kept {
    fn columns(&self) -> &[String] {
        match self {
            Kept::State { columns, .. } => columns,
            Kept::First(column) => std::slice::from_ref(column),
        }
    }

    fn is_packed(&self) -> bool {
        self.columns().len() > 1
    }

    /// The state columns from the column a wrapper returned.
    fn unpacked(&self) -> Vec<Expr> {
        match self {
            Kept::State {
                columns, packed, ..
            } if self.is_packed() => columns
                .iter()
                .enumerate()
                .map(|(i, c)| get_field(col(packed.as_str()), Layout::child(i).as_str()).alias(c))
                .collect(),
            _ => self.columns().iter().map(|c| col(c.as_str())).collect(),
        }
    }

    /// The aggregation of the merge plan that folds these state columns.
    fn merged(&self) -> Expr {
        match self {
            Kept::State {
                f,
                layout,
                input,
                columns,
                packed,
            } => partial::merge_of(f, layout, input.clone())
                .call(columns.iter().map(|c| col(c.as_str())).collect())
                .alias(packed),
            Kept::First(c) => first_value(col(c.as_str()), vec![]).alias(c),
        }
    }

    /// The aggregate's value from its state columns.
    fn value(&self) -> Expr {
        match self {
            Kept::State { f, columns, .. } => {
                partial::value_of(f).call(columns.iter().map(|c| col(c.as_str())).collect())
            }
            Kept::First(c) => col(c.as_str()),
        }
    }
}

/// The aggregate `e` (type-coerced, over `input`) kept as state in the columns
/// `columns` yields, and the partial plan's aggregation into that state.
fn keep_state(
    e: &Expr,
    input: &DFSchema,
    name: &str,
    mut columns: impl FnMut(usize) -> Vec<String>,
) -> Result<(Kept, Expr)> {
    let Expr::AggregateFunction(agg) = e else {
        return Err(BrookError::sql(format!(
            "unsupported aggregate expression {e}"
        )));
    };
    let f = partial::lower(e, input, name)?;
    if let Err(why) = partial::check_mergeable(&f) {
        let name = agg.func.name();
        // Only a merge that is not built says the aggregate cannot run on a
        // stream; any other error (a bad argument) is the query's own.
        if !matches!(why, DataFusionError::NotImplemented(_)) {
            return Err(why.into());
        }
        return Err(BrookError::Context {
            context: format!(
                "aggregate '{name}' is not supported on streams (use an aggregate \
                 whose states merge, or run {name} in a batch query over what the stream \
                 wrote): a streaming aggregation keeps each group's partial state and merges \
                 every batch's into it, and {name}'s states cannot be merged"
            ),
            source: Box::new(why.into()),
        });
    }
    let layout = Layout::new(&f)?;
    let columns = columns(layout.field_count());
    let packed = match columns.as_slice() {
        [one] => one.clone(),
        _ => format!("__{name}"),
    };
    let p = &agg.params;
    let partial = Expr::AggregateFunction(AggregateFunction::new_udf(
        Arc::new(partial::state_of(&f, &layout)),
        p.args.clone(),
        p.distinct,
        p.filter.clone(),
        p.order_by.clone(),
        p.null_treatment,
    ))
    .alias(&packed);
    Ok((
        Kept::State {
            f,
            layout,
            input: input.inner().clone(),
            columns,
            packed,
        },
        partial,
    ))
}

/// Splits `plan`, whose aggregation is `agg`, into partial, merge and finalize plans.
/// `not_null` names the source columns declared NOT NULL, which the decoder
/// guarantees (the tables the planner sees are all nullable).
/// `dedup`: the aggregation is a deduplication, which may keep each key's
/// first row (`first_value`).
pub fn split(
    plan: &LogicalPlan,
    agg: &Aggregate,
    partitions: usize,
    not_null: &HashSet<String>,
    window: Option<WindowWidths>,
    dedup: bool,
) -> Result<AggregateSplit> {
    let keys = agg.group_expr.len();
    let input = agg.input.schema();
    let mut partial_aggs: Vec<Expr> = vec![];
    let mut kept: Vec<Kept> = vec![];
    // State columns are named p0, p1, ... in the order of the aggregates'
    // state fields: a count, sum, min or max keeps one, an avg two.
    let mut next = 0;
    let mut invertible = true;
    let mut first_rows = vec![];
    let mut sorted_by: Vec<&Vec<SortExpr>> = vec![];
    for (j, expr) in agg.aggr_expr.iter().enumerate() {
        let inner = match expr {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        let Expr::AggregateFunction(f) = inner else {
            return Err(BrookError::sql(format!(
                "unsupported aggregate expression {inner}"
            )));
        };
        let p = &f.params;
        let name = f.func.name().to_ascii_lowercase();
        if dedup && name == "first_value" {
            // With its ORDER BY: the batch's first row of each key.
            let column = format!("p{next}");
            next += 1;
            partial_aggs.push(inner.clone().alias(&column));
            first_rows.push(column.clone());
            kept.push(Kept::First(column));
            invertible = false;
            continue;
        }
        // A source column is known by its name only where the aggregation reads
        // the source itself (through filters), not a projection that renamed.
        let source_column = |c: &datafusion::common::Column| {
            reads_source_directly(&agg.input) && not_null.contains(c.name())
        };
        let never_null = |a: &Expr| match a {
            Expr::Column(c) => source_column(c),
            Expr::Cast(c) => matches!(c.expr.as_ref(), Expr::Column(c) if source_column(c)),
            other => !other.nullable(input).unwrap_or(true),
        };
        let exact_sum = p.filter.is_none()
            && p.args
                .iter()
                .all(|a| never_null(a) && a.get_type(input).is_ok_and(|t| t.is_signed_integer()));
        // Their states are single integer columns that negating undoes. Known
        // by what they are, not their names: a user's function may take a
        // built-in one's name.
        if needs_sorted_rows(f) && !sorted_by.contains(&&p.order_by) {
            sorted_by.push(&p.order_by);
        }
        let func = f.func.inner();
        invertible &= !p.distinct && (func.is::<Count>() || (func.is::<Sum>() && exact_sum));
        // As DataFusion's analyzer will: the arguments cast to the types the
        // aggregate takes, which its accumulators are made for.
        let coerced = inner
            .clone()
            .rewrite(&mut TypeCoercionRewriter::new(input))?
            .data;
        let (state, partial) = keep_state(&coerced, input, &format!("a{j}"), |n| {
            let names = (next..next + n).map(|i| format!("p{i}")).collect();
            next += n;
            names
        })?;
        partial_aggs.push(partial);
        kept.push(state);
    }
    let rows = count_udaf().call(vec![lit(1i64)]);
    let (rows, partial) = keep_state(&rows, input, ROWS_COLUMN, |_| vec![ROWS_COLUMN.to_string()])?;
    partial_aggs.push(partial);
    kept.push(rows);

    let key_names: Vec<String> = (0..keys).map(|i| format!("k{i}")).collect();
    let group: Vec<Expr> = agg
        .group_expr
        .iter()
        .zip(&key_names)
        .map(|(e, k)| e.clone().alias(k))
        .collect();
    // An aggregate DataFusion says needs its rows in its ORDER BY's order
    // (nth_value) gets each batch's rows sorted so; the states of batches
    // then merge in that order by the ordering values they keep.
    let input = match sorted_by.as_slice() {
        [] => agg.input.clone(),
        [order] => Arc::new(
            LogicalPlanBuilder::from(agg.input.as_ref().clone())
                .sort(order.to_vec())?
                .build()?,
        ),
        _ => {
            return Err(BrookError::sql(
                "aggregates that need their rows in the order of their ORDER BY (such as \
                 nth_value) must share one ORDER BY in a streaming GROUP BY: each batch's \
                 rows are sorted once, by it",
            ));
        }
    };
    let mut partial = flat_partial(
        agg,
        Aggregate::try_new(input, group, partial_aggs)?,
        window.map(|w| (w.key, w.partial)),
    )?;
    if kept.iter().any(Kept::is_packed) {
        let columns = key_names.iter().map(|k| col(k.as_str()));
        partial = LogicalPlanBuilder::from(partial)
            .project(columns.chain(kept.iter().flat_map(Kept::unpacked)))?
            .build()?;
    }
    let delta_slot = Slot::new(partial.schema().as_arrow());
    let emit_slot = Slot::new(partial.schema().as_arrow());
    let state_schema: SchemaRef = delta_slot.schema().clone();
    let state_columns: Vec<usize> = (0..state_schema.fields().len())
        .filter(|&i| !first_rows.contains(state_schema.field(i).name()))
        .collect();
    let state_slot = Slot::new(&state_schema.project(&state_columns)?);

    let tagged = |name: &str, slot: &Slot, changed: bool| -> Result<LogicalPlan> {
        let columns = state_schema.fields().iter().map(|f| {
            if !changed && first_rows.contains(f.name()) {
                cast(lit(ScalarValue::Null), f.data_type().clone()).alias(f.name())
            } else {
                col(f.name())
            }
        });
        Ok(
            LogicalPlanBuilder::scan(name, provider_as_source(slot.table(partitions)), None)?
                .project(columns.chain([lit(changed).alias(CHANGED_COLUMN)]))?
                .build()?,
        )
    };
    let union = LogicalPlanBuilder::from(tagged("__state", &state_slot, false)?)
        .union(tagged("__delta", &delta_slot, true)?)?
        .build()?;
    let key_fields = key_names
        .iter()
        .map(|k| state_schema.field_with_name(k))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let (flat, mut rebuilt) = flat_keys(
        key_names.iter().map(|k| col(k.as_str())).zip(key_fields),
        window.and_then(|w| Some((w.key, w.merge?))),
    );
    rebuilt.extend(kept.iter().flat_map(Kept::unpacked));
    rebuilt.push(col(CHANGED_COLUMN));
    let merge = LogicalPlanBuilder::from(union)
        .aggregate(
            flat,
            kept.iter()
                .map(Kept::merged)
                .chain([bool_or(col(CHANGED_COLUMN)).alias(CHANGED_COLUMN)]),
        )?
        .project(rebuilt)?
        .build()?;

    // The aggregation node is replaced by a projection that gives the emitted
    // state rows the names and types the rest of the user's plan expects.
    let mut columns: Vec<Expr> = vec![];
    for (i, key) in key_names.iter().enumerate() {
        let (q, f) = agg.schema.qualified_field(i);
        columns.push(col(key.as_str()).alias_qualified(q.cloned(), f.name()));
    }
    for (j, k) in kept[..agg.aggr_expr.len()].iter().enumerate() {
        let (q, f) = agg.schema.qualified_field(keys + j);
        columns.push(cast(k.value(), f.data_type().clone()).alias_qualified(q.cloned(), f.name()));
    }
    let replacement = LogicalPlanBuilder::scan(
        "__emit",
        provider_as_source(emit_slot.table(partitions)),
        None,
    )?
    .project(columns)?
    .build()?;
    let finalize = plan
        .clone()
        .transform_up(|node| match node {
            LogicalPlan::Aggregate(a) if &a == agg => Ok(Transformed::yes(replacement.clone())),
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data;
    Ok(AggregateSplit {
        partial,
        state_slot,
        delta_slot,
        emit_slot,
        merge,
        finalize,
        keys,
        invertible,
        state_columns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{ArrayRef, Int64Array};
    use datafusion::arrow::datatypes::Schema;
    use datafusion::common::not_impl_err;
    use datafusion::datasource::MemTable;
    use datafusion::logical_expr::function::AccumulatorArgs;
    use datafusion::logical_expr::{Accumulator, AggregateUDF, AggregateUDFImpl, Signature};
    use datafusion::prelude::SessionContext;

    /// A user's aggregate that sums, but whose partial sums do not merge.
    #[derive(Debug, PartialEq, Eq, Hash)]
    struct Unmergeable(Signature);

    #[derive(Debug)]
    struct Total(i64);

    impl Accumulator for Total {
        fn update_batch(&mut self, values: &[ArrayRef]) -> datafusion::common::Result<()> {
            let values = datafusion::arrow::array::AsArray::as_primitive::<
                datafusion::arrow::datatypes::Int64Type,
            >(&values[0]);
            self.0 += values.iter().flatten().sum::<i64>();
            Ok(())
        }
        fn evaluate(&mut self) -> datafusion::common::Result<ScalarValue> {
            Ok(ScalarValue::Int64(Some(self.0)))
        }
        fn size(&self) -> usize {
            size_of::<Self>()
        }
        fn state(&mut self) -> datafusion::common::Result<Vec<ScalarValue>> {
            Ok(vec![ScalarValue::Int64(Some(self.0))])
        }
        fn merge_batch(&mut self, _: &[ArrayRef]) -> datafusion::common::Result<()> {
            not_impl_err!("its partial totals cannot be added up")
        }
    }

    impl AggregateUDFImpl for Unmergeable {
        fn name(&self) -> &str {
            "total"
        }
        fn signature(&self) -> &Signature {
            &self.0
        }
        fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
            Ok(DataType::Int64)
        }
        fn accumulator(
            &self,
            _: AccumulatorArgs,
        ) -> datafusion::common::Result<Box<dyn Accumulator>> {
            Ok(Box::new(Total(0)))
        }
    }

    #[tokio::test]
    async fn an_aggregate_whose_states_do_not_merge_is_refused_by_name() {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("x", DataType::Int64, true),
        ]));
        let column: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let rows = datafusion::arrow::array::RecordBatch::try_new(
            schema.clone(),
            vec![column.clone(), column],
        )
        .unwrap();
        let table = MemTable::try_new(schema, vec![vec![rows]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx.register_udaf(AggregateUDF::new_from_impl(Unmergeable(Signature::exact(
            vec![DataType::Int64],
            datafusion::logical_expr::Volatility::Immutable,
        ))));
        let plan = ctx
            .state()
            .create_logical_plan("SELECT k, total(x) AS t, count(*) AS n FROM t GROUP BY k")
            .await
            .unwrap();
        let agg = find_aggregate(&plan, &|_| true).unwrap().unwrap();
        let err = split(&plan, &agg, 1, &HashSet::new(), None, false)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "aggregate 'total' is not supported on streams (use an aggregate whose \
             states merge, or run total in a batch query over what the stream wrote): a \
             streaming aggregation keeps each group's partial state and merges every batch's \
             into it, and total's states cannot be merged: This feature is not implemented: \
             its partial totals cannot be added up"
        );
        // The aggregate's own error is kept as the source.
        assert!(
            matches!(
                &err,
                BrookError::Context { source, .. }
                    if matches!(**source, BrookError::DataFusion(DataFusionError::NotImplemented(_)))
            ),
            "{err:?}"
        );
    }
}
