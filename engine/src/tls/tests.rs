//! Unit tests of the TLS layer: our records and rustls's interoperate.
use super::*;
use crate::pipeline::seal::CONTENT_APPLICATION_DATA;
use rustls::{ClientConnection, ServerConnection};

fn pair() -> (TlsClient, TlsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(&certs::CertOptions::default())
        .unwrap()
        .write(dir.path())
        .unwrap();
    let client =
        TlsClient::new(certs::client_files(dir.path()).load().unwrap(), "localhost").unwrap();
    let server = TlsServer::new(certs::server_files(dir.path()).load().unwrap()).unwrap();
    (client, server, dir)
}

/// Moves TLS bytes between two buffered rustls connections until both finish the handshake.
fn handshake(c: &mut ClientConnection, s: &mut ServerConnection) {
    for _ in 0..16 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets().unwrap();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        c.read_tls(&mut buf.as_slice()).unwrap();
        c.process_new_packets().unwrap();
        if !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn our_records_and_rustls_records_interoperate() {
    let (client, server, _dir) = pair();
    let mut c =
        ClientConnection::new(client.rustls_config(), client.server_name().clone()).unwrap();
    let mut s = ServerConnection::new(server.rustls_config()).unwrap();
    handshake(&mut c, &mut s);

    // The client side becomes ours: its traffic keys drive our sealer and opener.
    let secrets = c.dangerous_extract_secrets().unwrap();
    let mut sealer = RecordSealer::new(&secrets.tx.1, secrets.tx.0).unwrap();
    let mut opener = RecordOpener::new(&secrets.rx.1, secrets.rx.0).unwrap();

    // Our records, read by an unmodified rustls server.
    let message: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
    let mut wire = vec![0u8; message.len() + 4 * RECORD_BYTES_MAX];
    let n = sealer
        .seal(&message, CONTENT_APPLICATION_DATA, &mut wire)
        .unwrap();
    let mut input = &wire[..n];
    let mut got = Vec::new();
    while !input.is_empty() {
        s.read_tls(&mut input).unwrap();
        s.process_new_packets().unwrap();
        let mut chunk = [0u8; 65536];
        while let Ok(k) = s.reader().read(&mut chunk) {
            if k == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..k]);
        }
    }
    assert_eq!(got, message);

    // rustls's records, opened by ours.
    s.writer().write_all(b"hello from rustls").unwrap();
    let mut wire = Vec::new();
    while s.wants_write() {
        s.write_tls(&mut wire).unwrap();
    }
    let (ty, range) = opener.open_in_place(&mut wire).unwrap();
    assert_eq!(ty, CONTENT_APPLICATION_DATA);
    assert_eq!(&wire[range], b"hello from rustls");
}

#[test]
fn the_host_of_an_address_is_its_name_without_the_port() {
    assert_eq!(host_of("10.0.0.2:4444"), "10.0.0.2");
    assert_eq!(host_of("receiver.example:4444"), "receiver.example");
    assert_eq!(host_of("[fd00::2]:4444"), "fd00::2");
    assert_eq!(host_of("receiver.example"), "receiver.example");
}

#[test]
fn written_keys_are_readable_by_their_owner_alone_and_never_replace_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A directory that already holds one of the files is refused as a whole: nothing written,
    // the file there untouched.
    std::fs::write(dir.path().join("server-key.pem"), "old").unwrap();
    let set = certs::generate(&certs::CertOptions::default()).unwrap();
    let e = set.write(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("server-key.pem") && e.contains("refusing"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("server-key.pem")).unwrap(),
        "old"
    );
    std::fs::remove_file(dir.path().join("server-key.pem")).unwrap();
    set.write(dir.path()).unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for key in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        assert_eq!(mode(key), 0o600, "{key}");
    }
    assert_eq!(mode("ca-cert.pem") & 0o600, 0o600);
    TlsServer::new(certs::server_files(dir.path()).load().unwrap()).unwrap();
}
