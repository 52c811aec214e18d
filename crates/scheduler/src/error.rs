//! Errors of the scheduler, typed so that callers across the wire decide by kind: the `reason` of a
//! status's `ErrorInfo`-like metadata (`kiln-error-type`) carries [`SchedulerError::error_type`].

use tonic::{Code, Status};

/// Metadata key that carries the error type across the gateway-scheduler hop.
pub const ERROR_TYPE_METADATA: &str = "kiln-error-type";

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    #[error("no worker is registered yet; retry shortly")]
    NoWorkers,
    #[error("{0}")]
    InvalidJob(String),
    #[error("the image needs {kv_blocks} KV blocks, more than any worker has")]
    TooLarge { kv_blocks: usize },
    #[error("worker failed the job: {0}")]
    WorkerFailed(String),
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    #[error("scheduler unreachable: {0}")]
    Unavailable(String),
    #[error("the cluster is at capacity ({reason}); retry in {:.0} s", retry_after.as_secs_f64().ceil())]
    Shed {
        reason: String,
        retry_after: std::time::Duration,
    },
}

/// Metadata keys that carry a shed job's reason and retry delay across the wire.
const SHED_REASON_METADATA: &str = "kiln-shed-reason";
const RETRY_AFTER_METADATA: &str = "kiln-retry-after-ms";

impl SchedulerError {
    pub fn error_type(&self) -> &'static str {
        match self {
            SchedulerError::NoWorkers => "no_workers",
            SchedulerError::InvalidJob(_) => "invalid_job",
            SchedulerError::TooLarge { .. } => "too_large",
            SchedulerError::WorkerFailed(_) => "worker_failed",
            SchedulerError::ShuttingDown => "shutting_down",
            SchedulerError::Unavailable(_) => "unavailable",
            SchedulerError::Shed { .. } => "shed",
        }
    }

    /// The status this error crosses the wire as.
    pub fn to_status(&self) -> Status {
        let code = match self {
            SchedulerError::NoWorkers
            | SchedulerError::ShuttingDown
            | SchedulerError::Unavailable(_) => Code::Unavailable,
            SchedulerError::InvalidJob(_) => Code::InvalidArgument,
            SchedulerError::TooLarge { .. } | SchedulerError::Shed { .. } => {
                Code::ResourceExhausted
            }
            SchedulerError::WorkerFailed(_) => Code::Internal,
        };
        let mut status = Status::new(code, self.to_string());
        if let Ok(v) = self.error_type().parse() {
            status.metadata_mut().insert(ERROR_TYPE_METADATA, v);
        }
        if let SchedulerError::Shed {
            reason,
            retry_after,
        } = self
        {
            let meta = status.metadata_mut();
            if let Ok(v) = reason.parse() {
                meta.insert(SHED_REASON_METADATA, v);
            }
            if let Ok(v) = retry_after.as_millis().to_string().parse() {
                meta.insert(RETRY_AFTER_METADATA, v);
            }
        }
        status
    }

    /// Rebuilds the error from a status of the scheduler's service.
    pub fn from_status(status: &Status) -> Self {
        let kind = status
            .metadata()
            .get(ERROR_TYPE_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let message = status.message().to_string();
        match kind {
            "no_workers" => SchedulerError::NoWorkers,
            "invalid_job" => SchedulerError::InvalidJob(message),
            "too_large" => SchedulerError::TooLarge {
                kv_blocks: message
                    .split_whitespace()
                    .nth(3)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
            },
            "worker_failed" => SchedulerError::WorkerFailed(
                message
                    .strip_prefix("worker failed the job: ")
                    .unwrap_or(&message)
                    .to_string(),
            ),
            "shutting_down" => SchedulerError::ShuttingDown,
            "shed" => {
                let meta = |key| {
                    status
                        .metadata()
                        .get(key)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                SchedulerError::Shed {
                    reason: meta(SHED_REASON_METADATA),
                    retry_after: std::time::Duration::from_millis(
                        meta(RETRY_AFTER_METADATA).parse().unwrap_or(1000),
                    ),
                }
            }
            _ => SchedulerError::Unavailable(format!("{}: {message}", status.code())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        for e in [
            SchedulerError::NoWorkers,
            SchedulerError::InvalidJob("width: 33 is not a size".into()),
            SchedulerError::TooLarge { kv_blocks: 90 },
            SchedulerError::WorkerFailed("boom".into()),
            SchedulerError::ShuttingDown,
            SchedulerError::Shed {
                reason: "deadline".into(),
                retry_after: std::time::Duration::from_millis(2500),
            },
        ] {
            assert_eq!(SchedulerError::from_status(&e.to_status()), e);
        }
        assert!(matches!(
            SchedulerError::from_status(&Status::unavailable("x")),
            SchedulerError::Unavailable(_)
        ));
    }
}
