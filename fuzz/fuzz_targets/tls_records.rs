//! The TLS record path on arbitrary ciphertext: records framed by their headers, each opened in
//! place with a fixed key, inner content types and key updates parsed. Never a panic, and only
//! authentic records (which random bytes never are) yield plaintext. A second pass seals the
//! input as records and checks they open to exactly it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::pipeline::seal::{
    check_key_update, record_len, RecordOpener, RecordSealer, CONTENT_APPLICATION_DATA,
    RECORD_BYTES_MAX, RECORD_HEADER_BYTES,
};
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::ConnectionTrafficSecrets;

fn secrets() -> ConnectionTrafficSecrets {
    // AES-256-GCM: rustls's `AeadKey` is built from 32 bytes.
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([7u8; 32]),
        iv: Iv::new([9u8; 12]),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut opener = RecordOpener::new(&secrets(), 0).expect("opener");
    let mut buf = data.to_vec();
    let mut at = 0;
    while at + RECORD_HEADER_BYTES <= buf.len() {
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header.copy_from_slice(&buf[at..at + RECORD_HEADER_BYTES]);
        let Ok(total) = record_len(&header) else {
            break;
        };
        let Some(record) = buf.get_mut(at..at + total) else {
            break;
        };
        if let Ok((_, range)) = opener.open_in_place(record) {
            let _ = check_key_update(&record[range]);
        }
        at += total;
    }
    // Sealing what we were given, then opening it, gives it back.
    let mut sealer = RecordSealer::new(&secrets(), 3).expect("sealer");
    let mut opener = RecordOpener::new(&secrets(), 3).expect("opener");
    let mut wire = vec![0u8; data.len() + (data.len() / 16384 + 1) * RECORD_BYTES_MAX];
    let n = sealer
        .seal(data, CONTENT_APPLICATION_DATA, &mut wire)
        .expect("sealing fits");
    let mut plain = Vec::new();
    let mut at = 0;
    while at < n {
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header.copy_from_slice(&wire[at..at + RECORD_HEADER_BYTES]);
        let total = record_len(&header).expect("our own record");
        let (ty, range) = opener
            .open_in_place(&mut wire[at..at + total])
            .expect("our own record opens");
        assert_eq!(ty, CONTENT_APPLICATION_DATA);
        plain.extend_from_slice(&wire[at..at + total][range]);
        at += total;
    }
    assert_eq!(plain, data);
});
