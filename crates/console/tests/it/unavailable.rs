//! A console whose database cannot be reached says so (503, `Retry-After`) instead of failing
//! as if a statement had gone wrong (500).

use std::time::Duration;

use keel_console::ConsoleConfig;

use crate::app;

/// A console serving over a pool whose server refuses every connection; returns its address.
async fn console_without_its_database(
    options: sqlx::postgres::PgConnectOptions,
) -> std::net::SocketAddr {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options.host("127.0.0.1").port(closed));
    app::serve(
        pool,
        ConsoleConfig {
            secure_cookies: false,
            ..ConsoleConfig::default()
        },
    )
    .await
}

#[tokio::test]
async fn pages_and_actions_answer_503_with_retry_after_while_the_database_is_unreachable() {
    let mut app = app::spawn().await;
    let csrf = app.sign_in().await;
    let (_, token, id) = app.dead_letter("backend timed out").await;
    // The same session cookie, presented to a console whose database is down.
    app.addr = console_without_its_database(app.db.connect_options()).await;
    for reply in [
        app.get("/").await,
        app.get("/audit").await,
        app.post(
            "/dead-letters/requeue",
            &[
                ("id", &id.to_string()),
                ("reason", "database down"),
                ("csrf", &csrf),
            ],
        )
        .await,
    ] {
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.header("retry-after"), Some("5"));
        assert!(reply.body.contains("cannot be reached"), "{}", reply.body);
        assert!(!reply.body.contains(&token) && !reply.body.contains(&app.key));
    }
}
