//! The gateway's errors and their one mapping to `tonic::Status`, with `google.rpc` details
//! (`BadRequest` field violations, `ErrorInfo` with a stable reason, `RetryInfo` where a retry helps).

use std::time::Duration;

use kiln_scheduler::SchedulerError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Domain of every `ErrorInfo` Kiln sends.
pub const ERROR_DOMAIN: &str = "kiln.dev";

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("missing API key: send metadata 'authorization: Bearer <api key>'")]
    MissingApiKey,
    #[error("unknown or revoked API key")]
    UnknownApiKey,
    #[error("{field}: {description}")]
    InvalidField {
        field: &'static str,
        description: String,
    },
    #[error("prompt refused by the content policy: {0}")]
    PolicyRefused(String),
    #[error("quota exhausted: {0}")]
    QuotaExhausted(String),
    #[error("the request did not finish within {0:?}")]
    DeadlineExceeded(Duration),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// Stable machine-readable reason, sent as `ErrorInfo.reason`.
    pub fn error_type(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey => "MISSING_API_KEY",
            GatewayError::UnknownApiKey => "UNKNOWN_API_KEY",
            GatewayError::InvalidField { .. } => "INVALID_ARGUMENT",
            GatewayError::PolicyRefused(_) => "POLICY_REFUSED",
            GatewayError::QuotaExhausted(_) => "QUOTA_EXHAUSTED",
            GatewayError::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            GatewayError::Scheduler(SchedulerError::NoWorkers) => "NO_WORKERS",
            GatewayError::Scheduler(SchedulerError::TooLarge { .. }) => "IMAGE_TOO_LARGE",
            GatewayError::Scheduler(SchedulerError::InvalidJob(_)) => "INVALID_ARGUMENT",
            GatewayError::Scheduler(SchedulerError::WorkerFailed(_)) => "WORKER_FAILED",
            GatewayError::Scheduler(
                SchedulerError::ShuttingDown | SchedulerError::Unavailable(_),
            ) => "UNAVAILABLE",
            GatewayError::Internal(_) => "INTERNAL",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            GatewayError::MissingApiKey | GatewayError::UnknownApiKey => Code::Unauthenticated,
            GatewayError::InvalidField { .. }
            | GatewayError::Scheduler(SchedulerError::InvalidJob(_)) => Code::InvalidArgument,
            GatewayError::PolicyRefused(_) => Code::PermissionDenied,
            GatewayError::QuotaExhausted(_)
            | GatewayError::Scheduler(SchedulerError::TooLarge { .. }) => Code::ResourceExhausted,
            GatewayError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            GatewayError::Scheduler(
                SchedulerError::NoWorkers
                | SchedulerError::ShuttingDown
                | SchedulerError::Unavailable(_),
            ) => Code::Unavailable,
            GatewayError::Scheduler(SchedulerError::WorkerFailed(_))
            | GatewayError::Internal(_) => Code::Internal,
        }
    }

    /// The status a caller receives.
    pub fn to_status(&self) -> Status {
        let mut details = ErrorDetails::with_error_info(self.error_type(), ERROR_DOMAIN, []);
        match self {
            GatewayError::InvalidField { field, description } => {
                details.add_bad_request_violation(*field, description.clone());
            }
            GatewayError::Scheduler(
                SchedulerError::NoWorkers
                | SchedulerError::ShuttingDown
                | SchedulerError::Unavailable(_),
            ) => {
                details.set_retry_info(Some(Duration::from_secs(1)));
            }
            _ => {}
        }
        Status::with_error_details(self.code(), self.to_string(), details)
    }

    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        GatewayError::InvalidField {
            field,
            description: description.into(),
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_name_the_field_in_message_and_details() {
        let status =
            GatewayError::invalid("sampling.top_p", "must be in (0, 1], got 1.5").to_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("sampling.top_p:"));
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("bad request detail")
            .field_violations;
        assert_eq!(violations[0].field, "sampling.top_p");
        assert_eq!(details.error_info().unwrap().reason, "INVALID_ARGUMENT");
    }

    #[test]
    fn unavailable_cluster_asks_for_a_retry() {
        let status = GatewayError::Scheduler(SchedulerError::NoWorkers).to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.get_details_retry_info().is_some());
    }
}
