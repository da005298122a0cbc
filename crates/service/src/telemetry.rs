//! Tracing initialisation: levels from `RUST_LOG` (default `info`), text or JSON lines on stderr.
//!
//! Text lines are coloured only when stderr is a terminal and `NO_COLOR` is unset
//! ([`crate::cli::Stream::color_allowed`]). JSON lines carry the fields of the span they were
//! logged in (for example a request's `request_id`) under `span`.

use std::fmt::Write as _;

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
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false);
            Box::new(builder.event_format(JsonLines::new()).finish())
        }
    }
}

/// The JSON event format: the same line the stock JSON format (flattened fields, the current
/// span under `span`) writes, written straight into the line buffer.
///
/// The stock format serializes each event through an I/O adaptor that checks every fragment
/// (each key, colon and quote) as UTF-8 again; at tens of thousands of lines a second (an
/// orphan sweep writes one line per candidate) that was most of the cost of a line. An event
/// outside any span, and not bridged from the `log` crate, is written here; any other event is
/// handed to the stock format, so its line is the stock line exactly.
struct JsonLines {
    stock: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
}

impl JsonLines {
    /// The format, with the stock format configured as the subscriber's JSON builder is.
    fn new() -> Self {
        Self {
            stock: tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false),
        }
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let in_span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current())
            .is_some();
        if in_span || meta.fields().field("log.target").is_some() {
            return self.stock.format_event(ctx, writer, event);
        }
        // The line is built in a buffer of its own, with direct appends, and handed to the
        // subscriber's writer in one piece: one call through its `dyn Write` a line instead of
        // one for every key, colon and quote.
        let mut line = String::with_capacity(LINE_CAPACITY);
        let now = time::OffsetDateTime::now_utc();
        line.push_str("{\"timestamp\":\"");
        push_padded(&mut line, u32::try_from(now.year()).unwrap_or_default(), 4);
        line.push('-');
        push_padded(&mut line, u32::from(u8::from(now.month())), 2);
        line.push('-');
        push_padded(&mut line, u32::from(now.day()), 2);
        line.push('T');
        push_padded(&mut line, u32::from(now.hour()), 2);
        line.push(':');
        push_padded(&mut line, u32::from(now.minute()), 2);
        line.push(':');
        push_padded(&mut line, u32::from(now.second()), 2);
        line.push('.');
        push_padded(&mut line, now.microsecond(), 6);
        line.push_str("Z\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push('"');
        let mut fields = JsonFieldsWriter {
            out: &mut line,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        line.push_str(",\"target\":");
        json_str(&mut line, meta.target());
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// Room for a typical line, so building one rarely grows its buffer.
const LINE_CAPACITY: usize = 512;

/// Appends `value` in decimal, with leading zeros up to `width` digits (as `{:0width$}` does
/// for these non-negative values).
fn push_padded(out: &mut String, value: u32, width: usize) {
    push_decimal(out, false, u64::from(value), width);
}

/// Appends `-` if `negative`, then `magnitude` in decimal with leading zeros up to `width`
/// characters in all (as `{:0width$}` writes an integer).
fn push_decimal(out: &mut String, negative: bool, magnitude: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut rest = magnitude;
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b"0123456789"[usize::try_from(rest % 10).unwrap_or_default()];
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        out.push('-');
    }
    let len = digits.len() - start + usize::from(negative);
    for _ in len..width {
        out.push('0');
    }
    for &digit in &digits[start..] {
        out.push(char::from(digit));
    }
}

/// Writes each field of an event as `,"name":value`, values as the stock JSON format writes
/// them: booleans, integers and floats as JSON numbers and literals, everything else as the
/// string of its `Debug` form.
struct JsonFieldsWriter<'a> {
    out: &'a mut String,
    result: std::fmt::Result,
}

impl JsonFieldsWriter<'_> {
    /// Appends `,"name":` then the value `value` appends.
    fn entry(&mut self, field: &tracing::field::Field, value: impl FnOnce(&mut String)) {
        self.out.push(',');
        json_str(self.out, field.name());
        self.out.push(':');
        value(self.out);
    }
}

impl tracing::field::Visit for JsonFieldsWriter<'_> {
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.entry(field, |out| {
            out.push_str(if value { "true" } else { "false" })
        });
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.entry(field, |out| push_decimal(out, false, value, 0));
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.entry(field, |out| {
            push_decimal(out, value < 0, value.unsigned_abs(), 0)
        });
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        // As serde_json writes it (shortest round-trip form; `null` when not finite).
        match serde_json::to_string(&value) {
            Ok(text) => self.entry(field, |out| out.push_str(&text)),
            Err(_) => self.result = Err(std::fmt::Error),
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.entry(field, |out| json_str(out, value));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let mut result = Ok(());
        self.entry(field, |out| {
            out.push('"');
            result = write!(JsonEscaped(&mut *out), "{value:?}");
            out.push('"');
        });
        if result.is_err() {
            self.result = result;
        }
    }
}

/// Appends `text` as a JSON string.
fn json_str(out: &mut String, text: &str) {
    out.push('"');
    escape_into(out, text);
    out.push('"');
}

/// Appends `text` escaped as the inside of a JSON string (see [`JsonEscaped`]).
fn escape_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, byte) in text.bytes().enumerate() {
        let escape: &str = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[start..i]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
}

/// Escapes what it is given as the inside of a JSON string, as serde_json does: `"` and `\\`,
/// the short forms of backspace, form feed, newline, carriage return and tab, and `\u00XX`
/// (lower-case hex) for the other control characters; everything else as it is.
struct JsonEscaped<W>(W);

impl std::fmt::Write for JsonEscaped<&mut String> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        escape_into(self.0, text);
        Ok(())
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

    /// Every kind of event the binaries log, written once through the stock JSON format and
    /// once through the subscriber's: field values of every type, escapes, levels, targets,
    /// events in a span and with an explicit parent.
    fn battery() {
        let failure = crate::TestError("it \"failed\"\n");
        tracing::info!("plain message");
        tracing::info!(
            kind = "unowned",
            n = 5_u64,
            neg = -3_i64,
            ok = true,
            no = false,
            f = 1.5_f64,
            big = 1e21_f64,
            nan = f64::NAN,
            inf = f64::NEG_INFINITY,
            "quotes \" backslash \\ newline \n tab \t cr \r bell \u{7} nul \u{0} ff \u{c} bs \u{8} esc \u{1b} del \u{7f} é ü 日本 😀"
        );
        tracing::warn!(shown = %"display \"value\"", debug = ?vec!["a\nb"], "with sigils");
        tracing::error!(
            error = &failure as &(dyn std::error::Error + 'static),
            "an error value"
        );
        tracing::info!(
            wide = 1_u128 << 100,
            small = -(1_i128 << 90),
            "wide integers"
        );
        tracing::info!(only = 1_u64);
        tracing::info!(
            zero = 0_u64,
            max = u64::MAX,
            min = i64::MIN,
            minus_one = -1_i64,
            ten = 10_i64,
            "integer edges"
        );
        tracing::debug!(target: "custom::target", "a target of its own");
        tracing::trace!(empty = "", "trace level");
        let span = tracing::info_span!("request", request_id = "req-1", n = 2_u64);
        {
            let _entered = span.enter();
            tracing::info!(status = 201_u64, "in a span");
        }
        tracing::info!(parent: &span, "with an explicit parent");
        tracing::info!(parent: None, "with no parent");
    }

    /// The subscriber's JSON lines are the stock JSON format's lines, byte for byte but the
    /// timestamp's value (the two are written at different instants), which has the same form.
    #[test]
    fn json_lines_are_the_stock_json_lines() {
        let stock = Captured::default();
        let stock_subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("trace"))
            .with_writer(stock.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish();
        tracing::subscriber::with_default(stock_subscriber, battery);
        let ours = Captured::default();
        let our_subscriber = subscriber(
            LogFormat::Json,
            EnvFilter::new("trace"),
            false,
            ours.clone(),
        );
        tracing::subscriber::with_default(our_subscriber, battery);
        let text = |c: &Captured| String::from_utf8(c.0.lock().unwrap().clone()).unwrap();
        let (stock, ours) = (text(&stock), text(&ours));
        let without_time = |line: &str| -> (String, String) {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            let time = value["timestamp"].as_str().unwrap().to_owned();
            (line.replacen(&time, "T", 1), time)
        };
        let (stock_lines, our_lines): (Vec<&str>, Vec<&str>) =
            (stock.lines().collect(), ours.lines().collect());
        assert_eq!(stock_lines.len(), 12, "{stock}");
        assert_eq!(our_lines.len(), stock_lines.len(), "{ours}");
        assert!(stock.ends_with('\n') && ours.ends_with('\n'));
        for (stock_line, our_line) in stock_lines.iter().zip(&our_lines) {
            let (stock_rest, stock_time) = without_time(stock_line);
            let (our_rest, our_time) = without_time(our_line);
            assert_eq!(our_rest, stock_rest);
            let shape = |t: &str| {
                t.len() == 27
                    && t.bytes().enumerate().all(|(i, b)| match i {
                        4 | 7 => b == b'-',
                        10 => b == b'T',
                        13 | 16 => b == b':',
                        19 => b == b'.',
                        26 => b == b'Z',
                        _ => b.is_ascii_digit(),
                    })
            };
            assert!(
                shape(&stock_time) && shape(&our_time),
                "{stock_time} / {our_time}"
            );
            // And the same instant, give or take the run of the test: every part in its place.
            let parse = |t: &str| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|e| panic!("{t}: {e}"))
            };
            let apart = (parse(&our_time) - parse(&stock_time)).abs();
            assert!(
                apart < time::Duration::minutes(1),
                "{stock_time} / {our_time}"
            );
        }
    }
}
