//! `pgtrail status`: what an archive holds (the store's [`ArchiveStatus`]), and with
//! `--source` how far the source's slot is behind it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pgtrail_store::ArchiveStatus;
use serde_json::json;

/// A line of the report on stdout. When the reader has gone away (`pgtrail status | head`),
/// the rest of the report has nowhere to go: stop quietly rather than panic as `println!`
/// does on a closed pipe.
macro_rules! say {
    () => {
        say_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        say_line(format_args!($($arg)*))
    };
}

fn say_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // Read-only: nothing is left half-done by leaving here.
            std::process::exit(0);
        }
        eprintln!("error: cannot write the status report: {e}");
        std::process::exit(1);
    }
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
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&archive, &report);
    }
    Ok(())
}

fn collect(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let status = ArchiveStatus::collect(dir)
        .with_context(|| format!("cannot read the archive {}", dir.display()))?;
    Ok(serde_json::to_value(status)?)
}

async fn slot_lag(url: &str, report: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let source = pgtrail_capture::SourceConfig::parse(url)?;
    let slot = report["source"]["slot"]
        .as_str()
        .unwrap_or("pgtrail")
        .to_string();
    let (sql, tls) = source.connect_sql_reporting().await?;
    let (protection, _) = source.protection();
    let connection = match &tls {
        Some(t) => json!({
            "tls": true, "version": t.version, "cipher": t.cipher,
            "verified_chain": t.verified_chain, "verified_name": t.verified_name,
            "settings": protection,
        }),
        None => json!({ "tls": false, "settings": protection }),
    };
    let row = sql
        .query_opt(
            "SELECT confirmed_flush_lsn::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, wal_status, active \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        return Ok(json!({ "name": slot, "exists": false, "connection": connection }));
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
        "active": row.get::<_, bool>(3), "connection": connection,
    }))
}

fn print_table(archive: &Path, r: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    say!("archive       {}", archive.display());
    if let Some(src) = r["source"].as_object() {
        say!(
            "source        database {} (system {}), slot {}, publication {}",
            s(&src["database"]),
            s(&src["system_id"]),
            s(&src["slot"]),
            s(&src["publication"])
        );
        say!(
            "snapshot      at {} ({})",
            s(&src["consistent_point"]),
            if src["snapshot_complete"].as_bool() == Some(true) {
                "complete"
            } else {
                "INCOMPLETE"
            }
        );
    }
    say!(
        "changes       {} in {} transactions",
        r["changes"],
        r["transactions"]
    );
    say!(
        "lsn range     {} .. {}",
        s(&r["lsn_range"][0]),
        s(&r["lsn_range"][1])
    );
    say!(
        "time range    {} .. {}",
        s(&r["time_range"][0]),
        s(&r["time_range"][1])
    );
    say!("durable to    {}", s(&r["position"]));
    let seg = &r["segments"];
    say!(
        "segments      {} files, {} bytes holding {} bytes of change records (ratio {:.2}), compacted through {}",
        seg["files"],
        seg["bytes"],
        seg["raw_bytes"],
        seg["compression_ratio"].as_f64().unwrap_or(0.0),
        s(&seg["compacted_through"])
    );
    if seg["keyframes"].as_u64().unwrap_or(0) > 0 {
        say!(
            "keyframes     {} files, {} bytes (tables' rows at a point, where as_of starts)",
            seg["keyframes"],
            seg["keyframe_bytes"]
        );
    }
    say!(
        "log tail      {} changes in {} transactions not yet compacted (log.redb {} bytes)",
        r["log"]["changes"],
        r["log"]["transactions"],
        r["log"]["file_bytes"]
    );
    if r["log"]["not_completed"].as_u64().is_some_and(|n| n > 0) {
        say!(
            "              {} of them with row images not completed yet (shown completed; the capture stores them when idle)",
            r["log"]["not_completed"]
        );
    }
    let ev = &r["evidence"];
    match ev["latest_checkpoint"].as_u64() {
        Some(signed) if signed > 0 => say!(
            "evidence      tree of {} changes, latest checkpoint {} by {}, {} changes not attested yet",
            ev["tree_size"],
            signed,
            s(&ev["origin"]),
            ev["unattested"]
        ),
        _ => say!(
            "evidence      tree of {} changes, no checkpoint signed (capture or compact with --signing-key, or pgtrail checkpoint)",
            ev["tree_size"]
        ),
    }
    say!("size          {} bytes", r["bytes"]);
    match r["gaps"].as_array() {
        Some(g) if !g.is_empty() => {
            for gap in g {
                say!(
                    "GAP           {} .. {}: {}",
                    s(&gap["from"]),
                    s(&gap["to"]),
                    s(&gap["reason"])
                );
            }
        }
        _ => say!("gaps          none"),
    }
    if let Some(left) = r["not_captured"].as_array() {
        for t in left {
            say!("not captured  {}: {}", s(&t["table"]), s(&t["reason"]));
        }
    }
    if let Some(slot) = r.get("slot").and_then(|v| v.as_object()) {
        if let Some(c) = slot.get("connection") {
            let how = if c["tls"].as_bool() == Some(true) {
                format!(
                    "{} {}, {}",
                    s(&c["version"]),
                    s(&c["cipher"]),
                    pgtrail_capture::source::tls::verification_words(
                        c["verified_chain"].as_bool() == Some(true),
                        c["verified_name"].as_bool() == Some(true),
                    )
                )
            } else {
                "no TLS".to_string()
            };
            say!("connection    {how} ({})", s(&c["settings"]));
        }
        if slot.get("exists").and_then(|v| v.as_bool()) == Some(true) {
            say!(
                "slot lag      {} bytes, {:.1} s (confirmed {}, wal_status {})",
                slot["lag_bytes"],
                slot["lag_seconds"].as_f64().unwrap_or(0.0),
                s(&slot["confirmed_flush_lsn"]),
                s(&slot["wal_status"])
            );
        } else if let Some(e) = slot.get("error") {
            say!("slot lag      unavailable: {}", s(e));
        } else {
            say!("slot lag      the slot does not exist on the source");
        }
    }
    say!();
    say!(
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
        say!(
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
