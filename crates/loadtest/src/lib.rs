//! Launch-day rehearsals against a real cluster: a [`Scenario`] (a user population with a tier mix,
//! phases of open-loop Poisson arrivals), the [`driver`] that provisions the users' API keys and
//! sends the arrivals to a gateway over gRPC, and the [`Report`] that accounts for every request
//! (completed + shed + quota-refused + policy-refused + errors = sent) per phase and tier.

#![forbid(unsafe_code)]

pub mod driver;
pub mod html;
pub mod report;
pub mod scenario;
pub mod scrape;

pub use report::{default_deadlines, FaultWindow, Outcome, OutcomeKind, Report, Tally};
pub use scenario::{Arrival, Scenario, User};

/// The shipped prompt corpus, one prompt per line.
pub const PROMPTS: &str = include_str!("../data/prompts.txt");

/// The shipped prompts as a list.
pub fn shipped_prompts() -> Vec<String> {
    PROMPTS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// What can go wrong before or while a rehearsal runs.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("scenario: {0}")]
    Scenario(String),
    #[error("provisioning API keys: {0}")]
    Provision(String),
    #[error("gateway: {0}")]
    Gateway(String),
}
