//! A TLS frame that fails after its seal (its own reads faulted: a source file truncated
//! while it was sealed) gives its record numbers back, so the abort that follows opens on the
//! receiver, which hears the sender's reason instead of "forged data". The fault is injected
//! (`faults::SEAL_FAULT_AFTER_FRAMES`): the scan reads every page before the seal does, so a
//! real one lands in the seal alone only in a race. The hook is process-wide, so this binary
//! holds this one test.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::atomic::Ordering;
use std::time::Duration;

use pagewire::faults::SEAL_FAULT_AFTER_FRAMES;
use pagewire::synth::{fill, Content};
use pagewire::{error_chain, Error};
use pagewire_tests::{memory, skip_without_uring, tls_identities, transfer_unpinned};

#[test]
fn a_frame_that_faults_in_its_seal_still_lets_the_receiver_hear_why() {
    if skip_without_uring() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let identities = tls_identities(dir.path(), true);
    let len = 16 << 20;
    let src = memory(len);
    fill(&src, Content::Random, 3);
    // The third chunk frame fails after it was sealed.
    SEAL_FAULT_AFTER_FRAMES.store(3, Ordering::Release);
    let limit = Duration::from_secs(60);
    let (sent, received) = transfer_unpinned(src, memory(len), 1, identities, limit);
    SEAL_FAULT_AFTER_FRAMES.store(0, Ordering::Release);
    let (sent, received) = (sent.unwrap_err(), received.unwrap_err());
    assert!(
        matches!(sent, Error::MemoryFault { .. }),
        "{}",
        error_chain(&sent)
    );
    assert!(
        matches!(&received, Error::PeerAborted { reason, .. } if reason.contains("cannot be accessed")),
        "the receiver should hear the sender's reason: {}",
        error_chain(&received)
    );
}
