//! The entry point: declare sources and sinks, start queries, query memory tables.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::common::utils::quote_identifier;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{
    AggregateUDF, CreateExternalTable, DdlStatement, LogicalPlan, ScalarUDF, WindowUDF,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::planner::object_name_to_table_reference;
use datafusion::sql::sqlparser::ast::{Query, Statement as SqlStatement, TableObject};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::catalog::{SinkDef, SourceDef, SourceKind, StaticDef, hold_parquet_compression};
use crate::config::{OutputMode, Trigger, WatermarkPolicy};
use crate::error::{BrookError, Result};
use crate::exec::cluster::{
    Cluster, ClusterPart, ClusterQuery, DEFAULT_STATE_PARTITIONS, MAX_STATE_PARTITIONS,
};
use crate::exec::compile::{CompiledPlan, CompiledQuery, UserFunctions, compile};
use crate::exec::query::{Gate, ProgressListener};
use crate::exec::stateful::RemoteState;
use crate::exec::{QueryOptions, StreamingQuery};
use crate::progress::{Monitored, QueryInfo, QueryProgress};
use crate::sink::{ConsoleSink, ForeachBatchSink, MemorySink, MirrorSink, Sink};
use crate::source::SharedInput;
use crate::source::malformed::DEFAULT_CORRUPT_COLUMN;
use crate::source::{DecodeOptions, FileFormat, FileSourceOptions, ParseMode};
use crate::sql::depth::{parse_query, parse_statements};
use crate::sql::script::{WatermarkSpec, extract_watermark, split_statements};
use crate::state::Checkpoint;
use crate::state::checkpoint::{QueryFingerprint, new_id};

/// A query's plan being made on a task of its own; given up when dropped unawaited.
struct Planning {
    task: JoinHandle<Result<CompiledQuery>>,
    /// The bounded tables the query reads as static tables.
    reads: Vec<String>,
}

impl Drop for Planning {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Planning {
    async fn done(mut self) -> Result<CompiledQuery> {
        match (&mut self.task).await {
            Ok(compiled) => compiled,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(BrookError::task("planning the query", e)),
        }
    }
}

/// A query statement of a script, planned while the statements after it are read.
struct Planned {
    sink: SinkDef,
    compiling: Planning,
    /// The bounded table the query writes as its sink.
    writes: Option<String>,
}

/// What reading a statement of a script did.
enum Read {
    Nothing,
    Declared(Declared),
    Query(Planned),
}

/// A source or sink a script declared, with what its name meant before, to undo it.
enum Declared {
    Source(String, Option<SourceDef>),
    /// A bounded table: its sink (if its options make one) and its declaration before.
    Bounded(String, Option<SinkDef>, Option<Box<CreateExternalTable>>),
}

#[derive(Default)]
struct Catalog {
    sources: BTreeMap<String, SourceDef>,
    sinks: BTreeMap<String, SinkDef>,
    queries: Vec<Arc<StreamingQuery>>,
    /// Programs other than SQL queries that monitors list.
    monitored: Vec<Arc<dyn Monitored>>,
    memory_tables: BTreeMap<String, MemorySink>,
    /// Bounded tables a script declared: each a sink if a statement inserts
    /// into it, a static table if a query reads it, never both.
    bounded: BTreeMap<String, CreateExternalTable>,
    /// Tables registered from Rust, read by streaming queries as static tables.
    tables: BTreeMap<String, Arc<dyn TableProvider>>,
    /// Bounded tables an `INSERT INTO` writes, and those a query reads as
    /// static tables, with how many queries do (those that failed to start let go).
    written: BTreeMap<String, usize>,
    read: BTreeMap<String, usize>,
    /// Functions registered from Rust, which every query is planned with.
    functions: UserFunctions,
}

/// Progress records kept for a subscriber that falls behind (the web UI's event stream).
const PROGRESS_EVENTS: usize = 1024;

/// Settings that win over what a script's sink tables say (the CLI's flags).
#[derive(Default, Clone)]
pub struct Overrides {
    pub trigger: Option<Trigger>,
    pub listeners: Vec<ProgressListener>,
    /// A directory (or object-store URL) holding one checkpoint per query, named after it.
    pub checkpoint_root: Option<String>,
    /// Also keep the last this many output rows of each query whose sink is not a
    /// memory table in a memory table named after the query (for the web UI).
    pub mirror_rows: Option<usize>,
    /// Bytes the queries' operators may hold together; a query needing more
    /// fails with an error naming them. Default: half the machine's memory.
    pub memory_limit: Option<usize>,
    /// A Ballista cluster's scheduler (`df://HOST:PORT`, as `brook scheduler`
    /// runs it) on which every query's batches read their input and, where
    /// the executors can, run their plan and keep their aggregation's state;
    /// the sink stays here.
    pub cluster: Option<String>,
    /// With `cluster`: the partitions a new checkpoint's aggregation state is
    /// cut into on the executors (default 4). A checkpoint keeps the count it
    /// was created with, as Spark's keeps `spark.sql.shuffle.partitions`.
    pub state_partitions: Option<usize>,
}

/// Builds an [`Engine`] with the settings of [`Overrides`], one at a time.
#[derive(Default)]
pub struct EngineBuilder {
    overrides: Overrides,
}

impl EngineBuilder {
    /// Runs every query's batches on the Ballista cluster whose scheduler is
    /// at `url` (`df://HOST:PORT`), as `brook run --cluster` does.
    pub fn cluster(mut self, url: &str) -> Self {
        self.overrides.cluster = Some(url.to_string());
        self
    }

    /// With [`cluster`](Self::cluster): the partitions a new checkpoint's
    /// aggregation state is cut into on the executors (default 4).
    pub fn state_partitions(mut self, partitions: usize) -> Self {
        self.overrides.state_partitions = Some(partitions);
        self
    }

    /// Keeps each query's checkpoint under `root`, named after the query.
    pub fn checkpoint_root(mut self, root: &str) -> Self {
        self.overrides.checkpoint_root = Some(root.to_string());
        self
    }

    /// Bytes the queries' operators may hold together.
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.overrides.memory_limit = Some(bytes);
        self
    }

    /// The trigger of every query, whatever its sink table says.
    pub fn trigger(mut self, trigger: Trigger) -> Self {
        self.overrides.trigger = Some(trigger);
        self
    }

    pub fn build(self) -> Engine {
        Engine::with_overrides(self.overrides)
    }
}

/// A brook session: streaming sources and sinks, the queries running over them,
/// and a DataFusion context in which memory sinks are tables.
pub struct Engine {
    ctx: SessionContext,
    catalog: Mutex<Catalog>,
    overrides: Overrides,
    shared: SharedInput,
    progress: broadcast::Sender<QueryProgress>,
    /// Connected at the first query's start.
    cluster: tokio::sync::OnceCell<Arc<Cluster>>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

impl Engine {
    pub fn new() -> Self {
        Self::with_overrides(Overrides::default())
    }

    /// An engine with settings: `Engine::builder().cluster("df://host:50050").build()`.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    pub fn with_overrides(overrides: Overrides) -> Self {
        let mut config = datafusion::prelude::SessionConfig::new();
        // Sources decode text into Utf8 columns; keep VARCHAR as Utf8 in table definitions.
        config.options_mut().sql_parser.map_string_types_to_utf8view = false;
        let runtime = RuntimeEnv {
            memory_pool: crate::memory::pool(
                overrides
                    .memory_limit
                    .unwrap_or_else(crate::memory::default_limit),
            ),
            ..RuntimeEnv::default()
        };
        Self {
            ctx: SessionContext::new_with_config_rt(config, Arc::new(runtime)),
            catalog: Mutex::default(),
            overrides,
            shared: SharedInput::default(),
            progress: broadcast::channel(PROGRESS_EVENTS).0,
            cluster: tokio::sync::OnceCell::new(),
        }
    }

    /// The DataFusion session where memory sinks are registered as tables.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registers a scalar function for streaming queries and [`sql`](Self::sql),
    /// as DataFusion's `SessionContext::register_udf` does for batch queries.
    pub fn register_udf(&self, f: ScalarUDF) -> Result<()> {
        self.ctx.register_udf(f.clone());
        let name = f.name().to_string();
        self.catalog()?.functions.scalar.insert(name, Arc::new(f));
        Ok(())
    }

    /// Registers an aggregate function for streaming queries and [`sql`](Self::sql).
    pub fn register_udaf(&self, f: AggregateUDF) -> Result<()> {
        self.ctx.register_udaf(f.clone());
        let name = f.name().to_string();
        self.catalog()?
            .functions
            .aggregate
            .insert(name, Arc::new(f));
        Ok(())
    }

    /// Registers a window function for streaming queries and [`sql`](Self::sql).
    pub fn register_udwf(&self, f: WindowUDF) -> Result<()> {
        self.ctx.register_udwf(f.clone());
        let name = f.name().to_string();
        self.catalog()?.functions.window.insert(name, Arc::new(f));
        Ok(())
    }

    /// A registered function that the query of the checkpoint whose
    /// fingerprint is `recorded` calls and this engine lacks: the query would
    /// not plan, or would plan with a built-in function of that name.
    fn lacking_function(&self, recorded: Option<&QueryFingerprint>) -> Result<Option<String>> {
        let catalog = self.catalog()?;
        Ok(recorded.and_then(|f| {
            f.functions
                .iter()
                .find(|f| !catalog.functions.contains(f))
                .cloned()
        }))
    }

    /// Where a query's state is kept on the cluster, as its checkpoint (whose
    /// fingerprint is `recorded`) was created: the partitions it is cut into
    /// on the executors, or `None` for a checkpoint whose state the driver
    /// keeps (created without a cluster, say), which goes on so. A new
    /// checkpoint takes the engine's setting.
    fn state_partitions(&self, recorded: Option<&QueryFingerprint>) -> Result<Option<usize>> {
        let asked = self.overrides.state_partitions;
        if let Some(n) = asked.filter(|n| !(1..=MAX_STATE_PARTITIONS).contains(n)) {
            return Err(BrookError::option(
                "--state-partitions",
                format!("{n} partitions; give 1 to {MAX_STATE_PARTITIONS}"),
            ));
        }
        let kept = match recorded {
            Some(f) if f.keeps_state() => f.state_partitions,
            _ => return Ok(Some(asked.unwrap_or(DEFAULT_STATE_PARTITIONS))),
        };
        match (kept, asked) {
            (Some(kept), Some(asked)) if kept != asked => {
                tracing::warn!(
                    "the checkpoint keeps its state in {kept} partition(s), created so; \
                     {asked} (--state-partitions) applies to new checkpoints only"
                );
            }
            (None, _) => tracing::info!(
                "the checkpoint's state is kept by the driver, as it was created; the \
                 executors read and pre-aggregate each batch"
            ),
            _ => {}
        }
        Ok(kept)
    }

    fn catalog(&self) -> Result<MutexGuard<'_, Catalog>> {
        self.catalog
            .lock()
            .map_err(|_| BrookError::poisoned("catalog"))
    }

    /// Runs a batch SQL query now, e.g. over memory sink tables.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        // As `SessionContext::sql`, but refusing statements nested too deep to plan.
        let mut statements = parse_statements(sql)?;
        let count = statements.len();
        let (Some(statement), 1) = (statements.pop_front(), count) else {
            return Err(BrookError::sql(format!(
                "expected one SQL statement, found {count}: {sql}"
            )));
        };
        let plan = self.ctx.state().statement_to_plan(statement).await?;
        Ok(self.ctx.execute_logical_plan(plan).await?.collect().await?)
    }

    /// Runs a streaming SQL script: `CREATE UNBOUNDED EXTERNAL TABLE` declares a
    /// source, `CREATE EXTERNAL TABLE` a sink, and each `INSERT INTO sink SELECT`
    /// (or bare `SELECT`, which prints to the console) starts a query.
    pub async fn execute(&self, script: &str) -> Result<Vec<Arc<StreamingQuery>>> {
        // Every error of a statement names it, DataFusion's and option errors included.
        let at = |i: usize, e: BrookError| match e {
            BrookError::Sql(m) => BrookError::Sql(format!("statement {}: {m}", i + 1)),
            other => BrookError::Context {
                context: format!("statement {}", i + 1),
                source: Box::new(other),
            },
        };
        // Each query is planned on a task of its own while the statements after
        // it are read, so that a script's queries are planned on all cores; the
        // queries are then started in the script's order.
        let mut planned = vec![];
        let mut declared = vec![];
        let mut failed = None;
        let mut consoles = 0;
        for (i, text) in split_statements(script).iter().enumerate() {
            match self.read_statement(text).await {
                Ok(Read::Nothing) => {}
                Ok(Read::Query(mut p)) => {
                    // Queries printing to the console without a name of their own
                    // are named by their order in the script: the second would
                    // otherwise take the first's name, and its checkpoint.
                    if p.sink.query_name.is_none() && p.sink.name.eq_ignore_ascii_case("console") {
                        consoles += 1;
                        if consoles > 1 {
                            p.sink.query_name = Some(format!("console_{consoles}"));
                        }
                    }
                    planned.push((i, p))
                }
                Ok(Read::Declared(d)) => declared.push((i, d)),
                Err(e) => {
                    failed = Some((i, e));
                    break;
                }
            }
        }
        // The script's queries start reading together, once all have joined the
        // shared decodes of their sources: one started alone would decode files
        // that the others, joining later, decode again. If a statement fails,
        // those before it go ahead.
        let (go, gate) = watch::channel(false);
        let mut started = vec![];
        let mut planned = planned.into_iter();
        for (i, p) in planned.by_ref() {
            let uses = (p.compiling.reads.clone(), p.writes.clone());
            match self.start_planned(p, &gate).await {
                Ok(q) => started.push(q),
                Err(e) => {
                    self.let_go(&uses.0, uses.1.as_deref())?;
                    failed = Some((i, e));
                    break;
                }
            }
        }
        for (_, p) in planned {
            self.let_go(&p.compiling.reads, p.writes.as_deref())?;
        }
        go.send_replace(true);
        let Some((i, e)) = failed else {
            return Ok(started);
        };
        // Declarations read ahead of the failing statement are taken back, as if
        // the script had stopped there.
        for (_, d) in declared.into_iter().rev().filter(|(at, _)| *at > i) {
            self.undo(d)?;
        }
        Err(at(i, e))
    }

    fn undo(&self, declared: Declared) -> Result<()> {
        fn restore<T>(defs: &mut BTreeMap<String, T>, name: String, before: Option<T>) {
            match before {
                Some(def) => defs.insert(name, def),
                None => defs.remove(&name),
            };
        }
        let mut catalog = self.catalog()?;
        match declared {
            Declared::Source(name, before) => restore(&mut catalog.sources, name, before),
            Declared::Bounded(name, sink, bounded) => {
                restore(&mut catalog.sinks, name.clone(), sink);
                restore(&mut catalog.bounded, name, bounded.map(|b| *b));
            }
        }
        Ok(())
    }

    /// Carries out a declaration; a query is returned being planned, for its sink.
    async fn read_statement(&self, text: &str) -> Result<Read> {
        let (text, watermark) = extract_watermark(text)?;
        let mut statements = parse_statements(&text)?;
        let Some(statement) = statements.pop_front() else {
            return Ok(Read::Nothing);
        };
        match statement {
            DFStatement::CreateExternalTable(mut create) => {
                let held = hold_parquet_compression(&mut create);
                let stmt = DFStatement::CreateExternalTable(create);
                let plan = self.ctx.state().statement_to_plan(stmt).await?;
                let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(mut cmd)) = plan else {
                    return Err(BrookError::internal(
                        "CREATE EXTERNAL TABLE did not plan as DDL",
                    ));
                };
                cmd.options.extend(held);
                if cmd.unbounded {
                    let declared = self.declare_source(SourceDef::from_ddl(&cmd, watermark)?)?;
                    Ok(Read::Declared(declared))
                } else if watermark.is_some() {
                    Err(BrookError::sql(
                        "WATERMARK belongs on a source: CREATE UNBOUNDED EXTERNAL TABLE",
                    ))
                } else {
                    // A sink or a static table, as statements use it: a
                    // declaration that can be neither fails as a sink, unless
                    // it has options only a static table takes.
                    let sink = match (SinkDef::from_ddl(&cmd), StaticDef::from_ddl(&cmd)) {
                        (Ok(sink), _) => Some(sink),
                        (Err(_), Ok(_)) => None,
                        (Err(_), Err(e)) if StaticDef::has_own_options(&cmd) => return Err(e),
                        (Err(e), Err(_)) => return Err(e),
                    };
                    Ok(Read::Declared(self.declare_bounded(*cmd, sink)?))
                }
            }
            DFStatement::Statement(s) => match *s {
                SqlStatement::Insert(insert) => {
                    let target = self.sink_name(&insert.table)?;
                    let Some(query) = insert.source else {
                        return Err(BrookError::sql("INSERT INTO a sink needs a SELECT"));
                    };
                    if !insert.columns.is_empty() {
                        return Err(BrookError::sql(
                            "INSERT INTO a sink takes the query's columns; drop the column list",
                        ));
                    }
                    let sink = self.sink_def(&target)?;
                    let writes = {
                        let mut catalog = self.catalog()?;
                        if catalog.read.contains_key(&target) {
                            return Err(BrookError::sql(format!(
                                "INSERT INTO {}: a query reads this table as a static \
                                 table, so it cannot also be a sink (the query would read \
                                 files being written); declare the output as a table of \
                                 its own",
                                quote_identifier(&target)
                            )));
                        }
                        let bounded = catalog.bounded.contains_key(&target);
                        if bounded {
                            *catalog.written.entry(target.clone()).or_default() += 1;
                        }
                        bounded.then_some(target)
                    };
                    match self.plan_for_sink(&query, sink, writes.clone()) {
                        Ok(planned) => Ok(Read::Query(planned)),
                        Err(e) => {
                            self.let_go(&[], writes.as_deref())?;
                            Err(e)
                        }
                    }
                }
                SqlStatement::Query(query) => Ok(Read::Query(self.plan_for_sink(
                    &query,
                    SinkDef::console(),
                    None,
                )?)),
                other => Err(BrookError::sql(format!(
                    "'{}' cannot run in a streaming script; brook runs CREATE [UNBOUNDED] \
                     EXTERNAL TABLE, INSERT INTO <sink> SELECT and SELECT",
                    first_words(&other.to_string())
                ))),
            },
            other => Err(BrookError::sql(format!(
                "'{}' cannot run in a streaming script",
                first_words(&other.to_string())
            ))),
        }
    }

    fn plan_for_sink(
        &self,
        query: &Query,
        sink: SinkDef,
        writes: Option<String>,
    ) -> Result<Planned> {
        Ok(Planned {
            compiling: self.plan(query, sink.output_mode)?,
            sink,
            writes,
        })
    }

    /// Forgets that a query which did not start reads `reads` and writes `writes`.
    fn let_go(&self, reads: &[String], writes: Option<&str>) -> Result<()> {
        fn release(uses: &mut BTreeMap<String, usize>, name: &str) {
            if let Some(n) = uses.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    uses.remove(name);
                }
            }
        }
        let mut catalog = self.catalog()?;
        for name in reads {
            release(&mut catalog.read, name);
        }
        if let Some(name) = writes {
            release(&mut catalog.written, name);
        }
        Ok(())
    }

    /// Plans `query` over the sources and static tables declared so far, on a task of its own.
    fn plan(&self, query: &Query, mode: Option<OutputMode>) -> Result<Planning> {
        let statement =
            DFStatement::Statement(Box::new(SqlStatement::Query(Box::new(query.clone()))));
        let names = self.ctx.state().resolve_table_references(&statement)?;
        let mut catalog = self.catalog()?;
        let sources = catalog.sources.clone();
        let functions = catalog.functions.clone();
        let mut tables: BTreeMap<String, Arc<dyn TableProvider>> = BTreeMap::new();
        let mut declared = vec![];
        for name in names.iter().map(|n| n.table().to_string()) {
            if sources.contains_key(&name) {
                continue;
            }
            if let Some(table) = catalog.tables.get(&name) {
                tables.insert(name, table.clone());
            } else if let Some(cmd) = catalog.bounded.get(&name) {
                if catalog.written.contains_key(&name) {
                    return Err(BrookError::sql(format!(
                        "table {} is the sink of an INSERT INTO, so a query cannot also \
                         read it as a static table (it would read files being written); \
                         declare the static table as a table of its own",
                        quote_identifier(&name)
                    )));
                }
                declared.push((name, StaticDef::from_ddl(cmd)?));
            }
        }
        let reads: Vec<String> = declared.iter().map(|(name, _)| name.clone()).collect();
        for name in &reads {
            *catalog.read.entry(name.clone()).or_default() += 1;
        }
        drop(catalog);
        let query = query.clone();
        let runtime = self.ctx.runtime_env();
        Ok(Planning {
            task: tokio::spawn(async move {
                for (name, def) in declared {
                    tables.insert(name, Arc::new(def.open(runtime.clone()).await?));
                }
                compile(&query, &sources, &tables, mode, runtime, &functions).await
            }),
            reads,
        })
    }

    /// Makes `table` visible to streaming queries under `name`, as a static
    /// (bounded) table they can join with; its plan runs again at each batch.
    /// `name` is read as DataFusion's `register_table` reads it: unquoted, lower-cased.
    pub fn register_table(&self, name: &str, table: Arc<dyn TableProvider>) -> Result<()> {
        let name = TableReference::from(name).table().to_string();
        self.catalog()?.tables.insert(name, table);
        Ok(())
    }

    /// The sink an `INSERT INTO` names, as DataFusion names tables: an unquoted
    /// name in lower case, a quoted one as written, as its `CREATE` declared it.
    fn sink_name(&self, table: &TableObject) -> Result<String> {
        let TableObject::TableName(name) = table else {
            return Err(BrookError::sql(format!(
                "INSERT INTO {table}: brook inserts into sink tables only"
            )));
        };
        let normalize = self
            .ctx
            .state()
            .config_options()
            .sql_parser
            .enable_ident_normalization;
        Ok(object_name_to_table_reference(name.clone(), normalize)?
            .table()
            .to_string())
    }

    fn sink_def(&self, name: &str) -> Result<SinkDef> {
        let catalog = self.catalog()?;
        match catalog.sinks.get(name) {
            Some(def) => Ok(def.clone()),
            // A bounded table whose options make no sink: say why.
            None if catalog.bounded.contains_key(name) => SinkDef::from_ddl(&catalog.bounded[name]),
            None if name.eq_ignore_ascii_case("console") => Ok(SinkDef::console()),
            None => Err(BrookError::sql(format!(
                "no sink table '{name}'; declare it first, e.g. CREATE EXTERNAL TABLE {} \
                 STORED AS PARQUET LOCATION 'out/{name}' (declared sinks: {})",
                quote_identifier(name),
                catalog.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    async fn start_planned(&self, planned: Planned, gate: &Gate) -> Result<Arc<StreamingQuery>> {
        let def = &planned.sink;
        let name = def.query_name.clone().unwrap_or_else(|| def.name.clone());
        let compiled = match planned.compiling.done().await {
            Ok(compiled) => compiled,
            Err(e) => {
                return Err(self
                    .planning_failed(e, self.checkpoint_location(def, &name))
                    .await);
            }
        };
        let (sink, memory) = def.open(&self.ctx.runtime_env())?;
        let (sink, memory) = match (memory, self.overrides.mirror_rows) {
            (None, Some(rows)) => {
                let copy = MemorySink::with_max_rows(&name, rows);
                let sink: Arc<dyn Sink> = Arc::new(MirrorSink::new(sink, copy.clone()));
                (sink, Some(copy))
            }
            (memory, _) => (sink, memory),
        };
        let checkpoint = self.checkpoint_location(def, &name)?;
        let mut options = QueryOptions {
            name: Some(name),
            trigger: def.trigger.unwrap_or_default(),
            output_mode: def.output_mode,
            checkpoint,
            ..QueryOptions::default()
        };
        if let Some(n) = def.min_batches_to_retain {
            options.min_batches_to_retain = n;
        }
        if let Some(policy) = def.watermark_policy {
            options.watermark_policy = policy;
        }
        if let Some(t) = self.overrides.trigger {
            options.trigger = t;
        }
        options
            .listeners
            .extend(self.overrides.listeners.iter().cloned());
        self.start(compiled, sink, memory, options, gate).await
    }

    /// Where the query writing to `def` (named `name`) keeps its checkpoint.
    fn checkpoint_location(&self, def: &SinkDef, name: &str) -> Result<Option<String>> {
        Ok(
            match (&def.checkpoint_location, &self.overrides.checkpoint_root) {
                (Some(own), _) => Some(own.clone()),
                (None, Some(root)) => {
                    if let Some(why) = crate::catalog::not_a_directory_name(name) {
                        return Err(BrookError::sql(format!(
                            "sink table {} cannot name its query's checkpoint directory below \
                             {root} ({why}): give the table OPTIONS ('queryName' 'a_plain_name')",
                            quote_identifier(name)
                        )));
                    }
                    Some(format!("{}/{name}", root.trim_end_matches('/')))
                }
                (None, None) => None,
            },
        )
    }

    /// The error of a query that did not plan: a function its checkpoint
    /// records and this engine lacks is the likely cause, and named as such.
    async fn planning_failed(
        &self,
        e: BrookError,
        checkpoint: Result<Option<String>>,
    ) -> BrookError {
        let Ok(Some(location)) = checkpoint else {
            return e;
        };
        let Ok(recorded) =
            Checkpoint::recorded_fingerprint(&location, &self.ctx.runtime_env()).await
        else {
            return e;
        };
        match self.lacking_function(recorded.as_ref()) {
            Ok(Some(function)) => lacking(&location, &function),
            _ => e,
        }
    }

    async fn start(
        &self,
        mut compiled: CompiledQuery,
        sink: Arc<dyn Sink>,
        memory: Option<MemorySink>,
        mut options: QueryOptions,
        gate: &Gate,
    ) -> Result<Arc<StreamingQuery>> {
        if let Some(name) = &options.name
            && self
                .queries()
                .iter()
                .any(|q| q.is_active() && q.name() == name)
        {
            return Err(BrookError::sql(format!(
                "a query named '{name}' is already running; give each query its own \
                 name (sink option 'queryName'), so that each has its own checkpoint"
            )));
        }
        let recorded = match &options.checkpoint {
            Some(location) => {
                Checkpoint::recorded_fingerprint(location, &self.ctx.runtime_env()).await?
            }
            None => None,
        };
        if let Some(location) = &options.checkpoint
            && let Some(function) = self.lacking_function(recorded.as_ref())?
        {
            return Err(lacking(location, &function));
        }
        let cluster = match &self.overrides.cluster {
            Some(url) => {
                let partitions = self.state_partitions(recorded.as_ref())?;
                let part = ClusterPart::of(&compiled, partitions)?;
                if let (Some(partitions), CompiledPlan::Stateful(op)) =
                    (part.state_partitions(), &mut compiled.plan)
                {
                    // The executors keep the state; a checkpoint records where.
                    op.remote = Some(RemoteState::default());
                    compiled.fingerprint.state_partitions = Some(partitions);
                }
                let cluster = self
                    .cluster
                    .get_or_try_init(|| async { Cluster::connect(url).await.map(Arc::new) })
                    .await?;
                // The tasks leave their reports where the driver reads them: in the
                // checkpoint, which a cluster's machines share, as in Spark.
                let (reports, temporary) = match &options.checkpoint {
                    Some(location) => {
                        (format!("{}/cluster", location.trim_end_matches('/')), false)
                    }
                    None => {
                        let dir = std::env::temp_dir().join(format!("brook-cluster-{}", new_id()));
                        (dir.display().to_string(), true)
                    }
                };
                Some(ClusterQuery::new(
                    cluster.clone(),
                    part,
                    &reports,
                    temporary,
                )?)
            }
            None => None,
        };
        let runtime = self.ctx.runtime_env();
        let sources = compiled
            .inputs
            .iter()
            .map(|input| input.source.open(&runtime, &self.shared))
            .collect::<Result<Vec<_>>>()?;
        let checkpoint = match &options.checkpoint {
            Some(location) => Some(
                Checkpoint::open(
                    location,
                    &runtime,
                    &compiled.sql,
                    compiled.fingerprint.clone(),
                    options.min_batches_to_retain,
                )
                .await?,
            ),
            None => None,
        };
        let id = checkpoint
            .as_ref()
            .map_or_else(new_id, |c| c.query_id().to_string());
        // A sink that cannot take the query's mode fails the start, as in Spark;
        // the new checkpoint's metadata write ends first, since it holds the checkpoint.
        if let Err(e) = sink
            .open_keyed(
                &compiled.output_schema,
                compiled.mode,
                &id,
                &compiled.group_keys,
            )
            .await
        {
            if let Some(cp) = &checkpoint {
                let _ = cp.metadata_written().await;
            }
            return Err(e);
        }
        let memory_table = match memory {
            Some(memory) => {
                // By its name as it is: a name from `CREATE` is already normalized.
                let table = TableReference::bare(memory.name());
                self.ctx.deregister_table(table.clone())?;
                self.ctx.register_table(table, memory.table())?;
                let name = memory.name().to_string();
                self.catalog()?.memory_tables.insert(name.clone(), memory);
                Some(name)
            }
            None => None,
        };
        options.listeners.push(self.progress_listener());
        let query = Arc::new(StreamingQuery::start(
            compiled,
            sources,
            sink,
            checkpoint,
            id,
            options,
            memory_table,
            gate.clone(),
            cluster,
        ));
        self.catalog()?.queries.push(query.clone());
        Ok(query)
    }

    pub(crate) fn register_source(&self, def: SourceDef) -> Result<()> {
        self.declare_source(def).map(drop)
    }

    fn declare_source(&self, def: SourceDef) -> Result<Declared> {
        def.validate()?;
        let name = def.name.clone();
        let before = self.catalog()?.sources.insert(name.clone(), def);
        Ok(Declared::Source(name, before))
    }

    fn declare_bounded(&self, cmd: CreateExternalTable, sink: Option<SinkDef>) -> Result<Declared> {
        let name = cmd.name.table().to_string();
        let mut catalog = self.catalog()?;
        let sink_before = match sink {
            Some(sink) => catalog.sinks.insert(name.clone(), sink),
            None => catalog.sinks.remove(&name),
        };
        let before = catalog.bounded.insert(name.clone(), cmd);
        Ok(Declared::Bounded(name, sink_before, before.map(Box::new)))
    }

    /// Declares a streaming source through the Rust API.
    pub fn read_stream(&self, name: &str) -> SourceBuilder<'_> {
        SourceBuilder {
            engine: self,
            name: name.to_string(),
            format: FileFormat::Csv(Default::default()),
            schema: None,
            mode: ParseMode::Permissive,
            options: FileSourceOptions::default(),
            watermark: None,
            idle_timeout: None,
        }
    }

    /// Prepares a streaming query from a SELECT through the Rust API.
    pub fn query(&self, select: &str) -> QueryBuilder<'_> {
        QueryBuilder {
            engine: self,
            select: select.to_string(),
            options: QueryOptions::default(),
            sink: None,
        }
    }

    /// The queries started so far.
    pub fn queries(&self) -> Vec<Arc<StreamingQuery>> {
        self.catalog()
            .map(|c| c.queries.clone())
            .unwrap_or_default()
    }

    /// The query with this id, or else with this name.
    pub fn find_query(&self, id_or_name: &str) -> Option<Arc<StreamingQuery>> {
        let queries = self.queries();
        let by_id = queries.iter().find(|q| q.id() == id_or_name);
        // A restarted query keeps its name: the latest start is the one meant.
        by_id
            .or_else(|| queries.iter().rev().find(|q| q.name() == id_or_name))
            .cloned()
    }

    /// Lists `program` (a DStream program, say) beside the queries, for monitors
    /// such as the web UI; its progress reaches [`subscribe_progress`](Self::subscribe_progress)
    /// through [`progress_listener`](Self::progress_listener).
    pub fn monitor(&self, program: Arc<dyn Monitored>) -> Result<()> {
        self.catalog()?.monitored.push(program);
        Ok(())
    }

    /// The queries started so far, then the programs given to [`monitor`](Self::monitor).
    pub fn monitored(&self) -> Vec<Arc<dyn Monitored>> {
        let Ok(catalog) = self.catalog() else {
            return vec![];
        };
        let queries = catalog
            .queries
            .iter()
            .map(|q| q.clone() as Arc<dyn Monitored>);
        queries.chain(catalog.monitored.iter().cloned()).collect()
    }

    /// The monitored query or program with this id, or else with this name.
    pub fn find_monitored(&self, id_or_name: &str) -> Option<Arc<dyn Monitored>> {
        let all: Vec<(QueryInfo, Arc<dyn Monitored>)> = self
            .monitored()
            .into_iter()
            .map(|m| (m.info(), m))
            .collect();
        let by_id = all.iter().find(|(info, _)| info.id == id_or_name);
        // A restarted query keeps its name: the latest start is the one meant.
        by_id
            .or_else(|| all.iter().rev().find(|(info, _)| info.name == id_or_name))
            .map(|(_, m)| m.clone())
    }

    /// Passes progress records on to [`subscribe_progress`](Self::subscribe_progress).
    pub fn progress_listener(&self) -> ProgressListener {
        let events = self.progress.clone();
        Arc::new(move |p: &QueryProgress| {
            // No subscriber is not an error: the channel only feeds monitors.
            let _ = events.send(p.clone());
        })
    }

    /// Every memory table, by name.
    pub fn memory_tables(&self) -> Vec<(String, MemorySink)> {
        self.catalog()
            .map(|c| c.memory_tables.clone().into_iter().collect())
            .unwrap_or_default()
    }

    /// The memory sink table of this name, as its queries last filled it.
    pub fn memory_table(&self, name: &str) -> Option<MemorySink> {
        self.catalog().ok()?.memory_tables.get(name).cloned()
    }

    /// Every query's progress records from now on, as each batch completes.
    pub fn subscribe_progress(&self) -> broadcast::Receiver<QueryProgress> {
        self.progress.subscribe()
    }

    /// Stops every query, letting each finish the batch it is running.
    pub async fn stop_all(&self) -> Result<()> {
        let mut first_error = None;
        for q in self.queries() {
            if let Err(e) = q.stop().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The checkpoint at `location` records that its query calls `function`, which the engine lacks.
fn lacking(location: &str, function: &str) -> BrookError {
    BrookError::checkpoint(
        location,
        format!(
            "the checkpoint's query uses function '{function}', which is not registered on \
             this engine: register it (Engine::register_udf, register_udaf or register_udwf) \
             before starting the query"
        ),
    )
}

fn first_words(s: &str) -> String {
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Declares a file source from Rust, like Spark's `readStream`.
pub struct SourceBuilder<'a> {
    engine: &'a Engine,
    name: String,
    format: FileFormat,
    schema: Option<SchemaRef>,
    mode: ParseMode,
    options: FileSourceOptions,
    watermark: Option<WatermarkSpec>,
    idle_timeout: Option<std::time::Duration>,
}

impl SourceBuilder<'_> {
    /// After this long without rows, the source stops holding back the
    /// watermark of a query that reads it with other streams (`idleTimeout`).
    pub fn idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }
    pub fn format(mut self, format: FileFormat) -> Self {
        self.format = format;
        self
    }
    pub fn schema(mut self, schema: SchemaRef) -> Self {
        self.schema = Some(schema);
        self
    }
    pub fn mode(mut self, mode: ParseMode) -> Self {
        self.mode = mode;
        self
    }
    pub fn file_options(mut self, options: FileSourceOptions) -> Self {
        self.options = options;
        self
    }
    pub fn max_files_per_trigger(mut self, n: usize) -> Self {
        self.options.max_files_per_trigger = Some(n);
        self
    }
    /// `column`'s maximum minus `delay` becomes the watermark.
    pub fn watermark(mut self, column: &str, delay: std::time::Duration) -> Self {
        self.watermark = Some(WatermarkSpec {
            column: column.to_string(),
            delay,
        });
        self
    }
    /// Registers the source over `location` (a directory path or object-store URL).
    pub fn load(self, location: &str) -> Result<()> {
        let schema = self
            .schema
            .unwrap_or_else(|| Arc::new(datafusion::arrow::datatypes::Schema::empty()));
        self.engine.register_source(SourceDef {
            name: self.name,
            schema,
            watermark: self.watermark,
            idle_timeout: self.idle_timeout,
            kind: SourceKind::Files {
                location: location.to_string(),
                decode: DecodeOptions {
                    format: self.format,
                    mode: self.mode,
                    corrupt_column: DEFAULT_CORRUPT_COLUMN.to_string(),
                },
                options: self.options,
            },
        })
    }
}

/// Starts a query from Rust, like Spark's `writeStream`.
pub struct QueryBuilder<'a> {
    engine: &'a Engine,
    select: String,
    options: QueryOptions,
    sink: Option<(Arc<dyn Sink>, Option<MemorySink>)>,
}

impl QueryBuilder<'_> {
    pub fn name(mut self, name: &str) -> Self {
        self.options.name = Some(name.to_string());
        self
    }
    pub fn trigger(mut self, trigger: Trigger) -> Self {
        self.options.trigger = trigger;
        self
    }
    /// Keeps the query's progress at `location` (a directory or object-store URL),
    /// so that a restarted query resumes where it stopped.
    pub fn checkpoint(mut self, location: &str) -> Self {
        self.options.checkpoint = Some(location.to_string());
        self
    }
    /// Committed batches whose checkpoint files are kept (default 100).
    pub fn min_batches_to_retain(mut self, batches: u64) -> Self {
        self.options.min_batches_to_retain = batches;
        self
    }
    pub fn output_mode(mut self, mode: OutputMode) -> Self {
        self.options.output_mode = Some(mode);
        self
    }
    /// How a query reading several streams picks its watermark (`multipleWatermarkPolicy`).
    pub fn watermark_policy(mut self, policy: WatermarkPolicy) -> Self {
        self.options.watermark_policy = policy;
        self
    }
    pub fn on_progress(mut self, f: impl Fn(&QueryProgress) + Send + Sync + 'static) -> Self {
        self.options.listeners.push(Arc::new(f));
        self
    }
    pub fn sink(mut self, sink: Arc<dyn Sink>) -> Self {
        self.sink = Some((sink, None));
        self
    }
    /// Writes into a memory table of this name, queryable with [`Engine::sql`].
    pub fn memory_sink(mut self, table: &str) -> Self {
        let sink = MemorySink::new(table);
        self.sink = Some((Arc::new(sink.clone()), Some(sink)));
        self
    }
    pub fn console(self, num_rows: usize) -> Self {
        self.sink(Arc::new(ConsoleSink::stdout(num_rows)))
    }
    pub fn foreach_batch(
        self,
        f: impl Fn(u64, &[RecordBatch]) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.sink(Arc::new(ForeachBatchSink::new(f)))
    }

    pub async fn start(self) -> Result<Arc<StreamingQuery>> {
        let query = parse_query(&self.select)?;
        let (sink, memory) = match self.sink {
            Some(s) => s,
            None => (Arc::new(ConsoleSink::stdout(20)) as Arc<dyn Sink>, None),
        };
        let planning = self.engine.plan(&query, self.options.output_mode)?;
        let reads = planning.reads.clone();
        // A query started alone waits for no other.
        let (_, open) = watch::channel(true);
        let started = match planning.done().await {
            Ok(compiled) => {
                self.engine
                    .start(compiled, sink, memory, self.options, &open)
                    .await
            }
            Err(e) => {
                let checkpoint = Ok(self.options.checkpoint.clone());
                Err(self.engine.planning_failed(e, checkpoint).await)
            }
        };
        if started.is_err() {
            self.engine.let_go(&reads, None)?;
        }
        started
    }
}
