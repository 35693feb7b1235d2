//! A complete-mode query's result in a file sink: each batch's whole result
//! as one snapshot directory, and a pointer `_latest` naming the newest.
//!
//! Batch N's result is written to `snapshots/<N>-<query>/part-0.<ext>` (whole,
//! as the append sink writes its parts), then `_latest` is replaced
//! atomically with a small JSON document naming that directory, its batch,
//! rows and files. A reader that reads `_latest` and then the files it names
//! always sees one batch's whole result: a snapshot is never written again
//! once `_latest` names it, except by a re-run of the same batch after a
//! crash, which writes the same rows under the same name. Only then are
//! snapshots beyond `snapshotsToRetain` deleted, oldest first, so a reader
//! that has just read `_latest` has at least one more batch to open the files.

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::error::{BrookError, Result};
use crate::options::Options;
use crate::source::location::{Location, blocking};
use crate::testing::faults;

/// The pointer to the newest snapshot, below the sink's directory.
pub const LATEST: &str = "_latest";
/// The directory holding the snapshots, below the sink's directory.
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// The file sink's options for complete mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// How many snapshots are kept, the newest included.
    pub retain: usize,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        // The newest and the one before it: a reader that read `_latest` just
        // before it moved can still open the snapshot it names.
        Self { retain: 2 }
    }
}

impl SnapshotOptions {
    pub const OPTIONS: &[&str] = &["snapshotsToRetain"];

    pub fn from_options(options: &Options) -> Result<Self> {
        Ok(match options.count::<usize>("snapshotsToRetain")? {
            Some(retain) => Self { retain },
            None => Self::default(),
        })
    }
}

#[derive(Serialize)]
struct Latest<'a> {
    batch_id: u64,
    /// The snapshot's directory, relative to the sink's.
    path: &'a str,
    rows: usize,
    files: Vec<LatestFile<'a>>,
}

#[derive(Serialize)]
struct LatestFile<'a> {
    /// Relative to the sink's directory, as `path` is.
    path: &'a str,
    rows: usize,
    bytes: usize,
}

/// One snapshot: batch `batch_id`'s whole result of query `tag`, encoded.
pub(super) struct Snapshot<'a> {
    pub batch_id: u64,
    pub tag: &'a str,
    pub extension: &'a str,
    pub encoded: Vec<u8>,
    pub rows: usize,
}

fn error(location: &Location, message: impl Into<String>) -> BrookError {
    BrookError::Sink {
        sink: location.display.clone(),
        message: message.into(),
    }
}

/// Writes `snapshot`, moves `_latest` to it, then deletes the snapshots of
/// query `tag` beyond the `retain` newest.
pub(super) async fn write(
    location: &Location,
    snapshot: Snapshot<'_>,
    options: SnapshotOptions,
) -> Result<()> {
    let Snapshot {
        batch_id,
        tag,
        extension,
        encoded,
        rows,
    } = snapshot;
    let dir = format!("{SNAPSHOTS_DIR}/{batch_id:05}-{tag}");
    let part = format!("{dir}/part-0.{extension}");
    let bytes = encoded.len();
    // An empty result is written too: the snapshot is the result, and its
    // file carries the schema (a CSV header, a Parquet footer).
    location
        .write_file(&part, encoded, ("sink-part-tmp", batch_id))
        .await?;
    faults::crash_point("sink-part", batch_id);
    let latest = Latest {
        batch_id,
        path: &dir,
        rows,
        files: vec![LatestFile {
            path: &part,
            rows,
            bytes,
        }],
    };
    let mut pointer =
        serde_json::to_vec_pretty(&latest).map_err(|e| error(location, e.to_string()))?;
    pointer.push(b'\n');
    location
        .write_file(LATEST, pointer, ("sink-manifest-tmp", batch_id))
        .await?;
    remove_old(location, tag, batch_id, options.retain).await
}

/// The batch id of a snapshot directory's name if it is one of query `tag`'s.
fn snapshot_batch(name: &str, tag: &str) -> Option<u64> {
    let (batch, of) = name.split_once('-')?;
    (of == tag).then(|| batch.parse().ok()).flatten()
}

/// Deletes query `tag`'s snapshots older than `current` beyond the `retain`
/// newest (`current` included). Newer ones are left alone: they can only be a
/// crashed run's, which a re-run of their batch rewrites.
async fn remove_old(location: &Location, tag: &str, current: u64, retain: usize) -> Result<()> {
    let names = snapshot_names(location).await?;
    let mut older: Vec<(u64, String)> = names
        .into_iter()
        .filter_map(|name| Some((snapshot_batch(&name, tag)?, name)))
        .filter(|(batch, _)| *batch < current)
        .collect();
    older.sort();
    let keep = retain.saturating_sub(1);
    let stale = older.len().saturating_sub(keep);
    for (_, name) in older.into_iter().take(stale) {
        remove_snapshot(location, &name).await?;
    }
    Ok(())
}

/// The names of the directories below `snapshots/`.
async fn snapshot_names(location: &Location) -> Result<Vec<String>> {
    if let Some(dir) = &location.local_dir {
        let dir = dir.join(SNAPSHOTS_DIR);
        return blocking(move || {
            let entries = std::fs::read_dir(&dir).map_err(|e| BrookError::io(&dir, e))?;
            let mut names = vec![];
            for entry in entries {
                let entry = entry.map_err(|e| BrookError::io(&dir, e))?;
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
            Ok(names)
        })
        .await;
    }
    let listed = location
        .store
        .list_with_delimiter(Some(&location.child(SNAPSHOTS_DIR)))
        .await?;
    Ok(listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .collect())
}

async fn remove_snapshot(location: &Location, name: &str) -> Result<()> {
    if let Some(dir) = &location.local_dir {
        let dir = dir.join(SNAPSHOTS_DIR).join(name);
        // With the hidden files a killed write left in it.
        return blocking(move || {
            std::fs::remove_dir_all(&dir).map_err(|e| BrookError::io(&dir, e))
        })
        .await;
    }
    let prefix = location.child_path(&format!("{SNAPSHOTS_DIR}/{name}"));
    let objects: Vec<_> = location.store.list(Some(&prefix)).try_collect().await?;
    for object in objects {
        location.store.delete(&object.location).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::execution::runtime_env::RuntimeEnv;
    use object_store::ObjectStore;

    use super::*;

    /// Object stores have no directories: snapshots are listed by prefix and
    /// deleted object by object.
    #[tokio::test]
    async fn an_object_store_keeps_the_retained_snapshots_and_the_pointer() {
        let location = Location::resolve("memory://snapshots/out", &RuntimeEnv::default()).unwrap();
        let options = SnapshotOptions { retain: 2 };
        for batch_id in 0..4 {
            let snapshot = Snapshot {
                batch_id,
                tag: "abcdef12",
                extension: "csv",
                encoded: format!("n\n{batch_id}\n").into_bytes(),
                rows: 1,
            };
            write(&location, snapshot, options).await.unwrap();
        }
        let mut names: Vec<String> = location
            .store
            .list(Some(&location.prefix))
            .map_ok(|o| o.location.as_ref().to_string())
            .try_collect()
            .await
            .unwrap();
        names.sort();
        assert_eq!(
            names,
            [
                "out/_latest",
                "out/snapshots/00002-abcdef12/part-0.csv",
                "out/snapshots/00003-abcdef12/part-0.csv"
            ]
        );
        let latest = location
            .store
            .get(&location.child(LATEST))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let latest: serde_json::Value = serde_json::from_slice(&latest).unwrap();
        assert_eq!(latest["batch_id"], 3);
        assert_eq!(
            latest["files"][0]["path"],
            "snapshots/00003-abcdef12/part-0.csv"
        );
    }

    #[test]
    fn snapshot_names_are_matched_to_their_query() {
        assert_eq!(snapshot_batch("00012-abcdef12", "abcdef12"), Some(12));
        assert_eq!(snapshot_batch("123456-abcdef12", "abcdef12"), Some(123456));
        assert_eq!(snapshot_batch("00012-99999999", "abcdef12"), None);
        assert_eq!(snapshot_batch(".00012-abcdef12.tmp", "abcdef12"), None);
        assert_eq!(snapshot_batch("notes", "abcdef12"), None);
    }
}
