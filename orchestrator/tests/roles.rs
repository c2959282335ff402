//! Every endpoint × every kind of caller: a system admin, a project
//! operator, a project viewer, a user of another project, and no token.

mod common;

use common::Keeld;
use keel_api::keeld_client::KeeldClient;
use serde_json::{Value, json};

/// What a caller should get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Any 2xx.
    Ok,
    /// A state error after the permission check passed.
    Conflict,
    Denied,
    Hidden,
    Unauthenticated,
}

use Want::*;

fn matches(want: Want, status: u16) -> bool {
    match want {
        Ok => (200..300).contains(&status),
        Conflict => status == 409,
        Denied => status == 403,
        Hidden => status == 404,
        Unauthenticated => status == 401,
    }
}

struct Callers {
    admin: KeeldClient,
    operator: KeeldClient,
    viewer: KeeldClient,
    stranger: KeeldClient,
    anon: KeeldClient,
}

/// A resource made fresh for each caller, so that a destructive call by
/// one does not change what the next one sees.
enum Fresh {
    None,
    StoppedVm,
    Disk,
    Image,
}

fn fresh(k: &Keeld, what: &Fresh, n: usize) -> String {
    match what {
        Fresh::None => String::new(),
        Fresh::StoppedVm => k.create_vm(&k.admin, json!({"name": format!("f{n}"), "image": "tiny", "vcpus": 1, "memory_mib": 64, "start": false}))["id"]
            .as_str()
            .unwrap()
            .to_string(),
        Fresh::Disk => {
            let r = k.admin.post("/api/v1/disks", &json!({"name": format!("fd{n}"), "size_gib": 1})).unwrap();
            r["disk"]["id"].as_str().unwrap().to_string()
        }
        Fresh::Image => k.tiny_image(&format!("fi{n}"))["id"].as_str().unwrap().to_string(),
    }
}

#[test]
fn every_endpoint_for_every_role() {
    let k = Keeld::start("roles");
    k.admin
        .post("/api/v1/projects", &json!({"name": "other"}))
        .unwrap();
    let c = Callers {
        admin: k.admin.clone(),
        operator: k.user("op", "default", "operator"),
        viewer: k.user("view", "default", "viewer"),
        stranger: k.user("stranger", "other", "admin"),
        anon: k.client(),
    };
    k.admin
        .post(
            "/api/v1/users",
            &json!({"name": "extra", "password": "password-1"}),
        )
        .unwrap();
    k.tiny_image("tiny");
    let vm = k.create_vm(
        &k.admin,
        json!({"name": "v1", "image": "tiny", "vcpus": 1, "memory_mib": 64, "start": false}),
    );
    let vm = vm["id"].as_str().unwrap().to_string();
    let r = k
        .admin
        .post("/api/v1/disks", &json!({"name": "d1", "size_gib": 1}))
        .unwrap();
    let disk = r["disk"]["id"].as_str().unwrap().to_string();

    // (method, path, body, fresh resource for {f}, [admin, operator, viewer, stranger, anon])
    let table: Vec<(&str, String, Value, Fresh, [Want; 5])> = vec![
        (
            "GET",
            "/api/v1/whoami".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Ok, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/node".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Ok, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/flavors".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Ok, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/flavors".into(),
            json!({"name": "x{n}", "vcpus": 1, "memory_mib": 512}),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "DELETE",
            "/api/v1/flavors/8c16g".into(),
            json!(null),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/users".into(),
            json!(null),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/users".into(),
            json!({"name": "u{n}", "password": "password-2"}),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/projects".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Ok, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/projects".into(),
            json!({"name": "p{n}"}),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "PUT",
            "/api/v1/projects/default/members/extra".into(),
            json!({"role": "viewer"}),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "PUT",
            "/api/v1/projects/other/members/extra".into(),
            json!({"role": "viewer"}),
            Fresh::None,
            [Ok, Denied, Denied, Ok, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/projects/default/quota".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Denied, Unauthenticated],
        ),
        (
            "PUT",
            "/api/v1/projects/default/quota".into(),
            json!({}),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "PUT",
            "/api/v1/users/extra/password".into(),
            json!({"password": "New-password-{n}", "must_change": false}),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/console/ticket"),
            json!(null),
            Fresh::None,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/audit".into(),
            json!(null),
            Fresh::None,
            [Ok, Denied, Denied, Denied, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/tokens".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Ok, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/tokens".into(),
            json!({"name": "script"}),
            Fresh::None,
            [Ok, Ok, Ok, Ok, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/operations".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Denied, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/images".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Denied, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/images/tiny".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/images".into(),
            json!({"name": "up{n}", "source": {"upload": true}}),
            Fresh::None,
            [Ok, Ok, Denied, Denied, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/images/{f}/share".into(),
            json!({"projects": []}),
            Fresh::Image,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "DELETE",
            "/api/v1/images/{f}".into(),
            json!(null),
            Fresh::Image,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/disks".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Denied, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/disks".into(),
            json!({"name": "nd{n}", "size_gib": 1}),
            Fresh::None,
            [Ok, Ok, Denied, Denied, Unauthenticated],
        ),
        (
            "GET",
            format!("/api/v1/disks/{disk}"),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/disks/{f}/resize".into(),
            json!({"size_gib": 2}),
            Fresh::Disk,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/disks/{f}/clone".into(),
            json!({"name": "cl{n}"}),
            Fresh::Disk,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/disks/{f}/attach".into(),
            json!({"vm": vm}),
            Fresh::Disk,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/disks/{disk}/detach"),
            json!(null),
            Fresh::None,
            [Conflict, Conflict, Denied, Hidden, Unauthenticated],
        ),
        (
            "DELETE",
            "/api/v1/disks/{f}".into(),
            json!(null),
            Fresh::Disk,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/vms".into(),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Denied, Unauthenticated],
        ),
        (
            "GET",
            "/api/v1/vms?project=other".into(),
            json!(null),
            Fresh::None,
            [Ok, Denied, Denied, Ok, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/vms".into(),
            json!({"name": "n{n}", "image": "tiny", "vcpus": 1, "memory_mib": 64, "start": false}),
            Fresh::None,
            [Ok, Ok, Denied, Denied, Unauthenticated],
        ),
        (
            "GET",
            format!("/api/v1/vms/{vm}"),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Hidden, Unauthenticated],
        ),
        (
            "GET",
            format!("/api/v1/vms/{vm}/events"),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Hidden, Unauthenticated],
        ),
        (
            "GET",
            format!("/api/v1/vms/{vm}/serial"),
            json!(null),
            Fresh::None,
            [Ok, Ok, Ok, Hidden, Unauthenticated],
        ),
        (
            "PATCH",
            format!("/api/v1/vms/{vm}"),
            json!({"description": "d"}),
            Fresh::None,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/vms/{f}/start".into(),
            json!(null),
            Fresh::StoppedVm,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/stop"),
            json!(null),
            Fresh::None,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/force-off"),
            json!(null),
            Fresh::None,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/reboot"),
            json!(null),
            Fresh::None,
            [Conflict, Conflict, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/pause"),
            json!(null),
            Fresh::None,
            [Conflict, Conflict, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/resume"),
            json!(null),
            Fresh::None,
            [Conflict, Conflict, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/resize"),
            json!({"vcpus": 1, "memory_mib": 128}),
            Fresh::None,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/vms/{f}/image".into(),
            json!({"name": "im{n}"}),
            Fresh::StoppedVm,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/vms/batch".into(),
            json!({"action": "stop", "vms": [vm]}),
            Fresh::None,
            [Ok, Ok, Ok, Ok, Unauthenticated],
        ),
        (
            "DELETE",
            "/api/v1/vms/{f}".into(),
            json!(null),
            Fresh::StoppedVm,
            [Ok, Ok, Denied, Hidden, Unauthenticated],
        ),
        (
            "POST",
            "/api/v1/vms/{f}/restore".into(),
            json!(null),
            Fresh::StoppedVm,
            [Conflict, Conflict, Denied, Hidden, Unauthenticated],
        ),
    ];
    let callers = [
        ("admin", &c.admin),
        ("operator", &c.operator),
        ("viewer", &c.viewer),
        ("stranger", &c.stranger),
        ("anon", &c.anon),
    ];
    let mut n = 0;
    let mut failures = Vec::new();
    for (method, path, body, fresh_kind, wants) in &table {
        for (i, (who, client)) in callers.iter().enumerate() {
            n += 1;
            let f = fresh(&k, fresh_kind, n);
            let path = path.replace("{f}", &f);
            let body = (!body.is_null()).then(|| {
                serde_json::from_str::<Value>(&body.to_string().replace("{n}", &n.to_string()))
                    .unwrap()
            });
            let r = client.send(method, &path, body.as_ref(), &[]).unwrap();
            if !matches(wants[i], r.status) {
                failures.push(format!(
                    "{method} {path} as {who}: {} (wanted {:?}): {}",
                    r.status, wants[i], r.text
                ));
            }
            // Let a started operation end before the next caller.
            if let Some(op) = r.body["operation"]["id"].as_str() {
                let _ = k.admin.get(&format!("/api/v1/operations/{op}?wait=30"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} calls:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Batch as a viewer: accepted, but each VM refused inside.
    let r = c
        .viewer
        .post("/api/v1/vms/batch", &json!({"action": "stop", "vms": [vm]}))
        .unwrap();
    assert_eq!(r["results"][0]["status"], 403, "{r}");
    // Every one of those calls is in the audit log, with who made it.
    let audit = k.admin.get("/api/v1/audit?limit=10000").unwrap();
    let entries = audit.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["user"] == "view" && e["status"] == 403)
    );
    assert!(
        entries
            .iter()
            .any(|e| e["user"] == "-" && e["status"] == 401)
    );
    assert!(entries.iter().all(|e| e["source"] == "127.0.0.1"));
}
