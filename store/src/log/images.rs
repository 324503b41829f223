//! Row-image completion and the current-row index: the stored record of an incoming change
//! gets complete `before`/`after` images from the old tuple and the log's latest version of
//! the row, values PostgreSQL did not send and the log cannot know are marked unknown, and the
//! index is kept current: in memory first ([`IndexOverlay`]) for transactions that finish in
//! the batch that began them, written through with undo rows for those that span batches, and
//! rebuilt from the log's own records by recovery (see "Commit protocol" and "The current-row
//! index" in the parent module's doc).

use std::time::{Duration, Instant};

use super::*;

/// The overlay is written to `current_rows` at the end of a batch once it holds this many
/// bytes (keys, rows and a map entry's overhead): its memory, and the work a recovery redoes.
const OVERLAY_MAX_BYTES: usize = 16 << 20;

/// ... or once its oldest entry is this old: how far the index's stored state lags the log
/// under steady load, which is also how far compaction's cut lags the last commit (the log
/// keeps what recovery would replay).
const OVERLAY_MAX_AGE: Duration = Duration::from_secs(5);

/// A map entry's memory beyond its key and row bytes, counted toward [`OVERLAY_MAX_BYTES`].
const OVERLAY_ENTRY_OVERHEAD: usize = 96;

/// What one overlay entry counts toward [`OVERLAY_MAX_BYTES`].
fn entry_size(key: &[u8], row: Option<&[u8]>) -> usize {
    key.len() + row.map_or(0, <[u8]>::len) + OVERLAY_ENTRY_OVERHEAD
}

/// Remove every stored current row of a relation (a TRUNCATE, or a snapshot of the table).
fn remove_stored_rows(current: &mut RowKeyed<'_>, relation_id: u32) -> Result<(), LogError> {
    current.retain_in(
        (relation_id, &[][..])..(relation_id + 1, &[][..]),
        |_, _| false,
    )?;
    Ok(())
}

/// The current-row index's changes not yet written to `current_rows`: `(relation_id, encoded
/// key)` to the encoded row, or `None` for a row that is gone. Only transactions that finished
/// in the batch that began them (`InFlight::atomic`) write here, so it never holds anything
/// of an unfinished transaction, and losing it (a crash, a failed batch) loses nothing: it is
/// the effect of committed log records after `meta.index_through`, which recovery replays.
/// Under pgbench's load the index's writes were a fifth of the capture's CPU and most of the
/// pages each durable commit rewrote (README, Performance): here a hot row is rewritten once
/// per flush instead of once per commit, and the pages of a flush are written once.
#[derive(Default)]
pub(super) struct IndexOverlay {
    /// By relation, then by encoded key.
    entries: HashMap<u32, HashMap<Vec<u8>, Option<Vec<u8>>>>,
    bytes: usize,
    /// When the oldest entry was written.
    since: Option<Instant>,
}

impl IndexOverlay {
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the end of this batch should write the overlay out.
    pub(super) fn is_due(&self) -> bool {
        self.bytes >= OVERLAY_MAX_BYTES
            || self.since.is_some_and(|t| t.elapsed() >= OVERLAY_MAX_AGE)
    }

    pub(super) fn clear(&mut self) {
        *self = IndexOverlay::default();
    }

    /// The overlay's state of a key: `None` when it has none (the stored index has the newer
    /// state), `Some(None)` when the row is gone.
    fn get(&self, relation_id: u32, key: &[u8]) -> Option<Option<&[u8]>> {
        self.entries
            .get(&relation_id)?
            .get(key)
            .map(Option::as_deref)
    }

    fn put(&mut self, relation_id: u32, key: Vec<u8>, row: Option<Vec<u8>>) {
        self.bytes += entry_size(&key, row.as_deref());
        let rows = self.entries.entry(relation_id).or_default();
        if let Some((key, old)) = rows.remove_entry(key.as_slice()) {
            self.bytes -= entry_size(&key, old.as_deref());
        }
        rows.insert(key, row);
        self.since.get_or_insert_with(Instant::now);
    }

    /// Forget a relation's entries (its rows are all gone).
    fn forget(&mut self, relation_id: u32) {
        if let Some(rows) = self.entries.remove(&relation_id) {
            for (key, row) in rows {
                self.bytes -= entry_size(&key, row.as_deref());
            }
        }
        if self.entries.is_empty() {
            self.clear();
        }
    }

    /// Write every entry to `current_rows`, in key order (neighbouring keys share pages), and
    /// empty the overlay.
    pub(super) fn write_to(&mut self, current: &mut RowKeyed<'_>) -> Result<(), LogError> {
        let mut relations: Vec<_> = std::mem::take(&mut self.entries).into_iter().collect();
        relations.sort_unstable_by_key(|(relation_id, _)| *relation_id);
        for (relation_id, rows) in relations {
            let mut rows: Vec<_> = rows.into_iter().collect();
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, row) in rows {
                match row {
                    Some(row) => current.insert((relation_id, key.as_slice()), row.as_slice())?,
                    None => current.remove((relation_id, key.as_slice()))?,
                };
            }
        }
        self.clear();
        Ok(())
    }
}

/// A table keyed by `(relation_id, encoded key)`: the current-row index and the undo tables.
pub(super) type RowKeyed<'w> = redb::Table<'w, (u32, &'static [u8]), &'static [u8]>;

pub(super) struct Tables<'w> {
    pub(super) changes: redb::Table<'w, (u64, u32), &'static [u8]>,
    pub(super) txns: redb::Table<'w, u64, &'static [u8]>,
    pub(super) relations: redb::Table<'w, (u32, u64, u32), &'static [u8]>,
    pub(super) types: redb::Table<'w, u32, &'static [u8]>,
    pub(super) current: RowKeyed<'w>,
    pub(super) undo: [RowKeyed<'w>; 2],
    pub(super) snapshots: redb::Table<'w, u64, i64>,
    pub(super) snapshot_scope: redb::Table<'w, (u64, u32), &'static [u8]>,
    pub(super) contexts: redb::Table<'w, (u64, u32), &'static [u8]>,
    pub(super) scratch: Vec<u8>,
    pub(super) overlay: IndexOverlay,
}

/// Build the stored record of one incoming change: complete the before and after images from
/// the old tuple and the current-row index, and keep the index current.
pub(super) fn complete_change(
    t: &mut Tables<'_>,
    rel: &RelationVersion,
    tx: &InFlight,
    change: IncomingChange,
) -> Result<ChangeRecord, LogError> {
    let key_pos = rel.key_positions();
    let indexed = indexed(rel.replica_identity, &key_pos);
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
            before = Some(b);
        }
        Op::Truncate | Op::Message => {}
    }
    let record = ChangeRecord {
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
    };
    if indexed {
        for write in index_writes(&record, &key_pos).into_iter().flatten() {
            match write {
                IndexWrite::Row(key, row) => set_current(t, rel.relation_id, tx, &key, row)?,
                IndexWrite::Forget => forget_current_rows(t, rel.relation_id, tx)?,
            }
        }
    }
    Ok(record)
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
/// version's key columns), in order: the one rule the live path ([`complete_change`]) and
/// recovery's redo from the stored records ([`replay_index`]) both follow, so that what
/// recovery rebuilds is what the live path would have written. An insert or snapshot row
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

/// Remove every current row of a relation from the index (a TRUNCATE, or a snapshot of the
/// table), saving undo rows when the transaction spans batches.
pub(super) fn forget_current_rows(
    t: &mut Tables<'_>,
    relation_id: u32,
    tx: &InFlight,
) -> Result<(), LogError> {
    if tx.atomic {
        // Nothing of the transaction outlives a failed batch, so no undo rows. The stored rows
        // go now, ahead of `index_through`: after a crash, recovery's replay from
        // `index_through` reaches this transaction's forgetting again, and every row it sets
        // for the relation after it (see `replay_index`).
        t.overlay.forget(relation_id);
        return remove_stored_rows(&mut t.current, relation_id);
    }
    let keys = t
        .current
        .range((relation_id, &[][..])..(relation_id + 1, &[][..]))?
        .map(|e| e.map(|(k, _)| k.value().1.to_vec()))
        .collect::<Result<Vec<Vec<u8>>, _>>()?;
    for k in keys {
        let old = t.current.remove((relation_id, k.as_slice()))?;
        if !tx.atomic {
            let undo = undo_value(old.as_ref().map(|v| v.value()));
            drop(old);
            save_undo(t, tx.undo_slot, relation_id, &k, &undo)?;
        }
    }
    Ok(())
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

pub(super) fn get_current(
    t: &Tables<'_>,
    relation_id: u32,
    key: &[Option<String>],
) -> Result<Option<Row>, LogError> {
    let k = encode_plain(&key);
    // The overlay holds the newer state where it has the key (never during a spanning
    // transaction, whose Begin wrote it out).
    if let Some(row) = t.overlay.get(relation_id, &k) {
        return row.map(|bytes| decode(bytes, "current_rows")).transpose();
    }
    match t.current.get((relation_id, k.as_slice()))? {
        Some(v) => Ok(Some(decode(v.value(), "current_rows")?)),
        None => Ok(None),
    }
}

pub(super) fn set_current(
    t: &mut Tables<'_>,
    relation_id: u32,
    tx: &InFlight,
    key: &[Option<String>],
    row: Option<&Row>,
) -> Result<(), LogError> {
    let k = encode_plain(&key);
    if tx.atomic {
        // A transaction that finishes in this batch: its index changes wait in the overlay
        // (the batch's commit stores the transaction's records, from which recovery can redo
        // them), and need no undo rows.
        // Encoded into the reused buffer, then copied in one allocation of the right size
        // (see `encode_into`).
        let row = row.map(|row| {
            encode_into(&mut t.scratch, row);
            t.scratch.clone()
        });
        t.overlay.put(relation_id, k, row);
        return Ok(());
    }
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
pub(super) fn save_undo(
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
pub(super) fn undo_value(old: Option<&[u8]>) -> Vec<u8> {
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

/// Redo, into `current_rows`, the index changes of the committed transactions after `from`
/// through `through` (commit LSNs), from their stored records; the number of records redone.
/// Recovery runs it from `meta.index_through`, the commit through which `current_rows` held
/// the index when the overlay was last written out, to the last commit: what the overlay held
/// when a crash (or a failed batch) took it. Every step writes a row's state outright (or
/// forgets a relation's rows), in commit order, so it is right whatever part of those
/// transactions the stored index already holds (a forgetting is written ahead of the overlay,
/// see [`forget_current_rows`]), and running it again after a crash during recovery repeats
/// the same result.
pub(super) fn replay_index(
    current: &mut RowKeyed<'_>,
    changes: &impl ReadableTable<(u64, u32), &'static [u8]>,
    relations: &impl ReadableTable<(u32, u64, u32), &'static [u8]>,
    snapshot_scope: &impl ReadableTable<(u64, u32), &'static [u8]>,
    from: Lsn,
    through: Lsn,
) -> Result<u64, LogError> {
    if through <= from {
        return Ok(0);
    }
    let range = (from.0 + 1, 0u32)..=(through.0, u32::MAX);
    // A snapshot (of pgtrail's, or of a table created and published in the transaction)
    // forgets its relation's rows before its own: at the start of its transaction, which
    // holds no earlier change of that relation (the relation is empty at the mark).
    let mut forgets = snapshot_scope
        .range(range.clone())?
        .map(|e| e.map(|(k, _)| k.value()))
        .collect::<Result<Vec<(u64, u32)>, _>>()?
        .into_iter()
        .peekable();
    let mut shapes: HashMap<(u32, ChangeKey), Option<Vec<usize>>> = HashMap::new();
    let mut redone = 0u64;
    for entry in changes.range(range)? {
        let (k, v) = entry?;
        let (lsn, _) = k.value();
        while let Some((_, relation_id)) = forgets.next_if(|(at, _)| *at <= lsn) {
            remove_stored_rows(current, relation_id)?;
        }
        let record: ChangeRecord = decode(v.value(), "changes")?;
        if record.op == Op::Message {
            continue;
        }
        // The key columns of the record's schema version, or `None` where the live path
        // keeps no index (REPLICA IDENTITY FULL, or no key).
        let key_pos = match shapes.entry((record.relation_id, record.schema_version)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let version = record.schema_version;
                let stored = relations
                    .get((record.relation_id, version.commit_lsn.0, version.seq))?
                    .ok_or_else(|| LogError::Corrupt {
                        what: "relations".into(),
                        source: format!(
                            "change {} names schema version {version} of relation {}, which \
                             the log does not hold",
                            ChangeKey::new(Lsn(lsn), k.value().1),
                            record.relation_id
                        )
                        .into(),
                    })?;
                let rel: RelationVersion = decode(stored.value(), "relations")?;
                let key_pos = rel.key_positions();
                e.insert(indexed(rel.replica_identity, &key_pos).then_some(key_pos))
            }
        };
        let Some(key_pos) = key_pos.as_deref() else {
            continue;
        };
        let relation_id = record.relation_id;
        for write in index_writes(&record, key_pos).into_iter().flatten() {
            match write {
                IndexWrite::Row(key, row) => {
                    let key = encode_plain(&key);
                    match row {
                        Some(row) => {
                            current.insert((relation_id, key.as_slice()), encode(row).as_slice())?
                        }
                        None => current.remove((relation_id, key.as_slice()))?,
                    };
                }
                IndexWrite::Forget => remove_stored_rows(current, relation_id)?,
            }
        }
        redone += 1;
    }
    for (_, relation_id) in forgets {
        remove_stored_rows(current, relation_id)?;
    }
    Ok(redone)
}
