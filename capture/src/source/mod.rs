//! The source database's connection settings, resolved once as libpq resolves them
//! ([`conninfo`]), and the two connections they open with the same TLS policy ([`tls`]):
//! ordinary SQL through tokio-postgres ([`SourceConfig::connect_sql`]) and replication through
//! pgtrail's own frontend ([`wire`], [`replication`]).

pub mod conninfo;
pub mod replication;
pub mod tls;
pub mod wire;

use std::time::Duration;

use crate::error::CaptureError;
pub use conninfo::{ConnInfo, Environment, SslMode};
use tls::{AttemptFailure, HandshakeError, PostgresTls, TlsFacts, TlsPolicy};

/// Session settings pinned on every connection, so that text values read by COPY (the
/// snapshot) and sent by the walsender (the stream) are printed the same way.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c intervalstyle=postgres -c extra_float_digits=1 -c bytea_output=hex";

/// [`SESSION_OPTIONS`] as SQL `SET` statements, for sessions (tests, tools) that must print
/// values exactly as capture reads them.
pub fn session_settings_sql() -> String {
    SESSION_OPTIONS
        .split("-c ")
        .filter_map(|o| o.trim().split_once('='))
        .map(|(name, value)| format!("SET {name} = '{value}'; "))
        .collect()
}

/// The source's connection settings, resolved once (libpq's rules, [`conninfo`]) with the TLS
/// policy they imply ([`tls`]); both connections are opened from this one value.
#[derive(Clone)]
pub struct SourceConfig {
    info: ConnInfo,
    tls: TlsPolicy,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("SourceConfig")
            .field("target", &self.info.display())
            .field("sslmode", &self.info.sslmode)
            .finish()
    }
}

/// How long a connection attempt may take when the settings give no `connect_timeout`
/// (libpq waits forever; capture must not).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl SourceConfig {
    /// Resolve a `postgresql://` URL, a `key=value` connection string, or an empty string
    /// (the environment alone) with this process's environment, as libpq would.
    pub fn parse(conninfo: &str) -> Result<SourceConfig, CaptureError> {
        SourceConfig::resolve(conninfo, &Environment::current())
    }

    /// [`SourceConfig::parse`] with a given environment.
    pub fn resolve(conninfo: &str, env: &Environment) -> Result<SourceConfig, CaptureError> {
        let invalid = |e: conninfo::ConnInfoError| CaptureError::InvalidUrl { detail: e.problem };
        let info = ConnInfo::resolve(conninfo, env).map_err(invalid)?;
        let tls =
            TlsPolicy::new(&info).map_err(|e| CaptureError::InvalidTls { detail: e.problem })?;
        Ok(SourceConfig { info, tls })
    }

    /// `user@host:port/database`, without the password: safe to print.
    pub fn display(&self) -> String {
        self.info.display()
    }

    pub fn database(&self) -> &str {
        &self.info.dbname
    }

    pub fn user(&self) -> &str {
        &self.info.user
    }

    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    pub fn tls(&self) -> &TlsPolicy {
        &self.tls
    }

    /// What the TLS settings check, before any connection: a line for people, and whether it
    /// deserves a warning (TLS to a remote server that is not verified, or no TLS at all).
    pub fn protection(&self) -> (String, bool) {
        let remote = match &self.info.host {
            conninfo::Host::Socket(_) => false,
            conninfo::Host::Tcp(name) => !is_loopback(name),
        };
        let mode = self.info.sslmode.as_str();
        if !self.tls.uses_tls() {
            let text = match &self.info.host {
                conninfo::Host::Socket(_) => "Unix socket, no TLS".to_string(),
                _ => format!("sslmode={mode}: no TLS"),
            };
            return (text, remote);
        }
        let mut text = format!(
            "sslmode={mode}: {}",
            tls::verification_words(self.tls.verifies_chain, self.tls.verifies_name)
        );
        if !self.tls.verifies_chain {
            text.push_str(" (encrypted, but anyone in the path could pose as the server); to verify it, set sslmode=verify-full and sslrootcert=<the server's CA file>");
        }
        (text, remote && !self.tls.verifies_name)
    }

    pub(crate) fn application_name(&self) -> &str {
        self.info.application_name.as_deref().unwrap_or("pgtrail")
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.info.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }

    /// The user's `options`, then [`SESSION_OPTIONS`] (later settings win in PostgreSQL, so
    /// pgtrail's value formats hold while the user's other settings are kept).
    pub(crate) fn options(&self) -> String {
        match &self.info.options {
            Some(user) => format!("{user} {SESSION_OPTIONS}"),
            None => SESSION_OPTIONS.to_string(),
        }
    }

    /// The tokio-postgres configuration for one attempt with `ssl_mode`.
    fn postgres_config(&self, ssl_mode: tokio_postgres::config::SslMode) -> tokio_postgres::Config {
        use tokio_postgres::config::ChannelBinding as Cb;
        let info = &self.info;
        let mut pg = tokio_postgres::Config::new();
        match &info.host {
            conninfo::Host::Tcp(name) => pg.host(name),
            conninfo::Host::Socket(dir) => pg.host_path(dir),
        };
        if let Some(addr) = info.hostaddr {
            pg.hostaddr(addr);
        }
        pg.port(info.port)
            .user(&info.user)
            .dbname(&info.dbname)
            .options(self.options())
            .application_name(self.application_name())
            .connect_timeout(self.connect_timeout())
            .keepalives_idle(Duration::from_secs(30))
            // A query sent into a dead network (no FIN, no RST) fails after this long instead
            // of waiting for the kernel's retransmissions (about 15 minutes).
            .tcp_user_timeout(Duration::from_secs(30))
            .ssl_mode(ssl_mode)
            .channel_binding(match info.channel_binding {
                conninfo::ChannelBinding::Disable => Cb::Disable,
                conninfo::ChannelBinding::Prefer => Cb::Prefer,
                conninfo::ChannelBinding::Require => Cb::Require,
            });
        if let Some(password) = info.password() {
            pg.password(password);
        }
        pg
    }

    /// Open an ordinary SQL connection (its driver runs on a spawned task), trying TLS and
    /// plaintext in the order the sslmode says, as the replication connection does
    /// ([`wire::open`]).
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, CaptureError> {
        Ok(self.connect_sql_reporting().await?.0)
    }

    /// [`SourceConfig::connect_sql`], and what its TLS handshake established (`None`: no TLS).
    pub async fn connect_sql_reporting(
        &self,
    ) -> Result<(tokio_postgres::Client, Option<TlsFacts>), CaptureError> {
        use tokio_postgres::config::SslMode as Pg;
        // Whether the last attempt completed a TLS handshake (see `connect_in_order`).
        let went_tls = std::sync::atomic::AtomicBool::new(false);
        let attempt = |mode: Pg| {
            let went_tls = &went_tls;
            async move {
                let tls = PostgresTls {
                    policy: self.tls.clone(),
                    facts: Default::default(),
                };
                let facts = tls.facts.clone();
                let connected = self.postgres_config(mode).connect(tls).await;
                went_tls.store(
                    facts.lock().is_ok_and(|f| f.is_some()),
                    std::sync::atomic::Ordering::Relaxed,
                );
                let (client, connection) = connected?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "source sql connection ended");
                    }
                });
                let facts = facts.lock().ok().and_then(|f| f.clone());
                Ok::<_, tokio_postgres::Error>((client, facts))
            }
        };
        let result = self
            .tls
            .connect_in_order(
                |tls| match (tls, self.tls.mode) {
                    (false, _) => attempt(Pg::Disable),
                    (true, SslMode::Allow | SslMode::Prefer) => attempt(Pg::Prefer),
                    (true, _) => attempt(Pg::Require),
                },
                |e: &tokio_postgres::Error| {
                    if is_handshake_error(e) {
                        AttemptFailure::Handshake
                    } else if e.as_db_error().is_none() {
                        AttemptFailure::Other
                    } else if went_tls.load(std::sync::atomic::Ordering::Relaxed) {
                        AttemptFailure::RefusedOverTls
                    } else {
                        AttemptFailure::Refused
                    }
                },
            )
            .await;
        result.map_err(|source| {
            if let Some(db) = source.as_db_error()
                && let Some(setup) = through_a_pooler(self, db.code().code(), db.message())
            {
                return setup;
            }
            if let Some(h) = handshake_error(&source)
                && h.0.kind() == std::io::ErrorKind::InvalidData
            {
                return self.certificate_refused(&h.0.to_string());
            }
            if let Some(refused) = self.password_problem(&source) {
                return refused;
            }
            CaptureError::Connect {
                target: self.display(),
                source,
            }
        })
    }

    /// A password the server asked for and did not get, or refused: said with where the
    /// password came from (as psql says `password retrieved from file`), never the password.
    fn password_problem(&self, e: &tokio_postgres::Error) -> Option<CaptureError> {
        const INVALID_PASSWORD: &str = "28P01";
        let sources = "the connection string (password=…), PGPASSWORD, or a password file (passfile=…, PGPASSFILE or ~/.pgpass: mode 0600, lines host:port:database:user:password)";
        match e.as_db_error() {
            // tokio-postgres asks for the password only when the server's authentication
            // request arrives, and fails with this configuration error when it has none.
            None if std::error::Error::source(e)
                .is_some_and(|cause| cause.to_string() == "password missing") =>
            {
                Some(CaptureError::setup(
                    format!(
                        "{} asks user \"{}\" for a password and none was given",
                        self.display(),
                        self.info.user
                    ),
                    format!("give it in {sources}"),
                ))
            }
            Some(db) if db.code().code() == INVALID_PASSWORD => {
                let from =
                    self.info
                        .origins
                        .get("password")
                        .map_or_else(String::new, |o| match o {
                            conninfo::Origin::ConnectionString => "the connection string".into(),
                            o => o.to_string(),
                        });
                Some(CaptureError::setup(
                    format!(
                        "{}: {} (the password came from {from})",
                        self.display(),
                        db.message()
                    ),
                    format!(
                        "check the password for user \"{}\" in {sources}",
                        self.info.user
                    ),
                ))
            }
            _ => None,
        }
    }

    /// The server's certificate did not verify (either connection): what to check.
    pub(crate) fn certificate_refused(&self, detail: &str) -> CaptureError {
        let roots = match &self.info.sslrootcert {
            Some(conninfo::RootCert::File(path)) => {
                format!("the CA certificates in {}", path.display())
            }
            Some(conninfo::RootCert::System) => "the system's trusted roots".to_string(),
            None => "no root certificate".to_string(),
        };
        CaptureError::setup(
            format!(
                "the TLS connection to {} was refused: {detail} (sslmode={}, verified against {roots})",
                self.display(),
                self.info.sslmode.as_str()
            ),
            "check that sslrootcert holds the CA that signed the server's certificate, and (verify-full) that the host you connect to is a name or address the certificate lists; `openssl s_client -starttls postgres -connect HOST:PORT -showcerts` shows what the server presents",
        )
    }
}

/// A refusal of a startup parameter PostgreSQL itself accepts (`replication`, `options`) is
/// what a connection pooler such as PgBouncer answers (08P01 protocol_violation, "unsupported
/// startup parameter"): capture needs PostgreSQL itself, for the replication protocol and for
/// session settings that a transaction pooler would not keep.
pub(crate) fn through_a_pooler(
    source: &SourceConfig,
    code: &str,
    message: &str,
) -> Option<CaptureError> {
    (code == "08P01" && message.contains("startup parameter")).then(|| {
        CaptureError::setup(
            format!(
                "{} refused a connection setting PostgreSQL accepts ({message}): it looks like a connection pooler such as PgBouncer, which cannot carry a replication connection",
                source.display()
            ),
            "connect capture to PostgreSQL directly (on managed services, the direct endpoint rather than the pooled one, e.g. port 5432 rather than a transaction pooler's)",
        )
    })
}

/// Whether a tokio-postgres error is a failed TLS handshake (ours, [`HandshakeError`]).
pub(crate) fn is_handshake_error(e: &tokio_postgres::Error) -> bool {
    handshake_error(e).is_some()
}

/// The failed TLS handshake inside a tokio-postgres error, if that is what it is.
pub(crate) fn handshake_error(e: &tokio_postgres::Error) -> Option<&HandshakeError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HandshakeError>() {
            return Some(h);
        }
        source = s.source();
    }
    None
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}
