//! The agent's main loop: watch, verify, persist, reconcile, report, renew.
//!
//! Order within one watch answer: the snapshot is verified first; each manifest is verified
//! against its container's persisted high-water mark and that snapshot; accepted manifests are
//! persisted before anything is applied; then reconcile runs and its outcomes are reported. A
//! refused manifest changes nothing on the engine and is reported with the check that failed.
//!
//! When the server cannot be reached, what runs keeps running; requests are retried with
//! exponential backoff and jitter; once the last snapshot has expired, the configured expiry
//! policy (`keep`, `stop`, `wipe`) is applied once.

use std::collections::BTreeMap;
use std::time::Duration;

use keyward_common::api::{ContainerReport, LocalImage, Outcome, StatusReport, WatchResponse};
use keyward_common::client::{ApiClient, ClientError};
use keyward_common::dsse::{Envelope, MANIFEST_PAYLOAD_TYPE};
use keyward_common::ids::{ContainerId, Sha256Digest};
use keyward_common::time::now_unix;
use keyward_common::verify::{VerifiedManifest, VerifiedSnapshot, Verifier, VerifyError};
use rand::Rng as _;
use tokio::sync::watch;

use crate::config::{ExpiryPolicy, RunArgs};
use crate::docker::Engine;
use crate::identity::{self, NodeIdentity};
use crate::reconcile::{Reconciler, Want};
use crate::state::{Mark, Marks, StateDir};

/// Deadline of ordinary requests (fetch, report, renew).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most reports kept for resending while the server is unreachable.
const MAX_PENDING_REPORTS: usize = 500;
/// Backoff bounds for retrying the server or the engine.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The state directory or identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The node was evicted; the agent applies nothing more.
    #[error(
        "this node was evicted by an operator; it applies nothing more. Enroll the host again \
         under a new node id."
    )]
    Evicted,
    /// The settings are invalid.
    #[error("{0}")]
    Config(String),
}

/// Exponential backoff with jitter (each delay drawn from half to the full current bound).
#[derive(Debug)]
struct Backoff {
    current: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            current: BACKOFF_MIN,
        }
    }

    fn next(&mut self) -> Duration {
        let bound = self.current;
        self.current = (self.current * 2).min(BACKOFF_MAX);
        let millis = bound.as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis.max(1)))
    }

    fn reset(&mut self) {
        self.current = BACKOFF_MIN;
    }
}

/// The unverified container id and generation of a manifest envelope, used only to pick the
/// high-water mark to verify against.
fn peek(raw: &[u8], verifier: &Verifier) -> Option<(ContainerId, u64, Sha256Digest)> {
    #[derive(serde::Deserialize)]
    struct Head {
        container_id: ContainerId,
        generation: u64,
    }
    let envelope = Envelope::decode(raw, &verifier.limits).ok()?;
    if envelope.payload_type != MANIFEST_PAYLOAD_TYPE {
        return None;
    }
    let head: Head = serde_json::from_slice(&envelope.payload).ok()?;
    Some((
        head.container_id,
        head.generation,
        Sha256Digest::of(&envelope.payload),
    ))
}

/// The running agent.
pub struct Agent {
    args: RunArgs,
    state: StateDir,
    identity: NodeIdentity,
    client: ApiClient,
    verifier: Verifier,
    marks: Marks,
    desired: BTreeMap<ContainerId, VerifiedManifest>,
    reconciler: Reconciler,
    last_snapshot: Option<VerifiedSnapshot>,
    pending_reports: Vec<ContainerReport>,
    inventory_sent: Option<Vec<LocalImage>>,
    expiry_applied: bool,
    resync: bool,
}

impl Agent {
    /// Loads identity and state and connects to the engine (retrying until it answers or
    /// `shutdown` fires).
    pub async fn start(
        args: RunArgs,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Self>, AgentError> {
        let state = StateDir::new(args.state.clone());
        let identity = NodeIdentity::load(&state)?;
        let marks = state.marks()?;
        if marks.evicted {
            return Err(AgentError::Evicted);
        }
        let verifier = Verifier {
            trust_root: identity.trust_root.clone(),
            node: identity.node.clone(),
            limits: args.limits(),
            path_rules: args
                .path_rules()
                .map_err(|e| AgentError::Config(format!("--allow-prefix: {e}")))?,
            max_clock_skew: args.clock_skew_secs,
        };
        let client = identity.client(REQUEST_TIMEOUT)?;

        let mut backoff = Backoff::new();
        let engine = loop {
            match Engine::connect(identity.node.clone()).await {
                Ok(engine) => match engine.ping().await {
                    Ok(()) => break engine,
                    Err(e) => tracing::warn!(error = %e, "docker engine not answering; retrying"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to the docker engine; retrying")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next()) => {}
                _ = shutdown.changed() => return Ok(None),
            }
        };

        // Manifests accepted before a restart are the desired state until the server says more.
        let mut desired = BTreeMap::new();
        let mut resync = false;
        for (id, mark) in &marks.containers {
            let Some(envelope) = &mark.envelope else {
                continue;
            };
            match verifier.accepted_manifest(envelope.as_bytes(), mark.digest) {
                Ok(verified) => {
                    desired.insert(id.clone(), verified);
                }
                Err(e) => {
                    tracing::error!(
                        container = %id,
                        error = %e,
                        "stored manifest does not verify; asking the server again",
                    );
                    resync = true;
                }
            }
        }
        tracing::info!(
            node = %identity.node,
            server = %identity.server_url,
            containers = desired.len(),
            "agent started",
        );
        let reconciler = Reconciler::new(engine, args.health_wait());
        Ok(Some(Self {
            args,
            state,
            identity,
            client,
            verifier,
            marks,
            desired,
            reconciler,
            last_snapshot: None,
            pending_reports: Vec::new(),
            inventory_sent: None,
            expiry_applied: false,
            resync,
        }))
    }

    /// Runs until `shutdown` fires (the current pass finishes first) or the node is evicted.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let mut backoff = Backoff::new();
        loop {
            if *shutdown.borrow() {
                tracing::info!("agent stopping");
                return Ok(());
            }
            self.renew_if_due().await;

            let since = if self.resync {
                0
            } else {
                self.marks.last_revision.unwrap_or(0)
            };
            let path = format!(
                "/v1/node/watch?since={since}&wait={}",
                self.args.watch_wait_secs
            );
            let deadline = Duration::from_secs(self.args.watch_wait_secs + 15);
            let answer = tokio::select! {
                r = self.client.send_with_timeout(hyper::Method::GET, &path, None, deadline) => {
                    r.and_then(|r| r.json::<WatchResponse>())
                }
                _ = shutdown.changed() => continue,
            };
            match answer {
                Ok(answer) => {
                    backoff.reset();
                    self.handle(answer).await?;
                }
                Err(e) if is_eviction(&e) => {
                    self.marks.evicted = true;
                    self.state.write_marks(&self.marks)?;
                    tracing::error!(error = %e, "the server refused this node as evicted");
                    return Err(AgentError::Evicted);
                }
                Err(e) => {
                    let delay = backoff.next();
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "watch failed",
                    );
                    self.apply_expiry_policy().await;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    async fn renew_if_due(&mut self) {
        if (now_unix() as i64) < self.identity.renew_at() {
            return;
        }
        match identity::renew(&self.state, &self.identity, &self.client).await {
            Ok(renewed) => match renewed.client(REQUEST_TIMEOUT) {
                Ok(client) => {
                    tracing::info!(not_after = renewed.validity.1, "node certificate renewed");
                    self.verifier.trust_root = renewed.trust_root.clone();
                    self.identity = renewed;
                    self.client = client;
                }
                Err(e) => tracing::error!(error = %e, "renewed identity does not load"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "certificate renewal failed; retrying on the next pass")
            }
        }
    }

    /// Handles one watch answer: verify, persist, reconcile, report.
    async fn handle(&mut self, answer: WatchResponse) -> Result<(), AgentError> {
        let now = now_unix();
        let snapshot = match self.verifier.snapshot(
            answer.snapshot.get().as_bytes(),
            now,
            self.marks.last_revision,
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "snapshot refused; nothing applied");
                self.pending_reports.push(ContainerReport {
                    container_id: None,
                    generation: None,
                    outcome: Outcome::Refused {
                        reason: e.to_string(),
                    },
                });
                self.flush_reports().await;
                // Do not hammer a server that keeps sending refused snapshots.
                tokio::time::sleep(BACKOFF_MIN * 5).await;
                return Ok(());
            }
        };
        self.expiry_applied = false;
        self.resync = false;

        let mut delivered = Vec::new();
        for raw in &answer.manifests {
            let bytes = raw.get().as_bytes();
            let head = peek(bytes, &self.verifier);
            if let Some((id, generation, digest)) = &head {
                delivered.push(id.clone());
                let accepted = self
                    .marks
                    .containers
                    .get(id)
                    .is_some_and(|m| m.generation == *generation && m.digest == *digest);
                if accepted {
                    if self.desired.get(id).is_some_and(|d| d.digest() == *digest) {
                        continue;
                    }
                    // Accepted before, but its stored copy did not load at start: take it again
                    // as that same accepted manifest (its digest is the recorded one).
                    match self.verifier.accepted_manifest(bytes, *digest) {
                        Ok(verified) => {
                            if let Some(mark) = self.marks.containers.get_mut(id) {
                                mark.envelope =
                                    Some(String::from_utf8_lossy(verified.envelope()).into_owned());
                            }
                            self.desired.insert(id.clone(), verified);
                        }
                        Err(e) => self.refused(Some(id.clone()), Some(*generation), &e),
                    }
                    continue;
                }
            }
            let mark = head
                .as_ref()
                .and_then(|(id, _, _)| self.marks.containers.get(id))
                .map(|m| m.generation);
            match self.verifier.manifest(bytes, now, mark, &snapshot) {
                Ok(verified) => {
                    let manifest = verified.manifest();
                    tracing::info!(
                        container = %manifest.container_id,
                        generation = manifest.generation,
                        action = ?manifest.action,
                        "manifest accepted",
                    );
                    self.marks.containers.insert(
                        manifest.container_id.clone(),
                        Mark {
                            generation: manifest.generation,
                            digest: verified.digest(),
                            envelope: Some(
                                String::from_utf8_lossy(verified.envelope()).into_owned(),
                            ),
                        },
                    );
                    self.desired.insert(manifest.container_id.clone(), verified);
                }
                Err(e) => self.refused(
                    head.as_ref().map(|h| h.0.clone()),
                    head.as_ref().map(|h| h.1),
                    &e,
                ),
            }
        }

        // Containers the snapshot no longer lists are not wanted any more; their marks stay.
        let listed = &snapshot.snapshot().manifests;
        let gone: Vec<ContainerId> = self
            .desired
            .keys()
            .filter(|id| !listed.iter().any(|e| &e.container_id == *id))
            .cloned()
            .collect();
        for id in gone {
            self.desired.remove(&id);
            if let Some(mark) = self.marks.containers.get_mut(&id) {
                mark.envelope = None;
            }
        }
        // A listed generation this answer did not carry and this agent never saw (its state was
        // lost or restored): ask for everything next time.
        self.resync = listed.iter().any(|entry| {
            let known = self.marks.containers.get(&entry.container_id);
            !delivered.contains(&entry.container_id)
                && known.is_none_or(|m| m.generation < entry.generation)
        });

        self.marks.last_revision = Some(snapshot.snapshot().revision);
        self.marks.snapshot_expires_at = Some(snapshot.snapshot().expires_at);
        self.state.write_marks(&self.marks)?;

        // Apply only what the snapshot lists with exactly this generation and digest; hold the
        // rest (a refused or missing newer generation must not bring back an older one).
        let wants: BTreeMap<ContainerId, Want<'_>> = listed
            .iter()
            .map(|entry| {
                let want = match self.desired.get(&entry.container_id) {
                    Some(v)
                        if v.manifest().generation == entry.generation
                            && v.digest() == entry.digest =>
                    {
                        Want::Apply(v)
                    }
                    _ => Want::Hold,
                };
                (entry.container_id.clone(), want)
            })
            .collect();
        let reconciled = self.reconciler.reconcile(&wants, &self.client).await;
        drop(wants);
        self.last_snapshot = Some(snapshot);
        match reconciled {
            Ok(reports) => self.pending_reports.extend(reports),
            Err(e) => tracing::warn!(error = %e, "reconcile failed; retrying on the next pass"),
        }
        self.flush_reports().await;
        Ok(())
    }

    /// Queues the report of a refused manifest.
    fn refused(
        &mut self,
        container: Option<ContainerId>,
        generation: Option<u64>,
        error: &VerifyError,
    ) {
        tracing::warn!(
            error = %error,
            container = ?container.as_ref().map(ToString::to_string),
            "manifest refused; nothing applied",
        );
        self.pending_reports.push(ContainerReport {
            container_id: container,
            generation,
            outcome: Outcome::Refused {
                reason: error.to_string(),
            },
        });
    }

    /// Sends pending reports and, when it changed, the image inventory. Kept for the next try
    /// if the server cannot be reached.
    async fn flush_reports(&mut self) {
        let inventory = match self.reconciler.engine().inventory().await {
            Ok(images) if self.inventory_sent.as_ref() != Some(&images) => Some(images),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "listing images failed");
                None
            }
        };
        if self.pending_reports.is_empty() && inventory.is_none() {
            return;
        }
        let report = StatusReport {
            containers: self.pending_reports.clone(),
            inventory: inventory.clone(),
        };
        match self
            .client
            .send(
                hyper::Method::POST,
                "/v1/node/status",
                serde_json::to_vec(&report).ok(),
            )
            .await
            .and_then(|r| r.error_for_status())
        {
            Ok(_) => {
                self.pending_reports.clear();
                if let Some(images) = inventory {
                    self.inventory_sent = Some(images);
                }
            }
            Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => {
                // The server refused this batch; resending the same batch would be refused
                // again and hold back every later report.
                tracing::error!(
                    error = %e,
                    dropped = self.pending_reports.len(),
                    "status report refused; dropping it",
                );
                self.pending_reports.clear();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reporting status failed; will resend");
                // Keep the newest reports if the server stays away for long.
                let excess = self
                    .pending_reports
                    .len()
                    .saturating_sub(MAX_PENDING_REPORTS);
                self.pending_reports.drain(..excess);
            }
        }
    }

    /// Reports the inventory right away (at start, so the server can resolve base images).
    pub async fn announce(&mut self) {
        self.flush_reports().await;
    }

    async fn apply_expiry_policy(&mut self) {
        if self.expiry_applied {
            return;
        }
        // After a restart no snapshot was received yet; the persisted expiry of the last one
        // still applies.
        let Some(expires_at) = self
            .last_snapshot
            .as_ref()
            .map(|s| s.snapshot().expires_at)
            .or(self.marks.snapshot_expires_at)
        else {
            return;
        };
        if now_unix() < expires_at {
            return;
        }
        self.expiry_applied = true;
        match self.args.expiry_policy {
            ExpiryPolicy::Keep => {
                tracing::warn!(
                    expired_at = expires_at,
                    "last snapshot expired; keeping containers running (policy keep)"
                );
            }
            ExpiryPolicy::Stop => {
                tracing::warn!(
                    expired_at = expires_at,
                    "last snapshot expired; stopping containers (policy stop)"
                );
                if let Err(e) = self.reconciler.stop_all().await {
                    tracing::error!(error = %e, "stopping containers failed");
                    self.expiry_applied = false;
                }
            }
            ExpiryPolicy::Wipe => {
                tracing::warn!(
                    expired_at = expires_at,
                    "last snapshot expired; wiping containers (policy wipe)"
                );
                if let Err(e) = self.reconciler.wipe_all().await {
                    tracing::error!(error = %e, "wiping containers failed");
                    self.expiry_applied = false;
                }
            }
        }
    }
}

fn is_eviction(err: &ClientError) -> bool {
    matches!(err, ClientError::CertificateRevoked) || err.code() == Some("node_evicted")
}
