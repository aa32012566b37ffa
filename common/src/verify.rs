//! The checks an agent runs before it applies anything (DESIGN.md, "Signed manifests").
//!
//! Verification is pure: the trust root, the node id, the high-water mark and the current time
//! are inputs. Its results, [`VerifiedSnapshot`], [`VerifiedManifest`] and [`VerifiedFile`], have
//! private fields and no public constructor, so holding one proves the checks ran.
//!
//! | check | what it refuses |
//! |---|---|
//! | 1 envelope | oversize, malformed JSON or base64, wrong `payloadType`, bad payload |
//! | 2 signature | no signature by a trusted key, or a trusted key's signature that fails |
//! | 3 node | a manifest or snapshot for another node |
//! | 4 generation | a generation not above the persisted high-water mark |
//! | 5 freshness | expired or future-dated manifests, stale or rolled-back snapshots, and (*) |
//! | 6 files | paths outside the rules, bad modes, too many or too large files, and (**) |
//!
//! (*) a manifest that the latest snapshot does not list with this digest;
//! (**) file content that does not match its signed digest.
//!
//! Check 7 (the base image is present with the signed id) needs the Docker engine and lives in
//! the agent.

use std::collections::HashSet;

use serde::de::DeserializeOwned;

use crate::dsse::{
    Envelope, EnvelopeError, MANIFEST_PAYLOAD_TYPE, SNAPSHOT_PAYLOAD_TYPE, SignatureError,
    TrustRoot,
};
use crate::ids::{ContainerId, NodeId, Sha256Digest};
use crate::limits::Limits;
use crate::manifest::{FileEntry, Manifest, NodeSnapshot, SnapshotEntry};
use crate::paths::{FileMode, PathError, PathRules, SafePath};
use crate::secret::SecretBytes;

/// Why a snapshot, manifest or file was refused. Each message starts with the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The envelope could not be decoded.
    #[error("check 1 (envelope): {0}")]
    Envelope(EnvelopeError),
    /// The envelope carries another kind of payload.
    #[error("check 1 (envelope): payloadType {found:?} is not {expected:?}")]
    PayloadType {
        /// The type this verifier wanted.
        expected: &'static str,
        /// The type the envelope declares (cut to 80 characters).
        found: String,
    },
    /// The signed payload does not parse as the expected document.
    #[error("check 1 (envelope): payload is not a valid {kind}: {reason}")]
    Payload {
        /// `manifest` or `snapshot`.
        kind: &'static str,
        /// The parser's reason.
        reason: String,
    },
    /// No trusted signature.
    #[error("check 2 (signature): {0}")]
    Signature(SignatureError),
    /// The document is addressed to another node.
    #[error("check 3 (node): {kind} is for node {found}, but this agent is node {expected}")]
    WrongNode {
        /// `manifest` or `snapshot`.
        kind: &'static str,
        /// This agent's node id.
        expected: NodeId,
        /// The node the document names.
        found: NodeId,
    },
    /// Replay or rollback: the generation is not above the high-water mark.
    #[error(
        "check 4 (generation): generation {generation} of container {container} is not above \
         the high-water mark {mark} (replay or rollback)"
    )]
    GenerationNotAbove {
        /// The container.
        container: ContainerId,
        /// The refused generation.
        generation: u64,
        /// The highest generation already accepted.
        mark: u64,
    },
    /// The manifest's validity ended.
    #[error("check 5 (freshness): manifest expired at {expires_at}, now is {now}")]
    Expired {
        /// When it expired (unix seconds).
        expires_at: u64,
        /// The time used for the check.
        now: u64,
    },
    /// The manifest or snapshot claims to be issued in the future beyond the allowed skew.
    #[error(
        "check 5 (freshness): {kind} is issued at {issued_at}, ahead of now ({now}) by more than \
         the allowed clock skew"
    )]
    IssuedInFuture {
        /// `manifest` or `snapshot`.
        kind: &'static str,
        /// Claimed issue time.
        issued_at: u64,
        /// The time used for the check.
        now: u64,
    },
    /// The snapshot is past its expiry: the agent's view of the server may be frozen.
    #[error("check 5 (freshness): snapshot is stale: it expired at {expires_at}, now is {now}")]
    SnapshotStale {
        /// When it expired.
        expires_at: u64,
        /// The time used for the check.
        now: u64,
    },
    /// The snapshot's revision is below one already seen: an old view is being replayed.
    #[error(
        "check 5 (freshness): snapshot revision {revision} is older than the last accepted \
         revision {last}"
    )]
    SnapshotRolledBack {
        /// The refused revision.
        revision: u64,
        /// The last accepted revision.
        last: u64,
    },
    /// The snapshot lists more manifests than the limit.
    #[error("check 1 (envelope): snapshot lists {count} manifests, over the limit of {max}")]
    SnapshotTooLarge {
        /// Entries listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The latest snapshot does not list this container.
    #[error("check 5 (freshness): the latest snapshot does not list container {0}")]
    NotInSnapshot(ContainerId),
    /// The latest snapshot lists this container with another generation or digest.
    #[error(
        "check 5 (freshness): the latest snapshot lists container {container} at generation \
         {listed_generation} with digest {listed_digest}, not generation {generation} with \
         digest {digest}"
    )]
    SnapshotMismatch {
        /// The container.
        container: ContainerId,
        /// Generation the snapshot lists.
        listed_generation: u64,
        /// Digest the snapshot lists.
        listed_digest: Sha256Digest,
        /// Generation of the refused manifest.
        generation: u64,
        /// Digest of the refused manifest.
        digest: Sha256Digest,
    },
    /// A previously accepted manifest, loaded back, is not the one recorded.
    #[error("accepted manifest for container {0} does not match its recorded digest")]
    AcceptedDigestMismatch(ContainerId),
    /// A file path or mode breaks the rules.
    #[error("check 6 (files): {0}")]
    Path(PathError),
    /// Two files have the same path.
    #[error("check 6 (files): path {0} appears more than once")]
    DuplicatePath(SafePath),
    /// Too many files.
    #[error("check 6 (files): manifest has {count} files, over the limit of {max}")]
    TooManyFiles {
        /// Files listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A file is larger than the limit.
    #[error("check 6 (files): file {path} is {size} bytes, over the limit of {max}")]
    FileTooLarge {
        /// The file.
        path: SafePath,
        /// Its declared size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Fetched content does not match the signed size and digest.
    #[error("check 6 (files): content fetched for {0} does not match its signed size and digest")]
    FileContentMismatch(SafePath),
    /// A run setting is malformed (for example an environment variable name).
    #[error("check 1 (envelope): run settings are invalid: {0}")]
    RunSettings(String),
}

/// Everything verification depends on besides the input and the time.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Accepted manifest signing keys.
    pub trust_root: TrustRoot,
    /// This agent's node id.
    pub node: NodeId,
    /// Size limits.
    pub limits: Limits,
    /// Where files may be injected.
    pub path_rules: PathRules,
    /// Allowed clock difference with the server, in seconds.
    pub max_clock_skew: u64,
}

/// A snapshot that passed checks 1, 2, 3 and 5.
#[derive(Debug, Clone)]
pub struct VerifiedSnapshot {
    snapshot: NodeSnapshot,
}

impl VerifiedSnapshot {
    /// The verified snapshot.
    pub fn snapshot(&self) -> &NodeSnapshot {
        &self.snapshot
    }

    /// The entry for `container`, if listed.
    pub fn entry(&self, container: &ContainerId) -> Option<&SnapshotEntry> {
        self.snapshot
            .manifests
            .iter()
            .find(|e| e.container_id == *container)
    }
}

/// A manifest that passed checks 1 to 6 (file contents are checked one by one with
/// [`VerifiedManifest::verify_file`]).
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    manifest: Manifest,
    digest: Sha256Digest,
    envelope: Vec<u8>,
}

impl VerifiedManifest {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the payload bytes.
    pub fn digest(&self) -> Sha256Digest {
        self.digest
    }

    /// The envelope exactly as received, for storing and re-verifying later.
    pub fn envelope(&self) -> &[u8] {
        &self.envelope
    }

    /// Checks fetched content against file entry `index`: size and SHA-256 must match.
    pub fn verify_file(
        &self,
        index: usize,
        content: SecretBytes,
    ) -> Result<VerifiedFile, VerifyError> {
        let entry = self.manifest.files.get(index).ok_or_else(|| {
            VerifyError::Path(PathError::NotAbsolute(format!(
                "no file #{index} in manifest"
            )))
        })?;
        if content.len() as u64 != entry.size || Sha256Digest::of(content.expose()) != entry.sha256
        {
            return Err(VerifyError::FileContentMismatch(entry.path.clone()));
        }
        Ok(VerifiedFile {
            path: entry.path.clone(),
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            content,
        })
    }
}

/// File content that matches its signed digest.
#[derive(Debug)]
pub struct VerifiedFile {
    path: SafePath,
    mode: FileMode,
    uid: u32,
    gid: u32,
    content: SecretBytes,
}

impl VerifiedFile {
    /// Destination path.
    pub fn path(&self) -> &SafePath {
        &self.path
    }
    /// Permission bits.
    pub fn mode(&self) -> FileMode {
        self.mode
    }
    /// Owner user id.
    pub fn uid(&self) -> u32 {
        self.uid
    }
    /// Owner group id.
    pub fn gid(&self) -> u32 {
        self.gid
    }
    /// The content (zeroized on drop).
    pub fn content(&self) -> &SecretBytes {
        &self.content
    }
}

impl Verifier {
    /// Checks 1 (envelope) and 2 (signature), then parses the signed payload bytes as received.
    fn open<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
        payload_type: &'static str,
        kind: &'static str,
    ) -> Result<(T, Vec<u8>), VerifyError> {
        let envelope = Envelope::decode(bytes, &self.limits).map_err(VerifyError::Envelope)?;
        if envelope.payload_type != payload_type {
            return Err(VerifyError::PayloadType {
                expected: payload_type,
                found: envelope.payload_type.chars().take(80).collect(),
            });
        }
        self.trust_root
            .verify(&envelope)
            .map_err(VerifyError::Signature)?;
        let parsed =
            serde_json::from_slice(&envelope.payload).map_err(|e| VerifyError::Payload {
                kind,
                reason: e.to_string(),
            })?;
        Ok((parsed, envelope.payload))
    }

    /// Verifies a node snapshot. `last_revision` is the highest snapshot revision accepted
    /// before (persisted by the agent), if any.
    pub fn snapshot(
        &self,
        bytes: &[u8],
        now: u64,
        last_revision: Option<u64>,
    ) -> Result<VerifiedSnapshot, VerifyError> {
        let (snapshot, _): (NodeSnapshot, _) =
            self.open(bytes, SNAPSHOT_PAYLOAD_TYPE, "snapshot")?;
        if snapshot.manifests.len() > self.limits.max_snapshot_entries {
            return Err(VerifyError::SnapshotTooLarge {
                count: snapshot.manifests.len(),
                max: self.limits.max_snapshot_entries,
            });
        }
        if snapshot.node != self.node {
            return Err(VerifyError::WrongNode {
                kind: "snapshot",
                expected: self.node.clone(),
                found: snapshot.node,
            });
        }
        if snapshot.issued_at > now.saturating_add(self.max_clock_skew) {
            return Err(VerifyError::IssuedInFuture {
                kind: "snapshot",
                issued_at: snapshot.issued_at,
                now,
            });
        }
        if now >= snapshot.expires_at.saturating_add(self.max_clock_skew) {
            return Err(VerifyError::SnapshotStale {
                expires_at: snapshot.expires_at,
                now,
            });
        }
        if let Some(last) = last_revision
            && snapshot.revision < last
        {
            return Err(VerifyError::SnapshotRolledBack {
                revision: snapshot.revision,
                last,
            });
        }
        Ok(VerifiedSnapshot { snapshot })
    }

    /// Verifies a manifest against the high-water mark of its container (`None` when the agent
    /// has never accepted a generation for it) and the latest verified snapshot.
    pub fn manifest(
        &self,
        bytes: &[u8],
        now: u64,
        high_water: Option<u64>,
        snapshot: &VerifiedSnapshot,
    ) -> Result<VerifiedManifest, VerifyError> {
        let (manifest, payload): (Manifest, _) =
            self.open(bytes, MANIFEST_PAYLOAD_TYPE, "manifest")?;
        let digest = Sha256Digest::of(&payload);
        self.check_node_and_content(&manifest)?;

        // Check 4: generation.
        if let Some(mark) = high_water
            && manifest.generation <= mark
        {
            return Err(VerifyError::GenerationNotAbove {
                container: manifest.container_id.clone(),
                generation: manifest.generation,
                mark,
            });
        }

        // Check 5: the manifest is valid now and the latest fresh snapshot names it.
        if manifest.issued_at > now.saturating_add(self.max_clock_skew) {
            return Err(VerifyError::IssuedInFuture {
                kind: "manifest",
                issued_at: manifest.issued_at,
                now,
            });
        }
        if now >= manifest.expires_at.saturating_add(self.max_clock_skew) {
            return Err(VerifyError::Expired {
                expires_at: manifest.expires_at,
                now,
            });
        }
        let listed = snapshot.snapshot();
        if now >= listed.expires_at.saturating_add(self.max_clock_skew) {
            return Err(VerifyError::SnapshotStale {
                expires_at: listed.expires_at,
                now,
            });
        }
        let entry = snapshot
            .entry(&manifest.container_id)
            .ok_or_else(|| VerifyError::NotInSnapshot(manifest.container_id.clone()))?;
        if entry.generation != manifest.generation || entry.digest != digest {
            return Err(VerifyError::SnapshotMismatch {
                container: manifest.container_id.clone(),
                listed_generation: entry.generation,
                listed_digest: entry.digest,
                generation: manifest.generation,
                digest,
            });
        }

        Ok(VerifiedManifest {
            manifest,
            digest,
            envelope: bytes.to_vec(),
        })
    }

    /// Re-verifies a manifest this agent accepted earlier and stored, after a restart.
    ///
    /// Checks 1, 2, 3 and 6 run again and the payload digest must equal the recorded one;
    /// generation and freshness were checked when it was first accepted and are not repeated,
    /// so an accepted manifest stays usable for reconciling after it expires.
    pub fn accepted_manifest(
        &self,
        bytes: &[u8],
        recorded: Sha256Digest,
    ) -> Result<VerifiedManifest, VerifyError> {
        let (manifest, payload): (Manifest, _) =
            self.open(bytes, MANIFEST_PAYLOAD_TYPE, "manifest")?;
        let digest = Sha256Digest::of(&payload);
        if digest != recorded {
            return Err(VerifyError::AcceptedDigestMismatch(manifest.container_id));
        }
        self.check_node_and_content(&manifest)?;
        Ok(VerifiedManifest {
            manifest,
            digest,
            envelope: bytes.to_vec(),
        })
    }

    /// Check 3 (node) and check 6 (file list), plus run-setting sanity.
    fn check_node_and_content(&self, manifest: &Manifest) -> Result<(), VerifyError> {
        if manifest.node != self.node {
            return Err(VerifyError::WrongNode {
                kind: "manifest",
                expected: self.node.clone(),
                found: manifest.node.clone(),
            });
        }
        check_files(&manifest.files, &self.path_rules, &self.limits)?;
        if let Some(bad) = manifest.run.env.iter().find(|v| !v.is_valid()) {
            let name: String = bad.name.chars().take(40).collect();
            return Err(VerifyError::RunSettings(format!(
                "bad environment variable {name:?}"
            )));
        }
        Ok(())
    }
}

/// Check 6 on the file list: count, sizes, paths under the rules, no duplicates.
pub fn check_files(
    files: &[FileEntry],
    rules: &PathRules,
    limits: &Limits,
) -> Result<(), VerifyError> {
    if files.len() > limits.max_files {
        return Err(VerifyError::TooManyFiles {
            count: files.len(),
            max: limits.max_files,
        });
    }
    let mut seen = HashSet::new();
    for file in files {
        rules.check_safe(&file.path).map_err(VerifyError::Path)?;
        if file.size > limits.max_file_bytes {
            return Err(VerifyError::FileTooLarge {
                path: file.path.clone(),
                size: file.size,
                max: limits.max_file_bytes,
            });
        }
        if !seen.insert(&file.path) {
            return Err(VerifyError::DuplicatePath(file.path.clone()));
        }
    }
    Ok(())
}
