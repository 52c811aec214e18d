//! What provenance costs: images generated one at a time through the scheduler and a worker process
//! (the default model and image size), then each image's C2PA signing timed on its own; the report
//! gives signing time as a share of end-to-end generation time, and the bytes the manifest adds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use kiln_provenance::{Generation, ImageSigner, SignerOptions};
use kiln_scheduler::{JobRequest, JobUpdate, RuntimeConfig, Sampling, Tier};

use super::{median, WorkerProcesses};

pub async fn run(model_dir: &Path, size: u32, images: usize) -> Result<()> {
    println!(
        "\n== C2PA signing: {images} images of {size}x{size}, one at a time through a scheduler and a \
         worker process; each signed 50 times =="
    );
    let workers = WorkerProcesses::start(model_dir, 1, 64, None)?;
    let handle = kiln_scheduler::spawn(RuntimeConfig {
        workers: workers.addresses.clone(),
        ..Default::default()
    });
    let model = handle
        .wait_for_model(Duration::from_secs(60))
        .await
        .context("bench worker did not come up")?;
    let keys = tempfile::tempdir()?;
    let credentials = kiln_provenance::dev_credentials(keys.path())?.credentials;
    let signer = ImageSigner::new(&credentials, SignerOptions::default())?;
    let (mut generation_s, mut signing_s, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..images {
        let start = Instant::now();
        let mut updates = handle
            .submit(JobRequest {
                request_id: format!("sign-bench-{i}"),
                user: "bench".into(),
                tier: Tier::Pro,
                prompt: format!("a red triangle above a blue star, variant {i}"),
                width: size,
                height: size,
                sampling: Sampling {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    seed: i as u64 + 1,
                    speculation: None,
                },
                trace: Default::default(),
                partial_images: 0,
            })
            .await?;
        let png = loop {
            match updates.next().await {
                Some(Ok(JobUpdate::Completed(result))) => break result.png,
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("bench job failed: {e}"),
                None => anyhow::bail!("bench job ended without an image"),
            }
        };
        generation_s.push(start.elapsed().as_secs_f64());
        let generation = Generation {
            request_id: &format!("sign-bench-{i}"),
            model: &model.model,
            prompt: "a red triangle above a blue star",
            width: size,
            height: size,
            seed: i as u64 + 1,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let mut times = Vec::new();
        let mut signed = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            signed = signer.sign_png(&png, &generation)?;
            times.push(t.elapsed().as_secs_f64());
        }
        signing_s.push(median(times));
        added.push((signed.len() - png.len()) as f64);
    }
    drop(workers);
    let (generation, signing) = (median(generation_s), median(signing_s));
    println!(
        "  median end-to-end generation {:.3} s; median signing {:.3} ms = {:.3}% of it",
        generation,
        signing * 1e3,
        signing / generation * 100.0
    );
    let (least, most) = added
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), b| (lo.min(*b), hi.max(*b)));
    println!(
        "  manifest adds {least:.0}-{most:.0} bytes per image (median {:.0}), no time stamp",
        median(added)
    );
    Ok(())
}
