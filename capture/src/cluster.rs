//! A throwaway PostgreSQL cluster for tests, benchmarks and the demo.
//!
//! `initdb` into a temporary directory, `wal_level=logical`, a free port on 127.0.0.1 and the
//! unix socket in the same directory. When the process runs as root the server commands run
//! as the `postgres` OS user (PostgreSQL refuses to run as root). The server binaries come from
//! `PGTRAIL_TEST_PG_BIN`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`; a missing server is an error that names the package to install.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them (Debian/Ubuntu: `apt-get install postgresql`) or set PGTRAIL_TEST_PG_BIN to their directory"
    )]
    NotFound,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("i/o error while preparing the cluster")]
    Io(#[from] std::io::Error),
}

/// Server settings of a throwaway cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `-c name=value` settings, after the defaults.
    pub settings: Vec<(String, String)>,
    /// A `pg_hba.conf` to use instead of initdb's (which trusts everyone). Keep a `local`
    /// line that trusts `postgres`: [`Cluster::psql`] connects over the socket.
    pub hba: Option<String>,
    /// Files written into the data directory before the server starts, readable by the
    /// server only (certificates and keys: `ssl_cert_file = 'server.crt'`).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A running throwaway cluster. Dropping it stops the server and removes its directory.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    /// The shared cluster is never dropped; its reaper process cleans up instead.
    keep_on_drop: bool,
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// The one cluster of this process (a test binary), started on first use and stopped by a
    /// reaper process when this process exits.
    pub fn shared() -> &'static Cluster {
        let result = SHARED.get_or_init(|| {
            let mut cluster =
                Cluster::start(ClusterOptions::default()).map_err(|e| e.to_string())?;
            cluster.spawn_reaper().map_err(|e| e.to_string())?;
            cluster.keep_on_drop = true;
            Ok(cluster)
        });
        match result {
            Ok(c) => c,
            Err(e) => panic!("cannot start the throwaway PostgreSQL: {e}"),
        }
    }

    /// Start a new cluster of its own (for tests that restart or reconfigure the server).
    pub fn start(options: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bin = find_bin_dir()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new().prefix("pgtrail-pg-").tempdir()?;
        if as_postgres {
            // The postgres user must create the data directory, socket and log in here.
            run(
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(dir.path()),
                "chown",
            )?;
        }
        let mut cluster = Cluster {
            dir,
            bin,
            port: 0,
            as_postgres,
            keep_on_drop: false,
        };
        let data = cluster.data_dir();
        cluster.run_pg(
            "initdb",
            &[
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ],
            &[data.as_os_str()],
        )?;
        let mut conf = String::from(
            "wal_level = logical\nmax_replication_slots = 64\nmax_wal_senders = 64\nwal_sender_timeout = '10s'\n\
             listen_addresses = '127.0.0.1'\nfsync = off\nmax_connections = 200\nlogging_collector = off\n\
             track_commit_timestamp = on\n",
        );
        for (name, value) in &options.settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            cluster.dir.path().display()
        ));
        if let Some(hba) = &options.hba {
            cluster.write_private(&data.join("pg_hba.conf"), hba.as_bytes())?;
        }
        for (name, contents) in &options.files {
            cluster.write_private(&data.join(name), contents)?;
        }
        let conf_path = data.join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;
        // A few attempts: the free port can be taken between choosing and binding it.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClusterError::NotFound))
    }

    /// Write (or replace) a file of the data directory that only the server's user may read,
    /// e.g. a new TLS certificate and key; `SELECT pg_reload_conf()` makes the server use them.
    pub fn put_file(&self, name: &str, contents: &[u8]) -> Result<(), ClusterError> {
        self.write_private(&self.data_dir().join(name), contents)
    }

    /// Write a file only the server's user may read (PostgreSQL refuses a key file others
    /// can read).
    fn write_private(&self, path: &Path, contents: &[u8]) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, contents)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        if self.as_postgres {
            run(
                Command::new("chown").args(["postgres:postgres"]).arg(path),
                "chown",
            )?;
        }
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let data = self.data_dir();
        let log = self.log_path();
        let port = format!("-p {}", self.port);
        self.run_pg(
            "pg_ctl",
            &["-w", "-t", "60", "start", "-o", &port, "-D"],
            &[data.as_os_str(), "-l".as_ref(), log.as_os_str()],
        )
        .map_err(|e| self.with_log(e))
    }

    fn with_log(&self, e: ClusterError) -> ClusterError {
        match e {
            ClusterError::Command { what, detail } => {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                ClusterError::Command {
                    what,
                    detail: format!("{detail}\nserver log:\n{tail}"),
                }
            }
            other => other,
        }
    }

    /// Stop the server (`fast` or `immediate`).
    pub fn stop(&self, mode: &str) -> Result<(), ClusterError> {
        let data = self.data_dir();
        self.run_pg(
            "pg_ctl",
            &["-w", "stop", "-m", mode, "-D"],
            &[data.as_os_str()],
        )
    }

    /// Ask the server to stop in `mode` and return at once (`smart` then waits for every
    /// session to end, and meanwhile refuses new ones with SQLSTATE 57P03).
    pub fn begin_stop(&self, mode: &str) -> Result<(), ClusterError> {
        let data = self.data_dir();
        self.run_pg(
            "pg_ctl",
            &["-W", "stop", "-m", mode, "-D"],
            &[data.as_os_str()],
        )
    }

    /// Start the server again after [`stop`](Self::stop), on the same port.
    pub fn restart(&self, mode: &str) -> Result<(), ClusterError> {
        self.stop(mode)?;
        self.pg_ctl_start()
    }

    /// Start the server again after [`stop`](Self::stop), on the same port.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }

    /// Change a setting in `postgresql.auto.conf` (takes effect at the next restart).
    pub fn set(&self, name: &str, value: &str) -> Result<(), ClusterError> {
        let path = self.data_dir().join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&path)?;
        conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        std::fs::write(&path, conf)?;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of the server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A connection URL (TCP, user `postgres`, no password) for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{}", self.port, database)
    }

    /// Create a new, uniquely named database and return its name.
    pub fn fresh_database(&self, prefix: &str) -> Result<String, ClusterError> {
        let n = NEXT_DB.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}_{}_{n}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(name)
    }

    /// Run SQL with psql (over the Unix socket, as `postgres`) against `database` and return
    /// its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ])
            // The socket: a cluster whose pg_hba.conf asks TCP clients for TLS or a password
            // still trusts its administrator here.
            .arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                what: "psql".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    fn run_pg(
        &self,
        program: &str,
        args: &[&str],
        more: &[&std::ffi::OsStr],
    ) -> Result<(), ClusterError> {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).args(more).current_dir(self.dir.path());
        run(&mut cmd, program)
    }

    /// Start a small process that waits for this process to exit, then stops the server and
    /// removes the directory (statics are never dropped).
    fn spawn_reaper(&self) -> Result<(), ClusterError> {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.data_dir();
        let stop = if self.as_postgres {
            format!(
                "runuser -u postgres -- '{}' stop -m immediate -D '{}'",
                pg_ctl.display(),
                data.display()
            )
        } else {
            format!(
                "'{}' stop -m immediate -D '{}'",
                pg_ctl.display(),
                data.display()
            )
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.path().display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.keep_on_drop {
            let _ = self.stop("immediate");
        }
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ClusterError> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command {
            what: what.to_string(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// Whether this process runs as root (server programs then run as the `postgres` user).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn free_port() -> Result<u16, ClusterError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Find the directory holding `initdb` and `pg_ctl`.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PGTRAIL_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::NotFound)
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(ClusterError::NotFound)
}
