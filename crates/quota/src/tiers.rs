//! Tier limits as operators write them (TOML), validated, and turned into the [`Scope`]s the store
//! checks for one caller: their own limits and, for team members, their organisation's pool, scaled
//! by the current demand-tightening factor.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::QuotaError;

/// Tiers every table must define (the names the API knows).
pub const TIER_NAMES: [&str; 4] = ["free", "plus", "pro", "team"];

/// The launch-day table shipped with Kiln.
pub const SHIPPED_TIERS: &str = include_str!("../tiers.toml");

/// Every tier's limits, the organisation pool and the tightening rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierTable {
    pub tiers: BTreeMap<String, TierLimits>,
    #[serde(default)]
    pub org: PoolLimits,
    #[serde(default)]
    pub tightening: Tightening,
}

/// What one tier allows a user.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierLimits {
    /// Images per rolling window; all windows apply at once.
    #[serde(default)]
    pub windows: Vec<Window>,
    #[serde(default)]
    pub rate: Option<Rate>,
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    #[serde(default)]
    pub when_store_down: FailMode,
    /// Members also draw on their organisation's pool.
    #[serde(default)]
    pub org_pool: bool,
}

/// An organisation's shared pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolLimits {
    #[serde(default)]
    pub windows: Vec<Window>,
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

/// At most `images` images in any `seconds`-long rolling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub seconds: u64,
    pub images: u32,
}

/// A request rate: `per_minute` sustained, up to `burst` at once (GCRA).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: f64,
    pub burst: u32,
}

/// What a gateway does while the quota store is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Admit nothing (`UNAVAILABLE`): no limit can be exceeded. The default.
    #[default]
    Closed,
    /// Admit against a limiter local to each gateway: limits hold per gateway, not cluster-wide.
    Open,
}

/// Lowering some tiers' limits while the cluster is saturated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tightening {
    /// Multiplier in (0, 1] applied to window and rate limits of `tiers`.
    pub factor: f64,
    pub tiers: Vec<String>,
    /// Saturated when waiting jobs per batch slot reach this...
    pub enter_queue_per_slot: f64,
    /// ...and no longer once they fall to this.
    pub exit_queue_per_slot: f64,
}

impl Default for Tightening {
    fn default() -> Self {
        Tightening {
            factor: 1.0,
            tiers: Vec::new(),
            enter_queue_per_slot: 2.0,
            exit_queue_per_slot: 1.0,
        }
    }
}

/// The limits of one subject (a user or an organisation) as the store checks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// `user:<name>` or `org:<name>`.
    pub subject: String,
    /// (window length in ms, images allowed in it).
    pub windows: Vec<(u64, u32)>,
    /// GCRA (emission interval in ms, burst).
    pub rate: Option<(u64, u32)>,
    pub max_in_flight: Option<u32>,
}

impl Scope {
    /// The subject name of a user.
    pub fn user_subject(user: &str) -> String {
        format!("user:{user}")
    }

    /// The subject name of an organisation.
    pub fn org_subject(org: &str) -> String {
        format!("org:{org}")
    }
}

impl TierTable {
    /// The launch-day defaults.
    pub fn shipped() -> TierTable {
        TierTable::from_toml(SHIPPED_TIERS).expect("the shipped tier table is valid")
    }

    /// Parses and validates a table.
    pub fn from_toml(text: &str) -> Result<TierTable, QuotaError> {
        let table: TierTable =
            toml::from_str(text).map_err(|e| QuotaError::InvalidTiers(e.to_string()))?;
        table.validate()?;
        Ok(table)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a tier table serialises")
    }

    /// Checks every limit, naming the offending setting.
    pub fn validate(&self) -> Result<(), QuotaError> {
        let bad = |what: String| Err(QuotaError::InvalidTiers(what));
        for name in TIER_NAMES {
            if !self.tiers.contains_key(name) {
                return bad(format!("tiers.{name} is missing"));
            }
        }
        for name in self.tiers.keys() {
            if !TIER_NAMES.contains(&name.as_str()) {
                return bad(format!(
                    "tiers.{name}: unknown tier (known: {TIER_NAMES:?})"
                ));
            }
        }
        let check_windows = |at: &str, windows: &[Window]| -> Result<(), QuotaError> {
            for (i, w) in windows.iter().enumerate() {
                if w.seconds == 0 || w.seconds > 366 * 86400 {
                    return bad(format!(
                        "{at}.windows[{i}].seconds must be 1 to 31622400, got {}",
                        w.seconds
                    ));
                }
                if w.images == 0 {
                    return bad(format!("{at}.windows[{i}].images must be at least 1"));
                }
            }
            Ok(())
        };
        for (name, t) in &self.tiers {
            let at = format!("tiers.{name}");
            check_windows(&at, &t.windows)?;
            if let Some(r) = t.rate {
                if !(r.per_minute > 0.0 && r.per_minute <= 60_000.0) {
                    return bad(format!(
                        "{at}.rate.per_minute must be in (0, 60000], got {}",
                        r.per_minute
                    ));
                }
                if r.burst == 0 {
                    return bad(format!("{at}.rate.burst must be at least 1"));
                }
            }
            if t.max_in_flight == Some(0) {
                return bad(format!("{at}.max_in_flight must be at least 1 when set"));
            }
        }
        check_windows("org", &self.org.windows)?;
        if self.org.max_in_flight == Some(0) {
            return bad("org.max_in_flight must be at least 1 when set".into());
        }
        let t = &self.tightening;
        if !(t.factor > 0.0 && t.factor <= 1.0) {
            return bad(format!(
                "tightening.factor must be in (0, 1], got {}",
                t.factor
            ));
        }
        if let Some(name) = t.tiers.iter().find(|n| !TIER_NAMES.contains(&n.as_str())) {
            return bad(format!("tightening.tiers: unknown tier {name:?}"));
        }
        if t.exit_queue_per_slot > t.enter_queue_per_slot || t.exit_queue_per_slot < 0.0 {
            return bad(
                "tightening.exit_queue_per_slot must be between 0 and enter_queue_per_slot".into(),
            );
        }
        Ok(())
    }

    /// The limits of `tier` (validated tables define every known tier).
    pub fn tier(&self, tier: &str) -> Result<&TierLimits, QuotaError> {
        self.tiers
            .get(tier)
            .ok_or_else(|| QuotaError::InvalidTiers(format!("no limits for tier {tier:?}")))
    }

    /// The factor that applies to `tier` when the cluster's tightening factor is `factor`.
    pub fn factor_for(&self, tier: &str, factor: f64) -> f64 {
        if self.tightening.tiers.iter().any(|t| t == tier) {
            factor
        } else {
            1.0
        }
    }

    /// The scopes a request of `user` (in `org`, on `tier`) is checked against, with window and
    /// rate limits scaled by `factor` (never below one image or one request).
    pub fn scopes(
        &self,
        user: &str,
        org: Option<&str>,
        tier: &str,
        factor: f64,
    ) -> Result<Vec<Scope>, QuotaError> {
        let limits = self.tier(tier)?;
        let factor = self.factor_for(tier, factor);
        let scale = |n: u32| ((f64::from(n) * factor).floor() as u32).max(1);
        let windows = |ws: &[Window], scaled: bool| {
            ws.iter()
                .map(|w| {
                    let images = if scaled { scale(w.images) } else { w.images };
                    (w.seconds * 1000, images)
                })
                .collect::<Vec<_>>()
        };
        let mut scopes = vec![Scope {
            subject: Scope::user_subject(user),
            windows: windows(&limits.windows, true),
            rate: limits.rate.map(|r| {
                let per_minute = r.per_minute * factor;
                let interval_ms = (60_000.0 / per_minute).round().max(1.0) as u64;
                (interval_ms, r.burst)
            }),
            max_in_flight: limits.max_in_flight,
        }];
        if let (true, Some(org)) = (limits.org_pool, org) {
            scopes.push(Scope {
                subject: Scope::org_subject(org),
                windows: windows(&self.org.windows, false),
                rate: None,
                max_in_flight: self.org.max_in_flight,
            });
        }
        Ok(scopes)
    }

    /// The longest window of any tier: how long settlement records must be kept.
    pub fn longest_window(&self) -> Duration {
        let secs = self
            .tiers
            .values()
            .flat_map(|t| t.windows.iter())
            .chain(self.org.windows.iter())
            .map(|w| w.seconds)
            .max()
            .unwrap_or(0);
        Duration::from_secs(secs.max(86400))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_mirrors_the_launch() {
        let t = TierTable::shipped();
        let free = t.scopes("ana", None, "free", 1.0).unwrap();
        assert_eq!(free.len(), 1);
        assert_eq!(free[0].subject, "user:ana");
        assert_eq!(free[0].windows, vec![(86_400_000, 3)]);
        let team = t.scopes("bo", Some("acme"), "team", 1.0).unwrap();
        assert_eq!(team.len(), 2, "team members draw on the org pool too");
        assert_eq!(team[1].subject, "org:acme");
        // A team-tier key without an org has only its own limits.
        assert_eq!(t.scopes("bo", None, "team", 1.0).unwrap().len(), 1);
        assert_eq!(TierTable::from_toml(&t.to_toml()).unwrap(), t, "round trip");
    }

    #[test]
    fn tightening_scales_only_the_listed_tiers_and_never_to_zero() {
        let t = TierTable::shipped();
        let free = t.scopes("a", None, "free", 0.5).unwrap();
        assert_eq!(free[0].windows, vec![(86_400_000, 1)]);
        // 6 per minute halved: one request every 20 s.
        assert_eq!(free[0].rate, Some((20_000, 2)));
        let pro = t.scopes("a", None, "pro", 0.5).unwrap();
        assert_eq!(pro[0].windows[0], (86_400_000, 500));
        let tiny = t.scopes("a", None, "free", 0.01).unwrap();
        assert_eq!(tiny[0].windows[0].1, 1);
    }

    #[test]
    fn invalid_tables_name_the_setting() {
        let err = |text: &str| TierTable::from_toml(text).unwrap_err().to_string();
        let base = TierTable::shipped();
        let mut t = base.clone();
        t.tiers.remove("plus");
        assert!(err(&t.to_toml()).contains("tiers.plus is missing"));
        let mut t = base.clone();
        t.tiers.get_mut("free").unwrap().windows[0].images = 0;
        assert!(err(&t.to_toml()).contains("tiers.free.windows[0].images"));
        let mut t = base.clone();
        t.tightening.factor = 1.5;
        assert!(err(&t.to_toml()).contains("tightening.factor"));
        let mut t = base.clone();
        t.tiers.get_mut("pro").unwrap().rate = Some(Rate {
            per_minute: 0.0,
            burst: 1,
        });
        assert!(err(&t.to_toml()).contains("tiers.pro.rate.per_minute"));
        assert!(err("tiers = 3").contains("invalid"));
    }
}
