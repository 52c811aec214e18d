//! How the gateway sees the cluster: submit a validated job, get a stream of updates; describe the
//! model. Implemented by the in-process scheduler handle (`kiln up`) and by a gRPC client of a
//! scheduler in another process.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::{job_event, ClusterStatusRequest, ClusterStatusResponse, Job};
use kiln_scheduler::service::tier_to_wire;
use kiln_scheduler::{
    JobPreview, JobRequest, JobResult, JobUpdate, ModelDescription, SchedulerError, SchedulerHandle,
};
use std::sync::Mutex;

use tokio::sync::{watch, OnceCell};
use tonic::transport::Channel;

pub type UpdateStream = BoxStream<'static, Result<JobUpdate, SchedulerError>>;

#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The served model; `NoWorkers` until a worker has described it.
    async fn model(&self) -> Result<ModelDescription, SchedulerError>;
    /// Submits a job. Dropping the stream cancels it.
    async fn submit(&self, job: JobRequest) -> Result<UpdateStream, SchedulerError>;
    /// The cluster's queues and workers (for demand tightening).
    async fn status(&self) -> Result<ClusterStatusResponse, SchedulerError>;
}

#[tonic::async_trait]
impl Backend for SchedulerHandle {
    async fn model(&self) -> Result<ModelDescription, SchedulerError> {
        SchedulerHandle::model(self).ok_or(SchedulerError::NoWorkers)
    }

    async fn submit(&self, job: JobRequest) -> Result<UpdateStream, SchedulerError> {
        Ok(SchedulerHandle::submit(self, job).await?.boxed())
    }

    async fn status(&self) -> Result<ClusterStatusResponse, SchedulerError> {
        SchedulerHandle::status(self).await
    }
}

/// A scheduler in another process, over `kiln.v1.Scheduler`: a fixed address, or whichever
/// replica etcd says leads (the client follows leader changes by itself).
pub struct RemoteScheduler {
    leader: watch::Receiver<Option<String>>,
    client: Mutex<Option<(String, SchedulerClient<Channel>)>>,
    model: OnceCell<ModelDescription>,
}

fn client_for(address: &str) -> Result<SchedulerClient<Channel>, SchedulerError> {
    let channel = Channel::from_shared(address.to_string())
        .map_err(|e| SchedulerError::Unavailable(format!("scheduler address {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    Ok(SchedulerClient::new(channel).max_decoding_message_size(64 << 20))
}

impl RemoteScheduler {
    /// Connects lazily: the scheduler may start after the gateway.
    pub fn new(address: &str) -> Result<Self, SchedulerError> {
        client_for(address)?;
        let (tx, leader) = watch::channel(Some(address.to_string()));
        // The sender is dropped: the address never changes.
        drop(tx);
        Ok(Self::following(leader))
    }

    /// Follows the leader's address as it changes.
    pub fn following(leader: watch::Receiver<Option<String>>) -> Self {
        RemoteScheduler {
            leader,
            client: Mutex::new(None),
            model: OnceCell::new(),
        }
    }

    /// The client of the current leader.
    fn client(&self) -> Result<SchedulerClient<Channel>, SchedulerError> {
        let address = self.leader.borrow().clone().ok_or_else(|| {
            SchedulerError::Unavailable("no scheduler leader is known yet".into())
        })?;
        let mut cached = self.client.lock().unwrap_or_else(|p| p.into_inner());
        match cached.as_ref() {
            Some((a, client)) if *a == address => Ok(client.clone()),
            _ => {
                let client = client_for(&address)?;
                *cached = Some((address, client.clone()));
                Ok(client)
            }
        }
    }
}

#[tonic::async_trait]
impl Backend for RemoteScheduler {
    async fn model(&self) -> Result<ModelDescription, SchedulerError> {
        self.model
            .get_or_try_init(|| async {
                let status = self
                    .client()?
                    .cluster_status(ClusterStatusRequest {})
                    .await
                    .map_err(|s| SchedulerError::from_status(&s))?;
                let status = status.into_inner();
                let m = status.model.ok_or(SchedulerError::NoWorkers)?;
                Ok(ModelDescription {
                    model: m.model,
                    sizes: m.sizes,
                    default_size: m.default_size,
                    patch_size: m.patch_size,
                    max_prompt_bytes: m.max_prompt_bytes,
                    prefix_overhead_tokens: status.prefix_overhead_tokens,
                    default_temperature: m.default_temperature,
                    default_top_k: m.default_top_k,
                })
            })
            .await
            .cloned()
    }

    async fn status(&self) -> Result<ClusterStatusResponse, SchedulerError> {
        self.client()?
            .cluster_status(ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| SchedulerError::from_status(&s))
    }

    async fn submit(&self, job: JobRequest) -> Result<UpdateStream, SchedulerError> {
        let mut wire = tonic::Request::new(Job {
            request_id: job.request_id,
            user: job.user,
            tier: tier_to_wire(job.tier) as i32,
            prompt: job.prompt,
            width: job.width,
            height: job.height,
            sampling: Some(job.sampling),
            partial_images: job.partial_images,
        });
        job.trace.inject(wire.metadata_mut());
        let stream = self
            .client()?
            .submit(wire)
            .await
            .map_err(|s| SchedulerError::from_status(&s))?
            .into_inner();
        Ok(stream
            .filter_map(|event| async move {
                match event {
                    Err(status) => Some(Err(SchedulerError::from_status(&status))),
                    Ok(e) => match e.event? {
                        job_event::Event::QueuedPosition(position) => {
                            Some(Ok(JobUpdate::Queued { position }))
                        }
                        job_event::Event::StartedWorker(worker) => {
                            Some(Ok(JobUpdate::Started { worker }))
                        }
                        // The gateway knows the total from the validated request.
                        job_event::Event::TokensDone(done) => {
                            Some(Ok(JobUpdate::Progress { done, total: 0 }))
                        }
                        job_event::Event::Preview(p) => {
                            let image = p.image.unwrap_or_default();
                            Some(Ok(JobUpdate::Preview(JobPreview {
                                index: p.index,
                                png: image.png,
                                width: image.width,
                                height: image.height,
                                tokens_done: p.tokens_done,
                            })))
                        }
                        job_event::Event::Completed(c) => {
                            let image = c.image.unwrap_or_default();
                            Some(Ok(JobUpdate::Completed(JobResult {
                                png: image.png,
                                width: image.width,
                                height: image.height,
                                prompt_tokens: c.prompt_tokens,
                                image_tokens: c.image_tokens,
                                queue_seconds: c.queue_seconds,
                                generation_seconds: c.generation_seconds,
                            })))
                        }
                    },
                }
            })
            .boxed())
    }
}
