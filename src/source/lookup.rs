//! Static (lookup) tables: bounded files a streaming query joins with.
//!
//! A query's plans are built once and re-executed every micro-batch. The scan
//! of a static table lists its files at each execution (at most once per
//! `refreshInterval`) and reads them again only when a file was added, removed
//! or changed (size or modification time); otherwise it serves the rows read
//! before. DataFusion's own `ListingTable`, which does the reading, would list
//! and read every file at each scan.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProviderFactory;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::{ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::listing_table_factory::ListingTableFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::execution::cache::cache_manager::{CacheManager, CacheManagerConfig};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{CreateExternalTable, Expr};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream, collect,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::location::Location;
use super::manifest::{holds_manifest, live_files};
use crate::error::{BrookError, Result};

/// A file of a static table as last listed: path, size and modification time.
type Listed = (String, u64, i64);

#[derive(Default)]
struct Cache {
    /// The files the rows were read from; `None` before the first read.
    files: Option<Vec<Listed>>,
    rows: Vec<RecordBatch>,
    checked: Option<Instant>,
    /// The files as last listed for a table over them ([`StaticTable::files_table`]).
    listed: Option<(Instant, Vec<Listed>)>,
}

struct Inner {
    name: String,
    location: Location,
    listing: Arc<dyn TableProvider>,
    runtime: Arc<RuntimeEnv>,
    refresh: Option<Duration>,
    cache: tokio::sync::Mutex<Cache>,
    reads: AtomicU64,
}

impl Inner {
    /// Whether files checked `at` need no look again yet (`refreshInterval`).
    fn fresh(&self, at: Option<Instant>) -> bool {
        match (at, self.refresh) {
            (Some(at), Some(every)) => at.elapsed() < every,
            _ => false,
        }
    }
}

/// A bounded table over files, re-read when they change.
#[derive(Clone)]
pub struct StaticTable(Arc<Inner>);

impl fmt::Debug for StaticTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StaticTable({})", self.0.name)
    }
}

impl StaticTable {
    /// The table `cmd` declares (a bounded `CREATE EXTERNAL TABLE`, without
    /// brook's own options), its files checked at most once per `refresh`.
    pub async fn new(
        cmd: &CreateExternalTable,
        refresh: Option<Duration>,
        runtime: Arc<RuntimeEnv>,
    ) -> Result<Self> {
        let name = cmd.name.table().to_string();
        let path = cmd.locations.first().cloned().unwrap_or_default();
        let location = Location::resolve(&path, &runtime)?;
        if let Some(local) = &location.local_dir
            && !local.exists()
        {
            // An empty table would hide a mistyped path: every lookup would miss.
            return Err(BrookError::sql(format!(
                "static table '{name}' cannot be read: LOCATION '{path}' does not exist"
            )));
        }
        // The engine's runtime caches file listings for ever: this table's
        // reads list afresh, with the engine's stores and memory.
        let runtime = Arc::new(RuntimeEnv {
            memory_pool: runtime.memory_pool.clone(),
            disk_manager: runtime.disk_manager.clone(),
            object_store_registry: runtime.object_store_registry.clone(),
            cache_manager: CacheManager::try_new(&CacheManagerConfig {
                list_files_cache_limit: 0,
                ..CacheManagerConfig::default()
            })?,
        });
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime.clone());
        let listing = ListingTableFactory::new()
            .create(&ctx.state(), cmd)
            .await
            .map_err(|e| {
                BrookError::sql(format!(
                    "static table '{name}' at '{path}' cannot be read: {e}"
                ))
            })?;
        Ok(Self(Arc::new(Inner {
            name,
            location,
            listing,
            runtime,
            refresh,
            cache: tokio::sync::Mutex::default(),
            reads: AtomicU64::new(0),
        })))
    }

    /// Whether its files are partitioned by directories (`PARTITIONED BY`).
    pub fn partitioned(&self) -> bool {
        self.0
            .listing
            .downcast_ref::<ListingTable>()
            .is_some_and(|l| !l.options().table_partition_cols.is_empty())
    }

    /// How many times the files were read (a change, or the first scan).
    pub fn reads(&self) -> u64 {
        self.0.reads.load(Ordering::Relaxed)
    }

    /// The table's rows now: those read before unless its files changed.
    pub async fn rows(&self) -> Result<Vec<RecordBatch>> {
        let inner = &self.0;
        let mut cache = inner.cache.lock().await;
        if inner.fresh(cache.checked) && cache.files.is_some() {
            return Ok(cache.rows.clone());
        }
        let (files, manifest) = self.list().await?;
        cache.checked = Some(Instant::now());
        if cache.files.as_ref() == Some(&files) {
            return Ok(cache.rows.clone());
        }
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), inner.runtime.clone());
        let rows = async {
            let plan = ctx
                .read_table(inner.listing.clone())?
                .create_physical_plan()
                .await?;
            let plan = if manifest {
                let live: HashSet<&str> = files.iter().map(|(path, _, _)| path.as_str()).collect();
                only_files(plan, &live)?
            } else {
                plan
            };
            collect(plan, ctx.task_ctx()).await
        }
        .await
        .map_err(|e| {
            BrookError::sql(format!(
                "static table '{}' at '{}' cannot be read: {e}",
                inner.name, inner.location.display
            ))
        })?;
        inner.reads.fetch_add(1, Ordering::Relaxed);
        cache.files = Some(files);
        cache.rows = rows.clone();
        Ok(rows)
    }

    /// DataFusion's table over the files this table holds now, listed at most
    /// once per `refreshInterval`: any process that reaches them reads it as
    /// this table reads them; `None` when it holds none. A cluster's executors
    /// read a static table so.
    pub async fn files_table(&self) -> Result<Option<Arc<dyn TableProvider>>> {
        let inner = &self.0;
        let failed = |why: String| {
            BrookError::sql(format!(
                "static table '{}' at '{}' cannot be read on a cluster: {why}",
                inner.name, inner.location.display
            ))
        };
        let Some(listing) = inner.listing.downcast_ref::<ListingTable>() else {
            return Err(BrookError::internal(format!(
                "static table '{}' is not over a listing of files",
                inner.name
            )));
        };
        let options = listing.options();
        let files = {
            let mut cache = inner.cache.lock().await;
            match &cache.listed {
                Some((at, files)) if inner.fresh(Some(*at)) => files.clone(),
                _ => {
                    let (files, _) = self.list().await?;
                    cache.listed = Some((Instant::now(), files.clone()));
                    files
                }
            }
        };
        let Some(url) = listing.table_paths().first() else {
            return Err(BrookError::internal(format!(
                "static table '{}' has no location",
                inner.name
            )));
        };
        let root = url.object_store();
        // The files DataFusion's listing would read: of the format's extension,
        // and not in subdirectories but partitions' (its default,
        // `listing_table_ignore_subdirectory`).
        let read = |path: &str| {
            path.ends_with(&options.file_extension)
                && Path::parse(path).is_ok_and(|p| url.contains(&p, true))
        };
        let paths = files
            .iter()
            .filter(|(path, _, _)| read(path))
            .map(|(path, _, _)| ListingTableUrl::parse(format!("{}{path}", root.as_str())))
            .collect::<DFResult<Vec<_>>>()
            .map_err(|e| failed(e.to_string()))?;
        if paths.is_empty() {
            return Ok(None);
        }
        let config = ListingTableConfig::new_with_multi_paths(paths)
            .with_listing_options(options.clone())
            .with_schema(listing.schema());
        let table = ListingTable::try_new(config).map_err(|e| failed(e.to_string()))?;
        Ok(Some(Arc::new(table)))
    }

    /// The table's files, as DataFusion's listing reads them: hidden names
    /// (`.x`, `_x`), which producers write before renaming, are left out;
    /// and whether they are the live files of a brook file sink's manifest
    /// (listed with the sizes the manifest gives: its entries change when
    /// the live files do).
    async fn list(&self) -> Result<(Vec<Listed>, bool)> {
        let location = &self.0.location;
        if holds_manifest(location).await? {
            let mut files: Vec<Listed> = live_files(location)
                .await?
                .into_iter()
                .map(|f| (location.child_path(&f.path).to_string(), f.bytes, 0))
                .collect();
            files.sort();
            return Ok((files, true));
        }
        let prefix = location.prefix.clone();
        let mut files: Vec<Listed> = location
            .store
            .list(Some(&prefix))
            .map_err(BrookError::from)
            .try_filter_map(|meta| {
                let relative = meta
                    .location
                    .prefix_match(&prefix)
                    .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
                    .unwrap_or_default();
                let hidden = relative
                    .iter()
                    .any(|p| p.starts_with('.') || p.starts_with('_'));
                let listed = (
                    meta.location.to_string(),
                    meta.size,
                    meta.last_modified.timestamp_nanos_opt().unwrap_or_default(),
                );
                futures::future::ready(Ok((!hidden).then_some(listed)))
            })
            .try_collect()
            .await?;
        if files.is_empty()
            && let Ok(meta) = location.store.head(&prefix).await
        {
            // LOCATION names one file.
            files.push((
                meta.location.to_string(),
                meta.size,
                meta.last_modified.timestamp_nanos_opt().unwrap_or_default(),
            ));
        }
        files.sort();
        Ok((files, false))
    }
}

/// `plan` with its file scans reading only the files named in `keep`.
fn only_files(
    plan: Arc<dyn ExecutionPlan>,
    keep: &HashSet<&str>,
) -> DFResult<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(config) = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
        else {
            return Ok(Transformed::no(node));
        };
        let groups: Vec<FileGroup> = config
            .file_groups
            .iter()
            .map(|group| {
                FileGroup::new(
                    group
                        .iter()
                        .filter(|f| keep.contains(f.object_meta.location.as_ref()))
                        .cloned()
                        .collect(),
                )
            })
            .collect();
        let config = FileScanConfigBuilder::from(config.clone())
            .with_file_groups(groups)
            .build();
        Ok(Transformed::yes(DataSourceExec::from_data_source(config)))
    })
    .map(|t| t.data)
}

#[async_trait]
impl TableProvider for StaticTable {
    fn schema(&self) -> SchemaRef {
        self.0.listing.schema()
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
        let schema = match projection {
            Some(p) => Arc::new(self.schema().project(p)?),
            None => self.schema(),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Arc::new(StaticExec {
            table: self.clone(),
            projection: projection.cloned(),
            schema,
            properties: Arc::new(properties),
        }))
    }
}

/// Serves a static table's current rows each time it is executed.
#[derive(Debug)]
pub struct StaticExec {
    table: StaticTable,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for StaticExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "StaticExec: {}", self.table.0.name)
    }
}

impl ExecutionPlan for StaticExec {
    fn name(&self) -> &str {
        "StaticExec"
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
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let table = self.table.clone();
        let projection = self.projection.clone();
        let rows = futures::stream::once(async move {
            let rows = table
                .rows()
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            rows.into_iter()
                .map(|b| match &projection {
                    Some(p) => b.project(p).map_err(DataFusionError::from),
                    None => Ok(b),
                })
                .collect::<DFResult<Vec<_>>>()
        })
        .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            rows,
        )))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{DdlStatement, LogicalPlan};

    use super::*;

    async fn table(dir: &std::path::Path, refresh: Option<Duration>) -> StaticTable {
        let ctx = SessionContext::new();
        let sql = format!(
            "CREATE EXTERNAL TABLE t (symbol VARCHAR, sector VARCHAR) STORED AS CSV LOCATION '{}'",
            dir.display()
        );
        let plan = ctx.state().create_logical_plan(&sql).await.unwrap();
        let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) = plan else {
            panic!("not a CREATE: {plan:?}");
        };
        StaticTable::new(&cmd, refresh, ctx.runtime_env())
            .await
            .unwrap()
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    #[tokio::test]
    async fn reads_files_again_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            crate::source::write_atomically(dir.path(), name, text.as_bytes()).unwrap()
        };
        write("a.csv", "symbol,sector\nAAPL,Tech\n");
        let t = table(dir.path(), None).await;
        assert_eq!(rows(&t.rows().await.unwrap()), 1);
        assert_eq!(rows(&t.rows().await.unwrap()), 1);
        assert_eq!(t.reads(), 1, "unchanged files are not read again");
        write("b.csv", "symbol,sector\nXOM,Energy\nCVX,Energy\n");
        assert_eq!(rows(&t.rows().await.unwrap()), 3, "an added file is read");
        write("a.csv", "symbol,sector\n");
        assert_eq!(rows(&t.rows().await.unwrap()), 2, "a replaced file is read");
        std::fs::remove_file(dir.path().join("b.csv")).unwrap();
        assert_eq!(rows(&t.rows().await.unwrap()), 0, "a removed file is gone");
        write(".hidden.csv", "symbol,sector\nX,Y\n");
        assert_eq!(rows(&t.rows().await.unwrap()), 0);
        assert_eq!(t.reads(), 4, "a hidden file changes nothing");
    }

    #[tokio::test]
    async fn refresh_interval_bounds_the_checks() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            crate::source::write_atomically(dir.path(), name, text.as_bytes()).unwrap()
        };
        write("a.csv", "symbol,sector\nAAPL,Tech\n");
        let t = table(dir.path(), Some(Duration::from_secs(3600))).await;
        assert_eq!(rows(&t.rows().await.unwrap()), 1);
        write("b.csv", "symbol,sector\nXOM,Energy\n");
        assert_eq!(
            rows(&t.rows().await.unwrap()),
            1,
            "within the interval the files are not listed"
        );
        assert_eq!(t.reads(), 1);
    }
}
