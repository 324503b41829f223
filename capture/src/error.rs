//! Errors of capture, classified by what the operator must do.

use pgtrail_store::{LogError, Lsn};

use crate::pgoutput::DecodeError;

/// What an error asks of the operator (see [`CaptureError::kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection dropped or the server is restarting: reconnect with backoff.
    Transient,
    /// The configuration must change (privileges, settings, names): stop and say how.
    Setup,
    /// The archive and the source disagree about history, or the archive is damaged: stop,
    /// never guess.
    Fatal,
}

/// An error of `pgtrail capture`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    #[error(
        "invalid source URL: {detail} (expected postgresql://user[:password]@host[:port]/database)"
    )]
    InvalidUrl { detail: String },
    #[error("cannot connect to the source database at {target}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{problem}\n  fix: {fix}")]
    Setup { problem: String, fix: String },
    #[error(
        "gap in the archive: {reason} (the archive holds the source's changes up to {archive_position}; the source can now only provide them from {source_position}). The gap is recorded in the archive. To continue, start a new archive directory (a fresh initial snapshot), or pass --resnapshot to take a new snapshot into this one with the gap recorded"
    )]
    Gap {
        reason: String,
        archive_position: Lsn,
        source_position: Lsn,
    },
    #[error(
        "the source at this URL is a different PostgreSQL cluster (system identifier {found}; this archive was captured from {expected}). Nothing was read from it; the event is recorded in the archive. Point --source at the original cluster, or start a new archive directory for this one (--resnapshot cannot continue an archive from another cluster: its LSNs are another history)"
    )]
    OtherCluster { found: String, expected: String },
    #[error(
        "the source's WAL position ({source_position}) is behind what this archive holds ({archive_position}): it was restored from a backup or is another server. This archive's history cannot continue from it in LSN order; start a new archive directory"
    )]
    SourceBehind {
        archive_position: Lsn,
        source_position: Lsn,
    },
    #[error("source query failed: {context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("replication stream failed")]
    Replication(#[source] pgwire_replication::PgWireError),
    /// The replication connection is dead without having said so (a network black hole, a
    /// middlebox that dropped the connection): found by the stream liveness check.
    #[error("the replication stream went silent: {why}; reconnecting")]
    StreamSilent { why: String },
    /// A column changed between the slot's snapshot and the copy of its table (catalog
    /// queries see the snapshot, the COPY's parser the current catalog): the snapshot is
    /// taken again.
    #[error("the initial snapshot of {table} raced a schema change ({detail}); taking it again")]
    SnapshotRaced { table: String, detail: String },
    #[error("cannot decode a replication message near {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: DecodeError,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("archive log error")]
    Log(#[from] LogError),
    #[error("the archive writer thread stopped unexpectedly")]
    WriterGone,
    #[error(
        "background compaction failed; the log still holds every change it did not list in a segment"
    )]
    Compaction(#[source] Option<Box<pgtrail_store::CompactError>>),
}

impl CaptureError {
    pub fn setup(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        CaptureError::Setup {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn sql(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        CaptureError::Sql {
            context: context.into(),
            source,
        }
    }

    /// The one place that decides how each error is handled.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CaptureError::InvalidUrl { .. } | CaptureError::Setup { .. } => ErrorKind::Setup,
            CaptureError::Gap { .. } | CaptureError::Decode { .. } | CaptureError::Protocol(_) => {
                ErrorKind::Fatal
            }
            CaptureError::OtherCluster { .. } | CaptureError::SourceBehind { .. } => {
                ErrorKind::Fatal
            }
            CaptureError::Log(_) | CaptureError::WriterGone | CaptureError::Compaction(_) => {
                ErrorKind::Fatal
            }
            CaptureError::Connect { source, .. } | CaptureError::Sql { source, .. } => {
                pg_error_kind(source)
            }
            CaptureError::Replication(e) => wire_error_kind(e),
            CaptureError::StreamSilent { .. } | CaptureError::SnapshotRaced { .. } => {
                ErrorKind::Transient
            }
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

fn pg_error_kind(e: &tokio_postgres::Error) -> ErrorKind {
    match e.code() {
        Some(code) => {
            let c = code.code();
            if c.starts_with("28")
                || c.starts_with("42")
                || c.starts_with("3D")
                || c.starts_with("3F")
                || c == "55006"
            {
                // authentication, privileges/syntax, unknown database or schema, object in use
                ErrorKind::Setup
            } else {
                // admin shutdown, cannot connect now, crash recovery, ...: "indefinite unless
                // proven otherwise"
                ErrorKind::Transient
            }
        }
        None => ErrorKind::Transient,
    }
}

fn wire_error_kind(e: &pgwire_replication::PgWireError) -> ErrorKind {
    use pgwire_replication::PgWireError as W;
    match e {
        W::Auth(_) | W::Tls(_) => ErrorKind::Setup,
        W::Server(msg) => {
            if msg.contains("is active for PID")
                || msg.contains("does not exist")
                || msg.contains("permission denied")
                || msg.contains("must be superuser or replication role")
                || msg.contains("can no longer get changes")
                || msg.contains("has been invalidated")
            {
                ErrorKind::Setup
            } else {
                ErrorKind::Transient
            }
        }
        // The replication worker already ended and its error was lost: `recv` takes the
        // worker's join handle before awaiting it, so when `stream`'s select! drops that recv
        // future for another branch, the next recv finds no handle. The connection is gone and
        // nothing past the durable position was acknowledged, so reconnecting is safe. (Found
        // by pgtrail-torture's soak; the cancellation gap is pgwire-replication's.)
        W::Internal(msg) if msg.contains("already joined") => ErrorKind::Transient,
        W::MessageTooLarge { .. } | W::Protocol(_) | W::Internal(_) => ErrorKind::Fatal,
        _ => ErrorKind::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError as W;

    #[test]
    fn a_replication_worker_that_already_ended_is_a_reconnect_not_a_stop() {
        let ended =
            CaptureError::Replication(W::Internal("replication worker already joined".into()));
        assert_eq!(ended.kind(), ErrorKind::Transient);
        let terminated = CaptureError::Replication(W::Server(
            "terminating connection due to administrator command (SQLSTATE 57P01)".into(),
        ));
        assert_eq!(terminated.kind(), ErrorKind::Transient);
        assert_eq!(
            CaptureError::Replication(W::Protocol("bad frame".into())).kind(),
            ErrorKind::Fatal
        );
        assert_eq!(
            CaptureError::Replication(W::Internal("something else".into())).kind(),
            ErrorKind::Fatal
        );
    }
}
