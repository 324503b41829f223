//! [`LogReader`]: a consistent read view of the log, beside its one writer; and
//! [`SharedLog`], the open log shared between a process's threads.

use super::*;
use crate::error::CompactError;
use crate::manifest::{
    META_COMPACTED_CHANGES, META_COMPACTED_THROUGH, META_COMPACTED_TXNS, SEGMENTS, SEGMENTS_DIR,
    SegmentManifest, meta_u64,
};
use crate::segment::SegmentReader;
use redb::ReadableTableMetadata;

/// The page cache of a reader's handle: redb's own default, with which every query reading
/// the log tail beside a capture was measured.
const READ_CACHE_BYTES: usize = 1 << 30;

/// The page cache of a handle for one pass ([`LogReader::open_for_one_pass`]): enough for the
/// B-trees' interior pages.
const ONE_PASS_CACHE_BYTES: usize = 16 << 20;

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

impl std::fmt::Debug for SharedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedLog")
    }
}

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
        let Some(meta) = table_if_made(&self.rtx, META)? else {
            return Ok(None);
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
        Self::open_caching(dir, READ_CACHE_BYTES)
    }

    /// [`open`](Self::open) for one pass over the log's tables (`verify`): redb's page cache
    /// earns nothing on a pass that reads each page once, and it kept every page read, up to
    /// its limit (a gigabyte after a large purge, whose records and salts are the log's
    /// largest tables), until the reader was dropped.
    pub fn open_for_one_pass(dir: &Path) -> Result<LogReader, LogError> {
        Self::open_caching(dir, ONE_PASS_CACHE_BYTES)
    }

    fn open_caching(dir: &Path, cache_bytes: usize) -> Result<LogReader, LogError> {
        let path = dir.join(LOG_FILE);
        if !path.exists() {
            return Err(LogError::NotAnArchive {
                path: dir.to_path_buf(),
            });
        }
        let open = || {
            Database::builder()
                .set_concurrency_mode(ConcurrencyMode::SingleWriter)
                .set_cache_size(cache_bytes)
                .open_read_only(&path)
        };
        let deadline = std::time::Instant::now() + REPAIR_PATIENCE;
        let mut repaired_here = false;
        let db = loop {
            match open() {
                // The last writer stopped without closing the file (a crash): a read-only
                // handle cannot repair it. With no writer running, open the log for writing
                // once, which repairs the file and runs the log's crash recovery, then read.
                Err(redb::DatabaseError::RepairAborted) if !repaired_here => {
                    match ChangeLog::open(dir) {
                        Ok(repaired) => {
                            drop(repaired);
                            repaired_here = true;
                        }
                        // Another process opened it for writing first: a capture starting (it
                        // repairs the file and then reads beside us) or another reader
                        // repairing it. Wait for that and read again; a log that still needs
                        // repair when the patience is out is held for good, and says so.
                        Err(LogError::InUse) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        Err(e) => return Err(e),
                    }
                }
                opened => break opened,
            }
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

    /// The key of the oldest change still in the log (not compacted), if any.
    pub fn oldest_change(&self) -> Result<Option<ChangeKey>, LogError> {
        let table = self.rtx.open_table(CHANGES)?;
        Ok(table.first()?.map(|(k, _)| {
            let (lsn, seq) = k.value();
            ChangeKey::new(Lsn(lsn), seq)
        }))
    }

    /// Whether every change committed before `before` is in a segment: compacted through it,
    /// or (an idle source, whose last commit came earlier) every transaction committed
    /// before it received and none of them left in the log.
    pub fn compacted_before(&self, before: Lsn) -> Result<bool, LogError> {
        let compacted = self.manifest()?.compacted_through;
        if before <= Lsn(compacted.0.saturating_add(1)) {
            return Ok(true);
        }
        Ok(self.position()? >= before
            && self.oldest_change()?.is_none_or(|k| k.commit_lsn >= before))
    }

    pub fn source_identity(&self) -> Result<Option<SourceIdentity>, LogError> {
        self.meta_value(META_SOURCE)
    }

    /// The latest point at which the capture saw every held table's storage layout as the
    /// archive records it (see [`LogOp::CatalogSeen`](crate::LogOp::CatalogSeen)).
    pub fn catalog_seen(&self) -> Result<Option<(Lsn, i64)>, LogError> {
        self.meta_value(META_CATALOG_SEEN)
    }

    /// The enum types under column types, as the capture last found them (see
    /// [`LogOp::EnumTypes`](crate::LogOp::EnumTypes)); empty before any was recorded.
    pub fn enum_types(&self) -> Result<crate::EnumTypes, LogError> {
        Ok(self.meta_value(META_ENUM_TYPES)?.unwrap_or_default())
    }

    /// What made each held table a member of the capture's publication at its latest look
    /// (see [`LogOp::Memberships`](crate::LogOp::Memberships)), by relation; empty before any
    /// was recorded.
    pub fn memberships(&self) -> Result<std::collections::BTreeMap<u32, (u32, u32)>, LogError> {
        let recorded: Vec<(u32, (u32, u32))> =
            self.meta_value(META_MEMBERSHIPS)?.unwrap_or_default();
        Ok(recorded.into_iter().collect())
    }

    /// The table reads the capture decided on, each with the point the table's rows are
    /// unknown from, that no later snapshot of the relation has stored yet: a crash (or a stop
    /// that could not wait) came between the decision and the read.
    pub fn pending_reads(&self) -> Result<Vec<TableScope>, LogError> {
        let recorded: Vec<TableScope> = self.meta_value(META_PENDING_READS)?.unwrap_or_default();
        if recorded.is_empty() {
            return Ok(recorded);
        }
        let snapshots = self.snapshots()?;
        Ok(recorded
            .into_iter()
            .filter(|pending| {
                let Some((from, _)) = pending.unknown_from else {
                    return false;
                };
                !snapshots.iter().any(|s| {
                    s.lsn > from
                        && s.tables.as_ref().is_none_or(|tables| {
                            tables.iter().any(|t| t.relation_id == pending.relation_id)
                        })
                })
            })
            .collect())
    }

    /// The tables the capture leaves out, with the reason (see
    /// [`LogOp::LeftOut`](crate::LogOp::LeftOut)); empty before any was recorded.
    pub fn left_out(&self) -> Result<Vec<(String, String)>, LogError> {
        Ok(self.meta_value(META_LEFT_OUT)?.unwrap_or_default())
    }

    /// The held tables' storage layouts as the catalog watch last accepted them (see
    /// [`LogOp::Layouts`](crate::LogOp::Layouts)); empty before any was recorded.
    pub fn layouts(&self) -> Result<crate::HeldLayouts, LogError> {
        let meta = self.rtx.open_table(META)?;
        match meta.get(META_LAYOUTS)? {
            Some(v) => legacy::decode_layouts(v.value(), self.format()?),
            None => Ok(Vec::new()),
        }
    }

    /// The format version the log's values are encoded in (a log with no commit yet has
    /// none, and is written in this build's).
    fn format(&self) -> Result<u32, LogError> {
        Ok(self.format_version()?.unwrap_or(FORMAT_VERSION))
    }

    /// An encoded `meta` entry, if present.
    fn meta_value<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, LogError> {
        let meta = self.rtx.open_table(META)?;
        match meta.get(key)? {
            Some(v) => Ok(Some(decode(v.value(), &format!("meta {key}"))?)),
            None => Ok(None),
        }
    }

    /// Every change of a finished source transaction, in key order. Changes of a transaction
    /// still streaming in (or left unfinished by a crash, until the writer's recovery removes
    /// them) are keyed after the last finished one and are not shown.
    ///
    /// Records the writer has not completed yet (see "Completion after acknowledgement" in
    /// the log's doc) are shown completed: from the current-row index as of
    /// `completed_through` and the records before them, exactly as the completion step will
    /// store them, so a reader's answer does not depend on how far completion has come.
    pub fn changes(
        &self,
    ) -> Result<impl Iterator<Item = Result<ChangeEntry, LogError>> + '_, LogError> {
        let meta = self.rtx.open_table(META)?;
        let last_commit = Lsn(get_u64(&meta, META_LAST_COMMIT)?.unwrap_or(0));
        let through = images::completed_through(&meta)?;
        let mut pending = if through < ChangeKey::new(last_commit, u32::MAX) {
            Some(images::PendingView::open(&self.rtx, through, last_commit)?)
        } else {
            None
        };
        let table = self.rtx.open_table(CHANGES)?;
        let iter = table.range::<(u64, u32)>(..=(last_commit.0, u32::MAX))?;
        let mut contexts = ContextCursor::new(&self.rtx)?;
        Ok(iter.map(move |e| {
            let (k, v) = e?;
            let (lsn, seq) = k.value();
            let key = ChangeKey::new(Lsn(lsn), seq);
            let mut rec: ChangeRecord = decode(v.value(), "changes")?;
            if key > through
                && let Some(pending) = &mut pending
            {
                pending.complete(key, &mut rec)?;
            }
            contexts.label((lsn, seq), &mut rec)?;
            Ok((key, rec))
        }))
    }

    /// The last change record the writer has completed (see [`changes`](Self::changes)).
    pub fn completed_through(&self) -> Result<ChangeKey, LogError> {
        images::completed_through(&self.rtx.open_table(META)?)
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

    /// The schema versions of one relation taking effect at or after `from`, in order, each
    /// with the commit time of the source transaction that brought it when the log still
    /// holds that transaction's record (compaction moves finished ones into segments); a
    /// version of a transaction not finished yet is left out.
    pub fn versions_of(
        &self,
        relation_id: u32,
        from: Lsn,
    ) -> Result<Vec<(RelationVersion, Option<i64>)>, LogError> {
        let last_commit = get_u64(&self.rtx.open_table(META)?, META_LAST_COMMIT)?.unwrap_or(0);
        let table = self.rtx.open_table(RELATIONS)?;
        let txns = self.rtx.open_table(TXNS)?;
        let mut out = Vec::new();
        for e in table.range((relation_id, from.0, 0u32)..=(relation_id, last_commit, u32::MAX))? {
            let (k, v) = e?;
            let (_, commit_lsn, _) = k.value();
            let at_us = match txns.get(commit_lsn)? {
                Some(txn) => {
                    Some(decode::<TxnRecord>(txn.value(), "transactions")?.committed_at_us)
                }
                None => None,
            };
            out.push((decode(v.value(), "relations")?, at_us));
        }
        Ok(out)
    }

    /// The names of the types that are not built in, by OID, as their Type messages gave them.
    pub fn types(&self) -> Result<crate::type_name::TypeNames, LogError> {
        let table = self.rtx.open_table(TYPES)?;
        let mut out = crate::type_name::TypeNames::new();
        for e in table.iter()? {
            let (k, v) = e?;
            out.insert(k.value(), decode(v.value(), "types")?);
        }
        Ok(out)
    }

    /// Every snapshot transaction in LSN order: its commit LSN, commit time and the tables it
    /// holds. An archive written before snapshots were recorded has none (and no re-snapshot
    /// either).
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, LogError> {
        let Some(table) = table_if_made(&self.rtx, SNAPSHOTS)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in table.iter()? {
            let (k, v) = e?;
            out.push(SnapshotRecord {
                lsn: Lsn(k.value()),
                committed_at_us: v.value(),
                tables: None,
            });
        }
        // Version 1 has no scope table: every snapshot holds every table.
        if let Some(scope) = table_if_made(&self.rtx, SNAPSHOT_SCOPE)? {
            let format = self.format()?;
            for snapshot in &mut out {
                let lsn = snapshot.lsn.0;
                let mut tables = Vec::new();
                for e in scope.range((lsn, 0u32)..=(lsn, u32::MAX))? {
                    tables.push(legacy::decode_scope(e?.1.value(), format)?);
                }
                if !tables.is_empty() {
                    snapshot.tables = Some(tables);
                }
            }
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

    /// The number of rows in the current-row index of a relation, as of `completed_through`
    /// (the index lags the log while records wait for completion).
    pub fn current_row_count(&self, relation_id: u32) -> Result<u64, LogError> {
        let table = self.rtx.open_table(CURRENT)?;
        Ok(table
            .range((relation_id, &[][..])..(relation_id + 1, &[][..]))?
            .count() as u64)
    }
}

impl LogReader {
    /// The segment manifest, consistent with [`changes`](LogReader::changes) of this reader.
    pub fn manifest(&self) -> Result<SegmentManifest, LogError> {
        let rtx = &self.rtx;
        let meta = rtx.open_table(META)?;
        let mut manifest = SegmentManifest {
            segments: Vec::new(),
            compacted_through: Lsn(meta_u64(&meta, META_COMPACTED_THROUGH)?),
            compacted_changes: meta_u64(&meta, META_COMPACTED_CHANGES)?,
            compacted_transactions: meta_u64(&meta, META_COMPACTED_TXNS)?,
        };
        let Some(segments) = table_if_made(rtx, SEGMENTS)? else {
            return Ok(manifest);
        };
        for e in segments.iter()? {
            let (_, v) = e?;
            manifest.segments.push(decode(v.value(), "segments")?);
        }
        Ok(manifest)
    }

    /// Every change of the archive, from the segments and the log of this one consistent
    /// read, in key order, with segment values rendered back to text (see
    /// [`read_records`](crate::segment::read_records)). Each segment is checked against its
    /// SHA-256 first. It holds everything in memory: for audits and tests of modest archives.
    pub fn all_changes(
        &self,
        archive_dir: &Path,
    ) -> Result<Vec<(ChangeKey, ChangeRecord)>, CompactError> {
        let mut out = Vec::new();
        for seg in self.manifest()?.segments {
            let path = archive_dir.join(SEGMENTS_DIR).join(&seg.file_name);
            for batch in SegmentReader::open(&path, Some(&seg.sha256), 8192)? {
                out.extend(crate::segment::read_records(&seg.content, &batch?)?);
            }
        }
        for entry in self.changes()? {
            out.push(entry?);
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Changes in the log (not yet compacted) and the oldest one's commit time.
    pub fn log_backlog(&self) -> Result<(u64, Option<i64>), LogError> {
        let table = &self.rtx.open_table(CHANGES)?;
        let count = table.len()?;
        let oldest = match table.first()? {
            Some((_, v)) => Some(decode::<ChangeRecord>(v.value(), "changes")?.committed_at_us),
            None => None,
        };
        Ok((count, oldest))
    }
}
