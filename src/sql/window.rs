//! Spark's event-time windows: `window(time, '1 hour')` (tumbling) and
//! `window(time, '1 hour', '10 minutes')` (sliding).
//!
//! The call is rewritten to a column named `window` (a struct of `start` and
//! `end`), so `SELECT window.start ... GROUP BY window(time, ...)` plans as in
//! Spark. Rows are first grouped into *panes*, the slices of width
//! gcd(size, slide) that windows are made of; only the pre-aggregated panes are
//! then copied into every window that covers them. A row therefore costs the
//! same whatever the number of windows it belongs to.

use std::ops::{ControlFlow, RangeBounds};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StructArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, max, take};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Int64Type, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::execution::memory_pool::MemoryReservation;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, Query, Select,
    SelectItem, SetExpr, TableAliasColumnDef, TableFactor, visit_expressions,
    visit_expressions_mut,
};

use super::chain::{aggregates, normal, reads_stream, relations_mut, stream_ctes};
use super::script::duration_literal;
use crate::error::{BrookError, Result};

/// The column name the rewritten `window(...)` call refers to.
pub const WINDOW_COLUMN: &str = "window";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSpec {
    pub time_column: String,
    pub size: Duration,
    pub slide: Duration,
    /// Spark's `startTime`: windows start at `offset + k * slide`.
    pub offset: Duration,
}

impl WindowSpec {
    pub fn is_sliding(&self) -> bool {
        self.slide != self.size
    }
}

/// Replaces every `window(...)` call in `query` by the `window` column and
/// returns the one window it declared.
pub fn rewrite_windows(query: &mut Query) -> Result<Option<WindowSpec>> {
    let mut specs = rewrite_calls(query, WINDOW_COLUMN, window_spec)?;
    if specs.len() > 1 {
        return Err(BrookError::sql(
            "a query may use only one window(...) specification: several would multiply each row",
        ));
    }
    Ok(specs.pop())
}

/// Replaces each call of `name` in `query` by the column `name`, and returns
/// the distinct specifications `spec` reads from their arguments.
pub fn rewrite_calls<S: PartialEq>(
    query: &mut Query,
    name: &str,
    spec: impl Fn(&FunctionArguments) -> Result<S>,
) -> Result<Vec<S>> {
    let mut specs: Vec<S> = vec![];
    let mut error = None;
    let _ = visit_expressions_mut(query, |expr| {
        if let SqlExpr::Function(f) = expr
            && f.name.to_string().eq_ignore_ascii_case(name)
        {
            match spec(&f.args) {
                Ok(spec) => {
                    if !specs.contains(&spec) {
                        specs.push(spec);
                    }
                    *expr = SqlExpr::Identifier(Ident::new(name));
                }
                Err(e) => {
                    error = Some(e);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    });
    match error {
        Some(e) => Err(e),
        None => Ok(specs),
    }
}

/// Carries the `column` (`window` or `session_window`, which the stream's
/// rows get, see `compile`) through the derived tables and common table
/// expressions that list their columns beneath a SELECT calling
/// `column(time, ...)`, as `SELECT *` carries it: `window(time, ...) ... FROM
/// (SELECT time, symbol FROM orders)` plans as over `orders`. The column is
/// worked out from the stream's own time column, so that column must reach
/// the call as it is, under its own name; a subquery that renames or computes
/// it is refused.
pub fn carry_window(
    query: &mut Query,
    column: &str,
    is_stream: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let mut carry = Carry {
        column,
        is_stream,
        stream_ctes: stream_ctes(query, is_stream),
        into_ctes: vec![],
    };
    carry.find(&mut query.body)?;
    // A common table expression may read another, named before it.
    let mut done: Vec<String> = vec![];
    while let Some((name, time)) = carry.into_ctes.pop() {
        if done.contains(&name) {
            continue;
        }
        let cte = query
            .with
            .iter_mut()
            .flat_map(|w| &mut w.cte_tables)
            .find(|cte| normal(&cte.alias.name) == name);
        if let Some(cte) = cte {
            move_column_names(column, &mut cte.alias.columns, &mut cte.query.body)?;
            carry.carry_into_body(&mut cte.query.body, &time, &mut vec![])?;
        }
        done.push(name);
    }
    Ok(())
}

/// Where [`carry_window`] has been and is to go.
struct Carry<'a> {
    /// The column carried, named as the call that makes it.
    column: &'a str,
    is_stream: &'a dyn Fn(&str) -> bool,
    /// The query's common table expressions that read a stream, by name.
    stream_ctes: Vec<String>,
    /// Those the window is to be carried through, with its time column.
    into_ctes: Vec<(String, String)>,
}

impl Carry<'_> {
    /// Finds the SELECTs calling `column(...)` and carries the column through what they read.
    fn find(&mut self, body: &mut SetExpr) -> Result<()> {
        match body {
            SetExpr::Select(select) => {
                let time = called_time_column(select, self.column);
                for relation in relations_mut(select) {
                    match (&time, relation) {
                        (Some(time), relation) => self.carry_into_relation(relation, time)?,
                        (None, TableFactor::Derived { subquery, .. }) => {
                            self.find(&mut subquery.body)?
                        }
                        _ => {}
                    }
                }
            }
            SetExpr::Query(q) => self.find(&mut q.body)?,
            SetExpr::SetOperation { left, right, .. } => {
                self.find(left)?;
                self.find(right)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn carry_into_relation(&mut self, relation: &mut TableFactor, time: &str) -> Result<()> {
        match relation {
            TableFactor::Derived {
                subquery, alias, ..
            } if reads_stream(subquery, self.is_stream) => {
                if let Some(alias) = alias {
                    move_column_names(self.column, &mut alias.columns, &mut subquery.body)?;
                }
                self.carry_into_body(&mut subquery.body, time, &mut vec![])?;
            }
            TableFactor::Table { name, .. } => {
                let cte = match &name.0[..] {
                    [part] => part.as_ident().map(normal),
                    _ => None,
                };
                if let Some(cte) = cte.filter(|c| self.stream_ctes.contains(c)) {
                    self.into_ctes.push((cte, time.to_string()));
                }
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => {
                self.carry_into_relation(&mut table_with_joins.relation, time)?;
                for join in &mut table_with_joins.joins {
                    self.carry_into_relation(&mut join.relation, time)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Adds the carried column to the rows `body` selects. `names` are the
    /// names the rows' columns go by above (the first SELECT's, in a UNION),
    /// when known; on return, the names it gave.
    fn carry_into_body(
        &mut self,
        body: &mut SetExpr,
        time: &str,
        names: &mut Vec<String>,
    ) -> Result<()> {
        match body {
            SetExpr::Select(select) => self.carry_into_select(select, time, names),
            SetExpr::Query(q) => self.carry_into_body(&mut q.body, time, names),
            SetExpr::SetOperation { left, right, .. } => {
                self.carry_into_body(left, time, names)?;
                self.carry_into_body(right, time, names)
            }
            _ => Ok(()),
        }
    }

    fn carry_into_select(
        &mut self,
        select: &mut Select,
        time: &str,
        names: &mut Vec<String>,
    ) -> Result<()> {
        // An aggregation's (or deduplication's) rows are not the stream's:
        // they carry no window or session of their own.
        if aggregates(select) || select.distinct.is_some() {
            return Ok(());
        }
        let wildcard = select.projection.iter().any(|item| {
            matches!(
                item,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        });
        if !wildcard {
            let call = self.column;
            let own: Vec<Option<String>> = select.projection.iter().map(item_name).collect();
            let named = |i: usize| names.get(i).cloned().or_else(|| own[i].clone());
            let Some(at) = (0..own.len()).find(|&i| named(i).is_some_and(|n| same_name(&n, time)))
            else {
                return Err(BrookError::sql(format!(
                    "{call}(...) uses '{time}', which the subquery `{select}` does not select; \
                     select the stream's time column in it"
                )));
            };
            let item = &select.projection[at];
            let column: Option<&[Ident]> = match item {
                SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => {
                    match expr {
                        SqlExpr::Identifier(id) => Some(std::slice::from_ref(id)),
                        SqlExpr::CompoundIdentifier(ids) => Some(ids),
                        _ => None,
                    }
                }
                _ => None,
            };
            let window = match column {
                Some([qualifier @ .., last]) if same_name(&normal(last), time) => {
                    let mut ids = qualifier.to_vec();
                    ids.push(Ident::new(call));
                    match &ids[..] {
                        [one] => SqlExpr::Identifier(one.clone()),
                        _ => SqlExpr::CompoundIdentifier(ids),
                    }
                }
                // A later SELECT of a UNION, whose columns go by the first one's names.
                Some([.., last])
                    if own[at].as_ref().is_none_or(|n| !same_name(n, time))
                        && !names.is_empty() =>
                {
                    return Err(BrookError::sql(format!(
                        "{call}(...) uses '{time}', which `{select}` fills with its column \
                         '{last}' (a UNION matches columns by position); {call}(...) takes \
                         a stream's time column: select it there in each SELECT"
                    )));
                }
                Some([.., last]) => {
                    return Err(BrookError::sql(format!(
                        "{call}(...) uses '{time}', which the subquery `{select}` renames from \
                         '{last}'; {call}(...) takes a stream's time column under the stream's \
                         name: select it as it is and group by {call}({last}, ...)"
                    )));
                }
                _ => {
                    return Err(BrookError::sql(format!(
                        "{call}(...) uses '{time}', which the subquery `{select}` computes \
                         (`{item}`); {call}(...) takes a stream's time column as the stream has \
                         it: select it unchanged under its own name and group by \
                         {call}(...) over it"
                    )));
                }
            };
            if names.is_empty() {
                *names = own.into_iter().map(Option::unwrap_or_default).collect();
            }
            select.projection.push(SelectItem::UnnamedExpr(window));
        }
        for relation in relations_mut(select) {
            self.carry_into_relation(relation, time)?;
        }
        Ok(())
    }
}

/// Moves the column names of an alias (`AS t(a, b)`) onto the SELECT it
/// names (`SELECT x AS a, y AS b`): DataFusion's optimizer fails on a struct
/// column (the window or session carried) under an alias that renames columns.
fn move_column_names(
    call: &str,
    columns: &mut Vec<TableAliasColumnDef>,
    body: &mut SetExpr,
) -> Result<()> {
    if columns.is_empty() {
        return Ok(());
    }
    let mut first = body;
    let select = loop {
        match first {
            SetExpr::Select(select) => break Some(select),
            SetExpr::Query(q) => first = &mut q.body,
            SetExpr::SetOperation { left, .. } => first = left,
            _ => break None,
        }
    };
    let listed = |s: &Select| {
        s.projection.len() == columns.len()
            && s.projection.iter().all(|i| {
                matches!(
                    i,
                    SelectItem::UnnamedExpr(_) | SelectItem::ExprWithAlias { .. }
                )
            })
    };
    let Some(select) = select.filter(|s| listed(s)) else {
        return Err(BrookError::sql(format!(
            "{call}(...) over a subquery renaming its columns ({}) needs the subquery to list \
             as many columns; name them in the subquery instead (SELECT x AS a, ...)",
            columns
                .iter()
                .map(|c| c.name.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    for (item, column) in select.projection.iter_mut().zip(columns.drain(..)) {
        if let SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } = item {
            *item = SelectItem::ExprWithAlias {
                expr: expr.clone(),
                alias: column.name,
            };
        }
    }
    Ok(())
}

/// The name a SELECT item's column goes by, when it is a column or aliased.
fn item_name(item: &SelectItem) -> Option<String> {
    match item {
        SelectItem::ExprWithAlias { alias, .. } => Some(normal(alias)),
        SelectItem::UnnamedExpr(SqlExpr::Identifier(id)) => Some(normal(id)),
        SelectItem::UnnamedExpr(SqlExpr::CompoundIdentifier(ids)) => ids.last().map(normal),
        _ => None,
    }
}

/// Whether a column name as DataFusion normalizes it is the time column `time`
/// as `window(...)` or `session_window(...)` names it.
fn same_name(name: &str, time: &str) -> bool {
    name.eq_ignore_ascii_case(time)
}

/// The time column of the `call(...)` (`window` or `session_window`) that
/// `select` itself makes, if any.
fn called_time_column(select: &Select, call: &str) -> Option<String> {
    let mut found = None;
    let mut look = |e: &SqlExpr| {
        if let SqlExpr::Function(f) = e
            && f.name.to_string().eq_ignore_ascii_case(call)
            && let Ok((time, _)) = time_call(call, &f.args, 1.., "")
        {
            found = Some(time);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    };
    let _ = visit_expressions(&select.projection, &mut look);
    let _ = visit_expressions(&select.group_by, &mut look);
    let _ = visit_expressions(&select.having, &mut look);
    let _ = visit_expressions(&select.selection, &mut look);
    found
}

/// The time column a `call(time, ...)` (`window` or `session_window`) names
/// first, and all its arguments, as many as `count` allows; else the error
/// showing its `usage`.
pub fn time_call<'a>(
    call: &str,
    args: &'a FunctionArguments,
    count: impl RangeBounds<usize>,
    usage: &str,
) -> Result<(String, Vec<&'a SqlExpr>)> {
    let expected = || BrookError::sql(format!("expected {usage}"));
    let FunctionArguments::List(list) = args else {
        return Err(expected());
    };
    let args: Vec<&SqlExpr> = list
        .args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect();
    if args.len() != list.args.len() || !count.contains(&args.len()) {
        return Err(expected());
    }
    let time_column = match args.first() {
        Some(SqlExpr::Identifier(id)) => id.value.clone(),
        Some(SqlExpr::CompoundIdentifier(ids)) => {
            ids.last().map(|i| i.value.clone()).unwrap_or_default()
        }
        Some(other) => {
            return Err(BrookError::sql(format!(
                "{call}(...) takes a timestamp column first, found {other}"
            )));
        }
        None => return Err(expected()),
    };
    Ok((time_column, args))
}

fn window_spec(args: &FunctionArguments) -> Result<WindowSpec> {
    let usage = "window(time_column, 'size' [, 'slide' [, 'start offset']])";
    let (time_column, args) = time_call(WINDOW_COLUMN, args, 2..=4, usage)?;
    let duration = |i: usize| -> Result<Duration> {
        let d = duration_literal(&args[i].to_string())?;
        if d.is_zero() && i < 3 {
            return Err(BrookError::sql(format!(
                "window {} must be positive",
                ["", "size", "slide"][i]
            )));
        }
        Ok(d)
    };
    let size = duration(1)?;
    let slide = if args.len() > 2 { duration(2)? } else { size };
    let offset = if args.len() > 3 {
        duration(3)?
    } else {
        Duration::ZERO
    };
    if slide > size {
        return Err(BrookError::sql(format!(
            "window slide ({slide:?}) longer than its size ({size:?}) would skip rows"
        )));
    }
    if offset >= slide {
        return Err(BrookError::sql(
            "window start offset must be shorter than the slide",
        ));
    }
    Ok(WindowSpec {
        time_column,
        size,
        slide,
        offset,
    })
}

/// The `window` column's type for a time column of type `time`.
pub fn window_type(time: &DataType) -> DataType {
    DataType::Struct(window_fields(time))
}

fn window_fields(time: &DataType) -> Fields {
    Fields::from(vec![
        Field::new("start", time.clone(), true),
        Field::new("end", time.clone(), true),
    ])
}

/// Nanoseconds per tick of a timestamp column's unit.
pub fn unit_nanos(data_type: &DataType) -> Result<i64> {
    match data_type {
        DataType::Timestamp(unit, _) => Ok(match unit {
            TimeUnit::Second => 1_000_000_000,
            TimeUnit::Millisecond => 1_000_000,
            TimeUnit::Microsecond => 1_000,
            TimeUnit::Nanosecond => 1,
        }),
        other => Err(BrookError::sql(format!(
            "event time must be a TIMESTAMP column, found {other}"
        ))),
    }
}

/// Window arithmetic in the ticks of the time column's unit.
#[derive(Debug, Clone)]
pub struct WindowTicks {
    time_type: DataType,
    size: i64,
    slide: i64,
    offset: i64,
    pane: i64,
    /// The window's size and slide as written, for errors.
    spec: (Duration, Duration),
}

impl WindowTicks {
    pub fn new(spec: &WindowSpec, time_type: &DataType) -> Result<Self> {
        let unit = unit_nanos(time_type)?;
        let ticks = |d: Duration, what: &str| -> Result<i64> {
            let n = i64::try_from(d.as_nanos()).map_err(|_| {
                BrookError::sql(format!(
                    "window {what} {d:?} is too long: a window must fit in a {time_type}"
                ))
            })?;
            if n % unit != 0 {
                return Err(BrookError::sql(format!(
                    "window {what} {d:?} is finer than the time column's unit ({time_type})"
                )));
            }
            Ok(n / unit)
        };
        let size = ticks(spec.size, "size")?;
        let slide = ticks(spec.slide, "slide")?;
        let offset = ticks(spec.offset, "offset")?;
        Ok(Self {
            time_type: time_type.clone(),
            size,
            slide,
            offset,
            pane: gcd(size, slide),
            spec: (spec.size, spec.slide),
        })
    }

    /// The pane each timestamp falls in, as a `window` struct column.
    pub fn panes(&self, time: &ArrayRef) -> Result<ArrayRef> {
        let ticks = cast(time, &DataType::Int64)?;
        let ticks = ticks.as_primitive::<Int64Type>();
        // Rows come mostly in time order, so most fall in the pane of the row
        // before; only the others pay for a division.
        let mut last = (i64::MAX, i64::MIN);
        let starts: Vec<i64> = ticks
            .values()
            .iter()
            .map(|&t| {
                if !(last.0 <= t && t < last.1) {
                    // In i128, as times within `offset` of i64's ends would overflow.
                    let into = (i128::from(t) - i128::from(self.offset))
                        .rem_euclid(i128::from(self.pane)) as i64;
                    let start = t.saturating_sub(into);
                    last = (start, start.saturating_add(self.pane));
                }
                last.0
            })
            .collect();
        let starts = Int64Array::new(starts.into(), ticks.nulls().cloned());
        self.window_struct(&starts, self.pane)
    }

    /// Copies each row once into every window covering its pane; `window_col`
    /// holds panes on entry and windows on return. The copies' memory is
    /// taken from `memory` first, so that a window sliding far more often than
    /// it is long (a day every second: 86,400 copies a row) fails with an
    /// error instead of exhausting the machine's memory.
    pub fn expand(
        &self,
        batch: &RecordBatch,
        window_col: usize,
        memory: &mut MemoryReservation,
    ) -> Result<RecordBatch> {
        if self.pane == self.size {
            return Ok(batch.clone());
        }
        let panes = batch.column(window_col).as_struct();
        let pane_start = cast(panes.column(0), &DataType::Int64)?;
        let pane_start = pane_start.as_primitive::<Int64Type>();
        let copies: usize = pane_start
            .iter()
            .map(|p| p.map_or(1, |p| self.windows_of(p)))
            .fold(0, usize::saturating_add);
        // The rows' own bytes, not their buffers': an aggregate emits slices
        // of one buffer, each of which would otherwise be charged for all of it.
        let mut batch_bytes = 0usize;
        for c in batch.columns() {
            batch_bytes = batch_bytes.saturating_add(c.to_data().get_slice_memory_size()?);
        }
        let row_bytes = batch_bytes / batch.num_rows().max(1)
            + std::mem::size_of::<u32>()
            + std::mem::size_of::<Option<i64>>();
        // Capped so that adding it to what the pool holds cannot overflow.
        let bytes = copies.saturating_mul(row_bytes).min(isize::MAX as usize);
        memory.try_grow(bytes).map_err(|e| BrookError::Context {
            context: format!(
                "window(...) puts each row into every window it belongs to ({} windows of {:?} \
                 every {:?}): {copies} rows in this batch, about {} MB, more than the memory \
                 left; use a longer slide, output mode 'append' with a watermark (windows are \
                 then summed from slices of time rather than copied), or a larger memory \
                 limit (--memory-limit)",
                self.size / self.slide,
                self.spec.0,
                self.spec.1,
                bytes >> 20,
            ),
            source: Box::new(e.into()),
        })?;
        let mut rows: Vec<u32> = Vec::with_capacity(copies);
        let mut starts: Vec<Option<i64>> = Vec::with_capacity(copies);
        for (row, p) in pane_start.iter().enumerate() {
            let Some(p) = p else {
                rows.push(row as u32);
                starts.push(None);
                continue;
            };
            let (_, mut start) = self.covering(p);
            for _ in 0..self.windows_of(p) {
                rows.push(row as u32);
                starts.push(Some(start));
                start = start.saturating_sub(self.slide);
            }
        }
        let indices = UInt32Array::from(rows);
        let mut columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<Result<_, _>>()?;
        columns[window_col] = self.window_struct(&Int64Array::from(starts), self.size)?;
        Ok(RecordBatch::try_new(batch.schema(), columns)?)
    }

    /// Whether windows overlap, so that state is best kept per pane.
    /// The type of the time column the windows are over.
    pub fn time_type(&self) -> &DataType {
        &self.time_type
    }

    pub fn overlapping(&self) -> bool {
        self.pane != self.size
    }

    pub fn size(&self) -> i64 {
        self.size
    }

    pub fn slide(&self) -> i64 {
        self.slide
    }

    /// The width of a pane: windows of `size` every `slide` are made of them.
    pub fn pane(&self) -> i64 {
        self.pane
    }

    /// The first window start at or after `t` (the last one `i64` holds past its end).
    pub fn start_at_or_after(&self, t: i64) -> i64 {
        clamp(self.start_at_or_after_wide(i128::from(t)))
    }

    // Window starts near the ends of `i64` are worked out in `i128`.
    fn start_at_or_after_wide(&self, t: i128) -> i128 {
        t + (i128::from(self.offset) - t).rem_euclid(i128::from(self.slide))
    }

    /// The starts of the windows covering the pane that starts at `pane`, as an
    /// inclusive range stepping by the slide (clamped to what `i64` holds).
    pub fn covering(&self, pane: i64) -> (i64, i64) {
        let p = i128::from(pane);
        let latest = p - (p - i128::from(self.offset)).rem_euclid(i128::from(self.slide));
        let first = self.start_at_or_after_wide(p + i128::from(self.pane - self.size));
        (clamp(first), clamp(latest))
    }

    /// How many window starts of `covering` there are up to `last` (inclusive).
    pub fn count_starts(&self, (first, latest): (i64, i64), last: i64) -> i64 {
        let last = last.min(latest);
        if last < first {
            0
        } else {
            clamp((i128::from(last) - i128::from(first)) / i128::from(self.slide) + 1)
        }
    }

    /// How many windows cover the pane that starts at `pane`.
    fn windows_of(&self, pane: i64) -> usize {
        let n = self.count_starts(self.covering(pane), i64::MAX);
        usize::try_from(n).unwrap_or(0)
    }

    /// `rows` copies of the window starting at `start`, as a `window` struct column.
    pub fn window_column(&self, start: i64, rows: usize) -> Result<ArrayRef> {
        self.window_struct(&Int64Array::from(vec![start; rows]), self.size)
    }

    fn window_struct(&self, starts: &Int64Array, width: i64) -> Result<ArrayRef> {
        let start = cast(starts, &self.time_type)?;
        let ends: Int64Array = match starts.try_unary(|s| {
            s.checked_add(width)
                .ok_or_else(|| ArrowError::ComputeError("overflow".into()))
        }) {
            Ok(ends) => ends,
            Err(_) => {
                let late = starts
                    .iter()
                    .position(|s| s.is_some_and(|s| s.checked_add(width).is_none()))
                    .unwrap_or_default();
                return Err(BrookError::sql(format!(
                    "the window from {} (of {:?}) would end after the last time a {} holds",
                    array_value_to_string(&start, late)?,
                    self.spec.0,
                    self.time_type
                )));
            }
        };
        let end = cast(&ends, &self.time_type)?;
        let nulls = starts.nulls().cloned();
        Ok(Arc::new(StructArray::try_new(
            window_fields(&self.time_type),
            vec![start, end],
            nulls,
        )?))
    }
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The largest value of the timestamp column `name` of `batch`, in nanoseconds.
pub fn max_event_time(name: &str, batch: &RecordBatch) -> Result<Option<i64>> {
    let column = batch.column(batch.schema().index_of(name)?);
    let unit = unit_nanos(column.data_type())?;
    let ticks = cast(column, &DataType::Int64)?;
    Ok(max(ticks.as_primitive::<Int64Type>()).map(|m| m.saturating_mul(unit)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::TimestampSecondArray;
    use datafusion::arrow::datatypes::Schema;
    use datafusion::execution::memory_pool::{
        GreedyMemoryPool, MemoryConsumer, MemoryPool, UnboundedMemoryPool,
    };
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn spec(size: u64, slide: u64) -> WindowSpec {
        WindowSpec {
            time_column: "t".into(),
            size: Duration::from_secs(size),
            slide: Duration::from_secs(slide),
            offset: Duration::ZERO,
        }
    }

    #[test]
    fn rewrites_window_calls() {
        let sql = "SELECT window.start, count(*) FROM o GROUP BY window(t, '1 hour', '10 minutes')";
        let mut stmt = Parser::new(&GenericDialect {})
            .try_with_sql(sql)
            .unwrap()
            .parse_query()
            .unwrap();
        let spec = rewrite_windows(&mut stmt).unwrap().unwrap();
        assert_eq!(spec.size, Duration::from_secs(3600));
        assert_eq!(spec.slide, Duration::from_secs(600));
        assert!(stmt.to_string().ends_with("GROUP BY window"), "{stmt}");
    }

    #[test]
    fn sliding_windows_cover_each_pane_once_each() {
        let time_type = DataType::Timestamp(TimeUnit::Second, None);
        let ticks = WindowTicks::new(&spec(10, 4), &time_type).unwrap();
        // pane width gcd(10, 4) = 2; t = 7 lies in pane [6, 8)
        let t: ArrayRef = Arc::new(TimestampSecondArray::from(vec![7]));
        let panes = ticks.panes(&t).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "window",
            panes.data_type().clone(),
            true,
        )]));
        let batch = RecordBatch::try_new(schema, vec![panes]).unwrap();
        let pool: Arc<dyn MemoryPool> = Arc::new(UnboundedMemoryPool::default());
        let mut memory = MemoryConsumer::new("test").register(&pool);
        let out = ticks.expand(&batch, 0, &mut memory).unwrap();
        let w = out.column(0).as_struct();
        let starts = cast(w.column(0), &DataType::Int64).unwrap();
        let starts: Vec<i64> = starts.as_primitive::<Int64Type>().values().to_vec();
        // windows starting at multiples of 4 that contain [6, 8): [4, 14) and [0, 10)
        assert_eq!(starts, vec![4, 0]);
    }

    /// An aggregate emits its groups as slices of one large batch; each slice's
    /// copies are charged for its own rows, not for the buffers it shares.
    #[test]
    fn a_slice_of_a_large_batch_is_charged_for_its_own_rows() {
        let time_type = DataType::Timestamp(TimeUnit::Second, None);
        let ticks = WindowTicks::new(&spec(10, 4), &time_type).unwrap();
        let t: ArrayRef = Arc::new(TimestampSecondArray::from(vec![7; 100_000]));
        let panes = ticks.panes(&t).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "window",
            panes.data_type().clone(),
            true,
        )]));
        let batch = RecordBatch::try_new(schema, vec![panes]).unwrap();
        let slice = batch.slice(0, 10);
        // 20 copies of a few dozen bytes each fit in 64 KB; the whole batch's
        // 1.6 MB of buffers, charged to each of 10 rows, would not.
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(64 << 10));
        let mut memory = MemoryConsumer::new("test").register(&pool);
        let out = ticks.expand(&slice, 0, &mut memory).unwrap();
        assert_eq!(out.num_rows(), 20);
    }

    #[test]
    fn pane_arithmetic_agrees_with_expansion() {
        let time_type = DataType::Timestamp(TimeUnit::Second, None);
        let ticks = WindowTicks::new(&spec(10, 4), &time_type).unwrap();
        // The pane [6, 8) is covered by the windows starting at 0 and 4, as above.
        let covering = ticks.covering(6);
        assert_eq!(covering, (0, 4));
        assert_eq!(ticks.count_starts(covering, i64::MAX), 2);
        // With the watermark at 10, [0, 10) has closed and [4, 14) has not.
        assert_eq!(ticks.count_starts(covering, 10 - ticks.size()), 1);
        assert_eq!(ticks.count_starts(covering, 14 - ticks.size()), 2);
        assert_eq!(ticks.count_starts(covering, -1), 0);
        assert_eq!(ticks.start_at_or_after(5), 8);
        assert_eq!(ticks.start_at_or_after(-3), 0);
    }

    /// Panes of rows out of order, before the epoch and null, as a division per row gives them.
    #[test]
    fn panes_of_unordered_rows() {
        let time_type = DataType::Timestamp(TimeUnit::Second, None);
        let ticks = WindowTicks::new(&spec(10, 4), &time_type).unwrap();
        let times = vec![
            Some(7),
            Some(6),
            Some(8),
            None,
            Some(5),
            Some(-1),
            Some(-2),
            Some(7),
        ];
        let t: ArrayRef = Arc::new(TimestampSecondArray::from(times.clone()));
        let panes = ticks.panes(&t).unwrap();
        let starts = cast(panes.as_struct().column(0), &DataType::Int64).unwrap();
        let got: Vec<Option<i64>> = starts.as_primitive::<Int64Type>().iter().collect();
        let want: Vec<Option<i64>> = times
            .iter()
            .map(|t| t.map(|t| t - t.rem_euclid(2)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn boundary_row_opens_the_next_window() {
        let time_type = DataType::Timestamp(TimeUnit::Second, None);
        let ticks = WindowTicks::new(&spec(10, 10), &time_type).unwrap();
        let t: ArrayRef = Arc::new(TimestampSecondArray::from(vec![9, 10]));
        let panes = ticks.panes(&t).unwrap();
        let starts = cast(panes.as_struct().column(0), &DataType::Int64).unwrap();
        assert_eq!(
            starts.as_primitive::<Int64Type>().values().to_vec(),
            vec![0, 10]
        );
    }
}
