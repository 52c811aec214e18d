//! The cluster under faults, with a real etcd: workers register themselves, two scheduler replicas
//! elect a leader, and the gateway follows it. A worker and then the leading scheduler are killed
//! with SIGKILL in the middle of a mixed load: every request ends once, with its image or with a
//! status the caller can retry, and none is lost. A leader paused (SIGSTOP) until a successor leads
//! is fenced off when it wakes: the worker refuses its calls. Overload is shed with retry delays,
//! higher tiers first served.

use std::time::{Duration, Instant};

use kiln_e2e::{completed, Cluster, Options, Preset};
use kiln_proto::v1::{generate_event, GenerateRequest};
use kiln_testkit::EtcdServer;
use tonic::Code;
use tonic_types::StatusExt;

fn request(size: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: format!("a red star number {seed}"),
        width: size,
        height: size,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_and_the_leader_loses_no_request() {
    let etcd = EtcdServer::start();
    let mut cluster = Cluster::start_with(Options {
        workers: 3,
        preset: Preset::TwentyM,
        schedulers: 2,
        etcd: Some(etcd.endpoint()),
        gateway_args: vec!["--request-deadline".into(), "120".into()],
        ..Default::default()
    })
    .await;
    let leader = cluster.leader_status().await.expect("a leader");
    let leader_name = if leader.scheduler == cluster.schedulers[0] {
        "scheduler"
    } else {
        "scheduler-1"
    };

    let runs: Vec<_> = (0..18u64)
        .map(|i| {
            let gateway = cluster.gateway.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100 * i)).await;
                let size = if i % 3 == 0 { 128 } else { 64 };
                let mut client =
                    kiln_proto::v1::image_service_client::ImageServiceClient::connect(gateway)
                        .await
                        .unwrap()
                        .max_decoding_message_size(64 << 20);
                let mut stream = client
                    .generate(kiln_e2e::authed(request(size, i + 1)))
                    .await?
                    .into_inner();
                let mut events = Vec::new();
                while let Some(e) = stream.message().await? {
                    events.push(e);
                }
                Ok::<_, tonic::Status>(events)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.kill("worker-0");
    tokio::time::sleep(Duration::from_millis(900)).await;
    cluster.kill(leader_name);

    let (mut images, mut retryable) = (0, 0);
    for run in runs {
        match run.await.unwrap() {
            Ok(events) => {
                let finished = events
                    .iter()
                    .filter(|e| matches!(e.event, Some(generate_event::Event::Completed(_))))
                    .count();
                assert_eq!(finished, 1, "exactly one image per request");
                assert!(completed(&events).is_some());
                images += 1;
            }
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
                    ),
                    "not retryable: {status:?}"
                );
                retryable += 1;
            }
        }
    }
    eprintln!("failover: {images} images, {retryable} retryable errors of 18 requests");
    assert_eq!(images + retryable, 18);
    assert!(
        images >= 12,
        "only {images} images, {retryable} retryable errors"
    );

    // The standby leads now and sees the two live workers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = cluster.leader_status().await {
            if status.workers.len() == 2 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no new leader with 2 workers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_off_when_it_wakes() {
    let etcd = EtcdServer::start();
    let cluster = Cluster::start_with(Options {
        workers: 1,
        preset: Preset::TwentyM,
        schedulers: 2,
        etcd: Some(etcd.endpoint()),
        metrics: true,
        // One step per call: the paused leader has a call to make the moment it wakes.
        scheduler_args: vec!["--max-steps-per-call".into(), "1".into()],
        gateway_args: vec!["--request-deadline".into(), "120".into()],
        ..Default::default()
    })
    .await;
    let old = cluster.leader_status().await.expect("a leader");
    let (old_name, new_name) = if old.scheduler == cluster.schedulers[0] {
        ("scheduler", "scheduler-1")
    } else {
        ("scheduler-1", "scheduler")
    };
    let fenced = || {
        let page = cluster.scrape("worker-0");
        page.lines()
            .find(|l| l.starts_with("kiln_worker_fenced_calls_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .expect("the fenced-calls series is exported from start-up")
    };
    assert_eq!(fenced(), 0.0);
    // Long images keep the leader calling the worker.
    let runs: Vec<_> = (0..2u64)
        .map(|i| {
            let gateway = cluster.gateway.clone();
            tokio::spawn(async move {
                let mut client =
                    kiln_proto::v1::image_service_client::ImageServiceClient::connect(gateway)
                        .await
                        .unwrap()
                        .max_decoding_message_size(64 << 20);
                let mut stream = client
                    .generate(kiln_e2e::authed(request(256, i + 1)))
                    .await?
                    .into_inner();
                while stream.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.signal(old_name, "STOP");
    // The standby is elected once the paused leader's lease lapses, and takes the worker over.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = cluster.leader_status().await {
            if status.scheduler != old.scheduler && status.workers.len() == 1 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "{new_name} did not take over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.signal(old_name, "CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fenced() == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the woken leader's calls were not refused; worker log:\n{}",
            cluster.log("worker-0")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cluster
        .log("worker-0")
        .contains("refused a call from a deposed leader"));
    // The callers still end: each with its image or with a status they can retry.
    for run in runs {
        if let Err(status) = run.await.unwrap() {
            assert!(
                matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
                "{status:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_retry_delays_and_admitted_requests_finish_in_time() {
    // The worker speculates: its passes advance sequences by a varying number of tokens, which the
    // scheduler's predictions must follow.
    let cluster = Cluster::start_with(Options {
        workers: 1,
        preset: Preset::TwentyM,
        worker_args: vec!["--speculation".into(), "8".into()],
        gateway_args: vec!["--request-deadline".into(), "120".into()],
        ..Default::default()
    })
    .await;
    // Warm up so the scheduler has measured the worker's throughput.
    cluster.generate(request(64, 1)).await.unwrap();
    // The tiny deadline of the test cluster's default (90 s for free) is not reached by a few
    // images; the bound that matters here is the queue, so offer far more than one worker can do
    // in the pro deadline: 60 images of 256x256 (1024 tokens each) at once.
    let started = Instant::now();
    let runs: Vec<_> = (0..60u64)
        .map(|i| {
            let gateway = cluster.gateway.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let mut client =
                    kiln_proto::v1::image_service_client::ImageServiceClient::connect(gateway)
                        .await
                        .unwrap()
                        .max_decoding_message_size(64 << 20);
                let result = async {
                    let mut stream = client
                        .generate(kiln_e2e::authed(request(256, i + 2)))
                        .await?
                        .into_inner();
                    while stream.message().await?.is_some() {}
                    Ok::<_, tonic::Status>(())
                }
                .await;
                (result, t.elapsed())
            })
        })
        .collect();
    let (mut done, mut shed) = (0, 0);
    for run in runs {
        let (result, took) = run.await.unwrap();
        match result {
            Ok(()) => {
                done += 1;
                // Admitted requests finish within the pro deadline (45 s) plus slack for this
                // shared machine.
                assert!(
                    took < Duration::from_secs(70),
                    "admitted request took {took:?}"
                );
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let retry = status.get_details_retry_info().and_then(|r| r.retry_delay);
                assert!(
                    retry.is_some_and(|d| d >= Duration::from_secs(1)),
                    "{status:?}"
                );
                shed += 1;
            }
        }
    }
    assert!(
        shed > 0,
        "nothing shed at many times capacity ({done} done)"
    );
    assert!(done > 0, "everything shed");
    let status = cluster.leader_status().await.unwrap();
    let pro = status.tiers.iter().find(|t| t.tier == "pro").unwrap();
    assert_eq!(pro.shed_total, shed as u64);
    eprintln!(
        "overload: {done} admitted, {shed} shed in {:?}",
        started.elapsed()
    );
}
