//! Decoded files shared by the queries of one engine.
//!
//! A script's queries usually read the same source: the dashboard runs three
//! queries over one directory of orders. Each query keeps its own file source
//! (its own offsets and checkpoint, as in Spark), but a file that several of
//! them read with the same decoder is decoded once: the first reader decodes
//! it, the others wait for and share the result. An entry is dropped once
//! every registered reader has taken it, and the oldest entries go when the
//! cache outgrows its byte budget (a reader that then misses decodes again).
//!
//! The readers of one directory also agree on when a file may be cleaned up
//! (`cleanSource`): only once every one of them has committed it. A reader
//! that ends (stopped or failed) stays counted until the engine ends, so the
//! files it had not committed are kept for its restart.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OnceCell;

use super::format::{Decoded, Decoder};
use crate::error::{BrookError, Result};

/// Decoded bytes kept for readers that have not taken them yet.
const BUDGET_BYTES: usize = 256 << 20;

#[derive(Default)]
pub struct SharedDecodes {
    inner: Mutex<Inner>,
    dirs: Arc<Directories>,
}

impl std::fmt::Debug for SharedDecodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedDecodes")
    }
}

/// Readers of one location with one decoder.
struct Group {
    location: String,
    decoder: Arc<Decoder>,
    readers: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct FileKey {
    group: usize,
    path: String,
    size: u64,
}

struct Entry {
    cell: Arc<OnceCell<Arc<Decoded>>>,
    taken: usize,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    groups: Vec<Group>,
    files: HashMap<FileKey, Entry>,
    /// Keys in insertion order, for eviction (may name entries already gone).
    order: VecDeque<FileKey>,
    bytes: usize,
}

impl Inner {
    fn remove(&mut self, key: &FileKey) {
        if let Some(e) = self.files.remove(key) {
            self.bytes -= e.bytes;
        }
    }

    /// Forgets the eviction order of entries already removed, once they dominate it.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.files.len() + 64 {
            let Inner { order, files, .. } = self;
            order.retain(|k| files.contains_key(k));
        }
    }
}

/// A file source's membership of a [`SharedDecodes`] group; leaving on drop.
pub struct Registration {
    cache: Arc<SharedDecodes>,
    group: usize,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({})", self.group)
    }
}

impl SharedDecodes {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| BrookError::poisoned("shared decode cache"))
    }

    /// Joins the readers of `location` decoded by `decoder`.
    pub fn register(
        self: &Arc<Self>,
        location: &str,
        decoder: &Arc<Decoder>,
    ) -> Result<Registration> {
        let mut inner = self.lock()?;
        let found = inner
            .groups
            .iter()
            .position(|g| g.location == location && *g.decoder == **decoder);
        let group = match found {
            Some(i) => i,
            None => {
                inner.groups.push(Group {
                    location: location.to_string(),
                    decoder: decoder.clone(),
                    readers: 0,
                });
                inner.groups.len() - 1
            }
        };
        inner.groups[group].readers += 1;
        Ok(Registration {
            cache: self.clone(),
            group,
        })
    }
}

impl SharedDecodes {
    /// Joins the readers of the directory `key`; `cleans` if this reader
    /// removes or archives the files it has committed.
    pub fn join_directory(&self, key: &str, cleans: bool) -> Result<DirectoryReader> {
        let mut dirs = self.dirs.lock()?;
        let id = dirs.next_id;
        dirs.next_id += 1;
        let dir = dirs.dirs.entry(key.to_string()).or_default();
        dir.readers.insert(id);
        dir.cleaned.insert(id, vec![]);
        dir.cleaners += usize::from(cleans);
        Ok(DirectoryReader {
            dirs: self.dirs.clone(),
            key: key.to_string(),
            id,
            cleans,
        })
    }
}

/// How a committed file is cleaned up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanAction {
    Delete,
    /// Moved below this directory, keeping its full path, as Spark archives.
    Archive(std::path::PathBuf),
}

#[derive(Default)]
struct Directories {
    inner: Mutex<DirectoriesInner>,
}

#[derive(Default)]
struct DirectoriesInner {
    next_id: u64,
    dirs: HashMap<String, Directory>,
}

/// The readers of one directory and the files some of them have committed.
#[derive(Default)]
struct Directory {
    /// Every reader that joined, those that ended included.
    readers: HashSet<u64>,
    cleaners: usize,
    /// Files a reader has committed while others have not yet: who has, and
    /// how a cleaning reader that read the file wants it cleaned.
    pending: HashMap<String, (HashSet<u64>, Option<CleanAction>)>,
    /// Files being cleaned, or whose cleaning failed (not tried again).
    claimed: HashSet<String>,
    /// Files cleaned since each reader still running last asked: it forgets
    /// them, so that a new file given the same name is read.
    cleaned: HashMap<u64, Vec<String>>,
}

impl Directories {
    fn lock(&self) -> Result<MutexGuard<'_, DirectoriesInner>> {
        self.inner
            .lock()
            .map_err(|_| BrookError::poisoned("shared directory readers"))
    }
}

/// A file source's membership of the readers of its directory; leaving on drop.
pub struct DirectoryReader {
    dirs: Arc<Directories>,
    key: String,
    id: u64,
    cleans: bool,
}

impl std::fmt::Debug for DirectoryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirectoryReader({} #{})", self.key, self.id)
    }
}

impl DirectoryReader {
    /// Whether files are tracked: once a reader of the directory cleans
    /// (one that ended included: the files it committed still wait).
    pub fn tracked(&self) -> bool {
        self.dirs
            .lock()
            .ok()
            .and_then(|d| d.dirs.get(&self.key).map(|dir| dir.cleaners > 0))
            .unwrap_or(false)
    }

    /// Records that this reader committed `path`. Returns how to clean it when
    /// this made every reader done and a cleaning reader read it; the caller
    /// then cleans it and releases it through a [`handle`](Self::handle).
    /// Saying so again is harmless.
    pub fn committed(&self, path: &str, action: Option<&CleanAction>) -> Option<CleanAction> {
        let mut dirs = self.dirs.lock().ok()?;
        let dir = dirs.dirs.get_mut(&self.key)?;
        if dir.cleaners == 0 || dir.claimed.contains(path) {
            return None;
        }
        let (done, wanted) = dir.pending.entry(path.to_string()).or_default();
        done.insert(self.id);
        if self.cleans && wanted.is_none() {
            *wanted = action.cloned();
        }
        // A reader that ended without committing it never will: it stays,
        // and is not kept track of.
        let kept = (dir.readers.iter()).any(|r| !done.contains(r) && !dir.cleaned.contains_key(r));
        if kept {
            dir.pending.remove(path);
            return None;
        }
        if !dir.readers.is_subset(done) {
            return None;
        }
        let (_, wanted) = dir.pending.remove(path)?;
        let action = wanted?;
        dir.claimed.insert(path.to_string());
        Some(action)
    }

    /// The files cleaned since the last call, for this reader to forget.
    pub fn cleaned(&self) -> Vec<String> {
        let Ok(mut dirs) = self.dirs.lock() else {
            return vec![];
        };
        dirs.dirs
            .get_mut(&self.key)
            .and_then(|dir| dir.cleaned.get_mut(&self.id))
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// A handle for a cleaning task to release its file with.
    pub fn handle(&self) -> DirectoryHandle {
        DirectoryHandle {
            dirs: self.dirs.clone(),
            key: self.key.clone(),
        }
    }
}

/// What a cleaning task, running apart from its reader, releases its file with.
pub struct DirectoryHandle {
    dirs: Arc<Directories>,
    key: String,
}

impl DirectoryHandle {
    /// A cleaning of `path` succeeded: the name is new to every reader again.
    pub fn released(&self, path: &str) {
        if let Ok(mut dirs) = self.dirs.lock()
            && let Some(dir) = dirs.dirs.get_mut(&self.key)
        {
            dir.claimed.remove(path);
            for cleaned in dir.cleaned.values_mut() {
                cleaned.push(path.to_string());
            }
        }
    }
}

impl Drop for DirectoryReader {
    /// Only stops collecting cleaned names: the reader stays among the
    /// directory's readers, so that what it had not committed is not cleaned.
    fn drop(&mut self) {
        if let Ok(mut dirs) = self.dirs.lock()
            && let Some(dir) = dirs.dirs.get_mut(&self.key)
        {
            dir.cleaned.remove(&self.id);
        }
    }
}

impl Registration {
    /// The decoded file at `path` (of `size` bytes), decoding it with `decode`
    /// unless another reader of the group has done or is doing so.
    pub async fn get<F, Fut>(&self, path: &str, size: u64, decode: F) -> Result<Arc<Decoded>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Decoded>>,
    {
        let key = FileKey {
            group: self.group,
            path: path.to_string(),
            size,
        };
        let cell = {
            let mut inner = self.cache.lock()?;
            let readers = inner.groups[self.group].readers;
            let fresh = !inner.files.contains_key(&key);
            let entry = inner.files.entry(key.clone()).or_insert_with(|| Entry {
                cell: Arc::default(),
                taken: 0,
                bytes: 0,
            });
            entry.taken += 1;
            let cell = entry.cell.clone();
            if entry.taken >= readers {
                inner.remove(&key);
                inner.compact();
            } else if fresh {
                inner.order.push_back(key.clone());
            }
            cell
        };
        let decoded = cell
            .get_or_try_init(|| async { decode().await.map(Arc::new) })
            .await?
            .clone();
        self.account(&key, &cell, &decoded)?;
        Ok(decoded)
    }

    /// Charges a kept entry's size to the budget once it is decoded, evicting the oldest.
    fn account(
        &self,
        key: &FileKey,
        cell: &Arc<OnceCell<Arc<Decoded>>>,
        decoded: &Decoded,
    ) -> Result<()> {
        let mut inner = self.cache.lock()?;
        let Some(entry) = inner.files.get_mut(key) else {
            return Ok(());
        };
        if !Arc::ptr_eq(&entry.cell, cell) || entry.bytes > 0 {
            return Ok(());
        }
        let bytes = decoded.batch.get_array_memory_size().max(1);
        entry.bytes = bytes;
        inner.bytes += bytes;
        while inner.bytes > BUDGET_BYTES {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.remove(&oldest);
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Ok(mut inner) = self.cache.lock() else {
            return;
        };
        let group = self.group;
        inner.groups[group].readers -= 1;
        let readers = inner.groups[group].readers;
        let done: Vec<FileKey> = inner
            .files
            .iter()
            .filter(|(k, e)| k.group == group && e.taken >= readers)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &done {
            inner.remove(key);
        }
        inner.compact();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use datafusion::arrow::datatypes::Schema;

    use super::*;
    use crate::source::format::FileFormat;
    use crate::source::malformed::{MalformedStats, ParseMode};

    fn decoder() -> Arc<Decoder> {
        Arc::new(Decoder::new(
            FileFormat::Text,
            Arc::new(Schema::empty()),
            ParseMode::Permissive,
            "_corrupt_record",
        ))
    }

    fn empty() -> Decoded {
        Decoded {
            batch: datafusion::arrow::array::RecordBatch::new_empty(Arc::new(Schema::empty())),
            malformed: MalformedStats::default(),
        }
    }

    /// Readers of one group decode a file once and the entry goes once all took it;
    /// a reader of another location decodes for itself.
    #[tokio::test]
    async fn a_file_is_decoded_once_per_group_and_then_dropped() {
        let cache = Arc::new(SharedDecodes::default());
        let d = decoder();
        let (a, b) = (
            cache.register("dir", &d).unwrap(),
            cache.register("dir", &d).unwrap(),
        );
        let other = cache.register("elsewhere", &d).unwrap();
        let decodes = AtomicUsize::new(0);
        let decode = || async {
            decodes.fetch_add(1, Ordering::SeqCst);
            Ok(empty())
        };
        a.get("f1", 10, decode).await.unwrap();
        assert_eq!(cache.lock().unwrap().files.len(), 1);
        b.get("f1", 10, decode).await.unwrap();
        assert_eq!(decodes.load(Ordering::SeqCst), 1);
        assert!(cache.lock().unwrap().files.is_empty());
        other.get("f1", 10, decode).await.unwrap();
        assert_eq!(decodes.load(Ordering::SeqCst), 2);
        // A reader that leaves releases what only it was still waiting for.
        a.get("f2", 10, decode).await.unwrap();
        drop(b);
        assert!(cache.lock().unwrap().files.is_empty());
    }

    /// A file is cleaned by whichever reader of its directory is done last,
    /// even once the reader that asked for the cleaning has ended, and once;
    /// a reader that ended keeps what it had not committed.
    #[test]
    fn a_file_is_cleaned_once_every_reader_of_its_directory_is_done() {
        let cache = SharedDecodes::default();
        let cleaner = cache.join_directory("/in", true).unwrap();
        let other = cache.join_directory("/in", false).unwrap();
        let elsewhere = cache.join_directory("/elsewhere", false).unwrap();
        assert!(!elsewhere.tracked());
        let delete = Some(&CleanAction::Delete);
        assert_eq!(cleaner.committed("/in/a", delete), None);
        assert_eq!(cleaner.committed("/in/b", delete), None);
        assert_eq!(other.committed("/in/a", None), Some(CleanAction::Delete));
        // Being cleaned: saying so again does not clean it twice.
        assert_eq!(other.committed("/in/a", None), None);
        other.handle().released("/in/a");
        assert_eq!(other.cleaned(), vec!["/in/a".to_string()]);
        assert!(other.cleaned().is_empty());
        drop(cleaner);
        assert!(other.tracked());
        assert_eq!(other.committed("/in/b", None), Some(CleanAction::Delete));
        // A file only the readers that do not clean took is left alone.
        assert_eq!(other.committed("/in/c", None), None);
        // A reader that ended before committing /in/d keeps it.
        let late = cache.join_directory("/in", true).unwrap();
        let stopped = cache.join_directory("/in", false).unwrap();
        drop(stopped);
        assert_eq!(late.committed("/in/d", delete), None);
        assert_eq!(other.committed("/in/d", None), None);
    }
}
