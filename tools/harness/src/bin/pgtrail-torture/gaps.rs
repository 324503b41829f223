//! The gap faults: histories the archive can no longer continue without a hole. Each must be
//! detected before streaming, recorded in the archive and reported with a non-zero exit, never
//! resumed silently; `--resnapshot` must then bring the archive back to PostgreSQL's state
//! with the gap on record. They run on a cluster of their own (one of them invalidates a slot
//! through `max_slot_wal_keep_size`, another puts a different cluster behind the same URL), and
//! a second capture on a slot in use must be refused without disturbing the first.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_query::{ArchiveSnapshot, Moment, state_at};
use pgtrail_store::{LogReader, Lsn};

use crate::proxy::Proxy;
use crate::{Verdict, capture_command, wait_child};

const DB: &str = "gaps";

/// One gap case's setting: a cluster reached through a proxy, so that another cluster can be
/// put behind the same URL.
struct GapBench<'a> {
    bin: &'a Path,
    work: &'a Path,
    cluster: &'a Cluster,
    proxy: &'a Proxy,
    next_value: i64,
}

/// The outcome of one capture run.
struct Run {
    status: Option<ExitStatus>,
    stderr: String,
}

impl GapBench<'_> {
    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{DB}", self.proxy.port)
    }

    fn capture(
        &self,
        name: &str,
        archive: &Path,
        slot: &str,
        extra: &[&str],
        limit: Duration,
    ) -> Result<Run, String> {
        let log_path = self.work.join(format!("gap-{name}.log"));
        let mut child = capture_command(self.bin, &self.url(), archive, slot, "gaps", &log_path)?
            .args(["--no-compact", "--stream-timeout-secs", "4"])
            .args(extra)
            .spawn()
            .map_err(|e| e.to_string())?;
        let status = wait_child(&mut child, limit);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(Run {
            status,
            stderr: std::fs::read_to_string(&log_path).unwrap_or_default(),
        })
    }

    /// Capture up to the source's current position, and stop.
    fn catch_up(
        &self,
        name: &str,
        archive: &Path,
        slot: &str,
        extra: &[&str],
    ) -> Result<(), String> {
        let end = self
            .cluster
            .psql(DB, "SELECT pg_current_wal_insert_lsn()::text")
            .map_err(|e| e.to_string())?;
        let mut args = vec!["--stop-at", end.as_str()];
        args.extend_from_slice(extra);
        let run = self.capture(name, archive, slot, &args, Duration::from_secs(120))?;
        match run.status {
            Some(s) if s.success() => Ok(()),
            _ => Err(format!(
                "capture {name} did not catch up ({:?}): {}",
                run.status,
                last_lines(&run.stderr)
            )),
        }
    }

    fn write(&mut self, rows: i64) -> Result<(), String> {
        let from = self.next_value;
        self.next_value += rows;
        let sql = format!(
            "INSERT INTO g SELECT g, {from} FROM generate_series({from}, {}) g ON CONFLICT (id) DO UPDATE SET v = excluded.v; \
             DELETE FROM g WHERE id % 7 = {};",
            self.next_value - 1,
            from % 7
        );
        self.cluster
            .psql(DB, &sql)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Start a capture that must stop with a recorded gap; then `--resnapshot` must resume to
    /// PostgreSQL's state with exactly that gap on record.
    fn expect_gap(&mut self, name: &str, archive: &Path, slot: &str) -> Result<String, String> {
        let gaps_before = gaps(archive)?;
        let run = self.capture(name, archive, slot, &[], Duration::from_secs(90))?;
        let reason = match run.status {
            None => return Err("capture did not stop: it may be streaming past the gap".into()),
            Some(s) if s.success() => {
                return Err("capture exited 0: it resumed past the gap".into());
            }
            Some(_) if run.stderr.contains("panicked") => {
                return Err(format!("capture panicked: {}", last_lines(&run.stderr)));
            }
            Some(_) if !run.stderr.contains("gap in the archive") => {
                return Err(format!(
                    "the error does not report a gap: {}",
                    last_lines(&run.stderr)
                ));
            }
            Some(_) => {
                let recorded = gaps(archive)?;
                if recorded.len() != gaps_before.len() + 1 {
                    return Err(format!(
                        "{} gaps recorded in the archive, expected {}",
                        recorded.len(),
                        gaps_before.len() + 1
                    ));
                }
                recorded
                    .last()
                    .map(|g| g.reason.clone())
                    .unwrap_or_default()
            }
        };
        self.write(50)?;
        self.catch_up(
            &format!("{name}-resnapshot"),
            archive,
            slot,
            &["--resnapshot"],
        )?;
        if gaps(archive)?.len() != gaps_before.len() + 1 {
            return Err("--resnapshot changed the recorded gaps".into());
        }
        // A later run resumes normally.
        self.write(20)?;
        self.catch_up(&format!("{name}-after"), archive, slot, &[])?;
        let (archive_rows, pg_rows) = (table_rows(archive)?, self.pg_rows()?);
        if archive_rows != pg_rows {
            return Err(format!(
                "after --resnapshot the archive holds {} rows of g, PostgreSQL {} (or they differ)",
                archive_rows.len(),
                pg_rows.len()
            ));
        }
        Ok(reason)
    }

    fn pg_rows(&self) -> Result<Vec<(i64, i64)>, String> {
        self.cluster
            .psql(
                DB,
                "SELECT coalesce(json_agg(json_build_array(id, v) ORDER BY id), '[]') FROM g",
            )
            .map_err(|e| e.to_string())
            .and_then(|j| serde_json::from_str(&j).map_err(|e| e.to_string()))
    }
}

fn last_lines(text: &str) -> String {
    text.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
}

fn gaps(archive: &Path) -> Result<Vec<pgtrail_store::Gap>, String> {
    let reader =
        LogReader::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    reader.gaps().map_err(|e| e.to_string())
}

/// Table g as the archive shows it now, ordered by id.
fn table_rows(archive: &Path) -> Result<Vec<(i64, i64)>, String> {
    let snapshot = ArchiveSnapshot::open(archive).map_err(|e| e.to_string())?;
    let table = snapshot.table("public.g").map_err(|e| e.to_string())?;
    let state =
        state_at(&snapshot, table, Moment::Lsn(Lsn(u64::MAX))).map_err(|e| e.to_string())?;
    let int = |c: Option<&pgtrail_store::Cell>| {
        c.and_then(pgtrail_store::Cell::as_text)
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(i64::MIN)
    };
    let mut rows: Vec<(i64, i64)> = state
        .rows
        .values()
        .flatten()
        .map(|(_, r)| (int(r.first()), int(r.get(1))))
        .collect();
    rows.sort();
    Ok(rows)
}

fn start_cluster() -> Result<Cluster, String> {
    let settings = vec![("wal_sender_timeout".to_string(), "5s".to_string())];
    let cluster = Cluster::start(ClusterOptions {
        settings,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    cluster
        .psql("postgres", &format!("CREATE DATABASE {DB}"))
        .map_err(|e| e.to_string())?;
    cluster
        .psql(DB, "CREATE TABLE g (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO g SELECT g, 0 FROM generate_series(1, 100) g;")
        .map_err(|e| e.to_string())?;
    Ok(cluster)
}

/// Run every gap case, counting each as a fault that must be survived (detected, recorded,
/// reported, then resumed on purpose).
pub fn run(bin: &Path, work: &Path, v: &mut Verdict) -> Result<(), String> {
    let cluster = start_cluster()?;
    let addr = |c: &Cluster| {
        format!("127.0.0.1:{}", c.port())
            .parse()
            .map_err(|e| format!("{e}"))
    };
    let proxy = Proxy::start(addr(&cluster)?)?;
    let mut bench = GapBench {
        bin,
        work,
        cluster: &cluster,
        proxy: &proxy,
        next_value: 1000,
    };
    let dir = |name: &str| -> PathBuf { work.join(format!("gap-{name}")) };

    let mut case = |name: &str,
                    bench: &mut GapBench,
                    f: &mut dyn FnMut(&mut GapBench) -> Result<String, String>| {
        v.faults += 1;
        match f(bench) {
            Ok(detail) => {
                v.survived += 1;
                eprintln!(
                    "torture: fault {} gap case {name}: detected, recorded, resumed on purpose ({detail})",
                    v.faults
                );
            }
            Err(e) => {
                eprintln!(
                    "torture: fault {} gap case {name}: NOT survived: {e}",
                    v.faults
                );
                v.problems.push(format!("gap case {name}: {e}"));
            }
        }
    };

    case("slot dropped and recreated", &mut bench, &mut |b| {
        let archive = dir("recreated");
        b.catch_up("recreated-first", &archive, "gap_recreated", &[])?;
        b.write(30)?;
        b.cluster
            .psql(DB, "SELECT pg_drop_replication_slot('gap_recreated'); SELECT pg_create_logical_replication_slot('gap_recreated', 'pgoutput');")
            .map_err(|e| e.to_string())?;
        b.write(30)?;
        b.expect_gap("recreated", &archive, "gap_recreated")
    });

    case(
        "archive restored from an older copy",
        &mut bench,
        &mut |b| {
            let archive = dir("restored");
            b.catch_up("restored-first", &archive, "gap_restored", &[])?;
            let old = dir("restored-old-copy");
            copy(&archive, &old)?;
            b.write(40)?;
            b.catch_up("restored-second", &archive, "gap_restored", &[])?;
            std::fs::remove_dir_all(&archive).map_err(|e| e.to_string())?;
            copy(&old, &archive)?;
            b.write(10)?;
            b.expect_gap("restored", &archive, "gap_restored")
        },
    );

    case("second capture on a slot in use", &mut bench, &mut |b| {
        let archive = dir("second");
        b.catch_up("second-first", &archive, "gap_second", &[])?;
        let mut first = capture_command(
            b.bin,
            &b.url(),
            &archive,
            "gap_second",
            "gaps",
            &b.work.join("gap-second-streaming.log"),
        )?
        .arg("--no-compact")
        .spawn()
        .map_err(|e| e.to_string())?;
        let result = (|| {
            let pid_sql = "SELECT coalesce(active_pid::text, '') FROM pg_replication_slots WHERE slot_name = 'gap_second'";
            let mut pid = String::new();
            for _ in 0..300 {
                pid = b.cluster.psql(DB, pid_sql).unwrap_or_default();
                if !pid.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if pid.is_empty() {
                return Err("the first capture did not stream".to_string());
            }
            let copy_dir = dir("second-copy");
            copy(&archive, &copy_dir)?;
            let run = b.capture(
                "second-intruder",
                &copy_dir,
                "gap_second",
                &[],
                Duration::from_secs(90),
            )?;
            match run.status {
                Some(s)
                    if !s.success()
                        && run.stderr.contains("in use")
                        && !run.stderr.contains("panicked") => {}
                other => {
                    return Err(format!(
                        "the second capture was not refused clearly ({other:?}): {}",
                        last_lines(&run.stderr)
                    ));
                }
            }
            if b.cluster.psql(DB, pid_sql).unwrap_or_default() != pid {
                return Err("the first capture lost its session to the second".into());
            }
            if !gaps(&copy_dir)?.is_empty() {
                return Err("a refused second capture recorded a gap".into());
            }
            Ok("refused: slot in use; the first capture kept streaming".to_string())
        })();
        let _ = Command::new("kill")
            .args(["-TERM", &first.id().to_string()])
            .status();
        if wait_child(&mut first, Duration::from_secs(30)).is_none_or(|s| !s.success()) {
            let _ = first.kill();
            return Err("the first capture did not stop cleanly".into());
        }
        result
    });

    case(
        "a different cluster behind the same URL",
        &mut bench,
        &mut |b| {
            let archive = dir("other-cluster");
            b.catch_up("other-cluster-first", &archive, "gap_other", &[])?;
            let other = start_cluster()?;
            other
            .psql(DB, "SELECT pg_create_logical_replication_slot('gap_other', 'pgoutput'); CREATE PUBLICATION gaps FOR TABLE g;")
            .map_err(|e| e.to_string())?;
            b.proxy.set_upstream(addr(&other)?);
            let run = b.capture(
                "other-cluster",
                &archive,
                "gap_other",
                &[],
                Duration::from_secs(90),
            );
            b.proxy.set_upstream(addr(b.cluster)?);
            let run = run?;
            if run.status.is_none_or(|s| s.success())
                || !run.stderr.contains("different PostgreSQL cluster")
            {
                return Err(format!(
                    "another cluster behind the URL was not reported ({:?}): {}",
                    run.status,
                    last_lines(&run.stderr)
                ));
            }
            if gaps(&archive)?.len() != 1 {
                return Err("the event was not recorded in the archive".into());
            }
            // --resnapshot must not continue this archive from the other cluster either.
            b.proxy.set_upstream(addr(&other)?);
            let run = b.capture(
                "other-cluster-resnapshot",
                &archive,
                "gap_other",
                &["--resnapshot"],
                Duration::from_secs(90),
            );
            b.proxy.set_upstream(addr(b.cluster)?);
            let run = run?;
            if run.status.is_none_or(|s| s.success())
                || !run.stderr.contains("different PostgreSQL cluster")
            {
                return Err(format!(
                    "--resnapshot continued the archive from another cluster ({:?}): {}",
                    run.status,
                    last_lines(&run.stderr)
                ));
            }
            // Back on the original cluster the archive continues where it was: nothing was lost.
            b.write(10)?;
            b.catch_up("other-cluster-back", &archive, "gap_other", &[])?;
            if table_rows(&archive)? != b.pg_rows()? {
                return Err("back on its own cluster the archive does not equal PostgreSQL".into());
            }
            Ok("refused, recorded; continued on the original cluster".to_string())
        },
    );

    // Last: it invalidates slots, so every earlier case's slot is dropped first.
    case(
        "slot invalidated by max_slot_wal_keep_size",
        &mut bench,
        &mut |b| {
            let archive = dir("invalidated");
            b.catch_up("invalidated-first", &archive, "gap_invalidated", &[])?;
            b.cluster
            .psql(DB, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name <> 'gap_invalidated' AND NOT active")
            .map_err(|e| e.to_string())?;
            b.cluster
                .psql(DB, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
                .map_err(|e| e.to_string())?;
            b.cluster
                .psql(DB, "SELECT pg_reload_conf()")
                .map_err(|e| e.to_string())?;
            for _ in 0..4 {
                b.write(5)?;
                b.cluster
                    .psql(DB, "SELECT pg_switch_wal()")
                    .map_err(|e| e.to_string())?;
            }
            b.cluster
                .psql(DB, "CHECKPOINT")
                .map_err(|e| e.to_string())?;
            let status = b
            .cluster
            .psql(DB, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'gap_invalidated'")
            .map_err(|e| e.to_string())?;
            b.cluster
                .psql(DB, "ALTER SYSTEM RESET max_slot_wal_keep_size")
                .map_err(|e| e.to_string())?;
            b.cluster
                .psql(DB, "SELECT pg_reload_conf()")
                .map_err(|e| e.to_string())?;
            if status != "lost" {
                return Err(format!(
                    "could not invalidate the slot (wal_status {status:?})"
                ));
            }
            b.expect_gap("invalidated", &archive, "gap_invalidated")
        },
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "could not copy {} to {}",
            from.display(),
            to.display()
        ))
    }
}
