//! The content-policy stage. The embedded default refuses nothing; the reloadable style policy
//! (living artists refused, studios and deceased artists allowed) plugs in here.

use crate::auth::Identity;
use crate::validation::ValidRequest;
use crate::GatewayError;

/// Decides whether a prompt may be drawn.
pub trait ContentPolicy: Send + Sync + 'static {
    fn check(&self, identity: &Identity, request: &ValidRequest) -> Result<(), GatewayError>;
}

/// Allows every prompt: the embedded default until a policy is configured.
pub struct AllowAll;

impl ContentPolicy for AllowAll {
    fn check(&self, _: &Identity, _: &ValidRequest) -> Result<(), GatewayError> {
        Ok(())
    }
}
