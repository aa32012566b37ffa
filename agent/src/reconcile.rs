//! Reconcile: make the engine's objects for this node match the verified desired state.
//!
//! Idempotent: every pass starts from what the engine actually has (objects labelled with this
//! node) and what the verified manifests want, so after a crash at any point the next pass
//! converges. For each container of the latest snapshot:
//!
//! - run, and a container with this generation and digest is running: if a previous
//!   generation is still around (a replacement was interrupted), the new one must first pass
//!   the health wait; then leftovers are removed and `applied` is reported once.
//! - run, otherwise: check the base image (check 7), fetch and verify the files, build, stop the
//!   previous container, start the new one, and keep it only if it stays running for the health
//!   wait; else remove it and start the previous one again.
//! - destroy: remove containers (with anonymous volumes) and every image of theirs,
//!   intermediate ones included, check nothing labelled remains, report the wipe.
//! - held: the snapshot lists a generation the agent has not accepted (refused, or not yet
//!   received); what runs is kept as it is and nothing is built.
//!
//! Objects of containers the snapshot does not list are wiped. Failures are reported with their
//! reason and retried with exponential backoff per container.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use keyward_common::api::{ContainerReport, Outcome};
use keyward_common::client::ApiClient;
use keyward_common::ids::ContainerId;
use keyward_common::manifest::Action;
use keyward_common::secret::SecretBytes;
use keyward_common::verify::{VerifiedFile, VerifiedManifest};
use tracing::Instrument as _;

use crate::docker::{Engine, EngineError, ManagedContainer, Objects};
use crate::failpoint;

/// First retry delay after a failed apply; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest retry delay.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// A failed attempt at one generation.
#[derive(Debug, Clone)]
struct Failure {
    generation: u64,
    next_try: Instant,
    delay: Duration,
}

/// Why applying failed: refused (a check failed; retrying will not help until something
/// changes) or failed (Docker or the container; worth retrying).
enum ApplyError {
    Refused(String),
    Failed(String),
}

impl From<EngineError> for ApplyError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::BaseImageMissing(_) => ApplyError::Refused(err.to_string()),
            other => ApplyError::Failed(other.to_string()),
        }
    }
}

/// What the agent wants for one container in this pass.
#[derive(Debug)]
pub enum Want<'a> {
    /// Apply this verified manifest: the latest snapshot lists exactly it.
    Apply(&'a VerifiedManifest),
    /// The snapshot lists a generation the agent does not hold; keep what runs, build nothing.
    Hold,
}

/// Reconcile state kept between passes: retry backoff and what was already reported.
#[derive(Debug)]
pub struct Reconciler {
    engine: Engine,
    health_wait: Duration,
    failures: HashMap<ContainerId, Failure>,
    reported: HashMap<String, (u64, &'static str)>,
}

impl Reconciler {
    /// A reconciler for `engine`.
    pub fn new(engine: Engine, health_wait: Duration) -> Self {
        Self {
            engine,
            health_wait,
            failures: HashMap::new(),
            reported: HashMap::new(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn report(
        &mut self,
        container: &str,
        generation: u64,
        outcome: Outcome,
    ) -> Option<ContainerReport> {
        let kind = match &outcome {
            Outcome::Applied => "applied",
            Outcome::Failed { .. } => "failed",
            Outcome::Refused { .. } => "refused",
            Outcome::Wiped { .. } => "wiped",
        };
        // Failures are always reported (their reason may change); successes once.
        if matches!(kind, "applied" | "wiped")
            && self.reported.get(container) == Some(&(generation, kind))
        {
            return None;
        }
        self.reported
            .insert(container.to_string(), (generation, kind));
        Some(ContainerReport {
            container_id: container.parse().ok(),
            generation: Some(generation),
            outcome,
        })
    }

    /// One pass over the containers of the latest snapshot. Returns what to report.
    pub async fn reconcile(
        &mut self,
        wants: &BTreeMap<ContainerId, Want<'_>>,
        client: &ApiClient,
    ) -> Result<Vec<ContainerReport>, EngineError> {
        let objects = self.engine.objects(None).await?;
        let mut reports = Vec::new();

        for (id, want) in wants {
            let Want::Apply(verified) = want else {
                continue;
            };
            let manifest = verified.manifest();
            let span =
                tracing::info_span!("reconcile", container = %id, generation = manifest.generation);
            let report = match manifest.action {
                Action::Destroy => {
                    self.wipe(id.as_str(), manifest.generation, objects.of(id.as_str()))
                        .instrument(span)
                        .await
                }
                Action::Run => {
                    self.run(id, verified, &objects, client)
                        .instrument(span)
                        .await
                }
            };
            reports.extend(report);
        }

        // Objects of containers the snapshot does not list: wipe them.
        let listed: BTreeSet<&str> = wants.keys().map(ContainerId::as_str).collect();
        let strays: BTreeSet<String> = objects
            .containers
            .iter()
            .map(|c| c.container.clone())
            .chain(objects.images.iter().map(|i| i.container.clone()))
            .filter(|c| !listed.contains(c.as_str()))
            .collect();
        for stray in strays {
            let generation = objects
                .containers
                .iter()
                .filter(|c| c.container == stray)
                .map(|c| c.generation)
                .max()
                .unwrap_or(0);
            tracing::info!(container = %stray, "removing objects no manifest wants");
            reports.extend(self.wipe(&stray, generation, objects.of(&stray)).await);
        }
        Ok(reports)
    }

    async fn run(
        &mut self,
        id: &ContainerId,
        verified: &VerifiedManifest,
        objects: &Objects,
        client: &ApiClient,
    ) -> Option<ContainerReport> {
        let manifest = verified.manifest();
        let digest = verified.digest().to_hex();
        let mine: Vec<&ManagedContainer> = objects
            .containers
            .iter()
            .filter(|c| c.container == id.as_str())
            .collect();
        let current = mine
            .iter()
            .find(|c| c.generation == manifest.generation && c.digest == digest)
            .copied();
        let previous = previous_generation(&mine, manifest.generation);

        if let Some(current) = current {
            let checked = if !current.running {
                // Stopped (expiry policy, host reboot, crash): start it again.
                self.start_checked(&current.id).await
            } else if previous.is_some() {
                // A replacement was interrupted after the start: finish its health check.
                self.engine
                    .stays_running(&current.id, self.health_wait)
                    .await
            } else {
                Ok(())
            };
            match checked {
                Ok(()) => {
                    if let Err(e) = self.remove_others(id, Some(current)).await {
                        tracing::warn!(error = %e, "removing leftovers failed; will retry");
                    }
                    self.failures.remove(id);
                    return self.report(id.as_str(), manifest.generation, Outcome::Applied);
                }
                Err(reason) => {
                    let outcome = Outcome::Failed {
                        reason: self.roll_back(id, previous, &reason).await,
                    };
                    self.note_failure(id, manifest.generation);
                    return self.report(id.as_str(), manifest.generation, outcome);
                }
            }
        }

        if let Some(failure) = self.failures.get(id)
            && failure.generation == manifest.generation
            && Instant::now() < failure.next_try
        {
            return None;
        }
        self.apply(id, verified, previous, client).await
    }

    async fn start_checked(&self, id: &str) -> Result<(), String> {
        self.engine.start(id).await.map_err(|e| e.to_string())?;
        self.engine.stays_running(id, self.health_wait).await
    }

    /// Builds and starts a generation, keeping or restoring the previous one on failure.
    async fn apply(
        &mut self,
        id: &ContainerId,
        verified: &VerifiedManifest,
        previous: Option<&ManagedContainer>,
        client: &ApiClient,
    ) -> Option<ContainerReport> {
        let generation = verified.manifest().generation;
        let outcome = match self.try_apply(id, verified, previous, client).await {
            Ok(()) => {
                self.failures.remove(id);
                tracing::info!("generation applied");
                Outcome::Applied
            }
            Err(ApplyError::Refused(reason)) => {
                self.note_failure(id, generation);
                tracing::warn!(%reason, "manifest refused");
                Outcome::Refused { reason }
            }
            Err(ApplyError::Failed(reason)) => {
                self.note_failure(id, generation);
                tracing::warn!(%reason, "applying failed");
                Outcome::Failed { reason }
            }
        };
        self.report(id.as_str(), generation, outcome)
    }

    fn note_failure(&mut self, id: &ContainerId, generation: u64) {
        let delay = match self.failures.get(id) {
            Some(f) if f.generation == generation => (f.delay * 2).min(MAX_RETRY),
            _ => FIRST_RETRY,
        };
        self.failures.insert(
            id.clone(),
            Failure {
                generation,
                next_try: Instant::now() + delay,
                delay,
            },
        );
    }

    async fn try_apply(
        &self,
        id: &ContainerId,
        verified: &VerifiedManifest,
        previous: Option<&ManagedContainer>,
        client: &ApiClient,
    ) -> Result<(), ApplyError> {
        let manifest = verified.manifest();
        let digest = verified.digest().to_hex();

        // Check 7, then the files (check 6 on their content).
        let started_at = Instant::now();
        self.engine.check_base_image(&manifest.image.id).await?;
        let files = fetch_files(verified, client).await?;
        let fetched = started_at.elapsed();

        let image = self.engine.build(manifest, &digest, &files).await?;
        drop(files);
        let built = started_at.elapsed();
        failpoint::hit("after-build");

        // Replace: stop the previous container, start the new one, keep it if it stays up.
        if let Some(old) = previous.filter(|c| c.running) {
            self.engine.stop(&old.id).await?;
        }
        let stopped = started_at.elapsed();
        let created = self
            .engine
            .create_and_start(manifest, &digest, &image)
            .await;
        let running = started_at.elapsed();
        tracing::debug!(
            fetch_ms = fetched.as_millis() as u64,
            build_ms = (built - fetched).as_millis() as u64,
            stop_old_ms = (stopped - built).as_millis() as u64,
            start_ms = (running - stopped).as_millis() as u64,
            "container started; checking it stays up"
        );
        let started = match created {
            Ok(new) => self.engine.stays_running(&new, self.health_wait).await,
            Err(e) => Err(e.to_string()),
        };
        match started {
            Ok(()) => {
                let objects = self
                    .engine
                    .objects(Some(id))
                    .await
                    .map_err(ApplyError::from)?;
                let new = objects
                    .containers
                    .iter()
                    .find(|c| c.generation == manifest.generation && c.digest == digest);
                if let Err(e) = self.remove_others(id, new).await {
                    tracing::warn!(
                        error = %e,
                        "removing the previous generation failed; will retry",
                    );
                }
                Ok(())
            }
            Err(reason) => Err(ApplyError::Failed(
                self.roll_back(id, previous, &reason).await,
            )),
        }
    }

    /// After a failed generation: removes everything of `id` but the previous generation's
    /// container and image, and starts the previous container again if it was running.
    /// Returns the reason to report.
    async fn roll_back(
        &self,
        id: &ContainerId,
        previous: Option<&ManagedContainer>,
        reason: &str,
    ) -> String {
        if let Err(e) = self.remove_others(id, previous).await {
            tracing::warn!(error = %e, "removing the failed generation failed; will retry");
        }
        match previous {
            Some(old) if old.running => match self.engine.start(&old.id).await {
                Ok(()) => format!("{reason}; previous generation restored"),
                Err(e) => format!("{reason}; restarting the previous generation failed: {e}"),
            },
            Some(_) => format!("{reason}; previous generation kept (it was not running)"),
            None => format!("{reason}; no previous generation to keep"),
        }
    }

    /// Removes every object of keyward container `id` except `keep` and the images it runs on.
    async fn remove_others(
        &self,
        id: &ContainerId,
        keep: Option<&ManagedContainer>,
    ) -> Result<(), EngineError> {
        let objects = self.engine.objects(Some(id)).await?;
        for c in objects
            .containers
            .iter()
            .filter(|c| Some(c.id.as_str()) != keep.map(|k| k.id.as_str()))
        {
            self.engine.remove_container(&c.id).await?;
        }
        let keep_images = match keep {
            Some(k) => self.engine.lineage(&k.image).await?,
            None => Vec::new(),
        };
        let images: Vec<String> = objects.images.iter().map(|i| i.id.clone()).collect();
        self.engine.remove_images(&images, &keep_images).await?;
        Ok(())
    }

    /// Removes every object of keyward container `id` and checks that none remains. `found` is
    /// what this pass already listed for it (saving the engine a second listing).
    async fn wipe(&mut self, id: &str, generation: u64, found: Objects) -> Option<ContainerReport> {
        let nothing_left = found.containers.is_empty() && found.images.is_empty();
        if nothing_left && self.reported.get(id) == Some(&(generation, "wiped")) {
            // Already wiped and reported, and nothing came back.
            return None;
        }
        let outcome = match self.try_wipe(id, found).await {
            Ok(removed) => {
                tracing::info!(container = id, removed = removed.len(), "container wiped");
                Outcome::Wiped { removed }
            }
            Err(reason) => {
                tracing::warn!(container = id, %reason, "wipe failed; will retry");
                Outcome::Failed { reason }
            }
        };
        self.report(id, generation, outcome)
    }

    async fn try_wipe(&self, id: &str, found: Objects) -> Result<Vec<String>, String> {
        let cid: ContainerId = id
            .parse()
            .map_err(|e: keyward_common::ids::IdError| e.to_string())?;
        let mut removed = Vec::new();
        for c in &found.containers {
            self.engine
                .remove_container(&c.id)
                .await
                .map_err(|e| e.to_string())?;
            removed.push(c.id.clone());
        }
        failpoint::hit("during-destroy");
        let images: Vec<String> = found.images.iter().map(|i| i.id.clone()).collect();
        removed.extend(
            self.engine
                .remove_images(&images, &[])
                .await
                .map_err(|e| e.to_string())?,
        );

        // The classic builder keeps no build cache beyond the intermediate images removed above
        // (they carry the same labels); check through the engine that nothing with the labels
        // is left.
        let left = self
            .engine
            .objects(Some(&cid))
            .await
            .map_err(|e| e.to_string())?;
        if !left.containers.is_empty() || !left.images.is_empty() {
            return Err(format!(
                "objects remain after the wipe: {} container(s), {} image(s)",
                left.containers.len(),
                left.images.len()
            ));
        }
        removed.sort();
        removed.dedup();
        Ok(removed)
    }

    /// Stops every container of this node (expiry policy `stop`).
    pub async fn stop_all(&self) -> Result<(), EngineError> {
        for c in self.engine.objects(None).await?.containers {
            self.engine.stop(&c.id).await?;
        }
        Ok(())
    }

    /// Wipes every object of this node (expiry policy `wipe`). The desired state is kept, so the
    /// containers are rebuilt once the server is back.
    pub async fn wipe_all(&mut self) -> Result<(), EngineError> {
        let objects = self.engine.objects(None).await?;
        let ids: BTreeSet<String> = objects
            .containers
            .iter()
            .map(|c| c.container.clone())
            .chain(objects.images.iter().map(|i| i.container.clone()))
            .collect();
        for id in ids {
            if let Err(reason) = self.try_wipe(&id, objects.of(&id)).await {
                tracing::warn!(container = %id, %reason, "wipe on expiry failed");
            }
            self.reported.remove(&id);
        }
        Ok(())
    }
}

/// The container of the newest generation below `generation`, running or not: what a failed
/// new generation falls back to.
fn previous_generation<'a>(
    mine: &[&'a ManagedContainer],
    generation: u64,
) -> Option<&'a ManagedContainer> {
    mine.iter()
        .copied()
        .filter(|c| c.generation < generation)
        .max_by_key(|c| c.generation)
}

/// Fetches every file of the manifest and checks each against its signed digest.
async fn fetch_files(
    verified: &VerifiedManifest,
    client: &ApiClient,
) -> Result<Vec<VerifiedFile>, ApplyError> {
    let manifest = verified.manifest();
    let mut files = Vec::with_capacity(manifest.files.len());
    for idx in 0..manifest.files.len() {
        let path = format!(
            "/v1/node/files/{}/{}/{idx}",
            manifest.container_id, manifest.generation
        );
        let response = client
            .send(hyper::Method::GET, &path, None)
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| ApplyError::Failed(format!("fetching file {idx}: {e}")))?;
        let content = SecretBytes::new(response.body.to_vec());
        let file = verified
            .verify_file(idx, content)
            .map_err(|e| ApplyError::Refused(e.to_string()))?;
        files.push(file);
    }
    Ok(files)
}
