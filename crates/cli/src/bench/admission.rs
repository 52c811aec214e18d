//! `kiln bench --only admission`: quota admission against a real Redis, side by side with
//! `redis-benchmark` running the same admission script (EVALSHA, same arguments, same number of
//! clients) on the same machine, for admitted and for refused requests; then the whole gateway
//! pipeline over gRPC (auth lookup, validation, policy, admission, settlement) with a backend that
//! answers at once, so that only the gateway's own cost is measured; the same pipeline through the
//! OpenAI-compatible HTTP front door beside gRPC, alternating; and admitted latency while a flood of
//! refused requests runs beside it.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::BoxStream;
use futures::StreamExt;
use kiln_gateway::admission::{Admission, QuotaAdmission, QuotaSettings};
use kiln_gateway::auth::{Identity, StoreKeys};
use kiln_gateway::backend::{Backend, UpdateStream};
use kiln_gateway::policy::StyleRules;
use kiln_gateway::signing::Unsigned;
use kiln_gateway::validation::ValidRequest;
use kiln_gateway::{Gateway, GatewayConfig};
use kiln_proto::v1::image_service_client::ImageServiceClient;
use kiln_proto::v1::{ClusterStatusResponse, GenerateRequest};
use kiln_quota::{keys, KeyRecord, KeyStore, RedisConfig, RedisStore, TierTable};
use kiln_scheduler::{JobRequest, JobResult, JobUpdate, ModelDescription, SchedulerError, Tier};
use kiln_testkit::RedisServer;

use super::percentile;

/// Users the admitted load is spread over (each with a window far from its limit).
const USERS: u64 = 10_000;
const PREFIX: &str = "bench:";

/// A limit no benchmark reaches, and one a pre-charged user has used up.
const TIERS: &str = r#"
[tiers.free]
windows = [{ seconds = 86400, images = 1 }]
[tiers.plus]
windows = [{ seconds = 86400, images = 1000000000 }]
[tiers.pro]
windows = [{ seconds = 86400, images = 1000000000 }]
[tiers.team]
windows = [{ seconds = 86400, images = 1000000000 }]
"#;

struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Figures {
    /// Each figure's median over rounds.
    fn median(rounds: Vec<Figures>) -> Figures {
        let of = |f: fn(&Figures) -> f64| super::median(rounds.iter().map(f).collect());
        Figures {
            rps: of(|r| r.rps),
            p50_ms: of(|r| r.p50_ms),
            p99_ms: of(|r| r.p99_ms),
        }
    }
}

pub async fn run(redis_url: Option<&str>, clients: usize, requests: usize) -> Result<()> {
    let _server;
    let url = match redis_url {
        Some(u) => u.to_string(),
        None => {
            _server = RedisServer::start();
            _server.url()
        }
    };
    let port = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .context("the Redis URL must end in :PORT")?;
    let mut config = RedisConfig::new(url.clone());
    config.prefix = PREFIX.into();
    let store = Arc::new(RedisStore::new(config)?);
    let tiers = TierTable::from_toml(TIERS)?;
    let admission = Arc::new(QuotaAdmission::new(
        store.clone(),
        tiers,
        QuotaSettings::default(),
    ));
    println!(
        "\n== admission: {requests} requests, {clients} concurrent clients, Redis at {url} =="
    );

    // The refused user has used up its one image.
    let refused = identity("bench-refused", Tier::Free);
    admission.admit(&refused, &valid_request()).await.ok();

    let sha = script_sha(&url).await?;
    println!("{:<44} {:>10} {:>9} {:>9}", "", "req/s", "p50 ms", "p99 ms");
    for (label, allowed) in [("admitted", true), ("refused", false)] {
        let raw = redis_benchmark(port, &sha, clients, requests, allowed)?;
        let kiln = admission_stage(&admission, clients, requests, allowed).await;
        print_row(
            &format!("redis-benchmark EVALSHA admit.lua ({label})"),
            &raw,
        );
        print_row(&format!("kiln admission stage ({label})"), &kiln);
        println!(
            "{:<44} {:>10.2}",
            format!("  ratio kiln / raw ({label})"),
            kiln.rps / raw.rps
        );
    }

    // The whole gateway over gRPC, with a backend that answers at once.
    let (address, http, stop) = start_gateway(store.clone(), admission.clone()).await?;
    let allowed_key = "bench-allowed-key";
    let refused_key = "bench-refused-key";
    for (key, user, tier) in [
        (allowed_key, "bench-grpc", "pro"),
        (refused_key, "bench-refused", "free"),
    ] {
        let record = KeyRecord {
            id: key.into(),
            user: user.into(),
            org: None,
            tier: tier.into(),
            created_unix: 0,
        };
        store.create_key(&keys::digest("", key), &record).await.ok();
    }
    let client = ImageServiceClient::connect(address.clone()).await?;
    let grpc_allowed = grpc_load(&client, allowed_key, clients, requests).await;
    let grpc_refused = grpc_load(&client, refused_key, clients, requests).await;
    print_row("gateway gRPC Generate (admitted)", &grpc_allowed);
    print_row("gateway gRPC Generate (refused)", &grpc_refused);

    // The two front doors on the same gateway, alternating rounds (medians of three).
    let (mut grpc_rounds, mut http_rounds) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        grpc_rounds.push(grpc_load(&client, allowed_key, clients, requests / 2).await);
        http_rounds.push(http_load(http, allowed_key, clients, requests / 2).await);
    }
    let (grpc_front, http_front) = (Figures::median(grpc_rounds), Figures::median(http_rounds));
    print_row("front door gRPC Generate (median of 3)", &grpc_front);
    print_row("front door HTTP /v1/images/generations", &http_front);
    println!(
        "{:<44} {:>10.2} {:>9} {:>9.2}",
        "  ratio HTTP / gRPC",
        http_front.rps / grpc_front.rps,
        "",
        http_front.p99_ms / grpc_front.p99_ms
    );

    // Admitted requests while refused ones flood the gateway at the same concurrency.
    let flood = {
        let client = client.clone();
        tokio::spawn(async move { grpc_load(&client, refused_key, clients, requests * 4).await })
    };
    let under_flood = grpc_load(&client, allowed_key, clients / 2 + 1, requests / 2).await;
    let flood = flood.await?;
    print_row("gateway admitted, beside a refused flood", &under_flood);
    print_row("  the refused flood itself", &flood);
    println!(
        "  admitted p99 with flood / alone: {:.2}",
        under_flood.p99_ms / grpc_allowed.p99_ms
    );
    let _ = stop.send(true);
    Ok(())
}

fn print_row(label: &str, f: &Figures) {
    println!(
        "{label:<44} {:>10.0} {:>9.3} {:>9.3}",
        f.rps, f.p50_ms, f.p99_ms
    );
}

fn identity(user: &str, tier: Tier) -> Identity {
    Identity {
        key_id: "bench".into(),
        user: user.into(),
        org: None,
        tier,
    }
}

fn valid_request() -> ValidRequest {
    ValidRequest {
        request_id: "bench".into(),
        prompt: "a red star".into(),
        width: 64,
        height: 64,
        sampling: kiln_scheduler::Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
            speculation: None,
        },
        image_tokens: 64,
        idempotency_key: None,
        partial_images: 0,
    }
}

async fn script_sha(url: &str) -> Result<String> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(kiln_quota::redis_store::ADMIT_SCRIPT)
        .query_async(&mut conn)
        .await?;
    Ok(sha)
}

/// Runs `redis-benchmark` with the admission script and the arguments the gateway sends.
fn redis_benchmark(
    port: u16,
    sha: &str,
    clients: usize,
    requests: usize,
    allowed: bool,
) -> Result<Figures> {
    let (subject, limit) = if allowed {
        ("user:__rand_int__", "1000000000")
    } else {
        ("user:bench-refused", "1")
    };
    let tagged = format!("{PREFIX}{{{subject}}}");
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .args(["-r", &USERS.to_string(), "--csv"])
        // The gateway's call: the caller's hash-tagged prefix as the routing key and first argument.
        .args([
            "EVALSHA",
            sha,
            "1",
            &tagged,
            &tagged,
            "c:__rand_int__",
            "",
            "30000",
        ])
        .args([
            "86400000", "1", subject, "1", "86400000", limit, "0", "0", "-1",
        ])
        .output()
        .context("running redis-benchmark (Debian package redis-tools)")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("\"EVALSHA"))
        .context("redis-benchmark printed no result row")?;
    let fields: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    if fields.len() < 6 {
        bail!("unexpected redis-benchmark row: {row}");
    }
    Ok(Figures {
        rps: fields[0],
        p50_ms: fields[3],
        p99_ms: fields[5],
    })
}

/// Runs `requests` operations from `clients` concurrent tasks; returns throughput and latencies.
async fn measure<F, Fut>(clients: usize, requests: usize, op: F) -> Figures
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per_client = requests.div_ceil(clients);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(per_client);
                for i in 0..per_client {
                    let t = Instant::now();
                    op(c * per_client + i).await;
                    times.push(t.elapsed().as_secs_f64());
                }
                times
            })
        })
        .collect();
    let mut times = Vec::with_capacity(requests);
    for t in tasks {
        times.extend(t.await.unwrap_or_default());
    }
    let elapsed = start.elapsed().as_secs_f64();
    Figures {
        rps: times.len() as f64 / elapsed,
        p50_ms: percentile(times.clone(), 0.5) * 1e3,
        p99_ms: percentile(times, 0.99) * 1e3,
    }
}

async fn admission_stage(
    admission: &Arc<QuotaAdmission>,
    clients: usize,
    requests: usize,
    allowed: bool,
) -> Figures {
    let admission = admission.clone();
    measure(clients, requests, move |i| {
        let admission = admission.clone();
        async move {
            let who = if allowed {
                identity(&(i as u64 % USERS).to_string(), Tier::Pro)
            } else {
                identity("bench-refused", Tier::Free)
            };
            // The ticket is dropped unsettled: this measures the admission round trip only.
            let _ = admission.admit(&who, &valid_request()).await;
        }
    })
    .await
}

async fn grpc_load(
    client: &ImageServiceClient<tonic::transport::Channel>,
    key: &'static str,
    clients: usize,
    requests: usize,
) -> Figures {
    let client = client.clone();
    measure(clients, requests, move |_| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(GenerateRequest {
                prompt: "a red star".into(),
                width: 64,
                height: 64,
                ..Default::default()
            });
            if let Ok(v) = format!("Bearer {key}").parse() {
                request.metadata_mut().insert("authorization", v);
            }
            if let Ok(response) = client.generate(request).await {
                let mut stream = response.into_inner();
                while stream.next().await.is_some() {}
            }
        }
    })
    .await
}

/// `POST /v1/images/generations` from `clients` tasks, each on its own kept-alive HTTP/1.1
/// connection (a pool, so that no request pays a connect).
async fn http_load(
    address: std::net::SocketAddr,
    key: &'static str,
    clients: usize,
    requests: usize,
) -> Figures {
    let pool = Arc::new(tokio::sync::Mutex::new(Vec::<tokio::net::TcpStream>::new()));
    measure(clients, requests, move |_| {
        let pool = pool.clone();
        async move {
            let taken = pool.lock().await.pop();
            let stream = match taken {
                Some(s) => s,
                None => match tokio::net::TcpStream::connect(address).await {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            let body = r#"{"prompt": "a red star", "size": "64x64"}"#;
            let request = format!(
                "POST /v1/images/generations HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if let Ok(stream) = http_exchange(stream, request.as_bytes()).await {
                pool.lock().await.push(stream);
            }
        }
    })
    .await
}

/// Sends one request and reads its answer (headers, then `content-length` bytes); returns the
/// connection for the next request.
async fn http_exchange(
    mut stream: tokio::net::TcpStream,
    request: &[u8],
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request).await?;
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buffer.len() < end + 4 + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        return Ok(stream);
    }
}

/// Stands in for the cluster so that the gateway's own cost is what is measured.
struct InstantBackend;

#[tonic::async_trait]
impl Backend for InstantBackend {
    async fn model(&self) -> Result<ModelDescription, SchedulerError> {
        Ok(ModelDescription {
            model: "bench@0".into(),
            sizes: vec![64],
            default_size: 64,
            patch_size: 8,
            max_prompt_bytes: 256,
            prefix_overhead_tokens: 3,
            default_temperature: None,
            default_top_k: None,
        })
    }

    async fn submit(&self, _job: JobRequest) -> Result<UpdateStream, SchedulerError> {
        let done = JobUpdate::Completed(JobResult {
            png: vec![0; 64],
            width: 64,
            height: 64,
            prompt_tokens: 10,
            image_tokens: 64,
            queue_seconds: 0.0,
            generation_seconds: 0.0,
        });
        let stream: BoxStream<'static, _> = futures::stream::iter([Ok(done)]).boxed();
        Ok(stream)
    }

    async fn status(&self) -> Result<ClusterStatusResponse, SchedulerError> {
        Ok(ClusterStatusResponse::default())
    }
}

/// The gateway on an instant backend: its gRPC address, its HTTP API's address, and its stop.
async fn start_gateway(
    store: Arc<RedisStore>,
    admission: Arc<QuotaAdmission>,
) -> Result<(
    String,
    std::net::SocketAddr,
    tokio::sync::watch::Sender<bool>,
)> {
    let gateway = Gateway {
        config: GatewayConfig {
            request_deadline: Duration::from_secs(60),
        },
        auth: Arc::new(StoreKeys::new(String::new(), store)),
        policy: Arc::new(StyleRules::shipped()),
        admission,
        signer: Arc::new(Unsigned),
        backend: Arc::new(InstantBackend),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = http_listener.local_addr()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let gateway = Arc::new(gateway);
    tokio::spawn(kiln_gateway::openai::run(
        gateway.clone(),
        http_listener,
        until_stopped(stopped.clone()),
    ));
    tokio::spawn(kiln_gateway::run(gateway, listener, until_stopped(stopped)));
    Ok((address, http, stop))
}
