//! Kafka reads shared by the queries of one engine.
//!
//! The dashboard runs three queries over one topic. Each keeps its own source
//! (its own offsets and checkpoint, as in Spark), but when several plan the
//! same ranges (as queries started together with the available-now trigger
//! do) the ranges are fetched and parsed once: the first reader starts the
//! read, and the others follow its parts as they come. A read is forgotten
//! once every reader of the group has taken it or moved past its offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::watch;

use super::Ranges;
use super::fetch::Rows;
use crate::error::{BrookError, Result};
use crate::source::SourceBatch;

/// The parts of one read so far, and how it ended.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) parts: Vec<SourceBatch>,
    pub(super) end: Option<std::result::Result<(), Arc<BrookError>>>,
}

#[derive(Default)]
pub struct SharedReads {
    inner: Mutex<Vec<Group>>,
}

impl std::fmt::Debug for SharedReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedReads")
    }
}

/// Sources that read the same topics of the same brokers into the same rows.
struct Group {
    identity: String,
    rows: Rows,
    /// By registration; `None` once the reader is gone.
    readers: Vec<Option<Reader>>,
    reads: Vec<Read>,
}

#[derive(Default)]
struct Reader {
    /// The highest offset this reader has started a range at, per topic and
    /// partition: it never asks for a range starting before it again.
    passed: BTreeMap<(String, i32), i64>,
}

struct Read {
    ranges: Ranges,
    progress: watch::Receiver<Progress>,
    taken: BTreeSet<usize>,
}

impl Group {
    fn same(&self, identity: &str, rows: &Rows) -> bool {
        self.identity == identity
            && match (&self.rows, rows) {
                (Rows::Decoded(a), Rows::Decoded(b)) => a == b,
                (Rows::Raw(a), Rows::Raw(b)) => a == b,
                _ => false,
            }
    }

    /// Forgets the reads that no reader can still take.
    fn prune(&mut self) {
        let Group { readers, reads, .. } = self;
        reads.retain(|read| {
            readers.iter().enumerate().any(|(id, r)| {
                r.as_ref()
                    .is_some_and(|r| !read.taken.contains(&id) && !r.moved_past(&read.ranges))
            })
        });
    }
}

impl Reader {
    fn moved_past(&self, ranges: &Ranges) -> bool {
        ranges.iter().any(|(topic, ps)| {
            ps.iter().any(|(p, range)| {
                self.passed
                    .get(&(topic.clone(), *p))
                    .is_some_and(|at| *at > range.from)
            })
        })
    }
}

/// A source's membership of a group of [`SharedReads`]; leaving on drop.
pub(super) struct Registration {
    reads: Arc<SharedReads>,
    group: usize,
    id: usize,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({}, {})", self.group, self.id)
    }
}

impl SharedReads {
    fn lock(&self) -> Result<MutexGuard<'_, Vec<Group>>> {
        self.inner
            .lock()
            .map_err(|_| BrookError::Plan("shared Kafka reads lock poisoned".into()))
    }

    /// Joins the readers of the sources named by `identity` whose records become `rows`.
    pub(super) fn register(self: &Arc<Self>, identity: &str, rows: &Rows) -> Result<Registration> {
        let mut groups = self.lock()?;
        let group = match groups.iter().position(|g| g.same(identity, rows)) {
            Some(i) => i,
            None => {
                groups.push(Group {
                    identity: identity.to_string(),
                    rows: rows.clone(),
                    readers: vec![],
                    reads: vec![],
                });
                groups.len() - 1
            }
        };
        let readers = &mut groups[group].readers;
        readers.push(Some(Reader::default()));
        Ok(Registration {
            reads: self.clone(),
            group,
            id: readers.len() - 1,
        })
    }
}

impl Registration {
    /// The parts of `ranges` as they are read: following a read that another
    /// reader of the group started, or one that `start` starts.
    pub(super) fn read(
        &self,
        ranges: &Ranges,
        start: impl FnOnce(watch::Sender<Progress>),
    ) -> Result<watch::Receiver<Progress>> {
        let mut groups = self.reads.lock()?;
        let group = &mut groups[self.group];
        if let Some(Some(me)) = group.readers.get_mut(self.id) {
            for (topic, ps) in ranges {
                for (p, range) in ps {
                    let at = me.passed.entry((topic.clone(), *p)).or_insert(range.from);
                    *at = (*at).max(range.from);
                }
            }
        }
        let found = group
            .reads
            .iter_mut()
            .find(|r| r.ranges == *ranges && !r.taken.contains(&self.id));
        let progress = match found {
            Some(read) => {
                read.taken.insert(self.id);
                read.progress.clone()
            }
            None => {
                let (tx, rx) = watch::channel(Progress::default());
                group.reads.push(Read {
                    ranges: ranges.clone(),
                    progress: rx.clone(),
                    taken: BTreeSet::from([self.id]),
                });
                start(tx);
                rx
            }
        };
        group.prune();
        Ok(progress)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Ok(mut groups) = self.reads.lock() else {
            return;
        };
        let group = &mut groups[self.group];
        group.readers[self.id] = None;
        group.prune();
    }
}

/// A read's parts in order, ending with its outcome.
pub(super) fn parts(
    progress: watch::Receiver<Progress>,
) -> BoxStream<'static, Result<SourceBatch>> {
    futures::stream::unfold(Some((progress, 0)), |state| async move {
        let (mut progress, i) = state?;
        let Ok(seen) = progress
            .wait_for(|p| p.parts.len() > i || p.end.is_some())
            .await
        else {
            let gone = BrookError::Plan("the Kafka read stopped before its end".into());
            return Some((Err(gone), None));
        };
        if let Some(part) = seen.parts.get(i) {
            let part = part.clone();
            drop(seen);
            return Some((Ok(part), Some((progress, i + 1))));
        }
        match &seen.end {
            Some(Err(e)) => Some((Err(BrookError::Shared(e.clone())), None)),
            _ => None,
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::Schema;

    use super::super::Range;
    use super::*;

    fn ranges(from: i64, until: i64) -> Ranges {
        Ranges::from([(
            "orders".to_string(),
            BTreeMap::from([(0, Range { from, until })]),
        )])
    }

    /// Registers a reader of the sources named `identity`.
    fn reader(reads: &Arc<SharedReads>, identity: &str) -> Registration {
        reads
            .register(identity, &Rows::Raw(Arc::new(Schema::empty())))
            .unwrap()
    }

    /// Reads `ranges`, saying whether this reader started the read.
    fn read(r: &Registration, ranges: &Ranges) -> (bool, watch::Receiver<Progress>) {
        let mut started = false;
        let progress = r.read(ranges, |tx| {
            started = true;
            tx.send_modify(|p| {
                p.parts.push(SourceBatch::default());
                p.end = Some(Ok(()));
            });
        });
        (started, progress.unwrap())
    }

    #[tokio::test]
    async fn readers_of_the_same_ranges_share_one_read_and_others_read_alone() {
        let reads = Arc::new(SharedReads::default());
        let (a, b, c) = (
            reader(&reads, "orders"),
            reader(&reads, "orders"),
            reader(&reads, "other"),
        );
        let (a_started, a_parts) = read(&a, &ranges(0, 10));
        let (b_started, b_parts) = read(&b, &ranges(0, 10));
        assert!(a_started && !b_started);
        assert!(a_parts.same_channel(&b_parts));
        let parts: Vec<_> = parts(b_parts).collect().await;
        assert_eq!(parts.len(), 1);
        // Another identity, or other ranges, read for themselves.
        assert!(read(&c, &ranges(0, 10)).0);
        assert!(read(&a, &ranges(10, 20)).0);
        // The same reader asking again reads again.
        assert!(read(&b, &ranges(0, 10)).0);
    }

    #[test]
    fn a_read_is_forgotten_once_every_reader_took_it_or_moved_past_it() {
        let reads = Arc::new(SharedReads::default());
        let (a, b) = (reader(&reads, "orders"), reader(&reads, "orders"));
        let kept = |reads: &Arc<SharedReads>| reads.lock().unwrap()[0].reads.len();
        read(&a, &ranges(0, 10));
        assert_eq!(kept(&reads), 1);
        // b planned other ranges from the same offset: it may still ask for a's.
        read(&b, &ranges(0, 12));
        assert_eq!(kept(&reads), 2);
        // b moved past offset 0: a's read is gone; a may still take b's.
        read(&b, &ranges(12, 20));
        assert_eq!(kept(&reads), 2);
        // a moved past offset 0 and b past 10: only b's read from 12 is kept.
        read(&a, &ranges(10, 20));
        assert_eq!(kept(&reads), 1);
        // A reader that leaves no longer holds reads.
        drop(a);
        assert_eq!(kept(&reads), 0);
        // A reader alone keeps nothing.
        read(&b, &ranges(20, 30));
        assert_eq!(kept(&reads), 0);
    }
}
