//! Each bad setup stops capture with an error that says what to change.

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_capture::{CaptureError, ErrorKind, SourceConfig};

use crate::harness::TestDb;

fn assert_setup(err: &CaptureError, needle: &str) {
    assert_eq!(err.kind(), ErrorKind::Setup, "{err}");
    assert!(
        err.to_string().contains(needle),
        "{err:?} does not mention {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_level_replica_is_refused_with_the_fix() {
    let cluster = Cluster::start(ClusterOptions {
        settings: vec![("wal_level".into(), "replica".into())],
        ..Default::default()
    })
    .unwrap();
    let archive = tempfile::tempdir().unwrap();
    let mut config = TestDb::new("walcfg").config();
    config.source = SourceConfig::parse(&cluster.url("postgres")).unwrap();
    config.archive = archive.path().join("a");
    let err = pgtrail_capture::run(config, std::future::pending(), |_| {})
        .await
        .unwrap_err();
    assert_setup(&err, "wal_level = logical");
    assert_setup(&err, "ALTER SYSTEM SET wal_level = logical");
}

/// Every replication slot taken: capture stops with the fix instead of retrying.
#[tokio::test(flavor = "multi_thread")]
async fn no_free_replication_slot_is_refused_with_the_fix() {
    let cluster = Cluster::start(ClusterOptions {
        settings: vec![("max_replication_slots".into(), "1".into())],
        ..Default::default()
    })
    .unwrap();
    cluster
        .psql("postgres", "SELECT pg_create_logical_replication_slot('other', 'pgoutput'); CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    let archive = tempfile::tempdir().unwrap();
    let mut config = TestDb::new("noslot").config();
    config.source = SourceConfig::parse(&cluster.url("postgres")).unwrap();
    config.archive = archive.path().join("a");
    config.tables = Vec::new();
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        pgtrail_capture::run(config, std::future::pending(), |_| {}),
    )
    .await
    .expect("capture retried instead of stopping")
    .unwrap_err();
    assert_setup(&err, "max_replication_slots");
}

/// On a managed service the fix names the service's own setting (recognised by the settings
/// the service defines; here RDS's, defined by hand).
#[tokio::test(flavor = "multi_thread")]
async fn wal_level_on_a_managed_service_names_its_own_setting() {
    let cluster = Cluster::start(ClusterOptions {
        settings: vec![
            ("wal_level".into(), "replica".into()),
            ("rds.logical_replication".into(), "0".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    let archive = tempfile::tempdir().unwrap();
    let mut config = TestDb::new("walrds").config();
    config.source = SourceConfig::parse(&cluster.url("postgres")).unwrap();
    config.archive = archive.path().join("a");
    let err = pgtrail_capture::run(config, std::future::pending(), |_| {})
        .await
        .unwrap_err();
    assert_setup(&err, "rds.logical_replication = 1");
}

#[tokio::test(flavor = "multi_thread")]
async fn role_without_replication_is_refused_with_the_fix() {
    let db = TestDb::new("norepl");
    db.sql("CREATE ROLE plain_user LOGIN; CREATE TABLE t (id int PRIMARY KEY);");
    let mut config = db.config();
    config.source = SourceConfig::parse(&format!(
        "postgresql://plain_user@127.0.0.1:{}/{}",
        db.cluster.port(),
        db.name
    ))
    .unwrap();
    let err = pgtrail_capture::run(config, std::future::pending(), |_| {})
        .await
        .unwrap_err();
    assert_setup(&err, "WITH REPLICATION");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_or_unsafe_tables_are_refused() {
    let db = TestDb::new("tables");
    db.sql("CREATE TABLE nopk (v int); CREATE TABLE \"Odd Name\" (id int PRIMARY KEY);");
    let mut config = db.config();
    config.tables = vec!["public.missing".into()];
    let err = pgtrail_capture::run(config, std::future::pending(), |_| {})
        .await
        .unwrap_err();
    assert_setup(&err, "does not exist");
    let mut config = db.config();
    config.tables = pgtrail_store::split_table_list("public.\"Odd Name\", public.nopk");
    let err = pgtrail_capture::run(config, std::future::pending(), |_| {})
        .await
        .unwrap_err();
    assert_setup(&err, "REPLICA IDENTITY FULL");
    // By default the table without a key is left out, and the quoted one captured.
    db.sql("INSERT INTO \"Odd Name\" VALUES (1); INSERT INTO nopk VALUES (1);");
    db.capture_until_now(db.config()).await.unwrap();
    let published = db.sql(&format!("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = '{}'", db.name));
    assert_eq!(published, "Odd Name");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_url_and_foreign_slot_are_clear_errors() {
    let err = SourceConfig::parse("postgresql://user:sekrit@host:notaport/db").unwrap_err();
    assert!(matches!(err, CaptureError::InvalidUrl { .. }));
    assert!(
        !err.to_string().contains("sekrit"),
        "the password must not be echoed: {err}"
    );
    let db = TestDb::new("foreign");
    db.sql("CREATE TABLE t (id int PRIMARY KEY)");
    db.sql(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        db.name
    ));
    let err = pgtrail_capture::run(db.config(), std::future::pending(), |_| {})
        .await
        .unwrap_err();
    assert_setup(&err, "already exists");
}

/// A server that is shutting down (or starting up, or in recovery) answers SQLSTATE 57P03:
/// capture waits for it with backoff instead of exiting, and captures once it is back. (A
/// wrong host, port or password still fails at once: see the tests above.)
#[tokio::test(flavor = "multi_thread")]
async fn a_server_shutting_down_when_capture_starts_is_waited_for() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    cluster.psql("postgres", "CREATE DATABASE ready").unwrap();
    cluster
        .psql(
            "ready",
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);",
        )
        .unwrap();
    let written: pgtrail_store::Lsn = cluster
        .psql("ready", "SELECT pg_current_wal_insert_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    // One session keeps a smart shutdown waiting; new connections are refused meanwhile.
    let mut holder = std::process::Command::new(cluster.bin_dir().join("psql"))
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "ready",
        ])
        .arg("-p")
        .arg(cluster.port().to_string())
        .args(["-c", "SELECT pg_sleep(6)"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cluster
        .psql(
            "ready",
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(6)'",
        )
        .unwrap()
        != "1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the holding session never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cluster.begin_stop("smart").unwrap();
    let refused = cluster.psql("ready", "SELECT 1").unwrap_err().to_string();
    assert!(refused.contains("shutting down"), "{refused}");

    let archive = tempfile::tempdir().unwrap();
    let mut config = TestDb::new("ready_cfg").config();
    config.source = SourceConfig::parse(&cluster.url("ready")).unwrap();
    config.archive = archive.path().join("a");
    config.slot = "ready".into();
    config.publication = "ready".into();
    config.stop_at = Some(written);
    let capture = tokio::spawn(pgtrail_capture::run(config, std::future::pending(), |_| {}));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        !capture.is_finished(),
        "capture gave up on a server that is shutting down: {:?}",
        capture.await
    );
    // The session ends, the server stops, and comes back.
    assert!(holder.wait().unwrap().success());
    cluster.stop("fast").ok(); // already stopped, or stopping: wait until it is down
    cluster.start_again().unwrap();
    let summary = tokio::time::timeout(std::time::Duration::from_secs(120), capture)
        .await
        .expect("capture did not finish after the server came back")
        .unwrap()
        .unwrap();
    assert_eq!(summary.snapshot_rows, 2);
    assert!(summary.reconnects >= 1, "{summary:?}");
}
