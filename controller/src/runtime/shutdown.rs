//! Graceful shutdown: SIGTERM or SIGINT asks to drain, a second signal asks to abort.

use tokio::sync::{mpsc, watch};

/// Where the daemon is in its shutdown, as the runner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ShutdownState {
    /// Normal operation.
    #[default]
    Running,
    /// Start nothing new; let running reconciles finish within the grace period.
    Draining,
    /// Stop now: abort whatever still runs.
    Aborting,
}

impl ShutdownState {
    /// The state after one more shutdown signal.
    pub fn escalate(self) -> Self {
        match self {
            Self::Running => Self::Draining,
            Self::Draining | Self::Aborting => Self::Aborting,
        }
    }
}

/// Installs SIGTERM and SIGINT handlers and returns the state they drive: the first signal moves it to
/// [`ShutdownState::Draining`], the second to [`ShutdownState::Aborting`]. Must be called inside a tokio
/// runtime; fails when the handlers cannot be installed.
pub fn on_signals() -> std::io::Result<watch::Receiver<ShutdownState>> {
    let (tx, rx) = watch::channel(ShutdownState::Running);
    let mut signals = Signals::install()?;
    let (signal_tx, signal_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while signals.next().await {
            if signal_tx.send(()).is_err() {
                return;
            }
        }
    });
    tokio::spawn(relay(signal_rx, tx));
    Ok(rx)
}

/// Moves `tx` one step along on each signal received, until `Aborting`, until signals end, or until
/// nobody listens any more.
async fn relay(mut signals: mpsc::UnboundedReceiver<()>, tx: watch::Sender<ShutdownState>) {
    loop {
        tokio::select! {
            got = signals.recv() => if got.is_none() { return },
            () = tx.closed() => return,
        }
        let next = tx.borrow().escalate();
        match next {
            ShutdownState::Draining => {
                tracing::info!("shutdown signal received: draining, send again to abort")
            }
            ShutdownState::Aborting => tracing::warn!("second shutdown signal received: aborting"),
            ShutdownState::Running => {}
        }
        tx.send_replace(next);
        if next == ShutdownState::Aborting {
            return;
        }
    }
}

/// The process's termination signals.
#[cfg(unix)]
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for either signal; `false` when neither can arrive any more.
    async fn next(&mut self) -> bool {
        tokio::select! {
            got = self.terminate.recv() => got.is_some(),
            got = self.interrupt.recv() => got.is_some(),
        }
    }
}

/// The process's termination signal (Ctrl-C) where Unix signals do not exist.
#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self)
    }

    /// Waits for Ctrl-C; `false` when it cannot be listened for.
    async fn next(&mut self) -> bool {
        tokio::signal::ctrl_c().await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_signal_escalates_one_step_and_aborting_stays() {
        assert_eq!(ShutdownState::Running.escalate(), ShutdownState::Draining);
        assert_eq!(ShutdownState::Draining.escalate(), ShutdownState::Aborting);
        assert_eq!(ShutdownState::Aborting.escalate(), ShutdownState::Aborting);
    }

    #[tokio::test(start_paused = true)]
    async fn first_signal_drains_and_second_aborts() {
        let (signal_tx, signal_rx) = mpsc::unbounded_channel::<()>();
        let (tx, mut rx) = watch::channel(ShutdownState::Running);
        let relay = tokio::spawn(relay(signal_rx, tx));

        signal_tx.send(()).ok();
        rx.changed().await.ok();
        assert_eq!(*rx.borrow_and_update(), ShutdownState::Draining);

        signal_tx.send(()).ok();
        rx.changed().await.ok();
        assert_eq!(*rx.borrow_and_update(), ShutdownState::Aborting);
        assert!(relay.await.is_ok(), "the relay ends after aborting");
    }

    #[tokio::test]
    async fn a_real_sigterm_moves_the_state_to_draining() {
        let mut rx = on_signals().expect("signal handlers install");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
            .await
            .expect("the signal arrives")
            .expect("the relay is alive");
        assert_eq!(*rx.borrow(), ShutdownState::Draining);
    }
}
