//! Progress of a long reconcile: steps reported from inside providers, shown in status while it runs.
//!
//! The dispatcher runs a Deployment's reconcile inside [`Sink::scope`]; code anywhere below it calls
//! [`report`] without knowing which object it works for. Outside a scope, [`report`] does nothing.

use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static SINK: Sink;
}

/// Where progress messages of one reconcile go.
#[derive(Clone)]
pub struct Sink(Arc<dyn Fn(&str) + Send + Sync>);

impl Sink {
    /// A sink calling `f` with every message.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Runs `f` with this sink as the current one.
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        SINK.scope(self, f).await
    }
}

/// Reports one step of the current reconcile (`"uni-mastodon: starting VM 20001"`).
pub fn report(message: impl AsRef<str>) {
    let _ = SINK.try_with(|sink| (sink.0)(message.as_ref()));
}

/// The current sink, to carry into a spawned task (task-locals do not follow `tokio::spawn`).
pub fn current() -> Option<Sink> {
    SINK.try_with(Clone::clone).ok()
}

/// Runs `f` inside `sink` when there is one.
pub async fn within<F: Future>(sink: Option<Sink>, f: F) -> F::Output {
    match sink {
        Some(sink) => sink.scope(f).await,
        None => f.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn reports_reach_the_sink_of_their_scope_and_spawned_tasks_that_carry_it() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let seen = seen.clone();
            Sink::new(move |m| seen.lock().unwrap().push(m.to_owned()))
        };
        report("outside any scope");
        sink.scope(async {
            report("cloning");
            let carried = current();
            tokio::spawn(within(carried, async { report("from a task") }))
                .await
                .unwrap();
            tokio::spawn(async { report("lost: the task did not carry the sink") })
                .await
                .unwrap();
        })
        .await;
        assert_eq!(*seen.lock().unwrap(), vec!["cloning", "from a task"]);
    }
}
