//! Archives written by earlier pgtrail builds stay readable: every `fixtures/archives/v<N>/`
//! (an archive written by the build of format version N, and the answers that build gave) is
//! opened by this build, which must answer `as_of`, `diff`, `row_history`, the history
//! tables, the `changes` view, the messages and every export layout exactly as recorded.
//!
//! The fixture holds a few tables (an integer key, a composite text key in another schema, a
//! table without a key), every operation (snapshot, insert, update, delete, TRUNCATE,
//! messages), Bemi context, two schema versions of one table, a gap recorded and closed by a
//! re-snapshot, segments, and a log tail; from version 2 a table created while capture was
//! stopped, from version 3 a column of it renamed while capture was stopped, and from version
//! 4 an enum label renamed while capture was stopped (`public.moods`). To record
//! one for the current format version (only when the format changes; review the diff):
//!
//! ```sh
//! PGTRAIL_RECORD_ARCHIVES=1 cargo test -p pgtrail --test main archives
//! ```
//!
//! A deliberate change of an answer's form (not of the archive's), e.g. how JSON output
//! writes a value, rewrites the recorded answers of every fixture instead; review the diff:
//!
//! ```sh
//! PGTRAIL_REWRITE_ANSWERS=1 cargo test -p pgtrail --test main archives
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use pgtrail_capture::cluster::{Cluster, ClusterOptions};

use crate::{pgtrail, walk};

const SETUP: &str = "
CREATE SCHEMA inventory;
CREATE TABLE public.accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12,2),
                              tags text[], meta jsonb, opened timestamptz);
CREATE TABLE inventory.items (sku text, warehouse int, qty int NOT NULL, PRIMARY KEY (sku, warehouse));
CREATE TABLE public.notes (author text, body text);
CREATE TYPE public.mood AS ENUM ('sad', 'ok');
CREATE TABLE public.moods (id int PRIMARY KEY, m public.mood, ms public.mood[]);
INSERT INTO public.moods VALUES (1, 'ok', '{ok,sad}'), (2, 'sad', NULL), (3, NULL, '{}');
CREATE TABLE public.regions (id int, region int, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE public.regions_1 PARTITION OF public.regions FOR VALUES IN (1);
CREATE TABLE public.regions_2 PARTITION OF public.regions FOR VALUES IN (2);
INSERT INTO public.regions VALUES (1, 1, 'one'), (2, 2, 'two'), (3, 1, 'three');
ALTER TABLE public.notes REPLICA IDENTITY FULL;
INSERT INTO public.accounts VALUES
  (1, 'ada', 100.50, '{a,b}', '{\"tier\": 1}', '2026-01-01 10:00:00+00'),
  (2, 'grace', 0, NULL, NULL, NULL),
  (3, 'linus', -7.25, '{}', '[1, \"x\"]', '2025-12-31 23:59:59.5+00');
INSERT INTO inventory.items VALUES ('kb', 1, 10), ('kb', 2, 4), ('mouse', 1, 0);
INSERT INTO public.notes VALUES ('ada', 'hello'), ('ada', 'hello'), ('grace', NULL);
";

/// Streamed before the first compaction: every operation, context, a message, a TRUNCATE and
/// a schema change, one transaction per entry.
const FIRST: &[&str] = &[
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 7, \"endpoint\": \"/accounts\"}');
     INSERT INTO public.accounts VALUES (4, 'margaret', 12.00, '{x}', '{}', now());
     UPDATE public.accounts SET balance = balance + 1 WHERE id = 1;",
    "UPDATE inventory.items SET qty = qty - 1 WHERE sku = 'kb';
     UPDATE inventory.items SET warehouse = 3 WHERE sku = 'mouse';",
    "SELECT pg_logical_emit_message(true, 'app', 'a message that is not context');
     DELETE FROM public.notes WHERE author = 'ada' AND body = 'hello' AND ctid = (SELECT min(ctid) FROM public.notes WHERE author = 'ada');",
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 9, \"endpoint\": \"/admin\"}');
     DELETE FROM public.accounts WHERE id = 2;
     UPDATE public.accounts SET owner = 'ada lovelace', tags = '{a,b,c}' WHERE id = 1;",
    "TRUNCATE public.notes;",
    "INSERT INTO public.notes VALUES ('linus', 'after the truncate');",
    "ALTER TABLE public.accounts ADD COLUMN tier text;
     UPDATE public.accounts SET tier = 'gold' WHERE id = 1;",
    "INSERT INTO public.accounts VALUES (5, 'barbara', 1e6, NULL, '{\"k\": [true, null]}', NULL, 'silver');",
    // Version 2: a table created (with a row) while capture is stopped, read whole in step
    // with the stream by the next run: a snapshot that names its one table.
    "CREATE TABLE public.late (id int PRIMARY KEY, v text);
     INSERT INTO public.late VALUES (1, 'born with a row'), (2, 'and another');",
];

/// Written while the slot is gone: the archive does not see these, and records a gap.
const IN_THE_GAP: &str = "
DELETE FROM public.accounts WHERE id = 3;
UPDATE inventory.items SET qty = 99 WHERE sku = 'kb' AND warehouse = 1;
DELETE FROM public.notes;
";

/// Streamed after the re-snapshot and left in the log (not compacted).
const LAST: &[&str] = &[
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 7, \"endpoint\": \"/late\"}');
     UPDATE public.accounts SET balance = 0, tier = NULL WHERE id = 4;
     INSERT INTO inventory.items VALUES ('screen', 2, 1);",
    "DELETE FROM inventory.items WHERE sku = 'kb' AND warehouse = 2;
     INSERT INTO public.notes VALUES ('grace', 'in the log tail');",
    "UPDATE public.late SET v = 'updated in the tail' WHERE id = 2;",
    // Version 6: contexts are stored once per run in the log. A change and a message before
    // the first context (the change takes it, the message does not), the context repeated
    // per row as Bemi's triggers send it, and a second context in the same transaction.
    "INSERT INTO public.notes VALUES ('ada', 'before any context');
     SELECT pg_logical_emit_message(true, 'app', 'a message before the context');
     SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 11, \"step\": \"one\"}');
     UPDATE public.accounts SET balance = balance + 1 WHERE id = 1;
     SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 11, \"step\": \"one\"}');
     UPDATE public.accounts SET balance = balance + 1 WHERE id = 4;
     SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 11, \"step\": \"two\"}');
     UPDATE public.late SET v = 'two contexts in one transaction' WHERE id = 1;
     SELECT pg_logical_emit_message(true, 'app', 'a message after the second context');",
];

const TABLES: &[&str] = &["public.accounts", "inventory.items", "public.notes"];

/// Every moment `record` names, in the order it records them (version 5's last).
const MOMENTS: &[&str] = &[
    "snapshot",
    "before_truncate",
    "altered",
    "resnapshot",
    "tail",
    "renamed",
    "relabeled",
    "partitioned",
];

/// Tables of fixtures from a format version on, with the moments they are held at (a table
/// that joined while capture ran is not known before its first snapshot). A fixture is asked
/// only at the moments it recorded.
const LATER_TABLES: &[(u32, &str, &[&str])] = &[
    (2, "public.late", MOMENTS.split_at(2).1),
    (4, "public.moods", MOMENTS),
    (5, "public.regions", MOMENTS),
];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/archives")
}

fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run pgtrail");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Record a fixture archive of the current format version, and the answers this build gives.
fn record(target: &Path) {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let db = "fixture";
    cluster.psql("postgres", "CREATE DATABASE fixture").unwrap();
    cluster.psql(db, SETUP).unwrap();
    if target.exists() {
        std::fs::remove_dir_all(target).unwrap();
    }
    let archive = target.join("archive");
    let capture = |extra: &[&str]| {
        let lsn = cluster
            .psql(db, "SELECT pg_current_wal_insert_lsn()")
            .unwrap();
        pgtrail()
            .args(["capture", "--slot", "fx", "--publication", "fx"])
            .args(["--no-compact", "--stop-at", &lsn])
            .args(extra)
            .env("PGTRAIL_SOURCE", cluster.url(db))
            .env("PGTRAIL_ARCHIVE", &archive)
            .output()
            .unwrap()
    };
    let mut moments = Vec::new();
    let mut moment = |name: &str| {
        let lsn = cluster.psql(db, "SELECT pg_current_wal_lsn()").unwrap();
        moments.push(format!("{name} {lsn}"));
    };
    assert!(capture(&[]).status.success(), "initial snapshot");
    moment("snapshot");
    for (i, statement) in FIRST.iter().enumerate() {
        cluster
            .psql(db, &format!("BEGIN; {statement} COMMIT;"))
            .unwrap();
        if i == 3 {
            moment("before_truncate");
        }
    }
    assert!(capture(&[]).status.success(), "first changes");
    moment("altered");
    run_ok(pgtrail().args(["compact", "--archive"]).arg(&archive));
    cluster
        .psql(db, "SELECT pg_drop_replication_slot('fx')")
        .unwrap();
    cluster.psql(db, IN_THE_GAP).unwrap();
    let gap = capture(&[]);
    assert!(
        !gap.status.success() && String::from_utf8_lossy(&gap.stderr).contains("gap"),
        "a dropped slot is a gap"
    );
    assert!(capture(&["--resnapshot"]).status.success(), "re-snapshot");
    moment("resnapshot");
    for statement in LAST {
        cluster
            .psql(db, &format!("BEGIN; {statement} COMMIT;"))
            .unwrap();
    }
    assert!(capture(&[]).status.success(), "the log tail");
    moment("tail");
    // Version 3: a column renamed while capture is stopped (no stored value changes, but
    // pgoutput would show a column gone and another come): the next run reads the table again.
    // First a run that looks at the catalog past the tail moment (a checkpoint moves the WAL
    // on), so that the rename is known to have committed after that moment.
    cluster.psql(db, "CHECKPOINT").unwrap();
    assert!(capture(&[]).status.success(), "a look past the tail");
    cluster
        .psql(
            db,
            "ALTER TABLE public.late RENAME COLUMN v TO label; \
             INSERT INTO public.late VALUES (3, 'under the new name');",
        )
        .unwrap();
    assert!(capture(&[]).status.success(), "a renamed column");
    moment("renamed");
    // Version 4: an enum label renamed while capture is stopped (every stored 'ok' reads
    // 'fine' now, and no row changes): the next run reads the table again.
    cluster.psql(db, "CHECKPOINT").unwrap();
    assert!(
        capture(&[]).status.success(),
        "a look past the renamed moment"
    );
    cluster
        .psql(
            db,
            "ALTER TYPE public.mood RENAME VALUE 'ok' TO 'fine'; \
             INSERT INTO public.late VALUES (4, 'after the relabel');",
        )
        .unwrap();
    assert!(capture(&[]).status.success(), "a renamed enum label");
    moment("relabeled");
    // Version 5: a column with a default added to a partitioned table while capture is
    // stopped (its partitions keep the value, the parent nothing): the next run reads it again.
    cluster.psql(db, "CHECKPOINT").unwrap();
    assert!(
        capture(&[]).status.success(),
        "a look past the relabeled moment"
    );
    cluster
        .psql(
            db,
            "ALTER TABLE public.regions ADD COLUMN flag int DEFAULT 5; \
             INSERT INTO public.late VALUES (5, 'after the partitioned default');",
        )
        .unwrap();
    assert!(capture(&[]).status.success(), "a partitioned default");
    moment("partitioned");
    std::fs::write(target.join("moments.txt"), moments.join("\n") + "\n").unwrap();
    for (name, answer) in answers(target, &archive) {
        let path = target.join("answers").join(format!("{name}.txt"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, answer).unwrap();
    }
}

/// The answers an archive gives, by name: queries through `pgtrail sql` and the files of
/// every export layout. Lines of a result whose order SQL does not fix are sorted.
fn answers(fixture: &Path, archive: &Path) -> BTreeMap<String, String> {
    let moments: Vec<(String, String)> = std::fs::read_to_string(fixture.join("moments.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let (name, lsn) = l.split_once(' ').unwrap();
            (name.to_string(), lsn.to_string())
        })
        .collect();
    let sql = |query: &str| {
        run_ok(
            pgtrail()
                .args(["sql", "--format", "csv", "--archive"])
                .arg(archive)
                .arg(query),
        )
    };
    let sorted = |text: String| {
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        lines.join("\n") + "\n"
    };
    let mut out = BTreeMap::new();
    let version: u32 = fixture
        .parent()
        .and_then(|v| v.file_name())
        .and_then(|v| v.to_str())
        .and_then(|v| v.strip_prefix('v'))
        .and_then(|v| v.parse().ok())
        .expect("fixtures/archives/v<N>/<name>");
    for &(_, table, held) in LATER_TABLES
        .iter()
        .filter(|(since, _, _)| version >= *since)
    {
        for (name, lsn) in moments.iter().filter(|(n, _)| held.contains(&n.as_str())) {
            out.insert(
                format!("as_of/{table}@{name}"),
                sorted(sql(&format!("SELECT * FROM as_of_lsn('{table}', '{lsn}')"))),
            );
        }
        out.insert(
            format!("history/{table}"),
            sql(&format!("SELECT * FROM {table} ORDER BY lsn, seq")),
        );
    }
    for table in TABLES {
        for (name, lsn) in &moments {
            out.insert(
                format!("as_of/{table}@{name}"),
                sorted(sql(&format!("SELECT * FROM as_of_lsn('{table}', '{lsn}')"))),
            );
        }
        out.insert(
            format!("history/{table}"),
            sql(&format!(
                "SELECT * FROM \"{}\".\"{}\" ORDER BY lsn, seq",
                table.split('.').next().unwrap(),
                table.split('.').nth(1).unwrap()
            )),
        );
        let (first, last) = (&moments[0].1, &moments[moments.len() - 1].1);
        out.insert(
            format!("diff/{table}"),
            sorted(sql(&format!(
                "SELECT * FROM diff('{table}', '{first}', '{last}')"
            ))),
        );
    }
    out.insert(
        "row_history/public.accounts-1".into(),
        sql("SELECT * FROM row_history('public.accounts', '1') ORDER BY lsn, seq"),
    );
    out.insert(
        "row_history/inventory.items-kb-1".into(),
        sql("SELECT * FROM row_history('inventory.items', 'kb', '1') ORDER BY lsn, seq"),
    );
    out.insert(
        "changes".into(),
        sql("SELECT * FROM changes ORDER BY lsn, seq"),
    );
    out.insert(
        "messages".into(),
        sql("SELECT * FROM pgtrail.messages ORDER BY lsn, seq"),
    );
    let lake = tempfile::tempdir().unwrap();
    for layout in ["changes", "cdf", "scd2", "snapshot"] {
        let to = lake.path().join(layout);
        run_ok(
            pgtrail()
                .args(["export", "--layout", layout, "--archive"])
                .arg(archive)
                .arg("--to")
                .arg(&to),
        );
        for file in walk(&to)
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
        {
            let name = file.strip_prefix(&to).unwrap().display().to_string();
            out.insert(format!("export/{layout}/{name}"), sorted(rows_of(&file)));
        }
    }
    out
}

/// A Parquet file's schema and rows as text, read with the parquet crate's own reader.
fn rows_of(file: &Path) -> String {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut text = String::new();
    let options = FormatOptions::default().with_null("NULL");
    for batch in reader {
        let batch = batch.unwrap();
        if text.is_empty() {
            let names: Vec<String> = batch
                .schema()
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect();
            text.push_str(&format!("# {}\n", names.join(", ")));
        }
        let columns: Vec<ArrayFormatter> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = columns.iter().map(|c| c.value(row).to_string()).collect();
            text.push_str(&cells.join(" | "));
            text.push('\n');
        }
    }
    text
}

/// A writable copy of `fixtures/archives/<version>/shop`'s archive at `to`.
pub(crate) fn copy_fixture(version: &str, to: &Path) {
    copy_dir(&fixtures_dir().join(version).join("shop/archive"), to);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every fixture archive, of every format version so far, answers as it did when recorded.
#[test]
fn archives_of_every_earlier_format_answer_as_recorded() {
    let current = fixtures_dir().join(format!("v{}", pgtrail_store::FORMAT_VERSION));
    if std::env::var_os("PGTRAIL_RECORD_ARCHIVES").is_some() {
        record(&current.join("shop"));
    }
    let mut checked = 0;
    let mut versions: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    versions.sort();
    for version in versions {
        for fixture in std::fs::read_dir(&version).unwrap() {
            let fixture = fixture.unwrap().path();
            // Opening an archive may repair or upgrade it: work on a copy.
            let copy = tempfile::tempdir().unwrap();
            let archive = copy.path().join("archive");
            copy_dir(&fixture.join("archive"), &archive);
            let got = answers(&fixture, &archive);
            let answers_dir = fixture.join("answers");
            if std::env::var_os("PGTRAIL_REWRITE_ANSWERS").is_some() {
                for (name, answer) in &got {
                    let path = answers_dir.join(format!("{name}.txt"));
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, answer).unwrap();
                }
            }
            let mut recorded = BTreeMap::new();
            for path in walk(&answers_dir) {
                let name = path
                    .strip_prefix(&answers_dir)
                    .unwrap()
                    .display()
                    .to_string();
                let name = name.strip_suffix(".txt").unwrap().to_string();
                recorded.insert(name, std::fs::read_to_string(&path).unwrap());
            }
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                recorded.keys().collect::<Vec<_>>(),
                "{}: the same answers exist",
                fixture.display()
            );
            // Every differing answer is named (a change of a replay rule shows in as_of, diff
            // and the export layouts together), the first one in full.
            let differing: Vec<&String> = recorded
                .iter()
                .filter(|(name, answer)| &&got[*name] != answer)
                .map(|(name, _)| name)
                .collect();
            if let Some(first) = differing.first() {
                panic!(
                    "{}: {} answers differ from those recorded with the archive: {differing:?}\n\
                     {first} now:\n{}\n{first} recorded:\n{}",
                    fixture.display(),
                    differing.len(),
                    got[*first],
                    recorded[*first]
                );
            }
            checked += recorded.len();
            // An archive of a pgtrail before evidence (format 5 and older) has no tree: verify
            // accepts it, says so, and raises no false alarm. From format 6 on, every
            // compacted change and archive event is a leaf.
            let verified = pgtrail()
                .args(["verify", "--json", "--archive"])
                .arg(&archive)
                .output()
                .unwrap();
            let report: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
            assert!(verified.status.success(), "{}: {report}", fixture.display());
            let format: u32 = version
                .file_name()
                .and_then(|v| v.to_str())
                .and_then(|v| v.strip_prefix('v'))
                .and_then(|v| v.parse().ok())
                .unwrap();
            if format <= 5 {
                assert_eq!(report["tree_size"], 0, "{report}");
                assert_eq!(report["rows_before_evidence"], report["rows"], "{report}");
            } else {
                assert_eq!(report["rows_before_evidence"], 0, "{report}");
                assert_eq!(
                    report["tree_size"].as_u64().unwrap(),
                    report["rows"].as_u64().unwrap() + report["events"].as_u64().unwrap(),
                    "{report}"
                );
            }
        }
    }
    assert!(checked >= 40, "only {checked} answers checked");
}
