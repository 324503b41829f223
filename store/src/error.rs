//! Errors of the change log.

use std::path::PathBuf;

/// An error opening, reading or writing the change log.
///
/// Every storage error is fatal for the process that holds the log: redb refuses further
/// writes after an I/O error, and retrying an fsync is never safe. The caller drops the log,
/// and the next open recovers to the last durable commit (nothing past it was acknowledged).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("cannot create or open the archive directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the archive directory {path} is accessible to other users (mode {mode:o}); it holds a copy of production data: run `chmod 700 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a pgtrail archive (it has no {file}); check --archive", file = crate::LOG_FILE)]
    NotAnArchive { path: PathBuf },
    #[error(
        "{path} holds {found} and no {file}: it is not a pgtrail archive, and capture does not make one among other files (it keeps a log, segments and evidence there, and removes segment files it did not list); give --archive a new or empty directory",
        file = crate::LOG_FILE
    )]
    ForeignDirectory { path: PathBuf, found: String },
    #[error("cannot open the change log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error(
        "the change log is held by another process (is another `pgtrail capture` running on this archive?)"
    )]
    InUse,
    #[error(
        "change log storage error (disk full or I/O failure?); nothing past the last durable commit was acknowledged"
    )]
    Storage(#[from] redb::StorageError),
    /// A transaction could not begin for a reason other than storage (a storage failure,
    /// such as a full disk, is [`LogError::Storage`]: see the `From` below).
    #[error("change log transaction error")]
    Transaction(#[source] redb::TransactionError),
    #[error("change log table error")]
    Table(#[from] redb::TableError),
    #[error("change log commit failed (disk full or I/O failure?); nothing in it was acknowledged")]
    Commit(#[from] redb::CommitError),
    #[error("change log record at {what} is corrupt")]
    Corrupt {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the archive's log is format version {found}, written by a newer pgtrail; this pgtrail reads versions up to {supported}: upgrade pgtrail to read or write this archive"
    )]
    FormatVersion { found: u32, supported: u32 },
    #[error("change for relation {relation_id} arrived before its Relation message")]
    UnknownRelation { relation_id: u32 },
    #[error("a change arrived outside a transaction (no Begin)")]
    NoTransaction,
    #[error("a transaction has more than 4294967295 changes")]
    TransactionTooLarge,
    #[error(
        "cannot keep verify's leaves in temporary files (in TMPDIR: 44 bytes a change, 132 for prove, bundle, certify and redact; disk full?): set TMPDIR to a directory with room and run it again"
    )]
    VerifyScratch {
        #[source]
        source: SegmentError,
    },
}

impl From<redb::TransactionError> for LogError {
    /// Beginning a write after the storage failed (a full disk) fails with a storage error,
    /// which says so, rather than as a bare transaction error.
    fn from(e: redb::TransactionError) -> LogError {
        match e {
            redb::TransactionError::Storage(storage) => LogError::Storage(storage),
            other => LogError::Transaction(other),
        }
    }
}

/// An error writing or reading a segment file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    #[error("I/O error on {path} (disk full?)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Parquet error on {path}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: datafusion::parquet::errors::ParquetError,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: datafusion::arrow::error::ArrowError,
    },
    #[error("Arrow error building a segment batch")]
    Arrow(#[source] datafusion::arrow::error::ArrowError),
    #[error("segment {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "the thread computing evidence leaves {what}; the run's leaves are incomplete and nothing was compacted (a pgtrail bug: please report it)"
    )]
    LeafThread { what: &'static str },
    #[error(
        "segment {path} is format version {found}, written by a newer pgtrail; this pgtrail reads versions up to {supported}: upgrade pgtrail to read this archive"
    )]
    FormatVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "segment {path} does not match the manifest (SHA-256 {found}, manifest says {expected}): it was changed or damaged after it was written; restore it from a backup"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

/// An error of a compaction run. Nothing is trimmed from the log unless the run finished.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompactError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(
        "the log changed under the compactor ({expected} changes compacted, {found} found to trim); nothing was trimmed"
    )]
    LogChanged { expected: u64, found: u64 },
    #[error(
        "{leaves} evidence leaves were computed for {changes} changes compacted; nothing was trimmed (a pgtrail bug: please report it)"
    )]
    LeavesMissing { changes: u64, leaves: u64 },
    #[error("cannot write the archive's evidence")]
    Evidence(#[source] Box<crate::evidence::state::PublishError>),
    #[error("cannot keep a keyframe: {0}")]
    Keyframe(String),
    #[error(
        "change {key} names relation version {relation_id}@{version} that the log does not hold"
    )]
    MissingRelation {
        key: String,
        relation_id: u32,
        version: String,
    },
    #[error(transparent)]
    Redact(Box<crate::evidence::redact::RedactError>),
}

macro_rules! redb_into_compact {
    ($($t:ty),*) => {$(
        impl From<$t> for CompactError {
            fn from(e: $t) -> Self {
                CompactError::Log(LogError::from(e))
            }
        }
    )*};
}
redb_into_compact!(
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError
);

/// An error and its causes on one line (`error: cause: cause`), for a message that says what
/// failed underneath.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
