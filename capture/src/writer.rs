//! The log writer: one dedicated OS thread that owns the redb [`ChangeLog`].
//!
//! redb is synchronous and its commits block on fsync, so it never runs on a tokio worker.
//! The stream task sends [`LogOp`] batches over a bounded channel (the channel is also the
//! backpressure: a slow disk slows the stream, and PostgreSQL keeps the WAL). The thread
//! drains whatever is queued into one redb transaction (group commit) and publishes the
//! durable position on a watch channel; only that position is ever acknowledged upstream.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pgtrail_store::{
    ChangeLog, Gap, LogError, LogOp, Lsn, REPAIR_PATIENCE, SharedLog, SourceIdentity,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::CaptureError;

/// Ops applied per redb transaction at most (bounds the memory of one commit).
const MAX_OPS_PER_COMMIT: usize = 20_000;

/// Under load, durable commits start at most this often: the writer lets ops gather for the
/// rest of the interval instead of committing each small batch. A commit costs two fsyncs and
/// a rewrite of the pages it touched; at 2,700 commits in a 12 s drain they were a quarter of
/// the writer's CPU (perf, decode suite). It adds at most this much to commit-to-durable lag,
/// and nothing when commits are rarer (light load).
const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(5);

/// After this long with nothing to write, the writer completes the records it stored
/// ([`ChangeLog::complete_step`], see "Completion after acknowledgement" in the log's doc):
/// while a backlog drains, acknowledging comes first (PostgreSQL keeps the WAL until then);
/// an idle capture leaves every record complete, so that compaction, which trims no further,
/// covers every finished transaction. The steps yield to any message that arrives.
const IDLE_COMPLETION: Duration = Duration::from_millis(200);

/// Completion is not put off any longer than this, or for more changes than
/// [`COMPLETION_MAX_CHANGES`], however busy the writer is: past either, a step follows each
/// batch until completion has caught up (a short one, see [`OVERDUE_STEP_PER_CHANGE`]).
/// Records not completed are shown completed to readers (each read redoes the completion of
/// all of them) and wait in the log (compaction takes none), so these bound a reader's extra
/// work and the log's growth under a load the capture cannot keep up with; a backlog of the
/// decode suite's size (1,375,000 changes drained in about 10 s) stays within them.
const COMPLETION_MAX_DELAY: Duration = Duration::from_secs(60);
const COMPLETION_MAX_CHANGES: u64 = 2_000_000;

/// While completion is overdue, the step after a batch completes this many records per change
/// the batch stored, and at least [`OVERDUE_STEP_MIN`]: completion then gains on the stream by
/// three records a change at least, and the next acknowledgement waits for a step of about a
/// batch's size rather than a full one. Full steps (50,000 records) after every batch held
/// acknowledgements back 0.25-1.5 s each under pgbench (a commit-to-durable p99 of 5.2 s in
/// the overhead suite, 2026-12-07), while completion caught up from two million changes.
const OVERDUE_STEP_PER_CHANGE: usize = 4;
const OVERDUE_STEP_MIN: usize = 4_096;

/// The records an overdue step completes after a batch that stored `changes`.
fn overdue_step(changes: u64) -> usize {
    usize::try_from(changes)
        .unwrap_or(usize::MAX)
        .saturating_mul(OVERDUE_STEP_PER_CHANGE)
        .max(OVERDUE_STEP_MIN)
}

enum WriterMsg {
    Ops(Vec<LogOp>),
    /// Drop the open source transaction's partial writes (the stream broke mid-transaction;
    /// PostgreSQL sends it again after the reconnect).
    DiscardPartial(oneshot::Sender<Result<(), LogError>>),
    SetIdentity(SourceIdentity, oneshot::Sender<Result<(), LogError>>),
    RecordGap(Gap, oneshot::Sender<Result<(), LogError>>),
    /// Answered once everything sent before it is in a durable commit.
    Flush(oneshot::Sender<Result<(), LogError>>),
}

/// Counters the writer keeps, for progress lines.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub changes: AtomicU64,
    pub transactions: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    pub commits: AtomicU64,
}

/// The async side's handle on the writer thread.
pub struct WriterHandle {
    tx: mpsc::Sender<WriterMsg>,
    durable: watch::Receiver<Lsn>,
    join: Option<JoinHandle<Result<(), LogError>>>,
    pub stats: Arc<WriterStats>,
    identity: Option<SourceIdentity>,
    last_commit: Lsn,
    log: SharedLog,
    /// The writer thread, woken after each send: while records wait for completion it
    /// waits for messages with a timeout (a park), not in the channel's blocking receive.
    thread: std::thread::Thread,
}

impl WriterHandle {
    /// Open the log in `archive` on a new thread.
    pub fn start(archive: PathBuf) -> Result<WriterHandle, CaptureError> {
        let (tx, rx) = mpsc::channel::<WriterMsg>(16384);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
        let join = std::thread::Builder::new()
            .name("pgtrail-log-writer".into())
            .spawn(move || {
                let log = match ChangeLog::open_patiently(&archive, REPAIR_PATIENCE) {
                    Ok(log) => log,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let identity = log.source_identity();
                let _ = durable_tx.send(log.durable_position());
                let _ = ready_tx.send(identity.map(|i| (i, log.last_commit(), log.shared())));
                run_writer(log, rx, durable_tx, thread_stats)
            })
            .map_err(|e| CaptureError::Protocol(format!("cannot start the writer thread: {e}")))?;
        let thread = join.thread().clone();
        let (identity, last_commit, log) =
            ready_rx.recv().map_err(|_| CaptureError::WriterGone)??;
        Ok(WriterHandle {
            thread,
            tx,
            durable: durable_rx,
            join: Some(join),
            stats,
            identity,
            last_commit,
            log,
        })
    }

    /// The source identity stored in the archive when it was opened.
    pub fn stored_identity(&self) -> Option<&SourceIdentity> {
        self.identity.as_ref()
    }

    /// The log, shared with the background compactor.
    pub fn shared_log(&self) -> SharedLog {
        self.log.clone()
    }

    pub fn last_commit_at_open(&self) -> Lsn {
        self.last_commit
    }

    /// Queue ops for the log (waits while the queue is full).
    pub async fn send(&self, ops: Vec<LogOp>) -> Result<(), CaptureError> {
        if self.tx.send(WriterMsg::Ops(ops)).await.is_err() {
            return Err(self.writer_error());
        }
        self.thread.unpark();
        Ok(())
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), LogError>>) -> WriterMsg,
    ) -> Result<(), CaptureError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(make(tx)).await.is_err() {
            return Err(self.writer_error());
        }
        self.thread.unpark();
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(self.writer_error()),
        }
    }

    pub async fn discard_partial(&self) -> Result<(), CaptureError> {
        self.call(WriterMsg::DiscardPartial).await
    }

    pub async fn set_identity(&mut self, identity: SourceIdentity) -> Result<(), CaptureError> {
        self.call(|tx| WriterMsg::SetIdentity(identity.clone(), tx))
            .await?;
        self.identity = Some(identity);
        Ok(())
    }

    pub async fn record_gap(&self, gap: Gap) -> Result<(), CaptureError> {
        self.call(|tx| WriterMsg::RecordGap(gap, tx)).await
    }

    /// Wait until everything sent so far is in a durable commit (records outside source
    /// transactions included, which the durable position does not show).
    pub async fn flush(&self) -> Result<(), CaptureError> {
        self.call(WriterMsg::Flush).await
    }

    /// The position made durable so far (safe to acknowledge).
    pub fn durable(&self) -> Lsn {
        *self.durable.borrow()
    }

    /// A receiver that sees every new durable position.
    pub fn durable_watch(&self) -> watch::Receiver<Lsn> {
        self.durable.clone()
    }

    /// Wait until the durable position reaches `target`.
    pub async fn wait_durable(&self, target: Lsn) -> Result<(), CaptureError> {
        let mut rx = self.durable.clone();
        loop {
            if *rx.borrow_and_update() >= target {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err(self.writer_error());
            }
        }
    }

    /// Stop the thread after it has applied everything queued, and return its error if any.
    pub fn finish(mut self) -> Result<(), CaptureError> {
        drop(self.tx);
        self.thread.unpark();
        match self.join.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(_)) => Err(CaptureError::WriterGone),
        }
    }

    fn writer_error(&self) -> CaptureError {
        CaptureError::WriterGone
    }

    /// After a send failed: wait for the thread and return the error that stopped it.
    pub fn into_error(self) -> CaptureError {
        match self.finish() {
            Err(e) => e,
            Ok(()) => CaptureError::WriterGone,
        }
    }
}

fn run_writer(
    mut log: ChangeLog,
    mut rx: mpsc::Receiver<WriterMsg>,
    durable_tx: watch::Sender<Lsn>,
    stats: Arc<WriterStats>,
) -> Result<(), LogError> {
    let mut batch: Vec<LogOp> = Vec::new();
    let mut last_commit = Instant::now() - MIN_COMMIT_INTERVAL;
    while let Some(first) = next_message(&mut log, &mut rx)? {
        let mut control = None;
        match first {
            WriterMsg::Ops(ops) => batch.extend(ops),
            other => control = Some(other),
        }
        // Group commit: take whatever else is already queued; under load, also what arrives
        // before the commit interval is up.
        while control.is_none() && batch.len() < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(WriterMsg::Ops(ops)) => batch.extend(ops),
                Ok(other) => control = Some(other),
                Err(mpsc::error::TryRecvError::Empty) => {
                    let since = last_commit.elapsed();
                    if since >= MIN_COMMIT_INTERVAL {
                        break;
                    }
                    std::thread::sleep((MIN_COMMIT_INTERVAL - since).min(Duration::from_millis(1)));
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        if !batch.is_empty() {
            last_commit = Instant::now();
            let stored = write_batch(&mut log, std::mem::take(&mut batch), &durable_tx, &stats)?;
            if log.completion_behind().is_some_and(|(since, changes)| {
                since.elapsed() >= COMPLETION_MAX_DELAY || changes >= COMPLETION_MAX_CHANGES
            }) {
                log.complete_step_of(overdue_step(stored))?;
            }
        }
        match control {
            None => {}
            Some(WriterMsg::Ops(ops)) => batch.extend(ops),
            Some(WriterMsg::DiscardPartial(reply)) => {
                // The log's crash recovery, run in place, removes exactly the partial
                // transaction (nothing of it was acknowledged).
                if log.in_transaction()
                    && let Err(e) = log.discard_partial()
                {
                    let _ = reply.send(Err(LogError::Corrupt {
                        what: "discard".into(),
                        source: e.to_string().into(),
                    }));
                    return Err(e);
                }
                let _ = reply.send(Ok(()));
            }
            Some(WriterMsg::SetIdentity(identity, reply)) => {
                let _ = reply.send(log.set_source_identity(&identity));
            }
            Some(WriterMsg::RecordGap(gap, reply)) => {
                let _ = reply.send(log.record_gap(&gap));
            }
            // The batch before it was committed just above.
            Some(WriterMsg::Flush(reply)) => {
                let _ = reply.send(Ok(()));
            }
        }
    }
    // Stopping: leave every record complete, so that compaction covers them all. (Not needed
    // for safety: the next writer or a `pgtrail compact` completes what is left.)
    log.complete_all()
}

/// The next message for the writer, or `None` when every sender is gone. While records wait
/// for completion, a wait longer than [`IDLE_COMPLETION`] completes them, a step at a time,
/// until a message arrives; the senders unpark this thread after each send, so a message is
/// seen as soon as it is queued (after the step under way).
fn next_message(
    log: &mut ChangeLog,
    rx: &mut mpsc::Receiver<WriterMsg>,
) -> Result<Option<WriterMsg>, LogError> {
    if log.completion_behind().is_some() {
        let idle_from = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(message) => return Ok(Some(message)),
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(None),
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            let idle = idle_from.elapsed();
            if idle >= IDLE_COMPLETION {
                if log.complete_step()? {
                    break;
                }
                continue;
            }
            std::thread::park_timeout(IDLE_COMPLETION - idle);
        }
    }
    Ok(rx.blocking_recv())
}

/// Apply a batch in one durable commit (group commit) and publish the durable position: the
/// end of the last transaction the batch finished. A transaction still streaming may be partly
/// in the commit; it is not acknowledged until its own Commit is stored. Returns how many
/// changes the batch stored.
fn write_batch(
    log: &mut ChangeLog,
    ops: Vec<LogOp>,
    durable_tx: &watch::Sender<Lsn>,
    stats: &WriterStats,
) -> Result<u64, LogError> {
    let applied = log.apply(ops)?;
    stats.changes.fetch_add(applied.changes, Ordering::Relaxed);
    stats
        .transactions
        .fetch_add(applied.transactions, Ordering::Relaxed);
    stats
        .duplicates_skipped
        .fetch_add(applied.duplicates_skipped, Ordering::Relaxed);
    stats.commits.fetch_add(1, Ordering::Relaxed);
    // Published only after the durable commit returned: this is what may be acked.
    let _ = durable_tx.send(log.durable_position());
    Ok(applied.changes)
}
