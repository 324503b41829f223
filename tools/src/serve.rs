//! `pgtrail serve`: the history over HTTP (see the pgtrail-serve crate).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Archive directory (a capture may be writing it).
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// Address to listen on. Anything but loopback needs --token-file.
    #[arg(long, default_value = "127.0.0.1:8432")]
    pub listen: SocketAddr,
    /// A file holding the bearer token every API request must send
    /// (`Authorization: Bearer …`); readable by its owner only.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Seconds a request (SQL included) may run before it is cancelled.
    #[arg(long, default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// MiB one request's sorts, joins and aggregations may hold.
    #[arg(long, default_value_t = 256)]
    pub request_memory_mb: usize,
    /// Rows at most in one answer or download.
    #[arg(long, default_value_t = 100_000)]
    pub max_rows: usize,
    /// Serve HTTPS with this PEM certificate chain (the server's certificate first).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert; readable by its owner only.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Streams (/api/stream) open at once at most.
    #[arg(long, default_value_t = 1000)]
    pub max_streams: usize,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = pgtrail_serve::ServeConfig::new(args.archive, args.listen);
    if let Some(path) = &args.token_file {
        config.token = Some(read_token(path)?);
    }
    config.request_timeout = Duration::from_secs(args.request_timeout_secs.max(1));
    config.request_memory = args.request_memory_mb.max(16) << 20;
    config.max_rows = args.max_rows.max(1);
    config.max_streams = args.max_streams.max(1);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(pgtrail_serve::tls_config(cert, key)?);
    }
    let server = pgtrail_serve::bind(config).await?;
    eprintln!(
        "serve: {}://{}/ (API under /api, metrics at /metrics){}; Ctrl-C stops",
        if server.is_tls() { "https" } else { "http" },
        server.local_addr(),
        if args.token_file.is_some() {
            ", bearer token required"
        } else {
            ""
        }
    );
    server.run(crate::shutdown_signal()).await?;
    Ok(())
}

/// The token file's first line. A file others can read is refused: the token guards the whole
/// history.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta =
        std::fs::metadata(path).with_context(|| format!("--token-file {}", path.display()))?;
    anyhow::ensure!(
        meta.permissions().mode() & 0o077 == 0,
        "--token-file {} can be read by other users (mode {:o}); chmod 600 it",
        path.display(),
        meta.permissions().mode() & 0o777
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--token-file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        token.len() >= 16,
        "--token-file {} holds a token shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)",
        path.display()
    );
    Ok(token)
}
