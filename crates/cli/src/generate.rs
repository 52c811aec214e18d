//! `kiln generate`: calls a gateway's `Generate`, shows the queue position and a progress bar, and
//! writes the PNG.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::v1::image_service_client::ImageServiceClient;
use kiln_proto::v1::{generate_event::Event, GenerateRequest, SamplingParams};
use kiln_telemetry::env_names as env;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to draw.
    pub prompt: String,
    /// Output PNG.
    #[arg(long, short, default_value = "kiln.png")]
    pub output: PathBuf,
    /// Gateway address.
    #[arg(long, env = env::GATEWAY, default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// API key (default: the development key `kiln up` wrote into the data directory).
    #[arg(long, env = env::API_KEY, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Width in pixels (0: the model's default).
    #[arg(long, default_value_t = 0)]
    pub width: u32,
    /// Height in pixels (0: the model's default).
    #[arg(long, default_value_t = 0)]
    pub height: u32,
    /// Seed (0: chosen by the server and printed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature in [0, 2].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Top-k cut-off (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Top-p threshold in (0, 1] (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub top_p: f32,
    /// Idempotency key: a retry with the same key is not charged again and returns the same image.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl GenerateArgs {
    /// The arguments `kiln up --generate` uses against its own gateway.
    pub fn for_local(prompt: String, output: PathBuf, size: u32, gateway: SocketAddr) -> Self {
        GenerateArgs {
            prompt,
            output,
            gateway: format!("http://{gateway}"),
            api_key: None,
            idempotency_key: String::new(),
            width: size,
            height: size,
            seed: 0,
            temperature: None,
            top_k: 0,
            top_p: 0.0,
            quiet: false,
        }
    }
}

fn api_key(args: &GenerateArgs, data_dir: &Path) -> Result<String> {
    if let Some(k) = &args.api_key {
        return Ok(k.clone());
    }
    let path = data_dir.join("dev-api-key");
    let key = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no --api-key ({}) given and no development key at {}",
            env::API_KEY,
            path.display()
        )
    })?;
    Ok(key.trim().to_string())
}

pub async fn run(args: GenerateArgs, data_dir: &Path) -> Result<()> {
    let key = api_key(&args, data_dir)?;
    let mut client = ImageServiceClient::connect(args.gateway.clone())
        .await
        .with_context(|| format!("connecting to the gateway at {}", args.gateway))?
        .max_decoding_message_size(64 << 20);
    let mut request = tonic::Request::new(GenerateRequest {
        prompt: args.prompt.clone(),
        idempotency_key: args.idempotency_key.clone(),
        width: args.width,
        height: args.height,
        sampling: Some(SamplingParams {
            temperature: args.temperature.unwrap_or(0.0),
            has_temperature: args.temperature.is_some(),
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        }),
        request_id: String::new(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}")
            .parse()
            .context("API key is not valid metadata")?,
    );
    let mut stream = client
        .generate(request)
        .await
        .map_err(describe)?
        .into_inner();
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} tokens {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    while let Some(event) = stream.next().await {
        let event = event.map_err(describe)?;
        match event.event {
            Some(Event::Queued(q)) => bar.set_message(format!("queued #{}", q.position)),
            Some(Event::Started(s)) => bar.set_message(format!("on {}", s.worker)),
            Some(Event::Progress(p)) => {
                bar.set_length(p.tokens_total as u64);
                bar.set_position(p.tokens_done as u64);
                bar.set_message("drawing");
            }
            Some(Event::Completed(c)) => {
                bar.finish_and_clear();
                std::fs::write(&args.output, &c.png)
                    .with_context(|| format!("writing {}", args.output.display()))?;
                let usage = c.usage.unwrap_or_default();
                println!(
                    "wrote {} ({}x{}, {} bytes) request {} seed {} in {:.2}s queue + {:.2}s generation",
                    args.output.display(),
                    c.width,
                    c.height,
                    c.png.len(),
                    event.request_id,
                    usage.seed,
                    usage.queue_seconds,
                    usage.generation_seconds
                );
                return Ok(());
            }
            None => {}
        }
    }
    bail!("the gateway closed the stream without an image")
}

/// A status as a message a person can act on, including field violations.
fn describe(status: tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    let mut message = format!("{:?}: {}", status.code(), status.message());
    if let Some(retry) = status.get_details_retry_info().and_then(|r| r.retry_delay) {
        message.push_str(&format!(" (retry after {retry:?})"));
    }
    anyhow::anyhow!(message)
}
