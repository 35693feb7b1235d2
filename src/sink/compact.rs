//! Compaction of a file sink's output: many small part files merged into few
//! of about `targetFileSize`, without a reader that follows the manifest ever
//! seeing a row twice or missing one.
//!
//! The manifest (`_brook_manifest/` in the table directory, read by
//! `source::manifest`) says which files are the table's *live* files: those
//! listed by batch entries, minus those a compaction entry replaced, plus
//! those a compaction entry added.
//!
//! A compaction only touches the files of entries present when it starts, so
//! a query may keep writing into the directory. It merges live files smaller
//! than the target within one directory (Hive-style partitions never mix),
//! writes each merged file whole (`part-compact-<seq>-<run>-<n>.<ext>`), and
//! then creates its entry if absent: that one write is the switch for
//! readers, and two compactors cannot both claim a sequence number (the loser
//! removes its merged files and backs off). A crash before the entry leaves
//! the old live set; after it, the new one.
//!
//! The files a compaction replaced stay on disk until the next compaction
//! run, so that a reader that listed the live set just before the switch can
//! still read them; that run deletes them, and merged files no entry lists
//! (left by a crashed or beaten compactor) of sequence numbers up to its own.
//! After that, a reader that globs the whole directory sees each row once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use super::parquet;
use crate::error::{BrookError, Result};
use crate::options::Options;
use crate::source::location::Location;
pub use crate::source::manifest::MANIFEST_DIR;
use crate::source::manifest::{CompactionEntry, Manifest, ManifestFile};
use crate::testing::faults;

/// The size merged files grow to unless `targetFileSize` says otherwise (as Delta's OPTIMIZE).
pub const DEFAULT_TARGET_FILE_SIZE: u64 = 128 << 20;

/// The name prefix of merged files: never a batch's part (`part-<digits>-...`).
const MERGED_PREFIX: &str = "part-compact-";

/// A file sink's own compaction: after every `every`-th batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoCompact {
    pub every: u64,
    pub target_file_size: u64,
}

impl AutoCompact {
    pub const OPTIONS: &[&str] = &["compactEvery", "targetFileSize"];

    /// Options `compactEvery` (a batch count) and `targetFileSize` (a size).
    pub fn from_options(options: &Options) -> Result<Option<Self>> {
        let every: Option<u64> = options.count("compactEvery")?;
        let target = options.size("targetFileSize")?;
        match (every, target) {
            (Some(every), target) => Ok(Some(Self {
                every,
                target_file_size: target.unwrap_or(DEFAULT_TARGET_FILE_SIZE),
            })),
            (None, Some(_)) => Err(BrookError::option(
                "targetFileSize",
                "is the size compaction merges files to: give 'compactEvery' too (a batch \
                 count), or compact with `brook compact DIR --target-file-size SIZE`",
            )),
            (None, None) => Ok(None),
        }
    }
}

/// What a table directory is, for `brook compact`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A brook file sink's output: it holds `_brook_manifest`.
    BrookSink,
    /// A Delta table: it holds `_delta_log`.
    Delta,
    Other,
}

/// Whether `location` holds a brook file sink's output, a Delta table, or neither.
pub async fn table_kind(location: &Location) -> Result<TableKind> {
    let listing = location
        .store
        .list_with_delimiter(Some(&location.prefix))
        .await?;
    let has = |name: &str| {
        listing
            .common_prefixes
            .iter()
            .any(|p| p.filename() == Some(name))
    };
    Ok(if has(MANIFEST_DIR) {
        TableKind::BrookSink
    } else if has("_delta_log") {
        TableKind::Delta
    } else {
        TableKind::Other
    })
}

/// What one compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The sequence number of the entry this run wrote, if it wrote one.
    pub entry: Option<u64>,
    /// Another compactor claimed this run's sequence number first.
    pub beaten: bool,
    pub live_files_before: usize,
    pub live_bytes_before: u64,
    pub live_files_after: usize,
    pub live_bytes_after: u64,
    /// Files merged, and the merged files they became.
    pub merged: usize,
    pub merged_into: usize,
    /// Files deleted: replaced by an earlier compaction, or merged files no entry lists.
    pub deleted: usize,
}

impl std::fmt::Display for CompactReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.beaten {
            return write!(
                f,
                "another compaction of this directory committed first; nothing changed"
            );
        }
        write!(
            f,
            "live files: {} ({} bytes) before, {} ({} bytes) after; merged {} files into {}; \
             deleted {} files replaced earlier or left by an unfinished compaction",
            self.live_files_before,
            self.live_bytes_before,
            self.live_files_after,
            self.live_bytes_after,
            self.merged,
            self.merged_into,
            self.deleted,
        )
    }
}

/// The format a file sink writes; a compaction merges the files of each
/// format alone, telling them apart by their extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutputFormat {
    Parquet,
    Csv,
    Json,
}

impl OutputFormat {
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "PARQUET" => Some(Self::Parquet),
            "CSV" => Some(Self::Csv),
            "JSON" | "NDJSON" => Some(Self::Json),
            _ => None,
        }
    }

    /// The format of the file `path`, by its extension.
    pub fn of(path: &str) -> Option<Self> {
        let ext = path.rsplit_once('.')?.1;
        [Self::Parquet, Self::Csv, Self::Json]
            .into_iter()
            .find(|f| f.extension() == ext)
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Csv => "csv",
            Self::Json => "json",
        }
    }

    /// The writer options a sink of this format takes.
    pub fn options(self) -> Vec<&'static str> {
        match self {
            Self::Parquet => [parquet::OPTIONS, &[parquet::TIMESTAMP_OPTION]].concat(),
            Self::Csv | Self::Json => vec![],
        }
    }
}

fn parent_dir(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// The sequence number in a merged file's name.
fn merged_seq(name: &str) -> Option<u64> {
    name.strip_prefix(MERGED_PREFIX)?.get(..20)?.parse().ok()
}

/// Compacts the brook file sink output at `location`: see the module's documentation.
pub async fn compact(location: &Location, target_file_size: u64) -> Result<CompactReport> {
    let manifest = Manifest::read(location).await?;
    let seq = manifest.next_seq();
    let live = manifest.live();
    let mut report = CompactReport {
        live_files_before: live.len(),
        live_bytes_before: live.iter().map(|f| f.bytes).sum(),
        ..CompactReport::default()
    };

    // Bins of small files of one directory and format, filled up to the target.
    let mut groups: BTreeMap<(&str, OutputFormat), Vec<&ManifestFile>> = BTreeMap::new();
    for file in &live {
        if let Some(format) = OutputFormat::of(&file.path)
            && file.bytes < target_file_size
        {
            groups
                .entry((parent_dir(&file.path), format))
                .or_default()
                .push(file);
        }
    }
    let mut bins: Vec<(&str, OutputFormat, Vec<&ManifestFile>)> = vec![];
    for ((dir, format), files) in groups {
        let mut bin: Vec<&ManifestFile> = vec![];
        let mut size = 0;
        for file in files {
            bin.push(file);
            size += file.bytes;
            if size >= target_file_size {
                bins.push((dir, format, std::mem::take(&mut bin)));
                size = 0;
            }
        }
        bins.push((dir, format, bin));
    }
    bins.retain(|(_, _, files)| files.len() > 1);

    let existing: Vec<String> = location
        .store
        .list(Some(&location.prefix))
        .map_ok(|meta| relative(location, &meta.location))
        .try_collect()
        .await?;
    let added: BTreeSet<&str> = manifest
        .compactions
        .values()
        .flat_map(|c| c.added.iter().map(|f| f.path.as_str()))
        .collect();
    let removed = manifest.removed();
    let to_delete: Vec<&String> = existing
        .iter()
        .filter(|path| {
            let name = path.rsplit('/').next().unwrap_or(path);
            let replaced = removed.contains(path.as_str());
            // Merged files of a sequence number this run claims or an earlier one, which
            // no entry lists: their compactor crashed or was beaten, and can no longer commit.
            let orphan =
                merged_seq(name).is_some_and(|s| s <= seq) && !added.contains(path.as_str());
            replaced || orphan
        })
        .collect();
    if bins.is_empty() && to_delete.is_empty() {
        report.live_files_after = report.live_files_before;
        report.live_bytes_after = report.live_bytes_before;
        return Ok(report);
    }

    let run = format!("{:08x}", rand::random::<u32>());
    let mut entry = CompactionEntry {
        compaction: seq,
        added: vec![],
        removed: vec![],
    };
    for (dir, format, files) in &bins {
        let outputs = merge(location, *format, files).await?;
        for (bytes, rows) in outputs {
            let name = format!(
                "{MERGED_PREFIX}{seq:020}-{run}-{:05}.{}",
                entry.added.len(),
                format.extension()
            );
            let path = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let len = bytes.len() as u64;
            location
                .write_file(&path, bytes, ("compact-merged-tmp", seq))
                .await?;
            entry.added.push(ManifestFile {
                path,
                rows,
                bytes: len,
            });
        }
        entry.removed.extend(files.iter().map(|f| f.path.clone()));
    }
    faults::crash_point("compact-merged", seq);

    let json = serde_json::to_vec_pretty(&entry)
        .map_err(|e| BrookError::serde(format!("{} compaction entry", location.display), e))?;
    let name = format!("{MANIFEST_DIR}/compact-{seq:020}.json");
    if !location.put_if_absent(&name, json.into()).await? {
        for file in &entry.added {
            delete(location, &file.path).await?;
        }
        report.beaten = true;
        return Ok(report);
    }
    faults::crash_point("compact-entry", seq);

    for path in &to_delete {
        delete(location, path).await?;
    }
    let now_removed: BTreeSet<&str> = entry.removed.iter().map(String::as_str).collect();
    let after: Vec<&ManifestFile> = live
        .iter()
        .filter(|f| !now_removed.contains(f.path.as_str()))
        .chain(entry.added.iter())
        .collect();
    report.entry = Some(seq);
    report.live_files_after = after.len();
    report.live_bytes_after = after.iter().map(|f| f.bytes).sum();
    report.merged = entry.removed.len();
    report.merged_into = entry.added.len();
    report.deleted = to_delete.len();
    Ok(report)
}

/// `path`, below `location`, relative to it.
fn relative(location: &Location, path: &object_store::path::Path) -> String {
    path.prefix_match(&location.prefix)
        .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
        .unwrap_or_default()
        .join("/")
}

async fn read(location: &Location, rel: &str) -> Result<Bytes> {
    let got = location.store.get(&location.child_path(rel)).await;
    Ok(got
        .map_err(|e| not_found(location, rel, e))?
        .bytes()
        .await?)
}

fn not_found(location: &Location, rel: &str, e: object_store::Error) -> BrookError {
    match e {
        object_store::Error::NotFound { .. } => BrookError::Sink {
            sink: location.display.clone(),
            message: format!(
                "live file {rel} is missing: the manifest lists it, but it was deleted \
                 by something other than compaction"
            ),
        },
        other => other.into(),
    }
}

async fn delete(location: &Location, rel: &str) -> Result<()> {
    match location.store.delete(&location.child_path(rel)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Merges `files` (of one format, in order) into files of `(bytes, rows)`;
/// a file whose columns or header differ from the previous one's starts a new one.
async fn merge(
    location: &Location,
    format: OutputFormat,
    files: &[&ManifestFile],
) -> Result<Vec<(Vec<u8>, u64)>> {
    let mut outputs = vec![];
    match format {
        OutputFormat::Parquet => {
            let mut current: Option<(SchemaRef, ArrowWriter<Vec<u8>>, u64)> = None;
            for file in files {
                let data = read(location, &file.path).await?;
                let builder = ParquetRecordBatchReaderBuilder::try_new(data)?;
                let schema = builder.schema().clone();
                if current
                    .as_ref()
                    .is_some_and(|(s, _, _)| s.fields() != schema.fields())
                    && let Some((_, writer, rows)) = current.take()
                {
                    outputs.push((writer.into_inner()?, rows));
                }
                let (_, writer, rows) = match &mut current {
                    Some(c) => c,
                    None => {
                        // The first file's key/value metadata (bar the Arrow schema the writer adds).
                        let metadata: Vec<KeyValue> = builder
                            .metadata()
                            .file_metadata()
                            .key_value_metadata()
                            .into_iter()
                            .flatten()
                            .filter(|kv| kv.key != "ARROW:schema")
                            .cloned()
                            .collect();
                        let props = WriterProperties::builder()
                            .set_compression(Compression::ZSTD(ZstdLevel::default()))
                            .set_key_value_metadata((!metadata.is_empty()).then_some(metadata))
                            .build();
                        let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?;
                        current.insert((schema, writer, 0))
                    }
                };
                for batch in builder.build()? {
                    let batch = batch?;
                    *rows += batch.num_rows() as u64;
                    writer.write(&batch)?;
                }
            }
            if let Some((_, writer, rows)) = current {
                outputs.push((writer.into_inner()?, rows));
            }
        }
        OutputFormat::Csv | OutputFormat::Json => {
            let mut current: Option<(Vec<u8>, u64, Option<Vec<u8>>)> = None;
            for file in files {
                let data = read(location, &file.path).await?;
                let (header, body) = match format {
                    OutputFormat::Csv => {
                        let end = data
                            .iter()
                            .position(|b| *b == b'\n')
                            .map_or(data.len(), |i| i + 1);
                        (Some(data[..end].to_vec()), &data[end..])
                    }
                    _ => (None, &data[..]),
                };
                if current.as_ref().is_some_and(|(_, _, h)| *h != header)
                    && let Some((bytes, rows, _)) = current.take()
                {
                    outputs.push((bytes, rows));
                }
                let (bytes, rows, _) =
                    current.get_or_insert_with(|| (header.clone().unwrap_or_default(), 0, header));
                bytes
                    .write_all(body)
                    .map_err(|e| BrookError::io(file.path.as_str(), e))?;
                if !body.is_empty() && !body.ends_with(b"\n") {
                    bytes.push(b'\n');
                }
                *rows += file.rows;
            }
            if let Some((bytes, rows, _)) = current {
                outputs.push((bytes, rows));
            }
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_format_is_told_by_the_extension_the_sink_gives_it() {
        for format in [OutputFormat::Parquet, OutputFormat::Csv, OutputFormat::Json] {
            let name = format!("k=v.1/part-00003-abcdef12.{}", format.extension());
            assert_eq!(OutputFormat::of(&name), Some(format));
        }
        for other in [
            "_latest",
            "k=v.1/notes.txt",
            "part-00003-abcdef12.parquet.tmp",
        ] {
            assert_eq!(OutputFormat::of(other), None, "{other}");
        }
    }
}
