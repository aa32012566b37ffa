//! The Docker Compose fleet: a key server and two agents sharing the host's engine, brought up
//! from this repository with no registry, one container provisioned on each node, and the stack
//! torn down with `down -v`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keyward_common::client::ApiClient;
use keyward_server::api::{AccessKeyResponse, ContainerView, NodeView};
use keyward_tests::docker::{self, Cleanup, containers_with, images_with};
use keyward_tests::{bins, free_port, operator, unique, wait};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `docker compose` where available, else `docker-compose` (Compose v1).
fn compose_command() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// A compose project; `down -v --rmi all` on drop, also when the test fails.
struct Project {
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let command = compose_command();
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..])
            .args(["-p", &self.name])
            .args(args)
            .current_dir(repo());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("running compose")
    }

    fn container_of(&self, service: &str) -> String {
        let out = self.run(&["ps", "-q", service]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let out = self.run(&["down", "-v", "--rmi", "all", "--remove-orphans"]);
        if !out.status.success() {
            eprintln!(
                "compose down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

async fn create(op: &ApiClient, node: &str) -> AccessKeyResponse {
    let request = operator::ssh_container(node, "web", docker::BASE_IMAGE, Some(free_port()));
    op.post_json("/v1/containers", &request)
        .await
        .expect("container create")
}

async fn wait_state(
    op: &ApiClient,
    id: &str,
    done: impl Fn(&ContainerView) -> bool,
) -> ContainerView {
    operator::wait_container(op, id, "the expected state", Duration::from_secs(180), done).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_fleet_provisions_one_container_per_node_and_each_agent_touches_only_its_own() {
    // Binaries and local images, without running cargo inside the test.
    let out = Command::new(repo().join("scripts/compose-prepare"))
        .arg("--bin-dir")
        .arg(bins::dir())
        .output()
        .expect("running scripts/compose-prepare");
    assert!(
        out.status.success(),
        "compose-prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let id = unique("kw");
    let (node_a, node_b) = (format!("{id}-a"), format!("{id}-b"));
    let _cleanup = Cleanup::new(&[&node_a, &node_b]);
    let port = free_port();
    let project = Project {
        name: id.replace('-', ""),
        env: vec![
            ("KEYWARD_API_PORT".into(), port.to_string()),
            ("KEYWARD_NODE_A".into(), node_a.clone()),
            ("KEYWARD_NODE_B".into(), node_b.clone()),
            ("KEYWARD_IMAGE".into(), format!("keyward/keyward:{id}")),
        ],
    };
    let up = project.run(&["up", "-d", "--build"]);
    assert!(
        up.status.success(),
        "compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );

    // The operator identity lives in the server's volume; copy it out.
    let identity = tempfile::tempdir().unwrap();
    let server = project.container_of("server");
    let op = wait::until(
        "the server's operator identity",
        Duration::from_secs(60),
        || {
            let (server, dir) = (server.clone(), identity.path().to_path_buf());
            async move {
                let (ok, _) = docker::docker_try(&[
                    "cp",
                    &format!("{server}:/data/operator/."),
                    dir.to_str()?,
                ]);
                if !ok {
                    return None;
                }
                keyward_server::cli::connect(
                    &format!("https://127.0.0.1:{port}"),
                    &dir,
                    Duration::from_secs(10),
                )
                .ok()
            }
        },
    )
    .await;
    for node in [&node_a, &node_b] {
        wait::until(
            &format!("{node} to enroll and report its images"),
            Duration::from_secs(120),
            || async {
                let view: NodeView = op.get_json(&format!("/v1/nodes/{node}")).await.ok()?;
                (view.state == "active" && !view.inventory.is_empty()).then_some(())
            },
        )
        .await;
    }

    let on_a = create(&op, &node_a).await.container.id;
    let on_b = create(&op, &node_b).await.container.id;
    wait_state(&op, &on_a, |v| v.applied_generation >= 1).await;
    wait_state(&op, &on_b, |v| v.applied_generation >= 1).await;

    // Each agent built and runs only its own node's container.
    let of_node = |node: &str| containers_with(&[format!("io.keyward.node={node}")]);
    let of_container = |c: &str| containers_with(&[format!("io.keyward.container={c}")]);
    assert_eq!(of_node(&node_a), of_container(&on_a));
    assert_eq!(of_node(&node_b), of_container(&on_b));
    assert_eq!((of_node(&node_a).len(), of_node(&node_b).len()), (1, 1));
    let b_before = of_node(&node_b);

    // Destroying node a's container leaves node b's alone.
    operator::destroy(&op, &on_a).await;
    wait_state(&op, &on_a, |v| v.state == "destroyed").await;
    assert!(of_node(&node_a).is_empty());
    assert!(images_with(&[format!("io.keyward.node={node_a}")]).is_empty());
    assert_eq!(of_node(&node_b), b_before);
    operator::destroy(&op, &on_b).await;
    wait_state(&op, &on_b, |v| v.state == "destroyed").await;

    // Tear down: nothing of the project is left.
    let down = project.run(&["down", "-v", "--rmi", "all", "--remove-orphans"]);
    assert!(
        down.status.success(),
        "compose down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    let label = format!("com.docker.compose.project={}", project.name);
    assert!(containers_with(std::slice::from_ref(&label)).is_empty());
    let volumes = docker::docker(&["volume", "ls", "-q", "--filter", &format!("label={label}")]);
    assert!(volumes.trim().is_empty(), "volumes left: {volumes}");
    let networks = docker::docker(&["network", "ls", "-q", "--filter", &format!("label={label}")]);
    assert!(networks.trim().is_empty(), "networks left: {networks}");
}
