//! TLS and mutual TLS on the gRPC listener, with certificates made by the test itself.

mod common;
use common::eventually;

use common::ops::Pki;
use common::{Backend, D, TestServer, ts};
use tonic::transport::{Channel, ClientTlsConfig};
use waquota::config::TlsSettings;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{AcquireRequest, AcquireResponse, Decision};

async fn tls_server(pki: &Pki, mutual: bool) -> TestServer {
    let tls = TlsSettings {
        cert: pki.server_cert(),
        key: pki.server_key(),
        client_ca: mutual.then(|| pki.ca()),
    };
    TestServer::start_with(Backend::Memory, move |s| s.tls = Some(tls)).await
}

/// Waits until the listener accepts TCP connections (the TLS handshake is the test's business).
async fn listening(server: &TestServer) {
    eventually("the server to listen", || async {
        tokio::net::TcpStream::connect(server.addr).await.ok()
    })
    .await;
}

/// Connects with `tls` (or in plain text) and makes one Acquire.
async fn acquire_over(
    server: &TestServer,
    tls: Option<ClientTlsConfig>,
) -> Result<AcquireResponse, String> {
    let endpoint = match &tls {
        Some(_) => format!("https://{}", server.addr),
        None => format!("http://{}", server.addr),
    };
    let mut ep = Channel::from_shared(endpoint).unwrap();
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = ep.connect().await.map_err(|e| format!("connect: {e}"))?;
    QuotaServiceClient::new(channel)
        .acquire(AcquireRequest {
            sender: "s1".into(),
            recipient: "r1".into(),
            at: Some(ts(D)),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("acquire: {s}"))
}

#[tokio::test]
async fn tls_client_trusting_the_ca_acquires() {
    let pki = Pki::generate();
    let server = tls_server(&pki, false).await;
    listening(&server).await;
    let r = acquire_over(&server, Some(pki.client(false)))
        .await
        .expect("TLS acquire");
    assert_eq!(r.decision, Decision::AllowedNew as i32);
}

#[tokio::test]
async fn plain_text_client_is_refused_by_a_tls_listener() {
    let pki = Pki::generate();
    let server = tls_server(&pki, false).await;
    listening(&server).await;
    assert!(acquire_over(&server, None).await.is_err());
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let pki = Pki::generate();
    let server = tls_server(&pki, true).await;
    listening(&server).await;
    let refused = acquire_over(&server, Some(pki.client(false))).await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");

    let r = acquire_over(&server, Some(pki.client(true)))
        .await
        .expect("acquire with a client certificate");
    assert_eq!(r.decision, Decision::AllowedNew as i32);
}

#[tokio::test]
async fn mutual_tls_refuses_a_certificate_from_another_ca() {
    let pki = Pki::generate();
    let other = Pki::generate();
    let server = tls_server(&pki, true).await;
    listening(&server).await;
    // Trusts the server's CA, but presents a certificate the server's CA did not sign.
    let tls = pki
        .client(false)
        .identity(tonic::transport::Identity::from_pem(
            &other.client_cert_pem,
            &other.client_key_pem,
        ));
    let refused = acquire_over(&server, Some(tls)).await;
    assert!(refused.is_err(), "foreign client certificate: {refused:?}");
}
