//! Command-line and environment configuration shared by every binary.

use std::ffi::OsString;
use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;

use clap::Parser;
use sqlx::postgres::PgConnectOptions;

/// Exit code for a usage error (bad flag, missing value). Never 2: for `keel-rater`, 2 means
/// "page someone".
pub const EXIT_USAGE: u8 = 64;

/// The exit codes every binary shares, for `--help`.
pub const EXIT_CODES_HELP: &str =
    "Exit codes:\n  0   success\n  1   error (configuration, database, I/O)\n  64  usage error";

/// A command line that could not be parsed, or a request for help or the version.
#[derive(Debug)]
pub struct UsageExit {
    /// What to print (help text, version, or the error with its usage line).
    pub message: String,
    /// The exit code: 0 for `--help`/`--version`, [`EXIT_USAGE`] for errors.
    pub code: u8,
}

/// Parses `args` (the first being the program name) into `P`, mapping clap's outcomes onto
/// Keel's exit codes.
pub fn try_parse_from<P, I, T>(args: I) -> Result<P, UsageExit>
where
    P: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    P::try_parse_from(args).map_err(|err| {
        let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
        UsageExit {
            message: err.render().ansi().to_string(),
            code,
        }
    })
}

/// Parses the process's command line into `P`; on `--help`/`--version` prints and exits 0, on a
/// usage error prints and exits [`EXIT_USAGE`] (64).
pub fn parse<P: Parser>() -> P {
    match try_parse_from(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(exit) => {
            let code = i32::from(exit.code);
            report(exit);
            std::process::exit(code)
        }
    }
}

/// Converts a usage exit into the process exit code, printing its message.
pub fn report(exit: UsageExit) -> ExitCode {
    if exit.code == 0 {
        print!("{}", exit.message);
    } else {
        eprint!("{}", exit.message);
    }
    ExitCode::from(exit.code)
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging flags every binary takes.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log line format. Levels come from RUST_LOG (default: info).
    #[arg(long, env = "KEEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Database flags every binary takes.
#[derive(Clone, Debug, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres connection URL (postgres://user:password@host:port/database). Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: DatabaseUrl,
}

/// A database connection URL. It holds a password, so `Debug` and `Display` redact it, and
/// parsing it never fails at the command line (where clap would echo the value in its error):
/// it is checked by [`DatabaseUrl::connect_options`], whose error does not show it.
#[derive(Clone)]
pub struct DatabaseUrl(String);

/// A database URL that is not a valid `postgres://` URL. The value is not shown.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database URL is not a valid postgres:// URL (its value is not shown); expected \
     postgres://user:password@host:port/database"
)]
pub struct InvalidDatabaseUrl;

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// Connection options parsed from the URL.
    pub fn connect_options(&self) -> Result<PgConnectOptions, InvalidDatabaseUrl> {
        let url = self.0.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(InvalidDatabaseUrl);
        }
        PgConnectOptions::from_str(url).map_err(|_| InvalidDatabaseUrl)
    }

    /// The URL itself, for handing to a driver. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted database URL>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    #[command(name = "keel-test")]
    struct TestCli {
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    }

    const SECRET_URL: &str = "postgres://app:s3cr3t-pw@db.internal:5432/keel";

    #[test]
    fn usage_errors_exit_64_never_2() {
        for args in [
            vec!["keel-test", "--bogus"],
            vec!["keel-test", "--database-url", "x", "--log-format", "xml"],
            vec!["keel-test", "--database-url"],
        ] {
            let exit = try_parse_from::<TestCli, _, _>(&args).unwrap_err();
            assert_eq!(exit.code, EXIT_USAGE, "{args:?}: {}", exit.message);
        }
    }

    #[test]
    fn help_and_version_exit_zero() {
        let exit = try_parse_from::<TestCli, _, _>(["keel-test", "--help"]).unwrap_err();
        assert_eq!(exit.code, 0);
        assert!(exit.message.contains("--database-url"));
        assert!(exit.message.contains("--log-format"));
    }

    #[test]
    fn flags_parse_and_the_url_is_redacted_everywhere_it_could_be_printed() {
        let cli = try_parse_from::<TestCli, _, _>([
            "keel-test",
            "--database-url",
            SECRET_URL,
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Json);
        assert_eq!(cli.db.database_url.expose(), SECRET_URL);
        for shown in [
            format!("{cli:?}"),
            cli.db.database_url.to_string(),
            format!("{:?}", cli.db.database_url),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        let options = cli.db.database_url.connect_options().unwrap();
        assert_eq!(options.get_host(), "db.internal");
        assert_eq!(options.get_port(), 5432);
    }

    #[test]
    fn a_malformed_url_is_refused_without_echoing_it() {
        for bad in ["mysql://root:s3cr3t@db/x", "s3cr3t", "postgres://[s3cr3t"] {
            let err = DatabaseUrl::new(bad).connect_options().unwrap_err();
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
    }
}
