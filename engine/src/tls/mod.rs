//! TLS 1.3 on every channel, mutually authenticated with X.509.
//!
//! # Where the handshake runs, and why
//! Each channel's handshake runs on its own thread *before* its shard starts (the sender connects
//! and handshakes all channels in parallel; the receiver handshakes each accepted connection on a
//! thread of its own), over the blocking socket, driven through rustls's unbuffered API. The
//! handshake is a few round trips of small messages with certificate checks: it gains nothing
//! from io_uring, and keeping it out of the shard keeps the shard's loop a single protocol phase.
//! When it completes, the connection is turned into a rustls `KernelConnection`: rustls keeps the
//! key schedule (for key updates), and pagewire takes the traffic keys and seals and opens
//! records itself ([`crate::pipeline::seal`]), straight into the shard's registered buffers.
//! The pagewire hello and reply then travel inside TLS as ordinary sealed records.
//!
//! Only TLS 1.3, only with a client certificate; the client checks the server's name
//! (`--tls-hostname`, QEMU's `tls-hostname`). Session tickets are off (one session per channel,
//! never resumed), so nothing but our own records follows the handshake.

#[cfg(any(test, feature = "certs"))]
pub mod certs;
#[cfg(feature = "aws-lc-rs")]
#[allow(unsafe_code)]
pub(crate) mod direct;
mod identity;
pub(crate) mod stream;

pub use identity::{host_of, TlsClient, TlsFiles, TlsIdentity, TlsServer};

pub(crate) use stream::{Record, RecordStream};

use crate::config::HINT_RECEIVER_TLS;
use crate::stream::Stream;
use std::io::{Read, Write};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::ConnectionState;

use crate::error::{Error, Result};
use crate::pipeline::seal::{
    alert_name, RecordOpener, RecordSealer, CONTENT_APPLICATION_DATA, RECORD_BYTES_MAX,
};

/// Bytes of buffer each direction of a handshake may use (certificate chains fit easily).
const HANDSHAKE_BUFFER_BYTES: usize = 64 * 1024;

/// Records sealed with one key before the sender rotates it with a TLS KeyUpdate. AES-GCM's
/// confidentiality limit is 2^24.5 full records (RFC 8446 §5.5); 2^24 × 16 KiB = 256 GiB per key.
pub const RECORDS_PER_KEY_MAX: u64 = 1 << 24;

/// rustls's key schedule for one connection, kept for key updates.
pub(crate) enum KeySchedule {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
    /// A pre-shared-key connection's traffic secrets (see [`crate::auth`]).
    Psk {
        tx: [u8; 32],
        rx: [u8; 32],
    },
}

impl KeySchedule {
    /// The sealer of the next sending key (after a KeyUpdate).
    pub(crate) fn next_sealer(&mut self) -> Result<RecordSealer> {
        let record = |source| Error::TlsRecord {
            channel: u16::MAX,
            source,
        };
        let (seq, secrets) = match self {
            KeySchedule::Client(k) => k.update_tx_secret(),
            KeySchedule::Server(k) => k.update_tx_secret(),
            KeySchedule::Psk { tx, .. } => {
                *tx = crate::auth::next_secret(tx);
                let (key, iv) = crate::auth::record_keys(tx);
                return RecordSealer::aes128(&key, iv, 0).map_err(record);
            }
        }
        .map_err(|e| Error::TlsConfig(format!("TLS key update: {e}")))?;
        RecordSealer::new(&secrets, seq).map_err(record)
    }

    /// The opener of the next receiving key (after the peer's KeyUpdate).
    pub(crate) fn next_opener(&mut self) -> Result<RecordOpener> {
        let record = |source| Error::TlsRecord {
            channel: u16::MAX,
            source,
        };
        let (seq, secrets) = match self {
            KeySchedule::Client(k) => k.update_rx_secret(),
            KeySchedule::Server(k) => k.update_rx_secret(),
            KeySchedule::Psk { rx, .. } => {
                *rx = crate::auth::next_secret(rx);
                let (key, iv) = crate::auth::record_keys(rx);
                return RecordOpener::aes128(&key, iv, 0).map_err(record);
            }
        }
        .map_err(|e| Error::TlsConfig(format!("TLS key update: {e}")))?;
        RecordOpener::new(&secrets, seq).map_err(record)
    }
}

/// The record state of a pre-shared-key connection: `tx` and `rx` are this side's sending and
/// receiving traffic secrets.
pub(crate) fn psk_session(tx: [u8; 32], rx: [u8; 32], leftover: Vec<u8>) -> Result<TlsSession> {
    let record = |source| Error::TlsRecord {
        channel: u16::MAX,
        source,
    };
    let (tk, tiv) = crate::auth::record_keys(&tx);
    let (rk, riv) = crate::auth::record_keys(&rx);
    Ok(TlsSession::new(
        RecordSealer::aes128(&tk, tiv, 0).map_err(record)?,
        RecordOpener::aes128(&rk, riv, 0).map_err(record)?,
        KeySchedule::Psk { tx, rx },
        &leftover,
        Vec::new(),
    ))
}

/// One channel's TLS state after the handshake.
pub(crate) struct TlsSession {
    pub sealer: RecordSealer,
    /// The receiving record layer; its ciphertext sits in `buffer` until a shard takes it over
    /// (see [`RecordStream::move_to`]).
    pub stream: RecordStream,
    pub keys: KeySchedule,
    /// The record buffer of the handshake phase (ciphertext read past the handshake included).
    pub buffer: Vec<u8>,
    /// Plaintext rustls opened before the handshake was handed over (the first message).
    pub early: Vec<u8>,
}

/// Bytes of the handshake phase's record buffer: two whole records.
const SESSION_BUFFER_BYTES: usize = 2 * RECORD_BYTES_MAX;

impl TlsSession {
    fn new(
        sealer: RecordSealer,
        opener: RecordOpener,
        keys: KeySchedule,
        leftover: &[u8],
        early: Vec<u8>,
    ) -> Self {
        let mut buffer = vec![0u8; SESSION_BUFFER_BYTES.max(leftover.len())];
        buffer[..leftover.len()].copy_from_slice(leftover);
        TlsSession {
            sealer,
            stream: RecordStream::new(opener, leftover.len(), u16::MAX),
            keys,
            buffer,
            early,
        }
    }
}

fn handshake_failed(channel: u16, e: rustls::Error) -> Error {
    Error::TlsHandshake { channel, source: e }
}

/// Runs a handshake to completion on a blocking socket. Returns bytes read past the handshake.
macro_rules! drive_handshake {
    ($conn:expr, $stream:expr, $channel:expr, $plaintext_hint:expr) => {{
        let mut incoming = vec![0u8; HANDSHAKE_BUFFER_BYTES];
        let mut in_len = 0usize;
        let mut outgoing = vec![0u8; HANDSHAKE_BUFFER_BYTES];
        let mut out_len = 0usize;
        let mut early = Vec::new();
        loop {
            let status = $conn.process_tls_records(&mut incoming[..in_len]);
            let mut discard = status.discard;
            let mut need_read = false;
            let mut maybe_done = false;
            match status.state {
                Err(e) => {
                    // rustls queues a fatal alert saying why; send it so the peer can report the
                    // reason rather than a closed connection. The deframer expects the failed
                    // call's discard to be applied before it is called again.
                    incoming.copy_within(discard..in_len, 0);
                    in_len -= discard;
                    for _ in 0..4 {
                        let status = $conn.process_tls_records(&mut incoming[..in_len]);
                        let d = status.discard;
                        let more = match status.state {
                            Ok(ConnectionState::EncodeTlsData(mut st)) => {
                                if let Ok(n) = st.encode(&mut outgoing[out_len..]) {
                                    out_len += n;
                                }
                                true
                            }
                            Ok(ConnectionState::TransmitTlsData(st)) => {
                                let _ = (&*$stream).write_all(&outgoing[..out_len]);
                                out_len = 0;
                                st.done();
                                true
                            }
                            _ => false,
                        };
                        incoming.copy_within(d..in_len, 0);
                        in_len -= d;
                        if !more {
                            break;
                        }
                    }
                    if out_len > 0 {
                        let _ = (&*$stream).write_all(&outgoing[..out_len]);
                    }
                    return Err(handshake_failed($channel, e));
                }
                Ok(ConnectionState::EncodeTlsData(mut st)) => {
                    out_len += st.encode(&mut outgoing[out_len..]).map_err(|e| {
                        Error::TlsConfig(format!("encoding a handshake message: {e}"))
                    })?;
                }
                Ok(ConnectionState::TransmitTlsData(st)) => {
                    (&*$stream).write_all(&outgoing[..out_len]).map_err(|e| {
                        Error::io(
                            format!("sending the TLS handshake on channel {}", $channel),
                            e,
                        )
                    })?;
                    out_len = 0;
                    st.done();
                }
                Ok(ConnectionState::BlockedHandshake) => need_read = true,
                Ok(ConnectionState::WriteTraffic(_)) => maybe_done = true,
                // The peer's first sealed message can arrive in the same read as its Finished;
                // rustls then opens it during the handshake. Keep its plaintext for the caller
                // (the extracted sequence numbers already count it).
                Ok(ConnectionState::ReadTraffic(mut st)) => {
                    while let Some(record) = st.next_record() {
                        let record = record.map_err(|e| handshake_failed($channel, e))?;
                        discard += record.discard;
                        early.extend_from_slice(record.payload);
                    }
                }
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                    return Err(Error::PeerClosed {
                        channel: $channel,
                        when: "during the TLS handshake",
                    })
                }
                Ok(_) => {
                    return Err(Error::TlsConfig(
                        "unexpected application data during the TLS handshake".into(),
                    ))
                }
            }
            if discard > 0 {
                incoming.copy_within(discard..in_len, 0);
                in_len -= discard;
            }
            if maybe_done {
                if !$conn.is_handshaking() {
                    break;
                }
                need_read = true;
            }
            if need_read {
                if in_len == incoming.len() {
                    return Err(Error::TlsConfig("TLS handshake message too large".into()));
                }
                let n = (&*$stream).read(&mut incoming[in_len..]).map_err(|e| {
                    Error::io(
                        format!("reading the TLS handshake on channel {}", $channel),
                        e,
                    )
                })?;
                if n == 0 {
                    return Err(Error::PeerClosed {
                        channel: $channel,
                        when: "during the TLS handshake",
                    });
                }
                in_len += n;
                if incoming[..in_len.min(8)] == b"PAGEWIRE"[..in_len.min(8)] && in_len >= 4 {
                    return Err(Error::TlsMismatch($plaintext_hint.to_string()));
                }
            }
        }
        incoming.truncate(in_len);
        (incoming, early)
    }};
}

fn session(
    secrets: rustls::ExtractedSecrets,
    keys: KeySchedule,
    (leftover, early): (Vec<u8>, Vec<u8>),
) -> Result<TlsSession> {
    let record = |e| Error::TlsConfig(format!("TLS record keys: {e}"));
    Ok(TlsSession::new(
        RecordSealer::new(&secrets.tx.1, secrets.tx.0).map_err(record)?,
        RecordOpener::new(&secrets.rx.1, secrets.rx.0).map_err(record)?,
        keys,
        &leftover,
        early,
    ))
}

/// The sender's side of a channel's handshake.
pub(crate) fn client_handshake(
    stream: &Stream,
    tls: &TlsClient,
    channel: u16,
) -> Result<TlsSession> {
    let mut conn = UnbufferedClientConnection::new(tls.rustls_config(), tls.server_name().clone())
        .map_err(|e| handshake_failed(channel, e))?;
    let leftover = drive_handshake!(
        conn,
        stream,
        channel,
        format!(
            "the receiver answered in plaintext: it runs without TLS (give the receiver a TLS \
             identity: {HINT_RECEIVER_TLS})"
        )
    );
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| handshake_failed(channel, e))?;
    session(secrets, KeySchedule::Client(kernel), leftover)
}

/// The receiver's side of a channel's handshake.
pub(crate) fn server_handshake(
    stream: &Stream,
    tls: &TlsServer,
    channel: u16,
) -> Result<TlsSession> {
    let mut conn = UnbufferedServerConnection::new(tls.rustls_config())
        .map_err(|e| handshake_failed(channel, e))?;
    let leftover = drive_handshake!(
        conn,
        stream,
        channel,
        "the sender speaks plaintext pagewire, but this receiver requires TLS"
    );
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| handshake_failed(channel, e))?;
    session(secrets, KeySchedule::Server(kernel), leftover)
}

impl TlsSession {
    /// Seals `plaintext` as one application-data record and writes it (blocking; handshake phase).
    pub(crate) fn write_message(&mut self, stream: &Stream, plaintext: &[u8]) -> Result<()> {
        let mut buf = vec![0u8; plaintext.len() + RECORD_BYTES_MAX];
        let n = self
            .sealer
            .seal(plaintext, CONTENT_APPLICATION_DATA, &mut buf)
            .map_err(|source| Error::TlsRecord {
                channel: u16::MAX,
                source,
            })?;
        (&*stream)
            .write_all(&buf[..n])
            .map_err(|e| Error::io("sending over TLS", e))
    }

    /// Reads one message (blocking; handshake phase): the plaintext of the next application
    /// data record. Alerts become errors naming the alert.
    pub(crate) fn read_message(&mut self, stream: &Stream, channel: u16) -> Result<Vec<u8>> {
        if !self.early.is_empty() {
            return Ok(std::mem::take(&mut self.early));
        }
        loop {
            match self.stream.next(&mut self.buffer, &mut self.keys)? {
                Some(Record::Data(r)) => return Ok(self.buffer[r].to_vec()),
                Some(Record::KeyUpdate { .. }) => continue,
                Some(Record::CloseNotify) => {
                    return Err(Error::PeerClosed {
                        channel,
                        when: "(TLS close_notify) before answering the handshake",
                    })
                }
                None => {}
            }
            let room = self.stream.room(&mut self.buffer, RECORD_BYTES_MAX);
            if room.is_empty() {
                return Err(Error::TlsProtocol {
                    channel,
                    what: "a record does not fit the handshake buffer".into(),
                });
            }
            let n = (&*stream)
                .read(&mut self.buffer[room])
                .map_err(|e| Error::io(format!("reading over TLS on channel {channel}"), e))?;
            if n == 0 {
                return Err(Error::PeerClosed {
                    channel,
                    when: "before answering the handshake",
                });
            }
            self.stream.received(n);
        }
    }
}

/// The error for a received alert record's plaintext.
pub(crate) fn alert_error(channel: u16, plain: &[u8]) -> Error {
    let description = plain.get(1).copied().unwrap_or(255);
    if description == 0 {
        return Error::PeerClosed {
            channel,
            when: "(TLS close_notify) before the transfer was complete",
        };
    }
    Error::TlsMismatch(format!(
        "the peer sent the TLS alert {} ({description}) on channel {channel}",
        alert_name(description)
    ))
}

#[cfg(test)]
mod tests;
