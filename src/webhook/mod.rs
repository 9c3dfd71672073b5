//! The webhook bridge: WhatsApp's Cloud API webhooks applied to the ledger, so it stays true
//! with no worker code (docs/contract.md, "The webhook bridge").
//!
//! `GET /webhooks/whatsapp` answers Meta's verification; `POST` carries signed batches of
//! events. A POST is answered 200 only once every event in it was applied (or was already
//! applied: each is remembered for 7 days); on a store error the answer is 503, so WhatsApp
//! retries, and the retry applies only what was missing. Why apply-then-remember rather than the
//! reverse: every effect is idempotent at the event's own time (a service window from that time,
//! a slot confirmed to that delivery, a release that finds nothing the second time, a policy
//! set to the same values), so an event applied but not yet remembered is harmless to repeat,
//! while one remembered but not applied would be lost.

pub mod events;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::ledger::{Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::model::{
    Millis, PortfolioId, Quality, RecipientId, ReservationSigner, SenderId, SenderStatus, Target,
    Tier,
};
use events::{AccountChange, Delivery, Event, Restriction};

pub const PATH: &str = "/webhooks/whatsapp";
/// Events are remembered this long after their own time: WhatsApp retries for days.
pub const REMEMBER_MS: Millis = 7 * 24 * 3_600_000;

/// What the listener needs from the settings.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    pub verify_token: Option<String>,
    pub app_secrets: Vec<String>,
    pub max_body_bytes: usize,
    /// WABA id -> portfolio, from the configuration (wins over AssignWaba).
    pub wabas: std::collections::BTreeMap<String, String>,
    /// display number -> sender, configured (wins over the learned ones)
    pub displays: std::collections::BTreeMap<String, String>,
    pub forward: Option<String>,
}

pub struct Bridge<L> {
    ledger: Arc<L>,
    settings: BridgeSettings,
    metrics: Arc<Metrics>,
    signer: tokio::sync::OnceCell<ReservationSigner>,
}

/// Why an event was not applied; the POST still answers 200 (nothing to retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Ignored,
    /// Names a sender, user or reservation the ledger cannot use, or one it does not know.
    Unusable,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::Unusable => "unusable",
        }
    }
}

/// One identity kind the bridge learns (docs/contract.md, "The webhook bridge").
pub mod identity {
    /// display number -> the sender (phone_number_id) it belongs to
    pub const DISPLAY: &str = "display";
    /// WABA id -> the senders seen under it
    pub const WABA_SENDERS: &str = "waba";
    /// WABA id -> its portfolio (AssignWaba)
    pub const WABA_PORTFOLIO: &str = "wabaportfolio";
}

/// 64 bits of SHA-256 of an event's identity: what is remembered of it.
fn event_key(parts: &[&str]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(b"\n");
    }
    let d = ctx.finish();
    u64::from_be_bytes(d.as_ref()[..8].try_into().unwrap_or_default())
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under one of `secrets`,
/// compared in constant time (ring's verify).
pub fn signed(body: &[u8], header: Option<&str>, secrets: &[String]) -> bool {
    let Some(hex) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Some(tag) = unhex(hex) else {
        return false;
    };
    secrets.iter().any(|s| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.as_bytes());
        ring::hmac::verify(&key, body, &tag).is_ok()
    })
}

/// The `X-Hub-Signature-256` value WhatsApp sends for `body` under `secret`.
pub fn signature(body: &[u8], secret: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        crate::model::hex(ring::hmac::sign(&key, body).as_ref())
    )
}

/// Whether two secrets are equal, in time that does not depend on where they differ: their
/// SHA-256 digests are compared byte for byte, all of them.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (
        ring::digest::digest(&ring::digest::SHA256, a),
        ring::digest::digest(&ring::digest::SHA256, b),
    );
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl<L: Ledger> Bridge<L> {
    pub fn new(ledger: Arc<L>, settings: BridgeSettings, metrics: Arc<Metrics>) -> Self {
        Bridge {
            ledger,
            settings,
            metrics,
            signer: tokio::sync::OnceCell::new(),
        }
    }

    async fn signer(&self) -> Result<&ReservationSigner, LedgerError> {
        self.signer
            .get_or_try_init(|| async {
                Ok(ReservationSigner::new(
                    &self.ledger.reservation_secret().await?,
                ))
            })
            .await
    }

    /// Answers one HTTP request to the listener.
    pub async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != PATH {
            return text(
                StatusCode::NOT_FOUND,
                "webhooks are at /webhooks/whatsapp\n",
            );
        }
        match *req.method() {
            Method::GET => self.verify(req.uri().query().unwrap_or("")),
            Method::POST => self.post(req).await,
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n"),
        }
    }

    /// Meta's subscription check: the challenge back when the token matches.
    fn verify(&self, query: &str) -> Response<Full<Bytes>> {
        let mut mode = None;
        let mut token = None;
        let mut challenge = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "hub.mode" => mode = Some(v.into_owned()),
                "hub.verify_token" => token = Some(v.into_owned()),
                "hub.challenge" => challenge = Some(v.into_owned()),
                _ => {}
            }
        }
        let expected = self.settings.verify_token.as_deref();
        let token_ok = match (expected, token.as_deref()) {
            (Some(e), Some(t)) => same(e.as_bytes(), t.as_bytes()),
            _ => false,
        };
        match (mode.as_deref(), token_ok, challenge) {
            (Some("subscribe"), true, Some(c)) => text(StatusCode::OK, &c),
            _ => text(StatusCode::FORBIDDEN, "verification refused\n"),
        }
    }

    async fn post(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let signature = req
            .headers()
            .get("x-hub-signature-256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match Limited::new(req.into_body(), self.settings.max_body_bytes)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n");
            }
            Err(_) => return text(StatusCode::BAD_REQUEST, "body could not be read\n"),
        };
        if !signed(&body, signature.as_deref(), &self.settings.app_secrets) {
            self.metrics.webhook_signature_failure();
            tracing::warn!("webhook refused: X-Hub-Signature-256 missing or wrong");
            return text(StatusCode::UNAUTHORIZED, "signature missing or wrong\n");
        }
        let start = Instant::now();
        let events = match events::parse(&body, crate::model::clock(None)) {
            Ok(e) => e,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        };
        for event in &events {
            match self.apply(event).await {
                Ok(outcome) => self.metrics.webhook_event(event.kind(), outcome.name()),
                Err(e) => {
                    self.metrics.webhook_event(event.kind(), "store_error");
                    tracing::warn!(kind = event.kind(), error = %e, "webhook not applied: answering 503 so WhatsApp retries");
                    return text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n");
                }
            }
        }
        self.metrics.webhook_apply_latency(start.elapsed());
        if let Some(url) = &self.settings.forward
            && let Err(e) = forward(url, &body, signature.as_deref()).await
        {
            self.metrics.webhook_relay_failure();
            tracing::warn!(error = %e, "webhook relay failed: answering 503 so WhatsApp retries");
            return text(StatusCode::SERVICE_UNAVAILABLE, "relay failed\n");
        }
        text(StatusCode::OK, "ok\n")
    }

    /// Applies one event once. A store error is returned (the POST answers 503); anything the
    /// ledger refuses as input is counted as unusable and skipped.
    pub async fn apply(&self, event: &Event) -> Result<Outcome, LedgerError> {
        let Some((key, at)) = self.identity_of(event) else {
            return Ok(Outcome::Ignored);
        };
        if self.ledger.events_seen(&[(key, at)]).await?[0] {
            return Ok(Outcome::Duplicate);
        }
        let outcome = match self.effect(event).await {
            Err(e @ (LedgerError::Invalid(_) | LedgerError::FailedPrecondition(_))) => {
                tracing::info!(kind = event.kind(), error = %e, "webhook event not usable");
                Outcome::Unusable
            }
            r => r?,
        };
        self.ledger.remember_events(&[(key, at)]).await?;
        Ok(outcome)
    }

    /// What an event is remembered by, and its time: inbound messages by message id, statuses
    /// by (message id, status; delivered and read as one), account events by their content.
    fn identity_of(&self, event: &Event) -> Option<(u64, Millis)> {
        match event {
            Event::Inbound { message_id, at, .. } => Some((event_key(&["in", message_id]), *at)),
            Event::Status {
                message_id,
                status,
                at,
                ..
            } => {
                let s = match status {
                    // The first of delivered and read confirms; the other changes nothing.
                    Delivery::Delivered | Delivery::Read => "delivered",
                    Delivery::Failed => "failed",
                    Delivery::Sent | Delivery::Other => return None,
                };
                Some((event_key(&["st", message_id, s]), *at))
            }
            Event::Quality {
                display,
                event: e,
                current_limit,
                at,
                ..
            } => Some((
                event_key(&[
                    "q",
                    display,
                    e,
                    current_limit.map_or("", Tier::name),
                    &at.to_string(),
                ]),
                *at,
            )),
            Event::Capability {
                waba,
                business_limit,
                phone_limit,
                at,
            } => Some((
                event_key(&[
                    "c",
                    waba,
                    business_limit.map_or("", Tier::name),
                    phone_limit.map_or("", Tier::name),
                    &at.to_string(),
                ]),
                *at,
            )),
            Event::Account { waba, change, at } => Some((
                event_key(&["a", waba, &format!("{change:?}"), &at.to_string()]),
                *at,
            )),
            Event::Ignored { .. } => None,
        }
    }

    async fn effect(&self, event: &Event) -> Result<Outcome, LedgerError> {
        match event {
            Event::Inbound {
                waba,
                sender,
                display,
                user,
                at,
                referral,
                ..
            } => {
                let sender = SenderId::parse("metadata.phone_number_id", sender)?;
                let user = RecipientId::parse("user", user)?;
                self.learn(waba, &sender, display.as_deref()).await?;
                self.ledger
                    .record_inbound(sender, user, *referral, Some(*at))
                    .await?;
                Ok(Outcome::Applied)
            }
            Event::Status {
                waba,
                sender,
                display,
                user,
                status,
                at,
                reservation,
                error_code,
                ..
            } => {
                let sender = SenderId::parse("metadata.phone_number_id", sender)?;
                let user = RecipientId::parse("user", user)?;
                self.learn(waba, &sender, display.as_deref()).await?;
                let resv = match reservation {
                    Some(token) => Some(self.signer().await?.verify(
                        "biz_opaque_callback_data",
                        token,
                        &sender,
                        &user,
                    )?),
                    // Without a reservation, the user's slot at this sender counts only while it
                    // is untouched since it was opened, and opened by this sender (as Release).
                    None if *status != Delivery::Sent && *status != Delivery::Other => {
                        self.ledger
                            .slot_reservation(sender.clone(), user.clone(), None)
                            .await?
                    }
                    None => None,
                };
                match status {
                    Delivery::Delivered | Delivery::Read => {
                        let Some(r) = resv else {
                            return Ok(Outcome::Unusable);
                        };
                        let moved = self.ledger.confirm(sender, user, r, *at, None).await?;
                        Ok(if moved.is_some() {
                            Outcome::Applied
                        } else {
                            Outcome::Unusable
                        })
                    }
                    Delivery::Failed => {
                        let code = error_code.unwrap_or(0);
                        self.ledger
                            .report_failure(sender, user, resv, code, None)
                            .await?;
                        Ok(Outcome::Applied)
                    }
                    Delivery::Sent | Delivery::Other => Ok(Outcome::Ignored),
                }
            }
            Event::Quality {
                waba: _,
                display,
                event: e,
                current_limit,
                business_limit,
                at,
            } => {
                let Some(sender) = self.sender_by_display(display).await? else {
                    return Ok(Outcome::Unusable);
                };
                let target = Target::Sender(sender.clone());
                let seen = self.ledger.inspect(target.clone(), None, None).await?;
                let mut p = seen.sender_policy.unwrap_or(seen.policy);
                match e.as_str() {
                    "FLAGGED" => {
                        p.status = SenderStatus::Flagged;
                        p.status_until = None;
                        p.quality = Some(Quality::Red);
                    }
                    "UNFLAGGED" => {
                        p.status = SenderStatus::Connected;
                        p.status_until = None;
                    }
                    _ => {}
                }
                if let Some(t) = current_limit {
                    p.tier = *t;
                }
                self.ledger.put_policy(target, p, Some(*at)).await?;
                if let (Some(t), Some(portfolio)) = (business_limit, seen.portfolio) {
                    self.set_portfolio_tier(portfolio, *t, *at).await?;
                }
                Ok(Outcome::Applied)
            }
            Event::Capability {
                waba,
                business_limit,
                phone_limit,
                at,
            } => {
                let Some(tier) = business_limit.or(*phone_limit) else {
                    return Ok(Outcome::Ignored);
                };
                match self.portfolio_of_waba(waba).await? {
                    Some(p) => self.set_portfolio_tier(p, tier, *at).await?,
                    None => {
                        for sender in self.senders_of_waba(waba).await? {
                            let target = Target::Sender(sender);
                            let seen = self.ledger.inspect(target.clone(), None, None).await?;
                            let mut p = seen.sender_policy.unwrap_or(seen.policy);
                            p.tier = tier;
                            self.ledger.put_policy(target, p, Some(*at)).await?;
                        }
                    }
                }
                Ok(Outcome::Applied)
            }
            Event::Account { waba, change, at } => {
                // The strongest restriction wins (no messages at all over no new ones), until
                // its expiration.
                let until = |kind: Restriction| rs_until(change, kind);
                let (status, status_until) = match change {
                    AccountChange::Restricted(rs) => {
                        if rs.iter().any(|(r, _)| *r == Restriction::CustomerInitiated) {
                            (SenderStatus::Paused, until(Restriction::CustomerInitiated))
                        } else if rs.iter().any(|(r, _)| *r == Restriction::BusinessInitiated) {
                            (
                                SenderStatus::Restricted,
                                until(Restriction::BusinessInitiated),
                            )
                        } else {
                            return Ok(Outcome::Ignored);
                        }
                    }
                    AccountChange::Disabled => (SenderStatus::Banned, None),
                    AccountChange::Reconnected => (SenderStatus::Connected, None),
                    AccountChange::Other(_) => return Ok(Outcome::Ignored),
                };
                let senders = self.senders_of_waba(waba).await?;
                if senders.is_empty() {
                    return Ok(Outcome::Unusable);
                }
                for sender in senders {
                    let target = Target::Sender(sender);
                    let seen = self.ledger.inspect(target.clone(), None, None).await?;
                    let mut p = seen.sender_policy.unwrap_or(seen.policy);
                    p.status = status;
                    p.status_until = status_until;
                    self.ledger.put_policy(target, p, Some(*at)).await?;
                }
                Ok(Outcome::Applied)
            }
            Event::Ignored { .. } => Ok(Outcome::Ignored),
        }
    }

    async fn set_portfolio_tier(
        &self,
        portfolio: PortfolioId,
        tier: Tier,
        at: Millis,
    ) -> Result<(), LedgerError> {
        let target = Target::Portfolio(portfolio);
        let mut p = self
            .ledger
            .inspect(target.clone(), None, None)
            .await?
            .policy;
        p.tier = tier;
        self.ledger.put_policy(target, p, Some(at)).await?;
        Ok(())
    }

    /// Remembers the sender's display number and WABA (docs/contract.md, "The webhook bridge").
    async fn learn(
        &self,
        waba: &str,
        sender: &SenderId,
        display: Option<&str>,
    ) -> Result<(), LedgerError> {
        if let Some(d) = display {
            self.ledger
                .put_identity(identity::DISPLAY, d, sender.as_str(), false)
                .await?;
        }
        if !waba.is_empty() {
            self.ledger
                .put_identity(identity::WABA_SENDERS, waba, sender.as_str(), true)
                .await?;
        }
        Ok(())
    }

    async fn sender_by_display(&self, display: &str) -> Result<Option<SenderId>, LedgerError> {
        if let Some(s) = self.settings.displays.get(display) {
            return Ok(SenderId::parse("sender", s).ok());
        }
        let found = self.ledger.identities(identity::DISPLAY, display).await?;
        Ok(found
            .first()
            .and_then(|s| SenderId::parse("sender", s).ok()))
    }

    async fn senders_of_waba(&self, waba: &str) -> Result<Vec<SenderId>, LedgerError> {
        let found = self.ledger.identities(identity::WABA_SENDERS, waba).await?;
        Ok(found
            .iter()
            .filter_map(|s| SenderId::parse("sender", s).ok())
            .collect())
    }

    async fn portfolio_of_waba(&self, waba: &str) -> Result<Option<PortfolioId>, LedgerError> {
        if let Some(p) = self.settings.wabas.get(waba) {
            return Ok(PortfolioId::parse("portfolio", p).ok());
        }
        let found = self
            .ledger
            .identities(identity::WABA_PORTFOLIO, waba)
            .await?;
        Ok(found
            .first()
            .filter(|p| !p.is_empty())
            .and_then(|p| PortfolioId::parse("portfolio", p).ok()))
    }
}

/// When the restrictions of `kind` end: the latest expiration, None when one has none.
fn rs_until(change: &AccountChange, kind: Restriction) -> Option<Millis> {
    let AccountChange::Restricted(rs) = change else {
        return None;
    };
    let mut latest = None;
    for (_, expires) in rs.iter().filter(|(r, _)| *r == kind) {
        latest = Some(latest.unwrap_or(Millis::MIN).max((*expires)?));
    }
    latest
}

/// Relays the original body and signature to the business's own webhook handler.
async fn forward(url: &str, body: &Bytes, signature: Option<&str>) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = Request::post(uri).header("content-type", "application/json");
    if let Some(s) = signature {
        req = req.header("x-hub-signature-256", s);
    }
    let req = req
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| format!("{url}: no answer within 10 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {}", resp.status()))
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Serves the bridge on `listener` until `shutdown` resolves.
pub async fn serve<L: Ledger>(
    listener: TcpListener,
    bridge: Arc<Bridge<L>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let answer_with = move |req: Request<Incoming>| {
        let bridge = bridge.clone();
        async move { bridge.answer(req).await }
    };
    crate::metrics::serve_http1(listener, "webhook", answer_with, shutdown).await
}

/// The address the listener is on, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}{PATH}")
}
