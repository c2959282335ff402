//! The OpenAPI document of what keeld serves: paths from the route table
//! ([`super::routes`]), schemas generated from the `keel_api::keeld` types
//! each route names for its request body and its answers. A copy is
//! committed as `orchestrator/openapi/keeld.json`; a test keeps the two
//! the same.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::Json;
use keel_api::keeld::ErrorReply;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::{Content, Route};

/// The schemas the document refers to, by name.
pub type Schemas = BTreeMap<String, Value>;

/// Puts the types of a body in `schemas` and answers the schema the route
/// refers to (`$ref`s into `components.schemas`): [`of`], [`list_of`].
pub type BodySchema = fn(&mut Schemas) -> Value;

/// Puts `T` and the types it refers to in `schemas`; answers its `$ref`.
fn register<T: ToSchema>(schemas: &mut Schemas) -> Value {
    let name = T::name().into_owned();
    let mut all = vec![(name.clone(), T::schema())];
    T::schemas(&mut all);
    for (n, schema) in all {
        let schema = serde_json::to_value(schema).unwrap_or_default();
        let kept = schemas.entry(n.clone()).or_insert_with(|| schema.clone());
        debug_assert_eq!(*kept, schema, "two types named {n} in keeld's schemas");
    }
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A JSON body of type `T`.
pub fn of<T: ToSchema>(schemas: &mut Schemas) -> Value {
    register::<T>(schemas)
}

/// A JSON array of `T`s.
pub fn list_of<T: ToSchema>(schemas: &mut Schemas) -> Value {
    json!({ "type": "array", "items": register::<T>(schemas) })
}

/// This document.
pub fn document(_: &mut Schemas) -> Value {
    json!({ "type": "object", "description": "An OpenAPI 3.1 document" })
}

fn parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "schema": {"type": "string"},
                "description": if name == "id" { "The resource's id, or its name within ?project=" } else { "" },
            })
        })
        .collect()
}

fn content(content: &Content, schemas: &mut Schemas) -> Option<Value> {
    match content {
        Content::None => None,
        Content::Json(schema) => Some(json!({"application/json": {"schema": schema(schemas)}})),
        Content::Text => Some(json!({"text/plain": {"schema": {"type": "string"}}})),
        Content::Bytes => Some(
            json!({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}),
        ),
    }
}

fn responses(route: &Route, schemas: &mut Schemas) -> Value {
    let mut all = Map::new();
    for reply in &route.replies {
        let description = match reply.status {
            101 => "Switching Protocols: the WebSocket",
            200 => "OK",
            201 => "Created",
            202 => "Accepted: the operation started; poll it at /api/v1/operations/{id}",
            204 => "Done, nothing to say",
            _ => "",
        };
        let mut response = json!({ "description": description });
        if let Some(c) = content(&reply.content, schemas) {
            response["content"] = c;
        }
        all.insert(reply.status.to_string(), response);
    }
    let error = of::<ErrorReply>(schemas);
    for (code, text) in [
        ("400", "Invalid request: the message says what was wrong"),
        ("401", "No valid token"),
        ("403", "Not allowed for your role"),
        ("404", "No such resource (or not visible to you)"),
        ("409", "The resource's state does not allow it"),
        (
            "422",
            "Valid but impossible (e.g. bigger than the host), or an Idempotency-Key reused for another request",
        ),
    ] {
        all.insert(
            code.into(),
            json!({"description": text, "content": {"application/json": {"schema": error}}}),
        );
    }
    Value::Object(all)
}

pub fn openapi_document() -> Value {
    let mut schemas = Schemas::new();
    let mut paths: Map<String, Value> = Map::new();
    for route in super::routes() {
        let mut op = json!({
            "summary": route.summary,
            "parameters": parameters(route.path),
            "responses": responses(&route, &mut schemas),
        });
        if let Some(c) = content(&route.body, &mut schemas) {
            op["requestBody"] = json!({ "required": true, "content": c });
        }
        let public = matches!(
            route.path,
            "/api/v1/openapi.json" | "/metrics" | "/api/v1/login"
        );
        if public {
            op["security"] = json!([]);
        }
        if route.method != "GET"
            && let Some(params) = op["parameters"].as_array_mut()
        {
            params.push(json!({
                "name": "Idempotency-Key",
                "in": "header",
                "required": false,
                "schema": {"type": "string"},
                "description": "A repeated key gets the first answer again; the request is not run twice"
            }));
        }
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method.to_lowercase()] = op;
    }
    sorted(json!({
        "openapi": "3.1.0",
        "info": {
            "title": "keeld",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Keel's orchestrator API. Mutating calls on VMs, images and disks answer 202 with an operation."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": paths,
    }))
}

/// The value with every object's keys in order, whatever order serde_json
/// keeps them in: the document is the same from one build to the next.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let by_key: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(by_key.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        v => v,
    }
}

pub async fn serve() -> Json<Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(openapi_document).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPDATE: &str = "KEEL_UPDATE_OPENAPI";

    /// `orchestrator/openapi/keeld.json` is what keeld serves; with
    /// KEEL_UPDATE_OPENAPI=1 the test writes it instead.
    #[test]
    fn openapi_document_matches_the_committed_file() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/keeld.json");
        let mut generated = serde_json::to_string_pretty(&openapi_document()).unwrap();
        generated.push('\n');
        if std::env::var_os(UPDATE).is_some_and(|v| !v.is_empty() && v != "0") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            let line = committed
                .lines()
                .zip(generated.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
            panic!(
                "orchestrator/openapi/keeld.json differs from the document keeld serves (first at \
                 line {}): the API changed. Regenerate it with `{UPDATE}=1 cargo test -p \
                 keel-orchestrator openapi`, check the diff and commit it.",
                line + 1
            );
        }
    }

    #[test]
    fn every_body_and_main_answer_refers_to_a_schema() {
        let doc = openapi_document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for (path, methods) in doc["paths"].as_object().unwrap() {
            for (method, op) in methods.as_object().unwrap() {
                let ok = op["responses"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .find(|(code, _)| code.starts_with('1') || code.starts_with('2'));
                assert!(ok.is_some(), "{method} {path}: no success answer");
                let json = |v: &Value| v["content"]["application/json"]["schema"].clone();
                for schema in [json(&op["requestBody"]), json(ok.unwrap().1)] {
                    if schema.is_null() || path == "/api/v1/openapi.json" {
                        continue;
                    }
                    let reference = schema["$ref"].as_str().or(schema["items"]["$ref"].as_str());
                    let r = reference.unwrap_or_else(|| panic!("{method} {path}: {schema}"));
                    let name = r.trim_start_matches("#/components/schemas/");
                    assert!(schemas.contains_key(name), "{method} {path}: no schema {r}");
                }
            }
        }
        // Every schema's own references resolve.
        let text = serde_json::to_string(&doc).unwrap();
        for r in text.split("\"$ref\":\"").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            let name = name.trim_start_matches("#/components/schemas/");
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
    }
}
