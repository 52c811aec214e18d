//! One suite, two stores: every test below runs against the in-memory store and against a real
//! `redis-server` started for it, so the embedded default and the cluster behave the same. Tests that
//! only Redis can show (outage, two gateways, key expiry) follow.

use std::sync::Arc;
use std::time::Duration;

use kiln_quota::{
    Charge, Decision, KeyRecord, Limit, MemoryStore, QuotaStore, RedisConfig, RedisStore, Scope,
    Settlement, Store,
};
use kiln_testkit::{RedisCluster, RedisServer};

const LEASE: Duration = Duration::from_secs(30);
const KEEP: Duration = Duration::from_secs(3600);

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn user(windows: &[(u64, u32)], rate: Option<(u64, u32)>, in_flight: Option<u32>) -> Scope {
    Scope {
        subject: Scope::user_subject(&fresh("u")),
        windows: windows.to_vec(),
        rate,
        max_in_flight: in_flight,
    }
}

async fn admit(store: &dyn Store, scopes: &[Scope], idem: Option<&str>) -> (String, Decision) {
    let id = fresh("c");
    let decision = store
        .admit(&Charge {
            charge_id: &id,
            idempotency: idem,
            scopes,
            lease: LEASE,
            retention: KEEP,
        })
        .await
        .expect("store answers");
    (id, decision)
}

fn admitted(d: &Decision) -> bool {
    matches!(d, Decision::Admitted(_))
}

async fn window_limit_refuses_with_the_time_until_a_slot_frees(store: &dyn Store) {
    let scopes = [user(&[(60_000, 3)], None, None)];
    for n in 1..=3 {
        let (_, d) = admit(store, &scopes, None).await;
        let Decision::Admitted(w) = d else {
            panic!("charge {n} refused: {d:?}")
        };
        assert_eq!((w[0].used, w[0].remaining()), (n, 3 - n));
    }
    let (_, d) = admit(store, &scopes, None).await;
    let Decision::Refused(r) = d else {
        panic!("fourth admitted")
    };
    assert_eq!(
        r.limit,
        Limit::Window {
            seconds: 60,
            images: 3
        }
    );
    let retry = r.retry_after.expect("a window knows when it frees");
    assert!(
        retry > Duration::from_secs(55) && retry <= Duration::from_secs(60),
        "{retry:?}"
    );
}

async fn every_scope_is_charged_or_none(store: &dyn Store) {
    let org = Scope {
        subject: Scope::org_subject(&fresh("o")),
        windows: vec![(60_000, 2)],
        rate: None,
        max_in_flight: None,
    };
    let ana = [user(&[(60_000, 5)], None, None), org.clone()];
    let bo = [user(&[(60_000, 5)], None, None), org.clone()];
    assert!(admitted(&admit(store, &ana, None).await.1));
    assert!(admitted(&admit(store, &bo, None).await.1));
    // The pool is empty: ana is refused by the org's limit, and her own window is not charged.
    let (_, d) = admit(store, &ana, None).await;
    let Decision::Refused(r) = d else {
        panic!("pool overdrawn")
    };
    assert_eq!(r.subject, org.subject);
    let usage = store.usage(&ana).await.unwrap();
    assert_eq!(usage.windows[0].used, 1, "refusal charged the user window");
    assert_eq!(usage.windows[1].used, 2);
}

async fn refunds_happen_exactly_once(store: &dyn Store) {
    let scopes = [user(&[(60_000, 1), (3_600_000, 5)], None, Some(2))];
    let (id, d) = admit(store, &scopes, None).await;
    assert!(admitted(&d));
    assert!(!admitted(&admit(store, &scopes, None).await.1), "limit 1");
    let refund = |s| store.settle(&id, None, &scopes, s);
    assert!(refund(Settlement::Refund).await.unwrap(), "first refund");
    assert!(!refund(Settlement::Refund).await.unwrap(), "retried refund");
    assert!(
        !refund(Settlement::Commit).await.unwrap(),
        "commit after refund"
    );
    let usage = store.usage(&scopes).await.unwrap();
    assert_eq!(
        usage.windows.iter().map(|w| w.used).collect::<Vec<_>>(),
        [0, 0]
    );
    assert_eq!(usage.in_flight[0].1, 0);
    // Committed charges stand, whatever later refunds say.
    let (id, _) = admit(store, &scopes, None).await;
    assert!(store
        .settle(&id, None, &scopes, Settlement::Commit)
        .await
        .unwrap());
    assert!(!store
        .settle(&id, None, &scopes, Settlement::Refund)
        .await
        .unwrap());
    assert_eq!(store.usage(&scopes).await.unwrap().windows[0].used, 1);
}

async fn concurrent_requests_never_exceed_a_limit(store: Arc<dyn Store>) {
    let scopes = Arc::new([user(&[(60_000, 3)], None, None)]);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (store, scopes) = (store.clone(), scopes.clone());
            tokio::spawn(async move { admitted(&admit(&*store, &*scopes, None).await.1) })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += usize::from(t.await.unwrap());
    }
    assert_eq!(n, 3);
}

async fn idempotency_makes_retries_free_until_refunded(store: &dyn Store) {
    let scopes = [user(&[(60_000, 5)], None, None)];
    let key = fresh("idem");
    let (first, d) = admit(store, &scopes, Some(&key)).await;
    assert!(admitted(&d));
    let (_, again) = admit(store, &scopes, Some(&key)).await;
    assert_eq!(
        again,
        Decision::Duplicate {
            charge_id: first.clone()
        }
    );
    assert_eq!(store.usage(&scopes).await.unwrap().windows[0].used, 1);
    store.save_result(&first, b"image", KEEP).await.unwrap();
    assert_eq!(
        store.result(&first).await.unwrap().as_deref(),
        Some(&b"image"[..])
    );
    // A refunded request frees its key: the retry is charged once, as new.
    store
        .settle(&first, Some(&key), &scopes, Settlement::Refund)
        .await
        .unwrap();
    let (_, d) = admit(store, &scopes, Some(&key)).await;
    assert!(admitted(&d));
    assert_eq!(store.usage(&scopes).await.unwrap().windows[0].used, 1);
    assert_eq!(store.result("no-such-charge").await.unwrap(), None);
}

async fn the_rate_allows_a_burst_then_one_per_interval(store: &dyn Store) {
    let scopes = [user(&[], Some((300, 2)), None)];
    assert!(admitted(&admit(store, &scopes, None).await.1));
    assert!(admitted(&admit(store, &scopes, None).await.1));
    let (_, d) = admit(store, &scopes, None).await;
    let Decision::Refused(r) = d else {
        panic!("burst exceeded")
    };
    assert_eq!(r.limit.kind(), "rate");
    assert!(r.retry_after.unwrap() <= Duration::from_millis(300));
    tokio::time::sleep(r.retry_after.unwrap() + Duration::from_millis(20)).await;
    assert!(admitted(&admit(store, &scopes, None).await.1));
}

async fn in_flight_slots_free_on_settle_or_lease_expiry(store: &dyn Store) {
    let scopes = [user(&[], None, Some(1))];
    let (id, _) = admit(store, &scopes, None).await;
    let (_, d) = admit(store, &scopes, None).await;
    let Decision::Refused(r) = d else {
        panic!("two in flight")
    };
    assert_eq!((r.limit, r.retry_after), (Limit::InFlight { max: 1 }, None));
    store
        .settle(&id, None, &scopes, Settlement::Commit)
        .await
        .unwrap();
    // A gateway that dies without settling leaks nothing: the lease runs out.
    let short = Charge {
        charge_id: "lease-test",
        idempotency: None,
        scopes: &scopes,
        lease: Duration::from_millis(300),
        retention: KEEP,
    };
    assert!(admitted(&store.admit(&short).await.unwrap()));
    assert!(!admitted(&admit(store, &scopes, None).await.1));
    // Renewal keeps the slot past the first lease...
    tokio::time::sleep(Duration::from_millis(150)).await;
    store
        .renew("lease-test", &scopes, Duration::from_millis(400))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!admitted(&admit(store, &scopes, None).await.1));
    // ...and without renewals it expires.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(admitted(&admit(store, &scopes, None).await.1));
}

async fn windows_roll(store: &dyn Store) {
    let scopes = [user(&[(1_000, 1)], None, None)];
    assert!(admitted(&admit(store, &scopes, None).await.1));
    let (_, d) = admit(store, &scopes, None).await;
    let Decision::Refused(r) = d else {
        panic!("over the limit")
    };
    tokio::time::sleep(r.retry_after.unwrap() + Duration::from_millis(30)).await;
    assert!(admitted(&admit(store, &scopes, None).await.1));
}

async fn keys_are_created_listed_and_revoked(store: &dyn Store) {
    let id = fresh("k");
    let record = KeyRecord {
        id: id.clone(),
        user: "ana".into(),
        org: Some("acme".into()),
        tier: "team".into(),
        created_unix: 1,
    };
    let digest = fresh("digest");
    store.create_key(&digest, &record).await.unwrap();
    assert!(store.create_key("other", &record).await.is_err(), "same id");
    assert_eq!(
        store.lookup_key(&digest).await.unwrap(),
        Some(record.clone())
    );
    assert!(store.list_keys().await.unwrap().contains(&record));
    assert!(store.revoke_key(&id).await.unwrap());
    assert!(!store.revoke_key(&id).await.unwrap());
    assert_eq!(store.lookup_key(&digest).await.unwrap(), None);
}

async fn tiers_round_trip(store: &dyn Store) {
    store.set_tiers("[tiers]\n").await.unwrap();
    assert_eq!(store.tiers().await.unwrap().as_deref(), Some("[tiers]\n"));
}

macro_rules! for_both_stores {
    ($($name:ident),* $(,)?) => {
        mod in_memory {
            $(#[tokio::test]
            async fn $name() {
                super::$name(&kiln_quota::MemoryStore::new()).await
            })*
        }
        mod on_redis {
            $(#[tokio::test]
            async fn $name() {
                let server = kiln_testkit::RedisServer::start();
                super::$name(&super::redis_store(&server)).await
            })*
        }
        mod on_redis_cluster {
            $(#[tokio::test]
            async fn $name() {
                let cluster = kiln_testkit::RedisCluster::start(3, 0);
                super::$name(&super::cluster_store(&cluster)).await
            })*
        }
    };
}

fn cluster_store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::new(RedisConfig::new(cluster.url())).expect("cluster url")
}

for_both_stores!(
    window_limit_refuses_with_the_time_until_a_slot_frees,
    every_scope_is_charged_or_none,
    refunds_happen_exactly_once,
    idempotency_makes_retries_free_until_refunded,
    the_rate_allows_a_burst_then_one_per_interval,
    in_flight_slots_free_on_settle_or_lease_expiry,
    windows_roll,
    keys_are_created_listed_and_revoked,
    tiers_round_trip,
);

fn redis_store(server: &RedisServer) -> RedisStore {
    RedisStore::new(RedisConfig::new(server.url())).expect("redis url")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_concurrent_requests_never_exceed_a_limit() {
    concurrent_requests_never_exceed_a_limit(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_requests_never_exceed_a_limit() {
    let server = RedisServer::start();
    concurrent_requests_never_exceed_a_limit(Arc::new(redis_store(&server))).await;
}

/// Two gateways are two stores on one Redis: limits hold across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_the_limits() {
    let server = RedisServer::start();
    let gateways = [redis_store(&server), redis_store(&server)];
    let scopes = [user(&[(60_000, 3)], None, Some(10))];
    let mut n = 0;
    for i in 0..20 {
        n += usize::from(admitted(&admit(&gateways[i % 2], &scopes, None).await.1));
    }
    assert_eq!(n, 3);
}

#[tokio::test]
async fn an_outage_is_reported_and_the_store_recovers_without_a_new_client() {
    let mut server = RedisServer::start();
    let store = redis_store(&server);
    let scopes = [user(&[(60_000, 10)], None, None)];
    assert!(admitted(&admit(&store, &scopes, None).await.1));
    server.kill();
    let id = fresh("c");
    let charge = Charge {
        charge_id: &id,
        idempotency: None,
        scopes: &scopes,
        lease: LEASE,
        retention: KEEP,
    };
    let started = std::time::Instant::now();
    let err = store.admit(&charge).await.unwrap_err();
    assert!(
        matches!(err, kiln_quota::QuotaError::Unavailable(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "outage answered slowly"
    );
    server.restart();
    // The restarted server has lost the scripts and the data; the client reloads and reconnects.
    let mut recovered = false;
    for _ in 0..50 {
        if let Ok(d) = store.admit(&charge).await {
            assert!(admitted(&d));
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "store did not recover after Redis came back");
}

/// Nothing a charge writes lives forever: every quota key carries a TTL.
#[tokio::test]
async fn every_quota_key_expires_by_itself() {
    let server = RedisServer::start();
    let store = redis_store(&server);
    let scopes = [user(&[(60_000, 3)], Some((1000, 2)), Some(2))];
    let (id, _) = admit(&store, &scopes, Some("idem-ttl")).await;
    store.save_result(&id, b"png", KEEP).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.len() >= 5, "{keys:?}");
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has no expiry");
    }
}

/// A Redis Cluster's primary fails over in the middle of traffic: the store follows the slots to
/// the promoted replica, and limits and settlements hold across it (a manual failover loses no
/// acknowledged write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_keeps_every_charge() {
    let cluster = RedisCluster::start(3, 1);
    let store = cluster_store(&cluster);
    // Users spread over the slots, each with room for 4 images.
    let users: Vec<Scope> = (0..12)
        .map(|i| Scope {
            subject: format!("user:fo-{i}-{}", fresh("u")),
            ..user(&[(600_000, 4)], None, None)
        })
        .collect();
    let mut refund = Vec::new();
    for scope in &users {
        for _ in 0..2 {
            let (id, d) = admit(&store, std::slice::from_ref(scope), None).await;
            assert!(admitted(&d));
            refund.push((id, scope.clone()));
        }
    }
    let old_primary = cluster.fail_over();
    assert!(!cluster.primaries().contains(&old_primary));
    // One charge of each user is refunded after the failover; then each has room for 3 more.
    for (id, scope) in refund.iter().step_by(2) {
        let mut settled = None;
        for _ in 0..50 {
            match store
                .settle(id, None, std::slice::from_ref(scope), Settlement::Refund)
                .await
            {
                Ok(s) => {
                    settled = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert_eq!(settled, Some(true), "refund of {id} after the failover");
    }
    for scope in &users {
        let mut admitted_now = 0;
        for _ in 0..5 {
            if admitted(&admit(&store, std::slice::from_ref(scope), None).await.1) {
                admitted_now += 1;
            }
        }
        assert_eq!(admitted_now, 3, "{}", scope.subject);
    }
}
