//! Control messages, receiver to sender, after the handshake: `RoundPlaced` when every channel
//! has placed a round (a live migration measures its rounds by it and waits for it before the
//! pause), `Done` when every channel has placed everything, `Abort` with a reason when the
//! receiver fails.
//!
//! ```text
//!  0 "PC" u16 │ 2 kind u8 (1 Done, 2 Abort, 3 RoundPlaced) │ 3 reserved u8 │ 4 code u32 (an abort's
//!  code, a placed round's number) │ 8 reason bytes u16 │ 10 reserved (6)
//!  then `reason bytes` of UTF-8 (lossy) text (aborts only), at most CONTROL_REASON_BYTES_MAX.
//! ```
//! Abort codes ([`AbortCode`]): 1 protocol violation, 2 system call failed, 3 idle bound or
//! deadline passed, 4 peer closed a connection early, 5 anything else, 6 the stream ended with
//! pages of the layout never received, 7 TLS record or handshake failure, 8 internal error (a
//! panic). Unknown codes decode as 5. The reason is the peer's error text: it is untrusted, so
//! control characters are replaced before anyone prints it.

use crate::limits::CONTROL_BYTES;

use super::ProtocolError;

const MAGIC: [u8; 2] = *b"PC";

/// Bytes of reason text an abort may carry.
pub const CONTROL_REASON_BYTES_MAX: usize = 240;

/// Bytes of the largest control message.
pub const CONTROL_MESSAGE_BYTES_MAX: usize = CONTROL_BYTES + CONTROL_REASON_BYTES_MAX;

/// Why a side aborted a transfer, as carried on the wire (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AbortCode {
    /// The peer broke the wire protocol.
    Protocol = 1,
    /// A system call failed (socket, memory).
    Io = 2,
    /// An idle bound or deadline passed.
    Timeout = 3,
    /// A connection closed before the transfer was complete.
    PeerClosed = 4,
    /// Any other error.
    Other = 5,
    /// The stream ended with pages of the layout never received.
    Incomplete = 6,
    /// A TLS record or handshake failed.
    Tls = 7,
    /// A bug: a shard panicked.
    Internal = 8,
}

impl AbortCode {
    /// Decodes a wire code; unknown codes are [`AbortCode::Other`].
    pub fn from_wire(code: u32) -> AbortCode {
        match code {
            1 => AbortCode::Protocol,
            2 => AbortCode::Io,
            3 => AbortCode::Timeout,
            4 => AbortCode::PeerClosed,
            6 => AbortCode::Incomplete,
            7 => AbortCode::Tls,
            8 => AbortCode::Internal,
            _ => AbortCode::Other,
        }
    }
}

/// `text` with every control character (terminal escapes, newlines, NULs) replaced by U+FFFD,
/// so a peer's words cannot drive the operator's terminal.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// Encodes an abort's body (code u32, then the reason cut to [`CONTROL_REASON_BYTES_MAX`] at a
/// character boundary) into `out`; returns the bytes used. Sender abort frames carry it.
pub fn encode_abort_body(
    code: AbortCode,
    reason: &str,
    out: &mut [u8; 4 + CONTROL_REASON_BYTES_MAX],
) -> usize {
    out[..4].copy_from_slice(&(code as u32).to_le_bytes());
    let mut cut = reason.len().min(CONTROL_REASON_BYTES_MAX);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    out[4..4 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    4 + cut
}

/// Decodes an abort body (see [`encode_abort_body`]); the reason comes back sanitized.
pub fn decode_abort_body(body: &[u8]) -> (AbortCode, String) {
    let code = match body {
        [a, b, c, d, ..] => AbortCode::from_wire(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => AbortCode::Other,
    };
    let reason = body.get(4..).unwrap_or_default();
    (code, sanitize(&String::from_utf8_lossy(reason)))
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The receiver placed every page of every channel.
    Done,
    /// Every channel passed the barrier of round `round`: all its pages are placed.
    RoundPlaced {
        /// The round.
        round: u32,
    },
    /// The receiver failed; `reason` is its error message.
    Abort {
        /// Error class.
        code: AbortCode,
        /// The receiver's error message (truncated to the limit; sanitized when decoded).
        reason: String,
    },
}

impl Control {
    /// Encodes into `out`, returning the bytes used.
    pub fn encode(&self, out: &mut [u8; CONTROL_MESSAGE_BYTES_MAX]) -> usize {
        out[..CONTROL_BYTES].fill(0);
        out[0..2].copy_from_slice(&MAGIC);
        match self {
            Control::Done => {
                out[2] = 1;
                CONTROL_BYTES
            }
            Control::RoundPlaced { round } => {
                out[2] = 3;
                out[4..8].copy_from_slice(&round.to_le_bytes());
                CONTROL_BYTES
            }
            Control::Abort { code, reason } => {
                out[2] = 2;
                out[4..8].copy_from_slice(&(*code as u32).to_le_bytes());
                let mut cut = reason.len().min(CONTROL_REASON_BYTES_MAX);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                let text = &reason.as_bytes()[..cut];
                out[8..10].copy_from_slice(&(text.len() as u16).to_le_bytes());
                out[CONTROL_BYTES..CONTROL_BYTES + text.len()].copy_from_slice(text);
                CONTROL_BYTES + text.len()
            }
        }
    }

    /// Decodes one message from the start of `buf`: `Ok(None)` while more bytes are needed,
    /// otherwise the message and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Control, usize)>, ProtocolError> {
        if buf.len() >= 2 && buf[0..2] != MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "control message",
            });
        }
        if buf.len() < CONTROL_BYTES {
            return Ok(None);
        }
        let len = usize::from(u16::from_le_bytes([buf[8], buf[9]]));
        if len > CONTROL_REASON_BYTES_MAX {
            return Err(ProtocolError::TooLarge {
                what: "control reason",
                value: len as u64,
                max: CONTROL_REASON_BYTES_MAX as u64,
            });
        }
        if buf[3] != 0 || buf[10..16].iter().any(|&b| b != 0) {
            return Err(ProtocolError::Reserved("control message"));
        }
        match buf[2] {
            // Done carries nothing: its code field is reserved too.
            1 if len == 0 && buf[4..8] != [0; 4] => Err(ProtocolError::Reserved("done's code")),
            1 if len == 0 => Ok(Some((Control::Done, CONTROL_BYTES))),
            2 => {
                let Some(text) = buf.get(CONTROL_BYTES..CONTROL_BYTES + len) else {
                    return Ok(None);
                };
                let code =
                    AbortCode::from_wire(u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]));
                let reason = sanitize(&String::from_utf8_lossy(text));
                Ok(Some((Control::Abort { code, reason }, CONTROL_BYTES + len)))
            }
            3 if len == 0 => {
                let round = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                Ok(Some((Control::RoundPlaced { round }, CONTROL_BYTES)))
            }
            1 => Err(ProtocolError::MarkerWithPayload("done")),
            3 => Err(ProtocolError::MarkerWithPayload("round placed")),
            other => Err(ProtocolError::BadKind(other)),
        }
    }
}

/// Reassembles a plaintext channel's control messages from receives into one buffer: the
/// fixed part first, then as much reason text as it declares; a message decoded is taken out of
/// the buffer and the bytes after it move to its start. (Under TLS the record stream hands over
/// whole messages instead.)
#[derive(Debug, Default, Clone, Copy)]
pub struct ControlReader {
    filled: usize,
}

impl ControlReader {
    /// Bytes received and not yet decoded: the next receive lands at this offset of the buffer.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Bytes the buffer (`buf`: what was received so far, from its start) must hold before the
    /// next message can decode: the fixed part, then the reason it declares.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        if self.filled < CONTROL_BYTES {
            return CONTROL_BYTES;
        }
        let reason = usize::from(u16::from_le_bytes([buf[8], buf[9]]));
        CONTROL_BYTES + reason.min(CONTROL_REASON_BYTES_MAX)
    }

    /// `n` more bytes landed in the buffer, after the ones held.
    pub fn received(&mut self, n: usize) {
        self.filled += n;
    }

    /// The next whole message in `buf` (the whole buffer), taken out of it; `None` while its
    /// bytes are still to come.
    pub fn next(&mut self, buf: &mut [u8]) -> Result<Option<Control>, ProtocolError> {
        let got = buf.get(..self.filled).ok_or(ProtocolError::TooLarge {
            what: "control bytes received",
            value: self.filled as u64,
            max: buf.len() as u64,
        })?;
        let Some((msg, used)) = Control::decode(got)? else {
            return Ok(None);
        };
        buf.copy_within(used..self.filled, 0);
        self.filled -= used;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_round_trips_and_waits_for_whole_messages() {
        let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
        for msg in [
            Control::Done,
            Control::RoundPlaced { round: u32::MAX },
            Control::Abort {
                code: AbortCode::Timeout,
                reason: "disk full".into(),
            },
        ] {
            let n = msg.encode(&mut buf);
            for cut in 2..n {
                assert_eq!(Control::decode(&buf[..cut]), Ok(None), "cut {cut}");
            }
            assert_eq!(Control::decode(&buf[..n]), Ok(Some((msg, n))));
        }
        assert!(Control::decode(b"XX").is_err());
        // A Done with its (reserved) code field set: refused.
        let n = Control::Done.encode(&mut buf);
        buf[4] = 1;
        assert!(matches!(
            Control::decode(&buf[..n]),
            Err(ProtocolError::Reserved(_))
        ));
    }

    #[test]
    fn long_reasons_are_truncated_not_overflowed() {
        let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
        let n = Control::Abort {
            code: AbortCode::Protocol,
            reason: "x".repeat(1000),
        }
        .encode(&mut buf);
        assert_eq!(n, CONTROL_MESSAGE_BYTES_MAX);
        // A multi-byte character straddling the limit is cut before it, never split.
        let n = Control::Abort {
            code: AbortCode::Protocol,
            reason: format!("{}é", "x".repeat(CONTROL_REASON_BYTES_MAX - 1)),
        }
        .encode(&mut buf);
        assert_eq!(n, CONTROL_MESSAGE_BYTES_MAX - 1);
    }

    #[test]
    fn the_reader_asks_for_exactly_the_rest_and_takes_messages_one_by_one() {
        let mut wire = Vec::new();
        let msgs = [
            Control::RoundPlaced { round: 7 },
            Control::Abort {
                code: AbortCode::Timeout,
                reason: "slow disk".into(),
            },
            Control::Done,
        ];
        for m in &msgs {
            let mut b = [0u8; CONTROL_MESSAGE_BYTES_MAX];
            let n = m.encode(&mut b);
            wire.extend_from_slice(&b[..n]);
        }
        // Delivered in pieces of every size, as short receives would, asking for what it wants.
        for piece in 1..=wire.len() {
            let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
            let mut r = ControlReader::default();
            let (mut sent, mut got) = (0, Vec::new());
            while got.len() < msgs.len() {
                let want = r.wanted(&buf);
                let at = r.filled();
                assert!(want > at, "asks for nothing");
                let n = piece.min(want - at).min(wire.len() - sent);
                buf[at..at + n].copy_from_slice(&wire[sent..sent + n]);
                sent += n;
                r.received(n);
                while let Some(m) = r.next(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "pieces of {piece}");
            assert_eq!(r.filled(), 0);
        }
        // Two messages in one receive come out one by one.
        let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
        buf[..32].copy_from_slice(&wire[..16].repeat(2));
        let mut r = ControlReader::default();
        r.received(32);
        assert_eq!(r.next(&mut buf).unwrap(), Some(msgs[0].clone()));
        assert_eq!(r.next(&mut buf).unwrap(), Some(msgs[0].clone()));
        assert_eq!(r.next(&mut buf).unwrap(), None);
        let mut r = ControlReader::default();
        r.received(CONTROL_MESSAGE_BYTES_MAX + 1);
        assert!(r.next(&mut buf).is_err());
    }

    #[test]
    fn abort_reasons_are_sanitized_and_codes_named() {
        let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
        let n = Control::Abort {
            code: AbortCode::Incomplete,
            reason: "bad\x1b[2J\nnews\u{7}".into(),
        }
        .encode(&mut buf);
        let Some((Control::Abort { code, reason }, _)) = Control::decode(&buf[..n]).unwrap() else {
            panic!("not an abort");
        };
        assert_eq!(code, AbortCode::Incomplete);
        assert!(!reason.chars().any(char::is_control), "{reason:?}");
        assert!(reason.starts_with("bad") && reason.contains("news"));
        buf[4] = 200;
        let Some((Control::Abort { code, .. }, _)) = Control::decode(&buf[..n]).unwrap() else {
            panic!("not an abort");
        };
        assert_eq!(code, AbortCode::Other);
    }
}
