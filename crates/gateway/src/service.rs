//! The `kiln.v1.ImageService` implementation: the request pipeline, streaming, cancellation when the
//! caller goes away, a deadline on every request, and settlement exactly once.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kiln_proto::v1::image_service_server::{ImageService, ImageServiceServer};
use kiln_proto::v1::{
    generate_event, Completed, GenerateEvent, GenerateRequest, GetModelInfoRequest,
    GetQuotaRequest, ModelInfo, PartialImage, Progress, Queued, QuotaStatus, Started, Usage,
};
use kiln_scheduler::{JobRequest, JobUpdate};
use kiln_telemetry as telemetry;
use kiln_telemetry::TraceContext;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::admission::{Admission, Admitted, Outcome};
use crate::auth::{Authenticator, Identity};
use crate::backend::{Backend, UpdateStream};
use crate::policy::ContentPolicy;
use crate::signing::{Provenance, Signer};
use crate::validation::{validate, ValidRequest};
use crate::GatewayError;

/// How long a new request waits for a scheduler leader before it is refused as unavailable.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(15);

/// Times a job is submitted again after its scheduler went away.
const MAX_RESUBMITS: u32 = 3;

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Longest a request may take from arrival to image; then it is cancelled.
    pub request_deadline: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            request_deadline: Duration::from_secs(600),
        }
    }
}

/// The pipeline's stages.
pub struct Gateway {
    pub config: GatewayConfig,
    pub auth: Arc<dyn Authenticator>,
    pub policy: Arc<dyn ContentPolicy>,
    pub admission: Arc<dyn Admission>,
    pub signer: Arc<dyn Signer>,
    pub backend: Arc<dyn Backend>,
}

pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

/// The front door a request came through: the `protocol` label of the request metrics. The HTTP
/// front door marks its requests with it (a request extension); gRPC requests carry none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Grpc,
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// A caller the front door already authenticated (the HTTP API, once for all of a request's
/// images). Only this crate can attach it: a request extension is never read off the wire.
#[derive(Clone, Debug)]
pub(crate) struct Authenticated(pub Identity);

fn record(identity: Option<&Identity>, code: tonic::Code, start: Instant, protocol: Protocol) {
    let tier = identity.map_or("unknown", |i| i.tier.as_str());
    telemetry::GATEWAY_REQUESTS
        .with_label_values(&[tier, &format!("{code:?}"), protocol.as_str()])
        .inc();
    telemetry::GATEWAY_REQUEST_DURATION
        .with_label_values(&[tier, protocol.as_str()])
        .observe(start.elapsed().as_secs_f64());
}

/// The gRPC face of a [`Gateway`].
#[derive(Clone)]
pub struct ImageApi(pub Arc<Gateway>);

#[tonic::async_trait]
impl ImageService for ImageApi {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.0.generate(request).await
    }

    async fn get_model_info(
        &self,
        request: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        self.0.model_info(request).await
    }

    async fn get_quota(
        &self,
        request: Request<GetQuotaRequest>,
    ) -> Result<Response<QuotaStatus>, Status> {
        let identity = self.0.auth.authenticate(request.metadata()).await?;
        let status = self.0.admission.status(&identity).await?;
        let mut metadata = MetadataMap::new();
        quota_metadata(&mut metadata, &status);
        let mut response = Response::new(status);
        *response.metadata_mut() = metadata;
        Ok(response)
    }
}

/// Writes the `x-ratelimit-*` metadata of the caller's tightest window (fewest images left, then
/// the latest reset).
fn quota_metadata(metadata: &mut MetadataMap, quota: &QuotaStatus) {
    let tightest = quota.windows.iter().min_by(|a, b| {
        (a.remaining, -a.reset_seconds)
            .partial_cmp(&(b.remaining, -b.reset_seconds))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if let Some(w) = tightest {
        ratelimit_metadata(
            metadata,
            &w.subject,
            w.window_seconds,
            w.limit,
            w.remaining,
            Duration::from_secs_f64(w.reset_seconds),
        );
    }
}

/// Writes the `x-ratelimit-*` metadata of one window (see `image.proto`).
pub(crate) fn ratelimit_metadata(
    metadata: &mut MetadataMap,
    subject: &str,
    window_seconds: u64,
    limit: u32,
    remaining: u32,
    reset: Duration,
) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = value.parse() {
            metadata.insert(name, v);
        }
    };
    put("x-ratelimit-limit", limit.to_string());
    put("x-ratelimit-remaining", remaining.to_string());
    put(
        "x-ratelimit-reset",
        format!("{}", reset.as_secs_f64().ceil() as u64),
    );
    let scope = subject.split(':').next().unwrap_or("user");
    put("x-ratelimit-window", format!("{scope}:{window_seconds}s"));
}

impl Gateway {
    /// Adds the caller's quota metadata to an error status that lacks it, except for refusals at
    /// capacity (a window refusal already carries its own) and store outages.
    async fn with_quota_metadata(&self, identity: &Identity, mut status: Status) -> Status {
        // Refusals at capacity stay one store round trip (a spike of them must not starve admitted
        // requests), and an unreachable store cannot be asked.
        if status.metadata().contains_key("x-ratelimit-limit")
            || matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted
            )
        {
            return status;
        }
        if let Ok(quota) = self.admission.status(identity).await {
            quota_metadata(status.metadata_mut(), &quota);
        }
        status
    }

    /// The whole pipeline for one image, whichever front door `request` came through.
    pub(crate) async fn generate(
        self: &Arc<Self>,
        request: Request<GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let start = Instant::now();
        let protocol = request
            .extensions()
            .get::<Protocol>()
            .copied()
            .unwrap_or_default();
        let known = request
            .extensions()
            .get::<Authenticated>()
            .map(|a| a.0.clone());
        let identity = match known {
            Some(identity) => identity,
            None => match self.auth.authenticate(request.metadata()).await {
                Ok(i) => i,
                Err(e) => {
                    record(None, e.code(), start, protocol);
                    return Err(e.into());
                }
            },
        };
        match self.generate_for(&identity, request, start, protocol).await {
            Ok(response) => Ok(response),
            Err(status) => Err(self.with_quota_metadata(&identity, status).await),
        }
    }

    async fn generate_for(
        self: &Arc<Self>,
        identity: &Identity,
        request: Request<GenerateRequest>,
        start: Instant,
        protocol: Protocol,
    ) -> Result<Response<EventStream>, Status> {
        let identity = identity.clone();
        let fail = |e: GatewayError| {
            record(Some(&identity), e.code(), start, protocol);
            e.to_status()
        };
        let model = self.backend.model().await.map_err(|e| fail(e.into()))?;
        let caller_trace = TraceContext::from_metadata(request.metadata());
        let valid = validate(request.into_inner(), &model).map_err(fail)?;
        let traced = kiln_telemetry::trace::sample(&caller_trace);
        let span = kiln_telemetry::request_span!(traced, "generate", request_id = %valid.request_id, user = %identity.user, tier = identity.tier.as_str(), protocol = protocol.as_str(), trace_id = tracing::field::Empty);
        if traced {
            caller_trace.adopt(&span);
        }
        span.in_scope(|| info!(key_id = %identity.key_id, width = valid.width, height = valid.height, "request accepted"));
        self.policy.check(&identity, &valid).map_err(fail)?;
        let ticket = match self
            .admission
            .admit(&identity, &valid)
            .await
            .map_err(fail)?
        {
            Admitted::Charged(ticket) => ticket,
            Admitted::Replay(answer) => {
                span.in_scope(|| info!("idempotent retry: sending the earlier answer again"));
                record(Some(&identity), tonic::Code::Ok, start, protocol);
                let event = GenerateEvent::decode(answer.as_slice()).map_err(|e| {
                    fail(GatewayError::Internal(format!(
                        "stored answer unreadable: {e}"
                    )))
                })?;
                let stream = futures::stream::iter([Ok(event)]);
                return Ok(Response::new(Box::pin(stream)));
            }
        };
        let headline = ticket.headline.clone();
        let job = JobRequest {
            request_id: valid.request_id.clone(),
            user: identity.user.clone(),
            tier: identity.tier,
            prompt: valid.prompt.clone(),
            width: valid.width,
            height: valid.height,
            sampling: valid.sampling,
            trace: TraceContext::of(&span),
            partial_images: valid.partial_images,
        };
        let updates = match self.submit_through_failover(&job).await {
            Ok(u) => u,
            Err(e) => {
                self.admission.settle(ticket, Outcome::NotDelivered).await;
                span.in_scope(|| warn!(error = %e, "scheduler refused the job"));
                return Err(fail(e.into()));
            }
        };
        let (tx, rx) = mpsc::channel(16);
        let gateway = self.clone();
        tokio::spawn(
            async move {
                let result = gateway
                    .relay(&valid, &model.model, &job, start, updates, &tx)
                    .await;
                let outcome = match &result {
                    Ok(done) => Outcome::Delivered {
                        answer: ticket.keeps_answer().then(|| done.encode_to_vec()),
                    },
                    Err(_) => Outcome::NotDelivered,
                };
                let result = result.map(|_| ());
                gateway.admission.settle(ticket, outcome).await;
                let code = match &result {
                    Ok(()) => tonic::Code::Ok,
                    Err(None) => tonic::Code::Cancelled,
                    Err(Some(e)) => e.code(),
                };
                record(Some(&identity), code, start, protocol);
                match result {
                    Ok(()) => info!(seconds = start.elapsed().as_secs_f64(), "image delivered"),
                    Err(None) => info!("caller went away; job cancelled"),
                    Err(Some(e)) => {
                        warn!(error = %e, "request failed");
                        let status = gateway.with_quota_metadata(&identity, e.to_status()).await;
                        let _ = tx.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        let mut response: Response<EventStream> = Response::new(Box::pin(ReceiverStream::new(rx)));
        if let Some(w) = headline {
            ratelimit_metadata(
                response.metadata_mut(),
                &w.subject,
                w.window_seconds,
                w.limit,
                w.remaining(),
                w.reset_after,
            );
        }
        Ok(response)
    }

    async fn model_info(
        &self,
        request: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let identity = self.auth.authenticate(request.metadata()).await?;
        let m = match self.backend.model().await {
            Ok(m) => m,
            Err(e) => {
                let status = GatewayError::from(e).to_status();
                return Err(self.with_quota_metadata(&identity, status).await);
            }
        };
        let mut response = Response::new(ModelInfo {
            model: m.model,
            sizes: m.sizes,
            default_size: m.default_size,
            patch_size: m.patch_size,
            max_prompt_bytes: m.max_prompt_bytes,
            default_temperature: m.default_temperature,
            default_top_k: m.default_top_k,
        });
        if let Ok(quota) = self.admission.status(&identity).await {
            quota_metadata(response.metadata_mut(), &quota);
        }
        Ok(response)
    }
}

impl Gateway {
    /// Submits a job; while no scheduler leads (a failover in progress) it tries again for a while
    /// rather than failing the caller at once.
    async fn submit_through_failover(
        &self,
        job: &JobRequest,
    ) -> Result<UpdateStream, kiln_scheduler::SchedulerError> {
        let give_up = Instant::now() + FAILOVER_PATIENCE.min(self.config.request_deadline);
        let mut delay = Duration::from_millis(200);
        loop {
            match self.backend.submit(job.clone()).await {
                Err(
                    e @ (kiln_scheduler::SchedulerError::Unavailable(_)
                    | kiln_scheduler::SchedulerError::ShuttingDown),
                ) if Instant::now() + delay < give_up => {
                    warn!(error = %e, "no scheduler reachable; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    /// Forwards the job's updates to the caller until the image is delivered, and returns the final
    /// event. `Err(None)` means the caller went away (the job is cancelled by dropping its stream).
    /// When the scheduler goes away mid-job (a failover), the job is submitted again to whichever
    /// scheduler leads next, within the request's deadline; the caller sees it queued again.
    async fn relay(
        &self,
        valid: &ValidRequest,
        model: &str,
        job: &JobRequest,
        arrived: Instant,
        mut updates: UpdateStream,
        tx: &mpsc::Sender<Result<GenerateEvent, Status>>,
    ) -> Result<GenerateEvent, Option<GatewayError>> {
        let deadline = tokio::time::sleep(self.config.request_deadline);
        tokio::pin!(deadline);
        let mut resubmits = 0;
        let mut progressed = false;
        let event = |e: generate_event::Event| GenerateEvent {
            request_id: valid.request_id.clone(),
            event: Some(e),
        };
        loop {
            let update = tokio::select! {
                _ = tx.closed() => return Err(None),
                _ = &mut deadline => return Err(Some(GatewayError::DeadlineExceeded(self.config.request_deadline))),
                update = updates.next() => update,
            };
            let out = match update {
                None => {
                    return Err(Some(GatewayError::Internal(
                        "the scheduler ended the job without an image".into(),
                    )))
                }
                Some(Err(
                    e @ (kiln_scheduler::SchedulerError::Unavailable(_)
                    | kiln_scheduler::SchedulerError::ShuttingDown),
                )) if resubmits < MAX_RESUBMITS => {
                    resubmits += 1;
                    warn!(error = %e, attempt = resubmits, "scheduler lost mid-job; submitting again");
                    let mut delay = Duration::from_millis(250);
                    loop {
                        tokio::select! {
                            _ = tx.closed() => return Err(None),
                            _ = &mut deadline => return Err(Some(GatewayError::DeadlineExceeded(self.config.request_deadline))),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        match self.backend.submit(job.clone()).await {
                            Ok(fresh) => {
                                updates = fresh;
                                break;
                            }
                            Err(
                                kiln_scheduler::SchedulerError::Unavailable(_)
                                | kiln_scheduler::SchedulerError::ShuttingDown
                                | kiln_scheduler::SchedulerError::NoWorkers,
                            ) => delay = (delay * 2).min(Duration::from_secs(2)),
                            Err(e) => return Err(Some(e.into())),
                        }
                    }
                    continue;
                }
                Some(Err(e)) => return Err(Some(e.into())),
                Some(Ok(JobUpdate::Queued { position })) => {
                    event(generate_event::Event::Queued(Queued { position }))
                }
                Some(Ok(JobUpdate::Started { worker })) => {
                    event(generate_event::Event::Started(Started { worker }))
                }
                Some(Ok(JobUpdate::Progress { done, .. })) => {
                    if !progressed {
                        progressed = true;
                        telemetry::GATEWAY_FIRST_PROGRESS
                            .with_label_values(&[job.tier.as_str()])
                            .observe(arrived.elapsed().as_secs_f64());
                    }
                    event(generate_event::Event::Progress(Progress {
                        tokens_done: done,
                        tokens_total: valid.image_tokens,
                    }))
                }
                Some(Ok(JobUpdate::Preview(preview))) => {
                    // A preview is signed as the image is: whatever leaves Kiln carries provenance.
                    let png = self
                        .signer
                        .sign(
                            preview.png,
                            &Provenance {
                                request: valid,
                                model,
                            },
                        )
                        .map_err(Some)?;
                    event(generate_event::Event::PartialImage(PartialImage {
                        index: preview.index,
                        png,
                        width: preview.width,
                        height: preview.height,
                        tokens_done: preview.tokens_done,
                    }))
                }
                Some(Ok(JobUpdate::Completed(result))) => {
                    let png = self
                        .signer
                        .sign(
                            result.png,
                            &Provenance {
                                request: valid,
                                model,
                            },
                        )
                        .map_err(Some)?;
                    let done = event(generate_event::Event::Completed(Completed {
                        png,
                        width: result.width,
                        height: result.height,
                        usage: Some(Usage {
                            prompt_tokens: result.prompt_tokens,
                            image_tokens: result.image_tokens,
                            seed: valid.sampling.seed,
                            queue_seconds: result.queue_seconds,
                            generation_seconds: result.generation_seconds,
                        }),
                    }));
                    return tx
                        .send(Ok(done.clone()))
                        .await
                        .map(|_| done)
                        .map_err(|_| None);
                }
            };
            if tx.send(Ok(out)).await.is_err() {
                return Err(None);
            }
        }
    }
}

/// Serves the public API with health and reflection on `listener` until `shutdown` resolves.
pub async fn run(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    info!(addr = ?listener.local_addr().ok(), "gateway serving");
    let (reporter, health, reflection, reflection_v1alpha) = kiln_proto::standard::services();
    reporter.set_serving::<ImageServiceServer<ImageApi>>().await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ImageServiceServer::new(ImageApi(gateway)).max_encoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(kiln_proto::standard::incoming(listener), shutdown)
        .await
}
