//! The replication connection, and the one file that knows the replication library
//! (`pgwire-replication`: CopyBoth, a flush position the caller controls).
//!
//! The rest of capture speaks [`ReplicationStream`] and [`StreamEvent`] in pgtrail's own
//! types (LSNs, Unix-epoch times, [`ReplicationError`]), so that replacing the library (TLS
//! and channel binding may need a connection of pgtrail's own) changes this file alone.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgtrail_store::Lsn;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationEvent};

use super::{SESSION_OPTIONS, SourceConfig};
use crate::error::{CaptureError, ErrorKind, ReplicationError, sqlstate_kind};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What the server says about itself on a replication connection (IDENTIFY_SYSTEM).
#[derive(Clone, Debug)]
pub struct SystemIdentity {
    /// The cluster's system identifier (decimal text).
    pub system_id: String,
    pub timeline: u32,
    /// The server's WAL flush position.
    pub wal_position: Lsn,
}

/// A replication stream's events, as capture uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// The server's heartbeat, with its WAL end.
    KeepAlive {
        wal_end: Lsn,
    },
    Begin {
        final_lsn: Lsn,
        xid: u32,
        /// Commit time, microseconds since the Unix epoch.
        committed_at_us: i64,
    },
    Commit {
        end_lsn: Lsn,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    /// Any other pgoutput message, undecoded.
    Data {
        wal_start: Lsn,
        data: Bytes,
    },
    /// The stream stopped at a position it was asked to stop at.
    StoppedAt,
}

/// One replication connection: gated (commands may run before START_REPLICATION), then a
/// stream whose acknowledged position only [`ReplicationStream::acknowledge`] moves.
pub struct ReplicationStream {
    client: ReplicationClient,
}

impl ReplicationStream {
    /// Connect for replication from `slot` through `publication`. `resume_from` is where the
    /// stream starts and what it acknowledges until told otherwise (`None` for a new slot).
    /// `wakeup` is how often a status update is sent while the stream is idle.
    pub async fn connect(
        source: &SourceConfig,
        slot: &str,
        publication: &str,
        resume_from: Option<Lsn>,
        wakeup: Duration,
    ) -> Result<ReplicationStream, CaptureError> {
        let mut config = pgwire_replication::ReplicationConfig::new(
            source.host_text(),
            source.user(),
            source.password().unwrap_or_default(),
            source.database(),
            slot,
            publication,
        )
        .with_port(source.port())
        .with_tls(pgwire_replication::TlsConfig::disabled())
        .with_options(SESSION_OPTIONS)
        .with_application_name("pgtrail")
        .with_status_interval(Duration::from_millis(500))
        .with_wakeup_interval(wakeup);
        if let Some(from) = resume_from {
            config = config
                .with_start_lsn(to_wire(from))
                .with_ack_lsn(to_wire(from));
        }
        let client = ReplicationClient::connect_gated(config).await?;
        Ok(ReplicationStream { client })
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, CaptureError> {
        let system = self.client.identify_system().await?;
        Ok(SystemIdentity {
            system_id: system.system_id,
            timeline: system.timeline,
            wal_position: from_wire(system.xlogpos),
        })
    }

    /// CREATE_REPLICATION_SLOT with an exported snapshot: the slot's consistent point and the
    /// snapshot's name (valid while this connection stays idle).
    pub async fn create_slot_exporting_snapshot(
        &mut self,
        slot: &str,
    ) -> Result<(Lsn, String), CaptureError> {
        let rows = self
            .client
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                pgtrail_store::always_quoted(slot)
            ))
            .await?;
        let row = rows.first().ok_or_else(|| {
            CaptureError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
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
        Ok((consistent_point, text(2)?))
    }

    /// Send START_REPLICATION; [`ReplicationStream::wait_started`] says whether it was taken.
    pub async fn start(&mut self) -> Result<(), CaptureError> {
        Ok(self.client.start().await?)
    }

    /// Wait until the server streams from the slot (and so holds it for this connection).
    pub async fn wait_started(&mut self) -> Result<(), CaptureError> {
        Ok(self.client.wait_started().await?)
    }

    /// The next event; `None` when the server ended the stream without an error.
    pub async fn recv(&mut self) -> Result<Option<StreamEvent>, CaptureError> {
        Ok(self.client.recv().await?.map(StreamEvent::from))
    }

    /// Report `position` to the server as flushed: the slot's `confirmed_flush_lsn` follows
    /// it, and PostgreSQL may then recycle the WAL before it. Callers pass only what the
    /// archive holds durably.
    pub fn acknowledge(&self, position: Lsn) {
        self.client.update_applied_lsn(to_wire(position));
    }

    /// End the stream after giving the last acknowledgement (up to 3 s) to reach the server.
    pub async fn close(mut self, acknowledged: Lsn) {
        let metrics = self.client.metrics();
        let deadline = Instant::now() + Duration::from_secs(3);
        while from_wire(metrics.last_applied_lsn()) < acknowledged && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.client.stop();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.shutdown()).await;
    }
}

impl From<ReplicationEvent> for StreamEvent {
    fn from(event: ReplicationEvent) -> StreamEvent {
        match event {
            ReplicationEvent::KeepAlive { wal_end, .. } => StreamEvent::KeepAlive {
                wal_end: from_wire(wal_end),
            },
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => StreamEvent::Begin {
                final_lsn: from_wire(final_lsn),
                xid,
                committed_at_us: commit_time_micros + PG_EPOCH_OFFSET_US,
            },
            ReplicationEvent::Commit { end_lsn, .. } => StreamEvent::Commit {
                end_lsn: from_wire(end_lsn),
            },
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => StreamEvent::Message {
                transactional,
                lsn: from_wire(lsn),
                prefix,
                content,
            },
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => StreamEvent::Data {
                wal_start: from_wire(wal_start),
                data,
            },
            ReplicationEvent::StoppedAt { .. } => StreamEvent::StoppedAt,
        }
    }
}

fn to_wire(lsn: Lsn) -> pgwire_replication::Lsn {
    pgwire_replication::Lsn::from_u64(lsn.0)
}

fn from_wire(lsn: pgwire_replication::Lsn) -> Lsn {
    Lsn(lsn.as_u64())
}

/// The SQLSTATE a server error message carries as "(SQLSTATE 55006)".
fn sqlstate_in(message: &str) -> Option<&str> {
    let at = message.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    let code = message.get(at..at + 5)?;
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then_some(code)
}

impl From<PgWireError> for ReplicationError {
    fn from(e: PgWireError) -> ReplicationError {
        use PgWireError as W;
        let message = e.to_string();
        let sqlstate = match &e {
            W::Server(text) => sqlstate_in(text).map(str::to_string),
            _ => None,
        };
        let kind = match &e {
            W::Auth(_) | W::Tls(_) => ErrorKind::Setup,
            W::Server(_) => sqlstate
                .as_deref()
                .map_or(ErrorKind::Transient, sqlstate_kind),
            // The replication worker already ended and its error was lost: `recv` takes the
            // worker's join handle before awaiting it, so when the stream's select! drops that
            // recv future for another branch, the next recv finds no handle. The connection is
            // gone and nothing past the durable position was acknowledged, so reconnecting is
            // safe. (Found by pgtrail-torture's soak; the cancellation gap is
            // pgwire-replication's, and its message is the library's own, not the server's.)
            W::Internal(text) if text.contains("already joined") => ErrorKind::Transient,
            W::MessageTooLarge { .. } | W::Protocol(_) | W::Internal(_) => ErrorKind::Fatal,
            _ => ErrorKind::Transient,
        };
        ReplicationError::new(kind, sqlstate, message)
    }
}

impl From<PgWireError> for CaptureError {
    fn from(e: PgWireError) -> CaptureError {
        CaptureError::Replication(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PgWireError as W;

    #[test]
    fn a_replication_worker_that_already_ended_is_a_reconnect_not_a_stop() {
        let ended = CaptureError::from(W::Internal("replication worker already joined".into()));
        assert_eq!(ended.kind(), ErrorKind::Transient);
        let terminated = CaptureError::from(W::Server(
            "terminating connection due to administrator command (SQLSTATE 57P01)".into(),
        ));
        assert_eq!(terminated.kind(), ErrorKind::Transient);
        assert_eq!(
            CaptureError::from(W::Protocol("bad frame".into())).kind(),
            ErrorKind::Fatal
        );
        assert_eq!(
            CaptureError::from(W::Internal("something else".into())).kind(),
            ErrorKind::Fatal
        );
    }

    /// The server's errors are classified by SQLSTATE, whatever language the message is in.
    #[test]
    fn server_errors_are_classified_by_sqlstate_not_by_their_text() {
        let kind = |text: &str| CaptureError::from(W::Server(text.into())).kind();
        // A slot another consumer streams, in German (lc_messages = 'de_DE').
        assert_eq!(
            kind("Replikations-Slot »s« ist aktiv für PID 42 (SQLSTATE 55006)"),
            ErrorKind::Setup
        );
        assert_eq!(
            kind("replication slot \"s\" does not exist (SQLSTATE 42704)"),
            ErrorKind::Setup
        );
        assert_eq!(
            kind("can no longer get changes from replication slot \"s\" (SQLSTATE 55000)"),
            ErrorKind::Setup
        );
        assert_eq!(
            kind("the database system is starting up (SQLSTATE 57P03)"),
            ErrorKind::Transient
        );
        // English text that once decided, without its code, no longer does.
        assert_eq!(kind("permission denied"), ErrorKind::Transient);
        let slot_in_use = ReplicationError::from(W::Server(
            "replication slot \"s\" is active for PID 42 (SQLSTATE 55006)".into(),
        ));
        assert_eq!(slot_in_use.sqlstate(), Some("55006"));
        assert_eq!(sqlstate_in("no code here"), None);
        assert_eq!(sqlstate_in("truncated (SQLSTATE 55"), None);
    }

    /// Commit times arrive in PostgreSQL's epoch (2000-01-01) and leave in Unix's.
    #[test]
    fn begin_times_are_moved_to_the_unix_epoch() {
        let begin = StreamEvent::from(ReplicationEvent::Begin {
            final_lsn: pgwire_replication::Lsn::from_u64(0x16_0000_0028),
            xid: 7,
            commit_time_micros: 0,
        });
        assert_eq!(
            begin,
            StreamEvent::Begin {
                final_lsn: Lsn(0x16_0000_0028),
                xid: 7,
                committed_at_us: 946_684_800_000_000,
            }
        );
    }
}
