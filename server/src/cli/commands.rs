//! The CLI's commands: build the request, call the API, print the answer.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyward_certs::files;
use keyward_common::client::ApiClient;
use keyward_common::manifest::{EnvVar, PortMapping, Protocol};
use keyward_common::secret::SecretString;
use serde::Serialize;

use super::table;
use super::{
    AuditCommand, CliError, ContainerCommand, CreateArgs, ExitCode, GroupCommand, KeyCommand,
    NodeCommand, RolloutCommand, RolloutFlags, TokenCommand, UserCommand,
};
use crate::api::{
    AccessKeyResponse, AddMemberRequest, AddUserKeyRequest, AuditPage, ChangeOutcome,
    ContainerView, CreateContainerRequest, CreateGroupRequest, CreateTokenRequest,
    CreateUserRequest, FileSpec, GroupView, KeyView, NodeView, RolloutOverrides, RolloutView,
    TokenResponse, UserView,
};
use crate::audit::verify_chain;

/// How results are printed.
pub struct Output {
    /// JSON instead of tables.
    pub json: bool,
}

impl Output {
    fn json<T: Serialize>(&self, value: &T) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| CliError::new(ExitCode::Failure, e.to_string()))?;
        println!("{text}");
        Ok(())
    }
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::new(ExitCode::Usage, message)
}

fn when(at: Option<u64>) -> String {
    at.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

/// URL path segment escaping for ids and names (which are already restricted, but a user might
/// type anything).
fn seg(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn overrides(flags: &RolloutFlags) -> RolloutOverrides {
    RolloutOverrides {
        batch_size: flags.batch_size,
        max_in_flight: flags.max_in_flight,
        failure_threshold: flags.failure_threshold,
    }
}

fn print_change(out: &Output, what: &str, outcome: &ChangeOutcome) -> Result<ExitCode, CliError> {
    if out.json {
        out.json(outcome)?;
    } else {
        match &outcome.rollout {
            Some(id) => println!(
                "{what}; rollout {id} updates {} container(s) (follow it: keyward rollout show \
                 {id} --watch)",
                outcome.containers
            ),
            None => println!("{what}; no container affected"),
        }
    }
    Ok(ExitCode::Ok)
}

pub(super) async fn node(
    client: &ApiClient,
    out: &Output,
    cmd: NodeCommand,
) -> Result<ExitCode, CliError> {
    match cmd {
        NodeCommand::Token(TokenCommand::Create {
            node,
            ttl,
            token_out,
            fingerprint_out,
        }) => {
            let token: TokenResponse = client
                .post_json(
                    "/v1/nodes/tokens",
                    &CreateTokenRequest {
                        node,
                        ttl_seconds: ttl,
                    },
                )
                .await?;
            let write = |path: &Path, bytes: &[u8], secret: bool| {
                let written = if secret {
                    files::write_secret(path, bytes)
                } else {
                    files::write_public(path, bytes)
                };
                written.map_err(|e| CliError::new(ExitCode::Failure, e.to_string()))
            };
            if let Some(path) = &fingerprint_out {
                write(
                    path,
                    format!("{}\n", token.ca_fingerprint).as_bytes(),
                    false,
                )?;
            }
            let shown_token = match &token_out {
                Some(path) => {
                    write(path, format!("{}\n", token.token.expose()).as_bytes(), true)?;
                    format!("--token-file {}", path.display())
                }
                None => format!("--token {}", token.token.expose()),
            };
            if out.json {
                if token_out.is_some() {
                    let mut value = serde_json::to_value(&token)
                        .map_err(|e| CliError::new(ExitCode::Failure, e.to_string()))?;
                    value["token"] = serde_json::Value::Null;
                    out.json(&value)?;
                } else {
                    out.json(&token)?;
                }
            } else {
                match &token_out {
                    Some(path) => println!(
                        "join token for node {} written to {} (single use, expires at {})",
                        token.node,
                        path.display(),
                        token.expires_at
                    ),
                    None => {
                        println!(
                            "join token for node {} (single use, expires at {}):",
                            token.node, token.expires_at
                        );
                        println!("  {}", token.token.expose());
                    }
                }
                println!("CA fingerprint: {}", token.ca_fingerprint);
                println!("on the node, run:");
                println!(
                    "  keyward-agent enroll --server {} --enroll-url {} --node {} --ca-fingerprint \
                     {} {shown_token}",
                    token.server_url, token.enroll_url, token.node, token.ca_fingerprint
                );
            }
        }
        NodeCommand::List => {
            let nodes: Vec<NodeView> = client.get_json("/v1/nodes").await?;
            if out.json {
                out.json(&nodes)?;
            } else {
                let rows = nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.id.clone(),
                            n.state.clone(),
                            n.containers.to_string(),
                            n.inventory.len().to_string(),
                            when(n.last_seen),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(
                    &["NODE", "STATE", "CONTAINERS", "IMAGES", "LAST SEEN"],
                    &rows,
                );
            }
        }
        NodeCommand::Show { id } => {
            let node: NodeView = client.get_json(&format!("/v1/nodes/{}", seg(&id))).await?;
            print_node(out, &node)?;
        }
        NodeCommand::Evict { id } => {
            let node: NodeView = client
                .post_json(
                    &format!("/v1/nodes/{}/evict", seg(&id)),
                    &serde_json::json!({}),
                )
                .await?;
            if !out.json {
                println!(
                    "node {id} evicted: its certificates are denied and its containers' keys \
                     revoked"
                );
            }
            print_node(out, &node)?;
        }
    }
    Ok(ExitCode::Ok)
}

fn print_node(out: &Output, node: &NodeView) -> Result<(), CliError> {
    if out.json {
        return out.json(node);
    }
    println!("node:        {}", node.id);
    println!("state:       {}", node.state);
    println!("enrolled at: {}", when(node.enrolled_at));
    println!("last seen:   {}", when(node.last_seen));
    println!("containers:  {}", node.containers);
    let rows = node
        .inventory
        .iter()
        .map(|i| vec![i.id.to_string(), i.tags.join(",")])
        .collect::<Vec<_>>();
    table::print(&["IMAGE ID", "TAGS"], &rows);
    Ok(())
}

fn read_key_file(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| {
            CliError::new(
                ExitCode::Failure,
                format!("reading {}: {e}", path.display()),
            )
        })
        .map(|s| s.trim().to_string())
}

pub(super) async fn user(
    client: &ApiClient,
    out: &Output,
    cmd: UserCommand,
) -> Result<ExitCode, CliError> {
    match cmd {
        UserCommand::Add {
            name,
            keys,
            groups,
            rollout,
        } => {
            let keys = keys
                .iter()
                .map(|p| read_key_file(p))
                .collect::<Result<Vec<_>, _>>()?;
            let req = CreateUserRequest {
                name: name.clone(),
                keys,
                groups,
                rollout: overrides(&rollout),
            };
            let outcome: ChangeOutcome = client.post_json("/v1/users", &req).await?;
            print_change(out, &format!("user {name} added"), &outcome)
        }
        UserCommand::AddKey { name, key, rollout } => {
            let req = AddUserKeyRequest {
                key: read_key_file(&key)?,
                rollout: overrides(&rollout),
            };
            let outcome: ChangeOutcome = client
                .post_json(&format!("/v1/users/{}/keys", seg(&name)), &req)
                .await?;
            print_change(out, &format!("key added to user {name}"), &outcome)
        }
        UserCommand::Remove { name, rollout } => {
            let outcome: ChangeOutcome = client
                .delete_json(&format!(
                    "/v1/users/{}{}",
                    seg(&name),
                    overrides(&rollout).query()
                ))
                .await?;
            print_change(
                out,
                &format!("user {name} removed and their keys revoked"),
                &outcome,
            )
        }
        UserCommand::List => {
            let users: Vec<UserView> = client.get_json("/v1/users").await?;
            if out.json {
                out.json(&users)?;
            } else {
                let rows = users
                    .iter()
                    .map(|u| vec![u.name.clone(), u.groups.join(","), u.keys.len().to_string()])
                    .collect::<Vec<_>>();
                table::print(&["USER", "GROUPS", "KEYS"], &rows);
            }
            Ok(ExitCode::Ok)
        }
        UserCommand::Show { name } => {
            let user: UserView = client
                .get_json(&format!("/v1/users/{}", seg(&name)))
                .await?;
            if out.json {
                out.json(&user)?;
            } else {
                println!("user:   {}", user.name);
                println!("groups: {}", user.groups.join(", "));
                print_keys(&user.keys);
            }
            Ok(ExitCode::Ok)
        }
    }
}

pub(super) async fn group(
    client: &ApiClient,
    out: &Output,
    cmd: GroupCommand,
) -> Result<ExitCode, CliError> {
    match cmd {
        GroupCommand::Add { name } => {
            let group: GroupView = client
                .post_json("/v1/groups", &CreateGroupRequest { name })
                .await?;
            if out.json {
                out.json(&group)?;
            } else {
                println!("group {} added", group.name);
            }
            Ok(ExitCode::Ok)
        }
        GroupCommand::Remove { name, rollout } => {
            let outcome: ChangeOutcome = client
                .delete_json(&format!(
                    "/v1/groups/{}{}",
                    seg(&name),
                    overrides(&rollout).query()
                ))
                .await?;
            print_change(out, &format!("group {name} removed"), &outcome)
        }
        GroupCommand::List => {
            let groups: Vec<GroupView> = client.get_json("/v1/groups").await?;
            if out.json {
                out.json(&groups)?;
            } else {
                let rows = groups
                    .iter()
                    .map(|g| {
                        vec![
                            g.name.clone(),
                            g.members.join(","),
                            g.containers.to_string(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(&["GROUP", "MEMBERS", "CONTAINERS"], &rows);
            }
            Ok(ExitCode::Ok)
        }
        GroupCommand::AddMember {
            group,
            user,
            rollout,
        } => {
            let req = AddMemberRequest {
                user: user.clone(),
                rollout: overrides(&rollout),
            };
            let outcome: ChangeOutcome = client
                .post_json(&format!("/v1/groups/{}/members", seg(&group)), &req)
                .await?;
            print_change(
                out,
                &format!("user {user} added to group {group}"),
                &outcome,
            )
        }
        GroupCommand::RemoveMember {
            group,
            user,
            rollout,
        } => {
            let path = format!(
                "/v1/groups/{}/members/{}{}",
                seg(&group),
                seg(&user),
                overrides(&rollout).query()
            );
            let outcome: ChangeOutcome = client.delete_json(&path).await?;
            print_change(
                out,
                &format!("user {user} removed from group {group}"),
                &outcome,
            )
        }
    }
}

/// Parses `[IP:]HOST:CONTAINER[/proto]`.
fn parse_port(spec: &str) -> Result<PortMapping, CliError> {
    let bad = || {
        usage(format!(
            "--port {spec:?}: expected [IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]"
        ))
    };
    let (ports, protocol) = match spec.rsplit_once('/') {
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some((p, "udp")) => (p, Protocol::Udp),
        Some(_) => return Err(bad()),
        None => (spec, Protocol::Tcp),
    };
    let parts: Vec<&str> = ports.rsplitn(3, ':').collect();
    let (container, host, ip) = match parts.as_slice() {
        [c, h] => (*c, *h, "127.0.0.1"),
        [c, h, ip] => (*c, *h, ip.trim_start_matches('[').trim_end_matches(']')),
        _ => return Err(bad()),
    };
    Ok(PortMapping {
        container_port: container.parse().map_err(|_| bad())?,
        protocol,
        host_ip: ip.parse::<IpAddr>().map_err(|_| bad())?,
        host_port: host.parse().map_err(|_| bad())?,
    })
}

/// Parses `DEST=SRC[:MODE]` and reads SRC.
fn parse_file(spec: &str) -> Result<FileSpec, CliError> {
    let bad = || {
        usage(format!(
            "--file {spec:?}: expected DEST=SRC[:MODE], e.g. /etc/keyward/token=./token:0400"
        ))
    };
    let (dest, source) = spec.split_once('=').ok_or_else(bad)?;
    let (source, mode) = match source.rsplit_once(':') {
        Some((s, m)) if !m.is_empty() && m.bytes().all(|b| (b'0'..=b'7').contains(&b)) => {
            (s, Some(u32::from_str_radix(m, 8).map_err(|_| bad())?))
        }
        _ => (source, None),
    };
    let content = zeroize::Zeroizing::new(
        std::fs::read(source)
            .map_err(|e| CliError::new(ExitCode::Failure, format!("reading {source}: {e}")))?,
    );
    Ok(FileSpec {
        path: dest.to_string(),
        mode,
        uid: None,
        gid: None,
        content_base64: SecretString::new(STANDARD.encode(content.as_slice())),
    })
}

/// Prints or saves an access private key.
fn deliver_key(key: &SecretString, key_out: Option<&Path>) -> Result<(), CliError> {
    match key_out {
        Some(path) => {
            files::write_secret(path, key.expose().as_bytes())
                .map_err(|e| CliError::new(ExitCode::Failure, e.to_string()))?;
            println!(
                "access private key written to {} (mode 0600); it is not stored anywhere else",
                path.display()
            );
        }
        None => {
            println!("access private key (shown once, not stored by the server):");
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(key.expose().as_bytes());
        }
    }
    Ok(())
}

/// Polls a container until `done` holds, or `seconds` pass.
async fn wait_for(
    client: &ApiClient,
    id: &str,
    seconds: u64,
    what: &str,
    done: impl Fn(&ContainerView) -> Option<Result<(), String>>,
) -> Result<ContainerView, CliError> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let view: ContainerView = client
            .get_json(&format!("/v1/containers/{}", seg(id)))
            .await?;
        match done(&view) {
            Some(Ok(())) => return Ok(view),
            Some(Err(reason)) => {
                return Err(CliError::new(
                    ExitCode::Failure,
                    format!("container {id}: {reason}"),
                ));
            }
            None if Instant::now() >= deadline => {
                return Err(CliError::new(
                    ExitCode::Failure,
                    format!(
                        "container {id}: agent did not confirm {what} within {seconds}s (status \
                         {})",
                        view.status
                    ),
                ));
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn applied(generation: u64) -> impl Fn(&ContainerView) -> Option<Result<(), String>> {
    move |view| {
        if view.applied_generation >= generation {
            Some(Ok(()))
        } else if (view.status == "failed" || view.status == "refused")
            && view.status_reason.is_some()
        {
            Some(Err(format!(
                "{}: {}",
                view.status,
                view.status_reason.clone().unwrap_or_default()
            )))
        } else {
            None
        }
    }
}

pub(super) async fn container(
    client: &ApiClient,
    out: &Output,
    cmd: ContainerCommand,
) -> Result<ExitCode, CliError> {
    match cmd {
        ContainerCommand::Create(args) => create_container(client, out, args).await,
        ContainerCommand::List { node } => {
            let path = match node {
                Some(n) => format!("/v1/containers?node={}", seg(&n)),
                None => "/v1/containers".to_string(),
            };
            let containers: Vec<ContainerView> = client.get_json(&path).await?;
            if out.json {
                out.json(&containers)?;
            } else {
                let rows = containers
                    .iter()
                    .map(|c| {
                        vec![
                            c.id.clone(),
                            c.name.clone(),
                            c.node.clone(),
                            c.state.clone(),
                            format!("{}/{}", c.applied_generation, c.generation),
                            c.status.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(
                    &["ID", "NAME", "NODE", "STATE", "APPLIED/GEN", "STATUS"],
                    &rows,
                );
            }
            Ok(ExitCode::Ok)
        }
        ContainerCommand::Show { id } => {
            let view: ContainerView = client
                .get_json(&format!("/v1/containers/{}", seg(&id)))
                .await?;
            print_container(out, &view)?;
            Ok(ExitCode::Ok)
        }
        ContainerCommand::Rotate { id, key_out, wait } => {
            let response: AccessKeyResponse = client
                .post_json(
                    &format!("/v1/containers/{}/rotate", seg(&id)),
                    &serde_json::json!({}),
                )
                .await?;
            finish_access_key(client, out, response, key_out.as_deref(), wait).await
        }
        ContainerCommand::Destroy { id, wait } => {
            let mut view: ContainerView = client
                .post_json(
                    &format!("/v1/containers/{}/destroy", seg(&id)),
                    &serde_json::json!({}),
                )
                .await?;
            if let Some(seconds) = wait {
                view = wait_for(client, &id, seconds, "the wipe", |v| {
                    (v.state == "destroyed").then_some(Ok(()))
                })
                .await?;
            }
            if out.json {
                out.json(&view)?;
            } else if view.state == "destroyed" {
                println!("container {id} destroyed and wiped; its keys are revoked");
            } else {
                println!(
                    "container {id} is being destroyed; its keys are revoked (follow: keyward \
                     container show {id})"
                );
            }
            Ok(ExitCode::Ok)
        }
    }
}

async fn create_container(
    client: &ApiClient,
    out: &Output,
    args: CreateArgs,
) -> Result<ExitCode, CliError> {
    let ports = args
        .ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>, _>>()?;
    let env = args
        .env
        .iter()
        .map(|e| {
            e.split_once('=')
                .map(|(n, v)| EnvVar {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .ok_or_else(|| usage(format!("--env {e:?}: expected NAME=VALUE")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let files = args
        .files
        .iter()
        .map(|f| parse_file(f))
        .collect::<Result<Vec<_>, _>>()?;
    let req = CreateContainerRequest {
        node: args.node,
        name: args.name,
        image: args.image,
        image_id: args.image_id,
        groups: args.groups,
        command: args.command,
        env,
        ports,
        files,
    };
    let response: AccessKeyResponse = client.post_json("/v1/containers", &req).await?;
    finish_access_key(client, out, response, args.key_out.as_deref(), args.wait).await
}

async fn finish_access_key(
    client: &ApiClient,
    out: &Output,
    mut response: AccessKeyResponse,
    key_out: Option<&Path>,
    wait: Option<u64>,
) -> Result<ExitCode, CliError> {
    if let Some(path) = key_out {
        // Save first: if waiting fails, the key must not be lost.
        files::write_secret(path, response.access_private_key.expose().as_bytes())
            .map_err(|e| CliError::new(ExitCode::Failure, e.to_string()))?;
    }
    if let Some(seconds) = wait {
        let generation = response.container.generation;
        response.container = wait_for(
            client,
            &response.container.id,
            seconds,
            "the new generation",
            applied(generation),
        )
        .await?;
    }
    if out.json {
        if key_out.is_some() {
            // The key went to the file; do not print it again.
            out.json(&response.container)?;
        } else {
            out.json(&response)?;
        }
        return Ok(ExitCode::Ok);
    }
    print_container(out, &response.container)?;
    if let Some(port) = response
        .container
        .ports
        .iter()
        .find(|p| p.container_port == 22)
    {
        let key_path = key_out
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "KEYFILE".into());
        println!(
            "login: ssh -i {key_path} -p {} -o UserKnownHostsFile=KNOWN_HOSTS -o \
             StrictHostKeyChecking=yes root@{}",
            port.host_port, port.host_ip
        );
    }
    match key_out {
        Some(path) => println!(
            "access private key written to {} (mode 0600); it is not stored anywhere else",
            path.display()
        ),
        None => deliver_key(&response.access_private_key, None)?,
    }
    Ok(ExitCode::Ok)
}

fn print_container(out: &Output, c: &ContainerView) -> Result<(), CliError> {
    if out.json {
        return out.json(c);
    }
    println!("container:   {} ({})", c.id, c.name);
    println!("node:        {}", c.node);
    println!("state:       {}", c.state);
    println!("image:       {} ({})", c.image, c.image_id);
    println!("groups:      {}", c.groups.join(", "));
    println!(
        "generation:  {} issued, {} applied",
        c.generation, c.applied_generation
    );
    match &c.status_reason {
        Some(reason) => println!("status:      {} ({reason})", c.status),
        None => println!("status:      {}", c.status),
    }
    println!("access key:  {}", c.access_key_fingerprint);
    for p in &c.ports {
        println!(
            "port:        {}:{} -> {}/{}",
            p.host_ip,
            p.host_port,
            p.container_port,
            p.protocol.as_str()
        );
    }
    println!("known_hosts: {}", c.known_hosts);
    Ok(())
}

fn print_keys(keys: &[KeyView]) {
    let rows = keys
        .iter()
        .map(|k| {
            let owner = k
                .user
                .clone()
                .or_else(|| k.container.clone())
                .unwrap_or_default();
            let progress = k
                .revocation
                .map(|r| {
                    let lost = if r.on_evicted_nodes > 0 {
                        format!(" ({} on evicted nodes)", r.on_evicted_nodes)
                    } else {
                        String::new()
                    };
                    format!(
                        "{}/{} confirmed{lost}{}",
                        r.confirmed,
                        r.holders,
                        if r.complete { ", complete" } else { "" }
                    )
                })
                .unwrap_or_else(|| "-".into());
            vec![
                k.id.clone(),
                k.kind.clone(),
                owner,
                k.fingerprint.clone(),
                k.state.clone(),
                progress,
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &["KEY", "KIND", "OWNER", "FINGERPRINT", "STATE", "REVOCATION"],
        &rows,
    );
}

pub(super) async fn key(
    client: &ApiClient,
    out: &Output,
    cmd: KeyCommand,
) -> Result<ExitCode, CliError> {
    match cmd {
        KeyCommand::List { state } => {
            let path = match state {
                Some(s) => format!("/v1/keys?state={}", seg(&s)),
                None => "/v1/keys".to_string(),
            };
            let keys: Vec<KeyView> = client.get_json(&path).await?;
            if out.json {
                out.json(&keys)?;
            } else {
                print_keys(&keys);
            }
        }
        KeyCommand::Show { id } => {
            let key: KeyView = client.get_json(&format!("/v1/keys/{}", seg(&id))).await?;
            if out.json {
                out.json(&key)?;
            } else {
                print_keys(std::slice::from_ref(&key));
                if let Some(reason) = &key.revoke_reason {
                    println!("revoked because: {reason}");
                }
            }
        }
        KeyCommand::Revoke { id, rollout } => {
            let outcome: ChangeOutcome = client
                .post_json(
                    &format!(
                        "/v1/keys/{}/revoke{}",
                        seg(&id),
                        overrides(&rollout).query()
                    ),
                    &serde_json::json!({}),
                )
                .await?;
            return print_change(out, &format!("key {id} revoked"), &outcome);
        }
    }
    Ok(ExitCode::Ok)
}

fn progress_line(r: &RolloutView) -> String {
    let done = r.applied + r.skipped;
    let percent = (done * 100).checked_div(r.total).unwrap_or(100);
    let filled = (percent / 5) as usize;
    format!(
        "[{}{}] {percent:>3}%  {done}/{} done ({} applied, {} skipped), {} in flight ({} failing), \
         {} pending, {} batches (largest {})  {}",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        r.total,
        r.applied,
        r.skipped,
        r.in_flight,
        r.failed,
        r.pending,
        r.batches,
        r.largest_batch,
        r.state
    )
}

pub(super) async fn rollout(
    client: &ApiClient,
    out: &Output,
    cmd: RolloutCommand,
) -> Result<ExitCode, CliError> {
    match cmd {
        RolloutCommand::List => {
            let rollouts: Vec<RolloutView> = client.get_json("/v1/rollouts").await?;
            if out.json {
                out.json(&rollouts)?;
            } else {
                let rows = rollouts
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.state.clone(),
                            format!("{}/{}", r.applied + r.skipped, r.total),
                            r.reason.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(&["ROLLOUT", "STATE", "DONE", "REASON"], &rows);
            }
            Ok(ExitCode::Ok)
        }
        RolloutCommand::Show { id, watch } => {
            let path = format!("/v1/rollouts/{}", seg(&id));
            loop {
                let view: RolloutView = client.get_json(&path).await?;
                if out.json {
                    if !watch || view.state != "running" {
                        out.json(&view)?;
                    }
                } else if watch {
                    println!("{}", progress_line(&view));
                } else {
                    println!("rollout:  {} ({})", view.id, view.reason);
                    println!(
                        "policy:   batch {} / max in flight {} / pause after {} failures",
                        view.policy.batch_size,
                        view.policy.max_in_flight,
                        view.policy.failure_threshold
                    );
                    println!("progress: {}", progress_line(&view));
                }
                match view.state.as_str() {
                    _ if !watch => return Ok(ExitCode::Ok),
                    "completed" => return Ok(ExitCode::Ok),
                    "paused" => {
                        eprintln!(
                            "rollout {id} paused after {} failures; fix them, then: keyward \
                             rollout resume {id}",
                            view.failed
                        );
                        return Ok(ExitCode::RolloutPaused);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        RolloutCommand::Resume { id } => {
            let view: RolloutView = client
                .post_json(
                    &format!("/v1/rollouts/{}/resume", seg(&id)),
                    &serde_json::json!({}),
                )
                .await?;
            if out.json {
                out.json(&view)?;
            } else {
                println!("rollout {id} resumed: {}", progress_line(&view));
            }
            Ok(ExitCode::Ok)
        }
    }
}

pub(super) async fn audit(
    client: &ApiClient,
    out: &Output,
    cmd: AuditCommand,
) -> Result<ExitCode, CliError> {
    match cmd {
        AuditCommand::List { after, limit } => {
            let page: AuditPage = client
                .get_json(&format!("/v1/audit?after={after}&limit={limit}"))
                .await?;
            if out.json {
                out.json(&page.entries)?;
            } else {
                let rows = page
                    .entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            e.at.to_string(),
                            e.actor.clone(),
                            e.action.clone(),
                            e.subject.clone(),
                            e.details.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(
                    &["SEQ", "AT", "ACTOR", "ACTION", "SUBJECT", "DETAILS"],
                    &rows,
                );
            }
            Ok(ExitCode::Ok)
        }
        AuditCommand::Verify => {
            let mut entries = Vec::new();
            let mut after = 0;
            let (head_seq, head_hash) = loop {
                let page: AuditPage = client
                    .get_json(&format!("/v1/audit?after={after}&limit=10000"))
                    .await?;
                let done = page.entries.is_empty();
                if let Some(last) = page.entries.last() {
                    after = last.seq;
                }
                entries.extend(page.entries);
                if done {
                    break (page.head_seq, page.head_hash);
                }
            };
            match verify_chain(&entries, head_seq, &head_hash) {
                Ok(()) => {
                    if out.json {
                        out.json(&serde_json::json!({
                            "ok": true,
                            "entries": entries.len(),
                            "head_seq": head_seq,
                            "head_hash": head_hash,
                        }))?;
                    } else {
                        println!(
                            "audit log verified: {} entries, head {head_seq} {head_hash}",
                            entries.len()
                        );
                        println!(
                            "keep the head hash outside the server to detect a rebuilt chain later"
                        );
                    }
                    Ok(ExitCode::Ok)
                }
                Err(e) => {
                    if out.json {
                        out.json(&serde_json::json!({ "ok": false, "error": e.to_string() }))?;
                    }
                    Err(CliError::new(
                        ExitCode::AuditBroken,
                        format!("audit log verification failed: {e}"),
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_with_a_loopback_default() {
        let p = parse_port("2222:22").unwrap();
        assert_eq!(
            (
                p.host_ip.to_string(),
                p.host_port,
                p.container_port,
                p.protocol
            ),
            ("127.0.0.1".into(), 2222, 22, Protocol::Tcp)
        );
        let p = parse_port("0.0.0.0:53:53/udp").unwrap();
        assert_eq!(
            (p.host_ip.to_string(), p.protocol),
            ("0.0.0.0".into(), Protocol::Udp)
        );
        let p = parse_port("[::1]:2222:22").unwrap();
        assert_eq!(p.host_ip.to_string(), "::1");
        for bad in ["22", "a:22", "2222:22/sctp", "1.2.3:2222:22"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("n1"), "n1");
        assert_eq!(seg("../x y"), "..%2Fx%20y");
    }
}
