//! Reading a brook file sink's manifest: which files of its output directory
//! are the table's *live* files. The sink writes the manifest and compaction
//! (`sink::compact`) extends it; readers of the directory follow it, as
//! Spark's file source follows a file sink's `_spark_metadata`.
//!
//! The manifest (`_brook_manifest/` in the table directory) holds batch
//! entries (`<batch:020>-<query>.json` = `{batch_id, files: [{path, rows,
//! bytes}]}`) and compaction entries (`compact-<seq:020>.json` =
//! `{compaction, added: [{path, rows, bytes}], removed: [path]}`). The live
//! files are those the batch entries list, minus those a compaction entry
//! removed, plus those a compaction entry added; paths are relative to the
//! table directory (`k=v/part-...` under Hive-style partitions).

use std::collections::{BTreeMap, BTreeSet};

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::location::{Location, is_temporary};
use crate::error::{BrookError, Result};

/// The directory of a file sink's manifest, below the table directory.
pub const MANIFEST_DIR: &str = "_brook_manifest";

/// A file as a manifest entry lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Deserialize)]
struct BatchEntry {
    batch_id: u64,
    files: Vec<ManifestFile>,
}

/// A compaction entry: `added` replaced `removed`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CompactionEntry {
    pub compaction: u64,
    pub added: Vec<ManifestFile>,
    pub removed: Vec<String>,
}

/// The manifest's entries as read at one instant.
#[derive(Debug, Default)]
pub struct Manifest {
    /// The batch entries' files with their batch ids, in batch order.
    pub batch_files: Vec<(u64, ManifestFile)>,
    /// The compaction entries, by sequence number.
    pub compactions: BTreeMap<u64, CompactionEntry>,
}

/// Whether `location` holds a manifest, i.e. is a brook file sink's output.
pub async fn holds_manifest(location: &Location) -> Result<bool> {
    if let Some(dir) = &location.local_dir {
        return Ok(dir.join(MANIFEST_DIR).is_dir());
    }
    let listing = location
        .store
        .list_with_delimiter(Some(&location.prefix))
        .await?;
    Ok(listing
        .common_prefixes
        .iter()
        .any(|p| p.filename() == Some(MANIFEST_DIR)))
}

impl Manifest {
    pub async fn read(location: &Location) -> Result<Self> {
        let dir = location.child(MANIFEST_DIR);
        let mut names: Vec<String> = location
            .store
            .list(Some(&dir))
            .map_ok(|meta| meta.location.filename().unwrap_or_default().to_string())
            .try_collect()
            .await?;
        names.retain(|n| n.ends_with(".json") && !is_temporary(n));
        names.sort();
        let mut manifest = Self::default();
        let mut seen = BTreeSet::new();
        for name in names {
            let rel = format!("{MANIFEST_DIR}/{name}");
            let bytes = location
                .store
                .get(&location.child_path(&rel))
                .await?
                .bytes()
                .await?;
            let context = || format!("{} {rel}", location.display);
            if name.starts_with("compact-") {
                let entry: CompactionEntry =
                    serde_json::from_slice(&bytes).map_err(|e| BrookError::serde(context(), e))?;
                manifest.compactions.insert(entry.compaction, entry);
            } else {
                let entry: BatchEntry =
                    serde_json::from_slice(&bytes).map_err(|e| BrookError::serde(context(), e))?;
                // A batch re-run after a restart rewrites its own files under the same names.
                for file in entry.files {
                    if seen.insert(file.path.clone()) {
                        manifest.batch_files.push((entry.batch_id, file));
                    }
                }
            }
        }
        Ok(manifest)
    }

    /// The files compaction entries replaced.
    pub fn removed(&self) -> BTreeSet<&str> {
        self.compactions
            .values()
            .flat_map(|c| c.removed.iter().map(String::as_str))
            .collect()
    }

    /// The live files: merged ones first (they hold the older rows), then the batches'.
    pub fn live(&self) -> Vec<ManifestFile> {
        let removed = self.removed();
        self.compactions
            .values()
            .flat_map(|c| c.added.iter())
            .chain(self.batch_files.iter().map(|(_, f)| f))
            .filter(|f| !removed.contains(f.path.as_str()))
            .cloned()
            .collect()
    }

    /// The sequence number of the next compaction entry.
    pub fn next_seq(&self) -> u64 {
        self.compactions.keys().next_back().map_or(1, |s| s + 1)
    }
}

/// The live files of a brook file sink's output directory, as its manifest lists them.
pub async fn live_files(location: &Location) -> Result<Vec<ManifestFile>> {
    Ok(Manifest::read(location).await?.live())
}
