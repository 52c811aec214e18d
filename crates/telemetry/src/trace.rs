//! Distributed tracing: the OTLP exporter (off unless an endpoint is configured), the sampler, and the
//! W3C trace context that carries one request's trace from the gateway through the scheduler to the
//! worker steps.
//!
//! `tracing` spans become OpenTelemetry spans through `tracing-opentelemetry`; without an endpoint
//! that layer is not installed at all, so untraced builds pay nothing but the `tracing` spans they
//! already had. A [`TraceContext`] is the `traceparent` header of one span: the gateway puts it in
//! the scheduler call's gRPC metadata, and the scheduler puts each sequence's into the worker batch
//! calls (one call serves many requests, so metadata could carry only one of them).
//!
//! The sampling decision is made once, at the gateway ([`sample`]), and travels with the context.
//! Spans of unsampled requests are ordinary `tracing` spans (logs still carry their fields); spans
//! of sampled ones are made with the [`TRACED`] target ([`request_span!`](crate::request_span)),
//! the only target the OpenTelemetry layer sees, so a request that is not traced costs the layer
//! nothing at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    span_processor_with_async_runtime::BatchSpanProcessor, BatchConfigBuilder, Sampler,
    SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The gRPC metadata key (and W3C header) of a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The `tracing` target of the spans of sampled requests: the only spans exported.
pub const TRACED: &str = "kiln::traced";

/// Share of new traces kept (f64 bits), set with the exporter.
static SAMPLE_RATIO: AtomicU64 = AtomicU64::new(0);
/// Set while an exporter is installed.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether a request that arrives with `caller` (maybe empty) is traced: the caller's decision when
/// it sent one, else a coin weighted by the configured ratio. Always false while tracing is off.
pub fn sample(caller: &TraceContext) -> bool {
    if !ENABLED.load(Ordering::Relaxed) {
        return false;
    }
    if caller.traceparent.is_some() {
        return caller.sampled();
    }
    let ratio = f64::from_bits(SAMPLE_RATIO.load(Ordering::Relaxed));
    ratio > 0.0 && rand::random::<f64>() < ratio
}

/// An `info` span named `$name` with the given fields, exported when `$sampled` (see [`TRACED`]).
#[macro_export]
macro_rules! request_span {
    ($sampled:expr, $name:literal, $($fields:tt)*) => {
        if $sampled {
            ::tracing::info_span!(target: $crate::trace::TRACED, $name, $($fields)*)
        } else {
            ::tracing::info_span!($name, $($fields)*)
        }
    };
}

/// Where and how much to trace.
#[derive(Clone, Debug)]
pub struct TracingConfig {
    /// `service.name` of the exported spans, e.g. `kiln-gateway`.
    pub service: String,
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`; `None` turns tracing off.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces kept, in [0, 1]. Requests that arrive with a sampled parent are always
    /// kept, so one trace is never cut in half between components.
    pub sample_ratio: f64,
}

/// Errors of the tracing setup.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("trace sample ratio must be in [0, 1], got {0}")]
    SampleRatio(f64),
    #[error("OTLP endpoint {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// Keeps the exporter alive; [`TracingGuard::shutdown`] flushes the spans still buffered.
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    pub(crate) fn new(provider: Option<SdkTracerProvider>) -> Self {
        TracingGuard { provider }
    }

    /// Exports what is buffered and stops the exporter. Call it outside the async runtime's
    /// `block_on` (the runtime must still be alive).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("trace exporter shutdown: {e}");
            }
        }
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }
}

/// The OTLP tracer provider for `config`, or `None` when no endpoint is set. Must run inside a Tokio
/// runtime: the batch exporter runs as a task on it.
pub(crate) fn provider(config: &TracingConfig) -> Result<Option<SdkTracerProvider>, TracingError> {
    if !(0.0..=1.0).contains(&config.sample_ratio) {
        return Err(TracingError::SampleRatio(config.sample_ratio));
    }
    let Some(endpoint) = &config.otlp_endpoint else {
        ENABLED.store(false, Ordering::Relaxed);
        SAMPLE_RATIO.store(0f64.to_bits(), Ordering::Relaxed);
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TracingError::Exporter {
            endpoint: endpoint.clone(),
            message: e.to_string(),
        })?;
    // The async-runtime processor exports from a Tokio task: the tonic exporter needs the reactor,
    // which the SDK's default thread-based processor does not have.
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(8192)
                .with_scheduled_delay(Duration::from_millis(500))
                .build(),
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        // Only sampled requests reach the layer (see `sample`), so what reaches it is kept.
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(resource)
        .build();
    ENABLED.store(true, Ordering::Relaxed);
    SAMPLE_RATIO.store(config.sample_ratio.to_bits(), Ordering::Relaxed);
    Ok(Some(provider))
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of `provider`.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
    service: &str,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service.to_string()))
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        // Kiln reads span contexts explicitly; activating one on every poll of an instrumented
        // future would cost each request a context push and pop per poll.
        .with_context_activation(false)
}

/// The W3C trace context of one span, as it travels between components. Empty when tracing is off
/// or the span is not part of a valid trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: Option<String>,
}

impl TraceContext {
    /// The context of `span` (nothing when tracing is off).
    pub fn of(span: &tracing::Span) -> Self {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return TraceContext::default();
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        TraceContext {
            traceparent: carrier.remove(TRACEPARENT),
        }
    }

    /// A context received as a `traceparent` string (empty strings mean none).
    pub fn from_traceparent(traceparent: impl Into<String>) -> Self {
        let traceparent = traceparent.into();
        TraceContext {
            traceparent: (!traceparent.is_empty()).then_some(traceparent),
        }
    }

    /// The context a caller sent in gRPC metadata.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Self {
        let traceparent = metadata
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        TraceContext::from_traceparent(traceparent)
    }

    /// Writes the context into outgoing gRPC metadata.
    pub fn inject(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Some(value) = self.traceparent.as_deref().and_then(|v| v.parse().ok()) {
            metadata.insert(TRACEPARENT, value);
        }
    }

    /// The `traceparent` string, empty when there is none (the protobuf encoding).
    pub fn traceparent(&self) -> &str {
        self.traceparent.as_deref().unwrap_or_default()
    }

    /// Whether the trace is sampled: the `traceparent` flags' low bit. Unsampled traces need no spans
    /// downstream.
    pub fn sampled(&self) -> bool {
        self.traceparent
            .as_deref()
            .and_then(|t| t.rsplit('-').next())
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1)
    }

    /// Makes `span` a child of this context (a no-op when empty or tracing is off), and records the
    /// trace id in its `trace_id` field, if it declares one, so log lines can be joined to traces.
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(traceparent) = &self.traceparent {
            let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.clone())]);
            let cx = TraceContextPropagator::new().extract(&carrier);
            let _ = span.set_parent(cx);
        }
        record_trace_id(span);
    }
}

/// Records the span's trace id in its `trace_id` field (declared `trace_id = tracing::field::Empty`).
pub fn record_trace_id(span: &tracing::Span) {
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_flag_is_read_from_the_traceparent() {
        let sampled = TraceContext::from_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let unsampled = TraceContext::from_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        );
        assert!(sampled.sampled());
        assert!(!unsampled.sampled());
        assert!(!TraceContext::from_traceparent("").sampled());
        assert_eq!(TraceContext::from_traceparent(""), TraceContext::default());
    }

    #[test]
    fn metadata_round_trip_keeps_the_traceparent() {
        let context = TraceContext::from_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let mut metadata = tonic::metadata::MetadataMap::new();
        context.inject(&mut metadata);
        assert_eq!(TraceContext::from_metadata(&metadata), context);
        let mut empty = tonic::metadata::MetadataMap::new();
        TraceContext::default().inject(&mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn without_the_layer_spans_have_no_context() {
        let span = tracing::info_span!("untraced");
        assert_eq!(TraceContext::of(&span), TraceContext::default());
    }

    #[test]
    fn a_bad_ratio_is_refused() {
        let config = TracingConfig {
            service: "kiln-test".into(),
            otlp_endpoint: None,
            sample_ratio: 1.5,
        };
        assert!(matches!(
            provider(&config),
            Err(TracingError::SampleRatio(r)) if r == 1.5
        ));
    }
}
