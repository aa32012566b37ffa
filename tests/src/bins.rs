//! Locating the keyward binaries the tests run as real processes.

use std::path::PathBuf;

/// The directory holding `keyward-server`, `keyward` and `keyward-agent`: `KEYWARD_BIN_DIR`,
/// else the cargo profile directory of the running test (`target/<profile>`).
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYWARD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .expect("target directory")
}

/// Path of binary `name`, which must have been built (`cargo build --workspace --bins`, as
/// `scripts/test` does).
pub fn path(name: &str) -> PathBuf {
    let path = dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}
