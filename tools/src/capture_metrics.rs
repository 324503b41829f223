//! `pgtrail capture --metrics-listen ADDR`: Prometheus metrics of a running capture, from its
//! progress (updated every second while metrics are on) and the archive's own gauges (what
//! `pgtrail status` reports; the same as `pgtrail serve`'s).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pgtrail_capture::Progress;
use pgtrail_serve::Exposition;

/// The capture's latest progress, shared with the metrics server.
#[derive(Clone)]
pub struct LatestProgress(Arc<Mutex<(Progress, Instant)>>);

impl LatestProgress {
    fn new() -> Self {
        LatestProgress(Arc::new(Mutex::new((Progress::default(), Instant::now()))))
    }

    pub fn update(&self, p: &Progress) {
        if let Ok(mut latest) = self.0.lock() {
            *latest = (p.clone(), Instant::now());
        }
    }

    fn render(&self, out: &mut Exposition) {
        let Ok(latest) = self.0.lock() else { return };
        let (p, at) = &*latest;
        let counters = [
            (
                "changes",
                "Changes stored durably by this process.",
                p.changes,
            ),
            (
                "transactions",
                "Transactions stored durably by this process (a table's snapshot counts as one).",
                p.transactions,
            ),
            (
                "duplicates_skipped",
                "Transactions the server sent again after a reconnect, already archived, skipped.",
                p.duplicates_skipped,
            ),
            (
                "log_commits",
                "Durable commits of the change log (group commits).",
                p.log_commits,
            ),
            (
                "snapshot_rows",
                "Rows read by initial snapshots and table syncs.",
                p.snapshot_rows,
            ),
            (
                "reconnects",
                "Replication sessions ended by a transient failure and reopened.",
                p.reconnects,
            ),
            (
                "compactions",
                "Background compaction runs that moved changes into segments.",
                p.compactions,
            ),
            (
                "compacted_changes",
                "Changes moved from the log into segments.",
                p.compacted,
            ),
            (
                "retention_purged_changes",
                "Changes whose values the retention policy (--retain) erased.",
                p.purged,
            ),
            (
                "retention_failures",
                "Retention runs that failed (each logged with its cause; the next run tries again).",
                p.retention_failures,
            ),
        ];
        for (name, help, value) in counters {
            out.counter(&format!("pgtrail_capture_{name}_total"), help, value as f64);
        }
        out.gauge(
            "pgtrail_capture_durable_lsn",
            "The position acknowledged to the slot: everything before it is durable (an LSN as a number).",
            p.durable.0 as f64,
        );
        out.gauge(
            "pgtrail_capture_lag_bytes",
            "The server's WAL end minus the durable position, in bytes.",
            p.lag_bytes as f64,
        );
        out.gauge(
            "pgtrail_capture_lag_seconds",
            "Age of the oldest commit received but not yet durable, in seconds (0 when caught up).",
            p.lag_seconds,
        );
        out.gauge(
            "pgtrail_capture_compaction_lock_longest_seconds",
            "The longest a compaction run of this process held the log's write lock to list its segments and trim the log: nothing was made durable or acknowledged meanwhile.",
            p.longest_compaction_lock_us as f64 / 1e6,
        );
        out.gauge(
            "pgtrail_capture_streaming",
            "1 while a replication session streams from the slot; 0 while connecting or waiting to reconnect.",
            f64::from(u8::from(p.streaming)),
        );
        out.gauge(
            "pgtrail_capture_progress_age_seconds",
            "Seconds since the capture last reported progress (each second while streaming): a stuck process shows here.",
            at.elapsed().as_secs_f64(),
        );
    }
}

/// Bind `listen` (so that a port in use fails before capture starts) and serve `/metrics`
/// there until `shutdown`.
pub async fn start(
    listen: SocketAddr,
    archive: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<LatestProgress> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("--metrics-listen {listen}: {e} (is another process using the port?)")
    })?;
    let local = listener.local_addr()?;
    let latest = LatestProgress::new();
    let source = latest.clone();
    tokio::spawn(async move {
        let more: pgtrail_serve::MoreMetrics = Arc::new(move |out| source.render(out));
        if let Err(e) = pgtrail_serve::serve_metrics(listener, archive, more, shutdown).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    });
    eprintln!("capture: metrics at http://{local}/metrics");
    Ok(latest)
}
