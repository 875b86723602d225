//! Records opened straight into guest memory (`RecordOpener::open_into`, AES-GCM through
//! AWS-LC) on arbitrary ciphertext: never a panic, never a write outside the range the record
//! names (the region has a guard pattern around it), and nothing opens as authentic. A second
//! pass seals the input as records and checks they open into memory to exactly it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::pipeline::seal::{
    record_data_bytes, record_len, Direct, RecordOpener, RecordSealer, CONTENT_APPLICATION_DATA,
    RECORD_BYTES_MAX, RECORD_HEADER_BYTES,
};
use pagewire::{GuestMemory, RegionSpec};
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::ConnectionTrafficSecrets;

const REGION_BYTES: usize = 64 * 1024;
const GUARD: u8 = 0xA5;

fn secrets() -> ConnectionTrafficSecrets {
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([7u8; 32]),
        iv: Iv::new([9u8; 12]),
    }
}

fuzz_target!(|data: &[u8]| {
    let memory = GuestMemory::anonymous(&[RegionSpec {
        gpa: 0,
        len: REGION_BYTES as u64,
    }])
    .expect("memory");
    let region = &memory.regions()[0];
    region.write(0, &[GUARD; REGION_BYTES]);
    let mut opener = RecordOpener::new(&secrets(), 0).expect("opener");
    let offset = usize::from(data.first().copied().unwrap_or(0)) * 64;
    let mut at = 1.min(data.len());
    while at + RECORD_HEADER_BYTES <= data.len() {
        let header: [u8; RECORD_HEADER_BYTES] =
            data[at..at + RECORD_HEADER_BYTES].try_into().unwrap();
        let (Ok(total), Ok(len)) = (record_len(&header), record_data_bytes(&header)) else {
            break;
        };
        let Some(record) = data.get(at..at + total) else {
            break;
        };
        if offset + len <= REGION_BYTES {
            // Random bytes are never authentic: an error, and only [offset, offset + len)
            // may have changed.
            assert!(opener.open_into(record, region, offset as u64).is_err());
            let mut back = vec![0u8; REGION_BYTES];
            region.read(0, &mut back);
            assert!(back[..offset].iter().all(|&b| b == GUARD));
            assert!(back[offset + len..].iter().all(|&b| b == GUARD));
            region.write(0, &[GUARD; REGION_BYTES]);
        }
        at += total;
    }
    // Our own records of the input open into memory to exactly it.
    let mut sealer = RecordSealer::new(&secrets(), 3).expect("sealer");
    let mut opener = RecordOpener::new(&secrets(), 3).expect("opener");
    let input = &data[..data.len().min(REGION_BYTES)];
    let mut wire = vec![0u8; input.len() + (input.len() / 16384 + 1) * RECORD_BYTES_MAX];
    let n = sealer
        .seal(input, CONTENT_APPLICATION_DATA, &mut wire)
        .expect("sealing fits");
    let (mut at, mut placed) = (0, 0u64);
    while at < n {
        let header: [u8; RECORD_HEADER_BYTES] =
            wire[at..at + RECORD_HEADER_BYTES].try_into().unwrap();
        let total = record_len(&header).expect("our own record");
        let got = opener
            .open_into(&wire[at..at + total], region, placed)
            .expect("our own record opens");
        assert_eq!(got, Direct::Placed);
        placed += record_data_bytes(&header).unwrap() as u64;
        at += total;
    }
    let mut back = vec![0u8; input.len()];
    region.read(0, &mut back);
    assert_eq!(back, input);
});
