//! Application context as Bemi's ORM packages send it: their trigger emits the statement's
//! context once per row, so a 10 kB context on a 10,000-row UPDATE is 100 MB of WAL. The
//! archive stores it once per run of changes that share it, in the log and in segments, and
//! still labels every change with it (and each statement's changes with their own).

use std::path::Path;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use serde_json::Value;

use crate::export::{capture_to, sql_json};
use crate::pgtrail;

const ROWS: usize = 10_000;

/// The trigger Bemi's packages install, reduced to what matters here: one `_bemi` message per
/// written row, just before the row's change, with the statement's context.
const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v int);
     INSERT INTO t SELECT g, 0 FROM generate_series(1, 10000) g;
     CREATE FUNCTION ctx_row() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
       IF current_setting('app.ctx', true) IS NOT NULL AND current_setting('app.ctx', true) <> '' THEN
         PERFORM pg_logical_emit_message(true, '_bemi', current_setting('app.ctx', true));
       END IF;
       RETURN COALESCE(NEW, OLD);
     END $$;
     CREATE TRIGGER ctx_row BEFORE INSERT OR UPDATE OR DELETE ON t FOR EACH ROW EXECUTE FUNCTION ctx_row();";

/// A context of about 10 kB that compresses poorly (hex digests).
fn big_context(tag: &str) -> String {
    let blob: String = (0..160)
        .map(|i| {
            format!(
                "{:016x}{:016x}",
                (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                i as u64 ^ 0xD1B5_4A32_D192_ED03
            )
        })
        .map(|h| format!("{h}{h}"))
        .collect();
    format!(
        "{{\"user_id\": 7, \"tag\": \"{tag}\", \"blob\": \"{}\"}}",
        &blob[..10_000]
    )
}

/// `pgtrail status` whose reader has gone away before it writes (`pgtrail status | head -0`):
/// it stops quietly, with no panic.
fn status_into_a_closed_pipe(archive: &Path) {
    let mut child = pgtrail()
        .args(["status", "--archive"])
        .arg(archive)
        .args(["--source", ""])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "{:?}: {stderr}",
        out.status
    );
}

fn status(archive: &Path) -> Value {
    let out = pgtrail()
        .args(["status", "--archive"])
        .arg(archive)
        .args(["--source", "", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_context_repeated_for_every_row_is_stored_once_per_statement() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let db = "ctxrows";
    cluster.psql("postgres", "CREATE DATABASE ctxrows").unwrap();
    cluster.psql(db, SETUP).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    capture_to(&cluster, db, &archive);
    let before = status(&archive)["log"]["file_bytes"].as_u64().unwrap();
    status_into_a_closed_pipe(&archive);

    // One transaction, two statements under two contexts, every row written once; a last
    // change with no context of its own takes the one in force.
    let (first, second) = (big_context("first"), big_context("second"));
    cluster
        .psql(
            db,
            &format!(
                "BEGIN; SET LOCAL app.ctx = '{first}'; UPDATE t SET v = 1 WHERE id <= 6000; \
                 SET LOCAL app.ctx = '{second}'; UPDATE t SET v = 2 WHERE id > 6000; \
                 SET LOCAL app.ctx = ''; DELETE FROM t WHERE id = 1; COMMIT;"
            ),
        )
        .unwrap();
    capture_to(&cluster, db, &archive);
    let log_bytes = status(&archive)["log"]["file_bytes"].as_u64().unwrap() - before;
    let wal_context_bytes = (ROWS * first.len()) as u64;
    eprintln!(
        "contexts: {ROWS} changes with {} kB contexts ({} MB in the WAL) grew the log by {} kB",
        first.len() / 1000,
        wal_context_bytes >> 20,
        log_bytes >> 10
    );

    // Every change is labelled with its statement's context.
    let counts = sql_json(
        &archive,
        "SELECT json_get(context, 'tag') AS tag, operation, count(*) AS n FROM changes \
         WHERE operation <> 'SNAPSHOT' GROUP BY 1, 2 ORDER BY 1, 2",
    );
    let seen: Vec<(String, String, u64)> = counts
        .iter()
        .map(|r| {
            (
                r["tag"].as_str().unwrap_or("none").to_string(),
                r["operation"].as_str().unwrap().to_string(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("first".to_string(), "UPDATE".to_string(), 6000),
            ("second".to_string(), "DELETE".to_string(), 1),
            ("second".to_string(), "UPDATE".to_string(), 4000),
        ]
    );
    let whole = sql_json(
        &archive,
        "SELECT count(*) AS n FROM changes WHERE length(CAST(context AS VARCHAR)) > 10000",
    );
    assert_eq!(
        whole[0]["n"], 10_001,
        "every change carries its whole context"
    );

    // The log holds each context once, not once per row: its growth is far below one copy
    // per change (10,000 copies would be about 100 MB, 50 MB compressed).
    assert!(
        log_bytes < 4 << 20,
        "the log grew by {log_bytes} bytes for {ROWS} changes sharing two contexts"
    );

    // Segments: the same after compaction.
    assert!(
        pgtrail()
            .args(["compact", "--archive"])
            .arg(&archive)
            .status()
            .unwrap()
            .success()
    );
    let segment_bytes = status(&archive)["segments"]["bytes"].as_u64().unwrap();
    eprintln!("contexts: the segments hold {} kB", segment_bytes >> 10);
    assert!(
        segment_bytes < 4 << 20,
        "the segments hold {segment_bytes} bytes for {ROWS} changes sharing two contexts"
    );
    let again = sql_json(
        &archive,
        "SELECT count(*) AS n FROM changes WHERE json_get(context, 'tag') = 'second'",
    );
    assert_eq!(again[0]["n"], 4001);
}
