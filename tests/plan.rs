//! The planner (docs/contract.md, "Planning"): `AdminService.Plan` and `waquota plan` on every
//! ledger as the live source, on the trusted clock. A plan is a prediction that must come true:
//! the same campaign sent with real Acquires on a copy of the same state gives the same hours.

#[macro_use]
mod common;

use std::process::Command;

use common::dsl::*;
use common::{Backend, DAY, HOUR, TestServer, at, ms_of, scratch_dir, ts};
use tonic::Code;
use waquota::cli::rfc3339;
use waquota::proto::{Decision, PlanRequest, PlanResponse, PlannedTier, Tier, WindowMode};

on_every_ledger!(
    the_legacy_upgrade_examples_are_reproduced_by_plan,
    a_plan_of_a_half_full_window_comes_true_hour_by_hour,
    users_already_counted_or_in_a_service_window_cost_nothing_and_the_live_ledger_is_unchanged,
    with_upgrades_the_plan_applies_the_projected_tier_at_its_moment,
    bad_plan_requests_are_refused_naming_the_field,
    the_cli_prints_the_plan_and_refuses_bad_input_in_one_line,
    inspect_chart_draws_the_next_24_hours_of_the_live_window,
);

/// Day `n` (day 1 = the test day D) at `h`:`m`:`s`.
fn day(n: i64, h: i64, m: i64, s: i64) -> i64 {
    at(h, m, s, 0) + (n - 1) * DAY
}

fn tier1k() -> waquota::proto::Policy {
    policy(Tier::Tier1k, 0, WindowMode::Conversation)
}

async fn plan(a: &mut Admin, req: PlanRequest) -> PlanResponse {
    a.plan(req)
        .await
        .unwrap_or_else(|e| panic!("plan: {e}"))
        .into_inner()
}

fn new_users(sender_id: &str, n: u64, start: i64, rate: f64, now: i64) -> PlanRequest {
    PlanRequest {
        target: sender(sender_id),
        new_users: n,
        start: Some(ts(start)),
        rate,
        at: Some(ts(now)),
        ..Default::default()
    }
}

fn tiers(t: &[PlannedTier]) -> Vec<(Tier, i64, u64)> {
    t.iter()
        .map(|t| {
            (
                Tier::try_from(t.tier).unwrap(),
                ms_of(t.at.as_ref().unwrap()),
                t.new_users,
            )
        })
        .collect()
}

/// 1K tier, 500 new users on day 1 with the 500th at 15:00 → 10K from 15:00 on day 2; and
/// 100, 200, 200 new users on days 1 to 3 with the 500th on day 3 at 19:00 → 10K from day 4
/// 19:00 (the first two days sent for real, the third planned).
async fn the_legacy_upgrade_examples_are_reproduced_by_plan(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    put_policy_at(&mut a, sender("s1"), tier1k(), day(1, 8, 0, 0)).await;
    // 500 at 10 per second: the 500th goes 49.9 s after the first.
    let p = plan(
        &mut a,
        new_users("s1", 500, day(1, 14, 59, 10) + 100, 10.0, day(1, 8, 0, 0)),
    )
    .await;
    assert_eq!(p.completes_at.map(|t| ms_of(&t)), Some(day(1, 15, 0, 0)));
    assert_eq!((p.users, p.messages, p.new_users), (500, 500, 500));
    assert_eq!(
        tiers(&p.upgrades),
        vec![(Tier::Tier10k, day(2, 15, 0, 0), 0)]
    );
    // The fastest path sends the same 500 first.
    assert_eq!(tiers(&p.ladder)[0], (Tier::Tier10k, day(2, 15, 0, 0), 500));

    put_policy_at(&mut a, sender("s2"), tier1k(), day(1, 8, 0, 0)).await;
    for (n, (d, count)) in [(1, 100), (2, 200)].into_iter().enumerate() {
        for i in 0..count {
            let r = format!("d{d}-{i:03}-{n}");
            let got = acquire(&mut q, "s2", &r, day(d, 10, 0, 0) + i * 1000).await;
            assert_decision(&got, Decision::AllowedNew);
        }
    }
    let before = inspect(&mut a, sender("s2"), day(3, 12, 0, 0)).await;
    assert_eq!((before.unique_7d, before.projection), (300, None));
    // 200 more at one per second: the 200th (the 500th of the week) at 19:00:00.
    let p = plan(
        &mut a,
        new_users("s2", 200, day(3, 19, 0, 0) - 199_000, 1.0, day(3, 12, 0, 0)),
    )
    .await;
    assert_eq!(p.completes_at.map(|t| ms_of(&t)), Some(day(3, 19, 0, 0)));
    assert_eq!(
        tiers(&p.upgrades),
        vec![(Tier::Tier10k, day(4, 19, 0, 0), 0)]
    );
    assert_eq!(tiers(&p.ladder)[0], (Tier::Tier10k, day(4, 19, 0, 0), 200));
    // Planning wrote nothing: no projection appeared on the live ledger.
    let after = inspect(&mut a, sender("s2"), day(3, 12, 0, 0)).await;
    assert_eq!(before, after);
    server.stop().await;
}

/// A 1K sender `s1` whose window got `n` new users from `first`, one every `every` ms.
async fn fill(a: &mut Admin, q: &mut Quota, first: i64, n: i64, every: i64) {
    put_policy_at(a, sender("s1"), tier1k(), first - HOUR).await;
    for i in 0..n {
        let r = format!("old-{i:03}");
        assert_decision(
            &acquire(q, "s1", &r, first + i * every).await,
            Decision::AllowedNew,
        );
    }
}

/// 600 slots taken on the day before, 12:00 to 18:00 (one every 36 s); campaigns start at 10:00.
async fn half_full(a: &mut Admin, q: &mut Quota) {
    fill(a, q, day(0, 12, 0, 0), 600, 36_000).await;
}

/// One hour of a replay: sent, new, refused for the limit, freed, used, remaining.
type Hour = (i64, u64, u64, u64, u64, u64, u64);

fn plan_hours(p: &PlanResponse) -> Vec<Hour> {
    p.hours
        .iter()
        .map(|h| {
            (
                ms_of(h.start.as_ref().unwrap()),
                h.sent,
                h.new_users,
                h.refused_limit,
                h.freed,
                h.used,
                h.remaining,
            )
        })
        .collect()
}

/// The campaign sent for real, as the contract says the planned worker sends: in order, one
/// message every 1/rate s; a refusal with retry_after is retried then. Every hour from `start`
/// is read with Inspect at its start and end.
async fn replay(
    q: &mut Quota,
    a: &mut Admin,
    recipients: &[String],
    start: i64,
    rate: f64,
) -> (Vec<Hour>, i64) {
    let mut hours: Vec<Hour> = Vec::new();
    let first = inspect(a, sender("s1"), start).await;
    let mut open: Hour = (start, 0, 0, 0, first.slots_freeing_next_hour, 0, 0);
    let mut clock = start as f64;
    let mut last = start;
    for r in recipients {
        loop {
            let t = clock.ceil() as i64;
            while open.0 + HOUR <= t {
                let end = inspect(a, sender("s1"), open.0 + HOUR).await;
                open.5 = end.used;
                open.6 = end.remaining;
                hours.push(open);
                open = (open.0 + HOUR, 0, 0, 0, end.slots_freeing_next_hour, 0, 0);
            }
            let got = acquire(q, "s1", r, t).await;
            let d = Decision::try_from(got.decision).unwrap();
            if is_allowed(d) {
                open.1 += 1;
                open.2 += u64::from(d == Decision::AllowedNew);
                clock = t as f64 + 1000.0 / rate;
                last = t;
                break;
            }
            open.3 += u64::from(d == Decision::DeniedLimit);
            clock = (t + retry_after(&got).max(1)) as f64;
        }
    }
    let end = inspect(a, sender("s1"), open.0 + HOUR).await;
    open.5 = end.used;
    open.6 = end.remaining;
    hours.push(open);
    (hours, last)
}

async fn a_plan_of_a_half_full_window_comes_true_hour_by_hour(backend: Backend) {
    let live = TestServer::start(backend).await;
    let copy = TestServer::start(backend).await;
    let (mut q, mut a) = (live.quota().await, live.admin().await);
    let (mut cq, mut ca) = (copy.quota().await, copy.admin().await);
    half_full(&mut a, &mut q).await;
    half_full(&mut ca, &mut cq).await;
    let start = day(1, 10, 0, 0);
    let campaign = users("new", 1000);
    let p = plan(
        &mut a,
        PlanRequest {
            target: sender("s1"),
            recipients: campaign.clone(),
            start: Some(ts(start)),
            rate: 2.0,
            at: Some(ts(start)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (p.used_at_start, p.remaining_at_start, p.new_users),
        (600, 400, 1000)
    );
    let planned = plan_hours(&p);
    // 400 fit at once (200 s); the other 600 take the slots freeing from 12:00 to 18:00.
    assert_eq!(planned[0].1, 400);
    assert_eq!(planned[2].4, 100, "100 slots free between 12:00 and 13:00");
    let (real, last) = replay(&mut cq, &mut ca, &campaign, start, 2.0).await;
    assert_eq!(
        planned, real,
        "the plan, hour by hour, is what real Acquires do"
    );
    assert_eq!(p.completes_at.map(|t| ms_of(&t)), Some(last));
    assert_eq!(last, day(1, 12, 0, 0) + 599 * 36_000);
    live.stop().await;
    copy.stop().await;
}

async fn users_already_counted_or_in_a_service_window_cost_nothing_and_the_live_ledger_is_unchanged(
    backend: Backend,
) {
    let server = TestServer::start(backend).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    half_full(&mut a, &mut q).await;
    let now = day(1, 10, 0, 0);
    for i in 0..30 {
        inbound(&mut q, "s1", &format!("inbound-{i:02}"), now - HOUR).await;
    }
    // 50 users that hold a slot, 30 inside a service window, 20 new.
    let mut campaign: Vec<String> = (0..50).map(|i| format!("old-{i:03}")).collect();
    campaign.extend((0..30).map(|i| format!("inbound-{i:02}")));
    campaign.extend(users("fresh", 20));
    let window_before = list_pages(&mut a, sender("s1"), 1000, now).await;
    let before = inspect(&mut a, sender("s1"), now).await;
    let p = plan(
        &mut a,
        PlanRequest {
            target: sender("s1"),
            recipients: campaign,
            start: Some(ts(now)),
            rate: 10.0,
            at: Some(ts(now)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (p.users, p.messages, p.free_users, p.new_users),
        (100, 100, 80, 20)
    );
    let h = &p.hours[0];
    assert_eq!(
        (h.sent, h.new_users, h.used, h.remaining),
        (100, 20, 620, 380)
    );
    assert_eq!(inspect(&mut a, sender("s1"), now).await, before);
    assert_eq!(
        list_pages(&mut a, sender("s1"), 1000, now).await,
        window_before
    );
    server.stop().await;
}

async fn with_upgrades_the_plan_applies_the_projected_tier_at_its_moment(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    // 600 users from 06:00, one every 36 s: the 500th (10:59:24) projects 10K for day 2 10:59:24.
    fill(&mut a, &mut q, day(1, 6, 0, 0), 600, 36_000).await;
    // 1,000 new users at 10 per second from 16:00: 400 fit at once, the rest wait for slots.
    let mut req = new_users("s1", 1000, day(1, 16, 0, 0), 10.0, day(1, 16, 0, 0));
    let kept = plan(&mut a, req.clone()).await;
    req.with_upgrades = true;
    let raised = plan(&mut a, req).await;
    for p in [&kept, &raised] {
        assert_eq!(
            tiers(&p.upgrades),
            vec![(Tier::Tier10k, day(2, 10, 59, 24), 0)]
        );
    }
    // Kept at 1K, the last 600 take the old slots as they free (06:00 to 11:59:24 on day 2);
    // raised to 10K at 10:59:24, the 100 still waiting go at once at 10 per second.
    assert_eq!(
        kept.completes_at.map(|t| ms_of(&t)),
        Some(day(2, 11, 59, 24))
    );
    assert_eq!(
        raised.completes_at.map(|t| ms_of(&t)),
        Some(day(2, 10, 59, 34))
    );
    let tier_at = |p: &PlanResponse, t: i64| {
        p.hours
            .iter()
            .find(|h| ms_of(h.start.as_ref().unwrap()) + HOUR > t)
            .map(|h| (Tier::try_from(h.tier).unwrap(), h.limit))
    };
    // At the end of the hour from 10:00 on day 2.
    assert_eq!(
        tier_at(&kept, day(2, 10, 30, 0)),
        Some((Tier::Tier1k, 1000))
    );
    assert_eq!(
        tier_at(&raised, day(2, 10, 30, 0)),
        Some((Tier::Tier10k, 10_000))
    );
    server.stop().await;
}

async fn bad_plan_requests_are_refused_naming_the_field(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut a = server.admin().await;
    let now = day(1, 8, 0, 0);
    let ok = new_users("s1", 10, now, 1.0, now);
    let cases: Vec<(PlanRequest, &str)> = vec![
        (
            PlanRequest {
                new_users: 0,
                ..ok.clone()
            },
            "new_users",
        ),
        (
            PlanRequest {
                rate: -1.0,
                ..ok.clone()
            },
            "rate",
        ),
        (
            PlanRequest {
                rate: 5000.0,
                ..ok.clone()
            },
            "rate",
        ),
        (
            PlanRequest {
                deliveries_per_user: 101,
                ..ok.clone()
            },
            "deliveries_per_user",
        ),
        (
            PlanRequest {
                recipients: vec!["4915100000001".into()],
                ..ok.clone()
            },
            "recipients",
        ),
        (
            PlanRequest {
                new_users: 0,
                recipients: vec!["ok".into(), "bad{id}".into()],
                ..ok.clone()
            },
            "recipients[1]",
        ),
        (
            PlanRequest {
                horizon: Some(prost_types::Duration {
                    seconds: 100 * 86_400,
                    nanos: 0,
                }),
                ..ok.clone()
            },
            "horizon",
        ),
        (
            PlanRequest {
                target: None,
                ..ok.clone()
            },
            "target",
        ),
    ];
    for (req, field) in cases {
        assert_invalid(a.plan(req).await, field);
    }
    // A target the ledger has never seen is unknown: nothing to plan from.
    let ghost = inspect(&mut a, sender("ghost"), now).await;
    assert!(!ghost.known);
    let err = a
        .plan(new_users("ghost", 10, now, 1.0, now))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("sender ghost is unknown"), "{err:?}");
    put_policy_at(&mut a, sender("ghost"), tier1k(), now).await;
    assert!(inspect(&mut a, sender("ghost"), now).await.known);
    // A portfolio with no senders has no one to send the campaign.
    let err = a
        .plan(PlanRequest {
            target: portfolio("p-empty"),
            ..ok.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("p-empty"), "{err:?}");
    // Nothing was written.
    let i = inspect(&mut a, sender("ghost"), now).await;
    assert_eq!((i.used, i.unique_30d), (0, 0));
    server.stop().await;
}

/// Runs the real binary against `server` with the trusted clock at `now`.
async fn cli(server: &TestServer, now: i64, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![
        "--addr".to_owned(),
        server.endpoint(),
        "--at".into(),
        rfc3339(now),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_waquota"))
            .args(&all)
            .env_remove("WAQUOTA_ADDR")
            .env_remove("WAQUOTA_TOKEN")
            .output()
            .expect("run waquota")
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn the_cli_prints_the_plan_and_refuses_bad_input_in_one_line(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    half_full(&mut a, &mut q).await;
    let now = day(1, 10, 0, 0);
    let dir = scratch_dir("plan-cli");
    let file = dir.join("campaign.txt");
    let mut ids: Vec<String> = (0..5).map(|i| format!("old-{i:03}")).collect();
    ids.extend(users("fresh", 45));
    std::fs::write(&file, ids.join("\n") + "\n\n").unwrap();
    let file = file.to_str().unwrap().to_owned();
    let svg = dir.join("plan.svg");
    let (code, out, err) = cli(
        &server,
        now,
        &[
            "--json",
            "plan",
            "s1",
            "--recipients",
            &file,
            "--rate",
            "5",
            "--svg",
            svg.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["completes_at"], rfc3339(now + 49 * 200));
    assert_eq!(
        (v["free_users"].as_u64(), v["new_users"].as_u64()),
        (Some(5), Some(45))
    );
    assert_eq!(v["hours"][0]["used"], 645);
    // The 500th of the 600 earlier users (16:59:24 the day before) projected 10K.
    assert_eq!(
        v["upgrades"],
        serde_json::json!([{"tier": "10k", "at": rfc3339(day(1, 16, 59, 24))}])
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(
        picture.starts_with("<svg") && picture.contains("used 645"),
        "{picture}"
    );

    // The text form: the summary, the hours and the chart.
    let (code, out, err) = cli(&server, now, &["plan", "s1", "--new", "10", "--rate", "1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("completes at     {}", rfc3339(now + 9_000))),
        "{out}"
    );
    assert!(out.contains("610/1000"), "{out}");
    assert!(out.contains('█'), "{out}");

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "4915100000001\nnot{an}id\n").unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["plan", "s1", "--recipients", empty.to_str().unwrap()],
            2,
            "no recipient ids",
        ),
        (
            vec!["plan", "s1", "--recipients", bad.to_str().unwrap()],
            2,
            "line 2",
        ),
        (
            vec!["plan", "s1", "--new", "10", "--rate", "-5"],
            2,
            "--rate",
        ),
        (vec!["plan", "s1", "--new", "-3"], 2, "--new"),
        (vec!["plan", "s1", "--new", "0"], 2, "--new"),
        (
            vec!["plan", "--portfolio", "nobody", "--new", "10"],
            1,
            "nobody",
        ),
    ];
    for (args, want, says) in cases {
        let (code, out, err) = cli(&server, now, &args).await;
        assert_eq!(code, want, "{args:?}: {out} {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err:?}"
        );
        assert!(err.contains(says), "{args:?}: {err}");
    }
    server.stop().await;
}

async fn inspect_chart_draws_the_next_24_hours_of_the_live_window(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    half_full(&mut a, &mut q).await;
    // At 10:00 the 600 slots of the day before free from 12:00 to 18:00, 100 an hour.
    let now = day(1, 10, 0, 0);
    let (code, out, err) = cli(&server, now, &["inspect", "s1", "--chart"]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("hour"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 24, "{out}");
    let freed = |l: &str| l.rsplit('│').next().unwrap().trim().parse::<u64>().unwrap();
    let used = |l: &str| {
        l.split('│')
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .trim()
            .to_owned()
    };
    assert!(rows[0].starts_with("10:00"), "{out}");
    assert_eq!(
        rows.iter().map(|l| freed(l)).collect::<Vec<_>>()[..10],
        [0, 1, 100, 100, 100, 100, 100, 99, 0, 0],
        "{out}"
    );
    assert_eq!(used(rows[0]), "600");
    assert_eq!(used(rows[3]), "499", "{out}");
    assert!(rows[0].contains("███"), "{out}");
    server.stop().await;
}

/// The SVG chart of a plan, opened in headless Chromium: the picture holds the occupancy bars
/// (blue) and the freeing bars (green) on white.
#[tokio::test]
async fn the_svg_chart_renders_in_a_browser() {
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("a Chromium browser (apt-get install chromium; scripts/test installs it)");
    let server = TestServer::start(Backend::Memory).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    half_full(&mut a, &mut q).await;
    let dir = scratch_dir("plan-svg");
    let svg = dir.join("plan.svg");
    let png = dir.join("plan.png");
    let now = day(1, 10, 0, 0);
    let (code, _, err) = cli(
        &server,
        now,
        &[
            "plan",
            "s1",
            "--new",
            "1000",
            "--rate",
            "2",
            "--svg",
            svg.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (svg_arg, png_arg) = (format!("file://{}", svg.display()), png.clone());
    let shot = tokio::task::spawn_blocking(move || {
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg(format!("--screenshot={}", png_arg.display()))
            .args(["--window-size=960,480", &svg_arg])
            .output()
            .expect("run chromium")
    })
    .await
    .unwrap();
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    let share = |f: &dyn Fn(&[u8]) -> bool| {
        pixels.iter().filter(|p| f(p)).count() as f64 / pixels.len() as f64
    };
    let blue = share(&|p| p[2] > 150 && p[0] < 90 && p[1] > 80 && p[1] < 140);
    let green = share(&|p| p[1] > 130 && p[0] < 90 && p[2] < 120);
    let white = share(&|p| p[0] > 240 && p[1] > 240 && p[2] > 240);
    assert!(blue > 0.05, "occupancy bars: {blue}");
    assert!(green > 0.005, "freeing bars: {green}");
    assert!(white > 0.3, "background: {white}");
    server.stop().await;
}
