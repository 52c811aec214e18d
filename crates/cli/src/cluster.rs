//! Starting the parts: a worker over a loaded model, the scheduler, the gateway, and `up`, which runs
//! them all in one process (workers still talk gRPC on loopback, so the path is the cluster's).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use kiln_gateway::admission::{QuotaAdmission, QuotaSettings};
use kiln_gateway::auth::{KeyFileEntry, KeysFile, StoreKeys};
use kiln_gateway::backend::Backend;
use kiln_gateway::policy::StyleRules;
use kiln_gateway::signing::C2paSigner;
use kiln_gateway::{Gateway, GatewayConfig};
use kiln_model::{CandleEngine, ModelConfig, Transformer};
use kiln_quota::{keys::digest, MemoryStore, RedisConfig, RedisStore, Store, TierTable};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{GatewayOpts, WorkerOpts};

/// A shutdown signal that any number of servers can wait on.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves on Ctrl-C or SIGTERM, or when the returned sender fires.
    pub fn on_signal() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        let signal_tx = tx.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = signal_tx.send(true);
        });
        (tx, Shutdown(rx))
    }

    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The shipped model's directory inside the data directory.
pub fn default_model_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models").join("kiln-shapes")
}

/// Resolves the model directory: `--model`, else the shipped model (written into the data directory
/// on first use, and again when this binary ships another).
pub fn ensure_model(opts: &WorkerOpts, data_dir: &Path) -> Result<PathBuf> {
    if let Some(dir) = &opts.model {
        if !dir.join("config.json").exists() {
            bail!(
                "--model {}: no config.json there; train one with `kiln train --out {}` or create \
                 a random one with `kiln model init --out {}`",
                dir.display(),
                dir.display(),
                dir.display()
            );
        }
        return Ok(dir.clone());
    }
    let dir = default_model_dir(data_dir);
    if kiln_model::shipped::install(&dir).with_context(|| format!("writing {}", dir.display()))? {
        info!(dir = %dir.display(), "installed the shipped model kiln-shapes");
    }
    Ok(dir)
}

/// The model `kiln bench` measures without `--model`: the randomly initialised ~20M-parameter model
/// (created in the data directory), whose figures the README reports.
pub fn ensure_benchmark_model(model: &Option<PathBuf>, data_dir: &Path) -> Result<PathBuf> {
    if let Some(dir) = model {
        return Ok(dir.clone());
    }
    let dir = data_dir.join("models").join(ModelConfig::random_20m().name);
    if !dir.join("model.safetensors").exists() {
        Transformer::init_random(&ModelConfig::random_20m(), 0, &dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(dir)
}

fn device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal: usize = name
        .strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("device {name:?}"))?;
    Device::new_cuda(ordinal)
        .with_context(|| format!("opening {name} (is this binary built with `--features cuda`?)"))
}

/// Loads the model and builds its engine.
/// The engine `opts` asks for: the model on its device, or the simulated accelerator (which takes
/// the model's shape from `model_dir`'s `config.json` when given, else the default model's).
pub fn build_worker_engine(
    opts: &WorkerOpts,
    data_dir: &Path,
) -> Result<Box<dyn kiln_model::Engine>> {
    if opts.backend == "simulated" {
        let config = match &opts.model {
            Some(dir) => {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("--model: reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("--model: parsing {}", path.display()))?
            }
            None => kiln_model::ModelConfig::random_20m(),
        };
        let mut cost = kiln_model::StepCost::load(&opts.step_cost)
            .map_err(|e| anyhow::anyhow!("--step-cost: {e}"))?;
        if let Some(tpp) = opts.tokens_per_pass {
            cost = cost
                .with_tokens_per_pass(tpp)
                .map_err(|e| anyhow::anyhow!("--tokens-per-pass: {e}"))?;
        }
        warn!(step_cost = %cost.name, "simulated backend: no model runs; images are flat placeholders");
        return Ok(Box::new(kiln_model::SimulatedEngine::new(
            config,
            cost,
            opts.kv_blocks,
            opts.block_size,
            opts.max_batch,
        )));
    }
    let model_dir = ensure_model(opts, data_dir)?;
    Ok(Box::new(build_engine(opts, &model_dir)?))
}

pub fn build_engine(opts: &WorkerOpts, model_dir: &Path) -> Result<CandleEngine> {
    let model = Transformer::load(model_dir, &device(&opts.device)?)
        .with_context(|| format!("loading model from {}", model_dir.display()))?;
    let mut engine = CandleEngine::new(model, opts.kv_blocks, opts.block_size, opts.max_batch);
    if opts.speculation.is_some() {
        engine.set_speculation(opts.speculation);
    }
    engine.set_speculation_rows((opts.speculation_rows > 0).then_some(opts.speculation_rows));
    if engine.speculation() > 1 {
        info!(
            window = engine.speculation(),
            rows = opts.speculation_rows,
            "speculative Jacobi decoding on"
        );
    }
    Ok(engine)
}

/// Builds the gateway's pipeline over `backend`: the key and quota store (Redis, or memory seeded
/// from the keys file), the tier table, the content policy, and their followers.
pub async fn build_gateway(
    opts: &GatewayOpts,
    keys: Option<&Path>,
    backend: Arc<dyn Backend>,
    data_dir: &Path,
) -> Result<Gateway> {
    // First, so that a misconfigured signer stops the gateway before it touches anything else.
    let signer = build_signer(opts, data_dir)?;
    let store: Arc<dyn Store> = match &opts.redis {
        Some(url) => {
            let mut config = RedisConfig::new(url.clone());
            config.prefix = opts.redis_prefix.clone();
            Arc::new(RedisStore::new(config).map_err(|e| anyhow::anyhow!("--redis: {e}"))?)
        }
        None => Arc::new(MemoryStore::new()),
    };
    if let Some(path) = keys {
        let file = KeysFile::load(path).map_err(|e| anyhow::anyhow!("--keys: {e}"))?;
        file.import(&*store)
            .await
            .map_err(|e| anyhow::anyhow!("--keys: {e}"))?;
    } else if opts.redis.is_none() {
        bail!(
            "--keys (KILN_GATEWAY_KEYS) is required without --redis: nobody could call the gateway"
        );
    }
    let tiers = match &opts.tiers {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--tiers: reading {}", path.display()))?;
            TierTable::from_toml(&text).with_context(|| format!("--tiers {}", path.display()))?
        }
        None => TierTable::shipped(),
    };
    kiln_telemetry::export_gateway_series(
        &kiln_quota::tiers::TIER_NAMES,
        &[kiln_policy::LIVING_ARTIST_STYLE],
    );
    let admission = Arc::new(QuotaAdmission::new(
        store.clone(),
        tiers,
        QuotaSettings {
            lease: Duration::from_secs(opts.quota_lease),
            ..Default::default()
        },
    ));
    let refresh = Duration::from_millis(opts.refresh_ms);
    if let Err(e) = admission.refresh_tiers().await {
        warn!(error = %e, "could not read the tier table from the store yet; using the configured one");
    }
    tokio::spawn(admission.clone().follow_tiers(refresh));
    tokio::spawn(admission.clone().follow_load(backend.clone(), refresh));
    let policy = match &opts.policy {
        Some(path) => {
            StyleRules::from_file(path.clone()).map_err(|e| anyhow::anyhow!("--policy: {e}"))?
        }
        None => StyleRules::shipped(),
    };
    tokio::spawn(policy.clone().follow(refresh));
    Ok(Gateway {
        config: GatewayConfig {
            request_deadline: Duration::from_secs(opts.request_deadline),
        },
        auth: Arc::new(StoreKeys::new(opts.pepper.clone(), store)),
        policy: Arc::new(policy),
        admission,
        signer: Arc::new(signer),
        backend,
    })
}

/// Where `kiln up` and a gateway without configured keys keep their development CA.
pub fn dev_signing_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("c2pa")
}

/// The C2PA signer of `opts`, proven by a test signature; the development CA of `data_dir` when no
/// credentials are configured.
pub fn build_signer(opts: &GatewayOpts, data_dir: &Path) -> Result<C2paSigner> {
    let credentials = match (&opts.c2pa_cert_chain, &opts.c2pa_private_key) {
        (Some(chain), Some(key)) => kiln_provenance::Credentials::from_files(chain, key)
            .map_err(|e| anyhow::anyhow!("--c2pa-cert-chain/--c2pa-private-key: {e}"))?,
        (None, None) => {
            let dir = dev_signing_dir(data_dir);
            let dev = kiln_provenance::dev_credentials(&dir)
                .map_err(|e| anyhow::anyhow!("development signing credentials: {e}"))?;
            warn!(
                ca = %dev.ca_path.display(),
                created = dev.created,
                "signing images with a DEVELOPMENT certificate: verifiers trust it only with this CA; \
                 configure --c2pa-cert-chain and --c2pa-private-key for production"
            );
            dev.credentials
        }
        _ => anyhow::bail!("--c2pa-cert-chain and --c2pa-private-key must be given together"),
    };
    let signer = kiln_provenance::ImageSigner::new(
        &credentials,
        kiln_provenance::SignerOptions {
            tsa_url: opts.c2pa_tsa_url.clone(),
            include_prompt: opts.c2pa_include_prompt,
        },
    )
    .map_err(|e| anyhow::anyhow!("C2PA signer (--c2pa-cert-chain, --c2pa-private-key): {e}"))?;
    Ok(C2paSigner(signer))
}

/// Makes sure a development API key exists in `data_dir`; returns the keys file path.
pub fn ensure_dev_key(data_dir: &Path, pepper: &str) -> Result<PathBuf> {
    let keys_path = data_dir.join("api-keys.toml");
    let key_path = data_dir.join("dev-api-key");
    if keys_path.exists() && key_path.exists() {
        return Ok(keys_path);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let key = format!("kiln-dev-{}", uuid::Uuid::new_v4().simple());
    let file = KeysFile {
        keys: vec![KeyFileEntry {
            id: "dev".into(),
            sha256: digest(pepper, &key),
            user: "dev".into(),
            org: None,
            tier: "pro".into(),
        }],
    };
    std::fs::write(&keys_path, toml::to_string(&file)?)
        .with_context(|| format!("writing {}", keys_path.display()))?;
    write_private(&key_path, &key)?;
    info!(keys = %keys_path.display(), key_file = %key_path.display(), "created a development API key (user dev, tier pro)");
    Ok(keys_path)
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Binds a listener, naming the setting on failure.
pub async fn bind(addr: SocketAddr, setting: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{setting}: cannot listen on {addr}"))
}

/// Prints `kiln <role> listening on <addr>` on stdout, so that whoever started the process with
/// `--listen 127.0.0.1:0` learns the port without racing for one.
pub fn announce(role: &str, listener: &TcpListener) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "kiln {role} listening on {}", listener.local_addr()?)?;
    out.flush()?;
    Ok(())
}

/// Where a process serves an optional endpoint (`/metrics`, the HTTP API): an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionalListen {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for OptionalListen {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(OptionalListen::Off);
        }
        s.parse().map(OptionalListen::At).map_err(|e| {
            format!("{s:?} is neither `off` nor an address such as 127.0.0.1:9464 ({e})")
        })
    }
}

/// Default `/metrics` addresses, one port per role so that a gateway, a scheduler and a worker on
/// one host do not collide (docs/operations.md).
pub mod metrics_defaults {
    pub const GATEWAY: &str = "127.0.0.1:9461";
    pub const SCHEDULER: &str = "127.0.0.1:9462";
    pub const WORKER: &str = "127.0.0.1:9463";
    pub const UP: &str = "127.0.0.1:9464";
}

/// Binds an optional endpoint: at `setting`, or when none is given at `default` (none: off), and
/// when something else already holds the default port (a second process of the same role on the
/// host), at a free port, logged. `off` binds nothing.
async fn bind_optional(
    setting: Option<OptionalListen>,
    default: Option<&str>,
    flag: &str,
) -> Result<Option<TcpListener>> {
    let default = match setting {
        Some(OptionalListen::Off) => return Ok(None),
        Some(OptionalListen::At(addr)) => return bind(addr, flag).await.map(Some),
        None => match default {
            None => return Ok(None),
            Some(d) => d,
        },
    };
    let addr: SocketAddr = default
        .parse()
        .with_context(|| format!("default of {flag}"))?;
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = bind(SocketAddr::new(addr.ip(), 0), flag).await?;
            warn!(default = %addr, actual = ?listener.local_addr().ok(), "the default port of {flag} is taken: serving on a free port (set {flag} to choose)");
            Ok(Some(listener))
        }
        Err(e) => Err(e).with_context(|| format!("{flag}: cannot listen on {addr}")),
    }
}

/// Where `kiln up` serves the OpenAI-compatible HTTP API unless told otherwise.
pub const HTTP_DEFAULT: &str = "127.0.0.1:8080";

/// Starts the OpenAI-compatible HTTP API of `gateway` (see [`bind_optional`]) and returns its
/// address.
pub async fn serve_http(
    setting: Option<OptionalListen>,
    default: Option<&str>,
    gateway: Arc<kiln_gateway::Gateway>,
    shutdown: &Shutdown,
) -> Result<Option<SocketAddr>> {
    let Some(listener) = bind_optional(setting, default, "--http-listen").await? else {
        return Ok(None);
    };
    let addr = listener.local_addr()?;
    tokio::spawn(kiln_gateway::openai::run(
        gateway,
        listener,
        shutdown.clone().wait(),
    ));
    Ok(Some(addr))
}

/// Starts the `/metrics` endpoint (see [`bind_optional`]) and returns its address.
pub async fn serve_metrics(
    setting: Option<OptionalListen>,
    default: &str,
    shutdown: &Shutdown,
) -> Result<Option<SocketAddr>> {
    let Some(listener) = bind_optional(setting, Some(default), "--metrics-listen").await? else {
        return Ok(None);
    };
    let addr = listener.local_addr()?;
    tokio::spawn(kiln_telemetry::serve_metrics(
        listener,
        shutdown.clone().wait(),
    ));
    Ok(Some(addr))
}

/// Prints `kiln <role> metrics on http://<addr>/metrics` on stderr (stdout's one line is the
/// `listening on` announcement that launchers read).
pub fn announce_metrics(role: &str, addr: Option<SocketAddr>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stderr().lock();
    match addr {
        Some(addr) => writeln!(out, "kiln {role} metrics on http://{addr}/metrics")?,
        None => writeln!(out, "kiln {role} metrics off")?,
    }
    out.flush()?;
    Ok(())
}

/// A scheduler replica under etcd election: it serves at once (a standby answers `Submit` with a
/// retryable `UNAVAILABLE` naming the leader), campaigns, and once elected starts the runtime and
/// follows the worker set in etcd. A leader that loses its lease exits, so that it can never drive
/// workers beside its successor; its supervisor restarts it as a standby.
pub async fn run_elected_scheduler(
    config: kiln_membership::EtcdConfig,
    me: String,
    runtime: kiln_scheduler::RuntimeConfig,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<()> {
    let (handle_tx, handle_rx) = watch::channel(None);
    let leader = kiln_membership::follow_leader(config.clone());
    let service = kiln_scheduler::service::SchedulerService::elected(handle_rx, me.clone(), leader);
    let server = tokio::spawn(kiln_scheduler::service::run(
        service,
        listener,
        shutdown.clone().wait(),
    ));
    info!(%me, "standing by; campaigning for leadership");
    let mut leadership = tokio::select! {
        l = kiln_membership::campaign(&config, &me) => l,
        _ = shutdown.clone().wait() => {
            let _ = server.await;
            return Ok(());
        }
    };
    let handle = kiln_scheduler::spawn(kiln_scheduler::RuntimeConfig {
        epoch: leadership.epoch,
        ..runtime
    });
    let mut members = kiln_membership::watch_workers(config);
    let membership = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut addresses: std::collections::HashMap<String, String> = Default::default();
            while let Some(event) = members.recv().await {
                match event {
                    kiln_membership::MembershipEvent::Up(record) => {
                        if let Some(old) =
                            addresses.insert(record.name.clone(), record.address.clone())
                        {
                            if old != record.address {
                                handle.leave_worker(old);
                            }
                        }
                        handle.join_worker(record.address);
                    }
                    kiln_membership::MembershipEvent::Down { name } => {
                        if let Some(address) = addresses.remove(&name) {
                            handle.leave_worker(address);
                        }
                    }
                }
            }
        })
    };
    let _ = handle_tx.send(Some(handle));
    telemetry_leader(true);
    tokio::select! {
        _ = leadership.lost() => {
            tracing::error!(%me, "lost scheduler leadership (lease not renewed); exiting so that a standby takes over");
            std::process::exit(3);
        }
        _ = shutdown.clone().wait() => {
            membership.abort();
            leadership.resign().await;
        }
    }
    let _ = server.await;
    Ok(())
}

fn telemetry_leader(leading: bool) {
    kiln_telemetry::SCHEDULER_LEADER.set(i64::from(leading));
}
