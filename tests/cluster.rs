//! End-to-end: gateway, scheduler and workers as separate `kiln` processes on loopback, driven over
//! real gRPC the way an internal service drives them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_e2e::{authed, completed, pixels, png_size, Cluster, Options, Preset};
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::worker_client::WorkerClient;
use kiln_proto::v1::{
    generate_event, ClusterStatusRequest, GenerateRequest, InfoRequest, SamplingParams,
};
use tonic::Code;

fn request(prompt: &str, size: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        width: size,
        height: size,
        sampling: Some(SamplingParams {
            temperature: 1.0,
            has_temperature: true,
            top_k: 40,
            top_p: 0.95,
            seed,
            speculation: None,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_complete_across_two_worker_processes() {
    let cluster = Cluster::start(2, Preset::Tiny).await;
    let sizes = [16u32, 32, 64, 32, 16, 64, 32, 32];
    let runs = sizes.iter().enumerate().map(|(i, &size)| {
        let cluster = &cluster;
        async move {
            (
                size,
                cluster
                    .generate(request(&format!("shape number {i}"), size, i as u64 + 1))
                    .await,
            )
        }
    });
    let results = futures::future::join_all(runs).await;
    let mut workers = HashSet::new();
    for (size, result) in results {
        let events = result.expect("generation succeeds");
        assert!(
            matches!(events[0].event, Some(generate_event::Event::Queued(_))),
            "first event is queued: {:?}",
            events[0]
        );
        for e in &events {
            if let Some(generate_event::Event::Started(s)) = &e.event {
                workers.insert(s.worker.clone());
            }
        }
        let last_progress = events.iter().rev().find_map(|e| match &e.event {
            Some(generate_event::Event::Progress(p)) => Some(*p),
            _ => None,
        });
        let tokens = (size / 8) * (size / 8);
        let p = last_progress.expect("progress events");
        assert_eq!((p.tokens_done, p.tokens_total), (tokens, tokens));
        let image = completed(&events).expect("an image");
        assert_eq!(png_size(&image.png), (size, size));
        assert_eq!((image.width, image.height), (size, size));
        assert_eq!(image.usage.as_ref().map(|u| u.image_tokens), Some(tokens));
    }
    assert_eq!(
        workers.len(),
        2,
        "both workers served requests: {workers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_draws_the_same_image_alone_or_in_a_crowd_speculating_or_not() {
    // The workers speculate (8 tokens a pass); a request can turn it off, and the image is the
    // same either way.
    let cluster = Cluster::start_with(Options {
        workers: 2,
        preset: Preset::Tiny,
        worker_args: vec!["--speculation".into(), "8".into()],
        metrics: true,
        ..Default::default()
    })
    .await;
    let alone = cluster
        .generate(request("a blue star", 64, 42))
        .await
        .unwrap();
    let alone = pixels(&completed(&alone).unwrap().png);
    let mut plain = request("a blue star", 64, 42);
    plain.sampling.as_mut().unwrap().speculation = Some(1);
    let plain = cluster.generate(plain).await.unwrap();
    assert_eq!(
        pixels(&completed(&plain).unwrap().png),
        alone,
        "speculation off for the request: the same pixels"
    );

    let mut crowd: Vec<_> = (0..6)
        .map(|i| request(&format!("noise {i}"), [16, 32, 64][i % 3], 100 + i as u64))
        .collect();
    crowd.insert(3, request("a blue star", 64, 42));
    let results = futures::future::join_all(crowd.into_iter().map(|r| cluster.generate(r))).await;
    let together = pixels(&completed(results[3].as_ref().unwrap()).unwrap().png);
    assert_eq!(
        alone, together,
        "same prompt and seed, different batch companions, same pixels"
    );

    let other = cluster
        .generate(request("a blue star", 64, 43))
        .await
        .unwrap();
    assert_ne!(
        pixels(&completed(&other).unwrap().png),
        alone,
        "another seed draws another image"
    );
    // Each worker counts its images' forward passes: no more than their tokens (the plain
    // request's 64 passes for 64 tokens among them), at least one pass per image.
    let (mut images, mut passes) = (0.0, 0.0);
    for worker in ["worker-0", "worker-1"] {
        let page = cluster.scrape(worker);
        images += metric(&page, "kiln_worker_forward_passes_per_image_count");
        passes += metric(&page, "kiln_worker_forward_passes_per_image_sum");
        assert!(page.contains("kiln_worker_accepted_tokens_per_pass_bucket"));
    }
    // Alone, plain, the crowd of seven, another seed.
    let sides = [64, 64, 16, 32, 64, 16, 32, 64, 64, 64];
    assert_eq!(
        images,
        sides.len() as f64,
        "every image counted once: {passes} passes"
    );
    let tokens: f64 = sides.iter().map(|s| ((s / 8) * (s / 8)) as f64).sum();
    assert!(
        (images..=tokens).contains(&passes),
        "{passes} passes for {tokens} tokens"
    );
}

/// The value of the one series of `name` on a `/metrics` page (0 when absent).
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_status_naming_the_field() {
    let cluster = Cluster::start(1, Preset::Tiny).await;
    let sampling = |s: SamplingParams| GenerateRequest {
        sampling: Some(s),
        ..request("ok", 32, 1)
    };
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (request("", 32, 1), "prompt"),
        (request("   ", 32, 1), "prompt"),
        (request(&"x".repeat(300), 32, 1), "prompt"),
        (request("ok", 48, 1), "width"),
        (
            GenerateRequest {
                height: 4096,
                ..request("ok", 32, 1)
            },
            "height",
        ),
        (
            sampling(SamplingParams {
                temperature: 3.0,
                has_temperature: true,
                ..Default::default()
            }),
            "sampling.temperature",
        ),
        (
            sampling(SamplingParams {
                temperature: -1.0,
                has_temperature: true,
                ..Default::default()
            }),
            "sampling.temperature",
        ),
        (
            sampling(SamplingParams {
                top_p: 1.01,
                ..Default::default()
            }),
            "sampling.top_p",
        ),
        (
            sampling(SamplingParams {
                top_k: 100_000,
                ..Default::default()
            }),
            "sampling.top_k",
        ),
        (
            GenerateRequest {
                request_id: "bad id!".into(),
                ..request("ok", 32, 1)
            },
            "request_id",
        ),
    ];
    for (req, field) in cases {
        let status = cluster
            .generate(req.clone())
            .await
            .expect_err(&format!("{field} must be refused: {req:?}"));
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "message names {field}: {}",
            status.message()
        );
    }

    let mut client = cluster.client().await;
    let status = client
        .generate(request("ok", 32, 1))
        .await
        .expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut bad_key = tonic::Request::new(request("ok", 32, 1));
    bad_key
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        client.generate(bad_key).await.expect_err("bad key").code(),
        Code::Unauthenticated
    );
    assert!(
        !cluster.log("gateway").contains("wrong"),
        "keys never reach the logs"
    );

    // The cluster still serves after all that.
    assert!(completed(
        &cluster
            .generate(request("still fine", 32, 5))
            .await
            .unwrap()
    )
    .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_and_frees_the_sequence_on_the_worker() {
    let cluster = Cluster::start(1, Preset::TwentyM).await;
    let mut worker = WorkerClient::connect(cluster.workers[0].clone())
        .await
        .unwrap();
    let total = worker
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .kv_blocks_total;

    let mut stream = cluster
        .client()
        .await
        .generate(authed(request("a long one", 256, 9)))
        .await
        .unwrap()
        .into_inner();
    // Wait until it is really generating on the worker.
    loop {
        let event = stream.next().await.expect("stream open").expect("no error");
        if matches!(event.event, Some(generate_event::Event::Progress(_))) {
            break;
        }
    }
    let info = worker.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.sequences, 1);
    assert!(info.kv_blocks_free < total);
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = worker.info(InfoRequest {}).await.unwrap().into_inner();
        if info.sequences == 0 && info.kv_blocks_free == total {
            break;
        }
        assert!(Instant::now() < deadline, "sequence not released: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut scheduler = SchedulerClient::connect(cluster.scheduler.clone())
        .await
        .unwrap();
    let status = scheduler
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.waiting, status.running), (0, 0));
    assert_eq!(status.workers[0].kv_blocks_free, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_costs_time_not_work() {
    let mut cluster = Cluster::start(2, Preset::TwentyM).await;
    // Reference image, undisturbed.
    let reference = cluster
        .generate(request("survive a crash", 128, 77))
        .await
        .unwrap();
    let reference = pixels(&completed(&reference).unwrap().png);

    let mut stream = cluster
        .client()
        .await
        .generate(authed(request("survive a crash", 128, 77)))
        .await
        .unwrap()
        .into_inner();
    let mut first_worker = None;
    while first_worker.is_none() {
        if let Some(generate_event::Event::Started(s)) = stream.next().await.unwrap().unwrap().event
        {
            first_worker = Some(s.worker);
        }
    }
    let first_worker = first_worker.unwrap();
    cluster.kill(&first_worker);
    let mut image = None;
    let mut restarted_on = None;
    while let Some(event) = stream.next().await {
        match event.expect("the job survives the crash").event {
            Some(generate_event::Event::Started(s)) => restarted_on = Some(s.worker),
            Some(generate_event::Event::Completed(c)) => image = Some(c.png),
            _ => {}
        }
    }
    let image = image.expect("an image despite the crash");
    if let Some(other) = restarted_on {
        assert_ne!(other, first_worker);
    }
    assert_eq!(
        pixels(&image),
        reference,
        "resumed from its tokens, the image is the same"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_gpus_serve_the_real_cluster_with_real_block_accounting() {
    let cluster = Cluster::start_with(kiln_e2e::Options {
        workers: 3,
        worker_args: ["--backend", "simulated", "--step-cost", "h100-20m"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await;
    let status = cluster.leader_status().await.unwrap();
    assert_eq!(status.workers.len(), 3);
    let runs: Vec<_> = (0..12)
        .map(|i| {
            let request = request("a simulated star", 64, i + 1);
            let client = cluster.client();
            async move {
                let mut stream = client.await.generate(authed(request)).await?.into_inner();
                let mut png = None;
                while let Some(event) = stream.next().await {
                    if let Some(generate_event::Event::Completed(c)) = event?.event {
                        png = Some(c.png);
                    }
                }
                Ok::<_, tonic::Status>(png.expect("completed"))
            }
        })
        .collect();
    let images = futures::future::try_join_all(runs)
        .await
        .expect("all served");
    for png in &images {
        assert_eq!(png_size(png), (64, 64));
        assert!(
            png.windows(14).any(|w| w == b"kiln:simulated"),
            "marked as simulated"
        );
    }
    let status = cluster.leader_status().await.unwrap();
    for worker in &status.workers {
        assert_eq!(worker.kv_blocks_free, worker.kv_blocks_total, "{worker:?}");
    }
    let info = WorkerClient::connect(cluster.workers[0].clone())
        .await
        .unwrap()
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.device, "simulated:h100-20m");
    assert!(info.model.contains("simulated"), "{}", info.model);
}
