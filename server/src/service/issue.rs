//! Deriving what a container holds and signing it as a new generation.
//!
//! A container's files are derived from current state at the moment of issue: its access key and
//! the keys of every user in its login groups go into `/root/.ssh/authorized_keys`, its host key
//! into `/etc/ssh/ssh_host_ed25519_key`, and its secret files where the operator asked. The
//! manifest names each file by SHA-256; the contents are stored encrypted for the agent to fetch.
//! Which keys each generation holds is recorded in `key_holders`, which is what revocation
//! progress is computed from.

use std::collections::{BTreeSet, HashMap};

use keyward_common::dsse::MANIFEST_PAYLOAD_TYPE;
use keyward_common::ids::{ContainerId, ContainerName, ImageId, NodeId, Sha256Digest};
use keyward_common::manifest::{Action, BaseImage, FileEntry, Manifest, RunSettings};
use keyward_common::paths::{FileMode, SafePath};
use keyward_common::secret::SecretBytes;
use sqlx::Row as _;

use super::{Service, ServiceError, ServiceResult};
use crate::audit::{self, NewEntry};
use crate::metrics::Metrics;
use crate::store::{StoreError, Tx, to_i64, to_u64};

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
}

impl ContainerRecord {
    pub(crate) async fn load(tx: &mut Tx, id: &str) -> Result<Option<Self>, StoreError> {
        let row = sqlx::query(
            "SELECT c.id, c.node_id, c.name, c.state, c.image_ref, c.image_id, c.run_settings, \
             c.generation, c.access_key_id, c.host_key_id, c.host_key_enc, k.public_key \
             FROM containers c JOIN keys k ON k.id = c.access_key_id WHERE c.id = $1",
        )
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Self {
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
        }))
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

/// What a generation holds, before signing.
struct Derived {
    files: Vec<(FileEntry, SecretBytes)>,
    key_ids: BTreeSet<String>,
    content_digest: Sha256Digest,
}

/// The outcome of [`Service::issue`].
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

/// Whether to issue even when nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfUnchanged {
    /// Issue anyway (create, rotate, destroy).
    Issue,
    /// Skip (rollouts re-deriving after a user or group change).
    Skip,
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

impl Service {
    /// Derives the files and keys container `c` should hold now.
    async fn derive(
        &self,
        tx: &mut Tx,
        c: &ContainerRecord,
        grants: &Grants,
    ) -> ServiceResult<Derived> {
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT group_name FROM container_groups WHERE container_id = $1 ORDER BY group_name",
        )
        .bind(&c.id)
        .fetch_all(&mut **tx)
        .await?;

        // authorized_keys: the access key first, then users' keys, each once.
        let mut key_ids = BTreeSet::from([c.access_key_id.clone(), c.host_key_id.clone()]);
        let mut lines = vec![c.access_public.clone()];
        for key in groups
            .iter()
            .filter_map(|g| grants.by_group.get(g))
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

        let mut files = vec![
            (
                file_entry(AUTHORIZED_KEYS_PATH, 0o400, 0, 0, authorized.expose())?,
                authorized,
            ),
            (
                file_entry(HOST_KEY_PATH, 0o400, 0, 0, host_key.expose())?,
                host_key,
            ),
        ];
        let secrets: Vec<(String, i64, i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT path, mode, uid, gid, content_enc FROM secret_files WHERE container_id = $1 ORDER BY path",
        )
        .bind(&c.id)
        .fetch_all(&mut **tx)
        .await?;
        for (path, mode, uid, gid, sealed) in secrets {
            let content = self
                .kek
                .open(&format!("secret-file:{}:{path}", c.id), &sealed)
                .map_err(|e| ServiceError::internal(&e))?;
            let entry = file_entry(&path, mode as u32, uid as u32, gid as u32, content.expose())?;
            files.push((entry, content));
        }

        // What the container would hold, independent of generation and timestamps.
        let content = serde_json::json!({
            "image": c.image_id,
            "run": c.run_settings,
            "files": files.iter().map(|(e, _)| e).collect::<Vec<_>>(),
        });
        let content_digest = Sha256Digest::of(content.to_string().as_bytes());
        Ok(Derived {
            files,
            key_ids,
            content_digest,
        })
    }

    /// Signs and stores the next generation of container `c` inside `tx`.
    pub(crate) async fn issue(
        &self,
        tx: &mut Tx,
        batch: &IssueBatch<'_>,
        c: &ContainerRecord,
        action: Action,
        if_unchanged: IfUnchanged,
    ) -> ServiceResult<Issued> {
        let IssueBatch {
            revision,
            grants,
            actor,
        } = *batch;
        let now = super::now();
        let derived = match action {
            Action::Run => self.derive(tx, c, grants).await?,
            Action::Destroy => Derived {
                files: Vec::new(),
                key_ids: BTreeSet::new(),
                content_digest: Sha256Digest::of(b"destroy"),
            },
        };

        if if_unchanged == IfUnchanged::Skip {
            let current: Option<String> = sqlx::query_scalar(
                "SELECT content_digest FROM manifests WHERE container_id = $1 AND generation = $2",
            )
            .bind(&c.id)
            .bind(to_i64(c.generation))
            .fetch_optional(&mut **tx)
            .await?;
            if current.as_deref() == Some(derived.content_digest.to_hex().as_str()) {
                return Ok(Issued::Unchanged);
            }
        }

        // The manifest: every byte the container gets is named here or by digest.
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
            revision,
            issued_at: now,
            expires_at: now + self.settings.manifest_ttl.as_secs(),
            action,
            image: BaseImage {
                reference: c.image_ref.clone(),
                id: ImageId::new(c.image_id.clone()).map_err(|e| bad(&e))?,
            },
            run,
            files: derived
                .files
                .iter()
                .map(|(entry, _)| entry.clone())
                .collect(),
        };
        let payload = serde_json::to_vec(&manifest).map_err(|e| bad(&e))?;
        let digest = Sha256Digest::of(&payload);
        let envelope = self
            .signing
            .sign_envelope(MANIFEST_PAYLOAD_TYPE, payload)
            .encode();

        sqlx::query(
            "INSERT INTO manifests (container_id, generation, node_id, revision, action, digest, \
             content_digest, envelope, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&c.id)
        .bind(to_i64(generation))
        .bind(&c.node_id)
        .bind(to_i64(revision))
        .bind(action_name(action))
        .bind(digest.to_hex())
        .bind(derived.content_digest.to_hex())
        .bind(envelope)
        .bind(to_i64(now))
        .execute(&mut **tx)
        .await?;

        for (idx, (_, content)) in derived.files.iter().enumerate() {
            let sealed = self
                .kek
                .seal(&file_context(&c.id, generation, idx), content.expose());
            sqlx::query(
                "INSERT INTO manifest_files (container_id, generation, idx, content_enc) VALUES ($1, $2, $3, $4)",
            )
            .bind(&c.id)
            .bind(to_i64(generation))
            .bind(idx as i64)
            .bind(sealed)
            .execute(&mut **tx)
            .await?;
        }
        // Keep the previous generation's files, which an agent may still be fetching; drop older.
        sqlx::query("DELETE FROM manifest_files WHERE container_id = $1 AND generation < $2")
            .bind(&c.id)
            .bind(to_i64(c.generation))
            .execute(&mut **tx)
            .await?;

        self.record_holders(tx, &c.id, generation, &derived.key_ids)
            .await?;
        sqlx::query("UPDATE containers SET generation = $1 WHERE id = $2")
            .bind(to_i64(generation))
            .bind(&c.id)
            .execute(&mut **tx)
            .await?;

        let details = serde_json::json!({
            "generation": generation,
            "action": action_name(action),
            "digest": digest.to_hex(),
            "revision": revision,
            "node": c.node_id,
        });
        audit::append(
            tx,
            now,
            &[NewEntry {
                actor,
                action: "manifest.issue",
                subject: &c.id,
                details,
            }],
        )
        .await?;
        Metrics::inc(&self.metrics.manifests_issued);
        Ok(Issued::New { generation })
    }

    /// Records which keys generation `generation` of `container` holds: new holders start, and
    /// keys no longer held end at this generation.
    async fn record_holders(
        &self,
        tx: &mut Tx,
        container: &str,
        generation: u64,
        keys: &BTreeSet<String>,
    ) -> Result<(), StoreError> {
        let current: Vec<String> = sqlx::query_scalar(
            "SELECT key_id FROM key_holders WHERE container_id = $1 AND until_generation IS NULL",
        )
        .bind(container)
        .fetch_all(&mut **tx)
        .await?;
        let current: BTreeSet<String> = current.into_iter().collect();
        for added in keys.difference(&current) {
            sqlx::query(
                "INSERT INTO key_holders (key_id, container_id, from_generation) VALUES ($1, $2, $3)",
            )
            .bind(added)
            .bind(container)
            .bind(to_i64(generation))
            .execute(&mut **tx)
            .await?;
        }
        for dropped in current.difference(keys) {
            sqlx::query(
                "UPDATE key_holders SET until_generation = $1 \
                 WHERE key_id = $2 AND container_id = $3 AND until_generation IS NULL",
            )
            .bind(to_i64(generation))
            .bind(dropped)
            .bind(container)
            .execute(&mut **tx)
            .await?;
        }
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
