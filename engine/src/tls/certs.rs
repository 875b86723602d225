//! Certificates for trying pagewire's TLS (rcgen): a CA plus server and client pairs, written
//! with the file names QEMU's `tls-creds-x509` expects (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`), so one directory serves both.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::TlsFiles;
use crate::error::{Error, Result};

/// Options for [`generate`].
#[derive(Debug, Clone)]
pub struct CertOptions {
    /// DNS name (or IP address) in the server certificate; senders check it.
    pub hostname: String,
    /// Makes the *client* certificate already expired (for tests of expiry checks).
    pub client_expired: bool,
}

impl Default for CertOptions {
    fn default() -> Self {
        CertOptions {
            hostname: "localhost".into(),
            client_expired: false,
        }
    }
}

/// PEM text of a generated set.
#[derive(Debug, Clone)]
pub struct CertSet {
    /// CA certificate.
    pub ca_cert: String,
    /// CA private key (kept so more leaves can be signed).
    pub ca_key: String,
    /// Server certificate.
    pub server_cert: String,
    /// Server private key.
    pub server_key: String,
    /// Client certificate.
    pub client_cert: String,
    /// Client private key.
    pub client_key: String,
}

fn rc(e: rcgen::Error) -> Error {
    Error::TlsConfig(format!("generating certificates: {e}"))
}

fn leaf(
    name: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    expired: bool,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(sans).map_err(rc)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![usage];
    // keyEncipherment too: GnuTLS (QEMU's tls-creds-x509) refuses leaves without it, so one
    // directory serves pagewire and QEMU alike.
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    Ok(p)
}

/// Generates a fresh CA and a server and a client certificate signed by it.
pub fn generate(options: &CertOptions) -> Result<CertSet> {
    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "pagewire test CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(rc)?;

    let server_key = KeyPair::generate().map_err(rc)?;
    let server = leaf(
        "pagewire receiver",
        vec![options.hostname.clone()],
        ExtendedKeyUsagePurpose::ServerAuth,
        false,
    )?
    .signed_by(&server_key, &ca_cert, &ca_key)
    .map_err(rc)?;
    let client_key = KeyPair::generate().map_err(rc)?;
    let client = leaf(
        "pagewire sender",
        vec!["pagewire-sender".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        options.client_expired,
    )?
    .signed_by(&client_key, &ca_cert, &ca_key)
    .map_err(rc)?;
    Ok(CertSet {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    })
}

impl CertSet {
    /// Writes the set into `dir` (created if missing) with QEMU's file names; keys get mode 0600.
    /// Refuses, writing nothing, when any of the six files is already there: replacing a CA or
    /// a key breaks every peer that trusts the old one, so that is for a person to do by hand.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let files = [
            ("ca-cert.pem", &self.ca_cert, false),
            ("ca-key.pem", &self.ca_key, true),
            ("server-cert.pem", &self.server_cert, false),
            ("server-key.pem", &self.server_key, true),
            ("client-cert.pem", &self.client_cert, false),
            ("client-key.pem", &self.client_key, true),
        ];
        let present: Vec<&str> = files
            .iter()
            .map(|f| f.0)
            .filter(|name| dir.join(name).symlink_metadata().is_ok())
            .collect();
        if !present.is_empty() {
            return Err(Error::Config(format!(
                "{} already holds {}; refusing to replace certificates or keys (choose another directory, or remove them first)",
                dir.display(),
                present.join(", ")
            )));
        }
        let mut written = Vec::new();
        for (name, text, secret) in files {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join(name);
            // A key is created 0600 (and only created: a file that appeared since the check
            // above fails this open rather than being written through).
            let mode = if secret { 0o600 } else { 0o644 };
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(|e| Error::io(format!("creating {}", path.display()), e));
            let result = created.and_then(|mut file| {
                written.push(path.clone());
                file.write_all(text.as_bytes())
                    .map_err(|e| Error::io(format!("writing {}", path.display()), e))
            });
            if let Err(e) = result {
                // A half-written set would only make the next try refuse: take back what
                // this call wrote.
                for path in &written {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The receiver's files in a directory written by [`CertSet::write`].
pub fn server_files(dir: &Path) -> TlsFiles {
    files(dir, "server")
}

/// The sender's files in a directory written by [`CertSet::write`].
pub fn client_files(dir: &Path) -> TlsFiles {
    files(dir, "client")
}

fn files(dir: &Path, side: &str) -> TlsFiles {
    let p = |n: String| -> PathBuf { dir.join(n) };
    TlsFiles {
        cert: p(format!("{side}-cert.pem")),
        key: p(format!("{side}-key.pem")),
        ca: p("ca-cert.pem".into()),
    }
}
