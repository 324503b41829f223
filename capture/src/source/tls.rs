//! TLS for both source connections, with libpq's `sslmode` semantics, on rustls with the
//! `ring` provider (one TLS stack and one crypto provider in the build: `cargo tree -i
//! aws-lc-rs` finds nothing).
//!
//! | sslmode | TLS | chain checked | name checked |
//! |---|---|---|---|
//! | disable | never | | |
//! | allow | only if the server refuses plaintext | if a root certificate file exists | |
//! | prefer | if the server offers it, else plaintext | if a root certificate file exists | |
//! | require | always | if a root certificate file exists (libpq's compatibility rule) | |
//! | verify-ca | always | yes | |
//! | verify-full | always | yes | yes |
//!
//! The SQL connection (tokio-postgres) and the replication connection (pgtrail's own) take
//! the same [`TlsPolicy`], so they cannot differ.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conninfo::{ConnInfo, ConnInfoError, Host, RootCert, SslMode};

/// How a connection's TLS is set up, decided once from the settings.
#[derive(Clone)]
pub struct TlsPolicy {
    pub mode: SslMode,
    /// `None` for `disable`, and for a Unix socket (libpq never uses TLS there).
    config: Option<Arc<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
    /// What the policy checks, for the security line.
    pub verifies_chain: bool,
    pub verifies_name: bool,
}

impl std::fmt::Debug for TlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPolicy")
            .field("mode", &self.mode)
            .field("verifies_chain", &self.verifies_chain)
            .field("verifies_name", &self.verifies_name)
            .finish()
    }
}

/// How a connection attempt failed, as the order of attempts needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The TLS handshake failed.
    Handshake,
    /// The server refused the connection after a TLS handshake.
    RefusedOverTls,
    /// The server refused the connection in plaintext.
    Refused,
    /// Anything else (the network): no other attempt.
    Other,
}

/// The words for what a verification checked, shared by every line that reports it.
pub fn verification_words(chain: bool, name: bool) -> &'static str {
    match (chain, name) {
        (true, true) => "server verified (certificate chain and host name)",
        (true, false) => "server certificate chain verified, host name not checked",
        _ => "server NOT verified",
    }
}

/// What a TLS handshake established, for the security line and `pgtrail status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFacts {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: String,
    pub cipher: String,
    pub verified_chain: bool,
    pub verified_name: bool,
    /// `tls-server-end-point` data, when the certificate's signature algorithm allows it.
    pub channel_binding_data: Option<Vec<u8>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsPolicy {
    /// The policy the settings ask for; files (roots, client certificate) are read here, so a
    /// missing or unreadable one is reported before any connection is tried.
    pub fn new(info: &ConnInfo) -> Result<TlsPolicy, ConnInfoError> {
        let bad = |problem: String| ConnInfoError { problem };
        let tcp_name = match &info.host {
            Host::Tcp(name) => name.clone(),
            Host::Socket(_) => {
                return Ok(TlsPolicy {
                    mode: SslMode::Disable,
                    config: None,
                    server_name: None,
                    verifies_chain: false,
                    verifies_name: false,
                });
            }
        };
        if info.sslmode == SslMode::Disable {
            return Ok(TlsPolicy {
                mode: SslMode::Disable,
                config: None,
                server_name: None,
                verifies_chain: false,
                verifies_name: false,
            });
        }
        let provider = provider();
        let roots = match &info.sslrootcert {
            None => None,
            Some(RootCert::File(path)) => {
                let mut store = RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        bad(format!(
                            "could not read root certificate file \"{}\": {e}",
                            path.display()
                        ))
                    })?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(bad(format!(
                        "root certificate file \"{}\" holds no usable certificate (PEM expected)",
                        path.display()
                    )));
                }
                Some(store)
            }
            Some(RootCert::System) => {
                let loaded = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(loaded.certs);
                if store.is_empty() {
                    return Err(bad(
                        "sslrootcert=system: the system has no trusted root certificates (install ca-certificates, or set SSL_CERT_FILE)"
                            .into(),
                    ));
                }
                Some(store)
            }
        };
        let (verifier, verifies_chain, verifies_name): (Arc<dyn ServerCertVerifier>, bool, bool) =
            match roots {
                Some(store) => {
                    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                        Arc::new(store),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| bad(format!("cannot use the root certificates: {e}")))?;
                    if info.sslmode == SslMode::VerifyFull {
                        (webpki, true, true)
                    } else {
                        (Arc::new(ChainOnly(webpki)), true, false)
                    }
                }
                None => (Arc::new(NotVerified(provider.clone())), false, false),
            };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &info.client_cert {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        bad(format!(
                            "could not read certificate file \"{}\": {e}",
                            cert.display()
                        ))
                    })?;
                if chain.is_empty() {
                    return Err(bad(format!(
                        "certificate file \"{}\" holds no PEM certificate (sslcert is the client's certificate, PEM)",
                        cert.display()
                    )));
                }
                check_key_permissions(key)?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    bad(format!(
                        "could not load private key file \"{}\": {e}",
                        key.display()
                    ))
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| bad(format!("client certificate: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = info.sslsni;
        let server_name = ServerName::try_from(tcp_name.clone())
            .map_err(|_| bad(format!("\"{tcp_name}\" is not a valid host name for TLS")))?;
        Ok(TlsPolicy {
            mode: info.sslmode,
            config: Some(Arc::new(config)),
            server_name: Some(server_name),
            verifies_chain,
            verifies_name,
        })
    }

    /// Connect in libpq's order of attempts for the sslmode, the one place both connections
    /// take it from. `attempt(true)` asks for TLS (under `allow`/`prefer` a server that
    /// declines is then used in plaintext), `attempt(false)` does not ask; `failure` says how
    /// an attempt failed. `allow` asks for TLS after a refusal in plaintext; `prefer` tries
    /// plaintext after a failed handshake or a refusal over TLS (a server that declined TLS
    /// was already tried in plaintext); the other modes make one attempt.
    pub async fn connect_in_order<T, E, Fut>(
        &self,
        attempt: impl Fn(bool) -> Fut,
        failure: impl Fn(&E) -> AttemptFailure,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        use AttemptFailure::*;
        if !self.uses_tls() {
            return attempt(false).await;
        }
        match self.mode {
            SslMode::Allow => match attempt(false).await {
                Err(e) if matches!(failure(&e), Refused | RefusedOverTls) => attempt(true).await,
                other => other,
            },
            SslMode::Prefer => match attempt(true).await {
                Err(e) if matches!(failure(&e), Handshake | RefusedOverTls) => attempt(false).await,
                other => other,
            },
            _ => attempt(true).await,
        }
    }

    /// Whether a TLS attempt is made at all.
    pub fn uses_tls(&self) -> bool {
        self.config.is_some()
    }

    /// The TLS handshake over `stream` (after the server accepted SSLRequest).
    pub async fn handshake<S>(
        &self,
        stream: S,
    ) -> Result<(tokio_rustls::client::TlsStream<S>, TlsFacts), io::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (Some(config), Some(name)) = (&self.config, &self.server_name) else {
            return Err(io::Error::other("TLS is disabled for this connection"));
        };
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let tls = connector.connect(name.clone(), stream).await?;
        let (_, session) = tls.get_ref();
        let facts = TlsFacts {
            version: session
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("TLS")
                .replace("TLSv1_", "TLSv1."),
            cipher: session
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or_default()
                .to_string(),
            verified_chain: self.verifies_chain,
            verified_name: self.verifies_name,
            channel_binding_data: session
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| tls_server_end_point(leaf)),
        };
        Ok((tls, facts))
    }
}

/// libpq refuses a private key that others may read (0600, or 0640 when owned by root).
fn check_key_permissions(key: &std::path::Path) -> Result<(), ConnInfoError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(key).map_err(|e| ConnInfoError {
        problem: format!(
            "certificate present, but not private key file \"{}\" ({e})",
            key.display()
        ),
    })?;
    let mode = meta.permissions().mode();
    let too_open = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(ConnInfoError {
            problem: format!(
                "private key file \"{}\" has group or world access; file must have permissions u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
                key.display()
            ),
        });
    }
    Ok(())
}

/// The `tls-server-end-point` channel binding (RFC 5929): the hash of the server's
/// certificate with its signature's hash (SHA-256 for MD5 and SHA-1). `None` when the
/// algorithm has no such hash (Ed25519, RSA-PSS), as in PostgreSQL.
pub fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    let (_, certificate, _) = der(cert)?;
    let (_, _tbs, rest) = der(certificate)?;
    let (_, algorithm, _) = der(rest)?;
    let (tag, oid, _) = der(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    enum Hash {
        Sha256,
        Sha384,
        Sha512,
    }
    let hash = match oid {
        o if o == ECDSA_SHA1 => Hash::Sha256,
        [prefix @ .., last] if prefix == RSA => match last {
            0x04 | 0x05 | 0x0b => Hash::Sha256,
            0x0c => Hash::Sha384,
            0x0d => Hash::Sha512,
            _ => return None,
        },
        [prefix @ .., last] if prefix == ECDSA_SHA2 => match last {
            0x02 => Hash::Sha256,
            0x03 => Hash::Sha384,
            0x04 => Hash::Sha512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match hash {
        Hash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// verify-ca (and require with a root certificate): the chain must lead to a trusted root,
/// the name is not checked. webpki checks the chain before the name, so a name error means
/// the chain passed.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require without a root certificate: encryption without authentication, as
/// libpq. The handshake's signatures are still checked against the presented certificate.
#[derive(Debug)]
struct NotVerified(Arc<CryptoProvider>);

impl ServerCertVerifier for NotVerified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The policy as tokio-postgres's TLS connector; what the handshake established is kept in
/// `facts` for the caller.
#[derive(Clone)]
pub struct PostgresTls {
    pub policy: TlsPolicy,
    pub facts: Arc<Mutex<Option<TlsFacts>>>,
}

/// A TLS handshake failure, told apart from the server's errors (libpq's `prefer` retries
/// without TLS after it).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {0}")]
pub struct HandshakeError(pub io::Error);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type TlsConnect = PostgresTls;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<PostgresTls, io::Error> {
        Ok(self.clone())
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<PostgresTlsStream<S>, HandshakeError>> + Send>,
    >;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let (tls, facts) = self
                .policy
                .handshake(stream)
                .await
                .map_err(HandshakeError)?;
            let binding = facts.channel_binding_data.clone();
            if let Ok(mut slot) = self.facts.lock() {
                *slot = Some(facts);
            }
            Ok(PostgresTlsStream { tls, binding })
        })
    }
}

/// A TLS stream as tokio-postgres takes it: with its channel binding data.
pub struct PostgresTlsStream<S> {
    tls: tokio_rustls::client::TlsStream<S>,
    binding: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PostgresTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.binding {
            Some(data) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(data.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PostgresTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PostgresTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_are_read_in_short_and_long_form() {
        assert_eq!(
            der(&[0x30, 0x01, 0xaa, 0xbb]),
            Some((0x30, &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        assert_eq!(
            der(&long).map(|(t, c, r)| (t, c.len(), r.len())),
            Some((0x04, 256, 0))
        );
        assert_eq!(der(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der(&[0x30]), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }
}
