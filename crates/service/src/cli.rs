//! Command-line and environment configuration shared by every binary.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::str::FromStr;

use clap::builder::{BoolishValueParser, StyledStr};
use clap::error::ErrorKind;
use clap::{ArgAction, Command, Parser};
use sqlx::postgres::PgConnectOptions;

/// Exit code for a usage error (bad flag, missing value). Never 2: for `keel-rater`, 2 means
/// "page someone".
pub const EXIT_USAGE: u8 = 64;

/// The exit codes every binary shares, for `--help`.
pub const EXIT_CODES_HELP: &str =
    "Exit codes:\n  0   success\n  1   error (configuration, database, I/O)\n  64  usage error";

/// The version every binary prints for `--version`: the package version and the commit it was
/// built from (`KEEL_COMMIT` at build time, else `git rev-parse HEAD`, else `unknown`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KEEL_COMMIT"),
    ")"
);

/// The commit the binaries were built from, as embedded at build time (`unknown` without git).
pub const COMMIT: &str = env!("KEEL_COMMIT");

/// A command line that could not be parsed, or a request for help or the version.
#[derive(Debug)]
pub struct UsageExit {
    /// What to print, as plain text (help text, version, or the error with its usage line).
    pub message: String,
    /// The same message with clap's styling, printed only to a terminal that allows colour.
    pub styled: StyledStr,
    /// The exit code: 0 for `--help`/`--version`, [`EXIT_USAGE`] for errors.
    pub code: u8,
}

/// Whether output to a stream may carry ANSI colour: only when the stream is a terminal,
/// `NO_COLOR` is unset or empty (<https://no-color.org>), and `TERM` is not `dumb`.
pub fn color_allowed(is_terminal: bool, no_color: Option<&OsStr>, term: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty) && term.is_none_or(|term| term != "dumb")
}

/// The output streams a binary writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (help, `--version`, reports).
    Stdout,
    /// Standard error (usage errors, logs).
    Stderr,
}

impl Stream {
    /// [`color_allowed`] for this stream and the process environment.
    pub fn color_allowed(self) -> bool {
        let is_terminal = match self {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        };
        color_allowed(
            is_terminal,
            std::env::var_os("NO_COLOR").as_deref(),
            std::env::var_os("TERM").as_deref(),
        )
    }
}

/// The command as every binary shares it: `--version` carries [`VERSION`], and boolean flags
/// read from the environment accept the usual spellings (`1`/`0`, `yes`/`no`, `on`/`off`,
/// `true`/`false`, any case), on every subcommand.
pub fn command<P: Parser>() -> Command {
    let command = P::command();
    let command = if command.get_version().is_some() {
        command.version(VERSION)
    } else {
        command
    };
    boolish_env_flags(command)
}

fn boolish_env_flags(command: Command) -> Command {
    command
        .mut_args(|arg| {
            if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
                && arg.get_env().is_some()
            {
                arg.value_parser(BoolishValueParser::new())
            } else {
                arg
            }
        })
        .mut_subcommands(boolish_env_flags)
}

/// Parses `args` (the first being the program name) into `P`, mapping clap's outcomes onto
/// Keel's exit codes. Every usage error starts with `error:`.
pub fn try_parse_from<P, I, T>(args: I) -> Result<P, UsageExit>
where
    P: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = command::<P>();
    command
        .try_get_matches_from_mut(args.iter().cloned())
        .and_then(|matches| P::from_arg_matches(&matches))
        .map_err(|err| prefer_invalid_values(err, &args, self::command::<P>()))
        .map_err(|err| {
            let err = err.format(&mut command);
            let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
            let mut styled = err.render();
            if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let name = command.get_name().to_owned();
                let mut prefixed = StyledStr::new();
                use std::fmt::Write as _;
                let _ = write!(
                    prefixed,
                    "error: '{name}' requires a subcommand or arguments\n\n{}",
                    styled.ansi()
                );
                styled = prefixed;
            }
            let message = styled.to_string();
            let redacted = redact_secret_arguments(&message, &args);
            if redacted != message {
                styled = StyledStr::from(redacted.clone());
            }
            UsageExit {
                message: redacted,
                styled,
                code,
            }
        })
}

/// Removes from a usage error every command-line argument that may hold a credential (a URL,
/// anything with `@`, or a `password=`/`key=` pair): clap quotes the offending argument, and a
/// database URL given positionally would otherwise reach the pod log.
fn redact_secret_arguments(message: &str, args: &[OsString]) -> String {
    let mut out = message.to_owned();
    for arg in args.iter().skip(1) {
        let arg = arg.to_string_lossy();
        let lower = arg.to_ascii_lowercase();
        // Also anything the audit screen takes for a credential (an API key, a JWT, a cloud
        // key, a customer token's name): a value parser that refuses it (an actor, a request
        // id) would otherwise have it quoted back.
        let risky = lower.contains("://")
            || lower.contains('@')
            || lower.contains("password")
            || lower.contains("secret")
            || lower.contains("token=")
            || keel_audit::looks_secret(&arg);
        if risky && arg.len() > 1 {
            // The value after `=` in `--flag=value` is what clap quotes.
            out = out.replace(arg.as_ref(), "<redacted>");
            if let Some((_, value)) = arg.split_once('=')
                && value.len() > 1
            {
                out = out.replace(value, "<redacted>");
            }
        }
    }
    out
}

/// Parses `args` for a binary whose own flags may not be combined with one of its subcommands
/// (a `migrate` that would silently ignore the run's flags), while the flags every binary shares
/// (`--log-format`, `--help`, `--version`) may stand before or after it. `exclusive` names the
/// subcommand the parsed line chose when it is one of those. Only flags given on the command line
/// count: environment variables may serve both the run and the subcommand.
///
/// Clap's `args_conflicts_with_subcommands` would refuse `--log-format json migrate` too, so the
/// conflict is checked here instead.
pub fn try_parse_exclusive<P: Parser>(
    args: Vec<OsString>,
    exclusive: impl Fn(&P) -> Option<&'static str>,
) -> Result<P, UsageExit> {
    use clap::parser::ValueSource;
    const SHARED: [&str; 3] = ["log_format", "help", "version"];
    let parsed = try_parse_from::<P, _, _>(args.iter().cloned())?;
    let Some(subcommand) = exclusive(&parsed) else {
        return Ok(parsed);
    };
    let mut command = command::<P>();
    let Ok(matches) = command.try_get_matches_from_mut(args) else {
        // The same line parsed a moment ago; nothing to add to what it said.
        return Ok(parsed);
    };
    let given = command
        .get_arguments()
        .find(|arg| {
            let id = arg.get_id().as_str();
            !SHARED.contains(&id) && matches.value_source(id) == Some(ValueSource::CommandLine)
        })
        .map(|arg| arg.get_long().unwrap_or(arg.get_id().as_str()).to_owned());
    match given {
        None => Ok(parsed),
        Some(flag) => {
            let message = format!(
                "error: the subcommand '{subcommand}' cannot be used with '--{flag}'\n\n{}\n",
                command.render_usage()
            );
            Err(UsageExit {
                styled: message.clone().into(),
                message,
                code: EXIT_USAGE,
            })
        }
    }
}

/// Clap checks a subcommand's required arguments before it checks the value of a flag given
/// just before that subcommand (`--log-format xml migrate` would report the missing
/// `--database-url`, and `xml` only once that is given). So when `err` reports something missing,
/// the line is parsed again with nothing required: any other error that finds (an invalid value,
/// an unknown flag) is reported instead, since fixing only the missing part would not help.
fn prefer_invalid_values(err: clap::Error, args: &[OsString], command: Command) -> clap::Error {
    fn is_missing(kind: ErrorKind) -> bool {
        matches!(
            kind,
            ErrorKind::MissingRequiredArgument | ErrorKind::MissingSubcommand
        )
    }
    fn relaxed(command: Command) -> Command {
        command
            .subcommand_required(false)
            .arg_required_else_help(false)
            .mut_args(|arg| arg.required(false))
            .mut_subcommands(relaxed)
    }
    if !is_missing(err.kind()) {
        return err;
    }
    match relaxed(command).try_get_matches_from(args) {
        Err(other) if !is_missing(other.kind()) && other.use_stderr() => other,
        Ok(_) | Err(_) => err,
    }
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

/// Converts a usage exit into the process exit code, printing its message: help and the
/// version to stdout, errors to stderr, each coloured only if [`Stream::color_allowed`].
pub fn report(exit: UsageExit) -> ExitCode {
    let stream = if exit.code == 0 {
        Stream::Stdout
    } else {
        Stream::Stderr
    };
    let text = if stream.color_allowed() {
        exit.styled.ansi().to_string()
    } else {
        exit.message
    };
    match stream {
        Stream::Stdout => print!("{text}"),
        Stream::Stderr => eprint!("{text}"),
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

/// Flags of the `migrate` subcommand: the owner's database URL, and the application role to
/// grant least privilege to.
///
/// `migrate` should connect as the role that owns the schema (`--database-url` of the owner);
/// the binaries then serve as `--app-role`, which is granted only what they use (see
/// `keel_schema::roles`). Without `--app-role` no grant is made (a single-role installation,
/// where the serving role owns the audit trail and could bypass its triggers).
#[derive(Clone, Debug, clap::Args)]
pub struct MigrateArgs {
    /// The owner's connection.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The role the binaries serve as; granted SELECT and column-limited INSERT on the audit
    /// trail, DML on the other tables, no ownership, TRUNCATE, trigger or DDL rights.
    #[arg(long, env = "KEEL_APP_ROLE", value_name = "ROLE")]
    pub app_role: Option<keel_schema::roles::AppRole>,
}

impl From<DatabaseArgs> for MigrateArgs {
    fn from(db: DatabaseArgs) -> Self {
        Self { db, app_role: None }
    }
}

/// A database connection URL. It holds a password, so `Debug` and `Display` redact it, and
/// parsing it never fails at the command line (where clap would echo the value in its error):
/// it is checked by [`DatabaseUrl::connect_options`], whose error does not show it. Its memory
/// is zeroed on drop.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl zeroize::Zeroize for DatabaseUrl {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for DatabaseUrl {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(self);
    }
}

impl zeroize::ZeroizeOnDrop for DatabaseUrl {}

/// A database URL that is not a valid `postgres://` URL. The value is not shown.
#[derive(Debug, thiserror::Error)]
pub enum InvalidDatabaseUrl {
    /// Not a `postgres://` URL the driver can parse.
    #[error(
        "the database URL is not a valid postgres:// URL (its value is not shown); expected \
         postgres://user:password@host:port/database"
    )]
    Malformed,
    /// A query parameter the driver does not know (it would be ignored, and its value logged).
    #[error(
        "the database URL has a query parameter {0:?} that is not supported (its value is not \
         shown); supported: sslmode, sslrootcert, sslcert, sslkey, host, hostaddr, port, \
         dbname, user, password, application_name, options, statement-cache-capacity"
    )]
    UnknownParameter(String),
}

/// Query parameters sqlx's Postgres driver understands; any other is refused, because sqlx
/// would ignore it and log its value.
const KNOWN_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// Connection options parsed from the URL.
    pub fn connect_options(&self) -> Result<PgConnectOptions, InvalidDatabaseUrl> {
        let url = self.0.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(InvalidDatabaseUrl::Malformed);
        }
        if let Some((_, query)) = url.split_once('?') {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, named) = pair
                    .split_once('=')
                    .map_or((pair, false), |(k, _)| (k, true));
                if !KNOWN_URL_PARAMETERS.contains(&key) {
                    // sqlx would log the value at WARN and ignore the key: refuse, naming the
                    // key only in `key=value` form (a bare word may be a pasted secret).
                    let shown = if named {
                        key.chars()
                            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                            .take(40)
                            .collect()
                    } else {
                        "(a parameter without a value)".to_owned()
                    };
                    return Err(InvalidDatabaseUrl::UnknownParameter(shown));
                }
            }
        }
        PgConnectOptions::from_str(url).map_err(|_| InvalidDatabaseUrl::Malformed)
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

    /// OPS-11: the plain message never carries ANSI escapes; only `styled` does, and it is
    /// printed only where colour is allowed.
    #[test]
    fn help_and_usage_errors_are_plain_text_unless_a_terminal_allows_colour() {
        for args in [
            vec!["keel-test", "--help"],
            vec!["keel-test", "--bogus"],
            vec!["keel-test", "--database-url", "x", "--log-format", "xml"],
        ] {
            let exit = try_parse_from::<TestCli, _, _>(&args).unwrap_err();
            assert!(
                !exit.message.contains('\x1b'),
                "{args:?}: {:?}",
                exit.message
            );
            assert_eq!(
                exit.message,
                exit.styled.to_string(),
                "the plain message is the styled one without escapes"
            );
        }
        let help = try_parse_from::<TestCli, _, _>(["keel-test", "--help"]).unwrap_err();
        assert!(help.styled.ansi().to_string().contains('\x1b'));
    }

    #[test]
    fn colour_needs_a_terminal_no_no_color_and_a_capable_term() {
        let os = |s: &'static str| Some(OsStr::new(s));
        for (is_terminal, no_color, term, expected) in [
            (true, None, os("xterm-256color"), true),
            (true, None, None, true),
            (true, os(""), os("xterm"), true),
            (false, None, os("xterm"), false),
            (true, os("1"), os("xterm"), false),
            (true, os("anything"), None, false),
            (true, None, os("dumb"), false),
            (false, os("1"), os("dumb"), false),
        ] {
            assert_eq!(
                color_allowed(is_terminal, no_color, term),
                expected,
                "terminal={is_terminal} NO_COLOR={no_color:?} TERM={term:?}"
            );
        }
    }

    #[derive(Debug, Parser)]
    #[command(name = "keel-versioned", version)]
    struct VersionedCli {
        #[arg(long, env = "KEEL_SERVICE_TEST_FLAG")]
        flag: bool,
        #[command(subcommand)]
        command: Option<VersionedCommand>,
    }

    #[derive(Debug, clap::Subcommand)]
    enum VersionedCommand {
        /// A subcommand with its own boolean.
        Sub {
            #[arg(long, env = "KEEL_SERVICE_TEST_SUB_FLAG")]
            deep: bool,
        },
    }

    /// OPS-17: `--version` names the commit the binary was built from.
    #[test]
    fn version_carries_the_commit() {
        let exit =
            try_parse_from::<VersionedCli, _, _>(["keel-versioned", "--version"]).unwrap_err();
        assert_eq!(exit.code, 0);
        assert_eq!(exit.message.trim_end(), format!("keel-versioned {VERSION}"));
        assert!(exit.message.contains(COMMIT), "{}", exit.message);
        assert!(!COMMIT.is_empty());
    }

    #[derive(Debug, Parser)]
    #[command(name = "keel-migrating")]
    struct MigratingCli {
        #[command(flatten)]
        log: LogArgs,
        #[command(subcommand)]
        command: MigratingCommand,
    }

    #[derive(Debug, clap::Subcommand)]
    enum MigratingCommand {
        /// Needs a database.
        Migrate(DatabaseArgs),
    }

    /// OPS-14: an invalid value is reported even when a required flag is missing too, wherever
    /// the invalid flag stands (before or after the subcommand).
    #[test]
    fn an_invalid_value_is_reported_before_a_missing_flag() {
        for args in [
            vec!["keel-migrating", "--log-format", "xml", "migrate"],
            vec!["keel-migrating", "migrate", "--log-format", "xml"],
            vec!["keel-migrating", "--log-format=xml", "migrate"],
        ] {
            let exit = try_parse_from::<MigratingCli, _, _>(&args).unwrap_err();
            assert_eq!(exit.code, EXIT_USAGE, "{args:?}");
            assert!(
                exit.message
                    .starts_with("error: invalid value 'xml' for '--log-format"),
                "{args:?}: {}",
                exit.message
            );
        }
        let exit = try_parse_from::<MigratingCli, _, _>(["keel-migrating", "migrate"]).unwrap_err();
        assert!(exit.message.contains("--database-url"), "{}", exit.message);
    }

    /// OPS-14: a missing subcommand is a usage error that says so on its first line.
    #[test]
    fn a_missing_subcommand_is_an_error_line_then_the_help() {
        #[derive(Debug, Parser)]
        #[command(name = "keel-sub", arg_required_else_help = true)]
        struct NeedsSub {
            #[command(subcommand)]
            command: VersionedCommand,
        }
        let exit = try_parse_from::<NeedsSub, _, _>(["keel-sub"]).unwrap_err();
        assert_eq!(exit.code, EXIT_USAGE);
        assert!(exit.message.starts_with("error: "), "{}", exit.message);
        assert!(exit.message.contains("Usage:"), "{}", exit.message);
    }

    /// The child half of `boolean_env_flags_accept_the_usual_spellings`: run in a subprocess
    /// with the variables set, it checks what the parent expects; run alone, nothing is set and
    /// both flags are off.
    #[test]
    fn boolean_env_child() {
        let expect = |name: &str| std::env::var(name).is_ok_and(|v| v == "true");
        let cli = try_parse_from::<VersionedCli, _, _>(["keel-versioned", "sub"]).unwrap();
        assert_eq!(cli.flag, expect("KEEL_SERVICE_TEST_EXPECT"));
        let Some(VersionedCommand::Sub { deep }) = cli.command else {
            panic!("the subcommand was not parsed")
        };
        assert_eq!(deep, expect("KEEL_SERVICE_TEST_EXPECT"));
    }

    /// OPS-16: `1`, `yes`, `ON`, `True` and friends are accepted from the environment, on the
    /// root command and on subcommands alike; anything else is still a usage error.
    #[test]
    fn boolean_env_flags_accept_the_usual_spellings() {
        let run = |value: &str, expect: &str| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "cli::tests::boolean_env_child",
                    "--test-threads=1",
                ])
                .env("KEEL_SERVICE_TEST_FLAG", value)
                .env("KEEL_SERVICE_TEST_SUB_FLAG", value)
                .env("KEEL_SERVICE_TEST_EXPECT", expect)
                .output()
                .unwrap()
        };
        for (value, expect) in [
            ("1", "true"),
            ("yes", "true"),
            ("ON", "true"),
            ("True", "true"),
            ("true", "true"),
            ("0", "false"),
            ("no", "false"),
            ("off", "false"),
            ("FALSE", "false"),
        ] {
            let out = run(value, expect);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{value}: {stdout}");
            assert!(stdout.contains("1 passed"), "{value}: {stdout}");
        }
        let out = run("maybe", "false");
        assert!(!out.status.success(), "'maybe' was accepted as a boolean");
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

    /// OPS-24: the database URL's memory is zeroed when it is dropped (`Drop` runs `zeroize`,
    /// which empties the value).
    #[test]
    fn the_database_url_is_zeroized_on_drop() {
        fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroized_on_drop::<DatabaseUrl>();
        let mut url = DatabaseUrl::new(SECRET_URL);
        zeroize::Zeroize::zeroize(&mut url);
        assert_eq!(url.expose(), "");
    }

    /// FND-10: neither a malformed URL, an unknown query parameter (which sqlx would log with
    /// its value) nor a URL given where clap does not expect it is ever echoed.
    #[test]
    fn a_malformed_url_is_refused_without_echoing_it() {
        for bad in [
            "mysql://root:s3cr3t@db/x",
            "s3cr3t",
            "postgres://[s3cr3t",
            "postgres://keel@db/keel?sslpassword=s3cr3t",
            "postgres://keel@db/keel?sslmode=require&passwd=s3cr3t",
            "postgres://keel@db/keel?s3cr3t",
        ] {
            let err = DatabaseUrl::new(bad).connect_options().unwrap_err();
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
        let err = DatabaseUrl::new("postgres://keel@db/keel?sslpassword=s3cr3t")
            .connect_options()
            .unwrap_err();
        assert!(err.to_string().contains("\"sslpassword\""), "{err}");
        DatabaseUrl::new("postgres://keel:pw@db/keel?sslmode=require&application_name=x")
            .connect_options()
            .unwrap();

        for args in [
            vec!["keel-test", "postgres://app:s3cr3t@db/keel"],
            vec!["keel-test", "--log-format", "postgres://app:s3cr3t@db/keel"],
            vec!["keel-test", "--log-format=postgres://app:s3cr3t@db/keel"],
            vec!["keel-test", "--no-such-flag=postgres://app:s3cr3t@db/keel"],
        ] {
            let exit = try_parse_from::<TestCli, _, _>(args.clone()).unwrap_err();
            assert_eq!(exit.code, EXIT_USAGE, "{args:?}");
            assert!(
                !exit.message.contains("s3cr3t"),
                "{args:?}: {}",
                exit.message
            );
            assert!(
                !exit.styled.to_string().contains("s3cr3t"),
                "{args:?}: {}",
                exit.styled
            );
        }
    }
}
