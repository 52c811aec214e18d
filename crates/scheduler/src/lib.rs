//! The scheduler: owns the queue, placement, iteration-level batching of jobs across workers and
//! deadline-aware shedding. [`state`] is the pure decision core (no I/O, time passed in); [`runtime`]
//! drives it with real time, adding and dropping workers as they join and leave, and talks to them
//! only through the `kiln.v1.Worker` protocol; [`service`] serves the `kiln.v1.Scheduler` API to
//! gateways in other processes (a standby replica answers with who leads). Membership and election
//! themselves live in `kiln-membership`. It knows nothing of Redis, API keys or C2PA.

#![forbid(unsafe_code)]

pub mod error;
pub mod runtime;
pub mod service;
pub mod state;

pub use error::SchedulerError;
pub use runtime::{
    spawn, JobPreview, JobRequest, JobResult, JobStream, JobUpdate, ModelDescription,
    RuntimeConfig, Sampling, SchedulerHandle,
};
pub use state::{SchedulerConfig, Tier};

/// Exports the scheduler's metric series at 0 for every tier and shed reason, before any job.
pub fn export_known_series() {
    let tiers = state::Tier::ALL.map(state::Tier::as_str);
    let reasons = state::ShedReason::ALL.map(state::ShedReason::as_str);
    kiln_telemetry::export_scheduler_series(&tiers, &reasons);
}
