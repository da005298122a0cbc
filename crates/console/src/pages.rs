//! The pages (GET): each reads the platform database and renders HTML.
// Each query reads its row as a tuple next to the SQL that names the columns.
#![allow(clippy::type_complexity)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use keel_audit::list::{ListQuery, format_cursor, parse_cursor};
use keel_audit::postgres::CommitCursor;
use keel_audit::{AlertSeverity, AuditKind, Consumer, ResourceId, TeamId};
use keel_propagation::postgres::PgPropagationStore;
use keel_propagation::{PropagationKind, ReasonBucket};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::html::{self, escape, query_value};
use crate::session::{self, SIGN_IN_COOKIE, Session};
use crate::{Console, ConsoleError};

/// An HTML response.
pub(crate) fn html_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// The page of a failed request: names the operation that failed, never a secret. A database
/// that cannot be reached answers 503 with `Retry-After` (the same request works once it is
/// back); any other failure 500.
pub(crate) fn failure(error: &ConsoleError) -> Response {
    if error.is_unavailable() {
        tracing::warn!(error = %error, "a console request found the database unavailable");
        let mut response = html_response(
            StatusCode::SERVICE_UNAVAILABLE,
            html::page(
                "Database unavailable",
                "",
                None,
                &format!(
                    "<p class=\"error\">{}: the database cannot be reached. Try again shortly; \
                     the console's <code>/readyz</code> on its operations listener says when the \
                     database is back. An action submitted now may or may not have been \
                     recorded: look for it in the audit trail then.</p>",
                    escape(&error.to_string())
                ),
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return response;
    }
    tracing::error!(error = %error, "a console request failed");
    html_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        html::page(
            "Something failed",
            "",
            None,
            &format!(
                "<p class=\"error\">{}. Try again; if it persists, check the console's log and \
                 the database.</p>",
                escape(&error.to_string())
            ),
        ),
    )
}

/// A 400 page for bad input on a signed-in page.
fn bad_request(session: &Session, current: &str, message: &str) -> Response {
    html_response(
        StatusCode::BAD_REQUEST,
        html::page(
            "Bad request",
            current,
            Some(session.csrf()),
            &format!(
                "<p class=\"error\">{}</p><p><a href=\"{current}\">Back</a></p>",
                escape(message)
            ),
        ),
    )
}

/// The session of a page request, or the redirect to the sign-in page.
pub(crate) async fn page_session(
    console: &Console,
    headers: &HeaderMap,
) -> Result<Session, Response> {
    match current_session(console, headers).await {
        Ok(Some(session)) => Ok(session),
        Ok(None) => Err(Redirect::to("/sign-in").into_response()),
        Err(e) => Err(failure(&e)),
    }
}

/// The session named by the request's cookie, if it is live.
pub(crate) async fn current_session(
    console: &Console,
    headers: &HeaderMap,
) -> Result<Option<Session>, ConsoleError> {
    let Some(value) = session::cookie(headers, session::SESSION_COOKIE) else {
        return Ok(None);
    };
    session::lookup(&console.pool, value).await
}

pub(crate) async fn db_now(console: &Console) -> Result<OffsetDateTime, ConsoleError> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&console.pool)
        .await
        .map_err(crate::actions::db("read the database clock"))
}

/// The sign-in form, with a fresh CSRF token in a cookie and in the form (double submit).
pub(crate) async fn sign_in_form(State(console): State<Arc<Console>>) -> Response {
    sign_in_page(&console, StatusCode::OK, None)
}

pub(crate) fn sign_in_page(console: &Console, status: StatusCode, error: Option<&str>) -> Response {
    let token = session::random_token();
    let mut body = String::new();
    if let Some(error) = error {
        let _ = write!(body, "<p class=\"error\">{}</p>", escape(error));
    }
    let _ = write!(
        body,
        "<p>Sign in with an operator API key (<code>keel-provision-api keys create --operator</code>). \
         The key is checked and forgotten; the console keeps a session.</p>\
         <form method=\"post\" action=\"/sign-in\">{}\
         <label>Operator key <input type=\"password\" name=\"key\" autocomplete=\"off\" size=\"70\" required></label> \
         <button type=\"submit\">Sign in</button></form>",
        html::csrf_field(&token)
    );
    let mut response = html_response(status, html::page("Sign in", "", None, &body));
    let cookie = session::set_cookie(
        SIGN_IN_COOKIE,
        &token,
        Some(600),
        console.config.secure_cookies,
    );
    if let Ok(value) = header::HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

fn consumer_text(kind: AuditKind) -> String {
    match kind.consumer() {
        Consumer::CustomerNotification { template } => {
            format!("customer notification ({template})")
        }
        Consumer::OperatorAlert { alert, severity } => {
            let severity = match severity {
                AlertSeverity::Page => "page",
                AlertSeverity::Ticket => "ticket",
            };
            format!("operator alert {alert} ({severity})")
        }
        Consumer::PropagationWiring { propagation_kind } => {
            format!("propagation ({propagation_kind})")
        }
        Consumer::IntentionallyNone { .. } => "none: the trail is the record".to_owned(),
    }
}

fn page_kinds() -> Vec<&'static str> {
    AuditKind::ALL
        .iter()
        .filter(|k| {
            matches!(
                k.consumer(),
                Consumer::OperatorAlert {
                    severity: AlertSeverity::Page,
                    ..
                }
            )
        })
        .map(|k| k.as_str())
        .collect()
}

/// The overview: queue depth, dead letters by kind and bucket, orphan backlog, last rater runs,
/// recent Page-severity audit rows.
pub(crate) async fn overview(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let session = match page_session(&console, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match render_overview(&console, &session).await {
        Ok(body) => html_response(
            StatusCode::OK,
            html::page("Overview", "/", Some(session.csrf()), &body),
        ),
        Err(e) => failure(&e),
    }
}

async fn render_overview(console: &Console, _session: &Session) -> Result<String, ConsoleError> {
    let db = crate::actions::db;
    let now = db_now(console).await?;
    let mut body = String::new();
    let stats = PgPropagationStore::new(console.pool.clone())
        .queue_stats(now)
        .await
        .map_err(|e| ConsoleError::Store {
            operation: "read the propagation queue",
            source: Box::new(e),
        })?;
    body.push_str("<h2>Propagation queue (due, unclaimed)</h2><table><tr><th>kind</th><th>due</th><th>oldest due age</th></tr>");
    for stat in stats {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            stat.kind.as_str(),
            stat.due,
            html::age(stat.oldest_due_age_seconds)
        );
    }
    body.push_str("</table>");

    let groups: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT kind, last_error, count(*) FROM pending_propagations \
         WHERE status = 'dead_lettered' GROUP BY kind, last_error",
    )
    .fetch_all(&console.pool)
    .await
    .map_err(db("count dead letters"))?;
    let mut by_bucket: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
    for (kind, error, n) in groups {
        let bucket = ReasonBucket::classify(error.as_deref().unwrap_or("")).as_str();
        *by_bucket.entry((kind, bucket)).or_default() += n;
    }
    body.push_str("<h2>Dead letters by kind and bucket</h2>");
    if by_bucket.is_empty() {
        body.push_str("<p class=\"muted\">No dead letters.</p>");
    } else {
        body.push_str("<table><tr><th>kind</th><th>bucket</th><th>dead letters</th></tr>");
        for ((kind, bucket), n) in &by_bucket {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{bucket}</td><td><a href=\"/dead-letters?kind={}&amp;bucket={bucket}\">{n}</a></td></tr>",
                escape(kind),
                query_value(kind)
            );
        }
        body.push_str("</table>");
    }

    let orphans: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT inventory, split_part(key, ':', 1), count(*), \
                count(*) FILTER (WHERE reclaimable_since IS NOT NULL), \
                count(*) FILTER (WHERE quarantined IS NOT NULL) \
         FROM orphan_sightings GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&console.pool)
    .await
    .map_err(db("count orphan candidates"))?;
    body.push_str("<h2>Orphan backlog</h2>");
    if orphans.is_empty() {
        body.push_str("<p class=\"muted\">No orphan candidates recorded by the sweep.</p>");
    } else {
        body.push_str("<table><tr><th>inventory</th><th>kind</th><th>candidates</th><th>reclaimable</th><th>quarantined</th></tr>");
        for (inventory, kind, n, reclaimable, quarantined) in orphans {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td><a href=\"/orphans\">{n}</a></td><td>{reclaimable}</td><td>{quarantined}</td></tr>",
                escape(&inventory),
                escape(&kind)
            );
        }
        body.push_str("</table>");
    }

    let runs = rater_rows(console, 5).await?;
    body.push_str("<h2>Last rater runs</h2>");
    render_runs(&mut body, &runs);

    // Ordered by `recorded_at` alone, so the scan walks its index backwards and stops at the
    // 20th match instead of sorting a week of rows.
    let rows: Vec<(
        i64,
        String,
        String,
        Option<Uuid>,
        Option<Uuid>,
        OffsetDateTime,
    )> = sqlx::query_as(
        "SELECT id, kind, actor, team_id, resource_id, recorded_at FROM audit_events \
             WHERE kind = ANY($1) AND recorded_at > $2 ORDER BY recorded_at DESC LIMIT 20",
    )
    .bind(page_kinds())
    .bind(now - time::Duration::days(7))
    .fetch_all(&console.pool)
    .await
    .map_err(db("read recent paging audit rows"))?;
    body.push_str("<h2>Page-severity audit rows (last 7 days)</h2>");
    if rows.is_empty() {
        body.push_str("<p class=\"muted\">None.</p>");
    } else {
        body.push_str("<table><tr><th>recorded</th><th>kind</th><th>actor</th><th>team</th><th>resource</th></tr>");
        for (_, kind, actor, team, resource, at) in rows {
            let _ = write!(
                body,
                "<tr><td>{}</td><td class=\"page\"><a href=\"/audit?kind={}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html::time(at),
                query_value(&kind),
                escape(&kind),
                escape(&actor),
                team.map(|t| t.to_string()).unwrap_or_default(),
                resource_link(resource)
            );
        }
        body.push_str("</table>");
    }
    Ok(body)
}

fn resource_link(resource: Option<Uuid>) -> String {
    resource.map_or_else(String::new, |r| {
        format!("<a href=\"/resources/{r}\"><code>{r}</code></a>")
    })
}

/// The filters of the dead-letter page (and of a filtered requeue).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct DeadLetterFilter {
    pub(crate) kind: Option<PropagationKind>,
    pub(crate) bucket: Option<ReasonBucket>,
    pub(crate) older_than_hours: Option<u32>,
}

impl DeadLetterFilter {
    pub(crate) fn parse(params: &HashMap<String, String>) -> Result<Self, String> {
        let value = |name: &str| params.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let kind = value("kind")
            .map(|k| {
                k.parse::<PropagationKind>().map_err(|_| {
                    let known: Vec<&str> =
                        PropagationKind::ALL.iter().map(|k| k.as_str()).collect();
                    format!(
                        "unknown kind {:?}: expected one of {}",
                        k.chars().take(40).collect::<String>(),
                        known.join(", ")
                    )
                })
            })
            .transpose()?;
        let bucket = value("bucket")
            .map(|b| {
                ReasonBucket::ALL
                    .iter()
                    .copied()
                    .find(|x| x.as_str() == b)
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            ReasonBucket::ALL.iter().map(|k| k.as_str()).collect();
                        format!("unknown bucket: expected one of {}", known.join(", "))
                    })
            })
            .transpose()?;
        let older_than_hours = value("older_than_hours")
            .map(|h| {
                h.parse::<u32>()
                    .map_err(|_| "older_than_hours is a whole number of hours".to_owned())
            })
            .transpose()?;
        Ok(Self {
            kind,
            bucket,
            older_than_hours,
        })
    }

    fn hidden_fields(&self) -> String {
        let mut out = String::new();
        if let Some(kind) = self.kind {
            let _ = write!(
                out,
                "<input type=\"hidden\" name=\"kind\" value=\"{}\">",
                kind.as_str()
            );
        }
        if let Some(bucket) = self.bucket {
            let _ = write!(
                out,
                "<input type=\"hidden\" name=\"bucket\" value=\"{}\">",
                bucket.as_str()
            );
        }
        if let Some(hours) = self.older_than_hours {
            let _ = write!(
                out,
                "<input type=\"hidden\" name=\"older_than_hours\" value=\"{hours}\">"
            );
        }
        out
    }
}

/// A dead letter as the console shows it.
#[derive(sqlx::FromRow)]
pub(crate) struct DeadLetterRow {
    pub(crate) id: i64,
    kind: String,
    team_id: Uuid,
    resource_id: Uuid,
    resource_type: String,
    attempts: i32,
    last_error: Option<String>,
    dead_lettered_at: Option<OffsetDateTime>,
    age_seconds: f64,
}

/// How many matching dead letters one filtered page or requeue takes at most (newest first).
pub(crate) const DEAD_LETTER_SCAN: i64 = 1000;
/// How many dead letters one filtered page or requeue reads at most to find them, in pages of
/// [`DEAD_LETTER_SCAN`]: rows of other buckets (or left dead-lettered by an earlier requeue)
/// never hide the older rows that match.
const DEAD_LETTER_READ: i64 = 50 * DEAD_LETTER_SCAN;

/// Dead letters matching `filter`, newest first, at most [`DEAD_LETTER_SCAN`] of them: the kind
/// and age in SQL (indexed), the bucket classified here, as the runner classifies it, page by
/// page (keyset on `(dead_lettered_at, id)`) over at most [`DEAD_LETTER_READ`] rows. Also how
/// many rows were read.
pub(crate) async fn matching_dead_letters(
    console: &Console,
    filter: &DeadLetterFilter,
) -> Result<(Vec<DeadLetterRow>, i64), ConsoleError> {
    let mut matching = Vec::new();
    let mut read: i64 = 0;
    let mut after: Option<(OffsetDateTime, i64)> = None;
    while read < DEAD_LETTER_READ {
        let page: Vec<DeadLetterRow> = sqlx::query_as(
            "SELECT id, kind, team_id, resource_id, resource_type, attempts, last_error, \
                    dead_lettered_at, \
                    coalesce(extract(epoch FROM now() - dead_lettered_at), 0)::float8 \
                      AS age_seconds \
             FROM pending_propagations \
             WHERE status = 'dead_lettered' AND ($1::text IS NULL OR kind = $1) \
               AND ($2::int IS NULL OR dead_lettered_at <= now() - make_interval(hours => $2)) \
               AND ($4::timestamptz IS NULL OR (dead_lettered_at, id) < ($4, $5)) \
             ORDER BY dead_lettered_at DESC, id DESC LIMIT $3",
        )
        .bind(filter.kind.map(PropagationKind::as_str))
        .bind(
            filter
                .older_than_hours
                .map(|h| i32::try_from(h).unwrap_or(i32::MAX)),
        )
        .bind(DEAD_LETTER_SCAN)
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, id)| id))
        .fetch_all(&console.pool)
        .await
        .map_err(crate::actions::db("list dead letters"))?;
        let full = i64::try_from(page.len()).unwrap_or(i64::MAX) == DEAD_LETTER_SCAN;
        read = read.saturating_add(i64::try_from(page.len()).unwrap_or(i64::MAX));
        // A dead letter always has its time (the table's CHECK); a page's last row is the key.
        after = page
            .last()
            .and_then(|row| row.dead_lettered_at.map(|at| (at, row.id)));
        for row in page {
            let bucket_matches = filter.bucket.is_none_or(|b| {
                ReasonBucket::classify(row.last_error.as_deref().unwrap_or("")) == b
            });
            if bucket_matches
                && i64::try_from(matching.len()).unwrap_or(i64::MAX) < DEAD_LETTER_SCAN
            {
                matching.push(row);
            }
        }
        let enough = i64::try_from(matching.len()).unwrap_or(i64::MAX) >= DEAD_LETTER_SCAN;
        if !full || enough || after.is_none() {
            break;
        }
    }
    Ok((matching, read))
}

/// The dead-letter list with its filters and the requeue forms.
pub(crate) async fn dead_letters(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let session = match page_session(&console, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let filter = match DeadLetterFilter::parse(&params) {
        Ok(f) => f,
        Err(message) => return bad_request(&session, "/dead-letters", &message),
    };
    let (rows, read) = match matching_dead_letters(&console, &filter).await {
        Ok(rows) => rows,
        Err(e) => return failure(&e),
    };
    let mut body = String::new();
    if let Some(note) = params.get("note").and_then(|n| note_text(n)) {
        let _ = write!(body, "<p class=\"flash\">{note}</p>");
    }
    body.push_str("<form method=\"get\" action=\"/dead-letters\"><fieldset><legend>Filter</legend><label>kind <select name=\"kind\"><option value=\"\">any</option>");
    for kind in PropagationKind::ALL {
        let selected = if filter.kind == Some(*kind) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", kind.as_str());
    }
    body.push_str(
        "</select></label> <label>bucket <select name=\"bucket\"><option value=\"\">any</option>",
    );
    for bucket in ReasonBucket::ALL {
        let selected = if filter.bucket == Some(*bucket) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", bucket.as_str());
    }
    let _ = write!(
        body,
        "</select></label> <label>older than (hours) <input name=\"older_than_hours\" size=\"5\" value=\"{}\"></label> \
         <button type=\"submit\">Filter</button></fieldset></form>",
        filter
            .older_than_hours
            .map(|h| h.to_string())
            .unwrap_or_default()
    );
    let shown = rows.len().min(100);
    let _ = write!(
        body,
        "<p>{} matching dead letter(s) (at most {DEAD_LETTER_SCAN}) among the newest {read} read; showing {shown}.</p>",
        rows.len()
    );
    if !rows.is_empty() {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/dead-letters/requeue\" id=\"requeue-filtered\">{}{}\
             <label>reason <input name=\"reason\" placeholder=\"reason\" required size=\"12\" maxlength=\"200\"></label> <button type=\"submit\">Requeue all {} matching</button> \
             <span class=\"muted\">(each through the same requeue as <code>keel-propagation-runner dead-letters requeue</code>; \
             rows whose resource already has a pending propagation or a newer target are left alone)</span></form>",
            html::csrf_field(session.csrf()),
            filter.hidden_fields(),
            rows.len()
        );
        body.push_str("<table><tr><th>id</th><th>kind</th><th>bucket</th><th>team</th><th>resource</th><th>type</th><th>attempts</th><th>dead-lettered</th><th>age</th><th>last error</th><th></th></tr>");
        for row in rows.iter().take(100) {
            let bucket = ReasonBucket::classify(row.last_error.as_deref().unwrap_or("")).as_str();
            let _ = write!(
                body,
                "<tr><td><a href=\"/dead-letters/{id}\">{id}</a></td><td>{}</td><td>{bucket}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td>\
                 <td><form class=\"inline\" method=\"post\" action=\"/dead-letters/requeue\">{}<input type=\"hidden\" name=\"id\" value=\"{id}\"><input name=\"reason\" placeholder=\"reason\" required size=\"12\" maxlength=\"200\"> <button type=\"submit\">Requeue</button></form></td></tr>",
                escape(&row.kind),
                row.team_id,
                resource_link(Some(row.resource_id)),
                escape(&row.resource_type),
                row.attempts,
                html::maybe_time(row.dead_lettered_at),
                html::age(row.age_seconds),
                escape(row.last_error.as_deref().unwrap_or("")),
                html::csrf_field(session.csrf()),
                id = row.id,
            );
        }
        body.push_str("</table>");
    }
    html_response(
        StatusCode::OK,
        html::page("Dead letters", "/dead-letters", Some(session.csrf()), &body),
    )
}

fn note_text(note: &str) -> Option<&'static str> {
    match note {
        "protected" => Some("Protected: the sweep will not reclaim this token's objects."),
        "unprotected" => Some("Protection lifted: the sweep's own gates decide again."),
        "unchanged" => Some("Nothing changed: it already was in that state."),
        "requeued" => Some("Requeued; the audit trail below shows the rows written."),
        "nothing" => Some("Nothing was requeued: no matching dead letter could be re-armed."),
        "unrecordable" => Some(
            "Some dead letters were left dead-lettered: their audit row cannot be written (the \
             log names each at ERROR); repair those rows. Any others were requeued, as the audit \
             trail below shows.",
        ),
        _ => None,
    }
}

/// One dead letter with its attempt history from the audit trail.
pub(crate) async fn dead_letter(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let session = match page_session(&console, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Ok(id) = id.parse::<i64>() else {
        return bad_request(
            &session,
            "/dead-letters",
            "a propagation id is a whole number",
        );
    };
    match render_dead_letter(&console, &session, id).await {
        Ok(Some(body)) => html_response(
            StatusCode::OK,
            html::page(
                &format!("Propagation {id}"),
                "/dead-letters",
                Some(session.csrf()),
                &body,
            ),
        ),
        Ok(None) => html_response(
            StatusCode::NOT_FOUND,
            html::page(
                "Not found",
                "/dead-letters",
                Some(session.csrf()),
                "<p class=\"error\">No propagation has this id.</p>",
            ),
        ),
        Err(e) => failure(&e),
    }
}

async fn render_dead_letter(
    console: &Console,
    session: &Session,
    id: i64,
) -> Result<Option<String>, ConsoleError> {
    let row: Option<(String, String, Uuid, Uuid, i32, Option<String>, Option<OffsetDateTime>, OffsetDateTime)> =
        sqlx::query_as(
            "SELECT kind, status, team_id, resource_id, attempts, last_error, dead_lettered_at, created_at \
             FROM pending_propagations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&console.pool)
        .await
        .map_err(crate::actions::db("read a propagation"))?;
    let Some((kind, status, team, resource, attempts, last_error, dead_at, created_at)) = row
    else {
        return Ok(None);
    };
    let mut body = format!(
        "<table><tr><th>kind</th><td>{}</td></tr><tr><th>status</th><td>{}</td></tr>\
         <tr><th>team</th><td><code>{team}</code></td></tr><tr><th>resource</th><td>{}</td></tr>\
         <tr><th>attempts</th><td>{attempts}</td></tr><tr><th>created</th><td>{}</td></tr>\
         <tr><th>dead-lettered</th><td>{}</td></tr><tr><th>last error</th><td><code>{}</code></td></tr></table>",
        escape(&kind),
        escape(&status),
        resource_link(Some(resource)),
        html::time(created_at),
        html::maybe_time(dead_at),
        escape(last_error.as_deref().unwrap_or("")),
    );
    if status == "dead_lettered" {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/dead-letters/requeue\">{}<input type=\"hidden\" name=\"id\" value=\"{id}\">\
             <label>reason <input name=\"reason\" placeholder=\"reason\" required size=\"12\" maxlength=\"200\"></label> <button type=\"submit\">Requeue</button></form>",
            html::csrf_field(session.csrf())
        );
    }
    body.push_str("<h2>Attempt history (audit trail)</h2>");
    let wanted = id.to_string();
    let trail = resource_trail(console, resource, |stored| {
        stored.event.kind().as_str().starts_with("propagation.")
            && stored
                .event
                .attributes()
                .get("propagation_id")
                .is_none_or(|p| *p == wanted)
    })
    .await?;
    trail.render(&mut body);
    Ok(Some(body))
}

/// How many audit rows a resource's timeline or attempt history shows: the newest ones.
const TRAIL_SHOWN: usize = 1000;
/// How many of a resource's audit rows one page view reads at most, in pages of
/// [`TRAIL_SHOWN`].
const TRAIL_READ: usize = 20 * TRAIL_SHOWN;

/// The newest [`TRAIL_SHOWN`] of a resource's audit rows that `keep` accepts, in commit order,
/// from the first [`TRAIL_READ`] rows of its trail; and what was left out.
struct Trail {
    rows: std::collections::VecDeque<keel_audit::postgres::StoredAuditEvent>,
    /// Older accepted rows dropped to keep the newest.
    dropped: usize,
    /// The trail goes on past what was read.
    unread: bool,
}

impl Trail {
    /// The table, with a line saying what it leaves out.
    fn render(&self, body: &mut String) {
        if self.dropped > 0 {
            let _ = write!(
                body,
                "<p class=\"muted\">The newest {} rows are shown; {} older ones are not.</p>",
                self.rows.len(),
                self.dropped
            );
        }
        if self.unread {
            let _ = write!(
                body,
                "<p class=\"muted\">Only the first {TRAIL_READ} audit rows of this resource were \
                 read; later ones are not shown here.</p>"
            );
        }
        audit_table(body, self.rows.iter());
    }
}

/// Reads a resource's audit trail page by page (see [`Trail`]).
async fn resource_trail(
    console: &Console,
    resource: Uuid,
    keep: impl Fn(&keel_audit::postgres::StoredAuditEvent) -> bool,
) -> Result<Trail, ConsoleError> {
    let mut conn = console
        .pool
        .acquire()
        .await
        .map_err(crate::actions::db("acquire a connection"))?;
    let mut trail = Trail {
        rows: std::collections::VecDeque::new(),
        dropped: 0,
        unread: false,
    };
    let mut query = ListQuery {
        resource_id: Some(ResourceId::from_uuid(resource)),
        limit: Some(u32::try_from(TRAIL_SHOWN).unwrap_or(u32::MAX)),
        ..ListQuery::default()
    };
    let mut read = 0;
    loop {
        let (rows, next) = keel_audit::list::list(&mut conn, &query)
            .await
            .map_err(|e| ConsoleError::Store {
                operation: "read the audit trail",
                source: Box::new(e),
            })?;
        let full = rows.len() == TRAIL_SHOWN;
        read += rows.len();
        for stored in rows.into_iter().filter_map(|listed| listed.row.ok()) {
            if keep(&stored) {
                if trail.rows.len() == TRAIL_SHOWN {
                    trail.rows.pop_front();
                    trail.dropped += 1;
                }
                trail.rows.push_back(stored);
            }
        }
        if !full {
            return Ok(trail);
        }
        if read >= TRAIL_READ {
            trail.unread = true;
            return Ok(trail);
        }
        query.after = next;
    }
}

fn audit_table<'a>(
    body: &mut String,
    rows: impl Iterator<Item = &'a keel_audit::postgres::StoredAuditEvent>,
) {
    body.push_str("<table class=\"audit\"><tr><th>id</th><th>recorded</th><th>occurred</th><th>kind</th><th>consumer</th><th>actor</th><th>team</th><th>resource</th><th>attributes</th></tr>");
    let mut any = false;
    for stored in rows {
        any = true;
        let event = &stored.event;
        let mut attrs = String::new();
        for (key, value) in event.attributes().iter() {
            let _ = write!(attrs, "{}={} ", escape(key), escape(value));
        }
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            stored.id.0,
            html::time(stored.recorded_at),
            html::time(event.occurred_at()),
            event.kind().as_str(),
            escape(&consumer_text(event.kind())),
            escape(event.actor().as_str()),
            event.team_id().map(|t| t.to_string()).unwrap_or_default(),
            resource_link(event.resource_id().map(|r| r.as_uuid())),
            attrs.trim_end()
        );
    }
    if !any {
        body.push_str("<tr><td colspan=\"9\" class=\"muted\">No rows.</td></tr>");
    }
    body.push_str("</table>");
}

/// The orphan review list: each candidate, whether it would be reclaimed and what blocks it;
/// protect / unprotect. Nothing here destroys anything.
pub(crate) async fn orphans(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let session = match page_session(&console, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match render_orphans(&console, &session, params.get("note").map(String::as_str)).await {
        Ok(body) => html_response(
            StatusCode::OK,
            html::page("Orphan review", "/orphans", Some(session.csrf()), &body),
        ),
        Err(e) => failure(&e),
    }
}

type SightingRow = (
    String,
    String,
    OffsetDateTime,
    Option<OffsetDateTime>,
    i32,
    Option<String>,
    i32,
    Option<String>,
    Option<String>,
);

/// The most candidates the orphan review lists.
const ORPHAN_REVIEW_ROWS: usize = 500;

async fn render_orphans(
    console: &Console,
    session: &Session,
    note: Option<&str>,
) -> Result<String, ConsoleError> {
    // The candidates an armed sweep would reclaim (once their burn-in is served) come first,
    // the fewest failed reclaims first as its rate limit takes them, then by when they were
    // first seen; so candidates that stay for good (quarantined, protected, never reclaimable)
    // cannot push them off the page.
    let rows: Vec<SightingRow> = sqlx::query_as(
        "SELECT s.inventory, s.key, s.first_seen, s.reclaimable_since, s.consecutive, s.quarantined, \
                s.failed_reclaims, p.reason, p.protected_by \
         FROM orphan_sightings s \
         LEFT JOIN reclaim_protections p ON p.token_digest = split_part(s.key, ':', 2) \
         ORDER BY (s.reclaimable_since IS NOT NULL AND s.quarantined IS NULL AND p.reason IS NULL) DESC, \
                  s.failed_reclaims, s.first_seen, s.inventory, s.key \
         LIMIT $1",
    )
    .bind(ORPHAN_REVIEW_ROWS as i64)
    .fetch_all(&console.pool)
    .await
    .map_err(crate::actions::db("read the orphan review list"))?;
    let total: i64 = if rows.len() < ORPHAN_REVIEW_ROWS {
        rows.len() as i64
    } else {
        sqlx::query_scalar("SELECT count(*) FROM orphan_sightings")
            .fetch_one(&console.pool)
            .await
            .map_err(crate::actions::db("count the orphan candidates"))?
    };
    let mut body = String::new();
    if let Some(note) = note.and_then(note_text) {
        let _ = write!(body, "<p class=\"flash\">{note}</p>");
    }
    body.push_str(
        "<p>The sweep's current candidates (from its last ticks), keyed by token digest: never a \
         name or a token. A candidate is reclaimed only by the sweep itself, behind \
         <code>ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED</code> and its burn-in, through the audited \
         deprovision chokepoint: \"yes, when armed\" means once that gate is on and the burn-in is met. This page can protect or unprotect; it destroys nothing.</p>",
    );
    if total > rows.len() as i64 {
        let _ = write!(
            body,
            "<p class=\"flash\">{} of {total} candidates are shown: those an armed sweep would \
             reclaim first (the fewest failed reclaims first), then the others by when they were \
             first seen.</p>",
            rows.len()
        );
    }
    if rows.is_empty() {
        body.push_str("<p class=\"muted\">No candidates.</p>");
    } else {
        body.push_str("<table id=\"orphans\"><tr><th>inventory</th><th>kind</th><th>token digest</th><th>first seen</th><th>reclaimable since</th><th>sightings in a row</th><th>failed reclaims</th><th>would reclaim</th><th>blocked by</th><th></th></tr>");
        for (
            inventory,
            key,
            first_seen,
            reclaimable_since,
            consecutive,
            quarantined,
            failed_reclaims,
            reason,
            by,
        ) in rows
        {
            let (kind, digest) = key.split_once(':').unwrap_or(("", key.as_str()));
            let mut blockers = Vec::new();
            if let Some(reason) = &reason {
                blockers.push(format!(
                    "protected by {} ({})",
                    escape(by.as_deref().unwrap_or("?")),
                    escape(reason)
                ));
            }
            if let Some(q) = &quarantined {
                blockers.push(format!("quarantined: {}", escape(q)));
            }
            if reclaimable_since.is_none() {
                blockers.push("not reclaimable (reported only)".to_owned());
            }
            let would = blockers.is_empty();
            let action = if reason.is_some() {
                format!(
                    "<form class=\"inline\" method=\"post\" action=\"/orphans/unprotect\">{}<input type=\"hidden\" name=\"digest\" value=\"{}\">\
                     <input name=\"reason\" placeholder=\"reason\" required size=\"10\"> <button type=\"submit\">Unprotect</button></form>",
                    html::csrf_field(session.csrf()),
                    escape(digest)
                )
            } else {
                format!(
                    "<form class=\"inline\" method=\"post\" action=\"/orphans/protect\">{}<input type=\"hidden\" name=\"digest\" value=\"{}\">\
                     <input name=\"reason\" placeholder=\"reason\" required size=\"10\"> <button type=\"submit\">Protect</button></form>",
                    html::csrf_field(session.csrf()),
                    escape(digest)
                )
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{consecutive}</td><td>{failed_reclaims}</td><td>{}</td><td>{}</td><td>{action}</td></tr>",
                escape(&inventory),
                escape(kind),
                escape(digest),
                html::time(first_seen),
                html::maybe_time(reclaimable_since),
                if would { "yes, when armed" } else { "no" },
                if would {
                    "-".to_owned()
                } else {
                    blockers.join("; ")
                },
            );
        }
        body.push_str("</table>");
    }
    let protections = keel_orphan_sweep::protections::list(&console.pool)
        .await
        .map_err(|e| ConsoleError::Store {
            operation: "list reclaim protections",
            source: Box::new(e),
        })?;
    body.push_str("<h2>Platform-held protections</h2>");
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/orphans/protect\"><fieldset><legend>Protect a token digest</legend>{}\
         <label>digest <input name=\"digest\" size=\"50\" required></label> <label>reason <input name=\"reason\" required></label> \
         <button type=\"submit\">Protect</button></fieldset></form>",
        html::csrf_field(session.csrf())
    );
    if protections.is_empty() {
        body.push_str("<p class=\"muted\">None.</p>");
    } else {
        body.push_str(
            "<table><tr><th>token digest</th><th>since</th><th>by</th><th>reason</th></tr>",
        );
        for p in protections {
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&p.digest),
                html::time(p.created_at),
                escape(&p.protected_by),
                escape(&p.reason)
            );
        }
        body.push_str("</table>");
    }
    Ok(body)
}

type RunRow = (
    i64,
    OffsetDateTime,
    Option<OffsetDateTime>,
    OffsetDateTime,
    OffsetDateTime,
    bool,
    bool,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i16>,
    Option<String>,
);

async fn rater_rows(console: &Console, limit: i64) -> Result<Vec<RunRow>, ConsoleError> {
    sqlx::query_as(
        "SELECT id, started_at, finished_at, window_start, window_end, explicit_window, dry_run, \
                inserted, updated, unchanged, deleted, anomalies, exit_code, error \
         FROM rater_runs ORDER BY started_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&console.pool)
    .await
    .map_err(crate::actions::db("read the rater ledger"))
}

fn render_runs(body: &mut String, runs: &[RunRow]) {
    if runs.is_empty() {
        body.push_str("<p class=\"muted\">No rater runs.</p>");
        return;
    }
    body.push_str("<table><tr><th>run</th><th>started</th><th>finished</th><th>window</th><th>mode</th><th>inserted</th><th>updated</th><th>unchanged</th><th>deleted</th><th>anomalies</th><th>exit</th><th>error</th><th>audit</th></tr>");
    for (
        id,
        started,
        finished,
        from,
        to,
        explicit,
        dry,
        inserted,
        updated,
        unchanged,
        deleted,
        anomalies,
        exit,
        error,
    ) in runs
    {
        let mode = match (explicit, dry) {
            (true, true) => "backfill (dry run)",
            (true, false) => "backfill",
            (false, true) => "routine (dry run)",
            (false, false) => "routine",
        };
        // Checked: a run row dated at the end of year 9999 (another writer of the ledger) has no
        // later second to end the range at, and must not take the page down.
        let until = finished
            .or_else(|| started.checked_add(time::Duration::hours(1)))
            .and_then(|end| end.checked_add(time::Duration::seconds(1)));
        let exit_class = if exit.is_some_and(|e| e == 2) {
            " class=\"page\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<tr><td>{id}</td><td>{}</td><td>{}</td><td>{} – {}</td><td>{mode}</td><td>{inserted}</td><td>{updated}</td><td>{unchanged}</td><td{}>{deleted}</td><td>{anomalies}</td><td{exit_class}>{}</td><td>{}</td>\
             <td><a href=\"/audit?since={}{}\">rows of this run</a></td></tr>",
            html::time(*started),
            html::maybe_time(*finished),
            html::time(*from),
            html::time(*to),
            if *deleted > 0 { " class=\"page\"" } else { "" },
            exit.map(|e| e.to_string())
                .unwrap_or_else(|| "running".to_owned()),
            escape(error.as_deref().unwrap_or("")),
            query_value(&html::time(*started)),
            until.map_or_else(String::new, |until| format!(
                "&amp;until={}",
                query_value(&html::time(until))
            )),
        );
    }
    body.push_str("</table>");
}

/// The rater ledger.
pub(crate) async fn rater_runs(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
) -> Response {
    let session = match page_session(&console, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match rater_rows(&console, 100).await {
        Ok(runs) => {
            let mut body = String::from(
                "<p>One row per run (exit codes: 0 clean, 1 error, 2 anomaly or routine deletion, \
                 3 skipped: another rater held the lock). Each run links to the audit rows recorded \
                 while it ran.</p>",
            );
            render_runs(&mut body, &runs);
            html_response(
                StatusCode::OK,
                html::page("Rater runs", "/rater-runs", Some(session.csrf()), &body),
            )
        }
        Err(e) => failure(&e),
    }
}

fn parse_audit_query(params: &HashMap<String, String>, limit: u32) -> Result<ListQuery, String> {
    let value = |name: &str| params.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let time = |name: &str| {
        value(name)
            .map(|v| {
                OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .and_then(keel_audit::utc_in_range)
                    .ok_or_else(|| {
                        format!(
                            "{name} is an RFC 3339 time in the years 0001 to 9999 (UTC), \
                             e.g. 2026-01-31T00:00:00Z"
                        )
                    })
            })
            .transpose()
    };
    let uuid = |name: &str| {
        value(name)
            .map(|v| Uuid::parse_str(v).map_err(|_| format!("{name} is a UUID")))
            .transpose()
    };
    Ok(ListQuery {
        kind: value("kind")
            .map(|k| k.parse::<AuditKind>().map_err(|e| e.to_string()))
            .transpose()?,
        team_id: uuid("team")?.map(TeamId::from_uuid),
        resource_id: uuid("resource")?.map(ResourceId::from_uuid),
        actor: value("actor")
            .map(|a| keel_audit::Actor::parse(a).map_err(|e| e.to_string()))
            .transpose()?,
        request_id: None,
        since: time("since")?,
        until: time("until")?,
        after: value("after")
            .map(|c| parse_cursor(c).map_err(|e| e.to_string()))
            .transpose()?
            .unwrap_or(CommitCursor::START),
        limit: Some(limit),
    })
}

/// The audit trail: search by kind, team, resource, actor and time range; cursor pagination in
/// commit order (never OFFSET).
pub(crate) async fn audit(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let session = match page_session(&console, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let query = match parse_audit_query(&params, console.config.page_size) {
        Ok(q) => q,
        Err(message) => return bad_request(&session, "/audit", &message),
    };
    let page = async {
        let mut conn = console
            .pool
            .acquire()
            .await
            .map_err(crate::actions::db("acquire a connection"))?;
        keel_audit::list::list(&mut conn, &query)
            .await
            .map_err(|e| ConsoleError::Store {
                operation: "read the audit trail",
                source: Box::new(e),
            })
    };
    let (rows, next) = match page.await {
        Ok(page) => page,
        Err(e) => return failure(&e),
    };
    let field = |name: &str| escape(params.get(name).map(String::as_str).unwrap_or(""));
    let mut body = String::new();
    if let Some(note) = params.get("note").and_then(|n| note_text(n)) {
        let _ = write!(body, "<p class=\"flash\">{note}</p>");
    }
    body.push_str("<form method=\"get\" action=\"/audit\"><fieldset><legend>Search</legend><label>kind <select name=\"kind\"><option value=\"\">any</option>");
    for kind in AuditKind::ALL {
        let selected = if query.kind == Some(*kind) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", kind.as_str());
    }
    let _ = write!(
        body,
        "</select></label> <label>team <input name=\"team\" size=\"36\" value=\"{}\"></label> \
         <label>resource <input name=\"resource\" size=\"36\" value=\"{}\"></label> \
         <label>actor <input name=\"actor\" value=\"{}\"></label><br>\
         <label>since <input name=\"since\" placeholder=\"2026-01-31T00:00:00Z\" value=\"{}\"></label> \
         <label>until <input name=\"until\" value=\"{}\"></label> <button type=\"submit\">Search</button></fieldset></form>",
        field("team"),
        field("resource"),
        field("actor"),
        field("since"),
        field("until"),
    );
    let full = rows.len() >= console.config.page_size as usize;
    let readable: Vec<_> = rows.iter().filter_map(|l| l.row.as_ref().ok()).collect();
    let unreadable = rows.len() - readable.len();
    if unreadable > 0 {
        let _ = write!(
            body,
            "<p class=\"error\">{unreadable} row(s) on this page are of a kind this build does not know (written by a newer release).</p>"
        );
    }
    audit_table(&mut body, readable.into_iter());
    if full {
        let mut link = String::from("/audit?");
        for name in ["kind", "team", "resource", "actor", "since", "until"] {
            if let Some(v) = params.get(name).filter(|v| !v.trim().is_empty()) {
                let _ = write!(link, "{name}={}&", query_value(v));
            }
        }
        let _ = write!(link, "after={}", query_value(&format_cursor(next)));
        let _ = write!(
            body,
            "<p><a id=\"next\" href=\"{}\">Next page</a></p>",
            escape(&link)
        );
    } else {
        body.push_str("<p class=\"muted\">End of the trail for this search.</p>");
    }
    html_response(
        StatusCode::OK,
        html::page("Audit trail", "/audit", Some(session.csrf()), &body),
    )
}

/// A resource and its whole timeline: the row (token masked, no connection URL), its
/// propagations and every audit row about it.
pub(crate) async fn resource(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let session = match page_session(&console, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return bad_request(&session, "/audit", "a resource id is a UUID");
    };
    match render_resource(&console, id).await {
        Ok(body) => html_response(
            StatusCode::OK,
            html::page(&format!("Resource {id}"), "", Some(session.csrf()), &body),
        ),
        Err(e) => failure(&e),
    }
}

async fn render_resource(console: &Console, id: Uuid) -> Result<String, ConsoleError> {
    let db = crate::actions::db;
    // Never `connection_url`: the page has no secret to leak.
    let row: Option<(
        String,
        Uuid,
        String,
        String,
        String,
        OffsetDateTime,
        OffsetDateTime,
        Option<OffsetDateTime>,
    )> = sqlx::query_as(
        "SELECT token, team_id, resource_type, tier, status, created_at, updated_at, deleted_at \
             FROM resources WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&console.pool)
    .await
    .map_err(db("read a resource"))?;
    let mut body = String::new();
    match row {
        Some((token, team, rtype, tier, status, created, updated, deleted)) => {
            let _ = write!(
                body,
                "<table><tr><th>token</th><td><code>{}</code></td></tr><tr><th>team</th><td><a href=\"/audit?team={team}\"><code>{team}</code></a></td></tr>\
                 <tr><th>type</th><td>{}</td></tr><tr><th>tier</th><td>{}</td></tr><tr><th>status</th><td>{}</td></tr>\
                 <tr><th>created</th><td>{}</td></tr><tr><th>updated</th><td>{}</td></tr><tr><th>deleted</th><td>{}</td></tr></table>",
                escape(&keel_audit::mask(&token)),
                escape(&rtype),
                escape(&tier),
                escape(&status),
                html::time(created),
                html::time(updated),
                html::maybe_time(deleted),
            );
        }
        None => body.push_str(
            "<p class=\"muted\">No resource row has this id (never created, or only its audit rows remain).</p>",
        ),
    }
    let props: Vec<(
        i64,
        String,
        String,
        i32,
        Option<String>,
        OffsetDateTime,
        Option<OffsetDateTime>,
        Option<OffsetDateTime>,
    )> = sqlx::query_as(
        "SELECT id, kind, status, attempts, last_error, created_at, applied_at, dead_lettered_at \
             FROM pending_propagations WHERE resource_id = $1 ORDER BY id DESC LIMIT 200",
    )
    .bind(id)
    .fetch_all(&console.pool)
    .await
    .map_err(db("read a resource's propagations"))?;
    body.push_str("<h2>Propagations</h2>");
    if props.is_empty() {
        body.push_str("<p class=\"muted\">None.</p>");
    } else {
        body.push_str("<table><tr><th>id</th><th>kind</th><th>status</th><th>attempts</th><th>created</th><th>applied</th><th>dead-lettered</th><th>last error</th></tr>");
        for (pid, kind, status, attempts, error, created, applied, dead) in props {
            let _ = write!(
                body,
                "<tr><td><a href=\"/dead-letters/{pid}\">{pid}</a></td><td>{}</td><td>{}</td><td>{attempts}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                escape(&kind),
                escape(&status),
                html::time(created),
                html::maybe_time(applied),
                html::maybe_time(dead),
                escape(error.as_deref().unwrap_or("")),
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<h2>Timeline (audit trail, commit order)</h2>");
    resource_trail(console, id, |_| true)
        .await?
        .render(&mut body);
    Ok(body)
}
