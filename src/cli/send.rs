//! `brook send`: replays an orders file into a directory in chunks, as the
//! book's `splitAndSend.sh` does, each chunk appearing atomically by rename;
//! or into a Kafka topic, a record per line, as its `streamOrders.sh` does.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{BrookError, Result};
use crate::source::location::write_atomically;

pub struct SendOptions {
    pub input: PathBuf,
    pub to: PathBuf,
    pub lines_per_file: usize,
    pub interval: Duration,
}

/// Writes chunk files `orders-<run>-00000.csv`, ... into `to`; returns how many.
///
/// `<run>` is the start time (UTC, to the millisecond) and a random id, so
/// that a second send into the same directory never replaces a file a query has
/// already read (a source takes each name once), and names sort oldest first.
pub async fn send_files(options: &SendOptions) -> Result<usize> {
    if options.lines_per_file == 0 {
        return Err(BrookError::option("--lines-per-file", "must be at least 1"));
    }
    std::fs::create_dir_all(&options.to).map_err(|e| BrookError::io(&options.to, e))?;
    let file =
        std::fs::File::open(&options.input).map_err(|e| BrookError::io(&options.input, e))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let run = run_prefix();
    let mut sent = 0;
    loop {
        let mut chunk = String::new();
        let mut n = 0;
        while n < options.lines_per_file {
            match lines.next() {
                Some(line) => {
                    chunk.push_str(&line.map_err(|e| BrookError::io(&options.input, e))?);
                    chunk.push('\n');
                    n += 1;
                }
                None => break,
            }
        }
        if n == 0 {
            return Ok(sent);
        }
        if sent > 0 && !options.interval.is_zero() {
            tokio::time::sleep(options.interval).await;
        }
        let name = format!("orders-{run}-{sent:05}.csv");
        write_atomically(&options.to, &name, chunk.as_bytes())?;
        super::note(&format!(
            "sent {} ({n} lines)",
            options.to.join(&name).display()
        ));
        sent += 1;
    }
}

/// What names one run's files apart from every other run's, even two in one
/// process within a millisecond: `20261205T134512345Z-3fa9c2d1`.
pub(crate) fn run_prefix() -> String {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%S%3fZ");
    format!("{now}-{:08x}", rand::random::<u32>())
}

/// Where `brook send --kafka` sends, and how fast.
pub struct KafkaSendOptions {
    pub input: PathBuf,
    pub servers: String,
    pub topic: String,
    /// Lines per second; `None` sends as fast as the broker takes them.
    pub rate: Option<u64>,
}

/// Sends each line of the input as one record (value = the line); returns how many.
pub async fn send_kafka(options: &KafkaSendOptions) -> Result<u64> {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    if options.rate == Some(0) {
        return Err(BrookError::option("--rate", "must be at least 1"));
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &options.servers)
        .set("enable.idempotence", "true")
        // One record per request: some Kafka-protocol brokers (tansu 0.6) track
        // offsets per batch, so that readers resuming inside one would lose records.
        .set("batch.num.messages", "1")
        .create()
        .map_err(|e| BrookError::option("--kafka", format!("cannot create a producer: {e}")))?;
    let file =
        std::fs::File::open(&options.input).map_err(|e| BrookError::io(&options.input, e))?;
    let started = tokio::time::Instant::now();
    let mut pending = futures::stream::FuturesOrdered::new();
    let mut sent = 0u64;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| BrookError::io(&options.input, e))?;
        if let Some(rate) = options.rate {
            tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / rate as f64))
                .await;
        }
        let producer = producer.clone();
        let topic = options.topic.clone();
        pending.push_back(async move {
            producer
                .send(
                    FutureRecord::<(), str>::to(&topic).payload(&line),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        });
        sent += 1;
        // Bounded in flight, so a slow broker slows the sender rather than filling memory.
        if pending.len() >= 10_000 {
            drain_one(&mut pending, options).await?;
        }
    }
    while !pending.is_empty() {
        drain_one(&mut pending, options).await?;
    }
    super::note(&format!(
        "sent {sent} records to {} topic {}",
        options.servers, options.topic
    ));
    Ok(sent)
}

async fn drain_one<F>(
    pending: &mut futures::stream::FuturesOrdered<F>,
    options: &KafkaSendOptions,
) -> Result<()>
where
    F: std::future::Future<Output = std::result::Result<(), rdkafka::error::KafkaError>>,
{
    use futures::StreamExt;
    match pending.next().await {
        Some(Err(e)) => Err(BrookError::Sink {
            sink: format!("kafka {} topic {}", options.servers, options.topic),
            message: format!("delivery failed: {e} (is the broker up and the topic created?)"),
        }),
        _ => Ok(()),
    }
}
