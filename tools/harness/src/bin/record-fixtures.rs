//! Dev tool: regenerate `fixtures/pgoutput/` from a real PostgreSQL.
//!
//! Runs each `fixtures/sql/<scenario>.sql` on a throwaway cluster with a pgoutput slot, and
//! writes the raw pgoutput messages (`pg_logical_slot_peek_binary_changes`) to
//! `fixtures/pgoutput/<scenario>.bin` as frames of a 4-byte big-endian length and the bytes.
//! Usage: cargo run -p pgtrail-harness --bin record-fixtures [-- <fixtures dir>]

use std::path::PathBuf;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};

fn main() -> anyhow::Result<()> {
    let fixtures = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fixtures".into()));
    let cluster = Cluster::start(ClusterOptions::default())?;
    let mut scenarios: Vec<_> = std::fs::read_dir(fixtures.join("sql"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    scenarios.sort();
    for path in scenarios {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let script = std::fs::read_to_string(&path)?;
        let (setup, workload) = script.split_once("-- capture\n").unwrap_or(("", &script));
        let db = cluster.fresh_database("fixture")?;
        cluster.psql(&db, setup)?;
        cluster.psql(&db, "CREATE PUBLICATION fx FOR ALL TABLES")?;
        cluster.psql(
            &db,
            "SELECT pg_create_logical_replication_slot('fx', 'pgoutput')",
        )?;
        cluster.psql(&db, workload)?;
        let hex = cluster.psql(
            &db,
            "SELECT encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('fx', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'fx', 'messages', 'true')",
        )?;
        let mut out = Vec::new();
        let mut count = 0;
        for line in hex.lines().filter(|l| !l.is_empty()) {
            let bytes: Vec<u8> = (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16))
                .collect::<Result<_, _>>()?;
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(&bytes);
            count += 1;
        }
        cluster.psql(&db, "SELECT pg_drop_replication_slot('fx')")?;
        let target = fixtures.join("pgoutput").join(format!("{name}.bin"));
        std::fs::write(&target, out)?;
        eprintln!("{}: {count} messages", target.display());
    }
    Ok(())
}
