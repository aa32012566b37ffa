//! Revocation fan-out: N agents, each a real mTLS long-poll connection from this load generator
//! process to a `keyward-server` process, each with a container holding a user's key. The user
//! is removed (the revocation) with a rollout releasing all N at once; each agent's latency is
//! from the revocation's commit (the `DELETE` answered; the first batch of new generations is
//! committed with it) to its watch answer carrying the new snapshot and manifest. Baseline: the same connections parked on a bare TLS server and
//! released at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use keyward_common::client::ApiClient;
use keyward_server::api::{
    ChangeOutcome, CreateContainerRequest, CreateGroupRequest, CreateUserRequest, RolloutOverrides,
};
use tokio::sync::Semaphore;

use super::fleet::{BareServer, bare_fanout, client_to, enroll_many};
use super::{compare, header, row};
use crate::node::FakeNode;
use crate::operator;
use crate::server::{ServerOptions, TestServer};

/// The generation of the first manifest in a watch answer, read without verification (the
/// load generator only times delivery; agents verify).
fn first_generation(answer: &keyward_common::api::WatchResponse) -> Option<u64> {
    let envelope: serde_json::Value = serde_json::from_str(answer.manifests.first()?.get()).ok()?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str()?)
        .ok()?;
    let manifest: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    manifest["generation"].as_u64()
}

async fn setup_containers(op: &ApiClient, nodes: &[Arc<FakeNode>]) {
    let permits = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for node in nodes {
        let (op, node, permits) = (op.clone(), node.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            node.report_image("keyward/sshd:latest").await;
            let request = CreateContainerRequest {
                groups: vec!["all".into()],
                ..operator::ssh_container(node.id.as_str(), "web", "keyward/sshd", None)
            };
            let _: serde_json::Value = op
                .post_json("/v1/containers", &request)
                .await
                .expect("create");
        }));
    }
    for task in tasks {
        task.await.expect("setup task");
    }
}

/// Runs the benchmark with `agents` agents, `repeats` revocations.
pub async fn run(agents: usize, repeats: usize) {
    header(&format!(
        "Revocation fan-out: {agents} long-polling agents ({repeats} revocations)"
    ));
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let server = TestServer::start(ServerOptions::default());
    let op = server.operator();
    let nodes = enroll_many(&op, &server.api_url, "f", agents, 32).await;
    let _: serde_json::Value = op
        .post_json("/v1/groups", &CreateGroupRequest { name: "all".into() })
        .await
        .unwrap();
    setup_containers(&op, &nodes).await;

    let mut keyward = Vec::new();
    let mut release_ms = Vec::new();
    let mut request_ms = Vec::new();
    for round in 0..repeats {
        let user = format!("u{round}");
        let key = keyward_server::sshkeys::generate(&user)
            .unwrap()
            .public_line;
        let add = CreateUserRequest {
            name: user.clone(),
            keys: vec![key],
            groups: vec!["all".into()],
            rollout: all_at_once(agents),
        };
        let change: ChangeOutcome = op.post_json("/v1/users", &add).await.unwrap();
        wait_rollout(&op, change.rollout.as_deref())
            .await
            .expect("the user rollout releases");

        // Each agent: catch up, then long-poll until its container's next generation arrives.
        let mut baseline_gen = Vec::with_capacity(agents);
        let mut sinces = Vec::with_capacity(agents);
        for node in &nodes {
            let answer = node.watch(0, 0).await.expect("watch");
            baseline_gen.push(first_generation(&answer).unwrap_or(0));
            sinces.push(answer.revision);
        }
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for ((node, since), generation) in nodes.iter().zip(sinces).zip(baseline_gen) {
            let (node, done) = (node.clone(), done_tx.clone());
            tokio::spawn(async move {
                let mut since = since;
                loop {
                    match node.watch(since, 25).await {
                        Ok(answer) => {
                            if first_generation(&answer).is_some_and(|g| g > generation) {
                                let _ = done.send(Instant::now());
                                return;
                            }
                            since = answer.revision;
                        }
                        Err(e) => panic!("watch failed: {e}"),
                    }
                }
            });
        }
        // Let every watch park on the server.
        tokio::time::sleep(Duration::from_millis(1000 + agents as u64)).await;

        let path = format!("/v1/users/{user}?batch_size={agents}&max_in_flight={agents}");
        let requested = Instant::now();
        let change: ChangeOutcome = op.delete_json(&path).await.unwrap();
        let committed = Instant::now();
        request_ms.push(super::ms(committed - requested));
        let mut first = None;
        for _ in 0..agents {
            let at = done_rx.recv().await.expect("an agent's answer");
            first.get_or_insert(at);
            keyward.push(super::ms(at.saturating_duration_since(committed)));
        }
        if let Some(first) = first {
            release_ms.push(super::ms(first.saturating_duration_since(committed)));
        }
        wait_rollout(&op, change.rollout.as_deref()).await.ok();
    }

    // Baseline: the same certificates and connection pattern on a bare TLS long-poll server.
    let bare = BareServer::start(&server.data()).await;
    let clients: Vec<ApiClient> = nodes.iter().map(|n| client_to(n, &bare.url)).collect();
    let mut baseline = Vec::new();
    for _ in 0..repeats {
        baseline.extend(bare_fanout(&bare, &clients).await);
    }
    compare(
        "revocation commit -> agent answered",
        "ms",
        &keyward,
        &baseline,
    );
    row("  keyward p50/p99 detail", "ms", &keyward);
    row("  first agent answered", "ms", &release_ms);
    row("  revocation request round trip", "ms", &request_ms);
    row("  baseline p50/p99 detail", "ms", &baseline);
}

fn all_at_once(agents: usize) -> RolloutOverrides {
    let n = Some(agents as u64);
    RolloutOverrides {
        batch_size: n,
        max_in_flight: n,
        failure_threshold: Some(1),
    }
}

/// Waits until a rollout has released everything (agents here never report, so in flight is
/// the end state); returns once nothing is pending.
async fn wait_rollout(op: &ApiClient, id: Option<&str>) -> Result<(), String> {
    let Some(id) = id else { return Ok(()) };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view: keyward_server::api::RolloutView = op
            .get_json(&format!("/v1/rollouts/{id}"))
            .await
            .map_err(|e| e.to_string())?;
        if view.pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("rollout {id} still has {} pending", view.pending));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
