//! The backend names a token maps to (the only way to name a customer's objects), their masked
//! forms for logs, and the error codes a client can receive with their HTTP status, retry hint
//! and agent action.
//!
//! Run with `cargo run -p keel-provision --example names_and_errors`.

use keel_audit::Token;
use keel_provision::{DatabaseName, DocsBase, ErrorCode, NamespaceName, RoleName};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let token = Token::parse("abcd00000001")?;
    let namespace = NamespaceName::for_token(&token);
    let database = DatabaseName::for_token(&token);
    let role = RoleName::for_database(&database);
    println!(
        "namespace {:<53} logged as {}",
        namespace.expose(),
        namespace.masked()
    );
    println!(
        "database  {:<53} logged as {}",
        database.expose(),
        database.masked()
    );
    println!(
        "role      {:<53} logged as {}",
        role.expose(),
        role.masked()
    );
    // A name parses back only if it is one of the platform's.
    println!(
        "parse {:?}: {}",
        "kube-system",
        NamespaceName::parse("kube-system").is_ok()
    );
    println!(
        "parse {:?}: {}",
        "postgres",
        RoleName::parse("postgres").is_ok()
    );

    let docs = DocsBase::parse("https://docs.example.com/keel")?;
    println!("\ncode                    status  retry-after  agent action");
    for &code in ErrorCode::ALL {
        let retry = code
            .retry_after_seconds()
            .map_or_else(|| "-".to_owned(), |s| format!("{s}s"));
        println!(
            "{:<22}  {:>6}  {retry:>11}  {}",
            code.as_str(),
            code.status(),
            code.agent_action(&docs)
        );
    }
    Ok(())
}
