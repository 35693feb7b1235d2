//! Batches on an Apache Ballista cluster (`brook run --cluster df://HOST:PORT`).
//!
//! The driver (the `brook run` process) plans each batch as it always does:
//! which files or Kafka offset ranges it takes, its watermarks; it commits it
//! and writes the sink. What the batch does to its input (reading and decoding
//! it, and the query's plan up to its partial aggregate, or the whole plan of
//! a query without one) runs on the cluster as one Ballista job, where the
//! executors can run the plan (else they only read the input, a job per
//! stream, and the driver runs the plan over the rows): each file, or
//! each Kafka partition's range, is read by a task with brook's own readers
//! ([`scan::ScanExec`]) and the partial aggregate is shuffled by its group
//! keys. A static table the query joins is read there too, by DataFusion,
//! from the files it holds when the batch starts. An aggregation's state is kept on the
//! executors, partitioned as the shuffle is ([`state`]): each partition is
//! merged there, and the driver gets the rows the batch emits. Where the
//! checkpoint was created with its state on the driver, or the state is kept
//! per pane (sliding windows in append mode), the driver keeps it and merges
//! the partial rows, one per group of the batch, into it; so it does a join of
//! two streams' state, whose sides the cluster reads.

pub mod codec;
pub mod scan;
pub mod state;

use std::collections::BTreeMap;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use ballista::prelude::{SessionConfigExt, SessionContextExt};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{EmptyRelation, Extension, LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use object_store::ObjectStoreExt;
use url::Url;

use self::codec::{BrookLogicalCodec, BrookPhysicalCodec};
use self::scan::{ScanSpec, ScanTable};
use self::state::{MergeWindow, StateMergeNode, StateReport, StateSpec, merge_slots};
use super::compile::{CompiledPlan, CompiledQuery, InputWindow};
use super::read::ReadStats;
use super::stateful::{StatefulOp, Watermarks};
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::source::SourceOffset;
use crate::source::location::Location;
use crate::source::lookup::StaticTable;

/// The option that names the cluster, in messages.
pub const CLUSTER_OPTION: &str = "--cluster";

/// How many partitions a batch's partial aggregate is shuffled into, and so
/// the state is kept in, unless asked otherwise (`--state-partitions`): the
/// tasks that merge it, spread over the executors.
pub const DEFAULT_STATE_PARTITIONS: usize = 4;

/// The most partitions a state may be cut into: each costs a task and a
/// file per batch.
pub const MAX_STATE_PARTITIONS: usize = 1024;

/// Times a batch's job is run before the batch fails, and the pause between:
/// long enough for the scheduler to notice a lost executor at its next launch.
const JOB_ATTEMPTS: u32 = 5;
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A Ballista cluster's scheduler, as the driver reaches it.
pub struct Cluster {
    ctx: SessionContext,
}

impl Cluster {
    /// Checks that `url` (`df://HOST:PORT`) names a scheduler that answers.
    pub async fn connect(url: &str) -> Result<Self> {
        let refuse = |m: String| BrookError::option(CLUSTER_OPTION, m);
        let parsed = Url::parse(url)
            .map_err(|e| refuse(format!("'{url}' is not a URL ({e}); use df://HOST:PORT")))?;
        let (Some(host), "df") = (parsed.host_str(), parsed.scheme()) else {
            return Err(refuse(format!(
                "'{url}' is not a scheduler's address; use df://HOST:PORT"
            )));
        };
        let port = parsed.port().unwrap_or(50050);
        let address = (host, port)
            .to_socket_addrs()
            .map_err(|e| refuse(format!("cannot resolve '{host}': {e}")))?
            .next()
            .ok_or_else(|| refuse(format!("'{host}' has no address")))?;
        let reached = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(address),
        )
        .await;
        match reached {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(refuse(format!(
                    "no scheduler answers at {host}:{port} ({e}); start one with `brook scheduler`"
                )));
            }
            Err(_) => {
                return Err(refuse(format!(
                    "no scheduler answered at {host}:{port} within 10 s"
                )));
            }
        }
        let config = SessionConfig::new_with_ballista()
            .with_ballista_logical_extension_codec(Arc::new(BrookLogicalCodec::default()))
            .with_ballista_physical_extension_codec(Arc::new(BrookPhysicalCodec::default()))
            // Ballista's adaptive planner can leave a job waiting for good on a
            // stage it rolled back when an executor was lost; the static
            // planner runs the lost tasks again.
            .with_ballista_adaptive_query_planner(false);
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .build();
        let ctx = SessionContext::remote_with_state(url, state).await?;
        Ok(Self { ctx })
    }
}

/// What of a query runs on a cluster: its plan over its source's rows, the
/// scan of them, and the merge into its state if the executors keep it.
pub struct ClusterPart {
    /// The plan over the streams' rows; `None` where the executors cannot
    /// run it (a join of two streams, say) and only read the streams.
    plan: Option<LogicalPlan>,
    /// Each stream's scan, in the query's order of inputs.
    scans: Vec<ScanSpec>,
    /// The static tables the plan reads, by the name it scans them by.
    statics: BTreeMap<String, StaticTable>,
    state: Option<StatePart>,
    /// The shuffle's partitions.
    partitions: usize,
}

/// An aggregation whose state the executors keep: its merge plan, and what
/// every batch's merge shares.
struct StatePart {
    merge: Vec<u8>,
    spec: StateSpec,
}

impl StatePart {
    /// The state of `op`, emitting by `mode`, cut into `partitions` (one
    /// where its only key is a sliding window, or it has none).
    fn of(
        op: &StatefulOp,
        mode: OutputMode,
        window: Option<&InputWindow>,
        partitions: usize,
    ) -> Result<Self> {
        let mut partition_keys: Vec<usize> = (0..op.keys).collect();
        let window = match (op.window_key, window) {
            (Some(pane), Some(w)) => {
                // A pane adds to several windows, which the executor expands
                // it into: they must all be kept where the pane is merged.
                if w.ticks.overlapping() {
                    partition_keys.retain(|&k| k != pane);
                }
                Some(MergeWindow {
                    spec: w.spec.clone(),
                    time_type: w.ticks.time_type().to_string(),
                })
            }
            _ => None,
        };
        let [state, delta] = merge_slots(&op.merge)?;
        if !state.same(&op.state_slot) || !delta.same(&op.delta_slot) {
            return Err(BrookError::internal(
                "the merge plan does not scan the state before the batch's rows",
            ));
        }
        let merge = datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(
            op.merge.clone(),
            &BrookPhysicalCodec::default(),
        )?;
        Ok(Self {
            merge: merge.to_vec(),
            spec: StateSpec {
                root: String::new(),
                reports: String::new(),
                batch_id: 0,
                // A global aggregate's partial rows come together in one partition.
                partitions: if partition_keys.is_empty() {
                    1
                } else {
                    partitions
                },
                partition_keys,
                mode,
                late_ns: None,
                evict_ns: None,
                window,
                window_key: op.window_key,
                event_time_key: op.event_time_key.clone(),
                rows_column: op.rows_column,
                keys: op.keys,
                dedup: op.dedup,
                state_columns: op.state_columns.clone(),
            },
        })
    }
}

impl ClusterPart {
    /// The cluster's part of `compiled`, its batches' partial rows shuffled
    /// into as many partitions as its state on the executors has, or
    /// [`DEFAULT_STATE_PARTITIONS`] when `partitions` is `None` and the
    /// driver keeps the state.
    pub fn of(compiled: &CompiledQuery, partitions: Option<usize>) -> Result<Self> {
        let streams: Vec<&str> = compiled
            .inputs
            .iter()
            .map(|i| i.source.name.as_str())
            .collect();
        let mut statics = BTreeMap::new();
        let mut others = vec![];
        if let Some(plan) = &compiled.scan_plan {
            plan.apply_with_subqueries(|node| {
                if let LogicalPlan::TableScan(scan) = node
                    && !streams.contains(&scan.table_name.table())
                {
                    let name = scan.table_name.to_string();
                    match source_as_provider(&scan.source)?.downcast_ref::<StaticTable>() {
                        Some(table) => {
                            statics.insert(name, table.clone());
                        }
                        None => others.push(name),
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        // What the executors cannot run: they then only read and decode the
        // input, and the driver runs the plan over the rows, as without a cluster.
        let partitioned = statics.iter().find(|(_, t)| t.partitioned());
        let driver_runs = if compiled.scan_plan.is_none() {
            Some("it joins two streams, whose state the driver keeps".to_string())
        } else if !compiled.fingerprint.functions.is_empty() {
            Some(format!(
                "it calls functions registered from Rust ({}), which the executors do not have",
                compiled.fingerprint.functions.join(", ")
            ))
        } else if compiled.rows_without_session.is_some() {
            Some("session_window(...) merges sessions across the batch's rows".to_string())
        } else if !others.is_empty() {
            Some(format!(
                "it reads the table(s) {} registered from Rust, which the executors cannot read",
                others.join(", ")
            ))
        } else if let Some((name, _)) = partitioned {
            // Each file would reach the executors without the directories
            // that give its partition columns.
            Some(format!(
                "static table '{name}' is partitioned by directories (PARTITIONED BY)"
            ))
        } else {
            None
        };
        let plan = match &driver_runs {
            Some(why) => {
                tracing::info!("the executors read each batch; its plan runs on the driver: {why}");
                statics.clear();
                None
            }
            None => compiled.scan_plan.clone(),
        };
        let scans = compiled
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| ScanSpec::of(i, input))
            .collect::<Result<Vec<_>>>()?;
        let state = match (&compiled.plan, &plan, partitions) {
            // Pane state (sliding windows in append mode) stays on the driver.
            (CompiledPlan::Stateful(op), Some(_), Some(partitions)) if !op.panes => {
                // Every stage but the last appends what it closes to the next.
                let mode = match compiled.then.is_empty() {
                    true => compiled.mode,
                    false => OutputMode::Append,
                };
                let window = compiled.inputs.iter().find_map(|i| i.window.as_ref());
                Some(StatePart::of(op, mode, window, partitions)?)
            }
            _ => None,
        };
        // The shuffle cuts the partial rows as the state is cut; state in one
        // partition (or none on the executors) leaves it the setting.
        let partitions = match &state {
            Some(s) if !s.spec.partition_keys.is_empty() => s.spec.partitions,
            _ => partitions
                .filter(|&n| n > 1)
                .unwrap_or(DEFAULT_STATE_PARTITIONS),
        };
        Ok(Self {
            plan,
            scans,
            statics,
            state,
            partitions,
        })
    }

    /// The partitions of the state the executors keep, if they keep it.
    pub fn state_partitions(&self) -> Option<usize> {
        self.state.as_ref().map(|s| s.spec.partitions)
    }
}

/// What a batch's job on the cluster gave.
pub struct ClusterRun {
    /// The rows of the plan that ran there; with the state on the executors,
    /// the state rows the batch emits.
    pub rows: Vec<RecordBatch>,
    /// What each input read, in the query's order of inputs.
    pub read: Vec<ReadStats>,
    /// What the merges into the state on the executors reported.
    pub state: Option<StateReport>,
}

/// One query's batches on a cluster.
pub struct ClusterQuery {
    cluster: Arc<Cluster>,
    /// The plan the cluster runs, over the streams' rows; `None` where the
    /// cluster only reads the streams.
    plan: Option<LogicalPlan>,
    /// Each stream's scan of every batch, but its parts and stats directory.
    scans: Vec<ScanSpec>,
    statics: BTreeMap<String, StaticTable>,
    state: Option<StatePart>,
    /// The cluster's session, its jobs' partial rows shuffled into as many
    /// partitions as the query's state has.
    session: SessionState,
    /// Below this, each batch's tasks leave what they read.
    stats_root: String,
    /// `stats_root` is a temporary directory of this query's own.
    temporary: bool,
}

impl ClusterQuery {
    /// A query's batches on `cluster`; `stats_root` must be a location every
    /// executor and the driver reach, and is removed when the query stops if it
    /// is `temporary`.
    pub fn new(
        cluster: Arc<Cluster>,
        part: ClusterPart,
        stats_root: &str,
        temporary: bool,
    ) -> Result<Self> {
        let stats_root = absolute(stats_root.trim_end_matches('/'))?;
        let state = part.state.map(|mut s| {
            s.spec.root = format!("{stats_root}/state");
            s
        });
        let mut session = cluster.ctx.state();
        session
            .config_mut()
            .options_mut()
            .execution
            .target_partitions = part.partitions;
        Ok(Self {
            cluster,
            plan: part.plan,
            scans: part.scans,
            statics: part.statics,
            state,
            session,
            stats_root,
            temporary,
        })
    }

    /// The state the executors keep, as batch `batch_id` left it; `schema`
    /// is its rows'.
    pub async fn state_rows(&self, batch_id: u64, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
        let Some(state) = &self.state else {
            return Ok(vec![]);
        };
        let runtime = self.cluster.ctx.runtime_env();
        state::read_state(
            &state.spec.root,
            state.spec.partitions,
            batch_id,
            schema,
            &runtime,
        )
        .await
    }

    /// Whether the cluster runs the query's plan, or only reads its input
    /// ([`read_inputs`](Self::read_inputs)) for the driver to run it.
    pub fn runs_plan(&self) -> bool {
        self.plan.is_some()
    }

    /// Removes the query's temporary report directory, if it has one.
    pub fn finish(&self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.stats_root);
        }
    }

    /// Each input's scan of batch `batch_id`, reading the parts of its offset
    /// (none for an input without one) and reporting to `stats`.
    fn batch_scans(
        &self,
        batch_id: u64,
        offsets: &[Option<SourceOffset>],
        stats: &str,
    ) -> Result<Vec<ScanSpec>> {
        self.scans
            .iter()
            .zip(offsets)
            .map(|(scan, offset)| {
                let parts = match offset {
                    Some(offset) => scan.input.split(offset)?,
                    None => vec![],
                };
                Ok(ScanSpec {
                    batch_id,
                    parts: parts.into_iter().map(|p| p.0).collect(),
                    stats: stats.to_string(),
                    ..scan.clone()
                })
            })
            .collect()
    }

    /// Runs batch `batch_id` over the input `offsets` name (one per stream)
    /// on the cluster, under `watermarks`.
    pub async fn run_batch(
        &self,
        batch_id: u64,
        offsets: &[Option<SourceOffset>],
        watermarks: Watermarks,
    ) -> Result<ClusterRun> {
        let Some(plan) = &self.plan else {
            return Err(BrookError::internal(
                "a query whose plan runs on the driver has its input read, not its plan run, \
                 on a cluster",
            ));
        };
        // A batch without input still closes state the executors keep.
        if offsets.iter().all(Option::is_none) && self.state.is_none() {
            return Ok(ClusterRun {
                rows: vec![],
                read: vec![ReadStats::default(); self.scans.len()],
                state: None,
            });
        }
        let stats = format!("{}/{batch_id}", self.stats_root);
        let specs = self.batch_scans(batch_id, offsets, &stats)?;
        let mut streams = BTreeMap::new();
        for spec in &specs {
            let table = provider_as_source(Arc::new(ScanTable::new(spec.clone())?));
            streams.insert(spec.source.clone(), table);
        }
        // A static table's files as they are now, which the executors read.
        let mut statics = BTreeMap::new();
        for (name, static_table) in &self.statics {
            let files = static_table.files_table().await?;
            statics.insert(name.clone(), files.map(provider_as_source));
        }
        let plan = plan
            .clone()
            .transform_up_with_subqueries(|node| match node {
                LogicalPlan::TableScan(mut scan) => {
                    if let Some(table) = streams.get(scan.table_name.table()) {
                        scan.source = table.clone();
                    } else if let Some(files) = statics.get(&scan.table_name.to_string()) {
                        let Some(files) = files else {
                            // A static table without files has no rows.
                            return Ok(Transformed::yes(LogicalPlan::EmptyRelation(
                                EmptyRelation {
                                    produce_one_row: false,
                                    schema: scan.projected_schema,
                                },
                            )));
                        };
                        scan.source = files.clone();
                    }
                    Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                }
                other => Ok(Transformed::no(other)),
            })?
            .data;
        let plan = match &self.state {
            Some(state) => {
                let spec = StateSpec {
                    reports: stats.clone(),
                    batch_id,
                    late_ns: watermarks.late_ns,
                    evict_ns: watermarks.evict_ns,
                    ..state.spec.clone()
                };
                let spec = serde_json::to_string(&spec)
                    .map_err(|e| BrookError::serde("a batch's state merge", e))?;
                LogicalPlan::Extension(Extension {
                    node: Arc::new(StateMergeNode {
                        spec,
                        merge: state.merge.clone(),
                        input: plan,
                    }),
                })
            }
            None => plan,
        };
        let rows = self.run_job(batch_id, plan).await?;
        let (read, state) = self.take_reports(&stats, &specs).await?;
        Ok(ClusterRun { rows, read, state })
    }

    /// Reads each stream's input of batch `batch_id` (one offset per stream)
    /// on the cluster, a job per stream side by side: each one's rows and
    /// what it read, for a plan that runs here.
    pub async fn read_inputs(
        &self,
        batch_id: u64,
        offsets: &[Option<SourceOffset>],
    ) -> Result<(Vec<Vec<RecordBatch>>, Vec<ReadStats>)> {
        let stats = format!("{}/{batch_id}", self.stats_root);
        let specs = self.batch_scans(batch_id, offsets, &stats)?;
        let jobs = specs.iter().map(|spec| async move {
            if spec.parts.is_empty() {
                return Ok(vec![]);
            }
            let table = provider_as_source(Arc::new(ScanTable::new(spec.clone())?));
            let plan = LogicalPlanBuilder::scan(spec.source.clone(), table, None)?.build()?;
            self.run_job(batch_id, plan).await
        });
        let rows = futures::future::try_join_all(jobs).await?;
        let (read, _) = self.take_reports(&stats, &specs).await?;
        Ok((rows, read))
    }

    /// Runs `plan`, batch `batch_id`'s job, on the cluster: its rows.
    async fn run_job(&self, batch_id: u64, plan: LogicalPlan) -> Result<Vec<RecordBatch>> {
        let mut attempt = 1;
        loop {
            let ran = DataFrame::new(self.session.clone(), plan.clone()).collect();
            match ran.await {
                Ok(rows) => return Ok(rows),
                // A job fails for good once a task failed on several executors,
                // or its results were lost with an executor: the batch's input
                // is unchanged, so it runs again.
                Err(e) if attempt < JOB_ATTEMPTS => {
                    tracing::warn!(
                        "batch {batch_id} failed on the cluster (attempt {attempt} of \
                         {JOB_ATTEMPTS}), running it again: {e}"
                    );
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => {
                    return Err(BrookError::Context {
                        context: format!(
                            "batch {batch_id} failed on the cluster ({CLUSTER_OPTION}) \
                             {JOB_ATTEMPTS} times"
                        ),
                        source: Box::new(e.into()),
                    });
                }
            }
        }
    }

    /// Collects and removes the reports a batch's tasks left in `stats`:
    /// what each of `specs` read, and the state's merges.
    async fn take_reports(
        &self,
        stats: &str,
        specs: &[ScanSpec],
    ) -> Result<(Vec<ReadStats>, Option<StateReport>)> {
        let location = Location::resolve(stats, &self.cluster.ctx.runtime_env())?;
        let mut names = vec![];
        let mut read = vec![];
        for spec in specs {
            let parts: Vec<_> = (0..spec.parts.len()).map(|i| spec.stats_name(i)).collect();
            let mut stats = ReadStats::default();
            for r in collect_reports::<ReadStats>(&location, &parts).await? {
                stats.merge(r);
            }
            read.push(stats);
            names.extend(parts);
        }
        let state = match &self.state {
            Some(state) => {
                let state_names: Vec<_> =
                    (0..state.spec.partitions).map(StateReport::name).collect();
                let mut all = StateReport::default();
                for r in collect_reports::<StateReport>(&location, &state_names).await? {
                    all.merge(r);
                }
                names.extend(state_names);
                Some(all)
            }
            None => None,
        };
        for name in &names {
            // Left over, a report is overwritten when its batch runs again.
            let _ = location.store.delete(&location.child(name)).await;
        }
        // A local store leaves the emptied directory behind, one per batch.
        if let Some(dir) = &location.local_dir {
            let _ = std::fs::remove_dir(dir);
        }
        Ok((read, state))
    }
}

/// The reports a batch's tasks left in `location`, named `names`.
async fn collect_reports<T: serde::de::DeserializeOwned>(
    location: &Location,
    names: &[String],
) -> Result<Vec<T>> {
    let mut all = Vec::with_capacity(names.len());
    for name in names {
        let path = location.child(name);
        let failed = |message: String| BrookError::Source {
            location: location.display.clone(),
            message,
        };
        let bytes = match location.store.get(&path).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        }
        .map_err(|e| {
            failed(format!(
                "a cluster task's report {path} is missing ({}): the executors must \
                     reach this location (the query's checkpoint, or without one the \
                     driver's temporary directory)",
                location.store_failure(&e)
            ))
        })?;
        let report: T = serde_json::from_slice(&bytes)
            .map_err(|e| failed(format!("a cluster task's report {path}: {e}")))?;
        all.push(report);
    }
    Ok(all)
}

/// `location` as every executor reads it: a relative path is the driver's.
fn absolute(location: &str) -> Result<String> {
    if location.contains("://") {
        return Ok(location.to_string());
    }
    let path = std::path::absolute(location).map_err(|e| BrookError::io(location, e))?;
    Ok(path.display().to_string())
}

/// A plan that gives `rows`, as `schema`: a batch's rows that the cluster
/// computed, in place of the local plan that would have.
pub fn rows_plan(schema: SchemaRef, rows: Vec<RecordBatch>) -> Result<Arc<dyn ExecutionPlan>> {
    let rows = rows
        .into_iter()
        .map(|b| {
            if b.schema() == schema {
                return Ok(b);
            }
            // The cluster names and types the columns as the plan does; only
            // their nullability or metadata may differ.
            let same = b.schema().fields().len() == schema.fields().len()
                && b.schema()
                    .fields()
                    .iter()
                    .zip(schema.fields())
                    .all(|(a, w)| a.name() == w.name() && a.data_type() == w.data_type());
            if !same {
                return Err(BrookError::internal(format!(
                    "the cluster's rows have columns {:?}, the plan expects {:?}",
                    b.schema(),
                    schema
                )));
            }
            Ok(RecordBatch::try_new(schema.clone(), b.columns().to_vec())?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MemorySourceConfig::try_new_exec(&[rows], schema, None)?)
}
