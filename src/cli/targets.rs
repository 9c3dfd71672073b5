//! `waquota targets list` and `waquota audit`: what the ledger knows, and who changed it.

use serde::Serialize;

use super::{
    CliError, Session, describe, grid, json_out, proto_target, target_json, tier_opt, time,
};
use super::{TargetArgs, TargetJson};
use crate::grpc::convert;
use crate::model::SenderStatus;
use crate::proto::{self, target};

#[derive(clap::Subcommand, Debug, Clone)]
pub enum TargetsCommand {
    /// The senders and portfolios the ledger knows (portfolios first, then by id), with tier,
    /// used, limit and status.
    List {
        /// Only senders, or only portfolios.
        #[arg(long, value_name = "sender|portfolio")]
        kind: Option<Kind>,
        /// Targets per page (server default 100, at most 1000); every page is fetched unless
        /// --page-token is given.
        #[arg(long, value_name = "N")]
        page_size: Option<u32>,
        /// Fetch only the page that starts after this token (printed by a previous page).
        #[arg(long, value_name = "TOKEN")]
        page_token: Option<String>,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Kind {
    Sender,
    Portfolio,
}

#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    #[command(flatten)]
    pub of: Audited,
    /// How many of the newest entries (default 20, at most 100).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
}

/// A sender, a portfolio, or with `--ledger` the ledger as a whole.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "audited", required = true, multiple = false)]
pub struct Audited {
    /// The sender (business phone number id).
    pub sender: Option<String>,
    /// A business portfolio instead of a sender.
    #[arg(long, value_name = "ID")]
    pub portfolio: Option<String>,
    /// The changes to the ledger as a whole (accepted losses, WABA mappings).
    #[arg(long)]
    pub ledger: bool,
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    target: TargetJson<'a>,
    scope: &'static str,
    tier: Option<&'static str>,
    limit: u64,
    used: u64,
    remaining: u64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    portfolio: Option<&'a str>,
    senders: u64,
}

#[derive(Serialize)]
struct ListJson<'a> {
    targets: Vec<SummaryJson<'a>>,
    next_page_token: Option<String>,
}

/// A status from the wire by its name, `unknown` when this client does not know it.
fn status_name(s: i32) -> &'static str {
    proto::SenderStatus::try_from(s)
        .ok()
        .and_then(convert::status_from_proto)
        .map_or("unknown", SenderStatus::name)
}

pub(super) async fn list(
    s: &mut Session,
    kind: Option<Kind>,
    page_size: u32,
    page_token: Option<String>,
) -> Result<String, CliError> {
    let kind = match kind {
        None => proto::TargetKind::Unspecified,
        Some(Kind::Sender) => proto::TargetKind::Sender,
        Some(Kind::Portfolio) => proto::TargetKind::Portfolio,
    };
    let all = page_token.is_none();
    let mut token = page_token.unwrap_or_default();
    let mut targets = Vec::new();
    let next = loop {
        let page = s
            .admin
            .list_targets(proto::ListTargetsRequest {
                kind: kind as i32,
                page_size,
                page_token: token,
                at: s.at,
            })
            .await?
            .into_inner();
        targets.extend(page.targets);
        if page.next_page_token.is_empty() {
            break None;
        }
        if !all {
            break Some(page.next_page_token);
        }
        token = page.next_page_token;
    };
    let ids: Vec<proto::Target> = targets
        .iter()
        .map(|t| t.target.clone().unwrap_or_default())
        .collect();
    if s.json {
        return Ok(json_out(&ListJson {
            targets: targets
                .iter()
                .zip(&ids)
                .map(|(t, id)| SummaryJson {
                    target: target_json(id),
                    scope: super::scope_name(t.scope),
                    tier: tier_opt(t.tier),
                    limit: t.limit,
                    used: t.used,
                    remaining: t.remaining,
                    status: status_name(t.status),
                    portfolio: (!t.portfolio.is_empty()).then_some(t.portfolio.as_str()),
                    senders: t.senders,
                })
                .collect(),
            next_page_token: next,
        }));
    }
    let mut rows = Vec::new();
    for (t, id) in targets.iter().zip(&ids) {
        let (kind, name, portfolio, senders) = match &id.target {
            Some(target::Target::Portfolio(p)) => (
                "portfolio",
                p.clone(),
                "-".to_owned(),
                t.senders.to_string(),
            ),
            Some(target::Target::Sender(x)) => (
                "sender",
                x.clone(),
                super::or_dash(&t.portfolio),
                "-".to_owned(),
            ),
            None => continue,
        };
        rows.push(vec![
            kind.to_owned(),
            name,
            tier_opt(t.tier).unwrap_or("-").to_owned(),
            t.used.to_string(),
            super::count_or_unlimited(t.limit, t.limit),
            status_name(t.status).to_owned(),
            portfolio,
            senders,
        ]);
    }
    let header = [
        "KIND",
        "ID",
        "TIER",
        "USED",
        "LIMIT",
        "STATUS",
        "PORTFOLIO",
        "SENDERS",
    ];
    let mut out = if rows.is_empty() {
        "the ledger knows no target yet\n".to_owned()
    } else {
        grid(Some(&header), rows, &[3, 4, 7])
    };
    if let Some(token) = next {
        out.push_str(&format!("next page: --page-token {token}\n"));
    }
    Ok(out)
}

#[derive(Serialize)]
struct EntryJson {
    at: Option<String>,
    rpc: String,
    actor: String,
    change: String,
}

pub(super) async fn audit(s: &mut Session, args: &AuditArgs) -> Result<String, CliError> {
    let target = if args.of.ledger {
        None
    } else {
        Some(proto_target(&TargetArgs {
            sender: args.of.sender.clone(),
            portfolio: args.of.portfolio.clone(),
        }))
    };
    let entries = s
        .admin
        .list_audit(proto::ListAuditRequest {
            target: target.clone(),
            limit: args.limit.unwrap_or(0),
        })
        .await?
        .into_inner()
        .entries;
    if s.json {
        let entries: Vec<EntryJson> = entries
            .into_iter()
            .map(|e| EntryJson {
                at: time(e.at.as_ref()),
                rpc: e.rpc,
                actor: e.actor,
                change: e.change,
            })
            .collect();
        return Ok(json_out(&entries));
    }
    let whose = target
        .as_ref()
        .map(describe)
        .unwrap_or_else(|| "the ledger".into());
    if entries.is_empty() {
        return Ok(format!("no change to {whose} on record\n"));
    }
    let rows = entries.into_iter().map(|e| {
        vec![
            time(e.at.as_ref()).unwrap_or_else(|| "-".into()),
            e.rpc,
            e.actor,
            e.change,
        ]
    });
    Ok(grid(Some(&["AT", "RPC", "BY", "CHANGE"]), rows, &[]))
}
