//! The library's error type: one enum, sentence-style messages, sources chained.

use std::io;

pub use crate::protocol::control::AbortCode;
use crate::protocol::{handshake::Refusal, ProtocolError};

/// Everything that can end a transfer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// io_uring could not be set up at all (kernel too old, disabled by sysctl or seccomp).
    #[error("io_uring is not available; pagewire needs Linux 6.0 or newer with io_uring enabled (check the kernel.io_uring_disabled sysctl and any seccomp profile)")]
    UringUnavailable(#[source] io::Error),
    /// The kernel lacks something pagewire cannot do without.
    #[error("the kernel does not support {0}")]
    Unsupported(&'static str),
    /// A system call failed.
    #[error("{context}")]
    Io {
        /// What pagewire was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The peer sent something that breaks the wire protocol.
    #[error("protocol error on channel {channel}")]
    Protocol {
        /// Channel index the bad input arrived on.
        channel: u16,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// A connection opened with something that is not a pagewire v2 hello.
    #[error("the connection from {peer} did not open with a pagewire v2 handshake")]
    BadHello {
        /// The peer's address.
        peer: String,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// The receiver refused a channel's handshake; the receiver reports the same reason.
    #[error("the receiver refused channel {channel}: {refusal}")]
    Refused {
        /// Channel index that was refused.
        channel: u16,
        /// The receiver's reason.
        refusal: Refusal,
    },
    /// The peer ended the transfer with an error of its own.
    #[error("the peer aborted the transfer on channel {channel}: {reason}")]
    PeerAborted {
        /// Channel the abort arrived on.
        channel: u16,
        /// The class of the peer's error.
        code: AbortCode,
        /// The peer's reason.
        reason: String,
    },
    /// The peer closed a connection before the transfer was complete.
    #[error("channel {channel}: the peer closed the connection {when}")]
    PeerClosed {
        /// Channel index.
        channel: u16,
        /// Where in the stream it happened.
        when: &'static str,
    },
    /// Nothing happened for too long.
    #[error("timed out after {ms} ms {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long pagewire waited.
        ms: u64,
    },
    /// The caller's configuration or request is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The machine's topology could not be read (hwloc failed, or an XML file is invalid).
    #[error("topology: {0}")]
    Topology(String),
    /// The TLS handshake failed (certificate refused, wrong name, expired, alert received).
    #[error("TLS handshake on channel {channel} failed")]
    TlsHandshake {
        /// Channel index (the receiver's accept order before the hello names it).
        channel: u16,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// A TLS record failed to open (authentication, framing).
    #[error("TLS record on channel {channel} refused")]
    TlsRecord {
        /// Channel index.
        channel: u16,
        /// What was wrong.
        #[source]
        source: crate::pipeline::seal::RecordError,
    },
    /// TLS on one side only, or an alert from the peer.
    #[error("{0}")]
    TlsMismatch(String),
    /// The peer broke the TLS record layer (a record that does not fit, an unexpected content
    /// type, data where none may be).
    #[error("the peer broke the TLS record protocol on channel {channel}: {what}")]
    TlsProtocol {
        /// Channel index.
        channel: u16,
        /// What was wrong.
        what: String,
    },
    /// The caller dropped a sender before `finish`: the transfer was torn down.
    #[error("the sender was dropped before it finished the transfer")]
    Dropped,
    /// A bug in pagewire (an invariant of its own did not hold).
    #[error("internal error: {0}")]
    Internal(String),
    /// A pre-shared-key handshake failed on the sender's side.
    #[error("pre-shared-key handshake on channel {channel} failed")]
    Auth {
        /// Channel index.
        channel: u16,
        /// What was wrong.
        #[source]
        source: crate::auth::AuthError,
    },
    /// TLS files or settings are unusable.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// A live migration's policy gave up: the guest dirties memory faster than it can be sent.
    #[error("{0}")]
    NotConverging(String),
    /// The VMM failed a request of the live migration (collecting dirty pages, pausing, its
    /// device state); the message says which and why.
    #[error("the VMM failed: {0}")]
    Vmm(String),
    /// The caller cancelled the transfer ([`crate::sender::Canceller`]).
    #[error("the migration was cancelled")]
    Cancelled,
    /// This channel stopped because another one failed first (that error is the one reported).
    #[error("the transfer was aborted because another channel failed")]
    Aborted,
    /// No sender completed its handshake before the receiver's deadline. Connections that
    /// failed theirs were dropped; the last reason is kept so a misconfigured sender is visible.
    #[error("no sender completed a handshake within {ms} ms{}", describe_refused(*.refused, .last_refusal.as_deref()))]
    NoSender {
        /// How long the receiver waited.
        ms: u64,
        /// Connections that failed their handshake meanwhile.
        refused: u32,
        /// Why the last of them failed.
        last_refusal: Option<String>,
    },
    /// A receiver over handed-in connections (it has no listener) saw every one of them end
    /// without a complete session: closed, refused in the handshake, or too few for the
    /// session they belong to. Nothing more can come.
    #[error("the handed-in connections ended without a complete session{}{}", describe_joined(*.joined, *.expected), describe_refused(*.refused, .last_refusal.as_deref()))]
    HandedInEnded {
        /// Channels that joined the session still gathered at the end.
        joined: usize,
        /// Channels that session has (`None`: no session was being gathered).
        expected: Option<usize>,
        /// Connections that failed their handshake (or sessions dropped) meanwhile.
        refused: u32,
        /// Why the last of them failed.
        last_refusal: Option<String>,
    },
    /// Every channel ended its stream, but some page of the layout was never placed (nor
    /// declared zero): the destination is not a complete image.
    #[error("the stream ended but page {page} of region {region} was never received ({missing} page(s) of the layout missing)")]
    Incomplete {
        /// Region index of the first missing page.
        region: u32,
        /// Page index within that region.
        page: u64,
        /// Pages missing in all.
        missing: u64,
    },
    /// Guest memory could not be accessed: its file was truncated or could not be backed
    /// (SIGBUS), or the kernel could not write into it (EFAULT).
    #[error("guest memory at page {page} of region {region} cannot be accessed (its file was truncated, or its filesystem or huge-page pool is full)")]
    MemoryFault {
        /// Region index.
        region: u32,
        /// Page index within the region.
        page: u64,
    },
    /// A shard thread panicked (a bug in pagewire); the transfer was torn down.
    #[error("internal error: the {side} shard of channel {channel} panicked: {message}")]
    ShardPanicked {
        /// "sender" or "receiver".
        side: &'static str,
        /// Channel index.
        channel: u16,
        /// The panic's message.
        message: String,
    },
}

fn describe_refused(refused: u32, last: Option<&str>) -> String {
    match (refused, last) {
        (0, _) => String::new(),
        (n, Some(last)) => format!(" ({n} connection(s) failed their handshake; the last: {last})"),
        (n, None) => format!(" ({n} connection(s) failed their handshake)"),
    }
}

fn describe_joined(joined: usize, expected: Option<usize>) -> String {
    match expected {
        Some(n) => format!(": {joined} of {n} channels joined it"),
        None => String::new(),
    }
}

impl Error {
    /// An [`Error::Io`] with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The code an `Abort` carries to the peer when this error ends a transfer.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            Error::Protocol { .. } | Error::BadHello { .. } => AbortCode::Protocol,
            Error::Io { .. } | Error::MemoryFault { .. } => AbortCode::Io,
            Error::Timeout { .. } => AbortCode::Timeout,
            Error::PeerClosed { .. } => AbortCode::PeerClosed,
            Error::Incomplete { .. } => AbortCode::Incomplete,
            Error::TlsRecord { .. }
            | Error::TlsHandshake { .. }
            | Error::TlsMismatch(_)
            | Error::TlsProtocol { .. } => AbortCode::Tls,
            Error::ShardPanicked { .. } | Error::Internal(_) => AbortCode::Internal,
            _ => AbortCode::Other,
        }
    }
}

/// Shorthand for the library's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
