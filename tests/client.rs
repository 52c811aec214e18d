//! `kiln-client` against a real cluster and Redis: refusals come back unchanged, an idempotent
//! retry is not charged twice, `RetryInfo` is honoured (never sooner) and the budget ends retries
//! with the last status.

use std::time::{Duration, Instant};

use kiln_client::{Client, Request, RetryPolicy};
use kiln_e2e::{Cluster, Options};
use kiln_testkit::RedisServer;
use tonic::Code;

const TIERS: &str = r#"
[tiers.free]
windows = [{ seconds = 86400, images = 2 }]
[tiers.plus]
windows = [{ seconds = 86400, images = 100 }]
[tiers.pro]
windows = [{ seconds = 86400, images = 100 }]
[tiers.team]
windows = [{ seconds = 86400, images = 100 }]
"#;

async fn cluster(redis: &RedisServer) -> Cluster {
    Cluster::start_with(Options {
        redis: Some(redis.url()),
        tiers: TIERS.into(),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_back_unchanged_and_retries_are_not_charged_twice() {
    let redis = RedisServer::start();
    let cluster = cluster(&redis).await;
    let (_, key) = cluster.create_key("ana", "free", None);
    let client = Client::connect(&cluster.gateway, &key).await.unwrap();

    let first = client
        .generate(Request::new("a red star").size(32).idempotency_key("job-1"))
        .await
        .unwrap();
    // The same key again (what the client sends on a retry): the same image, no new charge.
    let again = client
        .generate(Request::new("a red star").size(32).idempotency_key("job-1"))
        .await
        .unwrap();
    assert_eq!(first.png, again.png);
    assert_eq!(client.quota().await.unwrap().windows[0].used, 1);

    let policy = client
        .generate(Request::new("a castle by Greg Rutkowski"))
        .await
        .unwrap_err();
    assert_eq!(policy.status().unwrap().code(), Code::PermissionDenied);
    assert_eq!(policy.reason().as_deref(), Some("POLICY_REFUSED"));

    client
        .generate(Request::new("a blue star").size(32))
        .await
        .unwrap();
    let started = Instant::now();
    let quota = client
        .generate(Request::new("a green star").size(32))
        .await
        .unwrap_err();
    assert_eq!(quota.status().unwrap().code(), Code::ResourceExhausted);
    assert_eq!(quota.reason().as_deref(), Some("QUOTA_EXHAUSTED"));
    assert!(
        matches!(quota, kiln_client::Error::Status { attempts: 1, .. }),
        "a quota that resets tomorrow is not retried: {quota}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(client.quota().await.unwrap().windows[0].used, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_info_is_honoured_and_the_budget_ends_retries() {
    let mut redis = RedisServer::start();
    let cluster = cluster(&redis).await;
    let (_, key) = cluster.create_key("bo", "free", None);
    let budget = Duration::from_millis(3500);
    let client = Client::connect(&cluster.gateway, &key)
        .await
        .unwrap()
        .with_retry(RetryPolicy {
            max_attempts: 20,
            budget,
            ..Default::default()
        });
    // Known to the gateway, then Redis goes: the free tier fails closed with RetryInfo of 1 s.
    client.quota().await.unwrap();
    redis.kill();
    let started = Instant::now();
    let err = client
        .generate(Request::new("a star").size(32))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    let kiln_client::Error::Status { status, attempts } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "the last status: {status:?}"
    );
    assert!(*attempts >= 3, "only {attempts} attempts in {elapsed:?}");
    // Never sooner than asked: attempts are at least 1 s apart.
    assert!(
        elapsed >= Duration::from_secs(u64::from(attempts - 1)),
        "{attempts} attempts in {elapsed:?}"
    );
    assert!(
        elapsed < budget + Duration::from_secs(2),
        "went past its budget: {elapsed:?}"
    );
}
