//! The identity of one controller installation, shared by its replicas: kept in the store.
//!
//! VM owner tags and the ownership TXT of DNS names are derived from it, so that a second installation
//! on the same cluster or zone never takes the first one's VMs or names for its own.

use std::path::Path;

use crate::store::{Store, StoreError};

/// Where the installation id is kept in the store's inventory.
pub const INVENTORY_ID: &str = "installation/id";

/// Why the installation id cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum InstallationError {
    /// The store cannot be read or written.
    #[error("cannot keep the installation id in the store: {0}")]
    Store(#[from] StoreError),
    /// The state directory's `instance-id` file cannot be read or written.
    #[error("cannot keep the installation id in {dir}: {source}")]
    File {
        /// The state directory.
        dir: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The installation id: `given` (`--instance-id`) if set; else the one kept in the store; else the one
/// an earlier version kept in the state directory's `instance-id` file (or a new one), which is then
/// kept in the store, so every replica reading the same store uses the same id.
pub fn installation_id(
    store: &Store,
    state_dir: &Path,
    given: Option<&str>,
) -> Result<String, InstallationError> {
    if let Some(id) = given.map(str::trim).filter(|id| !id.is_empty()) {
        return Ok(id.to_owned());
    }
    if let Some(id) = store
        .inventory::<String>(INVENTORY_ID)?
        .filter(|id| !id.is_empty())
    {
        return Ok(id);
    }
    let id = instance_id(state_dir, None).map_err(|source| InstallationError::File {
        dir: state_dir.display().to_string(),
        source,
    })?;
    // Replicas starting together agree on whichever id reached the store first.
    Ok(store.claim_inventory(INVENTORY_ID, &id)?)
}

/// The file in the state directory that keeps the controller instance id.
pub const INSTANCE_ID_FILE: &str = "instance-id";

/// Returns the controller instance id: `given`, or the one kept in the state directory (created once).
pub fn instance_id(state_dir: &Path, given: Option<&str>) -> std::io::Result<String> {
    if let Some(id) = given.filter(|id| !id.trim().is_empty()) {
        return Ok(id.trim().to_owned());
    }
    let path = state_dir.join(INSTANCE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(state_dir)?;
    let id: String = (0..16).map(|_| format!("{:x}", fastrand::u8(0..16))).collect();
    let tmp = state_dir.join(format!("{INSTANCE_ID_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_created_once_and_then_read_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = installation_id(&store, dir.path(), None).unwrap();
        assert_eq!(first.len(), 16);
        std::fs::remove_file(dir.path().join(INSTANCE_ID_FILE)).unwrap();
        assert_eq!(
            installation_id(&store, dir.path(), None).unwrap(),
            first,
            "kept in the store"
        );
        assert_eq!(
            installation_id(&store, dir.path(), Some(" given ")).unwrap(),
            "given"
        );
    }

    #[test]
    fn an_id_kept_by_an_earlier_version_in_the_state_directory_is_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(INSTANCE_ID_FILE), "0123456789abcdef").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            installation_id(&store, dir.path(), None).unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(
            store.inventory::<String>(INVENTORY_ID).unwrap().as_deref(),
            Some("0123456789abcdef")
        );
    }

    #[test]
    fn the_instance_id_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = instance_id(dir.path(), None).unwrap();
        assert_eq!(first.len(), 16);
        assert_eq!(instance_id(dir.path(), None).unwrap(), first);
        assert_eq!(instance_id(dir.path(), Some("given")).unwrap(), "given");
    }
}
