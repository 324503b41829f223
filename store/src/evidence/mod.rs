//! Evidence that an archive is complete and unaltered (issue 20): the archive's changes as
//! leaves of one RFC 6962 Merkle tree, whose root a signed checkpoint can pin and whose proofs
//! tools nobody on this project wrote can check.
//!
//! The leaf of each change ([`leaf`]) is computed at compaction from the batch written to the
//! segment, and joins the tree ([`merkle`]) in the commit that lists the segment ([`state`]);
//! signed checkpoints ([`note`]) pin the root; [`verify`] recomputes it all from the files.

pub mod bundle;
pub mod certificate;
#[doc(hidden)]
pub mod fuzzing;
pub mod hasher;
pub mod hold;
pub mod leaf;
pub mod merkle;
pub mod note;
pub mod prove;
pub mod redact;
pub mod requests;
pub mod retention;
mod scratch;
pub mod signer;
pub mod spill;
pub mod state;
#[doc(hidden)]
pub mod tampering;
pub mod verify;
