//! Property test: random and mutated specs go through parsing, admission and the operator's own checks
//! without a panic, and always end as either an accepted object that the typed API can read, or a non-empty
//! list of errors that each say something.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

mod support;

use crmguard::controllers::BuildContext;
use crmguard::document::{Document, parse_documents};
use crmguard::plan::plan;
use crmguard::validation::{admit, read_typed, with_defaults};
use proptest::prelude::*;
use serde_json::{Value, json};

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-100i64..70000).prop_map(|n| json!(n)),
        "[a-z0-9./:*-]{0,20}".prop_map(Value::String),
        prop::sample::select(vec![
            "",
            "0s",
            "26h",
            "-1h",
            "@daily",
            "15 2 * * *",
            "10.0.0.0/8",
            "::/0",
            "*",
            "https://x"
        ])
        .prop_map(|s| json!(s)),
        Just(json!({})),
        Just(json!([])),
    ]
}

/// Every JSON pointer into a value.
fn pointers(v: &Value, prefix: String, out: &mut Vec<String>) {
    out.push(prefix.clone());
    match v {
        Value::Object(o) => o
            .iter()
            .for_each(|(k, c)| pointers(c, format!("{prefix}/{}", k.replace('~', "~0").replace('/', "~1")), out)),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, c)| pointers(c, format!("{prefix}/{i}"), out)),
        _ => {}
    }
}

fn mutate(mut doc: Value, picks: &[(usize, Value, bool)]) -> Value {
    for (pick, new, delete) in picks {
        let mut ps = Vec::new();
        pointers(&doc, String::new(), &mut ps);
        let ps: Vec<_> = ps.into_iter().filter(|p| p.starts_with("/spec")).collect();
        if ps.is_empty() {
            break;
        }
        let p = &ps[pick % ps.len()];
        if *delete && p != "/spec" {
            support::remove(&mut doc, p);
        } else if let Some(slot) = doc.pointer_mut(p) {
            *slot = new.clone();
        }
    }
    doc
}

fn check(doc: Value) {
    let errors = admit(&doc);
    for e in &errors {
        assert!(!e.message.trim().is_empty(), "empty message for {}", e.field);
    }
    if errors.is_empty() {
        // Admitted by schema + CEL: the typed API reads it, or says which field it cannot hold.
        let defaulted = with_defaults(&doc);
        let readable = match doc["kind"].as_str().unwrap_or_default() {
            "CrmBackupPolicy" => read_typed::<crmguard::api::CrmBackupPolicy>(&defaulted).map(drop),
            "CrmRestore" => read_typed::<crmguard::api::CrmRestore>(&defaulted).map(drop),
            "AccessPolicy" => read_typed::<crmguard::api::AccessPolicy>(&defaulted).map(drop),
            "NetworkGuard" => read_typed::<crmguard::api::NetworkGuard>(&defaulted).map(drop),
            "AccessMonitor" => read_typed::<crmguard::api::AccessMonitor>(&defaulted).map(drop),
            _ => Ok(()),
        };
        if let Err(e) = readable {
            assert!(e.field.starts_with("spec."), "unreadable without a field path: {e}\n{doc:#}");
        }
    }
    let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
    let planned = plan(&[Document { source: "fuzz".into(), value: doc }], None, &BuildContext::default(), now);
    for p in planned {
        // Accepted resources create children; only an AccessPolicy whose teams have no Kubernetes grants
        // (Vault-only teams) and an AccessMonitor (which reads a log) may legitimately create none.
        assert!(
            p.skipped
                || !p.errors.is_empty()
                || !p.children.is_empty()
                || p.resource.starts_with("AccessPolicy")
                || p.resource.starts_with("AccessMonitor"),
            "{} accepted but created nothing",
            p.resource
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn mutated_examples_never_panic(
        which in 0usize..crmguard::api::KINDS.len(),
        picks in prop::collection::vec((any::<usize>(), leaf(), any::<bool>()), 1..4),
    ) {
        let doc = support::example(crmguard::api::KINDS[which]);
        check(mutate(doc, &picks));
    }

    #[test]
    fn arbitrary_yaml_never_panics(text in "[ -~\n]{0,200}") {
        if let Ok(docs) = parse_documents("fuzz.yaml", &text) {
            for d in docs {
                let _ = admit(&d.value);
            }
        }
    }
}
