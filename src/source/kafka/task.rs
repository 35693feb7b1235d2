//! A batch's offset ranges read without a source: what a cluster's task does
//! with its share of a Kafka batch, as Spark's executors read theirs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};

use super::fetch::{Patience, Rows, fetch};
use super::{KafkaOptions, KafkaValue, Ranges, client, client_config, kafka_schema};
use crate::error::{BrookError, Result};
use crate::source::format::DecodeOptions;
use crate::source::{SourceBatch, SourceOffset};

/// What reading a Kafka table's ranges takes, sent to a cluster inside its
/// plan. The client's options may hold credentials (SASL), which it needs
/// there, as Spark's executors do; its `Debug` names them without values.
#[derive(Clone, Serialize, Deserialize)]
pub struct RangeReader {
    pub bootstrap_servers: String,
    /// `kafka.*` options, without the prefix.
    pub client: BTreeMap<String, String>,
    pub poll_timeout: Duration,
    pub fail_on_data_loss: bool,
    pub include_headers: bool,
    /// How a record's value becomes a row; `None` for the raw Kafka columns.
    pub decode: Option<DecodeOptions>,
}

impl std::fmt::Debug for RangeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeReader")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("client", &self.client.keys().collect::<Vec<_>>())
            .field("poll_timeout", &self.poll_timeout)
            .field("fail_on_data_loss", &self.fail_on_data_loss)
            .field("include_headers", &self.include_headers)
            .field("decode", &self.decode)
            .finish()
    }
}

impl RangeReader {
    pub(crate) fn new(options: &KafkaOptions, value: &KafkaValue) -> Self {
        Self {
            bootstrap_servers: options.bootstrap_servers.clone(),
            client: options.client.clone(),
            poll_timeout: options.poll_timeout,
            fail_on_data_loss: options.fail_on_data_loss,
            include_headers: options.include_headers,
            decode: match value {
                KafkaValue::Raw => None,
                KafkaValue::Parsed(decode) => Some(decode.clone()),
            },
        }
    }

    /// Reads the ranges `offset` names into rows of `schema` (the table's),
    /// with a client of its own, which closes when the read ends.
    pub async fn read(&self, schema: SchemaRef, offset: &SourceOffset) -> Result<SourceBatch> {
        let ranges = parse(offset)?;
        let rows = match &self.decode {
            Some(decode) => Rows::decoded(decode.decoder(schema), self.include_headers)?,
            None => Rows::Raw(kafka_schema(self.include_headers)),
        };
        let config = client_config(&self.bootstrap_servers, &self.client);
        let servers = self.bootstrap_servers.clone();
        let patience = Patience {
            timeout: self.poll_timeout,
            fail_on_data_loss: self.fail_on_data_loss,
        };
        // A task given up (its job failed elsewhere) stops its read.
        let _wanted = Wanted(Arc::new(AtomicBool::new(true)));
        let still = _wanted.0.clone();
        let read = tokio::task::spawn_blocking(move || {
            let consumer = client(&config, &servers, "")?;
            let mut read = SourceBatch::default();
            fetch(
                &consumer,
                &ranges,
                &rows,
                patience,
                &|| still.load(Ordering::Relaxed),
                |part| read.extend(part),
            )?;
            Ok(read)
        });
        read.await
            .map_err(|e| BrookError::task("a Kafka read of a cluster's task", e))?
    }
}

/// Clears its flag when dropped: the read it guards is not wanted any more.
struct Wanted(Arc<AtomicBool>);

impl Drop for Wanted {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

fn parse(offset: &SourceOffset) -> Result<Ranges> {
    serde_json::from_value(offset.0.clone()).map_err(|e| BrookError::CheckpointData {
        message: format!("unreadable Kafka offset {}: {e}", offset.0),
        source: Some(Box::new(e)),
    })
}

/// The partitions with records of the batch `offset` names, each as an offset
/// of its own: the parts a cluster's tasks read one each.
pub fn split_ranges(offset: &SourceOffset) -> Result<Vec<SourceOffset>> {
    let mut parts = vec![];
    for (topic, partitions) in parse(offset)? {
        for (p, range) in partitions {
            if range.until <= range.from {
                continue;
            }
            let one = Ranges::from([(topic.clone(), BTreeMap::from([(p, range)]))]);
            let value =
                serde_json::to_value(one).map_err(|e| BrookError::serde("a Kafka offset", e))?;
            parts.push(SourceOffset(value));
        }
    }
    Ok(parts)
}
