//! Size limits applied to untrusted input before it is parsed further.

use serde::{Deserialize, Serialize};

/// Limits on envelopes and the files they describe. All are configurable; the defaults suit a
/// container with a handful of keys and configuration files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest encoded envelope accepted, checked before JSON parsing. Default 1 MiB.
    pub max_envelope_bytes: usize,
    /// Most signatures in one envelope. Default 8.
    pub max_signatures: usize,
    /// Most files in one manifest. Default 64.
    pub max_files: usize,
    /// Largest single injected file. Default 1 MiB.
    pub max_file_bytes: u64,
    /// Most manifests one node snapshot may list. Default 4096.
    pub max_snapshot_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_envelope_bytes: 1024 * 1024,
            max_signatures: 8,
            max_files: 64,
            max_file_bytes: 1024 * 1024,
            max_snapshot_entries: 4096,
        }
    }
}
