//! Logging into containers with the real OpenSSH client, through ports on 127.0.0.1 only.

use std::path::Path;
use std::process::Command;

/// The outcome of one login attempt.
#[derive(Debug)]
pub struct Login {
    /// Whether `ssh` exited 0.
    pub ok: bool,
    /// What the remote command printed.
    pub stdout: String,
    /// What `ssh` printed on stderr.
    pub stderr: String,
}

/// Runs `command` as root on 127.0.0.1:`port` with private key file `key`, trusting only the
/// `known_hosts` line given (strict host key checking, batch mode: no prompt can pass).
pub fn login(port: u16, key: &Path, known_hosts_line: &str, command: &str) -> Login {
    let dir = tempfile::tempdir().expect("temporary directory");
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{known_hosts_line}\n")).expect("writing known_hosts");
    let out = Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-F",
            "/dev/null",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), "root@127.0.0.1", command])
        .output()
        .expect("running ssh");
    Login {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `key` to a 0600 file in `dir` (ssh refuses keys readable by others).
pub fn key_file(dir: &Path, name: &str, key: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    keyward_certs::files::write_secret(&path, key.as_bytes()).expect("writing key file");
    path
}

/// Generates a user key pair with ssh-keygen; returns (private key path, public key line).
pub fn user_key(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("running ssh-keygen");
    assert!(status.success());
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("public key");
    (path, public.trim().to_string())
}
