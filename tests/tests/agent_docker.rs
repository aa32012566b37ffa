//! The node agent against the real Docker engine, with a base image made locally by the harness:
//! builds with the signed files, rotation, rollback, destroy and wipe, crash safety, refusals
//! that leave the engine untouched, and two agents sharing one engine.

use std::time::Duration;

use keyward_common::api::Outcome;
use keyward_common::client::ApiClient;
use keyward_common::ids::{ContainerId, ContainerName, ImageId, NodeId, Sha256Digest};
use keyward_common::manifest::{
    Action, BaseImage, FileEntry, Manifest, PortMapping, Protocol, RunSettings, SnapshotEntry,
};
use keyward_common::paths::{FileMode, SafePath};
use keyward_server::api::{
    AccessKeyResponse, AddMemberRequest, ChangeOutcome, ContainerView, CreateContainerRequest,
    CreateGroupRequest, CreateUserRequest, FileSpec, NodeView, RolloutOverrides,
};
use keyward_tests::agent::TestAgent;
use keyward_tests::docker::{
    self, Cleanup, base_image_id, containers_with, images_with, top_images_with,
};
use keyward_tests::evil::EvilServer;
use keyward_tests::server::{ServerOptions, TestServer, dir_contains};
use keyward_tests::{free_port, operator, unique, wait};

const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

struct Fixture {
    // Field order is drop order: agent processes stop before the cleanup removes their objects.
    agent: TestAgent,
    _server: TestServer,
    cleanup: Cleanup,
    op: ApiClient,
    node: String,
}

async fn fixture() -> Fixture {
    fixture_with(&[], &[]).await
}

async fn fixture_with(args: &[&str], env: &[(&str, &str)]) -> Fixture {
    base_image_id();
    let node = unique("n");
    let cleanup = Cleanup::new(&[&node]);
    let server = TestServer::start(ServerOptions::default());
    let agent = TestAgent::enroll_and_start_with(&server, &node, args, env).await;
    let op = server.operator();
    operator::wait_inventory(&op, &node).await;
    Fixture {
        agent,
        _server: server,
        cleanup,
        op,
        node,
    }
}

fn request(
    node: &str,
    name: &str,
    port: u16,
    groups: &[&str],
    files: Vec<FileSpec>,
) -> CreateContainerRequest {
    CreateContainerRequest {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        files,
        ..operator::ssh_container(node, name, docker::BASE_IMAGE, Some(port))
    }
}

async fn wait_applied(op: &ApiClient, id: &str, generation: u64) -> ContainerView {
    let what = format!("generation {generation} applied");
    operator::wait_container(op, id, &what, BUILD_TIMEOUT, |v| {
        v.applied_generation >= generation
    })
    .await
}

async fn wait_status(op: &ApiClient, id: &str, status: &str) -> ContainerView {
    let what = format!("status {status}");
    operator::wait_container(op, id, &what, BUILD_TIMEOUT, |v| v.status == status).await
}

fn label(key: &str, value: &str) -> String {
    format!("{key}={value}")
}

/// Containers and top-level images of a keyward container.
fn objects_of(container: &str) -> (Vec<String>, Vec<String>) {
    let selector = [label("io.keyward.container", container)];
    (containers_with(&selector), top_images_with(&selector))
}

/// Containers and every image, intermediate ones included: what must be empty after a wipe.
fn everything_of(container: &str) -> (Vec<String>, Vec<String>) {
    let selector = [label("io.keyward.container", container)];
    (containers_with(&selector), images_with(&selector))
}

/// Containers and top-level images of a node.
fn node_objects(node: &str) -> (Vec<String>, Vec<String>) {
    let selector = [label("io.keyward.node", node)];
    (containers_with(&selector), top_images_with(&selector))
}

/// Containers and every image of a node, intermediate ones included.
fn node_everything(node: &str) -> (Vec<String>, Vec<String>) {
    let selector = [label("io.keyward.node", node)];
    (containers_with(&selector), images_with(&selector))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_builds_a_container_holding_exactly_the_signed_authorized_keys() {
    let f = fixture().await;
    let mut token = operator::secret_file("/home/app/token", "app-token");
    (token.mode, token.uid, token.gid) = (Some(0o440), Some(1000), Some(1001));
    let req = request(&f.node, "web", free_port(), &[], vec![token]);
    let created: AccessKeyResponse = f.op.post_json("/v1/containers", &req).await.unwrap();
    let view = wait_applied(&f.op, &created.container.id, 1).await;
    assert_eq!(view.status, "applied");

    let (containers, images) = objects_of(&created.container.id);
    assert_eq!((containers.len(), images.len()), (1, 1));
    let (content, mode, uid, gid) = docker::read_file(&containers[0], "/root/.ssh/authorized_keys");
    let access_public = ssh_key::PrivateKey::from_openssh(created.access_private_key.expose())
        .unwrap()
        .public_key()
        .to_openssh()
        .unwrap();
    assert_eq!(
        String::from_utf8(content).unwrap(),
        format!("{access_public}\n")
    );
    assert_eq!((mode, uid, gid), (0o400, 0, 0));
    let (_, mode, uid, gid) = docker::read_file(&containers[0], "/etc/ssh/ssh_host_ed25519_key");
    assert_eq!((mode, uid, gid), (0o400, 0, 0));
    let (content, mode, uid, gid) = docker::read_file(&containers[0], "/home/app/token");
    assert_eq!(
        (content.as_slice(), mode, uid, gid),
        (&b"app-token"[..], 0o440, 1000, 1001)
    );
    // Existing directories of the base image keep their own modes.
    let stat = docker::docker(&[
        "exec",
        &containers[0],
        "/usr/bin/stat",
        "-c",
        "%a",
        "/root",
        "/tmp",
    ]);
    assert_eq!(stat.split_whitespace().collect::<Vec<_>>(), ["700", "1777"]);

    // The container runs from an image built FROM the signed base image id.
    let image_id = docker::docker(&["inspect", "--format", "{{.Image}}", &containers[0]])
        .trim()
        .to_string();
    let history = docker::docker(&["history", "-q", "--no-trunc", &image_id]);
    assert!(history.contains(&base_image_id()), "{history}");
    assert_eq!(
        docker::docker(&["inspect", "--format", "{{.State.Running}}", &containers[0]]).trim(),
        "true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_replaces_the_container_and_leaves_no_old_container_or_image() {
    let f = fixture().await;
    let created: AccessKeyResponse =
        f.op.post_json(
            "/v1/containers",
            &request(&f.node, "web", free_port(), &[], vec![]),
        )
        .await
        .unwrap();
    let id = created.container.id.clone();
    wait_applied(&f.op, &id, 1).await;
    let (first, _) = objects_of(&id);

    let rotated: AccessKeyResponse =
        f.op.post_json(
            &format!("/v1/containers/{id}/rotate"),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(rotated.container.generation, 2);
    wait_applied(&f.op, &id, 2).await;

    let (containers, images) = objects_of(&id);
    assert_eq!(
        (containers.len(), images.len()),
        (1, 1),
        "only generation 2 remains"
    );
    assert_ne!(containers, first);
    let generation = docker::docker(&[
        "inspect",
        "--format",
        "{{index .Config.Labels \"io.keyward.generation\"}}",
        &containers[0],
    ]);
    assert_eq!(generation.trim(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_whose_container_exits_at_once_is_rolled_back_to_the_old() {
    let f = fixture().await;
    // A base image whose start script exits when a key commented "crash-me" is authorized.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("start.sh"),
        "keys=$(cat /root/.ssh/authorized_keys)\ncase \"$keys\" in *crash-me*) echo crashing >&2; exit 3;; esac\nexec /usr/sbin/sshd -D -e\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {}\nCOPY start.sh /start.sh\nCMD [\"/bin/sh\", \"/start.sh\"]\n",
            docker::BASE_IMAGE
        ),
    )
    .unwrap();
    let tag = format!("kwtest-crash:{}", unique("t"));
    let out = std::process::Command::new("docker")
        .args(["build", "-q", "--label", &f.cleanup.label(), "-t", &tag])
        .arg(dir.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crash_image = docker::docker(&["image", "inspect", "--format", "{{.Id}}", &tag])
        .trim()
        .to_string();

    let _: serde_json::Value =
        f.op.post_json("/v1/groups", &CreateGroupRequest { name: "ops".into() })
            .await
            .unwrap();
    let mut req = request(&f.node, "web", free_port(), &["ops"], vec![]);
    req.image = tag.clone();
    req.image_id = Some(crash_image);
    let created: AccessKeyResponse = f.op.post_json("/v1/containers", &req).await.unwrap();
    let id = created.container.id.clone();
    wait_applied(&f.op, &id, 1).await;
    let (old, _) = objects_of(&id);

    // Adding a user whose key crashes the container releases generation 2.
    let key =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
    let mut public = key.public_key().clone();
    public.set_comment("crash-me");
    let _: ChangeOutcome =
        f.op.post_json(
            "/v1/users",
            &CreateUserRequest {
                name: "crasher".into(),
                keys: vec![public.to_openssh().unwrap()],
                groups: vec![],
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    let change: ChangeOutcome =
        f.op.post_json(
            "/v1/groups/ops/members",
            &AddMemberRequest {
                user: "crasher".into(),
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    assert!(change.rollout.is_some());

    let failed = wait_status(&f.op, &id, "failed").await;
    assert_eq!(failed.applied_generation, 1);
    let reason = failed.status_reason.unwrap_or_default();
    assert!(
        reason.contains("did not stay running") && reason.contains("previous generation restored"),
        "{reason}"
    );
    // The old container is back and running; nothing of generation 2 is left.
    let (containers, images) = objects_of(&id);
    assert_eq!(containers, old);
    assert_eq!(images.len(), 1);
    assert_eq!(
        docker::docker(&["inspect", "--format", "{{.State.Running}}", &containers[0]]).trim(),
        "true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_leaves_no_container_image_build_cache_or_secret_bytes_behind() {
    let f = fixture().await;
    let canary = format!("keyward-canary-{}", unique("c"));
    let files = vec![operator::secret_file("/etc/keyward/canary", &canary)];
    let created: AccessKeyResponse =
        f.op.post_json(
            "/v1/containers",
            &request(&f.node, "web", free_port(), &[], files),
        )
        .await
        .unwrap();
    let id = created.container.id.clone();
    wait_applied(&f.op, &id, 1).await;
    let (containers, _) = objects_of(&id);
    assert_eq!(
        docker::read_file(&containers[0], "/etc/keyward/canary").0,
        canary.as_bytes()
    );
    let cache_before = docker::build_cache_entries();

    operator::destroy(&f.op, &id).await;
    let wiped = wait::until("the wipe", BUILD_TIMEOUT, || async {
        let view: ContainerView = f.op.get_json(&format!("/v1/containers/{id}")).await.ok()?;
        (view.state == "destroyed").then_some(view)
    })
    .await;
    assert_eq!(wiped.status, "wiped");

    assert_eq!(
        everything_of(&id),
        (vec![], vec![]),
        "no container or image with its labels remains"
    );
    assert_eq!(
        docker::build_cache_entries(),
        cache_before.min(docker::build_cache_entries())
    );
    assert_eq!(docker::build_cache_entries(), 0, "no build cache");
    let hits = dir_contains(&docker::data_root(), canary.as_bytes());
    assert!(
        hits.is_empty(),
        "canary found under the Docker data root: {hits:?}"
    );

    // Neither the agent's state directory nor its log ever held secret bytes.
    let access_line = created
        .access_private_key
        .expose()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    for needle in [canary.as_str(), access_line.as_str()] {
        assert!(
            dir_contains(&f.agent.state(), needle.as_bytes()).is_empty(),
            "secret in the agent state directory"
        );
        assert!(!f.agent.log().contains(needle), "secret in the agent log");
    }
}

async fn crash_at(point: &str) {
    let mut f = fixture().await;
    let port = free_port();
    if point == "during-destroy" {
        let created: AccessKeyResponse =
            f.op.post_json(
                "/v1/containers",
                &request(&f.node, "web", port, &[], vec![]),
            )
            .await
            .unwrap();
        wait_applied(&f.op, &created.container.id, 1).await;
        f.agent.kill();
        f.agent.start_with_env(&[("KEYWARD_TEST_CRASH_AT", point)]);
        operator::destroy(&f.op, &created.container.id).await;
        let status = f
            .agent
            .wait_exit(BUILD_TIMEOUT)
            .expect("the agent reached the crash point");
        assert!(!status.success());
        f.agent.start();
        wait::until("the wipe after the crash", BUILD_TIMEOUT, || async {
            let view: ContainerView =
                f.op.get_json(&format!("/v1/containers/{}", created.container.id))
                    .await
                    .ok()?;
            (view.state == "destroyed").then_some(())
        })
        .await;
        assert_eq!(node_everything(&f.node), (vec![], vec![]));
        return;
    }

    f.agent.kill();
    f.agent.start_with_env(&[("KEYWARD_TEST_CRASH_AT", point)]);
    let created: AccessKeyResponse =
        f.op.post_json(
            "/v1/containers",
            &request(&f.node, "web", port, &[], vec![]),
        )
        .await
        .unwrap();
    let status = f
        .agent
        .wait_exit(BUILD_TIMEOUT)
        .expect("the agent reached the crash point");
    assert!(!status.success());
    // The crash left something behind: an image (after build) or also a container (after create).
    let (containers, images) = node_objects(&f.node);
    assert!(!images.is_empty());
    if point == "after-create" {
        assert!(!containers.is_empty());
    }
    f.agent.start();
    wait_applied(&f.op, &created.container.id, 1).await;
    let (containers, images) = node_objects(&f.node);
    assert_eq!(
        (containers.len(), images.len()),
        (1, 1),
        "converged without orphans"
    );
    assert_eq!(
        docker::docker(&["inspect", "--format", "{{.State.Running}}", &containers[0]]).trim(),
        "true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_build_converges_without_orphans() {
    crash_at("after-build").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_create_converges_without_orphans() {
    crash_at("after-create").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_destroy_converges_to_a_full_wipe() {
    crash_at("during-destroy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_mismatched_base_image_is_refused_and_nothing_is_built() {
    let f = fixture().await;
    let absent = format!("sha256:{}", "0".repeat(64));
    let mut req = request(&f.node, "web", free_port(), &[], vec![]);
    req.image_id = Some(absent.clone());
    let created: AccessKeyResponse = f.op.post_json("/v1/containers", &req).await.unwrap();
    let view = wait_status(&f.op, &created.container.id, "refused").await;
    let reason = view.status_reason.unwrap_or_default();
    assert!(
        reason.starts_with(&format!(
            "check 7 (base image): image {absent} is not present on this host"
        )),
        "{reason}"
    );
    assert_eq!(node_objects(&f.node), (vec![], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_engine_touch_only_their_own_objects() {
    base_image_id();
    let (na, nb) = (unique("na"), unique("nb"));
    let cleanup = Cleanup::new(&[&na, &nb]);
    let server = TestServer::start(ServerOptions::default());
    let _a = TestAgent::enroll_and_start(&server, &na).await;
    let _b = TestAgent::enroll_and_start(&server, &nb).await;
    let op = server.operator();
    operator::wait_inventory(&op, &na).await;
    operator::wait_inventory(&op, &nb).await;
    // A container nobody manages, which neither agent may touch.
    let bystander = docker::docker(&[
        "run",
        "-d",
        "--label",
        &cleanup.label(),
        docker::BASE_IMAGE,
        "/usr/bin/sleep",
        "300",
    ])
    .trim()
    .to_string();

    let on_a: AccessKeyResponse = op
        .post_json(
            "/v1/containers",
            &request(&na, "web", free_port(), &[], vec![]),
        )
        .await
        .unwrap();
    let on_b: AccessKeyResponse = op
        .post_json(
            "/v1/containers",
            &request(&nb, "web", free_port(), &[], vec![]),
        )
        .await
        .unwrap();
    wait_applied(&op, &on_a.container.id, 1).await;
    wait_applied(&op, &on_b.container.id, 1).await;
    let b_objects = node_objects(&nb);

    operator::destroy(&op, &on_a.container.id).await;
    wait::until("the wipe on node a", BUILD_TIMEOUT, || async {
        let view: ContainerView = op
            .get_json(&format!("/v1/containers/{}", on_a.container.id))
            .await
            .ok()?;
        (view.state == "destroyed").then_some(())
    })
    .await;
    assert_eq!(node_everything(&na), (vec![], vec![]));
    assert_eq!(
        node_objects(&nb),
        b_objects,
        "node b's objects are untouched"
    );
    assert_eq!(
        docker::docker(&["inspect", "--format", "{{.State.Running}}", &bystander]).trim(),
        "true"
    );
    drop(cleanup);
}

// ---------------------------------------------------------------------------------------------
// Refusals: an evil server with the real server's stolen TLS identity and signing key.

struct Evil {
    evil: EvilServer,
    agent: TestAgent,
    _cleanup: Cleanup,
    node: NodeId,
    _server_dir: TestServer,
}

async fn evil_fixture() -> Evil {
    base_image_id();
    let node = unique("ev");
    let cleanup = Cleanup::new(&[&node]);
    let mut server = TestServer::start(ServerOptions::default());
    let mut agent = TestAgent::enroll_and_start(&server, &node).await;
    agent.kill();
    let port: u16 = server.api_url.rsplit(':').next().unwrap().parse().unwrap();
    server.stop();
    let evil = EvilServer::start(&server.data(), port).await;
    agent.start();
    Evil {
        evil,
        agent,
        _cleanup: cleanup,
        node: NodeId::new(node).unwrap(),
        _server_dir: server,
    }
}

fn evil_manifest(node: &NodeId, generation: u64, path: &str) -> (Manifest, Vec<u8>) {
    let content =
        b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEvilEvilEvilEvilEvilEvilEvilEvilEvilEvilEv evil\n"
            .to_vec();
    let now = keyward_common::time::now_unix();
    let manifest = Manifest {
        container_id: ContainerId::new("c-evil").unwrap(),
        container_name: ContainerName::new("evil").unwrap(),
        node: node.clone(),
        generation,
        revision: 10,
        issued_at: now - 1,
        expires_at: now + 3600,
        action: Action::Run,
        image: BaseImage {
            reference: docker::BASE_IMAGE.into(),
            id: ImageId::new(base_image_id()).unwrap(),
        },
        run: RunSettings::default(),
        files: vec![FileEntry {
            path: SafePath::parse(path).unwrap(),
            mode: FileMode::OWNER_READ,
            uid: 0,
            gid: 0,
            size: content.len() as u64,
            sha256: Sha256Digest::of(&content),
        }],
    };
    (manifest, content)
}

/// Queues one watch answer carrying `envelope` under a snapshot listing (generation, digest).
fn serve(
    e: &Evil,
    revision: u64,
    envelope: &str,
    generation: u64,
    digest: Sha256Digest,
    snapshot_ttl: i64,
    snapshot_node: &NodeId,
) {
    let entry = SnapshotEntry {
        container_id: ContainerId::new("c-evil").unwrap(),
        generation,
        digest,
    };
    let snapshot = e
        .evil
        .sign_snapshot(snapshot_node, revision, vec![entry], snapshot_ttl);
    e.evil.push_watch(EvilServer::watch_answer(
        revision,
        &snapshot,
        &[envelope.to_string()],
    ));
}

async fn refusal(e: &Evil, needle: &str) -> String {
    wait::until(
        &format!("a refusal mentioning {needle:?}"),
        Duration::from_secs(30),
        || async {
            e.evil
                .reports()
                .iter()
                .flat_map(|r| r.containers.clone())
                .find_map(|c| match c.outcome {
                    Outcome::Refused { reason } if reason.contains(needle) => Some(reason),
                    _ => None,
                })
        },
    )
    .await
}

fn assert_engine_untouched(e: &Evil) {
    assert_eq!(
        node_objects(e.node.as_str()),
        (vec![], vec![]),
        "the refused input changed the engine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_manifest_is_refused_and_nothing_changes() {
    let e = evil_fixture().await;
    let (manifest, content) = evil_manifest(&e.node, 1, "/root/.ssh/authorized_keys");
    let (envelope, digest) = e.evil.sign_manifest(&manifest);
    // Flip one character inside the base64 payload.
    let mut tampered = envelope.clone().into_bytes();
    let at = envelope.find("\"payload\":\"").unwrap() + 20;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    e.evil
        .script
        .lock()
        .unwrap()
        .files
        .insert(("c-evil".into(), 1, 0), content);
    serve(
        &e,
        1000,
        &String::from_utf8(tampered).unwrap(),
        1,
        digest,
        60,
        &e.node,
    );
    let reason = refusal(&e, "check").await;
    assert!(
        reason.starts_with("check 1 (envelope)") || reason.starts_with("check 2 (signature)"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_engine_untouched(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_for_another_node_is_refused_and_nothing_changes() {
    let e = evil_fixture().await;
    let other = NodeId::new("someone-else").unwrap();
    let (manifest, content) = evil_manifest(&other, 1, "/root/.ssh/authorized_keys");
    let (envelope, digest) = e.evil.sign_manifest(&manifest);
    e.evil
        .script
        .lock()
        .unwrap()
        .files
        .insert(("c-evil".into(), 1, 0), content);
    serve(&e, 1000, &envelope, 1, digest, 60, &e.node);
    let reason = refusal(&e, "check 3 (node)").await;
    assert!(reason.contains("is for node someone-else"), "{reason}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_engine_untouched(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_snapshot_is_refused_and_nothing_changes() {
    let e = evil_fixture().await;
    let (manifest, content) = evil_manifest(&e.node, 1, "/root/.ssh/authorized_keys");
    let (envelope, digest) = e.evil.sign_manifest(&manifest);
    e.evil
        .script
        .lock()
        .unwrap()
        .files
        .insert(("c-evil".into(), 1, 0), content);
    serve(&e, 1000, &envelope, 1, digest, -120, &e.node);
    let reason = refusal(&e, "check 5 (freshness): snapshot is stale").await;
    assert!(reason.contains("expired at"), "{reason}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_engine_untouched(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traversal_path_is_refused_and_nothing_changes() {
    let e = evil_fixture().await;
    let (mut manifest, content) = evil_manifest(&e.node, 1, "/root/.ssh/authorized_keys");
    // A path that is syntactically clean but outside the agent's allowed prefixes...
    manifest.files[0].path = SafePath::parse("/etc/shadow").unwrap();
    let (envelope, digest) = e.evil.sign_manifest(&manifest);
    e.evil
        .script
        .lock()
        .unwrap()
        .files
        .insert(("c-evil".into(), 1, 0), content);
    serve(&e, 1000, &envelope, 1, digest, 60, &e.node);
    let reason = refusal(&e, "check 6 (files)").await;
    assert!(
        reason.contains("\"/etc/shadow\" is not under an allowed prefix"),
        "{reason}"
    );

    // ...and a `..` path, which cannot even be parsed.
    let mut value = serde_json::to_value(&manifest).unwrap();
    value["files"][0]["path"] = "/root/.ssh/../../etc/shadow".into();
    value["generation"] = 2.into();
    let payload = serde_json::to_vec(&value).unwrap();
    let digest = Sha256Digest::of(&payload);
    let envelope = String::from_utf8(
        e.evil
            .signing
            .sign_envelope(keyward_common::dsse::MANIFEST_PAYLOAD_TYPE, payload)
            .encode(),
    )
    .unwrap();
    serve(&e, 1001, &envelope, 2, digest, 60, &e.node);
    let reason = refusal(&e, "contains a '..' segment").await;
    assert!(reason.starts_with("check 1 (envelope)"), "{reason}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_engine_untouched(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_generation_is_refused_also_after_an_agent_restart() {
    let mut e = evil_fixture().await;
    let port = free_port();
    let with_port = |generation: u64| {
        let (mut m, content) = evil_manifest(&e.node, generation, "/root/.ssh/authorized_keys");
        m.run.ports = vec![PortMapping {
            container_port: 22,
            protocol: Protocol::Tcp,
            host_ip: [127, 0, 0, 1].into(),
            host_port: port,
        }];
        (m, content)
    };
    // Host key too, so sshd starts and generation 2 applies.
    let host =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
    let host_pem = host
        .to_openssh(ssh_key::LineEnding::LF)
        .unwrap()
        .as_bytes()
        .to_vec();
    let add_host_key = |m: &mut Manifest| {
        m.files.push(FileEntry {
            path: SafePath::parse("/etc/ssh/ssh_host_ed25519_key").unwrap(),
            mode: FileMode::OWNER_READ,
            uid: 0,
            gid: 0,
            size: host_pem.len() as u64,
            sha256: Sha256Digest::of(&host_pem),
        })
    };
    let (mut g2, content) = with_port(2);
    add_host_key(&mut g2);
    let (g2_envelope, g2_digest) = e.evil.sign_manifest(&g2);
    {
        let mut script = e.evil.script.lock().unwrap();
        script
            .files
            .insert(("c-evil".into(), 2, 0), content.clone());
        script
            .files
            .insert(("c-evil".into(), 2, 1), host_pem.clone());
        script
            .files
            .insert(("c-evil".into(), 1, 0), content.clone());
        script
            .files
            .insert(("c-evil".into(), 1, 1), host_pem.clone());
    }
    serve(&e, 1000, &g2_envelope, 2, g2_digest, 60, &e.node);
    wait::until("generation 2 applied", BUILD_TIMEOUT, || async {
        e.evil
            .reports()
            .iter()
            .flat_map(|r| r.containers.clone())
            .any(|c| c.generation == Some(2) && c.outcome == Outcome::Applied)
            .then_some(())
    })
    .await;
    let before = node_objects(e.node.as_str());
    assert_eq!((before.0.len(), before.1.len()), (1, 1));

    // Generation 1, validly signed and listed, is older than the mark: refused.
    let (mut g1, _) = with_port(1);
    add_host_key(&mut g1);
    let (g1_envelope, g1_digest) = e.evil.sign_manifest(&g1);
    serve(&e, 1001, &g1_envelope, 1, g1_digest, 60, &e.node);
    let reason = refusal(&e, "check 4 (generation)").await;
    assert!(
        reason.contains("generation 1 of container c-evil is not above the high-water mark 2"),
        "{reason}"
    );

    // The same after a restart: the mark was persisted.
    e.agent.kill();
    e.evil.script.lock().unwrap().reports.clear();
    e.agent.start();
    let reason = refusal(&e, "check 4 (generation)").await;
    assert!(
        reason.contains("not above the high-water mark 2"),
        "{reason}"
    );
    assert_eq!(
        node_objects(e.node.as_str()),
        before,
        "the replay changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_at_two_thirds_of_its_life_and_keeps_working() {
    base_image_id();
    let node = unique("rn");
    let _cleanup = Cleanup::new(&[&node]);
    let options = ServerOptions {
        extra_args: vec!["--node-cert-validity-secs".into(), "30".into()],
        ..ServerOptions::default()
    };
    let server = TestServer::start(options);
    let agent = TestAgent::enroll_and_start(&server, &node).await;
    let op = server.operator();
    operator::wait_inventory(&op, &node).await;
    let identity = || {
        keyward_common::ids::Sha256Digest::of(
            &std::fs::read(agent.state().join("identity.pem")).unwrap(),
        )
    };
    let first = identity();

    // Renewal is due 20 s into the 30 s certificate; the agent renews on its next pass and
    // replaces its identity file (certificate and key together).
    wait::until("the renewal", Duration::from_secs(60), || async {
        let page: keyward_server::api::AuditPage =
            op.get_json("/v1/audit?limit=1000").await.ok()?;
        let renewed = page
            .entries
            .iter()
            .any(|e| e.action == "node.renew" && e.subject == node);
        (renewed && identity() != first).then_some(())
    })
    .await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agent.state().join("identity.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        agent.log().contains("node certificate renewed"),
        "{}",
        agent.log()
    );

    // After the first certificate expired, the agent still talks to the server.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let created: AccessKeyResponse = f_create(&op, &node).await;
    let view = wait::until("a container after the renewal", BUILD_TIMEOUT, || async {
        let view: ContainerView = op
            .get_json(&format!("/v1/containers/{}", created.container.id))
            .await
            .ok()?;
        (view.applied_generation >= 1).then_some(view)
    })
    .await;
    assert_eq!(view.status, "applied");
}

async fn f_create(op: &ApiClient, node: &str) -> AccessKeyResponse {
    op.post_json(
        "/v1/containers",
        &request(node, "web", free_port(), &[], vec![]),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_agent_stops_and_refuses_to_start_again() {
    let mut f = fixture().await;
    let _: NodeView =
        f.op.post_json(
            &format!("/v1/nodes/{}/evict", f.node),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    let status = f
        .agent
        .wait_exit(Duration::from_secs(60))
        .expect("the agent stops after eviction");
    assert_eq!(status.code(), Some(3), "{}", f.agent.log());
    assert!(f.agent.log().contains("evicted"), "{}", f.agent.log());
    let marks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.agent.state().join("marks.json")).unwrap())
            .unwrap();
    assert_eq!(marks["evicted"], true);

    // A restart applies nothing and exits the same way.
    f.agent.start();
    let status = f
        .agent
        .wait_exit(Duration::from_secs(30))
        .expect("the restarted agent stops");
    assert_eq!(status.code(), Some(3));
    assert_eq!(node_objects(&f.node), (vec![], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_policy_stop_containers_stop_when_the_snapshot_expires_and_start_when_the_server_returns()
 {
    base_image_id();
    let node = unique("ex");
    let _cleanup = Cleanup::new(&[&node]);
    let options = ServerOptions {
        extra_args: ["--snapshot-ttl-secs", "6", "--watch-max-wait-secs", "2"]
            .iter()
            .map(|a| a.to_string())
            .collect(),
        ..ServerOptions::default()
    };
    let mut server = TestServer::start(options);
    let mut agent =
        TestAgent::enroll_and_start_with(&server, &node, &["--expiry-policy", "stop"], &[]).await;
    let op = server.operator();
    operator::wait_inventory(&op, &node).await;
    let created: AccessKeyResponse = op
        .post_json(
            "/v1/containers",
            &request(&node, "web", free_port(), &[], vec![]),
        )
        .await
        .unwrap();
    wait_applied(&op, &created.container.id, 1).await;
    let (containers, _) = objects_of(&created.container.id);
    let running = || {
        docker::docker(&["inspect", "--format", "{{.State.Running}}", &containers[0]])
            .trim()
            .to_string()
    };
    assert_eq!(running(), "true");

    // The server goes away; once the last snapshot expired the agent stops the container.
    server.stop();
    wait::until("the container to stop", Duration::from_secs(60), || async {
        (running() == "false").then_some(())
    })
    .await;
    assert!(agent.log().contains("policy stop"), "{}", agent.log());
    // Nothing was removed, and the agent itself keeps running and retrying.
    assert_eq!(objects_of(&created.container.id).0, containers);
    assert!(agent.is_running());

    // The server returns; the agent starts the same container again.
    server.start_again();
    wait::until(
        "the container to run again",
        Duration::from_secs(90),
        || async { (running() == "true").then_some(()) },
    )
    .await;
    assert_eq!(objects_of(&created.container.id).0, containers);
    agent.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_already_taken_is_reported_as_a_failure_with_the_reason() {
    let f = fixture().await;
    // Occupy the port on 127.0.0.1 so Docker cannot publish it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let created: AccessKeyResponse =
        f.op.post_json(
            "/v1/containers",
            &request(&f.node, "web", port, &[], vec![]),
        )
        .await
        .unwrap();
    let view = wait_status(&f.op, &created.container.id, "failed").await;
    let reason = view.status_reason.unwrap_or_default();
    assert!(
        reason.contains("address already in use") || reason.contains("port is already allocated"),
        "{reason}"
    );
    // The failed attempt left no container behind, and the agent keeps running.
    assert!(objects_of(&created.container.id).0.is_empty());
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_labelled_for_this_node_that_no_manifest_wants_are_removed() {
    let f = fixture().await;
    let stray_id = "c-0123456789abcdef";
    let stray = docker::docker(&[
        "create",
        "--label",
        &format!("io.keyward.node={}", f.node),
        "--label",
        &format!("io.keyward.container={stray_id}"),
        "--label",
        "io.keyward.generation=1",
        docker::BASE_IMAGE,
    ])
    .trim()
    .to_string();
    // Any change makes the agent reconcile; a new container is one.
    let created: AccessKeyResponse =
        f.op.post_json(
            "/v1/containers",
            &request(&f.node, "web", free_port(), &[], vec![]),
        )
        .await
        .unwrap();
    wait_applied(&f.op, &created.container.id, 1).await;
    wait::until(
        "the stray to be removed",
        Duration::from_secs(30),
        || async { objects_of(stray_id).0.is_empty().then_some(()) },
    )
    .await;
    let (gone, _) = docker::docker_try(&["inspect", &stray]);
    assert!(!gone, "the stray container still exists");
    // The wanted container is untouched.
    assert_eq!(objects_of(&created.container.id).0.len(), 1);
}
