//! Provisioning latency: from the operator's `container create` to the container running, and
//! from `container destroy` to the wipe confirmed, against the plain `docker` CLI doing the same
//! work on the same engine (`docker build` of the same Dockerfile and context, then `docker run`;
//! `docker rm -f` then `docker rmi`). Runs alternate between the two.
//!
//! "Running" is the engine's own `start` event time for keyward (read from `docker events`), and
//! the return of `docker run -d` (which returns once the container started) for the baseline.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyward_common::client::ApiClient;
use keyward_server::api::{AccessKeyResponse, ContainerView};

use super::{compare, header, ms, row};
use crate::agent::TestAgent;
use crate::docker::{self, Cleanup, base_image_id};
use crate::server::{ServerOptions, TestServer};
use crate::{free_port, operator, unique};

/// Engine `start` events of containers with a keyward container label: id -> unix nanoseconds.
struct StartEvents {
    seen: Arc<Mutex<HashMap<String, u128>>>,
    child: std::process::Child,
}

impl StartEvents {
    fn watch(node: &str) -> Self {
        let mut child = Command::new("docker")
            .args([
                "events",
                "--filter",
                "type=container",
                "--filter",
                "event=start",
            ])
            .args(["--filter", &format!("label=io.keyward.node={node}")])
            .args([
                "--format",
                "{{.TimeNano}} {{index .Actor.Attributes \"io.keyward.container\"}}",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker events");
        let stdout = child.stdout.take().expect("stdout");
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((nanos, id)) = line.split_once(' ')
                    && let Ok(nanos) = nanos.parse::<u128>()
                {
                    sink.lock().unwrap().insert(id.to_string(), nanos);
                }
            }
        });
        Self { seen, child }
    }

    async fn wait(&self, container: &str, timeout: Duration) -> u128 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(n) = self.seen.lock().unwrap().get(container) {
                return *n;
            }
            assert!(Instant::now() < deadline, "no start event for {container}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for StartEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The same build context the agent sends: the agent's Dockerfile (`FROM` the base image id,
/// one `LABEL` line with the four keyward labels, `ADD` of an archive holding an authorized_keys
/// file and a host key, mode 0400, root) built without cache, intermediate containers removed.
fn baseline_context(
    dir: &std::path::Path,
    base: &str,
    label: &str,
    authorized: &str,
    host_key: &str,
) {
    let (key, value) = label.split_once('=').expect("key=value");
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base}\nLABEL \"io.keyward.container\"=\"x\" \"io.keyward.digest\"=\"x\" \
             \"io.keyward.generation\"=\"1\" \"{key}\"=\"{value}\"\nADD [\"files.tar\", \"/\"]\n"
        ),
    )
    .unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in [
        ("root/.ssh/authorized_keys", authorized),
        ("etc/ssh/ssh_host_ed25519_key", host_key),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o400);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        builder
            .append_data(&mut header, path, content.as_bytes())
            .unwrap();
    }
    std::fs::write(dir.join("files.tar"), builder.into_inner().unwrap()).unwrap();
}

fn run_ok(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What the agent logged about one apply: docker build and create+start time.
fn agent_docker_ms(log: &str, container: &str) -> Option<f64> {
    let line = log
        .lines()
        .find(|l| l.contains(container) && l.contains("container started"))?;
    let field = |name: &str| -> Option<f64> {
        let start = line.find(&format!("{name}="))? + name.len() + 1;
        line[start..].split_whitespace().next()?.parse().ok()
    };
    Some(field("build_ms")? + field("start_ms")?)
}

/// Runs the benchmark with `runs` runs of each kind.
pub async fn run(runs: usize) {
    header(&format!(
        "Provisioning latency ({runs} runs each, alternating)"
    ));
    base_image_id();
    let node = unique("bp");
    let cleanup = Cleanup::new(&[&node]);
    let server = TestServer::start(ServerOptions::default());
    let agent = TestAgent::enroll_and_start(&server, &node).await;
    let op = server.operator();
    operator::wait_inventory(&op, &node).await;
    let events = StartEvents::watch(&node);
    let base = base_image_id();
    let dir = tempfile::tempdir().unwrap();
    let label = cleanup.label();

    let (mut create_k, mut create_b, mut share, mut destroy_k, mut destroy_b) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        // keyward: create -> running.
        let started = unix_nanos();
        let created = create(&op, &node, &format!("b{i}")).await;
        let id = created.container.id.clone();
        let running = events.wait(&id, Duration::from_secs(120)).await;
        let total = (running.saturating_sub(started)) as f64 / 1e6;
        create_k.push(total);
        wait_view(&op, &id, |v| v.applied_generation >= 1).await;
        if let Some(docker_ms) = agent_docker_ms(&agent.log(), &id) {
            share.push(total - docker_ms);
        }

        // Baseline: docker build + docker run of the same context.
        let key = created.access_private_key.expose().to_string();
        let authorized = format!("{}\n", ssh_public(&key));
        baseline_context(dir.path(), &base, &label, &authorized, &key);
        let name = format!("kwbench-{}", unique("b"));
        let t = Instant::now();
        let image = run_ok(&[
            "build",
            "-q",
            "--no-cache",
            "--rm",
            "--force-rm",
            dir.path().to_str().unwrap(),
        ]);
        let port = free_port();
        run_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &label,
            "--restart",
            "unless-stopped",
            "-p",
            &format!("127.0.0.1:{port}:22"),
            &image,
        ]);
        create_b.push(ms(t.elapsed()));

        // keyward: destroy -> wipe confirmed.
        let t = Instant::now();
        operator::destroy(&op, &id).await;
        wait_view(&op, &id, |v| v.state == "destroyed").await;
        destroy_k.push(ms(t.elapsed()));

        // Baseline: docker rm -f + docker rmi.
        let t = Instant::now();
        run_ok(&["rm", "-f", "-v", &name]);
        run_ok(&["rmi", &image]);
        destroy_b.push(ms(t.elapsed()));
    }
    compare("create -> running", "ms", &create_k, &create_b);
    if !share.is_empty() {
        row("  of which outside docker (keyward)", "ms", &share);
    }
    compare("destroy -> wipe confirmed", "ms", &destroy_k, &destroy_b);
    drop(events);
    drop(agent);
    drop(cleanup);
}

fn ssh_public(private: &str) -> String {
    ssh_key::PrivateKey::from_openssh(private)
        .unwrap()
        .public_key()
        .to_openssh()
        .unwrap()
}

async fn create(op: &ApiClient, node: &str, name: &str) -> AccessKeyResponse {
    let request = operator::ssh_container(node, name, docker::BASE_IMAGE, Some(free_port()));
    op.post_json("/v1/containers", &request)
        .await
        .expect("create")
}

/// Polls every 5 ms (finer than the harness's 100 ms, which would blur sub-second timings).
async fn wait_view(op: &ApiClient, id: &str, done: impl Fn(&ContainerView) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(view) = op
            .get_json::<ContainerView>(&format!("/v1/containers/{id}"))
            .await
            && done(&view)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not reach the state"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
