//! The `fediversity` command line: argument parsing and one module per group of subcommands.

mod bundle;
mod client;
#[cfg(feature = "demo")]
mod demo;
mod output;
mod remote;
mod store;
mod validate;
mod write;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::Kind;
pub use crate::api::parse_duration;
pub use crate::http::DEFAULT_LISTEN;
pub use output::Format;
pub use remote::Target;
pub use write::ReconcileTarget;

/// The Fediversity controller: hosts Fediverse applications declaratively on Proxmox VE and NixOS.
#[derive(Debug, Parser)]
#[command(name = "fediversity", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where a remote subcommand finds the daemon.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The daemon's address.
    #[arg(long, env = "FEDIVERSITY_SERVER", default_value = DEFAULT_LISTEN, global = true)]
    pub server: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the controller daemon: watches the sources and reconciles until stopped (SIGTERM drains).
    Run(Box<crate::daemon::RunArgs>),
    /// Runs the quickstart against a simulated Proxmox VE cluster and simulated NixOS hosts, shows the
    /// progress, and exits once everything is Ready. Touches nothing real.
    #[cfg(feature = "demo")]
    Demo(Box<demo::DemoArgs>),
    /// Checks YAML files or folders of objects; prints every problem; exits 1 if there is any.
    Validate {
        /// Files or folders (searched recursively for *.yaml and *.yml; hidden ones are skipped).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Prints nothing when everything is valid.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Prints the one-time password of the operator's first account on a host, once: it is read over
    /// SSH (the controller's key, the host key the controller pinned) and deleted on the host. Give it
    /// to the operator, who changes it at first login.
    FirstPassword(Box<FirstPasswordArgs>),
    /// Works on the controller's store: `copy` moves an installation to etcd (or back).
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Prints the Kubernetes CustomResourceDefinitions of the three kinds, or writes one file per kind.
    Crds {
        /// Writes `fediversity.eu_<plural>.yaml` files into this folder instead of printing.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Prints the JSON Schema of a kind's objects.
    Schema {
        /// RuntimeEnvironment, Application or Deployment (plural and short names work too).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
    },
    /// Lists objects of a kind (or hosts) from a running daemon, or shows one.
    Get {
        /// deployments (deploy), applications (app), runtimeenvironments (renv), hosts, sources, or
        /// backups (the last backup of each host; NAME is then a Deployment).
        #[arg(value_parser = parse_target)]
        kind: Target,
        /// One object's name.
        name: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Shows one object in detail: spec, conditions, hosts and events.
    Describe {
        /// The kind.
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The name.
        name: String,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Lists recent events, of every object or of one.
    Events {
        /// The kind (with NAME).
        #[arg(value_parser = parse_kind, requires = "name")]
        kind: Option<Kind>,
        /// The name.
        name: Option<String>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Asks the daemon to reconcile an object now.
    Reconcile {
        /// The kind, or `source` to fetch a source now.
        #[arg(value_parser = parse_reconcile_target)]
        kind: ReconcileTarget,
        /// The name.
        name: String,
        /// Waits until the reconcile was handled; exits 1 if the object ended not Ready.
        #[arg(long)]
        wait: bool,
        /// Fetches the object's source first and waits for it, so the object reflects its newest commit.
        #[arg(long)]
        with_source: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        /// The file holding the API token (needed when the daemon has one).
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Backs up a Deployment's hosts now (its RuntimeEnvironment needs `spec.backup`).
    Backup {
        /// `deployment` (the only kind that is backed up).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The Deployment.
        name: String,
        /// Waits until every host's backup finished; exits 1 if one failed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "3600s", value_parser = parse_duration)]
        timeout: Duration,
        /// The file holding the API token (needed when the daemon has one).
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Restores a running Deployment's hosts in place from a snapshot: services stopped, data paths and
    /// databases replaced, verified, services started, health checked. Without --confirm it only says
    /// what it would do, and what would be lost.
    Restore {
        /// `deployment` (the only kind that is restored).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The Deployment.
        name: String,
        /// `latest` (each host's latest snapshot) or a snapshot ID as `get backups NAME` lists them.
        #[arg(long, default_value = "latest")]
        snapshot: String,
        /// Restores: everything written to the hosts since the snapshot is lost.
        #[arg(long)]
        confirm: bool,
        /// Waits until the restore finished; exits 1 if a host was not restored, verified and healthy.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "3600s", value_parser = parse_duration)]
        timeout: Duration,
        /// The file holding the API token (needed when the daemon has one).
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Writes a portable bundle of a Deployment for another provider's controller: the Deployment without
    /// provider fields, a restic repository of its own holding only this Deployment's snapshots, and
    /// each host's verification manifest. Runs on the controller's machine (it reads the repository's
    /// secrets the RuntimeEnvironment names).
    Export {
        /// `deployment` (the only kind that is exported).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The Deployment.
        name: String,
        /// The bundle's folder (new, or empty).
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Stops the Deployment's services first and leaves them stopped, then takes the final backup:
        /// nothing written after it is lost by the move.
        #[arg(long = "final")]
        final_snapshot: bool,
        /// How long the final backup may take.
        #[arg(long, default_value = "3600s", value_parser = parse_duration)]
        timeout: Duration,
        /// The file holding the API token (needed when the daemon has one).
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Imports a bundle written by `fediversity export` at another provider: checks it (index,
    /// checksums, repository, manifests) before anything is created, copies its snapshots into the
    /// environment's repository, and creates the Deployment with `spec.restore`.
    Import {
        /// The bundle's folder.
        dir: PathBuf,
        /// The RuntimeEnvironment the Deployment runs on here (it needs `spec.backup`).
        #[arg(long)]
        environment: String,
        /// Waits until every host was restored, verified and the Deployment is Ready; exits 1 otherwise.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "3600s", value_parser = parse_duration)]
        timeout: Duration,
        /// The file holding the API token (creating the Deployment needs it).
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Applies the objects of a YAML (or JSON) file through the daemon's API; `-` reads standard input.
    /// Objects owned by a git or directory source are refused.
    Apply {
        /// The file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The file holding the API token.
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Deletes an object applied through the API.
    Delete {
        /// The kind.
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The name.
        name: String,
        /// The file holding the API token.
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Migrations between RuntimeEnvironments (a change of `spec.runtimeEnvironment` starts one).
    Migrate {
        /// What to do.
        #[command(subcommand)]
        action: MigrateAction,
    },
}

/// `fediversity migrate ...`.
#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Moves a migrated Deployment back to the environment it left, with the writes made since the
    /// switch: during the grace period, or while its old hosts are retained. Set its
    /// `spec.runtimeEnvironment` back first.
    Rollback {
        /// `deployment` (the only kind that migrates).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The Deployment.
        name: String,
        /// The file holding the API token.
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
    /// When the old environment cannot be reached, starts the migration's target from the source
    /// hosts' last good backups instead of a live copy. Without `--confirm` it only prints the
    /// data-loss window (the time of the oldest of those snapshots) and changes nothing.
    RestoreFromBackup {
        /// `deployment` (the only kind that migrates).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The Deployment.
        name: String,
        /// Accept losing every write made after the last backups.
        #[arg(long)]
        confirm: bool,
        /// The file holding the API token.
        #[arg(long, env = "FEDIVERSITY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Where the daemon is.
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn parse_reconcile_target(text: &str) -> Result<ReconcileTarget, String> {
    text.parse()
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    text.parse()
}

fn parse_target(text: &str) -> Result<Target, String> {
    text.parse()
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => crate::daemon::run(*args).await,
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(*args).await,
        Command::Validate { paths, quiet } => Ok(validate::run(&paths, quiet, &mut std::io::stdout())?),
        Command::FirstPassword(args) => first_password(*args).await,
        Command::Store(command) => {
            tokio::task::spawn_blocking(move || store::run(command, &mut std::io::stdout())).await?
        }
        Command::Crds { output_dir: None } => {
            print!("{}", crate::api::crd::all_yaml());
            Ok(0)
        }
        Command::Crds {
            output_dir: Some(dir),
        } => {
            std::fs::create_dir_all(&dir)?;
            for kind in Kind::ALL {
                let path = dir.join(crate::api::crd::file_name(kind));
                std::fs::write(&path, crate::api::crd::crd_yaml(kind))?;
                println!("wrote {}", path.display());
            }
            Ok(0)
        }
        Command::Schema { kind } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::api::json_schema(kind))?
            );
            Ok(0)
        }
        Command::Get {
            kind,
            name,
            output,
            server,
        } => {
            print!(
                "{}",
                crate::text::escape(
                    &remote::get(
                        &client::Client::new(&server.server),
                        kind,
                        name.as_deref(),
                        output
                    )
                    .await?
                )
            );
            Ok(0)
        }
        Command::Describe { kind, name, server } => {
            print!(
                "{}",
                crate::text::escape(
                    &remote::describe(&client::Client::new(&server.server), kind, &name).await?
                )
            );
            Ok(0)
        }
        Command::Events { kind, name, server } => {
            let object = kind.zip(name.as_deref());
            print!(
                "{}",
                crate::text::escape(&remote::events(&client::Client::new(&server.server), object).await?)
            );
            Ok(0)
        }
        Command::Reconcile {
            kind,
            name,
            wait,
            with_source,
            timeout,
            token_file,
            server,
        } => {
            let wait = wait.then_some(timeout);
            let token = token_file.as_deref().map(write::read_token).transpose()?;
            let client = client::Client::new(&server.server).with_token(token);
            let (message, ready) = match kind {
                ReconcileTarget::Source => write::reconcile_source(&client, &name, wait).await?,
                ReconcileTarget::Kind(kind) => {
                    if with_source
                        && let Some(source) = write::owner(&client, kind, &name).await?
                        && source != crate::source::spec::API_SOURCE
                    {
                        let (message, _) = write::reconcile_source(&client, &source, Some(timeout)).await?;
                        print!("{}", crate::text::escape(&message));
                    }
                    remote::reconcile(&client, kind, &name, wait).await?
                }
            };
            print!("{}", crate::text::escape(&message));
            Ok(if ready { 0 } else { 1 })
        }
        Command::Backup {
            kind,
            name,
            wait,
            timeout,
            token_file,
            server,
        } => {
            if kind != Kind::Deployment {
                eprintln!("error: only Deployments are backed up: `fediversity backup deployment NAME`");
                return Ok(2);
            }
            let token = token_file.as_deref().map(write::read_token).transpose()?;
            let client = client::Client::new(&server.server).with_token(token);
            let handled = client
                .request_and_wait(
                    &format!("deployments/{name}/backup"),
                    &format!("deployments/{name}"),
                    "/status/lastHandledBackupAt",
                    wait.then_some(timeout),
                    &format!("the backup of Deployment {name}"),
                )
                .await?;
            if handled.is_none() {
                println!("backup of Deployment {name} requested");
                return Ok(0);
            }
            // The hosts' last backups from the Deployment's status (`get backups NAME` lists the repository).
            let object = handled.unwrap_or_default();
            let mut items = object["status"]["backups"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for item in &mut items {
                item["deployment"] = name.clone().into();
            }
            print!("{}", remote::backups_table(&items));
            // No host backed up (none Ready yet) is not a success either.
            let failed = items.is_empty() || items.iter().any(|b| b["result"] != "Succeeded");
            Ok(if failed { 1 } else { 0 })
        }
        Command::Restore {
            kind,
            name,
            snapshot,
            confirm,
            wait,
            timeout,
            token_file,
            server,
        } => {
            if kind != Kind::Deployment {
                eprintln!("error: only Deployments are restored: `fediversity restore deployment NAME`");
                return Ok(2);
            }
            let token = token_file.as_deref().map(write::read_token).transpose()?;
            let client = client::Client::new(&server.server).with_token(token);
            Ok(remote::restore(&client, &name, &snapshot, confirm, wait.then_some(timeout)).await?)
        }
        Command::Export {
            kind,
            name,
            output,
            final_snapshot,
            timeout,
            token_file,
            server,
        } => {
            if kind != Kind::Deployment {
                eprintln!(
                    "error: only Deployments are exported: `fediversity export deployment NAME -o DIR`"
                );
                return Ok(2);
            }
            let token = token_file.as_deref().map(write::read_token).transpose()?;
            let client = client::Client::new(&server.server).with_token(token);
            match bundle::export(&client, &name, &output, final_snapshot, timeout).await {
                Ok(code) => Ok(code),
                Err(e) => {
                    eprintln!("error: {}", crate::text::escape(&e.to_string()));
                    Ok(1)
                }
            }
        }
        Command::Import {
            dir,
            environment,
            wait,
            timeout,
            token_file,
            server,
        } => {
            if token_file.is_none() {
                eprintln!(
                    "error: import creates the Deployment through the daemon's API: give --token-file (or FEDIVERSITY_TOKEN_FILE); nothing was done"
                );
                return Ok(2);
            }
            let writer = write::Writer::new(&server.server, token_file.as_deref())?;
            let client = client::Client::new(&server.server);
            match bundle::import(&client, &writer, &dir, &environment, wait.then_some(timeout)).await {
                Ok(code) => Ok(code),
                Err(e) => {
                    eprintln!("error: {}", crate::text::escape(&e.to_string()));
                    Ok(1)
                }
            }
        }
        Command::Apply {
            file,
            token_file,
            server,
        } => {
            let writer = write::Writer::new(&server.server, token_file.as_deref())?;
            let (name, text) = write::read_input(&file)?;
            let (out, code) = writer.apply(&name, text).await?;
            print!("{}", crate::text::escape(&out));
            Ok(code)
        }
        Command::Delete {
            kind,
            name,
            token_file,
            server,
        } => {
            let writer = write::Writer::new(&server.server, token_file.as_deref())?;
            print!("{}", crate::text::escape(&writer.delete(kind, &name).await?));
            Ok(0)
        }
        Command::Migrate {
            action:
                MigrateAction::Rollback {
                    kind,
                    name,
                    token_file,
                    server,
                },
        } => {
            if kind != Kind::Deployment {
                eprintln!("error: only Deployments migrate: `fediversity migrate rollback deployment NAME`");
                return Ok(2);
            }
            let token = token_file.as_deref().map(write::read_token).transpose()?;
            let client = client::Client::new(&server.server).with_token(token);
            let back = client.post(&format!("deployments/{name}/rollback")).await?;
            let text = format!(
                "Deployment {name} moves back from {} to {} (status.migration shows its phases)\n",
                back["from"].as_str().unwrap_or("?"),
                back["to"].as_str().unwrap_or("?")
            );
            print!("{}", crate::text::escape(&text));
            Ok(0)
        }
        Command::Migrate {
            action:
                MigrateAction::RestoreFromBackup {
                    kind,
                    name,
                    confirm,
                    token_file,
                    server,
                },
        } => {
            if kind != Kind::Deployment {
                eprintln!(
                    "error: only Deployments migrate: `fediversity migrate restore-from-backup deployment NAME`"
                );
                return Ok(2);
            }
            let token = token_file.as_deref().map(write::read_token).transpose()?;
            let client = client::Client::new(&server.server).with_token(token);
            let query = if confirm { "?confirm=true" } else { "" };
            let fresh = client
                .post(&format!("deployments/{name}/restore-from-backup{query}"))
                .await?;
            let snapshots = fresh["snapshots"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(h, s)| format!("{h}: {}", s.as_str().unwrap_or("?")))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let text = format!(
                "Deployment {name} moves from {} to {} starting from the last backups ({snapshots}); writes after {} are lost (status.migration shows its phases)\n",
                fresh["from"].as_str().unwrap_or("?"),
                fresh["to"].as_str().unwrap_or("?"),
                fresh["writesLostAfter"].as_str().unwrap_or("?"),
            );
            print!("{}", crate::text::escape(&text));
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_kubectl_style_kinds() {
        let cli = Cli::try_parse_from(["fediversity", "get", "deploy", "uni", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Get {
                kind: Target::Kind(Kind::Deployment),
                output: Format::Json,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["fediversity", "get", "hosts"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Get {
                kind: Target::Hosts,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["fediversity", "get", "pods"]).is_err());
    }

    #[test]
    fn export_and_import_take_their_folder_final_and_environment() {
        let cli = Cli::try_parse_from([
            "fediversity",
            "export",
            "deployment",
            "op",
            "-o",
            "out",
            "--final",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Export { kind: Kind::Deployment, final_snapshot: true, ref output, .. } if output == &PathBuf::from("out")
        ));
        let cli =
            Cli::try_parse_from(["fediversity", "import", "out", "--environment", "ams", "--wait"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Import { wait: true, ref environment, .. } if environment == "ams"
        ));
        assert!(
            Cli::try_parse_from(["fediversity", "import", "out"]).is_err(),
            "--environment is required"
        );
        assert!(
            Cli::try_parse_from(["fediversity", "export", "deployment", "op"]).is_err(),
            "-o is required"
        );
    }
}

/// Where a host's first password is and how to reach the host.
#[derive(Debug, clap::Args)]
pub struct FirstPasswordArgs {
    /// The host's name (`<deployment>-<application>`), as `fediversity get hosts` lists it.
    pub host: String,
    /// The host's address.
    #[arg(long)]
    pub address: String,
    /// Its SSH port.
    #[arg(long, default_value_t = 22)]
    pub port: u16,
    /// The login user.
    #[arg(long, default_value = "root")]
    pub user: String,
    /// The controller's SSH private key (the RuntimeEnvironment's `ssh.privateKeyFile`).
    #[arg(long)]
    pub identity: PathBuf,
    /// The controller's state folder: its `known_hosts/<host>` pins the host's key.
    #[arg(long, default_value = "/var/lib/fediversity")]
    pub state_dir: PathBuf,
    /// Where the host keeps the password (the catalog's `fediversity.firstAccount.passwordFile`).
    #[arg(long, default_value = crate::nixos::FIRST_PASSWORD_FILE)]
    pub password_file: String,
}

async fn first_password(args: FirstPasswordArgs) -> anyhow::Result<i32> {
    let known_hosts = args.state_dir.join("known_hosts").join(&args.host);
    if !known_hosts.exists() {
        eprintln!(
            "error: {} does not exist: the controller has not pinned the key of host `{}` yet",
            known_hosts.display(),
            args.host
        );
        return Ok(1);
    }
    let target = crate::nixos::SshTarget {
        name: args.host.clone(),
        user: args.user,
        address: args.address,
        port: args.port,
        identity_file: args.identity,
        known_hosts,
    };
    let host = crate::nixos::SshHost::new(target, crate::nixos::SshTimeouts::default())?;
    match host.take_first_password(&args.password_file).await {
        Ok(password) => {
            println!("{password}");
            Ok(0)
        }
        Err(e) => {
            eprintln!("error: {}: {e}", args.host);
            Ok(1)
        }
    }
}
