//! Reconcile: make the engine's objects for this node match the verified desired state.
//!
//! Idempotent: every pass starts from what the engine actually has (objects labelled with this
//! node) and what the verified manifests want, so after a crash at any point the next pass
//! converges. For each container:
//!
//! - run, and a container with this generation and digest is running: remove leftovers of other
//!   generations; report applied once.
//! - run, otherwise: check the base image (check 7), fetch and verify the files, build, stop the
//!   old container, start the new one, and keep it only if it stays running for the health
//!   wait; else remove it and start the old one again.
//! - destroy: remove containers (with anonymous volumes) and images (with untagged parents),
//!   prune build cache, check nothing labelled remains, report the wipe.
//! - objects of containers no manifest wants are wiped the same way.
//!
//! Failures are reported with their reason and retried with exponential backoff per container.

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

    /// One pass over `desired`. Returns what to report to the server.
    pub async fn reconcile(
        &mut self,
        desired: &BTreeMap<ContainerId, VerifiedManifest>,
        client: &ApiClient,
    ) -> Result<Vec<ContainerReport>, EngineError> {
        let objects = self.engine.objects(None).await?;
        let mut reports = Vec::new();

        for (id, verified) in desired {
            let manifest = verified.manifest();
            let span =
                tracing::info_span!("reconcile", container = %id, generation = manifest.generation);
            let report = match manifest.action {
                Action::Destroy => {
                    self.wipe(id.as_str(), manifest.generation)
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

        // Objects no manifest wants: wipe them.
        let wanted: BTreeSet<&str> = desired.keys().map(ContainerId::as_str).collect();
        let strays: BTreeSet<String> = objects
            .containers
            .iter()
            .map(|c| c.container.clone())
            .chain(objects.images.iter().map(|i| i.container.clone()))
            .filter(|c| !wanted.contains(c.as_str()))
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
            reports.extend(self.wipe(&stray, generation).await);
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
            .find(|c| c.generation == manifest.generation && c.digest == digest);

        if let Some(current) = current {
            if !current.running {
                // Stopped (expiry policy, host reboot, crash): start it again.
                if let Err(e) = self.start_existing(current).await {
                    tracing::warn!(error = %e, "restarting the existing container failed; rebuilding");
                    return self.apply(id, verified, &mine, client).await;
                }
            }
            if let Err(e) = self
                .remove_others(id, Some(&current.id), Some(&current.image))
                .await
            {
                tracing::warn!(error = %e, "removing leftovers failed; will retry");
            }
            self.failures.remove(id);
            return self.report(id.as_str(), manifest.generation, Outcome::Applied);
        }

        if let Some(failure) = self.failures.get(id)
            && failure.generation == manifest.generation
            && Instant::now() < failure.next_try
        {
            return None;
        }
        self.apply(id, verified, &mine, client).await
    }

    async fn start_existing(&self, current: &ManagedContainer) -> Result<(), String> {
        self.engine
            .start(&current.id)
            .await
            .map_err(|e| e.to_string())?;
        self.engine
            .stays_running(&current.id, self.health_wait)
            .await
    }

    /// Builds and starts a generation, keeping or restoring the old container on failure.
    async fn apply(
        &mut self,
        id: &ContainerId,
        verified: &VerifiedManifest,
        mine: &[&ManagedContainer],
        client: &ApiClient,
    ) -> Option<ContainerReport> {
        let generation = verified.manifest().generation;
        let outcome = match self.try_apply(verified, mine, client).await {
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
        verified: &VerifiedManifest,
        mine: &[&ManagedContainer],
        client: &ApiClient,
    ) -> Result<(), ApplyError> {
        let manifest = verified.manifest();
        let digest = verified.digest().to_hex();

        // Check 7, then the files (check 6 on their content).
        let started_at = std::time::Instant::now();
        self.engine.check_base_image(&manifest.image.id).await?;
        let files = fetch_files(verified, client).await?;
        let fetched = started_at.elapsed();

        let image = self.engine.build(manifest, &digest, &files).await?;
        drop(files);
        let built = started_at.elapsed();
        failpoint::hit("after-build");

        // Replace: stop the old container, start the new one, keep it if it stays up.
        let old: Vec<&ManagedContainer> = mine.iter().copied().filter(|c| c.running).collect();
        for c in &old {
            self.engine.stop(&c.id).await?;
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
            Ok(new) => self
                .engine
                .stays_running(&new, self.health_wait)
                .await
                .map(|()| new),
            Err(e) => Err(e.to_string()),
        };
        match started {
            Ok(new) => {
                if let Err(e) = self
                    .remove_others(&manifest.container_id, Some(&new), Some(&image))
                    .await
                {
                    tracing::warn!(error = %e, "removing the previous generation failed; will retry");
                }
                Ok(())
            }
            Err(reason) => {
                // Roll back: drop everything of this generation, start the old one again.
                let keep = old.first().map(|c| (c.id.clone(), c.image.clone()));
                let _ = self
                    .remove_others(
                        &manifest.container_id,
                        keep.as_ref().map(|k| k.0.as_str()),
                        keep.as_ref().map(|k| k.1.as_str()),
                    )
                    .await;
                for c in &old {
                    if let Err(e) = self.engine.start(&c.id).await {
                        tracing::warn!(error = %e, container = %c.id, "restarting the previous generation failed");
                    }
                }
                let restored = if old.is_empty() {
                    "no previous generation to keep"
                } else {
                    "previous generation restored"
                };
                Err(ApplyError::Failed(format!("{reason}; {restored}")))
            }
        }
    }

    /// Removes every object of keyward container `id` except the given container and image.
    async fn remove_others(
        &self,
        id: &ContainerId,
        keep_container: Option<&str>,
        keep_image: Option<&str>,
    ) -> Result<(), EngineError> {
        let objects = self.engine.objects(Some(id)).await?;
        for c in objects
            .containers
            .iter()
            .filter(|c| Some(c.id.as_str()) != keep_container)
        {
            self.engine.remove_container(&c.id).await?;
        }
        for i in objects
            .images
            .iter()
            .filter(|i| Some(i.id.as_str()) != keep_image)
        {
            self.engine.remove_image(&i.id).await?;
        }
        Ok(())
    }

    /// Removes every object of keyward container `id` and checks that none remains.
    async fn wipe(&mut self, id: &str, generation: u64) -> Option<ContainerReport> {
        if self.reported.get(id) == Some(&(generation, "wiped")) {
            // Already wiped and reported; only check nothing came back.
            if self
                .engine
                .objects(id.parse().ok().as_ref())
                .await
                .is_ok_and(|o| o.containers.is_empty() && o.images.is_empty())
            {
                return None;
            }
        }
        let outcome = match self.try_wipe(id).await {
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

    async fn try_wipe(&self, id: &str) -> Result<Vec<String>, String> {
        let cid: ContainerId = id
            .parse()
            .map_err(|e: keyward_common::ids::IdError| e.to_string())?;
        let objects = self
            .engine
            .objects(Some(&cid))
            .await
            .map_err(|e| e.to_string())?;
        let mut removed = Vec::new();
        for c in &objects.containers {
            self.engine
                .remove_container(&c.id)
                .await
                .map_err(|e| e.to_string())?;
            removed.push(c.id.clone());
        }
        failpoint::hit("during-destroy");
        for i in &objects.images {
            let deleted = self
                .engine
                .remove_image(&i.id)
                .await
                .map_err(|e| e.to_string())?;
            removed.extend(deleted);
        }
        self.engine.prune_build_cache().await;
        let left = self
            .engine
            .all_objects(Some(&cid))
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
            if let Err(reason) = self.try_wipe(&id).await {
                tracing::warn!(container = %id, %reason, "wipe on expiry failed");
            }
            self.reported.remove(&id);
        }
        Ok(())
    }
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
