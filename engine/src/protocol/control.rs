//! Control messages, receiver to sender, after the handshake: `Done` when every channel has
//! placed everything, `Abort` with a reason when the receiver fails.
//!
//! ```text
//!  0 "PC" u16 │ 2 kind u8 (1 Done, 2 Abort) │ 3 reserved u8 │ 4 code u32 │ 8 reason bytes u16 │ 10 reserved (6)
//!  then `reason bytes` of UTF-8 (lossy) text, at most CONTROL_REASON_BYTES_MAX.
//! ```

use crate::limits::CONTROL_BYTES;

use super::ProtocolError;

const MAGIC: [u8; 2] = *b"PC";

/// Bytes of reason text an abort may carry.
pub const CONTROL_REASON_BYTES_MAX: usize = 240;

/// Bytes of the largest control message.
pub const CONTROL_MESSAGE_BYTES_MAX: usize = CONTROL_BYTES + CONTROL_REASON_BYTES_MAX;

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The receiver placed every page of every channel.
    Done,
    /// The receiver failed; `reason` is its error message.
    Abort {
        /// Error class code.
        code: u32,
        /// The receiver's error message (truncated to the limit).
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
            Control::Abort { code, reason } => {
                out[2] = 2;
                out[4..8].copy_from_slice(&code.to_le_bytes());
                let mut text = reason.as_bytes();
                if text.len() > CONTROL_REASON_BYTES_MAX {
                    text = &text[..CONTROL_REASON_BYTES_MAX];
                }
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
            1 if len == 0 => Ok(Some((Control::Done, CONTROL_BYTES))),
            2 => {
                let Some(text) = buf.get(CONTROL_BYTES..CONTROL_BYTES + len) else {
                    return Ok(None);
                };
                let code = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                let reason = String::from_utf8_lossy(text).into_owned();
                Ok(Some((Control::Abort { code, reason }, CONTROL_BYTES + len)))
            }
            1 => Err(ProtocolError::MarkerWithPayload("done")),
            other => Err(ProtocolError::BadKind(other)),
        }
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
            Control::Abort {
                code: 3,
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
    }

    #[test]
    fn long_reasons_are_truncated_not_overflowed() {
        let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
        let n = Control::Abort {
            code: 1,
            reason: "x".repeat(1000),
        }
        .encode(&mut buf);
        assert_eq!(n, CONTROL_MESSAGE_BYTES_MAX);
    }
}
