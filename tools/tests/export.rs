//! `pgtrail export` to a directory and to a real S3-compatible server (moto), read back by
//! DuckDB and pyarrow as lake users read it: every layout; scd2 and snapshot equal pgtrail's
//! own as_of at several moments; reruns add only new changes; an export killed mid-way and
//! rerun holds every change exactly once; bad destinations fail clearly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use serde_json::Value;

use crate::{pgtrail, walk};

pub(crate) const TABLES: &str = "CREATE TABLE acct (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12,2), \
     opened timestamptz, active bool, note text); \
     CREATE TABLE audit_free (k text, v int); ALTER TABLE audit_free REPLICA IDENTITY FULL;";

/// Round `r` of the workload: inserts, updates (some of the key), deletes, application
/// context, and a TRUNCATE of the keyless table in round 3.
pub(crate) fn round_sql(r: u32) -> String {
    let base = r * 40;
    let mut sql = format!(
        "BEGIN; SELECT pg_logical_emit_message(true, '_bemi', '{{\"round\": {r}}}'); \
         INSERT INTO acct SELECT g, 'owner ' || g, g * 1.25, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 hour', g % 2 = 0, NULL \
         FROM generate_series({base} + 1, {base} + 40) g; \
         UPDATE acct SET balance = balance + 10, note = 'round {r}' WHERE id % 3 = {m}; \
         DELETE FROM acct WHERE id % 7 = {m} AND id <= {base}; \
         UPDATE acct SET id = id + 100000 WHERE id = {base} + 5; \
         INSERT INTO audit_free SELECT 'k' || (g % 5), g FROM generate_series(1, 10) g; \
         UPDATE audit_free SET v = v + 1 WHERE v = 3; COMMIT;",
        m = r % 3
    );
    if r == 3 {
        sql.push_str(" TRUNCATE audit_free;");
    }
    sql
}

pub(crate) fn lake(args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lake_check {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) fn lake_tools_present() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import duckdb, pyarrow, boto3, moto, pyiceberg"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("PGTRAIL_REQUIRE_LAKE_TOOLS").is_none(),
            "duckdb, pyarrow, moto[server] and pyiceberg are required here: pip install duckdb pyarrow 'moto[server]' 'pyiceberg[sql-sqlite,pyarrow]'"
        );
        eprintln!(
            "note: duckdb/pyarrow/moto/pyiceberg are not installed; the export test was skipped"
        );
    }
    ok
}

pub(crate) struct Moto {
    child: Child,
    pub(crate) endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto's S3 server");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Moto { child, endpoint }
}

pub(crate) fn export(
    archive: &Path,
    to: &str,
    layout: &str,
    extra: &[&str],
    moto: &Moto,
    crash_at: Option<&str>,
) -> std::process::Output {
    let mut cmd = pgtrail();
    cmd.args(["export", "--archive"])
        .arg(archive)
        .args(["--to", to, "--layout", layout, "--json"])
        .args(extra);
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", &moto.endpoint);
    if let Some(point) = crash_at {
        cmd.env("PGTRAIL_CRASH_AT", point);
    }
    cmd.output().unwrap()
}

pub(crate) fn export_ok(
    archive: &Path,
    to: &str,
    layout: &str,
    extra: &[&str],
    moto: &Moto,
) -> Value {
    let out = export(archive, to, layout, extra, moto, None);
    assert!(
        out.status.success(),
        "export {layout} to {to} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) fn sql_to_parquet(archive: &Path, sql: &str, out: &Path) {
    let status = pgtrail()
        .args(["sql", "--archive"])
        .arg(archive)
        .args(["--format", "parquet", "--output"])
        .arg(out)
        .arg(sql)
        .status()
        .unwrap();
    assert!(status.success(), "{sql}");
}

pub(crate) fn sql_json(archive: &Path, sql: &str) -> Vec<Value> {
    let out = pgtrail()
        .args(["sql", "--archive"])
        .arg(archive)
        .args(["--format", "json", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub(crate) fn capture_to(cluster: &Cluster, db: &str, archive: &Path) {
    let lsn = cluster
        .psql(db, "SELECT pg_current_wal_insert_lsn()")
        .unwrap();
    let status = pgtrail()
        .args([
            "capture",
            "--slot",
            db,
            "--publication",
            db,
            "--no-compact",
            "--stop-at",
            &lsn,
        ])
        .env("PGTRAIL_SOURCE", cluster.url(db))
        .env("PGTRAIL_ARCHIVE", archive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Per table: (changes, by operation) as the archive holds them.
pub(crate) fn archive_counts(archive: &Path) -> BTreeMap<String, (u64, BTreeMap<String, u64>)> {
    let mut out: BTreeMap<String, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for row in sql_json(
        archive,
        r#"SELECT "schema", "table", operation, count(*) AS n FROM changes GROUP BY 1, 2, 3"#,
    ) {
        let table = format!(
            "{}.{}",
            row["schema"].as_str().unwrap(),
            row["table"].as_str().unwrap()
        );
        let e = out.entry(table).or_default();
        let n = row["n"].as_u64().unwrap();
        e.0 += n;
        e.1.insert(row["operation"].as_str().unwrap().to_string(), n);
    }
    out
}

/// The local copy of a destination (S3 is downloaded first).
pub(crate) fn local_view(to: &str, moto: &Moto, scratch: &Path) -> PathBuf {
    match to.strip_prefix("s3://") {
        None => PathBuf::from(to),
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap();
            let dir = scratch.join(format!(
                "s3-copy-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            lake(&[
                "download",
                &moto.endpoint,
                bucket,
                prefix,
                dir.to_str().unwrap(),
            ]);
            dir
        }
    }
}

fn check_exactly_once(to: &str, layout: &str, moto: &Moto, scratch: &Path, archive: &Path) {
    let view = local_view(to, moto, scratch);
    let counts = lake(&["counts", view.to_str().unwrap(), layout]);
    assert_counts(&counts, to, layout, archive);
}

/// `counts` (per table: rows, distinct change keys, cdf change types, as a lake reader found
/// them at `to`) hold every change of the archive exactly once.
pub(crate) fn assert_counts(counts: &Value, to: &str, layout: &str, archive: &Path) {
    let expected = archive_counts(archive);
    for (table, (changes, ops)) in &expected {
        let got = &counts[table.as_str()];
        let op = |o: &str| ops.get(o).copied().unwrap_or(0);
        match layout {
            "changes" => {
                assert_eq!(
                    got["rows"].as_u64(),
                    Some(*changes),
                    "{to} {table}: every change once"
                );
                assert_eq!(
                    got["distinct"].as_u64(),
                    Some(*changes),
                    "{to} {table}: no duplicate (lsn, seq)"
                );
            }
            "cdf" => {
                let types = &got["types"];
                assert_eq!(
                    types["insert"].as_u64().unwrap_or(0),
                    op("CREATE") + op("SNAPSHOT"),
                    "{to} {table}: inserts"
                );
                assert_eq!(
                    types["update_preimage"].as_u64().unwrap_or(0),
                    op("UPDATE"),
                    "{to} {table}: preimages"
                );
                assert_eq!(
                    types["update_postimage"].as_u64().unwrap_or(0),
                    op("UPDATE"),
                    "{to} {table}: postimages"
                );
                assert!(
                    types["delete"].as_u64().unwrap_or(0) >= op("DELETE"),
                    "{to} {table}: deletes (a TRUNCATE adds one per row)"
                );
                // A keyless table may hold identical rows (a TRUNCATE deletes each); keyed rows
                // never repeat.
                if table == "public.acct" {
                    assert_eq!(
                        got["rows"], got["distinct"],
                        "{to} {table}: no duplicate change rows"
                    );
                }
            }
            _ => {}
        }
    }
}

#[test]
fn export_layouts_to_a_directory_and_s3_are_exact_incremental_and_exactly_once() {
    if !lake_tools_present() {
        return;
    }
    let moto = start_moto();
    lake(&["mkbucket", &moto.endpoint, "lake"]);
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let db = "exp";
    cluster.psql("postgres", "CREATE DATABASE exp").unwrap();
    cluster.psql(db, TABLES).unwrap();
    cluster
        .psql(
            db,
            "INSERT INTO acct VALUES (-1, 'before capture', 0, now(), true, 'snapshot row')",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let local = dir.path().join("lake");
    let local_to = local.to_str().unwrap().to_string();
    let destinations = [local_to.clone(), "s3://lake/exports".to_string()];
    let layouts = ["changes", "cdf", "scd2", "snapshot"];

    // (lsn, time) after each round.
    let mut moments: Vec<(String, String)> = Vec::new();
    let run_rounds = |rounds: std::ops::Range<u32>, moments: &mut Vec<(String, String)>| {
        for r in rounds {
            cluster.psql(db, &round_sql(r)).unwrap();
            let lsn = cluster
                .psql(db, "SELECT pg_current_wal_lsn() - '0/0'")
                .unwrap();
            let at = cluster.psql(db, "SELECT clock_timestamp()::text").unwrap();
            moments.push((lsn, at));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The initial snapshot holds the row written before capture; the rounds are streamed.
    capture_to(&cluster, db, &archive);
    run_rounds(0..3, &mut moments);
    capture_to(&cluster, db, &archive);
    assert!(
        pgtrail()
            .args(["compact", "--archive"])
            .arg(&archive)
            .status()
            .unwrap()
            .success()
    );
    run_rounds(3..5, &mut moments);
    capture_to(&cluster, db, &archive);

    // First export of every layout to both destinations (one prefix per layout); the changes
    // layout to the directory is killed after its first file and rerun.
    let local_changes = format!("{local_to}/changes");
    let killed = export(
        &archive,
        &local_changes,
        "changes",
        &["--max-rows-per-file", "50"],
        &moto,
        Some("export:after_file"),
    );
    assert!(
        !killed.status.success(),
        "the crash point stopped the export"
    );
    assert!(
        local.join("changes/_pgtrail_export/changes.json").exists(),
        "the run was recorded before the first file"
    );
    let resumed = export_ok(
        &archive,
        &local_changes,
        "changes",
        &["--max-rows-per-file", "50"],
        &moto,
    );
    assert_eq!(
        resumed["resumed"], true,
        "the rerun finished the interrupted run first"
    );
    for base in &destinations {
        for layout in layouts {
            if !(base == &local_to && layout == "changes") {
                export_ok(&archive, &format!("{base}/{layout}"), layout, &[], &moto);
            }
        }
    }
    for base in &destinations {
        check_exactly_once(
            &format!("{base}/changes"),
            "changes",
            &moto,
            dir.path(),
            &archive,
        );
        check_exactly_once(&format!("{base}/cdf"), "cdf", &moto, dir.path(), &archive);
    }

    // Iceberg tools register the plain layouts as they are: pyiceberg's add_files over each
    // table's files (no rewrite) gives a table with every exported row.
    for layout in layouts {
        let to = format!("{local_to}/{layout}");
        let counts = lake(&["counts", &to, layout]);
        let warehouse = dir.path().join(format!("iceberg-{layout}"));
        let iceberg = lake(&["iceberg", &to, layout, warehouse.to_str().unwrap()]);
        let tables = iceberg.as_object().unwrap();
        assert!(tables.len() >= 2, "{iceberg}");
        for (table, rows) in tables {
            assert_eq!(
                Some(rows),
                counts[table.as_str()].get("rows"),
                "{layout} {table} through Iceberg"
            );
        }
    }

    // More changes (in the log tail this time), then incremental exports: only new rows.
    run_rounds(5..7, &mut moments);
    capture_to(&cluster, db, &archive);
    let before: Vec<PathBuf> = walk(&local);
    let killed = export(
        &archive,
        &format!("{local_to}/scd2"),
        "scd2",
        &[],
        &moto,
        Some("export:after_file"),
    );
    assert!(!killed.status.success());
    for base in &destinations {
        for layout in layouts {
            let to = format!("{base}/{layout}");
            let report = export_ok(&archive, &to, layout, &[], &moto);
            assert_eq!(
                report["resumed"],
                base == &local_to && layout == "scd2",
                "{to}: only the killed export resumes"
            );
            let rows: u64 = report["tables"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["rows"].as_u64().unwrap())
                .sum();
            if layout == "changes" {
                let all = archive_counts(&archive).values().map(|c| c.0).sum::<u64>();
                assert!(
                    rows > 0 && rows < all,
                    "{to}: the second export holds only the new changes ({rows} of {all})"
                );
            }
        }
        check_exactly_once(
            &format!("{base}/changes"),
            "changes",
            &moto,
            dir.path(),
            &archive,
        );
        check_exactly_once(&format!("{base}/cdf"), "cdf", &moto, dir.path(), &archive);
        let again = export_ok(&archive, &format!("{base}/changes"), "changes", &[], &moto);
        assert!(
            again["tables"].as_array().unwrap().is_empty(),
            "{base}: nothing new the third time"
        );
    }
    let after = walk(&local);
    for file in before.iter().filter(|f| {
        !f.to_string_lossy().contains("state=current")
            && !f.to_string_lossy().contains("_pgtrail_export")
    }) {
        assert!(
            after.contains(file),
            "{} was kept: reruns append, they do not rewrite history files",
            file.display()
        );
    }

    // scd2 at every moment, by LSN and by time, equals pgtrail's own as_of; the latest
    // snapshot equals as_of at the end.
    for base in &destinations {
        let scd2 = local_view(&format!("{base}/scd2"), &moto, dir.path());
        let snapshot = local_view(&format!("{base}/snapshot"), &moto, dir.path());
        for table in ["public.acct", "public.audit_free"] {
            for (i, (lsn, at)) in moments.iter().enumerate() {
                let expected = dir.path().join(format!("asof-{i}.parquet"));
                sql_to_parquet(
                    &archive,
                    &format!("SELECT * FROM as_of_lsn('{table}', {lsn})"),
                    &expected,
                );
                let v = lake(&[
                    "asof",
                    scd2.to_str().unwrap(),
                    "scd2",
                    table,
                    lsn,
                    expected.to_str().unwrap(),
                ]);
                assert_eq!(v["equal"], true, "{base} {table} scd2 at LSN {lsn}: {v}");
                if i % 3 == 0 {
                    let v = lake(&[
                        "asof",
                        scd2.to_str().unwrap(),
                        "scd2",
                        table,
                        at,
                        expected.to_str().unwrap(),
                    ]);
                    assert_eq!(v["equal"], true, "{base} {table} scd2 at {at}: {v}");
                }
            }
            let expected = dir.path().join("asof-end.parquet");
            sql_to_parquet(
                &archive,
                &format!(
                    "SELECT * FROM as_of_lsn('{table}', {})",
                    moments.last().unwrap().0
                ),
                &expected,
            );
            let v = lake(&[
                "asof",
                snapshot.to_str().unwrap(),
                "snapshot",
                table,
                "latest",
                expected.to_str().unwrap(),
            ]);
            assert_eq!(v["equal"], true, "{base} {table} snapshot: {v}");
            if table == "public.acct" {
                assert!(v["rows"].as_u64().unwrap() > 100, "a real table: {v}");
            }
        }
    }

    // Bad destinations and credentials fail clearly.
    let fail = |to: &str, env: &[(&str, &str)], clear: bool| -> String {
        let mut cmd = pgtrail();
        cmd.args(["export", "--archive"])
            .arg(&archive)
            .args(["--to", to, "--layout", "changes"]);
        if clear {
            for k in [
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL",
                "AWS_REGION",
            ] {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "export to {to} must fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(fail("ftp://host/x", &[], false).contains("not supported"));
    assert!(fail("s3://lake/x", &[], true).contains("no S3 credentials"));
    let started = Instant::now();
    let unreachable = fail(
        "s3://lake/x",
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ],
        true,
    );
    assert!(
        unreachable.contains("cannot read _pgtrail_export/changes.json"),
        "{unreachable}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "an unreachable endpoint fails in bounded time"
    );
    // Another archive into the same destination is refused, not mixed in.
    cluster
        .psql("postgres", "CREATE DATABASE exp_other")
        .unwrap();
    cluster.psql("exp_other", TABLES).unwrap();
    cluster
        .psql(
            "exp_other",
            "INSERT INTO acct VALUES (1, 'x', 1, now(), true, NULL)",
        )
        .unwrap();
    let other = dir.path().join("other-archive");
    capture_to(&cluster, "exp_other", &other);
    let mut cmd = pgtrail();
    let out = cmd
        .args(["export", "--archive"])
        .arg(&other)
        .args(["--to", &local_changes, "--layout", "changes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("export of another archive"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    assert!(fail(file.to_str().unwrap(), &[], false).contains("not a directory"));
}

/// After a gap and `--resnapshot`, the new snapshot is the whole state: rows deleted while the
/// archive could not see must be gone from as_of after it, from the scd2 export's versions
/// valid then and from the snapshot export, while moments before the gap keep their rows.
#[test]
fn a_resnapshot_after_a_gap_starts_each_table_afresh_in_as_of_and_exports() {
    if !lake_tools_present() {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let db = "exp_gap";
    cluster.psql("postgres", "CREATE DATABASE exp_gap").unwrap();
    cluster.psql(db, TABLES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    cluster.psql(db, &round_sql(1)).unwrap();
    capture_to(&cluster, db, &archive);
    let before_gap = cluster
        .psql(db, "SELECT pg_current_wal_lsn() - '0/0'")
        .unwrap();
    let rows_before_gap = cluster.psql(db, "SELECT count(*) FROM acct").unwrap();
    // The slot is lost while rows are deleted (and the keyless table emptied): a gap.
    cluster
        .psql(db, "SELECT pg_drop_replication_slot('exp_gap')")
        .unwrap();
    cluster.psql(db, "DELETE FROM acct WHERE id % 2 = 0; DELETE FROM audit_free; UPDATE acct SET note = 'in the gap'").unwrap();
    let run = |extra: &[&str]| {
        let lsn = cluster
            .psql(db, "SELECT pg_current_wal_insert_lsn()")
            .unwrap();
        pgtrail()
            .args([
                "capture",
                "--slot",
                db,
                "--publication",
                db,
                "--no-compact",
                "--stop-at",
                &lsn,
            ])
            .args(extra)
            .env("PGTRAIL_SOURCE", cluster.url(db))
            .env("PGTRAIL_ARCHIVE", &archive)
            .output()
            .unwrap()
    };
    let gap = run(&[]);
    assert!(
        !gap.status.success()
            && String::from_utf8_lossy(&gap.stderr).contains("gap in the archive")
    );
    assert!(run(&["--resnapshot"]).status.success());
    cluster.psql(db, &round_sql(2)).unwrap();
    assert!(run(&[]).status.success());
    let end = cluster
        .psql(db, "SELECT pg_current_wal_lsn() - '0/0'")
        .unwrap();

    let pg: Vec<Value> = serde_json::from_str(
        &cluster
            .psql(
                db,
                "SELECT coalesce(json_agg(json_build_array(id, note) ORDER BY id), '[]') FROM acct",
            )
            .unwrap(),
    )
    .unwrap();
    let archived: Vec<Value> = sql_json(
        &archive,
        &format!("SELECT id, note FROM as_of_lsn('public.acct', {end}) ORDER BY id"),
    )
    .into_iter()
    .map(|r| serde_json::json!([r["id"], r["note"]]))
    .collect();
    assert_eq!(
        archived, pg,
        "as_of after the re-snapshot equals PostgreSQL"
    );
    let empty = sql_json(
        &archive,
        &format!("SELECT count(*) AS n FROM as_of_lsn('public.audit_free', {end})"),
    );
    let in_pg: u64 = cluster
        .psql(db, "SELECT count(*) FROM audit_free")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        empty[0]["n"].as_u64(),
        Some(in_pg),
        "a table emptied in the gap is empty after the re-snapshot"
    );
    let old = sql_json(
        &archive,
        &format!("SELECT count(*) AS n FROM as_of_lsn('public.acct', {before_gap})"),
    );
    assert_eq!(
        old[0]["n"].to_string(),
        rows_before_gap,
        "before the gap the archive still shows what it saw"
    );

    // The lake layouts agree with as_of at both moments.
    let lake_dir = dir.path().join("lake");
    for layout in ["scd2", "snapshot"] {
        let out = pgtrail()
            .args(["export", "--archive"])
            .arg(&archive)
            .args([
                "--to",
                lake_dir.join(layout).to_str().unwrap(),
                "--layout",
                layout,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "export {layout}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for table in ["public.acct", "public.audit_free"] {
        for (i, lsn) in [&before_gap, &end].into_iter().enumerate() {
            let expected = dir.path().join(format!("expected-{i}.parquet"));
            sql_to_parquet(
                &archive,
                &format!("SELECT * FROM as_of_lsn('{table}', {lsn})"),
                &expected,
            );
            let v = lake(&[
                "asof",
                lake_dir.join("scd2").to_str().unwrap(),
                "scd2",
                table,
                lsn,
                expected.to_str().unwrap(),
            ]);
            assert_eq!(v["equal"], true, "{table} scd2 at {lsn}: {v}");
        }
        let expected = dir.path().join("expected-end.parquet");
        sql_to_parquet(
            &archive,
            &format!("SELECT * FROM as_of_lsn('{table}', {end})"),
            &expected,
        );
        let v = lake(&[
            "asof",
            lake_dir.join("snapshot").to_str().unwrap(),
            "snapshot",
            table,
            "latest",
            expected.to_str().unwrap(),
        ]);
        assert_eq!(v["equal"], true, "{table} snapshot: {v}");
    }
}
