//! The watched-directory source.
//!
//! Each batch takes files not yet processed, oldest first (by modification time,
//! then name), at most `maxFilesPerTrigger`. A file is read whole, once, when it
//! is first listed, so writers must make a file appear complete: write it
//! elsewhere (or under a name starting with `.` or `_`, which are never read)
//! and rename it into the directory, as `brook send` does.

use std::collections::HashSet;
use std::path::Path as FsPath;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::format::Decoder;
use super::location::{Location, blocking};
use super::shared::{Registration, SharedDecodes};
use super::{SourceBatch, SourceOffset, StreamSource};
use crate::error::{BrookError, Result};

#[derive(Debug, Clone)]
pub struct FileSourceOptions {
    pub max_files_per_trigger: Option<usize>,
    /// Newest files first, for catching up on the latest data after a backlog.
    pub latest_first: bool,
    /// Whether files already in the directory at start are read (Spark reads them).
    pub include_existing_files: bool,
    /// Read files in subdirectories too.
    pub recursive: bool,
    /// Files read and decoded at once (by default twice the cores, so that
    /// fetching one file overlaps decoding another).
    pub parallelism: usize,
}

impl Default for FileSourceOptions {
    fn default() -> Self {
        Self {
            max_files_per_trigger: None,
            latest_first: false,
            include_existing_files: true,
            recursive: false,
            parallelism: 2 * crate::exec::compile::partitions(),
        }
    }
}

#[derive(Debug)]
pub struct FileSource {
    location: Location,
    decoder: Arc<Decoder>,
    shared: Registration,
    options: FileSourceOptions,
    seen: HashSet<Path>,
    /// Set by the available-now trigger: the files it may still plan, each
    /// removed as its batch commits.
    snapshot: Option<HashSet<Path>>,
}

/// The file source's progress in the checkpoint: every file it has taken.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FileProgress {
    seen: Vec<String>,
}

/// A file of a batch, as written to the offset log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    path: String,
    size: u64,
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
        let decoder = Arc::new(decoder);
        let shared = shared.register(&location.display, &decoder)?;
        Ok(Self {
            location,
            decoder,
            shared,
            options,
            seen: HashSet::new(),
            snapshot: None,
        })
    }

    /// Completed data files below the location not taken yet, oldest first.
    async fn list(&self) -> Result<Vec<ObjectMeta>> {
        let store = &self.location.store;
        let prefix = Some(&self.location.prefix);
        let mut files: Vec<ObjectMeta> = match &self.location.local_dir {
            Some(dir) if !self.options.recursive => self.list_local(dir).await?,
            _ if self.options.recursive => store.list(prefix).try_collect().await?,
            _ => store.list_with_delimiter(prefix).await?.objects,
        };
        let root_parts = self.location.prefix.parts().count();
        files.retain(|meta| {
            !self.seen.contains(&meta.location)
                && !meta
                    .location
                    .parts()
                    .skip(root_parts)
                    .any(|part| hidden(part.as_ref()))
        });
        files.sort_by(|a, b| (a.last_modified, &a.location).cmp(&(b.last_modified, &b.location)));
        if self.options.latest_first {
            files.reverse();
        }
        Ok(files)
    }

    /// The files of a local directory not taken yet. Only those are looked up:
    /// a directory keeps every file it was given, and a lookup of each of them
    /// per trigger and query was most of the kernel's work in steady state.
    async fn list_local(&self, dir: &FsPath) -> Result<Vec<ObjectMeta>> {
        let listed = dir.to_path_buf();
        let names = blocking(move || {
            let entries = std::fs::read_dir(&listed).map_err(|e| BrookError::io(&listed, e))?;
            let mut names = vec![];
            for entry in entries {
                let entry = entry.map_err(|e| BrookError::io(&listed, e))?;
                names.push(entry.path());
            }
            Ok(names)
        })
        .await?;
        let mut unseen = vec![];
        for path in names {
            if path
                .file_name()
                .is_some_and(|n| hidden(&n.to_string_lossy()))
            {
                continue;
            }
            // Named as the object store lists them: the absolute path, not resolved.
            let location = Path::from_absolute_path(&path).map_err(|e| BrookError::Source {
                location: self.location.display.clone(),
                message: e.to_string(),
            })?;
            if !self.seen.contains(&location) && is_data_file(&location) {
                unseen.push((path, location));
            }
        }
        blocking(move || {
            let mut files = vec![];
            for (path, location) in unseen {
                let meta = match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => m,
                    // Removed since it was listed, or a directory.
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(BrookError::io(&path, e)),
                };
                let modified = meta.modified().map_err(|e| BrookError::io(&path, e))?;
                files.push(ObjectMeta {
                    location,
                    last_modified: modified.into(),
                    size: meta.len(),
                    e_tag: None,
                    version: None,
                });
            }
            Ok(files)
        })
        .await
    }

    fn parse_offset(&self, offset: &SourceOffset) -> Result<Vec<FileEntry>> {
        serde_json::from_value(offset.0.clone()).map_err(|e| BrookError::Source {
            location: self.location.display.clone(),
            message: format!("unreadable file offset {}: {e}", offset.0),
        })
    }
}

/// A path as the offset log and progress hold it: already escaped, so that it
/// is parsed rather than escaped again (`#` in a name would become `%2523`).
fn stored_path(path: &str) -> Result<Path> {
    Path::parse(path)
        .map_err(|e| BrookError::Plan(format!("bad file path {path:?} in the checkpoint: {e}")))
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
            let files = self.list().await?;
            self.seen.extend(files.into_iter().map(|f| f.location));
        }
        Ok(())
    }

    fn progress(&self) -> Result<serde_json::Value> {
        let mut seen: Vec<String> = self.seen.iter().map(|p| p.to_string()).collect();
        seen.sort_unstable();
        serde_json::to_value(FileProgress { seen }).map_err(|e| BrookError::Plan(e.to_string()))
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
        self.seen = progress
            .seen
            .iter()
            .map(|p| stored_path(p))
            .collect::<Result<_>>()?;
        for offset in committed {
            self.commit(offset)?;
        }
        Ok(())
    }

    async fn plan_batch(&mut self) -> Result<Option<SourceOffset>> {
        // Once the snapshot is all taken, a listing could only find files it
        // excludes: skipping it ends each available-now query a scan sooner.
        if self.snapshot.as_ref().is_some_and(HashSet::is_empty) {
            return Ok(None);
        }
        let files = self.list().await?;
        let limit = self.options.max_files_per_trigger.unwrap_or(usize::MAX);
        let batch: Vec<FileEntry> = files
            .into_iter()
            .filter(|f| {
                self.snapshot
                    .as_ref()
                    .is_none_or(|s| s.contains(&f.location))
            })
            .take(limit)
            .map(|f| FileEntry {
                path: f.location.to_string(),
                size: f.size,
            })
            .collect();
        if batch.is_empty() {
            return Ok(None);
        }
        let value = serde_json::to_value(batch).map_err(|e| BrookError::Plan(e.to_string()))?;
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
        let store: Arc<dyn ObjectStore> = self.location.store.clone();
        let location = &self.location;
        let shared = &self.shared;
        futures::stream::iter(entries)
            .map(move |entry| {
                let store = store.clone();
                let decoder = self.decoder.clone();
                async move {
                    let fetch_and_decode = || async {
                        let path = stored_path(&entry.path)?;
                        // A local file is read by the thread that decodes it, and
                        // named by its path: the object store would zero-fill a
                        // buffer first, and read into it on a thread of its own.
                        let (name, fetched) = match location.local_file(&path) {
                            Some(file) => (file.display().to_string(), None),
                            None => {
                                let bytes = store.get(&path).await?.bytes().await?;
                                (entry.path.clone(), Some(bytes))
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
                        .map_err(|e| BrookError::Plan(format!("decoding {}: {e}", entry.path)))??;
                        decoded.malformed.log();
                        Ok(decoded)
                    };
                    let d = shared
                        .get(&entry.path, entry.size, fetch_and_decode)
                        .await?;
                    Ok(SourceBatch {
                        batches: [d.batch.clone()]
                            .into_iter()
                            .filter(|b| b.num_rows() > 0)
                            .collect(),
                        malformed: d.malformed.clone(),
                    })
                }
            })
            .buffered(self.options.parallelism.max(1))
            .boxed()
    }

    fn commit(&mut self, offset: &SourceOffset) -> Result<()> {
        for entry in self.parse_offset(offset)? {
            let path = stored_path(&entry.path)?;
            if let Some(snapshot) = &mut self.snapshot {
                snapshot.remove(&path);
            }
            self.seen.insert(path);
        }
        Ok(())
    }

    async fn snapshot_available(&mut self) -> Result<()> {
        let files = self.list().await?;
        self.snapshot = Some(files.into_iter().map(|f| f.location).collect());
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
