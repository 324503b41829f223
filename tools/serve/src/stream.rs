//! `GET /api/stream?since=CURSOR&tables=…`: the archive as Server-Sent Events. Each change is
//! one `change` event whose `id:` is its cursor (a gap the archive recorded is a `gap` event
//! in its place), so a browser's EventSource (or any client
//! sending `Last-Event-ID`) resumes after the last change it got: every durable change once,
//! in order, first those already archived, then each new one as capture makes it durable.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use datafusion::arrow::array::RecordBatch;
use futures_util::Stream;
use pgtrail_query::feed::{Follower, Since};

use crate::AppState;
use crate::api::{Known, Params};
use crate::error::ApiError;

pub async fn stream(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<impl IntoResponse, ApiError> {
    let p = Known::check(&params, &["since", "tables"])?;
    let mut since = match p.one("since")? {
        Some(s) => s
            .parse()
            .map_err(|e| ApiError::bad_request(format!("since: {e}")))?,
        None => Since::Beginning,
    };
    let tables = p
        .one("tables")?
        .map(pgtrail_store::split_table_list)
        .unwrap_or_default();
    // A reconnecting EventSource sends the id of the last event it got: resume after it.
    if let Some(last) = headers.get("last-event-id") {
        let last = last
            .to_str()
            .map_err(|_| ApiError::bad_request("Last-Event-ID is not text"))?;
        since = Since::After(
            last.parse()
                .map_err(|e| ApiError::bad_request(format!("Last-Event-ID: {e}")))?,
        );
    }
    // Refuse beyond the limit before any work: each stream holds a cut of the archive.
    let open = state.metrics.streams_open.fetch_add(1, Ordering::SeqCst);
    let guard = StreamGuard(state.clone());
    if open >= state.config.max_streams as u64 {
        return Err(ApiError::unavailable(format!(
            "this server already serves {open} streams (its --max-streams); retry later"
        )));
    }
    let mut follower = Follower::sharing(state.watch.clone(), since, tables);
    // The first page is read before answering, so an unknown table or a broken archive is a
    // JSON error with a status rather than a stream that ends at once.
    let first = follower.next_page(false).await?;
    let events = events(follower, first, guard);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Counts the stream open until the client goes (the response body, and with it this guard,
/// is dropped then).
struct StreamGuard(Arc<AppState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.metrics.streams_open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn events(
    mut follower: Follower,
    first: Option<pgtrail_query::feed::FeedPage>,
    guard: StreamGuard,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        let _guard = guard;
        let mut page = first;
        loop {
            if let Some(p) = page.take() {
                // Events are made a slice of the page at a time as the client takes them, so
                // a stream holds its page and at most the channel's events besides.
                for batch in &p.batches {
                    let mut offset = 0;
                    while offset < batch.num_rows() {
                        let len = EVENTS_AT_ONCE.min(batch.num_rows() - offset);
                        let events = match change_events(&batch.slice(offset, len)) {
                            Ok(events) => events,
                            // Changes that cannot be sent end the stream: skipping them would
                            // lose them for a client that resumes after the next one.
                            Err(e) => {
                                let _ = tx.send(Ok(error_event(&e))).await;
                                return;
                            }
                        };
                        for event in events {
                            // The client is gone: stop reading the archive for it.
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        offset += len;
                    }
                }
                // Changes between the gap's ends were never captured: the client must know.
                if let Some(gap) = &p.gap {
                    let event = Event::default()
                        .event("gap")
                        .id(gap.cursor.to_string())
                        .data(gap.to_json().to_string());
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
            match follower.next_page(true).await {
                Ok(next) => page = next,
                Err(e) => {
                    let _ = tx.send(Ok(error_event(&e.to_string()))).await;
                    return;
                }
            }
        }
    })
}

/// Changes turned into events at once, at most.
const EVENTS_AT_ONCE: usize = 256;

/// One event per change: `id:` its cursor, `data:` its JSON (as `pgtrail tail` prints it).
fn change_events(batch: &RecordBatch) -> Result<Vec<Event>, String> {
    let lines = pgtrail_query::json::write_json_lines(Vec::new(), std::slice::from_ref(batch))
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&lines)
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let cursor = pgtrail_query::feed::cursor_at(batch, i).map_err(|e| e.to_string())?;
            Ok(Event::default()
                .event("change")
                .id(cursor.to_string())
                .data(line))
        })
        .collect()
}

/// The `error` event that ends a stream.
fn error_event(message: &str) -> Event {
    Event::default()
        .event("error")
        .data(serde_json::json!({ "error": message }).to_string())
}

/// A stream fed by a task through a channel of 256 events at most: a slow client holds back
/// its own reader (bounded memory per client), never the others.
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(produce(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
