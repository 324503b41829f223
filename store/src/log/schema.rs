//! The log's on-disk format: every redb table and `meta` key, and the format version (the
//! table of tables and the commit protocol are in the parent module's doc). Whatever reads or
//! writes the log by table (the writer, its recovery, the reader, the compactor) names them
//! from here.

use redb::TableDefinition;

pub(crate) const CHANGES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("changes");
pub(crate) const TXNS: TableDefinition<u64, &[u8]> = TableDefinition::new("transactions");
pub(crate) const RELATIONS: TableDefinition<(u32, u64, u32), &[u8]> =
    TableDefinition::new("relations");
pub(crate) const TYPES: TableDefinition<u32, &[u8]> = TableDefinition::new("types");
pub(crate) const CURRENT: TableDefinition<(u32, &[u8]), &[u8]> =
    TableDefinition::new("current_rows");
/// The two undo tables of version 7, which a spanning transaction wrote (see the module doc);
/// drained by recovery when a log written by it was left mid-transaction.
pub(crate) type UndoTable = TableDefinition<'static, (u32, &'static [u8]), &'static [u8]>;
pub(crate) const UNDO: [UndoTable; 2] = [
    TableDefinition::new("current_undo_0"),
    TableDefinition::new("current_undo_1"),
];
/// The undo table of earlier versions (one table keyed by commit LSN, values encoded
/// `Option<Row>`): drained by recovery when a log written by them was left mid-transaction.
pub(crate) const UNDO_V1: TableDefinition<(u64, u32, &[u8]), &[u8]> =
    TableDefinition::new("current_undo");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const GAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("gaps");

/// Snapshot transactions (the initial one, and each `--resnapshot` after a gap): commit LSN to
/// commit time. Never trimmed: a reader replaying history starts each table afresh at these
/// points, because a snapshot is the whole state, not changes to the state before it.
pub(crate) const SNAPSHOTS: TableDefinition<u64, i64> = TableDefinition::new("snapshots");

/// The tables a snapshot transaction holds, `(commit_lsn, relation_id)` to an encoded
/// [`TableScope`](crate::TableScope) (version 2; its layout holds the columns' names from 3): a table synchronised while capture runs
/// (created, given a key, rewritten or dropped after the initial snapshot) starts afresh at
/// its own snapshot, and no other table does. A snapshot transaction with no row here (every
/// one written by version 1) holds every table. Never trimmed, as `snapshots`.
pub(crate) const SNAPSHOT_SCOPE: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("snapshot_scope");

/// (version 6) The application context of a source transaction's changes, stored once per
/// run of changes that share it: `(commit_lsn, seq)` to an encoded
/// [`ContextRun`](super::ContextRun), meaning "from change `seq` of this transaction on, until
/// the next entry of the same transaction, the context is this". Trimmed with the changes.
/// Change records of version 6 carry no context of their own; those of earlier versions
/// carry theirs inline, and a reader takes that when present.
pub(crate) const CONTEXTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("contexts");

pub(crate) const META_FORMAT: &str = "format_version";
pub(crate) const META_POSITION: &str = "position";
pub(crate) const META_LAST_COMMIT: &str = "last_commit";
pub(crate) const META_SOURCE: &str = "source";
/// (version 2) The latest point (LSN, server time µs) at which the capture's catalog watch
/// saw every held table's storage layout as the archive records it: DDL that rewrote a table
/// without a change in the stream committed after it.
pub(crate) const META_CATALOG_SEEN: &str = "catalog_seen";
/// (version 2) The tables the capture leaves out because they cannot be captured safely, with
/// the reason, as its latest look at the catalog found them: `Vec<(name, reason)>`.
pub(crate) const META_LEFT_OUT: &str = "left_out";
/// (version 2) The storage layout of each held table as the capture's catalog watch last
/// accepted it (after a TRUNCATE, or DDL that changed no stored value), with the point it was
/// seen at: `Vec<(relation_id, (Lsn, StorageLayout))>` (version 2's layout had no names).
pub(crate) const META_LAYOUTS: &str = "layouts";
/// The enum type under each column type that has one, by the column type's OID, as the
/// capture's catalog watch last found it ([`EnumTypes`](crate::EnumTypes)). Added within
/// version 4: a log without it has none recorded, and a reader that does not know the key
/// passes over it.
pub(crate) const META_ENUM_TYPES: &str = "enum_types";
/// The reads the capture's catalog watch decided on and has not stored yet: each a
/// `TableScope` with the point its rows are unknown from (a rewrite found, a drop). Recorded
/// before the table is copied, so that an archive a crash left between the decision and the
/// read refuses those moments rather than answer the old rows; a scope that a later snapshot
/// of its relation satisfies is passed over. Added within version 4 (a log without it has
/// none pending).
pub(crate) const META_PENDING_READS: &str = "pending_reads";
/// What made each held table a member of the capture's publication at the catalog watch's
/// latest look: `Vec<(relation_id, (publication OID, membership row OID))>`, the row being
/// the table's (or an ancestor's) `pg_publication_rel` row or its schema's
/// `pg_publication_namespace` row. A table out of the publication and back gets a new row, so
/// a session that finds another row than the one recorded knows the table's changes in
/// between never reached the stream (taken out and put back while the capture was stopped,
/// or put back by a look that a crash cut short). Added within version 7: a log without it
/// has none recorded (each table's first look then records one), and a reader that does not
/// know the key passes over it.
pub(crate) const META_MEMBERSHIPS: &str = "memberships";

/// (version 7 only) The commit through which `current_rows` held the current-row index.
/// Recovery upgrading a version-7 log starts completion there (every record of version 7 is
/// complete; the index may lag) and removes the key. Absent: the index is current (versions
/// up to 6).
pub(crate) const META_INDEX_THROUGH: &str = "index_through";

/// (version 8) The key `(commit_lsn u64, seq u32)`, 12 bytes little-endian, of the last
/// change record completed: every record at or before it is complete, `current_rows` is the
/// current-row index as of it, and compaction trims the log no further (see "Completion
/// after acknowledgement"). `seq` `u32::MAX`: its whole transaction.
pub(crate) const META_COMPLETED_THROUGH: &str = "completed_through";

/// The on-disk format this code writes and reads.
pub const FORMAT_VERSION: u32 = 8;
/// Encoded values larger than this are zstd-compressed.
pub const COMPRESS_ABOVE: usize = 1024;
/// The log's file name inside the archive directory.
pub const LOG_FILE: &str = "log.redb";
