//! Accepting one transfer's channels: connections come from the listener or are handed in, each
//! handshakes on a thread of its own, and only channels of the first session that completes a
//! handshake join it (see the parent module's docs for why a refused connection never ends the
//! receiver).

use super::*;

impl Receiver {
    /// The next connection to handshake: a handed-in one, else one accepted within 10 ms;
    /// `None` when there is none yet.
    fn next_connection(&self, given: &mut Vec<Stream>) -> Result<Option<(Stream, String)>> {
        if let Some(stream) = given.pop() {
            let peer = stream.peer();
            return Ok(Some((stream, peer)));
        }
        let Some(listener) = &self.listener else {
            // Only handshakes of handed-in connections remain.
            std::thread::sleep(Duration::from_millis(10));
            return Ok(None);
        };
        let ready = crate::sys::wait_acceptable(listener, Duration::from_millis(10))
            .map_err(|e| Error::io("waiting for connections", e))?;
        if !ready {
            return Ok(None);
        }
        match listener.accept() {
            Ok((s, peer)) => Ok(Some((Stream::Tcp(s), peer.to_string()))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if is_transient_accept_error(&e) => {
                tracing::warn!("accepting a connection failed: {e}");
                Ok(None)
            }
            Err(e) => Err(Error::io("accepting a connection", e)),
        }
    }

    /// Accepts connections until every channel of one transfer has completed its handshake. Each
    /// accepted connection handshakes on a thread of its own (at most
    /// `HANDSHAKES_IN_FLIGHT_MAX` at once), so TLS handshakes run in parallel. A connection that
    /// fails its handshake (garbage, silence, wrong version or layout, plaintext to TLS, a
    /// foreign certificate, another session's channel) is logged and dropped: the receiver keeps
    /// listening for the real sender until its own deadline. A session whose remaining channels
    /// do not arrive within `CHANNELS_GATHER_TIMEOUT_MS` is dropped the same way.
    pub(super) fn accept_channels(
        &self,
        abort: &Abort,
        mut given: Vec<Stream>,
    ) -> Result<(Vec<Accepted>, Instant, u64)> {
        let (layout_digest, layout_bytes, take_layout) = match &self.memory {
            Destination::Ready(m) => (m.layout_digest(), m.total_bytes(), false),
            Destination::BySender { max_bytes, .. } => (0, *max_bytes, true),
        };
        let expect = Expectation {
            channel_count: self.config.channels,
            page_bytes: PAGE_BYTES as u32,
            layout_digest,
            layout_bytes,
            features: if self.config.accept_unchecked_pages {
                FEATURES_KNOWN
            } else {
                FEATURES_KNOWN & !FEATURE_UNCHECKED_PAGES
            },
            take_layout,
        };
        // The acceptor and the generation of the session it is gathering, under one lock: a
        // handshake accepted for an abandoned session is recognised and dropped.
        let acceptor = Arc::new(Mutex::new((Acceptor::new(expect), 0u64)));
        type Outcome = std::result::Result<Joined, (Error, Option<u64>)>;
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<(u64, String, Outcome)>();
        // Handshakes in flight: their connection index, start, and a second handle to their
        // socket, shut down when the handshake overruns `HANDSHAKE_TIMEOUT_MS` in all (the
        // socket timeouts bound each read, not the handshake: a peer dripping a byte at a time
        // would hold its slot for minutes) and when this loop returns (no handshake thread
        // outlives it).
        let mut pending = Pending::default();
        let mut slots: Vec<Option<Accepted>> = Vec::new();
        let mut finished = 0usize;
        let mut accepted = 0u16;
        // Each handshake's own number (`accepted`, the log's, saturates).
        let mut ticket = 0u64;
        let mut in_flight = 0usize;
        let mut refused = 0u32;
        let mut last_refusal = None;
        let waiting_since = Instant::now();
        let mut first_at: Option<Instant> = None;
        // Why the session being gathered must be dropped now (a channel of it failed).
        let mut broken: Option<String> = None;
        let idle_timeout_ms = u32::try_from(self.config.idle_timeout_ms).unwrap_or(u32::MAX);
        loop {
            while let Ok((done_ticket, peer, result)) = done_rx.try_recv() {
                in_flight -= 1;
                // A handshake that ended as its deadline cut its socket is no channel, even if
                // it got as far as joining the session.
                let result = match (result, pending.remove(done_ticket)) {
                    (Ok((.., generation)), true) => Err((
                        Error::Timeout {
                            what: "a handshake".into(),
                            ms: crate::limits::HANDSHAKE_TIMEOUT_MS,
                        },
                        Some(generation),
                    )),
                    (result, _) => result,
                };
                let (hello, stream, session, generation) = match result {
                    Ok(x) => x,
                    Err((e, joined)) => {
                        let text = format!("{peer}: {}", error_chain(&e));
                        tracing::warn!("dropped a connection that failed its handshake: {text}");
                        if joined.is_some_and(|g| g == lock(&acceptor).1) {
                            broken = Some(format!(
                                "a channel failed after joining the session ({text})"
                            ));
                        } else {
                            refused = refused.saturating_add(1);
                            last_refusal = Some(text);
                        }
                        continue;
                    }
                };
                if generation != lock(&acceptor).1 {
                    tracing::warn!("dropped a late channel of an abandoned session from {peer}");
                    continue;
                }
                let count = usize::from(hello.channel_count);
                if slots.len() < count {
                    slots.resize_with(count, || None);
                }
                let (sealer, rx) = match session {
                    Some(s) => (
                        Some(s.sealer),
                        Some(TlsRx::from(s.stream, s.keys, s.buffer)),
                    ),
                    None => (None, None),
                };
                let peer = abort.watch(&stream, sealer)?;
                let page_checksums = rx.is_none() && hello.features & FEATURE_UNCHECKED_PAGES == 0;
                slots[usize::from(hello.channel_index)] = Some(Accepted {
                    stream,
                    peer,
                    tls: rx,
                    page_checksums,
                });
                first_at.get_or_insert_with(Instant::now);
                finished += 1;
            }
            let count = lock(&acceptor).0.channel_count().map(usize::from);
            if count.is_some_and(|c| finished == c) {
                break;
            }
            // After the drain: a handshake that ended in time is out of `pending` by now.
            pending.overdue(Duration::from_millis(crate::limits::HANDSHAKE_TIMEOUT_MS));
            // A sender sends nothing before all its channels are accepted, so a gathered
            // channel that turns readable has closed (the sender gave up, e.g. after a refused
            // connection): the session is dropped at once, not after the timeout; so is one
            // whose channel failed after joining it.
            let gone = first_at.is_some() && slots.iter().flatten().any(|a| a.stream.closed());
            let late = first_at
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(CHANNELS_GATHER_TIMEOUT_MS));
            if gone || late || broken.is_some() {
                let text = if let Some(why) = broken.take() {
                    why
                } else if gone {
                    format!(
                        "the sender closed a channel while {finished} of {} were connected",
                        count.unwrap_or(0)
                    )
                } else {
                    format!(
                        "only {finished} of {} channels of a session arrived within {CHANNELS_GATHER_TIMEOUT_MS} ms",
                        count.unwrap_or(0)
                    )
                };
                tracing::warn!("dropped a session: {text}");
                let mut a = lock(&acceptor);
                a.0.reset();
                a.1 += 1;
                drop(a);
                abort.unwatch_all();
                slots.clear();
                finished = 0;
                first_at = None;
                refused = refused.saturating_add(1);
                last_refusal = Some(text);
            }
            if self.listener.is_none() && given.is_empty() && in_flight == 0 {
                // Handed-in connections only, and every one has ended or joined a session that
                // cannot complete (its missing channels were never handed in): nothing more
                // can come, so waiting would last until a cancel.
                return Err(Error::HandedInEnded {
                    joined: finished,
                    expected: first_at.and(count),
                    refused,
                    last_refusal,
                });
            }
            if let Some(ms) = self.config.accept_timeout_ms {
                if first_at.is_none() && waiting_since.elapsed() >= Duration::from_millis(ms) {
                    return Err(Error::NoSender {
                        ms,
                        refused,
                        last_refusal,
                    });
                }
            }
            if abort.is_raised() {
                return Err(abort.take_error().unwrap_or(Error::Cancelled));
            }
            if in_flight >= HANDSHAKES_IN_FLIGHT_MAX {
                // Leave further connections in the backlog until a handshake ends.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let Some((stream, peer)) = self.next_connection(&mut given)? else {
                continue;
            };
            ticket += 1;
            let this_ticket = ticket;
            pending.add(this_ticket, &stream);
            let acceptor = acceptor.clone();
            let tls = self.config.tls.clone();
            let psk = self.config.psk.clone();
            let done = done_tx.clone();
            let index = accepted;
            accepted = accepted.saturating_add(1);
            in_flight += 1;
            let thread_peer = peer.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pw-handshake-{index}"))
                .spawn(move || {
                    let peer = thread_peer;
                    let span = tracing::debug_span!("handshake", %peer, connection = index);
                    let _enter = span.enter();
                    let auth = Auth {
                        tls: tls.as_ref(),
                        psk: psk.as_ref(),
                    };
                    let mut joined = None;
                    let result = handshake(
                        stream,
                        &peer,
                        &acceptor,
                        auth,
                        index,
                        idle_timeout_ms,
                        &mut joined,
                    )
                    .map_err(|e| (e, joined));
                    let _ = done.send((this_ticket, peer, result));
                });
            if let Err(e) = spawned {
                in_flight -= 1;
                pending.remove(this_ticket);
                tracing::warn!("could not start a handshake thread for {peer}: {e}");
            }
        }
        let streams = slots.into_iter().flatten().collect();
        let layout_bytes = lock(&acceptor).0.layout_bytes();
        Ok((streams, first_at.unwrap_or(waiting_since), layout_bytes))
    }
}

/// Handshakes in flight, each with a second handle to its socket (see `accept_channels`).
/// Dropped (the loop returned), it shuts down every socket still in a handshake.
#[derive(Default)]
struct Pending(Vec<PendingHandshake>);

/// One handshake in flight.
struct PendingHandshake {
    ticket: u64,
    since: Instant,
    /// A second handle to its socket; `None` once shut down (or where none could be made:
    /// out of descriptors, only the socket timeouts bound it).
    stream: Option<Stream>,
    /// Its deadline shut its socket down.
    cut: bool,
}

impl Pending {
    fn add(&mut self, ticket: u64, stream: &Stream) {
        self.0.push(PendingHandshake {
            ticket,
            since: Instant::now(),
            stream: stream.try_clone().ok(),
            cut: false,
        });
    }

    /// Forgets handshake `ticket`; true when its deadline had cut it off.
    fn remove(&mut self, ticket: u64) -> bool {
        let cut = self.0.iter().any(|p| p.ticket == ticket && p.cut);
        self.0.retain(|p| p.ticket != ticket);
        cut
    }

    /// Shuts down the sockets of handshakes older than `limit`: their threads' reads end, and
    /// they report the failure.
    fn overdue(&mut self, limit: Duration) {
        for p in &mut self.0 {
            if p.since.elapsed() >= limit {
                if let Some(s) = p.stream.take() {
                    tracing::warn!(
                        "handshake {} overran {limit:?}; closing its connection",
                        p.ticket
                    );
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    p.cut = true;
                }
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        for p in &mut self.0 {
            if let Some(s) = p.stream.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Errors of `accept` that concern one connection (or a momentary shortage), not the listener.
fn is_transient_accept_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EINTR
        )
    )
}
