//! Test beds for the Fediversity controller: a Proxmox VE API simulator and test-host helpers.
