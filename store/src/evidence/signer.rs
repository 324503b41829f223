//! Who signs the archive's checkpoints and certificates: a key file (`pgtrail keygen`), or an
//! external command in front of a key pgtrail never holds (an HSM, a cloud KMS, a signing
//! service).
//!
//! The command gets the note's text on standard input and prints the signed note (the text, a
//! blank line and at least its signature line, C2SP signed-note). pgtrail checks what it
//! printed with the signer's verifier key before using it, and fails closed: a command that
//! fails, hangs past its timeout, signs another text or with another key signs nothing, and
//! the compaction or certificate that needed it stops with the reason (the changes stay in the
//! archive; only the signature is missing).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::note::{NoteError, SigningKey, VerifierKey};

/// How long an external signer may take for one note.
pub const SIGNER_TIMEOUT: Duration = Duration::from_secs(60);

/// A signer of notes.
#[derive(Debug)]
pub enum Signer {
    Key(SigningKey),
    Command(CommandSigner),
}

impl Signer {
    /// The key's name: the origin of every checkpoint it signs.
    pub fn name(&self) -> &str {
        match self {
            Signer::Key(key) => key.name(),
            Signer::Command(c) => c.verifier.name(),
        }
    }

    /// `text` as a note signed by this signer.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        match self {
            Signer::Key(key) => key.sign(text),
            Signer::Command(c) => c.sign(text),
        }
    }
}

/// An external command that signs notes, and the verifier key its signatures must verify with.
#[derive(Debug)]
pub struct CommandSigner {
    /// Run by `sh -c`.
    command: String,
    verifier: VerifierKey,
    timeout: Duration,
}

impl CommandSigner {
    pub fn new(command: String, verifier: VerifierKey) -> CommandSigner {
        CommandSigner {
            command,
            verifier,
            timeout: SIGNER_TIMEOUT,
        }
    }

    fn sign(&self, text: &str) -> Result<String, NoteError> {
        let failed = |why: String| NoteError::Signer(why);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run it: {e}")))?;
        // Its output is read on threads while it runs, so a large output cannot block it.
        let reader = |mut from: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = from.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = reader(Box::new(child.stdout.take().expect("piped")));
        let stderr = reader(Box::new(child.stderr.take().expect("piped")));
        if let Some(mut stdin) = child.stdin.take() {
            // A command that exits without reading fails below by its status or output.
            let _ = stdin.write_all(text.as_bytes());
        }
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!(
                        "it did not finish within {} s and was stopped",
                        self.timeout.as_secs()
                    )));
                }
                Err(e) => return Err(failed(format!("cannot wait for it: {e}"))),
            }
        };
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        if !status.success() {
            let said = String::from_utf8_lossy(&stderr);
            return Err(failed(format!(
                "it exited with {status}{}",
                said.lines()
                    .next()
                    .map_or(String::new(), |l| format!(": {l}"))
            )));
        }
        let note =
            String::from_utf8(stdout).map_err(|_| failed("its output is not UTF-8 text".into()))?;
        let body = self.verifier.open(&note).map_err(|e| {
            failed(format!(
                "its output is not the note signed by --signer-key {} ({e})",
                self.verifier.name()
            ))
        })?;
        if body != text {
            return Err(failed(
                "it signed another text than the one it was given".into(),
            ));
        }
        Ok(note)
    }
}
