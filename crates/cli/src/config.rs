//! Configuration in one place: the option groups shared by several commands (flags with `long, env`
//! and a default each), the config file that fills unset environment variables (so precedence is
//! file < environment < flags), and `validate()` checks that name the offending setting.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_telemetry::env_names as env;

/// Loads `[section]` tables of a TOML file into `KILN_<SECTION>_<KEY>` variables that are not set yet.
pub fn apply_config_file(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config file {}", path.display()))?;
    for (section, values) in table {
        let toml::Value::Table(values) = values else {
            bail!(
                "config file {}: `{section}` must be a table like [worker]",
                path.display()
            );
        };
        for (key, value) in values {
            let name = format!(
                "KILN_{}_{}",
                section.to_uppercase(),
                key.to_uppercase().replace('-', "_")
            );
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Array(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            if std::env::var_os(&name).is_none() {
                // Single-threaded here: main calls this before starting the runtime.
                std::env::set_var(name, value);
            }
        }
    }
    Ok(())
}

/// Where a worker's model lives and how much it may hold.
#[derive(Args, Clone, Debug)]
pub struct WorkerOpts {
    /// Model directory (config.json + model.safetensors). Default: the data directory's default model,
    /// created on first start while no trained model is shipped.
    #[arg(long, env = env::WORKER_MODEL)]
    pub model: Option<PathBuf>,
    /// Device: `cpu`, or `cuda:N` in builds with the `cuda` feature.
    #[arg(long, env = env::WORKER_DEVICE, default_value = "cpu")]
    pub device: String,
    /// KV-cache blocks per worker: what the scheduler may reserve. A model served with
    /// classifier-free guidance holds as many again for its images' prompt-less twins.
    #[arg(long, env = env::WORKER_KV_BLOCKS, default_value_t = 4096)]
    pub kv_blocks: usize,
    /// Tokens per KV-cache block.
    #[arg(long, env = env::WORKER_BLOCK_SIZE, default_value_t = 16)]
    pub block_size: usize,
    /// Most sequences in one batch.
    #[arg(long, env = env::WORKER_MAX_BATCH, default_value_t = 64)]
    pub max_batch: usize,
    /// `candle` runs the model; `simulated` does no math and takes the time --step-cost predicts,
    /// with real KV-block accounting (load tests of a large fleet on one machine).
    #[arg(long, env = env::WORKER_BACKEND, default_value = "candle", value_parser = ["candle", "simulated"])]
    pub backend: String,
    /// Step-time calibration of the simulated backend: `cpu-20m`, `h100-20m` or a TOML file.
    #[arg(long, env = env::WORKER_STEP_COST, default_value = "cpu-20m")]
    pub step_cost: String,
    /// Speculative Jacobi decoding: tokens each decode pass drafts and verifies per image, 1 to
    /// 64 (1: off). Default: the model's `speculation` in config.json, else off. The images are
    /// the same either way; a request can lower it (`SamplingParams.speculation`).
    #[arg(long, env = env::WORKER_SPECULATION)]
    pub speculation: Option<usize>,
    /// Rows a decode pass may compute before the windows narrow (0: no limit). Speculating
    /// pays while a pass is cheap for its rows: on a CPU until about 16, on a GPU far more.
    #[arg(long, env = env::WORKER_SPECULATION_ROWS, default_value_t = kiln_model::engine::DEFAULT_SPECULATION_ROWS)]
    pub speculation_rows: usize,
    /// Image tokens a sequence advances per decode pass on the simulated backend (what
    /// speculation was measured to accept). Default: the calibration's.
    #[arg(long, env = env::WORKER_TOKENS_PER_PASS)]
    pub tokens_per_pass: Option<f64>,
}

impl WorkerOpts {
    pub fn validate(&self) -> Result<()> {
        if self.kv_blocks == 0 {
            bail!("--kv-blocks ({}) must be positive", env::WORKER_KV_BLOCKS);
        }
        if self.block_size == 0 || self.block_size > 1024 {
            bail!(
                "--block-size ({}) must be in 1..=1024",
                env::WORKER_BLOCK_SIZE
            );
        }
        if self.max_batch == 0 {
            bail!("--max-batch ({}) must be positive", env::WORKER_MAX_BATCH);
        }
        if let Some(w) = self.speculation {
            if !(1..=kiln_model::MAX_SPECULATION).contains(&w) {
                bail!(
                    "--speculation ({}) must be 1 (off) to {} tokens per pass, got {w}",
                    env::WORKER_SPECULATION,
                    kiln_model::MAX_SPECULATION
                );
            }
        }
        if self.device != "cpu" && !self.device.starts_with("cuda:") {
            bail!(
                "--device ({}) must be `cpu` or `cuda:N`, got {:?}",
                env::WORKER_DEVICE,
                self.device
            );
        }
        Ok(())
    }
}

/// How the scheduler batches.
#[derive(Args, Clone, Debug)]
pub struct BatchingOpts {
    /// Most decode steps per worker call (more saves round trips, fewer keep progress fresh).
    #[arg(long, env = env::SCHEDULER_MAX_STEPS_PER_CALL, default_value_t = 4)]
    pub max_steps_per_call: usize,
    /// Most prompt tokens prefilled in one call.
    #[arg(long, env = env::SCHEDULER_MAX_PREFILL_TOKENS, default_value_t = 8192)]
    pub max_prefill_tokens: usize,
    /// Static batching (benchmark baseline): new jobs join only an empty batch.
    #[arg(long, env = env::SCHEDULER_STATIC_BATCHING, default_value_t = false)]
    pub static_batching: bool,
    /// Seconds from arrival to last token per tier (free,plus,pro,team); a job predicted to finish
    /// later is shed with RESOURCE_EXHAUSTED and a retry delay.
    #[arg(long, env = env::SCHEDULER_DEADLINES, default_value = "90,60,45,45", value_delimiter = ',')]
    pub deadlines: Vec<f64>,
    /// Most jobs waiting at once; beyond it the lowest tier's newest job is shed.
    #[arg(long, env = env::SCHEDULER_MAX_WAITING, default_value_t = 4096)]
    pub max_waiting: usize,
    /// Shed only at the queue bound, never by predicted finish time (benchmark baseline).
    #[arg(long, env = env::SCHEDULER_NO_DEADLINE_SHEDDING, default_value_t = false)]
    pub no_deadline_shedding: bool,
}

impl BatchingOpts {
    pub fn validate(&self) -> Result<()> {
        if self.max_steps_per_call == 0
            || self.max_steps_per_call > kiln_worker::MAX_STEPS_PER_CALL as usize
        {
            bail!(
                "--max-steps-per-call ({}) must be in 1..={}",
                env::SCHEDULER_MAX_STEPS_PER_CALL,
                kiln_worker::MAX_STEPS_PER_CALL
            );
        }
        if self.max_prefill_tokens == 0 {
            bail!(
                "--max-prefill-tokens ({}) must be positive",
                env::SCHEDULER_MAX_PREFILL_TOKENS
            );
        }
        if self.deadlines.len() != 4 || self.deadlines.iter().any(|d| !(*d > 0.0 && *d < 86400.0)) {
            bail!(
                "--deadlines ({}) must be four positive seconds (free,plus,pro,team), got {:?}",
                env::SCHEDULER_DEADLINES,
                self.deadlines
            );
        }
        if self.max_waiting == 0 {
            bail!(
                "--max-waiting ({}) must be positive",
                env::SCHEDULER_MAX_WAITING
            );
        }
        Ok(())
    }

    pub fn to_config(&self) -> kiln_scheduler::SchedulerConfig {
        let d = |i: usize| {
            std::time::Duration::from_secs_f64(self.deadlines.get(i).copied().unwrap_or(60.0))
        };
        kiln_scheduler::SchedulerConfig {
            deadlines: [d(0), d(1), d(2), d(3)],
            max_waiting: self.max_waiting,
            shed_by_deadline: !self.no_deadline_shedding,
            deadline_headroom: 0.9,
            max_steps_per_call: self.max_steps_per_call,
            max_prefill_tokens: self.max_prefill_tokens,
            static_batching: self.static_batching,
        }
    }
}

/// Cluster membership in etcd (shared by worker, scheduler and gateway).
#[derive(Args, Clone, Debug)]
pub struct EtcdOpts {
    /// etcd endpoints (`http://host:port`, comma-separated). Workers register there, schedulers
    /// elect a leader and watch the workers, gateways follow the leader.
    #[arg(long, env = env::ETCD, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Prefix of Kiln's etcd keys.
    #[arg(long, env = env::ETCD_PREFIX, default_value = "kiln/")]
    pub etcd_prefix: String,
    /// Seconds a member's lease lives without renewal (how long a crashed member stays listed).
    #[arg(long, env = env::LEASE_TTL, default_value_t = 5)]
    pub lease_ttl: u64,
    /// Address others reach this process at (default: `http://` + the bound listen address).
    #[arg(long, env = env::ADVERTISE)]
    pub advertise: Option<String>,
}

impl EtcdOpts {
    pub fn validate(&self) -> Result<()> {
        if !(1..=300).contains(&self.lease_ttl) {
            bail!("--lease-ttl ({}) must be 1 to 300 seconds", env::LEASE_TTL);
        }
        if let Some(e) = self
            .etcd
            .iter()
            .find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            bail!(
                "--etcd ({}) endpoints must be http(s)://host:port, got {e:?}",
                env::ETCD
            );
        }
        Ok(())
    }

    /// The membership settings, when etcd is configured.
    pub fn config(&self) -> Option<kiln_membership::EtcdConfig> {
        (!self.etcd.is_empty()).then(|| kiln_membership::EtcdConfig {
            endpoints: self.etcd.clone(),
            prefix: self.etcd_prefix.clone(),
            lease_ttl: std::time::Duration::from_secs(self.lease_ttl),
        })
    }

    /// The address to advertise for a server bound at `bound`.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"))
    }
}

/// Gateway admission settings.
#[derive(Args, Clone, Debug)]
pub struct GatewayOpts {
    /// API keys file (TOML, `[[keys]]` with id, sha256, user, tier). `kiln up` creates a development key
    /// in the data directory when none is given.
    #[arg(long, env = env::GATEWAY_KEYS)]
    pub keys: Option<PathBuf>,
    /// Pepper mixed into API-key digests (a secret; never logged).
    #[arg(long, env = env::API_KEY_PEPPER, default_value = "", hide_env_values = true)]
    pub pepper: String,
    /// Seconds a request may take before it is cancelled with DEADLINE_EXCEEDED.
    #[arg(long, env = env::GATEWAY_REQUEST_DEADLINE, default_value_t = 600)]
    pub request_deadline: u64,
    /// Redis URL holding API keys, quotas and the tier table, shared by every gateway
    /// (`redis://host:port`, or `redis+cluster://host:port,host:port` for a Redis Cluster's seed
    /// nodes). Without it the gateway keeps them in memory (one gateway; keys from --keys).
    #[arg(long, env = env::GATEWAY_REDIS)]
    pub redis: Option<String>,
    /// Prefix of every Redis key Kiln writes.
    #[arg(long, env = env::GATEWAY_REDIS_PREFIX, default_value = "kiln:")]
    pub redis_prefix: String,
    /// Tier table (TOML) used until an operator stores one with `kiln admin tiers set`; the
    /// launch-day defaults when not given.
    #[arg(long, env = env::GATEWAY_TIERS)]
    pub tiers: Option<PathBuf>,
    /// Content-policy artist list (TOML), re-read when it changes; the shipped list when not given.
    #[arg(long, env = env::GATEWAY_POLICY)]
    pub policy: Option<PathBuf>,
    /// Milliseconds between looks at the tier table, the policy file and the cluster's load.
    #[arg(long, env = env::GATEWAY_REFRESH_MS, default_value_t = 2000)]
    pub refresh_ms: u64,
    /// Seconds an in-flight slot is held without renewal (a dead gateway's slots free after this).
    #[arg(long, env = env::GATEWAY_QUOTA_LEASE, default_value_t = 30)]
    pub quota_lease: u64,
    /// C2PA signing certificate chain (PEM, signing certificate first). Without it and
    /// --c2pa-private-key, images are signed with a development CA kept in the data directory.
    #[arg(long, env = env::GATEWAY_C2PA_CERT_CHAIN, requires = "c2pa_private_key")]
    pub c2pa_cert_chain: Option<PathBuf>,
    /// The C2PA signing certificate's private key (PEM; a secret, never logged).
    #[arg(long, env = env::GATEWAY_C2PA_PRIVATE_KEY, requires = "c2pa_cert_chain")]
    pub c2pa_private_key: Option<PathBuf>,
    /// RFC 3161 time-stamp authority for the manifests. Unset, signing never touches the network.
    #[arg(long, env = env::GATEWAY_C2PA_TSA_URL)]
    pub c2pa_tsa_url: Option<String>,
    /// Record the prompt in each image's Kiln assertion (off: prompts may be private).
    #[arg(long, env = env::GATEWAY_C2PA_INCLUDE_PROMPT)]
    pub c2pa_include_prompt: bool,
}

impl GatewayOpts {
    pub fn validate(&self) -> Result<()> {
        if self.request_deadline == 0 {
            bail!(
                "--request-deadline ({}) must be positive",
                env::GATEWAY_REQUEST_DEADLINE
            );
        }
        if !(50..=600_000).contains(&self.refresh_ms) {
            bail!(
                "--refresh-ms ({}) must be 50 to 600000, got {}",
                env::GATEWAY_REFRESH_MS,
                self.refresh_ms
            );
        }
        if !(3..=3600).contains(&self.quota_lease) {
            bail!(
                "--quota-lease ({}) must be 3 to 3600 seconds, got {}",
                env::GATEWAY_QUOTA_LEASE,
                self.quota_lease
            );
        }
        if let Some(url) = &self.redis {
            let cluster = kiln_quota::redis_store::CLUSTER_SCHEME;
            if !url.starts_with("redis://")
                && !url.starts_with("rediss://")
                && !url.starts_with(cluster)
            {
                bail!(
                    "--redis ({}) must be a redis:// URL, or {cluster}host:port,host:port for a \
                     Redis Cluster, got {url:?}",
                    env::GATEWAY_REDIS
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_fills_only_unset_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(
            &path,
            "[testsection]\nalpha = 7\nbeta = \"x\"\nlist = [\"a\", \"b\"]\n",
        )
        .unwrap();
        std::env::set_var("KILN_TESTSECTION_BETA", "from-env");
        apply_config_file(&path).unwrap();
        assert_eq!(std::env::var("KILN_TESTSECTION_ALPHA").unwrap(), "7");
        assert_eq!(std::env::var("KILN_TESTSECTION_BETA").unwrap(), "from-env");
        assert_eq!(std::env::var("KILN_TESTSECTION_LIST").unwrap(), "a,b");
        std::fs::write(&path, "top = 1\n").unwrap();
        assert!(apply_config_file(&path)
            .unwrap_err()
            .to_string()
            .contains("must be a table"));
    }
}

/// Distributed tracing (off unless an OTLP endpoint is set). Global: every command takes them.
#[derive(Args, Clone, Debug)]
pub struct TracingOpts {
    /// OTLP/gRPC collector that receives spans, e.g. `http://otel-collector:4317`.
    #[arg(long, global = true, env = env::TRACE_OTLP_ENDPOINT)]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces kept, in [0, 1]; a request that arrives with a sampled `traceparent` is
    /// always traced.
    #[arg(long, global = true, env = env::TRACE_SAMPLE_RATIO, default_value_t = 1.0)]
    pub trace_sample_ratio: f64,
}

impl TracingOpts {
    /// The telemetry crate's view of these flags, for the component named `service`.
    pub fn config(&self, service: &str) -> kiln_telemetry::TracingConfig {
        kiln_telemetry::TracingConfig {
            service: service.to_string(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            sample_ratio: self.trace_sample_ratio,
        }
    }
}
