//! Issuance: a rollout that derives, signs and stores a new generation for every one of N
//! containers in one release, on SQLite and on PostgreSQL, against the raw ed25519 signing rate
//! measured in the same process. The figure is the whole change: adding a user to the group
//! every container grants, which creates the rollout and releases all N in one transaction.
//!
//! The server's service layer runs in this process (the same code `keyward-server` runs) so the
//! figure is the issuing itself, not HTTP. The N containers are seeded directly in the store (a
//! row each, with a sealed host key), because creating them one by one through the API would
//! take minutes and measure something else.

use std::time::{Duration, Instant};

use keyward_common::dsse::{MANIFEST_PAYLOAD_TYPE, ManifestSigningKey};
use keyward_server::api::{
    AddMemberRequest, CreateGroupRequest, CreateUserRequest, RolloutOverrides, RolloutView,
};
use keyward_server::config::{LogFormat, Settings};
use keyward_server::datadir::{DataDir, InitOptions};
use keyward_server::service::Service;

use super::header;
use crate::postgres::TestPostgres;

fn settings(data: &std::path::Path, database_url: String) -> Settings {
    Settings {
        data_dir: data.to_path_buf(),
        trust_domain: "fleet.test".into(),
        listen: ([127, 0, 0, 1], 0).into(),
        enroll_listen: ([127, 0, 0, 1], 0).into(),
        server_url: "https://127.0.0.1:1".into(),
        enroll_url: "https://127.0.0.1:2".into(),
        database_url,
        log_format: LogFormat::Text,
        manifest_ttl: Duration::from_secs(7 * 86_400),
        snapshot_ttl: Duration::from_secs(120),
        watch_max_wait: Duration::from_secs(30),
        node_cert_validity: Duration::from_secs(86_400),
        join_token_ttl: Duration::from_secs(3600),
        rollout: keyward_server::api::RolloutPolicy {
            batch_size: 10,
            max_in_flight: 20,
            failure_threshold: 3,
        },
        max_connections: 100,
        max_body_bytes: 4 << 20,
    }
}

/// Seeds `count` active containers on one node, all granting group `all`.
async fn seed(service: &Service, count: usize) {
    let pool = service.store.pool();
    let access = keyward_server::sshkeys::generate("bench-access").unwrap();
    let host = keyward_server::sshkeys::generate("bench-host").unwrap();
    let image = format!("sha256:{}", "ab".repeat(32));
    let run = r#"{"command":[],"env":[],"ports":[]}"#;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO nodes (id, state, created_at) VALUES ('bench', 'active', 0)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO groups (name, created_at) VALUES ('all', 0)")
        .execute(&mut *tx)
        .await
        .unwrap();
    for i in 0..count {
        let id = format!("c-{i:016x}");
        let (access_id, host_id) = (format!("ka-{i}"), format!("kh-{i}"));
        for (key_id, kind, key) in [(&access_id, "access", &access), (&host_id, "host", &host)] {
            sqlx::query(
                "INSERT INTO keys (id, kind, container_id, fingerprint, public_key, state, created_at) \
                 VALUES ($1, $2, $3, $4, $5, 'active', 0)",
            )
            .bind(key_id)
            .bind(kind)
            .bind(&id)
            .bind(&key.fingerprint)
            .bind(&key.public_line)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        let sealed = service.kek.seal(
            &format!("host-key:{id}"),
            host.private_openssh.expose().as_bytes(),
        );
        sqlx::query(
            "INSERT INTO containers (id, node_id, name, state, image_ref, image_id, run_settings, generation, \
             access_key_id, host_key_id, host_key_enc, known_hosts, created_at) \
             VALUES ($1, 'bench', $2, 'active', 'bench/image', $3, $4, 0, $5, $6, $7, 'x', 0)",
        )
        .bind(&id)
        .bind(format!("c{i}"))
        .bind(&image)
        .bind(run)
        .bind(&access_id)
        .bind(&host_id)
        .bind(sealed)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query("INSERT INTO container_groups (container_id, group_name) VALUES ($1, 'all')")
            .bind(&id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Issues one generation for each of `count` containers; returns (seconds, manifests issued).
async fn issue_all(database_url: Option<String>, count: usize) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = InitOptions {
        dir: data.clone(),
        domain: "fleet.test".into(),
        sans: vec!["127.0.0.1".into()],
        operator: "admin".into(),
        config: Default::default(),
    };
    let (data_dir, _) = DataDir::init(&options).unwrap();
    let url =
        database_url.unwrap_or_else(|| keyward_server::store::Store::sqlite_url(data_dir.root()));
    let service = keyward_server::daemon::build_service(settings(&data, url))
        .await
        .unwrap();
    seed(&service, count).await;

    let key = keyward_server::sshkeys::generate("bench-user").unwrap();
    let _ = service
        .create_group(
            "operator/bench",
            CreateGroupRequest {
                name: "unused".into(),
            },
        )
        .await;
    service
        .create_user(
            "operator/bench",
            CreateUserRequest {
                name: "u".into(),
                keys: vec![key.public_line],
                groups: vec![],
                rollout: RolloutOverrides::default(),
            },
        )
        .await
        .unwrap();
    let all = Some(count as u64);
    let overrides = RolloutOverrides {
        batch_size: all,
        max_in_flight: all,
        failure_threshold: Some(1),
    };

    // Adding the user to the group starts a rollout over every container and releases its
    // first batch (all of them) in the same transaction: derive, sign, store, commit.
    let started = Instant::now();
    let change = service
        .add_member(
            "operator/bench",
            "all",
            AddMemberRequest {
                user: "u".into(),
                rollout: overrides,
            },
        )
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let rollout = change.rollout.expect("a rollout");
    let view: RolloutView = service.show_rollout(&rollout).await.unwrap();
    service.store.close().await;
    (elapsed, view.in_flight)
}

/// Signs `count` manifest-sized payloads with one key; returns signatures per second.
fn raw_signing_rate(count: usize) -> f64 {
    let key = ManifestSigningKey::generate();
    let payload = vec![b'x'; 900];
    let started = Instant::now();
    for i in 0..count {
        let mut p = payload.clone();
        p[..8].copy_from_slice(&(i as u64).to_le_bytes());
        std::hint::black_box(key.sign_envelope(MANIFEST_PAYLOAD_TYPE, p).encode());
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Runs the benchmark with `count` containers, `repeats` times per backend, on SQLite and, when
/// `postgres` is set, on PostgreSQL.
pub async fn run(count: usize, repeats: usize, postgres: bool) {
    header(&format!(
        "Issuance: one rollout of {count} containers ({repeats} runs per backend)"
    ));
    let mut rates_raw = Vec::new();
    let (mut sqlite, mut pg_rates) = (Vec::new(), Vec::new());
    let pg = postgres.then(TestPostgres::start);
    for i in 0..repeats {
        rates_raw.push(raw_signing_rate(count));
        let (secs, issued) = issue_all(None, count).await;
        assert_eq!(issued, count as u64, "every container got a new generation");
        sqlite.push(count as f64 / secs);
        if let Some(pg) = &pg {
            let url = pg.database(&format!("bench{i}"));
            let (secs, issued) = issue_all(Some(url), count).await;
            assert_eq!(issued, count as u64);
            pg_rates.push(count as f64 / secs);
        }
    }
    super::compare(
        "manifests/s issued+stored, SQLite",
        "/s",
        &sqlite,
        &rates_raw,
    );
    if !pg_rates.is_empty() {
        super::compare(
            "manifests/s issued+stored, PostgreSQL",
            "/s",
            &pg_rates,
            &rates_raw,
        );
    }
    super::row("raw ed25519 envelope signing", "/s", &rates_raw);
}
