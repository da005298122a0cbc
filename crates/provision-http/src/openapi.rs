//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the handlers'
//! `#[utoipa::path]` attributes and the body and envelope types (`utoipa::ToSchema`), then
//! completed from [`ErrorCode::ALL`]: every error code with its status, title, agent action and
//! `type` URL under the deployment's docs base. Nothing in it is written by hand twice.

use keel_provision::{DocsBase, ErrorCode};
use serde_json::{Value, json};
use utoipa::OpenApi as _;

use crate::api;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Keel provisioning API",
        description = "Provisions customer resources atomically: no 201 for a resource the \
                       platform cannot address. Every /v1 route needs `Authorization: Bearer \
                       <API key>`. Every error is an RFC 9457 problem (application/problem+json) \
                       whose `error` is one of the codes listed in `x-keel-error-codes`, each \
                       with the action an agent should take."
    ),
    paths(
        api::create,
        api::list,
        api::read,
        api::delete,
        api::rotate,
    ),
    tags((name = "resources", description = "Customer resources"))
)]
struct Document;

/// The document, with the error catalogue for `docs`.
pub fn document(docs: &DocsBase) -> Value {
    let mut document =
        serde_json::to_value(Document::openapi()).unwrap_or_else(|_| json!({"openapi": "3.1.0"}));
    let codes: Vec<Value> = ErrorCode::ALL
        .iter()
        .map(|&code| {
            let example = keel_provision::ErrorEnvelope::new(code, "", "", docs);
            json!({
                "code": code.as_str(),
                "status": code.status(),
                "title": code.title(),
                "type": example.type_url,
                "agent_action": code.agent_action(docs),
            })
        })
        .collect();
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
    if let Some(error) = document.pointer_mut("/components/schemas/ErrorEnvelope/properties/error")
    {
        error["enum"] = json!(names);
    }
    document["x-keel-error-codes"] = Value::Array(codes);
    document["components"]["securitySchemes"] = json!({
        "api_key": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (keel_<id>_<secret>), created with \
                            `keel-provision-api keys create`; scoped to one team or to the operators."
        }
    });
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route_and_every_error_code_with_its_action() {
        let docs = DocsBase::parse("https://docs.example.test/errors").unwrap();
        let document = document(&docs);
        assert_eq!(document["openapi"], "3.1.0");
        for (path, method) in [
            ("/v1/resources", "post"),
            ("/v1/resources", "get"),
            ("/v1/resources/{id}", "get"),
            ("/v1/resources/{id}", "delete"),
            ("/v1/resources/{id}/rotate-credentials", "post"),
        ] {
            let operation = &document["paths"][path][method];
            assert!(operation.is_object(), "{method} {path}");
            assert_eq!(
                operation["security"],
                json!([{"api_key": []}]),
                "{method} {path}"
            );
            assert!(
                operation["responses"]["default"]["content"]["application/problem+json"]
                    .is_object(),
                "{method} {path}: errors are problems"
            );
        }
        let listed = document["x-keel-error-codes"].as_array().unwrap();
        assert_eq!(listed.len(), ErrorCode::ALL.len());
        for (entry, &code) in listed.iter().zip(ErrorCode::ALL) {
            assert_eq!(entry["code"], code.as_str());
            assert_eq!(entry["agent_action"], code.agent_action(&docs));
            let url = format!("https://docs.example.test/errors/{}", code.as_str());
            assert_eq!(
                entry["type"],
                url.as_str(),
                "the docs base is the deployment's"
            );
        }
        let error = &document["components"]["schemas"]["ErrorEnvelope"]["properties"]["error"];
        assert_eq!(
            error["enum"].as_array().unwrap().len(),
            ErrorCode::ALL.len()
        );
        if let Some(out) = std::env::var_os("KEEL_OPENAPI_OUT") {
            std::fs::write(out, serde_json::to_vec_pretty(&document).unwrap()).unwrap();
        }
    }
}
