//! Point-in-time reconstruction: a table's rows as they were at a moment (commit time or
//! commit LSN), diffs between two moments, and the history of one row. The state is rebuilt
//! from the initial snapshot and every change up to the moment; segments that begin after the
//! moment are never opened.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, StringBuilder, StructArray, UInt32Array,
};
use datafusion::arrow::compute::kernels::boolean::{and_kleene, or_kleene};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema};
use datafusion::catalog::{MemTable, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use pgtrail_store::segment::{PgKind, SegmentContent, ValueBuilder, read_records};
use pgtrail_store::{Cell, ChangeKey, ChangeRecord, Lsn, Op, RelationVersion, Row};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::error::QueryError;
use crate::history::{
    Bounds, as_micros, constant, open_segment_projected, open_segment_pruned,
    open_segment_selected, tail_batches,
};
use crate::merge::{adapt, history_schema};
use crate::scan::image_field;

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
        match self {
            Moment::Time(t) => committed_at_us <= *t,
            Moment::Lsn(l) => key.commit_lsn <= *l,
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

/// Call `f` with every change of `table` in key order that `keep` accepts, skipping segments
/// `read_segment` rejects without opening them.
/// The schema version passed to `f` is the table's own (it lives as long as `table`).
pub fn for_each_change_where<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    row_groups: Bounds,
    read_segment: impl Fn(&pgtrail_store::SegmentEntry) -> bool,
    keep: impl Fn(ChangeKey, &ChangeRecord) -> bool,
    mut f: impl FnMut(&'t RelationVersion, ChangeKey, &ChangeRecord) -> Result<()>,
) -> Result<()> {
    let mut last = None::<ChangeKey>;
    let mut check_order = |key: ChangeKey| -> Result<()> {
        if last.is_some_and(|l| key <= l) {
            return Err(DataFusionError::Execution(format!(
                "changes of {} are not in key order at {key}; the archive is inconsistent (run the verifier)",
                table.qualified_name()
            )));
        }
        last = Some(key);
        Ok(())
    };
    for seg in &table.segments {
        if !read_segment(seg) {
            continue;
        }
        let SegmentContent::Table(rel) = &seg.content else {
            continue;
        };
        let version = table.version(rel.relation_id, rel.valid_from)?;
        for batch in open_segment_pruned(&archive.segment_path(seg), &seg.sha256, 8192, row_groups)?
        {
            let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
            for (key, rec) in read_records(&seg.content, &batch)
                .map_err(|e| DataFusionError::External(Box::new(e)))?
            {
                if keep(key, &rec) {
                    check_order(key)?;
                    f(version, key, &rec)?;
                }
            }
        }
    }
    for (key, rec) in &table.tail {
        if keep(*key, rec) {
            check_order(*key)?;
            f(
                table.version(rec.relation_id, rec.schema_version)?,
                *key,
                rec,
            )?;
        }
    }
    Ok(())
}

/// The snapshot points a replay in key order passes. A snapshot holds a table's whole state,
/// so a replay starts the table afresh at each one: after a gap and `--resnapshot`, rows the
/// new snapshot does not hold were deleted while the archive could not see, and must not
/// survive into the reconstruction.
pub(crate) struct SnapshotResets<'a> {
    points: &'a [(Lsn, i64)],
    next: usize,
}

impl<'a> SnapshotResets<'a> {
    pub(crate) fn new(archive: &'a ArchiveSnapshot) -> Self {
        SnapshotResets {
            points: &archive.snapshots,
            next: 0,
        }
    }

    /// The last snapshot point at or before `key` not passed yet, if any.
    pub(crate) fn passed(&mut self, key: ChangeKey) -> Option<(Lsn, i64)> {
        self.passed_where(|(lsn, _)| lsn <= key.commit_lsn)
    }

    /// The last snapshot point within `moment` not passed yet, if any.
    pub(crate) fn passed_by(&mut self, moment: Moment) -> Option<(Lsn, i64)> {
        self.passed_where(|(lsn, at)| match moment {
            Moment::Lsn(l) => lsn <= l,
            Moment::Time(t) => at <= t,
        })
    }

    fn passed_where(&mut self, within: impl Fn((Lsn, i64)) -> bool) -> Option<(Lsn, i64)> {
        let mut hit = None;
        while let Some(&point) = self.points.get(self.next)
            && within(point)
        {
            hit = Some(point);
            self.next += 1;
        }
        hit
    }
}

/// A row's identity: its key values, or for a table without a key the whole row.
pub(crate) type RowKey = Vec<Cell>;

/// A table's rows at a moment, each with the schema version it was written in (borrowed from
/// the table's history, not copied per row).
pub struct TableState<'t> {
    /// The schema version in force at the moment (the output columns).
    pub version: &'t RelationVersion,
    pub rows: BTreeMap<RowKey, Vec<(&'t RelationVersion, Row)>>,
}

type Rows<'t> = BTreeMap<RowKey, Vec<(&'t RelationVersion, Row)>>;

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

/// An error unless the archive holds `moment` (it begins at or before it).
fn check_begins(archive: &ArchiveSnapshot, moment: Moment) -> Result<()> {
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

/// Rebuild `table` at `moment`.
pub fn state_at<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    moment: Moment,
) -> Result<TableState<'t>> {
    check_begins(archive, moment)?;
    let mut rows: Rows<'t> = BTreeMap::new();
    let mut last_version = &table.versions[0];
    let mut resets = SnapshotResets::new(archive);
    for_each_change(archive, table, Some(moment), |version, key, rec| {
        if resets.passed(key).is_some() {
            rows.clear();
        }
        last_version = version;
        let positions = table.key_positions(version);
        let remove = |rows: &mut Rows<'t>, row: &Row| {
            let k = row_key(positions, row);
            if let Some(list) = rows.get_mut(&k) {
                // Without a key, one identical row goes; with a key, the row goes.
                let pos = list.iter().position(|(_, r)| r == row).unwrap_or(0);
                list.remove(pos);
                if list.is_empty() {
                    rows.remove(&k);
                }
            }
        };
        match rec.op {
            Op::Insert | Op::Snapshot | Op::Update => {
                if let (Op::Update, Some(before)) = (rec.op, &rec.before) {
                    remove(&mut rows, before);
                }
                if let Some(after) = &rec.after {
                    let entry = rows.entry(row_key(positions, after)).or_default();
                    if !positions.is_empty() {
                        entry.clear();
                    }
                    entry.push((version, after.clone()));
                }
            }
            Op::Delete => {
                if let Some(before) = &rec.before {
                    remove(&mut rows, before);
                }
            }
            Op::Truncate => rows.retain(|_, list| {
                list.retain(|(v, _)| v.relation_id != rec.relation_id);
                !list.is_empty()
            }),
            Op::Message => {}
        }
        Ok(())
    })?;
    // A snapshot after the table's last change (a table empty when re-snapshotted).
    if resets.passed_by(moment).is_some() {
        rows.clear();
    }
    // The schema in force: the latest version that took effect at or before the moment.
    let version = match moment {
        Moment::Lsn(l) => table
            .versions
            .iter()
            .rev()
            .find(|v| v.valid_from.commit_lsn <= l)
            .unwrap_or(last_version),
        Moment::Time(_) => last_version,
    };
    Ok(TableState { version, rows })
}

/// Typed columns of `version` for `rows`; a column with a value that does not fit its type is
/// returned as text (PostgreSQL's exact text) rather than losing the value.
fn typed_columns(
    version: &RelationVersion,
    rows: &[Option<(&RelationVersion, &Row)>],
) -> (Fields, Vec<ArrayRef>) {
    let mut fields = Vec::new();
    let mut arrays = Vec::new();
    for column in &version.columns {
        let cells: Vec<Option<&Cell>> = rows
            .iter()
            .map(|r| {
                r.and_then(|(v, row)| {
                    v.columns
                        .iter()
                        .position(|c| c.name == column.name)
                        .and_then(|i| row.get(i))
                })
            })
            .collect();
        let kind = PgKind::of(column.type_oid, column.type_modifier);
        let mut builder = ValueBuilder::new(&kind);
        let mut fits = true;
        for cell in &cells {
            match cell {
                Some(Cell::Text(t)) => {
                    if builder.append_text(t).is_err() {
                        fits = false;
                        break;
                    }
                }
                _ => builder.append_null(),
            }
        }
        if fits {
            fields.push(Field::new(&column.name, kind.arrow_type(), true));
            arrays.push(builder.finish());
        } else {
            let mut text = StringBuilder::new();
            for cell in &cells {
                text.append_option(cell.and_then(|c| c.as_text()));
            }
            fields.push(Field::new(&column.name, DataType::Utf8, true));
            arrays.push(Arc::new(text.finish()) as ArrayRef);
        }
    }
    (fields.into(), arrays)
}

/// `as_of`'s result: the columnar reconstruction where it applies, else the row replay.
pub fn as_of_batch(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    moment: Moment,
) -> Result<RecordBatch> {
    check_begins(archive, moment)?;
    match crate::columnar::as_of_batch(archive, table, moment)? {
        Some(batch) => Ok(batch),
        None => state_batch(&state_at(archive, table, moment)?),
    }
}

/// `as_of` by the row replay alone (to check the columnar path against).
#[doc(hidden)]
pub fn row_replay_as_of_batch(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    moment: Moment,
) -> Result<RecordBatch> {
    state_batch(&state_at(archive, table, moment)?)
}

fn state_batch(state: &TableState) -> Result<RecordBatch> {
    let rows: Vec<Option<(&RelationVersion, &Row)>> = state
        .rows
        .values()
        .flat_map(|list| list.iter().map(|(v, r)| Some((*v, r))))
        .collect();
    let (fields, arrays) = typed_columns(state.version, &rows);
    if fields.is_empty() {
        return Ok(RecordBatch::try_new_with_options(
            Arc::new(Schema::empty()),
            vec![],
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.len())),
        )?);
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

fn text_arg(args: &[Expr], i: usize, what: &str) -> Result<String> {
    match args.get(i).and_then(constant) {
        Some(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
        ) => Ok(s),
        Some(other) if what == "key" && !other.is_null() => Ok(other.to_string()),
        _ => Err(DataFusionError::Plan(format!(
            "argument {} ({what}) must be a constant text, e.g. 'public.orders'",
            i + 1
        ))),
    }
}

fn moment_arg(args: &[Expr], i: usize, lsn: bool) -> Result<Moment> {
    let value = args.get(i).and_then(constant);
    if lsn {
        return match value {
            Some(
                ScalarValue::Utf8(Some(s))
                | ScalarValue::Utf8View(Some(s))
                | ScalarValue::LargeUtf8(Some(s)),
            ) => s
                .parse::<Lsn>()
                .map(Moment::Lsn)
                .map_err(|e| DataFusionError::Plan(e.to_string())),
            Some(ScalarValue::Int64(Some(v))) if v >= 0 => Ok(Moment::Lsn(Lsn(v as u64))),
            Some(ScalarValue::UInt64(Some(v))) => Ok(Moment::Lsn(Lsn(v))),
            _ => Err(DataFusionError::Plan(format!(
                "argument {} must be an LSN such as '0/1A2B3C4'",
                i + 1
            ))),
        };
    }
    let value = match value {
        Some(v @ (ScalarValue::Utf8(_) | ScalarValue::Utf8View(_) | ScalarValue::LargeUtf8(_))) => {
            v.cast_to(&DataType::Timestamp(
                datafusion::arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into()),
            ))
            .ok()
        }
        v => v,
    };
    value
        .as_ref()
        .and_then(as_micros)
        .map(Moment::Time)
        .ok_or_else(|| {
            DataFusionError::Plan(format!(
                "argument {} must be a timestamp, e.g. TIMESTAMP '2026-11-20 12:00:00+00'",
                i + 1
            ))
        })
}

fn table_arg<'a>(archive: &'a ArchiveSnapshot, args: &[Expr]) -> Result<&'a TableHistory> {
    let name = text_arg(args, 0, "table name")?;
    Ok(archive.table(&name)?)
}

/// `as_of(table, timestamp)` and `as_of_lsn(table, lsn)`.
#[derive(Debug)]
pub struct AsOf {
    pub archive: Arc<ArchiveSnapshot>,
    pub by_lsn: bool,
}

impl TableFunctionImpl for AsOf {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = args.exprs();
        if args.len() != 2 {
            return Err(DataFusionError::Plan(
                "as_of(table, moment) takes two arguments".into(),
            ));
        }
        let table = table_arg(&self.archive, args)?;
        let moment = moment_arg(args, 1, self.by_lsn)?;
        let batch = as_of_batch(&self.archive, table, moment)?;
        Ok(Arc::new(MemTable::try_new(
            batch.schema(),
            vec![vec![batch]],
        )?))
    }
}

/// `diff(table, from, to)`: rows inserted, deleted and changed between two moments (timestamps
/// or LSN texts).
#[derive(Debug)]
pub struct Diff {
    pub archive: Arc<ArchiveSnapshot>,
}

fn moment_any(args: &[Expr], i: usize) -> Result<Moment> {
    match args.get(i).and_then(constant) {
        Some(ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s))) if s.contains('/') => {
            moment_arg(args, i, true)
        }
        _ => moment_arg(args, i, false),
    }
}

impl TableFunctionImpl for Diff {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = args.exprs();
        if args.len() != 3 {
            return Err(DataFusionError::Plan(
                "diff(table, from, to) takes three arguments".into(),
            ));
        }
        let table = table_arg(&self.archive, args)?;
        let (from, to) = (moment_any(args, 1)?, moment_any(args, 2)?);
        let batch = diff_batch(&self.archive, table, from, to)?;
        Ok(Arc::new(MemTable::try_new(
            batch.schema(),
            vec![vec![batch]],
        )?))
    }
}

/// `diff`'s result: the columnar reconstruction where it applies, else the row replay.
pub fn diff_batch(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    from: Moment,
    to: Moment,
) -> Result<RecordBatch> {
    check_begins(archive, from)?;
    check_begins(archive, to)?;
    match crate::columnar::diff_batch(archive, table, from, to)? {
        Some(batch) => Ok(batch),
        None => row_replay_diff_batch(archive, table, from, to),
    }
}

/// `diff` by the row replay alone (to check the columnar path against).
#[doc(hidden)]
pub fn row_replay_diff_batch(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    from: Moment,
    to: Moment,
) -> Result<RecordBatch> {
    {
        let a = state_at(archive, table, from)?;
        let b = state_at(archive, table, to)?;
        let mut change = StringBuilder::new();
        let mut key_text = StringBuilder::new();
        let (mut before_rows, mut after_rows) = (Vec::new(), Vec::new());
        let keys: std::collections::BTreeSet<&RowKey> =
            a.rows.keys().chain(b.rows.keys()).collect();
        for k in keys {
            let (old, new) = (a.rows.get(k), b.rows.get(k));
            let label = match (old, new) {
                (Some(o), Some(n)) if o.iter().map(|(_, r)| r).eq(n.iter().map(|(_, r)| r)) => {
                    continue;
                }
                (Some(_), Some(_)) => "update",
                (Some(_), None) => "delete",
                (None, Some(_)) => "insert",
                (None, None) => continue,
            };
            change.append_value(label);
            key_text.append_value(
                k.iter()
                    .map(|c| c.as_text().unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join("|"),
            );
            before_rows.push(old.and_then(|l| l.first()).map(|(v, r)| (*v, r)));
            after_rows.push(new.and_then(|l| l.first()).map(|(v, r)| (*v, r)));
        }
        let image = |rows: &[Option<(&RelationVersion, &Row)>]| -> Result<(Field, ArrayRef)> {
            let (fields, arrays) = typed_columns(b.version, rows);
            let nulls: Vec<bool> = rows.iter().map(Option::is_some).collect();
            let array = StructArray::try_new(fields.clone(), arrays, Some(nulls.into()))?;
            Ok((
                Field::new("x", DataType::Struct(fields), true),
                Arc::new(array) as ArrayRef,
            ))
        };
        let (bf, ba) = image(&before_rows)?;
        let (af, aa) = image(&after_rows)?;
        let schema = Arc::new(Schema::new(vec![
            Field::new("change", DataType::Utf8, false),
            Field::new("key", DataType::Utf8, false),
            bf.with_name("before"),
            af.with_name("after"),
        ]));
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(change.finish()),
                Arc::new(key_text.finish()),
                ba,
                aa,
            ],
        )?)
    }
}

/// `row_history` read in two passes over each segment: the key fields of every change's
/// `before` and `after`, then every column of the changes whose key equals the values (read
/// to the key columns' types), and only of those (Parquet row selection). It applies when every
/// schema version has the same primary key and each value reads as its column's type (else
/// `None`: the row scan compares PostgreSQL's text). The changes come out in key order.
fn row_history_columnar(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    wanted: &[String],
) -> Result<Option<Vec<RecordBatch>>> {
    let key = &table.latest().primary_key;
    if key.is_empty()
        || key.len() != wanted.len()
        || table.versions.iter().any(|v| &v.primary_key != key)
    {
        return Ok(None);
    }
    let schema = history_schema(&table.versions);
    let Ok(after_field) = schema.field_with_name("after") else {
        return Ok(None);
    };
    let DataType::Struct(row_fields) = after_field.data_type() else {
        return Ok(None);
    };
    let mut values: Vec<(&str, DataType, ScalarValue)> = Vec::new();
    for (name, text) in key.iter().zip(wanted) {
        let Some(field) = row_fields.iter().find(|f| f.name() == name) else {
            return Ok(None);
        };
        let Ok(value) = ScalarValue::Utf8(Some(text.clone())).cast_to(field.data_type()) else {
            return Ok(None);
        };
        if value.is_null() {
            return Ok(None);
        }
        values.push((name, field.data_type().clone(), value));
    }
    // Rows of `batch` (written under `version`; `None`: the log tail, in the history schema)
    // whose `before` or `after` has the key.
    let matching = |batch: &RecordBatch, version: Option<&RelationVersion>| -> Result<Vec<usize>> {
        let mut any: Option<BooleanArray> = None;
        for image in ["before", "after"] {
            let mut all: Option<BooleanArray> = None;
            for (name, data_type, value) in &values {
                let field = image_field(batch, version, image, name, data_type)?;
                let equal = eq(&field, &value.to_scalar()?)?;
                all = Some(match all {
                    None => equal,
                    Some(a) => and_kleene(&a, &equal)?,
                });
            }
            if let Some(all) = all {
                any = Some(match any {
                    None => all,
                    Some(a) => or_kleene(&a, &all)?,
                });
            }
        }
        // Kleene logic: an absent image (null) does not hide a match of the other; alone, a
        // null is no match.
        Ok(any
            .map(|m| {
                (0..m.len())
                    .filter(|&i| m.is_valid(i) && m.value(i))
                    .collect()
            })
            .unwrap_or_default())
    };
    let key_columns: Vec<Vec<String>> = ["before", "after"]
        .iter()
        .flat_map(|image| key.iter().map(move |k| vec![image.to_string(), k.clone()]))
        .collect();
    let mut out = Vec::new();
    for seg in &table.segments {
        let SegmentContent::Table(version) = &seg.content else {
            continue;
        };
        let path = archive.segment_path(seg);
        let mut rows = Vec::new();
        let mut first = 0;
        for batch in open_segment_projected(
            &path,
            &seg.sha256,
            8192,
            Bounds::default(),
            Some(&key_columns),
        )? {
            let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
            rows.extend(
                matching(&batch, Some(version))?
                    .into_iter()
                    .map(|r| first + r),
            );
            first += batch.num_rows();
        }
        if rows.is_empty() {
            continue;
        }
        let mut found = 0;
        for batch in open_segment_selected(
            &path,
            &seg.sha256,
            8192,
            Bounds::default(),
            None,
            Some(&rows),
        )? {
            let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
            found += batch.num_rows();
            out.push(adapt(&batch, version, &schema)?);
        }
        if found != rows.len() {
            return Err(DataFusionError::Execution(format!(
                "segment {} changed between two reads",
                seg.file_name
            )));
        }
    }
    for batch in tail_batches(table, &table.tail, &schema)? {
        let rows = matching(&batch, None)?;
        if !rows.is_empty() {
            out.push(take_record_batch(
                &batch,
                &UInt32Array::from_iter_values(rows.iter().map(|&r| r as u32)),
            )?);
        }
    }
    Ok(Some(out))
}

/// `row_history(table, key...)`: every change of one row (by its primary key values), with
/// the history table's columns.
#[derive(Debug)]
pub struct RowHistory {
    pub archive: Arc<ArchiveSnapshot>,
}

impl TableFunctionImpl for RowHistory {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = args.exprs();
        if args.len() < 2 {
            return Err(DataFusionError::Plan(
                "row_history(table, key value, ...) takes the table and its key values".into(),
            ));
        }
        let table = table_arg(&self.archive, args)?;
        let wanted: Vec<String> = (1..args.len())
            .map(|i| text_arg(args, i, "key"))
            .collect::<Result<_>>()?;
        let schema = history_schema(&table.versions);
        let batches = match row_history_columnar(&self.archive, table, &wanted)? {
            Some(batches) => batches,
            None => row_replay_row_history(&self.archive, table, &wanted)?,
        };
        Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
    }
}

/// `row_history` by scanning every change as text rows (to check the view against, and for
/// the tables the view does not cover).
#[doc(hidden)]
pub fn row_replay_row_history(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    wanted: &[String],
) -> Result<Vec<RecordBatch>> {
    {
        let schema = history_schema(&table.versions);
        let mut picked: Vec<(ChangeKey, ChangeRecord)> = Vec::new();
        for_each_change(archive, table, None, |version, key, rec| {
            let positions = table.key_positions(version);
            let matches = |row: &Option<Row>| {
                row.as_ref().is_some_and(|r| {
                    positions.len() == wanted.len()
                        && positions
                            .iter()
                            .zip(wanted)
                            .all(|(&p, w)| r.get(p).and_then(|c| c.as_text()) == Some(w.as_str()))
                })
            };
            if matches(&rec.before) || matches(&rec.after) {
                picked.push((key, rec.clone()));
            }
            Ok(())
        })?;
        tail_batches(table, &picked, &schema)
    }
}
