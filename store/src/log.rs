//! The change log: a redb database (`log.redb`) in the archive directory.
//!
//! # Tables
//!
//! | table          | key                                   | value                                   |
//! |----------------|---------------------------------------|-----------------------------------------|
//! | `changes`      | `(commit_lsn u64, seq u32)`           | encoded [`ChangeRecord`]                |
//! | `transactions` | `commit_lsn u64`                      | encoded [`TxnRecord`]                   |
//! | `relations`    | `(relation_id u32, commit_lsn, seq)`  | encoded [`RelationVersion`]             |
//! | `types`        | `type_oid u32`                        | encoded `(schema, name)` of a non-builtin type |
//! | `current_rows` | `(relation_id u32, key bytes)`        | encoded [`Row`]: the latest version     |
//! | `current_undo_0`, `current_undo_1` | `(relation_id u32, key bytes)` | the `current_rows` value before the open transaction touched it (`0` absent, `1` + value) |
//! | `meta`         | name                                  | position, last commit, source identity  |
//! | `gaps`         | `from_lsn u64`                        | encoded [`Gap`]                         |
//! | `snapshots`    | `commit_lsn u64`                      | commit time (µs) of a snapshot transaction |
//!
//! Values are postcard-encoded, with a one-byte prefix: `0` plain, `1` zstd-compressed (used
//! when the encoding is larger than [`COMPRESS_ABOVE`] bytes).
//!
//! # Commit protocol and why it is crash safe
//!
//! A source transaction is written under its commit LSN (the `final_lsn` of its Begin
//! message), which is known before its first change, so a transaction of any size streams
//! into `changes` without being held in memory: the writer commits a large transaction in
//! several non-durable redb commits and finishes it at the source Commit, where the
//! `transactions` record, `last_commit` and `position` are written in the same redb
//! transaction. Only a durable ([`Durability::Immediate`]) commit makes `position` eligible
//! for acknowledgement.
//!
//! After a crash at any point, [`ChangeLog::open`] sees redb at its last commit (durable or
//! not) and removes whatever belongs to a source transaction that has no `transactions`
//! record yet: changes and relation versions keyed after `last_commit`, and the current-row
//! index is put back from the undo tables. A transaction whose Begin and Commit arrive in the
//! same batch (one redb write transaction: almost every transaction) writes no undo rows: its
//! index changes are committed or lost together with its `transactions` record, so there is
//! never an unfinished part of it to undo. A transaction spanning batches writes its undo rows
//! to one of two tables, alternating, and the table is deleted whole in the redb transaction
//! that stores its `transactions` record; so no commit ever holds undo rows of a finished
//! transaction. Two tables because one batch can finish one such transaction and start the
//! next. PostgreSQL then sends that transaction again from
//! the slot, because nothing past the durable `position` was acknowledged. A source
//! transaction whose commit LSN is below `position` is a replay of one already stored and is
//! skipped whole, so nothing is stored twice.
//!
//! # Format versions
//!
//! `meta.format_version` names the layout above; [`FORMAT_VERSION`] is the one this code
//! writes. Every archive written by an earlier pgtrail must stay readable by every later one,
//! which `fixtures/archives/v<N>/` and the test that answers from them hold to.
//!
//! | version | what changed |
//! |---------|--------------|
//! | 1       | the layout above. Builds before the format discipline wrote two variants under the same number, both read: one undo table `current_undo` keyed by commit LSN (drained by recovery into the index), and no `snapshots` table (read as no snapshot points) |
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

use redb::{ConcurrencyMode, Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::change::{
    Cell, ChangeRecord, IncomingCell, IncomingChange, LogicalMessage, OldImage, Op, Row,
};
use crate::error::LogError;
use crate::lsn::{ChangeKey, Lsn};
use crate::relation::RelationVersion;

pub(crate) const CHANGES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("changes");
pub(crate) const TXNS: TableDefinition<u64, &[u8]> = TableDefinition::new("transactions");
pub(crate) const RELATIONS: TableDefinition<(u32, u64, u32), &[u8]> =
    TableDefinition::new("relations");
const TYPES: TableDefinition<u32, &[u8]> = TableDefinition::new("types");
pub(crate) const CURRENT: TableDefinition<(u32, &[u8]), &[u8]> =
    TableDefinition::new("current_rows");
/// The two undo tables (see the module doc); a spanning transaction uses `UNDO[slot]`.
type UndoTable = TableDefinition<'static, (u32, &'static [u8]), &'static [u8]>;
const UNDO: [UndoTable; 2] = [
    TableDefinition::new("current_undo_0"),
    TableDefinition::new("current_undo_1"),
];
/// The undo table of earlier versions (one table keyed by commit LSN, values encoded
/// `Option<Row>`): drained by recovery when a log written by them was left mid-transaction.
const UNDO_V1: TableDefinition<(u64, u32, &[u8]), &[u8]> = TableDefinition::new("current_undo");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const GAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("gaps");
/// redb's page cache for the log. Its default (1 GiB) is a ceiling that a large transaction
/// fills: a 10,000,000-row transaction peaked at 1,092 MiB resident (pgtrail-bench bigtx).
/// The capture's resident memory plateaus at about this plus 85 MiB: a 1,000,000-row
/// transaction (debug build) peaked at 201 MiB with 96 MiB and 137 MiB with 48 MiB before its
/// compaction, and the decode suite measured the same throughput and CPU per change at both.
const LOG_CACHE_BYTES: usize = 48 << 20;

/// Snapshot transactions (the initial one, and each `--resnapshot` after a gap): commit LSN to
/// commit time. Never trimmed: a reader replaying history starts each table afresh at these
/// points, because a snapshot is the whole state, not changes to the state before it.
const SNAPSHOTS: TableDefinition<u64, i64> = TableDefinition::new("snapshots");

const META_FORMAT: &str = "format_version";
const META_POSITION: &str = "position";
pub(crate) const META_LAST_COMMIT: &str = "last_commit";
const META_SOURCE: &str = "source";

/// The on-disk format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Encoded values larger than this are zstd-compressed.
pub const COMPRESS_ABOVE: usize = 1024;
/// The log's file name inside the archive directory.
pub const LOG_FILE: &str = "log.redb";

/// What the log knows of one stored source transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    pub xid: u32,
    /// The Commit message's end LSN: the position to acknowledge once this is durable.
    pub end_lsn: Lsn,
    pub committed_at_us: i64,
    pub change_count: u32,
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
}

/// What one [`ChangeLog::apply`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub transactions: u64,
    pub changes: u64,
    /// Transactions skipped because the log already holds them (replays after a restart).
    pub duplicates_skipped: u64,
}

struct InFlight {
    final_lsn: Lsn,
    xid: u32,
    committed_at_us: i64,
    next_seq: u32,
    context: Option<String>,
    saw_context: bool,
    skip: bool,
    /// The transaction's Commit is in the same redb write transaction as its Begin: its
    /// current-row index changes commit or vanish together with it, so no undo rows.
    atomic: bool,
    /// Which of the two undo tables a spanning (not atomic) transaction writes.
    undo_slot: usize,
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
    /// Whether the Begin being applied has its Commit in the same batch (see
    /// `InFlight::atomic`).
    begin_atomic: bool,
    /// The undo table the next spanning transaction writes (alternates).
    next_undo_slot: usize,
    /// The undo tables of spanning transactions finished in the batch being applied: deleted
    /// before that batch's redb commit.
    finished_undo: [bool; 2],
    /// The buffer every stored value is encoded into (reused).
    scratch: Vec<u8>,
}

impl ChangeLog {
    /// Open (or create) the log in `dir`, creating the directory private (0700), and recover
    /// from any crash: see the module doc for why the recovery is safe.
    pub fn open(dir: &Path) -> Result<ChangeLog, LogError> {
        ensure_private_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let existed = path.exists();
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
        let mut log = ChangeLog {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            relations: HashMap::new(),
            position: Lsn::ZERO,
            durable_position: Lsn::ZERO,
            last_commit: Lsn::ZERO,
            inflight: None,
            poisoned: false,
            begin_atomic: false,
            next_undo_slot: 0,
            finished_undo: [false; 2],
            scratch: Vec::new(),
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
                // Version 1 is the first; a later version adds its upgrade step here (see
                // "Format versions" in the module doc).
                Some(v) if v <= u64::from(FORMAT_VERSION) => {}
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
            for definition in UNDO {
                let mut undo = wtx.open_table(definition)?;
                while let Some((k, v)) = undo.pop_first()? {
                    let (relation_id, key) = k.value();
                    put_back(relation_id, key, parse_undo_value(v.value())?)?;
                }
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
            let stale: Vec<(u32, u64, u32)> = relations
                .iter()?
                .filter_map(|e| e.ok())
                .map(|(k, _)| k.value())
                .filter(|(_, lsn, _)| *lsn >= first_unfinished)
                .collect();
            for k in stale {
                relations.remove(k)?;
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
        if self.poisoned {
            return Err(LogError::Corrupt {
                what: "this log handle".into(),
                source: "an earlier write failed; reopen the log".into(),
            });
        }
        self.poisoned = true;
        let mut wtx = self.db.begin_write()?;
        wtx.set_two_phase_commit(true);
        let mut applied = Applied::default();
        {
            let mut tables = Tables {
                changes: wtx.open_table(CHANGES)?,
                txns: wtx.open_table(TXNS)?,
                relations: wtx.open_table(RELATIONS)?,
                types: wtx.open_table(TYPES)?,
                current: wtx.open_table(CURRENT)?,
                undo: [wtx.open_table(UNDO[0])?, wtx.open_table(UNDO[1])?],
                snapshots: wtx.open_table(SNAPSHOTS)?,
                scratch: std::mem::take(&mut self.scratch),
            };
            let ops: Vec<LogOp> = ops.into_iter().collect();
            // Which Begins have their Commit in this batch (see `InFlight::atomic`).
            let mut atomic = vec![false; ops.len()];
            let mut open = None;
            for (i, op) in ops.iter().enumerate() {
                match op {
                    LogOp::Begin { .. } => open = Some(i),
                    LogOp::Commit { .. } => {
                        if let Some(b) = open.take() {
                            atomic[b] = true;
                        }
                    }
                    _ => {}
                }
            }
            for (op, atomic) in ops.into_iter().zip(atomic) {
                self.begin_atomic = atomic;
                self.apply_one(&mut tables, op, &mut applied)?;
            }
            self.scratch = std::mem::take(&mut tables.scratch);
            let mut meta = wtx.open_table(META)?;
            meta.insert(META_POSITION, self.position.0.to_le_bytes().as_slice())?;
            meta.insert(
                META_LAST_COMMIT,
                self.last_commit.0.to_le_bytes().as_slice(),
            )?;
        }
        // The undo rows of a spanning transaction finished in this batch go in the same redb
        // commit as its `transactions` record (a crash keeps both or neither). Deleting the
        // table frees its pages without a per-row delete.
        for (finished, definition) in self.finished_undo.iter_mut().zip(UNDO) {
            if std::mem::take(finished) {
                wtx.delete_table(definition)?;
            }
        }
        crate::crashpoint::hit("log:before_commit");
        wtx.commit()?;
        // Durable, not yet acknowledged: the caller reports the flush LSN after this returns.
        crate::crashpoint::hit("log:after_commit");
        self.durable_position = self.position;
        self.poisoned = false;
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
                let undo_slot = self.next_undo_slot;
                if !self.begin_atomic {
                    // The previous spanning transaction may finish in this same batch, and its
                    // table is deleted at the batch's end: use the other one.
                    self.next_undo_slot ^= 1;
                }
                self.inflight = Some(InFlight {
                    final_lsn,
                    xid,
                    committed_at_us,
                    next_seq: 0,
                    context: None,
                    saw_context: false,
                    // Everything before `position` is stored: this is a replay.
                    skip: final_lsn < self.position,
                    atomic: self.begin_atomic,
                    undo_slot,
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
                let record = complete_change(t, rel, tx, change)?;
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
                if !tx.saw_context && tx.next_seq > 0 {
                    // The first context of a transaction labels the changes before it too.
                    let keys: Vec<(u64, u32)> = t
                        .changes
                        .range((tx.final_lsn.0, 0u32)..(tx.final_lsn.0, tx.next_seq))?
                        .filter_map(|e| e.ok())
                        .map(|(k, _)| k.value())
                        .collect();
                    for k in keys {
                        let mut rec: ChangeRecord = {
                            let v = t.changes.get(k)?.ok_or_else(|| LogError::Corrupt {
                                what: format!("change {}#{}", Lsn(k.0), k.1),
                                source: "vanished during context backfill".into(),
                            })?;
                            decode(v.value(), "changes")?
                        };
                        if rec.context.is_none() && rec.op != Op::Message {
                            rec.context = Some(json.clone());
                            t.changes.insert(k, encode(&rec).as_slice())?;
                        }
                    }
                }
                tx.saw_context = true;
                tx.context = Some(json);
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
                    context: tx.context.clone(),
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
                // Only a snapshot begins with xid 0 (no PostgreSQL transaction has it).
                if tx.xid == 0 {
                    t.snapshots.insert(tx.final_lsn.0, tx.committed_at_us)?;
                }
                // The transaction is finished in this redb transaction: its undo rows are no
                // longer needed (a crash now either keeps all of this or none of it). An
                // atomic one wrote none.
                if !tx.atomic {
                    self.finished_undo[tx.undo_slot] = true;
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

    /// A reader over the log's latest commit.
    pub fn reader(&self) -> Result<LogReader, LogError> {
        LogReader::from_db(self.db.as_ref())
    }
}

/// A table keyed by `(relation_id, encoded key)`: the current-row index and the undo tables.
type RowKeyed<'w> = redb::Table<'w, (u32, &'static [u8]), &'static [u8]>;

struct Tables<'w> {
    changes: redb::Table<'w, (u64, u32), &'static [u8]>,
    txns: redb::Table<'w, u64, &'static [u8]>,
    relations: redb::Table<'w, (u32, u64, u32), &'static [u8]>,
    types: redb::Table<'w, u32, &'static [u8]>,
    current: RowKeyed<'w>,
    undo: [RowKeyed<'w>; 2],
    snapshots: redb::Table<'w, u64, i64>,
    scratch: Vec<u8>,
}

/// Build the stored record of one incoming change: complete the before and after images from
/// the old tuple and the current-row index, and keep the index current.
fn complete_change(
    t: &mut Tables<'_>,
    rel: &RelationVersion,
    tx: &InFlight,
    change: IncomingChange,
) -> Result<ChangeRecord, LogError> {
    let key_pos = rel.key_positions();
    // The index is needed where old images are partial (REPLICA IDENTITY DEFAULT or USING
    // INDEX), not under FULL, whose old tuple carries the whole row.
    let indexed = rel.replica_identity != b'f' && !key_pos.is_empty();
    let width = rel.columns.len();
    let key_of = |row: &Row| (!key_pos.is_empty()).then(|| row_key(row, &key_pos));
    let key_from_incoming = |cells: &[IncomingCell]| -> Vec<Option<String>> {
        key_pos
            .iter()
            .map(|&i| match cells.get(i) {
                Some(IncomingCell::Text(s)) => Some(s.clone()),
                _ => None,
            })
            .collect()
    };
    let mut before: Option<Row> = None;
    let mut after: Option<Row> = None;
    let mut key = None;
    match change.op {
        Op::Insert | Op::Snapshot => {
            // Inserts and snapshot rows never carry `u`.
            let row = fill_row(change.new.unwrap_or_default(), None, width);
            key = key_of(&row);
            if indexed && let Some(k) = &key {
                set_current(t, rel.relation_id, tx, k, Some(&row))?;
            }
            after = Some(row);
        }
        Op::Update => {
            let new = change.new.unwrap_or_default();
            let lookup_key = match &change.old {
                Some(OldImage::Key(cells)) | Some(OldImage::Full(cells)) => {
                    key_from_incoming(cells)
                }
                None => key_from_incoming(&new),
            };
            let prev = if indexed {
                get_current(t, rel.relation_id, &lookup_key)?
            } else {
                None
            };
            let b = match change.old {
                Some(OldImage::Full(cells)) => fill_row(cells, prev.as_ref(), width),
                Some(OldImage::Key(cells)) => prev
                    .clone()
                    .unwrap_or_else(|| key_only_row(&cells, &key_pos, width)),
                None => prev
                    .clone()
                    .unwrap_or_else(|| key_only_row(&new, &key_pos, width)),
            };
            let a = fill_row(new, Some(&b), width);
            key = key_of(&a);
            if indexed {
                let new_key = row_key(&a, &key_pos);
                if new_key != lookup_key {
                    set_current(t, rel.relation_id, tx, &lookup_key, None)?;
                }
                set_current(t, rel.relation_id, tx, &new_key, Some(&a))?;
            }
            before = Some(b);
            after = Some(a);
        }
        Op::Delete => {
            let lookup_key = match &change.old {
                Some(OldImage::Key(cells)) | Some(OldImage::Full(cells)) => {
                    key_from_incoming(cells)
                }
                None => Vec::new(),
            };
            let prev = if indexed {
                get_current(t, rel.relation_id, &lookup_key)?
            } else {
                None
            };
            let b = match change.old {
                Some(OldImage::Full(cells)) => fill_row(cells, prev.as_ref(), width),
                Some(OldImage::Key(cells)) => {
                    prev.unwrap_or_else(|| key_only_row(&cells, &key_pos, width))
                }
                None => vec![Cell::Unknown; width],
            };
            key = key_of(&b);
            if indexed {
                set_current(t, rel.relation_id, tx, &lookup_key, None)?;
            }
            before = Some(b);
        }
        Op::Truncate => {
            if indexed {
                let keys: Vec<Vec<u8>> = t
                    .current
                    .range((rel.relation_id, &[][..])..(rel.relation_id + 1, &[][..]))?
                    .filter_map(|e| e.ok())
                    .map(|(k, _)| k.value().1.to_vec())
                    .collect();
                for k in keys {
                    let old = t.current.remove((rel.relation_id, k.as_slice()))?;
                    if !tx.atomic {
                        let undo = undo_value(old.as_ref().map(|v| v.value()));
                        drop(old);
                        save_undo(t, tx.undo_slot, rel.relation_id, &k, &undo)?;
                    }
                }
            }
        }
        Op::Message => {}
    }
    Ok(ChangeRecord {
        xid: tx.xid,
        committed_at_us: tx.committed_at_us,
        relation_id: rel.relation_id,
        schema_version: rel.valid_from,
        op: change.op,
        key,
        before,
        after,
        context: tx.context.clone(),
        message: None,
    })
}

/// The key column values of a complete row (text form; NULL or unknown as `None`).
fn row_key(row: &Row, key_pos: &[usize]) -> Vec<Option<String>> {
    key_pos
        .iter()
        .map(|&i| row.get(i).and_then(|c| c.as_text().map(str::to_string)))
        .collect()
}

/// A row from incoming cells (moved, not copied), taking each unsent (`u`) value from
/// `fallback` where it is known and marking it unknown otherwise (never NULL).
fn fill_row(cells: Vec<IncomingCell>, fallback: Option<&Row>, width: usize) -> Row {
    let mut cells = cells.into_iter();
    (0..width)
        .map(|i| match cells.next() {
            Some(IncomingCell::Null) => Cell::Null,
            Some(IncomingCell::Text(s)) => Cell::Text(s),
            Some(IncomingCell::UnchangedToast) | None => match fallback.and_then(|r| r.get(i)) {
                Some(c @ (Cell::Null | Cell::Text(_))) => c.clone(),
                _ => Cell::Unknown,
            },
        })
        .collect()
}

/// A row that knows only its key columns (REPLICA IDENTITY DEFAULT with no earlier version in
/// the archive): the other columns are unknown.
fn key_only_row(cells: &[IncomingCell], key_pos: &[usize], width: usize) -> Row {
    (0..width)
        .map(|i| {
            if key_pos.contains(&i) {
                match cells.get(i) {
                    Some(IncomingCell::Text(s)) => Cell::Text(s.clone()),
                    Some(IncomingCell::Null) => Cell::Null,
                    _ => Cell::Unknown,
                }
            } else {
                Cell::Unknown
            }
        })
        .collect()
}

fn get_current(
    t: &Tables<'_>,
    relation_id: u32,
    key: &[Option<String>],
) -> Result<Option<Row>, LogError> {
    let k = encode_plain(&key);
    match t.current.get((relation_id, k.as_slice()))? {
        Some(v) => Ok(Some(decode(v.value(), "current_rows")?)),
        None => Ok(None),
    }
}

fn set_current(
    t: &mut Tables<'_>,
    relation_id: u32,
    tx: &InFlight,
    key: &[Option<String>],
    row: Option<&Row>,
) -> Result<(), LogError> {
    let k = encode_plain(&key);
    // The replaced value comes back from the insert or remove itself: one lookup, not two.
    let undo = match row {
        Some(row) => {
            encode_into(&mut t.scratch, row);
            let old = t
                .current
                .insert((relation_id, k.as_slice()), t.scratch.as_slice())?;
            (!tx.atomic).then(|| undo_value(old.as_ref().map(|v| v.value())))
        }
        None => {
            let old = t.current.remove((relation_id, k.as_slice()))?;
            (!tx.atomic).then(|| undo_value(old.as_ref().map(|v| v.value())))
        }
    };
    if let Some(undo) = undo {
        save_undo(t, tx.undo_slot, relation_id, &k, &undo)?;
    }
    Ok(())
}

/// Remember a current-row entry as it was before the open transaction first touched it
/// (`value` from [`undo_value`]), so that recovery can put it back if the transaction never
/// finishes.
fn save_undo(
    t: &mut Tables<'_>,
    slot: usize,
    relation_id: u32,
    key: &[u8],
    value: &[u8],
) -> Result<(), LogError> {
    let undo = &mut t.undo[slot];
    // One insert in the common case; when the transaction touched this key before, the first
    // value (the one from before the transaction) is put back.
    let earlier = undo
        .insert((relation_id, key), value)?
        .map(|v| v.value().to_vec());
    if let Some(earlier) = earlier {
        undo.insert((relation_id, key), earlier.as_slice())?;
    }
    Ok(())
}

/// An undo table's value: `0` when the key had no current row, `1` and the stored
/// `current_rows` value otherwise. [`parse_undo_value`] reads it back.
fn undo_value(old: Option<&[u8]>) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + old.map_or(0, <[u8]>::len));
    match old {
        Some(bytes) => {
            value.push(1);
            value.extend_from_slice(bytes);
        }
        None => value.push(0),
    }
    value
}

fn parse_undo_value(value: &[u8]) -> Result<Option<&[u8]>, LogError> {
    match value.split_first() {
        Some((1, row)) => Ok(Some(row)),
        Some((0, [])) => Ok(None),
        _ => Err(LogError::Corrupt {
            what: "current_undo".into(),
            source: "an undo value is neither absent (0) nor a row (1)".into(),
        }),
    }
}

/// A consistent read view of the log (one redb read transaction).
pub struct LogReader {
    rtx: redb::ReadTransaction,
    /// The read-only handle [`LogReader::open`] opened, kept open as long as the view (after
    /// `rtx`, which drops first).
    _database: Option<redb::ReadOnlyDatabase>,
}

/// An open log shared between the threads of one process: the writer's
/// ([`ChangeLog::shared`]), handed to a [`Compactor`](crate::Compactor) or read through
/// [`LogReader::of_shared`]. It keeps the storage engine out of other crates' view.
#[derive(Clone)]
pub struct SharedLog(pub(crate) Arc<Database>);

/// One entry of [`LogReader::changes`].
pub type ChangeEntry = (ChangeKey, ChangeRecord);

impl LogReader {
    pub(crate) fn from_db(db: &impl ReadableDatabase) -> Result<LogReader, LogError> {
        let reader = LogReader {
            rtx: db.begin_read()?,
            _database: None,
        };
        // A log of a newer format is refused rather than misread; an older one is read as it
        // is (see "Format versions" in the module doc). A log without the key has had no
        // commit yet (the writer stores it in its first one).
        if let Some(found) = reader.format_version()?
            && found > FORMAT_VERSION
        {
            return Err(LogError::FormatVersion {
                found,
                supported: FORMAT_VERSION,
            });
        }
        Ok(reader)
    }

    /// The log's format version, if it has been written (see [`FORMAT_VERSION`]).
    pub fn format_version(&self) -> Result<Option<u32>, LogError> {
        let meta = match self.rtx.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(get_u64(&meta, META_FORMAT)?.map(|v| u32::try_from(v).unwrap_or(u32::MAX)))
    }

    /// A read view of a log this process has open (see [`ChangeLog::shared`]).
    pub fn of_shared(log: &SharedLog) -> Result<LogReader, LogError> {
        LogReader::from_db(log.0.as_ref())
    }

    pub(crate) fn read_transaction(&self) -> &redb::ReadTransaction {
        &self.rtx
    }

    /// Open a read-only view of the log in `dir`. It works beside a running capture (the
    /// log's one writer), seeing its latest commit, and shows only finished transactions (see
    /// [`changes`](Self::changes)). It does not change the file, with one exception: a log
    /// whose last writer crashed (and is not running) is opened for writing once first,
    /// which repairs the file and runs the writer's crash recovery (see the module doc).
    /// A log of a newer format version is refused.
    pub fn open(dir: &Path) -> Result<LogReader, LogError> {
        let path = dir.join(LOG_FILE);
        if !path.exists() {
            return Err(LogError::NotAnArchive {
                path: dir.to_path_buf(),
            });
        }
        let open = || {
            Database::builder()
                .set_concurrency_mode(ConcurrencyMode::SingleWriter)
                .open_read_only(&path)
        };
        let db = match open() {
            // The last writer stopped without closing the file (a crash): a read-only handle
            // cannot repair it. With no writer running, open the log for writing once, which
            // repairs the file and runs the log's crash recovery, then read.
            Err(redb::DatabaseError::RepairAborted) => {
                drop(ChangeLog::open(dir)?);
                open()
            }
            other => other,
        }
        .map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => LogError::InUse,
            source => LogError::Open {
                path: path.clone(),
                source,
            },
        })?;
        let mut reader = LogReader::from_db(&db)?;
        reader._database = Some(db);
        Ok(reader)
    }

    pub fn position(&self) -> Result<Lsn, LogError> {
        let meta = self.rtx.open_table(META)?;
        Ok(Lsn(get_u64(&meta, META_POSITION)?.unwrap_or(0)))
    }

    pub fn source_identity(&self) -> Result<Option<SourceIdentity>, LogError> {
        let meta = self.rtx.open_table(META)?;
        match meta.get(META_SOURCE)? {
            Some(v) => Ok(Some(decode(v.value(), "meta source")?)),
            None => Ok(None),
        }
    }

    /// Every change of a finished source transaction, in key order. Changes of a transaction
    /// still streaming in (or left unfinished by a crash, until the writer's recovery removes
    /// them) are keyed after the last finished one and are not shown.
    pub fn changes(
        &self,
    ) -> Result<impl Iterator<Item = Result<ChangeEntry, LogError>> + '_, LogError> {
        let last_commit = get_u64(&self.rtx.open_table(META)?, META_LAST_COMMIT)?.unwrap_or(0);
        let table = self.rtx.open_table(CHANGES)?;
        let iter = table.range::<(u64, u32)>(..=(last_commit, u32::MAX))?;
        Ok(iter.map(|e| {
            let (k, v) = e?;
            let (lsn, seq) = k.value();
            let rec: ChangeRecord = decode(v.value(), "changes")?;
            Ok((ChangeKey::new(Lsn(lsn), seq), rec))
        }))
    }

    /// The number of changes [`changes`](Self::changes) yields.
    pub fn change_count(&self) -> Result<u64, LogError> {
        let last_commit = get_u64(&self.rtx.open_table(META)?, META_LAST_COMMIT)?.unwrap_or(0);
        Ok(self
            .rtx
            .open_table(CHANGES)?
            .range::<(u64, u32)>(..=(last_commit, u32::MAX))?
            .count() as u64)
    }

    /// Every stored source transaction: commit LSN and record.
    pub fn transactions(&self) -> Result<Vec<(Lsn, TxnRecord)>, LogError> {
        let table = self.rtx.open_table(TXNS)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            let (k, v) = e?;
            out.push((Lsn(k.value()), decode(v.value(), "transactions")?));
        }
        Ok(out)
    }

    /// Every stored relation version, in (relation, valid_from) order.
    pub fn relations(&self) -> Result<Vec<RelationVersion>, LogError> {
        let table = self.rtx.open_table(RELATIONS)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            let (_, v) = e?;
            out.push(decode(v.value(), "relations")?);
        }
        Ok(out)
    }

    /// Every snapshot transaction: its commit LSN and commit time, in LSN order. An archive
    /// written before snapshots were recorded has none (and no re-snapshot either).
    pub fn snapshots(&self) -> Result<Vec<(Lsn, i64)>, LogError> {
        let table = match self.rtx.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in table.iter()? {
            let (k, v) = e?;
            out.push((Lsn(k.value()), v.value()));
        }
        Ok(out)
    }

    /// Every recorded gap.
    pub fn gaps(&self) -> Result<Vec<Gap>, LogError> {
        let table = self.rtx.open_table(GAPS)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            let (_, v) = e?;
            out.push(decode(v.value(), "gaps")?);
        }
        Ok(out)
    }

    /// The number of rows in the current-row index of a relation.
    pub fn current_row_count(&self, relation_id: u32) -> Result<u64, LogError> {
        let table = self.rtx.open_table(CURRENT)?;
        Ok(table
            .range((relation_id, &[][..])..(relation_id + 1, &[][..]))?
            .count() as u64)
    }
}

pub(crate) fn get_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<u64>, LogError> {
    match table.get(name)? {
        Some(v) => {
            let bytes: [u8; 8] = v.value().try_into().map_err(|_| LogError::Corrupt {
                what: format!("meta {name}"),
                source: "not 8 bytes".into(),
            })?;
            Ok(Some(u64::from_le_bytes(bytes)))
        }
        None => Ok(None),
    }
}

fn encode_plain<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Serializing these plain data types into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// Encode a stored value: postcard, zstd-compressed when large (see the module doc).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, value);
    out
}

/// [`encode`] into `buf`, replacing its contents. The log writer reuses one buffer for every
/// value it stores: growing a fresh `Vec` per value was a tenth of its time (perf, decode suite).
pub(crate) fn encode_into<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    buf.clear();
    buf.push(0);
    // Serializing these plain data types into a Vec cannot fail.
    *buf = postcard::to_extend(value, std::mem::take(buf)).unwrap_or_else(|_| vec![0]);
    let plain = &buf[1..];
    if plain.len() > COMPRESS_ABOVE
        && let Ok(compressed) = zstd::bulk::compress(plain, 1)
        && compressed.len() + 4 < plain.len()
    {
        let len = u32::try_from(plain.len()).unwrap_or(u32::MAX);
        buf.clear();
        buf.push(1);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&compressed);
    }
}

/// The uncompressed size of a stored value (its record encoding), without decoding it.
pub(crate) fn raw_len(bytes: &[u8]) -> u64 {
    match bytes.split_first() {
        Some((1, rest)) if rest.len() >= 4 => {
            u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]))
        }
        _ => bytes.len().saturating_sub(1) as u64,
    }
}

/// Decode a stored value written by [`encode`]; `what` names the table for the error.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, LogError> {
    let corrupt = |source: Box<dyn std::error::Error + Send + Sync>| LogError::Corrupt {
        what: what.to_string(),
        source,
    };
    match bytes.split_first() {
        Some((0, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(Box::new(e))),
        Some((1, rest)) => {
            let (len, data) = rest
                .split_at_checked(4)
                .ok_or_else(|| corrupt("short compressed value".into()))?;
            let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt("bad length".into()))?)
                as usize;
            // Streamed, not `bulk::decompress(data, len)`: that reserves `len` bytes up front,
            // and a damaged length (up to 4 GiB) would then exhaust memory before any check.
            let mut plain = Vec::new();
            let decoder =
                zstd::stream::read::Decoder::with_buffer(data).map_err(|e| corrupt(Box::new(e)))?;
            std::io::Read::read_to_end(
                &mut std::io::Read::take(decoder, len as u64 + 1),
                &mut plain,
            )
            .map_err(|e| corrupt(Box::new(e)))?;
            if plain.len() != len {
                return Err(corrupt(
                    format!(
                        "compressed value holds {} bytes, its header says {len}",
                        plain.len()
                    )
                    .into(),
                ));
            }
            postcard::from_bytes(&plain).map_err(|e| corrupt(Box::new(e)))
        }
        Some((tag, _)) => Err(corrupt(format!("unknown value encoding {tag}").into())),
        None => Err(corrupt("empty value".into())),
    }
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

    fn txn(lsn: u64, ops: Vec<LogOp>) -> Vec<LogOp> {
        let mut v = vec![LogOp::Begin {
            final_lsn: Lsn(lsn),
            xid: 1,
            committed_at_us: 0,
        }];
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
        let mut ops = vec![
            LogOp::Begin {
                final_lsn: Lsn(100),
                xid: 1,
                committed_at_us: 0,
            },
            LogOp::Relation(rel(b'd')),
        ];
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
                LogOp::Begin {
                    final_lsn: Lsn(200),
                    xid: 2,
                    committed_at_us: 0,
                },
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
        let log = ChangeLog::open(&archive).unwrap();
        let changes = all_changes(&log);
        assert_eq!(changes.len(), 1, "the unfinished transaction must be gone");
        assert_eq!(log.durable_position(), Lsn(108));
        let reader = log.reader().unwrap();
        assert_eq!(
            reader.current_row_count(7).unwrap(),
            1,
            "row 2 must be gone from the index"
        );
        // The index holds row 1 as the finished transaction left it.
        drop(reader);
        let mut log = log;
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

    fn current_rows(archive: &Path) -> Vec<(Vec<u8>, Row)> {
        let log = ChangeLog::open(archive).unwrap();
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

    fn undo_rows(log: &ChangeLog) -> [u64; 2] {
        let rtx = log.db.begin_read().unwrap();
        UNDO.map(|d| {
            rtx.open_table(d)
                .map(|t| t.iter().unwrap().count() as u64)
                .unwrap_or(0)
        })
    }

    #[test]
    fn spanning_transactions_meeting_in_one_batch_keep_their_own_undo() {
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
                LogOp::Begin {
                    final_lsn: Lsn(200),
                    xid: 2,
                    committed_at_us: 0,
                },
                update("1", "a2"),
                insert("3", "c", "x"),
            ])
            .unwrap();
            log.apply(vec![
                update("2", "b2"),
                LogOp::Commit { end_lsn: Lsn(208) },
                LogOp::Begin {
                    final_lsn: Lsn(300),
                    xid: 3,
                    committed_at_us: 0,
                },
                update("1", "a3"),
                LogOp::Change(IncomingChange {
                    relation_id: 7,
                    op: Op::Delete,
                    old: Some(OldImage::Key(vec![
                        text("2"),
                        IncomingCell::Null,
                        IncomingCell::Null,
                    ])),
                    new: None,
                }),
                insert("4", "d", "x"),
                update("1", "a4"),
            ])
            .unwrap();
            // A's undo rows went with its commit; B's (keys 1, 2, 4) remain.
            let mut counts = undo_rows(&log);
            counts.sort_unstable();
            assert_eq!(counts, [0, 3]);
        }
        // The crash: B is undone to exactly what A left.
        let after_a = vec![
            (key("1"), row("1", "a2")),
            (key("2"), row("2", "b2")),
            (key("3"), row("3", "c")),
        ];
        assert_eq!(current_rows(&archive), after_a);
        {
            let mut log = ChangeLog::open(&archive).unwrap();
            assert_eq!(all_changes(&log).len(), 5);
            assert_eq!(undo_rows(&log), [0, 0]);
            // A finished spanning transaction leaves nothing that a later recovery would undo.
            log.apply(vec![
                LogOp::Begin {
                    final_lsn: Lsn(300),
                    xid: 3,
                    committed_at_us: 0,
                },
                update("3", "c2"),
            ])
            .unwrap();
            log.apply(vec![LogOp::Commit { end_lsn: Lsn(308) }])
                .unwrap();
            assert_eq!(undo_rows(&log), [0, 0]);
        }
        let mut expected = after_a;
        expected[2].1 = row("3", "c2");
        assert_eq!(current_rows(&archive), expected);
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
        let del = txn(
            300,
            vec![LogOp::Change(IncomingChange {
                relation_id: 7,
                op: Op::Delete,
                old: Some(OldImage::Key(vec![
                    text("1"),
                    IncomingCell::Null,
                    IncomingCell::Null,
                ])),
                new: None,
            })],
        );
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
            LogOp::Begin {
                final_lsn: Lsn(100),
                xid: 1,
                committed_at_us: 0,
            },
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
            LogOp::Begin {
                final_lsn: Lsn(100),
                xid: 1,
                committed_at_us: 0,
            },
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

/// Entry points for the fuzz targets (`tools/fuzz`): not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Decode `bytes` as each kind of value the log stores; any outcome but a panic is fine.
    pub fn decode_log_values(bytes: &[u8]) {
        let _ = decode::<ChangeRecord>(bytes, "changes");
        let _ = decode::<TxnRecord>(bytes, "transactions");
        let _ = decode::<RelationVersion>(bytes, "relations");
        let _ = decode::<Gap>(bytes, "gaps");
        let _ = decode::<SourceIdentity>(bytes, "meta source");
        let _ = decode::<Option<Row>>(bytes, "current_undo");
        let _ = decode::<Row>(bytes, "current_rows");
        let _ = decode::<crate::SegmentEntry>(bytes, "segments");
    }
}
