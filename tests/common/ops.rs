//! Helpers for the operational tests: bearer tokens on requests, certificates made on the
//! spot, a plain HTTP GET, Redis pauses, and channels to servers that need TLS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use super::connect;
use tonic::Request;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// `msg` with `authorization: Bearer <token>` when a token is given.
pub fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// `GET path` over HTTP/1.1; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_owned())
}

/// Polls `GET path` until it answers (the listener starts with the server).
pub fn http_get_ready(addr: SocketAddr, path: &str) -> (u16, String) {
    super::wait_until(&format!("a listener on {addr}"), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
    });
    http_get(addr, path)
}

/// The value of one series in a Prometheus text exposition, e.g.
/// `waquota_decisions_total{decision="allowed_new",scope="sender"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Suspends Redis's write commands (scripts included) for `ms` milliseconds.
pub fn pause_writes(port: u16, ms: u64) {
    let reply = super::raw_command(port, &format!("CLIENT PAUSE {ms} WRITE"));
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("+OK")),
        "CLIENT PAUSE: {reply:?}"
    );
}

pub fn unpause(port: u16) {
    let _ = super::raw_command(port, "CLIENT UNPAUSE");
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, written as
/// PEM files into a scratch directory.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl Pki {
    pub fn generate() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

        let dir = std::env::temp_dir().join(format!(
            "waquota-test-pki-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "waquota test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let server = server_params.signed_by(&server_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["worker-1".to_owned()]).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "worker-1");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &issuer).unwrap();

        let pki = Pki {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        };
        std::fs::write(pki.ca(), &pki.ca_pem).unwrap();
        std::fs::write(pki.server_cert(), server.pem()).unwrap();
        std::fs::write(pki.server_key(), server_key.serialize_pem()).unwrap();
        pki
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// A TLS client config trusting the test CA, with the client certificate if `mutual`.
    pub fn client(&self, mutual: bool) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if mutual {
            c = c.identity(Identity::from_pem(
                &self.client_cert_pem,
                &self.client_key_pem,
            ));
        }
        c
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server that persists every write (AOF, fsync always) in its directory, so a
/// `restart()` after `kill()` comes back with the ledger intact.
pub fn persistent_redis() -> super::RedisServer {
    super::RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
}
