//! From a streaming SELECT to the plans a query re-executes every batch.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{Aggregate, AggregateUDF, Expr, LogicalPlan, ScalarUDF, WindowUDF};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, GroupByExpr, Query, SetExpr, Statement as SqlStatement,
};

use super::join::{self, JoinOp};
use super::session;
use super::stateful::{EventTimeKey, StatefulOp};
use crate::catalog::SourceDef;
use crate::config::{OutputMode, partitions};
use crate::error::{BrookError, Result};
use crate::sink::GroupKeys;
use crate::sql::chain::{self, DEDUPLICATED, JOINED};
use crate::sql::incremental::{self, ROWS_COLUMN, WindowWidths};
use crate::sql::script::WatermarkSpec;
use crate::sql::session::{SESSION_COLUMN, rewrite_sessions};
use crate::sql::slot::Slot;
use crate::sql::window::{
    WINDOW_COLUMN, WindowSpec, WindowTicks, carry_window, rewrite_windows, unit_nanos, window_type,
};
use crate::state::QueryFingerprint;

/// The refusal of an aggregation over a join of two streams that is not the
/// SELECT whose FROM holds the join (see [`chain::split_join`]).
const NESTED_JOIN_AGGREGATE: &str = "an aggregation (GROUP BY or SELECT DISTINCT) over a join of \
     two streams runs in the SELECT whose FROM holds the join, not in a subquery or below \
     another join: write it so, or write the join's result to a sink and aggregate that";

pub enum CompiledPlan {
    Stateless(Arc<dyn ExecutionPlan>),
    Stateful(Box<StatefulOp>),
    Join(Box<JoinOp>),
}

/// A window the query groups by, and where its time column is in the source rows.
pub struct InputWindow {
    pub spec: WindowSpec,
    pub ticks: WindowTicks,
    pub time_column: usize,
}

/// A streaming source a query reads, the slot its rows are fed into, and
/// where its window's time column is.
pub struct Input {
    pub source: SourceDef,
    pub slot: Slot,
    pub window: Option<InputWindow>,
}

pub struct CompiledQuery {
    /// The streaming sources, in the order of their names.
    pub inputs: Vec<Input>,
    pub plan: CompiledPlan,
    pub output_schema: SchemaRef,
    pub mode: OutputMode,
    pub task_ctx: Arc<TaskContext>,
    /// The query as written, for progress and errors.
    pub sql: String,
    /// What a checkpoint written by this query must match on restart.
    pub fingerprint: QueryFingerprint,
    /// The stages after `plan`, in order, each run over the rows the one
    /// before it emitted in the same batch; the last one's rows are the output.
    pub then: Vec<Stage>,
    /// The logical plan of what the first stage runs over its input (the whole
    /// plan, or an aggregation's partial), which a cluster runs; `None` for a join.
    pub scan_plan: Option<LogicalPlan>,
    /// With `session_window(...)`: the rows dropped without a session (a gap
    /// not positive, or null) since the count was last taken.
    pub rows_without_session: Option<Arc<AtomicU64>>,
    /// The output columns that are the aggregation's group keys, for sinks
    /// that update rows in place.
    pub group_keys: GroupKeys,
}

/// A stage of a query after its first: its plan reads the rows the stage
/// before it emitted, as the first stage's reads the source's.
pub struct Stage {
    pub input_slot: Slot,
    pub window: Option<InputWindow>,
    pub plan: CompiledPlan,
    /// How far behind the query's watermark this stage's is: as far as the
    /// rows the stage before it emits can lag behind it.
    pub watermark_lag_ns: i64,
}

impl CompiledQuery {
    /// Every stage's plan, the first stage's first.
    pub fn plans(&self) -> Vec<&CompiledPlan> {
        std::iter::once(&self.plan)
            .chain(self.then.iter().map(|s| &s.plan))
            .collect()
    }

    pub fn plans_mut(&mut self) -> Vec<&mut CompiledPlan> {
        std::iter::once(&mut self.plan)
            .chain(self.then.iter_mut().map(|s| &mut s.plan))
            .collect()
    }

    /// Every stage's watermark, in the order of [`plans`](Self::plans), when
    /// the query's is `watermark_ns`.
    pub fn stage_watermarks(&self, watermark_ns: Option<i64>) -> Vec<Option<i64>> {
        std::iter::once(watermark_ns)
            .chain(
                self.then
                    .iter()
                    .map(|s| watermark_ns.map(|w| w.saturating_sub(s.watermark_lag_ns))),
            )
            .collect()
    }

    /// Every stage's window arithmetic, in the order of [`plans`](Self::plans).
    pub fn stage_ticks(&self) -> Vec<Option<&WindowTicks>> {
        std::iter::once(self.ticks())
            .chain(
                self.then
                    .iter()
                    .map(|s| s.window.as_ref().map(|w| &w.ticks)),
            )
            .collect()
    }

    /// The window arithmetic of the query's `window(...)`, the same for every input.
    pub fn ticks(&self) -> Option<&WindowTicks> {
        self.inputs
            .iter()
            .find_map(|i| i.window.as_ref())
            .map(|w| &w.ticks)
    }
}

impl InputWindow {
    /// `batch` of source rows with the `window` pane column added, as `schema` (the input slot's) has it.
    pub fn with_panes(&self, schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch> {
        let panes: ArrayRef = self.ticks.panes(batch.column(self.time_column))?;
        let mut columns = batch.columns().to_vec();
        columns.push(panes);
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

/// Functions registered on the engine, which every query's planning session gets.
#[derive(Clone, Default)]
pub struct UserFunctions {
    pub scalar: BTreeMap<String, Arc<ScalarUDF>>,
    pub aggregate: BTreeMap<String, Arc<AggregateUDF>>,
    pub window: BTreeMap<String, Arc<WindowUDF>>,
}

impl UserFunctions {
    pub fn contains(&self, name: &str) -> bool {
        self.scalar.contains_key(name)
            || self.aggregate.contains_key(name)
            || self.window.contains_key(name)
    }

    fn register(&self, ctx: &SessionContext) {
        for f in self.scalar.values() {
            ctx.register_udf(f.as_ref().clone());
        }
        for f in self.aggregate.values() {
            ctx.register_udaf(f.as_ref().clone());
        }
        for f in self.window.values() {
            ctx.register_udwf(f.as_ref().clone());
        }
    }

    /// The names of these functions that `plan` calls, subqueries included.
    fn used_by(&self, plan: &LogicalPlan) -> Result<BTreeSet<String>> {
        let mut used = BTreeSet::new();
        plan.apply_with_subqueries(|node| {
            node.apply_expressions(|expr| {
                expr.apply(|e| {
                    let name = match e {
                        Expr::ScalarFunction(f) => f.func.name(),
                        Expr::AggregateFunction(f) => f.func.name(),
                        Expr::WindowFunction(f) => f.fun.name(),
                        _ => return Ok(TreeNodeRecursion::Continue),
                    };
                    if self.contains(name) {
                        used.insert(name.to_string());
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
            })
        })?;
        Ok(used)
    }
}

fn session(
    partitions: usize,
    runtime: Arc<RuntimeEnv>,
    functions: &UserFunctions,
) -> SessionContext {
    let mut config = SessionConfig::new().with_target_partitions(partitions);
    // Plans are re-executed every batch; filters derived at run time must not leak into the next.
    config
        .options_mut()
        .optimizer
        .enable_dynamic_filter_pushdown = false;
    // A script's start pays for every optimizer pass over each of its plans. Over
    // the plans the tests make, a second pass only ever dropped a LIMIT that the
    // sort below it already applied.
    config.options_mut().optimizer.max_passes = 1;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    functions.register(&ctx);
    ctx
}

/// Plans `query` over the declared sources. `mode` is the requested output mode,
/// if any; the query's operators take their memory from `runtime`'s pool.
/// Static tables are planned as bounded tables, read again at each batch as
/// their providers decide. A deduplication feeding an aggregation is planned
/// as two stages (see [`chain`]).
pub async fn compile(
    query: &Query,
    sources: &BTreeMap<String, SourceDef>,
    statics: &BTreeMap<String, Arc<dyn TableProvider>>,
    mode: Option<OutputMode>,
    runtime: Arc<RuntimeEnv>,
    functions: &UserFunctions,
) -> Result<CompiledQuery> {
    let is_stream = |name: &str| sources.contains_key(name);
    // Refused before planning: the window column each stream's rows get
    // would be ambiguous in the join.
    if chain::aggregates_nested_stream_join(query, &is_stream) {
        return Err(BrookError::sql(NESTED_JOIN_AGGREGATE));
    }
    if let Some(joined) = chain::join_below_aggregate(query, &is_stream)
        && let Some(found) =
            joined_columns(&joined, sources, statics, runtime.clone(), functions).await?
    {
        return compile_join_chain(query, found, sources, statics, mode, runtime, functions).await;
    }
    let Some(chain) = chain::split_deduplication(query, &is_stream)? else {
        return compile_stage(query, sources, statics, mode, runtime, functions).await;
    };
    // Rows a stage passes on are final: the first stage appends, as a
    // deduplication does by default.
    let first = compile_stage(
        &chain.first,
        sources,
        statics,
        None,
        runtime.clone(),
        functions,
    )
    .await?;
    let deduplicates = matches!(&first.plan, CompiledPlan::Stateful(op) if op.dedup);
    if !deduplicates || first.mode != OutputMode::Append {
        // A row number over groups, say: planned whole, it is refused for what it is.
        return compile_stage(query, sources, statics, mode, runtime, functions).await;
    }
    let [input] = &first.inputs[..] else {
        return Err(BrookError::sql(
            "a deduplication feeding an aggregation reads one stream; deduplicate each \
             stream of a UNION ALL in a query of its own",
        ));
    };
    let source = &input.source;
    // The deduplicated rows keep the source's watermark if they keep its column.
    let time_type = |schema: &SchemaRef, column: &str| {
        schema
            .field_with_name(column)
            .ok()
            .map(|f| f.data_type().clone())
    };
    let watermark = source.watermark.clone().filter(|wm| {
        time_type(&first.output_schema, &wm.column) == time_type(&source.read_schema(), &wm.column)
    });
    let deduplicated = SourceDef {
        name: DEDUPLICATED.to_string(),
        schema: first.output_schema.clone(),
        watermark,
        ..source.clone()
    };
    let rest_sources = BTreeMap::from([(DEDUPLICATED.to_string(), deduplicated)]);
    let rest = compile_stage(
        &chain.rest,
        &rest_sources,
        statics,
        mode,
        runtime,
        functions,
    )
    .await?;
    chained(query, first, rest)
}

/// `first` feeding `rest`, a query of two stages.
fn chained(query: &Query, first: CompiledQuery, mut rest: CompiledQuery) -> Result<CompiledQuery> {
    let Some(Input {
        slot: rest_slot,
        window: rest_window,
        ..
    }) = rest.inputs.pop()
    else {
        return Err(BrookError::internal(
            "the second stage of a query reads nothing",
        ));
    };
    let mut fingerprint = first.fingerprint;
    fingerprint.group_by.push("then".into());
    fingerprint.group_by.extend(rest.fingerprint.group_by);
    fingerprint.aggregates.extend(rest.fingerprint.aggregates);
    fingerprint.functions.extend(rest.fingerprint.functions);
    fingerprint.functions.sort();
    fingerprint.functions.dedup();
    Ok(CompiledQuery {
        inputs: first.inputs,
        plan: first.plan,
        output_schema: rest.output_schema,
        mode: rest.mode,
        task_ctx: rest.task_ctx,
        sql: query.to_string(),
        fingerprint,
        then: vec![Stage {
            input_slot: rest_slot,
            window: rest_window,
            plan: rest.plan,
            watermark_lag_ns: 0,
        }],
        rows_without_session: rest.rows_without_session,
        group_keys: rest.group_keys,
        scan_plan: first.scan_plan,
    })
}

/// The columns a join of two streams under an aggregation emits (`joined`,
/// its FROM and WHERE), and the watermark columns among them, each with its
/// source's watermark; `None` when `joined` is no join of two streams.
type JoinedColumns = (Vec<chain::JoinedColumn>, Vec<JoinedWatermark>);

/// A watermark column of a join's rows: its name there, its source's
/// watermark, and the source.
struct JoinedWatermark {
    column: String,
    spec: WatermarkSpec,
    source: String,
}

async fn joined_columns(
    joined: &Query,
    sources: &BTreeMap<String, SourceDef>,
    statics: &BTreeMap<String, Arc<dyn TableProvider>>,
    runtime: Arc<RuntimeEnv>,
    functions: &UserFunctions,
) -> Result<Option<JoinedColumns>> {
    let ctx = session(1, runtime, functions);
    for (name, def) in sources {
        let slot = Slot::new(&def.read_schema());
        ctx.register_table(TableReference::bare(name.as_str()), slot.table(1))?;
    }
    for (name, table) in statics {
        if !sources.contains_key(name) {
            ctx.register_table(TableReference::bare(name.as_str()), table.clone())?;
        }
    }
    let statement = DFStatement::Statement(Box::new(SqlStatement::Query(Box::new(joined.clone()))));
    // A query that does not plan is left whole, to fail with its own error.
    let Ok(plan) = ctx.state().statement_to_plan(statement).await else {
        return Ok(None);
    };
    let is_stream = |name: &str| sources.contains_key(name);
    if join::find_stream_join(&plan, &is_stream)?.is_none() {
        return Ok(None);
    }
    // Which table (alias) reads which stream.
    let mut tables: Vec<(String, String)> = vec![];
    plan.apply(|node| {
        match node {
            LogicalPlan::SubqueryAlias(a) => {
                if let LogicalPlan::TableScan(scan) = a.input.as_ref() {
                    tables.push((a.alias.table().into(), scan.table_name.table().into()));
                }
            }
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table().to_string();
                tables.push((name.clone(), name));
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let schema = plan.schema();
    let mut columns = vec![];
    for (table, field) in schema.iter() {
        let Some(table) = table else {
            return Ok(None);
        };
        let name = field.name();
        let shared = schema.fields().iter().filter(|f| f.name() == name).count() > 1;
        columns.push(chain::JoinedColumn {
            table: table.table().to_string(),
            name: name.clone(),
            renamed: match shared {
                true => format!("{}.{name}", table.table()),
                false => name.clone(),
            },
        });
    }
    let watermarks = columns
        .iter()
        .filter_map(|c| {
            let (_, source) = tables.iter().find(|(t, _)| *t == c.table)?;
            let wm = sources.get(source)?.watermark.as_ref()?;
            (wm.column == c.name).then(|| JoinedWatermark {
                column: c.renamed.clone(),
                spec: wm.clone(),
                source: source.to_string(),
            })
        })
        .collect();
    Ok(Some((columns, watermarks)))
}

/// An aggregation (or DISTINCT) over a join of two streams, as Spark runs
/// it: the join appends each pair once, the aggregation reads the pairs as a
/// source's rows, under the query's watermark.
async fn compile_join_chain(
    query: &Query,
    (columns, watermarks): JoinedColumns,
    sources: &BTreeMap<String, SourceDef>,
    statics: &BTreeMap<String, Arc<dyn TableProvider>>,
    mode: Option<OutputMode>,
    runtime: Arc<RuntimeEnv>,
    functions: &UserFunctions,
) -> Result<CompiledQuery> {
    let chain = chain::split_join(query, &columns)?;
    let first = compile_stage(
        &chain.first,
        sources,
        statics,
        None,
        runtime.clone(),
        functions,
    )
    .await?;
    let Some(input) = first.inputs.first() else {
        return Err(BrookError::internal("a join of two streams reads nothing"));
    };
    // The join's rows keep both sides' event times: the aggregation's
    // watermark column is the one its window, its session or its GROUP BY is over.
    let mut rest_query = chain.rest.clone();
    let session = rewrite_sessions(&mut rest_query)?.map(|s| s.time_column);
    let window = session.or(rewrite_windows(&mut rest_query)?.map(|w| w.time_column));
    let mut keys = vec![];
    if let SetExpr::Select(select) = rest_query.body.as_ref()
        && let GroupByExpr::Expressions(exprs, _) = &select.group_by
    {
        keys = exprs
            .iter()
            .filter_map(|e| match e {
                SqlExpr::Identifier(id) => Some(id.value.clone()),
                _ => None,
            })
            .collect();
    }
    let chosen = watermarks
        .iter()
        .find(|w| window.as_ref() == Some(&w.column))
        .or_else(|| watermarks.iter().find(|w| keys.contains(&w.column)))
        .or(watermarks.first());
    let joined = SourceDef {
        name: JOINED.to_string(),
        schema: first.output_schema.clone(),
        watermark: chosen.map(|w| WatermarkSpec {
            column: w.column.clone(),
            delay: w.spec.delay,
        }),
        idle_timeout: None,
        kind: input.source.kind.clone(),
    };
    let rest_sources = BTreeMap::from([(JOINED.to_string(), joined)]);
    let rest = compile_stage(
        &chain.rest,
        &rest_sources,
        statics,
        mode,
        runtime,
        functions,
    )
    .await?;
    // As Spark since 3.5, the aggregation's watermark is held back by as far as
    // the join's pairs can lag behind the query's on that column: no pair of an
    // inner join is then late for it.
    let CompiledPlan::Join(join) = &first.plan else {
        return Err(BrookError::internal(
            "the first stage of a join chain is no join",
        ));
    };
    let lag_ns = match chosen {
        Some(w) => {
            let sides = join.inputs();
            let side = sides
                .iter()
                .position(|&i| {
                    first
                        .inputs
                        .get(i)
                        .is_some_and(|x| x.source.name == w.source)
                })
                .ok_or_else(|| {
                    BrookError::internal("a join's watermark column is on neither side")
                })?;
            join.lag_ns(side)
        }
        None => 0,
    };
    let mut compiled = chained(query, first, rest)?;
    for stage in &mut compiled.then {
        stage.watermark_lag_ns = lag_ns;
    }
    Ok(compiled)
}

async fn compile_stage(
    query: &Query,
    sources: &BTreeMap<String, SourceDef>,
    statics: &BTreeMap<String, Arc<dyn TableProvider>>,
    mode: Option<OutputMode>,
    runtime: Arc<RuntimeEnv>,
    functions: &UserFunctions,
) -> Result<CompiledQuery> {
    let sql = query.to_string();
    let mut query = query.clone();
    let is_stream = |name: &str| sources.contains_key(name);
    carry_window(&mut query, SESSION_COLUMN, &is_stream)?;
    // Before `window(...)` is rewritten, so that a query using both is refused.
    let sessions = rewrite_sessions(&mut query)?;
    carry_window(&mut query, WINDOW_COLUMN, &is_stream)?;
    let window = rewrite_windows(&mut query)?;
    let partitions = partitions();
    let ctx = session(partitions, runtime, functions);
    let mut slots = BTreeMap::new();
    for (name, def) in sources {
        let read = def.read_schema();
        let mut fields: Vec<Field> = read.fields().iter().map(|f| f.as_ref().clone()).collect();
        if let Some(w) = &window {
            // A source without the time column gets a window too, so that the
            // query plans and the check below names the column and the source
            // (planning would fail on `window.start` instead).
            let time = read
                .field_with_name(&w.time_column)
                .map_or(DataType::Timestamp(TimeUnit::Nanosecond, None), |t| {
                    t.data_type().clone()
                });
            fields.push(Field::new(WINDOW_COLUMN, window_type(&time), true));
        }
        let slot = Slot::new(&Schema::new(fields));
        let table = match &sessions {
            Some(spec) => session::planning_table(&slot, spec, partitions),
            None => slot.table(partitions),
        };
        // By its name as it is: parsing it again would lower-case a quoted name.
        ctx.register_table(TableReference::bare(name.as_str()), table)?;
        slots.insert(name.clone(), slot);
    }
    for (name, table) in statics {
        if !sources.contains_key(name) {
            ctx.register_table(TableReference::bare(name.as_str()), table.clone())?;
        }
    }
    let statement = DFStatement::Statement(Box::new(SqlStatement::Query(Box::new(query))));
    let mut plan = ctx.state().statement_to_plan(statement).await?;
    let rows_without_session = sessions.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
    if let (Some(spec), Some(dropped)) = (&sessions, &rows_without_session) {
        plan = session::with_session_column(
            plan,
            spec,
            sources,
            &slots,
            &ctx.state(),
            partitions,
            dropped,
        )?;
    }
    // After the sessions' column is planned: its gap may call a registered function.
    let used_functions = functions.used_by(&plan)?;
    incremental::check_tables(&plan, &is_stream)?;
    let (plan, dedup) = incremental::distinct_as_aggregate(plan, &is_stream)?;

    let names = stream_sources(&plan, sources)?;
    let mut inputs = vec![];
    let mut query_window: Option<(WindowSpec, WindowTicks, DataType)> = None;
    for name in &names {
        let source = sources[name].clone();
        let read_schema = source.read_schema();
        let window = match &window {
            None => None,
            Some(spec) => {
                let time_column = read_schema.index_of(&spec.time_column).map_err(|_| {
                    BrookError::sql(format!(
                        "window(...) uses '{}', which is not a column of '{name}'",
                        spec.time_column
                    ))
                })?;
                let time_type = read_schema.field(time_column).data_type();
                let ticks = WindowTicks::new(spec, time_type)?;
                match &query_window {
                    Some((_, _, first)) if first != time_type => {
                        return Err(BrookError::sql(format!(
                            "window(...) over '{}' needs the same timestamp type in every \
                             source; '{name}' has {time_type}",
                            spec.time_column
                        )));
                    }
                    Some(_) => {}
                    None => query_window = Some((spec.clone(), ticks.clone(), time_type.clone())),
                }
                Some(InputWindow {
                    spec: spec.clone(),
                    ticks,
                    time_column,
                })
            }
        };
        inputs.push(Input {
            slot: slots[name].clone(),
            source,
            window,
        });
    }
    let window = query_window.map(|(spec, ticks, _)| (spec, ticks));

    // Physical planning is most of a query's start: each plan is made on a task
    // of its own, so that a query's plans, and a script's queries, use all cores.
    // The tasks share one state: a copy would copy its function registries.
    let state = Arc::new(ctx.state());
    let physical = |logical: LogicalPlan| {
        let state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let optimized = state.optimize(&logical)?;
            Ok::<_, BrookError>(state.create_physical_plan(&optimized).await?)
        });
        async move {
            task.await
                .map_err(|e| BrookError::task("the planning task", e))?
        }
    };
    let task_ctx = ctx.task_ctx();
    let stream_join = join::find_stream_join(&plan, &is_stream)?;
    let Some(agg) = incremental::find_aggregate(&plan, &is_stream)? else {
        incremental::check_stateless(&plan, &is_stream)?;
        if sessions.is_some() {
            return Err(BrookError::sql(SESSION_NEEDS_GROUP_BY));
        }
        if let Some((spec, _)) = &window
            && spec.is_sliding()
        {
            return Err(BrookError::sql(
                "sliding windows need GROUP BY window(...): without it a row would belong to several windows",
            ));
        }
        let mode = match mode.unwrap_or(OutputMode::Append) {
            OutputMode::Complete => {
                return Err(BrookError::sql(
                    "output mode 'complete' needs an aggregation (GROUP BY); \
                     a query without one can only append",
                ));
            }
            m => m,
        };
        let mut fingerprint = fingerprint(&inputs, None, None, false);
        fingerprint.functions = used_functions.into_iter().collect();
        let scan_plan = stream_join.is_none().then(|| plan.clone());
        let plan = match &stream_join {
            Some(found) => {
                let sources: Vec<join::JoinInput> =
                    inputs.iter().map(|i| (&i.source, &i.slot)).collect();
                let spec = join::JoinSpec::new(found, &sources, mode)?;
                let op = match spec.preserved() {
                    Some(side) => {
                        let input = &inputs[spec.input(side)];
                        let marked = join::marked_slot(&input.slot);
                        let (inner, semi) = join::outer_plans(
                            &plan,
                            &found.join,
                            side,
                            &input.source.name,
                            marked.table(partitions),
                        )?;
                        let (padded, inner, semi) =
                            (physical(plan), physical(inner), physical(semi));
                        let padded = padded.await?;
                        let outer = join::OuterPlans::new(side, padded, semi.await?, marked);
                        JoinOp::new(spec, inner.await?, Some(outer))
                    }
                    None => JoinOp::new(spec, physical(plan).await?, None),
                };
                CompiledPlan::Join(Box::new(op))
            }
            None => CompiledPlan::Stateless(physical(plan).await?),
        };
        let output_schema = match &plan {
            CompiledPlan::Join(op) => op.output_schema(),
            CompiledPlan::Stateless(plan) => plan.schema(),
            CompiledPlan::Stateful(op) => op.finalize.schema(),
        };
        return Ok(CompiledQuery {
            fingerprint,
            inputs,
            output_schema,
            plan,
            mode,
            task_ctx,
            sql,
            then: vec![],
            rows_without_session: None,
            group_keys: GroupKeys::None,
            scan_plan,
        });
    };
    if stream_join.is_some() {
        return Err(BrookError::sql(NESTED_JOIN_AGGREGATE));
    }

    // A column is never null when every source that has it declares it NOT NULL.
    let mut not_null = HashSet::new();
    let mut nullable = HashSet::new();
    for def in sources.values() {
        for f in def.read_schema().fields() {
            let names = if f.is_nullable() {
                &mut nullable
            } else {
                &mut not_null
            };
            names.insert(f.name().clone());
        }
    }
    not_null.retain(|n| !nullable.contains(n));
    let has_order = has_sort_or_limit(&plan);
    let mode = mode.unwrap_or(if dedup {
        OutputMode::Append
    } else if has_order {
        OutputMode::Complete
    } else {
        OutputMode::Update
    });
    if dedup && (has_order || mode == OutputMode::Complete) {
        return Err(BrookError::sql(
            "SELECT DISTINCT over a stream emits each row once, when it is first seen: \
             it runs in output mode 'append' (or 'update'), without ORDER BY or LIMIT",
        ));
    }
    // A deduplicated window is a key like any other: its rows are not spread over panes.
    let window_key = agg
        .group_expr
        .iter()
        .position(|e| is_column(e, WINDOW_COLUMN))
        .filter(|_| !dedup);
    // The first input whose watermark column is a group key (all of them, in a UNION).
    let mut event_time_key = None;
    for input in &inputs {
        let Some(wm) = &input.source.watermark else {
            continue;
        };
        let unit = unit_nanos(
            input
                .source
                .read_schema()
                .field_with_name(&wm.column)?
                .data_type(),
        )?;
        let on_window = window_key.filter(|_| {
            window
                .as_ref()
                .is_some_and(|(spec, _)| spec.time_column == wm.column)
        });
        event_time_key = match on_window {
            Some(column) => Some(EventTimeKey {
                column,
                is_window: true,
                unit_nanos: unit,
            }),
            None => agg
                .group_expr
                .iter()
                .position(|e| is_column(e, &wm.column))
                .map(|column| EventTimeKey {
                    column,
                    is_window: false,
                    unit_nanos: unit,
                }),
        };
        if event_time_key.is_some() {
            break;
        }
    }
    let session_key = match &sessions {
        Some(spec) => {
            let key = agg
                .group_expr
                .iter()
                .position(|e| is_column(e, SESSION_COLUMN))
                .filter(|_| !dedup)
                .ok_or_else(|| BrookError::sql(SESSION_NEEDS_GROUP_BY))?;
            // A session closes when the watermark on its time column passes its end.
            event_time_key = None;
            for input in &inputs {
                let read = input.source.read_schema();
                if let Some(wm) = &input.source.watermark
                    && wm.column == spec.time_column
                {
                    let time = read.field_with_name(&wm.column)?;
                    event_time_key = Some(EventTimeKey {
                        column: key,
                        is_window: true,
                        unit_nanos: unit_nanos(time.data_type())?,
                    });
                    break;
                }
            }
            if mode == OutputMode::Append && event_time_key.is_none() {
                return Err(BrookError::sql(format!(
                    "output mode 'append' for session_window(...) needs a watermark on '{}', \
                     so that sessions can be closed (as in Spark); use 'update' or \
                     'complete', or declare WATERMARK FOR {0} AS {0} - INTERVAL '...' on the \
                     source",
                    spec.time_column
                )));
            }
            Some(key)
        }
        None => None,
    };
    let panes = mode == OutputMode::Append
        && event_time_key.as_ref().is_some_and(|k| k.is_window)
        && window
            .as_ref()
            .is_some_and(|(_, ticks)| ticks.overlapping());
    let widths = window_key
        .zip(window.as_ref())
        .map(|(key, (_, ticks))| WindowWidths {
            key,
            partial: ticks.pane(),
            merge: (!panes).then(|| ticks.size()),
        });
    let split = incremental::split(&plan, &agg, partitions, &not_null, widths, dedup)?;
    if mode == OutputMode::Append && event_time_key.is_none() && !dedup {
        let mut watermarked = vec![];
        plan.apply(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Some(w) = sources
                    .get(scan.table_name.table())
                    .and_then(|d| d.watermark.as_ref())
            {
                watermarked.push(w.column.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        // With a watermark declared, the GROUP BY is what misses it.
        let fix = match watermarked.first() {
            Some(column) => format!(
                "the watermark is on '{column}', which this GROUP BY does not group by (a key \
                 computed from it, such as date_trunc('minute', {column}), is not known to \
                 close): group by window({column}, '1 minute') or by {column}, or use \
                 'update' or 'complete'"
            ),
            None => "use 'update' or 'complete', or declare WATERMARK FOR <column> AS \
                     <column> - INTERVAL '...' on the source"
                .to_string(),
        };
        return Err(BrookError::sql(format!(
            "output mode 'append' for an aggregation needs a watermark on the source and a \
             GROUP BY on its event time or on window(...) over it, so that groups can be \
             closed (as in Spark); {fix}"
        )));
    }
    if has_order && mode == OutputMode::Update {
        return Err(BrookError::sql(
            "ORDER BY and LIMIT over an aggregation need output mode 'complete' (or 'append' with a watermark)",
        ));
    }
    let rows_column = split
        .partial
        .schema()
        .index_of_column_by_name(None, ROWS_COLUMN)
        .ok_or_else(|| BrookError::internal("partial aggregation lost its row count"))?;
    let scan_plan = Some(split.partial.clone());
    let (partial, merge, finalize) = (
        physical(split.partial),
        physical(split.merge),
        physical(split.finalize),
    );
    let op = StatefulOp {
        partial: partial.await?,
        merge: merge.await?,
        finalize: finalize.await?,
        state_slot: split.state_slot,
        delta_slot: split.delta_slot,
        emit_slot: split.emit_slot,
        window_key,
        event_time_key,
        rows_column,
        keys: split.keys,
        invertible: split.invertible,
        state_columns: split.state_columns,
        running: None,
        state: vec![],
        panes,
        emitted_through_ns: None,
        dedup,
        session_key,
        remote: None,
    };
    let mut fingerprint = fingerprint(
        &inputs,
        Some(&agg),
        window.as_ref().map(|(spec, _)| spec),
        panes,
    );
    if let (Some(key), Some(spec)) = (session_key, &sessions) {
        fingerprint.group_by[key] = spec.describe();
    }
    fingerprint.functions = used_functions.into_iter().collect();
    if dedup {
        // The same keys as a GROUP BY without aggregates, but other state.
        fingerprint.aggregates.push("SELECT DISTINCT".into());
    }
    Ok(CompiledQuery {
        fingerprint,
        inputs,
        group_keys: group_keys(&plan, &agg),
        output_schema: op.finalize.schema(),
        plan: CompiledPlan::Stateful(Box::new(op)),
        mode,
        task_ctx,
        sql,
        then: vec![],
        rows_without_session,
        scan_plan,
    })
}

/// The parts of a query its checkpointed state depends on. `panes`: the state
/// holds panes rather than windows, so a checkpoint of the other kind cannot be used.
fn fingerprint(
    inputs: &[Input],
    agg: Option<&Aggregate>,
    window: Option<&WindowSpec>,
    panes: bool,
) -> QueryFingerprint {
    // One source is described as it always was, so that its checkpoints stay usable.
    let source = inputs
        .iter()
        .map(|input| {
            let source = &input.source;
            let columns: Vec<String> = source
                .schema
                .fields()
                .iter()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect();
            format!(
                "{} {} ({})",
                source.name,
                source.identity(),
                columns.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let group_by = agg.map_or(vec![], |a| {
        a.group_expr
            .iter()
            .map(|e| match (window, is_column(e, WINDOW_COLUMN)) {
                (Some(w), true) => format!(
                    "window({}, {:?}, {:?}, {:?}){}",
                    w.time_column,
                    w.size,
                    w.slide,
                    w.offset,
                    if panes { " kept in panes" } else { "" }
                ),
                _ => e.schema_name().to_string(),
            })
            .collect()
    });
    let aggregates = agg.map_or(vec![], |a| {
        a.aggr_expr
            .iter()
            .map(|e| e.schema_name().to_string())
            .collect()
    });
    QueryFingerprint {
        source,
        group_by,
        aggregates,
        functions: vec![],
        state_partitions: None,
    }
}

/// The output columns of `plan` that are `agg`'s group keys, traced down
/// through the projections, filters and sorts above it. A window's `start`
/// or `end` stands for the window: each names one window of the query.
fn group_keys(plan: &LogicalPlan, agg: &Aggregate) -> GroupKeys {
    let schema = plan.schema();
    let mut found: Vec<Option<String>> = vec![None; agg.group_expr.len()];
    for i in 0..schema.fields().len() {
        if let Some(key) = key_at(plan, i, agg)
            && let Some(slot) = found.get_mut(key)
            && slot.is_none()
        {
            *slot = Some(schema.field(i).name().clone());
        }
    }
    let missing: Vec<String> = agg
        .group_expr
        .iter()
        .zip(&found)
        .filter(|(_, column)| column.is_none())
        .map(|(e, _)| e.schema_name().to_string())
        .collect();
    if missing.is_empty() {
        GroupKeys::Columns(found.into_iter().flatten().collect())
    } else {
        GroupKeys::Missing(missing)
    }
}

/// Which of `agg`'s group keys column `i` of `plan` is, if it is one.
fn key_at(plan: &LogicalPlan, i: usize, agg: &Aggregate) -> Option<usize> {
    match plan {
        LogicalPlan::Aggregate(a) if a == agg => (i < a.group_expr.len()).then_some(i),
        LogicalPlan::Projection(p) => {
            let column = match p.expr.get(i)?.clone().unalias_nested().data {
                Expr::Column(c) => c,
                Expr::ScalarFunction(f) if f.name() == "get_field" => match f.args.first()? {
                    Expr::Column(c) if c.name == WINDOW_COLUMN || c.name == SESSION_COLUMN => {
                        c.clone()
                    }
                    _ => return None,
                },
                _ => return None,
            };
            let j = p.input.schema().index_of_column(&column).ok()?;
            key_at(&p.input, j, agg)
        }
        LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Repartition(_)
        | LogicalPlan::Window(_) => key_at(plan.inputs().first()?, i, agg),
        _ => None,
    }
}

const SESSION_NEEDS_GROUP_BY: &str = "session_window(...) groups an aggregation: write it in \
     GROUP BY (GROUP BY session_window(time, '5 minutes'), key), not in a query without one \
     or a SELECT DISTINCT";

fn is_column(e: &Expr, name: &str) -> bool {
    matches!(e, Expr::Column(c) if c.name == name)
}

fn has_sort_or_limit(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply(|n| {
        found |= matches!(n, LogicalPlan::Sort(_) | LogicalPlan::Limit(_));
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// The streaming sources a query reads, in the order of their names.
fn stream_sources(
    plan: &LogicalPlan,
    sources: &BTreeMap<String, SourceDef>,
) -> Result<Vec<String>> {
    let mut names = BTreeSet::new();
    plan.apply(|n| {
        if let LogicalPlan::TableScan(scan) = n {
            names.insert(scan.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let names: Vec<String> = names
        .into_iter()
        .filter(|n| sources.contains_key(n))
        .collect();
    if names.is_empty() {
        return Err(BrookError::sql(format!(
            "the query reads no streaming source; declared sources: {}",
            sources.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(names)
}
