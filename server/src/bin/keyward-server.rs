//! `keyward-server`: create a fleet (`init`) and run the key server (`serve`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keyward_server::config::{FileConfig, LogFormat, ServeArgs, Settings};
use keyward_server::datadir::{DataDir, InitOptions};

/// The keyward key server: issues per-container keys and signed manifests over mutual TLS.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new fleet: CA, server certificate, signing key, key-encryption key, the first
    /// operator identity and the settings file. Refuses an existing, non-empty directory.
    Init(InitArgs),
    /// Run the server. Stops cleanly on SIGTERM or SIGINT.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Data directory to create.
    #[arg(long, env = "KEYWARD_DATA", default_value = "keyward-data")]
    data: PathBuf,
    /// Trust domain of the fleet, for example fleet.example.com.
    #[arg(long)]
    domain: String,
    /// DNS name or IP address the server is reached at (repeatable); goes into its certificate.
    #[arg(long = "san", required = true)]
    sans: Vec<String>,
    /// Name of the first operator.
    #[arg(long, default_value = "admin")]
    operator: String,
    /// Address of the mTLS API listener to record in the settings.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Address of the enrollment listener to record in the settings.
    #[arg(long)]
    enroll_listen: Option<std::net::SocketAddr>,
    /// API URL agents and operators use, to record in the settings.
    #[arg(long)]
    server_url: Option<String>,
    /// Enrollment URL agents use, to record in the settings.
    #[arg(long)]
    enroll_url: Option<String>,
    /// Database to record in the settings and initialize [default: DATA/keyward.db].
    #[arg(long)]
    database_url: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve(args) => args.log_format.unwrap_or(LogFormat::Text),
        Command::Init(_) => LogFormat::Text,
    };
    init_logging(format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Init(args) => init(args).await,
            Command::Serve(args) => serve(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = FileConfig {
        listen: args.listen,
        enroll_listen: args.enroll_listen,
        server_url: args.server_url.clone(),
        enroll_url: args.enroll_url.clone(),
        database_url: args.database_url.clone(),
        ..FileConfig::default()
    };
    let options = InitOptions {
        dir: args.data.clone(),
        domain: args.domain.clone(),
        sans: args.sans.clone(),
        operator: args.operator.clone(),
        config,
    };
    let (data, report) = DataDir::init(&options)?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| keyward_server::store::Store::sqlite_url(data.root()));
    keyward_server::service::nodes::record_init(&url, &args.operator, &report)
        .await
        .context("initializing the database")?;

    println!("created fleet {} in {}", args.domain, data.root().display());
    println!(
        "  CA fingerprint (agents pin this): {}",
        report.ca_fingerprint
    );
    println!(
        "  manifest signing key:             {}",
        report.signing_key_id
    );
    println!(
        "  operator identity:                {}",
        report.operator_dir.display()
    );
    println!();
    println!("next:");
    println!("  keyward-server serve --data {}", data.root().display());
    println!(
        "  export KEYWARD_IDENTITY={}",
        report.operator_dir.display()
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Each watcher holds a connection; raise the descriptor limit to what the system allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open file limit");
    }
    let settings = Settings::resolve(&args)?;
    keyward_server::daemon::run(settings).await?;
    Ok(())
}
