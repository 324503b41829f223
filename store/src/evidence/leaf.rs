//! Leaf v1: the bytes the Merkle tree commits to for each archived change, computed from the
//! Arrow arrays a segment holds (the same function runs when compaction writes the batch and
//! when `verify` reads it back, so a leaf is exactly what the file says).
//!
//! The format is permanent: the README documents it byte by byte and an independent verifier
//! (`tools/evidence/verify_archive.py`) recomputes it from that description alone. In short
//! (integers big-endian; `str` and `bytes` are a `u32` length then the bytes):
//!
//! ```text
//! leaf_data  = "pgtrail/leaf/v1\n" ‖ u8 kind ‖ u64 lsn ‖ u32 seq ‖ u32 xid ‖ i64 committed_at_us ‖ …
//!   kind 1 (change):  str schema ‖ str name ‖ [32] schema_digest ‖ u8 op ‖ [32] body_digest
//!   kind 2 (message): u8 transactional ‖ str prefix ‖ [32] body_digest
//! body_digest = SHA-256("pgtrail/body/v1\n" ‖ part_0 ‖ part_1 ‖ part_2 ‖ part_3)   (changes)
//!             = SHA-256("pgtrail/body/v1\n" ‖ part_0)                              (messages)
//! part_k      = SHA-256("pgtrail/part/v1\n" ‖ u8 k ‖ salt_k ‖ canonical bytes of part k)
//! salt_0‖salt_1 = SHA-256(seed ‖ u64 lsn ‖ u32 seq ‖ u8 0)
//! salt_2‖salt_3 = SHA-256(seed ‖ u64 lsn ‖ u32 seq ‖ u8 1)
//! ```
//!
//! Parts of a change: 0 the context, 1 the before image, 2 the after image, 3 the `changed`
//! list; of a message: 0 its content. The leaf commits to salted digests of the values, never
//! to the values: an erasure (GDPR) can later drop a part's value and its salt and keep its
//! digest, and everything else still verifies (the salt keeps the digest of a small value,
//! such as a birth date, from being guessed by trying every value).
//!
//! Salts come from a seed per *epoch* (one compaction run: the changes from its first key up to
//! the next epoch's first key) and the change's key, not its place in the tree: a change's
//! leaf can be computed from its own row wherever a file holds it (after merges, in a bundle).

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, ListArray, MapArray, RecordBatch, StructArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Time64MicrosecondType, TimeUnit, TimestampMicrosecondType, UInt32Type, UInt64Type,
};
use sha2::{Digest, Sha256};

use super::merkle::{Hash, leaf_hash};
use crate::lsn::{ChangeKey, Lsn};
use crate::relation::RelationVersion;
use crate::segment::SegmentContent;

pub const LEAF_DOMAIN: &[u8; 16] = b"pgtrail/leaf/v1\n";
const BODY_DOMAIN: &[u8; 16] = b"pgtrail/body/v1\n";
const PART_DOMAIN: &[u8; 16] = b"pgtrail/part/v1\n";
const SCHEMA_DOMAIN: &[u8; 18] = b"pgtrail/schema/v1\n";

pub const KIND_CHANGE: u8 = 1;
pub const KIND_MESSAGE: u8 = 2;
/// The archive's own events: a gap the capture recorded, and a watermark per compaction run
/// (how far the archive reached, from which source).
pub const KIND_GAP: u8 = 3;
pub const KIND_WATERMARK: u8 = 4;
/// The receipt of a redaction: which parts of which change were erased, when and why.
pub const KIND_REDACTION: u8 = 5;
/// A legal hold placed (its scope, why, when), and one released: while a hold is in force,
/// `redact` and `purge` refuse the changes in its scope.
pub const KIND_HOLD: u8 = 6;
pub const KIND_RELEASE: u8 = 7;
/// The receipt of a retention purge: which tables' history before which position was erased,
/// how many changes, why, when (one leaf for the purge, not one per change).
pub const KIND_PURGE: u8 = 8;

/// A cell of a row image: how its value is encoded.
const CELL_NULL: u8 = 0;
const CELL_UNKNOWN: u8 = 1;
const CELL_TYPED: u8 = 2;
const CELL_TEXT: u8 = 3;

/// A seed: the secret from which an epoch's salts are derived.
pub type Seed = [u8; 32];

/// One archived change's place in the tree and its leaf hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub key: ChangeKey,
    pub hash: Hash,
}

/// Why a row has no well-defined leaf: its columns contradict each other, so the file does not
/// say one thing (a value both typed and marked unknown, a text for a column the table lacks).
#[derive(Debug, thiserror::Error)]
#[error("change {key}: {reason}")]
pub struct LeafError {
    pub key: ChangeKey,
    pub reason: String,
}

/// The epochs of an archive's tree: each seed applies from its first key up to the next's.
/// Changes before the first epoch were compacted before the archive kept evidence.
///
/// An epoch whose seed was erased (*sealed*, by `pgtrail redact`, so that an erased part's salt
/// cannot be derived again) has its changes' salts recorded one by one instead, with the
/// erased parts' salts zeroed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Epochs {
    starts: Vec<(ChangeKey, Option<Seed>)>,
    sealed: std::collections::BTreeMap<ChangeKey, Salts>,
}

impl Epochs {
    /// Epochs from their first keys and seeds, in any order.
    pub fn new(starts: Vec<(ChangeKey, Seed)>) -> Epochs {
        Epochs::with_sealed(
            starts.into_iter().map(|(k, s)| (k, Some(s))).collect(),
            Default::default(),
        )
    }

    /// Epochs some of which are sealed (no seed), with the recorded salts of their changes.
    pub fn with_sealed(
        mut starts: Vec<(ChangeKey, Option<Seed>)>,
        sealed: std::collections::BTreeMap<ChangeKey, Salts>,
    ) -> Epochs {
        starts.sort_by_key(|(k, _)| *k);
        Epochs { starts, sealed }
    }

    /// Each epoch's first key and seed (`None`: sealed).
    pub fn starts(&self) -> &[(ChangeKey, Option<Seed>)] {
        &self.starts
    }

    /// The recorded salts of the sealed epochs' changes.
    pub fn sealed(&self) -> &std::collections::BTreeMap<ChangeKey, Salts> {
        &self.sealed
    }

    /// The first key the tree covers, if any epoch began.
    pub fn first_key(&self) -> Option<ChangeKey> {
        self.starts.first().map(|(k, _)| *k)
    }

    /// The epoch `key` belongs to: its first key and seed (None before the first epoch).
    pub fn epoch_of(&self, key: ChangeKey) -> Option<(ChangeKey, Option<&Seed>)> {
        let i = self.starts.partition_point(|(k, _)| *k <= key);
        i.checked_sub(1)
            .map(|i| (self.starts[i].0, self.starts[i].1.as_ref()))
    }

    /// The salts of the change at `key` (None before the first epoch). In a sealed epoch, a
    /// change with no recorded salts gets zero salts: its leaf then cannot match the tree (a
    /// row added to a sealed epoch is caught like any other), rather than pass for a change
    /// from before the archive kept evidence.
    pub fn salts_for(&self, key: ChangeKey) -> Option<Salts> {
        match self.epoch_of(key)? {
            (_, Some(seed)) => Some(salts(seed, key)),
            (_, None) => Some(self.sealed.get(&key).copied().unwrap_or([[0; 16]; 4])),
        }
    }
}

/// `SHA-256("pgtrail/schema/v1\n" ‖ u32 relation_id ‖ str schema ‖ str name ‖
/// u8 replica_identity ‖ u32 ncols ‖ (str name ‖ u32 type_oid ‖ i32 typmod ‖ u8 is_key)… ‖
/// u32 nkey ‖ str key_column…)`: the relation version a change was decoded with, as the
/// segment's description states it (a type changed in the description would change how every
/// value of the column reads).
pub fn schema_digest(rel: &RelationVersion) -> Hash {
    let mut b = Vec::with_capacity(64 + rel.columns.len() * 24);
    b.extend_from_slice(SCHEMA_DOMAIN);
    b.extend_from_slice(&rel.relation_id.to_be_bytes());
    put_str(&mut b, &rel.schema);
    put_str(&mut b, &rel.name);
    b.push(rel.replica_identity);
    put_len(&mut b, rel.columns.len());
    for c in &rel.columns {
        put_str(&mut b, &c.name);
        b.extend_from_slice(&c.type_oid.to_be_bytes());
        b.extend_from_slice(&c.type_modifier.to_be_bytes());
        b.push(u8::from(c.is_key));
    }
    put_len(&mut b, rel.primary_key.len());
    for k in &rel.primary_key {
        put_str(&mut b, k);
    }
    Sha256::digest(&b).into()
}

/// A change's four salts (a message uses the first).
pub type Salts = [[u8; 16]; 4];

/// The four salts of the change at `key` in the epoch of `seed` (a message uses the first).
///
/// No domain string: a seed is random, made for this and used for nothing else, and the 45
/// bytes hashed fit one SHA-256 block (with a domain they took two, for every change).
pub fn salts(seed: &Seed, key: ChangeKey) -> Salts {
    let half = |j: u8| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(key.commit_lsn.0.to_be_bytes());
        h.update(key.seq.to_be_bytes());
        h.update([j]);
        h.finalize().into()
    };
    let (a, b) = (half(0), half(1));
    let mut out = [[0u8; 16]; 4];
    out[0].copy_from_slice(&a[..16]);
    out[1].copy_from_slice(&a[16..]);
    out[2].copy_from_slice(&b[..16]);
    out[3].copy_from_slice(&b[16..]);
    out
}

fn part_digest(k: u8, salt: &[u8; 16], bytes: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(PART_DOMAIN);
    h.update([k]);
    h.update(salt);
    h.update(bytes);
    h.finalize().into()
}

fn body_digest(parts: &[Hash]) -> Hash {
    let mut h = Sha256::new();
    h.update(BODY_DOMAIN);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn put_len(b: &mut Vec<u8>, n: usize) {
    // Lengths are u32: a value over 4 GiB cannot reach an archive (PostgreSQL caps a field at
    // 1 GB), so saturating here never happens in practice and would still change the leaf.
    b.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_bytes(b, s.as_bytes());
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    put_len(b, s.len());
    b.extend_from_slice(s);
}

/// The op's code in a leaf.
pub fn op_code(op: &str) -> Option<u8> {
    Some(match op {
        "insert" => 1,
        "update" => 2,
        "delete" => 3,
        "truncate" => 4,
        "snapshot" => 5,
        _ => return None,
    })
}

/// A column with dictionary or view encoding read as its plain type, so that the encoding a
/// writer or reader chose never changes a leaf.
fn plain(array: &ArrayRef) -> Result<ArrayRef, String> {
    let target = match array.data_type() {
        DataType::Dictionary(_, value) => value.as_ref().clone(),
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        _ => return Ok(array.clone()),
    };
    cast(array, &target).map_err(|e| format!("cannot read a column as {target}: {e}"))
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, String> {
    batch
        .column_by_name(name)
        .ok_or_else(|| format!("the segment has no `{name}` column"))
}

/// The typed bytes of the value at `row` of `array` (not null).
fn put_value(b: &mut Vec<u8>, array: &dyn Array, row: usize) -> Result<(), String> {
    match array.data_type() {
        DataType::Boolean => b.push(u8::from(array.as_boolean().value(row))),
        DataType::Int16 => {
            b.extend_from_slice(&array.as_primitive::<Int16Type>().value(row).to_be_bytes())
        }
        DataType::Int32 => {
            b.extend_from_slice(&array.as_primitive::<Int32Type>().value(row).to_be_bytes())
        }
        DataType::Int64 => {
            b.extend_from_slice(&array.as_primitive::<Int64Type>().value(row).to_be_bytes())
        }
        DataType::Float32 => {
            let v = array.as_primitive::<Float32Type>().value(row);
            let bits = if v.is_nan() { 0x7fc0_0000 } else { v.to_bits() };
            b.extend_from_slice(&bits.to_be_bytes());
        }
        DataType::Float64 => {
            let v = array.as_primitive::<Float64Type>().value(row);
            let bits = if v.is_nan() {
                0x7ff8_0000_0000_0000
            } else {
                v.to_bits()
            };
            b.extend_from_slice(&bits.to_be_bytes());
        }
        DataType::Decimal128(_, _) => b.extend_from_slice(
            &array
                .as_primitive::<Decimal128Type>()
                .value(row)
                .to_be_bytes(),
        ),
        DataType::Utf8 => put_str(b, array.as_string::<i32>().value(row)),
        DataType::Binary => put_bytes(b, array.as_binary::<i32>().value(row)),
        DataType::FixedSizeBinary(_) => {
            b.extend_from_slice(array.as_fixed_size_binary().value(row))
        }
        DataType::Date32 => {
            b.extend_from_slice(&array.as_primitive::<Date32Type>().value(row).to_be_bytes())
        }
        DataType::Time64(TimeUnit::Microsecond) => b.extend_from_slice(
            &array
                .as_primitive::<Time64MicrosecondType>()
                .value(row)
                .to_be_bytes(),
        ),
        DataType::Timestamp(TimeUnit::Microsecond, _) => b.extend_from_slice(
            &array
                .as_primitive::<TimestampMicrosecondType>()
                .value(row)
                .to_be_bytes(),
        ),
        DataType::Struct(_) => {
            // An interval: months, days, microseconds.
            let s = array.as_struct();
            if s.num_columns() != 3 {
                return Err("an interval value does not have three fields".into());
            }
            for (i, f) in s.columns().iter().enumerate() {
                if f.is_null(row) {
                    return Err(format!("field {i} of an interval value is null"));
                }
                put_value(b, f.as_ref(), row)?;
            }
        }
        DataType::List(_) => {
            // By offsets into the values: no array is made per cell.
            let list = array.as_list::<i32>();
            let offsets = list.value_offsets();
            let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
            let elements = list.values();
            put_len(b, end - start);
            for i in start..end {
                if elements.is_null(i) {
                    b.push(CELL_NULL);
                } else {
                    b.push(CELL_TYPED);
                    put_value(b, elements.as_ref(), i)?;
                }
            }
        }
        DataType::Dictionary(_, _) | DataType::Utf8View | DataType::BinaryView => {
            let one = plain(&array.slice(row, 1))?;
            put_value(b, one.as_ref(), 0)?;
        }
        other => return Err(format!("no leaf encoding for a value of type {other}")),
    }
    Ok(())
}

/// A `List(Utf8)` column of column names, read per row without copying.
struct Names<'a> {
    list: &'a ListArray,
    values: ArrayRef,
}

impl<'a> Names<'a> {
    fn new(column: Option<&'a ArrayRef>) -> Result<Option<Names<'a>>, String> {
        let Some(column) = column else {
            return Ok(None);
        };
        let list = column
            .as_list_opt::<i32>()
            .ok_or("a list of column names is not a list")?;
        let values = plain(list.values())?;
        if values.as_string_opt::<i32>().is_none() {
            return Err("a list of column names does not hold text".into());
        }
        Ok(Some(Names { list, values }))
    }

    /// The names at `row` (None when the cell is null).
    fn at(&self, row: usize) -> Result<Option<Vec<&str>>, String> {
        if self.list.is_null(row) {
            return Ok(None);
        }
        let offsets = self.list.value_offsets();
        let values = self.values.as_string::<i32>();
        (offsets[row] as usize..offsets[row + 1] as usize)
            .map(|i| {
                if values.is_null(i) {
                    Err("a list of column names holds a null".to_string())
                } else {
                    Ok(values.value(i))
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// A `Map(Utf8 → Utf8)` column of exact texts, read per row without copying.
struct Texts<'a> {
    map: &'a MapArray,
    keys: ArrayRef,
    values: ArrayRef,
}

impl<'a> Texts<'a> {
    fn new(column: Option<&'a ArrayRef>) -> Result<Option<Texts<'a>>, String> {
        let Some(column) = column else {
            return Ok(None);
        };
        let map = column.as_map_opt().ok_or("the exact texts are not a map")?;
        let (keys, values) = (plain(map.keys())?, plain(map.values())?);
        if keys.as_string_opt::<i32>().is_none() || values.as_string_opt::<i32>().is_none() {
            return Err("the exact texts are not text".into());
        }
        Ok(Some(Texts { map, keys, values }))
    }

    /// The `name → text` entries at `row`.
    fn at(&self, row: usize) -> Result<Vec<(&str, Option<&str>)>, String> {
        if self.map.is_null(row) {
            return Ok(Vec::new());
        }
        let offsets = self.map.value_offsets();
        let (keys, values) = (self.keys.as_string::<i32>(), self.values.as_string::<i32>());
        let mut out: Vec<(&str, Option<&str>)> = Vec::new();
        for i in offsets[row] as usize..offsets[row + 1] as usize {
            let key = keys.value(i);
            if out.iter().any(|(k, _)| *k == key) {
                return Err(format!("the exact texts name column {key} twice"));
            }
            out.push((key, (!values.is_null(i)).then(|| values.value(i))));
        }
        Ok(out)
    }
}

/// A row image's columns (`before` or `after`, with its `_unknown` and `_text`), prepared once
/// per batch: dictionary and view encodings read as plain values.
struct Image<'a> {
    image: Option<&'a StructArray>,
    children: Vec<ArrayRef>,
    unknown: Option<Names<'a>>,
    text: Option<Texts<'a>>,
}

impl<'a> Image<'a> {
    fn new(batch: &'a RecordBatch, name: &str, rel: &RelationVersion) -> Result<Image<'a>, String> {
        let image = match batch.column_by_name(name) {
            None => None,
            Some(c) => Some(
                c.as_struct_opt()
                    .ok_or_else(|| format!("the `{name}` column is not a row"))?,
            ),
        };
        let children = match image {
            None => Vec::new(),
            Some(image) => {
                if image.num_columns() != rel.columns.len() {
                    return Err("the row image's columns differ from the table's".into());
                }
                image
                    .columns()
                    .iter()
                    .map(plain)
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(Image {
            image,
            children,
            unknown: Names::new(batch.column_by_name(&format!("{name}_unknown")))?,
            text: Texts::new(batch.column_by_name(&format!("{name}_text")))?,
        })
    }

    /// The canonical bytes of the image at `row`: `u8 present`, then per column (in the
    /// table's order) `0x00` null, `0x01` unknown, `0x02` typed value, `0x03` exact text
    /// (`opt str`).
    fn put(&self, b: &mut Vec<u8>, rel: &RelationVersion, row: usize) -> Result<(), String> {
        let unknown = match &self.unknown {
            Some(u) => u.at(row)?.unwrap_or_default(),
            None => Vec::new(),
        };
        let text = match &self.text {
            Some(t) => t.at(row)?,
            None => Vec::new(),
        };
        let present = self.image.is_some_and(|i| i.is_valid(row));
        b.push(u8::from(present));
        if !present {
            if !unknown.is_empty() || !text.is_empty() {
                return Err("an absent row image has unknown columns or exact texts".into());
            }
            return Ok(());
        }
        for name in unknown.iter().chain(text.iter().map(|(k, _)| k)) {
            if !rel.columns.iter().any(|c| c.name == *name) {
                return Err(format!(
                    "column {name} is named in a row image but the table has no such column"
                ));
            }
        }
        for (c, values) in rel.columns.iter().zip(&self.children) {
            let is_unknown = unknown.contains(&c.name.as_str());
            let exact = text.iter().find(|(k, _)| *k == c.name).map(|(_, t)| *t);
            if (is_unknown || exact.is_some()) && values.is_valid(row) {
                return Err(format!(
                    "column {} has a typed value and is also unknown or exact text",
                    c.name
                ));
            }
            match (is_unknown, exact) {
                (true, Some(_)) => {
                    return Err(format!("column {} is both unknown and exact text", c.name));
                }
                (true, None) => b.push(CELL_UNKNOWN),
                (false, Some(t)) => {
                    b.push(CELL_TEXT);
                    match t {
                        Some(t) => {
                            b.push(1);
                            put_str(b, t);
                        }
                        None => b.push(0),
                    }
                }
                (false, None) if values.is_null(row) => b.push(CELL_NULL),
                (false, None) => {
                    b.push(CELL_TYPED);
                    put_value(b, values.as_ref(), row)?;
                }
            }
        }
        Ok(())
    }
}

/// The leaves of the rows of `batch`, a batch of a segment holding `content`, that the tree
/// covers (rows before the first epoch have none).
pub fn batch_leaves(
    content: &SegmentContent,
    batch: &RecordBatch,
    epochs: &Epochs,
    redactions: &Redactions,
) -> Result<Vec<Leaf>, LeafError> {
    let mut leaves = Vec::with_capacity(batch.num_rows());
    for_each_leaf(
        content,
        batch,
        epoch_inputs(epochs, redactions),
        |key, _, data, _| {
            leaves.push(Leaf {
                key,
                hash: leaf_hash(data),
            })
        },
    )?;
    Ok(leaves)
}

/// [`batch_leaves`], and besides them a digest of every row of `batch`, in row order: its leaf
/// hash when the tree covers it, else the hash its leaf would have with zero salts. Two rows
/// with equal digests hold equal values (as far as a leaf commits to them), which is how
/// `verify` checks a segment's key-ordered copy against the segment, rows before evidence
/// included.
pub fn batch_leaves_and_row_digests(
    content: &SegmentContent,
    batch: &RecordBatch,
    epochs: &Epochs,
    redactions: &Redactions,
) -> Result<(Vec<Leaf>, Vec<Hash>), LeafError> {
    let inputs = epoch_inputs(epochs, redactions);
    // Whether the row whose inputs were asked for last is in the tree: `for_each_leaf` calls
    // `f` for a row right after asking for its inputs.
    let covered = std::cell::Cell::new(false);
    let mut leaves = Vec::with_capacity(batch.num_rows());
    let mut digests = vec![[0u8; 32]; batch.num_rows()];
    for_each_leaf(
        content,
        batch,
        |key| {
            let found = inputs(key);
            covered.set(found.is_some());
            Some(found.unwrap_or(LeafInputs::from([[0u8; 16]; 4])))
        },
        |key, row, data, _| {
            let hash = leaf_hash(data);
            if covered.get() {
                leaves.push(Leaf { key, hash });
            }
            digests[row] = hash;
        },
    )?;
    Ok((leaves, digests))
}

/// `leaf_data` of the change at `key` in `batch`, if the batch holds it and the tree covers it
/// (what a proof of inclusion carries for its verifier to hash).
pub fn leaf_data(
    content: &SegmentContent,
    batch: &RecordBatch,
    epochs: &Epochs,
    redactions: &Redactions,
    key: ChangeKey,
) -> Result<Option<Vec<u8>>, LeafError> {
    let mut found = None;
    for_each_leaf(
        content,
        batch,
        epoch_inputs(epochs, redactions),
        |k, _, data, _| {
            if k == key {
                found = Some(data.to_vec());
            }
        },
    )?;
    Ok(found)
}

/// What a change's leaf is computed from besides its row: its salts, and the digests of its
/// parts whose values were erased (`pgtrail redact`) and so are no longer in the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafInputs {
    pub salts: Salts,
    pub erased: [Option<Hash>; 4],
}

impl From<Salts> for LeafInputs {
    fn from(salts: Salts) -> LeafInputs {
        LeafInputs {
            salts,
            erased: [None; 4],
        }
    }
}

/// The erased parts' digests of every redacted change, by key.
pub type Redactions = std::collections::BTreeMap<ChangeKey, [Option<Hash>; 4]>;

/// The leaf inputs of a change from the seed of its epoch (none before the first epoch) and
/// the archive's redactions.
pub(crate) fn epoch_inputs<'a>(
    epochs: &'a Epochs,
    redactions: &'a Redactions,
) -> impl Fn(ChangeKey) -> Option<LeafInputs> + 'a {
    move |key| {
        epochs.salts_for(key).map(|salts| LeafInputs {
            salts,
            erased: redactions.get(&key).copied().unwrap_or([None; 4]),
        })
    }
}

/// Call `f` with the key, row, `leaf_data` and part digests of each row of `batch` that
/// `inputs_of` gives inputs for, in order (an auditor bundle carries each change's salts, not
/// its epoch's seed).
pub fn for_each_leaf(
    content: &SegmentContent,
    batch: &RecordBatch,
    inputs_of: impl Fn(ChangeKey) -> Option<LeafInputs>,
    mut f: impl FnMut(ChangeKey, usize, &[u8], &[Hash; 4]),
) -> Result<(), LeafError> {
    let at_start = |reason: String| LeafError {
        key: ChangeKey::new(Lsn::ZERO, 0),
        reason,
    };
    let lsn = column(batch, "lsn")
        .map_err(at_start)?
        .as_primitive::<UInt64Type>();
    let seq = column(batch, "seq")
        .map_err(at_start)?
        .as_primitive::<UInt32Type>();
    let xid = column(batch, "xid")
        .map_err(at_start)?
        .as_primitive::<UInt32Type>();
    let at = column(batch, "committed_at")
        .map_err(at_start)?
        .as_primitive::<TimestampMicrosecondType>();
    let mut data = Vec::with_capacity(256);
    let mut part = Vec::with_capacity(256);
    match content {
        SegmentContent::Table(rel) => {
            let schema_digest = schema_digest(rel);
            let op = plain(column(batch, "op").map_err(at_start)?).map_err(at_start)?;
            let op = op.as_string::<i32>();
            let context = plain(column(batch, "context").map_err(at_start)?).map_err(at_start)?;
            let context = context.as_string::<i32>();
            let changed = Names::new(Some(column(batch, "changed").map_err(at_start)?))
                .map_err(at_start)?
                .ok_or_else(|| at_start("no `changed` column".into()))?;
            let images = [
                (1u8, Image::new(batch, "before", rel).map_err(at_start)?),
                (2u8, Image::new(batch, "after", rel).map_err(at_start)?),
            ];
            for row in 0..batch.num_rows() {
                let key = ChangeKey::new(Lsn(lsn.value(row)), seq.value(row));
                let Some(LeafInputs { salts, erased }) = inputs_of(key) else {
                    continue;
                };
                let fail = |reason: String| LeafError { key, reason };
                let mut parts = [[0u8; 32]; 4];
                // An erased part's value is gone from the row: its digest comes from the
                // redaction record, and what the row holds in its place is not hashed.
                parts[0] = match erased[0] {
                    Some(digest) => digest,
                    None => {
                        part.clear();
                        if context.is_null(row) {
                            part.push(0);
                        } else {
                            part.push(1);
                            put_str(&mut part, context.value(row));
                        }
                        part_digest(0, &salts[0], &part)
                    }
                };
                for (k, image) in &images {
                    let k = *k as usize;
                    parts[k] = match erased[k] {
                        Some(digest) => digest,
                        None => {
                            part.clear();
                            image.put(&mut part, rel, row).map_err(fail)?;
                            part_digest(k as u8, &salts[k], &part)
                        }
                    };
                }
                parts[3] = match erased[3] {
                    Some(digest) => digest,
                    None => {
                        part.clear();
                        match changed.at(row).map_err(fail)? {
                            None => part.push(0),
                            Some(list) => {
                                part.push(1);
                                put_len(&mut part, list.len());
                                for name in &list {
                                    put_str(&mut part, name);
                                }
                            }
                        }
                        part_digest(3, &salts[3], &part)
                    }
                };
                let op_name = if op.is_null(row) { "" } else { op.value(row) };
                let op = op_code(op_name).ok_or_else(|| fail(format!("unknown op `{op_name}`")))?;
                data.clear();
                put_header(&mut data, KIND_CHANGE, key, xid.value(row), at.value(row));
                put_str(&mut data, &rel.schema);
                put_str(&mut data, &rel.name);
                data.extend_from_slice(&schema_digest);
                data.push(op);
                data.extend_from_slice(&body_digest(&parts));
                f(key, row, &data, &parts);
            }
        }
        SegmentContent::Messages => {
            let transactional = column(batch, "transactional")
                .map_err(at_start)?
                .as_boolean();
            let prefix = plain(column(batch, "prefix").map_err(at_start)?).map_err(at_start)?;
            let prefix = prefix.as_string::<i32>();
            let body = plain(column(batch, "content").map_err(at_start)?).map_err(at_start)?;
            let body = body.as_binary::<i32>();
            let text = plain(column(batch, "content_text").map_err(at_start)?).map_err(at_start)?;
            let text = text.as_string::<i32>();
            for row in 0..batch.num_rows() {
                let key = ChangeKey::new(Lsn(lsn.value(row)), seq.value(row));
                let Some(LeafInputs { salts, erased }) = inputs_of(key) else {
                    continue;
                };
                let fail = |reason: &str| LeafError {
                    key,
                    reason: reason.to_string(),
                };
                let content = body.value(row);
                // content_text is derived from content; it is checked, not committed. A
                // content a redaction erased is neither (its digest is the record's).
                let derived = std::str::from_utf8(content).ok();
                let stored = (!text.is_null(row)).then(|| text.value(row));
                if derived != stored && erased[0].is_none() {
                    return Err(fail("content_text differs from the content's UTF-8 text"));
                }
                let digest = match erased[0] {
                    Some(digest) => digest,
                    None => {
                        part.clear();
                        put_bytes(&mut part, content);
                        part_digest(0, &salts[0], &part)
                    }
                };
                let body = body_digest(&[digest]);
                data.clear();
                put_header(&mut data, KIND_MESSAGE, key, xid.value(row), at.value(row));
                data.push(u8::from(transactional.value(row)));
                put_str(&mut data, prefix.value(row));
                data.extend_from_slice(&body);
                f(key, row, &data, &[digest, [0; 32], [0; 32], [0; 32]]);
            }
        }
    }
    Ok(())
}

/// The leaf of the archive's `n`th event of the epoch beginning at `epoch`:
/// `"pgtrail/leaf/v1\n" ‖ u8 kind ‖ u64 epoch lsn ‖ u32 epoch seq ‖ u32 n ‖ str payload`. The
/// payload (JSON) is kept verbatim in the evidence files; an event's leaf follows the leaves
/// of its epoch's changes in the tree.
pub fn event_leaf_hash(kind: u8, epoch: ChangeKey, n: u32, payload: &str) -> Hash {
    leaf_hash(&event_leaf_data(kind, epoch, n, payload))
}

/// The `leaf_data` whose hash is [`event_leaf_hash`].
pub fn event_leaf_data(kind: u8, epoch: ChangeKey, n: u32, payload: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(48 + payload.len());
    b.extend_from_slice(LEAF_DOMAIN);
    b.push(kind);
    b.extend_from_slice(&epoch.commit_lsn.0.to_be_bytes());
    b.extend_from_slice(&epoch.seq.to_be_bytes());
    b.extend_from_slice(&n.to_be_bytes());
    put_str(&mut b, payload);
    b
}

fn put_header(b: &mut Vec<u8>, kind: u8, key: ChangeKey, xid: u32, committed_at_us: i64) {
    b.extend_from_slice(LEAF_DOMAIN);
    b.push(kind);
    b.extend_from_slice(&key.commit_lsn.0.to_be_bytes());
    b.extend_from_slice(&key.seq.to_be_bytes());
    b.extend_from_slice(&xid.to_be_bytes());
    b.extend_from_slice(&committed_at_us.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(lsn: u64, seq: u32) -> ChangeKey {
        ChangeKey::new(Lsn(lsn), seq)
    }

    #[test]
    fn a_change_takes_the_seed_of_the_last_epoch_begun_at_or_before_it() {
        let epochs = Epochs::new(vec![(key(200, 0), [2; 32]), (key(100, 3), [1; 32])]);
        assert_eq!(epochs.first_key(), Some(key(100, 3)));
        let seed_of = |k| epochs.epoch_of(k).and_then(|(_, s)| s.copied());
        assert_eq!(epochs.epoch_of(key(100, 2)), None, "before evidence");
        assert_eq!(seed_of(key(100, 3)), Some([1; 32]));
        assert_eq!(seed_of(key(199, u32::MAX)), Some([1; 32]));
        assert_eq!(seed_of(key(200, 0)), Some([2; 32]));
        assert_eq!(seed_of(key(u64::MAX, 0)), Some([2; 32]));
        assert_eq!(
            epochs.salts_for(key(200, 0)),
            Some(salts(&[2; 32], key(200, 0)))
        );
        // Sealed: recorded salts, and zero salts for a change with none recorded.
        let recorded = [[7; 16]; 4];
        let sealed = Epochs::with_sealed(
            vec![(key(100, 3), None), (key(200, 0), Some([2; 32]))],
            [(key(150, 1), recorded)].into_iter().collect(),
        );
        assert_eq!(sealed.salts_for(key(150, 1)), Some(recorded));
        assert_eq!(sealed.salts_for(key(150, 2)), Some([[0; 16]; 4]));
        assert_eq!(sealed.salts_for(key(100, 2)), None);
    }

    #[test]
    fn salts_differ_by_seed_key_and_part() {
        let a = salts(&[7; 32], key(100, 0));
        assert_ne!(a, salts(&[8; 32], key(100, 0)));
        assert_ne!(a, salts(&[7; 32], key(100, 1)));
        assert_ne!(a, salts(&[7; 32], key(101, 0)));
        for i in 0..4 {
            for j in i + 1..4 {
                assert_ne!(a[i], a[j]);
            }
        }
        // The derivation the README states: SHA-256(seed ‖ u64 lsn ‖ u32 seq ‖ u8 j).
        let mut input = vec![7u8; 32];
        input.extend_from_slice(&100u64.to_be_bytes());
        input.extend_from_slice(&0u32.to_be_bytes());
        input.push(1);
        let second: [u8; 32] = Sha256::digest(&input).into();
        assert_eq!(a[2], second[..16]);
        assert_eq!(a[3], second[16..]);
    }
}
