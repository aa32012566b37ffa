//! Crash points for crash-safety tests.
//!
//! When the environment variable `KEYWARD_TEST_CRASH_AT` names a point the agent reaches (for
//! example `after-build`), the agent kills itself with SIGKILL there, as a power cut or an OOM
//! kill would. Tests use it to check that the next start converges. Unset in production, it
//! costs one environment lookup per point.

/// Kills the process with SIGKILL if `KEYWARD_TEST_CRASH_AT` is `name`.
pub fn hit(name: &str) {
    if std::env::var("KEYWARD_TEST_CRASH_AT").is_ok_and(|v| v == name) {
        tracing::warn!(
            point = name,
            "crash point reached; killing the agent (KEYWARD_TEST_CRASH_AT)"
        );
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; should delivery be delayed, stop here anyway.
        std::process::abort();
    }
}
