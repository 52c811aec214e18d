//! `kiln generate`: calls a gateway's `Generate`, shows the queue position and a progress bar, and
//! writes the PNG.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_client::Event;
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
    /// Previews to write while the image is drawn (0 to 3), as OUTPUT's name with `.partial-N`
    /// before the extension.
    #[arg(long, default_value_t = 0)]
    pub partial_images: u32,
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
            partial_images: 0,
            quiet: false,
        }
    }
}

/// `out.png` -> `out.partial-0.png`.
fn preview_path(output: &Path, index: u32) -> PathBuf {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    let ext = output
        .extension()
        .map_or("png".into(), |e| e.to_string_lossy());
    output.with_file_name(format!("{stem}.partial-{index}.{ext}"))
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
    let client = kiln_client::Client::connect(&args.gateway, &key).await?;
    let mut request = kiln_client::Request::new(args.prompt.clone())
        .seed(args.seed)
        .top_k(args.top_k)
        .top_p(args.top_p)
        .partial_images(args.partial_images);
    request = match (args.width, args.height) {
        (w, h) if w == h => request.size(w),
        _ => bail!("--width and --height must be equal (square images)"),
    };
    if let Some(t) = args.temperature {
        request = request.temperature(t);
    }
    if !args.idempotency_key.is_empty() {
        request = request.idempotency_key(args.idempotency_key.clone());
    }
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
    let image = client
        .generate_with(request, |event| match event {
            Event::Queued { position } => bar.set_message(format!("queued #{position}")),
            Event::Started { worker } => bar.set_message(format!("on {worker}")),
            Event::Progress { done, total } => {
                bar.set_length(u64::from(*total));
                bar.set_position(u64::from(*done));
                bar.set_message("drawing");
            }
            Event::Partial(p) => {
                let path = preview_path(&args.output, p.index);
                match std::fs::write(&path, &p.png) {
                    Ok(()) => bar.set_message(format!("preview {}", p.index)),
                    Err(e) => bar.println(format!("cannot write {}: {e}", path.display())),
                }
            }
            Event::Completed(_) => bar.finish_and_clear(),
        })
        .await
        .map_err(|e| match e {
            kiln_client::Error::Status { status, .. } => describe(status),
            other => other.into(),
        })?;
    std::fs::write(&args.output, &image.png)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let usage = image.usage.unwrap_or_default();
    println!(
        "wrote {} ({}x{}, {} bytes) request {} seed {} in {:.2}s queue + {:.2}s generation",
        args.output.display(),
        image.width,
        image.height,
        image.png.len(),
        image.request_id,
        usage.seed,
        usage.queue_seconds,
        usage.generation_seconds
    );
    Ok(())
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
