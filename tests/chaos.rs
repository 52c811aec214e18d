//! Chaos under load: a real cluster on loopback (3 workers, then a fourth joining, 2 schedulers
//! elected in etcd, 2 gateways, Redis with an append-only file) takes a steady stream of requests
//! while faults are injected on a schedule: a worker killed with SIGKILL, a worker paused with
//! SIGSTOP (its lease lapses, its calls hang) and resumed, a worker added, the leading scheduler
//! killed, the joined worker's network slowed past the call timeout (a proxy of ours), etcd stopped
//! for a while and restarted, Redis stopped for a while and restarted.
//!
//! Every request's history is kept (events, the status it ended with, when) and checked: every
//! request has exactly one terminal answer and none hangs; no stream carries two images; every
//! user's Redis usage equals the images delivered to it (each undelivered image refunded exactly
//! once); no image finishes past its tier's deadline unless a fault window overlaps its life.
//! The table of the run is printed, and the run is written as `kiln loadtest`'s HTML report with
//! the faults drawn over its charts (`$CARGO_TARGET_TMPDIR/chaos-report.html`). `KILN_CHAOS_SCALE` stretches the schedule (1 = the short form
//! CI runs, about 60 s of load; 5 for the long form by hand).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_e2e::{with_key, Cluster, Options, Preset};
use kiln_loadtest::{FaultWindow, Outcome, OutcomeKind, Report};
use kiln_proto::v1::image_service_client::ImageServiceClient;
use kiln_proto::v1::{generate_event, GenerateRequest, GetQuotaRequest};
use kiln_testkit::{EtcdServer, RedisServer, SlowProxy};
use tonic_types::StatusExt;

/// Every tier fails closed while Redis is down, so that every image is charged in Redis and the
/// usage check is exact. Free users run out of images during the run.
const TIERS: &str = r#"
[tiers.free]
windows = [{ seconds = 86400, images = 6 }]
when_store_down = "closed"
[tiers.plus]
windows = [{ seconds = 86400, images = 100000 }]
when_store_down = "closed"
[tiers.pro]
windows = [{ seconds = 86400, images = 100000 }]
when_store_down = "closed"
[tiers.team]
windows = [{ seconds = 86400, images = 100000 }]
when_store_down = "closed"
"#;

/// Seconds from arrival to last token per tier, as the schedulers are started with.
const DEADLINES: [(&str, f64); 4] = [
    ("free", 20.0),
    ("plus", 15.0),
    ("pro", 12.0),
    ("team", 12.0),
];

/// The longest a request may take before the run counts it as lost.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

/// After a fault ends, how long its effects (re-queued jobs, failover retries) may last.
const RECOVERY: f64 = 12.0;

#[derive(Clone, Debug)]
struct History {
    user: usize,
    tier: &'static str,
    sent: f64,
    ended: f64,
    images: usize,
    /// Events that came after the image (a second answer).
    after_image: usize,
    /// The end: `Ok` with the image, or the status's code and `ErrorInfo` reason.
    end: Result<(), (String, String)>,
}

#[derive(Clone, Debug)]
struct Fault {
    name: String,
    at: f64,
    /// When the fault itself is over (its start for a kill).
    end: f64,
    /// When its effects are over (the fault's end plus [`RECOVERY`]).
    until: f64,
}

async fn one_request(
    gateway: String,
    key: String,
    user: usize,
    tier: &'static str,
    start: Instant,
    n: usize,
) -> History {
    let sent = start.elapsed().as_secs_f64();
    let mut history = History {
        user,
        tier,
        sent,
        ended: sent,
        images: 0,
        after_image: 0,
        end: Err(("ClientTimeout".into(), String::new())),
    };
    let run = async {
        let mut client = ImageServiceClient::connect(gateway)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?
            .max_decoding_message_size(64 << 20);
        let request = GenerateRequest {
            prompt: format!("a red star over a blue circle, number {n}"),
            width: if n.is_multiple_of(4) { 64 } else { 32 },
            height: if n.is_multiple_of(4) { 64 } else { 32 },
            ..Default::default()
        };
        let mut stream = client.generate(with_key(&key, request)).await?.into_inner();
        // Read to the end: a stream that carried its image must end there.
        while let Some(event) = stream.next().await {
            let event = event?;
            if history.images > 0 {
                history.after_image += 1;
            }
            if matches!(event.event, Some(generate_event::Event::Completed(_))) {
                history.images += 1;
            }
        }
        Ok::<_, tonic::Status>(())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, run).await {
        Ok(Ok(())) if history.images > 0 => history.end = Ok(()),
        Ok(Ok(())) => history.end = Err(("NoImage".into(), String::new())),
        Ok(Err(status)) => {
            let reason = status
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default();
            history.end = Err((format!("{:?}", status.code()), reason));
        }
        Err(_) => {}
    }
    history.ended = start.elapsed().as_secs_f64();
    history
}

/// Waits until `t` (scaled) from `start`, restarting schedulers that exited meanwhile: a leader
/// that loses etcd exits by design, and in production its supervisor starts it again as a standby.
async fn at(cluster: &mut Cluster, start: Instant, scale: f64, t: f64) {
    let due = start + Duration::from_secs_f64(t * scale);
    loop {
        for name in cluster.restart_exited(&["scheduler", "scheduler-1"]) {
            eprintln!("chaos: {name} exited; restarted as a standby");
        }
        let now = Instant::now();
        if now >= due {
            return;
        }
        tokio::time::sleep((due - now).min(Duration::from_millis(250))).await;
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize])
}

/// The run as `kiln loadtest`'s report (one phase of the steady load, then the stragglers'
/// tail), with the faults marked over its charts.
fn report_page(
    histories: &[History],
    faults: &[Fault],
    load_seconds: f64,
    rate: f64,
    users: usize,
) -> String {
    let last_end = histories
        .iter()
        .map(|h| h.ended)
        .fold(load_seconds, f64::max);
    let scenario = kiln_loadtest::Scenario::from_toml(&format!(
        "name = \"chaos\"\n[population]\nusers = {users}\ntiers = {{ free = 1.0, plus = 1.0, pro = 1.0 }}\n\
         [[phases]]\nname = \"load\"\nseconds = {load_seconds}\nrate = {rate}\n\
         [[phases]]\nname = \"tail\"\nseconds = {}\nrate = 0\n",
        (last_end - load_seconds).ceil().max(1.0)
    ))
    .expect("the chaos scenario");
    let outcomes: Vec<Outcome> = histories
        .iter()
        .map(|h| {
            let (kind, code) = match &h.end {
                Ok(()) => (OutcomeKind::Completed, None),
                Err((code, reason)) => (
                    match reason.as_str() {
                        "SHED" => OutcomeKind::Shed,
                        "QUOTA_EXHAUSTED" => OutcomeKind::QuotaRefused,
                        "POLICY_REFUSED" => OutcomeKind::PolicyRefused,
                        _ => OutcomeKind::Error,
                    },
                    Some(code.clone()),
                ),
            };
            Outcome {
                sent_at: h.sent,
                phase: usize::from(h.sent >= load_seconds),
                user: h.user,
                tier: h.tier,
                kind,
                code,
                first_progress: None,
                latency: h.ended - h.sent,
            }
        })
        .collect();
    let deadlines = DEADLINES.iter().map(|(t, d)| (t.to_string(), *d)).collect();
    let mut report = Report::build(&scenario, histories.len(), &outcomes, &deadlines);
    report.add_faults(faults.iter().map(|f| FaultWindow {
        name: f.name.clone(),
        from: f.at,
        to: f.end,
    }));
    kiln_loadtest::html::render(&report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_survives_the_faults_of_a_fleet_and_loses_nothing() {
    let scale: f64 = std::env::var("KILN_CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let mut etcd = EtcdServer::start();
    let mut redis = RedisServer::start_persistent();
    let deadlines = DEADLINES
        .iter()
        .map(|(_, d)| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut cluster = Cluster::start_with(Options {
        workers: 3,
        preset: Preset::Tiny,
        gateways: 2,
        schedulers: 2,
        etcd: Some(etcd.endpoint()),
        redis: Some(redis.url()),
        tiers: TIERS.into(),
        scheduler_args: vec![
            "--call-timeout".into(),
            "5".into(),
            "--deadlines".into(),
            deadlines,
        ],
        gateway_args: vec!["--request-deadline".into(), "120".into()],
        ..Default::default()
    })
    .await;
    let tiers = ["free", "plus", "pro"];
    let users: Vec<(&'static str, String)> = (0..12)
        .map(|i| {
            let tier = tiers[i % 3];
            let (_, key) = cluster.create_key(&format!("chaos-{i}"), tier, None);
            (tier, key)
        })
        .collect();

    // The load: a steady stream, round robin over users and gateways, for the whole schedule.
    let load_seconds = 60.0 * scale;
    let rate = 3.0;
    let start = Instant::now();
    let sender = {
        let users = users.clone();
        let gateways = cluster.gateways.clone();
        tokio::spawn(async move {
            let mut runs = Vec::new();
            let total = (load_seconds * rate) as usize;
            for n in 0..total {
                let due = Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(tokio::time::Instant::from_std(start + due)).await;
                let user = n % users.len();
                let (tier, key) = users[user].clone();
                let gateway = gateways[n % gateways.len()].clone();
                runs.push(tokio::spawn(one_request(
                    gateway, key, user, tier, start, n,
                )));
            }
            let mut histories = Vec::with_capacity(runs.len());
            for run in runs {
                histories.push(run.await.expect("a request task"));
            }
            histories
        })
    };

    // The faults, on a schedule scaled with the load.
    let faults = Arc::new(std::sync::Mutex::new(Vec::<Fault>::new()));

    let record = |name: &str, from: f64, to: f64| {
        faults.lock().unwrap().push(Fault {
            name: name.into(),
            at: from * scale,
            end: to * scale,
            until: to * scale + RECOVERY,
        });
    };
    at(&mut cluster, start, scale, 6.0).await;
    cluster.kill("worker-0");
    record("kill -9 worker-0", 6.0, 6.0);
    at(&mut cluster, start, scale, 12.0).await;
    cluster.signal("worker-1", "STOP");
    at(&mut cluster, start, scale, 16.0).await;
    // The joining worker is reached through a proxy of ours, so that its network can be slowed.
    let proxy = SlowProxy::start().await;
    let advertise = format!("http://127.0.0.1:{}", proxy.port());
    let (joined, address) = cluster.add_worker(&etcd.endpoint(), &["--advertise", &advertise]);
    let port = address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    proxy.set_target(port);
    eprintln!("chaos: {joined} joined behind a proxy");
    at(&mut cluster, start, scale, 20.0).await;
    cluster.signal("worker-1", "CONT");
    record(
        &format!("SIGSTOP worker-1 for {:.0} s", 8.0 * scale),
        12.0,
        20.0,
    );
    at(&mut cluster, start, scale, 24.0).await;
    let leader = cluster.leader_status().await.expect("a leader");
    let leader_name = if leader.scheduler == cluster.schedulers[0] {
        "scheduler"
    } else {
        "scheduler-1"
    };
    cluster.kill(leader_name);
    record(&format!("kill -9 the leader ({leader_name})"), 24.0, 24.0);
    at(&mut cluster, start, scale, 27.0).await;
    // Slower than the schedulers' call timeout (5 s): its calls time out and it is dropped.
    proxy.delay(Duration::from_secs(6));
    at(&mut cluster, start, scale, 31.0).await;
    proxy.delay(Duration::ZERO);
    record(
        &format!("{joined}'s network 6 s slow for {:.0} s", 4.0 * scale),
        27.0,
        31.0,
    );
    at(&mut cluster, start, scale, 32.0).await;
    etcd.kill();
    at(&mut cluster, start, scale, 42.0).await;
    etcd.restart();
    record(&format!("etcd down {:.0} s", 10.0 * scale), 32.0, 42.0);
    at(&mut cluster, start, scale, 46.0).await;
    redis.kill();
    at(&mut cluster, start, scale, 56.0).await;
    redis.restart();
    record(&format!("Redis down {:.0} s", 10.0 * scale), 46.0, 56.0);

    let mut sender = sender;
    let histories = loop {
        tokio::select! {
            done = &mut sender => break done.expect("the load"),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                for name in cluster.restart_exited(&["scheduler", "scheduler-1"]) {
                    eprintln!("chaos: {name} exited; restarted as a standby");
                }
            }
        }
    };
    let faults = faults.lock().unwrap().clone();

    // The check.
    let sent = histories.len();
    let lost: Vec<&History> = histories
        .iter()
        .filter(
            |h| matches!(&h.end, Err((code, _)) if code == "ClientTimeout" || code == "NoImage"),
        )
        .collect();
    let doubles = histories
        .iter()
        .filter(|h| h.images > 1 || h.after_image > 0)
        .count();
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for h in &histories {
        let label = match &h.end {
            Ok(()) => "image".to_string(),
            Err((code, reason)) if reason.is_empty() => code.clone(),
            Err((code, reason)) => format!("{code} {reason}"),
        };
        *by_code.entry(label).or_default() += 1;
    }
    let in_fault = |h: &History| faults.iter().any(|f| h.sent <= f.until && h.ended >= f.at);
    let late: Vec<&History> = histories
        .iter()
        .filter(|h| h.end.is_ok() && !in_fault(h))
        .filter(|h| {
            let deadline = DEADLINES.iter().find(|(t, _)| *t == h.tier).unwrap().1;
            h.ended - h.sent > deadline
        })
        .collect();

    // Redis usage per user equals the images it got; settlements retry, so give them time.
    let delivered: Vec<u32> = (0..users.len())
        .map(|u| {
            histories
                .iter()
                .filter(|h| h.user == u && h.end.is_ok())
                .count() as u32
        })
        .collect();
    let mut mismatches = Vec::new();
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        mismatches.clear();
        for (u, (_, key)) in users.iter().enumerate() {
            let used = cluster
                .client()
                .await
                .get_quota(with_key(key, GetQuotaRequest {}))
                .await
                .map(|q| q.into_inner().windows[0].used);
            match used {
                Ok(used) if used == delivered[u] => {}
                other => mismatches.push((u, other.map_err(|s| s.code()), delivered[u])),
            }
        }
        if mismatches.is_empty() || Instant::now() > settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Outside the faults the cluster serves: every request there gets its image, or a refusal
    // of a user who used up its quota.
    let calm_failures: Vec<&History> = histories
        .iter()
        .filter(|h| !in_fault(h))
        .filter(|h| match &h.end {
            Ok(()) => false,
            Err((_, reason)) => reason != "QUOTA_EXHAUSTED",
        })
        .collect();
    eprintln!("chaos: {sent} requests over {:.0} s, faults:", load_seconds);
    for f in &faults {
        eprintln!(
            "  {:>6.1} s  {} (effects until {:.1} s)",
            f.at, f.name, f.until
        );
    }
    eprintln!("chaos: outcomes:");
    for (label, n) in &by_code {
        eprintln!("  {label:<40} {n:>6}");
    }
    for tier in tiers {
        let calm: Vec<f64> = histories
            .iter()
            .filter(|h| h.tier == tier && h.end.is_ok() && !in_fault(h))
            .map(|h| h.ended - h.sent)
            .collect();
        let p99 = percentile(calm.clone(), 0.99).map_or("-".into(), |p| format!("{p:.2} s"));
        eprintln!(
            "  p99 {tier:<5} outside fault windows: {p99} ({} images)",
            calm.len()
        );
    }
    eprintln!(
        "chaos: lost {}, double answers {doubles}, refund mismatches {}, late outside faults {}, failed outside faults {}",
        lost.len(),
        mismatches.len(),
        late.len(),
        calm_failures.len()
    );

    let page = report_page(&histories, &faults, load_seconds, rate, users.len());
    let report_path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.html");
    std::fs::write(&report_path, &page).expect("writing the chaos report");
    eprintln!("chaos: report written to {}", report_path.display());

    assert!(
        lost.is_empty(),
        "requests without a terminal answer: {lost:#?}"
    );
    for fault in &faults {
        assert!(
            page.contains(&format!("<title>{}</title>", fault.name)),
            "the report marks {:?}",
            fault.name
        );
    }
    assert_eq!(doubles, 0, "a stream carried two answers");
    assert!(
        mismatches.is_empty(),
        "Redis usage differs from the images delivered: (user, used, delivered) {mismatches:?}"
    );
    assert!(
        late.is_empty(),
        "images past their deadline outside any fault: {late:#?}"
    );
    assert!(
        calm_failures.is_empty(),
        "requests failed outside any fault: {calm_failures:#?}"
    );
    assert!(
        by_code.get("image").copied().unwrap_or(0) >= sent / 3,
        "fewer than a third of the requests got an image: {by_code:?}"
    );
}
