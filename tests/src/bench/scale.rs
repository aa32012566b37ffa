//! Connection scale: the server's resident memory with increasing numbers of idle watchers
//! (baseline: the same process with none), full mTLS handshakes per second (baseline: a bare
//! TLS server with the same configuration in this process), and a reconnect storm after a
//! server restart, with every simulated agent retrying with exponential backoff and jitter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyward_common::client::ApiClient;
use rand::Rng as _;
use tokio::sync::{Semaphore, watch};

use super::fleet::{BareServer, client_to, enroll_many};
use super::{compare, header, rss_kib};
use crate::node::FakeNode;
use crate::server::{ServerOptions, TestServer};

/// Reads `keyward_watchers` from the server's metrics.
async fn watchers(op: &ApiClient) -> u64 {
    let Ok(response) = op.send(hyper::Method::GET, "/metrics", None).await else {
        return 0;
    };
    String::from_utf8_lossy(&response.body)
        .lines()
        .find_map(|l| l.strip_prefix("keyward_watchers "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Counters shared by the simulated agents.
#[derive(Default)]
struct Counters {
    /// Failed attempts that were retried (connection refused or reset during a restart).
    retried: AtomicU64,
    /// Agents that gave up (never happens with backoff unless the server stays down).
    gave_up: AtomicUsize,
}

/// One simulated agent: long-polls forever, retrying failures with exponential backoff and
/// jitter (100 ms doubling to 5 s, each delay drawn between half and all of it).
async fn agent(node: Arc<FakeNode>, counters: Arc<Counters>, mut stop: watch::Receiver<bool>) {
    let mut since = 0;
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0;
    loop {
        let answer = tokio::select! {
            a = node.watch(since, 60) => a,
            _ = stop.changed() => return,
        };
        match answer {
            Ok(answer) => {
                since = answer.revision;
                backoff = Duration::from_millis(100);
                failures = 0;
            }
            Err(_) => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                failures += 1;
                if failures > 60 {
                    counters.gave_up.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                node.client.reset();
                let millis = backoff.as_millis() as u64;
                let delay =
                    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis));
                backoff = (backoff * 2).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

async fn wait_watchers(op: &ApiClient, at_least: usize, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if watchers(op).await >= at_least as u64 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "only {} of {at_least} watchers connected",
            watchers(op).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens `count` fresh connections (full handshakes), `concurrency` at a time, each making one
/// request to `path`; returns handshakes per second.
async fn handshake_rate(clients: &[ApiClient], path: &str, concurrency: usize) -> f64 {
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for client in clients {
        let (client, permits, path) = (client.clone(), permits.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            client.reset();
            client
                .send(hyper::Method::GET, &path, None)
                .await
                .expect("request")
                .error_for_status()
                .expect("2xx");
        }));
    }
    for task in tasks {
        task.await.expect("handshake task");
    }
    clients.len() as f64 / started.elapsed().as_secs_f64()
}

/// Runs the benchmark at the given watcher levels (the largest is also the storm size), with
/// `handshakes` fresh connections for the handshake rate.
pub async fn run(levels: &[usize], handshakes: usize) {
    let most = *levels.iter().max().expect("levels");
    header(&format!(
        "Connection scale: idle watchers {levels:?}, {handshakes} handshakes, storm of {most}"
    ));
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut server = TestServer::start(ServerOptions::default());
    let op = server.operator();
    let started = Instant::now();
    let nodes = enroll_many(&op, &server.api_url, "s", most, 32).await;
    println!(
        "(enrolled {most} nodes in {:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // Memory: idle baseline, then each level.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = server.pid().expect("server running");
    let idle = rss_kib(pid);
    println!(
        "{:<34} {:>10} KiB  (baseline: enrolled, no watchers)",
        "server RSS, 0 watchers", idle
    );
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut running = 0;
    for &level in levels {
        // Ramp up in chunks so the handshakes do not all land in the same instant.
        while running < level {
            let chunk = (level - running).min(500);
            for node in &nodes[running..running + chunk] {
                tokio::spawn(agent(node.clone(), counters.clone(), stop.clone()));
            }
            running += chunk;
            wait_watchers(&op, running, Duration::from_secs(300)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(pid);
        let per = (rss.saturating_sub(idle)) as f64 / level as f64;
        println!(
            "{:<34} {:>10} KiB  ({:.1} MiB, {:.1} KiB per watcher over the baseline)",
            format!("server RSS, {level} watchers"),
            rss,
            rss as f64 / 1024.0,
            per
        );
    }

    // Reconnect storm: restart the server under every watcher.
    server.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start_again();
    let restarted = Instant::now();
    let op = server.operator();
    let took = wait_watchers(&op, most, Duration::from_secs(600)).await;
    println!(
        "{:<34} {:>10.1} s   (server down {:.1} s; {} failed attempts retried with backoff, {} agents gave up)",
        format!("reconnect storm, {most} agents"),
        took.as_secs_f64(),
        restarted.saturating_duration_since(down).as_secs_f64(),
        counters.retried.load(Ordering::Relaxed),
        counters.gave_up.load(Ordering::Relaxed)
    );
    assert_eq!(
        counters.gave_up.load(Ordering::Relaxed),
        0,
        "agents gave up during the storm"
    );
    let _ = stop_tx.send(true);

    // Handshakes: keyward's API listener against a bare TLS server with the same configuration.
    let sample: Vec<&Arc<FakeNode>> = nodes.iter().cycle().take(handshakes).collect();
    let keyward_clients: Vec<ApiClient> = sample
        .iter()
        .map(|n| client_to(n, &server.api_url))
        .collect();
    let bare = BareServer::start(&server.data()).await;
    let bare_clients: Vec<ApiClient> = sample.iter().map(|n| client_to(n, &bare.url)).collect();
    let (mut k, mut b) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        k.push(handshake_rate(&keyward_clients, "/healthz", 32).await);
        b.push(handshake_rate(&bare_clients, "/ping", 32).await);
    }
    compare("full mTLS handshakes + request", "/s", &k, &b);
}
