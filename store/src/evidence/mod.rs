//! Evidence that an archive is complete and unaltered (issue 20): the archive's changes as
//! leaves of one RFC 6962 Merkle tree, whose root a signed checkpoint can pin and whose proofs
//! tools nobody on this project wrote can check.
//!
//! So far: the tree itself ([`merkle`]). The leaf encoding, its place in compaction and
//! `pgtrail verify` build on it.

pub mod merkle;
pub mod note;
