//! The clock, in unix seconds, as every signed document states time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the unix epoch; 0 if the system clock is set before 1970.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
