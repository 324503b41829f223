//! The change log: a redb database (`log.redb`) in the archive directory.
//!
//! This module is the writer ([`ChangeLog`]: open, apply, and crash recovery); beside it,
//! `schema` names every table and `meta` key (the on-disk format), `codec` encodes values,
//! `images` builds the stored records and completes their row images, keeping the
//! current-row index, and `reader` is the read view ([`LogReader`], including the segment
//! manifest's reading). The manifest's own tables are `crate::manifest`'s.
//!
//! # Tables
//!
//! | table          | key                                   | value                                   |
//! |----------------|---------------------------------------|-----------------------------------------|
//! | `changes`      | `(commit_lsn u64, seq u32)`           | encoded [`ChangeRecord`]                |
//! | `transactions` | `commit_lsn u64`                      | encoded [`TxnRecord`]                   |
//! | `relations`    | `(relation_id u32, commit_lsn, seq)`  | encoded [`RelationVersion`]             |
//! | `types`        | `type_oid u32`                        | encoded `(schema, name)` of a non-builtin type |
//! | `current_rows` | `(relation_id u32, key bytes)`        | encoded [`Row`]: the row's version as of `meta.completed_through` |
//! | `meta`         | name                                  | position, last commit, `completed_through`, source identity, the catalog watch's records (see `schema`) |
//! | `gaps`         | `from_lsn u64`                        | encoded [`Gap`]                         |
//! | `snapshots`    | `commit_lsn u64`                      | commit time (µs) of a snapshot transaction |
//! | `snapshot_scope` | `(commit_lsn u64, relation_id u32)` | encoded [`TableScope`]: the tables a snapshot transaction holds (none listed: every table) |
//! | `contexts`     | `(commit_lsn u64, seq u32)`           | encoded [`ContextRun`]: the context of the transaction's changes from `seq` on |
//!
//! Values are postcard-encoded, with a one-byte prefix: `0` plain, `1` zstd-compressed (used
//! when the encoding is larger than [`COMPRESS_ABOVE`] bytes). Version 7 also had the undo
//! tables `current_undo_0` and `current_undo_1`, which recovery drains and deletes.
//!
//! # Commit protocol and why it is crash safe
//!
//! A source transaction is written under its commit LSN (the `final_lsn` of its Begin
//! message), which is known before its first change, so a transaction of any size streams
//! into `changes` without being held in memory: the writer commits a large transaction in
//! several redb commits and finishes it at the source Commit, where the `transactions`
//! record, `last_commit` and `position` are written in the same redb transaction. Every
//! commit is durable (two-phase, fsync), and only `position` as of a finished commit is
//! acknowledged.
//!
//! After a crash at any point, [`ChangeLog::open`] sees redb at its last commit and removes
//! whatever belongs to a source transaction that has no `transactions` record yet: changes,
//! relation versions, snapshot scopes and context runs keyed after `last_commit`. Nothing
//! else was touched by it: the writer writes nothing derived from an unfinished transaction
//! (completion, below, reads only finished ones). PostgreSQL then sends that transaction
//! again from the slot, because nothing past the durable `position` was acknowledged. A
//! source transaction whose commit LSN is below `position` is a replay of one already stored
//! and is skipped whole, so nothing is stored twice.
//!
//! # Completion after acknowledgement
//!
//! Under REPLICA IDENTITY DEFAULT (or USING INDEX) PostgreSQL sends an update's or delete's
//! old row as its key alone, and an unchanged TOAST value not at all; the archive completes
//! them from the row's latest version, which the current-row index `current_rows` keeps. The
//! writer does not: it stores each change as PostgreSQL sent it (`images::received_change`:
//! the values not sent are marked unknown) and acknowledges as soon as that is durable, so a
//! backlog drains at the decoder's pace (the index's lookups and writes were the whole gap
//! between the capture's drain and `pg_recvlogical`'s: README, Performance). Completion
//! follows, in the writer thread when it has nothing to acknowledge (or, past a bound, after
//! each batch: see the capture's writer), and in compaction by a command holding the archive:
//! a step (`images::complete_step`) takes the records after `meta.completed_through` in key
//! order, no further than the last finished transaction, completes each from the index as of
//! just before it, writes back those that changed and the index's changes, and moves
//! `completed_through`, all in one redb transaction. So at every commit, every record at or
//! before `completed_through` is complete and `current_rows` is the index as of it; a crash
//! loses at most a step, which the next one redoes from the same records, since a step's
//! result depends only on them and on the index as of `completed_through`. Completing a
//! complete record gives it back unchanged (the index as of just before it holds the version
//! it was completed from), which is how a log of version 7, whose records are complete but
//! whose index may lag, is upgraded without rewriting anything.
//!
//! Readers ([`LogReader::changes`]) show the records after `completed_through` completed, by
//! the same procedure in memory (`images::PendingView`), so what a query answers does not
//! depend on how far completion has come. Compaction trims the log no further than the last
//! transaction completed whole: completion may still rewrite the records after it, and needs
//! them in order.
//!
//! # Format versions
//!
//! `meta.format_version` names the layout above; [`FORMAT_VERSION`] is the one this code
//! writes. Every archive written by an earlier pgtrail must stay readable by every later one,
//! which `fixtures/archives/v<N>/` and the test that answers from them hold to.
//!
//! | version | what changed |
//! |---------|--------------|
//! | 1       | the layout above without `snapshot_scope`. Builds before the format discipline wrote two variants under the same number, both read: one undo table `current_undo` keyed by commit LSN (drained by recovery into the index), and no `snapshots` table (read as no snapshot points) |
//! | 2       | `snapshot_scope`: a snapshot may hold only some tables (a table synchronised while capture runs). Upgrade from 1: nothing to rewrite (a snapshot without scope rows holds every table, as version 1 meant); the number says that a version-1 reader, which would take a one-table snapshot for the whole archive's, must refuse the log |
//! | 3       | a [`StorageLayout`] (in `snapshot_scope` values and `meta.layouts`) holds the columns' names, so that a renamed column is known. Upgrade from 2: those values are re-encoded with no names (`legacy`), which the capture's next look at the catalog fills in |
//! | 4       | a [`StorageLayout`] holds the labels of the enum types the table uses, so that a label renamed while capture was stopped is known. Upgrade from 2 or 3: those values are re-encoded with no labels (`legacy`), which the capture's next look fills in |
//! | 5       | a [`StorageLayout`] holds a partitioned table's leaf partitions and their storage files, so that a partition rewritten, attached, detached or dropped is known. Upgrade from 2 to 4: those values are re-encoded with no partitions (`legacy`), which the capture's next look fills in |
//! | 6       | `contexts`: a transaction's application context is stored once per run of changes that share it (Bemi's triggers send it before every row), and change records carry none. Upgrade from 5: nothing to rewrite (older records carry their context inline, and readers take it); the number says that a version-5 reader, which would find no context on the newer records, must refuse the log |
//! | 7       | `meta.index_through`: `current_rows` may lag the log (see "The current-row index"), and recovery redoes the changes after it. Upgrade from 6: nothing to rewrite (a log without it keeps the index current through its last commit); the number says that a version-6 writer, which would take a lagging index for the current one and complete images from stale rows, must refuse the log |
//! | 8       | `meta.completed_through`: the writer stores changes as PostgreSQL sent them and completes them after acknowledging (see "Completion after acknowledgement"); no undo tables. Upgrade from 7 or earlier: undo rows of an unfinished transaction are applied as before, then `completed_through` is set to `index_through` (or the last commit) and `index_through` removed; no record is rewritten. The number says that a version-7 reader, which would show records after `completed_through` with their images not completed, must refuse the log |
//!
//! A change to the layout raises [`FORMAT_VERSION`] and adds a step to the writer's
//! recovery that rewrites the older layout in the same redb write transaction that stores
//! the new version number, so that a crash leaves either the old layout with the old number
//! or the new one with the new number. Readers ([`LogReader`]) read every version up to
//! theirs. A log of a newer version is refused by both, naming both versions, rather than
//! misread. Segments carry their own version in their metadata (`SEGMENT_FORMAT_VERSION`),
//! under the same rule.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ConcurrencyMode, Database, ReadableDatabase, ReadableTable};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::change::{
    Cell, ChangeRecord, IncomingCell, IncomingChange, LogicalMessage, OldImage, Op, Row,
};
use crate::error::LogError;
use crate::lsn::{ChangeKey, Lsn};
use crate::relation::RelationVersion;

mod codec;
mod contexts;
mod images;
mod legacy;
mod reader;
mod schema;

#[doc(hidden)]
pub use codec::fuzzing;
pub(crate) use codec::{decode, encode, encode_into, encode_plain, get_u64, raw_len};
pub(crate) use contexts::ContextCursor;
pub(crate) use images::completed_through;
use images::*;
pub use reader::{ChangeEntry, LogReader, SharedLog};
pub(crate) use schema::*;
pub use schema::{COMPRESS_ABOVE, FORMAT_VERSION, LOG_FILE};

/// `rtx`'s table `definition`, or `None` when no write has made it yet (a log that never
/// needed it reads as having none). Any other error is passed on, never taken for "none":
/// some callers decide from an empty answer what may be deleted.
pub(crate) fn table_if_made<K: redb::Key + 'static, V: redb::Value + 'static>(
    rtx: &redb::ReadTransaction,
    definition: redb::TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, redb::TableError> {
    match rtx.open_table(definition) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// redb's page cache for the log. Its default (1 GiB) is a ceiling that a large transaction
/// fills: a 10,000,000-row transaction peaked at 1,092 MiB resident (pgtrail-bench bigtx).
/// The capture's resident memory plateaus at about this plus 85 MiB: a 1,000,000-row
/// transaction (debug build) peaked at 201 MiB with 96 MiB and 137 MiB with 48 MiB before its
/// compaction, and the decode suite measured the same throughput and CPU per change at both.
const LOG_CACHE_BYTES: usize = 48 << 20;

/// How long an opening waits while another process has the log open for writing only for a
/// moment: a read-only command (`status`, `sql`) that found the log as a crashed writer left
/// it opens it for writing once to repair it (see [`LogReader::open`]), which takes as long
/// as the crash recovery. Far longer than such a repair; short enough that a second capture
/// on the same archive, which holds the log for good, is told so without a long wait.
pub const REPAIR_PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// What the log knows of one stored source transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    pub xid: u32,
    /// The Commit message's end LSN: the position to acknowledge once this is durable.
    pub end_lsn: Lsn,
    pub committed_at_us: i64,
    pub change_count: u32,
}

/// A snapshot transaction: the whole state of the tables it holds, at its commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The commit LSN the snapshot is keyed under (just before its consistent point).
    pub lsn: Lsn,
    pub committed_at_us: i64,
    /// The tables it holds; `None`: every table (the initial snapshot of an archive written
    /// before snapshots named their tables).
    pub tables: Option<Vec<TableScope>>,
}

impl SnapshotRecord {
    /// What this snapshot says of `relation_id`, if it holds that table's whole state (a
    /// snapshot of every table says nothing more than that).
    pub fn scope_of(&self, relation_id: u32) -> Option<TableScope> {
        match &self.tables {
            None => Some(TableScope::whole(relation_id)),
            Some(tables) => tables
                .iter()
                .find(|t| t.relation_id == relation_id)
                .cloned(),
        }
    }
}

/// One table of a snapshot transaction, and what else the capture knew of it then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableScope {
    pub relation_id: u32,
    /// What in the catalog says the table's stored rows are as read: its file node (a table
    /// rewrite gives it a new one) and the columns whose value existing rows take from the
    /// catalog (`ADD COLUMN … DEFAULT` without a rewrite). A change of either means rows
    /// changed without a change in the stream, and the table must be read again.
    pub layout: Option<StorageLayout>,
    /// The table was read again because DDL rewrote its rows without any change in the
    /// stream (`ALTER COLUMN … TYPE`, `ADD COLUMN … DEFAULT`), or dropped it; the DDL
    /// committed after this point (LSN, and the server's time then, µs), so from it until the
    /// snapshot the table's rows are not known.
    pub unknown_from: Option<(Lsn, i64)>,
    /// The table no longer exists: it was dropped after `unknown_from` and before the
    /// snapshot, which holds no row of it.
    pub dropped: bool,
    /// With `dropped`: the table still exists but left the publication (its changes no longer
    /// reach the archive), after `unknown_from`.
    pub unpublished: bool,
}

impl TableScope {
    /// A table read whole, with nothing else to say.
    pub fn whole(relation_id: u32) -> TableScope {
        TableScope {
            relation_id,
            layout: None,
            unknown_from: None,
            dropped: false,
            unpublished: false,
        }
    }
}

/// The held tables' layouts as the catalog watch last accepted them: each table's relation
/// id, the point (LSN) it was seen at, and its layout (see [`LogOp::Layouts`]).
pub type HeldLayouts = Vec<(u32, (Lsn, StorageLayout))>;

/// See [`TableScope::layout`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageLayout {
    /// `pg_relation_filenode` (0 for a partitioned table, which has no storage of its own).
    pub file_node: u32,
    /// Attribute numbers of columns with `atthasmissing`.
    pub missing_values: Vec<i16>,
    /// The transaction that last wrote each column's catalog row (`pg_attribute.xmin`, in
    /// attribute number order, dropped columns included): column DDL changes one, a TRUNCATE
    /// does not.
    pub column_versions: Vec<u32>,
    /// The transaction that last wrote the table's `pg_class` row (`xmin`): a rename, `SET
    /// SCHEMA`, a replica identity change, a TRUNCATE or a rewrite changes it.
    pub table_version: u32,
    /// (version 3) Each column's name, in attribute number order, empty for a dropped column:
    /// an attribute whose name changed is a `RENAME COLUMN`, which pgoutput cannot tell from
    /// a column dropped and another added. Empty when not recorded (a version 2 layout).
    pub column_names: Vec<String>,
    /// (version 4) The labels of every enum type the table's columns use (directly, as an
    /// array's element, under a domain, inside a composite), by label OID, in OID order:
    /// `ALTER TYPE … RENAME VALUE` keeps the OID and changes the label, and with it how every
    /// stored value of it reads, with no change in the stream. Empty when the table uses no
    /// enum, or when not recorded (versions 2 and 3: the capture's next look fills it in).
    /// JSON without it (an older `pgtrail setup` trigger's message) reads as empty.
    #[serde(default)]
    pub enum_labels: Vec<(u32, String)>,
    /// (version 5) A partitioned table's leaf partitions, at every level, as (relation OID,
    /// `pg_relation_filenode`) in OID order; empty for a table with storage of its own. The
    /// partitioned table has no storage: its rows change without a change in the stream when
    /// a partition is rewritten (`ALTER COLUMN … TYPE` on the parent rewrites every one),
    /// attached with rows, detached or dropped. Empty when not recorded (versions 2 to 4:
    /// the capture's next look fills it in) and in JSON without it.
    #[serde(default)]
    pub partitions: Vec<(u32, u32)>,
}

/// A range of the source's history that the archive does not hold, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub from: Lsn,
    pub to: Lsn,
    pub reason: String,
    pub recorded_at_us: i64,
}

/// The identity of the source this archive captures, fixed at the first run and checked on
/// every later connect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub database: String,
    pub slot: String,
    pub publication: String,
    /// The slot's consistent point; the initial snapshot is stored just before it.
    pub consistent_point: Lsn,
    /// Set once every snapshot row is durable.
    pub snapshot_complete: bool,
}

/// One write to the log, in stream order.
#[derive(Clone, Debug, PartialEq)]
pub enum LogOp {
    /// A Relation message: becomes a new schema version when its shape differs from the
    /// latest stored one. `valid_from` is filled in by the log.
    Relation(RelationVersion),
    /// A Type message: the name of a non-builtin type.
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    Begin {
        final_lsn: Lsn,
        xid: u32,
        committed_at_us: i64,
    },
    Change(IncomingChange),
    /// Application context (JSON text) for the changes that follow it in the transaction;
    /// the first one of a transaction also labels the changes before it.
    Context(String),
    /// A transactional logical message of another prefix, kept as a change.
    Message(LogicalMessage),
    Commit {
        end_lsn: Lsn,
    },
    /// A non-transactional logical message, stored at its own LSN.
    NonTransactionalMessage {
        lsn: Lsn,
        at_us: i64,
        message: LogicalMessage,
    },
    /// The server's WAL end while nothing is in flight and everything received is stored:
    /// no transaction of the captured tables commits before it, so it may be acknowledged
    /// (and the slot released) once durable, even when the captured tables are idle.
    Advance(Lsn),
    /// The capture's catalog watch saw every held table's storage layout as the archive
    /// records it at this point (LSN, server time µs); kept in `meta` with the next commit.
    CatalogSeen(Lsn, i64),
    /// The tables capture leaves out (they cannot be captured safely), with the reason, as
    /// its latest look at the catalog found them; kept in `meta` with the next commit.
    LeftOut(Vec<(String, String)>),
    /// The storage layout of each held table as the catalog watch last accepted it, with the
    /// point it was seen at; kept in `meta` with the next commit.
    Layouts(HeldLayouts),
    /// The enum types under the captured tables' column types, every one the archive knows
    /// (a type no table uses any more included); kept in `meta` with the next commit, and
    /// written into each segment's description by compaction.
    EnumTypes(crate::EnumTypes),
    /// The reads decided on and not stored yet (see [`LogReader::pending_reads`]); kept in
    /// `meta` with the next commit.
    PendingReads(Vec<TableScope>),
    /// What made each held table a member of the publication at the latest look (see
    /// [`LogReader::memberships`]); kept in `meta` with the next commit.
    Memberships(Vec<(u32, (u32, u32))>),
    /// Inside a snapshot transaction (xid 0): this relation's state at the snapshot is exactly
    /// the transaction's snapshot rows of it, so its earlier rows end there. A snapshot that
    /// names no relation holds every table (the initial snapshot of an archive written before
    /// these were recorded).
    SnapshotOf(TableScope),
}

/// What one [`ChangeLog::apply`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub transactions: u64,
    pub changes: u64,
    /// Transactions skipped because the log already holds them (replays after a restart).
    pub duplicates_skipped: u64,
}

/// The application context of a run of a transaction's changes (the `contexts` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ContextRun {
    /// The change number the context message came before: a logical message before it (the
    /// run of a transaction's first context starts at change 0, to label the changes before
    /// it) takes no context, as messages take context only forward.
    pub(crate) declared_at: u32,
    pub(crate) json: String,
}

struct InFlight {
    final_lsn: Lsn,
    xid: u32,
    committed_at_us: i64,
    /// A transaction of pgtrail's own (xid 0) holds a snapshot: it names a table it holds
    /// whole ([`LogOp::SnapshotOf`], which every snapshot this version writes sends before its
    /// rows). One that names none only records schema versions (a table whose columns or name
    /// changed with no write since), and is no snapshot point.
    holds_snapshot: bool,
    next_seq: u32,
    context: Option<String>,
    saw_context: bool,
    skip: bool,
}

/// The redb change log of one archive. It has one writer (the capture writer thread owns
/// it); readers open their own read transactions through [`ChangeLog::reader`].
pub struct ChangeLog {
    /// Shared with the compactor, which runs on its own thread (redb serialises writers).
    db: Arc<Database>,
    dir: PathBuf,
    relations: HashMap<u32, RelationVersion>,
    /// Everything before this LSN is stored (in the last commit of this handle).
    position: Lsn,
    /// What the last durable commit made safe to acknowledge.
    durable_position: Lsn,
    last_commit: Lsn,
    inflight: Option<InFlight>,
    /// Set when an apply failed half-way: the in-memory state no longer matches the file.
    poisoned: bool,
    /// The buffer every stored value is encoded into (reused).
    scratch: Vec<u8>,
    /// Since when a finished transaction has waited for completion, in this process, and
    /// how many changes have been stored since.
    completion_due_since: Option<std::time::Instant>,
    changes_to_complete: u64,
    /// Records completed per step at most ([`images::STEP_RECORDS`]; tests take fewer).
    step_records: usize,
    /// `meta` entries of the capture's catalog watch ([`LogOp::CatalogSeen`],
    /// [`LogOp::LeftOut`], [`LogOp::Layouts`]) not yet written: key to encoded value, the
    /// latest of each.
    meta_pending: HashMap<&'static str, Vec<u8>>,
}

impl ChangeLog {
    /// [`open`](Self::open), waiting up to `patience` while the log is held by another
    /// process, which is how a capture opens its archive: a capture restarted after a crash
    /// can meet a `status` or `sql` that is repairing the log that moment (see
    /// [`REPAIR_PATIENCE`]); without the wait it would stop with [`LogError::InUse`].
    pub fn open_patiently(
        dir: &Path,
        patience: std::time::Duration,
    ) -> Result<ChangeLog, LogError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match ChangeLog::open(dir) {
                Err(LogError::InUse) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                opened => return opened,
            }
        }
    }

    /// Open (or create) the log in `dir`, creating the directory private (0700), and recover
    /// from any crash: see the module doc for why the recovery is safe.
    pub fn open(dir: &Path) -> Result<ChangeLog, LogError> {
        ensure_private_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let existed = path.exists();
        if !existed {
            refuse_foreign_files(dir)?;
        }
        // One writer process (this one); any number of read-only processes (`status`, `sql`)
        // may follow its commits meanwhile.
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .set_cache_size(LOG_CACHE_BYTES)
            .create(&path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => LogError::InUse,
                source => LogError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        if !existed {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(|source| {
                LogError::Directory {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        ChangeLog::with_database(db, dir)
    }

    /// The log kept in `db`, recovered (the step [`open`](Self::open) ends with; the fuzz
    /// targets give it an in-memory database).
    pub(crate) fn with_database(db: Database, dir: &Path) -> Result<ChangeLog, LogError> {
        let mut log = ChangeLog {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            relations: HashMap::new(),
            position: Lsn::ZERO,
            durable_position: Lsn::ZERO,
            last_commit: Lsn::ZERO,
            inflight: None,
            poisoned: false,
            scratch: Vec::new(),
            completion_due_since: None,
            changes_to_complete: 0,
            step_records: STEP_RECORDS,
            meta_pending: HashMap::new(),
        };
        log.recover()?;
        Ok(log)
    }

    fn recover(&mut self) -> Result<(), LogError> {
        let mut wtx = self.db.begin_write()?;
        wtx.set_two_phase_commit(true);
        {
            let mut meta = wtx.open_table(META)?;
            match get_u64(&meta, META_FORMAT)? {
                None => {
                    meta.insert(
                        META_FORMAT,
                        u64::from(FORMAT_VERSION).to_le_bytes().as_slice(),
                    )?;
                }
                // 1 -> 2 adds `snapshot_scope`, opened below; nothing to rewrite. 2 -> 3, 3 -> 4
                // and 4 -> 5 re-encode the storage layouts the older version wrote. 5 -> 6
                // adds `contexts`, opened below; the older records keep their contexts inline,
                // which readers take as they are. 6 -> 7 -> 8: an older log's index is current
                // through its last commit, or (7) through `index_through`, and its records are
                // complete: `completed_through` starts there (below). The new
                // number is written in this redb transaction, with what it rewrites (see "Format versions"): a
                // crash leaves either the old values and number or the new ones.
                Some(v) if v < u64::from(FORMAT_VERSION) => {
                    let found = u32::try_from(v).unwrap_or(0);
                    let layouts = meta
                        .get(META_LAYOUTS)?
                        .map(|v| legacy::decode_layouts(v.value(), found))
                        .transpose()?;
                    if let Some(layouts) = layouts {
                        meta.insert(META_LAYOUTS, encode(&layouts).as_slice())?;
                    }
                    let mut scope = wtx.open_table(SNAPSHOT_SCOPE)?;
                    let old: Vec<((u64, u32), Vec<u8>)> = scope
                        .iter()?
                        .map(|e| e.map(|(k, v)| (k.value(), v.value().to_vec())))
                        .collect::<Result<_, _>>()?;
                    for (key, value) in old {
                        let current = legacy::decode_scope(&value, found)?;
                        scope.insert(key, encode(&current).as_slice())?;
                    }
                    meta.insert(
                        META_FORMAT,
                        u64::from(FORMAT_VERSION).to_le_bytes().as_slice(),
                    )?;
                }
                Some(v) if v == u64::from(FORMAT_VERSION) => {}
                Some(v) => {
                    return Err(LogError::FormatVersion {
                        found: u32::try_from(v).unwrap_or(u32::MAX),
                        supported: FORMAT_VERSION,
                    });
                }
            }
            self.position = Lsn(get_u64(&meta, META_POSITION)?.unwrap_or(0));
            self.last_commit = Lsn(get_u64(&meta, META_LAST_COMMIT)?.unwrap_or(0));
            self.durable_position = self.position;

            // Put back the current-row index as it was before the unfinished transaction
            // touched it. Safe to redo after a crash during this recovery: the undo rows are
            // deleted in the same redb transaction that restores them.
            let mut current = wtx.open_table(CURRENT)?;
            let mut restored = 0u64;
            let mut put_back =
                |relation_id: u32, key: &[u8], before: Option<&[u8]>| -> Result<(), LogError> {
                    match before {
                        Some(row) => current.insert((relation_id, key), row).map(drop)?,
                        None => current.remove((relation_id, key)).map(drop)?,
                    }
                    restored += 1;
                    Ok(())
                };
            // (Only a log of version 7 has any: version 8 writes no undo rows.)
            for definition in UNDO {
                {
                    let mut undo = wtx.open_table(definition)?;
                    while let Some((k, v)) = undo.pop_first()? {
                        let (relation_id, key) = k.value();
                        put_back(relation_id, key, parse_undo_value(v.value())?)?;
                    }
                }
                wtx.delete_table(definition)?;
            }
            {
                let mut undo = wtx.open_table(UNDO_V1)?;
                while let Some((k, v)) = undo.pop_first()? {
                    let (_, relation_id, key) = k.value();
                    let before: Option<Row> = decode(v.value(), "current_undo")?;
                    put_back(relation_id, key, before.map(|row| encode(&row)).as_deref())?;
                }
            }
            wtx.delete_table(UNDO_V1)?;
            // Remove what belongs to a transaction that was never finished: everything
            // keyed after the last finished transaction.
            let first_unfinished = self.last_commit.0 + 1;
            let mut changes = wtx.open_table(CHANGES)?;
            let mut removed = 0u64;
            changes.retain_in((first_unfinished, 0u32).., |_, _| {
                removed += 1;
                false
            })?;
            let mut relations = wtx.open_table(RELATIONS)?;
            // A read error is passed on, never skipped: redb latches its first I/O error
            // (a full disk while the page cache writes back), and the caller must see that
            // error, not a later "previous I/O error".
            let mut stale: Vec<(u32, u64, u32)> = Vec::new();
            for entry in relations.iter()? {
                let key = entry?.0.value();
                if key.1 >= first_unfinished {
                    stale.push(key);
                }
            }
            for k in stale {
                relations.remove(k)?;
            }
            let mut scope = wtx.open_table(SNAPSHOT_SCOPE)?;
            scope.retain_in((first_unfinished, 0u32).., |_, _| false)?;
            let mut contexts = wtx.open_table(CONTEXTS)?;
            contexts.retain_in((first_unfinished, 0u32).., |_, _| false)?;
            // Version 8 keeps `completed_through`. A log of version 7 or earlier (its index,
            // with the undo applied, as of `index_through`, or current through its last
            // commit without one) starts completion there: its records are complete already,
            // and completing one again gives the same record (see `Completer::complete`), so
            // the steps only redo the index. A new log starts at the beginning.
            if meta.get(META_COMPLETED_THROUGH)?.is_none() {
                let index_through =
                    get_u64(&meta, META_INDEX_THROUGH)?.map_or(self.last_commit, Lsn);
                set_completed_through(&mut meta, ChangeKey::new(index_through, u32::MAX))?;
                meta.remove(META_INDEX_THROUGH)?;
            }
            let completed = completed_through(&meta)?;
            if completed < ChangeKey::new(self.last_commit, u32::MAX) {
                // Left by the last process: the writer completes it when it is idle.
                self.completion_due_since = Some(std::time::Instant::now());
            }
            // Completion stops at the last finished transaction: a mark beyond it was not
            // written by pgtrail.
            if completed.commit_lsn > self.last_commit {
                return Err(LogError::Corrupt {
                    what: format!("meta {META_COMPLETED_THROUGH}"),
                    source: format!(
                        "records are marked completed through {}, after the last finished \
                         transaction {}",
                        completed, self.last_commit
                    )
                    .into(),
                });
            }
            if restored > 0 || removed > 0 {
                tracing::warn!(
                    removed_changes = removed,
                    restored_index_rows = restored,
                    last_commit = %self.last_commit,
                    "discarded an unfinished source transaction left by a crash; PostgreSQL will send it again"
                );
            }
            wtx.open_table(TXNS)?;
            wtx.open_table(TYPES)?;
            wtx.open_table(GAPS)?;
            wtx.open_table(SNAPSHOTS)?;
        }
        wtx.commit()?;
        self.relations = self.load_latest_relations()?;
        Ok(())
    }

    fn load_latest_relations(&self) -> Result<HashMap<u32, RelationVersion>, LogError> {
        let rtx = self.db.begin_read()?;
        let table = rtx.open_table(RELATIONS)?;
        let mut latest = HashMap::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            let rel: RelationVersion = decode(v.value(), "relations")?;
            latest.insert(rel.relation_id, rel);
        }
        Ok(latest)
    }

    /// A handle on this log for a [`Compactor`](crate::Compactor) or a [`LogReader`] on
    /// another thread of this process.
    pub fn shared(&self) -> SharedLog {
        SharedLog(self.db.clone())
    }

    /// Drop the open source transaction's partial writes (the stream broke mid-transaction;
    /// PostgreSQL sends it again). This is the crash recovery run in place: it removes exactly
    /// what is keyed after the last finished transaction, none of which was acknowledged.
    pub fn discard_partial(&mut self) -> Result<(), LogError> {
        self.inflight = None;
        self.recover()?;
        self.poisoned = false;
        Ok(())
    }

    /// The archive directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The position made safe to acknowledge by the last durable commit: every source
    /// transaction committing before it is durably stored.
    pub fn durable_position(&self) -> Lsn {
        self.durable_position
    }

    /// The commit LSN of the last stored source transaction.
    pub fn last_commit(&self) -> Lsn {
        self.last_commit
    }

    /// Whether a source transaction is open (between Begin and Commit).
    pub fn in_transaction(&self) -> bool {
        self.inflight.is_some()
    }

    /// Changes written so far for the open transaction.
    pub fn inflight_changes(&self) -> u32 {
        self.inflight.as_ref().map_or(0, |t| t.next_seq)
    }

    /// The latest known version of a relation.
    pub fn relation(&self, relation_id: u32) -> Option<&RelationVersion> {
        self.relations.get(&relation_id)
    }

    /// The source identity recorded at the first run, if any.
    pub fn source_identity(&self) -> Result<Option<SourceIdentity>, LogError> {
        let rtx = self.db.begin_read()?;
        let meta = rtx.open_table(META)?;
        match meta.get(META_SOURCE)? {
            Some(v) => Ok(Some(decode(v.value(), "meta source")?)),
            None => Ok(None),
        }
    }

    /// Record the source identity durably.
    pub fn set_source_identity(&mut self, identity: &SourceIdentity) -> Result<(), LogError> {
        let mut wtx = self.db.begin_write()?;
        wtx.set_two_phase_commit(true);
        {
            let mut meta = wtx.open_table(META)?;
            meta.insert(META_SOURCE, encode(identity).as_slice())?;
        }
        wtx.commit()?;
        Ok(())
    }

    /// Record a gap durably.
    pub fn record_gap(&mut self, gap: &Gap) -> Result<(), LogError> {
        let mut wtx = self.db.begin_write()?;
        wtx.set_two_phase_commit(true);
        {
            let mut gaps = wtx.open_table(GAPS)?;
            gaps.insert(gap.from.0, encode(gap).as_slice())?;
        }
        wtx.commit()?;
        Ok(())
    }

    /// Apply `ops` in one durable redb write transaction (two-phase commit, fsync): when this
    /// returns, [`durable_position`](Self::durable_position) covers every transaction finished
    /// in it. The start of a transaction still streaming may be part of the commit; it is not
    /// acknowledged, readers do not show it, and recovery removes it after a crash. (Every
    /// commit is durable because the log is opened for one writer plus read-only processes,
    /// and redb supports only durable commits in that mode.)
    ///
    /// An error leaves this handle poisoned: drop it and open the log again, which recovers
    /// to the last commit (nothing after the durable position was acknowledged).
    pub fn apply(&mut self, ops: impl IntoIterator<Item = LogOp>) -> Result<Applied, LogError> {
        let wtx = self.begin_unless_poisoned()?;
        let mut applied = Applied::default();
        {
            let mut tables = Tables {
                changes: wtx.open_table(CHANGES)?,
                txns: wtx.open_table(TXNS)?,
                relations: wtx.open_table(RELATIONS)?,
                types: wtx.open_table(TYPES)?,
                snapshots: wtx.open_table(SNAPSHOTS)?,
                snapshot_scope: wtx.open_table(SNAPSHOT_SCOPE)?,
                contexts: wtx.open_table(CONTEXTS)?,
                scratch: std::mem::take(&mut self.scratch),
            };
            for op in ops {
                self.apply_one(&mut tables, op, &mut applied)?;
            }
            self.scratch = std::mem::take(&mut tables.scratch);
            let mut meta = wtx.open_table(META)?;
            meta.insert(META_POSITION, self.position.0.to_le_bytes().as_slice())?;
            meta.insert(
                META_LAST_COMMIT,
                self.last_commit.0.to_le_bytes().as_slice(),
            )?;
            for (key, value) in self.meta_pending.drain() {
                meta.insert(key, value.as_slice())?;
            }
        }
        crate::crashpoint::pause("log:before_commit");
        crate::crashpoint::hit("log:before_commit");
        wtx.commit()?;
        // Durable, not yet acknowledged: the caller reports the flush LSN after this returns.
        crate::crashpoint::hit("log:after_commit");
        self.durable_position = self.position;
        self.poisoned = false;
        if applied.transactions > 0 && self.completion_due_since.is_none() {
            self.completion_due_since = Some(std::time::Instant::now());
        }
        self.changes_to_complete += applied.changes;
        Ok(applied)
    }

    fn apply_one(
        &mut self,
        t: &mut Tables<'_>,
        op: LogOp,
        applied: &mut Applied,
    ) -> Result<(), LogError> {
        match op {
            LogOp::Relation(mut rel) => {
                let Some(tx) = &self.inflight else {
                    // pgoutput sends Relation messages inside transactions; one outside is
                    // remembered for the next change without becoming a stored version.
                    self.relations.entry(rel.relation_id).or_insert(rel);
                    return Ok(());
                };
                if tx.skip {
                    // A replayed transaction may describe an older shape; the stored versions
                    // already cover it.
                    return Ok(());
                }
                if self
                    .relations
                    .get(&rel.relation_id)
                    .is_some_and(|r| r.same_shape(&rel))
                {
                    return Ok(());
                }
                rel.valid_from = ChangeKey::new(tx.final_lsn, tx.next_seq);
                t.relations.insert(
                    (
                        rel.relation_id,
                        rel.valid_from.commit_lsn.0,
                        rel.valid_from.seq,
                    ),
                    encode(&rel).as_slice(),
                )?;
                self.relations.insert(rel.relation_id, rel);
            }
            LogOp::Type { oid, schema, name } => {
                t.types.insert(oid, encode(&(schema, name)).as_slice())?;
            }
            LogOp::Begin {
                final_lsn,
                xid,
                committed_at_us,
            } => {
                self.inflight = Some(InFlight {
                    final_lsn,
                    xid,
                    committed_at_us,
                    next_seq: 0,
                    context: None,
                    saw_context: false,
                    // Everything before `position` is stored: this is a replay.
                    skip: final_lsn < self.position,
                    holds_snapshot: false,
                });
            }
            LogOp::Change(change) => {
                let tx = self.inflight.as_ref().ok_or(LogError::NoTransaction)?;
                if tx.skip {
                    return Ok(());
                }
                let (final_lsn, seq) = (tx.final_lsn, tx.next_seq);
                let rel =
                    self.relations
                        .get(&change.relation_id)
                        .ok_or(LogError::UnknownRelation {
                            relation_id: change.relation_id,
                        })?;
                let record = received_change(rel, tx, change);
                encode_into(&mut t.scratch, &record);
                t.changes.insert((final_lsn.0, seq), t.scratch.as_slice())?;
                self.bump_seq()?;
                applied.changes += 1;
            }
            LogOp::Context(json) => {
                let tx = self.inflight.as_mut().ok_or(LogError::NoTransaction)?;
                if tx.skip {
                    return Ok(());
                }
                // Bemi's triggers send the statement's context before every row it writes: a
                // repeat of the context in force stores nothing.
                if tx.saw_context && tx.context.as_deref() == Some(json.as_str()) {
                    return Ok(());
                }
                // A new run from the next change on; the first context of a transaction labels
                // the changes before it too (its run starts at change 0), except messages,
                // which take context only from where it was declared.
                let from = if tx.saw_context { tx.next_seq } else { 0 };
                let run = ContextRun {
                    declared_at: tx.next_seq,
                    json,
                };
                t.contexts
                    .insert((tx.final_lsn.0, from), encode(&run).as_slice())?;
                tx.saw_context = true;
                tx.context = Some(run.json);
            }
            LogOp::Message(message) => {
                let tx = self.inflight.as_ref().ok_or(LogError::NoTransaction)?;
                if tx.skip {
                    return Ok(());
                }
                let record = ChangeRecord {
                    xid: tx.xid,
                    committed_at_us: tx.committed_at_us,
                    relation_id: 0,
                    schema_version: ChangeKey::default(),
                    op: Op::Message,
                    key: None,
                    before: None,
                    after: None,
                    context: None,
                    message: Some(message),
                };
                t.changes
                    .insert((tx.final_lsn.0, tx.next_seq), encode(&record).as_slice())?;
                self.bump_seq()?;
                applied.changes += 1;
            }
            LogOp::Commit { end_lsn } => {
                let tx = self.inflight.take().ok_or(LogError::NoTransaction)?;
                if tx.skip {
                    applied.duplicates_skipped += 1;
                    return Ok(());
                }
                let record = TxnRecord {
                    xid: tx.xid,
                    end_lsn,
                    committed_at_us: tx.committed_at_us,
                    change_count: tx.next_seq,
                };
                t.txns.insert(tx.final_lsn.0, encode(&record).as_slice())?;
                // A transaction holding a snapshot scope is a snapshot point: pgtrail's own
                // (xid 0, tables it copied), or a source transaction that created a table
                // published from its creation.
                if tx.holds_snapshot {
                    t.snapshots.insert(tx.final_lsn.0, tx.committed_at_us)?;
                }
                self.last_commit = tx.final_lsn;
                self.position = self.position.max(end_lsn);
                applied.transactions += 1;
            }
            LogOp::NonTransactionalMessage {
                lsn,
                at_us,
                message,
            } => {
                if lsn < self.position {
                    applied.duplicates_skipped += 1;
                    return Ok(());
                }
                let record = ChangeRecord {
                    xid: 0,
                    committed_at_us: at_us,
                    relation_id: 0,
                    schema_version: ChangeKey::default(),
                    op: Op::Message,
                    key: None,
                    before: None,
                    after: None,
                    context: None,
                    message: Some(message),
                };
                t.changes.insert((lsn.0, 0), encode(&record).as_slice())?;
                let txn = TxnRecord {
                    xid: 0,
                    end_lsn: Lsn(lsn.0 + 1),
                    committed_at_us: at_us,
                    change_count: 1,
                };
                t.txns.insert(lsn.0, encode(&txn).as_slice())?;
                self.last_commit = lsn;
                // The message is stored; anything the server sends later lies after it.
                self.position = Lsn(lsn.0 + 1);
                applied.changes += 1;
            }
            LogOp::Advance(lsn) => {
                if self.inflight.is_none() && lsn > self.position {
                    self.position = lsn;
                }
            }
            LogOp::CatalogSeen(lsn, at_us) => {
                self.meta_pending
                    .insert(META_CATALOG_SEEN, encode(&(lsn, at_us)));
            }
            LogOp::LeftOut(tables) => {
                self.meta_pending.insert(META_LEFT_OUT, encode(&tables));
            }
            LogOp::Layouts(layouts) => {
                self.meta_pending.insert(META_LAYOUTS, encode(&layouts));
            }
            LogOp::EnumTypes(types) => {
                self.meta_pending.insert(META_ENUM_TYPES, encode(&types));
            }
            LogOp::PendingReads(scopes) => {
                self.meta_pending
                    .insert(META_PENDING_READS, encode(&scopes));
            }
            LogOp::Memberships(memberships) => {
                self.meta_pending
                    .insert(META_MEMBERSHIPS, encode(&memberships));
            }
            LogOp::SnapshotOf(scope) => {
                let tx = self.inflight.as_mut().ok_or(LogError::NoTransaction)?;
                tx.holds_snapshot = true;
                let tx = &*tx;
                if tx.skip {
                    return Ok(());
                }
                // In pgtrail's own transaction (xid 0): the tables it copied. In a source
                // transaction: a table created in it and published from its creation (`pgtrail
                // setup`), empty at the point of the mark, its changes in the transaction after it.
                // Keyed by the transaction: recovery removes it with the rest of an unfinished
                // snapshot. Completion forgets the relation's earlier rows at it: the
                // snapshot's rows are its rows from here.
                t.snapshot_scope.insert(
                    (tx.final_lsn.0, scope.relation_id),
                    encode(&scope).as_slice(),
                )?;
            }
        }
        Ok(())
    }

    fn bump_seq(&mut self) -> Result<(), LogError> {
        let tx = self.inflight.as_mut().ok_or(LogError::NoTransaction)?;
        tx.next_seq = tx
            .next_seq
            .checked_add(1)
            .ok_or(LogError::TransactionTooLarge)?;
        Ok(())
    }

    /// An error once an earlier write of this handle failed (see [`apply`](Self::apply)).
    fn refuse_if_poisoned(&self) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Corrupt {
                what: "this log handle".into(),
                source: "an earlier write failed; reopen the log".into(),
            });
        }
        Ok(())
    }

    /// A two-phase write transaction, unless an earlier write failed; the handle counts as
    /// poisoned until the caller's commit clears it.
    fn begin_unless_poisoned(&mut self) -> Result<redb::WriteTransaction, LogError> {
        self.refuse_if_poisoned()?;
        self.poisoned = true;
        let mut wtx = self.db.begin_write()?;
        wtx.set_two_phase_commit(true);
        Ok(wtx)
    }

    /// How far completion is behind (see "Completion after acknowledgement"): `None` when
    /// every transaction this handle stored is complete (one left by an earlier process is
    /// not known of until a step finds it), otherwise since when a finished transaction has
    /// waited, and how many changes were stored since. Nothing depends on it for safety:
    /// completion moves `completed_through`, and with it how far compaction may trim.
    pub fn completion_behind(&self) -> Option<(std::time::Instant, u64)> {
        self.completion_due_since
            .map(|since| (since, self.changes_to_complete))
    }

    /// One completion step (see [`images::complete_step`]) in a durable commit of its own;
    /// `true` once every finished transaction is complete. The capture's writer runs steps
    /// when it has nothing to acknowledge, and compaction before it cuts.
    pub fn complete_step(&mut self) -> Result<bool, LogError> {
        self.complete_step_of(usize::MAX)
    }

    /// A completion step of at most `records` records (and never more than a full step's):
    /// the writer's steps between batches while completion is overdue, kept short so that
    /// acknowledging waits for one small step at a time, not a full one.
    pub fn complete_step_of(&mut self, records: usize) -> Result<bool, LogError> {
        self.refuse_if_poisoned()?;
        let caught_up = complete_step_in(&self.db, records.clamp(1, self.step_records))?;
        if caught_up {
            self.completion_due_since = None;
            self.changes_to_complete = 0;
        }
        Ok(caught_up)
    }

    /// Complete every finished transaction (steps until none is left).
    pub fn complete_all(&mut self) -> Result<(), LogError> {
        while !self.complete_step()? {}
        Ok(())
    }

    /// A reader over the log's latest commit.
    pub fn reader(&self) -> Result<LogReader, LogError> {
        LogReader::from_db(self.db.as_ref())
    }
}

/// One completion step ([`images::complete_step`]) in a durable commit of its own. A failure
/// leaves the log as it was (the write transaction is dropped), so it poisons nothing.
fn complete_step_in(db: &Database, budget: usize) -> Result<bool, LogError> {
    let mut wtx = db.begin_write()?;
    wtx.set_two_phase_commit(true);
    let caught_up = images::complete_step(&wtx, budget)?;
    crate::crashpoint::hit("log:before_completion_commit");
    wtx.commit()?;
    Ok(caught_up)
}

/// Complete every finished transaction of the log in `db`, step by step (compaction by a
/// command that holds the archive: see [`Compactor`](crate::Compactor)).
pub(crate) fn complete_pending(db: &Database) -> Result<(), LogError> {
    while !complete_step_in(db, STEP_RECORDS)? {}
    Ok(())
}

/// A directory without a log must be empty (but for a file system's `lost+found`, for an
/// archive at a volume's root) before a log is made in it: another program's files, or an
/// archive whose log was lost, would otherwise be taken for an archive that pgtrail then
/// writes into and prunes.
fn refuse_foreign_files(dir: &Path) -> Result<(), LogError> {
    let unreadable = |source| LogError::Directory {
        path: dir.to_path_buf(),
        source,
    };
    let mut found: Vec<String> = Vec::new();
    for entry in fs::read_dir(dir).map_err(unreadable)? {
        let name = entry
            .map_err(unreadable)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name != "lost+found" {
            found.push(name);
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    let shown = found.len().min(3);
    let mut said = found[..shown].join(", ");
    if found.len() > shown {
        said.push_str(&format!(" and {} more", found.len() - shown));
    }
    Err(LogError::ForeignDirectory {
        path: dir.to_path_buf(),
        found: said,
    })
}

/// Create `dir` (and parents) with mode 0700, or check that an existing one is not open to
/// other users.
fn ensure_private_dir(dir: &Path) -> Result<(), LogError> {
    if dir.exists() {
        let meta = fs::metadata(dir).map_err(|source| LogError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(LogError::Permissions {
                path: dir.to_path_buf(),
                mode,
            });
        }
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LogError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
    // Make the new directory entry durable too.
    if let Some(parent) = dir.parent()
        && let Ok(f) = fs::File::open(parent)
    {
        let _ = f.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::relation::Column;

    fn rel(replica_identity: u8) -> RelationVersion {
        let col = |name: &str, is_key: bool| Column {
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
            is_key,
        };
        RelationVersion {
            relation_id: 7,
            valid_from: ChangeKey::default(),
            schema: "public".into(),
            name: "t".into(),
            replica_identity,
            columns: vec![
                col("id", true),
                col("v", replica_identity == b'f'),
                col("big", replica_identity == b'f'),
            ],
            primary_key: vec!["id".into()],
        }
    }

    fn text(s: &str) -> IncomingCell {
        IncomingCell::Text(s.into())
    }

    /// A directory that holds other files and no log is refused, naming what it holds, and
    /// nothing is written into it; `lost+found` alone (an archive at a volume's root) is not
    /// another program's file.
    #[test]
    fn a_directory_of_other_files_is_not_made_an_archive() {
        let dir = tempfile::tempdir().unwrap();
        let private = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o700)).unwrap();
        let archive = dir.path().join("a");
        fs::create_dir(&archive).unwrap();
        private(&archive);
        fs::write(archive.join("report.csv"), "x").unwrap();
        let refused = ChangeLog::open(&archive).err().expect("refused");
        assert!(
            matches!(refused, LogError::ForeignDirectory { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("report.csv"), "{refused}");
        assert_eq!(fs::read_dir(&archive).unwrap().count(), 1);

        let volume = dir.path().join("v");
        fs::create_dir_all(volume.join("lost+found")).unwrap();
        private(&volume);
        ChangeLog::open(&volume).unwrap();
        assert!(volume.join(LOG_FILE).exists());
    }

    /// A log written by a newer pgtrail is refused by the writer and by readers, with an
    /// error naming both versions, and left as it was.
    #[test]
    fn a_log_of_a_newer_format_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let log = ChangeLog::open(&archive).unwrap();
        assert_eq!(
            LogReader::of_shared(&log.shared())
                .unwrap()
                .format_version()
                .unwrap(),
            Some(FORMAT_VERSION)
        );
        let newer = u64::from(FORMAT_VERSION) + 1;
        let wtx = log.db.begin_write().unwrap();
        wtx.open_table(META)
            .unwrap()
            .insert(META_FORMAT, newer.to_le_bytes().as_slice())
            .unwrap();
        wtx.commit().unwrap();
        drop(log);
        let expected = format!(
            "format version {newer}, written by a newer pgtrail; this pgtrail reads versions up to {FORMAT_VERSION}"
        );
        let writer = ChangeLog::open(&archive)
            .err()
            .expect("the writer refuses it");
        assert!(matches!(writer, LogError::FormatVersion { .. }));
        assert!(writer.to_string().contains(&expected), "{writer}");
        let reader = LogReader::open(&archive)
            .err()
            .expect("a reader refuses it");
        assert!(reader.to_string().contains(&expected), "{reader}");
    }

    /// The Begin of a source transaction committing at `lsn`.
    fn begin(lsn: u64, xid: u32) -> LogOp {
        LogOp::Begin {
            final_lsn: Lsn(lsn),
            xid,
            committed_at_us: 0,
        }
    }

    fn txn(lsn: u64, ops: Vec<LogOp>) -> Vec<LogOp> {
        let mut v = vec![begin(lsn, 1)];
        v.extend(ops);
        v.push(LogOp::Commit {
            end_lsn: Lsn(lsn + 8),
        });
        v
    }

    fn insert(id: &str, v: &str, big: &str) -> LogOp {
        LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Insert,
            old: None,
            new: Some(vec![text(id), text(v), text(big)]),
        })
    }

    fn all_changes(log: &ChangeLog) -> Vec<ChangeEntry> {
        let reader = log.reader().unwrap();
        reader.changes().unwrap().map(|e| e.unwrap()).collect()
    }

    #[test]
    fn replayed_transaction_is_not_stored_twice() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let mut log = ChangeLog::open(&archive).unwrap();
        let mut ops = vec![begin(100, 1), LogOp::Relation(rel(b'd'))];
        ops.push(insert("1", "a", "x"));
        ops.push(LogOp::Commit { end_lsn: Lsn(108) });
        log.apply(ops.clone()).unwrap();
        assert_eq!(log.durable_position(), Lsn(108));
        let applied = log.apply(ops).unwrap();
        assert_eq!(applied.duplicates_skipped, 1);
        assert_eq!(all_changes(&log).len(), 1);
    }

    #[test]
    fn unfinished_transaction_is_discarded_on_reopen_and_index_restored() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        {
            let mut log = ChangeLog::open(&archive).unwrap();
            let mut first = txn(100, vec![insert("1", "a", "x")]);
            first.insert(1, LogOp::Relation(rel(b'd')));
            log.apply(first).unwrap();
            // A second transaction, written in part (as a big transaction is) and never finished.
            let partial = vec![
                begin(200, 2),
                LogOp::Change(IncomingChange {
                    relation_id: 7,
                    op: Op::Update,
                    old: None,
                    new: Some(vec![text("1"), text("b"), IncomingCell::UnchangedToast]),
                }),
                insert("2", "c", "y"),
            ];
            log.apply(partial).unwrap();
            // Readers show only finished transactions; the partial one is stored but hidden.
            assert_eq!(all_changes(&log).len(), 1);
            assert_eq!(log.inflight_changes(), 2);
        }
        let mut log = ChangeLog::open(&archive).unwrap();
        let changes = all_changes(&log);
        assert_eq!(changes.len(), 1, "the unfinished transaction must be gone");
        assert_eq!(log.durable_position(), Lsn(108));
        log.complete_all().unwrap();
        let reader = log.reader().unwrap();
        assert_eq!(
            reader.current_row_count(7).unwrap(),
            1,
            "row 2 must not be in the index"
        );
        // The index holds row 1 as the finished transaction left it.
        drop(reader);
        let upd = txn(
            200,
            vec![LogOp::Change(IncomingChange {
                relation_id: 7,
                op: Op::Update,
                old: None,
                new: Some(vec![text("1"), text("b"), IncomingCell::UnchangedToast]),
            })],
        );
        log.apply(upd).unwrap();
        let changes = all_changes(&log);
        let rec = &changes[1].1;
        assert_eq!(rec.before.as_ref().unwrap()[1], Cell::Text("a".into()));
    }

    /// The stored current-row index, every finished transaction completed first.
    fn current_rows(archive: &Path) -> Vec<(Vec<u8>, Row)> {
        let mut log = ChangeLog::open(archive).unwrap();
        log.complete_all().unwrap();
        let rtx = log.db.begin_read().unwrap();
        let table = rtx.open_table(CURRENT).unwrap();
        table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (
                    k.value().1.to_vec(),
                    decode::<Row>(v.value(), "current_rows").unwrap(),
                )
            })
            .collect()
    }

    fn update(id: &str, v: &str) -> LogOp {
        LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Update,
            old: None,
            new: Some(vec![text(id), text(v), text("x")]),
        })
    }

    /// A delete of row `id` of relation 7, its old image the key (REPLICA IDENTITY DEFAULT).
    fn delete(id: &str) -> LogOp {
        LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Delete,
            old: Some(OldImage::Key(vec![
                text(id),
                IncomingCell::Null,
                IncomingCell::Null,
            ])),
            new: None,
        })
    }

    /// The change records as stored, without a reader's completion: `(key, record)` up to
    /// the last finished transaction.
    fn stored_records(log: &ChangeLog) -> Vec<ChangeEntry> {
        let rtx = log.db.begin_read().unwrap();
        let last = get_u64(&rtx.open_table(META).unwrap(), META_LAST_COMMIT)
            .unwrap()
            .unwrap_or(0);
        let table = rtx.open_table(CHANGES).unwrap();
        table
            .range(..=(last, u32::MAX))
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                let (lsn, seq) = k.value();
                (
                    ChangeKey::new(Lsn(lsn), seq),
                    decode(v.value(), "changes").unwrap(),
                )
            })
            .collect()
    }

    /// Transactions spanning batches, one finished in the batch that starts the next, which a
    /// crash leaves unfinished: the finished one's records complete from the versions before
    /// them, and the unfinished one leaves nothing, in the records or the index. Version 8
    /// writes no undo rows.
    #[test]
    fn spanning_transactions_complete_and_an_unfinished_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let row = |id: &str, v: &str| {
            vec![
                Cell::Text(id.into()),
                Cell::Text(v.into()),
                Cell::Text("x".into()),
            ]
        };
        let key = |id: &str| encode_plain(&vec![Some(id.to_string())]);
        {
            let mut log = ChangeLog::open(&archive).unwrap();
            let mut first = txn(100, vec![insert("1", "a", "x"), insert("2", "b", "x")]);
            first.insert(1, LogOp::Relation(rel(b'd')));
            log.apply(first).unwrap();
            // A spans two batches; B starts in the batch that finishes A and never finishes.
            log.apply(vec![
                begin(200, 2),
                update("1", "a2"),
                insert("3", "c", "x"),
            ])
            .unwrap();
            log.apply(vec![
                update("2", "b2"),
                LogOp::Commit { end_lsn: Lsn(208) },
                begin(300, 3),
                update("1", "a3"),
                delete("2"),
                insert("4", "d", "x"),
                update("1", "a4"),
            ])
            .unwrap();
            let rtx = log.db.begin_read().unwrap();
            for definition in UNDO {
                assert!(table_if_made(&rtx, definition).unwrap().is_none());
            }
        }
        // The crash: B is gone, and A completes from what the first transaction left.
        let after_a = vec![
            (key("1"), row("1", "a2")),
            (key("2"), row("2", "b2")),
            (key("3"), row("3", "c")),
        ];
        assert_eq!(current_rows(&archive), after_a);
        let log = ChangeLog::open(&archive).unwrap();
        let befores: Vec<Option<Row>> = all_changes(&log)
            .into_iter()
            .map(|(_, r)| r.before)
            .collect();
        assert_eq!(
            befores,
            vec![None, None, Some(row("1", "a")), None, Some(row("2", "b"))]
        );
    }

    /// Completion after acknowledgement, against a model: over transactions that insert,
    /// update (the unsent column completed from the index, some moving the key), delete and
    /// truncate, some spanning two batches, with crashes between batches (one of them inside a
    /// spanning transaction) and completion steps of one to seven records (stopping inside
    /// transactions), every update's and delete's before image a reader sees is the row as the
    /// model holds it, whatever completion has stored; what completion stores is what readers
    /// saw before it; and the stored index equals the model at the end.
    #[test]
    fn completion_gives_every_image_from_the_model_across_crashes_and_steps() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let mut model: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let row = |id: &str, (v, big): &(String, String)| {
            vec![
                Cell::Text(id.into()),
                Cell::Text(v.clone()),
                Cell::Text(big.clone()),
            ]
        };
        let mut lsn = 100u64;
        let mut log = ChangeLog::open(&archive).unwrap();
        log.apply(txn(50, vec![LogOp::Relation(rel(b'd'))]))
            .unwrap();
        let (mut crashes, mut checked, mut steps, mut partial) = (0, 0, 0, 0);
        for round in 0..400u32 {
            // One transaction: its ops, its expected before images, and the model after it.
            let mut after_tx = model.clone();
            let mut ops = Vec::new();
            let mut expected: Vec<Option<Row>> = Vec::new();
            for _ in 0..1 + next(4) {
                let id = next(12).to_string();
                let present = after_tx.get(&id).cloned();
                let change = match (present, next(20)) {
                    (_, 0) => {
                        after_tx.clear();
                        expected.push(None);
                        IncomingChange {
                            relation_id: 7,
                            op: Op::Truncate,
                            old: None,
                            new: None,
                        }
                    }
                    (None, _) => {
                        let values = (format!("v{round}"), format!("big{round}"));
                        let new = vec![text(&id), text(&values.0), text(&values.1)];
                        after_tx.insert(id, values);
                        expected.push(None);
                        IncomingChange {
                            relation_id: 7,
                            op: Op::Insert,
                            old: None,
                            new: Some(new),
                        }
                    }
                    (Some(was), k) if k < 8 => {
                        // `big` is unsent (unchanged TOAST): only the index knows it.
                        expected.push(Some(row(&id, &was)));
                        let moved = (12 + next(12)).to_string();
                        let (to, old) = if k < 3 && !after_tx.contains_key(&moved) {
                            let key = vec![text(&id), IncomingCell::Null, IncomingCell::Null];
                            (moved, Some(OldImage::Key(key)))
                        } else {
                            (id.clone(), None)
                        };
                        after_tx.remove(&id);
                        let new = vec![
                            text(&to),
                            text(&format!("u{round}")),
                            IncomingCell::UnchangedToast,
                        ];
                        after_tx.insert(to, (format!("u{round}"), was.1));
                        IncomingChange {
                            relation_id: 7,
                            op: Op::Update,
                            old,
                            new: Some(new),
                        }
                    }
                    (Some(was), _) => {
                        expected.push(Some(row(&id, &was)));
                        after_tx.remove(&id);
                        IncomingChange {
                            relation_id: 7,
                            op: Op::Delete,
                            old: Some(OldImage::Key(vec![
                                text(&id),
                                IncomingCell::Null,
                                IncomingCell::Null,
                            ])),
                            new: None,
                        }
                    }
                };
                ops.push(LogOp::Change(change));
            }
            let tx = txn(lsn, ops);
            let commit_lsn = lsn;
            lsn += 100;
            match next(10) {
                // Spanning two batches, cut anywhere from after its Begin to before its
                // Commit, and finished.
                0 | 1 => {
                    let (first, second) = tx.split_at(1 + next(tx.len() as u64 - 1) as usize);
                    log.apply(first.to_vec()).unwrap();
                    log.apply(second.to_vec()).unwrap();
                }
                // Spanning two batches, and the capture dies before its Commit: it never
                // happened.
                2 => {
                    let (first, second) = tx[..tx.len() - 1].split_at(2);
                    log.apply(first.to_vec()).unwrap();
                    log.apply(second.to_vec()).unwrap();
                    drop(log);
                    crashes += 1;
                    log = ChangeLog::open(&archive).unwrap();
                    continue;
                }
                _ => {
                    log.apply(tx).unwrap();
                }
            }
            model = after_tx;
            let stored: Vec<Option<Row>> = all_changes(&log)
                .into_iter()
                .filter(|(k, _)| k.commit_lsn == Lsn(commit_lsn))
                .map(|(_, r)| r.before)
                .collect();
            assert_eq!(
                stored, expected,
                "before images of the transaction at {commit_lsn}"
            );
            checked += expected.iter().flatten().count();
            match next(8) {
                // A crash between batches: nothing of the writer's memory is needed.
                0 => {
                    drop(log);
                    crashes += 1;
                    log = ChangeLog::open(&archive).unwrap();
                }
                // Some completion steps, each of up to seven records: the log's own step
                // size, or the budget the writer gives a step while completion is overdue.
                1 | 2 => {
                    let seen = all_changes(&log);
                    let budget = (next(2) == 0).then(|| 1 + next(7) as usize);
                    log.step_records = budget.map_or(1 + next(7) as usize, |_| STEP_RECORDS);
                    for _ in 0..1 + next(6) {
                        let from = log.reader().unwrap().completed_through().unwrap();
                        let caught_up = match budget {
                            Some(records) => log.complete_step_of(records).unwrap(),
                            None => log.complete_step().unwrap(),
                        };
                        if let Some(records) = budget {
                            let to = log.reader().unwrap().completed_through().unwrap();
                            let completed = stored_records(&log)
                                .iter()
                                .filter(|(k, _)| from < *k && *k <= to)
                                .count();
                            assert!(
                                completed <= records,
                                "{completed} records in a step of {records}"
                            );
                        }
                        if caught_up {
                            break;
                        }
                    }
                    steps += 1;
                    assert_eq!(all_changes(&log), seen, "a reader's view after a step");
                    let through = log.reader().unwrap().completed_through().unwrap();
                    let stored: Vec<ChangeEntry> = stored_records(&log)
                        .into_iter()
                        .filter(|(k, _)| *k <= through)
                        .collect();
                    assert_eq!(stored[..], seen[..stored.len()], "stored through {through}");
                    partial += usize::from(through.seq != u32::MAX);
                }
                _ => {}
            }
        }
        drop(log);
        let sorted = |mut rows: Vec<(Vec<u8>, Row)>| {
            rows.sort();
            rows
        };
        let modelled: Vec<(Vec<u8>, Row)> = model
            .iter()
            .map(|(id, values)| (encode_plain(&vec![Some(id.clone())]), row(id, values)))
            .collect();
        assert_eq!(sorted(current_rows(&archive)), sorted(modelled));
        assert!(
            crashes > 30 && checked > 300 && steps > 50 && partial > 10,
            "{crashes} crashes, {checked} images, {steps} completions, {partial} inside a transaction"
        );

        // A TRUNCATE and a snapshot forget the relation's rows, also when completed after a
        // crash: rows inserted before each must not come back.
        let only = |id: &str| {
            let values = ("v".to_string(), "b".to_string());
            vec![(encode_plain(&vec![Some(id.to_string())]), row(id, &values))]
        };
        let truncate = LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Truncate,
            old: None,
            new: None,
        });
        let mut log = ChangeLog::open(&archive).unwrap();
        let mut batch = txn(lsn, vec![insert("a1", "v", "b"), insert("a2", "v", "b")]);
        batch.extend(txn(lsn + 100, vec![truncate, insert("t1", "v", "b")]));
        log.apply(batch).unwrap();
        drop(log);
        assert_eq!(current_rows(&archive), only("t1"));
        let mut log = ChangeLog::open(&archive).unwrap();
        let mut batch = txn(lsn + 200, vec![insert("b1", "v", "b")]);
        batch.extend(txn(
            lsn + 300,
            vec![
                LogOp::SnapshotOf(TableScope::whole(7)),
                LogOp::Change(IncomingChange {
                    relation_id: 7,
                    op: Op::Snapshot,
                    old: None,
                    new: Some(vec![text("s1"), text("v"), text("b")]),
                }),
            ],
        ));
        log.apply(batch).unwrap();
        drop(log);
        assert_eq!(current_rows(&archive), only("s1"));
    }

    /// A spanning transaction that truncates a table forgets the table's rows: after the
    /// TRUNCATE the index knows only the rows the transaction set since, and once it is
    /// finished exactly those.
    #[test]
    fn a_spanning_transaction_forgets_a_truncated_tables_rows() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let mut log = ChangeLog::open(&archive).unwrap();
        let mut first = txn(100, vec![insert("1", "a", "x"), insert("2", "b", "x")]);
        first.insert(1, LogOp::Relation(rel(b'd')));
        log.apply(first).unwrap();
        let truncate = LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Truncate,
            old: None,
            new: None,
        });
        log.apply(vec![begin(200, 2), truncate]).unwrap();
        log.apply(vec![
            insert("3", "c", "y"),
            update("3", "c2"),
            delete("1"),
            LogOp::Commit { end_lsn: Lsn(208) },
        ])
        .unwrap();
        let befores: Vec<Option<Row>> = all_changes(&log)
            .into_iter()
            .filter(|(k, _)| k.commit_lsn == Lsn(200))
            .map(|(_, r)| r.before)
            .collect();
        let cells = |v: [&str; 3]| v.map(|c| Cell::Text(c.into())).to_vec();
        assert_eq!(
            befores,
            vec![
                None,
                None,
                Some(cells(["3", "c", "y"])),
                // Row 1 went with the TRUNCATE: the index knows nothing of it.
                Some(vec![Cell::Text("1".into()), Cell::Unknown, Cell::Unknown]),
            ]
        );
        drop(log);
        let only_3 = vec![(
            encode_plain(&vec![Some("3".to_string())]),
            cells(["3", "c2", "x"]),
        )];
        assert_eq!(current_rows(&archive), only_3);
    }

    #[test]
    fn default_identity_update_gets_full_images_from_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(&dir.path().join("a")).unwrap();
        let mut ops = txn(100, vec![insert("1", "a", "BIG")]);
        ops.insert(1, LogOp::Relation(rel(b'd')));
        log.apply(ops).unwrap();
        let upd = |lsn, v: &str| {
            txn(
                lsn,
                vec![LogOp::Change(IncomingChange {
                    relation_id: 7,
                    op: Op::Update,
                    old: None,
                    new: Some(vec![text("1"), text(v), IncomingCell::UnchangedToast]),
                })],
            )
        };
        log.apply(upd(200, "b")).unwrap();
        let del = txn(300, vec![delete("1")]);
        log.apply(del).unwrap();
        let changes = all_changes(&log);
        let update = &changes[1].1;
        assert_eq!(
            update.before.as_ref().unwrap(),
            &vec![
                Cell::Text("1".into()),
                Cell::Text("a".into()),
                Cell::Text("BIG".into())
            ]
        );
        assert_eq!(
            update.after.as_ref().unwrap(),
            &vec![
                Cell::Text("1".into()),
                Cell::Text("b".into()),
                Cell::Text("BIG".into())
            ]
        );
        let delete = &changes[2].1;
        assert_eq!(
            delete.before, update.after,
            "delete before image comes from the archive"
        );
        assert_eq!(delete.key, Some(vec![Some("1".to_string())]));
    }

    #[test]
    fn unchanged_toast_without_earlier_version_is_unknown_not_null() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(&dir.path().join("a")).unwrap();
        let ops = vec![
            begin(100, 1),
            LogOp::Relation(rel(b'd')),
            LogOp::Change(IncomingChange {
                relation_id: 7,
                op: Op::Update,
                old: None,
                new: Some(vec![text("9"), text("b"), IncomingCell::UnchangedToast]),
            }),
            LogOp::Commit { end_lsn: Lsn(108) },
        ];
        log.apply(ops).unwrap();
        let rec = &all_changes(&log)[0].1;
        assert_eq!(rec.after.as_ref().unwrap()[2], Cell::Unknown);
        assert_eq!(rec.before.as_ref().unwrap()[1], Cell::Unknown);
        assert_eq!(rec.before.as_ref().unwrap()[0], Cell::Text("9".into()));
    }

    #[test]
    fn first_context_labels_earlier_changes_and_later_context_applies_forward() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(&dir.path().join("a")).unwrap();
        let ops = vec![
            begin(100, 1),
            LogOp::Relation(rel(b'd')),
            insert("1", "a", "x"),
            LogOp::Context("{\"user_id\":1}".into()),
            insert("2", "a", "x"),
            LogOp::Context("{\"user_id\":2}".into()),
            insert("3", "a", "x"),
            LogOp::Commit { end_lsn: Lsn(108) },
        ];
        log.apply(ops).unwrap();
        let contexts: Vec<_> = all_changes(&log)
            .into_iter()
            .map(|(_, r)| r.context.unwrap())
            .collect();
        assert_eq!(
            contexts,
            vec!["{\"user_id\":1}", "{\"user_id\":1}", "{\"user_id\":2}"]
        );
    }

    #[test]
    fn a_context_is_stored_once_per_run_and_labels_each_change_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let message = |text: &str| {
            LogOp::Message(LogicalMessage {
                transactional: true,
                prefix: "app".into(),
                content: text.as_bytes().to_vec(),
            })
        };
        let (one, two) = ("{\"step\":1}".to_string(), "{\"step\":2}".to_string());
        {
            let mut log = ChangeLog::open(&path).unwrap();
            // A transaction spread over two batches: a change and a message before its first
            // context, the context repeated before every row, then a second one.
            log.apply(vec![
                begin(100, 1),
                LogOp::Relation(rel(b'd')),
                insert("1", "a", "x"),
                message("before"),
                LogOp::Context(one.clone()),
                insert("2", "a", "x"),
                LogOp::Context(one.clone()),
            ])
            .unwrap();
            log.apply(vec![
                insert("3", "a", "x"),
                LogOp::Context(one.clone()),
                insert("4", "a", "x"),
                LogOp::Context(two.clone()),
                insert("5", "a", "x"),
                message("after"),
                LogOp::Commit { end_lsn: Lsn(108) },
                // A transaction with no context, then one left unfinished by a crash.
                begin(200, 2),
                insert("6", "a", "x"),
                LogOp::Commit { end_lsn: Lsn(208) },
                begin(300, 3),
                LogOp::Context("{\"step\":3}".into()),
                insert("7", "a", "x"),
            ])
            .unwrap();
        }
        // Reopened as after a crash: the unfinished transaction and its context run are gone.
        let log = ChangeLog::open(&path).unwrap();
        let labels: Vec<(ChangeKey, Option<String>)> = all_changes(&log)
            .into_iter()
            .map(|(k, r)| (k, r.context))
            .collect();
        let k = |lsn: u64, seq: u32| ChangeKey::new(Lsn(lsn), seq);
        assert_eq!(
            labels,
            vec![
                (k(100, 0), Some(one.clone())),
                (k(100, 1), None),
                (k(100, 2), Some(one.clone())),
                (k(100, 3), Some(one.clone())),
                (k(100, 4), Some(one.clone())),
                (k(100, 5), Some(two.clone())),
                (k(100, 6), Some(two.clone())),
                (k(200, 0), None),
            ]
        );
        let rtx = log.db.begin_read().unwrap();
        let runs: Vec<(u64, u32)> = rtx
            .open_table(CONTEXTS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|e| e.unwrap().0.value())
            .collect();
        assert_eq!(
            runs,
            vec![(100, 0), (100, 5)],
            "one entry per run, none for the crashed transaction"
        );
        let raw = rtx.open_table(CHANGES).unwrap();
        for e in raw.iter().unwrap() {
            let rec: ChangeRecord = decode(e.unwrap().1.value(), "changes").unwrap();
            assert_eq!(rec.context, None, "records carry no context of their own");
        }
    }

    #[test]
    fn large_values_round_trip_through_compression() {
        let row: Row = vec![Cell::Text("x".repeat(100_000)), Cell::Null, Cell::Unknown];
        let bytes = encode(&row);
        assert_eq!(bytes[0], 1);
        assert!(bytes.len() < 10_000);
        let back: Row = decode(&bytes, "test").unwrap();
        assert_eq!(back, row);
        assert!(decode::<Row>(&[9, 1, 2], "test").is_err());
        assert!(decode::<Row>(&[1, 1], "test").is_err());
        // A damaged length header (4 GiB) is an error, not a 4 GiB allocation.
        let mut damaged = bytes.clone();
        damaged[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode::<Row>(&damaged, "test")
                .unwrap_err()
                .to_string()
                .contains("test")
        );
        let mut short = bytes.clone();
        short[1..5].copy_from_slice(&10u32.to_le_bytes());
        assert!(decode::<Row>(&short, "test").is_err());
    }

    /// The version 2, 3 and 4 fixtures (written by those builds) upgraded by the writer read
    /// as they read before the upgrade, now in the current version: the same snapshots,
    /// scopes and layouts.
    #[test]
    fn older_logs_are_upgraded_in_place_and_read_the_same() {
        for version in [2u32, 3, 4] {
            let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../fixtures/archives/v{version}/shop/archive"));
            let dir = tempfile::tempdir().unwrap();
            let archive = dir.path().join("a");
            fs::create_dir(&archive).unwrap();
            fs::set_permissions(&archive, fs::Permissions::from_mode(0o700)).unwrap();
            fs::copy(fixture.join(LOG_FILE), archive.join(LOG_FILE)).unwrap();
            let read = |archive: &Path| {
                let reader = LogReader::open(archive).unwrap();
                (
                    reader.format_version().unwrap(),
                    reader.snapshots().unwrap(),
                    reader.layouts().unwrap(),
                )
            };
            let (format, snapshots, layouts) = read(&archive);
            assert_eq!(format, Some(version));
            let scoped = snapshots.iter().filter_map(|s| s.tables.as_ref()).flatten();
            assert!(
                scoped.clone().any(|t| t.layout.is_some()),
                "v{version}: the fixture records a layout: {snapshots:?}"
            );
            let recorded: Vec<&StorageLayout> = scoped
                .filter_map(|t| t.layout.as_ref())
                .chain(layouts.iter().map(|(_, (_, l))| l))
                .collect();
            // What the version did not record reads as not recorded.
            assert_eq!(
                recorded.iter().any(|l| !l.enum_labels.is_empty()),
                version >= 4,
                "v{version}: labels"
            );
            assert!(recorded.iter().all(|l| l.partitions.is_empty()));
            assert_eq!(
                recorded.iter().any(|l| !l.column_names.is_empty()),
                version >= 3,
                "v{version}: names"
            );
            drop(ChangeLog::open(&archive).unwrap());
            let upgraded = read(&archive);
            assert_eq!(
                upgraded,
                (Some(FORMAT_VERSION), snapshots, layouts),
                "v{version}"
            );
        }
    }

    #[test]
    fn a_capture_waits_for_a_log_another_process_holds_for_a_moment() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let holder = ChangeLog::open(&archive).unwrap();
        assert!(matches!(ChangeLog::open(&archive), Err(LogError::InUse)));
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(holder);
        });
        let waited = ChangeLog::open_patiently(&archive, REPAIR_PATIENCE);
        release.join().unwrap();
        assert!(waited.is_ok(), "{:?}", waited.err());
        // Held for longer than the patience (another capture): said, not waited on forever.
        let _held = waited.unwrap();
        let refused = ChangeLog::open_patiently(&archive, std::time::Duration::from_millis(200));
        assert!(matches!(refused, Err(LogError::InUse)));
    }

    /// Set in the child process of the test below: the archive it writes and then crashes in.
    const CRASH_IN: &str = "PGTRAIL_TEST_CRASH_IN";

    #[test]
    fn readers_and_a_capture_opening_a_crashed_log_at_once_all_open_it() {
        if let Some(archive) = std::env::var_os(CRASH_IN) {
            let mut log = ChangeLog::open(Path::new(&archive)).unwrap();
            let mut first = txn(100, vec![insert("1", "a", "x")]);
            first.insert(1, LogOp::Relation(rel(b'd')));
            log.apply(first).unwrap();
            // A writer that dies without closing the file: the next opener must repair it.
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "log::tests::readers_and_a_capture_opening_a_crashed_log_at_once_all_open_it",
            ])
            .env(CRASH_IN, &archive)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!child.success(), "the writer process was to crash");
        // Each reader finding the crash repairs the log by opening it for writing once; the
        // others (and the capture) meet it held meanwhile, and must wait, not fail.
        let opened: Vec<Result<usize, String>> = std::thread::scope(|scope| {
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let reader = LogReader::open(&archive).map_err(|e| e.to_string())?;
                        let changes = reader.changes().map_err(|e| e.to_string())?;
                        Ok(changes.count())
                    })
                })
                .collect();
            let capture = scope.spawn(|| {
                let log = ChangeLog::open_patiently(&archive, REPAIR_PATIENCE)
                    .map_err(|e| e.to_string())?;
                Ok(all_changes(&log).len())
            });
            readers
                .into_iter()
                .chain([capture])
                .map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(opened, vec![Ok(1); 5]);
    }

    #[test]
    fn world_readable_archive_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("open");
        fs::create_dir(&archive).unwrap();
        fs::set_permissions(&archive, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            ChangeLog::open(&archive),
            Err(LogError::Permissions { .. })
        ));
    }
}
