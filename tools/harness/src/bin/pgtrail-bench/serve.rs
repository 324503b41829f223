//! The `serve` measurements, on the queries suite's dataset (10M+ changes at full scale):
//! `pgtrail serve` answering over HTTP against PostgreSQL answering the same questions over
//! the audit-trigger table (with the indexes that serve them), each client on a connection
//! it keeps open:
//!
//! - a row's history (`/api/tables/public.accounts/history?key=K` against the audit rows of
//!   the key): median and p99 latency over hot and cold keys; both must give as many versions
//!   for every key;
//! - the newest 100 changes of a table (`/api/changes?table=…&limit=100` against `ORDER BY id
//!   DESC LIMIT 100`);
//! - reading the history as a stream: one SSE client from the beginning, against keyset pages
//!   of 1,000 audit rows (what a consumer of a trigger table does), in changes per second;
//!   then 200 SSE clients at once (pgtrail only: PostgreSQL would need 200 connections);
//! - the server's peak memory (VmHWM).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use pgtrail_capture::cluster::Cluster;

use super::{Args, Measurement};

/// The server, stopped when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(archive: &Path) -> anyhow::Result<Server> {
    let bin = std::env::current_exe()?.with_file_name("pgtrail");
    let mut child = Command::new(&bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-streams",
            "1000",
            "--archive",
        ])
        .arg(archive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?);
    let mut line = String::new();
    stderr.read_line(&mut line)?;
    let addr = line
        .strip_prefix("serve: http://")
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("pgtrail serve did not start: {line}"))?;
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    Ok(Server { child, addr })
}

/// An HTTP/1.1 client on one kept-alive connection.
struct Http {
    reader: BufReader<TcpStream>,
}

impl Http {
    fn connect(addr: SocketAddr) -> anyhow::Result<Http> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        Ok(Http {
            reader: BufReader::new(stream),
        })
    }

    /// GET `path`: the status and body (a JSON error is a failure of the benchmark).
    fn get(&mut self, path: &str) -> anyhow::Result<serde_json::Value> {
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n"
        )?;
        let (status, length, chunked) = head(&mut self.reader)?;
        let body = if chunked {
            let mut body = Vec::new();
            while let Some(chunk) = next_chunk(&mut self.reader)? {
                body.extend(chunk);
            }
            body
        } else {
            let mut body = vec![0; length.context("no Content-Length")?];
            self.reader.read_exact(&mut body)?;
            body
        };
        if status != 200 {
            bail!("{path}: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// A response's status, Content-Length and whether it is chunked.
fn head(reader: &mut impl std::io::BufRead) -> anyhow::Result<(u16, Option<usize>, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            return Ok((status, length, chunked));
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
}

/// The next chunk of a chunked body; `None` at its end.
fn next_chunk(reader: &mut impl std::io::BufRead) -> anyhow::Result<Option<Vec<u8>>> {
    let mut size = String::new();
    reader.read_line(&mut size)?;
    let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok((size > 0).then_some(chunk))
}

/// Read `events` change events from an SSE stream of `path`.
fn read_stream(addr: SocketAddr, path: &str, events: u64) -> anyhow::Result<u64> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let (status, _, _) = head(&mut reader)?;
    if status != 200 {
        bail!("{path}: {status}");
    }
    // Events are counted by their `event: change` line; one may straddle two chunks.
    let marker = b"event: change\n";
    let (mut seen, mut carry) = (0u64, Vec::new());
    while seen < events {
        let Some(chunk) = next_chunk(&mut reader)? else {
            bail!("{path}: the stream ended after {seen} events");
        };
        carry.extend_from_slice(&chunk);
        seen += carry.windows(marker.len()).filter(|w| w == marker).count() as u64;
        let keep = carry.len().saturating_sub(marker.len() - 1);
        carry.drain(..keep);
    }
    Ok(seen)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[allow(
    clippy::too_many_arguments,
    reason = "the queries suite's dataset, passed through"
)]
pub fn measure(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    db: &str,
    archive: &Path,
    accounts: u64,
    changes: u64,
    args: &Args,
    results: &mut Vec<Measurement>,
) -> anyhow::Result<()> {
    let server = start(archive)?;
    let workload = format!("{changes} changes of 2 tables, over loopback, one connection each");
    let (client, connection) = rt.block_on(tokio_postgres::connect(
        &cluster.url(db),
        tokio_postgres::NoTls,
    ))?;
    rt.spawn(connection);
    let history_sql = rt.block_on(client.prepare(
        "SELECT * FROM audit_log WHERE table_name = 'accounts' \
         AND coalesce(record, old_record)->>'id' = $1 ORDER BY id",
    ))?;
    let newest_sql = rt.block_on(client.prepare(
        "SELECT * FROM audit_log WHERE table_name = 'accounts' ORDER BY id DESC LIMIT 100",
    ))?;
    let page_sql = rt.block_on(client.prepare(
        "SELECT * FROM audit_log WHERE table_name = 'accounts' AND id > $1 ORDER BY id LIMIT 1000",
    ))?;
    let mut http = Http::connect(server.addr)?;
    // Hot keys (the workload updates low ids most) and cold ones spread over the table.
    let requests: u64 = if args.quick { 40 } else { 400 };
    let keys: Vec<u64> = (0..requests)
        .map(|i| {
            if i % 2 == 0 {
                1 + i / 2
            } else {
                1 + (i * 7919) % accounts
            }
        })
        .collect();
    let mut push = |contestant: &'static str, metric: &'static str, rep, value, unit| {
        eprintln!("serve rep {rep}: {contestant}: {metric}: {value:.3} {unit}");
        results.push(Measurement {
            suite: "serve",
            contestant,
            workload: workload.clone(),
            rep,
            metric,
            value,
            unit,
        });
    };
    // One untimed round first (caches warm for both), then the timed ones.
    for rep in 0..=args.reps.max(1) {
        let (mut api, mut pg) = (Vec::new(), Vec::new());
        for &key in &keys {
            let started = Instant::now();
            let body = http.get(&format!("/api/tables/public.accounts/history?key={key}"))?;
            api.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let rows = rt.block_on(client.query(&history_sql, &[&key.to_string()]))?;
            pg.push(started.elapsed().as_secs_f64() * 1e3);
            let versions = body["versions"].as_array().map_or(0, Vec::len);
            if versions != rows.len() || body["truncated"] == true {
                bail!(
                    "serve: key {key}: the API gave {versions} versions, the audit table {}",
                    rows.len()
                );
            }
        }
        let (mut api_newest, mut pg_newest) = (Vec::new(), Vec::new());
        for _ in 0..keys.len() / 2 {
            let started = Instant::now();
            let body = http.get("/api/changes?table=public.accounts&limit=100")?;
            api_newest.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let rows = rt.block_on(client.query(&newest_sql, &[]))?;
            pg_newest.push(started.elapsed().as_secs_f64() * 1e3);
            let given = body["changes"].as_array().map_or(0, Vec::len);
            if given != 100 || rows.len() != 100 {
                bail!(
                    "serve: newest changes: the API gave {given}, the audit table {}",
                    rows.len()
                );
            }
        }
        if rep == 0 {
            continue;
        }
        let rep = rep - 1;
        for (contestant, history, newest) in [
            ("pgtrail-serve", &mut api, &mut api_newest),
            ("postgres", &mut pg, &mut pg_newest),
        ] {
            history.sort_by(f64::total_cmp);
            newest.sort_by(f64::total_cmp);
            push(
                contestant,
                "row_history_p50",
                rep,
                percentile(history, 0.5),
                "ms",
            );
            push(
                contestant,
                "row_history_p99",
                rep,
                percentile(history, 0.99),
                "ms",
            );
            push(
                contestant,
                "newest_changes_p50",
                rep,
                percentile(newest, 0.5),
                "ms",
            );
            push(
                contestant,
                "newest_changes_p99",
                rep,
                percentile(newest, 0.99),
                "ms",
            );
        }

        // The history read as a stream, one reader: the archive's SSE against keyset pages.
        let events = if args.quick { 5_000 } else { 500_000 }.min(changes / 2);
        let started = Instant::now();
        read_stream(
            server.addr,
            "/api/stream?since=beginning&tables=public.accounts",
            events,
        )?;
        push(
            "pgtrail-serve",
            "stream_1_client",
            rep,
            events as f64 / started.elapsed().as_secs_f64(),
            "changes/s",
        );
        let started = Instant::now();
        let (mut last, mut read) = (0i64, 0u64);
        while read < events {
            let rows = rt.block_on(client.query(&page_sql, &[&last]))?;
            let Some(row) = rows.last() else { break };
            last = row.get(0);
            read += rows.len() as u64;
        }
        push(
            "postgres",
            "stream_1_client",
            rep,
            read as f64 / started.elapsed().as_secs_f64(),
            "changes/s",
        );

        // 200 readers at once, each from the beginning.
        let clients = 200;
        let each = (events / 20).max(100);
        let started = Instant::now();
        let readers: Vec<_> = (0..clients)
            .map(|_| {
                let addr = server.addr;
                std::thread::spawn(move || {
                    read_stream(
                        addr,
                        "/api/stream?since=beginning&tables=public.accounts",
                        each,
                    )
                })
            })
            .collect();
        let mut total = 0;
        for r in readers {
            total += r
                .join()
                .map_err(|_| anyhow::anyhow!("a stream reader panicked"))??;
        }
        push(
            "pgtrail-serve",
            "stream_200_clients",
            rep,
            total as f64 / started.elapsed().as_secs_f64(),
            "changes/s",
        );
    }
    if let Some(mib) = peak_rss_mib(server.child.id()) {
        push("pgtrail-serve", "server_peak_rss", 0, mib, "MiB");
    }
    Ok(())
}

/// The serve measurements' ratios, for the report.
pub fn report(medians: &std::collections::BTreeMap<(&str, &str, &str), f64>) {
    let m = |c: &str, metric: &str| medians.get(&("serve", c, metric)).copied();
    let rows = [
        ("row_history_p50", "a row's history, median", "ms"),
        ("row_history_p99", "a row's history, p99", "ms"),
        (
            "newest_changes_p50",
            "newest 100 changes of a table, median",
            "ms",
        ),
        (
            "newest_changes_p99",
            "newest 100 changes of a table, p99",
            "ms",
        ),
        (
            "stream_1_client",
            "history as a stream, one reader",
            "changes/s",
        ),
    ];
    let mut lines = Vec::new();
    for (metric, what, unit) in rows {
        if let (Some(p), Some(g)) = (m("pgtrail-serve", metric), m("postgres", metric)) {
            let ratio = if unit == "ms" { g / p } else { p / g };
            lines.push(format!(
                "| {what} | {p:.2} {unit} | {g:.2} {unit} | {ratio:.2} |"
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    println!();
    println!(
        "| serve: question | pgtrail serve | PostgreSQL (trigger table) | advantage of pgtrail (> 1: pgtrail better) |"
    );
    println!("|---|---|---|---|");
    for l in lines {
        println!("{l}");
    }
    if let Some(t) = m("pgtrail-serve", "stream_200_clients") {
        println!("Serve: 200 stream readers at once: **{t:.0} changes/s** in all");
    }
    if let Some(r) = m("pgtrail-serve", "server_peak_rss") {
        println!("Serve: server peak memory **{r:.0} MiB**");
    }
}
