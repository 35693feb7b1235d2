//! A table whose rows are swapped in before each execution of a plan.
//!
//! Plans are built once per query over slots; each micro-batch fills the slots
//! and re-executes the same physical plans, so SQL is never planned again. A
//! slot is filled either whole (`set`) or through a [`Feed`] while the plan
//! runs, a batch at a time as the source reads them.

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
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
}

type Received = UnboundedReceiver<DFResult<RecordBatch>>;

/// Fills a slot while its plan runs, spreading batches over the partitions;
/// the plan's scans end when the feed is dropped.
pub struct Feed {
    schema: SchemaRef,
    senders: Vec<UnboundedSender<DFResult<RecordBatch>>>,
    next: usize,
}

impl Feed {
    pub fn send(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())?;
        let partition = self.next % self.senders.len();
        self.next += 1;
        // A plan that stopped reading (it failed, or needed no more rows) has
        // dropped its end; what it would have read is not needed.
        let _ = self.senders[partition].send(Ok(batch));
        Ok(())
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
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn set(&self, batches: &[RecordBatch]) -> Result<()> {
        let conformed = batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| RecordBatch::try_new(self.schema.clone(), b.columns().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        *self.rows.write().map_err(poisoned)? = conformed;
        self.fed.lock().map_err(poisoned)?.clear();
        Ok(())
    }

    /// Empties the slot and returns a feed that fills it while a plan over
    /// `partitions` partitions runs.
    pub fn feed(&self, partitions: usize) -> Result<Feed> {
        self.set(&[])?;
        let (senders, receivers) = (0..partitions.max(1))
            .map(|_| {
                let (tx, rx) = unbounded_channel();
                (tx, Some(rx))
            })
            .unzip();
        *self.fed.lock().map_err(poisoned)? = receivers;
        Ok(Feed {
            schema: self.schema.clone(),
            senders,
            next: 0,
        })
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
        Arc::new(SlotTable {
            slot: self.clone(),
            partitions: partitions.max(1),
        })
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> crate::error::BrookError {
    crate::error::BrookError::Plan("slot lock poisoned by a panicked batch".into())
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
    fn new(slot: Slot, projection: Option<Vec<usize>>, partitions: usize) -> DFResult<Self> {
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
