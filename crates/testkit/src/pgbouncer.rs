//! A throwaway PgBouncer (Debian's `pgbouncer` package) in front of a test server, for tests of
//! how Keel behaves behind a connection pooler. Without the binary it panics with the install
//! command; it never silently skips.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use sqlx::ConnectOptions as _;
use sqlx::postgres::PgConnectOptions;

const INSTALL: &str = "PgBouncer is needed for this test and was not found (looked for \
    `pgbouncer` in /usr/sbin and on PATH). Install Debian's package: \
    `apt-get update && apt-get install -y pgbouncer`";

fn pgbouncer_binary() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/sbin/pgbouncer")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("pgbouncer")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{INSTALL}"))
}

/// Runs PgBouncer (`$1` its binary, `$2` its configuration) until its lifeline, this shell's
/// standard input, closes: when the `Bouncer` is dropped, or when the test process dies however
/// it dies (SIGKILL included; the kernel closes the pipe). Then it kills PgBouncer (SIGKILL: a
/// throwaway pooler has nothing to flush, and newer releases' SIGTERM waits for every client),
/// waits for it and removes the directory (`$3`), which holds the server
/// superuser's password.
const WATCHER: &str = r#"
"$1" "$2" </dev/null >/dev/null 2>&1 &
child=$!
cat >/dev/null
kill -KILL "$child" 2>/dev/null
wait "$child" 2>/dev/null
rm -rf "$3"
"#;

/// A throwaway PgBouncer, stopped and its directory removed when dropped, or when the test
/// process dies: it runs under a watcher shell that holds a lifeline to this process.
///
/// It authenticates its clients (SCRAM, against a userlist holding the server's superuser and
/// its password) and logs in to the server with that password: nothing on the machine reaches
/// the database through it without the password (FND-15).
pub struct Bouncer {
    watcher: Child,
    lifeline: Option<ChildStdin>,
    dir: PathBuf,
    port: u16,
    password: String,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // Closing the lifeline stops PgBouncer and removes the directory; the watcher exits
        // once both are done.
        drop(self.lifeline.take());
        let _ = self.watcher.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bouncer {
    /// Starts PgBouncer in front of `server` with two aliases for `database`: `tx` in
    /// transaction pooling and `session` in session pooling. Panics, naming the package to
    /// install, when PgBouncer is missing.
    pub async fn start(server: &PgConnectOptions, database: &str) -> Bouncer {
        let binary = pgbouncer_binary();
        let port = crate::server::free_port().expect("a free port");
        // As root it runs as the unprivileged account the server runs as; its directory and
        // files (the password among them) belong to that account alone.
        let owner = nix::unistd::Uid::effective().is_root().then(|| {
            nix::unistd::User::from_name(crate::server::UNPRIVILEGED_USER)
                .ok()
                .flatten()
                .expect("running as root without a `postgres` account to run PgBouncer as")
        });
        let private = |path: &Path, mode: u32| {
            set_mode(path, mode);
            if let Some(user) = &owner {
                std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .unwrap();
            }
        };
        let dir =
            std::env::temp_dir().join(format!("keel-pgbouncer-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        private(&dir, 0o700);
        let url = server.to_url_lossy();
        let password = url
            .password()
            .expect("the throwaway server's options carry its password")
            .to_owned();
        let userlist = dir.join("userlist.txt");
        std::fs::write(&userlist, format!("\"postgres\" \"{password}\"\n")).unwrap();
        private(&userlist, 0o600);
        let backend = format!(
            "host=127.0.0.1 port={} dbname={database} user=postgres password={password}",
            server.get_port()
        );
        let config = format!(
            "[databases]\n\
             tx = {backend} pool_mode=transaction\n\
             session = {backend} pool_mode=session\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {userlist}\n\
             default_pool_size = 4\n\
             ignore_startup_parameters = extra_float_digits,search_path\n\
             logfile = {log}\n\
             pidfile = {pid}\n",
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
            userlist = userlist.display(),
        );
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, config).unwrap();
        private(&ini, 0o600);
        let mut command = Command::new("sh");
        command
            .args(["-c", WATCHER, "keel-pgbouncer"])
            .arg(&binary)
            .arg(&ini)
            .arg(&dir)
            // Its own process group: a Ctrl-C to the test's group leaves the watcher to clean
            // up once the lifeline closes.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(user) = &owner {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let mut watcher = command
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL} ({e})"));
        let lifeline = watcher.stdin.take();
        let bouncer = Bouncer {
            watcher,
            lifeline,
            dir,
            port,
            password,
        };
        bouncer.wait_until_ready().await;
        bouncer
    }

    /// The directory holding its configuration, its password file and its log: mode 0700, owned
    /// by the account it runs as, its files mode 0600.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password its clients log in with (the server superuser's), for tests that check it
    /// never reaches an output.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A `postgres://` URL reaching `database` through this PgBouncer by `alias` (see
    /// [`Bouncer::options`]). It carries the password: never log it.
    pub fn url(&self, alias: &str) -> String {
        use sqlx::ConnectOptions as _;
        self.options(alias).to_url_lossy().to_string()
    }

    /// Options reaching `database` through this PgBouncer as the server's superuser, by
    /// `alias`: `tx` (transaction pooling) or `session` (session pooling).
    pub fn options(&self, alias: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .password(&self.password)
            .database(alias)
    }

    async fn wait_until_ready(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
        panic!("PgBouncer did not start; its log:\n{log}");
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
