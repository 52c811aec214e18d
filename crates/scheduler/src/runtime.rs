//! The live scheduler: one task owns the [`SchedulerState`] and the jobs' payloads (prompt, sampling,
//! tokens so far, caller channel); one driver task per worker turns commands into `kiln.v1.Worker`
//! calls and reports back. Handles talk to the owner task over channels; the current time is the
//! time since the runtime started.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use kiln_proto::v1::worker_client::WorkerClient;
use kiln_proto::v1::{
    self as pb, DecodeRequest, InfoRequest, NewSequence, PrefillRequest, ReleaseRequest,
    StepResponse, WorkerInfo,
};
use kiln_telemetry as telemetry;
use kiln_telemetry::TraceContext;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::state::{
    Capacity, Command, FailReason, Job, JobEvent, JobId, Output, SchedulerConfig, SchedulerState,
    SequenceReport, Tier, WorkerId,
};
use crate::SchedulerError;

/// Sampling parameters of a job, already validated by the gateway.
pub type Sampling = pb::Sampling;

/// A validated job as the gateway hands it over.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    pub request_id: String,
    pub user: String,
    pub tier: Tier,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub sampling: Sampling,
    /// The caller's trace: the job's span becomes its child, and the worker's spans the job's.
    pub trace: TraceContext,
    /// Previews to stream while the image is drawn (0 to `kiln_proto::MAX_PARTIAL_IMAGES`).
    pub partial_images: u32,
}

/// The finished image and what it cost.
#[derive(Clone, Debug, PartialEq)]
pub struct JobResult {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub prompt_tokens: u32,
    pub image_tokens: u32,
    pub queue_seconds: f64,
    pub generation_seconds: f64,
}

/// What a caller sees of its job.
#[derive(Clone, Debug, PartialEq)]
pub enum JobUpdate {
    Queued {
        position: u32,
    },
    Started {
        worker: String,
    },
    Progress {
        done: u32,
        total: u32,
    },
    /// A preview of the image so far (when the job asked for previews).
    Preview(JobPreview),
    Completed(JobResult),
}

/// A preview of a job's image being drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct JobPreview {
    /// Which preview, from 0.
    pub index: u32,
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Image tokens drawn in it.
    pub tokens_done: u32,
}

/// The served model as the workers describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDescription {
    pub model: String,
    pub sizes: Vec<u32>,
    pub default_size: u32,
    pub patch_size: u32,
    pub max_prompt_bytes: u32,
    pub prefix_overhead_tokens: u32,
    /// Sampling for requests that set none (see `ModelInfo` in `image.proto`).
    pub default_temperature: Option<f32>,
    pub default_top_k: Option<u32>,
}

/// Runtime settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub batching: SchedulerConfig,
    /// Worker addresses (`http://host:port`) known at start; more join and leave through
    /// [`SchedulerHandle::join_worker`] and [`SchedulerHandle::leave_worker`].
    pub workers: Vec<String>,
    /// Wait between reconnection attempts to a worker.
    pub reconnect_interval: Duration,
    /// Longest a worker call may take; a worker that stops answering is treated as lost.
    pub call_timeout: Duration,
    /// The leader's fencing epoch (its etcd election revision; 0 without an election), sent with
    /// every worker call so that a worker refuses a deposed leader that still believes it leads.
    pub epoch: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            batching: SchedulerConfig::default(),
            workers: Vec::new(),
            reconnect_interval: Duration::from_millis(500),
            call_timeout: Duration::from_secs(60),
            epoch: 0,
        }
    }
}

type UpdateSender = mpsc::UnboundedSender<Result<JobUpdate, SchedulerError>>;

enum Msg {
    Submit {
        request: JobRequest,
        updates: UpdateSender,
        reply: oneshot::Sender<Result<JobId, SchedulerError>>,
    },
    Cancel(JobId),
    Join {
        address: String,
    },
    Leave {
        address: String,
    },
    WorkerUp {
        id: WorkerId,
        address: String,
        info: WorkerInfo,
        calls: mpsc::UnboundedSender<WorkerCall>,
    },
    WorkerDown {
        id: WorkerId,
        error: String,
    },
    StepDone {
        id: WorkerId,
        response: StepResponse,
    },
    PrefillRefused {
        id: WorkerId,
        jobs: Vec<JobId>,
        error: String,
    },
    Status(oneshot::Sender<pb::ClusterStatusResponse>),
}

/// One command as wire requests; the driver sends them in this order.
#[derive(Debug, Default)]
struct WorkerCall {
    release: Option<ReleaseRequest>,
    prefill: Option<PrefillRequest>,
    decode: Option<DecodeRequest>,
}

/// A cheap, cloneable way in to the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Msg>,
    model: watch::Receiver<Option<ModelDescription>>,
}

/// The updates of one job. Dropping it cancels the job.
pub struct JobStream {
    id: JobId,
    rx: mpsc::UnboundedReceiver<Result<JobUpdate, SchedulerError>>,
    tx: mpsc::UnboundedSender<Msg>,
    finished: bool,
}

impl JobStream {
    pub fn id(&self) -> JobId {
        self.id
    }
}

impl Stream for JobStream {
    type Item = Result<JobUpdate, SchedulerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(JobUpdate::Completed(_)) | Err(_)) | None) = &item {
            self.finished = true;
        }
        item
    }
}

impl Drop for JobStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.tx.send(Msg::Cancel(self.id));
        }
    }
}

impl SchedulerHandle {
    /// Queues a job; its updates follow on the returned stream.
    pub async fn submit(&self, request: JobRequest) -> Result<JobStream, SchedulerError> {
        let (updates, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Submit {
                request,
                updates,
                reply,
            })
            .map_err(|_| SchedulerError::ShuttingDown)?;
        let id = answer.await.map_err(|_| SchedulerError::ShuttingDown)??;
        Ok(JobStream {
            id,
            rx,
            tx: self.tx.clone(),
            finished: false,
        })
    }

    /// Adds a worker by address (no-op when it is known): the scheduler connects to it and keeps
    /// reconnecting until it leaves.
    pub fn join_worker(&self, address: String) {
        let _ = self.tx.send(Msg::Join { address });
    }

    /// Removes a worker: its jobs are re-queued and resume elsewhere.
    pub fn leave_worker(&self, address: String) {
        let _ = self.tx.send(Msg::Leave { address });
    }

    /// The model the workers serve, once one worker has been reached.
    pub fn model(&self) -> Option<ModelDescription> {
        self.model.borrow().clone()
    }

    /// Waits until a worker has described the model, or `timeout` passes.
    pub async fn wait_for_model(&self, timeout: Duration) -> Option<ModelDescription> {
        let mut rx = self.model.clone();
        let described = tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?
            .clone();
        described
    }

    pub async fn status(&self) -> Result<pb::ClusterStatusResponse, SchedulerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Status(reply))
            .map_err(|_| SchedulerError::ShuttingDown)?;
        answer.await.map_err(|_| SchedulerError::ShuttingDown)
    }
}

/// Starts the scheduler: the owner task and one driver per configured worker.
pub fn spawn(config: RuntimeConfig) -> SchedulerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (model_tx, model) = watch::channel(None);
    for address in &config.workers {
        let _ = tx.send(Msg::Join {
            address: address.clone(),
        });
    }
    let owner = Owner {
        gauges_at: None,
        own_tx: tx.clone(),
        drivers: HashMap::new(),
        next_worker: 0,
        reconnect_interval: config.reconnect_interval,
        call_timeout: config.call_timeout,
        epoch: config.epoch,
        deadlines: config.batching.deadlines,
        state: SchedulerState::new(config.batching),
        start: Instant::now(),
        next_id: 1,
        payloads: HashMap::new(),
        workers: HashMap::new(),
        model_tx,
    };
    tokio::spawn(owner.run(rx));
    SchedulerHandle { tx, model }
}

struct Payload {
    request: JobRequest,
    prompt_tokens: u32,
    image_tokens: u32,
    generated: Vec<u32>,
    image: Option<pb::FinishedImage>,
    updates: UpdateSender,
    span: tracing::Span,
}

struct LiveWorker {
    name: String,
    address: String,
    calls: mpsc::UnboundedSender<WorkerCall>,
}

struct Owner {
    /// When the slower gauges were last refreshed.
    gauges_at: Option<Instant>,
    /// For the driver tasks it starts.
    own_tx: mpsc::UnboundedSender<Msg>,
    /// address -> (worker id, driver task).
    drivers: HashMap<String, (WorkerId, tokio::task::AbortHandle)>,
    next_worker: WorkerId,
    reconnect_interval: Duration,
    call_timeout: Duration,
    /// Sent with every worker call (see [`RuntimeConfig::epoch`]).
    epoch: u64,
    deadlines: [Duration; 4],
    state: SchedulerState,
    start: Instant,
    next_id: JobId,
    payloads: HashMap<JobId, Payload>,
    workers: HashMap<WorkerId, LiveWorker>,
    model_tx: watch::Sender<Option<ModelDescription>>,
}

impl Owner {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            let decision = Instant::now();
            let now = self.start.elapsed();
            let outputs = match msg {
                Msg::Submit {
                    request,
                    updates,
                    reply,
                } => match self.admit(request, updates) {
                    Ok((job, id)) => {
                        let _ = reply.send(Ok(id));
                        self.state.submit(job, now)
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        Vec::new()
                    }
                },
                Msg::Cancel(id) => {
                    if let Some(p) = self.payloads.get(&id) {
                        p.span.in_scope(|| info!("job cancelled by its caller"));
                    }
                    self.state.cancel(id, now)
                }
                Msg::Join { address } => {
                    if !self.drivers.contains_key(&address) {
                        let id = self.next_worker;
                        self.next_worker += 1;
                        info!(%address, "worker joins; connecting");
                        let driver = tokio::spawn(drive_worker(
                            id,
                            address.clone(),
                            self.own_tx.clone(),
                            self.reconnect_interval,
                            self.call_timeout,
                            self.epoch,
                        ));
                        self.drivers.insert(address, (id, driver.abort_handle()));
                    }
                    Vec::new()
                }
                Msg::Leave { address } => match self.drivers.remove(&address) {
                    Some((id, driver)) => {
                        driver.abort();
                        if let Some(w) = self.workers.remove(&id) {
                            warn!(worker = %w.name, %address, "worker left; its jobs are re-queued");
                        }
                        self.state.remove_worker(id, now)
                    }
                    None => Vec::new(),
                },
                // A driver that was stopped meanwhile may still have announced its worker.
                Msg::WorkerUp { id, .. }
                    if !self.drivers.values().any(|(known, _)| *known == id) =>
                {
                    Vec::new()
                }
                Msg::WorkerUp {
                    id,
                    address,
                    info,
                    calls,
                } => {
                    info!(worker = %info.name, %address, kv_blocks = info.kv_blocks_total, max_batch = info.max_batch, "worker joined");
                    self.model_tx.send_if_modified(|m| {
                        let described = m.is_none();
                        if described {
                            *m = Some(describe(&info));
                        }
                        described
                    });
                    let capacity = Capacity {
                        kv_blocks: info.kv_blocks_total as usize,
                        block_size: info.block_size.max(1) as usize,
                        max_batch: info.max_batch as usize,
                    };
                    self.workers.insert(
                        id,
                        LiveWorker {
                            name: info.name,
                            address,
                            calls,
                        },
                    );
                    self.state.add_worker(id, capacity, now)
                }
                Msg::WorkerDown { id, error } => {
                    if let Some(w) = self.workers.remove(&id) {
                        warn!(worker = %w.name, %error, "worker lost; its jobs are re-queued");
                    }
                    self.state.remove_worker(id, now)
                }
                Msg::StepDone { id, response } => {
                    let reports = self.absorb(&response);
                    self.state.step_done(id, &reports, now)
                }
                Msg::PrefillRefused { id, jobs, error } => {
                    warn!(worker = id, %error, "worker refused a prefill; its jobs fail");
                    self.state.prefill_refused(id, &jobs, &error, now)
                }
                Msg::Status(reply) => {
                    let _ = reply.send(self.status());
                    Vec::new()
                }
            };
            self.dispatch(outputs);
            self.record_gauges();
            telemetry::SCHEDULER_DECISION_DURATION.observe(decision.elapsed().as_secs_f64());
        }
    }

    /// Checks a job against the served model and stores its payload.
    fn admit(
        &mut self,
        request: JobRequest,
        updates: UpdateSender,
    ) -> Result<(Job, JobId), SchedulerError> {
        let model = self
            .model_tx
            .borrow()
            .clone()
            .ok_or(SchedulerError::NoWorkers)?;
        if self.workers.is_empty() {
            return Err(SchedulerError::NoWorkers);
        }
        for (field, side) in [("width", request.width), ("height", request.height)] {
            if !model.sizes.contains(&side) {
                return Err(SchedulerError::InvalidJob(format!(
                    "{field}: {side} is not one of {:?}",
                    model.sizes
                )));
            }
        }
        // Gateways validate too, but a job the worker refuses would be re-queued over and over.
        let s = &request.sampling;
        if !((0.0..=2.0).contains(&s.temperature) && s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(SchedulerError::InvalidJob(format!(
                "sampling: temperature must be in [0, 2] and top_p in (0, 1], got {} and {}",
                s.temperature, s.top_p
            )));
        }
        if request.partial_images > kiln_proto::MAX_PARTIAL_IMAGES {
            return Err(SchedulerError::InvalidJob(format!(
                "partial_images: at most {}, got {}",
                kiln_proto::MAX_PARTIAL_IMAGES,
                request.partial_images
            )));
        }
        if request.prompt.len() > model.max_prompt_bytes as usize {
            return Err(SchedulerError::InvalidJob(format!(
                "prompt: longer than {} bytes",
                model.max_prompt_bytes
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let prompt_tokens = request.prompt.len() as u32 + model.prefix_overhead_tokens;
        let image_tokens = (request.width / model.patch_size) * (request.height / model.patch_size);
        let traced = request.trace.sampled();
        let span = kiln_telemetry::request_span!(traced, "job", request_id = %request.request_id, job = id, tier = request.tier.as_str(), trace_id = tracing::field::Empty);
        if traced {
            request.trace.adopt(&span);
        }
        span.in_scope(|| debug!(prompt_tokens, image_tokens, "job queued"));
        let job = Job {
            id,
            user: request.user.clone(),
            tier: request.tier,
            prompt_tokens: prompt_tokens as usize,
            image_tokens: image_tokens as usize,
        };
        self.payloads.insert(
            id,
            Payload {
                request,
                prompt_tokens,
                image_tokens,
                generated: Vec::new(),
                image: None,
                updates,
                span,
            },
        );
        Ok((job, id))
    }

    /// Records the tokens and images of a worker's answer; returns the per-sequence reports.
    fn absorb(&mut self, response: &StepResponse) -> Vec<SequenceReport> {
        response
            .sequences
            .iter()
            .map(|s| {
                if let Some(p) = self.payloads.get_mut(&s.id) {
                    p.generated.extend(&s.tokens);
                    if s.image.is_some() {
                        p.image = s.image.clone();
                    }
                    // Previews go straight to the caller: the state machine decides nothing on them.
                    for preview in &s.previews {
                        let Some(image) = &preview.image else {
                            continue;
                        };
                        let _ = p.updates.send(Ok(JobUpdate::Preview(JobPreview {
                            index: preview.index,
                            png: image.png.clone(),
                            width: image.width,
                            height: image.height,
                            tokens_done: preview.tokens_done,
                        })));
                    }
                }
                SequenceReport {
                    job: s.id,
                    new_tokens: s.tokens.len(),
                    // A worker from before passes were reported ran one pass per token.
                    passes: if s.passes == 0 {
                        s.tokens.len()
                    } else {
                        s.passes as usize
                    },
                    finished: s.image.is_some(),
                }
            })
            .collect()
    }

    fn dispatch(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Command { worker, command } => self.send_command(worker, command),
                Output::Event { job, event } => self.notify(job, event),
            }
        }
    }

    fn send_command(&mut self, worker: WorkerId, command: Command) {
        let release =
            |ids: Vec<JobId>| (!ids.is_empty()).then_some(ReleaseRequest { ids, all: false });
        let call = match command {
            Command::Prefill { release: r, jobs } => WorkerCall {
                release: release(r),
                prefill: Some(PrefillRequest {
                    sequences: jobs
                        .iter()
                        .filter_map(|p| {
                            let payload = self.payloads.get(&p.job)?;
                            Some(NewSequence {
                                id: p.job,
                                prompt: payload.request.prompt.clone(),
                                width: payload.request.width,
                                height: payload.request.height,
                                sampling: Some(payload.request.sampling),
                                generated: payload.generated
                                    [..p.resume_from.min(payload.generated.len())]
                                    .to_vec(),
                                kv_blocks: p.kv_blocks as u32,
                                request_id: payload.request.request_id.clone(),
                                trace_parent: TraceContext::of(&payload.span)
                                    .traceparent()
                                    .to_string(),
                                partial_images: payload.request.partial_images,
                            })
                        })
                        .collect(),
                }),
                decode: None,
            },
            Command::Decode {
                release: r,
                jobs,
                steps,
            } => WorkerCall {
                release: release(r),
                prefill: None,
                decode: Some(DecodeRequest {
                    ids: jobs,
                    steps: steps as u32,
                }),
            },
            Command::Release { release: r } => WorkerCall {
                release: release(r),
                ..Default::default()
            },
        };
        if let Some(w) = self.workers.get(&worker) {
            // A closed channel means the driver is reconnecting; its WorkerDown is already queued.
            let _ = w.calls.send(call);
        }
    }

    fn notify(&mut self, job: JobId, event: JobEvent) {
        let Some(payload) = self.payloads.get_mut(&job) else {
            return;
        };
        let _enter = payload.span.enter();
        let update = match event {
            JobEvent::Queued { position } => Ok(JobUpdate::Queued {
                position: position as u32,
            }),
            JobEvent::Started { worker } => {
                let name = self
                    .workers
                    .get(&worker)
                    .map(|w| w.name.clone())
                    .unwrap_or_default();
                info!(worker = %name, resume_from = payload.generated.len(), "job started");
                Ok(JobUpdate::Started { worker: name })
            }
            JobEvent::Progress { done, total } => Ok(JobUpdate::Progress {
                done: done as u32,
                total: total as u32,
            }),
            JobEvent::Requeued => {
                telemetry::SCHEDULER_REQUEUED
                    .with_label_values(&[payload.request.tier.as_str()])
                    .inc();
                info!(
                    tokens_kept = payload.generated.len(),
                    "job re-queued after its worker was lost"
                );
                return;
            }
            JobEvent::Finished {
                queued_for,
                ran_for,
            } => {
                telemetry::SCHEDULER_QUEUE_WAIT
                    .with_label_values(&[payload.request.tier.as_str()])
                    .observe(queued_for.as_secs_f64());
                drop(_enter);
                let payload = self.payloads.remove(&job).expect("present above");
                let result = match payload.image {
                    Some(image) => {
                        payload.span.in_scope(|| {
                            info!(
                                queue_s = queued_for.as_secs_f64(),
                                generation_s = ran_for.as_secs_f64(),
                                "job finished"
                            )
                        });
                        Ok(JobUpdate::Completed(JobResult {
                            png: image.png,
                            width: image.width,
                            height: image.height,
                            prompt_tokens: payload.prompt_tokens,
                            image_tokens: payload.image_tokens,
                            queue_seconds: queued_for.as_secs_f64(),
                            generation_seconds: ran_for.as_secs_f64(),
                        }))
                    }
                    None => Err(SchedulerError::WorkerFailed(
                        "the worker finished the sequence without an image".into(),
                    )),
                };
                let _ = payload.updates.send(result);
                return;
            }
            JobEvent::Failed(reason) => {
                let error = match reason {
                    FailReason::TooLarge { kv_blocks } => SchedulerError::TooLarge { kv_blocks },
                    FailReason::Refused(why) => SchedulerError::WorkerFailed(why),
                    FailReason::Shed {
                        reason,
                        retry_after,
                    } => {
                        telemetry::SCHEDULER_SHED
                            .with_label_values(&[payload.request.tier.as_str(), reason.as_str()])
                            .inc();
                        SchedulerError::Shed {
                            reason: reason.as_str().into(),
                            retry_after,
                        }
                    }
                };
                warn!(%error, "job failed");
                drop(_enter);
                let payload = self.payloads.remove(&job).expect("present above");
                let _ = payload.updates.send(Err(error));
                return;
            }
            JobEvent::Cancelled => {
                drop(_enter);
                self.payloads.remove(&job);
                return;
            }
        };
        let _ = payload.updates.send(update);
    }

    fn status(&self) -> pb::ClusterStatusResponse {
        let snapshot = self.state.snapshot(self.start.elapsed());
        pb::ClusterStatusResponse {
            tiers: Tier::ALL
                .iter()
                .map(|&t| pb::TierQueue {
                    tier: t.as_str().into(),
                    waiting: snapshot.waiting[t as usize] as u32,
                    oldest_wait_seconds: snapshot.oldest_wait[t as usize].as_secs_f64(),
                    shed_total: snapshot.shed[t as usize],
                    deadline_seconds: self.deadlines[t as usize].as_secs_f64(),
                })
                .collect(),
            tokens_per_second: snapshot.tokens_per_second,
            backlog_seconds: snapshot.backlog_seconds,
            waiting: snapshot.waiting.iter().sum::<usize>() as u32,
            running: snapshot.running as u32,
            workers: snapshot
                .workers
                .iter()
                .filter_map(|w| {
                    let live = self.workers.get(&w.id)?;
                    Some(pb::WorkerStatus {
                        name: live.name.clone(),
                        address: live.address.clone(),
                        kv_blocks_total: w.capacity.kv_blocks as u32,
                        kv_blocks_free: w.free_blocks as u32,
                        max_batch: w.capacity.max_batch as u32,
                        running: w.running as u32,
                        tokens_per_second: w.tokens_per_second,
                        last_call_ms: w.last_call.as_secs_f64() * 1e3,
                        tokens_per_pass: w.tokens_per_pass,
                    })
                })
                .collect(),
            ..Default::default()
        }
    }

    fn record_gauges(&mut self) {
        let (waiting, running) = self.state.counts();
        // The snapshot walks the queues: refresh the slower gauges at most every 250 ms.
        // The first call records them at once, so they are on /metrics from the first decision.
        if self
            .gauges_at
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(250))
        {
            self.gauges_at = Some(Instant::now());
            let snapshot = self.state.snapshot(self.start.elapsed());
            for tier in Tier::ALL {
                telemetry::SCHEDULER_OLDEST_WAIT
                    .with_label_values(&[tier.as_str()])
                    .set(snapshot.oldest_wait[tier as usize].as_secs_f64());
            }
            let slots: usize = snapshot.workers.iter().map(|w| w.capacity.max_batch).sum();
            telemetry::SCHEDULER_SATURATION.set(if slots > 0 {
                running as f64 / slots as f64
            } else {
                0.0
            });
            telemetry::SCHEDULER_BACKLOG.set(snapshot.backlog_seconds);
        }
        for tier in Tier::ALL {
            telemetry::SCHEDULER_QUEUE_DEPTH
                .with_label_values(&[tier.as_str()])
                .set(waiting[tier as usize] as i64);
        }
        telemetry::SCHEDULER_RUNNING.set(running as i64);
        telemetry::SCHEDULER_WORKERS.set(self.workers.len() as i64);
    }
}

fn describe(info: &WorkerInfo) -> ModelDescription {
    ModelDescription {
        model: info.model.clone(),
        sizes: info.sizes.clone(),
        default_size: info.default_size,
        patch_size: info.patch_size.max(1),
        max_prompt_bytes: info.max_prompt_bytes,
        prefix_overhead_tokens: info.prefix_overhead_tokens,
        default_temperature: info.default_temperature,
        default_top_k: info.default_top_k,
    }
}

/// Connects to one worker, announces it, executes its calls, and reconnects after a failure.
async fn drive_worker(
    id: WorkerId,
    address: String,
    owner: mpsc::UnboundedSender<Msg>,
    retry: Duration,
    call_timeout: Duration,
    epoch: u64,
) {
    let span = info_span!("worker_driver", worker = id, %address);
    async move {
        loop {
            let connected = tokio::time::timeout(Duration::from_secs(5), connect(&address, epoch))
                .await
                .unwrap_or_else(|_| Err("the worker did not answer within 5 s".into()));
            match connected {
                Ok((mut client, info)) => {
                    let (calls, mut rx) = mpsc::unbounded_channel();
                    if owner
                        .send(Msg::WorkerUp {
                            id,
                            address: address.clone(),
                            info,
                            calls,
                        })
                        .is_err()
                    {
                        return;
                    }
                    let error = loop {
                        let Some(call) = rx.recv().await else { return };
                        let call_started = Instant::now();
                        let answer = tokio::time::timeout(call_timeout, execute(&mut client, call))
                            .await
                            .unwrap_or_else(|_| {
                                Err(CallError::Failed(tonic::Status::deadline_exceeded(
                                    format!("the worker did not answer within {call_timeout:?}"),
                                )))
                            });
                        telemetry::SCHEDULER_WORKER_CALL_DURATION
                            .observe(call_started.elapsed().as_secs_f64());
                        let msg = match answer {
                            Ok(response) => Msg::StepDone { id, response },
                            Err(CallError::Refused { jobs, status }) => Msg::PrefillRefused {
                                id,
                                jobs,
                                error: status.message().to_string(),
                            },
                            Err(CallError::Failed(status)) => break status.to_string(),
                        };
                        if owner.send(msg).is_err() {
                            return;
                        }
                    };
                    if owner.send(Msg::WorkerDown { id, error }).is_err() {
                        return;
                    }
                }
                Err(e) => debug!(error = %e, "worker not reachable yet"),
            }
            tokio::time::sleep(retry).await;
        }
    }
    .instrument(span)
    .await
}

/// Stamps every worker call with the leader's fencing epoch.
#[derive(Clone, Copy)]
struct EpochStamp(u64);

impl tonic::service::Interceptor for EpochStamp {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(kiln_proto::LEADER_EPOCH_HEADER, self.0.into());
        Ok(request)
    }
}

type Worker = WorkerClient<tonic::service::interceptor::InterceptedService<Channel, EpochStamp>>;

async fn connect(
    address: &str,
    epoch: u64,
) -> Result<(Worker, WorkerInfo), Box<dyn std::error::Error + Send + Sync>> {
    let channel = Channel::from_shared(address.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut client = WorkerClient::with_interceptor(channel, EpochStamp(epoch))
        .max_decoding_message_size(64 << 20);
    let info = client.info(InfoRequest {}).await?.into_inner();
    // The scheduler that connects owns the worker's batch: anything left from before is dropped.
    client
        .release(ReleaseRequest {
            ids: Vec::new(),
            all: true,
        })
        .await?;
    Ok((client, info))
}

/// How a worker call failed: the worker refused a prefill as invalid (the worker is fine), or the
/// call failed otherwise (the worker is treated as lost and resynchronised).
enum CallError {
    Refused {
        jobs: Vec<JobId>,
        status: tonic::Status,
    },
    Failed(tonic::Status),
}

async fn execute(client: &mut Worker, call: WorkerCall) -> Result<StepResponse, CallError> {
    if let Some(release) = call.release {
        client.release(release).await.map_err(CallError::Failed)?;
    }
    let mut response = StepResponse::default();
    if let Some(prefill) = call.prefill {
        if !prefill.sequences.is_empty() {
            let jobs: Vec<JobId> = prefill.sequences.iter().map(|s| s.id).collect();
            response = client
                .prefill(prefill)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                        CallError::Refused { jobs, status }
                    }
                    _ => CallError::Failed(status),
                })?
                .into_inner();
        }
    }
    if let Some(decode) = call.decode {
        response = client
            .decode(decode)
            .await
            .map_err(CallError::Failed)?
            .into_inner();
    }
    Ok(response)
}
