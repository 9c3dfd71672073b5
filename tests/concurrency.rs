//! Exactness under concurrency, across instances: two `waquota serve` processes share one
//! Redis, and 64 concurrent clients (each with its own channel, alternating between the two
//! instances) race for one window. However the requests interleave, exactly `limit` new slots
//! are opened, each recipient holds at most one, and the ledger agrees with the answers.
//!
//! The real clock is used (Redis `TIME`): the whole run lies well inside one 24 h window.

mod common;
use common::connect as channel;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use common::{RedisServer, WaquotaProcess, raw_command};
use tonic::transport::Channel;
use waquota::proto::admin_service_client::AdminServiceClient;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AcquireResponse, AssignSenderRequest, Decision,
    InspectRequest, InspectResponse, ListWindowRequest, Policy, PutPolicyRequest, Scope, Target,
    Tier, WindowEntry, target,
};

const LIMIT: u64 = 250;
const CLIENTS: usize = 64;
const TOTAL: usize = 5_000;
const DISTINCT: usize = 1_000;
const BATCH: usize = 20;

/// Recipients repeat in a scattered order: 7919 is prime to 1000, so any 1000 consecutive
/// indices name 1000 distinct recipients.
fn recipient(i: usize) -> String {
    format!("{}", 4_915_100_000_000u64 + ((i * 7919) % DISTINCT) as u64)
}

fn sender_target(s: &str) -> Option<Target> {
    Some(Target {
        target: Some(target::Target::Sender(s.into())),
    })
}

fn portfolio_target(p: &str) -> Option<Target> {
    Some(Target {
        target: Some(target::Target::Portfolio(p.into())),
    })
}

/// One Redis and two `waquota serve` instances on it.
struct Fleet {
    _redis: RedisServer,
    instances: Vec<WaquotaProcess>,
}

impl Fleet {
    fn start() -> Fleet {
        let redis = RedisServer::start();
        let url = redis.url();
        let instances = (0..2)
            .map(|_| WaquotaProcess::start(&["--redis", &url]))
            .collect();
        Fleet {
            _redis: redis,
            instances,
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.instances.iter().map(|p| p.endpoint()).collect()
    }

    async fn admin(&self, i: usize) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(channel(&self.instances[i].endpoint()).await)
    }

    async fn inspect(&self, i: usize, target: Option<Target>) -> InspectResponse {
        self.admin(i)
            .await
            .inspect(InspectRequest {
                target,
                ..Default::default()
            })
            .await
            .expect("inspect")
            .into_inner()
    }

    async fn list_all(&self, i: usize, target: Option<Target>) -> (Vec<WindowEntry>, usize) {
        let mut admin = self.admin(i).await;
        let (mut entries, mut pages, mut token) = (Vec::new(), 0, String::new());
        loop {
            let page = admin
                .list_window(ListWindowRequest {
                    target: target.clone(),
                    page_size: 100,
                    page_token: token,
                    at: None,
                })
                .await
                .expect("list_window")
                .into_inner();
            pages += 1;
            assert!(page.entries.len() <= 100, "page larger than asked");
            entries.extend(page.entries);
            token = page.next_page_token;
            if token.is_empty() {
                return (entries, pages);
            }
            assert!(pages < 100, "paging does not end");
        }
    }
}

/// One answer: request index, sender, recipient, and the response or the error.
struct Answer {
    i: usize,
    sender: String,
    recipient: String,
    result: Result<AcquireResponse, tonic::Status>,
}

/// `TOTAL` Acquires from `CLIENTS` concurrent clients; request `i` goes from client
/// `i % CLIENTS` (on instance `client % 2`) for sender `senders[i % senders.len()]`.
async fn race_acquires(endpoints: &[String], senders: &[String]) -> Vec<Answer> {
    let gate = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let endpoint = endpoints[client % endpoints.len()].clone();
        let senders = senders.to_vec();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut q = QuotaServiceClient::new(channel(&endpoint).await);
            gate.wait().await; // every client connected: start together
            let mut out = Vec::new();
            for i in (client..TOTAL).step_by(CLIENTS) {
                let sender = senders[i % senders.len()].clone();
                let recipient = recipient(i);
                let result = q
                    .acquire(AcquireRequest {
                        sender: sender.clone(),
                        recipient: recipient.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner());
                out.push(Answer {
                    i,
                    sender,
                    recipient,
                    result,
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all.sort_by_key(|a| a.i);
    assert_eq!(all.len(), TOTAL);
    all
}

fn decision(r: &AcquireResponse) -> Decision {
    Decision::try_from(r.decision).unwrap_or(Decision::Unspecified)
}

/// Checks the answers of one race for one window of `LIMIT`; returns the recipients that got
/// a new slot, with the sender that opened it, and the requests that failed. Failed requests
/// are left out of the exactness checks (a refused request changes nothing), so a test reports
/// both whether the ledger stayed exact and whether every request was answered; the caller
/// asserts `no_errors` last.
fn check_exact(answers: &[Answer], scope: Scope) -> (HashMap<String, String>, Vec<String>) {
    let errors: Vec<String> = answers
        .iter()
        .filter_map(|a| {
            a.result
                .as_ref()
                .err()
                .map(|e| format!("request {} ({} -> {}): {e:?}", a.i, a.sender, a.recipient))
        })
        .collect();
    if !errors.is_empty() {
        println!(
            "{} of {} requests failed, first: {}",
            errors.len(),
            answers.len(),
            errors[0]
        );
    }

    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut by_recipient: HashMap<&str, Vec<Decision>> = HashMap::new();
    let mut new_used = Vec::new();
    let mut opened: HashMap<String, String> = HashMap::new();
    for a in answers {
        let Ok(r) = a.result.as_ref() else { continue };
        let d = decision(r);
        counts
            .entry(d.as_str_name())
            .and_modify(|n| *n += 1)
            .or_insert(1);
        assert!(
            matches!(
                d,
                Decision::AllowedNew | Decision::AllowedCounted | Decision::DeniedLimit
            ),
            "request {} ({} -> {}): unexpected decision {d:?}",
            a.i,
            a.sender,
            a.recipient
        );
        assert_eq!(r.allowed, d != Decision::DeniedLimit, "allowed vs {d:?}");
        assert_eq!(r.recipient, a.recipient);
        assert_eq!(r.limit, LIMIT, "request {}: limit", a.i);
        assert_eq!(r.scope, scope as i32, "request {}: scope", a.i);
        assert!(r.used <= LIMIT, "request {}: used {} > limit", a.i, r.used);
        assert_eq!(r.remaining, LIMIT - r.used, "request {}: remaining", a.i);
        match d {
            Decision::AllowedNew => {
                new_used.push(r.used);
                assert!(
                    !r.reservation.is_empty(),
                    "a new slot carries a reservation"
                );
                opened.insert(a.recipient.clone(), a.sender.clone());
            }
            Decision::AllowedCounted => {
                assert!(r.reservation.is_empty(), "a counted answer opens nothing");
            }
            _ => {
                assert_eq!(r.used, LIMIT, "a denial happens only at the limit");
                let retry = r.retry_after.as_ref().map(common::duration_ms);
                assert!(
                    retry.is_some_and(|ms| ms > 0),
                    "a denial says when to retry: {retry:?}"
                );
            }
        }
        by_recipient.entry(&a.recipient).or_default().push(d);
    }
    let distinct = by_recipient.len();
    println!(
        "{} answers ({} errors) over {distinct} distinct recipients: {counts:?}; {} recipients got a slot",
        answers.len(),
        errors.len(),
        opened.len()
    );

    let new = counts.get("DECISION_ALLOWED_NEW").copied().unwrap_or(0);
    assert_eq!(new, LIMIT as usize, "exactly {LIMIT} new slots: {counts:?}");
    // Every new slot was counted exactly once: the `used` figures the new answers carried are
    // 1, 2, ..., LIMIT, each once (each script saw every earlier opening and no later one).
    new_used.sort_unstable();
    assert_eq!(
        new_used,
        (1..=LIMIT).collect::<Vec<_>>(),
        "the new answers' `used` figures must be 1..={LIMIT}, each once"
    );
    for (r, ds) in &by_recipient {
        let n = ds.iter().filter(|d| **d == Decision::AllowedNew).count();
        assert!(n <= 1, "{r} got {n} new slots: {ds:?}");
        if n == 1 {
            // The time is fixed for the run and nothing is released, so once a recipient holds
            // a slot it is never refused, and before it held one it was never refused either
            // (a refusal means the window was full, and a full window stays full).
            assert!(
                !ds.contains(&Decision::DeniedLimit),
                "{r} holds a slot but was refused: {ds:?}"
            );
        } else {
            assert!(
                !ds.contains(&Decision::AllowedCounted),
                "{r} was counted but never got a slot: {ds:?}"
            );
        }
    }
    (opened, errors)
}

fn no_errors(errors: &[String], total: usize) {
    assert!(
        errors.is_empty(),
        "{} of {total} requests failed (the ledger stayed exact), first: {}",
        errors.len(),
        errors[0]
    );
}

async fn check_ledger(fleet: &Fleet, target: Option<Target>, opened: &HashMap<String, String>) {
    for i in 0..2 {
        let inspection = fleet.inspect(i, target.clone()).await;
        println!(
            "instance {i}: Inspect says limit {} used {} remaining {}",
            inspection.limit, inspection.used, inspection.remaining
        );
        assert_eq!(
            (inspection.limit, inspection.used, inspection.remaining),
            (LIMIT, LIMIT, 0),
            "instance {i}: Inspect (limit, used, remaining)"
        );
    }
    let (entries, pages) = fleet.list_all(1, target).await;
    let listed: HashMap<&str, &str> = entries
        .iter()
        .map(|e| (e.recipient.as_str(), e.sender.as_str()))
        .collect();
    println!(
        "ListWindow: {} entries in {pages} pages, {} distinct recipients",
        entries.len(),
        listed.len()
    );
    assert_eq!(entries.len(), LIMIT as usize, "one entry per slot");
    assert_eq!(
        listed.len(),
        LIMIT as usize,
        "each recipient holds at most one slot"
    );
    for (r, s) in opened {
        assert_eq!(
            listed.get(r.as_str()).copied(),
            Some(s.as_str()),
            "{r}: listed with the sender that opened its slot"
        );
    }
    let order: Vec<(u32, &str)> = entries
        .iter()
        .map(|e| {
            let r = waquota::model::RecipientId::parse("r", &e.recipient).unwrap();
            (waquota::model::listing_position(&r), e.recipient.as_str())
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "entries come in listing order (docs/contract.md)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_two_instances_64_clients_exactly_250_new() {
    let fleet = Fleet::start();
    let sender = "conc-sender-1".to_owned();
    let stored = fleet
        .admin(0)
        .await
        .put_policy(PutPolicyRequest {
            target: sender_target(&sender),
            policy: Some(Policy {
                tier: Tier::Tier250 as i32,
                // The exactness race sends thousands of messages a second: lift the 80/s default.
                messages_per_second: 100_000,
                ..Default::default()
            }),
            at: None,
        })
        .await
        .expect("put_policy")
        .into_inner();
    assert_eq!(stored.policy.map(|p| p.tier), Some(Tier::Tier250 as i32));

    // Deliberately cold: nothing has used the instances' Redis connections before the burst
    // (a fresh deployment taking traffic), so the race also covers opening them.
    let answers = race_acquires(&fleet.endpoints(), std::slice::from_ref(&sender)).await;
    let (opened, errors) = check_exact(&answers, Scope::Sender);
    check_ledger(&fleet, sender_target(&sender), &opened).await;
    no_errors(&errors, TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portfolio_of_three_two_instances_64_clients_exactly_250_new() {
    let fleet = Fleet::start();
    let portfolio = "conc-portfolio";
    let senders: Vec<String> = (1..=3).map(|n| format!("conc-pf-sender-{n}")).collect();
    let mut admin = fleet.admin(0).await;
    admin
        .put_policy(PutPolicyRequest {
            target: portfolio_target(portfolio),
            policy: Some(Policy {
                tier: Tier::Tier2k as i32,
                custom_limit: LIMIT,
                ..Default::default()
            }),
            at: None,
        })
        .await
        .expect("put_policy");
    for s in &senders {
        admin
            .assign_sender(AssignSenderRequest {
                create: true,
                sender: s.clone(),
                portfolio: portfolio.into(),
                at: None,
            })
            .await
            .expect("assign_sender");
        // The exactness race sends thousands of messages a second: lift the 80/s default.
        admin
            .put_policy(PutPolicyRequest {
                target: sender_target(s),
                policy: Some(Policy {
                    messages_per_second: 100_000,
                    ..Default::default()
                }),
                at: None,
            })
            .await
            .expect("put_policy");
    }
    // The other instance learns the assignment from Redis, not from a local cache. (This setup
    // also opens both instances' Redis connections before the burst: the cold start is covered
    // by the other two tests.)
    for s in &senders {
        let inspection = fleet.inspect(1, sender_target(s)).await;
        assert_eq!(inspection.portfolio, portfolio, "{s} is in the portfolio");
        assert_eq!(inspection.limit, LIMIT, "{s} is limited by the portfolio");
    }

    let answers = race_acquires(&fleet.endpoints(), &senders).await;
    let (opened, errors) = check_exact(&answers, Scope::Portfolio);
    let per_sender: BTreeMap<&str, usize> = opened.values().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.as_str()).or_default() += 1;
        m
    });
    println!("new slots per sender: {per_sender:?}");
    check_ledger(&fleet, portfolio_target(portfolio), &opened).await;
    // Each sender sees the portfolio's figures.
    for s in &senders {
        let inspection = fleet.inspect(0, sender_target(s)).await;
        assert_eq!((inspection.used, inspection.remaining), (LIMIT, 0), "{s}");
    }
    no_errors(&errors, TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_two_instances_64_clients_exactly_250_new() {
    let fleet = Fleet::start();
    let sender = "conc-batch-sender".to_owned();
    fleet
        .admin(1)
        .await
        .put_policy(PutPolicyRequest {
            target: sender_target(&sender),
            policy: Some(Policy {
                tier: Tier::Tier250 as i32,
                // The exactness race sends thousands of messages a second: lift the 80/s default.
                messages_per_second: 100_000,
                ..Default::default()
            }),
            at: None,
        })
        .await
        .expect("put_policy");

    // Cold, like the single-sender race: instance 0 has not talked to Redis yet.
    let endpoints = fleet.endpoints();
    let gate = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for b in 0..CLIENTS {
        let endpoint = endpoints[b % 2].clone();
        let sender = sender.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut q = QuotaServiceClient::new(channel(&endpoint).await);
            let recipients: Vec<String> = (b * BATCH..(b + 1) * BATCH).map(recipient).collect();
            gate.wait().await;
            let results = q
                .acquire_batch(AcquireBatchRequest {
                    sender,
                    recipients: recipients.clone(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().results);
            (b, recipients, results)
        }));
    }
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut new_used = Vec::new();
    let mut opened = HashMap::new();
    let mut errors = Vec::new();
    for t in tasks {
        let (b, recipients, results) = t.await.expect("batch task");
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                // A failed batch changed nothing; checked last, after exactness.
                errors.push(format!("batch {b}: {e:?}"));
                continue;
            }
        };
        assert_eq!(results.len(), BATCH, "batch {b}: one result per recipient");
        let mut denied = false;
        let mut last_new_used = None;
        for (r, res) in recipients.iter().zip(&results) {
            let d = decision(res);
            *counts.entry(d.as_str_name()).or_default() += 1;
            assert_eq!(&res.recipient, r, "batch {b}: same order as the request");
            match d {
                Decision::AllowedNew => {
                    // A batch is decided atomically and nothing frees during the run: once it
                    // was refused for lack of room, nothing after it in the batch gets a slot;
                    // and its own new slots are counted one after another.
                    assert!(!denied, "batch {b}: a new slot after a refusal");
                    if let Some(u) = last_new_used {
                        assert_eq!(res.used, u + 1, "batch {b}: new slots count one by one");
                    }
                    last_new_used = Some(res.used);
                    new_used.push(res.used);
                    assert!(
                        opened.insert(r.clone(), b).is_none(),
                        "{r} got a second new slot (batch {b})"
                    );
                }
                Decision::AllowedCounted => {}
                Decision::DeniedLimit => {
                    assert_eq!(res.used, LIMIT, "batch {b}: refused below the limit");
                    denied = true;
                }
                other => panic!("batch {b}: unexpected decision {other:?}"),
            }
        }
    }
    println!(
        "{CLIENTS} batches of {BATCH} ({} failed): {counts:?}; {} recipients got a slot",
        errors.len(),
        opened.len()
    );
    assert_eq!(
        counts.get("DECISION_ALLOWED_NEW").copied(),
        Some(LIMIT as usize),
        "exactly {LIMIT} new slots: {counts:?}"
    );
    new_used.sort_unstable();
    assert_eq!(new_used, (1..=LIMIT).collect::<Vec<_>>());
    let inspection = fleet.inspect(0, sender_target(&sender)).await;
    assert_eq!((inspection.used, inspection.remaining), (LIMIT, 0));
    let (entries, _) = fleet.list_all(0, sender_target(&sender)).await;
    let listed: HashSet<String> = entries.into_iter().map(|e| e.recipient).collect();
    let opened: HashSet<String> = opened.into_keys().collect();
    assert_eq!(
        listed, opened,
        "the window holds exactly the recipients that got a slot"
    );
    no_errors(&errors, CLIENTS);
}

// ------------------------------------------------------------------ reassignment

/// Every portfolio whose members set lists `sender`, read straight from Redis.
fn portfolios_listing(port: u16, sender: &str, candidates: &[&str]) -> Vec<String> {
    candidates
        .iter()
        .filter(|p| {
            raw_command(port, &format!("SISMEMBER wq:{{p:{p}}}:m {sender}"))
                .is_some_and(|r| r.starts_with(":1"))
        })
        .map(|p| p.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reassignments_leave_a_sender_in_one_portfolio_with_its_policy() {
    let fleet = Fleet::start();
    let port = fleet._redis.port;
    for round in 0..10 {
        let sender = format!("mover-{round}");
        let mut admin = fleet.admin(0).await;
        admin
            .put_policy(PutPolicyRequest {
                target: sender_target(&sender),
                policy: Some(Policy {
                    status: waquota::proto::SenderStatus::Banned as i32,
                    ..Default::default()
                }),
                at: None,
            })
            .await
            .expect("put_policy");
        // Two operators move the same sender at once, through both instances.
        let moves = ["P1", "P2", "P1", "P2"]
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let endpoint = fleet.endpoints()[i % 2].clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    let mut a = AdminServiceClient::new(channel(&endpoint).await);
                    a.assign_sender(AssignSenderRequest {
                        create: true,
                        sender,
                        portfolio: p.into(),
                        at: None,
                    })
                    .await
                })
            });
        for m in moves.collect::<Vec<_>>() {
            // A move may be refused while another is under way (UNAVAILABLE, retryable).
            if let Err(s) = m.await.unwrap() {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
            }
        }
        let listed = portfolios_listing(port, &sender, &["P1", "P2"]);
        assert_eq!(
            listed.len(),
            1,
            "{sender} is a member of exactly one portfolio: {listed:?}"
        );
        let home = fleet.inspect(1, sender_target(&sender)).await;
        assert_eq!(
            home.portfolio, listed[0],
            "the route agrees with the membership"
        );
        // Its own policy moved with it: still banned, whichever instance decides.
        for i in 0..2 {
            let mut q = QuotaServiceClient::new(channel(&fleet.endpoints()[i]).await);
            let r = q
                .acquire(AcquireRequest {
                    sender: sender.clone(),
                    recipient: "4915100000001".into(),
                    ..Default::default()
                })
                .await
                .expect("acquire")
                .into_inner();
            assert_eq!(
                r.decision,
                Decision::DeniedSenderBlocked as i32,
                "{sender}: {r:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_reassignment_is_completed_by_the_next_one() {
    let fleet = Fleet::start();
    let port = fleet._redis.port;
    let sender = "half-moved";
    let mut admin = fleet.admin(0).await;
    admin
        .put_policy(PutPolicyRequest {
            target: sender_target(sender),
            policy: Some(Policy {
                status: waquota::proto::SenderStatus::Paused as i32,
                ..Default::default()
            }),
            at: None,
        })
        .await
        .expect("put_policy");
    // A move to P1 that stopped right after its journal was written (a crashed instance).
    let set = raw_command(port, &format!("SET wq:{{s:{sender}}}:mv >P1")).unwrap();
    assert!(set.starts_with("+OK"), "{set}");
    admin
        .assign_sender(AssignSenderRequest {
            create: true,
            sender: sender.into(),
            portfolio: "P2".into(),
            at: None,
        })
        .await
        .expect("assign_sender");
    assert_eq!(portfolios_listing(port, sender, &["P1", "P2"]), vec!["P2"]);
    let journal = raw_command(port, &format!("EXISTS wq:{{s:{sender}}}:mv")).unwrap();
    assert!(journal.starts_with(":0"), "the journal is gone: {journal}");
    let i = fleet.inspect(1, sender_target(sender)).await;
    assert_eq!(i.portfolio, "P2");
    assert_eq!(
        i.sender_policy.map(|p| p.status),
        Some(waquota::proto::SenderStatus::Paused as i32),
        "its own policy survived both moves"
    );
}
