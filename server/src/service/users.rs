//! Users, their SSH keys, groups and memberships. Every change that alters what some container
//! should hold starts a rollout over those containers.

use std::collections::BTreeSet;

use keyward_common::ids::{GroupName, UserName};

use super::containers::{insert_key, revoke_keys};
use super::{Service, ServiceError, ServiceResult, conflict_if_taken, new_id, now};
use crate::api::{
    AddMemberRequest, AddUserKeyRequest, ChangeOutcome, CreateGroupRequest, CreateUserRequest,
    GroupView, KeyView, RolloutOverrides, UserView,
};
use crate::audit::{self, NewEntry};
use crate::sshkeys;
use crate::store::{Tx, to_i64};

fn user_name(name: &str) -> ServiceResult<UserName> {
    UserName::new(name).map_err(|e| ServiceError::bad_request(e.to_string()))
}

fn group_name(name: &str) -> ServiceResult<GroupName> {
    GroupName::new(name).map_err(|e| ServiceError::bad_request(e.to_string()))
}

async fn require_user(tx: &mut Tx, name: &str) -> ServiceResult<()> {
    let found: Option<String> = sqlx::query_scalar("SELECT name FROM users WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| ServiceError::not_found(format!("user {name} does not exist")))
}

async fn require_group(tx: &mut Tx, name: &str) -> ServiceResult<()> {
    let found: Option<String> = sqlx::query_scalar("SELECT name FROM groups WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| ServiceError::not_found(format!("group {name} does not exist")))
}

/// Active containers that let any of `groups` log in.
async fn containers_of_groups(tx: &mut Tx, groups: &[String]) -> ServiceResult<Vec<String>> {
    let mut out = BTreeSet::new();
    for group in groups {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT cg.container_id FROM container_groups cg JOIN containers c \
             ON c.id = cg.container_id WHERE cg.group_name = $1 AND c.state = 'active'",
        )
        .bind(group)
        .fetch_all(&mut **tx)
        .await?;
        out.extend(ids);
    }
    Ok(out.into_iter().collect())
}

async fn groups_of_user(tx: &mut Tx, user: &str) -> ServiceResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT group_name FROM group_members WHERE user_name = $1 ORDER BY group_name",
    )
    .bind(user)
    .fetch_all(&mut **tx)
    .await?)
}

impl Service {
    /// Adds a user with keys and group memberships.
    pub async fn create_user(
        &self,
        actor: &str,
        req: CreateUserRequest,
    ) -> ServiceResult<ChangeOutcome> {
        let name = user_name(&req.name)?;
        let keys = req
            .keys
            .iter()
            .map(|k| sshkeys::parse_public(k).map_err(|e| ServiceError::bad_request(e.to_string())))
            .collect::<ServiceResult<Vec<_>>>()?;
        let groups = req
            .groups
            .iter()
            .map(|g| group_name(g).map(|g| g.to_string()))
            .collect::<ServiceResult<Vec<_>>>()?;

        let (mut tx, revision) = self.store.write().await?;
        let at = now();
        let inserted = sqlx::query("INSERT INTO users (name, created_at) VALUES ($1, $2)")
            .bind(name.as_str())
            .bind(to_i64(at))
            .execute(&mut *tx)
            .await;
        conflict_if_taken(inserted, || format!("user {name} already exists"))?;
        let mut entries = vec![(
            "user.add".to_string(),
            name.to_string(),
            serde_json::json!({
                "keys": keys.iter().map(|k| &k.fingerprint).collect::<Vec<_>>(),
                "groups": groups,
            }),
        )];
        for key in &keys {
            let id = self.add_key_row(&mut tx, name.as_str(), key, at).await?;
            entries.push((
                "key.add".into(),
                id,
                serde_json::json!({ "user": name.as_str(), "fingerprint": key.fingerprint }),
            ));
        }
        for group in &groups {
            require_group(&mut tx, group).await?;
            sqlx::query("INSERT INTO group_members (group_name, user_name) VALUES ($1, $2)")
                .bind(group)
                .bind(name.as_str())
                .execute(&mut *tx)
                .await?;
        }
        let affected = containers_of_groups(&mut tx, &groups).await?;
        let reason = format!("user {name} added");
        self.finish_change(tx, revision, actor, &reason, affected, req.rollout, entries)
            .await
    }

    /// Adds a key to an existing user.
    pub async fn add_user_key(
        &self,
        actor: &str,
        user: &str,
        req: AddUserKeyRequest,
    ) -> ServiceResult<ChangeOutcome> {
        let name = user_name(user)?;
        let key = sshkeys::parse_public(&req.key)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let (mut tx, revision) = self.store.write().await?;
        require_user(&mut tx, name.as_str()).await?;
        let at = now();
        let id = self.add_key_row(&mut tx, name.as_str(), &key, at).await?;
        let groups = groups_of_user(&mut tx, name.as_str()).await?;
        let affected = containers_of_groups(&mut tx, &groups).await?;
        let entries = vec![(
            "key.add".to_string(),
            id,
            serde_json::json!({ "user": name.as_str(), "fingerprint": key.fingerprint }),
        )];
        let reason = format!("key added to user {name}");
        self.finish_change(tx, revision, actor, &reason, affected, req.rollout, entries)
            .await
    }

    async fn add_key_row(
        &self,
        tx: &mut Tx,
        user: &str,
        key: &sshkeys::UserKey,
        at: u64,
    ) -> ServiceResult<String> {
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT user_name FROM keys WHERE kind = 'user' AND state = 'active' \
             AND fingerprint = $1",
        )
        .bind(&key.fingerprint)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(owner) = taken {
            return Err(ServiceError::conflict(format!(
                "key {} is already registered to user {owner}",
                key.fingerprint
            )));
        }
        let id = new_id("k");
        insert_key(
            tx,
            &id,
            "user",
            Some(user),
            None,
            &key.fingerprint,
            &key.line,
            at,
        )
        .await?;
        Ok(id)
    }

    /// Removes a user: revokes their keys and rolls the containers they could log into.
    pub async fn remove_user(
        &self,
        actor: &str,
        user: &str,
        policy: RolloutOverrides,
    ) -> ServiceResult<ChangeOutcome> {
        let name = user_name(user)?;
        let (mut tx, revision) = self.store.write().await?;
        require_user(&mut tx, name.as_str()).await?;
        let at = now();
        let groups = groups_of_user(&mut tx, name.as_str()).await?;
        let affected = containers_of_groups(&mut tx, &groups).await?;
        let keys: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, fingerprint FROM keys WHERE kind = 'user' AND user_name = $1 \
             AND state = 'active'",
        )
        .bind(name.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<String> = keys.iter().map(|(id, _)| id.clone()).collect();
        revoke_keys(&mut tx, &ids, "user removed", at).await?;
        sqlx::query("DELETE FROM group_members WHERE user_name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        let mut entries = vec![(
            "user.remove".to_string(),
            name.to_string(),
            serde_json::json!({ "groups": groups }),
        )];
        for (id, fingerprint) in keys {
            entries.push((
                "key.revoke".into(),
                id,
                serde_json::json!({ "reason": "user removed", "fingerprint": fingerprint }),
            ));
        }
        let reason = format!("user {name} removed");
        self.finish_change(tx, revision, actor, &reason, affected, policy, entries)
            .await
    }

    /// Lists users with their groups and active keys.
    pub async fn list_users(&self) -> ServiceResult<Vec<UserView>> {
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM users ORDER BY name")
            .fetch_all(self.store.pool())
            .await?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.show_user(&name).await?);
        }
        Ok(out)
    }

    /// Shows one user.
    pub async fn show_user(&self, name: &str) -> ServiceResult<UserView> {
        let mut tx = self.store.pool().begin().await?;
        require_user(&mut tx, name).await?;
        let groups = groups_of_user(&mut tx, name).await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM keys WHERE kind = 'user' AND user_name = $1 \
             AND state = 'active' ORDER BY created_at, id",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        let mut keys: Vec<KeyView> = Vec::with_capacity(ids.len());
        for id in ids {
            keys.push(self.key_view(&mut tx, &id).await?);
        }
        Ok(UserView {
            name: name.to_string(),
            groups,
            keys,
        })
    }

    /// Creates a group.
    pub async fn create_group(
        &self,
        actor: &str,
        req: CreateGroupRequest,
    ) -> ServiceResult<GroupView> {
        let name = group_name(&req.name)?;
        let (mut tx, _revision) = self.store.write().await?;
        let at = now();
        let inserted = sqlx::query("INSERT INTO groups (name, created_at) VALUES ($1, $2)")
            .bind(name.as_str())
            .bind(to_i64(at))
            .execute(&mut *tx)
            .await;
        conflict_if_taken(inserted, || format!("group {name} already exists"))?;
        let details = serde_json::json!({});
        audit::append(
            &mut tx,
            at,
            &[NewEntry {
                actor,
                action: "group.add",
                subject: name.as_str(),
                details,
            }],
        )
        .await?;
        tx.commit().await?;
        Ok(GroupView {
            name: name.to_string(),
            members: Vec::new(),
            containers: 0,
        })
    }

    /// Removes a group: its members lose access to the containers it granted.
    pub async fn remove_group(
        &self,
        actor: &str,
        group: &str,
        policy: RolloutOverrides,
    ) -> ServiceResult<ChangeOutcome> {
        let name = group_name(group)?;
        let (mut tx, revision) = self.store.write().await?;
        require_group(&mut tx, name.as_str()).await?;
        let affected = containers_of_groups(&mut tx, &[name.to_string()]).await?;
        sqlx::query("DELETE FROM container_groups WHERE group_name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM group_members WHERE group_name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM groups WHERE name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        let entries = vec![(
            "group.remove".to_string(),
            name.to_string(),
            serde_json::json!({}),
        )];
        let reason = format!("group {name} removed");
        self.finish_change(tx, revision, actor, &reason, affected, policy, entries)
            .await
    }

    /// Adds a user to a group.
    pub async fn add_member(
        &self,
        actor: &str,
        group: &str,
        req: AddMemberRequest,
    ) -> ServiceResult<ChangeOutcome> {
        let gname = group_name(group)?;
        let uname = user_name(&req.user)?;
        let (mut tx, revision) = self.store.write().await?;
        require_group(&mut tx, gname.as_str()).await?;
        require_user(&mut tx, uname.as_str()).await?;
        let inserted =
            sqlx::query("INSERT INTO group_members (group_name, user_name) VALUES ($1, $2)")
                .bind(gname.as_str())
                .bind(uname.as_str())
                .execute(&mut *tx)
                .await;
        conflict_if_taken(inserted, || {
            format!("user {uname} is already in group {gname}")
        })?;
        let affected = containers_of_groups(&mut tx, &[gname.to_string()]).await?;
        let entries = vec![(
            "group.add_member".to_string(),
            gname.to_string(),
            serde_json::json!({ "user": uname.as_str() }),
        )];
        let reason = format!("user {uname} added to group {gname}");
        self.finish_change(tx, revision, actor, &reason, affected, req.rollout, entries)
            .await
    }

    /// Removes a user from a group.
    pub async fn remove_member(
        &self,
        actor: &str,
        group: &str,
        user: &str,
        policy: RolloutOverrides,
    ) -> ServiceResult<ChangeOutcome> {
        let gname = group_name(group)?;
        let uname = user_name(user)?;
        let (mut tx, revision) = self.store.write().await?;
        require_group(&mut tx, gname.as_str()).await?;
        let deleted =
            sqlx::query("DELETE FROM group_members WHERE group_name = $1 AND user_name = $2")
                .bind(gname.as_str())
                .bind(uname.as_str())
                .execute(&mut *tx)
                .await?;
        if deleted.rows_affected() == 0 {
            return Err(ServiceError::not_found(format!(
                "user {uname} is not in group {gname}"
            )));
        }
        let affected = containers_of_groups(&mut tx, &[gname.to_string()]).await?;
        let entries = vec![(
            "group.remove_member".to_string(),
            gname.to_string(),
            serde_json::json!({ "user": uname.as_str() }),
        )];
        let reason = format!("user {uname} removed from group {gname}");
        self.finish_change(tx, revision, actor, &reason, affected, policy, entries)
            .await
    }

    /// Lists groups.
    pub async fn list_groups(&self) -> ServiceResult<Vec<GroupView>> {
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM groups ORDER BY name")
            .fetch_all(self.store.pool())
            .await?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let members: Vec<String> = sqlx::query_scalar(
                "SELECT user_name FROM group_members WHERE group_name = $1 ORDER BY user_name",
            )
            .bind(&name)
            .fetch_all(self.store.pool())
            .await?;
            let containers: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM container_groups cg JOIN containers c \
                 ON c.id = cg.container_id WHERE cg.group_name = $1 AND c.state = 'active'",
            )
            .bind(&name)
            .fetch_one(self.store.pool())
            .await?;
            out.push(GroupView {
                name,
                members,
                containers: containers.max(0) as u64,
            });
        }
        Ok(out)
    }

    /// Appends the audit entries, starts a rollout over `affected` if any, commits, and wakes the
    /// rollout driver.
    #[allow(clippy::too_many_arguments)]
    async fn finish_change(
        &self,
        mut tx: Tx,
        revision: u64,
        actor: &str,
        reason: &str,
        affected: Vec<String>,
        policy: RolloutOverrides,
        entries: Vec<(String, String, serde_json::Value)>,
    ) -> ServiceResult<ChangeOutcome> {
        let at = now();
        let entries: Vec<NewEntry<'_>> = entries
            .iter()
            .map(|(action, subject, details)| NewEntry {
                actor,
                action,
                subject,
                details: details.clone(),
            })
            .collect();
        audit::append(&mut tx, at, &entries).await?;
        let count = affected.len() as u64;
        let rollout = self
            .start_rollout_and_commit(tx, revision, actor, reason, &affected, policy)
            .await?;
        Ok(ChangeOutcome {
            rollout,
            containers: count,
        })
    }
}
