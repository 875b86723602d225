//! Each side's TLS identity (certificate chain and key, read from PEM files) and the rustls
//! configurations built from it: TLS 1.3 only, a client certificate required, secrets
//! extractable (pagewire seals records itself), no session tickets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{Error, Result};

/// Paths of one side's TLS material, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This side's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) the peer's chain must lead to.
    pub ca: PathBuf,
}

/// Loaded TLS material.
#[derive(Debug)]
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: RootCertStore,
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::io(format!("reading the TLS {what} {}", path.display()), e))
}

impl TlsFiles {
    /// Reads and parses the three files; every problem names the file.
    pub fn load(&self) -> Result<TlsIdentity> {
        let certs = |path: &Path, what: &str| -> Result<Vec<CertificateDer<'static>>> {
            let pem = read_pem(path, what)?;
            let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::io(format!("parsing the TLS {what} {}", path.display()), e))?;
            if certs.is_empty() {
                return Err(Error::TlsConfig(format!(
                    "{} holds no PEM certificate (expected the {what})",
                    path.display()
                )));
            }
            Ok(certs)
        };
        let chain = certs(&self.cert, "certificate")?;
        let ca = certs(&self.ca, "CA certificate")?;
        let pem = read_pem(&self.key, "private key")?;
        let key = rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|e| {
                Error::io(
                    format!("parsing the TLS private key {}", self.key.display()),
                    e,
                )
            })?
            .ok_or_else(|| {
                Error::TlsConfig(format!("{} holds no PEM private key", self.key.display()))
            })?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| {
                Error::TlsConfig(format!(
                    "{} is not a usable CA certificate: {e}",
                    self.ca.display()
                ))
            })?;
        }
        Ok(TlsIdentity { chain, key, roots })
    }
}

/// aws-lc-rs (or ring), offering TLS 1.3 suites in the order pagewire prefers: AES-128-GCM first (fewer AES
/// rounds than AES-256, so more bytes per core with AES-NI), then AES-256-GCM, then
/// ChaCha20-Poly1305 for CPUs without AES instructions.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[cfg(feature = "aws-lc-rs")]
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn config_error(e: rustls::Error) -> Error {
    let hint = match e {
        rustls::Error::InconsistentKeys(_) => " (the private key does not match the certificate)",
        _ => "",
    };
    Error::TlsConfig(format!("{e}{hint}"))
}

/// A sender's TLS set-up: identity, trusted CA, and the name the receiver must have.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// The host part of `host:port` or `[v6]:port`: the name a receiver's certificate must carry
/// when the sender is not told another (QEMU's `tls-hostname` defaults the same way).
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, _)) => host,
        None => addr,
    }
}

impl TlsClient {
    /// The rustls configuration pagewire built (for tools that run rustls beside it).
    pub fn rustls_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The name the receiver's certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// Builds the client side; `hostname` is checked against the receiver's certificate.
    pub fn new(identity: TlsIdentity, hostname: &str) -> Result<Self> {
        let server_name = ServerName::try_from(hostname.to_string())
            .map_err(|_| Error::TlsConfig(format!("{hostname:?} is not a valid TLS host name")))?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_root_certificates(identity.roots)
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(config_error)?;
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// A receiver's TLS set-up: identity and the CA client certificates must lead to.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

impl TlsServer {
    /// The rustls configuration pagewire built (for tools that run rustls beside it).
    pub fn rustls_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Builds the server side, requiring a client certificate from `identity`'s CA.
    pub fn new(identity: TlsIdentity) -> Result<Self> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(identity.roots), provider())
                .build()
                .map_err(|e| Error::TlsConfig(format!("client certificate verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain, identity.key)
            .map_err(config_error)?;
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }
}
