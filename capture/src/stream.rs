//! The stream loop: events in, log operations to the writer, acknowledgements out.
//!
//! The writer publishes the position its last *durable* redb commit covers, and only that
//! position is acknowledged ([`ReplicationStream::acknowledge`], which PostgreSQL keeps as the
//! slot's `confirmed_flush_lsn`). A crash at any line therefore leaves the slot at or behind
//! what the archive durably holds: PostgreSQL sends the rest again, and the log skips what it
//! already has by commit LSN.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{CaptureError, ReplicationError, within};
use crate::liveness::Liveness;
use crate::run::{Progress, fill_stats};
use crate::session::Session;
use crate::slot;
use crate::source::replication::ReplicationStream;
use crate::table_sync::{self, PendingSync, TableWatch};
use crate::translate::{PrimaryKeys, Translator};
use crate::writer::WriterHandle;
use pgtrail_store::now_us;

/// Primary keys read from the source's catalog, once per relation and session.
struct CatalogKeys<'a> {
    sql: &'a tokio_postgres::Client,
    /// Bounded: the SQL connection may sit in the same dead network as the stream.
    limit: Duration,
    known: HashMap<u32, Vec<String>>,
}

impl PrimaryKeys for CatalogKeys<'_> {
    async fn primary_key(&mut self, relation_id: u32) -> Result<Vec<String>, CaptureError> {
        if let Some(pk) = self.known.get(&relation_id) {
            return Ok(pk.clone());
        }
        let pk = within(
            self.limit,
            "reading a primary key",
            slot::primary_key(self.sql, relation_id),
        )
        .await?;
        self.known.insert(relation_id, pk.clone());
        Ok(pk)
    }
}

impl Session<'_> {
    /// Stream from the slot until `shutdown` or the configured stop position (`Ok`), or an
    /// error.
    pub async fn stream(
        &mut self,
        mut client: ReplicationStream,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        on_progress: &mut impl FnMut(&Progress),
    ) -> Result<(), CaptureError> {
        let config = self.config;
        let started = within(
            config.stream_timeout,
            "START_REPLICATION",
            client.wait_started(),
        )
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
        *self.own_walsender = slot::slot_state(&self.sql, &config.slot)
            .await?
            .and_then(|s| s.active_pid);
        let mut liveness = Liveness::new(config.stream_timeout, *self.own_walsender);
        let writer = &*self.writer;
        tracing::info!(slot = %config.slot, from = %writer.durable(), "streaming");
        let mut durable_rx = writer.durable_watch();
        // Safe: what the writer's last durable commit covers.
        client.acknowledge(writer.durable());
        let mut translator = Translator::default();
        if let Some(stop) = config.stop_at
            && writer.durable() >= stop
        {
            graceful_stop(writer, client, &translator).await?;
            return Ok(());
        }
        let mut keys = CatalogKeys {
            sql: &self.sql,
            limit: config.stream_timeout,
            known: HashMap::new(),
        };
        // Tables that join while capture runs (see `table_sync`): looked for at once, then
        // every catalog interval; one sync at a time waits for the stream to reach its point.
        let mut watch = TableWatch::of_archive(writer)?;
        let mut catalog_tick = tokio::time::interval(config.catalog_interval);
        catalog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<PendingSync> = None;
        // A run that stops at an LSN looks at the catalog once more after reaching it (the
        // stream has then shown every TRUNCATE before it), and stores what that look finds.
        let mut looked_past_stop = false;
        let mut tick = tokio::time::interval(config.progress_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_tick = (Instant::now(), 0u64, 0u64);
        let summary = &mut *self.summary;
        // Asked to stop with a table read in hand: until when the stream may still bring its
        // point (see the shutdown branch).
        let mut stopping: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.as_mut(), if stopping.is_none() => {
                    stopping = Some(tokio::time::Instant::now() + config.stream_timeout);
                    if pending.is_none() {
                        // A last look at the catalog, once everything received is durable:
                        // a column name that came and went since the previous look is in the
                        // archive but no look has compared it with the catalog yet, and the
                        // archive would answer rows under it (wrong) until the next run.
                        // Torture's TLS tier found that window at a SIGTERM.
                        pending = last_look(&mut watch, &self.sql, config, &translator, writer).await?;
                        if pending.is_none() {
                            graceful_stop(writer, client, &translator).await?;
                            return Ok(());
                        }
                    }
                    // A table read in hand is stored when the stream reaches its point (the
                    // fence the copy wrote is on its way): store it first, for a bounded time,
                    // so that the archive records the span it makes unknown rather than
                    // answer the old rows there until a later run reads the table again.
                    tracing::info!("stopping: storing the table read in hand first");
                }
                _ = tokio::time::sleep_until(stopping.unwrap_or_else(tokio::time::Instant::now)), if stopping.is_some() => {
                    // Safe: nothing of the read was stored or acknowledged; the next run finds
                    // the same change in the catalog and reads the table again.
                    tracing::warn!("stopping without the table read in hand: the stream did not reach its point in time; the next run reads the table again");
                    graceful_stop(writer, client, &translator).await?;
                    return Ok(());
                }
                changed = durable_rx.changed() => {
                    if changed.is_err() {
                        return Err(CaptureError::WriterGone);
                    }
                    let durable = *durable_rx.borrow_and_update();
                    // Safe: `durable` is what the writer's last durable commit covers.
                    client.acknowledge(durable);
                    if let Some(observer) = &config.durable_observer {
                        (observer.0)(durable);
                    }
                    // The catalog is looked at, and a table copy waiting for the stream stored,
                    // first: a run that stops at an LSN captures the tables that joined before.
                    if let Some(stop) = config.stop_at && durable >= stop && pending.is_none() {
                        if looked_past_stop {
                            graceful_stop(writer, client, &translator).await?;
                            return Ok(());
                        }
                        catalog_tick.reset_immediately();
                    }
                }
                event = client.recv() => {
                    let event = event?;
                    liveness.heard();
                    let Some(event) = event else {
                        return Err(CaptureError::Replication(ReplicationError::stream_ended()));
                    };
                    let ops = translator.translate(event, &mut keys).await?;
                    if translator.take_types_named() {
                        watch.note_types();
                    }
                    if let Some(notes) = translator.take_setup_notes()
                        && watch.note_setup(notes)
                    {
                        // DDL noted: look now, so that a rewrite is read again sooner (and
                        // dated by its DDL).
                        catalog_tick.reset_immediately();
                    }
                    if let Some(sync) = PendingSync::take_due(&mut pending, &ops) {
                        // Between transactions, before the first operation at or past the
                        // copy's point: nothing keyed after it has reached the writer, so the
                        // position cannot have passed it.
                        let (tables, since, point) = (sync.tables(), sync.since(), sync.point);
                        let rows = sync.store(writer).await?;
                        tracing::info!(tables = tables.len(), rows, %point, "tables read whole stored: captured in step from here on");
                        watch.hold_read(since, tables);
                        // With the next commit, after the copy's: a restart then compares the
                        // tables read with the membership their read was decided with.
                        if let Some(memberships) = watch.memberships_to_record() {
                            writer.send(vec![pgtrail_store::LogOp::Memberships(memberships)]).await?;
                        }
                        // Tests hold the capture here: a table read, its next look not come.
                        pgtrail_store::crashpoint::pause("sync:after_store");
                        summary.snapshot_rows += rows;
                    }
                    if !ops.is_empty() {
                        writer.send(ops).await?;
                    }
                    if stopping.is_some() && pending.is_none() {
                        graceful_stop(writer, client, &translator).await?;
                        return Ok(());
                    }
                }
                _ = catalog_tick.tick(), if pending.is_none() => {
                    let past_stop = config.stop_at.is_some_and(|stop| writer.durable() >= stop);
                    let plan = within(config.stream_timeout, "looking at the catalog", watch.due(&self.sql, config, &translator, &writer.shared_log())).await?;
                    pending = carry_out(plan, &self.sql, config, writer).await?;
                    looked_past_stop |= past_stop;
                    if looked_past_stop && pending.is_none() {
                        graceful_stop(writer, client, &translator).await?;
                        return Ok(());
                    }
                }
                _ = liveness.tick.tick() => liveness.check(&self.sql, &config.slot).await?,
                _ = tick.tick() => {
                    let durable = writer.durable();
                    fill_stats(summary, writer);
                    let elapsed = last_tick.0.elapsed().as_secs_f64().max(1e-3);
                    summary.changes_per_sec = (summary.changes - last_tick.1) as f64 / elapsed;
                    summary.transactions_per_sec = (summary.transactions - last_tick.2) as f64 / elapsed;
                    last_tick = (Instant::now(), summary.changes, summary.transactions);
                    summary.durable = durable;
                    summary.streaming = true;
                    summary.lag_bytes = translator.wal_end.0.saturating_sub(durable.0);
                    summary.lag_seconds = match translator.oldest_pending_commit_us {
                        Some(at) if translator.last_commit_end > durable => ((now_us() - at) as f64 / 1e6).max(0.0),
                        _ => 0.0,
                    };
                    if translator.last_commit_end <= durable {
                        translator.oldest_pending_commit_us = None;
                    }
                    on_progress(summary);
                }
            }
        }
    }
}

/// Send what a look keeps to the writer and start its table reads (a sync waiting for the
/// stream to reach its point), if it found any.
async fn carry_out(
    mut plan: table_sync::SyncPlan,
    sql: &tokio_postgres::Client,
    config: &crate::run::CaptureConfig,
    writer: &WriterHandle,
) -> Result<Option<PendingSync>, CaptureError> {
    let marks_reads = plan.pending_reads.is_some();
    let records = plan.records();
    if !records.is_empty() {
        writer.send(records).await?;
    }
    if plan.is_empty() {
        return Ok(None);
    }
    if marks_reads {
        // The reads decided on are durable before the copy: see `TableWatch::due`.
        writer.flush().await?;
    }
    Ok(Some(table_sync::sync(config, sql, plan).await?))
}

/// The look at the catalog a stop makes, after everything received is durable (so that every
/// schema version the stream brought is compared with the catalog). Only what makes stored
/// rows wrong is acted on (rewrites, names that came and went, drops, schema changes): a new
/// table waits for the next run rather than hold the stop for its copy. A look the source
/// cannot answer now (unreachable, timed out) is said and skipped: the next run makes it.
async fn last_look(
    watch: &mut TableWatch,
    sql: &tokio_postgres::Client,
    config: &crate::run::CaptureConfig,
    translator: &Translator,
    writer: &WriterHandle,
) -> Result<Option<PendingSync>, CaptureError> {
    if translator.last_commit_end > pgtrail_store::Lsn::ZERO {
        writer.wait_durable(translator.last_commit_end).await?;
    }
    let look = async {
        let mut plan = watch
            .due(sql, config, translator, &writer.shared_log())
            .await?;
        plan.copy.retain(|(_, scope)| scope.unknown_from.is_some());
        carry_out(plan, sql, config, writer).await
    };
    match within(
        config.stream_timeout,
        "looking at the catalog before stopping",
        look,
    )
    .await
    {
        // The source unreachable or busy: stop without it (the next run looks first).
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "stopping without a last look at the catalog; the next run makes it");
            Ok(None)
        }
        answer => answer,
    }
}

/// End the stream cleanly: everything up to the last received Commit is queued; wait until it
/// is durable, acknowledge it, and give the acknowledgement a moment to reach the server.
async fn graceful_stop(
    writer: &WriterHandle,
    client: ReplicationStream,
    translator: &Translator,
) -> Result<(), CaptureError> {
    if translator.last_commit_end > pgtrail_store::Lsn::ZERO {
        writer.wait_durable(translator.last_commit_end).await?;
    }
    let durable = writer.durable();
    // Safe: durable, as just waited for.
    client.acknowledge(durable);
    client.close(durable).await;
    Ok(())
}
