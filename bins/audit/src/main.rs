//! `keel-audit`: tamper evidence for the audit trail.
//!
//! - `seal` (single-flight across replicas) chains the rows of finished transactions into
//!   `audit_seals` in commit order and signs a checkpoint after each batch, every
//!   `--interval-secs` (or once with `--once`). Run it as the schema's owner (or a role that may
//!   insert into `audit_seals` and `audit_checkpoints`), never as the application role.
//! - `verify` recomputes the chain from the rows, from the start or from a signed checkpoint
//!   (`--from-checkpoint N`), and names the first row changed, deleted or inserted out of band:
//!   exit 0 when the chain holds, 2 when it does not, 1 on an error.
//! - `migrate`, as every binary.
//!
//! The signing key (at least 32 bytes) is read from `--seal-key-file`
//! (`KEEL_AUDIT_SEAL_KEY_FILE`) and named by `--seal-key-id` (`KEEL_AUDIT_SEAL_KEY_ID`); keep it
//! out of the database and away from the owner role's operators.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use keel_audit::seal::{SealKey, SealOutcome, seal, verify};
use keel_service::cli::{DatabaseArgs, LogArgs};

/// Exit code of `verify` when the chain does not hold.
const EXIT_TAMPERED: u8 = 2;

#[derive(Parser)]
#[command(
    name = "keel-audit",
    version,
    about = "Seal and verify Keel's audit trail"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct KeyArgs {
    /// File holding the checkpoint signing key (at least 32 bytes; a trailing newline is
    /// ignored). Never logged.
    #[arg(long, env = "KEEL_AUDIT_SEAL_KEY_FILE", value_name = "PATH")]
    seal_key_file: PathBuf,
    /// The key's id, stored with each checkpoint it signs.
    #[arg(long, env = "KEEL_AUDIT_SEAL_KEY_ID", default_value = "seal-1")]
    seal_key_id: String,
}

impl KeyArgs {
    fn load(&self) -> anyhow::Result<SealKey> {
        let mut bytes = std::fs::read(&self.seal_key_file)
            .with_context(|| format!("could not read {}", self.seal_key_file.display()))?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Ok(SealKey::new(&self.seal_key_id, bytes)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Chain newly committed audit rows and sign a checkpoint, periodically.
    Seal {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Seal what is committed, then exit.
        #[arg(long, env = "KEEL_AUDIT_SEAL_ONCE")]
        once: bool,
        /// Seconds between sealing runs.
        #[arg(long, env = "KEEL_AUDIT_SEAL_INTERVAL_SECS", default_value_t = 60)]
        interval_secs: u64,
        /// Most rows per batch (one checkpoint per batch).
        #[arg(long, env = "KEEL_AUDIT_SEAL_BATCH", default_value_t = 10_000)]
        batch: u32,
    },
    /// Recompute the chain from the rows and name the first one changed, deleted or inserted.
    Verify {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Start from this signed checkpoint (its sequence number) instead of the first row.
        #[arg(long)]
        from_checkpoint: Option<i64>,
    },
    /// Apply the embedded migrations.
    Migrate(keel_service::MigrateArgs),
}

fn main() -> ExitCode {
    let cli: Cli = keel_service::cli::parse();
    keel_service::run(&cli.log, async move {
        match cli.command {
            Command::Migrate(args) => keel_service::migrate(&args).await,
            Command::Seal {
                db,
                key,
                once,
                interval_secs,
                batch,
            } => run_sealer(&db, &key.load()?, once, interval_secs, batch).await,
            Command::Verify {
                db,
                key,
                from_checkpoint,
            } => {
                let key = key.load()?;
                let pool = keel_service::connect(&db, "keel-audit-verify", 1).await?;
                let mut conn = pool.acquire().await.context("could not connect")?;
                let found = verify(&mut conn, &key, from_checkpoint).await?;
                match &found.tampering {
                    None => {
                        println!(
                            "the audit trail holds: {} links, {} signed checkpoints",
                            found.links, found.checkpoints
                        );
                        Ok(ExitCode::SUCCESS)
                    }
                    Some(tampering) => {
                        tracing::error!(%tampering, "the audit trail was tampered with");
                        println!("TAMPERED: {tampering}");
                        Ok(ExitCode::from(EXIT_TAMPERED))
                    }
                }
            }
        }
    })
}

async fn run_sealer(
    db: &DatabaseArgs,
    key: &SealKey,
    once: bool,
    interval_secs: u64,
    batch: u32,
) -> anyhow::Result<ExitCode> {
    let pool = keel_service::connect(db, "keel-audit-seal", 1).await?;
    let shutdown = keel_service::shutdown::on_signal()?;
    loop {
        let mut conn = pool.acquire().await.context("could not connect")?;
        loop {
            match seal(&mut conn, key, batch).await? {
                SealOutcome::Sealed { rows, last_seq } => {
                    tracing::info!(rows, last_seq, "sealed audit rows and signed a checkpoint");
                }
                SealOutcome::UpToDate => break,
                SealOutcome::Busy => {
                    tracing::info!("another sealer holds the lock; skipping this run");
                    break;
                }
            }
        }
        drop(conn);
        if once {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(Duration::from_secs(interval_secs.max(1))) => {}
        }
    }
}
