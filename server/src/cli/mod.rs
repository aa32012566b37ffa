//! The `keyward` operator CLI: a thin client of the operator API.
//!
//! It reads the server URL and an identity directory (`cert.pem`, `key.pem`, `ca.pem`, as
//! `keyward-server init` writes for the first operator) from flags or the environment. Output is
//! a table for people or JSON with `--json`; exit codes are stable for scripts (see
//! [`ExitCode`]).

mod commands;
mod table;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keyward_certs::files;
use keyward_common::client::{ApiClient, ClientError};
use keyward_common::tls::{CertifiedKey, client_config};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Exit codes scripts can rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// Any other failure.
    Failure = 1,
    /// Bad command line (clap's own code).
    Usage = 2,
    /// The object does not exist.
    NotFound = 3,
    /// The identity was refused (401/403, or a revoked certificate).
    Denied = 4,
    /// The request conflicts with the current state (409), or it was invalid (400).
    Conflict = 5,
    /// The server could not be reached, or TLS with it failed.
    Unreachable = 6,
    /// A watched rollout paused on failures.
    RolloutPaused = 7,
    /// The audit log failed verification.
    AuditBroken = 8,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 other failure, 2 bad usage, 3 not found, \
4 identity refused, 5 conflict or invalid request, 6 server unreachable or TLS failure, \
7 watched rollout paused, 8 audit log failed verification.";

/// keyward operator CLI: manage nodes, users, groups, containers, keys, rollouts and the audit log.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Key server API URL.
    #[arg(
        long,
        global = true,
        env = "KEYWARD_SERVER",
        default_value = "https://127.0.0.1:7443"
    )]
    server: String,
    /// Operator identity directory holding cert.pem, key.pem and ca.pem.
    #[arg(
        long,
        global = true,
        env = "KEYWARD_IDENTITY",
        default_value = "keyward-data/operator"
    )]
    identity: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Request timeout in seconds.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Nodes: join tokens, listing, eviction.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Users and their SSH keys.
    #[command(subcommand)]
    User(UserCommand),
    /// Groups of users that may log into containers.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Containers: create, rotate, destroy.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Keys and revocation progress.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Rollouts of changes that touch many containers.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// The hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List nodes.
    List,
    /// Show a node and the images it reported.
    Show {
        /// Node id.
        id: String,
    },
    /// Evict a node: deny its certificates, revoke the keys of its containers.
    Evict {
        /// Node id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a single-use join token and print the command that enrolls the agent.
    Create {
        /// Node id the token enrolls.
        node: String,
        /// Lifetime in seconds (the server's default and maximum apply).
        #[arg(long)]
        ttl: Option<u64>,
        /// Write the token to this file (mode 0600) instead of printing it, for automated
        /// enrollment (`keyward-agent enroll --token-file`).
        #[arg(long)]
        token_out: Option<PathBuf>,
        /// Also write the CA fingerprint to this file (`keyward-agent enroll
        /// --ca-fingerprint-file`).
        #[arg(long)]
        fingerprint_out: Option<PathBuf>,
    },
}

/// Rollout settings for changes that touch many containers.
#[derive(Debug, Clone, Args, Default)]
pub struct RolloutFlags {
    /// Containers released at once [server default].
    #[arg(long)]
    batch_size: Option<u64>,
    /// Most containers released but unconfirmed [server default].
    #[arg(long)]
    max_in_flight: Option<u64>,
    /// Failures after which the rollout pauses [server default].
    #[arg(long)]
    failure_threshold: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user.
    Add {
        /// User name.
        name: String,
        /// OpenSSH public key file (repeatable).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        /// Group to join (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
    /// Add a key to a user.
    AddKey {
        /// User name.
        name: String,
        /// OpenSSH public key file.
        #[arg(long = "key")]
        key: PathBuf,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
    /// Remove a user: revokes their keys and rolls the containers they could log into.
    Remove {
        /// User name.
        name: String,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
    /// List users.
    List,
    /// Show a user.
    Show {
        /// User name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Add a group.
    Add {
        /// Group name.
        name: String,
    },
    /// Remove a group; containers stop granting it.
    Remove {
        /// Group name.
        name: String,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
    /// List groups.
    List,
    /// Add a user to a group.
    AddMember {
        /// Group name.
        group: String,
        /// User name.
        user: String,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
    /// Remove a user from a group.
    RemoveMember {
        /// Group name.
        group: String,
        /// User name.
        user: String,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
}

#[derive(Debug, Subcommand)]
enum ContainerCommand {
    /// Create a container; prints its access private key once (or writes it with --key-out).
    Create(CreateArgs),
    /// List containers.
    List {
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
    },
    /// Show a container.
    Show {
        /// Container id.
        id: String,
    },
    /// Rotate the access key; prints the new private key once (or writes it with --key-out).
    Rotate {
        /// Container id.
        id: String,
        /// Write the private key to this file (mode 0600) instead of printing it.
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// Wait until the agent confirms the new generation, up to this many seconds.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Destroy a container: the agent wipes it and its image, its keys are revoked.
    Destroy {
        /// Container id.
        id: String,
        /// Wait until the agent confirms the wipe, up to this many seconds.
        #[arg(long)]
        wait: Option<u64>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Node to run on.
    #[arg(long)]
    node: String,
    /// Container name, unique on the node.
    #[arg(long)]
    name: String,
    /// Base image on the node (tag or image id).
    #[arg(long)]
    image: String,
    /// Pin the base image id instead of resolving the tag from the node's inventory.
    #[arg(long)]
    image_id: Option<String>,
    /// Group whose users may log in (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Published port: [IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]; IP defaults to 127.0.0.1.
    #[arg(long = "port")]
    ports: Vec<String>,
    /// Environment variable NAME=VALUE (not secret; repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// Secret file to inject: DEST=SRC[:MODE], e.g. /etc/keyward/token=./token:0400 (repeatable).
    #[arg(long = "file")]
    files: Vec<String>,
    /// Write the access private key to this file (mode 0600) instead of printing it.
    #[arg(long)]
    key_out: Option<PathBuf>,
    /// Wait until the agent confirms the container runs, up to this many seconds.
    #[arg(long)]
    wait: Option<u64>,
    /// Command and arguments (after `--`); default: the image's.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// List keys.
    List {
        /// Only `active` or `revoked` keys.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show a key (by id or SHA256 fingerprint) with its revocation progress.
    Show {
        /// Key id or fingerprint.
        id: String,
    },
    /// Revoke a user's key and roll the containers that hold it.
    Revoke {
        /// Key id.
        id: String,
        #[command(flatten)]
        rollout: RolloutFlags,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// List rollouts.
    List,
    /// Show a rollout's progress.
    Show {
        /// Rollout id.
        id: String,
        /// Redraw progress until the rollout completes (exit 0) or pauses (exit 7).
        #[arg(long)]
        watch: bool,
    },
    /// Resume a paused rollout; failed containers are tried again.
    Resume {
        /// Rollout id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// List audit entries.
    List {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Most entries to list.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Download the whole log and verify its hash chain.
    Verify,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    code: ExitCode,
    message: String,
}

impl CliError {
    fn new(code: ExitCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(err: ClientError) -> Self {
        let code = match &err {
            ClientError::Status { status: 404, .. } => ExitCode::NotFound,
            ClientError::Status {
                status: 401 | 403, ..
            }
            | ClientError::CertificateRevoked => ExitCode::Denied,
            ClientError::Status {
                status: 400 | 409 | 413,
                ..
            } => ExitCode::Conflict,
            ClientError::Connect { .. }
            | ClientError::Tls { .. }
            | ClientError::Timeout(_)
            | ClientError::BadUrl(_) => ExitCode::Unreachable,
            _ => ExitCode::Failure,
        };
        let hint = match code {
            ExitCode::Unreachable => {
                "\nhint: check --server (KEYWARD_SERVER) and that keyward-server is running"
            }
            ExitCode::Denied => {
                "\nhint: check --identity (KEYWARD_IDENTITY); it must be an operator identity"
            }
            _ => "",
        };
        Self::new(code, format!("{err}{hint}"))
    }
}

/// Entry point of the `keyward` binary.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(ExitCode::Failure as u8);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {}", e.message);
            std::process::ExitCode::from(e.code as u8)
        }
    }
}

/// Loads an identity directory into a TLS client for `server`.
pub fn connect(server: &str, identity: &Path, timeout: Duration) -> Result<ApiClient, CliError> {
    let read = |name: &str| {
        let path = identity.join(name);
        files::read_public(&path)
            .map_err(|e| CliError::new(ExitCode::Failure, format!("{e} (is --identity right?)")))
    };
    let ca_pem = read("ca.pem")?;
    let cert_pem = read("cert.pem")?;
    let key_pem = files::read_secret(&identity.join("key.pem"))
        .map_err(|e| CliError::new(ExitCode::Failure, e.to_string()))?;
    let bad = |what: &str| {
        CliError::new(
            ExitCode::Failure,
            format!("{} holds no valid {what}", identity.display()),
        )
    };
    let ca = CertificateDer::from_pem_slice(&ca_pem).map_err(|_| bad("ca.pem certificate"))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("cert.pem certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| bad("key.pem private key"))?;
    let config = client_config(&ca, Some(CertifiedKey { chain, key }))
        .map_err(|e| CliError::new(ExitCode::Failure, e.to_string()))?;
    ApiClient::new(server, config, timeout).map_err(CliError::from)
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let client = connect(&cli.server, &cli.identity, Duration::from_secs(cli.timeout))?;
    let out = commands::Output { json: cli.json };
    match cli.command {
        Command::Node(cmd) => commands::node(&client, &out, cmd).await,
        Command::User(cmd) => commands::user(&client, &out, cmd).await,
        Command::Group(cmd) => commands::group(&client, &out, cmd).await,
        Command::Container(cmd) => commands::container(&client, &out, cmd).await,
        Command::Key(cmd) => commands::key(&client, &out, cmd).await,
        Command::Rollout(cmd) => commands::rollout(&client, &out, cmd).await,
        Command::Audit(cmd) => commands::audit(&client, &out, cmd).await,
    }
}
