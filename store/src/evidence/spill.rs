//! A compaction run's evidence leaves, kept on disk until the run's commit.
//!
//! The leaves of a run join the tree in `(lsn, seq)` order across all the run's segments, but
//! each segment writer computes its own leaves batch by batch, in key order within the segment
//! only. Holding them all until the commit cost 48 bytes a change (48 MB more for a 1M-row
//! transaction), so they go to one unlinked temporary file instead, each writer's batches as
//! a stream of chunks, and the commit merges the streams k-way. Memory is then a few kilobytes
//! a segment, whatever the size of the run.
//!
//! Crash safety: the file is created in the archive's segments directory as
//! `.evidence-leaves.tmp` and unlinked at once, so it lives on the archive's disk (not in a
//! `/tmp` that may be memory) and a crash leaves nothing behind; a crash between the create
//! and the unlink leaves a `.tmp` name, which the next compaction removes like any other.
//! Nothing in it is durable or needs to be: a run that does not commit leaves the log
//! untrimmed, and the next run computes the leaves again. One compactor runs at a time per
//! archive, so the name is never in use by another run.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::SegmentError;
use crate::evidence::leaf::Leaf;
use crate::evidence::merkle::Hash;
use crate::{ChangeKey, Lsn};

/// Bytes of one leaf in the file: lsn (u64 LE), seq (u32 LE), hash.
const LEAF_BYTES: usize = 8 + 4 + 32;
/// Leaves read at a time from each stream while merging.
const READ_LEAVES: usize = 128;

/// The run's file of leaves. Shared by the run's writers through [`LeafStream`]s.
#[derive(Clone)]
pub struct LeafSpill {
    inner: Arc<Mutex<Spill>>,
}

struct Spill {
    file: File,
    dir: PathBuf,
    end: u64,
    /// Per stream, its chunks in order: (offset, leaves).
    streams: Vec<Vec<(u64, u64)>>,
    leaves: u64,
}

/// One segment writer's part of the spill: its leaves in key order.
pub struct LeafStream {
    spill: LeafSpill,
    id: usize,
}

impl LeafSpill {
    /// An unlinked file in `dir` (the archive's segments directory).
    pub fn create_in(dir: &Path) -> Result<LeafSpill, SegmentError> {
        let path = dir.join(".evidence-leaves.tmp");
        let io = |source| SegmentError::Io {
            path: path.clone(),
            source,
        };
        // Private like the segments: the hashes are derived from production data.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        std::fs::remove_file(&path).map_err(io)?;
        Ok(LeafSpill {
            inner: Arc::new(Mutex::new(Spill {
                file,
                dir: dir.to_path_buf(),
                end: 0,
                streams: Vec::new(),
                leaves: 0,
            })),
        })
    }

    /// An unlinked file in the system's temporary directory (`TMPDIR`), for a reader of an
    /// archive that may not write to it (`verify`). Unlike a bundle's scratch copy, which
    /// stays inside the archive, the file holds no production data: a leaf is a hash over
    /// salted digests of a change's parts (see the leaf format), beside its LSN and position.
    pub fn create_temp() -> Result<LeafSpill, SegmentError> {
        let dir = std::env::temp_dir();
        // `tempfile()` opens the file unlinked (mode 0600) where the system allows it, so
        // nothing is left behind whatever happens to the process.
        let file = tempfile::tempfile().map_err(|source| SegmentError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(LeafSpill {
            inner: Arc::new(Mutex::new(Spill {
                file,
                dir,
                end: 0,
                streams: Vec::new(),
                leaves: 0,
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Spill> {
        // A panic while holding the lock leaves counts that may not match the file; the run
        // then fails its leaf count check rather than trusting them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream, for one segment writer.
    pub fn stream(&self) -> LeafStream {
        let mut spill = self.lock();
        spill.streams.push(Vec::new());
        LeafStream {
            spill: self.clone(),
            id: spill.streams.len() - 1,
        }
    }

    /// How many leaves were written, over all streams.
    pub fn len(&self) -> u64 {
        self.lock().leaves
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every leaf of every stream, in key order. Each stream must be in strictly increasing
    /// key order (the merge checks it, and so does the tree's append after it).
    pub fn merged(&self) -> Result<Merged, SegmentError> {
        let spill = self.lock();
        let file = spill.file.try_clone().map_err(|source| SegmentError::Io {
            path: spill.dir.clone(),
            source,
        })?;
        let mut merged = Merged {
            file,
            dir: spill.dir.clone(),
            cursors: spill
                .streams
                .iter()
                .map(|chunks| Cursor {
                    chunks: chunks.iter().rev().copied().collect(),
                    buffer: Vec::new(),
                    next: 0,
                    last: None,
                })
                .collect(),
            heap: BinaryHeap::new(),
        };
        drop(spill);
        for i in 0..merged.cursors.len() {
            merged.advance(i)?;
        }
        Ok(merged)
    }
}

impl LeafStream {
    /// Append leaves that follow the stream's earlier ones in key order.
    pub fn write(&self, leaves: &[Leaf]) -> Result<(), SegmentError> {
        if leaves.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(leaves.len() * LEAF_BYTES);
        for leaf in leaves {
            bytes.extend_from_slice(&leaf.key.commit_lsn.0.to_le_bytes());
            bytes.extend_from_slice(&leaf.key.seq.to_le_bytes());
            bytes.extend_from_slice(&leaf.hash);
        }
        let mut spill = self.spill.lock();
        let offset = spill.end;
        spill
            .file
            .write_all_at(&bytes, offset)
            .map_err(|source| SegmentError::Io {
                path: spill.dir.clone(),
                source,
            })?;
        spill.end += bytes.len() as u64;
        spill.leaves += leaves.len() as u64;
        spill.streams[self.id].push((offset, leaves.len() as u64));
        Ok(())
    }

    /// Keep only the stream's first `leaves` leaves (a reader that found a problem keeps the
    /// leaves of the batches before it).
    pub fn keep_first(&self, leaves: u64) {
        let mut spill = self.spill.lock();
        let mut kept = 0;
        let chunks = std::mem::take(&mut spill.streams[self.id]);
        let mut dropped = 0;
        for (offset, n) in chunks {
            let take = n.min(leaves - kept);
            if take > 0 {
                spill.streams[self.id].push((offset, take));
            }
            kept += take;
            dropped += n - take;
        }
        spill.leaves -= dropped;
    }
}

struct Cursor {
    /// Chunks still to read, the next one last.
    chunks: Vec<(u64, u64)>,
    buffer: Vec<Leaf>,
    next: usize,
    last: Option<ChangeKey>,
}

/// The merge of a spill's streams; see [`LeafSpill::merged`].
pub struct Merged {
    file: File,
    dir: PathBuf,
    cursors: Vec<Cursor>,
    /// Each stream's next leaf, smallest key on top.
    heap: BinaryHeap<Reverse<(ChangeKey, usize, Hash)>>,
}

impl Merged {
    /// Put stream `i`'s next leaf (if any) on the heap.
    fn advance(&mut self, i: usize) -> Result<(), SegmentError> {
        let cursor = &mut self.cursors[i];
        if cursor.next == cursor.buffer.len() {
            let Some((offset, left)) = cursor.chunks.pop() else {
                return Ok(());
            };
            let take = left.min(READ_LEAVES as u64);
            let mut bytes = vec![0u8; take as usize * LEAF_BYTES];
            self.file
                .read_exact_at(&mut bytes, offset)
                .map_err(|source| SegmentError::Io {
                    path: self.dir.clone(),
                    source,
                })?;
            if left > take {
                cursor
                    .chunks
                    .push((offset + take * LEAF_BYTES as u64, left - take));
            }
            cursor.buffer.clear();
            cursor.next = 0;
            for b in bytes.chunks_exact(LEAF_BYTES) {
                let lsn = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
                let seq = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
                let hash: Hash = b[12..].try_into().expect("32 bytes");
                cursor.buffer.push(Leaf {
                    key: ChangeKey::new(Lsn(lsn), seq),
                    hash,
                });
            }
        }
        let leaf = cursor.buffer[cursor.next];
        cursor.next += 1;
        if cursor.last.is_some_and(|last| last >= leaf.key) {
            return Err(SegmentError::Corrupt {
                path: self.dir.clone(),
                reason: format!(
                    "evidence leaves of one segment out of key order at {} (a pgtrail bug: please report it)",
                    leaf.key
                ),
            });
        }
        cursor.last = Some(leaf.key);
        self.heap.push(Reverse((leaf.key, i, leaf.hash)));
        Ok(())
    }
}

impl Merged {
    /// The next leaf in key order, with the stream it came from (streams are numbered in the
    /// order [`LeafSpill::stream`] made them, from 0).
    pub fn next_with_stream(&mut self) -> Option<Result<(Leaf, usize), SegmentError>> {
        let Reverse((key, i, hash)) = self.heap.pop()?;
        if let Err(e) = self.advance(i) {
            self.heap.clear();
            return Some(Err(e));
        }
        Some(Ok((Leaf { key, hash }, i)))
    }
}

impl Iterator for Merged {
    type Item = Result<Leaf, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with_stream().map(|r| r.map(|(leaf, _)| leaf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(lsn: u64, seq: u32) -> Leaf {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&lsn.to_le_bytes());
        hash[8..12].copy_from_slice(&seq.to_le_bytes());
        Leaf {
            key: ChangeKey::new(Lsn(lsn), seq),
            hash,
        }
    }

    #[test]
    fn streams_written_in_interleaved_chunks_merge_into_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let spill = LeafSpill::create_in(dir.path()).unwrap();
        let (a, b, c) = (spill.stream(), spill.stream(), spill.stream());
        // Three segments' leaves, each in order, written batch by batch and interleaved;
        // chunks longer than one read.
        let mut all = Vec::new();
        for round in 0..5u64 {
            let base = round * 1000;
            let la: Vec<Leaf> = (0..300).map(|s| leaf(base + 1, s)).collect();
            let lb: Vec<Leaf> = (0..7).map(|s| leaf(base + 2 + s as u64, 0)).collect();
            a.write(&la).unwrap();
            b.write(&lb).unwrap();
            b.write(&[]).unwrap();
            all.extend(la);
            all.extend(lb);
        }
        c.write(&[leaf(0, 0)]).unwrap();
        all.push(leaf(0, 0));
        all.sort_by_key(|l| l.key);
        assert_eq!(spill.len(), all.len() as u64);
        let merged: Vec<Leaf> = spill.merged().unwrap().map(Result::unwrap).collect();
        assert_eq!(merged, all);
    }

    #[test]
    fn a_stream_cut_to_its_first_leaves_merges_only_those_and_names_its_stream() {
        let spill = LeafSpill::create_temp().unwrap();
        let (a, b) = (spill.stream(), spill.stream());
        a.write(&[leaf(1, 0), leaf(3, 0)]).unwrap();
        b.write(&[leaf(2, 0)]).unwrap();
        a.write(&[leaf(4, 0), leaf(5, 0)]).unwrap();
        a.write(&[leaf(6, 0)]).unwrap();
        // Cut inside the second chunk: the third goes whole.
        a.keep_first(3);
        assert_eq!(spill.len(), 4);
        let mut merged = spill.merged().unwrap();
        let mut got = Vec::new();
        while let Some(next) = merged.next_with_stream() {
            let (leaf, stream) = next.unwrap();
            got.push((leaf.key.commit_lsn.0, stream));
        }
        assert_eq!(got, [(1, 0), (2, 1), (3, 0), (4, 0)]);
        a.keep_first(0);
        assert_eq!(spill.len(), 1);
    }

    #[test]
    fn a_stream_out_of_key_order_is_an_error_not_a_silent_sort() {
        let dir = tempfile::tempdir().unwrap();
        let spill = LeafSpill::create_in(dir.path()).unwrap();
        let s = spill.stream();
        s.write(&[leaf(5, 0)]).unwrap();
        s.write(&[leaf(4, 0)]).unwrap();
        let results: Vec<_> = spill.merged().unwrap().collect();
        assert!(
            results.iter().any(|r| r.is_err()),
            "an out-of-order stream merged without error"
        );
    }

    #[test]
    fn the_spill_leaves_no_file_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let spill = LeafSpill::create_in(dir.path()).unwrap();
        spill.stream().write(&[leaf(1, 1)]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
