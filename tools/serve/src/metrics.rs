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

/// (route, status class) → (requests, seconds).
type RequestCounts = BTreeMap<(String, &'static str), (u64, f64)>;

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
        e.0 += 1;
        e.1 += seconds;
    }
    response
}

/// The archive's gauges are what `pgtrail status` reports (the store's [`ArchiveStatus`],
/// one read of the log), so the two never disagree.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let dir = state.config.archive.clone();
    let status = crate::api::off_runtime(move || ArchiveStatus::collect(&dir)).await?;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    let durable = status.position.parse::<Lsn>().unwrap_or_default();
    gauge(
        "pgtrail_archive_durable_lsn",
        "The capture's durable position (an LSN as a number).",
        durable.0 as f64,
    );
    gauge(
        "pgtrail_archive_changes",
        "Changes the archive holds (segments and log), as pgtrail status counts them.",
        status.changes as f64,
    );
    gauge(
        "pgtrail_archive_log_changes",
        "Changes still in the log, not yet compacted.",
        status.log.changes as f64,
    );
    gauge(
        "pgtrail_archive_segments",
        "Segments listed in the manifest.",
        status.segments.files as f64,
    );
    gauge(
        "pgtrail_archive_segment_bytes",
        "Bytes of the listed segments.",
        status.segments.bytes as f64,
    );
    gauge(
        "pgtrail_archive_tables",
        "Table names the archive holds changes under, as pgtrail status lists them (a renamed table counts under each name).",
        status
            .tables
            .iter()
            .filter(|t| t.table != "pgtrail.messages")
            .count() as f64,
    );
    gauge(
        "pgtrail_archive_gaps",
        "Gaps the archive knows of.",
        status.gaps.len() as f64,
    );
    gauge(
        "pgtrail_serve_streams_open",
        "Streams open now.",
        state.metrics.streams_open.load(Ordering::SeqCst) as f64,
    );
    let _ = writeln!(
        out,
        "# HELP pgtrail_serve_requests_total Requests answered, by route and status class.\n# TYPE pgtrail_serve_requests_total counter"
    );
    let requests = state
        .metrics
        .requests
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    for ((route, class), (n, _)) in &requests {
        let _ = writeln!(
            out,
            "pgtrail_serve_requests_total{{route=\"{route}\",status=\"{class}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP pgtrail_serve_request_seconds_total Seconds spent answering, by route and status class.\n# TYPE pgtrail_serve_request_seconds_total counter"
    );
    for ((route, class), (_, s)) in &requests {
        let _ = writeln!(
            out,
            "pgtrail_serve_request_seconds_total{{route=\"{route}\",status=\"{class}\"}} {s}"
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
