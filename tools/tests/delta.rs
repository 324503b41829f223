//! `pgtrail export --table-format delta`, to a directory and to a real S3-compatible server
//! (moto), read back by Delta readers pgtrail did not write: delta-rs's Python package and
//! DuckDB's delta extension. Every layout holds every change exactly once through the Delta
//! log; an export killed before and after a table's commit commits each run once; a column
//! added in the source becomes a schema change; scd2 and snapshot equal pgtrail's own as_of,
//! now and (time travel) at an older table version; a retyped column is refused clearly.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use serde_json::Value;

use crate::export::{
    Moto, TABLES, assert_counts, capture_to, export, export_ok, lake, lake_tools_present,
    local_view, round_sql, sql_to_parquet, start_moto,
};

const KINDS: &str = "CREATE TABLE kinds (id int PRIMARY KEY, t time, u uuid, ts timestamp, \
     iv interval, j jsonb, tags text[]);";

fn kinds_sql(r: u32) -> String {
    format!(
        "INSERT INTO kinds SELECT g, time '08:00' + g * interval '1 minute 0.25 second', \
         md5(g::text)::uuid, timestamp '2026-03-01 10:00:00.125' + g * interval '1 day', \
         g * interval '1 hour', jsonb_build_object('g', g), ARRAY['a' || g, NULL] \
         FROM generate_series({0} * 10 + 1, {0} * 10 + 10) g; \
         UPDATE kinds SET t = NULL, u = NULL WHERE id = {0} * 10 + 1;",
        r
    )
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/delta_check.py")
}

/// The DuckDB 1.5.5 with its delta extension (a directory for PYTHONPATH), when installed as
/// `.ci/run` installs it; `None` (the test skipped) only where it is not required.
fn delta_readers() -> Option<PathBuf> {
    let duckdb = std::env::var_os("PGTRAIL_DELTA_DUCKDB")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/delta-duckdb"));
    let deltalake = Command::new("python3")
        .args(["-c", "import deltalake"])
        .status()
        .is_ok_and(|s| s.success());
    let extension = Command::new("python3")
        .args(["-c", "import duckdb, duckdb_extension_delta"])
        .env("PYTHONPATH", &duckdb)
        .status()
        .is_ok_and(|s| s.success());
    if deltalake && extension {
        return Some(duckdb);
    }
    assert!(
        std::env::var_os("PGTRAIL_REQUIRE_DELTA_READERS").is_none(),
        "the Delta readers are required here: pip install deltalake==1.6.6, and pip install --target target/delta-duckdb duckdb==1.5.5 duckdb-extension-delta==1.5.5"
    );
    eprintln!(
        "note: deltalake or DuckDB's delta extension is not installed; the Delta test was skipped"
    );
    None
}

/// `delta_check.py args…` (delta-rs; with `duckdb`, DuckDB's delta extension on the path).
fn delta(args: &[&str], moto: &Moto, duckdb: Option<&Path>) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(script())
        .args(args)
        .env("AWS_ENDPOINT_URL", &moto.endpoint);
    if let Some(dir) = duckdb {
        cmd.env("PYTHONPATH", dir);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "delta_check {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "delta_check {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const DELTA: &[&str] = &["--table-format", "delta"];

#[test]
fn delta_exports_are_tables_that_delta_readers_read_exactly_once_with_history() {
    if !lake_tools_present() {
        return;
    }
    let Some(duckdb) = delta_readers() else {
        return;
    };
    let moto = start_moto();
    lake(&["mkbucket", &moto.endpoint, "lake"]);
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let db = "dlt";
    cluster.psql("postgres", "CREATE DATABASE dlt").unwrap();
    cluster.psql(db, &format!("{TABLES} {KINDS}")).unwrap();
    cluster
        .psql(
            db,
            "INSERT INTO acct VALUES (-1, 'before capture', 0, now(), true, 'snapshot row')",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let local = dir.path().join("lake").to_str().unwrap().to_string();
    let bases = [local.clone(), "s3://lake/delta".to_string()];
    let layouts = ["changes", "cdf", "scd2", "snapshot"];
    let mut lsns: Vec<String> = Vec::new();
    let run_rounds = |rounds: std::ops::Range<u32>, lsns: &mut Vec<String>| {
        for r in rounds {
            cluster
                .psql(db, &format!("{} {}", round_sql(r), kinds_sql(r)))
                .unwrap();
            lsns.push(
                cluster
                    .psql(db, "SELECT pg_current_wal_lsn() - '0/0'")
                    .unwrap(),
            );
        }
    };
    capture_to(&cluster, db, &archive);
    run_rounds(0..3, &mut lsns);
    capture_to(&cluster, db, &archive);

    // First exports. The directory's cdf export is killed right after its first table's
    // Delta commit (before the export's own state records it), its scd2 export just before
    // one; each rerun finishes the run, committing every table exactly once.
    let killed = export(
        &archive,
        &format!("{local}/cdf"),
        "cdf",
        DELTA,
        &moto,
        Some("delta:after_commit"),
    );
    assert!(
        !killed.status.success(),
        "the crash point stopped the export"
    );
    let killed = export(
        &archive,
        &format!("{local}/scd2"),
        "scd2",
        DELTA,
        &moto,
        Some("delta:before_commit"),
    );
    assert!(
        !killed.status.success(),
        "the crash point stopped the export"
    );
    for base in &bases {
        for layout in layouts {
            let report = export_ok(&archive, &format!("{base}/{layout}"), layout, DELTA, &moto);
            assert_eq!(
                report["resumed"],
                base == &local && (layout == "cdf" || layout == "scd2"),
                "{base}/{layout}: only the killed exports resume"
            );
        }
    }
    for base in &bases {
        for layout in ["changes", "cdf"] {
            let to = format!("{base}/{layout}");
            let counts = delta(&["counts", &to, layout], &moto, None);
            assert_counts(&counts, &to, layout, &archive);
        }
        let tables = delta(&["tables", &format!("{base}/cdf")], &moto, None);
        for table in ["public.acct", "public.audit_free", "public.kinds"] {
            let t = &tables[table];
            assert_eq!(t["version"], 0, "{base} {table}: one commit per run: {t}");
            assert_eq!(t["append_only"], "true", "{t}");
            assert_eq!(t["partition_columns"], serde_json::json!(["_commit_date"]));
        }
    }
    // The values Delta has no type for are PostgreSQL's own text.
    let expected_kinds = cluster
        .psql(
            db,
            "SELECT string_agg(concat_ws('|', id, coalesce(t::text, '-'), coalesce(u::text, '-'), \
             to_char(ts, 'YYYY-MM-DD HH24:MI:SS.US')), ',' ORDER BY id) FROM kinds",
        )
        .unwrap();
    for base in &bases {
        let rows = delta(
            &["rows", &format!("{base}/snapshot"), "public.kinds"],
            &moto,
            None,
        );
        let mut got: Vec<(i64, String)> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let text = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                (
                    r["id"].as_i64().unwrap(),
                    format!(
                        "{}|{}|{}|{}",
                        r["id"],
                        text("t"),
                        text("u"),
                        text("ts").replace('T', " ")
                    ),
                )
            })
            .collect();
        got.sort();
        let got: Vec<String> = got.into_iter().map(|(_, s)| s).collect();
        assert_eq!(got.join(","), expected_kinds, "{base}: kinds as text");
    }

    // A column added in the source, and more rounds: the next run is a second version with
    // the grown schema.
    cluster
        .psql(
            db,
            "ALTER TABLE acct ADD COLUMN region text; UPDATE acct SET region = 'eu' WHERE id % 2 = 0;",
        )
        .unwrap();
    let first_export_lsn = lsns.last().unwrap().clone();
    run_rounds(3..5, &mut lsns);
    capture_to(&cluster, db, &archive);
    for base in &bases {
        for layout in layouts {
            let report = export_ok(&archive, &format!("{base}/{layout}"), layout, DELTA, &moto);
            assert_eq!(report["resumed"], false);
        }
        for layout in ["changes", "cdf"] {
            let to = format!("{base}/{layout}");
            let counts = delta(&["counts", &to, layout], &moto, None);
            assert_counts(&counts, &to, layout, &archive);
        }
        let tables = delta(&["tables", &format!("{base}/cdf")], &moto, None);
        let acct = &tables["public.acct"];
        assert_eq!(acct["version"], 1, "{base}: a second commit: {acct}");
        assert!(
            acct["columns"]
                .as_array()
                .unwrap()
                .contains(&Value::from("region")),
            "{base}: the added column is in the Delta schema: {acct}"
        );
        let scd2 = delta(&["tables", &format!("{base}/scd2")], &moto, None);
        assert_eq!(scd2["public.acct"]["append_only"], Value::Null);
    }

    // scd2 at every moment and the newest snapshot, read by DuckDB's delta_scan, equal
    // pgtrail's own as_of; delta-rs at scd2's version 0 (time travel) holds as current the
    // rows as of the first export.
    for base in &bases {
        let scd2 = local_view(&format!("{base}/scd2"), &moto, dir.path());
        let snapshot = local_view(&format!("{base}/snapshot"), &moto, dir.path());
        for table in ["public.acct", "public.audit_free"] {
            for (i, lsn) in lsns.iter().enumerate() {
                let expected = dir.path().join(format!("asof-{i}.parquet"));
                sql_to_parquet(
                    &archive,
                    &format!("SELECT * FROM as_of_lsn('{table}', {lsn})"),
                    &expected,
                );
                let v = delta(
                    &[
                        "asof",
                        scd2.to_str().unwrap(),
                        "scd2",
                        table,
                        lsn,
                        expected.to_str().unwrap(),
                    ],
                    &moto,
                    Some(&duckdb),
                );
                assert_eq!(v["equal"], true, "{base} {table} scd2 at LSN {lsn}: {v}");
            }
            let expected = dir.path().join("asof-first.parquet");
            sql_to_parquet(
                &archive,
                &format!("SELECT * FROM as_of_lsn('{table}', {first_export_lsn})"),
                &expected,
            );
            let v = delta(
                &[
                    "asof",
                    &format!("{base}/scd2"),
                    "scd2",
                    table,
                    "version",
                    expected.to_str().unwrap(),
                    "0",
                ],
                &moto,
                None,
            );
            assert_eq!(v["equal"], true, "{base} {table} scd2 version 0: {v}");
            let expected = dir.path().join("asof-end.parquet");
            sql_to_parquet(
                &archive,
                &format!(
                    "SELECT * FROM as_of_lsn('{table}', {})",
                    lsns.last().unwrap()
                ),
                &expected,
            );
            let v = delta(
                &[
                    "asof",
                    snapshot.to_str().unwrap(),
                    "snapshot",
                    table,
                    "latest",
                    expected.to_str().unwrap(),
                ],
                &moto,
                Some(&duckdb),
            );
            assert_eq!(v["equal"], true, "{base} {table} snapshot: {v}");
            if table == "public.acct" {
                assert!(v["rows"].as_u64().unwrap() > 100, "a real table: {v}");
            }
        }
    }

    // A plain export into a Delta export's prefix is refused, not mixed in.
    let out = export(&archive, &format!("{local}/cdf"), "cdf", &[], &moto, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("holds a delta cdf export"),
        "{stderr}"
    );

    // A column retyped to another Delta type cannot be a Delta schema change: refused, naming
    // the column, and the table's log is left as it was. (time to text is no change here:
    // Delta has no time type, so the column was text in Delta from the start.)
    cluster
        .psql(
            db,
            "ALTER TABLE kinds ALTER COLUMN iv TYPE text; UPDATE kinds SET iv = 'late' WHERE id = 2;",
        )
        .unwrap();
    capture_to(&cluster, db, &archive);
    let out = export(&archive, &format!("{local}/cdf"), "cdf", DELTA, &moto, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("public.kinds")
            && stderr.contains("column iv changed type"),
        "{stderr}"
    );
    let tables = delta(&["tables", &format!("{local}/cdf")], &moto, None);
    assert_eq!(tables["public.kinds"]["version"], 1, "{tables}");
}
