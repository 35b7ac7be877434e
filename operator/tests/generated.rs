//! Generated files are committed and never edited by hand: crds/ and the chart's copy equal what
//! `crmguard crd` renders now (run scripts/generate to refresh them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::path::PathBuf;

#[test]
fn committed_crds_match_the_code() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = crmguard::api::crd_files().unwrap();
    assert_eq!(files.len(), crmguard::api::KINDS.len());
    for dir in ["crds", "charts/crmguard/crds", "manifests/crds"] {
        for (name, text) in &files {
            let path = root.join(dir).join(name);
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; run scripts/generate", path.display()));
            assert!(committed == *text, "{} is stale; run scripts/generate and commit the result", path.display());
        }
        let count = std::fs::read_dir(root.join(dir)).unwrap().count();
        assert_eq!(count, files.len(), "{dir} holds files that `crmguard crd` no longer generates");
    }
}

#[test]
fn crds_carry_names_categories_columns_and_descriptions() {
    for crd in crmguard::api::crds() {
        let names = &crd.spec.names;
        assert_eq!(names.categories.as_deref(), Some(&["crmguard".to_string()][..]));
        assert_eq!(names.short_names.as_ref().map(Vec::len), Some(1), "{}", names.kind);
        let version = &crd.spec.versions[0];
        assert!(
            version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{} has a status subresource",
            names.kind
        );
        let columns: Vec<&str> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert!(columns.contains(&"Age"), "{}: {columns:?}", names.kind);
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        assert!(
            !schema["description"].as_str().unwrap().contains("Auto-generated"),
            "{} has a real description",
            names.kind
        );
        // Every spec field documents itself for `kubectl explain`.
        fn walk(v: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, child) in props {
                    let p = format!("{path}.{k}");
                    if child.get("description").is_none() {
                        missing.push(p.clone());
                    }
                    walk(child, &p, missing);
                }
            }
            if let Some(items) = v.get("items") {
                walk(items, &format!("{path}[]"), missing);
            }
        }
        let mut missing = vec![];
        walk(&schema["properties"]["spec"], "spec", &mut missing);
        walk(&schema["properties"]["status"], "status", &mut missing);
        assert!(missing.is_empty(), "{} fields without description: {missing:?}", names.kind);
    }
}

/// A real API server refuses a CRD whose CEL rules do not compile, use variables outside their scope, or
/// exceed the cost budget (which happens when lists or strings lack maxItems/maxLength). Check statically.
#[test]
fn cel_rules_compile_and_fit_the_api_server_cost_budget() {
    use kube::core::cel::{ScopeContext, analyze_rule, cel::Program, compile_schema};
    fn walk(node: &serde_json::Value, path: &str, problems: &mut Vec<String>, count: &mut usize) {
        if let Some(rules) = node.get("x-kubernetes-validations").and_then(|r| r.as_array()) {
            let compiled = compile_schema(node);
            for r in rules {
                let rule = r["rule"].as_str().unwrap();
                *count += 1;
                assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}: rule {rule} has no message");
                if let Err(e) = Program::compile(rule) {
                    problems.push(format!("{path}: {rule}: does not compile: {e}"));
                }
                for w in analyze_rule(rule, &compiled, ScopeContext::CrdValidation) {
                    // The analyser also flags variables bound by a comprehension macro (`all(t, ...)`); those
                    // are legal in Kubernetes. Anything else is a real problem.
                    let bound = w.message.split('\'').nth(1).is_some_and(|var| {
                        ["all", "exists", "exists_one", "map", "filter"]
                            .iter()
                            .any(|m| rule.contains(&format!(".{m}({var},")))
                    });
                    if matches!(w.kind, kube::core::cel::WarningKind::WrongScope) && bound {
                        continue;
                    }
                    problems.push(format!("{path}: {rule}: {:?}: {}", w.kind, w.message));
                }
            }
        }
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (k, child) in props {
                walk(child, &format!("{path}.{k}"), problems, count);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), problems, count);
        }
    }
    let mut problems = vec![];
    let mut count = 0;
    for crd in crmguard::api::crds() {
        let v = crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap();
        walk(&serde_json::to_value(v).unwrap(), &crd.spec.names.kind, &mut problems, &mut count);
    }
    assert!(count >= 20, "expected the CEL rules of all kinds, found {count}");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The README's chart-values table names every key of values.schema.json (leaf keys, dotted).
#[test]
fn readme_documents_every_chart_value() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("charts/crmguard/values.schema.json")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    fn leaves(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        match v.get("properties").and_then(|p| p.as_object()) {
            Some(props) => {
                for (k, child) in props {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(child, &path, out);
                }
            }
            None => out.push(prefix.to_string()),
        }
    }
    let mut keys = vec![];
    leaves(&schema, "", &mut keys);
    assert!(keys.len() >= 15, "{keys:?}");
    let missing: Vec<&String> = keys.iter().filter(|k| !readme.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "README's chart-values table lacks {missing:?}");
}

/// The Dockerfile builds what the benchmarks measure and runs as the user the pods declare, with the database
/// clients the jobs call, on the toolchain the workspace requires.
#[test]
fn dockerfile_agrees_with_the_pods_and_the_workspace() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let run_as = crmguard::controllers::backup_policy::build::RUN_AS;
    assert!(docker.contains(&format!("USER {run_as}:{run_as}")), "image user must be the pods' runAsUser {run_as}");
    let chart = std::fs::read_to_string(root.join("charts/crmguard/templates/deployment.yaml")).unwrap();
    assert!(chart.contains(&format!("runAsUser: {run_as}")), "the chart's operator pod runs as {run_as}");
    assert!(docker.contains("cargo build --locked --profile dist -p crmguard"));
    assert!(docker.contains("ENTRYPOINT [\"/usr/local/bin/crmguard\"]"), "jobs pass only args to the image");
    for tool in ["postgresql-client-${PG_MAJOR}", "mariadb-client", "pg_dump\" --version", "mysqldump --version"] {
        assert!(docker.contains(tool), "the image installs and checks {tool}");
    }
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let rust = workspace.lines().find_map(|l| l.strip_prefix("rust-version = ")).unwrap().trim_matches('"');
    assert!(docker.contains(&format!("ARG RUST_VERSION={rust}")), "builder toolchain = rust-version {rust}");
}

/// Every metric the chart's alerts and dashboard query is one the operator exports (a renamed metric would
/// otherwise silence an alert without anyone noticing).
#[test]
fn chart_alerts_and_dashboard_use_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // One sample of every series the operator can export (families without samples are not rendered).
    let m = crmguard::metrics::Metrics::default();
    m.reconciled("c");
    m.failed("c", "api");
    m.observe_duration("c", std::time::Duration::from_millis(1));
    m.wrote("c", "apply", 1);
    let samples: Vec<_> = crmguard::metrics::OBJECT_GAUGES.iter().map(|(name, _)| (*name, vec![], 1.0)).collect();
    m.set_object("Kind", "ns", "n", &samples);
    let exported = m.render();
    let mut used = std::collections::BTreeSet::new();
    for file in ["charts/crmguard/templates/prometheusrule.yaml", "charts/crmguard/files/dashboard.json"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (i, _) in text.match_indices("crmguard_") {
            let name: String =
                text[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
            used.insert(name);
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        let base = ["_total", "_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(
            exported.contains(&format!("# TYPE {base} ")) || exported.contains(&format!("# TYPE {name} ")),
            "{name} is used by the chart but not exported:\n{exported}"
        );
    }
}

/// One supported range, said the same everywhere: the operator's startup check, the chart's `kubeVersion`, the
/// README, and the oldest control plane the tests build (e2e/kube/oldest).
#[test]
fn the_supported_kubernetes_range_is_said_the_same_everywhere() {
    use crmguard::runtime::MIN_KUBERNETES;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let min = format!("{}.{}", MIN_KUBERNETES.major, MIN_KUBERNETES.minor);
    let chart = read("charts/crmguard/Chart.yaml");
    assert!(chart.contains(&format!("kubeVersion: \">={min}.0-0\"")), "Chart.yaml kubeVersion is not >={min}");
    let readme = read("README.md");
    assert!(readme.contains(&format!("Kubernetes **{min} and newer**")), "README does not say {min} and newer");
    let oldest = read("e2e/kube/oldest/go.mod");
    let pinned = oldest
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes v"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(pinned.starts_with(&format!("{min}.")), "e2e/kube/oldest pins {pinned}, not {min}.x");
    assert!(readme.contains(&format!("tested: {pinned} and")), "README's tested versions do not name {pinned}");
    let newest = read("e2e/kube/newest/go.mod");
    let newest = newest.lines().find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes v")).unwrap();
    let newest = newest.split_whitespace().next().unwrap();
    assert!(readme.contains(&format!("and {newest})")), "README's tested versions do not name {newest}");
}

/// The operator refuses an API server older than the supported range and names its version; providers'
/// `"33+"` minors are read as 33.
#[test]
fn an_api_server_older_than_the_supported_range_is_refused() {
    use crmguard::runtime::check_kubernetes_version;
    let info = |major: &str, minor: &str, git: &str| k8s_openapi::apimachinery::pkg::version::Info {
        major: major.into(),
        minor: minor.into(),
        git_version: git.into(),
        ..Default::default()
    };
    let err = check_kubernetes_version(&info("1", "32", "v1.32.9")).unwrap_err().to_string();
    assert!(err.contains("Kubernetes v1.32.9, older than 1.33"), "{err}");
    assert!(check_kubernetes_version(&info("1", "33+", "v1.33.4-eks-1")).is_ok());
    assert!(check_kubernetes_version(&info("1", "37", "v1.37.2")).is_ok());
    assert!(check_kubernetes_version(&info("2", "0", "v2.0.0")).is_ok());
    let err = check_kubernetes_version(&info("", "", "v0.0.0-master")).unwrap_err().to_string();
    assert!(err.contains("not major.minor"), "{err}");
}

/// Every choice the README lists as "(`a` | `b` | ...)" is exactly the set of values of one enum in the CRDs, so
/// a documented spelling is one the API server accepts.
#[test]
fn the_readmes_enumerations_are_the_crds_enums() {
    fn enums(v: &serde_json::Value, out: &mut Vec<std::collections::BTreeSet<String>>) {
        match v {
            serde_json::Value::Object(o) => {
                if let Some(e) = o.get("enum").and_then(|e| e.as_array()) {
                    out.push(e.iter().filter_map(|x| x.as_str().map(str::to_string)).collect());
                }
                o.values().for_each(|c| enums(c, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| enums(c, out)),
            _ => {}
        }
    }
    let mut all = vec![];
    for crd in crmguard::api::crds() {
        enums(&serde_json::to_value(&crd).unwrap(), &mut all);
    }
    let readme = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let mut groups = 0;
    for (i, _) in readme.match_indices("(`") {
        let rest = &readme[i + 1..];
        let Some(end) = rest.find(')') else { continue };
        let inner = rest[..end].replace('\n', " ");
        // The choices: `a` | `b` | ... (what follows the last one, e.g. "; the verify modes need ...", is prose).
        let parts: Vec<&str> = inner.split(" | ").map(str::trim).collect();
        let tokens: Vec<Option<&str>> =
            parts.iter().map(|p| p.strip_prefix('`').and_then(|r| r.split('`').next())).collect();
        if parts.len() < 2 || tokens.iter().any(|t| t.is_none_or(str::is_empty)) {
            continue;
        }
        let set: std::collections::BTreeSet<String> = tokens.iter().flatten().map(|t| t.to_string()).collect();
        groups += 1;
        assert!(all.contains(&set), "the README lists {set:?}, which is no enum of the CRDs");
    }
    assert!(groups >= 3, "found {groups} enumerations in the README");
}

/// The conditions a committed CRD describes are exactly those its controller can set: the types and reasons
/// declared in `api::<kind>::conditions` (the only ones `Cond::new` accepts) and `Ready`'s own, nothing else (the
/// AccessPolicy CRD once promised a `WildcardGrant` condition that no code set, and the CrmBackupPolicy CRD left
/// `ReportsTrusted` out).
#[test]
fn committed_crds_describe_exactly_the_conditions_the_code_can_set() {
    use crmguard::api::condition::{ConditionDoc, READY, ReadyReason, ReasonSet};
    use std::collections::BTreeSet;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let kinds: [(&str, &[ConditionDoc]); 5] = [
        ("crmbackuppolicies", crmguard::api::backup_policy::conditions::ALL),
        ("crmrestores", crmguard::api::restore::conditions::ALL),
        ("accesspolicies", crmguard::api::access_policy::conditions::ALL),
        ("networkguards", crmguard::api::network_guard::conditions::ALL),
        ("accessmonitors", crmguard::api::access_monitor::conditions::ALL),
    ];
    for (plural, all) in kinds {
        let path = root.join(format!("{plural}.crmguard.io.yaml"));
        let crd: serde_json::Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let pointer = "/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/conditions/description";
        let description = crd.pointer(pointer).and_then(|d| d.as_str()).unwrap_or_default();
        // Condition types and reasons are the PascalCase words in backquotes.
        let named: BTreeSet<&str> = description
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()) && w.chars().all(|c| c.is_ascii_alphanumeric()))
            .collect();
        let mut declared: BTreeSet<&str> = ReadyReason::DOCS.iter().map(|r| r.name).collect();
        declared.insert(READY);
        for c in all {
            declared.insert(c.type_);
            declared.extend(c.reasons.iter().chain(c.more.1).map(|r| r.name));
        }
        assert_eq!(named, declared, "{}: the conditions described vs those the code can set", path.display());
    }
}

/// The README's table of Events lists exactly the Event reasons the code declares (`api::<kind>::*Event` and
/// `ReconcileEvent`), with their meanings; the table is the text this test prints when it differs.
#[test]
fn the_readmes_event_table_is_the_declared_event_reasons() {
    use crmguard::api::condition::{Described, ReasonSet, ReconcileEvent};
    let sets: [(&str, &[Described]); 5] = [
        ("any", ReconcileEvent::DOCS),
        ("NetworkGuard", crmguard::api::network_guard::NetworkGuardEvent::DOCS),
        ("AccessPolicy", crmguard::api::access_policy::AccessPolicyEvent::DOCS),
        ("CrmBackupPolicy", crmguard::api::backup_policy::BackupPolicyEvent::DOCS),
        ("AccessMonitor", crmguard::api::access_monitor::AccessMonitorEvent::DOCS),
    ];
    let mut table = String::from("| Kind | Reason | Meaning |\n|---|---|---|\n");
    for (kind, reasons) in sets {
        for r in reasons {
            let doc: Vec<&str> = r.doc.iter().map(|l| l.trim()).collect();
            table.push_str(&format!("| {kind} | `{}` | {} |\n", r.name, doc.join(" ")));
        }
    }
    let readme = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let (begin, end) = ("<!-- events -->\n", "<!-- /events -->");
    let found = readme.split_once(begin).and_then(|(_, rest)| rest.split_once(end)).map(|(t, _)| t);
    assert!(
        found == Some(table.as_str()),
        "README's Event table (between {begin:?} and {end:?}) should read:\n{table}"
    );
}
