//! Faults of the parts beside the capture that write to the source or join it while it runs:
//! a revert killed before its commit, and PostgreSQL restarted while the capture copies a
//! table created under it.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{DB, Harness};

/// The table the revert faults change and revert (created with the workload's tables).
pub const REVERT_TABLE_SQL: &str = "CREATE TABLE revert_target (id int PRIMARY KEY, v text NOT NULL); \
    INSERT INTO revert_target SELECT g, 'v' || g FROM generate_series(1, 30) g;";

const REVERT_ROWS: &str = "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM revert_target";

impl Harness {
    fn psql(&self, sql: &str) -> Result<String, String> {
        self.cluster.psql(DB, sql).map_err(|e| e.to_string())
    }

    /// Wait until the capture has made everything before `lsn` durable (its slot confirmed it).
    pub(crate) fn wait_durable(&self, lsn: &str, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let done = self
                .psql(&format!("SELECT coalesce(bool_and(confirmed_flush_lsn >= '{lsn}'), false) FROM pg_replication_slots WHERE slot_name = '{}'", crate::SLOT))
                .unwrap_or_default();
            if done == "t" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the capture did not make {lsn} durable within {limit:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn pgtrail_sql(&self, query: &str) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .args(["sql", "--format", "csv", "--archive"])
            .arg(&self.archive)
            .arg(query)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The archive's rows of `public.<table>` (`id`, `v`) at `lsn`, each as `id=v` in key
    /// order: how [`REVERT_ROWS`] and the table-sync check say PostgreSQL's.
    fn archived_rows(&self, table: &str, lsn: &str) -> Result<Vec<String>, String> {
        let csv = self.pgtrail_sql(&format!(
            "SELECT id, v FROM as_of_lsn('public.{table}', '{lsn}') ORDER BY id"
        ))?;
        Ok(csv
            .lines()
            .skip(1)
            .map(|l| l.replacen(',', "=", 1))
            .collect())
    }

    /// Change some rows in a transaction labelled with a context, then revert that context
    /// with `pgtrail revert --apply` killed just before its commit: the source must hold the
    /// changed rows still (nothing half applied). Run again, the revert must put back what the
    /// rows held before, and the archive must hold what PostgreSQL holds.
    pub fn revert_crash_and_resume(&mut self, n: usize) -> Result<(), String> {
        let tag = format!("r{n}");
        let before = self.psql(REVERT_ROWS)?;
        let low = 1 + (n * 7) % 25;
        self.psql(&format!(
            "BEGIN; SELECT pg_logical_emit_message(true, '_bemi', '{{\"torture_revert\":\"{tag}\"}}'); \
             UPDATE revert_target SET v = v || '-{tag}' WHERE id BETWEEN {low} AND {}; COMMIT;",
            low + 4
        ))?;
        let changed = self.psql(REVERT_ROWS)?;
        let lsn = self.psql("SELECT pg_current_wal_insert_lsn()::text")?;
        self.wait_durable(&lsn, Duration::from_secs(120))?;
        let revert = |crash: bool| {
            let mut cmd = Command::new(&self.bin);
            cmd.args(["revert", "--apply", "--context"])
                .arg(format!("torture_revert={tag}"))
                .args(["--tables", "public.revert_target", "--archive"])
                .arg(&self.archive)
                .args(["--source", &self.cluster.url(DB)])
                .env_remove("PGTRAIL_CRASH_AT");
            if crash {
                cmd.env("PGTRAIL_CRASH_AT", "revert:before_commit");
            }
            cmd.output().map_err(|e| e.to_string())
        };
        let interrupted = revert(true)?;
        let said = String::from_utf8_lossy(&interrupted.stderr);
        if interrupted.status.success() || !said.contains("crash point revert:before_commit") {
            return Err(format!(
                "the revert did not stop at its crash point ({}): {}",
                interrupted.status,
                said.trim()
            ));
        }
        let after_crash = self.psql(REVERT_ROWS)?;
        if after_crash != changed {
            return Err(format!(
                "a revert killed before its commit changed the source: {changed} became {after_crash}"
            ));
        }
        let finished = revert(false)?;
        if !finished.status.success() {
            return Err(format!(
                "the revert run again failed: {}",
                String::from_utf8_lossy(&finished.stderr).trim()
            ));
        }
        let now = self.psql(REVERT_ROWS)?;
        if now != before {
            return Err(format!(
                "the revert left {now} where the rows held {before} before the change"
            ));
        }
        // The archive's table at the revert's end is what PostgreSQL holds.
        let lsn = self.psql("SELECT pg_current_wal_insert_lsn()::text")?;
        self.wait_durable(&lsn, Duration::from_secs(120))?;
        let archived = self.archived_rows("revert_target", &lsn)?;
        if archived.join(",") != now {
            return Err(format!(
                "the archive holds revert_target as {} where PostgreSQL holds {now}",
                archived.join(",")
            ));
        }
        eprintln!(
            "torture: revert {tag} killed before its commit changed nothing; run again it put back 5 rows"
        );
        Ok(())
    }

    /// Create a table under load and restart PostgreSQL (fast or immediate) while the capture
    /// copies it in its own snapshot: the capture must copy it again and hold exactly the
    /// table's rows, and the changes after the copy on top.
    pub fn restart_during_table_sync(&mut self, n: usize) -> Result<(), String> {
        let table = format!("fresh_{n}");
        self.psql(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL); \
             INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, 20000) g;"
        ))?;
        // The copy runs in a temporary slot's snapshot: restart once it exists (or after a
        // while anyway: a copy quicker than the polling still meets the restart's reconnect).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut during_copy = false;
        while Instant::now() < deadline {
            if self.psql("SELECT count(*) FROM pg_replication_slots WHERE temporary")? != "0" {
                during_copy = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mode = if n.is_multiple_of(2) {
            "immediate"
        } else {
            "fast"
        };
        self.cluster.restart(mode).map_err(|e| e.to_string())?;
        self.psql(&format!(
            "UPDATE {table} SET v = 'after-restart' WHERE id % 997 = 0; DELETE FROM {table} WHERE id % 1009 = 0;"
        ))?;
        let expected = self.psql(&format!(
            "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM {table}"
        ))?;
        // The capture may find the table only after the restart (its catalog watch runs every
        // second), and copy it after these changes: ask at later and later LSNs until the
        // archive holds the table there.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let lsn = self.psql("SELECT pg_current_wal_insert_lsn()::text")?;
            self.wait_durable(&lsn, Duration::from_secs(180))?;
            let answer = self.archived_rows(&table, &lsn);
            let archived = answer.as_deref().unwrap_or_default();
            if archived.join(",") == expected {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "after a {mode} restart during its copy, the archive holds {} of {table}'s rows at {lsn}, PostgreSQL {} ({})",
                    archived.len(),
                    expected.split(',').count(),
                    answer.err().unwrap_or_else(|| "rows differ".into())
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.psql(&format!("DROP TABLE {table}"))?;
        eprintln!(
            "torture: {mode} restart {} the copy of {table}: its 20000 rows and changes after held exactly",
            if during_copy { "during" } else { "after" }
        );
        Ok(())
    }
}
