//! `keel-orphan-sweep protections list|protect|unprotect`: the platform-held reclaim
//! protections, through the same functions the operator console calls (the same audit rows).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use keel_provision::TokenDigest;
use keel_service::cli::DatabaseArgs;

/// Protect a token's backend objects from reclamation, or lift that protection.
#[derive(Subcommand)]
pub enum ProtectionsCommand {
    /// List the protections (token digests, reasons, who; never a token).
    List(DatabaseArgs),
    /// Protect the objects of one token digest (writes resource.reclaim_protected).
    Protect(ChangeArgs),
    /// Lift one token digest's protection (writes resource.reclaim_unprotected).
    Unprotect(ChangeArgs),
}

/// The arguments of `protect` and `unprotect`.
#[derive(Args)]
pub struct ChangeArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The token's digest (48 lowercase hex digits, as the review list and the console show).
    #[arg(value_parser = parse_digest, value_name = "DIGEST")]
    digest: TokenDigest,
    /// Why (1 to 200 characters; recorded in the audit row).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Who is acting, for the audit trail (operator:NAME).
    #[arg(long, value_parser = parse_operator, value_name = "ACTOR")]
    actor: keel_audit::Actor,
}

fn parse_digest(s: &str) -> Result<TokenDigest, String> {
    TokenDigest::parse(s).ok_or_else(|| "a token digest is 48 lowercase hex digits".to_owned())
}

fn parse_operator(s: &str) -> Result<keel_audit::Actor, String> {
    keel_audit::Actor::operator(s).map_err(|e| e.to_string())
}

/// One protection as a line of `protections list`: digest, time, who and why, tab-separated.
/// Every text is shown with its control characters escaped: the table is a contract table
/// other writers reach, and a line break or a terminal escape in it must not forge a line.
fn listing_line(p: &keel_orphan_sweep::protections::Protection) -> String {
    use keel_service::text::printable;
    let format = time::format_description::well_known::Rfc3339;
    format!(
        "{}\t{}\t{}\t{}",
        printable(&p.digest),
        p.created_at.format(&format).unwrap_or_default(),
        printable(&p.protected_by),
        printable(&p.reason)
    )
}

/// Runs one `protections` subcommand.
pub async fn run(command: ProtectionsCommand) -> anyhow::Result<ExitCode> {
    use keel_orphan_sweep::protections;
    let now = || time::OffsetDateTime::now_utc();
    match command {
        ProtectionsCommand::List(db) => {
            let pool = keel_service::connect(&db, "keel-orphan-sweep protections", 2).await?;
            for p in protections::list(&pool)
                .await
                .context("could not list protections")?
            {
                println!("{}", listing_line(&p));
            }
        }
        ProtectionsCommand::Protect(args) => {
            let pool = keel_service::connect(&args.db, "keel-orphan-sweep protections", 2).await?;
            let changed =
                protections::protect(&pool, &args.digest, &args.reason, &args.actor, now())
                    .await
                    .context("could not protect the token digest")?;
            if changed {
                eprintln!("protected {}", args.digest.as_str());
            } else {
                eprintln!("{} was already protected", args.digest.as_str());
            }
        }
        ProtectionsCommand::Unprotect(args) => {
            let pool = keel_service::connect(&args.db, "keel-orphan-sweep protections", 2).await?;
            let changed =
                protections::unprotect(&pool, &args.digest, &args.reason, &args.actor, now())
                    .await
                    .context("could not lift the protection")?;
            if changed {
                eprintln!("lifted the protection of {}", args.digest.as_str());
            } else {
                eprintln!("{} was not protected", args.digest.as_str());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reason or an actor another writer stored with a line break or a terminal escape is
    /// listed on one line, its control characters escaped.
    #[test]
    fn a_protection_listed_is_one_line_whatever_its_row_holds() {
        let planted = keel_orphan_sweep::protections::Protection {
            digest: "ab".repeat(24),
            reason: "ok\nabababababababababababababababababababababababab\t\u{1b}[2J".to_owned(),
            protected_by: "operator:x\r".to_owned(),
            created_at: time::macros::datetime!(2026-12-02 10:00 UTC),
        };
        let line = listing_line(&planted);
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\t'),
            "{line:?}"
        );
        assert_eq!(line.matches('\t').count(), 3, "{line:?}");
        assert!(
            line.ends_with("ok\\nabababababababababababababababababababababababab\\t\\u{1b}[2J"),
            "{line:?}"
        );
    }
}
