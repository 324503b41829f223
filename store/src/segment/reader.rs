//! Reading a segment back: check its SHA-256 against the manifest, then stream its batches.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, ListArray, MapArray, PrimitiveArray, RecordBatch, StructArray,
};
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, DataType, SchemaRef, TimestampMicrosecondType, UInt32Type, UInt64Type,
};
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use datafusion::parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, RowGroupMetaData};
use datafusion::parquet::file::page_index::column_index::ColumnIndexMetaData;
use datafusion::parquet::file::reader::{ChunkReader, Length};
use datafusion::parquet::file::statistics::Statistics;
use sha2::{Digest, Sha256};

use super::types::{PgKind, render};
use super::writer::hex;
use super::{SEGMENT_FORMAT_VERSION, SEGMENT_METADATA_KEY, SegmentContent};
use crate::change::{Cell, ChangeRecord, LogicalMessage, Op, Row};
use crate::error::SegmentError;
use crate::lsn::{ChangeKey, Lsn};

/// Check the file at `path` against `expected` (hex SHA-256).
pub(crate) fn check_sha256(path: &Path, expected: &str) -> Result<(), SegmentError> {
    let found = sha256_file(path)?;
    if found != expected {
        return Err(SegmentError::Checksum {
            path: path.to_path_buf(),
            expected: expected.into(),
            found,
        });
    }
    Ok(())
}

/// The SHA-256 (hex) of a file, read in a streaming fashion.
pub fn sha256_file(path: &Path) -> Result<String, SegmentError> {
    let io = |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Run `f`, turning a panic inside it into an error naming the file. Parquet's and Arrow's
/// readers panic on some malformed files (arrow-ipc on an impossible integer width in the
/// embedded schema, found by the segment reader's fuzz target); a damaged segment must be an
/// error that names it, never a crash of the process reading it.
fn contained<T>(
    path: &Path,
    what: &str,
    f: impl FnOnce() -> Result<T, SegmentError>,
) -> Result<T, SegmentError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic in the Parquet reader");
        Err(SegmentError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{what} failed on malformed data: {detail}"),
        })
    })
}

/// What of a segment to read: row-group ranges, columns, rows.
struct ReadBounds<'a> {
    lsn: (u64, u64),
    committed_at: (i64, i64),
    columns: Option<&'a [Vec<String>]>,
    rows: Option<&'a [usize]>,
    /// Only this row group (of those `lsn` and `committed_at` keep).
    row_group: Option<usize>,
}

/// The segment's description and Arrow schema from its footer, checked: a pgtrail segment of a
/// format version this code reads, whose columns are those its description implies.
fn checked_description(
    path: &Path,
    metadata: &ArrowReaderMetadata,
) -> Result<(SegmentContent, SchemaRef), SegmentError> {
    let corrupt = |reason: String| SegmentError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let description = metadata
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == SEGMENT_METADATA_KEY))
        .and_then(|kv| kv.value.as_deref())
        .ok_or_else(|| {
            corrupt(format!(
                "no {SEGMENT_METADATA_KEY} metadata: not a pgtrail segment"
            ))
        })?;
    let description: Description = serde_json::from_str(description)
        .map_err(|e| corrupt(format!("unreadable {SEGMENT_METADATA_KEY} metadata: {e}")))?;
    // Every version up to this code's is read (there is one so far); a newer one is refused,
    // naming both, rather than misread.
    if description.format_version > SEGMENT_FORMAT_VERSION {
        return Err(SegmentError::FormatVersion {
            path: path.to_path_buf(),
            found: description.format_version,
            supported: SEGMENT_FORMAT_VERSION,
        });
    }
    if description.format_version == 0 {
        return Err(corrupt("segment format version 0 does not exist".into()));
    }
    let schema = metadata.schema().clone();
    // Every later read takes the columns to be of the types the description implies; a file
    // whose columns differ (damaged, or crafted) is refused here rather than panic there
    // (found by the segment reader's fuzz target).
    let expected = super::segment_schema(&description.content);
    let same = schema.fields().len() == expected.fields().len()
        && schema
            .fields()
            .iter()
            .zip(expected.fields())
            .all(|(found, want)| {
                found.name() == want.name() && found.data_type().equals_datatype(want.data_type())
            });
    if !same {
        return Err(corrupt(
            "its columns do not match the table its metadata describes".into(),
        ));
    }
    Ok((description.content, schema))
}

/// The row groups a read of `bounds` takes, in file order, and its rows renumbered across them.
struct ChosenRowGroups {
    groups: Vec<usize>,
    selection: Option<RowSelection>,
}

impl ChosenRowGroups {
    /// The row groups whose `lsn` and `committed_at` statistics overlap the bounds (only
    /// `row_group` if given) and, with `rows`, only those holding one of them. A row group in
    /// the read costs a page reader, a decompression context and its pages' locations for
    /// every column even when all its rows are skipped (with 18 row groups of 23 columns, 414
    /// of them for one key's few rows; the contexts alone were a third of a `row_history`
    /// request's time). The segment reader and its read ahead both take this one list, so
    /// they cannot disagree on which row groups a row's number falls in.
    fn new(metadata: &ParquetMetaData, bounds: &ReadBounds<'_>) -> Self {
        let (lsn, committed_at) = (bounds.lsn, bounds.committed_at);
        let kept = metadata
            .row_groups()
            .iter()
            .enumerate()
            .filter(|(_, rg)| {
                let range = group_range(rg);
                let lsn_ok = range.lsn.is_none_or(|(lo, hi)| hi >= lsn.0 && lo <= lsn.1);
                let time_ok = range
                    .committed_at
                    .is_none_or(|(lo, hi)| hi >= committed_at.0 && lo <= committed_at.1);
                lsn_ok && time_ok
            })
            .map(|(i, _)| i)
            .filter(|i| bounds.row_group.is_none_or(|only| only == *i));
        let Some(rows) = bounds.rows else {
            return ChosenRowGroups {
                groups: kept.collect(),
                selection: None,
            };
        };
        // `rows` are numbered across the row groups kept; they are renumbered across those
        // left, as the reader numbers them.
        let mut groups = Vec::new();
        let mut renumbered = Vec::with_capacity(rows.len());
        let (mut start, mut next, mut chosen_rows) = (0usize, 0usize, 0usize);
        for group in kept {
            let len = metadata.row_group(group).num_rows().max(0) as usize;
            let end = start + len;
            let first = next;
            while next < rows.len() && rows[next] < end {
                next += 1;
            }
            if next > first {
                renumbered.extend(rows[first..next].iter().map(|r| r - start + chosen_rows));
                groups.push(group);
                chosen_rows += len;
            }
            start = end;
        }
        ChosenRowGroups {
            groups,
            selection: Some(row_selection(&renumbered, chosen_rows)),
        }
    }
}

/// The selection of `rows` (sorted, distinct) out of `total`: runs of selected rows and the
/// gaps between them. Rows past `total` are left out (the caller's numbering was wrong; the
/// read then yields fewer rows, which the caller checks).
fn row_selection(rows: &[usize], total: usize) -> RowSelection {
    let mut selectors = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while i < rows.len() && rows[i] < total {
        let start = rows[i];
        let mut end = start + 1;
        i += 1;
        while i < rows.len() && rows[i] == end && end < total {
            end += 1;
            i += 1;
        }
        if start > at {
            selectors.push(RowSelector::skip(start - at));
        }
        selectors.push(RowSelector::select(end - start));
        at = end;
    }
    if total > at {
        selectors.push(RowSelector::skip(total - at));
    }
    selectors.into()
}

/// An opened, verified segment.
pub struct SegmentReader {
    path: PathBuf,
    content: SegmentContent,
    schema: SchemaRef,
    reader: ParquetRecordBatchReader,
}

#[derive(serde::Deserialize)]
struct Description {
    format_version: u32,
    content: SegmentContent,
}

impl SegmentReader {
    /// Open `path`; with `expected_sha256`, refuse a file whose bytes differ from what the
    /// manifest recorded (a flipped bit, a truncated copy, a swapped file).
    pub fn open(
        path: &Path,
        expected_sha256: Option<&str>,
        batch_rows: usize,
    ) -> Result<SegmentReader, SegmentError> {
        Self::open_pruned(
            path,
            expected_sha256,
            batch_rows,
            (0, u64::MAX),
            (i64::MIN, i64::MAX),
        )
    }

    /// Like [`open`](Self::open), reading only the row groups whose `lsn` and `committed_at`
    /// statistics overlap the given inclusive ranges (the rest is skipped unread).
    pub fn open_pruned(
        path: &Path,
        expected_sha256: Option<&str>,
        batch_rows: usize,
        lsn: (u64, u64),
        committed_at: (i64, i64),
    ) -> Result<SegmentReader, SegmentError> {
        Self::open_selected(
            path,
            expected_sha256,
            batch_rows,
            lsn,
            committed_at,
            None,
            None,
        )
    }

    /// Like [`open_pruned`](Self::open_pruned), decoding only the columns under the paths in
    /// `columns` (`["lsn"]`, `["after"]`, `["before", "id"]`: a struct keeps only the children
    /// asked for; columns not asked for are never read from disk nor decompressed), and only
    /// the rows at `rows` (sorted, distinct; numbered across the row groups that `lsn` and
    /// `committed_at` keep, as an unselected read of the same ranges yields them: the values
    /// of other rows are skipped without being decoded into arrays).
    pub fn open_selected(
        path: &Path,
        expected_sha256: Option<&str>,
        batch_rows: usize,
        lsn: (u64, u64),
        committed_at: (i64, i64),
        columns: Option<&[Vec<String>]>,
        rows: Option<&[usize]>,
    ) -> Result<SegmentReader, SegmentError> {
        let bounds = ReadBounds {
            lsn,
            committed_at,
            columns,
            rows,
            row_group: None,
        };
        Self::open_bounded(path, expected_sha256, batch_rows, bounds)
    }

    fn open_file(
        path: &Path,
        file: File,
        batch_rows: usize,
        bounds: ReadBounds<'_>,
    ) -> Result<SegmentReader, SegmentError> {
        let parquet_error = |source| SegmentError::Parquet {
            path: path.to_path_buf(),
            source,
        };
        let metadata = if bounds.rows.is_some() {
            // A read of a few rows (one key's, from its key-ordered copy) is asked again and
            // again of the same file; its footer with every page's location is parsed once.
            footer_cache::load(path, &file)
        } else {
            // A read of every row decodes every page: it needs no page locations (a row
            // selection's read has them, from the cache, to skip pages unread).
            let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Skip);
            ArrowReaderMetadata::load(&file, options)
        }
        .map_err(parquet_error)?;
        let (content, schema) = checked_description(path, &metadata)?;
        let chosen = ChosenRowGroups::new(metadata.metadata(), &bounds);
        // The read ahead spans every column of its row groups: for a read of some columns
        // only (a replay's key columns) it would fetch the others too, so it has none.
        let ahead = match (bounds.rows, bounds.columns) {
            (Some(_), None) => chosen.groups.as_slice(),
            _ => &[],
        };
        let file =
            SpanReader::new(file, metadata.metadata().row_groups(), ahead).map_err(|source| {
                SegmentError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        let mut builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata);
        if let Some(columns) = bounds.columns {
            let descr = builder.parquet_schema();
            let leaves: Vec<usize> = (0..descr.num_columns())
                .filter(|&i| {
                    let parts = descr.column(i).path().parts().to_vec();
                    columns.iter().any(|want| {
                        want.len() <= parts.len() && want.iter().zip(&parts).all(|(a, b)| a == b)
                    })
                })
                .collect();
            let mask = ProjectionMask::leaves(descr, leaves);
            builder = builder.with_projection(mask);
        }
        if let Some(selection) = chosen.selection {
            builder = builder.with_row_selection(selection);
        }
        let reader = builder
            .with_row_groups(chosen.groups)
            .with_batch_size(batch_rows.max(1))
            .build()
            .map_err(|source| SegmentError::Parquet {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(SegmentReader {
            path: path.to_path_buf(),
            content,
            schema,
            reader,
        })
    }

    /// Like [`open_selected`](Self::open_selected) with no bounds, reading only the rows at
    /// `rows` of row group `row_group` (numbered as [`row_group_ranges`] lists them; rows
    /// numbered within it, as [`row_group_spans`] numbers them): other rows' pages are
    /// skipped unread.
    pub fn open_row_group_rows(
        path: &Path,
        expected_sha256: Option<&str>,
        batch_rows: usize,
        row_group: usize,
        rows: std::ops::Range<usize>,
        columns: Option<&[Vec<String>]>,
    ) -> Result<SegmentReader, SegmentError> {
        let rows: Vec<usize> = rows.collect();
        let bounds = ReadBounds {
            lsn: (0, u64::MAX),
            committed_at: (i64::MIN, i64::MAX),
            columns,
            rows: Some(&rows),
            row_group: Some(row_group),
        };
        Self::open_bounded(path, expected_sha256, batch_rows, bounds)
    }

    /// Check the file against `expected_sha256` (if given), then open what `bounds` asks for.
    fn open_bounded(
        path: &Path,
        expected_sha256: Option<&str>,
        batch_rows: usize,
        bounds: ReadBounds<'_>,
    ) -> Result<SegmentReader, SegmentError> {
        if let Some(expected) = expected_sha256 {
            check_sha256(path, expected)?;
        }
        let file = File::open(path).map_err(|source| SegmentError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        contained(path, "opening the segment", || {
            Self::open_file(path, file, batch_rows, bounds)
        })
    }

    pub fn content(&self) -> &SegmentContent {
        &self.content
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

impl SegmentReader {
    /// The columns [`for_each_key_and_time`](Self::for_each_key_and_time) reads: a reader
    /// opened with them (`columns` of [`open_selected`](Self::open_selected)) decodes nothing
    /// else.
    pub fn key_and_time_columns() -> [Vec<String>; 3] {
        ["lsn", "seq", "committed_at"].map(|c| vec![c.to_string()])
    }

    /// Call `f` with the key and commit time (µs) of every change this reader yields, in file
    /// order.
    pub fn for_each_key_and_time(
        self,
        mut f: impl FnMut(ChangeKey, i64),
    ) -> Result<(), SegmentError> {
        let path = self.path.clone();
        for batch in self {
            let batch = batch?;
            let lsn = batch
                .column_by_name("lsn")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>());
            let seq = batch
                .column_by_name("seq")
                .and_then(|c| c.as_primitive_opt::<UInt32Type>());
            let time = batch
                .column_by_name("committed_at")
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>());
            let (Some(lsn), Some(seq), Some(time)) = (lsn, seq, time) else {
                return Err(SegmentError::Corrupt {
                    path,
                    reason: "no u64 lsn, u32 seq or timestamp committed_at column; the archive \
                             is inconsistent (run `pgtrail verify`)"
                        .into(),
                });
            };
            for row in 0..batch.num_rows() {
                f(
                    ChangeKey::new(Lsn(lsn.value(row)), seq.value(row)),
                    time.value(row),
                );
            }
        }
        Ok(())
    }
}

impl Iterator for SegmentReader {
    type Item = Result<RecordBatch, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (path, reader) = (&self.path, &mut self.reader);
        let next = contained(path, "reading the segment", || {
            Ok(reader.next().map(|r| {
                r.map_err(|source| SegmentError::Read {
                    path: path.clone(),
                    source,
                })
            }))
        });
        match next {
            Ok(next) => next,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Turn a batch of a segment back into change records with text cells: typed values rendered
/// as text PostgreSQL reads as the same value ([`render`](super::render)), values kept as
/// exact text from the `*_text` columns, and `Unknown` cells from the `*_unknown` columns.
/// This is the inverse of what compaction wrote, for audits, tests and tools that want the
/// log's view of a segment.
pub fn read_records(
    content: &SegmentContent,
    batch: &RecordBatch,
) -> Result<Vec<(ChangeKey, ChangeRecord)>, SegmentError> {
    let bad = |reason: &str| malformed(reason.to_string());
    let col = |name: &str| column(batch, name);
    let lsn = primitive::<UInt64Type>(batch, "lsn")?;
    let seq = primitive::<UInt32Type>(batch, "seq")?;
    let xid = primitive::<UInt32Type>(batch, "xid")?;
    let ts = primitive::<TimestampMicrosecondType>(batch, "committed_at")?;
    let mut out = Vec::with_capacity(batch.num_rows());
    match content {
        SegmentContent::Messages => {
            let transactional = col("transactional")?
                .as_boolean_opt()
                .ok_or_else(|| bad("transactional type"))?
                .clone();
            let prefix = col("prefix")?
                .as_string_opt::<i32>()
                .ok_or_else(|| bad("prefix type"))?
                .clone();
            let body = col("content")?
                .as_binary_opt::<i32>()
                .ok_or_else(|| bad("content type"))?
                .clone();
            for i in 0..batch.num_rows() {
                out.push((
                    ChangeKey::new(Lsn(lsn.value(i)), seq.value(i)),
                    ChangeRecord {
                        xid: xid.value(i),
                        committed_at_us: ts.value(i),
                        relation_id: 0,
                        schema_version: ChangeKey::default(),
                        op: Op::Message,
                        key: None,
                        before: None,
                        after: None,
                        context: None,
                        message: Some(LogicalMessage {
                            transactional: transactional.value(i),
                            prefix: prefix.value(i).to_string(),
                            content: body.value(i).to_vec(),
                        }),
                    },
                ));
            }
        }
        SegmentContent::Table(rel) => {
            let images = Images::of(rel, batch)?;
            let op = ops(batch)?;
            let op = op.as_string::<i32>();
            let context = col("context")?
                .as_string_opt::<i32>()
                .ok_or_else(|| bad("context type"))?
                .clone();
            let all: Vec<usize> = (0..rel.columns.len()).collect();
            let row_of = |image: &Image, i: usize| image.row(&images, &all, i);
            let key_pos = rel.key_positions();
            for i in 0..batch.num_rows() {
                let op = parse_op(op.value(i))?;
                let b = row_of(&images.before, i);
                let a = row_of(&images.after, i);
                let key = a
                    .as_ref()
                    .or(b.as_ref())
                    .filter(|_| !key_pos.is_empty())
                    .map(|row| {
                        key_pos
                            .iter()
                            .map(|&p| row.get(p).and_then(|c| c.as_text().map(str::to_string)))
                            .collect()
                    });
                out.push((
                    ChangeKey::new(Lsn(lsn.value(i)), seq.value(i)),
                    ChangeRecord {
                        xid: xid.value(i),
                        committed_at_us: ts.value(i),
                        relation_id: rel.relation_id,
                        schema_version: rel.valid_from,
                        op,
                        key,
                        before: b,
                        after: a,
                        context: (!context.is_null(i)).then(|| context.value(i).to_string()),
                        message: None,
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// A batch that is not what its segment's layout says (a column missing, of another type).
fn malformed(reason: String) -> SegmentError {
    SegmentError::Corrupt {
        path: PathBuf::new(),
        reason,
    }
}

fn column<'b>(batch: &'b RecordBatch, name: &str) -> Result<&'b ArrayRef, SegmentError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| malformed(format!("no column {name}")))
}

fn primitive<'b, T: ArrowPrimitiveType>(
    batch: &'b RecordBatch,
    name: &str,
) -> Result<&'b PrimitiveArray<T>, SegmentError> {
    column(batch, name)?
        .as_primitive_opt::<T>()
        .ok_or_else(|| malformed(format!("{name} type")))
}

/// The `op` column as text (it is stored dictionary-encoded).
fn ops(batch: &RecordBatch) -> Result<ArrayRef, SegmentError> {
    datafusion::arrow::compute::cast(column(batch, "op")?, &DataType::Utf8)
        .map_err(SegmentError::Arrow)
}

fn parse_op(op: &str) -> Result<Op, SegmentError> {
    Ok(match op {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "delete" => Op::Delete,
        "truncate" => Op::Truncate,
        "snapshot" => Op::Snapshot,
        other => return Err(malformed(format!("unknown op {other}"))),
    })
}

/// The before and after images of a table segment's batch, with what renders their cells.
struct Images<'a> {
    rel: &'a crate::relation::RelationVersion,
    kinds: Vec<PgKind>,
    before: Image,
    after: Image,
}

/// One image's columns: the typed values, the columns whose value is unknown, and the
/// values kept as exact text.
struct Image {
    values: Option<StructArray>,
    /// For each column of the table, its child in `values` (a read that projected the
    /// image keeps only the children it asked for).
    children: Vec<Option<usize>>,
    unknown: ListArray,
    exact: MapArray,
}

impl<'a> Images<'a> {
    fn of(
        rel: &'a crate::relation::RelationVersion,
        batch: &RecordBatch,
    ) -> Result<Images<'a>, SegmentError> {
        let image = |name: &str| -> Result<Image, SegmentError> {
            let column = |suffix: &str| column(batch, &format!("{name}{suffix}")).cloned();
            let values = batch
                .column_by_name(name)
                .and_then(|c| c.as_struct_opt().cloned());
            // Whole, the image holds every column in the table's order (the schema was
            // checked on opening); projected, its children are found by name.
            let whole = values
                .as_ref()
                .is_some_and(|v| v.num_columns() == rel.columns.len());
            let children = (0..rel.columns.len())
                .map(|c| match (&values, whole) {
                    (Some(_), true) => Some(c),
                    (Some(v), false) => v
                        .fields()
                        .iter()
                        .position(|f| f.name() == &rel.columns[c].name),
                    (None, _) => None,
                })
                .collect();
            Ok(Image {
                values,
                children,
                unknown: column("_unknown")?
                    .as_list_opt::<i32>()
                    .cloned()
                    .ok_or_else(|| malformed(format!("{name}_unknown type")))?,
                exact: column("_text")?
                    .as_map_opt()
                    .cloned()
                    .ok_or_else(|| malformed(format!("{name}_text type")))?,
            })
        };
        Ok(Images {
            rel,
            kinds: rel
                .columns
                .iter()
                .map(|c| PgKind::of(c.type_oid, c.type_modifier))
                .collect(),
            before: image("before")?,
            after: image("after")?,
        })
    }
}

impl Image {
    /// Row `i`'s image, with the cells of the columns at `positions` (in that order), or None
    /// when the change has no such image.
    fn row(&self, images: &Images<'_>, positions: &[usize], i: usize) -> Option<Row> {
        let present = match &self.values {
            Some(s) => !s.is_null(i),
            None => !self.unknown.is_null(i) || !self.exact.is_null(i),
        };
        if !present {
            return None;
        }
        let unknown = (!self.unknown.is_null(i)).then(|| self.unknown.value(i));
        let unknown = unknown.as_ref().map(|u| u.as_string::<i32>());
        let exact = (!self.exact.is_null(i)).then(|| self.exact.value(i));
        let exact = exact.as_ref().map(|e| {
            (
                e.column(0).as_string::<i32>(),
                e.column(1).as_string::<i32>(),
            )
        });
        Some(
            positions
                .iter()
                .map(|&c| {
                    let name = images.rel.columns[c].name.as_str();
                    if unknown.is_some_and(|u| u.iter().flatten().any(|n| n == name)) {
                        return Cell::Unknown;
                    }
                    if let Some((k, v)) = exact
                        && let Some(j) = (0..k.len()).find(|&j| k.value(j) == name)
                    {
                        return Cell::Text(v.value(j).to_string());
                    }
                    match self
                        .values
                        .as_ref()
                        .zip(self.children[c])
                        .and_then(|(s, child)| {
                            render(&images.kinds[c], s.column(child).as_ref(), i)
                        }) {
                        Some(t) => Cell::Text(t),
                        None => Cell::Null,
                    }
                })
                .collect(),
        )
    }
}

/// One change of a table segment as far as a key replay needs it: its key, operation, and
/// the key columns of its before and after images (in [`RelationVersion::key_positions`]
/// order), each image None when the change has none.
///
/// [`RelationVersion::key_positions`]: crate::relation::RelationVersion::key_positions
pub type RowKeys = (ChangeKey, Op, Option<Row>, Option<Row>);

/// The [`RowKeys`] of every change in a table segment's `batch`, rendering only the key
/// columns (a purge's plan replays which rows exist without the other values).
pub fn read_row_keys(
    rel: &crate::relation::RelationVersion,
    batch: &RecordBatch,
) -> Result<Vec<RowKeys>, SegmentError> {
    let lsn = primitive::<UInt64Type>(batch, "lsn")?;
    let seq = primitive::<UInt32Type>(batch, "seq")?;
    let op = ops(batch)?;
    let op = op.as_string::<i32>();
    let images = Images::of(rel, batch)?;
    let positions = rel.key_positions();
    (0..batch.num_rows())
        .map(|i| {
            Ok((
                ChangeKey::new(Lsn(lsn.value(i)), seq.value(i)),
                parse_op(op.value(i))?,
                images.before.row(&images, &positions, i),
                images.after.row(&images, &positions, i),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment `pgtrail demo` wrote (`fixtures/segments`).
    const SEGMENT: &[u8] = include_bytes!("../../../fixtures/segments/customers.parquet");

    fn read_all(path: &Path) -> Result<usize, SegmentError> {
        let reader = SegmentReader::open(path, None, 64)?;
        let content = reader.content().clone();
        let mut n = 0;
        for batch in reader {
            n += read_records(&content, &batch?)?.len();
        }
        Ok(n)
    }

    #[test]
    fn the_fixture_segment_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.parquet");
        std::fs::write(&path, SEGMENT).unwrap();
        assert!(read_all(&path).unwrap() > 0);
    }

    /// The key-only read (the key columns of each image projected, nothing else rendered)
    /// gives each change's key, operation and images' keys exactly as the full read does.
    #[test]
    fn row_keys_of_a_projected_read_are_those_of_the_full_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.parquet");
        std::fs::write(&path, SEGMENT).unwrap();
        let reader = SegmentReader::open(&path, None, 64).unwrap();
        let SegmentContent::Table(rel) = reader.content().clone() else {
            panic!("the fixture is a table segment");
        };
        let positions = rel.key_positions();
        assert!(!positions.is_empty());
        let mut full = Vec::new();
        for batch in reader {
            for (key, record) in
                read_records(&SegmentContent::Table(rel.clone()), &batch.unwrap()).unwrap()
            {
                let keys = |row: &Option<Row>| {
                    row.as_ref()
                        .map(|r| positions.iter().map(|&p| r[p].clone()).collect::<Row>())
                };
                full.push((key, record.op, keys(&record.before), keys(&record.after)));
            }
        }
        let mut columns: Vec<Vec<String>> = ["lsn", "seq", "op"]
            .into_iter()
            .chain([
                "before_unknown",
                "after_unknown",
                "before_text",
                "after_text",
            ])
            .map(|c| vec![c.to_string()])
            .collect();
        for image in ["before", "after"] {
            for &p in &positions {
                columns.push(vec![image.to_string(), rel.columns[p].name.clone()]);
            }
        }
        let projected = SegmentReader::open_selected(
            &path,
            None,
            64,
            (0, u64::MAX),
            (i64::MIN, i64::MAX),
            Some(&columns),
            None,
        )
        .unwrap();
        let mut keyed = Vec::new();
        for batch in projected {
            let batch = batch.unwrap();
            assert!(batch.column_by_name("context").is_none(), "projected away");
            keyed.extend(read_row_keys(&rel, &batch).unwrap());
        }
        assert!(full.iter().any(|(_, _, _, a)| a.is_some()));
        assert_eq!(keyed, full);
    }

    /// A segment of `n` changes in row groups of 7 rows, written as `name` in `dir`: copies
    /// of a change of the fixture at commit LSNs 100, 200, … (`seq` = LSN / 100 mod 3).
    /// The keys `(lsn, seq)` a selected read of `path` yields: batches of `batch_rows`, LSNs
    /// within `lsn`, and the rows `rows` (numbered across the row groups the bounds keep).
    fn selected_keys(
        path: &Path,
        batch_rows: usize,
        lsn: (u64, u64),
        rows: Option<&[usize]>,
    ) -> Vec<(u64, u32)> {
        let reader = SegmentReader::open_selected(
            path,
            None,
            batch_rows,
            lsn,
            (i64::MIN, i64::MAX),
            None,
            rows,
        )
        .unwrap();
        let content = reader.content().clone();
        reader
            .flat_map(|b| read_records(&content, &b.unwrap()).unwrap())
            .map(|(k, _)| (k.commit_lsn.0, k.seq))
            .collect()
    }

    fn segment_of(dir: &Path, name: &str, n: u64) -> std::path::PathBuf {
        let fixture = dir.join("fixture.parquet");
        std::fs::write(&fixture, SEGMENT).unwrap();
        let reader = SegmentReader::open(&fixture, None, 64).unwrap();
        let content = reader.content().clone();
        let (_, record) = read_records(&content, &reader.into_iter().next().unwrap().unwrap())
            .unwrap()
            .remove(0);
        let options = super::super::SegmentOptions {
            batch_rows: 5,
            row_group_rows: 7,
            ..Default::default()
        };
        let mut writer =
            super::super::SegmentWriter::create(dir, name, &content, &Default::default(), &options)
                .unwrap();
        for n in 1..=n {
            writer
                .push(
                    ChangeKey::new(Lsn(100 * n), (n % 3) as u32),
                    &ChangeRecord {
                        committed_at_us: n as i64,
                        ..record.clone()
                    },
                    1,
                )
                .unwrap();
        }
        let file = format!("{name}.parquet");
        dir.join(writer.finish(|_, _| file.clone()).unwrap().file_name)
    }

    /// A selected read yields exactly the chosen rows of a whole read, in order: first and
    /// last rows, runs, single rows, and numbers past the end (left out).
    #[test]
    fn a_selected_read_yields_exactly_the_chosen_rows() {
        // 60 changes in row groups of 7 rows, copies of a change of the fixture.
        let dir = tempfile::tempdir().unwrap();
        let path = segment_of(dir.path(), "s", 60);
        let whole = |p: &Path| -> Vec<(u64, u32)> {
            let reader = SegmentReader::open(p, None, 3).unwrap();
            let content = reader.content().clone();
            reader
                .flat_map(|b| read_records(&content, &b.unwrap()).unwrap())
                .map(|(k, _)| (k.commit_lsn.0, k.seq))
                .collect()
        };
        let all = whole(&path);
        assert_eq!(all.len(), 60);
        let last = all.len() - 1;
        for rows in [
            vec![0],
            vec![last],
            vec![0, 1, 2],
            vec![1, last],
            vec![6, 7, 8, 20, 21, 50, last, last + 5],
            vec![],
            (0..=last).collect(),
        ] {
            let got = selected_keys(&path, 2, (0, u64::MAX), Some(&rows));
            let want: Vec<(u64, u32)> = rows
                .iter()
                .filter(|&&r| r <= last)
                .map(|&r| all[r])
                .collect();
            assert_eq!(got, want, "rows {rows:?}");
        }
        // With LSN bounds, rows are numbered across the row groups the bounds keep (rows
        // 1,500 to 4,000 of the 60 changes: row groups 3 to 6); a selection then reads only
        // the row groups holding one of its rows, and still yields exactly those rows.
        let read = |rows: Option<&[usize]>| selected_keys(&path, 2, (1500, 4000), rows);
        let kept = read(None);
        assert_eq!(kept.len(), 28, "row groups 3 to 6 of 7 rows each");
        for rows in [
            vec![0],
            vec![27],
            vec![8, 9, 10],
            vec![3, 20],
            vec![13, 14, 30],
        ] {
            let want: Vec<(u64, u32)> = rows
                .iter()
                .filter(|&&r| r < kept.len())
                .map(|&r| kept[r])
                .collect();
            assert_eq!(read(Some(&rows)), want, "rows {rows:?} within LSN bounds");
        }
    }

    /// The read ahead spans the row groups the selection reads and no others, however its
    /// rows are numbered: across every row group, across those LSN bounds keep, or within one
    /// row group.
    #[test]
    fn the_read_ahead_spans_the_row_groups_a_selection_reads() {
        // 60 changes at LSNs 100..=6000, row group g holding LSNs 100 * (7g + 1) to 100 * (7g + 7).
        let dir = tempfile::tempdir().unwrap();
        let path = segment_of(dir.path(), "s", 60);
        let file = File::open(&path).unwrap();
        let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).unwrap();
        let row_groups = metadata.metadata().row_groups();
        let bytes_of = |groups: &[usize]| {
            groups
                .iter()
                .flat_map(|&g| row_groups[g].columns())
                .map(|c| (c.byte_range().0, c.byte_range().0 + c.byte_range().1))
                .reduce(|(lo, hi), (s, e)| (lo.min(s), hi.max(e)))
                .unwrap()
        };
        let everything = (0, u64::MAX);
        for (lsn, row_group, rows, want) in [
            (everything, None, vec![8], vec![1]),
            (everything, None, vec![0, 59], vec![0, 8]),
            // LSNs 1,500 to 4,000 keep row groups 2 to 5; rows are numbered from group 2's first.
            ((1500, 4000), None, vec![0, 27], vec![2, 5]),
            // Rows of row group 4, numbered within it.
            (everything, Some(4), vec![0, 1], vec![4]),
        ] {
            let bounds = ReadBounds {
                lsn,
                committed_at: (i64::MIN, i64::MAX),
                columns: None,
                rows: Some(&rows),
                row_group,
            };
            let chosen = ChosenRowGroups::new(metadata.metadata(), &bounds);
            assert_eq!(
                chosen.groups, want,
                "rows {rows:?} of {lsn:?}, {row_group:?}"
            );
            let ahead =
                SpanReader::new(File::open(&path).unwrap(), row_groups, &chosen.groups).unwrap();
            let span = (ahead.start, ahead.start + ahead.bytes.len() as u64);
            assert_eq!(
                span,
                bytes_of(&want),
                "rows {rows:?} of {lsn:?}, {row_group:?}"
            );
        }
        // Nothing chosen, nothing read ahead: every byte comes from the file.
        let none = SpanReader::new(File::open(&path).unwrap(), row_groups, &[]).unwrap();
        assert!(none.bytes.is_empty());
    }

    /// A file put in the place of another under the same name (as a compaction renames a new
    /// key-ordered copy over the old one) is read with its own footer, never with the one
    /// kept from the file it replaced.
    #[test]
    fn a_file_renamed_over_another_is_read_with_its_own_footer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.parquet");
        let selected = |rows: &[usize]| -> Vec<u64> {
            selected_keys(&path, 4, (0, u64::MAX), Some(rows))
                .into_iter()
                .map(|(lsn, _)| lsn)
                .collect()
        };
        std::fs::rename(segment_of(dir.path(), "first", 60), &path).unwrap();
        assert_eq!(selected(&[0, 30, 59]), vec![100, 3100, 6000]);
        // Fewer rows, so other row groups and pages: a stale footer would misplace them.
        std::fs::rename(segment_of(dir.path(), "second", 12), &path).unwrap();
        assert_eq!(selected(&[0, 8, 11, 30]), vec![100, 900, 1200]);
    }

    /// Random corruptions of a real segment read without its checksum (seeded, so a failure
    /// replays): an error naming the file or some rows, never a panic.
    #[test]
    fn corrupted_segments_are_errors_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.parquet");
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut errors = 0;
        for _ in 0..300 {
            let mut bytes = SEGMENT.to_vec();
            for _ in 0..1 + next() % 8 {
                // Mostly in the footer (schema, metadata, statistics), where readers trust most.
                let at = if next() % 2 == 0 {
                    bytes.len() - 1 - (next() as usize) % 600.min(bytes.len())
                } else {
                    (next() as usize) % bytes.len()
                };
                bytes[at] = next() as u8;
            }
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = read_all(&path) {
                errors += 1;
                let text = e.to_string();
                assert!(
                    text.contains("s.parquet"),
                    "the error names the file: {text}"
                );
            }
        }
        assert!(errors > 50, "corruptions must be noticed ({errors} of 300)");
    }

    #[test]
    fn a_panic_inside_the_parquet_reader_is_an_error_naming_the_file() {
        let err = contained(
            Path::new("/archive/segments/x.parquet"),
            "reading the segment",
            || -> Result<(), SegmentError> {
                panic!("Int type with bit width of 1048640 and signed of true not supported")
            },
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("x.parquet") && text.contains("bit width"),
            "{text}"
        );
    }
}

/// One row group of a segment: its rows and the ranges of its `lsn` and `committed_at` (µs)
/// from its statistics (`None` when the file has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowGroupRange {
    pub rows: usize,
    pub lsn: Option<(u64, u64)>,
    pub committed_at: Option<(i64, i64)>,
}

/// The row groups of the segment file at `path`, in file order, from its footer alone (the
/// file is not checked against its SHA-256 here; reading its rows does that).
pub fn row_group_ranges(path: &Path) -> Result<Vec<RowGroupRange>, SegmentError> {
    let file = File::open(path).map_err(|source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    contained(path, "reading the segment's footer", || {
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|source| {
            SegmentError::Parquet {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(builder
            .metadata()
            .row_groups()
            .iter()
            .map(group_range)
            .collect())
    })
}

/// A run of one row group's rows (numbered within the row group), with the ranges of `lsn`
/// and `committed_at` that its pages' statistics give (`rows` of `range` is the run's length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowSpan {
    pub rows: std::ops::Range<usize>,
    pub range: RowGroupRange,
}

/// Row group `row_group` of the segment file at `path` cut where its `lsn` column's pages
/// begin (up to 20,000 rows each; a row group holds up to 128 Ki), in file order, each span
/// with its `lsn` page's range and the `committed_at` range of the pages that overlap it: a
/// reader after the newest few matches reads the last spans and stops, instead of decoding a
/// whole row group. A file without a usable page index (written before segments had one, or
/// with an index that does not describe the row group's rows) gives one span, the row group,
/// with its statistics; so does a row group that is not there (none at all). The file is not
/// checked against its SHA-256 here; reading its rows does that.
pub fn row_group_spans(path: &Path, row_group: usize) -> Result<Vec<RowSpan>, SegmentError> {
    let file = File::open(path).map_err(|source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    contained(path, "reading the segment's page index", || {
        let metadata = footer_cache::load(path, &file).map_err(|source| SegmentError::Parquet {
            path: path.to_path_buf(),
            source,
        })?;
        let metadata = metadata.metadata();
        let Some(group) = metadata.row_groups().get(row_group) else {
            return Ok(Vec::new());
        };
        let whole = group_range(group);
        let rows = whole.rows;
        let pages = |column: usize| -> Option<Vec<(usize, (i64, i64))>> {
            let ColumnIndexMetaData::INT64(index) =
                metadata.column_index()?.get(row_group)?.get(column)?
            else {
                return None;
            };
            let locations = metadata
                .offset_index()?
                .get(row_group)?
                .get(column)?
                .page_locations();
            if locations.len() as u64 != index.num_pages() {
                return None;
            }
            let pages: Vec<_> = locations
                .iter()
                .enumerate()
                .map(|(p, at)| {
                    let first = usize::try_from(at.first_row_index).ok()?;
                    Some((first, (*index.min_value(p)?, *index.max_value(p)?)))
                })
                .collect::<Option<_>>()?;
            // Pages start at row 0, each after the one before, all inside the row group.
            let ordered = pages.first().is_some_and(|p| p.0 == 0)
                && pages.windows(2).all(|w| w[0].0 < w[1].0)
                && pages.last().is_some_and(|p| p.0 < rows);
            ordered.then_some(pages)
        };
        let Some(lsn_pages) = pages(0) else {
            return Ok(vec![RowSpan {
                rows: 0..rows,
                range: whole,
            }]);
        };
        let time_pages = pages(3);
        let end_of =
            |pages: &[(usize, (i64, i64))], p: usize| pages.get(p + 1).map_or(rows, |next| next.0);
        Ok((0..lsn_pages.len())
            .map(|p| {
                let span = lsn_pages[p].0..end_of(&lsn_pages, p);
                let (lo, hi) = lsn_pages[p].1;
                // The commit times of the pages overlapping the span; without their index,
                // the row group's (wider, never wrong).
                let committed_at = match &time_pages {
                    Some(time) => (0..time.len())
                        .filter(|&q| time[q].0 < span.end && span.start < end_of(time, q))
                        .map(|q| time[q].1)
                        .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1))),
                    None => whole.committed_at,
                };
                RowSpan {
                    range: RowGroupRange {
                        rows: span.len(),
                        // UInt64 is stored as INT64 with the same bits.
                        lsn: Some((lo as u64, hi as u64)),
                        committed_at,
                    },
                    rows: span,
                }
            })
            .collect())
    })
}

/// A row group's row count and its `lsn` and `committed_at` ranges, from its statistics.
fn group_range(rg: &RowGroupMetaData) -> RowGroupRange {
    let range = |i: usize| match rg.columns().get(i).and_then(|c| c.statistics()) {
        Some(Statistics::Int64(s)) => s.min_opt().copied().zip(s.max_opt().copied()),
        _ => None,
    };
    RowGroupRange {
        rows: rg.num_rows().max(0) as usize,
        // UInt64 is stored as INT64 with the same bits.
        lsn: range(0).map(|(lo, hi)| (lo as u64, hi as u64)),
        committed_at: range(3),
    }
}

/// A segment file whose bytes around a few selected rows were read in one go.
///
/// A key's run of changes in the key-ordered copy sits in one or two row groups, a page of
/// each column. Parquet reads each page on its own (a page header, then its bytes); on a cold
/// page cache each of those reads waited on the disk (a key's history of four segments took
/// 11 ms cold against 3.6 ms warm). The row groups holding the rows are read here with one
/// read when they are small enough, and the pages come from memory; anything outside them is
/// read from the file as before.
struct SpanReader {
    file: File,
    len: u64,
    /// Where `bytes` begin in the file.
    start: u64,
    bytes: Bytes,
}

impl SpanReader {
    /// The most read ahead for one selection; larger row groups are read page by page.
    const MAX_SPAN: u64 = 4 << 20;

    /// `file`, with the row groups `groups` (indexes into `row_groups`, as
    /// [`ChosenRowGroups`] lists those holding a read's rows) read ahead if they are at most
    /// [`Self::MAX_SPAN`] bytes from the first to the last (nothing with no `groups`).
    fn new(file: File, row_groups: &[RowGroupMetaData], groups: &[usize]) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let span = groups
            .iter()
            .filter_map(|&group| row_groups.get(group))
            .flat_map(RowGroupMetaData::columns)
            .map(|column| {
                let (start, length) = column.byte_range();
                (start, start.saturating_add(length))
            })
            .reduce(|(lo, hi), (start, end)| (lo.min(start), hi.max(end)));
        let (start, bytes) = match span {
            Some((lo, hi)) if hi > lo && hi - lo <= Self::MAX_SPAN && hi <= len => {
                let mut buffer = vec![0u8; (hi - lo) as usize];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buffer, lo)?;
                (lo, Bytes::from(buffer))
            }
            _ => (0, Bytes::new()),
        };
        Ok(SpanReader {
            file,
            len,
            start,
            bytes,
        })
    }

    /// The bytes read ahead from `start` on, if `start` is among them.
    fn ahead(&self, start: u64) -> Option<Bytes> {
        let offset = usize::try_from(start.checked_sub(self.start)?).ok()?;
        (offset < self.bytes.len()).then(|| self.bytes.slice(offset..))
    }
}

impl Length for SpanReader {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for SpanReader {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> datafusion::parquet::errors::Result<Self::T> {
        Ok(match self.ahead(start) {
            // What follows the bytes read ahead comes from the file.
            Some(bytes) => {
                let rest = self.file.get_read(self.start + self.bytes.len() as u64)?;
                Box::new(std::io::Cursor::new(bytes).chain(rest))
            }
            None => Box::new(self.file.get_read(start)?),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> datafusion::parquet::errors::Result<Bytes> {
        match self.ahead(start) {
            Some(bytes) if bytes.len() >= length => Ok(bytes.slice(..length)),
            _ => self.file.get_bytes(start, length),
        }
    }
}

/// Parsed footers, their pages' locations included, of the files read a few rows at a time.
/// Parsing the page index of a key-ordered copy (18 row groups of 23 columns of up to 256
/// pages: about 100,000 locations) was a third of a `row_history` request's time in `pgtrail
/// serve`; it is the same for every request.
mod footer_cache {
    use std::collections::{HashMap, VecDeque};
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, OnceLock};

    use datafusion::parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
    use datafusion::parquet::errors::ParquetError;
    use datafusion::parquet::file::metadata::PageIndexPolicy;

    /// At most this much parsed metadata is kept; the oldest entries go first.
    const MAX_BYTES: usize = 64 << 20;

    /// What every footer kept is read with: the pages' locations, and the pages' statistics
    /// where the file has them (segments, on `lsn` and `committed_at`).
    fn options() -> ArrowReaderOptions {
        ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional)
    }

    /// Which file, and which bytes: its path, device, inode, length and modification time
    /// (ns). Archive files are never changed in place (each is written under a temporary name
    /// and renamed, so a rewritten one is a new inode, and an inode number reused by the file
    /// system would need the same path, length and clock tick too); a file changed in place
    /// anyway (damaged or tampered with) gets a new modification time, up to the file system's
    /// clock tick, the same trust the query layer's check-each-file-once already gives a path.
    type Identity = (PathBuf, u64, u64, u64, i64, i64);

    #[derive(Default)]
    struct Cache {
        entries: HashMap<Identity, (ArrowReaderMetadata, usize)>,
        order: VecDeque<Identity>,
        bytes: usize,
    }

    fn cache() -> &'static Mutex<Cache> {
        static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
        CACHE.get_or_init(Mutex::default)
    }

    /// The footer of `file` (opened at `path`) with its page index: the one parsed before for
    /// the same bytes, or parsed now and kept. A file whose identity cannot be read is parsed
    /// and not kept.
    pub(super) fn load(path: &Path, file: &File) -> Result<ArrowReaderMetadata, ParquetError> {
        let id = file.metadata().ok().map(|m| {
            let id = (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
            (path.to_path_buf(), id.0, id.1, id.2, id.3, id.4)
        });
        let Some(id) = id else {
            return ArrowReaderMetadata::load(file, options());
        };
        if let Some((metadata, _)) = cache()
            .lock()
            .ok()
            .and_then(|c| c.entries.get(&id).cloned())
        {
            return Ok(metadata);
        }
        let metadata = ArrowReaderMetadata::load(file, options())?;
        let size = metadata.metadata().memory_size();
        if let (true, Ok(mut cache)) = (size <= MAX_BYTES, cache().lock()) {
            while cache.bytes + size > MAX_BYTES {
                let Some(oldest) = cache.order.pop_front() else {
                    break;
                };
                if let Some((_, freed)) = cache.entries.remove(&oldest) {
                    cache.bytes -= freed;
                }
            }
            if cache
                .entries
                .insert(id.clone(), (metadata.clone(), size))
                .is_none()
            {
                cache.order.push_back(id);
                cache.bytes += size;
            }
        }
        Ok(metadata)
    }
}

/// Whether a messages segment's row holds a content a redaction erased: an empty `content`
/// with a NULL `content_text`, which no message holds otherwise (an empty content's text is
/// the empty string, and a content that is not UTF-8 is not empty). Readers show such a
/// content as unknown; its leaf takes the erased part's digest from the redaction record.
pub fn message_content_erased(content: &[u8], text_is_null: bool) -> bool {
    content.is_empty() && text_is_null
}

/// `batch` (of a messages segment) with the content of each message `erase` picks erased: see
/// [`message_content_erased`]. Every other column and row is as it was.
pub fn erase_message_contents(
    batch: &RecordBatch,
    erase: impl Fn(ChangeKey) -> bool,
) -> Result<RecordBatch, SegmentError> {
    use datafusion::arrow::array::{BinaryBuilder, StringBuilder};
    let lsn = primitive::<UInt64Type>(batch, "lsn")?;
    let seq = primitive::<UInt32Type>(batch, "seq")?;
    let content = column(batch, "content")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| malformed("content type".into()))?;
    let text = column(batch, "content_text")?
        .as_string_opt::<i32>()
        .ok_or_else(|| malformed("content_text type".into()))?;
    let rows = batch.num_rows();
    let mut new_content = BinaryBuilder::with_capacity(rows, content.value_data().len());
    let mut new_text = StringBuilder::with_capacity(rows, text.value_data().len());
    for row in 0..rows {
        if erase(ChangeKey::new(Lsn(lsn.value(row)), seq.value(row))) {
            new_content.append_value(b"");
            new_text.append_null();
        } else {
            new_content.append_value(content.value(row));
            new_text.append_option((!text.is_null(row)).then(|| text.value(row)));
        }
    }
    let schema = batch.schema();
    let mut columns = batch.columns().to_vec();
    let at = |name: &str| {
        schema
            .index_of(name)
            .map_err(|_| malformed(format!("no column {name}")))
    };
    columns[at("content")?] = std::sync::Arc::new(new_content.finish());
    columns[at("content_text")?] = std::sync::Arc::new(new_text.finish());
    RecordBatch::try_new(schema, columns).map_err(SegmentError::Arrow)
}
