//! Unit tests of the wire format: round trips, truncations, bit flips, run bounds.
use super::*;
use crate::limits::FRAME_HEADER_BYTES_MAX;

fn sample() -> Frame {
    let mut f = Frame::default();
    f.reset(FrameKind::Pages, 3, 77, 2);
    for p in [10, 11, 12, 20, 22] {
        f.push_page(p, false).unwrap();
    }
    for p in [13, 14, 21] {
        f.push_page(p, true).unwrap();
    }
    f.payload_bytes = (f.normal_pages() * 4096) as u32;
    f.live = true;
    f.begin_checksums();
    for i in 0..f.normal_pages() {
        f.push_checksum(0x0123_4567_89ab_cdef ^ i);
    }
    f
}

fn roundtrip(f: &Frame) -> Result<Frame, ProtocolError> {
    let mut buf = [0u8; FRAME_HEADER_BYTES_MAX];
    let n = f.encode(&mut buf).unwrap();
    let fixed = decode_fixed(&buf[..n])?;
    let mut out = Frame::default();
    decode_runs(&fixed, &buf[FRAME_FIXED_BYTES..n], &mut out)?;
    Ok(out)
}

#[test]
fn round_trip_keeps_every_field() {
    let f = sample();
    assert_eq!(f.normal_runs().len(), 3);
    assert_eq!(f.zero_runs().len(), 2);
    assert_eq!(roundtrip(&f).unwrap(), f);
    let mut marker = Frame::default();
    marker.reset(FrameKind::EndOfStream, 0, u64::MAX, u32::MAX);
    assert_eq!(roundtrip(&marker).unwrap(), marker);
}

#[test]
fn every_truncation_is_an_error() {
    let f = sample();
    let mut buf = [0u8; FRAME_HEADER_BYTES_MAX];
    let n = f.encode(&mut buf).unwrap();
    for cut in 0..n {
        let bytes = &buf[..cut];
        let result = decode_fixed(bytes).and_then(|fixed| {
            let mut out = Frame::default();
            decode_runs(&fixed, &bytes[FRAME_FIXED_BYTES.min(cut)..], &mut out)
        });
        assert!(
            result.is_err(),
            "a header cut at {cut} of {n} bytes decoded"
        );
    }
}

#[test]
fn every_single_bit_flip_is_an_error() {
    let f = sample();
    let mut buf = [0u8; FRAME_HEADER_BYTES_MAX];
    let n = f.encode(&mut buf).unwrap();
    for byte in 0..n {
        for bit in 0..8 {
            let mut garbled = buf;
            garbled[byte] ^= 1 << bit;
            assert!(
                roundtrip_bytes(&garbled[..n]).is_err(),
                "flip of bit {bit} in byte {byte} went unnoticed"
            );
        }
    }
}

fn roundtrip_bytes(bytes: &[u8]) -> Result<Frame, ProtocolError> {
    let fixed = decode_fixed(bytes)?;
    let mut out = Frame::default();
    decode_runs(&fixed, &bytes[FRAME_FIXED_BYTES..], &mut out)?;
    Ok(out)
}

#[test]
fn overlapping_or_empty_runs_are_refused() {
    // One checksum per normal page again after a run was changed by hand.
    fn recount(f: &mut Frame) {
        f.begin_checksums();
        for _ in 0..f.normal_pages() {
            f.push_checksum(7);
        }
    }
    let mut f = sample();
    f.normal[1] = Run {
        first_page: 13,
        pages: 1,
    }; // collides with zero run 13..15
    recount(&mut f);
    assert!(matches!(roundtrip(&f), Err(ProtocolError::RunOrder(13))));
    let mut f = sample();
    f.zero[0].pages = 0;
    assert!(matches!(roundtrip(&f), Err(ProtocolError::RunOrder(_))));
    let mut f = sample();
    f.normal[2].first_page = u64::MAX;
    f.normal[2].pages = 2;
    recount(&mut f);
    assert!(roundtrip(&f).is_err());
    // More checksummed pages than a frame holds: refused before they would be read.
    let f = sample();
    let mut buf = [0u8; FRAME_HEADER_BYTES_MAX];
    let n = f.encode(&mut buf).unwrap();
    buf[FRAME_FIXED_BYTES + 8..FRAME_FIXED_BYTES + 12].copy_from_slice(&200u32.to_le_bytes());
    assert!(matches!(
        roundtrip_bytes(&buf[..n]),
        Err(ProtocolError::TooLarge { value: 202, .. })
    ));
}

#[test]
fn push_page_merges_and_bounds_runs() {
    let mut f = Frame::default();
    f.reset(FrameKind::Pages, 0, 0, 0);
    for p in 0..FRAME_RUNS_MAX as u64 {
        f.push_page(p * 2, false).unwrap();
    }
    assert_eq!(f.push_page(1000, false), Err(RunsFull));
    f.reset(FrameKind::Pages, 0, 0, 0);
    for p in 0..1000 {
        f.push_page(p, true).unwrap();
    }
    assert_eq!(
        f.zero_runs(),
        &[Run {
            first_page: 0,
            pages: 1000
        }]
    );
}

#[test]
fn small_buffer_is_reported() {
    let f = sample();
    let mut buf = [0u8; 40];
    assert_eq!(
        f.encode(&mut buf),
        Err(BufferTooSmall {
            need: f.header_bytes(),
            have: 40
        })
    );
}
