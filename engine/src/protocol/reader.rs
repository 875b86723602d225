//! The receiving side of one channel's frame stream, sans-IO: told which bytes arrived, it says
//! what it needs next (so many header bytes, the payload of an accepted frame, the round
//! barrier) and hands out each frame only after every check ([`decode_fixed`],
//! [`decode_runs`], [`ReceiverChannel::accept`]) has passed. The receiver shard drives it over
//! io_uring; the fuzzer drives it with arbitrary bytes.
//!
//! ```text
//!  Fixed ──32 bytes──▶ Runs ──12 × runs──▶ Checksums ──8 × pages──▶ accepted:
//!    ▲                                                                 Pages       ─▶ Payload ─payload_done─┐
//!    │                                                                 Keepalive   ─────────────────────────┤
//!    │                                                                 EndOfRound  ─▶ AtBarrier ─resume─────┤
//!    └──────────────────────────────────────────────────────────────────────────────────────────────────────┘
//!                                                                      EndOfStream ─▶ Ended
//! ```
//! Any error is final: the channel fails and nothing of the bad frame is handed out.

#![forbid(unsafe_code)]

use crate::limits::{FRAME_FIXED_BYTES, FRAME_HEADER_BYTES_MAX};

use super::channel::{Event, ReceiverChannel};
use super::wire::{decode_fixed, decode_runs, FixedHeader, Frame};
use super::ProtocolError;

/// Where the reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a frame boundary: the fixed header comes next.
    Fixed,
    /// The fixed header is in; `runs` bytes of run list follow.
    Runs { fixed: FixedHeader, runs: usize },
    /// The runs are in; `sums` bytes of page checksums follow.
    Checksums {
        fixed: FixedHeader,
        runs: usize,
        sums: usize,
    },
    /// A `Pages` frame was accepted: the caller moves its payload, then `payload_done`.
    Payload,
    /// An end-of-round marker was accepted: the caller waits at the barrier, then `resume`.
    AtBarrier,
    /// The end-of-stream marker was accepted: nothing more may arrive.
    Ended,
    /// A check failed; the channel is dead.
    Failed,
}

/// What the reader needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Exactly this many bytes into [`FrameReader::header_mut`], then
    /// [`FrameReader::header_filled`].
    Header(usize),
    /// The accepted frame's payload, then [`FrameReader::payload_done`].
    Payload,
    /// The round barrier, then [`FrameReader::resume`].
    Barrier,
    /// Nothing: the stream ended (or failed).
    Nothing,
}

/// The frame-stream state machine of one receiving channel (see the module docs).
#[derive(Debug)]
pub struct FrameReader {
    channel: ReceiverChannel,
    state: State,
    header: Box<[u8; FRAME_HEADER_BYTES_MAX]>,
    /// Bytes of the last accepted frame's header.
    header_len: usize,
}

impl FrameReader {
    /// A reader for a layout of `region_pages` pages per region; `require_checksum` on
    /// plaintext channels (see [`ReceiverChannel::new`]).
    pub fn new(region_pages: &[u64], require_checksum: bool) -> Self {
        FrameReader {
            channel: ReceiverChannel::new(region_pages, require_checksum),
            state: State::Fixed,
            header: Box::new([0; FRAME_HEADER_BYTES_MAX]),
            header_len: 0,
        }
    }

    /// What to do next.
    pub fn need(&self) -> Need {
        match self.state {
            State::Fixed => Need::Header(FRAME_FIXED_BYTES),
            State::Runs { runs, .. } => Need::Header(runs),
            State::Checksums { sums, .. } => Need::Header(sums),
            State::Payload => Need::Payload,
            State::AtBarrier => Need::Barrier,
            State::Ended | State::Failed => Need::Nothing,
        }
    }

    /// True at a frame boundary (where a clean end of the connection is not mid-frame).
    pub fn at_boundary(&self) -> bool {
        self.state == State::Fixed
    }

    /// The round the channel is in.
    pub fn round(&self) -> u32 {
        self.channel.round()
    }

    /// Bytes of the last accepted frame's header.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Where the bytes of [`Need::Header`] go.
    pub fn header_mut(&mut self) -> &mut [u8] {
        let (at, len) = match self.state {
            State::Fixed => (0, FRAME_FIXED_BYTES),
            State::Runs { runs, .. } => (FRAME_FIXED_BYTES, runs),
            State::Checksums { runs, sums, .. } => (FRAME_FIXED_BYTES + runs, sums),
            other => panic!("no header bytes are needed in state {other:?}"),
        };
        &mut self.header[at..at + len]
    }

    /// The bytes of [`Need::Header`] are in: checks them and moves on. When a whole frame is in
    /// and accepted, decodes it into `frame` and returns its event.
    pub fn header_filled(&mut self, frame: &mut Frame) -> Result<Option<Event>, ProtocolError> {
        let result = self.step(frame);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn step(&mut self, frame: &mut Frame) -> Result<Option<Event>, ProtocolError> {
        let next = match self.state {
            State::Fixed => {
                let fixed = decode_fixed(&self.header[..FRAME_FIXED_BYTES])?;
                State::Runs {
                    fixed,
                    runs: fixed.runs_bytes(),
                }
            }
            State::Runs { fixed, runs } => {
                let at = FRAME_FIXED_BYTES;
                let sums = fixed.checksums_bytes(&self.header[at..at + runs])?;
                State::Checksums { fixed, runs, sums }
            }
            State::Checksums { fixed, runs, sums } => {
                let at = FRAME_FIXED_BYTES;
                decode_runs(&fixed, &self.header[at..at + runs + sums], frame)?;
                let event = self.channel.accept(frame)?;
                self.header_len = at + runs + sums;
                self.state = match event {
                    Event::Pages | Event::Aborted | Event::DeviceState => State::Payload,
                    Event::EndOfRound(_) => State::AtBarrier,
                    Event::EndOfStream => State::Ended,
                    Event::Keepalive => State::Fixed,
                };
                return Ok(Some(event));
            }
            other => panic!("header bytes filled in state {other:?}"),
        };
        self.state = next;
        // Empty run lists and checksum lists need no bytes: move through them at once.
        if matches!(self.need(), Need::Header(0)) {
            return self.step(frame);
        }
        Ok(None)
    }

    /// The accepted frame's payload has been moved.
    pub fn payload_done(&mut self) {
        assert_eq!(self.state, State::Payload, "payload_done without a payload");
        self.state = if self.channel.ended() {
            State::Ended
        } else {
            State::Fixed
        };
    }

    /// The round barrier released this channel.
    pub fn resume(&mut self) {
        assert_eq!(self.state, State::AtBarrier, "resume without a barrier");
        self.state = State::Fixed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameKind, SenderChannel};

    fn encode(f: &Frame) -> Vec<u8> {
        let mut buf = vec![0u8; f.header_bytes()];
        f.encode(&mut buf).unwrap();
        buf
    }

    /// Feeds `bytes` to `r` as it asks, skipping payloads; returns the events.
    fn drive(r: &mut FrameReader, mut bytes: &[u8]) -> Result<Vec<Event>, ProtocolError> {
        let mut frame = Frame::default();
        let mut events = Vec::new();
        loop {
            match r.need() {
                Need::Header(n) => {
                    let Some(chunk) = bytes.get(..n) else {
                        return Ok(events);
                    };
                    r.header_mut().copy_from_slice(chunk);
                    bytes = &bytes[n..];
                    if let Some(e) = r.header_filled(&mut frame)? {
                        events.push(e);
                    }
                }
                Need::Payload => {
                    let n = frame.payload_bytes as usize;
                    bytes = bytes.get(n..).unwrap_or(&[]);
                    r.payload_done();
                }
                Need::Barrier => r.resume(),
                Need::Nothing => return Ok(events),
            }
        }
    }

    #[test]
    fn a_stream_of_frames_comes_out_as_events_in_order() {
        let mut tx = SenderChannel::default();
        let mut f = Frame::default();
        let mut stream = Vec::new();
        tx.begin_pages(&mut f, 0);
        f.push_page(1, false).unwrap();
        f.push_page(2, true).unwrap();
        f.payload_bytes = 4096;
        f.begin_checksums();
        f.push_checksum(9);
        stream.extend(encode(&f));
        stream.extend([0u8; 4096]);
        tx.keepalive(&mut f);
        stream.extend(encode(&f));
        tx.end_round(&mut f);
        stream.extend(encode(&f));
        tx.end_stream(&mut f);
        stream.extend(encode(&f));
        let mut r = FrameReader::new(&[8], true);
        let events = drive(&mut r, &stream).unwrap();
        assert_eq!(
            events,
            [
                Event::Pages,
                Event::Keepalive,
                Event::EndOfRound(0),
                Event::EndOfStream
            ]
        );
        assert_eq!(r.need(), Need::Nothing);
    }

    proptest::proptest! {
        /// Whatever a sender channel encodes (pages of either kind, markers, keepalives, over
        /// rounds), the reader hands back the same frames in order, split at any byte.
        #[test]
        fn what_a_sender_encodes_the_reader_hands_back(
            steps in proptest::collection::vec((0u8..4, proptest::collection::vec(0u64..64, 1..20)), 1..30),
            cuts in proptest::collection::vec(1usize..200, 1..50),
        ) {
            let mut tx = SenderChannel::default();
            let mut f = Frame::default();
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for (kind, pages) in &steps {
                match kind {
                    0 | 1 => {
                        tx.begin_pages(&mut f, 0);
                        let mut pages = pages.clone();
                        pages.sort_unstable();
                        pages.dedup();
                        for &p in &pages {
                            f.push_page(p, (p + u64::from(*kind)) % 3 == 0).unwrap();
                        }
                        f.payload_bytes = (f.normal_pages() * 4096) as u32;
                        f.begin_checksums();
                        for i in 0..f.normal_pages() {
                            f.push_checksum(i);
                        }
                        stream.extend(encode(&f));
                        stream.extend(vec![0u8; f.payload_bytes as usize]);
                        want.push(Event::Pages);
                    }
                    2 => {
                        tx.end_round(&mut f);
                        stream.extend(encode(&f));
                        want.push(Event::EndOfRound(tx.round() - 1));
                    }
                    _ => {
                        tx.keepalive(&mut f);
                        stream.extend(encode(&f));
                        want.push(Event::Keepalive);
                    }
                }
            }
            tx.end_stream(&mut f);
            stream.extend(encode(&f));
            want.push(Event::EndOfStream);
            // Feed the stream in arbitrary pieces: the reader only ever asks for whole parts.
            let mut r = FrameReader::new(&[64], true);
            let mut got = Vec::new();
            let mut frame = Frame::default();
            let (mut at, mut cut) = (0usize, 0usize);
            while at < stream.len() {
                match r.need() {
                    Need::Header(n) => {
                        r.header_mut().copy_from_slice(&stream[at..at + n]);
                        at += n;
                        if let Some(e) = r.header_filled(&mut frame).unwrap() {
                            got.push(e);
                        }
                    }
                    Need::Payload => {
                        // The payload arrives in pieces of the proptest's cuts.
                        let mut left = frame.payload_bytes as usize;
                        while left > 0 {
                            let n = cuts[cut % cuts.len()].min(left);
                            cut += 1;
                            left -= n;
                            at += n;
                        }
                        r.payload_done();
                    }
                    Need::Barrier => r.resume(),
                    Need::Nothing => break,
                }
            }
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(r.need(), Need::Nothing);
        }
    }

    #[test]
    fn errors_are_final_and_nothing_is_handed_out() {
        let mut f = Frame::default();
        f.reset(FrameKind::Pages, 0, 0, 0);
        f.push_page(9, false).unwrap(); // outside the 8-page region
        f.payload_bytes = 4096;
        f.begin_checksums();
        f.push_checksum(1);
        let mut r = FrameReader::new(&[8], true);
        assert!(drive(&mut r, &encode(&f)).is_err());
        assert_eq!(r.need(), Need::Nothing);
    }
}
