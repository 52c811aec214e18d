//! Scenarios: a user population with a tier mix and a sequence of phases, each an open-loop Poisson
//! arrival process whose rate is constant or ramps linearly. The arrival schedule is a pure, seeded
//! function of the scenario, so a load test and a simulation of the same scenario see the same
//! requests from the same users at the same offsets.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::LoadtestError;

/// Tiers in the order the population lists them.
pub const TIERS: [&str; 4] = ["free", "plus", "pro", "team"];

/// A whole rehearsal.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Seed of arrivals, user choice and prompts: one seed, one schedule.
    #[serde(default)]
    pub seed: u64,
    pub population: Population,
    pub phases: Vec<Phase>,
    #[serde(default)]
    pub requests: RequestShape,
}

/// Who sends requests.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Population {
    /// Distinct users (each gets an API key).
    pub users: usize,
    /// Share of users per tier (`free`, `plus`, `pro`, `team`); normalised, need not sum to 1.
    pub tiers: BTreeMap<String, f64>,
    /// Team users share orgs of this many members.
    #[serde(default = "default_org_size")]
    pub org_size: usize,
}

fn default_org_size() -> usize {
    10
}

/// One stretch of the rehearsal.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    /// Requests per second at the phase's start.
    pub rate: f64,
    /// Requests per second at its end (linear ramp); the start rate throughout when absent.
    pub rate_end: Option<f64>,
}

/// What each request asks for.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestShape {
    /// Image sides, drawn uniformly.
    pub sizes: Vec<u32>,
}

impl Default for RequestShape {
    fn default() -> Self {
        RequestShape { sizes: vec![64] }
    }
}

/// One request of the schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival {
    /// Seconds from the start of the rehearsal.
    pub at: f64,
    pub phase: usize,
    pub user: usize,
    pub size: u32,
    /// Index into the prompt corpus.
    pub prompt: usize,
}

/// One user of the population.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    pub tier: &'static str,
    pub org: Option<String>,
}

impl Scenario {
    /// Parses and checks a scenario file's text.
    pub fn from_toml(text: &str) -> Result<Scenario, LoadtestError> {
        let scenario: Scenario =
            toml::from_str(text).map_err(|e| LoadtestError::Scenario(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn validate(&self) -> Result<(), LoadtestError> {
        let bad = |m: String| Err(LoadtestError::Scenario(m));
        if self.population.users == 0 {
            return bad("population.users must be at least 1".into());
        }
        if let Some(tier) = self
            .population
            .tiers
            .keys()
            .find(|t| !TIERS.contains(&t.as_str()))
        {
            return bad(format!(
                "population.tiers: unknown tier {tier:?} (expected {TIERS:?})"
            ));
        }
        let total: f64 = self.population.tiers.values().sum();
        let valid_share = |s: f64| s.is_finite() && s >= 0.0;
        if !valid_share(total)
            || total == 0.0
            || !self.population.tiers.values().all(|s| valid_share(*s))
        {
            return bad("population.tiers: shares must be >= 0 and not all zero".into());
        }
        if self.population.org_size == 0 {
            return bad("population.org_size must be at least 1".into());
        }
        if self.phases.is_empty() {
            return bad("at least one [[phases]] is required".into());
        }
        for p in &self.phases {
            let rate_ok = |r: f64| r.is_finite() && r >= 0.0;
            let seconds_ok = p.seconds.is_finite() && p.seconds > 0.0;
            if !seconds_ok || !rate_ok(p.rate) || !p.rate_end.is_none_or(rate_ok) {
                return bad(format!(
                    "phase {:?}: seconds must be > 0 and rates >= 0",
                    p.name
                ));
            }
        }
        if self.requests.sizes.is_empty() {
            return bad("requests.sizes must list at least one side".into());
        }
        Ok(())
    }

    /// Seconds of the whole rehearsal.
    pub fn duration(&self) -> f64 {
        self.phases.iter().map(|p| p.seconds).sum()
    }

    /// Requests the scenario offers on average.
    pub fn expected_requests(&self) -> f64 {
        self.phases
            .iter()
            .map(|p| p.seconds * (p.rate + p.rate_end.unwrap_or(p.rate)) / 2.0)
            .sum()
    }

    /// The population: user `i` is `user-i`, with tiers in contiguous blocks by share (so a tier's
    /// users are stable when the population grows), and team users grouped into orgs.
    pub fn users(&self) -> Vec<User> {
        let bounds = self.tier_bounds();
        (0..self.population.users)
            .map(|i| self.user_within(i, &bounds))
            .collect()
    }

    /// User `i` of [`Scenario::users`] alone (a simulation makes each user on their first request).
    pub fn user(&self, i: usize) -> User {
        self.user_within(i, &self.tier_bounds())
    }

    /// Each tier with the cumulative share of the population up to its end.
    fn tier_bounds(&self) -> Vec<(&'static str, f64)> {
        let total: f64 = self.population.tiers.values().sum();
        let mut acc = 0.0;
        TIERS
            .iter()
            .map(|&tier| {
                acc += self.population.tiers.get(tier).copied().unwrap_or(0.0) / total;
                (tier, acc)
            })
            .collect()
    }

    fn user_within(&self, i: usize, bounds: &[(&'static str, f64)]) -> User {
        let x = (i as f64 + 0.5) / self.population.users as f64;
        let tier = bounds
            .iter()
            .find(|(_, b)| x < *b)
            .map_or(bounds[bounds.len() - 1].0, |(t, _)| *t);
        User {
            name: format!("user-{i}"),
            tier,
            org: (tier == "team").then(|| format!("org-{}", i / self.population.org_size)),
        }
    }

    /// The arrival schedule: a non-homogeneous Poisson process per phase (thinning against the
    /// phase's peak rate), each arrival from a uniformly drawn user.
    pub fn arrivals(&self, prompts: usize) -> Vec<Arrival> {
        // Sized for the expected count and a margin of many standard deviations: a launch day's
        // millions of arrivals are not copied by doubling (each copy faulted in fresh pages).
        let expected = self.expected_requests();
        let margin = 10.0 * expected.sqrt() + 64.0;
        let mut out = Vec::with_capacity((expected + margin) as usize);
        out.extend(self.arrival_stream(prompts));
        out
    }

    /// [`Scenario::arrivals`] one at a time, in time order, for a run that need not hold them all.
    pub fn arrival_stream(&self, prompts: usize) -> Arrivals<'_> {
        Arrivals {
            scenario: self,
            prompts: prompts.max(1),
            rng: ChaCha8Rng::seed_from_u64(self.seed),
            phase: 0,
            phase_start: 0.0,
            t: 0.0,
        }
    }
}

/// The arrival schedule as an iterator (see [`Scenario::arrival_stream`]).
pub struct Arrivals<'a> {
    scenario: &'a Scenario,
    prompts: usize,
    rng: ChaCha8Rng,
    /// The phase being drawn, its start in the run, and the last candidate's time within it.
    phase: usize,
    phase_start: f64,
    t: f64,
}

impl Iterator for Arrivals<'_> {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        let scenario = self.scenario;
        while let Some(phase) = scenario.phases.get(self.phase) {
            let end_rate = phase.rate_end.unwrap_or(phase.rate);
            let peak = phase.rate.max(end_rate);
            if peak > 0.0 {
                loop {
                    let u: f64 = self.rng.random::<f64>();
                    self.t += -(1.0 - u).ln() / peak;
                    if self.t >= phase.seconds {
                        break;
                    }
                    let rate = phase.rate + (end_rate - phase.rate) * self.t / phase.seconds;
                    if self.rng.random::<f64>() * peak <= rate {
                        let sizes = &scenario.requests.sizes;
                        return Some(Arrival {
                            at: self.phase_start + self.t,
                            phase: self.phase,
                            user: self.rng.random_range(0..scenario.population.users),
                            size: sizes[self.rng.random_range(0..sizes.len())],
                            prompt: self.rng.random_range(0..self.prompts),
                        });
                    }
                }
            }
            self.phase_start += phase.seconds;
            self.phase += 1;
            self.t = 0.0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPIKE: &str = r#"
name = "spike"
seed = 7
[population]
users = 1000
tiers = { free = 0.8, plus = 0.1, pro = 0.08, team = 0.02 }
org_size = 5
[[phases]]
name = "baseline"
seconds = 100
rate = 10
[[phases]]
name = "ramp"
seconds = 50
rate = 10
rate_end = 110
[[phases]]
name = "spike"
seconds = 20
rate = 100
"#;

    #[test]
    fn arrivals_follow_the_phase_rates() {
        let scenario = Scenario::from_toml(SPIKE).unwrap();
        let arrivals = scenario.arrivals(20);
        let count = |p: usize| arrivals.iter().filter(|a| a.phase == p).count() as f64;
        // Poisson counts: mean n, standard deviation sqrt(n); allow five of them.
        for (phase, mean) in [(0, 1000.0), (1, 3000.0), (2, 2000.0)] {
            let n = count(phase);
            assert!(
                (n - mean).abs() < 5.0 * f64::sqrt(mean),
                "phase {phase}: {n} vs {mean}"
            );
        }
        assert!(arrivals.windows(2).all(|w| w[0].at <= w[1].at));
        // The ramp's second half carries more than its first.
        let half = |lo: f64, hi: f64| arrivals.iter().filter(|a| a.at >= lo && a.at < hi).count();
        assert!(half(125.0, 150.0) > half(100.0, 125.0));
        assert_eq!(arrivals, scenario.arrivals(20), "one seed, one schedule");
    }

    #[test]
    fn the_population_has_the_tier_mix() {
        let scenario = Scenario::from_toml(SPIKE).unwrap();
        let users = scenario.users();
        let share = |t: &str| users.iter().filter(|u| u.tier == t).count();
        assert_eq!(
            (share("free"), share("plus"), share("pro"), share("team")),
            (800, 100, 80, 20)
        );
        let orgs: std::collections::BTreeSet<_> =
            users.iter().filter_map(|u| u.org.clone()).collect();
        assert_eq!(orgs.len(), 4);
        assert!(users
            .iter()
            .filter(|u| u.tier != "team")
            .all(|u| u.org.is_none()));
        // A user made alone is the same user.
        for i in [0, 799, 800, 979, 980, 999] {
            assert_eq!(scenario.user(i), users[i]);
        }
    }

    #[test]
    fn bad_scenarios_name_the_setting() {
        let err = Scenario::from_toml(&SPIKE.replace("free = 0.8", "gold = 0.8")).unwrap_err();
        assert!(err.to_string().contains("gold"), "{err}");
        let err = Scenario::from_toml(&SPIKE.replace("seconds = 20", "seconds = 0")).unwrap_err();
        assert!(err.to_string().contains("spike"), "{err}");
        let err = Scenario::from_toml(&SPIKE.replace("users = 1000", "users = 0")).unwrap_err();
        assert!(err.to_string().contains("users"), "{err}");
    }
}
