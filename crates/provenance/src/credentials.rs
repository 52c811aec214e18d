//! Signing credentials: a PEM certificate chain (signing certificate first) and its PEM private key,
//! from files, or a development CA and signing certificate created on first start and kept in a
//! directory.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::ProvenanceError;

/// A certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct Credentials {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    // The private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("chain_pem_bytes", &self.chain_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ProvenanceError> {
    std::fs::read(path).map_err(|e| ProvenanceError::File {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

impl Credentials {
    /// Reads the chain and key files.
    pub fn from_files(chain: &Path, key: &Path) -> Result<Credentials, ProvenanceError> {
        Ok(Credentials {
            chain_pem: read("certificate chain", chain)?,
            key_pem: read("private key", key)?,
        })
    }
}

/// Development credentials: where they live, and the CA to trust when verifying.
#[derive(Debug)]
pub struct DevCredentials {
    pub credentials: Credentials,
    /// The development CA certificate (PEM): the trust anchor for images signed with it.
    pub ca_path: PathBuf,
    /// Whether this call created them.
    pub created: bool,
}

const CA_FILE: &str = "dev-ca.pem";
const CHAIN_FILE: &str = "dev-signer-chain.pem";
const KEY_FILE: &str = "dev-signer-key.pem";

/// The development CA and signing certificate in `dir`, created (P-256, the CA valid for ten
/// years, the signing certificate for two) when absent. For development only: anyone with the
/// directory can sign as this CA. Processes sharing a data directory may race to create them:
/// each writes a complete set in a directory of its own and renames it into place, so the files
/// always belong together and every process ends up with the winner's.
pub fn dev_credentials(dir: &Path) -> Result<DevCredentials, ProvenanceError> {
    let ca_path = dir.join(CA_FILE);
    let existing = || -> Result<DevCredentials, ProvenanceError> {
        Ok(DevCredentials {
            credentials: Credentials::from_files(&dir.join(CHAIN_FILE), &dir.join(KEY_FILE))?,
            ca_path: ca_path.clone(),
            created: false,
        })
    };
    if dir.join(KEY_FILE).exists() {
        return existing();
    }
    let (ca_pem, credentials) = generate_dev_chain(years_from_now(10), years_from_now(2))?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ProvenanceError::File {
        what: "data directory",
        path: parent.display().to_string(),
        message: e.to_string(),
    })?;
    static STAGING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let staging = parent.join(format!(
        ".c2pa-staging-{}-{}",
        std::process::id(),
        STAGING.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&staging).map_err(|e| ProvenanceError::File {
        what: "staging directory",
        path: staging.display().to_string(),
        message: e.to_string(),
    })?;
    write(&staging.join(CA_FILE), ca_pem.as_bytes(), false)?;
    write(&staging.join(CHAIN_FILE), &credentials.chain_pem, false)?;
    write(&staging.join(KEY_FILE), &credentials.key_pem, true)?;
    if std::fs::rename(&staging, dir).is_err() {
        // Another process got there first (the directory exists and is not empty).
        let _ = std::fs::remove_dir_all(&staging);
        return existing();
    }
    Ok(DevCredentials {
        credentials,
        ca_path,
        created: true,
    })
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), ProvenanceError> {
    let fail = |e: std::io::Error| ProvenanceError::File {
        what: "development credential",
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::write(path, bytes).map_err(fail)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    let _ = secret;
    Ok(())
}

/// January 1st, `years` from this year.
fn years_from_now(years: i32) -> OffsetDateTime {
    rcgen::date_time_ymd(this_year() + years, 1, 1)
}

fn this_year() -> i32 {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    // Close enough for validity periods measured in years.
    1970 + (seconds / 31_556_952) as i32
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Kiln development");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A CA and a signing certificate it issued, as C2PA requires of the latter: P-256, digital
/// signature only, the emailProtection extended key usage, an authority key identifier. Returns
/// the CA's PEM and the signing credentials (chain: signing certificate, then CA).
pub(crate) fn generate_dev_chain(
    ca_not_after: OffsetDateTime,
    signer_not_after: OffsetDateTime,
) -> Result<(String, Credentials), ProvenanceError> {
    let bad = |e: rcgen::Error| {
        ProvenanceError::Credentials(format!("creating development certificates: {e}"))
    };
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(bad)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
    ca.distinguished_name = name("Kiln development CA (not for production)");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_after = ca_not_after;
    let ca_cert = ca.self_signed(&ca_key).map_err(bad)?;

    let signer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(bad)?;
    let mut signer = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
    signer.distinguished_name = name("Kiln development signer (not for production)");
    signer.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    signer.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    signer.use_authority_key_identifier_extension = true;
    signer.not_after = signer_not_after;
    let issuer = Issuer::new(ca, ca_key);
    let signer_cert = signer.signed_by(&signer_key, &issuer).map_err(bad)?;

    let chain = format!("{}{}", signer_cert.pem(), ca_cert.pem());
    Ok((
        ca_cert.pem(),
        Credentials {
            chain_pem: chain.into_bytes(),
            key_pem: signer_key.serialize_pem().into_bytes(),
        },
    ))
}
