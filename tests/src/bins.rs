//! Locating the keyward binaries the tests run as real processes.

use std::path::PathBuf;

/// The directory holding `keyward-server`, `keyward` and `keyward-agent`: `KEYWARD_BIN_DIR`,
/// else the cargo profile directory of the running executable (`target/<profile>`), whether it
/// is a test (in `target/<profile>/deps`) or a binary (in `target/<profile>`).
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYWARD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("executable path");
    let parent = exe.parent().expect("executable directory");
    if parent.file_name().is_some_and(|n| n == "deps") {
        parent
            .parent()
            .map(PathBuf::from)
            .expect("target directory")
    } else {
        parent.to_path_buf()
    }
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
