//! pgtrail's own PostgreSQL frontend for the replication connection: socket, SSLRequest and
//! TLS, startup, authentication (cleartext, MD5, SCRAM-SHA-256 with channel binding), simple
//! queries, and cancel-safe frame reading for the CopyBoth stream.
//!
//! Owned rather than borrowed because no replication client did what libpq does with the
//! same settings (the survey in `shared/research/tls-and-web.md`: pgwire-replication 0.5.0
//! compiles a second crypto provider, its verify-ca checks the name, its SCRAM never binds the
//! channel, and its `recv` is not cancel-safe). The messages are encoded by
//! `postgres-protocol`, the crate tokio-postgres uses; the pgoutput decoder is pgtrail's.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::conninfo::{ChannelBinding, ConnInfo, Host, SslMode};
use super::tls::{AttemptFailure, TlsFacts, TlsPolicy, verification_words};

/// The largest backend message accepted (PostgreSQL's own limit for a row is 1 GB).
const MAX_FRAME: usize = 1 << 30;

/// Any byte stream a connection runs over: TCP, a Unix socket, or TLS over either.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An error the server sent (ErrorResponse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.severity, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (DETAIL: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (HINT: {hint})")?;
        }
        write!(f, " (SQLSTATE {})", self.code)
    }
}

/// Why a connection attempt or a message exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket: refused, reset, timed out, closed.
    #[error("{0}")]
    Network(#[from] std::io::Error),
    /// The TLS handshake (a certificate that did not verify, a protocol mismatch).
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("{0}")]
    Server(ServerError),
    /// The settings cannot be met by this server (no TLS where it is required, no channel
    /// binding where it is required, no password where one is needed).
    #[error("{0}")]
    Refused(String),
    /// The server sent something this frontend does not expect.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A backend message: its type byte and body.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// The connection's security, as established.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    pub tls: Option<TlsFacts>,
    pub channel_binding: bool,
}

impl std::fmt::Display for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls {
            None => f.write_str("no TLS"),
            Some(tls) => {
                write!(
                    f,
                    "{} {}, {}",
                    tls.version,
                    tls.cipher,
                    verification_words(tls.verified_chain, tls.verified_name)
                )?;
                if self.channel_binding {
                    f.write_str(", channel binding")?;
                }
                Ok(())
            }
        }
    }
}

impl Security {
    /// A few words for the progress line: "TLSv1.3, verified, channel binding".
    pub fn brief(&self) -> String {
        match &self.tls {
            None => "no TLS".into(),
            Some(tls) => format!(
                "{}, {}{}",
                tls.version,
                match (tls.verified_chain, tls.verified_name) {
                    (true, true) => "verified",
                    (true, false) => "chain verified",
                    _ => "NOT verified",
                },
                if self.channel_binding {
                    ", channel binding"
                } else {
                    ""
                }
            ),
        }
    }
}

/// One authenticated connection, before any stream is started.
pub struct Conn {
    pub io: Box<dyn Io>,
    pub inbuf: BytesMut,
    pub security: Security,
}

/// Open a connection with `params` in the startup message (user and database are added),
/// trying TLS and plaintext in libpq's order for the sslmode ([`TlsPolicy::connect_in_order`]).
pub async fn open(
    info: &ConnInfo,
    policy: &TlsPolicy,
    params: &[(&str, &str)],
    timeout: Duration,
) -> Result<Conn, WireError> {
    // Whether the server accepted SSLRequest on the last attempt (see `connect_in_order`).
    let went_tls = std::sync::atomic::AtomicBool::new(false);
    let attempt = |tls: bool| {
        let went_tls = &went_tls;
        async move {
            tokio::time::timeout(timeout, open_once(info, policy, params, tls, went_tls))
                .await
                .unwrap_or_else(|_| {
                    Err(WireError::Network(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("timeout expired after {} s", timeout.as_secs()),
                    )))
                })
        }
    };
    policy
        .connect_in_order(attempt, |e: &WireError| match e {
            WireError::Handshake(_) => AttemptFailure::Handshake,
            WireError::Server(_) if went_tls.load(std::sync::atomic::Ordering::Relaxed) => {
                AttemptFailure::RefusedOverTls
            }
            WireError::Server(_) => AttemptFailure::Refused,
            _ => AttemptFailure::Other,
        })
        .await
}

async fn socket(info: &ConnInfo) -> Result<Box<dyn Io>, WireError> {
    match &info.host {
        Host::Socket(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", info.port));
            let stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "connection to server on socket \"{}\" failed: {e}",
                        path.display()
                    ),
                )
            })?;
            Ok(Box::new(stream))
        }
        Host::Tcp(name) => {
            let addresses: Vec<std::net::SocketAddr> = match info.hostaddr {
                Some(addr) => vec![(addr, info.port).into()],
                None => tokio::net::lookup_host((name.as_str(), info.port))
                    .await
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("could not translate host name \"{name}\" to address: {e}"),
                        )
                    })?
                    .collect(),
            };
            let mut last = None;
            for address in addresses {
                match tokio::net::TcpStream::connect(address).await {
                    Ok(stream) => {
                        configure_tcp(&stream);
                        return Ok(Box::new(stream));
                    }
                    Err(e) => {
                        last = Some(std::io::Error::new(
                            e.kind(),
                            format!(
                                "connection to server at \"{name}\" ({address}), port {} failed: {e}",
                                info.port
                            ),
                        ))
                    }
                }
            }
            Err(WireError::Network(last.unwrap_or_else(|| {
                std::io::Error::other(format!("host \"{name}\" has no address"))
            })))
        }
    }
}

/// Keepalives, and a limit on unacknowledged sends: a connection into a dead network fails in
/// 30 s instead of the kernel's 15 minutes of retransmissions (as the SQL connection).
fn configure_tcp(stream: &tokio::net::TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = socket.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = socket.set_tcp_user_timeout(Some(Duration::from_secs(30)));
}

async fn open_once(
    info: &ConnInfo,
    policy: &TlsPolicy,
    params: &[(&str, &str)],
    tls: bool,
    went_tls: &std::sync::atomic::AtomicBool,
) -> Result<Conn, WireError> {
    let mut io = socket(info).await?;
    let mut security = Security::default();
    if tls {
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        io.write_all(&buf).await?;
        let mut answer = [0u8; 1];
        io.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                went_tls.store(true, std::sync::atomic::Ordering::Relaxed);
                let (stream, facts) = policy.handshake(io).await.map_err(WireError::Handshake)?;
                security.tls = Some(facts);
                io = Box::new(stream);
            }
            b'N' if policy.mode <= SslMode::Prefer => {}
            b'N' => {
                return Err(WireError::Refused(
                    "server does not support SSL, but SSL was required (sslmode requires TLS; enable ssl on the server or lower sslmode)".into(),
                ));
            }
            other => {
                return Err(WireError::Protocol(format!(
                    "received invalid response to SSL negotiation: {:?}",
                    char::from(other)
                )));
            }
        }
    }
    let mut conn = Conn {
        io,
        inbuf: BytesMut::with_capacity(64 * 1024),
        security,
    };
    let mut startup: Vec<(&str, &str)> = vec![
        ("user", info.user.as_str()),
        ("database", info.dbname.as_str()),
        ("client_encoding", "UTF8"),
    ];
    startup.extend_from_slice(params);
    let mut buf = BytesMut::new();
    frontend::startup_message(startup, &mut buf)?;
    conn.io.write_all(&buf).await?;
    conn.authenticate(info).await?;
    // ParameterStatus and BackendKeyData until ReadyForQuery.
    loop {
        let frame = conn.read_frame().await?;
        match frame.tag {
            b'Z' => return Ok(conn),
            b'E' => return Err(WireError::Server(parse_error(&frame.body))),
            b'S' | b'K' | b'N' => {}
            other => return Err(unexpected(other, "after authentication")),
        }
    }
}

fn unexpected(tag: u8, when: &str) -> WireError {
    WireError::Protocol(format!("unexpected message {:?} {when}", char::from(tag)))
}

impl Conn {
    /// The next backend message. Cancel-safe: a message is taken from the buffer only whole,
    /// and `read_buf` reads nothing when it is cancelled.
    pub async fn read_frame(&mut self) -> Result<Frame, WireError> {
        read_frame(&mut self.io, &mut self.inbuf).await
    }

    async fn send(&mut self, buf: &[u8]) -> Result<(), WireError> {
        self.io.write_all(buf).await?;
        self.io.flush().await?;
        Ok(())
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<(), WireError> {
        let binding_data = self
            .security
            .tls
            .as_ref()
            .and_then(|t| t.channel_binding_data.clone());
        let password = || {
            info.password().map(str::as_bytes).ok_or_else(|| {
                WireError::Refused(format!(
                    "password authentication failed: no password supplied for user \"{}\" (give it in the connection string, PGPASSWORD or ~/.pgpass)",
                    info.user
                ))
            })
        };
        let refuse_unbound = || -> Result<(), WireError> {
            if info.channel_binding == ChannelBinding::Require {
                return Err(WireError::Refused(
                    "channel binding required, but server authenticated client without channel binding".into(),
                ));
            }
            Ok(())
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            let mut body = frame.body;
            match frame.tag {
                b'E' => return Err(WireError::Server(parse_error(&body))),
                b'R' => {}
                other => return Err(unexpected(other, "during authentication")),
            }
            if body.len() < 4 {
                return Err(WireError::Protocol("short authentication request".into()));
            }
            let mut buf = BytesMut::new();
            match body.get_i32() {
                0 => {
                    let bound = self.security.channel_binding;
                    if !bound {
                        refuse_unbound()?;
                    }
                    return Ok(());
                }
                3 => {
                    refuse_unbound()?;
                    frontend::password_message(password()?, &mut buf)?;
                }
                5 => {
                    refuse_unbound()?;
                    let salt: [u8; 4] = body
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| WireError::Protocol("short MD5 salt".into()))?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        info.user.as_bytes(),
                        password()?,
                        salt,
                    );
                    frontend::password_message(hash.as_bytes(), &mut buf)?;
                }
                10 => {
                    let mechanisms: Vec<&[u8]> = body
                        .split(|b| *b == 0)
                        .take_while(|m| !m.is_empty())
                        .collect();
                    let plus = mechanisms.contains(&sasl::SCRAM_SHA_256_PLUS.as_bytes());
                    let plain = mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes());
                    let (mechanism, binding) = match (&binding_data, info.channel_binding) {
                        (Some(data), ChannelBinding::Prefer | ChannelBinding::Require) if plus => {
                            self.security.channel_binding = true;
                            (
                                sasl::SCRAM_SHA_256_PLUS,
                                sasl::ChannelBinding::tls_server_end_point(data.clone()),
                            )
                        }
                        (_, ChannelBinding::Require) => {
                            return Err(WireError::Refused(
                                "channel binding is required, but server did not offer an authentication method that supports channel binding (SCRAM-SHA-256-PLUS over TLS)".into(),
                            ));
                        }
                        _ if !plain => {
                            return Err(WireError::Refused(
                                "none of the server's SASL authentication mechanisms are supported"
                                    .into(),
                            ));
                        }
                        (Some(_), ChannelBinding::Prefer) => {
                            (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested())
                        }
                        _ => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                    };
                    let exchange = ScramSha256::new(password()?, binding);
                    frontend::sasl_initial_response(mechanism, exchange.message(), &mut buf)?;
                    scram = Some(exchange);
                }
                11 => {
                    let exchange = scram
                        .as_mut()
                        .ok_or_else(|| WireError::Protocol("SASL continue before start".into()))?;
                    exchange
                        .update(&body)
                        .map_err(|e| WireError::Refused(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(exchange.message(), &mut buf)?;
                }
                12 => {
                    let exchange = scram
                        .as_mut()
                        .ok_or_else(|| WireError::Protocol("SASL final before start".into()))?;
                    exchange.finish(&body).map_err(|e| {
                        WireError::Refused(format!(
                            "SCRAM: the server's proof did not verify ({e})"
                        ))
                    })?;
                    continue;
                }
                code => {
                    return Err(WireError::Refused(format!(
                        "authentication method {code} not supported (pgtrail supports password, md5, scram-sha-256, cert and trust)"
                    )));
                }
            }
            self.send(&buf).await?;
        }
    }

    /// Run one simple-protocol query; the rows of its result as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WireError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(&buf).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'D' => rows.push(parse_data_row(frame.body)?),
                b'E' => error = Some(parse_error(&frame.body)),
                b'Z' => break,
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                other => return Err(unexpected(other, "in a query's answer")),
            }
        }
        match error {
            Some(e) => Err(WireError::Server(e)),
            None => Ok(rows),
        }
    }

    /// Send a query without reading its answer (START_REPLICATION, whose answer is a stream).
    pub async fn send_query(&mut self, sql: &str) -> Result<(), WireError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(&buf).await
    }

    /// Wait for CopyBothResponse (the answer to START_REPLICATION).
    pub async fn await_copy_both(&mut self) -> Result<(), WireError> {
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => return Ok(()),
                b'E' => return Err(WireError::Server(parse_error(&frame.body))),
                b'N' | b'S' => {}
                other => return Err(unexpected(other, "before CopyBothResponse")),
            }
        }
    }
}

/// See [`Conn::read_frame`].
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    inbuf: &mut BytesMut,
) -> Result<Frame, WireError> {
    loop {
        if inbuf.len() >= 5 {
            let len = u32::from_be_bytes([inbuf[1], inbuf[2], inbuf[3], inbuf[4]]) as usize;
            if !(4..=MAX_FRAME).contains(&len) {
                return Err(WireError::Protocol(format!("invalid message length {len}")));
            }
            if inbuf.len() > len {
                let mut frame = inbuf.split_to(1 + len);
                let tag = frame[0];
                frame.advance(5);
                return Ok(Frame {
                    tag,
                    body: frame.freeze(),
                });
            }
            inbuf.reserve(1 + len - inbuf.len());
        } else if inbuf.capacity() - inbuf.len() < 4096 {
            inbuf.reserve(64 * 1024);
        }
        if io.read_buf(inbuf).await? == 0 {
            return Err(WireError::Network(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection unexpectedly",
            )));
        }
    }
}

/// The fields of an ErrorResponse or NoticeResponse.
pub fn parse_error(body: &[u8]) -> ServerError {
    let mut error = ServerError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = after.iter().position(|b| *b == 0).unwrap_or(after.len());
        let value = String::from_utf8_lossy(&after[..end]).into_owned();
        rest = after.get(end + 1..).unwrap_or_default();
        match field {
            b'V' => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    error
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, WireError> {
    let short = || WireError::Protocol("short DataRow".into());
    if body.len() < 2 {
        return Err(short());
    }
    let count = body.get_u16();
    let mut row = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        if body.len() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(short());
        }
        row.push(Some(
            String::from_utf8_lossy(&body.split_to(len)).into_owned(),
        ));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_arrive_whole_however_the_bytes_are_split() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut wire = Vec::new();
        for (tag, body) in [(b'd', vec![1u8; 300]), (b'Z', vec![b'I'])] {
            wire.push(tag);
            wire.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            wire.extend_from_slice(&body);
        }
        let writer = tokio::spawn(async move {
            for chunk in wire.chunks(7) {
                server.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut inbuf = BytesMut::new();
        let first = read_frame(&mut client, &mut inbuf).await.unwrap();
        assert_eq!((first.tag, first.body.len()), (b'd', 300));
        let second = read_frame(&mut client, &mut inbuf).await.unwrap();
        assert_eq!((second.tag, &second.body[..]), (b'Z', &b"I"[..]));
        writer.await.unwrap();
        let eof = read_frame(&mut client, &mut inbuf).await.unwrap_err();
        assert!(matches!(eof, WireError::Network(_)));
    }

    #[test]
    fn error_fields_are_read_by_their_codes() {
        let body = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"u\"\0\0";
        let e = parse_error(body);
        assert_eq!(e.code, "28P01");
        assert_eq!(e.severity, "FATAL");
        assert_eq!(
            e.to_string(),
            "FATAL: password authentication failed for user \"u\" (SQLSTATE 28P01)"
        );
    }
}
