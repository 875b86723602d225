//! Every bound pagewire lives by, each with its unit in the name.
//!
//! Pools, queues, frames, loops and timeouts are sized here, at compile time, so memory use and
//! latency are predictable and a violated relation fails the build instead of a transfer.

/// Bytes in one guest page. Wire protocol v2 moves 4 KiB pages only; the handshake carries the
/// value so a future version can negotiate others.
pub const PAGE_BYTES: usize = 4096;

/// Pages in one chunk, the unit of work a shard scans and sends as one frame: 128 pages =
/// 512 KiB. Large enough that per-frame costs (a header, a few syscalls, ~2 µs) stay under 2%
/// of the ~130 µs a loopback copy of 512 KiB takes; small enough that 2 × 16 frames in flight
/// per shard stay in L2/L3-friendly territory and the round barrier is not delayed for long.
pub const CHUNK_PAGES_MAX: usize = 128;

/// Bytes of page payload in one frame at most.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = CHUNK_PAGES_MAX * PAGE_BYTES;

/// Runs (normal plus zero) one frame may carry. Runs of one kind never touch, so the worst case,
/// pages alternating zero and non-zero, needs one run per page.
pub const FRAME_RUNS_MAX: usize = CHUNK_PAGES_MAX;

/// Bytes of the fixed part of a frame header.
pub const FRAME_FIXED_BYTES: usize = 32;

/// Bytes of one encoded page run (first page u64 + page count u32).
pub const RUN_BYTES: usize = 12;

/// Bytes of one page's payload checksum (XXH3-64).
pub const PAGE_CHECKSUM_BYTES: usize = 8;

/// Bytes of the largest frame header: the fixed part, the most runs, a checksum per page.
pub const FRAME_HEADER_BYTES_MAX: usize =
    FRAME_FIXED_BYTES + RUN_BYTES * FRAME_RUNS_MAX + PAGE_CHECKSUM_BYTES * CHUNK_PAGES_MAX;

/// Bytes of the handshake `Hello` a sender opens each connection with.
pub const HELLO_BYTES: usize = 96;

/// Bytes of the receiver's handshake reply and of each later control message.
pub const CONTROL_BYTES: usize = 16;

/// Channels (connections, shards) per transfer at most. The handshake encodes the index in a
/// u16; 64 is far beyond the core counts one NIC can use, and bounds receiver threads.
pub const CHANNELS_MAX: usize = 64;
/// Tries of a KVM ioctl that signals keep interrupting (`EINTR`) before it counts as failed.
pub const KVM_EINTR_TRIES_MAX: u32 = 100;
/// Pages one `KVM_CLEAR_DIRTY_LOG` call clears at most (1 GiB of 4 KiB pages, QEMU's default
/// clear granularity): KVM holds its MMU lock for one call, so a large slot's clear comes in
/// steps that let vCPUs fault in between. A multiple of 64, as KVM requires.
pub const KVM_CLEAR_STEP_PAGES: u64 = 1 << 18;
/// Threads that fault a receiver's destination memory in, at most (one per allowed core).
pub const PREFAULT_THREADS_MAX: usize = 16;
/// Milliseconds a hello of another session waits, while a session is being gathered, before
/// it is refused: time for the accept loop (10 ms slices) to drop a session whose sender gave
/// up.
pub const SESSION_SETTLE_MS: u64 = 200;

/// Milliseconds a receiver waits for its sender before it starts faulting the destination in
/// (a sender that connects sooner keeps every core for the transfer).
pub const PREFAULT_DELAY_MS: u64 = 100;
/// Bytes one pre-fault call covers before it checks whether to stop: after a stop each thread
/// faults in at most this much more (8 huge pages, a few milliseconds), while the shards start.
pub const PREFAULT_STEP_BYTES: u64 = 16 << 20;
/// Bytes one step of a destination's background space reservation covers (`posix_fallocate`)
/// before it checks whether to stop: tens of milliseconds on a tmpfs, which zeroes each page.
pub const RESERVE_STEP_BYTES: u64 = 256 << 20;
/// Tries of one reservation step that signals keep interrupting (`EINTR`) before it counts as
/// failed.
pub const RESERVE_EINTR_TRIES_MAX: u32 = 100;

/// Regions in one memory layout at most (VMMs use a handful: low RAM, high RAM, hotplug slots).
pub const REGIONS_MAX: usize = 256;

/// Bytes one registered (fixed) io_uring buffer may span: the kernel refuses larger with EFAULT.
pub const REGISTERED_BUFFER_BYTES_MAX: usize = 1 << 30;

/// Registered buffers per ring: one header slab plus 1 GiB pieces of guest memory (1 TiB).
pub const REGISTERED_BUFFERS_MAX: usize = 1 + 1024;

/// Guest memory a shard registers as fixed buffers at most, bytes. Registering pins and faults
/// in all of it, on every channel's ring, at up to a second per GiB, while the shard sends
/// nothing (not even keepalives): a larger guest sends zero-copy without fixed buffers (the
/// kernel pins each send's pages instead) rather than stall its channels past the idle bound.
pub const REGISTER_GUEST_BYTES_MAX: u64 = 8 << 30;

/// Frames a sender shard may have between "header written" and "buffer free again" (which, with
/// zero-copy sends, is the kernel's notification). Bounds the shard's header slab.
pub const SHARD_FRAMES_IN_FLIGHT_MAX: usize = 16;

/// Bytes of device state one frame carries at most (after its chunk header): a blob larger
/// than this travels as several frames.
pub const DEVICE_CHUNK_BYTES_MAX: usize = 32 * 1024;

/// Frames linked into one submission chain. Sends on one TCP socket must stay ordered, so a shard
/// keeps a single linked chain in flight and batches ready frames into it.
pub const CHAIN_FRAMES_MAX: usize = 8;

/// Work items queued per shard between the coordinator and the shards (bounded back-pressure:
/// 64 × 512 KiB = 32 MiB of work ahead of each channel; a pool of shards shares their sum).
pub const SHARD_QUEUE_ITEMS_MAX: usize = 64;

/// Submission queue entries per ring: a full chain of zero-copy sends (one per piece) plus a
/// control receive fits with room to spare.
pub const RING_ENTRIES: u32 = 1024;

/// Zero-copy notifications a connection examines before deciding whether the kernel really
/// sends from our pages. On loopback and veth every one says "copied"; 32 is a few MiB.
pub const ZC_PROBE_SENDS: u32 = 32;

/// Milliseconds the handshake of one connection may take (connect, hello, reply).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// How often a sender's connect and handshake in progress look for a cancel: the longest a
/// cancel waits there.
pub const HANDSHAKE_WATCH_SLICE_MS: u64 = 20;

/// Milliseconds a receiver waits for every channel of a transfer once the first has arrived.
pub const CHANNELS_GATHER_TIMEOUT_MS: u64 = 10_000;

/// Milliseconds a side waits, by default, for any byte to move on a channel (or, at a round
/// barrier, on any channel of its transfer) before it declares the peer gone: a sender that
/// stopped, a half-sent header, a receiver that stopped reading. TCP keeps a vanished host's
/// socket open for minutes; this bounds it. `--idle-timeout` changes it.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// The shortest idle bound accepted: below a few wait slices the bound would fire on
/// scheduling noise.
pub const IDLE_TIMEOUT_MS_MIN: u64 = 4 * RING_WAIT_SLICE_MS;

/// The longest idle bound accepted (one day); it travels as a u32 in the handshake reply.
pub const IDLE_TIMEOUT_MS_MAX: u64 = 86_400_000;

/// A sender with nothing to send sends a keepalive frame every `1 / KEEPALIVE_PER_IDLE` of the
/// receiver's idle bound (7.5 s for the default 30 s), so the bound can stay short between the
/// rounds of a live migration.
pub const KEEPALIVE_PER_IDLE: u64 = 4;

/// Milliseconds one wait on the ring may block before the shard rechecks the abort flag.
pub const RING_WAIT_SLICE_MS: u64 = 100;

/// During a live migration's downtime (the last round, sent with the vCPUs paused, and what
/// follows it), a receive shard that carries some of the last round's pages polls its ring for up to this many microseconds, yielding its
/// CPU between looks, before it sleeps on a wait. The guest is stopped and only the pause's
/// length counts. A shard asleep between a round's segments is woken for each one, and waking
/// a thread on an idle CPU costs the waker an inter-processor interrupt; on a virtual
/// machine's vCPUs, an exit to the hypervisor. In the two-core VM measured, a quarter of the
/// send shard's profile samples in the last round fell where its transmit path re-enables
/// interrupts. With the polling the last round moved 6–84% more pages per ms and the downtime
/// was 16–28% shorter (cell medians of `pagewire-bench live --guest kvm`, 24 interleaved runs
/// a cell). Without the yield, two polling receivers on two cores slowed TLS senders down.
/// Fifty microseconds is the kernel's own suggestion for socket busy polling
/// (`net.core.busy_read`); past it the shard sleeps as before, so a slow sender costs at most
/// that much CPU per wait.
pub const DOWNTIME_POLL_US: u64 = 50;

/// Handshakes a receiver runs at once (one thread each). Further connections wait in the
/// listen backlog until a slot frees, so strangers cannot make a receiver start unbounded
/// threads; a silent one holds its slot for at most `HANDSHAKE_TIMEOUT_MS`.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 16;

/// Milliseconds a TCP connection may hold unacknowledged data (TCP_USER_TIMEOUT). Longer than the
/// default idle bound: a receiver legitimately stops reading a channel while that channel waits
/// at a round barrier, and the zero window must not kill the connection meanwhile.
pub const TCP_USER_TIMEOUT_MS: u32 = 90_000;

/// Seconds of silence before TCP keepalive starts probing a connection.
pub const TCP_KEEPALIVE_IDLE_S: i32 = 10;

/// Seconds between keepalive probes; with `TCP_KEEPALIVE_PROBES` a silent peer is declared gone
/// after 10 + 5 × 4 = 30 s, in line with `IDLE_TIMEOUT_MS_DEFAULT`.
pub const TCP_KEEPALIVE_INTERVAL_S: i32 = 5;

/// Unanswered keepalive probes before the kernel resets the connection.
pub const TCP_KEEPALIVE_PROBES: i32 = 4;

const _: () = assert!(FRAME_RUNS_MAX <= u16::MAX as usize);
const _: () = assert!(FRAME_PAYLOAD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(CHANNELS_MAX <= u16::MAX as usize);
const _: () = assert!(CHAIN_FRAMES_MAX <= SHARD_FRAMES_IN_FLIGHT_MAX);
// A frame sent zero-copy takes one entry per piece (header + runs), plus the control receive;
// a chain takes as many whole frames as fit in the free entries, checked when it is built.
const _: () = assert!(1 + FRAME_RUNS_MAX < RING_ENTRIES as usize);
const _: () = assert!(REGISTERED_BUFFER_BYTES_MAX.is_multiple_of(PAGE_BYTES));
const _: () = assert!(FRAME_HEADER_BYTES_MAX < PAGE_BYTES);
const _: () = assert!(IDLE_TIMEOUT_MS_MIN <= IDLE_TIMEOUT_MS_DEFAULT);
const _: () = assert!(IDLE_TIMEOUT_MS_MAX <= u32::MAX as u64);
const _: () = assert!(IDLE_TIMEOUT_MS_MIN / KEEPALIVE_PER_IDLE >= RING_WAIT_SLICE_MS / 4);
const _: () = assert!(HANDSHAKES_IN_FLIGHT_MAX >= 2);

/// Bytes of guest memory `--channels auto` sends over loopback to measure one channel's rate.
pub const AUTO_SAMPLE_BYTES: usize = 64 << 20;

/// Slices that sample is taken in, spread evenly over guest memory.
pub const AUTO_SAMPLE_SLICES: usize = 16;

/// `--channels auto` on a link of unknown speed uses at most this many channels: on the 16-core
/// machine measured, 8 channels already met the host's memory bandwidth (two copies per byte).
pub const AUTO_UNKNOWN_LINK_CHANNELS: usize = 8;

/// `--channels auto` provisions the link's rate times this (a quarter to spare).
pub const AUTO_LINK_HEADROOM: f64 = 1.25;

/// Pages sampled at most when asking which NUMA node holds guest memory (one `move_pages` call;
/// 1 TiB is then sampled every 16 MiB).
pub const NODE_QUERY_SAMPLES_MAX: usize = 65_536;

/// Most CPUs one range of a CPU list (`--cores 0-4095`) may name: the kernel's own `NR_CPUS`
/// ceiling, so a typo cannot allocate without bound.
pub const CPUS_MAX: usize = 8192;
