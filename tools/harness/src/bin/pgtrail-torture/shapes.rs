//! The workload shapes that break change-capture tools, run beside the ledger workload while
//! faults are injected: savepoint rollbacks, aborted transactions, two-phase commit (committed
//! and rolled back), TRUNCATE of several tables, with CASCADE and RESTART IDENTITY, ALTER
//! TABLE storms mixed with DML in one transaction, unchanged TOAST values under REPLICA
//! IDENTITY DEFAULT and FULL, a partitioned table (rows moving between partitions), multi-row
//! INSERT and COPY (many changes sharing one LSN) into a keyless table, one large
//! transaction, and a migration storm (a table dropped and created again with rows in one
//! transaction, columns added with a default existing rows take, a key type changed, a column
//! renamed and renamed back around a write, the table taken out of the publication and written:
//! DDL that changes rows, or how they read, without a change in the stream, which capture must
//! notice and read again).
//!
//! Its oracle: after every round a transaction locks all these tables, hashes each one's rows
//! (PostgreSQL's composite text of each row, sorted) and emits the hashes with
//! `pg_logical_emit_message(true, 'oracle_shapes', …)`. pgtrail's own `as_of_lsn` at that
//! message's commit must hash the same, table by table, or refuse the moment as unknown (a
//! table DDL rewrote, not read again yet); refusals are counted and reported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pgtrail_query::{ArchiveSnapshot, Moment, state_at};
use pgtrail_store::{Cell, Lsn};
use sha2::{Digest, Sha256};

use crate::{Rng, Verdict};

pub const TABLES: &[&str] = &[
    "sh_parent",
    "sh_child",
    "sh_ident",
    "sh_part",
    "sh_toast_d",
    "sh_toast_f",
    "sh_alter",
    "sh_keyless",
    "sh_mig",
];

pub const SCHEMA: &str = "CREATE TABLE sh_parent (id int PRIMARY KEY, v text); \
    CREATE TABLE sh_child (id int PRIMARY KEY, parent_id int REFERENCES sh_parent (id) ON DELETE CASCADE, v int); \
    CREATE TABLE sh_ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text); \
    CREATE TABLE sh_part (id int, region int, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region); \
    CREATE TABLE sh_part_a PARTITION OF sh_part FOR VALUES IN (1); \
    CREATE TABLE sh_part_b PARTITION OF sh_part FOR VALUES IN (2); \
    CREATE TABLE sh_toast_d (id int PRIMARY KEY, big text, small int); \
    CREATE TABLE sh_toast_f (id int PRIMARY KEY, big text, small int); \
    ALTER TABLE sh_toast_f REPLICA IDENTITY FULL; \
    CREATE TABLE sh_alter (id int PRIMARY KEY, a int); \
    CREATE TABLE sh_keyless (k text, v int); \
    ALTER TABLE sh_keyless REPLICA IDENTITY FULL; \
    INSERT INTO sh_parent SELECT g, 'p' || g FROM generate_series(1, 20) g; \
    INSERT INTO sh_child SELECT g, g, g FROM generate_series(1, 20) g; \
    INSERT INTO sh_ident (v) SELECT 'i' || g FROM generate_series(1, 10) g; \
    INSERT INTO sh_part SELECT g, 1 + g % 2, 'r' || g FROM generate_series(1, 20) g; \
    INSERT INTO sh_toast_d SELECT g, (SELECT string_agg(md5(g::text || x::text), '') FROM generate_series(1, 300) x), g FROM generate_series(1, 6) g; \
    INSERT INTO sh_toast_f SELECT id, big, small FROM sh_toast_d; \
    INSERT INTO sh_alter SELECT g, g FROM generate_series(1, 10) g; \
    CREATE TABLE sh_mig (id int PRIMARY KEY, v text); \
    INSERT INTO sh_mig SELECT g, 'm' || g FROM generate_series(1, 8) g;";

/// Column numbers `sh_alter` may use before the ALTER storm makes it again (PostgreSQL's
/// limit is 1600, dropped columns included).
const ALTER_COLUMNS: u32 = 64;

/// A value large enough to be stored out of line (TOAST), different for each `n`.
fn big(n: u64) -> String {
    format!("(SELECT string_agg(md5('{n}' || x::text), '') FROM generate_series(1, 300) x)")
}

/// The oracle transaction: each table's rows as PostgreSQL prints them, sorted, hashed.
pub fn oracle_sql() -> String {
    let hashes: Vec<String> = TABLES
        .iter()
        .map(|t| {
            format!(
                "'{t}=' || (SELECT coalesce(encode(sha256(convert_to(string_agg(x.r, E'\\n' ORDER BY x.r COLLATE \"C\"), 'UTF8')), 'hex'), 'empty') \
                 FROM (SELECT t::text AS r FROM {t} t) x)"
            )
        })
        .collect();
    format!(
        "BEGIN; LOCK {} IN SHARE MODE; SELECT pg_logical_emit_message(true, 'oracle_shapes', concat_ws(';', {})); COMMIT;",
        TABLES.join(", "),
        hashes.join(", ")
    )
}

/// One round's SQL (a simple-query batch), by shape.
fn round(rng: &mut Rng, n: u64, big_rows: u64, did_big: &mut bool) -> Vec<String> {
    // Ten ids per round: a round inserts at most six new keys.
    let id = 1000 + 10 * n as i64;
    match rng.next() % 10 {
        0 => vec![format!(
            "BEGIN; INSERT INTO sh_parent VALUES ({id}, 'sp'); SAVEPOINT a; INSERT INTO sh_parent VALUES ({}, 'gone'); \
             UPDATE sh_parent SET v = 'rolled back' WHERE id = {id}; ROLLBACK TO a; \
             INSERT INTO sh_child VALUES ({id}, {id}, 1); SAVEPOINT b; UPDATE sh_child SET v = v + 1 WHERE id = {id}; RELEASE b; \
             SAVEPOINT c; DELETE FROM sh_parent WHERE id = {id}; ROLLBACK TO c; COMMIT;",
            id + 500_000
        )],
        1 => vec![format!(
            "BEGIN; INSERT INTO sh_parent VALUES ({id}, 'aborted'); UPDATE sh_toast_d SET small = -1; DELETE FROM sh_keyless; ROLLBACK;"
        )],
        2 => {
            let end = if rng.next().is_multiple_of(3) { "ROLLBACK PREPARED" } else { "COMMIT PREPARED" };
            // COMMIT/ROLLBACK PREPARED cannot share a query string with other statements.
            vec![
                format!(
                    "BEGIN; INSERT INTO sh_parent VALUES ({id}, '2pc'); UPDATE sh_toast_d SET small = small + 1 WHERE id % 2 = {}; \
                     INSERT INTO sh_part VALUES ({id}, 2, '2pc'); PREPARE TRANSACTION 'torture_{n}';",
                    n % 2
                ),
                format!("{end} 'torture_{n}'"),
            ]
        }
        3 => match rng.next() % 3 {
            0 => vec![format!(
                "TRUNCATE sh_parent CASCADE; INSERT INTO sh_parent SELECT g, 't' || g FROM generate_series({id}, {id} + 5) g; \
                 INSERT INTO sh_child SELECT g, g, 0 FROM generate_series({id}, {id} + 5) g;"
            )],
            1 => vec![format!("BEGIN; TRUNCATE sh_ident RESTART IDENTITY; INSERT INTO sh_ident (v) SELECT 'n{n}.' || g FROM generate_series(1, 5) g; COMMIT;")],
            _ => vec!["TRUNCATE sh_keyless, sh_part; INSERT INTO sh_part VALUES (1, 1, 'after truncate'), (2, 2, 'after truncate');".to_string()],
        },
        4 => {
            // Columns come and go inside a transaction that also writes the table, so each
            // schema reaches the stream (DDL itself is not replicated). Dropped columns keep
            // their numbers, and PostgreSQL refuses a 1601st: every 64 numbers the table is
            // made again, in the same transaction as the storm, so a soak of any length keeps
            // exercising it.
            vec![format!(
                "BEGIN; DO $$ BEGIN \
                   IF (SELECT max(attnum) FROM pg_attribute WHERE attrelid = 'sh_alter'::regclass) >= {ALTER_COLUMNS} THEN \
                     DROP TABLE sh_alter; CREATE TABLE sh_alter (id int PRIMARY KEY, a int); \
                     INSERT INTO sh_alter SELECT g, g FROM generate_series(1, 10) g; END IF; END $$; \
                 ALTER TABLE sh_alter ADD COLUMN c{n} text; INSERT INTO sh_alter (id, a, c{n}) VALUES ({id}, 1, 'added {n}'); \
                 UPDATE sh_alter SET a = a + 1 WHERE id % 3 = {}; \
                 DO $$ DECLARE col text; BEGIN \
                   SELECT attname INTO col FROM pg_attribute WHERE attrelid = 'sh_alter'::regclass AND attnum > 2 AND NOT attisdropped \
                     AND attname <> 'c{n}' ORDER BY attnum LIMIT 1; \
                   IF col IS NOT NULL AND (SELECT count(*) FROM pg_attribute WHERE attrelid = 'sh_alter'::regclass AND attnum > 2 AND NOT attisdropped) > 3 THEN \
                     EXECUTE format('ALTER TABLE sh_alter DROP COLUMN %I', col); END IF; END $$; \
                 ALTER TABLE sh_alter ALTER COLUMN a TYPE {} ; UPDATE sh_alter SET a = a + 1 WHERE id = {id}; COMMIT;",
                n % 3,
                if n.is_multiple_of(2) { "bigint" } else { "int" }
            )]
        }
        5 => vec![format!(
            "UPDATE sh_toast_d SET small = small + 1 WHERE id % 3 = {m}; UPDATE sh_toast_f SET small = small + 1 WHERE id % 3 = {m}; \
             BEGIN; UPDATE sh_toast_d SET big = {b} WHERE id = {r}; UPDATE sh_toast_f SET big = {b} WHERE id = {r}; COMMIT; \
             BEGIN; DELETE FROM sh_toast_d WHERE id = {r2}; DELETE FROM sh_toast_f WHERE id = {r2}; \
             INSERT INTO sh_toast_d VALUES ({r2}, {b}, 0); INSERT INTO sh_toast_f VALUES ({r2}, {b}, 0); COMMIT;",
            m = n % 3,
            b = big(n),
            r = 1 + rng.next() % 6,
            r2 = 1 + rng.next() % 6
        )],
        6 => vec![format!(
            "INSERT INTO sh_part VALUES ({id}, 1, 'a'), ({}, 2, 'b'); UPDATE sh_part SET region = 3 - region, v = 'moved' WHERE id = (SELECT min(id) FROM sh_part); \
             DELETE FROM sh_part WHERE id % 5 = {};",
            id + 1,
            n % 5
        )],
        7 => vec![
            format!("INSERT INTO sh_keyless VALUES ('m', {n}), ('m', {n}), ('dup', 1), ('dup', 1), (NULL, NULL);"),
            "COPY".to_string(),
            format!("DELETE FROM sh_keyless WHERE v % 4 = {} AND k IS DISTINCT FROM 'big';", n % 4),
        ],
        9 => match rng.next() % 5 {
            0 => vec![format!(
                "BEGIN; DROP TABLE sh_mig; CREATE TABLE sh_mig (id int PRIMARY KEY, v text); \
                 INSERT INTO sh_mig SELECT g, 'm{n}.' || g FROM generate_series(1, 8) g; COMMIT;"
            )],
            1 => vec![format!("ALTER TABLE sh_mig ADD COLUMN c{n} int DEFAULT {n};")],
            // Renamed and renamed back with a write in between, in one transaction: the
            // catalog never shows the other name, the stream does.
            2 => vec![format!(
                "BEGIN; ALTER TABLE sh_mig RENAME COLUMN v TO v_{n}; \
                 UPDATE sh_mig SET v_{n} = v_{n} || '~' WHERE id % 3 = {}; \
                 ALTER TABLE sh_mig RENAME COLUMN v_{n} TO v; COMMIT;",
                n % 3
            )],
            3 => vec![format!(
                "ALTER TABLE sh_mig ALTER COLUMN id TYPE {}; UPDATE sh_mig SET v = v || '+' WHERE id % 2 = {};",
                if n.is_multiple_of(2) { "bigint" } else { "int" },
                n % 2
            )],
            // Out of the capture's publication (by hand, as a DBA might) and written while
            // out: the changes never reach the stream. The capture's next look puts it back
            // and reads it again; that look is the only one to see it was out, so a fault
            // between its decision and the read must not lose the read.
            // (Only when the capture has put it in: a table created again, or taken out by
            // the round before, is not in it until the capture's next look.)
            _ => vec![format!(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = '{pubname}' \
                   AND schemaname = 'public' AND tablename = 'sh_mig') THEN \
                   ALTER PUBLICATION {pubname} DROP TABLE sh_mig; END IF; END $$; \
                 UPDATE sh_mig SET v = v || '^' WHERE id % 4 = {};",
                n % 4,
                // The capture's publication, named as its slot; it takes every table, so a
                // table out of it is put back at its next look.
                pubname = crate::SLOT,
            )],
        },
        _ => {
            if *did_big {
                vec!["DELETE FROM sh_keyless WHERE k = 'big';".to_string()]
            } else {
                *did_big = true;
                vec![format!("INSERT INTO sh_keyless SELECT 'big', g FROM generate_series(1, {big_rows}) g;")]
            }
        }
    }
}

/// Run rounds until `stop`; returns the number of rounds that committed their oracle.
pub fn workload(
    url: String,
    stop: Arc<AtomicBool>,
    seed: u64,
    big_rows: u64,
    rounds: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut rng = Rng(seed.rotate_left(17) | 1);
            let (mut n, mut oracles, mut did_big) = (0u64, 0u64, false);
            let oracle = oracle_sql();
            'connect: while !stop.load(Ordering::Relaxed) {
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                tokio::spawn(conn);
                finish_prepared(&client).await;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    for sql in round(&mut rng, n, big_rows, &mut did_big) {
                        let result = if sql == "COPY" {
                            copy_rows(&client, n).await
                        } else {
                            client.batch_execute(&sql).await.map(|_| ())
                        };
                        if let Err(e) = result {
                            if client.is_closed() {
                                continue 'connect;
                            }
                            // A statement the shape expects to fail cannot occur; a broken one
                            // is a bug of this suite, worth seeing.
                            let why = e
                                .as_db_error()
                                .map_or_else(|| e.to_string(), |d| d.message().to_string());
                            eprintln!("torture: shapes round {n}: {why}");
                            let _ = client.batch_execute("ROLLBACK").await;
                            finish_prepared(&client).await;
                        }
                    }
                    if client.batch_execute(&oracle).await.is_err() {
                        continue 'connect;
                    }
                    oracles += 1;
                    rounds.store(oracles, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            oracles
        })
    })
}

/// Commit a prepared transaction left by a broken connection or a failed round: it would
/// hold its locks (and the oracle's LOCK behind them) forever.
async fn finish_prepared(client: &tokio_postgres::Client) {
    if let Ok(rows) = client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'torture_%'",
            &[],
        )
        .await
    {
        for row in rows {
            let gid: String = row.get(0);
            let _ = client
                .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
                .await;
        }
    }
}

async fn copy_rows(client: &tokio_postgres::Client, n: u64) -> Result<(), tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in("COPY sh_keyless (k, v) FROM STDIN").await?;
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..300 {
        data.push_str(&format!("copy\\t{n}\t{}\n", i % 50));
    }
    sink.send(bytes::Bytes::from(data)).await?;
    sink.as_mut().finish().await?;
    Ok(())
}

/// PostgreSQL's composite text of a row (`record_out`): NULL is empty, a value is quoted when
/// it is empty or holds a quote, backslash, parenthesis, comma or white space.
fn record_text(cells: &[Option<&Cell>]) -> String {
    let mut out = String::from("(");
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match cell {
            None | Some(Cell::Null) => {}
            Some(Cell::Unknown) => out.push_str("<unknown to the archive>"),
            Some(Cell::Text(v)) => {
                let quote = v.is_empty()
                    || v.chars().any(|c| {
                        matches!(c, '"' | '\\' | '(' | ')' | ',') || c.is_ascii_whitespace()
                    });
                if quote {
                    out.push('"');
                    for c in v.chars() {
                        if c == '"' || c == '\\' {
                            out.push(c);
                        }
                        out.push(c);
                    }
                    out.push('"');
                } else {
                    out.push_str(v);
                }
            }
        }
    }
    out.push(')');
    out
}

fn hash(mut rows: Vec<String>) -> String {
    if rows.is_empty() {
        return "empty".into();
    }
    rows.sort();
    Sha256::digest(rows.join("\n").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Check pgtrail's `as_of_lsn` of every shape table at up to `max_checks` of the oracles
/// (spread evenly, always the last), against the hashes PostgreSQL emitted.
pub fn check(
    snapshot: &ArchiveSnapshot,
    oracles: &[(Lsn, String)],
    max_checks: usize,
    v: &mut Verdict,
) -> Result<(), String> {
    if oracles.is_empty() {
        v.problems
            .push("the shapes workload committed no oracle".into());
        return Ok(());
    }
    let step = oracles.len().div_ceil(max_checks).max(1);
    let last = oracles.len() - 1;
    for (lsn, content) in oracles
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == last)
        .map(|(_, o)| o)
    {
        let expected: BTreeMap<&str, &str> = content
            .split(';')
            .filter_map(|p| p.split_once('='))
            .collect();
        for table in TABLES {
            let want = expected
                .get(table)
                .copied()
                .unwrap_or("missing from the oracle");
            let history = snapshot
                .table(&format!("public.{table}"))
                .map_err(|e| e.to_string())?;
            let state = match state_at(snapshot, history, Moment::Lsn(*lsn)) {
                Ok(state) => state,
                // DDL rewrote the table (ALTER TYPE, TRUNCATE) and the archive had not read it
                // again yet at this moment: it says so rather than answer; counted, not failed.
                Err(e) if pgtrail_query::is_unknown_moment(&e) => {
                    v.oracles_unknown += 1;
                    continue;
                }
                Err(e) => return Err(format!("as_of {table} at {lsn}: {e}")),
            };
            let rows: Vec<String> = state
                .rows
                .values()
                .flatten()
                .map(|(version, row)| {
                    let cells: Vec<Option<&Cell>> = state
                        .version
                        .columns
                        .iter()
                        .map(|c| {
                            version
                                .columns
                                .iter()
                                .position(|vc| vc.name == c.name)
                                .and_then(|i| row.get(i))
                        })
                        .collect();
                    record_text(&cells)
                })
                .collect();
            let got = hash(rows);
            v.oracles += 1;
            if got != want {
                v.oracle_mismatches += 1;
                v.problems.push(format!("as_of_lsn({table}) at the shapes oracle of {lsn} hashes {got}, PostgreSQL hashed {want}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_text_quotes_like_postgres() {
        let t = |s: &str| Cell::Text(s.to_string());
        let (a, b, c, d) = (t("1"), t("a b"), t(""), t("x\"y\\z"));
        assert_eq!(
            record_text(&[Some(&a), Some(&b), Some(&c), Some(&Cell::Null), Some(&d)]),
            r#"(1,"a b","",,"x""y\\z")"#
        );
    }
}
