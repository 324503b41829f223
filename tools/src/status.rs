//! `pgtrail status`: what an archive holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pgtrail_store::{LogReader, Lsn, Op};
use serde_json::json;

#[derive(Default)]
struct TableStats {
    by_op: BTreeMap<String, u64>,
    total: u64,
    first: Option<(Lsn, i64)>,
    last: Option<(Lsn, i64)>,
    /// Changes still in the log (not yet in a segment).
    in_log: u64,
    segments: u64,
    segment_bytes: u64,
    raw_bytes: u64,
}

impl TableStats {
    fn see(&mut self, first: (Lsn, i64), last: (Lsn, i64)) {
        if self.first.is_none_or(|f| first.0 < f.0) {
            self.first = Some(first);
        }
        if self.last.is_none_or(|l| last.0 > l.0) {
            self.last = Some(last);
        }
    }
}

/// Format microseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.ffffff+00`.
pub(crate) fn format_us(us: i64) -> String {
    pgtrail_store::segment::format_utc_micros(us)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub async fn run(archive: PathBuf, source: Option<String>, format: &str) -> anyhow::Result<()> {
    let dir = archive.clone();
    let report = tokio::task::spawn_blocking(move || collect(&dir)).await??;
    let mut report = report;
    if let Some(url) = source {
        report["slot"] = slot_lag(&url, &report)
            .await
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    }
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&archive, &report);
    }
    Ok(())
}

fn collect(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let (_db, reader) = LogReader::open(dir)
        .with_context(|| format!("cannot read the archive {}", dir.display()))?;
    let identity = reader.source_identity()?;
    let relations = reader.relations()?;
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for r in &relations {
        names.insert(r.relation_id, r.qualified_name());
    }
    let mut tables: BTreeMap<String, TableStats> = BTreeMap::new();
    let (mut min_lsn, mut max_lsn) = (None::<Lsn>, None::<Lsn>);
    let (mut min_t, mut max_t) = (None::<i64>, None::<i64>);
    let mut total = 0u64;
    let manifest = reader.manifest()?;
    let (mut seg_bytes, mut seg_raw) = (0u64, 0u64);
    for seg in &manifest.segments {
        let t = tables.entry(seg.table_name()).or_default();
        for (op, n) in &seg.op_counts {
            *t.by_op.entry(op.clone()).or_default() += n;
        }
        t.total += seg.rows;
        t.segments += 1;
        t.segment_bytes += seg.bytes;
        t.raw_bytes += seg.raw_bytes;
        t.see(
            (seg.min_key.commit_lsn, seg.min_committed_at_us),
            (seg.max_key.commit_lsn, seg.max_committed_at_us),
        );
        total += seg.rows;
        seg_bytes += seg.bytes;
        seg_raw += seg.raw_bytes;
        min_lsn = Some(min_lsn.map_or(seg.min_key.commit_lsn, |m| m.min(seg.min_key.commit_lsn)));
        max_lsn = Some(max_lsn.map_or(seg.max_key.commit_lsn, |m| m.max(seg.max_key.commit_lsn)));
        min_t = Some(min_t.map_or(seg.min_committed_at_us, |m| m.min(seg.min_committed_at_us)));
        max_t = Some(max_t.map_or(seg.max_committed_at_us, |m| m.max(seg.max_committed_at_us)));
    }
    let mut in_log = 0u64;
    for entry in reader.changes()? {
        let (key, rec) = entry?;
        total += 1;
        in_log += 1;
        let name = if rec.op == Op::Message {
            "pgtrail.messages".to_string()
        } else {
            names
                .get(&rec.relation_id)
                .cloned()
                .unwrap_or_else(|| format!("(relation {})", rec.relation_id))
        };
        let t = tables.entry(name).or_default();
        *t.by_op.entry(rec.op.as_str().to_string()).or_default() += 1;
        t.total += 1;
        t.in_log += 1;
        t.see(
            (key.commit_lsn, rec.committed_at_us),
            (key.commit_lsn, rec.committed_at_us),
        );
        min_lsn = Some(min_lsn.map_or(key.commit_lsn, |m| m.min(key.commit_lsn)));
        max_lsn = Some(max_lsn.map_or(key.commit_lsn, |m| m.max(key.commit_lsn)));
        min_t = Some(min_t.map_or(rec.committed_at_us, |m| m.min(rec.committed_at_us)));
        max_t = Some(max_t.map_or(rec.committed_at_us, |m| m.max(rec.committed_at_us)));
    }
    let transactions = reader.transactions()?;
    let gaps = reader.gaps()?;
    let last_commit_us = transactions.last().map(|(_, t)| t.committed_at_us);
    Ok(json!({
        "archive": dir.display().to_string(),
        "source": identity.as_ref().map(|i| json!({
            "system_id": i.system_id, "database": i.database, "slot": i.slot, "publication": i.publication,
            "consistent_point": i.consistent_point.to_string(), "snapshot_complete": i.snapshot_complete,
        })),
        "position": reader.position()?.to_string(),
        "changes": total,
        "transactions": transactions.len() as u64 + manifest.compacted_transactions,
        "segments": {
            "files": manifest.segments.len(), "bytes": seg_bytes, "raw_bytes": seg_raw,
            "compression_ratio": if seg_bytes > 0 { seg_raw as f64 / seg_bytes as f64 } else { 0.0 },
            "changes": manifest.compacted_changes,
            "compacted_through": manifest.compacted_through.to_string(),
        },
        "log": {
            "changes": in_log, "transactions": transactions.len(),
            "file_bytes": std::fs::metadata(dir.join(pgtrail_store::LOG_FILE)).map(|m| m.len()).unwrap_or(0),
        },
        "lsn_range": [min_lsn.map(|l| l.to_string()), max_lsn.map(|l| l.to_string())],
        "time_range": [min_t.map(format_us), max_t.map(format_us)],
        "last_commit_us": last_commit_us,
        "bytes": dir_size(dir),
        "schema_versions": relations.len(),
        "gaps": gaps.iter().map(|g| json!({"from": g.from.to_string(), "to": g.to.to_string(), "reason": g.reason, "recorded_at": format_us(g.recorded_at_us)})).collect::<Vec<_>>(),
        "tables": tables.iter().map(|(name, t)| json!({
            "table": name, "changes": t.total, "by_op": t.by_op, "in_log": t.in_log,
            "segments": t.segments, "segment_bytes": t.segment_bytes, "raw_bytes": t.raw_bytes,
            "first_lsn": t.first.map(|f| f.0.to_string()), "last_lsn": t.last.map(|l| l.0.to_string()),
            "first_at": t.first.map(|f| format_us(f.1)), "last_at": t.last.map(|l| format_us(l.1)),
        })).collect::<Vec<_>>(),
    }))
}

async fn slot_lag(url: &str, report: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let source = pgtrail_capture::SourceConfig::parse(url)?;
    let slot = report["source"]["slot"]
        .as_str()
        .unwrap_or("pgtrail")
        .to_string();
    let sql = source.connect_sql().await?;
    let row = sql
        .query_opt(
            "SELECT confirmed_flush_lsn::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, wal_status, active \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        return Ok(json!({ "name": slot, "exists": false }));
    };
    let lag_bytes: Option<i64> = row.get(1);
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_micros() as i64;
    let lag_seconds = match (lag_bytes, report["last_commit_us"].as_i64()) {
        (Some(b), Some(last)) if b > 0 => (now_us - last) as f64 / 1e6,
        _ => 0.0,
    };
    Ok(json!({
        "name": slot, "exists": true, "confirmed_flush_lsn": row.get::<_, Option<String>>(0),
        "lag_bytes": lag_bytes, "lag_seconds": lag_seconds, "wal_status": row.get::<_, Option<String>>(2),
        "active": row.get::<_, bool>(3),
    }))
}

fn print_table(archive: &Path, r: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    println!("archive       {}", archive.display());
    if let Some(src) = r["source"].as_object() {
        println!(
            "source        database {} (system {}), slot {}, publication {}",
            s(&src["database"]),
            s(&src["system_id"]),
            s(&src["slot"]),
            s(&src["publication"])
        );
        println!(
            "snapshot      at {} ({})",
            s(&src["consistent_point"]),
            if src["snapshot_complete"].as_bool() == Some(true) {
                "complete"
            } else {
                "INCOMPLETE"
            }
        );
    }
    println!(
        "changes       {} in {} transactions",
        r["changes"], r["transactions"]
    );
    println!(
        "lsn range     {} .. {}",
        s(&r["lsn_range"][0]),
        s(&r["lsn_range"][1])
    );
    println!(
        "time range    {} .. {}",
        s(&r["time_range"][0]),
        s(&r["time_range"][1])
    );
    println!("durable to    {}", s(&r["position"]));
    let seg = &r["segments"];
    println!(
        "segments      {} files, {} bytes holding {} bytes of change records (ratio {:.2}), compacted through {}",
        seg["files"],
        seg["bytes"],
        seg["raw_bytes"],
        seg["compression_ratio"].as_f64().unwrap_or(0.0),
        s(&seg["compacted_through"])
    );
    println!(
        "log tail      {} changes in {} transactions not yet compacted (log.redb {} bytes)",
        r["log"]["changes"], r["log"]["transactions"], r["log"]["file_bytes"]
    );
    println!("size          {} bytes", r["bytes"]);
    match r["gaps"].as_array() {
        Some(g) if !g.is_empty() => {
            for gap in g {
                println!(
                    "GAP           {} .. {}: {}",
                    s(&gap["from"]),
                    s(&gap["to"]),
                    s(&gap["reason"])
                );
            }
        }
        _ => println!("gaps          none"),
    }
    if let Some(slot) = r.get("slot").and_then(|v| v.as_object()) {
        if slot.get("exists").and_then(|v| v.as_bool()) == Some(true) {
            println!(
                "slot lag      {} bytes, {:.1} s (confirmed {}, wal_status {})",
                slot["lag_bytes"],
                slot["lag_seconds"].as_f64().unwrap_or(0.0),
                s(&slot["confirmed_flush_lsn"]),
                s(&slot["wal_status"])
            );
        } else if let Some(e) = slot.get("error") {
            println!("slot lag      unavailable: {}", s(e));
        } else {
            println!("slot lag      the slot does not exist on the source");
        }
    }
    println!();
    println!(
        "{:<32} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>11} {:>6}  last change",
        "table",
        "changes",
        "snapshot",
        "insert",
        "update",
        "delete",
        "truncate",
        "in log",
        "segs",
        "seg bytes",
        "ratio"
    );
    for t in r["tables"].as_array().into_iter().flatten() {
        let n = |op: &str| t["by_op"][op].as_u64().unwrap_or(0);
        let u = |k: &str| t[k].as_u64().unwrap_or(0);
        let ratio = if u("segment_bytes") > 0 {
            format!("{:.2}", u("raw_bytes") as f64 / u("segment_bytes") as f64)
        } else {
            "-".into()
        };
        println!(
            "{:<32} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>11} {:>6}  {}",
            s(&t["table"]),
            u("changes"),
            n("snapshot"),
            n("insert"),
            n("update"),
            n("delete"),
            n("truncate"),
            u("in_log"),
            u("segments"),
            u("segment_bytes"),
            ratio,
            s(&t["last_at"])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::format_us;

    #[test]
    fn timestamps_format_as_utc() {
        assert_eq!(format_us(0), "1970-01-01 00:00:00.000000+00");
        assert_eq!(
            format_us(1_795_000_000_123_456),
            "2026-11-18 11:06:40.123456+00"
        );
        assert_eq!(format_us(-1), "1969-12-31 23:59:59.999999+00");
    }
}
