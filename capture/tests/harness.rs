//! Helpers shared by the capture tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use pgtrail_capture::cluster::Cluster;
use pgtrail_capture::{CaptureConfig, CaptureError, CaptureSummary, SourceConfig};
use pgtrail_store::{Cell, ChangeRecord, LogReader, Lsn, Op, RelationVersion};

pub struct TestDb {
    pub cluster: &'static Cluster,
    pub name: String,
    pub archive: tempfile::TempDir,
}

impl TestDb {
    pub fn new(prefix: &str) -> TestDb {
        let cluster = Cluster::shared();
        let name = cluster.fresh_database(prefix).expect("create database");
        TestDb {
            cluster,
            name,
            archive: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    pub fn archive_dir(&self) -> std::path::PathBuf {
        self.archive.path().join("archive")
    }

    pub fn sql(&self, sql: &str) -> String {
        self.cluster
            .psql(&self.name, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn config(&self) -> CaptureConfig {
        CaptureConfig {
            source: SourceConfig::parse(&self.url()).unwrap(),
            archive: self.archive_dir(),
            slot: self.name.clone(),
            publication: self.name.clone(),
            tables: Vec::new(),
            resnapshot: false,
            progress_interval: Duration::from_secs(1),
            stream_timeout: pgtrail_capture::DEFAULT_STREAM_TIMEOUT,
            durable_observer: None,
            stop_at: None,
            catalog_interval: pgtrail_capture::DEFAULT_CATALOG_INTERVAL,
            compaction: None,
        }
    }

    pub fn current_lsn(&self) -> Lsn {
        self.sql("SELECT pg_current_wal_insert_lsn()")
            .parse()
            .unwrap()
    }

    /// Capture until everything written so far is durable in the archive.
    pub async fn capture_until_now(
        &self,
        config: CaptureConfig,
    ) -> Result<CaptureSummary, CaptureError> {
        let mut config = config;
        config.stop_at = Some(self.current_lsn());
        tokio::time::timeout(
            Duration::from_secs(300),
            pgtrail_capture::run(config, std::future::pending(), |_| {}),
        )
        .await
        .expect("capture did not catch up within 300 s")
    }
}

/// Every change of the archive with the relation version it follows.
pub fn read_archive(
    dir: &Path,
) -> (
    Vec<(pgtrail_store::ChangeKey, ChangeRecord)>,
    Vec<RelationVersion>,
) {
    let reader = LogReader::open(dir).expect("open archive");
    // Segments and the log tail together, as one consistent read.
    let changes = reader.all_changes(dir).expect("read segments and log");
    (changes, reader.relations().unwrap())
}

fn cell_text(c: &Cell) -> String {
    match c {
        Cell::Null => "<NULL>".into(),
        Cell::Text(s) => s.clone(),
        Cell::Unknown => "<UNKNOWN>".into(),
    }
}

/// Replay the archive's changes of one table into its final state: key text -> row text.
pub fn reconstruct(dir: &Path, table: &str) -> BTreeMap<String, Vec<String>> {
    let (changes, rels) = read_archive(dir);
    let ids: Vec<u32> = rels
        .iter()
        .filter(|r| r.name == table)
        .map(|r| r.relation_id)
        .collect();
    let mut state = BTreeMap::new();
    for (_, rec) in changes {
        if !ids.contains(&rec.relation_id) {
            continue;
        }
        let key = rec.key.as_ref().map(|k| {
            k.iter()
                .map(|v| v.clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("|")
        });
        match rec.op {
            Op::Insert | Op::Snapshot => {
                state.insert(
                    key.unwrap(),
                    rec.after.unwrap().iter().map(cell_text).collect(),
                );
            }
            Op::Update => {
                let before_key = {
                    let r = rels
                        .iter()
                        .find(|r| {
                            r.relation_id == rec.relation_id && r.valid_from == rec.schema_version
                        })
                        .unwrap();
                    let b = rec.before.as_ref().unwrap();
                    r.key_positions()
                        .iter()
                        .map(|&i| cell_text(&b[i]))
                        .collect::<Vec<_>>()
                        .join("|")
                };
                state.remove(&before_key);
                state.insert(
                    key.unwrap(),
                    rec.after.unwrap().iter().map(cell_text).collect(),
                );
            }
            Op::Delete => {
                state.remove(&key.unwrap());
            }
            Op::Truncate => state.clear(),
            Op::Message => {}
        }
    }
    state
}

/// The table as PostgreSQL returns it, in the same shape as [`reconstruct`]: the key text
/// (key columns joined with `|`) to each column's text form, read with the same session
/// settings capture pins.
pub fn select_state(
    db: &TestDb,
    table: &str,
    key: &[&str],
    columns: &[&str],
) -> BTreeMap<String, Vec<String>> {
    let key_expr = key
        .iter()
        .map(|k| format!("{k}::text"))
        .collect::<Vec<_>>()
        .join(" || '|' || ");
    let cols = columns
        .iter()
        .map(|c| format!("{c}::text"))
        .collect::<Vec<_>>()
        .join(", ");
    let json = db.sql(&format!(
        "{} SELECT coalesce(json_agg(json_build_array({key_expr}, {cols})), '[]') FROM {table}",
        pgtrail_capture::source::session_settings_sql()
    ));
    let rows: Vec<Vec<serde_json::Value>> =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    rows.into_iter()
        .map(|mut r| {
            let k = r.remove(0).as_str().unwrap().to_string();
            let values = r.into_iter().map(json_text).collect();
            (k, values)
        })
        .collect()
}

/// A JSON value PostgreSQL printed, in the text form [`reconstruct`] uses (`<NULL>` for null).
pub fn json_text(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "<NULL>".into(),
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}
