//! Entry points for the fuzz targets (`tools/fuzz`): not part of the API.

use std::sync::OnceLock;

use super::certificate::Coverage;
use super::note::{Checkpoint, SigningKey, VerifierKey, WitnessKey};

/// One key pair for every input: generating one per input would be most of the work.
fn keys() -> &'static (SigningKey, VerifierKey, WitnessKey) {
    static KEYS: OnceLock<(SigningKey, VerifierKey, WitnessKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (signing, verifier) = SigningKey::generate("fuzz.invalid/log").expect("a key");
        let signing = SigningKey::parse(&signing).expect("its own key parses");
        let witness = WitnessKey::parse(&signing.cosigner_key()).expect("its own cosigner key");
        let verifier = VerifierKey::parse(&verifier).expect("its own verifier key");
        (signing, verifier, witness)
    })
}

/// `text` as each text the evidence reads (a checkpoint, a signed note, a key of each kind, a
/// coverage statement): never a panic; what parses says itself back the same way, byte for
/// byte for a checkpoint (one checkpoint, one text: no second spelling of a root or size); a
/// note pgtrail signs opens with its verifier key and carries its cosignature's time.
pub fn evidence_texts(text: &str) {
    let _ = SigningKey::parse(text);
    let _ = VerifierKey::parse(text);
    let _ = WitnessKey::parse(text);
    let (signing, verifier, witness) = keys();
    let _ = verifier.open(text);
    let _ = witness.cosigned(text);
    let _ = Checkpoint::in_note_unverified(text);
    if let Ok(checkpoint) = Checkpoint::parse(text) {
        assert_eq!(
            checkpoint.text(),
            text,
            "a checkpoint read back differently"
        );
        let note = signing
            .sign(text)
            .expect("a checkpoint's text is a note's text");
        assert_eq!(verifier.open(&note).expect("its own signature"), text);
        let cosigned = signing.cosign(&note, 1_764_547_200).expect("a note");
        assert_eq!(
            witness.cosigned(&cosigned).expect("verifies"),
            Some(1_764_547_200)
        );
        assert_eq!(verifier.open(&cosigned).expect("still opens"), text);
    }
    if let Ok(coverage) = Coverage::parse(text) {
        let again = Coverage::parse(&coverage.text()).expect("a statement it wrote");
        assert_eq!(
            again, coverage,
            "a coverage statement read back differently"
        );
    }
}
