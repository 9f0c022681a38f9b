//! Conformance with the official schema: the committed route table, served routes, required and unknown
//! parameters, and returned keys.

mod common;

use std::path::PathBuf;

use common::{TEMPLATE, api, clone_template, config};
use fediversity_testbed::Simulator;
use fediversity_testbed::schema::{ROUTE_TABLE, ROUTE_TABLE_JSON, derive_table};

/// Where the official schema is: `$PVE_API_SCHEMA`, or `shared/reference/` beside the repository.
fn official_schema() -> PathBuf {
    std::env::var_os("PVE_API_SCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/pve-api-subset.json")
        })
}

#[test]
fn committed_route_table_is_in_sync_with_the_official_schema() {
    let path = official_schema();
    let Ok(text) = std::fs::read_to_string(&path) else {
        assert!(
            std::env::var("CI").is_err(),
            "the official schema is missing at {} (CI has shared/ beside the repository)",
            path.display()
        );
        eprintln!(
            "official schema not found at {}; only the committed table is checked",
            path.display()
        );
        return;
    };
    let schema: serde_json::Value = serde_json::from_str(&text).expect("the official schema is JSON");
    let derived = derive_table(&schema)
        .expect("the schema has the expected shape")
        .to_committed_json();
    if std::env::var_os("PVE_SIM_REGENERATE").is_some() {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema/pve-routes.json");
        std::fs::write(out, &derived).expect("write the table");
        return;
    }
    assert!(
        derived == ROUTE_TABLE_JSON,
        "testbed/schema/pve-routes.json is stale: run PVE_SIM_REGENERATE=1 cargo test -p fediversity-testbed \
         --test conformance committed_route_table"
    );
}

#[test]
fn every_served_route_exists_in_the_official_schema_with_that_method() {
    let served = fediversity_testbed::api::served_routes();
    assert!(served.len() >= 25, "the simulator serves the VM lifecycle");
    for (method, path) in served {
        assert!(
            ROUTE_TABLE.route(method, path).is_some(),
            "{method} {path} is not in the official schema"
        );
    }
}

/// A request for every served route, with valid parameters where they are needed.
fn sample_path(path: &str) -> String {
    path.replace("{node}", "pve").replace("{vmid}", "150").replace(
        "{upid}",
        "UPID:pve:00001234:00ABCDEF:65F0A1B2:qmstart:150:ci@pve!tests:",
    )
}

#[tokio::test]
async fn every_required_parameter_is_enforced() {
    let sim = Simulator::start(config()).await.unwrap();
    let mut checked = 0;
    for (method, path) in fediversity_testbed::api::served_routes() {
        let spec = ROUTE_TABLE.route(method, path).unwrap();
        let required = spec
            .params
            .iter()
            .filter(|(n, p)| !p.optional && !path.contains(&format!("{{{n}}}")));
        for (name, _) in required {
            // Only the path is sent, so every required body or query parameter is missing.
            let a = if path == "/access/ticket" {
                let empty = Some(("application/x-www-form-urlencoded", String::new()));
                common::send(sim.addr(), "POST", "/api2/json/access/ticket", &[], empty).await
            } else {
                api(sim.addr(), method, &sample_path(path), &[]).await
            };
            assert_eq!(
                a.status, 400,
                "{method} {path} without {name}: {} {}",
                a.reason, a.body
            );
            assert_eq!(a.reason, "Parameter verification failed.");
            assert_eq!(
                a.error(name),
                "property is missing and it is not optional",
                "{method} {path}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 6,
        "clone newid, create vmid, resize disk+size, ticket username+password"
    );
}

#[tokio::test]
async fn unknown_parameters_are_rejected_as_proxmox_does() {
    let sim = Simulator::start(config()).await.unwrap();
    for (method, path) in fediversity_testbed::api::served_routes() {
        let a = api(sim.addr(), method, &sample_path(path), &[("bogus-param", "1")]).await;
        assert_eq!(a.status, 400, "{method} {path}: {} {}", a.reason, a.body);
        assert_eq!(
            a.error("bogus-param"),
            "property is not defined in schema and the schema does not allow additional properties",
            "{method} {path}"
        );
    }
}

/// Keys the real API returns although the schema does not list them (documented in proxmox-api.md).
const UNDOCUMENTED_KEYS: &[(&str, &[&str])] = &[
    ("/nodes", &["id", "type", "disk", "maxdisk"]),
    ("/nodes/{node}/tasks/{upid}/status", &["tokenid"]),
    (
        "/nodes/{node}/status",
        &["uptime", "kversion", "swap", "ksm", "idle", "wait"],
    ),
    ("/nodes/{node}/tasks", &["tokenid"]),
];

#[tokio::test]
async fn returned_keys_are_ones_the_schema_lists() {
    let sim = Simulator::start(config().foreign_vm(300)).await.unwrap();
    clone_template(sim.addr(), 150, "web").await;
    let upid = api(sim.addr(), "POST", "/nodes/pve/qemu/150/status/start", &[])
        .await
        .data()
        .as_str()
        .unwrap()
        .to_string();
    common::wait_task(sim.addr(), &upid).await;
    let gets = [
        ("/version".to_string(), "/version"),
        ("/nodes".into(), "/nodes"),
        ("/cluster/resources".into(), "/cluster/resources"),
        ("/cluster/status".into(), "/cluster/status"),
        ("/nodes/pve/status".into(), "/nodes/{node}/status"),
        ("/nodes/pve/storage".into(), "/nodes/{node}/storage"),
        ("/nodes/pve/qemu".into(), "/nodes/{node}/qemu"),
        (
            format!("/nodes/pve/qemu/{TEMPLATE}/config"),
            "/nodes/{node}/qemu/{vmid}/config",
        ),
        (
            "/nodes/pve/qemu/150/status/current".into(),
            "/nodes/{node}/qemu/{vmid}/status/current",
        ),
        (
            "/nodes/pve/qemu/150/pending".into(),
            "/nodes/{node}/qemu/{vmid}/pending",
        ),
        (
            "/nodes/pve/qemu/150/cloudinit".into(),
            "/nodes/{node}/qemu/{vmid}/cloudinit",
        ),
        (
            format!("/nodes/pve/tasks/{upid}/status"),
            "/nodes/{node}/tasks/{upid}/status",
        ),
        ("/nodes/pve/tasks".into(), "/nodes/{node}/tasks"),
        (
            format!("/nodes/pve/tasks/{upid}/log"),
            "/nodes/{node}/tasks/{upid}/log",
        ),
    ];
    for (path, template) in gets {
        let spec = ROUTE_TABLE.route("GET", template).unwrap();
        let a = api(sim.addr(), "GET", &path, &[]).await;
        assert_eq!(a.status, 200, "GET {path}: {}", a.body);
        let extra: &[&str] = UNDOCUMENTED_KEYS
            .iter()
            .find(|(p, _)| *p == template)
            .map_or(&[], |(_, k)| k);
        let items: Vec<&serde_json::Value> = match a.data() {
            serde_json::Value::Array(list) => list.iter().collect(),
            other => vec![other],
        };
        assert!(!items.is_empty(), "GET {path} returned nothing");
        for item in items {
            for key in item.as_object().expect("objects").keys() {
                let known = spec
                    .return_keys
                    .iter()
                    .any(|k| k == key || k.strip_suffix("[n]").is_some_and(|b| key.starts_with(b)));
                assert!(
                    known || extra.contains(&key.as_str()),
                    "GET {template} returns '{key}', not in the schema"
                );
            }
        }
    }
}
