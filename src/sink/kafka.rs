//! Writes each result row as a Kafka record.
//!
//! A query whose result has a `value` column (text or binary) sends it as is,
//! with its `key` column if it has one; otherwise each row is serialised into
//! the value as JSON (default) or CSV. The topic is the sink's `topic` option,
//! or the row's `topic` column. Delivery is at least once: the batch counts as
//! written when the broker has acknowledged every record (idempotent
//! producer), and a batch re-run after a crash is sent again.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::json::LineDelimitedWriter;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::Sink;
use crate::error::{BrookError, Result};
use crate::exec::OutputMode;

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
}

pub struct KafkaSink {
    options: KafkaSinkOptions,
    producer: FutureProducer,
    schema: Mutex<Option<SchemaRef>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

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
            producer,
            schema: Mutex::new(None),
        })
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
                name != "key" && (self.options.topic.is_some() || name != "topic")
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
        .ok_or_else(|| BrookError::Plan("a binary cast gave no binary array".into()))?;
    Ok((0..binary.len())
        .map(|i| (!binary.is_null(i)).then(|| binary.value(i).to_vec()))
        .collect())
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

    async fn open(&self, schema: &SchemaRef, _mode: OutputMode, _query_id: &str) -> Result<()> {
        if self.options.topic.is_none() && schema.field_with_name("topic").is_err() {
            return Err(self.error(
                "no topic: give the sink option 'topic', or a 'topic' column in the query",
            ));
        }
        *self
            .schema
            .lock()
            .map_err(|_| self.error("lock poisoned"))? = Some(schema.clone());
        Ok(())
    }

    async fn add_batch(&self, _batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        let mut deliveries = FuturesUnordered::new();
        for batch in &batches {
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
            for ((value, key), topic) in values.into_iter().zip(keys).zip(topics) {
                let topic = topic.ok_or_else(|| self.error("a row's topic is null"))?;
                let producer = self.producer.clone();
                deliveries.push(async move {
                    let mut record = FutureRecord::<[u8], [u8]>::to(&topic);
                    if let Some(v) = &value {
                        record = record.payload(v.as_slice());
                    }
                    if let Some(k) = &key {
                        record = record.key(k.as_slice());
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
}
