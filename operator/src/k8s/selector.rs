//! LabelSelector -> the label-selector query string the API server accepts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Renders a LabelSelector as `k=v,k in (a,b),k notin (c),k,!k`. An empty selector selects everything (`""`).
pub fn to_query(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = sel.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for req in sel.match_expressions.iter().flatten() {
        let values = req.values.clone().unwrap_or_default().join(",");
        parts.push(match req.operator.as_str() {
            "In" => format!("{} in ({values})", req.key),
            "NotIn" => format!("{} notin ({values})", req.key),
            "Exists" => req.key.clone(),
            _ => format!("!{}", req.key),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn renders_every_operator() {
        let sel = LabelSelector {
            match_labels: Some([("app".to_string(), "crm".to_string())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["web".into(), "db".into()]),
                },
                LabelSelectorRequirement { key: "x".into(), operator: "NotIn".into(), values: Some(vec!["1".into()]) },
                LabelSelectorRequirement { key: "y".into(), operator: "Exists".into(), values: None },
                LabelSelectorRequirement { key: "z".into(), operator: "DoesNotExist".into(), values: None },
            ]),
        };
        assert_eq!(to_query(&sel), "app=crm,tier in (web,db),x notin (1),y,!z");
        assert_eq!(to_query(&LabelSelector::default()), "");
    }
}
