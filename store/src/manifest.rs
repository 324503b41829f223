//! The segment manifest: which segment files hold which changes.
//!
//! The manifest lives in the log's redb database, next to the changes it replaces:
//!
//! | table      | key              | value |
//! |------------|------------------|-------|
//! | `segments` | `segment_id u64` | encoded [`SegmentEntry`]: file, content, key and time range, rows, bytes, SHA-256 |
//! | `retired`  | file name        | `i64` µs when a merge stopped listing it (deleted after a grace period) |
//! | `meta`     | `compacted_through`, `next_segment_id`, `compacted_changes`, `compacted_transactions` | `u64` |
//!
//! Because segments and the log share one database, recording a segment and trimming the log
//! entries it covers is **one redb transaction**, and any read transaction sees the segments
//! and the remaining log as one consistent cut: a change is in exactly one of them.
//!
//! How segments are written and listed, and why each step is crash safe, is the compactor's
//! (`compact`).

use std::collections::BTreeMap;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::LogError;
use crate::log::get_u64;
use crate::lsn::{ChangeKey, Lsn};
use crate::segment::SegmentContent;

pub(crate) const SEGMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("segments");
pub(crate) const RETIRED: TableDefinition<&str, i64> = TableDefinition::new("retired");
pub(crate) const META_COMPACTED_THROUGH: &str = "compacted_through";
pub(crate) const META_NEXT_SEGMENT: &str = "next_segment_id";
pub(crate) const META_COMPACTED_CHANGES: &str = "compacted_changes";
pub(crate) const META_COMPACTED_TXNS: &str = "compacted_transactions";

/// The directory of segment files inside the archive.
pub const SEGMENTS_DIR: &str = "segments";

/// One segment as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub id: u64,
    /// File name inside the archive's `segments/` directory.
    pub file_name: String,
    pub content: SegmentContent,
    pub min_key: ChangeKey,
    pub max_key: ChangeKey,
    pub min_committed_at_us: i64,
    pub max_committed_at_us: i64,
    pub rows: u64,
    pub bytes: u64,
    /// The size of the same changes in the log's record encoding (for compression ratios).
    pub raw_bytes: u64,
    pub sha256: String,
    pub created_at_us: i64,
    /// Rows per operation (`insert`, `update`, ...; `message` for message segments).
    pub op_counts: BTreeMap<String, u64>,
}

impl SegmentEntry {
    pub fn table_name(&self) -> String {
        self.content.table_name()
    }
}

/// The manifest as one read transaction saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentManifest {
    pub segments: Vec<SegmentEntry>,
    /// Every change with a commit LSN at or below this is in a segment, none in the log.
    pub compacted_through: Lsn,
    pub compacted_changes: u64,
    pub compacted_transactions: u64,
}

/// A counter of the `meta` table (absent means 0).
pub(crate) fn meta_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<u64, LogError> {
    Ok(get_u64(meta, name)?.unwrap_or(0))
}
