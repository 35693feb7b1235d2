//! An aggregation's state kept on a cluster's executors, partitioned by its
//! group keys as the batch's partial rows are shuffled.
//!
//! Partition `p` of a batch's merge ([`StateMergeExec`]) gets the partial
//! rows of the groups whose keys hash to `p`, reads the state version that
//! the last batch before it left for `p` (a Parquet file,
//! `<state>/part-<p>/<batch>.parquet`), merges, emits and evicts as the
//! driver's [`StatefulOp`] does (it is one, made on the executor), writes the
//! new version, and gives the driver the state rows to emit. The driver turns
//! them into the query's rows and commits the batch; a batch that runs again
//! reads the same version as before and writes its own again. The number of
//! partitions is the shuffle's, fixed when the checkpoint is created.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchemaRef, DataFusionError, Result as DFResult};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::codec::BrookPhysicalCodec;
use super::scan::{external, numbered_partitions, part_numbers, put_report};
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::exec::stateful::{EventTimeKey, StatefulOp, StatefulOutcome, Watermarks};
use crate::source::location::Location;
use crate::sql::slot::{Slot, SlotExec};
use crate::sql::window::{WindowSpec, WindowTicks};

/// How one batch's merge runs on the executors, sent inside its plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateSpec {
    /// Where the versions are kept (a path every executor sees, or an object-store URL).
    pub root: String,
    /// Where each partition leaves its [`StateReport`].
    pub reports: String,
    pub batch_id: u64,
    pub partitions: usize,
    pub mode: OutputMode,
    pub late_ns: Option<i64>,
    pub evict_ns: Option<i64>,
    pub window: Option<MergeWindow>,
    pub window_key: Option<usize>,
    pub event_time_key: Option<EventTimeKey>,
    pub rows_column: usize,
    pub keys: usize,
    /// The key columns whose hash picks a group's partition: the group keys,
    /// but for overlapping windows the window's, so that every window a
    /// pane adds to is in the pane's partition. Empty: one partition.
    pub partition_keys: Vec<usize>,
    pub dedup: bool,
    pub state_columns: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeWindow {
    pub spec: WindowSpec,
    /// The time column's type, as Arrow writes it.
    pub time_type: String,
}

/// What a partition's merge did, for the driver's progress and watermark.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateReport {
    pub late_rows: u64,
    pub updated_rows: u64,
    pub removed_rows: u64,
    pub dropped_duplicates: u64,
    /// The partition's state after the batch.
    pub rows: u64,
    pub bytes: u64,
    pub earliest_close_ns: Option<i64>,
}

impl StateReport {
    pub fn name(partition: usize) -> String {
        format!("state-{partition}.json")
    }

    pub fn merge(&mut self, other: StateReport) {
        self.late_rows += other.late_rows;
        self.updated_rows += other.updated_rows;
        self.removed_rows += other.removed_rows;
        self.dropped_duplicates += other.dropped_duplicates;
        self.rows += other.rows;
        self.bytes += other.bytes;
        self.earliest_close_ns = match (self.earliest_close_ns, other.earliest_close_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// The batch's outcome as the driver's own merge would have told it.
    pub fn outcome(&self, output: Vec<RecordBatch>) -> StatefulOutcome {
        StatefulOutcome {
            output,
            late_rows: self.late_rows,
            updated_rows: self.updated_rows,
            removed_rows: self.removed_rows,
            dropped_duplicates: self.dropped_duplicates,
            upserts: vec![],
            deletes: vec![],
        }
    }
}

/// The driver's side: the merge as a logical plan node over the batch's
/// partial aggregate, which the scheduler plans into a [`StateMergeExec`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct StateMergeNode {
    /// A [`StateSpec`] as JSON.
    pub spec: String,
    /// The query's merge plan, as DataFusion's protobuf with brook's codec.
    pub merge: Vec<u8>,
    pub input: LogicalPlan,
}

impl UserDefinedLogicalNodeCore for StateMergeNode {
    fn name(&self) -> &str {
        "StateMerge"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        self.input.schema()
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "StateMerge")
    }

    fn with_exprs_and_inputs(&self, _: Vec<Expr>, mut inputs: Vec<LogicalPlan>) -> DFResult<Self> {
        let Some(input) = inputs.pop() else {
            return Err(DataFusionError::Internal(
                "StateMerge takes one input".into(),
            ));
        };
        Ok(Self {
            input,
            ..self.clone()
        })
    }
}

/// Plans a [`StateMergeNode`]: the scheduler's physical planner, with brook's node.
#[derive(Debug, Default)]
pub struct BrookQueryPlanner;

#[async_trait]
impl QueryPlanner for BrookQueryPlanner {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        state: &dyn Session,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(StateMergePlanner)])
            .create_physical_plan(plan, state)
            .await
    }
}

struct StateMergePlanner;

#[async_trait]
impl ExtensionPlanner for StateMergePlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning: &PhysicalPlanningContext,
    ) -> DFResult<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<StateMergeNode>() else {
            return Ok(None);
        };
        let [input] = physical_inputs else {
            return Err(DataFusionError::Internal(
                "StateMerge takes one input".into(),
            ));
        };
        let spec: StateSpec = serde_json::from_str(&node.spec)
            .map_err(|e| DataFusionError::Internal(format!("a state merge's spec: {e}")))?;
        let parts = numbered_partitions(spec.partitions)?;
        Ok(Some(Arc::new(StateMergeExec::new(
            Arc::new(spec),
            Arc::new(node.merge.clone()),
            input.clone(),
            parts,
        ))))
    }
}

/// Merges each partition of a batch's partial rows into that partition's
/// state (see the module's documentation). Which state partition a task's
/// partition is comes from `parts`, a [`numbered_partitions`] table beside
/// the input: Ballista renumbers the partitions a task runs.
#[derive(Debug)]
pub struct StateMergeExec {
    pub spec: Arc<StateSpec>,
    pub merge: Arc<Vec<u8>>,
    input: Arc<dyn ExecutionPlan>,
    parts: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl StateMergeExec {
    pub fn new(
        spec: Arc<StateSpec>,
        merge: Arc<Vec<u8>>,
        input: Arc<dyn ExecutionPlan>,
        parts: Arc<dyn ExecutionPlan>,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            datafusion::physical_plan::execution_plan::EmissionType::Final,
            datafusion::physical_plan::execution_plan::Boundedness::Bounded,
        );
        Self {
            spec,
            merge,
            input,
            parts,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for StateMergeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "BrookStateMergeExec: batch={}, partitions={}",
            self.spec.batch_id, self.spec.partitions
        )
    }
}

impl ExecutionPlan for StateMergeExec {
    fn name(&self) -> &str {
        "BrookStateMergeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input, &self.parts]
    }

    /// A group's rows all reach the partition that keeps its state.
    fn required_input_distribution(&self) -> Vec<Distribution> {
        if self.spec.partition_keys.is_empty() {
            return vec![
                Distribution::SinglePartition,
                Distribution::UnspecifiedDistribution,
            ];
        }
        let schema = self.input.schema();
        let keys = self
            .spec
            .partition_keys
            .iter()
            .map(|&i| Arc::new(Column::new(schema.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
            .collect();
        vec![
            Distribution::KeyPartitioned(keys),
            Distribution::UnspecifiedDistribution,
        ]
    }

    /// The partitions are the state's, as many as it was created with.
    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false, false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let [input, parts] = &children[..] else {
            return Err(DataFusionError::Internal(
                "BrookStateMergeExec takes two children".into(),
            ));
        };
        Ok(Arc::new(Self::new(
            self.spec.clone(),
            self.merge.clone(),
            input.clone(),
            parts.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let partitions = self.input.output_partitioning().partition_count();
        if partitions != self.parts.output_partitioning().partition_count() {
            return Err(external(BrookError::internal(format!(
                "the state is kept in {} partitions, but the batch's rows came in {partitions}",
                self.spec.partitions
            ))));
        }
        let input = self.input.execute(partition, context.clone())?;
        let numbers = self.parts.execute(partition, context.clone())?;
        let (spec, merge) = (self.spec.clone(), self.merge.clone());
        let merged = async move {
            let p = match part_numbers(numbers).await?[..] {
                [p] if p < spec.partitions => p,
                ref other => {
                    return Err(external(BrookError::internal(format!(
                        "a state merge's partition is numbered {other:?}, of {}",
                        spec.partitions
                    ))));
                }
            };
            let rows = merge_partition(&spec, &merge, p, input, context)
                .await
                .map_err(external)?;
            Ok::<_, DataFusionError>(futures::stream::iter(rows.into_iter().map(Ok)))
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.input.schema(),
            futures::stream::once(merged).try_flatten(),
        )))
    }
}

/// The directory of partition `p`'s versions below the state's root.
fn part_dir(p: usize) -> String {
    format!("part-{p}")
}

/// Partition `p`'s version of batch `v`.
fn version_path(root: &Location, p: usize, v: u64) -> Path {
    root.child_path(&format!("{}/{v}.parquet", part_dir(p)))
}

/// Every partition's state as batch `batch_id` left it (or the last batch
/// before it that ran), read by the driver for a restarted query's result.
pub async fn read_state(
    root: &str,
    partitions: usize,
    batch_id: u64,
    schema: &SchemaRef,
    runtime: &RuntimeEnv,
) -> Result<Vec<RecordBatch>> {
    let root = Location::resolve(root, runtime)?;
    let mut rows = vec![];
    for p in 0..partitions {
        if let Some(v) = newest_before(&versions(&root, p).await?, batch_id.saturating_add(1)) {
            rows.extend(read_version(&root, &version_path(&root, p, v), schema).await?);
        }
    }
    Ok(rows)
}

/// One batch's merge of partition `p`: the state rows it emits.
async fn merge_partition(
    spec: &StateSpec,
    merge: &[u8],
    p: usize,
    input: SendableRecordBatchStream,
    ctx: Arc<TaskContext>,
) -> Result<Vec<RecordBatch>> {
    let delta_schema = input.schema();
    let delta: Vec<RecordBatch> = input.try_collect().await?;
    // Decoded for each partition: the plan's slots hold this partition's rows.
    let plan =
        physical_plan_from_bytes_with_extension_codec(merge, &ctx, &BrookPhysicalCodec::default())?;
    let [state_slot, delta_slot] = merge_slots(&plan)?;
    let runtime = ctx.runtime_env();
    let root = Location::resolve(&spec.root, &runtime)?;
    let versions = versions(&root, p).await?;
    let previous = newest_before(&versions, spec.batch_id);
    let mut state = vec![];
    if let Some(v) = previous {
        state = read_version(&root, &version_path(&root, p, v), state_slot.schema()).await?;
    }
    let window = match &spec.window {
        Some(w) => {
            let time_type: DataType = w.time_type.parse().map_err(|e| {
                BrookError::internal(format!("a state merge's window time type: {e}"))
            })?;
            Some(WindowTicks::new(&w.spec, &time_type)?)
        }
        None => None,
    };
    let mut op = StatefulOp {
        partial: MemorySourceConfig::try_new_exec(&[delta], delta_schema.clone(), None)?,
        merge: plan,
        // The driver finalizes the rows every partition emits.
        finalize: Arc::new(EmptyExec::new(delta_schema.clone())),
        state_slot,
        delta_slot,
        emit_slot: Slot::new(&delta_schema),
        window_key: spec.window_key,
        event_time_key: spec.event_time_key.clone(),
        rows_column: spec.rows_column,
        keys: spec.keys,
        state: vec![],
        panes: false,
        emitted_through_ns: None,
        invertible: false,
        running: None,
        dedup: spec.dedup,
        state_columns: spec.state_columns.clone(),
        session_key: None,
        remote: None,
    };
    op.restore(state)?;
    let watermarks = Watermarks {
        late_ns: spec.late_ns,
        evict_ns: spec.evict_ns,
    };
    let (outcome, emit) = op
        .advance(&ctx, spec.mode, watermarks, window.as_ref())
        .await?;
    let kept = concat_batches(op.state_slot.schema(), &op.state)?;
    // A version of a later batch means this batch was committed and the query
    // moved on: this is a stale attempt (the job of a killed driver, still
    // running), whose state may be read from versions already removed. It
    // must not replace what the committed attempt wrote.
    let stale = versions.iter().any(|&v| v > spec.batch_id);
    if !stale {
        write_version(&root, &version_path(&root, p, spec.batch_id), &kept).await?;
    }
    // The version just read stays until a later batch commits over this one.
    for v in versions
        .into_iter()
        .filter(|&v| previous.is_some_and(|prev| v < prev))
    {
        let _ = root.store.delete(&version_path(&root, p, v)).await;
    }
    // Its batch was committed: no driver collects the report.
    if stale {
        return Ok(emit);
    }
    let report = StateReport {
        late_rows: outcome.late_rows,
        updated_rows: outcome.updated_rows,
        removed_rows: outcome.removed_rows,
        dropped_duplicates: outcome.dropped_duplicates,
        rows: kept.num_rows() as u64,
        bytes: kept.get_array_memory_size() as u64,
        earliest_close_ns: op.earliest_close_ns()?,
    };
    put_report(&spec.reports, &StateReport::name(p), &report, &runtime).await?;
    Ok(emit)
}

fn failed(location: &Location, e: &object_store::Error) -> BrookError {
    BrookError::checkpoint(&location.display, location.store_failure(e))
}

/// The state and delta slots of a merge plan, which scans the state first.
pub fn merge_slots(plan: &Arc<dyn ExecutionPlan>) -> Result<[Slot; 2]> {
    let mut slots = vec![];
    plan.apply(|node| {
        if let Some(scan) = node.downcast_ref::<SlotExec>() {
            slots.push(scan.slot().clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    <[Slot; 2]>::try_from(slots).map_err(|s| {
        BrookError::internal(format!(
            "a merge plan scans {} slots, not its state and the batch's rows",
            s.len()
        ))
    })
}

/// The newest of `versions` from before batch `batch_id`.
fn newest_before(versions: &[u64], batch_id: u64) -> Option<u64> {
    versions.iter().copied().filter(|&v| v < batch_id).max()
}

/// The batches partition `p` has a version of.
async fn versions(root: &Location, p: usize) -> Result<Vec<u64>> {
    let dir = root.child_path(&part_dir(p));
    let listed: Vec<_> = match root.store.list(Some(&dir)).try_collect().await {
        Ok(listed) => listed,
        Err(object_store::Error::NotFound { .. }) => vec![],
        Err(e) => return Err(failed(root, &e)),
    };
    Ok(listed
        .iter()
        .filter_map(|meta| {
            meta.location
                .filename()?
                .strip_suffix(".parquet")?
                .parse()
                .ok()
        })
        .collect())
}

async fn read_version(
    root: &Location,
    path: &Path,
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>> {
    let bytes = root
        .store
        .get(path)
        .await
        .map_err(|e| failed(root, &e))?
        .bytes()
        .await
        .map_err(|e| failed(root, &e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut out = vec![];
    for batch in reader {
        out.push(RecordBatch::try_new(
            schema.clone(),
            batch?.columns().to_vec(),
        )?);
    }
    Ok(out)
}

async fn write_version(root: &Location, path: &Path, rows: &RecordBatch) -> Result<()> {
    let mut writer = ArrowWriter::try_new(Vec::new(), rows.schema(), None)?;
    writer.write(rows)?;
    let body = writer.into_inner()?;
    root.store
        .put(path, body.into())
        .await
        .map_err(|e| failed(root, &e))?;
    Ok(())
}
