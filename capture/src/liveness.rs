//! Finding a replication connection that died without a word (a network black hole, a NAT
//! entry dropped by a middlebox): such a connection neither delivers nor fails, and the
//! kernel gives up on it only after about 15 minutes.
//!
//! Silence alone proves nothing: an idle source sends nothing, and a walsender decoding a
//! large transaction from a backlog sends nothing until its commit. So once the stream has
//! been silent for `timeout`, the source is asked over the SQL connection about this
//! session's walsender, and the connection counts as dead only on evidence: the slot is gone
//! or held by another process, the server has received none of the status updates this
//! client sends every few seconds for `timeout`, or the walsender is blocked writing data
//! that never arrives. A dead connection is a reconnect; nothing past the durable position
//! was acknowledged, so nothing can be lost by abandoning it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{CaptureError, within};

/// What the source says about the slot's walsender (`None` when the slot is gone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct WalsenderSeen {
    pub pid: Option<i32>,
    /// `pg_stat_replication.reply_time` as text: this client's own clock in its last status
    /// update, so it is compared with itself, never with the server's clock.
    pub reply_time: Option<String>,
    pub wait_event: Option<String>,
}

pub(crate) struct Liveness {
    timeout: Duration,
    last_heard: Instant,
    walsender: Option<i32>,
    pub tick: tokio::time::Interval,
    /// The walsender's `reply_time` at the last check and since when it has not changed.
    last_reply: Option<(Option<String>, Instant)>,
}

impl Liveness {
    /// `walsender` is the process the server runs for this session, if known.
    pub fn new(timeout: Duration, walsender: Option<i32>) -> Self {
        let mut tick = tokio::time::interval((timeout / 3).max(Duration::from_millis(200)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Liveness {
            timeout,
            last_heard: Instant::now(),
            walsender,
            tick,
            last_reply: None,
        }
    }

    /// The stream delivered something: it is alive.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.last_reply = None;
    }

    /// After `timeout` of silence, ask the source; a [`CaptureError::StreamSilent`] (a
    /// reconnect) when the answer shows the connection dead.
    pub async fn check(
        &mut self,
        sql: &tokio_postgres::Client,
        slot: &str,
    ) -> Result<(), CaptureError> {
        let silent = self.last_heard.elapsed();
        if silent < self.timeout {
            return Ok(());
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
        let query = sql.query_opt(
            "SELECT s.active_pid, r.reply_time::text, a.wait_event \
             FROM pg_replication_slots s \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &params,
        );
        let row = within(
            self.timeout,
            "a query about the replication session",
            async {
                query.await.map_err(|e| {
                    CaptureError::sql("asking the source about the replication session", e)
                })
            },
        )
        .await?;
        let seen = row.map(|row| WalsenderSeen {
            pid: row.get(0),
            reply_time: row.get(1),
            wait_event: row.get(2),
        });
        match self.verdict(silent, seen, Instant::now()) {
            Some(why) => Err(CaptureError::StreamSilent { why }),
            None => {
                tracing::debug!(
                    silent_s = silent.as_secs(),
                    "replication stream silent; the server is alive and receiving status updates"
                );
                Ok(())
            }
        }
    }

    /// Why the connection is dead, given `silent` so long and what the source said at `now`;
    /// `None` while the evidence says it lives.
    fn verdict(
        &mut self,
        silent: Duration,
        seen: Option<WalsenderSeen>,
        now: Instant,
    ) -> Option<String> {
        let silent_s = silent.as_secs();
        let Some(seen) = seen else {
            return Some("the slot no longer exists".to_string());
        };
        // Replies arrive unless the same reply_time (or none) has been seen for a whole
        // timeout, in which the client sent several.
        let unchanged_since = match &self.last_reply {
            Some((before, since)) if *before == seen.reply_time => *since,
            _ => now,
        };
        self.last_reply = Some((seen.reply_time, unchanged_since));
        let replies_arrive = now.duration_since(unchanged_since) < self.timeout;
        if seen.pid.is_none() || (self.walsender.is_some() && seen.pid != self.walsender) {
            Some(format!(
                "nothing heard for {silent_s} s and the server no longer runs this capture's walsender"
            ))
        } else if !replies_arrive {
            Some(format!(
                "nothing heard for {silent_s} s and the server received none of this capture's status updates"
            ))
        } else if seen.wait_event.as_deref() == Some("WalSenderWriteData") {
            Some(format!(
                "nothing heard for {silent_s} s while the server's walsender is blocked sending to this capture"
            ))
        } else {
            None
        }
    }
}

/// The server process a table copy's step waits on, as the watchdog asks about it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CopyBackend<'a> {
    /// A SQL session, by its `pg_backend_pid()`.
    Pid(i32),
    /// The walsender holding a (temporary) slot: it creates the slot as soon as the command
    /// arrives, before waiting for anything.
    SlotHolder(&'a str),
}

/// What the source said of a copy's server process: `None` when there is no such process;
/// else its wait event, and the processes it waits for (those holding a lock it waits on, or,
/// for a slot's creation, the transactions older than the step).
type BackendSeen = Option<(Option<String>, Vec<i32>)>;

/// Run `step`, one network step of a table copy (a temporary slot's creation, a statement,
/// a COPY), watched the way [`Liveness`] watches the stream: a step may rightly take long (a
/// slot's creation waits for every transaction open on the source to end; a COPY of a large
/// table runs for hours), so a slow step is not an error, but each `timeout` without an answer
/// the source is asked over `sql` what `backend` is doing. The step's connection counts as
/// dead, and the step ends in [`CaptureError::StreamSilent`] (a reconnect), on evidence:
/// the question itself gets no answer in `timeout` (the SQL connection sits in the same dead
/// network), or twice in a row with no `progress` in between, the server has no such
/// process or it waits on the client (`ClientRead`: it answered and waits for the next
/// command; `ClientWrite`, `WalSenderWriteData`: it is blocked sending what never arrives).
///
/// Abandoning the step loses nothing: a copy is stored only once the stream reaches its point,
/// and the server drops a temporary slot with its connection.
pub(crate) async fn watched<T>(
    sql: &tokio_postgres::Client,
    timeout: Duration,
    backend: CopyBackend<'_>,
    what: &str,
    progress: Option<&AtomicU64>,
    step: impl Future<Output = Result<T, CaptureError>>,
) -> Result<T, CaptureError> {
    let read_progress = || progress.map_or(0, |p| p.load(Ordering::Relaxed));
    let started = Instant::now();
    let mut step = std::pin::pin!(step);
    let mut suspect: Option<u64> = None;
    let mut said_waiting = false;
    loop {
        tokio::select! {
            done = &mut step => return done,
            _ = tokio::time::sleep(timeout) => {}
        }
        let question = ask_about(sql, backend, started.elapsed());
        let seen = within(timeout, &format!("a question about {what}"), question).await?;
        let now = read_progress();
        match copy_verdict(&seen) {
            Some(why) if suspect == Some(now) => {
                return Err(CaptureError::StreamSilent {
                    why: format!(
                        "{what}: no answer for {} s and {why}",
                        started.elapsed().as_secs()
                    ),
                });
            }
            Some(_) => suspect = Some(now),
            None => {
                suspect = None;
                if let Some((event, blockers)) = &seen
                    && !blockers.is_empty()
                    && !said_waiting
                {
                    said_waiting = true;
                    tracing::warn!(
                        step = what,
                        waits_on = event.as_deref().unwrap_or("?"),
                        blocking_pids = ?blockers,
                        "a table copy waits for transactions open on the source to end; capture \
                         stays at this point until they do (end or cancel them to go on)"
                    );
                }
            }
        }
    }
}

/// A new SQL connection to copy tables on, and its server process for [`watched`] to ask
/// about; connecting and the first query are bounded by `limit` (nothing there waits on the
/// database).
pub(crate) async fn copy_connection(
    source: &crate::source::SourceConfig,
    capture_slot: &str,
    limit: Duration,
) -> Result<(tokio_postgres::Client, CopyBackend<'static>), CaptureError> {
    let client = within(limit, "connecting for a table copy", source.connect_sql()).await?;
    let row = within(limit, "a table copy's first query", async {
        client
            .query_one(
                "SELECT pg_backend_pid(), backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| CaptureError::sql("starting a table copy", e))
    })
    .await?;
    let pid = row.get(0);
    crate::table_sync::copy_session_started(capture_slot, pid, row.get(1));
    Ok((client, CopyBackend::Pid(pid)))
}

async fn ask_about(
    sql: &tokio_postgres::Client,
    backend: CopyBackend<'_>,
    waited: Duration,
) -> Result<BackendSeen, CaptureError> {
    // A lock wait names its blockers; a slot's creation waits, reading WAL, for the
    // transactions that had an ID when it began, which no function names: those still open
    // that began before the step are the ones to end.
    let columns = "a.wait_event, CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(a.pid) \
         WHEN a.backend_type = 'walsender' THEN ARRAY(SELECT o.pid FROM pg_stat_activity o \
           WHERE o.backend_xid IS NOT NULL AND o.pid <> a.pid \
             AND o.xact_start < now() - make_interval(secs => $2) ORDER BY o.pid) \
         ELSE ARRAY[]::int[] END";
    let waited = waited.as_secs_f64();
    let row = match backend {
        CopyBackend::Pid(pid) => {
            sql.query_opt(
                &format!("SELECT {columns} FROM pg_stat_activity a WHERE a.pid = $1"),
                &[&pid, &waited],
            )
            .await
        }
        CopyBackend::SlotHolder(slot) => {
            sql.query_opt(
                &format!(
                    "SELECT {columns} FROM pg_replication_slots s \
                     JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1"
                ),
                &[&slot, &waited],
            )
            .await
        }
    }
    .map_err(|e| CaptureError::sql("asking the source about a table copy", e))?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

/// Why a copy's server process looks like it lost its client, or `None` while it works or
/// waits on the database (a slot's creation waiting for WAL, `WalSenderWaitForWAL`, is of the
/// same `Client` type of wait events, but waits on the source, not on capture).
fn copy_verdict(seen: &BackendSeen) -> Option<&'static str> {
    match seen {
        None => Some("the server runs no process for it"),
        Some((Some(event), _))
            if matches!(
                event.as_str(),
                "ClientRead" | "ClientWrite" | "WalSenderWriteData"
            ) =>
        {
            Some("the server's process for it waits on this capture")
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_suspect_only_when_its_server_process_is_gone_or_waits_on_the_client() {
        let seen = |event: Option<&str>| Some((event.map(str::to_string), vec![]));
        assert!(copy_verdict(&None).is_some());
        for event in ["ClientWrite", "ClientRead", "WalSenderWriteData"] {
            assert!(copy_verdict(&seen(Some(event))).is_some(), "{event}");
        }
        // Running, reading the table, waiting for a lock, or a slot's creation waiting for
        // the transactions open on the source: alive.
        for event in [
            None,
            Some("DataFileRead"),
            Some("transactionid"),
            Some("WalSenderWaitForWAL"),
        ] {
            assert!(copy_verdict(&seen(event)).is_none(), "{event:?}");
        }
    }

    fn seen(pid: i32, reply: &str, wait: Option<&str>) -> Option<WalsenderSeen> {
        Some(WalsenderSeen {
            pid: Some(pid),
            reply_time: Some(reply.to_string()),
            wait_event: wait.map(str::to_string),
        })
    }

    #[tokio::test]
    async fn a_silent_stream_is_dead_only_on_evidence() {
        let timeout = Duration::from_secs(30);
        let silent = Duration::from_secs(31);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut live = Liveness::new(timeout, Some(42));

        // An idle source whose walsender receives the status updates: alive.
        assert_eq!(
            live.verdict(silent, seen(42, "10:00:00", None), at(0)),
            None
        );
        assert_eq!(
            live.verdict(silent, seen(42, "10:00:05", None), at(10)),
            None
        );
        // The same reply_time for less than a timeout: still alive (updates are seconds apart).
        assert_eq!(
            live.verdict(silent, seen(42, "10:00:05", None), at(30)),
            None
        );
        // ... and for a whole timeout: the updates no longer arrive.
        let why = live.verdict(silent, seen(42, "10:00:05", None), at(41));
        assert!(why.unwrap().contains("received none"));

        let mut live = Liveness::new(timeout, Some(42));
        assert!(
            live.verdict(silent, None, at(0))
                .unwrap()
                .contains("no longer exists")
        );
        assert!(
            live.verdict(silent, seen(43, "10:00:00", None), at(0))
                .unwrap()
                .contains("no longer runs")
        );
        let no_walsender = Some(WalsenderSeen::default());
        assert!(live.verdict(silent, no_walsender, at(0)).is_some());
        let blocked = seen(42, "10:00:09", Some("WalSenderWriteData"));
        assert!(
            live.verdict(silent, blocked, at(1))
                .unwrap()
                .contains("blocked sending")
        );
        // A walsender busy decoding a large transaction sends nothing but lives.
        let decoding = seen(42, "10:00:12", Some("WalSenderWaitForWAL"));
        assert_eq!(live.verdict(silent, decoding, at(2)), None);
    }
}
