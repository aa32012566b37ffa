//! The signed documents: a container's [`Manifest`] and a node's [`NodeSnapshot`].
//!
//! Both are parsed with unknown and duplicate fields refused. Every byte that ends up in a
//! container is named here, inline (run settings) or by SHA-256 digest (injected files), so the
//! signature over the payload covers all of it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{ContainerId, ContainerName, ImageId, NodeId, Sha256Digest};
use crate::paths::{FileMode, SafePath};

/// What the agent should do with a container at this generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Build the image with the files injected and keep the container running.
    Run,
    /// Stop and remove the container, its image and build cache, and report the wipe.
    Destroy,
}

/// The desired state of one container at one generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Server-assigned id, stable across generations.
    pub container_id: ContainerId,
    /// Operator-chosen name, unique on the node.
    pub container_name: ContainerName,
    /// The only node that may apply this manifest.
    pub node: NodeId,
    /// Strictly increasing per container; agents refuse anything not above what they applied.
    pub generation: u64,
    /// Server-wide revision at which this generation was issued.
    pub revision: u64,
    /// Unix seconds when the server signed it.
    pub issued_at: u64,
    /// Unix seconds after which it must not be applied.
    pub expires_at: u64,
    /// Run or destroy.
    pub action: Action,
    /// The base image the container's image is built from.
    pub image: BaseImage,
    /// How the container runs.
    pub run: RunSettings,
    /// Files to inject, content fetched separately and checked against `sha256`.
    pub files: Vec<FileEntry>,
}

/// A base image, by the reference the operator gave and by the image id the signature binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseImage {
    /// The reference as the operator gave it (for people; never resolved by the agent).
    pub reference: String,
    /// The image id that must be present on the host.
    pub id: ImageId,
}

/// Run settings, all signed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    /// Command and arguments; empty means the image's own command.
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment variables (not secret: they are visible through the Docker API).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Ports published on the host.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    /// Name, `[A-Za-z_][A-Za-z0-9_]*`.
    pub name: String,
    /// Value.
    pub value: String,
}

impl EnvVar {
    /// Whether the name is a portable environment variable name and the value has no NUL.
    pub fn is_valid(&self) -> bool {
        let mut chars = self.name.chars();
        let first = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && !self.value.contains('\0')
    }
}

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`, as Docker spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A container port published on a host address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port inside the container.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Host address to bind, such as `127.0.0.1`.
    pub host_ip: IpAddr,
    /// Host port to bind.
    pub host_port: u16,
}

/// One file to inject. Its content is fetched from the server and must hash to `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Absolute, normalized destination path inside the container.
    pub path: SafePath,
    /// Permission bits.
    pub mode: FileMode,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Content length in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: Sha256Digest,
}

/// The current manifests of one node, re-signed on every watch answer.
///
/// It lets an agent tell a complete, fresh view from a stale or partial one: a manifest is
/// applied only when the latest fresh snapshot lists its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSnapshot {
    /// The node this snapshot describes.
    pub node: NodeId,
    /// Server-wide revision the snapshot reflects.
    pub revision: u64,
    /// Unix seconds when the server signed it.
    pub issued_at: u64,
    /// Unix seconds after which it is stale. Short: seconds to minutes.
    pub expires_at: u64,
    /// Every manifest current for the node.
    pub manifests: Vec<SnapshotEntry>,
}

/// One current manifest as listed in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// The container.
    pub container_id: ContainerId,
    /// Its current generation.
    pub generation: u64,
    /// SHA-256 of that generation's manifest payload bytes.
    pub digest: Sha256Digest,
}
