//! The report: every request's outcome, aggregated per phase and tier (counts by outcome,
//! throughput, goodput within the tier's deadline, latency and time-to-first-progress percentiles)
//! and over time, with the accounting check that every request sent has exactly one outcome.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::scenario::{Scenario, TIERS};

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Completed,
    Shed,
    QuotaRefused,
    PolicyRefused,
    Error,
}

/// One request's end.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Seconds from the rehearsal's start to the request's send.
    pub sent_at: f64,
    pub phase: usize,
    /// Index of the user in the population.
    pub user: usize,
    pub tier: &'static str,
    pub kind: OutcomeKind,
    /// gRPC code of errors (and refusals), e.g. `Unavailable`.
    pub code: Option<String>,
    /// Seconds from send to the first progress event.
    pub first_progress: Option<f64>,
    /// Seconds from send to the end.
    pub latency: f64,
}

/// Percentiles of a set of durations, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Option<Percentiles> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
        Some(Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        })
    }
}

/// Figures of one phase and tier (or of the whole run).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    pub sent: usize,
    pub outcomes: BTreeMap<OutcomeKind, usize>,
    /// Completed images per second of the phase.
    pub throughput: f64,
    /// Images completed within the tier's deadline, per second.
    pub goodput: f64,
    pub latency: Option<Percentiles>,
    pub first_progress: Option<Percentiles>,
}

/// One second of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Second {
    pub offered: usize,
    pub completed: usize,
    pub shed: usize,
    pub refused: usize,
    pub errors: usize,
    /// The cluster's saturation (batch slots in use, 0 to 1) and waiting jobs, when scraped.
    pub saturation: Option<f64>,
    pub waiting: Option<f64>,
}

/// The whole report (written as JSON).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub scenario: String,
    pub sent: usize,
    pub totals: Figures,
    /// Phase name -> tier -> figures.
    pub phases: Vec<(String, BTreeMap<String, Figures>)>,
    /// Errors by gRPC code.
    pub error_codes: BTreeMap<String, usize>,
    pub timeline: Vec<Second>,
    /// Tier -> the most images any one user of the tier received (to check against its quota).
    pub most_images_per_user: BTreeMap<String, usize>,
    /// Whether completed + shed + quota-refused + policy-refused + errors equals sent.
    pub accounted: bool,
}

fn figures(outcomes: &[&Outcome], seconds: f64, deadlines: &BTreeMap<String, f64>) -> Figures {
    // A launch day has millions of outcomes of five kinds: counted in a list, not a map.
    let mut kinds: Vec<(OutcomeKind, usize)> = Vec::new();
    for o in outcomes {
        match kinds.iter_mut().find(|(kind, _)| *kind == o.kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((o.kind, 1)),
        }
    }
    let counts: BTreeMap<OutcomeKind, usize> = kinds.into_iter().collect();
    let completed: Vec<&&Outcome> = outcomes
        .iter()
        .filter(|o| o.kind == OutcomeKind::Completed)
        .collect();
    // Tiers are a handful of static names: each deadline is looked up once.
    let mut tier_deadlines: Vec<(&str, Option<f64>)> = Vec::new();
    let mut deadline_of = |tier: &'static str| match tier_deadlines.iter().find(|(t, _)| *t == tier)
    {
        Some(&(_, d)) => d,
        None => {
            let d = deadlines.get(tier).copied();
            tier_deadlines.push((tier, d));
            d
        }
    };
    let in_time = completed
        .iter()
        .filter(|o| deadline_of(o.tier).is_none_or(|d| o.latency <= d))
        .count();
    Figures {
        sent: outcomes.len(),
        outcomes: counts,
        throughput: completed.len() as f64 / seconds,
        goodput: in_time as f64 / seconds,
        latency: Percentiles::of(completed.iter().map(|o| o.latency).collect()),
        first_progress: Percentiles::of(
            completed.iter().filter_map(|o| o.first_progress).collect(),
        ),
    }
}

impl Report {
    /// Puts saturation readings on the timeline (the last reading of each second).
    pub fn add_saturation(&mut self, samples: &[crate::scrape::Sample]) {
        let last = self.timeline.len().saturating_sub(1);
        for sample in samples {
            let second = &mut self.timeline[(sample.at.max(0.0) as usize).min(last)];
            second.saturation = Some(sample.saturation);
            second.waiting = Some(sample.waiting);
        }
    }

    /// Aggregates `outcomes` of `sent` requests of `scenario`; `deadlines` are seconds per tier.
    pub fn build(
        scenario: &Scenario,
        sent: usize,
        outcomes: &[Outcome],
        deadlines: &BTreeMap<String, f64>,
    ) -> Report {
        let all: Vec<&Outcome> = outcomes.iter().collect();
        // One pass sorts the outcomes into their phase and tier.
        let mut groups: Vec<Vec<&Outcome>> = vec![Vec::new(); scenario.phases.len() * TIERS.len()];
        for &o in &all {
            let tier = TIERS.iter().position(|&t| t == o.tier);
            if let (Some(tier), true) = (tier, o.phase < scenario.phases.len()) {
                groups[o.phase * TIERS.len() + tier].push(o);
            }
        }
        let mut phases = Vec::new();
        for (index, phase) in scenario.phases.iter().enumerate() {
            let mut tiers = BTreeMap::new();
            for (t, tier) in TIERS.iter().enumerate() {
                let of = &groups[index * TIERS.len() + t];
                if !of.is_empty() {
                    tiers.insert(tier.to_string(), figures(of, phase.seconds, deadlines));
                }
            }
            phases.push((phase.name.clone(), tiers));
        }
        let mut error_codes = BTreeMap::new();
        for o in outcomes.iter().filter(|o| o.kind == OutcomeKind::Error) {
            *error_codes
                .entry(o.code.clone().unwrap_or_else(|| "unknown".into()))
                .or_insert(0) += 1;
        }
        let mut timeline = vec![Second::default(); scenario.duration().ceil() as usize + 1];
        let last = timeline.len() - 1;
        let slot = |at: f64| (at.max(0.0) as usize).min(last);
        for o in outcomes {
            timeline[slot(o.sent_at)].offered += 1;
            let end = &mut timeline[slot(o.sent_at + o.latency)];
            match o.kind {
                OutcomeKind::Completed => end.completed += 1,
                OutcomeKind::Shed => end.shed += 1,
                OutcomeKind::QuotaRefused | OutcomeKind::PolicyRefused => end.refused += 1,
                OutcomeKind::Error => end.errors += 1,
            }
        }
        // Images per user: the completed outcomes sorted by user, counted in runs (a map of a
        // million users would cost a cache miss an image).
        let mut completed: Vec<(usize, &'static str)> = outcomes
            .iter()
            .filter(|o| o.kind == OutcomeKind::Completed)
            .map(|o| (o.user, o.tier))
            .collect();
        completed.sort_unstable_by_key(|&(user, _)| user);
        let mut most_images_per_user: BTreeMap<String, usize> = BTreeMap::new();
        for run in completed.chunk_by(|a, b| a.0 == b.0) {
            // A user's tier is that of their first image, as users keep one tier.
            let tier = run[0].1;
            match most_images_per_user.get_mut(tier) {
                Some(most) => *most = (*most).max(run.len()),
                None => {
                    most_images_per_user.insert(tier.to_string(), run.len());
                }
            }
        }
        Report {
            most_images_per_user,
            scenario: scenario.name.clone(),
            sent,
            totals: figures(&all, scenario.duration(), deadlines),
            phases,
            error_codes,
            timeline,
            accounted: outcomes.len() == sent,
        }
    }

    /// A short text summary: totals, the accounting line, then one line per phase and tier.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let n = |k: OutcomeKind| self.totals.outcomes.get(&k).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{}: sent {} = completed {} + shed {} + quota-refused {} + policy-refused {} + errors {} ({})",
            self.scenario,
            self.sent,
            n(OutcomeKind::Completed),
            n(OutcomeKind::Shed),
            n(OutcomeKind::QuotaRefused),
            n(OutcomeKind::PolicyRefused),
            n(OutcomeKind::Error),
            if self.accounted { "every request accounted for" } else { "NOT ACCOUNTED: outcomes missing" }
        );
        let _ = writeln!(
            out,
            "{:<10} {:<5} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8}",
            "phase", "tier", "sent", "done", "shed", "quota", "img/s", "good/s", "p50 s", "p99 s"
        );
        for (phase, tiers) in &self.phases {
            for (tier, f) in tiers {
                let c = |k: OutcomeKind| f.outcomes.get(&k).copied().unwrap_or(0);
                let (p50, p99) = f
                    .latency
                    .as_ref()
                    .map_or((f64::NAN, f64::NAN), |l| (l.p50, l.p99));
                let _ = writeln!(
                    out,
                    "{:<10} {:<5} {:>6} {:>6} {:>6} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                    phase,
                    tier,
                    f.sent,
                    c(OutcomeKind::Completed),
                    c(OutcomeKind::Shed),
                    c(OutcomeKind::QuotaRefused),
                    f.throughput,
                    f.goodput,
                    p50,
                    p99
                );
            }
        }
        out
    }
}

/// Kiln's default deadlines per tier (the scheduler's `--deadlines`), in seconds.
pub fn default_deadlines() -> BTreeMap<String, f64> {
    TIERS
        .iter()
        .zip([90.0, 60.0, 45.0, 45.0])
        .map(|(t, d)| (t.to_string(), d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario::from_toml(
            r#"
name = "t"
[population]
users = 10
tiers = { free = 1.0, pro = 1.0 }
[[phases]]
name = "a"
seconds = 10
rate = 1
[[phases]]
name = "b"
seconds = 10
rate = 1
"#,
        )
        .unwrap()
    }

    fn outcome(phase: usize, tier: &'static str, kind: OutcomeKind, latency: f64) -> Outcome {
        Outcome {
            sent_at: phase as f64 * 10.0 + 1.0,
            phase,
            user: phase,
            tier,
            kind,
            code: (kind == OutcomeKind::Error).then(|| "Unavailable".into()),
            first_progress: (kind == OutcomeKind::Completed).then_some(latency / 2.0),
            latency,
        }
    }

    #[test]
    fn figures_count_every_outcome_and_goodput_honours_deadlines() {
        let outcomes = vec![
            outcome(0, "free", OutcomeKind::Completed, 5.0),
            outcome(0, "free", OutcomeKind::Completed, 100.0), // past free's 90 s
            outcome(0, "free", OutcomeKind::Shed, 0.1),
            outcome(1, "pro", OutcomeKind::Completed, 2.0),
            outcome(1, "pro", OutcomeKind::Error, 0.1),
            outcome(1, "pro", OutcomeKind::QuotaRefused, 0.1),
        ];
        let report = Report::build(&scenario(), 6, &outcomes, &default_deadlines());
        assert!(report.accounted);
        let free = &report.phases[0].1["free"];
        assert_eq!(free.sent, 3);
        assert_eq!(free.outcomes[&OutcomeKind::Completed], 2);
        assert!((free.throughput - 0.2).abs() < 1e-9);
        assert!((free.goodput - 0.1).abs() < 1e-9);
        let pro = &report.phases[1].1["pro"];
        assert_eq!(pro.latency.as_ref().unwrap().p50, 2.0);
        assert_eq!(report.error_codes["Unavailable"], 1);
        // User 0 (free) got two images, user 1 (pro) one.
        assert_eq!(report.most_images_per_user["free"], 2);
        assert_eq!(report.most_images_per_user["pro"], 1);
        let offered: usize = report.timeline.iter().map(|s| s.offered).sum();
        assert_eq!(offered, 6);
        assert!(report.summary().contains("every request accounted for"));
    }

    #[test]
    fn a_missing_outcome_is_reported() {
        let outcomes = vec![outcome(0, "free", OutcomeKind::Completed, 1.0)];
        let report = Report::build(&scenario(), 2, &outcomes, &default_deadlines());
        assert!(!report.accounted);
        assert!(report.summary().contains("NOT ACCOUNTED"));
    }
}
