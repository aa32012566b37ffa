//! The agent's state directory.
//!
//! | file | mode | content |
//! |---|---|---|
//! | `identity.pem` | 0600 | node certificate and its private key, replaced together |
//! | `ca.pem` | 0644 | fleet CA, pinned at enrollment |
//! | `trust-root.json` | 0644 | manifest signing keys accepted |
//! | `agent.json` | 0644 | node id, trust domain, server URL |
//! | `marks.json` | 0600 | high-water marks (see below) |
//!
//! The high-water marks are the last snapshot revision and, per container, the last accepted
//! generation with its digest and envelope.
//!
//! No secret bytes are ever written here: envelopes name injected files only by digest. Every
//! write is atomic and durable (temporary file, fsync, rename, fsync of the directory), so a
//! crash leaves the previous or the next state and a restart cannot be talked into accepting an
//! older generation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keyward_certs::files::{self, FileError};
use keyward_common::ids::{ContainerId, Sha256Digest};
use serde::{Deserialize, Serialize};

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A file's content is invalid.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The directory has not been enrolled.
    #[error("{0} holds no enrollment; run `keyward-agent enroll` first")]
    NotEnrolled(PathBuf),
}

/// Facts recorded at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInfo {
    /// This node's id.
    pub node: String,
    /// The fleet's trust domain.
    pub trust_domain: String,
    /// The mTLS API URL.
    pub server_url: String,
}

/// The last accepted generation of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    /// Generation.
    pub generation: u64,
    /// SHA-256 of the manifest payload.
    pub digest: Sha256Digest,
    /// The envelope as received, while the container is wanted; dropped once it is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<String>,
}

/// High-water marks and the last snapshot revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marks {
    /// Revision of the last accepted snapshot.
    pub last_revision: Option<u64>,
    /// Per container: the last accepted generation.
    pub containers: BTreeMap<ContainerId, Mark>,
    /// Expiry of the last accepted snapshot (unix seconds): when the expiry policy applies if
    /// the server stays unreachable, also across restarts.
    #[serde(default)]
    pub snapshot_expires_at: Option<u64>,
    /// Set when the server refused this node as evicted; the agent then applies nothing.
    #[serde(default)]
    pub evicted: bool,
}

/// Paths in the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a file in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates the directory (0700).
    pub fn create(&self) -> Result<(), StateError> {
        Ok(files::create_private_dir(&self.root)?)
    }

    /// Reads `agent.json`.
    pub fn info(&self) -> Result<AgentInfo, StateError> {
        let path = self.path("agent.json");
        if !path.exists() {
            return Err(StateError::NotEnrolled(self.root.clone()));
        }
        let bytes = files::read_public(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Malformed {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes `agent.json`.
    pub fn write_info(&self, info: &AgentInfo) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(info).map_err(|e| StateError::Malformed {
            path: self.path("agent.json"),
            reason: e.to_string(),
        })?;
        Ok(files::write_public(&self.path("agent.json"), &bytes)?)
    }

    /// Reads the marks; none yet is an empty set.
    pub fn marks(&self) -> Result<Marks, StateError> {
        let path = self.path("marks.json");
        if !path.exists() {
            return Ok(Marks::default());
        }
        let bytes = files::read_secret(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Malformed {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes the marks atomically and durably.
    pub fn write_marks(&self, marks: &Marks) -> Result<(), StateError> {
        let path = self.path("marks.json");
        let bytes = serde_json::to_vec(marks).map_err(|e| StateError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(files::write_secret(&path, &bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(state.marks().unwrap(), Marks::default());
        let mut marks = Marks {
            last_revision: Some(7),
            ..Marks::default()
        };
        marks.containers.insert(
            ContainerId::new("c-1").unwrap(),
            Mark {
                generation: 3,
                digest: Sha256Digest::of(b"x"),
                envelope: Some("{}".into()),
            },
        );
        state.write_marks(&marks).unwrap();
        assert_eq!(state.marks().unwrap(), marks);
        let mode = std::fs::metadata(state.path("marks.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_unenrolled_directory_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = StateDir::new(dir.path()).info().unwrap_err();
        assert!(
            err.to_string().contains("run `keyward-agent enroll` first"),
            "{err}"
        );
    }
}
