//! Bemi's own ORM package against pgtrail: bemi-sqlalchemy from PyPI, in a virtualenv this
//! test makes (`target/bemi-venv`, kept for later runs), runs its migration in the source
//! database and an application that sets contexts; pgtrail must record, for every change,
//! exactly the context the application set for the statement that made it; and bemi-django's
//! own model and query helpers read the `changes` table `export --layout bemi` keeps.

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
/// bemi-django in a virtualenv of its own: both packages install a top-level `bemi`.
const DJANGO_PACKAGES: &[&str] = &[
    "bemi-django==0.1.3",
    "Django==5.2.8",
    "psycopg2-binary==2.9.13",
];

/// The python of the virtualenv `target/<name>` with `packages`, made (once) if missing;
/// `None` (the test skipped) when PyPI is out of reach, unless `PGTRAIL_REQUIRE_BEMI_PACKAGE`
/// says it must run.
fn venv_python(name: &str, packages: &[&str], probe: &str) -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(name);
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", probe])
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
                .args(packages)
                .status()
                .is_ok_and(|s| s.success());
        if !made || !ready(&python) {
            assert!(
                std::env::var_os("PGTRAIL_REQUIRE_BEMI_PACKAGE").is_none(),
                "could not make the virtualenv with {packages:?} at {}",
                venv.display()
            );
            eprintln!(
                "note: {packages:?} could not be installed; the Bemi package test was skipped"
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
    let Some(python) = venv_python(
        "bemi-venv",
        PACKAGES,
        "import bemi, sqlalchemy, psycopg2, alembic",
    ) else {
        return;
    };
    let Some(django) = venv_python(
        "bemi-django-venv",
        DJANGO_PACKAGES,
        "import django, bemi.routers, psycopg2",
    ) else {
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
    // Bemi's `changes` table kept by pgtrail in another database, read by bemi-django's own
    // model and query helpers.
    cluster
        .psql("postgres", "CREATE DATABASE bemiaudit")
        .unwrap();
    let export = crate::pgtrail()
        .args(["export", "--archive"])
        .arg(&archive)
        .args(["--to", &cluster.url("bemiaudit"), "--layout", "bemi"])
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bemi_django.py");
    let url = cluster.url("x");
    let port = url.rsplit(':').next().unwrap().split('/').next().unwrap();
    let out = Command::new(&django)
        .arg(script)
        .args(["127.0.0.1", port, "bemiaudit", "postgres"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bemi_django: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Value = serde_json::from_slice(&out.stdout).unwrap();
    let order_1 = &answers["order_1"];
    assert_eq!(order_1.as_array().map(Vec::len), Some(3), "{answers}");
    assert_eq!(order_1[0][0], "UPDATE");
    assert_eq!(order_1[0][1], r#"say "hi""#);
    assert!(
        order_1[0][2].is_string(),
        "the broken context, kept: {answers}"
    );
    assert_eq!(order_1[1][0], "UPDATE");
    assert_eq!(order_1[1][1], "paid");
    let mut paying = order_1[1][2].clone();
    paying.as_object_mut().unwrap().remove("SQL");
    assert_eq!(paying, serde_json::json!({"user_id": 3, "step": "pay"}));
    assert_eq!(order_1[2][0], "CREATE");
    assert_eq!(order_1[2][1], "new");
    assert_eq!(answers["paid_by_context"], serde_json::json!(["1", "2"]));
    assert_eq!(answers["updated_to_paid"], serde_json::json!(["1", "2"]));
    assert_eq!(
        answers["status_of_3"],
        serde_json::json!(["CREATE", "UPDATE"])
    );
    assert_eq!(
        answers["diff_of_3"],
        serde_json::json!({"status": ["new", "shipped"]})
    );
    assert_eq!(answers["deleted"], serde_json::json!(["2"]));
}
