//! Fuzzes envelope decoding and the full snapshot and manifest checks with arbitrary bytes.
//!
//! The verifier trusts a fixed key; the input is offered both as a snapshot and as a manifest.
//! Nothing may panic, and nothing unsigned may ever be accepted.

#![no_main]

use keyward_common::dsse::{Envelope, ManifestSigningKey, SNAPSHOT_PAYLOAD_TYPE, TrustRoot};
use keyward_common::ids::NodeId;
use keyward_common::limits::Limits;
use keyward_common::manifest::NodeSnapshot;
use keyward_common::paths::PathRules;
use keyward_common::verify::Verifier;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_010;

fuzz_target!(|data: &[u8]| {
    // Seed 0..32 is the key of the checked-in corpus (see README.md in this folder).
    let seed: Vec<u8> = (0u8..32).collect();
    let key = ManifestSigningKey::from_seed(&seed).expect("32-byte seed");
    let verifier = Verifier {
        trust_root: TrustRoot::new([key.verifying_key()]).expect("not a weak key"),
        node: NodeId::new("node-a").expect("valid id"),
        limits: Limits::default(),
        path_rules: PathRules::default(),
        max_clock_skew: 30,
    };

    let _ = Envelope::decode(data, &verifier.limits);
    let _ = verifier.snapshot(data, NOW, None);

    // A genuine snapshot listing nothing: any manifest must then be refused.
    let empty = NodeSnapshot {
        node: verifier.node.clone(),
        revision: 1,
        issued_at: NOW,
        expires_at: NOW + 60,
        manifests: Vec::new(),
    };
    let envelope = key.sign_envelope(SNAPSHOT_PAYLOAD_TYPE, serde_json::to_vec(&empty).unwrap());
    let snapshot = verifier.snapshot(&envelope.encode(), NOW, None).expect("own snapshot verifies");
    assert!(verifier.manifest(data, NOW, None, &snapshot).is_err());
});
