//! JSON bodies of the operator API, shared by the server and the `keyward` CLI.
//!
//! Requests refuse unknown fields, so a typo in a script is an error rather than a silently
//! ignored setting.

use keyward_common::api::LocalImage;
use keyward_common::manifest::{EnvVar, PortMapping};
use keyward_common::secret::SecretString;
use serde::{Deserialize, Serialize};

/// `POST /v1/nodes/tokens`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// The node id the token enrolls.
    pub node: String,
    /// Lifetime in seconds; the server's default (and maximum) applies when absent.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// A new join token. The token itself is shown once and stored only as a hash.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenResponse {
    /// The node id.
    pub node: String,
    /// The single-use token.
    pub token: SecretString,
    /// Unix seconds after which it no longer works.
    pub expires_at: u64,
    /// SHA-256 fingerprint of the fleet CA certificate, for the agent to pin.
    pub ca_fingerprint: String,
    /// The enrollment URL agents should use.
    pub enroll_url: String,
    /// The main API URL agents should use after enrolling.
    pub server_url: String,
}

/// A node as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// `pending`, `active` or `evicted`.
    pub state: String,
    /// When enrolled (unix seconds).
    pub enrolled_at: Option<u64>,
    /// When the agent last talked to the server.
    pub last_seen: Option<u64>,
    /// Containers on the node that are not destroyed.
    pub containers: u64,
    /// Images the agent reported.
    pub inventory: Vec<LocalImage>,
}

/// `POST /v1/users`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// User name.
    pub name: String,
    /// OpenSSH public key lines.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Groups to join right away.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Rollout settings for the containers this change touches; unset ones take the server's.
    #[serde(default)]
    pub rollout: RolloutOverrides,
}

/// `POST /v1/users/{name}/keys`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddUserKeyRequest {
    /// One OpenSSH public key line.
    pub key: String,
    /// Rollout settings for the containers this change touches; unset ones take the server's.
    #[serde(default)]
    pub rollout: RolloutOverrides,
}

/// A user and their keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserView {
    /// User name.
    pub name: String,
    /// Groups the user belongs to.
    pub groups: Vec<String>,
    /// Active keys.
    pub keys: Vec<KeyView>,
}

/// `POST /v1/groups`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// Group name.
    pub name: String,
}

/// `POST /v1/groups/{name}/members`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    /// User to add.
    pub user: String,
    /// Rollout settings for the containers this change touches; unset ones take the server's.
    #[serde(default)]
    pub rollout: RolloutOverrides,
}

/// A group and its members.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupView {
    /// Group name.
    pub name: String,
    /// Members.
    pub members: Vec<String>,
    /// Containers that let this group log in.
    pub containers: u64,
}

/// What a change that may start a rollout returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeOutcome {
    /// The rollout that releases the change, if any container is affected.
    pub rollout: Option<String>,
    /// Containers affected.
    pub containers: u64,
}

/// Rollout settings given with a change; each unset one takes the server's default. Also read
/// from the query string of `DELETE` and revoke requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutOverrides {
    /// Containers released at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    /// Most containers released but not yet confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u64>,
    /// Failed containers after which the rollout pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u64>,
}

impl RolloutOverrides {
    /// The policy these overrides give over `defaults`.
    pub fn resolve(&self, defaults: RolloutPolicy) -> RolloutPolicy {
        RolloutPolicy {
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            max_in_flight: self.max_in_flight.unwrap_or(defaults.max_in_flight),
            failure_threshold: self.failure_threshold.unwrap_or(defaults.failure_threshold),
        }
    }

    /// The overrides as a query string (`?batch_size=…`), empty when none is set.
    pub fn query(&self) -> String {
        let params: Vec<String> = [
            ("batch_size", self.batch_size),
            ("max_in_flight", self.max_in_flight),
            ("failure_threshold", self.failure_threshold),
        ]
        .iter()
        .filter_map(|(name, value)| value.map(|v| format!("{name}={v}")))
        .collect();
        if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        }
    }
}

/// How a change that touches many containers is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    /// Containers released at once.
    pub batch_size: u64,
    /// Most containers released but not yet confirmed at any time.
    pub max_in_flight: u64,
    /// Failed containers after which the rollout pauses.
    pub failure_threshold: u64,
}

/// A file to inject, in a container create request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute destination path inside the container.
    pub path: String,
    /// Permission bits; default 0o400.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Owner uid; default 0.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Owner gid; default 0.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Content, standard base64.
    pub content_base64: SecretString,
}

/// `POST /v1/containers`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContainerRequest {
    /// Node to run on.
    pub node: String,
    /// Name, unique on the node.
    pub name: String,
    /// Base image reference (a tag such as `keyward/sshd:latest`, or an image id).
    pub image: String,
    /// The image id, when the operator pins it; otherwise resolved from the node's inventory.
    #[serde(default)]
    pub image_id: Option<String>,
    /// Groups whose users may log in.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Command and arguments; empty keeps the image's.
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment variables (not secret).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Secret files to inject.
    #[serde(default)]
    pub files: Vec<FileSpec>,
}

/// Answer to container create and rotate: the access private key, shown this once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeyResponse {
    /// The container.
    pub container: ContainerView,
    /// OpenSSH private key for logging in as root. Never stored by the server.
    pub access_private_key: SecretString,
}

/// A container as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerView {
    /// Container id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Node.
    pub node: String,
    /// `active`, `destroying`, `destroyed` or `orphaned`.
    pub state: String,
    /// Base image reference.
    pub image: String,
    /// Base image id.
    pub image_id: String,
    /// Groups whose users may log in.
    pub groups: Vec<String>,
    /// Latest generation issued.
    pub generation: u64,
    /// Latest generation the agent confirmed.
    pub applied_generation: u64,
    /// Last outcome the agent reported.
    pub status: String,
    /// Reason given with a failure or refusal.
    pub status_reason: Option<String>,
    /// Fingerprint of the current access key.
    pub access_key_fingerprint: String,
    /// The line to put in `known_hosts`.
    pub known_hosts: String,
    /// Published ports.
    pub ports: Vec<PortMapping>,
}

/// A key as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyView {
    /// Key id.
    pub id: String,
    /// `user`, `access` or `host`.
    pub kind: String,
    /// Owner user for user keys.
    pub user: Option<String>,
    /// Container for access and host keys.
    pub container: Option<String>,
    /// `SHA256:...`.
    pub fingerprint: String,
    /// `active` or `revoked`.
    pub state: String,
    /// Why it was revoked.
    pub revoke_reason: Option<String>,
    /// Revocation progress, for revoked keys.
    pub revocation: Option<RevocationProgress>,
}

/// How far a revocation has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationProgress {
    /// Containers that held the key.
    pub holders: u64,
    /// Of those, confirmed rebuilt without it or wiped.
    pub confirmed: u64,
    /// Of those, unconfirmed and on evicted nodes: they can never confirm, and the key may
    /// still be on those hosts.
    pub on_evicted_nodes: u64,
    /// Whether every holder confirmed.
    pub complete: bool,
}

/// A rollout as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutView {
    /// Rollout id.
    pub id: String,
    /// What caused it.
    pub reason: String,
    /// `running`, `paused` or `completed`.
    pub state: String,
    /// Release settings.
    pub policy: RolloutPolicy,
    /// Containers in the rollout.
    pub total: u64,
    /// Not yet released.
    pub pending: u64,
    /// Released, waiting for the agent (failing ones included).
    pub in_flight: u64,
    /// Confirmed applied.
    pub applied: u64,
    /// Of those in flight, reporting a failure since the rollout started or resumed.
    pub failed: u64,
    /// Skipped (nothing to change, or the container went away).
    pub skipped: u64,
    /// Number of batches released so far.
    pub batches: u64,
    /// Largest number of containers released in one batch so far.
    pub largest_batch: u64,
    /// Unix seconds.
    pub created_at: u64,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// Who acted: `operator/<name>`, `node/<id>` or `server`.
    pub actor: String,
    /// What happened, such as `container.create`.
    pub action: String,
    /// The object acted on.
    pub subject: String,
    /// Further facts as JSON text; never secrets.
    pub details: String,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
}

/// `GET /v1/audit` answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditPage {
    /// Entries in order.
    pub entries: Vec<AuditEntry>,
    /// The chain head the server records (sequence and hash), to detect a removed tail.
    pub head_seq: u64,
    /// Hash of the head entry.
    pub head_hash: String,
}
