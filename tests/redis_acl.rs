//! Redis with an ACL user and the default user disabled: the right credentials serve, wrong or
//! missing ones answer UNAVAILABLE (and nothing panics).

mod common;

use common::dsl::{
    acquire, assign, inbound, inspect, list_page, policy, portfolio, put_policy, release, reset,
    sender,
};
use common::{Backend, D, HOUR, RedisServer, TestServer, raw_command, ts};
use tonic::Code;
use waquota::config::Store;
use waquota::proto::{AcquireRequest, Decision, Tier, WindowMode};

/// The least-privilege user that docs/operations.md recommends.
const DOCUMENTED_ACL: &str =
    "ACL SETUSER waquota on >pw2 ~wq:* +@read +@write +@scripting +ping +time -@dangerous +restore";

fn acl_redis() -> RedisServer {
    let redis = RedisServer::start();
    for cmd in [
        "ACL SETUSER waq on >secret ~* &* +@all",
        DOCUMENTED_ACL,
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
async fn the_documented_least_privilege_user_runs_every_script() {
    let redis = acl_redis();
    let server = server_on(format!("redis://waquota:pw2@127.0.0.1:{}", redis.port)).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    let t = D + 8 * HOUR;
    let r = acquire(&mut q, "s1", "r1", t).await;
    assert_eq!(r.decision, Decision::AllowedNew as i32);
    assert!(release(&mut q, "s1", "r1", &r.reservation, t + 1).await);
    inbound(&mut q, "s1", "r2", t + 2).await;
    acquire(&mut q, "s1", "r3", t + 3).await;
    put_policy(
        &mut a,
        sender("s1"),
        policy(Tier::Tier1k, 0, WindowMode::Conversation),
    )
    .await;
    put_policy(
        &mut a,
        portfolio("p1"),
        policy(Tier::Tier2k, 0, WindowMode::Rolling),
    )
    .await;
    assign(&mut a, "s1", "p1").await;
    acquire(&mut q, "s1", "r4", t + 4).await;
    assert_eq!(inspect(&mut a, portfolio("p1"), t + 4).await.used, 1);
    assert_eq!(
        list_page(&mut a, portfolio("p1"), 10, "", t + 4)
            .await
            .entries
            .len(),
        1
    );
    reset(&mut a, portfolio("p1"), t + 5).await.expect("reset");
    assign(&mut a, "s1", "").await;
    inspect(&mut a, sender("s1"), t + 6).await;
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
