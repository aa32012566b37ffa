//! Footprint: the idle agent's resident memory and CPU with N containers under management, over
//! an idle window. Baseline: a `docker events` client (an idle, long-running Docker API client)
//! measured over the same window.

use std::process::{Command, Stdio};
use std::time::Duration;

use keyward_server::api::{AccessKeyResponse, ContainerView};

use super::{cpu_time, header, rss_kib};
use crate::agent::TestAgent;
use crate::docker::{self, Cleanup, base_image_id};
use crate::server::{ServerOptions, TestServer};
use crate::{free_port, operator, unique, wait};

/// Runs the benchmark with `containers` containers and an idle window of `window`.
pub async fn run(containers: usize, window: Duration) {
    header(&format!(
        "Agent footprint: {containers} containers, idle window {} s",
        window.as_secs()
    ));
    base_image_id();
    let node = unique("fp");
    let cleanup = Cleanup::new(&[&node]);
    let server = TestServer::start(ServerOptions::default());
    let agent = TestAgent::enroll_and_start(&server, &node).await;
    let op = server.operator();
    operator::wait_inventory(&op, &node).await;
    let mut ids = Vec::new();
    for i in 0..containers {
        let name = format!("c{i}");
        let request = operator::ssh_container(&node, &name, docker::BASE_IMAGE, Some(free_port()));
        let created: AccessKeyResponse = op.post_json("/v1/containers", &request).await.unwrap();
        ids.push(created.container.id);
    }
    for id in &ids {
        wait::until("containers running", Duration::from_secs(600), || async {
            let view: ContainerView = op.get_json(&format!("/v1/containers/{id}")).await.ok()?;
            (view.applied_generation >= 1).then_some(())
        })
        .await;
    }

    // Idle: let the last report settle, then measure both processes over the same window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut events = Command::new("docker")
        .args(["events"])
        .stdout(Stdio::null())
        .spawn()
        .expect("docker events");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent_pid = agent.pid().expect("agent running");
    let (a0, e0) = (cpu_time(agent_pid), cpu_time(events.id()));
    tokio::time::sleep(window).await;
    let (a1, e1) = (cpu_time(agent_pid), cpu_time(events.id()));
    let (agent_rss, events_rss) = (rss_kib(agent_pid), rss_kib(events.id()));
    let _ = events.kill();
    let _ = events.wait();
    let percent = |d: Duration| d.as_secs_f64() / window.as_secs_f64() * 100.0;
    println!(
        "{:<34} {:>8.1} MiB RSS  {:>6.2} % CPU  | baseline (docker events) {:>8.1} MiB RSS  {:>6.2} % CPU  | RSS ratio {:.2}",
        format!("idle agent, {containers} containers"),
        agent_rss as f64 / 1024.0,
        percent(a1.saturating_sub(a0)),
        events_rss as f64 / 1024.0,
        percent(e1.saturating_sub(e0)),
        agent_rss as f64 / events_rss.max(1) as f64
    );
    drop(agent);
    drop(cleanup);
}
