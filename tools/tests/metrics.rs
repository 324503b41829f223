//! `pgtrail capture --metrics-listen`: the capture's Prometheus metrics against a real
//! PostgreSQL, compared with what the workload did and what the slot and `pgtrail status` say.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pgtrail_capture::cluster::Cluster;

use crate::serve::get;
use crate::{insert_lsn, pgtrail, wait_slot_active};

/// Prometheus text read strictly: every sample belongs to a metric declared by `# TYPE` (as
/// `gauge`, `counter` (its name ending in `_total`) or `histogram` (samples `_bucket`, `_sum`,
/// `_count`)) with a `# HELP`, and each value is a number. Samples by name (labels kept in
/// the name).
pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types = BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(matches!(kind, "gauge" | "counter" | "histogram"), "{line}");
            assert!(kind != "counter" || name.ends_with("_total"), "{line}");
            assert!(
                types.insert(name.to_string(), kind).is_none(),
                "declared twice: {line}"
            );
        } else {
            let (name, value) = line.rsplit_once(' ').unwrap();
            let base = name.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    base.strip_suffix(suffix)
                        .filter(|f| types.get(*f) == Some(&"histogram"))
                })
                .unwrap_or(base);
            assert!(types.contains_key(family), "no # TYPE for {line}");
            assert!(helped.contains(family), "no # HELP for {line}");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            assert!(value.is_finite() && value >= 0.0, "{line}");
            samples.insert(name.to_string(), value);
        }
    }
    samples
}

/// Capture with metrics on a port the system picks; its address from its stderr.
fn capture_with_metrics(url: &str, archive: &std::path::Path, slot: &str) -> (Child, SocketAddr) {
    let mut child = pgtrail()
        .args(["capture", "--slot", slot, "--publication", slot])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--compact-after-changes",
            "150",
        ])
        .args(["--compact-after-secs", "1"])
        .env("PGTRAIL_SOURCE", url)
        .env("PGTRAIL_ARCHIVE", archive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "capture ended before its metrics"
        );
        if let Some(rest) = line.trim().strip_prefix("capture: metrics at http://") {
            break rest.trim_end_matches("/metrics").parse().unwrap();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, addr)
}

fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let r = get(addr, "/metrics", &[]);
    assert_eq!(r.status, 200);
    parse(std::str::from_utf8(&r.body).unwrap())
}

/// Scrape until `done` holds of the metrics (they refresh each second).
fn scrape_until(
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = scrape(addr);
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "never {what}: {m:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lsn_number(text: &str) -> f64 {
    let (hi, lo) = text.split_once('/').unwrap();
    ((u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()) as f64
}

#[test]
fn capture_metrics_count_what_the_workload_did_and_show_reconnects_and_compaction() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("metrics").unwrap();
    cluster
        .psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let (mut capture, addr) = capture_with_metrics(&cluster.url(&db), &archive, &db);
    wait_slot_active(cluster, &db, &db, &mut capture);
    scrape_until(addr, "streaming", |m| m["pgtrail_capture_streaming"] == 1.0);

    // 100 transactions of 3 changes each.
    let mut sql = String::new();
    for i in 0..100 {
        sql.push_str(&format!(
            "BEGIN; INSERT INTO t VALUES ({i}, 0); UPDATE t SET v = 1 WHERE id = {i}; DELETE FROM t WHERE id = {i}; COMMIT;"
        ));
    }
    cluster.psql(&db, &sql).unwrap();
    let end = lsn_number(&insert_lsn(cluster, &db));
    let m = scrape_until(addr, "durable past the workload", |m| {
        m["pgtrail_capture_durable_lsn"] >= end
    });
    // The workload's 100, and the initial snapshot of t (empty), stored as one.
    assert_eq!(m["pgtrail_capture_transactions_total"], 101.0, "{m:#?}");
    assert_eq!(m["pgtrail_capture_changes_total"], 300.0, "{m:#?}");
    assert_eq!(m["pgtrail_capture_reconnects_total"], 0.0);
    // The slot never confirms past what the archive holds durably (both are past the
    // workload's end). The slot is read first and the archive's gauge scraped after it: the
    // capture may acknowledge more (a keepalive past the workload) between the two, and the
    // capture's own durable gauge moves only at its progress tick (a CI run caught the slot
    // 112 bytes past a gauge scraped before it).
    let confirmed = lsn_number(
        &cluster
            .psql(
                &db,
                &format!(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{db}'"
                ),
            )
            .unwrap(),
    );
    let after = scrape(addr);
    assert!(
        confirmed <= after["pgtrail_archive_durable_lsn"] && confirmed >= end,
        "{confirmed} {after:#?}"
    );

    // Compaction runs (more than 150 changes in the log): its counters and the archive's
    // gauges agree with each other and with `pgtrail status`.
    // (A run's counters move when it returns, after the derived files it writes once its
    // segments are listed and the log is trimmed: the wait is for both.)
    let m = scrape_until(addr, "compacted", |m| {
        m["pgtrail_capture_compactions_total"] >= 1.0
            && m["pgtrail_archive_log_changes"] == 0.0
            && m["pgtrail_capture_compacted_changes_total"] >= 300.0
    });
    assert_eq!(
        m["pgtrail_capture_compacted_changes_total"], 300.0,
        "{m:#?}"
    );
    assert_eq!(m["pgtrail_archive_changes"], 300.0, "{m:#?}");
    // A run listed segments under the write lock; its hold is reported (some time, well
    // under the minute a stall would be).
    let lock = m["pgtrail_capture_compaction_lock_longest_seconds"];
    assert!(lock > 0.0 && lock < 60.0, "{m:#?}");
    assert!(m["pgtrail_archive_segments"] >= 1.0 && m["pgtrail_archive_segment_bytes"] > 0.0);
    let status = pgtrail()
        .args(["status", "--format", "json", "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["changes"].as_f64(),
        Some(m["pgtrail_archive_changes"])
    );
    assert_eq!(
        status["segments"]["bytes"].as_f64(),
        Some(m["pgtrail_archive_segment_bytes"])
    );
    assert_eq!(m["pgtrail_capture_lag_seconds"], 0.0, "caught up: {m:#?}");

    // The walsender is killed: one reconnect, and streaming again.
    cluster
        .psql(&db, &format!("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{db}'"))
        .unwrap();
    let m = scrape_until(addr, "reconnected", |m| {
        m["pgtrail_capture_reconnects_total"] == 1.0 && m["pgtrail_capture_streaming"] == 1.0
    });
    assert!(m["pgtrail_capture_progress_age_seconds"] < 60.0, "{m:#?}");
    // Anything but /metrics is a JSON 404.
    assert_eq!(get(addr, "/api/tables", &[]).status, 404);
    let _ = capture.kill();
    let _ = capture.wait();
}
