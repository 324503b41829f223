//! Keyframes: a table's whole state at one commit LSN, kept so that `as_of` reads the nearest
//! keyframe and the changes after it instead of the table's whole history.
//!
//! A keyframe is derived data, never evidence. The query engine computes it with the replay
//! rules from the segments (and the table's previous keyframe), the segments stay the
//! archive of record, and `pgtrail verify` computes every keyframe again and compares. Its
//! files live in `keyframes/`, apart from `segments/`, so that a reader globbing the segments
//! never mixes table states in with changes.
//!
//! | table       | key      | value |
//! |-------------|----------|-------|
//! | `keyframes` | `id u64` | encoded [`KeyframeEntry`] |
//!
//! # File
//!
//! Parquet, zstd, with the columns of a table segment of the keyframe's schema version
//! ([`crate::segment`]): one row per row the table held at [`KeyframeEntry::at`], in no
//! promised order, each being the change that last wrote the row (its `lsn`, `seq`, `xid`,
//! `committed_at`, `op`, `context`, `after`, `after_unknown`, `after_text`; `before` and its
//! lists are null). The Parquet key-value metadata `pgtrail.keyframe` holds JSON with the
//! keyframe format version and the LSN; `pgtrail.segment` describes the columns as a
//! segment's description does (its version).
//!
//! # Crash safety
//!
//! A keyframe file is published atomically before the entry that lists it is committed: a
//! crash in between leaves a file no entry lists, which the compactor's orphan removal deletes
//! (keyframes are written only by the process that holds the log for writing, on its
//! compaction thread, so no file of a write in progress is taken for an orphan). An entry is
//! removed (the keyframe replaced, or its table redacted) by moving its file to `retired` in
//! the same transaction, so a reader holding an older snapshot keeps its file for the grace
//! period.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic_file::{create_private_dir, remove_if_exists, write_atomically};
use crate::compact::{file_safe, now_us};
use crate::error::{CompactError, SegmentError};
use crate::log::{LogReader, META, SharedLog, decode, encode};
use crate::lsn::Lsn;
use crate::manifest::{META_COMPACTED_THROUGH, RETIRED, meta_u64};
use crate::relation::RelationVersion;
use crate::segment::{
    SEGMENT_FORMAT_VERSION, SEGMENT_METADATA_KEY, SegmentContent, segment_schema,
};

pub(crate) const KEYFRAMES: TableDefinition<u64, &[u8]> = TableDefinition::new("keyframes");

/// The directory of keyframe files inside the archive.
pub const KEYFRAMES_DIR: &str = "keyframes";
/// The version of the keyframe file layout described above.
pub const KEYFRAME_FORMAT_VERSION: u32 = 1;
/// The Parquet key-value metadata key of a keyframe's self-description.
pub const KEYFRAME_METADATA_KEY: &str = "pgtrail.keyframe";
/// A keyframe file by its path in the archive: how `retired` (whose other names are segment
/// files) and the orphan removal name it.
pub(crate) const RETIRED_PREFIX: &str = "keyframes/";

/// Writes the keyframes that are due after a compaction: the query engine's replay, which the
/// store does not have, given to the compactor in [`crate::CompactOptions`].
pub trait KeyframeWriter: Send + Sync + std::fmt::Debug {
    /// Write the keyframes due in the archive `archive_dir` whose log is `log`; how many.
    fn write_due(&self, log: &SharedLog, archive_dir: &Path) -> Result<u64, String>;
}

/// One keyframe as the archive lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyframeEntry {
    pub id: u64,
    /// File name inside the archive's `keyframes/` directory.
    pub file_name: String,
    /// The schema version every row is an image of.
    pub version: RelationVersion,
    /// The rows are the table's state after every change with a commit LSN at or below this,
    /// and after every snapshot point at or below it.
    pub at: Lsn,
    /// The latest commit time of anything the state includes (the table's changes and
    /// snapshot points up to `at`): a moment given as a time includes all of it only when it
    /// is at or after this time.
    pub includes_until_us: i64,
    /// The table's changes up to `at` (where the next keyframe is due).
    pub changes: u64,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub created_at_us: i64,
}

impl KeyframeEntry {
    pub fn table_name(&self) -> String {
        self.version.qualified_name()
    }
}

/// A keyframe to publish: its rows, and what the entry says of them.
pub struct NewKeyframe {
    pub version: RelationVersion,
    pub at: Lsn,
    pub includes_until_us: i64,
    pub changes: u64,
    /// Rows with the segment schema of `version`.
    pub rows: RecordBatch,
}

impl LogReader {
    /// The keyframes this read sees, in id order.
    pub fn keyframes(&self) -> Result<Vec<KeyframeEntry>, crate::LogError> {
        let Some(table) = crate::log::table_if_made(self.read_transaction(), KEYFRAMES)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in table.iter()? {
            let (_, v) = e?;
            out.push(decode(v.value(), "keyframes")?);
        }
        Ok(out)
    }
}

/// The path of a keyframe file of the archive in `archive_dir`.
pub fn keyframe_path(archive_dir: &Path, entry: &KeyframeEntry) -> PathBuf {
    archive_dir.join(KEYFRAMES_DIR).join(&entry.file_name)
}

/// The Parquet bytes of a keyframe: zstd, chunk statistics, the self-description.
fn keyframe_bytes(k: &NewKeyframe) -> Result<Vec<u8>, SegmentError> {
    let content = SegmentContent::Table(k.version.clone());
    // The segment description too: the file has a segment's columns, and the segment
    // reader (which every query path uses) reads its version from there.
    let segment = serde_json::json!({
        "format_version": SEGMENT_FORMAT_VERSION,
        "content": content,
    });
    let description = serde_json::json!({
        "format_version": KEYFRAME_FORMAT_VERSION,
        "at": k.at.to_string(),
    });
    let corrupt = |reason: String| SegmentError::Corrupt {
        path: PathBuf::from(KEYFRAMES_DIR),
        reason,
    };
    let schema = segment_schema(&content);
    if k.rows.schema().fields() != schema.fields() {
        return Err(corrupt(
            "a keyframe's rows do not have their version's segment schema".into(),
        ));
    }
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(SEGMENT_METADATA_KEY.to_string(), segment.to_string()),
            KeyValue::new(KEYFRAME_METADATA_KEY.to_string(), description.to_string()),
        ]))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, Arc::clone(&schema), Some(props))
        .map_err(|e| corrupt(format!("cannot write a keyframe: {e}")))?;
    let rows = k
        .rows
        .clone()
        .with_schema(schema)
        .map_err(|e| corrupt(e.to_string()))?;
    writer
        .write(&rows)
        .and_then(|()| writer.close().map(|_| ()))
        .map_err(|e| corrupt(format!("cannot write a keyframe: {e}")))?;
    Ok(out)
}

/// Write `keyframe`'s file and list it; the entry listed.
///
/// Refused for a point beyond the compacted changes: a keyframe stands for segments, which
/// never change, and not for the log, whose uncommitted end a recovery may still drop.
pub fn publish_keyframe(
    log: &SharedLog,
    archive_dir: &Path,
    keyframe: NewKeyframe,
) -> Result<KeyframeEntry, CompactError> {
    let dir = archive_dir.join(KEYFRAMES_DIR);
    create_private_dir(&dir)?;
    let created_at_us = now_us();
    let file_name = format!(
        "{}-{:016X}-{created_at_us}.parquet",
        file_safe(&keyframe.version.qualified_name()),
        keyframe.at.0
    );
    let bytes = keyframe_bytes(&keyframe)?;
    let sha256 = crate::segment::hex(&Sha256::digest(&bytes));
    // The file first: until the entry below commits, nothing reads it, and a crash leaves an
    // orphan that the next orphan removal deletes.
    write_atomically(&dir.join(&file_name), &bytes)?;
    let wtx = log.0.begin_write()?;
    let entry = {
        let compacted = Lsn(meta_u64(&wtx.open_table(META)?, META_COMPACTED_THROUGH)?);
        if keyframe.at > compacted {
            // Nothing lists the file: it goes now rather than at the next orphan removal.
            remove_if_exists(&dir.join(&file_name));
            return Err(CompactError::Keyframe(format!(
                "a keyframe at {} is beyond the compacted changes (through {compacted})",
                keyframe.at
            )));
        }
        let mut table = wtx.open_table(KEYFRAMES)?;
        let id = table.last()?.map_or(1, |(k, _)| k.value() + 1);
        let entry = KeyframeEntry {
            id,
            file_name,
            version: keyframe.version,
            at: keyframe.at,
            includes_until_us: keyframe.includes_until_us,
            changes: keyframe.changes,
            rows: keyframe.rows.num_rows() as u64,
            bytes: bytes.len() as u64,
            sha256,
            created_at_us,
        };
        table.insert(id, encode(&entry).as_slice())?;
        entry
    };
    wtx.commit()?;
    Ok(entry)
}

/// Unlist the keyframes `remove` names (by id); their files are retired, not deleted, so a
/// reader of an older snapshot may still read them.
pub fn unlist_keyframes(log: &SharedLog, remove: &[u64]) -> Result<(), CompactError> {
    let wtx = log.0.begin_write()?;
    unlist_in(&wtx, remove)?;
    wtx.commit()?;
    Ok(())
}

/// [`unlist_keyframes`] inside a caller's transaction (a redaction's, which must not leave a
/// keyframe holding an erased value listed).
pub(crate) fn unlist_in(wtx: &redb::WriteTransaction, remove: &[u64]) -> Result<(), CompactError> {
    let mut table = wtx.open_table(KEYFRAMES)?;
    let mut retired = wtx.open_table(RETIRED)?;
    let now = now_us();
    for id in remove {
        if let Some(v) = table.remove(id)? {
            let entry: KeyframeEntry = decode(v.value(), "keyframes")?;
            retired.insert(format!("{RETIRED_PREFIX}{}", entry.file_name).as_str(), now)?;
        }
    }
    Ok(())
}

/// The keyframes of one relation, inside a write transaction (for a redaction).
pub(crate) fn ids_of_relation(
    wtx: &redb::WriteTransaction,
    relation_id: u32,
) -> Result<Vec<u64>, CompactError> {
    let table = wtx.open_table(KEYFRAMES)?;
    let mut ids = Vec::new();
    for e in table.iter()? {
        let (k, v) = e?;
        let entry: KeyframeEntry = decode(v.value(), "keyframes")?;
        if entry.version.relation_id == relation_id {
            ids.push(k.value());
        }
    }
    Ok(ids)
}
