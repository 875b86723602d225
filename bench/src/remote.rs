//! Two hosts: `pagewire-bench serve` on the destination, `matrix --peer HOST:PORT` on the source.
//!
//! The control protocol (one JSON object per line, a receiver per measurement on an ephemeral
//! port, the server's CPU seconds at the end) is in `pagewire-bench-control`, which
//! `pagewire-tune sweep --server bench` speaks too. The control channel is for a benchmark on a
//! trusted network: TLS cells send the receiver's (throw-away, generated per run) key over it.

use std::io::BufReader;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use pagewire::pipeline::compress::Compression;
use pagewire::tls::{certs, TlsClient, TlsServer};
use pagewire::{
    GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig, ZeroCopy,
};
use pagewire_bench_control::{
    read_line, send_line, Client, Pems, Reply, Request, MEASUREMENT_TIMEOUT_S,
};

use crate::measure::{self, cores, raw_recv_share, raw_send_share, share, Run};

/// Serves measurements until `sessions` control connections have ended (`None`: forever).
pub fn serve(listen: &str, sessions: Option<u32>) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    eprintln!("pagewire-bench: serving on {}", listener.local_addr()?);
    let mut served = 0;
    while sessions.is_none_or(|n| served < n) {
        let (control, peer) = listener.accept()?;
        let local_ip = control.local_addr()?.ip();
        eprintln!("pagewire-bench: session from {peer}");
        if let Err(e) = session(control, local_ip) {
            eprintln!("pagewire-bench: session from {peer} ended: {e:#}");
        }
        served += 1;
    }
    Ok(())
}

fn session(control: TcpStream, ip: IpAddr) -> Result<()> {
    let mut writer = control.try_clone()?;
    let mut reader = BufReader::new(control);
    while let Some(request) = read_line::<Request>(&mut reader)? {
        // Raw TCP's destination is unmapped only after the reply, as pagewire's receiver
        // answers (Done) before its memory goes: the source's clock stops at the reply.
        let mut kept = None;
        let result = match request {
            Request::Recv {
                size,
                tls,
                unchecked_pages,
                pin,
            } => serve_pagewire(&mut writer, ip, size, tls, unchecked_pages, pin),
            Request::Raw { size, streams, .. } => {
                serve_raw(&mut writer, ip, size, streams).map(|(cpu_s, dst)| {
                    kept = Some(dst);
                    cpu_s
                })
            }
        };
        let reply = match result {
            Ok(cpu_s) => Reply::Done { cpu_s },
            Err(e) => Reply::Failed {
                error: format!("{e:#}"),
            },
        };
        send_line(&mut writer, &reply)?;
        drop(kept);
    }
    Ok(())
}

fn serve_pagewire(
    control: &mut TcpStream,
    ip: IpAddr,
    size: u64,
    tls: Option<Pems>,
    unchecked_pages: bool,
    pin: bool,
) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let tls = match tls {
        Some(p) => {
            std::fs::write(dir.path().join("server-cert.pem"), p.cert)?;
            std::fs::write(dir.path().join("server-key.pem"), p.key)?;
            std::fs::write(dir.path().join("ca-cert.pem"), p.ca)?;
            Some(TlsServer::new(certs::server_files(dir.path()).load()?)?)
        }
        None => None,
    };
    let dst = Arc::new(GuestMemory::anonymous_populated(&[RegionSpec {
        gpa: 0,
        len: size,
    }])?);
    let receiver = Receiver::bind(
        SocketAddr::new(ip, 0),
        dst,
        ReceiverConfig {
            pinning: if pin { Pinning::Nodes } else { Pinning::None },
            accept_timeout_ms: Some(MEASUREMENT_TIMEOUT_S * 1000),
            // A benchmark peer measures plaintext too, on the link the operator chose.
            insecure: tls.is_none(),
            tls,
            accept_unchecked_pages: unchecked_pages,
            ..ReceiverConfig::default()
        },
    )?;
    send_line(
        control,
        &Reply::Listening {
            port: receiver.local_addr()?.port(),
        },
    )?;
    let stats = receiver.run()?;
    Ok(stats.cpu_ms / 1e3)
}

/// Raw TCP into a destination faulted in before the source is told to start (as pagewire's
/// is); returns the receive threads' CPU seconds and the destination, for the caller to
/// unmap after its reply.
fn serve_raw(
    control: &mut TcpStream,
    ip: IpAddr,
    size: u64,
    streams: u16,
) -> Result<(f64, GuestMemory)> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
    let dst = GuestMemory::anonymous_populated(&[RegionSpec { gpa: 0, len: size }])?;
    send_line(
        control,
        &Reply::Listening {
            port: listener.local_addr()?.port(),
        },
    )?;
    let dst_addr = dst.regions()[0].host_addr() as usize;
    let total = size as usize;
    let streams = usize::from(streams.max(1));
    // The source connects its streams in order, so the i-th accepted is stream i.
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        conns.push(listener.accept()?.0);
    }
    // Each receiving thread is left to the scheduler within the allowed cores, as pagewire's
    // receive shards are on one node (`Pinning::Nodes`).
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let (offset, len) = share(total, streams, i);
            std::thread::spawn(move || raw_recv_share(&c, dst_addr, offset, len))
        })
        .collect();
    let mut cpu = 0.0;
    for t in threads {
        cpu += t
            .join()
            .map_err(|_| anyhow::anyhow!("a receive thread panicked"))??;
    }
    Ok((cpu, dst))
}

/// The source's side of a `serve` session.
pub struct Peer {
    control: Client,
    /// Pin both engines' threads on both hosts (no `--no-pin`).
    pin: bool,
}

impl Peer {
    /// Opens a control connection to `addr`; `pin`: both engines placed as pagewire places its
    /// shards by default, on both hosts (senders one core each; receivers, pagewire's and raw
    /// TCP's, by the scheduler within the allowed cores of their node); without it the
    /// scheduler places them all.
    pub fn connect(addr: &str, pin: bool) -> Result<Peer> {
        let control = Client::connect(addr)
            .with_context(|| format!("connecting to the bench server at {addr}"))?;
        Ok(Peer { control, pin })
    }

    /// One pagewire transfer of `src` to the server (plaintext pages without checksums unless
    /// `page_checksums`).
    pub fn pagewire(
        &mut self,
        src: Arc<GuestMemory>,
        channels: u16,
        zero_copy: ZeroCopy,
        tls: Option<&(TlsClient, TlsServer, certs::CertSet)>,
        compression: Compression,
        page_checksums: bool,
    ) -> Result<(Run, pagewire::TransferStats)> {
        let pems = tls.map(|t| Pems {
            cert: t.2.server_cert.clone(),
            key: t.2.server_key.clone(),
            ca: t.2.ca_cert.clone(),
        });
        let addr = self.control.start(&Request::Recv {
            size: src.total_bytes(),
            tls: pems,
            unchecked_pages: !page_checksums,
            pin: self.pin,
        })?;
        let config = SenderConfig {
            channels,
            zero_copy,
            tls: tls.map(|t| t.0.clone()),
            compression,
            page_checksums,
            pinning: if self.pin {
                Pinning::Cores
            } else {
                Pinning::None
            },
            ..SenderConfig::default()
        };
        let start = Instant::now();
        let mut sender = Sender::connect(addr, src, &config)?;
        sender.send_all()?;
        let stats = sender.finish()?;
        let seconds = start.elapsed().as_secs_f64();
        let receiver_cpu_s = self.control.done()?;
        let run = Run {
            seconds,
            sender_cpu_s: stats.cpu_ms / 1e3,
            receiver_cpu_s,
        };
        Ok((run, stats))
    }

    /// Raw TCP: the same bytes over `streams` plain streams to the server.
    pub fn raw(&mut self, src: &GuestMemory, streams: u16) -> Result<Run> {
        let total = src.total_bytes() as usize;
        let addr = self.control.start(&Request::Raw {
            size: total as u64,
            streams,
            pin: self.pin,
        })?;
        let n = usize::from(streams.max(1));
        let start = Instant::now();
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(TcpStream::connect(addr)?);
        }
        let src_addr = src.regions()[0].host_addr() as usize;
        let all_cores = cores(!self.pin);
        let threads: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (offset, len) = share(total, n, i);
                let cores = all_cores.clone();
                std::thread::spawn(move || {
                    measure::pin(&cores, i);
                    raw_send_share(&c, src_addr, offset, len)
                })
            })
            .collect();
        let mut sender_cpu_s = 0.0;
        for t in threads {
            sender_cpu_s += t
                .join()
                .map_err(|_| anyhow::anyhow!("a send thread panicked"))??;
        }
        let receiver_cpu_s = self.control.done()?;
        Ok(Run {
            seconds: start.elapsed().as_secs_f64(),
            sender_cpu_s,
            receiver_cpu_s,
        })
    }
}
