//! `pagewire recv` and `pagewire send`: one transfer between two hosts, a RAM image or a file
//! on each side.

use super::*;

pub(super) fn recv(a: RecvArgs) -> Result<bool> {
    // Settings first: nothing listens or maps memory before every option is known to be good.
    let idle = idle_ms(a.common.idle_timeout)?;
    let tls = match a.tls.files(true)? {
        Some(files) => Some(TlsServer::new(files.load()?)?),
        None => None,
    };
    let psk = a.tls.psk()?;
    if let Some(path) = &a.into {
        if path.is_dir() {
            bail!(
                "--into {} is a directory; give a RAM image file",
                path.display()
            );
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if !path.exists() && parent.is_some_and(|p| !p.is_dir()) {
            bail!(
                "--into {}: the directory {} does not exist",
                path.display(),
                parent.map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
    }
    // From here until the receiver can be cancelled, a signal waits: a half-made image would
    // be left behind.
    interrupt::defer();
    // A file destination is an `ImageFile`: a new image appears under its name only once it is
    // complete; an existing one carries a marker until then.
    // `None` memory: made once the sender's hello says how large (`image` then receives the
    // ImageFile made for it).
    let image: Arc<std::sync::Mutex<Option<ImageFile>>> = Arc::default();
    let memory = match (&a.into, a.size) {
        (Some(path), size) if path.exists() => {
            let len = std::fs::metadata(path)
                .with_context(|| format!("reading the size of {}", path.display()))?
                .len();
            if let Some(size) = size.filter(|&s| s != len) {
                bail!(
                    "{} is {len} bytes but --size says {size}; refusing to resize an existing RAM image (remove it or drop --size)",
                    path.display()
                );
            }
            let file = ImageFile::open_existing(path)?;
            let memory = file.memory();
            *image.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
            Some(memory)
        }
        (Some(path), Some(size)) => {
            let file = ImageFile::create(path, size)?;
            let memory = file.memory();
            *image.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
            Some(memory)
        }
        (None, Some(size)) => Some(Arc::new(GuestMemory::anonymous(&[RegionSpec {
            gpa: 0,
            len: size,
        }])?)),
        (_, None) => None,
    };
    let config = ReceiverConfig {
        channels: a.channels,
        pinning: pinning(a.no_pin, true),
        cores: a.cores.clone(),
        accept_timeout_ms: a.timeout,
        idle_timeout_ms: idle,
        tls,
        psk,
        insecure: a.insecure,
        accept_unchecked_pages: a.accept_unchecked_pages,
        ..ReceiverConfig::default()
    };
    let take_image = || image.lock().unwrap_or_else(|p| p.into_inner()).take();
    let bound = match memory {
        Some(memory) => Receiver::bind(a.listen.as_str(), memory, config),
        None => {
            let (into, slot) = (a.into.clone(), image.clone());
            let make: pagewire::receiver::MakeDestination = Box::new(move |len| match into {
                Some(path) => {
                    // The sender is already sending: the file's space is reserved while its
                    // pages arrive.
                    let file = ImageFile::create_reserving_while_received(&path, len)?;
                    let memory = file.memory();
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
                    Ok(memory)
                }
                None => Ok(Arc::new(GuestMemory::anonymous(&[RegionSpec {
                    gpa: 0,
                    len,
                }])?)),
            });
            Receiver::bind_sized_by_sender(a.listen.as_str(), a.max_size, make, config)
        }
    };
    let receiver = match bound {
        Ok(r) => r,
        Err(e) => {
            // Nothing listened, nothing was written: an existing image stays as it was.
            if let Some(file) = take_image() {
                file.untouched();
            }
            return Err(e.into());
        }
    };
    interrupt::cancels(receiver.canceller());
    eprintln!("pagewire: listening on {}", receiver.local_addr()?);
    let progress = receiver.progress();
    let display = start_display(
        progress.clone(),
        Some(receiver.handle()),
        "recv",
        a.common.json_stream,
    );
    let stats = receiver.run();
    finish_display(display);
    let stats = match stats {
        Ok(stats) => {
            take_image().map(ImageFile::commit).transpose()?;
            stats
        }
        Err(e) => {
            if let Some(file) = take_image() {
                // Frames are counted as they are read, before any of their pages is written.
                if progress
                    .wire_bytes
                    .load(std::sync::atomic::Ordering::Acquire)
                    == 0
                {
                    file.untouched();
                } else {
                    file.fail(&pagewire::error_chain(&e));
                }
            }
            return Err(e).context("receiving failed");
        }
    };
    report(&stats, None, &a.common, "received", None)?;
    Ok(true)
}

pub(super) fn send(a: SendArgs) -> Result<bool> {
    // Settings first: a bad option or TLS file is reported before any memory is mapped.
    let idle = idle_ms(a.common.idle_timeout)?;
    if a.tls_hostname.is_some() && a.tls.tls_cert.is_none() && a.tls.tls_dir.is_none() {
        bail!("--tls-hostname needs TLS (--tls-dir, or --tls-cert, --tls-key and --tls-ca)");
    }
    let tls = match a.tls.files(false)? {
        Some(files) => {
            let host = match &a.tls_hostname {
                Some(h) => h.clone(),
                None => pagewire::tls::host_of(&a.connect).to_string(),
            };
            Some(TlsClient::new(files.load()?, &host)?)
        }
        None => None,
    };
    if a.from.is_dir() {
        bail!(
            "--from {} is a directory; give a RAM image file",
            a.from.display()
        );
    }
    let mut config = SenderConfig {
        pinning: pinning(a.no_pin, false),
        cores: a.cores.clone(),
        tls,
        max_bandwidth_bytes_per_s: a.compress.max_bandwidth,
        idle_timeout_ms: idle,
        congestion: a.compress.congestion.clone(),
        psk: a.tls.psk()?,
        page_checksums: !a.no_page_checksums,
        ..SenderConfig::default()
    };
    // A profile first; what is given on the command line wins.
    let profile = match &a.profile {
        Some(path) => Some(Profile::load(path)?),
        None => None,
    };
    if let (Some(p), Some(path)) = (&profile, &a.profile) {
        // A --congestion replaces the profile's before it is checked against this kernel: a
        // profile from a host with bbr still serves one without it.
        let mut p = p.clone();
        if let Some(c) = &a.compress.congestion {
            p.send.congestion = Some(c.clone());
        }
        p.apply(&mut config)
            .with_context(|| format!("profile {}", path.display()))?;
    }
    if let Some(c) = &a.compress.congestion {
        config.congestion = Some(c.clone());
    }
    if let Some(z) = a.zero_copy {
        config.zero_copy = z;
    }
    if let Some(c) = a.compress.compress {
        config.compression = c;
    }
    if let Some(l) = a.compress.zstd_level {
        if !matches!(config.compression, Compression::Zstd | Compression::Auto) {
            bail!(
                "--zstd-level applies to --compress zstd or auto, not {}",
                config.compression
            );
        }
        config.zstd_level = l;
    }
    let profile_channels = profile.as_ref().and_then(|p| p.send.channels);
    match (a.channels, profile_channels) {
        (Some(ChannelChoice::Count(n)), _) => config.channels = n,
        (_, Some(n)) => config.channels = n,
        (None, None) => config.channels = 2,
        (Some(ChannelChoice::Auto), None) => {}
    }
    config.validate()?;
    let memory = Arc::new(GuestMemory::from_file(&a.from, false)?);
    if a.channels == Some(ChannelChoice::Auto) && profile_channels.is_none() {
        let peer = std::net::ToSocketAddrs::to_socket_addrs(a.connect.as_str())
            .with_context(|| format!("resolving {}", a.connect))?
            .next()
            .with_context(|| format!("{} resolves to no address", a.connect))?;
        let auto = pagewire::profile::auto_channels(&memory, peer, &config)
            .context("measuring for --channels auto")?;
        if !a.common.json && !a.common.json_stream {
            eprintln!("channels auto: {} ({})", auto.channels, auto.reason);
        }
        config.channels = auto.channels;
    }
    // A signal cancels the connect and the handshakes too (up to 10 s against a receiver
    // that does not answer), then the transfer.
    let canceller = pagewire::sender::Canceller::new();
    config.canceller = Some(canceller.clone());
    interrupt::cancels(canceller);
    let mut sender = Sender::connect(a.connect.as_str(), memory, &config).context("connecting")?;
    let display = start_display(sender.progress(), None, "send", a.common.json_stream);
    let result = sender.send_all().and_then(|_| sender.finish());
    finish_display(display);
    let stats = result.context("sending failed")?;
    report(&stats, None, &a.common, "sent", None)?;
    Ok(true)
}
