//! Point-in-time reconstruction: a table's rows as they were at a moment (commit time or
//! commit LSN), diffs between two moments, and the history of one row. The state is rebuilt
//! from the initial snapshot and every change up to the moment; segments that begin after the
//! moment are never opened.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, StringBuilder, StructArray,
    UInt32Array,
};
use datafusion::arrow::compute::kernels::boolean::{and_kleene, or_kleene};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::{take, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, UInt32Type, UInt64Type};
use datafusion::catalog::{MemTable, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, col};
use pgtrail_store::segment::key_copy;
use pgtrail_store::segment::key_index::{self, KeyIndexProblem, KeyPart};
use pgtrail_store::segment::{PgKind, SegmentContent, ValueBuilder, segment_schema};
use pgtrail_store::{Cell, ChangeKey, ChangeRecord, Lsn, RelationVersion, Row, SegmentEntry};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::columnar::same_rows;
use crate::json::{JsonColumns, relabel_batch};
use crate::merge::{adapt, history_schema};
use crate::read::{
    Bounds, as_micros, constant, open_segment_projected, open_segment_selected, tail_batches,
};
use crate::replay::{
    ApplyChange, Moment, OpenRows, RowChange, RowKey, RowSet, SnapshotPoint, check_begins,
    for_each_change, replay_rows,
};
use crate::scan::image_field;

/// A table's rows at a moment, each with the schema version it was written in (borrowed from
/// the table's history, not copied per row).
pub struct TableState<'t> {
    /// The schema version in force at the moment (the output columns).
    pub version: &'t RelationVersion,
    pub rows: BTreeMap<RowKey, Vec<(&'t RelationVersion, Row)>>,
}

/// The row engine's rows for `as_of` and `diff`: the open versions, nothing recorded as
/// they end.
#[derive(Default)]
struct StateRows<'t>(OpenRows<'t>);

impl RowSet for StateRows<'_> {
    type Error = DataFusionError;

    fn restart(&mut self, _: SnapshotPoint) -> Result<()> {
        self.0.take_all();
        Ok(())
    }
}

impl<'t, 'r> ApplyChange<&'r Row, RowChange<'t, 'r>> for StateRows<'t> {
    fn begin(&mut self, after: &'r Row, change: &RowChange<'t, 'r>) -> Result<()> {
        self.0.put(change.key_positions(), change.open(after));
        Ok(())
    }

    fn end(&mut self, before: &'r Row, change: &RowChange<'t, 'r>) -> Result<()> {
        self.0.take(change.key_positions(), before);
        Ok(())
    }

    fn truncate(&mut self, relation_id: u32, _: &RowChange<'t, 'r>) -> Result<()> {
        self.0.take_relation(relation_id);
        Ok(())
    }
}

/// Rebuild `table` at `moment` (the row engine: every change as text rows).
pub fn state_at<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    moment: Moment,
) -> Result<TableState<'t>> {
    check_begins(archive, table, moment)?;
    let mut rows = StateRows::default();
    let last_version =
        replay_rows(archive, table, moment, &mut rows)?.unwrap_or(&table.versions[0]);
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
    let rows = rows
        .0
        .into_map()
        .into_iter()
        .map(|(k, list)| (k, list.into_iter().map(|v| (v.version, v.row)).collect()))
        .collect();
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
    check_begins(archive, table, moment)?;
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

/// The table argument, by the name in force at `moment`.
fn table_arg_at<'a>(
    archive: &'a ArchiveSnapshot,
    args: &[Expr],
    moment: Moment,
) -> Result<&'a TableHistory> {
    let name = text_arg(args, 0, "table name")?;
    archive.table_at(&name, moment)
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
        let moment = moment_arg(args, 1, self.by_lsn)?;
        let table = table_arg_at(&self.archive, args, moment)?;
        let batch = as_of_batch(&self.archive, table, moment)?;
        let batch = JsonColumns::of(&table.versions).batch(&batch, false)?;
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
        let (from, to) = (moment_any(args, 1)?, moment_any(args, 2)?);
        // The name in force at the later moment.
        let table = table_arg_at(&self.archive, args, to)?;
        let batch = diff_batch(&self.archive, table, from, to)?;
        let batch = JsonColumns::of(&table.versions).batch(&batch, true)?;
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
    check_begins(archive, table, from)?;
    check_begins(archive, table, to)?;
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
    let a = state_at(archive, table, from)?;
    let b = state_at(archive, table, to)?;
    let (mut labels, mut keys) = (Vec::new(), Vec::new());
    let (mut before_rows, mut after_rows) = (Vec::new(), Vec::new());
    let all_keys: std::collections::BTreeSet<&RowKey> =
        a.rows.keys().chain(b.rows.keys()).collect();
    for k in all_keys {
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
        labels.push(label);
        keys.push(
            k.iter()
                .map(|c| c.as_text().unwrap_or("NULL"))
                .collect::<Vec<_>>()
                .join("|"),
        );
        before_rows.push(old.and_then(|l| l.first()).map(|(v, r)| (*v, r)));
        after_rows.push(new.and_then(|l| l.first()).map(|(v, r)| (*v, r)));
    }
    // Both sides typed together (a column holding a value its type cannot is text on both),
    // so that an update's two images can be compared by value: a row read back from a
    // segment is rendered from its typed value, and may spell it differently from the
    // PostgreSQL text a log-tail image holds (`0 mons 55 days` for `55 days`), yet it is the
    // same row. An unknown value is never taken as equal to anything.
    let n = labels.len();
    let rows: Vec<Option<(&RelationVersion, &Row)>> =
        before_rows.iter().chain(&after_rows).copied().collect();
    let (fields, arrays) = typed_columns(b.version, &rows);
    let nulls: Vec<bool> = rows.iter().map(Option::is_some).collect();
    let images = StructArray::try_new(fields.clone(), arrays, Some(nulls.into()))?;
    let same = same_rows(&images)?;
    let has_unknown = |row: Option<(&RelationVersion, &Row)>| {
        row.is_some_and(|(_, r)| r.iter().any(|c| matches!(c, Cell::Unknown)))
    };
    let keep: Vec<u32> = (0..n)
        .filter(|&i| {
            labels[i] != "update"
                || !same(i, n + i)
                || has_unknown(before_rows[i])
                || has_unknown(after_rows[i])
        })
        .map(|i| i as u32)
        .collect();
    let side = |offset: u32| -> Result<ArrayRef> {
        let indices = UInt32Array::from_iter_values(keep.iter().map(|i| i + offset));
        Ok(take(&images, &indices, None)?)
    };
    let image_type = DataType::Struct(fields);
    let schema = Arc::new(Schema::new(vec![
        Field::new("change", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("before", image_type.clone(), true),
        Field::new("after", image_type, true),
    ]));
    let pick = |texts: &[&str]| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            keep.iter().map(|&i| texts[i as usize]),
        ))
    };
    let key_texts: Vec<&str> = keys.iter().map(String::as_str).collect();
    Ok(RecordBatch::try_new(
        schema,
        vec![pick(&labels), pick(&key_texts), side(0)?, side(n as u32)?],
    )?)
}

/// `row_history` read in two passes over each segment: the key fields of every change's
/// `before` and `after`, then every column of the changes whose key equals the values (read
/// to the key columns' types), and only of those (Parquet row selection). It applies when every
/// schema version has the same primary key and each value reads as its column's type (else
/// `None`: the row scan compares PostgreSQL's text). The changes come out segment by segment
/// in the table's segment order, each segment's in its row order, then the log tail's: change
/// order when the segments do not overlap, which `RowHistory` checks before declaring it.
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
    // One segment's changes with the key, in the history schema.
    let read_segment = |seg: &SegmentEntry| -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        let SegmentContent::Table(version) = &seg.content else {
            return Ok(out);
        };
        let path = archive.segment_path(seg);
        // The key index names the rows that may hold the key (its hash); they are read and
        // compared with the key below like the scan's. Without a usable index, the key fields
        // of every change are read to find them.
        let indexed = match indexed_rows(&path, &seg.sha256, version, &values) {
            Ok(found) => found,
            Err(problem) => {
                if let KeyIndexProblem::Invalid { .. } = problem {
                    tracing::warn!(%problem, "reading the segment's keys instead of its key index");
                }
                None
            }
        };
        // Every column of the segment's rows at `rows`.
        let open_rows = |rows: &[usize]| {
            open_segment_selected(
                &path,
                &seg.sha256,
                8192,
                Bounds::default(),
                None,
                Some(rows),
            )
        };
        let (rows, reader) = match indexed {
            Some(found) if found.rows.is_empty() => return Ok(out),
            Some(found) => match key_ordered_rows(&path, &found) {
                // The key's changes side by side in the key-ordered copy.
                Some((copy, rows)) => (rows, copy),
                None => {
                    let rows: Vec<usize> = found.rows.iter().map(|&r| r as usize).collect();
                    let reader = open_rows(&rows)?;
                    (rows, reader)
                }
            },
            None => {
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
                    return Ok(out);
                }
                let reader = open_rows(&rows)?;
                (rows, reader)
            }
        };
        let mut found = 0;
        for batch in reader {
            let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
            found += batch.num_rows();
            // Rows found through the index may share only the key's hash.
            let keep = matching(&batch, Some(version))?;
            if keep.len() == batch.num_rows() {
                out.push(adapt(&batch, version, &schema)?);
            } else if !keep.is_empty() {
                let keep = UInt32Array::from_iter_values(keep.iter().map(|&r| r as u32));
                out.push(adapt(&take_record_batch(&batch, &keep)?, version, &schema)?);
            }
        }
        if found != rows.len() {
            return Err(DataFusionError::Execution(format!(
                "segment {} changed between two reads",
                seg.file_name
            )));
        }
        Ok(out)
    };
    // The segments are read as many at a time as there are cores: each read is a few pages
    // of every column (decompression, most of a request's time), and segments are
    // independent. Their changes are put together in the segments' order.
    let width = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::new();
    for group in table.segments.chunks(width) {
        let read: Vec<Result<Vec<RecordBatch>>> = match group {
            [only] => vec![read_segment(only)],
            _ => std::thread::scope(|scope| {
                let reading: Vec<_> = group
                    .iter()
                    .map(|seg| scope.spawn(|| read_segment(seg)))
                    .collect();
                reading
                    .into_iter()
                    .map(|r| {
                        r.join().unwrap_or_else(|_| {
                            Err(DataFusionError::Internal(
                                "reading a segment for row_history panicked".into(),
                            ))
                        })
                    })
                    .collect()
            }),
        };
        for batches in read {
            out.extend(batches?);
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

/// What the key index of a segment (written under `version`) gives for the key `values` (in
/// the history's types), or `Ok(None)` when the index cannot answer for this segment: a key
/// column stored in a type whose hash differs from the history type's.
fn indexed_rows(
    path: &std::path::Path,
    sha256: &str,
    version: &RelationVersion,
    values: &[(&str, DataType, ScalarValue)],
) -> std::result::Result<Option<key_index::KeyLookup>, KeyIndexProblem> {
    let stored = segment_schema(&SegmentContent::Table(version.clone()));
    let Ok(DataType::Struct(fields)) = stored.field_with_name("after").map(|f| f.data_type())
    else {
        return Ok(None);
    };
    let mut parts = Vec::with_capacity(values.len());
    for (name, data_type, value) in values {
        let Some((_, field)) = fields.find(name) else {
            return Ok(None);
        };
        if !key_index::same_hash_family(field.data_type(), data_type) {
            return Ok(None);
        }
        parts.push(match value {
            ScalarValue::Int16(Some(v)) => KeyPart::Int((*v).into()),
            ScalarValue::Int32(Some(v)) => KeyPart::Int((*v).into()),
            ScalarValue::Int64(Some(v)) => KeyPart::Int(*v),
            ScalarValue::Utf8(Some(v)) => KeyPart::Text(v),
            ScalarValue::FixedSizeBinary(16, Some(v)) => KeyPart::Uuid(v),
            _ => return Ok(None),
        });
    }
    key_index::lookup(path, sha256, key_index::key_hash(&parts)).map(Some)
}

/// The key-ordered copy of the segment at `segment_path` opened at the rows of `found` (and
/// those rows), if its key index names one and the file is the one it names; otherwise
/// `None` (a copy not written yet, or damaged: reported) and the segment is read.
fn key_ordered_rows(
    segment_path: &std::path::Path,
    found: &key_index::KeyLookup,
) -> Option<(pgtrail_store::segment::SegmentReader, Vec<usize>)> {
    let copy_sha256 = found.copy_sha256.as_deref()?;
    let mut name = segment_path.as_os_str().to_owned();
    name.push(key_copy::KEY_COPY_SUFFIX);
    let copy = std::path::PathBuf::from(name);
    let rows: Vec<usize> = (found.entries.start as usize..found.entries.end as usize).collect();
    match open_segment_selected(
        &copy,
        copy_sha256,
        8192,
        Bounds::default(),
        None,
        Some(&rows),
    ) {
        Ok(reader) => Some((reader, rows)),
        Err(problem) => {
            tracing::warn!(
                %problem,
                "reading the segment instead of its key-ordered copy (`pgtrail compact` writes the copy again)"
            );
            None
        }
    }
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
        let json = JsonColumns::of(&table.versions);
        let schema = json.schema(&history_schema(&table.versions), true);
        let batches = match row_history_columnar(&self.archive, table, &wanted)? {
            Some(batches) => batches,
            None => row_replay_row_history(&self.archive, table, &wanted)?,
        };
        let batches = batches
            .iter()
            .map(|b| relabel_batch(b, schema.clone()))
            .collect::<Result<Vec<_>>>()?;
        // Declared only when checked: then `ORDER BY lsn, seq` (how a history is read) sorts
        // nothing (the sort was a fifth of a request's time).
        let ordered = in_change_order(&batches);
        let table = MemTable::try_new(schema, vec![batches])?;
        Ok(Arc::new(if ordered {
            table.with_sort_order(vec![vec![
                col("lsn").sort(true, false),
                col("seq").sort(true, false),
            ]])
        } else {
            table
        }))
    }
}

/// Whether `batches` hold their changes in `(lsn, seq)` order, strictly rising.
fn in_change_order(batches: &[RecordBatch]) -> bool {
    let mut last: Option<(u64, u32)> = None;
    for batch in batches {
        let (Some(lsn), Some(seq)) = (
            batch
                .column_by_name("lsn")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>()),
            batch
                .column_by_name("seq")
                .and_then(|c| c.as_primitive_opt::<UInt32Type>()),
        ) else {
            return false;
        };
        if lsn.null_count() > 0 || seq.null_count() > 0 {
            return false;
        }
        for key in lsn
            .values()
            .iter()
            .copied()
            .zip(seq.values().iter().copied())
        {
            if last.is_some_and(|last| last >= key) {
                return false;
            }
            last = Some(key);
        }
    }
    true
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::UInt64Array;

    fn positions(lsn: &[u64], seq: &[u32]) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("lsn", Arc::new(UInt64Array::from(lsn.to_vec())) as ArrayRef),
            ("seq", Arc::new(UInt32Array::from(seq.to_vec())) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn change_order_is_declared_only_when_it_holds() {
        let rising = [positions(&[1, 1, 2], &[0, 1, 0]), positions(&[3], &[0])];
        assert!(in_change_order(&rising));
        assert!(in_change_order(&[]));
        // A change twice, a batch behind the one before it, a step back within a batch.
        assert!(!in_change_order(&[positions(&[1, 1], &[0, 0])]));
        assert!(!in_change_order(&[
            positions(&[5], &[0]),
            positions(&[4], &[9])
        ]));
        assert!(!in_change_order(&[positions(&[2, 1], &[0, 5])]));
        // Positions it cannot read are not declared.
        let text = RecordBatch::try_from_iter([(
            "lsn",
            Arc::new(StringArray::from(vec!["0/1"])) as ArrayRef,
        )])
        .unwrap();
        assert!(!in_change_order(&[text]));
    }
}
