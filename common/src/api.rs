//! JSON bodies of the node API (`/v1/enroll`, `/v1/node/...`), shared by server and agent.
//!
//! Signed documents travel as raw JSON values inside these bodies, so the agent verifies the
//! exact bytes the server signed.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{ContainerId, ImageId, NodeId};
use crate::secret::SecretString;

/// `POST /v1/enroll` on the enrollment listener.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The join token an operator created for this node.
    pub token: SecretString,
    /// The node id the token is bound to.
    pub node: NodeId,
    /// PEM certificate signing request for the key the agent generated.
    pub csr_pem: String,
}

/// Answer to a successful enrollment or renewal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateResponse {
    /// The new node certificate, PEM.
    pub certificate_pem: String,
    /// The fleet CA certificate, PEM.
    pub ca_pem: String,
    /// The manifest trust root (see `TrustRoot::to_json`).
    pub trust_root: Box<RawValue>,
    /// The fleet's trust domain.
    pub trust_domain: String,
    /// `notAfter` of the certificate, unix seconds.
    pub not_after: i64,
}

/// `POST /v1/node/renew`: a fresh CSR, sent over mTLS with the current certificate.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PEM certificate signing request.
    pub csr_pem: String,
}

/// `GET /v1/node/watch?since=R&wait=S`: everything current for the node whose revision is above
/// `since`, plus a freshly signed snapshot.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchResponse {
    /// The server revision this answer reflects.
    pub revision: u64,
    /// The signed node snapshot (a DSSE envelope).
    pub snapshot: Box<RawValue>,
    /// Signed manifests (DSSE envelopes) changed since `since`.
    pub manifests: Vec<Box<RawValue>>,
}

/// `POST /v1/node/status`: what the agent did and what images it has.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// Outcomes since the last report.
    #[serde(default)]
    pub containers: Vec<ContainerReport>,
    /// The host's local images, when they changed or on start.
    #[serde(default)]
    pub inventory: Option<Vec<LocalImage>>,
}

/// The outcome of one manifest on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerReport {
    /// The container, when known (a manifest refused before parsing has none).
    pub container_id: Option<ContainerId>,
    /// The generation, when known.
    pub generation: Option<u64>,
    /// What happened.
    pub outcome: Outcome,
}

/// What happened to a manifest on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// The container runs this generation.
    Applied,
    /// Applying failed; the previous generation (if any) was kept or restored.
    Failed {
        /// Why, without secrets.
        reason: String,
    },
    /// The manifest was refused by verification and not applied.
    Refused {
        /// The failed check's message.
        reason: String,
    },
    /// The container, its image and build cache are gone.
    Wiped {
        /// Ids of the Docker objects removed.
        removed: Vec<String>,
    },
}

/// One image present on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalImage {
    /// Image id.
    pub id: ImageId,
    /// Tags such as `keyward/sshd:latest`.
    pub tags: Vec<String>,
}

/// An error body: every non-2xx answer of the API carries one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Machine-readable code such as `not_found` or `forbidden`.
    pub code: String,
    /// What went wrong and, where possible, what to do.
    pub message: String,
}
