//! Agent settings: flags with environment variables, documented in `--help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use keyward_common::limits::Limits;
use keyward_common::paths::PathRules;

/// What to do with running containers once the last signed snapshot expired because the server
/// could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExpiryPolicy {
    /// Keep containers running as they are (availability first).
    Keep,
    /// Stop containers, keep their images; they start again when the server is back.
    Stop,
    /// Remove containers and images (secrets gone from the host); rebuilt when the server is back.
    Wipe,
}

/// Flags of `keyward-agent run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// State directory written by `keyward-agent enroll`.
    #[arg(
        long,
        env = "KEYWARD_AGENT_STATE",
        default_value = "/var/lib/keyward-agent"
    )]
    pub state: PathBuf,
    /// What to do once the last snapshot expires while the server is unreachable.
    #[arg(
        long,
        env = "KEYWARD_AGENT_EXPIRY_POLICY",
        value_enum,
        default_value = "keep"
    )]
    pub expiry_policy: ExpiryPolicy,
    /// Seconds a new container must stay running before the old one is removed.
    #[arg(long, env = "KEYWARD_AGENT_HEALTH_WAIT", default_value_t = 3)]
    pub health_wait_secs: u64,
    /// Seconds each watch long-poll may wait on the server.
    #[arg(long, env = "KEYWARD_AGENT_WATCH_WAIT", default_value_t = 25)]
    pub watch_wait_secs: u64,
    /// Allowed clock difference with the server, in seconds.
    #[arg(long, env = "KEYWARD_AGENT_CLOCK_SKEW", default_value_t = 30)]
    pub clock_skew_secs: u64,
    /// Directory injected files may be written under (repeatable) [default: /root/.ssh, /etc/ssh,
    /// /home, /etc/keyward, /run/keyward].
    #[arg(
        long = "allow-prefix",
        env = "KEYWARD_AGENT_ALLOW_PREFIXES",
        value_delimiter = ','
    )]
    pub allow_prefixes: Vec<String>,
    /// Largest accepted manifest envelope, in bytes.
    #[arg(long, env = "KEYWARD_AGENT_MAX_ENVELOPE_BYTES", default_value_t = 1024 * 1024)]
    pub max_envelope_bytes: usize,
    /// Most files per manifest.
    #[arg(long, env = "KEYWARD_AGENT_MAX_FILES", default_value_t = 64)]
    pub max_files: usize,
    /// Largest injected file, in bytes.
    #[arg(long, env = "KEYWARD_AGENT_MAX_FILE_BYTES", default_value_t = 1024 * 1024)]
    pub max_file_bytes: u64,
    /// Log format: text or json.
    #[arg(long, env = "KEYWARD_AGENT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl RunArgs {
    /// The path rules from `--allow-prefix`, or the defaults.
    pub fn path_rules(&self) -> Result<PathRules, keyward_common::paths::PathError> {
        if self.allow_prefixes.is_empty() {
            Ok(PathRules::default())
        } else {
            PathRules::new(&self.allow_prefixes)
        }
    }

    /// The size limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_envelope_bytes: self.max_envelope_bytes,
            max_files: self.max_files,
            max_file_bytes: self.max_file_bytes,
            ..Limits::default()
        }
    }

    /// How long a new container must stay up.
    pub fn health_wait(&self) -> Duration {
        Duration::from_secs(self.health_wait_secs)
    }
}

/// Flags of `keyward-agent enroll`.
#[derive(Debug, Clone, Args)]
pub struct EnrollArgs {
    /// State directory to create.
    #[arg(
        long,
        env = "KEYWARD_AGENT_STATE",
        default_value = "/var/lib/keyward-agent"
    )]
    pub state: PathBuf,
    /// The key server's mTLS API URL, e.g. https://keys.example:7443.
    #[arg(long, env = "KEYWARD_SERVER")]
    pub server: String,
    /// The enrollment URL [default: the API URL with the port plus one].
    #[arg(long, env = "KEYWARD_ENROLL_URL")]
    pub enroll_url: Option<String>,
    /// This node's id, as the join token was created for.
    #[arg(long, env = "KEYWARD_NODE")]
    pub node: String,
    /// SHA-256 fingerprint of the fleet CA, printed with the token.
    #[arg(
        long,
        env = "KEYWARD_CA_FINGERPRINT",
        required_unless_present = "ca_fingerprint_file"
    )]
    pub ca_fingerprint: Option<String>,
    /// File holding the CA fingerprint (`keyward node token create --fingerprint-out`).
    #[arg(long, conflicts_with = "ca_fingerprint")]
    pub ca_fingerprint_file: Option<PathBuf>,
    /// The single-use join token. Prefer --token-file or the environment over the command line,
    /// where other local users can see it.
    #[arg(
        long,
        env = "KEYWARD_JOIN_TOKEN",
        conflicts_with = "token_file",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// File holding the join token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Wait up to this many seconds for the token file to appear (for automated setups).
    #[arg(long, default_value_t = 0)]
    pub wait_for_token: u64,
}
