//! A CA and a server certificate for `localhost`, made for one run of the torture suite
//! (`--tls`) or the benchmark (the decode suite over verify-full TLS).

/// PEM texts.
pub struct TestPki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
}

/// A new CA, and a certificate for `localhost` it signed.
pub fn localhost() -> Result<TestPki, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pgtrail-torture CA");
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().map_err(e)?;
    let server = CertificateParams::new(vec!["localhost".to_string()]).map_err(e)?;
    let server_cert = server.signed_by(&server_key, &issuer).map_err(e)?;
    Ok(TestPki {
        ca: ca.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
    })
}
