//! The source database's connection settings, parsed once from a URL, and the two
//! connections they open: ordinary SQL ([`SourceConfig::connect_sql`]) and replication
//! ([`replication`]).

pub mod replication;

use std::time::Duration;

use tokio_postgres::config::Host;

use crate::error::CaptureError;

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

/// A parsed source URL.
#[derive(Clone)]
pub struct SourceConfig {
    pg: tokio_postgres::Config,
    display: String,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("SourceConfig")
            .field("target", &self.display)
            .finish()
    }
}

impl SourceConfig {
    /// Parse a `postgresql://` URL or a `key=value` connection string.
    pub fn parse(url: &str) -> Result<SourceConfig, CaptureError> {
        let mut pg: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| CaptureError::InvalidUrl {
                    detail: redact(&e.to_string(), url),
                })?;
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            return Err(CaptureError::InvalidUrl {
                detail: "no user name".into(),
            });
        }
        if pg.get_dbname().is_none() {
            let user = pg.get_user().unwrap_or_default().to_string();
            pg.dbname(&user);
        }
        pg.options(SESSION_OPTIONS);
        pg.application_name("pgtrail");
        pg.connect_timeout(Duration::from_secs(10));
        pg.keepalives_idle(Duration::from_secs(30));
        // A query sent into a dead network (no FIN, no RST) fails after this long instead of
        // waiting for the kernel's retransmissions (about 15 minutes).
        pg.tcp_user_timeout(Duration::from_secs(30));
        let display = format!(
            "{}@{}:{}/{}",
            pg.get_user().unwrap_or_default(),
            host_text(&pg.get_hosts()[0]),
            pg.get_ports().first().copied().unwrap_or(5432),
            pg.get_dbname().unwrap_or_default()
        );
        Ok(SourceConfig { pg, display })
    }

    /// `user@host:port/database`, without the password: safe to print.
    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn database(&self) -> &str {
        self.pg.get_dbname().unwrap_or_default()
    }

    pub fn user(&self) -> &str {
        self.pg.get_user().unwrap_or_default()
    }

    /// Open an ordinary SQL connection (its driver runs on a spawned task).
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, CaptureError> {
        let (client, connection) =
            self.pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|source| CaptureError::Connect {
                    target: self.display.clone(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "source sql connection ended");
            }
        });
        Ok(client)
    }

    pub(crate) fn host_text(&self) -> String {
        host_text(&self.pg.get_hosts()[0])
    }

    pub(crate) fn port(&self) -> u16 {
        self.pg.get_ports().first().copied().unwrap_or(5432)
    }

    pub(crate) fn password(&self) -> Option<String> {
        self.pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    }
}

/// Remove a password that a parser echoed back into its message.
fn redact(message: &str, url: &str) -> String {
    let mut out = message.to_string();
    if let Some(rest) = url.split("://").nth(1)
        && let Some((userinfo, _)) = rest.split_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
        && !password.is_empty()
    {
        out = out.replace(password, "***");
    }
    out
}
