//! The key server over real mTLS on loopback, as separate processes: every endpoint, the
//! authorization matrix, enrollment races, watch wake-ups, secrets at rest, the audit chain and
//! bad input. Each scenario runs on SQLite (its own test) and on a real PostgreSQL cluster
//! started by the harness (`every_scenario_passes_on_postgresql`).

use std::time::{Duration, Instant};

use keyward_certs::{FleetCa, Validity};
use keyward_common::api::{ContainerReport, Outcome, StatusReport};
use keyward_common::client::{ApiClient, ClientError};
use keyward_common::dsse::TrustRoot;
use keyward_common::identity::Identity;
use keyward_common::ids::{NodeId, TrustDomain};
use keyward_common::limits::Limits;
use keyward_common::manifest::Action;
use keyward_common::paths::PathRules;
use keyward_common::secret::SecretBytes;
use keyward_common::tls::client_config;
use keyward_common::verify::{VerifiedManifest, Verifier};
use keyward_server::api::{
    AccessKeyResponse, AuditPage, ChangeOutcome, ContainerView, CreateContainerRequest,
    CreateGroupRequest, CreateUserRequest, GroupView, KeyView, NodeView, RolloutOverrides,
    RolloutView, UserView,
};
use keyward_tests::node::{FakeNode, enroll_raw, token};
use keyward_tests::postgres::TestPostgres;
use keyward_tests::server::{ServerOptions, TestServer, dir_contains};
use keyward_tests::{operator, wait};

const CANARY: &str = "keyward-canary-secret-7f3a9c";

fn user_key(comment: &str) -> String {
    let key =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
    let mut public = key.public_key().clone();
    public.set_comment(comment);
    public.to_openssh().unwrap()
}

fn verifier(node: &FakeNode) -> Verifier {
    Verifier {
        trust_root: TrustRoot::from_json(node.trust_root.as_bytes()).unwrap(),
        node: node.id.clone(),
        limits: Limits::default(),
        path_rules: PathRules::default(),
        max_clock_skew: 30,
    }
}

/// Watches and verifies everything the node is sent; returns the revision and manifests.
async fn watch_verified(node: &FakeNode, since: u64, wait: u64) -> (u64, Vec<VerifiedManifest>) {
    let answer = node.watch(since, wait).await.expect("watch");
    let v = verifier(node);
    let now = keyward_common::time::now_unix();
    let snapshot = v
        .snapshot(answer.snapshot.get().as_bytes(), now, None)
        .expect("snapshot verifies");
    let manifests = answer
        .manifests
        .iter()
        .map(|m| {
            v.manifest(m.get().as_bytes(), now, None, &snapshot)
                .expect("manifest verifies")
        })
        .collect();
    (answer.revision, manifests)
}

async fn create_container(
    op: &ApiClient,
    node: &str,
    name: &str,
    groups: &[&str],
) -> AccessKeyResponse {
    let request = CreateContainerRequest {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        files: vec![operator::secret_file("/etc/keyward/canary", CANARY)],
        ..operator::ssh_container(node, name, "keyward/sshd", Some(2222))
    };
    op.post_json("/v1/containers", &request)
        .await
        .expect("creating a container")
}

async fn report(node: &FakeNode, container: &str, generation: u64, outcome: Outcome) {
    let report = StatusReport {
        containers: vec![ContainerReport {
            container_id: Some(container.parse().unwrap()),
            generation: Some(generation),
            outcome,
        }],
        inventory: None,
    };
    node.report(&report).await.expect("report");
}

async fn fetch_files(node: &FakeNode, verified: &VerifiedManifest) -> Vec<Vec<u8>> {
    let m = verified.manifest();
    let mut out = Vec::new();
    for idx in 0..m.files.len() {
        let response = node
            .client
            .send(
                hyper::Method::GET,
                &format!("/v1/node/files/{}/{}/{idx}", m.container_id, m.generation),
                None,
            )
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
        let file = verified
            .verify_file(idx, SecretBytes::new(response.body.to_vec()))
            .expect("file matches digest");
        out.push(file.content().expose().to_vec());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Scenarios

async fn every_endpoint_works_end_to_end(s: &TestServer) {
    let op = s.operator();

    // Health on both listeners; the enrollment listener needs no certificate.
    let anonymous = ApiClient::new(
        &s.enroll_url,
        keyward_common::tls::pinned_ca_client_config(
            keyward_common::ids::Sha256Digest::parse_hex(&s.ca_fingerprint()).unwrap(),
        )
        .unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        &anonymous
            .send(hyper::Method::GET, "/healthz", None)
            .await
            .unwrap()
            .body[..],
        b"ok\n"
    );
    assert_eq!(
        op.send(hyper::Method::GET, "/readyz", None)
            .await
            .unwrap()
            .status,
        200
    );

    // Enrollment and inventory.
    let node = FakeNode::enroll(&op, &s.api_url, "n1").await;
    let image = node.report_image("keyward/sshd:latest").await;
    let nodes: Vec<NodeView> = op.get_json("/v1/nodes").await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0].id.as_str(), nodes[0].state.as_str()),
        ("n1", "active")
    );
    assert_eq!(nodes[0].inventory[0].id, image);

    // Users and groups.
    let _: GroupView = op
        .post_json("/v1/groups", &CreateGroupRequest { name: "ops".into() })
        .await
        .unwrap();
    let alice_key = user_key("alice@laptop");
    let created: ChangeOutcome = op
        .post_json(
            "/v1/users",
            &CreateUserRequest {
                name: "alice".into(),
                keys: vec![alice_key.clone()],
                groups: vec!["ops".into()],
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!((created.rollout, created.containers), (None, 0));
    let alice: UserView = op.get_json("/v1/users/alice").await.unwrap();
    assert_eq!(alice.groups, vec!["ops"]);
    let alice_key_id = alice.keys[0].id.clone();

    // Create: generation 1, access key returned once, image resolved from the inventory.
    let created = create_container(&op, "n1", "web", &["ops"]).await;
    let c = &created.container;
    assert_eq!(
        (c.generation, c.image_id.as_str(), c.state.as_str()),
        (1, image.as_str(), "active")
    );
    assert!(
        created
            .access_private_key
            .expose()
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
    );
    assert!(
        c.known_hosts.starts_with("[127.0.0.1]:2222 ssh-ed25519 "),
        "{}",
        c.known_hosts
    );

    // The node sees it, verifies it, fetches files that match their digests.
    let (revision, manifests) = watch_verified(&node, 0, 0).await;
    assert_eq!(manifests.len(), 1);
    let m = manifests[0].manifest();
    assert_eq!(
        (m.container_id.as_str(), m.generation, m.action),
        (c.id.as_str(), 1, Action::Run)
    );
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/root/.ssh/authorized_keys",
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/keyward/canary"
        ]
    );
    let files = fetch_files(&node, &manifests[0]).await;
    let authorized = String::from_utf8(files[0].clone()).unwrap();
    assert_eq!(authorized.lines().count(), 2, "{authorized}");
    assert!(
        authorized.ends_with(&format!("{alice_key}\n")),
        "{authorized}"
    );
    assert_eq!(files[2], CANARY.as_bytes());

    // Status.
    report(&node, &c.id, 1, Outcome::Applied).await;
    let shown: ContainerView = op
        .get_json(&format!("/v1/containers/{}", c.id))
        .await
        .unwrap();
    assert_eq!(
        (shown.applied_generation, shown.status.as_str()),
        (1, "applied")
    );

    // Renewal gives a working certificate with a new serial.
    let csr = keyward_certs::generate_csr("n1").unwrap();
    let renewed: keyward_common::api::CertificateResponse = node
        .client
        .post_json(
            "/v1/node/renew",
            &keyward_common::api::RenewRequest {
                csr_pem: csr.csr_pem.clone(),
            },
        )
        .await
        .unwrap();
    assert_ne!(renewed.certificate_pem, node.cert_pem);
    let renewed_node = FakeNode::from_parts(
        &s.api_url,
        "n1",
        &renewed.certificate_pem,
        &csr.key_pem,
        &renewed.ca_pem,
        renewed.trust_root.get(),
    );
    renewed_node
        .watch(0, 0)
        .await
        .expect("renewed certificate works");

    // Rotate: a new key, generation 2, the old access key revoked.
    let rotated: AccessKeyResponse = op
        .post_json(
            &format!("/v1/containers/{}/rotate", c.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(rotated.container.generation, 2);
    assert_ne!(
        rotated.access_private_key.expose(),
        created.access_private_key.expose()
    );
    let (revision, manifests) = watch_verified(&node, revision, 5).await;
    assert_eq!(manifests[0].manifest().generation, 2);
    report(&node, &c.id, 2, Outcome::Applied).await;

    // Removing alice starts a rollout; it releases generation 3 without her key.
    let removed: ChangeOutcome = op.delete_json("/v1/users/alice").await.unwrap();
    assert_eq!(removed.containers, 1);
    let rollout = removed.rollout.expect("a rollout");
    let (revision, manifests) = watch_verified(&node, revision, 10).await;
    let third = &manifests[0];
    assert_eq!(third.manifest().generation, 3);
    let files = fetch_files(&node, third).await;
    assert_eq!(
        String::from_utf8(files[0].clone()).unwrap().lines().count(),
        1
    );
    report(&node, &c.id, 3, Outcome::Applied).await;
    let done: RolloutView = wait::until("rollout completion", Duration::from_secs(10), || async {
        let r: RolloutView = op
            .get_json(&format!("/v1/rollouts/{rollout}"))
            .await
            .unwrap();
        (r.state == "completed").then_some(r)
    })
    .await;
    assert_eq!((done.total, done.applied), (1, 1));
    let key: KeyView = op
        .get_json(&format!("/v1/keys/{alice_key_id}"))
        .await
        .unwrap();
    let progress = key.revocation.expect("revocation progress");
    assert_eq!(
        (
            key.state.as_str(),
            progress.holders,
            progress.confirmed,
            progress.complete
        ),
        ("revoked", 1, 1, true)
    );

    // Destroy, then the wipe report marks it destroyed and its keys confirmed revoked.
    let destroying: ContainerView = operator::destroy(&op, &c.id).await;
    assert_eq!(destroying.state, "destroying");
    let (_, manifests) = watch_verified(&node, revision, 5).await;
    assert_eq!(
        (
            manifests[0].manifest().generation,
            manifests[0].manifest().action
        ),
        (4, Action::Destroy)
    );
    assert!(manifests[0].manifest().files.is_empty());
    report(
        &node,
        &c.id,
        4,
        Outcome::Wiped {
            removed: vec!["abc".into()],
        },
    )
    .await;
    let destroyed: ContainerView = op
        .get_json(&format!("/v1/containers/{}", c.id))
        .await
        .unwrap();
    assert_eq!(destroyed.state, "destroyed");
    let keys: Vec<KeyView> = op.get_json("/v1/keys?state=revoked").await.unwrap();
    let container_keys: Vec<&KeyView> = keys
        .iter()
        .filter(|k| k.container.as_deref() == Some(&c.id))
        .collect();
    assert_eq!(container_keys.len(), 3, "two access keys and the host key");
    assert!(
        container_keys
            .iter()
            .all(|k| k.revocation.is_some_and(|r| r.complete))
    );

    // Audit and metrics.
    let page: AuditPage = op.get_json("/v1/audit?limit=1000").await.unwrap();
    let actions: Vec<&str> = page.entries.iter().map(|e| e.action.as_str()).collect();
    for expected in [
        "fleet.init",
        "node.enroll",
        "container.create",
        "container.rotate",
        "user.remove",
        "key.revoke",
        "rollout.complete",
        "container.destroy",
        "container.wipe",
        "node.renew",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    let metrics = String::from_utf8(
        op.send(hyper::Method::GET, "/metrics", None)
            .await
            .unwrap()
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("keyward_manifests_issued_total 4"),
        "{metrics}"
    );

    // The remaining operator endpoints: users' keys, groups and memberships, key revocation,
    // listings, rollout resume.
    let node2: NodeView = op.get_json("/v1/nodes/n1").await.unwrap();
    assert_eq!(node2.containers, 0, "a destroyed container is not counted");
    let second = create_container(&op, "n1", "second", &["ops"])
        .await
        .container
        .id;
    // A listing reads all of a node's containers at once; each entry is what `show` answers.
    let listed: Vec<ContainerView> = op.get_json("/v1/containers?node=n1").await.unwrap();
    let mut ids: Vec<&str> = listed.iter().map(|v| v.id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = [c.id.as_str(), second.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    for view in &listed {
        let shown: ContainerView = op
            .get_json(&format!("/v1/containers/{}", view.id))
            .await
            .unwrap();
        assert_eq!(
            serde_json::to_value(view).unwrap(),
            serde_json::to_value(&shown).unwrap()
        );
    }
    let second_view = listed.iter().find(|v| v.id == second).unwrap();
    assert_eq!(
        (second_view.groups.as_slice(), second_view.state.as_str()),
        (["ops".to_string()].as_slice(), "active")
    );
    let elsewhere: Vec<ContainerView> = op.get_json("/v1/containers?node=n2").await.unwrap();
    assert!(elsewhere.is_empty());
    let bob_key = user_key("bob@laptop");
    let _: ChangeOutcome = op
        .post_json(
            "/v1/users",
            &CreateUserRequest {
                name: "bob".into(),
                keys: vec![],
                groups: vec![],
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    let added: ChangeOutcome = op
        .post_json(
            "/v1/users/bob/keys",
            &keyward_server::api::AddUserKeyRequest {
                key: bob_key,
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (added.rollout, added.containers),
        (None, 0),
        "bob is in no group yet"
    );
    let member: ChangeOutcome = op
        .post_json(
            "/v1/groups/ops/members",
            &keyward_server::api::AddMemberRequest {
                user: "bob".into(),
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!(member.containers, 1);
    let member_rollout = member.rollout.clone().unwrap();
    wait::until(
        "the release of bob's key",
        Duration::from_secs(10),
        || async {
            let r: RolloutView = op
                .get_json(&format!("/v1/rollouts/{member_rollout}"))
                .await
                .ok()?;
            (r.pending == 0).then_some(())
        },
    )
    .await;
    let groups: Vec<GroupView> = op.get_json("/v1/groups").await.unwrap();
    assert_eq!(
        (
            groups[0].name.as_str(),
            groups[0].members.clone(),
            groups[0].containers
        ),
        ("ops", vec!["bob".to_string()], 1)
    );
    let users: Vec<UserView> = op.get_json("/v1/users").await.unwrap();
    let bob_key_id = users.iter().find(|u| u.name == "bob").unwrap().keys[0]
        .id
        .clone();
    let revoked: ChangeOutcome = op
        .post_json(
            &format!("/v1/keys/{bob_key_id}/revoke"),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(
        revoked.containers, 1,
        "the container that received bob's key rolls again"
    );
    let left: ChangeOutcome = op.delete_json("/v1/groups/ops/members/bob").await.unwrap();
    assert_eq!(left.containers, 1);
    let gone: ChangeOutcome = op.delete_json("/v1/groups/ops").await.unwrap();
    assert_eq!(gone.containers, 1);
    let containers: Vec<ContainerView> = op.get_json("/v1/containers?node=n1").await.unwrap();
    assert_eq!(containers.len(), 2);
    assert!(
        containers
            .iter()
            .any(|c| c.id == second && c.groups.is_empty())
    );
    let rollouts: Vec<RolloutView> = op.get_json("/v1/rollouts").await.unwrap();
    assert!(rollouts.len() >= 4, "{rollouts:?}");
    let running = rollouts.iter().find(|r| r.state != "paused").unwrap();
    let err = op
        .post_json::<_, RolloutView>(
            &format!("/v1/rollouts/{}/resume", running.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(409), Some("conflict")));

    // Eviction.
    let evicted: NodeView = op
        .post_json("/v1/nodes/n1/evict", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(evicted.state, "evicted");
}

fn expired_node_client(s: &TestServer, node: &str) -> ApiClient {
    let ca = FleetCa::load(&s.data(), TrustDomain::new("fleet.test").unwrap()).unwrap();
    let past = Validity {
        not_before: time_ago(2 * 86_400),
        not_after: time_ago(86_400),
    };
    let issued = ca
        .issue_identity(&Identity::Node(NodeId::new(node).unwrap()), past)
        .unwrap();
    identity_client(s, &ca, &issued.cert.pem, &issued.key_pem)
}

fn time_ago(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::seconds(secs)
}

fn identity_client(s: &TestServer, ca: &FleetCa, cert_pem: &str, key_pem: &str) -> ApiClient {
    use rustls_pki_types::pem::PemObject as _;
    let cert = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = client_config(
        ca.cert_der(),
        Some(keyward_common::tls::CertifiedKey {
            chain: vec![cert],
            key,
        }),
    )
    .unwrap();
    ApiClient::new(&s.api_url, config, Duration::from_secs(10)).unwrap()
}

async fn authorization_is_enforced(s: &TestServer) {
    let op = s.operator();
    let a = FakeNode::enroll(&op, &s.api_url, "na").await;
    let b = FakeNode::enroll(&op, &s.api_url, "nb").await;
    a.report_image("keyward/sshd:latest").await;
    b.report_image("keyward/sshd:latest").await;
    let on_b = create_container(&op, "nb", "web", &[]).await.container;

    // Node A sees none of B's manifests.
    let answer = a.watch(0, 0).await.unwrap();
    assert!(answer.manifests.is_empty());
    assert!(!answer.snapshot.get().is_empty());
    let v = verifier(&a);
    let snapshot = v
        .snapshot(
            answer.snapshot.get().as_bytes(),
            keyward_common::time::now_unix(),
            None,
        )
        .unwrap();
    assert!(snapshot.snapshot().manifests.is_empty());

    // Node A cannot fetch B's files or report for B; nothing changes.
    let err = a
        .client
        .send(
            hyper::Method::GET,
            &format!("/v1/node/files/{}/1/0", on_b.id),
            None,
        )
        .await
        .unwrap()
        .error_for_status()
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("forbidden")));
    let forged = StatusReport {
        containers: vec![ContainerReport {
            container_id: Some(on_b.id.parse().unwrap()),
            generation: Some(1),
            outcome: Outcome::Applied,
        }],
        inventory: None,
    };
    let err = a.report(&forged).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("forbidden")));
    let after: ContainerView = op
        .get_json(&format!("/v1/containers/{}", on_b.id))
        .await
        .unwrap();
    assert_eq!(
        (after.applied_generation, after.status.as_str()),
        (0, "pending")
    );

    // Identities stay in their lane.
    let err = a
        .client
        .get_json::<serde_json::Value>("/v1/nodes")
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("forbidden")));
    let err = op
        .get_json::<serde_json::Value>("/v1/node/watch?since=0&wait=0")
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("forbidden")));

    // No certificate, a foreign CA, an expired certificate: refused at the TLS layer.
    let ca = FleetCa::load(&s.data(), TrustDomain::new("fleet.test").unwrap()).unwrap();
    let no_cert = ApiClient::new(
        &s.api_url,
        client_config(ca.cert_der(), None).unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(matches!(
        no_cert.get_json::<serde_json::Value>("/v1/nodes").await,
        Err(ClientError::Tls { .. } | ClientError::Http { .. })
    ));
    let foreign = FleetCa::create(
        TrustDomain::new("fleet.test").unwrap(),
        Validity::for_duration(Duration::from_secs(3600)),
    )
    .unwrap();
    let issued = foreign
        .issue_identity(
            &Identity::Node(NodeId::new("na").unwrap()),
            Validity::for_duration(Duration::from_secs(3600)),
        )
        .unwrap();
    let foreign_client = {
        use rustls_pki_types::pem::PemObject as _;
        let cert =
            rustls_pki_types::CertificateDer::from_pem_slice(issued.cert.pem.as_bytes()).unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let config = client_config(
            ca.cert_der(),
            Some(keyward_common::tls::CertifiedKey {
                chain: vec![cert],
                key,
            }),
        )
        .unwrap();
        ApiClient::new(&s.api_url, config, Duration::from_secs(10)).unwrap()
    };
    assert!(matches!(
        foreign_client
            .get_json::<serde_json::Value>("/v1/node/watch?since=0&wait=0")
            .await,
        Err(ClientError::Tls { .. } | ClientError::Http { .. })
    ));
    let expired = expired_node_client(s, "na");
    assert!(matches!(
        expired
            .get_json::<serde_json::Value>("/v1/node/watch?since=0&wait=0")
            .await,
        Err(ClientError::Tls { .. } | ClientError::Http { .. })
    ));

    // Evicted: its certificate is denied at the handshake, and any other certificate for that
    // node id is refused by the evicted node's state.
    let _: NodeView = op
        .post_json("/v1/nodes/nb/evict", &serde_json::json!({}))
        .await
        .unwrap();
    b.client.reset();
    assert!(matches!(
        b.watch(0, 0).await,
        Err(ClientError::CertificateRevoked)
    ));
    let fresh = ca
        .issue_identity(
            &Identity::Node(NodeId::new("nb").unwrap()),
            Validity::for_duration(Duration::from_secs(3600)),
        )
        .unwrap();
    let fresh_client = identity_client(s, &ca, &fresh.cert.pem, &fresh.key_pem);
    let err = fresh_client
        .get_json::<serde_json::Value>("/v1/node/watch?since=0&wait=0")
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(403), Some("node_evicted"))
    );
    // The evicted node's container is orphaned and its keys revoked.
    let orphan: ContainerView = op
        .get_json(&format!("/v1/containers/{}", on_b.id))
        .await
        .unwrap();
    assert_eq!(orphan.state, "orphaned");
}

async fn one_token_enrolls_exactly_once_under_concurrency(s: &TestServer) {
    let op = s.operator();
    let t = token(&op, "racer").await;
    let attempts = (0..6).map(|_| {
        let (url, fingerprint, secret) = (
            t.enroll_url.clone(),
            t.ca_fingerprint.clone(),
            t.token.expose().to_string(),
        );
        async move { enroll_raw(&url, &fingerprint, "racer", &secret).await }
    });
    let results = futures_join_all(attempts).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one enrollment succeeds");
    for err in results.into_iter().filter_map(Result::err) {
        assert_eq!(
            (err.status(), err.code()),
            (Some(401), Some("invalid_token")),
            "{err}"
        );
    }
    // The token stays spent; a token for another node does not enroll this one.
    let again = enroll_raw(&t.enroll_url, &t.ca_fingerprint, "racer", t.token.expose())
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some("invalid_token"));
    let other = token(&op, "other").await;
    let wrong = enroll_raw(
        &t.enroll_url,
        &t.ca_fingerprint,
        "racer",
        other.token.expose(),
    )
    .await
    .unwrap_err();
    assert_eq!(wrong.code(), Some("invalid_token"));
}

async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn a_watch_wakes_within_100_ms_of_a_change_and_only_for_its_node(s: &TestServer) {
    let op = s.operator();
    let a = FakeNode::enroll(&op, &s.api_url, "wa").await;
    let b = FakeNode::enroll(&op, &s.api_url, "wb").await;
    a.report_image("keyward/sshd:latest").await;
    let since_a = a.watch(0, 0).await.unwrap().revision;
    let since_b = b.watch(0, 0).await.unwrap().revision;

    let watch_a = tokio::spawn(async move {
        let answer = a.watch(since_a, 20).await.unwrap();
        (Instant::now(), answer.manifests.len())
    });
    let watch_b = tokio::spawn(async move {
        let started = Instant::now();
        let answer = b.watch(since_b, 2).await.unwrap();
        (started.elapsed(), answer.manifests.len())
    });
    // Let both watches park on the server.
    tokio::time::sleep(Duration::from_millis(300)).await;
    create_container(&op, "wa", "web", &[]).await;
    let committed = Instant::now();
    let (woke, count) = watch_a.await.unwrap();
    assert_eq!(count, 1);
    let latency = woke.saturating_duration_since(committed);
    assert!(
        latency <= Duration::from_millis(100),
        "watch woke {latency:?} after the change"
    );
    let (waited, count) = watch_b.await.unwrap();
    assert_eq!(count, 0);
    assert!(
        waited >= Duration::from_millis(1900),
        "the other node's watch returned early after {waited:?}"
    );
}

fn raw_key_body(pem: &str) -> Vec<String> {
    // The base64 lines of the key: any of them appearing anywhere is a leak.
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 40)
        .map(str::to_string)
        .collect()
}

/// Scans the database files under `db_dir` after asking the database to write everything out.
async fn secrets_appear_nowhere_at_rest(s: &TestServer, db_url: &str, db_dir: &std::path::Path) {
    let op = s.operator();
    let node = FakeNode::enroll(&op, &s.api_url, "sec").await;
    node.report_image("keyward/sshd:latest").await;
    let created = create_container(&op, "sec", "web", &[]).await;
    let rotated: AccessKeyResponse = op
        .post_json(
            &format!("/v1/containers/{}/rotate", created.container.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    let (_, manifests) = watch_verified(&node, 0, 0).await;
    let host_key = String::from_utf8(fetch_files(&node, &manifests[0]).await[1].clone()).unwrap();

    let page: AuditPage = op.get_json("/v1/audit?limit=10000").await.unwrap();
    let audit = serde_json::to_string(&page).unwrap();
    let log = s.log();
    if db_url.starts_with("postgres") {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(db_url).await.unwrap();
        sqlx::query("CHECKPOINT").execute(&pool).await.unwrap();
        pool.close().await;
    }
    let db_files = walk(db_dir);
    assert!(!db_files.is_empty());
    let mut needles = raw_key_body(created.access_private_key.expose());
    needles.extend(raw_key_body(rotated.access_private_key.expose()));
    needles.extend(raw_key_body(&host_key));
    needles.push(CANARY.to_string());
    assert!(needles.len() >= 7);
    for needle in &needles {
        assert!(
            !log.contains(needle.as_str()),
            "secret found in the server log"
        );
        assert!(
            !audit.contains(needle.as_str()),
            "secret found in the audit log"
        );
        for file in &db_files {
            let bytes = std::fs::read(file).unwrap_or_default();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "secret found in {}",
                file.display()
            );
        }
    }
    // The data directory holds no copy either (only the server's own keys).
    for needle in &needles {
        assert!(
            dir_contains(&s.data(), needle.as_bytes()).is_empty(),
            "secret found under the data directory"
        );
    }
}

async fn audit_verify_detects_edits_and_deletions(s: &TestServer, db_url: &str) {
    let op = s.operator();
    let node = FakeNode::enroll(&op, &s.api_url, "aud").await;
    node.report_image("keyward/sshd:latest").await;
    create_container(&op, "aud", "web", &[]).await;
    let verify = || {
        let out = s.cli(&["audit", "verify"]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = verify();
    assert_eq!(code, Some(0), "{text}");

    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(db_url).await.unwrap();
    let subject: String = sqlx::query_scalar("SELECT subject FROM audit WHERE seq = 2")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit SET subject = 'tampered' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    let (code, text) = verify();
    assert_eq!(code, Some(8), "{text}");
    assert!(text.contains("entry 2 was modified"), "{text}");

    sqlx::query("UPDATE audit SET subject = $1 WHERE seq = 2")
        .bind(&subject)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(verify().0, Some(0));

    sqlx::query("DELETE FROM audit WHERE seq = 3")
        .execute(&pool)
        .await
        .unwrap();
    let (code, text) = verify();
    assert_eq!(code, Some(8), "{text}");
    assert!(text.contains("entry 3 is missing"), "{text}");
    pool.close().await;
}

/// What a bad request must leave untouched.
async fn store_fingerprint(op: &ApiClient) -> String {
    let users: serde_json::Value = op.get_json("/v1/users").await.unwrap();
    let groups: serde_json::Value = op.get_json("/v1/groups").await.unwrap();
    let containers: serde_json::Value = op.get_json("/v1/containers").await.unwrap();
    let nodes: serde_json::Value = op.get_json("/v1/nodes").await.unwrap();
    let audit: AuditPage = op.get_json("/v1/audit?limit=10000").await.unwrap();
    format!("{users}{groups}{containers}{nodes}{}", audit.head_seq)
}

async fn expect_error(
    op: &ApiClient,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
    status: u16,
    code: &str,
    message: &str,
) {
    let response = op.send(method.clone(), path, body).await.unwrap();
    let err = response.error_for_status().unwrap_err();
    let ClientError::Status {
        status: got,
        code: got_code,
        message: got_message,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (*got, got_code.as_str()),
        (status, code),
        "{method} {path}: {got_message}"
    );
    assert!(
        got_message.contains(message),
        "{method} {path}: {got_message:?} lacks {message:?}"
    );
}

async fn bad_input_gets_a_clear_error_and_changes_nothing(s: &TestServer) {
    let op = s.operator();
    let node = FakeNode::enroll(&op, &s.api_url, "bad").await;
    node.report_image("keyward/sshd:latest").await;
    let _: GroupView = op
        .post_json("/v1/groups", &CreateGroupRequest { name: "ops".into() })
        .await
        .unwrap();
    let before = store_fingerprint(&op).await;
    let post = hyper::Method::POST;

    expect_error(
        &op,
        post.clone(),
        "/v1/users",
        Some(b"{not json".to_vec()),
        400,
        "bad_request",
        "invalid JSON body",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/users",
        Some(br#"{"name":"x","extra":1}"#.to_vec()),
        400,
        "bad_request",
        "unknown field `extra`",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/users",
        Some(br#"{"name":"a","name":"b"}"#.to_vec()),
        400,
        "bad_request",
        "duplicate field `name`",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/users",
        Some(vec![b' '; 5 * 1024 * 1024]),
        413,
        "too_large",
        "larger than the server accepts",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/users",
        Some(br#"{"name":"Bad Name"}"#.to_vec()),
        400,
        "bad_request",
        "user name \"Bad Name\" is invalid",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/users",
        Some(br#"{"name":"bob","keys":["ssh-ed25519 AAAA"]}"#.to_vec()),
        400,
        "bad_request",
        "not an OpenSSH public key",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/users",
        Some(br#"{"name":"bob","groups":["nogroup"]}"#.to_vec()),
        404,
        "not_found",
        "group nogroup does not exist",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/groups",
        Some(br#"{"name":"ops"}"#.to_vec()),
        409,
        "conflict",
        "group ops already exists",
    )
    .await;
    expect_error(
        &op,
        hyper::Method::GET,
        "/v1/containers/c-0000000000000000",
        None,
        404,
        "not_found",
        "container c-0000000000000000 does not exist",
    )
    .await;
    expect_error(
        &op,
        hyper::Method::DELETE,
        "/v1/users/nobody",
        None,
        404,
        "not_found",
        "user nobody does not exist",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/nodes/nobody/evict",
        Some(b"{}".to_vec()),
        404,
        "not_found",
        "node nobody does not exist",
    )
    .await;
    expect_error(
        &op,
        hyper::Method::GET,
        "/v1/nope",
        None,
        404,
        "not_found",
        "no such endpoint",
    )
    .await;
    let container = |file_path: &str, node: &str, image: &str| {
        serde_json::to_vec(&serde_json::json!({
            "node": node, "name": "web", "image": image,
            "files": [{ "path": file_path, "content_base64": "eA==" }],
        }))
        .unwrap()
    };
    expect_error(
        &op,
        post.clone(),
        "/v1/containers",
        Some(container("/root/../etc/shadow", "bad", "keyward/sshd")),
        400,
        "bad_request",
        "contains a '..' segment",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/containers",
        Some(container("/etc/shadow", "bad", "keyward/sshd")),
        400,
        "bad_request",
        "not under an allowed prefix",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/containers",
        Some(container("/etc/keyward/x", "ghost", "keyward/sshd")),
        404,
        "not_found",
        "node ghost does not exist",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/containers",
        Some(container("/etc/keyward/x", "bad", "missing/image:1")),
        409,
        "conflict",
        "image missing/image:1 is not on node bad",
    )
    .await;
    expect_error(
        &op,
        post.clone(),
        "/v1/containers",
        Some(container("/etc/keyward/x", "Bad", "keyward/sshd")),
        400,
        "bad_request",
        "node id \"Bad\" is invalid",
    )
    .await;
    expect_error(
        &op,
        hyper::Method::GET,
        "/v1/keys?state=maybe",
        None,
        400,
        "bad_request",
        "state must be active or revoked",
    )
    .await;
    expect_error(
        &op,
        hyper::Method::DELETE,
        "/v1/users/x?batch_size=0",
        None,
        404,
        "not_found",
        "user x does not exist",
    )
    .await;

    assert_eq!(
        store_fingerprint(&op).await,
        before,
        "a refused request changed the store"
    );

    // A duplicate container name on the same node is a conflict, and leaves the first intact.
    let first = create_container(&op, "bad", "web", &[]).await;
    let before = store_fingerprint(&op).await;
    let body = serde_json::to_vec(
        &serde_json::json!({ "node": "bad", "name": "web", "image": "keyward/sshd" }),
    )
    .unwrap();
    expect_error(
        &op,
        post,
        "/v1/containers",
        Some(body),
        409,
        "conflict",
        "a container named web already exists on node bad",
    )
    .await;
    assert_eq!(store_fingerprint(&op).await, before);
    let still: ContainerView = op
        .get_json(&format!("/v1/containers/{}", first.container.id))
        .await
        .unwrap();
    assert_eq!(still.generation, 1);
}

/// Two server processes on one PostgreSQL database: a watch held by one wakes, through
/// LISTEN/NOTIFY, for a change made through the other.
async fn replicas_wake_each_others_watchers(s: &TestServer) {
    let replica = s.replica();
    let op_primary = s.operator();
    let node = FakeNode::enroll(&op_primary, &replica.api_url, "rep").await;
    node.report_image("keyward/sshd:latest").await;
    let since = node.watch(0, 0).await.unwrap().revision;
    let watch = tokio::spawn(async move {
        let answer = node.watch(since, 20).await.unwrap();
        (Instant::now(), answer.manifests.len())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    create_container(&op_primary, "rep", "web", &[]).await;
    let committed = Instant::now();
    let (woke, count) = watch.await.unwrap();
    assert_eq!(count, 1);
    let latency = woke.saturating_duration_since(committed);
    assert!(
        latency <= Duration::from_secs(1),
        "the replica's watcher woke {latency:?} after the change"
    );
}

// ---------------------------------------------------------------------------------------------
// SQLite: one test per scenario.

fn sqlite_server() -> TestServer {
    TestServer::start(ServerOptions::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_every_endpoint_works_end_to_end() {
    every_endpoint_works_end_to_end(&sqlite_server()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_authorization_is_enforced() {
    authorization_is_enforced(&sqlite_server()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_token_enrolls_exactly_once_under_concurrency() {
    one_token_enrolls_exactly_once_under_concurrency(&sqlite_server()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_watch_wakes_within_100_ms_of_a_change_and_only_for_its_node() {
    a_watch_wakes_within_100_ms_of_a_change_and_only_for_its_node(&sqlite_server()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_secrets_appear_nowhere_at_rest() {
    let s = sqlite_server();
    let url = format!("sqlite://{}", s.db_path().display());
    secrets_appear_nowhere_at_rest(&s, &url, &s.data()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_audit_verify_detects_edits_and_deletions() {
    let s = sqlite_server();
    let url = format!("sqlite://{}", s.db_path().display());
    audit_verify_detects_edits_and_deletions(&s, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bad_input_gets_a_clear_error_and_changes_nothing() {
    bad_input_gets_a_clear_error_and_changes_nothing(&sqlite_server()).await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: one cluster, a database per scenario.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_on_postgresql() {
    let pg = TestPostgres::start();
    let server = |name: &str| {
        let url = pg.database(name);
        (
            TestServer::start(ServerOptions {
                database_url: Some(url.clone()),
                ..ServerOptions::default()
            }),
            url,
        )
    };

    let (s, _) = server("endpoints");
    every_endpoint_works_end_to_end(&s).await;
    let (s, _) = server("authorization");
    authorization_is_enforced(&s).await;
    let (s, _) = server("enrollment");
    one_token_enrolls_exactly_once_under_concurrency(&s).await;
    let (s, _) = server("watch");
    a_watch_wakes_within_100_ms_of_a_change_and_only_for_its_node(&s).await;
    let (s, url) = server("secrets");
    // PostgreSQL keeps its files under the cluster directory.
    secrets_appear_nowhere_at_rest(&s, &url, pg.dir()).await;
    let (s, url) = server("audit");
    audit_verify_detects_edits_and_deletions(&s, &url).await;
    let (s, _) = server("badinput");
    bad_input_gets_a_clear_error_and_changes_nothing(&s).await;
    let (s, _) = server("replicas");
    replicas_wake_each_others_watchers(&s).await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else {
            out.push(p);
        }
    }
    out
}
