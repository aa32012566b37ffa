//! A `keyward-agent` process for tests, enrolled against a [`TestServer`].

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyward_server::api::{CreateTokenRequest, TokenResponse};

use crate::bins;
use crate::server::TestServer;

/// A running agent with its own state directory; killed on drop. Docker objects it made are
/// removed by the test's [`crate::docker::Cleanup`] guard.
pub struct TestAgent {
    child: Option<Child>,
    /// Temporary directory with the state directory and the log.
    pub dir: tempfile::TempDir,
    /// Node id.
    pub node: String,
    /// The server's API URL.
    pub server_url: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl TestAgent {
    /// Creates a join token for `node`, enrolls a new agent and starts it.
    pub async fn enroll_and_start(server: &TestServer, node: &str) -> Self {
        Self::enroll_and_start_with(server, node, &[], &[]).await
    }

    /// Like [`TestAgent::enroll_and_start`] with extra `run` flags and environment.
    pub async fn enroll_and_start_with(
        server: &TestServer,
        node: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let token: TokenResponse = server
            .operator()
            .post_json(
                "/v1/nodes/tokens",
                &CreateTokenRequest {
                    node: node.into(),
                    ttl_seconds: None,
                },
            )
            .await
            .expect("creating a join token");
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut agent = Self {
            child: None,
            dir,
            node: node.to_string(),
            server_url: server.api_url.clone(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        let out = Command::new(bins::path("keyward-agent"))
            .args(["enroll", "--state"])
            .arg(agent.state())
            .args([
                "--server",
                &token.server_url,
                "--enroll-url",
                &token.enroll_url,
                "--node",
                node,
            ])
            .args(["--ca-fingerprint", &token.ca_fingerprint])
            .env("KEYWARD_JOIN_TOKEN", token.token.expose())
            .output()
            .expect("running keyward-agent enroll");
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        agent.start();
        agent
    }

    /// The state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts) the agent process.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Starts the agent with extra environment for this start only (for example a crash point).
    pub fn start_with_env(&mut self, extra: &[(&str, &str)]) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(bins::path("keyward-agent"));
        cmd.args(["run", "--state"])
            .arg(self.state())
            .args(["--health-wait-secs", "1", "--watch-wait-secs", "20"])
            .args(&self.args)
            .env("RUST_LOG", "info,keyward_agent=debug")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("starting keyward-agent"));
    }

    /// Kills the agent with SIGKILL, as a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the agent process to exit by itself (after a crash point), returning whether it
    /// died from a signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
    }
}
