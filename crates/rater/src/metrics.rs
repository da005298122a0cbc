//! The rater's metrics, read from the `rater_runs` ledger and pushed to a Prometheus
//! Pushgateway-compatible URL at the end of each run (job `keel-rater`).
//!
//! The ledger is the source, so the counters survive process restarts (every run is a new
//! process) and SQL sees the same facts:
//!
//! - `instant_rater_last_success_timestamp_seconds`: end of the last run that exited 0
//! - `instant_rater_last_run_timestamp_seconds`: end of the last run
//! - `instant_rater_last_exit_code`: that run's exit code (0, 1, 2 or 3)
//! - `instant_rater_runs_total{outcome}`: runs by outcome (clean, error, attention, skipped_locked)
//! - `instant_rater_rated_rows_total`: rated rows written (inserted, updated, lowered)
//! - `instant_rater_late_events_total`: late events found
//!
//! Alert "rater failed" on `instant_rater_last_exit_code > 0`, and "rater not run" on
//! `time() - instant_rater_last_success_timestamp_seconds` beyond the schedule plus slack.

use std::fmt::Write as _;

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::RaterExit;

/// The metrics in the Prometheus text exposition format, from the ledger.
pub async fn render(pool: &PgPool) -> Result<String, sqlx::Error> {
    let (last_success, last_run, last_exit): (Option<f64>, Option<f64>, Option<i16>) =
        sqlx::query_as(
            // Runs that finished by the database's clock: a row another writer dated in the
            // future would otherwise stand as the last run and the last success for as long
            // as that date, silencing every alert on the runs after it.
            "SELECT (SELECT extract(epoch FROM max(finished_at))::float8 FROM rater_runs \
                     WHERE exit_code = 0 AND NOT dry_run AND finished_at <= now()), \
                    (SELECT extract(epoch FROM max(finished_at))::float8 FROM rater_runs \
                     WHERE exit_code IS NOT NULL AND finished_at <= now()), \
                    (SELECT exit_code FROM rater_runs \
                     WHERE exit_code IS NOT NULL AND finished_at <= now() \
                     ORDER BY finished_at DESC, id DESC LIMIT 1)",
        )
        .fetch_one(pool)
        .await?;
    let by_code: Vec<(i16, i64)> = sqlx::query_as(
        "SELECT exit_code, count(*) FROM rater_runs WHERE exit_code IS NOT NULL GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    let (rated, late): (i64, i64) = sqlx::query_as(
        // Summed as numeric and capped: counts another writer set near the column's limit
        // must not overflow the sum and stop every push.
        "SELECT least(coalesce(sum(inserted::numeric + updated + lowered), 0), \
                      9223372036854775807)::bigint, \
                least(coalesce(sum(late_events::numeric), 0), 9223372036854775807)::bigint \
         FROM rater_runs",
    )
    .fetch_one(pool)
    .await?;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: Option<f64>| {
        if let Some(value) = value {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
    };
    gauge(
        "instant_rater_last_success_timestamp_seconds",
        "Unix time the last rater run that exited 0 finished.",
        last_success,
    );
    gauge(
        "instant_rater_last_run_timestamp_seconds",
        "Unix time the last rater run finished.",
        last_run,
    );
    gauge(
        "instant_rater_last_exit_code",
        "Exit code of the last rater run (0 clean, 1 error, 2 attention, 3 skipped).",
        last_exit.map(f64::from),
    );
    let _ = writeln!(
        out,
        "# HELP instant_rater_runs_total Rater runs by outcome.\n# TYPE instant_rater_runs_total counter"
    );
    for exit in [
        RaterExit::Clean,
        RaterExit::Error,
        RaterExit::Attention,
        RaterExit::Locked,
    ] {
        let outcome = match exit {
            RaterExit::Clean => "clean",
            RaterExit::Error => "error",
            RaterExit::Attention => "attention",
            RaterExit::Locked => "skipped_locked",
        };
        let n = by_code
            .iter()
            .find(|(code, _)| *code == i16::from(exit.code()))
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "instant_rater_runs_total{{outcome=\"{outcome}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP instant_rater_rated_rows_total Rated rows written (inserted, updated, lowered).\n\
         # TYPE instant_rater_rated_rows_total counter\ninstant_rater_rated_rows_total {rated}\n\
         # HELP instant_rater_late_events_total Late events found outside the routine window.\n\
         # TYPE instant_rater_late_events_total counter\ninstant_rater_late_events_total {late}"
    );
    Ok(out)
}

/// Why a push failed. Never shows the URL (it may hold credentials).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// Not an `http://host[:port][/path]` URL.
    #[error("the push-metrics URL is not http://host[:port][/path] (its value is not shown)")]
    BadUrl,
    /// The gateway could not be reached or the exchange failed.
    #[error("could not push metrics: {0}")]
    Io(#[from] std::io::Error),
    /// The gateway answered with a non-2xx status.
    #[error("the metrics gateway answered {0}")]
    Status(String),
    /// The exchange (connecting, sending, the answer's status line) did not finish in time.
    #[error("the metrics gateway did not answer within {0:?}")]
    TimedOut(std::time::Duration),
}

/// Where the run's metrics are pushed: an `http://host[:port][/path]` URL, checked when it is
/// configured, so a wrong one is a usage error at start, not an ERROR after every run. Its
/// `Debug` form never shows the URL (it may hold credentials).
#[derive(Clone)]
pub struct PushUrl {
    /// `host:port`.
    address: String,
    /// `host[:port]` as given, for the `Host` header.
    authority: String,
    /// The path before `/metrics/job/keel-rater`, without a trailing `/`.
    path: String,
}

impl std::fmt::Debug for PushUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushUrl(<not shown>)")
    }
}

impl PushUrl {
    /// Parses `http://host[:port][/path]` (an IPv6 host in brackets, a port of 1 to 65535);
    /// refuses any other scheme, user information, a query or fragment, and whitespace.
    pub fn parse(url: &str) -> Result<Self, PushError> {
        let rest = url.strip_prefix("http://").ok_or(PushError::BadUrl)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.contains(['@', '?', '#'])
            || path.contains(['?', '#'])
            || url.contains(char::is_whitespace)
        {
            return Err(PushError::BadUrl);
        }
        // The host ends at a bracketed IPv6 address's `]`, or at the first `:`.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (inside, after) = v6.split_once(']').ok_or(PushError::BadUrl)?;
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':').ok_or(PushError::BadUrl)?),
                };
                (inside, port)
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => 80,
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or(PushError::BadUrl)?,
            Some(_) => return Err(PushError::BadUrl),
        };
        if host.is_empty() || host.contains(['[', ']']) {
            return Err(PushError::BadUrl);
        }
        let address = if authority.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            address,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// PUTs `body` to `<url>/metrics/job/keel-rater` (Pushgateway protocol, plain HTTP/1.1), giving
/// up after `deadline`: a gateway that takes the connection and never answers (or an address
/// nothing answers on) must not hold the run's exit, and its exit code, back.
pub async fn push(
    url: &PushUrl,
    body: &str,
    deadline: std::time::Duration,
) -> Result<(), PushError> {
    tokio::time::timeout(deadline, exchange(url, body))
        .await
        .unwrap_or(Err(PushError::TimedOut(deadline)))
}

async fn exchange(url: &PushUrl, body: &str) -> Result<(), PushError> {
    let PushUrl {
        address,
        authority,
        path,
    } = url;
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!(
        "PUT {path}/metrics/job/keel-rater HTTP/1.1\r\nHost: {authority}\r\n\
         Content-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while response.len() < 4096 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let status_line = String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(80)
        .collect::<String>();
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ => Err(PushError::Status(status_line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a URL a push could reach is taken; the others are refused when configured, and no
    /// form of it shows the URL.
    #[test]
    fn a_push_url_is_taken_only_when_a_push_could_reach_it() {
        for (url, address, path) in [
            ("http://gateway:9091", "gateway:9091", ""),
            ("http://gateway", "gateway:80", ""),
            ("http://10.0.0.7:9091/prefix/", "10.0.0.7:9091", "/prefix"),
            ("http://[::1]", "[::1]:80", ""),
            ("http://[fe80::1]:9091/p", "[fe80::1]:9091", "/p"),
        ] {
            let parsed = PushUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(
                (parsed.address.as_str(), parsed.path.as_str()),
                (address, path)
            );
            assert_eq!(format!("{parsed:?}"), "PushUrl(<not shown>)");
        }
        for url in [
            "ftp://gateway:9091",
            "gateway:9091",
            "http://",
            "http://:9091",
            "http://gw:",
            "http://gw:abc",
            "http://gw:0",
            "http://gw:99999",
            "http://user:pw@gw:9091",
            "http://gw:9091?job=x",
            "http://gw:9091/p#frag",
            "http://gate way:9091",
            "http://[::1",
            "http://[::1]9091",
            "http://fe80::1",
        ] {
            assert!(
                matches!(PushUrl::parse(url), Err(PushError::BadUrl)),
                "{url} was taken"
            );
        }
    }
}
