//! The watched-directory source.
//!
//! Each batch takes files not yet processed, oldest first (by modification time,
//! then name), at most `maxFilesPerTrigger` files and `maxBytesPerTrigger`
//! bytes. A file is read whole, once, when it is first listed, so writers must
//! make a file appear complete: write it elsewhere (or under a name starting
//! with `.` or `_`, which are never read) and rename it into the directory, as
//! `brook send` does. A file that changes after it was read is not read again
//! (as in Spark); it is counted and logged.
//!
//! Over a brook file sink's output (a directory holding `_brook_manifest`)
//! the source takes the files of the manifest's batch entries, in batch
//! order: never a part file without an entry (its batch may be re-written),
//! nor a compaction's merged files (their rows came in the batches' files).

use std::collections::{HashMap, HashSet};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::format::{Decoded, Decoder};
use super::location::{Location, blocking};
use super::manifest::{Manifest, holds_manifest};
use super::shared::{CleanAction, DirectoryReader, Registration, SharedDecodes};
use super::{SourceBatch, SourceCounts, SourceOffset, StreamSource};
use crate::error::{BrookError, Result};
use crate::options::Options;

#[derive(Debug, Clone)]
pub struct FileSourceOptions {
    pub max_files_per_trigger: Option<usize>,
    /// Bytes of files per batch; a batch still takes one file that is larger.
    pub max_bytes_per_trigger: Option<u64>,
    /// Newest files first, for catching up on the latest data after a backlog.
    pub latest_first: bool,
    /// Whether files already in the directory at start are read (Spark reads them).
    pub include_existing_files: bool,
    /// Read files in subdirectories too.
    pub recursive: bool,
    /// Files older than the newest file taken minus this are ignored, and
    /// forgotten once taken (Spark's `maxFileAge`); without it every file
    /// taken is remembered.
    pub max_file_age: Option<Duration>,
    /// What happens to a file once every query reading the directory has committed it.
    pub clean_source: CleanSource,
    /// Files read and decoded at once (by default twice the cores, so that
    /// fetching one file overlaps decoding another).
    pub parallelism: usize,
}

/// Spark's `cleanSource`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CleanSource {
    #[default]
    Off,
    Delete,
    /// Moved below this directory (`sourceArchiveDir`), keeping its full path.
    Archive(String),
}

impl Default for FileSourceOptions {
    fn default() -> Self {
        Self {
            max_files_per_trigger: None,
            max_bytes_per_trigger: None,
            latest_first: false,
            include_existing_files: true,
            recursive: false,
            max_file_age: None,
            clean_source: CleanSource::Off,
            parallelism: 2 * crate::config::partitions(),
        }
    }
}

impl FileSourceOptions {
    /// Every option of a file source table: its format's, then the source's.
    pub const OPTIONS: &[&str] = &[
        "has_header",
        "header",
        "delimiter",
        "sep",
        "quote",
        "multiLine",
        "mode",
        "columnNameOfCorruptRecord",
        "maxFilesPerTrigger",
        "latestFirst",
        "includeExistingFiles",
        "recursiveFileLookup",
        "maxBytesPerTrigger",
        "maxFileAge",
        "cleanSource",
        "sourceArchiveDir",
    ];

    /// Spark's file source options: which files a batch takes, and what
    /// becomes of them once processed.
    pub fn from_options(options: &Options) -> Result<Self> {
        Ok(Self {
            max_files_per_trigger: options.count("maxFilesPerTrigger")?,
            latest_first: options.bool("latestFirst", false)?,
            include_existing_files: options.bool("includeExistingFiles", true)?,
            recursive: options.bool("recursiveFileLookup", false)?,
            max_bytes_per_trigger: options.size("maxBytesPerTrigger")?,
            max_file_age: options.duration("maxFileAge")?,
            clean_source: CleanSource::from_options(options)?,
            ..Self::default()
        })
    }
}

impl CleanSource {
    /// Spark's `cleanSource` and its `sourceArchiveDir`.
    fn from_options(options: &Options) -> Result<Self> {
        let archive_dir = options.get("sourceArchiveDir").map(str::to_string);
        let mode = options
            .get_or("cleanSource", "off")
            .trim()
            .to_ascii_lowercase();
        let clean = match mode.as_str() {
            "off" => CleanSource::Off,
            "delete" => CleanSource::Delete,
            "archive" => match &archive_dir {
                Some(dir) => CleanSource::Archive(dir.clone()),
                None => {
                    return Err(BrookError::option(
                        "sourceArchiveDir",
                        "cleanSource 'archive' needs it: the directory processed files are moved to",
                    ));
                }
            },
            other => {
                return Err(BrookError::option(
                    "cleanSource",
                    format!("expected off, delete or archive, found '{other}'"),
                ));
            }
        };
        if archive_dir.is_some() && !matches!(clean, CleanSource::Archive(_)) {
            return Err(BrookError::option(
                "sourceArchiveDir",
                "only used with cleanSource 'archive'",
            ));
        }
        Ok(clean)
    }
}

/// What the source knows of a file it has taken.
#[derive(Debug, Clone, Copy)]
struct Seen {
    size: u64,
    modified_ms: Option<i64>,
    /// The file-system id (inode) a listing found it under: a file replaced
    /// under the same name has another, which shows without a lookup.
    id: Option<u64>,
    /// False for files present at start that `includeExistingFiles` skipped.
    read: bool,
}

#[derive(Debug)]
pub(crate) struct FileSource {
    location: Location,
    decoder: Arc<Decoder>,
    shared: Registration,
    directory: DirectoryReader,
    options: FileSourceOptions,
    clean: Option<CleanAction>,
    seen: HashMap<Path, Seen>,
    /// The newest modification time of the files taken, and the time before
    /// which files are ignored and forgotten (with `maxFileAge`).
    latest_ms: Option<i64>,
    ignore_before_ms: Option<i64>,
    /// Set by the available-now trigger: the files it may still plan, each
    /// removed as its batch commits.
    snapshot: Option<HashSet<Path>>,
    /// Taken files the last local listing found, and its turn in looking them up.
    taken_listed: usize,
    sweep_turn: usize,
    /// Files that cannot be named (not UTF-8), warned about once each.
    unnamed: HashSet<PathBuf>,
    counts: SourceCounts,
    cleaning: JoinSet<()>,
}

/// The file source's progress in the checkpoint: the files it remembers.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FileProgress {
    /// Checkpoints written before files had sizes and times here: paths only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<String>,
    #[serde(default)]
    files: Vec<SeenFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latest_ms: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SeenFile {
    path: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modified_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    unread: bool,
}

/// A file of a batch, as written to the offset log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    path: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modified_ms: Option<i64>,
}

/// Taken files of a local directory looked up per listing, to notice one
/// changed in place (a replaced one shows by its file-system id).
const SWEEP: usize = 64;

/// A file found by a listing of a local directory.
struct Listed {
    path: PathBuf,
    id: Option<u64>,
}

impl FileSource {
    /// A source over `location`; files that other sources registered with
    /// `shared` read with an equal decoder are decoded once for all of them.
    pub fn new(
        location: Location,
        decoder: Decoder,
        options: FileSourceOptions,
        shared: &Arc<SharedDecodes>,
    ) -> Result<Self> {
        location.require_existing_dir()?;
        let clean = clean_action(&location, &options.clean_source)?;
        let decoder = Arc::new(decoder);
        let registration = shared.register(&location.display, &decoder)?;
        // Spelled differently, one directory still has one set of readers: a
        // file is then never cleaned, as each reader names it its own way.
        let directory_key = match &location.local_dir {
            Some(dir) => dir
                .canonicalize()
                .unwrap_or_else(|_| dir.clone())
                .display()
                .to_string(),
            None => location.display.clone(),
        };
        let directory = shared.join_directory(&directory_key, clean.is_some())?;
        Ok(Self {
            location,
            decoder,
            shared: registration,
            directory,
            options,
            clean,
            seen: HashMap::new(),
            latest_ms: None,
            ignore_before_ms: None,
            snapshot: None,
            taken_listed: 0,
            sweep_turn: 0,
            unnamed: HashSet::new(),
            counts: SourceCounts::default(),
            cleaning: JoinSet::new(),
        })
    }

    /// Completed data files below the location not taken yet, oldest first.
    /// Also notes taken files that changed.
    async fn list(&mut self) -> Result<Vec<ObjectMeta>> {
        // A name cleaned up is new again: a file written under it is read.
        for path in self.directory.cleaned() {
            if let Ok(path) = stored_path(&path) {
                self.seen.remove(&path);
            }
        }
        let mut files = match self.location.local_dir.clone() {
            Some(dir) => self.list_local(dir).await?,
            None => self.list_store().await?,
        };
        if let Some(before) = self.ignore_before_ms {
            files.retain(|meta| meta.last_modified.timestamp_millis() >= before);
        }
        files.sort_by(|a, b| (a.last_modified, &a.location).cmp(&(b.last_modified, &b.location)));
        if self.options.latest_first {
            files.reverse();
        }
        if holds_manifest(&self.location).await? {
            files = self.follow_manifest(files).await?;
        }
        Ok(files)
    }

    /// Of the `listed` files, those of the manifest's batch entries, in batch order.
    async fn follow_manifest(&self, listed: Vec<ObjectMeta>) -> Result<Vec<ObjectMeta>> {
        let manifest = Manifest::read(&self.location).await?;
        let removed = manifest.removed();
        let mut listed: HashMap<Path, ObjectMeta> = listed
            .into_iter()
            .map(|meta| (meta.location.clone(), meta))
            .collect();
        let mut files = vec![];
        for (batch, file) in &manifest.batch_files {
            let path = self.location.child_path(&file.path);
            if let Some(meta) = listed.remove(&path) {
                files.push(meta);
            } else if removed.contains(file.path.as_str())
                && !self.seen.contains_key(&path)
                // With maxFileAge, a file taken long ago is forgotten.
                && self.ignore_before_ms.is_none()
            {
                return Err(BrookError::Source {
                    location: self.location.display.clone(),
                    message: format!(
                        "file {} of the sink's batch {batch} was merged and deleted by a \
                         compaction before this query read it, so its rows cannot be read \
                         in order: read the directory faster (a larger maxFilesPerTrigger, \
                         a shorter trigger) or compact it less often (a larger compactEvery)",
                        file.path
                    ),
                });
            }
        }
        Ok(files)
    }

    async fn list_store(&mut self) -> Result<Vec<ObjectMeta>> {
        let store = &self.location.store;
        let prefix = Some(&self.location.prefix);
        let listed = if self.options.recursive {
            store.list(prefix).try_collect().await
        } else {
            store.list_with_delimiter(prefix).await.map(|l| l.objects)
        };
        let mut files: Vec<ObjectMeta> = listed.map_err(|e| BrookError::Source {
            location: self.location.display.clone(),
            message: self.location.store_failure(&e),
        })?;
        let root_parts = self.location.prefix.parts().count();
        files.retain(|meta| {
            !meta
                .location
                .parts()
                .skip(root_parts)
                .any(|part| hidden(part.as_ref()))
        });
        let mut unseen = vec![];
        for meta in files {
            if !self.seen.contains_key(&meta.location) {
                unseen.push(meta);
                continue;
            }
            let modified_ms = meta.last_modified.timestamp_millis();
            self.check_unchanged(&meta.location, meta.size, modified_ms, None);
        }
        Ok(unseen)
    }

    /// The files of a local directory not taken yet. Only those are looked up,
    /// with taken files whose file-system id changed (replaced by a rename)
    /// and a few more taken files in turn (changed in place): a directory
    /// keeps every file it was given, and a lookup of each of them per trigger
    /// and query was most of the kernel's work in steady state.
    async fn list_local(&mut self, dir: PathBuf) -> Result<Vec<ObjectMeta>> {
        let recursive = self.options.recursive;
        let (listed, unnamed) = blocking(move || walk(&dir, recursive)).await?;
        for path in unnamed {
            if self.unnamed.insert(path.clone()) {
                self.counts.files_skipped += 1;
                tracing::warn!(
                    source = %self.location.display,
                    "skipping {}: its name is not UTF-8, so it cannot be named in offsets \
                     and progress; rename it to read it",
                    path.display()
                );
            }
        }
        let mut lookups = vec![];
        // About SWEEP taken files are looked up a listing: the k-th of them when
        // k % rounds is this listing's turn (listings keep a directory's order).
        let rounds = self.taken_listed.div_ceil(SWEEP).max(1);
        let turn = self.sweep_turn % rounds;
        self.sweep_turn = self.sweep_turn.wrapping_add(1);
        let mut taken = 0;
        for Listed { path, id } in listed {
            // Named as the object store lists them: the absolute path, not resolved.
            let location = match Path::from_absolute_path(&path) {
                Ok(location) => location,
                Err(e) => {
                    if self.unnamed.insert(path.clone()) {
                        self.counts.files_skipped += 1;
                        tracing::warn!(
                            source = %self.location.display,
                            "skipping {}: {e}",
                            path.display()
                        );
                    }
                    continue;
                }
            };
            if !is_data_file(&location) {
                continue;
            }
            match self.seen.get(&location) {
                None => lookups.push((path, location, id, false)),
                Some(seen) => {
                    let replaced = id.is_some() && seen.id != id;
                    if replaced || taken % rounds == turn {
                        lookups.push((path, location.clone(), id, true));
                    }
                    taken += 1;
                }
            }
        }
        self.taken_listed = taken;
        let looked_up = blocking(move || {
            let mut found = vec![];
            for (path, location, id, taken) in lookups {
                let meta = match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => m,
                    // Removed since it was listed, or a directory.
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(BrookError::io(&path, e)),
                };
                let modified = meta.modified().map_err(|e| BrookError::io(&path, e))?;
                let meta = ObjectMeta {
                    location,
                    last_modified: modified.into(),
                    size: meta.len(),
                    e_tag: None,
                    version: None,
                };
                found.push((meta, id, taken));
            }
            Ok(found)
        })
        .await?;
        let mut unseen = vec![];
        for (meta, id, taken) in looked_up {
            if taken {
                let modified_ms = meta.last_modified.timestamp_millis();
                self.check_unchanged(&meta.location, meta.size, modified_ms, id);
            } else {
                unseen.push(meta);
            }
        }
        Ok(unseen)
    }

    /// Warns about, and counts, a taken file whose size or time changed; it is
    /// not read again. Its new state is kept, so one change is reported once.
    fn check_unchanged(&mut self, location: &Path, size: u64, modified_ms: i64, id: Option<u64>) {
        let Some(seen) = self.seen.get_mut(location) else {
            return;
        };
        let changed = seen.size != size || seen.modified_ms.is_some_and(|m| m != modified_ms);
        // Entries from checkpoints without times learn them now.
        let known = seen.modified_ms.is_some();
        *seen = Seen {
            size,
            modified_ms: Some(modified_ms),
            id,
            read: seen.read,
        };
        if changed && known && seen.read {
            self.counts.files_changed_after_read += 1;
            tracing::warn!(
                source = %self.location.display,
                "{location} changed after it was read (now {size} bytes, modified {}): it is not \
                 read again; a writer must give every new file a new name",
                chrono::DateTime::from_timestamp_millis(modified_ms)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            );
        }
    }

    /// Takes note of the files of a committed batch; with `clean`, tells the
    /// directory's readers, and cleans those that every reader has now committed.
    fn record(&mut self, offset: &SourceOffset, clean: bool) -> Result<()> {
        let tracked = clean && self.directory.tracked();
        for entry in self.parse_offset(offset)? {
            let path = stored_path(&entry.path)?;
            if let Some(snapshot) = &mut self.snapshot {
                snapshot.remove(&path);
            }
            let seen = Seen {
                size: entry.size,
                modified_ms: entry.modified_ms,
                id: None,
                read: true,
            };
            self.remember(path.clone(), seen);
            if tracked
                && let Some(action) = self.directory.committed(path.as_ref(), self.clean.as_ref())
            {
                self.clean(path, action);
            }
        }
        self.forget_old();
        Ok(())
    }

    /// Deletes or archives `location` in the background; a failure is logged
    /// and the file left in place, as Spark does.
    fn clean(&mut self, location: Path, action: CleanAction) {
        let store = self.location.store.clone();
        let local = self.location.local_file(&location);
        let handle = self.directory.handle();
        let source_name = self.location.display.clone();
        let task = async move {
            let cleaned: Result<()> = match (&action, local) {
                (CleanAction::Delete, Some(file)) => {
                    blocking(move || match std::fs::remove_file(&file) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(BrookError::io(&file, e))
                        }
                        _ => Ok(()),
                    })
                    .await
                }
                (CleanAction::Delete, None) => match store.delete(&location).await {
                    Err(object_store::Error::NotFound { .. }) | Ok(()) => Ok(()),
                    Err(e) => Err(e.into()),
                },
                (CleanAction::Archive(root), Some(file)) => {
                    let dest = archived(root, &file);
                    blocking(move || archive(&file, &dest)).await
                }
                (CleanAction::Archive(_), None) => Err(BrookError::internal(
                    "archiving is only possible in a local directory",
                )),
            };
            match cleaned {
                Ok(()) => handle.released(location.as_ref()),
                Err(e) => tracing::warn!(
                    source = %source_name,
                    "could not clean up {location} after its batch committed; it is left \
                     in place: {e}"
                ),
            }
        };
        self.cleaning.spawn(task);
        // Finished cleanings are let go as new ones start.
        while self.cleaning.try_join_next().is_some() {}
    }

    /// A kill between the link and the unlink of [`archive`] leaves a file both
    /// in the source directory and in the archive. It was linked only once its
    /// batch committed and every reader let it go, so the move is finished.
    fn finish_archiving(&self) {
        let Some(CleanAction::Archive(root)) = &self.clean else {
            return;
        };
        for (location, _) in self.seen.iter().filter(|(_, s)| s.read) {
            let Some(file) = self.location.local_file(location) else {
                continue;
            };
            let dest = archived(root, &file);
            let finished = match (file.exists() && dest.exists()).then(|| same_file(&file, &dest)) {
                None | Some(Ok(false)) => Ok(()),
                Some(Ok(true)) => std::fs::remove_file(&file).map_err(|e| BrookError::io(&file, e)),
                Some(Err(e)) => Err(e),
            };
            if let Err(e) = finished {
                tracing::warn!(
                    source = %self.location.display,
                    "could not finish archiving {location}; it is left in place: {e}"
                );
            }
        }
    }

    /// The most files and bytes a batch takes, with Spark's `maxFileAge` rule:
    /// ignored when the newest files go first with a limit, as older files not
    /// yet read would otherwise be dropped.
    fn max_file_age(&self) -> Option<Duration> {
        let limited = self.options.max_files_per_trigger.is_some()
            || self.options.max_bytes_per_trigger.is_some();
        match self.options.latest_first && limited {
            true => None,
            false => self.options.max_file_age,
        }
    }

    /// Takes note of a file taken and forgets those too old to matter.
    fn remember(&mut self, location: Path, seen: Seen) {
        if let Some(m) = seen.modified_ms {
            self.latest_ms = Some(self.latest_ms.map_or(m, |l| l.max(m)));
        }
        self.seen.insert(location, seen);
    }

    fn forget_old(&mut self) {
        let (Some(age), Some(latest)) = (self.max_file_age(), self.latest_ms) else {
            return;
        };
        let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let before = latest.saturating_sub(age_ms);
        self.ignore_before_ms = Some(before);
        self.seen
            .retain(|_, s| s.modified_ms.is_none_or(|m| m >= before));
    }

    fn parse_offset(&self, offset: &SourceOffset) -> Result<Vec<FileEntry>> {
        parse_entries(&self.location, offset)
    }
}

/// The files an offset of the source at `location` names.
fn parse_entries(location: &Location, offset: &SourceOffset) -> Result<Vec<FileEntry>> {
    serde_json::from_value(offset.0.clone()).map_err(|e| BrookError::Source {
        location: location.display.clone(),
        message: format!("unreadable file offset {}: {e}", offset.0),
    })
}

/// How `clean` is done for a source at `location`, checked at start.
fn clean_action(location: &Location, clean: &CleanSource) -> Result<Option<CleanAction>> {
    match clean {
        CleanSource::Off => Ok(None),
        CleanSource::Delete => Ok(Some(CleanAction::Delete)),
        CleanSource::Archive(dir) => {
            let refuse = |m: String| Err(BrookError::option("sourceArchiveDir", m));
            let Some(source) = &location.local_dir else {
                return refuse(format!(
                    "cleanSource 'archive' needs a local source directory, and '{}' is not \
                     one; use cleanSource 'delete'",
                    location.display
                ));
            };
            let archive = Location::resolve(dir, &Default::default())?;
            let Some(archive) = archive.local_dir else {
                return refuse(format!(
                    "'{dir}' is not a local directory: cleanSource 'archive' moves files \
                     within the source's file system"
                ));
            };
            if archive.starts_with(source) {
                return refuse(format!(
                    "'{dir}' lies under the source directory '{}': with cleanSource 'archive' \
                     the archived files would be listed again; give sourceArchiveDir a \
                     directory outside it",
                    location.display
                ));
            }
            Ok(Some(CleanAction::Archive(archive)))
        }
    }
}

/// Where `file` goes below the archive `root`: its full path, as Spark keeps it.
fn archived(root: &FsPath, file: &FsPath) -> PathBuf {
    let relative: PathBuf = file
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    root.join(relative)
}

/// Moves `file` to `dest` without replacing a file already there (a rename
/// would): linked, then unlinked. A `dest` that is `file` itself was linked by
/// a run that stopped before unlinking. Another file there, or an archive on
/// another file system, is an error and `file` stays.
fn archive(file: &FsPath, dest: &FsPath) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| BrookError::io(parent, e))?;
    }
    match std::fs::hard_link(file, dest) {
        Ok(()) => {}
        // Moved already: a cleaning that ran before the restart.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !file.exists() => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && same_file(file, dest)? => {}
        Err(e) => return Err(BrookError::io(dest, e)),
    }
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BrookError::io(file, e)),
        _ => Ok(()),
    }
}

#[cfg(unix)]
fn same_file(a: &FsPath, b: &FsPath) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(a).map_err(|e| BrookError::io(a, e))?;
    let b = std::fs::metadata(b).map_err(|e| BrookError::io(b, e))?;
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

#[cfg(not(unix))]
fn same_file(_: &FsPath, _: &FsPath) -> Result<bool> {
    Ok(false)
}

/// The files below `root` (and its subdirectories, if `recursive`) that are
/// not hidden, and those whose names cannot be read as UTF-8.
fn walk(root: &FsPath, recursive: bool) -> Result<(Vec<Listed>, Vec<PathBuf>)> {
    let (mut files, mut unnamed) = (vec![], vec![]);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A subdirectory removed since it was listed.
            Err(e) if dir != root && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BrookError::io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| BrookError::io(&dir, e))?;
            let name = entry.file_name();
            if hidden(&name.to_string_lossy()) {
                continue;
            }
            if name.to_str().is_none() {
                unnamed.push(entry.path());
                continue;
            }
            if recursive {
                let is_dir = match entry.file_type() {
                    Ok(t) if t.is_symlink() => entry.path().is_dir(),
                    Ok(t) => t.is_dir(),
                    Err(_) => false,
                };
                if is_dir {
                    dirs.push(entry.path());
                    continue;
                }
            }
            files.push(Listed {
                path: entry.path(),
                id: file_id(&entry),
            });
        }
    }
    Ok((files, unnamed))
}

#[cfg(unix)]
fn file_id(entry: &std::fs::DirEntry) -> Option<u64> {
    use std::os::unix::fs::DirEntryExt;
    Some(entry.ino())
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::DirEntry) -> Option<u64> {
    None
}

/// Reads and decodes the file at `path` below `location`.
async fn fetch_and_decode(
    location: &Location,
    decoder: Arc<Decoder>,
    path: String,
) -> Result<Decoded> {
    let stored = stored_path(&path)?;
    // A local file is read by the thread that decodes it, and named by its
    // path: the object store would zero-fill a buffer first, and read into it
    // on a thread of its own.
    let (name, fetched) = match location.local_file(&stored) {
        Some(file) => (file.display().to_string(), None),
        None => {
            let got = match location.store.get(&stored).await {
                Ok(got) => got.bytes().await,
                Err(e) => Err(e),
            };
            let bytes = got.map_err(|e| BrookError::Source {
                location: location.display.clone(),
                message: location.store_failure(&e),
            })?;
            (path.clone(), Some(bytes))
        }
    };
    let decoded = tokio::task::spawn_blocking(move || {
        let bytes = match fetched {
            Some(bytes) => bytes,
            None => std::fs::read(&name)
                .map_err(|e| BrookError::io(&name, e))?
                .into(),
        };
        decoder.decode(&name, bytes)
    })
    .await
    .map_err(|e| BrookError::task(format!("decoding {path}"), e))??;
    decoded.malformed.log();
    Ok(decoded)
}

/// The files a batch's offset names, each as an offset of its own, in order:
/// the parts a cluster's tasks read one each.
pub fn split_offset(offset: &SourceOffset) -> Result<Vec<SourceOffset>> {
    let entries: Vec<FileEntry> =
        serde_json::from_value(offset.0.clone()).map_err(|e| BrookError::CheckpointData {
            message: format!("unreadable file offset {}: {e}", offset.0),
            source: Some(Box::new(e)),
        })?;
    entries
        .into_iter()
        .map(|e| {
            serde_json::to_value([e])
                .map(SourceOffset)
                .map_err(|e| BrookError::serde("a file source offset", e))
        })
        .collect()
}

/// Reads the files `offset` names below `location`, as a file source's batch
/// would, without a source: what a cluster's task does with its part.
pub async fn read_files(
    location: &Location,
    decoder: Arc<Decoder>,
    offset: &SourceOffset,
) -> Result<SourceBatch> {
    let mut read = SourceBatch::default();
    for entry in parse_entries(location, offset)? {
        let decoded = fetch_and_decode(location, decoder.clone(), entry.path).await?;
        read.malformed.merge(decoded.malformed);
        if decoded.batch.num_rows() > 0 {
            read.batches.push(decoded.batch);
        }
    }
    Ok(read)
}

/// A path as the offset log and progress hold it: already escaped, so that it
/// is parsed rather than escaped again (`#` in a name would become `%2523`).
fn stored_path(path: &str) -> Result<Path> {
    Path::parse(path).map_err(|e| BrookError::CheckpointData {
        message: format!("bad file path {path:?} in the checkpoint: {e}"),
        source: Some(Box::new(e)),
    })
}

/// Names starting with `.` or `_` are never read: writers put files there
/// before renaming them in.
fn hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

/// Whether the object store would list `location` as a file: it skips its own
/// temporary uploads, named `<file>#<digits>`.
fn is_data_file(location: &Path) -> bool {
    match location.filename().and_then(|n| n.split_once('#')) {
        Some((_, suffix)) => suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()),
        None => true,
    }
}

#[async_trait]
impl StreamSource for FileSource {
    fn schema(&self) -> SchemaRef {
        self.decoder.schema.clone()
    }

    fn describe(&self) -> String {
        format!(
            "FileSource[{} {}]",
            self.decoder.format.name(),
            self.location.display
        )
    }

    async fn start(&mut self) -> Result<()> {
        if !self.options.include_existing_files {
            for file in self.list().await? {
                let seen = Seen {
                    size: file.size,
                    modified_ms: Some(file.last_modified.timestamp_millis()),
                    id: None,
                    read: false,
                };
                self.remember(file.location, seen);
            }
            self.forget_old();
        }
        Ok(())
    }

    fn progress(&self) -> Result<serde_json::Value> {
        let mut files: Vec<SeenFile> = self
            .seen
            .iter()
            .map(|(path, s)| SeenFile {
                path: path.to_string(),
                size: s.size,
                modified_ms: s.modified_ms,
                unread: !s.read,
            })
            .collect();
        files.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        let progress = FileProgress {
            seen: vec![],
            files,
            latest_ms: self.latest_ms,
        };
        serde_json::to_value(progress)
            .map_err(|e| BrookError::serde("the file source's progress", e))
    }

    fn restore(
        &mut self,
        progress: Option<serde_json::Value>,
        committed: &[SourceOffset],
    ) -> Result<()> {
        let progress: FileProgress = match progress {
            Some(v) => serde_json::from_value(v).map_err(|e| BrookError::Source {
                location: self.location.display.clone(),
                message: format!("unreadable file-source progress in the checkpoint: {e}"),
            })?,
            None => FileProgress::default(),
        };
        self.seen.clear();
        self.latest_ms = progress.latest_ms;
        for path in &progress.seen {
            let seen = Seen {
                size: 0,
                modified_ms: None,
                id: None,
                read: true,
            };
            self.seen.insert(stored_path(path)?, seen);
        }
        for file in &progress.files {
            let seen = Seen {
                size: file.size,
                modified_ms: file.modified_ms,
                id: None,
                read: !file.unread,
            };
            self.remember(stored_path(&file.path)?, seen);
        }
        self.forget_old();
        // Files of batches committed before the restart are never cleaned
        // now: the other readers of the directory may not have joined yet.
        for offset in committed {
            self.record(offset, false)?;
        }
        self.finish_archiving();
        Ok(())
    }

    async fn plan_batch(&mut self) -> Result<Option<SourceOffset>> {
        // Once the snapshot is all taken, a listing could only find files it
        // excludes: skipping it ends each available-now query a scan sooner.
        if self.snapshot.as_ref().is_some_and(HashSet::is_empty) {
            return Ok(None);
        }
        let files = self.list().await?;
        let max_files = self.options.max_files_per_trigger.unwrap_or(usize::MAX);
        let max_bytes = self.options.max_bytes_per_trigger.unwrap_or(u64::MAX);
        let mut bytes = 0u64;
        let mut batch: Vec<FileEntry> = vec![];
        for f in files {
            if self
                .snapshot
                .as_ref()
                .is_some_and(|s| !s.contains(&f.location))
            {
                continue;
            }
            if batch.len() >= max_files
                || (!batch.is_empty() && bytes.saturating_add(f.size) > max_bytes)
            {
                break;
            }
            bytes = bytes.saturating_add(f.size);
            batch.push(FileEntry {
                path: f.location.to_string(),
                size: f.size,
                modified_ms: Some(f.last_modified.timestamp_millis()),
            });
        }
        if batch.is_empty() {
            return Ok(None);
        }
        let value = serde_json::to_value(batch)
            .map_err(|e| BrookError::serde("a file source offset", e))?;
        Ok(Some(SourceOffset(value)))
    }
    async fn read(&self, offset: &SourceOffset) -> Result<SourceBatch> {
        SourceBatch::collect(self.read_parts(offset)).await
    }

    /// A part per file, decoded `parallelism` files at a time, in order.
    fn read_parts<'a>(&'a self, offset: &'a SourceOffset) -> BoxStream<'a, Result<SourceBatch>> {
        let entries = match self.parse_offset(offset) {
            Ok(entries) => entries,
            Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
        };
        let location = &self.location;
        let shared = &self.shared;
        futures::stream::iter(entries)
            .map(move |entry| async move {
                let d = shared
                    .get(&entry.path, entry.size, || {
                        fetch_and_decode(location, self.decoder.clone(), entry.path.clone())
                    })
                    .await?;
                Ok(SourceBatch {
                    batches: [d.batch.clone()]
                        .into_iter()
                        .filter(|b| b.num_rows() > 0)
                        .collect(),
                    malformed: d.malformed.clone(),
                })
            })
            .buffered(self.options.parallelism.max(1))
            .boxed()
    }

    fn commit(&mut self, offset: &SourceOffset) -> Result<()> {
        self.record(offset, true)
    }

    async fn snapshot_available(&mut self) -> Result<()> {
        let files = self.list().await?;
        self.snapshot = Some(files.into_iter().map(|f| f.location).collect());
        Ok(())
    }

    fn counts(&self) -> SourceCounts {
        self.counts
    }

    async fn stop(&mut self) -> Result<()> {
        while self.cleaning.join_next().await.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::runtime_env::RuntimeEnv;

    use super::*;
    use crate::source::format::tests::numbers_decoder;

    #[tokio::test]
    async fn available_now_ends_without_listing_once_its_snapshot_is_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("in");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.csv"), "1\n").unwrap();
        let location = Location::resolve(dir.to_str().unwrap(), &RuntimeEnv::default()).unwrap();
        let mut source = FileSource::new(
            location,
            numbers_decoder(),
            FileSourceOptions::default(),
            &Arc::default(),
        )
        .unwrap();
        source.snapshot_available().await.unwrap();
        let offset = source
            .plan_batch()
            .await
            .unwrap()
            .expect("a.csv is planned");
        source.commit(&offset).unwrap();
        // Listing the removed directory would fail: the query ends without it.
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(source.plan_batch().await.unwrap().is_none());
    }
}
