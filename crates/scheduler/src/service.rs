//! The `kiln.v1.Scheduler` gRPC service: gateways in other processes submit jobs here and read their
//! updates as a stream. A dropped stream cancels the job.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kiln_proto::v1::scheduler_server::{Scheduler, SchedulerServer};
use kiln_proto::v1::{
    self as pb, job_event, ClusterStatusRequest, ClusterStatusResponse, Job, JobEvent,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::runtime::{JobRequest, JobUpdate, SchedulerHandle};
use crate::{SchedulerError, Tier};

/// Serves a [`SchedulerHandle`] over gRPC while this replica leads; a standby replica answers
/// `Submit` with a retryable `UNAVAILABLE` naming the leader, and `ClusterStatus` with who leads.
#[derive(Clone)]
pub struct SchedulerService {
    handle: watch::Receiver<Option<SchedulerHandle>>,
    /// This replica's advertised address.
    me: String,
    leader: watch::Receiver<Option<String>>,
}

impl SchedulerService {
    /// A replica that always leads (no election).
    pub fn new(handle: SchedulerHandle) -> Self {
        let (_, handle) = watch::channel(Some(handle));
        let (_, leader) = watch::channel(None);
        SchedulerService {
            handle,
            me: String::new(),
            leader,
        }
    }

    /// A replica that serves once `handle` holds a runtime (after it won the election).
    pub fn elected(
        handle: watch::Receiver<Option<SchedulerHandle>>,
        me: String,
        leader: watch::Receiver<Option<String>>,
    ) -> Self {
        SchedulerService { handle, me, leader }
    }

    fn leading(&self) -> Result<SchedulerHandle, Status> {
        self.handle.borrow().clone().ok_or_else(|| {
            let leader = self
                .leader
                .borrow()
                .clone()
                .unwrap_or_else(|| "not elected yet".into());
            SchedulerError::Unavailable(format!(
                "this scheduler is a standby; the leader is {leader}"
            ))
            .to_status()
        })
    }
}

/// Converts a wire tier, refusing an unspecified one.
pub fn tier_from_wire(tier: i32) -> Result<Tier, SchedulerError> {
    match pb::Tier::try_from(tier) {
        Ok(pb::Tier::Free) => Ok(Tier::Free),
        Ok(pb::Tier::Plus) => Ok(Tier::Plus),
        Ok(pb::Tier::Pro) => Ok(Tier::Pro),
        Ok(pb::Tier::Team) => Ok(Tier::Team),
        _ => Err(SchedulerError::InvalidJob(format!(
            "tier: {tier} is not a known tier"
        ))),
    }
}

/// Converts a tier to the wire.
pub fn tier_to_wire(tier: Tier) -> pb::Tier {
    match tier {
        Tier::Free => pb::Tier::Free,
        Tier::Plus => pb::Tier::Plus,
        Tier::Pro => pb::Tier::Pro,
        Tier::Team => pb::Tier::Team,
    }
}

/// An update as a wire event.
pub fn update_to_wire(update: JobUpdate) -> JobEvent {
    let event = match update {
        JobUpdate::Queued { position } => job_event::Event::QueuedPosition(position),
        JobUpdate::Started { worker } => job_event::Event::StartedWorker(worker),
        JobUpdate::Progress { done, .. } => job_event::Event::TokensDone(done),
        JobUpdate::Preview(p) => job_event::Event::Preview(pb::Preview {
            index: p.index,
            image: Some(pb::FinishedImage {
                png: p.png,
                width: p.width,
                height: p.height,
            }),
            tokens_done: p.tokens_done,
        }),
        JobUpdate::Completed(r) => job_event::Event::Completed(pb::JobCompleted {
            image: Some(pb::FinishedImage {
                png: r.png,
                width: r.width,
                height: r.height,
            }),
            prompt_tokens: r.prompt_tokens,
            image_tokens: r.image_tokens,
            queue_seconds: r.queue_seconds,
            generation_seconds: r.generation_seconds,
        }),
    };
    JobEvent { event: Some(event) }
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type SubmitStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

    async fn submit(&self, request: Request<Job>) -> Result<Response<Self::SubmitStream>, Status> {
        let trace = kiln_telemetry::TraceContext::from_metadata(request.metadata());
        let job = request.into_inner();
        if job.request_id.is_empty() || job.user.is_empty() {
            return Err(
                SchedulerError::InvalidJob("request_id and user are required".into()).to_status(),
            );
        }
        let tier = tier_from_wire(job.tier).map_err(|e| e.to_status())?;
        let sampling = job
            .sampling
            .ok_or_else(|| SchedulerError::InvalidJob("sampling: required".into()).to_status())?;
        let stream = self
            .leading()?
            .submit(JobRequest {
                request_id: job.request_id,
                user: job.user,
                tier,
                prompt: job.prompt,
                width: job.width,
                height: job.height,
                sampling,
                trace,
                partial_images: job.partial_images,
            })
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(Box::pin(stream.map(|u| {
            u.map(update_to_wire).map_err(|e| e.to_status())
        }))))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let leader = self.leader.borrow().clone().unwrap_or_default();
        let Ok(handle) = self.leading() else {
            return Ok(Response::new(ClusterStatusResponse {
                scheduler: self.me.clone(),
                leader,
                is_leader: false,
                ..Default::default()
            }));
        };
        let mut status = handle.status().await.map_err(|e| e.to_status())?;
        status.scheduler = self.me.clone();
        status.is_leader = true;
        status.leader = if leader.is_empty() {
            self.me.clone()
        } else {
            leader
        };
        if let Some(m) = handle.model() {
            status.model = Some(pb::ModelInfo {
                model: m.model,
                sizes: m.sizes,
                default_size: m.default_size,
                patch_size: m.patch_size,
                max_prompt_bytes: m.max_prompt_bytes,
                default_temperature: m.default_temperature,
                default_top_k: m.default_top_k,
            });
            status.prefix_overhead_tokens = m.prefix_overhead_tokens;
        }
        Ok(Response::new(status))
    }
}

/// Serves the scheduler API with health and reflection on `listener` until `shutdown` resolves.
pub async fn run(
    service: SchedulerService,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    info!(addr = ?listener.local_addr().ok(), "scheduler serving");
    let (reporter, health, reflection, reflection_v1alpha) = kiln_proto::standard::services();
    reporter
        .set_serving::<SchedulerServer<SchedulerService>>()
        .await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(SchedulerServer::new(service).max_encoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(kiln_proto::standard::incoming(listener), shutdown)
        .await
}
