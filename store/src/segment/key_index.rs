//! The key index of a table segment: which rows of the segment hold a change of a given row
//! (by its primary key), so that one row's history reads those rows instead of every key of
//! every change.
//!
//! A segment is in `(lsn, seq)` order, so one key's changes are spread over all of it; without
//! an index, finding them decodes the key columns of every change (and Parquet statistics do
//! not help: a key that changes often has changes in every row group). The index is a file
//! beside its segment, `<segment file>.keys`, written with it before the manifest commit that
//! lists the segment, and removed with it. It is derived data: losing it loses nothing (reads
//! fall back to scanning, and every compaction, `pgtrail compact` too, writes the index of any
//! listed segment that lacks a valid one), and it is checked before use
//! (a damaged or stale index is never believed).
//!
//! # File format (version 2, little-endian)
//!
//! | bytes | what |
//! |-------|------|
//! | 8     | magic `PGTRKEYS` |
//! | 4     | format version (2) |
//! | 4     | entries per block `B` (1024) |
//! | 8     | entries `n` |
//! | 32    | SHA-256 of the segment file the index describes |
//! | 32    | SHA-256 of the segment's key-ordered copy ([`super::key_copy`]), or zeros: none |
//! | 8 × n | entries: `(key hash u32, row u32)`, sorted; blocks of `B` entries, the last shorter |
//! | 24 × ⌈n / B⌉ | directory, per block: first and last key hash (u32 each), first 16 bytes of the block's SHA-256 |
//! | 32    | SHA-256 of the header (the first 88 bytes) and the directory |
//!
//! Version 1 is the same without the copy's SHA-256 (a 56-byte header); it is still read.
//!
//! An entry says: row `row` (numbered from 0 in file order) has key hash `hash` in its
//! `before` or its `after` image (a change whose key changed has an entry for each). The key
//! hash is FNV-1a (64-bit) over the key columns in key order, each as a tag byte and its
//! value: `0x01` and the value as i64 for integers (any width, so a key widened from `int4`
//! to `int8` hashes alike), `0x02`, the length as u32 and the UTF-8 bytes for text, `0x03`
//! and the 16 bytes for a uuid; the 64 bits folded to 32 (`h ^ (h >> 32)`). A hash is not a
//! key: rows found through it are compared with the key itself before they are used. Keys of
//! other types are not indexed (no file is written; reads scan).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Int16Type, Int32Type, Int64Type};
use sha2::{Digest, Sha256};

use super::SegmentContent;
use crate::atomic_file::write_atomically;
use crate::error::SegmentError;

/// What follows a segment's file name to name its key index.
pub const KEY_INDEX_SUFFIX: &str = ".keys";
const MAGIC: &[u8; 8] = b"PGTRKEYS";
const VERSION: u32 = 2;
const BLOCK: usize = 1024;
/// Header sizes of versions 1 and 2.
const HEADER_V1: usize = 56;
const HEADER: usize = 88;
const DIRECTORY_ENTRY: usize = 24;

/// The key index file of segment file `segment_file`.
pub fn key_index_name(segment_file: &str) -> String {
    format!("{segment_file}{KEY_INDEX_SUFFIX}")
}

/// One key column's value, as the key hash takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPart<'a> {
    Int(i64),
    Text(&'a str),
    Uuid(&'a [u8]),
}

/// The tag byte values stored as `data_type` hash under (see the module doc), or `None` if
/// key columns of that type are not indexed.
fn hash_tag(data_type: &DataType) -> Option<u8> {
    match data_type {
        DataType::Int16 | DataType::Int32 | DataType::Int64 => Some(1),
        DataType::Utf8 => Some(2),
        DataType::FixedSizeBinary(16) => Some(3),
        _ => None,
    }
}

/// Whether a key stored as `a` and one stored as `b` hash alike when their values are equal
/// (integers of any width; text; uuid).
pub fn same_hash_family(a: &DataType, b: &DataType) -> bool {
    hash_tag(a).is_some() && hash_tag(a) == hash_tag(b)
}

/// The key hash of one key (its columns' values in key order).
pub fn key_hash(parts: &[KeyPart<'_>]) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for part in parts {
        match part {
            KeyPart::Int(v) => {
                eat(&[1]);
                eat(&v.to_le_bytes());
            }
            KeyPart::Text(s) => {
                eat(&[2]);
                eat(&(s.len() as u32).to_le_bytes());
                eat(s.as_bytes());
            }
            KeyPart::Uuid(b) => {
                eat(&[3]);
                eat(b);
            }
        }
    }
    (h ^ (h >> 32)) as u32
}

/// The value of row `row` of a key column, or `None` if it is null or of a type not indexed.
fn part_at(array: &dyn Array, row: usize) -> Option<KeyPart<'_>> {
    if array.is_null(row) {
        return None;
    }
    Some(match array.data_type() {
        DataType::Int16 => KeyPart::Int(array.as_primitive::<Int16Type>().value(row).into()),
        DataType::Int32 => KeyPart::Int(array.as_primitive::<Int32Type>().value(row).into()),
        DataType::Int64 => KeyPart::Int(array.as_primitive::<Int64Type>().value(row)),
        DataType::Utf8 => KeyPart::Text(array.as_string::<i32>().value(row)),
        DataType::FixedSizeBinary(16) => KeyPart::Uuid(array.as_fixed_size_binary().value(row)),
        _ => return None,
    })
}

/// Collects a segment's entries while it is written, in the order its rows are written.
#[derive(Debug)]
pub struct KeyIndexBuilder {
    key: Vec<String>,
    entries: Vec<(u32, u32)>,
    rows: u64,
}

impl KeyIndexBuilder {
    /// A builder for a segment holding `content`, or `None` if its key is not indexed (no key,
    /// messages, a key column of a type without a key hash).
    pub fn for_content(content: &SegmentContent) -> Option<KeyIndexBuilder> {
        let SegmentContent::Table(version) = content else {
            return None;
        };
        if version.primary_key.is_empty() {
            return None;
        }
        // The key columns as the segment stores them.
        let schema = super::segment_schema(content);
        let DataType::Struct(fields) = schema.field_with_name("after").ok()?.data_type() else {
            return None;
        };
        for name in &version.primary_key {
            hash_tag(fields.find(name)?.1.data_type())?;
        }
        Some(KeyIndexBuilder {
            key: version.primary_key.clone(),
            entries: Vec::new(),
            rows: 0,
        })
    }

    /// The key columns, in key order.
    pub fn key(&self) -> &[String] {
        &self.key
    }

    /// Memory held by the entries so far.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(u32, u32)>()
    }

    /// Add the rows of `batch`, the next rows of the segment (in its table schema).
    pub fn add(&mut self, batch: &RecordBatch) -> Result<(), String> {
        // Each image present in the segment, with its key columns.
        let mut images: Vec<(&dyn Array, Vec<&ArrayRef>)> = Vec::new();
        for name in ["before", "after"] {
            let Some(image) = batch.column_by_name(name) else {
                continue;
            };
            let fields = image
                .as_struct_opt()
                .ok_or_else(|| format!("the {name} image is not a struct"))?;
            let columns = self
                .key
                .iter()
                .map(|k| {
                    fields
                        .column_by_name(k)
                        .ok_or_else(|| format!("the {name} image has no key column {k}"))
                })
                .collect::<Result<Vec<_>, String>>()?;
            images.push((image.as_ref(), columns));
        }
        let mut parts = Vec::with_capacity(self.key.len());
        for row in 0..batch.num_rows() {
            let number = u32::try_from(self.rows + row as u64)
                .map_err(|_| "a segment of more than 2^32 rows has no key index".to_string())?;
            let mut previous = None;
            for (image, columns) in &images {
                if image.is_null(row) {
                    continue;
                }
                parts.clear();
                for column in columns {
                    match part_at(column.as_ref(), row) {
                        Some(part) => parts.push(part),
                        None => break,
                    }
                }
                if parts.len() != columns.len() {
                    continue;
                }
                let hash = key_hash(&parts);
                if previous != Some(hash) {
                    self.entries.push((hash, number));
                    previous = Some(hash);
                }
            }
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// The entries collected, sorted as the index stores them.
    pub fn into_entries(mut self) -> Vec<(u32, u32)> {
        self.entries.sort_unstable();
        self.entries
    }

    /// Write the index of segment file `segment_file` in `dir` (whose SHA-256 is
    /// `segment_sha256`, hex), naming no key-ordered copy yet (see [`write_index`]).
    pub fn write(
        self,
        dir: &Path,
        segment_file: &str,
        segment_sha256: &str,
    ) -> Result<(), SegmentError> {
        write_index(
            dir,
            segment_file,
            segment_sha256,
            &self.into_entries(),
            None,
        )
    }
}

/// Write the key index of segment file `segment_file` in `dir` (whose SHA-256 is
/// `segment_sha256`, hex) with its sorted `entries` and, if written, the SHA-256 of the
/// segment's key-ordered copy, atomically: complete and durable under its name, or absent.
pub fn write_index(
    dir: &Path,
    segment_file: &str,
    segment_sha256: &str,
    entries: &[(u32, u32)],
    copy_sha256: Option<&str>,
) -> Result<(), SegmentError> {
    let path = dir.join(key_index_name(segment_file));
    let corrupt = |what: &str| SegmentError::Corrupt {
        path: path.clone(),
        reason: format!("the {what} SHA-256 is not 64 hex digits"),
    };
    let digest = unhex(segment_sha256).ok_or_else(|| corrupt("segment's"))?;
    let copy = match copy_sha256 {
        Some(hex) => unhex(hex).ok_or_else(|| corrupt("key-ordered copy's"))?,
        None => [0u8; 32],
    };
    debug_assert!(entries.is_sorted());
    let n = entries.len();
    let blocks = n.div_ceil(BLOCK);
    let mut bytes = Vec::with_capacity(HEADER + 8 * n + DIRECTORY_ENTRY * blocks + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    bytes.extend_from_slice(&(n as u64).to_le_bytes());
    bytes.extend_from_slice(&digest);
    bytes.extend_from_slice(&copy);
    for (hash, row) in entries {
        bytes.extend_from_slice(&hash.to_le_bytes());
        bytes.extend_from_slice(&row.to_le_bytes());
    }
    let mut directory = Vec::with_capacity(DIRECTORY_ENTRY * blocks);
    for (i, block) in entries.chunks(BLOCK).enumerate() {
        let start = HEADER + i * BLOCK * 8;
        let block_digest = Sha256::digest(&bytes[start..start + block.len() * 8]);
        directory.extend_from_slice(&block[0].0.to_le_bytes());
        directory.extend_from_slice(&block[block.len() - 1].0.to_le_bytes());
        directory.extend_from_slice(&block_digest[..16]);
    }
    let mut seal = Sha256::new();
    seal.update(&bytes[..HEADER]);
    seal.update(&directory);
    bytes.extend_from_slice(&directory);
    bytes.extend_from_slice(&seal.finalize());
    write_atomically(&path, &bytes)
}

/// The little-endian u32 at `at` of `bytes` (the caller checked the length).
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Why a key index was not used.
#[derive(Debug, thiserror::Error)]
pub enum KeyIndexProblem {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is not a valid key index of its segment: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// What a key index says of one key hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLookup {
    /// The segment's rows whose `before` or `after` key has the hash, sorted, distinct.
    pub rows: Vec<u32>,
    /// The entries with the hash: consecutive, so the rows of the key-ordered copy that hold
    /// them (row `i` of the copy is entry `i`), in segment row order.
    pub entries: std::ops::Range<u64>,
    /// The SHA-256 (hex) of the segment's key-ordered copy, if the index names one.
    pub copy_sha256: Option<String>,
}

/// The rows of the segment at `segment_path` (whose manifest SHA-256 is `segment_sha256`)
/// whose `before` or `after` key has hash `hash`, sorted, from its key index. Every byte used
/// is checked against the index's digests, and the index against the segment's SHA-256: a
/// missing, damaged or stale index is a [`KeyIndexProblem`], never a wrong answer.
pub fn rows_with_key_hash(
    segment_path: &Path,
    segment_sha256: &str,
    hash: u32,
) -> Result<Vec<u32>, KeyIndexProblem> {
    Ok(lookup(segment_path, segment_sha256, hash)?.rows)
}

/// What the key index of the segment at `segment_path` (manifest SHA-256 `segment_sha256`)
/// says of key hash `hash`, checked as for [`rows_with_key_hash`].
pub fn lookup(
    segment_path: &Path,
    segment_sha256: &str,
    hash: u32,
) -> Result<KeyLookup, KeyIndexProblem> {
    let mut index = open(segment_path, segment_sha256)?;
    let blocks = index.directory.len() / DIRECTORY_ENTRY;
    let mut rows = Vec::new();
    let mut entries: Option<std::ops::Range<u64>> = None;
    let mut buf = Vec::new();
    for b in 0..blocks {
        let entry = &index.directory[b * DIRECTORY_ENTRY..(b + 1) * DIRECTORY_ENTRY];
        let (first, last) = (u32_at(entry, 0), u32_at(entry, 4));
        if hash < first || hash > last {
            continue;
        }
        index.read_block(b, &mut buf)?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            if u32_at(e, 0) == hash {
                rows.push(u32_at(e, 4));
                let at = (b * index.block + i) as u64;
                entries = Some(match entries {
                    None => at..at + 1,
                    Some(r) => r.start..at + 1,
                });
            }
        }
    }
    let entries = entries.unwrap_or(0..0);
    // Sorted entries put one hash's together; anything else is a damaged index.
    if entries.end - entries.start != rows.len() as u64 {
        return Err(KeyIndexProblem::Invalid {
            path: index.path,
            reason: format!("the entries of key hash {hash} are not consecutive"),
        });
    }
    rows.sort_unstable();
    rows.dedup();
    Ok(KeyLookup {
        rows,
        entries,
        copy_sha256: index.copy_sha256,
    })
}

/// Every entry of the key index of the segment at `segment_path`, in order, each checked.
pub fn entries(
    segment_path: &Path,
    segment_sha256: &str,
) -> Result<Vec<(u32, u32)>, KeyIndexProblem> {
    let mut index = open(segment_path, segment_sha256)?;
    let blocks = index.directory.len() / DIRECTORY_ENTRY;
    let mut out = Vec::with_capacity(index.n);
    let mut buf = Vec::new();
    for b in 0..blocks {
        index.read_block(b, &mut buf)?;
        out.extend(buf.chunks_exact(8).map(|e| (u32_at(e, 0), u32_at(e, 4))));
    }
    if !out.is_sorted() {
        return Err(KeyIndexProblem::Invalid {
            path: index.path,
            reason: "its entries are not sorted".into(),
        });
    }
    Ok(out)
}

/// A key index whose header and directory were checked.
struct OpenIndex {
    path: PathBuf,
    file: std::fs::File,
    header: usize,
    block: usize,
    n: usize,
    directory: Vec<u8>,
    copy_sha256: Option<String>,
}

/// Whether the key index of the segment at `segment_path` (manifest SHA-256 `segment_sha256`)
/// exists, is of that segment, and every byte of it matches its digests; the SHA-256 of the
/// key-ordered copy it names, if any.
pub fn check(segment_path: &Path, segment_sha256: &str) -> Result<Option<String>, KeyIndexProblem> {
    let mut index = open(segment_path, segment_sha256)?;
    let blocks = index.directory.len() / DIRECTORY_ENTRY;
    let mut buf = Vec::new();
    for b in 0..blocks {
        index.read_block(b, &mut buf)?;
    }
    Ok(index.copy_sha256)
}

impl OpenIndex {
    /// Block `b`'s entries into `buf`, checked against its digest.
    fn read_block(&mut self, b: usize, buf: &mut Vec<u8>) -> Result<(), KeyIndexProblem> {
        let invalid = |reason: String| KeyIndexProblem::Invalid {
            path: self.path.clone(),
            reason,
        };
        let entry = &self.directory[b * DIRECTORY_ENTRY..(b + 1) * DIRECTORY_ENTRY];
        let len = self.block.min(self.n - b * self.block);
        buf.resize(len * 8, 0);
        self.file
            .seek(SeekFrom::Start((self.header + b * self.block * 8) as u64))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| invalid(format!("block {b} cannot be read: {e}")))?;
        if Sha256::digest(&buf[..])[..16] != entry[8..24] {
            return Err(invalid(format!("block {b} does not match its digest")));
        }
        Ok(())
    }
}

fn open(segment_path: &Path, segment_sha256: &str) -> Result<OpenIndex, KeyIndexProblem> {
    let mut name = segment_path.as_os_str().to_owned();
    name.push(KEY_INDEX_SUFFIX);
    let path = PathBuf::from(name);
    let invalid = |reason: String| KeyIndexProblem::Invalid {
        path: path.clone(),
        reason,
    };
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyIndexProblem::Missing { path });
        }
        Err(e) => return Err(invalid(e.to_string())),
    };
    let size = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    let mut header = [0u8; HEADER];
    file.read_exact(&mut header[..HEADER_V1])
        .map_err(|e| invalid(format!("its header cannot be read: {e}")))?;
    if &header[..8] != MAGIC {
        return Err(invalid("it does not start with PGTRKEYS".into()));
    }
    let header_len = match u32_at(&header, 8) {
        1 => HEADER_V1,
        VERSION => HEADER,
        other => {
            return Err(invalid(format!(
                "format version {other} (this pgtrail reads 1 and {VERSION}; `pgtrail compact` writes it again)"
            )));
        }
    };
    file.read_exact(&mut header[HEADER_V1..header_len])
        .map_err(|e| invalid(format!("its header cannot be read: {e}")))?;
    let header = &header[..header_len];
    let block = u32_at(header, 12) as usize;
    let n = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if block == 0 || n > size / 8 {
        return Err(invalid("its header is damaged".into()));
    }
    let n = n as usize;
    let blocks = n.div_ceil(block);
    let directory_at = header_len + 8 * n;
    if size != (directory_at + DIRECTORY_ENTRY * blocks + 32) as u64 {
        return Err(invalid("its size does not match its header".into()));
    }
    if unhex(segment_sha256).as_ref() != Some(header[24..56].try_into().unwrap()) {
        return Err(invalid(
            "it describes another version of the segment (`pgtrail compact` writes it again)"
                .into(),
        ));
    }
    let copy_sha256 = header
        .get(56..88)
        .filter(|copy| copy.iter().any(|&b| b != 0))
        .map(super::hex);
    let mut tail = vec![0u8; DIRECTORY_ENTRY * blocks + 32];
    file.seek(SeekFrom::Start(directory_at as u64))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| invalid(format!("its directory cannot be read: {e}")))?;
    let (directory, seal) = tail.split_at(DIRECTORY_ENTRY * blocks);
    let mut expected = Sha256::new();
    expected.update(header);
    expected.update(directory);
    if expected.finalize().as_slice() != seal {
        return Err(invalid("its directory does not match its digest".into()));
    }
    tail.truncate(DIRECTORY_ENTRY * blocks);
    Ok(OpenIndex {
        path,
        file,
        header: header_len,
        block,
        n,
        directory: tail,
        copy_sha256,
    })
}
