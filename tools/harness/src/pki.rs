//! A CA and what it signed, made for one run: the torture suite (`--tls`), the benchmark (the
//! decode suite over verify-full TLS) and the connection tests (`tools/tests/connecting.rs`)
//! include this one file.

/// PEM texts.
pub struct TestPki {
    pub ca: String,
    /// For `localhost` only (connecting to 127.0.0.1 is then a wrong name).
    pub server_cert: String,
    pub server_key: String,
    /// For the role `certuser` (PostgreSQL's `cert` method checks the common name).
    #[allow(
        dead_code,
        reason = "the connection tests use it; the harness binaries do not"
    )]
    pub client_cert: String,
    #[allow(
        dead_code,
        reason = "the connection tests use it; the harness binaries do not"
    )]
    pub client_key: String,
    /// Another certificate and key for `localhost` from the same CA: a rotation.
    #[allow(
        dead_code,
        reason = "the torture suite's TLS faults use it; the others do not"
    )]
    pub rotated: (String, String),
    /// A certificate from the same CA for another name: a handshake verify-full refuses.
    #[allow(
        dead_code,
        reason = "the torture suite's TLS faults use it; the others do not"
    )]
    pub wrong_name: (String, String),
}

/// A new CA named `ca_name`, and a server and a client certificate it signed.
pub fn make(ca_name: &str) -> Result<TestPki, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let signed = |names: Vec<String>, common_name: &str| -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(e)?;
        let mut params = CertificateParams::new(names).map_err(e)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &issuer).map_err(e)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = signed(vec!["localhost".to_string()], "localhost")?;
    let (client_cert, client_key) = signed(Vec::new(), "certuser")?;
    Ok(TestPki {
        ca: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        rotated: signed(vec!["localhost".to_string()], "localhost")?,
        wrong_name: signed(vec!["wrong.invalid".to_string()], "wrong.invalid")?,
    })
}
