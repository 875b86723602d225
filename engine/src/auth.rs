//! Pre-shared keys: plaintext transfers that are not anonymous.
//!
//! Without TLS, a key both hosts hold (QEMU's `tls-creds-psk` file format: `identity:hexkey`
//! lines, or one hex line) authenticates each channel in its handshake and then keys the
//! channel's record protection, so a stranger can neither join a transfer nor forge or alter a
//! byte of it. The key never crosses the wire:
//!
//! ```text
//!  sender                                            receiver
//!  Hello{…, FEATURE_PSK, nonce Ns}            ───▶
//!                                             ◀───   Challenge{Nr, HMAC(K, "receiver proof" ‖ hello ‖ Nr)}
//!  checks the receiver's proof (it holds K)
//!  Proof{HMAC(K, "sender proof" ‖ hello ‖ Nr)} ───▶   checks the sender's proof
//!  both derive per-direction traffic secrets HMAC(K, "sender|receiver traffic" ‖ hello ‖ Nr)
//!                                             ◀───   Reply, sealed (AES-128-GCM records, as TLS)
//!  frames sealed as records                   ───▶   records opened, authenticated, placed
//! ```
//! Fresh nonces on both sides make every proof and every key unique to one connection, so
//! nothing recorded can be replayed; distinct labels keep a receiver's proof from serving as a
//! sender's. Frames then travel exactly as under TLS: sealed into records in the shard's
//! registered slots, opened before a byte is placed (the AEAD tag is the keyed checksum), with
//! key updates every 2^24 records (each new secret is HMAC(old, "key update")).

use std::path::Path;

use crate::crypto::hmac;
use crate::error::{Error, Result};
use crate::limits::HELLO_BYTES;

/// Bytes of key material a pre-shared key must have at least (128 bits).
pub const PSK_BYTES_MIN: usize = 16;
/// Bytes of the receiver's challenge: magic, nonce, proof.
pub const CHALLENGE_BYTES: usize = 8 + 16 + 32;
/// Bytes of the sender's proof: magic, proof.
pub const PROOF_BYTES: usize = 8 + 32;
const CHALLENGE_MAGIC: [u8; 8] = *b"PWCHALNG";
const PROOF_MAGIC: [u8; 8] = *b"PWPROOF!";

/// A pre-shared key (kept only as an HMAC key).
#[derive(Clone)]
pub struct Psk {
    key: hmac::Key,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// A key from raw bytes (at least [`PSK_BYTES_MIN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < PSK_BYTES_MIN {
            return Err(Error::Config(format!(
                "a pre-shared key needs at least {PSK_BYTES_MIN} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Psk {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    /// Reads a key file: QEMU's `keys.psk` format (`identity:hexkey`, the first line is used)
    /// or a single line of hex.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the pre-shared key {}", path.display()), e))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| Error::Config(format!("{} holds no key", path.display())))?;
        let hex = line.rsplit(':').next().unwrap_or(line);
        let bytes = decode_hex(hex).ok_or_else(|| {
            Error::Config(format!(
                "{}: the key must be hex (as `identity:hexkey`, QEMU's keys.psk format)",
                path.display()
            ))
        })?;
        Self::from_bytes(&bytes)
    }

    /// A fresh random key (32 bytes).
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Psk {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        }
    }

    /// 32 random bytes, as a line of QEMU's `keys.psk` format with identity `pagewire`.
    pub fn generate_line() -> String {
        let key: [u8; 32] = rand::random();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        format!("pagewire:{hex}\n")
    }

    fn tag(&self, label: &str, hello: &[u8; HELLO_BYTES], nonce: &[u8; 16]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"pagewire v2 ");
        ctx.update(label.as_bytes());
        ctx.update(hello);
        ctx.update(nonce);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// The receiver's challenge to the sender of `hello`, with a fresh nonce.
    pub fn challenge(&self, hello: &[u8; HELLO_BYTES]) -> ([u8; CHALLENGE_BYTES], [u8; 16]) {
        let nonce: [u8; 16] = rand::random();
        let mut out = [0u8; CHALLENGE_BYTES];
        out[..8].copy_from_slice(&CHALLENGE_MAGIC);
        out[8..24].copy_from_slice(&nonce);
        out[24..].copy_from_slice(&self.tag("receiver proof", hello, &nonce));
        (out, nonce)
    }

    /// The sender's side: checks the receiver's challenge (does it hold the key?) and returns
    /// the proof to send and the receiver's nonce.
    pub fn answer(
        &self,
        hello: &[u8; HELLO_BYTES],
        challenge: &[u8],
    ) -> std::result::Result<([u8; PROOF_BYTES], [u8; 16]), AuthError> {
        if challenge.len() != CHALLENGE_BYTES || challenge[..8] != CHALLENGE_MAGIC {
            return Err(AuthError::NotAChallenge);
        }
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&challenge[8..24]);
        if !equal(&self.tag("receiver proof", hello, &nonce), &challenge[24..]) {
            return Err(AuthError::ReceiverKeyDiffers);
        }
        let mut out = [0u8; PROOF_BYTES];
        out[..8].copy_from_slice(&PROOF_MAGIC);
        out[8..].copy_from_slice(&self.tag("sender proof", hello, &nonce));
        Ok((out, nonce))
    }

    /// The receiver's side: checks the sender's proof.
    pub fn check_proof(&self, hello: &[u8; HELLO_BYTES], nonce: &[u8; 16], proof: &[u8]) -> bool {
        proof.len() == PROOF_BYTES
            && proof[..8] == PROOF_MAGIC
            && equal(&self.tag("sender proof", hello, nonce), &proof[8..])
    }

    /// The traffic secrets of one authenticated connection: (sender to receiver, receiver to
    /// sender).
    pub fn traffic(&self, hello: &[u8; HELLO_BYTES], nonce: &[u8; 16]) -> ([u8; 32], [u8; 32]) {
        (
            self.tag("sender traffic", hello, nonce),
            self.tag("receiver traffic", hello, nonce),
        )
    }
}

/// Constant-time comparison of two tags.
fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why a pre-shared-key handshake failed on the sender's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The receiver answered the hello with something other than a challenge.
    #[error("the receiver did not answer with a pre-shared-key challenge")]
    NotAChallenge,
    /// The receiver's proof did not match: it holds another key (or is not the receiver).
    #[error(
        "the receiver's pre-shared key differs from this sender's (or it is not the receiver)"
    )]
    ReceiverKeyDiffers,
}

/// Record keys (AES-128-GCM key and IV) from a traffic secret.
pub(crate) fn record_keys(secret: &[u8; 32]) -> ([u8; 16], [u8; 12]) {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let k = hmac::sign(&key, b"pagewire v2 record key");
    let v = hmac::sign(&key, b"pagewire v2 record iv");
    let mut key16 = [0u8; 16];
    key16.copy_from_slice(&k.as_ref()[..16]);
    let mut iv = [0u8; 12];
    iv.copy_from_slice(&v.as_ref()[..12]);
    (key16, iv)
}

/// The next traffic secret after a key update.
pub(crate) fn next_secret(secret: &[u8; 32]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(hmac::sign(&key, b"pagewire v2 key update").as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_prove_the_key_and_agree_on_traffic_keys() {
        let k = Psk::from_bytes(&[5; 32]).unwrap();
        let hello = [9u8; HELLO_BYTES];
        let (challenge, nonce) = k.challenge(&hello);
        let (proof, seen) = k.answer(&hello, &challenge).unwrap();
        assert_eq!(seen, nonce);
        assert!(k.check_proof(&hello, &nonce, &proof));
        // Another key fails on either side; a proof for another hello or nonce fails too.
        let other = Psk::from_bytes(&[6; 32]).unwrap();
        assert_eq!(
            other.answer(&hello, &challenge),
            Err(AuthError::ReceiverKeyDiffers)
        );
        assert!(!other.check_proof(&hello, &nonce, &proof));
        assert!(!k.check_proof(&[8u8; HELLO_BYTES], &nonce, &proof));
        assert!(!k.check_proof(&hello, &[0; 16], &proof));
        // The receiver's proof is not a sender's proof.
        let mut reflected = [0u8; PROOF_BYTES];
        reflected[..8].copy_from_slice(&PROOF_MAGIC);
        reflected[8..].copy_from_slice(&challenge[24..]);
        assert!(!k.check_proof(&hello, &nonce, &reflected));
        let (tx, rx) = k.traffic(&hello, &nonce);
        assert_ne!(tx, rx);
        assert_ne!(next_secret(&tx), tx);
    }

    #[test]
    fn key_files_in_qemu_format_or_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.psk");
        std::fs::write(&path, Psk::generate_line()).unwrap();
        Psk::from_file(&path).unwrap();
        std::fs::write(&path, "00112233445566778899aabbccddeeff\n").unwrap();
        Psk::from_file(&path).unwrap();
        for bad in ["", "qemu:xyz", "0011", "pagewire:001122"] {
            std::fs::write(&path, bad).unwrap();
            assert!(Psk::from_file(&path).is_err(), "{bad:?}");
        }
    }
}
