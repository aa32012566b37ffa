//! The benchmarks with tiny sizes, so they keep building and running. Figures from this run
//! mean nothing (debug build, tiny sizes); BENCHMARKS.md has the real ones.

use std::process::Command;

#[test]
fn every_benchmark_runs_at_smoke_size_and_prints_its_figures() {
    keyward_tests::docker::base_image_id();
    let out = Command::new(keyward_tests::bins::path("keyward-bench"))
        .args(["all", "--smoke"])
        .output()
        .expect("running keyward-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keyward-bench failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "## Provisioning latency",
        "create -> running",
        "destroy -> wipe confirmed",
        "## Issuance",
        "manifests/s issued+stored, SQLite",
        "manifests/s issued+stored, PostgreSQL",
        "## Revocation fan-out",
        "revocation commit -> agent answered",
        "## Connection scale",
        "server RSS, 10 watchers",
        "reconnect storm, 10 agents",
        "full mTLS handshakes + request",
        "## Agent footprint",
        "idle agent, 1 containers",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(text.contains("median ratio"), "{text}");
}
