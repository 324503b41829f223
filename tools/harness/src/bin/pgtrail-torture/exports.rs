//! Faults of the export side, run beside the capture under load: an export killed at each of
//! its crash points (a plain file written, a Delta table's commit about to be made and just
//! made, Bemi's table about to commit) and run again must hold every change of its range
//! exactly once.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The table the export faults export (the workload writes it in every transaction).
const TABLE: &str = "public.acct";

fn run(
    bin: &Path,
    args: &[String],
    crash_at: Option<&str>,
) -> Result<std::process::Output, String> {
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("PGTRAIL_CRASH_AT");
    if let Some(point) = crash_at {
        cmd.env("PGTRAIL_CRASH_AT", point);
    }
    cmd.output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))
}

/// The one number `query` answers over the archive (`pgtrail sql`).
fn sql_number(bin: &Path, archive: &Path, query: String) -> Result<u64, String> {
    let out = run(
        bin,
        &[
            "sql".into(),
            "--archive".into(),
            archive.display().to_string(),
            "--format".into(),
            "csv".into(),
            query.clone(),
        ],
        None,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "{query}: no number in {text:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

/// The archive's changes of `table` (or of every table) with `after < lsn <= through`.
fn archived(
    bin: &Path,
    archive: &Path,
    table: Option<&str>,
    after: u64,
    through: u64,
) -> Result<u64, String> {
    let filter = table.map_or(String::new(), |t| {
        let (schema, name) = t.split_once('.').unwrap_or(("public", t));
        format!(" AND \"schema\" = '{schema}' AND \"table\" = '{name}'")
    });
    sql_number(
        bin,
        archive,
        format!("SELECT count(*) FROM changes WHERE lsn > {after} AND lsn <= {through}{filter}"),
    )
}

fn lsn_number(text: &str) -> Result<u64, String> {
    text.parse::<pgtrail_store::Lsn>()
        .map(|l| l.0)
        .map_err(|e| format!("LSN {text:?}: {e}"))
}

/// The newest commit LSN the archive shows now (an export's run starts after it), from
/// `pgtrail status`, which reads the manifest and the log tail, not the segments.
fn archive_end(bin: &Path, archive: &Path) -> Result<u64, String> {
    let out = run(
        bin,
        &[
            "status".into(),
            "--archive".into(),
            archive.display().to_string(),
            "--source".into(),
            String::new(),
            "--format".into(),
            "json".into(),
        ],
        None,
    )?;
    let status: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("status: {e}"))?;
    lsn_number(status["lsn_range"][1].as_str().unwrap_or_default())
}

/// Rows of every Parquet file under `dir` (the parquet crate's footer counts).
fn parquet_rows(dir: &Path) -> Result<u64, String> {
    use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
    let mut rows = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                if !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('_'))
                {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                let reader = SerializedFileReader::new(file)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                rows += reader.metadata().file_metadata().num_rows() as u64;
            }
        }
    }
    Ok(rows)
}

/// Rows a Delta table's log adds, and its `txn` versions in commit order.
fn delta_log(table_dir: &Path) -> Result<(u64, Vec<i64>), String> {
    let log = table_dir.join("_delta_log");
    let mut commits: Vec<_> = std::fs::read_dir(&log)
        .map_err(|e| format!("{}: {e}", log.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    let (mut rows, mut txns) = (0u64, Vec::new());
    for commit in commits {
        let text = std::fs::read_to_string(&commit).map_err(|e| e.to_string())?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let action: Value =
                serde_json::from_str(line).map_err(|e| format!("{}: {e}", commit.display()))?;
            if let Some(stats) = action["add"]["stats"].as_str() {
                let stats: Value = serde_json::from_str(stats).map_err(|e| e.to_string())?;
                rows += stats["numRecords"].as_u64().unwrap_or(0);
            }
            if let Some(v) = action["txn"]["version"].as_i64() {
                txns.push(v);
            }
        }
    }
    Ok((rows, txns))
}

/// Export `TABLE` from `since` (exclusive) with a crash at `point`, run it again, and check
/// that the destination holds each change of the range exactly once.
pub fn crash_and_resume(
    bin: &Path,
    archive: &Path,
    work: &Path,
    url_of: &dyn Fn(&str) -> String,
    point: &str,
    n: usize,
) -> Result<(), String> {
    let since = archive_end(bin, archive)?;
    let dest = work.join(format!("export-fault-{n}"));
    let (layout, delta, bemi) = match point {
        "bemi:before_commit" => ("bemi", false, true),
        "delta:before_commit" | "delta:after_commit" => ("changes", true, false),
        _ => ("changes", false, false),
    };
    let bemi_table = format!("fault_{n}.changes");
    let mut args: Vec<String> = vec![
        "export".into(),
        "--archive".into(),
        archive.display().to_string(),
        "--layout".into(),
        layout.into(),
        "--json".into(),
        "--since".into(),
        pgtrail_store::Lsn(since.saturating_add(1)).to_string(),
    ];
    if bemi {
        args.extend([
            "--to".into(),
            url_of("torture_bemi"),
            "--bemi-table".into(),
            bemi_table.clone(),
        ]);
    } else {
        args.extend([
            "--to".into(),
            dest.display().to_string(),
            "--tables".into(),
            TABLE.into(),
            "--max-rows-per-file".into(),
            "500".into(),
        ]);
        if delta {
            args.extend(["--table-format".into(), "delta".into()]);
        }
    }
    // An export with nothing past `since` to do reaches no crash point and writes nothing:
    // try again until the capture has archived more (the workload commits all the time).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let killed = run(bin, &args, Some(point))?;
        if !killed.status.success() {
            let said = String::from_utf8_lossy(&killed.stderr);
            if !said.contains(&format!("crash point {point} reached")) {
                return Err(format!("the export failed before {point}: {}", said.trim()));
            }
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the export never reached {point} (nothing archived past {} within 60 s?)",
                pgtrail_store::Lsn(since)
            ));
        }
    }
    // Had the killed run committed anything, the run after it would start after that and
    // hold fewer changes than the range: the counts below tell.
    let resumed = run(bin, &args, None)?;
    if !resumed.status.success() {
        return Err(format!(
            "the export after the crash at {point} failed: {}",
            String::from_utf8_lossy(&resumed.stderr).trim()
        ));
    }
    let report: Value =
        serde_json::from_slice(&resumed.stdout).map_err(|e| format!("the export's report: {e}"))?;
    if bemi {
        let through = lsn_number(report["until_lsn"].as_str().unwrap_or_default())?;
        let expected = archived(bin, archive, None, since, through)?;
        if report["rows"].as_u64() != Some(expected) {
            return Err(format!(
                "Bemi's table got {} changes after the crash at {point}; the archive holds {expected} in the range",
                report["rows"]
            ));
        }
        return Ok(());
    }
    if report["resumed"] != true {
        return Err(format!(
            "the export after the crash at {point} did not finish the interrupted run"
        ));
    }
    let state: Value = serde_json::from_slice(
        &std::fs::read(dest.join("_pgtrail_export/changes.json"))
            .map_err(|e| format!("the export state: {e}"))?,
    )
    .map_err(|e| format!("the export state: {e}"))?;
    let through = lsn_number(
        state["tables"][TABLE]["through_lsn"]
            .as_str()
            .unwrap_or_default(),
    )?;
    let expected = archived(bin, archive, Some(TABLE), since, through)?;
    let table_dir = dest.join(format!("table={TABLE}"));
    let held = if delta {
        let (rows, txns) = delta_log(&table_dir)?;
        let mut distinct = txns.clone();
        distinct.dedup();
        if distinct.len() != txns.len() {
            return Err(format!(
                "a run was committed twice to the Delta table: txn versions {txns:?}"
            ));
        }
        rows
    } else {
        parquet_rows(&table_dir)?
    };
    if held != expected {
        return Err(format!(
            "after the crash at {point} the export holds {held} changes of {TABLE}; the archive holds {expected} in its range"
        ));
    }
    let _ = std::fs::remove_dir_all(&dest);
    Ok(())
}
