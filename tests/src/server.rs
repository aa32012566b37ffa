//! A `keyward-server` process for tests.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyward_common::client::ApiClient;
use keyward_server::cli::connect;

use crate::bins;

/// How a test server is set up.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// PostgreSQL URL; SQLite in the data directory when `None`.
    pub database_url: Option<String>,
    /// Extra `serve` flags.
    pub extra_args: Vec<String>,
    /// Extra environment for `serve`.
    pub env: Vec<(String, String)>,
}

/// A running server in a temporary data directory; killed on drop.
pub struct TestServer {
    child: Option<Child>,
    /// Temporary directory holding data directory and logs.
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT` of the mTLS API.
    pub api_url: String,
    /// `https://127.0.0.1:PORT` of the enrollment listener.
    pub enroll_url: String,
    /// The options it was started with.
    pub options: ServerOptions,
}

impl TestServer {
    /// Initializes a fleet and starts the server on free loopback ports.
    pub fn start(options: ServerOptions) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = dir.path().join("data");
        let mut init = Command::new(bins::path("keyward-server"));
        init.args(["init", "--data"]).arg(&data).args([
            "--domain",
            "fleet.test",
            "--san",
            "127.0.0.1",
            "--san",
            "localhost",
        ]);
        if let Some(url) = &options.database_url {
            init.args(["--database-url", url]);
        }
        let out = init.output().expect("running keyward-server init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = Self {
            child: None,
            dir,
            api_url: String::new(),
            enroll_url: String::new(),
            options,
        };
        server.spawn(None);
        server
    }

    /// Starts a second server process on the same database with a copy of this one's data
    /// directory (the same keys): a replica, for PostgreSQL.
    pub fn replica(&self) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.data())
            .arg(dir.path().join("data"))
            .status()
            .expect("copying the data directory");
        assert!(status.success());
        let mut replica = Self {
            child: None,
            dir,
            api_url: String::new(),
            enroll_url: String::new(),
            options: self.options.clone(),
        };
        replica.spawn(None);
        replica
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The operator identity directory made by `init`.
    pub fn identity(&self) -> PathBuf {
        self.data().join("operator")
    }

    /// The server's log file (stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.data().join("keyward.db")
    }

    fn spawn(&mut self, ports: Option<(u16, u16)>) {
        let (api, enroll) = ports.unwrap_or((0, 0));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(bins::path("keyward-server"));
        cmd.args(["serve", "--data"])
            .arg(self.data())
            .args([
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--enroll-listen",
                &format!("127.0.0.1:{enroll}"),
            ])
            .args(&self.options.extra_args)
            .env("RUST_LOG", "info,keyward_server=debug")
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(url) = &self.options.database_url {
            cmd.args(["--database-url", url]);
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting keyward-server");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the listening line");
        let Some(rest) = line.trim().strip_prefix("keyward-server listening ") else {
            let _ = child.kill();
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            panic!("keyward-server did not start: {line:?}\n{log}");
        };
        let mut api_url = String::new();
        let mut enroll_url = String::new();
        for part in rest.split_whitespace() {
            if let Some(addr) = part.strip_prefix("api=") {
                api_url = format!("https://{addr}");
            } else if let Some(addr) = part.strip_prefix("enroll=") {
                enroll_url = format!("https://{addr}");
            }
        }
        self.api_url = api_url;
        self.enroll_url = enroll_url;
        self.child = Some(child);
    }

    fn ports(&self) -> (u16, u16) {
        let port = |url: &str| {
            url.rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        (port(&self.api_url), port(&self.enroll_url))
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the server again after [`TestServer::stop`], on the same ports.
    pub fn start_again(&mut self) {
        let ports = self.ports();
        self.spawn(Some(ports));
    }

    /// Restarts the server on the same ports.
    pub fn restart(&mut self) {
        let ports = self.ports();
        self.stop();
        self.spawn(Some(ports));
    }

    /// An operator client.
    pub fn operator(&self) -> ApiClient {
        connect(&self.api_url, &self.identity(), Duration::from_secs(30)).expect("operator client")
    }

    /// Runs the `keyward` CLI against this server with the operator identity.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bins::path("keyward"))
            .args(["--server", &self.api_url, "--identity"])
            .arg(self.identity())
            .args(args)
            .output()
            .expect("running keyward")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The CA fingerprint agents pin.
    pub fn ca_fingerprint(&self) -> String {
        let pem = std::fs::read(self.data().join("ca.pem")).expect("ca.pem");
        ca_fingerprint_of(&pem)
    }
}

/// SHA-256 of the DER of the first certificate in `pem`, hex.
pub fn ca_fingerprint_of(pem: &[u8]) -> String {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem).expect("a certificate");
    keyward_common::ids::Sha256Digest::of(&der).to_hex()
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `haystack` contains `needle` anywhere under `dir` (recursively, files only).
pub fn dir_contains(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(path);
        }
    }
    hits
}
