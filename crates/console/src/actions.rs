//! The actions (POST): each needs a live session and its CSRF token, and each is audited with
//! the operator as actor, through the same functions as the CLIs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use keel_propagation::PropagationId;
use keel_propagation::postgres::{PgPropagationStore, RequeueReason, RequeueTarget};
use keel_provision::TokenDigest;

use crate::html::{self, escape, query_value};
use crate::pages::{self, DeadLetterFilter, failure, html_response};
use crate::session::{self, SESSION_COOKIE, SIGN_IN_COOKIE, Session};
use crate::{Console, ConsoleError};

pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> ConsoleError {
    move |e| ConsoleError::Store {
        operation,
        source: Box::new(e),
    }
}

fn refused(status: StatusCode, message: &str) -> Response {
    html_response(
        status,
        html::page(
            "Refused",
            "",
            None,
            &format!(
                "<p class=\"error\">{}</p><p><a href=\"/\">Back to the console</a></p>",
                escape(message)
            ),
        ),
    )
}

/// The session of an action, checked against the form's CSRF token: 401 without a live session,
/// 403 when the token is missing or wrong. Nothing is changed in either case.
async fn action_session(
    console: &Console,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Session, Response> {
    let session = match pages::current_session(console, headers).await {
        Ok(Some(session)) => session,
        Ok(None) => {
            return Err(refused(
                StatusCode::UNAUTHORIZED,
                "No live session: sign in again (sessions end at sign-out, on expiry, or when \
                 their operator key is revoked).",
            ));
        }
        Err(e) => return Err(failure(&e)),
    };
    match form.get("csrf") {
        Some(token) if session.csrf_matches(token) => Ok(session),
        Some(_) | None => Err(refused(
            StatusCode::FORBIDDEN,
            "The form's CSRF token is missing or does not match this session: reload the page \
             and submit the form again. Nothing was changed.",
        )),
    }
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = header::HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// Sign-in: the form's CSRF token must equal the sign-in cookie's (double submit), then the key
/// must be a live operator key.
pub(crate) async fn sign_in(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let cookie = session::cookie(&headers, SIGN_IN_COOKIE);
    let csrf_ok = match (cookie, form.get("csrf")) {
        (Some(cookie), Some(field)) => session::same(cookie.as_bytes(), field.as_bytes()),
        (Some(_) | None, Some(_) | None) => false,
    };
    if !csrf_ok {
        return pages::sign_in_page(
            &console,
            StatusCode::FORBIDDEN,
            Some("The sign-in form's CSRF token is missing or stale: sign in from this page."),
        );
    }
    let Some(key) = form.get("key") else {
        return pages::sign_in_page(
            &console,
            StatusCode::BAD_REQUEST,
            Some("Enter an operator key."),
        );
    };
    let now = match pages::db_now(&console).await {
        Ok(now) => now,
        Err(e) => return failure(&e),
    };
    match session::sign_in(&console.pool, key, console.config.session_ttl, now).await {
        Ok(Ok((value, _session))) => {
            let secure = console.config.secure_cookies;
            let response = Redirect::to("/").into_response();
            let response = with_cookie(
                response,
                &session::set_cookie(
                    SESSION_COOKIE,
                    &value,
                    Some(console.config.session_ttl.whole_seconds()),
                    secure,
                ),
            );
            with_cookie(
                response,
                &session::set_cookie(SIGN_IN_COOKIE, "", Some(0), secure),
            )
        }
        Ok(Err(session::SignInRefusal::NotAKey)) => pages::sign_in_page(
            &console,
            StatusCode::UNAUTHORIZED,
            Some("That is not a live API key (unknown, revoked or mistyped)."),
        ),
        Ok(Err(session::SignInRefusal::NotAnOperator)) => pages::sign_in_page(
            &console,
            StatusCode::FORBIDDEN,
            Some("That is a team's key: the console needs an operator key."),
        ),
        Err(e) => failure(&e),
    }
}

/// Sign-out: ends the session (audited) and clears the cookie.
pub(crate) async fn sign_out(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let session = match action_session(&console, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let now = match pages::db_now(&console).await {
        Ok(now) => now,
        Err(e) => return failure(&e),
    };
    if let Err(e) = session::sign_out(&console.pool, &session, now).await {
        return failure(&e);
    }
    with_cookie(
        Redirect::to("/sign-in").into_response(),
        &session::set_cookie(SESSION_COOKIE, "", Some(0), console.config.secure_cookies),
    )
}

/// Requeue one dead letter (`id`) or every dead letter matching the filter fields, each through
/// [`PgPropagationStore::requeue`]: the CLI's code path, the same `propagation.requeued` rows.
pub(crate) async fn requeue(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let session = match action_session(&console, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let reason = match RequeueReason::parse(form.get("reason").map_or("", String::as_str)) {
        Ok(reason) => reason,
        Err(e) => return refused(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let ids: Vec<i64> = match form.get("id").map(|v| v.trim()).filter(|v| !v.is_empty()) {
        Some(id) => match id.parse::<i64>() {
            Ok(id) => vec![id],
            Err(_) => {
                return refused(
                    StatusCode::BAD_REQUEST,
                    "a propagation id is a whole number",
                );
            }
        },
        None => {
            let filter = match DeadLetterFilter::parse(&form) {
                Ok(f) => f,
                Err(message) => return refused(StatusCode::BAD_REQUEST, &message),
            };
            match pages::matching_dead_letters(&console, &filter).await {
                Ok((rows, _)) => rows.into_iter().map(|r| r.id).collect(),
                Err(e) => return failure(&e),
            }
        }
    };
    let store = PgPropagationStore::new(console.pool.clone());
    let actor = session.actor();
    let mut requeued = 0usize;
    let mut unrecordable = 0usize;
    for id in ids {
        let now = match store.db_now().await {
            Ok(now) => now,
            Err(e) => {
                return failure(&ConsoleError::Store {
                    operation: "read the database clock",
                    source: Box::new(e),
                });
            }
        };
        match store
            .requeue(RequeueTarget::One(PropagationId(id)), &actor, &reason, now)
            .await
        {
            // A dead letter whose audit row cannot be written stays dead-lettered (the store
            // logs it at ERROR); the others are still requeued, and the page says so.
            Ok(report) => {
                requeued += report.requeued.len();
                unrecordable += report.skipped_unrecordable.len();
            }
            // Requeued by someone else meanwhile: nothing to do for this one.
            Err(keel_propagation::StoreError::NotDeadLettered(_)) => {}
            Err(e) => {
                return failure(&ConsoleError::Store {
                    operation: "requeue a dead letter",
                    source: Box::new(e),
                });
            }
        }
    }
    let note = match (requeued > 0, unrecordable > 0) {
        (_, true) => "unrecordable",
        (true, false) => "requeued",
        (false, false) => "nothing",
    };
    Redirect::to(&format!(
        "/audit?kind=propagation.requeued&actor={}&note={note}",
        query_value(actor.as_str())
    ))
    .into_response()
}

fn digest_and_reason(form: &HashMap<String, String>) -> Option<(TokenDigest, String)> {
    let digest = form
        .get("digest")
        .and_then(|d| TokenDigest::parse(d.trim()))?;
    let reason = form
        .get("reason")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default();
    Some((digest, reason))
}

async fn change_protection(
    console: &Console,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    protect: bool,
) -> Response {
    let session = match action_session(console, headers, form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some((digest, reason)) = digest_and_reason(form) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "a token digest is 48 lowercase hex digits",
        );
    };
    let now = match pages::db_now(console).await {
        Ok(now) => now,
        Err(e) => return failure(&e),
    };
    let actor = session.actor();
    let result = if protect {
        keel_orphan_sweep::protections::protect(&console.pool, &digest, &reason, &actor, now).await
    } else {
        keel_orphan_sweep::protections::unprotect(&console.pool, &digest, &reason, &actor, now)
            .await
    };
    match result {
        Ok(true) => Redirect::to(if protect {
            "/orphans?note=protected"
        } else {
            "/orphans?note=unprotected"
        })
        .into_response(),
        Ok(false) => Redirect::to("/orphans?note=unchanged").into_response(),
        Err(e) if e.is_bad_input() => refused(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => failure(&ConsoleError::Store {
            operation: "change a reclaim protection",
            source: Box::new(e),
        }),
    }
}

/// Protect a token digest from reclamation (audited `resource.reclaim_protected`).
pub(crate) async fn protect(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    change_protection(&console, &headers, &form, true).await
}

/// Lift a token digest's protection (audited `resource.reclaim_unprotected`).
pub(crate) async fn unprotect(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    change_protection(&console, &headers, &form, false).await
}
