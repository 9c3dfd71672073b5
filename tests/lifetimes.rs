//! Key lifetimes on Redis (docs/internals.md, "Lifetimes"): every key of ledger state the
//! scripts write carries a TTL covering what it holds, so an idle target leaves nothing behind;
//! configuration keys (policies, assignments) persist. Checked over every key after a workload
//! that grows a window to many shards, releases, confirms, expires and shrinks it, and
//! exercises every other script.

mod common;

use common::dsl::*;
use common::{Backend, DAY, HOUR, TestServer, at};
use waquota::proto::{Category, Tier, WindowMode};

/// The suffixes (after `<prefix>:{<home>}:`) of configuration keys, which never expire (a
/// target's audit log among them), the reservation secret (`<prefix>:secret`), the ledger marker
/// (`<prefix>:ledger`) and the registry of targets (`<prefix>:targets`), outside any home.
fn is_configuration(suffix: &str) -> bool {
    suffix == "pol"
        || suffix == "m"
        || suffix == "away"
        || suffix == "audit"
        || suffix.starts_with("sp:")
        || suffix == "wq:secret"
        || suffix == "wq:ledger"
        || suffix == "wq:targets"
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_of_ledger_state_expires_and_configuration_persists() {
    let mut srv = TestServer::start(Backend::Redis).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t = at(9, 0, 0, 0);
    let mut p = policy(Tier::Tier250, 2_000, WindowMode::Conversation);
    p.marketing_cap = 3;
    put_policy(&mut a, sender("s1"), p).await;

    // A window of 1,500 slots (dozens of shards), grown by batches.
    let all = users("u", 1_500);
    let mut reservations = Vec::new();
    for (k, chunk) in all.chunks(500).enumerate() {
        let rs = batch(&mut q, "s1", chunk, t + k as i64 * HOUR).await;
        reservations.extend(rs.into_iter().map(|r| r.reservation));
    }
    assert!(release(&mut q, "s1", &all[3], &reservations[3], t + 3 * HOUR).await);
    confirm(
        &mut q,
        "s1",
        &all[4],
        &reservations[4],
        Some(t),
        t + 3 * HOUR,
    )
    .await
    .expect("confirmed");
    // 200 service windows, 20 ms apart: the set is split into parts.
    for i in 0..200 {
        inbound(&mut q, "s1", &format!("w{i}"), t - HOUR + i * 20).await;
    }
    acquire_category(&mut q, "s1", "mk1", Category::Marketing, t).await;
    let r = acquire(&mut q, "s1", "f1", t).await;
    report_failure(&mut q, "s1", "f1", &r.reservation, 131_049, t).await;
    // A portfolio with a sender, whose state moves there.
    assign(&mut a, "s2", "P").await;
    batch(&mut q, "s2", &users("p", 200), t).await;
    // A day later most of s1's window has ended: the next call trims it and the window shrinks.
    let later = t + DAY + HOUR + 1;
    let r = acquire(&mut q, "s1", "late", later).await;
    assert_eq!(r.used, 501, "{r:?}");

    let redis = srv.redis().expect("a Redis backend");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut shards = 0;
    let mut parts = Vec::new();
    let mut configuration = Vec::new();
    for key in &keys {
        let suffix = key.split_once("}:").map(|(_, s)| s).unwrap_or(key);
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if is_configuration(suffix) {
            assert_eq!(ttl, -1, "{key} is configuration and persists");
            configuration.push(suffix.to_owned());
            continue;
        }
        // The longest-lived state is the projection index: 30 days, plus slack and renewal.
        assert!(
            ttl > 0 && ttl <= 31 * DAY,
            "{key} is ledger state and must expire (PTTL {ttl})"
        );
        if suffix.starts_with("w:") {
            shards += 1;
        }
        if let Some((set, _)) = suffix.split_once('/') {
            parts.push(set.to_owned());
        }
    }
    configuration.sort();
    assert_eq!(
        configuration,
        [
            "audit", // s1's policy
            "audit", // s2 assigned to P, in s2's log
            "audit", // and in P's
            "away",
            "m",
            "pol",
            "sp:s1",
            "wq:ledger",
            "wq:secret",
            "wq:targets"
        ]
    );
    assert!(
        shards > 10,
        "the window was stored in many shards: {keys:?}"
    );
    // The sets of many recipients were stored in parts, and every part expires (above).
    parts.sort();
    parts.dedup();
    assert_eq!(parts, ["csw:s1", "pr:s1", "pr:s2", "uq"], "{keys:?}");
}

/// Part 0 of a sender's set holds its shape, so it must live at least as long as every other
/// part, or the entries there would be lost with it. The hard case: the first split, where every
/// entry of part 0 moves to part 1 (all their hashes odd) and part 0 keeps only the shape, while
/// the longest-lived entry (a 72-hour window) was written before the write that splits.
#[tokio::test(flavor = "multi_thread")]
async fn part_zero_of_a_split_set_outlives_every_other_part() {
    let mut srv = TestServer::start_with(Backend::Redis, |s| s.set_part_fill = 4).await;
    let mut q = srv.quota().await;
    let t = at(9, 0, 0, 0);
    // Recipients whose hash is odd: the top bit of their listing position (the hash reversed).
    let odd: Vec<String> = (0..)
        .map(|i| format!("odd{i}"))
        .filter(|r| {
            let id = waquota::model::RecipientId::parse("r", r).unwrap();
            waquota::model::listing_position(&id) >= 1 << 31
        })
        .take(5)
        .collect();
    assert_eq!(inbound_fep(&mut q, "s", &odd[0], t).await, t + 3 * DAY);
    for r in &odd[1..] {
        assert_eq!(inbound(&mut q, "s", r, t).await, t + DAY);
    }

    let redis = srv.redis().expect("a Redis backend");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let base = "wq:{s:s}:csw:s";
    let mut parts: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{base}/*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!parts.is_empty(), "the set was split");
    let in_zero: u64 = redis::cmd("ZCARD")
        .arg(base)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        in_zero, 1,
        "part 0 holds only the shape: every entry moved out"
    );
    parts.insert(0, base.to_owned());
    let mut ttls = Vec::new();
    for key in &parts {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        ttls.push(pttl);
    }
    let longest = *ttls[1..].iter().max().unwrap();
    assert!(
        longest > 3 * DAY - HOUR,
        "a part keeps the 72-hour window: {ttls:?}"
    );
    assert!(
        ttls[0] >= longest - 1_000,
        "part 0 (the shape) lives as long as every part: {parts:?} {ttls:?}"
    );
}

/// The projection index's keys (its by-user set, its two-hour buckets, the hash of counts and
/// cursors: docs/internals.md, "Lifetimes") all expire: a bucket when its end leaves the 30 days,
/// the hash with the last bucket. A release that empties the index deletes what it emptied, and
/// the next new user sets every TTL again; a user past 30 days counts for nothing, and leaves the
/// by-user set when its part is next written.
#[tokio::test(flavor = "multi_thread")]
async fn the_projection_index_keeps_a_ttl_when_a_release_empties_it() {
    let mut srv = TestServer::start(Backend::Redis).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t = at(9, 0, 0, 0);
    let redis = srv.redis().expect("a Redis backend");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let uq = "wq:{s:s}:uq";
    let hash = "wq:{s:s}:uq:t";
    let bucket = format!("wq:{{s:s}}:uq:t:{}", t / (2 * HOUR));
    let pttl = |conn: &mut redis::aio::MultiplexedConnection, key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    // A bucket (two hours) lives until its end + 30 days (+ slack), the hash as long as its
    // buckets.
    let bucket_life = (t / (2 * HOUR) + 1) * 2 * HOUR + 30 * DAY - t;

    let r = acquire(&mut q, "s", "a", t).await;
    assert!(
        pttl(&mut conn, uq.into()).await > 30 * DAY,
        "the first user sets a TTL"
    );
    for key in [bucket.clone(), hash.to_owned()] {
        let ttl = pttl(&mut conn, key.clone()).await;
        assert!(
            ttl >= bucket_life && ttl <= bucket_life + DAY,
            "{key}: PTTL {ttl}"
        );
    }
    assert!(release(&mut q, "s", "a", &r.reservation, t + 1).await);
    assert_eq!(
        pttl(&mut conn, uq.into()).await,
        -2,
        "the release emptied the index"
    );
    assert_eq!(pttl(&mut conn, bucket.clone()).await, -2, "and its bucket");
    acquire(&mut q, "s", "b", t + 2).await;
    for key in [uq.to_owned(), bucket.clone()] {
        let ttl = pttl(&mut conn, key.clone()).await;
        assert!(
            ttl > 30 * DAY && ttl <= 31 * DAY,
            "the next new user sets it again: {key} PTTL {ttl}"
        );
    }

    // Thirty days on (by the trusted clock), a third user: only it counts, and the second, past
    // 30 days, left the by-user set when the third was written into it.
    let later = t + 30 * DAY + 3;
    acquire(&mut q, "s", "c", later).await;
    let stored: u64 = redis::cmd("ZCARD")
        .arg(uq)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    let i = inspect(&mut a, sender("s"), later).await;
    assert_eq!((i.unique_7d, i.unique_30d), (1, 1));
}
