//! Tidy checks over the workspace's own sources, run by `cargo test --workspace`.
//!
//! They reject what the project does not allow: ignored or panic-expecting tests, unfinished
//! code markers, and crates that would let a public item go undocumented.

use std::fs;
use std::path::{Path, PathBuf};

use crate::workspace_root;

/// Rust sources under the workspace's own folders.
fn rust_files() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = ["crates", "bins", "xtask", "examples"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Markers that must not appear, spelled in pieces so this file does not match itself.
fn forbidden_markers() -> Vec<String> {
    vec![
        ["#[", "ignore"].concat(),
        ["#[", "should_panic"].concat(),
        ["todo", "!("].concat(),
        ["unimplemented", "!("].concat(),
    ]
}

fn find_markers(text: &str, markers: &[String]) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .flat_map(|(i, line)| {
            markers
                .iter()
                .filter(move |m| line.contains(m.as_str()))
                .map(move |m| (i + 1, m.clone()))
        })
        .collect()
}

#[test]
fn no_ignored_or_panic_expecting_tests_and_no_unfinished_code() {
    let markers = forbidden_markers();
    let mut hits = Vec::new();
    for file in rust_files() {
        let text = fs::read_to_string(&file).unwrap();
        for (line, marker) in find_markers(&text, &markers) {
            hits.push(format!("{}:{line}: {marker}", file.display()));
        }
    }
    assert!(
        hits.is_empty(),
        "forbidden markers found:\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_marker_scan_finds_what_it_should() {
    let markers = forbidden_markers();
    let sample = format!(
        "fn a() {{}}\n{}]\nfn b() {{ {}) }}\n",
        markers[0], markers[2]
    );
    let found = find_markers(&sample, &markers);
    assert_eq!(
        found,
        vec![(2, markers[0].clone()), (3, markers[2].clone())]
    );
}

fn manifests() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut out = vec![root.join("xtask/Cargo.toml")];
    for group in ["crates", "bins"] {
        for entry in fs::read_dir(root.join(group)).unwrap().flatten() {
            let manifest = entry.path().join("Cargo.toml");
            if manifest.is_file() {
                out.push(manifest);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_public_item_must_be_documented_in_every_crate() {
    let root_manifest = fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    assert!(
        root_manifest.contains("[workspace.lints.rust]")
            && root_manifest.contains("missing_docs = \"deny\""),
        "the workspace must deny missing_docs"
    );
    let opted_out: Vec<String> = manifests()
        .into_iter()
        .filter(|m| {
            let text = fs::read_to_string(m).unwrap();
            !text.contains("[lints]\nworkspace = true")
        })
        .map(|m| m.display().to_string())
        .collect();
    assert!(
        opted_out.is_empty(),
        "these crates do not inherit the workspace lints ([lints] workspace = true):\n{}",
        opted_out.join("\n")
    );
    assert!(
        manifests().len() >= 10,
        "the tidy scan found too few crates: {:?}",
        manifests()
    );
}

#[test]
fn lint_allowances_do_not_switch_off_documentation() {
    let allow_missing_docs = ["allow(", "missing_docs"].concat();
    let hits: Vec<String> = rust_files()
        .into_iter()
        .filter(|f| fs::read_to_string(f).unwrap().contains(&allow_missing_docs))
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        hits.is_empty(),
        "missing_docs allowed in:\n{}",
        hits.join("\n")
    );
}

#[test]
fn workspace_root_is_where_the_root_manifest_is() {
    assert!(Path::new(&workspace_root()).join("Cargo.toml").is_file());
}

/// Domain crates whose default build must stay pure.
const DOMAIN_CRATES: &[&str] = &["audit", "propagation", "provision", "orphan-sweep", "rater"];
/// Packages a domain crate may only use behind an opt-in adapter feature.
const IO_PACKAGES: &[&str] = &[
    "sqlx",
    "kube",
    "k8s-openapi",
    "tokio",
    "tokio-util",
    "axum",
    "hyper",
    "reqwest",
];

/// Dependencies that the default build of the crate described by `manifest` pulls in and that
/// do I/O, directly or (for Keel's own crates) through an adapter feature.
fn impure_default_dependencies(manifest: &str) -> Vec<String> {
    let doc: toml::Table = manifest.parse().expect("valid Cargo.toml");
    let Some(deps) = doc.get("dependencies").and_then(toml::Value::as_table) else {
        return Vec::new();
    };
    let default_features: Vec<&str> = doc
        .get("features")
        .and_then(|f| f.get("default"))
        .and_then(toml::Value::as_array)
        .map(|a| a.iter().filter_map(toml::Value::as_str).collect())
        .unwrap_or_default();
    let mut impure = Vec::new();
    for (name, spec) in deps {
        let optional = spec
            .get("optional")
            .and_then(toml::Value::as_bool)
            .unwrap_or(false);
        let enabled_by_default = default_features.iter().any(|f| {
            *f == format!("dep:{name}") || f.starts_with(&format!("{name}/")) || f == name
        });
        let pulled_in = !optional || enabled_by_default;
        let features: Vec<&str> = spec
            .get("features")
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(toml::Value::as_str).collect())
            .unwrap_or_default();
        let io_package = IO_PACKAGES.contains(&name.as_str());
        let keel_adapter =
            name.starts_with("keel-") && features.iter().any(|f| matches!(*f, "postgres" | "kube"));
        if pulled_in && (io_package || keel_adapter) {
            impure.push(name.clone());
        }
    }
    impure
}

#[test]
fn no_default_build_of_a_domain_crate_depends_on_sqlx_kube_or_tokio() {
    for krate in DOMAIN_CRATES {
        let path = workspace_root()
            .join("crates")
            .join(krate)
            .join("Cargo.toml");
        let manifest = fs::read_to_string(&path).unwrap();
        let impure = impure_default_dependencies(&manifest);
        assert!(
            impure.is_empty(),
            "{}: the default build pulls in {impure:?}; put adapters behind the `postgres` or \
             `kube` feature (optional = true)",
            path.display()
        );
    }
}

#[test]
fn the_purity_check_catches_what_it_should() {
    let cases: &[(&str, &[&str])] = &[
        ("[dependencies]\nserde = \"1\"\n", &[]),
        (
            "[dependencies]\nsqlx = { workspace = true, optional = true }\n",
            &[],
        ),
        ("[dependencies]\ntokio.workspace = true\n", &["tokio"]),
        (
            "[features]\ndefault = [\"dep:sqlx\"]\n[dependencies]\nsqlx = { workspace = true, optional = true }\n",
            &["sqlx"],
        ),
        (
            "[dependencies]\nkeel-audit = { workspace = true, features = [\"postgres\"] }\n",
            &["keel-audit"],
        ),
        ("[dependencies]\nkeel-audit.workspace = true\n", &[]),
    ];
    for (manifest, expected) in cases {
        assert_eq!(
            impure_default_dependencies(manifest),
            *expected,
            "{manifest}"
        );
    }
}

/// Crates whose public error enums must be `#[non_exhaustive]`, so a new failure mode is not a
/// breaking change for a service that matches on them.
const NON_EXHAUSTIVE_ERROR_CRATES: &[&str] = &[
    "crates/audit",
    "crates/orphan-sweep",
    "crates/propagation",
    "crates/provision",
    "crates/rater",
    "crates/schema",
];

/// `pub enum` items named `…Error` or `Invalid…` with no `#[non_exhaustive]` among the
/// attributes and docs directly above them.
fn exhaustive_error_enums(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let name = line
                .strip_prefix("pub enum ")?
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .next()?;
            if !(name.ends_with("Error") || name.starts_with("Invalid")) {
                return None;
            }
            let marked = lines[..i]
                .iter()
                .rev()
                .take_while(|above| !above.trim().is_empty() && !above.starts_with('}'))
                .any(|above| above.trim() == "#[non_exhaustive]");
            (!marked).then(|| name.to_owned())
        })
        .collect()
}

/// LIB-9: every public error enum of the listed crates is `#[non_exhaustive]`.
#[test]
fn public_error_enums_are_non_exhaustive() {
    let root = workspace_root();
    let mut hits = Vec::new();
    for file in rust_files() {
        let relative = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        if !NON_EXHAUSTIVE_ERROR_CRATES
            .iter()
            .any(|c| relative.starts_with(&format!("{c}/src/")))
        {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap();
        for name in exhaustive_error_enums(&text) {
            hits.push(format!("{relative}: {name}"));
        }
    }
    assert!(
        hits.is_empty(),
        "public error enums without #[non_exhaustive]:\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_non_exhaustive_scan_finds_what_it_should() {
    let sample = "/// Docs.\n#[derive(Debug)]\npub enum OpenError {\n    A,\n}\n\n\
                  /// Docs.\n#[derive(Debug)]\n#[non_exhaustive]\npub enum ClosedError {\n    A,\n}\n\n\
                  pub enum InvalidThing {\n    A,\n}\n\npub enum Kind {\n    A,\n}\n";
    assert_eq!(
        exhaustive_error_enums(sample),
        ["OpenError", "InvalidThing"]
    );
}
