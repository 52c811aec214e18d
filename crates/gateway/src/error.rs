//! The gateway's errors and their one mapping to `tonic::Status`, with `google.rpc` details
//! (`BadRequest` field violations, `ErrorInfo` with a stable reason, `RetryInfo` where a retry helps).

use std::time::Duration;

use kiln_policy::Refusal as PolicyRefusal;
use kiln_quota::{Limit, Refusal as QuotaRefusal};
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
    PolicyRefused(PolicyRefusal),
    #[error(
        "quota exhausted: {} allows {}; retry in {:.0} s",
        .0.subject,
        .0.limit.describe(),
        .0.retry_after.unwrap_or_default().as_secs_f64().ceil()
    )]
    QuotaExhausted(QuotaRefusal),
    #[error("the quota store is unreachable and this tier admits nothing without it; retry shortly ({0})")]
    StoreUnavailable(String),
    #[error("a request with idempotency key {0:?} is still running; retry after it finishes")]
    DuplicateInFlight(String),
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
            GatewayError::StoreUnavailable(_) => "QUOTA_STORE_UNAVAILABLE",
            GatewayError::DuplicateInFlight(_) => "DUPLICATE_IN_FLIGHT",
            GatewayError::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            GatewayError::Scheduler(SchedulerError::NoWorkers) => "NO_WORKERS",
            GatewayError::Scheduler(SchedulerError::TooLarge { .. }) => "IMAGE_TOO_LARGE",
            GatewayError::Scheduler(SchedulerError::InvalidJob(_)) => "INVALID_ARGUMENT",
            GatewayError::Scheduler(SchedulerError::WorkerFailed(_)) => "WORKER_FAILED",
            GatewayError::Scheduler(SchedulerError::Shed { .. }) => "SHED",
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
            GatewayError::StoreUnavailable(_) => Code::Unavailable,
            GatewayError::DuplicateInFlight(_) => Code::Aborted,
            GatewayError::QuotaExhausted(_)
            | GatewayError::Scheduler(
                SchedulerError::TooLarge { .. } | SchedulerError::Shed { .. },
            ) => Code::ResourceExhausted,
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
        let info: std::collections::HashMap<String, String> = match self {
            GatewayError::PolicyRefused(r) => [
                ("rule".into(), r.rule.to_string()),
                ("artist".into(), r.artist.clone()),
            ]
            .into(),
            GatewayError::QuotaExhausted(r) => [
                ("subject".into(), r.subject.clone()),
                ("limit".into(), r.limit.kind().into()),
            ]
            .into(),
            GatewayError::Scheduler(SchedulerError::Shed { reason, .. }) => {
                [("shed_reason".into(), reason.clone())].into()
            }
            _ => Default::default(),
        };
        let mut details = ErrorDetails::with_error_info(self.error_type(), ERROR_DOMAIN, info);
        match self {
            GatewayError::InvalidField { field, description } => {
                details.add_bad_request_violation(*field, description.clone());
            }
            GatewayError::QuotaExhausted(r) => {
                details.add_quota_failure_violation(
                    format!("{}:{}", r.subject, r.limit.kind()),
                    r.limit.describe(),
                );
                details.set_retry_info(r.retry_after);
            }
            GatewayError::Scheduler(SchedulerError::Shed { retry_after, .. }) => {
                details.set_retry_info(Some(*retry_after));
            }
            GatewayError::StoreUnavailable(_) | GatewayError::DuplicateInFlight(_) => {
                details.set_retry_info(Some(Duration::from_secs(1)));
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
        let mut status = Status::with_error_details(self.code(), self.to_string(), details);
        if let GatewayError::QuotaExhausted(r) = self {
            if let Limit::Window { seconds, images } = r.limit {
                let reset = r.retry_after.unwrap_or_default();
                crate::service::ratelimit_metadata(
                    status.metadata_mut(),
                    &r.subject,
                    seconds,
                    images,
                    0,
                    reset,
                );
            }
        }
        status
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
    fn quota_refusals_name_the_limit_and_when_it_resets() {
        let refusal = QuotaRefusal {
            subject: "user:ana".into(),
            limit: Limit::Window {
                seconds: 86400,
                images: 3,
            },
            retry_after: Some(Duration::from_secs(3600)),
        };
        let status = GatewayError::QuotaExhausted(refusal).to_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("3 images per 1 day"),
            "{}",
            status.message()
        );
        let details = status.get_error_details();
        let quota = details.quota_failure().expect("quota failure");
        assert_eq!(quota.violations[0].subject, "user:ana:window");
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(status.metadata().get("x-ratelimit-remaining").unwrap(), "0");
        assert_eq!(status.metadata().get("x-ratelimit-reset").unwrap(), "3600");
    }

    #[test]
    fn unavailable_cluster_asks_for_a_retry() {
        let status = GatewayError::Scheduler(SchedulerError::NoWorkers).to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.get_details_retry_info().is_some());
    }
}
