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
    /// The TLS files or settings a connection string names (a key others can read, a
    /// certificate that cannot be read): the string itself parsed.
    #[error("invalid TLS settings for the source: {detail}")]
    InvalidTls { detail: String },
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
    Replication(#[source] ReplicationError),
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
            CaptureError::InvalidUrl { .. }
            | CaptureError::InvalidTls { .. }
            | CaptureError::Setup { .. } => ErrorKind::Setup,
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
            CaptureError::Replication(e) => e.kind(),
            CaptureError::StreamSilent { .. } | CaptureError::SnapshotRaced { .. } => {
                ErrorKind::Transient
            }
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// The server answered but does not accept connections yet or any more: it is starting
    /// up, shutting down or in recovery (SQLSTATE 57P03 `cannot_connect_now`). Unlike a wrong
    /// host or password, this passes by itself, so even a first connection waits for it.
    pub fn is_server_not_ready(&self) -> bool {
        const CANNOT_CONNECT_NOW: &str = "57P03";
        match self {
            CaptureError::Connect { source, .. } | CaptureError::Sql { source, .. } => {
                source.code().map(|c| c.code()) == Some(CANNOT_CONNECT_NOW)
            }
            CaptureError::Replication(e) => e.sqlstate() == Some(CANNOT_CONNECT_NOW),
            _ => false,
        }
    }
}

fn pg_error_kind(e: &tokio_postgres::Error) -> ErrorKind {
    match e.code() {
        Some(code) => sqlstate_kind(code.code()),
        None => ErrorKind::Transient,
    }
}

/// How an error the server reported is handled, by its SQLSTATE (never by its message text,
/// which follows the server's `lc_messages`).
pub(crate) fn sqlstate_kind(code: &str) -> ErrorKind {
    // 28: authentication; 42: privileges, syntax, undefined objects (a dropped slot); 3D, 3F:
    // unknown database or schema; 55006: object in use (a slot another consumer streams);
    // 55000: object not in prerequisite state (a slot invalidated or past its WAL, wal_level).
    if code.starts_with("28")
        || code.starts_with("42")
        || code.starts_with("3D")
        || code.starts_with("3F")
        || code == "55006"
        || code == "55000"
    {
        ErrorKind::Setup
    } else {
        // admin shutdown, cannot connect now, crash recovery, ...: "indefinite unless proven
        // otherwise"
        ErrorKind::Transient
    }
}

/// `fut`, or a [`CaptureError::StreamSilent`] (a reconnect) if it takes longer than `limit`:
/// a connection into a network black hole never fails by itself.
pub(crate) async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, CaptureError>>,
) -> Result<T, CaptureError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(CaptureError::StreamSilent {
            why: format!("{what} got no answer within {} s", limit.as_secs_f64()),
        })
    })
}

/// A failure of the replication connection, in pgtrail's own terms: the replication library's
/// error type stays inside this crate, so its upgrades do not change pgtrail-capture's API.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ReplicationError {
    kind: ErrorKind,
    sqlstate: Option<String>,
    message: String,
}

impl ReplicationError {
    /// The SQLSTATE of an error the server reported.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn new(kind: ErrorKind, sqlstate: Option<String>, message: String) -> Self {
        ReplicationError {
            kind,
            sqlstate,
            message,
        }
    }

    /// Put context before the message ("cannot connect for replication to ...: ").
    pub(crate) fn prefix(&mut self, context: &str) {
        self.message.insert_str(0, context);
    }

    /// The server closed the stream without an error: reconnect.
    pub(crate) fn stream_ended() -> ReplicationError {
        ReplicationError {
            kind: ErrorKind::Transient,
            sqlstate: None,
            message: "the server ended the replication stream".into(),
        }
    }
}
