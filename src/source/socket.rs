//! Lines read over TCP (Spark's `socketTextStream`), for tests and demos.
//!
//! A background task connects to `host:port`, reconnecting a second after the
//! connection fails or closes, and numbers each line it receives. A batch is a
//! range of those numbers. Lines live in memory until their batch commits: the
//! server cannot replay them, so after a restart a logged batch whose lines
//! are gone reads nothing (as a Spark receiver without a write-ahead log).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{SourceBatch, SourceOffset, StreamSource};
use crate::error::{BrookError, Result};

#[derive(Default)]
struct Received {
    /// The number of `lines[0]`.
    first: u64,
    lines: VecDeque<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Range {
    from: u64,
    until: u64,
}

pub struct SocketSource {
    address: String,
    schema: SchemaRef,
    received: Arc<Mutex<Received>>,
    /// Lines before this number are in a planned batch.
    planned: u64,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SocketSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl SocketSource {
    pub fn new(address: String) -> Self {
        Self {
            address,
            schema: Arc::new(Schema::new(vec![Field::new(
                "value",
                DataType::Utf8,
                false,
            )])),
            received: Arc::default(),
            planned: 0,
            reader: None,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Received>> {
        self.received
            .lock()
            .map_err(|_| BrookError::poisoned("socket buffer"))
    }

    fn spawn_reader(&mut self) {
        if self.reader.is_none() {
            let task = read_forever(self.address.clone(), self.received.clone());
            self.reader = Some(tokio::spawn(task));
        }
    }

    fn parse(&self, offset: &SourceOffset) -> Result<Range> {
        serde_json::from_value(offset.0.clone()).map_err(|e| BrookError::Source {
            location: self.describe(),
            message: format!("unreadable socket offset {}: {e}", offset.0),
        })
    }
}

impl Drop for SocketSource {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

async fn read_forever(address: String, received: Arc<Mutex<Received>>) {
    loop {
        match TcpStream::connect(&address).await {
            Ok(stream) => {
                let mut lines = BufReader::new(stream).lines();
                loop {
                    match lines.next_line().await {
                        Ok(Some(line)) => match received.lock() {
                            Ok(mut r) => r.lines.push_back(line),
                            Err(_) => return,
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("socket {address}: {e}; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("socket {address}: cannot connect: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait]
impl StreamSource for SocketSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn describe(&self) -> String {
        format!("SocketSource[{}]", self.address)
    }

    async fn start(&mut self) -> Result<()> {
        self.spawn_reader();
        Ok(())
    }

    fn progress(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "next": self.planned }))
    }

    fn restore(
        &mut self,
        progress: Option<serde_json::Value>,
        committed: &[SourceOffset],
    ) -> Result<()> {
        // Lines of the old connection cannot be read again: this run numbers its
        // lines past any batch the old one planned, so a re-run batch reads none.
        let mut last = progress
            .and_then(|p| p.get("next").and_then(serde_json::Value::as_u64))
            .unwrap_or(0);
        for offset in committed {
            last = last.max(self.parse(offset)?.until);
        }
        let base = last + (1 << 40);
        self.lock()?.first = base;
        self.planned = base;
        self.spawn_reader();
        Ok(())
    }

    async fn plan_batch(&mut self) -> Result<Option<SourceOffset>> {
        let until = {
            let r = self.lock()?;
            r.first + r.lines.len() as u64
        };
        if until <= self.planned {
            return Ok(None);
        }
        let range = Range {
            from: self.planned,
            until,
        };
        self.planned = until;
        Ok(Some(SourceOffset(
            serde_json::to_value(range).map_err(|e| BrookError::serde("a socket offset", e))?,
        )))
    }

    async fn read(&self, offset: &SourceOffset) -> Result<SourceBatch> {
        let range = self.parse(offset)?;
        let lines: Vec<String> = {
            let r = self.lock()?;
            let from = range.from.max(r.first);
            (from..range.until)
                .filter_map(|n| r.lines.get((n - r.first) as usize).cloned())
                .collect()
        };
        if (lines.len() as u64) < range.until.saturating_sub(range.from) {
            tracing::warn!(
                "{}: lines {}..{} were received before a restart and cannot be read again",
                self.describe(),
                range.from,
                range.until
            );
        }
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![Arc::new(StringArray::from(lines))],
        )?;
        Ok(SourceBatch {
            batches: vec![batch],
            ..Default::default()
        })
    }

    fn commit(&mut self, offset: &SourceOffset) -> Result<()> {
        let range = self.parse(offset)?;
        let mut r = self.lock()?;
        while r.first < range.until && !r.lines.is_empty() {
            r.lines.pop_front();
            r.first += 1;
        }
        Ok(())
    }

    async fn snapshot_available(&mut self) -> Result<()> {
        Ok(())
    }
}
