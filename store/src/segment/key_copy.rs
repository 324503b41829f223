//! The key-ordered copy of a table segment: the same rows, in the order of its key index's
//! entries, so that one row's history reads a few neighbouring rows instead of one page per
//! column for each of its changes.
//!
//! A segment is in `(lsn, seq)` order, so a row that changed a few hundred times has its
//! changes in a few hundred pages of every column, and reading them decompresses each of those
//! pages whole (a page holds up to 20,000 rows). The key index ([`super::key_index`]) names
//! the rows; this copy puts them side by side: row `i` of the copy is the segment row of the
//! index's entry `i`, and the index's entries are sorted by key hash, so the changes of one key
//! are a run of consecutive rows (in `(lsn, seq)` order within the run, since entries of one
//! hash are sorted by row). Its pages are small (at most 64 KiB or 512 rows) and
//! dictionary-free, so a run costs about one page per column, and its row groups are small
//! (8,192 rows), so those pages lie in one or two row groups read at once.
//!
//! # File
//!
//! `<segment file>.keyrows` beside the segment (not `*.parquet`, so that a reader globbing the
//! segments never counts a change twice). Parquet, zstd, with the segment's columns and its
//! `pgtrail.segment` metadata (so it reads as a segment of that table), and
//! `pgtrail.key_order`: JSON with this layout's version, the segment's SHA-256 and the number
//! of entries. A change whose key changed is in the copy twice (once per key hash), a change
//! with no indexed key not at all.
//!
//! # Trust
//!
//! Derived data, like the key index: the index records the copy's SHA-256, a reader checks the
//! copy against it before using any of it (a damaged, stale or missing copy is reported and
//! the segment read instead), and the rows it gives are compared with the key like the
//! segment's are. `pgtrail compact` writes the copy of every listed keyed segment that lacks a
//! valid one.
//!
//! # Crash safety
//!
//! Written after its segment is listed (by the compactor, which alone retires segments), as a
//! temporary file published by rename, and only then named in a new key index, itself
//! published atomically: a crash leaves a `.tmp` file (removed by the next run) or a copy the
//! index does not name yet (written again by the next run). It is removed with its segment.

use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::interleave_record_batch;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use sha2::{Digest, Sha256};

use super::SEGMENT_METADATA_KEY;
use super::reader::{SegmentReader, check_sha256};
use super::writer::HashingFile;
use crate::atomic_file::{fsync_dir, remove_if_exists};
use crate::error::SegmentError;
use crate::parallel_parquet::ParallelWriter;

/// What follows a segment's file name to name its key-ordered copy.
pub const KEY_COPY_SUFFIX: &str = ".keyrows";
/// The Parquet key-value metadata key that tells a copy from a segment.
pub const KEY_COPY_METADATA_KEY: &str = "pgtrail.key_order";
/// The version of the copy's layout described above.
pub const KEY_COPY_FORMAT_VERSION: u32 = 1;
/// Page limits of the copy: a key's run of changes costs about one page per column.
const PAGE_ROWS: usize = 512;
const PAGE_BYTES: usize = 64 << 10;
/// Small row groups put a key's pages of every column near each other, in a few hundred KiB
/// that the reader fetches with one read (see the segment reader's `SpanReader`): on the bench
/// archive a cold key's history took 11 ms with row groups of 128Ki rows, 6.8 ms with these
/// (5.8 ms with 4096 rows, whose footers are twice the size, parsed once per file and kept).
const ROW_GROUP_ROWS: usize = 8192;
/// Rows interleaved into the copy at a time.
const OUT_BATCH_ROWS: usize = 8192;
/// The fewest entries a pass gathers, however large the rows are estimated.
pub(crate) const MIN_PASS_ROWS: usize = 64;

/// The key-ordered copy file of segment file `segment_file`.
pub fn key_copy_name(segment_file: &str) -> String {
    format!("{segment_file}{KEY_COPY_SUFFIX}")
}

/// A key-ordered copy as written: its SHA-256 (hex) and what each of its passes held.
#[derive(Debug, Clone)]
pub struct KeyCopyWritten {
    pub sha256: String,
    pub passes: Vec<KeyCopyPass>,
}

/// One pass of a key-ordered copy: the entries it was sized for, the distinct rows it read,
/// and the bytes those rows took decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCopyPass {
    pub entries: usize,
    pub rows: usize,
    pub decoded_bytes: usize,
}

/// Write the key-ordered copy of the segment `segment_file` in `dir` (its manifest SHA-256
/// `segment_sha256`), given its key index's `entries` (`(key hash, row)`, sorted), holding
/// about `memory_budget` bytes of rows at a time.
///
/// The rows are gathered in passes over the segment, each a slice of the entries sized to the
/// budget, so a segment far larger than memory is copied in several passes rather than
/// refused. The first pass is sized by an estimate of a row (see [`pass_bytes_per_row`]), each
/// later one by the largest a row has been measured to take in the passes so far.
pub fn write_key_copy(
    dir: &Path,
    segment_file: &str,
    segment_sha256: &str,
    entries: &[(u32, u32)],
    zstd_level: i32,
    memory_budget: usize,
) -> Result<KeyCopyWritten, SegmentError> {
    let segment_path = dir.join(segment_file);
    let final_path = dir.join(key_copy_name(segment_file));
    let tmp_path = dir.join(format!(".{}.tmp", key_copy_name(segment_file)));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SegmentError::Io { path, source }
    };
    let parquet = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SegmentError::Parquet { path, source }
    };
    let (schema, description, parquet_bytes_per_row) = {
        let file = File::open(&segment_path).map_err(io(&segment_path))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet(&segment_path))?;
        let meta = builder.metadata();
        let rows = meta.file_metadata().num_rows().max(1) as usize;
        let raw: i64 = meta
            .row_groups()
            .iter()
            .map(|rg| rg.total_byte_size())
            .sum();
        let description = meta
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|kv| kv.key == SEGMENT_METADATA_KEY))
            .and_then(|kv| kv.value.clone())
            .ok_or_else(|| SegmentError::Corrupt {
                path: segment_path.clone(),
                reason: format!("no {SEGMENT_METADATA_KEY} metadata: not a pgtrail segment"),
            })?;
        (
            builder.schema().clone(),
            description,
            (raw.max(0) as usize / rows).max(1),
        )
    };
    // Checked once here rather than trusted (the copy is believed by readers that check only
    // the copy); the passes then read the same immutable file without hashing it again.
    check_sha256(&segment_path, segment_sha256)?;
    let mut bytes_per_row = pass_bytes_per_row(&segment_path, parquet_bytes_per_row)?;
    let zstd = ZstdLevel::try_new(zstd_level).map_err(parquet(&tmp_path))?;
    let order = serde_json::json!({
        "format_version": KEY_COPY_FORMAT_VERSION,
        "segment_sha256": segment_sha256,
        "entries": entries.len(),
    });
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(zstd))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_data_page_size_limit(PAGE_BYTES)
        .set_write_batch_size(PAGE_ROWS)
        // A dictionary page is read whole before any value of its column chunk: for one run
        // of rows it would cost more than the run.
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::None)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(SEGMENT_METADATA_KEY.into(), description),
            KeyValue::new(KEY_COPY_METADATA_KEY.into(), order.to_string()),
        ]))
        .build();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp_path)
        .map_err(io(&tmp_path))?;
    let result = (|| {
        let sink = HashingFile {
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        // Encoding and compressing the copy was most of its writing time, on one thread.
        let mut writer =
            ParallelWriter::try_new(sink, schema.clone(), props).map_err(parquet(&tmp_path))?;
        let mut passes = Vec::new();
        let mut start = 0;
        while start < entries.len() {
            let per_pass = (memory_budget / bytes_per_row).max(MIN_PASS_ROWS);
            let slice = &entries[start..entries.len().min(start.saturating_add(per_pass))];
            let pass = gather(&segment_path, slice, |batch| {
                writer.write(&batch).map_err(parquet(&tmp_path))
            })?;
            // Rows read through a selection can sit in larger buffers than the first batch
            // the estimate sampled (a pass of the 10M-row transaction's segment, sized at
            // 256 MiB, held 314 MiB): the passes after it are sized by what was measured.
            if let Some(measured) = pass.decoded_bytes.checked_div(pass.rows) {
                bytes_per_row = bytes_per_row.max(measured + std::mem::size_of::<usize>());
            }
            passes.push(pass);
            start += slice.len();
        }
        let sink = writer.into_inner().map_err(parquet(&tmp_path))?;
        let HashingFile { out, hasher, .. } = sink;
        let file = out.into_inner().map_err(|e| SegmentError::Io {
            path: tmp_path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&tmp_path))?;
        drop(file);
        std::fs::rename(&tmp_path, &final_path).map_err(io(&final_path))?;
        fsync_dir(dir)?;
        Ok(KeyCopyWritten {
            sha256: super::hex(&hasher.finalize()),
            passes,
        })
    })();
    if result.is_err() {
        remove_if_exists(&tmp_path);
    }
    result
}

/// The memory a pass holds per row it gathers: the row decoded (the decoded size of the
/// segment's first batch, per row, and at least twice its Parquet bytes per row), and its
/// number in the pass's sorted list of rows.
///
/// Parquet's uncompressed bytes alone were the estimate before, and they undercount rows
/// whose columns encode to almost nothing (the LSN, transaction and time of a large
/// transaction's rows are runs of one value): the copy of a 7.2M-row segment of one
/// 10M-row transaction, estimated at 88 bytes a row, held 1.3 GB in passes meant for 256 MiB.
pub(crate) fn pass_bytes_per_row(
    segment_path: &Path,
    parquet_bytes_per_row: usize,
) -> Result<usize, SegmentError> {
    let sampled = match SegmentReader::open(segment_path, None, OUT_BATCH_ROWS)?.next() {
        Some(batch) => {
            let batch = batch?;
            batch.get_array_memory_size() / batch.num_rows().max(1)
        }
        None => 0,
    };
    Ok(sampled.max(parquet_bytes_per_row * 2) + std::mem::size_of::<usize>())
}

/// Call `emit` with the segment rows of `slice` (entries of the key index, in order) as
/// batches in that order: one read of the segment selecting those rows, then interleaves into
/// the entries' order, each handed on as it is made (only the rows read are held, not a
/// second copy of them in the new order); what the pass held.
fn gather(
    segment_path: &Path,
    slice: &[(u32, u32)],
    mut emit: impl FnMut(RecordBatch) -> Result<(), SegmentError>,
) -> Result<KeyCopyPass, SegmentError> {
    // A row is in the slice once per key hash it has there (twice when its key changed).
    let mut rows: Vec<usize> = slice.iter().map(|&(_, row)| row as usize).collect();
    rows.sort_unstable();
    rows.dedup();
    let reader = SegmentReader::open_selected(
        segment_path,
        // Checked by the caller, before the first pass.
        None,
        OUT_BATCH_ROWS,
        (0, u64::MAX),
        (i64::MIN, i64::MAX),
        None,
        Some(&rows),
    )?;
    // The rows come in `rows`' order: the one at rank r of `rows` is in the batch whose
    // first rank is the last one at or before r.
    let mut batches = Vec::new();
    let mut first_ranks = Vec::new();
    let (mut read, mut decoded_bytes) = (0, 0);
    for batch in reader {
        let batch = batch?;
        first_ranks.push(read);
        read += batch.num_rows();
        decoded_bytes += batch.get_array_memory_size();
        batches.push(batch);
    }
    // What the pass holds, against its estimate (`PGTRAIL_LOG=debug`): the README's figure of
    // a pass's memory comes from here.
    tracing::debug!(
        segment = %segment_path.display(),
        rows = read,
        entries = slice.len(),
        decoded_bytes,
        "key-ordered copy: a pass read its rows"
    );
    if read > rows.len() {
        return Err(SegmentError::Corrupt {
            path: segment_path.to_path_buf(),
            reason: "it yields more rows than were selected".into(),
        });
    }
    if read < rows.len() {
        return Err(SegmentError::Corrupt {
            path: segment_path.to_path_buf(),
            reason: format!(
                "its key index names row {} but it has fewer rows",
                rows.last().copied().unwrap_or(0)
            ),
        });
    }
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    for chunk in slice.chunks(OUT_BATCH_ROWS) {
        let indices: Vec<(usize, usize)> = chunk
            .iter()
            .map(|&(_, row)| {
                // Every row of the slice is in `rows`, which holds exactly the rows read.
                let rank = rows.partition_point(|&r| r < row as usize);
                let batch = first_ranks.partition_point(|&first| first <= rank) - 1;
                (batch, rank - first_ranks[batch])
            })
            .collect();
        emit(
            interleave_record_batch(&refs, &indices).map_err(|e| SegmentError::Corrupt {
                path: segment_path.to_path_buf(),
                reason: format!("its rows cannot be put in key order: {e}"),
            })?,
        )?;
    }
    Ok(KeyCopyPass {
        entries: slice.len(),
        rows: read,
        decoded_bytes,
    })
}
