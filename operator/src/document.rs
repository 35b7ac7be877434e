//! Custom resources read from files (YAML or JSON, one or many documents per file, directories walked): the
//! input of `crmguard plan`, `crmguard report` and the backup CLI's `--policy-file`.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One YAML/JSON document read from a file.
#[derive(Clone, Debug)]
pub struct Document {
    /// `file` or `file#N` for the N-th document of a multi-document file.
    pub source: String,
    pub value: Value,
}

/// A file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not valid YAML: {message}")]
    Yaml { path: String, message: String },
    #[error("{0}: no .yaml, .yml or .json files found")]
    Empty(String),
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io { path: path.display().to_string(), source };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path).map_err(io)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for entry in entries {
            if entry.is_dir() {
                collect_files(&entry, out)?;
            } else if entry.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
                out.push(entry);
            }
        }
        Ok(())
    } else {
        std::fs::metadata(path).map_err(io)?;
        out.push(path.to_path_buf());
        Ok(())
    }
}

/// Parses the documents of one YAML (or JSON) text. `List` objects are flattened into their items.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Document>, LoadError> {
    let values: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| LoadError::Yaml { path: source.to_string(), message: e.to_string() })?;
    let many = values.len() > 1;
    let mut docs = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        let source = if many { format!("{source}#{}", i + 1) } else { source.to_string() };
        match (value.get("kind").and_then(Value::as_str), value.get("items").and_then(Value::as_array)) {
            (Some("List"), Some(items)) => docs.extend(
                items.iter().enumerate().map(|(j, v)| Document { source: format!("{source}[{j}]"), value: v.clone() }),
            ),
            _ => docs.push(Document { source, value }),
        }
    }
    Ok(docs)
}

/// Reads every document of the given files and directories (recursively, `.yaml`, `.yml`, `.json`).
pub fn load(paths: &[PathBuf]) -> Result<Vec<Document>, LoadError> {
    let mut files = Vec::new();
    for p in paths {
        let before = files.len();
        collect_files(p, &mut files)?;
        if files.len() == before {
            return Err(LoadError::Empty(p.display().to_string()));
        }
    }
    let mut docs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).map_err(|source| LoadError::Io { path: f.display().to_string(), source })?;
        docs.extend(parse_documents(&f.display().to_string(), &text)?);
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_empty_documents_are_handled() {
        let docs = parse_documents(
            "t.yaml",
            "---\n---\napiVersion: v1\nkind: List\nitems:\n- {kind: A}\n- {kind: B}\n---\nkind: C\n",
        )
        .unwrap();
        let kinds: Vec<_> = docs.iter().map(|d| d.value["kind"].as_str().unwrap().to_string()).collect();
        assert_eq!(kinds, ["A", "B", "C"]);
    }

    #[test]
    fn bad_yaml_names_the_file() {
        let err = parse_documents("bad.yaml", "a: [1, 2\n").unwrap_err().to_string();
        assert!(err.starts_with("bad.yaml: not valid YAML"), "{err}");
    }
}
