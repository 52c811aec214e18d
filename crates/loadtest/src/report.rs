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

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 5] = [
        OutcomeKind::Completed,
        OutcomeKind::Shed,
        OutcomeKind::QuotaRefused,
        OutcomeKind::PolicyRefused,
        OutcomeKind::Error,
    ];
    const COUNT: usize = OutcomeKind::ALL.len();
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
        // Three selections instead of a sort: each finds its rank in what the one before left
        // above it (the same values a sort would give, in linear time).
        let last = values.len() - 1;
        let rank = |p: f64| (last as f64 * p).round() as usize;
        let mut pick = |from: usize, at: usize| {
            *values[from..]
                .select_nth_unstable_by(at - from, f64::total_cmp)
                .1
        };
        let p50 = pick(0, rank(0.5));
        let p90 = pick(rank(0.5), rank(0.9));
        let p99 = pick(rank(0.9), rank(0.99));
        Some(Percentiles { p50, p90, p99 })
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
    /// Latency of the requests completed in this second (p50 and p99, seconds), read from a
    /// histogram: each is the upper edge of its bucket, within [`LATENCY_BUCKET_RATIO`] of the
    /// true value.
    pub latency_p50: Option<f64>,
    pub latency_p99: Option<f64>,
}

/// A window in which a fault was injected while the run went (by the chaos harness, or by hand and
/// named with `kiln loadtest --fault`), drawn over the report's charts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultWindow {
    pub name: String,
    /// Seconds from the run's start.
    pub from: f64,
    /// Equal to `from` for an instant fault (a kill).
    pub to: f64,
}

impl FaultWindow {
    /// Parses `NAME@FROM` (an instant) or `NAME@FROM-TO`, in seconds from the run's start.
    pub fn parse(text: &str) -> Result<FaultWindow, String> {
        let usage = || format!("{text:?}: expected NAME@FROM or NAME@FROM-TO (seconds)");
        let (name, window) = text.rsplit_once('@').ok_or_else(usage)?;
        let seconds = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        let (from, to) = match window.split_once('-') {
            Some((from, to)) => (seconds(from), seconds(to)),
            None => (seconds(window), seconds(window)),
        };
        match (name.trim(), from, to) {
            ("", _, _) => Err(usage()),
            (name, Some(from), Some(to)) if to >= from => Ok(FaultWindow {
                name: name.to_string(),
                from,
                to,
            }),
            _ => Err(usage()),
        }
    }
}

/// Each latency bucket's upper edge is this many times its lower one.
pub const LATENCY_BUCKET_RATIO: f64 = 1.1;
/// The first bucket's upper edge, in seconds (faster requests count in it).
const LATENCY_FIRST_EDGE: f64 = 0.001;
/// Up to about 4,000 s; slower requests count in the last bucket.
const LATENCY_BUCKETS: usize = 160;

/// A second's completed latencies, counted in buckets (a launch day's millions of requests need
/// not be kept to chart each second's percentiles).
#[derive(Clone, Default)]
struct LatencyHistogram {
    /// Empty until the first latency.
    counts: Vec<u32>,
    total: u32,
}

impl LatencyHistogram {
    fn bucket(latency: f64) -> usize {
        if latency <= LATENCY_FIRST_EDGE {
            return 0;
        }
        let index = (latency / LATENCY_FIRST_EDGE).ln() / LATENCY_BUCKET_RATIO.ln();
        (index.ceil() as usize).min(LATENCY_BUCKETS - 1)
    }

    fn edge(bucket: usize) -> f64 {
        LATENCY_FIRST_EDGE * LATENCY_BUCKET_RATIO.powi(bucket as i32)
    }

    fn add(&mut self, latency: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS];
        }
        self.counts[Self::bucket(latency)] += 1;
        self.total += 1;
    }

    /// The upper edge of the bucket holding rank `p` (the rank [`Percentiles`] takes).
    fn percentile(&self, p: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((self.total - 1) as f64 * p).round() as u32;
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen > rank {
                return Some(Self::edge(bucket));
            }
        }
        None
    }
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
    /// Faults injected while the run went, in the order given.
    pub faults: Vec<FaultWindow>,
}

/// The figures of one phase and tier (or of the whole run) as outcomes come: counts by kind, and
/// the latencies of completed requests for their percentiles.
#[derive(Default)]
struct Group {
    sent: usize,
    /// Indexed by `OutcomeKind as usize`.
    kinds: [usize; OutcomeKind::COUNT],
    /// Completed within their tier's deadline.
    in_time: usize,
    latencies: Vec<f64>,
    first_progress: Vec<f64>,
}

impl Group {
    fn add(&mut self, o: &Outcome, in_time: bool) {
        self.sent += 1;
        self.kinds[o.kind as usize] += 1;
        if o.kind == OutcomeKind::Completed {
            self.in_time += usize::from(in_time);
            self.latencies.push(o.latency);
            if let Some(first) = o.first_progress {
                self.first_progress.push(first);
            }
        }
    }

    fn figures(self, seconds: f64) -> Figures {
        let completed = self.kinds[OutcomeKind::Completed as usize];
        Figures {
            sent: self.sent,
            outcomes: OutcomeKind::ALL
                .into_iter()
                .filter(|&kind| self.kinds[kind as usize] > 0)
                .map(|kind| (kind, self.kinds[kind as usize]))
                .collect(),
            throughput: completed as f64 / seconds,
            goodput: self.in_time as f64 / seconds,
            latency: Percentiles::of(self.latencies),
            first_progress: Percentiles::of(self.first_progress),
        }
    }
}

/// A report built as outcomes come, so that a launch day's millions of them need not be kept
/// (the simulator folds each request in as it ends). [`Report::build`] is a tally of a list.
pub struct Tally {
    scenario: String,
    phase_names: Vec<String>,
    phase_seconds: Vec<f64>,
    duration: f64,
    /// The deadline of each of [`TIERS`], in seconds.
    deadlines: [Option<f64>; TIERS.len()],
    /// `phase * TIERS.len() + tier`.
    groups: Vec<Group>,
    totals: Group,
    error_codes: BTreeMap<String, usize>,
    timeline: Vec<Second>,
    /// The latencies completed in each second of the timeline.
    latencies: Vec<LatencyHistogram>,
    /// Per user (population index): completed images, and the index in [`TIERS`] of the tier of
    /// their first one. A vector, not a map: a million users would cost a cache miss and an entry
    /// each.
    images_per_user: Vec<(u32, u8)>,
    outcomes: usize,
}

impl Tally {
    /// An empty tally for a run of `scenario`; `deadlines` are seconds per tier.
    pub fn new(scenario: &Scenario, deadlines: &BTreeMap<String, f64>) -> Tally {
        let mut groups = Vec::new();
        groups.resize_with(scenario.phases.len() * TIERS.len(), Group::default);
        Tally {
            scenario: scenario.name.clone(),
            phase_names: scenario.phases.iter().map(|p| p.name.clone()).collect(),
            phase_seconds: scenario.phases.iter().map(|p| p.seconds).collect(),
            duration: scenario.duration(),
            deadlines: TIERS.map(|tier| deadlines.get(tier).copied()),
            groups,
            totals: Group::default(),
            error_codes: BTreeMap::new(),
            timeline: vec![Second::default(); scenario.duration().ceil() as usize + 1],
            latencies: vec![LatencyHistogram::default(); scenario.duration().ceil() as usize + 1],
            images_per_user: Vec::new(),
            outcomes: 0,
        }
    }

    /// Folds in one request's end.
    pub fn add(&mut self, o: &Outcome) {
        self.outcomes += 1;
        // Scenarios draw users from these tiers only; another tier has no deadline and no group.
        let tier = TIERS.iter().position(|&t| t == o.tier);
        let deadline = tier.and_then(|t| self.deadlines[t]);
        let in_time = o.kind == OutcomeKind::Completed && deadline.is_none_or(|d| o.latency <= d);
        self.totals.add(o, in_time);
        if let (Some(tier), true) = (tier, o.phase < self.phase_names.len()) {
            self.groups[o.phase * TIERS.len() + tier].add(o, in_time);
        }
        if o.kind == OutcomeKind::Error {
            let code = o.code.as_deref().unwrap_or("unknown");
            match self.error_codes.get_mut(code) {
                Some(n) => *n += 1,
                None => {
                    self.error_codes.insert(code.to_string(), 1);
                }
            }
        }
        let last = self.timeline.len() - 1;
        let slot = |at: f64| (at.max(0.0) as usize).min(last);
        self.timeline[slot(o.sent_at)].offered += 1;
        let ended = slot(o.sent_at + o.latency);
        let end = &mut self.timeline[ended];
        match o.kind {
            OutcomeKind::Completed => {
                end.completed += 1;
                self.latencies[ended].add(o.latency);
            }
            OutcomeKind::Shed => end.shed += 1,
            OutcomeKind::QuotaRefused | OutcomeKind::PolicyRefused => end.refused += 1,
            OutcomeKind::Error => end.errors += 1,
        }
        if let (OutcomeKind::Completed, Some(tier)) = (o.kind, tier) {
            if self.images_per_user.len() <= o.user {
                self.images_per_user.resize(o.user + 1, (0, 0));
            }
            // Users keep one tier, so each image of a user names the same.
            self.images_per_user[o.user] = (self.images_per_user[o.user].0 + 1, tier as u8);
        }
    }

    /// The report of `sent` requests and the outcomes folded in.
    pub fn finish(self, sent: usize) -> Report {
        let mut most_images_per_user: BTreeMap<String, usize> = BTreeMap::new();
        for &(images, tier) in self.images_per_user.iter().filter(|(n, _)| *n > 0) {
            let most = most_images_per_user
                .entry(TIERS[usize::from(tier)].to_string())
                .or_insert(0);
            *most = (*most).max(images as usize);
        }
        let mut groups = self.groups.into_iter();
        let phases = self
            .phase_names
            .into_iter()
            .zip(self.phase_seconds)
            .map(|(name, seconds)| {
                let tiers = TIERS
                    .iter()
                    .zip(groups.by_ref())
                    .filter(|(_, group)| group.sent > 0)
                    .map(|(tier, group)| (tier.to_string(), group.figures(seconds)))
                    .collect();
                (name, tiers)
            })
            .collect();
        let mut timeline = self.timeline;
        for (second, latencies) in timeline.iter_mut().zip(&self.latencies) {
            second.latency_p50 = latencies.percentile(0.5);
            second.latency_p99 = latencies.percentile(0.99);
        }
        Report {
            most_images_per_user,
            scenario: self.scenario,
            sent,
            totals: self.totals.figures(self.duration),
            phases,
            error_codes: self.error_codes,
            timeline,
            accounted: self.outcomes == sent,
            faults: Vec::new(),
        }
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

    /// Marks the faults injected while the run went, to be drawn over the charts.
    pub fn add_faults(&mut self, faults: impl IntoIterator<Item = FaultWindow>) {
        self.faults.extend(faults);
    }

    /// Aggregates `outcomes` of `sent` requests of `scenario`; `deadlines` are seconds per tier.
    pub fn build(
        scenario: &Scenario,
        sent: usize,
        outcomes: &[Outcome],
        deadlines: &BTreeMap<String, f64>,
    ) -> Report {
        let mut tally = Tally::new(scenario, deadlines);
        for outcome in outcomes {
            tally.add(outcome);
        }
        tally.finish(sent)
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
        for fault in &self.faults {
            let _ = writeln!(
                out,
                "fault {:>7.1}-{:<7.1} s {}",
                fault.from, fault.to, fault.name
            );
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
    fn percentiles_are_the_ranks_a_sort_gives() {
        // A scrambled list with repeats, of lengths around the rank boundaries.
        for len in [1usize, 2, 3, 10, 99, 100, 101, 1000] {
            let values: Vec<f64> = (0..len).map(|i| ((i * 7919) % 97) as f64 / 3.0).collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let at = |p: f64| sorted[((len - 1) as f64 * p).round() as usize];
            let got = Percentiles::of(values).unwrap();
            assert_eq!(
                (got.p50, got.p90, got.p99),
                (at(0.5), at(0.9), at(0.99)),
                "{len}"
            );
        }
        assert_eq!(Percentiles::of(Vec::new()), None);
    }

    #[test]
    fn each_seconds_latency_percentiles_are_within_a_bucket_of_the_true_ones() {
        // 100 completions ending in second 3: latencies 0.5 s to 2.48 s in steps of 0.02 s (p50
        // is the 51st, 1.5 s; p99 the 99th, 2.46 s).
        let outcomes: Vec<Outcome> = (0..100)
            .map(|i| {
                let latency = 0.5 + 0.02 * i as f64;
                Outcome {
                    sent_at: 3.2 - latency + 0.5,
                    ..outcome(0, "free", OutcomeKind::Completed, latency)
                }
            })
            .collect();
        let report = Report::build(&scenario(), 100, &outcomes, &default_deadlines());
        let second = &report.timeline[3];
        assert_eq!(second.completed, 100);
        for (got, exact) in [(second.latency_p50, 1.5), (second.latency_p99, 2.46)] {
            let got = got.expect("a percentile");
            assert!(
                got >= exact && got <= exact * LATENCY_BUCKET_RATIO,
                "{got} for {exact}"
            );
        }
        assert_eq!(report.timeline[2].latency_p99, None, "no completions");
        // The extremes land in the first and last buckets.
        assert_eq!(LatencyHistogram::bucket(0.0), 0);
        assert_eq!(LatencyHistogram::bucket(1e9), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn fault_windows_parse_and_show_in_the_summary() {
        let kill = FaultWindow::parse("kill -9 worker-0@12.5").unwrap();
        assert_eq!(
            (kill.name.as_str(), kill.from, kill.to),
            ("kill -9 worker-0", 12.5, 12.5)
        );
        let down = FaultWindow::parse("etcd down@30-40").unwrap();
        assert_eq!((down.from, down.to), (30.0, 40.0));
        for bad in ["no window", "@3", "x@", "x@5-4", "x@-1", "x@a-b", "x@nan"] {
            assert!(FaultWindow::parse(bad).is_err(), "{bad:?}");
        }
        let mut report = Report::build(&scenario(), 0, &[], &default_deadlines());
        report.add_faults([down]);
        assert!(report.summary().contains("etcd down"));
    }

    #[test]
    fn a_missing_outcome_is_reported() {
        let outcomes = vec![outcome(0, "free", OutcomeKind::Completed, 1.0)];
        let report = Report::build(&scenario(), 2, &outcomes, &default_deadlines());
        assert!(!report.accounted);
        assert!(report.summary().contains("NOT ACCOUNTED"));
    }
}
