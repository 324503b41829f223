//! `pgtrail serve`: an archive's history over HTTP for people and applications, read-only.
//!
//! - a JSON API ([`api`]): tables, a row's history, changes filtered and paginated by cursor,
//!   a table as of a moment, the difference between two moments, read-only SQL with CSV,
//!   JSON and Parquet downloads;
//! - a live stream ([`stream`]): Server-Sent Events from any cursor, resumable with
//!   `Last-Event-ID`, following the capture's durable commits;
//! - a web page at `/` (embedded, no CDN) and Prometheus metrics at `/metrics`.
//!
//! Every request reads one consistent cut of the archive (one redb read transaction), beside
//! a running capture; nothing here writes to the archive or reaches the source.

mod api;
mod auth;
mod error;
mod metrics;
mod page;
mod stream;
mod tls;

#[doc(hidden)]
pub use api::fuzzing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;

pub use error::ServeError;
pub use metrics::{Exposition, MoreMetrics, serve_metrics};
pub use tls::server_config as tls_config;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub archive: PathBuf,
    pub listen: SocketAddr,
    /// The bearer token every request must carry; required for any address but loopback.
    pub token: Option<String>,
    /// The longest a request may run (SQL included) before it is cancelled.
    pub request_timeout: Duration,
    /// The memory one request's sorts, joins and aggregations may hold.
    pub request_memory: usize,
    /// The most rows one answer (or download) holds; more are cut off and the answer says so.
    pub max_rows: usize,
    /// How often a stream looks for the capture's next durable commit.
    pub stream_poll: Duration,
    /// The most streams open at once; more are refused with 503.
    pub max_streams: usize,
    /// Serve HTTPS with this configuration (see [`tls_config`]) instead of HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ServeConfig {
    pub fn new(archive: PathBuf, listen: SocketAddr) -> ServeConfig {
        ServeConfig {
            archive,
            listen,
            token: None,
            request_timeout: Duration::from_secs(30),
            request_memory: 256 << 20,
            max_rows: 100_000,
            stream_poll: Duration::from_millis(200),
            max_streams: 1000,
            tls: None,
        }
    }
}

pub(crate) struct AppState {
    pub config: ServeConfig,
    pub metrics: metrics::Metrics,
    /// The archive's watch that every stream shares: one poll of the log, one cut per moment.
    pub watch: pgtrail_query::feed::ArchiveWatch,
}

/// Check the configuration (an address beyond loopback needs a token) and bind the
/// listener; the answer serves until `shutdown` resolves.
pub async fn bind(config: ServeConfig) -> Result<Server, ServeError> {
    if !config.listen.ip().is_loopback() && config.token.is_none() {
        return Err(ServeError::OpenWithoutToken(config.listen));
    }
    if !config.archive.join(pgtrail_store::LOG_FILE).exists() {
        return Err(ServeError::NotAnArchive(config.archive.clone()));
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    Ok(Server {
        listener,
        local,
        state: Arc::new(AppState {
            watch: pgtrail_query::feed::ArchiveWatch::new(&config.archive, config.stream_poll),
            config,
            metrics: metrics::Metrics::default(),
        }),
    })
}

/// A bound server.
pub struct Server {
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    state: Arc<AppState>,
}

impl Server {
    /// The address it listens on (the port the system chose for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.state.config.tls.is_some()
    }

    /// Serve until `shutdown` resolves; open streams end then.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let tls = self.state.config.tls.clone();
        let app = router(self.state);
        match tls {
            None => axum::serve(self.listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(ServeError::Serve),
            Some(config) => {
                let listener =
                    tls::TlsListener::new(self.listener, config).map_err(ServeError::Serve)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .map_err(ServeError::Serve)
            }
        }
    }
}

fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/tables", get(api::tables))
        .route("/api/tables/{table}/history", get(api::history))
        .route("/api/tables/{table}/as_of", get(api::as_of))
        .route("/api/tables/{table}/diff", get(api::diff))
        .route("/api/changes", get(api::changes))
        .route("/api/sql", get(api::sql))
        .route("/api/stream", get(stream::stream))
        .route("/metrics", get(metrics::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/app.css", get(page::style))
        .merge(api)
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::record,
        ))
        .with_state(state)
}
