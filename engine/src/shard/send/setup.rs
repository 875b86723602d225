//! Setting a send shard up: its ring (and zero-copy mode), slots sized for the channel's
//! encryption and compression, and its channel machine.

use super::*;

impl SendShard {
    /// A shard for channel `p.channel` over its handshaken connection `socket`.
    pub(crate) fn new(p: SendShardParams, socket: crate::stream::Stream) -> Result<Self> {
        let compressing = p.compression != Compression::None;
        let slot_bytes = match (p.tls.is_some(), compressing) {
            (true, _) => SLOT_BYTES_TLS,
            (false, true) => SLOT_BYTES_COMPRESSED,
            (false, false) => SLOT_BYTES_PLAIN,
        };
        let compressor = if compressing {
            Some(
                Compressor::new(p.zstd_level)
                    .map_err(|e| Error::io("creating a zstd context", e))?,
            )
        } else {
            None
        };
        // The kernel has no zero-copy sends (MSG_ZEROCOPY, SEND_ZC) on UNIX sockets.
        let zc_socket = matches!(socket, crate::stream::Stream::Tcp(_));
        let (mut ring, caps) = crate::shard::open_ring(
            socket,
            true,
            p.memory.clone(),
            (SHARD_FRAMES_IN_FLIGHT_MAX + 1, slot_bytes),
            p.faults,
            (p.channel, p.idle),
        )?;
        let zc = match p.zero_copy {
            _ if !caps.send_zc || !zc_socket => ZcState::Plain,
            ZeroCopy::Off => ZcState::Plain,
            ZeroCopy::On => ZcState::ZeroCopy,
            ZeroCopy::Auto => ZcState::Probing,
        };
        let mut registered = p.zero_copy == ZeroCopy::On && p.tls.is_none();
        if registered {
            if !caps.send_zc {
                return Err(Error::Unsupported(
                    "IORING_OP_SEND_ZC (zero-copy send), which --zero-copy on requires",
                ));
            }
            if !zc_socket {
                return Err(Error::Unsupported(
                    "zero-copy sends on a UNIX socket, which --zero-copy on requires",
                ));
            }
            // Fixed buffers need pages the kernel may pin for writing: a read-only RAM image
            // (or a shared file mapping) is refused, and is then sent zero-copy all the same,
            // each send pinning its pages.
            if let Err(e) = ring.register_guest_memory() {
                tracing::warn!(
                    channel = p.channel,
                    "guest memory cannot be registered as fixed buffers; zero-copy sends go without them: {e}"
                );
                registered = false;
            }
        }
        let placeholder = Buf::Slab {
            slot: 0,
            offset: 0,
            len: 0,
        };
        let slots = (0..SHARD_FRAMES_IN_FLIGHT_MAX)
            .map(|_| FrameSlot {
                state: SlotState::Free,
                codec: Codec::Raw,
                pieces: [placeholder; 1 + FRAME_RUNS_MAX],
                n_pieces: 0,
                bytes: 0,
                pages: 0,
                marker: Marker::None,
            })
            .collect();
        let stats = ShardStats {
            channel: p.channel,
            // Registered just above, or not at all yet.
            fixed_buffers: registered,
            unchecked_pages: !p.page_checksums && p.tls.is_none(),
            ..ShardStats::default()
        };
        Ok(SendShard {
            channel: p.channel,
            ring,
            memory: p.memory,
            scanner: ZeroScanner::detect(),
            hash: Xxh3::detect(),
            page_checksums: p.page_checksums && p.tls.is_none(),
            m: SenderMachine::new(p.tls.is_some(), p.idle, p.keepalive_every, Instant::now()),
            frame: Box::default(),
            slots,
            ready: VecDeque::with_capacity(SHARD_FRAMES_IN_FLIGHT_MAX),
            chain: Vec::with_capacity(CHAIN_FRAMES_MAX * (1 + FRAME_RUNS_MAX)),
            chain_outstanding: 0,
            zc,
            control: ControlReader::default(),
            control_posted: false,
            work: p.work,
            pool: p.pool,
            pool_drained: p.pool_drained,
            events: p.events,
            abort: p.abort,
            progress: p.progress,
            stats,
            scratch: if compressing {
                vec![0; FRAME_PAYLOAD_BYTES_MAX]
            } else {
                Vec::new()
            },
            packed: if compressing && p.tls.is_some() {
                vec![0; FRAME_PAYLOAD_BYTES_MAX]
            } else {
                Vec::new()
            },
            tls: p.tls,
            tls_records_per_key: p.tls_records_per_key,
            sealed_from: None,
            header: [0; FRAME_HEADER_BYTES_MAX],
            compression: p.compression,
            compressor,
            auto: Auto::new(),
            chain_started: Instant::now(),
            chain_bytes: 0,
            pace: p.pace,
            channels: p.channels,
            pace_until: Instant::now(),
            paced_bytes_per_s: None,
            pace_floor_told: false,
            awaited_round: false,
            body: Box::new([0; BODY_BYTES_MAX]),
        })
    }
}
