//! `pgtrail prove`: that one change is in the tree a signed checkpoint pins, as a C2SP
//! `tlog-proof` (`c2sp.org/tlog-proof@v1`) an auditor checks with the checkpoint's verifier
//! key alone: the change's `leaf_data` (`extra`), its index, the RFC 6962 inclusion proof, and
//! the checkpoint note.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::merkle::{consistency_proof_in, inclusion_proof_in, leaf_hash, verify_inclusion};
use super::note::Checkpoint;
use super::verify::{VerifyOptions, verify_and_collect};
use crate::error::LogError;
use crate::lsn::ChangeKey;
use crate::segment::SegmentReader;

/// The first line of a proof file.
pub const PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";

#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the archive does not verify ({0}); run `pgtrail verify` and prove nothing from it")]
    Unverified(String),
    #[error("not a checkpoint note: {0}")]
    BadCheckpoint(String),
    #[error(
        "the checkpoint attests {size} changes but the archive's tree holds {held}: prove against a checkpoint of this archive"
    )]
    TooLarge { size: u64, held: u64 },
    #[error(
        "the checkpoint's root is not the root of this archive's first {0} changes: it is another archive's, or this one was altered (run `pgtrail verify --trusted-checkpoint` with it)"
    )]
    OtherRoot(u64),
    #[error(
        "change {key} is not in the tree the checkpoint pins (not archived, compacted after it, or before the archive kept evidence)"
    )]
    NotInTree { key: ChangeKey },
    #[error("cannot read the segment holding change {key}: {why}")]
    Segment { key: ChangeKey, why: String },
}

/// The proof that the change at `key` is in the tree `checkpoint_note` pins, as the text of a
/// `tlog-proof` file. The archive is verified first (a proof from an altered archive would
/// prove nothing); the checkpoint's signature is the verifier's to check.
pub fn prove(dir: &Path, key: ChangeKey, checkpoint_note: &str) -> Result<String, ProveError> {
    let checkpoint = Checkpoint::in_note_unverified(checkpoint_note)
        .map_err(|e| ProveError::BadCheckpoint(e.to_string()))?;
    let collected = verify_and_collect(dir, &VerifyOptions::default(), |_, _| {})?;
    if let Some(p) = collected.report.problems.first() {
        return Err(ProveError::Unverified(format!("{}: {}", p.place, p.what)));
    }
    let held = collected.tree.len();
    if checkpoint.size > held {
        return Err(ProveError::TooLarge {
            size: checkpoint.size,
            held,
        });
    }
    if collected.tree.root(checkpoint.size)? != checkpoint.root {
        return Err(ProveError::OtherRoot(checkpoint.size));
    }
    let Some((_, place)) = collected
        .changes
        .find(key)?
        .filter(|(_, p)| p.index < checkpoint.size)
    else {
        return Err(ProveError::NotInTree { key });
    };
    let index = place.index;
    let entry = &collected.segments[place.segment as usize];
    let path = dir.join(crate::SEGMENTS_DIR).join(&entry.file_name);
    let segment_error = |why: String| ProveError::Segment { key, why };
    let reader = SegmentReader::open(&path, Some(&entry.sha256), 8192)
        .map_err(|e| segment_error(e.to_string()))?;
    let content = reader.content().clone();
    let mut data = None;
    for batch in reader {
        let batch = batch.map_err(|e| segment_error(e.to_string()))?;
        data = super::leaf::leaf_data(&content, &batch, &collected.epochs, &collected.erased, key)
            .map_err(|e| segment_error(e.to_string()))?;
        if data.is_some() {
            break;
        }
    }
    let data = data.ok_or_else(|| segment_error("its segment no longer holds it".into()))?;
    let proof = inclusion_proof_in(&collected.tree, checkpoint.size, index)?
        .ok_or(ProveError::NotInTree { key })?;
    // Checked before it is given: a proof pgtrail hands out must verify.
    let hash = leaf_hash(&data);
    if hash != place.leaf.hash
        || !verify_inclusion(&hash, index, checkpoint.size, &proof, &checkpoint.root)
    {
        return Err(ProveError::OtherRoot(checkpoint.size));
    }
    let mut text = format!(
        "{PROOF_HEADER}\nextra {}\nindex {index}\n",
        BASE64.encode(&data)
    );
    for h in &proof {
        text.push_str(&BASE64.encode(h));
        text.push('\n');
    }
    text.push('\n');
    text.push_str(checkpoint_note);
    Ok(text)
}

/// The first line of a consistency proof file.
pub const CONSISTENCY_HEADER: &str = "pgtrail.dev/consistency-proof@v1";

/// The proof that the tree `old_note` pins is a prefix of the tree `new_note` pins (RFC 6962
/// `PROOF`), as the text of a file: the header, `old-size new-size`, then the hashes in
/// base64, one a line. Whoever kept the old checkpoint checks it with the new one and the
/// verifier key, without the archive: the archive only grew between the two. The archive is
/// verified first, and both checkpoints must be of its tree.
pub fn prove_consistency(dir: &Path, old_note: &str, new_note: &str) -> Result<String, ProveError> {
    let parse = |note: &str| {
        Checkpoint::in_note_unverified(note).map_err(|e| ProveError::BadCheckpoint(e.to_string()))
    };
    let (old, new) = (parse(old_note)?, parse(new_note)?);
    let collected = verify_and_collect(dir, &VerifyOptions::default(), |_, _| {})?;
    if let Some(p) = collected.report.problems.first() {
        return Err(ProveError::Unverified(format!("{}: {}", p.place, p.what)));
    }
    let held = collected.tree.len();
    for checkpoint in [&old, &new] {
        if checkpoint.size > held {
            return Err(ProveError::TooLarge {
                size: checkpoint.size,
                held,
            });
        }
        if collected.tree.root(checkpoint.size)? != checkpoint.root {
            return Err(ProveError::OtherRoot(checkpoint.size));
        }
    }
    if old.size > new.size || old.origin != new.origin {
        return Err(ProveError::BadCheckpoint(format!(
            "the old checkpoint ({} leaves of {}) must be of the same origin as the new one ({} leaves of {}) and no larger",
            old.size, old.origin, new.size, new.origin
        )));
    }
    let proof = if old.size == 0 {
        Vec::new()
    } else {
        consistency_proof_in(&collected.tree, new.size, old.size)?
            .ok_or(ProveError::OtherRoot(old.size))?
    };
    // Checked before it is given.
    if !super::merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &proof) {
        return Err(ProveError::OtherRoot(old.size));
    }
    let mut text = format!("{CONSISTENCY_HEADER}\n{} {}\n", old.size, new.size);
    for h in &proof {
        text.push_str(&BASE64.encode(h));
        text.push('\n');
    }
    Ok(text)
}
