//! The Docker engine in tests: the base image, label-scoped cleanup, and reading state back.
//!
//! Tests use the `docker` CLI for checks, independently of the agent's bollard code, so a bug in
//! the agent cannot hide itself.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The base image the quick start and the tests use.
pub const BASE_IMAGE: &str = "keyward/sshd:latest";
/// Label every Docker object a test creates directly (not through an agent) carries.
pub const TEST_LABEL: &str = "io.keyward.test";

/// Runs `docker` with `args`, returning stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("running docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `docker` with `args`, returning whether it succeeded and its combined output.
pub fn docker_try(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("running docker");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

static BASE: Mutex<Option<String>> = Mutex::new(None);

/// Ensures the base image exists (building it with `scripts/make-base-image` if needed) and
/// returns its id.
pub fn base_image_id() -> String {
    let mut cached = BASE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = cached.as_ref() {
        return id.clone();
    }
    let (exists, _) = docker_try(&["image", "inspect", BASE_IMAGE]);
    if !exists {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-base-image");
        let out = Command::new(&script)
            .output()
            .expect("running scripts/make-base-image");
        assert!(
            out.status.success(),
            "make-base-image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", BASE_IMAGE])
        .trim()
        .to_string();
    *cached = Some(id.clone());
    id
}

/// Ids of containers (all states) whose labels match every `key=value` filter.
pub fn containers_with(labels: &[String]) -> Vec<String> {
    let mut args = vec!["ps", "-aq", "--no-trunc"];
    let filters: Vec<String> = labels.iter().map(|l| format!("label={l}")).collect();
    for f in &filters {
        args.push("--filter");
        args.push(f);
    }
    docker(&args).lines().map(str::to_string).collect()
}

/// Ids of images (including intermediate ones) whose labels match every filter.
pub fn images_with(labels: &[String]) -> Vec<String> {
    list_images(labels, "-aq")
}

/// Ids of top-level images (built or dangling, not intermediate) whose labels match every filter.
pub fn top_images_with(labels: &[String]) -> Vec<String> {
    list_images(labels, "-q")
}

fn list_images(labels: &[String], flags: &str) -> Vec<String> {
    let mut args = vec!["images", flags, "--no-trunc"];
    let filters: Vec<String> = labels.iter().map(|l| format!("label={l}")).collect();
    for f in &filters {
        args.push("--filter");
        args.push(f);
    }
    let mut ids: Vec<String> = docker(&args).lines().map(str::to_string).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Removes, on drop, every container and image labelled with one of the given node ids or with
/// this guard's test label, also when the test panicked.
pub struct Cleanup {
    nodes: Vec<String>,
    test_label: String,
}

impl Cleanup {
    /// A guard for objects of `nodes` (agents' `io.keyward.node` label).
    pub fn new(nodes: &[&str]) -> Self {
        Self {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            test_label: crate::unique("t"),
        }
    }

    /// The `io.keyward.test=<value>` label for objects the test creates directly.
    pub fn label(&self) -> String {
        format!("{TEST_LABEL}={}", self.test_label)
    }

    /// Removes everything now.
    pub fn run(&self) {
        let mut selectors: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("io.keyward.node={n}"))
            .collect();
        selectors.push(self.label());
        for selector in &selectors {
            let containers = containers_with(std::slice::from_ref(selector));
            if !containers.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(containers.iter().map(String::as_str));
                let _ = docker_try(&args);
            }
            let images = images_with(std::slice::from_ref(selector));
            for image in images {
                let _ = docker_try(&["rmi", "-f", &image]);
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// Reads one file from a container through the Docker API (`docker cp` to a tar stream):
/// returns its content, mode, uid and gid.
pub fn read_file(container: &str, path: &str) -> (Vec<u8>, u32, u64, u64) {
    let out = Command::new("docker")
        .args(["cp", &format!("{container}:{path}"), "-"])
        .output()
        .expect("docker cp");
    assert!(
        out.status.success(),
        "docker cp {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_single_file_tar(&out.stdout)
}

/// Parses a tar holding one regular file (ustar header, as `docker cp` writes).
fn parse_single_file_tar(tar: &[u8]) -> (Vec<u8>, u32, u64, u64) {
    let octal = |field: &[u8]| -> u64 {
        let text: String = field
            .iter()
            .take_while(|b| **b != 0 && **b != b' ')
            .map(|b| *b as char)
            .collect();
        u64::from_str_radix(text.trim(), 8).unwrap_or(0)
    };
    let header = &tar[..512];
    let mode = octal(&header[100..108]) as u32;
    let uid = octal(&header[108..116]);
    let gid = octal(&header[116..124]);
    let size = octal(&header[124..136]) as usize;
    (tar[512..512 + size].to_vec(), mode & 0o7777, uid, gid)
}

/// The Docker data root.
pub fn data_root() -> PathBuf {
    PathBuf::from(docker(&["info", "--format", "{{.DockerRootDir}}"]).trim())
}

/// Number of build cache entries `docker system df` reports.
pub fn build_cache_entries() -> usize {
    let text = docker(&["system", "df", "--format", "{{.Type}}\t{{.TotalCount}}"]);
    text.lines()
        .find_map(|l| l.strip_prefix("Build Cache\t"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
