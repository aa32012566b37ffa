//! `keyward-quickstart`: keyward's main job on its embedded defaults, on this machine.
//!
//! Initializes a server in a local data directory (SQLite), starts it and a local agent, makes
//! the sshd base image if it is missing, registers the invoking user's SSH key if there is one,
//! provisions a container and prints the `ssh` command and the `known_hosts` line. It then keeps
//! running with the server's and the agent's logs until interrupted, and destroys and wipes what
//! it made. With `--once` it runs the whole lifecycle (create, log in, rotate, revoke, destroy,
//! check the wipe) and exits 0 with a summary table, or non-zero naming the failed step.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use keyward_common::client::ApiClient;
use keyward_server::api::{
    AccessKeyResponse, ChangeOutcome, ContainerView, CreateContainerRequest, CreateGroupRequest,
    CreateTokenRequest, CreateUserRequest, KeyView, NodeView, RolloutOverrides, RolloutView,
    TokenResponse,
};
use keyward_tests::{docker, operator, ssh};

/// Run keyward end to end on this machine: server, agent, a container you can SSH into.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Run the whole lifecycle once (create, log in, rotate, revoke, destroy, check the wipe),
    /// print a summary and exit.
    #[arg(long)]
    once: bool,
    /// Data directory (recreated on every run).
    #[arg(long, default_value = ".keyward/quickstart")]
    data: PathBuf,
    /// Host port on 127.0.0.1 for the container's SSH daemon [default: a free port].
    #[arg(long)]
    port: Option<u16>,
    /// Base image to build containers from (made by scripts/make-base-image if missing).
    #[arg(long, default_value = docker::BASE_IMAGE)]
    image: String,
}

const NODE: &str = "local";

/// A child process killed when dropped.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("stopping {}", self.name);
            self.terminate();
        }
    }
}

/// Step results for the summary table.
struct Steps {
    rows: Vec<(String, &'static str, Duration)>,
}

impl Steps {
    async fn run<T, F>(&mut self, name: &str, step: F) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = anyhow::Result<T>>,
    {
        println!("==> {name}");
        let started = Instant::now();
        match step.await {
            Ok(value) => {
                self.rows.push((name.to_string(), "ok", started.elapsed()));
                Ok(value)
            }
            Err(e) => {
                self.rows
                    .push((name.to_string(), "FAILED", started.elapsed()));
                self.print();
                Err(e.context(format!("step failed: {name}")))
            }
        }
    }

    fn print(&self) {
        let width = self
            .rows
            .iter()
            .map(|r| r.0.len())
            .max()
            .unwrap_or(4)
            .max(4);
        println!();
        println!("{:<width$}  RESULT  TIME", "STEP");
        for (name, result, took) in &self.rows {
            println!("{name:<width$}  {result:<6}  {:.1}s", took.as_secs_f64());
        }
    }
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("binary directory")?.join(name);
    ensure!(
        path.exists(),
        "{} is missing; build with `cargo build --workspace --bins` (scripts/quickstart does)",
        path.display()
    );
    Ok(path)
}

fn start_server(data: &Path) -> anyhow::Result<(Process, String)> {
    let log = std::fs::File::create(data.join("server.log"))?;
    let mut child = Command::new(bin("keyward-server")?)
        .args(["serve", "--data"])
        .arg(data.join("server"))
        .args(["--listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting keyward-server")?;
    let mut line = String::new();
    let mut stdout = child.stdout.take().context("server stdout")?;
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    let api = line
        .split_whitespace()
        .find_map(|p| p.strip_prefix("api="))
        .with_context(|| {
            format!(
                "keyward-server did not start; see {}",
                data.join("server.log").display()
            )
        })?;
    Ok((
        Process {
            name: "keyward-server",
            child,
        },
        format!("https://{api}"),
    ))
}

fn user_public_key() -> Option<(PathBuf, String)> {
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"]
        .iter()
        .find_map(|name| {
            let path = home.join(".ssh").join(name);
            let text = std::fs::read_to_string(&path).ok()?;
            Some((path, text.trim().to_string()))
        })
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn container(op: &ApiClient, id: &str) -> anyhow::Result<ContainerView> {
    Ok(op.get_json(&format!("/v1/containers/{id}")).await?)
}

async fn wait_applied(op: &ApiClient, id: &str, generation: u64) -> anyhow::Result<ContainerView> {
    wait_for(
        &format!("generation {generation} to run"),
        Duration::from_secs(180),
        || async {
            let view = container(op, id).await?;
            if view.status == "failed" || view.status == "refused" {
                bail!(
                    "the agent reported {}: {}",
                    view.status,
                    view.status_reason.clone().unwrap_or_default()
                );
            }
            Ok((view.applied_generation >= generation).then_some(view))
        },
    )
    .await
}

fn known_hosts_file(data: &Path, line: &str) -> anyhow::Result<PathBuf> {
    let path = data.join("known_hosts");
    std::fs::write(&path, format!("{line}\n"))?;
    Ok(path)
}

/// Everything the quick start set up.
struct Setup {
    server: Process,
    agent: Process,
    op: ApiClient,
    api_url: String,
    container: AccessKeyResponse,
    key_path: PathBuf,
    port: u16,
    canary: String,
}

async fn setup(args: &Args, steps: &mut Steps) -> anyhow::Result<Setup> {
    let data = args.data.clone();
    steps
        .run("prepare the data directory and base image", async {
            if data.exists() {
                std::fs::remove_dir_all(&data)
                    .with_context(|| format!("removing {}", data.display()))?;
            }
            std::fs::create_dir_all(&data)?;
            // Objects left by an interrupted earlier run.
            docker::Cleanup::new(&[NODE]).run();
            if !docker::docker_try(&["image", "inspect", &args.image]).0 {
                ensure!(
                    args.image == docker::BASE_IMAGE,
                    "image {} is not on this host",
                    args.image
                );
                docker::base_image_id();
            }
            Ok(())
        })
        .await?;

    let (server, api_url) = steps
        .run("initialize and start the key server (SQLite)", async {
            let out = Command::new(bin("keyward-server")?)
                .args(["init", "--data"])
                .arg(data.join("server"))
                .args([
                    "--domain",
                    "quickstart.local",
                    "--san",
                    "127.0.0.1",
                    "--san",
                    "localhost",
                ])
                .output()?;
            ensure!(
                out.status.success(),
                "init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            start_server(&data)
        })
        .await?;
    let op = keyward_server::cli::connect(
        &api_url,
        &data.join("server/operator"),
        Duration::from_secs(30),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let agent = steps
        .run("enroll and start the local agent", async {
            let token: TokenResponse = op
                .post_json(
                    "/v1/nodes/tokens",
                    &CreateTokenRequest {
                        node: NODE.into(),
                        ttl_seconds: Some(600),
                    },
                )
                .await?;
            let state = data.join("agent");
            let out = Command::new(bin("keyward-agent")?)
                .args(["enroll", "--state"])
                .arg(&state)
                .args([
                    "--server",
                    &token.server_url,
                    "--enroll-url",
                    &token.enroll_url,
                    "--node",
                    NODE,
                ])
                .args(["--ca-fingerprint", &token.ca_fingerprint])
                .env("KEYWARD_JOIN_TOKEN", token.token.expose())
                .output()?;
            ensure!(
                out.status.success(),
                "enroll: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let log = std::fs::File::create(data.join("agent.log"))?;
            let child = Command::new(bin("keyward-agent")?)
                .args(["run", "--state"])
                .arg(&state)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?;
            let agent = Process {
                name: "keyward-agent",
                child,
            };
            wait_for(
                "the agent's image inventory",
                Duration::from_secs(60),
                || async {
                    let node: NodeView = op.get_json(&format!("/v1/nodes/{NODE}")).await?;
                    Ok((!node.inventory.is_empty()).then_some(()))
                },
            )
            .await?;
            Ok(agent)
        })
        .await?;

    steps
        .run("register users", async {
            let _: serde_json::Value = op
                .post_json(
                    "/v1/groups",
                    &CreateGroupRequest {
                        name: "local".into(),
                    },
                )
                .await?;
            let user = std::env::var("USER")
                .unwrap_or_else(|_| "me".into())
                .to_lowercase();
            match (
                user_public_key(),
                keyward_common::ids::UserName::new(user.clone()),
            ) {
                (Some((path, key)), Ok(name)) => {
                    let _: ChangeOutcome = op
                        .post_json(
                            "/v1/users",
                            &CreateUserRequest {
                                name: name.to_string(),
                                keys: vec![key],
                                groups: vec!["local".into()],
                                rollout: RolloutOverrides::default(),
                            },
                        )
                        .await?;
                    println!("    registered your key {} as user {name}", path.display());
                }
                _ => {
                    println!("    no ~/.ssh/id_*.pub found; log in with the container's access key")
                }
            }
            Ok(())
        })
        .await?;

    let port = args.port.unwrap_or_else(keyward_tests::free_port);
    let canary = keyward_tests::unique("quickstart-canary");
    let (container, key_path) = steps
        .run("provision a container and wait until it runs", async {
            let request = CreateContainerRequest {
                groups: vec!["local".into()],
                files: vec![operator::secret_file("/etc/keyward/canary", &canary)],
                ..operator::ssh_container(NODE, "demo", &args.image, Some(port))
            };
            let created: AccessKeyResponse = op.post_json("/v1/containers", &request).await?;
            let key_path = data.join("access_key");
            keyward_certs::files::write_secret(
                &key_path,
                created.access_private_key.expose().as_bytes(),
            )?;
            wait_applied(&op, &created.container.id, 1).await?;
            Ok((created, key_path))
        })
        .await?;

    Ok(Setup {
        server,
        agent,
        op,
        api_url,
        container,
        key_path,
        port,
        canary,
    })
}

fn print_login(args: &Args, s: &Setup) -> anyhow::Result<()> {
    let known_hosts = known_hosts_file(&args.data, &s.container.container.known_hosts)?;
    println!();
    println!("container {} runs on node {NODE}", s.container.container.id);
    println!("known_hosts line: {}", s.container.container.known_hosts);
    println!("log in:");
    println!(
        "  ssh -i {} -p {} -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} root@127.0.0.1",
        s.key_path.display(),
        s.port,
        known_hosts.display()
    );
    Ok(())
}

/// Copies new lines of `path` to stdout with `prefix`.
fn tail(path: &Path, offset: &mut u64, prefix: &str) {
    let Ok(mut file) = std::fs::File::open(path) else {
        return;
    };
    if file.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut text = String::new();
    if let Ok(n) = file.read_to_string(&mut text) {
        *offset += n as u64;
        for line in text.lines() {
            println!("{prefix} {line}");
        }
    }
}

async fn destroy_and_check(
    op: &ApiClient,
    id: &str,
    canary: &str,
    steps: &mut Steps,
) -> anyhow::Result<()> {
    steps
        .run("destroy the container and wait for the wipe", async {
            let _: ContainerView = op
                .post_json(
                    &format!("/v1/containers/{id}/destroy"),
                    &serde_json::json!({}),
                )
                .await?;
            wait_for("the wipe", Duration::from_secs(120), || async {
                Ok((container(op, id).await?.state == "destroyed").then_some(()))
            })
            .await
        })
        .await?;
    steps
        .run(
            "check the wipe: no container, image or canary left",
            async {
                let selector = [format!("io.keyward.container={id}")];
                ensure!(
                    docker::containers_with(&selector).is_empty(),
                    "a container with the labels remains"
                );
                ensure!(
                    docker::images_with(&selector).is_empty(),
                    "an image with the labels remains"
                );
                let root = docker::data_root();
                if std::fs::read_dir(&root).is_ok() {
                    let hits = keyward_tests::server::dir_contains(&root, canary.as_bytes());
                    ensure!(
                        hits.is_empty(),
                        "the canary secret is still under {}: {hits:?}",
                        root.display()
                    );
                } else {
                    println!(
                        "    (cannot read {} as this user; skipped the canary scan)",
                        root.display()
                    );
                }
                let keys: Vec<KeyView> = op.get_json("/v1/keys").await?;
                let own: Vec<&KeyView> = keys
                    .iter()
                    .filter(|k| k.container.as_deref() == Some(id))
                    .collect();
                ensure!(
                    own.iter().all(|k| k.state == "revoked"),
                    "a key of the container is still active"
                );
                Ok(())
            },
        )
        .await
}

async fn once(args: &Args) -> anyhow::Result<()> {
    let mut steps = Steps { rows: Vec::new() };
    let mut s = setup(args, &mut steps).await?;
    print_login(args, &s)?;
    let id = s.container.container.id.clone();
    let known = s.container.container.known_hosts.clone();
    let port = s.port;

    steps
        .run(
            "log in with the access key (ssh, strict host key checking)",
            async {
                let login = ssh::login(port, &s.key_path, &known, "cat /etc/keyward/canary");
                ensure!(login.ok, "ssh failed: {}", login.stderr);
                ensure!(
                    login.stdout.trim() == s.canary,
                    "the injected file has other content"
                );
                Ok(())
            },
        )
        .await?;

    let demo_dir = tempfile::tempdir()?;
    let (demo_key, demo_public) = ssh::user_key(demo_dir.path(), "demo");
    steps
        .run(
            "add user demo to the group and log in with their key",
            async {
                let change: ChangeOutcome =
                    s.op.post_json(
                        "/v1/users",
                        &CreateUserRequest {
                            name: "demo".into(),
                            keys: vec![demo_public.clone()],
                            groups: vec!["local".into()],
                            rollout: RolloutOverrides::default(),
                        },
                    )
                    .await?;
                let rollout = change
                    .rollout
                    .context("adding a user to the group starts a rollout")?;
                wait_rollout(&s.op, &rollout).await?;
                let login = ssh::login(port, &demo_key, &known, "id -u");
                ensure!(
                    login.ok && login.stdout.trim() == "0",
                    "demo could not log in: {}",
                    login.stderr
                );
                Ok(())
            },
        )
        .await?;

    let old_key = s.key_path.clone();
    steps
        .run("rotate the access key: old refused, new accepted", async {
            let rotated: AccessKeyResponse =
                s.op.post_json(
                    &format!("/v1/containers/{id}/rotate"),
                    &serde_json::json!({}),
                )
                .await?;
            let new_key = args.data.join("access_key.rotated");
            keyward_certs::files::write_secret(
                &new_key,
                rotated.access_private_key.expose().as_bytes(),
            )?;
            wait_applied(&s.op, &id, rotated.container.generation).await?;
            ensure!(
                !ssh::login(port, &old_key, &known, "true").ok,
                "the old key still logs in"
            );
            ensure!(
                ssh::login(port, &new_key, &known, "true").ok,
                "the new key does not log in"
            );
            s.key_path = new_key;
            Ok(())
        })
        .await?;

    steps
        .run("revoke: remove user demo, roll out, key refused", async {
            let change: ChangeOutcome = s.op.delete_json("/v1/users/demo").await?;
            let rollout = change.rollout.context("removing a user starts a rollout")?;
            wait_rollout(&s.op, &rollout).await?;
            ensure!(
                !ssh::login(port, &demo_key, &known, "true").ok,
                "the removed user still logs in"
            );
            let keys: Vec<KeyView> = s.op.get_json("/v1/keys?state=revoked").await?;
            let demo = keys
                .iter()
                .find(|k| k.user.as_deref() == Some("demo"))
                .context("demo's key is listed as revoked")?;
            ensure!(
                demo.revocation.is_some_and(|r| r.complete),
                "the revocation is not confirmed by every holder"
            );
            Ok(())
        })
        .await?;

    destroy_and_check(&s.op, &id, &s.canary, &mut steps).await?;
    steps
        .run("verify the audit log", async {
            let out = Command::new(bin("keyward")?)
                .args(["--server", &s.api_url, "--identity"])
                .arg(args.data.join("server/operator"))
                .args(["audit", "verify"])
                .output()?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        })
        .await?;
    s.agent.terminate();
    s.server.terminate();
    steps.print();
    println!("\nall steps passed");
    Ok(())
}

async fn wait_rollout(op: &ApiClient, id: &str) -> anyhow::Result<()> {
    wait_for("the rollout", Duration::from_secs(180), || async {
        let view: RolloutView = op.get_json(&format!("/v1/rollouts/{id}")).await?;
        match view.state.as_str() {
            "completed" => Ok(Some(())),
            "paused" => bail!("rollout {id} paused after {} failures", view.failed),
            _ => Ok(None),
        }
    })
    .await
}

async fn interactive(args: &Args) -> anyhow::Result<()> {
    let mut steps = Steps { rows: Vec::new() };
    let mut s = setup(args, &mut steps).await?;
    print_login(args, &s)?;
    println!(
        "\nrunning; server and agent logs follow. Press Ctrl-C to destroy the container, wipe it and stop.\n"
    );

    let (mut server_offset, mut agent_offset) = (0u64, 0u64);
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tail(
            &args.data.join("server.log"),
            &mut server_offset,
            "[server]",
        );
        tail(&args.data.join("agent.log"), &mut agent_offset, "[agent] ");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    println!("\ninterrupted: destroying and wiping what the quick start made");
    let id = s.container.container.id.clone();
    destroy_and_check(&s.op, &id, &s.canary, &mut steps).await?;
    s.agent.terminate();
    s.server.terminate();
    steps.print();
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if args.once {
            once(&args).await
        } else {
            interactive(&args).await
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            eprintln!(
                "logs: {} and {}",
                args.data.join("server.log").display(),
                args.data.join("agent.log").display()
            );
            ExitCode::FAILURE
        }
    }
}
