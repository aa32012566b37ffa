//! End to end: real server and agent processes, the real Docker engine, the real OpenSSH client
//! logging in through ports published on 127.0.0.1, and the `keyward` CLI.

use std::time::Duration;

use keyward_common::client::ApiClient;
use keyward_server::api::{
    AccessKeyResponse, AddMemberRequest, ChangeOutcome, ContainerView, CreateContainerRequest,
    CreateGroupRequest, CreateUserRequest, KeyView, RolloutOverrides, RolloutView,
};
use keyward_tests::agent::TestAgent;
use keyward_tests::docker::{self, Cleanup, base_image_id};
use keyward_tests::server::{ServerOptions, TestServer, dir_contains};
use keyward_tests::ssh::{self, key_file, login};
use keyward_tests::{free_port, operator, unique, wait};

const TIMEOUT: Duration = Duration::from_secs(180);

async fn create(
    op: &ApiClient,
    node: &str,
    name: &str,
    port: u16,
    groups: &[&str],
    canary: Option<&str>,
) -> AccessKeyResponse {
    let request = CreateContainerRequest {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        files: canary
            .map(|c| operator::secret_file("/etc/keyward/canary", c))
            .into_iter()
            .collect(),
        ..operator::ssh_container(node, name, docker::BASE_IMAGE, Some(port))
    };
    op.post_json("/v1/containers", &request)
        .await
        .expect("container create")
}

async fn wait_generation(op: &ApiClient, id: &str, generation: u64) -> ContainerView {
    let what = format!("generation {generation} applied");
    operator::wait_container(op, id, &what, TIMEOUT, |v| {
        v.applied_generation >= generation
    })
    .await
}

async fn wait_rollout(op: &ApiClient, id: &str) -> RolloutView {
    wait::until(&format!("rollout {id} to complete"), TIMEOUT, || async {
        let view: RolloutView = op.get_json(&format!("/v1/rollouts/{id}")).await.ok()?;
        (view.state == "completed").then_some(view)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_log_in_over_ssh_until_they_are_removed_and_the_rollout_confirms_it() {
    base_image_id();
    let node = unique("e2e");
    let _cleanup = Cleanup::new(&[&node]);
    let server = TestServer::start(ServerOptions::default());
    let _agent = TestAgent::enroll_and_start(&server, &node).await;
    let op = server.operator();
    operator::wait_inventory(&op, &node).await;
    let keys = tempfile::tempdir().unwrap();

    // alice is a registered user in group ops; mallory's key is registered nowhere.
    let (alice_key, alice_public) = ssh::user_key(keys.path(), "alice");
    let (mallory_key, _) = ssh::user_key(keys.path(), "mallory");
    let _: serde_json::Value = op
        .post_json("/v1/groups", &CreateGroupRequest { name: "ops".into() })
        .await
        .unwrap();
    let _: ChangeOutcome = op
        .post_json(
            "/v1/users",
            &CreateUserRequest {
                name: "alice".into(),
                keys: vec![alice_public],
                groups: vec!["ops".into()],
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();

    let (p1, p2) = (free_port(), free_port());
    let one = create(&op, &node, "one", p1, &["ops"], None).await;
    let two = create(&op, &node, "two", p2, &["ops"], None).await;
    wait_generation(&op, &one.container.id, 1).await;
    wait_generation(&op, &two.container.id, 1).await;
    let access = key_file(keys.path(), "one-access", one.access_private_key.expose());
    let known_one = one.container.known_hosts.clone();

    // The per-container key and a registered user's key log in, with only the published
    // known_hosts line trusted.
    let as_root = login(p1, &access, &known_one, "id -u");
    assert!(as_root.ok, "{}", as_root.stderr);
    assert_eq!(as_root.stdout.trim(), "0");
    let as_alice = login(p1, &alice_key, &known_one, "cat /root/.ssh/authorized_keys");
    assert!(as_alice.ok, "{}", as_alice.stderr);
    assert_eq!(as_alice.stdout.lines().count(), 2);
    // An unregistered key is refused.
    let as_mallory = login(p1, &mallory_key, &known_one, "true");
    assert!(!as_mallory.ok);
    assert!(
        as_mallory.stderr.contains("Permission denied"),
        "{}",
        as_mallory.stderr
    );
    // Another container's known_hosts line does not match this container's host key.
    let wrong_host = login(
        p1,
        &access,
        &two.container
            .known_hosts
            .replace(&format!(":{p2}]"), &format!(":{p1}]")),
        "true",
    );
    assert!(!wrong_host.ok);
    assert!(
        wrong_host.stderr.contains("Host key verification failed")
            || wrong_host
                .stderr
                .contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        wrong_host.stderr
    );

    // Removing alice rolls out new generations; afterwards her key is refused everywhere.
    let alice_key_id = {
        let keys: Vec<KeyView> = op.get_json("/v1/keys?state=active").await.unwrap();
        keys.iter()
            .find(|k| k.user.as_deref() == Some("alice"))
            .unwrap()
            .id
            .clone()
    };
    let removed: ChangeOutcome = op.delete_json("/v1/users/alice").await.unwrap();
    assert_eq!(removed.containers, 2);
    let rollout = wait_rollout(&op, &removed.rollout.unwrap()).await;
    assert_eq!((rollout.total, rollout.applied), (2, 2));
    for (c, port) in [(&one, p1), (&two, p2)] {
        let view: ContainerView = op
            .get_json(&format!("/v1/containers/{}", c.container.id))
            .await
            .unwrap();
        assert_eq!(view.applied_generation, 2, "generation went up");
        assert!(
            !login(port, &alice_key, &c.container.known_hosts, "true").ok,
            "alice still logs in"
        );
    }
    assert!(
        login(p1, &access, &known_one, "true").ok,
        "the container's own key still works"
    );
    let key: KeyView = op
        .get_json(&format!("/v1/keys/{alice_key_id}"))
        .await
        .unwrap();
    let progress = key.revocation.unwrap();
    assert_eq!(
        (progress.holders, progress.confirmed, progress.complete),
        (2, 2, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_swaps_the_access_key_and_destroy_leaves_nothing_behind() {
    base_image_id();
    let node = unique("e2e");
    let _cleanup = Cleanup::new(&[&node]);
    let server = TestServer::start(ServerOptions::default());
    let agent = TestAgent::enroll_and_start(&server, &node).await;
    let op = server.operator();
    operator::wait_inventory(&op, &node).await;
    let keys = tempfile::tempdir().unwrap();
    let canary = unique("e2e-canary");

    let port = free_port();
    let created = create(&op, &node, "web", port, &[], Some(&canary)).await;
    let id = created.container.id.clone();
    wait_generation(&op, &id, 1).await;
    let known = created.container.known_hosts.clone();
    let old_key = key_file(keys.path(), "old", created.access_private_key.expose());
    let read = login(port, &old_key, &known, "cat /etc/keyward/canary");
    assert!(read.ok, "{}", read.stderr);
    assert_eq!(read.stdout.trim(), canary);

    // Rotation through the CLI: the new key is written 0600 and works; the old one is refused.
    let new_key = keys.path().join("new");
    let out = server.cli(&[
        "container",
        "rotate",
        &id,
        "--key-out",
        new_key.to_str().unwrap(),
        "--wait",
        "120",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !login(port, &old_key, &known, "true").ok,
        "the old access key still logs in"
    );
    let with_new = login(port, &new_key, &known, "true");
    assert!(with_new.ok, "{}", with_new.stderr);

    // Destroy through the CLI, waiting for the wipe.
    let out = server.cli(&["container", "destroy", &id, "--wait", "120"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let selector = [format!("io.keyward.container={id}")];
    assert!(docker::containers_with(&selector).is_empty());
    assert!(docker::images_with(&selector).is_empty());
    assert!(
        dir_contains(&docker::data_root(), canary.as_bytes()).is_empty(),
        "canary under the Docker data root"
    );
    let keys_now: Vec<KeyView> = op.get_json("/v1/keys").await.unwrap();
    let own: Vec<&KeyView> = keys_now
        .iter()
        .filter(|k| k.container.as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(own.len(), 3);
    assert!(
        own.iter()
            .all(|k| k.state == "revoked" && k.revocation.is_some_and(|r| r.complete)),
        "{own:?}"
    );
    let out = server.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agent.log().contains(&canary));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_change_rolls_out_across_two_nodes_in_bounded_batches() {
    base_image_id();
    let (na, nb) = (unique("fa"), unique("fb"));
    let _cleanup = Cleanup::new(&[&na, &nb]);
    let server = TestServer::start(ServerOptions::default());
    let _a = TestAgent::enroll_and_start(&server, &na).await;
    let _b = TestAgent::enroll_and_start(&server, &nb).await;
    let op = server.operator();
    operator::wait_inventory(&op, &na).await;
    operator::wait_inventory(&op, &nb).await;
    let keys = tempfile::tempdir().unwrap();
    let (_, bob_public) = ssh::user_key(keys.path(), "bob");

    let _: serde_json::Value = op
        .post_json(
            "/v1/groups",
            &CreateGroupRequest {
                name: "fleet".into(),
            },
        )
        .await
        .unwrap();
    let _: ChangeOutcome = op
        .post_json(
            "/v1/users",
            &CreateUserRequest {
                name: "bob".into(),
                keys: vec![bob_public],
                groups: vec![],
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for node in [&na, &nb] {
        for i in 0..3 {
            ids.push(
                create(&op, node, &format!("c{i}"), free_port(), &["fleet"], None)
                    .await
                    .container
                    .id,
            );
        }
    }
    for id in &ids {
        wait_generation(&op, id, 1).await;
    }

    // Adding bob to the group changes all six containers, two at a time.
    let overrides = RolloutOverrides {
        batch_size: Some(2),
        max_in_flight: Some(2),
        failure_threshold: Some(1),
    };
    let change: ChangeOutcome = op
        .post_json(
            "/v1/groups/fleet/members",
            &AddMemberRequest {
                user: "bob".into(),
                rollout: overrides,
            },
        )
        .await
        .unwrap();
    assert_eq!(change.containers, 6);
    let rollout = change.rollout.unwrap();

    // The CLI's progress view follows it to 100%, and in flight never exceeds the maximum.
    let watcher = {
        let (url, identity) = (server.api_url.clone(), server.identity());
        let rollout = rollout.clone();
        std::thread::spawn(move || {
            std::process::Command::new(keyward_tests::bins::path("keyward"))
                .args(["--server", &url, "--identity"])
                .arg(identity)
                .args(["rollout", "show", &rollout, "--watch"])
                .output()
                .unwrap()
        })
    };
    let mut most_in_flight = 0;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let view = loop {
        let view: RolloutView = op
            .get_json(&format!("/v1/rollouts/{rollout}"))
            .await
            .unwrap();
        most_in_flight = most_in_flight.max(view.in_flight);
        assert_ne!(view.state, "paused", "{view:?}");
        if view.state == "completed" {
            break view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollout did not complete: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(most_in_flight <= 2, "{most_in_flight} in flight");
    assert_eq!((view.total, view.applied, view.failed), (6, 6, 0));
    assert!(view.largest_batch <= 2 && view.batches >= 3, "{view:?}");
    for id in &ids {
        let c: ContainerView = op.get_json(&format!("/v1/containers/{id}")).await.unwrap();
        assert_eq!(c.applied_generation, 2);
    }
    let out = watcher.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.contains("100%") && last.contains("completed"),
        "{text}"
    );
}
