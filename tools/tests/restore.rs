//! `pgtrail restore` against a real PostgreSQL: tables of many types restored at several
//! moments (one before an ALTER TABLE) equal what PostgreSQL held then, recorded by PostgreSQL
//! itself at each moment and compared with `EXCEPT ALL` both ways, row by row as PostgreSQL
//! prints them.

use std::path::Path;
use std::process::Output;

use pgtrail_capture::cluster::Cluster;

use crate::{capture_until_now, insert_lsn, pgtrail};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE corpus (id int PRIMARY KEY, n numeric(12,3), f float8, r int4range, ip inet, m money,
    b bit(3), pt point, x xml, tz timetz, c char(5), j jsonb, js json, arr int[], tarr text[],
    by bytea, ts timestamptz, iv interval, u uuid, mo mood, "Odd ""Col""" text);
CREATE TABLE "Odd Keys" ("user" int, "Key Part" text, v text, PRIMARY KEY ("user", "Key Part"));
INSERT INTO corpus SELECT i, i * 1.5, 1.0 / (i + 1), int4range(i, i + 10), ('10.0.0.' || i)::inet,
    i * 100, (i % 8)::bit(3), point(i, -i), ('<a n="' || i || '">t</a>')::xml, '04:05:06+02:30',
    'ab', jsonb_build_object('i', i, 'k', ARRAY[i, i]), ('{"z": ' || i || ', "a": 1}')::json,
    ARRAY[i, NULL, 3], ARRAY['a b', 'q"t', NULL], ('\x' || lpad(to_hex(i), 2, '0'))::bytea,
    '2026-01-01 00:00:00+00'::timestamptz + i * interval '1 hour', i * interval '1 day 2 sec',
    md5(i::text)::uuid, (ARRAY['sad', 'ok', 'happy'])[i % 3 + 1]::mood, E'tab\there\nnew line \\ back'
    FROM generate_series(1, 40) i;
INSERT INTO "Odd Keys" SELECT i % 5, 'k ' || i, 'v' || i FROM generate_series(1, 30) i;
CREATE SCHEMA recorded;
"#;

/// PostgreSQL records `corpus` and `"Odd Keys"` as they are now under `recorded`, suffixed
/// `_tag` (tables without a key: capture leaves them out), and returns the LSN after it.
fn record(cluster: &Cluster, db: &str, tag: &str) -> String {
    cluster
        .psql(
            db,
            &format!(
                "CREATE TABLE recorded.corpus_{tag} AS SELECT * FROM corpus; \
                 CREATE TABLE recorded.odd_{tag} AS SELECT * FROM \"Odd Keys\";"
            ),
        )
        .unwrap();
    insert_lsn(cluster, db)
}

/// Rows in one table and not in the other, both ways, compared as PostgreSQL prints rows.
fn differences(cluster: &Cluster, db: &str, a: &str, b: &str) -> String {
    cluster
        .psql(
            db,
            &format!(
                "SELECT count(*) FROM ((SELECT t::text FROM {a} t EXCEPT ALL SELECT t::text FROM {b} t) \
                 UNION ALL (SELECT t::text FROM {b} t EXCEPT ALL SELECT t::text FROM {a} t)) d"
            ),
        )
        .unwrap()
}

fn restore(archive: &Path, into: &str, args: &[&str]) -> Output {
    pgtrail()
        .arg("restore")
        .arg("--archive")
        .arg(archive)
        .args(["--into", into])
        .args(args)
        .output()
        .unwrap()
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn restored_tables_equal_what_postgresql_held_at_each_moment() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("restore").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let url = cluster.url(&db);

    cluster.psql(&db, SCHEMA).unwrap();
    capture_until_now(cluster, &db, &archive);
    let m1 = record(cluster, &db, "1");
    cluster
        .psql(
            &db,
            "UPDATE corpus SET n = -n, j = j || '{\"u\": true}', mo = 'happy', pt = point(0, 0) WHERE id % 3 = 0; \
             DELETE FROM corpus WHERE id % 7 = 0; \
             INSERT INTO corpus (id, n, c) VALUES (100, 1e6, 'x'); \
             UPDATE \"Odd Keys\" SET \"Key Part\" = \"Key Part\" || '!' WHERE \"user\" = 1; \
             DELETE FROM \"Odd Keys\" WHERE \"user\" = 2;",
        )
        .unwrap();
    let m2 = record(cluster, &db, "2");
    let m2_time = cluster
        .psql(
            &db,
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        .unwrap();
    cluster
        .psql(
            &db,
            "ALTER TABLE corpus ADD COLUMN added text; \
             UPDATE corpus SET added = 'a' || id, f = f * 2 WHERE id < 10; \
             TRUNCATE \"Odd Keys\"; INSERT INTO \"Odd Keys\" VALUES (9, 'after truncate', 'z');",
        )
        .unwrap();
    let m3 = record(cluster, &db, "3");
    capture_until_now(cluster, &db, &archive);

    // Each moment into a schema of its own, both tables at once (one consistent moment).
    for (tag, lsn) in [("1", &m1), ("2", &m2), ("3", &m3)] {
        let schema = format!("restored_{tag}");
        let out = restore(
            &archive,
            &url,
            &[
                "--all-tables",
                "--as-of-lsn",
                lsn,
                "--target-schema",
                &schema,
            ],
        );
        assert!(out.status.success(), "{}", said(&out));
        assert_eq!(
            differences(
                cluster,
                &db,
                &format!("{schema}.corpus"),
                &format!("recorded.corpus_{tag}")
            ),
            "0",
            "corpus at moment {tag}"
        );
        assert_eq!(
            differences(
                cluster,
                &db,
                &format!("{schema}.\"Odd Keys\""),
                &format!("recorded.odd_{tag}")
            ),
            "0",
            "\"Odd Keys\" at moment {tag}"
        );
    }
    // Before the ALTER TABLE, the table has the columns it had then.
    let columns = cluster
        .psql(
            &db,
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'restored_1' AND table_name = 'corpus'",
        )
        .unwrap();
    assert_eq!(columns, "21");
    // The primary key comes along.
    let key = cluster
        .psql(
            &db,
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'restored_2.\"Odd Keys\"'::regclass AND contype = 'p'",
        )
        .unwrap();
    assert_eq!(key, "PRIMARY KEY (\"user\", \"Key Part\")");

    // A moment given as a time.
    let out = restore(
        &archive,
        &url,
        &[
            "--table",
            "corpus",
            "--as-of",
            &m2_time,
            "--target-schema",
            "by_time",
        ],
    );
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(
        differences(cluster, &db, "by_time.corpus", "recorded.corpus_2"),
        "0"
    );

    // create refuses an existing table; replace swaps it; truncate-and-load keeps it.
    let again = restore(
        &archive,
        &url,
        &[
            "--table",
            "corpus",
            "--as-of-lsn",
            &m3,
            "--target-schema",
            "by_time",
        ],
    );
    assert_eq!(again.status.code(), Some(2), "{}", said(&again));
    assert!(said(&again).contains("--mode replace"), "{}", said(&again));
    let replaced = restore(
        &archive,
        &url,
        &[
            "--table",
            "corpus",
            "--as-of-lsn",
            &m3,
            "--target-schema",
            "by_time",
            "--mode",
            "replace",
        ],
    );
    assert!(replaced.status.success(), "{}", said(&replaced));
    assert_eq!(
        differences(cluster, &db, "by_time.corpus", "recorded.corpus_3"),
        "0"
    );
    cluster
        .psql(&db, "DELETE FROM by_time.corpus WHERE id < 20")
        .unwrap();
    let reloaded = restore(
        &archive,
        &url,
        &[
            "--table",
            "corpus",
            "--as-of-lsn",
            &m3,
            "--target-schema",
            "by_time",
            "--mode",
            "truncate-and-load",
        ],
    );
    assert!(reloaded.status.success(), "{}", said(&reloaded));
    assert_eq!(
        differences(cluster, &db, "by_time.corpus", "recorded.corpus_3"),
        "0"
    );
    // Before the ALTER TABLE the archived columns lack `added`, which the target has.
    let mismatch = restore(
        &archive,
        &url,
        &[
            "--table",
            "corpus",
            "--as-of-lsn",
            &m1,
            "--target-schema",
            "by_time",
            "--mode",
            "truncate-and-load",
        ],
    );
    assert_eq!(mismatch.status.code(), Some(2), "{}", said(&mismatch));
    assert!(
        said(&mismatch).contains("only in the target: added"),
        "{}",
        said(&mismatch)
    );
    assert_eq!(
        differences(cluster, &db, "by_time.corpus", "recorded.corpus_3"),
        "0"
    );

    // A dry run keeps nothing.
    let dry = restore(
        &archive,
        &url,
        &[
            "--all-tables",
            "--as-of-lsn",
            &m3,
            "--target-schema",
            "dry",
            "--dry-run",
        ],
    );
    assert!(dry.status.success(), "{}", said(&dry));
    let kept = cluster
        .psql(
            &db,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'dry'",
        )
        .unwrap();
    assert_eq!(kept, "0");
}
