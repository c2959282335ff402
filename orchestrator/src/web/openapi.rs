//! The OpenAPI document of what keeld serves, built from the route table.

use axum::Json;
use serde_json::{Map, Value, json};

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

fn responses(method: &str, path: &str) -> Value {
    let ok = match method {
        "GET" => json!({"200": {"description": "OK"}}),
        "DELETE" if !path.starts_with("/api/v1/vms") => {
            json!({"204": {"description": "Deleted"}})
        }
        _ => json!({
            "200": {"description": "Done"},
            "201": {"description": "Created"},
            "202": {"description": "Accepted: {\"operation\": {...}} to poll at /api/v1/operations/{id}"},
            "204": {"description": "Done, nothing to say"}
        }),
    };
    let mut all = ok.as_object().cloned().unwrap_or_default();
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
        all.insert(code.into(), json!({"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
    }
    Value::Object(all)
}

pub fn openapi_document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for route in super::routes() {
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        let mut op = json!({
            "summary": route.summary,
            "parameters": parameters(route.path),
            "responses": responses(route.method, route.path),
        });
        let public = matches!(
            route.path,
            "/api/v1/openapi.json" | "/metrics" | "/api/v1/login"
        );
        if public {
            op["security"] = json!([]);
        }
        if route.method != "GET" {
            let params = op["parameters"].as_array_mut();
            if let Some(params) = params {
                params.push(json!({
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": false,
                    "schema": {"type": "string"},
                    "description": "A repeated key gets the first answer again; the request is not run twice"
                }));
            }
        }
        entry[route.method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "keeld",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Keel's orchestrator API. Mutating calls on VMs, images and disks answer 202 with an operation."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}
        },
        "paths": paths,
    })
}

pub async fn serve() -> Json<Value> {
    Json(openapi_document())
}
