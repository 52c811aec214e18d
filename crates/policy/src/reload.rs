//! Swapping the style policy at run time. A [`ReloadablePolicy`] is a cheap clone handed to every
//! request path; each check takes the current policy as an `Arc`, so a reload never blocks a check
//! for longer than a pointer swap and a check in flight keeps the policy it started with. It does
//! not watch the file: the gateway decides how often to call [`ReloadablePolicy::reload_if_changed`].

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use crate::{PolicyError, Refusal, StylePolicy};

/// The current [`StylePolicy`], replaceable from a file. Clones share it.
#[derive(Debug, Clone)]
pub struct ReloadablePolicy {
    state: Arc<RwLock<Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    policy: Arc<StylePolicy>,
    version: u64,
    /// Hash of the file text the policy came from; `None` for a policy not read from a file.
    fingerprint: Option<u64>,
}

impl ReloadablePolicy {
    /// Starts from `policy`, at version 1.
    pub fn new(policy: StylePolicy) -> Self {
        Self::with(policy, None)
    }

    /// Starts from the policy shipped with Kiln.
    pub fn shipped() -> Self {
        Self::new(StylePolicy::shipped())
    }

    /// Starts from a policy file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let (text, fingerprint) = read(path.as_ref())?;
        Ok(Self::with(
            StylePolicy::from_toml(&text)?,
            Some(fingerprint),
        ))
    }

    fn with(policy: StylePolicy, fingerprint: Option<u64>) -> Self {
        let loaded = Loaded {
            policy: Arc::new(policy),
            version: 1,
            fingerprint,
        };
        Self {
            state: Arc::new(RwLock::new(loaded)),
        }
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<StylePolicy> {
        // A panic while the lock was held cannot leave `Loaded` half-written (it is replaced
        // whole), so a poisoned lock is still a good one.
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&state.policy)
    }

    /// Checks a prompt against the policy in force now.
    pub fn check(&self, prompt: &str) -> Result<(), Refusal> {
        self.current().check(prompt)
    }

    /// Starts at 1 and goes up by one with each successful reload, so that an operator can tell
    /// one happened.
    pub fn version(&self) -> u64 {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .version
    }

    /// Replaces the policy with the one in `path`. On any error the policy in force is kept.
    pub fn reload_from(&self, path: impl AsRef<Path>) -> Result<(), PolicyError> {
        let (text, fingerprint) = read(path.as_ref())?;
        self.install(StylePolicy::from_toml(&text)?, fingerprint);
        Ok(())
    }

    /// Reloads from `path` if its content differs from what was last loaded; whether it did. The
    /// content is compared, not the modified time, which is too coarse on some file systems to
    /// see two writes in the same second; the file is small. On any error the policy in force is
    /// kept, and the same error comes back on each call until the file is fixed.
    pub fn reload_if_changed(&self, path: impl AsRef<Path>) -> Result<bool, PolicyError> {
        let (text, fingerprint) = read(path.as_ref())?;
        if self.fingerprint() == Some(fingerprint) {
            return Ok(false);
        }
        self.install(StylePolicy::from_toml(&text)?, fingerprint);
        Ok(true)
    }

    fn fingerprint(&self) -> Option<u64> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .fingerprint
    }

    fn install(&self, policy: StylePolicy, fingerprint: u64) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        *state = Loaded {
            policy: Arc::new(policy),
            version: state.version + 1,
            fingerprint: Some(fingerprint),
        };
    }
}

fn read(path: &Path) -> Result<(String, u64), PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    Ok((text, hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "[[artist]]\nname = \"Greg Rutkowski\"\nliving = true\n";
    const TWO: &str = "[[artist]]\nname = \"Greg Rutkowski\"\nliving = true\n\
                       [[artist]]\nname = \"Yayoi Kusama\"\nliving = true\n";

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write the test policy");
    }

    #[test]
    fn a_bad_file_keeps_the_old_policy() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("artists.toml");
        write(&path, ONE);
        let policy = ReloadablePolicy::load(&path).expect("valid policy");
        let clone = policy.clone();

        write(&path, "[[artist]]\nname = ");
        let err = policy.reload_from(&path).unwrap_err();
        assert_eq!(err.error_type(), "parse");
        write(
            &path,
            "[[artist]]\nname = \"Kusama\"\nliving = true\nsurname_alone = true\n",
        );
        assert_eq!(
            policy.reload_if_changed(&path).unwrap_err().error_type(),
            "invalid"
        );
        assert!(policy.reload_from(dir.path().join("missing.toml")).is_err());

        assert_eq!(policy.version(), 1);
        assert!(clone.check("greg rutkowski").is_err());
        assert_eq!(clone.current().artists().len(), 1);
    }

    #[test]
    fn reload_if_changed_picks_up_a_new_file_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("artists.toml");
        write(&path, ONE);
        let policy = ReloadablePolicy::load(&path).expect("valid policy");
        assert_eq!(policy.reload_if_changed(&path).ok(), Some(false));
        assert!(policy.check("yayoi kusama").is_ok());

        let in_flight = policy.current();
        write(&path, TWO);
        assert_eq!(policy.reload_if_changed(&path).ok(), Some(true));
        assert_eq!(policy.reload_if_changed(&path).ok(), Some(false));
        assert_eq!(policy.version(), 2);
        assert!(policy.check("yayoi kusama").is_err());
        // A check that took the old policy keeps it.
        assert!(in_flight.check("yayoi kusama").is_ok());
    }

    #[test]
    fn reload_from_always_reloads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("artists.toml");
        write(&path, TWO);
        let policy = ReloadablePolicy::shipped();
        assert!(policy.current().artists().len() > 2);
        policy.reload_from(&path).expect("valid policy");
        policy.reload_from(&path).expect("valid policy");
        assert_eq!(policy.version(), 3);
        assert_eq!(policy.current().artists().len(), 2);
        // The first change after a reload_from is measured against what it loaded.
        assert_eq!(policy.reload_if_changed(&path).ok(), Some(false));
    }

    #[test]
    fn the_shipped_file_is_what_is_compiled_in() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/artists.toml");
        let from_file = StylePolicy::load(path).expect("shipped file loads");
        assert_eq!(from_file.artists(), StylePolicy::shipped().artists());
    }
}
