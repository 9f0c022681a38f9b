//! The `fediversity` command line: argument parsing and one module per subcommand.

mod validate;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::api::Kind;

/// The Fediversity controller: hosts Fediverse applications declaratively on Proxmox VE and NixOS.
#[derive(Debug, Parser)]
#[command(name = "fediversity", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Checks YAML files or folders of objects; prints every problem; exits 1 if there is any.
    Validate {
        /// Files or folders (searched recursively for *.yaml and *.yml; hidden ones are skipped).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Prints nothing when everything is valid.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Prints the JSON Schema of a kind's objects.
    Schema {
        /// RuntimeEnvironment, Application or Deployment (plural and short names work too).
        #[arg(value_parser = parse_kind)]
        kind: Kind,
    },
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    text.parse()
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Validate { paths, quiet } => Ok(validate::run(&paths, quiet, &mut std::io::stdout())?),
        Command::Schema { kind } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::api::json_schema(kind))?
            );
            Ok(0)
        }
    }
}
