//! Observability plumbing shared by every component: the one list of metric names (all `kiln_`
//! prefixed, base units), the process-wide Prometheus registry with the metrics registered on it, a
//! text encoder for `/metrics`, the logging setup (human or JSON), and distributed tracing ([`trace`]:
//! the OTLP exporter, the one sampling decision, the W3C context passed between components). It
//! holds no business logic: components record into these metrics and spans where the events happen.

#![forbid(unsafe_code)]

use std::sync::LazyLock;

pub mod trace;
pub use trace::{TraceContext, TracingConfig, TracingError, TracingGuard};

use prometheus::{
    register_gauge_vec, register_histogram_vec, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, GaugeVec, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
};

/// Every metric name Kiln exports.
pub mod names {
    pub const GATEWAY_REQUESTS: &str = "kiln_gateway_requests_total";
    pub const GATEWAY_REQUEST_DURATION: &str = "kiln_gateway_request_duration_seconds";
    pub const GATEWAY_QUOTA_REFUSALS: &str = "kiln_gateway_quota_refusals_total";
    pub const GATEWAY_QUOTA_REFUNDS: &str = "kiln_gateway_quota_refunds_total";
    pub const GATEWAY_QUOTA_FAIL_OPEN: &str = "kiln_gateway_quota_fail_open_admissions_total";
    pub const GATEWAY_STORE_ERRORS: &str = "kiln_gateway_store_errors_total";
    pub const GATEWAY_ADMISSION_DURATION: &str = "kiln_gateway_admission_duration_seconds";
    pub const GATEWAY_TIGHTENING: &str = "kiln_gateway_quota_tightening_ratio";
    pub const GATEWAY_POLICY_REFUSALS: &str = "kiln_gateway_policy_refusals_total";
    pub const GATEWAY_IDEMPOTENT_REPLAYS: &str = "kiln_gateway_idempotent_replays_total";
    pub const SCHEDULER_QUEUE_DEPTH: &str = "kiln_scheduler_queue_depth";
    pub const SCHEDULER_RUNNING: &str = "kiln_scheduler_running_sequences";
    pub const SCHEDULER_WORKERS: &str = "kiln_scheduler_workers";
    pub const SCHEDULER_REQUEUED: &str = "kiln_scheduler_requeued_total";
    pub const SCHEDULER_SHED: &str = "kiln_scheduler_shed_total";
    pub const SCHEDULER_LEADER: &str = "kiln_scheduler_is_leader";
    pub const SCHEDULER_DECISION_DURATION: &str = "kiln_scheduler_decision_duration_seconds";
    pub const SCHEDULER_WORKER_CALL_DURATION: &str = "kiln_scheduler_worker_call_duration_seconds";
    pub const WORKER_STEP_DURATION: &str = "kiln_worker_step_duration_seconds";
    pub const WORKER_KV_BLOCKS_USED: &str = "kiln_worker_kv_blocks_used";
    pub const WORKER_KV_BLOCKS_CAPACITY: &str = "kiln_worker_kv_blocks_capacity";
    pub const WORKER_TOKENS: &str = "kiln_worker_generated_tokens_total";
    pub const WORKER_FENCED_CALLS: &str = "kiln_worker_fenced_calls_total";
    pub const WORKER_TOKENS_PER_PASS: &str = "kiln_worker_accepted_tokens_per_pass";
    pub const WORKER_PASSES_PER_IMAGE: &str = "kiln_worker_forward_passes_per_image";
    pub const WORKER_BATCH_SLOTS_USED: &str = "kiln_worker_batch_slots_used";
    pub const WORKER_BATCH_SLOTS_CAPACITY: &str = "kiln_worker_batch_slots_capacity";
    pub const MEMBERSHIP_ETCD_ERRORS: &str = "kiln_membership_etcd_errors_total";
    pub const SCHEDULER_OLDEST_WAIT: &str = "kiln_scheduler_oldest_wait_seconds";
    pub const SCHEDULER_QUEUE_WAIT: &str = "kiln_scheduler_queue_wait_seconds";
    pub const SCHEDULER_SATURATION: &str = "kiln_scheduler_saturation_ratio";
    pub const SCHEDULER_BACKLOG: &str = "kiln_scheduler_backlog_seconds";
    pub const GATEWAY_FIRST_PROGRESS: &str = "kiln_gateway_time_to_first_progress_seconds";
    pub const WORKER_MEMORY_USED: &str = "kiln_worker_device_memory_used_bytes";
    pub const WORKER_MEMORY_TOTAL: &str = "kiln_worker_device_memory_total_bytes";
    pub const BUILD_INFO: &str = "kiln_build_info";
    pub const GATEWAY_SIGNING_DURATION: &str = "kiln_gateway_signing_duration_seconds";
    pub const GATEWAY_MANIFEST_BYTES: &str = "kiln_gateway_manifest_bytes";

    /// Every name above, for checks of dashboards and alert rules.
    pub const ALL: &[&str] = &[
        GATEWAY_REQUESTS,
        GATEWAY_REQUEST_DURATION,
        GATEWAY_QUOTA_REFUSALS,
        GATEWAY_QUOTA_REFUNDS,
        GATEWAY_QUOTA_FAIL_OPEN,
        GATEWAY_STORE_ERRORS,
        GATEWAY_ADMISSION_DURATION,
        GATEWAY_TIGHTENING,
        GATEWAY_POLICY_REFUSALS,
        GATEWAY_IDEMPOTENT_REPLAYS,
        SCHEDULER_QUEUE_DEPTH,
        SCHEDULER_RUNNING,
        SCHEDULER_WORKERS,
        SCHEDULER_REQUEUED,
        SCHEDULER_SHED,
        SCHEDULER_LEADER,
        SCHEDULER_DECISION_DURATION,
        SCHEDULER_WORKER_CALL_DURATION,
        WORKER_STEP_DURATION,
        WORKER_KV_BLOCKS_USED,
        WORKER_KV_BLOCKS_CAPACITY,
        WORKER_TOKENS,
        WORKER_FENCED_CALLS,
        WORKER_TOKENS_PER_PASS,
        WORKER_PASSES_PER_IMAGE,
        WORKER_BATCH_SLOTS_USED,
        WORKER_BATCH_SLOTS_CAPACITY,
        MEMBERSHIP_ETCD_ERRORS,
        BUILD_INFO,
        SCHEDULER_OLDEST_WAIT,
        SCHEDULER_QUEUE_WAIT,
        SCHEDULER_SATURATION,
        SCHEDULER_BACKLOG,
        GATEWAY_FIRST_PROGRESS,
        WORKER_MEMORY_USED,
        WORKER_MEMORY_TOTAL,
        GATEWAY_SIGNING_DURATION,
        GATEWAY_MANIFEST_BYTES,
    ];
}

/// Every environment variable Kiln reads. Flags of `kiln <command>` read `KILN_<COMMAND>_<FLAG>`, and
/// a config file's `[command]` table fills those variables when they are unset, so the precedence is
/// file < environment < flags.
pub mod env_names {
    pub const CONFIG: &str = "KILN_CONFIG";
    pub const DATA_DIR: &str = "KILN_DATA_DIR";
    pub const API_KEY: &str = "KILN_API_KEY";
    pub const API_KEY_PEPPER: &str = "KILN_API_KEY_PEPPER";
    pub const GATEWAY: &str = "KILN_GATEWAY";
    pub const LOG_FORMAT: &str = "KILN_LOG_FORMAT";
    pub const LOG: &str = "KILN_LOG";
    pub const TRACE_OTLP_ENDPOINT: &str = "KILN_TRACE_OTLP_ENDPOINT";
    pub const TRACE_SAMPLE_RATIO: &str = "KILN_TRACE_SAMPLE_RATIO";

    pub const UP_LISTEN: &str = "KILN_UP_LISTEN";
    pub const UP_WORKERS: &str = "KILN_UP_WORKERS";
    pub const UP_METRICS_LISTEN: &str = "KILN_UP_METRICS_LISTEN";
    pub const UP_HTTP_LISTEN: &str = "KILN_UP_HTTP_LISTEN";
    pub const GATEWAY_HTTP_LISTEN: &str = "KILN_GATEWAY_HTTP_LISTEN";
    pub const GATEWAY_METRICS_LISTEN: &str = "KILN_GATEWAY_METRICS_LISTEN";
    pub const SCHEDULER_METRICS_LISTEN: &str = "KILN_SCHEDULER_METRICS_LISTEN";
    pub const WORKER_METRICS_LISTEN: &str = "KILN_WORKER_METRICS_LISTEN";

    pub const GATEWAY_LISTEN: &str = "KILN_GATEWAY_LISTEN";
    pub const GATEWAY_SCHEDULER: &str = "KILN_GATEWAY_SCHEDULER";
    pub const GATEWAY_KEYS: &str = "KILN_GATEWAY_KEYS";
    pub const GATEWAY_REQUEST_DEADLINE: &str = "KILN_GATEWAY_REQUEST_DEADLINE";
    pub const GATEWAY_REDIS: &str = "KILN_GATEWAY_REDIS";
    pub const GATEWAY_REDIS_PREFIX: &str = "KILN_GATEWAY_REDIS_PREFIX";
    pub const GATEWAY_TIERS: &str = "KILN_GATEWAY_TIERS";
    pub const GATEWAY_POLICY: &str = "KILN_GATEWAY_POLICY";
    pub const GATEWAY_REFRESH_MS: &str = "KILN_GATEWAY_REFRESH_MS";
    pub const GATEWAY_QUOTA_LEASE: &str = "KILN_GATEWAY_QUOTA_LEASE";
    pub const GATEWAY_C2PA_CERT_CHAIN: &str = "KILN_GATEWAY_C2PA_CERT_CHAIN";
    pub const GATEWAY_C2PA_PRIVATE_KEY: &str = "KILN_GATEWAY_C2PA_PRIVATE_KEY";
    pub const GATEWAY_C2PA_TSA_URL: &str = "KILN_GATEWAY_C2PA_TSA_URL";
    pub const GATEWAY_C2PA_INCLUDE_PROMPT: &str = "KILN_GATEWAY_C2PA_INCLUDE_PROMPT";
    pub const VERIFY_TRUST_ANCHORS: &str = "KILN_VERIFY_TRUST_ANCHORS";
    pub const ADMIN_REDIS: &str = "KILN_ADMIN_REDIS";
    pub const ETCD: &str = "KILN_ETCD";
    pub const ETCD_PREFIX: &str = "KILN_ETCD_PREFIX";
    pub const LEASE_TTL: &str = "KILN_LEASE_TTL";
    pub const ADVERTISE: &str = "KILN_ADVERTISE";
    pub const SCHEDULER_CALL_TIMEOUT: &str = "KILN_SCHEDULER_CALL_TIMEOUT";
    pub const STATUS_SCHEDULER: &str = "KILN_STATUS_SCHEDULER";
    pub const ADMIN_REDIS_PREFIX: &str = "KILN_ADMIN_REDIS_PREFIX";

    pub const SCHEDULER_LISTEN: &str = "KILN_SCHEDULER_LISTEN";
    pub const SCHEDULER_WORKERS: &str = "KILN_SCHEDULER_WORKERS";
    pub const SCHEDULER_MAX_STEPS_PER_CALL: &str = "KILN_SCHEDULER_MAX_STEPS_PER_CALL";
    pub const SCHEDULER_MAX_PREFILL_TOKENS: &str = "KILN_SCHEDULER_MAX_PREFILL_TOKENS";
    pub const SCHEDULER_STATIC_BATCHING: &str = "KILN_SCHEDULER_STATIC_BATCHING";
    pub const SCHEDULER_DEADLINES: &str = "KILN_SCHEDULER_DEADLINES";
    pub const SCHEDULER_MAX_WAITING: &str = "KILN_SCHEDULER_MAX_WAITING";
    pub const SCHEDULER_NO_DEADLINE_SHEDDING: &str = "KILN_SCHEDULER_NO_DEADLINE_SHEDDING";

    pub const WORKER_LISTEN: &str = "KILN_WORKER_LISTEN";
    pub const WORKER_NAME: &str = "KILN_WORKER_NAME";
    pub const WORKER_MODEL: &str = "KILN_WORKER_MODEL";
    pub const WORKER_DEVICE: &str = "KILN_WORKER_DEVICE";
    pub const WORKER_KV_BLOCKS: &str = "KILN_WORKER_KV_BLOCKS";
    pub const WORKER_BLOCK_SIZE: &str = "KILN_WORKER_BLOCK_SIZE";
    pub const WORKER_MAX_BATCH: &str = "KILN_WORKER_MAX_BATCH";
    pub const WORKER_BACKEND: &str = "KILN_WORKER_BACKEND";
    pub const WORKER_STEP_COST: &str = "KILN_WORKER_STEP_COST";
    pub const WORKER_SPECULATION: &str = "KILN_WORKER_SPECULATION";
    pub const WORKER_SPECULATION_ROWS: &str = "KILN_WORKER_SPECULATION_ROWS";
    pub const WORKER_TOKENS_PER_PASS: &str = "KILN_WORKER_TOKENS_PER_PASS";
}

/// Buckets for one model step: 1 ms to 10 s.
const STEP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Buckets for a whole request: 100 ms to 10 min.
const REQUEST_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub static GATEWAY_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::GATEWAY_REQUESTS,
        "Generate requests by tier, final gRPC code and protocol (grpc, or http: the OpenAI-compatible front door).",
        &["tier", "code", "protocol"]
    )
    .expect("metric registered once")
});
pub static GATEWAY_REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        names::GATEWAY_REQUEST_DURATION,
        "End-to-end Generate latency by tier and protocol (grpc, http).",
        &["tier", "protocol"],
        REQUEST_BUCKETS.to_vec()
    )
    .expect("metric registered once")
});
pub static GATEWAY_QUOTA_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::GATEWAY_QUOTA_REFUSALS,
        "Requests refused by a quota, by tier, limit kind (window, rate, in_flight) and scope (user, org).",
        &["tier", "limit", "scope"]
    )
    .expect("metric registered once")
});
pub static GATEWAY_QUOTA_REFUNDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::GATEWAY_QUOTA_REFUNDS,
        "Charges returned because no image was delivered, by tier.",
        &["tier"]
    )
    .expect("metric registered once")
});
pub static GATEWAY_QUOTA_FAIL_OPEN: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::GATEWAY_QUOTA_FAIL_OPEN,
        "Requests admitted by the gateway-local limiter while the quota store was unreachable, by tier.",
        &["tier"]
    )
    .expect("metric registered once")
});
pub static GATEWAY_STORE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::GATEWAY_STORE_ERRORS,
        "Quota/key store operations that failed because the store was unreachable, by operation.",
        &["operation"]
    )
    .expect("metric registered once")
});
pub static GATEWAY_ADMISSION_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        names::GATEWAY_ADMISSION_DURATION,
        "Time to admit or refuse a request against its quota, by decision.",
        &["decision"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5]
    )
    .expect("metric registered once")
});
pub static GATEWAY_TIGHTENING: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    prometheus::register_gauge!(
        names::GATEWAY_TIGHTENING,
        "Current demand-tightening factor applied to the tightened tiers' limits (1 = none)."
    )
    .expect("metric registered once")
});
pub static GATEWAY_POLICY_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::GATEWAY_POLICY_REFUSALS,
        "Prompts refused by the content policy, by rule.",
        &["rule"]
    )
    .expect("metric registered once")
});
pub static GATEWAY_IDEMPOTENT_REPLAYS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        names::GATEWAY_IDEMPOTENT_REPLAYS,
        "Retries answered with the stored result of an earlier request with the same idempotency key."
    )
    .expect("metric registered once")
});
pub static SCHEDULER_OLDEST_WAIT: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        names::SCHEDULER_OLDEST_WAIT,
        "How long the oldest waiting job of each tier has waited.",
        &["tier"]
    )
    .expect("metric registered once")
});
pub static SCHEDULER_QUEUE_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        names::SCHEDULER_QUEUE_WAIT,
        "Time finished jobs waited between arrival and placement, by tier.",
        &["tier"],
        REQUEST_BUCKETS.to_vec()
    )
    .expect("metric registered once")
});
pub static SCHEDULER_SATURATION: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    prometheus::register_gauge!(
        names::SCHEDULER_SATURATION,
        "Estimated cluster saturation: batch slots in use over batch slots of all workers."
    )
    .expect("metric registered once")
});
pub static SCHEDULER_BACKLOG: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    prometheus::register_gauge!(
        names::SCHEDULER_BACKLOG,
        "Predicted seconds to finish all queued and running work at the measured throughput."
    )
    .expect("metric registered once")
});
pub static GATEWAY_FIRST_PROGRESS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        names::GATEWAY_FIRST_PROGRESS,
        "Time from a request's arrival to its first generated tokens, by tier.",
        &["tier"],
        REQUEST_BUCKETS.to_vec()
    )
    .expect("metric registered once")
});
pub static WORKER_MEMORY_USED: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        names::WORKER_MEMORY_USED,
        "Memory used on the worker's device (on CPU: the process's resident memory).",
        &["worker", "device"]
    )
    .expect("metric registered once")
});
pub static WORKER_MEMORY_TOTAL: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        names::WORKER_MEMORY_TOTAL,
        "Memory of the worker's device (on CPU: the machine's memory).",
        &["worker", "device"]
    )
    .expect("metric registered once")
});
pub static WORKER_BATCH_SLOTS_USED: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        names::WORKER_BATCH_SLOTS_USED,
        "Sequences in the worker's batch.",
        &["worker"]
    )
    .expect("metric registered once")
});
pub static WORKER_BATCH_SLOTS_CAPACITY: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        names::WORKER_BATCH_SLOTS_CAPACITY,
        "Batch slots of the worker.",
        &["worker"]
    )
    .expect("metric registered once")
});
pub static MEMBERSHIP_ETCD_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::MEMBERSHIP_ETCD_ERRORS,
        "etcd operations that failed (registration, watch, election), by operation.",
        &["operation"]
    )
    .expect("metric registered once")
});
pub static GATEWAY_SIGNING_DURATION: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        names::GATEWAY_SIGNING_DURATION,
        "Time to embed and sign one image's C2PA manifest.",
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]
    )
    .expect("metric registered once")
});
pub static GATEWAY_MANIFEST_BYTES: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        names::GATEWAY_MANIFEST_BYTES,
        "Bytes the signed C2PA manifest added to one image.",
        vec![1024.0, 2048.0, 3072.0, 4096.0, 8192.0, 16384.0, 32768.0]
    )
    .expect("metric registered once")
});
pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let info = register_int_gauge_vec!(
        names::BUILD_INFO,
        "Always 1; the labels say which build runs (version, git commit, cargo features).",
        &["version", "git", "features"]
    )
    .expect("metric registered once");
    info.with_label_values(&[
        env!("CARGO_PKG_VERSION"),
        option_env!("KILN_GIT_HASH").unwrap_or("unknown"),
        option_env!("KILN_FEATURES").unwrap_or("default"),
    ])
    .set(1);
    info
});
pub static SCHEDULER_DECISION_DURATION: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        names::SCHEDULER_DECISION_DURATION,
        "Time the scheduler's owner task spends on one message (decisions and dispatch).",
        vec![0.000001, 0.000005, 0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01]
    )
    .expect("metric registered once")
});
pub static SCHEDULER_WORKER_CALL_DURATION: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        names::SCHEDULER_WORKER_CALL_DURATION,
        "Round trip of one worker call (release, prefill or decode steps) as the scheduler sees it.",
        STEP_BUCKETS.to_vec()
    )
    .expect("metric registered once")
});
pub static SCHEDULER_LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        names::SCHEDULER_LEADER,
        "1 while this scheduler replica leads (etcd election), 0 while it stands by."
    )
    .expect("metric registered once")
});
pub static SCHEDULER_SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::SCHEDULER_SHED,
        "Jobs shed because the cluster could not serve them in time, by tier and reason (deadline, queue_full).",
        &["tier", "reason"]
    )
    .expect("metric registered once")
});
pub static SCHEDULER_QUEUE_DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        names::SCHEDULER_QUEUE_DEPTH,
        "Jobs waiting for a worker, by tier.",
        &["tier"]
    )
    .expect("metric registered once")
});
pub static SCHEDULER_RUNNING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(names::SCHEDULER_RUNNING, "Sequences placed on workers.")
        .expect("metric registered once")
});
pub static SCHEDULER_WORKERS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        names::SCHEDULER_WORKERS,
        "Workers the scheduler can place jobs on."
    )
    .expect("metric registered once")
});
pub static SCHEDULER_REQUEUED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::SCHEDULER_REQUEUED,
        "Jobs re-queued after losing their worker.",
        &["tier"]
    )
    .expect("metric registered once")
});
pub static WORKER_STEP_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        names::WORKER_STEP_DURATION,
        "Duration of one forward pass (a prefill, or one decode step of a multi-step call) by phase and batch-size bucket (1, 2-4, 5-16, 17-64, 65+).",
        &["worker", "phase", "batch"],
        STEP_BUCKETS.to_vec()
    )
    .expect("metric registered once")
});
pub static WORKER_KV_BLOCKS_USED: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        names::WORKER_KV_BLOCKS_USED,
        "KV-cache blocks reserved by sequences.",
        &["worker"]
    )
    .expect("metric registered once")
});
pub static WORKER_KV_BLOCKS_CAPACITY: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        names::WORKER_KV_BLOCKS_CAPACITY,
        "KV-cache blocks of the worker.",
        &["worker"]
    )
    .expect("metric registered once")
});
pub static WORKER_FENCED_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        names::WORKER_FENCED_CALLS,
        "Calls refused because they came from a deposed scheduler leader (an older fencing epoch).",
        &["worker"]
    )
    .expect("metric registered once")
});
pub static WORKER_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(names::WORKER_TOKENS, "Image tokens generated.", &["worker"])
        .expect("metric registered once")
});
/// Tokens per pass run from 1 (plain decoding, or no draft right) to the widest window.
const TOKENS_PER_PASS_BUCKETS: &[f64] = &[1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0, 64.0];
/// Passes per image: an image of n tokens takes n passes without speculation (64 at 64x64, 1024
/// at 256x256), and fewer with it.
const PASSES_PER_IMAGE_BUCKETS: &[f64] = &[
    4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
pub static WORKER_TOKENS_PER_PASS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        names::WORKER_TOKENS_PER_PASS,
        "Image tokens a sequence accepted per forward pass, one observation per sequence per decode call (1 without speculative decoding).",
        &["worker"],
        TOKENS_PER_PASS_BUCKETS.to_vec()
    )
    .expect("metric registered once")
});
pub static WORKER_PASSES_PER_IMAGE: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        names::WORKER_PASSES_PER_IMAGE,
        "Forward passes an image took on this worker, prefill included (its tokens without speculative decoding).",
        &["worker"],
        PASSES_PER_IMAGE_BUCKETS.to_vec()
    )
    .expect("metric registered once")
});

/// Label values known before the first event. Each process exports its series at 0 from start-up
/// (Prometheus' guidance for labelled metrics), so that dashboards and `rate()` alerts see series
/// on a healthy, idle cluster instead of nothing.
pub mod known {
    /// Final gRPC codes a `Generate` ends with (as `tonic::Code`'s `Debug` spells them).
    pub const CODES: &[&str] = &[
        "Ok",
        "InvalidArgument",
        "Unauthenticated",
        "PermissionDenied",
        "ResourceExhausted",
        "Unavailable",
        "DeadlineExceeded",
        "Cancelled",
        "Internal",
    ];
    /// The front doors a request can come through: gRPC, or the OpenAI-compatible HTTP API.
    pub const PROTOCOLS: &[&str] = &["grpc", "http"];
    pub const LIMITS: &[&str] = &["window", "rate", "in_flight"];
    pub const SCOPES: &[&str] = &["user", "org"];
    pub const ADMISSION_DECISIONS: &[&str] = &["admitted", "refused", "duplicate"];
    /// Operations of `kiln_gateway_store_errors_total`.
    pub const STORE_OPERATIONS: &[&str] = &["admit", "auth", "renew", "settle", "tiers", "usage"];
    /// Operations of `kiln_membership_etcd_errors_total`.
    pub const ETCD_OPERATIONS: &[&str] = &["campaign", "observe", "register", "watch"];
    pub const PHASES: &[&str] = &["prefill", "decode"];
    pub const BATCH_BUCKETS: &[&str] = &["1", "2-4", "5-16", "17-64", "65+"];
}

/// The gateway's series at 0: per tier, code, limit and scope, store operation and policy rule.
pub fn export_gateway_series(tiers: &[&str], policy_rules: &[&str]) {
    for &tier in tiers {
        for &protocol in known::PROTOCOLS {
            for &code in known::CODES {
                GATEWAY_REQUESTS.with_label_values(&[tier, code, protocol]);
            }
            GATEWAY_REQUEST_DURATION.with_label_values(&[tier, protocol]);
        }
        GATEWAY_FIRST_PROGRESS.with_label_values(&[tier]);
        GATEWAY_QUOTA_REFUNDS.with_label_values(&[tier]);
        GATEWAY_QUOTA_FAIL_OPEN.with_label_values(&[tier]);
        for &limit in known::LIMITS {
            for &scope in known::SCOPES {
                GATEWAY_QUOTA_REFUSALS.with_label_values(&[tier, limit, scope]);
            }
        }
    }
    for &operation in known::STORE_OPERATIONS {
        GATEWAY_STORE_ERRORS.with_label_values(&[operation]);
    }
    for &decision in known::ADMISSION_DECISIONS {
        GATEWAY_ADMISSION_DURATION.with_label_values(&[decision]);
    }
    for &rule in policy_rules {
        GATEWAY_POLICY_REFUSALS.with_label_values(&[rule]);
    }
    if GATEWAY_TIGHTENING.get() == 0.0 {
        // No tightening until demand says otherwise.
        GATEWAY_TIGHTENING.set(1.0);
    }
    LazyLock::force(&GATEWAY_IDEMPOTENT_REPLAYS);
    LazyLock::force(&GATEWAY_SIGNING_DURATION);
    LazyLock::force(&GATEWAY_MANIFEST_BYTES);
    export_membership_series();
}

/// The scheduler's series at 0: per tier and shed reason, and its unlabelled gauges.
pub fn export_scheduler_series(tiers: &[&str], shed_reasons: &[&str]) {
    for &tier in tiers {
        SCHEDULER_QUEUE_DEPTH.with_label_values(&[tier]);
        SCHEDULER_OLDEST_WAIT.with_label_values(&[tier]);
        SCHEDULER_QUEUE_WAIT.with_label_values(&[tier]);
        SCHEDULER_REQUEUED.with_label_values(&[tier]);
        for &reason in shed_reasons {
            SCHEDULER_SHED.with_label_values(&[tier, reason]);
        }
    }
    LazyLock::force(&SCHEDULER_RUNNING);
    LazyLock::force(&SCHEDULER_WORKERS);
    LazyLock::force(&SCHEDULER_LEADER);
    LazyLock::force(&SCHEDULER_SATURATION);
    LazyLock::force(&SCHEDULER_BACKLOG);
    LazyLock::force(&SCHEDULER_DECISION_DURATION);
    LazyLock::force(&SCHEDULER_WORKER_CALL_DURATION);
    export_membership_series();
}

/// A worker's series at 0 (its capacities are set by the worker itself).
pub fn export_worker_series(worker: &str) {
    WORKER_KV_BLOCKS_USED.with_label_values(&[worker]);
    WORKER_BATCH_SLOTS_USED.with_label_values(&[worker]);
    WORKER_TOKENS.with_label_values(&[worker]);
    WORKER_FENCED_CALLS.with_label_values(&[worker]);
    WORKER_TOKENS_PER_PASS.with_label_values(&[worker]);
    WORKER_PASSES_PER_IMAGE.with_label_values(&[worker]);
    for &phase in known::PHASES {
        for &batch in known::BATCH_BUCKETS {
            WORKER_STEP_DURATION.with_label_values(&[worker, phase, batch]);
        }
    }
    export_membership_series();
}

fn export_membership_series() {
    for &operation in known::ETCD_OPERATIONS {
        MEMBERSHIP_ETCD_ERRORS.with_label_values(&[operation]);
    }
}

/// (resident bytes of this process, total bytes of the machine), from `/proc` on Linux.
pub fn process_memory() -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    // Linux pages are 4 KiB on the platforms Kiln targets.
    Some((resident_pages * 4096, total_kb * 1024))
}

/// The `batch` label of [`WORKER_STEP_DURATION`] for a batch of `size` sequences.
pub fn batch_bucket(size: usize) -> &'static str {
    match size {
        0 | 1 => "1",
        2..=4 => "2-4",
        5..=16 => "5-16",
        17..=64 => "17-64",
        _ => "65+",
    }
}

/// The process's metrics in the Prometheus text format.
pub fn encode_metrics() -> String {
    LazyLock::force(&BUILD_INFO);
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    // Encoding into a Vec cannot fail for well-formed families.
    let _ = encoder.encode(&prometheus::gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `shutdown` resolves. Metrics get
/// their own port, apart from the gRPC ones, so scrapers need no API key and reach no API.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4",
                )],
                encode_metrics(),
            )
        }),
    );
    tracing::info!(addr = ?listener.local_addr().ok(), "metrics serving on /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Logging and tracing: `KILN_LOG` (or `RUST_LOG`) filters the log lines, `KILN_LOG_FORMAT=json`
/// makes them structured (each line carries its spans' fields: request id, tier, trace id), and an
/// OTLP endpoint in `tracing` exports spans. Must run inside a Tokio runtime when tracing is on.
pub fn init(tracing: &TracingConfig) -> Result<TracingGuard, TracingError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = std::env::var(env_names::LOG)
        .ok()
        .map(EnvFilter::new)
        .unwrap_or_else(|| {
            // c2pa reports every signing phase at info.
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,c2pa=warn"))
        });
    let json = std::env::var(env_names::LOG_FORMAT).is_ok_and(|f| f == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let provider = trace::provider(tracing)?;
    // Only the spans of sampled requests reach the exporter, whatever the log filter says, so
    // quieter logs do not cut traces and the exporter's own events stay out of them.
    let otel = provider.as_ref().map(|p| {
        trace::layer(p, &tracing.service).with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(trace::TRACED, tracing::Level::INFO),
        )
    });
    // A second initialisation (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(TracingGuard::new(provider))
}

/// Logging without tracing (tools and tests).
pub fn init_logging() {
    let _ = init(&TracingConfig {
        service: "kiln".into(),
        otlp_endpoint: None,
        sample_ratio: 1.0,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_fall_in_their_buckets() {
        let buckets: Vec<_> = [1, 2, 4, 5, 16, 17, 64, 65, 1000]
            .map(batch_bucket)
            .to_vec();
        assert_eq!(
            buckets,
            ["1", "2-4", "2-4", "5-16", "5-16", "17-64", "17-64", "65+", "65+"]
        );
    }

    #[test]
    fn known_series_are_exported_before_any_event() {
        export_scheduler_series(&["free"], &["deadline"]);
        export_worker_series("w0");
        let text = encode_metrics();
        for series in [
            "kiln_scheduler_shed_total{reason=\"deadline\",tier=\"free\"} 0",
            "kiln_scheduler_saturation_ratio 0",
            "kiln_worker_kv_blocks_used{worker=\"w0\"} 0",
            "kiln_membership_etcd_errors_total{operation=\"watch\"} 0",
            "kiln_worker_step_duration_seconds_count{batch=\"17-64\",phase=\"decode\",worker=\"w0\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn metrics_encode_with_their_names() {
        GATEWAY_REQUESTS
            .with_label_values(&["free", "OK", "http"])
            .inc();
        SCHEDULER_QUEUE_DEPTH.with_label_values(&["free"]).set(3);
        let text = encode_metrics();
        assert!(
            text.contains(
                "kiln_gateway_requests_total{code=\"OK\",protocol=\"http\",tier=\"free\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("kiln_scheduler_queue_depth{tier=\"free\"} 3"));
    }
}
