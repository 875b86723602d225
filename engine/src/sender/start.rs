//! Starting a sender: connect (or take handed-in connections), handshake every channel, plan
//! where the shards run, and start one shard thread per channel.

use super::*;

impl Sender {
    /// Connects `config.channels` channels to the receiver at `addr`, handshakes each, and starts
    /// the shards.
    pub fn connect(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        memory: Arc<GuestMemory>,
        config: &SenderConfig,
    ) -> Result<Sender> {
        config.validate()?;
        let addr = resolve(addr)?;
        Self::start(memory, config, |i, deadline, cancelled| {
            crate::sys::connect_cancellable(&addr, deadline, cancelled)
                .map(Stream::from)
                .map_err(|e| Error::io(format!("connecting channel {i} to {addr}"), e))
        })
    }

    /// Like [`connect`](Self::connect), over connections the caller has already made, one per
    /// channel (`config.channels` is taken from their count): TCP connections or UNIX stream
    /// sockets ([`Stream`]). Management software often connects and passes file descriptors
    /// in: see [`std::os::fd::FromRawFd`].
    pub fn over_streams<S: Into<Stream>>(
        streams: Vec<S>,
        memory: Arc<GuestMemory>,
        config: &SenderConfig,
    ) -> Result<Sender> {
        let channels = u16::try_from(streams.len())
            .map_err(|_| Error::Config(format!("{} connections handed in", streams.len())))?;
        let config = SenderConfig {
            channels,
            ..config.clone()
        };
        config.validate()?;
        let streams: Vec<std::sync::Mutex<Option<Stream>>> = streams
            .into_iter()
            .map(|s| std::sync::Mutex::new(Some(s.into())))
            .collect();
        Self::start(memory, &config, |i, _, _| {
            streams[usize::from(i)]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or_else(|| Error::Internal(format!("connection {i} taken twice")))
        })
    }

    /// Starts a sender whose channel `i` is the connection `open(i, deadline, cancelled)`
    /// gives (by `deadline`, or sooner once `cancelled()`).
    fn start(
        memory: Arc<GuestMemory>,
        config: &SenderConfig,
        open: impl Fn(u16, Instant, &dyn Fn() -> bool) -> Result<Stream> + Sync,
    ) -> Result<Sender> {
        let caps = crate::uring::probe()?;
        let n = config.channels;
        let start = Instant::now();
        let cpu_start = crate::sys::thread_cpu_time();
        let session_id: [u8; 16] = rand::random();
        // The caller's handle cancels the connect and the handshakes too.
        let abort = match &config.canceller {
            Some(c) => c.abort().clone(),
            None => Arc::new(Abort::new(false)),
        };
        // Its latch stays raised once a transfer failed: a second sender on it would be
        // cancelled at once, for no reason it could tell.
        if !abort.claim() {
            return Err(Error::Config(
                "this Canceller was given to a sender already: each sender needs its own (Canceller::new)".into(),
            ));
        }
        if abort.is_raised() {
            return Err(abort.take_error().unwrap_or(Error::Cancelled));
        }
        let bandwidth = BandwidthLimit::new(config.max_bandwidth_bytes_per_s);
        let progress = Arc::new(Progress::default());
        let (events_tx, events) = unbounded();
        let pin_cores = crate::placement::pin_order(config.cores.as_deref(), config.pinning)?;
        let hello = |i: u16| Hello {
            version: PROTOCOL_VERSION,
            channel_index: i,
            channel_count: n,
            session_id,
            page_bytes: PAGE_BYTES as u32,
            features: match config.compression {
                Compression::None => 0,
                Compression::Zstd | Compression::Auto => FEATURE_ZSTD,
                Compression::Zlib => FEATURE_ZLIB,
            } | if config.psk.is_some() { FEATURE_PSK } else { 0 }
                // (Validated: checksums are off only for plaintext.)
                | if config.page_checksums { 0 } else { FEATURE_UNCHECKED_PAGES },
            layout_digest: memory.layout_digest(),
            layout_bytes: memory.total_bytes(),
            region_count: memory.regions().len() as u32,
            nonce: rand::random(),
        };
        let connected = connect_all(
            n,
            hello,
            (config.tls.as_ref(), config.psk.as_ref()),
            config.congestion.as_deref(),
            &abort,
            open,
        );
        // A cancel is why every channel that failed did (its connection was shut down).
        if abort.is_raised() {
            return Err(abort.take_error().unwrap_or(Error::Cancelled));
        }
        let mut streams = Vec::with_capacity(usize::from(n));
        for c in connected {
            let c = c?;
            abort.watch(&c.stream, None)?;
            streams.push(c);
        }
        let nic = streams.first().and_then(|c| c.stream.interface());
        let congestion = streams.first().and_then(|c| c.stream.congestion());
        let receiver_here = streams
            .first()
            .is_some_and(|c| c.stream.peer_on_this_host());
        // Synthetic nodes (a test of routing by node on a one-node host), or this host's.
        #[cfg(feature = "faults")]
        let mut placement = if config.fault_nodes > 1 {
            Placement::synthetic(n, &memory, config.fault_nodes)
        } else {
            Placement::here(n, pin_cores, &memory, nic, true)
        };
        #[cfg(not(feature = "faults"))]
        let mut placement = Placement::here(n, pin_cores, &memory, nic, true);
        placement.note_pinning(config.pinning);
        tracing::debug!("sender placement:\n{}", placement.plan.render());
        // Each shard pulls its chunks from its pool's queue (see `Sender::send_round`).
        let pool_members = placement.pools(streams.len());
        let pool_queues: Vec<(Tx<Work>, Receiver<Work>)> = pool_members
            .iter()
            .map(|m| bounded(SHARD_QUEUE_ITEMS_MAX * m.len()))
            .collect();
        let (drained_tx, pool_drained) = bounded(1);
        let pool_of = |shard: usize| {
            pool_members
                .iter()
                .position(|m| m.contains(&shard))
                .unwrap_or(0)
        };
        let mut shards = Vec::with_capacity(streams.len());
        for (i, c) in streams.into_iter().enumerate() {
            let Connected {
                stream,
                tls,
                receiver_idle_ms,
            } = c;
            // Keepalives at a quarter of the receiver's idle bound (a v2 receiver always tells).
            let receiver_idle = Duration::from_millis(u64::from(receiver_idle_ms).max(1));
            let keepalive_every = (receiver_idle / KEEPALIVE_PER_IDLE as u32)
                .max(Duration::from_millis(RING_WAIT_SLICE_MS / 4));
            let place = placement.plan.shards[i];
            let affinity = crate::shard::Affinity::of(&placement, i, config.pinning);
            let (tx, rx) = bounded(SHARD_QUEUE_ITEMS_MAX);
            let params = SendShardParams {
                channel: i as u16,
                zero_copy: config.zero_copy,
                memory: memory.clone(),
                work: rx,
                pool: pool_queues[pool_of(i)].1.clone(),
                pool_drained: drained_tx.clone(),
                events: events_tx.clone(),
                abort: abort.clone(),
                progress: progress.clone(),
                tls,
                tls_records_per_key: config
                    .tls_records_per_key
                    .clamp(1, crate::tls::RECORDS_PER_KEY_MAX),
                page_checksums: config.page_checksums,
                compression: config.compression,
                zstd_level: config.zstd_level,
                // Each shard paces its share of the total.
                pace: bandwidth.clone(),
                channels: n,
                idle: Duration::from_millis(config.idle_timeout_ms),
                keepalive_every,
                #[cfg(feature = "faults")]
                faults: crate::shard::RingFaults {
                    seed: config.fault_seed,
                    simulated: config.simulated,
                },
                #[cfg(not(feature = "faults"))]
                faults: crate::shard::RingFaults,
            };
            let core = match affinity {
                crate::shard::Affinity::Core(c) => Some(c),
                _ => None,
            };
            let join = spawn_shard(params, stream, place, affinity, abort.clone())?;
            shards.push(Shard {
                tx,
                join: Some(join),
                core,
            });
        }
        Ok(Sender {
            memory,
            shards,
            pools: pool_queues.into_iter().map(|(tx, _)| tx).collect(),
            next_pool: 0,
            pool_drained,
            events,
            abort,
            progress,
            round: 0,
            start,
            cpu_ms: (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3,
            rounds: Vec::new(),
            finished: false,
            device_state_sent: false,
            last_round_live: false,
            defer_taskrun: caps.defer_taskrun,
            bandwidth,
            placed: None,
            placed_reports: Vec::new(),
            placement,
            receiver_here,
            congestion,
        })
    }
}

fn resolve(addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<SocketAddr> {
    let text = format!("{addr:?}");
    addr.to_socket_addrs()
        .map_err(|e| Error::io(format!("resolving {text}"), e))?
        .next()
        .ok_or_else(|| Error::Config(format!("{text} resolves to no address")))
}

/// Starts channel `params.channel`'s shard thread: pinned to `core` when there is one, its
/// statistics saying where it ran; a failure (a panic included) raises the shared abort.
fn spawn_shard(
    params: SendShardParams,
    stream: Stream,
    place: crate::placement::ShardPlace,
    affinity: crate::shard::Affinity,
    abort: Arc<Abort>,
) -> Result<JoinHandle<Result<ShardStats>>> {
    let i = params.channel;
    std::thread::Builder::new()
        .name(format!("pw-send-{i}"))
        .spawn(move || {
            let span = tracing::debug_span!("send_shard", channel = i);
            let _enter = span.enter();
            let (pinned, placed) = affinity.apply();
            let result = catch_panic("sender", i, || {
                SendShard::new(params, stream).and_then(SendShard::run)
            });
            match result {
                Ok(mut stats) => {
                    stats.core = pinned;
                    stats.node = place.node.filter(|_| placed);
                    Ok(stats)
                }
                Err(e) => Err(abort.fail(e)),
            }
        })
        .map_err(|e| Error::io("starting a sender shard thread", e))
}
