//! Server settings: a TOML file in the data directory, each setting overridable by a flag or an
//! environment variable (flag > environment > file > default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::api::RolloutPolicy;

/// Name of the settings file `init` writes into the data directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Settings as written in the TOML file; every field optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain of the fleet (set by `init`; changing it invalidates every identity).
    pub trust_domain: Option<String>,
    /// Address of the mTLS API listener.
    pub listen: Option<SocketAddr>,
    /// Address of the enrollment listener (client certificate optional).
    pub enroll_listen: Option<SocketAddr>,
    /// URL agents and operators use for the API, printed with join tokens.
    pub server_url: Option<String>,
    /// URL agents use to enroll, printed with join tokens.
    pub enroll_url: Option<String>,
    /// `sqlite:PATH` or `postgres://...`; default: `keyward.db` in the data directory.
    pub database_url: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// How long a signed manifest may be applied after issue, in seconds.
    pub manifest_ttl_secs: Option<u64>,
    /// How long a signed node snapshot stays fresh, in seconds.
    pub snapshot_ttl_secs: Option<u64>,
    /// Longest a watch request is held open, in seconds.
    pub watch_max_wait_secs: Option<u64>,
    /// Validity of node certificates, in seconds.
    pub node_cert_validity_secs: Option<u64>,
    /// Default and maximum lifetime of join tokens, in seconds.
    pub join_token_ttl_secs: Option<u64>,
    /// Default rollout batch size.
    pub rollout_batch_size: Option<u64>,
    /// Default rollout maximum in flight.
    pub rollout_max_in_flight: Option<u64>,
    /// Default rollout failure threshold.
    pub rollout_failure_threshold: Option<u64>,
    /// Most simultaneous connections across both listeners.
    pub max_connections: Option<usize>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: Option<usize>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `keyward-server serve`. Each has an environment variable; see `--help`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Data directory made by `keyward-server init`.
    #[arg(long, env = "KEYWARD_DATA", default_value = "keyward-data")]
    pub data: PathBuf,
    /// Settings file [default: DATA/config.toml].
    #[arg(long, env = "KEYWARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the mTLS API listener [default: 127.0.0.1:7443].
    #[arg(long, env = "KEYWARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the enrollment listener [default: 127.0.0.1:7444].
    #[arg(long, env = "KEYWARD_ENROLL_LISTEN")]
    pub enroll_listen: Option<SocketAddr>,
    /// API URL printed for agents [default: https://LISTEN].
    #[arg(long, env = "KEYWARD_SERVER_URL")]
    pub server_url: Option<String>,
    /// Enrollment URL printed for agents [default: https://ENROLL_LISTEN].
    #[arg(long, env = "KEYWARD_ENROLL_URL")]
    pub enroll_url: Option<String>,
    /// Database: `sqlite:PATH` or `postgres://user@host/db` [default: DATA/keyward.db].
    #[arg(long, env = "KEYWARD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Log format [default: text]. Levels come from RUST_LOG (default `info`).
    #[arg(long, env = "KEYWARD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Seconds a manifest may be applied after issue [default: 604800, 7 days].
    #[arg(long, env = "KEYWARD_MANIFEST_TTL_SECS")]
    pub manifest_ttl_secs: Option<u64>,
    /// Seconds a node snapshot stays fresh [default: 120].
    #[arg(long, env = "KEYWARD_SNAPSHOT_TTL_SECS")]
    pub snapshot_ttl_secs: Option<u64>,
    /// Longest a watch is held open, in seconds [default: 30].
    #[arg(long, env = "KEYWARD_WATCH_MAX_WAIT_SECS")]
    pub watch_max_wait_secs: Option<u64>,
    /// Node certificate validity in seconds [default: 86400]; agents renew at two thirds.
    #[arg(long, env = "KEYWARD_NODE_CERT_VALIDITY_SECS")]
    pub node_cert_validity_secs: Option<u64>,
    /// Default and maximum join token lifetime in seconds [default: 3600].
    #[arg(long, env = "KEYWARD_JOIN_TOKEN_TTL_SECS")]
    pub join_token_ttl_secs: Option<u64>,
    /// Default rollout batch size [default: 10].
    #[arg(long, env = "KEYWARD_ROLLOUT_BATCH_SIZE")]
    pub rollout_batch_size: Option<u64>,
    /// Default rollout maximum in flight [default: 20].
    #[arg(long, env = "KEYWARD_ROLLOUT_MAX_IN_FLIGHT")]
    pub rollout_max_in_flight: Option<u64>,
    /// Default failures after which a rollout pauses [default: 3].
    #[arg(long, env = "KEYWARD_ROLLOUT_FAILURE_THRESHOLD")]
    pub rollout_failure_threshold: Option<u64>,
    /// Most simultaneous connections [default: 20000].
    #[arg(long, env = "KEYWARD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Largest request body in bytes [default: 4194304].
    #[arg(long, env = "KEYWARD_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// mTLS API listener.
    pub listen: SocketAddr,
    /// Enrollment listener.
    pub enroll_listen: SocketAddr,
    /// API URL for agents and operators.
    pub server_url: String,
    /// Enrollment URL for agents.
    pub enroll_url: String,
    /// Database URL.
    pub database_url: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Manifest validity.
    pub manifest_ttl: Duration,
    /// Snapshot validity.
    pub snapshot_ttl: Duration,
    /// Longest watch.
    pub watch_max_wait: Duration,
    /// Node certificate validity.
    pub node_cert_validity: Duration,
    /// Join token lifetime (default and maximum).
    pub join_token_ttl: Duration,
    /// Default rollout policy.
    pub rollout: RolloutPolicy,
    /// Connection cap.
    pub max_connections: usize,
    /// Body size cap.
    pub max_body_bytes: usize,
}

/// Why settings could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The settings file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The settings file is not valid TOML for these settings.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A setting is missing or out of range.
    #[error("setting {0}")]
    Invalid(String),
}

impl FileConfig {
    /// Reads a settings file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

impl Settings {
    /// Resolves flags and environment over the settings file over defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let path = args
            .config
            .clone()
            .unwrap_or_else(|| args.data.join(CONFIG_FILE));
        let file = FileConfig::read(&path)?;

        let trust_domain = file.trust_domain.clone().ok_or_else(|| {
            ConfigError::Invalid(format!("trust_domain is missing from {}", path.display()))
        })?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or(([127, 0, 0, 1], 7443).into());
        let enroll_listen = args
            .enroll_listen
            .or(file.enroll_listen)
            .unwrap_or(([127, 0, 0, 1], 7444).into());
        let secs = |flag: Option<u64>, file: Option<u64>, default: u64| {
            Duration::from_secs(flag.or(file).unwrap_or(default))
        };
        let settings = Self {
            data_dir: args.data.clone(),
            trust_domain,
            listen,
            enroll_listen,
            server_url: args
                .server_url
                .clone()
                .or(file.server_url)
                .unwrap_or_else(|| format!("https://{listen}")),
            enroll_url: args
                .enroll_url
                .clone()
                .or(file.enroll_url)
                .unwrap_or_else(|| format!("https://{enroll_listen}")),
            database_url: args
                .database_url
                .clone()
                .or(file.database_url)
                .unwrap_or_else(|| crate::store::Store::sqlite_url(&args.data)),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            manifest_ttl: secs(args.manifest_ttl_secs, file.manifest_ttl_secs, 7 * 86_400),
            snapshot_ttl: secs(args.snapshot_ttl_secs, file.snapshot_ttl_secs, 120),
            watch_max_wait: secs(args.watch_max_wait_secs, file.watch_max_wait_secs, 30),
            node_cert_validity: secs(
                args.node_cert_validity_secs,
                file.node_cert_validity_secs,
                86_400,
            ),
            join_token_ttl: secs(args.join_token_ttl_secs, file.join_token_ttl_secs, 3600),
            rollout: RolloutPolicy {
                batch_size: args
                    .rollout_batch_size
                    .or(file.rollout_batch_size)
                    .unwrap_or(10),
                max_in_flight: args
                    .rollout_max_in_flight
                    .or(file.rollout_max_in_flight)
                    .unwrap_or(20),
                failure_threshold: args
                    .rollout_failure_threshold
                    .or(file.rollout_failure_threshold)
                    .unwrap_or(3),
            },
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(20_000),
            max_body_bytes: args
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(4 * 1024 * 1024),
        };
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("manifest_ttl_secs", self.manifest_ttl.as_secs()),
            ("snapshot_ttl_secs", self.snapshot_ttl.as_secs()),
            ("watch_max_wait_secs", self.watch_max_wait.as_secs()),
            ("node_cert_validity_secs", self.node_cert_validity.as_secs()),
            ("join_token_ttl_secs", self.join_token_ttl.as_secs()),
            ("rollout_batch_size", self.rollout.batch_size),
            ("rollout_max_in_flight", self.rollout.max_in_flight),
            ("rollout_failure_threshold", self.rollout.failure_threshold),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!("{name} must be above 0")));
        }
        if self.watch_max_wait >= self.snapshot_ttl {
            return Err(ConfigError::Invalid(
                "watch_max_wait_secs must be below snapshot_ttl_secs, or agents would see stale \
                 snapshots between answers"
                    .into(),
            ));
        }
        if self.node_cert_validity < Duration::from_secs(30) {
            return Err(ConfigError::Invalid(
                "node_cert_validity_secs must be at least 30".into(),
            ));
        }
        Ok(())
    }
}
