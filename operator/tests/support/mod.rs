//! Shared helpers of the integration tests: the examples, and JSON mutation.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod invalid_cases;

use std::path::PathBuf;

use crmguard::document::{Document, load};
use serde_json::Value;

pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

pub fn examples() -> Vec<Document> {
    load(&[examples_dir()]).expect("examples load")
}

/// The example of a kind.
pub fn example(kind: &str) -> Value {
    examples()
        .into_iter()
        .find(|d| d.value["kind"] == kind)
        .unwrap_or_else(|| panic!("no example of kind {kind}"))
        .value
}

/// Sets the value at a JSON pointer, creating objects on the way.
pub fn set(v: &mut Value, pointer: &str, new: Value) {
    let mut cur = v;
    let parts: Vec<String> = pointer.split('/').skip(1).map(|p| p.replace("~1", "/").replace("~0", "~")).collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        cur = match cur {
            Value::Array(a) => {
                let idx: usize = part.parse().expect("array index");
                if last {
                    a[idx] = new;
                    return;
                }
                &mut a[idx]
            }
            other => {
                if !other.is_object() {
                    *other = Value::Object(Default::default());
                }
                let obj = other.as_object_mut().expect("object");
                if last {
                    obj.insert(part.to_string(), new);
                    return;
                }
                obj.entry(part.to_string()).or_insert(Value::Object(Default::default()))
            }
        };
    }
}

/// Removes the value at a JSON pointer.
pub fn remove(v: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let key = key.replace("~1", "/").replace("~0", "~");
    let key = key.as_str();
    match v.pointer_mut(parent).expect("parent exists") {
        Value::Object(o) => {
            o.remove(key).expect("field exists");
        }
        Value::Array(a) => {
            a.remove(key.parse::<usize>().expect("index"));
        }
        _ => panic!("not a container"),
    }
}
