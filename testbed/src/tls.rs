//! A freshly generated self-signed certificate and the TLS acceptor serving it.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::SimError;

/// The simulator's certificate.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// PEM text of the certificate (to trust it, e.g. as a CA bundle file).
    pub pem: String,
    /// DER bytes of the certificate.
    pub der: Vec<u8>,
    /// SHA-256 fingerprint, upper-case hex pairs joined by `:` (as Proxmox shows it).
    pub fingerprint: String,
}

/// Makes a self-signed certificate for `localhost` and `127.0.0.1` and an acceptor serving it.
pub fn self_signed() -> Result<(Certificate, TlsAcceptor), SimError> {
    let tls = |e: &dyn std::fmt::Display| SimError::Tls(e.to_string());
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| tls(&e))?;
    let der = certified.cert.der().to_vec();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(der.clone())], key)
        .map_err(|e| tls(&e))?;
    let certificate = Certificate {
        pem: certified.cert.pem(),
        fingerprint: fingerprint(&der),
        der,
    };
    Ok((certificate, TlsAcceptor::from(Arc::new(config))))
}

/// SHA-256 of DER bytes as `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
