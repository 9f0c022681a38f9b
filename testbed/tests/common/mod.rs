//! A minimal HTTP client for the simulator's tests: one connection per request, reason phrase kept.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::Value;

/// The token every test cluster accepts.
pub const TOKEN_ID: &str = "ci@pve!tests";
/// Its secret.
pub const TOKEN_SECRET: &str = "5ae1ec7e-0000-4000-8000-000000000001";
/// The `Authorization` header value for that token.
pub const TOKEN_HEADER: &str = "PVEAPIToken=ci@pve!tests=5ae1ec7e-0000-4000-8000-000000000001";
/// The template every test cluster has.
pub const TEMPLATE: u32 = 9000;

/// A test cluster: instant latency, one token, root@pam with a password, a template.
pub fn config() -> fediversity_testbed::SimConfig {
    fediversity_testbed::SimConfig::new()
        .token(TOKEN_ID, TOKEN_SECRET)
        .user("root@pam", "rootpw")
        .template(TEMPLATE)
        .latency_scale(0.0)
        .seed(42)
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// The reason phrase as sent.
    pub reason: String,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
    /// The raw body.
    pub raw: Bytes,
    /// Headers.
    pub headers: hyper::HeaderMap,
}

impl Answer {
    /// `body["data"]`.
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// `body["errors"][name]` as a string.
    pub fn error(&self, name: &str) -> &str {
        self.body["errors"][name].as_str().unwrap_or_default()
    }
}

/// Sends one request; `body` is `(content type, text)`.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, String)>,
) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the simulator");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let payload = match body {
        Some((ct, text)) => {
            req = req.header("content-type", ct);
            Bytes::from(text)
        }
        None => Bytes::new(),
    };
    let resp = sender
        .send_request(req.body(Full::new(payload)).expect("request"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let reason = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .unwrap_or_else(|| resp.status().canonical_reason().unwrap_or_default().to_string());
    let headers = resp.headers().clone();
    let raw = resp.into_body().collect().await.expect("body").to_bytes();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Answer {
        status,
        reason,
        body,
        raw,
        headers,
    }
}

/// A request with the test token; `form` is sent form-encoded for POST/PUT and as the query otherwise.
pub async fn api(addr: SocketAddr, method: &str, path: &str, form: &[(&str, &str)]) -> Answer {
    let encoded = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let auth = [("authorization", TOKEN_HEADER)];
    let full = format!("/api2/json{path}");
    if matches!(method, "POST" | "PUT") {
        send(
            addr,
            method,
            &full,
            &auth,
            Some(("application/x-www-form-urlencoded", encoded)),
        )
        .await
    } else if encoded.is_empty() {
        send(addr, method, &full, &auth, None).await
    } else {
        send(addr, method, &format!("{full}?{encoded}"), &auth, None).await
    }
}

/// Polls a task until it stops and returns its exit status.
pub async fn wait_task(addr: SocketAddr, upid: &str) -> String {
    let node = upid.split(':').nth(1).unwrap_or("pve").to_string();
    for _ in 0..2000 {
        let a = api(addr, "GET", &format!("/nodes/{node}/tasks/{upid}/status"), &[]).await;
        if a.data()["status"] == "stopped" {
            return a.data()["exitstatus"].as_str().unwrap_or_default().to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("task {upid} did not stop");
}

/// Calls a task-starting route and waits for the task; returns the exit status.
pub async fn run_task(addr: SocketAddr, method: &str, path: &str, form: &[(&str, &str)]) -> String {
    let a = api(addr, method, path, form).await;
    assert_eq!(a.status, 200, "{method} {path}: {} {}", a.reason, a.body);
    let upid = a.data().as_str().expect("a UPID").to_string();
    wait_task(addr, &upid).await
}

/// Clones the template into `newid` (linked) and waits.
pub async fn clone_template(addr: SocketAddr, newid: u32, name: &str) {
    let id = newid.to_string();
    let exit = run_task(
        addr,
        "POST",
        &format!("/nodes/pve/qemu/{TEMPLATE}/clone"),
        &[("newid", &id), ("name", name)],
    )
    .await;
    assert_eq!(exit, "OK");
}
