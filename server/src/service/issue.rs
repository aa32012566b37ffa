//! Deriving what containers hold and signing them as new generations.
//!
//! A container's files are derived from current state at the moment of issue: its access key and
//! the keys of every user in its login groups go into `/root/.ssh/authorized_keys`, its host key
//! into `/etc/ssh/ssh_host_ed25519_key`, and its secret files where the operator asked. The
//! manifest names each file by SHA-256; the contents are stored encrypted for the agent to fetch.
//! Which keys each generation holds is recorded in `key_holders`, which is what revocation
//! progress is computed from.
//!
//! Issuing works on a set of containers at once (a rollout releases hundreds in one
//! transaction): everything it reads is read with one query per table, and everything it writes
//! is written with multi-row statements, so the cost per manifest is signing and sealing rather
//! than round trips to the database.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use keyward_common::dsse::MANIFEST_PAYLOAD_TYPE;
use keyward_common::ids::{ContainerId, ContainerName, ImageId, NodeId, Sha256Digest};
use keyward_common::manifest::{Action, BaseImage, FileEntry, Manifest, RunSettings};
use keyward_common::paths::{FileMode, SafePath};
use keyward_common::secret::SecretBytes;
use sqlx::Row as _;

use super::{Service, ServiceError, ServiceResult};
use crate::audit::{self, NewEntry};
use crate::store::bulk::{self, Value};
use crate::store::{StoreError, Tx, to_i64, to_u64};

/// Batch size from which signing is spread over several threads.
const PARALLEL_FROM: usize = 64;

/// Where the container's authorized keys go.
pub const AUTHORIZED_KEYS_PATH: &str = "/root/.ssh/authorized_keys";
/// Where the container's SSH host key goes.
pub const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key";

/// A container as issuance reads it.
#[derive(Debug, Clone)]
pub(crate) struct ContainerRecord {
    pub id: String,
    pub node_id: String,
    pub name: String,
    pub state: String,
    pub image_ref: String,
    pub image_id: String,
    pub run_settings: String,
    pub generation: u64,
    pub access_key_id: String,
    pub host_key_id: String,
    pub host_key_enc: Vec<u8>,
    pub access_public: String,
    /// Content digest of the current generation, if one was issued.
    pub current_content: Option<String>,
}

impl ContainerRecord {
    pub(crate) async fn load(tx: &mut Tx, id: &str) -> Result<Option<Self>, StoreError> {
        Ok(Self::load_many(tx, &[id.to_string()]).await?.pop())
    }

    /// Loads the containers with the given ids (missing ones are left out), in id order.
    pub(crate) async fn load_many(tx: &mut Tx, ids: &[String]) -> Result<Vec<Self>, StoreError> {
        let rows = bulk::select_in(
            tx,
            "SELECT c.id, c.node_id, c.name, c.state, c.image_ref, c.image_id, \
             c.run_settings, c.generation, c.access_key_id, c.host_key_id, \
             c.host_key_enc, k.public_key, m.content_digest FROM containers c JOIN keys k \
             ON k.id = c.access_key_id LEFT JOIN manifests m ON m.container_id = c.id \
             AND m.generation = c.generation WHERE c.id IN",
            ids,
            "ORDER BY c.id",
        )
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Self {
                    id: row.try_get(0)?,
                    node_id: row.try_get(1)?,
                    name: row.try_get(2)?,
                    state: row.try_get(3)?,
                    image_ref: row.try_get(4)?,
                    image_id: row.try_get(5)?,
                    run_settings: row.try_get(6)?,
                    generation: to_u64(row.try_get(7)?),
                    access_key_id: row.try_get(8)?,
                    host_key_id: row.try_get(9)?,
                    host_key_enc: row.try_get(10)?,
                    access_public: row.try_get(11)?,
                    current_content: row.try_get(12)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

/// Active user keys by group, loaded once per transaction that issues generations.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    by_group: HashMap<String, Vec<GrantedKey>>,
}

#[derive(Debug, Clone)]
struct GrantedKey {
    id: String,
    line: String,
}

impl Grants {
    pub(crate) async fn load(tx: &mut Tx) -> Result<Self, StoreError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT gm.group_name, k.id, k.public_key FROM group_members gm \
             JOIN keys k ON k.user_name = gm.user_name \
             WHERE k.kind = 'user' AND k.state = 'active' \
             ORDER BY k.user_name, k.fingerprint",
        )
        .fetch_all(&mut **tx)
        .await?;
        let mut by_group: HashMap<String, Vec<GrantedKey>> = HashMap::new();
        for (group, id, line) in rows {
            by_group
                .entry(group)
                .or_default()
                .push(GrantedKey { id, line });
        }
        Ok(Self { by_group })
    }
}

/// What every generation issued in one transaction shares.
#[derive(Debug)]
pub(crate) struct IssueBatch<'a> {
    /// The transaction's revision.
    pub revision: u64,
    /// User keys by group, loaded once for the transaction.
    pub grants: &'a Grants,
    /// Who the audit log names.
    pub actor: &'a str,
}

/// The outcome of issuing for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Issued {
    /// A new generation was signed and stored.
    New {
        /// Its generation.
        generation: u64,
    },
    /// The derived content equals the current generation's; nothing was issued.
    Unchanged,
}

/// Whether to issue even when nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfUnchanged {
    /// Issue anyway (create, rotate, destroy).
    Issue,
    /// Skip (rollouts re-deriving after a user or group change).
    Skip,
}

/// An operator's secret file as stored.
struct SecretRow {
    path: String,
    mode: i64,
    uid: i64,
    gid: i64,
    sealed: Vec<u8>,
}

/// What the containers being issued have, read in bulk.
#[derive(Default)]
struct Facts {
    groups: HashMap<String, Vec<String>>,
    secrets: HashMap<String, Vec<SecretRow>>,
    holders: HashMap<String, BTreeSet<String>>,
}

/// A generation derived and signed, ready to be stored.
struct Prepared {
    container: String,
    node: String,
    generation: u64,
    action: Action,
    digest: Sha256Digest,
    content_digest: Sha256Digest,
    envelope: Vec<u8>,
    sealed_files: Vec<Vec<u8>>,
    key_ids: BTreeSet<String>,
}

fn file_entry(
    path: &str,
    mode: u32,
    uid: u32,
    gid: u32,
    content: &[u8],
) -> ServiceResult<FileEntry> {
    Ok(FileEntry {
        path: SafePath::parse(path).map_err(|e| ServiceError::bad_request(e.to_string()))?,
        mode: FileMode::new(mode).map_err(|e| ServiceError::bad_request(e.to_string()))?,
        uid,
        gid,
        size: content.len() as u64,
        sha256: Sha256Digest::of(content),
    })
}

async fn facts(tx: &mut Tx, ids: &[String]) -> Result<Facts, StoreError> {
    let mut facts = Facts::default();
    for row in bulk::select_in(
        tx,
        "SELECT container_id, group_name FROM container_groups WHERE container_id IN",
        ids,
        "ORDER BY container_id, group_name",
    )
    .await?
    {
        facts
            .groups
            .entry(row.try_get(0)?)
            .or_default()
            .push(row.try_get(1)?);
    }
    for row in bulk::select_in(
        tx,
        "SELECT container_id, path, mode, uid, gid, content_enc FROM secret_files \
         WHERE container_id IN",
        ids,
        "ORDER BY container_id, path",
    )
    .await?
    {
        facts
            .secrets
            .entry(row.try_get(0)?)
            .or_default()
            .push(SecretRow {
                path: row.try_get(1)?,
                mode: row.try_get(2)?,
                uid: row.try_get(3)?,
                gid: row.try_get(4)?,
                sealed: row.try_get(5)?,
            });
    }
    for row in bulk::select_in(
        tx,
        "SELECT container_id, key_id FROM key_holders WHERE until_generation IS NULL \
         AND container_id IN",
        ids,
        "",
    )
    .await?
    {
        facts
            .holders
            .entry(row.try_get(0)?)
            .or_default()
            .insert(row.try_get(1)?);
    }
    Ok(facts)
}

impl Service {
    /// Issues the next generation of container `c` inside `tx`.
    pub(crate) async fn issue(
        &self,
        tx: &mut Tx,
        batch: &IssueBatch<'_>,
        c: &ContainerRecord,
        action: Action,
        if_unchanged: IfUnchanged,
    ) -> ServiceResult<Issued> {
        let mut issued = self
            .issue_many(tx, batch, std::slice::from_ref(c), action, if_unchanged)
            .await?;
        Ok(issued.pop().unwrap_or(Issued::Unchanged))
    }

    /// Issues the next generation of each container in `records` inside `tx`; the result is in
    /// the same order.
    pub(crate) async fn issue_many(
        &self,
        tx: &mut Tx,
        batch: &IssueBatch<'_>,
        records: &[ContainerRecord],
        action: Action,
        if_unchanged: IfUnchanged,
    ) -> ServiceResult<Vec<Issued>> {
        let ids: Vec<String> = records.iter().map(|c| c.id.clone()).collect();
        let facts = facts(tx, &ids).await?;

        // Derive and sign (CPU only, no database work), on every core for large batches.
        let derived = self.prepare_all(records, &facts, batch, action)?;
        let mut prepared = Vec::with_capacity(records.len());
        let mut outcomes = Vec::with_capacity(records.len());
        for (c, p) in records.iter().zip(derived) {
            let unchanged = if_unchanged == IfUnchanged::Skip
                && c.current_content.as_deref() == Some(p.content_digest.to_hex().as_str());
            if unchanged {
                outcomes.push(Issued::Unchanged);
            } else {
                outcomes.push(Issued::New {
                    generation: p.generation,
                });
                prepared.push(p);
            }
        }
        if !prepared.is_empty() {
            self.store_prepared(tx, batch, &prepared, &facts).await?;
        }
        Ok(outcomes)
    }

    /// [`Service::prepare`] for every record. Batches of [`PARALLEL_FROM`] or more are split
    /// over the available cores (the runtime is told this thread blocks meanwhile).
    fn prepare_all(
        &self,
        records: &[ContainerRecord],
        facts: &Facts,
        batch: &IssueBatch<'_>,
        action: Action,
    ) -> ServiceResult<Vec<Prepared>> {
        let threads = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if records.len() < PARALLEL_FROM || threads < 2 || !multi_thread {
            return records
                .iter()
                .map(|c| self.prepare(c, facts, batch, action))
                .collect();
        }
        let chunk = records.len().div_ceil(threads);
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let handles: Vec<_> = records
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || {
                            part.iter()
                                .map(|c| self.prepare(c, facts, batch, action))
                                .collect::<ServiceResult<Vec<_>>>()
                        })
                    })
                    .collect();
                let mut all = Vec::with_capacity(records.len());
                for handle in handles {
                    let part = handle
                        .join()
                        .map_err(|_| ServiceError::internal(&"a signing thread panicked"))??;
                    all.extend(part);
                }
                Ok(all)
            })
        })
    }

    /// Derives the files and keys of container `c` and signs its next generation.
    fn prepare(
        &self,
        c: &ContainerRecord,
        facts: &Facts,
        batch: &IssueBatch<'_>,
        action: Action,
    ) -> ServiceResult<Prepared> {
        let mut key_ids = BTreeSet::new();
        let mut files = Vec::new();
        if action == Action::Run {
            // authorized_keys: the access key first, then users' keys, each once.
            key_ids.extend([c.access_key_id.clone(), c.host_key_id.clone()]);
            let mut lines = vec![c.access_public.clone()];
            let groups = facts
                .groups
                .get(&c.id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for key in groups
                .iter()
                .filter_map(|g| batch.grants.by_group.get(g))
                .flatten()
            {
                if key_ids.insert(key.id.clone()) {
                    lines.push(key.line.clone());
                }
            }
            let authorized = SecretBytes::from(format!("{}\n", lines.join("\n")));
            let host_key = self
                .kek
                .open(&format!("host-key:{}", c.id), &c.host_key_enc)
                .map_err(|e| ServiceError::internal(&e))?;
            files.push((
                file_entry(AUTHORIZED_KEYS_PATH, 0o400, 0, 0, authorized.expose())?,
                authorized,
            ));
            files.push((
                file_entry(HOST_KEY_PATH, 0o400, 0, 0, host_key.expose())?,
                host_key,
            ));
            for secret in facts
                .secrets
                .get(&c.id)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let content = self
                    .kek
                    .open(
                        &format!("secret-file:{}:{}", c.id, secret.path),
                        &secret.sealed,
                    )
                    .map_err(|e| ServiceError::internal(&e))?;
                let entry = file_entry(
                    &secret.path,
                    secret.mode as u32,
                    secret.uid as u32,
                    secret.gid as u32,
                    content.expose(),
                )?;
                files.push((entry, content));
            }
        }

        // What the container would hold, independent of generation and timestamps.
        let content = serde_json::json!({
            "action": action_name(action),
            "image": c.image_id,
            "run": c.run_settings,
            "files": files.iter().map(|(e, _)| e).collect::<Vec<_>>(),
        });
        let content_digest = Sha256Digest::of(content.to_string().as_bytes());

        // The manifest: every byte the container gets is named here or by digest.
        let now = super::now();
        let generation = c.generation + 1;
        let bad = |e: &dyn std::fmt::Display| {
            ServiceError::internal(&format!("stored container {} is invalid: {e}", c.id))
        };
        let run: RunSettings = serde_json::from_str(&c.run_settings).map_err(|e| bad(&e))?;
        let manifest = Manifest {
            container_id: ContainerId::new(c.id.clone()).map_err(|e| bad(&e))?,
            container_name: ContainerName::new(c.name.clone()).map_err(|e| bad(&e))?,
            node: NodeId::new(c.node_id.clone()).map_err(|e| bad(&e))?,
            generation,
            revision: batch.revision,
            issued_at: now,
            expires_at: now + self.settings.manifest_ttl.as_secs(),
            action,
            image: BaseImage {
                reference: c.image_ref.clone(),
                id: ImageId::new(c.image_id.clone()).map_err(|e| bad(&e))?,
            },
            run,
            files: files.iter().map(|(entry, _)| entry.clone()).collect(),
        };
        let payload = serde_json::to_vec(&manifest).map_err(|e| bad(&e))?;
        let digest = Sha256Digest::of(&payload);
        let envelope = self
            .signing
            .sign_envelope(MANIFEST_PAYLOAD_TYPE, payload)
            .encode();
        let sealed_files = files
            .iter()
            .enumerate()
            .map(|(idx, (_, content))| {
                self.kek
                    .seal(&file_context(&c.id, generation, idx), content.expose())
            })
            .collect();
        Ok(Prepared {
            container: c.id.clone(),
            node: c.node_id.clone(),
            generation,
            action,
            digest,
            content_digest,
            envelope,
            sealed_files,
            key_ids,
        })
    }

    /// Writes prepared generations: manifests, file contents, key holders, container
    /// generations and audit entries, with multi-row statements.
    async fn store_prepared(
        &self,
        tx: &mut Tx,
        batch: &IssueBatch<'_>,
        prepared: &[Prepared],
        facts: &Facts,
    ) -> ServiceResult<()> {
        let now = to_i64(super::now());
        let ids: Vec<String> = prepared.iter().map(|p| p.container.clone()).collect();

        let manifests: Vec<Vec<Value>> = prepared
            .iter()
            .map(|p| {
                vec![
                    Value::Text(p.container.clone()),
                    Value::Int(to_i64(p.generation)),
                    Value::Text(p.node.clone()),
                    Value::Int(to_i64(batch.revision)),
                    Value::Text(action_name(p.action).into()),
                    Value::Text(p.digest.to_hex()),
                    Value::Text(p.content_digest.to_hex()),
                    Value::Blob(p.envelope.clone()),
                    Value::Int(now),
                ]
            })
            .collect();
        bulk::insert(
            tx,
            "manifests (container_id, generation, node_id, revision, action, digest, \
             content_digest, envelope, created_at)",
            manifests,
        )
        .await?;
        let mut files = Vec::new();
        for p in prepared {
            for (idx, sealed) in p.sealed_files.iter().enumerate() {
                files.push(vec![
                    Value::Text(p.container.clone()),
                    Value::Int(to_i64(p.generation)),
                    Value::Int(idx as i64),
                    Value::Blob(sealed.clone()),
                ]);
            }
        }
        bulk::insert(
            tx,
            "manifest_files (container_id, generation, idx, content_enc)",
            files,
        )
        .await?;
        // Keep the previous generation's files, which an agent may still be fetching; drop
        // older ones. (Runs before the generation below moves on.)
        bulk::execute_in(
            tx,
            "DELETE FROM manifest_files WHERE generation < (SELECT c.generation \
             FROM containers c WHERE c.id = manifest_files.container_id) AND container_id IN",
            &ids,
        )
        .await?;

        // Key holders: new holders start at this generation; keys no longer held end at it.
        let mut dropped: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        let mut started = Vec::new();
        for p in prepared {
            let current = facts.holders.get(&p.container).cloned().unwrap_or_default();
            for key in p.key_ids.difference(&current) {
                started.push(vec![
                    Value::Text(key.clone()),
                    Value::Text(p.container.clone()),
                    Value::Int(to_i64(p.generation)),
                ]);
            }
            let gone: Vec<String> = current.difference(&p.key_ids).cloned().collect();
            if !gone.is_empty() {
                dropped.entry(gone).or_default().push(p.container.clone());
            }
        }
        bulk::insert(
            tx,
            "key_holders (key_id, container_id, from_generation)",
            started,
        )
        .await?;
        for (keys, containers) in dropped {
            bulk::end_holdings(tx, &keys, &containers).await?;
        }

        bulk::execute_in(
            tx,
            "UPDATE containers SET generation = generation + 1 WHERE id IN",
            &ids,
        )
        .await?;

        let details: Vec<serde_json::Value> = prepared
            .iter()
            .map(|p| {
                serde_json::json!({
                    "generation": p.generation,
                    "action": action_name(p.action),
                    "digest": p.digest.to_hex(),
                    "revision": batch.revision,
                    "node": p.node,
                })
            })
            .collect();
        let entries: Vec<NewEntry<'_>> = prepared
            .iter()
            .zip(details)
            .map(|(p, details)| NewEntry {
                actor: batch.actor,
                action: "manifest.issue",
                subject: &p.container,
                details,
            })
            .collect();
        audit::append(tx, super::now(), &entries).await?;
        self.metrics
            .manifests_issued
            .fetch_add(prepared.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The associated data binding an encrypted file to its place.
pub(crate) fn file_context(container: &str, generation: u64, idx: usize) -> String {
    format!("file:{container}:{generation}:{idx}")
}

/// The stored name of an action.
pub(crate) fn action_name(action: Action) -> &'static str {
    match action {
        Action::Run => "run",
        Action::Destroy => "destroy",
    }
}
