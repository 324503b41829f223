//! `GET /metrics`: Prometheus text format: the server's requests (count and seconds per
//! endpoint and status class), open streams, and the archive as a fresh cut sees it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use pgtrail_store::{ArchiveStatus, Lsn};

use crate::AppState;
use crate::error::ApiError;

#[derive(Default)]
pub struct Metrics {
    pub streams_open: AtomicU64,
    requests: Mutex<RequestCounts>,
}

/// (route, status class) → what its requests took.
type RequestCounts = BTreeMap<(String, &'static str), Latencies>;

/// Upper bounds of the latency histogram's buckets, in seconds (`+Inf` is the count).
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Default)]
struct Latencies {
    count: u64,
    seconds: f64,
    /// Requests that took at most `BUCKETS[i]` (cumulative, as Prometheus counts them).
    within: [u64; BUCKETS.len()],
}

/// Count each request by the route it matched (never the raw path: table names and keys stay
/// out of the metrics, and their number stays bounded).
pub async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |m| m.as_str())
        .to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let class = match response.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Ok(mut m) = state.metrics.requests.lock() {
        let e = m.entry((route, class)).or_default();
        e.count += 1;
        e.seconds += seconds;
        for (bound, n) in BUCKETS.iter().zip(e.within.iter_mut()) {
            if seconds <= *bound {
                *n += 1;
            }
        }
    }
    response
}

/// Prometheus text format (0.0.4), written a metric at a time.
#[derive(Default)]
pub struct Exposition(String);

impl Exposition {
    /// A metric of one value; `kind` is `gauge` or `counter` (whose name ends in `_total`).
    pub fn metric(&mut self, kind: &str, name: &str, help: &str, value: f64) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.metric("gauge", name, help, value);
    }

    pub fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.metric("counter", name, help, value);
    }

    fn response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            self.0,
        )
            .into_response()
    }
}

/// The archive's gauges are what `pgtrail status` reports (the store's [`ArchiveStatus`],
/// one read of the log), so the two never disagree.
fn archive_gauges(out: &mut Exposition, status: &ArchiveStatus) {
    let durable = status.position.parse::<Lsn>().unwrap_or_default();
    out.gauge(
        "pgtrail_archive_durable_lsn",
        "The capture's durable position (an LSN as a number).",
        durable.0 as f64,
    );
    out.gauge(
        "pgtrail_archive_changes",
        "Changes the archive holds (segments and log), as pgtrail status counts them.",
        status.changes as f64,
    );
    out.gauge(
        "pgtrail_archive_log_changes",
        "Changes still in the log, not yet compacted.",
        status.log.changes as f64,
    );
    out.gauge(
        "pgtrail_archive_segments",
        "Segments listed in the manifest.",
        status.segments.files as f64,
    );
    out.gauge(
        "pgtrail_archive_segment_bytes",
        "Bytes of the listed segments.",
        status.segments.bytes as f64,
    );
    out.gauge(
        "pgtrail_archive_tables",
        "Table names the archive holds changes under, as pgtrail status lists them (a renamed table counts under each name).",
        status
            .tables
            .iter()
            .filter(|t| t.table != "pgtrail.messages")
            .count() as f64,
    );
    out.gauge(
        "pgtrail_archive_gaps",
        "Gaps the archive knows of.",
        status.gaps.len() as f64,
    );
}

async fn archive_status(dir: std::path::PathBuf) -> Result<ArchiveStatus, ApiError> {
    crate::api::off_runtime(move || ArchiveStatus::collect(&dir)).await
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let status = archive_status(state.config.archive.clone()).await?;
    let mut out = Exposition::default();
    archive_gauges(&mut out, &status);
    out.gauge(
        "pgtrail_serve_streams_open",
        "Streams open now.",
        state.metrics.streams_open.load(Ordering::SeqCst) as f64,
    );
    let requests = state
        .metrics
        .requests
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let _ = writeln!(
        out.0,
        "# HELP pgtrail_serve_requests_total Requests answered, by route and status class.\n# TYPE pgtrail_serve_requests_total counter"
    );
    for ((route, class), l) in &requests {
        let _ = writeln!(
            out.0,
            "pgtrail_serve_requests_total{{route=\"{route}\",status=\"{class}\"}} {}",
            l.count
        );
    }
    let _ = writeln!(
        out.0,
        "# HELP pgtrail_serve_request_duration_seconds Time to answer (to the start of a stream), by route and status class.\n# TYPE pgtrail_serve_request_duration_seconds histogram"
    );
    for ((route, class), l) in &requests {
        let labels = format!("route=\"{route}\",status=\"{class}\"");
        for (bound, n) in BUCKETS.iter().zip(l.within) {
            let _ = writeln!(
                out.0,
                "pgtrail_serve_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
            );
        }
        let _ = writeln!(
            out.0,
            "pgtrail_serve_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\npgtrail_serve_request_duration_seconds_sum{{{labels}}} {}\npgtrail_serve_request_duration_seconds_count{{{labels}}} {}",
            l.count, l.seconds, l.count
        );
    }
    Ok(out.response())
}

/// What another process adds to its metrics (the capture: its counters and state).
pub type MoreMetrics = Arc<dyn Fn(&mut Exposition) + Send + Sync>;

/// `GET /metrics` alone, for a process that is not `pgtrail serve` (the capture's
/// `--metrics-listen`): the archive's gauges, then what `more` adds. Other paths are 404.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    archive: std::path::PathBuf,
    more: MoreMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handler = move || {
        let (archive, more) = (archive.clone(), more.clone());
        async move {
            let mut out = Exposition::default();
            // The archive's part is left out while the log cannot be read (the capture creates
            // it); the process's own part is always there.
            if let Ok(status) = archive_status(archive).await {
                archive_gauges(&mut out, &status);
            }
            more(&mut out);
            out.response()
        }
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(handler))
        .fallback(crate::api::not_found);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
