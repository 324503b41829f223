//! Row-image completion and the current-row index. The writer stores each incoming change
//! with the images PostgreSQL sent ([`received_change`]); completion, behind it, fills what
//! the old tuple left out from the log's latest version of the row, in commit order, and
//! keeps the index of those versions ([`Completer`], [`complete_step`]). Values PostgreSQL did
//! not send and the log cannot know stay marked unknown. See "Completion after
//! acknowledgement" in the parent module's doc for why this is safe at every point.

use std::collections::HashSet;

use super::*;

/// Remove every stored current row of a relation (a TRUNCATE, or a snapshot of the table).
fn remove_stored_rows(current: &mut RowKeyed<'_>, relation_id: u32) -> Result<(), LogError> {
    current.retain_in(
        (relation_id, &[][..])..(relation_id + 1, &[][..]),
        |_, _| false,
    )?;
    Ok(())
}

/// A completer's changes to the current-row index, over the stored `current_rows`:
/// `(relation_id, encoded key)` to the row, or `None` for a row that is gone, and the
/// relations whose stored rows are all gone (a TRUNCATE, or a snapshot of the table). A
/// completion step writes it out in its own commit, each key once and in key order (a hot
/// row is encoded and written once per step, not once per change); a reader's completer
/// drops it, having encoded nothing.
#[derive(Default)]
pub(super) struct IndexOverlay {
    /// By relation, then by encoded key.
    entries: HashMap<u32, HashMap<Vec<u8>, Option<Row>>>,
    /// Relations whose stored rows are gone: a key the overlay does not have has no row.
    forgotten: HashSet<u32>,
}

impl IndexOverlay {
    /// The overlay's state of a key: `None` when it has none (the stored index has the newer
    /// state), `Some(None)` when the row is gone.
    fn get(&self, relation_id: u32, key: &[u8]) -> Option<Option<&Row>> {
        match self
            .entries
            .get(&relation_id)
            .and_then(|rows| rows.get(key))
        {
            Some(row) => Some(row.as_ref()),
            None => self.forgotten.contains(&relation_id).then_some(None),
        }
    }

    fn put(&mut self, relation_id: u32, key: Vec<u8>, row: Option<Row>) {
        self.entries
            .entry(relation_id)
            .or_default()
            .insert(key, row);
    }

    /// Every row of a relation is gone.
    fn forget(&mut self, relation_id: u32) {
        self.entries.remove(&relation_id);
        self.forgotten.insert(relation_id);
    }

    /// Write it to `current_rows`: the forgotten relations' stored rows removed first, then
    /// every entry (all later than the forgetting) in key order, as neighbouring keys share
    /// pages.
    fn write_to(self, current: &mut RowKeyed<'_>) -> Result<(), LogError> {
        let mut forgotten: Vec<u32> = self.forgotten.into_iter().collect();
        forgotten.sort_unstable();
        for relation_id in forgotten {
            remove_stored_rows(current, relation_id)?;
        }
        let mut relations: Vec<_> = self.entries.into_iter().collect();
        relations.sort_unstable_by_key(|(relation_id, _)| *relation_id);
        let mut scratch = Vec::new();
        for (relation_id, rows) in relations {
            let mut rows: Vec<_> = rows.into_iter().collect();
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, row) in rows {
                match row {
                    Some(row) => {
                        encode_into(&mut scratch, &row);
                        current.insert((relation_id, key.as_slice()), scratch.as_slice())?
                    }
                    None => current.remove((relation_id, key.as_slice()))?,
                };
            }
        }
        Ok(())
    }
}

/// A table keyed by `(relation_id, encoded key)`: the current-row index and the undo tables.
pub(super) type RowKeyed<'w> = redb::Table<'w, (u32, &'static [u8]), &'static [u8]>;

/// The tables a batch of the writer writes.
pub(super) struct Tables<'w> {
    pub(super) changes: redb::Table<'w, (u64, u32), &'static [u8]>,
    pub(super) txns: redb::Table<'w, u64, &'static [u8]>,
    pub(super) relations: redb::Table<'w, (u32, u64, u32), &'static [u8]>,
    pub(super) types: redb::Table<'w, u32, &'static [u8]>,
    pub(super) snapshots: redb::Table<'w, u64, i64>,
    pub(super) snapshot_scope: redb::Table<'w, (u64, u32), &'static [u8]>,
    pub(super) contexts: redb::Table<'w, (u64, u32), &'static [u8]>,
    pub(super) scratch: Vec<u8>,
}

/// Build the stored record of one incoming change from what PostgreSQL sent alone: the writer
/// reads no earlier version of the row (see "Completion after acknowledgement" in the parent
/// module's doc). An update's or delete's before image under REPLICA IDENTITY DEFAULT is then
/// its key columns with every other value unknown, and an unsent (`u`) value of the after
/// image is unknown unless the before image knows it; [`Completer::complete`] fills them from
/// the row's latest version later, exactly as if the version had been looked up here.
pub(super) fn received_change(
    rel: &RelationVersion,
    tx: &InFlight,
    change: IncomingChange,
) -> ChangeRecord {
    let key_pos = rel.key_positions();
    let width = rel.columns.len();
    let key_of = |row: &Row| (!key_pos.is_empty()).then(|| row_key(row, &key_pos));
    let mut before: Option<Row> = None;
    let mut after: Option<Row> = None;
    let mut key = None;
    match change.op {
        Op::Insert | Op::Snapshot => {
            // Inserts and snapshot rows never carry `u`.
            let row = fill_row(change.new.unwrap_or_default(), None, width);
            key = key_of(&row);
            after = Some(row);
        }
        Op::Update => {
            let new = change.new.unwrap_or_default();
            let b = match change.old {
                Some(OldImage::Full(cells)) => fill_row(cells, None, width),
                Some(OldImage::Key(cells)) => key_only_row(&cells, &key_pos, width),
                None => key_only_row(&new, &key_pos, width),
            };
            let a = fill_row(new, Some(&b), width);
            key = key_of(&a);
            before = Some(b);
            after = Some(a);
        }
        Op::Delete => {
            let b = match change.old {
                Some(OldImage::Full(cells)) => fill_row(cells, None, width),
                Some(OldImage::Key(cells)) => key_only_row(&cells, &key_pos, width),
                None => vec![Cell::Unknown; width],
            };
            key = key_of(&b);
            before = Some(b);
        }
        Op::Truncate | Op::Message => {}
    }
    ChangeRecord {
        xid: tx.xid,
        committed_at_us: tx.committed_at_us,
        relation_id: rel.relation_id,
        schema_version: rel.valid_from,
        op: change.op,
        key,
        before,
        after,
        // Kept once per run in `contexts` (see `LogOp::Context`), not in every record.
        context: None,
        message: None,
    }
}

/// Completes stored records in commit order and keeps the current-row index as it goes: the
/// one procedure behind the writer's completion steps ([`complete_step`]) and a reader's view
/// of the records not completed yet ([`LogReader::changes`]), so that what a reader shows
/// before a step is what the step stores. It starts from `current_rows` as of
/// `meta.completed_through` and holds its own changes to the index in an [`IndexOverlay`].
pub(super) struct Completer {
    overlay: IndexOverlay,
    /// The key columns of each schema version met, or `None` where no index is kept.
    shapes: HashMap<(u32, ChangeKey), Option<std::sync::Arc<[usize]>>>,
    /// The snapshots still to come, whose relations' rows the index forgets at their
    /// transaction's start (see [`snapshot_forgets`]).
    forgets: std::iter::Peekable<std::vec::IntoIter<(u64, u32)>>,
}

impl Completer {
    /// A completer of the records after `from` through the transaction committed at
    /// `through`, over the index as of `from`.
    fn new(
        snapshot_scope: &impl ReadableTable<(u64, u32), &'static [u8]>,
        from: ChangeKey,
        through: Lsn,
    ) -> Result<Completer, LogError> {
        Ok(Completer {
            overlay: IndexOverlay::default(),
            shapes: HashMap::new(),
            forgets: snapshot_forgets(snapshot_scope, from.commit_lsn, through)?
                .into_iter()
                .peekable(),
        })
    }

    /// The index's changes so far, every snapshot still to come through the last
    /// transaction forgotten too when `to_the_end` (no record follows them).
    fn into_overlay(mut self, to_the_end: bool) -> IndexOverlay {
        if to_the_end {
            for (_, relation_id) in self.forgets {
                self.overlay.forget(relation_id);
            }
        }
        self.overlay
    }

    /// Complete `record`, stored under `key`, from the index as of just before it (the stored
    /// index `current` under this completer's overlay), then apply its own index changes.
    /// Returns whether the record changed (a stored one must be written again).
    ///
    /// Only where the index is kept (REPLICA IDENTITY DEFAULT or USING INDEX, with a key) and
    /// the row's latest version is known: an update's before image becomes that version (as
    /// PostgreSQL sent only its key, or nothing when the key did not change), and each unknown
    /// value of its after image (an unchanged TOAST value) takes the before image's; a delete's
    /// before image becomes that version, unless no key value was sent (an old image entirely
    /// unknown names no row). A record completed already completes to itself: the index as of
    /// just before it holds the version it was completed from.
    pub(super) fn complete(
        &mut self,
        current: &impl ReadableTable<(u32, &'static [u8]), &'static [u8]>,
        relations: &impl ReadableTable<(u32, u64, u32), &'static [u8]>,
        key: ChangeKey,
        record: &mut ChangeRecord,
    ) -> Result<bool, LogError> {
        while let Some((_, relation_id)) = self.forgets.next_if(|(at, _)| *at <= key.commit_lsn.0) {
            self.overlay.forget(relation_id);
        }
        if record.op == Op::Message {
            return Ok(false);
        }
        let Some(key_pos) = self.key_positions(relations, key, record)? else {
            return Ok(false);
        };
        let mut changed = false;
        let lookup = match (record.op, &record.before) {
            (Op::Update, Some(before)) => Some(row_key(before, &key_pos)),
            (Op::Delete, Some(before))
                if key_pos
                    .iter()
                    .any(|&i| !matches!(before.get(i), Some(Cell::Unknown) | None)) =>
            {
                Some(row_key(before, &key_pos))
            }
            _ => None,
        };
        if let Some(lookup) = lookup
            && let Some(latest) = self.latest(current, record.relation_id, &lookup)?
        {
            if record.before.as_ref() != Some(&latest) {
                record.before = Some(latest);
                changed = true;
            }
            if let (Some(before), Some(after)) = (&record.before, &mut record.after) {
                for (cell, known) in after.iter_mut().zip(before) {
                    if matches!(cell, Cell::Unknown) && matches!(known, Cell::Null | Cell::Text(_))
                    {
                        *cell = known.clone();
                        changed = true;
                    }
                }
            }
            let completed_key = match record.op {
                Op::Update => record.after.as_ref().map(|a| row_key(a, &key_pos)),
                _ => record.before.as_ref().map(|b| row_key(b, &key_pos)),
            };
            if record.key != completed_key {
                record.key = completed_key;
                changed = true;
            }
        }
        let relation_id = record.relation_id;
        for write in index_writes(record, &key_pos).into_iter().flatten() {
            match write {
                IndexWrite::Row(key, row) => {
                    self.overlay
                        .put(relation_id, encode_plain(&key), row.cloned());
                }
                IndexWrite::Forget => self.overlay.forget(relation_id),
            }
        }
        Ok(changed)
    }

    /// The row's latest version as of the last record completed: this completer's own, or
    /// the stored index's.
    fn latest(
        &self,
        current: &impl ReadableTable<(u32, &'static [u8]), &'static [u8]>,
        relation_id: u32,
        key: &[Option<String>],
    ) -> Result<Option<Row>, LogError> {
        let k = encode_plain(&key);
        if let Some(row) = self.overlay.get(relation_id, &k) {
            return Ok(row.cloned());
        }
        match current.get((relation_id, k.as_slice()))? {
            Some(v) => Ok(Some(decode(v.value(), "current_rows")?)),
            None => Ok(None),
        }
    }

    /// The key columns of the record's schema version, or `None` where the index is not kept
    /// (REPLICA IDENTITY FULL, whose old tuple is the whole row, or no key).
    fn key_positions(
        &mut self,
        relations: &impl ReadableTable<(u32, u64, u32), &'static [u8]>,
        key: ChangeKey,
        record: &ChangeRecord,
    ) -> Result<Option<std::sync::Arc<[usize]>>, LogError> {
        let shape = match self
            .shapes
            .entry((record.relation_id, record.schema_version))
        {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let version = record.schema_version;
                let stored = relations
                    .get((record.relation_id, version.commit_lsn.0, version.seq))?
                    .ok_or_else(|| LogError::Corrupt {
                        what: "relations".into(),
                        source: format!(
                            "change {key} names schema version {version} of relation {}, \
                             which the log does not hold",
                            record.relation_id
                        )
                        .into(),
                    })?;
                let rel: RelationVersion = decode(stored.value(), "relations")?;
                let key_pos = rel.key_positions();
                e.insert(indexed(rel.replica_identity, &key_pos).then(|| key_pos.into()))
            }
        };
        Ok(shape.clone())
    }
}

/// The snapshot transactions whose tables' rows the index forgets, in commit order: a
/// snapshot (of pgtrail's, or of a table created and published in the transaction) forgets
/// its relation's rows before its own, at the start of its transaction, which holds no earlier
/// change of that relation. Those committed after `after` through `through`.
pub(super) fn snapshot_forgets(
    snapshot_scope: &impl ReadableTable<(u64, u32), &'static [u8]>,
    after: Lsn,
    through: Lsn,
) -> Result<Vec<(u64, u32)>, LogError> {
    if through <= after {
        return Ok(Default::default());
    }
    Ok(snapshot_scope
        .range((after.0 + 1, 0u32)..=(through.0, u32::MAX))?
        .map(|e| e.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()?)
}

/// Records completed per [`complete_step`] at most: how long one step holds the log's write
/// lock (the writer's acknowledgements wait for it), and the memory its overlay and
/// rewritten records take.
pub(super) const STEP_RECORDS: usize = 50_000;

/// One step of completion in `wtx`: complete the stored records after
/// `meta.completed_through`, in key order, up to `budget` of them (at least one; the writer's
/// [`STEP_RECORDS`]) and no further than
/// the last finished transaction; write back those that changed and the index's changes
/// (each key once, in key order); and move `completed_through` to the last record completed,
/// or to the end of the last finished transaction when every one is. All in `wtx`, so a crash
/// keeps the step whole or not at all, and the next step redoes it from the records.
/// Returns whether it reached the last finished transaction.
pub(crate) fn complete_step(wtx: &redb::WriteTransaction, budget: usize) -> Result<bool, LogError> {
    let budget = budget.max(1);
    let mut meta = wtx.open_table(META)?;
    let last_commit = Lsn(get_u64(&meta, META_LAST_COMMIT)?.unwrap_or(0));
    let from = completed_through(&meta)?;
    let end = ChangeKey::new(last_commit, u32::MAX);
    if from >= end {
        return Ok(true);
    }
    let mut changes = wtx.open_table(CHANGES)?;
    let mut current = wtx.open_table(CURRENT)?;
    let relations = wtx.open_table(RELATIONS)?;
    let mut completer = Completer::new(&wtx.open_table(SNAPSHOT_SCOPE)?, from, last_commit)?;
    let batch: Vec<(ChangeKey, ChangeRecord)> = changes
        .range(after_through(from, last_commit))?
        .take(budget)
        .map(|e| {
            let (k, v) = e?;
            let (lsn, seq) = k.value();
            Ok((ChangeKey::new(Lsn(lsn), seq), decode(v.value(), "changes")?))
        })
        .collect::<Result<_, LogError>>()?;
    let caught_up = batch.len() < budget;
    let last = batch.last().map(|(k, _)| *k);
    let mut rewrites = Vec::new();
    for (key, mut record) in batch {
        if completer.complete(&current, &relations, key, &mut record)? {
            rewrites.push((key, record));
        }
    }
    let through = if caught_up { end } else { last.unwrap_or(from) };
    let mut scratch = Vec::new();
    for (key, record) in &rewrites {
        encode_into(&mut scratch, record);
        changes.insert((key.commit_lsn.0, key.seq), scratch.as_slice())?;
    }
    // Caught up, the snapshots after the last record (of empty tables) forget their rows too.
    completer.into_overlay(caught_up).write_to(&mut current)?;
    set_completed_through(&mut meta, through)?;
    Ok(caught_up)
}

/// A reader's view of the records not completed yet (after `meta.completed_through`):
/// each completed in memory as a completion step would store it, nothing written.
pub(super) struct PendingView {
    completer: Completer,
    current: redb::ReadOnlyTable<(u32, &'static [u8]), &'static [u8]>,
    relations: redb::ReadOnlyTable<(u32, u64, u32), &'static [u8]>,
}

impl PendingView {
    /// The view of `rtx`'s records after `through` up to its last commit, `last_commit`.
    pub(super) fn open(
        rtx: &redb::ReadTransaction,
        through: ChangeKey,
        last_commit: Lsn,
    ) -> Result<PendingView, LogError> {
        Ok(PendingView {
            completer: Completer::new(&rtx.open_table(SNAPSHOT_SCOPE)?, through, last_commit)?,
            current: rtx.open_table(CURRENT)?,
            relations: rtx.open_table(RELATIONS)?,
        })
    }

    /// Complete `record`, the next record after the last one given (key order).
    pub(super) fn complete(
        &mut self,
        key: ChangeKey,
        record: &mut ChangeRecord,
    ) -> Result<(), LogError> {
        self.completer
            .complete(&self.current, &self.relations, key, record)?;
        Ok(())
    }
}

/// A range of `changes` keys.
type KeyRange = (std::ops::Bound<(u64, u32)>, std::ops::Bound<(u64, u32)>);

/// The keys after `from` through the end of the transaction committed at `last_commit`.
pub(super) fn after_through(from: ChangeKey, last_commit: Lsn) -> KeyRange {
    use std::ops::Bound;
    (
        Bound::Excluded((from.commit_lsn.0, from.seq)),
        Bound::Included((last_commit.0, u32::MAX)),
    )
}

/// `meta.completed_through`: every record at or before it is complete, and `current_rows`
/// is the index as of it. A log without it is of version 7 or earlier, not yet opened by a
/// writer of version 8 (whose recovery writes it first), and every record of those versions
/// is complete: through its last commit.
pub(crate) fn completed_through(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<ChangeKey, LogError> {
    match meta.get(META_COMPLETED_THROUGH)? {
        None => Ok(ChangeKey::new(
            Lsn(get_u64(meta, META_LAST_COMMIT)?.unwrap_or(0)),
            u32::MAX,
        )),
        Some(v) => {
            let bytes: [u8; 12] = v.value().try_into().map_err(|_| LogError::Corrupt {
                what: format!("meta {META_COMPLETED_THROUGH}"),
                source: "not 12 bytes".into(),
            })?;
            let (lsn, seq) = bytes.split_at(8);
            Ok(ChangeKey::new(
                Lsn(u64::from_le_bytes(lsn.try_into().unwrap_or_default())),
                u32::from_le_bytes(seq.try_into().unwrap_or_default()),
            ))
        }
    }
}

pub(super) fn set_completed_through(
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    through: ChangeKey,
) -> Result<(), LogError> {
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&through.commit_lsn.0.to_le_bytes());
    bytes[8..].copy_from_slice(&through.seq.to_le_bytes());
    meta.insert(META_COMPLETED_THROUGH, bytes.as_slice())?;
    Ok(())
}

/// Whether the log keeps the current-row index for a relation of this replica identity and
/// key: where old images are partial (REPLICA IDENTITY DEFAULT or USING INDEX), not under FULL,
/// whose old tuple carries the whole row, nor without a key to find a row by.
fn indexed(replica_identity: u8, key_pos: &[usize]) -> bool {
    replica_identity != b'f' && !key_pos.is_empty()
}

/// One write to the current-row index.
pub(super) enum IndexWrite<'r> {
    /// The row under this key is now this one, or (`None`) gone.
    Row(std::borrow::Cow<'r, [Option<String>]>, Option<&'r Row>),
    /// Every row of the relation is gone.
    Forget,
}

/// What a stored change does to the current-row index of its relation (`key_pos`: its schema
/// version's key columns), in order, applied by [`Completer::complete`] after completing the
/// record. An insert or snapshot row
/// sets its row; an update removes the row under its before image's key when its key changed,
/// then sets its after image; a delete removes the row under its before image's key, unless no
/// key value is known (an old image entirely unknown names no row); a truncate forgets the
/// relation's rows.
pub(super) fn index_writes<'r>(
    record: &'r ChangeRecord,
    key_pos: &[usize],
) -> [Option<IndexWrite<'r>>; 2] {
    use std::borrow::Cow;
    let key = record.key.as_deref().map(Cow::Borrowed);
    match (record.op, &record.before, &record.after, key) {
        (Op::Insert | Op::Snapshot, _, Some(after), Some(key)) => {
            [Some(IndexWrite::Row(key, Some(after))), None]
        }
        (Op::Update, Some(before), Some(after), Some(key)) => {
            let old = row_key(before, key_pos);
            let moved = (old.as_slice() != &*key).then_some(IndexWrite::Row(Cow::Owned(old), None));
            [moved, Some(IndexWrite::Row(key, Some(after)))]
        }
        (Op::Delete, Some(_), _, Some(key)) if key.iter().any(Option::is_some) => {
            [Some(IndexWrite::Row(key, None)), None]
        }
        (Op::Truncate, ..) => [Some(IndexWrite::Forget), None],
        _ => [None, None],
    }
}

/// The key column values of a complete row (text form; NULL or unknown as `None`).
pub(super) fn row_key(row: &Row, key_pos: &[usize]) -> Vec<Option<String>> {
    key_pos
        .iter()
        .map(|&i| row.get(i).and_then(|c| c.as_text().map(str::to_string)))
        .collect()
}

/// A row from incoming cells (moved, not copied), taking each unsent (`u`) value from
/// `fallback` where it is known and marking it unknown otherwise (never NULL).
pub(super) fn fill_row(cells: Vec<IncomingCell>, fallback: Option<&Row>, width: usize) -> Row {
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
pub(super) fn key_only_row(cells: &[IncomingCell], key_pos: &[usize], width: usize) -> Row {
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

/// An undo table's value (version 7 and earlier wrote them): `0` when the key had no current
/// row, `1` and the stored `current_rows` value otherwise.
pub(super) fn parse_undo_value(value: &[u8]) -> Result<Option<&[u8]>, LogError> {
    match value.split_first() {
        Some((1, row)) => Ok(Some(row)),
        Some((0, [])) => Ok(None),
        _ => Err(LogError::Corrupt {
            what: "current_undo".into(),
            source: "an undo value is neither absent (0) nor a row (1)".into(),
        }),
    }
}
