//! End-to-end tests of the `pgtrail` binary against a real throwaway PostgreSQL: kill -9 and
//! restart under load, a 1,000,000-row transaction in bounded memory, and the demo.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgtrail_capture::cluster::Cluster;
use pgtrail_store::{LogReader, Lsn, Op};

mod archives;
mod bemi;
mod bemi_package;
mod compaction;
mod connecting;
mod contexts;
mod delta;
mod evidence;
mod export;
mod faults;
mod identifiers;
mod json;
mod metrics;
mod query;
mod restore;
mod revert;
mod schema;
mod serve;
mod snapshot_dates;
mod tables;
mod tampering;

fn pgtrail() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgtrail"))
}

/// `pgtrail ARGS --archive ARCHIVE`: its output, or a panic with its error output.
fn pgtrail_ok(archive: &Path, args: &[&str]) -> std::process::Output {
    let out = pgtrail()
        .args(args)
        .arg("--archive")
        .arg(archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgtrail {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn spawn_capture(url: &str, archive: &Path, slot: &str, stop_at: Option<&str>) -> Child {
    let mut extra = vec!["--progress-secs", "1"];
    if let Some(lsn) = stop_at {
        extra.extend(["--stop-at", lsn]);
    }
    spawn_capture_with(url, archive, slot, &extra)
}

/// `pgtrail capture` of `url` into `archive` (slot and publication `slot`) with `extra`
/// arguments, its output discarded.
fn spawn_capture_with(url: &str, archive: &Path, slot: &str, extra: &[&str]) -> Child {
    pgtrail()
        .args(["capture", "--slot", slot, "--publication", slot])
        .args(extra)
        .env("PGTRAIL_SOURCE", url)
        .env("PGTRAIL_ARCHIVE", archive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgtrail capture")
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "pgtrail capture did not finish in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until `slot` is held and made: its consistent point is fixed, so a transaction
/// committed from now on reaches the archive through the stream, as a change of its own. (A
/// slot is active while it is still being made, and a transaction committed then may end up
/// inside the initial snapshot instead: a CI run of the page test once saw customer 3's
/// e-mail change folded into its snapshot that way.)
fn wait_slot_active(cluster: &Cluster, db: &str, slot: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let active = cluster
            .psql(db, &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active AND confirmed_flush_lsn IS NOT NULL"))
            .unwrap();
        if active == "1" {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "capture exited before streaming"
        );
        assert!(Instant::now() < deadline, "capture never started streaming");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The stop flag of a test's writer thread, raised when dropped too: a test that fails before
/// it means to stop its writer must not leave it writing to the shared cluster, slowing every
/// later test (a failed CI run's stream test did, for 20 minutes).
struct WriterStop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl WriterStop {
    fn new() -> WriterStop {
        WriterStop(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
            false,
        )))
    }

    /// The flag, for the writer to poll.
    fn flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.0.clone()
    }

    fn raise(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for WriterStop {
    fn drop(&mut self) {
        self.raise();
    }
}

/// Wait until `archive` holds `table`'s initial snapshot. A slot is active (and
/// [`wait_slot_active`] returns) while its snapshot is still being copied, so a reader that
/// names the table before this finds no such table: a CI run's stream test got a 404 that way.
fn wait_snapshot_stored(archive: &Path, table: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !holds_snapshot(archive, table) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "capture exited before storing {table}'s snapshot"
        );
        assert!(
            Instant::now() < deadline,
            "{table}'s snapshot never reached the archive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `archive` holds a snapshot of `table` (read as a reader beside the capture would).
fn holds_snapshot(archive: &Path, table: &str) -> bool {
    pgtrail_query::ArchiveSnapshot::open(archive).is_ok_and(|snapshot| {
        snapshot
            .table(table)
            .is_ok_and(|t| !snapshot.snapshot_points(t).is_empty())
    })
}

/// Capture `db` into `archive` (slot and publication named after the database) until
/// everything written so far is durable, in this process, through the library.
fn capture_until_now(cluster: &Cluster, db: &str, archive: &Path) {
    let stop_at: Lsn = insert_lsn(cluster, db).parse().unwrap();
    let config = pgtrail_capture::CaptureConfig {
        source: pgtrail_capture::SourceConfig::parse(&cluster.url(db)).unwrap(),
        archive: archive.to_path_buf(),
        slot: db.to_string(),
        publication: db.to_string(),
        tables: Vec::new(),
        resnapshot: false,
        progress_interval: Duration::from_secs(1),
        stream_timeout: pgtrail_capture::DEFAULT_STREAM_TIMEOUT,
        stop_at: Some(stop_at),
        catalog_interval: pgtrail_capture::DEFAULT_CATALOG_INTERVAL,
        compaction: None,
        durable_observer: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(pgtrail_capture::run(config, std::future::pending(), |_| {}))
        .unwrap_or_else(|e| panic!("capture: {}", pgtrail_capture::run::error_chain(&e)));
}

/// `pgtrail sql --format FORMAT [--output FILE]` over `archive`: its standard output, or a
/// panic with its error output.
fn run_sql(archive: &Path, format: &str, output: Option<&Path>, query: &str) -> String {
    let mut cmd = pgtrail();
    cmd.args(["sql", "--format", format]);
    if let Some(file) = output {
        cmd.arg("--output").arg(file);
    }
    let out = cmd
        .arg("--archive")
        .arg(archive)
        .arg(query)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{query}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pgtrail sql --format FORMAT` over `archive`: its standard output.
fn pgtrail_sql(archive: &Path, format: &str, query: &str) -> String {
    run_sql(archive, format, None, query)
}

/// `pgtrail sql --format parquet --output FILE` over `archive`, and a reader of the file
/// (the parquet crate's own).
fn pgtrail_sql_parquet(
    archive: &Path,
    query: &str,
    file: &Path,
) -> datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<std::fs::File> {
    run_sql(archive, "parquet", Some(file), query);
    datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(file).unwrap(),
    )
    .unwrap()
}

fn insert_lsn(cluster: &Cluster, db: &str) -> String {
    cluster
        .psql(db, "SELECT pg_current_wal_insert_lsn()")
        .unwrap()
}

/// A tiny deterministic generator (no dependency needed for a test's randomness).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn kill_9_during_streaming_loses_and_duplicates_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("kill").unwrap();
    cluster
        .psql(
            &db,
            "CREATE TABLE ledger (seq bigint PRIMARY KEY, payload text);
                    CREATE TABLE mutable (id int PRIMARY KEY, v int, note text);
                    INSERT INTO mutable SELECT g, 0, 'start' FROM generate_series(1, 200) g;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let url = cluster.url(&db);

    // One writer: ledger rows strictly increasing, mutable rows updated, deleted, re-inserted.
    let workload_url = url.clone();
    // The writer runs until the capture has been killed enough times (at least 3000
    // transactions): a fixed count could finish before the first kill on a fast machine.
    let stop = WriterStop::new();
    let writer_stop = stop.flag();
    let writer = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&workload_url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let mut seq = 0i64;
            while seq < 3000 || !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let id = (rng.next() % 200) as i32 + 1;
                let sql = match rng.next() % 4 {
                    0 => format!("DELETE FROM mutable WHERE id = {id}"),
                    1 => format!("INSERT INTO mutable VALUES ({id}, {seq}, 'again') ON CONFLICT (id) DO UPDATE SET v = {seq}"),
                    _ => format!("UPDATE mutable SET v = {seq}, note = 'n{seq}' WHERE id = {id}"),
                };
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO ledger VALUES ({seq}, 'p{seq}'), ({}, 'twin'); {sql}; COMMIT;",
                        seq + 1_000_000
                    ))
                    .await
                    .unwrap();
            }
            seq
        })
    });

    let mut rng = Rng(42);
    let mut kills = 0;
    let mut child = spawn_capture(&url, &archive, &db, None);
    wait_slot_active(cluster, &db, &db, &mut child);
    while kills < 4 || !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(150 + rng.next() % 400));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if kills >= 4 {
            stop.raise();
        }
        child = spawn_capture(&url, &archive, &db, None);
    }
    let last_seq = writer.join().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // Finish cleanly up to the end of the workload.
    let end = insert_lsn(cluster, &db);
    let mut last = spawn_capture(&url, &archive, &db, Some(&end));
    let status = wait_exit(&mut last, Duration::from_secs(120));
    if !status.success() {
        let out = pgtrail()
            .args([
                "capture",
                "--slot",
                &db,
                "--publication",
                &db,
                "--stop-at",
                &end,
            ])
            .env("PGTRAIL_SOURCE", &url)
            .env("PGTRAIL_ARCHIVE", &archive)
            .output()
            .unwrap();
        panic!(
            "final capture failed ({status}); a rerun said: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let reader = LogReader::open(&archive).unwrap();
    let relations = reader.relations().unwrap();
    let ledger_id = relations
        .iter()
        .find(|r| r.name == "ledger")
        .unwrap()
        .relation_id;
    let mut seen = BTreeMap::new();
    let mut keys = BTreeSet::new();
    let mut mutable: BTreeMap<String, String> = BTreeMap::new();
    // Segments (capture compacts in the background) and the log tail, as one read.
    for (key, rec) in reader.all_changes(&archive).unwrap() {
        assert!(keys.insert(key), "change key {key} stored twice");
        let id = rec.key.as_ref().and_then(|k| k[0].clone());
        if rec.relation_id == ledger_id {
            *seen.entry(id.unwrap().parse::<i64>().unwrap()).or_insert(0) += 1;
            continue;
        }
        let row = |r: &Option<Vec<pgtrail_store::Cell>>| {
            r.as_ref()
                .unwrap()
                .iter()
                .map(|c| c.as_text().unwrap_or("<NULL>").to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match rec.op {
            Op::Insert | Op::Snapshot | Op::Update => {
                mutable.insert(id.unwrap(), row(&rec.after));
            }
            Op::Delete => {
                mutable.remove(&id.unwrap());
            }
            _ => {}
        }
    }
    let expected: BTreeSet<i64> = (1..=last_seq)
        .chain(1_000_001..=1_000_000 + last_seq)
        .collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|s| !seen.contains_key(s))
        .take(5)
        .collect();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).take(5).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "{kills} kills: missing {missing:?}, duplicated {twice:?}"
    );
    assert_eq!(seen.len(), expected.len());
    let source: BTreeMap<String, String> = cluster
        .psql(
            &db,
            "SELECT id || '=' || id || ',' || v || ',' || note FROM mutable ORDER BY id",
        )
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(
        mutable, source,
        "the archive's final state differs from PostgreSQL's after {kills} kills"
    );
    // The slot never got ahead of the archive.
    let confirmed: Lsn = cluster
        .psql(
            &db,
            &format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{db}'"
            ),
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!(confirmed <= reader.position().unwrap());
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn a_million_row_transaction_is_captured_in_bounded_memory() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("big").unwrap();
    cluster
        .psql(&db, "CREATE TABLE big (id int PRIMARY KEY, v text)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let url = cluster.url(&db);
    let mut child = spawn_capture(&url, &archive, &db, None);
    wait_slot_active(cluster, &db, &db, &mut child);
    cluster
        .psql(
            &db,
            "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000000) g",
        )
        .unwrap();
    let end = insert_lsn(cluster, &db);
    // Wait until the slot confirms the whole transaction (acked only once durable), watching
    // the capture's peak memory meanwhile; then stop it with SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut peak = 0;
    loop {
        peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
        let confirmed = cluster
            .psql(&db, &format!("SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = '{db}'"))
            .unwrap();
        if confirmed == "t" {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "capture exited");
        assert!(
            Instant::now() < deadline,
            "the million-row transaction was not captured in 600 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The background compactor (1,000,000 changes > its threshold) now turns the transaction
    // into a segment; its memory counts too, so keep watching until the segment is written.
    let segments = archive.join(pgtrail_store::SEGMENTS_DIR);
    loop {
        peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
        let names: Vec<String> = std::fs::read_dir(&segments)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if names.iter().any(|n| n.ends_with(".parquet"))
            && !names.iter().any(|n| n.ends_with(".tmp"))
        {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "capture exited");
        assert!(
            Instant::now() < deadline,
            "the transaction was not compacted in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
    terminate(&mut child);
    let reader = LogReader::open(&archive).unwrap();
    // The background compactor may have moved the transaction into segments meanwhile:
    // count in both, from the manifest and the log tail of one read.
    let manifest = reader.manifest().unwrap();
    let mut commit_lsns = BTreeSet::new();
    let mut inserts = 0u64;
    for seg in &manifest.segments {
        inserts += seg.op_counts.get("insert").copied().unwrap_or(0);
        commit_lsns.insert(seg.min_key.commit_lsn);
        commit_lsns.insert(seg.max_key.commit_lsn);
    }
    for entry in reader.changes().unwrap() {
        let (key, rec) = entry.unwrap();
        if rec.op == Op::Insert {
            inserts += 1;
            commit_lsns.insert(key.commit_lsn);
        }
    }
    assert_eq!(inserts, 1_000_000);
    assert_eq!(commit_lsns.len(), 1, "all in one transaction");
    // The rows alone are ~70 MB of text; holding the transaction would take far more.
    eprintln!("capture's peak RSS over a 1,000,000-row transaction: {peak} KiB");
    assert!(
        peak < 256 * 1024,
        "peak RSS {peak} KiB during a 1,000,000-row transaction"
    );

    // The million rows restored, with COPY, equal the table, in bounded memory.
    let mut restore = pgtrail()
        .args([
            "restore",
            "--table",
            "big",
            "--as-of-lsn",
            &end,
            "--target-schema",
            "restored",
        ])
        .arg("--archive")
        .arg(&archive)
        .args(["--into", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut restore_peak = 0;
    let status = loop {
        restore_peak = restore_peak.max(peak_rss_kib(restore.id()).unwrap_or(0));
        if let Some(status) = restore.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut restore.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "restore: {err}");
    let differ = cluster
        .psql(
            &db,
            "SELECT count(*) FROM ((TABLE big EXCEPT ALL TABLE restored.big) \
             UNION ALL (TABLE restored.big EXCEPT ALL TABLE big)) d",
        )
        .unwrap();
    assert_eq!(differ, "0", "the restored table differs from the table");
    eprintln!("restore's peak RSS over 1,000,000 rows: {restore_peak} KiB");
    // The rows are held as the archive stores them (typed), and rendered as COPY text a
    // megabyte at a time: the same bound as the capture's.
    assert!(
        restore_peak < 256 * 1024,
        "restore's peak RSS {restore_peak} KiB over 1,000,000 rows"
    );
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = wait_exit(child, Duration::from_secs(60));
    assert!(
        status.success(),
        "SIGTERM must stop capture cleanly (exit 0), got {status}"
    );
}

#[test]
fn demo_captures_the_shop_workload() {
    let dir = tempfile::tempdir().unwrap();
    let out = pgtrail()
        .arg("demo")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let reader = LogReader::open(&dir.path().join("pgtrail-demo")).unwrap();
    let changes: Vec<_> = reader
        .all_changes(&dir.path().join("pgtrail-demo"))
        .unwrap()
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(
        reader.change_count().unwrap(),
        0,
        "the demo compacts the whole log"
    );
    assert!(!reader.manifest().unwrap().segments.is_empty());
    assert_eq!(changes.iter().filter(|c| c.op == Op::Snapshot).count(), 5);
    assert_eq!(changes.iter().filter(|c| c.op != Op::Snapshot).count(), 8);
    assert!(changes.iter().any(|c| {
        c.context
            .as_deref()
            .is_some_and(|j| j.contains("/orders/1/pay"))
    }));
    assert!(stdout.contains("public.orders"), "{stdout}");
    // The example queries ran on the archive alone: the diff shows order 2 deleted and the
    // changes view finds user 7's delete through its context.
    assert!(stdout.contains("| delete | 2   | new |"), "{stdout}");
    assert!(stdout.contains("/admin/orders/2"), "{stdout}");
    // It tells a newcomer where to look next: the page and the stream.
    assert!(stdout.contains("pgtrail serve --archive"), "{stdout}");
    assert!(stdout.contains("pgtrail tail --archive"), "{stdout}");
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}
