//! The public gateway: serves `kiln.v1.ImageService` to internal services as a pipeline —
//! authenticate -> validate -> policy -> admit (quota) -> schedule -> stream -> sign -> settle. Each
//! stage is a small trait ([`auth::Authenticator`], [`policy::ContentPolicy`],
//! [`admission::Admission`], [`signing::Signer`], [`backend::Backend`]); quotas live in `kiln-quota`,
//! the artist list in `kiln-policy`, and this crate wires them in (key lookup, the tier table in
//! force, demand tightening, fail-open/closed, idempotent replay, resubmission after a scheduler
//! failover). It is the one place that maps domain errors to `tonic::Status`; `openai` serves the same
//! pipeline as OpenAI's Images API over HTTP/JSON and maps those statuses to OpenAI's errors. It knows
//! nothing of GPUs.

#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod backend;
pub mod error;
pub mod openai;
pub mod policy;
pub mod service;
pub mod signing;
pub mod validation;

pub use error::GatewayError;
pub use service::{run, Gateway, GatewayConfig, Protocol};
