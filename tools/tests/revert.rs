//! `pgtrail revert` against a real PostgreSQL. The oracle is the same workload run again in a
//! second database without the reverted request: after the revert, every table of the first
//! equals the second's, value for value, while the changes made after the request remain.

use std::path::Path;
use std::process::{Command, Output};

use pgtrail_capture::cluster::Cluster;

use crate::{capture_until_now, pgtrail, pgtrail_sql};

/// Tables with a keyword column, a quoted composite key, a foreign-key chain and values of
/// several types.
const SCHEMA: &str = r#"
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, tier text, joined timestamptz,
    balance float8, tags text[], photo bytea, meta jsonb);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
    total numeric(10,2), status text);
CREATE TABLE "Odd Table" ("user" int, "Key Part" text, value json, PRIMARY KEY ("user", "Key Part"));
INSERT INTO customers VALUES
 (1, 'Ada', 'basic', '2026-01-02 03:04:05.678901+00', 0.1, '{a,"b c"}', '\x00ff', '{"k": [1, 2]}'),
 (2, 'Bo', 'gold', '2026-02-03 00:00:00+00', -1.5e-7, '{}', NULL, NULL),
 (3, 'Cy', 'basic', NULL, 1e300, NULL, '\x', '{}'),
 (4, 'O''Neil', NULL, '2026-03-04 12:00:00+05', 2.5, '{x}', '\xdeadbeef', '"s"');
INSERT INTO orders VALUES (1, 1, 10.00, 'paid'), (2, 2, 20.50, 'new'), (3, 3, 3.25, 'new');
INSERT INTO "Odd Table" VALUES (1, 'a b', '{"z": 1, "a": 2}'), (2, 'x', '[1]'), (2, 'y''s', 'null');
CREATE TABLE notes (msg text, n int);
ALTER TABLE notes REPLICA IDENTITY FULL;
INSERT INTO notes VALUES ('a', 1), ('b', 2), ('c', 3), ('c', 3);
"#;

/// One request: a transaction labelled with its context, as Bemi's ORM packages send it.
fn request(id: &str, statements: &str) -> String {
    format!(
        "BEGIN; SELECT pg_logical_emit_message(true, '_bemi', '{{\"request_id\": \"{id}\", \"user_id\": 7}}'); {statements} COMMIT;"
    )
}

const R1: &str = "UPDATE customers SET tier = 'silver' WHERE id = 1; \
     INSERT INTO orders VALUES (10, 1, 99.99, 'new'); \
     UPDATE \"Odd Table\" SET value = '{\"r1\": true}' WHERE \"user\" = 2 AND \"Key Part\" = 'x';";
/// The request to undo: a new customer with an order (a foreign-key chain), updates (one row
/// twice), deletes, a composite-keyed row, a row of a table without a key (REPLICA IDENTITY
/// FULL: the whole row identifies it), and values of every type changed.
const R2: &str = "INSERT INTO customers VALUES (5, 'Eve', 'gold', now(), 3.14, '{new}', '\\x01', '{\"n\": null}'); \
     INSERT INTO orders VALUES (11, 5, 1.10, 'new'); \
     UPDATE customers SET name = 'Bob', balance = 42, tags = ARRAY['q\"uote', 'x,y'], photo = '\\xabcd', \
         meta = '{\"edited\": 1}', joined = '2030-01-01 00:00:00+00' WHERE id = 2; \
     DELETE FROM orders WHERE id = 3; \
     UPDATE orders SET total = 21.00 WHERE id = 2; \
     UPDATE orders SET total = 22.00, status = 'paid' WHERE id = 2; \
     UPDATE \"Odd Table\" SET value = '{\"r2\": [1,2]}' WHERE \"user\" = 1 AND \"Key Part\" = 'a b'; \
     DELETE FROM \"Odd Table\" WHERE \"user\" = 2 AND \"Key Part\" = 'y''s'; \
     UPDATE customers SET id = 40 WHERE id = 4; \
     UPDATE notes SET n = 20 WHERE msg = 'b'; \
     DELETE FROM notes WHERE msg = 'a';";
/// Later and unrelated: rows R2 did not touch.
const R3: &str = "UPDATE customers SET tier = 'gold' WHERE id = 3; \
     INSERT INTO orders VALUES (12, 1, 5.00, 'new'); \
     UPDATE orders SET status = 'shipped' WHERE id = 1;";
/// Later, on a row R2 changed: it sets the same column again, so the row is a conflict for
/// the revert, and leaving it (skip) gives what the workload without R2 gives.
const R4: &str = "UPDATE customers SET name = 'Robert', balance = 42, tags = ARRAY['q\"uote', 'x,y'], \
     photo = '\\xabcd', meta = '{\"edited\": 1}', joined = '2030-01-01 00:00:00+00' WHERE id = 2;";

/// Every table's rows, as PostgreSQL prints them, in key order.
fn tables(cluster: &Cluster, db: &str) -> String {
    cluster
        .psql(
            db,
            "SELECT (SELECT coalesce(json_agg(c ORDER BY id)::text, '[]') FROM customers c) \
             || E'\\n' || (SELECT coalesce(json_agg(o ORDER BY id)::text, '[]') FROM orders o) \
             || E'\\n' || (SELECT coalesce(json_agg(t ORDER BY \"user\", \"Key Part\")::text, '[]') FROM \"Odd Table\" t) \
             || E'\\n' || (SELECT coalesce(json_agg(n ORDER BY msg, n)::text, '[]') FROM notes n)",
        )
        .unwrap()
}

fn revert(archive: &Path, url: &str, args: &[&str]) -> Output {
    pgtrail()
        .arg("revert")
        .arg("--archive")
        .arg(archive)
        .args(["--source", url])
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `psql -f FILE` (ON_ERROR_STOP): whether the script ran through, and what psql said.
fn psql_file(cluster: &Cluster, db: &str, file: &Path) -> (bool, String) {
    let out = Command::new(cluster.bin_dir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
        .arg(cluster.socket_dir())
        .args(["-p", &cluster.port().to_string(), "-d", db, "-f"])
        .arg(file)
        .output()
        .unwrap();
    (out.status.success(), text(&out))
}

#[test]
fn reverting_a_request_leaves_what_the_workload_without_it_leaves() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("revert").unwrap();
    let oracle = cluster.fresh_database("revert_oracle").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let url = cluster.url(&db);

    cluster.psql(&db, SCHEMA).unwrap();
    capture_until_now(cluster, &db, &archive);
    cluster.psql(&db, &request("R1", R1)).unwrap();
    cluster.psql(&db, &request("R2", R2)).unwrap();
    cluster.psql(&db, &request("R3", R3)).unwrap();
    // The oracle: everything but R2.
    cluster.psql(&oracle, SCHEMA).unwrap();
    cluster.psql(&oracle, &request("R1", R1)).unwrap();
    cluster.psql(&oracle, &request("R3", R3)).unwrap();
    capture_until_now(cluster, &db, &archive);

    // Bad selections are refused before anything is read from the source.
    let none = revert(&archive, &url, &["--context", "request_id=nobody"]);
    assert_eq!(none.status.code(), Some(2), "{}", text(&none));
    assert!(text(&none).contains("matches no change"), "{}", text(&none));
    let unselected = revert(&archive, &url, &["--tables", "orders"]);
    assert_eq!(unselected.status.code(), Some(2), "{}", text(&unselected));
    assert!(
        text(&unselected).contains("give a selection"),
        "{}",
        text(&unselected)
    );
    let malformed = revert(&archive, &url, &["--context", "request_id"]);
    assert!(
        text(&malformed).contains("KEY=VALUE"),
        "{}",
        text(&malformed)
    );

    // A dry run shows the plan and writes nothing; --output writes the script for review.
    let before = tables(cluster, &db);
    let script = dir.path().join("revert-r2.sql");
    let dry = revert(
        &archive,
        &url,
        &[
            "--context",
            "request_id=R2",
            "--output",
            script.to_str().unwrap(),
        ],
    );
    assert!(dry.status.success(), "{}", text(&dry));
    let report = text(&dry);
    assert!(report.contains("revert of 11 change(s)"), "{report}");
    assert!(report.contains("customers: 1 delete, 2 update"), "{report}");
    assert!(
        report.contains("orders: 1 delete, 1 insert, 2 update"),
        "{report}"
    );
    assert!(report.contains("dry run: nothing was written"), "{report}");
    assert_eq!(
        tables(cluster, &db),
        before,
        "a dry run wrote to the source"
    );

    // Later, another request changes a row R2 changed: the revert stops and lists it.
    cluster.psql(&db, &request("R4", R4)).unwrap();
    cluster.psql(&oracle, &request("R4", R4)).unwrap();
    capture_until_now(cluster, &db, &archive);
    let after_r4 = tables(cluster, &db);
    let stopped = revert(&archive, &url, &["--context", "request_id=R2", "--apply"]);
    assert_eq!(stopped.status.code(), Some(1), "{}", text(&stopped));
    let said = text(&stopped);
    assert!(
        said.contains(
            "customers id=2: changed since: name is \"Robert\" (the selected changes left \"Bob\")"
        ),
        "{said}"
    );
    assert!(said.contains("nothing was applied"), "{said}");
    assert_eq!(tables(cluster, &db), after_r4, "a stopped revert wrote");
    // The script written before R4 checks each row as it goes: run now, it stops at that row
    // and psql's transaction leaves everything as it was.
    let (ran, psql_said) = psql_file(cluster, &db, &script);
    assert!(!ran, "the script ran over a changed row: {psql_said}");
    assert!(
        psql_said.contains("the row is no longer as the archive left it"),
        "{psql_said}"
    );
    assert_eq!(tables(cluster, &db), after_r4, "a stopped script wrote");

    // With skip, the changed row is left and everything else of R2 is undone: the tables are
    // what the workload without R2 made, R3's and R4's changes included.
    let applied = revert(
        &archive,
        &url,
        &[
            "--context",
            "request_id=R2",
            "--apply",
            "--on-conflict",
            "skip",
        ],
    );
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(
        text(&applied).contains("left as they are"),
        "{}",
        text(&applied)
    );
    assert_eq!(tables(cluster, &db), tables(cluster, &oracle));

    // The revert is archived as a transaction of its own, labelled with its selection.
    capture_until_now(cluster, &db, &archive);
    let labelled = pgtrail_sql(
        &archive,
        "csv",
        "SELECT count(*), count(DISTINCT transaction_id) FROM changes \
         WHERE json_get(context, 'pgtrail') = 'revert' AND json_get(context, 'selection.context') LIKE '%request_id=R2%'",
    );
    assert_eq!(labelled.lines().nth(1), Some("10,1"), "{labelled}");

    // A TRUNCATE is undone only when asked, from the rows the table held just before it.
    let odd_before = tables(cluster, &db);
    cluster
        .psql(&db, &request("R5", "TRUNCATE \"Odd Table\";"))
        .unwrap();
    capture_until_now(cluster, &db, &archive);
    let refused = revert(&archive, &url, &["--context", "request_id=R5", "--apply"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("--include-truncate"),
        "{}",
        text(&refused)
    );
    let truncated = revert(
        &archive,
        &url,
        &[
            "--context",
            "request_id=R5",
            "--include-truncate",
            "--apply",
        ],
    );
    assert!(truncated.status.success(), "{}", text(&truncated));
    assert_eq!(tables(cluster, &db), odd_before);

    // A change whose column has since been dropped cannot be undone as it was made.
    cluster
        .psql(
            &db,
            &request("R6", "UPDATE customers SET photo = '\\x99' WHERE id = 1;"),
        )
        .unwrap();
    cluster
        .psql(&db, "ALTER TABLE customers DROP COLUMN photo")
        .unwrap();
    capture_until_now(cluster, &db, &archive);
    let unreverted = tables(cluster, &db);
    let gone = revert(&archive, &url, &["--context", "request_id=R6", "--apply"]);
    assert_eq!(gone.status.code(), Some(2), "{}", text(&gone));
    assert!(
        text(&gone).contains("column photo of the change at")
            && text(&gone).contains("no longer exists"),
        "{}",
        text(&gone)
    );
    assert_eq!(tables(cluster, &db), unreverted, "a refused revert wrote");
}

/// A selection that spans a gap of the archive is refused (the recorded fixture has one),
/// before the source is reached.
#[test]
fn a_selection_across_a_gap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    crate::archives::copy_fixture("v5", &archive);
    let out = revert(
        &archive,
        "postgresql://nobody@127.0.0.1:1/nowhere",
        &["--from", "0/1943000", "--to", "0/19584D7"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("crosses a gap of the archive (0/1949120 to 0/1949278"),
        "{}",
        text(&out)
    );
    // One side of it is a selection like any other (refused here only for the source).
    let before = revert(
        &archive,
        "postgresql://nobody@127.0.0.1:1/nowhere",
        &["--to", "0/1949000"],
    );
    assert!(!text(&before).contains("gap"), "{}", text(&before));
}
