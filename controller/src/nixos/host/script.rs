//! The shell lines run on a host to deploy: read and set the profile, activate detached, arm, disarm and fire the rollback, check health.

use std::time::Duration;

use super::super::escape::shell_words;
use super::{Generation, HttpCheck, SYSTEM_PROFILE, SshHost, StorePath};

/// Starts `script` detached: as a transient systemd unit where systemd runs, else in a new session.
fn detached(unit: &str, script: &str, systemd_args: &str) -> String {
    format!(
        "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then \
systemd-run --unit={unit} --collect --no-ask-password --quiet {systemd_args}/bin/sh {script}; \
else setsid nohup /bin/sh {script} >/dev/null 2>&1 </dev/null & fi"
    )
}

/// The line that stores stdin at `path`, whole: a transfer cut short (the controller stopped mid-way)
/// leaves nothing there, so no partial script is ever run.
fn store_stdin(path: &str, len: usize) -> String {
    format!(
        "cat >{path}.part; if [ \"$(wc -c <{path}.part)\" -ne {len} ]; then rm -f {path}.part; \
echo 'the script arrived cut short' >&2; exit 5; fi; mv {path}.part {path}"
    )
}

impl SshHost {
    /// The remote line that lists deploys armed but neither confirmed nor rolled back, newest first:
    /// `ID SECONDS-SINCE-ARMED STARTED(0|1) EXIT-CODE|- [PREVIOUS-NUMBER PREVIOUS-PATH]`, after a
    /// `--- pending` line.
    pub fn pending_script(&self) -> String {
        let d = &self.remote_dir;
        format!(
            "echo '--- pending'; if [ -d {d} ]; then now=$(date +%s); \
for f in $(cd {d} && ls -t armed-* 2>/dev/null); do id=${{f#armed-}}; \
s=0; if [ -e {d}/activate-$id.sh ]; then s=1; fi; rc=$(cat {d}/rc-$id 2>/dev/null || true); \
echo \"$id $((now - $(stat -c %Y {d}/$f))) $s ${{rc:--}} $(head -n 1 {d}/$f)\"; done; fi"
        )
    }

    /// The remote line that prints the profile's link and target.
    pub fn current_script() -> String {
        format!("p={SYSTEM_PROFILE}; if [ -e \"$p\" ]; then readlink \"$p\"; readlink -e \"$p\"; fi")
    }

    /// The remote line that points the profile at `path` and prints the new link.
    pub fn set_profile_script(path: &StorePath) -> String {
        format!(
            "{} && readlink {SYSTEM_PROFILE}",
            shell_words(&["nix-env", "-p", SYSTEM_PROFILE, "--set", path.as_str()])
        )
    }

    /// The rollback script that the timer (or an immediate rollback, with the argument `claimed`) runs
    /// on the host. Renaming the `armed` marker is atomic, so it runs at most once and never after a
    /// disarm.
    pub fn rollback_script(&self, id: &str, previous: Option<&Generation>) -> String {
        let d = &self.remote_dir;
        let p = SYSTEM_PROFILE;
        let mut s = format!(
            "#!/bin/sh\n# Rollback of deploy {id}, armed by the Fediversity controller.\n\
if [ \"$1\" != claimed ]; then mv {d}/armed-{id} {d}/fired-{id} 2>/dev/null || exit 0; fi\n\
PATH=/run/current-system/sw/bin:$PATH\n\
link=$(readlink {p} || true)\n"
        );
        match previous {
            Some(g) => {
                let n = g.number;
                s.push_str(&format!(
                    "if [ -n \"$link\" ] && [ \"$link\" != system-{n}-link ]; then\n\
  nix-env -p {p} --switch-generation {n}\n\
  gen=${{link#system-}}; gen=${{gen%-link}}\n\
  nix-env -p {p} --delete-generations \"$gen\"\n\
fi\n\
{}/bin/switch-to-configuration switch >{d}/rollback-{id}.log 2>&1\n\
echo $? >{d}/rolled-back-{id}\n",
                    g.path
                ));
            }
            None => s.push_str(&format!(
                "if [ -n \"$link\" ]; then rm -f {p} \"/nix/var/nix/profiles/$link\"; fi\n\
echo 0 >{d}/rolled-back-{id}\n"
            )),
        }
        s
    }

    /// The remote line that stores the rollback script (read from stdin) and arms it.
    /// The `armed` marker holds the generation the rollback returns to (`NUMBER PATH`, or nothing), so
    /// that a later run can finish or undo a deploy it did not start.
    pub fn arm_script(&self, id: &str, after: Duration, previous: Option<&Generation>, len: usize) -> String {
        let d = &self.remote_dir;
        let secs = after.as_secs().max(1);
        let previous = previous.map_or_else(String::new, |g| format!("{} {}", g.number, g.path));
        format!(
            "set -e; mkdir -p {d}; {}; echo {} >{d}/armed-{id}; \
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then \
systemd-run --unit=fediversity-rollback-{id} --on-active={secs}s --timer-property=AccuracySec=1s --quiet /bin/sh {d}/rollback-{id}.sh; \
else setsid nohup /bin/sh -c 'sleep {secs}; exec /bin/sh {d}/rollback-{id}.sh' >/dev/null 2>&1 </dev/null & echo $! >{d}/watchdog-{id}.pid; fi",
            store_stdin(&format!("{d}/rollback-{id}.sh"), len),
            shell_words(&[previous.as_str()]),
        )
    }

    /// The activation script (stored on the host, run detached): records the exit code atomically.
    pub fn activation_script(&self, id: &str, path: &StorePath) -> String {
        let d = &self.remote_dir;
        format!(
            "#!/bin/sh\n{path}/bin/switch-to-configuration switch >{d}/activation-{id}.log 2>&1\n\
echo $? >{d}/rc-{id}.tmp && mv {d}/rc-{id}.tmp {d}/rc-{id}\n"
        )
    }

    /// The remote line that stores the activation script (stdin) and starts it detached.
    pub fn activate_script(&self, id: &str, len: usize) -> String {
        let d = &self.remote_dir;
        format!(
            "set -e; mkdir -p {d}; rm -f {d}/rc-{id}; {}; {}",
            store_stdin(&format!("{d}/activate-{id}.sh"), len),
            detached(
                &format!("fediversity-switch-{id}"),
                &format!("{d}/activate-{id}.sh"),
                "--service-type=exec -E LOCALE_ARCHIVE -E NIXOS_INSTALL_BOOTLOADER=0 "
            )
        )
    }

    /// The remote line that prints the activation's exit code once there is one.
    pub fn activation_status_script(&self, id: &str) -> String {
        format!("cat {}/rc-{id} 2>/dev/null || true", self.remote_dir)
    }

    /// The remote line of the health checks: `systemctl is-system-running` where systemd runs, then
    /// the HTTP check with curl against the host's own web server.
    pub fn health_script(http: Option<&HttpCheck>) -> String {
        // A system that names its ready units is judged by them alone: a unit waiting on DNS or
        // ACME (which makes the whole system `degraded`) is no reason to roll back.
        // A host that waits for its restore holds the application's units stopped: they and the HTTP
        // check do not count until the restore marker exists.
        let units = super::super::readiness::READY_UNITS_ON_HOST;
        let hold = super::super::readiness::RESTORE_HOLD_ON_HOST;
        let mut s = format!(
            "held=; if [ -f {hold} ] && [ ! -e \"$(head -n 1 {hold})\" ]; then \
held=\" $(tail -n +2 {hold} | tr '\\n' ' ')\"; echo held=until-restored; fi; \
if [ -f {units} ] && command -v systemctl >/dev/null 2>&1; then \
for u in $(cat {units}); do case \"$held \" in *\" $u \"*) continue;; esac; \
echo unit=$u:$(systemctl is-active $u 2>/dev/null || true); done; \
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then \
echo system=$(systemctl is-system-running 2>/dev/null || true); fi"
        );
        if let Some(h) = http {
            let url = format!("{}://{}:{}{}", h.scheme, h.fqdn, h.port, h.path);
            let resolve = format!("{}:{}:127.0.0.1", h.fqdn, h.port);
            s.push_str(&format!(
                "; if [ -z \"$held\" ]; then echo http=$({} || true); fi",
                shell_words(&[
                    "curl",
                    "--silent",
                    "--insecure",
                    "--output",
                    "/dev/null",
                    "--max-time",
                    "5",
                    "--write-out",
                    "%{http_code}",
                    "--resolve",
                    &resolve,
                    &url
                ])
            ));
        }
        s
    }

    /// The remote line that disarms the rollback and removes the deploy's files (logs stay). It fails
    /// when the rollback already fired: renaming the `armed` marker is atomic on both sides.
    pub fn disarm_script(&self, id: &str) -> String {
        let d = &self.remote_dir;
        format!(
            "if ! mv {d}/armed-{id} {d}/disarmed-{id} 2>/dev/null; then \
echo 'the rollback timer fired before the deploy was confirmed' >&2; exit 3; fi; \
{}; rm -f {d}/watchdog-{id}.pid {d}/rollback-{id}.sh {d}/activate-{id}.sh {d}/rc-{id} {d}/disarmed-{id}",
            self.stop_watchdog(id)
        )
    }

    /// Stops the timer or the watchdog of deploy `id` (only ever after claiming the `armed` marker).
    fn stop_watchdog(&self, id: &str) -> String {
        let d = &self.remote_dir;
        format!(
            "if [ -d /run/systemd/system ]; then systemctl stop fediversity-rollback-{id}.timer 2>/dev/null || true; fi; \
if [ -f {d}/watchdog-{id}.pid ]; then kill -- -$(cat {d}/watchdog-{id}.pid) 2>/dev/null || true; fi"
        )
    }

    /// The remote line of an immediate rollback: claim the `armed` marker, stop the timer, run the
    /// rollback; if the timer already claimed it, wait for its rollback to finish instead.
    pub fn roll_back_script(&self, id: &str) -> String {
        let d = &self.remote_dir;
        format!(
            "if mv {d}/armed-{id} {d}/fired-{id} 2>/dev/null; then {}; /bin/sh {d}/rollback-{id}.sh claimed; \
else i=0; while [ ! -e {d}/rolled-back-{id} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; fi; \
rm -f {d}/watchdog-{id}.pid {d}/rollback-{id}.sh {d}/activate-{id}.sh {d}/rc-{id}",
            self.stop_watchdog(id)
        )
    }
}
