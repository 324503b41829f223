//! The date of a snapshot read through a slot's exported snapshot, against PostgreSQL itself.
//!
//! A snapshot holds the transactions committed before its slot's consistent point, and is
//! dated a moment later (the server's clock once its copy has begun). A transaction committed
//! in between is streamed after the snapshot, with an earlier time. A pause point holds the
//! capture in that window while the test commits two transactions; then `as_of` by time must
//! answer each moment exactly as PostgreSQL held it, or refuse it, and never hold the window's
//! changes without the snapshot's rows.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pgtrail_capture::cluster::Cluster;
use pgtrail_query::ArchiveSnapshot;

use crate::query::parse_pg_timestamp;
use crate::{insert_lsn, pgtrail, terminate, wait_slot_active};

/// A capture that is killed if the test ends without stopping it: one held at a pause point
/// by a failed test would otherwise wait for its release file for ever.
struct Paused(Child);

impl Drop for Paused {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `pgtrail capture` of `db` into `archive`, held at the pause point `point` until the file
/// `release` exists.
fn capture_paused(
    cluster: &Cluster,
    db: &str,
    archive: &Path,
    point: &str,
    release: &Path,
    extra: &[&str],
) -> Paused {
    let child = pgtrail()
        .args(["capture", "--slot", db, "--publication", db])
        .args(["--progress-secs", "1", "--no-compact"])
        .args(extra)
        .env("PGTRAIL_SOURCE", cluster.url(db))
        .env("PGTRAIL_ARCHIVE", archive)
        .env("PGTRAIL_PAUSE_AT", point)
        .env("PGTRAIL_PAUSE_UNTIL", release)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Paused(child)
}

/// Wait until a slot `condition` picks out is made (its point fixed; it need not be active).
fn wait_slot_made(cluster: &Cluster, db: &str, condition: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster
        .psql(db, &format!("SELECT count(*) FROM pg_replication_slots WHERE {condition} AND confirmed_flush_lsn IS NOT NULL"))
        .unwrap()
        != "1"
    {
        assert!(child.try_wait().unwrap().is_none(), "capture exited early");
        assert!(Instant::now() < deadline, "the slot ({condition}) was never made");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the capture's slot has confirmed everything written so far.
fn caught_up(cluster: &Cluster, db: &str) {
    let end = insert_lsn(cluster, db);
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster
        .psql(db, &format!("SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = '{db}'"))
        .unwrap()
        != "t"
    {
        assert!(Instant::now() < deadline, "capture did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A moment (PostgreSQL's clock, as text) and what a table held then, as `id * 1000 + v` lines.
type Moment = (String, String);

/// Run `sql`, then read the moment and what `table` (id, v) holds (nothing else writes, so it
/// holds them until the next statement).
fn run_and_hold(cluster: &Cluster, db: &str, table: &str, sql: &str) -> Moment {
    cluster.psql(db, sql).unwrap();
    let at = cluster.psql(db, "SELECT clock_timestamp()::text").unwrap();
    let rows = cluster
        .psql(
            db,
            &format!("SELECT id * 1000 + v FROM {table} ORDER BY id"),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    (at, rows)
}

/// With the capture held at its pause point: two transactions on `table`, then the capture
/// let go (`release` made) and caught up, then one more. The moment after each.
fn commit_in_window(cluster: &Cluster, db: &str, table: &str, release: &Path) -> Vec<Moment> {
    let mut moments = Vec::new();
    for sql in [
        format!("UPDATE {table} SET v = v + 100 WHERE id = 1"),
        format!("DELETE FROM {table} WHERE id = 2"),
    ] {
        moments.push(run_and_hold(cluster, db, table, &sql));
    }
    std::fs::write(release, b"").unwrap();
    caught_up(cluster, db);
    let after = format!("INSERT INTO {table} VALUES (9, 9)");
    moments.push(run_and_hold(cluster, db, table, &after));
    caught_up(cluster, db);
    moments
}

/// `as_of` of `table` at each moment through `pgtrail sql`: the rows PostgreSQL held, or a
/// refusal saying `refusal` at a moment before `dated` (µs). Returns (answered, refused).
fn check_moments(
    archive: &Path,
    table: &str,
    moments: &[Moment],
    dated: i64,
    refusal: &str,
) -> (usize, usize) {
    let (mut answered, mut refused) = (0, 0);
    for (at, rows) in moments {
        let out = pgtrail()
            .args(["sql", "--format", "csv", "--archive"])
            .arg(archive)
            .arg(format!(
                "SELECT id * 1000 + v AS r FROM as_of('{table}', TIMESTAMP '{at}') ORDER BY id"
            ))
            .output()
            .unwrap();
        if out.status.success() {
            let got = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                got.lines().skip(1).collect::<Vec<_>>(),
                rows.lines().collect::<Vec<_>>(),
                "as_of at {at} (the snapshot is dated {dated} µs) differs from what PostgreSQL held"
            );
            answered += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(refusal) && parse_pg_timestamp(at) < dated,
                "as_of at {at} (the snapshot is dated {dated} µs): {err}"
            );
            refused += 1;
        }
    }
    assert!(
        answered >= 1,
        "the moment after the snapshot's date is answered"
    );
    (answered, refused)
}

/// The initial snapshot: compacted into one segment with the window's changes (whose least
/// commit time is theirs), the archive still begins at the snapshot's date.
#[test]
fn as_of_by_time_between_the_initial_snapshot_point_and_its_date_is_exact_or_refused() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("window").unwrap();
    cluster
        .psql(
            &db,
            "CREATE TABLE acct (id int PRIMARY KEY, v int);
             INSERT INTO acct SELECT g, g FROM generate_series(1, 5) g;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (archive, release) = (dir.path().join("archive"), dir.path().join("release"));
    let mut capture = capture_paused(
        cluster,
        &db,
        &archive,
        "initial-snapshot-entered",
        &release,
        &[],
    );
    // Made, though not active: the capture holds it only once it streams, after the pause.
    wait_slot_made(cluster, &db, &format!("slot_name = '{db}'"), &mut capture.0);
    let mut moments = commit_in_window(cluster, &db, "acct", &release);
    terminate(&mut capture.0);
    let compact = pgtrail()
        .args(["compact", "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(compact.status.success(), "{compact:?}");

    let snapshot = ArchiveSnapshot::open(&archive).unwrap();
    let table = snapshot.table("public.acct").unwrap();
    assert!(
        table.tail.is_empty() && table.segments.len() == 1,
        "the snapshot and the window's changes share one segment"
    );
    let dated = snapshot.snapshots[0].committed_at_us;
    let window_commit = table.segments[0].min_committed_at_us;
    assert!(
        window_commit < dated && parse_pg_timestamp(&moments[1].0) < dated,
        "the window was reproduced: changes streamed after the snapshot, committed before its date"
    );
    // The first window transaction's own commit time, then the moment after each statement.
    moments.insert(
        0,
        (
            pgtrail_store::segment::format_utc_micros(window_commit),
            moments[0].1.clone(),
        ),
    );
    check_moments(
        &archive,
        "public.acct",
        &moments,
        dated,
        "before the archive's history begins",
    );
}

/// A table that joins capture while it runs, read through a temporary slot. Its copy is dated
/// no later than the first transaction after its point when that transaction is what brings
/// the stream past the point; when a keepalive past the point comes first (as here, while the
/// copy is held), the clock reading stands and the moments before it are refused.
#[test]
fn as_of_by_time_in_a_joining_tables_copy_window_is_exact_or_refused() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("copywindow").unwrap();
    cluster
        .psql(&db, "CREATE TABLE first (id int PRIMARY KEY)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (archive, release) = (dir.path().join("archive"), dir.path().join("release"));
    let mut capture = capture_paused(
        cluster,
        &db,
        &archive,
        "table-copy-entered",
        &release,
        &["--catalog-secs", "1"],
    );
    wait_slot_active(cluster, &db, &db, &mut capture.0);
    cluster
        .psql(
            &db,
            "CREATE TABLE late (id int PRIMARY KEY, v int);
             INSERT INTO late SELECT g, g FROM generate_series(1, 5) g;",
        )
        .unwrap();
    // The copy's temporary slot made: the capture is at (or on its way to) the pause.
    wait_slot_made(
        cluster,
        &db,
        "slot_name LIKE 'pgtrail_sync_%'",
        &mut capture.0,
    );
    let mut moments = commit_in_window(cluster, &db, "late", &release);
    // The copy is stored once the stream passes its point: wait for it in the archive.
    let deadline = Instant::now() + Duration::from_secs(120);
    let copy = loop {
        let snapshot = ArchiveSnapshot::open(&archive).unwrap();
        let initial = snapshot.snapshots[0].lsn;
        if let Some(s) = snapshot.snapshots.iter().find(|s| s.lsn > initial) {
            break s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the table's copy was never stored"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    terminate(&mut capture.0);
    let snapshot = ArchiveSnapshot::open(&archive).unwrap();
    let table = snapshot.table("public.late").unwrap();
    let window_commit = table
        .tail
        .iter()
        .filter(|(key, rec)| key.commit_lsn > copy.lsn && rec.op != pgtrail_store::Op::Snapshot)
        .map(|(_, rec)| rec.committed_at_us)
        .min()
        .expect("the window's changes are streamed after the copy");
    moments.insert(
        0,
        (
            pgtrail_store::segment::format_utc_micros(window_commit),
            moments[0].1.clone(),
        ),
    );
    let (answered, refused) = check_moments(
        &archive,
        "public.late",
        &moments,
        copy.committed_at_us,
        "is before the archive holds public.late",
    );
    eprintln!(
        "copy window: the copy is dated {} µs after the first transaction past its point; {answered} moments answered, {refused} refused",
        copy.committed_at_us - window_commit
    );
}
