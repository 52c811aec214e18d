//! Admission end to end against a real `redis-server`: API keys made with `kiln admin`, quotas shared
//! by two gateway processes, the org pool, revocation, tier changes at run time, refunds, idempotent
//! retries, the content policy, and a Redis outage in the middle of traffic.

use std::time::Duration;

use futures::StreamExt;
use kiln_e2e::{completed, with_key, Cluster, Options, Preset};
use kiln_proto::v1::{GenerateEvent, GenerateRequest, GetQuotaRequest, QuotaStatus};
use kiln_testkit::RedisServer;
use tonic::Code;
use tonic_types::StatusExt;

/// A quick request (64x64 is a size of both test models).
fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        width: 64,
        height: 64,
        ..Default::default()
    }
}

/// A request that takes seconds on the 20M model.
fn slow_request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        width: 256,
        height: 256,
        ..request(prompt)
    }
}

/// Generous limits for every tier but the ones a test sets.
fn tiers(free: &str, team: &str, org: &str) -> String {
    format!(
        r#"
[tiers.free]
{free}
[tiers.plus]
windows = [{{ seconds = 86400, images = 1000 }}]
[tiers.pro]
windows = [{{ seconds = 86400, images = 1000 }}]
when_store_down = "open"
[tiers.team]
{team}
org_pool = true
[org]
{org}
"#
    )
}

async fn quota(cluster: &Cluster, gateway: usize, key: &str) -> Result<QuotaStatus, tonic::Status> {
    cluster
        .client_at(gateway)
        .await
        .get_quota(with_key(key, GetQuotaRequest {}))
        .await
        .map(|r| r.into_inner())
}

async fn used(cluster: &Cluster, key: &str) -> u32 {
    quota(cluster, 0, key).await.expect("GetQuota").windows[0].used
}

async fn start(gateways: usize, redis: &RedisServer, tiers: String) -> Cluster {
    Cluster::start_with(Options {
        gateways,
        redis: Some(redis.url()),
        tiers,
        ..Default::default()
    })
    .await
}

async fn fifty_requests_three_admitted(gateways: usize) {
    let redis = RedisServer::start();
    let free = "windows = [{ seconds = 86400, images = 3 }]";
    let cluster = start(gateways, &redis, tiers(free, free, "")).await;
    let (_, key) = cluster.create_key("ana", "free", None);
    let runs = (0..50).map(|i| {
        let (cluster, key) = (&cluster, key.clone());
        async move {
            cluster
                .generate_as(i % gateways, &key, request("a red star"))
                .await
        }
    });
    let results = futures::future::join_all(runs).await;
    let mut images = 0;
    for result in results {
        match result {
            Ok(events) => {
                assert!(completed(&events).is_some());
                images += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let retry = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("retry info");
                assert!(
                    retry > Duration::from_secs(86_000) && retry <= Duration::from_secs(86_400),
                    "a free user waits for the day's window: {retry:?}"
                );
                let failure = status.get_details_quota_failure().expect("quota failure");
                assert_eq!(failure.violations[0].subject, "user:ana:window");
                assert_eq!(status.metadata().get("x-ratelimit-remaining").unwrap(), "0");
            }
        }
    }
    assert_eq!(images, 3, "exactly the limit is admitted");
    let status = quota(&cluster, 0, &key).await.unwrap();
    assert_eq!(
        (status.windows[0].used, status.windows[0].remaining),
        (3, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_free_requests_admit_exactly_three() {
    fifty_requests_three_admitted(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_free_requests_admit_exactly_three_across_two_gateways() {
    fifty_requests_three_admitted(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_pool_revocation_and_tier_changes_at_run_time() {
    let redis = RedisServer::start();
    let team = "windows = [{ seconds = 86400, images = 100 }]";
    let pool = |n: u32| format!("windows = [{{ seconds = 86400, images = {n} }}]");
    let cluster = start(2, &redis, tiers(team, team, &pool(2))).await;
    let (_, ana) = cluster.create_key("ana", "team", Some("acme"));
    let (bo_id, bo) = cluster.create_key("bo", "team", Some("acme"));

    // Two members share the pool of two images.
    cluster
        .generate_as(0, &ana, request("a red star"))
        .await
        .unwrap();
    cluster
        .generate_as(1, &bo, request("a blue circle"))
        .await
        .unwrap();
    let refused = cluster
        .generate_as(0, &ana, request("a green square"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let failure = refused.get_details_quota_failure().unwrap();
    assert_eq!(failure.violations[0].subject, "org:acme:window");
    let status = quota(&cluster, 1, &ana).await.unwrap();
    assert_eq!(status.organisation, "acme");
    assert_eq!(status.windows[0].used, 1, "ana's own window");
    assert_eq!(status.windows[1].used, 2, "the pool");

    // A revoked key stops working on every gateway at once.
    cluster.admin(&["keys", "revoke", &bo_id]);
    for gateway in 0..2 {
        let err = quota(&cluster, gateway, &bo).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert!(!cluster.admin(&["keys", "list"]).contains(&bo_id));

    // A bigger pool stored by an operator reaches both gateways within their refresh period.
    let file = cluster.dir.path().join("bigger.toml");
    std::fs::write(&file, tiers(team, team, &pool(3))).unwrap();
    cluster.admin(&["tiers", "set", file.to_str().unwrap()]);
    let mut admitted = false;
    for _ in 0..50 {
        if quota(&cluster, 1, &ana).await.unwrap().windows[1].limit == 3 {
            admitted = cluster
                .generate_as(1, &ana, request("a star"))
                .await
                .is_ok();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "the new pool size did not take effect");
    // An invalid table is refused by the admin command and changes nothing.
    std::fs::write(
        &file,
        "[tiers.free]\nwindows = [{ seconds = 0, images = 1 }]\n",
    )
    .unwrap();
    let out = std::process::Command::new(kiln_e2e::kiln_bin())
        .args(["admin", "--redis", &redis.url(), "tiers", "set"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tiers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_failed_requests_are_refunded_and_retries_are_free() {
    let redis = RedisServer::start();
    let free = "windows = [{ seconds = 86400, images = 5 }]";
    let mut cluster = Cluster::start_with(Options {
        preset: Preset::TwentyM,
        redis: Some(redis.url()),
        tiers: tiers(free, free, ""),
        gateway_args: vec!["--request-deadline".into(), "8".into()],
        ..Default::default()
    })
    .await;
    let (_, key) = cluster.create_key("cy", "free", None);

    // An idempotent retry returns the same image and is not charged again.
    let once = GenerateRequest {
        idempotency_key: "order-1".into(),
        ..request("a red star")
    };
    let first = cluster.generate_as(0, &key, once.clone()).await.unwrap();
    let again = cluster.generate_as(0, &key, once).await.unwrap();
    assert_eq!(
        completed(&first).unwrap().png,
        completed(&again).unwrap().png
    );
    assert_eq!(used(&cluster, &key).await, 1);

    // The response carries the quota left.
    let response = cluster
        .client()
        .await
        .generate(with_key(&key, request("a blue star")))
        .await
        .unwrap();
    assert_eq!(response.metadata().get("x-ratelimit-limit").unwrap(), "5");
    assert_eq!(
        response.metadata().get("x-ratelimit-remaining").unwrap(),
        "3"
    );
    let events: Vec<Result<GenerateEvent, _>> = response.into_inner().collect().await;
    assert!(events.iter().all(|e| e.is_ok()));
    assert_eq!(used(&cluster, &key).await, 2);

    // A policy refusal charges nothing.
    let refused = cluster
        .generate_as(
            0,
            &key,
            request("a portrait in the style of Greg Rutkowski"),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(info.reason, "POLICY_REFUSED");
    assert_eq!(info.metadata["artist"], "Greg Rutkowski");
    assert_eq!(
        refused.metadata().get("x-ratelimit-remaining").unwrap(),
        "3",
        "every answer carries the quota left"
    );
    assert_eq!(used(&cluster, &key).await, 2);

    // Cancelled before the image: refunded.
    let mut stream = cluster
        .client()
        .await
        .generate(with_key(&key, slow_request("a slow red star")))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    assert_eq!(used(&cluster, &key).await, 3);
    drop(stream);
    wait_for(
        || async { used(&cluster, &key).await == 2 },
        "cancel refund",
    )
    .await;

    // Failed (the only worker dies, the request runs out of time): refunded.
    let mut stream = cluster
        .client()
        .await
        .generate(with_key(&key, slow_request("a doomed star")))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    cluster.kill("worker-0");
    let mut last = None;
    while let Some(event) = stream.next().await {
        if let Err(status) = event {
            last = Some(status);
        }
    }
    assert!(last.is_some(), "the request ended with an error");
    wait_for(
        || async { used(&cluster, &key).await == 2 },
        "failure refund",
    )
    .await;
}

async fn wait_for<F, Fut>(mut condition: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_closed_or_open_as_configured_and_recovers() {
    let mut redis = RedisServer::start_persistent();
    let free = "windows = [{ seconds = 86400, images = 100 }]";
    let cluster = start(1, &redis, tiers(free, free, "")).await;
    let (_, free_key) = cluster.create_key("fay", "free", None);
    let (_, pro_key) = cluster.create_key("pat", "pro", None);
    cluster
        .generate_as(0, &free_key, request("a star"))
        .await
        .unwrap();
    cluster
        .generate_as(0, &pro_key, request("a star"))
        .await
        .unwrap();

    redis.kill();
    // Free fails closed: nothing is admitted, and the caller is told to retry.
    let err = cluster
        .generate_as(0, &free_key, request("a star"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.get_details_retry_info().is_some());
    // Pro fails open on the gateway's own limiter.
    let events = cluster
        .generate_as(0, &pro_key, request("a star"))
        .await
        .expect("pro admitted while Redis is down");
    assert!(completed(&events).is_some());

    redis.restart();
    // No gateway restart: the next requests reach Redis again.
    let mut recovered = false;
    for _ in 0..50 {
        if cluster
            .generate_as(0, &free_key, request("a star"))
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "free tier did not recover after Redis returned");
    assert_eq!(
        used(&cluster, &free_key).await,
        2,
        "charges survived in Redis"
    );
}

/// Two gateways on a Redis Cluster (`--redis redis+cluster://...`): keys made with `kiln admin`
/// against the cluster work, and a user's window holds across the gateways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_quotas_on_a_redis_cluster() {
    let redis = kiln_testkit::RedisCluster::start(3, 0);
    let cluster = Cluster::start_with(Options {
        gateways: 2,
        redis: Some(redis.url()),
        tiers: tiers(
            "windows = [{ seconds = 86400, images = 2 }]",
            "windows = [{ seconds = 86400, images = 100 }]",
            "windows = [{ seconds = 86400, images = 100 }]",
        ),
        ..Default::default()
    })
    .await;
    let (_, key) = cluster.create_key("cluster-user", "free", None);
    for gateway in 0..2 {
        let events = cluster
            .generate_as(gateway, &key, request("a red star"))
            .await
            .expect("an image");
        assert!(completed(&events).is_some());
    }
    assert_eq!(used(&cluster, &key).await, 2);
    let refused = cluster
        .generate_as(1, &key, request("a red star"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
}
