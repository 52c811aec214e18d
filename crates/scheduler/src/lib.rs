//! The scheduler: owns the queue, placement and iteration-level batching of jobs across workers.
//! [`state`] is the pure decision core (no I/O, time passed in); [`runtime`] drives it with real time,
//! talking to workers only through the `kiln.v1.Worker` protocol; [`service`] serves the
//! `kiln.v1.Scheduler` API to gateways in other processes. It knows nothing of Redis, API keys or C2PA.

#![forbid(unsafe_code)]

pub mod error;
pub mod runtime;
pub mod service;
pub mod state;

pub use error::SchedulerError;
pub use runtime::{
    spawn, JobRequest, JobResult, JobStream, JobUpdate, ModelDescription, RuntimeConfig, Sampling,
    SchedulerHandle,
};
pub use state::{SchedulerConfig, Tier};
