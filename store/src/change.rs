//! The change record model: what one row change of the source looks like in the archive.

use serde::{Deserialize, Serialize};

use crate::lsn::ChangeKey;

/// One column value of a row image, kept exactly as PostgreSQL printed it.
///
/// The column's type OID lives in the [`RelationVersion`](crate::RelationVersion) the image
/// belongs to, so a value plus its column is enough to reinterpret it later without loss.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Cell {
    Null,
    /// PostgreSQL's text output of the value.
    Text(String),
    /// The value was not sent (an unchanged TOASTed column, or a column outside the replica
    /// identity of an old image) and the archive holds no earlier version of the row to fill
    /// it from. It is unknown, never NULL.
    Unknown,
}

impl Cell {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A row image: one cell per column of the relation version, in column order.
pub type Row = Vec<Cell>;

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// The table was emptied at this change (TRUNCATE). It carries no row images.
    Truncate,
    /// A row of the initial snapshot, read inside the slot's exported snapshot.
    Snapshot,
    /// A logical decoding message (`pg_logical_emit_message`) that is not application context.
    Message,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Snapshot => "snapshot",
            Op::Message => "message",
        }
    }
}

/// A logical decoding message kept in the archive (any prefix but the context prefix `_bemi`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub prefix: String,
    pub content: Vec<u8>,
}

/// One change as stored in the log, keyed by its [`ChangeKey`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub xid: u32,
    /// Commit time of the source transaction, microseconds since the Unix epoch, UTC.
    pub committed_at_us: i64,
    /// PostgreSQL relation OID (0 for messages).
    pub relation_id: u32,
    /// The key of the relation version whose columns the row images follow.
    pub schema_version: ChangeKey,
    pub op: Op,
    /// Primary key values (text form) in key column order; `None` for truncates and messages.
    pub key: Option<Vec<Option<String>>>,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// Application context (JSON text) from a `_bemi` message of the same transaction.
    pub context: Option<String>,
    pub message: Option<LogicalMessage>,
}

/// A change as it arrives from the source, before the log completes its images.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingChange {
    pub relation_id: u32,
    pub op: Op,
    pub old: Option<OldImage>,
    pub new: Option<Vec<IncomingCell>>,
}

/// The old tuple of an UPDATE or DELETE as pgoutput sends it.
#[derive(Clone, Debug, PartialEq)]
pub enum OldImage {
    /// `K`: only the replica identity (key) columns are meaningful; the others are absent.
    Key(Vec<IncomingCell>),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Vec<IncomingCell>),
}

/// One cell as pgoutput sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncomingCell {
    Null,
    /// `u`: an unchanged TOASTed value that was not sent.
    UnchangedToast,
    Text(String),
}
