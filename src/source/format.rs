//! Decoding one file's bytes into Arrow rows of the declared schema.
//!
//! CSV is read by arrow's reader, a file (up to 16 MB of it) in one pass.
//! Arrow's reader stops at a bad record without saying which, so a pass it
//! rejects is read again in 64 KB chunks of whole lines, and a chunk it rejects
//! record by record: fields tokenized by the `csv` crate and typed by arrow's
//! cast kernels, so that each bad record can be found, counted and named by its
//! line. A record ends with its line unless `multiLine` is set, so only lines
//! holding a quote are checked for one left open, which is malformed. JSON
//! Lines are checked to hold a valid value each, then read by arrow's reader;
//! Parquet by arrow's reader directly.

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, StringArray, StringBuilder, new_null_array,
};
use datafusion::arrow::compute::kernels::boolean::{and, or};
use datafusion::arrow::compute::{
    CastOptions, cast, cast_with_options, filter_record_batch, is_not_null, is_null,
};
use datafusion::arrow::csv::ReaderBuilder as CsvReaderBuilder;
use datafusion::arrow::csv::reader::Decoder as CsvDecoder;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::json::ReaderBuilder as JsonReaderBuilder;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::malformed::{
    DEFAULT_CORRUPT_COLUMN, MalformedRecord, MalformedStats, ParseMode, excerpt,
};
use super::timestamps::CsvColumns;
use crate::config::partitions;
use crate::error::{BrookError, Result};
use crate::options::Options;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CsvOptions {
    pub has_header: bool,
    pub delimiter: u8,
    pub quote: u8,
    /// Spark's `multiLine`: a quoted field may hold newlines. Otherwise a
    /// record ends with its line, and a line that leaves a quote open is malformed.
    pub multi_line: bool,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            has_header: false,
            delimiter: b',',
            quote: b'"',
            multi_line: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FileFormat {
    Csv(CsvOptions),
    Json,
    Parquet,
    /// One `value` column per line, like Spark's `textFileStream`.
    Text,
}

impl CsvOptions {
    /// Spark's CSV options: `header` (or `has_header`), `sep` (or `delimiter`),
    /// `quote` and `multiLine`.
    pub fn from_options(options: &Options) -> Result<Self> {
        let byte = |key: &str, default: u8| -> Result<u8> {
            match options.get(key) {
                None => Ok(default),
                Some(v) if v.len() == 1 => Ok(v.as_bytes()[0]),
                Some("\\t") => Ok(b'\t'),
                Some(v) => Err(BrookError::option(
                    key,
                    format!("expected one character, found '{v}'"),
                )),
            }
        };
        let has_header = match options.get("has_header") {
            Some(_) => options.bool("has_header", false)?,
            None => options.bool("header", false)?,
        };
        let delimiter = match options.get("sep") {
            Some(_) => byte("sep", b',')?,
            None => byte("delimiter", b',')?,
        };
        Ok(Self {
            has_header,
            delimiter,
            quote: byte("quote", b'"')?,
            multi_line: options.bool("multiLine", false)?,
        })
    }
}

impl FileFormat {
    pub fn name(&self) -> &'static str {
        match self {
            FileFormat::Csv(_) => "CSV",
            FileFormat::Json => "JSON",
            FileFormat::Parquet => "PARQUET",
            FileFormat::Text => "TEXT",
        }
    }

    /// The format of the files of table `table`, stored as `stored_as` (any
    /// case), with its options; `None` if `stored_as` names no file format.
    pub fn from_options(stored_as: &str, options: &Options, table: &str) -> Result<Option<Self>> {
        let format = match stored_as.to_ascii_uppercase().as_str() {
            "CSV" => FileFormat::Csv(CsvOptions::from_options(options)?),
            "JSON" | "NDJSON" => FileFormat::Json,
            "PARQUET" => FileFormat::Parquet,
            "TEXT" | "TXT" => FileFormat::Text,
            _ => return Ok(None),
        };
        // 'false', which scripts ported from Spark often set, is every format's way.
        if options.bool("multiLine", false)? && !matches!(format, FileFormat::Csv(_)) {
            return Err(BrookError::option(
                "multiLine",
                format!("table '{table}': only CSV sources read records across lines"),
            ));
        }
        Ok(Some(format))
    }
}

/// How records become rows: their format, and what happens to those that do not fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeOptions {
    pub format: FileFormat,
    pub mode: ParseMode,
    /// Spark's `columnNameOfCorruptRecord`: the column that receives a bad
    /// record's text, if the schema has it.
    pub corrupt_column: String,
}

impl DecodeOptions {
    /// Records of `format`, with Spark's `mode` and `columnNameOfCorruptRecord`.
    pub fn from_options(format: FileFormat, options: &Options) -> Result<Self> {
        Ok(Self {
            format,
            mode: options.get_or("mode", "PERMISSIVE").parse()?,
            corrupt_column: options
                .get_or("columnNameOfCorruptRecord", DEFAULT_CORRUPT_COLUMN)
                .to_string(),
        })
    }

    /// A decoder of records into rows of `schema`.
    pub fn decoder(&self, schema: SchemaRef) -> Decoder {
        Decoder::new(self.format.clone(), schema, self.mode, &self.corrupt_column)
    }
}

/// How to turn a file into rows: the schema to produce and what to do with bad records.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoder {
    pub format: FileFormat,
    pub schema: SchemaRef,
    pub mode: ParseMode,
    /// A nullable Utf8 column that receives the raw text of malformed records in PERMISSIVE mode.
    pub corrupt_column: Option<usize>,
    dirty: DirtyInput,
    spare: SpareDecoders,
}

/// Whether the last CSV that this decoder (or a clone) tried in one pass had a
/// bad record. Bad records usually keep coming, and a pass with one is parsed
/// twice (whole, then in chunks), so after one the next go to chunks at once.
#[derive(Debug, Clone, Default)]
struct DirtyInput(Arc<AtomicBool>);

impl DirtyInput {
    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, dirty: bool) {
        self.0.store(dirty, Ordering::Relaxed);
    }
}

/// A hint for speed, not part of what a decoder produces.
impl PartialEq for DirtyInput {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Arrow CSV decoders that read their last input whole, kept for the next
/// files: a new decoder builds its state machine and zero-fills buffers for
/// all the rows it is asked for, two words a field, which the kernel faults in
/// page by page; a used one has both, and is as good as new once flushed. One
/// that saw the end of its input, or a bad record, is not kept. Up to four a
/// core are kept, as the queries sharing decodes each read ahead a file a core.
#[derive(Clone)]
struct SpareDecoders {
    decoders: Arc<Mutex<Vec<(usize, CsvDecoder)>>>,
    /// Counted once: the count of cores is read from the cgroup's files.
    most: usize,
}

impl SpareDecoders {
    fn new() -> Self {
        Self {
            decoders: Arc::default(),
            most: 4 * partitions(),
        }
    }

    /// A decoder of `columns` flushing every `rows` rows, for `input`. Only a
    /// new decoder skips a byte-order mark at the start of its input.
    fn take(
        &self,
        options: &CsvOptions,
        columns: &CsvColumns,
        rows: usize,
        input: &[u8],
    ) -> CsvDecoder {
        if !input.starts_with(UTF8_BOM)
            && let Ok(mut spare) = self.decoders.lock()
            && let Some(i) = spare.iter().position(|(r, _)| *r == rows)
        {
            return spare.swap_remove(i).1;
        }
        csv_decoder(options, columns, rows)
    }

    /// Keeps `decoder`, which has just read `input` without error, if it can
    /// read on: `input` ended with a newline, so it has not seen an end.
    fn keep(&self, rows: usize, decoder: CsvDecoder, input: &[u8]) {
        if input.ends_with(b"\n")
            && let Ok(mut spare) = self.decoders.lock()
            && spare.len() < self.most
        {
            spare.push((rows, decoder));
        }
    }
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

impl std::fmt::Debug for SpareDecoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpareDecoders")
    }
}

/// Spare parts, not part of what a decoder produces.
impl PartialEq for SpareDecoders {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The rows of one file, with what was rejected on the way.
pub struct Decoded {
    pub batch: RecordBatch,
    pub malformed: MalformedStats,
}

impl Decoder {
    pub fn new(format: FileFormat, schema: SchemaRef, mode: ParseMode, corrupt_name: &str) -> Self {
        let corrupt_column = schema
            .index_of(corrupt_name)
            .ok()
            .filter(|&i| schema.field(i).data_type() == &DataType::Utf8);
        Self {
            format,
            schema,
            mode,
            corrupt_column,
            dirty: DirtyInput::default(),
            spare: SpareDecoders::new(),
        }
    }

    pub fn decode(&self, file: &str, data: Bytes) -> Result<Decoded> {
        match &self.format {
            FileFormat::Csv(options) => self.decode_csv(options, file, &data),
            FileFormat::Text => self.decode_text(file, &data),
            FileFormat::Json => self.decode_json(file, &data),
            FileFormat::Parquet => self.decode_parquet(file, data),
        }
    }

    /// The declared columns that come from the file (all but the corrupt-record one).
    fn data_columns(&self) -> Vec<usize> {
        (0..self.schema.fields().len())
            .filter(|i| Some(*i) != self.corrupt_column)
            .collect()
    }

    fn decode_csv(&self, options: &CsvOptions, file: &str, data: &[u8]) -> Result<Decoded> {
        // Only with 'multiLine' may a quoted field span lines; then data with a
        // quote cannot be cut at newlines.
        if options.multi_line && memchr::memchr(options.quote, data).is_some() {
            return self.decode_csv_records(options, file, data, 0, false);
        }
        let mut body = data;
        let mut lines_before = 0;
        if options.has_header {
            let header_end = memchr::memchr(b'\n', data).map_or(data.len(), |i| i + 1);
            body = &data[header_end..];
            lines_before = 1;
        }
        let columns = CsvColumns::new(Arc::new(self.schema.project(&self.data_columns())?));
        let mut parts = vec![];
        let mut malformed = MalformedStats::default();
        // A line that leaves a quote open is one bad record, read alone, so that
        // arrow's reader, which would read on to the next quote, never sees it.
        let mut done = 0;
        for (start, end) in open_quote_lines(body, options.quote, options.delimiter) {
            let before = &body[done..start];
            lines_before += self.decode_csv_lines(
                options,
                file,
                &columns,
                before,
                lines_before,
                &mut parts,
                &mut malformed,
            )?;
            let line = &body[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let records = CsvOptions {
                has_header: false,
                ..options.clone()
            };
            let d = self.decode_csv_records(&records, file, line, lines_before, true)?;
            parts.push(d.batch);
            malformed.merge(d.malformed);
            lines_before += 1;
            done = (end + 1).min(body.len());
        }
        let rest = &body[done..];
        self.decode_csv_lines(
            options,
            file,
            &columns,
            rest,
            lines_before,
            &mut parts,
            &mut malformed,
        )?;
        // One batch per file, as DataFusion runs the queries faster over
        // file-sized batches; a file read whole in one pass is not copied.
        let batch = datafusion::arrow::compute::concat_batches(&self.schema, &parts)?;
        Ok(Decoded { batch, malformed })
    }

    /// Parses `body`, whole lines with no record spanning two, in passes of up
    /// to 16 MB, adding batches to `parts`; line numbers start after
    /// `lines_before`. Returns the number of newlines in `body`.
    #[allow(clippy::too_many_arguments)]
    fn decode_csv_lines(
        &self,
        options: &CsvOptions,
        file: &str,
        columns: &CsvColumns,
        body: &[u8],
        mut lines_before: u64,
        parts: &mut Vec<RecordBatch>,
        malformed: &mut MalformedStats,
    ) -> Result<u64> {
        let first = lines_before;
        let mut start = 0;
        while start < body.len() {
            let end = line_end(body, start + CSV_PASS_BYTES);
            let pass = &body[start..end];
            let lines = memchr::memchr_iter(b'\n', pass).count();
            let whole = match self.dirty.get() {
                true => None,
                false => self.arrow_csv_whole(options, columns, pass, lines),
            };
            match whole {
                Some(batch) => parts.push(self.with_corrupt_column(batch)?),
                None => {
                    let (chunks, found) =
                        self.decode_csv_chunks(options, file, columns, pass, lines_before)?;
                    self.dirty.set(found.count > 0);
                    parts.extend(chunks);
                    malformed.merge(found);
                }
            }
            lines_before += lines as u64;
            start = end;
        }
        Ok(lines_before - first)
    }

    /// Parses whole lines in 64 KB chunks, each by arrow's reader, or record by
    /// record if arrow's reader rejects it; line numbers start after `lines_before`.
    fn decode_csv_chunks(
        &self,
        options: &CsvOptions,
        file: &str,
        columns: &CsvColumns,
        body: &[u8],
        mut lines_before: u64,
    ) -> Result<(Vec<RecordBatch>, MalformedStats)> {
        let records = CsvOptions {
            has_header: false,
            ..options.clone()
        };
        let mut parts = vec![];
        let mut malformed = MalformedStats::default();
        let mut start = 0;
        // Building arrow's decoder costs as much as parsing a few hundred lines, so
        // one serves the chunks until a chunk it rejects leaves it unusable.
        let mut decoder = None;
        while start < body.len() {
            let end = line_end(body, start + CSV_CHUNK_BYTES);
            let chunk = &body[start..end];
            let lines = memchr::memchr_iter(b'\n', chunk).count() as u64;
            let arrow = decoder
                .get_or_insert_with(|| self.spare.take(options, columns, CSV_BATCH_ROWS, chunk));
            match arrow_csv_chunk(arrow, columns, chunk) {
                Some(batches) => {
                    for batch in batches {
                        parts.push(self.with_corrupt_column(batch)?);
                    }
                }
                None => {
                    decoder = None;
                    let d = self.decode_csv_records(&records, file, chunk, lines_before, false)?;
                    parts.push(d.batch);
                    malformed.merge(d.malformed);
                }
            }
            lines_before += lines;
            start = end;
        }
        if let Some(decoder) = decoder {
            self.spare.keep(CSV_BATCH_ROWS, decoder, body);
        }
        Ok((parts, malformed))
    }

    /// Parses `pass`, whole lines of which `lines` end in a newline, with arrow's
    /// decoder sized for all of them (up to `CSV_PASS_ROWS`): one flush makes one
    /// batch, with no copy. `None` if any record in it is bad.
    fn arrow_csv_whole(
        &self,
        options: &CsvOptions,
        columns: &CsvColumns,
        pass: &[u8],
        lines: usize,
    ) -> Option<RecordBatch> {
        // Arrow's decoder sets aside room for every row it is asked for, so blank
        // or short lines must not make it ask for more rows than the bytes can
        // hold. Rounded up, so that files of about the same length share spare decoders.
        let fields = columns.read.fields().len().max(1);
        let rows = (lines + 1)
            .min(pass.len() / fields + 1)
            .next_multiple_of(CSV_BATCH_ROWS)
            .min(CSV_PASS_ROWS);
        let mut decoder = self.spare.take(options, columns, rows, pass);
        let batches = arrow_csv_chunk(&mut decoder, columns, pass)?;
        self.spare.keep(rows, decoder, pass);
        datafusion::arrow::compute::concat_batches(columns.file(), &batches).ok()
    }

    /// A batch of the data columns, completed with an empty corrupt-record column.
    fn with_corrupt_column(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut columns = batch.columns().to_vec();
        if let Some(c) = self.corrupt_column {
            columns.insert(c, new_null_array(&DataType::Utf8, batch.num_rows()));
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// Reads CSV record by record, counting and naming each bad one; line numbers
    /// start after `lines_before` lines. `unterminated`: `data` is one line
    /// that leaves a quoted field open, malformed whatever its fields.
    fn decode_csv_records(
        &self,
        options: &CsvOptions,
        file: &str,
        data: &[u8],
        lines_before: u64,
        unterminated: bool,
    ) -> Result<Decoded> {
        let columns = self.data_columns();
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(options.delimiter)
            .quote(options.quote)
            .from_reader(data);
        let mut fields: Vec<StringBuilder> = columns.iter().map(|_| StringBuilder::new()).collect();
        let mut rows = RowSpans::default();
        // Rows found bad while reading, in order; the typing pass reports them
        // with its own in line order, so that FAILFAST names the first.
        let mut flawed = Flaws::default();
        let mut record = csv::ByteRecord::new();
        let mut skip_header = options.has_header;
        loop {
            let start = reader.position().clone();
            match reader.read_byte_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    let at = e.position().unwrap_or(&start);
                    let (line, byte) = record_start(data, at.line(), start.byte() as usize);
                    let end = reader.position().byte() as usize;
                    let why = format!("unreadable CSV record: {e}");
                    flawed.push(rows.len(), why, "unreadable CSV record");
                    fields.iter_mut().for_each(StringBuilder::append_null);
                    rows.push((lines_before + line, byte, end));
                    continue;
                }
            }
            let pos = record.position().cloned().unwrap_or(start);
            if skip_header {
                skip_header = false;
                continue;
            }
            let end = reader.position().byte() as usize;
            let (line, byte) = record_start(data, pos.line(), pos.byte() as usize);
            let n = record.len();
            if unterminated {
                let why = "unterminated quoted field (a record ends with its line unless \
                           'multiLine' is 'true')";
                flawed.push(rows.len(), why.to_string(), "unterminated quoted field");
            } else if n != columns.len() {
                let why = format!("expected {} fields, found {n}", columns.len());
                flawed.push(rows.len(), why, "wrong number of fields");
            }
            for (i, builder) in fields.iter_mut().enumerate() {
                match record.get(i).map(std::str::from_utf8) {
                    None | Some(Ok("")) => builder.append_null(),
                    Some(Ok(s)) => builder.append_value(s),
                    Some(Err(_)) => {
                        builder.append_null();
                        let name = self.schema.field(columns[i]).name();
                        let why = format!("invalid UTF-8 in column '{name}'");
                        flawed.push(rows.len(), why, "invalid UTF-8");
                    }
                }
            }
            rows.push((lines_before + line, byte, end));
        }
        let raw: Vec<ArrayRef> = fields
            .into_iter()
            .map(|mut b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        self.type_columns(file, data, &columns, raw, &rows, flawed)
    }

    /// Casts raw columns to the declared types and sorts out the rows that fail
    /// or were found bad before (`flawed`), counting each once, in line order.
    fn type_columns(
        &self,
        file: &str,
        data: &[u8],
        columns: &[usize],
        raw: Vec<ArrayRef>,
        rows: &RowSpans,
        flawed: Flaws,
    ) -> Result<Decoded> {
        let n = rows.len();
        let safe = CastOptions {
            safe: true,
            ..Default::default()
        };
        let mut typed: Vec<ArrayRef> = Vec::with_capacity(columns.len());
        // Rows with a value that did not parse (nulled under PERMISSIVE) and rows that must go.
        let mut bad_value = rows_mask(n, flawed.rows());
        let mut must_drop = BooleanArray::from(vec![false; n]);
        let mut reasons: Vec<(BooleanArray, String, &'static str)> = Vec::new();
        for (raw, &col) in raw.iter().zip(columns) {
            let field = self.schema.field(col);
            let out = cast_with_options(raw, field.data_type(), &safe)?;
            let unparsed = and(&is_not_null(raw)?, &is_null(&out)?)?;
            if unparsed.true_count() > 0 {
                bad_value = or(&bad_value, &unparsed)?;
                let why = format!(
                    "cannot parse column '{}' as {}",
                    field.name(),
                    field.data_type()
                );
                reasons.push((unparsed, why, "unparseable value"));
            }
            if !field.is_nullable() {
                let missing = is_null(&out)?;
                if missing.true_count() > 0 {
                    must_drop = or(&must_drop, &missing)?;
                    let why = format!("null in NOT NULL column '{}'", field.name());
                    reasons.push((missing, why, "null in NOT NULL column"));
                }
            }
            typed.push(out);
        }
        let rejected = or(&bad_value, &must_drop)?;
        let mut malformed = MalformedStats::default();
        if rejected.true_count() > 0 {
            // Each row is counted once, under the first reason found for it.
            let mut flaws = flawed.0.into_iter().peekable();
            let bad_rows = rejected
                .iter()
                .enumerate()
                .filter_map(|(i, b)| b.unwrap_or(false).then_some(i));
            for row in bad_rows {
                let (why, category) = match flaws.next_if(|(r, _, _)| *r == row) {
                    Some((_, why, category)) => (why, category),
                    None => match reasons.iter().find(|(mask, _, _)| mask.value(row)) {
                        Some((_, why, category)) => (why.clone(), *category),
                        None => continue,
                    },
                };
                let (line, start, end) = rows.get(row);
                let bad = MalformedRecord {
                    file: file.to_string(),
                    line,
                    reason: why,
                    text: excerpt(slice(data, start, end)),
                };
                self.reject(bad, category, &mut malformed)?;
            }
        }
        let drop = match self.mode {
            ParseMode::Permissive => must_drop,
            _ => rejected,
        };
        let mut batch = self.assemble(columns, typed, data, rows, &bad_value)?;
        if drop.true_count() > 0 {
            batch = filter_record_batch(&batch, &datafusion::arrow::compute::not(&drop)?)?;
        }
        // Only now, with the rejected rows gone, must NOT NULL columns be free of nulls.
        let batch = RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())?;
        Ok(Decoded { batch, malformed })
    }

    /// Puts typed columns in schema order, filling the corrupt-record column for
    /// flagged rows; every column is nullable until rejected rows are removed.
    fn assemble(
        &self,
        columns: &[usize],
        typed: Vec<ArrayRef>,
        data: &[u8],
        rows: &RowSpans,
        flagged: &BooleanArray,
    ) -> Result<RecordBatch> {
        let mut out: Vec<Option<ArrayRef>> = vec![None; self.schema.fields().len()];
        for (array, &col) in typed.into_iter().zip(columns) {
            out[col] = Some(array);
        }
        if let Some(c) = self.corrupt_column {
            let text: StringArray = (0..rows.len())
                .map(|r| {
                    flagged.value(r).then(|| {
                        let (_, start, end) = rows.get(r);
                        excerpt(slice(data, start, end))
                    })
                })
                .collect();
            out[c] = Some(Arc::new(text));
        }
        let columns = out
            .into_iter()
            .map(|c| c.unwrap_or_else(|| new_null_array(&DataType::Utf8, rows.len())))
            .collect();
        let nullable: Vec<_> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(nullable)),
            columns,
        )?)
    }

    /// Counts a bad record, or stops the query with it under FAILFAST.
    fn reject(
        &self,
        bad: MalformedRecord,
        category: &str,
        stats: &mut MalformedStats,
    ) -> Result<()> {
        if self.mode == ParseMode::FailFast {
            return Err(BrookError::Malformed {
                file: bad.file,
                line: bad.line,
                reason: format!("{}: {}", bad.reason, bad.text),
            });
        }
        stats.record(bad, category);
        Ok(())
    }

    fn decode_text(&self, file: &str, data: &[u8]) -> Result<Decoded> {
        let Ok(text) = std::str::from_utf8(data) else {
            return self.decode_text_lines(file, data);
        };
        let mut lines: Vec<&str> = text.split('\n').map(|l| l.trim_end_matches('\r')).collect();
        if lines.last() == Some(&"") {
            lines.pop();
        }
        let values: ArrayRef = Arc::new(StringArray::from(lines));
        Ok(Decoded {
            batch: RecordBatch::try_new(self.schema.clone(), vec![values])?,
            malformed: MalformedStats::default(),
        })
    }

    /// Reads text with some lines not UTF-8 line by line: those are malformed.
    fn decode_text_lines(&self, file: &str, data: &[u8]) -> Result<Decoded> {
        let mut values = StringBuilder::new();
        let mut rows = RowSpans::default();
        let mut flawed = Flaws::default();
        for (line, start, end) in line_spans(data) {
            let text = &data[start..end];
            match std::str::from_utf8(text.strip_suffix(b"\r").unwrap_or(text)) {
                Ok(s) => values.append_value(s),
                Err(e) => {
                    values.append_null();
                    flawed.push(rows.len(), format!("invalid UTF-8: {e}"), "invalid UTF-8");
                }
            }
            rows.push((line, start, end));
        }
        let raw: ArrayRef = Arc::new(values.finish());
        self.type_columns(file, data, &self.data_columns(), vec![raw], &rows, flawed)
    }

    /// Reads JSON Lines, one object a line, as Spark does without 'multiLine'.
    fn decode_json(&self, file: &str, data: &[u8]) -> Result<Decoded> {
        let columns = self.data_columns();
        // Arrow's reader cuts 1.5 to 1 in an integer column, so integers are
        // read as text and typed as CSV's are. Every column is read nullable,
        // so that a missing value is named with its line.
        let fields: Vec<Field> = columns
            .iter()
            .map(|&c| {
                let field = self.schema.field(c);
                let read_as = match field.data_type().is_integer() {
                    true => DataType::Utf8,
                    false => field.data_type().clone(),
                };
                Field::new(field.name(), read_as, true)
            })
            .collect();
        let read_schema = Arc::new(Schema::new(fields));
        let read = |bytes: &[u8]| -> Result<RecordBatch> {
            let reader = JsonReaderBuilder::new(read_schema.clone())
                .with_coerce_primitive(true)
                .build(Cursor::new(bytes))?;
            let batches = reader.collect::<Result<Vec<_>, _>>()?;
            Ok(datafusion::arrow::compute::concat_batches(
                &read_schema,
                &batches,
            )?)
        };
        // Arrow's reader takes commas for whitespace and objects across lines,
        // so each line is first checked to be one JSON value.
        let whole = one_value_per_line(data).and_then(|rows| {
            let batch = read(data).ok()?;
            (batch.num_rows() == rows.len()).then_some((batch, rows, Flaws::default()))
        });
        let (batch, rows, flawed) = match whole {
            Some(whole) => whole,
            None => {
                let mut parts = vec![];
                let mut rows = RowSpans::default();
                let mut flawed = Flaws::default();
                for (line, start, end) in line_spans(data) {
                    let text = &data[start..end];
                    if text.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let record = match std::str::from_utf8(text) {
                        Err(e) => Err((format!("invalid UTF-8: {e}"), "invalid UTF-8")),
                        Ok(_) => json_record(text, read),
                    };
                    match record {
                        Ok(batch) => parts.push(batch),
                        Err((why, category)) => {
                            flawed.push(rows.len(), why, category);
                            let nulls = read_schema
                                .fields()
                                .iter()
                                .map(|f| new_null_array(f.data_type(), 1))
                                .collect();
                            parts.push(RecordBatch::try_new(read_schema.clone(), nulls)?);
                        }
                    }
                    rows.push((line, start, end));
                }
                let batch = datafusion::arrow::compute::concat_batches(&read_schema, &parts)?;
                (batch, rows, flawed)
            }
        };
        let raw = batch.columns().to_vec();
        self.type_columns(file, data, &columns, raw, &rows, flawed)
    }

    fn decode_parquet(&self, file: &str, data: Bytes) -> Result<Decoded> {
        let wrong = |message: String| BrookError::Source {
            location: file.to_string(),
            message,
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(data)?;
        let file_schema = builder.schema().clone();
        let mut parts = Vec::new();
        for batch in builder.build()? {
            parts.push(self.conform(&batch?, &file_schema).map_err(wrong)?);
        }
        let batch = datafusion::arrow::compute::concat_batches(&self.schema, &parts)?;
        Ok(Decoded {
            batch,
            malformed: MalformedStats::default(),
        })
    }

    /// Picks the declared columns out of a file's batch by name, casting where types differ.
    fn conform(&self, batch: &RecordBatch, file_schema: &Schema) -> Result<RecordBatch, String> {
        let mut columns = Vec::with_capacity(self.schema.fields().len());
        for field in self.schema.fields() {
            let Ok(i) = file_schema.index_of(field.name()) else {
                if field.is_nullable() {
                    columns.push(new_null_array(field.data_type(), batch.num_rows()));
                    continue;
                }
                return Err(format!(
                    "file has no column '{}' (declared NOT NULL); its columns are: {}",
                    field.name(),
                    file_schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            let column = batch.column(i);
            if column.data_type() == field.data_type() {
                columns.push(column.clone());
            } else {
                columns.push(cast(column, field.data_type()).map_err(|e| {
                    format!(
                        "column '{}' is {} in the file but declared {}: {e}",
                        field.name(),
                        column.data_type(),
                        field.data_type()
                    )
                })?);
            }
        }
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| e.to_string())
    }
}

/// Bytes of CSV given to arrow's reader at once (cut at the next newline).
const CSV_CHUNK_BYTES: usize = 64 << 10;

/// Bytes of CSV first tried by arrow's reader in one go (cut at the next newline).
const CSV_PASS_BYTES: usize = 16 << 20;

/// The end of the line that `at` falls in (`body`'s end if that line has no newline).
fn line_end(body: &[u8], at: usize) -> usize {
    let cut = at.min(body.len());
    memchr::memchr(b'\n', &body[cut..]).map_or(body.len(), |i| cut + i + 1)
}

/// The byte ranges (without the newline) of the lines of `body` that, read
/// alone, end inside a quoted field. Only lines holding a quote are looked
/// at, and memchr finds those.
fn open_quote_lines(body: &[u8], quote: u8, delimiter: u8) -> Vec<(usize, usize)> {
    let mut open = vec![];
    let mut at = 0;
    while let Some(i) = memchr::memchr(quote, &body[at..]) {
        let q = at + i;
        let start = memchr::memrchr(b'\n', &body[at..q]).map_or(at, |n| at + n + 1);
        let end = memchr::memchr(b'\n', &body[q..]).map_or(body.len(), |n| q + n);
        if ends_quoted(&body[start..end], quote, delimiter) {
            open.push((start, end));
        }
        at = (end + 1).min(body.len());
    }
    open
}

/// Whether CSV `line` ends inside a quoted field, read as csv_core reads it:
/// a quote opens a field only at its start, and a doubled quote within one is
/// a quote character.
fn ends_quoted(line: &[u8], quote: u8, delimiter: u8) -> bool {
    let mut quoted = false;
    let mut field_start = true;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if quoted {
            if b == quote {
                match line.get(i + 1) == Some(&quote) {
                    true => i += 1,
                    false => quoted = false,
                }
            }
        } else if b == delimiter {
            field_start = true;
            i += 1;
            continue;
        } else if b == quote && field_start {
            quoted = true;
        }
        field_start = false;
        i += 1;
    }
    quoted
}

/// Arrow's CSV decoder for headerless records of `columns`, flushing every `rows` rows.
fn csv_decoder(options: &CsvOptions, columns: &CsvColumns, rows: usize) -> CsvDecoder {
    CsvReaderBuilder::new(columns.read.clone())
        .with_header(false)
        .with_delimiter(options.delimiter)
        .with_quote(options.quote)
        .with_batch_size(rows.max(1))
        .build_decoder()
}

/// Most rows arrow's decoder takes between flushes in a whole pass.
const CSV_PASS_ROWS: usize = 1 << 16;

/// Rows arrow's decoder parses between flushes in 64 KB chunks; it sizes its buffers for them.
const CSV_BATCH_ROWS: usize = 4096;

/// Parses a chunk of whole CSV lines with arrow's decoder, or `None` if any
/// record in it is bad (wrong field count, unparseable value, null in a NOT
/// NULL column, invalid UTF-8).
fn arrow_csv_chunk(
    decoder: &mut CsvDecoder,
    columns: &CsvColumns,
    chunk: &[u8],
) -> Option<Vec<RecordBatch>> {
    let mut batches = vec![];
    let mut rest = chunk;
    while !rest.is_empty() {
        let read = decoder.decode(rest).ok()?;
        rest = &rest[read..];
        if decoder.capacity() == 0 {
            if let Some(batch) = decoder.flush().ok()? {
                batches.push(columns.typed(batch)?);
            }
        } else if read == 0 {
            return None;
        }
    }
    // Only a file's last line can lack its newline; an empty call ends that
    // record. Chunks before it end at a newline, so the decoder, reused for the
    // next chunk, never sees the end of its input.
    if !chunk.ends_with(b"\n") {
        decoder.decode(&[]).ok()?;
    }
    if let Some(batch) = decoder.flush().ok()? {
        batches.push(columns.typed(batch)?);
    }
    Some(batches)
}

/// Where each kept row came from: line number and byte range in the file.
#[derive(Default)]
struct RowSpans {
    spans: Vec<(u64, usize, usize)>,
}

impl RowSpans {
    fn push(&mut self, span: (u64, usize, usize)) {
        self.spans.push(span);
    }
    fn len(&self) -> usize {
        self.spans.len()
    }
    fn get(&self, row: usize) -> (u64, usize, usize) {
        self.spans[row]
    }
}

/// Rows found bad while reading, before typing: (row, reason, category), at
/// most one a row, in row order.
#[derive(Default)]
struct Flaws(Vec<(usize, String, &'static str)>);

impl Flaws {
    /// Notes `row`'s first flaw; later ones of the same row are not reported.
    fn push(&mut self, row: usize, why: String, category: &'static str) {
        if self.0.last().is_none_or(|(r, _, _)| *r != row) {
            self.0.push((row, why, category));
        }
    }

    fn rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().map(|(r, _, _)| *r)
    }
}

/// Each line of `data`: its number and byte range, without the newline (none
/// after a final newline).
fn line_spans(data: &[u8]) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
    let mut start = 0;
    data.split(|b| *b == b'\n')
        .enumerate()
        .map_while(move |(i, text)| {
            let span = (i as u64 + 1, start, start + text.len());
            start += text.len() + 1;
            (span.1 < data.len()).then_some(span)
        })
}

/// Where each JSON value of `data` is, if each non-blank line holds one
/// whole, valid value; `None` if any does not.
fn one_value_per_line(data: &[u8]) -> Option<RowSpans> {
    let mut values = serde_json::Deserializer::from_slice(data).into_iter::<IgnoredAny>();
    let mut rows = RowSpans::default();
    let (mut line, mut at) = (1, 0);
    while let Some(value) = values.next() {
        value.ok()?;
        let end = values.byte_offset();
        let start = at
            + data[at..end]
                .iter()
                .position(|b| !b.is_ascii_whitespace())?;
        let newlines = memchr::memchr_iter(b'\n', &data[at..start]).count() as u64;
        let shares_a_line = newlines == 0 && at > 0;
        if shares_a_line || memchr::memchr(b'\n', &data[start..end]).is_some() {
            return None;
        }
        line += newlines;
        rows.push((line, start, end));
        at = end;
    }
    Some(rows)
}

/// One JSON line read by `read` into one row, or why it is malformed.
fn json_record(
    text: &[u8],
    read: impl Fn(&[u8]) -> Result<RecordBatch>,
) -> std::result::Result<RecordBatch, (String, &'static str)> {
    let invalid = |e: String| (format!("invalid JSON record: {e}"), "invalid JSON record");
    serde_json::from_slice::<IgnoredAny>(text).map_err(|e| invalid(e.to_string()))?;
    let batch = read(text).map_err(|e| invalid(e.to_string()))?;
    match batch.num_rows() {
        1 => Ok(batch),
        _ => Err(invalid("not one JSON object".to_string())),
    }
}

/// Where a record really starts: after a CRLF line the csv reader stops at the
/// CR, and the next record's position is the LF, still on the line before.
fn record_start(data: &[u8], line: u64, byte: usize) -> (u64, usize) {
    if data.get(byte) == Some(&b'\n') {
        (line + 1, byte + 1)
    } else {
        (line, byte)
    }
}

fn slice(data: &[u8], start: usize, end: usize) -> &[u8] {
    let end = end.min(data.len());
    &data[start.min(end)..end]
}

fn rows_mask(n: usize, rows: impl Iterator<Item = usize>) -> BooleanArray {
    let mut mask = vec![false; n];
    for r in rows {
        mask[r] = true;
    }
    BooleanArray::from(mask)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Field, Int64Type};

    /// A CSV decoder of one NOT NULL BIGINT column that drops bad lines.
    pub(crate) fn numbers_decoder() -> Decoder {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        Decoder::new(
            FileFormat::Csv(CsvOptions::default()),
            schema,
            ParseMode::DropMalformed,
            "_corrupt_record",
        )
    }

    /// One decoder reads a clean file whole, a file with a bad line in chunks
    /// (naming the line), and then a clean file whole again.
    #[test]
    fn clean_and_dirty_files_in_turn_keep_every_good_row() {
        let decoder = numbers_decoder();
        let numbers = |d: &Decoded| -> Vec<i64> {
            let column = d.batch.column(0).as_primitive::<Int64Type>();
            column.values().to_vec()
        };
        let clean = decoder.decode("a.csv", Bytes::from("1\n2\n3")).unwrap();
        assert_eq!((numbers(&clean), clean.malformed.count), (vec![1, 2, 3], 0));
        let dirty = decoder.decode("b.csv", Bytes::from("4\nx\n6\n")).unwrap();
        assert_eq!((numbers(&dirty), dirty.malformed.count), (vec![4, 6], 1));
        assert_eq!(dirty.malformed.samples[0].line, 2);
        assert!(decoder.dirty.get());
        let clean = decoder.decode("c.csv", Bytes::from("7\n8\n")).unwrap();
        assert_eq!((numbers(&clean), clean.malformed.count), (vec![7, 8], 0));
        assert!(!decoder.dirty.get());
        let again = decoder.decode("d.csv", Bytes::from("9\n10\n")).unwrap();
        assert_eq!(numbers(&again), vec![9, 10]);
    }

    /// Spare decoders read the next files as new ones would: a file that starts
    /// with a byte-order mark gets a new decoder, which skips it, and a decoder
    /// that saw the end of a file without a final newline is not kept.
    #[test]
    fn spare_decoders_read_the_next_files_as_new_ones() {
        let decoder = numbers_decoder();
        let spare = || decoder.spare.decoders.lock().unwrap().len();
        let read = |name: &str, text: &'static str| {
            let d = decoder.decode(name, Bytes::from(text)).unwrap();
            let column = d.batch.column(0).as_primitive::<Int64Type>();
            (column.values().to_vec(), d.malformed.count)
        };
        assert_eq!(read("a.csv", "1\n2\n"), (vec![1, 2], 0));
        assert_eq!(spare(), 1);
        assert_eq!(read("b.csv", "\u{FEFF}3\n4\n"), (vec![3, 4], 0));
        assert!(!decoder.dirty.get());
        assert_eq!(spare(), 2);
        assert_eq!(read("c.csv", "5\n6"), (vec![5, 6], 0));
        assert_eq!(spare(), 1);
        assert_eq!(read("d.csv", "7\n8\n"), (vec![7, 8], 0));
        assert_eq!(spare(), 1);
    }

    /// A line that leaves a quote open is one bad record however little it
    /// holds; a quote inside a field, or doubled in a quoted one, opens nothing.
    #[test]
    fn each_line_leaving_a_quote_open_is_one_bad_record() {
        let decoder = numbers_decoder();
        let data = "1\n\"\n2\n\"3\n4\"5\n\"6\"\"\"\n\"7\"\"\n8";
        let decoded = decoder.decode("q.csv", Bytes::from(data)).unwrap();
        let column = decoded.batch.column(0).as_primitive::<Int64Type>();
        assert_eq!(column.values().to_vec(), vec![1, 2, 8]);
        let lines: Vec<u64> = decoded.malformed.samples.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![2, 4, 5, 6, 7]);
        let reasons = &decoded.malformed.by_reason;
        assert_eq!(reasons.get("unterminated quoted field"), Some(&3));
    }

    /// Short lines put more rows in a 64 KB chunk than arrow's decoder takes
    /// between flushes; a bad line makes its chunk be read record by record.
    #[test]
    fn chunks_of_many_short_lines_keep_every_row_in_order() {
        let decoder = numbers_decoder();
        let lines: Vec<String> = (0..60_000)
            .map(|i| {
                if i == 30_000 {
                    "x".to_string()
                } else {
                    i.to_string()
                }
            })
            .collect();
        let data = Bytes::from(lines.join("\n") + "\n");
        assert!(data.len() > 4 * CSV_CHUNK_BYTES);
        let decoded = decoder.decode("short.csv", data).unwrap();
        assert_eq!(decoded.malformed.count, 1);
        let got: Vec<i64> = decoded
            .batch
            .column(0)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        let want: Vec<i64> = (0..60_000).filter(|i| *i != 30_000).collect();
        assert_eq!(got, want);
    }
}
