//! The driver: provisions one API key per user of the population in the cluster's key store, then
//! sends the scenario's arrivals to a gateway open loop (each request leaves at its scheduled time,
//! however slow the cluster is), classifies every answer and shows live counts while it runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_proto::v1::image_service_client::ImageServiceClient;
use kiln_proto::v1::{generate_event, GenerateRequest};
use kiln_quota::{keys, KeyRecord, KeyStore};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::report::{Outcome, OutcomeKind};
use crate::scenario::{Arrival, Scenario, User};
use crate::LoadtestError;

/// Creates an API key for every user (ids `lt-<scenario>-<i>`); returns the keys in user order.
pub async fn provision_keys(
    store: &dyn KeyStore,
    pepper: &str,
    scenario: &Scenario,
    users: &[User],
) -> Result<Vec<String>, LoadtestError> {
    let created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = Vec::with_capacity(users.len());
    for (i, user) in users.iter().enumerate() {
        let key = keys::generate();
        let record = KeyRecord {
            id: format!("lt-{}-{i}", scenario.name),
            user: format!("{}-{}", scenario.name, user.name),
            org: user.org.clone(),
            tier: user.tier.to_string(),
            created_unix,
        };
        store
            .create_key(&keys::digest(pepper, &key), &record)
            .await
            .map_err(|e| LoadtestError::Provision(e.to_string()))?;
        out.push(key);
    }
    Ok(out)
}

/// Live counters, shown every second.
#[derive(Default)]
struct Counters {
    sent: AtomicUsize,
    completed: AtomicUsize,
    shed: AtomicUsize,
    refused: AtomicUsize,
    errors: AtomicUsize,
}

impl Counters {
    fn line(&self, elapsed: f64) -> String {
        let get = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        let done = get(&self.completed) + get(&self.shed) + get(&self.refused) + get(&self.errors);
        format!(
            "{elapsed:>6.1}s offered {:>7} in flight {:>6} completed {:>7} shed {:>6} refused {:>6} errors {:>5}",
            get(&self.sent),
            get(&self.sent) - done,
            get(&self.completed),
            get(&self.shed),
            get(&self.refused),
            get(&self.errors)
        )
    }
}

/// What a run produced: how many requests left, and how each ended.
pub struct Run {
    pub sent: usize,
    pub outcomes: Vec<Outcome>,
    /// Seconds from the first send to the last.
    pub sending_seconds: f64,
    /// How late sends left against their schedule, in seconds (p50, p99, max): a generator that
    /// keeps up stays near zero; one that falls behind offers less than the scenario asks.
    pub send_lag: (f64, f64, f64),
    /// Readings of the scheduler's saturation, when its metrics address was given.
    pub saturation: Vec<crate::scrape::Sample>,
}

/// How a run behaves.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// How long a request may take before it counts as an error, so none hangs the run.
    pub request_timeout: Duration,
    /// Print a live line every second.
    pub progress: bool,
    /// The scheduler's metrics `host:port`, read every second for saturation.
    pub scheduler_metrics: Option<String>,
}

/// Sends `arrivals` to `gateway` as `users` with their `keys`.
pub async fn run(
    gateway: &str,
    users: &[User],
    keys: &[String],
    prompts: &[String],
    arrivals: Vec<Arrival>,
    options: &RunOptions,
) -> Result<Run, LoadtestError> {
    // A few HTTP/2 connections, so one connection's flow control does not pace the whole load.
    let mut channels = Vec::new();
    for _ in 0..4 {
        let channel = tonic::transport::Endpoint::from_shared(gateway.to_string())
            .map_err(|e| LoadtestError::Gateway(e.to_string()))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| LoadtestError::Gateway(format!("{gateway}: {e}")))?;
        channels.push(channel);
    }
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (samples_tx, mut samples_rx) = tokio::sync::mpsc::unbounded_channel();
    let scraper = options
        .scheduler_metrics
        .clone()
        .map(|address| tokio::spawn(crate::scrape::follow(address, start, samples_tx)));
    let printer = options.progress.then(|| {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                eprintln!("{}", counters.line(start.elapsed().as_secs_f64()));
            }
        })
    });
    let sent = arrivals.len();
    let tokio_start = tokio::time::Instant::now();
    let mut lags = Vec::with_capacity(sent);
    let mut last_send = 0.0;
    for (n, arrival) in arrivals.into_iter().enumerate() {
        let due = tokio_start + Duration::from_secs_f64(arrival.at);
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        lags.push(now.saturating_duration_since(due).as_secs_f64());
        last_send = now.duration_since(tokio_start).as_secs_f64();
        let user = &users[arrival.user];
        let request = Request {
            key: keys[arrival.user].clone(),
            tier: user.tier,
            prompt: prompts[arrival.prompt % prompts.len()].clone(),
            arrival,
            channel: channels[n % channels.len()].clone(),
        };
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let (tx, counters, timeout) = (tx.clone(), counters.clone(), options.request_timeout);
        tokio::spawn(async move {
            let outcome = request.send(start, timeout).await;
            let counter = match outcome.kind {
                OutcomeKind::Completed => &counters.completed,
                OutcomeKind::Shed => &counters.shed,
                OutcomeKind::QuotaRefused | OutcomeKind::PolicyRefused => &counters.refused,
                OutcomeKind::Error => &counters.errors,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(outcome);
        });
    }
    drop(tx);
    let mut outcomes = Vec::with_capacity(sent);
    while let Some(outcome) = rx.recv().await {
        outcomes.push(outcome);
    }
    if let Some(scraper) = scraper {
        scraper.abort();
    }
    let mut saturation = Vec::new();
    while let Ok(sample) = samples_rx.try_recv() {
        saturation.push(sample);
    }
    if let Some(printer) = printer {
        printer.abort();
        eprintln!("{}", counters.line(start.elapsed().as_secs_f64()));
    }
    outcomes.sort_by(|a, b| a.sent_at.total_cmp(&b.sent_at));
    lags.sort_by(f64::total_cmp);
    let at = |p: f64| {
        lags.get(((lags.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Run {
        sent,
        outcomes,
        sending_seconds: last_send,
        send_lag: (at(0.5), at(0.99), lags.last().copied().unwrap_or(0.0)),
        saturation,
    })
}

struct Request {
    key: String,
    tier: &'static str,
    prompt: String,
    arrival: Arrival,
    channel: Channel,
}

impl Request {
    async fn send(self, start: Instant, timeout: Duration) -> Outcome {
        let sent = Instant::now();
        let mut outcome = Outcome {
            sent_at: sent.duration_since(start).as_secs_f64(),
            phase: self.arrival.phase,
            user: self.arrival.user,
            tier: self.tier,
            kind: OutcomeKind::Error,
            code: None,
            first_progress: None,
            latency: 0.0,
        };
        let result = tokio::time::timeout(timeout, self.generate(sent, &mut outcome)).await;
        match result {
            Ok(Ok(())) => outcome.kind = OutcomeKind::Completed,
            Ok(Err(status)) => {
                let reason = status.get_details_error_info().map(|i| i.reason);
                outcome.kind = match reason.as_deref() {
                    Some("SHED") => OutcomeKind::Shed,
                    Some("QUOTA_EXHAUSTED") => OutcomeKind::QuotaRefused,
                    Some("POLICY_REFUSED") => OutcomeKind::PolicyRefused,
                    _ => OutcomeKind::Error,
                };
                outcome.code = Some(format!("{:?}", status.code()));
            }
            Err(_) => outcome.code = Some("ClientTimeout".into()),
        }
        outcome.latency = sent.elapsed().as_secs_f64();
        outcome
    }

    async fn generate(&self, sent: Instant, outcome: &mut Outcome) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(GenerateRequest {
            prompt: self.prompt.clone(),
            width: self.arrival.size,
            height: self.arrival.size,
            ..Default::default()
        });
        let bearer = format!("Bearer {}", self.key)
            .parse()
            .map_err(|_| tonic::Status::internal("API key is not a valid header value"))?;
        request.metadata_mut().insert("authorization", bearer);
        let mut stream = ImageServiceClient::new(self.channel.clone())
            .generate(request)
            .await?
            .into_inner();
        while let Some(event) = stream.next().await {
            match event?.event {
                Some(generate_event::Event::Progress(_)) if outcome.first_progress.is_none() => {
                    outcome.first_progress = Some(sent.elapsed().as_secs_f64());
                }
                Some(generate_event::Event::Completed(_)) => return Ok(()),
                _ => {}
            }
        }
        Err(tonic::Status::unknown("the stream ended without an image"))
    }
}
