//! The tree's leaves on disk while `prove`, `bundle`, `certify` and `redact` work.
//!
//! Those commands verify the whole archive first and then need every leaf: the tree's hashes
//! (for its root at a checkpoint's size and for proofs) and each change's place (its segment and
//! its index in the tree, found by its key). Held in memory that was about 100 bytes a change, a
//! gigabyte for ten million; here they are two files of fixed-size records, 88 bytes a change,
//! read back by index, so memory stays a few megabytes whatever the archive's size.
//!
//! Both files are unlinked temporary files in `TMPDIR` (opened unlinked, mode 0600): nothing
//! is left behind whatever happens to the process, and nothing in them is production data (a
//! leaf's hash is over salted digests of a change's parts, beside its LSN and position, as in
//! verify's own spill). Nothing in them is durable or needs to be: a command that fails
//! computes them again when run again.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::leaf::Leaf;
use super::merkle::{Frontier, Hash, LeafHashes};
use crate::error::{LogError, SegmentError};
use crate::lsn::{ChangeKey, Lsn};

/// Bytes written at a time, and read at a time when streaming.
const CHUNK_BYTES: usize = 1 << 20;

/// Fixed-size records of `size` bytes, appended, then read back by index.
struct Records {
    file: File,
    size: usize,
    len: u64,
    /// Records appended and not written yet.
    pending: Vec<u8>,
}

impl Records {
    fn create(size: usize) -> Result<Records, LogError> {
        Ok(Records {
            file: tempfile::tempfile().map_err(io_error)?,
            size,
            len: 0,
            pending: Vec::with_capacity(CHUNK_BYTES),
        })
    }

    fn push(&mut self, record: &[u8]) -> Result<(), LogError> {
        debug_assert_eq!(record.len(), self.size);
        self.pending.extend_from_slice(record);
        self.len += 1;
        if self.pending.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), LogError> {
        let written = self.len * self.size as u64 - self.pending.len() as u64;
        self.file
            .write_all_at(&self.pending, written)
            .map_err(io_error)?;
        self.pending.clear();
        Ok(())
    }

    /// Records `first..first + count` (all written: see [`Records::flush`]) into `buf`.
    fn read(&self, first: u64, count: u64, buf: &mut Vec<u8>) -> Result<(), LogError> {
        debug_assert!(first + count <= self.len && self.pending.is_empty());
        buf.resize(count as usize * self.size, 0);
        self.file
            .read_exact_at(buf, first * self.size as u64)
            .map_err(io_error)
    }

    /// Records `lo..hi`, a chunk at a time.
    fn for_each(
        &self,
        lo: u64,
        hi: u64,
        mut f: impl FnMut(&[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let per_chunk = (CHUNK_BYTES / self.size) as u64;
        let mut buf = Vec::new();
        let mut at = lo;
        while at < hi {
            let count = per_chunk.min(hi - at);
            self.read(at, count, &mut buf)?;
            for record in buf.chunks_exact(self.size) {
                f(record)?;
            }
            at += count;
        }
        Ok(())
    }
}

fn io_error(source: std::io::Error) -> LogError {
    LogError::VerifyScratch {
        source: SegmentError::Io {
            path: std::env::temp_dir(),
            source,
        },
    }
}

/// The tree's leaf hashes in order (changes and events), 32 bytes each.
pub(crate) struct TreeFile(Records);

impl TreeFile {
    pub(crate) fn create() -> Result<TreeFile, LogError> {
        Ok(TreeFile(Records::create(32)?))
    }

    pub(crate) fn push(&mut self, hash: &Hash) -> Result<(), LogError> {
        self.0.push(hash)
    }

    /// Done appending: everything is readable from here on.
    pub(crate) fn finish(&mut self) -> Result<(), LogError> {
        self.0.flush()
    }

    pub(crate) fn len(&self) -> u64 {
        self.0.len
    }

    /// The root of the tree of the first `size` leaves (of none: the empty tree's).
    pub(crate) fn root(&self, size: u64) -> Result<Hash, LogError> {
        self.subtree_root(0, size)
    }
}

impl LeafHashes for TreeFile {
    type Error = LogError;

    fn count(&self) -> u64 {
        self.0.len
    }

    fn subtree_root(&self, lo: u64, hi: u64) -> Result<Hash, LogError> {
        // The leaves of a run folded as they come: `MTH` of the run, in one read of it and
        // O(log n) memory (of an empty run, the empty tree's root, as `MTH` says).
        let mut frontier = Frontier::new();
        self.0.for_each(lo, hi, |record| {
            frontier.push(record.try_into().expect("32-byte records"));
            Ok(())
        })?;
        Ok(frontier.root())
    }
}

/// One change of the tree: its leaf, the segment holding it (its index in the segments sorted
/// by key) and its index in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChangePlace {
    pub leaf: Leaf,
    pub segment: u32,
    pub index: u64,
}

/// Bytes of a [`ChangePlace`]: lsn (u64 LE), seq (u32 LE), segment (u32 LE), index (u64 LE),
/// hash.
const PLACE_BYTES: usize = 8 + 4 + 4 + 8 + 32;

/// Every change of the tree in key order (which is tree order), as [`ChangePlace`]s.
pub(crate) struct ChangeFile(Records);

impl ChangeFile {
    pub(crate) fn create() -> Result<ChangeFile, LogError> {
        Ok(ChangeFile(Records::create(PLACE_BYTES)?))
    }

    pub(crate) fn push(&mut self, place: &ChangePlace) -> Result<(), LogError> {
        let mut b = [0u8; PLACE_BYTES];
        b[..8].copy_from_slice(&place.leaf.key.commit_lsn.0.to_le_bytes());
        b[8..12].copy_from_slice(&place.leaf.key.seq.to_le_bytes());
        b[12..16].copy_from_slice(&place.segment.to_le_bytes());
        b[16..24].copy_from_slice(&place.index.to_le_bytes());
        b[24..].copy_from_slice(&place.leaf.hash);
        self.0.push(&b)
    }

    /// Done appending: everything is readable from here on.
    pub(crate) fn finish(&mut self) -> Result<(), LogError> {
        self.0.flush()
    }

    pub(crate) fn len(&self) -> u64 {
        self.0.len
    }

    /// The `i`-th change in key order.
    pub(crate) fn get(&self, i: u64) -> Result<ChangePlace, LogError> {
        let mut buf = Vec::new();
        self.0.read(i, 1, &mut buf)?;
        Ok(decode_place(&buf))
    }

    /// The first position whose change does not satisfy `before` (which must hold for a
    /// prefix of the changes only, as for `slice::partition_point`).
    pub(crate) fn partition_point(
        &self,
        before: impl Fn(&ChangePlace) -> bool,
    ) -> Result<u64, LogError> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if before(&self.get(mid)?) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The change at `key`, with its position, if the tree holds it.
    pub(crate) fn find(&self, key: ChangeKey) -> Result<Option<(u64, ChangePlace)>, LogError> {
        let at = self.partition_point(|p| p.leaf.key < key)?;
        if at == self.len() {
            return Ok(None);
        }
        let place = self.get(at)?;
        Ok((place.leaf.key == key).then_some((at, place)))
    }

    /// The change at each of `keys` (ascending, each once), None where the tree holds none. Keys that
    /// lie close together (a purge's, most of a table's history) are found in one sequential
    /// read from the first to the last; sparse ones (a few redactions in a long history) each
    /// by a binary search, whose reads are one record each.
    pub(crate) fn find_sorted(
        &self,
        keys: &[ChangeKey],
    ) -> Result<Vec<Option<ChangePlace>>, LogError> {
        let (Some(&first), Some(&last)) = (keys.first(), keys.last()) else {
            return Ok(Vec::new());
        };
        let lo = self.partition_point(|p| p.leaf.key < first)?;
        let hi = self.partition_point(|p| p.leaf.key <= last)?;
        // A binary search reads about log2(len) records one at a time; the walk reads every
        // record between, in large reads.
        let searches = 64 * keys.len() as u64;
        if hi - lo > searches {
            return keys
                .iter()
                .map(|k| Ok(self.find(*k)?.map(|(_, place)| place)))
                .collect();
        }
        let mut found = Vec::with_capacity(keys.len());
        let mut wanted = keys.iter().peekable();
        self.for_each(lo, hi, |place| {
            while let Some(&&k) = wanted.peek()
                && k < place.leaf.key
            {
                found.push(None);
                wanted.next();
            }
            if wanted.peek() == Some(&&place.leaf.key) {
                found.push(Some(place));
                wanted.next();
            }
            Ok(())
        })?;
        found.resize(keys.len(), None);
        Ok(found)
    }

    /// The changes at positions `lo..hi`, in order.
    pub(crate) fn for_each(
        &self,
        lo: u64,
        hi: u64,
        mut f: impl FnMut(ChangePlace) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.0.for_each(lo, hi, |record| f(decode_place(record)))
    }
}

fn decode_place(b: &[u8]) -> ChangePlace {
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    ChangePlace {
        leaf: Leaf {
            key: ChangeKey::new(Lsn(u64_at(0)), u32_at(8)),
            hash: b[24..56].try_into().expect("32 bytes"),
        },
        segment: u32_at(12),
        index: u64_at(16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::merkle::{
        consistency_proof, consistency_proof_in, inclusion_proof, inclusion_proof_in, leaf_hash,
        range_proof, range_proof_in, root,
    };

    /// Found in one walk or by a search each, the keys' places are those `find` gives.
    #[test]
    fn find_sorted_agrees_with_find_for_dense_and_sparse_keys() {
        let mut file = ChangeFile::create().unwrap();
        for i in 0..5000u64 {
            let key = ChangeKey::new(Lsn(100 + 2 * (i / 3)), (i % 3) as u32);
            let hash = leaf_hash(&i.to_be_bytes());
            let place = ChangePlace {
                leaf: Leaf { key, hash },
                segment: (i / 1000) as u32,
                index: i,
            };
            file.push(&place).unwrap();
        }
        file.finish().unwrap();
        let dense: Vec<ChangeKey> = (0..4000u64)
            .map(|i| ChangeKey::new(Lsn(99 + i), (i % 4) as u32))
            .collect();
        let sparse: Vec<ChangeKey> = [(100, 0), (101, 0), (2000, 2), (3432, 1), (9999, 0)]
            .map(|(l, s)| ChangeKey::new(Lsn(l), s))
            .to_vec();
        for keys in [dense, sparse, Vec::new()] {
            let expected: Vec<Option<ChangePlace>> = keys
                .iter()
                .map(|k| file.find(*k).unwrap().map(|(_, p)| p))
                .collect();
            assert!(keys.is_empty() || expected.iter().any(Option::is_some));
            assert!(keys.is_empty() || expected.iter().any(Option::is_none));
            assert_eq!(file.find_sorted(&keys).unwrap(), expected);
        }
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// The file gives the roots and proofs the slice gives, for trees of every size up to a
    /// few chunks' worth and of a size that is no power of two.
    #[test]
    fn the_tree_file_gives_the_slices_roots_and_proofs() {
        for n in [1u64, 2, 3, 7, 8, 9, 33, 40_000, 70_001] {
            let hashes = leaves(n);
            let mut file = TreeFile::create().unwrap();
            for h in &hashes {
                file.push(h).unwrap();
            }
            file.finish().unwrap();
            assert_eq!(file.len(), n);
            for size in [0, 1, n / 2 + 1, n] {
                assert_eq!(file.root(size).unwrap(), root(&hashes[..size as usize]));
            }
            for index in [0, n / 3, n - 1] {
                assert_eq!(
                    inclusion_proof_in(&file, n, index).unwrap(),
                    inclusion_proof(&hashes, index),
                    "n {n} index {index}"
                );
            }
            for m in [1, n / 2 + 1, n] {
                assert_eq!(
                    consistency_proof_in(&file, n, m).unwrap(),
                    consistency_proof(&hashes, m),
                    "n {n} m {m}"
                );
            }
            let (first, count) = (n / 4, (n / 2).max(1));
            assert_eq!(
                range_proof_in(&file, n, first, count).unwrap(),
                range_proof(&hashes, first, count),
                "n {n} range {first}+{count}"
            );
            // Past the tree: no proof, from either.
            assert_eq!(inclusion_proof_in(&file, n, n).unwrap(), None);
            assert_eq!(inclusion_proof_in(&file, n + 1, 0).unwrap(), None);
        }
    }

    #[test]
    fn changes_read_back_by_position_and_by_key() {
        let mut file = ChangeFile::create().unwrap();
        let places: Vec<ChangePlace> = (0..50_000u64)
            .map(|i| ChangePlace {
                leaf: Leaf {
                    key: ChangeKey::new(Lsn(100 + i / 3), (i % 3) as u32),
                    hash: leaf_hash(&i.to_le_bytes()),
                },
                segment: (i / 1000) as u32,
                index: i * 2 + 1,
            })
            .collect();
        for p in &places {
            file.push(p).unwrap();
        }
        file.finish().unwrap();
        assert_eq!(file.len(), places.len() as u64);
        for i in [0usize, 1, 999, 1000, 33_333, 49_999] {
            assert_eq!(file.get(i as u64).unwrap(), places[i]);
            assert_eq!(
                file.find(places[i].leaf.key).unwrap(),
                Some((i as u64, places[i]))
            );
        }
        assert_eq!(file.find(ChangeKey::new(Lsn(99), 0)).unwrap(), None);
        assert_eq!(file.find(ChangeKey::new(Lsn(101), 7)).unwrap(), None);
        let mut seen = Vec::new();
        file.for_each(10, 40_010, |p| {
            seen.push(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, places[10..40_010]);
    }
}
