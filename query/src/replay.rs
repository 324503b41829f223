//! The replay: how a table's changes, taken in key order, build the rows it held at a moment.
//!
//! This module is the one place where the meaning of each change for a table's rows is
//! written down ([`Replay::apply`]): an insert or snapshot row begins a row, an update replaces
//! the row its old image shows (or, without one, the row with its key) by its new image, a
//! delete ends a row, a TRUNCATE ends every row of the truncated relation, and passing a
//! snapshot point (the initial snapshot, or a `--resnapshot` after a gap) ends every row,
//! because a snapshot is the table's whole state and rows it lacks were deleted while the
//! archive could not see. Every reconstruction goes through it: `as_of` and `diff` (the
//! columnar engine and its row fallback), `row_history`'s states, and every export layout.
//! An engine only says how it holds rows, by implementing [`RowSet`]: the columnar engine
//! holds each row as the place of the change that wrote it, the row engine ([`OpenRows`]) as
//! the text row and the change that wrote it.
//!
//! What to read (which segments, which row groups) is `read`'s; what the rows are is here.

use std::collections::BTreeMap;
use std::fmt;

use datafusion::error::{DataFusionError, Result};
use pgtrail_store::{Cell, ChangeKey, ChangeRecord, Lsn, Op, RelationVersion, Row};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::error::QueryError;
use crate::read::{Bounds, for_each_change_where};

/// A moment of the source's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// Every transaction committed at or before this time (µs since the Unix epoch, UTC).
    Time(i64),
    /// Every transaction whose commit LSN is at or before this LSN.
    Lsn(Lsn),
}

impl Moment {
    pub(crate) fn includes(&self, key: ChangeKey, committed_at_us: i64) -> bool {
        self.reaches(key.commit_lsn, committed_at_us)
    }

    /// Whether this moment is at or after the point `lsn`, committed at `committed_at_us`.
    pub(crate) fn reaches(&self, lsn: Lsn, committed_at_us: i64) -> bool {
        match self {
            Moment::Time(t) => committed_at_us <= *t,
            Moment::Lsn(l) => lsn <= *l,
        }
    }

    /// Whether a segment might hold changes at or before this moment.
    pub(crate) fn may_include(&self, min_key: ChangeKey, min_committed_at_us: i64) -> bool {
        match self {
            Moment::Time(t) => min_committed_at_us <= *t,
            Moment::Lsn(l) => min_key.commit_lsn <= *l,
        }
    }

    /// The row-group statistics bounds of everything at or before this moment.
    pub(crate) fn row_group_bounds(&self) -> Bounds {
        match self {
            Moment::Lsn(l) => Bounds {
                lsn: (0, l.0),
                ..Bounds::default()
            },
            Moment::Time(t) => Bounds {
                time: (i64::MIN, *t),
                ..Bounds::default()
            },
        }
    }
}

impl std::str::FromStr for Moment {
    type Err = String;

    /// An LSN (`16/B374D848`) or a time (`2026-11-24T12:00:00Z`, `2026-11-24 12:00:00+01`;
    /// without a zone, UTC).
    fn from_str(text: &str) -> std::result::Result<Moment, String> {
        if let Ok(lsn) = text.parse::<Lsn>() {
            return Ok(Moment::Lsn(lsn));
        }
        datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(text.trim())
            .map(|ns| Moment::Time(ns.div_euclid(1000)))
            .map_err(|_| {
                format!(
                    "{text:?} is neither an LSN (16/B374D848) nor a time (2026-11-24T12:00:00Z; without a zone, UTC)"
                )
            })
    }
}

impl fmt::Display for Moment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Moment::Time(t) => write!(f, "{}", format_us(*t)),
            Moment::Lsn(l) => write!(f, "LSN {l}"),
        }
    }
}

fn format_us(us: i64) -> String {
    pgtrail_store::segment::format_utc_micros(us)
}

/// Call `f` with every change of `table` in key order, up to `until` when given.
pub fn for_each_change<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    until: Option<Moment>,
    f: impl FnMut(&'t RelationVersion, ChangeKey, &ChangeRecord) -> Result<()>,
) -> Result<()> {
    let row_groups = until.map_or_else(Bounds::default, |m| m.row_group_bounds());
    for_each_change_where(
        archive,
        table,
        row_groups,
        |seg| until.is_none_or(|m| m.may_include(seg.min_key, seg.min_committed_at_us)),
        |key, rec| until.is_none_or(|m| m.includes(key, rec.committed_at_us)),
        f,
    )
}

/// The snapshot points of one table that a replay in key order passes, in order.
struct SnapshotResets {
    points: Vec<SnapshotPoint>,
    next: usize,
}

impl SnapshotResets {
    fn new(archive: &ArchiveSnapshot, table: &TableHistory) -> Self {
        SnapshotResets {
            points: archive
                .table_snapshots(table)
                .map(|(s, scope)| SnapshotPoint {
                    lsn: s.lsn,
                    committed_at_us: s.committed_at_us,
                    unknown_from: scope.unknown_from.filter(|(from, _)| *from < s.lsn),
                })
                .collect(),
            next: 0,
        }
    }

    /// The last snapshot point at or before `key` not passed yet, if any.
    fn passed(&mut self, key: ChangeKey) -> Option<SnapshotPoint> {
        self.passed_where(|p| p.lsn <= key.commit_lsn)
    }

    /// The last snapshot point within `moment` not passed yet, if any.
    fn passed_by(&mut self, moment: Moment) -> Option<SnapshotPoint> {
        self.passed_where(|p| moment.reaches(p.lsn, p.committed_at_us))
    }

    fn passed_where(&mut self, within: impl Fn(SnapshotPoint) -> bool) -> Option<SnapshotPoint> {
        let mut hit = None;
        while let Some(&point) = self.points.get(self.next) {
            if !within(point) {
                break;
            }
            hit = Some(point);
            self.next += 1;
        }
        hit
    }
}

/// A row's identity: its key values, or for a table without a key the whole row.
pub(crate) type RowKey = Vec<Cell>;

pub(crate) fn row_key(positions: &[usize], row: &Row) -> RowKey {
    if positions.is_empty() {
        row.clone()
    } else {
        positions
            .iter()
            .map(|&i| row.get(i).cloned().unwrap_or(Cell::Null))
            .collect()
    }
}

/// An error unless the archive holds `table` at `moment`: the archive begins at or before it,
/// and so does the table's history (a table synchronised while capture ran, because it was
/// created or given a key then, is known from its first snapshot on: what it held before is
/// unknown, not empty).
pub(crate) fn check_begins(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    moment: Moment,
) -> Result<()> {
    check_archive_begins(archive, moment)?;
    let snapshots: Vec<_> = archive.table_snapshots(table).collect();
    let split = snapshots
        .iter()
        .position(|(s, _)| !moment.reaches(s.lsn, s.committed_at_us))
        .unwrap_or(snapshots.len());
    // The snapshots of the table within the moment, and the first one after it.
    let (passed, next) = (&snapshots[..split], snapshots.get(split));
    let point = |s: &pgtrail_store::SnapshotRecord| {
        format!("LSN {}, {}", s.lsn, format_us(s.committed_at_us))
    };
    let (name, moment_text) = (table.qualified_name(), moment.to_string());
    if let Some(UnknownSpan { to, scope, from }) = unknown_span(archive, table, moment) {
        return Err(QueryError::TableUnknown {
            table: name,
            moment: moment_text,
            from: format!("LSN {}, {}", from.0, format_us(from.1)),
            to: to.map_or_else(
                || "its read, which the capture decided on and has not stored yet (its next run reads the table)".to_string(),
                point,
            ),
            what: if scope.unpublished {
                "taken out of the publication"
            } else if scope.dropped {
                "dropped"
            } else {
                "rewritten by DDL (or had a column renamed, or was out of the publication for a while)"
            },
        }
        .into());
    }
    let initial = archive.snapshots.first().map(|s| s.lsn);
    match (passed.last(), next) {
        // Not held yet at the moment, and not from the archive's beginning.
        (None, Some((first, _))) if Some(first.lsn) != initial => Err(QueryError::BeforeTable {
            table: name,
            moment: moment_text,
            begins: point(first),
        }
        .into()),
        // Dropped, and a table of that name read whole later: it was created again at some
        // point in between, which the archive does not know.
        (Some((_, scope)), Some((next, _))) if scope.dropped => Err(QueryError::BeforeTable {
            table: name,
            moment: moment_text,
            begins: point(next),
        }
        .into()),
        (Some((snapshot, scope)), None) if scope.dropped && scope.unpublished => {
            Err(QueryError::TableNotCaptured {
                table: name,
                moment: moment_text,
                by: point(snapshot),
            }
            .into())
        }
        (Some((snapshot, scope)), None) if scope.dropped => Err(QueryError::TableDropped {
            table: name,
            moment: moment_text,
            by: point(snapshot),
        }
        .into()),
        _ => Ok(()),
    }
}

/// An error unless the archive holds `moment` (it begins at or before it).
pub(crate) fn check_archive_begins(archive: &ArchiveSnapshot, moment: Moment) -> Result<()> {
    let begins_before = match moment {
        Moment::Time(t) => archive.first_commit_us.is_some_and(|f| t >= f),
        Moment::Lsn(l) => archive.first_key.is_some_and(|k| l >= k.commit_lsn),
    };
    if !begins_before {
        let begins = match (archive.first_key, archive.first_commit_us) {
            (Some(k), Some(t)) => format!("LSN {}, {}", k.commit_lsn, format_us(t)),
            _ => "nothing captured yet".into(),
        };
        return Err(QueryError::BeforeArchive {
            moment: moment.to_string(),
            begins,
        }
        .into());
    }
    Ok(())
}

/// A snapshot transaction's commit: every row a replay holds before it ends there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotPoint {
    pub(crate) lsn: Lsn,
    pub(crate) committed_at_us: i64,
    /// A read of the table again after DDL rewrote it (or it was dropped, or out of the
    /// publication): the point from which its rows were not known until this one.
    pub(crate) unknown_from: Option<(Lsn, i64)>,
}

/// A span of a table's history the archive cannot answer (see [`unknown_span`]).
pub(crate) struct UnknownSpan<'a> {
    /// The snapshot that read the table again (or marked it dropped) and ends the span; `None`
    /// while that read is still to come (decided on, not stored).
    pub to: Option<&'a pgtrail_store::SnapshotRecord>,
    pub scope: pgtrail_store::TableScope,
    /// The point (LSN, time) the rows are unknown from.
    pub from: (Lsn, i64),
}

/// The span the archive cannot answer that `moment` falls in, if any: DDL rewrote (or
/// dropped) the table, and the moments between that DDL's earliest point and the table's
/// read after it are not known. The read is a later snapshot, or, when the capture stopped
/// between deciding on it and storing it, a read still pending (the span is open).
///
/// Every snapshot after the moment counts, not only the first: under one name, another
/// relation's read may come first with no span while a later one's span reaches back over
/// the moment. (A drop marked after the new table's read, the case the torture suite found,
/// is folded into that read by [`ArchiveSnapshot::table_snapshots`]; this check does not
/// rely on every such case being folded.)
pub(crate) fn unknown_span<'a>(
    archive: &'a ArchiveSnapshot,
    table: &'a TableHistory,
    moment: Moment,
) -> Option<UnknownSpan<'a>> {
    let reaches = |(lsn, at): &(Lsn, i64)| moment.reaches(*lsn, *at);
    let closed = archive
        .table_snapshots(table)
        .filter(|(s, _)| !moment.reaches(s.lsn, s.committed_at_us))
        .find_map(|(snapshot, scope)| {
            Some(UnknownSpan {
                to: Some(snapshot),
                from: scope.unknown_from.filter(reaches)?,
                scope,
            })
        });
    // Else a read decided on before the moment and never stored.
    closed.or_else(|| {
        open_spans(archive, table)
            .filter(|span| reaches(&span.from))
            .min_by_key(|span| span.from)
    })
}

/// Every span of `table`'s history the archive cannot answer: one ended by each read of the
/// table after DDL (in the order of the reads), then one for each read decided on and not
/// stored yet (open).
pub(crate) fn unknown_spans<'a>(
    archive: &'a ArchiveSnapshot,
    table: &'a TableHistory,
) -> impl Iterator<Item = UnknownSpan<'a>> + 'a {
    archive
        .table_snapshots(table)
        .filter_map(|(snapshot, scope)| {
            Some(UnknownSpan {
                to: Some(snapshot),
                from: scope.unknown_from?,
                scope,
            })
        })
        .chain(open_spans(archive, table))
}

/// The spans of `table` whose read was decided on and not stored yet.
fn open_spans<'a>(
    archive: &'a ArchiveSnapshot,
    table: &'a TableHistory,
) -> impl Iterator<Item = UnknownSpan<'a>> + 'a {
    let ids: Vec<u32> = table.relation_ids().collect();
    archive
        .pending_reads
        .iter()
        .filter(move |p| ids.contains(&p.relation_id))
        .filter_map(|p| {
            Some(UnknownSpan {
                to: None,
                from: p.unknown_from?,
                scope: p.clone(),
            })
        })
}

/// `row` (an image of `version`) with every value but those of the columns that identify it
/// unknown (the primary key, or under `REPLICA IDENTITY USING INDEX` the index's columns, which
/// no rewrite changes): the row is known to exist (its inserts and deletes are in the stream)
/// but not what it held.
pub(crate) fn unknown_values(version: &RelationVersion, row: &Row) -> Row {
    let key = version.key_positions();
    row.iter()
        .enumerate()
        .map(|(i, cell)| {
            if key.contains(&i) {
                cell.clone()
            } else {
                Cell::Unknown
            }
        })
        .collect()
}

/// What a change does to a table's rows, as the replay rules read its operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    /// An insert, or a row of a snapshot: a row begins.
    Write,
    Update,
    Delete,
    Truncate,
    /// A change that holds no row (a logical message).
    Other,
}

impl ChangeKind {
    pub(crate) fn of(op: Op) -> ChangeKind {
        match op {
            Op::Insert | Op::Snapshot => ChangeKind::Write,
            Op::Update => ChangeKind::Update,
            Op::Delete => ChangeKind::Delete,
            Op::Truncate => ChangeKind::Truncate,
            Op::Message => ChangeKind::Other,
        }
    }

    /// The kind of a stored operation name (a segment's `op` column, spelled by
    /// [`Op::as_str`]); a name no operation has holds no row.
    pub(crate) fn of_name(name: &str) -> ChangeKind {
        [
            Op::Insert,
            Op::Snapshot,
            Op::Update,
            Op::Delete,
            Op::Truncate,
            Op::Message,
        ]
        .into_iter()
        .find(|op| op.as_str() == name)
        .map_or(ChangeKind::Other, ChangeKind::of)
    }
}

/// How an engine holds a table's rows during a replay. Its one effect that no change carries
/// is the restart at a snapshot point; [`ApplyChange`] has the effects changes have.
pub(crate) trait RowSet {
    type Error;
    /// Every row ends at a snapshot point.
    fn restart(&mut self, at: SnapshotPoint) -> Result<(), Self::Error>;
}

/// The primitive effects the rules of [`Replay::apply`] are made of. `I` is a row image as
/// the engine sees it, `C` the change being applied (passed through, for engines that record
/// which change wrote or ended a row).
pub(crate) trait ApplyChange<I, C>: RowSet {
    /// A row begins with image `after`; with a key, it replaces any row holding that key.
    fn begin(&mut self, after: I, change: &C) -> Result<(), Self::Error>;
    /// The row image `before` shows ends (with a key, the key's row; without, one identical
    /// row).
    fn end(&mut self, before: I, change: &C) -> Result<(), Self::Error>;
    /// An update: the row `before` shows (when the change carries an old image) ends and
    /// `after` begins. An engine may do this in one step where it means the same.
    fn replace(&mut self, before: Option<I>, after: I, change: &C) -> Result<(), Self::Error> {
        if let Some(before) = before {
            self.end(before, change)?;
        }
        self.begin(after, change)
    }
    /// Every row of relation `relation_id` ends (TRUNCATE).
    fn truncate(&mut self, relation_id: u32, change: &C) -> Result<(), Self::Error>;
}

/// The replay of one table up to one moment: the rules, and where it is among the archive's
/// snapshot points.
pub(crate) struct Replay {
    until: Moment,
    resets: SnapshotResets,
}

impl Replay {
    pub(crate) fn new(archive: &ArchiveSnapshot, table: &TableHistory, until: Moment) -> Replay {
        Replay {
            until,
            resets: SnapshotResets::new(archive, table),
        }
    }

    /// Start after the point `at` of a keyframe: the snapshot points at or before it are
    /// in the keyframe's rows already, and the changes the replay is given come after it.
    pub(crate) fn resume_after(&mut self, at: Lsn) {
        self.resets.passed_where(|p| p.lsn <= at);
    }

    /// Whether the change at `key`, committed at `committed_at_us`, is within the moment.
    pub(crate) fn includes(&self, key: ChangeKey, committed_at_us: i64) -> bool {
        self.until.includes(key, committed_at_us)
    }

    /// Apply the change at `key` (the next in key order, within the moment) to `rows`. The
    /// rules, in the order they apply: a snapshot point passed since the previous change
    /// ends every row; then the change's own effect by its kind.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply<I, C, S: ApplyChange<I, C>>(
        &mut self,
        rows: &mut S,
        key: ChangeKey,
        kind: ChangeKind,
        relation_id: u32,
        before: Option<I>,
        after: Option<I>,
        change: &C,
    ) -> Result<(), S::Error> {
        if let Some(point) = self.resets.passed(key) {
            rows.restart(point)?;
        }
        match (kind, before, after) {
            (ChangeKind::Write, _, Some(after)) => rows.begin(after, change),
            (ChangeKind::Update, before, Some(after)) => rows.replace(before, after, change),
            (ChangeKind::Update | ChangeKind::Delete, Some(before), None) => {
                rows.end(before, change)
            }
            (ChangeKind::Truncate, _, _) => rows.truncate(relation_id, change),
            _ => Ok(()),
        }
    }

    /// The end of the replay: a snapshot point after the table's last change but within the
    /// moment (a table empty when re-snapshotted) ends every row too.
    pub(crate) fn finish<S: RowSet>(&mut self, rows: &mut S) -> Result<(), S::Error> {
        if let Some(point) = self.resets.passed_by(self.until) {
            rows.restart(point)?;
        }
        Ok(())
    }
}

/// One version of a row a row replay holds: its image, and the change that wrote it.
#[derive(Clone, Debug)]
pub(crate) struct OpenVersion<'t> {
    pub(crate) version: &'t RelationVersion,
    pub(crate) row: Row,
    pub(crate) from: ChangeKey,
    pub(crate) from_us: i64,
    pub(crate) op: Op,
    pub(crate) context: Option<String>,
}

/// The row versions open at a point of a row replay, by row key (several identical rows of a
/// table without a key share one). The bookkeeping of [`RowSet`] over text rows, shared by
/// the row engine of `as_of`/`diff` and by every export layout; what a caller does when a
/// version ends is its own.
#[derive(Default)]
pub(crate) struct OpenRows<'t> {
    rows: BTreeMap<RowKey, Vec<OpenVersion<'t>>>,
}

impl<'t> OpenRows<'t> {
    /// Remove and return the open version `row` (an image of `version`) shows: with a key,
    /// the key's version; without one, one identical row.
    pub(crate) fn take(&mut self, positions: &[usize], row: &Row) -> Option<OpenVersion<'t>> {
        let k = row_key(positions, row);
        let list = self.rows.get_mut(&k)?;
        let i = if positions.is_empty() {
            list.iter().position(|v| &v.row == row)?
        } else {
            0
        };
        let v = list.remove(i);
        if list.is_empty() {
            self.rows.remove(&k);
        }
        Some(v)
    }

    /// Add `v`, returning what it replaces: with a key, the versions open under that key.
    pub(crate) fn put(&mut self, positions: &[usize], v: OpenVersion<'t>) -> Vec<OpenVersion<'t>> {
        let entry = self.rows.entry(row_key(positions, &v.row)).or_default();
        let replaced = if positions.is_empty() {
            Vec::new()
        } else {
            std::mem::take(entry)
        };
        entry.push(v);
        replaced
    }

    /// Remove and return every open version of relation `relation_id`.
    pub(crate) fn take_relation(&mut self, relation_id: u32) -> Vec<OpenVersion<'t>> {
        let mut gone = Vec::new();
        self.rows.retain(|_, list| {
            let (out, kept): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|v| v.version.relation_id == relation_id);
            gone.extend(out);
            *list = kept;
            !list.is_empty()
        });
        gone
    }

    /// Remove and return every open version.
    pub(crate) fn take_all(&mut self) -> Vec<OpenVersion<'t>> {
        std::mem::take(&mut self.rows)
            .into_values()
            .flatten()
            .collect()
    }

    /// The open versions in row-key order.
    pub(crate) fn versions(&self) -> impl Iterator<Item = &OpenVersion<'t>> {
        self.rows.values().flatten()
    }

    pub(crate) fn into_map(self) -> BTreeMap<RowKey, Vec<OpenVersion<'t>>> {
        self.rows
    }
}

/// A change as the row engine applies it: the schema version it was written in and its record.
pub(crate) struct RowChange<'t, 'r> {
    pub(crate) table: &'t TableHistory,
    pub(crate) version: &'t RelationVersion,
    pub(crate) key: ChangeKey,
    pub(crate) rec: &'r ChangeRecord,
}

impl<'t> RowChange<'t, '_> {
    /// The version `row` (an image of this change) opens.
    pub(crate) fn open(&self, row: &Row) -> OpenVersion<'t> {
        OpenVersion {
            version: self.version,
            row: row.clone(),
            from: self.key,
            from_us: self.rec.committed_at_us,
            op: self.rec.op,
            context: self.rec.context.clone(),
        }
    }

    pub(crate) fn key_positions(&self) -> &'t [usize] {
        self.table.key_positions(self.version)
    }
}

/// Replay `table`'s text rows up to `until`, applying each change to `rows` by the rules.
/// Returns the schema version of the last change replayed, if any.
pub(crate) fn replay_rows<'t, S>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    until: Moment,
    rows: &mut S,
) -> Result<Option<&'t RelationVersion>>
where
    S: RowSet + for<'r> ApplyChange<&'r Row, RowChange<'t, 'r>>,
    S::Error: Into<DataFusionError>,
{
    let mut replay = Replay::new(archive, table, until);
    let mut last_version = None;
    for_each_change(archive, table, Some(until), |version, key, rec| {
        last_version = Some(version);
        let change = RowChange {
            table,
            version,
            key,
            rec,
        };
        replay
            .apply(
                rows,
                key,
                ChangeKind::of(rec.op),
                rec.relation_id,
                rec.before.as_ref(),
                rec.after.as_ref(),
                &change,
            )
            .map_err(Into::into)
    })?;
    replay.finish(rows).map_err(Into::into)?;
    Ok(last_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the effects the rules ask for, in order.
    #[derive(Default)]
    struct Effects(Vec<String>);

    impl RowSet for Effects {
        type Error = ();
        fn restart(&mut self, at: SnapshotPoint) -> Result<(), ()> {
            self.0.push(format!("restart@{}", at.lsn));
            Ok(())
        }
    }

    impl ApplyChange<&str, ()> for Effects {
        fn begin(&mut self, after: &str, _: &()) -> Result<(), ()> {
            self.0.push(format!("begin {after}"));
            Ok(())
        }
        fn end(&mut self, before: &str, _: &()) -> Result<(), ()> {
            self.0.push(format!("end {before}"));
            Ok(())
        }
        fn truncate(&mut self, relation_id: u32, _: &()) -> Result<(), ()> {
            self.0.push(format!("truncate {relation_id}"));
            Ok(())
        }
    }

    /// A row of a rewritten table keeps what identifies it: its primary key, or with no
    /// primary key the replica identity index's columns.
    #[test]
    fn unknown_values_keep_the_columns_that_identify_the_row() {
        let column = |name: &str, is_key| pgtrail_store::Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            is_key,
        };
        let version = |identity, keys: [bool; 3], primary_key: &[&str]| RelationVersion {
            relation_id: 1,
            valid_from: key(1, 0),
            schema: "public".into(),
            name: "t".into(),
            replica_identity: identity,
            columns: vec![
                column("a", keys[0]),
                column("b", keys[1]),
                column("c", keys[2]),
            ],
            primary_key: primary_key.iter().map(|k| k.to_string()).collect(),
        };
        let row: Row = ["1", "2", "3"]
            .iter()
            .map(|v| Cell::Text(v.to_string()))
            .collect();
        let kept = |v: &RelationVersion| {
            unknown_values(v, &row)
                .iter()
                .map(|c| *c != Cell::Unknown)
                .collect::<Vec<_>>()
        };
        // REPLICA IDENTITY DEFAULT: the primary key is flagged.
        assert_eq!(
            kept(&version(b'd', [true, false, false], &["a"])),
            [true, false, false]
        );
        // USING INDEX on (b, c), no primary key.
        assert_eq!(
            kept(&version(b'i', [false, true, true], &[])),
            [false, true, true]
        );
        // FULL flags every column; the primary key identifies the row.
        assert_eq!(
            kept(&version(b'f', [true, true, true], &["c"])),
            [false, false, true]
        );
    }

    fn key(lsn: u64, seq: u32) -> ChangeKey {
        ChangeKey {
            commit_lsn: Lsn(lsn),
            seq,
        }
    }

    /// Each kind of change has its one effect, and every snapshot point passed restarts the
    /// rows once, before the first change after it or at the end of the replay.
    #[test]
    fn the_rules_give_each_change_its_effect_and_restart_at_snapshot_points() {
        let snapshots = [(Lsn(100), 1), (Lsn(300), 3), (Lsn(400), 4)];
        let mut replay = Replay {
            until: Moment::Lsn(Lsn(500)),
            resets: SnapshotResets {
                points: snapshots
                    .iter()
                    .map(|&(lsn, committed_at_us)| SnapshotPoint {
                        lsn,
                        committed_at_us,
                        unknown_from: None,
                    })
                    .collect(),
                next: 0,
            },
        };
        let mut rows = Effects::default();
        let mut apply = |k: ChangeKey, kind, before: Option<&'static str>, after| {
            replay
                .apply(&mut rows, k, kind, 7, before, after, &())
                .unwrap()
        };
        apply(key(100, 0), ChangeKind::Write, None, Some("a"));
        apply(key(200, 0), ChangeKind::Update, Some("a"), Some("a'"));
        apply(key(200, 1), ChangeKind::Update, None, Some("b"));
        apply(key(200, 2), ChangeKind::Update, Some("b"), None);
        apply(key(210, 0), ChangeKind::Delete, Some("a'"), None);
        apply(key(220, 0), ChangeKind::Truncate, None, None);
        apply(key(230, 0), ChangeKind::Other, None, None);
        apply(key(300, 0), ChangeKind::Write, None, Some("c"));
        replay.finish(&mut rows).unwrap();
        assert_eq!(
            rows.0,
            [
                "restart@0/64",
                "begin a",
                "end a",
                "begin a'",
                "begin b",
                "end b",
                "end a'",
                "truncate 7",
                "restart@0/12C",
                "begin c",
                "restart@0/190",
            ]
        );
    }
}
