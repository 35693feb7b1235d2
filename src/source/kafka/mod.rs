//! The Kafka source: topics read as an unbounded table, offsets owned by the checkpoint.
//!
//! As Spark's source does, a batch is a range of offsets per partition, decided
//! (and written ahead to the checkpoint) before it is read; consumer groups are
//! not used for correctness. Reading a range again yields the same records, so a
//! batch re-run after a crash reads exactly what it read before.

mod fetch;
mod options;
mod queue;
mod shared;
mod task;

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use futures::stream::{BoxStream, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use fetch::{Patience, Rows, fetch};
pub(crate) use options::{KafkaValue, client_options};
pub(crate) use shared::SharedReads;
use shared::{Progress, Registration, parts};
pub use task::{RangeReader, split_ranges};

use super::format::Decoder;
use super::{SourceBatch, SourceOffset, StreamSource};
use crate::error::{BrookError, Result};

/// Where a query without checkpointed progress starts in each partition.
#[derive(Debug, Clone, PartialEq)]
pub enum StartingOffsets {
    Earliest,
    Latest,
    /// Per topic and partition: an offset, or -2 for earliest and -1 for latest (as Spark).
    Given(BTreeMap<String, BTreeMap<i32, i64>>),
}

/// Which topics a source reads.
#[derive(Debug, Clone)]
pub(crate) enum Topics {
    /// Spark's `subscribe`: these topics, which must exist.
    List(Vec<String>),
    /// Spark's `subscribePattern`: every topic whose whole name matches, as topics come and go.
    Pattern(regex::Regex),
}

impl std::fmt::Display for Topics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topics::List(t) => write!(f, "{}", t.join(",")),
            Topics::Pattern(p) => write!(f, "pattern {}", p.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct KafkaOptions {
    pub bootstrap_servers: String,
    pub topics: Topics,
    pub starting_offsets: StartingOffsets,
    pub max_offsets_per_trigger: Option<u64>,
    pub fail_on_data_loss: bool,
    /// `kafka.*` options, passed to the client without the prefix.
    pub client: BTreeMap<String, String>,
    /// How long a read waits for records the broker said exist (e.g. while it restarts).
    pub poll_timeout: Duration,
    /// Spark's `includeHeaders`: a `headers` column of (key, value) pairs.
    pub include_headers: bool,
    /// How many clients read a batch's partitions side by side (at most one
    /// per partition): one client hands every record through two threads in
    /// turn, and cannot keep more than about one core busy.
    pub readers: usize,
}

/// The type of the `headers` column: Spark's `array<struct<key: string, value: binary>>`.
pub(crate) fn headers_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(
        DataType::Struct(header_fields()),
        true,
    )))
}

fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Binary, true),
    ])
}

/// The columns of a Kafka table read without a value format (Spark's), with
/// `headers` last when asked for.
pub(crate) fn kafka_schema(include_headers: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new("key", DataType::Binary, true),
        Field::new("value", DataType::Binary, true),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        ),
        Field::new("timestampType", DataType::Int32, false),
    ];
    if include_headers {
        fields.push(Field::new("headers", headers_type(), true));
    }
    Arc::new(Schema::new(fields))
}

/// Next offset to read per topic and partition.
type Positions = BTreeMap<String, BTreeMap<i32, i64>>;

/// A batch: per topic and partition, offsets `from` (inclusive) to `until` (exclusive).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct Range {
    from: i64,
    until: i64,
}

type Ranges = BTreeMap<String, BTreeMap<i32, Range>>;

pub(crate) struct KafkaSource {
    options: KafkaOptions,
    rows: Rows,
    clients: Arc<Clients>,
    shared: Registration,
    positions: Positions,
    /// Set by the available-now trigger: the end offsets batches may reach.
    snapshot: Option<Positions>,
    /// When the broker stopped answering, while it does not: the query waits up
    /// to `poll_timeout` for it to come back.
    unreachable_since: Option<Instant>,
    /// Topics deleted while the query ran (with `failOnDataLoss` off).
    gone: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

/// A Kafka client closed on a thread of its own: closing takes about 100 ms
/// (librdkafka's threads time out their waits), which would hold up an async
/// thread, or a process that is exiting.
struct Client {
    consumer: ManuallyDrop<BaseConsumer>,
    /// Partitions started for reads, which librdkafka counts (see `wear`).
    starts: u64,
}

/// librdkafka counts a client's partition starts in a signed 32-bit counter
/// that never goes down, and refuses every start once it overflows: a client
/// is replaced well before.
const STARTS_PER_CLIENT: u64 = 1 << 30;

impl Client {
    /// Counts `starts` more partition starts, replacing the client with a new
    /// one made by `make` first if they would pass its limit.
    fn wear(&mut self, starts: u64, make: impl FnOnce() -> Result<Client>) -> Result<()> {
        if self.starts + starts > STARTS_PER_CLIENT {
            *self = make()?;
        }
        self.starts += starts;
        Ok(())
    }
}

impl std::ops::Deref for Client {
    type Target = BaseConsumer;

    fn deref(&self) -> &BaseConsumer {
        &self.consumer
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: taken once, here, and never used again.
        let consumer = unsafe { ManuallyDrop::take(&mut self.consumer) };
        let closing = std::thread::Builder::new()
            .name("kafka-close".into())
            .spawn(move || drop(consumer));
        if let Err(e) = closing {
            tracing::warn!("closing a Kafka client in the foreground: {e}");
        }
    }
}

fn lock<T>(client: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    client
        .lock()
        .map_err(|_| BrookError::poisoned("Kafka client"))
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

impl KafkaSource {
    /// A source parsing each record's value with `decoder`, or reading the raw
    /// Kafka columns without one; it shares reads with the other sources of `shared`.
    pub fn new(
        options: KafkaOptions,
        decoder: Option<Decoder>,
        shared: &Arc<SharedReads>,
    ) -> Result<Self> {
        let config = client_config(&options.bootstrap_servers, &options.client);
        // The first client now, so that a bad setting fails the query's start.
        let clients = Arc::new(Clients {
            first: Arc::new(Mutex::new(client(&config, &options.bootstrap_servers, "")?)),
            more: Mutex::new(vec![]),
            config,
            servers: options.bootstrap_servers.clone(),
        });
        let rows = match decoder {
            Some(d) => Rows::decoded(d, options.include_headers)?,
            None => Rows::Raw(kafka_schema(options.include_headers)),
        };
        // Reads are the same when the clients and the ranges are.
        let identity = format!(
            "{} {} {:?} {} {:?}",
            options.bootstrap_servers,
            options.topics,
            options.client,
            options.fail_on_data_loss,
            options.poll_timeout
        );
        let shared = shared.register(&identity, &rows)?;
        Ok(Self {
            options,
            rows,
            clients,
            shared,
            positions: Positions::new(),
            snapshot: None,
            unreachable_since: None,
            gone: Default::default(),
        })
    }

    fn error(&self, message: impl Into<String>) -> BrookError {
        BrookError::Source {
            location: format!(
                "kafka {} {}",
                self.options.bootstrap_servers, self.options.topics
            ),
            message: message.into(),
        }
    }

    /// Runs a blocking call of the first client off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BaseConsumer) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let consumer = self.clients.first.clone();
        tokio::task::spawn_blocking(move || f(&*lock(&consumer)?))
            .await
            .map_err(|e| BrookError::task("a Kafka client task", e))?
    }

    /// Low and high watermarks of every partition of the source's topics, and
    /// the subscribed topics that do not exist; the inner error is a broker that
    /// does not answer, which a running query waits out.
    async fn try_watermarks(
        &self,
    ) -> Result<std::result::Result<(Marks, Vec<String>), BrookError>> {
        let wanted = self.options.topics.clone();
        let servers = self.options.bootstrap_servers.clone();
        self.blocking(move |consumer| {
            Ok(query_marks(consumer, &wanted).map_err(|e| unreachable_broker(&servers, e)))
        })
        .await
    }

    /// The watermarks, failing on a broker that does not answer or a missing topic.
    async fn watermarks(&self) -> Result<Marks> {
        let (marks, missing) = self.try_watermarks().await??;
        match missing.first() {
            None => Ok(marks),
            Some(topic) => Err(self.error(format!(
                "topic '{topic}' does not exist (or has no partitions); create it first, \
                 or fix the 'subscribe' option"
            ))),
        }
    }

    /// A subscribed topic is missing while the query runs. One it has read from
    /// was deleted: data loss (an error, or with `failOnDataLoss` off a warning,
    /// reading it from the start if it comes back); one it never saw is an error.
    fn topic_gone(&mut self, topic: &str) -> Result<()> {
        let what = format!("topic '{topic}' does not exist (or has no partitions)");
        if self.gone.contains(topic) {
            return Ok(());
        }
        if self.positions.remove(topic).is_none() {
            return Err(self.error(format!(
                "{what}; create it first, or fix the 'subscribe' option"
            )));
        }
        if self.options.fail_on_data_loss {
            return Err(self.error(format!(
                "data loss: {what} any more: it was deleted; set 'failOnDataLoss' to 'false' \
                 to go on (reading it from its start if it is created again)"
            )));
        }
        tracing::warn!("{what} any more; it is read from its start if it is created again");
        self.gone.insert(topic.to_string());
        Ok(())
    }

    fn parse_ranges(&self, offset: &SourceOffset) -> Result<Ranges> {
        serde_json::from_value(offset.0.clone())
            .map_err(|e| self.error(format!("unreadable Kafka offset {}: {e}", offset.0)))
    }

    /// Reads `ranges` on blocking threads, a client to each share of the
    /// partitions, publishing their parts and the read's end to `tx`.
    fn start_read(&self, ranges: Ranges, tx: watch::Sender<Progress>) {
        let shares = split(&ranges, self.options.readers);
        let last = shares.len() - 1;
        let read = Arc::new(SplitRead {
            tx,
            left: Mutex::new(Left {
                shares: shares.len(),
                first_error: None,
            }),
            failed: AtomicBool::new(false),
        });
        let patience = Patience {
            timeout: self.options.poll_timeout,
            fail_on_data_loss: self.options.fail_on_data_loss,
        };
        for (i, ranges) in shares.into_iter().enumerate() {
            let (rows, clients) = (self.rows.clone(), self.clients.clone());
            let share = Share {
                read: read.clone(),
                ended: false,
            };
            tokio::task::spawn_blocking(move || {
                // The first client, which also asks for watermarks, takes the
                // last share, the smallest, and so is free again soonest.
                let consumer = clients.get(last - i);
                let read = &share.read;
                let result = consumer.and_then(|consumer| {
                    let mut consumer = lock(&consumer)?;
                    // Its records would go with the failed read.
                    if !read.wanted() {
                        return Err(BrookError::Cancelled("the Kafka read was given up".into()));
                    }
                    let starts = ranges.values().map(BTreeMap::len).sum::<usize>() as u64;
                    consumer.wear(starts, || client(&clients.config, &clients.servers, ""))?;
                    let emit = |part| read.tx.send_modify(|p: &mut Progress| p.parts.push(part));
                    // Caught here, so that the client's lock is not poisoned
                    // for the next read (unwinding stops the read's partitions).
                    std::panic::catch_unwind(AssertUnwindSafe(|| {
                        fetch(&consumer, &ranges, &rows, patience, &|| read.wanted(), emit)
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(BrookError::internal(format!(
                            "the Kafka read panicked: {what}"
                        )))
                    })
                });
                share.end(result);
            });
        }
    }
}

/// How many clients read a batch by default: one per core, up to 4, since
/// each keeps threads and sockets of its own and prefetches up to
/// `queued.max.messages.kbytes` (64 MB).
pub(crate) fn default_readers() -> usize {
    crate::config::partitions().min(4)
}

/// A source's Kafka clients: the first, made at start, also asks for
/// watermarks (on an async thread, so it never waits for the others to be
/// made); the others are made when a read first needs them.
struct Clients {
    config: ClientConfig,
    servers: String,
    first: Arc<Mutex<Client>>,
    more: Mutex<Vec<Arc<Mutex<Client>>>>,
}

impl Clients {
    /// Client `i`, made (with those before it) if need be.
    fn get(&self, i: usize) -> Result<Arc<Mutex<Client>>> {
        let Some(i) = i.checked_sub(1) else {
            return Ok(self.first.clone());
        };
        let mut more = lock(&self.more)?;
        while more.len() <= i {
            let note = format!(
                " (client {} of those reading a batch; lower 'readers' to use fewer)",
                more.len() + 2
            );
            more.push(Arc::new(Mutex::new(client(
                &self.config,
                &self.servers,
                &note,
            )?)));
        }
        Ok(more[i].clone())
    }
}

/// One share's end, reported once: by the share, or on drop, should its
/// task be dropped unrun or panic before it ends, so that the read still
/// ends, failed.
struct Share {
    read: Arc<SplitRead>,
    ended: bool,
}

impl Share {
    fn end(mut self, result: Result<()>) {
        self.ended = true;
        self.read.done(result);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if !self.ended {
            self.read.done(Err(BrookError::internal(
                "a share of the Kafka read ended without a result",
            )));
        }
    }
}

/// A client's settings for reading offset ranges from `servers`, with the
/// `kafka.*` options in `client` over brook's own.
fn client_config(servers: &str, client: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", servers)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // A batch reads a range the broker has reported, so fetches need not
        // wait for more: fetch in large pieces, well ahead of the reader
        // (librdkafka's default queue of 100,000 records caps a read at about
        // 170,000 records/s), and do not wait for more data than is there
        // (tansu holds every fetch for the whole fetch.wait.max.ms, 500 ms by
        // default).
        .set("max.partition.fetch.bytes", "16777216")
        .set("queued.min.messages", "1000000")
        .set("fetch.wait.max.ms", "10")
        // Offsets deleted before they are fetched: the client goes to the
        // first offset the broker still has, and the read counts the gap
        // as data loss (librdkafka's default jumps to the end, unseen).
        .set("auto.offset.reset", "earliest");
    for (k, v) in client {
        config.set(k, v);
    }
    config
}

/// A new client; `note` says which, when it is not the first.
fn client(config: &ClientConfig, servers: &str, note: &str) -> Result<Client> {
    let consumer: BaseConsumer = config.create().map_err(|e| BrookError::Source {
        location: servers.to_string(),
        message: format!("cannot create a Kafka client{note}: {e}"),
    })?;
    Ok(Client {
        consumer: ManuallyDrop::new(consumer),
        starts: 0,
    })
}

/// A batch's partitions in up to `n` shares of about as many records each.
fn split(ranges: &Ranges, n: usize) -> Vec<Ranges> {
    let mut all: Vec<(&String, i32, Range)> = ranges
        .iter()
        .flat_map(|(topic, ps)| ps.iter().map(move |(p, r)| (topic, *p, *r)))
        .filter(|(_, _, r)| r.until > r.from)
        .collect();
    // Offsets come from the checkpoint's files: nothing here may overflow.
    let records = |r: &Range| r.until.saturating_sub(r.from);
    all.sort_by_key(|(_, _, r)| std::cmp::Reverse(records(r)));
    let mut shares = vec![(0i64, Ranges::new()); n.min(all.len()).max(1)];
    for (topic, p, r) in all {
        if let Some((total, share)) = shares.iter_mut().min_by_key(|(total, _)| *total) {
            *total = total.saturating_add(records(&r));
            share.entry(topic.clone()).or_default().insert(p, r);
        }
    }
    // Largest first: the last share goes to the client that also asks for watermarks.
    shares.sort_by_key(|(total, _)| std::cmp::Reverse(*total));
    shares.into_iter().map(|(_, share)| share).collect()
}

/// Shares still reading, and the first error any met.
struct Left {
    shares: usize,
    first_error: Option<BrookError>,
}

/// A read split among clients: their parts go out as they come, and the read
/// ends when every share has, with the first error any met.
struct SplitRead {
    tx: watch::Sender<Progress>,
    left: Mutex<Left>,
    /// A share failed: the others stop.
    failed: AtomicBool,
}

impl SplitRead {
    fn wanted(&self) -> bool {
        !self.tx.is_closed() && !self.failed.load(Ordering::Relaxed)
    }

    fn done(&self, result: Result<()>) {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = result {
            left.first_error.get_or_insert(e);
            self.failed.store(true, Ordering::Relaxed);
        }
        left.shares -= 1;
        if left.shares == 0 {
            let end = left.first_error.take().map_or(Ok(()), |e| Err(Arc::new(e)));
            self.tx.send_modify(|p| p.end = Some(end));
        }
    }
}

type Marks = BTreeMap<String, BTreeMap<i32, (i64, i64)>>;

/// Asks the broker for the topics' partitions and their watermarks, and which
/// subscribed topics do not exist.
fn query_marks(
    consumer: &BaseConsumer,
    wanted: &Topics,
) -> std::result::Result<(Marks, Vec<String>), rdkafka::error::KafkaError> {
    let topics = match wanted {
        Topics::List(list) => list.clone(),
        Topics::Pattern(pattern) => consumer
            .fetch_metadata(None, METADATA_TIMEOUT)?
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|name| pattern.is_match(name))
            .collect(),
    };
    let mut found = vec![];
    let mut missing = vec![];
    for topic in &topics {
        let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            missing.push(topic.clone());
        }
        found.extend(partitions.into_iter().map(|p| (topic, p)));
    }
    if found.is_empty() {
        return Ok((Marks::new(), missing));
    }
    // One request each for the first and the next offsets of every partition
    // (asking for each partition's watermarks takes two round trips per partition).
    let ask = |at: Offset| {
        let mut tpl = TopicPartitionList::new();
        for (topic, p) in &found {
            tpl.add_partition_offset(topic, *p, at)?;
        }
        consumer.offsets_for_times(tpl, METADATA_TIMEOUT)
    };
    let (lows, highs) = (ask(Offset::Beginning)?, ask(Offset::End)?);
    let mut out: Marks = BTreeMap::new();
    for (topic, p) in found {
        // A partition answered with no offset (-1) is asked again through the
        // watermark call, whose answer is always an offset.
        let offset = |tpl: &TopicPartitionList| match tpl.find_partition(topic, p)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        let marks = match (offset(&lows), offset(&highs)) {
            (Some(low), Some(high)) => (low, high),
            _ => consumer.fetch_watermarks(topic, p, METADATA_TIMEOUT)?,
        };
        out.entry(topic.clone()).or_default().insert(p, marks);
    }
    Ok((out, missing))
}

fn unreachable_broker(servers: &str, e: rdkafka::error::KafkaError) -> BrookError {
    BrookError::Source {
        location: format!("kafka {servers}"),
        message: format!(
            "cannot reach the broker: {e}; check 'kafka.bootstrap.servers' (LOCATION)"
        ),
    }
}

#[async_trait]
impl StreamSource for KafkaSource {
    fn schema(&self) -> SchemaRef {
        self.rows.schema()
    }

    fn describe(&self) -> String {
        format!(
            "KafkaSource[{} {}]",
            self.options.bootstrap_servers, self.options.topics
        )
    }

    async fn start(&mut self) -> Result<()> {
        let marks = self.watermarks().await?;
        for (topic, partitions) in marks {
            let given = match &self.options.starting_offsets {
                StartingOffsets::Given(g) => g.get(&topic).cloned(),
                _ => None,
            };
            let mut positions = BTreeMap::new();
            for (p, (low, high)) in partitions {
                let start = match (
                    &self.options.starting_offsets,
                    given.as_ref().and_then(|g| g.get(&p)),
                ) {
                    (_, Some(-2)) | (StartingOffsets::Earliest, None) => low,
                    (_, Some(-1)) | (StartingOffsets::Latest, None) => high,
                    (_, Some(o)) => *o,
                    (StartingOffsets::Given(_), None) => low,
                };
                positions.insert(p, start);
            }
            self.positions.insert(topic, positions);
        }
        self.shared.at(&self.positions)
    }

    fn progress(&self) -> Result<serde_json::Value> {
        serde_json::to_value(&self.positions)
            .map_err(|e| BrookError::serde("the Kafka source's positions", e))
    }

    fn restore(
        &mut self,
        progress: Option<serde_json::Value>,
        committed: &[SourceOffset],
    ) -> Result<()> {
        if let Some(p) = progress {
            self.positions = serde_json::from_value(p).map_err(|e| {
                self.error(format!("unreadable Kafka progress in the checkpoint: {e}"))
            })?;
        }
        for offset in committed {
            self.commit(offset)?;
        }
        self.shared.at(&self.positions)
    }

    async fn plan_batch(&mut self) -> Result<Option<SourceOffset>> {
        let marks = match self.try_watermarks().await? {
            Ok((marks, missing)) => {
                for topic in missing {
                    self.topic_gone(&topic)?;
                }
                self.gone.retain(|t| !marks.contains_key(t));
                if self.unreachable_since.take().is_some() {
                    tracing::info!("{}: the broker answers again", self.describe());
                }
                marks
            }
            Err(e) => {
                let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > self.options.poll_timeout {
                    return Err(e);
                }
                tracing::warn!("{e}; waiting for it (up to 'pollTimeout')");
                return Ok(None);
            }
        };
        let mut lags: Vec<(String, i32, i64, i64)> = vec![];
        for (topic, partitions) in &marks {
            for (p, (low, high)) in partitions {
                // A partition seen for the first time (added to the topic) starts at its beginning.
                let mut from = self
                    .positions
                    .get(topic)
                    .and_then(|ps| ps.get(p))
                    .copied()
                    .unwrap_or(*low);
                if from < *low {
                    let what = format!(
                        "offsets {from}..{low} of {topic}-{p} were deleted (retention) before \
                         they were read"
                    );
                    if self.options.fail_on_data_loss {
                        return Err(self.error(format!(
                            "data loss: {what}; set 'failOnDataLoss' to 'false' to skip them"
                        )));
                    }
                    tracing::warn!("{what}; skipping them (failOnDataLoss=false)");
                    from = *low;
                }
                let mut until = *high;
                if let Some(limit) = self.snapshot.as_ref().and_then(|s| s.get(topic)?.get(p)) {
                    until = until.min(*limit);
                }
                if from > *high {
                    let what = format!(
                        "{topic}-{p} ends at offset {high}, before offset {from} that the query \
                         reads next: the topic was deleted and created again, or the broker \
                         lost records"
                    );
                    if self.options.fail_on_data_loss {
                        return Err(self.error(format!(
                            "data loss: {what}; set 'failOnDataLoss' to 'false' to read the \
                             partition again from its start"
                        )));
                    }
                    tracing::warn!("{what}; reading it again from offset {low}");
                    from = *low;
                }
                if until > from {
                    lags.push((topic.clone(), *p, from, until));
                }
            }
        }
        if lags.is_empty() {
            return Ok(None);
        }
        // maxOffsetsPerTrigger is shared among partitions in proportion to their lag (as Spark).
        if let Some(max) = self.options.max_offsets_per_trigger {
            let total: i64 = lags.iter().map(|(_, _, f, u)| u - f).sum();
            if total as u64 > max {
                for (_, _, from, until) in &mut lags {
                    let lag = *until - *from;
                    let share = ((lag as f64) * (max as f64) / (total as f64)).floor() as i64;
                    *until = *from + share.max(1).min(lag);
                }
            }
        }
        let mut ranges = Ranges::new();
        for (topic, p, from, until) in lags {
            ranges
                .entry(topic)
                .or_default()
                .insert(p, Range { from, until });
        }
        let value =
            serde_json::to_value(&ranges).map_err(|e| BrookError::serde("a Kafka offset", e))?;
        Ok(Some(SourceOffset(value)))
    }

    async fn read(&self, offset: &SourceOffset) -> Result<SourceBatch> {
        SourceBatch::collect(self.read_parts(offset)).await
    }

    /// The ranges' records 65,536 (or 8 MB) at a time, fetched and parsed once
    /// for all the sources of the engine that read the same ranges.
    fn read_parts<'a>(&'a self, offset: &'a SourceOffset) -> BoxStream<'a, Result<SourceBatch>> {
        let progress = self.parse_ranges(offset).and_then(|ranges| {
            self.shared
                .read(&ranges, |tx| self.start_read(ranges.clone(), tx))
        });
        match progress {
            Ok(progress) => parts(progress),
            Err(e) => futures::stream::once(async { Err(e) }).boxed(),
        }
    }

    fn commit(&mut self, offset: &SourceOffset) -> Result<()> {
        for (topic, partitions) in self.parse_ranges(offset)? {
            let positions = self.positions.entry(topic).or_default();
            for (p, range) in partitions {
                positions.insert(p, range.until);
            }
        }
        Ok(())
    }

    async fn snapshot_available(&mut self) -> Result<()> {
        let marks = self.watermarks().await?;
        self.snapshot = Some(
            marks
                .into_iter()
                .map(|(t, ps)| (t, ps.into_iter().map(|(p, (_, high))| (p, high)).collect()))
                .collect(),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(sizes: &[i64]) -> Ranges {
        let partitions = sizes
            .iter()
            .enumerate()
            .map(|(p, n)| {
                (
                    p as i32,
                    Range {
                        from: 10,
                        until: 10 + n,
                    },
                )
            })
            .collect();
        Ranges::from([("orders".to_string(), partitions)])
    }

    fn partitions(shares: &[Ranges]) -> Vec<Vec<i32>> {
        shares
            .iter()
            .map(|share| share.values().flat_map(|ps| ps.keys().copied()).collect())
            .collect()
    }

    #[test]
    fn a_client_is_replaced_before_librdkafka_refuses_its_starts() {
        // Clients connect when first used: no broker is needed here.
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:1");
        let make = || client(&config, "127.0.0.1:1", "");
        let mut worn = make().unwrap();
        worn.starts = STARTS_PER_CLIENT - 4;
        let first = worn.client().native_ptr();
        worn.wear(4, make).unwrap();
        assert_eq!(worn.starts, STARTS_PER_CLIENT);
        assert_eq!(worn.client().native_ptr(), first);
        worn.wear(3, make).unwrap();
        assert_eq!(worn.starts, 3);
        assert_ne!(worn.client().native_ptr(), first);
    }

    #[test]
    fn partitions_are_split_into_shares_of_about_as_many_records() {
        let split4 = split(&ranges(&[100, 90, 50, 40]), 2);
        assert_eq!(partitions(&split4), [vec![0, 3], vec![1, 2]]);
        assert_eq!(
            split4[0]["orders"][&3],
            Range {
                from: 10,
                until: 50
            }
        );
        // No more shares than partitions with records, and never none.
        assert_eq!(
            partitions(&split(&ranges(&[5, 0, 7]), 8)),
            [vec![2], vec![0]]
        );
        assert_eq!(partitions(&split(&ranges(&[0, 0]), 2)), [Vec::<i32>::new()]);
        assert_eq!(partitions(&split(&ranges(&[1, 2, 3]), 1)), [vec![0, 1, 2]]);
        // The largest share first, the smallest last.
        assert_eq!(
            partitions(&split(&ranges(&[10, 9, 8]), 2)),
            [vec![1, 2], vec![0]]
        );
    }

    #[test]
    fn every_partition_of_every_topic_is_in_one_share() {
        let mut all = ranges(&[7, 3, 9, 1, 4]);
        all.insert("trades".into(), ranges(&[2, 8, 0])["orders"].clone());
        for n in 1..=9 {
            let shares = split(&all, n);
            assert!(shares.len() <= n, "{n}");
            let mut joined = Ranges::new();
            for share in shares {
                for (topic, ps) in share {
                    for (p, r) in ps {
                        let seen = joined.entry(topic.clone()).or_default().insert(p, r);
                        assert_eq!(seen, None, "{topic}-{p} in two shares");
                    }
                }
            }
            // Every range with records, unchanged.
            let mut wanted = all.clone();
            wanted
                .values_mut()
                .for_each(|ps| ps.retain(|_, r| r.until > r.from));
            assert_eq!(joined, wanted, "{n}");
        }
        let corrupt = Ranges::from([(
            "orders".into(),
            BTreeMap::from([
                (
                    0,
                    Range {
                        from: i64::MIN,
                        until: i64::MAX,
                    },
                ),
                (
                    1,
                    Range {
                        from: -1,
                        until: i64::MAX,
                    },
                ),
            ]),
        )]);
        assert_eq!(split(&corrupt, 1).len(), 1);
    }

    fn split_read(shares: usize) -> (Arc<SplitRead>, watch::Receiver<Progress>) {
        let (tx, rx) = watch::channel(Progress::default());
        let read = SplitRead {
            tx,
            left: Mutex::new(Left {
                shares,
                first_error: None,
            }),
            failed: AtomicBool::new(false),
        };
        (Arc::new(read), rx)
    }

    fn ended(rx: &watch::Receiver<Progress>) -> Option<std::result::Result<(), String>> {
        let progress = rx.borrow();
        let end = progress.end.as_ref()?;
        Some(end.as_ref().map(|_| ()).map_err(|e| e.to_string()))
    }

    #[test]
    fn a_split_read_ends_when_every_share_has_with_the_first_error() {
        let (read, rx) = split_read(3);
        read.done(Ok(()));
        assert!(read.wanted());
        let real = BrookError::Source {
            location: "orders-0".into(),
            message: "offsets 5..7 are gone".into(),
        };
        read.done(Err(real));
        // The other share stops, and its error is not the read's.
        assert!(!read.wanted());
        assert_eq!(ended(&rx), None);
        read.done(Err(BrookError::Cancelled("given up".into())));
        let end = ended(&rx).and_then(|e| e.err()).unwrap_or_default();
        assert!(end.contains("offsets 5..7 are gone"), "{end}");

        let (read, rx) = split_read(2);
        read.done(Ok(()));
        read.done(Ok(()));
        assert_eq!(ended(&rx), Some(Ok(())));

        // A share whose task is dropped unrun (or panics before it ends)
        // still ends the read, failed.
        let (read, rx) = split_read(2);
        Share {
            read: read.clone(),
            ended: false,
        }
        .end(Ok(()));
        drop(Share {
            read: read.clone(),
            ended: false,
        });
        let end = ended(&rx).and_then(|e| e.err()).unwrap_or_default();
        assert!(end.contains("without a result"), "{end}");

        // No reader left: every share stops.
        let (read, rx) = split_read(2);
        drop(rx);
        assert!(!read.wanted());
    }
}
