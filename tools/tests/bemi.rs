//! `pgtrail export --layout bemi`: Bemi's `changes` table kept in a PostgreSQL database from
//! the archive. The table has Bemi's columns and indexes; every change of the archive is one
//! row equal to the archive's own `changes` view; reruns add only what is new; an export
//! killed before its commit leaves nothing and is finished by the next; another archive is
//! refused.

use std::collections::BTreeMap;
use std::path::Path;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use serde_json::Value;

use crate::export::{capture_to, sql_json};
use crate::pgtrail;

const SOURCE_TABLES: &str = "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric(12,2), \
     tags text[], meta jsonb); \
     CREATE TABLE lines (order_id int, line int, qty int, PRIMARY KEY (order_id, line));";

/// Round `r`: changes with a context per statement (as Bemi's ORM triggers send it), a
/// transaction with two contexts, changes with none, a key update and a TRUNCATE.
fn round_sql(r: i32) -> String {
    format!(
        "BEGIN; \
         SELECT pg_logical_emit_message(true, '_bemi', '{{\"user_id\": {r}, \"endpoint\": \"/accounts\"}}'); \
         INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.5, ARRAY['a', 'b'], jsonb_build_object('n', g) \
           FROM generate_series({r} * 10 + 1, {r} * 10 + 10) g; \
         SELECT pg_logical_emit_message(true, '_bemi', '{{\"user_id\": {r}, \"endpoint\": \"/lines\"}}'); \
         INSERT INTO lines SELECT {r}, g, g FROM generate_series(1, 5) g; \
         COMMIT; \
         UPDATE accounts SET balance = balance + 1 WHERE id % 3 = 0; \
         DELETE FROM lines WHERE line = 2; \
         UPDATE accounts SET id = id + 1000 WHERE id = {r} * 10 + 5;"
    )
}

/// pgtrail's own `changes` view, one normalized line per change, keyed by (lsn, seq).
fn archive_rows(archive: &Path) -> BTreeMap<(i64, i64), String> {
    sql_json(
        archive,
        "SELECT lsn, seq, \"schema\", \"table\", operation, primary_key, before, after, context, \
         transaction_id, arrow_cast(committed_at, 'Int64') AS at_us FROM changes",
    )
    .into_iter()
    .map(|r| {
        let or_empty = |v: &Value| {
            if v.is_null() {
                serde_json::json!({})
            } else {
                v.clone()
            }
        };
        let line = serde_json::json!([
            r["schema"],
            r["table"],
            r["operation"],
            r["primary_key"],
            or_empty(&r["before"]),
            or_empty(&r["after"]),
            or_empty(&r["context"]),
            r["transaction_id"],
            r["at_us"],
        ]);
        (
            (r["lsn"].as_i64().unwrap(), r["seq"].as_i64().unwrap()),
            line.to_string(),
        )
    })
    .collect()
}

/// The Bemi table's rows in the same normalized form.
fn target_rows(cluster: &Cluster, db: &str, table: &str) -> BTreeMap<(i64, i64), String> {
    let json = cluster
        .psql(
            db,
            &format!(
                "SELECT coalesce(json_agg(json_build_array(position, pgtrail_seq, \"schema\", \"table\", \
                 operation, primary_key, before, after, context, transaction_id, \
                 (extract(epoch FROM committed_at) * 1000000)::bigint, queued_at)), '[]') FROM {table}"
            ),
        )
        .unwrap();
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    let mut out = BTreeMap::new();
    for r in rows {
        let r = r.as_array().unwrap();
        assert!(
            r[11].is_null(),
            "queued_at is unknown to the archive: {r:?}"
        );
        let line = serde_json::json!([r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10]]);
        let key = (r[0].as_i64().unwrap(), r[1].as_i64().unwrap());
        assert!(
            out.insert(key, line.to_string()).is_none(),
            "change {key:?} twice"
        );
    }
    out
}

/// The two sides hold the same changes; on failure, the first few that differ.
fn assert_same(got: &BTreeMap<(i64, i64), String>, expected: &BTreeMap<(i64, i64), String>) {
    let differ: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(k) != Some(v))
        .map(|(k, v)| format!("{k:?}: archive {v}, table {:?}", got.get(k)))
        .chain(
            got.keys()
                .filter(|k| !expected.contains_key(k))
                .map(|k| format!("{k:?}: only in the table")),
        )
        .take(3)
        .collect();
    assert!(
        differ.is_empty(),
        "{} rows, {} expected: {differ:#?}",
        got.len(),
        expected.len()
    );
}

fn export(
    archive: &Path,
    url: &str,
    extra: &[&str],
    crash_at: Option<&str>,
) -> std::process::Output {
    let mut cmd = pgtrail();
    cmd.args(["export", "--archive"])
        .arg(archive)
        .args(["--to", url, "--layout", "bemi", "--json"])
        .args(extra);
    if let Some(point) = crash_at {
        cmd.env("PGTRAIL_CRASH_AT", point);
    }
    cmd.output().unwrap()
}

fn export_ok(archive: &Path, url: &str, extra: &[&str]) -> Value {
    let out = export(archive, url, extra, None);
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_bemi_changes_table_holds_every_change_once_as_the_archive_does() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let src = "bemisrc";
    cluster.psql("postgres", "CREATE DATABASE bemisrc").unwrap();
    cluster.psql("postgres", "CREATE DATABASE bemitgt").unwrap();
    cluster.psql(src, SOURCE_TABLES).unwrap();
    cluster
        .psql(
            src,
            "INSERT INTO accounts VALUES (0, 'before capture', 0, NULL, NULL)",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    capture_to(&cluster, src, &archive);
    for r in 1..4 {
        cluster.psql(src, &round_sql(r)).unwrap();
    }
    capture_to(&cluster, src, &archive);
    let target = cluster.url("bemitgt");

    // Killed just before its commit: nothing is in the target.
    let killed = export(&archive, &target, &[], Some("bemi:before_commit"));
    assert!(
        !killed.status.success(),
        "the crash point stopped the export"
    );
    let none = cluster
        .psql("bemitgt", "SELECT count(*) FROM public.changes")
        .unwrap();
    assert_eq!(none, "0", "a run killed before its commit leaves no row");

    let first = export_ok(&archive, &target, &[]);
    let expected = archive_rows(&archive);
    assert_eq!(first["rows"].as_u64().unwrap() as usize, expected.len());
    assert_same(
        &target_rows(&cluster, "bemitgt", "public.changes"),
        &expected,
    );

    // Bemi's columns with its types, and its indexes.
    let columns = cluster
        .psql(
            "bemitgt",
            "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) \
             FROM pg_attribute WHERE attrelid = 'public.changes'::regclass AND attnum > 0 AND NOT attisdropped",
        )
        .unwrap();
    assert_eq!(
        columns,
        "id uuid, created_at timestamp with time zone, primary_key text, after jsonb, context jsonb, \
         database character varying(255), schema character varying(255), table character varying(255), \
         operation text, committed_at timestamp with time zone, queued_at timestamp with time zone, \
         transaction_id bigint, position bigint, before jsonb, pgtrail_seq bigint"
    );
    let indexes = cluster
        .psql(
            "bemitgt",
            "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'changes'",
        )
        .unwrap();
    assert_eq!(
        indexes,
        "changes_after_index,changes_before_index,changes_committed_at_index,changes_context_index,\
         changes_operation_index,changes_pkey,changes_position_pgtrail_seq_unique,\
         changes_primary_key_index,changes_table_index"
    );
    // Each statement's rows carry that statement's context (two in one transaction); a
    // change without one has Bemi's `{}`; the database is the source's; a snapshot row is
    // SNAPSHOT.
    let contexts = cluster
        .psql(
            "bemitgt",
            "SELECT string_agg(DISTINCT \"table\" || ':' || (context->>'endpoint'), ',' ORDER BY \"table\" || ':' || (context->>'endpoint')) FROM changes \
             WHERE operation = 'CREATE' AND context ? 'endpoint'",
        )
        .unwrap();
    assert_eq!(contexts, "accounts:/accounts,lines:/lines");
    let plain = cluster
        .psql(
            "bemitgt",
            "SELECT count(*) FILTER (WHERE context = '{}'), count(DISTINCT database), min(database), \
             count(*) FILTER (WHERE operation = 'SNAPSHOT') FROM changes WHERE operation <> 'CREATE'",
        )
        .unwrap();
    let plain: Vec<&str> = plain.split('|').collect();
    assert!(plain[0].parse::<u64>().unwrap() > 0, "{plain:?}");
    assert_eq!(&plain[1..], ["1", src, "1"]);
    // A Bemi-style lookup by primary key finds the row's history, newest first.
    let history = cluster
        .psql(
            "bemitgt",
            "SELECT string_agg(operation || ' ' || (after->>'balance'), ',' ORDER BY committed_at DESC, position DESC, pgtrail_seq DESC) \
             FROM changes WHERE \"table\" = 'accounts' AND primary_key = '12'",
        )
        .unwrap();
    assert_eq!(
        history,
        "UPDATE 21.00,UPDATE 20.00,UPDATE 19.00,CREATE 18.00"
    );

    // Reruns add exactly what is new.
    let again = export_ok(&archive, &target, &[]);
    assert_eq!(again["rows"], 0, "nothing new: {again}");
    for r in 4..6 {
        cluster.psql(src, &round_sql(r)).unwrap();
    }
    cluster.psql(src, "TRUNCATE lines").unwrap();
    capture_to(&cluster, src, &archive);
    let expected = archive_rows(&archive);
    let second = export_ok(&archive, &target, &[]);
    assert!(second["rows"].as_u64().unwrap() > 0);
    assert_eq!(
        first["rows"].as_u64().unwrap() + second["rows"].as_u64().unwrap(),
        expected.len() as u64
    );
    assert_same(
        &target_rows(&cluster, "bemitgt", "public.changes"),
        &expected,
    );
    assert_eq!(
        cluster
            .psql(
                "bemitgt",
                "SELECT count(*) FROM changes WHERE operation = 'TRUNCATE' AND before = '{}' AND primary_key IS NULL"
            )
            .unwrap(),
        "1"
    );

    // Into the source database itself, under another name: the same rows.
    let into_source = export_ok(
        &archive,
        &cluster.url(src),
        &["--bemi-table", "audit.bemi_changes"],
    );
    assert_eq!(
        into_source["rows"].as_u64().unwrap() as usize,
        expected.len()
    );
    assert_same(&target_rows(&cluster, src, "audit.bemi_changes"), &expected);

    // Another archive into the same table is refused; so is a layout that is not a table.
    cluster
        .psql("postgres", "CREATE DATABASE bemiother")
        .unwrap();
    cluster.psql("bemiother", SOURCE_TABLES).unwrap();
    cluster
        .psql(
            "bemiother",
            "INSERT INTO accounts VALUES (1, 'x', 1, NULL, NULL)",
        )
        .unwrap();
    let other = dir.path().join("other");
    capture_to(&cluster, "bemiother", &other);
    let out = export(&other, &target, &[], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("holds the changes of another archive"),
        "{stderr}"
    );
    let mut cmd = pgtrail();
    let out = cmd
        .args(["export", "--archive"])
        .arg(&archive)
        .args(["--to", &target, "--layout", "cdf"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--layout bemi"),
        "{stderr}"
    );
}
