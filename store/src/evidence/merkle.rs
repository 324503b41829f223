//! The Merkle tree of RFC 6962 (section 2.1, unchanged in RFC 9162): SHA-256, leaves hashed
//! with a `0x00` prefix and inner nodes with `0x01` (domain separation: an inner node cannot be
//! passed off as a leaf), the left subtree of `n` leaves holding the largest power of two below
//! `n`. Proofs are made as RFC 6962 defines them (`PATH`, `SUBPROOF`) and checked as RFC 9162
//! sections 2.1.3.2 and 2.1.4.2 say, step by step, so that any verifier of Certificate
//! Transparency or of a C2SP transparency log checks them too.

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf's hash, a subtree's, or a tree's root.
pub type Hash = [u8; 32];

/// The hash of a leaf whose bytes are `data`: `SHA-256(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an inner node: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the tree of no leaf: `SHA-256()` of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly below `n` (`n` ≥ 2): where RFC 6962 splits `n` leaves.
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// `MTH(D[n])` over leaves already hashed.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The tree's right edge: the roots of its perfect subtrees, largest (leftmost) first, one
/// for each bit set in its size (the bit's place is the subtree's height). Enough to take the
/// next leaf and to give the root, in `O(log n)` space: what an archive keeps between
/// compactions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    edge: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// The number of leaves taken.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Take the next leaf's hash.
    pub fn push(&mut self, leaf: Hash) {
        // Each low bit set in the size is a perfect subtree as high as the one the new leaf
        // completes: the two are one subtree of the next height (the carry of `size + 1`).
        let mut node = leaf;
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self
                .edge
                .pop()
                .expect("one subtree per bit set in the size");
            node = node_hash(&left, &node);
            size >>= 1;
        }
        self.edge.push(node);
        self.size += 1;
    }

    /// The frontier as stored: `u64 size` (big-endian) then the edge's hashes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 32 * self.edge.len());
        b.extend_from_slice(&self.size.to_be_bytes());
        for h in &self.edge {
            b.extend_from_slice(h);
        }
        b
    }

    /// A frontier from [`to_bytes`](Self::to_bytes); None when the bytes are not one (the
    /// edge must hold one hash per bit set in the size).
    pub fn from_bytes(b: &[u8]) -> Option<Frontier> {
        let size = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let rest = &b[8..];
        if rest.len() != 32 * size.count_ones() as usize {
            return None;
        }
        let edge = rest
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        Some(Frontier { size, edge })
    }

    /// The root of the leaves taken: the edge folded from the right, as `MTH` splits.
    pub fn root(&self) -> Hash {
        let mut nodes = self.edge.iter().rev();
        match nodes.next() {
            None => empty_root(),
            Some(last) => nodes.fold(*last, |right, left| node_hash(left, &right)),
        }
    }
}

/// Leaf hashes that proofs are made from: a slice in memory, or a file of them (see
/// `super::scratch`), which gives the root of any run of them.
pub trait LeafHashes {
    type Error;
    /// How many leaves there are.
    fn count(&self) -> u64;
    /// `MTH` of the leaves `lo..hi` (`lo ≤ hi ≤ count`).
    fn subtree_root(&self, lo: u64, hi: u64) -> Result<Hash, Self::Error>;
}

impl LeafHashes for [Hash] {
    type Error = std::convert::Infallible;

    fn count(&self) -> u64 {
        self.len() as u64
    }

    fn subtree_root(&self, lo: u64, hi: u64) -> Result<Hash, Self::Error> {
        Ok(root(&self[lo as usize..hi as usize]))
    }
}

/// The audit path of leaf `index` in the tree of `leaves` (RFC 6962 `PATH`), nearest the leaf
/// first. `None` when `index` is not a leaf of it.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Option<Vec<Hash>> {
    let Ok(proof) = inclusion_proof_in(leaves, leaves.count(), index);
    proof
}

/// [`inclusion_proof`] in the tree of the first `size` of `leaves`.
pub fn inclusion_proof_in<L: LeafHashes + ?Sized>(
    leaves: &L,
    size: u64,
    index: u64,
) -> Result<Option<Vec<Hash>>, L::Error> {
    fn path<L: LeafHashes + ?Sized>(
        leaves: &L,
        m: u64,
        at: u64,
        n: u64,
        out: &mut Vec<Hash>,
    ) -> Result<(), L::Error> {
        if n <= 1 {
            return Ok(());
        }
        let k = split_u64(n);
        if m < k {
            path(leaves, m, at, k, out)?;
            out.push(leaves.subtree_root(at + k, at + n)?);
        } else {
            path(leaves, m - k, at + k, n - k, out)?;
            out.push(leaves.subtree_root(at, at + k)?);
        }
        Ok(())
    }
    if index >= size || size > leaves.count() {
        return Ok(None);
    }
    let mut out = Vec::new();
    path(leaves, index, 0, size, &mut out)?;
    Ok(Some(out))
}

/// The proof that the tree of the first `m` of `leaves` is a prefix of the tree of all of them
/// (RFC 6962 `PROOF`). `None` unless `0 < m ≤ n`; empty when `m == n`.
pub fn consistency_proof(leaves: &[Hash], m: u64) -> Option<Vec<Hash>> {
    let Ok(proof) = consistency_proof_in(leaves, leaves.count(), m);
    proof
}

/// [`consistency_proof`] between the trees of the first `m` and the first `size` of `leaves`.
pub fn consistency_proof_in<L: LeafHashes + ?Sized>(
    leaves: &L,
    size: u64,
    m: u64,
) -> Result<Option<Vec<Hash>>, L::Error> {
    fn subproof<L: LeafHashes + ?Sized>(
        leaves: &L,
        m: u64,
        at: u64,
        n: u64,
        whole: bool,
        out: &mut Vec<Hash>,
    ) -> Result<(), L::Error> {
        if m == n {
            if !whole {
                out.push(leaves.subtree_root(at, at + n)?);
            }
            return Ok(());
        }
        let k = split_u64(n);
        if m <= k {
            subproof(leaves, m, at, k, whole, out)?;
            out.push(leaves.subtree_root(at + k, at + n)?);
        } else {
            subproof(leaves, m - k, at + k, n - k, false, out)?;
            out.push(leaves.subtree_root(at, at + k)?);
        }
        Ok(())
    }
    if m == 0 || m > size || size > leaves.count() {
        return Ok(None);
    }
    let mut out = Vec::new();
    subproof(leaves, m, 0, size, true, &mut out)?;
    Ok(Some(out))
}

/// The proof that `leaves[first..first + count]` are, in order, the leaves at those places of
/// the tree of all `leaves` (a *range proof*, pgtrail's own and not an RFC's): the root of
/// every largest subtree wholly outside the range, in the order a depth-first walk of RFC 6962's
/// splits meets them. With the range's leaf hashes it gives the root again
/// ([`root_from_range`]), so no leaf can be added to, removed from or moved within the range
/// unseen. `None` when the range is empty or not inside the tree.
pub fn range_proof(leaves: &[Hash], first: u64, count: u64) -> Option<Vec<Hash>> {
    let Ok(proof) = range_proof_in(leaves, leaves.count(), first, count);
    proof
}

/// [`range_proof`] in the tree of the first `size` of `leaves`.
pub fn range_proof_in<L: LeafHashes + ?Sized>(
    leaves: &L,
    size: u64,
    first: u64,
    count: u64,
) -> Result<Option<Vec<Hash>>, L::Error> {
    fn walk<L: LeafHashes + ?Sized>(
        leaves: &L,
        at: u64,
        n: u64,
        range: (u64, u64),
        out: &mut Vec<Hash>,
    ) -> Result<(), L::Error> {
        let (lo, hi) = range;
        if at + n <= lo || at >= hi {
            out.push(leaves.subtree_root(at, at + n)?);
        } else if n > 1 {
            let k = split_u64(n);
            walk(leaves, at, k, range, out)?;
            walk(leaves, at + k, n - k, range, out)?;
        }
        Ok(())
    }
    let Some(hi) = first.checked_add(count) else {
        return Ok(None);
    };
    if count == 0 || hi > size || size > leaves.count() {
        return Ok(None);
    }
    let mut out = Vec::new();
    walk(leaves, 0, size, (first, hi), &mut out)?;
    Ok(Some(out))
}

/// [`split`] for sizes counted in `u64`.
fn split_u64(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (u64::BITS - 1 - (n - 1).leading_zeros())
}

/// The root of the tree of `size` leaves whose leaves `first..` are `range` and whose other
/// subtrees are `proof` (see [`range_proof`]); `None` when they do not fit together (a hash
/// too many or too few).
pub fn root_from_range(size: u64, first: u64, range: &[Hash], proof: &[Hash]) -> Option<Hash> {
    struct Walk<'a> {
        lo: u64,
        hi: u64,
        range: std::slice::Iter<'a, Hash>,
        proof: std::slice::Iter<'a, Hash>,
    }
    impl Walk<'_> {
        fn node(&mut self, at: u64, n: u64) -> Option<Hash> {
            if at + n <= self.lo || at >= self.hi {
                self.proof.next().copied()
            } else if n == 1 {
                self.range.next().copied()
            } else {
                let k = split(usize::try_from(n).ok()?) as u64;
                let left = self.node(at, k)?;
                let right = self.node(at + k, n - k)?;
                Some(node_hash(&left, &right))
            }
        }
    }
    let hi = first.checked_add(range.len() as u64)?;
    if range.is_empty() || hi > size {
        return None;
    }
    let mut walk = Walk {
        lo: first,
        hi,
        range: range.iter(),
        proof: proof.iter(),
    };
    let root = walk.node(0, size)?;
    (walk.range.next().is_none() && walk.proof.next().is_none()).then_some(root)
}

/// The step both RFC 9162 verifications take after hashing a node in from the left: "if
/// LSB(fn) is not set, right-shift both fn and sn equally until either LSB(fn) is set or fn
/// is 0".
fn shift_while_even(fn_: &mut u64, sn: &mut u64) {
    while *fn_ & 1 == 0 && *fn_ != 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// Whether `proof` shows the leaf hashed `leaf` at `index` in the tree of `size` leaves whose
/// root is `root` (RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            shift_while_even(&mut fn_, &mut sn);
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

/// Whether `proof` shows the tree of `first` leaves with root `first_root` to be a prefix of
/// the tree of `second` leaves with root `second_root` (RFC 9162 section 2.1.4.2; the empty
/// tree is a prefix of every tree, and a tree of itself, with an empty proof).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first > second {
        return false;
    }
    if first == 0 {
        return proof.is_empty();
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            shift_while_even(&mut fn_, &mut sn);
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    fr == *first_root && sr == *second_root && sn == 0
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_frontier_reads_back_from_its_bytes_and_refuses_a_wrong_edge() {
        let mut f = Frontier::new();
        for i in 0..13u8 {
            assert_eq!(Frontier::from_bytes(&f.to_bytes()), Some(f.clone()));
            f.push([i; 32]);
        }
        let mut bytes = f.to_bytes();
        bytes.extend_from_slice(&[0; 32]);
        assert_eq!(
            Frontier::from_bytes(&bytes),
            None,
            "one hash too many for size 13"
        );
        assert_eq!(Frontier::from_bytes(&bytes[..5]), None);
    }

    use super::*;

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The leaves of Certificate Transparency's reference tests (its `merkle_tree_test.cc`),
    /// hashed.
    fn reference_leaves() -> Vec<Hash> {
        [
            &b""[..],
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ]
        .iter()
        .map(|d| leaf_hash(d))
        .collect()
    }

    #[test]
    fn roots_match_the_certificate_transparency_reference() {
        // Roots of the first 1 to 8 reference leaves, as the reference tests list them.
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves = reference_leaves();
        let mut frontier = Frontier::new();
        for (n, want) in expected.iter().enumerate() {
            frontier.push(leaves[n]);
            assert_eq!(hex(&root(&leaves[..=n])), *want, "size {}", n + 1);
            assert_eq!(hex(&frontier.root()), *want, "frontier, size {}", n + 1);
        }
        assert_eq!(
            hex(&empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n as u32).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn the_frontier_gives_the_root_of_every_size() {
        let all = leaves(300);
        let mut frontier = Frontier::new();
        for n in 1..=all.len() {
            frontier.push(all[n - 1]);
            assert_eq!(frontier.size(), n as u64);
            assert_eq!(frontier.root(), root(&all[..n]), "size {n}");
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_forged_one_does_not() {
        let all = leaves(41);
        for n in 1..all.len() {
            let tree = &all[..n];
            let r = root(tree);
            for i in 0..n as u64 {
                let proof = inclusion_proof(tree, i).unwrap();
                let leaf = &tree[i as usize];
                assert!(
                    verify_inclusion(leaf, i, n as u64, &proof, &r),
                    "{i} of {n}"
                );
                // Another leaf, another index, another size, a proof cut short or lengthened.
                assert!(!verify_inclusion(&leaf_hash(b"x"), i, n as u64, &proof, &r));
                if n > 1 {
                    let other = (i + 1) % n as u64;
                    assert!(!verify_inclusion(leaf, other, n as u64, &proof, &r));
                    // The next size's tree (its root, not this one's: a root is pinned to
                    // its size by the checkpoint that signs both).
                    let next = root(&all[..=n]);
                    assert!(!verify_inclusion(leaf, i, n as u64 + 1, &proof, &next));
                    assert!(!verify_inclusion(leaf, i, n as u64, &proof[1..], &r));
                }
                let mut longer = proof.clone();
                longer.push(r);
                assert!(!verify_inclusion(leaf, i, n as u64, &longer, &r));
            }
            assert!(inclusion_proof(tree, n as u64).is_none());
            assert!(!verify_inclusion(&tree[0], n as u64, n as u64, &[], &r));
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_a_forked_history_does_not() {
        let all = leaves(40);
        for n in 1..=all.len() {
            let second = root(&all[..n]);
            for m in 1..=n {
                let first = root(&all[..m]);
                let proof = consistency_proof(&all[..n], m as u64).unwrap();
                let (m64, n64) = (m as u64, n as u64);
                assert!(
                    verify_consistency(m64, n64, &first, &second, &proof),
                    "{m} to {n}"
                );
                // A history in which one of the first m leaves was changed afterwards.
                let mut forked = all[..n].to_vec();
                forked[m / 2] = leaf_hash(b"changed");
                let forked_root = root(&forked);
                assert!(!verify_consistency(m64, n64, &first, &forked_root, &proof));
                if m < n {
                    // The proof must use the whole second size (the pitfall a Haskell
                    // implementation shipped: a proof accepted for a wrong second size).
                    let bigger = root(&all[..(n + 1).min(all.len())]);
                    if n < all.len() {
                        assert!(!verify_consistency(m64, n64 + 1, &first, &bigger, &proof));
                    }
                    assert!(!verify_consistency(m64, n64, &first, &second, &proof[1..]));
                    assert!(!verify_consistency(m64, n64, &second, &second, &proof));
                }
            }
            assert!(verify_consistency(0, n as u64, &empty_root(), &second, &[]));
            assert!(consistency_proof(&all[..n], 0).is_none());
            assert!(consistency_proof(&all[..n], n as u64 + 1).is_none());
        }
    }

    #[test]
    fn a_range_proof_gives_the_root_for_every_range_and_only_with_its_own_leaves() {
        let leaves: Vec<Hash> = (0u32..37).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for size in [1usize, 2, 3, 7, 8, 13, 37] {
            let tree = &leaves[..size];
            let want = root(tree);
            for first in 0..size {
                for count in 1..=size - first {
                    let range = &tree[first..first + count];
                    let proof = range_proof(tree, first as u64, count as u64).unwrap();
                    assert_eq!(
                        root_from_range(size as u64, first as u64, range, &proof),
                        Some(want),
                        "size {size} range {first}+{count}"
                    );
                    // A leaf of the range left out, or the range put one place further on,
                    // does not give the root.
                    if count > 1 {
                        let fewer = &range[..count - 1];
                        assert_ne!(
                            root_from_range(size as u64, first as u64, fewer, &proof),
                            Some(want)
                        );
                    }
                    if first + count < size {
                        assert_ne!(
                            root_from_range(size as u64, first as u64 + 1, range, &proof),
                            Some(want)
                        );
                    }
                }
            }
        }
        assert!(range_proof(&leaves[..5], 4, 2).is_none());
        assert!(range_proof(&leaves[..5], 0, 0).is_none());
    }
}
