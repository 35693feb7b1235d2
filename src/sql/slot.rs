//! A table whose rows are swapped in before each execution of a plan.
//!
//! Plans are built once per query over slots; each micro-batch fills the slots
//! and re-executes the same physical plans, so SQL is never planned again. A
//! slot is filled either whole (`set`) or through a [`Feed`] while the plan
//! runs, a batch at a time as the source reads them.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use futures::StreamExt;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::error::Result;

/// Rows shared between the engine, which fills them, and the plans that read them.
#[derive(Debug, Clone)]
pub struct Slot {
    schema: SchemaRef,
    rows: Arc<RwLock<Vec<RecordBatch>>>,
    /// A feed's receiving ends, one per partition, each taken by the plan's scan of it.
    fed: Arc<Mutex<Vec<Option<Received>>>>,
    /// The partitions of the slot's scans, fixed when its table is made.
    partitions: Arc<AtomicUsize>,
}

type Received = UnboundedReceiver<DFResult<RecordBatch>>;

/// Fills a slot for one run of a plan. A plan that scans the slot once reads
/// the rows as they are sent, spread over its partitions, and its scans end
/// when the feed is finished; otherwise the rows are kept and set when the
/// feed is finished, before the plan runs.
pub struct Feed {
    slot: Slot,
    senders: Vec<UnboundedSender<DFResult<RecordBatch>>>,
    kept: Vec<RecordBatch>,
    next: usize,
}

impl Feed {
    /// Whether the plan reads the rows as they are sent, so it runs meanwhile.
    pub fn streams(&self) -> bool {
        !self.senders.is_empty()
    }

    /// The schema of the slot's rows.
    pub fn schema(&self) -> &SchemaRef {
        self.slot.schema()
    }

    pub fn send(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.senders.is_empty() {
            // `finish` sets them, which conforms them to the slot's schema.
            self.kept.push(batch.clone());
            return Ok(());
        }
        let batch = self.slot.conform(batch)?;
        let partition = self.next % self.senders.len();
        self.next += 1;
        // A plan that stopped reading (it failed) has dropped its end; what it
        // would have read is not needed.
        let _ = self.senders[partition].send(Ok(batch));
        Ok(())
    }

    /// All the rows are sent.
    pub fn finish(self) -> Result<()> {
        match self.senders.is_empty() {
            true => self.slot.set(&self.kept),
            false => Ok(()),
        }
    }

    /// Makes every scan of the slot fail: the input could not be read whole.
    pub fn fail(self, why: &str) {
        for sender in &self.senders {
            let _ = sender.send(Err(DataFusionError::Execution(why.to_string())));
        }
    }
}

impl Slot {
    /// A slot whose columns are all nullable, so any batch of the right types fits.
    pub fn new(schema: &Schema) -> Self {
        let fields: Vec<_> = schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        Self {
            schema: Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
            rows: Arc::default(),
            fed: Arc::default(),
            partitions: Arc::new(AtomicUsize::new(1)),
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Whether `other` is this slot (a clone of it), not another of the same rows' type.
    pub fn same(&self, other: &Slot) -> bool {
        Arc::ptr_eq(&self.rows, &other.rows)
    }

    pub fn set(&self, batches: &[RecordBatch]) -> Result<()> {
        let conformed = batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| self.conform(b))
            .collect::<Result<Vec<_>>>()?;
        *self.rows.write().map_err(poisoned)? = conformed;
        self.fed.lock().map_err(poisoned)?.clear();
        Ok(())
    }

    /// `batch` as a batch of the slot's schema (its columns all nullable).
    fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            self.schema.clone(),
            batch.columns().to_vec(),
        )?)
    }

    /// Empties the slot and returns a feed for the next run of `plan`: rows
    /// stream into it while it runs if it scans the slot once (a second scan
    /// could not read them again), or are set whole before it runs.
    pub fn feed(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<Feed> {
        self.set(&[])?;
        let mut feed = Feed {
            slot: self.clone(),
            senders: vec![],
            kept: vec![],
            next: 0,
        };
        if self.scans(plan)? == 1 {
            let partitions = self.partitions.load(Ordering::Relaxed).max(1);
            let (senders, receivers) = (0..partitions)
                .map(|_| {
                    let (tx, rx) = unbounded_channel();
                    (tx, Some(rx))
                })
                .unzip();
            *self.fed.lock().map_err(poisoned)? = receivers;
            feed.senders = senders;
        }
        Ok(feed)
    }

    /// How many times `plan` scans this slot.
    fn scans(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<usize> {
        let mut scans = 0;
        plan.apply(|node| {
            if let Some(scan) = node.downcast_ref::<SlotExec>()
                && Arc::ptr_eq(&scan.slot.rows, &self.rows)
            {
                scans += 1;
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(scans)
    }

    /// The fed rows of `partition`, if the slot is being fed.
    fn take_fed(&self, partition: usize) -> DFResult<Option<Received>> {
        let mut fed = self
            .fed
            .lock()
            .map_err(|_| DataFusionError::Internal("slot lock poisoned".into()))?;
        if fed.is_empty() {
            return Ok(None);
        }
        match fed.get_mut(partition).and_then(Option::take) {
            Some(rx) => Ok(Some(rx)),
            None => Err(DataFusionError::Internal(format!(
                "the feed of partition {partition} was read twice"
            ))),
        }
    }

    fn get(&self) -> DFResult<Vec<RecordBatch>> {
        self.rows
            .read()
            .map(|rows| rows.clone())
            .map_err(|_| DataFusionError::Internal("slot lock poisoned".into()))
    }

    pub fn table(&self, partitions: usize) -> Arc<SlotTable> {
        self.partitions.store(partitions.max(1), Ordering::Relaxed);
        Arc::new(SlotTable {
            slot: self.clone(),
            partitions: partitions.max(1),
        })
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> crate::error::BrookError {
    crate::error::BrookError::poisoned("slot")
}

#[derive(Debug)]
pub struct SlotTable {
    slot: Slot,
    partitions: usize,
}

#[async_trait]
impl TableProvider for SlotTable {
    fn schema(&self) -> SchemaRef {
        self.slot.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(SlotExec::new(
            self.slot.clone(),
            projection.cloned(),
            self.partitions,
        )?))
    }
}

/// Reads the slot's rows at execution time, spread round-robin over partitions.
#[derive(Debug)]
pub struct SlotExec {
    slot: Slot,
    projection: Option<Vec<usize>>,
    partitions: usize,
    properties: Arc<PlanProperties>,
}

impl SlotExec {
    pub fn new(slot: Slot, projection: Option<Vec<usize>>, partitions: usize) -> DFResult<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(slot.schema.project(p)?),
            None => slot.schema.clone(),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Self {
            slot,
            projection,
            partitions,
            properties: Arc::new(properties),
        })
    }
}

impl SlotExec {
    pub fn slot(&self) -> &Slot {
        &self.slot
    }

    pub fn projection(&self) -> Option<&Vec<usize>> {
        self.projection.as_ref()
    }

    pub fn partitions(&self) -> usize {
        self.partitions
    }
}

impl DisplayAs for SlotExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SlotExec: partitions={}", self.partitions)
    }
}

impl ExecutionPlan for SlotExec {
    fn name(&self) -> &str {
        "SlotExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let schema = self.properties.eq_properties.schema().clone();
        if let Some(rx) = self.slot.take_fed(partition)? {
            let projection = self.projection.clone();
            let batches =
                futures::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|b| (b, rx)) })
                    .map(move |b| match &projection {
                        Some(p) => b.and_then(|b| b.project(p).map_err(DataFusionError::from)),
                        None => b,
                    });
            return Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)));
        }
        let batches: Vec<DFResult<RecordBatch>> = self
            .slot
            .get()?
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.partitions == partition)
            .map(|(_, b)| match &self.projection {
                Some(p) => b.project(p).map_err(DataFusionError::from),
                None => Ok(b),
            })
            .collect();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(batches),
        )))
    }
}
