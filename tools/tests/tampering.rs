//! `pgtrail verify` and the independent Python verifier (`tools/evidence/verify_archive.py`,
//! written from the README's format description) on a real archive of every kind of value:
//! both accept it with the same root, and both catch every case of the tampering corpus,
//! each done as an attacker with write access to the archive (but not the key) would, with
//! every checksum and the tree the log records recomputed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Int32Array, RecordBatch, StructArray, UInt32Array};
use datafusion::arrow::compute::{concat_batches, take};
use datafusion::arrow::datatypes::{Int32Type, UInt32Type, UInt64Type};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::file::properties::WriterProperties;
use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_store::evidence::tampering::{recompute_tree, rewrite_manifest};
use pgtrail_store::{ChangeKey, Lsn, SEGMENTS_DIR};

use crate::compaction::copy_archive;
use crate::{capture_until_now, pgtrail};

/// Every kind of value a segment types (and the ones it keeps as PostgreSQL's exact text),
/// TOAST, context and messages.
const ROUND_1: &str = r#"
CREATE TABLE kinds (id int PRIMARY KEY, b bool, s int2, i int4, l int8, f4 float4, f8 float8,
  n numeric(12,3), nn numeric, t text, j jsonb, by bytea, u uuid, d date, tm time, ts timestamp,
  tz timestamptz, iv interval, arr int4[], tarr text[], big text);
ALTER TABLE kinds ALTER big SET STORAGE EXTERNAL;
INSERT INTO kinds VALUES
 (1, true, 1, 2, 3, 1.5, 'NaN', 123.456, 'NaN', 'héllo', '{"a": 1}', '\x00ff',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'infinity', '12:00:01.5', '2020-01-01 10:00',
  'infinity', '1 mon 2 days 00:00:03', '{1,NULL,3}', '{a,NULL}', repeat('x', 100000)),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL),
 (3, false, -1, -2, -3, '-Infinity', -0.0, 'NaN', 1e-20, '', '[]', '', NULL, '2000-02-29', '24:00',
  '-infinity', '2024-06-01 00:00+02', '-1 year', '{}', '{}', 'short');
UPDATE kinds SET i = i + 1 WHERE id = 1;
DELETE FROM kinds WHERE id = 2;
SELECT pg_logical_emit_message(true, '_bemi', '{"user": "ann", "endpoint": "/orders"}');
UPDATE kinds SET t = 'with context' WHERE id = 3;
SELECT pg_logical_emit_message(true, 'audit', 'plain text');
SELECT pg_logical_emit_message(false, 'binary', '\xff00'::bytea);
"#;

const ROUND_2: &str = "
INSERT INTO kinds (id, i, t) SELECT g, g, 'r2 ' || g FROM generate_series(10, 60) g;
UPDATE kinds SET i = i * 2 WHERE id % 3 = 0;
DELETE FROM kinds WHERE id BETWEEN 40 AND 45;
";

/// What both verifiers said of an archive.
struct Verdicts {
    pgtrail_ok: bool,
    pgtrail: serde_json::Value,
    pgtrail_text: String,
    python: Option<(bool, String)>,
}

fn python_ready() -> bool {
    let has = |module: &str| {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for (module, required_by) in [
        ("pyarrow", "PGTRAIL_REQUIRE_PYARROW"),
        ("cryptography", "PGTRAIL_REQUIRE_PYCRYPTO"),
    ] {
        if !has(module) {
            assert!(
                std::env::var_os(required_by).is_none(),
                "{required_by} is set but python3 cannot import {module}"
            );
            eprintln!("skipped: the Python archive verifier (pip install pyarrow cryptography)");
            return false;
        }
    }
    true
}

fn verify(archive: &Path, vkey: &str, trusted: &[&Path], python: bool) -> Verdicts {
    let mut cmd = pgtrail();
    cmd.args(["verify", "--json", "--archive"])
        .arg(archive)
        .args(["--key", vkey]);
    for t in trusted {
        cmd.arg("--trusted-checkpoint").arg(t);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(1),
        "pgtrail verify could not run ({code:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    let python = python.then(|| {
        let mut cmd = Command::new("python3");
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("evidence/verify_archive.py"))
            .arg(archive)
            .args(["--key", vkey]);
        for t in trusted {
            cmd.arg("--trusted-checkpoint").arg(t);
        }
        let out = cmd.output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            matches!(out.status.code(), Some(0) | Some(1)),
            "the Python verifier failed to run: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    });
    Verdicts {
        pgtrail_ok: code == Some(0),
        pgtrail_text: json["problems"].to_string(),
        pgtrail: json,
        python,
    }
}

/// [`verify`], asserting that both verifiers reject the archive, each naming `place` and
/// saying `what`.
fn rejects_naming(
    archive: &Path,
    vkey: &str,
    trusted: &[&Path],
    python: bool,
    place: &str,
    what: &str,
) {
    let v = verify(archive, vkey, trusted, python);
    assert!(!v.pgtrail_ok, "passed: {}", v.pgtrail);
    assert!(
        v.pgtrail_text.contains(place) && v.pgtrail_text.contains(what),
        "{}",
        v.pgtrail_text
    );
    if let Some((ok, said)) = &v.python {
        assert!(!ok && said.contains(place) && said.contains(what), "{said}");
    }
}

/// [`verify`], asserting that both verifiers accept the archive.
fn verifies(archive: &Path, vkey: &str, trusted: &[&Path], python: bool) -> Verdicts {
    let v = verify(archive, vkey, trusted, python);
    assert!(v.pgtrail_ok, "{}", v.pgtrail);
    if let Some((ok, said)) = &v.python {
        assert!(ok, "{said}");
    }
    v
}

fn checkpoint(archive: &Path, key: &Path) -> String {
    let out = pgtrail()
        .args(["checkpoint", "--archive"])
        .arg(archive)
        .arg("--signing-key")
        .arg(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keygen(dir: &Path, file: &str, name: &str) -> (PathBuf, String) {
    let path = dir.join(file);
    let out = pgtrail()
        .args(["keygen", "--name", name, "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    (
        path,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

/// The manifest's segment files as the evidence files list them: (file, rows).
fn listed(archive: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(archive.join("evidence/manifest.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["file"].as_str().unwrap().to_string(),
                s["rows"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The largest segment of table `kinds`.
fn kinds_segment(archive: &Path) -> String {
    listed(archive)
        .into_iter()
        .filter(|(f, _)| f.contains("kinds"))
        .max_by_key(|(_, rows)| *rows)
        .unwrap()
        .0
}

fn read_segment(
    path: &Path,
) -> (
    RecordBatch,
    Vec<datafusion::parquet::file::metadata::KeyValue>,
) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let kv: Vec<_> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|kv| kv.key != "ARROW:schema")
        .collect();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    (concat_batches(&schema, &batches).unwrap(), kv)
}

fn write_segment(
    path: &Path,
    batch: &RecordBatch,
    kv: Vec<datafusion::parquet::file::metadata::KeyValue>,
) {
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let mut w =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// The key range of a batch's rows.
fn key_range(batch: &RecordBatch) -> (ChangeKey, ChangeKey) {
    let lsn = batch.column(0).as_primitive::<UInt64Type>();
    let seq = batch.column(1).as_primitive::<UInt32Type>();
    let key = |i: usize| ChangeKey::new(Lsn(lsn.value(i)), seq.value(i));
    (key(0), key(batch.num_rows() - 1))
}

/// Rewrite segment `file` through `edit`, keep its description, and list the result with its
/// SHA-256, size, rows and key range recomputed; then recompute the tree the log records.
fn forge_segment(archive: &Path, file: &str, edit: impl FnOnce(RecordBatch) -> RecordBatch) {
    let path = archive.join(SEGMENTS_DIR).join(file);
    let (batch, kv) = read_segment(&path);
    let batch = edit(batch);
    write_segment(&path, &batch, kv);
    relist(archive, file, file, &batch);
    recompute_tree(archive).unwrap();
}

/// List `new_file` (holding `batch`) where the manifest listed `old_file`.
fn relist(archive: &Path, old_file: &str, new_file: &str, batch: &RecordBatch) {
    let path = archive.join(SEGMENTS_DIR).join(new_file);
    let sha = pgtrail_store::segment::sha256_file(&path).unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    let (min, max) = key_range(batch);
    edit_listing(archive, old_file, |e| {
        e.file_name = new_file.to_string();
        e.sha256 = sha.clone();
        e.bytes = bytes;
        e.rows = batch.num_rows() as u64;
        e.min_key = min;
        e.max_key = max;
    });
}

/// Edit the manifest's entry of segment `file`, the other entries as they are.
fn edit_listing(archive: &Path, file: &str, edit: impl Fn(&mut pgtrail_store::SegmentEntry)) {
    rewrite_manifest(archive, |entries| {
        entries
            .into_iter()
            .map(|mut e| {
                if e.file_name == file {
                    edit(&mut e);
                }
                e
            })
            .collect()
    })
    .unwrap();
}

/// `batch` with child `field` of struct column `image` replaced by `f` of it.
fn edit_image_int(batch: RecordBatch, image: &str, field: &str) -> RecordBatch {
    let idx = batch.schema().index_of(image).unwrap();
    let (fields, mut columns, nulls) = batch.column(idx).as_struct().clone().into_parts();
    let ci = fields.iter().position(|f| f.name() == field).unwrap();
    let old = columns[ci].as_primitive::<Int32Type>().clone();
    let row = (0..old.len())
        .find(|&r| old.is_valid(r))
        .expect("a row with a value");
    let new: Int32Array = (0..old.len())
        .map(|r| old.is_valid(r).then(|| old.value(r) + i32::from(r == row)))
        .collect();
    columns[ci] = Arc::new(new);
    let mut all = batch.columns().to_vec();
    all[idx] = Arc::new(StructArray::new(fields, columns, nulls));
    RecordBatch::try_new(batch.schema(), all).unwrap()
}

fn flip_byte(path: &Path, at_from_end: Option<u64>) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = match at_from_end {
        Some(back) => bytes.len() - back as usize,
        None => bytes.len() / 2,
    };
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn verify_proves_a_real_archive_and_both_verifiers_catch_every_tampering() {
    let python = python_ready();
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "archive.key", "pgtrail.test/evidence");
    let (other_key, _) = keygen(dir, "other.key", "pgtrail.test/evidence");
    let archive = dir.join("archive");
    cluster.psql("postgres", "CREATE DATABASE evid").unwrap();
    cluster.psql("evid", ROUND_1).unwrap();
    capture_until_now(&cluster, "evid", &archive);
    let first = checkpoint(&archive, &key);
    let first_copy = dir.join("first.checkpoint");
    std::fs::write(&first_copy, &first).unwrap();
    let older = dir.join("older");
    copy_archive(&archive, &older);
    cluster.psql("evid", ROUND_2).unwrap();
    capture_until_now(&cluster, "evid", &archive);
    let second = checkpoint(&archive, &key);
    let second_copy = dir.join("second.checkpoint");
    std::fs::write(&second_copy, &second).unwrap();

    // The archive as captured: both verifiers accept it, with one root.
    let clean = verify(&archive, &vkey, &[&first_copy, &second_copy], python);
    assert!(clean.pgtrail_ok, "{}", clean.pgtrail);
    let size = clean.pgtrail["tree_size"].as_u64().unwrap();
    let root = clean.pgtrail["root"].as_str().unwrap().to_string();
    assert_eq!(
        size,
        clean.pgtrail["rows"].as_u64().unwrap() + clean.pgtrail["events"].as_u64().unwrap(),
        "every change is a leaf, and so is each compaction's watermark"
    );
    assert_eq!(
        clean.pgtrail["events"].as_u64().unwrap(),
        2,
        "one watermark per compaction"
    );
    assert_eq!(clean.pgtrail["attested_size"].as_u64().unwrap(), size);
    assert!(
        second.starts_with(&format!("pgtrail.test/evidence\n{size}\n{root}\n")),
        "{second}"
    );
    let first_size: u64 = first.lines().nth(1).unwrap().parse().unwrap();
    assert!(0 < first_size && first_size < size);
    if let Some((ok, said)) = &clean.python {
        assert!(ok, "{said}");
        assert!(
            said.contains(&format!("tree of {size} leaves, root {root}")),
            "{said}"
        );
        assert!(said.contains("4 checkpoints verified"), "{said}");
    }
    // The older copy is a clean archive too (of fewer changes).
    let older_verdict = verify(&older, &vkey, &[&first_copy], python);
    assert!(older_verdict.pgtrail_ok, "{}", older_verdict.pgtrail);
    // verify keeps its leaves in a temporary file: where none can be made, it says so and
    // where to point it, and gives no verdict (exit 2, not "OK" nor "altered").
    let no_tmp = pgtrail()
        .env("TMPDIR", dir.join("no-such-dir"))
        .args(["verify", "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&no_tmp.stderr);
    assert_eq!(no_tmp.status.code(), Some(2), "{said}");
    assert!(said.contains("set TMPDIR to a directory"), "{said}");

    // A proof that one change is in the signed tree, checked in Python from the proof file
    // and the verifier key alone; an altered proof is refused.
    let (first_change, _) =
        key_range(&read_segment(&archive.join(SEGMENTS_DIR).join(kinds_segment(&archive))).0);
    let change = format!("{}:{}", first_change.commit_lsn, first_change.seq);
    let proved = pgtrail()
        .args(["prove", "--archive"])
        .arg(&archive)
        .args(["--change", &change])
        .output()
        .unwrap();
    assert!(
        proved.status.success(),
        "{}",
        String::from_utf8_lossy(&proved.stderr)
    );
    let proof = String::from_utf8(proved.stdout).unwrap();
    assert!(
        proof.starts_with("c2sp.org/tlog-proof@v1\nextra "),
        "{proof}"
    );
    assert!(
        proof.ends_with(&second),
        "the proof carries the latest checkpoint"
    );
    let proof_file = dir.join("change.proof");
    std::fs::write(&proof_file, &proof).unwrap();
    let bad_file = dir.join("altered.proof");
    let index_line = proof.lines().find(|l| l.starts_with("index ")).unwrap();
    let index: u64 = index_line[6..].parse().unwrap();
    std::fs::write(
        &bad_file,
        proof.replacen(index_line, &format!("index {}", index + 1), 1),
    )
    .unwrap();
    if python {
        let check = |file: &Path| {
            Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("evidence/check_proofs.py"))
                .arg("--proof")
                .arg(file)
                .args(["--key", &vkey])
                .output()
                .unwrap()
        };
        let good = check(&proof_file);
        let said = String::from_utf8_lossy(&good.stdout);
        assert!(good.status.success(), "{said}");
        assert!(
            said.contains(&format!(
                "lsn {}, seq {}",
                first_change.commit_lsn.0, first_change.seq
            )),
            "{said}"
        );
        let bad = check(&bad_file);
        assert!(
            !bad.status.success(),
            "{}",
            String::from_utf8_lossy(&bad.stdout)
        );
    }
    let absent = pgtrail()
        .args(["prove", "--archive"])
        .arg(&archive)
        .args(["--change", "0/1:0"])
        .output()
        .unwrap();
    assert_eq!(absent.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&absent.stderr).contains("not in the tree"));

    // The first checkpoint's tree is a prefix of the second's: a consistency proof an auditor
    // holding both checks without the archive; it fails between the checkpoints swapped.
    let consistency = pgtrail()
        .args(["prove", "--archive"])
        .arg(&archive)
        .arg("--consistency-from")
        .arg(&first_copy)
        .arg("--checkpoint")
        .arg(&second_copy)
        .output()
        .unwrap();
    assert!(
        consistency.status.success(),
        "{}",
        String::from_utf8_lossy(&consistency.stderr)
    );
    let consistency = String::from_utf8(consistency.stdout).unwrap();
    assert!(
        consistency.starts_with(&format!(
            "pgtrail.dev/consistency-proof@v1\n{first_size} {size}\n"
        )),
        "{consistency}"
    );
    let consistency_file = dir.join("consistency.proof");
    std::fs::write(&consistency_file, &consistency).unwrap();
    if python {
        let check = |old: &Path, new: &Path| {
            Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("evidence/check_proofs.py"))
                .arg("--consistency")
                .arg(&consistency_file)
                .arg("--old")
                .arg(old)
                .arg("--new")
                .arg(new)
                .args(["--key", &vkey])
                .output()
                .unwrap()
        };
        let good = check(&first_copy, &second_copy);
        let said = String::from_utf8_lossy(&good.stdout);
        assert!(good.status.success(), "{said}");
        assert!(
            said.contains(&format!(
                "the tree of {first_size} leaves is a prefix of the tree of {size}"
            )),
            "{said}"
        );
        assert!(!check(&second_copy, &first_copy).status.success());
    }

    // A second archive of another database, for a segment swapped in from elsewhere.
    let elsewhere = dir.join("elsewhere");
    cluster.psql("postgres", "CREATE DATABASE evid2").unwrap();
    cluster.psql("evid2", ROUND_1).unwrap();
    capture_until_now(&cluster, "evid2", &elsewhere);
    checkpoint(&elsewhere, &other_key);

    let segment = kinds_segment(&archive);
    // Each case tampers with a copy of the archive, given the segment to work on.
    type Tamper = Box<dyn Fn(&Path, &str)>;
    let elsewhere_segment = kinds_segment(&elsewhere);
    let elsewhere_dir = elsewhere.clone();
    let other = other_key.clone();
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "a flipped bit in a segment's data",
            Box::new(move |a: &Path, seg: &str| flip_byte(&a.join(SEGMENTS_DIR).join(seg), None)),
            "does not match the manifest",
        ),
        (
            "a flipped bit in a segment's footer",
            Box::new(move |a: &Path, seg: &str| {
                flip_byte(&a.join(SEGMENTS_DIR).join(seg), Some(12))
            }),
            "does not match the manifest",
        ),
        (
            "a value edited, every checksum and the tree recomputed",
            Box::new(move |a: &Path, seg: &str| {
                forge_segment(a, seg, |b| edit_image_int(b, "after", "i"))
            }),
            "among leaves",
        ),
        (
            "a change deleted",
            Box::new(move |a: &Path, seg: &str| {
                forge_segment(a, seg, |b| b.slice(1, b.num_rows() - 1))
            }),
            "attests",
        ),
        (
            "a change inserted (forged)",
            Box::new(move |a: &Path, seg: &str| {
                // Before the segment's first change, at a commit LSN no transaction has
                // (a forged change after the last checkpoint is the unattested tail that
                // only the next checkpoint covers: see the README).
                forge_segment(a, seg, |b| {
                    let first = b.slice(0, 1);
                    let lsn = first.column(0).as_primitive::<UInt64Type>().value(0);
                    let mut cols = first.columns().to_vec();
                    cols[0] = Arc::new(datafusion::arrow::array::UInt64Array::from(vec![lsn - 1]));
                    cols[1] = Arc::new(UInt32Array::from(vec![0]));
                    let forged = RecordBatch::try_new(b.schema(), cols).unwrap();
                    concat_batches(&b.schema(), &[forged, b]).unwrap()
                })
            }),
            "its root differs",
        ),
        (
            "two changes reordered",
            Box::new(move |a: &Path, seg: &str| {
                forge_segment(a, seg, |b| {
                    let mut order: Vec<u32> = (0..b.num_rows() as u32).collect();
                    order.swap(0, 1);
                    let order = UInt32Array::from(order);
                    let cols = b
                        .columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            if i < 2 {
                                c.clone()
                            } else {
                                take(c, &order, None).unwrap()
                            }
                        })
                        .collect();
                    RecordBatch::try_new(b.schema(), cols).unwrap()
                })
            }),
            "its root differs",
        ),
        (
            "a segment removed",
            Box::new(move |a: &Path, seg: &str| {
                std::fs::remove_file(a.join(SEGMENTS_DIR).join(seg)).unwrap();
                rewrite_manifest(a, |e| {
                    e.into_iter().filter(|e| e.file_name != seg).collect()
                })
                .unwrap();
                recompute_tree(a).unwrap();
            }),
            "checkpoint",
        ),
        (
            "a segment duplicated",
            Box::new(move |a: &Path, seg: &str| {
                let copy = format!("copy_{seg}");
                std::fs::copy(
                    a.join(SEGMENTS_DIR).join(seg),
                    a.join(SEGMENTS_DIR).join(&copy),
                )
                .unwrap();
                rewrite_manifest(a, |mut e| {
                    let mut dup = e.iter().find(|e| e.file_name == seg).unwrap().clone();
                    dup.file_name = copy.clone();
                    dup.id = 999_999;
                    e.push(dup);
                    e
                })
                .unwrap();
            }),
            "held twice",
        ),
        (
            "a segment swapped with another archive's",
            Box::new({
                let from = elsewhere_dir.join(SEGMENTS_DIR).join(&elsewhere_segment);
                let name = elsewhere_segment.clone();
                move |a: &Path, seg: &str| {
                    std::fs::remove_file(a.join(SEGMENTS_DIR).join(seg)).unwrap();
                    std::fs::copy(&from, a.join(SEGMENTS_DIR).join(&name)).unwrap();
                    let (batch, _) = read_segment(&from);
                    relist(a, seg, &name, &batch);
                    recompute_tree(a).unwrap();
                }
            }),
            "checkpoint",
        ),
        (
            "a compaction's watermark rewritten to another source system, the tree recomputed",
            Box::new(move |a: &Path, _: &str| {
                let mut first = true;
                pgtrail_store::evidence::tampering::rewrite_events(a, 4, |payload| {
                    // The last watermark only: the archive then claims a second source.
                    let mut w: serde_json::Value = serde_json::from_str(payload).unwrap();
                    if !std::mem::take(&mut first) {
                        w["system_id"] = "7000000000000000001".into();
                    }
                    w.to_string()
                })
                .unwrap();
                recompute_tree(a).unwrap();
            }),
            "source system",
        ),
        (
            "the manifest's checksum of a segment edited",
            Box::new(move |a: &Path, seg: &str| {
                edit_listing(a, seg, |e| e.sha256 = "0".repeat(64))
            }),
            "does not match the manifest",
        ),
        (
            // verify sizes its memory from what it reads, never from this count (which once
            // overflowed a sum, and could have asked for more memory than any machine has).
            "the manifest's row count of a segment forged to the largest number",
            Box::new(move |a: &Path, seg: &str| edit_listing(a, seg, |e| e.rows = u64::MAX)),
            "the manifest lists 18446744073709551615",
        ),
        (
            "a checkpoint in the archive edited",
            Box::new(move |a: &Path, _: &str| {
                let path = a.join(format!("evidence/checkpoints/{size}"));
                let text = std::fs::read_to_string(&path).unwrap();
                let edited = text.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size + 1), 1);
                assert_ne!(edited, text);
                std::fs::write(&path, edited).unwrap();
            }),
            "no given --key verifies",
        ),
        (
            "a checkpoint signed by another key of the same name",
            Box::new(move |a: &Path, _: &str| {
                let copy = a.with_extension("signed-elsewhere");
                copy_archive(a, &copy);
                checkpoint(&copy, &other);
                std::fs::copy(
                    copy.join(format!("evidence/checkpoints/{size}")),
                    a.join(format!("evidence/checkpoints/{size}")),
                )
                .unwrap();
            }),
            "no given --key verifies",
        ),
    ];
    for (i, (name, tamper, expected)) in cases.iter().enumerate() {
        let copy = dir.join(format!("case{i}"));
        copy_archive(&archive, &copy);
        tamper(&copy, &segment);
        let v = verify(&copy, &vkey, &[&first_copy, &second_copy], python);
        assert!(
            !v.pgtrail_ok,
            "{name}: pgtrail verify accepted it: {}",
            v.pgtrail
        );
        assert!(
            v.pgtrail_text.contains(expected),
            "{name}: pgtrail verify said {} (expected {expected:?})",
            v.pgtrail_text
        );
        if let Some((ok, said)) = v.python {
            assert!(
                !ok && said.starts_with("FAIL: "),
                "{name}: the Python verifier said {said}"
            );
            if *expected == "source system" {
                assert!(
                    said.contains(expected),
                    "{name}: the Python verifier said {said}"
                );
            }
        }
    }

    // The archive put back to an older copy of itself, while a later checkpoint is trusted.
    let rolled_back = verify(&older, &vkey, &[&first_copy, &second_copy], python);
    assert!(!rolled_back.pgtrail_ok);
    assert!(
        rolled_back.pgtrail_text.contains("rolled back"),
        "{}",
        rolled_back.pgtrail_text
    );
    if let Some((ok, said)) = rolled_back.python {
        assert!(!ok, "{said}");
    }

    // A checkpoint of a forked tree, signed by the real key (a key holder who rewrote
    // history), kept outside as trusted: the archive does not extend it.
    let fork = dir.join("fork");
    copy_archive(&archive, &fork);
    forge_segment(&fork, &segment, |b| edit_image_int(b, "after", "i"));
    std::fs::remove_dir_all(fork.join("evidence/checkpoints")).unwrap();
    let forked = checkpoint(&fork, &key);
    assert!(forked.starts_with(&format!("pgtrail.test/evidence\n{size}\n")));
    assert_ne!(forked, second);
    let forked_copy = dir.join("forked.checkpoint");
    std::fs::write(&forked_copy, &forked).unwrap();
    let v = verify(&archive, &vkey, &[&forked_copy], python);
    assert!(!v.pgtrail_ok);
    assert!(
        v.pgtrail_text.contains("forked.checkpoint") && v.pgtrail_text.contains("root differs"),
        "{}",
        v.pgtrail_text
    );
    if let Some((ok, said)) = v.python {
        assert!(!ok, "{said}");
    }

    // Checkpoints published outside the archive: each one signed is copied there, and
    // signing for an archive behind the latest one there (an older copy) is refused.
    let outside = dir.join("published");
    let publish = |archive: &Path| {
        pgtrail()
            .args(["checkpoint", "--archive"])
            .arg(archive)
            .arg("--signing-key")
            .arg(&key)
            .arg("--publish-checkpoints")
            .arg(&outside)
            .output()
            .unwrap()
    };
    let published = publish(&archive);
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("checkpoint")).unwrap(),
        second
    );
    assert_eq!(
        std::fs::read_to_string(outside.join(size.to_string())).unwrap(),
        second
    );
    let older_signed = std::fs::read_dir(older.join("evidence/checkpoints"))
        .unwrap()
        .count();
    let refused = publish(&older);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("restored from an older copy"), "{said}");
    assert_eq!(
        std::fs::read_dir(older.join("evidence/checkpoints"))
            .unwrap()
            .count(),
        older_signed,
        "nothing was signed for the older copy"
    );

    // The same to an S3 bucket (a real S3-compatible server on loopback), read back with
    // boto3.
    if crate::export::lake_tools_present() {
        let moto = crate::export::start_moto();
        crate::export::lake(&["mkbucket", &moto.endpoint, "evidence"]);
        let publish_s3 = |archive: &Path| {
            pgtrail()
                .args(["checkpoint", "--archive"])
                .arg(archive)
                .arg("--signing-key")
                .arg(&key)
                .args(["--publish-checkpoints", "s3://evidence/shop"])
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ENDPOINT_URL", &moto.endpoint)
                .output()
                .unwrap()
        };
        let published = publish_s3(&archive);
        assert!(
            published.status.success(),
            "{}",
            String::from_utf8_lossy(&published.stderr)
        );
        let downloaded = dir.join("downloaded");
        let names = crate::export::lake(&[
            "download",
            &moto.endpoint,
            "evidence",
            "shop",
            downloaded.to_str().unwrap(),
        ]);
        assert_eq!(names, serde_json::json!([size.to_string(), "checkpoint"]));
        for name in [size.to_string(), "checkpoint".to_string()] {
            assert_eq!(
                std::fs::read_to_string(downloaded.join(&name)).unwrap(),
                second
            );
        }
        let refused = publish_s3(&older);
        let said = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{said}");
        assert!(
            said.contains("restored from an older copy") && said.contains("s3://evidence/shop"),
            "{said}"
        );
    }
}

/// A gap the capture records (the slot dropped while it was stopped) becomes a leaf of the
/// tree at the next compaction: `verify` lists it as attested and the Python verifier, which
/// folds the archive's events into the tree the same way, reaches the same root.
#[test]
fn a_recorded_gap_is_a_leaf_of_the_tree() {
    let python = python_ready();
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "gap.key", "pgtrail.test/gap");
    let archive = dir.join("archive");
    cluster.psql("postgres", "CREATE DATABASE evgap").unwrap();
    cluster
        .psql("evgap", "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'a' FROM generate_series(1, 20) g")
        .unwrap();
    capture_until_now(&cluster, "evgap", &archive);
    checkpoint(&archive, &key);
    cluster
        .psql("evgap", "SELECT pg_drop_replication_slot('evgap')")
        .unwrap();
    cluster
        .psql("evgap", "UPDATE t SET v = 'unseen' WHERE id < 5")
        .unwrap();
    let capture = |extra: &[&str]| {
        pgtrail()
            .args([
                "capture",
                "--slot",
                "evgap",
                "--publication",
                "evgap",
                "--no-compact",
            ])
            .args(extra)
            .args(["--stop-at", &crate::insert_lsn(&cluster, "evgap")])
            .env("PGTRAIL_SOURCE", cluster.url("evgap"))
            .env("PGTRAIL_ARCHIVE", &archive)
            .output()
            .unwrap()
    };
    let refused = capture(&[]);
    assert!(!refused.status.success(), "a dropped slot is a gap");
    let resumed = capture(&["--resnapshot"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let before = verify(&archive, &vkey, &[], python);
    assert!(before.pgtrail_ok, "{}", before.pgtrail);
    assert_eq!(before.pgtrail["gaps"].as_array().unwrap().len(), 1);
    assert_eq!(
        before.pgtrail["attested_gaps"].as_array().unwrap().len(),
        0,
        "not compacted since the gap: not in the tree yet"
    );
    let signed = checkpoint(&archive, &key);
    let after = verify(&archive, &vkey, &[], python);
    assert!(after.pgtrail_ok, "{}", after.pgtrail);
    let attested = after.pgtrail["attested_gaps"].as_array().unwrap();
    assert_eq!(attested.len(), 1, "{}", after.pgtrail);
    assert!(
        attested[0].as_str().unwrap().contains("reason"),
        "{}",
        after.pgtrail
    );
    let size = after.pgtrail["tree_size"].as_u64().unwrap();
    assert!(signed.starts_with(&format!("pgtrail.test/gap\n{size}\n")));
    if let Some((ok, said)) = after.python {
        assert!(ok, "{said}");
        let root = after.pgtrail["root"].as_str().unwrap();
        assert!(said.contains(&format!("root {root}")), "{said}");
    }
}

/// `pgtrail verify --bundle` on a bundle's directory, as JSON; with `python`, the Python
/// verifier (written from the README) must reach the same verdict.
fn verify_bundle(bundle: &Path, vkey: &str, python: bool) -> (bool, serde_json::Value) {
    let out = pgtrail()
        .args(["verify", "--json", "--key", vkey, "--bundle"])
        .arg(bundle)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --bundle printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let ok = json["ok"] == true;
    assert_eq!(out.status.code(), Some(if ok { 0 } else { 1 }), "{json}");
    if python {
        let (code, said) = python_verifier(&[
            "--bundle".as_ref(),
            bundle.as_os_str(),
            "--key".as_ref(),
            vkey.as_ref(),
        ]);
        assert_eq!(
            code,
            Some(if ok { 0 } else { 1 }),
            "the Python verifier disagrees with pgtrail ({json}): {said}"
        );
        if ok {
            assert!(
                said.contains(&format!(
                    "ok: bundle of {} changes in scope",
                    json["changes"]
                )),
                "{said}"
            );
        }
    }
    (ok, json)
}

/// `tools/evidence/verify_archive.py` run with `args`: its exit code and what it printed.
fn python_verifier(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let py = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("evidence/verify_archive.py"))
        .args(args)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&py.stdout).into_owned() + &String::from_utf8_lossy(&py.stderr);
    (py.status.code(), said)
}

/// `pgtrail bundle` of `archive` with the scope `scope` into `out`, which must succeed.
fn write_bundle(archive: &Path, scope: &[&str], out: &Path) {
    let run = pgtrail()
        .arg("bundle")
        .args(scope)
        .arg("--archive")
        .arg(archive)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// A copy of the bundle at `from`, for one tampering case.
fn copy_bundle(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Rewrite a bundle's `bundle.json` for file `file` (its SHA-256 and rows, recomputed).
fn relist_bundle_file(bundle: &Path, file: &str) {
    let path = bundle.join("bundle.json");
    let mut description: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (batch, _) = read_segment(&bundle.join(file));
    for f in description["files"].as_array_mut().unwrap() {
        if f["file"] == file {
            f["sha256"] = pgtrail_store::segment::sha256_file(&bundle.join(file))
                .unwrap()
                .into();
            f["rows"] = (batch.num_rows() as u64).into();
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&description).unwrap()).unwrap();
}

/// An auditor bundle of one table over an LSN range holds exactly that table's changes in the
/// range, and `verify --bundle` proves it against the signed checkpoint; a bundle with a change
/// withheld (its row taken out and its leaf given in its place, so the tree still matches), a
/// value edited, a row taken out, or checked with another key fails.
#[test]
fn a_bundle_proves_its_scope_complete_and_every_tampering_is_caught() {
    let python = python_ready();
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("bundle").unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "bundle.key", "pgtrail.test/bundle");
    let (_, other_vkey) = keygen(dir, "other.key", "pgtrail.test/bundle");
    let archive = dir.join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql(
        "CREATE TABLE a (id int PRIMARY KEY, n int); CREATE TABLE b (id int PRIMARY KEY, n int);
         INSERT INTO a SELECT g, g FROM generate_series(1, 5) g;
         INSERT INTO b SELECT g, g FROM generate_series(1, 5) g;",
    );
    capture_until_now(cluster, &db, &archive);
    let from = crate::insert_lsn(cluster, &db);
    // The same scope by time: the server's clock before and after the round (commit times
    // come from that clock).
    let from_time = psql("SELECT clock_timestamp()");
    // The scope: table a in this round, 10 inserts, 3 updates and 2 deletes, with table b's
    // changes and a message between them.
    psql(
        "INSERT INTO a SELECT g, g FROM generate_series(10, 19) g;
         INSERT INTO b VALUES (100, 1);
         SELECT pg_logical_emit_message(true, 'audit', 'between');
         UPDATE a SET n = n + 100 WHERE id IN (1, 2, 3);
         UPDATE b SET n = 0;
         DELETE FROM a WHERE id IN (4, 5);",
    );
    let to = crate::insert_lsn(cluster, &db);
    let to_time = psql("SELECT clock_timestamp()");
    psql("UPDATE a SET n = -1; INSERT INTO b VALUES (200, 2);");
    capture_until_now(cluster, &db, &archive);
    checkpoint(&archive, &key);

    let bundle = dir.join("bundle");
    write_bundle(
        &archive,
        &["--tables", "a", "--from", &from, "--to", &to],
        &bundle,
    );
    let (ok, report) = verify_bundle(&bundle, &vkey, python);
    assert!(ok, "{report}");
    assert_eq!(report["changes"], 15, "{report}");
    assert_eq!(report["signature_verified"], true);
    assert_eq!(report["complete_through"], to.as_str(), "{report}");
    // The bundle's rows are table a's changes of the round, nothing else.
    let files: Vec<String> = std::fs::read_dir(bundle.join("changes"))
        .unwrap()
        .map(|e| format!("changes/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    let (mut ops, mut rows) = (std::collections::BTreeMap::<String, u64>::new(), 0);
    let (from_lsn, to_lsn): (Lsn, Lsn) = (from.parse().unwrap(), to.parse().unwrap());
    for file in &files {
        let (batch, kv) = read_segment(&bundle.join(file));
        assert!(
            kv.iter().any(|kv| kv.key == "pgtrail.segment"
                && kv.value.as_deref().unwrap_or("").contains("\"name\":\"a\"")),
            "{file} holds table a's segment format"
        );
        let lsn = batch.column(0).as_primitive::<UInt64Type>();
        let op = datafusion::arrow::compute::cast(
            batch.column_by_name("op").unwrap(),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let op = op.as_string::<i32>();
        for r in 0..batch.num_rows() {
            assert!(from_lsn.0 <= lsn.value(r) && lsn.value(r) <= to_lsn.0);
            *ops.entry(op.value(r).to_string()).or_default() += 1;
        }
        rows += batch.num_rows();
    }
    assert_eq!(rows, 15);
    assert_eq!(
        ops,
        [("delete", 2), ("insert", 10), ("update", 3)]
            .into_iter()
            .map(|(o, n)| (o.to_string(), n))
            .collect()
    );

    // A coverage certificate of the same scope: it verifies against the archive and against
    // the bundle; edited, it no longer verifies; one of a wider scope is not what the bundle
    // proves.
    let certify = |to: &str| {
        let out = pgtrail()
            .args([
                "certify",
                "--tables",
                "a",
                "--from",
                &from,
                "--to",
                to,
                "--archive",
            ])
            .arg(&archive)
            .arg("--signing-key")
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let certificate = certify(&to);
    assert!(
        certificate.starts_with("pgtrail.dev/coverage@v1\norigin pgtrail.test/bundle\n")
            && certificate.contains(&format!(
                "\ntables public.a\nfrom {from}\nthrough {to}\nchanges 15\n"
            )),
        "{certificate}"
    );
    let check_certificate = |text: &str, against: &[&str], on: &Path| {
        let file = dir.join("certificate");
        std::fs::write(&file, text).unwrap();
        let out = pgtrail()
            .args(["verify", "--json", "--key", &vkey, "--certificate"])
            .arg(&file)
            .args(against)
            .arg(on)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(
            out.status.code(),
            Some(if json["ok"] == true { 0 } else { 1 })
        );
        json
    };
    // The Python verifier's verdict on a certificate against the bundle: it must agree with
    // pgtrail's, and on a good one read the same statement.
    let python_certificate = |text: &str, pgtrail_ok: bool| {
        if !python {
            return;
        }
        let file = dir.join("certificate.py-check");
        std::fs::write(&file, text).unwrap();
        let (code, said) = python_verifier(&[
            "--bundle".as_ref(),
            bundle.as_os_str(),
            "--certificate".as_ref(),
            file.as_os_str(),
            "--key".as_ref(),
            vkey.as_ref(),
        ]);
        assert_eq!(
            code,
            Some(if pgtrail_ok { 0 } else { 1 }),
            "the Python verifier disagrees with pgtrail on a certificate: {said}"
        );
        if pgtrail_ok {
            assert!(
                said.contains("ok: certificate: 15 changes of public.a from"),
                "{said}"
            );
        }
    };
    let on_archive = check_certificate(&certificate, &["--archive"], &archive);
    assert_eq!(on_archive["ok"], true, "{on_archive}");
    let on_bundle = check_certificate(&certificate, &["--bundle"], &bundle);
    assert_eq!(on_bundle["ok"], true, "{on_bundle}");
    python_certificate(&certificate, true);
    let edited_text = certificate.replace("changes 15", "changes 14");
    let edited = check_certificate(&edited_text, &["--archive"], &archive);
    assert!(
        edited["ok"] == false && edited["problems"].to_string().contains("signature"),
        "{edited}"
    );
    python_certificate(&edited_text, false);
    let wider_text = certify(&crate::insert_lsn(cluster, &db));
    let wider = check_certificate(&wider_text, &["--bundle"], &bundle);
    assert!(
        wider["ok"] == false && wider["problems"].to_string().contains("changes"),
        "{wider}"
    );
    python_certificate(&wider_text, false);
    // By time: the first change committed at or after --from to the last at or before --to,
    // the same 15 changes (its LSNs are the commits', inside the LSN scope above); a time
    // with no change after it stands for no position, and is refused.
    let by_time = pgtrail()
        .args([
            "certify", "--tables", "a", "--from", &from_time, "--to", &to_time,
        ])
        .arg("--archive")
        .arg(&archive)
        .arg("--signing-key")
        .arg(&key)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&by_time.stderr);
    assert!(by_time.status.success(), "{said}");
    assert!(said.contains("is commit LSN"), "{said}");
    let by_time = String::from_utf8(by_time.stdout).unwrap();
    assert!(
        by_time.contains("\ntables public.a\n") && by_time.contains("\nchanges 15\n"),
        "{by_time}"
    );
    let on_archive = check_certificate(&by_time, &["--archive"], &archive);
    assert_eq!(on_archive["ok"], true, "{on_archive}");
    // Against the bundle of the LSN scope, whose start is another position, both verifiers
    // name the difference.
    let on_bundle = check_certificate(&by_time, &["--bundle"], &bundle);
    assert!(
        on_bundle["ok"] == false && on_bundle["problems"].to_string().contains("from"),
        "{on_bundle}"
    );
    python_certificate(&by_time, false);
    let bounds = |text: &str, field: &str| -> pgtrail_store::Lsn {
        let line = text.lines().find_map(|l| l.strip_prefix(field)).unwrap();
        line.trim().parse().unwrap()
    };
    let lsn = |text: &str| -> pgtrail_store::Lsn { text.parse().unwrap() };
    assert!(
        lsn(&from) <= bounds(&by_time, "from ") && bounds(&by_time, "through ") <= lsn(&to),
        "{by_time}"
    );
    let future = pgtrail()
        .args(["certify", "--from", "2999-01-01 00:00:00+00", "--archive"])
        .arg(&archive)
        .arg("--signing-key")
        .arg(&key)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&future.stderr);
    assert!(
        !future.status.success() && said.contains("no change committed at or after"),
        "{said}"
    );

    // Checked with a key that did not sign the checkpoint.
    let (ok, report) = verify_bundle(&bundle, &other_vkey, python);
    assert!(
        !ok && report["problems"].to_string().contains("checkpoint"),
        "{report}"
    );

    let file = files.iter().min().unwrap().clone();
    let case = |name: &str| {
        let copy = dir.join(name);
        copy_bundle(&bundle, &copy);
        copy
    };
    // A value edited, with the file's SHA-256 recomputed.
    let edited = case("edited");
    let (batch, kv) = read_segment(&edited.join(&file));
    write_segment(
        &edited.join(&file),
        &edit_image_int(batch, "after", "n"),
        kv,
    );
    relist_bundle_file(&edited, &file);
    let (ok, report) = verify_bundle(&edited, &vkey, python);
    assert!(
        !ok && report["problems"].to_string().contains("root"),
        "{report}"
    );

    // A row taken out of the file, the leaves left as they were.
    let dropped = case("dropped");
    let (batch, kv) = read_segment(&dropped.join(&file));
    write_segment(
        &dropped.join(&file),
        &batch.slice(1, batch.num_rows() - 1),
        kv,
    );
    relist_bundle_file(&dropped, &file);
    let (ok, report) = verify_bundle(&dropped, &vkey, python);
    assert!(!ok, "{report}");

    // A change withheld: its row taken out and its leaf given in its place (from `pgtrail
    // prove`), so the range still gives the checkpoint's root; only the scope check sees it.
    let withheld = case("withheld");
    let (batch, kv) = read_segment(&withheld.join(&file));
    let lsn = Lsn(batch.column(0).as_primitive::<UInt64Type>().value(0));
    let seq = batch.column(1).as_primitive::<UInt32Type>().value(0);
    let proof = pgtrail()
        .args(["prove", "--change", &format!("{lsn}:{seq}"), "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        proof.status.success(),
        "{}",
        String::from_utf8_lossy(&proof.stderr)
    );
    let proof = String::from_utf8(proof.stdout).unwrap();
    let leaf_data = proof
        .lines()
        .find_map(|l| l.strip_prefix("extra "))
        .unwrap()
        .to_string();
    write_segment(
        &withheld.join(&file),
        &batch.slice(1, batch.num_rows() - 1),
        kv,
    );
    relist_bundle_file(&withheld, &file);
    let file_no = {
        let description: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(withheld.join("bundle.json")).unwrap())
                .unwrap();
        description["files"]
            .as_array()
            .unwrap()
            .iter()
            .position(|f| f["file"] == file.as_str())
            .unwrap()
    };
    let leaves_path = withheld.join("leaves.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&leaves_path)
        .unwrap()
        .lines()
        .map(|line| {
            let mut entry: serde_json::Value = serde_json::from_str(line).unwrap();
            if entry["file"] == file_no {
                if entry["lsn"] == lsn.to_string().as_str() && entry["seq"] == seq {
                    return serde_json::json!({ "leaf_data": leaf_data }).to_string();
                }
                entry["row"] = (entry["row"].as_u64().unwrap() - 1).into();
            }
            entry.to_string()
        })
        .collect();
    std::fs::write(&leaves_path, lines.join("\n") + "\n").unwrap();
    let (ok, report) = verify_bundle(&withheld, &vkey, python);
    assert!(
        !ok && report["problems"].to_string().contains("withholds its row"),
        "{report}"
    );
    assert!(
        !report["problems"].to_string().contains("root"),
        "the tree still matches: {report}"
    );
}

/// An external signer written in Python from C2SP signed-note (standing in for an HSM or a KMS
/// that holds the key): reads the note's text on stdin, prints the signed note. With `alter`,
/// it signs another text than the one given.
const PYTHON_SIGNER: &str = r#"
import base64, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
text = sys.stdin.read()
_, _, name, key_id, key = open(sys.argv[1]).read().strip().split("+", 4)
if len(sys.argv) > 2:
    text += "altered\n"
signature = Ed25519PrivateKey.from_private_bytes(base64.b64decode(key)[1:]).sign(text.encode())
sys.stdout.write(text + "\n\u2014 " + name + " " + base64.b64encode(bytes.fromhex(key_id) + signature).decode() + "\n")
"#;

/// `--signer-command` signs checkpoints through an external command whose output is checked
/// with `--signer-key` before use, and fails closed: a command that fails, signs with another
/// key or signs another text signs nothing, and the archive keeps its last checkpoint.
#[test]
fn an_external_signer_signs_checkpoints_and_a_wrong_one_signs_nothing() {
    if !python_ready() {
        return;
    }
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("signer").unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "hsm.key", "pgtrail.test/hsm");
    let (other_key, _) = keygen(dir, "other.key", "pgtrail.test/hsm");
    let script = dir.join("signer.py");
    std::fs::write(&script, PYTHON_SIGNER).unwrap();
    let archive = dir.join("archive");
    cluster
        .psql(
            &db,
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)",
        )
        .unwrap();
    capture_until_now(cluster, &db, &archive);
    let checkpoint_with = |command: String| {
        pgtrail()
            .args(["checkpoint", "--archive"])
            .arg(&archive)
            .args(["--signer-command", &command, "--signer-key", &vkey])
            .output()
            .unwrap()
    };
    let signer = |key: &Path, extra: &str| {
        format!("python3 '{}' '{}' {extra}", script.display(), key.display())
    };
    let good = checkpoint_with(signer(&key, ""));
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let note = String::from_utf8(good.stdout).unwrap();
    assert!(note.starts_with("pgtrail.test/hsm\n"), "{note}");
    let verified = verify(&archive, &vkey, &[], false);
    assert!(verified.pgtrail_ok, "{}", verified.pgtrail);
    assert_eq!(
        verified.pgtrail["attested_size"],
        verified.pgtrail["tree_size"]
    );

    let latest = || std::fs::read_to_string(archive.join("evidence/checkpoint")).unwrap();
    for (command, why) in [
        ("exit 3".to_string(), "exited with"),
        (signer(&other_key, ""), "not the note signed by"),
        (signer(&key, "alter"), "another text"),
    ] {
        cluster
            .psql(&db, "INSERT INTO t SELECT max(id) + 1 FROM t")
            .unwrap();
        capture_until_now(cluster, &db, &archive);
        let refused = checkpoint_with(command.clone());
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{command}: {said}");
        assert!(
            said.contains(why) && said.contains("nothing was signed"),
            "{command}: {said}"
        );
        assert_eq!(latest(), note, "{command}: no other checkpoint was kept");
    }
    let after = verify(&archive, &vkey, &[], false);
    assert!(after.pgtrail_ok, "{}", after.pgtrail);
}

/// A cosignature checked in Python from C2SP tlog-cosignature alone: prints the time it states.
const PYTHON_COSIGNATURE_CHECK: &str = r#"
import base64, hashlib, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
note, vkey = open(sys.argv[1]).read(), sys.argv[2]
name, key_id, key = vkey.split("+", 2)
key = base64.b64decode(key)
assert key[0] == 4 and hashlib.sha256(name.encode() + b"\n" + key).digest()[:4].hex() == key_id
text, signatures = note[:note.rindex("\n\n") + 1], note[note.rindex("\n\n") + 2:]
for line in signatures.splitlines():
    who, sig = line[2:].split(" ", 1)
    sig = base64.b64decode(sig)
    if who == name and sig[:4].hex() == key_id:
        time = int.from_bytes(sig[4:12], "big")
        message = ("cosignature/v1\ntime %d\n" % time + text).encode()
        Ed25519PublicKey.from_public_bytes(key[1:]).verify(sig[12:], message)
        print("cosigned at", time)
        sys.exit(0)
sys.exit("no cosignature of " + name)
"#;

/// An auditor cosigns a checkpoint with `pgtrail cosign` (after verifying the archive against
/// it); `verify --witness-key` accepts the cosignature, a Python check written from C2SP
/// tlog-cosignature accepts it, and the archive's own verifier passes over the extra line. A
/// cosignature moved to another checkpoint, or with its time edited, is a problem; cosigning
/// with the wrong log key is refused.
#[test]
fn an_auditor_cosigns_a_checkpoint_and_verify_checks_the_cosignature() {
    let python = python_ready();
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("cosign").unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "log.key", "pgtrail.test/cosign");
    let (_, other_vkey) = keygen(dir, "other.key", "pgtrail.test/cosign");
    let auditor_key = dir.join("auditor.key");
    let out = pgtrail()
        .args(["keygen", "--cosigner", "--name", "auditor.example", "--out"])
        .arg(&auditor_key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let witness = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let archive = dir.join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)");
    capture_until_now(cluster, &db, &archive);
    let first = dir.join("first.checkpoint");
    std::fs::write(&first, checkpoint(&archive, &key)).unwrap();
    psql("INSERT INTO t SELECT generate_series(11, 20)");
    capture_until_now(cluster, &db, &archive);
    let second = dir.join("second.checkpoint");
    std::fs::write(&second, checkpoint(&archive, &key)).unwrap();

    let cosign = |log_key: &str| {
        pgtrail()
            .args(["cosign", "--log-key", log_key, "--archive"])
            .arg(&archive)
            .arg("--checkpoint")
            .arg(&first)
            .arg("--key")
            .arg(&auditor_key)
            .output()
            .unwrap()
    };
    let refused = cosign(&other_vkey);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("nothing was cosigned"));
    let cosigned = cosign(&vkey);
    assert!(
        cosigned.status.success(),
        "{}",
        String::from_utf8_lossy(&cosigned.stderr)
    );
    let cosigned = String::from_utf8(cosigned.stdout).unwrap();
    let line = cosigned.lines().last().unwrap().to_string();
    assert!(line.starts_with("— auditor.example "), "{cosigned}");
    let cosigned_file = dir.join("cosigned.checkpoint");
    std::fs::write(&cosigned_file, &cosigned).unwrap();

    let check = |trusted: &Path| {
        let out = pgtrail()
            .args([
                "verify",
                "--json",
                "--key",
                &vkey,
                "--witness-key",
                &witness,
                "--archive",
            ])
            .arg(&archive)
            .arg("--trusted-checkpoint")
            .arg(trusted)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let good = check(&cosigned_file);
    assert_eq!(good["ok"], true, "{good}");
    let first_size: u64 = cosigned.lines().nth(1).unwrap().parse().unwrap();
    assert_eq!(good["witnessed_size"], first_size, "{good}");
    assert!(
        good["checkpoints"].to_string().contains("auditor.example"),
        "{good}"
    );
    if python {
        let script = dir.join("cosignature.py");
        std::fs::write(&script, PYTHON_COSIGNATURE_CHECK).unwrap();
        let py = Command::new("python3")
            .arg(&script)
            .arg(&cosigned_file)
            .arg(&witness)
            .output()
            .unwrap();
        assert!(
            py.status.success(),
            "{}",
            String::from_utf8_lossy(&py.stderr)
        );
        // The archive's verifier in Python passes over the cosignature line.
        let verdicts = verify(&archive, &vkey, &[&cosigned_file], true);
        assert!(verdicts.python.unwrap().0);
    }
    // The cosignature line moved onto the second checkpoint, and its time edited.
    let moved = dir.join("moved.checkpoint");
    std::fs::write(
        &moved,
        format!("{}{line}\n", std::fs::read_to_string(&second).unwrap()),
    )
    .unwrap();
    let bad = check(&moved);
    assert!(
        bad["ok"] == false && bad["problems"].to_string().contains("cosignature"),
        "{bad}"
    );
    let (who, signature) = line.strip_prefix("— ").unwrap().split_once(' ').unwrap();
    let mut bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, signature).unwrap();
    bytes[11] ^= 1;
    let edited = dir.join("edited.checkpoint");
    std::fs::write(
        &edited,
        cosigned.replace(
            &line,
            &format!(
                "— {who} {}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes)
            ),
        ),
    )
    .unwrap();
    let bad = check(&edited);
    assert!(
        bad["ok"] == false && bad["problems"].to_string().contains("cosignature"),
        "{bad}"
    );
}

/// `pgtrail redact` erases a person's values from archived changes (their context, before and
/// after images but the key columns): the values are gone from every answer, the archive still
/// verifies against the checkpoint signed before the erasure (both verifiers), a bundle over the
/// redacted changes verifies, and the receipts become leaves at the next compaction.
#[test]
fn a_redacted_value_is_gone_and_the_archive_still_verifies() {
    let python = python_ready();
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("redact").unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "redact.key", "pgtrail.test/redact");
    let archive = dir.join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql("CREATE TABLE people (id int PRIMARY KEY, name text, ssn text)");
    capture_until_now(cluster, &db, &archive);
    psql(
        "BEGIN;
         SELECT pg_logical_emit_message(true, '_bemi', '{\"user\": \"ann-herself\"}');
         INSERT INTO people VALUES (1, 'ann', 'ssn-111-22'), (2, 'bob', 'ssn-333-44');
         COMMIT;
         UPDATE people SET ssn = 'ssn-555-66' WHERE id = 1;
         UPDATE people SET name = 'robert' WHERE id = 2;",
    );
    capture_until_now(cluster, &db, &archive);
    let signed = dir.join("before-redaction.checkpoint");
    std::fs::write(&signed, checkpoint(&archive, &key)).unwrap();
    // A keyframe of the table holds ann's values: the redaction must unlist it.
    let keyframes = || -> usize {
        let out = crate::pgtrail_ok(&archive, &["keyframes", "--json"]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    crate::pgtrail_ok(
        &archive,
        &[
            "keyframes",
            "--rebuild",
            "--keyframe-changes",
            "1",
            "--keyframe-rows-factor",
            "1",
        ],
    );
    assert!(keyframes() >= 1, "a keyframe of people was written");

    let ann: Vec<(u64, u32)> = crate::pgtrail_sql(
        &archive,
        "csv",
        "SELECT lsn, seq FROM public.people WHERE coalesce(after['id'], before['id']) = 1 ORDER BY lsn, seq",
    )
    .lines()
    .skip(1)
    .map(|l| {
        let (lsn, seq) = l.split_once(',').unwrap();
        (lsn.parse().unwrap(), seq.parse().unwrap())
    })
    .collect();
    assert_eq!(ann.len(), 2, "ann's insert and update");
    let mut redact = pgtrail();
    redact
        .args(["redact", "--reason", "GDPR request 42", "--archive"])
        .arg(&archive);
    for (lsn, seq) in &ann {
        redact.args(["--change", &format!("{}:{seq}", Lsn(*lsn))]);
    }
    let out = redact.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Gone from the history and from the state, with the key and bob's values kept.
    let history = crate::pgtrail_sql(
        &archive,
        "csv",
        "SELECT op, context, before, after FROM public.people ORDER BY lsn, seq",
    );
    // (The context of the transaction stays on bob's change of it: only ann's are redacted.)
    for secret in ["ssn-111-22", "ssn-555-66", "\"\"ann\"\""] {
        assert!(
            !history.contains(secret),
            "{secret} is still in the history: {history}"
        );
    }
    assert!(
        history.contains("ssn-333-44") && history.contains("robert"),
        "{history}"
    );
    let state = crate::pgtrail_sql(
        &archive,
        "csv",
        &format!(
            "SELECT id FROM as_of_lsn('public.people', '{}') ORDER BY id",
            crate::insert_lsn(cluster, &db)
        ),
    );
    assert_eq!(state, "id\n1\n2\n", "the redacted row is still a row");
    assert_eq!(
        keyframes(),
        0,
        "the redaction unlisted the keyframes holding ann's values"
    );
    let rows = crate::pgtrail_sql(
        &archive,
        "csv",
        &format!(
            "SELECT * FROM as_of_lsn('public.people', '{}')",
            crate::insert_lsn(cluster, &db)
        ),
    );
    assert!(
        !rows.contains("ssn-555-66") && rows.contains("robert"),
        "{rows}"
    );

    // The salts of the erased parts are gone too: the run's seed is erased, its changes'
    // salts are recorded one by one, and the redacted parts' are zero.
    let tree: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(archive.join("evidence/tree.json")).unwrap())
            .unwrap();
    let sealed: Vec<&serde_json::Value> = tree["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["seed"].is_null())
        .collect();
    assert_eq!(
        sealed.len(),
        1,
        "one compaction run held ann's changes: {tree}"
    );
    let salts = std::fs::read(
        archive
            .join("evidence")
            .join(sealed[0]["salts"].as_str().unwrap()),
    )
    .unwrap();
    let mut zeroed = 0;
    for record in salts.chunks_exact(76) {
        let lsn = u64::from_be_bytes(record[..8].try_into().unwrap());
        let seq = u32::from_be_bytes(record[8..12].try_into().unwrap());
        let parts = &record[12..];
        if ann.contains(&(lsn, seq)) {
            assert!(parts.iter().all(|b| *b == 0), "ann's salts are erased");
            zeroed += 1;
        } else {
            assert!(parts.iter().any(|b| *b != 0), "others' salts are kept");
        }
    }
    assert_eq!(zeroed, 2);

    // The evidence is whole: the checkpoint signed before the erasure still verifies.
    verifies(&archive, &vkey, &[&signed], python);
    // A bundle over the redacted changes carries their erased digests.
    let bundle = dir.join("bundle");
    write_bundle(&archive, &["--tables", "people"], &bundle);
    let (ok, report) = verify_bundle(&bundle, &vkey, python);
    assert!(ok, "{report}");
    assert_eq!(report["changes"], 4, "{report}");

    // The receipts are leaves after the next compaction, with the reason.
    psql("INSERT INTO people VALUES (3, 'cy', 'ssn-777-88')");
    capture_until_now(cluster, &db, &archive);
    checkpoint(&archive, &key);
    let v = verify(&archive, &vkey, &[&signed], python);
    assert!(v.pgtrail_ok, "{}", v.pgtrail);
    let receipts = v.pgtrail["redactions"].as_array().unwrap();
    assert_eq!(receipts.len(), 2, "{}", v.pgtrail);
    assert!(
        receipts
            .iter()
            .all(|r| r.as_str().unwrap().contains("GDPR request 42"))
    );
    if let Some((ok, said)) = &v.python {
        assert!(ok, "{said}");
    }

    // A change still in the log cannot be redacted yet; it says what to do.
    psql("UPDATE people SET ssn = 'x' WHERE id = 3");
    capture_until_now(cluster, &db, &archive);
    let tail = crate::pgtrail_sql(
        &archive,
        "csv",
        "SELECT lsn, seq FROM public.people WHERE after['ssn'] = 'x'",
    );
    let (lsn, seq) = tail.lines().nth(1).unwrap().split_once(',').unwrap();
    let out = pgtrail()
        .args(["redact", "--reason", "r", "--archive"])
        .arg(&archive)
        .args(["--change", &format!("{}:{seq}", Lsn(lsn.parse().unwrap()))])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pgtrail compact"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An erasure kept off the record: bob's update redacted, its receipt hidden (marked as a
    // leaf already) before the next compaction. Once that compaction's watermark is in the
    // tree, both verifiers name the change.
    let bob: String = crate::pgtrail_sql(
        &archive,
        "csv",
        "SELECT lsn, seq FROM public.people WHERE after['name'] = 'robert'",
    );
    let (lsn, seq) = bob.lines().nth(1).unwrap().split_once(',').unwrap();
    let bob = format!("{}:{seq}", Lsn(lsn.parse().unwrap()));
    psql("INSERT INTO people VALUES (4, 'dee', 'ssn-999-00')");
    capture_until_now(cluster, &db, &archive);
    checkpoint(&archive, &key);
    crate::pgtrail_ok(
        &archive,
        &["redact", "--reason", "quietly", "--change", &bob],
    );
    assert_eq!(
        pgtrail_store::evidence::tampering::hide_redaction_receipts(&archive).unwrap(),
        1
    );
    let v = verify(&archive, &vkey, &[&signed], python);
    assert!(v.pgtrail_ok, "pending, not yet a problem: {}", v.pgtrail);
    assert!(
        v.pgtrail["warnings"]
            .to_string()
            .contains("becomes a leaf at the next one"),
        "{}",
        v.pgtrail
    );
    psql("INSERT INTO people VALUES (5, 'eve', 'ssn-000-11')");
    capture_until_now(cluster, &db, &archive);
    checkpoint(&archive, &key);
    let bob_key = bob.replace(':', "#");
    rejects_naming(&archive, &vkey, &[&signed], python, &bob_key, "no receipt");
}

/// The `lsn:seq` of each change of `table` its SQL filter picks, in order.
fn changes_where(archive: &Path, table: &str, filter: &str) -> Vec<String> {
    crate::pgtrail_sql(
        archive,
        "csv",
        &format!("SELECT lsn, seq FROM {table} WHERE {filter} ORDER BY lsn, seq"),
    )
    .lines()
    .skip(1)
    .map(|l| {
        let (lsn, seq) = l.split_once(',').unwrap();
        format!("{}:{seq}", Lsn(lsn.parse().unwrap()))
    })
    .collect()
}

/// An archive of `people` (six rows inserted, then each updated) captured and signed, for
/// the erasure tests: (the database, the work directory, the signing key, the verifier key,
/// the archive, the checkpoint signed first).
fn people_archive(name: &str) -> (String, tempfile::TempDir, PathBuf, String, PathBuf, PathBuf) {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database(name).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (key, vkey) = keygen(work.path(), "held.key", "pgtrail.test/held");
    let archive = work.path().join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql("CREATE TABLE people (id int PRIMARY KEY, name text, ssn text)");
    capture_until_now(cluster, &db, &archive);
    psql(
        "INSERT INTO people SELECT g, 'p' || g, 'ssn-' || g FROM generate_series(1, 6) g;
         UPDATE people SET ssn = ssn || '-new';",
    );
    capture_until_now(cluster, &db, &archive);
    let signed = work.path().join("first.checkpoint");
    std::fs::write(&signed, checkpoint(&archive, &key)).unwrap();
    (db, work, key, vkey, archive, signed)
}

/// One more row, captured, compacted and signed: the receipts and holds queued since become
/// leaves.
fn compact_more(db: &str, archive: &Path, key: &Path, id: u32) {
    let cluster = Cluster::shared();
    cluster
        .psql(
            db,
            &format!("INSERT INTO people VALUES ({id}, 'more', 'x')"),
        )
        .unwrap();
    capture_until_now(cluster, db, archive);
    checkpoint(archive, key);
}

#[test]
fn each_erasure_of_a_change_has_its_own_receipt() {
    let python = python_ready();
    let (db, _work, key, vkey, archive, signed) = people_archive("twiceredact");
    // One change redacted twice, each time other parts: each erasure is a receipt of its own
    // (a second one used to be kept off the record, its change having a receipt already).
    let first = changes_where(&archive, "public.people", "after['id'] = '1'");
    crate::pgtrail_ok(
        &archive,
        &[
            "redact", "--reason", "ticket 1", "--parts", "after", "--change", &first[1],
        ],
    );
    crate::pgtrail_ok(
        &archive,
        &[
            "redact", "--reason", "ticket 2", "--parts", "before", "--change", &first[1],
        ],
    );
    compact_more(&db, &archive, &key, 100);
    let v = verifies(&archive, &vkey, &[&signed], python);
    let receipts = v.pgtrail["redactions"].to_string();
    assert!(
        receipts.contains("ticket 1") && receipts.contains("ticket 2"),
        "{}",
        v.pgtrail
    );
    // A change erased twice, the second erasure's receipt hidden before the next compaction
    // (as a forger would): named as erased again off the record.
    let second = changes_where(&archive, "public.people", "after['id'] = '2'")[1].clone();
    crate::pgtrail_ok(
        &archive,
        &[
            "redact", "--reason", "twice", "--parts", "context", "--change", &second,
        ],
    );
    compact_more(&db, &archive, &key, 101);
    crate::pgtrail_ok(
        &archive,
        &[
            "redact", "--reason", "twice", "--parts", "after", "--change", &second,
        ],
    );
    assert_eq!(
        pgtrail_store::evidence::tampering::hide_redaction_receipts(&archive).unwrap(),
        1
    );
    compact_more(&db, &archive, &key, 102);
    let second = second.replace(':', "#");
    let what = "erased again with no receipt";
    rejects_naming(&archive, &vkey, &[&signed], python, &second, what);
}

#[test]
fn a_logical_message_is_redacted_and_the_archive_still_verifies() {
    let python = python_ready();
    let (db, _work, key, vkey, archive, signed) = people_archive("redactmessage");
    let cluster = Cluster::shared();
    cluster
        .psql(
            &db,
            "SELECT pg_logical_emit_message(true, 'audit', 'ann asked: ssn-123-45');
             SELECT pg_logical_emit_message(false, 'audit', 'kept as it is');
             SELECT pg_logical_emit_message(true, 'audit', '\\xff00'::bytea);",
        )
        .unwrap();
    compact_more(&db, &archive, &key, 100);
    let messages = || {
        crate::pgtrail_sql(
            &archive,
            "csv",
            "SELECT lsn, seq, content IS NULL AS gone, content_text FROM pgtrail.messages ORDER BY lsn, seq",
        )
    };
    // Each message's `lsn,seq,` as listed, and its key for `--change`, by its text (the
    // non-transactional one has the lowest LSN: it is decoded when emitted).
    let listed = messages();
    assert_eq!(listed.lines().count(), 4, "{listed}");
    let find = |text: &str| -> (String, String) {
        let line = listed
            .lines()
            .find(|l| l.ends_with(&format!(",false,{text}")))
            .unwrap_or_else(|| panic!("no message {text:?}: {listed}"));
        let mut f = line.split(',');
        let (lsn, seq) = (f.next().unwrap(), f.next().unwrap());
        (
            format!("{lsn},{seq},"),
            format!("{}:{seq}", Lsn(lsn.parse().unwrap())),
        )
    };
    let (ann, kept, binary) = (
        find("ann asked: ssn-123-45"),
        find("kept as it is"),
        find(""),
    );
    // Asked for a part a message does not have: refused, saying which it has.
    let out = pgtrail()
        .args(["redact", "--reason", "r", "--parts", "before", "--archive"])
        .arg(&archive)
        .args(["--change", &ann.1])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--parts content"), "{said}");
    // The default parts take the content; the not-UTF-8 one goes too.
    for (_, k) in [&ann, &binary] {
        crate::pgtrail_ok(&archive, &["redact", "--reason", "GDPR 7", "--change", k]);
    }
    let after = messages();
    assert!(!after.contains("ssn-123-45"), "{after}");
    let row = |(prefix, _): &(String, String)| {
        after
            .lines()
            .find(|l| l.starts_with(prefix.as_str()))
            .unwrap()
            .to_string()
    };
    assert!(row(&ann).ends_with(",true,"), "erased, unknown: {after}");
    assert!(row(&binary).ends_with(",true,"), "erased, unknown: {after}");
    assert!(row(&kept).ends_with(",false,kept as it is"), "{after}");
    // Asked again: erased already, nothing new on the record.
    let out = crate::pgtrail_ok(
        &archive,
        &[
            "redact", "--reason", "again", "--parts", "content", "--change", &ann.1,
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("erased already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The checkpoint signed before the erasure still verifies, with both verifiers, and the
    // receipts are leaves after the next compaction.
    verifies(&archive, &vkey, &[&signed], python);
    compact_more(&db, &archive, &key, 101);
    let v = verifies(&archive, &vkey, &[&signed], python);
    let receipts = v.pgtrail["redactions"].as_array().unwrap();
    assert_eq!(receipts.len(), 2, "{}", v.pgtrail);
    // A hold over every table takes the messages: the kept one is not erased under it.
    crate::pgtrail_ok(&archive, &["hold", "--reason", "matter 12"]);
    let out = pgtrail()
        .args(["redact", "--reason", "r", "--archive"])
        .arg(&archive)
        .args(["--change", &kept.1])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("matter 12"), "{said}");
    assert!(messages().contains("kept as it is"));
}

#[test]
fn an_erasure_under_a_legal_hold_is_caught() {
    let python = python_ready();
    // A hold over the table; the holds' table then emptied, as a forger with the host would,
    // so that pgtrail no longer refuses: a redaction (in one archive) and a purge (in
    // another) under the hold go through, and both verifiers name a change erased while the
    // hold, in the tree, was in force.
    for erasure in ["redact", "purge"] {
        let (db, _work, key, vkey, archive, signed) = people_archive(erasure);
        crate::pgtrail_ok(
            &archive,
            &["hold", "--tables", "people", "--reason", "matter 11"],
        );
        compact_more(&db, &archive, &key, 100);
        verifies(&archive, &vkey, &[&signed], python);
        assert_eq!(
            pgtrail_store::evidence::tampering::forget_holds(&archive).unwrap(),
            1
        );
        // Row 3's insert; a purge before row 100's insert (after every update) erases each
        // row's insert.
        let third = changes_where(&archive, "public.people", "after['id'] = '3'");
        let more = changes_where(&archive, "public.people", "after['id'] = '100'").remove(0);
        let (args, said) = match erasure {
            "redact" => (
                vec!["--change", third[0].as_str()],
                "erased while legal hold 1",
            ),
            _ => (
                vec![
                    "--tables",
                    "people",
                    "--before",
                    more.split_once(':').unwrap().0,
                ],
                "purged while legal hold 1",
            ),
        };
        let mut erase = vec![erasure, "--reason", "under the hold"];
        erase.extend(args);
        let victim = match erasure {
            "redact" => third[0].clone(),
            _ => changes_where(&archive, "public.people", "after['id'] = '1'")[0].clone(),
        };
        crate::pgtrail_ok(&archive, &erase);
        compact_more(&db, &archive, &key, 101);
        let victim = victim.replace(':', "#");
        rejects_naming(&archive, &vkey, &[&signed], python, &victim, said);
    }
}

/// The key index and key-ordered copy beside a segment are derived files `row_history`
/// believes once their own checksums hold. `pgtrail verify` compares both with their segment:
/// one rewritten consistently with its checksums (which would make `row_history` show what the
/// segment does not hold) is a problem naming the file; a damaged or missing one, which readers
/// notice and do without, is a warning. (The Python verifier checks the evidence only, so these
/// cases are not part of the corpus both verifiers must agree on.)
#[test]
fn verify_checks_each_key_index_and_key_ordered_copy_against_its_segment() {
    use pgtrail_store::segment::{key_copy, key_index};
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "keys.key", "pgtrail.test/keys");
    let archive = dir.join("archive");
    cluster.psql("postgres", "CREATE DATABASE evkeys").unwrap();
    cluster.psql("evkeys", ROUND_1).unwrap();
    cluster.psql("evkeys", ROUND_2).unwrap();
    capture_until_now(&cluster, "evkeys", &archive);
    // Compacts the log into segments, each with its key index and key-ordered copy.
    checkpoint(&archive, &key);

    let clean = verify(&archive, &vkey, &[], false);
    assert!(clean.pgtrail_ok, "{}", clean.pgtrail);
    assert!(
        clean.pgtrail["key_indexes_checked"].as_u64().unwrap() > 0
            && clean.pgtrail["key_copies_checked"].as_u64().unwrap() > 0,
        "{}",
        clean.pgtrail
    );
    assert!(
        clean.pgtrail["warnings"].as_array().unwrap().is_empty(),
        "{}",
        clean.pgtrail
    );

    let segment = kinds_segment(&archive);
    let case = |name: &str| {
        let to = dir.join(name);
        copy_archive(&archive, &to);
        let seg_path = to.join(SEGMENTS_DIR).join(&segment);
        let seg_sha = pgtrail_store::segment::sha256_file(&seg_path).unwrap();
        let mut copy_path = seg_path.clone().into_os_string();
        copy_path.push(key_copy::KEY_COPY_SUFFIX);
        (to, seg_path, seg_sha, PathBuf::from(copy_path))
    };
    let warned = |v: &Verdicts, what: &str| {
        v.pgtrail["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains(what))
    };

    // A value of the copy edited, its SHA-256 recomputed and named in a rewritten index.
    let (forged, seg_path, seg_sha, copy_path) = case("forged-copy");
    let (batch, kv) = read_segment(&copy_path);
    write_segment(&copy_path, &edit_image_int(batch, "after", "i"), kv);
    let copy_sha = pgtrail_store::segment::sha256_file(&copy_path).unwrap();
    let entries = key_index::entries(&seg_path, &seg_sha).unwrap();
    key_index::write_index(
        seg_path.parent().unwrap(),
        &segment,
        &seg_sha,
        &entries,
        Some(&copy_sha),
    )
    .unwrap();
    let v = verify(&forged, &vkey, &[], false);
    assert!(!v.pgtrail_ok, "{}", v.pgtrail);
    assert!(
        v.pgtrail_text
            .contains(&format!("key-ordered copy {segment}.keyrows, row")),
        "{}",
        v.pgtrail_text
    );
    assert!(
        v.pgtrail_text.contains("pgtrail compact"),
        "{}",
        v.pgtrail_text
    );

    // An entry dropped from the index, rewritten with every digest of its own recomputed: the
    // key's change it named would be missing from row_history.
    let (dropped, seg_path, seg_sha, _) = case("dropped-entry");
    let mut entries = key_index::entries(&seg_path, &seg_sha).unwrap();
    let copy_sha = key_index::check(&seg_path, &seg_sha).unwrap();
    entries.remove(entries.len() / 2);
    key_index::write_index(
        seg_path.parent().unwrap(),
        &segment,
        &seg_sha,
        &entries,
        copy_sha.as_deref(),
    )
    .unwrap();
    let v = verify(&dropped, &vkey, &[], false);
    assert!(!v.pgtrail_ok, "{}", v.pgtrail);
    assert!(
        v.pgtrail_text
            .contains(&format!("key index {segment}.keys")),
        "{}",
        v.pgtrail_text
    );

    // A flipped byte in the copy: its SHA-256 no longer matches the index, so readers read the
    // segment instead; verify warns and the archive still verifies.
    let (flipped, _, _, copy_path) = case("flipped-copy");
    flip_byte(&copy_path, None);
    let v = verify(&flipped, &vkey, &[], false);
    assert!(v.pgtrail_ok, "{}", v.pgtrail);
    assert!(warned(&v, "key-ordered copy"), "{}", v.pgtrail);
    assert_eq!(
        v.pgtrail["key_copies_checked"].as_u64().unwrap() + 1,
        clean.pgtrail["key_copies_checked"].as_u64().unwrap()
    );

    // A flipped byte in the index: its block digests catch it; a warning, not a problem.
    let (flipped_index, seg_path, _, _) = case("flipped-index");
    let mut index_path = seg_path.into_os_string();
    index_path.push(key_index::KEY_INDEX_SUFFIX);
    flip_byte(Path::new(&index_path), Some(40));
    let v = verify(&flipped_index, &vkey, &[], false);
    assert!(v.pgtrail_ok, "{}", v.pgtrail);
    assert!(
        !v.pgtrail["warnings"].as_array().unwrap().is_empty(),
        "{}",
        v.pgtrail
    );

    // Both removed: row_history scans the segment, nothing to report.
    let (removed, seg_path, _, copy_path) = case("removed");
    std::fs::remove_file(&copy_path).unwrap();
    let mut index_path = seg_path.into_os_string();
    index_path.push(key_index::KEY_INDEX_SUFFIX);
    std::fs::remove_file(&index_path).unwrap();
    let v = verify(&removed, &vkey, &[], false);
    assert!(v.pgtrail_ok, "{}", v.pgtrail);
    assert!(
        v.pgtrail["warnings"].as_array().unwrap().is_empty(),
        "{}",
        v.pgtrail
    );
    assert_eq!(
        v.pgtrail["key_indexes_checked"].as_u64().unwrap() + 1,
        clean.pgtrail["key_indexes_checked"].as_u64().unwrap()
    );
}

/// A retention purge erases a table's history before a moment and keeps what the table held
/// there: `as_of` at the moment and later still equals what PostgreSQL held, every value only
/// the history before it knew is gone, and the archive still verifies (both verifiers) with a
/// checkpoint signed before the purge. A legal hold over the history stops the purge until it
/// is released, and the hold, its release and the purge's one receipt are leaves.
/// `SELECT COLUMNS FROM as_of_lsn(TABLE, LSN) ORDER BY id` over `archive`, as CSV lines without
/// the header (as `psql` prints `format('%s,%s', …)` of the same rows).
fn as_of_rows(archive: &Path, columns: &str, table: &str, lsn: &str) -> String {
    let csv = crate::pgtrail_sql(
        archive,
        "csv",
        &format!("SELECT {columns} FROM as_of_lsn('{table}', '{lsn}') ORDER BY id"),
    );
    csv.lines().skip(1).collect::<Vec<_>>().join("\n")
}

/// Whether `word` is one of `text`'s words (runs of ASCII letters and digits).
fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|t| t == word)
}

#[test]
fn a_purge_keeps_the_state_at_its_moment_and_a_legal_hold_stops_it() {
    let python = python_ready();
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("purge").unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "purge.key", "pgtrail.test/purge");
    let archive = dir.join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql(
        "CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, note text NOT NULL);
         CREATE TABLE pets (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE lines (msg text) ; ALTER TABLE lines REPLICA IDENTITY FULL;",
    );
    capture_until_now(cluster, &db, &archive);
    // Before the moment: inserts, updates, deletes, a key change, with context.
    psql(
        "BEGIN;
         SELECT pg_logical_emit_message(true, '_bemi', '{\"user\": \"clerk-old\"}');
         INSERT INTO people SELECT g, 'n' || g, 'a' || g || 'x' FROM generate_series(1, 40) g;
         COMMIT;
         UPDATE people SET note = 'b' || id || 'x' WHERE id % 3 = 0;
         DELETE FROM people WHERE id % 5 = 0;
         UPDATE people SET id = 107, note = 'k107x' WHERE id = 7;
         UPDATE people SET note = 'c' || id || 'x' WHERE id % 6 = 0;
         INSERT INTO pets SELECT g, 'pet' || g FROM generate_series(1, 10) g;
         INSERT INTO lines VALUES ('one');",
    );
    capture_until_now(cluster, &db, &archive);
    let moment = crate::insert_lsn(cluster, &db);
    let state_sql = "SELECT coalesce(string_agg(format('%s,%s,%s', id, name, note), E'\\n' ORDER BY id), '') FROM people";
    let at_moment = psql(state_sql);
    // Every note the history before the moment held, and those the table held at it.
    let notes_before: Vec<String> = (1..=40)
        .flat_map(|i| [format!("a{i}x"), format!("b{i}x"), format!("c{i}x")])
        .chain(["k107x".to_string()])
        .collect();
    let kept: Vec<String> = psql("SELECT string_agg(note, ',') FROM people")
        .split(',')
        .map(str::to_string)
        .collect();
    // After it: some old rows change again, new ones come, one goes.
    psql(
        "UPDATE people SET note = 'after' || id WHERE id % 4 = 0;
         INSERT INTO people SELECT g, 'n' || g, 'new' || g FROM generate_series(200, 210) g;
         DELETE FROM people WHERE id = 1;
         UPDATE pets SET name = name || '+' WHERE id % 2 = 0;
         DELETE FROM pets WHERE id = 3;",
    );
    capture_until_now(cluster, &db, &archive);
    let at_end_lsn = crate::insert_lsn(cluster, &db);
    let at_end = psql(state_sql);
    let pets_sql = "SELECT string_agg(format('%s,%s', id, name), E'\\n' ORDER BY id) FROM pets";
    let pets_at_end = psql(pets_sql);
    let signed = dir.join("before-purge.checkpoint");
    std::fs::write(&signed, checkpoint(&archive, &key)).unwrap();

    let as_of = |lsn: &str| as_of_rows(&archive, "id, name, note", "public.people", lsn);
    assert_eq!(
        as_of(&moment),
        at_moment,
        "as_of at the moment, before the purge"
    );

    let purge = |extra: &[&str]| {
        pgtrail()
            .args(["purge", "--reason", "retention: two years", "--archive"])
            .arg(&archive)
            .args(extra)
            .output()
            .unwrap()
    };
    // A hold over part of the history before the moment stops the purge, naming the hold.
    let first_half: Lsn = moment.parse().unwrap();
    let out = crate::pgtrail_ok(
        &archive,
        &[
            "hold",
            "--tables",
            "people",
            "--to",
            &Lsn(first_half.0 - 1).to_string(),
            "--reason",
            "matter 7, counsel ref A-12",
        ],
    );
    let hold: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hold["id"], 1, "{hold}");
    let out = purge(&["--tables", "people", "--before", &moment]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a held history was purged: {said}");
    assert!(
        said.contains("legal hold 1") && said.contains("matter 7"),
        "{said}"
    );
    assert_eq!(as_of(&moment), at_moment, "a refused purge changed nothing");
    // Released (with its reason), the purge goes through.
    crate::pgtrail_ok(
        &archive,
        &["hold", "--release", "1", "--reason", "matter 7 closed"],
    );
    let listed = crate::pgtrail_ok(&archive, &["hold", "--list"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains("matter 7 closed"), "{listed}");
    // A table the archive does not hold is named, not taken for one with nothing to purge.
    let out = purge(&["--tables", "peeple", "--before", &moment]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no table public.peeple"));
    // A table without a key cannot be purged (which rows exist at the moment is unknowable).
    let out = purge(&["--tables", "lines", "--before", &moment]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no key"));
    let out = purge(&["--tables", "people", "--before", &moment]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The table at the moment and at the end is what PostgreSQL held; the values only the
    // history before the moment knew are gone from every answer, the state's are kept.
    assert_eq!(
        as_of(&moment),
        at_moment,
        "as_of at the moment, after the purge"
    );
    assert_eq!(
        as_of(&at_end_lsn),
        at_end,
        "as_of at the end, after the purge"
    );
    let history = crate::pgtrail_sql(
        &archive,
        "csv",
        "SELECT op, context, before, after FROM public.people ORDER BY lsn, seq",
    );
    let word = |w: &str| has_word(&history, w);
    for note in &notes_before {
        assert_eq!(
            word(note),
            kept.contains(note),
            "{note}: kept only if the table held it at the moment"
        );
    }
    assert!(
        !history.contains("clerk-old"),
        "the context before the moment is gone"
    );
    for after in ["after4", "new200"] {
        assert!(word(after), "changes after the moment are whole: {after}");
    }
    let changes = crate::pgtrail_sql(&archive, "csv", "SELECT count(*) FROM public.people");
    assert_eq!(
        changes.lines().nth(1).unwrap().parse::<u64>().unwrap(),
        40 + 13 + 8 + 1 + 5 + 8 + 11 + 1,
        "every change keeps its place in the history"
    );

    // The evidence is whole: the checkpoint signed before the purge still verifies, and after
    // the next compaction the hold, its release and the one purge receipt are leaves.
    verifies(&archive, &vkey, &[&signed], python);
    // The redaction records and sealed salts are files written when an erasure is committed,
    // not at every compaction (a purge can leave millions): the compaction below rewrites
    // tree.json and leaves them as they are (same inode: an atomic write would replace it).
    let inode = |name: &str| {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(archive.join(name)).unwrap())
    };
    let records = std::fs::read_to_string(archive.join("evidence/redactions.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 40 + 13 + 8 + 1 + 5, "{records}");
    let before_compaction = [
        inode("evidence/tree.json"),
        inode("evidence/redactions.jsonl"),
    ];
    psql("INSERT INTO people VALUES (300, 'n300', 'late')");
    capture_until_now(cluster, &db, &archive);
    checkpoint(&archive, &key);
    assert_ne!(inode("evidence/tree.json"), before_compaction[0]);
    assert_eq!(inode("evidence/redactions.jsonl"), before_compaction[1]);
    let v = verifies(&archive, &vkey, &[&signed], python);
    let purges = v.pgtrail["purges"].as_array().unwrap();
    assert_eq!(purges.len(), 1, "{}", v.pgtrail);
    let receipt: serde_json::Value = serde_json::from_str(purges[0].as_str().unwrap()).unwrap();
    assert_eq!(receipt["before"], moment.as_str(), "{receipt}");
    assert_eq!(receipt["reason"], "retention: two years", "{receipt}");
    assert_eq!(receipt["changes"], 40 + 13 + 8 + 1 + 5, "{receipt}");
    assert_eq!(
        receipt["kept_state"],
        at_moment.lines().count(),
        "one change kept per row at the moment: {receipt}"
    );
    assert_eq!(
        v.pgtrail["holds"].as_array().unwrap().len(),
        1,
        "{}",
        v.pgtrail
    );
    assert_eq!(
        v.pgtrail["releases"].as_array().unwrap().len(),
        1,
        "{}",
        v.pgtrail
    );
    assert_eq!(
        v.pgtrail["redactions"].as_array().unwrap().len(),
        0,
        "the purge's changes are covered by its receipt, not each by a leaf"
    );

    // A purge of both tables before the end that crashes between its segments: the archive
    // still verifies and answers as PostgreSQL held at the end; running it again finishes it.
    let pets_as_of = |lsn: &str| as_of_rows(&archive, "id, name", "public.pets", lsn);
    assert_eq!(pets_as_of(&at_end_lsn), pets_at_end);
    let out = pgtrail()
        .args(["purge", "--reason", "retention: all but now", "--archive"])
        .arg(&archive)
        .args(["--tables", "people,pets", "--before", &at_end_lsn])
        .env("PGTRAIL_CRASH_AT", "redact:after_segment")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("crash point"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(as_of(&at_end_lsn), at_end, "after a crash between segments");
    assert_eq!(
        pets_as_of(&at_end_lsn),
        pets_at_end,
        "after a crash between segments"
    );
    let v = verify(&archive, &vkey, &[&signed], python);
    assert!(v.pgtrail_ok, "{}", v.pgtrail);
    let out = purge(&["--tables", "people,pets", "--before", &at_end_lsn]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(as_of(&at_end_lsn), at_end, "after the purge was run again");
    assert_eq!(
        pets_as_of(&at_end_lsn),
        pets_at_end,
        "after the purge was run again"
    );
    assert!(
        !crate::pgtrail_sql(&archive, "csv", "SELECT before, after FROM public.pets")
            .contains("pet4\""),
        "pet 4's name before its update is gone"
    );
    psql("INSERT INTO pets VALUES (99, 'late')");
    capture_until_now(cluster, &db, &archive);
    checkpoint(&archive, &key);
    let v = verifies(&archive, &vkey, &[&signed], python);
    assert_eq!(
        v.pgtrail["purges"].as_array().unwrap().len(),
        3,
        "{}",
        v.pgtrail
    );

    // Changes still in the log cannot be purged yet; it says what to do.
    psql("UPDATE people SET note = 'tail' WHERE id = 300");
    capture_until_now(cluster, &db, &archive);
    let out = purge(&[
        "--tables",
        "people",
        "--before",
        &crate::insert_lsn(cluster, &db),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pgtrail compact"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `pgtrail capture --retain RULE` of `db` into `archive`, stopped (SIGTERM, exit 0) once it
/// has logged a retention purge: the purge's log line. A failed purge fails the test.
fn capture_until_retained(cluster: &Cluster, db: &str, archive: &Path, rule: &str) -> String {
    use std::io::BufRead;
    let mut child = pgtrail()
        .args([
            "capture",
            "--slot",
            db,
            "--publication",
            db,
            "--retain",
            rule,
        ])
        .args(["--retain-every-secs", "1", "--compact-after-secs", "1"])
        .env("PGTRAIL_SOURCE", cluster.url(db))
        .env("PGTRAIL_ARCHIVE", archive)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    let purged = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("retention: purged") => break line,
            Ok(line) => {
                assert!(
                    !line.contains("retention: the purge failed"),
                    "{line}\n{}",
                    seen.join("\n")
                );
                seen.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                panic!("no retention purge logged:\n{}", seen.join("\n"));
            }
        }
    };
    crate::terminate(&mut child);
    purged
}

/// `field=value` of a log line.
fn log_field<'a>(line: &'a str, field: &str) -> &'a str {
    let at = line
        .find(&format!(" {field}="))
        .unwrap_or_else(|| panic!("{field} in {line}"));
    line[at + field.len() + 2..].split(' ').next().unwrap()
}

#[test]
fn a_capture_purges_by_its_retention_policy_and_a_legal_hold_suspends_it() {
    // A rule that cannot be read, or that nothing would compact for, is refused with how to
    // write it.
    for (args, says) in [
        (&["--retain", "people=30"][..], "TABLES=AGE"),
        (&["--retain", "people=0d"][..], "is zero"),
        (
            &["--retain", "people=1d", "--no-compact"][..],
            "--no-compact",
        ),
    ] {
        let out = pgtrail()
            .args(["capture", "--archive", "/nonexistent/pgtrail-retain"])
            .args(args)
            .env("PGTRAIL_SOURCE", "postgresql://localhost:1/none")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains(says),
            "{args:?}: {said}"
        );
    }

    const KEEP_SECS: u64 = 12;
    let rule = format!("people={KEEP_SECS}s");
    let python = python_ready();
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("retain").unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (key, vkey) = keygen(dir, "retain.key", "pgtrail.test/retain");
    let archive = dir.join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql(
        "CREATE TABLE people (id int PRIMARY KEY, note text NOT NULL);
         CREATE TABLE pets (id int PRIMARY KEY, name text NOT NULL);",
    );
    capture_until_now(cluster, &db, &archive);
    // The first ten rows' inserts come under a legal hold.
    psql("INSERT INTO people SELECT g, 'h' || g || 'x' FROM generate_series(1, 10) g");
    let held_to = crate::insert_lsn(cluster, &db);
    capture_until_now(cluster, &db, &archive);
    crate::pgtrail_ok(
        &archive,
        &[
            "hold", "--tables", "people", "--to", &held_to, "--reason", "matter 9",
        ],
    );
    // Old history: every row changes, some go, more come; with context.
    psql(
        "BEGIN;
         SELECT pg_logical_emit_message(true, '_bemi', '{\"user\": \"clerk-old\"}');
         UPDATE people SET note = 'a' || id || 'x';
         COMMIT;
         DELETE FROM people WHERE id % 4 = 0;
         INSERT INTO people SELECT g, 'a' || g || 'x' FROM generate_series(11, 20) g;
         UPDATE people SET note = 'c' || id || 'x' WHERE id % 3 = 0;
         INSERT INTO pets VALUES (1, 'rex');",
    );
    capture_until_now(cluster, &db, &archive);
    let moment = crate::insert_lsn(cluster, &db);
    let state_sql = "SELECT coalesce(string_agg(format('%s,%s', id, note), E'\\n' ORDER BY id), '') FROM people";
    let at_moment = psql(state_sql);
    let kept: Vec<String> = psql("SELECT string_agg(note, ',') FROM people")
        .split(',')
        .map(str::to_string)
        .collect();
    let old_notes: Vec<String> = (1..=20)
        .flat_map(|i| [format!("a{i}x"), format!("c{i}x")])
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(KEEP_SECS + 1));
    // Recent history, younger than the rule's age when the capture below starts.
    psql("UPDATE people SET note = 'b' || id || 'x' WHERE id % 2 = 1");
    capture_until_now(cluster, &db, &archive);
    let at_end_lsn = crate::insert_lsn(cluster, &db);
    let at_end = psql(state_sql);
    let signed = dir.join("before-retention.checkpoint");
    std::fs::write(&signed, checkpoint(&archive, &key)).unwrap();

    let as_of = |lsn: &str| as_of_rows(&archive, "id, note", "public.people", lsn);
    let history = || {
        crate::pgtrail_sql(
            &archive,
            "csv",
            "SELECT op, context, before, after FROM public.people ORDER BY lsn, seq",
        )
    };

    // The capture purges what is older than the age, at its first run: the history before the
    // cut but what each row held there and the held inserts.
    let line = capture_until_retained(cluster, &db, &archive, &rule);
    assert_eq!(log_field(&line, "held"), "10", "{line}");
    let before: Lsn = log_field(&line, "before").parse().unwrap();
    assert!(
        before > moment.parse().unwrap(),
        "the old history is before the cut: {line}"
    );
    assert_eq!(
        as_of(&moment),
        at_moment,
        "as_of at the moment, after the purge"
    );
    assert_eq!(
        as_of(&at_end_lsn),
        at_end,
        "as_of at the end, after the purge"
    );
    let seen = history();
    for note in &old_notes {
        assert_eq!(
            has_word(&seen, note),
            kept.contains(note),
            "{note}: kept only if the table held it at the cut\n{seen}"
        );
    }
    for i in 1..=10 {
        assert!(
            has_word(&seen, &format!("h{i}x")),
            "held insert {i} is whole\n{seen}"
        );
    }
    assert!(
        !seen.contains("clerk-old"),
        "the context before the cut is gone"
    );

    // Released, the hold's changes go at the next run; the purges are on the signed record.
    crate::pgtrail_ok(
        &archive,
        &["hold", "--release", "1", "--reason", "matter 9 closed"],
    );
    let line = capture_until_retained(cluster, &db, &archive, &rule);
    assert_eq!(log_field(&line, "held"), "0", "{line}");
    let seen = history();
    for i in 1..=10 {
        assert!(
            !has_word(&seen, &format!("h{i}x")),
            "released insert {i} is purged\n{seen}"
        );
    }
    assert_eq!(
        as_of(&moment),
        at_moment,
        "as_of at the moment, after both purges"
    );
    assert_eq!(
        as_of(&at_end_lsn),
        at_end,
        "as_of at the end, after both purges"
    );
    // The receipts become leaves at the next compaction that adds changes.
    psql("INSERT INTO pets VALUES (2, 'late')");
    capture_until_now(cluster, &db, &archive);
    checkpoint(&archive, &key);
    let v = verifies(&archive, &vkey, &[&signed], python);
    let purges = v.pgtrail["purges"].as_array().unwrap();
    assert_eq!(purges.len(), 2, "{}", v.pgtrail);
    let receipt: serde_json::Value = serde_json::from_str(purges[0].as_str().unwrap()).unwrap();
    assert_eq!(receipt["held"], 10, "{receipt}");
    assert_eq!(receipt["before"], before.to_string(), "{receipt}");
    assert_eq!(
        receipt["reason"],
        format!("retention policy (retention {rule})"),
        "{receipt}"
    );
}

/// Every request to a running capture was answered and its answer read: nothing is left in
/// the archive's `requests/` directory.
fn assert_no_request_left(archive: &Path) {
    let left: Vec<_> = std::fs::read_dir(archive.join("requests"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_hold_is_placed_and_released_while_a_capture_runs() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("holdlive").unwrap();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    cluster
        .psql(
            &db,
            "CREATE TABLE people (id int PRIMARY KEY, note text NOT NULL)",
        )
        .unwrap();
    capture_until_now(cluster, &db, &archive);
    let mut child = crate::spawn_capture_with(
        &cluster.url(&db),
        &archive,
        &db,
        &["--compact-after-secs", "1"],
    );
    // Streaming, it holds the archive.
    crate::wait_slot_active(cluster, &db, &db, &mut child);
    let hold = |args: &[&str]| {
        pgtrail()
            .arg("hold")
            .args(args)
            .args(["--wait-secs", "60", "--archive"])
            .arg(&archive)
            .output()
            .unwrap()
    };
    let out = hold(&["--tables", "people", "--reason", "matter 11"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("a capture is running"), "{said}");
    let placed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(placed["id"], 1, "{placed}");
    assert_eq!(placed["reason"], "matter 11", "{placed}");
    let out = hold(&["--release", "1", "--reason", "matter 11 closed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the capture refuses comes back as the command's error; nothing is left behind.
    let out = hold(&["--release", "1", "--reason", "again"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && said.contains("released already"),
        "{said}"
    );
    let listed = crate::pgtrail_ok(&archive, &["hold", "--list"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains("matter 11 closed"), "{listed}");
    assert_no_request_left(&archive);
    crate::terminate(&mut child);
}

#[test]
fn a_capture_carries_out_redact_and_purge_asked_while_it_runs() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("eraselive").unwrap();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql("CREATE TABLE people (id int PRIMARY KEY, note text NOT NULL)");
    capture_until_now(cluster, &db, &archive);
    psql(
        "INSERT INTO people SELECT g, 'a' || g || 'x' FROM generate_series(1, 20) g;
         UPDATE people SET note = 'b' || id || 'x' WHERE id % 2 = 0;
         DELETE FROM people WHERE id % 5 = 0;",
    );
    capture_until_now(cluster, &db, &archive);
    let moment = crate::insert_lsn(cluster, &db);
    let state_sql = "SELECT coalesce(string_agg(format('%s,%s', id, note), E'\\n' ORDER BY id), '') FROM people";
    let at_moment = psql(state_sql);
    psql(
        "UPDATE people SET note = 'c' || id || 'x' WHERE id % 3 = 0;
         INSERT INTO people VALUES (30, 'd30x');",
    );
    let mut child = crate::spawn_capture_with(
        &cluster.url(&db),
        &archive,
        &db,
        &["--compact-after-secs", "1"],
    );
    crate::wait_slot_active(cluster, &db, &db, &mut child);
    let end_lsn = crate::insert_lsn(cluster, &db);
    let at_end = psql(state_sql);
    let erase = |command: &str, args: &[&str]| {
        pgtrail()
            .args([command, "--wait-secs", "60", "--archive"])
            .arg(&archive)
            .args(args)
            .output()
            .unwrap()
    };
    // The capture compacts on its own: until it has, it refuses, saying to wait for it.
    let history = |sql: &str| crate::pgtrail_sql(&archive, "csv", sql);
    let purge = ["--tables", "people", "--before", &moment, "--reason", "R-4"];
    let mut tries = 0;
    let said = loop {
        let out = erase("purge", &purge);
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(said.contains("a capture is running"), "{said}");
        if out.status.success() {
            break said;
        }
        assert!(said.contains("wait for its next compaction"), "{said}");
        tries += 1;
        assert!(tries < 30, "never compacted: {said}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    assert!(said.contains("took the request"), "{said}");
    assert!(said.contains("erased"), "{said}");
    // A refusal comes back as the command's error.
    let out = erase(
        "purge",
        &["--tables", "peeple", "--before", &moment, "--reason", "R-4"],
    );
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("the capture refused") && said.contains("no table public.peeple"),
        "{said}"
    );
    // Redact the change that wrote d30x, after the moment, twice: the second finds it erased.
    let found = history("SELECT lsn, seq FROM public.people WHERE after['note'] = 'd30x'");
    let (lsn, seq) = found.lines().nth(1).unwrap().split_once(',').unwrap();
    let change = format!("{}:{seq}", Lsn(lsn.parse().unwrap()));
    let redact = ["--change", &change, "--reason", "GDPR request 9"];
    let out = erase("redact", &redact);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("erased context, before, after of 1 changes"),
        "{said}"
    );
    let out = erase("redact", &redact);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("erased already"), "{said}");
    assert!(said.contains("nothing left to erase"), "{said}");

    // What the table held at the moment and at the end is still what PostgreSQL held, but for
    // the redacted value, which is unknown; the history before the moment kept only the
    // state at it.
    let as_of = |lsn: &str| as_of_rows(&archive, "id, note", "public.people", lsn);
    assert_eq!(as_of(&moment), at_moment, "as_of at the moment");
    assert_eq!(
        as_of(&end_lsn),
        at_end.replace("30,d30x", "30,"),
        "as_of at the end"
    );
    let text = history("SELECT op, before, after FROM public.people ORDER BY lsn, seq");
    for i in 1..=20 {
        for note in [format!("a{i}x"), format!("b{i}x")] {
            assert_eq!(
                has_word(&text, &note),
                at_moment.lines().any(|l| l.ends_with(&format!(",{note}"))),
                "{note}: kept only if the table held it at the moment"
            );
        }
    }
    assert!(!has_word(&text, "d30x"), "the redacted value is gone");
    assert!(has_word(&text, "c3x"), "changes after the moment are whole");
    assert_no_request_left(&archive);
    crate::terminate(&mut child);
    // The receipts are leaves, and the archive verifies.
    let out = crate::pgtrail_ok(&archive, &["verify"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("verify: OK: 1 segments, 40 changes"),
        "{said}"
    );
}

#[test]
fn a_purge_a_capture_crashed_in_is_finished_when_it_starts_again() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("eraseresume").unwrap();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let psql = |sql: &str| cluster.psql(&db, sql).unwrap();
    psql(
        "CREATE TABLE people (id int PRIMARY KEY, note text NOT NULL);
         CREATE TABLE pets (id int PRIMARY KEY, name text NOT NULL);",
    );
    capture_until_now(cluster, &db, &archive);
    psql(
        "INSERT INTO people SELECT g, 'a' || g || 'x' FROM generate_series(1, 10) g;
         INSERT INTO pets SELECT g, 'p' || g || 'x' FROM generate_series(1, 10) g;
         UPDATE people SET note = 'b' || id || 'x' WHERE id % 2 = 0;
         UPDATE pets SET name = 'q' || id || 'x' WHERE id % 2 = 0;",
    );
    capture_until_now(cluster, &db, &archive);
    let moment = crate::insert_lsn(cluster, &db);
    let people_sql = "SELECT string_agg(format('%s,%s', id, note), E'\\n' ORDER BY id) FROM people";
    let pets_sql = "SELECT string_agg(format('%s,%s', id, name), E'\\n' ORDER BY id) FROM pets";
    let (people_then, pets_then) = (psql(people_sql), psql(pets_sql));
    // The capture crashes after the purge's first segment (the two tables are two segments).
    let mut capture = pgtrail()
        .args(["capture", "--slot", &db, "--publication", &db])
        .args(["--compact-after-secs", "1"])
        .env("PGTRAIL_SOURCE", cluster.url(&db))
        .env("PGTRAIL_ARCHIVE", &archive)
        .env("PGTRAIL_CRASH_AT", "redact:after_segment")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(File::create(work.path().join("capture.log")).unwrap())
        .spawn()
        .unwrap();
    crate::wait_slot_active(cluster, &db, &db, &mut capture);
    let purge = || {
        pgtrail()
            .args(["purge", "--wait-secs", "60", "--reason", "R-9", "--archive"])
            .arg(&archive)
            .args(["--tables", "people,pets", "--before", &moment])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut client = purge();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while capture.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the capture never crashed: {}",
            std::fs::read_to_string(work.path().join("capture.log")).unwrap()
        );
        // Refused until the capture has compacted: ask again.
        if client.try_wait().unwrap().is_some() {
            let out = client.wait_with_output().unwrap();
            let said = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(said.contains("wait for its next compaction"), "{said}");
            client = purge();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Started again in time, the capture finishes the purge and the waiting command hears it.
    let mut capture = crate::spawn_capture_with(
        &cluster.url(&db),
        &archive,
        &db,
        &["--compact-after-secs", "1"],
    );
    let out = client.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("had begun this purge"), "{said}");
    assert!(said.contains("erased"), "{said}");
    let people = as_of_rows(&archive, "id, note", "public.people", &moment);
    let pets = as_of_rows(&archive, "id, name", "public.pets", &moment);
    assert_eq!((people, pets), (people_then.clone(), pets_then.clone()));
    // Both tables' histories kept only the state at the moment.
    for (table, cols, then) in [
        ("people", "note", &people_then),
        ("pets", "name", &pets_then),
    ] {
        let text = crate::pgtrail_sql(
            &archive,
            "csv",
            &format!("SELECT before, after FROM public.{table} ORDER BY lsn, seq"),
        );
        let first = if table == "people" { 'a' } else { 'p' };
        for i in (1..=10).filter(|i| i % 2 == 0) {
            let old = format!("{first}{i}x");
            assert!(!has_word(&text, &old), "{table}.{cols}: {old} was purged");
        }
        for line in then.lines() {
            let value = line.split_once(',').unwrap().1;
            assert!(has_word(&text, value), "{table}: {value} is the state kept");
        }
    }
    crate::terminate(&mut capture);
    crate::pgtrail_ok(&archive, &["verify"]);
}
