//! One-core TLS seal rates for `pagewire-bench tls` and the matrix: the AEAD alone in cache
//! (the ceiling), pagewire's copy-and-seal-in-place path, and rustls's own `encrypt`.

use std::time::Instant;

use rustls::client::UnbufferedClientConnection;
use rustls::unbuffered::ConnectionState;
use rustls::ServerConnection;

use anyhow::{anyhow, Result};
use pagewire::pipeline::seal::{
    RecordSealer, CONTENT_APPLICATION_DATA, RECORD_BYTES_MAX, RECORD_HEADER_BYTES,
    RECORD_PLAINTEXT_BYTES_MAX,
};
use pagewire::tls::{certs, TlsClient, TlsServer};
use pagewire::GuestMemory;

/// One-core rates, in GiB of plaintext per second.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SealRates {
    /// The negotiated cipher suite.
    pub suite: String,
    /// AEAD alone, sealing one cache-resident 16 KiB record over and over: the ceiling.
    pub aead_in_cache_gib_s: f64,
    /// pagewire's path: copy each 16 KiB out of guest memory into the record in a
    /// frame-sized buffer, seal it in place.
    pub pagewire_seal_gib_s: f64,
    /// rustls's unbuffered `WriteTraffic::encrypt` of the same bytes (copied out of guest
    /// memory into a plaintext buffer first) into the same frame-sized buffer.
    pub rustls_encrypt_gib_s: f64,
}

fn fail(what: &str) -> anyhow::Error {
    anyhow!("seal benchmark: {what}")
}

/// Measures the three rates over all of region 0 of `memory`.
pub fn seal_rates(memory: &GuestMemory) -> Result<SealRates> {
    let dir = tempfile::tempdir()?;
    certs::generate(&certs::CertOptions::default())?.write(dir.path())?;
    let client = TlsClient::new(certs::client_files(dir.path()).load()?, "localhost")?;
    let server = TlsServer::new(certs::server_files(dir.path()).load()?)?;
    let mut c =
        UnbufferedClientConnection::new(client.rustls_config(), client.server_name().clone())
            .map_err(|e| fail(&e.to_string()))?;
    let mut s = ServerConnection::new(server.rustls_config()).map_err(|e| fail(&e.to_string()))?;

    // Handshake in memory: the unbuffered client against a buffered server.
    let mut incoming = vec![0u8; 1 << 16];
    let mut in_len = 0;
    let mut outgoing = vec![0u8; 1 << 16];
    let mut out_len = 0;
    for _ in 0..64 {
        let status = c.process_tls_records(&mut incoming[..in_len]);
        let discard = status.discard;
        let mut blocked = false;
        let mut done = false;
        match status.state.map_err(|e| fail(&e.to_string()))? {
            ConnectionState::EncodeTlsData(mut st) => {
                out_len += st
                    .encode(&mut outgoing[out_len..])
                    .map_err(|e| fail(&e.to_string()))?;
            }
            ConnectionState::TransmitTlsData(st) => {
                s.read_tls(&mut &outgoing[..out_len])
                    .map_err(|e| fail(&e.to_string()))?;
                s.process_new_packets().map_err(|e| fail(&e.to_string()))?;
                out_len = 0;
                st.done();
            }
            ConnectionState::BlockedHandshake => blocked = true,
            ConnectionState::WriteTraffic(_) => done = true,
            _ => return Err(fail("unexpected state")),
        }
        incoming.copy_within(discard..in_len, 0);
        in_len -= discard;
        if done && !c.is_handshaking() {
            break;
        }
        if blocked || done {
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).map_err(|e| fail(&e.to_string()))?;
            }
            incoming[in_len..in_len + buf.len()].copy_from_slice(&buf);
            in_len += buf.len();
        }
    }
    let suite = format!("{:?}", c.negotiated_cipher_suite().map(|s| s.suite()));
    let region = &memory.regions()[0];
    let total = region.len() as usize - region.len() as usize % RECORD_PLAINTEXT_BYTES_MAX;
    let gib = total as f64 / (1u64 << 30) as f64;
    // A frame-sized output buffer, filled record after record, as a shard's slot is.
    let mut out = vec![0u8; 33 * RECORD_BYTES_MAX];
    let records_per_buffer = out.len() / RECORD_BYTES_MAX;

    // rustls encrypt.
    let mut plain = vec![0u8; RECORD_PLAINTEXT_BYTES_MAX];
    let start = Instant::now();
    {
        let status = c.process_tls_records(&mut []);
        let ConnectionState::WriteTraffic(mut st) =
            status.state.map_err(|e| fail(&e.to_string()))?
        else {
            return Err(fail("not in WriteTraffic after the handshake"));
        };
        let mut at = 0;
        for (k, offset) in (0..total).step_by(RECORD_PLAINTEXT_BYTES_MAX).enumerate() {
            if k % records_per_buffer == 0 {
                at = 0;
            }
            region.read(offset as u64, &mut plain);
            at += st
                .encrypt(&plain, &mut out[at..])
                .map_err(|e| fail(&e.to_string()))?;
        }
    }
    let rustls = gib / start.elapsed().as_secs_f64();

    // pagewire: the sealer on the same connection's keys.
    let secrets = c
        .dangerous_into_kernel_connection()
        .map_err(|e| fail(&e.to_string()))?
        .0;
    let mut sealer =
        RecordSealer::new(&secrets.tx.1, secrets.tx.0).map_err(|e| fail(&e.to_string()))?;
    let start = Instant::now();
    let mut at = 0;
    for (k, offset) in (0..total).step_by(RECORD_PLAINTEXT_BYTES_MAX).enumerate() {
        if k % records_per_buffer == 0 {
            at = 0;
        }
        let record = &mut out[at..];
        region.read(
            offset as u64,
            &mut record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + RECORD_PLAINTEXT_BYTES_MAX],
        );
        at += sealer
            .seal_in_place(record, RECORD_PLAINTEXT_BYTES_MAX, CONTENT_APPLICATION_DATA)
            .map_err(|e| fail(&e.to_string()))?;
    }
    let ours = gib / start.elapsed().as_secs_f64();

    // The AEAD alone, in cache.
    let start = Instant::now();
    for _ in (0..total).step_by(RECORD_PLAINTEXT_BYTES_MAX) {
        sealer
            .seal_in_place(
                &mut out[..RECORD_BYTES_MAX],
                RECORD_PLAINTEXT_BYTES_MAX,
                CONTENT_APPLICATION_DATA,
            )
            .map_err(|e| fail(&e.to_string()))?;
    }
    let aead = gib / start.elapsed().as_secs_f64();
    Ok(SealRates {
        suite,
        aead_in_cache_gib_s: aead,
        pagewire_seal_gib_s: ours,
        rustls_encrypt_gib_s: rustls,
    })
}
