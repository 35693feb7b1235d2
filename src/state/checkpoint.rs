//! A query's checkpoint: what it has read, what it has committed, and its state.
//!
//! ```text
//! <checkpoint>/
//!   metadata                 query id, SQL, and the fingerprint restarts are checked against
//!   lock                     held (OS file lock) while a query runs here
//!   offsets/<N>              batch N's input, written before batch N runs
//!   commits/<N>              written once batch N's output is in the sink
//!   state/<operator>/<N>.arrow        operator state after batch N (Arrow IPC file)
//!   state/<operator>/<N>.delta.arrow  the state rows batch N changed or removed
//!   sources/<N>              the source's own progress before batch N (every few batches)
//! ```
//!
//! A batch with offsets but no commit is re-run on restart with the same input;
//! a committed batch never runs again. See docs/checkpoints.md for the recovery contract.
//!
//! Every log file names the batch it belongs to, and they are linked by the
//! checksums of their bodies: batch N's offsets name the query and batch N-1's
//! commit, and batch N's commit names batch N's offsets. A restart checks the
//! files it reads against their names and links, so that a file copied from
//! another batch, another run or another checkpoint is refused, not trusted.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use chrono::{SecondsFormat, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::execution::runtime_env::RuntimeEnv;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::files::{CheckpointFiles, JSON_V1, JSON_V2, JSON_V3, Json};
use crate::error::{BrookError, Result};
use crate::source::SourceOffset;
use crate::source::location::Location;
use crate::testing::faults;

/// Committed batches whose files are kept (Spark's `minBatchesToRetain`).
pub const DEFAULT_MIN_BATCHES_TO_RETAIN: u64 = 100;

/// How often the source's progress is written whole; offsets cover the batches between.
const SOURCE_SNAPSHOT_EVERY: u64 = 10;

/// What a restarted query must agree with to reuse a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryFingerprint {
    /// The source table: name, format, location and columns.
    pub source: String,
    pub group_by: Vec<String>,
    pub aggregates: Vec<String>,
    /// The functions registered on the engine that the query calls, which a
    /// restart needs registered too. Not compared: a query may stop calling one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
    /// The partitions of an aggregation's state that a cluster's executors
    /// keep; `None` when the driver keeps it. Fixed when the checkpoint is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_partitions: Option<usize>,
}

impl QueryFingerprint {
    /// Whether the query keeps state between batches (a GROUP BY without
    /// aggregates does too).
    pub fn keeps_state(&self) -> bool {
        !self.aggregates.is_empty() || !self.group_by.is_empty()
    }

    /// The differences that make a checkpoint unusable for `other`, one per line.
    fn differences(&self, other: &Self) -> Vec<String> {
        let mut out = vec![];
        let mut check = |what: &str, old: String, new: String| {
            if old != new {
                out.push(format!(
                    "{what}: checkpoint has {old}, this query has {new}"
                ));
            }
        };
        check("source", self.source.clone(), other.source.clone());
        check(
            "GROUP BY",
            format!("[{}]", self.group_by.join(", ")),
            format!("[{}]", other.group_by.join(", ")),
        );
        check(
            "aggregates",
            format!("[{}]", self.aggregates.join(", ")),
            format!("[{}]", other.aggregates.join(", ")),
        );
        let kept = |p: Option<usize>| match p {
            Some(n) => format!("it in {n} partition(s) on a cluster's executors (--cluster)"),
            None => "it on the driver (the brook run process)".to_string(),
        };
        if self.keeps_state() {
            check(
                "state",
                kept(self.state_partitions),
                kept(other.state_partitions),
            );
        }
        out
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Metadata {
    id: String,
    created: String,
    brook_version: String,
    sql: String,
    fingerprint: QueryFingerprint,
}

/// The input of batch N, written before it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OffsetEntry {
    pub batch_id: u64,
    /// `None` for a batch without input that only closes state by the watermark.
    pub source: Option<SourceOffset>,
    pub planned_at: String,
    /// The checkpoint's query id. Files written before it was recorded lack it,
    /// as they lack the link below; what is missing is not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_id: Option<String>,
    /// The checksum of batch N-1's commit, which this batch follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_commit_crc32: Option<u32>,
    /// The watermarks the batch runs under, so that a batch run again after a
    /// restart runs under them too (as Spark's offset log keeps the batch's
    /// watermark): an idle source or a skipped batch without input may have
    /// moved them since the last commit. Missing in files written before they
    /// were logged, and for programs without event time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermarks: Option<Watermarks>,
}

/// The two watermarks a batch runs under, as Spark's since 3.4: its rows are
/// late by the one the previous batch ran under (`late_ns`), and its state is
/// closed by its own (`evict_ns`). Rows of a backlog read in one batch are
/// thus not late for having been read after rows that moved the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Watermarks {
    pub late_ns: Option<i64>,
    pub evict_ns: Option<i64>,
}

/// The event-time position between batches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventTime {
    pub watermark_ns: Option<i64>,
    pub max_event_ns: Option<i64>,
    /// The watermark moved and state waits to be closed by a batch without input.
    pub pending_no_data: bool,
    /// Pane state: the watermark up to which windows have been emitted.
    #[serde(default)]
    pub emitted_through_ns: Option<i64>,
    /// The watermark the batch ran under, by which the next batch judges its
    /// rows late (Spark's previous batch watermark); missing in checkpoints
    /// written before it was recorded, which then judge them by `watermark_ns`
    /// (pane state by `emitted_through_ns`, the watermark its last batch ran under).
    #[serde(
        default,
        deserialize_with = "recorded",
        skip_serializing_if = "Option::is_none"
    )]
    pub late_watermark_ns: Option<Option<i64>>,
    /// A query reading several sources: each one's own watermark and largest
    /// event time, by source name (one source's are the fields above).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, InputEventTime>,
}

/// A field that may be null, present (`Some`, null or not) or missing (`None`).
fn recorded<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// One source's event time, in a query reading several.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputEventTime {
    pub watermark_ns: Option<i64>,
    pub max_event_ns: Option<i64>,
}

/// A state file as its commit records it, so that damage is detected on load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    /// The batch after which the file was written.
    #[serde(default)]
    pub batch_id: u64,
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub crc32: u32,
}

/// Batch N is done: its output is in the sink and its state on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitEntry {
    pub batch_id: u64,
    /// The position after the batch, which the next batch starts from.
    pub event_time: EventTime,
    /// Each operator's latest snapshot.
    pub state: BTreeMap<String, StateFile>,
    /// Each operator's changes since its snapshot, oldest first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub state_deltas: BTreeMap<String, Vec<StateFile>>,
    /// The checksum of batch N's offsets; [`Checkpoint::write_commit`] sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets_crc32: Option<u32>,
}

/// The source's progress before a batch, as `sources/<N>` holds it (in `v3`;
/// earlier files hold the progress alone).
#[derive(Serialize, Deserialize)]
struct SourceSnapshot<Q, P> {
    batch_id: u64,
    query_id: Q,
    progress: P,
}

/// The batch and checksum of the last offsets and commit written or read, which
/// the next commit and offsets name.
#[derive(Debug, Default)]
struct Links {
    offsets: Option<(u64, u32)>,
    commit: Option<(u64, u32)>,
}

/// What a user can do about a log file that does not belong where it is.
const PUT_BACK: &str =
    "put back this checkpoint's own file, or start over with a new checkpoint location";

/// Where a restarted query resumes.
#[derive(Debug, Default)]
pub struct Recovery {
    pub last_commit: Option<CommitEntry>,
    /// The source's progress as last written whole, and the offsets of the
    /// committed batches after it, oldest first.
    pub source_snapshot: Option<serde_json::Value>,
    pub committed_offsets: Vec<SourceOffset>,
    /// A batch that was planned but not committed: it runs again first.
    pub rerun: Option<OffsetEntry>,
}

impl Recovery {
    /// Whether the checkpoint holds nothing yet: the query starts fresh.
    pub fn is_fresh(&self) -> bool {
        self.source_snapshot.is_none() && self.last_commit.is_none() && self.rerun.is_none()
    }

    pub fn next_batch(&self) -> u64 {
        self.last_commit.as_ref().map_or(0, |c| c.batch_id + 1)
    }
}

pub struct Checkpoint {
    files: CheckpointFiles,
    id: String,
    retain: u64,
    /// Operators that wrote state in this run, whose old versions clean-up removes.
    operators: Mutex<BTreeSet<String>>,
    /// Per operator, the batch of the snapshot the latest commit builds on.
    /// Clean-up keeps every state file from there on: the commit's changes, and
    /// snapshots written since that a next commit may name.
    state_floor: Mutex<BTreeMap<String, u64>>,
    links: Mutex<Links>,
    /// A new checkpoint's metadata, written while the query starts reading
    /// (two fsyncs held up every start). Every other file waits for it: offsets
    /// without metadata read as a damaged checkpoint.
    metadata: tokio::sync::Mutex<MetadataWrite>,
    /// Also held by the metadata write, so that it ends before another query
    /// can take the checkpoint, even when this one failed to start.
    _lock: Arc<CheckpointLock>,
}

enum MetadataWrite {
    Written,
    Writing(JoinHandle<Result<()>>),
    Failed(Arc<BrookError>),
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({})", self.files.location().display)
    }
}

impl Checkpoint {
    /// Opens (or creates) the checkpoint at `location` for a query, refusing one
    /// that another running query holds or that a different query wrote.
    pub async fn open(
        location: &str,
        runtime: &RuntimeEnv,
        sql: &str,
        fingerprint: QueryFingerprint,
        min_batches_to_retain: u64,
    ) -> Result<Self> {
        let files = CheckpointFiles::new(Location::resolve(location, runtime)?)?;
        let lock = Arc::new(CheckpointLock::acquire(&files)?);
        files.remove_temporary().await?;
        let mut metadata = MetadataWrite::Written;
        let id = match files.read_json::<Metadata>("metadata").await? {
            Some(meta) => {
                let diff = meta.fingerprint.differences(&fingerprint);
                if !diff.is_empty() {
                    return Err(BrookError::checkpoint(
                        location,
                        format!(
                            "it belongs to a different query, so its state cannot be reused:\n  {}\n\
                             to start the changed query afresh, delete this checkpoint directory \
                             or give the query another one ('checkpointLocation'); a file sink \
                             then keeps the old query's files beside the new ones, so empty it \
                             too if they should not mix. The checkpoint was written by:\n  {}",
                            diff.join("\n  "),
                            meta.sql
                        ),
                    ));
                }
                meta.id
            }
            None => {
                if !files.list("offsets").await?.is_empty() {
                    return Err(BrookError::checkpoint(
                        files.display("metadata"),
                        "missing, but the checkpoint has offsets: it is damaged; restore it or \
                         use a new checkpoint location",
                    ));
                }
                let meta = Metadata {
                    id: new_id(),
                    created: now(),
                    brook_version: env!("CARGO_PKG_VERSION").to_string(),
                    sql: sql.to_string(),
                    fingerprint,
                };
                let id = meta.id.clone();
                let (files, lock) = (files.clone(), lock.clone());
                metadata = MetadataWrite::Writing(faults::spawn(async move {
                    let written = files
                        .create_json_as(JSON_V1, "metadata", &meta, ("metadata-tmp", 0))
                        .await
                        .map(|_| ());
                    drop(lock);
                    written
                }));
                id
            }
        };
        Ok(Self {
            files,
            id,
            retain: min_batches_to_retain.max(1),
            operators: Mutex::default(),
            state_floor: Mutex::default(),
            links: Mutex::default(),
            metadata: tokio::sync::Mutex::new(metadata),
            _lock: lock,
        })
    }

    /// The fingerprint of the query of the checkpoint at `location`, as its
    /// metadata records it: `None` for a checkpoint not yet written.
    pub async fn recorded_fingerprint(
        location: &str,
        runtime: &RuntimeEnv,
    ) -> Result<Option<QueryFingerprint>> {
        let location = Location::resolve(location, runtime)?;
        // Not made here: a query that then fails to plan leaves no directory behind.
        if location.local_dir.as_ref().is_some_and(|dir| !dir.exists()) {
            return Ok(None);
        }
        let meta = CheckpointFiles::new(location)?
            .read_json::<Metadata>("metadata")
            .await?;
        Ok(meta.map(|m| m.fingerprint))
    }

    /// Waits for a new checkpoint's metadata to be on disk; its failure fails
    /// every write after it. The write is awaited in place, so a caller given up
    /// while waiting leaves it for the next.
    pub async fn metadata_written(&self) -> Result<()> {
        let mut metadata = self.metadata.lock().await;
        if let MetadataWrite::Writing(task) = &mut *metadata {
            *metadata = match faults::settle(task).await {
                Ok(()) => MetadataWrite::Written,
                Err(e) => MetadataWrite::Failed(Arc::new(e)),
            };
        }
        match &*metadata {
            MetadataWrite::Failed(e) => Err(BrookError::Shared(e.clone())),
            _ => Ok(()),
        }
    }

    /// The query's id, the same across restarts.
    pub fn query_id(&self) -> &str {
        &self.id
    }

    pub fn display(&self) -> &str {
        &self.files.location().display
    }

    /// The batch numbers naming the files in `dir`, in order.
    async fn ids(&self, dir: &str) -> Result<Vec<u64>> {
        let mut ids = vec![];
        for name in self.files.list(dir).await? {
            let id = name.parse::<u64>().map_err(|_| {
                BrookError::checkpoint(
                    self.files.display(&format!("{dir}/{name}")),
                    "unexpected file in the checkpoint (names here are batch numbers); remove it",
                )
            })?;
            ids.push(id);
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Reads where the query resumes, checking each file it reads against its
    /// name and its links to the others.
    pub async fn recover(&self) -> Result<Recovery> {
        let last_commit_id = self.ids("commits").await?.pop();
        let last_offset_id = self.ids("offsets").await?.pop();
        let next = last_commit_id.map_or(0, |c| c + 1);
        if let Some(id) = last_offset_id.filter(|id| *id > next) {
            return Err(BrookError::checkpoint(
                self.files.display(&format!("offsets/{id}")),
                format!(
                    "batch {id} was planned but batch {} never committed: the checkpoint \
                     is damaged",
                    id - 1
                ),
            ));
        }
        // Read first: a stale copy as the last commit is named as such, rather
        // than by the offsets missing for the batches it claims.
        let last_commit = match last_commit_id {
            Some(id) => Some(self.read_commit(id).await?),
            None => None,
        };
        let snapshot_id = self.ids("sources").await?.into_iter().rfind(|s| *s <= next);
        let source_snapshot = match snapshot_id {
            Some(s) => Some(self.read_source(s).await?),
            None => None,
        };
        // The committed batches a restart relies on, from the source snapshot
        // (or the last commit) on: each commit must follow its offsets, and
        // each offsets the commit before.
        let mut committed_offsets = vec![];
        let mut previous: Option<(u64, u32)> = None;
        let first = snapshot_id.unwrap_or(0).min(last_commit_id.unwrap_or(0));
        for id in first..next {
            let offsets = self.read_offsets(id, previous).await?;
            let read;
            let commit = match &last_commit {
                Some(last) if last.value.batch_id == id => last,
                _ => {
                    read = self.read_commit(id).await?;
                    &read
                }
            };
            if let Some(named) = commit.value.offsets_crc32
                && named != offsets.crc32
            {
                return Err(BrookError::checkpoint(
                    self.files.display(&format!("commits/{id}")),
                    format!(
                        "batch {id}'s commit does not follow this checkpoint's offsets/{id} \
                         (it was written after offsets with checksum {named:08x}, these \
                         have {:08x}): one of the two comes from another run or copy of this \
                         checkpoint; {PUT_BACK}",
                        offsets.crc32
                    ),
                ));
            }
            previous = Some((id, commit.crc32));
            if id >= snapshot_id.unwrap_or(0) {
                committed_offsets.extend(offsets.value.source);
            }
        }
        let rerun = match last_offset_id {
            Some(id) if id == next => Some(self.read_offsets(id, previous).await?),
            _ => None,
        };
        if let Ok(mut links) = self.links.lock() {
            *links = Links {
                offsets: rerun.as_ref().map(|r| (next, r.crc32)),
                commit: last_commit.as_ref().map(|c| (c.value.batch_id, c.crc32)),
            };
        }
        Ok(Recovery {
            last_commit: last_commit.map(|c| c.value),
            source_snapshot,
            committed_offsets,
            rerun: rerun.map(|r| r.value),
        })
    }

    async fn required<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Result<Json<T>> {
        self.files.read_json_file(rel).await?.ok_or_else(|| {
            BrookError::checkpoint(
                self.files.display(rel),
                "missing: the checkpoint is damaged; restore it or use a new checkpoint location",
            )
        })
    }

    /// Reads `commits/<id>`, refusing one written for another batch.
    async fn read_commit(&self, id: u64) -> Result<Json<CommitEntry>> {
        let rel = format!("commits/{id}");
        let commit: Json<CommitEntry> = self.required(&rel).await?;
        if commit.value.batch_id != id {
            return Err(BrookError::checkpoint(
                self.files.display(&rel),
                format!(
                    "holds batch {}'s commit, not batch {id}'s: it belongs to another batch; \
                     {PUT_BACK}",
                    commit.value.batch_id
                ),
            ));
        }
        Ok(commit)
    }

    /// Reads `offsets/<id>`, refusing one written for another batch or query,
    /// or after another commit than `previous` (batch id-1's batch and checksum).
    async fn read_offsets(
        &self,
        id: u64,
        previous: Option<(u64, u32)>,
    ) -> Result<Json<OffsetEntry>> {
        let rel = format!("offsets/{id}");
        let offsets: Json<OffsetEntry> = self.required(&rel).await?;
        let entry = &offsets.value;
        let wrong =
            |message: String| Err(BrookError::checkpoint(self.files.display(&rel), message));
        if entry.batch_id != id {
            return wrong(format!(
                "holds batch {}'s offsets, not batch {id}'s: it belongs to another batch; \
                 {PUT_BACK}",
                entry.batch_id
            ));
        }
        if let Some(other) = entry.query_id.as_ref().filter(|q| **q != self.id) {
            return wrong(format!(
                "written by another query (id {other}), not this checkpoint's ({}): it \
                 comes from another checkpoint; {PUT_BACK}",
                self.id
            ));
        }
        if let (Some(named), Some((batch, crc))) = (entry.previous_commit_crc32, previous)
            && batch + 1 == id
            && named != crc
        {
            return wrong(format!(
                "batch {id} was planned after a commit of batch {batch} with checksum \
                 {named:08x}, but this checkpoint's commits/{batch} has {crc:08x}: one of the \
                 two comes from another run or copy of this checkpoint; {PUT_BACK}"
            ));
        }
        Ok(offsets)
    }

    /// Reads `sources/<id>`: the source's progress before batch `id`.
    async fn read_source(&self, id: u64) -> Result<serde_json::Value> {
        let rel = format!("sources/{id}");
        let file: Json<serde_json::Value> = self.required(&rel).await?;
        if file.version != JSON_V3 {
            return Ok(file.value);
        }
        let fail = |message: String| BrookError::checkpoint(self.files.display(&rel), message);
        let snapshot: SourceSnapshot<String, serde_json::Value> =
            serde_json::from_value(file.value).map_err(|e| fail(format!("unreadable: {e}")))?;
        if snapshot.batch_id != id {
            return Err(fail(format!(
                "holds the source's progress before batch {}, not before batch {id}: it \
                 belongs to another batch; {PUT_BACK}",
                snapshot.batch_id
            )));
        }
        if snapshot.query_id != self.id {
            return Err(fail(format!(
                "written by another query (id {}), not this checkpoint's ({}): it comes \
                 from another checkpoint; {PUT_BACK}",
                snapshot.query_id, self.id
            )));
        }
        Ok(snapshot.progress)
    }

    pub async fn write_offsets(
        &self,
        batch_id: u64,
        source: Option<SourceOffset>,
        watermarks: Option<Watermarks>,
    ) -> Result<()> {
        self.metadata_written().await?;
        let previous_commit_crc32 = self.links.lock().ok().and_then(|links| {
            links
                .commit
                .filter(|(batch, _)| batch + 1 == batch_id)
                .map(|(_, crc)| crc)
        });
        let entry = OffsetEntry {
            batch_id,
            source,
            planned_at: now(),
            query_id: Some(self.id.clone()),
            previous_commit_crc32,
            watermarks,
        };
        let crc = self
            .files
            .create_json_as(
                JSON_V1,
                &format!("offsets/{batch_id}"),
                &entry,
                ("offsets-tmp", batch_id),
            )
            .await?;
        if let Ok(mut links) = self.links.lock() {
            links.offsets = Some((batch_id, crc));
        }
        Ok(())
    }

    /// Writes an operator's whole state after `batch_id` as an Arrow IPC file.
    pub async fn write_state(
        &self,
        operator: &str,
        batch_id: u64,
        schema: &SchemaRef,
        rows: &[RecordBatch],
    ) -> Result<StateFile> {
        let file = format!("state/{operator}/{batch_id}.arrow");
        self.write_ipc(operator, batch_id, file, schema, rows).await
    }

    /// Writes the state rows batch `batch_id` changed, in [`delta::schema`](super::delta::schema).
    pub async fn write_state_changes(
        &self,
        operator: &str,
        batch_id: u64,
        schema: &SchemaRef,
        changes: &[RecordBatch],
    ) -> Result<StateFile> {
        let file = format!("state/{operator}/{batch_id}.delta.arrow");
        self.write_ipc(operator, batch_id, file, schema, changes)
            .await
    }

    async fn write_ipc(
        &self,
        operator: &str,
        batch_id: u64,
        file: String,
        schema: &SchemaRef,
        rows: &[RecordBatch],
    ) -> Result<StateFile> {
        self.metadata_written().await?;
        let mut buf = vec![];
        let mut writer = FileWriter::try_new(&mut buf, schema)?;
        for b in rows {
            writer.write(b)?;
        }
        writer.finish()?;
        drop(writer);
        let info = StateFile {
            batch_id,
            file: file.clone(),
            rows: rows.iter().map(|b| b.num_rows() as u64).sum(),
            bytes: buf.len() as u64,
            crc32: crc32fast::hash(&buf),
        };
        self.files
            .write(&file, buf, ("state-tmp", batch_id))
            .await?;
        if let Ok(mut ops) = self.operators.lock() {
            ops.insert(operator.to_string());
        }
        Ok(info)
    }

    /// Loads a file written by [`write_state`](Self::write_state) or
    /// [`write_state_changes`](Self::write_state_changes), checking that it is
    /// undamaged and has the columns `schema` expects.
    pub async fn load_state(
        &self,
        info: &StateFile,
        schema: &SchemaRef,
    ) -> Result<Vec<RecordBatch>> {
        let path = self.files.display(&info.file);
        let fail = |m: String| BrookError::checkpoint(path.clone(), m);
        let bytes = self.files.read(&info.file).await?.ok_or_else(|| {
            fail("missing, but its batch is committed: the checkpoint is damaged".into())
        })?;
        let crc = crc32fast::hash(&bytes);
        if bytes.len() as u64 != info.bytes || crc != info.crc32 {
            return Err(fail(format!(
                "damaged: {} bytes with checksum {crc:08x}, but the commit recorded {} bytes \
                 with checksum {:08x}; restore it from a backup or start over with a new \
                 checkpoint location",
                bytes.len(),
                info.bytes,
                info.crc32
            )));
        }
        let reader = FileReader::try_new(Cursor::new(bytes), None)
            .map_err(|e| fail(format!("not a readable Arrow IPC file: {e}")))?;
        let found = reader.schema();
        if !same_columns(&found, schema) {
            return Err(fail(format!(
                "holds columns ({}) but this query keeps ({})",
                columns(&found),
                columns(schema)
            )));
        }
        let rows = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| fail(format!("unreadable: {e}")))?;
        Ok(rows
            .into_iter()
            .map(|b| b.with_schema(schema.clone()))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Writes batch `entry.batch_id`'s commit, naming the offsets it follows.
    pub async fn write_commit(&self, entry: &CommitEntry) -> Result<()> {
        self.metadata_written().await?;
        let id = entry.batch_id;
        let version = if entry.state_deltas.is_empty() {
            JSON_V1
        } else {
            JSON_V2
        };
        let mut entry = entry.clone();
        entry.offsets_crc32 = self.links.lock().ok().and_then(|links| {
            links
                .offsets
                .filter(|(batch, _)| *batch == id)
                .map(|(_, crc)| crc)
        });
        let crc = self
            .files
            .create_json_as(
                version,
                &format!("commits/{id}"),
                &entry,
                ("commits-tmp", id),
            )
            .await?;
        if let Ok(mut links) = self.links.lock() {
            links.commit = Some((id, crc));
        }
        if let Ok(mut floor) = self.state_floor.lock() {
            *floor = entry
                .state
                .iter()
                .map(|(op, f)| (op.clone(), f.batch_id))
                .collect();
        }
        Ok(())
    }

    /// Records the source's progress before batch `next_batch`: always before the
    /// first batch, then every few batches, followed by removing what is no longer
    /// needed (batches older than the retained ones and than the last snapshot).
    pub async fn write_source(&self, next_batch: u64, snapshot: &serde_json::Value) -> Result<()> {
        self.metadata_written().await?;
        let file = SourceSnapshot {
            batch_id: next_batch,
            query_id: self.id.as_str(),
            progress: snapshot,
        };
        self.files
            .write_json_as(
                JSON_V3,
                &format!("sources/{next_batch}"),
                &file,
                ("sources-tmp", next_batch),
            )
            .await?;
        self.clean_up(next_batch).await
    }

    /// Whether the source's progress is due to be written after committing `batch_id`.
    pub fn source_due(batch_id: u64) -> bool {
        (batch_id + 1).is_multiple_of(SOURCE_SNAPSHOT_EVERY)
    }

    async fn clean_up(&self, snapshot: u64) -> Result<()> {
        let keep_from = snapshot.saturating_sub(self.retain);
        for dir in ["offsets", "commits"] {
            for id in self.ids(dir).await? {
                if id < keep_from {
                    self.files.delete(&format!("{dir}/{id}")).await?;
                }
            }
        }
        for id in self.ids("sources").await? {
            if id < snapshot {
                self.files.delete(&format!("sources/{id}")).await?;
            }
        }
        let operators: Vec<String> = match self.operators.lock() {
            Ok(ops) => ops.iter().cloned().collect(),
            Err(_) => vec![],
        };
        let floors = match self.state_floor.lock() {
            Ok(f) => f.clone(),
            Err(_) => return Ok(()),
        };
        for operator in operators {
            let keep_state_from = floors
                .get(&operator)
                .map_or(keep_from, |f| (*f).min(keep_from));
            let dir = format!("state/{operator}");
            for name in self.files.list(&dir).await? {
                let rel = format!("{dir}/{name}");
                let number = name.split('.').next().unwrap_or_default();
                let id = number.parse::<u64>().map_err(|_| {
                    BrookError::checkpoint(
                        self.files.display(&rel),
                        "unexpected file in the checkpoint (names here start with a batch \
                         number); remove it",
                    )
                })?;
                if id < keep_state_from {
                    self.files.delete(&rel).await?;
                }
            }
        }
        Ok(())
    }
}

/// A new query's id, random: it names the query across restarts from its checkpoint.
pub(crate) fn new_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!("{:016x}{:016x}", rng.random::<u64>(), rng.random::<u64>())
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn same_columns(a: &SchemaRef, b: &SchemaRef) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields()
            .iter()
            .zip(b.fields())
            .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

fn columns(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keeps a second query, in this process or another, off a checkpoint in use.
enum CheckpointLock {
    /// An OS lock on `<checkpoint>/lock`, released by the OS if the process dies.
    File(std::fs::File),
    /// Object stores have no locks: only queries of this process are kept out.
    Process(String),
}

fn in_process() -> &'static Mutex<HashSet<String>> {
    static HELD: std::sync::OnceLock<Mutex<HashSet<String>>> = std::sync::OnceLock::new();
    HELD.get_or_init(Mutex::default)
}

impl CheckpointLock {
    fn acquire(files: &CheckpointFiles) -> Result<Self> {
        let location = files.location();
        let busy = |who: String| {
            BrookError::checkpoint(
                location.display.clone(),
                format!(
                    "in use by another running query ({who}); stop it first, or give this \
                     query its own checkpoint location"
                ),
            )
        };
        match &location.local_dir {
            Some(dir) => {
                use std::io::{Read, Seek, Write};
                let path = dir.join("lock");
                let mut file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| BrookError::io(&path, e))?;
                match file.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => {
                        let mut holder = String::new();
                        let _ = file.read_to_string(&mut holder);
                        return Err(busy(format!("process {}", holder.trim())));
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(BrookError::io(&path, e)),
                }
                let pid = std::process::id().to_string();
                file.set_len(0)
                    .and_then(|_| file.rewind())
                    .and_then(|_| file.write_all(pid.as_bytes()))
                    .map_err(|e| BrookError::io(&path, e))?;
                Ok(Self::File(file))
            }
            None => {
                let key = location.display.clone();
                let mut held = in_process()
                    .lock()
                    .map_err(|_| BrookError::poisoned("checkpoint registry"))?;
                if !held.insert(key.clone()) {
                    return Err(busy("a query in this process".into()));
                }
                Ok(Self::Process(key))
            }
        }
    }
}

impl Drop for CheckpointLock {
    fn drop(&mut self) {
        match self {
            Self::File(file) => {
                let _ = file.unlock();
            }
            Self::Process(key) => {
                if let Ok(mut held) = in_process().lock() {
                    held.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grouped(
        group_by: &[&str],
        aggregates: &[&str],
        partitions: Option<usize>,
    ) -> QueryFingerprint {
        QueryFingerprint {
            source: "orders".into(),
            group_by: group_by.iter().map(|s| s.to_string()).collect(),
            aggregates: aggregates.iter().map(|s| s.to_string()).collect(),
            functions: vec![],
            state_partitions: partitions,
        }
    }

    #[test]
    fn where_the_state_is_kept_is_compared_for_every_stateful_query() {
        for (group_by, aggregates) in [
            (&["k"][..], &["count(*)"][..]),
            (&["k"], &[]),
            (&[], &["count(*)"]),
        ] {
            let local = grouped(group_by, aggregates, None);
            let cluster = grouped(group_by, aggregates, Some(4));
            let diff = local.differences(&cluster).join("\n");
            assert!(
                diff.contains("state: checkpoint has it on the driver")
                    && diff.contains("this query has it in 4 partition(s)"),
                "{group_by:?} {aggregates:?}: {diff}"
            );
            assert!(cluster.differences(&cluster).is_empty());
        }
        let stateless = grouped(&[], &[], None);
        assert!(stateless.differences(&stateless).is_empty());
    }
}
