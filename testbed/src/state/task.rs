//! Tasks: real-format UPIDs, logs, exit statuses and what each task does when it ends.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// What a task does when its modelled time is over.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Finish a clone into `newid`.
    Clone {
        /// Source VM.
        src: u32,
        /// New VM.
        newid: u32,
        /// Full (copy) rather than linked clone.
        full: bool,
        /// Name of the new VM.
        name: Option<String>,
        /// Description of the new VM.
        description: Option<String>,
    },
    /// Finish creating `vmid` with this config.
    Create {
        /// The VM.
        vmid: u32,
        /// Its config.
        config: BTreeMap<String, String>,
        /// Start it afterwards.
        start: bool,
    },
    /// Apply pending changes (`qmconfig`).
    ApplyPending {
        /// The VM.
        vmid: u32,
    },
    /// Grow a disk to `bytes`.
    Resize {
        /// The VM.
        vmid: u32,
        /// The disk key.
        disk: String,
        /// New size in bytes.
        bytes: u64,
    },
    /// Start the VM.
    Start {
        /// The VM.
        vmid: u32,
    },
    /// Stop the VM (hard stop, or a graceful shutdown that worked).
    Stop {
        /// The VM.
        vmid: u32,
    },
    /// Remove the VM.
    Destroy {
        /// The VM.
        vmid: u32,
    },
    /// Log lines only.
    Nothing,
    /// End with this error.
    Fail {
        /// The task error.
        message: String,
    },
}

/// One task, running or finished.
#[derive(Debug)]
pub struct Task {
    /// The UPID.
    pub upid: String,
    /// Node it runs on.
    pub node: String,
    /// Worker pid.
    pub pid: u32,
    /// Worker start in clock ticks since boot.
    pub pstart: u64,
    /// Unix start time.
    pub starttime: u64,
    /// Task type (`qmclone`, `qmstart`, …).
    pub kind: String,
    /// Task id (the VMID, the source VMID for clones).
    pub id: String,
    /// `user@realm` (for tokens, the user part).
    pub user: String,
    /// Token id, when started with a token.
    pub tokenid: Option<String>,
    /// Log lines, without the final `TASK …` line.
    pub log: Vec<String>,
    /// Exit status once stopped: `OK`, `WARNINGS: N` or the error text.
    pub exit: Option<String>,
    /// Unix end time once stopped.
    pub endtime: Option<u64>,
    pub(crate) work: Option<Work>,
    pub(crate) abort: Option<tokio::task::AbortHandle>,
}

/// Formats a UPID: `UPID:<node>:<pid %08X>:<pstart %08X>:<starttime %08X>:<type>:<id>:<user>:`.
pub fn format_upid(
    node: &str,
    pid: u32,
    pstart: u64,
    starttime: u64,
    kind: &str,
    id: &str,
    user: &str,
) -> String {
    format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:")
}

/// A decoded UPID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    /// Node.
    pub node: String,
    /// Task type.
    pub kind: String,
    /// Task id.
    pub id: String,
    /// User (with `!tokenid` for tokens).
    pub user: String,
}

/// Decodes a UPID with `PVE::Tools::upid_decode`'s pattern; `None` when it does not parse.
pub fn parse_upid(upid: &str) -> Option<Upid> {
    const RE: &str = r"UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):([0-9A-Fa-f]{8,9}):([0-9A-Fa-f]{8}):([^:\s/]+):([^:\s/]*):([^:\s/]+):";
    if !crate::formats::matches_whole(RE, upid) {
        return None;
    }
    let f: Vec<&str> = upid.split(':').collect();
    Some(Upid {
        node: f[1].into(),
        kind: f[5].into(),
        id: f[6].into(),
        user: f[7].into(),
    })
}

impl Task {
    /// Whether the task still runs.
    pub fn running(&self) -> bool {
        self.exit.is_none()
    }

    /// Marks the task stopped with `OK`, `WARNINGS: N` or an error.
    pub fn finish(&mut self, result: Result<usize, String>, endtime: u64) {
        let (line, exit) = match result {
            Ok(0) => ("TASK OK".to_string(), "OK".to_string()),
            Ok(n) => (format!("TASK WARNINGS: {n}"), format!("WARNINGS: {n}")),
            Err(e) => (format!("TASK ERROR: {e}"), e),
        };
        self.log.push(line);
        self.exit = Some(exit);
        self.endtime = Some(endtime);
        self.work = None;
        self.abort = None;
    }

    /// The body of `GET /nodes/{node}/tasks/{upid}/status`.
    pub fn status_json(&self) -> Value {
        let mut v = json!({
            "upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
            "starttime": self.starttime, "type": self.kind, "id": self.id, "user": self.user,
            "status": if self.running() { "running" } else { "stopped" },
        });
        if let Some(exit) = &self.exit {
            v["exitstatus"] = json!(exit);
        }
        if let Some(tokenid) = &self.tokenid {
            v["tokenid"] = json!(tokenid);
        }
        v
    }

    /// An entry of `GET /nodes/{node}/tasks`.
    pub fn list_json(&self) -> Value {
        let mut v = json!({
            "upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
            "starttime": self.starttime, "type": self.kind, "id": self.id, "user": self.user,
        });
        if let (Some(exit), Some(end)) = (&self.exit, self.endtime) {
            v["status"] = json!(exit);
            v["endtime"] = json!(end);
        }
        if let Some(tokenid) = &self.tokenid {
            v["tokenid"] = json!(tokenid);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upids_have_the_real_format_and_parse_back() {
        let upid = format_upid(
            "pve",
            0x3836,
            0x1FE22F41,
            0x619510AC,
            "qmclone",
            "9000",
            "ci@pve!ctl",
        );
        assert_eq!(
            upid,
            "UPID:pve:00003836:1FE22F41:619510AC:qmclone:9000:ci@pve!ctl:"
        );
        let parsed = parse_upid(&upid).unwrap();
        assert_eq!((parsed.kind.as_str(), parsed.id.as_str()), ("qmclone", "9000"));
        assert!(parse_upid("UPID:pve:nothex:").is_none());
    }
}
