//! API conformance against a live `keel-provision-api`: on a throwaway Postgres, with a team
//! key, it serves the built binary, validates `/openapi.json` with openapi-spec-validator, and
//! runs schemathesis against it (no 5xx; every status, content type, header and body as the
//! document says; a request without the key refused).
//!
//! `cargo build -p keel-provision-api --bins --examples` first, then
//! `target/debug/examples/conformance <python venv with schemathesis and openapi-spec-validator>`
//! (what `.ci/run api` does). `KEEL_CONFORMANCE_EXAMPLES` sets schemathesis' examples per
//! operation (default 30).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use anyhow::{Context as _, bail};
use keel_audit::{Actor, TeamId};
use keel_provision_http::keys::{self, Scope};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The server, stopped when dropped (a failed check leaves nothing running).
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `GET path` on `addr`: the status and the body.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP answer")?;
    let status = head.get(9..12).context("no status")?.parse()?;
    Ok((status, body.to_owned()))
}

/// Runs `program` in `dir` (where schemathesis keeps its cache).
fn run(program: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    // The test key is a credential like any other: the echoed command line never shows it.
    let shown: Vec<&str> = args
        .iter()
        .map(|arg| {
            if arg.starts_with("Authorization:") {
                "Authorization: Bearer <test key>"
            } else {
                arg
            }
        })
        .collect();
    println!("--- {} {}", program.display(), shown.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("could not run {}", program.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", program.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let venv = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: conformance <venv with schemathesis and openapi-spec-validator>")?,
    );
    // The tools run in another working directory (where schemathesis keeps its cache), so a
    // relative venv path (`target/ci-venv`, CI's default) must be made absolute first.
    let venv = std::fs::canonicalize(&venv)
        .with_context(|| format!("no virtualenv at {}", venv.display()))?;
    let examples = std::env::var("KEEL_CONFORMANCE_EXAMPLES").unwrap_or_else(|_| "30".into());
    let here = std::env::current_exe()?;
    let debug = here
        .parent()
        .and_then(Path::parent)
        .context("the example runs from target/<profile>/examples")?;
    let binary = debug.join("keel-provision-api");
    let out = debug.join("conformance");
    std::fs::create_dir_all(&out)?;

    let db = keel_testkit::database().await;
    let team = TeamId::from_uuid(db.team("pro").await);
    let (_, key) = keys::create(
        db.pool(),
        Scope::Team(team),
        "conformance",
        Actor::parse("operator:ci")?,
        time::OffsetDateTime::now_utc(),
    )
    .await?;
    let (api, ops) = (free_address()?, free_address()?);
    let served = Served(
        Command::new(&binary)
            .args(["serve", "--database-url", &db.url()])
            .args([
                "--listen",
                &api.to_string(),
                "--ops-listen",
                &ops.to_string(),
            ])
            .args(["--rate-limit-per-minute", "1000000", "--sslmode", "disable"])
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("could not start {}", binary.display()))?,
    );
    let mut ready = false;
    for _ in 0..100 {
        if let Ok((200, _)) = get(ops, "/readyz").await {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        bail!("keel-provision-api did not become ready on {ops}");
    }
    let (status, document) = get(api, "/openapi.json").await?;
    if status != 200 {
        bail!("/openapi.json answered {status}");
    }
    let document_path = out.join("openapi.json");
    std::fs::write(&document_path, &document)?;
    run(
        &venv.join("bin/openapi-spec-validator"),
        &out,
        &[document_path.to_str().context("a UTF-8 path")?],
    )?;
    let authorization = format!("Authorization: Bearer {}", key.expose());
    let schema = format!("http://{api}/openapi.json");
    let report = out.join("schemathesis.xml");
    run(
        &venv.join("bin/schemathesis"),
        &out,
        &[
            "run",
            &schema,
            "--header",
            &authorization,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,ignored_auth",
            "--max-examples",
            &examples,
            "--generation-deterministic",
            "--report",
            "junit",
            "--report-junit-path",
            report.to_str().context("a UTF-8 path")?,
        ],
    )?;
    drop(served);
    println!("conformance: /openapi.json is valid OpenAPI; schemathesis found no failure");
    Ok(ExitCode::SUCCESS)
}
