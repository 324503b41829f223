//! Background compaction inside `pgtrail capture`: a dedicated OS thread that turns the log
//! into segments when it holds enough changes or its oldest change is old enough.
//!
//! It never stalls the replication stream: Parquet work runs on this thread, and the only
//! contact with the writer is redb's write lock for the one short transaction that lists new
//! segments and trims the log. Its failure stops the capture with the error (a storage error
//! is fatal for the process), and nothing is lost: the log keeps every change that was not
//! listed in a committed manifest.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pgtrail_store::evidence::requests;
use pgtrail_store::evidence::retention::{self, RetentionPolicy};
use pgtrail_store::{CompactError, CompactOptions, Compactor, LogReader, SharedLog};

/// When the capture compacts.
#[derive(Clone, Debug)]
pub struct CompactionPolicy {
    pub options: CompactOptions,
    /// Compact once the log holds at least this many changes ...
    pub min_changes: u64,
    /// ... or once its oldest change committed this long ago.
    pub max_age: Duration,
    /// How often the thresholds are checked.
    pub check_every: Duration,
    /// Purge history older than each rule's age, between compactions (see
    /// [`pgtrail_store::evidence::retention`]).
    pub retention: Option<RetentionPolicy>,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            options: CompactOptions::default(),
            min_changes: 200_000,
            max_age: Duration::from_secs(300),
            check_every: Duration::from_secs(1),
            retention: None,
        }
    }
}

/// What the compactor thread of this process has done, read by the capture's progress.
#[derive(Debug, Default)]
pub struct CompactorCounters {
    /// Changes moved into segments.
    pub compacted: AtomicU64,
    /// Compaction runs that moved changes.
    pub runs: AtomicU64,
    /// The longest time one run held the log's write lock to list its segments and trim the
    /// log, in microseconds (the writer could not acknowledge meanwhile).
    pub longest_lock_us: AtomicU64,
    /// Changes the retention policy's purges redacted.
    pub purged: AtomicU64,
    /// Retention runs that failed (each is logged; the capture goes on).
    pub retention_failures: AtomicU64,
}

/// The running compactor thread.
pub struct BackgroundCompactor {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    failure: Arc<Mutex<Option<CompactError>>>,
    failed: tokio::sync::watch::Receiver<bool>,
    pub counters: Arc<CompactorCounters>,
}

impl BackgroundCompactor {
    pub fn start(
        log: SharedLog,
        archive: PathBuf,
        policy: CompactionPolicy,
    ) -> BackgroundCompactor {
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let counters: Arc<CompactorCounters> = Default::default();
        let (failed_tx, failed) = tokio::sync::watch::channel(false);
        let (t_stop, t_failure, t_counters) = (stop.clone(), failure.clone(), counters.clone());
        let join = std::thread::Builder::new()
            .name("pgtrail-compactor".into())
            .spawn(move || {
                let compactor = Compactor::new(log.clone(), &archive, policy.options.clone());
                // Files a crash left mid-compaction go at start, not at the first compaction.
                let mut result = compactor.remove_orphans().map(|_| ());
                let mut last_check = Instant::now() - policy.check_every;
                // The first retention run comes with the first check (a capture restarted more
                // often than the interval still purges), the next ones an interval apart.
                let mut last_retention: Option<Instant> = None;
                while !t_stop.load(Ordering::Relaxed) {
                    if let Err(e) = std::mem::replace(&mut result, Ok(())) {
                        tracing::error!(error = %e, "compaction failed; stopping capture");
                        if let Ok(mut slot) = t_failure.lock() {
                            *slot = Some(e);
                        }
                        let _ = failed_tx.send(true);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    if last_check.elapsed() < policy.check_every {
                        continue;
                    }
                    last_check = Instant::now();
                    let outcome = due(&log, &policy)
                        .map_err(CompactError::from)
                        .and_then(|due| {
                            if due {
                                compactor.run().map(Some)
                            } else {
                                Ok(None)
                            }
                        });
                    result = outcome.map(|report| {
                        if let Some(report) = report.filter(|r| r.changes > 0) {
                            t_counters
                                .compacted
                                .fetch_add(report.changes, Ordering::Relaxed);
                            t_counters.runs.fetch_add(1, Ordering::Relaxed);
                            t_counters
                                .longest_lock_us
                                .fetch_max(report.lock_us, Ordering::Relaxed);
                        }
                    });
                    // Holds and erasures asked for while the capture holds the archive
                    // (`pgtrail hold`, `redact`, `purge`), before a retention run: a hold
                    // placed now counts for that run.
                    if result.is_ok()
                        && let Err(e) = requests::serve(&compactor)
                    {
                        tracing::error!(error = %e, "a request could not be carried out; it stays taken and is tried again");
                    }
                    if let Some(retention) = &policy.retention
                        && result.is_ok()
                        && last_retention.is_none_or(|t| t.elapsed() >= retention.every)
                    {
                        last_retention = Some(Instant::now());
                        apply_retention(&compactor, &log, retention, &t_counters);
                    }
                }
                // Stopped while a run failed: the failure is kept for `stop`, which reports it
                // (it may hold the cause of the writer's failure).
                if let Err(e) = result {
                    tracing::error!(error = %e, "compaction failed");
                    if let Ok(mut slot) = t_failure.lock() {
                        *slot = Some(e);
                    }
                }
            })
            .ok();
        BackgroundCompactor {
            stop,
            join,
            failure,
            failed,
            counters,
        }
    }

    /// Completes when the compactor has failed.
    pub async fn failed(&mut self) {
        while !*self.failed.borrow_and_update() {
            if self.failed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Take the failure, if any.
    pub fn take_failure(&self) -> Option<CompactError> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    /// Stop the thread (after the run in progress, if any, finishes) and return its failure,
    /// if it failed and the failure was not taken yet.
    #[must_use = "a compaction failure must be reported"]
    pub fn stop(mut self) -> Option<CompactError> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        self.take_failure()
    }
}

/// Apply the retention policy once, saying what it did, and count the changes it redacted or
/// the failed run in `counters`.
///
/// A failure is logged and does not stop the capture: stopping would leave the slot to hold
/// WAL on the source, and a purge that failed part way is as safe as one that crashed (each
/// segment's rewrite is one commit, see `Compactor::redact`); the next run tries again.
fn apply_retention(
    compactor: &Compactor,
    log: &SharedLog,
    policy: &RetentionPolicy,
    counters: &CompactorCounters,
) {
    match retention::apply(compactor, log, policy, pgtrail_store::now_us()) {
        Ok(outcomes) => {
            for o in outcomes {
                counters.purged.fetch_add(o.redacted, Ordering::Relaxed);
                if o.redacted > 0 || o.counts.held > 0 {
                    tracing::info!(
                        rule = %o.rule,
                        before = %o.before,
                        erased = o.counts.erased,
                        kept_state = o.counts.kept_state,
                        held = o.counts.held,
                        "retention: purged the history before {} (changes under a legal hold left whole)",
                        o.before
                    );
                }
            }
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "retention: the purge failed; nothing it had not finished was erased, capture goes on and the next run tries again"
            );
            counters.retention_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn due(log: &SharedLog, policy: &CompactionPolicy) -> Result<bool, pgtrail_store::LogError> {
    let (count, oldest) = LogReader::of_shared(log)?.log_backlog()?;
    let old =
        oldest.is_some_and(|t| pgtrail_store::now_us() - t >= policy.max_age.as_micros() as i64);
    Ok(count >= policy.min_changes || (count > 0 && old))
}
