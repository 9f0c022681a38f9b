//! `fediversity store copy`: moves an installation's records between the embedded store and etcd.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::store::Store;

/// The store subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Copies every record (generations, status, events, inventory, the installation id) from one store
    /// into another that is still empty, then reads both back and compares them. Stop the controller
    /// first. A store is a state directory or `etcd://HOST:PORT,…[/PREFIX]`.
    Copy(CopyArgs),
}

/// Where to copy from and to, and how to reach etcd.
#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The store to read: a state directory or an etcd URL.
    #[arg(long)]
    pub from: String,
    /// The store to write (must hold nothing yet): a state directory or an etcd URL.
    #[arg(long)]
    pub to: String,
    /// How etcd is reached, when either side is an etcd URL.
    #[command(flatten)]
    pub etcd: crate::daemon::EtcdArgs,
}

fn open(location: &str, args: &CopyArgs) -> anyhow::Result<Store> {
    if location.starts_with("etcd://") {
        let config = args.etcd.config(location)?;
        Ok(Store::open_etcd(&config)?)
    } else {
        let dir = PathBuf::from(location);
        anyhow::ensure!(
            dir.join(crate::store::FILE_NAME).is_file() || !dir.exists() || dir.read_dir()?.next().is_none(),
            "{} holds no {} store file; give the controller's state directory",
            dir.display(),
            crate::store::FILE_NAME
        );
        Ok(Store::open(&dir)?)
    }
}

/// Runs a store subcommand; returns the exit code.
pub fn run(command: StoreCommand, out: &mut impl std::io::Write) -> anyhow::Result<i32> {
    match command {
        StoreCommand::Copy(args) => {
            anyhow::ensure!(args.from != args.to, "--from and --to name the same store");
            let from = open(&args.from, &args).context("cannot open the store to copy from")?;
            let dump = from.dump()?;
            let to = open(&args.to, &args).context("cannot open the store to copy to")?;
            to.load_dump(&dump)?;
            let copied = to.dump()?.sorted();
            anyhow::ensure!(
                copied == dump.clone().sorted(),
                "the copy in {} differs from {} when read back; do not use it",
                to.location(),
                from.location()
            );
            writeln!(
                out,
                "copied {} objects, {} statuses, {} events and {} inventory entries from {} to {}; verified",
                dump.objects.len(),
                dump.statuses.len(),
                dump.events.len(),
                dump.inventory.len(),
                from.location(),
                to.location()
            )?;
            Ok(0)
        }
    }
}
