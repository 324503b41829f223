//! One capture session: from connecting to the source to a started replication stream.
//!
//! How a session begins is decided from what the archive holds ([`Start`]): a new archive
//! takes the initial snapshot; one whose snapshot did not finish takes it again; one with a
//! complete snapshot resumes from its durable position, after the slot has been compared with
//! the archive (existence, system identifier, `wal_status`, `confirmed_flush_lsn` not ahead of
//! the archive), because the server silently starts from the slot's position: any mismatch is
//! a recorded gap and a stop, never a silent resume.

use std::time::{Duration, Instant};

use pgtrail_store::{Gap, Lsn, SourceIdentity, now_us};

use crate::error::{CaptureError, within};
use crate::run::{CaptureConfig, Progress};
use crate::source::replication::{ReplicationStream, SystemIdentity};
use crate::writer::WriterHandle;
use crate::{liveness, preflight, slot, snapshot};

/// How long a slot held by another connection is waited for before it counts as in use.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(20);

/// What one session works with. The writer, the figures and the walsender of the previous
/// session outlive it; the SQL connection is its own.
pub(crate) struct Session<'a> {
    pub config: &'a CaptureConfig,
    pub writer: &'a mut WriterHandle,
    pub sql: tokio_postgres::Client,
    pub summary: &'a mut Progress,
    /// The walsender of this process's latest session: after a network failure the server may
    /// still hold the slot for it until `wal_sender_timeout`, and only that one may be waited
    /// out.
    pub own_walsender: &'a mut Option<i32>,
}

/// How a session begins, decided from what the archive holds alone.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// The initial snapshot is complete: check the slot, then continue from the durable
    /// position. `mark_complete`: the snapshot is durable but its completion mark is not.
    Resume {
        identity: SourceIdentity,
        mark_complete: bool,
    },
    /// The initial snapshot did not finish: nothing of it is in the archive (the log's recovery
    /// removed the partial rows) and nothing was acknowledged past the slot's creation, so its
    /// slot is dropped and the snapshot taken again.
    RetakeSnapshot,
    /// A new archive.
    New,
}

fn decide(
    stored: Option<&SourceIdentity>,
    durable: Lsn,
    config: &CaptureConfig,
) -> Result<Start, CaptureError> {
    let Some(id) = stored else {
        return Ok(Start::New);
    };
    if id.slot != config.slot || id.publication != config.publication {
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
    // The snapshot transaction is stored just before the consistent point: once that is
    // durable, only the completion mark can be missing.
    let mark_complete =
        !id.snapshot_complete && id.consistent_point > Lsn::ZERO && durable >= id.consistent_point;
    Ok(if id.snapshot_complete || mark_complete {
        Start::Resume {
            identity: id.clone(),
            mark_complete,
        }
    } else {
        Start::RetakeSnapshot
    })
}

impl<'a> Session<'a> {
    /// Connect to the source and check that capture can work there.
    pub async fn open(
        config: &'a CaptureConfig,
        writer: &'a mut WriterHandle,
        summary: &'a mut Progress,
        own_walsender: &'a mut Option<i32>,
    ) -> Result<Session<'a>, CaptureError> {
        let sql = config.source.connect_sql().await?;
        preflight::check(&sql, config.source.user()).await?;
        Ok(Session {
            config,
            writer,
            sql,
            summary,
            own_walsender,
        })
    }

    /// A replication stream that START_REPLICATION has been sent on, from where the archive
    /// continues (after a new or retaken initial snapshot, if one was needed).
    pub async fn begin(&mut self) -> Result<ReplicationStream, CaptureError> {
        let config = self.config;
        let durable = self.writer.durable();
        match decide(self.writer.stored_identity(), durable, config)? {
            Start::Resume {
                mut identity,
                mark_complete,
            } => {
                if mark_complete {
                    identity.snapshot_complete = true;
                    self.writer.set_identity(identity.clone()).await?;
                }
                self.resume(&identity).await
            }
            Start::RetakeSnapshot => {
                if self.slot_when_released().await?.is_some() {
                    tracing::warn!(slot = %config.slot, "dropping the slot of an interrupted initial snapshot to take it again");
                    slot::drop_slot(&self.sql, &config.slot).await?;
                }
                self.initial_snapshot().await
            }
            Start::New => {
                if slot::slot_state(&self.sql, &config.slot).await?.is_some() {
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
                self.initial_snapshot().await
            }
        }
    }

    /// Continue an archive whose initial snapshot is complete.
    async fn resume(&mut self, id: &SourceIdentity) -> Result<ReplicationStream, CaptureError> {
        let config = self.config;
        // An exact --tables list is set on the publication here; the default and patterns add
        // new tables as the stream's catalog watch finds them (see `table_sync`).
        if slot::is_exact_list(&config.tables) {
            let (tables, _) = slot::choose_tables(&self.sql, &config.tables).await?;
            slot::ensure_publication(&self.sql, &config.publication, tables, true).await?;
        }
        let durable = self.writer.durable();
        let (mut client, system) = self.connect_replication(Some(durable)).await?;
        // Checked before the slot, and never answered by --resnapshot: another cluster's LSNs
        // are another history, and continuing this archive from them would interleave the two.
        if system.system_id != id.system_id {
            return Err(self.other_cluster(durable, &system, &id.system_id).await);
        }
        match self.check_slot(id, durable).await {
            Ok(()) => {}
            // Every gap is recorded in the archive before anything else happens.
            Err(CaptureError::Gap {
                reason,
                archive_position,
                source_position,
            }) => {
                let gap = self
                    .record_gap(archive_position, source_position, reason)
                    .await;
                if !(matches!(gap, CaptureError::Gap { .. }) && config.resnapshot) {
                    return Err(gap);
                }
                tracing::warn!(error = %gap, "gap recorded; taking a new snapshot as --resnapshot asks");
                drop(client);
                if slot::slot_state(&self.sql, &config.slot)
                    .await?
                    .is_some_and(|s| !s.active)
                {
                    slot::drop_slot(&self.sql, &config.slot).await?;
                }
                return self.initial_snapshot().await;
            }
            Err(e) => return Err(e),
        }
        client.start().await?;
        Ok(client)
    }

    /// A gated replication connection (see [`ReplicationStream::connect`]) and what the server
    /// says about itself, each within the stream timeout.
    async fn connect_replication(
        &mut self,
        resume_from: Option<Lsn>,
    ) -> Result<(ReplicationStream, SystemIdentity), CaptureError> {
        let config = self.config;
        // Status updates often enough that the liveness check sees several of them arrive at
        // the server within one stream timeout.
        let wakeup =
            (config.stream_timeout / 3).clamp(Duration::from_millis(500), Duration::from_secs(5));
        let limit = config.stream_timeout;
        let mut client = within(limit, "connecting for replication", async {
            ReplicationStream::connect(
                &config.source,
                &config.slot,
                &config.publication,
                resume_from,
                wakeup,
            )
            .await
        })
        .await?;
        let system = within(limit, "IDENTIFY_SYSTEM", client.identify_system()).await?;
        let security = client.security();
        if security.brief() != self.summary.security {
            tracing::info!(%security, "replication connection");
            self.summary.security = security.brief();
        }
        Ok((client, system))
    }

    /// Record that another cluster answered at the source URL (as a gap of no length: nothing
    /// was read from it) and return the error that stops capture.
    async fn other_cluster(
        &self,
        durable: Lsn,
        system: &SystemIdentity,
        expected: &str,
    ) -> CaptureError {
        let reason = format!(
            "a different cluster answered at the source URL (system identifier {} where the archive was captured from {expected}); nothing was read from it",
            system.system_id
        );
        match self.record(durable, durable, reason).await {
            Ok(()) => CaptureError::OtherCluster {
                found: system.system_id.clone(),
                expected: expected.to_string(),
            },
            Err(e) => e,
        }
    }

    /// Record a gap in the archive and return the error that says so (or the writer's error
    /// if it could not be recorded).
    async fn record_gap(
        &self,
        archive_position: Lsn,
        source_position: Lsn,
        reason: String,
    ) -> CaptureError {
        match self
            .record(archive_position, source_position, reason.clone())
            .await
        {
            Ok(()) => CaptureError::Gap {
                reason,
                archive_position,
                source_position,
            },
            Err(e) => e,
        }
    }

    /// Write a [`Gap`] record into the archive, stamped now.
    async fn record(&self, from: Lsn, to: Lsn, reason: String) -> Result<(), CaptureError> {
        let gap = Gap {
            from,
            to,
            reason,
            recorded_at_us: now_us(),
        };
        self.writer.record_gap(gap).await
    }

    /// The slot's state, after waiting for a walsender of a consumer that just died (kill -9,
    /// a dropped network) to release it: the server notices only after a while, so the slot
    /// counts as "in use" only when it stays held for [`SLOT_RELEASE_WAIT`]. A walsender that
    /// served this process's own earlier session (after a network failure) is waited for up
    /// to `wal_sender_timeout` (plus a margin): nothing else can be using that session, and
    /// only the server's timeout ends it. It is not terminated: a walsender blocked writing
    /// into a dead connection would block again sending the termination message to it, and
    /// then hold the slot until the kernel gives up on the socket (found by pgtrail-torture's
    /// black hole).
    async fn slot_when_released(&self) -> Result<Option<slot::SlotState>, CaptureError> {
        let (sql, slot_name) = (&self.sql, self.config.slot.as_str());
        let mut state = slot::slot_state(sql, slot_name).await?;
        let mut wait = SLOT_RELEASE_WAIT;
        if let Some(pid) = state
            .as_ref()
            .and_then(|s| s.active_pid)
            .filter(|pid| Some(*pid) == *self.own_walsender)
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
    async fn check_slot(&self, id: &SourceIdentity, durable: Lsn) -> Result<(), CaptureError> {
        let slot_name = &self.config.slot;
        let Some(state) = self.slot_when_released().await? else {
            let current: String = self
                .sql
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(|e| CaptureError::sql("reading the WAL position", e))?
                .get(0);
            return Err(CaptureError::Gap {
                reason: format!(
                    "replication slot {slot_name:?} no longer exists (dropped, or the server was restored or failed over)"
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
                    "slot {slot_name:?} is not a pgoutput slot of database {:?}",
                    id.database
                ),
                "use the slot this archive was created with",
            ));
        }
        if state.active {
            return Err(CaptureError::setup(
                format!("replication slot {slot_name:?} is in use by another connection"),
                "stop the other consumer (another `pgtrail capture` on this slot?) or use another archive and slot",
            ));
        }
        if state.wal_status.as_deref() == Some("lost") {
            return Err(CaptureError::Gap {
                reason: format!(
                    "replication slot {slot_name:?} was invalidated (wal_status = lost): the WAL it needed is gone"
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
    async fn initial_snapshot(&mut self) -> Result<ReplicationStream, CaptureError> {
        let config = self.config;
        let limit = config.stream_timeout;
        let (tables, excluded) = slot::choose_tables(&self.sql, &config.tables).await?;
        for t in &excluded {
            tracing::warn!(table = %t.qualified, reason = %t.reason, "table left out of the publication");
        }
        // The publication must exist before the slot: a slot decodes with the catalog as of
        // each change, and a publication created later is unknown to its earlier changes.
        let tables = slot::ensure_publication(
            &self.sql,
            &config.publication,
            tables,
            slot::is_exact_list(&config.tables),
        )
        .await?;
        let (mut client, system) = self.connect_replication(None).await?;
        // A re-snapshot (after a gap, or an interrupted one) continues this archive: only from
        // the same cluster, and only forward in LSN order (a snapshot keyed before what the log
        // holds would be taken for a replay and skipped).
        let durable = self.writer.durable();
        if durable > Lsn::ZERO {
            if let Some(prev) = self.writer.stored_identity()
                && prev.system_id != system.system_id
            {
                let expected = prev.system_id.clone();
                return Err(self.other_cluster(durable, &system, &expected).await);
            }
            if system.wal_position <= durable {
                return Err(CaptureError::SourceBehind {
                    archive_position: durable,
                    source_position: system.wal_position,
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
        // Recorded before the slot exists: a crash between creating the slot and the end of
        // the snapshot is then recognised on the next start, which drops this archive's slot
        // and takes the snapshot again (nothing was acknowledged past the slot's creation).
        self.writer.set_identity(identity.clone()).await?;
        // Watched, not bounded: the creation waits for every transaction open on the source
        // (see `liveness::watched`), and a dead connection is a reconnect, which drops the
        // half-made slot and starts again (the identity above says so).
        let (consistent_point, snapshot_name) = liveness::watched(
            &self.sql,
            limit,
            liveness::CopyBackend::SlotHolder(&config.slot),
            "creating the replication slot",
            None,
            client.create_slot_exporting_snapshot(&config.slot, false),
        )
        .await
        .map_err(|e| match &e {
                // 53400 configuration_limit_exceeded: every slot is taken.
                CaptureError::Replication(r) if r.sqlstate() == Some("53400") => CaptureError::setup(
                    format!("cannot create replication slot {:?}: {r}", config.slot),
                    "raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = 10; then restart PostgreSQL), or drop a slot nobody uses (SELECT slot_name, active, wal_status FROM pg_replication_slots; SELECT pg_drop_replication_slot('name');)",
                ),
                _ => e,
            })?;
        if durable > Lsn::ZERO && Lsn(consistent_point.0.saturating_sub(1)) < durable {
            // Nothing was read from the slot yet: dropping it loses nothing.
            drop(client);
            slot::drop_slot(&self.sql, &config.slot).await?;
            return Err(CaptureError::SourceBehind {
                archive_position: durable,
                source_position: consistent_point,
            });
        }
        identity.consistent_point = consistent_point;
        self.writer.set_identity(identity.clone()).await?;
        tracing::info!(slot = %config.slot, %consistent_point, tables = tables.len(), "slot created; copying the initial snapshot");
        // The replication session stays idle (it holds the exported snapshot) while an
        // ordinary connection copies the tables inside that snapshot.
        let (snapshot_sql, copier) =
            liveness::copy_connection(&config.source, &config.slot, limit).await?;
        let progress = std::sync::atomic::AtomicU64::new(0);
        let rows = liveness::watched(
            &self.sql,
            limit,
            copier,
            "the initial snapshot",
            Some(&progress),
            snapshot::copy_tables(
                &snapshot_sql,
                &snapshot_name,
                consistent_point,
                &tables,
                self.writer,
                &progress,
            ),
        )
        .await?;
        self.writer.wait_durable(consistent_point).await?;
        identity.snapshot_complete = true;
        self.writer.set_identity(identity).await?;
        self.summary.snapshot_rows += rows;
        tracing::info!(rows, "initial snapshot stored");
        client.start().await?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceConfig;

    fn config() -> CaptureConfig {
        CaptureConfig {
            source: SourceConfig::parse("postgresql://u@localhost/db").unwrap(),
            archive: "unused".into(),
            slot: "s".into(),
            publication: "p".into(),
            tables: Vec::new(),
            resnapshot: false,
            progress_interval: Duration::from_secs(1),
            stream_timeout: Duration::from_secs(30),
            stop_at: None,
            catalog_interval: crate::run::DEFAULT_CATALOG_INTERVAL,
            compaction: None,
            durable_observer: None,
        }
    }

    #[test]
    fn a_session_begins_from_what_the_archive_holds() {
        let config = config();
        assert_eq!(decide(None, Lsn::ZERO, &config).unwrap(), Start::New);
        let mut id = SourceIdentity {
            slot: "s".into(),
            publication: "p".into(),
            ..SourceIdentity::default()
        };
        // Recorded before the slot was created (no consistent point yet), or the snapshot not
        // yet durable: take it again.
        assert_eq!(
            decide(Some(&id), Lsn::ZERO, &config).unwrap(),
            Start::RetakeSnapshot
        );
        id.consistent_point = Lsn(100);
        assert_eq!(
            decide(Some(&id), Lsn(99), &config).unwrap(),
            Start::RetakeSnapshot
        );
        // The snapshot is durable, its mark is not: resume, and write the mark first.
        assert_eq!(
            decide(Some(&id), Lsn(100), &config).unwrap(),
            Start::Resume {
                identity: id.clone(),
                mark_complete: true
            }
        );
        id.snapshot_complete = true;
        assert_eq!(
            decide(Some(&id), Lsn(100), &config).unwrap(),
            Start::Resume {
                identity: id.clone(),
                mark_complete: false
            }
        );
        // Another slot or publication than the archive's: a setup error naming both.
        id.slot = "other".into();
        let err = decide(Some(&id), Lsn(100), &config).unwrap_err();
        assert!(err.to_string().contains("\"other\""), "{err}");
    }
}
