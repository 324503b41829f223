//! The archive's Merkle tree and signed checkpoints (issue 20) checked by code nobody on
//! pgtrail wrote: Go's `golang.org/x/mod/sumdb/tlog` and `note`, the transparency log of the Go
//! checksum database, from
//! Debian's `golang-go` and `golang-golang-x-mod-dev` packages (no module download). The test
//! is skipped when they are missing, unless `PGTRAIL_REQUIRE_GO=1` (CI installs them and sets
//! it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use pgtrail_store::evidence::merkle::{Hash, consistency_proof, inclusion_proof, leaf_hash, root};
use pgtrail_store::evidence::note::{Checkpoint, SigningKey};

/// Where Debian's package puts the Go module's sources (GOPATH layout).
const GO_X_MOD: &str = "/usr/share/gocode";

/// `tools/evidence/tlogcheck` built in `dir`, or `None` (said) when Go or x/mod is missing.
fn build_tlogcheck(dir: &Path) -> Option<PathBuf> {
    let has_go = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let has_tlog = Path::new(GO_X_MOD)
        .join("src/golang.org/x/mod/sumdb/tlog")
        .is_dir();
    if !has_go || !has_tlog {
        assert!(
            std::env::var_os("PGTRAIL_REQUIRE_GO").is_none(),
            "PGTRAIL_REQUIRE_GO is set but Go or {GO_X_MOD}'s x/mod is missing \
             (apt-get install golang-go golang-golang-x-mod-dev)"
        );
        eprintln!(
            "skipped: Go's tlog is not installed (apt-get install golang-go golang-golang-x-mod-dev)"
        );
        return None;
    }
    let src = dir.join("gopath/src/tlogcheck");
    std::fs::create_dir_all(&src).unwrap();
    let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("evidence/tlogcheck/main.go");
    std::fs::copy(program, src.join("main.go")).unwrap();
    let binary = dir.join("tlogcheck");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg("tlogcheck")
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:{GO_X_MOD}", dir.join("gopath").display()),
        )
        .env("GOCACHE", dir.join("gocache"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    Some(binary)
}

fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_list(proof: &[Hash]) -> String {
    proof.iter().map(|h| hex(h)).collect::<Vec<_>>().join(",")
}

/// The checkers written by others (Go's `sumdb` packages) or from the README alone (Python):
/// each takes the same input and gives its verdict line.
struct Checkers {
    commands: Vec<(&'static str, Command)>,
}

impl Checkers {
    fn new(dir: &Path) -> Checkers {
        let mut commands = Vec::new();
        if let Some(binary) = build_tlogcheck(dir) {
            commands.push(("go", Command::new(binary)));
        }
        let has_cryptography = Command::new("python3")
            .args(["-c", "import cryptography"])
            .output()
            .is_ok_and(|o| o.status.success());
        if has_cryptography {
            let mut python = Command::new("python3");
            python.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("evidence/check_proofs.py"));
            commands.push(("python", python));
        } else {
            assert!(
                std::env::var_os("PGTRAIL_REQUIRE_PYCRYPTO").is_none(),
                "PGTRAIL_REQUIRE_PYCRYPTO is set but python3 cannot import cryptography"
            );
            eprintln!("skipped: the Python checker (pip install cryptography)");
        }
        Checkers { commands }
    }

    /// Every checker's verdict on `input` (its line, and whether it exited 0), by name.
    fn check(&mut self, input: &str) -> Vec<(&'static str, String, bool)> {
        self.commands
            .iter_mut()
            .map(|(name, command)| {
                let mut child = command
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                let out = child.wait_with_output().unwrap();
                (
                    *name,
                    String::from_utf8_lossy(&out.stdout).trim().to_string(),
                    out.status.success(),
                )
            })
            .collect()
    }

    /// Every checker refuses `input`, its verdict beginning with `verdict`.
    fn refuse(&mut self, input: &str, verdict: &str) {
        for (name, said, ok) in self.check(input) {
            assert!(!ok && said.starts_with(verdict), "{name}: {said}");
        }
    }
}

#[test]
fn go_and_python_accept_every_root_proof_and_checkpoint_of_pgtrails_tree() {
    let dir = tempfile::tempdir().unwrap();
    let mut checkers = Checkers::new(dir.path());
    const N: usize = 40;
    let data: Vec<Vec<u8>> = (0..N).map(|i| format!("change {i}").into_bytes()).collect();
    let leaves: Vec<Hash> = data.iter().map(|d| leaf_hash(d)).collect();
    let mut input = String::new();
    for d in &data {
        input += &format!("leaf {}\n", hex(d));
    }
    let mut proofs = (0, 0);
    let origin = "pgtrail.example/shop";
    let (skey, vkey) = SigningKey::generate(origin).unwrap();
    let signer = SigningKey::parse(&skey).unwrap();
    let signed = |size: usize, root: Hash| {
        let checkpoint = Checkpoint {
            origin: origin.into(),
            size: size as u64,
            root,
        };
        BASE64.encode(signer.sign(&checkpoint.text()).unwrap())
    };
    input += &format!("vkey {vkey}\n");
    for n in 1..=N {
        let tree = &leaves[..n];
        input += &format!("root {n} {}\n", hex(&root(tree)));
        input += &format!("checkpoint {}\n", signed(n, root(tree)));
        for i in 0..n {
            let proof = inclusion_proof(tree, i as u64).unwrap();
            input += &format!("inclusion {n} {i} {}\n", hex_list(&proof));
            proofs.0 += 1;
        }
        for m in 1..=n {
            let proof = consistency_proof(tree, m as u64).unwrap();
            input += &format!("consistency {m} {n} {}\n", hex_list(&proof));
            proofs.1 += 1;
        }
    }
    let expected = format!(
        "ok: {N} roots, {} inclusion proofs, {} consistency proofs, {N} checkpoints",
        proofs.0, proofs.1
    );
    for (name, verdict, ok) in checkers.check(&input) {
        assert!(ok && verdict == expected, "{name}: {verdict}");
    }

    // The checkers can say no: one hash of one proof altered, and a root of another tree.
    let mut proof = inclusion_proof(&leaves[..13], 5).unwrap();
    proof[1][0] ^= 1;
    let mut leaves_only = String::new();
    for d in &data[..13] {
        leaves_only += &format!("leaf {}\n", hex(d));
    }
    let forged = format!("{leaves_only}inclusion 13 5 {}\n", hex_list(&proof));
    checkers.refuse(&forged, "FAIL: inclusion of leaf 5 in 13");
    let other = format!("{leaves_only}root 13 {}\n", hex(&root(&leaves[..12])));
    checkers.refuse(&other, "FAIL: the root of 13");
    // A checkpoint signed over another tree's root, and one whose size was edited after
    // signing.
    let wrong_root = format!(
        "{leaves_only}vkey {vkey}\ncheckpoint {}\n",
        signed(13, root(&leaves[..12]))
    );
    checkers.refuse(
        &wrong_root,
        "FAIL: the checkpoint of 13 leaves signs another root",
    );
    let note = signer
        .sign(
            &Checkpoint {
                origin: origin.into(),
                size: 13,
                root: root(&leaves[..13]),
            }
            .text(),
        )
        .unwrap()
        .replacen("\n13\n", "\n12\n", 1);
    let edited = format!(
        "{leaves_only}vkey {vkey}\ncheckpoint {}\n",
        BASE64.encode(note)
    );
    checkers.refuse(&edited, "FAIL: checkpoint");
}

/// `pgtrail keygen`: a key only its owner can read, a verifier key for auditors that opens
/// what it signs, and never an existing key overwritten.
#[test]
fn keygen_writes_a_private_key_and_prints_its_verifier_key() {
    use std::os::unix::fs::PermissionsExt;

    use pgtrail_store::evidence::note::VerifierKey;

    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("shop.key");
    let keygen = |name: &str| {
        crate::pgtrail()
            .args(["keygen", "--name", name, "--out"])
            .arg(&key_path)
            .output()
            .unwrap()
    };
    let made = keygen("pgtrail.example/shop");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let key_text = std::fs::read_to_string(&key_path).unwrap();
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let printed = String::from_utf8(made.stdout).unwrap();
    let (secret, stderr) = (
        // PRIVATE+KEY+NAME+ID+KEY: the key is the fifth field (base64 may itself hold '+').
        key_text.trim().splitn(5, '+').nth(4).unwrap(),
        String::from_utf8_lossy(&made.stderr),
    );
    assert!(
        !printed.contains(secret) && !stderr.contains(secret),
        "the signing key reached the output"
    );
    let verifier = VerifierKey::parse(printed.trim()).unwrap();
    assert_eq!(verifier.name(), "pgtrail.example/shop");
    let signer = SigningKey::parse(&key_text).unwrap();
    let text = Checkpoint {
        origin: "pgtrail.example/shop".into(),
        size: 3,
        root: [1; 32],
    }
    .text();
    assert_eq!(verifier.open(&signer.sign(&text).unwrap()).unwrap(), text);

    // Again to the same file: refused, the first key kept.
    let again = keygen("pgtrail.example/shop");
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("never overwrites"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key_text);
    // A name a note cannot carry.
    std::fs::remove_file(&key_path).unwrap();
    let bad = keygen("shop key");
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a key name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(!key_path.exists());
}
