//! Kafka reads shared by the queries of one engine.
//!
//! The dashboard runs three queries over one topic. Each keeps its own source
//! (its own offsets and checkpoint, as in Spark), but when several plan the
//! same ranges (as queries started together with the available-now trigger
//! do) the ranges are fetched and parsed once: the first reader starts the
//! read, and the others follow its parts as they come. A read is kept only
//! while another reader stands at its first offsets: readers that have moved
//! on, or lag behind, read for themselves, so nothing piles up.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::watch;

use super::fetch::Rows;
use super::{Positions, Ranges};
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

/// Where a reader will start its next range, per topic and partition; not
/// known until its source has started (it may then take any read).
#[derive(Default)]
struct Reader {
    next: Option<Positions>,
}

struct Read {
    ranges: Ranges,
    progress: watch::Receiver<Progress>,
    taken: BTreeSet<usize>,
}

impl Group {
    /// Forgets the reads that no reader is about to take, and those that failed
    /// (a later reader tries for itself).
    fn prune(&mut self) {
        let Group { readers, reads, .. } = self;
        reads.retain(|read| {
            !read.failed()
                && readers.iter().enumerate().any(|(id, r)| {
                    r.as_ref()
                        .is_some_and(|r| !read.taken.contains(&id) && r.starts(&read.ranges))
                })
        });
    }
}

impl Reader {
    /// Whether `ranges` start where this reader reads next, in every partition.
    fn starts(&self, ranges: &Ranges) -> bool {
        let Some(next) = &self.next else {
            return true;
        };
        ranges.iter().all(|(topic, ps)| {
            ps.iter()
                .all(|(p, range)| next.get(topic).and_then(|n| n.get(p)) == Some(&range.from))
        })
    }
}

impl Read {
    fn failed(&self) -> bool {
        matches!(self.progress.borrow().end, Some(Err(_)))
    }
}

/// A source's membership of a group of [`SharedReads`]; leaving on drop.
pub(super) struct Registration {
    reads: Arc<SharedReads>,
    group: usize,
    id: usize,
}

impl SharedReads {
    fn lock(&self) -> Result<MutexGuard<'_, Vec<Group>>> {
        self.inner
            .lock()
            .map_err(|_| BrookError::poisoned("shared Kafka reads"))
    }

    /// Joins the readers of the sources named by `identity` whose records become `rows`.
    pub(super) fn register(self: &Arc<Self>, identity: &str, rows: &Rows) -> Result<Registration> {
        let mut groups = self.lock()?;
        let group = match groups
            .iter()
            .position(|g| g.identity == identity && g.rows == *rows)
        {
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
        let id = match readers.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                readers.push(None);
                readers.len() - 1
            }
        };
        readers[id] = Some(Reader::default());
        Ok(Registration {
            reads: self.clone(),
            group,
            id,
        })
    }
}

impl Registration {
    /// Tells where the reader reads next (as it starts, or resumes from a checkpoint).
    pub(super) fn at(&self, positions: &Positions) -> Result<()> {
        let mut groups = self.reads.lock()?;
        let group = &mut groups[self.group];
        if let Some(Some(me)) = group.readers.get_mut(self.id) {
            me.next = Some(positions.clone());
        }
        group.prune();
        Ok(())
    }

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
            let next = me.next.get_or_insert_with(Positions::new);
            for (topic, ps) in ranges {
                let next = next.entry(topic.clone()).or_default();
                for (p, range) in ps {
                    next.insert(*p, range.until);
                }
            }
        }
        let found = group
            .reads
            .iter_mut()
            .find(|r| r.ranges == *ranges && !r.taken.contains(&self.id) && !r.failed());
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
        // The slot may go to a new reader, which has taken nothing.
        for read in &mut group.reads {
            read.taken.remove(&self.id);
        }
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
            let gone = BrookError::internal("the Kafka read stopped before its end");
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
    use std::collections::BTreeMap;

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

    fn at(r: &Registration, offset: i64) {
        r.at(&Positions::from([(
            "orders".to_string(),
            BTreeMap::from([(0, offset)]),
        )]))
        .unwrap();
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
    fn a_read_is_kept_only_while_another_reader_stands_at_its_start() {
        let reads = Arc::new(SharedReads::default());
        let (a, b) = (reader(&reads, "orders"), reader(&reads, "orders"));
        let kept = |reads: &Arc<SharedReads>| reads.lock().unwrap()[0].reads.len();
        at(&a, 0);
        at(&b, 0);
        read(&a, &ranges(0, 10));
        assert_eq!(kept(&reads), 1);
        // b planned other ranges: neither can take the other's read.
        read(&b, &ranges(0, 12));
        assert_eq!(kept(&reads), 0);
        // A reader that lags behind does not keep the reads ahead of it.
        read(&a, &ranges(10, 20));
        assert_eq!(kept(&reads), 0);
        // A reader not started yet may take any read, until it says where it starts.
        let c = reader(&reads, "orders");
        read(&b, &ranges(12, 20));
        assert_eq!(kept(&reads), 1);
        at(&c, 0);
        assert_eq!(kept(&reads), 0);
        // A reader that leaves no longer holds reads.
        at(&a, 20);
        read(&b, &ranges(20, 30));
        assert_eq!(kept(&reads), 1);
        drop((a, c));
        assert_eq!(kept(&reads), 0);
    }

    #[test]
    fn a_failed_read_is_not_handed_on_and_a_reused_slot_has_taken_nothing() {
        let reads = Arc::new(SharedReads::default());
        let (a, b) = (reader(&reads, "orders"), reader(&reads, "orders"));
        let mut sender = None;
        a.read(&ranges(0, 10), |tx| sender = Some(tx)).unwrap();
        let Some(tx) = sender else {
            panic!("the first reader starts the read");
        };
        tx.send_modify(|p| p.end = Some(Err(Arc::new(BrookError::Cancelled("down".into())))));
        // The next reader tries for itself.
        let (b_started, _) = read(&b, &ranges(0, 10));
        assert!(b_started);

        // A read that a took, kept for d, is for the new reader in a's slot to take too.
        let reads = Arc::new(SharedReads::default());
        let (a, b, _d) = (
            reader(&reads, "orders"),
            reader(&reads, "orders"),
            reader(&reads, "orders"),
        );
        read(&a, &ranges(0, 10));
        assert!(!read(&b, &ranges(0, 10)).0);
        drop(a);
        let c = reader(&reads, "orders");
        assert_eq!((c.id, read(&c, &ranges(0, 10)).0), (0, false));
    }
}
