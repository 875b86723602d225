//! The control protocol of `pagewire-bench serve`: one JSON object per line over a plain TCP
//! connection, shared by the benchmark's server and client (`matrix --peer`) and by
//! `pagewire-tune sweep --server bench`, so the three cannot drift apart.
//!
//! For each measurement the source sends a [`Request`]; the server binds an ephemeral port on
//! the address the control connection arrived at, answers [`Reply::Listening`] once its
//! destination memory is faulted in (so the source's clock starts after the server's setup),
//! takes the data, and answers [`Reply::Done`] with its own CPU seconds, or
//! [`Reply::Failed`] with the reason. The control connection is for a benchmark on a trusted
//! network: it is neither authenticated nor encrypted, and TLS cells send the receiver's
//! throw-away key over it.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Seconds either side waits for the other's next message of a measurement (the server for
/// the data, the client for the server's answer).
pub const MEASUREMENT_TIMEOUT_S: u64 = 300;
/// The longest control line read, in bytes: a request with three PEM texts is a few KiB.
pub const LINE_BYTES_MAX: u64 = 1 << 20;

/// What went wrong on a control connection.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting, reading or writing failed.
    #[error("bench control connection")]
    Io(#[from] std::io::Error),
    /// A line is not a message of this protocol (another program on the port, or a version
    /// of pagewire-bench that speaks differently).
    #[error("bench control connection: not a message of pagewire-bench serve")]
    Parse(#[from] serde_json::Error),
    /// A line longer than [`LINE_BYTES_MAX`].
    #[error("bench control connection: a line longer than {LINE_BYTES_MAX} bytes")]
    LineTooLong,
    /// The server could not do what was asked, in its words.
    #[error("the bench server failed: {0}")]
    Failed(String),
    /// The other side closed the control connection, or answered out of turn.
    #[error("the bench server {0}")]
    Unexpected(&'static str),
}

/// A result of this crate.
pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// PEM texts of a receiver's TLS identity (certificate, key, and the CA both sides trust).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pems {
    /// The receiver's certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
    /// The CA that signed both sides' certificates.
    pub ca: String,
}

/// A source's request: start one receiver for one measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Start a pagewire receiver of `size` bytes (TLS with `tls`, else plaintext);
    /// `unchecked_pages`: accept plaintext pages without checksums.
    Recv {
        /// Destination memory, bytes.
        size: u64,
        /// The receiver's TLS identity; none: plaintext.
        tls: Option<Pems>,
        /// Accept plaintext pages without checksums.
        #[serde(default)]
        unchecked_pages: bool,
        /// Place the receiver's shards as the library does by default (`Pinning::Nodes`);
        /// false (the source's `--no-pin`): leave them to the scheduler.
        #[serde(default = "yes")]
        pin: bool,
    },
    /// Accept `streams` raw TCP streams carrying `size` bytes in all. The receiving threads are
    /// left to the scheduler within the allowed cores, as pagewire's receive shards are on one
    /// node.
    Raw {
        /// Bytes in all streams together.
        size: u64,
        /// Streams; the i-th connected carries the i-th share.
        streams: u16,
        /// The source's pinning (kept for the protocol; the server no longer pins raw TCP's
        /// receiving threads).
        #[serde(default = "yes")]
        pin: bool,
    },
}

/// A request from a source that does not say: pinned, as before `pin` existed.
fn yes() -> bool {
    true
}

/// The server's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    /// Ready: the source may connect to this port on the control connection's address.
    Listening {
        /// The receiver's port.
        port: u16,
    },
    /// All data is in; the receiving side's CPU seconds.
    Done {
        /// CPU seconds of the server's receiving threads.
        cpu_s: f64,
    },
    /// The measurement failed on the server.
    Failed {
        /// Why, with its causes.
        error: String,
    },
}

/// Writes `value` as one line.
pub fn send_line(stream: &mut impl Write, value: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// Reads one line as a `T`; `None` when the other side closed the connection.
pub fn read_line<T: for<'de> Deserialize<'de>>(reader: &mut impl BufRead) -> Result<Option<T>> {
    let mut line = Vec::new();
    // `&mut R` reads too: the limit wraps the borrow, and the reader's buffer stays with it.
    let mut limited = std::io::Read::take(&mut *reader, LINE_BYTES_MAX + 1);
    let n = limited.read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n as u64 > LINE_BYTES_MAX {
        return Err(ControlError::LineTooLong);
    }
    Ok(Some(serde_json::from_slice(line.trim_ascii())?))
}

/// The source's side of a control connection.
pub struct Client {
    host: IpAddr,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Opens a control connection to `pagewire-bench serve` at `addr`.
    pub fn connect(addr: &str) -> Result<Client> {
        let control = TcpStream::connect(addr)?;
        control.set_read_timeout(Some(Duration::from_secs(MEASUREMENT_TIMEOUT_S)))?;
        Ok(Client {
            host: control.peer_addr()?.ip(),
            writer: control.try_clone()?,
            reader: BufReader::new(control),
        })
    }

    /// Asks for a receiver and returns the address to send to, once the server listens.
    pub fn start(&mut self, request: &Request) -> Result<SocketAddr> {
        send_line(&mut self.writer, request)?;
        match read_line::<Reply>(&mut self.reader)? {
            Some(Reply::Listening { port }) => Ok(SocketAddr::new(self.host, port)),
            Some(Reply::Failed { error }) => Err(ControlError::Failed(error)),
            Some(Reply::Done { .. }) => {
                Err(ControlError::Unexpected("answered done before listening"))
            }
            None => Err(ControlError::Unexpected("closed the session")),
        }
    }

    /// Waits for the end of the measurement [`Client::start`] began: the server's CPU seconds.
    pub fn done(&mut self) -> Result<f64> {
        match read_line::<Reply>(&mut self.reader)? {
            Some(Reply::Done { cpu_s }) => Ok(cpu_s),
            Some(Reply::Failed { error }) => Err(ControlError::Failed(error)),
            Some(Reply::Listening { .. }) => Err(ControlError::Unexpected("listened twice")),
            None => Err(ControlError::Unexpected("closed the session")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use std::net::TcpListener;

    /// A server that answers each request with the replies `script` gives it.
    fn server(script: Vec<Vec<Reply>>) -> (String, std::thread::JoinHandle<Vec<Request>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let (control, _) = listener.accept().unwrap();
            let mut writer = control.try_clone().unwrap();
            let mut reader = BufReader::new(control);
            let mut seen = Vec::new();
            for replies in script {
                let Some(request) = read_line::<Request>(&mut reader).unwrap() else {
                    break;
                };
                seen.push(request);
                for r in replies {
                    send_line(&mut writer, &r).unwrap();
                }
            }
            seen
        });
        (addr, handle)
    }

    #[test]
    fn a_measurement_is_listening_then_done() {
        let (addr, server) = server(vec![vec![
            Reply::Listening { port: 4242 },
            Reply::Done { cpu_s: 0.25 },
        ]]);
        let mut client = Client::connect(&addr).unwrap();
        let to = client
            .start(&Request::Recv {
                size: 1 << 20,
                tls: None,
                unchecked_pages: true,
                pin: false,
            })
            .unwrap();
        assert_eq!(to, "127.0.0.1:4242".parse().unwrap());
        assert_eq!(client.done().unwrap(), 0.25);
        drop(client);
        let seen = server.join().unwrap();
        assert!(matches!(
            seen[..],
            [Request::Recv {
                size: 1048576,
                unchecked_pages: true,
                pin: false,
                ..
            }]
        ));
    }

    #[test]
    fn failures_and_a_closed_session_say_so() {
        let (addr, server) = server(vec![
            vec![Reply::Failed {
                error: "no memory".into(),
            }],
            vec![Reply::Listening { port: 1 }],
        ]);
        let mut client = Client::connect(&addr).unwrap();
        let raw = Request::Raw {
            size: 8,
            streams: 2,
            pin: true,
        };
        let e = client.start(&raw).unwrap_err();
        assert_eq!(e.to_string(), "the bench server failed: no memory");
        // The cause is the error's source, not repeated in its text.
        let io = ControlError::from(std::io::Error::other("reset"));
        assert_eq!(io.to_string(), "bench control connection");
        assert_eq!(std::error::Error::source(&io).unwrap().to_string(), "reset");
        client.start(&raw).unwrap();
        server.join().unwrap();
        let e = client.done().unwrap_err();
        assert!(e.to_string().contains("closed the session"), "{e}");
    }

    #[test]
    fn old_requests_default_to_pinned_and_garbage_is_refused() {
        let r: Request = serde_json::from_str(r#"{"cmd":"raw","size":8,"streams":1}"#).unwrap();
        assert!(matches!(r, Request::Raw { pin: true, .. }));
        let mut garbage = &b"HTTP/1.1 400 Bad Request\r\n"[..];
        assert!(matches!(
            read_line::<Reply>(&mut garbage),
            Err(ControlError::Parse(_))
        ));
        let long = vec![b' '; LINE_BYTES_MAX as usize + 10];
        assert!(matches!(
            read_line::<Reply>(&mut &long[..]),
            Err(ControlError::LineTooLong)
        ));
        assert!(read_line::<Reply>(&mut &b""[..]).unwrap().is_none());
    }
}
