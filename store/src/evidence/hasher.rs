//! A compaction run's evidence leaves, hashed on a thread of their own.
//!
//! Compaction is one thread reading the log, building Arrow batches and encoding them into
//! Parquet. The leaves used to be hashed on a second thread while the first encoded the same
//! batch, and joined before the next batch: the hashing overlapped the encoding only, not the
//! reading and building of the next batch, so each batch cost the longer of the two and the
//! other core idled the rest of the time (compaction took 19-37 % longer with evidence). Here
//! one thread hashes every writer's batches in the order they were written, a few batches
//! behind, for the whole run.
//!
//! Order: there is one hashing thread and one queue, so each [`LeafStream`] receives its
//! batches' leaves in the order its writer wrote them (what the spill's merge requires).
//!
//! Failure: a batch whose leaves cannot be computed is kept as the run's error, and
//! [`LeafHasher::finish`] returns it; the compactor calls it before the commit that would
//! list the segments, so a run whose leaves are incomplete never commits (its segment files
//! are orphans that the next run removes, and its changes stay in the log). Nothing here is
//! durable and nothing needs to be.
//!
//! Memory: the queue holds at most [`QUEUED_BATCHES`] batches besides the one being hashed
//! (each at most the segment options' batch size; Arrow batches are shared, not copied).

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use datafusion::arrow::array::RecordBatch;

use super::leaf::{Epochs, Redactions, batch_leaves};
use super::spill::LeafStream;
use crate::SegmentError;
use crate::segment::SegmentContent;

/// Batches waiting to be hashed at most, over all writers.
pub const QUEUED_BATCHES: usize = 2;

/// One segment writer's part: what its leaves are computed from and where they go.
struct Writer {
    /// The file being written, named in errors.
    path: std::path::PathBuf,
    content: SegmentContent,
    epochs: Epochs,
    stream: LeafStream,
}

/// One batch to hash, and its writer.
struct Job {
    writer: Arc<Writer>,
    batch: RecordBatch,
}

/// The run's hashing thread. Dropping it without [`finish`](LeafHasher::finish) still waits
/// for the thread (so no thread of a failed run outlives it), discarding its result.
pub struct LeafHasher {
    queue: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<Result<(), SegmentError>>>,
}

/// What a segment writer holds to send its batches to the hashing thread.
pub struct LeafJobs {
    queue: SyncSender<Job>,
    writer: Arc<Writer>,
}

impl LeafHasher {
    pub fn start() -> Result<LeafHasher, SegmentError> {
        let (queue, jobs) = sync_channel(QUEUED_BATCHES);
        let worker = std::thread::Builder::new()
            .name("pgtrail-leaves".into())
            .spawn(move || hash_jobs(jobs))
            .map_err(|source| SegmentError::Io {
                path: "(a new thread)".into(),
                source,
            })?;
        Ok(LeafHasher {
            queue: Some(queue),
            worker: Some(worker),
        })
    }

    /// The handle the writer of the file at `path`, holding `content`, uses to have its
    /// batches' leaves written to `stream`.
    pub fn jobs(
        &self,
        path: &Path,
        content: &SegmentContent,
        epochs: Epochs,
        stream: LeafStream,
    ) -> LeafJobs {
        LeafJobs {
            queue: self
                .queue
                .clone()
                .expect("the queue is open until finish or drop"),
            writer: Arc::new(Writer {
                path: path.to_path_buf(),
                content: content.clone(),
                epochs,
                stream,
            }),
        }
    }

    /// Wait until every batch sent so far is hashed and its leaves written; the first error,
    /// if any batch had no well-defined leaves. Every writer must have finished (a writer
    /// still holding its [`LeafJobs`] keeps the queue open, and this would wait for it).
    pub fn finish(mut self) -> Result<(), SegmentError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), SegmentError> {
        drop(self.queue.take());
        match self.worker.take() {
            None => Ok(()),
            Some(worker) => worker
                .join()
                .unwrap_or(Err(SegmentError::LeafThread { what: "panicked" })),
        }
    }
}

impl Drop for LeafHasher {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

impl LeafJobs {
    /// Queue `batch`, just written to the writer's file, for hashing (waits while the queue
    /// is full: compaction then goes at the hashing's pace, with bounded memory).
    pub fn send(&self, batch: &RecordBatch) -> Result<(), SegmentError> {
        let job = Job {
            writer: self.writer.clone(),
            batch: batch.clone(),
        };
        // The thread stops early only by panicking (an error is kept, and the queue drained):
        // `finish` then reports the panic.
        self.queue
            .send(job)
            .map_err(|_| SegmentError::LeafThread { what: "stopped" })
    }
}

/// The thread: hash each batch in turn and write its leaves to its stream. After an error it
/// keeps taking batches (so that writers never block on a full queue) without hashing them.
fn hash_jobs(jobs: Receiver<Job>) -> Result<(), SegmentError> {
    let mut failed: Option<SegmentError> = None;
    // A change being compacted was never redacted.
    let redactions = Redactions::new();
    for job in jobs {
        if failed.is_some() {
            continue;
        }
        let w = &job.writer;
        let written = batch_leaves(&w.content, &job.batch, &w.epochs, &redactions)
            .map_err(|e| SegmentError::Corrupt {
                path: w.path.clone(),
                reason: format!("no evidence leaf for a row: {e}"),
            })
            .and_then(|leaves| w.stream.write(&leaves));
        if let Err(e) = written {
            failed = Some(e);
        }
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{
        ArrayRef, BinaryArray, BooleanArray, StringArray, TimestampMicrosecondArray, UInt32Array,
        UInt64Array,
    };

    use super::*;
    use crate::evidence::leaf::Leaf;
    use crate::evidence::spill::LeafSpill;
    use crate::{ChangeKey, Lsn};

    /// A batch of messages at `lsn` (seq 0..n); `garbled` stores a `content_text` that is not
    /// the content's text, which has no well-defined leaf.
    fn messages(lsn: u64, n: u32, garbled: bool) -> RecordBatch {
        let texts: Vec<String> = (0..n).map(|i| format!("message {lsn}/{i}")).collect();
        let stored: Vec<String> = texts
            .iter()
            .map(|t| if garbled { format!("{t}!") } else { t.clone() })
            .collect();
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("lsn", Arc::new(UInt64Array::from(vec![lsn; n as usize]))),
            (
                "seq",
                Arc::new(UInt32Array::from((0..n).collect::<Vec<_>>())),
            ),
            ("xid", Arc::new(UInt32Array::from(vec![7; n as usize]))),
            (
                "committed_at",
                Arc::new(TimestampMicrosecondArray::from(vec![1_000; n as usize])),
            ),
            (
                "transactional",
                Arc::new(BooleanArray::from(vec![true; n as usize])),
            ),
            (
                "prefix",
                Arc::new(StringArray::from(vec!["app"; n as usize])),
            ),
            (
                "content",
                Arc::new(BinaryArray::from_iter_values(
                    texts.iter().map(|t| t.as_bytes()),
                )),
            ),
            ("content_text", Arc::new(StringArray::from(stored))),
        ];
        RecordBatch::try_from_iter(columns).unwrap()
    }

    fn epochs() -> Epochs {
        Epochs::new(vec![(ChangeKey::new(Lsn(1), 0), [9; 32])])
    }

    /// A running hasher with one writer of messages, the file at `path`, and its spill.
    fn one_writer(dir: &Path, path: &str) -> (LeafSpill, LeafHasher, LeafJobs) {
        let spill = LeafSpill::create_in(dir).unwrap();
        let hasher = LeafHasher::start().unwrap();
        let jobs = hasher.jobs(
            Path::new(path),
            &SegmentContent::Messages,
            epochs(),
            spill.stream(),
        );
        (spill, hasher, jobs)
    }

    #[test]
    fn each_stream_gets_its_batches_leaves_in_order_as_hashed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let spill = LeafSpill::create_in(dir.path()).unwrap();
        let hasher = LeafHasher::start().unwrap();
        let content = SegmentContent::Messages;
        let a = hasher.jobs(Path::new("a"), &content, epochs(), spill.stream());
        let b = hasher.jobs(Path::new("b"), &content, epochs(), spill.stream());
        // Two writers' batches interleaved, more of them than the queue holds.
        let mut expected: Vec<Leaf> = Vec::new();
        for round in 0..(3 * QUEUED_BATCHES as u64) {
            for (jobs, lsn) in [(&a, 10 + 2 * round), (&b, 11 + 2 * round)] {
                let batch = messages(lsn, 3, false);
                expected
                    .extend(batch_leaves(&content, &batch, &epochs(), &Redactions::new()).unwrap());
                jobs.send(&batch).unwrap();
            }
        }
        drop((a, b));
        hasher.finish().unwrap();
        expected.sort_by_key(|l| l.key);
        let merged: Vec<Leaf> = spill.merged().unwrap().map(Result::unwrap).collect();
        assert_eq!(merged.len(), 6 * 3 * QUEUED_BATCHES);
        assert_eq!(merged, expected);
    }

    #[test]
    fn a_batch_without_leaves_fails_the_run_naming_its_file_and_never_blocks_the_writers() {
        let dir = tempfile::tempdir().unwrap();
        let (_spill, hasher, jobs) =
            one_writer(dir.path(), "segments/00000001_public.t.parquet.tmp");
        jobs.send(&messages(10, 2, true)).unwrap();
        // The thread keeps taking batches after the error (a full queue would block here).
        for lsn in 11..(11 + 3 * QUEUED_BATCHES as u64) {
            jobs.send(&messages(lsn, 2, false)).unwrap();
        }
        drop(jobs);
        let err = hasher.finish().unwrap_err().to_string();
        assert!(
            err.contains("00000001_public.t.parquet.tmp") && err.contains("content_text"),
            "{err}"
        );
    }

    #[test]
    fn dropping_the_hasher_of_a_failed_run_waits_for_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (spill, hasher, jobs) = one_writer(dir.path(), "x");
        jobs.send(&messages(10, 5, false)).unwrap();
        drop(jobs);
        drop(hasher);
        // Joined: the batch's leaves were written before the drop returned.
        assert_eq!(spill.len(), 5);
    }
}
