//! Redis with an ACL user and the default user disabled: the right credentials serve, wrong or
//! missing ones answer UNAVAILABLE (and nothing panics).

mod common;

use common::{Backend, D, RedisServer, TestServer, raw_command, ts};
use tonic::Code;
use waquota::config::Store;
use waquota::proto::{AcquireRequest, Decision};

fn acl_redis() -> RedisServer {
    let redis = RedisServer::start();
    for cmd in [
        "ACL SETUSER waq on >secret ~* &* +@all",
        "ACL SETUSER default off",
    ] {
        let reply = raw_command(redis.port, cmd);
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with("+OK")),
            "{cmd}: {reply:?}"
        );
    }
    redis
}

async fn server_on(url: String) -> TestServer {
    TestServer::start_with(Backend::Memory, move |s| s.store = Store::Redis { url }).await
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
async fn acl_user_with_password_serves_decisions() {
    let redis = acl_redis();
    let server = server_on(format!("redis://waq:secret@127.0.0.1:{}", redis.port)).await;
    let r = server
        .quota()
        .await
        .acquire(acquire_req())
        .await
        .expect("acquire");
    assert_eq!(r.into_inner().decision, Decision::AllowedNew as i32);
}

#[tokio::test]
async fn wrong_or_missing_credentials_answer_unavailable() {
    let redis = acl_redis();
    for url in [
        format!("redis://waq:wrong@127.0.0.1:{}", redis.port),
        format!("redis://nobody:secret@127.0.0.1:{}", redis.port),
        format!("redis://127.0.0.1:{}", redis.port),
    ] {
        let server = server_on(url.clone()).await;
        let mut q = server.quota().await;
        for _ in 0..2 {
            let got = q.acquire(acquire_req()).await;
            assert_eq!(
                got.as_ref().map_err(|s| s.code()).err(),
                Some(Code::Unavailable),
                "{url}: {got:?}"
            );
        }
        server.stop().await;
    }
}
