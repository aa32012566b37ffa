//! `keyward-bench`: keyward's benchmarks, each next to a baseline measured in the same run.
//! Build in release mode; see BENCHMARKS.md for the commands and figures.

use std::time::Duration;

use clap::{Parser, Subcommand};
use keyward_tests::bench;

/// Run keyward's benchmarks (release build recommended: cargo build --release --workspace --bins).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Tiny sizes, to check that every benchmark still builds and runs.
    #[arg(long, global = true)]
    smoke: bool,
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Every benchmark in turn.
    All,
    /// Container create and destroy against the docker CLI.
    Provision {
        /// Runs of each kind.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Issuing and storing signed generations against raw signing.
    Issuance {
        /// Containers in the rollout.
        #[arg(long, default_value_t = 10_000)]
        containers: usize,
        /// Runs per backend.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// SQLite only (skip PostgreSQL).
        #[arg(long)]
        sqlite_only: bool,
    },
    /// Revocation fan-out to long-polling agents.
    Fanout {
        /// Simulated agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Revocations.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Server memory per watcher, handshake rate, reconnect storm.
    Scale {
        /// Watcher levels (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        levels: Vec<usize>,
        /// Fresh connections for the handshake rate.
        #[arg(long, default_value_t = 2000)]
        handshakes: usize,
    },
    /// The idle agent's memory and CPU.
    Footprint {
        /// Containers under management.
        #[arg(long, default_value_t = 20)]
        containers: usize,
        /// Idle window in seconds.
        #[arg(long, default_value_t = 60)]
        window: u64,
    },
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let smoke = args.smoke;
        match args.which {
            Which::All => {
                if smoke {
                    bench::provision::run(1).await;
                    bench::issuance::run(50, 1, true).await;
                    bench::fanout::run(5, 1).await;
                    bench::scale::run(&[5, 10], 10).await;
                    bench::footprint::run(1, Duration::from_secs(2)).await;
                } else {
                    bench::provision::run(10).await;
                    bench::issuance::run(10_000, 3, true).await;
                    bench::fanout::run(1000, 3).await;
                    bench::scale::run(&[1000, 5000, 10_000], 2000).await;
                    bench::footprint::run(20, Duration::from_secs(60)).await;
                }
            }
            Which::Provision { runs } => bench::provision::run(if smoke { 1 } else { runs }).await,
            Which::Issuance {
                containers,
                runs,
                sqlite_only,
            } => {
                bench::issuance::run(
                    if smoke { 50 } else { containers },
                    if smoke { 1 } else { runs },
                    !sqlite_only,
                )
                .await
            }
            Which::Fanout { agents, runs } => {
                bench::fanout::run(if smoke { 5 } else { agents }, if smoke { 1 } else { runs })
                    .await
            }
            Which::Scale { levels, handshakes } => {
                if smoke {
                    bench::scale::run(&[5, 10], 10).await
                } else {
                    bench::scale::run(&levels, handshakes).await
                }
            }
            Which::Footprint { containers, window } => {
                if smoke {
                    bench::footprint::run(1, Duration::from_secs(2)).await
                } else {
                    bench::footprint::run(containers, Duration::from_secs(window)).await
                }
            }
        }
    });
}
