//! Writing and reading key and certificate files safely.
//!
//! Writes are atomic and durable: the bytes go to a temporary file created with the final mode
//! in the same directory, which is fsynced, renamed over the target, and the directory fsynced,
//! so a crash leaves either the old file or the new one, never a torn or world-readable one.
//! Reading a secret file refuses one that group or others can read.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Mode of files holding private keys and other secrets.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of certificates and other public files.
pub const PUBLIC_MODE: u32 = 0o644;

/// Why a file could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// An I/O operation on `path` failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A secret file can be read by group or others.
    #[error(
        "{path} has mode {mode:#o}, which lets group or others read it; run `chmod 600 {path}` \
         after checking who may have read it"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Atomically replaces `path` with `bytes`, the new file having permission bits `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));

    // Create with the final mode from the start, so the bytes are never readable by others.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error("creating", &tmp))?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(FileError::Io {
            action: "writing",
            path: tmp,
            source: e,
        });
    }
    drop(file);

    fs::rename(&tmp, path).map_err(io_error("renaming into place", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing directory", dir))
}

/// Writes a secret file (mode 0600), atomically.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic(path, bytes, SECRET_MODE)
}

/// Writes a public file (mode 0644), atomically.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic(path, bytes, PUBLIC_MODE)
}

/// Reads a secret file, refusing it if group or others have any access.
pub fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, FileError> {
    let meta = fs::metadata(path).map_err(io_error("reading", path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path)
        .map(Zeroizing::new)
        .map_err(io_error("reading", path))
}

/// Reads a public file.
pub fn read_public(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(io_error("reading", path))
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(io_error("creating directory", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_error("setting permissions on", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_written_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_secret(&path, b"secret").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_secret(&path).unwrap().as_slice(), b"secret");
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rewriting_keeps_the_strict_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&path, b"new").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn loading_a_secret_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_secret(&path, b"secret").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o610] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_secret(&path).unwrap_err();
            assert!(
                matches!(err, FileError::TooOpen { mode: m, .. } if m == mode),
                "{err}"
            );
            assert!(
                err.to_string().contains(&format!("mode {mode:#o}")),
                "{err}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_secret(&path).is_ok());
    }
}
