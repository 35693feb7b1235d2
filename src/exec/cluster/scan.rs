//! The scan of a batch's input on a cluster: each partition reads one part of
//! the batch (a file, or a Kafka partition's offset range) with brook's own
//! readers (as the driver's source would), adds the window panes, and leaves
//! what it read (rows, malformed records, the largest event time) in a small
//! file the driver collects after the job.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use datafusion::arrow::ipc::convert::try_schema_from_flatbuffer_bytes;
use datafusion::arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result as DFResult, project_schema};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::absolute;
use crate::catalog::SourceKind;
use crate::error::{BrookError, Result};
use crate::exec::compile::{Input, InputWindow};
use crate::exec::read::ReadStats;
use crate::source::file::{read_files, split_offset};
use crate::source::format::DecodeOptions;
use crate::source::kafka::{RangeReader, split_ranges};
use crate::source::location::Location;
use crate::source::{SourceBatch, SourceOffset};
use crate::sql::window::{WindowSpec, WindowTicks};

/// What a batch's scan reads, sent to the cluster inside its plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanSpec {
    /// The source table, for messages.
    pub source: String,
    /// Which of the query's inputs it is, naming its tasks' reports.
    pub index: usize,
    pub input: ScanInput,
    /// The rows the scan gives (the source's, and the pane column last with
    /// a window), as Arrow IPC's flatbuffer schema.
    pub schema: Vec<u8>,
    pub window: Option<ScanWindow>,
    /// The watermark column, whose largest value the tasks report.
    pub watermark_column: Option<String>,
    /// The batch, for the executors' messages.
    pub batch_id: u64,
    /// One part per task (a file, or a Kafka partition's range), as the
    /// source's offsets name them.
    pub parts: Vec<serde_json::Value>,
    /// Where each task writes what it read (`<part>.json`).
    pub stats: String,
}

/// Where a scan's rows come from, and how they are read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ScanInput {
    Files {
        /// A path every executor sees, or an object-store URL.
        location: String,
        decode: DecodeOptions,
    },
    Kafka(RangeReader),
}

impl ScanInput {
    /// The parts of a batch's `offset` that tasks read one each.
    pub fn split(&self, offset: &SourceOffset) -> Result<Vec<SourceOffset>> {
        match self {
            ScanInput::Files { .. } => split_offset(offset),
            ScanInput::Kafka(_) => split_ranges(offset),
        }
    }

    /// Reads `part` into rows of `schema`.
    async fn read(
        &self,
        schema: SchemaRef,
        part: &SourceOffset,
        runtime: &RuntimeEnv,
    ) -> Result<SourceBatch> {
        match self {
            ScanInput::Files { location, decode } => {
                let location = Location::resolve(location, runtime)?;
                read_files(&location, Arc::new(decode.decoder(schema)), part).await
            }
            ScanInput::Kafka(reader) => reader.read(schema, part).await,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanWindow {
    pub spec: WindowSpec,
    pub time_column: usize,
}

pub fn schema_bytes(schema: &Schema) -> Vec<u8> {
    IpcDataGenerator::default()
        .schema_to_bytes_with_dictionary_tracker(
            schema,
            &mut DictionaryTracker::new(false),
            &IpcWriteOptions::default(),
        )
        .ipc_message
}

impl ScanSpec {
    /// The scan of the query's input `index`, but a batch's parts.
    pub fn of(index: usize, input: &Input) -> Result<Self> {
        let read = match &input.source.kind {
            SourceKind::Files {
                location, decode, ..
            } => ScanInput::Files {
                location: absolute(location)?,
                decode: decode.clone(),
            },
            SourceKind::Kafka { options, value } => {
                ScanInput::Kafka(RangeReader::new(options, value))
            }
        };
        Ok(Self {
            source: input.source.name.clone(),
            index,
            input: read,
            schema: schema_bytes(input.slot.schema()),
            window: input.window.as_ref().map(|w| ScanWindow {
                spec: w.spec.clone(),
                time_column: w.time_column,
            }),
            watermark_column: input.source.watermark.as_ref().map(|w| w.column.clone()),
            batch_id: 0,
            parts: vec![],
            stats: String::new(),
        })
    }

    pub fn schema(&self) -> Result<SchemaRef> {
        let schema = try_schema_from_flatbuffer_bytes(&self.schema).map_err(|e| {
            BrookError::internal(format!("a cluster scan's schema is unreadable: {e}"))
        })?;
        Ok(Arc::new(schema))
    }

    /// The name of part `i`'s stats file below [`stats`](Self::stats).
    pub fn stats_name(&self, i: usize) -> String {
        format!("{}-{i}.json", self.index)
    }
}

/// A batch's input as a table, which the cluster's scheduler plans into a [`ScanExec`].
#[derive(Debug)]
pub struct ScanTable {
    pub spec: Arc<ScanSpec>,
    schema: SchemaRef,
}

impl ScanTable {
    pub fn new(spec: ScanSpec) -> Result<Self> {
        let schema = spec.schema()?;
        Ok(Self {
            spec: Arc::new(spec),
            schema,
        })
    }
}

#[async_trait::async_trait]
impl TableProvider for ScanTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(ScanExec::new(
            self.spec.clone(),
            projection.cloned(),
        )?))
    }
}

/// Reads one part of a batch per partition (see the module's documentation).
///
/// Which part a partition reads comes from its child, a
/// [`numbered_partitions`] table, so that each task reads its own parts, not
/// all of them.
#[derive(Debug)]
pub struct ScanExec {
    pub spec: Arc<ScanSpec>,
    pub projection: Option<Vec<usize>>,
    parts: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

const PART_COLUMN: &str = "part";

impl ScanExec {
    pub fn new(spec: Arc<ScanSpec>, projection: Option<Vec<usize>>) -> DFResult<Self> {
        // A batch without input (it closes state the executors keep) reads nothing.
        let parts = match spec.parts.len() {
            0 => MemorySourceConfig::try_new_exec(&[vec![]], numbers_schema(), None)?,
            n => numbered_partitions(n)?,
        };
        Self::over(spec, projection, parts)
    }

    /// The scan of the parts that `parts` numbers.
    pub fn over(
        spec: Arc<ScanSpec>,
        projection: Option<Vec<usize>>,
        parts: Arc<dyn ExecutionPlan>,
    ) -> DFResult<Self> {
        let full = spec.schema().map_err(external)?;
        let schema = project_schema(&full, projection.as_ref())?;
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(
                parts.properties().output_partitioning().partition_count(),
            ),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Self {
            spec,
            projection,
            parts,
            schema,
            properties: Arc::new(properties),
        })
    }
}

impl DisplayAs for ScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "BrookScanExec: source={}, batch={}, parts={}",
            self.spec.source,
            self.spec.batch_id,
            self.spec.parts.len()
        )
    }
}

impl ExecutionPlan for ScanExec {
    fn name(&self) -> &str {
        "BrookScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.parts]
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
        let [parts] = &children[..] else {
            return Err(DataFusionError::Internal(
                "BrookScanExec takes one child".into(),
            ));
        };
        Ok(Arc::new(Self::over(
            self.spec.clone(),
            self.projection.clone(),
            parts.clone(),
        )?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let spec = self.spec.clone();
        let projection = self.projection.clone();
        let numbers = self.parts.execute(partition, context.clone())?;
        let read = async move {
            let mut batches = vec![];
            for part in part_numbers(numbers).await? {
                batches.extend(read_part(&spec, part, &context).await.map_err(external)?);
            }
            let projected: DFResult<Vec<RecordBatch>> = batches
                .into_iter()
                .map(|b| match &projection {
                    Some(p) => Ok(b.project(p)?),
                    None => Ok(b),
                })
                .collect();
            Ok::<_, DataFusionError>(futures::stream::iter(projected?.into_iter().map(Ok)))
        };
        let stream = futures::stream::once(read).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

fn numbers_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        PART_COLUMN,
        DataType::UInt64,
        false,
    )]))
}

/// A memory table of `n` partitions, partition `i` holding the number `i`:
/// a task that runs some of a stage's partitions learns which from it.
/// Ballista gives a task several partitions of a stage by cutting the plan's
/// leaves down to them, and renumbers them from 0; it knows how to cut a
/// memory table, not a plan node of brook's.
pub fn numbered_partitions(n: usize) -> DFResult<Arc<dyn ExecutionPlan>> {
    let numbers = numbers_schema();
    let partitions = (0..n as u64)
        .map(|i| {
            let column = Arc::new(UInt64Array::from(vec![i]));
            Ok(vec![RecordBatch::try_new(numbers.clone(), vec![column])?])
        })
        .collect::<DFResult<Vec<_>>>()?;
    Ok(MemorySourceConfig::try_new_exec(
        &partitions,
        numbers,
        None,
    )?)
}

/// The numbers a partition of a [`numbered_partitions`] table holds.
pub async fn part_numbers(mut numbers: SendableRecordBatchStream) -> DFResult<Vec<usize>> {
    let mut parts = vec![];
    while let Some(batch) = numbers.next().await {
        let batch = batch?;
        let column = batch
            .columns()
            .first()
            .and_then(|c| c.as_primitive_opt::<UInt64Type>())
            .ok_or_else(|| {
                DataFusionError::Internal("a cluster scan's part numbers are not numbers".into())
            })?;
        parts.extend(column.values().iter().map(|&i| i as usize));
    }
    Ok(parts)
}

pub fn external(e: BrookError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Reads part `i` of `spec`, with panes, and writes what it read to its stats file.
async fn read_part(spec: &ScanSpec, i: usize, ctx: &TaskContext) -> Result<Vec<RecordBatch>> {
    let schema = spec.schema()?;
    let Some(part) = spec.parts.get(i) else {
        return Err(BrookError::internal(format!(
            "a cluster scan was asked for part {i} of a batch of {}",
            spec.parts.len()
        )));
    };
    let runtime = ctx.runtime_env();
    let read_schema = match &spec.window {
        Some(_) => Arc::new(Schema::new(
            schema.fields()[..schema.fields().len().saturating_sub(1)].to_vec(),
        )),
        None => schema.clone(),
    };
    let window = match &spec.window {
        Some(w) => Some(InputWindow {
            ticks: WindowTicks::new(&w.spec, read_schema.field(w.time_column).data_type())?,
            spec: w.spec.clone(),
            time_column: w.time_column,
        }),
        None => None,
    };
    let part = SourceOffset(part.clone());
    let read = spec.input.read(read_schema, &part, &runtime).await?;
    let mut stats = ReadStats {
        malformed: read.malformed,
        ..ReadStats::default()
    };
    let mut batches = Vec::with_capacity(read.batches.len());
    for batch in read.batches {
        let watermark = spec.watermark_column.as_deref();
        batches.push(stats.take(batch, watermark, window.as_ref(), &schema)?);
    }
    put_report(&spec.stats, &spec.stats_name(i), &stats, &runtime).await?;
    Ok(batches)
}

/// Leaves a task's `report` as `name` in `dir`, where the driver collects it
/// after the job.
pub async fn put_report(
    dir: &str,
    name: &str,
    report: &impl Serialize,
    runtime: &RuntimeEnv,
) -> Result<()> {
    let out = Location::resolve(dir, runtime)?;
    let body = serde_json::to_vec(report).map_err(|e| BrookError::serde("a task's report", e))?;
    out.store
        .put(&out.child(name), body.into())
        .await
        .map_err(|e| BrookError::Source {
            location: out.display.clone(),
            message: out.store_failure(&e),
        })?;
    Ok(())
}
