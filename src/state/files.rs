//! The checkpoint's files: durable writes, checksummed JSON, listing.
//!
//! A file appears whole or not at all ([`Location::write_file`]). JSON files
//! start with a line `v1 crc32=<hex>` (`v2` for a commit with state changes,
//! `v3` for a source's progress with its batch) over the rest, so a damaged
//! file is detected rather than half-read; other files name one by that checksum.

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{BrookError, Result};
use crate::source::location::{Location, blocking, is_temporary, temporary_name};
use crate::testing::faults;

/// The header of JSON files. `v2` marks a commit whose state is a snapshot plus
/// changes: a build that knows only `v1` must refuse it rather than restore the
/// snapshot without the changes. `v3` marks a source's progress wrapped with
/// the batch and query it belongs to, which an older build would misread.
pub const JSON_V1: &str = "v1";
pub const JSON_V2: &str = "v2";
pub const JSON_V3: &str = "v3";
const JSON_VERSIONS: [&str; 3] = [JSON_V1, JSON_V2, JSON_V3];

/// A JSON file as read: its value, its header's version, and the checksum of
/// its body, by which other files refer to it.
pub struct Json<T> {
    pub value: T,
    pub version: &'static str,
    pub crc32: u32,
}

#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    location: Location,
}

impl CheckpointFiles {
    pub fn new(location: Location) -> Result<Self> {
        if let Some(dir) = &location.local_dir {
            let created = if dir.is_file() {
                Err("it is a file".to_string())
            } else {
                std::fs::create_dir_all(dir).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotADirectory => format!("{e}: a parent is a file"),
                    _ => e.to_string(),
                })
            };
            if let Err(why) = created {
                return Err(BrookError::checkpoint(
                    dir.display().to_string(),
                    format!(
                        "cannot be created as a directory ({why}); a checkpoint location \
                         (--checkpoint DIR, option 'checkpointLocation') names a directory"
                    ),
                ));
            }
        }
        Ok(Self { location })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// How a file of the checkpoint is named in messages.
    pub fn display(&self, rel: &str) -> String {
        match &self.location.local_dir {
            Some(dir) => dir.join(rel).display().to_string(),
            None => format!("{}/{rel}", self.location.display.trim_end_matches('/')),
        }
    }

    fn path(&self, rel: &str) -> Path {
        self.location.child_path(rel)
    }

    /// Writes `rel` so that it is either absent or complete, even across a crash.
    pub async fn write(&self, rel: &str, bytes: Vec<u8>, point: (&str, u64)) -> Result<()> {
        match self.location.write_file(rel, bytes, point).await {
            Err(BrookError::ObjectStore(e)) => Err(self.failed(rel, e)),
            written => written,
        }
    }

    /// A store's error, naming the checkpoint file it was about.
    fn failed(&self, rel: &str, e: object_store::Error) -> BrookError {
        BrookError::checkpoint(self.display(rel), self.location.store_failure(&e))
    }

    /// The bytes of `rel`, or `None` when it does not exist.
    pub async fn read(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.location.store.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.failed(rel, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(rel, e)),
        }
    }

    /// Names of the files directly in directory `rel`, without temporary files.
    pub async fn list(&self, rel: &str) -> Result<Vec<String>> {
        let listing = self
            .location
            .store
            .list_with_delimiter(Some(&self.path(rel)))
            .await;
        let objects = match listing {
            Ok(l) => l.objects,
            Err(object_store::Error::NotFound { .. }) => vec![],
            Err(e) => return Err(self.failed(rel, e)),
        };
        Ok(objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .filter(|n| !n.starts_with('.') && !n.contains('#'))
            .collect())
    }

    pub async fn delete(&self, rel: &str) -> Result<()> {
        match self.location.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(rel, e)),
        }
    }

    /// Writes `value` as JSON; returns the checksum of the body.
    pub async fn write_json_as<T: Serialize>(
        &self,
        version: &str,
        rel: &str,
        value: &T,
        point: (&str, u64),
    ) -> Result<u32> {
        let (bytes, crc) = self.encode_json(version, rel, value)?;
        self.write(rel, bytes, point).await?;
        Ok(crc)
    }

    /// As [`write_json_as`](Self::write_json_as), for a file written once
    /// (metadata, a batch's offsets or commit): on an object store, which has
    /// no lock to keep a second query out, a file already there means that
    /// another query runs on this checkpoint, and this one is refused, as
    /// Spark refuses a concurrent update to its logs.
    pub async fn create_json_as<T: Serialize>(
        &self,
        version: &str,
        rel: &str,
        value: &T,
        point: (&str, u64),
    ) -> Result<u32> {
        let (bytes, crc) = self.encode_json(version, rel, value)?;
        if self.location.local_dir.is_some() {
            // The checkpoint's lock file keeps every other query out.
            self.write(rel, bytes, point).await?;
            return Ok(crc);
        }
        faults::crash_point(point.0, point.1);
        let bytes = Bytes::from(bytes);
        match self.location.put_if_absent(rel, bytes.clone()).await {
            Ok(true) => Ok(crc),
            // The store retries a request whose answer was lost: the object
            // it then finds may be this very write. Another query's differs
            // (its offsets hold their planning time, its metadata a new id).
            Ok(false) if self.read(rel).await?.as_ref() == Some(&bytes) => Ok(crc),
            Ok(false) => Err(BrookError::checkpoint(
                self.display(rel),
                "already written by another query running on this checkpoint (an object \
                 store keeps no lock, so the second query is refused when it writes a batch \
                 the first has written); stop the other query, or give this one its own \
                 checkpoint location",
            )),
            // A store that cannot put conditionally (S3 with AWS_CONDITIONAL_PUT=disabled)
            // writes as before, with no check against a second query.
            Err(BrookError::ObjectStore(object_store::Error::NotImplemented { .. })) => {
                self.location
                    .store
                    .put(&self.path(rel), PutPayload::from(bytes))
                    .await
                    .map_err(|e| self.failed(rel, e))?;
                Ok(crc)
            }
            Err(BrookError::ObjectStore(e)) => Err(self.failed(rel, e)),
            Err(e) => Err(e),
        }
    }

    fn encode_json<T: Serialize>(
        &self,
        version: &str,
        rel: &str,
        value: &T,
    ) -> Result<(Vec<u8>, u32)> {
        let body = serde_json::to_vec(value)
            .map_err(|e| BrookError::checkpoint(self.display(rel), e.to_string()))?;
        let crc = crc32fast::hash(&body);
        let mut bytes = format!("{version} crc32={crc:08x}\n").into_bytes();
        bytes.extend_from_slice(&body);
        Ok((bytes, crc))
    }

    /// Reads a file written by [`write_json_as`](Self::write_json_as), checking its checksum.
    pub async fn read_json<T: DeserializeOwned>(&self, rel: &str) -> Result<Option<T>> {
        Ok(self.read_json_file(rel).await?.map(|json| json.value))
    }

    /// Reads a file written by [`write_json_as`](Self::write_json_as) with its header.
    pub async fn read_json_file<T: DeserializeOwned>(&self, rel: &str) -> Result<Option<Json<T>>> {
        let Some(bytes) = self.read(rel).await? else {
            return Ok(None);
        };
        let fail = |m: String| BrookError::checkpoint(self.display(rel), m);
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| fail("truncated: no header line".into()))?;
        let header = std::str::from_utf8(&bytes[..newline]).unwrap_or_default();
        let body = &bytes[newline + 1..];
        let (version, expected) = JSON_VERSIONS
            .iter()
            .find_map(|v| Some((*v, header.strip_prefix(v)?)))
            .and_then(|(v, h)| Some((v, h.trim().strip_prefix("crc32=")?)))
            .and_then(|(v, h)| Some((v, u32::from_str_radix(h, 16).ok()?)))
            .ok_or_else(|| {
                let shown = header.chars().take(40).collect::<String>();
                let version = header.split(' ').next().unwrap_or_default();
                let newer = !JSON_VERSIONS.contains(&version)
                    && version.len() > 1
                    && version.starts_with('v')
                    && version[1..].bytes().all(|b| b.is_ascii_digit());
                fail(if newer {
                    format!(
                        "written in checkpoint format {version}, which this brook ({}) does not \
                         know: run the newer brook that wrote it",
                        env!("CARGO_PKG_VERSION")
                    )
                } else {
                    format!(
                        "unrecognised header '{shown}': not a brook checkpoint file, or damaged"
                    )
                })
            })?;
        let actual = crc32fast::hash(body);
        if actual != expected {
            return Err(fail(format!(
                "checksum mismatch (file says {expected:08x}, contents give {actual:08x}): \
                 the file is damaged or truncated; restore it from a backup or start over \
                 with a new checkpoint location"
            )));
        }
        let value = serde_json::from_slice(body).map_err(|e| fail(format!("unreadable: {e}")))?;
        Ok(Some(Json {
            value,
            version,
            crc32: actual,
        }))
    }

    /// Removes the temporary files that writes killed before their rename left
    /// behind. Only the query holding the checkpoint's lock may: another's
    /// writes in progress look the same.
    pub async fn remove_temporary(&self) -> Result<()> {
        let Some(dir) = self.location.local_dir.clone() else {
            // Object stores write whole objects: nothing is left half written.
            return Ok(());
        };
        blocking(move || {
            // The checkpoint's own files only: its location may hold more (a
            // sink's output, another query's writes in progress).
            remove_left_behind(&dir.join(temporary_name("metadata")))?;
            for logs in ["offsets", "commits", "sources"] {
                remove_temporary_in(&dir.join(logs), 0)?;
            }
            remove_temporary_in(&dir.join("state"), 1)
        })
        .await
    }
}

/// Removes temporary files in `dir`, and `depth` levels of directories below.
fn remove_temporary_in(dir: &std::path::Path, depth: usize) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BrookError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| BrookError::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| BrookError::io(&path, e))?;
        if kind.is_dir() {
            if depth > 0 {
                remove_temporary_in(&path, depth - 1)?;
            }
        } else if is_temporary(&entry.file_name().to_string_lossy()) {
            remove_left_behind(&path)?;
        }
    }
    Ok(())
}

/// Removes a temporary file, if there, that a write cut short left behind.
fn remove_left_behind(path: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(
                "removed {}, left by a write that was cut short",
                path.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BrookError::io(path, e)),
    }
}
