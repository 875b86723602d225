//! One connection's handshakes on the receiver's side: TLS or the pre-shared key's challenge,
//! then the hello, checked against the session the first channel settled.

use crate::auth::Psk;
use crate::config::HINT_RECEIVER_TLS;
use crate::error::{Error, Result};
use crate::limits::{HANDSHAKE_TIMEOUT_MS, HELLO_BYTES, SESSION_SETTLE_MS};
use crate::protocol::handshake::{Acceptor, Hello, Refusal, Reply, FEATURE_PSK};
use crate::protocol::PROTOCOL_VERSION;
use crate::shard::recv::TlsRx;
use crate::stream::Stream;
use crate::tls::{server_handshake, TlsServer, TlsSession};
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One accepted channel, ready for its shard.
pub(super) struct Accepted {
    pub(super) stream: Stream,
    pub(super) peer: usize,
    pub(super) tls: Option<TlsRx>,
    /// The sender's frames carry page checksums (plaintext without
    /// [`FEATURE_UNCHECKED_PAGES`](crate::protocol::handshake::FEATURE_UNCHECKED_PAGES)).
    pub(super) page_checksums: bool,
}

pub(super) type SharedAcceptor = Mutex<(Acceptor, u64)>;

pub(super) fn lock(acceptor: &SharedAcceptor) -> std::sync::MutexGuard<'_, (Acceptor, u64)> {
    acceptor.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a receiver authenticates senders.
#[derive(Clone, Copy)]
pub(super) struct Auth<'a> {
    pub(super) tls: Option<&'a TlsServer>,
    pub(super) psk: Option<&'a Psk>,
}

/// A channel whose handshake succeeded: its hello, connection, TLS state, and the generation of
/// the session it joined.
pub(super) type Joined = (Hello, Stream, Option<TlsSession>, u64);

/// Runs one connection's handshakes: TLS when configured (after checking the peer speaks it),
/// then the hello. A refusal is answered and returned as the error. `joined` gets the
/// generation of the session the hello joined: a handshake that fails after that (answering
/// it failed: the connection was reset) has taken its channel index there, so the accept loop
/// must drop the session, or every later sender would be refused.
pub(super) fn handshake(
    stream: Stream,
    peer: &str,
    acceptor: &SharedAcceptor,
    auth: Auth<'_>,
    index: u16,
    idle_timeout_ms: u32,
    joined: &mut Option<u64>,
) -> Result<Joined> {
    let tls = auth.tls;
    stream.configure()?;
    let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| Error::io("setting handshake timeouts", e))?;
    let plain_reply = |refusal: Option<Refusal>| {
        let r = Reply {
            version: PROTOCOL_VERSION,
            refusal,
            idle_timeout_ms: 0,
        };
        (&stream).write_all(&r.encode())
    };
    // The first byte tells TLS (a handshake record, 0x16) from plaintext pagewire ('P').
    let mut first = [0u8; 1];
    let peeked = stream
        .peek(&mut first)
        .map_err(|e| Error::io(format!("reading the handshake from {peer}"), e))?;
    if peeked == 0 {
        return Err(Error::PeerClosed {
            channel: index,
            when: "before its handshake",
        });
    }
    let mut session = None;
    let hello = match tls {
        Some(tls) => {
            if first[0] == b'P' {
                let _ = plain_reply(Some(Refusal::TlsRequired));
                return Err(Error::TlsMismatch(format!(
                    "the sender at {peer} speaks plaintext pagewire, but this receiver requires TLS"
                )));
            }
            let mut s = server_handshake(&stream, tls, index)?;
            let plain = s.read_message(&stream, index)?;
            let hello = Hello::decode(&plain).map_err(|source| Error::BadHello {
                peer: peer.to_string(),
                source,
            });
            session = Some(s);
            hello
        }
        None => {
            if first[0] == 0x16 {
                let _ = plain_reply(Some(Refusal::Malformed));
                return Err(Error::TlsMismatch(format!(
                    "the sender at {peer} started a TLS handshake, but this receiver runs without TLS \
                     (give the receiver a TLS identity: {HINT_RECEIVER_TLS})"
                )));
            }
            read_plain_hello(&stream, peer)
        }
    };
    let reply = |session: &mut Option<TlsSession>, refusal: Option<Refusal>| -> Result<()> {
        let r = Reply {
            version: PROTOCOL_VERSION,
            refusal,
            idle_timeout_ms: if refusal.is_none() {
                idle_timeout_ms
            } else {
                0
            },
        }
        .encode();
        match session {
            Some(s) => s.write_message(&stream, &r),
            None => (&stream)
                .write_all(&r)
                .map_err(|e| Error::io(format!("answering the handshake of {peer}"), e)),
        }
    };
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            let _ = reply(&mut session, Some(Refusal::Malformed));
            return Err(e);
        }
    };
    // Without TLS, a pre-shared key: the sender must prove it holds it before anything else.
    if session.is_none() {
        let offered = hello.features & FEATURE_PSK != 0;
        let refuse = |refusal| {
            let _ = plain_reply(Some(refusal));
            Err(Error::Refused {
                channel: hello.channel_index,
                refusal,
            })
        };
        match (auth.psk, offered) {
            (Some(psk), true) => match psk_challenge(&stream, &hello, psk)? {
                Some(s) => session = Some(s),
                None => return refuse(Refusal::PskMismatch),
            },
            (Some(_), false) => return refuse(Refusal::PskRequired),
            (None, true) => return refuse(Refusal::PskUnsupported),
            (None, false) => {}
        }
    }
    let generation = match check_settled(acceptor, &hello) {
        Ok(generation) => {
            *joined = Some(generation);
            generation
        }
        Err(refusal) => {
            let _ = reply(&mut session, Some(refusal));
            return Err(Error::Refused {
                channel: hello.channel_index,
                refusal,
            });
        }
    };
    reply(&mut session, None)?;
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|e| Error::io("clearing handshake timeouts", e))?;
    Ok((hello, stream, session, generation))
}

/// Checks `hello` against the session being gathered; on success, the generation of the
/// session it joined (read under the same lock, so the accept loop can tell a channel of a
/// session it dropped meanwhile). A hello of another session waits up to
/// `SESSION_SETTLE_MS` before it is refused: the session being gathered may be one whose
/// sender just gave up, which the accept loop drops within a wait slice of seeing its closed
/// channel, and the new sender must then be served, not refused for arriving first.
fn check_settled(acceptor: &SharedAcceptor, hello: &Hello) -> std::result::Result<u64, Refusal> {
    let started = Instant::now();
    loop {
        let mut a = lock(acceptor);
        match a.0.check(hello) {
            Ok(()) => return Ok(a.1),
            Err(Refusal::SessionMismatch)
                if started.elapsed() < Duration::from_millis(SESSION_SETTLE_MS) =>
            {
                drop(a);
                std::thread::sleep(Duration::from_millis(SESSION_SETTLE_MS / 20));
            }
            Err(refusal) => return Err(refusal),
        }
    }
}

/// The receiver's side of the pre-shared-key handshake: a challenge, the sender's proof.
/// Returns the channel's record state, or `None` when the proof is wrong.
fn psk_challenge(stream: &Stream, hello: &Hello, psk: &Psk) -> Result<Option<TlsSession>> {
    let bytes = hello.encode();
    let (challenge, nonce) = psk.challenge(&bytes);
    (&*stream)
        .write_all(&challenge)
        .map_err(|e| Error::io("sending the key challenge", e))?;
    let mut proof = [0u8; crate::auth::PROOF_BYTES];
    (&*stream)
        .read_exact(&mut proof)
        .map_err(|e| Error::io("reading the sender's key proof", e))?;
    if !psk.check_proof(&bytes, &nonce, &proof) {
        return Ok(None);
    }
    // This side sends what the sender receives, and the other way round.
    let (to_us, to_them) = psk.traffic(&bytes, &nonce);
    Ok(Some(crate::tls::psk_session(to_them, to_us, Vec::new())?))
}

/// Reads a plaintext hello, failing fast on a peer that is clearly not pagewire.
fn read_plain_hello(stream: &Stream, peer: &str) -> Result<Hello> {
    let mut buf = [0u8; HELLO_BYTES];
    let mut got = 0;
    while got < HELLO_BYTES {
        match (&*stream).read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => {
                got += k;
                if got >= 8
                    && Hello::decode(&buf[..got]).is_err_and(|e| {
                        matches!(e, crate::protocol::ProtocolError::BadMagic { .. })
                    })
                {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::io(format!("reading the handshake from {peer}"), e));
            }
        }
    }
    Hello::decode(&buf[..got]).map_err(|source| Error::BadHello {
        peer: peer.to_string(),
        source,
    })
}
