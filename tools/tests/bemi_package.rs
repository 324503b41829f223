//! Bemi's own ORM package against pgtrail: bemi-sqlalchemy from PyPI, in a virtualenv this
//! test makes (`target/bemi-venv`, kept for later runs), runs its migration in the source
//! database and an application that sets contexts; pgtrail must record, for every change,
//! exactly the context the application set for the statement that made it.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use serde_json::Value;

use crate::export::{capture_to, sql_json};

/// The versions the test installs (bemi-sqlalchemy's newest, and what it was tried with).
const PACKAGES: &[&str] = &[
    "bemi-sqlalchemy==0.0.2",
    "SQLAlchemy==2.1.9",
    "alembic==1.20.1",
    "starlette==1.10.0",
    "psycopg2-binary==2.9.13",
];

/// The virtualenv's python, made (once) if missing; `None` (the test skipped) when PyPI is
/// out of reach, unless `PGTRAIL_REQUIRE_BEMI_PACKAGE` says it must run.
fn venv_python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bemi-venv");
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import bemi, sqlalchemy, psycopg2, alembic"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet"])
                .args(PACKAGES)
                .status()
                .is_ok_and(|s| s.success());
        if !made || !ready(&python) {
            assert!(
                std::env::var_os("PGTRAIL_REQUIRE_BEMI_PACKAGE").is_none(),
                "could not make the virtualenv with {PACKAGES:?} at {}",
                venv.display()
            );
            eprintln!(
                "note: bemi-sqlalchemy could not be installed; the Bemi package test was skipped"
            );
            return None;
        }
    }
    Some(python)
}

fn app(python: &Path, mode: &str, url: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bemi_app.py");
    let out = Command::new(python)
        .arg(script)
        .args([mode, url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bemi_app {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_bemi_sqlalchemy_application_s_contexts_are_recorded_per_statement() {
    let Some(python) = venv_python() else {
        return;
    };
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    let db = "bemiapp";
    cluster.psql("postgres", "CREATE DATABASE bemiapp").unwrap();
    let url = cluster
        .url(db)
        .replace("postgresql://", "postgresql+psycopg2://");
    app(&python, "migrate", &url);
    let triggers = cluster
        .psql(
            db,
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '_bemi_row_trigger_%'",
        )
        .unwrap();
    assert_eq!(
        triggers, "1",
        "the package's migration installed its trigger"
    );
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    capture_to(&cluster, db, &archive);
    let made = app(&python, "run", &url);
    capture_to(&cluster, db, &archive);

    let recorded = sql_json(
        &archive,
        "SELECT operation, primary_key, context FROM changes \
         WHERE \"table\" = 'orders' AND operation <> 'SNAPSHOT' ORDER BY lsn, seq",
    );
    let made = made.as_array().unwrap();
    assert_eq!(recorded.len(), made.len(), "{recorded:?}");
    for (got, want) in recorded.iter().zip(made) {
        let id = want["id"].to_string();
        assert_eq!(got["operation"], want["op"], "{got} vs {want}");
        assert_eq!(got["primary_key"].as_str(), Some(id.as_str()), "{got}");
        match &want["context"] {
            Value::Null => assert!(got["context"].is_null(), "no context: {got}"),
            Value::String(_) => {
                // Not JSON as sent: kept whole as a JSON string, the value inside it.
                let text = got["context"].as_str().unwrap_or_default();
                assert!(text.contains(r#"say "hi""#), "{got}");
            }
            wanted => {
                let mut context = got["context"].clone();
                let sql = context
                    .as_object_mut()
                    .and_then(|c| c.remove("SQL"))
                    .unwrap_or_default();
                assert_eq!(&context, wanted, "{got}");
                // The package adds the statement; it names what the change was.
                let verb = match want["op"].as_str() {
                    Some("CREATE") => "INSERT",
                    other => other.unwrap(),
                };
                assert!(sql.as_str().is_some_and(|s| s.starts_with(verb)), "{got}");
            }
        }
    }
}
