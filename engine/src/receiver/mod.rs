//! The receiving side: listens, accepts and handshakes every channel of one transfer, starts one
//! shard per channel, and reports the first error of any channel (after telling the sender why).
//!
//! Handshakes (TLS when configured, then the hello) run before the shards start, one thread per
//! accepted connection so TLS handshakes proceed in parallel: they are a few small blocking
//! exchanges, bounded by `HANDSHAKE_TIMEOUT_MS`, and doing them before the rings exist keeps the
//! shards' loops free of a second protocol phase. A refused hello (wrong session, version, page
//! size, layout, duplicate or out-of-range channel) is answered with the reason, so the sender
//! reports it; the receiver logs it, drops the connection and keeps listening, because one
//! stray or hostile connection must not cancel a migration. Its deadline error names the last
//! refusal, so a misconfigured sender is still visible on this side.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::ReceiverConfig;
use crate::error::{Error, Result};
use crate::limits::{CHANNELS_GATHER_TIMEOUT_MS, HANDSHAKES_IN_FLIGHT_MAX, PAGE_BYTES};
use crate::memory::GuestMemory;
use crate::protocol::blob::DeviceBlob;
use crate::protocol::handshake::{Acceptor, Expectation, FEATURES_KNOWN, FEATURE_UNCHECKED_PAGES};
use crate::protocol::ledger::PageLedger;
use crate::sender::Canceller;
use crate::shard::recv::{FrameDelay, RecvShard, RecvShardParams, TlsRx};
use crate::shard::{catch_panic, error_chain, Abort, RoundBarrier};
use crate::stats::{Progress, TransferStats};
use crate::stream::Stream;

mod accept;
mod handshake;
mod prefault;
mod snapshot;
use handshake::{handshake, lock, Accepted, Auth, Joined};
use prefault::{Prefault, Reserving};
use snapshot::published;
pub use snapshot::{ReceiverHandle, ReceiverSnapshot};

/// Makes the destination once the sender's hello says how large it is. It runs once every
/// channel is accepted, while the sender is already sending and waiting for the receiver to
/// take data, so it must take well under the idle bound: memory that is slow to make ready
/// (a file on a tmpfs or hugetlbfs, whose reservation zeroes every page) is made with
/// [`ImageFile::create_reserving_while_received`](crate::ImageFile::create_reserving_while_received),
/// and reserved while pages arrive.
pub type MakeDestination = Box<dyn FnOnce(u64) -> Result<Arc<GuestMemory>> + Send>;

/// Where a receiver places pages.
enum Destination {
    /// Memory the caller made.
    Ready(Arc<GuestMemory>),
    /// Memory made once the sender's hello names its size, of at most `max_bytes`.
    BySender {
        make: MakeDestination,
        max_bytes: u64,
    },
}

/// A bound receiver; [`run`](Self::run) takes one transfer.
pub struct Receiver {
    /// Where senders connect; `None` for a receiver over connections handed in.
    listener: Option<TcpListener>,
    /// Connections the caller accepted (management software passes them in), handshaken like
    /// accepted ones.
    given: Vec<Stream>,
    memory: Destination,
    config: ReceiverConfig,
    progress: Arc<Progress>,
    device_state: DeviceState,
    /// The transfer's abort latch, made up front so a [`Canceller`] can be handed out.
    abort: Arc<Abort>,
    /// What [`ReceiverHandle`]s read.
    shared: Arc<Mutex<snapshot::Shared>>,
}

/// The device state blobs a live migration carried, once the receiver has run (see
/// [`Receiver::device_state`]).
#[derive(Debug, Clone, Default)]
pub struct DeviceState(Arc<Mutex<Vec<DeviceBlob>>>);

impl DeviceState {
    /// Takes the blobs received (in arrival order; empty before [`Receiver::run`] succeeded).
    pub fn take(&self) -> Vec<DeviceBlob> {
        std::mem::take(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Listens on `addr` for a transfer into `memory`.
    pub fn bind(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        memory: Arc<GuestMemory>,
        config: ReceiverConfig,
    ) -> Result<Receiver> {
        writable(&memory)?;
        config.validate()?;
        Self::ready(bind_listener(addr)?, memory, config)
    }

    /// Listens on `addr` for a transfer whose size the sender's hello gives: the first sender
    /// with a one-region layout (a RAM image) of at most `max_bytes` sizes the destination,
    /// which `make` then creates (before any page arrives).
    pub fn bind_sized_by_sender(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        max_bytes: u64,
        make: MakeDestination,
        config: ReceiverConfig,
    ) -> Result<Receiver> {
        Self::listen(addr, Destination::BySender { make, max_bytes }, config)
    }

    /// Like [`bind`](Self::bind), on a listening socket the caller made (socket activation,
    /// a port management software bound, or one listener kept across transfers: pass a
    /// [`TcpListener::try_clone`] each time, and a sender that connects between two transfers
    /// waits in its backlog instead of being refused).
    pub fn on_listener(
        listener: TcpListener,
        memory: Arc<GuestMemory>,
        config: ReceiverConfig,
    ) -> Result<Receiver> {
        writable(&memory)?;
        config.validate()?;
        Self::ready(listener, memory, config)
    }

    /// A receiver into `memory` on `listener`; memory and settings already checked.
    fn ready(
        listener: TcpListener,
        memory: Arc<GuestMemory>,
        config: ReceiverConfig,
    ) -> Result<Receiver> {
        let pages = memory.total_pages();
        let r = Self::listening(listener, Destination::Ready(memory), config)?;
        crate::stats::add(&r.progress.pages_total, pages);
        Ok(r)
    }

    fn listen(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        memory: Destination,
        config: ReceiverConfig,
    ) -> Result<Receiver> {
        config.validate()?;
        Self::listening(bind_listener(addr)?, memory, config)
    }

    fn listening(
        listener: TcpListener,
        memory: Destination,
        config: ReceiverConfig,
    ) -> Result<Receiver> {
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io("reading the listening address", e))?;
        if config.tls.is_none()
            && config.psk.is_none()
            && !config.insecure
            && !bound.ip().is_loopback()
        {
            return Err(Error::Config(format!(
                "refusing to listen on {bound} with neither TLS nor a pre-shared key: anyone who can connect could write this memory (configure TLS or a pre-shared key, or set `insecure` (--insecure) to accept that)"
            )));
        }
        Ok(Self::new(Some(listener), Vec::new(), memory, config))
    }

    /// A receiver over connections the caller has already accepted (one per channel the sender
    /// opens; management software often accepts them and passes file descriptors in: see
    /// [`std::os::fd::FromRawFd`]). Each is handshaken as if accepted here; a connection that
    /// fails its handshake is dropped as a stranger's would be. Plaintext without a key is
    /// refused unless the connections are on loopback or `insecure` is set.
    pub fn over_streams<S: Into<Stream>>(
        streams: Vec<S>,
        memory: Arc<GuestMemory>,
        config: ReceiverConfig,
    ) -> Result<Receiver> {
        config.validate()?;
        if streams.is_empty() {
            return Err(Error::Config("no connections handed in".into()));
        }
        let streams: Vec<Stream> = streams.into_iter().map(Into::into).collect();
        for s in &streams {
            if config.tls.is_none() && config.psk.is_none() && !config.insecure && !s.is_local()? {
                return Err(Error::Config(format!(
                    "refusing a connection from {} with neither TLS nor a pre-shared key (or set `insecure`)",
                    s.peer()
                )));
            }
        }
        if let Some(i) = memory.regions().iter().position(|r| !r.is_writable()) {
            return Err(Error::Config(format!(
                "region {i} of the destination is mapped read-only"
            )));
        }
        let pages = memory.total_pages();
        let r = Self::new(None, streams, Destination::Ready(memory), config);
        crate::stats::add(&r.progress.pages_total, pages);
        Ok(r)
    }

    fn new(
        listener: Option<TcpListener>,
        given: Vec<Stream>,
        memory: Destination,
        config: ReceiverConfig,
    ) -> Receiver {
        let progress = Arc::new(Progress::default());
        Receiver {
            listener,
            given,
            memory,
            config,
            progress,
            device_state: DeviceState::default(),
            abort: Arc::new(Abort::new(true)),
            shared: Arc::default(),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .as_ref()
            .ok_or_else(|| {
                Error::Config("a receiver over handed-in connections listens nowhere".into())
            })?
            .local_addr()
            .map_err(|e| Error::io("reading the listening address", e))
    }

    /// Where the device state blobs of a live migration land: take them after
    /// [`run`](Self::run) succeeded (they are complete and checked by then).
    pub fn device_state(&self) -> DeviceState {
        self.device_state.clone()
    }

    /// A handle that cancels this receiver from any thread, while it waits for a sender or
    /// receives: it tells the sender why, and [`run`](Self::run) returns [`Error::Cancelled`]
    /// within a ring wait slice.
    pub fn canceller(&self) -> Canceller {
        Canceller::attached(self.abort.clone())
    }

    /// Live counters for a progress display.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// A handle for another thread: cancel, and a `query-migrate`-like
    /// [`ReceiverSnapshot`] of where the transfer stands.
    pub fn handle(&self) -> ReceiverHandle {
        ReceiverHandle {
            canceller: self.canceller(),
            progress: self.progress.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Accepts one transfer and receives it until every channel has ended its stream.
    pub fn run(self) -> Result<TransferStats> {
        let device_state = self.device_state.clone();
        let ending = snapshot::Ending::new(self.shared.clone(), self.progress.clone());
        let result = self.receive();
        if result.is_err() {
            // Blobs are the guest's only with all of its memory: none of a failed transfer.
            device_state.take();
        }
        ending.end(&result);
        result
    }

    fn receive(mut self) -> Result<TransferStats> {
        let caps = crate::uring::probe()?;
        let pin_cores =
            crate::placement::pin_order(self.config.cores.as_deref(), self.config.pinning)?;
        let abort = self.abort.clone();
        let given = std::mem::take(&mut self.given);
        // Memory known up front is faulted in from now on, while the sender connects.
        let prefault = match &self.memory {
            Destination::Ready(m) if self.config.prefault => Some(Prefault::start(m)),
            _ => None,
        };
        let (streams, start, layout_bytes) = self.accept_channels(&abort, given)?;
        published(&self.shared).gathered(start);
        let cpu_start = crate::sys::thread_cpu_time();
        let memory = match std::mem::replace(
            &mut self.memory,
            Destination::BySender {
                make: Box::new(|_| Err(Error::Aborted)),
                max_bytes: 0,
            },
        ) {
            Destination::Ready(m) => m,
            Destination::BySender { make, .. } => {
                // The sender said how large; the destination is made before any page lands.
                match make(layout_bytes) {
                    Ok(m) => {
                        crate::stats::add(&self.progress.pages_total, m.total_pages());
                        m
                    }
                    Err(e) => return Err(abort.fail_and_take(e)),
                }
            }
        };
        // A new image file's space is reserved while pages arrive: reserving it first would
        // hold the sender, which is already sending, for as long as a tmpfs or hugetlbfs takes
        // to zero the whole file (past its idle bound for a large one).
        let reserving = match memory.take_reservation() {
            Some(r) => match Reserving::start(r, abort.clone()) {
                Ok(r) => Some(r),
                Err(e) => return Err(abort.fail_and_take(e)),
            },
            None => None,
        };
        // The sender is here: pre-faulting stops (each thread ends its current step, without
        // holding the shards up), so it does not compete with the shards for cores, nor fill in
        // pages that only zero pages will name (a fresh destination skips those, and stays
        // sparse). Pages it did not reach fault on first touch.
        if let Some(p) = &prefault {
            p.stop();
        }
        let n = streams.len();
        let barrier = Arc::new(RoundBarrier::new(n));
        let device_budget = crate::protocol::blob::DeviceBudget::default();
        let ledger = Arc::new(PageLedger::new(
            memory
                .regions()
                .iter()
                .map(|r| (r.pages(), r.take_initially_zero())),
        ));
        // Shards near the destination memory's nodes (where it is faulted in already).
        let nic = streams.first().and_then(|a| a.stream.interface());
        let mut placement =
            crate::placement::Placement::here(n as u16, pin_cores, &memory, nic, false);
        placement.note_pinning(self.config.pinning);
        let plan = &placement.plan;
        tracing::debug!("receiver placement:\n{}", plan.render());
        // Set up: from here the shards receive (published before they start, so no snapshot
        // says `setup` with pages already placed).
        published(&self.shared).active(barrier.clone());
        let mut joins = Vec::with_capacity(n);
        for (i, accepted) in streams.into_iter().enumerate() {
            let Accepted {
                stream,
                peer,
                tls,
                page_checksums,
            } = accepted;
            let place = plan.shards[i];
            let affinity = crate::shard::Affinity::of(&placement, i, self.config.pinning);
            let params = RecvShardParams {
                device_state: self.device_state.0.clone(),
                device_budget: device_budget.clone(),
                channel: i as u16,
                memory: memory.clone(),
                ledger: ledger.clone(),
                barrier: barrier.clone(),
                idle: Duration::from_millis(self.config.idle_timeout_ms),
                abort: abort.clone(),
                progress: self.progress.clone(),
                peer,
                tls,
                page_checksums,
                #[cfg(feature = "faults")]
                delay: FrameDelay {
                    max_us: self.config.fault_frame_delay_max_us,
                    seed: self.config.fault_seed,
                },
                #[cfg(not(feature = "faults"))]
                delay: FrameDelay::default(),
                #[cfg(feature = "faults")]
                faults: crate::shard::RingFaults {
                    seed: self.config.fault_ring.then_some(self.config.fault_seed),
                    simulated: self.config.simulated,
                },
                #[cfg(not(feature = "faults"))]
                faults: crate::shard::RingFaults,
            };
            let shard_abort = abort.clone();
            let join = std::thread::Builder::new()
                .name(format!("pw-recv-{i}"))
                .spawn(move || {
                    let span = tracing::debug_span!("recv_shard", channel = i);
                    let _enter = span.enter();
                    let (pinned, placed) = affinity.apply();
                    let result = catch_panic("receiver", i as u16, || {
                        RecvShard::new(params, stream).and_then(RecvShard::run)
                    });
                    match result {
                        Ok(mut s) => {
                            s.core = pinned;
                            s.node = place.node.filter(|_| placed);
                            Ok(s)
                        }
                        Err(e) => Err(shard_abort.fail(e)),
                    }
                });
            match join {
                Ok(j) => joins.push(j),
                Err(e) => {
                    abort.fail(Error::io("starting a receiver shard thread", e));
                }
            }
        }
        let results: Vec<_> = joins
            .into_iter()
            .map(|j| j.join().unwrap_or(Err(Error::Aborted)))
            .collect();
        // A shard ends well only after it confirmed the whole layout placed and verified
        // (`Done`). When all did, the sender may already report success: an abort latched
        // after that (a cancel that came too late) does not undo the migration.
        let latched = abort.take_error();
        if let (Some(e), false) = (latched, results.iter().all(|r| r.is_ok())) {
            return Err(e);
        }
        let mut stats = TransferStats {
            channels: n as u16,
            rounds: barrier.rounds_ended(),
            zero_scan: crate::pipeline::zero::ZeroScanner::detect().kind().name(),
            defer_taskrun: caps.defer_taskrun,
            ..TransferStats::default()
        };
        for r in results {
            stats.shards.push(r?);
        }
        let cpu = (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
        stats.finalize(start.elapsed().as_secs_f64(), cpu);
        stats.prefault_ms = prefault.map_or(0.0, Prefault::finish);
        // Every page is here: what is left of the file's reservation is the image's commit's
        // to finish, after the transfer (a VMM may resume the guest now).
        if let Some(r) = reserving {
            r.stop_and_hand_back(&memory);
        }
        Ok(stats)
    }
}

/// Refuses a destination with a read-only region.
fn writable(memory: &GuestMemory) -> Result<()> {
    match memory.regions().iter().position(|r| !r.is_writable()) {
        Some(i) => Err(Error::Config(format!(
            "region {i} of the destination is mapped read-only"
        ))),
        None => Ok(()),
    }
}

/// A listening socket on `addr`.
fn bind_listener(addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<TcpListener> {
    let text = format!("{addr:?}");
    TcpListener::bind(addr).map_err(|e| Error::io(format!("listening on {text}"), e))
}
