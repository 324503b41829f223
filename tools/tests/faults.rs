//! PostgreSQL faults under load: the walsender terminated, the server restarted fast and
//! immediately (crash recovery, which can move the slot back), while a writer commits ledger
//! rows. The capture process reconnects by itself; at the end the archive holds exactly the
//! rows PostgreSQL holds, each once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_store::{LogReader, Op};

use crate::{spawn_capture, terminate, wait_slot_active};

#[test]
fn walsender_kills_and_postgres_restarts_under_load_lose_and_duplicate_nothing() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    cluster.psql("postgres", "CREATE DATABASE faults").unwrap();
    cluster
        .psql(
            "faults",
            "CREATE TABLE ledger (seq bigint PRIMARY KEY, note text)",
        )
        .unwrap();
    let url = cluster.url("faults");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut child = spawn_capture(&url, &archive, "faults", None);
    wait_slot_active(&cluster, "faults", "faults", &mut child);

    let stop = crate::WriterStop::new();
    let writer = {
        let (url, stop) = (url.clone(), stop.flag());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut seq = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    tokio::spawn(conn);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        seq += 1;
                        // A retried commit whose first try did commit must not add a second row.
                        let sql = format!(
                            "INSERT INTO ledger VALUES ({seq}, 'n'), ({}, 'twin') ON CONFLICT DO NOTHING",
                            seq + 1_000_000_000
                        );
                        if client.batch_execute(&sql).await.is_err() {
                            break;
                        }
                    }
                }
            });
        })
    };
    let walsender_kill = "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = 'faults' AND active_pid IS NOT NULL";
    std::thread::sleep(Duration::from_millis(700));
    cluster.psql("postgres", walsender_kill).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.restart("fast").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.restart("immediate").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.psql("postgres", walsender_kill).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    stop.raise();
    writer.join().unwrap();

    let end = cluster
        .psql("faults", "SELECT pg_current_wal_insert_lsn()::text")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = cluster
            .psql("faults", &format!("SELECT coalesce(bool_and(confirmed_flush_lsn >= '{end}'), false) FROM pg_replication_slots WHERE slot_name = 'faults'"))
            .unwrap();
        if done == "t" {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "capture exited instead of reconnecting"
        );
        assert!(
            Instant::now() < deadline,
            "capture did not catch up after the faults"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    terminate(&mut child);

    let expected: Vec<i64> = cluster
        .psql(
            "faults",
            "SELECT coalesce(json_agg(seq ORDER BY seq), '[]') FROM ledger",
        )
        .map(|j| serde_json::from_str(&j).unwrap())
        .unwrap();
    assert!(
        expected.len() > 100,
        "the workload committed rows throughout"
    );
    let reader = LogReader::open(&archive).unwrap();
    let mut seen: BTreeMap<i64, u32> = BTreeMap::new();
    for (_, rec) in reader.all_changes(&archive).unwrap() {
        if matches!(rec.op, Op::Insert | Op::Snapshot) {
            let seq: i64 = rec.key.unwrap()[0].clone().unwrap().parse().unwrap();
            *seen.entry(seq).or_default() += 1;
        }
    }
    assert!(
        reader.gaps().unwrap().is_empty(),
        "a reconnect is not a gap"
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    let archived: Vec<i64> = seen.keys().copied().collect();
    assert_eq!(
        archived, expected,
        "the archive holds exactly the rows PostgreSQL holds"
    );
}

/// SIGSTOP the capture past `wal_sender_timeout` (10 s in the test clusters) while rows are
/// committed, then SIGCONT: the server has dropped the connection; the capture reconnects and
/// resumes from its durable position.
#[test]
fn a_stalled_capture_past_wal_sender_timeout_resumes_without_loss() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("stall").unwrap();
    cluster
        .psql(&db, "CREATE TABLE ledger (seq bigint PRIMARY KEY)")
        .unwrap();
    let url = cluster.url(&db);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut child = spawn_capture(&url, &archive, &db, None);
    wait_slot_active(cluster, &db, &db, &mut child);
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let walsender = |cluster: &Cluster| {
        cluster.psql(&db, &format!("SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = '{db}'")).unwrap()
    };
    let before = walsender(cluster);
    cluster
        .psql(&db, "INSERT INTO ledger SELECT generate_series(1, 100)")
        .unwrap();
    signal("-STOP");
    for round in 1..=12 {
        cluster
            .psql(
                &db,
                &format!(
                    "INSERT INTO ledger SELECT generate_series({}, {})",
                    round * 100 + 1,
                    round * 100 + 100
                ),
            )
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    signal("-CONT");
    cluster
        .psql(&db, "INSERT INTO ledger SELECT generate_series(2001, 2100)")
        .unwrap();
    let end = crate::insert_lsn(cluster, &db);
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster
        .psql(&db, &format!("SELECT coalesce(bool_and(confirmed_flush_lsn >= '{end}'), false) FROM pg_replication_slots WHERE slot_name = '{db}'"))
        .unwrap()
        != "t"
    {
        assert!(child.try_wait().unwrap().is_none(), "capture exited instead of reconnecting");
        assert!(Instant::now() < deadline, "capture did not resume after SIGCONT");
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = walsender(cluster);
    assert!(
        after != before && after != "0",
        "the server dropped the stalled connection and the capture reconnected"
    );
    terminate(&mut child);
    let reader = LogReader::open(&archive).unwrap();
    let mut seqs: Vec<i64> = reader
        .all_changes(&archive)
        .unwrap()
        .into_iter()
        .filter(|(_, r)| r.op == Op::Insert)
        .map(|(_, r)| r.key.unwrap()[0].clone().unwrap().parse().unwrap())
        .collect();
    let n = seqs.len();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "nothing stored twice");
    let expected: Vec<i64> = (1..=1300).chain(2001..=2100).collect();
    assert_eq!(seqs, expected);
}
