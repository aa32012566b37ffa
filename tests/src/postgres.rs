//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, `postgres` on a free
//! loopback port with trust authentication, stopped and deleted on drop.
//!
//! Uses Debian's PostgreSQL binaries (`/usr/lib/postgresql/*/bin`), which `scripts/test`
//! installs. PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres`
//! user through `runuser`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PostgreSQL cluster.
pub struct TestPostgres {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Port on 127.0.0.1.
    pub port: u16,
}

fn bin_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.pop().unwrap_or_else(|| {
        panic!("PostgreSQL server binaries not found under /usr/lib/postgresql; install the postgresql package (scripts/test does)")
    })
}

fn as_postgres_user(program: PathBuf) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl TestPostgres {
    /// Creates and starts a cluster.
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("keyward-pg")
            .tempdir()
            .expect("temporary directory");
        let data = dir.path().join("data");
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("a postgres user (from the postgresql package)");
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))
                .expect("chown for postgres");
        }
        let out = as_postgres_user(bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let port = crate::free_port();
        let child = as_postgres_user(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        let pg = Self {
            child: Some(child),
            dir,
            port,
        };
        pg.wait_ready(&bin);
        pg
    }

    fn wait_ready(&self, bin: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not become ready on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates database `name` and returns its URL.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(bin_dir().join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-c",
            ])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "CREATE DATABASE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The temporary directory (socket and data).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // pg_ctl reaches the postmaster directly (the child may be `runuser`).
            let _ = as_postgres_user(bin_dir().join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(self.dir.path().join("data"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
