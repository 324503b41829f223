//! `pgtrail-torture`: the reliability suite. It starts a throwaway PostgreSQL, drives the real
//! `pgtrail` binary (which must sit beside this one, built with `--features crashpoints`)
//! under a ledger and point-in-time-oracle workload, injects faults (kill -9, crash points in
//! the log's commit window and in every compaction step, walsender terminations, PostgreSQL
//! restarts fast and immediate, a stall past `wal_sender_timeout`), then feeds it bad input
//! (damaged segments, a wrong URL, writing SQL, bad requests to `pgtrail serve`), and checks
//! the archive against PostgreSQL.
//!
//! Oracles: the ledger (one writer, strictly increasing `seq`: every committed value exactly
//! once), the point in time (the workload hashes `acct` under `LOCK ... IN SHARE MODE` and emits
//! the hash with `pg_logical_emit_message(true, 'oracle', …)` in the same transaction;
//! `as_of_lsn` at that commit must hash the same), exactly once (`(commit_lsn, seq)` unique
//! across log and segments), and the final state equal to PostgreSQL's.
//!
//! The last line is the verdict: `F faults injected, S survived, B bad inputs, L rows lost,
//! D duplicates, G unexpected gaps`; the exit status is non-zero on any loss, duplicate,
//! unexpected gap, oracle mismatch, unsurvived fault, panic or mishandled bad input.

mod exports;
mod faults;
mod gaps;
mod inputs;
#[path = "../../pki.rs"]
mod pki;
mod proxy;
mod refusals;
mod serve;
mod shapes;
mod stream;
mod txn_oracle;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_query::{ArchiveSnapshot, Moment, state_at};
use pgtrail_store::segment::{SegmentContent, read_records};
use pgtrail_store::{Cell, ChangeKey, LogReader, Lsn, Op};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(
    name = "pgtrail-torture",
    about = "Inject faults and bad input into a real capture and prove nothing is lost or duplicated"
)]
struct Args {
    /// ci: one fixed pass over every fault; soak: random faults for --minutes.
    #[arg(long, default_value = "ci", value_parser = ["ci", "soak"])]
    tier: String,
    /// Soak duration.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Seed of the fault timings and the workload (printed; pass it again to replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the work directory (archive, capture logs) at the end (always kept on a failure).
    #[arg(long)]
    keep: bool,
    /// Run only the gap cases (to replay them quickly).
    #[arg(long)]
    gaps_only: bool,
    /// Run only the bad inputs that need a server of their own (password files, a table whose
    /// key was dropped, S3 credentials), to replay them quickly.
    #[arg(long, conflicts_with = "gaps_only")]
    refusals_only: bool,
    /// The capture connects over TLS (sslmode=verify-full, a CA made for the run) through the
    /// fault proxy; the schedule is then the network faults (and a kill -9), without the
    /// disk, crash-point and gap cases the plain run covers.
    #[arg(long)]
    tls: bool,
}

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Clone, Debug)]
enum Fault {
    Kill9,
    CrashAt(&'static str),
    TerminateWalsender,
    Restart(&'static str),
    Stall,
    DiskFull,
    /// A full disk under a capture that compacts every second.
    DiskFullCompacting,
    /// The capture's connections reset through the proxy.
    NetReset,
    /// The server's next chunk cut in the middle, then closed.
    NetCloseMidFrame,
    /// The capture's connections silently dead: it must notice within its stream timeout.
    BlackHole,
    /// Only the replication connection silently dead; the SQL connection still answers.
    BlackHoleStream,
    /// An export beside the capture killed at a crash point, then run again (`exports`).
    ExportCrash(&'static str),
    /// `pgtrail revert --apply` killed before its commit, then run again (`faults`).
    RevertCrash,
    /// PostgreSQL restarted while the capture copies a table created under it (`faults`).
    RestartDuringTableSync,
    /// A live-stream client gone at some point of its stream, back with its last id (`stream`).
    StreamDisconnect,
    /// With `--tls`: the server's certificate replaced by another of the same CA, the
    /// configuration reloaded, the walsender ended: the capture reconnects verifying the new one.
    TlsRotate,
    /// With `--tls`: a certificate for another name installed and the walsender ended: the
    /// capture must not stream until the right one is back (it may stop, naming the
    /// certificate, or retry), and then resume with nothing lost.
    TlsHandshakeFail,
}

/// With `--tls`: the server's certificate and key pairs (PEM).
struct TlsPairs {
    current: (String, String),
    spare: (String, String),
    wrong_name: (String, String),
}

/// A fault's kind as the verdict's tally names it.
fn fault_kind(fault: &Fault) -> &'static str {
    match fault {
        Fault::Kill9 => "kill -9",
        Fault::CrashAt(p) if p.starts_with("log:") => "log-commit crash points",
        Fault::CrashAt(p) if p.starts_with("checkpoint:") => "checkpoint-signing crash points",
        Fault::CrashAt(_) => "compaction crash points",
        Fault::TerminateWalsender => "walsender terminations",
        Fault::Restart(_) => "PostgreSQL restarts",
        Fault::Stall => "stalls",
        Fault::DiskFull | Fault::DiskFullCompacting => "full disks",
        Fault::NetReset => "resets",
        Fault::NetCloseMidFrame => "mid-frame closes",
        Fault::BlackHole | Fault::BlackHoleStream => "black holes",
        Fault::ExportCrash(_) => "export crashes",
        Fault::RevertCrash => "reverts killed",
        Fault::RestartDuringTableSync => "restarts during a table copy",
        Fault::StreamDisconnect => "stream clients cut",
        Fault::TlsRotate => "certificate rotations",
        Fault::TlsHandshakeFail => "refused certificates",
    }
}

/// Crash points the capture can hit: the log's commit window, and each step of the
/// background compaction.
const CRASH_POINTS: &[&str] = &[
    "log:before_commit",
    "log:after_commit",
    "segment:before_footer",
    "segment:before_fsync",
    "segment:before_rename",
    "segment:before_dir_fsync",
    "segment:before_key_index",
    "compact:before_manifest",
    "compact:after_commit",
    "merge:before_manifest",
    "merge:after_commit",
    "checkpoint:before_sign",
    "checkpoint:before_publish",
    "checkpoint:between_published",
];

/// Crash points of an export run beside the capture: a plain file written, a Delta table's
/// commit about to be made and just made, Bemi's table about to commit.
const EXPORT_CRASH_POINTS: &[&str] = &[
    "export:after_file",
    "delta:before_commit",
    "delta:after_commit",
    "bemi:before_commit",
];

const DB: &str = "torture";
/// How long a capture started with a crash point may take to reach it.
const CRASH_POINT_WAIT: Duration = Duration::from_secs(180);
const MAX_ORACLE_CHECKS: usize = 12;
/// Shapes oracles checked with `as_of_lsn` (each checks every shape table).
const MAX_SHAPE_CHECKS: usize = 30;
const SLOT: &str = "torture";
const WAL_SENDER_TIMEOUT_S: u64 = 5;
/// `wal_sender_timeout` while only the replication connection is black-holed: longer than the
/// capture needs to notice (about twice its stream timeout).
const BLACK_HOLE_WAL_SENDER_TIMEOUT_S: u64 = 20;
/// The capture's `--stream-timeout-secs`: how soon it must notice a black hole.
const STREAM_TIMEOUT_S: u64 = 4;

struct Harness {
    cluster: Cluster,
    /// The capture reaches PostgreSQL through this proxy, which cuts its connections.
    proxy: proxy::Proxy,
    bin: PathBuf,
    work: PathBuf,
    archive: PathBuf,
    capture: Option<Child>,
    runs: u32,
    /// Stream-only black holes injected again because the capture left the session for
    /// another reason before it could notice (see `inject`).
    overtaken: u32,
    /// The archive of the disk-full fault, moved off the full disk, to resume at the end.
    full_disk_archives: Vec<(PathBuf, bool)>,
    /// The disk-full fault runs once (it leaves a slot behind).
    disk_full_tried: [bool; 2],
    /// Set while the disk fills: the workload runs unthrottled.
    unthrottled: Arc<AtomicBool>,
    /// Export faults injected so far (each exports into a place of its own).
    export_faults: usize,
    /// Revert, table-sync and stream faults injected so far (each varies its rows or cut).
    fault_runs: usize,
    /// With `--tls`: the CA file the capture verifies the server with.
    tls_root: Option<PathBuf>,
    tls_pairs: Option<TlsPairs>,
    /// The key the capture signs a checkpoint with at every compaction, and its verifier key
    /// (`pgtrail verify` checks the archive with it at the end).
    signing_key: PathBuf,
    verifier_key: String,
}

impl Harness {
    fn start_capture(&mut self, crash_at: Option<&str>) -> Result<(), String> {
        self.runs += 1;
        let url = match &self.tls_root {
            // `localhost` is the name in the server's certificate; the proxy listens there.
            Some(ca) => format!(
                "postgresql://postgres@localhost:{}/{DB}?sslmode=verify-full&sslrootcert={}",
                self.proxy.port,
                ca.display()
            ),
            None => format!("postgresql://postgres@127.0.0.1:{}/{DB}", self.proxy.port),
        };
        let log = self.work.join(format!("capture-{:03}.log", self.runs));
        let mut cmd = capture_command(&self.bin, &url, &self.archive, SLOT, SLOT, &log)?;
        cmd.args([
            "--progress-secs",
            "1",
            "--compact-after-changes",
            "400",
            "--compact-after-secs",
            "2",
            // Keyframes at most compactions, so that the faults strike their writing too, the
            // oracles' as_of starts from them, and the final verify checks every one.
            "--keyframe-changes",
            "300",
            "--keyframe-rows-factor",
            "1",
        ])
        .args(["--stream-timeout-secs", &STREAM_TIMEOUT_S.to_string()])
        .arg("--signing-key")
        .arg(&self.signing_key)
        .arg("--publish-checkpoints")
        .arg(self.work.join("published"))
        .env("PGTRAIL_LOG", "info");
        if let Some(p) = crash_at {
            cmd.env("PGTRAIL_CRASH_AT", p);
        }
        self.capture = Some(
            cmd.spawn()
                .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?,
        );
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.capture.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status();
    }

    fn terminate_walsender(&self) -> Result<(), String> {
        let sql = format!(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = '{SLOT}' AND active_pid IS NOT NULL"
        );
        self.cluster
            .psql("postgres", &sql)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Make the server present `pair` (certificate, key) to new connections.
    fn install_server_cert(&self, (cert, key): &(String, String)) -> Result<(), String> {
        self.cluster
            .put_file("server.crt", cert.as_bytes())
            .and_then(|()| self.cluster.put_file("server.key", key.as_bytes()))
            .and_then(|()| self.cluster.psql("postgres", "SELECT pg_reload_conf()"))
            .map(drop)
            .map_err(|e| format!("cannot install the server certificate: {e}"))
    }

    /// A certificate for another name while the capture reconnects: it must not stream with
    /// it (verify-full), whether it stops naming the certificate or retries; with the right
    /// certificate back it streams again (restarted if it stopped).
    fn handshake_failure(&mut self, before: &str) -> Result<(), String> {
        let pairs = self.tls_pairs.as_ref().ok_or("SKIP: not a --tls run")?;
        let (wrong, current) = (pairs.wrong_name.clone(), pairs.current.clone());
        self.install_server_cert(&wrong)?;
        self.terminate_walsender()?;
        let until = Instant::now() + Duration::from_secs(8);
        let mut stopped = None;
        while Instant::now() < until {
            let pid = self.walsender();
            if !pid.is_empty() && pid != before {
                let _ = self.install_server_cert(&current);
                return Err(format!(
                    "the capture streamed (walsender {pid}) while the server showed a certificate for another name"
                ));
            }
            if stopped.is_none()
                && let Some(child) = self.capture.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                stopped = Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.install_server_cert(&current)?;
        let log = self.work.join(format!("capture-{:03}.log", self.runs));
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if !said.contains("certificate") {
            return Err(format!(
                "the capture never named the refused certificate (see {})",
                log.display()
            ));
        }
        if let Some(status) = stopped {
            if status.success() {
                return Err("the capture exited 0 on a certificate it refused".into());
            }
            eprintln!(
                "torture: the capture stopped ({status}) on a certificate for another name; restarted"
            );
            self.kill9();
            self.start_capture(None)?;
        } else {
            eprintln!("torture: the capture refused a certificate for another name and retried");
        }
        Ok(())
    }

    /// The walsender streaming to the capture now, if any.
    fn walsender(&self) -> String {
        self.cluster
            .psql(DB, &format!("SELECT coalesce(active_pid::text, '') FROM pg_replication_slots WHERE slot_name = '{SLOT}' AND active"))
            .unwrap_or_default()
    }

    /// Wait until the capture streams (its slot active, by a walsender other than `not` when
    /// the fault broke the old session). Fails if it exited.
    fn wait_streaming(&mut self, limit: Duration, not: Option<&str>) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.capture.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "capture exited ({status}) instead of streaming; see {}",
                    self.work.display()
                ));
            }
            let pid = self.walsender();
            if !pid.is_empty() && Some(pid.as_str()) != not {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("capture did not stream again within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_child(self.capture.as_mut()?, limit)
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.capture.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A second capture (its own slot) with its archive on a small tmpfs runs under the
    /// workload until the disk fills: without compaction the full disk hits a redb commit;
    /// compacting every second, it most often hits a segment write or a merge. It must stop
    /// with an error that says so, with no panic; its archive is then copied to a disk with
    /// space and resumed at the end. Skipped (and not counted) where a tmpfs cannot be mounted.
    fn disk_full(&mut self, compacting: bool) -> Result<(), String> {
        self.disk_full_tried[usize::from(compacting)] = true;
        self.unthrottled.store(true, Ordering::Relaxed);
        let result = self.fill_disk(compacting);
        self.unthrottled.store(false, Ordering::Relaxed);
        if result.is_err() {
            // Leave no slot behind to hold WAL.
            let slot = full_disk_slot(compacting);
            let _ = self.cluster.psql(DB, &format!("SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"));
        }
        result
    }

    fn fill_disk(&mut self, compacting: bool) -> Result<(), String> {
        let slot = full_disk_slot(compacting);
        let mnt = self.work.join(format!("{slot}-disk"));
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        // Compacting, the archive first needs room for its initial snapshot; the disk is then
        // filled by a ballast file once compaction is under way.
        let size = if compacting { "size=256m" } else { "size=24m" };
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", size, "tmpfs"])
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            return Err("SKIP: cannot mount a tmpfs here (needs root)".into());
        }
        let log_path = self.work.join(format!("capture-{slot}.log"));
        let archive = mnt.join("archive");
        let mut cmd = capture_command(
            &self.bin,
            &self.cluster.url(DB),
            &archive,
            slot,
            SLOT,
            &log_path,
        )?;
        cmd.args(["--progress-secs", "1"]);
        if compacting {
            cmd.args([
                "--compact-after-changes",
                "2000",
                "--compact-after-secs",
                "1",
            ]);
        } else {
            cmd.arg("--no-compact");
        }
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        if compacting {
            let segments = archive.join(pgtrail_store::SEGMENTS_DIR);
            let deadline = Instant::now() + Duration::from_secs(120);
            while std::fs::read_dir(&segments).map_or(true, |d| d.count() == 0)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            leave_free(&mnt.join("ballast"), 2 << 20)
                .map_err(|e| format!("cannot fill the disk: {e}"))?;
        }
        let status = wait_child(&mut child, Duration::from_secs(600));
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(mnt.join("ballast"));
        let copy = self.work.join(format!("{slot}-archive"));
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&archive)
            .arg(&copy)
            .status()
            .is_ok_and(|s| s.success());
        let _ = Command::new("umount").arg(&mnt).status();
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: String = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        match status {
            None => return Err("the capture did not stop within 600 s on a full disk".into()),
            Some(s) if s.success() => return Err("the capture exited 0 on a full disk".into()),
            Some(_) if text.contains("panicked") => {
                return Err(format!("the capture panicked on a full disk: {tail}"));
            }
            Some(_) if !text.contains("No space left on device") => {
                return Err(format!("the error does not say the disk is full: {tail}"));
            }
            Some(_) => {}
        }
        if !copied {
            return Err("could not copy the archive off the full disk".into());
        }
        let during = if text.contains("compaction failed") {
            "during compaction"
        } else {
            "during a log commit"
        };
        eprintln!("torture: the disk filled {during} and capture stopped: {tail}");
        self.full_disk_archives.push((copy, compacting));
        Ok(())
    }

    /// Resume the disk-full captures on their copied archives up to `end`.
    fn resume_full_disks(&self, end: &str) -> Result<(), String> {
        for (archive, compacting) in &self.full_disk_archives {
            let slot = full_disk_slot(*compacting);
            let log = self.work.join(format!("capture-{slot}-resumed.log"));
            let mut cmd =
                capture_command(&self.bin, &self.cluster.url(DB), archive, slot, SLOT, &log)?;
            cmd.args(["--stop-at", end]);
            if !compacting {
                cmd.arg("--no-compact");
            }
            let status = cmd.status().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!(
                    "the capture did not resume after the full disk was freed ({status}); see capture-{slot}-resumed.log"
                ));
            }
        }
        Ok(())
    }

    /// Inject `fault`; Ok when the capture streams again afterwards.
    fn inject(&mut self, fault: &Fault) -> Result<(), String> {
        let before = self.walsender();
        let injected = Instant::now();
        match fault {
            Fault::Kill9 => {
                self.kill9();
                self.start_capture(None)?;
            }
            Fault::CrashAt(point) => {
                self.kill9();
                self.start_capture(Some(point))?;
                // Commits happen continuously and compaction runs every ~2 s, but a compaction
                // point is reached only once the restarted capture has caught up and finished
                // a compaction of its backlog, which grows with the workload's pace: one CI
                // run (debug build) waited more than 60 s for `compact:after_commit` after a
                // fast workload. The limit is for a point that is never reached, not a pace.
                match self.wait_exit(CRASH_POINT_WAIT) {
                    Some(status) if !status.success() => {}
                    Some(status) => {
                        return Err(format!(
                            "capture exited {status} instead of aborting at {point}"
                        ));
                    }
                    None => {
                        self.kill9();
                        return Err(format!(
                            "crash point {point} was not reached in {} s (is {} built with --features crashpoints?)",
                            CRASH_POINT_WAIT.as_secs(),
                            self.bin.display()
                        ));
                    }
                }
                self.start_capture(None)?;
            }
            Fault::TerminateWalsender => self.terminate_walsender()?,
            Fault::Restart(mode) => self.cluster.restart(mode).map_err(|e| e.to_string())?,
            Fault::ExportCrash(point) => {
                self.export_faults += 1;
                let cluster = &self.cluster;
                exports::crash_and_resume(
                    &self.bin,
                    &self.archive,
                    &self.work,
                    &|db: &str| cluster.url(db),
                    point,
                    self.export_faults,
                )?;
            }
            Fault::DiskFull => self.disk_full(false)?,
            Fault::DiskFullCompacting => self.disk_full(true)?,
            Fault::RevertCrash => {
                self.fault_runs += 1;
                self.revert_crash_and_resume(self.fault_runs)?;
            }
            Fault::RestartDuringTableSync => {
                self.fault_runs += 1;
                self.restart_during_table_sync(self.fault_runs)?;
            }
            Fault::TlsRotate => {
                let pairs = self.tls_pairs.as_mut().ok_or("SKIP: not a --tls run")?;
                std::mem::swap(&mut pairs.current, &mut pairs.spare);
                let current = pairs.current.clone();
                self.install_server_cert(&current)?;
                self.terminate_walsender()?;
            }
            Fault::TlsHandshakeFail => self.handshake_failure(&before)?,
            Fault::StreamDisconnect => {
                self.fault_runs += 1;
                let mut rng = Rng((self.fault_runs as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                stream::disconnect_and_resume(&self.bin, &self.archive, &mut rng, self.fault_runs)?;
            }
            Fault::Stall => {
                self.signal("-STOP");
                std::thread::sleep(Duration::from_secs(WAL_SENDER_TIMEOUT_S + 2));
                self.signal("-CONT");
            }
            Fault::NetReset => {
                self.proxy.cut(proxy::Cut::Reset);
            }
            Fault::NetCloseMidFrame => {
                self.proxy.cut(proxy::Cut::CloseMidFrame);
            }
            Fault::BlackHole | Fault::BlackHoleStream => {
                let stream_only = matches!(fault, Fault::BlackHoleStream);
                // The session the cut strikes (a stream-only cut waits for one, below).
                let mut cut_session = before.clone();
                if stream_only {
                    // Longer than the capture needs to notice, so the server does not end the
                    // dead walsender first: the capture must tell from its own status updates
                    // not arriving. It then waits for the server to release the slot.
                    let sql = format!(
                        "ALTER SYSTEM SET wal_sender_timeout = '{BLACK_HOLE_WAL_SENDER_TIMEOUT_S}s'"
                    );
                    self.cluster
                        .psql("postgres", &sql)
                        .map_err(|e| e.to_string())?;
                    self.cluster
                        .psql("postgres", "SELECT pg_reload_conf()")
                        .map_err(|e| e.to_string())?;
                }
                if stream_only {
                    // Which proxied connection is the capture's stream, by the server's view of
                    // its port (a TLS startup message cannot be read on the way): the walsender
                    // holding the capture's slot, not a short-lived one of a table copy's
                    // temporary slot (black-holing only that one left the stream alone).
                    // A capture between two sessions (it left one for another reason, a table
                    // copy that raced the migration storm's DDL, and waits to reconnect) has
                    // no stream to cut: black-holing nothing, the check below would find the
                    // capture silent about a cut it never met (one CI run did). Wait for its
                    // next session.
                    let mut ports: Vec<u16> = Vec::new();
                    for _ in 0..60 {
                        ports = self
                            .cluster
                            .psql(
                                "postgres",
                                &format!(
                                    "SELECT a.client_port FROM pg_stat_activity a \
                                     JOIN pg_replication_slots s ON s.active_pid = a.pid \
                                     WHERE s.slot_name = '{SLOT}'"
                                ),
                            )
                            .map_err(|e| e.to_string())?
                            .lines()
                            .filter_map(|p| p.trim().parse().ok())
                            .collect();
                        if !ports.is_empty() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    if ports.is_empty() {
                        return Err("the capture held no replication session for 30 s".into());
                    }
                    self.proxy.mark_replication(&ports);
                    cut_session = self.walsender();
                }
                // What the capture logs from the cut on tells whether it noticed.
                let log_path = self.work.join(format!("capture-{:03}.log", self.runs));
                let log_before = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
                self.proxy.cut(if stream_only {
                    proxy::Cut::BlackHoleReplication
                } else {
                    proxy::Cut::BlackHole
                });
                // Silence for the stream timeout, then a status query that gets no answer
                // (or shows no status update arriving) for as long again, then a new session.
                let bound = Duration::from_secs(
                    4 * STREAM_TIMEOUT_S
                        + 20
                        + if stream_only {
                            BLACK_HOLE_WAL_SENDER_TIMEOUT_S + 10
                        } else {
                            0
                        },
                );
                let replaced = self.wait_streaming(
                    bound,
                    (!cut_session.is_empty()).then_some(cut_session.as_str()),
                );
                if stream_only {
                    // Back to the suite's own value (RESET would fall back to PostgreSQL's 60 s).
                    let back =
                        format!("ALTER SYSTEM SET wal_sender_timeout = '{WAL_SENDER_TIMEOUT_S}s'");
                    self.cluster
                        .psql("postgres", &back)
                        .map_err(|e| e.to_string())?;
                    self.cluster
                        .psql("postgres", "SELECT pg_reload_conf()")
                        .map_err(|e| e.to_string())?;
                }
                replaced.map_err(|e| {
                    format!("a black hole was not detected and replaced within {bound:?}: {e}")
                })?;
                if stream_only {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let since = log.get(log_before..).unwrap_or_default();
                    if !since.contains("received none of this capture's status updates")
                        && !since.contains("blocked sending to this capture")
                    {
                        // The capture left the black-holed session for another reason first
                        // (a table copy that raced the migration storm's DDL reconnects): the
                        // session was abandoned, nothing is lost, but the check of how a
                        // dead stream is recognised did not run. Inject it again.
                        if since.contains("capture interrupted; reconnecting") && self.overtaken < 3
                        {
                            self.overtaken += 1;
                            eprintln!(
                                "torture: {fault:?} overtaken by a reconnect for another reason; injecting it again"
                            );
                            return self.inject(fault);
                        }
                        return Err(format!(
                            "the replication-only black hole was not recognised from the server's view of the walsender; the capture logged after the cut: {}",
                            since
                                .lines()
                                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                                .collect::<Vec<_>>()
                                .join(" | ")
                        ));
                    }
                }
                eprintln!(
                    "torture: {fault:?} noticed and replaced in {:.1} s",
                    injected.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
        // The disk-full fault uses a capture of its own, and an export fault only reads the
        // archive: the main session goes on unharmed (it must still be streaming).
        let not = (!matches!(
            fault,
            Fault::DiskFull
                | Fault::DiskFullCompacting
                | Fault::ExportCrash(_)
                | Fault::RevertCrash
                | Fault::StreamDisconnect
        ) && !before.is_empty())
        .then_some(before.as_str());
        self.wait_streaming(Duration::from_secs(120), not)
    }
}

/// Write `path` until the disk is full, then shorten it to leave `free` bytes.
fn leave_free(path: &std::path::Path, free: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e),
        }
    }
    file.set_len(written.saturating_sub(free))?;
    file.sync_all()
}

/// `pgtrail capture` of `slot` through `publication` from `url` into `archive`, its stderr in
/// `log`, no crash point (callers add their own arguments).
fn capture_command(
    bin: &std::path::Path,
    url: &str,
    archive: &std::path::Path,
    slot: &str,
    publication: &str,
    log: &std::path::Path,
) -> Result<Command, String> {
    let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(bin);
    // The catalog every second: the migration storm's DDL is noticed within a round or two.
    cmd.args(["capture", "--slot", slot, "--publication", publication])
        .args(["--catalog-secs", "1"])
        .env("PGTRAIL_SOURCE", url)
        .env("PGTRAIL_ARCHIVE", archive)
        .env_remove("PGTRAIL_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Ok(cmd)
}

fn full_disk_slot(compacting: bool) -> &'static str {
    if compacting {
        "torture_full_compacting"
    } else {
        "torture_full"
    }
}

/// The child's exit status, or `None` if it still runs after `limit`.
fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The workload: one writer of ledger rows and account updates, with an oracle transaction
/// every 250 ms. Returns the number of committed ledger rows.
fn workload(
    url: String,
    stop: Arc<AtomicBool>,
    seed: u64,
    committed: Arc<AtomicU64>,
    pause: Duration,
    unthrottled: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut rng = Rng(seed | 1);
            let mut seq: i64;
            let mut n: u64 = 0;
            let mut last_oracle = Instant::now();
            'connect: while !stop.load(Ordering::Relaxed) {
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                tokio::spawn(conn);
                // After a failure the last commit may or may not have happened: ask.
                if let Ok(row) = client.query_one("SELECT coalesce(max(seq), 0) FROM ledger", &[]).await {
                    seq = row.get::<_, i64>(0) + 1;
                } else {
                    continue;
                }
                while !stop.load(Ordering::Relaxed) {
                    let id = rng.between(1, 60);
                    let body = match rng.next() % 10 {
                        0 => format!("DELETE FROM acct WHERE id = {id};"),
                        1 => format!("INSERT INTO acct VALUES ({id}, 0, 'i{seq}') ON CONFLICT (id) DO UPDATE SET note = 'r{seq}';"),
                        _ => format!("UPDATE acct SET balance = balance + {}, note = 'u{seq}' WHERE id = {id};", rng.between(1, 100)),
                    };
                    let sql = format!("BEGIN; INSERT INTO ledger VALUES ({seq}, 'w'); {body} COMMIT;");
                    if client.batch_execute(&sql).await.is_err() {
                        continue 'connect;
                    }
                    seq += 1;
                    n += 1;
                    committed.store(n, Ordering::Relaxed);
                    if !pause.is_zero() && !unthrottled.load(Ordering::Relaxed) {
                        tokio::time::sleep(pause).await;
                    }
                    if last_oracle.elapsed() >= Duration::from_millis(250) {
                        last_oracle = Instant::now();
                        if client.batch_execute(ORACLE_SQL).await.is_err() {
                            continue 'connect;
                        }
                    }
                }
            }
            n
        })
    })
}

/// The point-in-time oracle: the hash of `acct`, ordered by key, emitted in the transaction
/// that computed it under a lock that keeps writers out.
const ORACLE_SQL: &str = "BEGIN; LOCK acct IN SHARE MODE; \
    SELECT pg_logical_emit_message(true, 'oracle', (SELECT coalesce(encode(sha256(convert_to(\
    string_agg(format('(%s,%s,%s)', id, balance, note), ',' ORDER BY id), 'UTF8')), 'hex'), 'empty') FROM acct)); COMMIT;";

/// The same hash of rows rebuilt from the archive.
fn rows_hash(mut rows: Vec<(i64, String)>) -> String {
    if rows.is_empty() {
        return "empty".into();
    }
    rows.sort();
    let text: Vec<String> = rows.into_iter().map(|(_, r)| r).collect();
    let digest = Sha256::digest(text.join(",").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn cell(c: Option<&Cell>) -> String {
    c.and_then(Cell::as_text).unwrap_or("").to_string()
}

#[derive(Default)]
struct Verdict {
    faults: u32,
    survived: u32,
    bad_inputs: u32,
    bad_inputs_failed: u32,
    lost: u64,
    duplicates: u64,
    gaps: u64,
    oracles: u64,
    oracle_mismatches: u64,
    /// Oracle moments the archive refused as unknown (a table rewritten by DDL and not yet
    /// read again then): honest, but reported.
    oracles_unknown: u64,
    /// Before images compared with the archive's previous version of the row (`ImageCheck`);
    /// a mismatch counts in `oracle_mismatches`.
    images_checked: u64,
    panics: u64,
    problems: Vec<String>,
}

/// The ledger and exactly-once checks of one archive: every committed `seq` once, nothing
/// else, change keys strictly increasing across segments and log, no gap recorded.
fn check_ledger(
    archive: &std::path::Path,
    expected: &[i64],
    what: &str,
    v: &mut Verdict,
) -> Result<(), String> {
    let reader = LogReader::open(archive).map_err(|e| format!("open the {what}: {e}"))?;
    v.gaps += reader.gaps().map_err(|e| e.to_string())?.len() as u64;
    let all = reader.all_changes(archive).map_err(|e| e.to_string())?;
    let mut last: Option<ChangeKey> = None;
    let mut ledger: BTreeMap<i64, u64> = BTreeMap::new();
    let relations = reader.relations().map_err(|e| e.to_string())?;
    let ledger_oid = relations
        .iter()
        .find(|r| r.name == "ledger")
        .map(|r| r.relation_id);
    let mut images = ImageCheck::new(&reader, &relations, "acct")?;
    for (key, rec) in &all {
        if last.is_some_and(|l| *key <= l) {
            v.duplicates += 1;
            v.problems
                .push(format!("{what}: change key {key} repeated or out of order"));
        }
        last = Some(*key);
        if let Some(problem) = images.check(*key, rec) {
            v.oracle_mismatches += 1;
            if v.problems.len() < 20 {
                v.problems.push(format!("{what}: {problem}"));
            }
        }
        if Some(rec.relation_id) == ledger_oid && matches!(rec.op, Op::Insert | Op::Snapshot) {
            let seq = rec
                .key
                .as_ref()
                .and_then(|k| k.first().cloned().flatten())
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1);
            *ledger.entry(seq).or_default() += 1;
        }
    }
    for seq in expected {
        match ledger.get(seq) {
            None => {
                v.lost += 1;
                if v.problems.len() < 20 {
                    v.problems.push(format!(
                        "{what}: ledger seq {seq} committed in PostgreSQL, missing from the archive"
                    ));
                }
            }
            Some(&n) if n > 1 => {
                v.duplicates += n - 1;
                v.problems
                    .push(format!("{what}: ledger seq {seq} archived {n} times"));
            }
            _ => {}
        }
    }
    v.images_checked += images.checked;
    let phantoms = ledger
        .keys()
        .filter(|s| expected.binary_search(s).is_err())
        .count() as u64;
    if phantoms > 0 {
        v.duplicates += phantoms;
        v.problems.push(format!(
            "{what}: {phantoms} ledger rows archived that PostgreSQL does not hold"
        ));
    }
    Ok(())
}

/// The complete-image oracle of one table: every update's and delete's `before` is the row as
/// the archive's previous change of that key left it (or its snapshot's row). `acct` is at
/// REPLICA IDENTITY DEFAULT, so PostgreSQL sends no old row and pgtrail completes the image
/// from its current-row index, which must come out right from a crash at any point (since
/// format 7 it is partly held in memory and redone from the log by recovery).
struct ImageCheck {
    relation_ids: Vec<u32>,
    /// Commit LSNs of the snapshots holding the table, ascending: each starts it afresh.
    snapshots: std::collections::VecDeque<Lsn>,
    rows: BTreeMap<Option<String>, Vec<Cell>>,
    checked: u64,
}

impl ImageCheck {
    fn new(
        reader: &LogReader,
        relations: &[pgtrail_store::RelationVersion],
        table: &str,
    ) -> Result<ImageCheck, String> {
        let relation_ids: Vec<u32> = relations
            .iter()
            .filter(|r| r.name == table)
            .map(|r| r.relation_id)
            .collect();
        let snapshots = reader
            .snapshots()
            .map_err(|e| e.to_string())?
            .into_iter()
            // A snapshot of every table (no list) holds this one too: `scope_of` says so.
            .filter(|s| relation_ids.iter().any(|&id| s.scope_of(id).is_some()))
            .map(|s| s.lsn)
            .collect();
        Ok(ImageCheck {
            relation_ids,
            snapshots,
            rows: BTreeMap::new(),
            checked: 0,
        })
    }

    /// The first column's text: the key (`id`).
    fn key_of(row: Option<&Vec<Cell>>) -> Option<String> {
        row.and_then(|r| r.first())
            .and_then(|c| c.as_text())
            .map(str::to_string)
    }

    fn check(&mut self, key: ChangeKey, rec: &pgtrail_store::ChangeRecord) -> Option<String> {
        while self
            .snapshots
            .front()
            .is_some_and(|&at| at <= key.commit_lsn)
        {
            self.snapshots.pop_front();
            self.rows.clear();
        }
        if !self.relation_ids.contains(&rec.relation_id) {
            return None;
        }
        let mut expect_before = |was: Option<Vec<Cell>>| {
            self.checked += 1;
            (rec.before.as_ref() != was.as_ref()).then(|| {
                format!(
                    "change {key} ({:?}) of acct has the before image {:?}, where the previous \
                     change of its key left {was:?}",
                    rec.op, rec.before
                )
            })
        };
        match rec.op {
            Op::Insert | Op::Snapshot => {
                self.rows
                    .insert(Self::key_of(rec.after.as_ref()), rec.after.clone()?);
                None
            }
            Op::Update => {
                let was = self.rows.remove(&Self::key_of(rec.before.as_ref()));
                let problem = expect_before(was);
                self.rows
                    .insert(Self::key_of(rec.after.as_ref()), rec.after.clone()?);
                problem
            }
            Op::Delete => {
                let was = self.rows.remove(&Self::key_of(rec.before.as_ref()));
                expect_before(was)
            }
            Op::Truncate => {
                self.rows.clear();
                None
            }
            Op::Message => None,
        }
    }
}

/// `pgtrail verify` over the archive every fault was injected into, and over the disk-full
/// archives: evidence that survives every fault raises no false alarm, and the checkpoints the
/// capture signed at its compactions (again after crashes between a commit and its signing)
/// match the tree.
fn verify_evidence(h: &Harness, v: &mut Verdict) {
    let mut archives = vec![h.archive.clone()];
    archives.extend(h.full_disk_archives.iter().map(|(a, _)| a.clone()));
    // The checkpoints the capture published outside the archive (every crash point of the
    // signing included): the archive must be consistent with the latest of them.
    let published = h.work.join("published").join("checkpoint");
    for archive in archives {
        let mut verify = Command::new(&h.bin);
        verify
            .args(["verify", "--json", "--archive"])
            .arg(&archive)
            .args(["--key", &h.verifier_key]);
        if archive == h.archive {
            if !published.exists() {
                v.problems.push(format!(
                    "the capture published no checkpoint to {}",
                    published.display()
                ));
            }
            verify.arg("--trusted-checkpoint").arg(&published);
        }
        let out = verify.output();
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                v.problems.push(format!("cannot run pgtrail verify: {e}"));
                continue;
            }
        };
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if !out.status.success() || report["ok"] != serde_json::Value::Bool(true) {
            v.problems.push(format!(
                "pgtrail verify rejected {}: {} {}",
                archive.display(),
                report["problems"],
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        eprintln!(
            "torture: verify {}: ok, tree of {} leaves, {} attested by {} signed checkpoints",
            archive.display(),
            report["tree_size"],
            report["attested_size"],
            report["checkpoints"].as_array().map_or(0, Vec::len)
        );
    }
}

fn check_archive(h: &Harness, v: &mut Verdict) -> Result<(), String> {
    let expected: Vec<i64> = h
        .cluster
        .psql(
            DB,
            "SELECT coalesce(json_agg(seq ORDER BY seq), '[]') FROM ledger",
        )
        .map_err(|e| e.to_string())
        .and_then(|j| serde_json::from_str(&j).map_err(|e| e.to_string()))?;
    check_ledger(&h.archive, &expected, "archive", v)?;
    for (full, compacting) in &h.full_disk_archives {
        let what = if *compacting {
            "archive resumed after a full disk (compacting)"
        } else {
            "archive resumed after a full disk"
        };
        check_ledger(full, &expected, what, v)?;
    }

    // Point-in-time oracles and the final state, from the archive alone.
    let snapshot = ArchiveSnapshot::open(&h.archive).map_err(|e| e.to_string())?;
    let table = snapshot.table("public.acct").map_err(|e| e.to_string())?;
    // Oracle messages by prefix: the ledger workload's and the shapes workload's.
    let mut by_prefix: BTreeMap<String, Vec<(Lsn, String)>> = BTreeMap::new();
    let mut keep = |key: ChangeKey, m: &pgtrail_store::LogicalMessage| {
        if m.prefix.starts_with("oracle") {
            by_prefix.entry(m.prefix.clone()).or_default().push((
                key.commit_lsn,
                String::from_utf8_lossy(&m.content).into_owned(),
            ));
        }
    };
    for seg in &snapshot.message_segments {
        let path = snapshot.segment_path(seg);
        let reader = pgtrail_store::segment::SegmentReader::open(&path, Some(&seg.sha256), 8192)
            .map_err(|e| e.to_string())?;
        for batch in reader {
            let batch = batch.map_err(|e| e.to_string())?;
            for (key, rec) in
                read_records(&SegmentContent::Messages, &batch).map_err(|e| e.to_string())?
            {
                if let Some(m) = &rec.message {
                    keep(key, m);
                }
            }
        }
    }
    for (key, rec) in &snapshot.message_tail {
        if let Some(m) = &rec.message {
            keep(*key, m);
        }
    }
    let mut shape_oracles = by_prefix.remove("oracle_shapes").unwrap_or_default();
    shape_oracles.sort();
    shapes::check(&snapshot, &shape_oracles, MAX_SHAPE_CHECKS, v)?;
    let mut oracles = by_prefix.remove("oracle").unwrap_or_default();
    let rebuilt = |moment: Moment| -> Result<Vec<(i64, String)>, String> {
        let state = state_at(&snapshot, table, moment).map_err(|e| e.to_string())?;
        Ok(state
            .rows
            .values()
            .flatten()
            .map(|(_, r)| {
                let id: i64 = cell(r.first()).parse().unwrap_or(i64::MIN);
                (
                    id,
                    format!(
                        "({},{},{})",
                        cell(r.first()),
                        cell(r.get(1)),
                        cell(r.get(2))
                    ),
                )
            })
            .collect())
    };
    oracles.sort();
    // Every oracle, in one pass over the table's changes in commit order: before the first
    // change committed after an oracle, the rows so far must hash as PostgreSQL's did.
    let mut rows: BTreeMap<i64, String> = BTreeMap::new();
    let mut next = 0usize;
    let mut check = |upto: Option<Lsn>, rows: &BTreeMap<i64, String>, v: &mut Verdict| {
        while next < oracles.len() && upto.is_none_or(|l| oracles[next].0 < l) {
            let (lsn, hash) = &oracles[next];
            let got = rows_hash(rows.iter().map(|(k, r)| (*k, r.clone())).collect());
            v.oracles += 1;
            if &got != hash {
                v.oracle_mismatches += 1;
                v.problems.push(format!("the archive's acct at the oracle of {lsn} hashes {got}, PostgreSQL hashed {hash}"));
            }
            next += 1;
        }
    };
    let row_text = |r: &pgtrail_store::Row| {
        format!(
            "({},{},{})",
            cell(r.first()),
            cell(r.get(1)),
            cell(r.get(2))
        )
    };
    let id_of = |r: &pgtrail_store::Row| cell(r.first()).parse::<i64>().unwrap_or(i64::MIN);
    pgtrail_query::for_each_change(&snapshot, table, None, |_, key, rec| {
        check(Some(key.commit_lsn), &rows, v);
        match rec.op {
            Op::Insert | Op::Snapshot | Op::Update => {
                if let Some(before) = &rec.before {
                    rows.remove(&id_of(before));
                }
                if let Some(after) = &rec.after {
                    rows.insert(id_of(after), row_text(after));
                }
            }
            Op::Delete => {
                if let Some(before) = &rec.before {
                    rows.remove(&id_of(before));
                }
            }
            Op::Truncate => rows.clear(),
            Op::Message => {}
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    check(None, &rows, v);
    // pgtrail's own as_of_lsn at a sample of the oracles (each replays the table), always
    // including the last one, taken after the workload stopped.
    let step = oracles.len().div_ceil(MAX_ORACLE_CHECKS).max(1);
    let last = oracles.len().saturating_sub(1);
    for (lsn, hash) in oracles
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == last)
        .map(|(_, o)| o)
    {
        let got = rows_hash(rebuilt(Moment::Lsn(*lsn))?);
        if &got != hash {
            v.oracle_mismatches += 1;
            v.problems.push(format!(
                "as_of_lsn at the oracle of {lsn} hashes {got}, PostgreSQL hashed {hash}"
            ));
        }
    }
    let end = rebuilt(Moment::Lsn(Lsn(u64::MAX)))?;
    let pg: Vec<(i64, String)> = h
        .cluster
        .psql(DB, "SELECT coalesce(json_agg(json_build_array(id, format('(%s,%s,%s)', id, balance, note)) ORDER BY id), '[]') FROM acct")
        .map_err(|e| e.to_string())
        .and_then(|j| serde_json::from_str(&j).map_err(|e| e.to_string()))?;
    let mut end_sorted = end;
    end_sorted.sort();
    for row in &pg {
        if !end_sorted.contains(row) {
            v.lost += 1;
            v.problems.push(format!(
                "final acct row {} differs or is missing in the archive",
                row.1
            ));
        }
    }
    for row in &end_sorted {
        if !pg.contains(row) {
            v.duplicates += 1;
            v.problems.push(format!(
                "the archive's final acct holds {} which PostgreSQL does not",
                row.1
            ));
        }
    }
    Ok(())
}

/// How long one bad input may take to be refused: a command that does not end with it (a
/// server that starts, a capture that streams) is a failure, not a stuck suite.
const BAD_INPUT_LIMIT: Duration = Duration::from_secs(300);

/// Runs `pgtrail args` on bad input: whether it exited non-zero within [`BAD_INPUT_LIMIT`],
/// without a panic, saying `must_say` (and `file`, if given) on stderr; and its stderr.
fn refused_clearly(bin: &Path, args: &[String], must_say: &str, file: &str) -> (bool, String) {
    match output_within(Command::new(bin).args(args), BAD_INPUT_LIMIT) {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let clear = !out.status.success()
                && !err.contains("panicked")
                && err.contains(must_say)
                && (file.is_empty() || err.contains(file));
            (clear, err)
        }
        Err(e) => (false, e.to_string()),
    }
}

impl Verdict {
    /// Counts one bad input: `prepared` is the file it damaged (empty for none) or why it could
    /// not be prepared; `pgtrail args` must then refuse it clearly. Returns the stderr.
    fn bad_input(
        &mut self,
        bin: &Path,
        name: &str,
        prepared: Result<String, String>,
        args: &[String],
        must_say: &str,
    ) -> String {
        self.bad_inputs += 1;
        let problem = match prepared {
            Err(why) if why.is_empty() => ("could not prepare it".to_string(), String::new()),
            Err(why) => (format!("could not prepare it: {why}"), String::new()),
            Ok(file) => match refused_clearly(bin, args, must_say, &file) {
                (true, err) => return err,
                (false, err) => (
                    format!(
                        "not a clear error saying {must_say:?} and naming {file:?}: {}",
                        err.trim()
                    ),
                    err,
                ),
            },
        };
        self.bad_inputs_failed += 1;
        self.problems
            .push(format!("bad input {name}: {}", problem.0));
        problem.1
    }
}

/// `command`'s output, or an error if it still runs after `limit` (it is then killed).
fn output_within(command: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Both pipes are drained while the command runs, so that a full pipe cannot stall it.
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("still running after {} s; killed", limit.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Bad input: each must give a clear error and no panic, never wrong rows.
fn bad_inputs(h: &Harness, v: &mut Verdict) {
    let copy = h.work.join("damaged");
    let _ = Command::new("cp")
        .arg("-a")
        .arg(&h.archive)
        .arg(&copy)
        .status();
    // A segment the manifest lists (merged-away files linger for a grace period and are
    // rightly never read).
    let listed: Option<String> = LogReader::open(&copy)
        .ok()
        .and_then(|r| r.manifest().ok())
        .and_then(|m| {
            m.segments
                .iter()
                .find(|s| s.table_name() == "public.acct")
                .map(|s| s.file_name.clone())
        });
    let first_segment = || -> Option<PathBuf> {
        listed
            .as_ref()
            .map(|f| copy.join(pgtrail_store::SEGMENTS_DIR).join(f))
    };
    let count_sql = "SELECT count(*) FROM public.acct";
    // Each case returns the command's stderr.
    let mut case = |name: &str,
                    damage: &dyn Fn() -> Option<String>,
                    args: Vec<String>,
                    must_say: &str|
     -> String {
        let prepared = damage().ok_or_else(String::new);
        v.bad_input(&h.bin, name, prepared, &args, must_say)
    };
    let sql_args = vec![
        "sql".into(),
        "--archive".into(),
        copy.display().to_string(),
        "--format".into(),
        "csv".into(),
        count_sql.into(),
    ];
    case(
        "a flipped byte in a segment",
        &|| {
            let f = first_segment()?;
            let mut bytes = std::fs::read(&f).ok()?;
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x40;
            std::fs::write(&f, bytes).ok()?;
            Some(f.file_name()?.to_string_lossy().into_owned())
        },
        sql_args.clone(),
        "",
    );
    case(
        "a truncated segment",
        &|| {
            let f = first_segment()?;
            let bytes = std::fs::read(&f).ok()?;
            std::fs::write(&f, &bytes[..bytes.len() / 3]).ok()?;
            Some(f.file_name()?.to_string_lossy().into_owned())
        },
        sql_args.clone(),
        "",
    );
    case(
        "a deleted segment",
        &|| {
            let f = first_segment()?;
            std::fs::remove_file(&f).ok()?;
            Some(f.file_name()?.to_string_lossy().into_owned())
        },
        sql_args.clone(),
        "",
    );
    case(
        "SQL that writes a file",
        &|| Some(String::new()),
        vec![
            "sql".into(),
            "--archive".into(),
            h.archive.display().to_string(),
            "COPY (SELECT 1) TO '/tmp/pgtrail-torture-copy.csv'".into(),
        ],
        "read-only",
    );
    let unreachable = case(
        "a source URL with nothing listening",
        &|| Some(String::new()),
        vec![
            "capture".into(),
            "--source".into(),
            "postgresql://postgres:secret-password@127.0.0.1:9/x".into(),
            "--archive".into(),
            h.work.join("never").display().to_string(),
        ],
        "127.0.0.1",
    );
    // The evidence commands, given what an auditor or operator can get wrong; each is refused
    // before it writes anything (the archive is verified at the end).
    let archive = h.archive.display().to_string();
    let missing = h.work.join("no-such-file").display().to_string();
    let junk = h.work.join("junk.txt");
    let _ = std::fs::write(&junk, "not a note\n");
    let junk = junk.display().to_string();
    let arg = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    case(
        "a bundle directory that does not exist",
        &|| Some(String::new()),
        arg(&["verify", "--bundle", &missing]),
        "cannot read the bundle",
    );
    case(
        "a bundle scope that ends before it begins",
        &|| Some(String::new()),
        arg(&[
            "bundle",
            "--archive",
            &archive,
            "--from",
            "5/0",
            "--to",
            "1/0",
            "--out",
            &missing,
        ]),
        "is after --to",
    );
    case(
        "a change to redact that is not LSN:SEQ",
        &|| Some(String::new()),
        arg(&[
            "redact",
            "--archive",
            &archive,
            "--change",
            "yesterday",
            "--reason",
            "r",
        ]),
        "LSN:SEQ",
    );
    case(
        "a change to redact that the archive does not hold",
        &|| Some(String::new()),
        arg(&[
            "redact",
            "--archive",
            &archive,
            "--change",
            "0/1:0",
            "--reason",
            "r",
        ]),
        "not in the evidence tree",
    );
    case(
        "a purge position that is neither an LSN nor a time",
        &|| Some(String::new()),
        arg(&[
            "purge",
            "--archive",
            &archive,
            "--tables",
            "t",
            "--before",
            "soon",
            "--reason",
            "r",
        ]),
        "neither an LSN",
    );
    case(
        "a legal hold to release that was never placed",
        &|| Some(String::new()),
        arg(&[
            "hold",
            "--archive",
            &archive,
            "--release",
            "99",
            "--reason",
            "r",
        ]),
        "no hold number 99",
    );
    case(
        "a verifier key that is not one",
        &|| Some(String::new()),
        arg(&[
            "verify",
            "--archive",
            &archive,
            "--certificate",
            &junk,
            "--key",
            "nonsense",
        ]),
        "neither a verifier key nor a readable file",
    );
    // A well-formed note (its signature is never checked: no key is given) counts for nothing
    // without a key, which is refused before the archive is read.
    let unkeyed = h.work.join("unkeyed.checkpoint");
    let _ = std::fs::write(
        &unkeyed,
        "example.org/log\n7\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n\u{2014} example.org/log AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
    );
    let unkeyed = unkeyed.display().to_string();
    case(
        "a trusted checkpoint without a key to check it",
        &|| Some(String::new()),
        arg(&[
            "verify",
            "--archive",
            &archive,
            "--trusted-checkpoint",
            &unkeyed,
        ]),
        "--trusted-checkpoint needs --key",
    );
    case(
        "a cosigner key file that does not exist",
        &|| Some(String::new()),
        arg(&[
            "cosign",
            "--archive",
            &archive,
            "--checkpoint",
            &junk,
            "--log-key",
            "x",
            "--key",
            &missing,
        ]),
        "--key",
    );
    case(
        "an older checkpoint that cannot be read",
        &|| Some(String::new()),
        arg(&[
            "prove",
            "--archive",
            &archive,
            "--consistency-from",
            &missing,
        ]),
        "cannot read the checkpoint",
    );
    // Revert and restore, given selections and moments a user can get wrong; each is refused
    // before it writes to the source (the oracle at the end sees every row as captured).
    let source = h.cluster.url(DB);
    // The table at its first archived commit (its initial snapshot): rebuilt from the first
    // segment alone, where the end of the history would take a debug build minutes.
    let first_acct_commit = LogReader::open(&h.archive)
        .ok()
        .and_then(|r| r.manifest().ok())
        .and_then(|m| {
            m.segments
                .iter()
                .filter(|s| s.table_name() == "public.acct")
                .map(|s| s.min_key.commit_lsn)
                .min()
        })
        .map_or_else(|| "FFFFFFFF/0".to_string(), |l| l.to_string());
    let revert = |extra: &[&str]| {
        let mut a = arg(&["revert", "--archive", &archive, "--source", &source]);
        a.extend(arg(extra));
        a
    };
    case(
        "a revert without a selection",
        &|| Some(String::new()),
        revert(&["--tables", "public.acct"]),
        "give a selection",
    );
    case(
        "a revert context that is not KEY=VALUE",
        &|| Some(String::new()),
        revert(&["--context", "request_id"]),
        "KEY=VALUE",
    );
    case(
        "a revert range that ends before it begins",
        &|| Some(String::new()),
        revert(&["--from", "5/0", "--to", "1/0", "--apply"]),
        "is after --to",
    );
    case(
        "a revert moment that is neither a time nor an LSN",
        &|| Some(String::new()),
        revert(&["--from", "last tuesday"]),
        "neither an LSN",
    );
    case(
        "a revert selection that matches nothing",
        &|| Some(String::new()),
        // Up to an early LSN: the refusal is the same as over the whole history, which a
        // debug build takes minutes to read for a context that is nowhere.
        revert(&[
            "--context",
            "request_id=no-such-request",
            "--to",
            "0/2",
            "--apply",
        ]),
        "matches no change",
    );
    case(
        "a restore moment given as a time that is an LSN",
        &|| Some(String::new()),
        arg(&[
            "restore",
            "--archive",
            &archive,
            "--into",
            &source,
            "--table",
            "public.acct",
            "--as-of",
            "0/1",
        ]),
        "--as-of-lsn",
    );
    case(
        "a restore of a table the archive does not hold",
        &|| Some(String::new()),
        arg(&[
            "restore",
            "--archive",
            &archive,
            "--into",
            &source,
            "--table",
            "public.nope",
            "--as-of-lsn",
            "FFFFFFFF/0",
        ]),
        "no table",
    );
    case(
        "a restore that would create a table that exists",
        &|| Some(String::new()),
        arg(&[
            "restore",
            "--archive",
            &archive,
            "--into",
            &source,
            "--table",
            "public.acct",
            "--as-of-lsn",
            &first_acct_commit,
        ]),
        "exists in the target",
    );
    // Export destinations: a table format or layout that does not fit the destination.
    let lake = copy.with_file_name(format!(
        "{}-lake",
        copy.file_name().map_or("x".into(), |n| n.to_string_lossy())
    ));
    let plain_cdf = lake.join("cdf").display().to_string();
    let export = |extra: &[&str]| {
        let mut a = arg(&["export", "--archive", &archive]);
        a.extend(arg(extra));
        a
    };
    case(
        "a Delta export into a plain export's prefix",
        &|| {
            // A small plain export first (the table's first transaction only).
            let made = Command::new(&h.bin)
                .args(export(&[
                    "--to",
                    &plain_cdf,
                    "--layout",
                    "cdf",
                    "--tables",
                    "public.acct",
                    "--until",
                    &first_acct_commit,
                ]))
                .output()
                .ok()?;
            made.status.success().then(String::new)
        },
        export(&[
            "--to",
            &plain_cdf,
            "--layout",
            "cdf",
            "--table-format",
            "delta",
        ]),
        "continue it with --table-format plain",
    );
    case(
        "an unknown table format",
        &|| Some(String::new()),
        export(&[
            "--to",
            &plain_cdf,
            "--layout",
            "cdf",
            "--table-format",
            "iceberg",
        ]),
        "possible values: plain, delta",
    );
    case(
        "a lake layout into PostgreSQL",
        &|| Some(String::new()),
        export(&["--to", &source, "--layout", "cdf"]),
        "--layout bemi",
    );
    case(
        "Bemi's table into a directory",
        &|| Some(String::new()),
        export(&["--to", &plain_cdf, "--layout", "bemi"]),
        "give --to as a connection string",
    );
    case(
        "a Bemi table name that is not schema.table",
        &|| Some(String::new()),
        export(&["--to", &source, "--layout", "bemi", "--bemi-table", "a.b.c"]),
        "write schema.table",
    );
    case(
        "Bemi's table with --tables",
        &|| Some(String::new()),
        export(&[
            "--to",
            &source,
            "--layout",
            "bemi",
            "--tables",
            "public.acct",
        ]),
        "does not apply to --layout bemi",
    );
    let unreachable_bemi = case(
        "Bemi's table in a database that cannot be reached",
        &|| Some(String::new()),
        export(&[
            "--to",
            "postgresql://app:secret-password@127.0.0.1:9/audit",
            "--layout",
            "bemi",
        ]),
        "cannot reach the database that keeps",
    );

    // Flags, names, moments, connection strings, SQL and keys a user can get wrong: each is
    // refused with an error that says what is wrong, before anything is written.
    let nested = format!("SELECT {}1{}", "(".repeat(3000), ")".repeat(3000));
    let sql = |q: &str| arg(&["sql", "--archive", &archive, q]);
    let capture_with = |conninfo: &str| {
        arg(&[
            "capture",
            "--archive",
            &lake.join("capture").display().to_string(),
            "--source",
            conninfo,
        ])
    };
    let simple: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "an LSN that is not one in SQL",
            sql("SELECT * FROM as_of_lsn('public.acct', 'zz')"),
            "invalid LSN",
        ),
        (
            "a time that is not one in SQL",
            sql("SELECT * FROM as_of('public.acct', 'not a time')"),
            "must be a timestamp",
        ),
        (
            "an unterminated quoted table name in SQL",
            sql("SELECT * FROM as_of_lsn('public.\"acct', '0/1')"),
            "is not a table name",
        ),
        (
            "a table the archive does not hold in SQL",
            sql("SELECT * FROM as_of_lsn('public.nope', '0/1')"),
            "has no table public.nope",
        ),
        (
            "row_history without a key",
            sql("SELECT * FROM row_history('public.acct')"),
            "takes the table and its key values",
        ),
        ("DROP TABLE in SQL", sql("DROP TABLE changes"), "read-only"),
        (
            "INSERT in SQL",
            sql("INSERT INTO changes SELECT * FROM changes"),
            "read-only",
        ),
        (
            "SET in SQL",
            sql("SET datafusion.execution.batch_size = 1"),
            "read-only",
        ),
        (
            "an external table over a system file",
            sql("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'"),
            "read-only",
        ),
        (
            "COPY TO in SQL",
            sql("COPY changes TO '/tmp/pgtrail-torture.csv'"),
            "read-only",
        ),
        (
            "a file-reading table function",
            sql("SELECT * FROM read_csv('/etc/passwd')"),
            "not found",
        ),
        ("SQL that does not parse", sql("SELEC 1"), "SQL error"),
        (
            "SQL nested 3000 deep",
            sql(&nested),
            "RecursionLimitExceeded",
        ),
        (
            "an unknown output format",
            arg(&["sql", "--archive", &archive, "--format", "xml", "SELECT 1"]),
            "possible values",
        ),
        (
            "an archive directory that is not one",
            arg(&["sql", "--archive", "/nonexistent/pgtrail", "SELECT 1"]),
            "is not a pgtrail archive",
        ),
        (
            "an export moment that is neither time nor LSN",
            export(&[
                "--to",
                &plain_cdf,
                "--layout",
                "cdf",
                "--since",
                "yesterday",
            ]),
            "neither an LSN",
        ),
        (
            "an export LSN with bad digits",
            export(&["--to", &plain_cdf, "--layout", "cdf", "--until", "0/ZZ"]),
            "invalid LSN",
        ),
        (
            "an export range that ends before it begins",
            export(&[
                "--to", &plain_cdf, "--layout", "cdf", "--since", "0/5", "--until", "0/1",
            ]),
            "--since is after --until",
        ),
        (
            "a negative file size",
            export(&[
                "--to",
                &plain_cdf,
                "--layout",
                "cdf",
                "--max-rows-per-file",
                "-5",
            ]),
            "-5",
        ),
        (
            "a file size beyond any integer",
            export(&[
                "--to",
                &plain_cdf,
                "--layout",
                "cdf",
                "--max-rows-per-file",
                "99999999999999999999999",
            ]),
            "number too large",
        ),
        (
            "an unknown layout",
            export(&["--to", &plain_cdf, "--layout", "nope"]),
            "possible values",
        ),
        (
            "--since with the snapshot layout",
            export(&["--to", &plain_cdf, "--layout", "snapshot", "--since", "0/1"]),
            "does not apply to the snapshot layout",
        ),
        (
            "an unterminated quoted table to export",
            export(&[
                "--to",
                &plain_cdf,
                "--layout",
                "cdf",
                "--tables",
                "public.\"acct",
            ]),
            "is not a table name",
        ),
        (
            "a table to export the archive does not hold",
            export(&[
                "--to",
                &plain_cdf,
                "--layout",
                "cdf",
                "--tables",
                "public.nope",
            ]),
            "has no table public.nope",
        ),
        (
            "an export destination of another scheme",
            export(&["--to", "ftp://host/x", "--layout", "cdf"]),
            "not supported",
        ),
        (
            "an S3 destination without a bucket",
            export(&["--to", "s3://", "--layout", "cdf"]),
            "no bucket name",
        ),
        (
            "an export destination that is a file",
            export(&["--to", "/etc/hostname", "--layout", "cdf"]),
            "not a directory",
        ),
        (
            "an unknown status format",
            arg(&["status", "--archive", &archive, "--format", "yaml"]),
            "possible values",
        ),
        (
            "a port that is not a number",
            capture_with("host=127.0.0.1 port=notaport"),
            "invalid port number",
        ),
        (
            "an unknown sslmode",
            capture_with("postgresql://x@127.0.0.1:9/db?sslmode=bogus"),
            "invalid sslmode value",
        ),
        (
            "an unterminated quote in a conninfo",
            capture_with("host='unterminated"),
            "unterminated quoted string",
        ),
        (
            "an unknown conninfo key",
            capture_with("host=127.0.0.1 nosuchkey=1"),
            "invalid connection option",
        ),
        (
            "a root certificate file that does not exist",
            capture_with(
                "postgresql://x@127.0.0.1:9/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            ),
            "does not exist",
        ),
        (
            "a slot name PostgreSQL refuses",
            arg(&[
                "capture",
                "--archive",
                &archive,
                "--source",
                &source,
                "--slot",
                "bad slot!",
            ]),
            "is not a replication slot name",
        ),
        (
            "a negative compaction threshold",
            arg(&[
                "capture",
                "--archive",
                &archive,
                "--source",
                &source,
                "--compact-after-changes",
                "-1",
            ]),
            "-1",
        ),
        (
            "a key name with a space",
            arg(&[
                "keygen",
                "--name",
                "bad name",
                "--out",
                &lake.join("k").display().to_string(),
            ]),
            "not a key name",
        ),
        (
            "a verifier key that is neither key nor file",
            arg(&["verify", "--archive", &archive, "--key", "not a key"]),
            "neither a verifier key",
        ),
        (
            "a signing key that does not exist",
            arg(&[
                "checkpoint",
                "--archive",
                &archive,
                "--signing-key",
                "/nonexistent/key",
            ]),
            "cannot read /nonexistent/key",
        ),
        (
            "a change that is not LSN:SEQ",
            arg(&["prove", "--archive", &archive, "--change", "zz"]),
            "write LSN:SEQ",
        ),
        (
            "a coverage scope that ends before it begins",
            arg(&[
                "certify",
                "--archive",
                &archive,
                "--from",
                "0/2",
                "--to",
                "0/1",
            ]),
            "nothing would be in scope",
        ),
        (
            "a listen address that is not one",
            arg(&["serve", "--archive", &archive, "--listen", "not an address"]),
            "invalid socket address",
        ),
        (
            "a stream cursor that is not one",
            arg(&["tail", "--archive", &archive, "--since", "nope"]),
            "invalid cursor",
        ),
        (
            "an unterminated quoted table to tail",
            arg(&["tail", "--archive", &archive, "--tables", "public.\"x"]),
            "is not a table name",
        ),
        (
            "a restore moment that is neither time nor LSN",
            arg(&[
                "restore",
                "--archive",
                &archive,
                "--into",
                &source,
                "--table",
                "public.acct",
                "--as-of",
                "nope",
            ]),
            "neither an LSN",
        ),
        (
            "a revert transaction that is not a number",
            revert(&["--transaction", "notanumber"]),
            "invalid digit",
        ),
        (
            "an unknown conflict rule",
            revert(&["--transaction", "5", "--on-conflict", "maybe"]),
            "possible values: stop, skip",
        ),
        (
            "a revert context with no key",
            revert(&["--context", "=v"]),
            "write it as KEY=VALUE",
        ),
        (
            "an unterminated quoted table to revert",
            revert(&["--transaction", "5", "--tables", "public.\"x"]),
            "is not a table name",
        ),
        (
            "a restore LSN that is not one",
            arg(&[
                "restore",
                "--archive",
                &archive,
                "--into",
                &source,
                "--table",
                "public.acct",
                "--as-of-lsn",
                "zz",
            ]),
            "invalid LSN",
        ),
        (
            "an unknown restore mode",
            arg(&[
                "restore",
                "--archive",
                &archive,
                "--into",
                &source,
                "--table",
                "public.acct",
                "--as-of-lsn",
                "0/1",
                "--mode",
                "bogus",
            ]),
            "possible values: create, replace, truncate-and-load",
        ),
        (
            "a key written into a directory that does not exist",
            arg(&["keygen", "--name", "ok", "--out", "/nonexistent/dir/key"]),
            "cannot create a file in /nonexistent/dir",
        ),
        (
            "a table to tail the archive does not hold",
            arg(&["tail", "--archive", &archive, "--tables", "public.nope"]),
            "has no table public.nope",
        ),
        (
            "status of a directory that is not an archive",
            arg(&["status", "--archive", "/nonexistent/pgtrail"]),
            "is not a pgtrail archive",
        ),
        (
            "a file given as the archive",
            arg(&["sql", "--archive", "/etc/hostname", "SELECT 1"]),
            "is not a pgtrail archive",
        ),
        (
            "a stream timeout that is not a number",
            arg(&[
                "capture",
                "--archive",
                &archive,
                "--source",
                &source,
                "--stream-timeout-secs",
                "abc",
            ]),
            "invalid digit",
        ),
        (
            "a table format with Bemi's table",
            export(&[
                "--to",
                &source,
                "--layout",
                "bemi",
                "--table-format",
                "delta",
            ]),
            "--table-format does not apply",
        ),
        (
            "a Bemi export moment that is not one",
            export(&["--to", &source, "--layout", "bemi", "--since", "yesterday"]),
            "neither an LSN",
        ),
        (
            "a diff from before the archive's history",
            sql("SELECT * FROM diff('public.acct', '0/2', '0/1')"),
            "before the archive's history begins",
        ),
    ];
    for (name, args, must_say) in simple {
        case(name, &|| Some(String::new()), args, must_say);
    }
    let key_dir = lake.join("keys");
    let open_key = key_dir.join("open.key");
    case(
        "a signing key others can read",
        &|| {
            std::fs::create_dir_all(&key_dir).ok()?;
            let made = Command::new(&h.bin)
                .args(["keygen", "--name", "torture-open", "--out"])
                .arg(&open_key)
                .output()
                .ok()?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).ok()?;
            made.status.success().then(String::new)
        },
        arg(&[
            "checkpoint",
            "--archive",
            &archive,
            "--signing-key",
            &open_key.display().to_string(),
        ]),
        "run chmod 600",
    );
    let garbage = key_dir.join("garbage-checkpoint");
    case(
        "a trusted checkpoint that is not a signed note",
        &|| {
            std::fs::create_dir_all(&key_dir).ok()?;
            std::fs::write(&garbage, "garbage\n").ok()?;
            Some(String::new())
        },
        arg(&[
            "verify",
            "--archive",
            &archive,
            "--trusted-checkpoint",
            &garbage.display().to_string(),
        ]),
        // Refused before the archive is read: it could count for nothing.
        "not a signed checkpoint",
    );
    let cosigner_key = key_dir.join("cosigner.key");
    case(
        "a checkpoint to cosign that is not a signed note",
        &|| {
            std::fs::create_dir_all(&key_dir).ok()?;
            let made = Command::new(&h.bin)
                .args(["keygen", "--cosigner", "--name", "torture-auditor", "--out"])
                .arg(&cosigner_key)
                .output()
                .ok()?;
            (made.status.success() && garbage.exists()).then(String::new)
        },
        arg(&[
            "cosign",
            "--archive",
            &archive,
            "--checkpoint",
            &garbage.display().to_string(),
            "--log-key",
            "x",
            "--key",
            &cosigner_key.display().to_string(),
        ]),
        // Refused before the archive is verified against it.
        "not a signed checkpoint",
    );
    let not_a_key = key_dir.join("not-a-verifier-key");
    case(
        "a verifier key file that holds no key",
        &|| {
            std::fs::create_dir_all(&key_dir).ok()?;
            std::fs::write(&not_a_key, "garbage\n").ok()?;
            Some(String::new())
        },
        arg(&[
            "verify",
            "--archive",
            &archive,
            "--key",
            &not_a_key.display().to_string(),
        ]),
        "not a verifier key",
    );
    let _ = std::fs::remove_dir_all(&lake);
    if unreachable_bemi.contains("secret-password") {
        v.bad_inputs_failed += 1;
        v.problems
            .push("the target's password appears in export's error output".into());
    }
    if unreachable.contains("secret-password") {
        v.bad_inputs_failed += 1;
        v.problems
            .push("the connection password appears in capture's error output".into());
    }
    let _ = std::fs::remove_dir_all(&copy);
}

fn run(args: &Args, seed: u64) -> Result<Verdict, String> {
    let bin = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("pgtrail");
    if !bin.exists() {
        return Err(format!(
            "{} not found: build it first with `cargo build -p pgtrail -p pgtrail-harness --features pgtrail/crashpoints`",
            bin.display()
        ));
    }
    let work = tempfile::Builder::new()
        .prefix("pgtrail-torture-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    if args.gaps_only || args.refusals_only {
        let mut v = Verdict::default();
        if args.gaps_only {
            gaps::run(&bin, work.path(), &mut v)?;
        } else {
            refusals::bad_inputs(&bin, work.path(), &mut v);
        }
        if args.keep || !v.problems.is_empty() {
            eprintln!("torture: work directory kept at {}", work.keep().display());
        }
        return Ok(v);
    }
    let settings = vec![
        (
            "wal_sender_timeout".to_string(),
            format!("{WAL_SENDER_TIMEOUT_S}s"),
        ),
        ("max_prepared_transactions".to_string(), "10".to_string()),
    ];
    let mut options = ClusterOptions {
        settings,
        ..Default::default()
    };
    let mut tls_pairs = None;
    let tls_root = if args.tls {
        let pki = pki::make("pgtrail test CA")?;
        tls_pairs = Some(TlsPairs {
            current: (pki.server_cert.clone(), pki.server_key.clone()),
            spare: pki.rotated.clone(),
            wrong_name: pki.wrong_name.clone(),
        });
        options.settings.extend([
            ("ssl".to_string(), "on".to_string()),
            ("ssl_cert_file".to_string(), "server.crt".to_string()),
            ("ssl_key_file".to_string(), "server.key".to_string()),
        ]);
        options.files = vec![
            ("server.crt".into(), pki.server_cert.into_bytes()),
            ("server.key".into(), pki.server_key.into_bytes()),
        ];
        let ca = work.path().join("ca.pem");
        std::fs::write(&ca, pki.ca).map_err(|e| e.to_string())?;
        Some(ca)
    } else {
        None
    };
    let cluster = Cluster::start(options).map_err(|e| e.to_string())?;
    cluster
        .psql("postgres", &format!("CREATE DATABASE {DB}"))
        .map_err(|e| e.to_string())?;
    // Where the export faults keep Bemi's table (not the captured database).
    cluster
        .psql("postgres", "CREATE DATABASE torture_bemi")
        .map_err(|e| e.to_string())?;
    cluster
        .psql(
            DB,
            "CREATE TABLE ledger (seq bigint PRIMARY KEY, writer text NOT NULL); \
             CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL, note text NOT NULL); \
             INSERT INTO acct SELECT g, 100, 's' || g FROM generate_series(1, 40) g;",
        )
        .map_err(|e| e.to_string())?;
    cluster
        .psql(DB, shapes::SCHEMA)
        .map_err(|e| e.to_string())?;
    cluster
        .psql(DB, faults::REVERT_TABLE_SQL)
        .map_err(|e| e.to_string())?;
    let upstream = format!("127.0.0.1:{}", cluster.port())
        .parse()
        .map_err(|e| format!("{e}"))?;
    let proxy = proxy::Proxy::start(upstream)?;
    let signing_key = work.path().join("torture.key");
    let keygen = Command::new(&bin)
        .args(["keygen", "--name", "pgtrail.invalid/torture", "--out"])
        .arg(&signing_key)
        .output()
        .map_err(|e| e.to_string())?;
    if !keygen.status.success() {
        return Err(format!(
            "pgtrail keygen failed: {}",
            String::from_utf8_lossy(&keygen.stderr)
        ));
    }
    let verifier_key = String::from_utf8_lossy(&keygen.stdout).trim().to_string();
    let mut h = Harness {
        archive: work.path().join("archive"),
        work: work.path().to_path_buf(),
        bin,
        cluster,
        proxy,
        capture: None,
        runs: 0,
        overtaken: 0,
        full_disk_archives: Vec::new(),
        disk_full_tried: [false; 2],
        unthrottled: Arc::new(AtomicBool::new(false)),
        export_faults: 0,
        fault_runs: 0,
        tls_root,
        tls_pairs,
        signing_key,
        verifier_key,
    };
    let mut v = Verdict::default();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut txn_oracle = txn_oracle::TxnOracle::create(&h.cluster)?;
    h.start_capture(None)?;
    h.wait_streaming(Duration::from_secs(120), None)?;

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    // A gentler rate keeps the archive checkable in minutes: unthrottled, a ci tier committed
    // 1.3M transactions (2.2M leaves to verify in a debug build, six of its ten minutes).
    // The disk-full faults lift the pause while they fill the disk.
    let pause = if args.tier == "soak" {
        Duration::from_millis(2)
    } else {
        Duration::from_millis(1)
    };
    let writer = workload(
        h.cluster.url(DB),
        stop.clone(),
        seed,
        committed.clone(),
        pause,
        h.unthrottled.clone(),
    );
    let shape_rounds = Arc::new(AtomicU64::new(0));
    let big_rows = if args.tier == "soak" { 300_000 } else { 50_000 };
    let shaper = shapes::workload(
        h.cluster.url(DB),
        stop.clone(),
        seed,
        big_rows,
        shape_rounds.clone(),
    );

    let mut schedule: Vec<Fault> = vec![
        Fault::DiskFull,
        Fault::DiskFullCompacting,
        Fault::Kill9,
        Fault::TerminateWalsender,
        Fault::Kill9,
    ];
    schedule.extend(CRASH_POINTS.iter().map(|p| Fault::CrashAt(p)));
    schedule.extend(EXPORT_CRASH_POINTS.iter().map(|p| Fault::ExportCrash(p)));
    schedule.extend([
        Fault::Restart("fast"),
        Fault::Kill9,
        Fault::Restart("immediate"),
        Fault::Stall,
        Fault::TerminateWalsender,
        Fault::Kill9,
    ]);
    schedule.extend([
        Fault::NetReset,
        Fault::NetCloseMidFrame,
        Fault::BlackHole,
        Fault::NetReset,
        Fault::BlackHoleStream,
    ]);
    schedule.extend([
        Fault::RevertCrash,
        Fault::StreamDisconnect,
        Fault::RestartDuringTableSync,
        Fault::StreamDisconnect,
        Fault::StreamDisconnect,
    ]);
    if args.tls {
        schedule = vec![
            Fault::NetReset,
            Fault::NetCloseMidFrame,
            Fault::Kill9,
            Fault::TlsRotate,
            Fault::BlackHole,
            Fault::NetReset,
            Fault::TlsHandshakeFail,
            Fault::BlackHoleStream,
            Fault::TlsRotate,
        ];
    }
    let soak_until =
        (args.tier == "soak").then(|| Instant::now() + Duration::from_secs(args.minutes * 60));
    let started = Instant::now();
    let mut i = 0usize;
    // Faults survived by kind (crash points together), printed at the end.
    let mut kinds: BTreeMap<&'static str, u32> = BTreeMap::new();
    loop {
        let fault = match soak_until {
            None if i >= schedule.len() => break,
            None => schedule[i].clone(),
            Some(until) if Instant::now() >= until => break,
            // One disk-full run is enough: it keeps a slot (and WAL) until the end. The faults
            // that take 7-20 s each (a stall, the black holes, a restart during a table's
            // copy) are drawn a quarter as often as the others, so that an hour holds
            // thousands of faults with every kind among them.
            Some(_) => loop {
                match schedule[(rng.next() as usize) % schedule.len()].clone() {
                    Fault::DiskFull if h.disk_full_tried[0] => break Fault::Kill9,
                    Fault::DiskFullCompacting if h.disk_full_tried[1] => break Fault::Kill9,
                    Fault::Stall
                    | Fault::BlackHole
                    | Fault::BlackHoleStream
                    | Fault::RestartDuringTableSync
                        if !rng.next().is_multiple_of(4) => {}
                    f => break f,
                }
            },
        };
        i += 1;
        let (pause_min, pause_max) = match soak_until {
            Some(_) => (50, 400),
            None => (300, 1500),
        };
        std::thread::sleep(Duration::from_millis(rng.between(pause_min, pause_max)));
        v.faults += 1;
        let at = committed.load(Ordering::Relaxed);
        match h.inject(&fault) {
            Ok(()) => {
                v.survived += 1;
                *kinds.entry(fault_kind(&fault)).or_default() += 1;
                eprintln!(
                    "torture: fault {} {fault:?} at {at} transactions: survived ({:.0} s)",
                    v.faults,
                    started.elapsed().as_secs_f64()
                );
            }
            Err(e) if e.starts_with("SKIP: ") => {
                v.faults -= 1;
                eprintln!("torture: fault {fault:?} skipped: {}", &e[6..]);
            }
            Err(e) => {
                eprintln!("torture: fault {} {fault:?}: NOT survived: {e}", v.faults);
                v.problems.push(format!("fault {fault:?}: {e}"));
                // Carry on with a fresh capture so that the rest still runs.
                h.kill9();
                h.start_capture(None)?;
                h.wait_streaming(Duration::from_secs(120), None)?;
            }
        }
        // Keep the oracle slot's WAL small; one that fails now (a restart) is read next time.
        let _ = txn_oracle.drain(&h.cluster);
    }
    eprintln!(
        "torture: faults survived by kind: {}",
        kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    stop.store(true, Ordering::Relaxed);
    let transactions = writer
        .join()
        .map_err(|_| "the workload thread panicked".to_string())?;
    let rounds = shaper
        .join()
        .map_err(|_| "the shapes workload thread panicked".to_string())?;
    h.cluster.psql(DB, ORACLE_SQL).map_err(|e| e.to_string())?;
    h.cluster
        .psql(DB, &shapes::oracle_sql())
        .map_err(|e| e.to_string())?;
    let end = h
        .cluster
        .psql(DB, "SELECT pg_current_wal_insert_lsn()::text")
        .map_err(|e| e.to_string())?;
    if let Err(e) = h.wait_durable(&end, Duration::from_secs(180)) {
        v.problems.push(format!("after the last fault, {e}"));
    }
    if let Err(e) = h.resume_full_disks(&end) {
        v.problems.push(e);
    }
    if let Err(e) = txn_oracle.drain(&h.cluster) {
        v.problems.push(e);
    }
    h.signal("-TERM");
    if h.wait_exit(Duration::from_secs(60))
        .is_none_or(|s| !s.success())
    {
        v.problems
            .push("capture did not stop cleanly on SIGTERM".into());
        h.kill9();
    }
    eprintln!(
        "torture: {transactions} workload transactions and {rounds} shape rounds committed; checking the archive"
    );
    for entry in std::fs::read_dir(&h.work)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("capture-")
            && std::fs::read_to_string(entry.path()).is_ok_and(|t| t.contains("panicked"))
        {
            v.panics += 1;
            v.problems
                .push(format!("a capture panicked: {}", entry.path().display()));
        }
    }
    if transactions < 100 {
        v.problems.push(format!(
            "the workload committed only {transactions} transactions"
        ));
    }
    if args.tls {
        // Every session of the capture went over verified TLS.
        let sessions = std::fs::read_dir(&h.work)
            .map_err(|e| e.to_string())?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("capture-"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|log| {
                log.lines()
                    .filter(|l| l.contains("replication connection security="))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        let unverified = sessions
            .iter()
            .filter(|l| !l.contains("server verified (certificate chain and host name)"))
            .count();
        // Each capture run logs its replication connection's security when it first
        // connects and whenever it changes.
        eprintln!(
            "torture: {} replication connection reports over TLS, {unverified} not verified",
            sessions.len()
        );
        if sessions.is_empty() || unverified > 0 {
            v.problems.push(format!(
                "with --tls, {unverified} of {} replication connection reports were not verified TLS",
                sessions.len()
            ));
        }
    }
    // Each checking phase says how long it took: the ci tier's time is budgeted.
    let phase = Instant::now();
    check_archive(&h, &mut v)?;
    eprintln!(
        "torture: archive checked in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    let phase = Instant::now();
    match h.pgtrail_sql(&txn_oracle::TxnOracle::archive_query()) {
        Ok(csv) => txn_oracle.check(&csv, &mut v),
        Err(e) => v
            .problems
            .push(format!("the archive's changes per transaction: {e}")),
    }
    eprintln!(
        "torture: per-transaction oracle checked in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    let phase = Instant::now();
    verify_evidence(&h, &mut v);
    eprintln!(
        "torture: evidence verified in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    if !args.tls {
        let phase = Instant::now();
        gaps::run(&h.bin, &h.work, &mut v)?;
        eprintln!(
            "torture: gap cases run in {:.0} s",
            phase.elapsed().as_secs_f64()
        );
        let phase = Instant::now();
        bad_inputs(&h, &mut v);
        serve::bad_inputs(&h.bin, &h.archive, &h.work, &mut v);
        inputs::bad_inputs(&h, &mut v);
        refusals::bad_inputs(&h.bin, &h.work, &mut v);
        eprintln!(
            "torture: bad inputs tried in {:.0} s",
            phase.elapsed().as_secs_f64()
        );
    }
    // Keep the evidence (capture logs, archives) of any failure.
    if args.keep || !v.problems.is_empty() || v.lost + v.duplicates + v.gaps + v.panics > 0 {
        let kept = work.keep();
        eprintln!("torture: work directory kept at {}", kept.display());
    }
    Ok(v)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("torture: tier {}, seed {seed}", args.tier);
    let v = match run(&args, seed) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("torture: could not run: {e}");
            eprintln!(
                "torture: replay with: pgtrail-torture --tier {} --seed {seed}",
                args.tier
            );
            return ExitCode::from(2);
        }
    };
    for p in &v.problems {
        eprintln!("torture: PROBLEM: {p}");
    }
    eprintln!(
        "torture: {} point-in-time oracles and {} before images checked, {} mismatched, {} refused as unknown (DDL rewrote the table, not read again yet); {} panics",
        v.oracles, v.images_checked, v.oracle_mismatches, v.oracles_unknown, v.panics
    );
    let failed = v.lost > 0
        || v.duplicates > 0
        || v.gaps > 0
        || v.oracle_mismatches > 0
        || v.panics > 0
        || v.survived < v.faults
        || v.bad_inputs_failed > 0
        || ((v.oracles == 0 || v.images_checked == 0) && !args.gaps_only && !args.refusals_only)
        || !v.problems.is_empty();
    if failed {
        eprintln!(
            "torture: FAILED; replay with: pgtrail-torture --tier {} --seed {seed}",
            args.tier
        );
    }
    println!(
        "{} faults injected, {} survived, {} bad inputs, {} rows lost, {} duplicates, {} unexpected gaps",
        v.faults, v.survived, v.bad_inputs, v.lost, v.duplicates, v.gaps
    );
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
