//! Object metrics: counts by kind and readiness, and per-object series for the objects that need attention.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{IntGaugeVec, Opts, Registry};

use crate::api::{Condition, ConditionStatus, Kind, ObjectKey, condition_types};

/// The series an object currently has, so they can be replaced or removed exactly, and the readiness it
/// is counted under.
#[derive(Default)]
struct Series {
    info: Vec<String>,
    conditions: Vec<Vec<String>>,
    suspend: bool,
    counted: Option<ConditionStatus>,
}

/// The condition types exported as `fediversity_reconcile_condition` series.
const METRIC_CONDITIONS: [&str; 2] = [condition_types::READY, condition_types::STALLED];

/// Gauges describing the objects. Every object is counted in `fediversity_objects{kind,ready}`; an object
/// that needs attention (not Ready, Stalled or suspended) also has its own series, which alerts name it
/// by. A healthy object has none: at 10,000 objects, eight series each made a scrape 8 MB and half a
/// CPU-second, for series that only ever said "fine"; its details are in the API.
pub struct ObjectMetrics {
    objects: IntGaugeVec,
    info: IntGaugeVec,
    condition: IntGaugeVec,
    suspend: IntGaugeVec,
    series: Mutex<HashMap<ObjectKey, Series>>,
}

/// What [`ObjectMetrics::observe`] records of one object.
pub struct ObjectFacts<'a> {
    /// `True`, `False` or `Unknown`.
    pub ready: ConditionStatus,
    /// Whether reconciles are suspended.
    pub suspended: bool,
    /// The source revision of its spec.
    pub revision: &'a str,
    /// Its conditions.
    pub conditions: &'a [Condition],
}

impl ObjectMetrics {
    /// Creates the gauges and registers them.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let objects = IntGaugeVec::new(
            Opts::new(
                "fediversity_objects",
                "Desired objects by kind and Ready status (True, False, Unknown).",
            ),
            &["kind", "ready"],
        )?;
        for kind in [Kind::RuntimeEnvironment, Kind::Application, Kind::Deployment] {
            for ready in [
                ConditionStatus::True,
                ConditionStatus::False,
                ConditionStatus::Unknown,
            ] {
                objects
                    .with_label_values(&[kind.as_str(), &ready.to_string()])
                    .set(0);
            }
        }
        let info = IntGaugeVec::new(
            Opts::new(
                "fediversity_resource_info",
                "One series per object that needs attention (not Ready, Stalled or suspended), with its \
                 readiness and revision.",
            ),
            &["kind", "name", "ready", "suspended", "revision"],
        )?;
        let condition = IntGaugeVec::new(
            Opts::new(
                "fediversity_reconcile_condition",
                "For each object that needs attention: 1 for the current status of Ready and Stalled, 0 for \
                 the others.",
            ),
            &["kind", "name", "type", "status"],
        )?;
        let suspend = IntGaugeVec::new(
            Opts::new(
                "fediversity_suspend_status",
                "1 while an object's reconciles are suspended (spec.suspend); present for objects that \
                 need attention.",
            ),
            &["kind", "name"],
        )?;
        registry.register(Box::new(objects.clone()))?;
        registry.register(Box::new(info.clone()))?;
        registry.register(Box::new(condition.clone()))?;
        registry.register(Box::new(suspend.clone()))?;
        Ok(Self {
            objects,
            suspend,
            info,
            condition,
            series: Mutex::new(HashMap::new()),
        })
    }

    /// Counts the object under its readiness, and gives it series describing `facts` when it needs
    /// attention (removing them when it no longer does).
    pub fn observe(&self, key: &ObjectKey, facts: &ObjectFacts<'_>) {
        let kind = key.kind.as_str().to_owned();
        let name = key.name.to_string();
        let stalled = facts
            .conditions
            .iter()
            .any(|c| c.type_ == condition_types::STALLED && c.status == ConditionStatus::True);
        let attention = facts.ready != ConditionStatus::True || stalled || facts.suspended;
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = series.remove(key).unwrap_or_default();
        if old.counted != Some(facts.ready) {
            if let Some(before) = old.counted {
                self.objects
                    .with_label_values(&[kind.as_str(), &before.to_string()])
                    .dec();
            }
            self.objects
                .with_label_values(&[kind.as_str(), &facts.ready.to_string()])
                .inc();
        }
        let mut new = Series {
            counted: Some(facts.ready),
            ..Series::default()
        };
        if attention {
            new.info = vec![
                kind.clone(),
                name.clone(),
                facts.ready.to_string(),
                facts.suspended.to_string(),
                facts.revision.to_owned(),
            ];
            // Flux's encoding for the conditions alerts use (Ready, Stalled): one series per possible
            // status, 1 for the current one and 0 for the others, so every selector finds a series.
            // Other conditions stay in status only.
            for condition in facts
                .conditions
                .iter()
                .filter(|c| METRIC_CONDITIONS.contains(&c.type_.as_str()))
            {
                for status in [
                    ConditionStatus::True,
                    ConditionStatus::False,
                    ConditionStatus::Unknown,
                ] {
                    let labels = vec![
                        kind.clone(),
                        name.clone(),
                        condition.type_.clone(),
                        status.to_string(),
                    ];
                    self.condition
                        .with_label_values(&labels.iter().map(String::as_str).collect::<Vec<_>>())
                        .set(i64::from(status == condition.status));
                    new.conditions.push(labels);
                }
            }
            self.info
                .with_label_values(&new.info.iter().map(String::as_str).collect::<Vec<_>>())
                .set(1);
            self.suspend
                .with_label_values(&[kind.as_str(), name.as_str()])
                .set(i64::from(facts.suspended));
            new.suspend = true;
        }
        self.remove_series(key, &old, &new);
        series.insert(key.clone(), new);
    }

    /// Removes the series of `old` that `new` does not have.
    fn remove_series(&self, key: &ObjectKey, old: &Series, new: &Series) {
        if !old.info.is_empty() && old.info != new.info {
            let _ = self
                .info
                .remove_label_values(&old.info.iter().map(String::as_str).collect::<Vec<_>>());
        }
        for labels in &old.conditions {
            if !new.conditions.contains(labels) {
                let _ = self
                    .condition
                    .remove_label_values(&labels.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
        if old.suspend && !new.suspend {
            let _ = self
                .suspend
                .remove_label_values(&[key.kind.as_str(), &key.name.to_string()]);
        }
    }

    /// Removes every series of the object and its count.
    pub fn forget(&self, key: &ObjectKey) {
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = series.remove(key) {
            if let Some(counted) = old.counted {
                self.objects
                    .with_label_values(&[key.kind.as_str(), &counted.to_string()])
                    .dec();
            }
            self.remove_series(key, &old, &Series::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(type_: &str, status: ConditionStatus) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status,
            reason: "Test".to_owned(),
            message: String::new(),
            last_transition_time: crate::api::Timestamp::now(),
            observed_generation: 1,
        }
    }

    /// The scrape's lines that start with `prefix`.
    fn lines(registry: &Registry, prefix: &str) -> Vec<String> {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    fn observe(metrics: &ObjectMetrics, key: &ObjectKey, ready: ConditionStatus, suspended: bool) {
        let conditions = [
            condition(condition_types::READY, ready),
            condition(condition_types::STALLED, ConditionStatus::False),
        ];
        metrics.observe(
            key,
            &ObjectFacts {
                ready,
                suspended,
                revision: "abc",
                conditions: &conditions,
            },
        );
    }

    #[test]
    fn a_healthy_object_is_counted_and_one_that_needs_attention_has_its_own_series() {
        let registry = Registry::new();
        let metrics = ObjectMetrics::register(&registry).unwrap();
        let key = ObjectKey::new(Kind::Deployment, "uu");
        let count = |ready: &str| {
            lines(
                &registry,
                &format!("fediversity_objects{{kind=\"Deployment\",ready=\"{ready}\"}} "),
            )
        };
        assert_eq!(
            count("True"),
            vec!["fediversity_objects{kind=\"Deployment\",ready=\"True\"} 0"]
        );

        observe(&metrics, &key, ConditionStatus::False, false);
        assert_eq!(
            count("False"),
            vec!["fediversity_objects{kind=\"Deployment\",ready=\"False\"} 1"]
        );
        assert_eq!(
            lines(
                &registry,
                "fediversity_reconcile_condition{kind=\"Deployment\",name=\"uu\",status=\"False\",type=\"Ready\"}"
            ),
            vec![
                "fediversity_reconcile_condition{kind=\"Deployment\",name=\"uu\",status=\"False\",type=\"Ready\"} 1"
            ]
        );
        assert_eq!(lines(&registry, "fediversity_resource_info{").len(), 1);

        observe(&metrics, &key, ConditionStatus::True, false);
        assert_eq!(
            count("False"),
            vec!["fediversity_objects{kind=\"Deployment\",ready=\"False\"} 0"]
        );
        assert_eq!(
            count("True"),
            vec!["fediversity_objects{kind=\"Deployment\",ready=\"True\"} 1"]
        );
        for family in [
            "fediversity_resource_info{",
            "fediversity_reconcile_condition{",
            "fediversity_suspend_status{",
        ] {
            assert_eq!(
                lines(&registry, family),
                Vec::<String>::new(),
                "{family} of a healthy object"
            );
        }

        observe(&metrics, &key, ConditionStatus::True, true);
        assert_eq!(
            lines(&registry, "fediversity_suspend_status{"),
            vec!["fediversity_suspend_status{kind=\"Deployment\",name=\"uu\"} 1"],
            "a suspended object needs attention"
        );

        metrics.forget(&key);
        assert_eq!(
            count("True"),
            vec!["fediversity_objects{kind=\"Deployment\",ready=\"True\"} 0"]
        );
        assert_eq!(
            lines(&registry, "fediversity_suspend_status{"),
            Vec::<String>::new()
        );
    }
}
