//! A live-stream client that goes away at some point of its stream (before its first event,
//! after some events, in the middle of an event's bytes), then comes back with the last id it
//! got, beside the running capture and workload. The ledger's `seq` is consecutive in commit
//! order (one writer), so the events of both connections together must carry consecutive
//! values from just after where the first one started: any change lost or sent twice across
//! the disconnection shows as a hole or a repeat.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::serve::{exchange, get_request, start};
use crate::{Rng, Verdict};

/// Where the first connection is cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Right after the response's head, before any event.
    AfterHead,
    /// After this many complete events.
    AfterEvents(usize),
    /// After this many complete events and some bytes of the next one.
    MidEvent(usize),
}

struct Sse {
    reader: BufReader<TcpStream>,
    pending: String,
}

/// One `change` event: its id (a cursor) and the ledger's `seq` it carries.
struct Change {
    id: String,
    seq: i64,
}

impl Sse {
    fn open(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> Result<Sse, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: torture\r\nAccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        (&stream)
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader
            .read_line(&mut status)
            .map_err(|e| format!("stream head: {e}"))?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("stream refused: {}", status.trim()));
        }
        loop {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .map_err(|e| format!("stream head: {e}"))?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Ok(Sse {
            reader,
            pending: String::new(),
        })
    }

    /// Read one chunk of the (chunked) body into `pending`.
    fn chunk(&mut self) -> Result<(), String> {
        let mut size = String::new();
        self.reader
            .read_line(&mut size)
            .map_err(|e| format!("stream chunk: {e}"))?;
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| format!("not a chunk size: {size:?}"))?;
        if size == 0 {
            return Err("the stream ended".into());
        }
        let mut chunk = vec![0; size + 2];
        self.reader
            .read_exact(&mut chunk)
            .map_err(|e| format!("stream chunk: {e}"))?;
        self.pending
            .push_str(std::str::from_utf8(&chunk[..size]).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// The next change event (keep-alive comments skipped; any other event is an error).
    /// Keep-alives keep the socket busy, so a capture that stopped making changes durable
    /// would leave this waiting for good: two minutes without a change fails the fault.
    fn next(&mut self) -> Result<Change, String> {
        let since = std::time::Instant::now();
        loop {
            if since.elapsed() > Duration::from_secs(120) {
                return Err(
                    "no ledger change reached the stream in 120 s while the workload writes: the capture stopped making changes durable".into(),
                );
            }
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let (mut id, mut data, mut kind) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(v.trim_start().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = Some(v.trim().to_string());
                    }
                }
                match kind.as_deref() {
                    None => continue,
                    Some("change") => {}
                    Some(other) => {
                        return Err(format!("the stream sent a {other} event: {data:?}"));
                    }
                }
                let data: serde_json::Value =
                    serde_json::from_str(data.as_deref().unwrap_or(""))
                        .map_err(|e| format!("an event's data is not JSON: {e}"))?;
                let seq = ledger_seq(&data["after"])
                    .ok_or_else(|| format!("a ledger change without seq: {data}"))?;
                return Ok(Change {
                    id: id.ok_or("a change event without an id")?,
                    seq,
                });
            }
            self.chunk()?;
        }
    }

    /// Go away after reading some bytes of the next event (its first chunk, in part).
    fn cut_mid_event(mut self, rng: &mut Rng) -> Result<(), String> {
        let mut size = String::new();
        self.reader
            .read_line(&mut size)
            .map_err(|e| format!("stream chunk: {e}"))?;
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(1).max(1);
        let mut part = vec![0; rng.between(1, size as u64) as usize];
        self.reader
            .read_exact(&mut part)
            .map_err(|e| format!("stream chunk: {e}"))?;
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
        Ok(())
    }
}

fn ledger_seq(after: &serde_json::Value) -> Option<i64> {
    let seq = &after["seq"];
    seq.as_i64().or_else(|| seq.as_str()?.parse().ok())
}

/// One disconnection: serve the archive, follow the ledger from its newest change, go away at
/// a point `rng` picks, come back with the last id, and check the two connections' changes
/// are consecutive. `n` (the fault's number) varies the cut point over the run.
pub fn disconnect_and_resume(
    bin: &Path,
    archive: &Path,
    rng: &mut Rng,
    n: usize,
) -> Result<(), String> {
    let server = start(bin, archive, &[])?;
    let result = follow(server.addr, rng, n);
    let mut v = Verdict::default();
    server.finish(&mut v);
    if let Some(problem) = v.problems.first() {
        return Err(problem.clone());
    }
    result
}

fn follow(addr: SocketAddr, rng: &mut Rng, n: usize) -> Result<(), String> {
    let (status, body) = exchange(
        addr,
        &get_request("/api/changes?table=public.ledger&limit=1", &[]),
    )?;
    let newest: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("/api/changes answered {status} with no JSON: {e}"))?;
    let newest = &newest["changes"][0];
    let (Some(cursor), Some(start)) = (newest["cursor"].as_str(), ledger_seq(&newest["after"]))
    else {
        return Err(format!("/api/changes gave no newest ledger change: {body}"));
    };
    let cut = match n % 3 {
        0 => Cut::AfterHead,
        1 => Cut::AfterEvents(rng.between(1, 40) as usize),
        _ => Cut::MidEvent(rng.between(0, 40) as usize),
    };
    let path = format!("/api/stream?tables=public.ledger&since={cursor}");
    let mut first = Sse::open(addr, &path, None)?;
    let mut got: Vec<Change> = Vec::new();
    match cut {
        Cut::AfterHead => {
            let _ = first.reader.get_ref().shutdown(Shutdown::Both);
        }
        Cut::AfterEvents(k) => {
            for _ in 0..k {
                got.push(first.next()?);
            }
            let _ = first.reader.get_ref().shutdown(Shutdown::Both);
        }
        Cut::MidEvent(k) => {
            for _ in 0..k {
                got.push(first.next()?);
            }
            // What is already read past the last whole event is thrown away with it.
            first.cut_mid_event(rng)?;
        }
    }
    let resumed = got.last().map(|c| c.id.clone());
    let mut second = match &resumed {
        Some(id) => Sse::open(addr, &path, Some(id))?,
        None => Sse::open(addr, &path, None)?,
    };
    for _ in 0..30 {
        got.push(second.next()?);
    }
    drop(second);
    for (i, change) in got.iter().enumerate() {
        let want = start + 1 + i as i64;
        if change.seq != want {
            return Err(format!(
                "cut {cut:?}: change {i} after resuming carries ledger seq {} where {want} belongs (id {}): a change {} across the disconnection",
                change.seq,
                change.id,
                if change.seq > want {
                    "lost"
                } else {
                    "sent twice"
                }
            ));
        }
    }
    eprintln!(
        "torture: stream cut {cut:?}, resumed after {}: {} consecutive changes",
        resumed.as_deref().unwrap_or("its start"),
        got.len()
    );
    Ok(())
}
