//! The capture loop: one session after another until shutdown, with backoff between
//! sessions that end in a transient failure; a setup error or a gap ends it.
//!
//! A session ([`crate::session`]) connects and decides where the archive continues; the
//! stream ([`crate::stream`]) moves changes into the writer and acknowledges only what the
//! writer made durable. A session may be abandoned at any await: nothing past the durable
//! position was acknowledged, so the server sends it again to the next one.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgtrail_store::Lsn;

use crate::compaction::{BackgroundCompactor, CompactionPolicy, CompactorCounters};
use crate::error::CaptureError;
use crate::session::Session;
use crate::source::SourceConfig;
use crate::writer::WriterHandle;

/// The default of [`CaptureConfig::stream_timeout`].
pub const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the catalog is looked at for tables that joined while capture runs: a query of
/// `pg_class` and the publication's tables, cheap beside the stream.
pub const DEFAULT_CATALOG_INTERVAL: Duration = Duration::from_secs(5);

/// A validated capture configuration.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub source: SourceConfig,
    pub archive: PathBuf,
    pub slot: String,
    pub publication: String,
    /// Tables as PostgreSQL would parse them; empty means every eligible table.
    pub tables: Vec<String>,
    /// After a gap: record it, create a new slot and take a new snapshot into this archive.
    pub resnapshot: bool,
    pub progress_interval: Duration,
    /// How long the replication stream may stay silent before the source is asked whether
    /// the connection still works (see [`crate::liveness`]); also the limit for connecting.
    pub stream_timeout: Duration,
    /// Stop (cleanly) once the durable position reaches this LSN; for tests and tools.
    pub stop_at: Option<Lsn>,
    /// How often the catalog is looked at for tables that joined (created, given a key, added
    /// to the publication) while capture runs; see `table_sync`.
    pub catalog_interval: Duration,
    /// Compact in the background while capturing; `None` leaves everything in the log.
    pub compaction: Option<CompactionPolicy>,
    /// Called with each new durable position as soon as the stream learns of it (for
    /// benchmarks measuring commit-to-durable latency; `None` in normal use).
    pub durable_observer: Option<DurableObserver>,
}

/// See [`CaptureConfig::durable_observer`].
#[derive(Clone)]
pub struct DurableObserver(pub std::sync::Arc<dyn Fn(Lsn) + Send + Sync>);

impl std::fmt::Debug for DurableObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DurableObserver")
    }
}

/// Figures of a running or finished capture.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub changes: u64,
    pub transactions: u64,
    pub duplicates_skipped: u64,
    /// Durable redb commits of the log (each is two fsyncs, two-phase; group commit keeps this
    /// far below the number of transactions under load).
    pub log_commits: u64,
    pub changes_per_sec: f64,
    pub transactions_per_sec: f64,
    /// Server WAL end minus the durable position, in bytes.
    pub lag_bytes: u64,
    /// Age of the oldest commit received but not yet durable, in seconds.
    pub lag_seconds: f64,
    pub durable: Lsn,
    pub reconnects: u64,
    pub snapshot_rows: u64,
    /// Changes moved from the log into segments by the background compactor.
    pub compacted: u64,
    /// Compaction runs that wrote segments.
    pub compactions: u64,
    /// The longest a compaction run held the log's write lock to list its segments and trim
    /// the log, in microseconds: nothing was made durable (nor acknowledged) meanwhile.
    pub longest_compaction_lock_us: u64,
    /// Changes the retention policy's purges redacted (`--retain`).
    pub purged: u64,
    /// Retention runs that failed (each logged; the capture goes on).
    pub retention_failures: u64,
    /// Whether a replication session is streaming from the slot now (false while connecting
    /// or waiting to reconnect).
    pub streaming: bool,
    /// How the replication connection is protected ("TLSv1.3 ..., server verified ...").
    pub security: String,
}

impl Progress {
    fn count_compactions(&mut self, counters: &CompactorCounters) {
        self.compacted = counters.compacted.load(Ordering::Relaxed);
        self.compactions = counters.runs.load(Ordering::Relaxed);
        self.longest_compaction_lock_us = counters.longest_lock_us.load(Ordering::Relaxed);
        self.purged = counters.purged.load(Ordering::Relaxed);
        self.retention_failures = counters.retention_failures.load(Ordering::Relaxed);
    }
}

/// What [`run`] did before it stopped.
pub type CaptureSummary = Progress;

/// Run capture until `shutdown` completes (or `stop_at` is reached). Transient failures
/// reconnect with backoff; setup errors and gaps return an error.
pub async fn run(
    config: CaptureConfig,
    shutdown: impl Future<Output = ()>,
    mut on_progress: impl FnMut(&Progress),
) -> Result<CaptureSummary, CaptureError> {
    let archive = config.archive.clone();
    let mut writer = tokio::task::spawn_blocking(move || WriterHandle::start(archive))
        .await
        .map_err(|_| CaptureError::WriterGone)??;
    tokio::pin!(shutdown);
    let mut summary = Progress::default();
    let mut backoff = Duration::from_millis(250);
    let mut compactor = config.compaction.clone().map(|policy| {
        BackgroundCompactor::start(writer.shared_log(), config.archive.clone(), policy)
    });
    let counters = compactor.as_ref().map(|c| c.counters.clone());
    let mut on_progress = move |p: &Progress| {
        let mut p = p.clone();
        if let Some(c) = &counters {
            p.count_compactions(c);
        }
        on_progress(&p)
    };
    // Sessions tried: before the first has connected, a source that cannot be reached is a
    // configuration error (wrong URL, server down), reported at once rather than retried;
    // a server that answers that it is starting up or shutting down is waited for.
    let mut attempts = 0u32;
    // Whether a session of this process has connected: after that, a connection refused or
    // cut while the server restarts (a table copy's new connection, say) is a reconnect, even
    // in the first session.
    let mut connected = false;
    // The walsender of this process's last session (see `Session::own_walsender`).
    let mut own_walsender: Option<i32> = None;
    loop {
        attempts += 1;
        let started = Instant::now();
        let result = {
            let session = async {
                let mut session =
                    Session::open(&config, &mut writer, &mut summary, &mut own_walsender).await?;
                connected = true;
                let client = session.begin().await?;
                session
                    .stream(client, &mut shutdown, &mut on_progress)
                    .await
            };
            match compactor.as_mut() {
                // A failed compactor stops the capture; dropping the session mid-stream is safe
                // because nothing past the durable position was acknowledged.
                Some(c) => tokio::select! {
                    r = session => r,
                    _ = c.failed() => Err(CaptureError::Compaction(c.take_failure().map(Box::new))),
                },
                None => session.await,
            }
        };
        match result {
            Ok(()) => break,
            Err(CaptureError::WriterGone) => {
                let failure = writer.finish().err().unwrap_or(CaptureError::WriterGone);
                return Err(stop_after_failure(failure, None, compactor));
            }
            Err(CaptureError::Compaction(failure)) => {
                let failure = CaptureError::Compaction(failure);
                return Err(stop_after_failure(failure, Some(writer), compactor));
            }
            Err(e)
                if e.is_transient()
                    && (attempts > 1
                        || connected
                        || e.is_server_not_ready()
                        || !matches!(e, CaptureError::Connect { .. })) =>
            {
                summary.reconnects += 1;
                summary.streaming = false;
                on_progress(&summary);
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(250);
                }
                let retry_in_ms = backoff.as_millis() as u64;
                if e.is_server_not_ready() {
                    tracing::warn!(error = %error_chain(&e), retry_in_ms, "the source is starting up, shutting down or in recovery; waiting for it");
                } else {
                    tracing::warn!(error = %error_chain(&e), retry_in_ms, "capture interrupted; reconnecting");
                }
                writer.discard_partial().await?;
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(stop_after_failure(e, Some(writer), compactor)),
        }
    }
    summary.streaming = false;
    if let Some(c) = compactor {
        summary.count_compactions(&c.counters);
        if let Some(e) = c.stop() {
            writer.finish()?;
            return Err(CaptureError::Compaction(Some(Box::new(e))));
        }
    }
    summary.durable = writer.durable();
    fill_stats(&mut summary, &writer);
    writer.finish()?;
    Ok(summary)
}

pub(crate) fn fill_stats(p: &mut Progress, writer: &WriterHandle) {
    p.changes = writer.stats.changes.load(Ordering::Relaxed);
    p.transactions = writer.stats.transactions.load(Ordering::Relaxed);
    p.duplicates_skipped = writer.stats.duplicates_skipped.load(Ordering::Relaxed);
    p.log_commits = writer.stats.commits.load(Ordering::Relaxed);
}

/// Stop the writer (it commits what is queued, or fails) and the compactor (its run in
/// progress ends first) after `failure`, and return the error that carries the cause.
///
/// The compactor and the writer share the log's storage: when a write of one fails (a full
/// disk), redb fails every later write of either with only "Previous I/O error occurred", and
/// the one that failed first may be either. The other errors are logged.
fn stop_after_failure(
    failure: CaptureError,
    writer: Option<WriterHandle>,
    compactor: Option<BackgroundCompactor>,
) -> CaptureError {
    let mut errors = vec![failure];
    if let Some(Err(e)) = writer.map(WriterHandle::finish) {
        errors.push(e);
    }
    if let Some(e) = compactor.and_then(BackgroundCompactor::stop) {
        errors.push(CaptureError::Compaction(Some(Box::new(e))));
    }
    let cause = errors
        .iter()
        .position(|e| !error_chain(e).contains(REDB_PREVIOUS_IO))
        .unwrap_or(0);
    let cause = errors.remove(cause);
    for other in errors {
        tracing::error!(error = %error_chain(&other), "the change log failed too");
    }
    cause
}

/// What redb says of every write after its storage failed once (`StorageError::PreviousIo`):
/// the cause is in the error of the write that failed first.
const REDB_PREVIOUS_IO: &str = "Previous I/O error occurred";

/// `error: cause: cause` on one line.
pub use pgtrail_store::error_chain;
