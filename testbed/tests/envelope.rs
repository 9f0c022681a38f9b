//! Transport and envelope: reason phrases, error bodies, 501s, body formats, parameter merging, auth.

mod common;

use std::time::{Duration, Instant};

use common::{TOKEN_HEADER, api, config, send};
use fediversity_testbed::Simulator;

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test]
async fn errors_carry_the_message_as_reason_phrase_and_in_the_body() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = api(sim.addr(), "GET", "/nodes/pve/qemu/4242/config", &[]).await;
    assert_eq!(a.status, 500);
    let message = "Configuration file 'nodes/pve/qemu-server/4242.conf' does not exist";
    assert_eq!(a.reason, message);
    assert_eq!(a.body["message"], format!("{message}\n"));
    assert!(a.body["data"].is_null());
    assert_eq!(a.headers["server"], "pve-api-daemon/3.0");
    assert_eq!(a.headers["connection"], "close", "pveproxy closes after an error");
}

#[tokio::test]
async fn success_is_wrapped_in_data() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = api(sim.addr(), "GET", "/version", &[]).await;
    assert_eq!((a.status, a.reason.as_str()), (200, "OK"));
    assert_eq!(a.data()["version"], "9.1.3");
    assert_eq!(a.headers["content-type"], "application/json;charset=UTF-8");
}

#[tokio::test]
async fn unknown_routes_get_501_method_not_implemented() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = api(sim.addr(), "GET", "/nodes/pve/qemu/100/foo", &[]).await;
    assert_eq!(a.status, 501);
    assert_eq!(a.reason, "Method 'GET /nodes/pve/qemu/100/foo' not implemented");
    let a = api(sim.addr(), "PUT", "/version", &[]).await;
    assert_eq!(a.reason, "Method 'PUT /version' not implemented");
    let a = send(sim.addr(), "GET", "/somewhere", &[], None).await;
    assert_eq!((a.status, a.reason.as_str()), (501, "no such uri"));
}

#[tokio::test]
async fn bad_parameters_give_400_with_per_parameter_errors() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = api(
        sim.addr(),
        "POST",
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "abc")],
    )
    .await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (400, "Parameter verification failed.")
    );
    assert_eq!(a.error("newid"), "type check ('integer') failed - got 'abc'");
    let a = api(
        sim.addr(),
        "POST",
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "99")],
    )
    .await;
    assert_eq!(a.error("newid"), "value must have a minimum value of 100");
    let a = api(sim.addr(), "GET", "/cluster/resources", &[("type", "pool")]).await;
    assert_eq!(
        a.error("type"),
        "value 'pool' does not have a value in the enumeration 'vm, storage, node, sdn'"
    );
    let a = api(sim.addr(), "GET", "/nodes/pve/qemu/abc/config", &[]).await;
    assert_eq!(a.error("vmid"), "type check ('integer') failed - got 'abc'");
    let a = api(
        sim.addr(),
        "POST",
        "/nodes/pve/qemu/9000/config",
        &[("name", "not_a_dns_name")],
    )
    .await;
    assert_eq!(
        a.error("name"),
        "invalid format - value does not look like a valid DNS name\n"
    );
}

#[tokio::test]
async fn json_bodies_are_accepted_like_form_bodies() {
    let sim = Simulator::start(config()).await.unwrap();
    let body = r#"{"newid": 123, "name": "from-json", "full": false}"#.to_string();
    let path = "/api2/json/nodes/pve/qemu/9000/clone";
    let a = send(
        sim.addr(),
        "POST",
        path,
        &[("authorization", TOKEN_HEADER)],
        Some(("application/json", body)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let exit = common::wait_task(sim.addr(), a.data().as_str().unwrap()).await;
    assert_eq!(exit, "OK");
    assert_eq!(sim.vm(123).unwrap().name.as_deref(), Some("from-json"));
}

#[tokio::test]
async fn query_parameters_override_body_parameters() {
    let sim = Simulator::start(config()).await.unwrap();
    let path = "/api2/json/nodes/pve/qemu/9000/clone?name=from-query";
    let body = "newid=124&name=from-body".to_string();
    let a = send(
        sim.addr(),
        "POST",
        path,
        &[("authorization", TOKEN_HEADER)],
        Some((FORM, body)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    common::wait_task(sim.addr(), a.data().as_str().unwrap()).await;
    assert_eq!(sim.vm(124).unwrap().name.as_deref(), Some("from-query"));
}

#[tokio::test]
async fn a_body_parameter_conflicting_with_the_path_is_refused() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = api(
        sim.addr(),
        "POST",
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "150"), ("vmid", "9001")],
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.error("vmid"),
        "duplicate parameter (already defined in URI) with conflicting values!"
    );
}

#[tokio::test]
async fn a_body_on_a_get_is_not_implemented() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = send(
        sim.addr(),
        "GET",
        "/api2/json/version",
        &[("authorization", TOKEN_HEADER)],
        Some((FORM, "x=1".into())),
    )
    .await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (501, "Unexpected content for method 'GET'")
    );
}

#[tokio::test]
async fn unauthenticated_calls_get_an_empty_401_no_ticket() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = send(sim.addr(), "GET", "/api2/json/version", &[], None).await;
    assert_eq!((a.status, a.reason.as_str()), (401, "No ticket"));
    assert!(a.raw.is_empty(), "401 bodies are empty");
    let a = send(
        sim.addr(),
        "GET",
        "/api2/json/version",
        &[("authorization", "PVEAPIToken=ci@pve!tests=wrong")],
        None,
    )
    .await;
    assert_eq!((a.status, a.reason.as_str()), (401, "Authentication failed!"));
    let spaced = TOKEN_HEADER.replacen('=', " ", 1);
    let a = send(
        sim.addr(),
        "GET",
        "/api2/json/version",
        &[("authorization", &spaced)],
        None,
    )
    .await;
    assert_eq!(
        a.status, 200,
        "`PVEAPIToken USER!ID=SECRET` with a space also parses"
    );
    assert_eq!(sim.stats().auth_failures, 2);
}

#[tokio::test]
async fn a_ticket_works_and_writes_need_the_csrf_token() {
    let sim = Simulator::start(config()).await.unwrap();
    let login = send(
        sim.addr(),
        "POST",
        "/api2/json/access/ticket",
        &[],
        Some((FORM, "username=root@pam&password=rootpw".into())),
    )
    .await;
    assert_eq!(login.status, 200);
    let ticket = login.data()["ticket"].as_str().unwrap().to_string();
    let csrf = login.data()["CSRFPreventionToken"].as_str().unwrap().to_string();
    assert!(
        ticket.starts_with("PVE:root@pam:") && ticket.contains("::"),
        "{ticket}"
    );
    assert_eq!(csrf.split(':').next().unwrap().len(), 8);
    let cookie = format!("PVEAuthCookie={}", ticket.replace(':', "%3A"));
    let a = send(
        sim.addr(),
        "GET",
        "/api2/json/cluster/nextid",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    let path = "/api2/json/nodes/pve/qemu/9000/clone";
    let a = send(
        sim.addr(),
        "POST",
        path,
        &[("cookie", &cookie)],
        Some((FORM, "newid=130".into())),
    )
    .await;
    assert_eq!(
        (a.status, a.reason.as_str()),
        (401, "Permission denied - invalid csrf token")
    );
    let a = send(
        sim.addr(),
        "POST",
        path,
        &[("cookie", &cookie), ("csrfpreventiontoken", &csrf)],
        Some((FORM, "newid=130".into())),
    )
    .await;
    assert_eq!(a.status, 200);
    let upid = a.data().as_str().unwrap();
    assert!(upid.ends_with(":root@pam:"), "{upid}");
}

#[tokio::test]
async fn a_bad_login_is_an_authentication_failure() {
    let sim = Simulator::start(config()).await.unwrap();
    let a = send(
        sim.addr(),
        "POST",
        "/api2/json/access/ticket",
        &[],
        Some((FORM, "username=root&realm=pam&password=nope".into())),
    )
    .await;
    assert_eq!((a.status, a.reason.as_str()), (401, "authentication failure"));
    let a = send(
        sim.addr(),
        "POST",
        "/api2/json/access/ticket",
        &[],
        Some((FORM, "username=root&realm=pam&password=rootpw".into())),
    )
    .await;
    assert_eq!(a.data()["username"], "root@pam", "username + realm log in");
}

#[tokio::test]
async fn failed_auth_is_delayed_by_the_scaled_three_seconds() {
    let sim = Simulator::start(config().latency_scale(0.05)).await.unwrap();
    let started = Instant::now();
    let a = send(sim.addr(), "GET", "/api2/json/version", &[], None).await;
    assert_eq!(a.status, 401);
    assert!(started.elapsed() >= Duration::from_millis(150), "3 s × 0.05");
    let started = Instant::now();
    api(sim.addr(), "GET", "/version", &[]).await;
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "authenticated calls are not delayed"
    );
}

/// Method, path and optional `(content type, body)` of a hostile request.
type Case = (&'static str, String, Option<(&'static str, String)>);

#[tokio::test]
async fn malformed_requests_get_proxmox_style_errors_and_never_break_the_server() {
    let sim = Simulator::start(config()).await.unwrap();
    let auth = [("authorization", TOKEN_HEADER)];
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api2/json/nodes/pve/qemu/9000/clone".into(),
            Some(("application/json", "{not json".into())),
        ),
        (
            "POST",
            "/api2/json/nodes/pve/qemu/9000/clone".into(),
            Some(("application/json", "[1,2]".into())),
        ),
        (
            "POST",
            "/api2/json/nodes/pve/qemu/9000/clone".into(),
            Some(("application/json", r#"{"newid":{"a":1}}"#.into())),
        ),
        (
            "POST",
            "/api2/json/nodes/pve/qemu/9000/clone".into(),
            Some((FORM, "newid=%FF%FE&name=%".into())),
        ),
        (
            "POST",
            "/api2/json/nodes/pve/qemu/9000/clone".into(),
            Some((FORM, "x".repeat(100_000))),
        ),
        ("GET", "/api2/json/nodes/p%C3%BCve/qemu".into(), None),
        (
            "GET",
            "/api2/json/nodes/pve/qemu/99999999999999999999/config".into(),
            None,
        ),
        (
            "GET",
            "/api2/json/nodes/pve/tasks/UPID%3Apve%3A/status".into(),
            None,
        ),
        (
            "PUT",
            "/api2/json/nodes/pve/qemu/9000/config".into(),
            Some((FORM, "net0=virtio%3DZZ,bridge=vmbr0".into())),
        ),
        (
            "PUT",
            "/api2/json/nodes/pve/qemu/9000/config".into(),
            Some((FORM, "scsi99=local-lvm:1".into())),
        ),
        (
            "PUT",
            "/api2/json/nodes/pve/qemu/9000/resize".into(),
            Some((FORM, "disk=scsi0&size=-1G".into())),
        ),
        ("GET", "/api2/json/../../etc/passwd".into(), None),
    ];
    for (method, path, body) in cases {
        let a = send(sim.addr(), method, &path, &auth, body).await;
        assert!((400..=599).contains(&a.status), "{method} {path}: {}", a.status);
        assert!(!a.reason.is_empty(), "{method} {path} has a reason phrase");
        if a.status != 413 {
            assert!(a.body.get("message").is_some(), "{method} {path}: {}", a.body);
        }
    }
    assert_eq!(
        api(sim.addr(), "GET", "/version", &[]).await.status,
        200,
        "still serving"
    );
}
