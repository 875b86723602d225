//! The channels' handshakes on the sender's side, all channels in parallel. Per channel: TLS or
//! the pre-shared key's challenge, then the hello and the receiver's reply.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Psk;
use crate::config::HINT_SENDER_TLS;
use crate::error::{Error, Result};
use crate::limits::{HANDSHAKE_TIMEOUT_MS, HANDSHAKE_WATCH_SLICE_MS};
use crate::protocol::handshake::{Hello, Reply};
use crate::shard::Abort;
use crate::stream::Stream;
use crate::tls::{client_handshake, TlsClient, TlsSession};

/// One connected, accepted channel.
pub(super) struct Connected {
    pub(super) stream: Stream,
    pub(super) tls: Option<TlsSession>,
    /// The receiver's idle bound, from its reply.
    pub(super) receiver_idle_ms: u32,
}

/// Connects all `n` channels and runs their handshakes, each on its own thread, in parallel:
/// `open(i, deadline, cancelled)` gives channel `i`'s stream, which gets the `congestion`
/// control algorithm when one is set, and `hello(i)` its hello. Each channel's connect, hello
/// and reply end within `HANDSHAKE_TIMEOUT_MS`, or as soon as `abort` is raised (a cancel).
/// One result per channel, in channel order; a handshake thread that panicked is an error, not
/// a panic here.
pub(super) fn connect_all(
    n: u16,
    hello: impl Fn(u16) -> Hello,
    (tls, psk): (Option<&TlsClient>, Option<&Psk>),
    congestion: Option<&str>,
    abort: &Arc<Abort>,
    open: impl Fn(u16, Instant, &dyn Fn() -> bool) -> Result<Stream> + Sync,
) -> Vec<Result<Connected>> {
    std::thread::scope(|scope| {
        let joins: Vec<_> = (0..n)
            .map(|i| {
                let h = hello(i);
                let open = &open;
                let abort = abort.clone();
                scope.spawn(move || {
                    // Connect, hello and reply, all within the one bound.
                    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
                    let stream = open(i, deadline, &|| abort.is_raised())?;
                    if let Some(name) = congestion {
                        stream.set_congestion(name)?;
                    }
                    handshake(stream, &h, tls, psk, deadline, abort)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| {
                j.join().unwrap_or_else(|_| {
                    Err(Error::ShardPanicked {
                        side: "sender",
                        channel: u16::MAX,
                        message: "a handshake thread panicked".into(),
                    })
                })
            })
            .collect()
    })
}

/// Runs one connected channel's handshakes (TLS when configured, then the hello), ending by
/// `deadline`, or once `abort` is raised: the socket timeouts bound each read, not the
/// handshake, and a receiver (or whatever answers in its place) that drips its reply a byte at
/// a time, each within the read timeout, would otherwise hold the sender for as long as it
/// liked.
pub(super) fn handshake(
    stream: Stream,
    hello: &Hello,
    tls: Option<&TlsClient>,
    psk: Option<&Psk>,
    deadline: Instant,
    abort: Arc<Abort>,
) -> Result<Connected> {
    let watchdog = Watchdog::arm(&stream, deadline, abort)?;
    let result = handshake_within(stream, hello, tls, psk);
    // Its connection was shut down under it: whatever it ended with, this is why.
    match watchdog.disarm() {
        Fired::No => result,
        Fired::Deadline => Err(Error::Timeout {
            what: format!("the handshake of channel {}", hello.channel_index),
            ms: HANDSHAKE_TIMEOUT_MS,
        }),
        Fired::Cancelled => Err(Error::Cancelled),
    }
}

/// Why a watchdog shut its handshake's connection down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fired {
    No = 0,
    Deadline = 1,
    Cancelled = 2,
}

/// Shuts a handshake's connection down if `deadline` passes, or the transfer is cancelled,
/// before it is disarmed, which ends any read or write the handshake is blocked in.
struct Watchdog {
    /// Dropped to disarm: the thread's wait ends at once.
    disarm: mpsc::Sender<()>,
    fired: Arc<AtomicU8>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    fn arm(stream: &Stream, deadline: Instant, abort: Arc<Abort>) -> Result<Watchdog> {
        let handle = stream
            .try_clone()
            .map_err(|e| Error::io("watching the handshake", e))?;
        let (disarm, disarmed) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicU8::new(Fired::No as u8));
        let flag = fired.clone();
        let thread = std::thread::Builder::new()
            .name("pw-handshake-watch".into())
            .spawn(move || loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let slice = left.min(Duration::from_millis(HANDSHAKE_WATCH_SLICE_MS));
                if !matches!(
                    disarmed.recv_timeout(slice),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ) {
                    return;
                }
                let why = if abort.is_raised() {
                    Fired::Cancelled
                } else if Instant::now() >= deadline {
                    Fired::Deadline
                } else {
                    continue;
                };
                flag.store(why as u8, Ordering::Release);
                let _ = handle.shutdown(std::net::Shutdown::Both);
                return;
            })
            .map_err(|e| Error::io("starting the handshake's watchdog", e))?;
        Ok(Watchdog {
            disarm,
            fired,
            thread,
        })
    }

    /// Stops the watch (waiting for its thread, so nothing outlives the handshake): whether,
    /// and why, the connection was shut down.
    fn disarm(self) -> Fired {
        drop(self.disarm);
        let _ = self.thread.join();
        match self.fired.load(Ordering::Acquire) {
            1 => Fired::Deadline,
            2 => Fired::Cancelled,
            _ => Fired::No,
        }
    }
}

/// One channel's handshakes, unbounded but for the socket timeouts (see [`handshake`]).
fn handshake_within(
    stream: Stream,
    hello: &Hello,
    tls: Option<&TlsClient>,
    psk: Option<&Psk>,
) -> Result<Connected> {
    let i = hello.channel_index;
    let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    stream.configure()?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| Error::io("setting handshake timeouts", e))?;
    let mut session = match tls {
        Some(t) => Some(client_handshake(&stream, t, i)?),
        None => None,
    };
    let reply = match (session.as_mut(), psk) {
        (Some(s), _) => {
            s.write_message(&stream, &hello.encode())?;
            let plain = s.read_message(&stream, i)?;
            Reply::decode(&plain).map_err(|source| Error::Protocol { channel: i, source })?
        }
        (None, Some(psk)) => match psk_handshake(&stream, hello, psk)? {
            Ok(s) => {
                let s = session.insert(s);
                let plain = s.read_message(&stream, i)?;
                Reply::decode(&plain).map_err(|source| Error::Protocol { channel: i, source })?
            }
            Err(refused) => refused,
        },
        (None, None) => plain_reply(&stream, hello)?,
    };
    if let Some(refusal) = reply.refusal {
        return Err(Error::Refused {
            channel: i,
            refusal,
        });
    }
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|e| Error::io("clearing handshake timeouts", e))?;
    Ok(Connected {
        stream,
        tls: session,
        receiver_idle_ms: reply.idle_timeout_ms,
    })
}

/// The sender's side of the pre-shared-key handshake: the hello, the receiver's challenge
/// (checked: does it hold the key?), our proof. Returns the channel's record state, or the
/// receiver's plain reply when it refused the hello outright.
pub(super) fn psk_handshake(
    stream: &Stream,
    hello: &Hello,
    psk: &Psk,
) -> Result<std::result::Result<TlsSession, Reply>> {
    use std::io::{Read, Write};
    let i = hello.channel_index;
    let bytes = hello.encode();
    let io = |what: &str, e| Error::io(format!("{what} on channel {i}"), e);
    (&*stream)
        .write_all(&bytes)
        .map_err(|e| io("sending the handshake", e))?;
    let mut challenge = [0u8; crate::auth::CHALLENGE_BYTES];
    (&*stream)
        .read_exact(&mut challenge[..8])
        .map_err(|e| io("reading the receiver's challenge", e))?;
    if challenge[..8] == *b"PAGEWIRE" {
        // A plain reply: the receiver refused the hello before any challenge.
        let mut reply = [0u8; 16];
        reply[..8].copy_from_slice(&challenge[..8]);
        (&*stream)
            .read_exact(&mut reply[8..])
            .map_err(|e| io("reading the receiver's reply", e))?;
        let reply =
            Reply::decode(&reply).map_err(|source| Error::Protocol { channel: i, source })?;
        // Only a refusal may come unsealed: a receiver that holds the key accepts by proving
        // it. A plain "accepted" is a peer without the key (a man in the middle) asking for
        // the pages in the clear.
        if reply.refusal.is_none() {
            return Err(Error::Auth {
                channel: i,
                source: crate::auth::AuthError::NotAChallenge,
            });
        }
        return Ok(Err(reply));
    }
    (&*stream)
        .read_exact(&mut challenge[8..])
        .map_err(|e| io("reading the receiver's challenge", e))?;
    let (proof, nonce) = psk
        .answer(&bytes, &challenge)
        .map_err(|source| Error::Auth { channel: i, source })?;
    (&*stream)
        .write_all(&proof)
        .map_err(|e| io("sending the key proof", e))?;
    let (tx, rx) = psk.traffic(&bytes, &nonce);
    Ok(Ok(crate::tls::psk_session(tx, rx, Vec::new())?))
}

/// Sends the hello in plaintext and reads the reply.
pub(super) fn plain_reply(stream: &Stream, hello: &Hello) -> Result<Reply> {
    use std::io::{Read, Write};
    let i = hello.channel_index;
    (&*stream)
        .write_all(&hello.encode())
        .map_err(|e| Error::io(format!("sending the handshake on channel {i}"), e))?;
    let mut reply = [0u8; 16];
    let mut got = 0;
    while got < reply.len() {
        match (&*stream).read(&mut reply[got..]) {
            Ok(0) => {
                // A receiver may close right after its refusal; what we have may still say why.
                break;
            }
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::io(
                    format!("reading the receiver's handshake reply on channel {i}"),
                    e,
                ))
            }
        }
    }
    if (got >= 1 && reply[0] == 0x15) || reply[..got.min(2)] == [0x16, 0x03] {
        return Err(Error::TlsMismatch(format!(
            "the receiver answered channel {i} with TLS: it requires TLS (give this sender a TLS \
             identity: {HINT_SENDER_TLS})"
        )));
    }
    Reply::decode(&reply[..got]).map_err(|source| Error::Protocol { channel: i, source })
}
