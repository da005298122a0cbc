//! The HTTP(S) adapter of the dispatcher's `Webhook` port: one POST per notification, over
//! rustls with the system's roots for `https://`, with a timeout. The URL is held in a type that
//! never prints it (it may carry a token in its query).

use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_audit::notify::{
    EVENT_ID_HEADER, SIGNATURE_HEADER, SignedNotification, TIMESTAMP_HEADER, Unreachable, Webhook,
    WebhookReply,
};

/// The webhook URL: parsed without ever echoing it (not in errors, not in `Debug`).
#[derive(Clone)]
pub struct WebhookUrl(String);

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookUrl(<redacted>)")
    }
}

/// Parses `--webhook-url` (`KEEL_AUDIT_WEBHOOK_URL`) at start-up, so a URL that could never be
/// posted to (not `https://` or `http://`, no host, `user:password@` credentials) is a usage
/// error before anything connects. Unlike a plain `fn` value parser, whose error clap prints as
/// `invalid value '<the URL>'`, its error names the flag and never the value (which may carry a
/// token, and arrives from the environment unredacted).
#[derive(Clone, Copy, Debug, Default)]
pub struct WebhookUrlParser;

impl clap::builder::TypedValueParser for WebhookUrlParser {
    type Value = WebhookUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<WebhookUrl, clap::Error> {
        let flag = arg
            .and_then(clap::Arg::get_long)
            .map_or_else(|| "--webhook-url".to_owned(), |long| format!("--{long}"));
        let refuse = |why: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{flag}': {why}"),
            )
            .with_cmd(cmd)
        };
        let Some(text) = value.to_str() else {
            return Err(refuse("the webhook URL is not UTF-8 (not shown)"));
        };
        let url = WebhookUrl(text.to_owned());
        if let Err(e) = url.uri() {
            return Err(refuse(&e.to_string()));
        }
        Ok(url)
    }
}

impl WebhookUrl {
    fn uri(&self) -> anyhow::Result<Uri> {
        let Ok(uri) = self.0.trim().parse::<Uri>() else {
            bail!("the webhook URL is not a valid absolute URL (not shown)");
        };
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => bail!("the webhook URL must start with https:// or http:// (not shown)"),
        }
        let Some(authority) = uri.authority() else {
            bail!("the webhook URL has no host (not shown)");
        };
        if authority.as_str().contains('@') {
            bail!(
                "the webhook URL must not carry user:password@ credentials; receivers verify \
                 the keel-signature header instead (the URL is not shown)"
            );
        }
        Ok(uri)
    }
}

/// Posts notifications to one URL.
pub struct HttpWebhook {
    uri: Uri,
    timeout: Duration,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpWebhook {
    /// A client for `url`; `https://` needs the system's root certificates.
    pub fn new(url: &WebhookUrl, timeout: Duration) -> anyhow::Result<Self> {
        let uri = url.uri()?;
        // The provider is named, not taken from crate features, so a build that also enables
        // another rustls provider cannot make the default ambiguous.
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = if uri.scheme_str() == Some("https") {
            match builder.with_provider_and_native_roots(provider) {
                Ok(builder) => builder.https_only(),
                Err(e) => bail!("could not load the system's root certificates: {e}"),
            }
        } else {
            // Plain HTTP (a receiver inside the cluster or a test): no roots needed.
            let Ok(config) = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
            else {
                bail!("the TLS provider offers no safe protocol version");
            };
            let config = config
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            builder.with_tls_config(config).https_or_http()
        };
        let connector = builder.enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            uri,
            timeout,
            client,
        })
    }
}

fn header_value(value: &str) -> HeaderValue {
    // Event ids, timestamps and hex signatures are ASCII.
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

impl Webhook for HttpWebhook {
    async fn post(&self, notification: &SignedNotification) -> WebhookReply {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "keel-audit-dispatch")
            .header(
                EVENT_ID_HEADER,
                header_value(&notification.event_id.to_string()),
            )
            .header(
                TIMESTAMP_HEADER,
                header_value(&notification.timestamp.to_string()),
            )
            .header(SIGNATURE_HEADER, header_value(&notification.signature))
            .body(Full::new(Bytes::from(notification.body.clone())));
        let Ok(request) = request else {
            return WebhookReply::Unreachable(Unreachable::Io);
        };
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => WebhookReply::Unreachable(Unreachable::Timeout),
            Ok(Err(e)) if e.is_connect() => WebhookReply::Unreachable(Unreachable::Connect),
            Ok(Err(_)) => WebhookReply::Unreachable(Unreachable::Io),
            Ok(Ok(response)) => reply_of(
                response.status().as_u16(),
                response.headers().get(header::RETRY_AFTER),
                std::time::SystemTime::now(),
            ),
        }
    }
}

/// The reply to keep for an answer with `status`: a throttle when it is 429 or 503 and carries
/// a `Retry-After` that parses (seconds, or an HTTP date, read against `now`; a date already
/// past is no wait).
fn reply_of(
    status: u16,
    retry_after: Option<&HeaderValue>,
    now: std::time::SystemTime,
) -> WebhookReply {
    let wait = match status {
        429 | 503 => retry_after.and_then(|v| v.to_str().ok()).and_then(|v| {
            let v = v.trim();
            match v.parse::<u64>() {
                Ok(seconds) => Some(Duration::from_secs(seconds)),
                Err(_) => httpdate::parse_http_date(v)
                    .ok()
                    .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO)),
            }
        }),
        _ => None,
    };
    match wait {
        Some(retry_after) => WebhookReply::Throttled {
            status,
            retry_after,
        },
        None => WebhookReply::Status(status),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::HeaderValue;
    use keel_audit::notify::WebhookReply;

    use super::reply_of;

    /// A receiver that asks for a wait (429 or 503 with `Retry-After`, in seconds or as an
    /// HTTP date) is a throttle with that wait; anything else keeps its plain status.
    #[test]
    fn retry_after_on_429_and_503_is_a_throttle_with_its_wait() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        let header = |v: &'static str| HeaderValue::from_static(v);
        let throttled = |status, secs| WebhookReply::Throttled {
            status,
            retry_after: Duration::from_secs(secs),
        };
        assert_eq!(
            reply_of(429, Some(&header("120")), now),
            throttled(429, 120)
        );
        assert_eq!(reply_of(503, Some(&header(" 7 ")), now), throttled(503, 7));
        assert_eq!(
            reply_of(429, Some(&header("Wed, 21 Oct 2015 07:30:00 GMT")), now),
            throttled(429, 120)
        );
        assert_eq!(
            reply_of(429, Some(&header("Wed, 21 Oct 2015 07:00:00 GMT")), now),
            throttled(429, 0),
            "a date already past is no wait"
        );
        assert_eq!(reply_of(429, None, now), WebhookReply::Status(429));
        assert_eq!(
            reply_of(429, Some(&header("soon")), now),
            WebhookReply::Status(429)
        );
        assert_eq!(
            reply_of(429, Some(&header("-5")), now),
            WebhookReply::Status(429)
        );
        assert_eq!(
            reply_of(500, Some(&header("120")), now),
            WebhookReply::Status(500),
            "only 429 and 503 ask for a wait"
        );
        assert_eq!(
            reply_of(204, None, SystemTime::now()),
            WebhookReply::Status(204)
        );
    }
}
