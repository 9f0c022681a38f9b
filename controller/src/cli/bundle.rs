//! `fediversity export` and `fediversity import`: moving a Deployment with its data to a provider that
//! runs another controller, through a portable bundle (see [`crate::backup::bundle`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{Client, ClientError};
use crate::api::BackupSpec;
use crate::backup::Repository;
use crate::backup::bundle::{
    self, Bundle, BundleError, DEPLOYMENT_FILE, INDEX_FILE, Index, IndexHost, PASSWORD_FILE, Pinned,
    REPOSITORY_DIR, WorkDir,
};

/// Why an export or an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The daemon refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The bundle or a restic step failed.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Something the move needs is not there.
    #[error("{0}")]
    Refused(String),
}

/// Prints a progress line on stderr with the time since the start.
fn step(started: Instant, text: &str) {
    eprintln!(
        "[{:>6.1}s] {}",
        started.elapsed().as_secs_f64(),
        crate::text::escape(text)
    );
}

fn backup_spec(env: &Value, env_name: &str) -> Result<BackupSpec, MoveError> {
    let spec = &env["spec"]["backup"];
    if spec.is_null() {
        return Err(MoveError::Refused(format!(
            "RuntimeEnvironment {env_name} has no spec.backup: there is no repository to move data through"
        )));
    }
    serde_json::from_value(spec.clone())
        .map_err(|e| MoveError::Refused(format!("RuntimeEnvironment {env_name}: spec.backup: {e}")))
}

fn repository(spec: &BackupSpec) -> Result<Repository, MoveError> {
    Repository::from_spec(spec).map_err(|e| {
        MoveError::Refused(format!(
            "{e} (export and import run on the controller's machine, where the repository's secrets are)"
        ))
    })
}

/// The hosts of `deployment` whose Application declares data: host → (application, databases).
async fn data_hosts(
    client: &Client,
    name: &str,
    deployment: &Value,
) -> Result<BTreeMap<String, (String, Vec<String>)>, MoveError> {
    let mut out = BTreeMap::new();
    let apps = deployment["spec"]["applications"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (app, choice) in apps {
        if choice["enabled"] == false {
            continue;
        }
        let a = client.get(&format!("applications/{app}")).await?;
        let data = &a["spec"]["data"];
        let list = |f: &str| -> Vec<String> {
            data[f]
                .as_array()
                .map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        let (paths, databases) = (list("paths"), list("databases"));
        if !paths.is_empty() || !databases.is_empty() {
            out.insert(format!("{name}-{app}"), (app, databases));
        }
    }
    Ok(out)
}

/// `fediversity export deployment NAME -o DIR [--final]`.
pub async fn export(
    client: &Client,
    name: &str,
    dir: &Path,
    final_snapshot: bool,
    timeout: Duration,
) -> Result<i32, MoveError> {
    let started = Instant::now();
    let deployment = client.get(&format!("deployments/{name}")).await?;
    let env_name = deployment["spec"]["runtimeEnvironment"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let env = client.get(&format!("runtimeenvironments/{env_name}")).await?;
    let repo = repository(&backup_spec(&env, &env_name)?)?;
    let hosts = data_hosts(client, name, &deployment).await?;
    if hosts.is_empty() {
        return Err(MoveError::Refused(format!(
            "Deployment {name} has no application that declares data: there is nothing to export"
        )));
    }
    let portable = bundle::portable_deployment(&deployment).map_err(MoveError::Refused)?;
    bundle::create_dir(dir)?;
    let work = WorkDir::new()?;

    // Each host's snapshot in the provider's repository.
    let mut chosen: BTreeMap<String, String> = BTreeMap::new();
    if final_snapshot {
        step(
            started,
            &format!("stopping the services of Deployment {name} and taking the final backup of each host…"),
        );
        let object = client
            .request_and_wait(
                &format!("deployments/{name}/final-backup?confirm=true"),
                &format!("deployments/{name}"),
                "/status/lastHandledFinalBackupAt",
                Some(timeout),
                &format!("the final backup of Deployment {name}"),
            )
            .await?
            .unwrap_or_default();
        let done = object["status"]["export"]["hosts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for h in &done {
            let host = h["host"].as_str().unwrap_or_default();
            match (h["result"].as_str(), h["snapshot"].as_str()) {
                (Some("Succeeded"), Some(id)) => {
                    chosen.insert(host.to_owned(), id.to_owned());
                }
                _ => {
                    return Err(MoveError::Refused(format!(
                        "the final backup of host {host} failed: {}; its services may be stopped (see `fediversity describe deployment {name}`)",
                        h["message"].as_str().unwrap_or("unknown reason")
                    )));
                }
            }
        }
    }
    step(
        started,
        "listing the Deployment's snapshots in the provider's repository…",
    );
    let listed = bundle::provider_snapshots(&work, &repo, name).await?;
    let mut picked: Vec<&Pinned> = Vec::new();
    for host in hosts.keys() {
        let found = match chosen.get(host) {
            // restic's backup summary gives the short ID.
            Some(id) => listed
                .iter()
                .find(|s| id.len() >= 8 && s.id.starts_with(id.as_str()) && &s.hostname == host),
            None if final_snapshot => None,
            None => listed.iter().rev().find(|s| &s.hostname == host),
        };
        let Some(found) = found else {
            return Err(MoveError::Refused(if final_snapshot {
                format!("host {host} has no final snapshot (is it Ready?); nothing was exported")
            } else {
                format!(
                    "host {host} has no snapshot yet: run `fediversity backup deployment {name} --wait`, or export with --final"
                )
            }));
        };
        picked.push(found);
    }

    let password = bundle::new_password()?;
    bundle::write_file(dir, PASSWORD_FILE, format!("{password}\n").as_bytes(), 0o600)?;
    step(
        started,
        &format!(
            "copying {} snapshot(s) into the bundle's own repository (a new password, not the provider's)…",
            picked.len()
        ),
    );
    let ids: Vec<String> = picked.iter().map(|s| s.id.clone()).collect();
    let copied = bundle::copy_out(
        &work,
        &repo,
        &dir.join(REPOSITORY_DIR),
        &dir.join(PASSWORD_FILE),
        &ids,
    )
    .await?;

    let mut files = BTreeMap::new();
    let mut index_hosts = Vec::new();
    for source in &picked {
        let (application, databases) = hosts[&source.hostname].clone();
        let copy = copied
            .iter()
            .find(|c| c.original() == source.original() && c.hostname == source.hostname)
            .ok_or_else(|| {
                MoveError::Refused(format!(
                    "the bundle's repository has no copy of snapshot {} of host {}",
                    source.id, source.hostname
                ))
            })?;
        let staging = copy
            .paths
            .iter()
            .find(|p| p.ends_with("/staging"))
            .cloned()
            .ok_or_else(|| {
                MoveError::Refused(format!(
                    "snapshot {} of host {} holds no staging folder: it was not taken by this controller",
                    source.id, source.hostname
                ))
            })?;
        step(
            started,
            &format!("reading the manifest of host {}…", copy.hostname),
        );
        let manifest = bundle::manifest_in_snapshot(
            &work,
            &dir.join(REPOSITORY_DIR),
            &dir.join(PASSWORD_FILE),
            &copy.id,
            &staging,
            &databases,
        )
        .await?;
        let rel = format!("{}/{}.json", bundle::MANIFESTS_DIR, copy.hostname);
        let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        bundle::write_file(dir, &rel, &text, 0o644)?;
        files.insert(rel.clone(), bundle::sha256_hex(&text));
        index_hosts.push(IndexHost {
            host: copy.hostname.clone(),
            application,
            snapshot: copy.id.clone(),
            original: copy.original().to_owned(),
            tree: copy.tree.clone(),
            time: copy.time.clone(),
            staging,
            databases,
            manifest: rel,
            files: manifest.files.files(),
            bytes: manifest.files.bytes(),
        });
    }
    let yaml = yaml_serde::to_string(&portable).unwrap_or_default();
    bundle::write_file(dir, DEPLOYMENT_FILE, yaml.as_bytes(), 0o644)?;
    files.insert(DEPLOYMENT_FILE.to_owned(), bundle::sha256_hex(yaml.as_bytes()));
    let config =
        std::fs::read(dir.join(REPOSITORY_DIR).join("config")).map_err(|source| BundleError::Io {
            file: format!("{REPOSITORY_DIR}/config"),
            source,
        })?;
    files.insert(format!("{REPOSITORY_DIR}/config"), bundle::sha256_hex(&config));
    let (index, text) = Index {
        format: bundle::FORMAT,
        deployment: name.to_owned(),
        created_at: crate::api::Timestamp::now().to_string(),
        final_snapshot,
        hosts: index_hosts,
        files,
        checksum: String::new(),
    }
    .seal();
    bundle::write_file(dir, INDEX_FILE, text.as_bytes(), 0o644)?;
    step(started, &format!("bundle written to {}", dir.display()));

    let mut out = format!("Exported Deployment {name} to {}:\n", dir.display());
    for h in &index.hosts {
        out.push_str(&format!(
            "  {}: snapshot {} taken {}, {} files ({} bytes), databases: {}\n",
            h.host,
            &h.snapshot[..8],
            h.time,
            h.files,
            h.bytes,
            if h.databases.is_empty() {
                "none".to_owned()
            } else {
                h.databases.join(", ")
            }
        ));
    }
    out.push_str(&format!(
        "The bundle's repository has its own password in {PASSWORD_FILE} (mode 0600): hand the folder over as a whole, \
as you would the data itself.\n"
    ));
    if final_snapshot {
        out.push_str(&format!(
            "Final: the services of Deployment {name} are stopped on this provider and stay stopped, so nothing is written \
after the snapshot. Set `suspend: true` on the Deployment here until the move is done: a later activation of \
its hosts or a reboot starts them again. To serve from here again instead, start them on each host \
(`systemctl start UNIT…`, the units of each Application's `spec.data.services`) or reboot the hosts.\n"
        ));
    } else {
        out.push_str(
            "Not final: the services still run; what they write after the snapshot is not in the bundle (export with --final for the move itself).\n",
        );
    }
    out.push_str(&format!(
        "At the new provider: `fediversity import {} --environment ENV --wait`.\n",
        dir.display()
    ));
    print!("{}", crate::text::escape(&out));
    Ok(0)
}

/// `fediversity import DIR --environment ENV [--wait]`: refuses a bundle that does not check out before
/// creating anything.
pub async fn import(
    client: &Client,
    writer: &super::write::Writer,
    dir: &Path,
    environment: &str,
    wait: Option<Duration>,
) -> Result<i32, MoveError> {
    let started = Instant::now();
    let refused = |e: BundleError| {
        MoveError::Refused(format!(
            "the bundle in {} is refused: {e}; nothing was created",
            dir.display()
        ))
    };
    let bundle = Bundle::open(dir).map_err(refused)?;
    let name = bundle.index.deployment.clone();
    step(
        started,
        &format!(
            "bundle.json: format {}, Deployment {name}, {} host(s), {} snapshot(s), written {}",
            bundle.index.format,
            bundle.index.hosts.len(),
            if bundle.index.final_snapshot {
                "final"
            } else {
                "not final"
            },
            bundle.index.created_at
        ),
    );
    match client.get(&format!("deployments/{name}")).await {
        Ok(_) => {
            return Err(MoveError::Refused(format!(
                "Deployment {name} already exists on this controller; nothing was imported"
            )));
        }
        Err(ClientError::Api(message)) if message.contains("not found") => {}
        Err(e) => return Err(e.into()),
    }
    let env = client.get(&format!("runtimeenvironments/{environment}")).await?;
    let repo = repository(&backup_spec(&env, environment)?)?;

    // The Deployment as it will be created, checked before anything is copied.
    let snapshot_for = |copies: &[String]| {
        if copies.len() == 1 {
            copies[0].clone()
        } else {
            "latest".to_owned()
        }
    };
    let probe = bundle::placed_deployment(&bundle.deployment, environment, "latest");
    check_object(&probe).map_err(|p| {
        MoveError::Refused(format!(
            "the bundle in {} is refused: {DEPLOYMENT_FILE}: {p}; nothing was created",
            dir.display()
        ))
    })?;

    let work = WorkDir::new()?;
    step(
        started,
        "checking the bundle's repository (restic check --read-data) and each manifest against its snapshot…",
    );
    bundle::verify(&work, &bundle).await.map_err(refused)?;
    step(
        started,
        &format!(
            "copying {} snapshot(s) into the repository of RuntimeEnvironment {environment}…",
            bundle.index.hosts.len()
        ),
    );
    let copied = bundle::copy_in(&work, &repo, &bundle).await?;
    let mut ids = Vec::new();
    for h in &bundle.index.hosts {
        let Some(copy) = copied
            .iter()
            .find(|c| c.original() == h.original && c.hostname == h.host && c.tree == h.tree)
        else {
            return Err(MoveError::Refused(format!(
                "the repository of RuntimeEnvironment {environment} shows no copy of snapshot {} of host {}",
                &h.snapshot[..8],
                h.host
            )));
        };
        // `latest` must be the bundle's snapshot on every host.
        if let Some(newer) = copied
            .iter()
            .find(|c| c.hostname == h.host && c.time > copy.time && c.id != copy.id)
            && bundle.index.hosts.len() > 1
        {
            return Err(MoveError::Refused(format!(
                "the repository of RuntimeEnvironment {environment} holds a newer snapshot {} of host {}: \
remove it (restic forget) or import into another environment",
                &newer.id[..8],
                h.host
            )));
        }
        ids.push(copy.id.clone());
    }
    let placed = bundle::placed_deployment(&bundle.deployment, environment, &snapshot_for(&ids));
    let yaml = yaml_serde::to_string(&placed).unwrap_or_default();
    let (out, code) = match writer.apply(&format!("import-{name}.yaml"), yaml).await {
        Ok(answer) => answer,
        Err(e) => {
            return Err(MoveError::Refused(format!(
                "the snapshots were copied into the repository of RuntimeEnvironment {environment}, but the Deployment \
was not created: {e}; run the import again once that is fixed (snapshots already there are not copied twice)"
            )));
        }
    };
    print!("{}", crate::text::escape(&out));
    if code != 0 {
        return Ok(code);
    }
    println!(
        "Deployment {name} created on RuntimeEnvironment {environment} with spec.restore: its hosts start with their \
services held until each is restored from the bundle's snapshot and verified against its manifest."
    );
    let Some(timeout) = wait else {
        println!("Follow it with `fediversity describe deployment {name}`.");
        return Ok(0);
    };
    step(
        started,
        "waiting for the hosts to be restored, verified and Ready…",
    );
    let deadline = Instant::now() + timeout;
    loop {
        let object = client.get(&format!("deployments/{name}")).await?;
        let restored = &object["status"]["restore"]["hosts"];
        let entry = |host: &str| {
            restored
                .as_array()
                .and_then(|a| a.iter().find(|e| e["host"] == host))
                .cloned()
        };
        let all_restored = bundle
            .index
            .hosts
            .iter()
            .all(|h| entry(&h.host).is_some_and(|e| e["result"] == "Restored" && e["verified"] == true));
        let ready = super::output::condition(&object, "Ready").is_some_and(|c| c["status"] == "True");
        if all_restored && ready {
            for h in &bundle.index.hosts {
                let m = &bundle.manifests[&h.host];
                println!(
                    "{}: restored from snapshot {} taken {}, verified against the bundle's manifest ({} files, {} database(s))",
                    h.host,
                    &h.snapshot[..8],
                    h.time,
                    m.files.files(),
                    m.databases.len()
                );
            }
            println!(
                "Deployment {name} is Ready. Now change the DNS records at your domain to this provider's \
(`fediversity describe deployment {name}` lists them under \"Set at your domain\")."
            );
            return Ok(0);
        }
        if Instant::now() >= deadline {
            for h in &bundle.index.hosts {
                let e = entry(&h.host).unwrap_or(Value::Null);
                println!(
                    "{}: {} {}",
                    h.host,
                    e["result"].as_str().unwrap_or("not restored yet"),
                    crate::text::escape(e["message"].as_str().unwrap_or_default())
                );
            }
            eprintln!(
                "error: Deployment {name} was not restored, verified and Ready within {}s",
                timeout.as_secs()
            );
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Checks an object as the daemon would read it (every problem, joined).
fn check_object(object: &Value) -> Result<(), String> {
    let text = yaml_serde::to_string(object).map_err(|e| e.to_string())?;
    let docs =
        crate::yaml::parse_documents(&text, &crate::yaml::Limits::default()).map_err(|e| e.to_string())?;
    let Some((_, root)) = docs.first() else {
        return Err("empty".into());
    };
    crate::api::parse_object(root).map(drop).map_err(|problems| {
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}
