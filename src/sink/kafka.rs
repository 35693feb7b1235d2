//! Writes each result row as a Kafka record.
//!
//! A query whose result has a `value` column (text or binary) sends it as is,
//! with its `key` column if it has one; otherwise each row is serialised into
//! the value as JSON (default) or CSV. The topic is the sink's `topic` option,
//! or the row's `topic` column. Delivery is at least once by default: the
//! batch counts as written when the broker has acknowledged every record
//! (idempotent producer), and a batch re-run after a crash is sent again.
//!
//! Exactly once: each batch is one Kafka transaction, which also commits
//! `batch id + 1` as the offset of the sink topic's partition 0 for the
//! consumer group named like the transactional id. Kafka commits both or
//! neither, so after a crash the group's offset tells whether the re-run
//! batch is already in the topic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, ListArray, RecordBatch, StructArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::json::LineDelimitedWriter;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::Sink;
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::options::Options;
use crate::source::kafka::client_options;

/// How rows without a `value` column become record values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueFormat {
    Json,
    Csv,
}

#[derive(Debug, Clone)]
pub struct KafkaSinkOptions {
    pub bootstrap_servers: String,
    /// `None`: each row names its topic in a `topic` column.
    pub topic: Option<String>,
    pub format: ValueFormat,
    /// A key for every record, when the rows have no `key` column (e.g. the metric's name).
    pub key: Option<String>,
    /// `kafka.*` options, passed to the producer without the prefix.
    pub client: BTreeMap<String, String>,
    /// Exactly-once delivery with this transactional id prefix (the query id follows it).
    pub exactly_once: Option<String>,
}

impl KafkaSinkOptions {
    /// Options of a Kafka sink table, besides the general ones and `kafka.*`.
    pub const OPTIONS: &[&str] = &[
        "topic",
        "format",
        "key",
        "deliveryGuarantee",
        "transactionalIdPrefix",
    ];

    /// The brokers are `location` unless `kafka.bootstrap.servers` names
    /// them; `what` names the table in errors.
    pub fn from_options(location: Option<&str>, options: &Options, what: &str) -> Result<Self> {
        let (bootstrap_servers, client) = client_options(location, options, what)?;
        let format = match options
            .get_or("format", "json")
            .to_ascii_lowercase()
            .as_str()
        {
            "json" => ValueFormat::Json,
            "csv" => ValueFormat::Csv,
            other => {
                return Err(BrookError::option(
                    "format",
                    format!("expected json or csv, found '{other}'"),
                ));
            }
        };
        let topic = options.get("topic").map(str::to_string);
        let exactly_once = match options
            .get_or("deliveryGuarantee", "at-least-once")
            .to_ascii_lowercase()
            .as_str()
        {
            "at-least-once" => None,
            "exactly-once" if topic.is_none() => {
                return Err(BrookError::option(
                    "deliveryGuarantee",
                    format!(
                        "{what}: exactly-once needs the 'topic' option (a transaction \
                         records its batch id in that topic's consumer group)"
                    ),
                ));
            }
            "exactly-once" => Some(options.get_or("transactionalIdPrefix", "brook").to_string()),
            other => {
                return Err(BrookError::option(
                    "deliveryGuarantee",
                    format!("expected at-least-once or exactly-once, found '{other}'"),
                ));
            }
        };
        Ok(Self {
            bootstrap_servers,
            topic,
            format,
            key: options.get("key").map(str::to_string),
            client,
            exactly_once,
        })
    }
}

pub struct KafkaSink {
    options: KafkaSinkOptions,
    config: ClientConfig,
    producer: FutureProducer,
    schema: Mutex<Option<SchemaRef>>,
    transactions: OnceLock<Transactions>,
}

/// The exactly-once sink's transactional producer, set up by `open`.
struct Transactions {
    producer: FutureProducer,
    group: Arc<ConsumerGroupMetadata>,
    topic: String,
    /// The first batch id whose transaction has not committed.
    next_batch: AtomicU64,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

impl KafkaSink {
    pub fn new(options: KafkaSinkOptions) -> Result<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &options.bootstrap_servers)
            .set("enable.idempotence", "true")
            // One record per request unless 'kafka.batch.num.messages' says otherwise:
            // some Kafka-protocol brokers (tansu 0.6) track offsets per batch.
            .set("batch.num.messages", "1");
        for (k, v) in &options.client {
            config.set(k, v);
        }
        let producer = config.create().map_err(|e| BrookError::Sink {
            sink: format!("kafka {}", options.bootstrap_servers),
            message: format!("cannot create a producer: {e}"),
        })?;
        Ok(Self {
            options,
            config,
            producer,
            schema: Mutex::new(None),
            transactions: OnceLock::new(),
        })
    }

    /// Sets up the transactional producer: fences an older producer of the same
    /// query (aborting its open transaction) and reads which batch last committed.
    async fn begin_exactly_once(&self, prefix: &str, query_id: &str) -> Result<()> {
        let Some(topic) = self.options.topic.clone() else {
            return Err(self.error("exactly-once needs the 'topic' option"));
        };
        let id = format!("{prefix}-{query_id}");
        let mut producer_config = self.config.clone();
        producer_config.set("transactional.id", &id);
        let producer: FutureProducer = producer_config
            .create()
            .map_err(|e| self.error(format!("cannot create a transactional producer: {e}")))?;
        let mut consumer_config = ClientConfig::new();
        consumer_config
            .set("bootstrap.servers", &self.options.bootstrap_servers)
            .set("group.id", &id)
            .set("enable.auto.commit", "false");
        for (k, v) in &self.options.client {
            consumer_config.set(k, v);
        }
        let consumer: BaseConsumer = consumer_config
            .create()
            .map_err(|e| self.error(format!("cannot create a consumer: {e}")))?;
        let sink = self.describe();
        let fail = move |what: &str, e: KafkaError| BrookError::Sink {
            sink: sink.clone(),
            message: format!(
                "exactly-once delivery needs Kafka transactions: {what}: {e} (does topic \
                 '{topic}' exist? a broker without transactions needs 'deliveryGuarantee' \
                 'at-least-once')"
            ),
        };
        let topic = self.options.topic.clone().unwrap_or_default();
        let marker_topic = topic.clone();
        let (producer, group, next_batch) = tokio::task::spawn_blocking(move || {
            producer
                .init_transactions(TRANSACTION_TIMEOUT)
                .map_err(|e| fail("cannot start transactions", e))?;
            let mut marker = TopicPartitionList::new();
            marker.add_partition(&marker_topic, 0);
            let committed = consumer
                .committed_offsets(marker, TRANSACTION_TIMEOUT)
                .map_err(|e| fail("cannot read the last committed batch", e))?;
            let next_batch = match committed
                .find_partition(&marker_topic, 0)
                .map(|p| p.offset())
            {
                Some(Offset::Offset(n)) if n > 0 => n as u64,
                _ => 0,
            };
            let group = consumer
                .group_metadata()
                .ok_or_else(|| fail("no consumer group metadata", KafkaError::NoMessageReceived))?;
            // An empty transaction that commits the marker again: a broker that
            // cannot finish transactions is refused here, before any batch.
            let mut marker = TopicPartitionList::new();
            marker
                .add_partition_offset(&marker_topic, 0, Offset::Offset(next_batch as i64))
                .map_err(|e| fail("bad marker", e))?;
            producer
                .begin_transaction()
                .and_then(|()| {
                    producer.send_offsets_to_transaction(&marker, &group, TRANSACTION_TIMEOUT)
                })
                .and_then(|()| producer.commit_transaction(TRANSACTION_TIMEOUT))
                .map_err(|e| fail("the broker cannot complete a transaction", e))?;
            Ok::<_, BrookError>((producer, group, next_batch))
        })
        .await
        .map_err(|e| self.error(format!("Kafka client task failed: {e}")))??;
        if next_batch > 0 {
            tracing::info!(
                "{}: batches before {next_batch} are already in Kafka (committed transactions)",
                self.describe()
            );
        }
        let _ = self.transactions.set(Transactions {
            producer,
            group: Arc::new(group),
            topic,
            next_batch: AtomicU64::new(next_batch),
        });
        Ok(())
    }

    /// Sends every row and waits until the broker has acknowledged all of them.
    async fn send_all(&self, producer: &FutureProducer, batches: &[RecordBatch]) -> Result<()> {
        let mut deliveries = FuturesUnordered::new();
        for batch in batches {
            let values = self.values(batch)?;
            let keys = match batch.column_by_name("key") {
                Some(k) => bytes_of(k)?,
                None => {
                    vec![self.options.key.as_ref().map(|k| k.as_bytes().to_vec()); values.len()]
                }
            };
            let topics = match (&self.options.topic, batch.column_by_name("topic")) {
                (Some(t), _) => vec![Some(t.clone()); values.len()],
                (None, Some(column)) => strings_of(column)?,
                (None, None) => return Err(self.error("no 'topic' column")),
            };
            let headers = match batch.column_by_name("headers") {
                Some(h) => headers_of(h, |m| self.error(m))?,
                None => vec![None; values.len()],
            };
            let rows = values.into_iter().zip(keys).zip(topics).zip(headers);
            for (((value, key), topic), headers) in rows {
                let topic = topic.ok_or_else(|| self.error("a row's topic is null"))?;
                let producer = producer.clone();
                deliveries.push(async move {
                    let mut record = FutureRecord::<[u8], [u8]>::to(&topic);
                    if let Some(v) = &value {
                        record = record.payload(v.as_slice());
                    }
                    if let Some(k) = &key {
                        record = record.key(k.as_slice());
                    }
                    if let Some(h) = headers {
                        record = record.headers(h);
                    }
                    producer
                        .send(record, DELIVERY_TIMEOUT)
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| (topic, e))
                });
            }
        }
        while let Some(result) = deliveries.next().await {
            if let Err((topic, e)) = result {
                return Err(self.error(format!(
                    "delivery to topic '{topic}' failed: {e} (does the topic exist, is the broker up?)"
                )));
            }
        }
        Ok(())
    }

    /// Batch `batch_id` as one transaction that also records the batch id.
    async fn add_batch_exactly_once(
        &self,
        txn: &Transactions,
        batch_id: u64,
        batches: &[RecordBatch],
    ) -> Result<()> {
        if batch_id < txn.next_batch.load(Ordering::SeqCst) {
            tracing::info!(
                "{}: batch {batch_id} is already in Kafka (its transaction committed before \
                 the restart); not sent again",
                self.describe()
            );
            return Ok(());
        }
        let producer = txn.producer.clone();
        self.blocking(move || producer.begin_transaction()).await?;
        let sent = self.send_all(&txn.producer, batches).await;
        let producer = txn.producer.clone();
        if let Err(e) = sent {
            self.blocking(move || producer.abort_transaction(TRANSACTION_TIMEOUT))
                .await?;
            return Err(e);
        }
        let mut marker = TopicPartitionList::new();
        marker
            .add_partition_offset(&txn.topic, 0, Offset::Offset(batch_id as i64 + 1))
            .map_err(|e| self.error(e.to_string()))?;
        let group = txn.group.clone();
        self.blocking(move || {
            producer.send_offsets_to_transaction(&marker, &group, TRANSACTION_TIMEOUT)?;
            producer.commit_transaction(TRANSACTION_TIMEOUT)
        })
        .await?;
        txn.next_batch.store(batch_id + 1, Ordering::SeqCst);
        Ok(())
    }

    /// Runs a blocking transaction call off the async threads.
    async fn blocking(
        &self,
        f: impl FnOnce() -> std::result::Result<(), KafkaError> + Send + 'static,
    ) -> Result<()> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| self.error(format!("Kafka client task failed: {e}")))?
            .map_err(|e| self.error(format!("transaction failed: {e}")))
    }

    fn error(&self, message: impl Into<String>) -> BrookError {
        BrookError::Sink {
            sink: self.describe(),
            message: message.into(),
        }
    }

    /// Each row's value: the `value` column, or the row serialised.
    fn values(&self, batch: &RecordBatch) -> Result<Vec<Option<Vec<u8>>>> {
        if let Some(column) = batch.column_by_name("value") {
            return bytes_of(column);
        }
        let data: Vec<usize> = (0..batch.num_columns())
            .filter(|i| {
                let name = batch.schema_ref().field(*i).name().clone();
                name != "key"
                    && name != "headers"
                    && (self.options.topic.is_some() || name != "topic")
            })
            .collect();
        let rows = batch.project(&data)?;
        let mut buf = Vec::new();
        match self.options.format {
            ValueFormat::Json => {
                let mut writer = LineDelimitedWriter::new(&mut buf);
                writer.write(&rows)?;
                writer.finish()?;
            }
            ValueFormat::Csv => {
                let mut writer = CsvWriterBuilder::new().with_header(false).build(&mut buf);
                writer.write(&rows)?;
            }
        }
        Ok(buf
            .split(|b| *b == b'\n')
            .take(rows.num_rows())
            .map(|line| Some(line.to_vec()))
            .collect())
    }
}

/// The bytes of a text or binary column, row by row.
fn bytes_of(column: &ArrayRef) -> Result<Vec<Option<Vec<u8>>>> {
    let binary = cast(column, &DataType::Binary)?;
    let binary = binary
        .as_any()
        .downcast_ref::<datafusion::arrow::array::BinaryArray>()
        .ok_or_else(|| BrookError::internal("a binary cast gave no binary array"))?;
    Ok((0..binary.len())
        .map(|i| (!binary.is_null(i)).then(|| binary.value(i).to_vec()))
        .collect())
}

/// Each row's headers, from a `headers` column as the Kafka source gives it
/// (a list of `key`, `value` structs); a column of another type is the sink's `error`.
fn headers_of(
    column: &ArrayRef,
    error: impl Fn(String) -> BrookError,
) -> Result<Vec<Option<OwnedHeaders>>> {
    let bad = || {
        error(format!(
            "a 'headers' column must be a list of (key string, value binary) structs, as the \
             Kafka source's, not {}",
            column.data_type()
        ))
    };
    let list = column
        .as_any()
        .downcast_ref::<ListArray>()
        .ok_or_else(bad)?;
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        if list.is_null(i) {
            out.push(None);
            continue;
        }
        let entries = list.value(i);
        let entries = entries
            .as_any()
            .downcast_ref::<StructArray>()
            .ok_or_else(bad)?;
        let keys = strings_of(entries.column_by_name("key").ok_or_else(bad)?)?;
        let values = bytes_of(entries.column_by_name("value").ok_or_else(bad)?)?;
        let mut headers = OwnedHeaders::new_with_capacity(keys.len());
        for (key, value) in keys.iter().zip(&values) {
            headers = headers.insert(Header {
                key: key.as_deref().unwrap_or_default(),
                value: value.as_deref(),
            });
        }
        out.push(Some(headers));
    }
    Ok(out)
}

fn strings_of(column: &ArrayRef) -> Result<Vec<Option<String>>> {
    Ok(bytes_of(column)?
        .into_iter()
        .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
        .collect())
}

#[async_trait]
impl Sink for KafkaSink {
    fn describe(&self) -> String {
        format!(
            "KafkaSink[{} {}]",
            self.options.bootstrap_servers,
            self.options.topic.as_deref().unwrap_or("<topic column>")
        )
    }

    async fn open(&self, schema: &SchemaRef, _mode: OutputMode, query_id: &str) -> Result<()> {
        if self.options.topic.is_none() && schema.field_with_name("topic").is_err() {
            return Err(self.error(
                "no topic: give the sink option 'topic', or a 'topic' column in the query",
            ));
        }
        *self
            .schema
            .lock()
            .map_err(|_| self.error("lock poisoned"))? = Some(schema.clone());
        if let Some(prefix) = &self.options.exactly_once {
            self.begin_exactly_once(prefix, query_id).await?;
        }
        Ok(())
    }

    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        match self.transactions.get() {
            Some(txn) => self.add_batch_exactly_once(txn, batch_id, &batches).await,
            None => self.send_all(&self.producer, &batches).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_once_takes_the_transactional_id_prefix_or_brook() {
        let options = Options::new()
            .with("topic", "metrics")
            .with("deliveryGuarantee", "Exactly-Once")
            .with("format", "csv");
        let sink = KafkaSinkOptions::from_options(Some("host:1"), &options, "t").unwrap();
        assert_eq!(sink.exactly_once.as_deref(), Some("brook"));
        assert_eq!(sink.format, ValueFormat::Csv);
        assert_eq!(sink.bootstrap_servers, "host:1");

        let options = options.with("transactionalIdPrefix", "dash");
        let sink = KafkaSinkOptions::from_options(Some("host:1"), &options, "t").unwrap();
        assert_eq!(sink.exactly_once.as_deref(), Some("dash"));

        let at_least_once = Options::new().with("topic", "metrics");
        let sink = KafkaSinkOptions::from_options(Some("host:1"), &at_least_once, "t").unwrap();
        assert_eq!((sink.exactly_once, sink.format), (None, ValueFormat::Json));
    }
}
