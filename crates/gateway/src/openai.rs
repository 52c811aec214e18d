//! The OpenAI-compatible Images API over HTTP/JSON, beside the gRPC API: `POST
//! /v1/images/generations`, `GET /v1/models` and `GET /v1/models/{id}`. Services that call OpenAI's
//! API switch to Kiln by changing the base URL and the key. Each of a request's `n` images goes
//! through the very pipeline of a gRPC `Generate` (the same keys, validation, policy, quota,
//! shedding, C2PA signing and settlement; `n` images are `n` charges, and one not delivered is
//! refunded), marked `protocol="http"` in the metrics and the span; the caller's `traceparent`
//! continues its trace. Errors are the gRPC status mapped to OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`), with `retry-after` and the
//! `x-ratelimit-*-requests` headers; every answer carries `x-request-id`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Request as HttpRequest, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use futures::{Stream, StreamExt};
use kiln_proto::v1::{generate_event, Completed, GenerateRequest, PartialImage, SamplingParams};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic_types::StatusExt;
use tracing::{info, Instrument};

use crate::service::{Authenticated, EventStream, Protocol};
use crate::validation::MAX_REQUEST_ID_LEN;
use crate::{Gateway, GatewayError};

/// Most images one request may ask for (OpenAI's limit).
pub const MAX_IMAGES: u32 = 10;

/// Longest request body accepted (a prompt is at most a few kilobytes).
const MAX_BODY_BYTES: usize = 64 << 10;

/// Who owns the served model in `GET /v1/models`.
const OWNER: &str = "kiln";

/// The request id of one HTTP request: the caller's `x-request-id` when it is a valid one (short
/// enough that `-<image>` suffixes still fit), a fresh one otherwise.
#[derive(Clone, Debug)]
struct RequestId(String);

/// Serves the OpenAI-compatible API on `listener` until `shutdown` resolves.
pub async fn run(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    info!(addr = ?listener.local_addr().ok(), "OpenAI-compatible HTTP API serving");
    axum::serve(listener, router(gateway))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The routes, for [`run`] and for tests.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/images/generations", post(generate))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(gateway)
}

async fn with_request_id(mut request: HttpRequest, next: Next) -> Response {
    let given = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN - 3
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// An answer in OpenAI's error shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    message: String,
    retry_after: Option<Duration>,
    /// Boxed: most errors carry none, and a `Result` should stay small.
    headers: Box<HeaderMap>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
            headers: Box::default(),
        }
    }

    /// A 400 naming the body field at fault.
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            code: Some("invalid_value"),
            param: Some(param.to_string()),
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                message.into(),
            )
        }
    }

    /// The OpenAI form of a status the pipeline answered, by its stable `ErrorInfo` reason.
    fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let reason = details
            .error_info()
            .map(|i| i.reason.clone())
            .unwrap_or_default();
        let field = details
            .bad_request()
            .and_then(|b| b.field_violations.first())
            .map(|v| body_param(&v.field).to_string());
        let limit = details
            .error_info()
            .and_then(|i| i.metadata.get("limit").cloned());
        use StatusCode as S;
        let (http, kind, code) = match reason.as_str() {
            "MISSING_API_KEY" | "UNKNOWN_API_KEY" => (
                S::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            "INVALID_ARGUMENT" => (
                S::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_value"),
            ),
            "POLICY_REFUSED" => (
                S::FORBIDDEN,
                "invalid_request_error",
                Some("content_policy_violation"),
            ),
            "QUOTA_EXHAUSTED" if limit.as_deref() == Some("window") => (
                S::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
            "QUOTA_EXHAUSTED" => (
                S::TOO_MANY_REQUESTS,
                "requests",
                Some("rate_limit_exceeded"),
            ),
            "SHED" => (S::TOO_MANY_REQUESTS, "requests", Some("server_overloaded")),
            "DUPLICATE_IN_FLIGHT" => (
                S::CONFLICT,
                "invalid_request_error",
                Some("idempotency_key_in_use"),
            ),
            "DEADLINE_EXCEEDED" => (S::GATEWAY_TIMEOUT, "server_error", Some("timeout")),
            "QUOTA_STORE_UNAVAILABLE" | "NO_WORKERS" | "UNAVAILABLE" | "IMAGE_TOO_LARGE" => (
                S::SERVICE_UNAVAILABLE,
                "server_error",
                Some("service_unavailable"),
            ),
            _ => match status.code() {
                tonic::Code::Unauthenticated => (S::UNAUTHORIZED, "invalid_request_error", None),
                tonic::Code::InvalidArgument => (S::BAD_REQUEST, "invalid_request_error", None),
                tonic::Code::PermissionDenied => (S::FORBIDDEN, "invalid_request_error", None),
                tonic::Code::ResourceExhausted => (S::TOO_MANY_REQUESTS, "requests", None),
                tonic::Code::Unavailable => (S::SERVICE_UNAVAILABLE, "server_error", None),
                tonic::Code::DeadlineExceeded => (S::GATEWAY_TIMEOUT, "server_error", None),
                _ => (S::INTERNAL_SERVER_ERROR, "server_error", None),
            },
        };
        // The field names of a gRPC violation ("sampling.top_p: ...") become the body's, and a
        // missing key is asked for as a header.
        let message = match (&field, status.message().split_once(": ")) {
            _ if reason == "MISSING_API_KEY" => {
                "missing API key: send the header 'Authorization: Bearer <api key>'".to_string()
            }
            (Some(param), Some((_, rest))) => format!("{param}: {rest}"),
            _ => status.message().to_string(),
        };
        let mut headers = HeaderMap::new();
        ratelimit_headers(&mut headers, status.metadata());
        ApiError {
            status: http,
            kind,
            code,
            param: field,
            message,
            retry_after: details.retry_info().and_then(|r| r.retry_delay),
            headers: Box::new(headers),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        headers.extend(*self.headers);
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

/// The request-body name of a field the pipeline's validation names.
fn body_param(grpc_field: &str) -> &str {
    match grpc_field {
        "width" | "height" => "size",
        "request_id" => "x-request-id",
        "idempotency_key" => "idempotency-key",
        other => other.strip_prefix("sampling.").unwrap_or(other),
    }
}

/// OpenAI's `x-ratelimit-*-requests` headers from the `x-ratelimit-*` metadata the pipeline
/// writes (the caller's tightest image window).
fn ratelimit_headers(headers: &mut HeaderMap, metadata: &MetadataMap) {
    let get = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    let pairs = [
        ("x-ratelimit-limit", "x-ratelimit-limit-requests", ""),
        (
            "x-ratelimit-remaining",
            "x-ratelimit-remaining-requests",
            "",
        ),
        ("x-ratelimit-reset", "x-ratelimit-reset-requests", "s"),
    ];
    for (from, to, unit) in pairs {
        if let Some(value) =
            get(from).and_then(|v| HeaderValue::from_str(&format!("{v}{unit}")).ok())
        {
            headers.insert(HeaderName::from_static(to), value);
        }
    }
}

/// The metadata of a pipeline call made on behalf of an HTTP request: its key and trace context.
fn metadata_of(headers: &HeaderMap) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    for name in ["authorization", "traceparent", "tracestate"] {
        if let Some(value) = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| MetadataValue::try_from(v).ok())
        {
            metadata.insert(name, value);
        }
    }
    metadata
}

async fn authenticate(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<crate::auth::Identity, ApiError> {
    gateway
        .auth
        .authenticate(&metadata_of(headers))
        .await
        .map_err(|e| ApiError::from_status(&e.to_status()))
}

/// The served model's OpenAI id: its name without the version (`kiln-shapes@1.0.0` -> `kiln-shapes`).
fn model_id(model: &str) -> &str {
    model.split('@').next().unwrap_or(model)
}

fn model_object(model: &str) -> Value {
    json!({"id": model_id(model), "object": "model", "created": 0, "owned_by": OWNER})
}

async fn served_model(gateway: &Gateway) -> Result<kiln_scheduler::ModelDescription, ApiError> {
    gateway
        .backend
        .model()
        .await
        .map_err(|e| ApiError::from_status(&GatewayError::from(e).to_status()))
}

async fn list_models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let result = async {
        authenticate(&gateway, &headers).await?;
        let model = served_model(&gateway).await?;
        Ok::<_, ApiError>(axum::Json(
            json!({"object": "list", "data": [model_object(&model.model)]}),
        ))
    };
    result.await.into_response()
}

async fn get_model(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        authenticate(&gateway, &headers).await?;
        let model = served_model(&gateway).await?;
        if id != model_id(&model.model) && id != model.model {
            return Err(model_not_found(&id, &model.model));
        }
        Ok(axum::Json(model_object(&model.model)))
    };
    result.await.into_response()
}

fn model_not_found(asked: &str, served: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("model_not_found"),
        param: Some("model".into()),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "model: {asked:?} is not served here; this cluster serves {:?}",
                model_id(served)
            ),
        )
    }
}

async fn not_found() -> ApiError {
    ApiError {
        code: Some("unknown_url"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such route: Kiln serves POST /v1/images/generations, GET /v1/models and GET /v1/models/{id}",
        )
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this route: POST /v1/images/generations, GET /v1/models",
    )
}

/// A `POST /v1/images/generations` body, every field checked.
#[derive(Debug, PartialEq)]
struct ImagesRequest {
    prompt: String,
    model: Option<String>,
    n: u32,
    /// (width, height); 0 selects the model's default, as on the gRPC API.
    size: (u32, u32),
    stream: bool,
    partial_images: u32,
    end_user: Option<String>,
    sampling: Option<SamplingParams>,
}

impl ImagesRequest {
    /// Parses a body, naming the field of the first fault.
    fn parse(body: &[u8]) -> Result<ImagesRequest, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body is not valid JSON ({e}); send a JSON object such as {{\"prompt\": \"a red star\"}}"),
            )
        })?;
        let Value::Object(fields) = value else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the body must be a JSON object",
            ));
        };
        let body = Body(&fields);
        for name in fields.keys() {
            if !KNOWN_FIELDS.contains(&name.as_str()) {
                return Err(ApiError {
                    code: Some("unknown_parameter"),
                    ..ApiError::invalid(name, format!("unrecognised request argument: {name}"))
                });
            }
        }
        let prompt = body
            .string("prompt")?
            .ok_or_else(|| ApiError::invalid("prompt", "prompt: is required"))?;
        let n = match body.integer("n")? {
            None => 1,
            Some(n) if (1..=MAX_IMAGES as u64).contains(&n) => n as u32,
            Some(n) => {
                return Err(ApiError::invalid(
                    "n",
                    format!("n: must be 1 to {MAX_IMAGES}, got {n}"),
                ))
            }
        };
        let size = match body.string("size")?.as_deref() {
            None | Some("auto") => (0, 0),
            Some(s) => parse_size(s).ok_or_else(|| {
                ApiError::invalid(
                    "size",
                    format!(
                        "size: {s:?} is neither \"auto\" nor \"WIDTHxHEIGHT\" such as \"64x64\""
                    ),
                )
            })?,
        };
        match body.string("response_format")?.as_deref() {
            None | Some("b64_json") => {}
            Some("url") => {
                return Err(ApiError::invalid(
                    "response_format",
                    "response_format: \"url\" needs an image store and this cluster has none; ask for \"b64_json\"",
                ))
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("response_format: {other:?} is not one of \"b64_json\", \"url\""),
                ))
            }
        }
        body.one_of("output_format", &["png"])?;
        body.one_of(
            "quality",
            &["auto", "standard", "hd", "low", "medium", "high"],
        )?;
        body.one_of("style", &["vivid", "natural"])?;
        body.one_of("background", &["auto", "opaque"])?;
        body.one_of("moderation", &["auto", "low"])?;
        if let Some(c) = body.integer("output_compression")? {
            if c > 100 {
                return Err(ApiError::invalid(
                    "output_compression",
                    format!("output_compression: must be 0 to 100, got {c}"),
                ));
            }
        }
        let stream = body.boolean("stream")?.unwrap_or(false);
        let partial_images = match body.integer("partial_images")? {
            None => 0,
            Some(p) if p <= 3 => p as u32,
            Some(p) => {
                return Err(ApiError::invalid(
                    "partial_images",
                    format!("partial_images: must be 0 to 3, got {p}"),
                ))
            }
        };
        if partial_images > 0 && !stream {
            return Err(ApiError::invalid(
                "partial_images",
                "partial_images: needs \"stream\": true",
            ));
        }
        let end_user = body.string("user")?;
        // Kiln's own sampling fields (the `openai` client sends them with `extra_body`).
        let temperature = body.number("temperature")?;
        let top_k = body.integer("top_k")?;
        let top_p = body.number("top_p")?;
        let seed = body.integer("seed")?;
        let speculation = body.integer("speculation")?;
        let clamp = |n: u64| n.min(u32::MAX as u64) as u32;
        let sampling = (temperature.is_some()
            || top_k.is_some()
            || top_p.is_some()
            || seed.is_some()
            || speculation.is_some())
        .then(|| SamplingParams {
            temperature: temperature.unwrap_or(0.0) as f32,
            has_temperature: temperature.is_some(),
            top_k: top_k.map_or(0, clamp),
            top_p: top_p.unwrap_or(0.0) as f32,
            seed: seed.unwrap_or(0),
            speculation: speculation.map(clamp),
        });
        Ok(ImagesRequest {
            prompt,
            model: body.string("model")?,
            n,
            size,
            stream,
            partial_images,
            end_user,
            sampling,
        })
    }

    /// The pipeline request of image `index`: its own request id when there are several, and its
    /// own seed when the caller chose one (else each image would be the same).
    fn image(
        &self,
        index: u32,
        request_id: &str,
        idempotency_key: Option<&str>,
    ) -> GenerateRequest {
        let sampling = self.sampling.map(|s| SamplingParams {
            seed: if s.seed == 0 {
                0
            } else {
                s.seed.wrapping_add(index as u64)
            },
            ..s
        });
        let suffix = |base: &str| {
            if self.n == 1 {
                base.to_string()
            } else {
                format!("{base}-{index}")
            }
        };
        GenerateRequest {
            prompt: self.prompt.clone(),
            width: self.size.0,
            height: self.size.1,
            sampling,
            request_id: suffix(request_id),
            idempotency_key: idempotency_key.map(suffix).unwrap_or_default(),
            partial_images: self.partial_images,
        }
    }
}

/// Every body field the API knows: OpenAI's, and Kiln's sampling fields.
const KNOWN_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "quality",
    "style",
    "background",
    "moderation",
    "user",
    "stream",
    "partial_images",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "speculation",
];

/// Typed reads of a JSON body's fields; `null` counts as absent.
struct Body<'a>(&'a Map<String, Value>);

impl Body<'_> {
    fn field(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn wrong(name: &str, expected: &str) -> ApiError {
        ApiError::invalid(name, format!("{name}: must be {expected}"))
    }

    fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        self.field(name)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Self::wrong(name, "a string"))
            })
            .transpose()
    }

    fn integer(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.field(name)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| Self::wrong(name, "a non-negative integer"))
            })
            .transpose()
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        self.field(name)
            .map(|v| v.as_f64().ok_or_else(|| Self::wrong(name, "a number")))
            .transpose()
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.field(name)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Self::wrong(name, "true or false"))
            })
            .transpose()
    }

    /// A string field that, when given, must be one of `allowed` (accepted; Kiln draws the same).
    fn one_of(&self, name: &str, allowed: &[&str]) -> Result<(), ApiError> {
        match self.string(name)? {
            Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::invalid(
                name,
                format!("{name}: {v:?} is not one of {allowed:?}"),
            )),
            _ => Ok(()),
        }
    }
}

/// "64x64" -> (64, 64).
fn parse_size(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.split_once('x')?;
    Some((
        w.parse().ok().filter(|&w| w > 0)?,
        h.parse().ok().filter(|&h| h > 0)?,
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One image's pipeline call under way.
struct Running {
    stream: EventStream,
}

impl Running {
    /// Follows the stream to the finished image.
    async fn finish(mut self) -> Result<Completed, tonic::Status> {
        while let Some(event) = self.stream.next().await {
            if let Some(generate_event::Event::Completed(done)) = event?.event {
                return Ok(done);
            }
        }
        Err(tonic::Status::internal(
            "the image stream ended without an image",
        ))
    }
}

async fn generate(
    State(gateway): State<Arc<Gateway>>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let span = tracing::info_span!("http_images", request_id = %request_id);
    generate_in(gateway, request_id, headers, body)
        .instrument(span)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn generate_in(
    gateway: Arc<Gateway>,
    request_id: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // OpenAI answers a bad key before a bad body. The pipeline takes the identity found here
    // instead of looking the key up again for every image.
    let identity = authenticate(&gateway, &headers).await?;
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the body is {} bytes; at most {MAX_BODY_BYTES} are accepted",
                body.len()
            ),
        ));
    }
    let request = ImagesRequest::parse(&body)?;
    let model = served_model(&gateway).await?;
    if let Some(asked) = &request.model {
        if asked != model_id(&model.model) && asked != &model.model {
            return Err(model_not_found(asked, &model.model));
        }
    }
    if request.size != (0, 0)
        && !(model.sizes.contains(&request.size.0) && model.sizes.contains(&request.size.1))
    {
        let sizes: Vec<String> = model
            .sizes
            .iter()
            .flat_map(|w| model.sizes.iter().map(move |h| format!("{w}x{h}")))
            .collect();
        return Err(ApiError::invalid(
            "size",
            format!(
                "size: \"{}x{}\" is not served; use one of {sizes:?} or \"auto\" ({d}x{d})",
                request.size.0,
                request.size.1,
                d = model.default_size
            ),
        ));
    }
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::invalid("idempotency-key", "idempotency-key: must be ASCII"))
        })
        .transpose()?;
    info!(
        n = request.n,
        width = request.size.0,
        height = request.size.1,
        stream = request.stream,
        end_user = request.end_user.as_deref().unwrap_or(""),
        "images request"
    );
    // Every image enters the pipeline at once, so that they share decode batches; if one is
    // refused the others are dropped (cancelled, and refunded by the pipeline).
    let metadata = metadata_of(&headers);
    let calls = (0..request.n).map(|i| {
        let mut call =
            tonic::Request::new(request.image(i, &request_id, idempotency_key.as_deref()));
        *call.metadata_mut() = metadata.clone();
        call.extensions_mut().insert(Protocol::Http);
        call.extensions_mut()
            .insert(Authenticated(identity.clone()));
        gateway.generate(call)
    });
    let mut running = Vec::with_capacity(request.n as usize);
    let mut quota = HeaderMap::new();
    for answer in futures::future::join_all(calls).await {
        let response = answer.map_err(|status| ApiError::from_status(&status))?;
        ratelimit_headers(&mut quota, response.metadata());
        running.push(Running {
            stream: response.into_inner(),
        });
    }
    let size = |done: &Completed| format!("{}x{}", done.width, done.height);
    if request.stream {
        let mut response = Sse::new(sse_events(running)).into_response();
        response.headers_mut().extend(quota);
        return Ok(response);
    }
    let results = futures::future::join_all(running.into_iter().map(Running::finish)).await;
    let mut images = Vec::with_capacity(results.len());
    let mut first_error = None;
    for result in results {
        match result {
            Ok(done) => images.push(done),
            Err(status) => {
                first_error.get_or_insert(status);
            }
        }
    }
    // Images that were delivered stay delivered (and charged); a request none of whose images came
    // back answers with the first failure.
    if images.is_empty() {
        let status = first_error.unwrap_or_else(|| tonic::Status::internal("no image"));
        return Err(ApiError::from_status(&status));
    }
    let failed = request.n as usize - images.len();
    let body = json!({
        "created": unix_now(),
        "data": images.iter().map(|done| json!({
            "b64_json": b64(&done.png),
        })).collect::<Vec<_>>(),
        "size": size(&images[0]),
        "quality": "auto",
        "background": "opaque",
        "output_format": "png",
        "usage": usage(&images),
    });
    let mut response = axum::Json(body).into_response();
    response.headers_mut().extend(quota);
    if failed > 0 {
        response
            .headers_mut()
            .insert("x-kiln-images-failed", HeaderValue::from(failed));
    }
    info!(images = images.len(), failed, "images delivered");
    Ok(response)
}

/// OpenAI's `usage` of a set of images: prompt tokens in, image tokens out.
fn usage(images: &[Completed]) -> Value {
    let (input, output) = images.iter().fold((0u64, 0u64), |(i, o), done| {
        let u = done.usage.unwrap_or_default();
        (
            i + u64::from(u.prompt_tokens),
            o + u64::from(u.image_tokens),
        )
    });
    json!({
        "input_tokens": input,
        "output_tokens": output,
        "total_tokens": input + output,
        "input_tokens_details": {"text_tokens": input, "image_tokens": 0},
    })
}

/// The server-sent events of a streamed request: each image's previews
/// (`image_generation.partial_image`) and its end (`image_generation.completed`, or `error`), the
/// images' events interleaved as they come. `image_index` (Kiln's) tells the images of one request
/// apart.
fn sse_events(
    running: Vec<Running>,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> + Send {
    let per_image = running.into_iter().enumerate().map(|(image, r)| {
        // Each image's stream ends after its first terminal event.
        r.stream
            .scan(false, move |ended, event| {
                let out = (!*ended).then(|| match event {
                    Ok(e) => match e.event {
                        Some(generate_event::Event::PartialImage(p)) => {
                            Some(partial_event(image, &p))
                        }
                        Some(generate_event::Event::Completed(done)) => {
                            *ended = true;
                            Some(completed_event(image, &done))
                        }
                        _ => None,
                    },
                    Err(status) => {
                        *ended = true;
                        Some(error_event(image, &status))
                    }
                });
                futures::future::ready(out)
            })
            .filter_map(futures::future::ready)
            .boxed()
    });
    futures::stream::select_all(per_image).map(Ok)
}

fn b64(png: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn partial_event(image: usize, p: &PartialImage) -> Event {
    sse(
        "image_generation.partial_image",
        json!({
            "type": "image_generation.partial_image",
            "b64_json": b64(&p.png),
            "created_at": unix_now(),
            "size": format!("{}x{}", p.width, p.height),
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
            "partial_image_index": p.index,
            "image_index": image,
        }),
    )
}

fn completed_event(image: usize, done: &Completed) -> Event {
    sse(
        "image_generation.completed",
        json!({
            "type": "image_generation.completed",
            "b64_json": b64(&done.png),
            "created_at": unix_now(),
            "size": format!("{}x{}", done.width, done.height),
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
            "usage": usage(std::slice::from_ref(done)),
            "image_index": image,
        }),
    )
}

fn error_event(image: usize, status: &tonic::Status) -> Event {
    let mut body = ApiError::from_status(status).body();
    body["type"] = json!("error");
    body["image_index"] = json!(image);
    sse("error", body)
}

fn sse(name: &str, data: Value) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ImagesRequest, ApiError> {
        ImagesRequest::parse(body.as_bytes())
    }

    #[test]
    fn a_minimal_body_asks_for_one_image_of_the_default_size() {
        let r = parse(r#"{"prompt": "a red star"}"#).unwrap();
        assert_eq!((r.prompt.as_str(), r.n, r.size), ("a red star", 1, (0, 0)));
        assert!(!r.stream && r.sampling.is_none());
    }

    #[test]
    fn sizes_are_width_by_height_or_auto() {
        assert_eq!(
            parse(r#"{"prompt": "x", "size": "64x128"}"#).unwrap().size,
            (64, 128)
        );
        assert_eq!(
            parse(r#"{"prompt": "x", "size": "auto"}"#).unwrap().size,
            (0, 0)
        );
        let e = parse(r#"{"prompt": "x", "size": "big"}"#).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (StatusCode::BAD_REQUEST, Some("size"))
        );
    }

    #[test]
    fn faults_name_their_field() {
        for (body, param) in [
            (r#"{}"#, "prompt"),
            (r#"{"prompt": 3}"#, "prompt"),
            (r#"{"prompt": "x", "n": 11}"#, "n"),
            (r#"{"prompt": "x", "n": 0}"#, "n"),
            (
                r#"{"prompt": "x", "response_format": "url"}"#,
                "response_format",
            ),
            (
                r#"{"prompt": "x", "output_format": "jpeg"}"#,
                "output_format",
            ),
            (r#"{"prompt": "x", "quality": "ultra"}"#, "quality"),
            (r#"{"prompt": "x", "partial_images": 2}"#, "partial_images"),
            (
                r#"{"prompt": "x", "stream": true, "partial_images": 4}"#,
                "partial_images",
            ),
            (r#"{"prompt": "x", "colour": "red"}"#, "colour"),
            (r#"{"prompt": "x", "seed": -1}"#, "seed"),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(e.message.contains(param), "{body}: {}", e.message);
        }
        let e = parse("not json").unwrap_err();
        assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, None));
    }

    #[test]
    fn images_of_one_request_get_their_own_ids_and_seeds() {
        let r = parse(r#"{"prompt": "x", "n": 2, "seed": 7, "temperature": 0.5}"#).unwrap();
        let (a, b) = (
            r.image(0, "req", Some("key")),
            r.image(1, "req", Some("key")),
        );
        assert_eq!(
            (a.request_id.as_str(), b.request_id.as_str()),
            ("req-0", "req-1")
        );
        assert_eq!(
            (a.idempotency_key.as_str(), b.idempotency_key.as_str()),
            ("key-0", "key-1")
        );
        let (sa, sb) = (a.sampling.unwrap(), b.sampling.unwrap());
        assert_eq!((sa.seed, sb.seed), (7, 8));
        assert!(sa.has_temperature && (sa.temperature - 0.5).abs() < 1e-6);
        let one = parse(r#"{"prompt": "x"}"#).unwrap().image(0, "req", None);
        assert_eq!(
            (one.request_id.as_str(), one.idempotency_key.as_str()),
            ("req", "")
        );
    }

    #[test]
    fn pipeline_refusals_become_openai_errors() {
        let bad = GatewayError::invalid("sampling.top_p", "must be in (0, 1], got 1.5").to_status();
        let e = ApiError::from_status(&bad);
        assert_eq!(
            (e.status, e.param.as_deref()),
            (StatusCode::BAD_REQUEST, Some("top_p"))
        );
        assert!(e.message.starts_with("top_p: must be"), "{}", e.message);
        let size = GatewayError::invalid("width", "65 is not a supported size").to_status();
        assert_eq!(ApiError::from_status(&size).param.as_deref(), Some("size"));

        let e = ApiError::from_status(&GatewayError::UnknownApiKey.to_status());
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
        );

        let quota = GatewayError::QuotaExhausted(kiln_quota::Refusal {
            subject: "user:ana".into(),
            limit: kiln_quota::Limit::Window {
                seconds: 86400,
                images: 3,
            },
            retry_after: Some(Duration::from_secs(3600)),
        })
        .to_status();
        let response = ApiError::from_status(&quota).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = response.headers();
        assert_eq!(h["retry-after"], "3600");
        assert_eq!(h["x-ratelimit-limit-requests"], "3");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "3600s");

        let shed = GatewayError::Scheduler(kiln_scheduler::SchedulerError::NoWorkers).to_status();
        let e = ApiError::from_status(&shed);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.retry_after.is_some());
    }
}
