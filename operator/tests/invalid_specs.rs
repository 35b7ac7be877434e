//! Bad input gets a clear error that says what is wrong and how to fix it. Each case mutates a valid example
//! and asserts the message a user sees from `crmguard plan` (the same the API server or the operator reports).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

mod support;

use crmguard::controllers::BuildContext;
use crmguard::document::Document;
use crmguard::plan::plan;
use serde_json::{Value, json};
use support::invalid_cases::cases;
use support::{example, set};

fn errors_for(doc: Value, extra: Vec<Value>) -> Vec<String> {
    let mut docs = vec![Document { source: "case.yaml".into(), value: doc }];
    docs.extend(extra.into_iter().map(|value| Document { source: "extra.yaml".into(), value }));
    let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
    plan(&docs, None, &BuildContext::default(), now)[0].errors.iter().map(ToString::to_string).collect()
}

#[test]
fn invalid_specs_are_refused_with_the_message_a_user_sees() {
    let cases = cases();
    assert!(cases.len() >= 20);
    let policy = example("CrmBackupPolicy");
    for c in cases {
        let errors = errors_for(c.document(), vec![policy.clone()]);
        let want = if c.field.is_empty() { String::new() } else { format!("{}: ", c.field) };
        assert!(
            errors.iter().any(|e| e.starts_with(&want) && e.contains(c.message)),
            "expected an error on {:?} containing {:?}, got {errors:#?}",
            c.field,
            c.message
        );
    }
}

#[test]
fn the_restore_spec_is_immutable() {
    let old = example("CrmRestore");
    let mut new = old.clone();
    set(&mut new, "/spec/target/database", json!("other_db"));
    let errors = crmguard::validation::admit_update(&new, Some(&old));
    assert!(errors.iter().any(|e| e.message.contains("one-shot request")), "{errors:?}");
    assert!(crmguard::validation::admit_update(&old, Some(&old)).is_empty());
}

/// Issue 15, item 5: quantities the CRD schema cannot check (Kubernetes' own ResourceRequirements schema takes
/// any string) but the API server refuses in the CronJob's pod template are refused here, naming the field.
/// Expected from the Kubernetes docs ("Resource units", and "a request must not exceed its limit").
#[test]
fn job_resources_the_api_server_would_refuse_are_named() {
    for (resources, field, message) in [
        (
            json!({"requests": {"cpu": "lots"}}),
            "spec.jobResources.requests.cpu",
            "\"lots\" is not a Kubernetes quantity",
        ),
        (
            json!({"limits": {"memory": "1GB"}}),
            "spec.jobResources.limits.memory",
            "\"1GB\" is not a Kubernetes quantity",
        ),
        (json!({"requests": {"cpu": "-1"}}), "spec.jobResources.requests.cpu", "must not be negative"),
        (
            json!({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}),
            "spec.jobResources.requests.memory",
            "2Gi is more than the limit 1Gi",
        ),
    ] {
        let mut doc = example("CrmBackupPolicy");
        set(&mut doc, "/spec/jobResources", resources);
        let errors = errors_for(doc, vec![]);
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{field}: ")) && e.contains(message)),
            "{field}: {message}: {errors:#?}"
        );
    }
    let mut fine = example("CrmBackupPolicy");
    set(
        &mut fine,
        "/spec/jobResources",
        json!({"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}),
    );
    assert_eq!(errors_for(fine, vec![]), Vec::<String>::new());
}
