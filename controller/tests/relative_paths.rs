//! Every path flag may be relative to the folder the daemon starts in: a folder source, a git source's
//! state directory, the API token file, all at once.

mod common;
mod sources_support;

use std::io::{Read, Write};
use std::time::Duration;

use common::wait_ready;
use fediversity::fixtures;
use sources_support::{Repo, api, cli, ready, source, wait_for};

/// POSTs `body` with a bearer token over a raw socket; returns the status code.
fn post(server: &str, path: &str, token: &str, body: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(server).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {server}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/yaml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn relative_paths_work_for_folder_git_and_api_sources_alike() {
    let (repo, commit) = Repo::with_examples();
    let cwd = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cwd.path().join("objects")).unwrap();
    std::fs::write(
        cwd.path().join("objects/d.yaml"),
        fixtures::deployment_yaml("from-folder", "env", 1),
    )
    .unwrap();
    std::fs::write(cwd.path().join("token"), "relative-token\n").unwrap();
    let args: Vec<std::ffi::OsString> = [
        "--source",
        "./objects",
        "--source",
        &repo.url(),
        "--state-dir",
        "./state",
        "--api-token-file",
        "token",
        "--provider",
        "plan-only",
    ]
    .map(Into::into)
    .to_vec();
    let daemon = common::spawn_in(cwd.path(), &args);
    wait_ready(&daemon, Duration::from_secs(30));

    // Readiness does not wait for every source's first fetch: wait for the git source's.
    let git = common::wait_for("the git source's first fetch", Duration::from_secs(30), || {
        let git = source(&daemon, "remote");
        (!git["lastFetchTime"].is_null()).then_some(git)
    });
    assert!(git["lastError"].is_null(), "{git}");
    assert_eq!(git["revision"], commit.as_str(), "{git}");
    let folder = source(&daemon, "objects");
    assert!(folder["lastError"].is_null(), "{folder}");
    assert_eq!(folder["objects"], 1, "{folder}");
    assert!(
        cwd.path().join("state/sources/remote").is_dir(),
        "the git cache lies under the relative state directory"
    );

    let code = post(
        &daemon.server,
        "/api/v1/apply",
        "relative-token",
        &fixtures::deployment_yaml("from-api", "env", 1),
    );
    assert_eq!(code, 200, "the relative token file is read");
    assert_eq!(
        api(&daemon, "deployments/from-api")["metadata"]["name"],
        "from-api"
    );
    let (code, table) = cli(&daemon, &["get", "sources"]);
    assert_eq!(code, 0, "{table}");
    assert!(table.contains("remote") && table.contains("objects"), "{table}");
    wait_for(
        "a status on the folder's Deployment",
        Duration::from_secs(10),
        || ready(&api(&daemon, "deployments/from-folder")),
    );
}
