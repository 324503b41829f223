//! The capture loop: setup, initial snapshot, streaming, acknowledgement and reconnects.
//!
//! # Progress and acknowledgement
//!
//! The stream task decodes pgoutput and sends [`LogOp`]s to the writer thread; the writer
//! publishes the position its last *durable* redb commit covers, and only that position is
//! passed to `update_applied_lsn` (the flush LSN PostgreSQL keeps as the slot's
//! `confirmed_flush_lsn`). A crash at any line therefore leaves the slot at or behind what the
//! archive durably holds: PostgreSQL sends the rest again, and the log skips what it already
//! has by commit LSN.
//!
//! Before every START_REPLICATION the archive is compared with the slot (existence, system
//! identifier, `wal_status`, `confirmed_flush_lsn` not ahead of the archive), because the
//! server silently starts from the slot's position: any mismatch is a recorded gap and a stop,
//! never a silent resume.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgtrail_store::{
    ChangeKey, Column, Gap, IncomingCell, IncomingChange, LogOp, LogicalMessage, Lsn, OldImage, Op,
    RelationVersion, SourceIdentity,
};
use pgwire_replication::{ReplicationClient, ReplicationEvent};

use crate::compaction::{BackgroundCompactor, CompactionPolicy};
use crate::error::{CaptureError, ReplicationError};
use crate::pgoutput::{self, Message, OldTuple, TupleCell};
use crate::slot;
use crate::source::SourceConfig;
use crate::writer::WriterHandle;
use crate::{preflight, snapshot};

/// The logical message prefix that carries application context (Bemi-compatible).
pub const CONTEXT_PREFIX: &str = "_bemi";

/// How long a slot held by another connection is waited for before it counts as in use.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(20);

/// The default of [`CaptureConfig::stream_timeout`].
pub const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

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
    /// the connection still works (see [`Liveness`]); also the limit for connecting.
    pub stream_timeout: Duration,
    /// Stop (cleanly) once the durable position reaches this LSN; for tests and tools.
    pub stop_at: Option<Lsn>,
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
}

/// What [`run`] did before it stopped.
pub type CaptureSummary = Progress;

enum SessionEnd {
    Shutdown,
    StopAtReached,
}

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
    let compacted = compactor.as_ref().map(|c| c.compacted.clone());
    let mut on_progress = move |p: &Progress| {
        let mut p = p.clone();
        p.compacted = compacted.as_ref().map_or(0, |c| c.load(Ordering::Relaxed));
        on_progress(&p)
    };
    // Whether a session has started: before that, a source that cannot be reached is a
    // configuration error (wrong URL, server down), reported at once rather than retried.
    let mut attempts = 0u32;
    // The walsender of this process's last session: after a network failure the server may
    // still hold the slot for it until `wal_sender_timeout`, and only that one may be ended.
    let mut own_walsender: Option<i32> = None;
    loop {
        attempts += 1;
        let started = Instant::now();
        let result = {
            let session = session(
                &config,
                &mut writer,
                &mut shutdown,
                &mut summary,
                &mut on_progress,
                &mut own_walsender,
            );
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
            Ok(_) => break,
            Err(CaptureError::WriterGone) => return Err(writer.into_error()),
            Err(e)
                if e.is_transient()
                    && !(attempts == 1 && matches!(e, CaptureError::Connect { .. })) =>
            {
                summary.reconnects += 1;
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(250);
                }
                tracing::warn!(error = %error_chain(&e), retry_in_ms = backoff.as_millis() as u64, "capture interrupted; reconnecting");
                writer.discard_partial().await?;
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                if let Some(c) = compactor {
                    c.stop();
                }
                let _ = writer.finish();
                return Err(e);
            }
        }
    }
    if let Some(c) = compactor {
        summary.compacted = c.compacted.load(Ordering::Relaxed);
        c.stop();
    }
    summary.durable = writer.durable();
    fill_stats(&mut summary, &writer);
    writer.finish()?;
    Ok(summary)
}

fn fill_stats(p: &mut Progress, writer: &WriterHandle) {
    p.changes = writer.stats.changes.load(Ordering::Relaxed);
    p.transactions = writer.stats.transactions.load(Ordering::Relaxed);
    p.duplicates_skipped = writer.stats.duplicates_skipped.load(Ordering::Relaxed);
    p.log_commits = writer.stats.commits.load(Ordering::Relaxed);
}

/// `error: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

async fn session(
    config: &CaptureConfig,
    writer: &mut WriterHandle,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    summary: &mut Progress,
    on_progress: &mut impl FnMut(&Progress),
    own_walsender: &mut Option<i32>,
) -> Result<SessionEnd, CaptureError> {
    let sql = config.source.connect_sql().await?;
    preflight::check(&sql, config.source.user()).await?;

    let mut stored = writer.stored_identity().cloned();
    if let Some(id) = &stored
        && !id.snapshot_complete
        && id.consistent_point > Lsn::ZERO
        && writer.durable() >= id.consistent_point
    {
        // The snapshot transaction is durable; only its completion mark is missing.
        let mut done = id.clone();
        done.snapshot_complete = true;
        writer.set_identity(done.clone()).await?;
        stored = Some(done);
    }
    if let Some(id) = &stored
        && (id.slot != config.slot || id.publication != config.publication)
    {
        return Err(CaptureError::setup(
            format!(
                "this archive captures through slot {:?} and publication {:?}, not {:?} and {:?}",
                id.slot, id.publication, config.slot, config.publication
            ),
            format!(
                "pass --slot {} --publication {} (or use a new archive directory)",
                id.slot, id.publication
            ),
        ));
    }

    let mut client;
    match stored {
        Some(id) if id.snapshot_complete => {
            if !config.tables.is_empty() {
                let (tables, _) = slot::choose_tables(&sql, &config.tables).await?;
                slot::ensure_publication(&sql, &config.publication, &tables).await?;
            }
            let durable = writer.durable();
            let rcfg = replication_config(config)
                .with_start_lsn(to_wire(durable))
                .with_ack_lsn(to_wire(durable));
            let limit = config.stream_timeout;
            client = within(limit, "connecting for replication", async {
                ReplicationClient::connect_gated(rcfg)
                    .await
                    .map_err(CaptureError::from)
            })
            .await?;
            let system = within(limit, "IDENTIFY_SYSTEM", async {
                client.identify_system().await.map_err(CaptureError::from)
            })
            .await?;
            // Checked before the slot, and never answered by --resnapshot: another cluster's
            // LSNs are another history, and continuing this archive from them would interleave
            // the two.
            if system.system_id != id.system_id {
                return Err(other_cluster(writer, durable, &system, &id.system_id).await);
            }
            let checked = match check_slot(&sql, &id, durable, config, *own_walsender).await {
                // Every gap is recorded in the archive before anything else happens.
                Err(CaptureError::Gap {
                    reason,
                    archive_position,
                    source_position,
                }) => Err(gap(writer, archive_position, source_position, reason).await),
                other => other,
            };
            match checked {
                Ok(()) => {}
                Err(gap @ CaptureError::Gap { .. }) if config.resnapshot => {
                    tracing::warn!(error = %gap, "gap recorded; taking a new snapshot as --resnapshot asks");
                    drop(client);
                    if slot::slot_state(&sql, &config.slot)
                        .await?
                        .is_some_and(|s| !s.active)
                    {
                        slot::drop_slot(&sql, &config.slot).await?;
                    }
                    client = initial_snapshot(config, writer, &sql, summary).await?;
                    return stream(
                        config,
                        writer,
                        client,
                        &sql,
                        shutdown,
                        summary,
                        on_progress,
                        own_walsender,
                    )
                    .await;
                }
                Err(e) => return Err(e),
            }
            client.start().await.map_err(CaptureError::from)?;
        }
        Some(_) => {
            // The initial snapshot did not finish: nothing of it is in the archive (the log's
            // recovery removed the partial rows), nothing was acknowledged past the slot's
            // creation, so the slot is dropped and the snapshot taken again.
            if slot_when_released(&sql, &config.slot, *own_walsender)
                .await?
                .is_some()
            {
                tracing::warn!(slot = %config.slot, "dropping the slot of an interrupted initial snapshot to take it again");
                slot::drop_slot(&sql, &config.slot).await?;
            }
            client = initial_snapshot(config, writer, &sql, summary).await?;
        }
        None => {
            if slot::slot_state(&sql, &config.slot).await?.is_some() {
                return Err(CaptureError::setup(
                    format!(
                        "replication slot {:?} already exists, but this archive is new",
                        config.slot
                    ),
                    format!(
                        "choose another name with --slot, or, if no other consumer uses it, drop it: SELECT pg_drop_replication_slot('{}');",
                        config.slot.replace('\'', "''")
                    ),
                ));
            }
            client = initial_snapshot(config, writer, &sql, summary).await?;
        }
    }
    stream(
        config,
        writer,
        client,
        &sql,
        shutdown,
        summary,
        on_progress,
        own_walsender,
    )
    .await
}

/// The replication settings of `config`: status updates often enough that the liveness check
/// sees several of them arrive at the server within one `stream_timeout`.
fn replication_config(config: &CaptureConfig) -> pgwire_replication::ReplicationConfig {
    let wakeup =
        (config.stream_timeout / 3).clamp(Duration::from_millis(500), Duration::from_secs(5));
    config
        .source
        .replication_config(&config.slot, &config.publication)
        .with_wakeup_interval(wakeup)
}

/// `fut`, or a [`CaptureError::StreamSilent`] (a reconnect) if it takes longer than `limit`:
/// a connection into a network black hole never fails by itself.
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, CaptureError>>,
) -> Result<T, CaptureError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(CaptureError::StreamSilent {
            why: format!("{what} got no answer within {} s", limit.as_secs_f64()),
        })
    })
}

/// Record that another cluster answered at the source URL (as a gap of no length: nothing was
/// read from it) and return the error that stops capture.
async fn other_cluster(
    writer: &WriterHandle,
    durable: Lsn,
    system: &pgwire_replication::IdentifySystem,
    expected: &str,
) -> CaptureError {
    let reason = format!(
        "a different cluster answered at the source URL (system identifier {} where the archive was captured from {expected}); nothing was read from it",
        system.system_id
    );
    let record = Gap {
        from: durable,
        to: durable,
        reason,
        recorded_at_us: now_us(),
    };
    if let Err(e) = writer.record_gap(record).await {
        return e;
    }
    CaptureError::OtherCluster {
        found: system.system_id.clone(),
        expected: expected.to_string(),
    }
}

async fn gap(
    writer: &WriterHandle,
    archive_position: Lsn,
    source_position: Lsn,
    reason: String,
) -> CaptureError {
    let record = Gap {
        from: archive_position,
        to: source_position,
        reason: reason.clone(),
        recorded_at_us: now_us(),
    };
    if let Err(e) = writer.record_gap(record).await {
        return e;
    }
    CaptureError::Gap {
        reason,
        archive_position,
        source_position,
    }
}

/// The slot's state, after waiting for a walsender of a consumer that just died (kill -9, a
/// dropped network) to release it: the server notices only after a while, so the slot counts
/// as "in use" only when it stays held for [`SLOT_RELEASE_WAIT`]. A walsender that served this
/// process's own earlier session (`own`, after a network failure) is waited for up to
/// `wal_sender_timeout` (plus a margin): nothing else can be using that session, and only the
/// server's timeout ends it. It is not terminated: a walsender blocked writing into a dead
/// connection would block again sending the termination message to it, and then hold the
/// slot until the kernel gives up on the socket (found by pgtrail-torture's black hole).
async fn slot_when_released(
    sql: &tokio_postgres::Client,
    slot_name: &str,
    own: Option<i32>,
) -> Result<Option<slot::SlotState>, CaptureError> {
    let mut state = slot::slot_state(sql, slot_name).await?;
    let mut wait = SLOT_RELEASE_WAIT;
    if let Some(pid) = state
        .as_ref()
        .and_then(|s| s.active_pid)
        .filter(|pid| Some(*pid) == own)
    {
        let timeout_ms: i64 = sql
            .query_one(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
                &[],
            )
            .await
            .map_err(|e| CaptureError::sql("reading wal_sender_timeout", e))?
            .get(0);
        if timeout_ms > 0 {
            wait = wait.max(Duration::from_millis(timeout_ms as u64) + Duration::from_secs(10));
        }
        tracing::warn!(
            slot = slot_name,
            pid,
            wait_s = wait.as_secs(),
            "waiting for the server to end this capture's earlier walsender (wal_sender_timeout)"
        );
    }
    let deadline = Instant::now() + wait;
    while state.as_ref().is_some_and(|s| s.active) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        state = slot::slot_state(sql, slot_name).await?;
    }
    Ok(state)
}

/// Compare the slot with the archive before resuming.
async fn check_slot(
    sql: &tokio_postgres::Client,
    id: &SourceIdentity,
    durable: Lsn,
    config: &CaptureConfig,
    own_walsender: Option<i32>,
) -> Result<(), CaptureError> {
    let state = slot_when_released(sql, &config.slot, own_walsender).await?;
    let Some(state) = state else {
        let current: String = sql
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| CaptureError::sql("reading the WAL position", e))?
            .get(0);
        return Err(CaptureError::Gap {
            reason: format!(
                "replication slot {:?} no longer exists (dropped, or the server was restored or failed over)",
                config.slot
            ),
            archive_position: durable,
            source_position: current.parse().unwrap_or_default(),
        });
    };
    if state.plugin.as_deref() != Some("pgoutput")
        || state.database.as_deref() != Some(id.database.as_str())
    {
        return Err(CaptureError::setup(
            format!(
                "slot {:?} is not a pgoutput slot of database {:?}",
                config.slot, id.database
            ),
            "use the slot this archive was created with",
        ));
    }
    if state.active {
        return Err(CaptureError::setup(
            format!(
                "replication slot {:?} is in use by another connection",
                config.slot
            ),
            "stop the other consumer (another `pgtrail capture` on this slot?) or use another archive and slot",
        ));
    }
    if state.wal_status.as_deref() == Some("lost") {
        return Err(CaptureError::Gap {
            reason: format!(
                "replication slot {:?} was invalidated (wal_status = lost): the WAL it needed is gone",
                config.slot
            ),
            archive_position: durable,
            source_position: state.confirmed_flush.unwrap_or_default(),
        });
    }
    if let Some(confirmed) = state.confirmed_flush
        && confirmed > durable
    {
        return Err(CaptureError::Gap {
            reason: format!(
                "the slot has confirmed {confirmed}, past what this archive durably holds ({durable}): the archive was restored from an older copy, or the slot was recreated or used by another consumer"
            ),
            archive_position: durable,
            source_position: confirmed,
        });
    }
    Ok(())
}

/// Create the publication and the slot, and copy every table inside the slot's snapshot.
async fn initial_snapshot(
    config: &CaptureConfig,
    writer: &mut WriterHandle,
    sql: &tokio_postgres::Client,
    summary: &mut Progress,
) -> Result<ReplicationClient, CaptureError> {
    let (tables, excluded) = slot::choose_tables(sql, &config.tables).await?;
    for t in &excluded {
        tracing::warn!(table = %t.qualified, reason = %t.reason, "table left out of the publication");
    }
    // The publication must exist before the slot: a slot decodes with the catalog as of each
    // change, and a publication created later is unknown to its earlier changes.
    slot::ensure_publication(sql, &config.publication, &tables).await?;
    let rcfg = replication_config(config);
    let limit = config.stream_timeout;
    let mut client = within(limit, "connecting for replication", async {
        ReplicationClient::connect_gated(rcfg)
            .await
            .map_err(CaptureError::from)
    })
    .await?;
    let system = within(limit, "IDENTIFY_SYSTEM", async {
        client.identify_system().await.map_err(CaptureError::from)
    })
    .await?;
    // A re-snapshot (after a gap, or an interrupted one) continues this archive: only from
    // the same cluster, and only forward in LSN order (a snapshot keyed before what the log
    // holds would be taken for a replay and skipped).
    let durable = writer.durable();
    if durable > Lsn::ZERO {
        if let Some(prev) = writer.stored_identity()
            && prev.system_id != system.system_id
        {
            let expected = prev.system_id.clone();
            return Err(other_cluster(writer, durable, &system, &expected).await);
        }
        let at = from_wire(system.xlogpos);
        if at <= durable {
            return Err(CaptureError::SourceBehind {
                archive_position: durable,
                source_position: at,
            });
        }
    }
    let mut identity = SourceIdentity {
        system_id: system.system_id.clone(),
        timeline: system.timeline,
        database: config.source.database().to_string(),
        slot: config.slot.clone(),
        publication: config.publication.clone(),
        consistent_point: Lsn::ZERO,
        snapshot_complete: false,
    };
    // Recorded before the slot exists: a crash between creating the slot and the end of the
    // snapshot is then recognised on the next start, which drops this archive's slot and
    // takes the snapshot again (nothing was acknowledged past the slot's creation).
    writer.set_identity(identity.clone()).await?;
    let rows = client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            pgtrail_store::quote_ident(&config.slot)
        ))
        .await
        .map_err(CaptureError::from)?;
    let row = rows
        .first()
        .ok_or_else(|| CaptureError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let text = |i: usize| -> Result<String, CaptureError> {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| {
                CaptureError::Protocol(format!("CREATE_REPLICATION_SLOT: column {i} missing"))
            })
    };
    let consistent_point: Lsn = text(1)?.parse().map_err(|_| {
        CaptureError::Protocol("CREATE_REPLICATION_SLOT: bad consistent_point".into())
    })?;
    let snapshot_name = text(2)?;
    if durable > Lsn::ZERO && Lsn(consistent_point.0.saturating_sub(1)) < durable {
        // Nothing was read from the slot yet: dropping it loses nothing.
        drop(client);
        slot::drop_slot(sql, &config.slot).await?;
        return Err(CaptureError::SourceBehind {
            archive_position: durable,
            source_position: consistent_point,
        });
    }
    identity.consistent_point = consistent_point;
    writer.set_identity(identity.clone()).await?;
    tracing::info!(slot = %config.slot, %consistent_point, tables = tables.len(), "slot created; copying the initial snapshot");
    // The replication session stays idle (it holds the exported snapshot) while an ordinary
    // connection copies the tables inside that snapshot.
    let snapshot_sql = config.source.connect_sql().await?;
    let rows = snapshot::copy_tables(
        &snapshot_sql,
        &snapshot_name,
        consistent_point,
        &tables,
        writer,
    )
    .await?;
    writer.wait_durable(consistent_point).await?;
    identity.snapshot_complete = true;
    writer.set_identity(identity).await?;
    summary.snapshot_rows += rows;
    tracing::info!(rows, "initial snapshot stored");
    client.start().await.map_err(CaptureError::from)?;
    Ok(client)
}

fn to_wire(lsn: Lsn) -> pgwire_replication::Lsn {
    pgwire_replication::Lsn::from_u64(lsn.0)
}

fn from_wire(lsn: pgwire_replication::Lsn) -> Lsn {
    Lsn(lsn.as_u64())
}

/// Stream from the slot until shutdown, an error, or `stop_at`.
// The session state (`writer` .. `own_walsender`) is passed piecewise; a `Session` struct
// owning it is the planned split of this file (issue 17's note says what is left).
#[allow(clippy::too_many_arguments)]
async fn stream(
    config: &CaptureConfig,
    writer: &mut WriterHandle,
    mut client: ReplicationClient,
    sql: &tokio_postgres::Client,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    summary: &mut Progress,
    on_progress: &mut impl FnMut(&Progress),
    own_walsender: &mut Option<i32>,
) -> Result<SessionEnd, CaptureError> {
    let started = within(config.stream_timeout, "START_REPLICATION", async {
        client.wait_started().await.map_err(CaptureError::from)
    })
    .await;
    started.map_err(|e| match &e {
        // 55006 object_in_use: another connection streams from the slot.
        CaptureError::Replication(r) if r.sqlstate() == Some("55006") => {
            CaptureError::setup(
                format!("replication slot {:?} is in use by another connection ({r})", config.slot),
                "stop the other consumer (another `pgtrail capture` on this slot?) or use another archive and slot",
            )
        }
        _ => e,
    })?;
    *own_walsender = slot::slot_state(sql, &config.slot)
        .await?
        .and_then(|s| s.active_pid);
    let mut liveness = Liveness::new(config.stream_timeout, *own_walsender);
    tracing::info!(slot = %config.slot, from = %writer.durable(), "streaming");
    let mut durable_rx = writer.durable_watch();
    client.update_applied_lsn(to_wire(writer.durable()));
    if let Some(stop) = config.stop_at
        && writer.durable() >= stop
    {
        graceful_stop(writer, &mut client, &StreamState::default()).await?;
        return Ok(SessionEnd::StopAtReached);
    }
    let mut state = StreamState::default();
    let mut tick = tokio::time::interval(config.progress_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_tick = (Instant::now(), 0u64, 0u64);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.as_mut() => {
                graceful_stop(writer, &mut client, &state).await?;
                return Ok(SessionEnd::Shutdown);
            }
            changed = durable_rx.changed() => {
                if changed.is_err() {
                    return Err(CaptureError::WriterGone);
                }
                let durable = *durable_rx.borrow_and_update();
                // Safe: `durable` is what the writer's last durable commit covers.
                client.update_applied_lsn(to_wire(durable));
                if let Some(observer) = &config.durable_observer {
                    (observer.0)(durable);
                }
                if let Some(stop) = config.stop_at && durable >= stop {
                    graceful_stop(writer, &mut client, &state).await?;
                    return Ok(SessionEnd::StopAtReached);
                }
            }
            event = client.recv() => {
                let event = event.map_err(CaptureError::from)?;
                liveness.heard();
                let Some(event) = event else {
                    return Err(CaptureError::Replication(ReplicationError::stream_ended()));
                };
                let ops = handle_event(event, &mut state, sql, config.stream_timeout).await?;
                if !ops.is_empty() {
                    writer.send(ops).await?;
                }
            }
            _ = liveness.tick.tick() => liveness.check(sql, &config.slot).await?,
            _ = tick.tick() => {
                let durable = writer.durable();
                fill_stats(summary, writer);
                let elapsed = last_tick.0.elapsed().as_secs_f64().max(1e-3);
                summary.changes_per_sec = (summary.changes - last_tick.1) as f64 / elapsed;
                summary.transactions_per_sec = (summary.transactions - last_tick.2) as f64 / elapsed;
                last_tick = (Instant::now(), summary.changes, summary.transactions);
                summary.durable = durable;
                summary.lag_bytes = state.wal_end.0.saturating_sub(durable.0);
                summary.lag_seconds = match state.oldest_pending_commit_us {
                    Some(at) if state.last_commit_end > durable => ((now_us() - at) as f64 / 1e6).max(0.0),
                    _ => 0.0,
                };
                if state.last_commit_end <= durable {
                    state.oldest_pending_commit_us = None;
                }
                on_progress(summary);
            }
        }
    }
}

/// Finds a replication connection that died without a word (a network black hole, a NAT
/// entry dropped by a middlebox): such a connection neither delivers nor fails, and the
/// kernel gives up on it only after about 15 minutes.
///
/// Silence alone proves nothing: an idle source sends nothing, and a walsender decoding a
/// large transaction from a backlog sends nothing until its commit. So once the stream has
/// been silent for `timeout`, the source is asked over the SQL connection about this
/// session's walsender, and the connection counts as dead only on evidence: the slot is gone
/// or held by another process, the server has received none of the status updates this
/// client sends every few seconds for `timeout`, or the walsender is blocked writing data
/// that never arrives. A dead connection is a reconnect; nothing past the durable position
/// was acknowledged, so nothing can be lost by abandoning it.
struct Liveness {
    timeout: Duration,
    last_heard: Instant,
    walsender: Option<i32>,
    tick: tokio::time::Interval,
    /// The walsender's `reply_time` at the last check and since when it has not changed.
    /// `reply_time` is this client's own clock in its last status update, so it is compared
    /// with itself, never with the server's clock (the two may disagree).
    last_reply: Option<(Option<String>, Instant)>,
}

impl Liveness {
    fn new(timeout: Duration, walsender: Option<i32>) -> Self {
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

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.last_reply = None;
    }

    async fn check(
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
        let silent_s = silent.as_secs();
        let why = match row {
            None => Some("the slot no longer exists".to_string()),
            Some(row) => {
                let pid: Option<i32> = row.get(0);
                let reply: Option<String> = row.get(1);
                let wait_event: Option<String> = row.get(2);
                // Replies arrive unless the same reply_time (or none) has been seen for a whole
                // timeout, in which the client sent several.
                let unchanged_since = match &self.last_reply {
                    Some((seen, since)) if *seen == reply => *since,
                    _ => Instant::now(),
                };
                self.last_reply = Some((reply, unchanged_since));
                let replies_arrive = unchanged_since.elapsed() < self.timeout;
                if pid.is_none() || (self.walsender.is_some() && pid != self.walsender) {
                    Some(format!(
                        "nothing heard for {silent_s} s and the server no longer runs this capture's walsender"
                    ))
                } else if !replies_arrive {
                    Some(format!(
                        "nothing heard for {silent_s} s and the server received none of this capture's status updates"
                    ))
                } else if wait_event.as_deref() == Some("WalSenderWriteData") {
                    Some(format!(
                        "nothing heard for {silent_s} s while the server's walsender is blocked sending to this capture"
                    ))
                } else {
                    None
                }
            }
        };
        match why {
            Some(why) => Err(CaptureError::StreamSilent { why }),
            None => {
                tracing::debug!(
                    silent_s,
                    "replication stream silent; the server is alive and receiving status updates"
                );
                Ok(())
            }
        }
    }
}

async fn graceful_stop(
    writer: &WriterHandle,
    client: &mut ReplicationClient,
    state: &StreamState,
) -> Result<(), CaptureError> {
    // Everything up to the last received Commit is queued; wait until it is durable, report
    // it, and give the feedback a moment to reach the server before ending the stream.
    if state.last_commit_end > Lsn::ZERO {
        writer.wait_durable(state.last_commit_end).await?;
    }
    let durable = writer.durable();
    client.update_applied_lsn(to_wire(durable));
    let metrics = client.metrics();
    let deadline = Instant::now() + Duration::from_secs(3);
    while from_wire(metrics.last_applied_lsn()) < durable && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.stop();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    Ok(())
}

#[derive(Default)]
struct StreamState {
    in_txn: bool,
    wal_end: Lsn,
    last_commit_end: Lsn,
    last_advance: Lsn,
    oldest_pending_commit_us: Option<i64>,
    primary_keys: HashMap<u32, Vec<String>>,
}

fn cells(tuple: Vec<TupleCell>) -> Vec<IncomingCell> {
    tuple
        .into_iter()
        .map(|c| match c {
            TupleCell::Null => IncomingCell::Null,
            TupleCell::UnchangedToast => IncomingCell::UnchangedToast,
            TupleCell::Text(s) => IncomingCell::Text(s),
            // Binary mode is never requested; keep the bytes as hex text rather than lose them.
            TupleCell::Binary(b) => {
                IncomingCell::Text(b.iter().map(|x| format!("{x:02x}")).collect())
            }
        })
        .collect()
}

fn old_image(old: OldTuple) -> OldImage {
    match old {
        OldTuple::Key(t) => OldImage::Key(cells(t)),
        OldTuple::Full(t) => OldImage::Full(cells(t)),
    }
}

/// Normalise a context payload to JSON text: valid JSON is kept as sent, anything else is
/// kept as a JSON string so that nothing is lost and queries can still parse it.
fn context_json(content: &[u8]) -> String {
    let text = String::from_utf8_lossy(content);
    if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
        text.into_owned()
    } else {
        serde_json::Value::String(text.into_owned()).to_string()
    }
}

async fn handle_event(
    event: ReplicationEvent,
    state: &mut StreamState,
    sql: &tokio_postgres::Client,
    limit: Duration,
) -> Result<Vec<LogOp>, CaptureError> {
    Ok(match event {
        ReplicationEvent::Begin {
            final_lsn,
            xid,
            commit_time_micros,
        } => {
            state.in_txn = true;
            let committed_at_us = commit_time_micros + PG_EPOCH_OFFSET_US;
            state
                .oldest_pending_commit_us
                .get_or_insert(committed_at_us);
            vec![LogOp::Begin {
                final_lsn: from_wire(final_lsn),
                xid,
                committed_at_us,
            }]
        }
        ReplicationEvent::Commit { end_lsn, .. } => {
            state.in_txn = false;
            state.last_commit_end = from_wire(end_lsn);
            state.wal_end = state.wal_end.max(state.last_commit_end);
            vec![LogOp::Commit {
                end_lsn: from_wire(end_lsn),
            }]
        }
        ReplicationEvent::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            if transactional && prefix == CONTEXT_PREFIX {
                vec![LogOp::Context(context_json(&content))]
            } else {
                let message = LogicalMessage {
                    transactional,
                    prefix,
                    content: content.to_vec(),
                };
                if transactional {
                    vec![LogOp::Message(message)]
                } else {
                    vec![LogOp::NonTransactionalMessage {
                        lsn: from_wire(lsn),
                        at_us: now_us(),
                        message,
                    }]
                }
            }
        }
        ReplicationEvent::KeepAlive { wal_end, .. } => {
            let wal_end = from_wire(wal_end);
            state.wal_end = state.wal_end.max(wal_end);
            // Between transactions every transaction of the captured tables that commits
            // before the server's WAL end has been received (they are sent in commit order),
            // so once the writer has stored what was queued before this op, the WAL end may
            // be acknowledged: this keeps the slot moving when the captured tables are idle.
            if !state.in_txn && wal_end > state.last_advance {
                state.last_advance = wal_end;
                vec![LogOp::Advance(wal_end)]
            } else {
                Vec::new()
            }
        }
        ReplicationEvent::XLogData {
            wal_start, data, ..
        } => {
            let message = pgoutput::decode(&data).map_err(|source| CaptureError::Decode {
                lsn: from_wire(wal_start),
                source,
            })?;
            match message {
                Message::Relation(r) => {
                    let primary_key = match state.primary_keys.get(&r.id) {
                        Some(pk) => pk.clone(),
                        None => {
                            // Bounded: the SQL connection may sit in the same dead network
                            // as the stream.
                            let pk = within(
                                limit,
                                "reading a primary key",
                                slot::primary_key(sql, r.id),
                            )
                            .await?;
                            state.primary_keys.insert(r.id, pk.clone());
                            pk
                        }
                    };
                    vec![LogOp::Relation(RelationVersion {
                        relation_id: r.id,
                        valid_from: ChangeKey::default(),
                        schema: r.schema,
                        name: r.name,
                        replica_identity: r.replica_identity,
                        columns: r
                            .columns
                            .into_iter()
                            .map(|c| Column {
                                name: c.name,
                                type_oid: c.type_oid,
                                type_modifier: c.type_modifier,
                                is_key: c.is_key,
                            })
                            .collect(),
                        primary_key,
                    })]
                }
                Message::Type { oid, schema, name } => vec![LogOp::Type { oid, schema, name }],
                Message::Insert { relation_id, new } => vec![LogOp::Change(IncomingChange {
                    relation_id,
                    op: Op::Insert,
                    old: None,
                    new: Some(cells(new)),
                })],
                Message::Update {
                    relation_id,
                    old,
                    new,
                } => vec![LogOp::Change(IncomingChange {
                    relation_id,
                    op: Op::Update,
                    old: old.map(old_image),
                    new: Some(cells(new)),
                })],
                Message::Delete { relation_id, old } => vec![LogOp::Change(IncomingChange {
                    relation_id,
                    op: Op::Delete,
                    old: Some(old_image(old)),
                    new: None,
                })],
                Message::Truncate { relation_ids, .. } => relation_ids
                    .into_iter()
                    .map(|relation_id| {
                        LogOp::Change(IncomingChange {
                            relation_id,
                            op: Op::Truncate,
                            old: None,
                            new: None,
                        })
                    })
                    .collect(),
                Message::Origin { .. } => Vec::new(),
                // Begin, Commit and Message arrive as their own events from the client.
                Message::Begin { .. } | Message::Commit { .. } | Message::Message { .. } => {
                    Vec::new()
                }
            }
        }
        ReplicationEvent::StoppedAt { .. } => Vec::new(),
    })
}
