//! Bad input about places and files rather than flags: archive directories that are not
//! archives or not private, a read-only file system, a log a newer pgtrail wrote, an export
//! destination holding another archive's export, a revert across a gap, and the key,
//! certificate and token files of `pgtrail serve` and of a TLS connection. Each must be
//! refused with an error that says what is wrong, before anything is written.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{DB, Harness, Verdict, pki};

/// A source nobody listens on: a capture that wrongly got past its refusal stops at once.
const NOBODY: &str = "postgresql://postgres@127.0.0.1:9/torture";

pub fn bad_inputs(h: &Harness, v: &mut Verdict) {
    let dir = h.work.join("bad-places");
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        v.bad_inputs += 1;
        v.bad_inputs_failed += 1;
        v.problems
            .push(format!("bad places: cannot make {}: {e}", dir.display()));
        return;
    }
    let pki = pki::make("pgtrail torture bad-input CA");
    let at = |name: &str| dir.join(name);
    let text = |p: &Path| p.display().to_string();
    let archive = text(&h.archive);
    let mut case = |name: &str,
                    prepare: &dyn Fn() -> Result<(), String>,
                    args: Vec<String>,
                    must_say: &str| {
        let prepared = prepare().map(|()| String::new());
        v.bad_input(&h.bin, name, prepared, &args, must_say);
    };
    let arg = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let private_dir = |p: &Path, mode: u32| -> Result<(), String> {
        std::fs::create_dir_all(p).map_err(|e| e.to_string())?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())
    };
    let write_file = |p: &Path, bytes: &[u8], mode: u32| -> Result<(), String> {
        std::fs::write(p, bytes).map_err(|e| e.to_string())?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())
    };

    // Archive directories.
    let foreign = at("someone-elses-files");
    case(
        "a directory of other files as the archive",
        &|| {
            private_dir(&foreign, 0o700)?;
            std::fs::write(foreign.join("report.csv"), "id,total\n1,2\n").map_err(|e| e.to_string())
        },
        arg(&["capture", "--archive", &text(&foreign), "--source", NOBODY]),
        "give --archive a new or empty directory",
    );
    let open_dir = at("open-archive");
    case(
        "an archive directory other users can read",
        &|| private_dir(&open_dir, 0o755),
        arg(&["capture", "--archive", &text(&open_dir), "--source", NOBODY]),
        "run `chmod 700",
    );
    // sysfs takes no new directories, whoever asks (root included), on any Linux.
    let read_only = PathBuf::from("/sys/pgtrail-torture-archive");
    let unwritable = || -> Result<(), String> {
        match std::fs::create_dir(&read_only) {
            Ok(()) => {
                let _ = std::fs::remove_dir(&read_only);
                Err("/sys took a new directory here".into())
            }
            Err(_) => Ok(()),
        }
    };
    case(
        "an archive on a read-only file system",
        &unwritable,
        arg(&[
            "capture",
            "--archive",
            &text(&read_only),
            "--source",
            NOBODY,
        ]),
        "cannot create or open the archive directory /sys/pgtrail-torture-archive",
    );
    case(
        "an export destination on a read-only file system",
        &unwritable,
        arg(&[
            "export",
            "--archive",
            &archive,
            "--to",
            "/sys/pgtrail-torture-lake",
            "--layout",
            "cdf",
        ]),
        "give a directory you can write",
    );

    // A log a newer pgtrail wrote: readers and the writer refuse it, naming both versions.
    let newer = at("newer-format");
    let newer_log = || -> Result<(), String> {
        private_dir(&newer, 0o700)?;
        let log = newer.join(pgtrail_store::LOG_FILE);
        std::fs::copy(h.archive.join(pgtrail_store::LOG_FILE), &log).map_err(|e| e.to_string())?;
        set_format_version(&log, u64::from(pgtrail_store::FORMAT_VERSION) + 1)
    };
    case(
        "a log of a newer format version, to read",
        &newer_log,
        arg(&["sql", "--archive", &text(&newer), "SELECT 1"]),
        "written by a newer pgtrail",
    );
    case(
        "a log of a newer format version, to capture into",
        &newer_log,
        arg(&["capture", "--archive", &text(&newer), "--source", NOBODY]),
        "upgrade pgtrail",
    );

    // An export destination that holds another archive's export of the same layout. The gap
    // cases' archive (another cluster) exports first, then the main archive is refused there.
    let other_lake = text(&at("other-archives-lake"));
    let gap_archive = h.work.join("gap-recreated");
    case(
        "an export destination holding another archive's export",
        &|| {
            let made = Command::new(&h.bin)
                .args([
                    "export",
                    "--archive",
                    &text(&gap_archive),
                    "--to",
                    &other_lake,
                ])
                .args(["--layout", "cdf"])
                .output()
                .map_err(|e| e.to_string())?;
            made.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&made.stderr).into_owned())
        },
        arg(&[
            "export",
            "--archive",
            &archive,
            "--to",
            &other_lake,
            "--layout",
            "cdf",
        ]),
        "export of another archive",
    );
    // A revert over the gap the gap case recorded: what happened in it is unknown. Refused
    // from the archive alone, before the source is reached.
    case(
        "a revert selection that crosses a gap",
        &|| Ok(()),
        arg(&[
            "revert",
            "--archive",
            &text(&gap_archive),
            "--source",
            &h.cluster.url(DB),
            "--tables",
            "public.g",
            "--from",
            "0/1",
            "--to",
            "FFFFFFFF/0",
        ]),
        "crosses a gap of the archive",
    );

    // The files of `pgtrail serve`: refused at start, before it listens.
    let serve = |extra: &[&str]| {
        let mut a = arg(&["serve", "--archive", &archive, "--listen", "127.0.0.1:0"]);
        a.extend(arg(extra));
        a
    };
    let open_token = at("open-token");
    case(
        "a token file other users can read",
        &|| write_file(&open_token, b"0123456789abcdef0123456789abcdef\n", 0o644),
        serve(&["--token-file", &text(&open_token)]),
        "chmod 600 it",
    );
    let short_token = at("short-token");
    case(
        "a token shorter than 16 characters",
        &|| write_file(&short_token, b"secret\n", 0o600),
        serve(&["--token-file", &text(&short_token)]),
        "shorter than 16 characters",
    );
    let (cert, key, open_key, other_key, not_cert) = (
        at("server.crt"),
        at("server.key"),
        at("open.key"),
        at("other.key"),
        at("not-a-cert.pem"),
    );
    let tls_files = || -> Result<(), String> {
        let pki = pki
            .as_ref()
            .map_err(|e| format!("cannot make certificates: {e}"))?;
        write_file(&cert, pki.server_cert.as_bytes(), 0o644)?;
        write_file(&key, pki.server_key.as_bytes(), 0o600)?;
        write_file(&open_key, pki.server_key.as_bytes(), 0o644)?;
        write_file(&other_key, pki.rotated.1.as_bytes(), 0o600)?;
        write_file(&not_cert, b"not a certificate\n", 0o644)
    };
    case(
        "a TLS key other users can read",
        &tls_files,
        serve(&["--tls-cert", &text(&cert), "--tls-key", &text(&open_key)]),
        "can be read by other users",
    );
    case(
        "a TLS key of another certificate",
        &tls_files,
        serve(&["--tls-cert", &text(&cert), "--tls-key", &text(&other_key)]),
        "do not make a usable pair",
    );
    case(
        "a TLS certificate file that holds no certificate",
        &tls_files,
        serve(&["--tls-cert", &text(&not_cert), "--tls-key", &text(&key)]),
        "holds no PEM certificate",
    );

    // A TLS client certificate for the source, as libpq takes them: refused before connecting.
    let capture_tls = |cert: &Path, key: &Path| {
        let conninfo = format!(
            "host=127.0.0.1 port=9 dbname=torture sslmode=require sslcert={} sslkey={}",
            cert.display(),
            key.display()
        );
        arg(&[
            "capture",
            "--archive",
            &text(&at("tls-archive")),
            "--source",
            &conninfo,
        ])
    };
    case(
        "a client key other users can read",
        &tls_files,
        capture_tls(&cert, &open_key),
        "has group or world access",
    );
    case(
        "a client key that does not exist",
        &tls_files,
        capture_tls(&cert, &at("no-such.key")),
        "not private key file",
    );
    case(
        "a client certificate file that holds no certificate",
        &tls_files,
        capture_tls(&not_cert, &key),
        "holds no PEM certificate",
    );
    // Refused before anything was written: the directory holds what it held.
    let left = std::fs::read_dir(&foreign).map_or(0, |d| d.count());
    if left != 1 {
        v.bad_inputs_failed += 1;
        v.problems.push(format!(
            "bad input a directory of other files as the archive: {left} entries afterwards, not 1"
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `version` as the log's format version, as a newer pgtrail would have.
fn set_format_version(log: &Path, version: u64) -> Result<(), String> {
    const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", log.display());
    let db = redb::Database::open(log).map_err(|x| e(&x))?;
    let tx = db.begin_write().map_err(|x| e(&x))?;
    tx.open_table(META)
        .map_err(|x| e(&x))?
        .insert("format_version", version.to_le_bytes().as_slice())
        .map_err(|x| e(&x))?;
    tx.commit().map_err(|x| e(&x))
}
