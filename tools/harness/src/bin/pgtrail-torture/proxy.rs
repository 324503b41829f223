//! A TCP proxy between the capture and PostgreSQL that breaks connections on request: a reset
//! (RST), a close in the middle of a frame the server was sending (part of a chunk forwarded,
//! then FIN), and a black hole (the connections stay open and nothing passes either way, no
//! FIN, no RST, as when a middlebox forgets a connection). Connections opened after a fault
//! pass normally, so the capture can recover by reconnecting.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the connections open when it is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    Pass,
    /// Both sides reset at once.
    Reset,
    /// The server's next chunk is forwarded in part, then both sides are closed (FIN).
    CloseMidFrame,
    /// Nothing passes either way any more, and nothing is closed.
    BlackHole,
    /// A black hole for replication connections only: the capture's SQL connection still
    /// works, so it must tell from the server's view of its walsender that the stream is dead.
    BlackHoleReplication,
}

/// What the proxy knows of one connection.
#[derive(Default)]
struct Link {
    /// The replication stream (from its startup message, or marked by the server's view).
    replication: std::sync::atomic::AtomicBool,
    /// The local port of the proxy's connection to the server: the walsender's `client_port`.
    upstream_port: std::sync::atomic::AtomicU16,
}

/// The open connections: each one's cut signal and what is known of it.
type OpenConnections = Arc<Mutex<Vec<(watch::Sender<Cut>, Arc<Link>)>>>;

pub struct Proxy {
    pub port: u16,
    open: OpenConnections,
    upstream: Arc<Mutex<SocketAddr>>,
    /// Owns the listener and every connection; dropping the proxy closes them all.
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Proxy, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let open: OpenConnections = Arc::default();
        let registry = open.clone();
        let upstream = Arc::new(Mutex::new(upstream));
        let target = upstream.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (tx, rx) = watch::channel(Cut::Pass);
                let link = Arc::new(Link::default());
                registry
                    .lock()
                    .expect("proxy registry")
                    .push((tx, link.clone()));
                let to = *target.lock().expect("proxy upstream");
                tokio::spawn(forward(client, to, rx, link));
            }
        });
        Ok(Proxy {
            port,
            open,
            upstream,
            _runtime: runtime,
        })
    }

    /// Send connections opened from now on to another server (the same URL, another cluster).
    pub fn set_upstream(&self, to: SocketAddr) {
        *self.upstream.lock().expect("proxy upstream") = to;
    }

    /// Mark the connections whose server side has one of `ports` (walsenders' `client_port`)
    /// as replication streams: over TLS their startup message cannot be read.
    pub fn mark_replication(&self, ports: &[u16]) {
        for (_, link) in self.open.lock().expect("proxy registry").iter() {
            if ports.contains(
                &link
                    .upstream_port
                    .load(std::sync::atomic::Ordering::Relaxed),
            ) {
                link.replication
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Apply `cut` to every connection open now; later ones are not affected.
    pub fn cut(&self, cut: Cut) -> usize {
        let mut registry = self.open.lock().expect("proxy registry");
        let open: Vec<_> = std::mem::take(&mut *registry);
        let mut n = 0;
        for (tx, link) in open {
            let hit = cut != Cut::BlackHoleReplication
                || link.replication.load(std::sync::atomic::Ordering::Relaxed);
            if !hit {
                // Not affected: it stays open to later cuts.
                if !tx.is_closed() {
                    registry.push((tx, link));
                }
                continue;
            }
            if tx.send(cut).is_ok() {
                n += 1;
            }
        }
        n
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<Cut>,
    link: Arc<Link>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    if let Ok(local) = server.local_addr() {
        link.upstream_port
            .store(local.port(), std::sync::atomic::Ordering::Relaxed);
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // The startup message names a replication connection (`replication` = `database`).
    let mut first = vec![0u8; 8192];
    let Ok(n) = client.read(&mut first).await else {
        return;
    };
    if first[..n].windows(12).any(|w| w == b"replication\0") {
        link.replication
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if server.write_all(&first[..n]).await.is_err() {
        return;
    }
    let what = loop {
        tokio::select! {
            // Bytes in flight inside the copy when a cut arrives are lost, as on a real network.
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
            changed = cut.changed() => {
                if changed.is_err() {
                    // The proxy is going away; its runtime ends every connection.
                    std::future::pending::<()>().await;
                }
                match *cut.borrow_and_update() {
                    Cut::Pass => continue,
                    other => break other,
                }
            }
        }
    };
    match what {
        Cut::Pass => {}
        Cut::Reset => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
        Cut::CloseMidFrame => {
            let mut buf = vec![0u8; 64 * 1024];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(2), server.read(&mut buf))
                    .await;
            if let Ok(Ok(n)) = read
                && n > 1
            {
                // Part of the server's next chunk (inside a frame unless frames are 1 byte).
                let _ = client.write_all(&buf[..n / 2]).await;
            }
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
        Cut::BlackHole | Cut::BlackHoleReplication => {
            // Nothing passes and nothing is closed: hold both sockets until the proxy ends.
            let _keep = (client, server);
            std::future::pending::<()>().await;
        }
    }
}
