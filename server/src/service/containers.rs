//! Containers: create, rotate, destroy, list and show.

use std::collections::{BTreeSet, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyward_common::api::LocalImage;
use keyward_common::ids::{ContainerName, GroupName, ImageId, NodeId};
use keyward_common::manifest::{Action, Protocol, RunSettings};
use keyward_common::paths::{FileMode, PathRules};
use sqlx::Row as _;

use super::issue::{
    AUTHORIZED_KEYS_PATH, ContainerRecord, Grants, HOST_KEY_PATH, IfUnchanged, IssueBatch,
};
use super::{Service, ServiceError, ServiceResult, conflict_if_taken, new_id, now};
use crate::api::{AccessKeyResponse, ContainerView, CreateContainerRequest};
use crate::audit::{self, NewEntry};
use crate::sshkeys;
use crate::store::{Tx, to_i64, to_u64};

/// Most secret files one container may have.
const MAX_SECRET_FILES: usize = 32;
/// Largest secret file.
const MAX_SECRET_FILE_BYTES: usize = 1024 * 1024;

/// A checked secret file from a create request.
struct SecretFile {
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
    content: Vec<u8>,
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.content);
    }
}

impl Service {
    /// Creates a container: generates its access and host keys, signs generation 1, and returns
    /// the access private key, which is not stored anywhere.
    pub async fn create_container(
        &self,
        actor: &str,
        req: CreateContainerRequest,
    ) -> ServiceResult<AccessKeyResponse> {
        // Check everything before touching the store.
        let node =
            NodeId::new(req.node.clone()).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let name = ContainerName::new(req.name.clone())
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let groups = req
            .groups
            .iter()
            .map(|g| GroupName::new(g.clone()).map(|g| g.to_string()))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        if let Some(bad) = req.env.iter().find(|v| !v.is_valid()) {
            return Err(ServiceError::bad_request(format!(
                "environment variable {:?} is invalid: names are [A-Za-z_][A-Za-z0-9_]*, values \
                 have no NUL",
                bad.name
            )));
        }
        check_ports(&req)?;
        let files = check_files(&req)?;
        let image_ref = req.image.trim().to_string();
        if image_ref.is_empty() {
            return Err(ServiceError::bad_request("image must not be empty"));
        }

        let (mut tx, revision) = self.store.write().await?;
        let node_state: Option<(String, String)> =
            sqlx::query_as("SELECT state, inventory FROM nodes WHERE id = $1")
                .bind(node.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, inventory)) = node_state else {
            return Err(ServiceError::not_found(format!(
                "node {node} does not exist; create a join token for it and enroll its agent first"
            )));
        };
        if state == "evicted" {
            return Err(ServiceError::conflict(format!("node {node} was evicted")));
        }
        for group in &groups {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT name FROM groups WHERE name = $1")
                    .bind(group)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_none() {
                return Err(ServiceError::not_found(format!(
                    "group {group} does not exist"
                )));
            }
        }
        let image_id = resolve_image(&node, &image_ref, req.image_id.as_deref(), &inventory)?;

        // Keys: the access key's private half goes back to the caller only.
        let id = new_id("c");
        let access = sshkeys::generate(&format!("keyward-access:{id}"))
            .map_err(|e| ServiceError::internal(&e))?;
        let host = sshkeys::generate(&format!("keyward-host:{id}"))
            .map_err(|e| ServiceError::internal(&e))?;
        let access_key_id = new_id("k");
        let host_key_id = new_id("k");
        let known_hosts = known_hosts_line(&req, &name, &host.public_line);
        let run = RunSettings {
            command: req.command.clone(),
            env: req.env.clone(),
            ports: req.ports.clone(),
        };
        let run_json = serde_json::to_string(&run).map_err(|e| ServiceError::internal(&e))?;
        let at = now();

        for (key_id, key) in [(&access_key_id, &access), (&host_key_id, &host)] {
            let kind = if key_id == &access_key_id {
                "access"
            } else {
                "host"
            };
            insert_key(
                &mut tx,
                key_id,
                kind,
                None,
                Some(&id),
                &key.fingerprint,
                &key.public_line,
                at,
            )
            .await?;
        }
        let host_key_enc = self.kek.seal(
            &format!("host-key:{id}"),
            host.private_openssh.expose().as_bytes(),
        );
        let inserted = sqlx::query(
            "INSERT INTO containers (id, node_id, name, state, image_ref, image_id, run_settings, \
             generation, access_key_id, host_key_id, host_key_enc, known_hosts, created_at) \
             VALUES ($1, $2, $3, 'active', $4, $5, $6, 0, $7, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(node.as_str())
        .bind(name.as_str())
        .bind(&image_ref)
        .bind(image_id.as_str())
        .bind(&run_json)
        .bind(&access_key_id)
        .bind(&host_key_id)
        .bind(host_key_enc)
        .bind(&known_hosts)
        .bind(to_i64(at))
        .execute(&mut *tx)
        .await;
        conflict_if_taken(inserted, || {
            format!(
                "a container named {name} already exists on node {node}; pick another name or \
                 destroy it first"
            )
        })?;
        for group in &groups {
            sqlx::query("INSERT INTO container_groups (container_id, group_name) VALUES ($1, $2)")
                .bind(&id)
                .bind(group)
                .execute(&mut *tx)
                .await?;
        }
        for file in &files {
            let sealed = self
                .kek
                .seal(&format!("secret-file:{id}:{}", file.path), &file.content);
            sqlx::query(
                "INSERT INTO secret_files (container_id, path, mode, uid, gid, \
                 content_enc) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&id)
            .bind(&file.path)
            .bind(i64::from(file.mode))
            .bind(i64::from(file.uid))
            .bind(i64::from(file.gid))
            .bind(sealed)
            .execute(&mut *tx)
            .await?;
        }

        let details = serde_json::json!({
            "node": node.as_str(),
            "name": name.as_str(),
            "image_id": image_id.as_str(),
            "groups": groups,
            "access_key": access.fingerprint,
            "host_key": host.fingerprint,
            "secret_files": files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        });
        let view = self
            .commit_container_change(
                tx,
                revision,
                actor,
                &id,
                Action::Run,
                "container.create",
                details,
            )
            .await?;

        tracing::info!(container = %id, node = %node, name = %name, "container created");
        Ok(AccessKeyResponse {
            container: view,
            access_private_key: access.private_openssh,
        })
    }

    /// Rotates a container's access key: a new key pair, a new generation without the old key,
    /// the old key revoked. Returns the new private key.
    pub async fn rotate_container(
        &self,
        actor: &str,
        id: &str,
    ) -> ServiceResult<AccessKeyResponse> {
        let (mut tx, revision) = self.store.write().await?;
        let record = self.active_container(&mut tx, id).await?;
        let old_key_id = record.access_key_id.clone();
        let old_fingerprint = record_fingerprint(&mut tx, &old_key_id).await?;
        let access = sshkeys::generate(&format!("keyward-access:{id}"))
            .map_err(|e| ServiceError::internal(&e))?;
        let key_id = new_id("k");
        let at = now();
        insert_key(
            &mut tx,
            &key_id,
            "access",
            None,
            Some(id),
            &access.fingerprint,
            &access.public_line,
            at,
        )
        .await?;
        revoke_keys(
            &mut tx,
            std::slice::from_ref(&old_key_id),
            "container access key rotated",
            at,
        )
        .await?;
        sqlx::query("UPDATE containers SET access_key_id = $1 WHERE id = $2")
            .bind(&key_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;

        let details = serde_json::json!({
            "old_access_key": old_fingerprint,
            "revoked_key_id": old_key_id,
            "new_access_key": access.fingerprint,
        });
        let view = self
            .commit_container_change(
                tx,
                revision,
                actor,
                id,
                Action::Run,
                "container.rotate",
                details,
            )
            .await?;
        tracing::info!(container = %id, "container access key rotated");
        Ok(AccessKeyResponse {
            container: view,
            access_private_key: access.private_openssh,
        })
    }

    /// Destroys a container: signs a destroy generation and revokes its access and host keys.
    /// The container is marked destroyed when its agent reports the wipe.
    pub async fn destroy_container(&self, actor: &str, id: &str) -> ServiceResult<ContainerView> {
        let (mut tx, revision) = self.store.write().await?;
        let record = self.active_container(&mut tx, id).await?;
        let at = now();
        sqlx::query("UPDATE containers SET state = 'destroying' WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        revoke_keys(
            &mut tx,
            &[record.access_key_id.clone(), record.host_key_id.clone()],
            "container destroyed",
            at,
        )
        .await?;
        let details = serde_json::json!({ "node": record.node_id });
        let view = self
            .commit_container_change(
                tx,
                revision,
                actor,
                id,
                Action::Destroy,
                "container.destroy",
                details,
            )
            .await?;
        tracing::info!(container = %id, "container destroy issued");
        Ok(view)
    }

    /// Ends a change to one container: issues its next generation with `action` (the access
    /// grants are read as they stand in `tx`, none for a destroy), records `audit_action` with
    /// `details`, commits, and wakes the node's watches. Returns the container as committed.
    #[allow(clippy::too_many_arguments)]
    async fn commit_container_change(
        &self,
        mut tx: Tx,
        revision: u64,
        actor: &str,
        id: &str,
        action: Action,
        audit_action: &str,
        details: serde_json::Value,
    ) -> ServiceResult<ContainerView> {
        let record = ContainerRecord::load(&mut tx, id).await?.ok_or_else(|| {
            ServiceError::internal(&"container vanished inside its own transaction")
        })?;
        let grants = match action {
            Action::Run => Grants::load(&mut tx).await?,
            Action::Destroy => Grants::default(),
        };
        self.issue(
            &mut tx,
            &IssueBatch {
                revision,
                grants: &grants,
                actor,
            },
            &record,
            action,
            IfUnchanged::Issue,
        )
        .await?;
        audit::append(
            &mut tx,
            now(),
            &[NewEntry {
                actor,
                action: audit_action,
                subject: id,
                details,
            }],
        )
        .await?;
        let view = self.container_view(&mut tx, id).await?;
        let node = [record.node_id];
        self.store.notify_nodes(&mut tx, &node, revision).await?;
        tx.commit().await?;
        self.announce(&node, revision);
        Ok(view)
    }

    /// The container `id`, which must be active.
    async fn active_container(&self, tx: &mut Tx, id: &str) -> ServiceResult<ContainerRecord> {
        let record = ContainerRecord::load(tx, id)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("container {id} does not exist")))?;
        if record.state != "active" {
            return Err(ServiceError::conflict(format!(
                "container {id} is {}; only active containers can be changed",
                record.state
            )));
        }
        Ok(record)
    }

    /// Lists containers, optionally of one node, newest first.
    pub async fn list_containers(&self, node: Option<&str>) -> ServiceResult<Vec<ContainerView>> {
        let mut conn = self.store.pool().begin().await?;
        container_views(&mut conn, None, node).await
    }

    /// Shows one container.
    pub async fn show_container(&self, id: &str) -> ServiceResult<ContainerView> {
        let mut conn = self.store.pool().begin().await?;
        self.container_view(&mut conn, id).await
    }

    pub(crate) async fn container_view(
        &self,
        tx: &mut Tx,
        id: &str,
    ) -> ServiceResult<ContainerView> {
        container_views(tx, Some(id), None)
            .await?
            .pop()
            .ok_or_else(|| ServiceError::not_found(format!("container {id} does not exist")))
    }
}

/// The containers matching `id` and `node` (either may be absent), newest first, read with two
/// queries however many there are.
async fn container_views(
    tx: &mut Tx,
    id: Option<&str>,
    node: Option<&str>,
) -> ServiceResult<Vec<ContainerView>> {
    let rows = sqlx::query(
        "SELECT c.id, c.name, c.node_id, c.state, c.image_ref, c.image_id, \
         c.generation, c.applied_generation, c.status, c.status_reason, \
         k.fingerprint, c.known_hosts, c.run_settings FROM containers c JOIN keys k \
         ON k.id = c.access_key_id WHERE ($1 IS NULL OR c.id = $1) \
         AND ($2 IS NULL OR c.node_id = $2) ORDER BY c.created_at DESC, c.id",
    )
    .bind(id)
    .bind(node)
    .fetch_all(&mut **tx)
    .await?;
    let memberships: Vec<(String, String)> = sqlx::query_as(
        "SELECT cg.container_id, cg.group_name FROM container_groups cg \
         JOIN containers c ON c.id = cg.container_id WHERE ($1 IS NULL OR c.id = $1) \
         AND ($2 IS NULL OR c.node_id = $2) ORDER BY cg.group_name",
    )
    .bind(id)
    .bind(node)
    .fetch_all(&mut **tx)
    .await?;
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for (container, group) in memberships {
        groups.entry(container).or_default().push(group);
    }
    rows.iter()
        .map(|row| {
            let id: String = row.try_get(0)?;
            let run: RunSettings = serde_json::from_str(&row.try_get::<String, _>(12)?)
                .map_err(|e| ServiceError::internal(&e))?;
            Ok(ContainerView {
                groups: groups.remove(&id).unwrap_or_default(),
                id,
                name: row.try_get(1)?,
                node: row.try_get(2)?,
                state: row.try_get(3)?,
                image: row.try_get(4)?,
                image_id: row.try_get(5)?,
                generation: to_u64(row.try_get(6)?),
                applied_generation: to_u64(row.try_get(7)?),
                status: row.try_get(8)?,
                status_reason: row.try_get(9)?,
                access_key_fingerprint: row.try_get(10)?,
                known_hosts: row.try_get(11)?,
                ports: run.ports,
            })
        })
        .collect()
}

/// Inserts a key row.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_key(
    tx: &mut Tx,
    id: &str,
    kind: &str,
    user: Option<&str>,
    container: Option<&str>,
    fingerprint: &str,
    public_key: &str,
    at: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO keys (id, kind, user_name, container_id, fingerprint, public_key, \
         state, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'active', $7)",
    )
    .bind(id)
    .bind(kind)
    .bind(user)
    .bind(container)
    .bind(fingerprint)
    .bind(public_key)
    .bind(to_i64(at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Marks keys revoked.
pub(crate) async fn revoke_keys(
    tx: &mut Tx,
    ids: &[String],
    reason: &str,
    at: u64,
) -> Result<(), sqlx::Error> {
    for id in ids {
        sqlx::query(
            "UPDATE keys SET state = 'revoked', revoked_at = $1, revoke_reason = $2 \
             WHERE id = $3 AND state = 'active'",
        )
        .bind(to_i64(at))
        .bind(reason)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn record_fingerprint(tx: &mut Tx, key_id: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT fingerprint FROM keys WHERE id = $1")
        .bind(key_id)
        .fetch_one(&mut **tx)
        .await
}

fn check_ports(req: &CreateContainerRequest) -> ServiceResult<()> {
    let mut seen = BTreeSet::new();
    for port in &req.ports {
        if port.container_port == 0 || port.host_port == 0 {
            return Err(ServiceError::bad_request(
                "ports must be between 1 and 65535",
            ));
        }
        if !seen.insert((port.host_ip, port.host_port, port.protocol.as_str())) {
            return Err(ServiceError::bad_request(format!(
                "host port {}:{}/{} is published twice",
                port.host_ip,
                port.host_port,
                port.protocol.as_str()
            )));
        }
    }
    Ok(())
}

fn check_files(req: &CreateContainerRequest) -> ServiceResult<Vec<SecretFile>> {
    if req.files.len() > MAX_SECRET_FILES {
        return Err(ServiceError::bad_request(format!(
            "{} files requested; at most {MAX_SECRET_FILES} are accepted",
            req.files.len()
        )));
    }
    let rules = PathRules::default();
    let mut paths = BTreeSet::from([AUTHORIZED_KEYS_PATH.to_string(), HOST_KEY_PATH.to_string()]);
    let mut out = Vec::with_capacity(req.files.len());
    for spec in &req.files {
        let path = rules
            .check(&spec.path)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        if !paths.insert(path.to_string()) {
            return Err(ServiceError::bad_request(format!(
                "file {path} is given twice or collides with a file keyward writes itself"
            )));
        }
        let mode = FileMode::new(spec.mode.unwrap_or(0o400))
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let content = STANDARD
            .decode(spec.content_base64.expose().as_bytes())
            .map_err(|_| {
                ServiceError::bad_request(format!("content of file {path} is not valid base64"))
            })?;
        if content.len() > MAX_SECRET_FILE_BYTES {
            return Err(ServiceError::bad_request(format!(
                "file {path} is {} bytes; at most {MAX_SECRET_FILE_BYTES} are accepted",
                content.len()
            )));
        }
        out.push(SecretFile {
            path: path.to_string(),
            mode: mode.bits(),
            uid: spec.uid.unwrap_or(0),
            gid: spec.gid.unwrap_or(0),
            content,
        });
    }
    Ok(out)
}

/// Finds the image id for `reference` on `node`: the operator's pinned id, or the id whose tag
/// (or id) matches in the node's reported inventory.
fn resolve_image(
    node: &NodeId,
    reference: &str,
    pinned: Option<&str>,
    inventory: &str,
) -> ServiceResult<ImageId> {
    if let Some(id) = pinned {
        return ImageId::new(id).map_err(|e| ServiceError::bad_request(e.to_string()));
    }
    let images: Vec<LocalImage> = serde_json::from_str(inventory).unwrap_or_default();
    let with_latest = if reference.contains(':') {
        reference.to_string()
    } else {
        format!("{reference}:latest")
    };
    let found = images.iter().find(|image| {
        image.id.as_str() == reference
            || image
                .tags
                .iter()
                .any(|t| t == reference || *t == with_latest)
    });
    match found {
        Some(image) => Ok(image.id.clone()),
        None if images.is_empty() => Err(ServiceError::conflict(format!(
            "node {node} has not reported any images yet; start its agent, or pass the image id \
             explicitly"
        ))),
        None => Err(ServiceError::conflict(format!(
            "image {reference} is not on node {node} (it has: {}); build or load it there first, \
             or pass the image id explicitly",
            images
                .iter()
                .flat_map(|i| i.tags.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The `known_hosts` line for the container: `[ip]:port` of its published SSH port, or its name.
fn known_hosts_line(
    req: &CreateContainerRequest,
    name: &ContainerName,
    host_public: &str,
) -> String {
    let ssh = req
        .ports
        .iter()
        .find(|p| p.container_port == 22 && p.protocol == Protocol::Tcp);
    let pattern = match ssh {
        Some(p) if p.host_port == 22 => p.host_ip.to_string(),
        Some(p) => format!("[{}]:{}", p.host_ip, p.host_port),
        None => name.to_string(),
    };
    // The key without its comment, then a comment naming the container.
    let mut parts = host_public.split_whitespace();
    let (alg, key) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    format!("{pattern} {alg} {key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> String {
        serde_json::to_string(&vec![LocalImage {
            id: ImageId::new(format!("sha256:{}", "cd".repeat(32))).unwrap(),
            tags: vec!["keyward/sshd:latest".into()],
        }])
        .unwrap()
    }

    #[test]
    fn images_resolve_by_tag_with_implicit_latest_or_by_id() {
        let node = NodeId::new("n1").unwrap();
        let id = format!("sha256:{}", "cd".repeat(32));
        for reference in ["keyward/sshd", "keyward/sshd:latest", id.as_str()] {
            assert_eq!(
                resolve_image(&node, reference, None, &inventory())
                    .unwrap()
                    .as_str(),
                id
            );
        }
        let err = resolve_image(&node, "other:1", None, &inventory()).unwrap_err();
        assert_eq!(err.code, "conflict");
        assert!(
            err.message.contains("it has: keyward/sshd:latest"),
            "{}",
            err.message
        );
    }
}
