//! `cargo xtask scrape`: starts every serving binary against a throwaway Postgres, checks that
//! `/readyz` turns 200, and lints each `/metrics` scrape with `promtool check metrics`.
//!
//! The scrape is taken as a plain client takes it (no `Accept` header: Prometheus text 0.0.4,
//! which is what promtool lints), and again as Prometheus asks (OpenMetrics). Each body is
//! written to `target/scrape/<binary>[-<variant>].prom` for inspection.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_testkit::PgServer;

/// One binary to start, with its arguments and environment.
struct Target {
    /// The file name under `target/debug`.
    binary: &'static str,
    /// A suffix for the scrape file when one binary runs twice.
    variant: &'static str,
    /// Arguments after the binary name; `{listen}` is replaced by the address, `{scrape}` by
    /// the scrape directory (where the run writes the files a binary reads, such as keys).
    args: &'static [&'static str],
    /// Extra environment.
    env: &'static [(&'static str, &'static str)],
}

const TARGETS: &[Target] = &[
    Target {
        binary: "keel-propagation-runner",
        variant: "",
        args: &["run", "--listen", "{listen}"],
        env: &[],
    },
    Target {
        binary: "keel-provision-api",
        variant: "",
        // /metrics and /readyz are served on the operations listener only.
        args: &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "{listen}",
        ],
        env: &[],
    },
    Target {
        binary: "keel-orphan-sweep",
        variant: "gates-off",
        args: &["--inventory", "postgres", "--listen", "{listen}"],
        env: &[],
    },
    Target {
        binary: "keel-orphan-sweep",
        variant: "audit-only",
        args: &[
            "--inventory",
            "postgres",
            "--run-on-start",
            "--listen",
            "{listen}",
        ],
        env: &[
            ("ORPHAN_DB_SWEEP_ENABLED", "1"),
            (
                "KEEL_ORPHAN_SWEEP_FINGERPRINT_KEY",
                "scrape-check-fingerprint-key",
            ),
        ],
    },
    Target {
        binary: "keel-console",
        variant: "",
        // /metrics and /readyz are served on the operations listener only.
        args: &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "{listen}",
        ],
        env: &[],
    },
    Target {
        binary: "keel-audit",
        variant: "dispatch",
        // Nothing is delivered on an empty trail: the receiver is never called.
        args: &[
            "dispatch",
            "--listen",
            "{listen}",
            "--webhook-url",
            "http://127.0.0.1:9/keel-scrape",
            "--signing-key-file",
            "{scrape}/notify-signing-key",
        ],
        env: &[],
    },
];

/// The dispatcher's signing key for the scrape run (at least 32 bytes; not a real secret).
const SCRAPE_NOTIFY_KEY: &str = "scrape-check-notification-signing-key-0123456789";

const PROMETHEUS_ACCEPT: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Runs the task.
pub fn run() -> anyhow::Result<()> {
    let promtool = which("promtool")
        .context("promtool is not installed: `apt-get install prometheus` (Debian) provides it")?;
    super::cargo(&[
        "build",
        "--locked",
        "-p",
        "keel-propagation-runner",
        "-p",
        "keel-provision-api",
        "-p",
        "keel-orphan-sweep-bin",
        "-p",
        "keel-console-bin",
        "-p",
        "keel-audit-bin",
        "--bins",
    ])?;
    let bin_dir = target_dir()?.join("debug");
    let out_dir = target_dir()?.join("scrape");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("notify-signing-key"), SCRAPE_NOTIFY_KEY)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let server = PgServer::start_throwaway().context("could not start a throwaway Postgres")?;
    runtime.block_on(async {
        server.create_database("keel_scrape", None).await?;
        let pool = sqlx::PgPool::connect_with(server.options_for("keel_scrape")).await?;
        keel_schema::migrate(&pool).await?;
        pool.close().await;
        anyhow::Ok(())
    })?;
    let url = server.url_for("keel_scrape");

    let mut failures = Vec::new();
    for target in TARGETS {
        let name = if target.variant.is_empty() {
            target.binary.to_owned()
        } else {
            format!("{}-{}", target.binary, target.variant)
        };
        match check(target, &bin_dir, &url, &out_dir, &name, &promtool) {
            Ok(families) => {
                println!("ok   {name}: /readyz 200, promtool clean, {families} families")
            }
            Err(e) => {
                println!("FAIL {name}: {e:#}");
                failures.push(name);
            }
        }
    }
    if !failures.is_empty() {
        bail!("scrape check failed for {}", failures.join(", "));
    }
    Ok(())
}

fn check(
    target: &Target,
    bin_dir: &Path,
    url: &str,
    out_dir: &Path,
    name: &str,
    promtool: &Path,
) -> anyhow::Result<usize> {
    let listen = free_address()?;
    let args: Vec<String> = target
        .args
        .iter()
        .map(|a| {
            a.replace("{listen}", &listen.to_string())
                .replace("{scrape}", &out_dir.display().to_string())
        })
        .collect();
    let child = Command::new(bin_dir.join(target.binary))
        .args(&args)
        .env("DATABASE_URL", url)
        .env("KEEL_LOG_FORMAT", "json")
        .envs(target.env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {}", target.binary))?;
    let mut child = Running(child);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.0.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.0.stderr.take() {
                pipe.read_to_string(&mut stderr)?;
            }
            bail!("exited early ({status}):\n{stderr}");
        }
        if let Ok((200, _, _)) = get(listen, "/readyz", None) {
            break;
        }
        if Instant::now() > deadline {
            bail!("/readyz did not turn 200 within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let (status, content_type, text) = get(listen, "/metrics", None)?;
    if status != 200 || !content_type.starts_with("text/plain; version=0.0.4") {
        bail!("/metrics answered {status} {content_type}");
    }
    std::fs::write(out_dir.join(format!("{name}.prom")), &text)?;
    for family in [
        "keel_build_info",
        "keel_ready 1",
        "process_start_time_seconds",
    ] {
        if !text.lines().any(|l| l.starts_with(family)) {
            bail!("/metrics has no {family}");
        }
    }
    let mut lint = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    lint.stdin
        .take()
        .context("no stdin for promtool")?
        .write_all(text.as_bytes())?;
    let lint = lint.wait_with_output()?;
    if !lint.status.success() {
        bail!(
            "promtool check metrics failed ({}):\n{}{}",
            lint.status,
            String::from_utf8_lossy(&lint.stdout),
            String::from_utf8_lossy(&lint.stderr)
        );
    }

    let (status, content_type, openmetrics) = get(listen, "/metrics", Some(PROMETHEUS_ACCEPT))?;
    if status != 200
        || !content_type.starts_with("application/openmetrics-text")
        || !openmetrics.trim_end().ends_with("# EOF")
    {
        bail!("/metrics did not answer OpenMetrics to Prometheus's Accept header");
    }
    std::fs::write(out_dir.join(format!("{name}.openmetrics")), &openmetrics)?;
    Ok(text.lines().filter(|l| l.starts_with("# TYPE ")).count())
}

/// Stops the child with SIGTERM-like `kill` on drop, so a failed check leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A minimal HTTP/1.1 GET: status, content type and body.
fn get(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: keel\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let content_type = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        })
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Ok((status, content_type, body.to_owned()))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/`).
fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => super::workspace_root().join("target"),
    })
}
