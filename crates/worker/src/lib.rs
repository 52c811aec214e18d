//! The worker: serves the internal `kiln.v1.Worker` protocol over one [`Engine`]. It validates every
//! call, runs the engine's batched steps off the async runtime, keeps its metrics, and answers with
//! tokens, finished images and timings; traced requests get a span per sequence and per batched call.
//! The engine is the model on a device or the simulated accelerator. It knows nothing of users, tiers
//! or quotas; registration in a membership store comes from the cluster layer.

#![forbid(unsafe_code)]

mod traces;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_model::{Engine, Image, ModelError, NewSequence, SamplingParams, SequenceOutput};
use kiln_proto::v1::worker_server::{Worker, WorkerServer};
use kiln_proto::v1::{
    DecodeRequest, FinishedImage, InfoRequest, PrefillRequest, Preview as WirePreview,
    ReleaseRequest, ReleaseResponse, SequenceTokens, StepResponse, WorkerInfo,
};
use kiln_telemetry::{self as telemetry, TraceContext};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use traces::SequenceTraces;
use tracing::{info, warn};

/// Most decode steps one call may ask for.
pub const MAX_STEPS_PER_CALL: u32 = 64;

/// The gRPC service over an engine.
pub struct WorkerService<E: Engine> {
    name: String,
    /// The engine's device, e.g. `cpu` or `cuda:0` (the memory metrics' label).
    device: String,
    engine: Arc<Mutex<E>>,
    fence: Arc<Fence>,
    traces: SequenceTraces,
    /// When memory was last read: reading it (a /proc file, or a driver call) on every step of
    /// the decode loop would be waste, so it is read at most once per [`MEMORY_READ_EVERY`].
    memory_read_at: Mutex<Option<Instant>>,
    /// Forward passes of each held sequence so far (observed as passes per image when it ends).
    passes: Mutex<HashMap<u64, u32>>,
}

const MEMORY_READ_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Fencing: the newest leader epoch that has called this worker. A call from an older epoch comes
/// from a deposed leader that does not know it yet (paused, partitioned) and is refused, so two
/// schedulers never drive one batch. Checked under the engine's lock, so that no older call slips
/// in after a newer leader's first call.
struct Fence {
    worker: String,
    newest: AtomicU64,
}

impl Fence {
    fn admit(&self, epoch: u64) -> Result<(), Status> {
        let newest = self.newest.fetch_max(epoch, Ordering::SeqCst);
        if epoch < newest {
            telemetry::WORKER_FENCED_CALLS
                .with_label_values(&[&self.worker])
                .inc();
            warn!(worker = %self.worker, epoch, newest, "refused a call from a deposed leader");
            return Err(Status::aborted(format!(
                "fenced: this call comes from leader epoch {epoch}, but a newer leader (epoch \
                 {newest}) drives this worker"
            )));
        }
        Ok(())
    }
}

/// The calling leader's epoch (`kiln-leader-epoch` metadata; 0 when absent).
fn epoch_of(metadata: &tonic::metadata::MetadataMap) -> Result<u64, Status> {
    match metadata.get(kiln_proto::LEADER_EPOCH_HEADER) {
        None => Ok(0),
        Some(v) => v.to_str().ok().and_then(|v| v.parse().ok()).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{}: must be a non-negative integer",
                kiln_proto::LEADER_EPOCH_HEADER
            ))
        }),
    }
}

/// What an engine holds after a call.
struct Load {
    free_blocks: usize,
    sequences: usize,
    /// Memory (used, total): the accelerator's, else the process's on the machine's; `None` when
    /// it was not read this call.
    memory: Option<(u64, u64)>,
}

impl<E: Engine> WorkerService<E> {
    pub fn new(name: String, engine: E) -> Self {
        let info = engine.info();
        telemetry::WORKER_KV_BLOCKS_CAPACITY
            .with_label_values(&[&name])
            .set(info.kv_blocks_total as f64);
        telemetry::WORKER_BATCH_SLOTS_CAPACITY
            .with_label_values(&[&name])
            .set(info.max_batch as f64);
        telemetry::export_worker_series(&name);
        if let Some((used, total)) = engine.device_memory().or_else(telemetry::process_memory) {
            telemetry::WORKER_MEMORY_USED
                .with_label_values(&[&name, &info.device])
                .set(used as f64);
            telemetry::WORKER_MEMORY_TOTAL
                .with_label_values(&[&name, &info.device])
                .set(total as f64);
        }
        WorkerService {
            fence: Arc::new(Fence {
                worker: name.clone(),
                newest: AtomicU64::new(0),
            }),
            name,
            device: info.device,
            engine: Arc::new(Mutex::new(engine)),
            traces: SequenceTraces::default(),
            memory_read_at: Mutex::new(None),
            passes: Mutex::new(HashMap::new()),
        }
    }

    /// Counts each sequence's passes of a call: per decode call its accepted tokens per pass, and
    /// when it finished, the passes its image took here.
    fn count_passes(&self, phase: &str, outputs: &[SequenceOutput]) {
        let per_pass = telemetry::WORKER_TOKENS_PER_PASS.with_label_values(&[&self.name]);
        let per_image = telemetry::WORKER_PASSES_PER_IMAGE.with_label_values(&[&self.name]);
        let mut passes = self.passes.lock().unwrap_or_else(|e| e.into_inner());
        for o in outputs {
            if phase == "decode" && o.passes > 0 {
                per_pass.observe(o.tokens.len() as f64 / o.passes as f64);
            }
            let so_far = passes.entry(o.id).or_insert(0);
            *so_far += o.passes;
            if o.image.is_some() {
                per_image.observe(*so_far as f64);
                passes.remove(&o.id);
            }
        }
    }

    /// Forgets the pass counts of released sequences (all of them with `None`).
    fn forget_passes(&self, ids: Option<&[u64]>) {
        let mut passes = self.passes.lock().unwrap_or_else(|e| e.into_inner());
        match ids {
            Some(ids) => ids.iter().for_each(|id| {
                passes.remove(id);
            }),
            None => passes.clear(),
        }
    }

    /// Whether this call should read memory (and, if so, notes that it did).
    fn memory_due(&self) -> bool {
        let mut last = self
            .memory_read_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= MEMORY_READ_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Runs `f` on the engine on a blocking thread: steps take milliseconds to seconds.
    async fn with_engine<T: Send + 'static>(
        &self,
        epoch: u64,
        f: impl FnOnce(&mut E) -> Result<T, ModelError> + Send + 'static,
    ) -> Result<(T, Load), Status> {
        let engine = self.engine.clone();
        let fence = self.fence.clone();
        let read_memory = self.memory_due();
        tokio::task::spawn_blocking(move || {
            let mut engine = engine
                .lock()
                .map_err(|_| Status::internal("engine poisoned by an earlier panic"))?;
            fence.admit(epoch)?;
            let result = f(&mut engine).map_err(model_status)?;
            let load = Load {
                free_blocks: engine.free_blocks(),
                sequences: engine.sequences(),
                memory: read_memory
                    .then(|| engine.device_memory().or_else(telemetry::process_memory))
                    .flatten(),
            };
            Ok((result, load))
        })
        .await
        .map_err(|e| Status::internal(format!("engine task failed: {e}")))?
    }

    fn step_response(
        &self,
        phase: &str,
        outputs: Vec<SequenceOutput>,
        steps: u32,
        batch: usize,
        start: Instant,
        load: Load,
    ) -> StepResponse {
        let (free, held) = (load.free_blocks, load.sequences);
        telemetry::WORKER_BATCH_SLOTS_USED
            .with_label_values(&[&self.name])
            .set(held as f64);
        if let Some((used, total)) = load.memory {
            telemetry::WORKER_MEMORY_USED
                .with_label_values(&[&self.name, &self.device])
                .set(used as f64);
            telemetry::WORKER_MEMORY_TOTAL
                .with_label_values(&[&self.name, &self.device])
                .set(total as f64);
        }
        let seconds = start.elapsed().as_secs_f64();
        // A multi-step decode call is `steps` forward passes of (at most) this batch: one observation
        // each, so the histogram's count is passes and its sum the time the engine took.
        let passes = steps.max(1);
        let step_duration = telemetry::WORKER_STEP_DURATION.with_label_values(&[
            &self.name,
            phase,
            telemetry::batch_bucket(batch),
        ]);
        for _ in 0..passes {
            step_duration.observe(seconds / passes as f64);
        }
        let tokens: usize = outputs.iter().map(|o| o.tokens.len()).sum();
        self.count_passes(phase, &outputs);
        telemetry::WORKER_TOKENS
            .with_label_values(&[&self.name])
            .inc_by(tokens as u64);
        let total = telemetry::WORKER_KV_BLOCKS_CAPACITY
            .with_label_values(&[&self.name])
            .get();
        telemetry::WORKER_KV_BLOCKS_USED
            .with_label_values(&[&self.name])
            .set(total - free as f64);
        StepResponse {
            sequences: outputs
                .into_iter()
                .map(|o| SequenceTokens {
                    id: o.id,
                    tokens: o.tokens,
                    passes: o.passes,
                    image: o.image.map(wire_image),
                    previews: o
                        .previews
                        .into_iter()
                        .map(|p| WirePreview {
                            index: p.index,
                            image: Some(wire_image(p.image)),
                            tokens_done: p.tokens_done,
                        })
                        .collect(),
                })
                .collect(),
            steps,
            seconds,
            batch_size: batch as u32,
            kv_blocks_free: free as u32,
        }
    }
}

/// Sequences that generated their last token (and left the batch) in a step call.
fn finished(outputs: &[SequenceOutput]) -> impl Iterator<Item = u64> + '_ {
    outputs.iter().filter(|o| o.image.is_some()).map(|o| o.id)
}

fn wire_image(image: Image) -> FinishedImage {
    FinishedImage {
        png: image.png,
        width: image.width,
        height: image.height,
    }
}

fn model_status(e: ModelError) -> Status {
    match e {
        ModelError::InvalidSequence(_) => Status::invalid_argument(e.to_string()),
        ModelError::OutOfBlocks { .. } | ModelError::BatchFull { .. } => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl<E: Engine> Worker for WorkerService<E> {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        let engine = self
            .engine
            .lock()
            .map_err(|_| Status::internal("engine poisoned"))?;
        let info = engine.info();
        Ok(Response::new(WorkerInfo {
            name: self.name.clone(),
            model: info.model,
            device: info.device,
            kv_blocks_total: info.kv_blocks_total as u32,
            kv_blocks_free: engine.free_blocks() as u32,
            block_size: info.block_size as u32,
            max_batch: info.max_batch as u32,
            sequences: engine.sequences() as u32,
            sizes: info.sizes,
            patch_size: info.patch_size as u32,
            max_prompt_bytes: info.max_prompt_bytes as u32,
            default_size: info.default_size,
            prefix_overhead_tokens: kiln_model::engine::prompt_tokens(0) as u32,
            default_temperature: info.default_temperature,
            default_top_k: info.default_top_k,
        }))
    }

    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<StepResponse>, Status> {
        let start = Instant::now();
        let epoch = epoch_of(request.metadata())?;
        let mut seqs = Vec::new();
        for s in request.into_inner().sequences {
            let sampling = s.sampling.ok_or_else(|| {
                Status::invalid_argument(format!("sequence {}: sampling is required", s.id))
            })?;
            let valid = (0.0..=2.0).contains(&sampling.temperature)
                && sampling.top_p > 0.0
                && sampling.top_p <= 1.0;
            if !valid {
                return Err(Status::invalid_argument(format!(
                    "sequence {}: temperature must be in [0, 2] and top_p in (0, 1]",
                    s.id
                )));
            }
            if sampling
                .speculation
                .is_some_and(|w| !(1..=kiln_proto::MAX_SPECULATION).contains(&w))
            {
                return Err(Status::invalid_argument(format!(
                    "sequence {}: sampling.speculation must be 1 to {} tokens per pass, or absent",
                    s.id,
                    kiln_proto::MAX_SPECULATION
                )));
            }
            if s.partial_images > kiln_proto::MAX_PARTIAL_IMAGES {
                return Err(Status::invalid_argument(format!(
                    "sequence {}: partial_images must be at most {}, got {}",
                    s.id,
                    kiln_proto::MAX_PARTIAL_IMAGES,
                    s.partial_images
                )));
            }
            info!(worker = %self.name, request_id = %s.request_id, sequence = s.id, resume_from = s.generated.len(), "sequence joins the batch");
            let trace = TraceContext::from_traceparent(s.trace_parent);
            self.traces.join(&self.name, s.id, &s.request_id, &trace);
            seqs.push(NewSequence {
                id: s.id,
                prompt: s.prompt,
                width: s.width,
                height: s.height,
                sampling: SamplingParams {
                    temperature: sampling.temperature,
                    top_k: sampling.top_k as usize,
                    top_p: sampling.top_p,
                    seed: sampling.seed,
                    speculation: sampling.speculation.map(|w| w as usize),
                },
                generated: s.generated,
                kv_blocks: s.kv_blocks as usize,
                partial_images: s.partial_images,
            });
        }
        if seqs.is_empty() {
            return Err(Status::invalid_argument(
                "sequences: at least one sequence is required",
            ));
        }
        let batch = seqs.len();
        let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
        let step_spans = self.traces.step("prefill", &ids, 1);
        let result = self.with_engine(epoch, move |e| e.prefill(seqs)).await;
        drop(step_spans);
        let (outputs, load) = match result {
            Ok(r) => r,
            Err(status) => {
                // A refused prefill holds none of its sequences.
                self.traces.close(ids);
                return Err(status);
            }
        };
        self.traces.close(finished(&outputs));
        Ok(Response::new(
            self.step_response("prefill", outputs, 1, batch, start, load),
        ))
    }

    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<StepResponse>, Status> {
        let start = Instant::now();
        let epoch = epoch_of(request.metadata())?;
        let DecodeRequest { ids, steps } = request.into_inner();
        if ids.is_empty() {
            return Err(Status::invalid_argument(
                "ids: at least one sequence is required",
            ));
        }
        if steps == 0 || steps > MAX_STEPS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "steps: must be in 1..={MAX_STEPS_PER_CALL}, got {steps}"
            )));
        }
        let batch = ids.len();
        let step_spans = self.traces.step("decode", &ids, steps);
        let (outputs, load) = self
            .with_engine(epoch, move |e| e.decode(&ids, steps as usize))
            .await?;
        drop(step_spans);
        self.traces.close(finished(&outputs));
        Ok(Response::new(self.step_response(
            "decode", outputs, steps, batch, start, load,
        )))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let epoch = epoch_of(request.metadata())?;
        let ReleaseRequest { ids, all } = request.into_inner();
        let mut engine = self
            .engine
            .lock()
            .map_err(|_| Status::internal("engine poisoned"))?;
        self.fence.admit(epoch)?;
        if all {
            let held = engine.held_ids();
            engine.release(&held);
            self.traces.close_all();
            self.forget_passes(None);
        } else {
            engine.release(&ids);
            self.forget_passes(Some(&ids));
            self.traces.close(ids);
        }
        let free = engine.free_blocks();
        let total = engine.info().kv_blocks_total;
        telemetry::WORKER_KV_BLOCKS_USED
            .with_label_values(&[&self.name])
            .set((total - free) as f64);
        telemetry::WORKER_BATCH_SLOTS_USED
            .with_label_values(&[&self.name])
            .set(engine.sequences() as f64);
        Ok(Response::new(ReleaseResponse {
            kv_blocks_free: free as u32,
        }))
    }
}

/// Serves `engine` on `listener` with health and reflection until `shutdown` resolves.
pub async fn run<E: Engine>(
    name: String,
    engine: E,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let info = engine.info();
    info!(worker = %name, ?addr, model = %info.model, device = %info.device, kv_blocks = info.kv_blocks_total, max_batch = info.max_batch, guidance = info.guidance.unwrap_or(1.0), "worker serving");
    let (reporter, health, reflection, reflection_v1alpha) = kiln_proto::standard::services();
    reporter
        .set_serving::<WorkerServer<WorkerService<E>>>()
        .await;
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            WorkerServer::new(WorkerService::new(name.clone(), engine))
                .max_decoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(kiln_proto::standard::incoming(listener), shutdown)
        .await;
    if let Err(e) = &result {
        warn!(worker = %name, error = %e, "worker server stopped with an error");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::{CandleEngine, ModelConfig, Transformer};
    use kiln_proto::v1::{NewSequence as WireSequence, Sampling};
    use tonic::Code;

    fn service() -> (tempfile::TempDir, WorkerService<CandleEngine>) {
        let dir = tempfile::tempdir().unwrap();
        Transformer::init_random(&ModelConfig::tiny(), 3, dir.path()).unwrap();
        let model = Transformer::load(dir.path(), &kiln_model::transformer::Device::Cpu).unwrap();
        (
            dir,
            WorkerService::new("test-worker".into(), CandleEngine::new(model, 32, 4, 4)),
        )
    }

    fn sequence(id: u64, kv_blocks: u32) -> WireSequence {
        WireSequence {
            id,
            prompt: "abc".into(),
            width: 16,
            height: 16,
            sampling: Some(Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed: 1,
                speculation: None,
            }),
            generated: vec![],
            kv_blocks,
            request_id: format!("req-{id}"),
            trace_parent: String::new(),
            partial_images: 0,
        }
    }

    fn from_epoch<T>(epoch: Option<u64>, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(epoch) = epoch {
            request
                .metadata_mut()
                .insert(kiln_proto::LEADER_EPOCH_HEADER, epoch.into());
        }
        request
    }

    #[tokio::test]
    async fn calls_of_a_deposed_leader_are_refused() {
        let (_dir, w) = service();
        let release = |all| ReleaseRequest {
            ids: Vec::new(),
            all,
        };
        // A leader of epoch 7 connects: it releases everything, then prefills.
        w.release(from_epoch(Some(7), release(true))).await.unwrap();
        let prefill = |epoch| {
            from_epoch(
                epoch,
                PrefillRequest {
                    sequences: vec![sequence(1, 3)],
                },
            )
        };
        w.prefill(prefill(Some(7))).await.unwrap();
        // The leader it replaced (epoch 5), or a scheduler without an election, is refused at
        // every call that would touch the batch, and nothing changes.
        for epoch in [Some(5), None] {
            let decode = from_epoch(
                epoch,
                DecodeRequest {
                    ids: vec![1],
                    steps: 1,
                },
            );
            let refused = w.decode(decode).await.unwrap_err();
            assert_eq!(refused.code(), Code::Aborted);
            assert!(
                refused.message().contains("fenced"),
                "{}",
                refused.message()
            );
            let refused = w
                .release(from_epoch(epoch, release(true)))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::Aborted);
            assert_eq!(
                w.prefill(prefill(epoch)).await.unwrap_err().code(),
                Code::Aborted
            );
        }
        let info = w
            .info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.sequences, 1, "the refused calls released nothing");
        // The current leader and any later one go on.
        let decode = |epoch| {
            from_epoch(
                Some(epoch),
                DecodeRequest {
                    ids: vec![1],
                    steps: 1,
                },
            )
        };
        w.decode(decode(7)).await.unwrap();
        w.decode(decode(9)).await.unwrap();
        assert_eq!(w.decode(decode(7)).await.unwrap_err().code(), Code::Aborted);
        let mut bad = Request::new(release(true));
        bad.metadata_mut()
            .insert(kiln_proto::LEADER_EPOCH_HEADER, "soon".parse().unwrap());
        assert_eq!(
            w.release(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn malformed_calls_are_invalid_arguments() {
        let (_dir, w) = service();
        let decode = |ids: Vec<u64>, steps| Request::new(DecodeRequest { ids, steps });
        assert_eq!(
            w.decode(decode(vec![], 1)).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            w.decode(decode(vec![1], 0)).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            w.decode(decode(vec![1], MAX_STEPS_PER_CALL + 1))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        assert_eq!(
            w.decode(decode(vec![7], 1)).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let prefill = |sequences| Request::new(PrefillRequest { sequences });
        assert_eq!(
            w.prefill(prefill(vec![])).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let mut no_sampling = sequence(1, 2);
        no_sampling.sampling = None;
        assert_eq!(
            w.prefill(prefill(vec![no_sampling]))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        // 3 + 3 prefix tokens + 4 image tokens = 10 tokens = 3 blocks of 4, not 2.
        let status = w.prefill(prefill(vec![sequence(1, 2)])).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("needs 3"), "{}", status.message());
        let mut hot = sequence(1, 3);
        hot.sampling.as_mut().unwrap().temperature = 9.0;
        assert_eq!(
            w.prefill(prefill(vec![hot])).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        for window in [0, kiln_proto::MAX_SPECULATION + 1] {
            let mut wide = sequence(1, 3);
            wide.sampling.as_mut().unwrap().speculation = Some(window);
            let status = w.prefill(prefill(vec![wide])).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().contains("speculation"),
                "{}",
                status.message()
            );
        }
    }

    #[tokio::test]
    async fn blocks_follow_prefill_decode_and_release() {
        let (_dir, w) = service();
        let info = w
            .info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                info.kv_blocks_total,
                info.kv_blocks_free,
                info.prefix_overhead_tokens
            ),
            (32, 32, 3)
        );
        let r = w
            .prefill(Request::new(PrefillRequest {
                sequences: vec![sequence(1, 3), sequence(2, 3)],
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.kv_blocks_free, r.batch_size, r.sequences.len()),
            (26, 2, 2)
        );
        // Four image tokens: one from prefill, three more finish both images in one call.
        let r = w
            .decode(Request::new(DecodeRequest {
                ids: vec![1, 2],
                steps: 3,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(r
            .sequences
            .iter()
            .all(|s| s.tokens.len() == 3 && s.passes == 3 && s.image.is_some()));
        assert_eq!(r.kv_blocks_free, 32, "finished sequences free their blocks");
        let per_image = telemetry::WORKER_PASSES_PER_IMAGE.with_label_values(&["test-worker"]);
        assert!(per_image.get_sample_count() >= 2);
        assert!(w.passes.lock().unwrap().is_empty(), "finished: forgotten");
        w.prefill(Request::new(PrefillRequest {
            sequences: vec![sequence(3, 3)],
        }))
        .await
        .unwrap();
        let released = w
            .release(Request::new(ReleaseRequest {
                ids: vec![],
                all: true,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(released.kv_blocks_free, 32);
    }
}
