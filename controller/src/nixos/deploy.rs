//! The deploy of one system onto one host: a pure plan, and the executor that runs it over a `NixHost`.

use std::time::Duration;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};

use super::host::{Generation, Health, HostError, HttpCheck, NixHost, PendingDeploy, StorePath};

/// The outcome of a deploy, as status and metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployResult {
    /// The host runs the desired system and passed its health checks (or already did).
    Applied,
    /// The activation failed or the health checks did not pass; the previous system is current again.
    FailedRolledBack,
    /// The host could not be reached to confirm; its own timer rolled it back.
    UnconfirmedRolledBack,
    /// The host could not be reached; what it runs is not known.
    Unreachable,
    /// Nothing was changed on the host (e.g. its host key changed, or the copy failed).
    Failed,
}

impl DeployResult {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DeployResult::Applied => "Applied",
            DeployResult::FailedRolledBack => "FailedRolledBack",
            DeployResult::UnconfirmedRolledBack => "UnconfirmedRolledBack",
            DeployResult::Unreachable => "Unreachable",
            DeployResult::Failed => "Failed",
        }
    }
}

/// One step of a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Read the host's system profile.
    Inspect,
    /// Copy the closure.
    Copy,
    /// Arm the host's rollback timer.
    Arm,
    /// Point the system profile at the new system.
    SetProfile,
    /// Run `switch-to-configuration switch` detached and wait for its exit code.
    Activate,
    /// Health checks over a new connection, then disarm.
    Confirm,
    /// Return to the previous system.
    Rollback,
}

impl Step {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Step::Inspect => "inspect",
            Step::Copy => "copy",
            Step::Arm => "arm",
            Step::SetProfile => "set-profile",
            Step::Activate => "activate",
            Step::Confirm => "confirm",
            Step::Rollback => "rollback",
        }
    }
}

/// What to do, decided from what the host runs (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The profile already points at the desired system: no copy, no activation.
    NothingToDo,
    /// Switch, returning to `previous` on failure. The rollback is armed before the profile changes,
    /// so there is no moment at which the host runs something new without a way back.
    Switch {
        /// The generation to return to.
        previous: Option<Generation>,
        /// The steps, in order.
        steps: Vec<Step>,
    },
}

/// Plans the deploy of `desired` onto a host whose profile is `current`.
pub fn plan(current: Option<&Generation>, desired: &StorePath) -> Plan {
    if current.is_some_and(|g| &g.path == desired) {
        return Plan::NothingToDo;
    }
    Plan::Switch {
        previous: current.cloned(),
        steps: vec![
            Step::Copy,
            Step::Arm,
            Step::SetProfile,
            Step::Activate,
            Step::Confirm,
        ],
    }
}

/// Deadlines of a deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployTimings {
    /// The host rolls itself back unless confirmed within this time after arming.
    pub rollback_after: Duration,
    /// How long the activation may take before its result is given up on.
    pub activation_deadline: Duration,
    /// How long health checks are retried after the activation.
    pub confirm_deadline: Duration,
    /// How often the activation result and health are asked for.
    pub poll_interval: Duration,
    /// Extra time after the rollback timer before looking again at a host that was lost.
    pub rollback_slack: Duration,
}

impl Default for DeployTimings {
    fn default() -> Self {
        Self {
            rollback_after: Duration::from_secs(300),
            activation_deadline: Duration::from_secs(180),
            confirm_deadline: Duration::from_secs(90),
            poll_interval: Duration::from_secs(2),
            rollback_slack: Duration::from_secs(15),
        }
    }
}

/// What a deploy did, for status, events and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployReport {
    /// The outcome.
    pub result: DeployResult,
    /// The system the host should run.
    pub desired: StorePath,
    /// The system the profile points at afterwards, when known.
    pub current: Option<StorePath>,
    /// Its generation number, when known.
    pub generation: Option<u32>,
    /// Whether anything was copied or activated.
    pub changed: bool,
    /// One sentence.
    pub message: String,
    /// Seconds per step.
    pub steps: Vec<(Step, f64)>,
}

struct Clock {
    steps: Vec<(Step, f64)>,
}

impl Clock {
    async fn time<T, F: Future<Output = T>>(&mut self, step: Step, f: F) -> T {
        let started = Instant::now();
        let out = f.await;
        self.steps.push((step, started.elapsed().as_secs_f64()));
        out
    }
}

/// A unique id for one deploy of `desired`: names the host's files and systemd units.
pub fn deploy_id(desired: &StorePath) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{:x}", desired.short_hash(), nanos)
}

/// Deploys `desired` onto `host`: inspect, then (unless it already runs it) copy, arm the rollback,
/// set the profile, activate detached, confirm over a new connection, disarm. Never panics on a
/// failing host: every failure becomes a result.
pub async fn execute<H: NixHost>(
    host: &H,
    desired: &StorePath,
    http: Option<&HttpCheck>,
    timings: &DeployTimings,
) -> DeployReport {
    let mut clock = Clock { steps: Vec::new() };
    let report =
        |result, current: Option<&Generation>, changed, message: String, clock: Clock| DeployReport {
            result,
            desired: desired.clone(),
            current: current.map(|g| g.path.clone()),
            generation: current.map(|g| g.number),
            changed,
            message,
            steps: clock.steps,
        };
    let inspection = match clock.time(Step::Inspect, host.inspect()).await {
        Ok(i) => i,
        Err(e) => return report(failure_result(&e), None, false, e.to_string(), clock),
    };
    let mut current = inspection.current;
    // A deploy an earlier run left unconfirmed (the controller stopped in the middle) still has its
    // rollback armed, which would undo whatever comes next: finish it when it is this very system and
    // its activation did not fail, else undo it (newest first, back to the generation before it).
    if let Some(newest) = inspection.pending.first() {
        let at_desired = current.as_ref().filter(|g| &g.path == desired);
        if let Some(new) = at_desired
            && inspection.pending.len() == 1
            && newest.exit_code.is_none_or(|c| c == 0)
        {
            let new = new.clone();
            return resume(host, desired, http, timings, newest, new, clock).await;
        }
        for p in &inspection.pending {
            if let Err(e) = clock.time(Step::Rollback, host.roll_back(&p.id)).await {
                let why = format!("undoing the unconfirmed deploy {} failed: {e}", p.id);
                return report(failure_result(&e), current.as_ref(), false, why, clock);
            }
        }
        current = match clock.time(Step::Inspect, host.current()).await {
            Ok(c) => c,
            Err(e) => return report(failure_result(&e), None, true, e.to_string(), clock),
        };
    }
    let previous = match plan(current.as_ref(), desired) {
        Plan::NothingToDo => {
            return report(
                DeployResult::Applied,
                current.as_ref(),
                false,
                format!("{} already runs {desired}", host.name()),
                clock,
            );
        }
        Plan::Switch { previous, .. } => previous,
    };
    crate::provider::progress::report(format!(
        "{}: copying, activating and checking {desired}",
        host.name()
    ));
    if let Err(e) = clock.time(Step::Copy, host.copy_closure(desired)).await {
        return report(failure_result(&e), current.as_ref(), false, e.to_string(), clock);
    }
    let id = deploy_id(desired);
    let armed_at = Instant::now();
    if let Err(e) = clock
        .time(
            Step::Arm,
            host.arm_rollback(&id, previous.as_ref(), timings.rollback_after),
        )
        .await
    {
        return report(failure_result(&e), current.as_ref(), false, e.to_string(), clock);
    }
    let new = match clock.time(Step::SetProfile, host.set_profile(desired)).await {
        Ok(g) => g,
        Err(e) => {
            // The profile did not change: disarm so that the host does not re-activate for nothing.
            let _ = host.disarm_rollback(&id).await;
            return report(failure_result(&e), current.as_ref(), false, e.to_string(), clock);
        }
    };
    let switch = Switch {
        id,
        previous,
        new,
        armed_at,
    };
    switch
        .activate_and_confirm(host, desired, http, timings, clock, Activation::Start)
        .await
}

/// Finishes a deploy an earlier run left unconfirmed with the profile already at `desired`: starts its
/// activation if it never started, waits for it, confirms and disarms (or rolls back), as if the run
/// had not stopped.
async fn resume<H: NixHost>(
    host: &H,
    desired: &StorePath,
    http: Option<&HttpCheck>,
    timings: &DeployTimings,
    pending: &PendingDeploy,
    new: Generation,
    clock: Clock,
) -> DeployReport {
    crate::provider::progress::report(format!(
        "{}: finishing the deploy {} that an earlier run left unconfirmed",
        host.name(),
        pending.id
    ));
    let now = Instant::now();
    let switch = Switch {
        id: pending.id.clone(),
        previous: pending.previous.clone(),
        new,
        armed_at: now.checked_sub(pending.armed_ago).unwrap_or(now),
    };
    let activation = match (pending.activation_started, pending.exit_code) {
        (_, Some(code)) => Activation::Finished(code),
        (true, None) => Activation::Running,
        (false, None) => Activation::Start,
    };
    switch
        .activate_and_confirm(host, desired, http, timings, clock, activation)
        .await
}

/// Where the activation of a switch stands.
enum Activation {
    /// Not started yet.
    Start,
    /// Started; its exit code is awaited.
    Running,
    /// Finished with this exit code.
    Finished(i32),
}

/// A switch under way: the rollback armed, the profile at the new generation.
struct Switch {
    id: String,
    previous: Option<Generation>,
    new: Generation,
    armed_at: Instant,
}

impl Switch {
    /// Activates (unless already started), waits for the exit code, confirms over a new connection and
    /// disarms; rolls back on any failure.
    async fn activate_and_confirm<H: NixHost>(
        &self,
        host: &H,
        desired: &StorePath,
        http: Option<&HttpCheck>,
        timings: &DeployTimings,
        mut clock: Clock,
        activation: Activation,
    ) -> DeployReport {
        if matches!(activation, Activation::Start)
            && let Err(e) = clock.time(Step::Activate, host.activate(&self.id, desired)).await
        {
            let ending = self.undo(host, timings, &mut clock, e.to_string()).await;
            return ending.finish(desired, clock);
        }
        let exit = match activation {
            Activation::Finished(code) => Some(code),
            Activation::Start | Activation::Running => {
                clock
                    .time(Step::Activate, wait_for_activation(host, &self.id, timings))
                    .await
            }
        };
        match exit {
            Some(0) => {}
            Some(code) => {
                let why = format!("the activation of {desired} exited with code {code}");
                let ending = self.undo(host, timings, &mut clock, why).await;
                return ending.finish(desired, clock);
            }
            None => {
                let ending = self.wait_for_timer(host, timings, &mut clock).await;
                return ending.finish(desired, clock);
            }
        }
        let confirmed = clock
            .time(Step::Confirm, confirm(host, http, self.armed_at, timings))
            .await;
        match confirmed {
            Confirmation::Healthy => {
                if let Err(e) = clock.time(Step::Confirm, host.disarm_rollback(&self.id)).await {
                    // Not disarmed: the host will roll itself back. Say what will happen.
                    let ending = self.wait_for_timer(host, timings, &mut clock).await;
                    return ending
                        .with_note(&format!("disarming failed: {e}"))
                        .finish(desired, clock);
                }
                let new = &self.new;
                DeployReport {
                    result: DeployResult::Applied,
                    desired: desired.clone(),
                    current: Some(new.path.clone()),
                    generation: Some(new.number),
                    changed: true,
                    message: format!("{} runs {desired} (generation {})", host.name(), new.number),
                    steps: clock.steps,
                }
            }
            Confirmation::Unhealthy(why) => {
                let ending = self
                    .undo(host, timings, &mut clock, format!("health checks failed: {why}"))
                    .await;
                ending.finish(desired, clock)
            }
            Confirmation::Lost => {
                let ending = self.wait_for_timer(host, timings, &mut clock).await;
                ending.finish(desired, clock)
            }
        }
    }

    /// Waits until the host's own timer rolled this switch back, and reports what it runs then.
    async fn wait_for_timer<H: NixHost>(
        &self,
        host: &H,
        timings: &DeployTimings,
        clock: &mut Clock,
    ) -> Ending {
        wait_for_host_rollback(host, self.previous.as_ref(), self.armed_at, timings, clock).await
    }

    /// Rolls this switch back now (or waits for the host's own timer when it cannot be reached).
    async fn undo<H: NixHost>(
        &self,
        host: &H,
        timings: &DeployTimings,
        clock: &mut Clock,
        why: String,
    ) -> Ending {
        roll_back(
            host,
            &self.id,
            self.previous.as_ref(),
            self.armed_at,
            timings,
            clock,
            why,
        )
        .await
    }
}

fn failure_result(e: &HostError) -> DeployResult {
    if e.is_unreachable() {
        DeployResult::Unreachable
    } else {
        DeployResult::Failed
    }
}

/// An outcome after a rollback, before its timings are attached.
struct Ending {
    result: DeployResult,
    current: Option<Generation>,
    message: String,
}

impl Ending {
    fn with_note(mut self, note: &str) -> Self {
        self.message = format!("{} ({note})", self.message);
        self
    }

    fn finish(self, desired: &StorePath, clock: Clock) -> DeployReport {
        DeployReport {
            result: self.result,
            desired: desired.clone(),
            current: self.current.as_ref().map(|g| g.path.clone()),
            generation: self.current.as_ref().map(|g| g.number),
            changed: true,
            message: self.message,
            steps: clock.steps,
        }
    }
}

async fn wait_for_activation<H: NixHost>(host: &H, id: &str, timings: &DeployTimings) -> Option<i32> {
    let deadline = Instant::now() + timings.activation_deadline;
    loop {
        // A lost connection is not the end: the activation runs detached; keep asking until the deadline.
        if let Ok(Some(code)) = host.activation_status(id).await {
            return Some(code);
        }
        if Instant::now() + timings.poll_interval > deadline {
            return None;
        }
        tokio::time::sleep(timings.poll_interval).await;
    }
}

enum Confirmation {
    Healthy,
    Unhealthy(String),
    Lost,
}

async fn confirm<H: NixHost>(
    host: &H,
    http: Option<&HttpCheck>,
    armed_at: Instant,
    timings: &DeployTimings,
) -> Confirmation {
    // Confirming after the host's own rollback fired would confirm nothing.
    let deadline = (Instant::now() + timings.confirm_deadline).min(armed_at + timings.rollback_after);
    loop {
        let last = match host.health(http).await {
            Ok(Health::Healthy) => return Confirmation::Healthy,
            Ok(Health::NotYet(why)) => Confirmation::Unhealthy(why),
            Err(e) if e.is_unreachable() => Confirmation::Lost,
            Err(e) => Confirmation::Unhealthy(e.to_string()),
        };
        if Instant::now() + timings.poll_interval > deadline {
            return last;
        }
        tokio::time::sleep(timings.poll_interval).await;
    }
}

/// Rolls back now; if the host cannot be reached for that, waits for its own timer instead.
async fn roll_back<H: NixHost>(
    host: &H,
    id: &str,
    previous: Option<&Generation>,
    armed_at: Instant,
    timings: &DeployTimings,
    clock: &mut Clock,
    why: String,
) -> Ending {
    match clock.time(Step::Rollback, host.roll_back(id)).await {
        Ok(()) => {}
        Err(e) if e.is_unreachable() => {
            return wait_for_host_rollback(host, previous, armed_at, timings, clock)
                .await
                .with_note(&why);
        }
        Err(e) => {
            return Ending {
                result: DeployResult::Unreachable,
                current: None,
                message: format!("{why}; the rollback failed: {e}"),
            };
        }
    }
    match host.current().await {
        Ok(current) if current.as_ref().map(|g| &g.path) == previous.map(|g| &g.path) => Ending {
            result: DeployResult::FailedRolledBack,
            message: format!("{why}; rolled back to {}", describe(previous)),
            current,
        },
        Ok(current) => Ending {
            result: DeployResult::Unreachable,
            message: format!(
                "{why}; after the rollback the profile is {} instead of {}",
                describe(current.as_ref()),
                describe(previous)
            ),
            current,
        },
        Err(e) => Ending {
            result: DeployResult::Unreachable,
            current: None,
            message: format!("{why}; rolled back, but the result could not be read: {e}"),
        },
    }
}

/// The host was lost: wait for its own rollback timer, then look again over a new connection.
async fn wait_for_host_rollback<H: NixHost>(
    host: &H,
    previous: Option<&Generation>,
    armed_at: Instant,
    timings: &DeployTimings,
    clock: &mut Clock,
) -> Ending {
    let fire = armed_at + timings.rollback_after + timings.rollback_slack;
    let started = Instant::now();
    tokio::time::sleep(fire.saturating_duration_since(Instant::now())).await;
    let deadline = Instant::now() + timings.confirm_deadline;
    let ending = loop {
        match host.current().await {
            Ok(current) if current.as_ref().map(|g| &g.path) == previous.map(|g| &g.path) => {
                break Ending {
                    result: DeployResult::UnconfirmedRolledBack,
                    message: format!(
                        "{} could not be confirmed over a new connection; it rolled itself back to {}",
                        host.name(),
                        describe(previous)
                    ),
                    current,
                };
            }
            Ok(current) => {
                break Ending {
                    result: DeployResult::Unreachable,
                    message: format!(
                        "{} could not be confirmed and still runs {} after its rollback timer",
                        host.name(),
                        describe(current.as_ref())
                    ),
                    current,
                };
            }
            Err(e) if Instant::now() + timings.poll_interval > deadline => {
                break Ending {
                    result: DeployResult::Unreachable,
                    current: None,
                    message: format!("{} is unreachable after its rollback timer: {e}", host.name()),
                };
            }
            Err(_) => tokio::time::sleep(timings.poll_interval).await,
        }
    };
    clock
        .steps
        .push((Step::Rollback, started.elapsed().as_secs_f64()));
    ending
}

fn describe(g: Option<&Generation>) -> String {
    g.map_or("no system profile".into(), |g| {
        format!("generation {} ({})", g.number, g.path)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::host::Inspection;
    use super::*;

    /// A host in memory: a profile with generations, scripted activation and health answers.
    #[derive(Default)]
    struct FakeHost {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        generations: Vec<Generation>,
        current: Option<usize>,
        armed: Option<Option<Generation>>,
        calls: Vec<String>,
        exit_code: i32,
        lose_connection_after_activation: bool,
        lost: bool,
        healthy: bool,
        activated: Option<StorePath>,
        /// Deploys an earlier run left armed, newest first (what `inspect` reports).
        pending: Vec<PendingDeploy>,
    }

    impl FakeHost {
        fn with(f: impl FnOnce(&mut FakeState)) -> Self {
            let host = FakeHost::default();
            {
                let mut s = host.state.lock().unwrap();
                s.healthy = true;
                f(&mut s);
            }
            host
        }
        fn calls(&self) -> Vec<String> {
            self.state.lock().unwrap().calls.clone()
        }
        fn profile(&self) -> Option<StorePath> {
            let s = self.state.lock().unwrap();
            s.current.map(|i| s.generations[i].path.clone())
        }
        fn fire(s: &mut FakeState) {
            if let Some(prev) = s.armed.take() {
                s.current = prev.and_then(|p| s.generations.iter().position(|g| g == &p));
                s.activated = s.current.map(|i| s.generations[i].path.clone());
                s.lost = false;
            }
        }
    }

    fn lost(s: &FakeState) -> Result<(), HostError> {
        if s.lost {
            Err(HostError::Unreachable {
                host: "fake".into(),
                reason: "Connection refused".into(),
            })
        } else {
            Ok(())
        }
    }

    impl NixHost for FakeHost {
        fn name(&self) -> &str {
            "fake"
        }
        async fn current(&self) -> Result<Option<Generation>, HostError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push("current".into());
            if s.lost {
                // Time has passed: the host's own timer fires.
                Self::fire(&mut s);
            }
            Ok(s.current.map(|i| s.generations[i].clone()))
        }
        async fn inspect(&self) -> Result<Inspection, HostError> {
            let current = self.current().await?;
            Ok(Inspection {
                current,
                pending: self.state.lock().unwrap().pending.clone(),
            })
        }
        async fn copy_closure(&self, path: &StorePath) -> Result<(), HostError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push(format!("copy {}", path.short_hash()));
            Ok(())
        }
        async fn arm_rollback(
            &self,
            _id: &str,
            previous: Option<&Generation>,
            _after: Duration,
        ) -> Result<(), HostError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push(format!("arm {:?}", previous.map(|g| g.number)));
            s.armed = Some(previous.cloned());
            Ok(())
        }
        async fn set_profile(&self, path: &StorePath) -> Result<Generation, HostError> {
            let mut s = self.state.lock().unwrap();
            let number = s.generations.iter().map(|g| g.number).max().unwrap_or(0) + 1;
            s.calls.push(format!("set {number}"));
            s.generations.push(Generation {
                number,
                path: path.clone(),
            });
            s.current = Some(s.generations.len() - 1);
            Ok(s.generations[s.generations.len() - 1].clone())
        }
        async fn activate(&self, _id: &str, path: &StorePath) -> Result<(), HostError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push("activate".into());
            s.activated = Some(path.clone());
            if s.lose_connection_after_activation {
                s.lost = true;
            }
            Ok(())
        }
        async fn activation_status(&self, _id: &str) -> Result<Option<i32>, HostError> {
            let s = self.state.lock().unwrap();
            lost(&s)?;
            Ok(Some(s.exit_code))
        }
        async fn roll_back(&self, id: &str) -> Result<(), HostError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push("rollback".into());
            lost(&s)?;
            s.pending.retain(|p| p.id != id);
            Self::fire(&mut s);
            Ok(())
        }
        async fn health(&self, _http: Option<&HttpCheck>) -> Result<Health, HostError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push("health".into());
            lost(&s)?;
            Ok(if s.healthy {
                Health::Healthy
            } else {
                Health::NotYet("HTTP check answered 502 (expected 200)".into())
            })
        }
        async fn disarm_rollback(&self, id: &str) -> Result<(), HostError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push(format!(
                "disarm {}",
                if id.starts_with("left-") { id } else { "new" }
            ));
            lost(&s)?;
            s.pending.retain(|p| p.id != id);
            s.armed = None;
            Ok(())
        }
    }

    fn sp(name: &str) -> StorePath {
        StorePath::new(&format!(
            "/nix/store/{name}aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system"
        ))
        .unwrap()
    }

    /// The shipped timings: the clock is paused, so minutes of waiting cost nothing and no test depends
    /// on how fast the machine is.
    fn fast() -> DeployTimings {
        DeployTimings::default()
    }

    fn at_generation_1() -> impl FnOnce(&mut FakeState) {
        |s| {
            s.generations.push(Generation {
                number: 1,
                path: sp("1"),
            });
            s.current = Some(0);
        }
    }

    #[test]
    fn a_host_already_at_the_desired_system_needs_nothing() {
        let current = Generation {
            number: 4,
            path: sp("1"),
        };
        assert_eq!(plan(Some(&current), &sp("1")), Plan::NothingToDo);
        assert_eq!(
            plan(Some(&current), &sp("2")),
            Plan::Switch {
                previous: Some(current),
                steps: vec![
                    Step::Copy,
                    Step::Arm,
                    Step::SetProfile,
                    Step::Activate,
                    Step::Confirm
                ],
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_deploy_arms_before_it_changes_the_profile_and_disarms_after_confirming() {
        let host = FakeHost::with(at_generation_1());
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(report.result, DeployResult::Applied, "{}", report.message);
        assert_eq!(report.generation, Some(2));
        assert_eq!(
            host.calls(),
            [
                "current",
                "copy 2aaaaaaaaaaa",
                "arm Some(1)",
                "set 2",
                "activate",
                "health",
                "disarm new"
            ]
        );
        let steps: Vec<Step> = report.steps.iter().map(|(s, _)| *s).collect();
        assert!(
            steps.contains(&Step::Copy) && steps.contains(&Step::Confirm),
            "{steps:?}"
        );
    }

    /// A host where an earlier run armed deploy `left-1` of `sp("2")` over generation 1 and stopped:
    /// `profile_set` says whether it got as far as pointing the profile at it.
    fn left_unconfirmed(profile_set: bool, started: bool, exit_code: Option<i32>) -> FakeHost {
        FakeHost::with(|s| {
            at_generation_1()(s);
            let previous = s.generations[0].clone();
            if profile_set {
                s.generations.push(Generation {
                    number: 2,
                    path: sp("2"),
                });
                s.current = Some(1);
            }
            s.armed = Some(Some(previous.clone()));
            s.pending = vec![PendingDeploy {
                id: "left-1".into(),
                armed_ago: Duration::from_secs(40),
                previous: Some(previous),
                activation_started: started,
                exit_code,
            }];
        })
    }

    /// The calls of a deploy of `sp("2")` that first undoes the left one (back to generation 1), then
    /// switches to a new generation `number`.
    fn undone_then_deployed_as(number: u32) -> Vec<String> {
        let set = format!("set {number}");
        [
            "current",
            "rollback",
            "current",
            "copy 2aaaaaaaaaaa",
            "arm Some(1)",
            set.as_str(),
            "activate",
            "health",
            "disarm new",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn a_deploy_left_before_its_activation_is_activated_confirmed_and_disarmed() {
        let host = left_unconfirmed(true, false, None);
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(report.result, DeployResult::Applied, "{}", report.message);
        assert!(report.changed);
        assert_eq!(report.generation, Some(2));
        assert_eq!(
            host.calls(),
            ["current", "activate", "health", "disarm left-1"],
            "the left deploy is finished under its own id: no second copy, arm or profile change"
        );
        assert_eq!(host.state.lock().unwrap().activated, Some(sp("2")));
        assert!(host.state.lock().unwrap().pending.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deploy_left_after_a_successful_activation_is_only_confirmed_and_disarmed() {
        let host = left_unconfirmed(true, true, Some(0));
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(report.result, DeployResult::Applied, "{}", report.message);
        assert_eq!(host.calls(), ["current", "health", "disarm left-1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deploy_left_with_a_failed_activation_is_rolled_back_then_deployed_afresh() {
        let host = left_unconfirmed(true, true, Some(4));
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(report.result, DeployResult::Applied, "{}", report.message);
        assert_eq!(
            host.calls(),
            undone_then_deployed_as(3),
            "the failed deploy is undone back to generation 1 before the new one is armed over it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_deploy_left_for_another_system_is_undone_before_anything_else_so_its_timer_cannot_undo_the_next()
     {
        // The earlier run armed a deploy of sp("3") and stopped before changing the profile.
        let host = left_unconfirmed(false, false, None);
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(report.result, DeployResult::Applied, "{}", report.message);
        assert_eq!(host.calls(), undone_then_deployed_as(2));
        let s = host.state.lock().unwrap();
        assert!(s.pending.is_empty(), "no armed rollback is left behind");
        assert_eq!(s.armed, None, "nothing armed once confirmed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_deploy_of_the_same_system_copies_and_activates_nothing() {
        let host = FakeHost::with(at_generation_1());
        let report = execute(&host, &sp("1"), None, &fast()).await;
        assert_eq!((report.result, report.changed), (DeployResult::Applied, false));
        assert_eq!(host.calls(), ["current"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_activation_is_rolled_back_at_once() {
        let host = FakeHost::with(|s| {
            at_generation_1()(s);
            s.exit_code = 4;
        });
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(
            report.result,
            DeployResult::FailedRolledBack,
            "{}",
            report.message
        );
        assert_eq!(host.profile(), Some(sp("1")));
        assert!(
            report.message.contains("exited with code 4"),
            "{}",
            report.message
        );
        assert!(!host.calls().contains(&"health".to_owned()));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_health_checks_roll_back() {
        let host = FakeHost::with(|s| {
            at_generation_1()(s);
            s.healthy = false;
        });
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(report.result, DeployResult::FailedRolledBack);
        assert!(
            report
                .message
                .contains("health checks failed: HTTP check answered 502"),
            "{}",
            report.message
        );
        assert_eq!(host.profile(), Some(sp("1")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_host_is_rolled_back_by_its_own_timer_and_reported_unconfirmed() {
        let host = FakeHost::with(|s| {
            at_generation_1()(s);
            s.lose_connection_after_activation = true;
        });
        let started = Instant::now();
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert!(
            started.elapsed() >= fast().rollback_after,
            "the rollback waited for the host's own timer ({:?})",
            started.elapsed()
        );
        assert_eq!(
            report.result,
            DeployResult::UnconfirmedRolledBack,
            "{}",
            report.message
        );
        assert_eq!(report.current, Some(sp("1")));
        assert!(!host.calls().contains(&"disarm new".to_owned()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_deploy_that_fails_leaves_no_profile() {
        let host = FakeHost::with(|s| s.exit_code = 1);
        let report = execute(&host, &sp("2"), None, &fast()).await;
        assert_eq!(
            report.result,
            DeployResult::FailedRolledBack,
            "{}",
            report.message
        );
        assert_eq!(host.profile(), None);
        assert!(
            report.message.contains("rolled back to no system profile"),
            "{}",
            report.message
        );
    }
}
