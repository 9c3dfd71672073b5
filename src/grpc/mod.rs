//! The tonic services: decode and validate requests, call the ledger, encode answers. No rules
//! live here; conversion between the wire and the domain is in [`convert`].

pub mod codec;
pub mod convert;
pub mod guard;
pub mod size_limit;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::ledger::coalesce::Coalescer;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::model::{
    AcquireRequest, AuditEntry, Cursor, Defaults, Millis, PortfolioId, RecipientId, Reservation,
    ReservationSigner, SenderId, Target,
};
use crate::outage::{OUTAGE_HEADER, OutagePolicy};
use crate::proto::{self, admin_service_server::AdminService, quota_service_server::QuotaService};
use convert::{invalid, status};

/// What the services need besides the ledger.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub trust_client_clock: bool,
    pub defaults: Defaults,
    pub max_batch: usize,
    pub metrics: Arc<Metrics>,
    pub outage: Arc<OutagePolicy>,
    /// Bearer tokens are configured: then only an operator token's `at` is honoured.
    pub auth_enabled: bool,
    /// Every decision answers within it of its arrival (`redis_timeout`).
    pub store_timeout: std::time::Duration,
}

impl ApiOptions {
    /// The request's clock (`at`): honoured with `--trust-client-clock`, and when tokens are
    /// configured only from an operator, since a trusted `at` rewrites time for everyone
    /// (docs/contract.md, "The clock").
    fn clock<T>(
        &self,
        req: &Request<T>,
        at: Option<&prost_types::Timestamp>,
    ) -> Result<Option<Millis>, Status> {
        if at.is_some()
            && self.trust_client_clock
            && self.auth_enabled
            && req.extensions().get::<guard::Role>() != Some(&guard::Role::Operator)
        {
            return Err(Status::invalid_argument(
                "at: only an operator token may set the clock on this server",
            ));
        }
        convert::clock(at, self.trust_client_clock).map_err(invalid)
    }
}

pub struct QuotaApi<L> {
    ledger: Arc<L>,
    /// Read from the ledger on first use (the store may be down at start-up).
    signer: tokio::sync::OnceCell<ReservationSigner>,
    /// Acquires go through it: a sender's concurrent requests are decided together.
    coalescer: Coalescer<L>,
    opts: ApiOptions,
}

pub struct AdminApi<L> {
    ledger: Arc<L>,
    opts: ApiOptions,
}

impl<L: Ledger> QuotaApi<L> {
    pub fn new(ledger: Arc<L>, opts: ApiOptions) -> Self {
        QuotaApi {
            signer: tokio::sync::OnceCell::new(),
            coalescer: Coalescer::new(ledger.clone(), opts.store_timeout, opts.metrics.clone()),
            ledger,
            opts,
        }
    }
}

impl<L> AdminApi<L> {
    pub fn new(ledger: Arc<L>, opts: ApiOptions) -> Self {
        AdminApi { ledger, opts }
    }
}

/// Who made a change, for the audit log: the caller's role (with tokens configured, only an
/// operator reaches AdminService) and address. Tokens themselves are never written anywhere.
fn actor<T>(req: &Request<T>) -> String {
    let role = match req.extensions().get::<guard::Role>() {
        Some(guard::Role::Operator) => "operator",
        Some(guard::Role::Sender) => "sender",
        None => "anonymous",
    };
    match req.remote_addr() {
        Some(addr) => format!("{role} at {addr}"),
        None => role.to_owned(),
    }
}

/// Targets inspected at once while a listing page is filled.
const LISTING_IN_FLIGHT: usize = 32;
/// Audit entries returned when the request names no limit.
const DEFAULT_AUDIT: usize = 20;

impl<L: Ledger> AdminApi<L> {
    /// Writes a change that was made to the audit log: a structured log event, and an entry in
    /// the ledger for `waquota audit`. The change is done by then, so a failure to keep the
    /// entry is logged and not answered as the call's failure (a retry would repeat the change).
    async fn audit(
        &self,
        actor: &str,
        at: Option<Millis>,
        rpc: &str,
        targets: &[Option<Target>],
        change: &str,
    ) {
        let at = crate::model::clock(at);
        for target in targets {
            let shown = target
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_else(|| "the ledger".into());
            tracing::info!(target: "waquota::audit", rpc, target = %shown, actor, change, "admin change");
            let entry = AuditEntry {
                at,
                rpc: rpc.to_owned(),
                actor: actor.to_owned(),
                change: change.to_owned(),
                target: target.clone(),
            };
            if let Err(e) = self.ledger.append_audit(entry).await {
                tracing::warn!(target: "waquota::audit", rpc, target = %shown, error = %e, "audit entry not kept");
            }
        }
    }
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A listing's page size as asked: 0 is the default, and more than the most is the most.
fn page_size(asked: u32) -> usize {
    match asked as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// Decisions for one request, and whether they were made without the store.
struct Decided {
    results: Vec<proto::AcquireResponse>,
    store_outage: bool,
}

impl Decided {
    fn into_response<T>(self, msg: T) -> Response<T> {
        let mut resp = Response::new(msg);
        if self.store_outage {
            resp.metadata_mut().insert(
                OUTAGE_HEADER,
                tonic::metadata::MetadataValue::from_static("allowed"),
            );
        }
        resp
    }
}

impl<L: Ledger> QuotaApi<L> {
    async fn signer(&self) -> Result<&ReservationSigner, Status> {
        self.signer
            .get_or_try_init(|| async {
                // Boxed: this runs once, and held inline the ledger call's future would make
                // every request's future larger (see ledger::coalesce).
                let secret = Box::pin(self.ledger.reservation_secret()).await?;
                Ok::<_, LedgerError>(ReservationSigner::new(&secret))
            })
            .await
            .map_err(status)
    }

    /// A reservation from the wire: canonical, and issued to this sender for this recipient.
    async fn reservation(
        &self,
        token: &str,
        sender: &SenderId,
        recipient: &RecipientId,
    ) -> Result<Reservation, Status> {
        if token.is_empty() {
            return Err(Status::invalid_argument("reservation: required"));
        }
        self.signer()
            .await?
            .verify("reservation", token, sender, recipient)
            .map_err(invalid)
    }

    async fn decide(
        &self,
        sender: &str,
        recipients: Vec<(&str, String)>,
        kind: i32,
        category: i32,
        dry_run: bool,
        at: Option<Millis>,
    ) -> Result<Decided, Status> {
        let span = tracing::Span::current();
        span.record("sender", sender);
        let req = AcquireRequest {
            sender: SenderId::parse("sender", sender).map_err(invalid)?,
            recipients: recipients
                .iter()
                .map(|(r, field)| RecipientId::parse(field, r))
                .collect::<Result<_, _>>()
                .map_err(invalid)?,
            kind: convert::kind(kind).map_err(invalid)?,
            category: convert::category(category).map_err(invalid)?,
            dry_run,
            at,
        };
        let recipients = req.recipients.clone();
        let req_sender = req.sender.clone();
        let outcomes = match self.coalescer.acquire(req).await {
            Ok(o) => o,
            Err(LedgerError::Unavailable(m))
                if self.opts.outage.decide(sender, recipients.len(), &m) =>
            {
                span.record("decision", "store_outage_allowed");
                return Ok(Decided {
                    results: recipients.iter().map(convert::outage_admission).collect(),
                    store_outage: true,
                });
            }
            Err(e) => return Err(status(e)),
        };
        for o in &outcomes {
            self.opts.metrics.decision(o.decision, o.scope);
        }
        if let [o] = outcomes.as_slice() {
            span.record("decision", o.decision.name());
        }
        tracing::debug!(recipients = outcomes.len(), "decided");
        // Asked only once the store has answered, so a store that is down at start-up still
        // meets the outage policy above; after the first time it is a field read.
        let signer = if outcomes.iter().any(|o| o.reservation.is_some()) {
            Some(self.signer().await?)
        } else {
            None
        };
        Ok(Decided {
            results: outcomes
                .into_iter()
                .map(|o| convert::outcome(o, &req_sender, signer))
                .collect(),
            store_outage: false,
        })
    }
}

#[tonic::async_trait]
impl<L: Ledger> QuotaService for QuotaApi<L> {
    async fn acquire(
        &self,
        req: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        let mut decided = self
            .decide(
                &r.sender,
                vec![(&r.recipient, "recipient".into())],
                r.kind,
                r.category,
                r.dry_run,
                at,
            )
            .await?;
        let one = decided
            .results
            .pop()
            .ok_or_else(|| Status::internal("no outcome"))?;
        Ok(decided.into_response(one))
    }

    async fn acquire_batch(
        &self,
        req: Request<proto::AcquireBatchRequest>,
    ) -> Result<Response<proto::AcquireBatchResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        if r.recipients.is_empty() {
            return Err(Status::invalid_argument("recipients: must not be empty"));
        }
        if r.recipients.len() > self.opts.max_batch {
            return Err(Status::invalid_argument(format!(
                "recipients: {} recipients, more than the maximum batch of {}",
                r.recipients.len(),
                self.opts.max_batch
            )));
        }
        let recipients = r
            .recipients
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), format!("recipients[{i}]")))
            .collect();
        let mut decided = self
            .decide(&r.sender, recipients, r.kind, r.category, r.dry_run, at)
            .await?;
        let results = std::mem::take(&mut decided.results);
        Ok(decided.into_response(proto::AcquireBatchResponse { results }))
    }

    async fn release(
        &self,
        req: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        tracing::Span::current().record("sender", r.sender.as_str());
        let sender = SenderId::parse("sender", &r.sender).map_err(invalid)?;
        let recipient = RecipientId::parse("recipient", &r.recipient).map_err(invalid)?;
        let reservation = self
            .reservation(&r.reservation, &sender, &recipient)
            .await?;
        let released = self
            .ledger
            .release(sender, recipient, reservation, at)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ReleaseResponse { released }))
    }

    async fn record_inbound(
        &self,
        req: Request<proto::RecordInboundRequest>,
    ) -> Result<Response<proto::RecordInboundResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        tracing::Span::current().record("sender", r.sender.as_str());
        let sender = SenderId::parse("sender", &r.sender).map_err(invalid)?;
        let recipient = RecipientId::parse("recipient", &r.recipient).map_err(invalid)?;
        let until = self
            .ledger
            .record_inbound(sender, recipient, r.free_entry_point, at)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::RecordInboundResponse {
            service_window_expires_at: Some(convert::timestamp(until)),
        }))
    }

    async fn confirm(
        &self,
        req: Request<proto::ConfirmRequest>,
    ) -> Result<Response<proto::ConfirmResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        let sender = SenderId::parse("sender", &r.sender).map_err(invalid)?;
        let recipient = RecipientId::parse("recipient", &r.recipient).map_err(invalid)?;
        let reservation = self
            .reservation(&r.reservation, &sender, &recipient)
            .await?;
        let delivered = r
            .delivered_at
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("delivered_at: required"))?;
        let delivered_at =
            convert::ms_from_timestamp("delivered_at", delivered).map_err(invalid)?;
        match self
            .ledger
            .confirm(sender, recipient, reservation, delivered_at, at)
            .await
            .map_err(status)?
        {
            Some(until) => Ok(Response::new(proto::ConfirmResponse {
                expires_at: Some(convert::timestamp(until)),
            })),
            None => Err(Status::not_found(
                "reservation: no live slot was opened by this reservation",
            )),
        }
    }

    async fn report_failure(
        &self,
        req: Request<proto::ReportFailureRequest>,
    ) -> Result<Response<proto::ReportFailureResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        let sender = SenderId::parse("sender", &r.sender).map_err(invalid)?;
        let recipient = RecipientId::parse("recipient", &r.recipient).map_err(invalid)?;
        let reservation = if r.reservation.is_empty() {
            None
        } else {
            Some(
                self.reservation(&r.reservation, &sender, &recipient)
                    .await?,
            )
        };
        let out = self
            .ledger
            .report_failure(sender, recipient, reservation, r.error_code, at)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ReportFailureResponse {
            released: out.released,
            hold_until: out.hold_until.map(convert::timestamp),
        }))
    }
}

#[tonic::async_trait]
impl<L: Ledger> AdminService for AdminApi<L> {
    async fn put_policy(
        &self,
        req: Request<proto::PutPolicyRequest>,
    ) -> Result<Response<proto::PutPolicyResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let who = actor(&req);
        let r = req.into_inner();
        let target = convert::target(r.target.as_ref()).map_err(invalid)?;
        let policy =
            convert::policy(r.policy.as_ref(), &target, &self.opts.defaults).map_err(invalid)?;
        let stored = self
            .ledger
            .put_policy(target.clone(), policy, at)
            .await
            .map_err(status)?;
        let change = format!("policy set: {}", convert::policy_summary(&stored));
        self.audit(&who, at, "PutPolicy", &[Some(target)], &change)
            .await;
        Ok(Response::new(proto::PutPolicyResponse {
            policy: Some(convert::policy_to_proto(&stored)),
        }))
    }

    async fn assign_sender(
        &self,
        req: Request<proto::AssignSenderRequest>,
    ) -> Result<Response<proto::AssignSenderResponse>, Status> {
        // Validated, though a move has no clock of its own (the audit entry is dated by it).
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let who = actor(&req);
        let r = req.into_inner();
        let sender = SenderId::parse("sender", &r.sender).map_err(invalid)?;
        let portfolio = if r.portfolio.is_empty() {
            None
        } else {
            Some(PortfolioId::parse("portfolio", &r.portfolio).map_err(invalid)?)
        };
        // An unknown portfolio is most often a mistyped one: refused unless asked to create it
        // (docs/contract.md, "Inspecting a target").
        if let Some(p) = &portfolio
            && !r.create
            && !self
                .ledger
                .inspect(crate::model::Target::Portfolio(p.clone()), None, None)
                .await
                .map_err(status)?
                .known
        {
            return Err(Status::failed_precondition(format!(
                "portfolio {p} is unknown: it has no policy, senders or history (ids are \
                 case-sensitive); set its policy first, or pass create to start it with the \
                 default portfolio policy"
            )));
        }
        self.ledger
            .assign_sender(sender.clone(), portfolio.clone())
            .await
            .map_err(status)?;
        let (change, targets) = match &portfolio {
            Some(p) => (
                format!(
                    "sender {sender} assigned to portfolio {p}{}",
                    if r.create { " (create)" } else { "" }
                ),
                vec![
                    Some(Target::Sender(sender)),
                    Some(Target::Portfolio(p.clone())),
                ],
            ),
            None => (
                format!("sender {sender} detached from its portfolio"),
                vec![Some(Target::Sender(sender))],
            ),
        };
        self.audit(&who, at, "AssignSender", &targets, &change)
            .await;
        Ok(Response::new(proto::AssignSenderResponse {}))
    }

    async fn inspect(
        &self,
        req: Request<proto::InspectRequest>,
    ) -> Result<Response<proto::InspectResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        let target = convert::target(r.target.as_ref()).map_err(invalid)?;
        let recipient = convert::optional_recipient("recipient", &r.recipient).map_err(invalid)?;
        let i = self
            .ledger
            .inspect(target, recipient, at)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::inspection(i)))
    }

    async fn list_window(
        &self,
        req: Request<proto::ListWindowRequest>,
    ) -> Result<Response<proto::ListWindowResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        let target = convert::target(r.target.as_ref()).map_err(invalid)?;
        let page_size = page_size(r.page_size);
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(Cursor::parse("page_token", &r.page_token).map_err(invalid)?)
        };
        let page = self
            .ledger
            .list_window(target, page_size, after, at)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListWindowResponse {
            entries: page
                .entries
                .into_iter()
                .map(convert::window_entry)
                .collect(),
            next_page_token: page.next.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    async fn reset(
        &self,
        req: Request<proto::ResetRequest>,
    ) -> Result<Response<proto::ResetResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let who = actor(&req);
        let r = req.into_inner();
        let target = convert::target(r.target.as_ref()).map_err(invalid)?;
        self.ledger.reset(target.clone()).await.map_err(status)?;
        self.audit(
            &who,
            at,
            "Reset",
            &[Some(target)],
            "window reset: every slot freed",
        )
        .await;
        Ok(Response::new(proto::ResetResponse {}))
    }

    async fn assign_waba(
        &self,
        req: Request<proto::AssignWabaRequest>,
    ) -> Result<Response<proto::AssignWabaResponse>, Status> {
        let who = actor(&req);
        let r = req.into_inner();
        let waba = crate::model::PortfolioId::parse("waba", &r.waba).map_err(invalid)?;
        let portfolio = if r.portfolio.is_empty() {
            None
        } else {
            Some(PortfolioId::parse("portfolio", &r.portfolio).map_err(invalid)?)
        };
        self.ledger
            .put_identity(
                crate::webhook::identity::WABA_PORTFOLIO,
                waba.as_str(),
                portfolio.as_ref().map_or("", |p| p.as_str()),
                false,
            )
            .await
            .map_err(status)?;
        let (change, targets) = match portfolio {
            None => (
                format!("WABA {waba} detached from its portfolio"),
                vec![None],
            ),
            Some(p) => (
                format!("WABA {waba} assigned to portfolio {p}"),
                vec![None, Some(Target::Portfolio(p))],
            ),
        };
        self.audit(&who, None, "AssignWaba", &targets, &change)
            .await;
        Ok(Response::new(proto::AssignWabaResponse {}))
    }

    async fn plan(
        &self,
        req: Request<proto::PlanRequest>,
    ) -> Result<Response<proto::PlanResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let input = convert::plan_input(req.into_inner(), at).map_err(invalid)?;
        let plan = crate::plan::plan(self.ledger.as_ref(), &self.opts.defaults, input)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::plan(plan)))
    }

    async fn accept_ledger_loss(
        &self,
        req: Request<proto::AcceptLedgerLossRequest>,
    ) -> Result<Response<proto::AcceptLedgerLossResponse>, Status> {
        let who = actor(&req);
        let since = self.ledger.accept_ledger_loss().await.map_err(status)?;
        let change = match since {
            Some(t) => format!(
                "ledger loss accepted: lost since {}",
                crate::cli::rfc3339(t)
            ),
            None => "ledger loss accepted: the ledger was not lost".to_owned(),
        };
        self.audit(&who, None, "AcceptLedgerLoss", &[None], &change)
            .await;
        Ok(Response::new(proto::AcceptLedgerLossResponse {
            was_lost: since.is_some(),
            lost_since: since.map(convert::timestamp),
        }))
    }

    async fn list_targets(
        &self,
        req: Request<proto::ListTargetsRequest>,
    ) -> Result<Response<proto::ListTargetsResponse>, Status> {
        let at = self.opts.clock(&req, req.get_ref().at.as_ref())?;
        let r = req.into_inner();
        let kind = convert::target_kind(r.kind).map_err(invalid)?;
        let page_size = page_size(r.page_size);
        let after = if r.page_token.is_empty() {
            None
        } else {
            // A token is the last position listed; one of another kind is refused too.
            let t = Target::from_member("page_token", &r.page_token).map_err(invalid)?;
            if kind.is_some_and(|k| k != t.kind()) {
                return Err(Status::invalid_argument(
                    "page_token: it belongs to a listing of another kind",
                ));
            }
            Some(r.page_token)
        };
        let (candidates, more) = self
            .ledger
            .targets(kind, after, page_size)
            .await
            .map_err(status)?;
        use futures_util::{StreamExt, TryStreamExt};
        let inspected: Vec<_> = futures_util::stream::iter(candidates.iter().cloned())
            .map(|t| async move {
                self.ledger
                    .inspect(t.clone(), None, at)
                    .await
                    .map(|i| (t, i))
            })
            .buffered(LISTING_IN_FLIGHT)
            .try_collect()
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListTargetsResponse {
            targets: inspected
                .iter()
                .filter(|(_, i)| i.known)
                .map(|(t, i)| convert::target_summary(t, i))
                .collect(),
            next_page_token: if more {
                candidates.last().map(Target::member).unwrap_or_default()
            } else {
                String::new()
            },
        }))
    }

    async fn list_audit(
        &self,
        req: Request<proto::ListAuditRequest>,
    ) -> Result<Response<proto::ListAuditResponse>, Status> {
        let r = req.into_inner();
        let target = match &r.target {
            Some(t) if t.target.is_some() => Some(convert::target(Some(t)).map_err(invalid)?),
            _ => None,
        };
        let limit = match r.limit as usize {
            0 => DEFAULT_AUDIT,
            n if n > crate::model::AUDIT_KEEP => {
                return Err(Status::invalid_argument(format!(
                    "limit: at most {} (what is kept per target)",
                    crate::model::AUDIT_KEEP
                )));
            }
            n => n,
        };
        let entries = self.ledger.audit(target, limit).await.map_err(status)?;
        Ok(Response::new(proto::ListAuditResponse {
            entries: entries.into_iter().map(convert::audit_entry).collect(),
        }))
    }
}
