//! The fault matrix on the namespace rig (`tests/rig/faults.sh`): real containerd on three
//! network-namespace nodes, ≥ 50 CRI pulls across eight faults (peer killed mid-blob, local
//! daemon killed, node partitioned, slow peer behind a delaying proxy, upstream down,
//! containerd restarted under the daemon, daemon restarted), 0 failed pulls, every image
//! verified by digest. The script holds the machine-wide rig lock itself.
//!
//! Ignored by default: it takes minutes and owns the rig. Run: `make faults`, or
//! `cargo test --test rig faults:: -- --ignored --nocapture`.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "minutes long and needs the namespace rig: run `make faults`"]
fn fault_matrix_has_no_failed_pulls() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rig/faults.sh");
    let status = Command::new("bash")
        .arg(&script)
        .env("SPECULUM_BIN", env!("CARGO_BIN_EXE_speculum"))
        .status()
        .expect("bash runs");
    assert!(status.success(), "fault matrix failed: {status}");
}
