//! Starting a throwaway PostgreSQL server, or adopting the one `DATABASE_URL` names.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};

use crate::HarnessError;

/// How long a fresh server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The unprivileged account the server runs as when the caller is root.
pub(crate) const UNPRIVILEGED_USER: &str = "postgres";

/// Creates the cluster and then runs the server, both children of a small shell whose watcher
/// is in place before `initdb` starts (FND-14): when the process that started it exits (for any
/// reason, even SIGKILL) the pipe on its standard input closes and the watcher
///
/// 1. marks the run as stopping, so the shell starts no further step (no server after a cluster
///    whose creation the stop request did not interrupt);
/// 2. asks whichever child the shell last started (`$run/child.pid`) to stop, again every 0.2 s
///    for as long as the shell lives: a pid not yet recorded, a child that ignored the request
///    (`initdb` before it installs its signal handlers, where SIGINT is still ignored as in every
///    background job of a non-interactive shell), or a server started just before the mark are
///    all stopped in turn. SIGINT (a server's fast shutdown) for 10 s, then SIGQUIT, then
///    SIGKILL from 20 s;
/// 3. once the shell has exited (or is a zombie its parent has not reaped), removes the
///    directory, trying again while something still writes in it.
///
/// Nothing is left running or on disk after a test run.
///
/// The cluster requires a SCRAM password of every role on every connection, the `postgres`
/// superuser included (FND-15): its password is read from `$run/pwfile`, which is removed once
/// `initdb` has read it.
///
/// Arguments: $1 binary dir, $2 run dir (data, socket, logs; removed at the end), $3 port, then
/// extra server arguments (`-c name=value` pairs, which come last and so win).
const SUPERVISOR: &str = r#"
exec 3<&0
bin="$1"; run="$2"; port="$3"; shift 3
data="$run/data"
shell=$$
(
    cat <&3 >/dev/null
    : >"$run/stopping"
    asked=0
    while stat=$(cat "/proc/$shell/stat" 2>/dev/null); do
        state=${stat##*) }
        case "${state%% *}" in Z|X|'') break ;; esac
        pid=$(cat "$run/child.pid" 2>/dev/null)
        if [ -n "$pid" ]; then
            if [ "$asked" -lt 50 ]; then signal=INT
            elif [ "$asked" -lt 100 ]; then signal=QUIT
            else signal=KILL
            fi
            kill -s "$signal" "$pid" 2>/dev/null
        fi
        asked=$((asked + 1))
        sleep 0.2
    done
    tries=0
    while [ -e "$run" ] && [ "$tries" -lt 100 ]; do
        rm -rf "$run" 2>/dev/null || sleep 0.2
        tries=$((tries + 1))
    done
) &
exec 3<&-
[ -e "$run/stopping" ] && exit 1
"$bin/initdb" -D "$data" -U postgres -A scram-sha-256 --pwfile="$run/pwfile" \
    -E UTF8 --locale=C --no-sync </dev/null >"$run/initdb.log" 2>&1 &
echo $! >"$run/child.pid"
wait $! || exit 1
rm -f "$run/pwfile"
[ -e "$run/stopping" ] && exit 1
"$bin/postgres" -D "$data" -p "$port" -k "$run" -h 127.0.0.1 \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c max_connections=300 -c log_min_messages=warning "$@" \
    </dev/null >"$run/server.log" 2>&1 &
echo $! >"$run/child.pid"
wait $!
"#;

/// How to configure a throwaway server beyond the defaults (for tests of what a server logs, or
/// of password authentication).
#[derive(Clone, Debug, Default)]
pub struct ThrowawayOptions {
    /// Extra server settings (`-c name=value`), e.g. `("log_statement", "all")`.
    pub settings: Vec<(String, String)>,
    /// Kept for compatibility: every throwaway server now requires SCRAM-SHA-256 password
    /// authentication of every role, the `postgres` superuser included (with a random password
    /// the server's connection options and URLs carry), so a wrong password never goes
    /// unnoticed and no other local account can connect (FND-15).
    pub password_auth: bool,
}

/// A PostgreSQL server the harness may create databases on.
///
/// Either a throwaway server started from the machine's own binaries (stopped and deleted when
/// this process exits), or the server `DATABASE_URL` points at.
#[derive(Debug)]
pub struct PgServer {
    admin: PgConnectOptions,
    origin: Origin,
}

#[derive(Debug)]
enum Origin {
    Throwaway {
        run_dir: PathBuf,
        port: u16,
        version: String,
        // Held open for the life of the process: closing it stops the server.
        _lifeline: Mutex<ChildStdin>,
        _supervisor: Mutex<Child>,
    },
    External,
}

impl PgServer {
    /// Uses `DATABASE_URL` when it is set, otherwise starts a throwaway server.
    pub fn from_env() -> Result<Self, HarnessError> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => Self::external(&url),
            _ => Self::start_throwaway(),
        }
    }

    /// Adopts an existing server. The role in `url` must be allowed to `CREATE DATABASE`.
    pub fn external(url: &str) -> Result<Self, HarnessError> {
        let admin = PgConnectOptions::from_str(url).map_err(|_| HarnessError::BadDatabaseUrl)?;
        Ok(Self {
            admin,
            origin: Origin::External,
        })
    }

    /// Starts a fresh server in a temporary directory from the machine's PostgreSQL binaries.
    ///
    /// As root, the server runs as the unprivileged `postgres` account (PostgreSQL refuses to
    /// run as root). The server stops and its directory is removed when this process exits.
    pub fn start_throwaway() -> Result<Self, HarnessError> {
        Self::start_throwaway_with(&ThrowawayOptions::default())
    }

    /// [`PgServer::start_throwaway`] with extra settings and, optionally, password
    /// authentication. The server is this value's own: it stops when the process exits.
    pub fn start_throwaway_with(options: &ThrowawayOptions) -> Result<Self, HarnessError> {
        sweep_stale_run_dirs(&std::env::temp_dir());
        let bin_dir = find_bin_dir()?;
        let run_as = RunAs::detect()?;
        let run_dir = make_run_dir(&run_as)?;
        let password = random_password()?;
        write_pwfile(&run_as, &run_dir, &password)?;

        let port = free_port()?;
        let (supervisor, lifeline) =
            spawn_supervisor(&run_as, &bin_dir, &run_dir, port, &options.settings).inspect_err(
                |_| {
                    let _ = fs::remove_dir_all(&run_dir);
                },
            )?;

        let admin = PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(port)
            .username("postgres")
            .password(&password)
            .database("postgres");
        let mut server = Self {
            admin,
            origin: Origin::Throwaway {
                run_dir,
                port,
                version: String::new(),
                _lifeline: Mutex::new(lifeline),
                _supervisor: Mutex::new(supervisor),
            },
        };
        server.wait_until_ready()?;
        if let Origin::Throwaway {
            run_dir, version, ..
        } = &mut server.origin
        {
            *version = fs::read_to_string(run_dir.join("data/PG_VERSION"))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default();
        }
        Ok(server)
    }

    fn wait_until_ready(&self) -> Result<(), HarnessError> {
        let Origin::Throwaway {
            run_dir,
            _supervisor,
            ..
        } = &self.origin
        else {
            return Ok(());
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let options = &self.admin;
        loop {
            let connected =
                crate::block_on(async { PgConnection::connect_with(options).await?.close().await });
            if connected.is_ok() {
                return Ok(());
            }
            let exited = _supervisor
                .lock()
                .map(|mut child| matches!(child.try_wait(), Ok(Some(_))))
                .unwrap_or(false);
            let log = read_log(run_dir);
            if exited {
                // initdb failed when it left no cluster behind.
                if !run_dir.join("data/PG_VERSION").is_file() {
                    return Err(HarnessError::Initdb(read_named_log(run_dir, "initdb.log")));
                }
                return Err(HarnessError::ServerExited(log));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::StartTimeout(log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Connection options for the server's administrative database.
    pub fn admin_options(&self) -> PgConnectOptions {
        self.admin.clone()
    }

    /// Connection options for database `name` on this server.
    pub fn options_for(&self, name: &str) -> PgConnectOptions {
        self.admin.clone().database(name)
    }

    /// A `postgres://` URL for database `name` (what a binary's `--database-url` takes).
    ///
    /// For an external server this carries the password from `DATABASE_URL`: do not log it.
    pub fn url_for(&self, name: &str) -> String {
        self.options_for(name).to_url_lossy().to_string()
    }

    /// The server's log file, for a throwaway server.
    pub fn log_path(&self) -> Option<PathBuf> {
        match &self.origin {
            Origin::Throwaway { run_dir, .. } => Some(run_dir.join("server.log")),
            Origin::External => None,
        }
    }

    /// Whether this is a throwaway server this process started.
    pub fn is_throwaway(&self) -> bool {
        matches!(self.origin, Origin::Throwaway { .. })
    }

    /// A one-line description without secrets, e.g. for the demo's output.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Throwaway {
                run_dir,
                port,
                version,
                ..
            } => format!(
                "throwaway PostgreSQL {version} on 127.0.0.1:{port} (data in {})",
                run_dir.display()
            ),
            Origin::External => format!(
                "PostgreSQL from DATABASE_URL at {}:{}",
                self.admin.get_host(),
                self.admin.get_port()
            ),
        }
    }

    /// Creates database `name`, optionally as a copy of `template`.
    pub async fn create_database(
        &self,
        name: &str,
        template: Option<&str>,
    ) -> Result<(), HarnessError> {
        let mut admin = self.connect_admin().await?;
        let sql = match template {
            Some(template) => format!(
                "CREATE DATABASE {} TEMPLATE {}",
                quote_ident(name),
                quote_ident(template)
            ),
            None => format!("CREATE DATABASE {}", quote_ident(name)),
        };
        admin
            .execute(sqlx::AssertSqlSafe(sql))
            .await
            .map_err(|e| HarnessError::database("create a test database", e))?;
        Ok(())
    }

    /// Drops database `name`, disconnecting anyone still using it.
    pub async fn drop_database(&self, name: &str) -> Result<(), HarnessError> {
        let mut admin = self.connect_admin().await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(name)
            )))
            .await
            .map_err(|e| HarnessError::database("drop a test database", e))?;
        Ok(())
    }

    /// A connection to the administrative database.
    pub async fn connect_admin(&self) -> Result<PgConnection, HarnessError> {
        PgConnection::connect_with(&self.admin)
            .await
            .map_err(|e| HarnessError::database("connect to the server", e))
    }
}

/// Quotes an SQL identifier (doubling embedded quotes).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn read_log(run_dir: &Path) -> String {
    read_named_log(run_dir, "server.log")
}

fn read_named_log(run_dir: &Path, name: &str) -> String {
    let mut log = String::new();
    if let Ok(mut file) = fs::File::open(run_dir.join(name)) {
        let _ = file.read_to_string(&mut log);
    }
    tail(&log)
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub(crate) fn free_port() -> Result<u16, HarnessError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| HarnessError::io("find a free port", e))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| HarnessError::io("find a free port", e))
}

/// Where the server binaries are: `$KEEL_PG_BINDIR`, the directory `initdb` on `PATH` really
/// lives in, or the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them off `PATH`).
pub fn find_bin_dir() -> Result<PathBuf, HarnessError> {
    find_bin_dir_in(
        std::env::var_os("KEEL_PG_BINDIR").map(PathBuf::from),
        std::env::var_os("PATH"),
        Path::new("/usr/lib/postgresql"),
    )
}

/// [`find_bin_dir`] over explicit inputs: an override directory, a `PATH` value, and the root
/// of Debian's versioned installs.
fn find_bin_dir_in(
    override_dir: Option<PathBuf>,
    path: Option<std::ffi::OsString>,
    versioned_root: &Path,
) -> Result<PathBuf, HarnessError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = override_dir {
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(HarnessError::NoBinaries)
        };
    }
    for dir in path.iter().flat_map(std::env::split_paths) {
        // Follow a symlinked `initdb` to the directory that holds the whole server.
        if let Ok(real) = fs::canonicalize(dir.join("initdb"))
            && let Some(real_dir) = real.parent()
            && has_server(real_dir)
        {
            return Ok(real_dir.to_path_buf());
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(versioned_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or(HarnessError::NoBinaries)
}

/// Starts [`SUPERVISOR`] for `run_dir` as `run_as`, in a process group of its own: a signal to
/// the test's group (Ctrl-C, or SIGKILL of a whole `cargo test`) does not take the watcher down
/// with it; the closed lifeline (the returned pipe, held for the server's life) stops `initdb`
/// or the server and removes the directory (FND-14).
fn spawn_supervisor(
    run_as: &RunAs,
    bin_dir: &Path,
    run_dir: &Path,
    port: u16,
    settings: &[(String, String)],
) -> Result<(Child, ChildStdin), HarnessError> {
    let mut supervisor = run_as
        .command(Path::new("sh"))
        .args(["-c", SUPERVISOR, "keel-postgres"])
        .arg(bin_dir)
        .arg(run_dir)
        .arg(port.to_string())
        .args(
            settings
                .iter()
                .flat_map(|(name, value)| ["-c".to_owned(), format!("{name}={value}")]),
        )
        .current_dir(run_dir)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| HarnessError::io("start postgres", e))?;
    match supervisor.stdin.take() {
        Some(lifeline) => Ok((supervisor, lifeline)),
        None => {
            let _ = supervisor.kill();
            let _ = supervisor.wait();
            Err(HarnessError::io(
                "start postgres",
                std::io::Error::other("no stdin pipe"),
            ))
        }
    }
}

/// Whom to run the server as: ourselves, or (as root) the unprivileged `postgres` account.
enum RunAs {
    Me,
    Unprivileged { uid: u32, gid: u32 },
}

impl RunAs {
    fn detect() -> Result<Self, HarnessError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(Self::Me);
        }
        match nix::unistd::User::from_name(UNPRIVILEGED_USER) {
            Ok(Some(user)) => Ok(Self::Unprivileged {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }),
            _ => Err(HarnessError::NoUnprivilegedUser),
        }
    }

    fn command(&self, program: &Path) -> Command {
        match self {
            Self::Me => Command::new(program),
            Self::Unprivileged { .. } => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", UNPRIVILEGED_USER, "--"]).arg(program);
                cmd
            }
        }
    }
}

/// A random password of 36 hex digits (no character a URL or SQL literal must escape).
pub(crate) fn random_password() -> Result<String, HarnessError> {
    let mut bytes = [0u8; 18];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| HarnessError::io("read /dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the superuser's password where `initdb --pwfile` reads it, readable only by the
/// account the server runs as.
fn write_pwfile(run_as: &RunAs, run_dir: &Path, password: &str) -> Result<(), HarnessError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = run_dir.join("pwfile");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| HarnessError::io("write the superuser's password file", e))?;
    std::io::Write::write_all(&mut file, format!("{password}\n").as_bytes())
        .map_err(|e| HarnessError::io("write the superuser's password file", e))?;
    if let RunAs::Unprivileged { uid, gid } = run_as {
        std::os::unix::fs::chown(&path, Some(*uid), Some(*gid))
            .map_err(|e| HarnessError::io("hand the password file to the postgres account", e))?;
    }
    Ok(())
}

/// Creates a cluster in `data_dir` (superuser `postgres` with `password`, SCRAM authentication
/// for every connection, UTF-8, C locale).
fn initdb(
    run_as: &RunAs,
    bin_dir: &Path,
    run_dir: &Path,
    data_dir: &Path,
    password: &str,
) -> Result<(), HarnessError> {
    write_pwfile(run_as, run_dir, password)?;
    let initdb = run_as
        .command(&bin_dir.join("initdb"))
        .args(["-D"])
        .arg(data_dir)
        .args(["-U", "postgres", "-A", "scram-sha-256"])
        .arg(format!("--pwfile={}", run_dir.join("pwfile").display()))
        .args(["-E", "UTF8", "--locale=C", "--no-sync"])
        .current_dir(run_dir)
        .output()
        .map_err(|e| HarnessError::io("run initdb", e));
    let _ = fs::remove_file(run_dir.join("pwfile"));
    let initdb = initdb?;
    if initdb.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Initdb(tail(&String::from_utf8_lossy(
            &initdb.stderr,
        ))))
    }
}

/// A throwaway cluster run by `pg_ctl`, which a test may stop and start again under a running
/// binary (a database restart). It is the test's own, so stopping it disturbs no other test.
///
/// Unlike [`PgServer::start_throwaway`] it is not watched by a supervisor: it is stopped and its
/// directory removed when the value is dropped, so only a test process killed outright leaves
/// it behind.
pub struct RestartableServer {
    run_as: RunAs,
    bin_dir: PathBuf,
    run_dir: PathBuf,
    port: u16,
    password: String,
}

impl RestartableServer {
    /// Creates a cluster on a free loopback port and starts it.
    pub fn start() -> Result<Self, HarnessError> {
        let bin_dir = find_bin_dir()?;
        let run_as = RunAs::detect()?;
        let run_dir = make_run_dir(&run_as)?;
        let server = Self {
            port: free_port()?,
            run_as,
            bin_dir,
            run_dir,
            password: random_password()?,
        };
        initdb(
            &server.run_as,
            &server.bin_dir,
            &server.run_dir,
            &server.run_dir.join("data"),
            &server.password,
        )?;
        server.start_again()?;
        Ok(server)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` as the superuser `postgres`. It carries the superuser's password
    /// (the server trusts no connection, FND-15): do not log it.
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Stops the server (fast shutdown: sessions are disconnected) and waits until it is down.
    pub fn stop(&self) -> Result<(), HarnessError> {
        self.pg_ctl(&["stop", "-m", "fast", "-w"])
    }

    /// Starts the stopped server again and waits until it accepts connections.
    pub fn start_again(&self) -> Result<(), HarnessError> {
        self.pg_ctl(&["start", "-w"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), HarnessError> {
        let options = format!(
            "-p {} -k {} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=250",
            self.port,
            self.run_dir.display()
        );
        let out = self
            .run_as
            .command(&self.bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(self.run_dir.join("data"))
            .arg("-l")
            .arg(self.run_dir.join("server.log"))
            .args(["-o", &options])
            .args(args)
            .current_dir(&self.run_dir)
            .stdout(Stdio::null())
            .output()
            .map_err(|e| HarnessError::io("run pg_ctl", e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HarnessError::PgCtl(format!(
                "{}: {}",
                args.join(" "),
                tail(&String::from_utf8_lossy(&out.stderr))
            )))
        }
    }
}

impl Drop for RestartableServer {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

/// Removes the run directories (`keel-pg-<pid>-*`) that a test process killed before its
/// server was supervised left behind (FND-14: a SIGKILL during `initdb`), together with the
/// shared-memory segment a stale `postmaster.pid` names. A directory is removed only when the
/// process that made it and the postmaster it names are both gone. Returns how many were.
pub(crate) fn sweep_stale_run_dirs(temp: &Path) -> usize {
    fn alive(pid: &str) -> bool {
        !pid.is_empty() && Path::new("/proc").join(pid).exists()
    }
    let Ok(entries) = fs::read_dir(temp) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("keel-pg-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !pid.bytes().all(|b| b.is_ascii_digit()) || alive(pid) {
            continue;
        }
        let dir = entry.path();
        let postmaster = fs::read_to_string(dir.join("data/postmaster.pid")).unwrap_or_default();
        let mut lines = postmaster.lines();
        if alive(lines.next().unwrap_or("").trim()) {
            continue;
        }
        // Line 7: "<shmem key> <shmem id>".
        if let Some(shmid) = postmaster
            .lines()
            .nth(6)
            .and_then(|l| l.split_whitespace().nth(1))
            .filter(|id| id.bytes().all(|b| b.is_ascii_digit()))
        {
            let _ = Command::new("ipcrm")
                .args(["-m", shmid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A fresh run directory `keel-pg-<pid>-<time>-<n>` in the temporary directory, made with mode
/// 0700 and handed to the account the server runs as.
fn make_run_dir(run_as: &RunAs) -> Result<PathBuf, HarnessError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = create_run_dir_in(&std::env::temp_dir(), nanos, &NEXT)?;
    if let RunAs::Unprivileged { uid, gid } = run_as {
        std::os::unix::fs::chown(&dir, Some(*uid), Some(*gid)).map_err(|e| {
            HarnessError::io("hand the server directory to the postgres account", e)
        })?;
    }
    Ok(dir)
}

/// Creates `keel-pg-<pid>-<nanos>-<n>` in `temp` with mode 0700. The name holds a per-process
/// counter besides the time, so servers started at once by the threads of one test process never
/// share one; a name already taken (a directory a process with the same id left behind) makes
/// the next one be tried, never an error.
fn create_run_dir_in(temp: &Path, nanos: u32, next: &AtomicU32) -> Result<PathBuf, HarnessError> {
    const ATTEMPTS: u32 = 64;
    let mut attempt = 0;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let dir = temp.join(format!("keel-pg-{}-{nanos:x}-{n}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt + 1 < ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => return Err(HarnessError::io("create the server directory", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FND-14: run directories of dead test processes are removed at the next start; those of
    /// live ones (this process) are kept.
    #[test]
    fn stale_run_directories_of_dead_processes_are_swept() {
        let temp = std::env::temp_dir().join(format!("keel-testkit-sweep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&temp);
        fs::create_dir_all(&temp).unwrap();
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = temp.join(format!("keel-pg-{dead}-1f"));
        let live = temp.join(format!("keel-pg-{}-2f", std::process::id()));
        let unrelated = temp.join("keel-pg-notapid-3f");
        for dir in [&stale, &live, &unrelated] {
            fs::create_dir_all(dir.join("data")).unwrap();
            fs::write(dir.join("data/PG_VERSION"), "15\n").unwrap();
        }
        assert_eq!(sweep_stale_run_dirs(&temp), 1);
        assert!(!stale.exists());
        assert!(live.exists() && unrelated.exists());
        fs::remove_dir_all(&temp).unwrap();
    }

    /// Two servers started at the same instant by one process never get the same run directory,
    /// and a name already taken is passed over: starting a server never fails on a name.
    #[test]
    fn run_directories_never_collide_and_a_taken_name_is_passed_over() {
        let scratch = Scratch::new("rundir");
        let next = AtomicU32::new(0);
        let taken = |n: u32| {
            scratch
                .0
                .join(format!("keel-pg-{}-2a-{n}", std::process::id()))
        };
        fs::create_dir_all(taken(0)).unwrap();
        fs::create_dir_all(taken(1)).unwrap();
        let first = create_run_dir_in(&scratch.0, 0x2a, &next).unwrap();
        let second = create_run_dir_in(&scratch.0, 0x2a, &next).unwrap();
        assert_eq!((first.clone(), second.clone()), (taken(2), taken(3)));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&first).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // The sweep still reads the process id out of the longer name.
        assert_eq!(sweep_stale_run_dirs(&scratch.0), 0);
        assert!(first.exists() && second.exists());
    }

    /// A fake `initdb` and `postgres` (Python, so that they can catch a signal that a
    /// background job of a non-interactive shell starts with ignored, as the real programs do)
    /// that record in `events` what they did.
    fn fake_server_bin(scratch: &Scratch, initdb_body: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt as _;
        let bin = scratch.0.join("bin");
        fs::create_dir_all(&bin).unwrap();
        let events = scratch.0.join("events");
        let prelude = format!(
            "#!/usr/bin/env python3\nimport os, signal, sys, time\n\
             def note(what):\n    open({events:?}, 'a').write(what + '\\n')\n",
            events = events.display().to_string()
        );
        let postgres = "note('server started')\n\
             signal.signal(signal.SIGINT, lambda *_: sys.exit(0))\n\
             while True:\n    time.sleep(0.05)\n";
        for (name, body) in [("initdb", initdb_body), ("postgres", postgres)] {
            let path = bin.join(name);
            fs::write(&path, format!("{prelude}{body}")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        (bin, events)
    }

    /// Runs the supervisor over the fake binaries, waits until `initdb` has begun, closes the
    /// lifeline as a killed test process would, and answers whether the run directory was gone
    /// within 30 s, with what the fakes recorded.
    fn stop_during_initdb(initdb_body: &str) -> (bool, String) {
        let scratch = Scratch::new(&format!(
            "supervisor-{}",
            NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        let (bin, events) = fake_server_bin(&scratch, initdb_body);
        let run = scratch.0.join("run");
        fs::create_dir_all(&run).unwrap();
        let (mut shell, lifeline) = spawn_supervisor(&RunAs::Me, &bin, &run, 1, &[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fs::read_to_string(&events)
            .unwrap_or_default()
            .contains("initdb started")
        {
            assert!(Instant::now() < deadline, "the fake initdb never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(lifeline);
        // The shell is not reaped meanwhile: the watcher must see it exit as a zombie.
        let deadline = Instant::now() + Duration::from_secs(30);
        while run.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let removed = !run.exists();
        // Whatever the outcome, nothing of this run outlives the test: its whole process group
        // (the shell, the watcher and the fakes) is killed.
        if let Ok(group) = i32::try_from(shell.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = shell.wait();
        (removed, fs::read_to_string(&events).unwrap_or_default())
    }

    static NEXT_SCRATCH: AtomicU32 = AtomicU32::new(0);

    /// FND-14: a stop request that arrives while the cluster is being created, and that `initdb`
    /// does not act on (it arrived before `initdb` caught signals), never lets the server start
    /// once `initdb` finishes: the directory is removed and nothing runs in it.
    #[test]
    fn a_stop_during_initdb_never_lets_the_server_start_afterwards() {
        let (removed, events) = stop_during_initdb(
            "note('initdb started')\n\
             signal.signal(signal.SIGINT, signal.SIG_IGN)\n\
             os.makedirs(sys.argv[2])\n\
             time.sleep(1)\n\
             open(os.path.join(sys.argv[2], 'PG_VERSION'), 'w').write('15\\n')\n",
        );
        assert!(removed, "the run directory is left behind: {events}");
        assert!(!events.contains("server started"), "{events}");
    }

    /// FND-14: a child that ignores the first stop request is asked again until it stops, and
    /// only then is its directory removed: one request, lost, never leaves a cluster behind.
    #[test]
    fn a_child_that_ignores_the_first_stop_request_is_asked_again() {
        let (removed, events) = stop_during_initdb(
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n\
             note('initdb started')\n\
             os.makedirs(sys.argv[2])\n\
             time.sleep(0.6)\n\
             signal.signal(signal.SIGINT, lambda *_: sys.exit(1))\n\
             while True:\n    time.sleep(0.05)\n",
        );
        assert!(removed, "the run directory is left behind: {events}");
        assert!(!events.contains("server started"), "{events}");
    }

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("keel-testkit-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn server_dir(&self, rel: &str) -> PathBuf {
            let dir = self.0.join(rel);
            fs::create_dir_all(&dir).unwrap();
            for bin in ["initdb", "postgres"] {
                fs::write(dir.join(bin), "").unwrap();
            }
            dir
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn without_server_binaries_the_error_says_how_to_install_them() {
        let scratch = Scratch::new("none");
        let err = find_bin_dir_in(None, Some(scratch.0.clone().into_os_string()), &scratch.0)
            .unwrap_err();
        assert!(matches!(err, HarnessError::NoBinaries));
        assert!(
            err.to_string().contains("apt-get install postgresql"),
            "{err}"
        );
        let err = find_bin_dir_in(Some(scratch.0.join("nowhere")), None, &scratch.0).unwrap_err();
        assert!(matches!(err, HarnessError::NoBinaries));
    }

    #[test]
    fn debian_versioned_dirs_off_path_are_found_newest_first() {
        let scratch = Scratch::new("debian");
        scratch.server_dir("lib/13/bin");
        let newest = scratch.server_dir("lib/16/bin");
        fs::create_dir_all(scratch.0.join("lib/17/bin")).unwrap(); // client only: no server
        let found = find_bin_dir_in(None, None, &scratch.0.join("lib")).unwrap();
        assert_eq!(found, newest);
    }

    #[test]
    fn a_symlinked_initdb_on_path_leads_to_the_whole_server_dir() {
        let scratch = Scratch::new("path");
        let real = scratch.server_dir("real/bin");
        let on_path = scratch.0.join("usr-local-bin");
        fs::create_dir_all(&on_path).unwrap();
        std::os::unix::fs::symlink(real.join("initdb"), on_path.join("initdb")).unwrap();
        let found = find_bin_dir_in(None, Some(on_path.into_os_string()), &scratch.0).unwrap();
        assert_eq!(
            fs::canonicalize(found).unwrap(),
            fs::canonicalize(real).unwrap()
        );
    }

    #[test]
    fn an_override_dir_wins_when_it_holds_a_server() {
        let scratch = Scratch::new("override");
        let chosen = scratch.server_dir("custom");
        scratch.server_dir("lib/16/bin");
        let found = find_bin_dir_in(Some(chosen.clone()), None, &scratch.0.join("lib")).unwrap();
        assert_eq!(found, chosen);
    }
}
