//! Per-channel sender and receiver state machines: frame numbering, rounds, and every check a
//! receiver makes against its layout before a single byte is placed.

use crate::limits::{CHUNK_PAGES_MAX, DEVICE_CHUNK_BYTES_MAX, PAGE_BYTES};
use crate::pipeline::compress::Codec;

use super::blob::CHUNK_HEADER_BYTES;
use super::wire::{Frame, FrameKind};
use super::ProtocolError;

/// Sender side of one channel: hands out frame numbers and tracks the round. `Copy`, so a
/// caller can take a frame back (restore the state) when building it failed.
#[derive(Debug, Default, Clone, Copy)]
pub struct SenderChannel {
    next_frame: u64,
    round: u32,
}

impl SenderChannel {
    /// Starts a `Pages` frame for `region` in `frame` (the caller then adds pages).
    pub fn begin_pages(&mut self, frame: &mut Frame, region: u32) {
        frame.reset(FrameKind::Pages, region, self.take_number(), self.round);
    }

    /// Fills `frame` with the end-of-round marker and moves to the next round.
    pub fn end_round(&mut self, frame: &mut Frame) {
        frame.reset(FrameKind::EndOfRound, 0, self.take_number(), self.round);
        self.round += 1;
    }

    /// Fills `frame` with a keepalive marker (same round, next frame number).
    pub fn keepalive(&mut self, frame: &mut Frame) {
        frame.reset(FrameKind::Keepalive, 0, self.take_number(), self.round);
    }

    /// Fills `frame` with an abort frame carrying `payload_bytes` of code and reason.
    pub fn abort(&mut self, frame: &mut Frame, payload_bytes: u32) {
        frame.reset(FrameKind::Abort, 0, self.take_number(), self.round);
        frame.payload_bytes = payload_bytes;
    }

    /// Fills `frame` with a device state chunk of `payload_bytes` (chunk header included).
    pub fn device_state(&mut self, frame: &mut Frame, payload_bytes: u32) {
        frame.reset(FrameKind::DeviceState, 0, self.take_number(), self.round);
        frame.payload_bytes = payload_bytes;
    }

    /// Fills `frame` with the end-of-stream marker.
    pub fn end_stream(&mut self, frame: &mut Frame) {
        frame.reset(FrameKind::EndOfStream, 0, self.take_number(), self.round);
    }

    /// The round frames are currently stamped with.
    pub fn round(&self) -> u32 {
        self.round
    }

    fn take_number(&mut self) -> u64 {
        let n = self.next_frame;
        self.next_frame += 1;
        n
    }
}

/// What a checked frame asks the receiver to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Place the frame's pages: read `payload_bytes` into its normal runs, handle its zero runs.
    Pages,
    /// This channel finished `round`: wait at the barrier.
    EndOfRound(u32),
    /// This channel finished; the peer will close after the receiver's `Done`.
    EndOfStream,
    /// The sender is alive but has nothing to send.
    Keepalive,
    /// The sender failed; its payload (code and reason) says why.
    Aborted,
    /// A chunk of device state: read `payload_bytes` and hand them to a blob assembler.
    DeviceState,
}

/// Receiver side of one channel: validates each decoded frame against the layout and the
/// channel's sequence state. Only a frame that passes may touch memory.
#[derive(Debug)]
pub struct ReceiverChannel {
    region_pages: Box<[u64]>,
    next_frame: u64,
    round: u32,
    ended: bool,
    /// A device state chunk came: the memory rounds are over (only more device state, the
    /// end, an abort or keepalives may follow).
    device_state: bool,
    require_checksum: bool,
}

impl ReceiverChannel {
    /// A channel receiving into a layout whose regions have `region_pages` pages each.
    /// Plaintext channels set `require_checksum`: every frame with a payload must carry its
    /// checksum (under TLS the record AEAD covers the payload instead; a plaintext sender that
    /// announced [`FEATURE_UNCHECKED_PAGES`](super::handshake::FEATURE_UNCHECKED_PAGES), and
    /// was accepted, sends none).
    pub fn new(region_pages: &[u64], require_checksum: bool) -> Self {
        ReceiverChannel {
            region_pages: region_pages.into(),
            next_frame: 0,
            round: 0,
            ended: false,
            device_state: false,
            require_checksum,
        }
    }

    /// The round this channel is in.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// True after the end-of-stream marker.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Checks `frame` (already decoded by [`decode_runs`](super::wire::decode_runs)) and advances
    /// the channel state.
    pub fn accept(&mut self, frame: &Frame) -> Result<Event, ProtocolError> {
        if self.ended {
            return Err(ProtocolError::AfterEnd);
        }
        if frame.frame_number != self.next_frame {
            return Err(ProtocolError::FrameNumber {
                expected: self.next_frame,
                got: frame.frame_number,
            });
        }
        if frame.round != self.round {
            return Err(ProtocolError::Round {
                expected: self.round,
                got: frame.round,
            });
        }
        // Markers carry no flags: a live or checksummed marker is a sender that means
        // something this side does not understand.
        if frame.kind != FrameKind::Pages && frame.live {
            return Err(ProtocolError::Reserved("live flag of a marker"));
        }
        if frame.kind != FrameKind::Pages && frame.checksums().is_some() {
            return Err(ProtocolError::Reserved("checksum flag of a marker"));
        }
        // Device state is the VM's state at the pause: memory rounds after it would be newer
        // than the state the destination resumes with.
        if self.device_state && matches!(frame.kind, FrameKind::Pages | FrameKind::EndOfRound) {
            return Err(ProtocolError::AfterDeviceState);
        }
        let event = match frame.kind {
            FrameKind::Abort => {
                let fits = (4..=4 + super::control::CONTROL_REASON_BYTES_MAX as u32)
                    .contains(&frame.payload_bytes);
                if frame.region != 0
                    || frame.codec != Codec::Raw
                    || !frame.normal_runs().is_empty()
                    || !frame.zero_runs().is_empty()
                    || !fits
                {
                    return Err(ProtocolError::MarkerWithPayload("abort"));
                }
                self.ended = true;
                Event::Aborted
            }
            FrameKind::Pages => {
                self.check_pages(frame)?;
                Event::Pages
            }
            FrameKind::DeviceState => {
                let fits = (CHUNK_HEADER_BYTES as u32
                    ..=(CHUNK_HEADER_BYTES + DEVICE_CHUNK_BYTES_MAX) as u32)
                    .contains(&frame.payload_bytes);
                if frame.region != 0
                    || frame.codec != Codec::Raw
                    || !frame.normal_runs().is_empty()
                    || !frame.zero_runs().is_empty()
                    || frame.checksums().is_some()
                    || !fits
                {
                    return Err(ProtocolError::MarkerWithPayload("device state"));
                }
                self.device_state = true;
                Event::DeviceState
            }
            FrameKind::EndOfRound | FrameKind::EndOfStream | FrameKind::Keepalive => {
                let name = match frame.kind {
                    FrameKind::EndOfRound => "end-of-round",
                    FrameKind::EndOfStream => "end-of-stream",
                    _ => "keepalive",
                };
                if frame.region != 0
                    || frame.payload_bytes != 0
                    || frame.codec != Codec::Raw
                    || !frame.normal_runs().is_empty()
                    || !frame.zero_runs().is_empty()
                {
                    return Err(ProtocolError::MarkerWithPayload(name));
                }
                if frame.kind == FrameKind::EndOfRound {
                    self.round = self.round.checked_add(1).ok_or(ProtocolError::TooLarge {
                        what: "round",
                        value: u64::from(u32::MAX),
                        max: u64::from(u32::MAX) - 1,
                    })?;
                    Event::EndOfRound(frame.round)
                } else if frame.kind == FrameKind::Keepalive {
                    Event::Keepalive
                } else {
                    self.ended = true;
                    Event::EndOfStream
                }
            }
            FrameKind::Invalid => return Err(ProtocolError::BadKind(0)),
        };
        self.next_frame += 1;
        Ok(event)
    }

    fn check_pages(&self, frame: &Frame) -> Result<(), ProtocolError> {
        let Some(&region_pages) = self.region_pages.get(frame.region as usize) else {
            return Err(ProtocolError::Region {
                region: frame.region,
                regions: self.region_pages.len(),
            });
        };
        let normal = frame.normal_pages();
        let total = normal + frame.zero_pages();
        if total == 0 {
            return Err(ProtocolError::RunOrder(0));
        }
        if total > CHUNK_PAGES_MAX as u64 {
            return Err(ProtocolError::TooLarge {
                what: "pages in a frame",
                value: total,
                max: CHUNK_PAGES_MAX as u64,
            });
        }
        // Runs are sorted and disjoint (decode checked), so checking each end suffices.
        for run in frame.normal_runs().iter().chain(frame.zero_runs()) {
            if run.end() > region_pages {
                return Err(ProtocolError::RunOutOfBounds {
                    region: frame.region,
                    first_page: run.first_page,
                    pages: run.pages,
                    region_pages,
                });
            }
        }
        let expected = normal * PAGE_BYTES as u64;
        let got = u64::from(frame.payload_bytes);
        // Raw: exactly the pages. Compressed: something, and less than the pages (a sender never
        // compresses a frame that did not shrink); its decoded size is checked when decoding.
        let fits = match frame.codec {
            Codec::Raw => got == expected,
            _ => got > 0 && got < expected,
        };
        if !fits {
            return Err(ProtocolError::PayloadLength { expected, got });
        }
        if self.require_checksum && normal > 0 && frame.checksums().is_none() {
            return Err(ProtocolError::ChecksumMissing);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::FRAME_HEADER_BYTES_MAX;
    use crate::protocol::wire::{decode_fixed, decode_runs};

    fn through_wire(f: &Frame) -> Frame {
        let mut buf = [0u8; FRAME_HEADER_BYTES_MAX];
        let n = f.encode(&mut buf).unwrap();
        let fixed = decode_fixed(&buf[..n]).unwrap();
        let mut out = Frame::default();
        decode_runs(&fixed, &buf[crate::limits::FRAME_FIXED_BYTES..n], &mut out).unwrap();
        out
    }

    #[test]
    fn sender_and_receiver_agree_across_rounds() {
        let pages = [64u64, 8];
        let mut tx = SenderChannel::default();
        let mut rx = ReceiverChannel::new(&pages, false);
        let mut f = Frame::default();
        for round in 0..3 {
            tx.begin_pages(&mut f, 1);
            f.push_page(0, false).unwrap();
            f.push_page(7, true).unwrap();
            f.payload_bytes = 4096;
            assert_eq!(rx.accept(&through_wire(&f)), Ok(Event::Pages));
            tx.end_round(&mut f);
            assert_eq!(rx.accept(&through_wire(&f)), Ok(Event::EndOfRound(round)));
        }
        tx.end_stream(&mut f);
        assert_eq!(rx.accept(&through_wire(&f)), Ok(Event::EndOfStream));
        assert_eq!(rx.accept(&through_wire(&f)), Err(ProtocolError::AfterEnd));
    }

    #[test]
    fn device_state_ends_the_rounds_and_markers_carry_no_flags() {
        let pages = [8u64];
        let mut tx = SenderChannel::default();
        let mut f = Frame::default();
        // After a device state chunk: no pages, no end of a round; more state and the end are
        // fine.
        let mut rx = ReceiverChannel::new(&pages, false);
        tx.device_state(&mut f, CHUNK_HEADER_BYTES as u32 + 16);
        assert_eq!(rx.accept(&through_wire(&f)), Ok(Event::DeviceState));
        let mut after = tx;
        after.end_round(&mut f);
        assert_eq!(
            rx.accept(&through_wire(&f)),
            Err(ProtocolError::AfterDeviceState)
        );
        let mut after = tx;
        after.begin_pages(&mut f, 0);
        f.push_page(1, true).unwrap();
        assert_eq!(
            rx.accept(&through_wire(&f)),
            Err(ProtocolError::AfterDeviceState)
        );
        tx.device_state(&mut f, CHUNK_HEADER_BYTES as u32);
        assert_eq!(rx.accept(&through_wire(&f)), Ok(Event::DeviceState));
        tx.end_stream(&mut f);
        assert_eq!(rx.accept(&through_wire(&f)), Ok(Event::EndOfStream));
        // A marker with the live or the checksum flag: refused.
        let mut tx = SenderChannel::default();
        tx.end_round(&mut f);
        f.live = true;
        assert!(matches!(
            ReceiverChannel::new(&pages, false).accept(&through_wire(&f)),
            Err(ProtocolError::Reserved(_))
        ));
        f.live = false;
        f.begin_checksums();
        assert!(matches!(
            ReceiverChannel::new(&pages, false).accept(&through_wire(&f)),
            Err(ProtocolError::Reserved(_))
        ));
    }

    #[test]
    fn receiver_refuses_what_the_layout_cannot_hold() {
        let pages = [16u64];
        let mut f = Frame::default();
        let fresh = || ReceiverChannel::new(&pages, false);

        f.reset(FrameKind::Pages, 1, 0, 0);
        f.push_page(0, false).unwrap();
        f.payload_bytes = 4096;
        assert!(matches!(
            fresh().accept(&f),
            Err(ProtocolError::Region { .. })
        ));

        f.reset(FrameKind::Pages, 0, 0, 0);
        f.push_page(15, false).unwrap();
        f.push_page(16, false).unwrap();
        f.payload_bytes = 8192;
        assert!(matches!(
            fresh().accept(&f),
            Err(ProtocolError::RunOutOfBounds { .. })
        ));

        f.reset(FrameKind::Pages, 0, 0, 0);
        f.push_page(3, false).unwrap();
        f.payload_bytes = 4095;
        assert!(matches!(
            fresh().accept(&f),
            Err(ProtocolError::PayloadLength { .. })
        ));

        f.reset(FrameKind::Pages, 0, 1, 0);
        f.push_page(3, true).unwrap();
        assert!(matches!(
            fresh().accept(&f),
            Err(ProtocolError::FrameNumber { .. })
        ));

        f.reset(FrameKind::Pages, 0, 0, 1);
        f.push_page(3, true).unwrap();
        assert!(matches!(
            fresh().accept(&f),
            Err(ProtocolError::Round { .. })
        ));

        f.reset(FrameKind::EndOfRound, 0, 0, 0);
        f.push_page(3, true).unwrap();
        assert!(matches!(
            fresh().accept(&f),
            Err(ProtocolError::MarkerWithPayload(_))
        ));

        f.reset(FrameKind::Pages, 0, 0, 0);
        assert!(fresh().accept(&f).is_err(), "a frame without pages");

        // Plaintext: a payload without its checksum is refused; zero pages need none.
        f.reset(FrameKind::Pages, 0, 0, 0);
        f.push_page(2, false).unwrap();
        f.payload_bytes = 4096;
        let strict = || ReceiverChannel::new(&pages, true);
        assert_eq!(strict().accept(&f), Err(ProtocolError::ChecksumMissing));
        f.begin_checksums();
        f.push_checksum(1);
        assert_eq!(strict().accept(&f), Ok(Event::Pages));
        f.reset(FrameKind::Pages, 0, 0, 0);
        f.push_page(2, true).unwrap();
        assert_eq!(strict().accept(&f), Ok(Event::Pages));

        // Compressed payloads must be non-empty and smaller than the pages they carry.
        for (payload, ok) in [(0u32, false), (4096, false), (100, true)] {
            f.reset(FrameKind::Pages, 0, 0, 0);
            f.push_page(1, false).unwrap();
            f.codec = Codec::Zstd;
            f.payload_bytes = payload;
            assert_eq!(
                fresh().accept(&f).is_ok(),
                ok,
                "compressed payload of {payload}"
            );
        }
    }
}
