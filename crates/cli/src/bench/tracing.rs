//! Overhead of tracing on the request path: the same closed-loop load through a worker, a scheduler
//! and a gateway (three `kiln` processes, so trace context crosses real process boundaries) with
//! tracing off, sampling 1% and sampling 100%, exporting to an OTLP receiver in this process. The
//! configurations alternate round by round and the medians are compared, because the machine is
//! shared. The tiny model and the smallest image keep the model's share of each request small, so
//! what tracing adds is as visible as it can be.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use kiln_proto::v1::image_service_client::ImageServiceClient;
use kiln_proto::v1::GenerateRequest;
use sha2::{Digest, Sha256};

use super::{median, Processes};

const KEY: &str = "bench-tracing-key";
/// No quota stands between the load and the cluster: the run measures serving, not admission.
const UNLIMITED_TIERS: &str = "[tiers.free]\nwindows = [{ seconds = 86400, images = 100000000 }]\n\
    [tiers.plus]\nwindows = [{ seconds = 86400, images = 100000000 }]\n\
    [tiers.pro]\nwindows = [{ seconds = 86400, images = 100000000 }]\n\
    [tiers.team]\nwindows = [{ seconds = 86400, images = 100000000 }]\norg_pool = true\n";

/// The processes of one configuration; killed on drop.
struct Cluster {
    _processes: Processes,
    gateway: String,
}

impl Cluster {
    fn start(dir: &Path, env: &[(&str, String)]) -> Result<Cluster> {
        let mut processes = Processes::default();
        let model = dir.join("model");
        let model = model.to_str().context("utf-8 path")?;
        let keys = dir.join("keys.toml");
        let keys = keys.to_str().context("utf-8 path")?;
        let tiers = dir.join("tiers.toml");
        let tiers = tiers.to_str().context("utf-8 path")?;
        let any = "127.0.0.1:0";
        let worker = processes.spawn(
            env,
            &[
                "worker",
                "--listen",
                any,
                "--model",
                model,
                "--max-batch",
                "64",
            ],
        )?;
        let scheduler =
            processes.spawn(env, &["scheduler", "--listen", any, "--worker", &worker])?;
        let gateway = processes.spawn(
            env,
            &[
                "gateway",
                "--listen",
                any,
                "--scheduler",
                &scheduler,
                "--keys",
                keys,
                "--tiers",
                tiers,
            ],
        )?;
        Ok(Cluster {
            _processes: processes,
            gateway,
        })
    }
}

/// Closed loop: `clients` callers each send the next request when the last one finishes, for
/// `seconds`. Returns completed images per second; any failed request fails the run.
async fn load(gateway: &str, clients: usize, seconds: f64) -> Result<f64> {
    let channel = tonic::transport::Endpoint::from_shared(gateway.to_string())?
        .connect()
        .await
        .context("connecting to the bench gateway")?;
    let client = ImageServiceClient::new(channel);
    // One request first, so the gateway has the model description and the channel is warm.
    generate(&mut client.clone()).await?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut done = 0usize;
                while Instant::now() < end {
                    generate(&mut client).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

async fn generate(client: &mut ImageServiceClient<tonic::transport::Channel>) -> Result<()> {
    let mut request = tonic::Request::new(GenerateRequest {
        prompt: "a red star".into(),
        width: 16,
        height: 16,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse()?);
    let mut stream = client.generate(request).await?.into_inner();
    while let Some(event) = stream.next().await {
        event?;
    }
    Ok(())
}

pub async fn run(clients: usize, seconds: f64, rounds: usize) -> Result<()> {
    println!(
        "\n== tracing overhead: worker + scheduler + gateway processes, tiny model, 16x16 images, \
         {clients} closed-loop clients, {seconds} s per run, {rounds} alternating rounds =="
    );
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let status = Command::new(exe)
        .args(["model", "init", "--preset", "tiny", "--out"])
        .arg(dir.path().join("model"))
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "kiln model init failed");
    let digest = hex::encode(Sha256::digest(KEY.as_bytes()));
    std::fs::write(
        dir.path().join("keys.toml"),
        format!(
            "[[keys]]\nid = \"bench\"\nsha256 = \"{digest}\"\nuser = \"bench\"\ntier = \"pro\"\n"
        ),
    )?;
    std::fs::write(dir.path().join("tiers.toml"), UNLIMITED_TIERS)?;
    let receiver = kiln_testkit::OtlpReceiver::start().await;
    let configs: [(&str, Option<f64>); 3] =
        [("off", None), ("1%", Some(0.01)), ("100%", Some(1.0))];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for (i, (label, ratio)) in configs.iter().enumerate() {
            let env: Vec<(&str, String)> = match ratio {
                None => Vec::new(),
                Some(r) => vec![
                    ("KILN_TRACE_OTLP_ENDPOINT", receiver.endpoint().to_string()),
                    ("KILN_TRACE_SAMPLE_RATIO", r.to_string()),
                ],
            };
            let cluster = Cluster::start(dir.path(), &env)?;
            let rate = load(&cluster.gateway, clients, seconds).await?;
            drop(cluster);
            println!(
                "  round {}: tracing {label:>4}: {rate:.1} images/s",
                round + 1
            );
            results[i].push(rate);
        }
    }
    let off = median(results[0].clone());
    println!(
        "{:>14} {:>16} {:>12}",
        "tracing", "median images/s", "vs off"
    );
    for ((label, _), rates) in configs.iter().zip(results) {
        let m = median(rates);
        println!("{label:>14} {m:>16.1} {:>11.1}%", (m / off - 1.0) * 100.0);
    }
    println!(
        "  spans received by the OTLP receiver: {}",
        receiver.spans().len()
    );
    Ok(())
}
