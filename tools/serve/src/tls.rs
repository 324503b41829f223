//! HTTPS: rustls on the ring provider (the same rustls and provider as the capture's TLS to
//! PostgreSQL, so no second crypto library enters the tree), HTTP/1.1 only.
//!
//! Handshakes run in tasks of their own, never in the accept loop: a client that opens a
//! connection and says nothing holds one task until the handshake timeout, not the server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::ServeError;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; more connections wait in the kernel's backlog.
const HANDSHAKES_AT_ONCE: usize = 256;

/// A server configuration from a PEM certificate chain (the server's certificate first) and
/// its PEM private key (PKCS#8, PKCS#1 or SEC1). The key file must be readable by its owner
/// only, as PostgreSQL requires of `ssl_key_file`.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, ServeError> {
    let bad = |problem: String| ServeError::Tls(problem);
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            bad(format!(
                "cannot read --tls-cert {}: {e} (a PEM file of the server's certificate, then its intermediates)",
                cert.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(bad(format!(
            "--tls-cert {} holds no PEM certificate",
            cert.display()
        )));
    }
    private_file(key)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        bad(format!(
            "cannot read --tls-key {}: {e} (a PEM private key: PKCS#8, PKCS#1 or SEC1)",
            key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            bad(format!(
                "--tls-cert {} and --tls-key {} do not make a usable pair: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A key file others can read is refused: it is the server's identity.
fn private_file(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .map_err(|e| ServeError::Tls(format!("cannot read --tls-key {}: {e}", path.display())))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ServeError::Tls(format!(
            "--tls-key {} can be read by other users (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

/// Connections whose handshake is done, for axum's accept loop.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub(crate) fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (send, ready) = mpsc::channel(HANDSHAKES_AT_ONCE);
        let accepting = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), send));
        Ok(TlsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(HANDSHAKES_AT_ONCE));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning (as axum's
                // own loop does).
                tracing::debug!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                // A client that speaks plain HTTP, an unknown CA, a port scanner: its
                // connection ends here and nobody else is affected.
                Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
                Err(_) => tracing::debug!("TLS handshake with {peer}: timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended only if the listener is being dropped: nothing more
            // will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
