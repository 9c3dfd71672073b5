//! `rediss://`: the ledger on a Redis that speaks TLS only on the port waquota uses, with a
//! certificate from a CA the test makes (`redis_ca`).

mod common;

use common::ops::Pki;
use common::{Backend, D, RedisServer, TestServer, free_port, ts};
use tonic::Code;
use waquota::config::Store;
use waquota::proto::{AcquireRequest, Decision};

/// A Redis with a TLS port (its plain port is only for the harness's readiness check).
fn tls_redis(pki: &Pki) -> (RedisServer, u16) {
    let tls_port = free_port(false);
    let (cert, key, ca) = (pki.server_cert(), pki.server_key(), pki.ca());
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]);
    (redis, tls_port)
}

fn acquire_req() -> AcquireRequest {
    AcquireRequest {
        sender: "s1".into(),
        recipient: "r1".into(),
        at: Some(ts(D)),
        ..Default::default()
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_serves_decisions() {
    let pki = Pki::generate();
    let (_redis, tls_port) = tls_redis(&pki);
    let ca = pki.ca();
    let server = TestServer::start_with(Backend::Memory, move |s| {
        s.store = Store::Redis {
            url: format!("rediss://127.0.0.1:{tls_port}"),
        };
        s.redis_ca = Some(ca);
    })
    .await;
    let r = server
        .quota()
        .await
        .acquire(acquire_req())
        .await
        .expect("acquire");
    assert_eq!(r.into_inner().decision, Decision::AllowedNew as i32);
}

#[tokio::test]
async fn rediss_refuses_a_server_certificate_it_cannot_verify() {
    let pki = Pki::generate();
    let (_redis, tls_port) = tls_redis(&pki);
    let server = TestServer::start_with(Backend::Memory, move |s| {
        s.store = Store::Redis {
            url: format!("rediss://127.0.0.1:{tls_port}"),
        };
    })
    .await;
    let got = server.quota().await.acquire(acquire_req()).await;
    assert_eq!(got.map_err(|s| s.code()).err(), Some(Code::Unavailable));
}
