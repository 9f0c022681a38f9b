//! Checks an operator's settings against an Application's settings schema (the JSON Schema subset the
//! catalog uses: object properties, `additionalProperties: false`, types, enums, numeric bounds).

use serde_json::{Map, Value};

fn type_matches(expected: &str, value: &Value) -> bool {
    match expected {
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("the string {s:?}"),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::Null => "null".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// Every problem of `settings` under `schema`, each as `(setting name, message)`.
pub fn check(schema: Option<&Value>, settings: &Map<String, Value>) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let Some(schema) = schema else {
        for name in settings.keys() {
            problems.push((name.clone(), "this application takes no settings".to_owned()));
        }
        return problems;
    };
    let properties = schema.get("properties").and_then(Value::as_object);
    let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
    for (name, value) in settings {
        let Some(property) = properties.and_then(|p| p.get(name)) else {
            if closed {
                let known: Vec<&str> = properties
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                let hint = crate::yaml::suggestion(name, &known)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                problems.push((
                    name.clone(),
                    format!("unknown setting{hint}; allowed: {}", known.join(", ")),
                ));
            }
            continue;
        };
        if let Some(expected) = property.get("type").and_then(Value::as_str)
            && !type_matches(expected, value)
        {
            problems.push((
                name.clone(),
                format!("expected {expected}, found {}", describe(value)),
            ));
            continue;
        }
        if let Some(allowed) = property.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
            problems.push((
                name.clone(),
                format!("{} is not one of {}", describe(value), list.join(", ")),
            ));
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = property
                .get("minimum")
                .and_then(Value::as_f64)
                .filter(|min| n < *min)
            {
                problems.push((name.clone(), format!("{n} is below the minimum {min}")));
            }
            if let Some(max) = property
                .get("maximum")
                .and_then(Value::as_f64)
                .filter(|max| n > *max)
            {
                problems.push((name.clone(), format!("{n} is above the maximum {max}")));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "singleUserMode": {"type": "boolean"},
                "registrations": {"type": "string", "enum": ["open", "approval", "closed"]},
                "maxTootChars": {"type": "integer", "minimum": 500, "maximum": 10000}
            }
        })
    }

    fn settings(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn valid_settings_pass() {
        let ok = settings(json!({"singleUserMode": true, "registrations": "open", "maxTootChars": 600}));
        assert!(check(Some(&schema()), &ok).is_empty());
    }

    #[test]
    fn an_unknown_setting_is_named_with_a_suggestion() {
        let problems = check(Some(&schema()), &settings(json!({"singleUsermode": true})));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "singleUsermode");
        assert!(
            problems[0].1.contains("did you mean `singleUserMode`?"),
            "{}",
            problems[0].1
        );
    }

    #[test]
    fn wrong_types_enums_and_bounds_are_refused() {
        let bad = settings(json!({"singleUserMode": "yes", "registrations": "everyone", "maxTootChars": 20}));
        let problems = check(Some(&schema()), &bad);
        let messages: Vec<String> = problems.iter().map(|(n, m)| format!("{n}: {m}")).collect();
        assert_eq!(
            messages,
            vec![
                "maxTootChars: 20 is below the minimum 500".to_owned(),
                "registrations: the string \"everyone\" is not one of \"open\", \"approval\", \"closed\""
                    .to_owned(),
                "singleUserMode: expected boolean, found the string \"yes\"".to_owned(),
            ]
        );
    }

    #[test]
    fn an_application_without_a_schema_takes_no_settings() {
        let problems = check(None, &settings(json!({"x": 1})));
        assert_eq!(
            problems,
            vec![("x".to_owned(), "this application takes no settings".to_owned())]
        );
    }
}
