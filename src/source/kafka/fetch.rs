//! Reading a batch's offset ranges from the broker, a part at a time.
//!
//! All the batch's partitions are fetched at once (librdkafka fetches them in
//! parallel, ahead of the reader), and every 65,536 records (or 8 MB) of a
//! partition become rows, so that the query works on the first rows while the
//! broker sends the rest.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use bytes::Bytes;
use datafusion::arrow::array::{
    ArrayRef, BinaryArray, BinaryBuilder, BooleanArray, Int32Array, Int32Builder, Int64Array,
    Int64Builder, ListBuilder, RecordBatch, StringArray, StringBuilder, StructBuilder,
    TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, SchemaRef};
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::options::{Column, Metadata, split_columns};
use super::queue::{self, Queue};
use super::{Range, Ranges, headers_type};
use crate::error::{BrookError, Result};
use crate::source::SourceBatch;
use crate::source::format::{Decoder, FileFormat};
use crate::source::malformed::{MalformedRecord, MalformedStats, ParseMode};

/// Records of a partition turned into rows together: enough to keep the
/// query's per-batch overhead small, few enough to start it early, and
/// bounded in bytes for large values.
const PART_RECORDS: usize = 1 << 16;
const PART_BYTES: usize = 8 << 20;

/// Parts polled but not yet turned into rows: polling stops for the slower rows.
const CHUNKS_AHEAD: usize = 4;

/// How records become rows: parsed from their values (beside metadata
/// columns, if the table has some), or Spark's raw Kafka columns.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Rows {
    Decoded(Arc<Decoder>, Option<Arc<Layout>>),
    Raw(SchemaRef),
}

/// The columns of a parsed table with metadata columns: its schema, and
/// where each column comes from.
#[derive(Debug, PartialEq)]
pub(super) struct Layout {
    schema: SchemaRef,
    columns: Vec<Column>,
}

impl Rows {
    /// Rows of `decoder`'s columns: the metadata columns among them are
    /// filled from the records, the others parsed from their values.
    pub(super) fn decoded(decoder: Decoder, include_headers: bool) -> Result<Self> {
        let corrupt = decoder
            .corrupt_column
            .map(|i| decoder.schema.field(i).name().clone())
            .unwrap_or_default();
        let (values, columns) =
            split_columns(&decoder.schema, include_headers, &corrupt, "Kafka source")?;
        if columns.iter().all(|c| matches!(c, Column::Value(_))) {
            return Ok(Rows::Decoded(Arc::new(decoder), None));
        }
        let layout = Layout {
            schema: decoder.schema.clone(),
            columns,
        };
        let values = Decoder::new(decoder.format.clone(), values, decoder.mode, &corrupt);
        Ok(Rows::Decoded(Arc::new(values), Some(Arc::new(layout))))
    }

    pub(super) fn schema(&self) -> SchemaRef {
        match self {
            Rows::Decoded(_, Some(layout)) => layout.schema.clone(),
            Rows::Decoded(decoder, None) => decoder.schema.clone(),
            Rows::Raw(schema) => schema.clone(),
        }
    }
}

/// How messages name a partition.
fn partition_name(topic: &str, partition: i32) -> String {
    format!("{topic}-{partition}")
}

/// What a read may take: how long it waits for records the broker reported,
/// and whether missing offsets are an error or counted.
#[derive(Debug, Clone, Copy)]
pub(super) struct Patience {
    pub(super) timeout: Duration,
    pub(super) fail_on_data_loss: bool,
}

/// Reads `ranges` with `consumer`, handing each part to `emit`, for as long
/// as someone is `wanted` (a read given up is an error). Records are turned
/// into rows on a thread of their own, while the next ones are polled.
pub(super) fn fetch(
    consumer: &BaseConsumer,
    ranges: &Ranges,
    rows: &Rows,
    patience: Patience,
    wanted: &(dyn Fn() -> bool + Sync),
    mut emit: impl FnMut(SourceBatch) + Send,
) -> Result<()> {
    let mut parts: Vec<Partition> = ranges
        .iter()
        .flat_map(|(topic, ps)| {
            ps.iter()
                .filter(|(_, r)| r.until > r.from)
                .map(|(p, r)| Partition::new(topic, *p, *r, rows))
        })
        .collect();
    if parts.is_empty() {
        return Ok(());
    }
    let mut by_id: HashMap<i32, Vec<usize>> = HashMap::new();
    let mut queue = Queue::new(consumer);
    for (i, part) in parts.iter().enumerate() {
        by_id.entry(part.partition).or_default().push(i);
        queue
            .start(&part.topic, part.partition, part.expected)
            .map_err(|e| part.error(e))?;
    }
    let stopped = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (chunks, taken) = std::sync::mpsc::sync_channel::<Chunk>(CHUNKS_AHEAD);
        let stopped = &stopped;
        let rows = scope.spawn(move || {
            let made = taken.into_iter().try_for_each(|chunk| {
                emit(chunk.rows()?);
                Ok(())
            });
            stopped.store(true, Ordering::Relaxed);
            made
        });
        let go_on = || wanted() && !stopped.load(Ordering::Relaxed);
        let polled = read_all(
            consumer, &mut queue, &mut parts, &by_id, patience, &chunks, &go_on,
        );
        drop(chunks);
        match (rows.join(), polled) {
            (Err(panic), _) => std::panic::resume_unwind(panic),
            // A bad record under FAILFAST, say: the cause, whatever the polling met after.
            (Ok(Err(e)), _) | (Ok(Ok(())), Err(e)) => Err(e),
            (Ok(Ok(())), Ok(true)) => Ok(()),
            // Only a read that has every record ends well.
            (Ok(Ok(())), Ok(false)) => Err(BrookError::Cancelled(
                "the Kafka read was given up: no query wants it any more".into(),
            )),
        }
    })
}

/// Polls until every partition reached the end of its range (true), or until
/// the read is not wanted or its rows failed (false).
fn read_all(
    consumer: &BaseConsumer,
    queue: &mut Queue<'_>,
    parts: &mut [Partition],
    by_id: &HashMap<i32, Vec<usize>>,
    patience: Patience,
    chunks: &SyncSender<Chunk>,
    go_on: &dyn Fn() -> bool,
) -> Result<bool> {
    let mut left = parts.len();
    // Whether a record came since the last quiet poll: cheaper than reading
    // the clock for every record.
    let mut heard = false;
    let mut quiet_since = Instant::now();
    while left > 0 {
        let taken = queue.take(Duration::from_millis(200));
        let mut records = false;
        let mut finished = Vec::new();
        for message in taken.iter() {
            let Some(i) = by_id
                .get(&message.partition())
                .and_then(|ids| match ids.as_slice() {
                    [i] => Some(*i),
                    _ => ids
                        .iter()
                        .copied()
                        .find(|&i| parts[i].topic.as_bytes() == message.topic()),
                })
            else {
                continue;
            };
            let part = &mut parts[i];
            if let Some(e) = message.error() {
                // The partition's fetch or its records failed (librdkafka tries
                // again): reported if the read times out, and its offset must
                // not pass for read (librdkafka moves the position past it).
                tracing::warn!("Kafka read of {} failed (retrying): {e}", part.name());
                part.failed = Some((message.offset(), e));
                continue;
            }
            if part.done || message.offset() < part.expected {
                continue;
            }
            records = true;
            part.failed = None;
            part.count_gap(message.offset(), patience.fail_on_data_loss)?;
            if message.offset() < part.until {
                part.pending.push(&message);
                part.expected = message.offset() + 1;
            }
            let chunk = if part.expected >= part.until || message.offset() >= part.until {
                left -= 1;
                finished.push(i);
                part.finish()
            } else if part.pending.len() >= PART_RECORDS || part.pending.bytes() >= PART_BYTES {
                part.take()
            } else {
                continue;
            };
            // Nobody wants the rest, or the rows failed (the error is theirs to report).
            if chunks.send(chunk).is_err() || !go_on() {
                return Ok(false);
            }
        }
        // `taken` borrows the queue: partitions it finished stop once it is released.
        drop(taken);
        for i in finished {
            queue.stop(&parts[i].topic, parts[i].partition);
        }
        client_events(consumer, queue);
        if records {
            heard = true;
            continue;
        }
        if !go_on() {
            return Ok(false);
        }
        for part in parts.iter_mut().filter(|p| !p.done) {
            // Offsets no record is delivered for (transaction markers; aborted
            // records when reading committed) move the client's position only;
            // but offsets deleted since the batch was planned are data loss.
            let position = queue.position(&part.topic, part.partition);
            let past_failure = part.failed.as_ref().is_none_or(|(at, _)| position > at + 1);
            if position >= part.until && past_failure {
                let (low, _) = consumer
                    .fetch_watermarks(&part.topic, part.partition, patience.timeout)
                    .map_err(|e| part.error(e.to_string()))?;
                part.count_gap(low, patience.fail_on_data_loss)?;
                left -= 1;
                queue.stop(&part.topic, part.partition);
                if chunks.send(part.finish()).is_err() {
                    return Ok(false);
                }
            }
        }
        if std::mem::take(&mut heard) {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > patience.timeout
            && let Some(part) = parts.iter().find(|p| !p.done)
        {
            let why = match &part.failed {
                Some((at, e)) => format!("; the last error, at offset {at}: {e}"),
                None => "; is the broker down?".into(),
            };
            return Err(part.error(format!(
                "no records for {:?} while reading offsets {}..{} (the broker \
                 reported them){why}",
                patience.timeout, part.expected, part.until
            )));
        }
    }
    Ok(true)
}

/// Serves what the client reports on its own queue (a broker down, say: it
/// reconnects) and its log lines, which wait there until served.
fn client_events(consumer: &BaseConsumer, queue: &Queue<'_>) {
    // One poll serves one event, and says nothing of those that are not errors.
    for _ in 0..queue.client_events() {
        if let Some(Err(e)) = consumer.poll(Duration::ZERO) {
            tracing::warn!("Kafka client error (retrying): {e}");
        }
    }
}

/// One partition's range being read.
struct Partition {
    topic: String,
    partition: i32,
    until: i64,
    /// The offset the next record should have.
    expected: i64,
    done: bool,
    pending: Pending,
    /// Offsets found missing, reported with the next part.
    lost: MalformedStats,
    /// The offset and error of a failure since the last record.
    failed: Option<(i64, String)>,
}

impl Partition {
    fn new(topic: &str, partition: i32, range: Range, rows: &Rows) -> Self {
        Self {
            topic: topic.to_string(),
            partition,
            until: range.until,
            expected: range.from,
            done: false,
            pending: Pending::new(rows),
            lost: MalformedStats::default(),
            failed: None,
        }
    }

    fn name(&self) -> String {
        partition_name(&self.topic, self.partition)
    }

    fn error(&self, message: String) -> BrookError {
        BrookError::Source {
            location: format!("kafka {}", self.name()),
            message,
        }
    }

    /// Records missing before `offset` (deleted by retention, or skipped by the
    /// broker) are data loss: an error, or counted when `fail_on_data_loss` is off.
    fn count_gap(&mut self, offset: i64, fail_on_data_loss: bool) -> Result<()> {
        if offset <= self.expected {
            return Ok(());
        }
        let end = offset.min(self.until);
        let what = format!(
            "offsets {}..{end} of {} are gone (deleted by retention, or skipped by the broker)",
            self.expected,
            self.name()
        );
        if fail_on_data_loss {
            return Err(self.error(format!(
                "data loss: {what}; set 'failOnDataLoss' to 'false' to count and skip them"
            )));
        }
        for missing in self.expected..end {
            self.lost.record(
                MalformedRecord {
                    file: self.name(),
                    line: missing as u64,
                    reason: what.clone(),
                    text: String::new(),
                },
                "data loss: missing Kafka offsets",
            );
        }
        self.expected = end;
        Ok(())
    }

    /// The last part: the caller stops the partition's fetching.
    fn finish(&mut self) -> Chunk {
        self.done = true;
        self.take()
    }

    /// The records read since the last part.
    fn take(&mut self) -> Chunk {
        let empty = Pending::new(&self.pending.rows());
        Chunk {
            partition: self.partition,
            topic: self.topic.clone(),
            pending: std::mem::replace(&mut self.pending, empty),
            lost: std::mem::take(&mut self.lost),
        }
    }
}

/// Records of one partition to turn into rows together.
struct Chunk {
    topic: String,
    partition: i32,
    pending: Pending,
    lost: MalformedStats,
}

impl Chunk {
    fn rows(self) -> Result<SourceBatch> {
        let mut malformed = self.lost;
        let batch = match self.pending {
            Pending::Text {
                decoder,
                text,
                offsets,
                metadata: None,
            } => {
                let name = partition_name(&self.topic, self.partition);
                let (batch, found) = decode(&name, &decoder, text.into(), &offsets)?;
                malformed.merge(found);
                batch
            }
            Pending::Text {
                decoder,
                text,
                offsets,
                metadata: Some(records),
            } => {
                let name = partition_name(&self.topic, self.partition);
                let (values, found, rows) =
                    decode_records(&name, &decoder, text, &offsets, &records)?;
                malformed.merge(found);
                let at = (self.topic.as_str(), self.partition);
                with_metadata(&records, values, &rows, at, decoder.mode, &mut malformed)?
            }
            Pending::Raw {
                schema, records, ..
            } => raw_batch(&schema, &records, &self.topic, self.partition)?,
        };
        malformed.log();
        Ok(SourceBatch {
            batches: [batch].into_iter().filter(|b| b.num_rows() > 0).collect(),
            malformed,
        })
    }
}

/// Parses the values of partition `name` as [`decode`] does, and says which
/// of `records` each row comes from (the metadata columns' values).
fn decode_records(
    name: &str,
    decoder: &Decoder,
    text: Vec<u8>,
    offsets: &[i64],
    records: &MetadataRecords,
) -> Result<(RecordBatch, MalformedStats, Vec<usize>)> {
    let text = Bytes::from(text);
    let n = records.records.len();
    let (mut bytes, mut lines) = (Vec::with_capacity(n + 1), Vec::with_capacity(n + 1));
    bytes.push(0);
    lines.push(0);
    for (end, taken) in &records.ends {
        bytes.push(*end);
        lines.push(lines[lines.len() - 1] + taken);
    }
    let mut placed = Placed::default();
    place_rows(
        &lines,
        &mut |span| {
            decode(
                name,
                decoder,
                text.slice(bytes[span.start]..bytes[span.end]),
                &offsets[lines[span.start]..lines[span.end]],
            )
        },
        0..n,
        &mut placed,
    )?;
    let batch = concat_batches(&decoder.schema, &placed.batches)?;
    Ok((batch, placed.malformed, placed.rows))
}

/// Rows parsed from a part's values, row i from record `rows[i]`.
#[derive(Default)]
struct Placed {
    batches: Vec<RecordBatch>,
    malformed: MalformedStats,
    rows: Vec<usize>,
}

/// Parses records `span` with `decode` (record i takes lines `lines[i]` up to
/// `lines[i + 1]` of the text) into `placed`. A line makes one row at most (two JSON
/// values on a line are malformed), so when each record of the span is one
/// line, none is malformed and there are as many rows as records, row i is
/// record i; when there is no row, there is none to place. Otherwise (a value
/// over several lines, a malformed or blank one) each half is parsed alone,
/// down to single records, whose rows are all theirs: a few bad values cost a
/// few parses of their neighbours, not one parse a record of the part.
fn place_rows(
    lines: &[usize],
    decode: &mut impl FnMut(std::ops::Range<usize>) -> Result<(RecordBatch, MalformedStats)>,
    span: std::ops::Range<usize>,
    placed: &mut Placed,
) -> Result<()> {
    let count = span.len();
    if count == 0 {
        return Ok(());
    }
    if count == 1 || lines[span.end] - lines[span.start] == count {
        let (batch, malformed) = decode(span.clone())?;
        let rows = batch.num_rows();
        let whole = malformed.count == 0 && rows == count;
        if count == 1 || rows == 0 || whole {
            match count {
                1 => placed.rows.extend(std::iter::repeat_n(span.start, rows)),
                _ if whole => placed.rows.extend(span),
                _ => {}
            }
            placed.malformed.merge(malformed);
            placed.batches.push(batch);
            return Ok(());
        }
    }
    let middle = span.start + count / 2;
    place_rows(lines, decode, span.start..middle, placed)?;
    place_rows(lines, decode, middle..span.end, placed)
}

/// The table's rows: `values` parsed, row i from `records[rows[i]]`, with the
/// metadata columns filled from those records. A key that is not UTF-8, for
/// a `_key` of text, makes its row malformed: an error, dropped or a null
/// key, counted in `malformed`, by `mode`.
fn with_metadata(
    records: &MetadataRecords,
    values: RecordBatch,
    rows: &[usize],
    (topic, partition): (&str, i32),
    mode: ParseMode,
    malformed: &mut MalformedStats,
) -> Result<RecordBatch> {
    let layout = &records.layout;
    let of_rows = || rows.iter().map(|&i| &records.records[i]);
    let mut kept = vec![true; rows.len()];
    let mut columns = Vec::with_capacity(layout.columns.len());
    for (column, field) in layout.columns.iter().zip(layout.schema.fields()) {
        let array: ArrayRef = match column {
            Column::Value(i) => values.column(*i).clone(),
            Column::Metadata(Metadata::Key) if field.data_type() == &DataType::Utf8 => {
                let mut keys = Vec::with_capacity(rows.len());
                for (row, r) in of_rows().enumerate() {
                    let Some(key) = r.key.as_deref() else {
                        keys.push(None);
                        continue;
                    };
                    if let Ok(text) = std::str::from_utf8(key) {
                        keys.push(Some(text));
                        continue;
                    }
                    let bad = MalformedRecord {
                        file: format!("{} offset {}", partition_name(topic, partition), r.offset),
                        line: 1,
                        reason: "the record's key is not UTF-8 text; declare _key BYTEA to \
                                 read it as bytes"
                            .into(),
                        text: String::from_utf8_lossy(key).into_owned(),
                    };
                    if mode == ParseMode::FailFast {
                        return Err(BrookError::Malformed {
                            file: bad.file,
                            line: 1,
                            reason: bad.reason,
                        });
                    }
                    kept[row] = mode == ParseMode::Permissive;
                    malformed.record(bad, "Kafka key not UTF-8");
                    keys.push(None);
                }
                Arc::new(StringArray::from(keys))
            }
            Column::Metadata(Metadata::Key) => {
                Arc::new(BinaryArray::from_iter(of_rows().map(|r| r.key.as_deref())))
            }
            Column::Metadata(Metadata::Topic) => {
                Arc::new(StringArray::from_iter_values(of_rows().map(|_| topic)))
            }
            Column::Metadata(Metadata::Partition) => {
                Arc::new(Int32Array::from_iter_values(of_rows().map(|_| partition)))
            }
            Column::Metadata(Metadata::Offset) => {
                Arc::new(Int64Array::from_iter_values(of_rows().map(|r| r.offset)))
            }
            Column::Metadata(Metadata::Timestamp) => {
                let millis = TimestampMillisecondArray::from_iter(of_rows().map(|r| r.timestamp));
                // Kafka's milliseconds, in the unit the column is declared with.
                cast(&millis, field.data_type())?
            }
            Column::Metadata(Metadata::TimestampType) => Arc::new(Int32Array::from_iter_values(
                of_rows().map(|r| r.timestamp_type),
            )),
            Column::Metadata(Metadata::Headers) => headers_column(of_rows(), field)?,
        };
        columns.push(array);
    }
    let batch = RecordBatch::try_new(layout.schema.clone(), columns)?;
    if kept.iter().all(|k| *k) {
        return Ok(batch);
    }
    Ok(filter_record_batch(&batch, &BooleanArray::from(kept))?)
}

/// Parses the values of partition `name`, one per line: line N of the text is
/// the record at `offsets[N - 1]`.
fn decode(
    name: &str,
    decoder: &Decoder,
    text: Bytes,
    offsets: &[i64],
) -> Result<(RecordBatch, MalformedStats)> {
    // Messages name a record by its offset rather than a line of the text.
    let at = |line: u64| {
        let offset = offsets
            .get(line.saturating_sub(1) as usize)
            .map_or(-1, |o| *o);
        format!("{name} offset {offset}")
    };
    let decoded = match decoder.decode(name, text) {
        Err(BrookError::Malformed { line, reason, .. }) => {
            return Err(BrookError::Malformed {
                file: at(line),
                line: 1,
                reason,
            });
        }
        other => other?,
    };
    let mut malformed = decoded.malformed;
    for s in &mut malformed.samples {
        s.file = at(s.line);
        s.line = 1;
    }
    Ok((decoded.batch, malformed))
}

/// Adds `value` to `text`, ending it with a newline, and returns the number
/// of lines it took. JSON is read a line a record: a line end between a JSON
/// value's tokens is whitespace, so it becomes a space; one inside a string
/// makes the value invalid, so it becomes a tab, which a JSON string cannot
/// hold either, and the record stays malformed on one line.
fn append_value(text: &mut Vec<u8>, format: &FileFormat, value: &[u8]) -> usize {
    let from = text.len();
    text.extend_from_slice(value);
    text.push(b'\n');
    if memchr::memchr(b'\n', value).is_none() {
        return 1;
    }
    if matches!(format, FileFormat::Json) {
        let end = text.len() - 1;
        let (mut in_string, mut escaped) = (false, false);
        for b in &mut text[from..end] {
            match (*b, in_string) {
                (b'\n', true) => *b = b'\t',
                (b'\n', false) => *b = b' ',
                (_, true) if escaped => escaped = false,
                (b'\\', true) => escaped = true,
                (b'"', _) => in_string = !in_string,
                _ => {}
            }
        }
        return 1;
    }
    1 + memchr::memchr_iter(b'\n', value).count()
}

/// A partition's records not yet turned into rows, and how they will be.
enum Pending {
    /// Values, a line each (a CSV value with line ends takes more), and the
    /// offset of each line.
    Text {
        decoder: Arc<Decoder>,
        text: Vec<u8>,
        offsets: Vec<i64>,
        /// The records, for a table with metadata columns.
        metadata: Option<MetadataRecords>,
    },
    Raw {
        schema: SchemaRef,
        records: Vec<Record>,
        /// Bytes of their keys and values.
        bytes: usize,
    },
}

/// The records whose values a part's text holds, without their values.
struct MetadataRecords {
    layout: Arc<Layout>,
    records: Vec<Record>,
    /// Where each record's value ends in the text, and how many lines it takes.
    ends: Vec<(usize, usize)>,
}

impl Pending {
    fn new(rows: &Rows) -> Self {
        match rows {
            Rows::Decoded(decoder, layout) => Pending::Text {
                decoder: decoder.clone(),
                text: Vec::new(),
                offsets: Vec::new(),
                metadata: layout.as_ref().map(|layout| MetadataRecords {
                    layout: layout.clone(),
                    records: Vec::new(),
                    ends: Vec::new(),
                }),
            },
            Rows::Raw(schema) => Pending::Raw {
                schema: schema.clone(),
                records: Vec::new(),
                bytes: 0,
            },
        }
    }

    /// How these records will become rows.
    fn rows(&self) -> Rows {
        match self {
            Pending::Text {
                decoder, metadata, ..
            } => Rows::Decoded(decoder.clone(), metadata.as_ref().map(|m| m.layout.clone())),
            Pending::Raw { schema, .. } => Rows::Raw(schema.clone()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Pending::Text { offsets, .. } => offsets.len(),
            Pending::Raw { records, .. } => records.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Pending::Text { text, .. } => text.len(),
            Pending::Raw { bytes, .. } => *bytes,
        }
    }

    fn push(&mut self, message: &queue::Record<'_>) {
        match self {
            Pending::Text {
                decoder,
                text,
                offsets,
                metadata,
            } => {
                let value = message.payload().unwrap_or_default();
                let lines = append_value(text, &decoder.format, value);
                offsets.extend(std::iter::repeat_n(message.offset(), lines));
                if let Some(m) = metadata {
                    m.ends.push((text.len(), lines));
                    let mut record = Record::of(message);
                    record.value = None;
                    m.records.push(record);
                }
            }
            Pending::Raw { records, bytes, .. } => {
                *bytes +=
                    message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
                records.push(Record::of(message));
            }
        }
    }
}

struct Record {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    offset: i64,
    timestamp: Option<i64>,
    timestamp_type: i32,
    headers: Option<Vec<(String, Option<Vec<u8>>)>>,
}

impl Record {
    fn of(message: &queue::Record<'_>) -> Self {
        let (timestamp, timestamp_type) = message.timestamp();
        Record {
            headers: message.headers(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            offset: message.offset(),
            timestamp,
            timestamp_type,
        }
    }
}

fn raw_batch(
    schema: &SchemaRef,
    records: &[Record],
    topic: &str,
    partition: i32,
) -> Result<RecordBatch> {
    let mut key = BinaryBuilder::new();
    let mut value = BinaryBuilder::new();
    let mut topics = StringBuilder::new();
    let mut partitions = Int32Builder::new();
    let mut offsets = Int64Builder::new();
    let mut times = TimestampMillisecondBuilder::new();
    let mut types = Int32Builder::new();
    for r in records {
        key.append_option(r.key.as_deref());
        value.append_option(r.value.as_deref());
        topics.append_value(topic);
        partitions.append_value(partition);
        offsets.append_value(r.offset);
        times.append_option(r.timestamp);
        types.append_value(r.timestamp_type);
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(key.finish()),
        Arc::new(value.finish()),
        Arc::new(topics.finish()),
        Arc::new(partitions.finish()),
        Arc::new(offsets.finish()),
        Arc::new(times.finish()),
        Arc::new(types.finish()),
    ];
    if let Ok(field) = schema.field_with_name("headers") {
        columns.push(headers_column(records.iter(), field)?);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The records' headers as `field` declares them: a list of (key, value) structs.
fn headers_column<'r>(
    records: impl Iterator<Item = &'r Record>,
    field: &Field,
) -> Result<ArrayRef> {
    let (DataType::List(item), DataType::Struct(fields)) = (
        field.data_type(),
        match field.data_type() {
            DataType::List(item) => item.data_type(),
            _ => &DataType::Null,
        },
    ) else {
        return Err(BrookError::internal(format!(
            "headers column of type {}, not {}",
            field.data_type(),
            headers_type()
        )));
    };
    let item: FieldRef = item.clone();
    let mut headers =
        ListBuilder::new(StructBuilder::from_fields(fields.clone(), 0)).with_field(item);
    for r in records {
        match &r.headers {
            None => headers.append_null(),
            Some(pairs) => {
                let entries = headers.values();
                for (k, v) in pairs {
                    entries
                        .field_builder::<StringBuilder>(0)
                        .ok_or_else(|| BrookError::internal("headers: no key builder"))?
                        .append_value(k);
                    entries
                        .field_builder::<BinaryBuilder>(1)
                        .ok_or_else(|| BrookError::internal("headers: no value builder"))?
                        .append_option(v.as_deref());
                    entries.append(true);
                }
                headers.append(true);
            }
        }
    }
    Ok(Arc::new(headers.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::format::CsvOptions;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Int64Type, Schema};

    fn ids_decoder(mode: ParseMode) -> Decoder {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]);
        Decoder::new(
            FileFormat::Csv(CsvOptions::default()),
            Arc::new(schema),
            mode,
            "_corrupt_record",
        )
    }

    /// A value with a stray quote is one bad record, named by its own offset;
    /// the values after it are read as usual.
    #[test]
    fn a_value_with_a_stray_quote_is_named_by_its_offset() {
        let text = b"1,a\n2,\"b\n3,\"c\"\n4,d\n".to_vec();
        let offsets = [10, 11, 12, 13];
        let decoder = ids_decoder(ParseMode::DropMalformed);
        let (batch, malformed) =
            decode("orders-0", &decoder, text.clone().into(), &offsets).unwrap();
        let ids = batch
            .column(0)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(ids, vec![1, 3, 4]);
        assert_eq!(malformed.count, 1);
        assert_eq!(malformed.samples[0].file, "orders-0 offset 11");

        let decoder = ids_decoder(ParseMode::FailFast);
        let err = decode("orders-0", &decoder, text.into(), &offsets)
            .unwrap_err()
            .to_string();
        assert!(err.contains("orders-0 offset 11"), "{err}");
        assert!(err.contains("unterminated quoted field"), "{err}");
    }

    /// The text and offsets of `values` at offsets 5, 6, ...
    fn values(decoder: &Decoder, values: &[&str]) -> (Vec<u8>, Vec<i64>) {
        let mut text = vec![];
        let mut offsets = vec![];
        for (offset, value) in (5..).zip(values) {
            let lines = append_value(&mut text, &decoder.format, value.as_bytes());
            offsets.extend(std::iter::repeat_n(offset, lines));
        }
        (text, offsets)
    }

    /// A CSV value holding a line end (in quotes: a record over two lines) is
    /// named by its own offset, and so are the values after it.
    #[test]
    fn a_csv_value_over_two_lines_is_named_by_its_offset() {
        let decoder = ids_decoder(ParseMode::DropMalformed);
        let (text, offsets) = values(&decoder, &["1,a", "2,\"b\nc\"", "x,d", "4,e"]);
        let (batch, malformed) = decode("orders-0", &decoder, text.into(), &offsets).unwrap();
        let ids = batch
            .column(0)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(ids, vec![1, 4]);
        let files: Vec<&str> = malformed.samples.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "orders-0 offset 6",
                "orders-0 offset 6",
                "orders-0 offset 7"
            ]
        );
    }

    /// The ids of JSON `values` read as Kafka records from offset 5 on (with a
    /// text column `s`), dropping malformed ones, and what was dropped.
    fn json_ids(records: &[&str]) -> (Vec<i64>, MalformedStats) {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
        ]);
        let decoder = Decoder::new(
            FileFormat::Json,
            Arc::new(schema),
            ParseMode::DropMalformed,
            "_corrupt_record",
        );
        let (text, offsets) = values(&decoder, records);
        let (batch, malformed) = decode("ids-0", &decoder, text.into(), &offsets).unwrap();
        let ids = batch
            .column(0)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        (ids, malformed)
    }

    /// A JSON value written over several lines is one record, and the values
    /// after it are named by their own offsets.
    #[test]
    fn a_json_value_over_several_lines_is_one_record() {
        let (ids, malformed) = json_ids(&[
            "{\n  \"id\": 1\n}",
            "{\"id\": 2}",
            "{\"id\": 3,}",
            "{\"id\": 4}",
        ]);
        assert_eq!(ids, vec![1, 2, 4]);
        assert_eq!(malformed.count, 1);
        assert_eq!(malformed.samples[0].file, "ids-0 offset 7");
    }

    /// A line end inside a JSON string is not whitespace: the value stays
    /// malformed, and the values after it keep their own offsets.
    #[test]
    fn a_line_end_inside_a_json_string_stays_malformed() {
        let (ids, malformed) = json_ids(&[
            // Quotes escaped inside strings end none; line ends between tokens are spaces.
            "{\"id\": 1,\n\"s\": \"a\\\"b\"}",
            "{\"id\": 2, \"s\": \"x\ny\"}",
            "{\"id\": 3, \"s\": \"a\\\\\"\n}",
        ]);
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(malformed.count, 1);
        assert_eq!(malformed.samples[0].file, "ids-0 offset 6");
    }

    /// The rows of a JSON table with `_key` (of type `key_type`) and `_offset`
    /// columns, read under `mode` from records of (value, key) at offsets 5, 6,
    /// ..., and how many were malformed.
    fn with_offsets(
        records: &[(&str, &[u8])],
        key_type: DataType,
        mode: ParseMode,
    ) -> Result<(RecordBatch, u64)> {
        let declared = Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("_key", key_type, true),
            Field::new("_offset", DataType::Int64, false),
        ]);
        let decoder = Decoder::new(
            FileFormat::Json,
            Arc::new(declared),
            mode,
            "_corrupt_record",
        );
        let Rows::Decoded(decoder, Some(layout)) = Rows::decoded(decoder, false)? else {
            panic!("no metadata columns")
        };
        let mut pending = MetadataRecords {
            layout,
            records: vec![],
            ends: vec![],
        };
        let (mut text, mut offsets) = (vec![], vec![]);
        for (offset, (value, key)) in (5..).zip(records) {
            let lines = append_value(&mut text, &decoder.format, value.as_bytes());
            offsets.extend(std::iter::repeat_n(offset, lines));
            pending.ends.push((text.len(), lines));
            pending.records.push(Record {
                key: Some(key.to_vec()),
                value: None,
                offset,
                timestamp: None,
                timestamp_type: -1,
                headers: None,
            });
        }
        let (values, mut malformed, rows) =
            decode_records("ids-0", &decoder, text, &offsets, &pending)?;
        let batch = with_metadata(&pending, values, &rows, ("ids", 0), mode, &mut malformed)?;
        Ok((batch, malformed.count))
    }

    /// A blank value (no row) and a malformed one (dropped): the rows keep
    /// their own records' offsets, not their places.
    #[test]
    fn rows_keep_their_records_metadata_when_values_make_no_row() {
        let k: &[u8] = b"k";
        let (batch, malformed) = with_offsets(
            &[
                (r#"{"id": 1}"#, k),
                (" ", k),
                (r#"{"id": 2} {"id": 3}"#, k),
                (r#"{"id": 4}"#, k),
            ],
            DataType::Utf8,
            ParseMode::DropMalformed,
        )
        .unwrap();
        let column = |i: usize| {
            batch
                .column(i)
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        };
        assert_eq!(column(0), vec![1, 4]);
        assert_eq!(column(2), vec![5, 8]);
        assert_eq!(batch.column(1).as_string::<i32>().value(1), "k");
        assert_eq!(malformed, 1);
    }

    /// A blank value and a malformed one among a thousand: the values around
    /// them are parsed by halves, a few parses rather than one a record, and
    /// each row is placed with its record.
    #[test]
    fn a_few_bad_values_in_a_part_cost_a_few_parses() {
        let decoder = Decoder::new(
            FileFormat::Json,
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)])),
            ParseMode::DropMalformed,
            "_corrupt_record",
        );
        let (mut text, mut offsets, mut lines) = (vec![], vec![], vec![0]);
        let mut bytes = vec![0];
        for i in 0..1000 {
            let value = match i {
                500 => String::new(),
                700 => "{\"id\": }".to_string(),
                // A line end between JSON tokens is a space: one line still.
                900 => format!("{{\"id\":\n{i}}}"),
                _ => format!("{{\"id\": {i}}}"),
            };
            let taken = append_value(&mut text, &decoder.format, value.as_bytes());
            offsets.extend(std::iter::repeat_n(i as i64, taken));
            lines.push(lines[lines.len() - 1] + taken);
            bytes.push(text.len());
        }
        let text = Bytes::from(text);
        let mut parses = 0;
        let mut placed = Placed::default();
        place_rows(
            &lines,
            &mut |span| {
                parses += 1;
                decode(
                    "ids-0",
                    &decoder,
                    text.slice(bytes[span.start]..bytes[span.end]),
                    &offsets[lines[span.start]..lines[span.end]],
                )
            },
            0..1000,
            &mut placed,
        )
        .unwrap();
        let expected: Vec<usize> = (0..1000).filter(|i| *i != 500 && *i != 700).collect();
        assert_eq!(placed.rows, expected);
        let batch = concat_batches(&decoder.schema, &placed.batches).unwrap();
        let ids: Vec<usize> = batch
            .column(0)
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .map(|id| *id as usize)
            .collect();
        assert_eq!(ids, expected);
        assert_eq!(placed.malformed.count, 1);
        assert_eq!(placed.malformed.samples[0].file, "ids-0 offset 700");
        assert!(parses <= 40, "{parses} parses");
    }

    /// A key that is not UTF-8, read as VARCHAR, makes its record malformed:
    /// an error naming its offset, dropped, or a null key; as BYTEA, its bytes.
    #[test]
    fn a_key_that_is_not_text_is_malformed_as_text_and_read_as_bytes() {
        let records: &[(&str, &[u8])] = &[(r#"{"id": 1}"#, b"ok"), (r#"{"id": 2}"#, b"\xff\xfe")];
        let err = with_offsets(records, DataType::Utf8, ParseMode::FailFast)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ids-0 offset 6"), "{err}");
        assert!(err.contains("declare _key BYTEA"), "{err}");

        let (dropped, malformed) =
            with_offsets(records, DataType::Utf8, ParseMode::DropMalformed).unwrap();
        assert_eq!(dropped.num_rows(), 1);
        assert_eq!(dropped.column(1).as_string::<i32>().value(0), "ok");
        assert_eq!(malformed, 1);

        let (kept, malformed) =
            with_offsets(records, DataType::Utf8, ParseMode::Permissive).unwrap();
        assert_eq!(kept.num_rows(), 2);
        assert!(kept.column(1).is_null(1));
        assert_eq!(malformed, 1);

        let (bytes, malformed) =
            with_offsets(records, DataType::Binary, ParseMode::FailFast).unwrap();
        assert_eq!(bytes.column(1).as_binary::<i32>().value(1), b"\xff\xfe");
        assert_eq!(malformed, 0);
    }
}
