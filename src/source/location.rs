//! Turning a LOCATION (local path or object-store URL) into a store and a prefix.

use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

use crate::error::{BrookError, Result};
use crate::testing::faults;

/// A resolved location: where to list, read or write, and how to show it to users.
#[derive(Debug, Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The location as the user wrote it, for messages.
    pub display: String,
    /// The directory on disk, for local locations.
    pub local_dir: Option<PathBuf>,
}

impl Location {
    /// The full path of an object directly below this location.
    pub fn child(&self, name: &str) -> Path {
        self.prefix.clone().join(name)
    }

    /// The full path of `rel` (`a/b/c`) below this location. An object store's
    /// key holds each part as written, Hive's escapes (`symbol=A%2FB`) included;
    /// the local store turns its encoded parts back into the file names.
    pub fn child_path(&self, rel: &str) -> Path {
        rel.split('/')
            .fold(self.prefix.clone(), |p, part| match PathPart::parse(part) {
                Ok(raw) if self.local_dir.is_none() => p.join(raw),
                _ => p.join(part),
            })
    }

    /// Writes `rel` so that it is either absent or complete, even across a crash.
    /// On a local disk the file is written under a hidden temporary name (which
    /// directory readers skip), flushed, renamed into place, and its directory
    /// flushed, so neither a killed process nor a power cut leaves a torn file;
    /// object stores make `put` atomic themselves. `point` names the instant
    /// before the rename for crash tests.
    pub async fn write_file(&self, rel: &str, bytes: Vec<u8>, point: (&str, u64)) -> Result<()> {
        let Some(dir) = &self.local_dir else {
            faults::crash_point(point.0, point.1);
            self.store
                .put(&self.child_path(rel), PutPayload::from(bytes))
                .await?;
            return Ok(());
        };
        let (dest, tmp) = staging(dir, rel, None);
        // fsync blocks for milliseconds: off the runtime's threads, which run other queries.
        let staged = tmp.clone();
        blocking(move || stage(&staged, &bytes)).await?;
        faults::crash_point(point.0, point.1);
        blocking(move || {
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
            sync_dir(dest.parent().unwrap_or(&dest))
        })
        .await
    }

    /// Writes `rel` unless it exists; whether it wrote it. Two writers racing
    /// for one name never both win, and neither a crash nor a power cut leaves
    /// a torn file: on a local disk the file is written and flushed under a
    /// hidden temporary name of its own, then hard-linked into place, which
    /// fails if the name is taken; object stores make a put with
    /// `PutMode::Create` atomic and exclusive themselves. A store that cannot
    /// put conditionally fails with `NotImplemented`, for the caller to decide.
    pub async fn put_if_absent(&self, rel: &str, bytes: Bytes) -> Result<bool> {
        let Some(dir) = &self.local_dir else {
            let create = PutOptions::from(PutMode::Create);
            return match self
                .store
                .put_opts(&self.child_path(rel), PutPayload::from(bytes), create)
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let (dest, tmp) = staging(dir, rel, Some(rand::random()));
        blocking(move || {
            stage(&tmp, &bytes)?;
            let linked = std::fs::hard_link(&tmp, &dest);
            std::fs::remove_file(&tmp).map_err(io(&tmp))?;
            match linked {
                Ok(()) => sync_dir(dest.parent().unwrap_or(&dest)).map(|()| true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(BrookError::io(dest, e)),
            }
        })
        .await
    }

    /// What went wrong with a request to this location's store, for a message
    /// that names the location: the store's own error names only the object's
    /// key. An S3 request refused or unanswered is most often a setting of the
    /// environment, which the message then names.
    pub fn store_failure(&self, e: &object_store::Error) -> String {
        use object_store::Error as E;
        let s3 = self.display.starts_with("s3://") || self.display.starts_with("s3a://");
        let settings = matches!(
            e,
            E::PermissionDenied { .. } | E::Unauthenticated { .. } | E::Generic { .. }
        );
        if s3 && settings {
            format!(
                "{e}; check the S3 settings in the environment (AWS_ENDPOINT, AWS_REGION, \
                 AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP for http://)"
            )
        } else {
            e.to_string()
        }
    }

    /// Resolves `location`: plain paths and `file://` URLs are local; `s3://bucket/prefix`
    /// takes its credentials from the usual AWS environment variables; `memory://name/`
    /// is an in-process store shared by everything in the same runtime (for tests and
    /// embedding); any other scheme must have been registered on the session's runtime.
    pub fn resolve(location: &str, runtime: &RuntimeEnv) -> Result<Self> {
        let err = |message: String| BrookError::Source {
            location: location.to_string(),
            message,
        };
        if !location.contains("://") {
            return Self::local(location, FsPath::new(location));
        }
        let url = Url::parse(location).map_err(|e| err(format!("not a valid URL: {e}")))?;
        let prefix = Path::from_url_path(url.path()).map_err(|e| err(e.to_string()))?;
        match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|_| err("a file:// URL needs an absolute path".into()))?;
                Self::local(location, &path)
            }
            scheme => {
                let root = ObjectStoreUrl::parse(format!("{scheme}://{}", url.authority()))
                    .map_err(|e| err(e.to_string()))?;
                let store = match runtime.object_store(&root) {
                    Ok(store) => store,
                    Err(_) => {
                        let store: Arc<dyn ObjectStore> = match scheme {
                            "memory" => Arc::new(InMemory::new()),
                            "s3" | "s3a" => Arc::new(
                                AmazonS3Builder::from_env()
                                    .with_bucket_name(url.host_str().unwrap_or_default())
                                    .build()
                                    .map_err(|e| err(format!("cannot open S3 bucket: {e}")))?,
                            ),
                            other => {
                                return Err(err(format!(
                                    "no object store for scheme '{other}'; use a local path, \
                                     file://, s3:// or memory://, or register a store for it"
                                )));
                            }
                        };
                        runtime.register_object_store(root.as_ref(), store.clone());
                        store
                    }
                };
                Ok(Self {
                    store,
                    prefix,
                    display: location.to_string(),
                    local_dir: None,
                })
            }
        }
    }

    fn local(display: &str, path: &FsPath) -> Result<Self> {
        let abs = without_dot_dot(&std::path::absolute(path).map_err(|e| BrookError::io(path, e))?);
        let prefix = Path::from_absolute_path(&abs).map_err(|e| BrookError::Source {
            location: display.to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new()),
            prefix,
            display: display.to_string(),
            local_dir: Some(abs),
        })
    }

    /// The file on disk that `path` (below this location) names, if it is local.
    pub fn local_file(&self, path: &Path) -> Option<PathBuf> {
        self.local_dir.as_ref()?;
        LocalFileSystem::new().path_to_filesystem(path).ok()
    }

    /// Fails with a message naming the directory when a local source directory is missing.
    pub fn require_existing_dir(&self) -> Result<()> {
        match &self.local_dir {
            Some(dir) if !dir.is_dir() => Err(BrookError::Source {
                location: self.display.clone(),
                message: format!(
                    "directory {} does not exist; create it or fix the table's LOCATION",
                    dir.display()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Creates a local directory for writing; object stores need no directories.
    pub fn ensure_dir(&self) -> Result<()> {
        if let Some(dir) = &self.local_dir {
            std::fs::create_dir_all(dir).map_err(|e| BrookError::io(dir, e))?;
        }
        Ok(())
    }
}

/// `path` with `..` taken out lexically (`/a/b/../c` is `/a/c`), as a shell's
/// `cd` does: object-store paths cannot hold `..`, so `LOCATION '../orders'`
/// would otherwise be refused.
fn without_dot_dot(path: &FsPath) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn io(path: &FsPath) -> impl FnOnce(std::io::Error) -> BrookError {
    let path = path.to_path_buf();
    move |e| BrookError::io(path, e)
}

/// The file `rel` below `dir`, and the hidden name it is written under before
/// it is moved into place; a `claim` sets one writer's name apart from those
/// of others writing the same file at once.
fn staging(dir: &FsPath, rel: &str, claim: Option<u32>) -> (PathBuf, PathBuf) {
    let dest = dir.join(rel);
    let mut name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(claim) = claim {
        name = format!("{name}.{claim:08x}");
    }
    let tmp = dest.parent().unwrap_or(dir).join(temporary_name(&name));
    (dest, tmp)
}

/// Writes `bytes` to the new file `tmp`, creating its directory, and flushes it to disk.
fn stage(tmp: &FsPath, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = tmp.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut file = std::fs::File::create(tmp).map_err(io(tmp))?;
    file.write_all(bytes).map_err(io(tmp))?;
    file.sync_all().map_err(io(tmp))
}

/// Flushes `dir`'s entries to disk, so that a file renamed or linked into it
/// survives a power cut.
fn sync_dir(dir: &FsPath) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The hidden name a local file is written under before it is renamed into place.
pub(crate) fn temporary_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Whether `name` is one [`Location::write_file`] or [`Location::put_if_absent`]
/// writes under: a kill before the rename or link leaves it behind.
pub(crate) fn is_temporary(name: &str) -> bool {
    name.len() > ".tmp".len() + 1 && name.starts_with('.') && name.ends_with(".tmp")
}

/// Writes `name` under `dir` so that a watching source never sees it half-written.
pub fn write_atomically(dir: &FsPath, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, data).map_err(|e| BrookError::io(&tmp, e))?;
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).map_err(|e| BrookError::io(&dest, e))
}

/// Runs file-system work off the runtime's threads, which run other queries.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BrookError::task("a file task", e))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Racing writers of one name: exactly one wins, the file holds its bytes
    /// whole, and no staged file is left behind.
    async fn one_of_racing_writers_wins(location: Location) {
        let writers = (0..8u8).map(|i| {
            let location = location.clone();
            tokio::spawn(async move {
                let bytes = Bytes::from(vec![i; 64 << 10]);
                (i, location.put_if_absent("log/entry.json", bytes).await)
            })
        });
        let mut winners = vec![];
        for writer in writers {
            let (i, written) = writer.await.unwrap();
            if written.unwrap() {
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let again = location.put_if_absent("log/entry.json", Bytes::from_static(b"late"));
        assert!(!again.await.unwrap());
        let path = location.child_path("log/entry.json");
        let held = location.store.get(&path).await.unwrap().bytes().await;
        assert_eq!(held.unwrap(), vec![winners[0]; 64 << 10]);
        let log = location.child("log");
        let listed = location
            .store
            .list_with_delimiter(Some(&log))
            .await
            .unwrap();
        let names: Vec<&str> = (listed.objects.iter())
            .filter_map(|o| o.location.filename())
            .collect();
        assert_eq!(names, ["entry.json"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_local_create_if_absent_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let location = Location::resolve(dir.path().to_str().unwrap(), &RuntimeEnv::default());
        let location = location.unwrap();
        one_of_racing_writers_wins(location.clone()).await;
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["entry.json"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_object_store_create_if_absent_has_one_winner() {
        let location = Location::resolve("memory://races/out", &RuntimeEnv::default());
        one_of_racing_writers_wins(location.unwrap()).await;
    }
}
