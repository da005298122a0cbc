//! The RBAC in `deploy/base/rbac.yaml` grants each binary exactly the Kubernetes API calls its
//! code makes: no rule is missing and none is extra.
//!
//! The calls are read from the code, not listed by hand: each `crates/*/src/kube.rs` is split
//! into its adapter methods, and every kube-rs call in a method (`create`, `get_metadata_opt`,
//! `list_metadata`, `patch`, `delete`, …) is attributed to the `Api<Kind>` it is made on. The
//! only hand-written part is which adapter methods each binary reaches ([`USES`]); that table is
//! itself checked against the binaries' sources and the adapters' methods.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// (resource, verb), e.g. ("namespaces", "get").
type Grant = (String, String);

/// Which adapter methods each binary reaches. A binary that names an adapter must be listed
/// with it, and each method listed must exist on that adapter.
const USES: &[(&str, &str, &[&str])] = &[
    // The provisioning API provisions (create), compensates and deprovisions (teardown, exists).
    (
        "keel-provision-api",
        "KubeNamespaceBackend",
        &["create", "teardown", "exists"],
    ),
    // The sweep lists its inventory and reclaims only through the deprovision chokepoint,
    // which checks (exists) then tears down; it never creates.
    ("keel-orphan-sweep", "KubeNamespaceInventory", &["list"]),
    (
        "keel-orphan-sweep",
        "KubeNamespaceBackend",
        &["teardown", "exists"],
    ),
    ("keel-propagation-runner", "KubeQuotaApplier", &["apply"]),
];

/// kube-rs `Api` methods and the RBAC verb each needs.
const VERBS: &[(&str, &str)] = &[
    ("create", "create"),
    ("get", "get"),
    ("get_opt", "get"),
    ("get_metadata", "get"),
    ("get_metadata_opt", "get"),
    ("list", "list"),
    ("list_metadata", "list"),
    ("watch", "watch"),
    ("watch_metadata", "watch"),
    ("patch", "patch"),
    ("patch_metadata", "patch"),
    ("patch_status", "patch"),
    ("replace", "update"),
    ("delete", "delete"),
    ("delete_collection", "deletecollection"),
];

/// The plural resource of a `k8s_openapi` kind in the core group.
fn resource(kind: &str) -> String {
    match kind {
        "Namespace" => "namespaces".to_owned(),
        "Secret" => "secrets".to_owned(),
        "ResourceQuota" => "resourcequotas".to_owned(),
        "ConfigMap" => "configmaps".to_owned(),
        "Pod" => "pods".to_owned(),
        other => panic!("add the plural of {other} (and its API group) to the RBAC test"),
    }
}

/// The non-test part of a source file: everything before its `#[cfg(test)] mod …`.
fn production_code(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod ")
        .map_or(text, |at| &text[..at])
}

/// Top-level `impl` blocks: (type name, body).
fn impl_blocks(code: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in code.lines() {
        if let Some((name, body)) = current.as_mut() {
            if line == "}" {
                blocks.push((name.clone(), std::mem::take(body)));
                current = None;
            } else {
                body.push_str(line);
                body.push('\n');
            }
        } else if line.starts_with("impl") && line.ends_with('{') {
            let head = line.trim_end_matches('{').trim();
            let target = head.rsplit(" for ").next().unwrap_or(head);
            let name = target
                .trim_start_matches("impl")
                .trim()
                .trim_start_matches(|c: char| c == '<' || c == '\'' || c.is_alphanumeric())
                .trim_start_matches('>')
                .trim();
            let name = if name.is_empty() {
                target.trim_start_matches("impl").trim()
            } else {
                name
            };
            let name = name.split(['<', ' ']).next().unwrap_or(name).to_owned();
            current = Some((name, String::new()));
        }
    }
    blocks
}

/// Methods of an impl body: name → body.
fn methods(body: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in body.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent == 4 {
            let signature = trimmed
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("async ");
            if let Some(rest) = signature.strip_prefix("fn ") {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                current = Some(name.clone());
                out.entry(name).or_default();
            }
        }
        if let Some(name) = &current {
            let entry = out.entry(name.clone()).or_default();
            entry.push_str(line);
            entry.push('\n');
        }
    }
    out
}

/// The kind an `Api<Kind>` helper returns: `fn namespaces(&self) -> Api<Namespace>`.
fn api_helpers(methods: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    methods
        .iter()
        .filter_map(|(name, body)| {
            let signature = body.lines().next()?;
            let kind = signature.split("-> Api<").nth(1)?.split('>').next()?;
            Some((name.clone(), kind.to_owned()))
        })
        .collect()
}

/// The grants one method needs: each kube call attributed to the `Api<Kind>` most recently
/// named before it (a binding `let x: Api<Kind>` or a helper call `self.helper()`).
fn grants(body: &str, helpers: &BTreeMap<String, String>) -> BTreeSet<Grant> {
    let mut tokens: Vec<(usize, Token)> = Vec::new();
    let mut at = 0;
    while let Some(found) = body[at..].find("Api<") {
        let start = at + found + 4;
        let kind: String = body[start..]
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect();
        tokens.push((start, Token::Kind(kind)));
        at = start;
    }
    for (helper, kind) in helpers {
        for (index, _) in body.match_indices(&format!("self.{helper}()")) {
            tokens.push((index, Token::Kind(kind.clone())));
        }
    }
    for (method, verb) in VERBS {
        for (index, _) in body.match_indices(&format!(".{method}(")) {
            tokens.push((index, Token::Call(verb)));
        }
    }
    tokens.sort_by_key(|(index, _)| *index);
    let mut kind: Option<String> = None;
    let mut out = BTreeSet::new();
    for (_, token) in tokens {
        match token {
            Token::Kind(k) => kind = Some(k),
            Token::Call(verb) => {
                // `.get(` on a map before any Api is named is not a Kubernetes call.
                if let Some(kind) = &kind {
                    out.insert((resource(kind), verb.to_owned()));
                }
            }
        }
    }
    out
}

enum Token {
    Kind(String),
    Call(&'static str),
}

/// Every adapter's methods and the grants each needs, from `crates/*/src/kube.rs`.
fn adapters(root: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<Grant>>> {
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<Grant>>> = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("crates")).unwrap() {
        let path = entry.unwrap().path().join("src/kube.rs");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let code = production_code(&text);
        let blocks = impl_blocks(code);
        let mut helpers = BTreeMap::new();
        for (_, body) in &blocks {
            helpers.extend(api_helpers(&methods(body)));
        }
        for (name, body) in &blocks {
            for (method, method_body) in methods(body) {
                let needed = grants(&method_body, &helpers);
                let slot = out
                    .entry(name.clone())
                    .or_default()
                    .entry(method)
                    .or_default();
                slot.extend(needed);
            }
        }
    }
    out
}

/// The binaries' package directories by binary name, with their sources concatenated.
fn binaries(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("bins")).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let manifest: toml::Table = manifest.parse().unwrap();
        let name = manifest
            .get("bin")
            .and_then(|bins| bins.as_array())
            .and_then(|bins| bins.first())
            .and_then(|bin| bin.get("name"))
            .or_else(|| manifest["package"].get("name"))
            .and_then(|name| name.as_str())
            .unwrap()
            .to_owned();
        let mut source = String::new();
        for file in std::fs::read_dir(dir.join("src")).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            source.push_str(production_code(&text));
        }
        out.insert(name, source);
    }
    out
}

/// What `deploy/base/rbac.yaml` grants each ServiceAccount, through its ClusterRoleBindings.
fn granted(root: &Path) -> BTreeMap<String, BTreeSet<Grant>> {
    let text = std::fs::read_to_string(root.join("deploy/base/rbac.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let mut roles: BTreeMap<String, BTreeSet<Grant>> = BTreeMap::new();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let set = roles.entry(name).or_default();
        for rule in doc["rules"].as_array().unwrap() {
            let groups = rule["apiGroups"].as_array().unwrap();
            assert_eq!(
                groups,
                &[serde_json::json!("")],
                "only core-group rules expected: {rule}"
            );
            assert!(rule.get("resourceNames").is_none(), "{rule}");
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    let (resource, verb) = (resource.as_str().unwrap(), verb.as_str().unwrap());
                    assert!(resource != "*" && verb != "*", "wildcard in {rule}");
                    set.insert((resource.to_owned(), verb.to_owned()));
                }
            }
        }
    }
    let mut out: BTreeMap<String, BTreeSet<Grant>> = BTreeMap::new();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        let role = doc["roleRef"]["name"].as_str().unwrap();
        for subject in doc["subjects"].as_array().unwrap() {
            assert_eq!(subject["kind"], "ServiceAccount", "{subject}");
            let account = subject["name"].as_str().unwrap().to_owned();
            out.entry(account)
                .or_default()
                .extend(roles.get(role).cloned().unwrap_or_default());
        }
    }
    out
}

#[test]
fn every_binary_is_granted_exactly_the_kubernetes_calls_its_code_makes() {
    let root = super::workspace_root();
    let adapters = adapters(&root);
    let binaries = binaries(&root);
    let granted = granted(&root);

    // The adapters were found, and they call the API (a parser that finds nothing passes
    // every comparison below vacuously).
    for adapter in [
        "KubeNamespaceBackend",
        "KubeNamespaceInventory",
        "KubeQuotaApplier",
    ] {
        let calls: usize = adapters[adapter].values().map(BTreeSet::len).sum();
        assert!(calls > 0, "no Kubernetes calls found in {adapter}");
    }

    // USES is complete: every binary naming an adapter that calls the API is listed with it,
    // and every listed method exists.
    for (binary, source) in &binaries {
        for (adapter, methods) in &adapters {
            let calls_api = methods.values().any(|grants| !grants.is_empty());
            if calls_api && source.contains(adapter.as_str()) {
                assert!(
                    USES.iter().any(|(b, a, _)| b == binary && a == adapter),
                    "{binary} uses {adapter}: list the methods it reaches in USES"
                );
            }
        }
    }
    let mut needed: BTreeMap<String, BTreeSet<Grant>> = BTreeMap::new();
    for (binary, adapter, methods) in USES {
        assert!(
            binaries[*binary].contains(adapter),
            "USES says {binary} uses {adapter}, but its source does not name it"
        );
        for method in *methods {
            let grants = adapters[*adapter]
                .get(*method)
                .unwrap_or_else(|| panic!("{adapter} has no method {method}"));
            needed
                .entry((*binary).to_owned())
                .or_default()
                .extend(grants.iter().cloned());
        }
    }

    // Every binary's ServiceAccount (named after it) has exactly what it needs.
    for binary in binaries.keys() {
        let need = needed.get(binary).cloned().unwrap_or_default();
        let have = granted.get(binary).cloned().unwrap_or_default();
        let missing: Vec<_> = need.difference(&have).collect();
        let extra: Vec<_> = have.difference(&need).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{binary}: missing {missing:?}, not needed {extra:?}"
        );
    }
    for account in granted.keys() {
        assert!(
            binaries.contains_key(account),
            "a binding for unknown account {account}"
        );
    }

    let expect = |pairs: &[(&str, &str)]| -> BTreeSet<Grant> {
        pairs
            .iter()
            .map(|(r, v)| ((*r).to_owned(), (*v).to_owned()))
            .collect()
    };
    // The derivation itself, pinned on what the adapters are known to call.
    assert_eq!(
        needed["keel-propagation-runner"],
        expect(&[("namespaces", "get"), ("resourcequotas", "patch")])
    );
    assert_eq!(
        needed["keel-orphan-sweep"],
        expect(&[
            ("namespaces", "delete"),
            ("namespaces", "get"),
            ("namespaces", "list")
        ])
    );
}
