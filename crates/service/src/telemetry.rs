//! Tracing initialisation: levels from `RUST_LOG` (default `info`), text or JSON lines on stderr.
//!
//! Text lines are coloured only when stderr is a terminal and `NO_COLOR` is unset
//! ([`crate::cli::Stream::color_allowed`]). JSON lines carry the fields of the span they were
//! logged in (for example a request's `request_id`) under `span`.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::{LogFormat, Stream};

/// Installs the global tracing subscriber. Fails if one is already installed.
pub fn init(format: LogFormat) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (filter, invalid) = filter_from(std::env::var("RUST_LOG").ok().as_deref());
    let subscriber = subscriber(
        format,
        filter,
        Stream::Stderr.color_allowed(),
        std::io::stderr,
    );
    tracing::subscriber::set_global_default(subscriber)?;
    if let Some(error) = invalid {
        tracing::warn!(%error, default = DEFAULT_FILTER, "RUST_LOG is not a valid filter; using the default");
    }
    Ok(())
}

/// The filter without `RUST_LOG`: INFO, with the server's routine notices (such as
/// "relation _sqlx_migrations already exists, skipping") only from WARN up.
pub const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// The filter from a `RUST_LOG` value, and why it was refused when it is invalid (FND-18: an
/// invalid value is reported, not silently replaced).
pub fn filter_from(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(value) => match EnvFilter::try_new(value) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some(e.to_string())),
        },
    }
}

/// The subscriber [`init`] installs, writing to `writer`, with ANSI colour only if `ansi`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn capture(format: LogFormat, ansi: bool) -> String {
        let out = Captured::default();
        let subscriber = subscriber(format, EnvFilter::new("info"), ansi, out.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "req-42", route = "/v1");
            let _entered = span.enter();
            tracing::info!(status = 201, "handled");
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// OPS-12: text logs carry no ANSI escapes when colour is not allowed.
    #[test]
    fn text_logs_are_plain_unless_colour_is_allowed() {
        let plain = capture(LogFormat::Text, false);
        assert!(plain.contains("handled"), "{plain}");
        assert!(!plain.contains('\x1b'), "{plain:?}");
        assert!(capture(LogFormat::Text, true).contains('\x1b'));
    }

    /// FND-18: an invalid RUST_LOG is reported with its parse error; the default keeps the
    /// server's routine notices below WARN out of the log.
    #[test]
    fn an_invalid_rust_log_is_reported_not_silently_replaced() {
        let (_, error) = filter_from(Some("keel=debbug"));
        assert!(error.is_some());
        let (_, error) = filter_from(Some("keel=debug,info"));
        assert_eq!(error, None);
        let (filter, error) = filter_from(None);
        assert_eq!(error, None);
        assert!(
            filter.to_string().contains("sqlx::postgres::notice=warn"),
            "{filter}"
        );
    }

    /// OPS-18: a JSON line carries the fields of its span, such as `request_id`.
    #[test]
    fn json_logs_carry_span_fields() {
        let line = capture(LogFormat::Json, true);
        let value: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(value["message"], "handled", "{line}");
        assert_eq!(value["status"], 201, "{line}");
        assert_eq!(value["span"]["request_id"], "req-42", "{line}");
        assert_eq!(value["span"]["name"], "request", "{line}");
        assert!(!line.contains('\x1b'), "{line:?}");
    }
}
