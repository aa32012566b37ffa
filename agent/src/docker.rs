//! The Docker Engine, through bollard: only the calls reconcile needs, scoped to objects
//! labelled with this node's id so several agents can share one engine.
//!
//! Builds use the classic builder with an in-memory tar context: no temporary files, files
//! carrying the signed mode and owner in their tar headers, `pull=false`, no build cache reuse,
//! intermediate containers removed even on failure (`forcerm`).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    BuildInfo, ContainerCreateBody, HostConfig, ImageId as BuildImageId, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, BuilderVersion, CreateContainerOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptions, ListImagesOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, StopContainerOptionsBuilder,
};
use bytes::Bytes;
use futures_util::StreamExt as _;
use keyward_common::api::LocalImage;
use keyward_common::ids::{ContainerId, ImageId, NodeId};
use keyward_common::manifest::Manifest;
use keyward_common::verify::VerifiedFile;
use zeroize::Zeroize as _;

/// Label naming the node that owns an object.
pub const LABEL_NODE: &str = "io.keyward.node";
/// Label naming the keyward container id.
pub const LABEL_CONTAINER: &str = "io.keyward.container";
/// Label with the generation.
pub const LABEL_GENERATION: &str = "io.keyward.generation";
/// Label with the manifest digest.
pub const LABEL_DIGEST: &str = "io.keyward.digest";

/// Seconds a container gets to stop before it is killed.
const STOP_GRACE_SECS: i32 = 5;

/// Why a Docker operation failed. Messages never include file contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine could not be reached or answered with an error.
    #[error("docker: {0}")]
    Docker(String),
    /// The build failed.
    #[error("image build failed: {0}")]
    Build(String),
    /// Check 7: the signed base image is not on this host.
    #[error(
        "check 7 (base image): image {0} is not present on this host (images are never pulled; \
         build or load it, then the agent retries)"
    )]
    BaseImageMissing(ImageId),
    /// The engine refused because another object depends on this one (HTTP 409).
    #[error("docker: {0}")]
    Conflict(String),
    /// The build context could not be assembled.
    #[error("build context: {0}")]
    Context(String),
}

impl From<DockerError> for EngineError {
    fn from(err: DockerError) -> Self {
        EngineError::Docker(err.to_string())
    }
}

fn status_of(err: &DockerError) -> Option<u16> {
    match err {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// A keyward-managed container on the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    /// Docker container id.
    pub id: String,
    /// keyward container id from its label.
    pub container: String,
    /// Generation from its label.
    pub generation: u64,
    /// Manifest digest from its label.
    pub digest: String,
    /// Docker image id it runs.
    pub image: String,
    /// Whether it is running.
    pub running: bool,
}

/// A keyward-built image on the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedImage {
    /// Docker image id.
    pub id: String,
    /// keyward container id from its label.
    pub container: String,
    /// Generation from its label.
    pub generation: u64,
}

/// Everything this node has on the engine.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// Containers.
    pub containers: Vec<ManagedContainer>,
    /// Images.
    pub images: Vec<ManagedImage>,
}

impl Objects {
    /// The objects of keyward container `id`.
    pub fn of(&self, id: &str) -> Objects {
        Objects {
            containers: self
                .containers
                .iter()
                .filter(|c| c.container == id)
                .cloned()
                .collect(),
            images: self
                .images
                .iter()
                .filter(|i| i.container == id)
                .cloned()
                .collect(),
        }
    }
}

/// Secret bytes handed to the HTTP client as a request body; overwritten when the client drops
/// its last reference.
struct WipeOnDrop(Vec<u8>);

impl AsRef<[u8]> for WipeOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for WipeOnDrop {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// The Docker engine as this node sees it.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    node: NodeId,
}

impl Engine {
    /// Connects to the engine (`DOCKER_HOST`, else the local unix socket) and negotiates the
    /// API version.
    pub async fn connect(node: NodeId) -> Result<Self, EngineError> {
        if std::env::var("DOCKER_HOST").is_ok_and(|v| v.is_empty()) {
            // bollard would report an empty value as an unsupported URI scheme; say it plainly.
            return Err(EngineError::Docker(
                "DOCKER_HOST is set but empty; unset it or give a URI".into(),
            ));
        }
        let docker = Docker::connect_with_defaults()?.with_timeout(Duration::from_secs(300));
        let docker = docker.negotiate_version().await?;
        Ok(Self { docker, node })
    }

    /// Whether the engine answers.
    pub async fn ping(&self) -> Result<(), EngineError> {
        self.docker.ping().await?;
        Ok(())
    }

    /// The engine's data root (for tests and diagnostics).
    pub async fn data_root(&self) -> Result<String, EngineError> {
        Ok(self
            .docker
            .info()
            .await?
            .docker_root_dir
            .unwrap_or_else(|| "/var/lib/docker".into()))
    }

    /// Tagged images on the host, excluding images keyward built: what base images the server
    /// may name.
    pub async fn inventory(&self) -> Result<Vec<LocalImage>, EngineError> {
        let images = self.docker.list_images(None::<ListImagesOptions>).await?;
        let mut out: Vec<LocalImage> = images
            .into_iter()
            .filter(|i| !i.labels.contains_key(LABEL_NODE))
            .filter_map(|i| {
                let id = ImageId::new(i.id).ok()?;
                let mut tags: Vec<String> = i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect();
                tags.sort();
                Some(LocalImage { id, tags })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Check 7: the base image exists locally with exactly the signed id.
    pub async fn check_base_image(&self, id: &ImageId) -> Result<(), EngineError> {
        match self.docker.inspect_image(id.as_str()).await {
            Ok(image) if image.id.as_deref() == Some(id.as_str()) => Ok(()),
            Ok(_) => Err(EngineError::BaseImageMissing(id.clone())),
            Err(e) if status_of(&e) == Some(404) => Err(EngineError::BaseImageMissing(id.clone())),
            Err(e) => Err(e.into()),
        }
    }

    fn labels(&self, manifest: &Manifest, digest: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_NODE.to_string(), self.node.to_string()),
            (
                LABEL_CONTAINER.to_string(),
                manifest.container_id.to_string(),
            ),
            (
                LABEL_GENERATION.to_string(),
                manifest.generation.to_string(),
            ),
            (LABEL_DIGEST.to_string(), digest.to_string()),
        ])
    }

    /// Builds the container's image `FROM` the signed base image id with `files` copied in.
    /// Returns the new image id.
    pub async fn build(
        &self,
        manifest: &Manifest,
        digest: &str,
        files: &[VerifiedFile],
    ) -> Result<String, EngineError> {
        let context = build_context(manifest, &self.labels(manifest, digest), files)?;
        let tag = format!(
            "keyward/{}/{}:g{}",
            self.node, manifest.container_id, manifest.generation
        );
        let options = BuildImageOptionsBuilder::new()
            .dockerfile("Dockerfile")
            .t(&tag)
            .rm(true)
            .forcerm(true)
            .nocache(true)
            .version(BuilderVersion::BuilderV1)
            .build();
        let body = bollard::body_full(Bytes::from_owner(context));
        let mut stream = self.docker.build_image(options, None, Some(body));
        let mut image = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(BuildInfo {
                    aux: Some(BuildImageId { id: Some(id) }),
                    ..
                }) => image = Some(id),
                Ok(_) => {}
                Err(DockerError::DockerStreamError { error }) => {
                    return Err(EngineError::Build(error));
                }
                Err(e) => return Err(EngineError::Build(e.to_string())),
            }
        }
        image.ok_or_else(|| EngineError::Build("the engine reported no image id".into()))
    }

    /// Creates and starts the container for `manifest` from `image`. Returns its Docker id.
    pub async fn create_and_start(
        &self,
        manifest: &Manifest,
        digest: &str,
        image: &str,
    ) -> Result<String, EngineError> {
        let mut exposed = Vec::new();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for port in &manifest.run.ports {
            let key = format!("{}/{}", port.container_port, port.protocol.as_str());
            exposed.push(key.clone());
            bindings
                .entry(key)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: Some(port.host_ip.to_string()),
                    host_port: Some(port.host_port.to_string()),
                });
        }
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: (!manifest.run.command.is_empty()).then(|| manifest.run.command.clone()),
            env: Some(
                manifest
                    .run
                    .env
                    .iter()
                    .map(|v| format!("{}={}", v.name, v.value))
                    .collect(),
            ),
            labels: Some(self.labels(manifest, digest)),
            exposed_ports: Some(exposed),
            host_config: Some(HostConfig {
                port_bindings: Some(bindings),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!(
            "keyward-{}-{}-g{}",
            self.node, manifest.container_name, manifest.generation
        );
        // A leftover of an interrupted attempt may hold the name; it is ours (same labels) or the
        // create fails with a clear conflict.
        self.remove_by_name_if_ours(&name, manifest).await?;
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await?;
        crate::failpoint::hit("after-create");
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove_container(&created.id).await;
            return Err(e.into());
        }
        Ok(created.id)
    }

    async fn remove_by_name_if_ours(
        &self,
        name: &str,
        manifest: &Manifest,
    ) -> Result<(), EngineError> {
        match self.docker.inspect_container(name, None).await {
            Ok(existing) => {
                let labels = existing.config.and_then(|c| c.labels).unwrap_or_default();
                let ours = labels.get(LABEL_NODE) == Some(&self.node.to_string())
                    && labels.get(LABEL_CONTAINER) == Some(&manifest.container_id.to_string());
                if ours && let Some(id) = existing.id {
                    self.remove_container(&id).await?;
                }
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits `wait`, then checks the container is still running and was never restarted.
    pub async fn stays_running(&self, id: &str, wait: Duration) -> Result<(), String> {
        tokio::time::sleep(wait).await;
        let info = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| e.to_string())?;
        let state = info.state.unwrap_or_default();
        let restarts = info.restart_count.unwrap_or(0);
        if state.running.unwrap_or(false) && !state.restarting.unwrap_or(false) && restarts == 0 {
            Ok(())
        } else {
            Err(format!(
                "container did not stay running (exit code {}, restarts {restarts}{})",
                state.exit_code.unwrap_or(0),
                state
                    .error
                    .filter(|e| !e.is_empty())
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default()
            ))
        }
    }

    /// Stops a container (idempotent).
    pub async fn stop(&self, id: &str) -> Result<(), EngineError> {
        match self
            .docker
            .stop_container(
                id,
                Some(
                    StopContainerOptionsBuilder::new()
                        .t(STOP_GRACE_SECS)
                        .build(),
                ),
            )
            .await
        {
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            other => Ok(other?),
        }
    }

    /// Starts a container (idempotent).
    pub async fn start(&self, id: &str) -> Result<(), EngineError> {
        Ok(self.docker.start_container(id, None).await?)
    }

    /// Removes a container with its anonymous volumes (idempotent).
    pub async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            other => Ok(other?),
        }
    }

    /// Removes an image and its untagged parents (idempotent). Returns the ids deleted.
    pub async fn remove_image(&self, id: &str) -> Result<Vec<String>, EngineError> {
        let options = RemoveImageOptionsBuilder::new()
            .force(true)
            .noprune(false)
            .build();
        match self.docker.remove_image(id, Some(options), None).await {
            Ok(items) => Ok(items.into_iter().filter_map(|i| i.deleted).collect()),
            Err(e) if status_of(&e) == Some(404) => Ok(Vec::new()),
            Err(e) if status_of(&e) == Some(409) => Err(EngineError::Conflict(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists this node's objects, optionally only those of one keyward container. Images
    /// include the intermediate images of builds, which carry the same labels.
    pub async fn objects(&self, container: Option<&ContainerId>) -> Result<Objects, EngineError> {
        self.list(container).await
    }

    /// The ids of `image` and every image it was built on.
    pub async fn lineage(&self, image: &str) -> Result<Vec<String>, EngineError> {
        let history = match self.docker.image_history(image).await {
            Ok(history) => history,
            Err(e) if status_of(&e) == Some(404) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(history
            .into_iter()
            .map(|h| h.id)
            .filter(|id| id.starts_with("sha256:"))
            .collect())
    }

    /// Removes the given images, children before parents, except those in `keep`. Returns
    /// the ids deleted (parents removed along with a child included).
    pub async fn remove_images(
        &self,
        images: &[String],
        keep: &[String],
    ) -> Result<Vec<String>, EngineError> {
        let mut left: Vec<String> = images
            .iter()
            .filter(|i| !keep.contains(i))
            .cloned()
            .collect();
        let mut removed: Vec<String> = Vec::new();
        // A parent refuses removal (409) while a child exists, so conflicts are retried after
        // the others; a pass that removes nothing ends with the engine's error.
        while !left.is_empty() {
            let attempted = left.len();
            let mut conflicts = Vec::new();
            let mut last_error = String::new();
            for image in left {
                if removed.contains(&image) {
                    continue;
                }
                match self.remove_image(&image).await {
                    Ok(deleted) => removed.extend(deleted),
                    Err(EngineError::Conflict(e)) => {
                        conflicts.push(image);
                        last_error = e;
                    }
                    Err(e) => return Err(e),
                }
            }
            if conflicts.len() == attempted {
                return Err(EngineError::Docker(last_error));
            }
            left = conflicts;
        }
        removed.sort();
        removed.dedup();
        Ok(removed)
    }

    async fn list(&self, container: Option<&ContainerId>) -> Result<Objects, EngineError> {
        let mut filter = vec![format!("{LABEL_NODE}={}", self.node)];
        if let Some(c) = container {
            filter.push(format!("{LABEL_CONTAINER}={c}"));
        }
        let filters = HashMap::from([("label".to_string(), filter)]);
        let containers = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                ManagedContainer {
                    id: c.id.unwrap_or_default(),
                    container: labels.get(LABEL_CONTAINER).cloned().unwrap_or_default(),
                    generation: labels
                        .get(LABEL_GENERATION)
                        .and_then(|g| g.parse().ok())
                        .unwrap_or(0),
                    digest: labels.get(LABEL_DIGEST).cloned().unwrap_or_default(),
                    image: c.image_id.unwrap_or_default(),
                    running: c.state.map(|s| s.to_string() == "running").unwrap_or(false),
                }
            })
            .collect();
        let images = self
            .docker
            .list_images(Some(
                ListImagesOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?
            .into_iter()
            .map(|i| ManagedImage {
                container: i.labels.get(LABEL_CONTAINER).cloned().unwrap_or_default(),
                generation: i
                    .labels
                    .get(LABEL_GENERATION)
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(0),
                id: i.id,
            })
            .collect();
        Ok(Objects { containers, images })
    }
}

/// A Dockerfile string literal (JSON quoting is valid there).
fn quote(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into())
}

/// Name of the archive of injected files inside the build context.
const FILES_ARCHIVE: &str = "files.tar";

/// One tar entry: name, content, mode, uid, gid.
type Entry<'a> = (&'a str, &'a [u8], u32, u64, u64);

/// Writes `entries` as a tar archive into a buffer sized up front, so the buffer holding
/// secret bytes is never reallocated (a reallocation would free a copy without overwriting it).
fn archive(entries: &[Entry<'_>]) -> Result<WipeOnDrop, EngineError> {
    let capacity = entries
        .iter()
        .map(|(name, data, ..)| 1536 + name.len() + data.len())
        .sum::<usize>()
        + 2048;
    let mut builder = tar::Builder::new(Vec::with_capacity(capacity));
    for (name, data, mode, uid, gid) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_uid(*uid);
        header.set_gid(*gid);
        header.set_mtime(0);
        builder
            .append_data(&mut header, name, *data)
            .map_err(|e| EngineError::Context(e.to_string()))?;
    }
    builder
        .into_inner()
        .map(WipeOnDrop)
        .map_err(|e| EngineError::Context(e.to_string()))
}

/// The build context: a Dockerfile `FROM` the signed image id that labels the image and `ADD`s an
/// inner archive of the injected files to `/`.
///
/// `ADD` of a local archive extracts each entry with the mode, uid and gid of its tar header and
/// creates missing parent directories (0755, root) without touching existing ones, in a single
/// layer. (One `COPY` per file would cost a layer each and reset owners to root.)
fn build_context(
    manifest: &Manifest,
    labels: &HashMap<String, String>,
    files: &[VerifiedFile],
) -> Result<WipeOnDrop, EngineError> {
    // The labels come first, so every image of the build, the intermediate one holding the files
    // included, carries them: an interrupted build leaves nothing the agent cannot find.
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
        .collect();
    pairs.sort();
    let mut dockerfile = format!("FROM {}\nLABEL {}\n", manifest.image.id, pairs.join(" "));
    let inner = if files.is_empty() {
        None
    } else {
        dockerfile.push_str(&format!("ADD [\"{FILES_ARCHIVE}\", \"/\"]\n"));
        let entries: Vec<Entry<'_>> = files
            .iter()
            .map(|f| {
                // SafePaths are absolute and normalized; the archive holds them relative to `/`.
                let name = f.path().as_str().trim_start_matches('/');
                (
                    name,
                    f.content().expose(),
                    f.mode().bits(),
                    u64::from(f.uid()),
                    u64::from(f.gid()),
                )
            })
            .collect();
        Some(archive(&entries)?)
    };
    let mut outer: Vec<Entry<'_>> = vec![("Dockerfile", dockerfile.as_bytes(), 0o644, 0, 0)];
    if let Some(inner) = &inner {
        outer.push((FILES_ARCHIVE, inner.as_ref(), 0o600, 0, 0));
    }
    archive(&outer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_common::dsse::{
        MANIFEST_PAYLOAD_TYPE, ManifestSigningKey, SNAPSHOT_PAYLOAD_TYPE, TrustRoot,
    };
    use keyward_common::ids::{ContainerName, ImageId, NodeId, Sha256Digest};
    use keyward_common::limits::Limits;
    use keyward_common::manifest::{
        Action, BaseImage, FileEntry, NodeSnapshot, RunSettings, SnapshotEntry,
    };
    use keyward_common::paths::{FileMode, PathRules, SafePath};
    use keyward_common::secret::SecretBytes;
    use keyward_common::verify::Verifier;
    use std::io::Read as _;

    /// Verified files for a manifest with the given (path, mode, uid, content) entries.
    fn verified(files: &[(&str, u32, u32, &[u8])]) -> (Manifest, Vec<VerifiedFile>) {
        let key = ManifestSigningKey::generate();
        let node = NodeId::new("n").unwrap();
        let manifest = Manifest {
            container_id: ContainerId::new("c").unwrap(),
            container_name: ContainerName::new("web").unwrap(),
            node: node.clone(),
            generation: 1,
            revision: 1,
            issued_at: 100,
            expires_at: 10_000,
            action: Action::Run,
            image: BaseImage {
                reference: "x".into(),
                id: ImageId::new(format!("sha256:{}", "a".repeat(64))).unwrap(),
            },
            run: RunSettings::default(),
            files: files
                .iter()
                .map(|(path, mode, uid, content)| FileEntry {
                    path: SafePath::parse(path).unwrap(),
                    mode: FileMode::new(*mode).unwrap(),
                    uid: *uid,
                    gid: *uid,
                    size: content.len() as u64,
                    sha256: Sha256Digest::of(content),
                })
                .collect(),
        };
        let payload = serde_json::to_vec(&manifest).unwrap();
        let digest = Sha256Digest::of(&payload);
        let envelope = key.sign_envelope(MANIFEST_PAYLOAD_TYPE, payload).encode();
        let snapshot = NodeSnapshot {
            node: node.clone(),
            revision: 1,
            issued_at: 100,
            expires_at: 200,
            manifests: vec![SnapshotEntry {
                container_id: manifest.container_id.clone(),
                generation: 1,
                digest,
            }],
        };
        let snapshot = key
            .sign_envelope(
                SNAPSHOT_PAYLOAD_TYPE,
                serde_json::to_vec(&snapshot).unwrap(),
            )
            .encode();
        let verifier = Verifier {
            trust_root: TrustRoot::new([key.verifying_key()]).unwrap(),
            node,
            limits: Limits::default(),
            path_rules: PathRules::default(),
            max_clock_skew: 0,
        };
        let snapshot = verifier.snapshot(&snapshot, 150, None).unwrap();
        let checked = verifier.manifest(&envelope, 150, None, &snapshot).unwrap();
        let files = files
            .iter()
            .enumerate()
            .map(|(i, (_, _, _, content))| {
                checked
                    .verify_file(i, SecretBytes::from(content.to_vec()))
                    .unwrap()
            })
            .collect();
        (manifest, files)
    }

    fn entries(archive: &[u8]) -> Vec<(String, u32, u64, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in tar::Archive::new(archive).entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            let path = entry.path().unwrap().display().to_string();
            out.push((path, header.mode().unwrap(), header.uid().unwrap(), content));
        }
        out
    }

    #[test]
    fn the_context_labels_the_image_first_and_adds_one_archive_with_the_signed_modes_and_owners() {
        let (manifest, files) = verified(&[
            (
                "/root/.ssh/authorized_keys",
                0o400,
                0,
                b"ssh-ed25519 AAAA key\n",
            ),
            ("/home/app/token", 0o440, 1000, b"token"),
        ]);
        let labels = HashMap::from([
            ("io.keyward.node".to_string(), "n".to_string()),
            ("io.keyward.container".to_string(), "c".to_string()),
        ]);
        let context = build_context(&manifest, &labels, &files).unwrap();
        let outer = entries(context.as_ref());
        assert_eq!(outer.len(), 2);
        let dockerfile = String::from_utf8(outer[0].3.clone()).unwrap();
        assert_eq!(
            dockerfile,
            format!(
                "FROM sha256:{}\n\
                 LABEL \"io.keyward.container\"=\"c\" \"io.keyward.node\"=\"n\"\n\
                 ADD [\"files.tar\", \"/\"]\n",
                "a".repeat(64)
            )
        );
        assert_eq!((outer[1].0.as_str(), outer[1].1), ("files.tar", 0o600));
        let inner = entries(&outer[1].3);
        assert_eq!(
            inner,
            vec![
                (
                    "root/.ssh/authorized_keys".to_string(),
                    0o400,
                    0,
                    b"ssh-ed25519 AAAA key\n".to_vec()
                ),
                ("home/app/token".to_string(), 0o440, 1000, b"token".to_vec()),
            ]
        );
    }

    #[test]
    fn a_manifest_without_files_builds_from_the_base_image_with_labels_only() {
        let (manifest, files) = verified(&[]);
        let labels = HashMap::from([("io.keyward.node".to_string(), "n".to_string())]);
        let context = build_context(&manifest, &labels, &files).unwrap();
        let outer = entries(context.as_ref());
        assert_eq!(outer.len(), 1);
        assert_eq!(
            String::from_utf8(outer[0].3.clone()).unwrap(),
            format!(
                "FROM sha256:{}\nLABEL \"io.keyward.node\"=\"n\"\n",
                "a".repeat(64)
            )
        );
    }
}
