//! pgtrail-store owns the archive's data model and its durable change log.
//!
//! It defines what a captured change is ([`ChangeRecord`], keyed by [`ChangeKey`]: the source
//! transaction's commit LSN and the change's position in it), the schema versions of captured
//! relations ([`RelationVersion`]), and the redb log ([`ChangeLog`]) that stores them durably,
//! completes before/after images from its current-row index, skips replayed transactions and
//! recovers from a crash at any point. It knows nothing of the PostgreSQL wire protocol or of
//! SQL: `pgtrail-capture` feeds it [`LogOp`]s, and readers use [`LogReader`]. It is synchronous
//! and never runs on an async runtime; callers keep it on a dedicated thread.

mod change;
mod error;
mod log;
mod lsn;
mod relation;

pub use change::{Cell, ChangeRecord, IncomingCell, IncomingChange, LogicalMessage, OldImage, Op, Row};
pub use error::LogError;
pub use log::{
    Applied, ChangeEntry, ChangeLog, FORMAT_VERSION, Gap, LOG_FILE, LogOp, LogReader, SourceIdentity, TxnRecord,
};
pub use lsn::{ChangeKey, Lsn, ParseLsnError};
pub use redb::Durability;
pub use relation::{Column, RelationVersion, quote_ident};
