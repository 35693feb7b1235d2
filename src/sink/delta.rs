//! Writes each batch as one commit of a Delta Lake table (`STORED AS DELTA`).
//!
//! As Spark's Delta sink: every commit carries a `txn` action whose app id is
//! the query's id and whose version is the batch id, so a batch re-run after a
//! crash between the Delta commit and brook's own checkpoint is found in the
//! table's log and skipped. Parquet files written before a crash stop the
//! commit stay unreferenced, invisible to readers (VACUUM removes them).
//! Append mode appends, complete mode overwrites the table in one commit, and
//! update mode MERGEs the batch's rows on the aggregation's group keys.
//!
//! The table is read and written through brook's own object store for the
//! location, so local directories, `memory://` and `s3://` behave alike.
//!
//! Work that delta-rs would do inside some commits runs in one background
//! task per table instead, so that no batch waits for it: OPTIMIZE every
//! `compactEvery` batches, a log checkpoint every `delta.checkpointInterval`
//! commits with the expired-log clean-up that follows it, and VACUUM when
//! `vacuumRetention` is set. Appends commit while it runs (Delta lets a blind
//! append pass a compaction); a MERGE waits for it.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::Column;
use datafusion::logical_expr::{Expr, Operator, binary_expr};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::prelude::SessionContext;
use deltalake::kernel::DataType as DeltaType;
use deltalake::kernel::Transaction;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitProperties, TransactionError};
use deltalake::logstore::{StorageConfig, default_logstore};
use deltalake::protocol::SaveMode;
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError, checkpoints};
use tokio::sync::Mutex;
use url::Url;

use super::compact::AutoCompact;
use super::upkeep::Upkeep;
use super::{GroupKeys, Sink, parquet};
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::options::Options;
use crate::source::location::Location;
use crate::testing::faults;

/// The options a Delta sink table takes besides every sink's.
#[derive(Debug, Clone, Default)]
pub struct DeltaOptions {
    /// OPTIMIZE (bin-packing to `targetFileSize`) after every `compactEvery` batches.
    pub compact: Option<AutoCompact>,
    /// VACUUM the files removed from the table longer ago than this; without
    /// it files are never deleted, as with delta-rs and Spark.
    pub vacuum_retention: Option<Duration>,
    /// Parquet's writer options ([`parquet::OPTIONS`]), as file sinks take them.
    pub writer: Options,
}

impl DeltaOptions {
    pub const OPTIONS: &[&str] = &["vacuumRetention"];

    /// Every option a Delta sink table takes besides every sink's.
    pub fn options() -> Vec<&'static str> {
        [Self::OPTIONS, AutoCompact::OPTIONS, parquet::OPTIONS].concat()
    }

    pub fn from_options(options: &Options) -> Result<Self> {
        Ok(Self {
            compact: AutoCompact::from_options(options)?,
            vacuum_retention: options.duration("vacuumRetention")?,
            writer: parquet::OPTIONS
                .iter()
                .filter_map(|k| options.get(k).map(|v| (*k, v)))
                .collect(),
        })
    }
}

#[derive(Debug)]
pub struct DeltaSink {
    location: Location,
    partition_by: Vec<String>,
    options: DeltaOptions,
    opened: Mutex<Option<Opened>>,
}

#[derive(Debug)]
struct Opened {
    /// The table as of its last commit; `None` until the first one.
    table: Option<DeltaTable>,
    /// The last batch this query committed, once known: a batch delivered
    /// again is then skipped without reading the table's log.
    committed: Option<u64>,
    upkeep: Upkeep<DeltaTable>,
    /// The version whose commit makes the next log checkpoint due, once known.
    checkpoint_at: Option<u64>,
    app_id: String,
    mode: OutputMode,
    /// The schema written: the query's, with timestamps in microseconds.
    schema: SchemaRef,
    /// The Parquet settings of every file the sink writes or compacts.
    props: WriterProperties,
    keys: Vec<String>,
}

type DeltaResult<T> = std::result::Result<T, DeltaTableError>;

/// What one upkeep task does, in this order.
struct Chores {
    /// OPTIMIZE to this file size.
    compact: Option<u64>,
    checkpoint: bool,
    /// VACUUM files removed longer ago than this.
    vacuum: Option<Duration>,
    props: WriterProperties,
}

/// The smallest version at or after `version` at which Delta's rule (as
/// delta-rs applies it on commit) asks for a log checkpoint.
fn checkpoint_due_at(version: u64, interval: u64) -> u64 {
    (version + 1).div_ceil(interval) * interval - 1
}

/// Commits that leave log checkpoints and log clean-up to the upkeep task:
/// delta-rs would otherwise write the checkpoint inside every hundredth
/// commit and list the whole `_delta_log` after every one.
fn lean_commit() -> CommitProperties {
    CommitProperties::default()
        .with_create_checkpoint(false)
        .with_cleanup_expired_logs(Some(false))
}

/// Whether `e` is Delta's optimistic concurrency refusing a commit: another
/// commit (the upkeep's, the batch's, or `brook compact` in another process)
/// changed the files this one read since its snapshot.
fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_)
        }
    )
}

/// How often a commit Delta refused for a conflict is tried, each time on the newest version.
const CONFLICT_ATTEMPTS: usize = 3;

async fn upkeep(mut table: DeltaTable, chores: Chores) -> DeltaResult<DeltaTable> {
    if let Some(size) = chores.compact {
        // A compaction that lost to another commit leaves the files as they
        // were: the next one packs them.
        match optimize(table.clone(), Some(size), chores.props, lean_commit()).await {
            Ok((compacted, _)) => table = compacted,
            Err(e) if is_conflict(&e) => {
                tracing::info!("Delta compaction skipped, another commit came first: {e}")
            }
            Err(e) => return Err(e),
        }
    }
    if chores.checkpoint {
        checkpoints::create_checkpoint(&table, None).await?;
        if table
            .snapshot()?
            .table_config()
            .enable_expired_log_cleanup()
        {
            checkpoints::cleanup_metadata(&table, None).await?;
        }
    }
    if let Some(retention) = chores.vacuum {
        let retention = chrono::Duration::from_std(retention)
            .map_err(|e| DeltaTableError::Generic(format!("vacuumRetention: {e}")))?;
        // VACUUM's first commit counts every file as read, so a batch that
        // replaced them meanwhile (complete mode) refuses it. It deletes
        // nothing before that commit: it is tried again on the newest version.
        for attempt in 1..=CONFLICT_ATTEMPTS {
            table.update_incremental(None).await?;
            let vacuum = table
                .clone()
                .vacuum()
                .with_retention_period(retention)
                // The option is the user's choice of retention, below Delta's
                // default of a week if they like.
                .with_enforce_retention_duration(false)
                .with_commit_properties(lean_commit());
            match vacuum.await {
                Ok((vacuumed, _)) => {
                    table = vacuumed;
                    break;
                }
                Err(e) if is_conflict(&e) && attempt < CONFLICT_ATTEMPTS => {}
                Err(e) if is_conflict(&e) => {
                    tracing::info!("Delta VACUUM skipped, other commits came first: {e}")
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(table)
}

/// The URL delta-rs knows the table by; brook's store serves it.
fn table_url(location: &Location) -> Result<Url> {
    let url = match &location.local_dir {
        Some(dir) => Url::from_directory_path(dir).ok(),
        None => Url::parse(&location.display).ok(),
    };
    url.ok_or_else(|| BrookError::Sink {
        sink: location.display.clone(),
        message: "the location is not a valid table URL".into(),
    })
}

/// The table at `location`, loaded; `None` if there is no Delta table there yet.
async fn load(location: &Location) -> Result<(DeltaTable, bool)> {
    let delta = |source| BrookError::delta(&location.display, source);
    let url = table_url(location)?;
    // A log store over brook's own store, whatever the scheme: delta-rs's
    // registry of stores by scheme would need a cloud crate for s3://.
    let config = StorageConfig::default();
    let prefixed = config
        .decorate_store(location.store.clone(), &url)
        .map_err(delta)?;
    let log_store = default_logstore(Arc::new(prefixed), location.store.clone(), &url, &config);
    // Asked first: loading a table that is not there yet logs errors from the
    // Delta kernel that a new sink's user would take for failures.
    if !log_store.is_delta_table_location().await.map_err(delta)? {
        return Ok((DeltaTable::new(log_store), false));
    }
    let mut table = DeltaTable::new(log_store);
    match table.load().await {
        Ok(()) => Ok((table, true)),
        Err(DeltaTableError::NotATable(_)) => Ok((table, false)),
        Err(e) => Err(delta(e)),
    }
}

/// Delta stores timestamps in microseconds, as instants (`timestamp`, UTC) or
/// wall-clock times (`timestamp_ntz`); brook's are nanoseconds.
fn delta_type(t: &DataType) -> DataType {
    match t {
        DataType::Timestamp(_, None) => DataType::Timestamp(TimeUnit::Microsecond, None),
        DataType::Timestamp(_, Some(_)) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        other => other.clone(),
    }
}

fn delta_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_data_type(delta_type(f.data_type())))
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `batch` with the columns of `schema`: timestamps cast to microseconds.
fn to_delta(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                cast(c, f.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn column(qualifier: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(qualifier), name))
}

impl DeltaSink {
    pub fn new(location: Location, partition_by: Vec<String>, options: DeltaOptions) -> Self {
        Self {
            location,
            partition_by,
            options,
            opened: Mutex::new(None),
        }
    }

    fn error(&self, message: impl Into<String>) -> BrookError {
        BrookError::Sink {
            sink: self.location.display.clone(),
            message: message.into(),
        }
    }

    fn delta(&self, source: DeltaTableError) -> BrookError {
        BrookError::delta(&self.location.display, source)
    }

    /// Waits for the upkeep task, if one runs; its table is taken when newer
    /// than the sink's. Its failure is the query's.
    async fn settle_upkeep(&self, opened: &mut Opened, finished_only: bool) -> Result<()> {
        let settled = if finished_only {
            opened.upkeep.settle_finished().await?
        } else {
            opened.upkeep.settle().await?
        };
        if let Some(table) = settled
            && table.version() > opened.table.as_ref().and_then(DeltaTable::version)
        {
            opened.table = Some(table);
        }
        Ok(())
    }

    /// Starts the upkeep that is due, unless a task still runs (then it waits
    /// for a later batch).
    fn start_upkeep(&self, opened: &mut Opened) -> Result<()> {
        let Some(table) = opened
            .table
            .as_ref()
            .filter(|_| !opened.upkeep.is_running())
        else {
            return Ok(());
        };
        let version = table.version().unwrap_or(0);
        let interval = table
            .snapshot()
            .map_err(|e| self.delta(e))?
            .table_config()
            .checkpoint_interval()
            .get();
        let at = *opened
            .checkpoint_at
            .get_or_insert_with(|| checkpoint_due_at(version, interval));
        let checkpoint = version >= at;
        let compact = opened.upkeep.due;
        if !checkpoint && !compact {
            return Ok(());
        }
        if checkpoint {
            opened.checkpoint_at = Some(checkpoint_due_at(version + 1, interval));
        }
        let chores = Chores {
            compact: compact
                .then(|| self.options.compact.map(|c| c.target_file_size))
                .flatten(),
            checkpoint,
            vacuum: self.options.vacuum_retention,
            props: opened.props.clone(),
        };
        let table = table.clone();
        let location = self.location.display.clone();
        opened.upkeep.start(async move {
            upkeep(table, chores)
                .await
                .map_err(|e| BrookError::delta(location, e))
        })
    }

    /// Refuses a table that exists with other columns or other partitioning.
    fn check_existing(&self, table: &DeltaTable, schema: &SchemaRef) -> Result<()> {
        let snapshot = table.snapshot().map_err(|e| self.delta(e))?;
        let existing = snapshot.schema();
        let mut differ = vec![];
        for f in schema.fields() {
            let ours: std::result::Result<DeltaType, _> = f.data_type().try_into_kernel();
            match (existing.field(f.name()), ours) {
                (None, _) => differ.push(format!("'{}' is not in the table", f.name())),
                (Some(theirs), Ok(ours)) if *theirs.data_type() != ours => differ.push(format!(
                    "'{}' is {} in the table, {} in the query",
                    f.name(),
                    theirs.data_type(),
                    ours
                )),
                (Some(_), Ok(_)) => {}
                (Some(_), Err(e)) => differ.push(format!(
                    "'{}' ({}) has no Delta type: {e}",
                    f.name(),
                    f.data_type()
                )),
            }
        }
        for f in existing.fields() {
            if schema.field_with_name(f.name()).is_err() {
                differ.push(format!("'{}' is not in the query's output", f.name()));
            }
        }
        if !differ.is_empty() {
            return Err(self.error(format!(
                "the Delta table there has other columns than the query writes: {}; write to \
                 a new location, or make the query's columns match the table's",
                differ.join(", ")
            )));
        }
        let partitioned = snapshot.metadata().partition_columns();
        if *partitioned != self.partition_by {
            return Err(self.error(format!(
                "the Delta table there is partitioned by ({}), the sink table by ({})",
                partitioned.join(", "),
                self.partition_by.join(", ")
            )));
        }
        Ok(())
    }

    /// Batch `batch_id` as one commit; the table after it.
    async fn commit(
        &self,
        opened: &Opened,
        batch_id: u64,
        batches: Vec<RecordBatch>,
    ) -> Result<DeltaTable> {
        let txn = lean_commit().with_application_transaction(Transaction::new(
            &opened.app_id,
            i64::try_from(batch_id).map_err(|_| self.error("batch id out of range"))?,
        ));
        let mut batches = batches
            .iter()
            .map(|b| to_delta(b, &opened.schema))
            .collect::<Result<Vec<_>>>()?;
        if batches.is_empty() {
            // A commit even without rows: it records the batch, and a complete
            // result may be empty.
            batches.push(RecordBatch::new_empty(opened.schema.clone()));
        }
        let (table, exists) = match &opened.table {
            Some(table) => (table.clone(), true),
            None => load(&self.location).await?,
        };
        if opened.mode == OutputMode::Update && exists {
            return self.merge(table, opened, batches, txn).await;
        }
        let save = match opened.mode {
            OutputMode::Complete => SaveMode::Overwrite,
            _ => SaveMode::Append,
        };
        table
            .write(batches)
            .with_save_mode(save)
            .with_partition_columns(self.partition_by.clone())
            .with_writer_properties(opened.props.clone())
            .with_commit_properties(txn)
            .await
            .map_err(|e| self.delta(e))
    }

    /// The batch's rows merged on the group keys: a group's row replaced, a new group's inserted.
    async fn merge(
        &self,
        table: DeltaTable,
        opened: &Opened,
        batches: Vec<RecordBatch>,
        txn: CommitProperties,
    ) -> Result<DeltaTable> {
        let source = SessionContext::new().read_batches(batches)?;
        let predicate = opened
            .keys
            .iter()
            .map(|k| binary_expr(column("t", k), Operator::IsNotDistinctFrom, column("s", k)))
            .reduce(Expr::and)
            .ok_or_else(|| self.error("update mode without group keys"))?;
        let names: Vec<&String> = opened.schema.fields().iter().map(|f| f.name()).collect();
        let values: Vec<&String> = names
            .iter()
            .copied()
            .filter(|n| !opened.keys.contains(*n))
            .collect();
        let mut merge = table
            .merge(source, predicate)
            .with_source_alias("s")
            .with_target_alias("t")
            .with_writer_properties(opened.props.clone())
            .with_commit_properties(txn);
        if !values.is_empty() {
            merge = merge
                .when_matched_update(|u| {
                    values.iter().fold(u, |u, n| {
                        u.update(Column::new_unqualified(*n), column("s", n))
                    })
                })
                .map_err(|e| self.delta(e))?;
        }
        let merge = merge
            .when_not_matched_insert(|i| {
                names
                    .iter()
                    .fold(i, |i, n| i.set(Column::new_unqualified(*n), column("s", n)))
            })
            .map_err(|e| self.delta(e))?;
        let (table, _) = merge.await.map_err(|e| self.delta(e))?;
        Ok(table)
    }
}

#[async_trait]
impl Sink for DeltaSink {
    fn describe(&self) -> String {
        format!("DeltaSink[{}]", self.location.display)
    }

    async fn open(&self, schema: &SchemaRef, mode: OutputMode, query_id: &str) -> Result<()> {
        self.open_keyed(schema, mode, query_id, &GroupKeys::None)
            .await
    }

    async fn open_keyed(
        &self,
        schema: &SchemaRef,
        mode: OutputMode,
        query_id: &str,
        keys: &GroupKeys,
    ) -> Result<()> {
        let columns = || {
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unknown: Vec<&str> = self
            .partition_by
            .iter()
            .filter(|c| schema.field_with_name(c).is_err())
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(self.error(format!(
                "PARTITIONED BY names {}, which the query does not output; its columns: {}",
                unknown.join(", "),
                columns()
            )));
        }
        let keys = match (mode, keys) {
            (OutputMode::Update, GroupKeys::Columns(keys)) => keys.clone(),
            (OutputMode::Update, GroupKeys::Missing(missing)) => {
                return Err(self.error(format!(
                    "output mode 'update' merges rows on the GROUP BY keys, but {} not in the \
                     query's output (its columns: {}); select each group key, or use \
                     'complete'",
                    match missing.as_slice() {
                        [one] => format!("{one} is"),
                        many => format!("{} are", many.join(", ")),
                    },
                    columns()
                )));
            }
            (OutputMode::Update, GroupKeys::None) => {
                return Err(self.error(format!(
                    "output mode 'update' merges rows on the GROUP BY keys, and this query has \
                     no GROUP BY (its columns: {}); use 'append'",
                    columns()
                )));
            }
            _ => vec![],
        };
        if mode == OutputMode::Complete && self.options.compact.is_some() {
            return Err(self.error(
                "option 'compactEvery' compacts the files of an append- or update-mode table; \
                 in complete mode each commit replaces the whole table, so there is nothing to \
                 compact: drop the option ('vacuumRetention' deletes the replaced files)",
            ));
        }
        self.location.ensure_dir()?;
        let written = delta_schema(schema);
        let (table, exists) = load(&self.location).await?;
        if exists {
            self.check_existing(&table, &written)?;
        }
        *self.opened.lock().await = Some(Opened {
            table: exists.then_some(table),
            committed: None,
            upkeep: Upkeep::default(),
            checkpoint_at: None,
            app_id: query_id.to_string(),
            mode,
            props: parquet::writer_properties(&self.options.writer, &written)?,
            schema: written,
            keys,
        });
        Ok(())
    }

    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        let mut guard = self.opened.lock().await;
        let opened = guard
            .as_mut()
            .ok_or_else(|| self.error("add_batch before open"))?;
        // A finished upkeep's failure fails the query here. A MERGE waits for
        // a running one: it may rewrite files a compaction is rewriting too,
        // and one of the two commits would fail.
        let update = opened.mode == OutputMode::Update;
        self.settle_upkeep(opened, !update).await?;
        if opened.table.is_none() {
            let (table, exists) = load(&self.location).await?;
            opened.table = exists.then_some(table);
        }
        if let (None, Some(table)) = (opened.committed, &opened.table) {
            let done = table
                .snapshot()
                .map_err(|e| self.delta(e))?
                .transaction_version(table.log_store().as_ref(), &opened.app_id)
                .await
                .map_err(|e| self.delta(e))?;
            opened.committed = done.and_then(|v| u64::try_from(v).ok());
        }
        if opened.committed.is_some_and(|done| done >= batch_id) {
            return Ok(());
        }
        let mut attempt = 1;
        let table = loop {
            match self.commit(opened, batch_id, batches.clone()).await {
                Err(BrookError::Delta { source, .. })
                    if is_conflict(&source) && attempt < CONFLICT_ATTEMPTS =>
                {
                    // Another process compacted (`brook compact`) the files
                    // this commit replaces: again, on the newest version.
                    attempt += 1;
                    if let Some(table) = &mut opened.table {
                        table
                            .update_incremental(None)
                            .await
                            .map_err(|e| self.delta(e))?;
                    }
                }
                done => break done?,
            }
        };
        opened.table = Some(table);
        opened.committed = Some(batch_id);
        faults::crash_point("delta-commit", batch_id);
        if let Some(compact) = self.options.compact
            && (batch_id + 1).is_multiple_of(compact.every)
        {
            opened.upkeep.due = true;
        }
        self.start_upkeep(opened)
    }

    async fn finish(&self) -> Result<()> {
        let mut guard = self.opened.lock().await;
        let Some(opened) = guard.as_mut() else {
            return Ok(());
        };
        self.settle_upkeep(opened, false).await?;
        // What came due while the last task ran.
        self.start_upkeep(opened)?;
        self.settle_upkeep(opened, false).await
    }
}

async fn optimize(
    table: DeltaTable,
    target_file_size: Option<u64>,
    props: WriterProperties,
    commit: CommitProperties,
) -> DeltaResult<(DeltaTable, deltalake::operations::optimize::Metrics)> {
    let mut optimize = table
        .optimize()
        .with_writer_properties(props)
        .with_commit_properties(commit);
    if let Some(size) = target_file_size.and_then(NonZeroU64::new) {
        optimize = optimize.with_target_size(size);
    }
    optimize.await
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub files_removed: u64,
    pub files_added: u64,
    /// The table's version after it.
    pub version: Option<u64>,
}

impl fmt::Display for Compacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "compacted {} files into {}",
            self.files_removed, self.files_added
        )?;
        if let Some(v) = self.version {
            write!(f, " (table version {v})")?;
        }
        Ok(())
    }
}

/// Bin-packs the small files of the Delta table at `location` into files of
/// about `target_file_size` bytes (delta-rs's default without it), as one
/// OPTIMIZE commit; readers see the same rows before and after.
pub async fn compact(location: &Location, target_file_size: Option<u64>) -> Result<Compacted> {
    let (table, exists) = load(location).await?;
    if !exists {
        return Err(BrookError::Sink {
            sink: location.display.clone(),
            message: "there is no Delta table there (no commit in its _delta_log)".into(),
        });
    }
    // The writer's defaults (zstd): the sink's own options are not recorded in the table.
    let props = parquet::writer_properties(&Options::new(), &Schema::empty())?;
    let (table, metrics) = optimize(table, target_file_size, props, CommitProperties::default())
        .await
        .map_err(|e| BrookError::delta(&location.display, e))?;
    Ok(Compacted {
        files_removed: metrics.num_files_removed,
        files_added: metrics.num_files_added,
        version: table.version(),
    })
}
