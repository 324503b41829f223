//! Reading an archive's stored changes: which row groups a query's filters allow (`Bounds`),
//! opening a segment checked against its manifest SHA-256, the log tail as batches, and every
//! change of a table as rows in key order. Everything that reads changes goes through here;
//! what the changes mean (the replay rules) is `replay`'s.

use std::collections::BTreeMap;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};
use pgtrail_store::segment::{
    RowGroupRange, RowSpan, SegmentContent, SegmentReader, read_records, records_to_batch,
    row_group_ranges, row_group_spans, sha256_file,
};
use pgtrail_store::{ChangeKey, ChangeRecord, RelationVersion, SegmentEntry};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::merge::adapt;

/// Bounds on `lsn` (commit LSN) and `committed_at` (µs) implied by a query's filters, and on
/// `seq` at the two ends of the LSN range (a range of change keys: a page that starts or ends
/// inside a transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub lsn: (u64, u64),
    pub time: (i64, i64),
    /// The lowest `seq` of the changes at LSN `lsn.0`, and the highest at `lsn.1`.
    pub seq: (u32, u32),
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            lsn: (0, u64::MAX),
            time: (i64::MIN, i64::MAX),
            seq: (0, u32::MAX),
        }
    }
}

/// A condition `lsn > L OR seq >= S` (or its mirror, below): with `lsn >= L` beside it, the
/// keys from `(L, S)` on. Feeds use it to start a page inside a transaction.
#[derive(Clone, Copy)]
enum KeyEdge {
    From(u64, u32),
    Through(u64, u32),
}

impl Bounds {
    pub fn from_filters(filters: &[Expr]) -> Bounds {
        let mut b = Bounds::default();
        for f in filters {
            b.narrow(f);
        }
        // An edge bounds `seq` only where the LSN range ends at its LSN: there the condition
        // is about `seq` alone. Past that LSN it holds for every row; before it (the range
        // reaching below it) it would admit rows of other `seq`s, so it says nothing.
        let mut edges = Vec::new();
        for f in filters {
            key_edges(f, &mut edges);
        }
        for edge in edges {
            match edge {
                KeyEdge::From(lsn, seq) if lsn == b.lsn.0 => b.seq.0 = b.seq.0.max(seq),
                KeyEdge::Through(lsn, seq) if lsn == b.lsn.1 => b.seq.1 = b.seq.1.min(seq),
                _ => {}
            }
        }
        b
    }

    fn narrow(&mut self, e: &Expr) {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.narrow(left);
                self.narrow(right);
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (column, op, value) = match (column_name(left), column_name(right)) {
                    (Some(c), None) => (c, *op, constant(right)),
                    (None, Some(c)) => match op.swap() {
                        Some(op) => (c, op, constant(left)),
                        None => return,
                    },
                    _ => return,
                };
                let Some(value) = value else { return };
                match column.as_str() {
                    "lsn" => {
                        if let Some(v) = as_u64(&value) {
                            let (lo, hi) =
                                narrow_range((self.lsn.0.into(), self.lsn.1.into()), op, v.into());
                            self.lsn = (
                                lo.clamp(0, u64::MAX.into()) as u64,
                                hi.clamp(0, u64::MAX.into()) as u64,
                            );
                        }
                    }
                    "committed_at" => {
                        if let Some(v) = as_micros(&value) {
                            let (lo, hi) = narrow_range(
                                (self.time.0.into(), self.time.1.into()),
                                op,
                                v.into(),
                            );
                            let clamp = |x: i128| x.clamp(i64::MIN.into(), i64::MAX.into()) as i64;
                            self.time = (clamp(lo), clamp(hi));
                        }
                    }
                    _ => {}
                }
            }
            Expr::Between(between) if !between.negated => {
                for (op, bound) in [
                    (Operator::GtEq, &between.low),
                    (Operator::LtEq, &between.high),
                ] {
                    self.narrow(&Expr::BinaryExpr(BinaryExpr::new(
                        between.expr.clone(),
                        op,
                        bound.clone(),
                    )));
                }
            }
            _ => {}
        }
    }

    pub fn overlaps(&self, seg: &SegmentEntry) -> bool {
        seg.max_key.commit_lsn.0 >= self.lsn.0
            && seg.min_key.commit_lsn.0 <= self.lsn.1
            && seg.max_committed_at_us >= self.time.0
            && seg.min_committed_at_us <= self.time.1
    }

    pub fn contains(&self, key: ChangeKey, committed_at_us: i64) -> bool {
        let (low, high) = self.keys();
        (low..=high).contains(&key) && (self.time.0..=self.time.1).contains(&committed_at_us)
    }

    /// The lowest and highest change keys inside the bounds.
    fn keys(&self) -> (ChangeKey, ChangeKey) {
        (
            ChangeKey::new(pgtrail_store::Lsn(self.lsn.0), self.seq.0),
            ChangeKey::new(pgtrail_store::Lsn(self.lsn.1), self.seq.1),
        )
    }

    /// Whether every change of the segment is inside the bounds.
    fn covers(&self, seg: &SegmentEntry) -> bool {
        self.contains(seg.min_key, seg.min_committed_at_us)
            && self.contains(seg.max_key, seg.max_committed_at_us)
    }
}

/// The [`KeyEdge`]s among the conjuncts of `e`.
fn key_edges(e: &Expr, out: &mut Vec<KeyEdge>) {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
        return;
    };
    match op {
        Operator::And => {
            key_edges(left, out);
            key_edges(right, out);
        }
        Operator::Or => {
            let comparison = |e: &Expr| match e {
                Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                    let value = constant(right).and_then(|v| as_u64(&v))?;
                    Some((column_name(left)?, *op, value))
                }
                _ => None,
            };
            let (Some(a), Some(b)) = (comparison(left), comparison(right)) else {
                return;
            };
            let (lsn, seq) = match (a.0.as_str(), b.0.as_str()) {
                ("lsn", "seq") => (a, b),
                ("seq", "lsn") => (b, a),
                _ => return,
            };
            let Ok(s) = u32::try_from(seq.2) else { return };
            match (lsn.1, seq.1) {
                (Operator::Gt, Operator::GtEq) => out.push(KeyEdge::From(lsn.2, s)),
                (Operator::Gt, Operator::Gt) => {
                    out.extend(s.checked_add(1).map(|s| KeyEdge::From(lsn.2, s)))
                }
                (Operator::Lt, Operator::LtEq) => out.push(KeyEdge::Through(lsn.2, s)),
                (Operator::Lt, Operator::Lt) => {
                    out.extend(s.checked_sub(1).map(|s| KeyEdge::Through(lsn.2, s)))
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// Narrow an inclusive range by `column op v`; i128 holds both u64 LSNs and i64 times.
fn narrow_range(range: (i128, i128), op: Operator, v: i128) -> (i128, i128) {
    match op {
        Operator::Eq => (range.0.max(v), range.1.min(v)),
        Operator::Gt => (range.0.max(v + 1), range.1),
        Operator::GtEq => (range.0.max(v), range.1),
        Operator::Lt => (range.0, range.1.min(v - 1)),
        Operator::LtEq => (range.0, range.1.min(v)),
        _ => range,
    }
}

fn column_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Column(c) => Some(c.name.clone()),
        Expr::Cast(c) => column_name(&c.expr),
        _ => None,
    }
}

/// The value of a constant expression (a literal, possibly cast).
pub fn constant(e: &Expr) -> Option<ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v.clone()),
        Expr::Cast(c) => constant(&c.expr)?.cast_to(c.field.data_type()).ok(),
        Expr::TryCast(c) => constant(&c.expr)?.cast_to(c.field.data_type()).ok(),
        _ => None,
    }
}

fn as_u64(v: &ScalarValue) -> Option<u64> {
    match v {
        ScalarValue::UInt64(Some(v)) => Some(*v),
        ScalarValue::Int64(Some(v)) => u64::try_from(*v).ok(),
        ScalarValue::UInt32(Some(v)) => Some(u64::from(*v)),
        ScalarValue::Int32(Some(v)) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// Microseconds since the Unix epoch of a timestamp value.
pub fn as_micros(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampMicrosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(v.div_euclid(1000)),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000),
        _ => None,
    }
}

/// Log-tail records as batches of the history schema, one per schema version in key order.
pub fn tail_batches(
    table: &TableHistory,
    tail: &[(ChangeKey, ChangeRecord)],
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    for run in tail.chunk_by(|(_, a), (_, b)| {
        a.relation_id == b.relation_id && a.schema_version == b.schema_version
    }) {
        let first = &run[0].1;
        let version = table.version(first.relation_id, first.schema_version)?;
        let content = SegmentContent::Table(version.clone());
        let batch =
            records_to_batch(&content, run).map_err(|e| DataFusionError::External(Box::new(e)))?;
        batches.push(adapt(&batch, version, schema)?);
    }
    Ok(batches)
}

/// Batches a segment's decoder thread may hold ready ahead of the pass consuming them.
pub(crate) const READ_AHEAD_BATCHES: usize = 4;

/// Segments per table already verified against the manifest in this process.
fn verified() -> &'static std::sync::Mutex<BTreeMap<std::path::PathBuf, String>> {
    static VERIFIED: std::sync::OnceLock<std::sync::Mutex<BTreeMap<std::path::PathBuf, String>>> =
        std::sync::OnceLock::new();
    VERIFIED.get_or_init(Default::default)
}

/// Open a segment, checking its SHA-256 the first time this process reads it.
pub fn open_segment(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
) -> Result<SegmentReader> {
    open_segment_pruned(path, sha256, batch_rows, Bounds::default())
}

/// [`open_segment`], reading only row groups whose statistics overlap `bounds`.
pub fn open_segment_pruned(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
    bounds: Bounds,
) -> Result<SegmentReader> {
    open_segment_projected(path, sha256, batch_rows, bounds, None)
}

/// [`open_segment_pruned`], decoding only the columns under `columns` (see
/// [`SegmentReader::open_selected`]).
pub fn open_segment_projected(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
    bounds: Bounds,
    columns: Option<&[Vec<String>]>,
) -> Result<SegmentReader> {
    open_segment_selected(path, sha256, batch_rows, bounds, columns, None)
}

/// [`open_segment_projected`], decoding only the rows at `rows` (see
/// [`SegmentReader::open_selected`]).
pub fn open_segment_selected(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
    bounds: Bounds,
    columns: Option<&[Vec<String>]>,
    rows: Option<&[usize]>,
) -> Result<SegmentReader> {
    open_verified(path, sha256, || {
        SegmentReader::open_selected(
            path,
            None,
            batch_rows,
            bounds.lsn,
            bounds.time,
            columns,
            rows,
        )
    })
}

/// `open()` the file at `path` once it is checked against `sha256` (a file checked once is
/// not hashed again at every query, so `open` passes no checksum of its own).
fn open_verified(
    path: &std::path::Path,
    sha256: &str,
    open: impl FnOnce() -> std::result::Result<SegmentReader, pgtrail_store::SegmentError>,
) -> Result<SegmentReader> {
    verify_once(path, sha256)?;
    open().map_err(|e| DataFusionError::External(Box::new(e)))
}

/// The row groups of a segment (see [`row_group_ranges`]), from a file checked against its
/// manifest SHA-256 (once per process, as for reading it): a scan skips row groups by these
/// statistics, so they must be the archived ones.
pub fn segment_row_groups(path: &std::path::Path, sha256: &str) -> Result<Vec<RowGroupRange>> {
    verify_once(path, sha256)?;
    row_group_ranges(path).map_err(|e| DataFusionError::External(Box::new(e)))
}

/// The spans of row group `row_group` of a segment (see [`row_group_spans`]), from a file
/// checked against its manifest SHA-256, for the same reason as [`segment_row_groups`].
pub fn segment_row_spans(
    path: &std::path::Path,
    sha256: &str,
    row_group: usize,
) -> Result<Vec<RowSpan>> {
    verify_once(path, sha256)?;
    row_group_spans(path, row_group).map_err(|e| DataFusionError::External(Box::new(e)))
}

/// Check the file at `path` against `sha256`, unless this process already did.
fn verify_once(path: &std::path::Path, sha256: &str) -> Result<()> {
    let known = verified()
        .lock()
        .ok()
        .and_then(|m| m.get(path).cloned())
        .is_some_and(|s| s == sha256);
    if known {
        return Ok(());
    }
    let external = |e| DataFusionError::External(Box::new(e));
    let found = sha256_file(path).map_err(external)?;
    if found != sha256 {
        return Err(external(pgtrail_store::SegmentError::Checksum {
            path: path.to_path_buf(),
            expected: sha256.into(),
            found,
        }));
    }
    if let Ok(mut m) = verified().lock() {
        m.insert(path.to_path_buf(), sha256.to_string());
    }
    Ok(())
}

/// [`open_segment_projected`] of the rows at `rows` of row group `row_group` alone (numbered
/// within the row group, as [`segment_row_spans`] numbers them).
pub fn open_segment_row_span(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
    row_group: usize,
    rows: std::ops::Range<usize>,
    columns: Option<&[Vec<String>]>,
) -> Result<SegmentReader> {
    open_verified(path, sha256, || {
        SegmentReader::open_row_group_rows(path, None, batch_rows, row_group, rows, columns)
    })
}

/// Call `f` with the key and commit time (µs) of every change in `seg`'s row groups that
/// `bounds` keeps, in file order, decoding only the `lsn`, `seq` and `committed_at` columns.
pub fn for_each_key_and_time(
    path: &std::path::Path,
    seg: &SegmentEntry,
    bounds: Bounds,
    f: impl FnMut(ChangeKey, i64),
) -> Result<()> {
    let columns = SegmentReader::key_and_time_columns();
    open_segment_projected(path, &seg.sha256, 8192, bounds, Some(&columns))?
        .for_each_key_and_time(f)
        .map_err(|e| DataFusionError::External(Box::new(e)))
}

/// The rows of `seg`'s row groups that `bounds` keeps which are inside the bounds, numbered
/// as [`open_segment_selected`] numbers them; `None` when every row of those row groups is.
///
/// Row groups hold up to 128K changes, and a change read as a row is rendered as text: a
/// bound that cuts a row group (the newest changes of a table, a page of `pgtrail serve`) is
/// applied by decoding the small columns it names first, so that only the rows inside are
/// decoded and rendered.
fn rows_within(
    path: &std::path::Path,
    seg: &SegmentEntry,
    bounds: Bounds,
) -> Result<Option<Vec<usize>>> {
    if bounds.covers(seg) {
        return Ok(None);
    }
    let (mut rows, mut read) = (Vec::new(), 0);
    for_each_key_and_time(path, seg, bounds, |key, committed_at_us| {
        if bounds.contains(key, committed_at_us) {
            rows.push(read);
        }
        read += 1;
    })?;
    Ok((rows.len() < read).then_some(rows))
}

/// Call `f` with every change of `table` in key order that `keep` accepts, skipping segments
/// `read_segment` rejects without opening them.
/// The schema version passed to `f` is the table's own (it lives as long as `table`).
pub fn for_each_change_where<'t>(
    archive: &ArchiveSnapshot,
    table: &'t TableHistory,
    row_groups: Bounds,
    read_segment: impl Fn(&SegmentEntry) -> bool,
    keep: impl Fn(ChangeKey, &ChangeRecord) -> bool,
    mut f: impl FnMut(&'t RelationVersion, ChangeKey, &ChangeRecord) -> Result<()>,
) -> Result<()> {
    let mut last = None::<ChangeKey>;
    let mut check_order = |key: ChangeKey| -> Result<()> {
        if last.is_some_and(|l| key <= l) {
            return Err(DataFusionError::Execution(format!(
                "changes of {} are not in key order at {key}; the archive is inconsistent (run `pgtrail verify`)",
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
        let path = archive.segment_path(seg);
        let rows = rows_within(&path, seg, row_groups)?;
        if rows.as_ref().is_some_and(Vec::is_empty) {
            continue;
        }
        let rows = rows.as_deref();
        for batch in open_segment_selected(&path, &seg.sha256, 8192, row_groups, None, rows)? {
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
