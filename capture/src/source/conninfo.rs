//! Connection settings read the way libpq reads them, so that what works for `psql` works for
//! pgtrail: a `postgresql://` URL or a `key=value` string, then a service from
//! `pg_service.conf`, then the `PG*` environment variables, then libpq's defaults; then the
//! password from the password file.
//!
//! Everything here is pure but for the files it is pointed at: the environment is a value
//! ([`Environment`]), so the precedence rules are tested without touching the process's own.
//! No crate implements these conventions in full (the survey in
//! `shared/research/tls-and-web.md`; tokio-postgres rejects `sslmode=verify-full`,
//! `sslrootcert`, `service` and `passfile`), so they are written here, after libpq 15's
//! `fe-connect.c`, with `psql` as the oracle in the tests.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// libpq's compiled-in socket directory on Debian and Red Hat builds (upstream's is `/tmp`).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
const DEFAULT_PORT: u16 = 5432;
/// Debian's `--sysconfdir` for libpq, where the system `pg_service.conf` lives.
const DEFAULT_SYSCONFDIR: &str = "/etc/postgresql-common";

/// A connection setting that cannot be used, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}")]
pub struct ConnInfoError {
    pub problem: String,
}

fn bad(problem: impl Into<String>) -> ConnInfoError {
    ConnInfoError {
        problem: problem.into(),
    }
}

/// Where a setting's value came from (printed by `pgtrail status`, to debug a stray `PG*`
/// variable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    ConnectionString,
    Service(String),
    Environment(&'static str),
    PasswordFile(PathBuf),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::ConnectionString => f.write_str("connection string"),
            Origin::Service(name) => write!(f, "service {name}"),
            Origin::Environment(var) => f.write_str(var),
            Origin::PasswordFile(path) => write!(f, "password file {}", path.display()),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// The process environment as libpq sees it: variables and the home directory.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub vars: HashMap<String, String>,
    pub home: Option<PathBuf>,
    /// The operating-system user name (libpq's default user).
    pub os_user: Option<String>,
}

impl Environment {
    /// This process's environment.
    pub fn current() -> Environment {
        Environment {
            vars: std::env::vars().collect(),
            home: std::env::home_dir(),
            os_user: whoami::username().ok(),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn in_home(&self, relative: &str) -> Option<PathBuf> {
        self.home.as_ref().map(|h| h.join(relative))
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, ConnInfoError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(bad(format!("invalid sslmode value: \"{value}\""))),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// verify-ca and verify-full: a server that cannot prove itself is refused.
    pub fn verifies(self) -> bool {
        self >= SslMode::VerifyCa
    }
}

/// libpq's `channel_binding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    Disable,
    Prefer,
    Require,
}

/// The trusted roots for verifying the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trusted roots (libpq 16).
    System,
}

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp(String),
    /// A Unix socket directory (a `host` that starts with `/`).
    Socket(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(name) => f.write_str(name),
            Host::Socket(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// Resolved connection settings: what both connections (SQL and replication) use.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: Host,
    /// An address to connect to instead of resolving `host` (which still names the server
    /// for TLS and the password file).
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
    pub user: String,
    password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// The roots to verify with: `None` when none was given and `~/.postgresql/root.crt`
    /// does not exist.
    pub sslrootcert: Option<RootCert>,
    /// A client certificate and its key, when the certificate file exists.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub sslsni: bool,
    pub channel_binding: ChannelBinding,
    pub application_name: Option<String>,
    /// The user's `options` (`-c name=value ...`); pgtrail appends its own.
    pub options: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// Where each setting came from.
    pub origins: BTreeMap<&'static str, Origin>,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        f.debug_struct("ConnInfo")
            .field("host", &self.host)
            .field("hostaddr", &self.hostaddr)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("client_cert", &self.client_cert)
            .field("sslsni", &self.sslsni)
            .field("channel_binding", &self.channel_binding)
            .finish_non_exhaustive()
    }
}

impl ConnInfo {
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// `user@host:port/database`, without the password: safe to print.
    pub fn display(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    /// Resolve `conninfo` (a URL, a `key=value` string, or empty for "the environment
    /// only") the way libpq does.
    pub fn resolve(conninfo: &str, env: &Environment) -> Result<ConnInfo, ConnInfoError> {
        let given = parse_conninfo(conninfo)?;
        let mut settings: BTreeMap<&'static str, (String, Origin)> = given
            .into_iter()
            .map(|(k, v)| (k, (v, Origin::ConnectionString)))
            .collect();
        // 1. A service fills what the string left unset.
        let service = match settings.get("service") {
            Some((name, _)) => Some(name.clone()),
            None => env.var("PGSERVICE").map(str::to_string),
        };
        if let Some(service) = service {
            for (key, value) in read_service(&service, env)? {
                settings
                    .entry(key)
                    .or_insert((value, Origin::Service(service.clone())));
            }
        }
        // 2. The environment fills what is still unset.
        for &(key, var) in ENVIRONMENT {
            if let Some(value) = env.var(var) {
                settings
                    .entry(key)
                    .or_insert((value.to_string(), Origin::Environment(var)));
            }
        }
        resolve_settings(settings, env)
    }
}

/// The `PG*` variables and the keyword each sets (libpq's `PQconninfoOptions`).
const ENVIRONMENT: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("channel_binding", "PGCHANNELBINDING"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("client_encoding", "PGCLIENTENCODING"),
    ("options", "PGOPTIONS"),
    ("application_name", "PGAPPNAME"),
    ("sslmode", "PGSSLMODE"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcrl", "PGSSLCRL"),
    ("sslcrldir", "PGSSLCRLDIR"),
    ("sslsni", "PGSSLSNI"),
    ("requirepeer", "PGREQUIREPEER"),
    ("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION"),
    ("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION"),
    ("gssencmode", "PGGSSENCMODE"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
];

/// Every keyword libpq knows, and what pgtrail does with it.
#[derive(Clone, Copy)]
enum Keyword {
    Used,
    /// Accepted because its value changes nothing for pgtrail.
    Ignored,
    /// Known to libpq but not implemented: refused, so that nothing is silently weaker.
    Unsupported(&'static str),
}

fn keyword(key: &str) -> Option<(&'static str, Keyword)> {
    use Keyword::*;
    const KEYWORDS: &[(&str, Keyword)] = &[
        ("host", Used),
        ("hostaddr", Used),
        ("port", Used),
        ("dbname", Used),
        ("user", Used),
        ("password", Used),
        ("passfile", Used),
        ("service", Used),
        ("channel_binding", Used),
        ("connect_timeout", Used),
        ("options", Used),
        ("application_name", Used),
        ("fallback_application_name", Ignored),
        ("client_encoding", Used),
        ("sslmode", Used),
        ("sslcert", Used),
        ("sslkey", Used),
        ("sslrootcert", Used),
        ("sslsni", Used),
        ("sslcompression", Ignored),
        ("keepalives", Ignored),
        ("keepalives_idle", Ignored),
        ("keepalives_interval", Ignored),
        ("keepalives_count", Ignored),
        ("tcp_user_timeout", Ignored),
        ("target_session_attrs", Used),
        ("gssencmode", Used),
        ("krbsrvname", Ignored),
        ("gsslib", Ignored),
        (
            "sslpassword",
            Unsupported("encrypted client keys: decrypt the key file"),
        ),
        ("sslcrl", Unsupported("certificate revocation lists")),
        ("sslcrldir", Unsupported("certificate revocation lists")),
        (
            "requirepeer",
            Unsupported("checking the server's user over a Unix socket"),
        ),
        (
            "ssl_min_protocol_version",
            Unsupported("TLS version bounds (TLS 1.2 is the minimum)"),
        ),
        (
            "ssl_max_protocol_version",
            Unsupported("TLS version bounds (TLS 1.2 is the minimum)"),
        ),
        ("sslcertmode", Unsupported("sslcertmode")),
        ("sslnegotiation", Unsupported("direct TLS negotiation")),
        ("require_auth", Unsupported("require_auth")),
        ("load_balance_hosts", Unsupported("several hosts")),
        (
            "replication",
            Unsupported("the replication keyword: pgtrail opens its replication connection itself"),
        ),
    ];
    KEYWORDS.iter().find(|(k, _)| *k == key).copied()
}

/// The keywords of a connection string, in libpq's syntax (a URL or `key=value` pairs).
fn parse_conninfo(text: &str) -> Result<Vec<(&'static str, String)>, ConnInfoError> {
    let pairs = if text.starts_with("postgresql://") || text.starts_with("postgres://") {
        parse_url(text)?
    } else {
        parse_pairs(text)?
    };
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for (key, value) in pairs {
        let (key, _) =
            keyword(&key).ok_or_else(|| bad(format!("invalid connection option \"{key}\"")))?;
        // The last occurrence wins, as in libpq.
        out.retain(|(k, _)| *k != key);
        out.push((key, value));
    }
    Ok(out)
}

/// `key = value` pairs; values may be single-quoted, and `\` escapes the next character.
fn parse_pairs(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(format!(
                "missing \"=\" after \"{key}\" in connection info string (give a URL such as postgresql://user@host/db, or key=value settings such as \"host=h dbname=db\")"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(bad("unterminated quoted string in connection info string"));
                    }
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> Result<String, ConnInfoError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| bad(format!("invalid percent-encoded text in URI: \"{text}\"")))
}

/// `postgresql://[user[:password]@][host][:port][,...][/dbname][?key=value&...]`.
fn parse_url(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let rest = text
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let mut pairs = Vec::new();
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.push(("user".to_string(), percent_decode(user)?));
            }
            if let Some(password) = password {
                pairs.push(("password".to_string(), percent_decode(password)?));
            }
            hosts
        }
        None => authority,
    };
    let mut host_list = Vec::new();
    let mut port_list = Vec::new();
    for entry in hosts.split(',') {
        let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("missing \"]\" in IPv6 host address in URI"))?;
            (addr.to_string(), after.strip_prefix(':'))
        } else {
            match entry.split_once(':') {
                Some((h, p)) => (percent_decode(h)?, Some(p)),
                None => (percent_decode(entry)?, None),
            }
        };
        host_list.push(host);
        port_list.push(port.unwrap_or_default().to_string());
    }
    if host_list.iter().any(|h| !h.is_empty()) {
        pairs.push(("host".to_string(), host_list.join(",")));
    }
    if port_list.iter().any(|p| !p.is_empty()) {
        pairs.push(("port".to_string(), port_list.join(",")));
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".to_string(), percent_decode(path)?));
    }
    for param in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = param.split_once('=').ok_or_else(|| {
            bad(format!(
                "missing key/value separator \"=\" in URI query parameter: \"{param}\""
            ))
        })?;
        let (key, value) = (percent_decode(key)?, percent_decode(value)?);
        // JDBC's spelling, which libpq accepts too.
        if key == "ssl" && value == "true" {
            pairs.push(("sslmode".to_string(), "require".to_string()));
        } else {
            pairs.push((key, value));
        }
    }
    Ok(pairs)
}

/// The settings of `service` from the user's service file, else the system's.
fn read_service(
    service: &str,
    env: &Environment,
) -> Result<Vec<(&'static str, String)>, ConnInfoError> {
    let user_file = match env.var("PGSERVICEFILE") {
        Some(file) => Some(PathBuf::from(file)),
        None => env.in_home(".pg_service.conf"),
    };
    let system_file =
        Path::new(env.var("PGSYSCONFDIR").unwrap_or(DEFAULT_SYSCONFDIR)).join("pg_service.conf");
    for file in user_file.iter().chain([&system_file]) {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(bad(format!(
                    "cannot read service file \"{}\": {e}",
                    file.display()
                )));
            }
        };
        if let Some(settings) = service_in(&text, service, file)? {
            return Ok(settings);
        }
    }
    Err(bad(format!(
        "definition of service \"{service}\" not found (looked in {} and {})",
        user_file
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "no user service file".into()),
        system_file.display()
    )))
}

/// The settings of section `[service]` of a service file, if it has one.
fn service_in(
    text: &str,
    service: &str,
    file: &Path,
) -> Result<Option<Vec<(&'static str, String)>>, ConnInfoError> {
    let mut found = None::<Vec<(&'static str, String)>>;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            if found.is_some() {
                break;
            }
            if name.strip_suffix(']') == Some(service) {
                found = Some(Vec::new());
            }
            continue;
        }
        let Some(settings) = found.as_mut() else {
            continue;
        };
        let syntax = || {
            bad(format!(
                "syntax error in service file \"{}\", line {}",
                file.display(),
                number + 1
            ))
        };
        let (key, value) = line.split_once('=').ok_or_else(syntax)?;
        let (key, value) = (key.trim(), value.trim());
        if key == "service" {
            return Err(bad(format!(
                "nested service specifications not supported in service file \"{}\", line {}",
                file.display(),
                number + 1
            )));
        }
        let (key, _) = keyword(key).ok_or_else(syntax)?;
        if !settings.iter().any(|(k, _)| *k == key) {
            settings.push((key, value.to_string()));
        }
    }
    Ok(found)
}

fn resolve_settings(
    mut settings: BTreeMap<&'static str, (String, Origin)>,
    env: &Environment,
) -> Result<ConnInfo, ConnInfoError> {
    for key in settings.keys() {
        if let Some((_, Keyword::Unsupported(what))) = keyword(key) {
            let origin = &settings[key].1;
            return Err(bad(format!(
                "connection option \"{key}\" (from the {origin}) is not supported by pgtrail ({what}); remove it"
            )));
        }
    }
    let mut origins = BTreeMap::new();
    let mut take = |key: &'static str| -> Option<String> {
        settings.remove(key).map(|(value, origin)| {
            origins.insert(key, origin);
            value
        })
    };
    let single = |key: &str, value: String| -> Result<String, ConnInfoError> {
        if value.contains(',') {
            Err(bad(format!(
                "{key} lists several servers (\"{value}\"): pgtrail connects to one; give the primary's"
            )))
        } else {
            Ok(value)
        }
    };
    let hostaddr = take("hostaddr")
        .filter(|a| !a.is_empty())
        .map(|a| {
            let a = single("hostaddr", a)?;
            a.parse::<IpAddr>()
                .map_err(|_| bad(format!("could not parse network address \"{a}\"")))
        })
        .transpose()?;
    let host = match take("host").filter(|h| !h.is_empty()) {
        Some(h) => {
            let h = single("host", h)?;
            if h.starts_with('/') {
                Host::Socket(PathBuf::from(h))
            } else {
                Host::Tcp(h)
            }
        }
        None => match hostaddr {
            Some(addr) => Host::Tcp(addr.to_string()),
            None => Host::Socket(PathBuf::from(DEFAULT_SOCKET_DIR)),
        },
    };
    let port = match take("port").filter(|p| !p.is_empty()) {
        Some(p) => {
            let p = single("port", p)?;
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(format!("invalid port number: \"{p}\"")))?
        }
        None => DEFAULT_PORT,
    };
    let user = match take("user").filter(|u| !u.is_empty()) {
        Some(user) => user,
        None => env.os_user.clone().ok_or_else(|| {
            bad("no user name: give user= in the connection string or set PGUSER")
        })?,
    };
    let dbname = take("dbname")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let sslmode = match take("sslmode") {
        Some(mode) => SslMode::parse(&mode)?,
        None => SslMode::Prefer,
    };
    let channel_binding = match take("channel_binding").as_deref() {
        None | Some("prefer") => ChannelBinding::Prefer,
        Some("disable") => ChannelBinding::Disable,
        Some("require") => ChannelBinding::Require,
        Some(other) => return Err(bad(format!("invalid channel_binding value: \"{other}\""))),
    };
    let sslsni = match take("sslsni").as_deref() {
        None | Some("1") => true,
        Some("0") => false,
        Some(other) => return Err(bad(format!("invalid sslsni value: \"{other}\""))),
    };
    let explicit_rootcert = take("sslrootcert").filter(|r| !r.is_empty());
    let sslrootcert = match explicit_rootcert {
        Some(r) if r == "system" => Some(RootCert::System),
        Some(r) => Some(RootCert::File(PathBuf::from(r))),
        None => env.in_home(".postgresql/root.crt").map(RootCert::File),
    };
    // As libpq: a root certificate file that does not exist verifies nothing, which only
    // verify-ca and verify-full refuse.
    let sslrootcert = match sslrootcert {
        Some(RootCert::File(path)) if !path.exists() => {
            if sslmode.verifies() {
                return Err(bad(format!(
                    "root certificate file \"{}\" does not exist; either provide the file (sslrootcert=/path/to/ca.pem), use the system's trusted roots with sslrootcert=system, or change sslmode to disable server certificate verification",
                    path.display()
                )));
            }
            None
        }
        None if sslmode.verifies() => {
            return Err(bad(format!(
                "sslmode={} needs a root certificate, and there is no home directory to find ~/.postgresql/root.crt in; set sslrootcert=/path/to/ca.pem (or sslrootcert=system)",
                sslmode.as_str()
            )));
        }
        other => other,
    };
    if sslrootcert == Some(RootCert::System) && sslmode != SslMode::VerifyFull {
        return Err(bad(format!(
            "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
            sslmode.as_str()
        )));
    }
    let sslcert = take("sslcert")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| env.in_home(".postgresql/postgresql.crt"));
    let sslkey = take("sslkey")
        .filter(|k| !k.is_empty())
        .map(PathBuf::from)
        .or_else(|| env.in_home(".postgresql/postgresql.key"));
    let client_cert = match sslcert.filter(|c| c.exists()) {
        Some(cert) => {
            let key = sslkey
                .ok_or_else(|| bad("certificate present, but not private key file (set sslkey)"))?;
            Some((cert, key))
        }
        None => None,
    };
    let connect_timeout = match take("connect_timeout").filter(|t| !t.is_empty()) {
        Some(t) => {
            let secs: i64 = t.trim().parse().map_err(|_| {
                bad(format!(
                    "invalid integer value \"{t}\" for connection option \"connect_timeout\""
                ))
            })?;
            // libpq: zero or negative waits forever; one second is raised to two.
            (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64))
        }
        None => None,
    };
    if let Some(encoding) = take("client_encoding")
        && !matches!(
            encoding.to_ascii_uppercase().as_str(),
            "UTF8" | "UTF-8" | "AUTO"
        )
    {
        return Err(bad(format!(
            "client_encoding \"{encoding}\" is not supported: pgtrail reads every value as UTF8 (remove it or set UTF8)"
        )));
    }
    match take("target_session_attrs").as_deref() {
        None | Some("any" | "read-write" | "primary") => {}
        Some(other) => {
            return Err(bad(format!(
                "target_session_attrs \"{other}\": a replication slot lives on the primary; use read-write or leave it unset"
            )));
        }
    }
    if take("gssencmode").as_deref() == Some("require") {
        return Err(bad(
            "gssencmode=require: pgtrail does not implement GSSAPI encryption; use TLS (sslmode=verify-full)",
        ));
    }
    let application_name = take("application_name").filter(|a| !a.is_empty());
    let options = take("options").filter(|o| !o.trim().is_empty());
    let passfile = take("passfile").filter(|p| !p.is_empty());
    let mut password = take("password").filter(|p| !p.is_empty());
    if password.is_none() {
        // A file named on purpose (passfile=, PGPASSFILE) that is not there is said; libpq is
        // silent, and the user is left with "no password supplied". ~/.pgpass may be absent.
        if let Some(named) = &passfile
            && !Path::new(named).exists()
        {
            tracing::warn!(file = %named, "password file does not exist; not used");
        }
        let file = passfile
            .map(PathBuf::from)
            .or_else(|| env.in_home(".pgpass"));
        if let Some(file) = file {
            let lookup_host = match (&host, hostaddr) {
                (Host::Socket(dir), _) if dir == Path::new(DEFAULT_SOCKET_DIR) => {
                    "localhost".to_string()
                }
                (host, _) => host.to_string(),
            };
            if let Some(found) =
                password_from_file(&file, &lookup_host, &port.to_string(), &dbname, &user)
            {
                origins.insert("password", Origin::PasswordFile(file));
                password = Some(found);
            }
        }
    }
    for key in ["service", "passfile"] {
        origins.remove(key);
    }
    Ok(ConnInfo {
        host,
        hostaddr,
        port,
        user,
        password,
        dbname,
        sslmode,
        sslrootcert,
        client_cert,
        sslsni,
        channel_binding,
        application_name,
        options,
        connect_timeout,
        origins,
    })
}

/// The password for (host, port, dbname, user) from a password file (`~/.pgpass`): the first
/// line whose four fields match, each literally or as `*`. libpq's rules: a file that is not
/// a plain file, or that the group or others may read, is ignored with a warning.
pub fn password_from_file(
    file: &Path,
    host: &str,
    port: &str,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() {
        tracing::warn!(file = %file.display(), "password file is not a plain file; not used");
        return None;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %file.display(),
                "password file has group or world access; permissions should be u=rw (0600) or less; not used"
            );
            return None;
        }
    }
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with('#') && !line.trim().is_empty())
        .find_map(|(at, line)| {
            let fields = pgpass_fields(line);
            let [h, p, d, u, password] = fields.as_slice() else {
                // libpq skips such a line without a word; the line itself may hold a
                // password, so only its number is said.
                tracing::warn!(
                    file = %file.display(),
                    line = at + 1,
                    fields = fields.len(),
                    "password file line is not host:port:database:user:password (5 fields separated by ':'); skipped"
                );
                return None;
            };
            let matches = |field: &str, value: &str| field == "*" || field == value;
            (matches(h, host) && matches(p, port) && matches(d, dbname) && matches(u, user))
                .then(|| password.clone())
        })
}

/// A password-file line's fields: `:` separates, `\` escapes the next character. The fifth
/// field runs to the end of the line.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                let c = if c == '\\' { chars.next() } else { Some(c) };
                if let (Some(c), Some(field)) = (c, fields.last_mut()) {
                    field.push(c);
                }
            }
        }
    }
    fields
}

/// Entry points for the fuzz targets (`tools/fuzz`): not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// `text` as a connection string: resolving it never panics, and whatever key=value
    /// settings it parses to come back unchanged from the key=value string that says them
    /// (quoted, with `\` escapes), as they must when pgtrail hands settings on.
    pub fn conninfo(text: &str) {
        let env = Environment {
            vars: HashMap::new(),
            home: None,
            os_user: Some("fuzz".into()),
        };
        let _ = ConnInfo::resolve(text, &env);
        let Ok(pairs) = parse_conninfo(text) else {
            return;
        };
        let said: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect();
        let again = parse_conninfo(&said.join(" "))
            .unwrap_or_else(|e| panic!("{said:?} does not parse again: {e}"));
        assert_eq!(again, pairs, "{text:?} said as {said:?}");
    }

    /// Each line of `text` as a password-file line: its fields, written back with `:` and `\`
    /// escaped, read back as the same fields.
    pub fn pgpass(text: &str) {
        for line in text.lines() {
            let fields = pgpass_fields(line);
            let escaped: Vec<String> = fields
                .iter()
                .map(|f| f.replace('\\', "\\\\").replace(':', "\\:"))
                .collect();
            let again = pgpass_fields(&escaped.join(":"));
            assert_eq!(again, fields, "{line:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Environment {
        Environment {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: None,
            os_user: Some("osuser".into()),
        }
    }

    #[test]
    fn urls_and_key_value_strings_say_the_same_things() {
        let url = ConnInfo::resolve(
            "postgresql://al%40ice:p%3Ass@db.example.com:6543/shop%20db?sslmode=verify-full&application_name=x",
            &env(&[]),
        );
        let kv = ConnInfo::resolve(
            "host=db.example.com port=6543 user='al@ice' password = 'p:ss' dbname='shop db' sslmode=verify-full application_name=x",
            &env(&[]),
        );
        // verify-full needs a root certificate that exists.
        assert!(url.is_err() && kv.is_err(), "{url:?} {kv:?}");
        let url = ConnInfo::resolve(
            "postgresql://al%40ice:p%3Ass@db.example.com:6543/shop%20db?sslmode=require&application_name=x",
            &env(&[]),
        )
        .unwrap();
        let kv = ConnInfo::resolve(
            "host=db.example.com port=6543 user='al@ice' password = 'p:ss' dbname='shop db' sslmode=require application_name=x",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(url, kv);
        assert_eq!(url.host, Host::Tcp("db.example.com".into()));
        assert_eq!(url.port, 6543);
        assert_eq!(url.user, "al@ice");
        assert_eq!(url.password(), Some("p:ss"));
        assert_eq!(url.dbname, "shop db");
        assert_eq!(url.sslmode, SslMode::Require);
        assert!(!format!("{url:?}").contains("p:ss"));
    }

    #[test]
    fn ipv6_hosts_sockets_and_quoting() {
        let v6 = ConnInfo::resolve("postgresql://u@[::1]:5433/d", &env(&[])).unwrap();
        assert_eq!(v6.host, Host::Tcp("::1".into()));
        assert_eq!(v6.port, 5433);
        let socket = ConnInfo::resolve("postgresql://u@%2Ftmp%2Fpg/d", &env(&[])).unwrap();
        assert_eq!(socket.host, Host::Socket("/tmp/pg".into()));
        let quoted = ConnInfo::resolve(r"user=u password='it\'s a \\ test'", &env(&[])).unwrap();
        assert_eq!(quoted.password(), Some(r"it's a \ test"));
        let unquoted = ConnInfo::resolve(r"user=u password=a\ b", &env(&[])).unwrap();
        assert_eq!(unquoted.password(), Some("a b"));
    }

    #[test]
    fn the_string_wins_over_the_environment_which_wins_over_defaults() {
        let e = env(&[
            ("PGHOST", "envhost"),
            ("PGPORT", "6000"),
            ("PGUSER", "envuser"),
            ("PGSSLMODE", "require"),
            ("PGAPPNAME", "envapp"),
        ]);
        let info = ConnInfo::resolve("host=stringhost", &e).unwrap();
        assert_eq!(info.host, Host::Tcp("stringhost".into()));
        assert_eq!(info.port, 6000);
        assert_eq!(info.user, "envuser");
        assert_eq!(info.dbname, "envuser");
        assert_eq!(info.sslmode, SslMode::Require);
        assert_eq!(info.origins["host"], Origin::ConnectionString);
        assert_eq!(info.origins["port"], Origin::Environment("PGPORT"));
        let defaults = ConnInfo::resolve("", &env(&[])).unwrap();
        assert_eq!(defaults.host, Host::Socket(DEFAULT_SOCKET_DIR.into()));
        assert_eq!(defaults.port, 5432);
        assert_eq!(defaults.user, "osuser");
        assert_eq!(defaults.sslmode, SslMode::Prefer);
        assert_eq!(defaults.channel_binding, ChannelBinding::Prefer);
    }

    #[test]
    fn bad_settings_are_refused_with_libpq_words() {
        let err = |s: &str| ConnInfo::resolve(s, &env(&[])).unwrap_err().problem;
        assert_eq!(err("hots=x"), "invalid connection option \"hots\"");
        assert_eq!(err("sslmode=verify"), "invalid sslmode value: \"verify\"");
        assert_eq!(err("port=70000"), "invalid port number: \"70000\"");
        assert!(err("host").starts_with("missing \"=\" after \"host\""));
        assert!(err("password='open").starts_with("unterminated quoted string"));
        assert!(err("host=a,b").contains("pgtrail connects to one"));
        assert!(err("sslcrl=/x").contains("not supported by pgtrail"));
        assert!(err("sslmode=require sslrootcert=system").contains("verify-full"));
        // A password echoed by no error.
        assert!(!err("postgresql://u:secret@[::1/d").contains("secret"));
    }

    #[test]
    fn service_files_fill_what_the_string_leaves_and_lose_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("services.conf");
        std::fs::write(
            &file,
            "# comment\n[other]\nhost=nope\n\n[prod]\nhost = svchost\nport=7000\nuser=svcuser\n",
        )
        .unwrap();
        let e = env(&[
            ("PGSERVICEFILE", file.to_str().unwrap()),
            ("PGPORT", "6000"),
            ("PGHOST", "envhost"),
        ]);
        let info = ConnInfo::resolve("service=prod user=me", &e).unwrap();
        assert_eq!(info.host, Host::Tcp("svchost".into()));
        assert_eq!(info.port, 7000);
        assert_eq!(info.user, "me");
        assert_eq!(info.origins["host"], Origin::Service("prod".into()));
        let mut by_env = e.clone();
        by_env.vars.insert("PGSERVICE".into(), "prod".into());
        assert_eq!(ConnInfo::resolve("", &by_env).unwrap().port, 7000);
        let missing = ConnInfo::resolve("service=absent", &e).unwrap_err();
        assert!(
            missing
                .problem
                .contains("definition of service \"absent\" not found")
        );
    }

    #[test]
    fn password_files_match_like_libpq() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            // A blank line and one of three fields are skipped (with a warning), not fatal.
            "# a comment:*:*:*:no\n\nh:5432:shop\nother:*:*:*:wrong\ndb\\:host:5432:*:u:escaped\n*:5432:shop:u:first\n*:*:*:u:second\\:half\n*:*:*:*:any\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let lookup = |host: &str, port: &str, db: &str, user: &str| {
            password_from_file(&file, host, port, db, user)
        };
        assert_eq!(lookup("h", "5432", "shop", "u").as_deref(), Some("first"));
        assert_eq!(
            lookup("h", "5433", "shop", "u").as_deref(),
            Some("second:half")
        );
        assert_eq!(
            lookup("db:host", "5432", "x", "u").as_deref(),
            Some("escaped")
        );
        assert_eq!(lookup("h", "1", "x", "v").as_deref(), Some("any"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(lookup("h", "5432", "shop", "u"), None);
        // Through resolve: a socket in the default directory is "localhost".
        std::fs::write(&file, "localhost:5432:d:u:sock\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = env(&[("PGPASSFILE", file.to_str().unwrap())]);
        let info = ConnInfo::resolve("user=u dbname=d", &e).unwrap();
        assert_eq!(info.password(), Some("sock"));
        assert_eq!(info.origins["password"], Origin::PasswordFile(file.clone()));
        let given = ConnInfo::resolve("user=u dbname=d password=mine", &e).unwrap();
        assert_eq!(given.password(), Some("mine"));
    }
}
