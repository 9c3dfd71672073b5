//! The webhook bridge against its real listener, on the memory ledger and a real Redis: Meta's
//! verification, signatures (missing, wrong, a rotated secret), and the effect of WhatsApp's
//! webhook bodies (tests/webhooks/, shifted to the present) on the ledger, read back through
//! AdminService. A POST is answered 200 once applied, a replay changes nothing, and a store
//! outage answers 503 and the retry is applied once (docs/contract.md, "The webhook bridge").

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::dsl::{policy, put_policy, sender};
use common::ops::{http_get, metric};
use common::{Backend, DAY, HOUR, TestServer, ms_of, ts};
use serde_json::Value;
use waquota::config::Settings;
use waquota::proto::{
    AcquireRequest, AcquireResponse, AssignWabaRequest, Category, Decision, InspectRequest,
    InspectResponse, Policy, SenderStatus, Target, Tier, WindowMode, target,
};

const SENDER: &str = "106540352242922";
const WABA: &str = "102290129340398";
const SECRETS: [&str; 2] = ["old-app-secret", "new-app-secret"];
/// The samples' latest time: every time in them is moved by (now - this).
const SAMPLES_AT: i64 = 1_767_262_800;

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// How far the samples' times are moved: to the present, taken once per test process, so a
/// test's expected times and the bodies it posts are shifted alike even when the clock's second
/// turns between them.
fn shift_s() -> i64 {
    static SHIFT: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SHIFT.get_or_init(|| now_s() - SAMPLES_AT)
}

/// A sample body, its times moved to the present (order kept), placeholders replaced.
fn sample(name: &str, reservations: &[(&str, &str)]) -> Vec<u8> {
    let path = format!("{}/tests/webhooks/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    shift(&mut v, shift_s());
    let mut text = serde_json::to_string(&v).unwrap();
    for (placeholder, r) in reservations {
        text = text.replace(&format!("\"{placeholder}\""), &format!("\"{r}\""));
        text = text.replace(&format!("wq={placeholder};"), &format!("wq={r};"));
    }
    text.into_bytes()
}

fn shift(v: &mut Value, by: i64) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let is_time = matches!(
                    k.as_str(),
                    "timestamp" | "time" | "expiration" | "expiration_timestamp"
                );
                match x {
                    Value::String(s) if is_time => {
                        if let Ok(n) = s.parse::<i64>() {
                            *s = (n + by).to_string();
                        }
                    }
                    Value::Number(n) if is_time => {
                        *x = Value::from(n.as_i64().unwrap() + by);
                    }
                    _ => shift(x, by),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| shift(x, by)),
        _ => {}
    }
}

/// A raw HTTP/1.1 request; the status code and body.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_owned())
}

fn post(addr: SocketAddr, body: &[u8], signature: Option<String>) -> (u16, String) {
    let mut req = format!(
        "POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(s) = signature {
        req.push_str(&format!("X-Hub-Signature-256: {s}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    http(addr, &bytes)
}

fn signed(addr: SocketAddr, body: &[u8]) -> (u16, String) {
    post(
        addr,
        body,
        Some(waquota::webhook::signature(body, SECRETS[1])),
    )
}

struct Bridge {
    srv: TestServer,
    hooks: SocketAddr,
    metrics: SocketAddr,
}

async fn start(backend: Backend) -> Bridge {
    start_with(backend, |_| {}).await
}

/// A server with the webhook listener (and `configure`'s changes to its settings).
async fn start_with(backend: Backend, configure: impl FnOnce(&mut Settings)) -> Bridge {
    let srv = TestServer::start_with(backend, |s| {
        s.webhook_listen = Some(common::ANY_PORT);
        s.webhook_verify_token = Some("verify-me".into());
        s.webhook_app_secrets = SECRETS.iter().map(|s| s.to_string()).collect();
        s.metrics_listen = Some(common::ANY_PORT);
        s.redis_timeout = Duration::from_millis(500);
        configure(s);
    })
    .await;
    let (hooks, metrics) = (srv.webhook.unwrap(), srv.metrics.unwrap());
    common::ops::http_get_ready(metrics, "/metrics");
    common::wait_until("the webhook listener", || TcpStream::connect(hooks).ok());
    Bridge {
        srv,
        hooks,
        metrics,
    }
}

impl Bridge {
    async fn inspect(&self, target: Option<Target>, recipient: &str) -> InspectResponse {
        self.srv
            .admin()
            .await
            .inspect(InspectRequest {
                target,
                recipient: recipient.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// An Acquire at `at_s` (unix seconds, trusted clock), as a worker made before sending.
    async fn acquire_at(
        &self,
        recipient: &str,
        category: Option<Category>,
        at_s: i64,
    ) -> AcquireResponse {
        self.srv
            .quota()
            .await
            .acquire(AcquireRequest {
                sender: SENDER.into(),
                recipient: recipient.into(),
                category: category.map(|c| c as i32).unwrap_or(0),
                at: Some(ts(at_s * 1000)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// An Acquire a minute ago.
    async fn acquire(&self, recipient: &str, category: Option<Category>) -> AcquireResponse {
        self.acquire_at(recipient, category, now_s() - 60).await
    }

    fn events(&self, kind: &str, outcome: &str) -> f64 {
        let text = http_get(self.metrics, "/metrics").1;
        metric(
            &text,
            &format!("waquota_webhook_events_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(-1.0)
    }
}

fn window_until(i: &InspectResponse) -> Option<i64> {
    i.service_window_until.as_ref().map(ms_of)
}

fn counted_until(i: &InspectResponse) -> Option<i64> {
    i.counted_until.as_ref().map(ms_of)
}

async fn verification_answers_the_challenge_only_for_the_token(backend: Backend) {
    let b = start(backend).await;
    let get = |q: &str| {
        http(
            b.hooks,
            format!("GET /webhooks/whatsapp?{q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    assert_eq!(
        get("hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=1158201444"),
        (200, "1158201444".into())
    );
    assert_eq!(
        get("hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1").0,
        403
    );
    assert_eq!(
        get("hub.mode=unsubscribe&hub.verify_token=verify-me&hub.challenge=1").0,
        403
    );
    assert_eq!(get("").0, 403);
}

async fn signatures_are_checked_and_a_refused_post_changes_nothing(backend: Backend) {
    let b = start(backend).await;
    let body = sample("inbound-text", &[]);
    assert_eq!(post(b.hooks, &body, None).0, 401, "unsigned");
    assert_eq!(
        post(
            b.hooks,
            &body,
            Some(waquota::webhook::signature(&body, "not-it"))
        )
        .0,
        401,
        "wrong secret"
    );
    assert_eq!(
        post(b.hooks, &body, Some("sha256=zz".into())).0,
        401,
        "not hex"
    );
    // The body was changed after signing.
    let mut tampered = body.clone();
    let sig = waquota::webhook::signature(&body, SECRETS[0]);
    tampered.push(b' ');
    assert_eq!(post(b.hooks, &tampered, Some(sig)).0, 401, "tampered");
    assert_eq!(
        window_until(&b.inspect(sender(SENDER), "4915112345678").await),
        None
    );
    let text = http_get(b.metrics, "/metrics").1;
    assert_eq!(
        metric(&text, "waquota_webhook_signature_failures_total"),
        Some(4.0)
    );
    // Either secret of a rotation is accepted.
    let old = post(
        b.hooks,
        &body,
        Some(waquota::webhook::signature(&body, SECRETS[0])),
    );
    assert_eq!(old, (200, "ok\n".into()));
    assert!(window_until(&b.inspect(sender(SENDER), "4915112345678").await).is_some());
    // `waquota webhook replay` signs a saved body the same way.
    let file = std::env::temp_dir().join(format!("waquota-replay-{}.json", std::process::id()));
    std::fs::write(&file, sample("inbound-referral-ctwa", &[])).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_waquota"))
        .args(["webhook", "replay"])
        .arg(&file)
        .args(["--secret", SECRETS[1], "--url"])
        .arg(format!("http://{}/webhooks/whatsapp", b.hooks))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 OK: ok\n");
    assert!(window_until(&b.inspect(sender(SENDER), "5511999990000").await).is_some());
    // Malformed JSON (signed) is 400; a body over the maximum 413.
    assert_eq!(signed(b.hooks, b"{not json").0, 400);
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(signed(b.hooks, &big).0, 413);
}

/// Every event the bridge counted, whatever its kind and outcome.
fn events_counted(b: &Bridge) -> f64 {
    let text = http_get(b.metrics, "/metrics").1;
    text.lines()
        .filter(|l| l.starts_with("waquota_webhook_events_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn every_sample_is_refused_unsigned_or_wrongly_signed_and_taken_with_either_secret(
    backend: Backend,
) {
    let b = start(backend).await;
    let dir = format!("{}/tests/webhooks", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".json").map(str::to_owned)
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 22, "{names:?}");
    for name in &names {
        let body = sample(name, &[]);
        assert_eq!(post(b.hooks, &body, None).0, 401, "{name} unsigned");
        let wrong = waquota::webhook::signature(&body, "not-the-app-secret");
        assert_eq!(post(b.hooks, &body, Some(wrong)).0, 401, "{name} wrong");
    }
    // Nothing refused was applied: no event counted, no window or slot anywhere.
    assert_eq!(events_counted(&b), 0.0);
    let i = b.inspect(sender(SENDER), "4915112345678").await;
    assert_eq!((i.used, window_until(&i)), (0, None));
    // Each sample is taken (200) signed with either secret of a rotation.
    for (n, name) in names.iter().enumerate() {
        let body = sample(name, &[]);
        let sig = waquota::webhook::signature(&body, SECRETS[n % 2]);
        assert_eq!(post(b.hooks, &body, Some(sig)).0, 200, "{name}");
    }
    assert!(events_counted(&b) >= names.len() as f64);
    assert!(window_until(&b.inspect(sender(SENDER), "4915112345678").await).is_some());
}

async fn inbound_messages_open_service_windows_at_their_time(backend: Backend) {
    let b = start(backend).await;
    let body = sample("inbound-text", &[]);
    let sent_at = (1_767_261_600 + shift_s()) * 1000;
    assert_eq!(signed(b.hooks, &body).0, 200);
    let i = b.inspect(sender(SENDER), "4915112345678").await;
    assert_eq!(
        window_until(&i),
        Some(sent_at + DAY),
        "24 h from the message"
    );
    // A click-to-WhatsApp ad referral: a free entry point, 72 h.
    assert_eq!(
        signed(b.hooks, &sample("inbound-referral-ctwa", &[])).0,
        200
    );
    let at = (1_767_261_660 + shift_s()) * 1000;
    let i = b.inspect(sender(SENDER), "5511999990000").await;
    assert_eq!(window_until(&i), Some(at + 72 * HOUR));
    // A user known only by a business-scoped id, and a batch of several users.
    assert_eq!(
        signed(b.hooks, &sample("inbound-username-bsuid", &[])).0,
        200
    );
    assert_eq!(signed(b.hooks, &sample("inbound-batch-mixed", &[])).0, 200);
    // A replay changes nothing and is counted as a duplicate.
    assert_eq!(b.events("inbound", "duplicate"), 0.0);
    assert_eq!(signed(b.hooks, &body).0, 200);
    assert_eq!(b.events("inbound", "duplicate"), 1.0);
}

async fn the_worker_path_delivered_moves_the_slot_and_failures_free_or_hold(backend: Backend) {
    let b = start(backend).await;
    // delivered: the slot's clock moves to delivery + 24 h (the send went out a minute before).
    let delivered = (1_767_261_803 + shift_s()) * 1000;
    let a = b
        .acquire_at("4915112345678", None, delivered / 1000 - 60)
        .await;
    assert_eq!(a.decision(), Decision::AllowedNew);
    let opened_until = ms_of(a.expires_at.as_ref().unwrap());
    // A second user's send of that minute, for the end of the test.
    let other = b
        .acquire_at("4915100000003", None, delivered / 1000 - 59)
        .await;
    assert_eq!(other.decision(), Decision::AllowedNew, "{other:?}");
    let body = sample("status-delivered", &[("RESERVATION", &a.reservation)]);
    assert_eq!(signed(b.hooks, &body).0, 200);
    let i = b.inspect(sender(SENDER), "4915112345678").await;
    assert_eq!(counted_until(&i), Some(delivered + DAY));
    assert!(delivered + DAY > opened_until, "the clock moved");
    // read after delivered changes nothing more.
    let read = sample("status-read", &[("RESERVATION", &a.reservation)]);
    assert_eq!(signed(b.hooks, &read).0, 200);
    let i = b.inspect(sender(SENDER), "4915112345678").await;
    assert_eq!(counted_until(&i), Some(delivered + DAY));

    // failed 131026: the slot is freed.
    let a = b.acquire("4915100000001", None).await;
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 3);
    let body = sample("status-failed-131026", &[("RESERVATION", &a.reservation)]);
    assert_eq!(signed(b.hooks, &body).0, 200);
    assert_eq!(
        counted_until(&b.inspect(sender(SENDER), "4915100000001").await),
        None
    );
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 2);

    // failed 131049: marketing to that user is held for 24 h.
    let a = b.acquire("4915100000002", Some(Category::Marketing)).await;
    let body = sample("status-failed-131049", &[("RESERVATION", &a.reservation)]);
    assert_eq!(signed(b.hooks, &body).0, 200);
    let again = b.acquire("4915100000002", Some(Category::Marketing)).await;
    assert_eq!(again.decision(), Decision::DeniedMarketingCap, "{again:?}");

    // For another user: sent changes nothing; the reservation as the wq= item of a list in
    // biz_opaque_callback_data confirms as the bare one does.
    let for_user = |name: &str, r: &str| {
        String::from_utf8(sample(name, &[("RESERVATION", r)]))
            .unwrap()
            .replace("4915112345678", "4915100000003")
            // Other messages than the first user's (statuses are remembered by message id).
            .replace("\"wamid.", "\"wamid.other.")
    };
    let a = other;
    let opened_until = ms_of(a.expires_at.as_ref().unwrap());
    let sent = for_user("status-sent", &a.reservation);
    assert_eq!(signed(b.hooks, sent.as_bytes()).0, 200);
    let i = b.inspect(sender(SENDER), "4915100000003").await;
    assert_eq!(counted_until(&i), Some(opened_until), "sent moves nothing");
    let listed = for_user("status-delivered-opaque-list", &a.reservation);
    assert!(listed.contains(&format!("job=42;wq={};campaign", a.reservation)));
    assert_eq!(signed(b.hooks, listed.as_bytes()).0, 200);
    let i = b.inspect(sender(SENDER), "4915100000003").await;
    assert_eq!(counted_until(&i), Some(delivered + DAY));
    // A status naming no reservation the ledger knows changes nothing and is counted.
    let unusable = b.events("status_delivered", "unusable");
    let unknown = String::from_utf8(sample("status-delivered-opaque-list", &[]))
        .unwrap()
        .replace("\"wamid.", "\"wamid.unknown.");
    assert_eq!(
        signed(b.hooks, unknown.as_bytes()).0,
        200,
        "an unknown reservation is counted, not retried"
    );
    assert_eq!(b.events("status_delivered", "unusable"), unusable + 1.0);
}

async fn a_batch_of_mixed_statuses_is_applied_in_one_post_and_replaying_it_changes_nothing(
    backend: Backend,
) {
    let b = start(backend).await;
    let at = (1_767_262_000 + shift_s()) - 60;
    let mut rs = Vec::new();
    for r in [
        "4915100000010",
        "4915100000011",
        "4915100000012",
        "4915100000013",
    ] {
        rs.push(b.acquire_at(r, None, at).await.reservation);
    }
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 4);
    let body = sample(
        "status-batch-mixed",
        &[
            ("RESERVATION_A", &rs[0]),
            ("RESERVATION_B", &rs[1]),
            ("RESERVATION_C", &rs[2]),
            ("RESERVATION_D", &rs[3]),
        ],
    );
    assert_eq!(signed(b.hooks, &body).0, 200);
    let shift = shift_s();
    // delivered and read (without a delivered before it) both confirm at their time.
    let i = b.inspect(sender(SENDER), "4915100000010").await;
    assert_eq!(
        counted_until(&i),
        Some((1_767_262_000 + shift) * 1000 + DAY)
    );
    let i = b.inspect(sender(SENDER), "4915100000011").await;
    assert_eq!(
        counted_until(&i),
        Some((1_767_262_001 + shift) * 1000 + DAY)
    );
    // failed 131026 freed its slot; sent changed nothing.
    assert_eq!(
        counted_until(&b.inspect(sender(SENDER), "4915100000012").await),
        None
    );
    let i = b.inspect(sender(SENDER), "4915100000013").await;
    assert_eq!(counted_until(&i), Some(at * 1000 + DAY));
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 3);
    // The same POST again (WhatsApp's retry): every event is a duplicate, nothing moves.
    assert_eq!(signed(b.hooks, &body).0, 200);
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 3);
    assert_eq!(b.events("status_delivered", "duplicate"), 1.0);
    assert_eq!(b.events("status_read", "duplicate"), 1.0);
    assert_eq!(b.events("status_failed", "duplicate"), 1.0);
}

/// A sample body without `biz_opaque_callback_data`: a worker that did not pass the reservation.
fn without_reservation(name: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&sample(name, &[])).unwrap();
    for e in v["entry"].as_array_mut().unwrap() {
        for c in e["changes"].as_array_mut().unwrap() {
            for st in c["value"]["statuses"].as_array_mut().into_iter().flatten() {
                st.as_object_mut()
                    .unwrap()
                    .remove("biz_opaque_callback_data");
            }
        }
    }
    serde_json::to_vec(&v).unwrap()
}

async fn a_status_without_a_reservation_acts_on_an_untouched_slot_of_that_sender(backend: Backend) {
    let b = start(backend).await;
    let delivered = (1_767_261_803 + shift_s()) * 1000;
    b.acquire_at("4915112345678", None, delivered / 1000 - 60)
        .await;
    assert_eq!(
        signed(b.hooks, &without_reservation("status-delivered")).0,
        200
    );
    let i = b.inspect(sender(SENDER), "4915112345678").await;
    assert_eq!(counted_until(&i), Some(delivered + DAY), "confirmed");
    // That slot is now touched (delivered): a failure without a reservation leaves it.
    let failed = without_reservation("status-failed-131026")
        .into_iter()
        .collect::<Vec<u8>>();
    let failed = String::from_utf8(failed)
        .unwrap()
        .replace("4915100000001", "4915112345678")
        .replace("\"id\":\"wamid.", "\"id\":\"wamid.other-");
    assert_eq!(signed(b.hooks, failed.as_bytes()).0, 200);
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 1);
    // An untouched slot is freed by a failure without a reservation.
    b.acquire("4915100000001", None).await;
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 2);
    assert_eq!(
        signed(b.hooks, &without_reservation("status-failed-131026")).0,
        200
    );
    assert_eq!(b.inspect(sender(SENDER), "").await.used, 1);
}

async fn tier_status_and_restrictions_reach_the_right_sender_and_portfolio(backend: Backend) {
    let b = start(backend).await;
    let mut admin = b.srv.admin().await;
    at_tier_1k(&b, SENDER).await;
    // The display number and the WABA's senders are learned from a messages webhook.
    assert_eq!(signed(b.hooks, &sample("inbound-text", &[])).0, 200);
    assert_eq!(
        signed(b.hooks, &sample("quality-legacy-flagged", &[])).0,
        200
    );
    let p = policy_of(&b, sender(SENDER)).await;
    assert_eq!(p.tier(), Tier::Tier10k);
    assert_eq!(p.status(), SenderStatus::Flagged);
    assert_eq!(signed(b.hooks, &sample("account-restriction", &[])).0, 200);
    let p = policy_of(&b, sender(SENDER)).await;
    assert_eq!(p.status(), SenderStatus::Restricted);
    // Until the restriction's expiration; a new user is refused for it, to retry then.
    let expiration = (1_767_866_400 + shift_s()) * 1000;
    assert_eq!(p.status_until.as_ref().map(ms_of), Some(expiration));
    let r = b.acquire_at("4915199999999", None, now_s()).await;
    assert_eq!(r.decision(), Decision::DeniedSenderBlocked, "{r:?}");
    let retry = common::dsl::retry_after(&r);
    assert!(
        (expiration - now_s() * 1000 - retry).abs() <= 1_000,
        "{retry}"
    );
    assert_eq!(signed(b.hooks, &sample("account-reconnected", &[])).0, 200);
    assert_eq!(
        policy_of(&b, sender(SENDER)).await.status(),
        SenderStatus::Connected
    );
    // The WABA's portfolio gets business_capability_update's tier.
    admin
        .assign_waba(AssignWabaRequest {
            waba: WABA.into(),
            portfolio: "p1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        signed(b.hooks, &sample("capability-portfolio-tier-string", &[])).0,
        200
    );
    let portfolio = Some(Target {
        target: Some(target::Target::Portfolio("p1".into())),
    });
    assert_eq!(
        b.inspect(portfolio, "").await.policy.unwrap().tier(),
        Tier::Tier10k
    );
    // Unknown kinds are ignored with 200.
    assert_eq!(
        signed(b.hooks, &sample("unrelated-template-status", &[])).0,
        200
    );
}

/// Stores a tier-1K conversation-mode policy for sender `s`.
async fn at_tier_1k(b: &Bridge, s: &str) {
    let mut admin = b.srv.admin().await;
    put_policy(
        &mut admin,
        sender(s),
        policy(Tier::Tier1k, 0, WindowMode::Conversation),
    )
    .await;
}

/// A sender's own stored policy, or a portfolio's.
async fn policy_of(b: &Bridge, target: Option<Target>) -> Policy {
    let i = b.inspect(target, "").await;
    i.sender_policy.or(i.policy).unwrap()
}

async fn tier_of(b: &Bridge, target: Option<Target>) -> Tier {
    policy_of(b, target).await.tier()
}

fn portfolio(id: &str) -> Option<Target> {
    Some(Target {
        target: Some(target::Target::Portfolio(id.into())),
    })
}

async fn every_quality_capability_and_account_sample_sets_what_it_says(backend: Backend) {
    let b = start(backend).await;
    let mut admin = b.srv.admin().await;
    at_tier_1k(&b, SENDER).await;
    // A quality event names only the display number: one no messages webhook taught finds no
    // sender and changes nothing.
    let unknown = String::from_utf8(sample("quality-legacy-upgrade", &[]))
        .unwrap()
        .replace("15550783881", "15550000000");
    assert_eq!(signed(b.hooks, unknown.as_bytes()).0, 200);
    assert_eq!(b.events("quality", "unusable"), 1.0);
    assert_eq!(tier_of(&b, sender(SENDER)).await, Tier::Tier1k);
    assert_eq!(signed(b.hooks, &sample("inbound-text", &[])).0, 200);
    // UPGRADE, DOWNGRADE and THROUGHPUT_UPGRADE: the tier is current_limit.
    assert_eq!(
        signed(b.hooks, &sample("quality-legacy-upgrade", &[])).0,
        200
    );
    assert_eq!(tier_of(&b, sender(SENDER)).await, Tier::Tier10k);
    assert_eq!(
        signed(b.hooks, &sample("quality-legacy-downgrade", &[])).0,
        200
    );
    assert_eq!(tier_of(&b, sender(SENDER)).await, Tier::Tier1k);
    // A WABA with no portfolio: business_capability_update sets each of its senders' tiers;
    // the legacy integer 2000 is TIER_2K, -1 and TIER_UNLIMITED are unlimited.
    assert_eq!(
        signed(b.hooks, &sample("capability-legacy-integer", &[])).0,
        200
    );
    assert_eq!(tier_of(&b, sender(SENDER)).await, Tier::Tier2k);
    assert_eq!(signed(b.hooks, &sample("capability-unlimited", &[])).0, 200);
    assert_eq!(tier_of(&b, sender(SENDER)).await, Tier::Unlimited);
    // With the sender in a portfolio, THROUGHPUT_UPGRADE's max_daily_conversations_per_business
    // reaches the portfolio too.
    put_policy(
        &mut admin,
        sender(SENDER),
        policy(Tier::Tier100k, 0, WindowMode::Conversation),
    )
    .await;
    put_policy(
        &mut admin,
        portfolio("p1"),
        policy(Tier::Tier10k, 0, WindowMode::Rolling),
    )
    .await;
    common::dsl::assign(&mut admin, SENDER, "p1").await;
    assert_eq!(
        signed(b.hooks, &sample("quality-current-throughput-upgrade", &[])).0,
        200
    );
    assert_eq!(tier_of(&b, sender(SENDER)).await, Tier::Unlimited);
    assert_eq!(tier_of(&b, portfolio("p1")).await, Tier::Unlimited);
    // DISABLED_UPDATE bans every sender of the WABA: a new user is refused.
    assert_eq!(signed(b.hooks, &sample("account-disabled", &[])).0, 200);
    assert_eq!(
        policy_of(&b, sender(SENDER)).await.status(),
        SenderStatus::Banned
    );
    let r = b.acquire_at("4915199999999", None, now_s()).await;
    assert_eq!(r.decision(), Decision::DeniedSenderBlocked, "{r:?}");
    assert_eq!(b.events("account", "applied"), 1.0);
}

async fn a_configured_display_number_wins_over_the_learned_one(backend: Backend) {
    const CONFIGURED: &str = "209876543210987";
    let b = start_with(backend, |s| {
        s.webhook_displays
            .insert("15550783881".into(), CONFIGURED.into());
    })
    .await;
    for s in [SENDER, CONFIGURED] {
        at_tier_1k(&b, s).await;
    }
    // The messages webhook says display 15550783881 is SENDER; the configuration says it is
    // CONFIGURED, and the configuration wins.
    assert_eq!(signed(b.hooks, &sample("inbound-text", &[])).0, 200);
    assert_eq!(
        signed(b.hooks, &sample("quality-legacy-upgrade", &[])).0,
        200
    );
    assert_eq!(tier_of(&b, sender(CONFIGURED)).await, Tier::Tier10k);
    assert_eq!(tier_of(&b, sender(SENDER)).await, Tier::Tier1k);
}

async fn a_store_outage_answers_503_and_the_retry_is_applied_once(mut b: Bridge) {
    let body = sample("inbound-text", &[]);
    let redis = b.srv.redis().unwrap();
    redis.kill();
    assert_eq!(signed(b.hooks, &body).0, 503);
    redis.restart();
    // WhatsApp's retries, until the store answers again (a hang guard counted in attempts).
    let retried = (0..common::MAX_ATTEMPTS)
        .map(|_| signed(b.hooks, &body).0)
        .inspect(|code| {
            if *code != 200 {
                std::thread::sleep(common::RETRY_PAUSE);
            }
        })
        .find(|code| *code != 503);
    assert_eq!(retried, Some(200));
    assert_eq!(b.events("inbound", "applied"), 1.0);
    assert_eq!(signed(b.hooks, &body).0, 200);
    assert_eq!(b.events("inbound", "duplicate"), 1.0);
}

/// The business's own handler: answers `status` to every request and hands each request's
/// signature header and body to the test.
fn handler(status: u16) -> (SocketAddr, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then as many body bytes as Content-Length says.
            let (head, body) = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    let mut body = buf[i + 4..].to_vec();
                    while body.len() < len {
                        let n = s.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                    break (head, body);
                }
            };
            let signature = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("x-hub-signature-256:")
                        .then(|| l.split_once(':').unwrap().1.trim().to_owned())
                })
                .unwrap_or_default();
            let _ = tx.send((signature, body));
            let _ = s.write_all(
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_post_is_relayed_as_sent_and_a_failed_relay_is_retried() {
    let (ok, seen) = handler(200);
    let b = start_with(Backend::Memory, |s| {
        s.webhook_forward = Some(format!("http://{ok}/hook"))
    })
    .await;
    let body = sample("inbound-text", &[]);
    assert_eq!(signed(b.hooks, &body).0, 200);
    let (signature, relayed) = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(relayed, body, "the original body");
    assert_eq!(signature, waquota::webhook::signature(&body, SECRETS[1]));
    // A refused POST is not relayed.
    assert_eq!(post(b.hooks, &body, None).0, 401);
    assert!(seen.recv_timeout(Duration::from_millis(200)).is_err());

    let (failing, _seen) = handler(500);
    let b = start_with(Backend::Memory, |s| {
        s.webhook_forward = Some(format!("http://{failing}/hook"))
    })
    .await;
    assert_eq!(signed(b.hooks, &body).0, 503, "WhatsApp retries");
    let text = http_get(b.metrics, "/metrics").1;
    assert_eq!(
        metric(&text, "waquota_webhook_relay_failures_total"),
        Some(1.0)
    );
    // The events were applied all the same; the retry applies nothing twice.
    assert!(window_until(&b.inspect(sender(SENDER), "4915112345678").await).is_some());
    assert_eq!(signed(b.hooks, &body).0, 503);
    assert_eq!(b.events("inbound", "duplicate"), 1.0);
}

macro_rules! on_memory_and_redis {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(Backend::Memory).await; })*
        }
        mod redis {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(Backend::Redis).await; })*
        }
    };
}

on_memory_and_redis!(
    verification_answers_the_challenge_only_for_the_token,
    signatures_are_checked_and_a_refused_post_changes_nothing,
    every_sample_is_refused_unsigned_or_wrongly_signed_and_taken_with_either_secret,
    inbound_messages_open_service_windows_at_their_time,
    the_worker_path_delivered_moves_the_slot_and_failures_free_or_hold,
    a_batch_of_mixed_statuses_is_applied_in_one_post_and_replaying_it_changes_nothing,
    a_status_without_a_reservation_acts_on_an_untouched_slot_of_that_sender,
    tier_status_and_restrictions_reach_the_right_sender_and_portfolio,
    every_quality_capability_and_account_sample_sets_what_it_says,
    a_configured_display_number_wins_over_the_learned_one,
);

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage() {
    let b = start(Backend::Redis).await;
    a_store_outage_answers_503_and_the_retry_is_applied_once(b).await;
}
