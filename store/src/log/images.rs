//! Row-image completion and the current-row index: the stored record of an incoming change
//! gets complete `before`/`after` images from the old tuple and the log's latest version of
//! the row, values PostgreSQL did not send and the log cannot know are marked unknown, and the
//! index is kept current, with the undo rows that let recovery put it back (see "Commit
//! protocol" in the parent module's doc).

use super::*;

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
                forget_current_rows(t, rel.relation_id, tx)?;
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
        // Kept once per run in `contexts` (see `LogOp::Context`), not in every record.
        context: None,
        message: None,
    })
}

/// Remove every current row of a relation from the index (a TRUNCATE, or a snapshot of the
/// table), saving undo rows when the transaction spans batches.
pub(super) fn forget_current_rows(
    t: &mut Tables<'_>,
    relation_id: u32,
    tx: &InFlight,
) -> Result<(), LogError> {
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
