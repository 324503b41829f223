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
    #[error("cannot open the change log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("the change log is held by another process (is another `pgtrail capture` running on this archive?)")]
    InUse,
    #[error("change log storage error (disk full or I/O failure?); nothing past the last durable commit was acknowledged")]
    Storage(#[from] redb::StorageError),
    #[error("change log transaction error")]
    Transaction(#[from] redb::TransactionError),
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
    #[error("archive format version {found} is not supported by this pgtrail (it reads version {supported})")]
    FormatVersion { found: u32, supported: u32 },
    #[error("change for relation {relation_id} arrived before its Relation message")]
    UnknownRelation { relation_id: u32 },
    #[error("a change arrived outside a transaction (no Begin)")]
    NoTransaction,
    #[error("a transaction has more than 4294967295 changes")]
    TransactionTooLarge,
}
