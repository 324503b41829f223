//! Bad input to `pgtrail serve`, over raw sockets, against the archive the run just made:
//! malformed and huge parameters, unknown tables, DDL and file-writing SQL, path traversal,
//! a missing or wrong token, a slow client, methods that write. Each must get a clear 4xx or
//! 5xx (a JSON error wherever pgtrail answers rather than HTTP itself), the server must not
//! panic, and it must keep answering everyone else.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Verdict;

/// A running server; [`Server::finish`] stops it and says whether it was alive and unharmed.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    /// Stop the server. A server that exited by itself, or printed a panic, is a failure.
    pub(crate) fn finish(mut self, v: &mut Verdict) {
        let exited = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if out.contains("panicked") {
            v.panics += 1;
            v.problems.push(format!("pgtrail serve panicked: {out}"));
        } else if let Some(status) = exited {
            v.problems.push(format!(
                "pgtrail serve exited during bad input ({status}): {out}"
            ));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start(bin: &Path, archive: &Path, extra: &[&str]) -> Result<Server, String> {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--archive"])
        .arg(archive)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("pgtrail serve: {e}"))?;
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    let _ = stderr.read_line(&mut line);
    let Some(addr) = line
        .strip_prefix("serve: http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
    else {
        let _ = child.kill();
        return Err(format!("pgtrail serve did not start: {}", line.trim()));
    };
    let collected = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    Ok(Server {
        child,
        addr,
        stderr: Some(collected),
    })
}

/// Send `request` (a whole HTTP/1.1 request) and read the status and body to the end.
pub(crate) fn exchange(addr: SocketAddr, request: &[u8]) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    stream.write_all(request).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "no HTTP status in {:?}",
                text.chars().take(200).collect::<String>()
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub(crate) fn get_request(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: torture\r\nConnection: close\r\n");
    for (n, v) in headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Whether `body` (possibly chunked) holds a JSON object with a non-empty `error`.
fn json_error(body: &str) -> bool {
    // Chunked or not, the JSON object is the text between the first `{` and the last `}`.
    let (Some(from), Some(to)) = (body.find('{'), body.rfind('}')) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&body[from..=to])
        .ok()
        .and_then(|v| v["error"].as_str().map(|e| !e.is_empty()))
        .unwrap_or(false)
}

/// One bad input's answer: `status` (with a JSON error when `json`), never the whole huge
/// parameter echoed back; and the server still answers others after it.
fn check(
    v: &mut Verdict,
    addr: SocketAddr,
    huge: &str,
    what: &str,
    answer: Result<(u16, String), String>,
    status: u16,
    json: bool,
) {
    v.bad_inputs += 1;
    let ok = match &answer {
        Ok((got, body)) => {
            *got == status && (!json || json_error(body)) && !body.contains(&huge[..1000])
        }
        Err(_) => false,
    };
    let alive =
        exchange(addr, &get_request("/api/tables", &[])).is_ok_and(|(status, _)| status == 200);
    if !ok || !alive {
        v.bad_inputs_failed += 1;
        let seen = match answer {
            Ok((s, b)) => format!("{s} {}", b.chars().take(200).collect::<String>()),
            Err(e) => e,
        };
        v.problems.push(format!(
            "serve bad input {what}: wanted {status}{}, got {seen}{}",
            if json { " with a JSON error" } else { "" },
            if alive {
                ""
            } else {
                "; the server stopped serving"
            }
        ));
    }
}

pub fn bad_inputs(bin: &Path, archive: &Path, work: &Path, v: &mut Verdict) {
    let server = match start(bin, archive, &[]) {
        Ok(s) => s,
        Err(e) => {
            v.bad_inputs_failed += 1;
            v.problems.push(format!("serve bad input: {e}"));
            return;
        }
    };
    let addr = server.addr;
    let huge = "x".repeat(40_000);
    let written = work.join("serve-wrote-this.csv");
    let copy_sql = format!(
        "/api/sql?q=COPY%20(SELECT%201)%20TO%20'{}'",
        written.display()
    );
    // (what, request, status, whether pgtrail answers it with a JSON error)
    let mut cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        ("history without a key", get_request("/api/tables/public.acct/history", &[]), 400, true),
        ("history with too many key parts", get_request("/api/tables/public.acct/history?key=1&key=2", &[]), 400, true),
        ("an unknown table", get_request("/api/tables/public.nope/history?key=1", &[]), 404, true),
        ("a table name that climbs directories", get_request("/api/tables/..%2F..%2Fetc%2Fpasswd/history?key=1", &[]), 400, true),
        ("a moment that is not one", get_request("/api/tables/public.acct/as_of?at=yesterday-ish", &[]), 400, true),
        ("diff without its end", get_request("/api/tables/public.acct/diff?from=0/0", &[]), 400, true),
        ("a limit of zero", get_request("/api/changes?limit=0", &[]), 400, true),
        ("a limit that is not a number", get_request("/api/changes?limit=many", &[]), 400, true),
        ("an order that is not one", get_request("/api/changes?order=sideways", &[]), 400, true),
        ("a cursor that is not one", get_request("/api/changes?after=not-a-cursor", &[]), 400, true),
        ("an unknown operation", get_request("/api/changes?op=merge", &[]), 400, true),
        ("an unknown parameter", get_request("/api/changes?bogus=1", &[]), 400, true),
        ("a 40 KB parameter", get_request(&format!("/api/changes?table={huge}"), &[]), 400, true),
        ("a 70 KB request line", get_request(&format!("/api/changes?table={}", "x".repeat(70_000)), &[]), 414, false),
        ("DDL as SQL", get_request("/api/sql?q=DROP%20TABLE%20acct", &[]), 400, true),
        ("SQL that writes a file", get_request(&copy_sql, &[]), 400, true),
        ("SQL that reads a file", get_request("/api/sql?q=SELECT%20*%20FROM%20read_csv('/etc/passwd')", &[]), 400, true),
        ("an external table on a system file", get_request("/api/sql?q=CREATE%20EXTERNAL%20TABLE%20x%20STORED%20AS%20CSV%20LOCATION%20'/etc/passwd'", &[]), 400, true),
        ("SQL that does not parse", get_request("/api/sql?q=SELEC%201", &[]), 400, true),
        ("an unknown download format", get_request("/api/sql?q=SELECT%201&format=xlsx", &[]), 400, true),
        ("a stream from a cursor that is not one", get_request("/api/stream?since=zz", &[]), 400, true),
        ("a stream of an unknown table", get_request("/api/stream?tables=public.nope", &[]), 404, true),
        ("a Last-Event-ID that is not a cursor", get_request("/api/stream", &[("Last-Event-ID", "nonsense")]), 400, true),
        ("a path that climbs directories", get_request("/api/../../etc/passwd", &[]), 404, true),
        ("a method that writes", b"POST /api/sql HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nDROP".to_vec(), 405, true),
        ("DELETE", b"DELETE /api/tables HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(), 405, true),
        ("a request that is not HTTP", b"HELLO THERE\r\n\r\n".to_vec(), 400, false),
    ];
    for (what, request, status, json) in cases.drain(..) {
        check(v, addr, &huge, what, exchange(addr, &request), status, json);
    }
    if written.exists() {
        v.bad_inputs_failed += 1;
        v.problems
            .push("serve bad input: SQL wrote a file through the server".into());
    }

    // A slow client: half a request line, then nothing. Others are answered meanwhile.
    v.bad_inputs += 1;
    let slow = TcpStream::connect(addr).and_then(|mut s| s.write_all(b"GET /api/ta").map(|_| s));
    let served = exchange(addr, &get_request("/api/tables", &[])).is_ok_and(|(s, _)| s == 200);
    if slow.is_err() || !served {
        v.bad_inputs_failed += 1;
        v.problems
            .push("serve bad input: a slow client held up the others".into());
    }
    drop(slow);
    // A client that goes away in the middle of a stream (its answer began: a 200).
    let began = TcpStream::connect(addr)
        .and_then(|mut s| {
            s.write_all(&get_request("/api/stream?since=beginning", &[]))?;
            let mut head = [0; 12];
            s.read_exact(&mut head)?;
            Ok(head)
        })
        .map_err(|e| e.to_string())
        .map(|head| {
            let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0);
            (status, String::new())
        });
    check(
        v,
        addr,
        &huge,
        "a stream client that disconnects mid-stream",
        began,
        200,
        false,
    );

    // A token: a request without it, or with a wrong one, is refused and says so.
    let token_file = work.join("serve-token");
    let token = "torture-token-0123456789abcdef";
    let prepared = std::fs::write(&token_file, format!("{token}\n")).is_ok() && {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).is_ok()
    };
    let guarded = prepared
        .then(|| {
            start(
                bin,
                archive,
                &["--token-file", &token_file.display().to_string()],
            )
            .ok()
        })
        .flatten();
    match guarded {
        Some(guarded) => {
            for (what, headers, status) in [
                ("no token", vec![], 401),
                (
                    "a wrong token",
                    vec![("Authorization", "Bearer not-the-token-at-all")],
                    401,
                ),
                (
                    "a token of another scheme",
                    vec![("Authorization", "Basic dG9ydHVyZQ==")],
                    401,
                ),
                (
                    "the token",
                    vec![("Authorization", "Bearer torture-token-0123456789abcdef")],
                    200,
                ),
            ] {
                v.bad_inputs += u32::from(status != 200);
                let answer = exchange(guarded.addr, &get_request("/api/tables", &headers));
                let ok = answer.as_ref().is_ok_and(|(s, body)| {
                    *s == status && (status == 200 || json_error(body)) && !body.contains(token)
                });
                if !ok {
                    v.bad_inputs_failed += 1;
                    v.problems.push(format!(
                        "serve bad input {what}: wanted {status}, got {answer:?}"
                    ));
                }
            }
            guarded.finish(v);
        }
        None => {
            v.bad_inputs_failed += 1;
            v.problems
                .push("serve bad input: the server with a token did not start".into());
        }
    }
    server.finish(v);
}
