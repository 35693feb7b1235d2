//! brook's SQL behaviour suite: runs every `tests/slt/*.slt` file, in the
//! sqllogictest format DataFusion uses, each file in its own engine and temp
//! directory. `tests/slt/README.md` documents the directives a stream needs on
//! top of plain SQL (`APPEND`, `RUN BATCHES`, `${dir}`, the progress tables).
//!
//! `cargo test --test slt` runs them all; `cargo test --test slt windows` the
//! files whose path contains `windows`. A failing file reports every record
//! that failed, each with its file:line.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use brook::Engine;
use brook::datafusion::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use brook::datafusion::arrow::datatypes::{DataType, Field, Schema};
use brook::datafusion::arrow::util::display::array_value_to_string;
use brook::datafusion::datasource::MemTable;
use sqllogictest::harness::{Arguments, Failed, Trial};
use sqllogictest::{AsyncDB, ColumnType, DBOutput, Record, Runner};

/// How long `RUN BATCHES` waits for one query before calling it hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", root.display());
    let trials = files
        .into_iter()
        .map(|path| {
            let name = path
                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .unwrap_or(&path)
                .display()
                .to_string();
            Trial::test(name, move || run_file(&path))
        })
        .collect();
    sqllogictest::harness::run(&Arguments::from_args(), trials).exit();
}

/// Runs every record of one file, going on after a failure so that one run
/// reports all of them.
fn run_file(path: &Path) -> Result<(), Failed> {
    let records = sqllogictest::parse_file::<Col>(path).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let is_query = Arc::new(AtomicBool::new(false));
        let flag = is_query.clone();
        let mut runner = Runner::new(move || {
            let flag = flag.clone();
            async move { Brook::new(flag) }
        });
        runner.with_column_validator(sqllogictest::strict_column_validator);
        let mut failures = vec![];
        for record in records {
            is_query.store(matches!(record, Record::Query { .. }), Ordering::SeqCst);
            if let Err(e) = runner.run_async(record).await {
                failures.push(e.display(false).to_string());
            }
        }
        runner.shutdown_async().await;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Failed::from(format!(
                "{} failed record(s):\n\n{}",
                failures.len(),
                failures.join("\n")
            )))
        }
    })
}

/// Result column types, as DataFusion's suite spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Col {
    Boolean,
    Date,
    Integer,
    Float,
    Text,
    Timestamp,
    Other,
}

impl ColumnType for Col {
    fn from_char(value: char) -> Option<Self> {
        Some(match value {
            'B' => Self::Boolean,
            'D' => Self::Date,
            'I' => Self::Integer,
            'R' => Self::Float,
            'T' => Self::Text,
            'P' => Self::Timestamp,
            _ => Self::Other,
        })
    }

    fn to_char(&self) -> char {
        match self {
            Self::Boolean => 'B',
            Self::Date => 'D',
            Self::Integer => 'I',
            Self::Float => 'R',
            Self::Text => 'T',
            Self::Timestamp => 'P',
            Self::Other => '?',
        }
    }
}

fn column_type(t: &DataType) -> Col {
    match t {
        DataType::Boolean => Col::Boolean,
        DataType::Date32 | DataType::Date64 => Col::Date,
        t if t.is_integer() => Col::Integer,
        t if t.is_floating()
            || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) =>
        {
            Col::Float
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Col::Text,
        DataType::Timestamp(..) => Col::Timestamp,
        _ => Col::Other,
    }
}

/// A name for a file of its own in a directory (it may start with `.` or `_`,
/// names that sources never read).
fn is_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(parts.next(), Some(std::path::Component::Normal(_))) && parts.next().is_none()
}

/// The bytes an `APPEND ... ESCAPED` body stands for: its own line breaks
/// are dropped, and `\n`, `\r`, `\t`, `\\` and `\xHH` write their byte, so
/// that a file may hold empty lines, CRLF, bytes that are not UTF-8, or end
/// without a newline.
fn unescape(body: &str) -> Result<Vec<u8>, SltError> {
    let mut out = vec![];
    let mut chars = body.lines().flat_map(str::chars);
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(byte) if hex.chars().all(|c| c.is_ascii_hexdigit()) => out.push(byte),
                    _ => {
                        return Err(SltError(format!(
                            "expected two hex digits after \\x, found '{hex}'"
                        )));
                    }
                }
            }
            other => {
                return Err(SltError(format!(
                    "unknown escape '\\{}' in APPEND ... ESCAPED (use \\n, \\r, \\t, \\\\ or \\xHH)",
                    other.map(String::from).unwrap_or_default()
                )));
            }
        }
    }
    Ok(out)
}

/// An error as the .slt file sees it: the engine's message, with the file's
/// temp directory written `${dir}` so that expected messages are stable.
#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

/// One .slt file's database: an engine, the temp directory `${dir}` names,
/// and the files `APPEND` has written.
struct Brook {
    engine: Engine,
    dir: tempfile::TempDir,
    /// Set by the driver when the record being run is a `query`.
    is_query: Arc<AtomicBool>,
    appended: usize,
    /// Queries whose failure a `RUN BATCHES` has already reported.
    reported: HashSet<String>,
    /// Batches each query had run at the last `RUN BATCHES`, by query id.
    batches_seen: HashMap<String, u64>,
}

impl Brook {
    fn new(is_query: Arc<AtomicBool>) -> Result<Self, SltError> {
        Ok(Self {
            engine: Engine::new(),
            dir: tempfile::tempdir().map_err(|e| SltError(format!("temp dir: {e}")))?,
            is_query,
            appended: 0,
            reported: HashSet::new(),
            batches_seen: HashMap::new(),
        })
    }

    fn dir(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Writes the temp directory back as `${dir}`.
    fn hide_dir(&self, text: &str) -> String {
        text.replace(&self.dir(), "${dir}")
    }

    fn error(&self, e: impl std::fmt::Display) -> SltError {
        SltError(self.hide_dir(&e.to_string()))
    }

    /// A directory under `${dir}`, refusing paths that would leave it.
    fn subdir(&self, name: &str) -> Result<PathBuf, SltError> {
        let rel = Path::new(name);
        if name.is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(SltError(format!(
                "'{name}' must be a plain path under ${{dir}}"
            )));
        }
        Ok(self.dir.path().join(rel))
    }

    /// `APPEND <dir> [AS <file>] [ESCAPED]` and the lines after it: one new
    /// file in `${dir}/<dir>`, written whole under a hidden name and renamed in.
    fn append(&mut self, args: &str, lines: &str) -> Result<u64, SltError> {
        let mut words: Vec<&str> = args.split_whitespace().collect();
        let escaped = words
            .last()
            .is_some_and(|w| w.eq_ignore_ascii_case("ESCAPED"));
        if escaped {
            words.pop();
        }
        let (target, name) = match words.as_slice() {
            [target] => {
                self.appended += 1;
                (*target, format!("file-{:04}", self.appended))
            }
            [target, as_, name] if as_.eq_ignore_ascii_case("AS") && is_file_name(name) => {
                (*target, name.to_string())
            }
            _ => {
                return Err(SltError(format!(
                    "expected APPEND <dir> [AS <file name>] [ESCAPED], found 'APPEND {args}'"
                )));
            }
        };
        let dir = self.subdir(target)?;
        std::fs::create_dir_all(&dir).map_err(|e| self.error(e))?;
        let bytes = if escaped {
            unescape(lines)?
        } else {
            let mut text = lines.to_string();
            text.push('\n');
            text.into_bytes()
        };
        brook::source::write_atomically(&dir, &name, &bytes).map_err(|e| self.error(e))?;
        // Lines as a reader numbers them: a last line without a newline counts.
        let breaks = bytes.iter().filter(|b| **b == b'\n').count();
        Ok((breaks + usize::from(!bytes.is_empty() && !bytes.ends_with(b"\n"))) as u64)
    }

    /// `RUN BATCHES`: every query processes all input available now, including
    /// the batches without input that closed windows need; counts the batches
    /// run since the last `RUN BATCHES` (or since the query started).
    async fn run_batches(&mut self) -> Result<u64, SltError> {
        let queries: Vec<_> = self
            .engine
            .queries()
            .into_iter()
            .filter(|q| !self.reported.contains(q.id()))
            .collect();
        // Side by side: an idle query takes a poll interval to confirm it has
        // nothing to read, and a file may have started many.
        let runs = queries.iter().map(|query| async move {
            tokio::time::timeout(RUN_TIMEOUT, query.process_all_available()).await
        });
        let mut batches = 0;
        let mut failures = vec![];
        for (query, ran) in queries.iter().zip(futures::future::join_all(runs).await) {
            // Queries run between directives too: count from the last look.
            let total = query.last_progress().map_or(0, |p| p.batch_id + 1);
            let seen = self.batches_seen.insert(query.id().to_string(), total);
            batches += total - seen.unwrap_or(0);
            match ran {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.reported.insert(query.id().to_string());
                    failures.push(self.hide_dir(&e.to_string()));
                }
                Err(_) => failures.push(format!(
                    "query '{}' did not finish its batches in {RUN_TIMEOUT:?}",
                    query.name()
                )),
            }
        }
        if failures.is_empty() {
            Ok(batches)
        } else {
            Err(SltError(failures.join("\n")))
        }
    }

    /// Registers the progress tables as the queries' progress stands now.
    fn register_progress(&self) -> Result<(), SltError> {
        let (mut progress, mut reasons, mut samples) = (vec![], vec![], vec![]);
        let mut operators = vec![];
        for query in self.engine.queries() {
            let name = query.name().to_string();
            for p in query.recent_progress() {
                let batch = p.batch_id as i64;
                let state = (!p.state_operators.is_empty()).then(|| {
                    p.state_operators
                        .iter()
                        .map(|s| s.num_rows_total as i64)
                        .sum()
                });
                let dropped = p
                    .state_operators
                    .iter()
                    .filter_map(|s| s.num_dropped_duplicate_rows)
                    .reduce(|a, b| a + b)
                    .map(|n| n as i64);
                progress.push(vec![
                    Text(Some(name.clone())),
                    Int(Some(batch)),
                    Int(Some(p.num_input_rows as i64)),
                    Int(Some(p.sink.num_output_rows as i64)),
                    Int(Some(p.num_late_rows as i64)),
                    Int(Some(p.num_malformed_rows as i64)),
                    Text(p.event_time.watermark.clone()),
                    Text(p.event_time.max.clone()),
                    Int(state),
                    Int(dropped),
                    Int(p.num_rows_without_session.map(|n| n as i64)),
                ]);
                for s in &p.state_operators {
                    operators.push(vec![
                        Text(Some(name.clone())),
                        Int(Some(batch)),
                        Text(Some(s.operator.clone())),
                        Int(Some(s.num_rows_total as i64)),
                        Int(Some(s.num_rows_updated as i64)),
                        Int(Some(s.num_rows_removed as i64)),
                        Int(s.num_dropped_duplicate_rows.map(|n| n as i64)),
                    ]);
                }
                for (reason, rows) in &p.malformed_by_reason {
                    reasons.push(vec![
                        Text(Some(name.clone())),
                        Int(Some(batch)),
                        Text(Some(reason.clone())),
                        Int(Some(*rows as i64)),
                    ]);
                }
                for s in &p.malformed_samples {
                    samples.push(vec![
                        Text(Some(name.clone())),
                        Int(Some(batch)),
                        Text(Some(self.hide_dir(&s.file))),
                        Int(Some(s.line as i64)),
                        Text(Some(s.reason.clone())),
                        Text(Some(s.text.clone())),
                    ]);
                }
            }
        }
        let ctx = self.engine.context();
        for (name, columns, rows) in [
            ("brook_progress", PROGRESS_COLUMNS, progress),
            ("brook_malformed", REASON_COLUMNS, reasons),
            ("brook_state", STATE_COLUMNS, operators),
            ("brook_malformed_samples", SAMPLE_COLUMNS, samples),
        ] {
            let table = memory_table(columns, rows).map_err(|e| self.error(e))?;
            ctx.deregister_table(name).map_err(|e| self.error(e))?;
            ctx.register_table(name, Arc::new(table))
                .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    async fn query(&self, sql: &str) -> Result<DBOutput<Col>, SltError> {
        self.register_progress()?;
        let frame = self
            .engine
            .context()
            .sql(sql)
            .await
            .map_err(|e| self.error(e))?;
        let types = frame
            .schema()
            .fields()
            .iter()
            .map(|f| column_type(f.data_type()))
            .collect();
        let batches = frame.collect().await.map_err(|e| self.error(e))?;
        let mut rows = vec![];
        for batch in &batches {
            for r in 0..batch.num_rows() {
                let row = batch
                    .columns()
                    .iter()
                    .map(|c| self.cell(c, r))
                    .collect::<Result<_, _>>()?;
                rows.push(row);
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    /// A value as the .slt file writes it: `NULL`, `(empty)` for an empty
    /// string (which would vanish between the columns), else Arrow's display.
    fn cell(&self, column: &ArrayRef, row: usize) -> Result<String, SltError> {
        if column.is_null(row) {
            return Ok("NULL".into());
        }
        let text = array_value_to_string(column, row).map_err(|e| self.error(e))?;
        Ok(if text.is_empty() {
            "(empty)".into()
        } else {
            self.hide_dir(&text)
        })
    }
}

#[async_trait::async_trait]
impl AsyncDB for Brook {
    type Error = SltError;
    type ColumnType = Col;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Col>, SltError> {
        let sql = sql.replace("${dir}", &self.dir());
        if self.is_query.load(Ordering::SeqCst) {
            return self.query(&sql).await;
        }
        let (first, rest) = sql.split_once('\n').unwrap_or((&sql, ""));
        let words: Vec<&str> = first.split_whitespace().collect();
        let count = match words.as_slice() {
            [append, args @ ..] if append.eq_ignore_ascii_case("APPEND") => {
                self.append(&args.join(" "), rest)?
            }
            [mkdir, name] if mkdir.eq_ignore_ascii_case("MKDIR") => {
                let dir = self.subdir(name)?;
                std::fs::create_dir_all(&dir).map_err(|e| self.error(e))?;
                0
            }
            [run, batches]
                if run.eq_ignore_ascii_case("RUN") && batches.eq_ignore_ascii_case("BATCHES") =>
            {
                self.run_batches().await?
            }
            _ => self
                .engine
                .execute(&sql)
                .await
                .map_err(|e| self.error(e))?
                .len() as u64,
        };
        Ok(DBOutput::StatementComplete(count))
    }

    async fn shutdown(&mut self) {
        let _ = self.engine.stop_all().await;
    }

    fn engine_name(&self) -> &str {
        "brook"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}

/// The progress tables' columns: name, and whether it is text (else BIGINT).
const PROGRESS_COLUMNS: &[(&str, bool)] = &[
    ("query", true),
    ("batch_id", false),
    ("input_rows", false),
    ("output_rows", false),
    ("late_rows", false),
    ("malformed_rows", false),
    ("watermark", true),
    ("max_event_time", true),
    ("state_rows", false),
    ("dropped_duplicates", false),
    ("rows_without_session", false),
];
const STATE_COLUMNS: &[(&str, bool)] = &[
    ("query", true),
    ("batch_id", false),
    ("operator", true),
    ("rows", false),
    ("updated", false),
    ("removed", false),
    ("dropped_duplicates", false),
];
const REASON_COLUMNS: &[(&str, bool)] = &[
    ("query", true),
    ("batch_id", false),
    ("reason", true),
    ("rows", false),
];
const SAMPLE_COLUMNS: &[(&str, bool)] = &[
    ("query", true),
    ("batch_id", false),
    ("file", true),
    ("line", false),
    ("reason", true),
    ("text", true),
];

enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}
use Value::{Int, Text};

fn memory_table(
    columns: &[(&str, bool)],
    rows: Vec<Vec<Value>>,
) -> brook::datafusion::error::Result<MemTable> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, text)| {
            let t = if *text {
                DataType::Utf8
            } else {
                DataType::Int64
            };
            Field::new(*name, t, true)
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let arrays: Vec<ArrayRef> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, text))| -> ArrayRef {
            if *text {
                Arc::new(StringArray::from_iter(rows.iter().map(|r| match &r[i] {
                    Text(t) => t.clone(),
                    Int(_) => None,
                })))
            } else {
                Arc::new(Int64Array::from_iter(rows.iter().map(|r| match &r[i] {
                    Int(v) => *v,
                    Text(_) => None,
                })))
            }
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays)?;
    MemTable::try_new(schema, vec![vec![batch]])
}
