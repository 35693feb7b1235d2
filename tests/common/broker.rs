//! A real Kafka-protocol broker for tests: tansu, on a free 127.0.0.1 port, with
//! in-memory storage (or SQLite, for a broker that restarts), installed by
//! `tools::tansu()` on first use.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use super::tools::{self, free_port};

/// A running broker, stopped when dropped.
pub struct Broker {
    child: Child,
    pub port: u16,
    storage: String,
    dir: Option<PathBuf>,
}

impl Broker {
    /// A broker keeping its topics in memory.
    pub fn start() -> Self {
        Self::start_on(free_port(), "memory://tansu/".into(), None)
    }

    /// A broker keeping its topics in a SQLite file under `dir`, so that they
    /// survive a restart.
    pub fn start_persistent(dir: &std::path::Path) -> Self {
        // tansu opens the SQLite file relative to its working directory.
        Self::start_on(free_port(), "sqlite://tansu.db".into(), Some(dir.into()))
    }

    /// Stops the broker (in memory, its topics are lost with it).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        *self = Self::start_on(self.port, self.storage.clone(), self.dir.take());
    }

    fn start_on(port: u16, storage: String, dir: Option<PathBuf>) -> Self {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(tools::tansu());
        if let Some(dir) = &dir {
            command.current_dir(dir);
        }
        let child = command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &storage])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "tansu did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            storage,
            dir,
        }
    }

    /// The broker process's CPU time so far, in seconds (user + system).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the broker's /proc/<pid>/stat");
        // The fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum();
        // SAFETY: sysconf reads a constant of the system.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    pub fn servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.servers());
        config
    }

    /// Creates `topic` with `partitions` partitions (tansu does not create topics on use).
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap();
        for r in results {
            r.unwrap();
        }
    }

    /// Sends `values` to `topic`, the i-th to partition i % `partitions`, one
    /// record per producer batch (tansu skips to the next batch when a fetch
    /// starts inside one, so a consumer resuming at an exact offset needs this).
    pub fn produce(&self, topic: &str, partitions: i32, values: &[String]) {
        let records: Vec<(&str, &[(&str, &str)])> =
            values.iter().map(|v| (v.as_str(), &[][..])).collect();
        self.produce_with_headers(topic, partitions, &records);
    }

    /// Sends records given as (partition, key, value, timestamp in ms) to
    /// `topic`, one per producer batch, in order.
    pub fn produce_records(&self, topic: &str, records: &[(i32, Option<&str>, &str, i64)]) {
        let producer: ThreadedProducer<DefaultProducerContext> = self
            .config()
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .create()
            .unwrap();
        for (partition, key, value, timestamp) in records {
            let length = value.len().to_string();
            let mut record = BaseRecord::<str, str>::to(topic)
                .payload(*value)
                .partition(*partition)
                .timestamp(*timestamp)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "n",
                    value: Some(length.as_str()),
                }));
            if let Some(key) = key {
                record = record.key(*key);
            }
            producer.send(record).map_err(|(e, _)| e).unwrap();
            // One at a time: each record its own batch, the order kept.
            producer.flush(Duration::from_secs(60)).unwrap();
        }
    }

    /// As `produce`, each value with its headers.
    pub fn produce_with_headers(
        &self,
        topic: &str,
        partitions: i32,
        records: &[(&str, &[(&str, &str)])],
    ) {
        let producer: ThreadedProducer<DefaultProducerContext> = self
            .config()
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .create()
            .unwrap();
        for (i, (v, headers)) in records.iter().enumerate() {
            let partition = i as i32 % partitions;
            let mut record = BaseRecord::<(), str>::to(topic)
                .payload(*v)
                .partition(partition);
            if !headers.is_empty() {
                let mut owned = OwnedHeaders::new();
                for (key, value) in *headers {
                    owned = owned.insert(Header {
                        key,
                        value: Some(*value),
                    });
                }
                record = record.headers(owned);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        // The local queue is full: let deliveries catch up.
                        record = back;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
