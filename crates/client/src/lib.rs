//! The Rust client of Kiln's public API (`kiln.v1.ImageService`), for internal services and for
//! Kiln's own tools. It connects with an API key, streams typed [`Event`]s (dropping the stream
//! cancels the request), reads the caller's quota, and retries only what the server says is
//! retryable: `UNAVAILABLE`, requests shed at capacity (`RESOURCE_EXHAUSTED`, reason `SHED`) and
//! `DUPLICATE_IN_FLIGHT`, each no sooner than the server's `RetryInfo` asks (jitter only adds), within
//! a time budget, and always with the same idempotency key so that a retry is never charged twice.
//! A quota refusal is retried only when its window resets within the budget; every other status is
//! returned unchanged.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kiln_proto::v1::image_service_client::ImageServiceClient;
use kiln_proto::v1::{
    generate_event, GenerateRequest, GetModelInfoRequest, GetQuotaRequest, ModelInfo, QuotaStatus,
    SamplingParams,
};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

pub use kiln_proto::v1::Usage;

/// The Rust examples of `docs/api.md`, compiled as doctests so that the guide cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/api.md")]
pub struct ApiGuide;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the gateway at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("the API key cannot be sent as metadata (it must be visible ASCII)")]
    BadKey,
    /// The server's answer, unchanged, after `attempts` tries.
    #[error("{} ({:?}) after {attempts} attempt(s)", status.message(), status.code())]
    Status { status: Status, attempts: u32 },
    #[error("the stream ended without an image")]
    Incomplete,
}

impl Error {
    /// The final status, when the server answered.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Status { status, .. } => Some(status),
            _ => None,
        }
    }

    /// `ErrorInfo.reason` of the final status (e.g. `QUOTA_EXHAUSTED`, `POLICY_REFUSED`, `SHED`).
    pub fn reason(&self) -> Option<String> {
        self.status()
            .and_then(|s| s.get_details_error_info())
            .map(|i| i.reason)
    }
}

/// How hard to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Most attempts in all (1 disables retries).
    pub max_attempts: u32,
    /// Longest time from the first attempt to the last retry's start.
    pub budget: Duration,
    /// Backoff when the server gives no `RetryInfo`: `base * 2^(attempt-1)`, capped at `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Extra random delay, as a share of the delay (0.2 = up to +20 %); never shortens it.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            budget: Duration::from_secs(120),
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    RetryAfter(Duration),
    GiveUp,
}

/// The retry rule, pure: `attempt` is the number of attempts made so far, `elapsed` the time since
/// the first began. The returned delay excludes jitter.
pub fn decide(status: &Status, attempt: u32, elapsed: Duration, policy: &RetryPolicy) -> Decision {
    if attempt >= policy.max_attempts {
        return Decision::GiveUp;
    }
    let asked = status.get_details_retry_info().and_then(|r| r.retry_delay);
    let reason = status.get_details_error_info().map(|i| i.reason);
    let backoff = || {
        policy
            .base_delay
            .saturating_mul(1 << (attempt.saturating_sub(1)).min(16))
            .min(policy.max_delay)
    };
    let delay = match (status.code(), reason.as_deref()) {
        (Code::Unavailable, _) => asked.unwrap_or_else(backoff),
        (Code::ResourceExhausted, Some("SHED")) | (Code::Aborted, Some("DUPLICATE_IN_FLIGHT")) => {
            asked.unwrap_or_else(backoff)
        }
        // A quota is retried only when it resets within the budget, and never before it does.
        (Code::ResourceExhausted, Some("QUOTA_EXHAUSTED")) => match asked {
            Some(d) => d,
            None => return Decision::GiveUp,
        },
        _ => return Decision::GiveUp,
    };
    if elapsed + delay > policy.budget {
        Decision::GiveUp
    } else {
        Decision::RetryAfter(delay)
    }
}

/// A generation request; unset fields take the server's defaults.
#[derive(Clone, Debug, Default)]
pub struct Request {
    inner: GenerateRequest,
}

impl Request {
    pub fn new(prompt: impl Into<String>) -> Self {
        Request {
            inner: GenerateRequest {
                prompt: prompt.into(),
                ..Default::default()
            },
        }
    }

    /// Square image of `side` pixels.
    pub fn size(mut self, side: u32) -> Self {
        self.inner.width = side;
        self.inner.height = side;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.sampling().seed = seed;
        self
    }

    pub fn temperature(mut self, t: f32) -> Self {
        let s = self.sampling();
        s.temperature = t;
        s.has_temperature = true;
        self
    }

    pub fn top_k(mut self, k: u32) -> Self {
        self.sampling().top_k = k;
        self
    }

    pub fn top_p(mut self, p: f32) -> Self {
        self.sampling().top_p = p;
        self
    }

    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.inner.request_id = id.into();
        self
    }

    /// Previews to stream while the image is drawn (0 to 3), as [`Event::Partial`].
    pub fn partial_images(mut self, previews: u32) -> Self {
        self.inner.partial_images = previews;
        self
    }

    /// The key that makes retries free (one is generated when not set).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.inner.idempotency_key = key.into();
        self
    }

    fn sampling(&mut self) -> &mut SamplingParams {
        self.inner.sampling.get_or_insert_with(Default::default)
    }
}

/// The finished image.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub request_id: String,
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub usage: Option<Usage>,
}

/// One event of a generation.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
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
    /// A preview of the image so far (asked for with [`Request::partial_images`]).
    Partial(kiln_proto::v1::PartialImage),
    Completed(Image),
}

/// A connection to a gateway with one API key.
#[derive(Clone)]
pub struct Client {
    inner: ImageServiceClient<Channel>,
    key: MetadataValue<tonic::metadata::Ascii>,
    policy: RetryPolicy,
}

impl Client {
    /// Connects to `address` (`http://host:port`).
    pub async fn connect(address: &str, api_key: &str) -> Result<Client, Error> {
        let connect_error = |message: String| Error::Connect {
            address: address.to_string(),
            message,
        };
        let channel = Channel::from_shared(address.to_string())
            .map_err(|e| connect_error(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let key = format!("Bearer {api_key}")
            .parse()
            .map_err(|_| Error::BadKey)?;
        Ok(Client {
            inner: ImageServiceClient::new(channel).max_decoding_message_size(64 << 20),
            key,
            policy: RetryPolicy::default(),
        })
    }

    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn authed<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.key.clone());
        request
    }

    /// The served model.
    pub async fn model_info(&self) -> Result<ModelInfo, Error> {
        self.inner
            .clone()
            .get_model_info(self.authed(GetModelInfoRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(|status| Error::Status {
                status,
                attempts: 1,
            })
    }

    /// The caller's limits and usage.
    pub async fn quota(&self) -> Result<QuotaStatus, Error> {
        self.inner
            .clone()
            .get_quota(self.authed(GetQuotaRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(|status| Error::Status {
                status,
                attempts: 1,
            })
    }

    /// One attempt, as a stream of events; dropping the stream cancels the request.
    pub async fn stream(
        &self,
        request: Request,
    ) -> Result<impl Stream<Item = Result<Event, Status>> + Send + 'static, Status> {
        let stream = self
            .inner
            .clone()
            .generate(self.authed(request.inner))
            .await?
            .into_inner();
        Ok(stream.filter_map(|event| async move {
            match event {
                Err(status) => Some(Err(status)),
                Ok(e) => {
                    let id = e.request_id;
                    Some(Ok(match e.event? {
                        generate_event::Event::Queued(q) => Event::Queued {
                            position: q.position,
                        },
                        generate_event::Event::Started(s) => Event::Started { worker: s.worker },
                        generate_event::Event::Progress(p) => Event::Progress {
                            done: p.tokens_done,
                            total: p.tokens_total,
                        },
                        generate_event::Event::PartialImage(p) => Event::Partial(p),
                        generate_event::Event::Completed(c) => Event::Completed(Image {
                            request_id: id,
                            png: c.png,
                            width: c.width,
                            height: c.height,
                            usage: c.usage,
                        }),
                    }))
                }
            }
        }))
    }

    /// Generates an image, retrying as the server allows.
    pub async fn generate(&self, request: Request) -> Result<Image, Error> {
        self.generate_with(request, |_| {}).await
    }

    /// Like [`Client::generate`], calling `on_event` with every event of every attempt.
    pub async fn generate_with(
        &self,
        mut request: Request,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Image, Error> {
        if request.inner.idempotency_key.is_empty() {
            request.inner.idempotency_key = format!("kc-{}", uuid::Uuid::new_v4().simple());
        }
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let status = match self.attempt(request.clone(), &mut on_event).await {
                Ok(image) => return Ok(image),
                Err(AttemptError::Incomplete) => return Err(Error::Incomplete),
                Err(AttemptError::Status(status)) => status,
            };
            match decide(&status, attempt, started.elapsed(), &self.policy) {
                Decision::GiveUp => {
                    return Err(Error::Status {
                        status,
                        attempts: attempt,
                    })
                }
                Decision::RetryAfter(delay) => {
                    let extra = delay.mul_f64(self.policy.jitter.max(0.0) * rand::random::<f64>());
                    tracing::debug!(code = ?status.code(), ?delay, attempt, "retrying as the server asked");
                    tokio::time::sleep(delay + extra).await;
                }
            }
        }
    }

    async fn attempt(
        &self,
        request: Request,
        on_event: &mut impl FnMut(&Event),
    ) -> Result<Image, AttemptError> {
        let stream = self.stream(request).await.map_err(AttemptError::Status)?;
        tokio::pin!(stream);
        while let Some(event) = stream.next().await {
            let event = event.map_err(AttemptError::Status)?;
            on_event(&event);
            if let Event::Completed(image) = event {
                return Ok(image);
            }
        }
        Err(AttemptError::Incomplete)
    }
}

enum AttemptError {
    Status(Status),
    Incomplete,
}

#[cfg(test)]
mod tests {
    use tonic_types::ErrorDetails;

    use super::*;

    fn status(code: Code, reason: &str, retry: Option<Duration>) -> Status {
        let mut details = ErrorDetails::with_error_info(reason, "kiln.dev", []);
        details.set_retry_info(retry);
        Status::with_error_details(code, "x", details)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            budget: Duration::from_secs(60),
            ..Default::default()
        }
    }

    #[test]
    fn retry_info_sets_the_delay_and_backoff_fills_in() {
        let p = policy();
        let shed = status(
            Code::ResourceExhausted,
            "SHED",
            Some(Duration::from_secs(7)),
        );
        assert_eq!(
            decide(&shed, 1, Duration::ZERO, &p),
            Decision::RetryAfter(Duration::from_secs(7))
        );
        let down = Status::unavailable("down");
        assert_eq!(
            decide(&down, 1, Duration::ZERO, &p),
            Decision::RetryAfter(Duration::from_millis(500))
        );
        assert_eq!(
            decide(&down, 3, Duration::ZERO, &p),
            Decision::RetryAfter(Duration::from_secs(2))
        );
    }

    #[test]
    fn budget_and_attempts_end_retries() {
        let p = policy();
        let shed = status(
            Code::ResourceExhausted,
            "SHED",
            Some(Duration::from_secs(30)),
        );
        assert_eq!(
            decide(&shed, 1, Duration::from_secs(31), &p),
            Decision::GiveUp
        );
        assert_eq!(
            decide(&Status::unavailable("x"), 5, Duration::ZERO, &p),
            Decision::GiveUp
        );
    }

    #[test]
    fn quotas_wait_for_their_reset_and_other_refusals_are_final() {
        let p = policy();
        let soon = status(
            Code::ResourceExhausted,
            "QUOTA_EXHAUSTED",
            Some(Duration::from_secs(10)),
        );
        assert_eq!(
            decide(&soon, 1, Duration::ZERO, &p),
            Decision::RetryAfter(Duration::from_secs(10))
        );
        let tomorrow = status(
            Code::ResourceExhausted,
            "QUOTA_EXHAUSTED",
            Some(Duration::from_secs(80_000)),
        );
        assert_eq!(decide(&tomorrow, 1, Duration::ZERO, &p), Decision::GiveUp);
        for final_status in [
            status(Code::PermissionDenied, "POLICY_REFUSED", None),
            status(Code::InvalidArgument, "INVALID_ARGUMENT", None),
            status(Code::Unauthenticated, "UNKNOWN_API_KEY", None),
            status(Code::Internal, "WORKER_FAILED", None),
        ] {
            assert_eq!(
                decide(&final_status, 1, Duration::ZERO, &p),
                Decision::GiveUp
            );
        }
    }
}
