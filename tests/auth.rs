//! Bearer-token authentication: every RPC of both services against no token, a wrong token, a
//! sender token and an operator token; refused calls change nothing; health and reflection stay
//! open.

mod common;

use common::dsl::{portfolio, sender};
use common::ops::{connect, with_token};
use common::{Backend, D, HOUR, TestServer, ts};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use waquota::proto::admin_service_client::AdminServiceClient;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AssignSenderRequest, ConfirmRequest, InspectRequest,
    InspectResponse, ListWindowRequest, Policy, PutPolicyRequest, RecordInboundRequest,
    ReleaseRequest, ReportFailureRequest, ResetRequest, Tier,
};

const SENDER_TOKEN: &str = "sender-token-5f1c";
const OPERATOR_TOKEN: &str = "operator-token-9a7e";
const WRONG_TOKEN: &str = "operator-token-9a7f";
const T0: i64 = D + 9 * HOUR;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Acquire,
    AcquireBatch,
    Release,
    RecordInbound,
    Confirm,
    ReportFailure,
    PutPolicy,
    AssignSender,
    Inspect,
    ListWindow,
    Reset,
}

const ALL: [Rpc; 11] = [
    Rpc::Acquire,
    Rpc::AcquireBatch,
    Rpc::Release,
    Rpc::RecordInbound,
    Rpc::Confirm,
    Rpc::ReportFailure,
    Rpc::PutPolicy,
    Rpc::AssignSender,
    Rpc::Inspect,
    Rpc::ListWindow,
    Rpc::Reset,
];

impl Rpc {
    fn admin(self) -> bool {
        matches!(
            self,
            Rpc::PutPolicy | Rpc::AssignSender | Rpc::Inspect | Rpc::ListWindow | Rpc::Reset
        )
    }
}

struct Clients {
    quota: QuotaServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    /// The reservation of the slot `s1` holds for `r1`.
    reservation: String,
    /// The reservation of the slot `s1` holds for `r5` on the real clock (a sender's calls run
    /// on it: only an operator's `at` is honoured).
    live_reservation: String,
}

impl Clients {
    /// One call of `rpc` on sender `s1`, each one that would change state if it were let through.
    async fn call(&mut self, rpc: Rpc, token: Option<&str>) -> Result<(), Status> {
        // Only an operator's `at` is honoured: a sender's calls run on the real clock.
        let at = (token != Some(SENDER_TOKEN)).then(|| ts(T0 + 60_000));
        let q = &mut self.quota;
        let a = &mut self.admin;
        match rpc {
            Rpc::Acquire => q
                .acquire(with_token(
                    AcquireRequest {
                        sender: "s1".into(),
                        recipient: "r2".into(),
                        at,
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::AcquireBatch => q
                .acquire_batch(with_token(
                    AcquireBatchRequest {
                        sender: "s1".into(),
                        recipients: vec!["r3".into(), "r4".into()],
                        at,
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::Release => q
                .release(with_token(
                    ReleaseRequest {
                        sender: "s1".into(),
                        recipient: "r1".into(),
                        reservation: self.reservation.clone(),
                        at,
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::RecordInbound => q
                .record_inbound(with_token(
                    RecordInboundRequest {
                        sender: "s1".into(),
                        recipient: "r2".into(),
                        free_entry_point: false,
                        at,
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::Confirm => q
                .confirm(with_token(
                    if at.is_some() {
                        ConfirmRequest {
                            sender: "s1".into(),
                            recipient: "r1".into(),
                            reservation: self.reservation.clone(),
                            delivered_at: at,
                            at,
                        }
                    } else {
                        ConfirmRequest {
                            sender: "s1".into(),
                            recipient: "r5".into(),
                            reservation: self.live_reservation.clone(),
                            delivered_at: Some(prost_types::Timestamp::from(
                                std::time::SystemTime::now(),
                            )),
                            at: None,
                        }
                    },
                    token,
                ))
                .await
                .map(drop)
                // Past auth, the ledger answers: an earlier Release of the matrix may have
                // freed the slot, which Confirm reports as NOT_FOUND.
                .or_else(|s| {
                    if s.code() == tonic::Code::NotFound {
                        Ok(())
                    } else {
                        Err(s)
                    }
                }),
            Rpc::ReportFailure => q
                .report_failure(with_token(
                    ReportFailureRequest {
                        sender: "s1".into(),
                        recipient: "r1".into(),
                        reservation: self.reservation.clone(),
                        error_code: 131_049,
                        at,
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::PutPolicy => a
                .put_policy(with_token(
                    PutPolicyRequest {
                        target: sender("s1"),
                        policy: Some(Policy {
                            tier: Tier::Tier1k as i32,
                            ..Default::default()
                        }),
                        at,
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::AssignSender => a
                .assign_sender(with_token(
                    AssignSenderRequest {
                        create: true,
                        sender: "s1".into(),
                        portfolio: "p1".into(),
                        at,
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::Inspect => a
                .inspect(with_token(
                    InspectRequest {
                        target: sender("s1"),
                        recipient: String::new(),
                        at,
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::ListWindow => a
                .list_window(with_token(
                    ListWindowRequest {
                        target: sender("s1"),
                        at,
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(drop),
            Rpc::Reset => a
                .reset(with_token(
                    ResetRequest {
                        target: portfolio("p9"),
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(drop),
        }
    }

    /// Everything a refused call could have changed, seen with an operator token.
    async fn snapshot(&mut self) -> Vec<InspectResponse> {
        let mut out = Vec::new();
        for (target, recipient) in [
            (sender("s1"), ""),
            (sender("s1"), "r1"),
            (sender("s1"), "r2"),
            (sender("s1"), "r3"),
            (portfolio("p1"), ""),
            (portfolio("p9"), ""),
        ] {
            let r = self
                .admin
                .inspect(with_token(
                    InspectRequest {
                        target,
                        recipient: recipient.into(),
                        at: Some(ts(T0 + 120_000)),
                    },
                    Some(OPERATOR_TOKEN),
                ))
                .await
                .expect("inspect with an operator token");
            out.push(r.into_inner());
        }
        out
    }
}

async fn setup(server: &TestServer) -> Clients {
    let channel = connect(&server.endpoint()).await;
    let mut c = Clients {
        quota: QuotaServiceClient::new(channel.clone()),
        admin: AdminServiceClient::new(channel),
        reservation: String::new(),
        live_reservation: String::new(),
    };
    let r = c
        .quota
        .acquire(with_token(
            AcquireRequest {
                sender: "s1".into(),
                recipient: "r1".into(),
                at: Some(ts(T0)),
                ..Default::default()
            },
            Some(OPERATOR_TOKEN),
        ))
        .await
        .expect("acquire on the trusted clock")
        .into_inner();
    assert!(r.allowed);
    c.reservation = r.reservation;
    let live = c
        .quota
        .acquire(with_token(
            AcquireRequest {
                sender: "s1".into(),
                recipient: "r5".into(),
                ..Default::default()
            },
            Some(SENDER_TOKEN),
        ))
        .await
        .expect("acquire with a sender token on the real clock")
        .into_inner();
    assert!(live.allowed);
    c.live_reservation = live.reservation;
    // The portfolio p9 holds a slot too, so that a Reset let through would show.
    for who in ["s9"] {
        c.admin
            .assign_sender(with_token(
                AssignSenderRequest {
                    create: true,
                    sender: who.into(),
                    portfolio: "p9".into(),
                    at: None,
                },
                Some(OPERATOR_TOKEN),
            ))
            .await
            .unwrap();
        c.quota
            .acquire(with_token(
                AcquireRequest {
                    sender: who.into(),
                    recipient: "r1".into(),
                    at: Some(ts(T0)),
                    ..Default::default()
                },
                Some(OPERATOR_TOKEN),
            ))
            .await
            .unwrap();
    }
    c
}

async fn auth_server(backend: Backend) -> TestServer {
    TestServer::start_with(backend, |s| {
        s.auth.sender_tokens = vec![SENDER_TOKEN.into()];
        s.auth.operator_tokens = vec![OPERATOR_TOKEN.into()];
    })
    .await
}

async fn every_rpc_answers_by_role(backend: Backend) {
    let server = auth_server(backend).await;
    let mut c = setup(&server).await;

    // Refusals first, each followed by a check that nothing changed.
    let before = c.snapshot().await;
    for rpc in ALL {
        for (who, token, code) in [
            ("no token", None, Code::Unauthenticated),
            ("a wrong token", Some(WRONG_TOKEN), Code::Unauthenticated),
            ("a sender token", Some(SENDER_TOKEN), Code::PermissionDenied),
        ] {
            if code == Code::PermissionDenied && !rpc.admin() {
                continue;
            }
            let got = c.call(rpc, token).await;
            assert_eq!(
                got.as_ref().map_err(|s| s.code()),
                Err(code),
                "{rpc:?} with {who}: {got:?}"
            );
            assert_eq!(
                c.snapshot().await,
                before,
                "{rpc:?} with {who} changed state"
            );
        }
    }

    // Then the calls each role may make.
    for rpc in ALL {
        if !rpc.admin() {
            let got = c.call(rpc, Some(SENDER_TOKEN)).await;
            assert!(got.is_ok(), "{rpc:?} with a sender token: {got:?}");
        }
        let got = c.call(rpc, Some(OPERATOR_TOKEN)).await;
        assert!(got.is_ok(), "{rpc:?} with an operator token: {got:?}");
    }
    assert_ne!(c.snapshot().await, before, "the allowed calls took effect");
}

#[tokio::test]
async fn every_rpc_answers_by_role_in_memory() {
    every_rpc_answers_by_role(Backend::Memory).await;
}

#[tokio::test]
async fn every_rpc_answers_by_role_on_redis() {
    every_rpc_answers_by_role(Backend::Redis).await;
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let server = auth_server(Backend::Memory).await;
    let channel = connect(&server.endpoint()).await;
    let mut health = HealthClient::new(channel.clone());
    let r = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(r.is_ok(), "health without a token: {r:?}");

    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let stream = reflection
        .server_reflection_info(tonic::codegen::tokio_stream::iter([req]))
        .await;
    assert!(stream.is_ok(), "reflection without a token: {stream:?}");
}

#[tokio::test]
async fn without_configured_tokens_no_token_is_needed() {
    let server = TestServer::start(Backend::Memory).await;
    let mut c = setup(&server).await;
    for rpc in ALL {
        let got = c.call(rpc, None).await;
        assert!(got.is_ok(), "{rpc:?} without auth configured: {got:?}");
    }
}

#[test]
fn settings_debug_output_never_shows_tokens() {
    let mut s = waquota::config::Settings::default();
    s.auth.sender_tokens = vec![SENDER_TOKEN.into()];
    s.auth.operator_tokens = vec![OPERATOR_TOKEN.into()];
    let shown = format!("{s:?}");
    assert!(!shown.contains(SENDER_TOKEN) && !shown.contains(OPERATOR_TOKEN));
}
