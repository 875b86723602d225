//! Unit tests of sealing and opening records in place: tampering, limits, key updates.
use super::*;
use rustls::crypto::cipher::{AeadKey, Iv};

fn secrets(b: u8) -> ConnectionTrafficSecrets {
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([b; 32]),
        iv: Iv::new([b ^ 0x55; 12]),
    }
}

#[test]
fn sealed_records_open_and_tampering_is_refused() {
    let mut tx = RecordSealer::new(&secrets(1), 7).unwrap();
    let mut rx = RecordOpener::new(&secrets(1), 7).unwrap();
    let mut buf = vec![0u8; RECORD_BYTES_MAX];
    for len in [0usize, 1, 100, RECORD_PLAINTEXT_BYTES_MAX] {
        for (i, b) in buf[5..5 + len].iter_mut().enumerate() {
            *b = i as u8;
        }
        let n = tx
            .seal_in_place(&mut buf, len, CONTENT_APPLICATION_DATA)
            .unwrap();
        assert_eq!(n, len + RECORD_OVERHEAD_BYTES);
        let mut copy = buf[..n].to_vec();
        let (ty, range) = rx.open_in_place(&mut copy).unwrap();
        assert_eq!(ty, CONTENT_APPLICATION_DATA);
        assert_eq!(range.len(), len);
        assert!(copy[range].iter().enumerate().all(|(i, &b)| b == i as u8));
    }
    // One flipped ciphertext byte: refused. The opener's sequence moved on, as a real peer's.
    let n = tx
        .seal_in_place(&mut buf, 64, CONTENT_APPLICATION_DATA)
        .unwrap();
    let mut bad = buf[..n].to_vec();
    bad[20] ^= 1;
    assert_eq!(rx.open_in_place(&mut bad), Err(RecordError::Authentication));
    // Wrong key, wrong sequence: refused.
    let mut other = RecordOpener::new(&secrets(2), 11).unwrap();
    let n = tx
        .seal_in_place(&mut buf, 64, CONTENT_APPLICATION_DATA)
        .unwrap();
    assert_eq!(
        other.open_in_place(&mut buf[..n].to_vec()),
        Err(RecordError::Authentication)
    );
}

#[test]
fn oversized_plaintext_and_bad_key_updates_are_refused() {
    // A record whose plaintext exceeds 2^14 bytes (possible within the ciphertext limit).
    let mut tx = RecordSealer::new(&secrets(3), 0).unwrap();
    let mut rx = RecordOpener::new(&secrets(3), 0).unwrap();
    let mut buf = vec![0u8; RECORD_BYTES_MAX + 64];
    let len = RECORD_PLAINTEXT_BYTES_MAX + 10;
    // Seal by hand past the sealer's own limit, as a hostile peer would.
    let ciphertext = len + 1 + TAG_BYTES;
    let header = [0x17, 3, 3, (ciphertext >> 8) as u8, ciphertext as u8];
    buf[..5].copy_from_slice(&header);
    buf[5 + len] = CONTENT_APPLICATION_DATA;
    let nonce = tx.keys.next_nonce().unwrap();
    let (body, rest) = buf[5..].split_at_mut(len + 1);
    let tag = tx
        .keys
        .key
        .seal_in_place_separate_tag(nonce, Aad::from(header), body)
        .unwrap();
    rest[..TAG_BYTES].copy_from_slice(tag.as_ref());
    assert!(matches!(
        rx.open_in_place(&mut buf[..5 + ciphertext]),
        Err(RecordError::TooLong(_))
    ));
    assert_eq!(check_key_update(&KEY_UPDATE_MESSAGE), Ok(false));
    assert_eq!(check_key_update(&KEY_UPDATE_REQUEST), Ok(true));
    for bad in [
        &[24u8, 0, 0, 1, 2][..],
        &[4, 0, 0, 1, 0],
        &[24, 0, 0, 1],
        &[],
    ] {
        assert_eq!(
            check_key_update(bad),
            Err(RecordError::UnexpectedHandshake),
            "{bad:?}"
        );
    }
}

#[test]
fn headers_are_checked() {
    assert!(matches!(
        record_len(&[0x16, 3, 1, 0, 10]),
        Err(RecordError::BadHeader(0x16))
    ));
    assert!(matches!(
        record_len(b"PAGEW"),
        Err(RecordError::BadHeader(b'P'))
    ));
    assert!(matches!(
        record_len(&[0x17, 3, 3, 0xff, 0xff]),
        Err(RecordError::TooLong(_))
    ));
    assert_eq!(record_len(&[0x17, 3, 3, 0, 17]), Ok(22));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Sealing gathered pieces (buffers and guest ranges) gives the records that copying
    /// them in and sealing in place gives, and opening into guest memory gives what opening
    /// in place gives, with the sequence numbers in step.
    #[test]
    fn gathered_and_direct_records_match_the_in_place_ones(
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..40_000),
        cuts in proptest::collection::vec((0usize..40_000, proptest::prelude::any::<bool>()), 0..12),
        aes128 in proptest::prelude::any::<bool>(),
    ) {
        use crate::memory::{GuestMemory, RegionSpec};
        let sealer = || if aes128 {
            RecordSealer::aes128(&[3; 16], [4; 12], 5).unwrap()
        } else {
            RecordSealer::new(&secrets(8), 5).unwrap()
        };
        let opener = || if aes128 {
            RecordOpener::aes128(&[3; 16], [4; 12], 5).unwrap()
        } else {
            RecordOpener::new(&secrets(8), 5).unwrap()
        };
        let memory = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 40_960 }]).unwrap();
        let region = &memory.regions()[0];
        region.write(0, &data);
        // Pieces: cut points over the data, each piece from memory or from the buffer.
        let mut points: Vec<usize> = cuts.iter().map(|c| c.0 % data.len()).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        points.dedup();
        let (mut gathered, mut copied) = (sealer(), sealer());
        let (mut opener_direct, mut opener_in_place) = (opener(), opener());
        let dest = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 40_960 }]).unwrap();
        let mut start = 0;
        let mut out_at = 0u64;
        while start < data.len() {
            let end = (start + RECORD_PLAINTEXT_BYTES_MAX).min(data.len());
            let mut pieces = Vec::new();
            let mut at = start;
            for (i, w) in points.windows(2).enumerate() {
                let (a, b) = (w[0].max(start), w[1].min(end));
                if a >= b {
                    continue;
                }
                pieces.push(if cuts.get(i).is_some_and(|c| c.1) {
                    Piece::Guest(region.range(a as u64, b - a))
                } else {
                    Piece::Bytes(&data[a..b])
                });
                at = b;
            }
            proptest::prop_assert_eq!(at, end);
            let mut a = vec![0u8; RECORD_BYTES_MAX];
            let mut b = vec![0u8; RECORD_BYTES_MAX];
            let na = gathered.seal_pieces(&mut a, &pieces, CONTENT_APPLICATION_DATA).unwrap();
            b[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + end - start]
                .copy_from_slice(&data[start..end]);
            let nb = copied.seal_in_place(&mut b, end - start, CONTENT_APPLICATION_DATA).unwrap();
            proptest::prop_assert_eq!(&a[..na], &b[..nb]);
            let got = opener_direct.open_into(&a[..na], &dest.regions()[0], out_at).unwrap();
            if opener_direct.opens_direct() {
                proptest::prop_assert_eq!(got, Direct::Placed);
            } else {
                // `ring`: no direct open; the record is left for the in-place one.
                proptest::prop_assert_eq!(got, Direct::InPlace);
                let mut c = a[..na].to_vec();
                let (_, r) = opener_direct.open_in_place(&mut c).unwrap();
                dest.regions()[0].write(out_at, &c[r]);
            }
            let (ty, r) = opener_in_place.open_in_place(&mut b[..nb]).unwrap();
            proptest::prop_assert_eq!(ty, CONTENT_APPLICATION_DATA);
            proptest::prop_assert_eq!(&b[r], &data[start..end]);
            out_at += (end - start) as u64;
            start = end;
        }
        let mut back = vec![0u8; data.len()];
        dest.regions()[0].read(0, &mut back);
        proptest::prop_assert_eq!(back, data);
    }
}

#[test]
fn a_key_update_goes_in_place_and_the_sequence_stays() {
    use crate::memory::{GuestMemory, RegionSpec};
    let mut sealer = RecordSealer::new(&secrets(2), 0).unwrap();
    let mut opener = RecordOpener::new(&secrets(2), 0).unwrap();
    if !opener.opens_direct() {
        eprintln!("skipped: this crypto provider opens records in place only");
        return;
    }
    let mut wire = vec![0u8; 4 * RECORD_BYTES_MAX];
    let mut n = sealer
        .seal(&KEY_UPDATE_MESSAGE, CONTENT_HANDSHAKE, &mut wire)
        .unwrap();
    let second = n;
    n += sealer
        .seal(b"after", CONTENT_APPLICATION_DATA, &mut wire[n..])
        .unwrap();
    let dest = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 4096 }]).unwrap();
    let region = &dest.regions()[0];
    // The key update is no data: it comes back for the in-place open, sequence unused.
    assert_eq!(
        opener.open_into(&wire[..second], region, 0).unwrap(),
        Direct::InPlace
    );
    let (ty, _) = opener.open_in_place(&mut wire[..second]).unwrap();
    assert_eq!(ty, CONTENT_HANDSHAKE);
    assert_eq!(
        opener.open_into(&wire[second..n], region, 0).unwrap(),
        Direct::Placed
    );
    let mut back = [0u8; 5];
    region.read(0, &mut back);
    assert_eq!(&back, b"after");
    // A corrupted record is an error, not a fallback.
    let mut bad = wire[second..n].to_vec();
    bad[7] ^= 1;
    let mut fresh = RecordOpener::new(&secrets(2), 1).unwrap();
    assert_eq!(
        fresh.open_into(&bad, region, 0),
        Err(RecordError::Authentication)
    );
}

#[test]
fn records_taken_back_are_numbered_again() {
    // A frame whose records were sealed but never sent (it failed after its seal) gives its
    // numbers back: the record sealed next opens where the peer expects it.
    let mut tx = RecordSealer::new(&secrets(4), 3).unwrap();
    let mut rx = RecordOpener::new(&secrets(4), 3).unwrap();
    let mut buf = vec![0u8; RECORD_BYTES_MAX];
    let first = tx.sequence();
    for _ in 0..2 {
        tx.seal_in_place(&mut buf, 100, CONTENT_APPLICATION_DATA)
            .unwrap();
    }
    assert_eq!(tx.sequence(), first + 2);
    tx.rewind(first);
    assert_eq!(tx.sequence(), first);
    buf[5..9].copy_from_slice(b"why!");
    let n = tx.seal_in_place(&mut buf, 4, CONTENT_ALERT).unwrap();
    let (ty, range) = rx.open_in_place(&mut buf[..n]).unwrap();
    assert_eq!((ty, &buf[range]), (CONTENT_ALERT, &b"why!"[..]));
}
