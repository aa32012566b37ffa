//! Rules for the paths and modes of files injected into containers.
//!
//! A [`SafePath`] is absolute and already normalized: it has no empty, `.` or `..` segments, no
//! NUL or other control characters, no trailing slash, and is at most [`MAX_PATH_LEN`] bytes
//! long. Because it is refused rather than normalized, a path that is accepted means exactly
//! what it says. [`PathRules`] adds the list of directories files may be written under.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest accepted path, in bytes.
pub const MAX_PATH_LEN: usize = 256;

/// Why a path or mode was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    /// The path has a `..` segment.
    #[error("path {0:?} contains a '..' segment")]
    ParentSegment(String),
    /// The path has an empty segment (`//` or a trailing `/`) or a `.` segment.
    #[error("path {0:?} is not normalized (empty or '.' segment, or trailing '/')")]
    NotNormalized(String),
    /// The path has a NUL or another control character.
    #[error("path {0:?} contains a NUL or control character")]
    ControlCharacter(String),
    /// The path is longer than [`MAX_PATH_LEN`] bytes.
    #[error("path is {len} bytes long, more than the limit of {max}")]
    TooLong {
        /// Length of the refused path.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The path is well formed but not under any allowed prefix.
    #[error("path {path:?} is not under an allowed prefix ({allowed})")]
    OutsidePrefixes {
        /// The refused path.
        path: String,
        /// The allowed prefixes, comma separated.
        allowed: String,
    },
    /// The mode has bits above 0o777 (setuid, setgid, sticky or file type bits).
    #[error(
        "mode {0:#o} is not allowed: only permission bits up to 0o777, no setuid, setgid or sticky"
    )]
    BadMode(u32),
}

/// An absolute, normalized path. See the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SafePath(String);

impl SafePath {
    /// Checks `path` against the syntax rules. Does not consult any prefix list.
    pub fn parse(path: &str) -> Result<Self, PathError> {
        // The shown value in errors is cut so a huge input cannot bloat a log line.
        let shown = || path.chars().take(80).collect::<String>();
        if path.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong {
                len: path.len(),
                max: MAX_PATH_LEN,
            });
        }
        if path.chars().any(char::is_control) {
            return Err(PathError::ControlCharacter(shown()));
        }
        let Some(rest) = path.strip_prefix('/') else {
            return Err(PathError::NotAbsolute(shown()));
        };
        for segment in rest.split('/') {
            match segment {
                ".." => return Err(PathError::ParentSegment(shown())),
                "" | "." => return Err(PathError::NotNormalized(shown())),
                _ => {}
            }
        }
        Ok(Self(path.to_owned()))
    }

    /// The path as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this path is strictly inside the directory `dir`.
    pub fn is_inside(&self, dir: &SafePath) -> bool {
        self.0
            .strip_prefix(dir.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl fmt::Display for SafePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for SafePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SafePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// File permission bits, at most `0o777`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(u32);

impl FileMode {
    /// Read-only for the owner, the mode of injected keys.
    pub const OWNER_READ: FileMode = FileMode(0o400);

    /// Checks that `mode` has only permission bits.
    pub fn new(mode: u32) -> Result<Self, PathError> {
        if mode & !0o777 == 0 {
            Ok(Self(mode))
        } else {
            Err(PathError::BadMode(mode))
        }
    }

    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Serialize for FileMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mode = u32::deserialize(d)?;
        Self::new(mode).map_err(serde::de::Error::custom)
    }
}

/// The directories that injected files may be written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRules {
    prefixes: Vec<SafePath>,
}

impl PathRules {
    /// The prefixes used when none are configured: SSH configuration, root's and users' home
    /// directories, and keyward's own directory for secret files.
    pub const DEFAULT_PREFIXES: [&'static str; 5] = [
        "/root/.ssh",
        "/etc/ssh",
        "/home",
        "/etc/keyward",
        "/run/keyward",
    ];

    /// Rules allowing files under any of `prefixes`. Each prefix must itself be a [`SafePath`].
    pub fn new<I, S>(prefixes: I) -> Result<Self, PathError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let prefixes = prefixes
            .into_iter()
            .map(|p| SafePath::parse(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { prefixes })
    }

    /// The allowed prefixes.
    pub fn prefixes(&self) -> &[SafePath] {
        &self.prefixes
    }

    /// Checks `path` against the syntax rules and the prefix list.
    pub fn check(&self, path: &str) -> Result<SafePath, PathError> {
        let path = SafePath::parse(path)?;
        self.check_safe(&path)?;
        Ok(path)
    }

    /// Checks an already parsed path against the prefix list.
    pub fn check_safe(&self, path: &SafePath) -> Result<(), PathError> {
        if self.prefixes.iter().any(|prefix| path.is_inside(prefix)) {
            Ok(())
        } else {
            Err(PathError::OutsidePrefixes {
                path: path.as_str().chars().take(80).collect(),
                allowed: self
                    .prefixes
                    .iter()
                    .map(SafePath::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }
}

impl Default for PathRules {
    fn default() -> Self {
        Self {
            prefixes: Self::DEFAULT_PREFIXES
                .iter()
                .map(|p| SafePath(p.to_string()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> PathRules {
        PathRules::new(["/root/.ssh", "/etc/keyward"]).unwrap()
    }

    #[test]
    fn accepts_a_plain_path_under_a_prefix() {
        let path = rules().check("/root/.ssh/authorized_keys").unwrap();
        assert_eq!(path.as_str(), "/root/.ssh/authorized_keys");
    }

    #[test]
    fn refuses_parent_segments_even_when_they_would_stay_under_a_prefix() {
        assert_eq!(
            rules().check("/root/.ssh/../.ssh/x"),
            Err(PathError::ParentSegment("/root/.ssh/../.ssh/x".into()))
        );
        assert_eq!(
            rules().check("/root/../etc/shadow"),
            Err(PathError::ParentSegment("/root/../etc/shadow".into()))
        );
        assert_eq!(
            rules().check("/root/.ssh/.."),
            Err(PathError::ParentSegment("/root/.ssh/..".into()))
        );
    }

    #[test]
    fn refuses_relative_paths() {
        assert_eq!(
            rules().check("root/.ssh/x"),
            Err(PathError::NotAbsolute("root/.ssh/x".into()))
        );
        assert_eq!(
            rules().check(""),
            Err(PathError::NotAbsolute(String::new()))
        );
    }

    #[test]
    fn refuses_double_slashes_dot_segments_and_trailing_slashes() {
        for p in ["/root//.ssh/x", "/root/.ssh/./x", "/root/.ssh/x/", "/"] {
            assert_eq!(
                rules().check(p),
                Err(PathError::NotNormalized(p.into())),
                "{p}"
            );
        }
    }

    #[test]
    fn refuses_nul_and_control_characters() {
        assert_eq!(
            rules().check("/root/.ssh/a\0b"),
            Err(PathError::ControlCharacter("/root/.ssh/a\0b".into()))
        );
        assert_eq!(
            rules().check("/root/.ssh/a\nb"),
            Err(PathError::ControlCharacter("/root/.ssh/a\nb".into()))
        );
    }

    #[test]
    fn refuses_overlong_paths() {
        let long = format!("/root/.ssh/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(
            rules().check(&long),
            Err(PathError::TooLong {
                len: long.len(),
                max: MAX_PATH_LEN
            })
        );
    }

    #[test]
    fn refuses_paths_outside_the_prefixes_and_the_prefix_itself() {
        for p in [
            "/etc/shadow",
            "/root/.sshx/y",
            "/root/.ssh",
            "/etc/keywardx",
        ] {
            assert_eq!(
                rules().check(p),
                Err(PathError::OutsidePrefixes {
                    path: p.into(),
                    allowed: "/root/.ssh, /etc/keyward".into()
                }),
                "{p}"
            );
        }
    }

    #[test]
    fn refuses_setuid_setgid_sticky_and_type_bits() {
        assert_eq!(FileMode::new(0o400).map(FileMode::bits), Ok(0o400));
        assert_eq!(FileMode::new(0o777).map(FileMode::bits), Ok(0o777));
        for bad in [0o4755, 0o2755, 0o1777, 0o100644] {
            assert_eq!(FileMode::new(bad), Err(PathError::BadMode(bad)));
        }
    }

    proptest! {
        /// Whatever string is offered, an accepted path lies under an allowed prefix once its
        /// segments are resolved the way a file system would resolve them.
        #[test]
        fn accepted_paths_stay_under_a_prefix_after_normalization(
            segments in proptest::collection::vec(
                prop_oneof![
                    Just("..".to_string()), Just(".".to_string()), Just(String::new()),
                    Just("root".to_string()), Just(".ssh".to_string()), Just("etc".to_string()),
                    Just("keyward".to_string()), "[a-z.\\x00/]{1,6}",
                ],
                0..8,
            ),
            leading_slash in any::<bool>(),
        ) {
            let joined = segments.join("/");
            let path = if leading_slash { format!("/{joined}") } else { joined };
            if let Ok(safe) = rules().check(&path) {
                let mut resolved: Vec<&str> = Vec::new();
                for seg in safe.as_str().split('/') {
                    match seg {
                        "" | "." => {}
                        ".." => { resolved.pop(); }
                        s => resolved.push(s),
                    }
                }
                let normal = format!("/{}", resolved.join("/"));
                prop_assert_eq!(&normal, safe.as_str());
                prop_assert!(
                    normal.starts_with("/root/.ssh/") || normal.starts_with("/etc/keyward/")
                );
            }
        }
    }
}
