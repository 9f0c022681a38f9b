//! Who waits on which dependency, so that a dependency turning Ready wakes only the objects waiting on it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::api::ObjectKey;

/// Objects that found a dependency missing or not Ready, by that dependency.
#[derive(Debug, Default)]
pub struct Waiters {
    inner: Mutex<HashMap<ObjectKey, HashSet<ObjectKey>>>,
}

impl Waiters {
    /// Records that `waiter` waits on `dependency` (until the dependency next turns Ready).
    pub fn wait(&self, dependency: &ObjectKey, waiter: &ObjectKey) {
        self.lock()
            .entry(dependency.clone())
            .or_default()
            .insert(waiter.clone());
    }

    /// The objects waiting on `dependency`, which stop waiting: the caller wakes them.
    pub fn take(&self, dependency: &ObjectKey) -> Vec<ObjectKey> {
        let mut waiting: Vec<ObjectKey> = self
            .lock()
            .remove(dependency)
            .map(|set| set.into_iter().collect())
            .unwrap_or_default();
        waiting.sort();
        waiting
    }

    /// How many (dependency, waiter) pairs are recorded.
    pub fn len(&self) -> usize {
        self.lock().values().map(HashSet::len).sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, HashSet<ObjectKey>>> {
        // A panic while holding the lock leaves a consistent map (every operation is one call).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Kind;

    fn key(kind: Kind, name: &str) -> ObjectKey {
        ObjectKey::new(kind, name)
    }

    #[test]
    fn taking_a_dependency_returns_its_waiters_once() {
        let waiters = Waiters::default();
        let env = key(Kind::RuntimeEnvironment, "env");
        let app = key(Kind::Application, "mastodon");
        waiters.wait(&env, &key(Kind::Deployment, "b"));
        waiters.wait(&env, &key(Kind::Deployment, "a"));
        waiters.wait(&env, &key(Kind::Deployment, "a"));
        waiters.wait(&app, &key(Kind::Deployment, "c"));
        assert_eq!(waiters.len(), 3);
        assert_eq!(
            waiters.take(&env),
            vec![key(Kind::Deployment, "a"), key(Kind::Deployment, "b")]
        );
        assert!(waiters.take(&env).is_empty(), "a second take finds nobody");
        assert_eq!(waiters.take(&app), vec![key(Kind::Deployment, "c")]);
        assert!(waiters.is_empty());
    }
}
