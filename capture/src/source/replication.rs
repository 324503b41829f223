//! The replication stream over pgtrail's own connection ([`super::wire`]): gated commands
//! (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT) before START_REPLICATION, then a cancel-safe
//! [`ReplicationStream::recv`] and status updates that carry only what
//! [`ReplicationStream::acknowledge`] was given.
//!
//! The rest of capture speaks [`ReplicationStream`] and [`StreamEvent`] in pgtrail's own
//! types (LSNs, Unix-epoch times, [`ReplicationError`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pgtrail_store::Lsn;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc, watch};

use super::SourceConfig;
use super::wire::{self, Conn, Io, Security, WireError};
use crate::error::{CaptureError, ErrorKind, ReplicationError, sqlstate_kind};
use crate::pgoutput;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// How soon a new acknowledgement is sent after the last status update: acknowledgements
/// come with every durable commit, and this bounds their rate.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// What the server says about itself on a replication connection (IDENTIFY_SYSTEM).
#[derive(Clone, Debug)]
pub struct SystemIdentity {
    /// The cluster's system identifier (decimal text).
    pub system_id: String,
    pub timeline: u32,
    /// The server's WAL flush position.
    pub wal_position: Lsn,
}

/// A replication stream's events, as capture uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// The server's heartbeat, with its WAL end.
    KeepAlive {
        wal_end: Lsn,
    },
    Begin {
        final_lsn: Lsn,
        xid: u32,
        /// Commit time, microseconds since the Unix epoch.
        committed_at_us: i64,
    },
    Commit {
        end_lsn: Lsn,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    /// Any other pgoutput message, undecoded.
    Data {
        wal_start: Lsn,
        data: Bytes,
    },
}

enum State {
    /// Authenticated; commands may run.
    Gated(Conn),
    /// START_REPLICATION sent, CopyBothResponse not yet read.
    Starting(Conn),
    Streaming(Streaming),
    Closed,
}

struct Streaming {
    reader: ReadHalf<Box<dyn Io>>,
    inbuf: BytesMut,
    /// Asks the feedback task for a status update now (the server requested a reply).
    reply: Arc<Notify>,
    close: mpsc::Sender<()>,
    feedback: tokio::task::JoinHandle<Result<(), std::io::Error>>,
}

/// One replication connection: gated (commands may run before START_REPLICATION), then a
/// stream whose acknowledged position only [`ReplicationStream::acknowledge`] moves.
pub struct ReplicationStream {
    state: State,
    start_sql: String,
    acknowledged: watch::Sender<Lsn>,
    wakeup: Duration,
    security: Security,
}

impl ReplicationStream {
    /// Connect for replication from `slot` through `publication`. `resume_from` is where the
    /// stream starts and what it acknowledges until told otherwise (`None` for a new slot).
    /// `wakeup` is how often a status update is sent while the stream is idle.
    pub async fn connect(
        source: &SourceConfig,
        slot: &str,
        publication: &str,
        resume_from: Option<Lsn>,
        wakeup: Duration,
    ) -> Result<ReplicationStream, CaptureError> {
        let options = source.options();
        let params = [
            ("replication", "database"),
            ("options", options.as_str()),
            ("application_name", source.application_name()),
        ];
        let conn = wire::open(
            source.info(),
            source.tls(),
            &params,
            source.connect_timeout(),
        )
        .await
        .map_err(|e| connect_error(source, e))?;
        let security = conn.security.clone();
        let from = resume_from.unwrap_or(Lsn::ZERO);
        // The publication name is an option value: a quoted identifier inside a string.
        let publication_option = pgtrail_store::always_quoted(publication).replace('\'', "''");
        let start_sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '1', publication_names '{publication_option}', messages 'true')",
            pgtrail_store::always_quoted(slot)
        );
        Ok(ReplicationStream {
            state: State::Gated(conn),
            start_sql,
            acknowledged: watch::Sender::new(from),
            wakeup,
            security,
        })
    }

    /// The connection's TLS and authentication, as established.
    pub fn security(&self) -> &Security {
        &self.security
    }

    fn gated(&mut self) -> Result<&mut Conn, CaptureError> {
        match &mut self.state {
            State::Gated(conn) => Ok(conn),
            _ => Err(CaptureError::Protocol(
                "replication command after START_REPLICATION".into(),
            )),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, CaptureError> {
        let rows = self.gated()?.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| CaptureError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| {
            row.get(i).cloned().flatten().ok_or_else(|| {
                CaptureError::Protocol(format!("IDENTIFY_SYSTEM: column {i} missing"))
            })
        };
        Ok(SystemIdentity {
            system_id: field(0)?,
            timeline: field(1)?
                .parse()
                .map_err(|_| CaptureError::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?,
            wal_position: field(2)?
                .parse()
                .map_err(|_| CaptureError::Protocol("IDENTIFY_SYSTEM: bad xlogpos".into()))?,
        })
    }

    /// CREATE_REPLICATION_SLOT with an exported snapshot: the slot's consistent point and the
    /// snapshot's name (valid while this connection stays idle).
    pub async fn create_slot_exporting_snapshot(
        &mut self,
        slot: &str,
        temporary: bool,
    ) -> Result<(Lsn, String), CaptureError> {
        let rows = self
            .gated()?
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput EXPORT_SNAPSHOT",
                pgtrail_store::always_quoted(slot),
                if temporary { " TEMPORARY" } else { "" }
            ))
            .await?;
        let row = rows.first().ok_or_else(|| {
            CaptureError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let text = |i: usize| -> Result<String, CaptureError> {
            row.get(i).cloned().flatten().ok_or_else(|| {
                CaptureError::Protocol(format!("CREATE_REPLICATION_SLOT: column {i} missing"))
            })
        };
        let consistent_point: Lsn = text(1)?.parse().map_err(|_| {
            CaptureError::Protocol("CREATE_REPLICATION_SLOT: bad consistent_point".into())
        })?;
        Ok((consistent_point, text(2)?))
    }

    /// Send START_REPLICATION; [`ReplicationStream::wait_started`] says whether it was taken.
    pub async fn start(&mut self) -> Result<(), CaptureError> {
        let sql = self.start_sql.clone();
        let conn = self.gated()?;
        conn.send_query(&sql).await?;
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Gated(conn) => self.state = State::Starting(conn),
            other => self.state = other,
        }
        Ok(())
    }

    /// Wait until the server streams from the slot (and so holds it for this connection).
    pub async fn wait_started(&mut self) -> Result<(), CaptureError> {
        let State::Starting(conn) = &mut self.state else {
            return Err(CaptureError::Protocol("wait_started before start".into()));
        };
        conn.await_copy_both().await?;
        let State::Starting(conn) = std::mem::replace(&mut self.state, State::Closed) else {
            unreachable!("checked above");
        };
        let (reader, writer) = tokio::io::split(conn.io);
        let reply = Arc::new(Notify::new());
        let (close, close_rx) = mpsc::channel(1);
        let feedback = tokio::spawn(feedback(
            writer,
            self.acknowledged.subscribe(),
            reply.clone(),
            close_rx,
            self.wakeup,
        ));
        self.state = State::Streaming(Streaming {
            reader,
            inbuf: conn.inbuf,
            reply,
            close,
            feedback,
        });
        Ok(())
    }

    /// The next event; `None` when the server ended the stream without an error.
    /// Cancel-safe: a dropped call loses nothing (frames leave the buffer only whole).
    pub async fn recv(&mut self) -> Result<Option<StreamEvent>, CaptureError> {
        let State::Streaming(s) = &mut self.state else {
            return Err(CaptureError::Protocol(
                "recv before the stream started".into(),
            ));
        };
        loop {
            let frame = wire::read_frame(&mut s.reader, &mut s.inbuf).await?;
            match frame.tag {
                b'd' => {
                    if let Some(event) = copy_data(frame.body, &s.reply)? {
                        return Ok(Some(event));
                    }
                }
                // CopyDone, or CommandComplete alone: a walsender that shuts down sends "COPY 0"
                // once everything it had was replicated, and exits.
                b'c' | b'C' => return Ok(None),
                b'E' => return Err(WireError::Server(wire::parse_error(&frame.body)).into()),
                b'N' | b'S' => {}
                other => {
                    return Err(CaptureError::Protocol(format!(
                        "unexpected message {:?} in the replication stream",
                        char::from(other)
                    )));
                }
            }
        }
    }

    /// Report `position` to the server as flushed: the slot's `confirmed_flush_lsn` follows
    /// it, and PostgreSQL may then recycle the WAL before it. Callers pass only what the
    /// archive holds durably. Never moves backwards.
    pub fn acknowledge(&self, position: Lsn) {
        self.acknowledged.send_if_modified(|current| {
            let newer = position > *current;
            if newer {
                *current = position;
            }
            newer
        });
    }

    /// End the stream: the last acknowledgement is written to the server (up to 3 s), then
    /// CopyDone and Terminate.
    pub async fn close(self, acknowledged: Lsn) {
        self.acknowledge(acknowledged);
        if let State::Streaming(s) = self.state {
            let _ = s.close.try_send(());
            let _ = tokio::time::timeout(Duration::from_secs(3), s.feedback).await;
        }
    }
}

/// A CopyData message of the stream: XLogData (`w`) or a keepalive (`k`, whose reply request
/// is passed to the status-update task).
fn copy_data(mut body: Bytes, reply: &Notify) -> Result<Option<StreamEvent>, CaptureError> {
    let short = |what: &str| CaptureError::Protocol(format!("short {what} message"));
    if body.is_empty() {
        return Err(short("CopyData"));
    }
    match body.get_u8() {
        b'w' => {
            if body.len() < 24 {
                return Err(short("XLogData"));
            }
            let wal_start = Lsn(body.get_u64());
            let _wal_end = body.get_u64();
            let _sent_at = body.get_i64();
            xlog_event(wal_start, body).map(Some)
        }
        b'k' => {
            if body.len() < 17 {
                return Err(short("keepalive"));
            }
            let wal_end = Lsn(body.get_u64());
            let _sent_at = body.get_i64();
            if body.get_u8() == 1 {
                reply.notify_one();
            }
            Ok(Some(StreamEvent::KeepAlive { wal_end }))
        }
        other => Err(CaptureError::Protocol(format!(
            "unknown CopyData message {:?} in the replication stream",
            char::from(other)
        ))),
    }
}

/// The events capture tells apart from the pgoutput stream; the rest stays undecoded.
fn xlog_event(wal_start: Lsn, data: Bytes) -> Result<StreamEvent, CaptureError> {
    if !matches!(data.first(), Some(b'B' | b'C' | b'M')) {
        return Ok(StreamEvent::Data { wal_start, data });
    }
    let message = pgoutput::decode(&data).map_err(|source| CaptureError::Decode {
        lsn: wal_start,
        source,
    })?;
    Ok(match message {
        pgoutput::Message::Begin {
            final_lsn,
            commit_time_us,
            xid,
        } => StreamEvent::Begin {
            final_lsn: Lsn(final_lsn),
            xid,
            committed_at_us: commit_time_us + PG_EPOCH_OFFSET_US,
        },
        pgoutput::Message::Commit { end_lsn, .. } => StreamEvent::Commit {
            end_lsn: Lsn(end_lsn),
        },
        pgoutput::Message::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => StreamEvent::Message {
            transactional,
            lsn: Lsn(lsn),
            prefix,
            content: Bytes::from(content),
        },
        _ => StreamEvent::Data { wal_start, data },
    })
}

/// Status updates (`r`): the acknowledged position as written, flushed and applied, sent
/// when it moves (at most every [`STATUS_INTERVAL`]), when the server asks, and every
/// `wakeup` while idle (so the server's `wal_sender_timeout` never fires on a live stream).
/// On close: one last update, then CopyDone and Terminate.
async fn feedback(
    mut writer: WriteHalf<Box<dyn Io>>,
    mut acknowledged: watch::Receiver<Lsn>,
    reply: Arc<Notify>,
    mut close: mpsc::Receiver<()>,
    wakeup: Duration,
) -> Result<(), std::io::Error> {
    let mut sent: Option<(Lsn, tokio::time::Instant)> = None;
    loop {
        let position = *acknowledged.borrow_and_update();
        let due = match sent {
            None => tokio::time::Instant::now(),
            Some((at, when)) if at != position => when + STATUS_INTERVAL,
            Some((_, when)) => when + wakeup,
        };
        tokio::select! {
            biased;
            _ = close.recv() => {
                let position = *acknowledged.borrow();
                let mut buf = status_update(position);
                frontend::copy_done(&mut buf);
                frontend::terminate(&mut buf);
                writer.write_all(&buf).await?;
                writer.flush().await?;
                let _ = writer.shutdown().await;
                return Ok(());
            }
            _ = reply.notified() => {}
            changed = acknowledged.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
            _ = tokio::time::sleep_until(due) => {}
        }
        writer.write_all(&status_update(position)).await?;
        writer.flush().await?;
        sent = Some((position, tokio::time::Instant::now()));
    }
}

/// A standby status update for `position` as a CopyData message.
fn status_update(position: Lsn) -> BytesMut {
    let now_pg = pgtrail_store::now_us() - PG_EPOCH_OFFSET_US;
    let mut body = Vec::with_capacity(34);
    body.push(b'r');
    for _ in 0..3 {
        body.extend_from_slice(&position.0.to_be_bytes());
    }
    body.extend_from_slice(&now_pg.to_be_bytes());
    body.push(0);
    let mut buf = BytesMut::with_capacity(40);
    frontend::CopyData::new(&body[..])
        .map(|data| data.write(&mut buf))
        .unwrap_or_default();
    buf
}

fn connect_error(source: &SourceConfig, e: WireError) -> CaptureError {
    if let WireError::Server(server) = &e
        && let Some(setup) = super::through_a_pooler(source, &server.code, &server.message)
    {
        return setup;
    }
    if let WireError::Handshake(io) = &e
        && io.kind() == std::io::ErrorKind::InvalidData
    {
        return source.certificate_refused(&io.to_string());
    }
    let mut error = ReplicationError::from(e);
    error.prefix(&format!(
        "cannot connect for replication to {}: ",
        source.display()
    ));
    CaptureError::Replication(error)
}

impl From<WireError> for ReplicationError {
    fn from(e: WireError) -> ReplicationError {
        let message = e.to_string();
        match e {
            WireError::Network(_) => ReplicationError::new(ErrorKind::Transient, None, message),
            // A certificate that does not verify stays so until someone changes it; a handshake
            // cut by the network is retried.
            WireError::Handshake(io) => {
                let kind = if io.kind() == std::io::ErrorKind::InvalidData {
                    ErrorKind::Setup
                } else {
                    ErrorKind::Transient
                };
                ReplicationError::new(kind, None, message)
            }
            WireError::Server(server) => {
                let kind = sqlstate_kind(&server.code);
                ReplicationError::new(kind, Some(server.code), message)
            }
            WireError::Refused(_) => ReplicationError::new(ErrorKind::Setup, None, message),
            WireError::Protocol(_) => ReplicationError::new(ErrorKind::Fatal, None, message),
        }
    }
}

impl From<WireError> for CaptureError {
    fn from(e: WireError) -> CaptureError {
        CaptureError::Replication(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's errors are classified by SQLSTATE, whatever language the message is in.
    #[test]
    fn server_errors_are_classified_by_sqlstate_not_by_their_text() {
        let kind = |code: &str, text: &str| {
            CaptureError::from(WireError::Server(wire::ServerError {
                severity: "ERROR".into(),
                code: code.into(),
                message: text.into(),
                detail: None,
                hint: None,
            }))
            .kind()
        };
        // A slot another consumer streams, in German (lc_messages = 'de_DE').
        assert_eq!(
            kind("55006", "Replikations-Slot »s« ist aktiv für PID 42"),
            ErrorKind::Setup
        );
        assert_eq!(
            kind("42704", "replication slot \"s\" does not exist"),
            ErrorKind::Setup
        );
        assert_eq!(
            kind("55000", "can no longer get changes from replication slot"),
            ErrorKind::Setup
        );
        assert_eq!(
            kind("57P03", "the database system is starting up"),
            ErrorKind::Transient
        );
        assert_eq!(
            kind(
                "57P01",
                "terminating connection due to administrator command"
            ),
            ErrorKind::Transient
        );
        assert_eq!(
            kind("28P01", "password authentication failed"),
            ErrorKind::Setup
        );
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed");
        assert_eq!(
            CaptureError::from(WireError::Network(eof)).kind(),
            ErrorKind::Transient
        );
        assert_eq!(
            CaptureError::from(WireError::Protocol("bad frame".into())).kind(),
            ErrorKind::Fatal
        );
        let bad_cert = std::io::Error::new(std::io::ErrorKind::InvalidData, "unknown issuer");
        assert_eq!(
            CaptureError::from(WireError::Handshake(bad_cert)).kind(),
            ErrorKind::Setup
        );
    }

    /// Commit times arrive in PostgreSQL's epoch (2000-01-01) and leave in Unix's.
    #[test]
    fn begin_times_are_moved_to_the_unix_epoch() {
        let mut data = vec![b'B'];
        data.extend_from_slice(&0x16_0000_0028u64.to_be_bytes());
        data.extend_from_slice(&0i64.to_be_bytes());
        data.extend_from_slice(&7u32.to_be_bytes());
        let begin = xlog_event(Lsn(1), Bytes::from(data)).unwrap();
        assert_eq!(
            begin,
            StreamEvent::Begin {
                final_lsn: Lsn(0x16_0000_0028),
                xid: 7,
                committed_at_us: 946_684_800_000_000,
            }
        );
    }

    #[test]
    fn keepalives_that_ask_for_a_reply_wake_the_status_task() {
        let notify = Notify::new();
        let mut body = vec![b'k'];
        body.extend_from_slice(&0x10u64.to_be_bytes());
        body.extend_from_slice(&0i64.to_be_bytes());
        body.push(1);
        let event = copy_data(Bytes::from(body), &notify).unwrap();
        assert_eq!(event, Some(StreamEvent::KeepAlive { wal_end: Lsn(0x10) }));
        // The permit is stored: a waiter returns at once.
        let waited = futures_util::FutureExt::now_or_never(notify.notified());
        assert!(waited.is_some());
    }

    #[test]
    fn status_updates_carry_the_position_three_times() {
        let buf = status_update(Lsn(0x0102_0304_0506_0708));
        assert_eq!(buf[0], b'd');
        assert_eq!(buf.len(), 1 + 4 + 34);
        assert_eq!(buf[5], b'r');
        for i in 0..3 {
            let at = 6 + i * 8;
            assert_eq!(&buf[at..at + 8], &0x0102_0304_0506_0708u64.to_be_bytes());
        }
    }
}
