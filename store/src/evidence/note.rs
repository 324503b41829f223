//! Signed notes (C2SP `signed-note`) carrying checkpoints (C2SP `tlog-checkpoint`), with
//! Ed25519 keys in the text forms of Go's `golang.org/x/mod/sumdb/note`, so that Go's `note`
//! and `tlog` packages, and every verifier of C2SP transparency logs, check what pgtrail signs.
//!
//! - A key's name is the log's origin. Its ID is the first four bytes (big-endian) of
//!   `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)`.
//! - A verifier key reads `name+ID+base64(0x01 ‖ public key)`; a signing key
//!   `PRIVATE+KEY+name+ID+base64(0x01 ‖ seed)` (ID as 8 hex digits).
//! - A note is its text (lines ending in `\n`), a blank line, then one line per signature:
//!   `— name base64(ID ‖ signature)`, the signature over the text's bytes.
//! - A checkpoint's text is the origin, the tree size in decimal, and the root in base64, a line
//!   each.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use super::merkle::Hash;
use crate::segment::hex;

/// The algorithm byte of an Ed25519 key in a note key.
const ED25519_ALGORITHM: u8 = 0x01;
/// C2SP tlog-cosignature's timestamped Ed25519 cosignature (`cosignature/v1`).
const COSIGNATURE_ALGORITHM: u8 = 0x04;

/// Why a key, a note or a checkpoint is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("not a key name: {0:?} (a name is not empty and holds no '+', space or newline)")]
    BadName(String),
    #[error("not a {what} key: {why}")]
    BadKey { what: &'static str, why: String },
    #[error("not a signed note: {0}")]
    Malformed(String),
    #[error("no valid signature by {0} on the note")]
    Unverified(String),
    #[error("not a checkpoint: {0}")]
    BadCheckpoint(String),
    #[error("the external signer (--signer-command) failed: {0}; nothing was signed")]
    Signer(String),
}

fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() || name.contains(['+', ' ', '\n', '\t', '\r']) {
        return Err(NoteError::BadName(name.to_string()));
    }
    Ok(())
}

/// A key's ID: what a signature line names it by besides its name.
fn key_id(name: &str, public_key: &[u8]) -> [u8; 4] {
    key_id_of(name, ED25519_ALGORITHM, public_key)
}

/// A key's ID for its signature type: `SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4]`.
fn key_id_of(name: &str, algorithm: u8, public_key: &[u8]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([algorithm]);
    h.update(public_key);
    let sum = h.finalize();
    [sum[0], sum[1], sum[2], sum[3]]
}

/// A key that signs notes.
pub struct SigningKey {
    name: String,
    id: [u8; 4],
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    // Never the key itself: it must not reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}+{})", self.name, hex(&self.id))
    }
}

/// `name+ID+key` split into the name, the ID's text (checked against the public key with
/// [`checked_id`]) and the key's bytes after the algorithm byte.
fn split_key<'a>(
    text: &'a str,
    what: &'static str,
) -> Result<(&'a str, &'a str, Vec<u8>), NoteError> {
    split_key_of(text, what, ED25519_ALGORITHM)
}

/// [`split_key`] for a key of signature type `algorithm`.
fn split_key_of<'a>(
    text: &'a str,
    what: &'static str,
    algorithm: u8,
) -> Result<(&'a str, &'a str, Vec<u8>), NoteError> {
    let bad = |why: &str| NoteError::BadKey {
        what,
        why: why.to_string(),
    };
    let mut parts = text.trim().splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected NAME+ID+KEY"));
    };
    check_name(name)?;
    let key = BASE64
        .decode(key)
        .map_err(|_| bad("its key is not base64"))?;
    if key.len() != 33 || key[0] != algorithm {
        return Err(bad(if algorithm == COSIGNATURE_ALGORITHM {
            "not a cosigner's key (type byte 4, an Ed25519 cosignature/v1 key, and 32 bytes)"
        } else {
            "not an Ed25519 key (algorithm byte 1 and 32 bytes)"
        }));
    }
    if id.len() != 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("its ID is not 8 hexadecimal digits"));
    }
    Ok((name, id, key[1..].to_vec()))
}

/// The ID of the key `name` with `public`, if `written` (a key text's ID) is it.
fn checked_id(
    name: &str,
    written: &str,
    public: &[u8],
    what: &'static str,
) -> Result<[u8; 4], NoteError> {
    let id = key_id(name, public);
    if written != hex(&id) {
        return Err(NoteError::BadKey {
            what,
            why: "its ID does not match its name and key".into(),
        });
    }
    Ok(id)
}

impl SigningKey {
    /// A new random key named `name`: the signing key's text (keep it secret) and the
    /// verifier key's text (give it to auditors).
    pub fn generate(name: &str) -> Result<(String, String), NoteError> {
        check_name(name)?;
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).map_err(
            |_| NoteError::BadKey {
                what: "signing",
                why: "the system's random source failed".into(),
            },
        )?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| NoteError::BadKey {
            what: "signing",
            why: "ring refused the seed".into(),
        })?;
        let public = pair.public_key().as_ref();
        let id = hex(&key_id(name, public));
        let with_algorithm = |bytes: &[u8]| {
            let mut key = vec![ED25519_ALGORITHM];
            key.extend_from_slice(bytes);
            BASE64.encode(key)
        };
        Ok((
            format!("PRIVATE+KEY+{name}+{id}+{}", with_algorithm(&seed)),
            format!("{name}+{id}+{}", with_algorithm(public)),
        ))
    }

    /// A signing key from its text.
    pub fn parse(text: &str) -> Result<SigningKey, NoteError> {
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| NoteError::BadKey {
                what: "signing",
                why: "it does not begin with PRIVATE+KEY+".into(),
            })?;
        let (name, written_id, seed) = split_key(rest, "signing")?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| NoteError::BadKey {
            what: "signing",
            why: "not an Ed25519 seed".into(),
        })?;
        let id = checked_id(name, written_id, pair.public_key().as_ref(), "signing")?;
        Ok(SigningKey {
            name: name.to_string(),
            id,
            pair,
        })
    }

    /// The signing key in the file at `path`, refused (as ssh refuses a private key) when the
    /// file can be read or written by anyone but its owner: a key others could read signs
    /// nothing an auditor should trust.
    pub fn read_file(path: &std::path::Path) -> Result<SigningKey, NoteError> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |why: String| NoteError::BadKey {
            what: "signing",
            why,
        };
        let meta = std::fs::metadata(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "{} has mode {mode:03o}, so others can read or change it; run chmod 600 on it                  (and make a new key if anyone else may have read it)",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        SigningKey::parse(&text)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `text` as a note signed by this key. `text` must be lines, each ending in `\n`, none
    /// empty.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        let mut signed = self.id.to_vec();
        signed.extend_from_slice(self.pair.sign(text.as_bytes()).as_ref());
        Ok(format!(
            "{text}\n— {} {}\n",
            self.name,
            BASE64.encode(signed)
        ))
    }
}

impl SigningKey {
    /// The verifier key text of this key as a cosigner (C2SP tlog-cosignature, type 0x04):
    /// what `verify --witness-key` takes.
    pub fn cosigner_key(&self) -> String {
        let public = self.pair.public_key().as_ref();
        let mut key = vec![COSIGNATURE_ALGORITHM];
        key.extend_from_slice(public);
        format!(
            "{}+{}+{}",
            self.name,
            hex(&key_id_of(&self.name, COSIGNATURE_ALGORITHM, public)),
            BASE64.encode(key)
        )
    }

    /// `note` with a `cosignature/v1` line of this key added: Ed25519 over
    /// `"cosignature/v1\ntime <time>\n" ‖ text`, the line's bytes the key ID, the time (u64,
    /// big-endian) and the signature.
    pub fn cosign(&self, note: &str, time: u64) -> Result<String, NoteError> {
        let (text, _) = split_note(note)?;
        let message = format!("cosignature/v1\ntime {time}\n{text}");
        let public = self.pair.public_key().as_ref();
        let mut line = key_id_of(&self.name, COSIGNATURE_ALGORITHM, public).to_vec();
        line.extend_from_slice(&time.to_be_bytes());
        line.extend_from_slice(self.pair.sign(message.as_bytes()).as_ref());
        let mut out = note.to_string();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("— {} {}\n", self.name, BASE64.encode(line)));
        Ok(out)
    }
}

/// A cosigner's (a witness's, an auditor's) verifier key: C2SP tlog-cosignature, type 0x04.
#[derive(Clone, Debug)]
pub struct WitnessKey {
    name: String,
    id: [u8; 4],
    public: Vec<u8>,
}

impl WitnessKey {
    pub fn parse(text: &str) -> Result<WitnessKey, NoteError> {
        let (name, written_id, public) = split_key_of(text, "cosigner", COSIGNATURE_ALGORITHM)?;
        let id = key_id_of(name, COSIGNATURE_ALGORITHM, &public);
        if written_id != hex(&id) {
            return Err(NoteError::BadKey {
                what: "cosigner",
                why: "its ID does not match its name and key".into(),
            });
        }
        Ok(WitnessKey {
            name: name.to_string(),
            id,
            public,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The time of this cosigner's cosignature on `note`, `None` when it has none; an error
    /// when it has a line of this key that does not verify (edited, or moved to another
    /// checkpoint).
    pub fn cosigned(&self, note: &str) -> Result<Option<u64>, NoteError> {
        let (text, signatures) = split_note(note)?;
        let public = UnparsedPublicKey::new(&ED25519, &self.public);
        for (name, bytes) in signature_lines(signatures)? {
            if name != self.name || bytes.len() != 4 + 8 + 64 || bytes[..4] != self.id {
                continue;
            }
            let time = u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes"));
            let message = format!("cosignature/v1\ntime {time}\n{text}");
            if public.verify(message.as_bytes(), &bytes[12..]).is_ok() {
                return Ok(Some(time));
            }
            return Err(NoteError::Unverified(format!(
                "the cosignature of {}+{}",
                self.name,
                hex(&self.id)
            )));
        }
        Ok(None)
    }
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') || text.contains("\n\n") || text.starts_with('\n') {
        return Err(NoteError::Malformed(
            "its text must be non-empty lines, each ending in a newline".into(),
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed(
            "its text holds a control character".into(),
        ));
    }
    Ok(())
}

/// A key that checks notes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    id: [u8; 4],
    public: Vec<u8>,
}

impl VerifierKey {
    pub fn parse(text: &str) -> Result<VerifierKey, NoteError> {
        let (name, written_id, public) = split_key(text, "verifier")?;
        let id = checked_id(name, written_id, &public, "verifier")?;
        Ok(VerifierKey {
            name: name.to_string(),
            id,
            public,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text of `note` when a signature line of this key verifies over it. Signature lines
    /// of other keys (an auditor's cosignature, say) are passed over, as the spec says.
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let (text, signatures) = split_note(note)?;
        let public = UnparsedPublicKey::new(&ED25519, &self.public);
        for (name, signature) in signature_lines(signatures)? {
            if name == self.name
                && signature.len() == 68
                && signature[..4] == self.id
                && public.verify(text.as_bytes(), &signature[4..]).is_ok()
            {
                return Ok(text);
            }
        }
        Err(NoteError::Unverified(format!(
            "{}+{}",
            self.name,
            hex(&self.id)
        )))
    }
}

/// A note's signature lines: each `— NAME BASE64` as the name and the decoded bytes.
fn signature_lines(signatures: &str) -> Result<Vec<(&str, Vec<u8>)>, NoteError> {
    if !signatures.ends_with('\n') {
        return Err(NoteError::Malformed(
            "its last signature line does not end in a newline".into(),
        ));
    }
    signatures
        .lines()
        .map(|line| {
            let (name, signature) = line
                .strip_prefix("— ")
                .and_then(|rest| rest.split_once(' '))
                .ok_or_else(|| NoteError::Malformed(format!("not a signature line: {line:?}")))?;
            let bytes = BASE64.decode(signature).map_err(|_| {
                NoteError::Malformed(format!("a signature that is not base64: {line:?}"))
            })?;
            Ok((name, bytes))
        })
        .collect()
}

/// A note's text (checked to be lines) and its signature lines, split at the blank line.
fn split_note(note: &str) -> Result<(&str, &str), NoteError> {
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| NoteError::Malformed("no blank line before its signatures".into()))?;
    let (text, signatures) = (&note[..split + 1], &note[split + 2..]);
    check_text(text)?;
    Ok((text, signatures))
}

/// A tree's size and root, under its log's origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The checkpoint's text (C2SP `tlog-checkpoint`, no extension lines).
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root)
        )
    }

    /// The checkpoint a signed note carries, its signatures NOT checked: for a note pgtrail
    /// wrote itself, or to report what an unverifiable note claims
    /// ([`VerifierKey::open`] is what makes a note count).
    pub fn in_note_unverified(note: &str) -> Result<Checkpoint, NoteError> {
        Checkpoint::parse(split_note(note)?.0)
    }

    /// A checkpoint from its text (extension lines after the root are refused: pgtrail writes
    /// none, and one it does not know could change the meaning).
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = |why: &str| NoteError::BadCheckpoint(why.to_string());
        // What a signed note cannot carry (a control character, say, in the origin) is no
        // checkpoint either: one pgtrail could read but never sign or be shown signed.
        check_text(text).map_err(|_| bad("it is not lines of text without control characters"))?;
        let lines: Vec<&str> = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("it does not end in a newline"))?
            .split('\n')
            .collect();
        let [origin, size, root] = lines[..] else {
            return Err(bad("expected three lines: origin, size, root"));
        };
        if origin.is_empty() {
            return Err(bad("its origin is empty"));
        }
        // Digits only, no leading zero: `+13` or `013` would be a second text of one checkpoint.
        let size = size
            .parse::<u64>()
            .ok()
            .filter(|_| size.bytes().all(|b| b.is_ascii_digit()))
            .filter(|_| size == "0" || !size.starts_with('0'))
            .ok_or_else(|| bad("its size is not a decimal number"))?;
        let root: Hash = BASE64
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("its root is not 32 bytes of base64"))?;
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_has_one_text() {
        let root = BASE64.encode([7u8; 32]);
        assert!(Checkpoint::parse(&format!("log\n13\n{root}\n")).is_ok());
        // Found by the evidence_texts fuzz target: each parsed, and read back differently.
        for text in [
            format!("log\n+13\n{root}\n"),
            format!("log\n013\n{root}\n"),
            format!("lo\u{0}g\n13\n{root}\n"),
        ] {
            assert!(Checkpoint::parse(&text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_signed_checkpoint_opens_with_its_key_only() {
        let (skey, vkey) = SigningKey::generate("pgtrail.example/shop").unwrap();
        assert!(skey.starts_with("PRIVATE+KEY+pgtrail.example/shop+"));
        let signer = SigningKey::parse(&skey).unwrap();
        let verifier = VerifierKey::parse(&vkey).unwrap();
        // The key data is the fifth field; base64 may itself hold a `+`, so split at most
        // four times (the last `+` alone could leave a short tail that any text contains).
        let secret = skey.splitn(5, '+').nth(4).unwrap();
        assert!(secret.len() > 40, "{skey}");
        assert!(!format!("{signer:?}").contains(secret));
        let checkpoint = Checkpoint {
            origin: "pgtrail.example/shop".into(),
            size: 13,
            root: [7; 32],
        };
        let note = signer.sign(&checkpoint.text()).unwrap();
        let text = verifier.open(&note).unwrap();
        assert_eq!(Checkpoint::parse(text).unwrap(), checkpoint);

        // Another size, another key, a signature of another key beside it, a cut note.
        let edited = note.replacen("\n13\n", "\n14\n", 1);
        assert!(matches!(
            verifier.open(&edited),
            Err(NoteError::Unverified(_))
        ));
        let (other_skey, other_vkey) = SigningKey::generate("pgtrail.example/shop").unwrap();
        let other = VerifierKey::parse(&other_vkey).unwrap();
        assert!(other.open(&note).is_err());
        let cosigned = format!(
            "{note}{}",
            SigningKey::parse(&other_skey)
                .unwrap()
                .sign(&checkpoint.text())
                .unwrap()
                .split("\n\n")
                .nth(1)
                .unwrap()
        );
        assert_eq!(verifier.open(&cosigned).unwrap(), checkpoint.text());
        assert_eq!(other.open(&cosigned).unwrap(), checkpoint.text());
        assert!(verifier.open(&note[..note.len() - 1]).is_err());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let (skey, _) = SigningKey::generate("log").unwrap();
        std::fs::write(&path, format!("{skey}\n")).unwrap();
        for (mode, readable) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match SigningKey::read_file(&path) {
                Ok(key) => assert!(readable && key.name() == "log", "{mode:o}"),
                Err(e) => assert!(
                    !readable && e.to_string().contains("chmod 600"),
                    "{mode:o}: {e}"
                ),
            }
        }
        assert!(SigningKey::read_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn bad_keys_names_and_checkpoints_are_refused() {
        assert!(SigningKey::generate("a+b").is_err());
        assert!(SigningKey::generate("").is_err());
        let (skey, vkey) = SigningKey::generate("log").unwrap();
        assert!(VerifierKey::parse(&skey).is_err());
        assert!(SigningKey::parse(&vkey).is_err());
        // An ID that does not match the key.
        let mut parts: Vec<String> = vkey.split('+').map(str::to_string).collect();
        parts[1] = "00000000".into();
        assert!(VerifierKey::parse(&parts.join("+")).is_err());
        for text in [
            "log\n13\n",
            "log\n013\nAAAA\n",
            "log\n13\nAAAA\n",
            "log\n13\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\nextra\n",
            "\n13\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
        ] {
            assert!(Checkpoint::parse(text).is_err(), "{text:?}");
        }
        let signer = SigningKey::parse(&skey).unwrap();
        assert!(signer.sign("no newline").is_err());
        assert!(signer.sign("a\n\nb\n").is_err());
    }
}
