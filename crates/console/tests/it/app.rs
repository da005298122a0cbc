//! A live console on a fresh database, and a minimal HTTP/1.1 client with a cookie jar.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use keel_audit::Actor;
use keel_console::{Console, ConsoleConfig};
use keel_provision_http::keys::{self, Scope};
use keel_testkit::TestDatabase;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub struct App {
    pub db: TestDatabase,
    pub addr: SocketAddr,
    pub key: String,
    pub key_id: String,
    pub cookies: BTreeMap<String, String>,
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the first hidden `csrf` field on the page.
    pub fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field on the page: {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

/// A console over `pool` with `config`, serving on a free local port; returns its address.
pub async fn serve(pool: sqlx::PgPool, config: ConsoleConfig) -> SocketAddr {
    let console = Arc::new(Console::new(pool, config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, keel_console::router(console))
            .await
            .unwrap();
    });
    addr
}

pub async fn spawn_with(page_size: u32) -> App {
    let db = keel_testkit::database().await;
    let addr = serve(
        db.pool().clone(),
        ConsoleConfig {
            secure_cookies: false,
            page_size,
            ..ConsoleConfig::default()
        },
    )
    .await;
    let (info, key) = keys::create(
        db.pool(),
        Scope::Operator,
        "console tests",
        Actor::parse("operator:setup").unwrap(),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    App {
        db,
        addr,
        key: key.expose().to_owned(),
        key_id: info.id.to_string(),
        cookies: BTreeMap::new(),
    }
}

pub async fn spawn() -> App {
    spawn_with(50).await
}

impl App {
    pub fn actor(&self) -> String {
        format!("operator:key-{}", self.key_id)
    }

    async fn send(&mut self, method: &str, path: &str, form: Option<&[(&str, &str)]>) -> Reply {
        self.send_with(method, path, form, "").await
    }

    /// A request with `extra` header lines (each ending in CRLF) besides the jar's cookies.
    pub async fn send_with(
        &mut self,
        method: &str,
        path: &str,
        form: Option<&[(&str, &str)]>,
        extra: &str,
    ) -> Reply {
        let body = form
            .map(|pairs| {
                pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={}", keel_console::html::query_value(v)))
                    .collect::<Vec<_>>()
                    .join("&")
            })
            .unwrap_or_default();
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: console\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if form.is_some() {
            request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        if !cookie.is_empty() {
            request.push_str(&format!("Cookie: {cookie}\r\n"));
        }
        request.push_str(extra);
        request.push_str("\r\n");
        request.push_str(&body);
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines.next().unwrap()[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        };
        let reply = Reply {
            status,
            headers,
            body,
        };
        for set in reply.set_cookies() {
            let pair = set.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        reply
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send("GET", path, None).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Reply {
        self.send("POST", path, Some(form)).await
    }

    /// Signs in with the operator key through the sign-in form; returns the session's CSRF token.
    pub async fn sign_in(&mut self) -> String {
        let key = self.key.clone();
        let form = self.get("/sign-in").await;
        let csrf = form.csrf();
        let reply = self
            .post("/sign-in", &[("key", &key), ("csrf", &csrf)])
            .await;
        assert_eq!(reply.status, 303, "{}", reply.body);
        self.get("/").await.csrf()
    }

    pub async fn audit_rows(&self, kind: &str) -> Vec<(String, serde_json::Value)> {
        sqlx::query_as::<_, (String, sqlx::types::Json<serde_json::Value>)>(
            "SELECT actor, attributes FROM audit_events WHERE kind = $1 ORDER BY id",
        )
        .bind(kind)
        .fetch_all(self.db.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|(a, j)| (a, j.0))
        .collect()
    }

    /// A team on `pro` with an active resource and a dead-lettered tier elevation to `pro`;
    /// returns (resource id, token, propagation id).
    pub async fn dead_letter(&self, error: &str) -> (uuid::Uuid, String, i64) {
        let pool = self.db.pool();
        let team: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro') RETURNING id",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        let resource = uuid::Uuid::new_v4();
        let token = format!("tok{}", &resource.simple().to_string()[..20]);
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
             VALUES ($1, $2, $3, 'postgres', 'free', 'active', 'cust_x', $4)",
        )
        .bind(resource)
        .bind(&token)
        .bind(team)
        .bind(format!("postgres://u:{token}pw@db.internal/x"))
        .execute(pool)
        .await
        .unwrap();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO pending_propagations \
               (kind, team_id, resource_id, resource_type, payload, status, attempts, last_error, dead_lettered_at) \
             VALUES ('tier_elevation', $1, $2, 'postgres', '{\"target_tier\":\"pro\"}', 'dead_lettered', 5, $3, now() - interval '2 hours') \
             RETURNING id",
        )
        .bind(team)
        .bind(resource)
        .bind(error)
        .fetch_one(pool)
        .await
        .unwrap();
        (resource, token, id)
    }

    pub async fn status_of(&self, id: i64) -> String {
        sqlx::query_scalar("SELECT status FROM pending_propagations WHERE id = $1")
            .bind(id)
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = body.split_once("\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}
