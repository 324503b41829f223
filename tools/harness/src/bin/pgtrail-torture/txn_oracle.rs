//! The per-transaction oracle: a second logical slot on the same database, decoded by
//! PostgreSQL's own `test_decoding`, counts the changes of every transaction to the
//! workload's tables; the archive must hold exactly as many changes of each table for each
//! transaction ID. A change lost inside an otherwise complete transaction, or one stored
//! twice, cannot hide behind content hashes this way.
//!
//! The tables are those whose every change the stream carries from the start (the ledger,
//! `acct` and the revert faults' table): a table the capture joins later is copied at a
//! snapshot instead, so its earlier transactions are not in its stream by design.

use std::collections::BTreeMap;

use pgtrail_capture::cluster::Cluster;

use crate::{DB, Verdict};

const SLOT: &str = "torture_oracle";
const TABLES: [&str; 3] = ["ledger", "acct", "revert_target"];

/// Changes per (transaction ID, table) as PostgreSQL decoded them.
pub struct TxnOracle {
    counts: BTreeMap<(u32, String), u64>,
}

impl TxnOracle {
    /// Create the slot: before the capture's, so that it sees every transaction the capture's
    /// stream can (the workload starts after both).
    pub fn create(cluster: &Cluster) -> Result<TxnOracle, String> {
        cluster
            .psql(
                DB,
                &format!(
                    "SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'test_decoding')"
                ),
            )
            .map_err(|e| format!("cannot create the test_decoding slot: {e}"))?;
        Ok(TxnOracle {
            counts: BTreeMap::new(),
        })
    }

    /// Take what the slot has decoded so far (and let the server release its WAL). After an
    /// immediate restart the slot may decode again transactions already taken (its position
    /// is saved at checkpoints): each transaction comes whole, so its counts replace the ones
    /// taken before rather than add to them.
    pub fn drain(&mut self, cluster: &Cluster) -> Result<u64, String> {
        let tables = TABLES.join("|");
        let sql = format!(
            "SELECT xid::text || '|' || substring(data from '^table public\\.([a-z_]+):') || '|' || count(*) \
             FROM pg_logical_slot_get_changes('{SLOT}', NULL, NULL, 'include-xids', '1', 'skip-empty-xacts', '1') \
             WHERE data ~ '^table public\\.({tables}): (INSERT|UPDATE|DELETE):' \
             GROUP BY xid, substring(data from '^table public\\.([a-z_]+):')"
        );
        let out = cluster
            .psql(DB, &sql)
            .map_err(|e| format!("cannot read the test_decoding slot: {e}"))?;
        let mut taken = 0;
        for line in out.lines().filter(|l| !l.is_empty()) {
            let mut parts = line.split('|');
            let (Some(xid), Some(table), Some(n), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("test_decoding gave {line:?}"));
            };
            let xid = xid.parse().map_err(|_| format!("xid in {line:?}"))?;
            let n = n.parse().map_err(|_| format!("count in {line:?}"))?;
            self.counts.insert((xid, table.to_string()), n);
            taken += 1;
        }
        Ok(taken)
    }

    /// Compare with the archive's changes of the same tables per transaction (`changes` as
    /// CSV: transaction_id, table, count); a missing change counts as lost, an extra one as a
    /// duplicate.
    pub fn check(&self, archived_csv: &str, v: &mut Verdict) {
        let mut archived: BTreeMap<(u32, String), u64> = BTreeMap::new();
        for line in archived_csv.lines().skip(1) {
            let fields: Vec<&str> = line.split(',').collect();
            if let [xid, table, n] = fields[..]
                && let (Ok(xid), Ok(n)) = (xid.parse(), n.parse())
            {
                archived.insert((xid, table.to_string()), n);
            } else {
                v.problems
                    .push(format!("the archive's count per transaction: {line:?}"));
                return;
            }
        }
        let mut wrong = Vec::new();
        for (key, &want) in &self.counts {
            let got = archived.get(key).copied().unwrap_or(0);
            if got < want {
                v.lost += want - got;
            } else if got > want {
                v.duplicates += got - want;
            }
            if got != want {
                wrong.push(format!(
                    "xid {} {}: {got} archived, {want} decoded",
                    key.0, key.1
                ));
            }
        }
        for (key, &got) in &archived {
            if !self.counts.contains_key(key) {
                v.duplicates += got;
                wrong.push(format!(
                    "xid {} {}: {got} archived, none decoded",
                    key.0, key.1
                ));
            }
        }
        let transactions = self
            .counts
            .keys()
            .map(|(xid, _)| xid)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        eprintln!(
            "torture: per-transaction oracle: {transactions} transactions, {} changes of {} decoded by test_decoding; {} (transaction, table) counts differ",
            self.counts.values().sum::<u64>(),
            TABLES.join(", "),
            wrong.len()
        );
        if !wrong.is_empty() {
            v.problems.push(format!(
                "per transaction, the archive differs from test_decoding in {} places, first: {}",
                wrong.len(),
                wrong.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
    }

    /// The query the archive answers [`check`](Self::check) with.
    pub fn archive_query() -> String {
        let tables = TABLES
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "SELECT transaction_id, \"table\", count(*) FROM changes \
             WHERE schema = 'public' AND \"table\" IN ({tables}) \
             AND operation IN ('CREATE', 'UPDATE', 'DELETE') GROUP BY 1, 2"
        )
    }
}
