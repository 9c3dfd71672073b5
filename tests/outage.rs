//! The store-outage policy: Redis killed mid-test, `deny` and `allow` (global and per sender),
//! only Acquire/AcquireBatch falling back, recovery without a restart, and the ledger intact
//! after a persistent Redis comes back.

mod common;
use common::eventually;

use std::collections::BTreeMap;

use common::dsl::sender;
use common::ops::{connect, http_get_ready, metric, persistent_redis};
use common::{Backend, D, HOUR, TestServer, ts};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use waquota::config::{OnStoreError, Settings, Store};
use waquota::proto::admin_service_client::AdminServiceClient;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AcquireResponse, Decision, InspectRequest,
    InspectResponse, RecordInboundRequest, ReleaseRequest,
};

const T0: i64 = D + 10 * HOUR;

fn acquire_req(sender: &str, recipient: &str, at: i64) -> AcquireRequest {
    AcquireRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        at: Some(ts(at)),
        ..Default::default()
    }
}

async fn acquire(
    q: &mut QuotaServiceClient<Channel>,
    sender: &str,
    recipient: &str,
) -> Result<tonic::Response<AcquireResponse>, tonic::Status> {
    q.acquire(acquire_req(sender, recipient, T0)).await
}

async fn inspect(
    a: &mut AdminServiceClient<Channel>,
    who: &str,
) -> Result<InspectResponse, tonic::Status> {
    a.inspect(InspectRequest {
        target: sender(who),
        recipient: String::new(),
        at: Some(ts(T0 + 1000)),
    })
    .await
    .map(|r| r.into_inner())
}

fn assert_outage_admission(r: &tonic::Response<AcquireResponse>) {
    let m = r.get_ref();
    assert!(m.allowed && m.store_outage, "{m:?}");
    assert_eq!(m.decision, Decision::AllowedNew as i32);
    assert!(m.reservation.is_empty(), "nothing to release: {m:?}");
    assert_eq!((m.limit, m.used, m.remaining), (0, 0, 0));
    assert_eq!(
        r.metadata()
            .get("waquota-store-outage")
            .and_then(|v| v.to_str().ok()),
        Some("allowed")
    );
}

/// A server whose Redis is gone, after `s1` took a slot for `r1`; returns its reservation too.
async fn killed_redis_with_reservation(tweak: impl FnOnce(&mut Settings)) -> (TestServer, String) {
    let mut server = TestServer::start_with(Backend::Redis, tweak).await;
    let mut q = server.quota().await;
    let r = acquire(&mut q, "s1", "r1")
        .await
        .expect("acquire")
        .into_inner();
    assert!(r.allowed && !r.store_outage);
    server.redis().unwrap().kill();
    (server, r.reservation)
}

async fn server_with_killed_redis(tweak: impl FnOnce(&mut Settings)) -> TestServer {
    killed_redis_with_reservation(tweak).await.0
}

#[tokio::test]
async fn deny_answers_unavailable_while_redis_is_down() {
    let server = server_with_killed_redis(|_| {}).await;
    let mut q = server.quota().await;
    let got = acquire(&mut q, "s1", "r2").await;
    assert_eq!(got.map_err(|s| s.code()).err(), Some(Code::Unavailable));
    let got = q
        .acquire_batch(AcquireBatchRequest {
            sender: "s1".into(),
            recipients: vec!["r2".into(), "r3".into()],
            at: Some(ts(T0)),
            ..Default::default()
        })
        .await;
    assert_eq!(got.map_err(|s| s.code()).err(), Some(Code::Unavailable));
}

/// A Redis gone before the instance's first decision: `allow` still admits (the reservation
/// secret is asked for only once the store has answered a decision).
#[tokio::test]
async fn allow_admits_when_redis_is_down_before_the_first_decision() {
    let mut server = TestServer::start_with(Backend::Redis, |s| {
        s.on_store_error = OnStoreError::Allow;
    })
    .await;
    server.redis().unwrap().kill();
    let mut q = server.quota().await;
    let r = acquire(&mut q, "s1", "r1").await.expect("admitted");
    assert_outage_admission(&r);
}

#[tokio::test]
async fn allow_admits_acquires_and_counts_them_while_redis_is_down() {
    let server = server_with_killed_redis(|s| {
        s.on_store_error = OnStoreError::Allow;
        s.metrics_listen = Some(common::ANY_PORT);
    })
    .await;
    let metrics = server.metrics.unwrap();
    let mut q = server.quota().await;
    let r = acquire(&mut q, "s1", "+49 151 0000-0002")
        .await
        .expect("admitted");
    assert_outage_admission(&r);
    assert_eq!(r.get_ref().recipient, "4915100000002");

    let batch = q
        .acquire_batch(AcquireBatchRequest {
            sender: "s1".into(),
            recipients: vec!["r3".into(), "r4".into()],
            at: Some(ts(T0)),
            ..Default::default()
        })
        .await
        .expect("batch admitted");
    assert_eq!(
        batch
            .metadata()
            .get("waquota-store-outage")
            .map(|v| v.to_str().unwrap()),
        Some("allowed")
    );
    let results = &batch.get_ref().results;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.allowed && r.store_outage));
    assert_eq!(results[1].recipient, "r4");

    // Bad input is still refused as such, store or no store.
    let bad = acquire(&mut q, "", "r5").await;
    assert_eq!(bad.map_err(|s| s.code()).err(), Some(Code::InvalidArgument));

    let (_, text) = tokio::task::spawn_blocking(move || http_get_ready(metrics, "/metrics"))
        .await
        .unwrap();
    assert_eq!(
        metric(
            &text,
            "waquota_store_outage_decisions_total{outcome=\"allowed\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            "waquota_store_outage_decisions_total{outcome=\"denied\"}"
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn only_acquires_fall_back_the_rest_answers_unavailable() {
    let (server, reservation) =
        killed_redis_with_reservation(|s| s.on_store_error = OnStoreError::Allow).await;
    let mut q = server.quota().await;
    let mut a = server.admin().await;
    let release = q
        .release(ReleaseRequest {
            sender: "s1".into(),
            recipient: "r1".into(),
            reservation,
            at: Some(ts(T0)),
        })
        .await;
    let inbound = q
        .record_inbound(RecordInboundRequest {
            sender: "s1".into(),
            recipient: "r1".into(),
            free_entry_point: false,
            at: Some(ts(T0)),
        })
        .await;
    let inspected = inspect(&mut a, "s1").await;
    assert_eq!(release.map_err(|s| s.code()).err(), Some(Code::Unavailable));
    assert_eq!(inbound.map_err(|s| s.code()).err(), Some(Code::Unavailable));
    assert_eq!(
        inspected.map_err(|s| s.code()).err(),
        Some(Code::Unavailable)
    );
}

#[tokio::test]
async fn per_sender_overrides_win_over_the_default() {
    let server = server_with_killed_redis(|s| {
        s.on_store_error = OnStoreError::Deny;
        s.on_store_error_senders = BTreeMap::from([("otp-sender".into(), OnStoreError::Allow)]);
    })
    .await;
    let mut q = server.quota().await;
    assert_outage_admission(&acquire(&mut q, "otp-sender", "r1").await.expect("allowed"));
    let denied = acquire(&mut q, "s1", "r1").await;
    assert_eq!(denied.map_err(|s| s.code()).err(), Some(Code::Unavailable));

    let server = server_with_killed_redis(|s| {
        s.on_store_error = OnStoreError::Allow;
        s.on_store_error_senders = BTreeMap::from([("marketing".into(), OnStoreError::Deny)]);
    })
    .await;
    let mut q = server.quota().await;
    let denied = acquire(&mut q, "marketing", "r1").await;
    assert_eq!(denied.map_err(|s| s.code()).err(), Some(Code::Unavailable));
    assert_outage_admission(&acquire(&mut q, "s1", "r1").await.expect("allowed"));
}

/// Polls `inspect` until the store answers again (UNAVAILABLE until then).
async fn inspect_when_back(a: &mut AdminServiceClient<Channel>, who: &str) -> InspectResponse {
    eventually("the service to recover", || {
        let mut a = a.clone();
        async move {
            match inspect(&mut a, who).await {
                Ok(i) => Some(i),
                Err(s) => {
                    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                    None
                }
            }
        }
    })
    .await
}

async fn recovers_with_the_ledger_intact(policy: OnStoreError) {
    let mut redis = persistent_redis();
    let url = redis.url();
    let server = TestServer::start_with(Backend::Memory, move |s| {
        s.store = Store::Redis { url };
        s.on_store_error = policy;
    })
    .await;
    let channel = connect(&server.endpoint()).await;
    let mut q = QuotaServiceClient::new(channel.clone());
    let mut a = AdminServiceClient::new(channel);
    for r in ["r1", "r2", "r3"] {
        let got = acquire(&mut q, "s1", r)
            .await
            .expect("acquire")
            .into_inner();
        assert_eq!(got.decision, Decision::AllowedNew as i32);
    }
    assert_eq!(inspect(&mut a, "s1").await.unwrap().used, 3);

    redis.kill();
    let during = acquire(&mut q, "s1", "r4").await;
    match policy {
        OnStoreError::Deny => {
            assert_eq!(during.map_err(|s| s.code()).err(), Some(Code::Unavailable))
        }
        OnStoreError::Allow => assert_outage_admission(&during.expect("admitted")),
    }

    redis.restart();
    let after = inspect_when_back(&mut a, "s1").await;
    assert_eq!(after.used, 3, "the ledger survived the restart: {after:?}");
    let again = acquire(&mut q, "s1", "r1")
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(again.decision, Decision::AllowedCounted as i32);
    assert!(!again.store_outage);
    let new = acquire(&mut q, "s1", "r4")
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(new.decision, Decision::AllowedNew as i32);
    assert_eq!(new.used, 4);
}

#[tokio::test]
async fn deny_recovers_without_restart_and_the_ledger_is_intact() {
    recovers_with_the_ledger_intact(OnStoreError::Deny).await;
}

#[tokio::test]
async fn allow_recovers_without_restart_and_the_ledger_is_intact() {
    recovers_with_the_ledger_intact(OnStoreError::Allow).await;
}

/// Polls the health of `service` until it is `want`.
async fn wait_health(channel: Channel, service: &str, want: ServingStatus) {
    let health = HealthClient::new(channel);
    eventually(&format!("{service:?} to be {want:?}"), || {
        let mut health = health.clone();
        async move {
            let req = HealthCheckRequest {
                service: service.into(),
            };
            let got = health.check(req).await.map(|r| r.into_inner().status);
            (got.ok() == Some(want as i32)).then_some(())
        }
    })
    .await
}

#[tokio::test]
async fn with_allow_quota_health_stays_serving_while_the_store_is_down() {
    let server = server_with_killed_redis(|s| s.on_store_error = OnStoreError::Allow).await;
    let channel = connect(&server.endpoint()).await;
    wait_health(channel.clone(), "", ServingStatus::NotServing).await;
    wait_health(
        channel.clone(),
        "waquota.v1.AdminService",
        ServingStatus::NotServing,
    )
    .await;
    let mut health = HealthClient::new(channel);
    let quota = health
        .check(HealthCheckRequest {
            service: "waquota.v1.QuotaService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn with_deny_quota_health_follows_the_store() {
    let server = server_with_killed_redis(|_| {}).await;
    let channel = connect(&server.endpoint()).await;
    wait_health(
        channel,
        "waquota.v1.QuotaService",
        ServingStatus::NotServing,
    )
    .await;
}

/// A reassignment cut short by the store (a step failed half-way while the instance lives) is
/// resumed by that instance's next AssignSender at once: no instance crashed, so nothing should
/// wait out the abandoned-move delay of 30 s. Redis refuses the portfolio's keys for a while
/// (an ACL on the default user), so the move stops after its first steps.
#[tokio::test]
async fn a_move_interrupted_by_a_store_hiccup_is_resumed_at_once_by_its_instance() {
    let mut server = TestServer::start(Backend::Redis).await;
    let mut admin = server.admin().await;
    let mut q = server.quota().await;
    acquire(&mut q, "s1", "4915100000001")
        .await
        .expect("a slot to move");
    let port = server.redis().unwrap().port;
    let assign = || waquota::proto::AssignSenderRequest {
        create: true,
        sender: "s1".into(),
        portfolio: "p1".into(),
        at: None,
    };

    let acl = |rule: &str| {
        let reply = common::raw_command(port, &format!("ACL SETUSER default {rule}"));
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with("+OK")),
            "{reply:?}"
        );
    };
    acl("resetkeys ~wq:{s:*");
    let cut = admin.assign_sender(assign()).await;
    acl("allkeys");
    assert_eq!(cut.map(drop).map_err(|s| s.code()), Err(Code::Unavailable));
    let journal = common::raw_command(port, "GET wq:{s:s1}:mv").unwrap_or_default();
    assert!(
        journal.contains(">p1>"),
        "the move is journaled, unfinished: {journal}"
    );

    admin
        .assign_sender(assign())
        .await
        .expect("the interrupted move is resumed, not 'being reassigned'");
    let i = admin
        .inspect(InspectRequest {
            target: sender("s1"),
            at: Some(ts(T0 + 1)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i.portfolio, "p1", "{i:?}");
    let journal = common::raw_command(port, "GET wq:{s:s1}:mv").unwrap_or_default();
    assert!(journal.starts_with("$-1"), "the journal is gone: {journal}");
}
