//! Columnar point-in-time reconstruction: `as_of` and `diff` of a keyed table without turning
//! every archived change back into text rows.
//!
//! The row-wise replay of [`crate::pit`] renders every value of every change as PostgreSQL
//! text and parses the survivors back; on millions of changes that costs seconds where a
//! columnar engine takes a tenth. Here a first pass reads only the change keys, operations
//! and the primary-key columns of the images, and finds which change last wrote each row at
//! the moment; a second pass reads the row images of those changes alone and takes them as
//! they are stored. The result is the same table the row replay builds (same columns, types
//! and rows; rows in key order).
//!
//! It covers the common case and says so by returning `None` otherwise, and the caller then
//! takes the row replay: a table with a primary key whose changes up to the moment are all in
//! one schema version, with no value kept as exact text (a value its Arrow type cannot hold).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, StringBuilder, StructArray,
    UInt32Array, make_comparator, new_empty_array, new_null_array,
};
use datafusion::arrow::compute::{
    SortColumn, SortOptions, concat, lexsort_to_indices, take, take_record_batch,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Fields, Int8Type, Schema, TimestampMicrosecondType, UInt32Type, UInt64Type,
};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::HashMap;
use datafusion::error::{DataFusionError, Result};
use pgtrail_store::keyframe::keyframe_path;
use pgtrail_store::segment::{
    PgKind, SegmentContent, records_to_batch, render, row_struct_fields, segment_schema,
};
use pgtrail_store::{ChangeKey, ChangeRecord, KeyframeEntry, Lsn, RelationVersion, SegmentEntry};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::read::{Bounds, READ_AHEAD_BATCHES, open_segment_selected};
use crate::replay::{ApplyChange, ChangeKind, Moment, Replay, RowSet, SnapshotPoint};

/// Where the rows are read from: a keyframe first when the plan starts at one (the table's
/// rows at its LSN, in no order), then the changes after it in key order: segments, then the
/// log tail as one batch.
enum Source<'a> {
    Keyframe(&'a KeyframeEntry),
    Segment(&'a SegmentEntry),
    Tail(RecordBatch),
}

/// Which keyframes a plan may start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keyframes {
    /// The latest keyframe the moment includes.
    Any,
    /// The latest keyframe this moment includes (a `diff`'s earlier moment: both of its
    /// replays start there).
    Within(Moment),
    /// The latest the moment includes with a point before this LSN (to check the keyframe at
    /// this LSN against the ones before it).
    Before(Lsn),
}

/// A change's place: its source, and its row number in that source's read.
type Loc = u64;
fn loc(source: usize, row: usize) -> Loc {
    ((source as u64) << 40) | row as u64
}
fn loc_parts(l: Loc) -> (usize, usize) {
    ((l >> 40) as usize, (l & ((1 << 40) - 1)) as usize)
}

/// The rows of one table at one moment, as the place of the change that last wrote each row.
struct MomentRows {
    replay: Replay,
    rows: RowMap,
}

/// A row's key as the replay looks it up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyRef<'a> {
    /// A key of one integer column (most tables), null only in a damaged archive.
    Int(Option<i64>),
    /// Any other key, in Arrow's row format (byte-comparable, one per key).
    Bytes(&'a [u8]),
}

/// A place no change has: the slot of an absent row in a [`DenseMap`].
const ABSENT: Loc = Loc::MAX;

/// Slots a [`DenseMap`] may always grow to (8 MiB of places), whatever the rows it holds.
const DENSE_FREE_SLOTS: usize = 1 << 20;

/// Rows keyed by one integer column whose keys are small and non-negative (a serial or
/// identity key, most tables): the place of each row's last change at index `key`.
///
/// The replay sets one entry per change; as a hash map that was two-fifths of an as_of's
/// samples at 10M changes (hashing, probing and the cache misses of a table of a million
/// entries). Indexed by the key it is one store. The vector may grow to
/// [`DENSE_FREE_SLOTS`] or 8 slots per row present, whichever is more; a key past that (or
/// negative) makes the caller turn it into a hash map.
#[derive(Default)]
struct DenseMap {
    slots: Vec<Loc>,
    /// The null key's place (a damaged archive's).
    null: Option<Loc>,
    live: usize,
}

impl DenseMap {
    /// Set `key`'s place; `false` if the key is beyond this map's reach (nothing changed).
    fn set(&mut self, key: Option<i64>, at: Loc) -> bool {
        let Some(k) = key else {
            self.live += usize::from(self.null.replace(at).is_none());
            return true;
        };
        let Ok(i) = usize::try_from(k) else {
            return false;
        };
        if i >= self.slots.len() {
            let len = (i + 1).max(self.slots.len() * 2);
            if len > DENSE_FREE_SLOTS.max(8 * (self.live + 1)) {
                return false;
            }
            self.slots.resize(len, ABSENT);
        }
        self.live += usize::from(self.slots[i] == ABSENT);
        self.slots[i] = at;
        true
    }

    fn remove(&mut self, key: Option<i64>) {
        let slot = match key {
            None => self.null.take(),
            Some(k) => usize::try_from(k)
                .ok()
                .and_then(|i| self.slots.get_mut(i))
                .map(|s| std::mem::replace(s, ABSENT)),
        };
        self.live -= usize::from(slot.is_some_and(|l| l != ABSENT));
    }

    fn clear(&mut self) {
        self.slots.fill(ABSENT);
        self.null = None;
        self.live = 0;
    }

    fn entries(&self) -> impl Iterator<Item = (Option<i64>, Loc)> + '_ {
        let present = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, l)| **l != ABSENT)
            .map(|(k, l)| (Some(k as i64), *l));
        self.null.map(|l| (None, l)).into_iter().chain(present)
    }

    fn to_hash(&self) -> HashMap<Option<i64>, Loc> {
        self.entries().collect()
    }
}

/// Each row's key to the place of its last change. A single integer key is kept as the
/// integer: no key bytes to hash, copy or compare (hashing and comparing them were a fifth of
/// an as_of's samples at 10M changes), and as an index while its keys are small.
enum RowMap {
    Dense(DenseMap),
    Int(HashMap<Option<i64>, Loc>),
    Bytes(HashMap<Box<[u8]>, Loc>),
}

impl RowMap {
    fn new(int_key: bool) -> RowMap {
        if int_key {
            RowMap::Dense(DenseMap::default())
        } else {
            RowMap::Bytes(HashMap::default())
        }
    }

    fn set(&mut self, key: KeyRef<'_>, at: Loc) {
        match (&mut *self, key) {
            (RowMap::Dense(d), KeyRef::Int(k)) => {
                if !d.set(k, at) {
                    // A key out of the index's reach: the rows move to a hash map for good.
                    let mut m = d.to_hash();
                    m.insert(k, at);
                    *self = RowMap::Int(m);
                }
            }
            (RowMap::Int(m), KeyRef::Int(k)) => {
                m.insert(k, at);
            }
            // The key is copied into the map only when it is new there.
            (RowMap::Bytes(m), KeyRef::Bytes(k)) => match m.get_mut(k) {
                Some(l) => *l = at,
                None => {
                    m.insert(k.into(), at);
                }
            },
            _ => unreachable!("a replay's keys are all of its map's kind"),
        }
    }

    fn remove(&mut self, key: KeyRef<'_>) {
        match (self, key) {
            (RowMap::Dense(d), KeyRef::Int(k)) => d.remove(k),
            (RowMap::Int(m), KeyRef::Int(k)) => {
                m.remove(&k);
            }
            (RowMap::Bytes(m), KeyRef::Bytes(k)) => {
                m.remove(k);
            }
            _ => unreachable!("a replay's keys are all of its map's kind"),
        }
    }

    fn clear(&mut self) {
        match self {
            RowMap::Dense(d) => d.clear(),
            RowMap::Int(m) => m.clear(),
            RowMap::Bytes(m) => m.clear(),
        }
    }

    fn locs(&self) -> Vec<Loc> {
        match self {
            RowMap::Dense(d) => d.entries().map(|(_, l)| l).collect(),
            RowMap::Int(m) => m.values().copied().collect(),
            RowMap::Bytes(m) => m.values().copied().collect(),
        }
    }

    /// The keys whose last change differs from `other`'s (absent on one side, or another
    /// change), as (place here, place in `other`).
    fn differences(&self, other: &RowMap) -> Vec<(Option<Loc>, Option<Loc>)> {
        fn pairs<K: std::hash::Hash + Eq>(
            a: &HashMap<K, Loc>,
            b: &HashMap<K, Loc>,
        ) -> Vec<(Option<Loc>, Option<Loc>)> {
            let mut out = Vec::new();
            for (k, la) in a {
                match b.get(k) {
                    Some(lb) if lb == la => {}
                    lb => out.push((Some(*la), lb.copied())),
                }
            }
            for (k, lb) in b {
                if !a.contains_key(k) {
                    out.push((None, Some(*lb)));
                }
            }
            out
        }
        let some = |l: Loc| (l != ABSENT).then_some(l);
        match (self, other) {
            (RowMap::Dense(a), RowMap::Dense(b)) => {
                let mut out: Vec<(Option<Loc>, Option<Loc>)> = Vec::new();
                if a.null != b.null {
                    out.push((a.null, b.null));
                }
                for i in 0..a.slots.len().max(b.slots.len()) {
                    let (la, lb) = (
                        a.slots.get(i).copied().unwrap_or(ABSENT),
                        b.slots.get(i).copied().unwrap_or(ABSENT),
                    );
                    if la != lb {
                        out.push((some(la), some(lb)));
                    }
                }
                out
            }
            (RowMap::Int(a), RowMap::Int(b)) => pairs(a, b),
            (RowMap::Dense(a), RowMap::Int(b)) => pairs(&a.to_hash(), b),
            (RowMap::Int(a), RowMap::Dense(b)) => pairs(a, &b.to_hash()),
            (RowMap::Bytes(a), RowMap::Bytes(b)) => pairs(a, b),
            _ => unreachable!("the replays of one plan have maps of one kind"),
        }
    }
}

/// The key columns of one batch's row image, as [`KeyRef`]s.
enum ImageKeys {
    Int(StructArray, datafusion::arrow::array::Int64Array),
    Bytes(StructArray, datafusion::arrow::row::Rows),
}

impl ImageKeys {
    /// Row `i`'s key, if the image is there.
    fn key(&self, i: usize) -> Option<KeyRef<'_>> {
        match self {
            ImageKeys::Int(s, k) => s
                .is_valid(i)
                .then(|| KeyRef::Int(k.is_valid(i).then(|| k.value(i)))),
            ImageKeys::Bytes(s, rows) => s.is_valid(i).then(|| KeyRef::Bytes(rows.row(i).data())),
        }
    }
}

/// What the first pass needs to know about the table.
struct Plan<'t> {
    version: &'t RelationVersion,
    /// The keyframe the plan starts from: changes at or below this LSN are in it.
    start: Option<Lsn>,
    key_names: Vec<String>,
    sources: Vec<Source<'t>>,
    row_groups: Bounds,
    /// The key is one integer column: the replay keys its maps by the integer.
    int_key: bool,
}

impl MomentRows {
    fn new(
        archive: &ArchiveSnapshot,
        table: &TableHistory,
        plan: &Plan<'_>,
        moment: Moment,
    ) -> MomentRows {
        let mut replay = Replay::new(archive, table, moment);
        if let Some(at) = plan.start {
            replay.resume_after(at);
        }
        MomentRows {
            replay,
            rows: RowMap::new(plan.int_key),
        }
    }
}

impl RowSet for RowMap {
    type Error = DataFusionError;

    fn restart(&mut self, _: SnapshotPoint) -> Result<()> {
        self.clear();
        Ok(())
    }
}

/// The replay's effects on rows held as the place of their last change.
impl ApplyChange<KeyRef<'_>, Loc> for RowMap {
    fn begin(&mut self, after: KeyRef<'_>, at: &Loc) -> Result<()> {
        self.set(after, *at);
        Ok(())
    }

    fn end(&mut self, before: KeyRef<'_>, _: &Loc) -> Result<()> {
        self.remove(before);
        Ok(())
    }

    /// Most updates keep their key, and then the entry is overwritten in place (a remove and
    /// re-insert per update, with the key comparisons under it, were a third of the pass).
    fn replace(&mut self, before: Option<KeyRef<'_>>, after: KeyRef<'_>, at: &Loc) -> Result<()> {
        if let Some(before) = before
            && before != after
        {
            self.remove(before);
        }
        self.set(after, *at);
        Ok(())
    }

    /// A plan holds one schema version, so one relation: every row is the truncated one's.
    fn truncate(&mut self, _: u32, _: &Loc) -> Result<()> {
        self.clear();
        Ok(())
    }
}

fn external(e: impl std::error::Error + Send + Sync + 'static) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// The sources holding `table`'s changes up to `until`, if they are all in one schema version
/// of a table with a primary key (else `None`: the row replay handles it).
fn plan<'t>(
    table: &'t TableHistory,
    until: Moment,
    keyframes: Keyframes,
) -> Result<Option<Plan<'t>>> {
    let mut version: Option<&RelationVersion> = None;
    let mut same = |v: &'t RelationVersion| match version {
        None => {
            version = Some(v);
            true
        }
        Some(w) => std::ptr::eq(v, w),
    };
    let mut sources = Vec::new();
    let keyframe = match keyframes {
        Keyframes::Any => table.keyframe_within(until, None),
        Keyframes::Within(m) => table.keyframe_within(m, None),
        Keyframes::Before(l) => table.keyframe_within(until, Some(l)),
    };
    let mut start = None;
    if let Some((k, v)) = keyframe {
        same(v);
        start = Some(k.at);
        sources.push(Source::Keyframe(k));
    }
    for seg in &table.segments {
        if !until.may_include(seg.min_key, seg.min_committed_at_us)
            || start.is_some_and(|at| seg.max_key.commit_lsn <= at)
        {
            continue;
        }
        let SegmentContent::Table(rel) = &seg.content else {
            continue;
        };
        if !same(table.version(rel.relation_id, rel.valid_from)?) {
            return Ok(None);
        }
        sources.push(Source::Segment(seg));
    }
    let tail: Vec<(ChangeKey, ChangeRecord)> = table
        .tail
        .iter()
        .filter(|(k, r)| {
            until.includes(*k, r.committed_at_us) && start.is_none_or(|at| k.commit_lsn > at)
        })
        .cloned()
        .collect();
    for (_, r) in &tail {
        if !same(table.version(r.relation_id, r.schema_version)?) {
            return Ok(None);
        }
    }
    let Some(version) = version else {
        return Ok(None);
    };
    let positions = table.key_positions(version);
    if positions.is_empty() || version.columns.is_empty() {
        return Ok(None);
    }
    if !tail.is_empty() {
        let batch =
            records_to_batch(&SegmentContent::Table(version.clone()), &tail).map_err(external)?;
        sources.push(Source::Tail(batch));
    }
    let key_names = positions
        .iter()
        .map(|&i| version.columns[i].name.clone())
        .collect();
    let int_key = match positions {
        [i] => matches!(
            row_struct_fields(version)[*i].data_type(),
            DataType::Int16 | DataType::Int32 | DataType::Int64
        ),
        _ => false,
    };
    let mut row_groups = until.row_group_bounds();
    if let Some(at) = start {
        row_groups.lsn.0 = at.0.saturating_add(1);
    }
    Ok(Some(Plan {
        version,
        start,
        key_names,
        sources,
        row_groups,
        int_key,
    }))
}

/// Read `columns` of every source in key order, calling `f(source index, first row number,
/// batch)` on this thread until it returns `false`. Segments are decoded on their own threads,
/// as many at a time as there are cores, a few batches ahead of `f`: decoding is most of a
/// pass, and `f` (the replay) must see the changes in order. With `rows` (per source, sorted
/// row numbers), a source's batches hold only those rows, and a source with none is not read.
fn scan(
    archive: &ArchiveSnapshot,
    plan: &Plan,
    columns: &[Vec<String>],
    rows: Option<&[Vec<usize>]>,
    mut f: impl FnMut(usize, usize, &RecordBatch) -> Result<bool>,
) -> Result<()> {
    let width = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let decode = |i: usize| -> Receiver<Result<RecordBatch>> {
            let (tx, rx) = sync_channel(READ_AHEAD_BATCHES);
            let selected = rows.map(|r| r[i].as_slice());
            match &plan.sources[i] {
                _ if selected.is_some_and(<[usize]>::is_empty) => {}
                Source::Tail(batch) => {
                    let batch = match selected {
                        None => Ok(batch.clone()),
                        Some(selected) => {
                            let indices =
                                UInt32Array::from_iter_values(selected.iter().map(|&r| r as u32));
                            take_record_batch(batch, &indices).map_err(DataFusionError::from)
                        }
                    };
                    let _ = tx.send(batch);
                }
                Source::Keyframe(_) | Source::Segment(_) => {
                    let (path, sha256, row_groups) = match &plan.sources[i] {
                        Source::Keyframe(k) => (
                            keyframe_path(&archive.dir, k),
                            &k.sha256,
                            // A keyframe's rows are all at or before its point, which the
                            // plan's bounds (the changes after it) exclude.
                            Bounds::default(),
                        ),
                        Source::Segment(seg) => {
                            (archive.segment_path(seg), &seg.sha256, plan.row_groups)
                        }
                        Source::Tail(_) => unreachable!("matched above"),
                    };
                    scope.spawn(move || {
                        let reader = match open_segment_selected(
                            &path,
                            sha256,
                            8192,
                            row_groups,
                            Some(columns),
                            selected,
                        ) {
                            Ok(reader) => reader,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        for batch in reader {
                            // A failed send: the pass stopped (done early, or failed); so do we.
                            if tx.send(batch.map_err(external)).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
            rx
        };
        let mut ahead: VecDeque<Receiver<Result<RecordBatch>>> = VecDeque::new();
        let mut started = 0;
        for source in 0..plan.sources.len() {
            while started < plan.sources.len() && started < source + width {
                ahead.push_back(decode(started));
                started += 1;
            }
            let batches = ahead
                .pop_front()
                .ok_or_else(|| DataFusionError::Internal("source not started".into()))?;
            let mut row = 0;
            for batch in batches {
                let batch = batch?;
                // Returning drops the receivers still ahead: their decoders stop at their next send.
                if !f(source, row, &batch)? {
                    return Ok(());
                }
                row += batch.num_rows();
            }
        }
        Ok(())
    })
}

/// First pass: replay every change's effect on the row map of each moment, reading keys only.
fn replay(archive: &ArchiveSnapshot, plan: &Plan, replays: &mut [MomentRows]) -> Result<()> {
    let key_fields: Vec<SortField> = {
        let fields = row_struct_fields(plan.version);
        plan.key_names
            .iter()
            .map(|k| {
                fields
                    .iter()
                    .find(|f| f.name() == k)
                    .map(|f| SortField::new(f.data_type().clone()))
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                DataFusionError::Internal("a key column is missing from its version".into())
            })?
    };
    let int_key = plan.int_key;
    let converter = RowConverter::new(key_fields)?;
    let mut columns: Vec<Vec<String>> = ["lsn", "seq", "committed_at", "op"]
        .iter()
        .map(|c| vec![c.to_string()])
        .collect();
    for image in ["before", "after"] {
        for k in &plan.key_names {
            columns.push(vec![image.to_string(), k.clone()]);
        }
    }
    let mut last: Option<(u64, u32)> = None;
    scan(archive, plan, &columns, None, |source, first_row, batch| {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| DataFusionError::Internal(format!("segment without {name}")))
        };
        let lsn = col("lsn")?
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| DataFusionError::Internal("lsn type".into()))?
            .clone();
        let seq = col("seq")?
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| DataFusionError::Internal("seq type".into()))?
            .clone();
        let committed_at = col("committed_at")?
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| DataFusionError::Internal("committed_at type".into()))?
            .clone();
        let op = col("op")?
            .as_dictionary_opt::<Int8Type>()
            .ok_or_else(|| DataFusionError::Internal("op type".into()))?
            .clone();
        let op_values = op
            .values()
            .as_string_opt::<i32>()
            .ok_or_else(|| DataFusionError::Internal("op values".into()))?;
        let kinds: Vec<ChangeKind> = (0..op_values.len())
            .map(|i| ChangeKind::of_name(op_values.value(i)))
            .collect();
        let keys_of = |image: &str| -> Result<Option<ImageKeys>> {
            let Some(s) = batch
                .column_by_name(image)
                .and_then(|c| c.as_struct_opt().cloned())
            else {
                return Ok(None);
            };
            let children: Vec<ArrayRef> = plan
                .key_names
                .iter()
                .map(|k| s.column_by_name(k).cloned())
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    DataFusionError::Internal(format!("{image} without its key columns"))
                })?;
            if int_key {
                let key = datafusion::arrow::compute::cast(&children[0], &DataType::Int64)?;
                return Ok(Some(ImageKeys::Int(
                    s,
                    key.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                        .clone(),
                )));
            }
            let rows = converter.convert_columns(&children)?;
            Ok(Some(ImageKeys::Bytes(s, rows)))
        };
        let before = keys_of("before")?;
        let after = keys_of("after")?;
        fn valid(img: &Option<ImageKeys>, i: usize) -> Option<KeyRef<'_>> {
            img.as_ref().and_then(|k| k.key(i))
        }
        if matches!(plan.sources[source], Source::Keyframe(_)) {
            // The table's rows at the keyframe's point, each as itself: no rule applies.
            for i in 0..batch.num_rows() {
                let key = valid(&after, i).ok_or_else(|| {
                    DataFusionError::Execution(
                        "a keyframe row without its key; the archive is inconsistent (run `pgtrail verify`)"
                            .into(),
                    )
                })?;
                for r in replays.iter_mut() {
                    r.rows.set(key, loc(source, first_row + i));
                }
            }
            return Ok(true);
        }
        for i in 0..batch.num_rows() {
            let key = (lsn.value(i), seq.value(i));
            // Row groups overlapping the keyframe's point hold changes it already has.
            if plan.start.is_some_and(|at| key.0 <= at.0) {
                continue;
            }
            if last.is_some_and(|l| key <= l) {
                return Err(DataFusionError::Execution(format!(
                    "changes are not in key order at {}#{}; the archive is inconsistent (run `pgtrail verify`)",
                    Lsn(key.0),
                    key.1
                )));
            }
            last = Some(key);
            let change_key = ChangeKey {
                commit_lsn: Lsn(key.0),
                seq: key.1,
            };
            let kind = op
                .keys()
                .is_valid(i)
                .then(|| kinds.get(op.keys().value(i) as usize).copied())
                .flatten()
                .unwrap_or(ChangeKind::Other);
            let at = loc(source, first_row + i);
            for r in replays.iter_mut() {
                if r.replay.includes(change_key, committed_at.value(i)) {
                    r.replay.apply(
                        &mut r.rows,
                        change_key,
                        kind,
                        plan.version.relation_id,
                        valid(&before, i),
                        valid(&after, i),
                        &at,
                    )?;
                }
            }
        }
        Ok(true)
    })?;
    for r in replays.iter_mut() {
        r.replay.finish(&mut r.rows)?;
    }
    Ok(())
}

/// `locs` (sorted) as each source's row numbers.
fn rows_by_source(plan: &Plan, locs: &[Loc]) -> Result<Vec<Vec<usize>>> {
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); plan.sources.len()];
    for &l in locs {
        let (source, row) = loc_parts(l);
        rows.get_mut(source)
            .ok_or_else(|| DataFusionError::Internal("a change of an unknown source".into()))?
            .push(row);
    }
    Ok(rows)
}

/// The rows of a keyframe of `table` at `at`: for each row the table held then, the change
/// that last wrote it (the segment schema of its version, `before` and its lists null), in
/// key order; `None` where the columnar engine does not apply (no key, several schema
/// versions since the keyframe it would start from, or none to start from).
pub(crate) fn keyframe_rows<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    at: Lsn,
    keyframes: Keyframes,
) -> Result<Option<(&'t RelationVersion, RecordBatch)>> {
    let moment = Moment::Lsn(at);
    let Some((plan, locs)) = places_at(archive, table, moment, keyframes)? else {
        return Ok(None);
    };
    let content = SegmentContent::Table(plan.version.clone());
    let schema = segment_schema(&content);
    let skipped = ["changed", "before", "before_unknown", "before_text"];
    let read: Vec<Arc<Field>> = schema
        .fields()
        .iter()
        .filter(|f| !skipped.contains(&f.name().as_str()))
        .cloned()
        .collect();
    let columns: Vec<Vec<String>> = read.iter().map(|f| vec![f.name().clone()]).collect();
    let rows = rows_by_source(&plan, &locs)?;
    let mut parts: Vec<RecordBatch> = Vec::new();
    scan(archive, &plan, &columns, Some(&rows), |_, _, batch| {
        parts.push(batch.clone());
        Ok(true)
    })?;
    let read_schema = Arc::new(Schema::new(read));
    let parts = parts
        .iter()
        .map(|b| {
            let columns = read_schema
                .fields()
                .iter()
                .map(|f| {
                    let c = b.column_by_name(f.name()).ok_or_else(|| {
                        DataFusionError::Internal(format!("a source without {}", f.name()))
                    })?;
                    Ok(datafusion::arrow::compute::cast(c, f.data_type())?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(RecordBatch::try_new(read_schema.clone(), columns)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let found = datafusion::arrow::compute::concat_batches(&read_schema, &parts)?;
    if found.num_rows() != locs.len() {
        return Err(DataFusionError::Execution(
            "a change found by the first pass was not there in the second".into(),
        ));
    }
    let after = found
        .column_by_name("after")
        .and_then(|c| c.as_struct_opt())
        .ok_or_else(|| DataFusionError::Internal("a keyframe without after".into()))?;
    let order = key_order(after, &plan.key_names)?;
    let found = take_record_batch(&found, &order)?;
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            found
                .column_by_name(f.name())
                .cloned()
                .unwrap_or_else(|| new_null_array(f.data_type(), found.num_rows()))
        })
        .collect();
    Ok(Some((plan.version, RecordBatch::try_new(schema, columns)?)))
}

/// Second pass: the stored `after` images at `locs` (sorted, distinct), in that order; `None`
/// when one holds a value kept as exact text. Only those rows are decoded, and sources
/// holding none of them are not read.
fn images(
    archive: &ArchiveSnapshot,
    plan: &Plan,
    locs: &[Loc],
    refuse_unknown: bool,
) -> Result<Option<StructArray>> {
    let fields = row_struct_fields(plan.version);
    let rows = rows_by_source(plan, locs)?;
    let mut parts: Vec<ArrayRef> = Vec::new();
    let mut found = 0;
    let mut exact_text = false;
    let mut columns = vec![vec!["after".to_string()], vec!["after_text".to_string()]];
    if refuse_unknown {
        columns.push(vec!["after_unknown".to_string()]);
    }
    scan(archive, plan, &columns, Some(&rows), |_, _, batch| {
        let held = |name: &str| {
            batch
                .column_by_name(name)
                .is_some_and(|c| c.null_count() != c.len())
        };
        if held("after_text") || (refuse_unknown && held("after_unknown")) {
            exact_text = true;
            return Ok(false);
        }
        let after = batch
            .column_by_name("after")
            .ok_or_else(|| DataFusionError::Internal("segment without after".into()))?;
        parts.push(after.clone());
        found += batch.num_rows();
        Ok(true)
    })?;
    if exact_text {
        return Ok(None);
    }
    if found != locs.len() {
        return Err(DataFusionError::Execution(
            "a change found by the first pass was not there in the second".into(),
        ));
    }
    let array = if parts.is_empty() {
        new_empty_array(&DataType::Struct(fields))
    } else {
        concat(&parts.iter().map(|a| a.as_ref()).collect::<Vec<_>>())?
    };
    Ok(Some(array.as_struct().clone()))
}

/// Whether rows `i` and `j` of `images` hold the same values (nulls equal to nulls).
///
/// Compared value by value where Arrow's comparators handle the types; converting every
/// image to Arrow's row format instead wrote a second copy of all of them, and the kernel
/// zeroing that memory was a third of a diff's samples at 800,000 changed rows.
pub(crate) fn same_rows(images: &StructArray) -> Result<Box<dyn Fn(usize, usize) -> bool + '_>> {
    let array: ArrayRef = Arc::new(images.clone());
    if let Ok(compare) = make_comparator(array.as_ref(), array.as_ref(), SortOptions::default()) {
        return Ok(Box::new(move |i, j| {
            compare(i, j) == std::cmp::Ordering::Equal
        }));
    }
    // A type the comparators do not handle: the row format handles every type.
    let converter = RowConverter::new(vec![SortField::new(images.data_type().clone())])?;
    let rows = converter.convert_columns(&[array])?;
    Ok(Box::new(move |i, j| rows.row(i) == rows.row(j)))
}

/// Indices that order `rows` by the key columns.
fn key_order(rows: &StructArray, key_names: &[String]) -> Result<UInt32Array> {
    let columns: Vec<SortColumn> = key_names
        .iter()
        .filter_map(|k| {
            rows.column_by_name(k).map(|c| SortColumn {
                values: c.clone(),
                options: None,
            })
        })
        .collect();
    Ok(lexsort_to_indices(&columns, None)?)
}

/// Whether the row replay would show the table at `moment` in `plan`'s version: at an LSN it
/// shows the latest version in force then, which may be a newer one no change used yet (an
/// `ALTER TABLE` followed by no write); at a time, the version of the last change.
fn shown_in_plan_version(table: &TableHistory, plan: &Plan, moment: Moment) -> bool {
    match moment {
        Moment::Lsn(l) => table
            .versions
            .iter()
            .rev()
            .find(|v| v.valid_from.commit_lsn <= l)
            .is_none_or(|v| std::ptr::eq(v, plan.version)),
        Moment::Time(_) => true,
    }
}

/// `as_of` of a keyed table in one schema version, or `None` (use the row replay).
pub fn as_of_batch(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    moment: Moment,
) -> Result<Option<RecordBatch>> {
    let Some((plan, locs)) = places_at(archive, table, moment, Keyframes::Any)? else {
        return Ok(None);
    };
    let Some(rows) = images(archive, &plan, &locs, false)? else {
        return Ok(None);
    };
    let order = key_order(&rows, &plan.key_names)?;
    let sorted = take(&rows, &order, None)?;
    let sorted = sorted.as_struct();
    let schema = Arc::new(Schema::new(sorted.fields().clone()));
    let options = RecordBatchOptions::new().with_row_count(Some(sorted.len()));
    Ok(Some(RecordBatch::try_new_with_options(
        schema,
        sorted.columns().to_vec(),
        &options,
    )?))
}

/// The rows of `table` at `moment` as their images are stored (typed, in no particular order)
/// with the schema version they follow, for `restore`; `None` where the columnar engine does
/// not apply, or where a row holds a value kept as exact text or an unknown value (the row
/// replay then answers, and refuses the unknown).
pub(crate) fn stored_images_at<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    moment: Moment,
) -> Result<Option<(&'t RelationVersion, StructArray)>> {
    let Some((plan, locs)) = places_at(archive, table, moment, Keyframes::Any)? else {
        return Ok(None);
    };
    Ok(images(archive, &plan, &locs, true)?.map(|rows| (plan.version, rows)))
}

/// The plan of `table` at `moment` and the places of the changes that last wrote its rows
/// then, in place order; `None` where the columnar engine does not apply.
fn places_at<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    moment: Moment,
    keyframes: Keyframes,
) -> Result<Option<(Plan<'t>, Vec<Loc>)>> {
    let Some(plan) = plan(table, moment, keyframes)? else {
        return Ok(None);
    };
    if !shown_in_plan_version(table, &plan, moment) {
        return Ok(None);
    }
    let mut replays = [MomentRows::new(archive, table, &plan, moment)];
    replay(archive, &plan, &mut replays)?;
    let mut locs: Vec<Loc> = replays[0].rows.locs();
    locs.sort_unstable();
    Ok(Some((plan, locs)))
}

/// `diff` of a keyed table in one schema version between two moments, or `None`.
pub fn diff_batch(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    from: Moment,
    to: Moment,
) -> Result<Option<RecordBatch>> {
    // The later moment decides which changes are read, the earlier where both replays may
    // start.
    let (earlier, later) = match (from, to) {
        (Moment::Time(a), Moment::Time(b)) => (Moment::Time(a.min(b)), Moment::Time(a.max(b))),
        (Moment::Lsn(a), Moment::Lsn(b)) => (Moment::Lsn(a.min(b)), Moment::Lsn(a.max(b))),
        _ => return Ok(None),
    };
    let Some(plan) = plan(table, later, Keyframes::Within(earlier))? else {
        return Ok(None);
    };
    if !shown_in_plan_version(table, &plan, to) {
        return Ok(None);
    }
    let mut replays = [
        MomentRows::new(archive, table, &plan, from),
        MomentRows::new(archive, table, &plan, to),
    ];
    replay(archive, &plan, &mut replays)?;
    let [a, b] = replays;
    // Keys whose last change differs between the moments (the same change: the same row).
    let pairs = a.rows.differences(&b.rows);
    let mut locs: Vec<Loc> = pairs
        .iter()
        .flat_map(|(x, y)| x.iter().chain(y.iter()).copied())
        .collect();
    locs.sort_unstable();
    locs.dedup();
    let Some(images) = images(archive, &plan, &locs, false)? else {
        return Ok(None);
    };
    // `locs` is sorted and distinct: a change's image is at its place in it.
    let index = |l: Loc| -> Result<u32> {
        locs.binary_search(&l)
            .map(|i| i as u32)
            .map_err(|_| DataFusionError::Internal("a changed row without its image".into()))
    };
    let before_idx = UInt32Array::from(
        pairs
            .iter()
            .map(|(x, _)| x.map(index).transpose())
            .collect::<Result<Vec<_>>>()?,
    );
    let after_idx = UInt32Array::from(
        pairs
            .iter()
            .map(|(_, y)| y.map(index).transpose())
            .collect::<Result<Vec<_>>>()?,
    );
    // Two different changes may still leave the same row (an update to the same values).
    let same = same_rows(&images)?;
    let keep: Vec<usize> = (0..pairs.len())
        .filter(|&i| match (before_idx.is_valid(i), after_idx.is_valid(i)) {
            (true, true) => !same(before_idx.value(i) as usize, after_idx.value(i) as usize),
            _ => true,
        })
        .collect();
    // The key columns of whichever image exists, to label and order the rows.
    let present = UInt32Array::from(
        keep.iter()
            .map(|&i| {
                if after_idx.is_valid(i) {
                    after_idx.value(i)
                } else {
                    before_idx.value(i)
                }
            })
            .collect::<Vec<_>>(),
    );
    let key_rows = take(&images, &present, None)?;
    let key_rows = key_rows.as_struct();
    let order = key_order(key_rows, &plan.key_names)?;
    // The kept pairs in key order; each side's images are taken once, already in that order.
    let sorted: Vec<usize> = order.values().iter().map(|&o| keep[o as usize]).collect();
    let pick = |idx: &UInt32Array| -> Result<ArrayRef> {
        let chosen = UInt32Array::from(
            sorted
                .iter()
                .map(|&i| idx.is_valid(i).then(|| idx.value(i)))
                .collect::<Vec<_>>(),
        );
        Ok(take(&images, &chosen, None)?)
    };
    let mut change = StringBuilder::new();
    let mut key_text = StringBuilder::new();
    let kinds: Vec<(ArrayRef, PgKind)> = plan
        .key_names
        .iter()
        .map(|k| {
            let c = plan
                .version
                .columns
                .iter()
                .find(|c| &c.name == k)
                .expect("key column of its version");
            (
                key_rows.column_by_name(k).expect("key column").clone(),
                PgKind::of(c.type_oid, c.type_modifier),
            )
        })
        .collect();
    for (&o, &i) in order.values().iter().zip(&sorted) {
        change.append_value(match (before_idx.is_valid(i), after_idx.is_valid(i)) {
            (true, true) => "update",
            (true, false) => "delete",
            _ => "insert",
        });
        let text: Vec<String> = kinds
            .iter()
            .map(|(array, kind)| {
                render(kind, array.as_ref(), o as usize).unwrap_or_else(|| "NULL".into())
            })
            .collect();
        key_text.append_value(text.join("|"));
    }
    let fields: Fields = images.fields().clone();
    let row_type = DataType::Struct(fields);
    let schema = Arc::new(Schema::new(vec![
        Field::new("change", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("before", row_type.clone(), true),
        Field::new("after", row_type, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(change.finish()),
        Arc::new(key_text.finish()),
        pick(&before_idx)?,
        pick(&after_idx)?,
    ];
    Ok(Some(RecordBatch::try_new(schema, columns)?))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A reproducible stream of numbers (xorshift), so a failure can be replayed.
    struct Numbers(u64);
    impl Numbers {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn differences(
        a: &BTreeMap<Option<i64>, Loc>,
        b: &BTreeMap<Option<i64>, Loc>,
    ) -> Vec<(Option<Loc>, Option<Loc>)> {
        let keys: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
        let mut out: Vec<_> = keys
            .into_iter()
            .map(|k| (a.get(k).copied(), b.get(k).copied()))
            .filter(|(x, y)| x != y)
            .collect();
        out.sort_unstable();
        out
    }

    /// The integer-keyed map gives the same rows and differences as an ordered map, through
    /// growth, removals, clears, the null key and the move to a hash map when keys get sparse
    /// (one map moves and the other does not, and both stay, across seeds).
    #[test]
    fn an_integer_row_map_holds_what_an_ordered_map_holds() {
        for seed in 1..=40u64 {
            let mut n = Numbers(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let (mut maps, mut expected) = (
                [RowMap::new(true), RowMap::new(true)],
                [BTreeMap::new(), BTreeMap::new()],
            );
            // Seeds differ in when (and whether) keys out of the index's reach appear.
            let sparse_from = (seed % 4) * 3_000;
            for step in 0..12_000u64 {
                let r = n.next();
                let key = match r % 100 {
                    0 => None,
                    1 if step >= sparse_from && seed % 4 != 3 => {
                        Some(-((r >> 8) as i64 % 1000) - 1)
                    }
                    2 if step >= sparse_from && seed % 4 != 3 => {
                        Some((1 << 40) | ((r >> 8) as i64 % 1000))
                    }
                    _ => Some(((r >> 8) % 3_000) as i64),
                };
                // The second map sees only some of the changes, like the earlier of two moments.
                for (m, (map, reference)) in maps.iter_mut().zip(expected.iter_mut()).enumerate() {
                    if m == 0 && step % 3 == 0 {
                        continue;
                    }
                    match (r >> 32) % 20 {
                        0..=12 => {
                            map.set(KeyRef::Int(key), step);
                            reference.insert(key, step);
                        }
                        13..=18 => {
                            map.remove(KeyRef::Int(key));
                            reference.remove(&key);
                        }
                        _ if (r >> 40).is_multiple_of(50) => {
                            map.clear();
                            reference.clear();
                        }
                        _ => {}
                    }
                }
            }
            for (map, reference) in maps.iter().zip(&expected) {
                let mut locs = map.locs();
                locs.sort_unstable();
                let mut want: Vec<Loc> = reference.values().copied().collect();
                want.sort_unstable();
                assert_eq!(locs, want, "seed {seed}: rows");
            }
            let mut got = maps[0].differences(&maps[1]);
            got.sort_unstable();
            assert_eq!(
                got,
                differences(&expected[0], &expected[1]),
                "seed {seed}: differences"
            );
            let sparse = maps.iter().filter(|m| matches!(m, RowMap::Int(_))).count();
            if seed % 4 == 3 {
                assert_eq!(sparse, 0, "seed {seed}: small keys stay indexed");
            } else {
                assert!(sparse > 0, "seed {seed}: sparse keys move to a hash map");
            }
        }
    }
}
