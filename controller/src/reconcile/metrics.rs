//! Per-object metrics: `fediversity_resource_info` and `fediversity_reconcile_condition`, removed with the object.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{IntGaugeVec, Opts, Registry};

use crate::api::{Condition, ConditionStatus, ObjectKey, condition_types};

/// The series an object currently has, so they can be replaced or removed exactly.
#[derive(Default)]
struct Series {
    info: Vec<String>,
    conditions: Vec<Vec<String>>,
}

/// The condition types exported as `fediversity_reconcile_condition` series.
const METRIC_CONDITIONS: [&str; 2] = [condition_types::READY, condition_types::STALLED];

/// Gauges describing each object; every series of an object goes away with it.
pub struct ObjectMetrics {
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
        let info = IntGaugeVec::new(
            Opts::new(
                "fediversity_resource_info",
                "One series per desired object, with its readiness and revision.",
            ),
            &["kind", "name", "ready", "suspended", "revision"],
        )?;
        let condition = IntGaugeVec::new(
            Opts::new(
                "fediversity_reconcile_condition",
                "1 for the current status of each condition of each object.",
            ),
            &["kind", "name", "type", "status"],
        )?;
        let suspend = IntGaugeVec::new(
            Opts::new(
                "fediversity_suspend_status",
                "1 while an object's reconciles are suspended (spec.suspend), 0 otherwise.",
            ),
            &["kind", "name"],
        )?;
        registry.register(Box::new(info.clone()))?;
        registry.register(Box::new(condition.clone()))?;
        registry.register(Box::new(suspend.clone()))?;
        Ok(Self {
            suspend,
            info,
            condition,
            series: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the object's series by ones describing `facts`.
    pub fn observe(&self, key: &ObjectKey, facts: &ObjectFacts<'_>) {
        let kind = key.kind.as_str().to_owned();
        let name = key.name.to_string();
        let info = vec![
            kind.clone(),
            name.clone(),
            facts.ready.to_string(),
            facts.suspended.to_string(),
            facts.revision.to_owned(),
        ];
        // Flux's encoding for the conditions alerts use (Ready, Stalled): one series per possible status,
        // 1 for the current one and 0 for the others, so every selector finds a series. Other conditions
        // stay in status only.
        let mut conditions: Vec<(Vec<String>, i64)> = Vec::new();
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
                conditions.push((labels, i64::from(status == condition.status)));
            }
        }
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = series.remove(key).unwrap_or_default();
        if old.info != info && !old.info.is_empty() {
            let _ = self
                .info
                .remove_label_values(&old.info.iter().map(String::as_str).collect::<Vec<_>>());
        }
        for labels in &old.conditions {
            if !conditions.iter().any(|(l, _)| l == labels) {
                let _ = self
                    .condition
                    .remove_label_values(&labels.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
        self.info
            .with_label_values(&info.iter().map(String::as_str).collect::<Vec<_>>())
            .set(1);
        for (labels, value) in &conditions {
            self.condition
                .with_label_values(&labels.iter().map(String::as_str).collect::<Vec<_>>())
                .set(*value);
        }
        self.suspend
            .with_label_values(&[kind.as_str(), name.as_str()])
            .set(i64::from(facts.suspended));
        let conditions = conditions.into_iter().map(|(labels, _)| labels).collect();
        series.insert(key.clone(), Series { info, conditions });
    }

    /// Removes every series of the object.
    pub fn forget(&self, key: &ObjectKey) {
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = series.remove(key) {
            let _ = self
                .suspend
                .remove_label_values(&[key.kind.as_str(), &key.name.to_string()]);
            let _ = self
                .info
                .remove_label_values(&old.info.iter().map(String::as_str).collect::<Vec<_>>());
            for labels in &old.conditions {
                let _ = self
                    .condition
                    .remove_label_values(&labels.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
    }
}
