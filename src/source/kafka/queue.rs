//! librdkafka's simple consumer, through its C API: a read starts the
//! partitions of its ranges on a queue of its own and takes their records from
//! it thousands at a time.
//!
//! The crate's consumer hands over one record per call, each wrapped in an
//! event and a reference count, with a clock read around it: about a third of
//! a read's CPU. Its assignments go through librdkafka's consumer-group state
//! machine, whose assign/unassign races (librdkafka #5573) abort the process
//! when batch calls shift their timing; simple-consumer partitions are started
//! and stopped directly, and a stop waits until the partition's fetcher has.

use std::ffi::{CStr, CString, c_char, c_void};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// Records taken from the queue per call.
const TAKE: usize = 8192;

/// A read's partitions, started on a queue of their own; dropping it stops
/// them (records the client fetched for them are discarded) and frees the queue.
pub(super) struct Queue<'c> {
    consumer: &'c BaseConsumer,
    queue: *mut rd::rd_kafka_queue_t,
    /// The client's own queue: its errors and log lines.
    events: *mut rd::rd_kafka_queue_t,
    topics: Vec<(String, *mut rd::rd_kafka_topic_t)>,
    started: Vec<(usize, i32)>,
    taken: Vec<*mut rd::rd_kafka_message_t>,
}

impl<'c> Queue<'c> {
    pub(super) fn new(consumer: &'c BaseConsumer) -> Self {
        // SAFETY: the client outlives both queue handles, which are freed in drop.
        let (queue, events) = unsafe {
            (
                rd::rd_kafka_queue_new(rk(consumer)),
                rd::rd_kafka_queue_get_main(rk(consumer)),
            )
        };
        Self {
            consumer,
            queue,
            events,
            topics: Vec::new(),
            started: Vec::new(),
            taken: Vec::with_capacity(TAKE),
        }
    }

    /// Starts fetching `partition` of `topic` at `offset` into this queue.
    pub(super) fn start(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), String> {
        let t = self.topic(topic)?;
        // SAFETY: a live topic handle and queue of this client.
        if unsafe {
            rd::rd_kafka_consume_start_queue(self.topics[t].1, partition, offset, self.queue)
        } == -1
        {
            return Err(last_error());
        }
        self.started.push((t, partition));
        Ok(())
    }

    /// Stops fetching `partition` of `topic`, waiting until its fetcher has.
    pub(super) fn stop(&mut self, topic: &str, partition: i32) {
        let Some(i) = self
            .started
            .iter()
            .position(|&(t, p)| p == partition && self.topics[t].0 == topic)
        else {
            return;
        };
        let (t, p) = self.started.swap_remove(i);
        self.stop_one(t, p);
    }

    fn stop_one(&self, t: usize, partition: i32) {
        // SAFETY: a live topic handle of this client, started on this queue.
        if unsafe { rd::rd_kafka_consume_stop(self.topics[t].1, partition) } == -1 {
            tracing::warn!(
                "stopping the Kafka read of {}-{partition} failed: {}",
                self.topics[t].0,
                last_error()
            );
        }
    }

    /// The records fetched so far, many at a time: waits up to `timeout` for
    /// the first, none for the rest.
    pub(super) fn take(&mut self, timeout: Duration) -> Taken<'_> {
        self.taken.clear();
        // SAFETY: the array has room for the count given; the queue is live.
        let mut n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue, 0, self.taken.as_mut_ptr(), TAKE)
        };
        if n == 0 {
            // A call that waits returns only when the array is full, or the
            // time is up: wait for one record, then take the rest.
            let wait = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: as above.
            n = unsafe {
                rd::rd_kafka_consume_batch_queue(self.queue, wait, self.taken.as_mut_ptr(), 1)
            };
            if n == 1 {
                // SAFETY: as above, past the one taken.
                let more = unsafe {
                    rd::rd_kafka_consume_batch_queue(
                        self.queue,
                        0,
                        self.taken.as_mut_ptr().add(1),
                        TAKE - 1,
                    )
                };
                n += more.max(0);
            }
        }
        // SAFETY: librdkafka filled the first n entries.
        unsafe { self.taken.set_len(n.max(0) as usize) };
        Taken(&mut self.taken)
    }

    /// One past the last offset the client handed over from `partition` of
    /// `topic`: a record, an error, or one of the records it does not deliver
    /// (transaction markers, aborted records).
    pub(super) fn position(&self, topic: &str, partition: i32) -> i64 {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        // SAFETY: a live client and list.
        let err = unsafe { rd::rd_kafka_position(rk(self.consumer), tpl.ptr()) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return -1;
        }
        match tpl.find_partition(topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(next)) => next,
            _ => -1,
        }
    }

    /// How many events wait on the client's own queue.
    pub(super) fn client_events(&self) -> usize {
        // SAFETY: a live queue handle.
        unsafe { rd::rd_kafka_queue_length(self.events) }
    }

    /// The client's handle of `topic`, made on first use.
    fn topic(&mut self, topic: &str) -> Result<usize, String> {
        if let Some(t) = self.topics.iter().position(|(name, _)| name == topic) {
            return Ok(t);
        }
        let name = CString::new(topic).map_err(|e| e.to_string())?;
        // SAFETY: a live client and a C string; no topic configuration.
        let handle = unsafe {
            rd::rd_kafka_topic_new(rk(self.consumer), name.as_ptr(), std::ptr::null_mut())
        };
        if handle.is_null() {
            return Err(last_error());
        }
        self.topics.push((topic.to_string(), handle));
        Ok(self.topics.len() - 1)
    }
}

impl Drop for Queue<'_> {
    fn drop(&mut self) {
        for &(t, p) in &self.started {
            self.stop_one(t, p);
        }
        // SAFETY: made in new and released once, here; every partition is
        // stopped, so nothing is fetched into the queue any more.
        unsafe {
            for (_, handle) in &self.topics {
                rd::rd_kafka_topic_destroy(*handle);
            }
            rd::rd_kafka_queue_destroy(self.queue);
            rd::rd_kafka_queue_destroy(self.events);
        }
    }
}

fn rk(consumer: &BaseConsumer) -> *mut rd::rd_kafka_t {
    use rdkafka::consumer::Consumer;
    consumer.client().native_ptr()
}

/// The error of the last failed librdkafka call on this thread.
fn last_error() -> String {
    // SAFETY: a thread-local error code.
    RDKafkaErrorCode::from(unsafe { rd::rd_kafka_last_error() }).to_string()
}

/// Records taken from a queue, given back to librdkafka on drop.
pub(super) struct Taken<'q>(&'q mut Vec<*mut rd::rd_kafka_message_t>);

impl Taken<'_> {
    pub(super) fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        // SAFETY: every entry is a live message until drop.
        self.0.iter().map(|&m| Record(unsafe { &*m }))
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        for m in self.0.drain(..) {
            // SAFETY: each message is handed back once.
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

/// A record taken from a queue, or an error the client reports in its place.
pub(super) struct Record<'m>(&'m rd::rd_kafka_message_t);

impl<'m> Record<'m> {
    pub(super) fn error(&self) -> Option<String> {
        (self.0.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| {
            let code = RDKafkaErrorCode::from(self.0.err);
            // An error message carries its text as the payload.
            match self.payload() {
                Some(text) if !text.is_empty() => {
                    format!("{code}: {}", String::from_utf8_lossy(text))
                }
                _ => code.to_string(),
            }
        })
    }

    pub(super) fn partition(&self) -> i32 {
        self.0.partition
    }

    pub(super) fn offset(&self) -> i64 {
        self.0.offset
    }

    /// The topic's name, as bytes: compared, not shown.
    pub(super) fn topic(&self) -> &'m [u8] {
        if self.0.rkt.is_null() {
            return &[];
        }
        // SAFETY: the message holds a reference on its topic; its name is a C string.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(self.0.rkt)) }.to_bytes()
    }

    pub(super) fn payload(&self) -> Option<&'m [u8]> {
        bytes(self.0.payload, self.0.len)
    }

    pub(super) fn key(&self) -> Option<&'m [u8]> {
        bytes(self.0.key, self.0.key_len)
    }

    /// Milliseconds since the epoch, and Kafka's type of timestamp
    /// (0 create time, 1 log-append time; none: -1).
    pub(super) fn timestamp(&self) -> (Option<i64>, i32) {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message.
        let t = unsafe { rd::rd_kafka_message_timestamp(self.0, &mut kind) };
        match kind {
            // A record written without a time.
            _ if t == -1 => (None, -1),
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => (Some(t), 0),
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => (Some(t), 1),
            _ => (None, -1),
        }
    }

    /// The record's headers, in order: a name and a value, if any.
    pub(super) fn headers(&self) -> Option<Vec<(String, Option<Vec<u8>>)>> {
        let mut headers = std::ptr::null_mut();
        // SAFETY: a live message; the headers belong to it.
        let err = unsafe { rd::rd_kafka_message_headers(self.0, &mut headers) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
            return None;
        }
        let mut all = Vec::new();
        for i in 0.. {
            let (mut name, mut value, mut size): (*const c_char, *const c_void, usize) =
                (std::ptr::null(), std::ptr::null(), 0);
            // SAFETY: the message's headers, read by index until there are no more.
            let err = unsafe {
                rd::rd_kafka_header_get_all(headers, i, &mut name, &mut value, &mut size)
            };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: header names are C strings owned by the message.
            let name = unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            all.push((name, bytes(value.cast_mut(), size).map(<[u8]>::to_vec)));
        }
        Some(all)
    }
}

fn bytes<'m>(data: *mut c_void, len: usize) -> Option<&'m [u8]> {
    // SAFETY: librdkafka's pointer and length of a buffer the message owns.
    (!data.is_null()).then(|| unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) })
}
