//! The checkpoint's files: durable writes, checksummed JSON, listing.
//!
//! A file appears whole or not at all ([`Location::write_file`]). JSON files
//! start with a line `v1 crc32=<hex>` (`v2` for a commit with state changes)
//! over the rest, so a damaged file is detected rather than half-read.

use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{BrookError, Result};
use crate::source::location::Location;

/// The header of JSON files. `v2` marks a commit whose state is a snapshot plus
/// changes: a build that knows only `v1` must refuse it rather than restore the
/// snapshot without the changes.
pub const JSON_V1: &str = "v1";
pub const JSON_V2: &str = "v2";
const JSON_VERSIONS: [&str; 2] = [JSON_V1, JSON_V2];

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
        self.location.write_file(rel, bytes, point).await
    }

    /// The bytes of `rel`, or `None` when it does not exist.
    pub async fn read(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.location.store.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
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
            Err(e) => return Err(e.into()),
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
            Err(e) => Err(e.into()),
        }
    }

    pub async fn write_json<T: Serialize>(
        &self,
        rel: &str,
        value: &T,
        point: (&str, u64),
    ) -> Result<()> {
        self.write_json_as(JSON_V1, rel, value, point).await
    }

    pub async fn write_json_as<T: Serialize>(
        &self,
        version: &str,
        rel: &str,
        value: &T,
        point: (&str, u64),
    ) -> Result<()> {
        let body = serde_json::to_vec(value)
            .map_err(|e| BrookError::checkpoint(self.display(rel), e.to_string()))?;
        let mut bytes = format!("{version} crc32={:08x}\n", crc32fast::hash(&body)).into_bytes();
        bytes.extend_from_slice(&body);
        self.write(rel, bytes, point).await
    }

    /// Reads a file written by [`write_json`](Self::write_json), checking its checksum.
    pub async fn read_json<T: DeserializeOwned>(&self, rel: &str) -> Result<Option<T>> {
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
        let expected = JSON_VERSIONS
            .iter()
            .find_map(|v| header.strip_prefix(v))
            .and_then(|h| h.trim().strip_prefix("crc32="))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
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
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| fail(format!("unreadable: {e}")))
    }
}
