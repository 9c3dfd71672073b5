//! The hot in-process paths of a decision, timed without Redis or the network:
//! recipient normalisation, request validation, building the acquire EVALSHA, and the in-memory
//! ledger's acquire.
//!
//! `cargo bench --bench hot_paths [-- FILTER]` prints ns/op, the median of 15 samples of about
//! 20 ms each (min and max beside it). A small hand-written loop instead of a bench framework:
//! these are a handful of sub-microsecond paths, and the figures only need to be comparable
//! between runs on one machine. Without `--bench` (as `cargo test --all-targets` runs it) each
//! case runs a few times as a smoke test.

use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use waquota::grpc::convert;
use waquota::ledger::Ledger;
use waquota::ledger::memory::MemoryLedger;
use waquota::ledger::redis::acquire_cmd;
use waquota::ledger::redis::keys::{Home, Keys};
use waquota::ledger::redis::scripts::Scripts;
use waquota::model::{
    AcquireRequest, Defaults, MessageKind, Policy, RecipientId, RuleSet, SenderId, Target, Tier,
    WindowMode,
};

const SAMPLES: usize = 15;
const SAMPLE_TIME: Duration = Duration::from_millis(20);

struct Bench {
    filter: Option<String>,
    full: bool,
}

impl Bench {
    fn run(&self, name: &str, mut f: impl FnMut()) {
        if self.filter.as_deref().is_some_and(|p| !name.contains(p)) {
            return;
        }
        if !self.full {
            for _ in 0..3 {
                f();
            }
            println!("{name:<44} ok");
            return;
        }
        // Calibrate: iterations that take about SAMPLE_TIME.
        let mut iters = 1u64;
        loop {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            if t.elapsed() >= SAMPLE_TIME / 4 || iters >= 1 << 30 {
                let per = t.elapsed().as_nanos() as f64 / iters as f64;
                iters = ((SAMPLE_TIME.as_nanos() as f64 / per.max(0.1)) as u64).max(1);
                break;
            }
            iters *= 4;
        }
        let mut ns: Vec<f64> = (0..SAMPLES)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                t.elapsed().as_nanos() as f64 / iters as f64
            })
            .collect();
        ns.sort_by(f64::total_cmp);
        println!(
            "{name:<44} {:>10.1} ns/op   (min {:.1}, max {:.1}, {iters} iterations x {SAMPLES})",
            ns[SAMPLES / 2],
            ns[0],
            ns[SAMPLES - 1]
        );
    }
}

/// The in-memory ledger never waits: its futures finish on the first poll.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the in-memory ledger does not wait"),
    }
}

fn rid(s: &str) -> RecipientId {
    RecipientId::parse("recipient", s).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let b = Bench {
        filter: args.iter().find(|a| !a.starts_with("--")).cloned(),
        full: args.iter().any(|a| a == "--bench"),
    };
    println!(
        "hot paths ({})",
        if b.full {
            "median ns/op"
        } else {
            "smoke run; cargo bench for figures"
        }
    );

    // Recipient normalisation.
    b.run("RecipientId::parse digits", || {
        black_box(RecipientId::parse("recipient", black_box("4915112345678")).unwrap());
    });
    b.run("RecipientId::parse phone form", || {
        black_box(RecipientId::parse("recipient", black_box("+49 151 1234-5678")).unwrap());
    });
    b.run("RecipientId::parse opaque id", || {
        black_box(RecipientId::parse("recipient", black_box("US.1349:ab_c-d")).unwrap());
    });

    // Request validation: what the Acquire handler does before calling the ledger.
    let at = convert::timestamp(1_772_409_600_000);
    let validate = |recipients: &[String]| AcquireRequest {
        sender: SenderId::parse("sender", "1555:0100").unwrap(),
        recipients: recipients
            .iter()
            .map(|r| RecipientId::parse("recipient", r))
            .collect::<Result<_, _>>()
            .unwrap(),
        kind: convert::kind(1).unwrap(),
        category: None,
        dry_run: false,
        at: convert::clock(Some(&at), true).unwrap(),
    };
    let one = vec!["+49 151 1234-5678".to_owned()];
    b.run("validate Acquire (1 recipient)", || {
        black_box(validate(black_box(&one)));
    });
    let hundred: Vec<String> = (0..100).map(|i| format!("4915{i:09}")).collect();
    b.run("validate AcquireBatch (100 recipients)", || {
        black_box(validate(black_box(&hundred)));
    });

    // Building the acquire EVALSHA: keys and ARGV, as the Redis ledger sends it.
    let scripts = Scripts::new();
    let keys = Keys::new("wq");
    let defaults = Defaults::default();
    let req = validate(&one);
    let home = Home::Sender(req.sender.clone());
    b.run("acquire_cmd (1 recipient)", || {
        black_box(acquire_cmd(
            &scripts.acquire,
            &keys,
            &home,
            black_box(&req),
            &defaults,
        ));
    });

    // The in-memory ledger: a window of 10K slots, unlimited, and one full sender.
    let ledger = MemoryLedger::new(defaults);
    let sender = SenderId::parse("sender", "1555:0100").unwrap();
    let full = SenderId::parse("sender", "1555:0199").unwrap();
    let policy = |limit| Policy {
        custom_limit: limit,
        messages_per_second: 100_000,
        ..Policy::basic(Tier::T100K, WindowMode::Conversation, RuleSet::Legacy)
    };
    now(ledger.put_policy(Target::Sender(sender.clone()), policy(1_000_000_000), None)).unwrap();
    now(ledger.put_policy(Target::Sender(full.clone()), policy(10), None)).unwrap();
    let acquire = |s: &SenderId, recipients: Vec<RecipientId>| {
        now(ledger.acquire(AcquireRequest {
            sender: s.clone(),
            recipients,
            kind: MessageKind::Template,
            category: None,
            dry_run: false,
            at: None,
        }))
        .unwrap()
    };
    let pool: Vec<RecipientId> = (0..10_000).map(|i| rid(&format!("4915{i:09}"))).collect();
    for chunk in pool.chunks(1000) {
        acquire(&sender, chunk.to_vec());
    }
    acquire(
        &full,
        (0..10).map(|i| rid(&format!("4919{i:09}"))).collect(),
    );
    let mut i = 0usize;
    b.run("memory acquire counted (10K window)", || {
        i = (i + 7919) % pool.len();
        black_box(acquire(&sender, vec![pool[i].clone()]));
    });
    let mut n = 0u64;
    b.run("memory acquire new (growing window)", || {
        n += 1;
        black_box(acquire(&sender, vec![rid(&format!("4916{n:09}"))]));
    });
    b.run("memory acquire denied (full, limit 10)", || {
        n += 1;
        black_box(acquire(&full, vec![rid(&format!("4916{n:09}"))]));
    });
}
