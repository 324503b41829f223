//! pgtrail-store owns the archive's data model and everything it keeps on disk.
//!
//! It defines what a captured change is ([`ChangeRecord`], keyed by [`ChangeKey`]: the source
//! transaction's commit LSN and the change's position in it), the schema versions of captured
//! relations ([`RelationVersion`]), the redb log ([`ChangeLog`]) that stores changes durably
//! and recovers from a crash at any point, and the archive of record: typed zstd Parquet
//! [`segment`]s listed in a [`SegmentManifest`] inside the same redb database, produced by the
//! [`Compactor`], which trims the log in the same transaction that lists a segment. It knows
//! nothing of the PostgreSQL wire protocol or of SQL: `pgtrail-capture` feeds it [`LogOp`]s,
//! and readers use [`LogReader`] and [`segment::SegmentReader`]. It is synchronous and never
//! runs on an async runtime; callers keep it on dedicated threads.

mod atomic_file;
mod change;
mod compact;
#[doc(hidden)]
pub mod crashpoint;
mod error;
pub mod evidence;
pub mod keyframe;
mod log;
mod lsn;
mod manifest;
pub mod parallel_parquet;
mod relation;
pub mod segment;
mod status;
mod type_name;

pub use atomic_file::{fsync_dir, write_atomically};
pub use change::{
    Cell, ChangeRecord, IncomingCell, IncomingChange, LogicalMessage, OldImage, Op, Row,
};
pub use compact::{CompactOptions, CompactReport, Compactor, file_safe, now_us};
pub use error::{CompactError, LogError, SegmentError, error_chain};
pub use keyframe::{KEYFRAMES_DIR, KeyframeEntry};
#[doc(hidden)]
pub use log::fuzzing;
pub use log::{
    Applied, ChangeEntry, ChangeLog, FORMAT_VERSION, Gap, HeldLayouts, LOG_FILE, LogOp, LogReader,
    REPAIR_PATIENCE, SharedLog, SnapshotRecord, SourceIdentity, StorageLayout, TableScope,
    TxnRecord,
};
pub use lsn::{ChangeKey, Lsn, ParseLsnError};
pub use manifest::{SEGMENTS_DIR, SegmentEntry, SegmentManifest};
pub use relation::{
    Column, RelationVersion, always_quoted, parse_qualified, quote_ident, split_table_list,
};
pub use status::{
    ArchiveStatus, GapStatus, LogTailStatus, SegmentsStatus, SourceStatus, TableStatus, dir_size,
};
pub use type_name::{EnumType, EnumTypes, TypeNames, format_type};
