//! `keyward-agent`: enroll this Docker host (`enroll`) and keep its containers in the signed
//! state (`run`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keyward_agent::agent::{Agent, AgentError};
use keyward_agent::config::{EnrollArgs, RunArgs};
use keyward_agent::identity;
use keyward_agent::state::StateDir;
use keyward_common::ids::NodeId;
use keyward_common::secret::SecretString;
use tokio::sync::watch;

/// The keyward node agent: verifies signed manifests and runs containers with their keys.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this host with a join token: generates the node key locally (it never leaves the
    /// host), pins the CA by fingerprint, stores certificate and trust root.
    Enroll(EnrollArgs),
    /// Run the agent: watch the server, verify, rebuild and run containers, report. Stops
    /// cleanly on SIGTERM or SIGINT after the current pass.
    Run(RunArgs),
}

/// Exit code when the node was evicted.
const EXIT_EVICTED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Run(args) if args.log_format == "json");
    init_logging(json);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Enroll(args) => enroll(args).await,
            Command::Run(args) => run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<AgentError>()
                .is_some_and(|e| matches!(e, AgentError::Evicted))
            {
                ExitCode::from(EXIT_EVICTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn read_token(args: &EnrollArgs) -> anyhow::Result<SecretString> {
    if let Some(token) = &args.token {
        return Ok(SecretString::new(token.trim().to_string()));
    }
    let path = args
        .token_file
        .as_ref()
        .context("give --token, --token-file or KEYWARD_JOIN_TOKEN")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_for_token);
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => {
                return Ok(SecretString::new(text.trim().to_string()));
            }
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Ok(_) => anyhow::bail!("{} is empty", path.display()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

async fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let state = StateDir::new(args.state.clone());
    let node = NodeId::new(args.node.clone())?;
    let token = read_token(&args).await?;
    let enroll_url = match &args.enroll_url {
        Some(url) => url.clone(),
        None => identity::default_enroll_url(&args.server)?,
    };
    let fingerprint = match (&args.ca_fingerprint, &args.ca_fingerprint_file) {
        (Some(fingerprint), _) => fingerprint.clone(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => anyhow::bail!("give --ca-fingerprint or --ca-fingerprint-file"),
    };
    let info = identity::enroll(
        &state,
        &args.server,
        &enroll_url,
        &node,
        &fingerprint,
        token,
    )
    .await?;
    println!(
        "enrolled node {} in trust domain {}; state in {}",
        info.node,
        info.trust_domain,
        state.root().display()
    );
    println!("next: keyward-agent run --state {}", state.root().display());
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let Some(mut agent) = Agent::start(args, &mut stop_rx).await? else {
        return Ok(());
    };
    agent.announce().await;
    agent.run(stop_rx).await?;
    Ok(())
}
