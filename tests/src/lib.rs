//! Test harness for keyward: real server and agent processes, a real PostgreSQL started here,
//! the real Docker engine, and the real OpenSSH client.
//!
//! - [`bench`]: the benchmarks (`keyward-bench`).
//! - [`bins`]: locating the built binaries.
//! - [`server`]: a `keyward-server` in a temporary data directory, with an operator client.
//! - [`agent`]: a `keyward-agent` enrolled against a test server.
//! - [`postgres`]: a throwaway PostgreSQL cluster (initdb, free port, torn down on drop).
//! - [`docker`]: the base image, label-scoped cleanup, reading files back from containers.
//! - [`evil`]: a hostile server with stolen keys, for refusal tests.
//! - [`node`]: a node client without Docker, for server tests and the load generator.
//! - [`operator`]: container requests and waits on agent reports that many tests share.
//! - [`ssh`]: logging in with the OpenSSH client through a port on 127.0.0.1.
//! - [`wait`]: polling helpers with deadlines.
//!
//! Everything a test creates is removed when its guard drops, also when the test fails.

pub mod agent;
pub mod bench;
pub mod bins;
pub mod docker;
pub mod evil;
pub mod node;
pub mod operator;
pub mod postgres;
pub mod server;
pub mod ssh;
pub mod wait;

/// A short random suffix for node ids and names, so parallel tests sharing one Docker engine
/// never collide.
pub fn unique(prefix: &str) -> String {
    use rand::Rng as _;
    let n: u32 = rand::thread_rng().r#gen();
    format!("{prefix}-{n:08x}")
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}
