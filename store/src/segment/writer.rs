//! Writing one segment: rows go into Arrow builders, batches into a zstd Parquet writer, and
//! the file is published atomically (temp file, fsync, rename, fsync of the directory).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, ListBuilder, MapBuilder, RecordBatch,
    StringBuilder, StringDictionaryBuilder, StructArray, TimestampMicrosecondBuilder,
    UInt32Builder, UInt64Builder,
};
use datafusion::arrow::datatypes::{
    DataType, Int8Type, SchemaRef, TimestampMicrosecondType, UInt32Type, UInt64Type,
};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, Encoding, ZstdLevel};

const IMAGE_INT_ENCODING: Encoding = Encoding::DELTA_BINARY_PACKED;
use datafusion::parquet::file::metadata::{KeyValue, SortingColumn};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};

use super::key_index::KeyIndexBuilder;
use super::types::{PgKind, ValueBuilder};
use super::{SEGMENT_FORMAT_VERSION, SEGMENT_METADATA_KEY, SegmentContent, segment_schema};
use crate::atomic_file::{fsync_dir, remove_if_exists};
use crate::change::{Cell, ChangeRecord, Row};
use crate::crashpoint;
use crate::error::SegmentError;
use crate::evidence::hasher::{LeafHasher, LeafJobs};
use crate::evidence::leaf::Epochs;
use crate::evidence::spill::LeafStream;
use crate::lsn::{ChangeKey, Lsn};

/// The enum type under each column of `content` that has one, by column name: its qualified
/// name and labels in sort order (the segment description's `enums`).
fn enum_columns(
    content: &SegmentContent,
    enums: &crate::EnumTypes,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let SegmentContent::Table(rel) = content else {
        return Default::default();
    };
    rel.columns
        .iter()
        .filter_map(|c| {
            let e = enums.get(&c.type_oid)?;
            Some((
                c.name.clone(),
                serde_json::json!({"type": e.qualified_name(), "labels": e.labels}),
            ))
        })
        .collect()
}

/// How segments are written.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    /// zstd level (1 fastest … 22 smallest).
    pub zstd_level: i32,
    /// Rows per Arrow batch handed to the Parquet writer.
    pub batch_rows: usize,
    /// A batch is handed over early once its values exceed this many bytes, which bounds memory
    /// for wide rows and keeps every string array far below Arrow's 2 GiB offset limit.
    pub batch_bytes: usize,
    /// Row groups end at this many rows ...
    pub row_group_rows: usize,
    /// ... or at this estimated encoded size, whichever comes first.
    pub row_group_bytes: usize,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            zstd_level: 3,
            batch_rows: 8192,
            batch_bytes: 8 << 20,
            row_group_rows: 128 * 1024,
            row_group_bytes: 32 << 20,
        }
    }
}

/// What a published segment holds; the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenSegment {
    pub file_name: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub min_key: ChangeKey,
    pub max_key: ChangeKey,
    pub min_committed_at_us: i64,
    pub max_committed_at_us: i64,
    /// Size of the same changes as stored in the log (uncompressed record encoding).
    pub raw_bytes: u64,
}

/// A write that also hashes and counts what it writes, so the SHA-256 recorded in the manifest
/// is of exactly the bytes that went to the file.
pub(super) struct HashingFile {
    pub(super) out: BufWriter<File>,
    pub(super) hasher: Sha256,
    pub(super) bytes: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// One segment being written. Dropping it without [`finish`](Self::finish) removes the
/// temporary file; nothing is visible under the final name until `finish` returns.
pub struct SegmentWriter {
    dir: PathBuf,
    tmp_path: PathBuf,
    schema: SchemaRef,
    writer: Option<ArrowWriter<HashingFile>>,
    batch: BatchBuilder,
    options: SegmentOptions,
    rows: u64,
    min_key: Option<ChangeKey>,
    max_key: ChangeKey,
    min_ts: i64,
    max_ts: i64,
    raw_bytes: u64,
    content: SegmentContent,
    leaves: Option<LeafJobs>,
    /// The key index's entries (`None`: the table's key is not indexed).
    keys: Option<KeyIndexBuilder>,
}

impl SegmentWriter {
    /// Start a segment in `dir`, written as `.<stem>.tmp` until [`finish`](Self::finish)
    /// names it.
    pub fn create(
        dir: &Path,
        stem: &str,
        content: &SegmentContent,
        enums: &crate::EnumTypes,
        options: &SegmentOptions,
    ) -> Result<SegmentWriter, SegmentError> {
        let tmp_path = dir.join(format!(".{stem}.tmp"));
        let schema = segment_schema(content);
        // Private like the log: a segment holds a copy of production data.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(|source| SegmentError::Io {
                path: tmp_path.clone(),
                source,
            })?;
        let sink = HashingFile {
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let mut description = serde_json::json!({
            "format_version": SEGMENT_FORMAT_VERSION,
            "content": content,
        });
        let enums = enum_columns(content, enums);
        if !enums.is_empty() {
            description["enums"] = serde_json::json!(enums);
        }
        let zstd =
            ZstdLevel::try_new(options.zstd_level).map_err(|source| SegmentError::Parquet {
                path: tmp_path.clone(),
                source,
            })?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(zstd))
            .set_max_row_group_row_count(Some(options.row_group_rows.max(1)))
            .set_max_row_group_bytes(Some(options.row_group_bytes.max(1)))
            .set_statistics_enabled(EnabledStatistics::Chunk)
            // Page statistics (and with them the page index) on the columns readers prune by.
            .set_column_statistics_enabled(ColumnPath::from("lsn"), EnabledStatistics::Page)
            .set_column_statistics_enabled(
                ColumnPath::from("committed_at"),
                EnabledStatistics::Page,
            );
        // Rows are in (lsn, seq) order: the metadata columns are runs of equal or slowly
        // rising integers, which delta encoding stores in a few bits each (dictionaries and
        // plain values cost more, even after zstd).
        let mut props = props;
        for column in ["lsn", "seq", "xid", "committed_at"] {
            props = props
                .set_column_dictionary_enabled(ColumnPath::from(column), false)
                .set_column_encoding(ColumnPath::from(column), Encoding::DELTA_BINARY_PACKED);
        }
        // Integer-like image columns: without a dictionary, whose indices zstd compresses worse
        // than the values themselves (measured by `pgtrail-bench storage` against DuckDB).
        for image in ["before", "after"] {
            if let Ok(field) = schema.field_with_name(image)
                && let DataType::Struct(children) = field.data_type()
            {
                for child in children {
                    if matches!(
                        child.data_type(),
                        DataType::Int16
                            | DataType::Int32
                            | DataType::Int64
                            | DataType::Date32
                            | DataType::Time64(_)
                            | DataType::Timestamp(_, _)
                    ) {
                        let path = ColumnPath::new(vec![image.to_string(), child.name().clone()]);
                        props = props
                            .set_column_dictionary_enabled(path.clone(), false)
                            .set_column_encoding(path, IMAGE_INT_ENCODING);
                    }
                }
            }
        }
        let props = props
            .set_sorting_columns(Some(vec![
                SortingColumn {
                    column_idx: 0,
                    descending: false,
                    nulls_first: false,
                },
                SortingColumn {
                    column_idx: 1,
                    descending: false,
                    nulls_first: false,
                },
            ]))
            .set_key_value_metadata(Some(vec![KeyValue::new(
                SEGMENT_METADATA_KEY.into(),
                description.to_string(),
            )]))
            .build();
        let writer = ArrowWriter::try_new(sink, schema.clone(), Some(props)).map_err(|source| {
            SegmentError::Parquet {
                path: tmp_path.clone(),
                source,
            }
        })?;
        Ok(SegmentWriter {
            dir: dir.to_path_buf(),
            tmp_path,
            batch: BatchBuilder::new(content, schema.clone()),
            schema,
            writer: Some(writer),
            options: options.clone(),
            rows: 0,
            min_key: None,
            max_key: ChangeKey::new(Lsn::ZERO, 0),
            min_ts: i64::MAX,
            max_ts: i64::MIN,
            raw_bytes: 0,
            content: content.clone(),
            leaves: None,
            // 8 bytes a row until `finish` (outside `memory_bytes`, which bounds what a row
            // group flush can release).
            keys: KeyIndexBuilder::for_content(content),
        })
    }

    /// Compute the evidence leaf of every row written from here on, from the Arrow batch that
    /// goes to the file (so a leaf is what the file holds, not what the log held): each batch
    /// goes to `hasher`'s thread as it is written, which writes its leaves to `stream`.
    pub fn compute_leaves(&mut self, hasher: &LeafHasher, epochs: Epochs, stream: LeafStream) {
        self.leaves = Some(hasher.jobs(&self.tmp_path, &self.content, epochs, stream));
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes written to the file so far (flushed row groups).
    pub fn bytes_written(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.bytes_written() as u64)
    }

    /// Bytes held in memory by this writer (the open batch and the open row group).
    pub fn memory_bytes(&self) -> usize {
        self.batch.pending_bytes + self.writer.as_ref().map_or(0, |w| w.in_progress_size())
    }

    fn note(&mut self, key: ChangeKey, committed_at_us: i64) {
        self.min_key.get_or_insert(key);
        self.max_key = key;
        self.min_ts = self.min_ts.min(committed_at_us);
        self.max_ts = self.max_ts.max(committed_at_us);
        self.rows += 1;
    }

    /// Append one change from the log. Keys must come in increasing order.
    pub fn push(
        &mut self,
        key: ChangeKey,
        record: &ChangeRecord,
        raw_len: u64,
    ) -> Result<(), SegmentError> {
        self.note(key, record.committed_at_us);
        self.raw_bytes += raw_len;
        self.batch.push(key, record);
        if self.batch.rows >= self.options.batch_rows
            || self.batch.pending_bytes >= self.options.batch_bytes
        {
            self.write_batch()?;
        }
        Ok(())
    }

    /// Append a batch read from an existing segment of the same content (merging). Its rows
    /// must follow every row pushed before.
    pub fn push_batch(&mut self, batch: &RecordBatch, raw_bytes: u64) -> Result<(), SegmentError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.write_batch()?;
        let lsn = batch.column(0).as_primitive::<UInt64Type>();
        let seq = batch.column(1).as_primitive::<UInt32Type>();
        let ts = batch.column(3).as_primitive::<TimestampMicrosecondType>();
        let last = batch.num_rows() - 1;
        self.min_key
            .get_or_insert(ChangeKey::new(Lsn(lsn.value(0)), seq.value(0)));
        self.max_key = ChangeKey::new(Lsn(lsn.value(last)), seq.value(last));
        self.rows += batch.num_rows() as u64;
        for t in ts.values().iter() {
            self.min_ts = self.min_ts.min(*t);
            self.max_ts = self.max_ts.max(*t);
        }
        self.raw_bytes += raw_bytes;
        let batch = batch
            .clone()
            .with_schema(self.schema.clone())
            .map_err(SegmentError::Arrow)?;
        self.write(&batch)
    }

    fn write_batch(&mut self) -> Result<(), SegmentError> {
        if self.batch.rows == 0 {
            return Ok(());
        }
        let batch = self.batch.finish()?;
        self.write(&batch)
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), SegmentError> {
        let writer = self.writer.as_mut().ok_or_else(|| SegmentError::Corrupt {
            path: self.tmp_path.clone(),
            reason: "segment writer used after an error".into(),
        })?;
        let path = &self.tmp_path;
        if let Some(keys) = self.keys.as_mut() {
            keys.add(batch).map_err(|reason| SegmentError::Corrupt {
                path: path.clone(),
                reason: format!("cannot index its keys: {reason}"),
            })?;
        }
        writer
            .write(batch)
            .map_err(|source| SegmentError::Parquet {
                path: path.clone(),
                source,
            })?;
        // The leaves are hashed on the run's hashing thread, beside the reading, building and
        // encoding of the batches after this one (see `evidence::hasher`).
        match &self.leaves {
            Some(jobs) => jobs.send(batch),
            None => Ok(()),
        }
    }

    /// End the open row group now (bounds memory when many segments are open at once).
    pub fn flush_row_group(&mut self) -> Result<(), SegmentError> {
        self.write_batch()?;
        let path = self.tmp_path.clone();
        match self.writer.as_mut() {
            Some(w) => w
                .flush()
                .map_err(|source| SegmentError::Parquet { path, source }),
            None => Ok(()),
        }
    }

    /// Write the footer, make the file durable and publish it under the name `name_for`
    /// gives for its key range (first and last key).
    ///
    /// Crash safety: until the rename the file exists only under its temporary name, which
    /// startup removes. After the rename (and the directory fsync) the file is complete and
    /// durable but listed nowhere; the caller records it in the manifest, and a file the
    /// manifest does not list is an orphan that startup removes (its rows are still in the log,
    /// because the log is trimmed in the same redb transaction that lists the segment).
    pub fn finish(
        mut self,
        name_for: impl FnOnce(ChangeKey, ChangeKey) -> String,
    ) -> Result<WrittenSegment, SegmentError> {
        self.write_batch()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SegmentError::Io { path, source }
        };
        let writer = self.writer.take().ok_or_else(|| SegmentError::Corrupt {
            path: self.tmp_path.clone(),
            reason: "segment writer used after an error".into(),
        })?;
        crashpoint::hit("segment:before_footer");
        let mut sink = writer
            .into_inner()
            .map_err(|source| SegmentError::Parquet {
                path: self.tmp_path.clone(),
                source,
            })?;
        sink.flush().map_err(io(&self.tmp_path))?;
        let HashingFile { out, hasher, bytes } = sink;
        let file = out.into_inner().map_err(|e| SegmentError::Io {
            path: self.tmp_path.clone(),
            source: e.into_error(),
        })?;
        crashpoint::hit("segment:before_fsync");
        // A failed fsync is never retried (fsyncgate): the error aborts this segment and its
        // rows stay in the log.
        file.sync_all().map_err(io(&self.tmp_path))?;
        drop(file);
        let min_key = self.min_key.unwrap_or(self.max_key);
        let file_name = name_for(min_key, self.max_key);
        let final_path = self.dir.join(&file_name);
        crashpoint::hit("segment:before_rename");
        std::fs::rename(&self.tmp_path, &final_path).map_err(io(&final_path))?;
        crashpoint::hit("segment:before_dir_fsync");
        fsync_dir(&self.dir)?;
        let sha256 = hex(&hasher.finalize());
        // The key index is published after its segment and, like it, before the manifest
        // commit that lists the segment: a crash before that commit leaves both unlisted (the
        // next run removes them); after it, both are complete and durable.
        if let Some(keys) = self.keys.take() {
            crashpoint::hit("segment:before_key_index");
            keys.write(&self.dir, &file_name, &sha256)?;
        }
        Ok(WrittenSegment {
            file_name,
            rows: self.rows,
            bytes,
            sha256,
            min_key,
            max_key: self.max_key,
            min_committed_at_us: if self.rows == 0 { 0 } else { self.min_ts },
            max_committed_at_us: if self.rows == 0 { 0 } else { self.max_ts },
            raw_bytes: self.raw_bytes,
        })
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        // Abandoned (error or early return): the temporary file is never published.
        remove_if_exists(&self.tmp_path);
    }
}

/// Lowercase hexadecimal of `bytes`. Written out, not formatted: a purge writes several
/// digests for each of a million changes, and `format!` per byte allocated each time.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Builders for one batch of rows.
struct BatchBuilder {
    schema: SchemaRef,
    rows: usize,
    pending_bytes: usize,
    lsn: UInt64Builder,
    seq: UInt32Builder,
    xid: UInt32Builder,
    committed_at: TimestampMicrosecondBuilder,
    body: Body,
}

// One `Body` per segment being written, never a collection of them: the size difference
// between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Body {
    Table {
        names: Vec<String>,
        kinds: Vec<PgKind>,
        op: StringDictionaryBuilder<Int8Type>,
        context: StringBuilder,
        changed: ListBuilder<StringBuilder>,
        before: Image,
        after: Image,
    },
    Messages {
        transactional: BooleanBuilder,
        prefix: StringBuilder,
        content: BinaryBuilder,
        content_text: StringBuilder,
    },
}

/// The builders of one row image column and its side columns.
struct Image {
    values: Vec<ValueBuilder>,
    valid: Vec<bool>,
    unknown: ListBuilder<StringBuilder>,
    text: MapBuilder<StringBuilder, StringBuilder>,
}

impl Image {
    fn new(kinds: &[PgKind]) -> Image {
        Image {
            values: kinds.iter().map(ValueBuilder::new).collect(),
            valid: Vec::new(),
            unknown: ListBuilder::new(StringBuilder::new()),
            text: MapBuilder::new(None, StringBuilder::new(), StringBuilder::new()),
        }
    }

    /// Append one image; returns the bytes of text it held.
    fn push(&mut self, names: &[String], row: Option<&Row>) -> usize {
        let Some(row) = row else {
            self.values.iter_mut().for_each(ValueBuilder::append_null);
            self.valid.push(false);
            self.unknown.append_null();
            // Appending a null map entry never fails (the builders are in step).
            let _ = self.text.append(false);
            return 0;
        };
        let mut bytes = 0;
        let mut unknown = Vec::new();
        let mut exact = Vec::new();
        for (i, builder) in self.values.iter_mut().enumerate() {
            match row.get(i) {
                Some(Cell::Text(t)) => {
                    bytes += t.len();
                    if builder.append_text(t).is_err() {
                        builder.append_null();
                        exact.push((i, t.as_str()));
                    }
                }
                Some(Cell::Unknown) => {
                    builder.append_null();
                    unknown.push(i);
                }
                Some(Cell::Null) | None => builder.append_null(),
            }
        }
        self.valid.push(true);
        if unknown.is_empty() {
            self.unknown.append_null();
        } else {
            for i in unknown {
                self.unknown.values().append_value(&names[i]);
            }
            self.unknown.append(true);
        }
        if exact.is_empty() {
            let _ = self.text.append(false);
        } else {
            for (i, t) in exact {
                self.text.keys().append_value(&names[i]);
                self.text.values().append_value(t);
                bytes += t.len();
            }
            let _ = self.text.append(true);
        }
        bytes
    }

    fn finish(
        &mut self,
        fields: &datafusion::arrow::datatypes::Fields,
    ) -> Result<ArrayRef, SegmentError> {
        let arrays: Vec<ArrayRef> = self.values.iter_mut().map(ValueBuilder::finish).collect();
        let nulls = std::mem::take(&mut self.valid).into();
        Ok(Arc::new(
            StructArray::try_new(fields.clone(), arrays, Some(nulls))
                .map_err(SegmentError::Arrow)?,
        ))
    }
}

fn changed_columns(
    names: &[String],
    before: Option<&Row>,
    after: Option<&Row>,
) -> Option<Vec<String>> {
    let (before, after) = (before?, after?);
    Some(
        names
            .iter()
            .enumerate()
            .filter(|(i, _)| match (before.get(*i), after.get(*i)) {
                (Some(Cell::Unknown), _) => true,
                (_, Some(Cell::Unknown)) => false,
                (b, a) => b != a,
            })
            .map(|(_, n)| n.clone())
            .collect(),
    )
}

impl BatchBuilder {
    fn new(content: &SegmentContent, schema: SchemaRef) -> BatchBuilder {
        let body = match content {
            SegmentContent::Table(rel) => {
                let kinds: Vec<PgKind> = rel
                    .columns
                    .iter()
                    .map(|c| PgKind::of(c.type_oid, c.type_modifier))
                    .collect();
                Body::Table {
                    names: rel.columns.iter().map(|c| c.name.clone()).collect(),
                    op: StringDictionaryBuilder::new(),
                    context: StringBuilder::new(),
                    changed: ListBuilder::new(StringBuilder::new()),
                    before: Image::new(&kinds),
                    after: Image::new(&kinds),
                    kinds,
                }
            }
            SegmentContent::Messages => Body::Messages {
                transactional: BooleanBuilder::new(),
                prefix: StringBuilder::new(),
                content: BinaryBuilder::new(),
                content_text: StringBuilder::new(),
            },
        };
        BatchBuilder {
            schema,
            rows: 0,
            pending_bytes: 0,
            lsn: UInt64Builder::new(),
            seq: UInt32Builder::new(),
            xid: UInt32Builder::new(),
            committed_at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            body,
        }
    }

    fn push(&mut self, key: ChangeKey, record: &ChangeRecord) {
        self.lsn.append_value(key.commit_lsn.0);
        self.seq.append_value(key.seq);
        self.xid.append_value(record.xid);
        self.committed_at.append_value(record.committed_at_us);
        self.rows += 1;
        self.pending_bytes += 64;
        match &mut self.body {
            Body::Table {
                names,
                op,
                context,
                changed,
                before,
                after,
                ..
            } => {
                op.append_value(record.op.as_str());
                context.append_option(record.context.as_deref());
                self.pending_bytes += record.context.as_ref().map_or(0, String::len);
                match changed_columns(names, record.before.as_ref(), record.after.as_ref()) {
                    Some(cols) => {
                        for c in cols {
                            changed.values().append_value(c);
                        }
                        changed.append(true);
                    }
                    None => changed.append_null(),
                }
                self.pending_bytes += before.push(names, record.before.as_ref());
                self.pending_bytes += after.push(names, record.after.as_ref());
            }
            Body::Messages {
                transactional,
                prefix,
                content,
                content_text,
            } => {
                let m = record.message.as_ref();
                transactional.append_value(m.is_some_and(|m| m.transactional));
                prefix.append_value(m.map_or("", |m| m.prefix.as_str()));
                let bytes = m.map_or(&[][..], |m| m.content.as_slice());
                content.append_value(bytes);
                content_text.append_option(std::str::from_utf8(bytes).ok());
                self.pending_bytes += 2 * bytes.len();
            }
        }
    }

    fn finish(&mut self) -> Result<RecordBatch, SegmentError> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.lsn.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.xid.finish()),
            Arc::new(self.committed_at.finish()),
        ];
        match &mut self.body {
            Body::Table {
                kinds,
                op,
                context,
                changed,
                before,
                after,
                ..
            } => {
                columns.push(Arc::new(op.finish()));
                columns.push(Arc::new(context.finish()));
                columns.push(Arc::new(changed.finish()));
                if !kinds.is_empty() {
                    let DataType::Struct(fields) = self
                        .schema
                        .field_with_name("before")
                        .map_err(SegmentError::Arrow)?
                        .data_type()
                        .clone()
                    else {
                        return Err(SegmentError::Arrow(
                            datafusion::arrow::error::ArrowError::SchemaError(
                                "before is not a struct".into(),
                            ),
                        ));
                    };
                    columns.push(before.finish(&fields)?);
                    columns.push(after.finish(&fields)?);
                } else {
                    before.valid.clear();
                    after.valid.clear();
                }
                columns.push(Arc::new(before.unknown.finish()));
                columns.push(Arc::new(after.unknown.finish()));
                columns.push(Arc::new(before.text.finish()));
                columns.push(Arc::new(after.text.finish()));
            }
            Body::Messages {
                transactional,
                prefix,
                content,
                content_text,
            } => {
                columns.push(Arc::new(transactional.finish()));
                columns.push(Arc::new(prefix.finish()));
                columns.push(Arc::new(content.finish()));
                columns.push(Arc::new(content_text.finish()));
            }
        }
        self.rows = 0;
        self.pending_bytes = 0;
        RecordBatch::try_new(self.schema.clone(), columns).map_err(SegmentError::Arrow)
    }
}

/// Build one batch in the segment layout of `content` from change records (the log tail,
/// for readers that show segments and tail as one table).
pub fn records_to_batch(
    content: &SegmentContent,
    records: &[(ChangeKey, ChangeRecord)],
) -> Result<RecordBatch, SegmentError> {
    let mut builder = BatchBuilder::new(content, segment_schema(content));
    for (key, record) in records {
        builder.push(*key, record);
    }
    builder.finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_writes_each_byte_as_two_lowercase_digits() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff, 0x10]), "000fa5ff10");
        assert_eq!(super::hex(&[]), "");
    }
}
