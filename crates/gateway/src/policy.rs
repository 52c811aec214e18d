//! The content-policy stage: prompts asking for the style of a living artist are refused (before any
//! quota is charged) with `PERMISSION_DENIED`, an `ErrorInfo` reason `POLICY_REFUSED` and the rule
//! and artist that matched. The artist list is data (`kiln-policy`); a gateway given a policy file
//! re-reads it when it changes, so the list is updated without a restart.

use std::path::PathBuf;
use std::time::Duration;

use kiln_policy::ReloadablePolicy;
use kiln_telemetry as telemetry;
use tracing::{error, info};

use crate::auth::Identity;
use crate::validation::ValidRequest;
use crate::GatewayError;

/// Decides whether a prompt may be drawn.
pub trait ContentPolicy: Send + Sync + 'static {
    fn check(&self, identity: &Identity, request: &ValidRequest) -> Result<(), GatewayError>;
}

/// The style policy: the shipped artist list, or a file followed at run time.
#[derive(Clone)]
pub struct StyleRules {
    policy: ReloadablePolicy,
    file: Option<PathBuf>,
}

impl StyleRules {
    /// The list shipped with Kiln.
    pub fn shipped() -> Self {
        StyleRules {
            policy: ReloadablePolicy::shipped(),
            file: None,
        }
    }

    /// The list in `file`; a bad file stops the gateway at start.
    pub fn from_file(file: PathBuf) -> Result<Self, GatewayError> {
        let policy = ReloadablePolicy::load(&file).map_err(|e| {
            GatewayError::Internal(format!("content policy {}: {e}", file.display()))
        })?;
        Ok(StyleRules {
            policy,
            file: Some(file),
        })
    }

    /// The version of the list in force (1, then one more per reload).
    pub fn version(&self) -> u64 {
        self.policy.version()
    }

    /// Re-reads the file every `period` when it changed; a bad file is logged and the current list
    /// stays. Returns at once for the shipped list.
    pub async fn follow(self, period: Duration) {
        let Some(file) = self.file else { return };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.policy.reload_if_changed(&file) {
                Ok(true) => info!(
                    file = %file.display(),
                    version = self.policy.version(),
                    "content policy reloaded"
                ),
                Ok(false) => {}
                Err(e) => {
                    error!(file = %file.display(), error = %e, "content policy file invalid; keeping the current list")
                }
            }
        }
    }
}

impl ContentPolicy for StyleRules {
    fn check(&self, _: &Identity, request: &ValidRequest) -> Result<(), GatewayError> {
        self.policy.check(&request.prompt).map_err(|refusal| {
            telemetry::GATEWAY_POLICY_REFUSALS
                .with_label_values(&[refusal.rule])
                .inc();
            GatewayError::PolicyRefused(refusal)
        })
    }
}

#[cfg(test)]
mod tests {
    use kiln_scheduler::Tier;

    use super::*;
    use crate::validation::tests::valid_request;

    fn check(rules: &StyleRules, prompt: &str) -> Result<(), GatewayError> {
        let who = Identity {
            key_id: "k".into(),
            user: "u".into(),
            org: None,
            tier: Tier::Free,
        };
        let request = ValidRequest {
            prompt: prompt.into(),
            ..valid_request()
        };
        rules.check(&who, &request)
    }

    #[test]
    fn living_artists_are_refused_with_the_rule_and_others_pass() {
        let rules = StyleRules::shipped();
        let err = check(&rules, "a castle in the style of Greg Rutkowski").unwrap_err();
        let status = err.to_status();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        use tonic_types::StatusExt;
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "POLICY_REFUSED");
        assert_eq!(info.metadata["rule"], "living-artist-style");
        assert_eq!(info.metadata["artist"], "Greg Rutkowski");
        assert!(check(&rules, "starry night in the style of van gogh").is_ok());
        assert!(check(&rules, "a red triangle above a blue star").is_ok());
    }

    #[tokio::test]
    async fn a_changed_file_is_picked_up_and_a_bad_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("artists.toml");
        let one = |name: &str| format!("[[artist]]\nname = \"{name}\"\nliving = true\n");
        std::fs::write(&file, one("Ada Example")).unwrap();
        let rules = StyleRules::from_file(file.clone()).unwrap();
        assert!(check(&rules, "a cat by Ada Example").is_err());
        tokio::spawn(rules.clone().follow(Duration::from_millis(20)));
        std::fs::write(&file, one("Bea Example")).unwrap();
        for _ in 0..100 {
            if rules.version() > 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(check(&rules, "a cat by Ada Example").is_ok());
        assert!(check(&rules, "a cat by Bea Example").is_err());
        std::fs::write(&file, "not [ toml").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(check(&rules, "a cat by Bea Example").is_err(), "kept");
        assert!(StyleRules::from_file(dir.path().join("missing.toml")).is_err());
    }
}
