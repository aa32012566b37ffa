//! The server's data directory: what `init` creates and `serve` loads.
//!
//! | file | mode | content |
//! |---|---|---|
//! | `config.toml` | 0644 | settings, including the trust domain |
//! | `ca.pem`, `ca.key` | 0644, 0600 | fleet CA |
//! | `server.pem`, `server.key` | 0644, 0600 | server certificate chain (leaf, CA) and key |
//! | `signing.key` | 0600 | manifest signing key (ed25519 seed, base64) |
//! | `trust-root.json` | 0644 | the signing keys agents accept |
//! | `kek.key` | 0600 | key-encryption key for host keys and secret files |
//! | `operator/` | 0700 | first operator identity: `cert.pem`, `key.pem`, `ca.pem` |
//! | `keyward.db` | 0600 | SQLite store (unless PostgreSQL is configured) |

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyward_certs::files::{self, FileError};
use keyward_certs::{CertError, FleetCa, Validity};
use keyward_common::dsse::{ManifestSigningKey, TrustRoot};
use keyward_common::identity::Identity;
use keyward_common::ids::{OperatorName, TrustDomain};
use keyward_common::tls::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::config::{CONFIG_FILE, FileConfig};
use crate::kek::{Kek, KekError};

/// First line of the signing key file.
const SIGNING_KEY_HEADER: &str = "keyward manifest signing key v1";

/// Why the data directory could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// `init` found an existing, non-empty directory.
    #[error("{0} already exists and is not empty; refusing to overwrite a fleet's keys")]
    Exists(PathBuf),
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A certificate operation failed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The key-encryption key failed.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// A file's content is not what it should be.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The trust domain or operator name is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Options of `keyward-server init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Directory to create.
    pub dir: PathBuf,
    /// Trust domain of the fleet.
    pub domain: String,
    /// DNS names and IP addresses of the server certificate.
    pub sans: Vec<String>,
    /// Name of the first operator.
    pub operator: String,
    /// Settings to write into `config.toml` besides the trust domain.
    pub config: FileConfig,
}

/// What `init` made, for printing.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// CA fingerprint.
    pub ca_fingerprint: String,
    /// Manifest signing key id.
    pub signing_key_id: String,
    /// Operator identity directory.
    pub operator_dir: PathBuf,
    /// Operator certificate serial.
    pub operator_serial: String,
    /// Operator certificate expiry.
    pub operator_not_after: i64,
}

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates a new fleet: CA, server certificate, signing key, trust root, key-encryption key,
    /// first operator identity and settings. Refuses an existing non-empty directory.
    pub fn init(options: &InitOptions) -> Result<(Self, InitReport), DataDirError> {
        let domain = TrustDomain::new(options.domain.clone())
            .map_err(|e| DataDirError::Invalid(e.to_string()))?;
        let operator = OperatorName::new(options.operator.clone())
            .map_err(|e| DataDirError::Invalid(e.to_string()))?;
        let dir = &options.dir;
        let non_empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if non_empty {
            return Err(DataDirError::Exists(dir.clone()));
        }
        files::create_private_dir(dir)?;
        let data = Self::new(dir.clone());

        let ca = FleetCa::create(domain.clone(), Validity::for_duration(years(10)))?;
        ca.save(dir)?;

        let server = ca.issue_server(&options.sans, Validity::for_duration(years(1)))?;
        files::write_secret(&data.path("server.key"), server.key_pem.as_bytes())?;
        let chain = format!("{}{}", server.cert.pem, ca.cert_pem());
        files::write_public(&data.path("server.pem"), chain.as_bytes())?;

        let signing = ManifestSigningKey::generate();
        let encoded = Zeroizing::new(format!(
            "{SIGNING_KEY_HEADER}\n{}\n",
            STANDARD.encode(*signing.seed())
        ));
        files::write_secret(&data.path("signing.key"), encoded.as_bytes())?;
        let root = TrustRoot::new([signing.verifying_key()])
            .map_err(|e| DataDirError::Invalid(e.to_string()))?;
        files::write_public(&data.path("trust-root.json"), &root.to_json())?;

        Kek::create(&data.path("kek.key"))?;

        let operator_dir = data.path("operator");
        files::create_private_dir(&operator_dir)?;
        let issued = ca.issue_identity(
            &Identity::Operator(operator),
            Validity::for_duration(years(1)),
        )?;
        files::write_secret(&operator_dir.join("key.pem"), issued.key_pem.as_bytes())?;
        files::write_public(&operator_dir.join("cert.pem"), issued.cert.pem.as_bytes())?;
        files::write_public(&operator_dir.join("ca.pem"), ca.cert_pem().as_bytes())?;

        let config = FileConfig {
            trust_domain: Some(domain.to_string()),
            ..options.config.clone()
        };
        let text = toml::to_string(&config)
            .map_err(|e| DataDirError::Invalid(format!("settings do not serialize: {e}")))?;
        files::write_public(&data.path(CONFIG_FILE), text.as_bytes())?;

        let report = InitReport {
            ca_fingerprint: ca.fingerprint().to_hex(),
            signing_key_id: signing.key_id().to_string(),
            operator_dir,
            operator_serial: issued.cert.serial,
            operator_not_after: issued.cert.not_after,
        };
        Ok((data, report))
    }

    /// Loads the fleet CA.
    pub fn ca(&self, domain: &TrustDomain) -> Result<FleetCa, DataDirError> {
        Ok(FleetCa::load(&self.root, domain.clone())?)
    }

    /// Loads the server's certificate chain and key.
    pub fn server_identity(&self) -> Result<CertifiedKey, DataDirError> {
        let chain_path = self.path("server.pem");
        let chain = files::read_public(&chain_path)?;
        let chain = CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DataDirError::Malformed {
                path: chain_path.clone(),
                reason: e.to_string(),
            })?;
        let key_path = self.path("server.key");
        let key_pem = files::read_secret(&key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| DataDirError::Malformed {
            path: key_path,
            reason: e.to_string(),
        })?;
        Ok(CertifiedKey { chain, key })
    }

    /// Loads the manifest signing key.
    pub fn signing_key(&self) -> Result<ManifestSigningKey, DataDirError> {
        let path = self.path("signing.key");
        let bytes = files::read_secret(&path)?;
        let malformed = |reason: &str| DataDirError::Malformed {
            path: path.clone(),
            reason: reason.into(),
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| malformed("not text"))?;
        let mut lines = text.lines();
        if lines.next() != Some(SIGNING_KEY_HEADER) {
            return Err(malformed("missing header line"));
        }
        let seed = Zeroizing::new(
            STANDARD
                .decode(lines.next().unwrap_or_default().trim())
                .map_err(|_| malformed("seed is not base64"))?,
        );
        ManifestSigningKey::from_seed(&seed).map_err(|e| malformed(&e.to_string()))
    }

    /// Loads the trust root agents receive at enrollment.
    pub fn trust_root(&self) -> Result<TrustRoot, DataDirError> {
        let path = self.path("trust-root.json");
        let bytes = files::read_public(&path)?;
        TrustRoot::from_json(&bytes).map_err(|e| DataDirError::Malformed {
            path,
            reason: e.to_string(),
        })
    }

    /// Loads the key-encryption key.
    pub fn kek(&self) -> Result<Kek, DataDirError> {
        Ok(Kek::load(&self.path("kek.key"))?)
    }
}

fn years(n: u64) -> Duration {
    Duration::from_secs(n * 365 * 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn options(dir: &Path) -> InitOptions {
        InitOptions {
            dir: dir.to_path_buf(),
            domain: "fleet.test".into(),
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            operator: "admin".into(),
            config: FileConfig::default(),
        }
    }

    #[test]
    fn init_writes_private_keys_0600_and_loads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (data, report) = DataDir::init(&options(&dir)).unwrap();
        for secret in [
            "ca.key",
            "server.key",
            "signing.key",
            "kek.key",
            "operator/key.pem",
        ] {
            let mode = std::fs::metadata(dir.join(secret))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{secret}");
        }
        let domain = TrustDomain::new("fleet.test").unwrap();
        assert_eq!(
            data.ca(&domain).unwrap().fingerprint().to_hex(),
            report.ca_fingerprint
        );
        assert_eq!(
            data.signing_key().unwrap().key_id().to_string(),
            report.signing_key_id
        );
        assert_eq!(data.trust_root().unwrap().key_ids().count(), 1);
        assert_eq!(data.server_identity().unwrap().chain.len(), 2);
        data.kek().unwrap();
    }

    #[test]
    fn init_refuses_an_existing_data_directory_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        DataDir::init(&options(&dir)).unwrap();
        let before = std::fs::read(dir.join("ca.key")).unwrap();
        let err = DataDir::init(&options(&dir)).unwrap_err();
        assert!(matches!(err, DataDirError::Exists(_)), "{err}");
        assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), before);
    }
}
