//! Prometheus metrics in the text exposition format, kept in atomics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters and gauges the server exposes on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open TLS connections.
    pub connections: AtomicI64,
    /// Watch requests currently waiting.
    pub watchers: AtomicI64,
    /// TLS handshakes that failed (bad, expired, foreign or denied certificates included).
    pub handshake_failures: AtomicU64,
    /// Connections refused because the connection cap was reached.
    pub connections_refused: AtomicU64,
    /// Watch answers sent.
    pub watch_answers: AtomicU64,
    /// Manifests signed and stored.
    pub manifests_issued: AtomicU64,
    /// Successful enrollments.
    pub enrollments: AtomicU64,
    /// Certificate renewals.
    pub renewals: AtomicU64,
    /// HTTP answers by class.
    pub responses_2xx: AtomicU64,
    /// HTTP 4xx answers.
    pub responses_4xx: AtomicU64,
    /// HTTP 5xx answers.
    pub responses_5xx: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an HTTP status.
    pub fn count_status(&self, status: u16) {
        let counter = match status {
            200..=299 => &self.responses_2xx,
            400..=499 => &self.responses_4xx,
            _ => &self.responses_5xx,
        };
        Self::inc(counter);
    }

    /// Renders all metrics.
    pub fn render(&self, revision: u64) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "keyward_connections",
            "Open TLS connections.",
            self.connections.load(Ordering::Relaxed),
        );
        gauge(
            "keyward_watchers",
            "Watch requests waiting.",
            self.watchers.load(Ordering::Relaxed),
        );
        gauge(
            "keyward_revision",
            "Server-wide revision.",
            i64::try_from(revision).unwrap_or(i64::MAX),
        );
        let counters: [(&str, &str, &AtomicU64); 8] = [
            (
                "keyward_tls_handshake_failures_total",
                "Failed TLS handshakes.",
                &self.handshake_failures,
            ),
            (
                "keyward_connections_refused_total",
                "Connections refused at the cap.",
                &self.connections_refused,
            ),
            (
                "keyward_watch_answers_total",
                "Watch answers sent.",
                &self.watch_answers,
            ),
            (
                "keyward_manifests_issued_total",
                "Manifests signed and stored.",
                &self.manifests_issued,
            ),
            (
                "keyward_enrollments_total",
                "Node enrollments.",
                &self.enrollments,
            ),
            (
                "keyward_renewals_total",
                "Node certificate renewals.",
                &self.renewals,
            ),
            (
                "keyward_http_responses_2xx_total",
                "HTTP 2xx answers.",
                &self.responses_2xx,
            ),
            (
                "keyward_http_responses_4xx_total",
                "HTTP 4xx answers.",
                &self.responses_4xx,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keyward_http_responses_5xx_total HTTP 5xx answers.\n\
             # TYPE keyward_http_responses_5xx_total counter\nkeyward_http_responses_5xx_total {}",
            self.responses_5xx.load(Ordering::Relaxed)
        );
        out
    }
}
