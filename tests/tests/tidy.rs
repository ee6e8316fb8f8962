//! The boundaries ARCHITECTURE.md promises, checked on the source: which
//! module may name which dependency, every crate on the workspace's lints,
//! and no build output in the repository. A change that crosses one fails
//! here, with the file and line, instead of eroding the map quietly.

use std::path::{Path, PathBuf};

use sockets_tests::workspace_root;

/// A dependency and the only places under `host/src` that may name it.
const BOUNDARIES: &[(&str, &[&str])] = &[
    ("wasmtime", &["plugin/"]),
    ("wasmtime_wasi", &["plugin/"]),
    ("jsonwebtoken", &["auth/"]),
    ("mongodb", &["store/mongo/"]),
    ("bson", &["store/mongo/"]),
    ("lapin", &["intake/amqp.rs", "cluster/"]),
    ("axum", &["gateway/"]),
    ("tungstenite", &["gateway/"]),
    ("hyper", &["gateway/"]),
    ("hyper_util", &["gateway/"]),
    ("tower", &["gateway/"]),
    ("http_body_util", &["gateway/"]),
    ("notify", &["plugin/manager.rs"]),
];

#[test]
fn each_dependency_is_named_only_by_the_module_that_owns_it() {
    let src = workspace_root().join("host/src");
    let mut crossings = Vec::new();
    for file in rust_files(&src) {
        let relative = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (dependency, owners) in BOUNDARIES {
                let owned = owners.iter().any(|owner| relative.starts_with(owner));
                if !owned && names_crate(code, dependency) {
                    crossings.push(format!(
                        "host/src/{relative}:{}: names `{dependency}`, which only {owners:?} may",
                        number + 1
                    ));
                }
            }
        }
    }
    assert!(crossings.is_empty(), "{}", crossings.join("\n"));
}

#[test]
fn the_boundary_check_sees_a_crossing() {
    assert!(names_crate("use axum::extract::ws::Message;", "axum"));
    assert!(names_crate(
        "let frame: axum::extract::ws::Utf8Bytes;",
        "axum"
    ));
    assert!(!names_crate("let backend = \"mongodb\";", "mongodb"));
    assert!(!names_crate(
        "use crate::store::mongodb_like::X;",
        "mongodb"
    ));
    assert!(!names_crate("use crate::lapin::Channel;", "lapin"));
    assert!(names_crate("use ::lapin::Channel;", "lapin"));
    assert!(names_crate("use lapin as amqp;", "lapin"));
    assert!(names_crate("extern crate lapin;", "lapin"));
}

#[test]
fn unsafe_code_is_forbidden_outside_the_generated_plugin_bindings() {
    let root = workspace_root();
    for crate_root in [
        "host/src/lib.rs",
        "host/src/main.rs",
        "tests/src/lib.rs",
        "tests/loadgen/src/main.rs",
    ] {
        let text = std::fs::read_to_string(root.join(crate_root)).unwrap();
        assert!(
            text.contains("#![forbid(unsafe_code)]"),
            "{crate_root} no longer forbids unsafe code"
        );
    }
    // The workspace denies it; only the component bindings may allow it.
    let allowed = [
        "sdk/src/lib.rs",
        "tests/plugins/wrong-world/src/lib.rs",
        "tests/plugins/legacy/src/lib.rs",
    ];
    let listed = std::process::Command::new("git")
        .args(["grep", "-l", "allow(unsafe_code"])
        .current_dir(root)
        .output()
        .expect("git greps");
    let listed = String::from_utf8(listed.stdout).unwrap();
    let others: Vec<&str> = listed
        .lines()
        .filter(|file| !allowed.contains(file) && *file != "tests/tests/tidy.rs")
        .collect();
    assert!(others.is_empty(), "unsafe code allowed in {others:?}");
}

#[test]
fn every_crate_inherits_the_workspace_lints() {
    let root = workspace_root();
    let manifests = std::process::Command::new("git")
        .args(["ls-files", "*Cargo.toml"])
        .current_dir(root)
        .output()
        .expect("git lists the manifests");
    assert!(manifests.status.success());
    let manifests = String::from_utf8(manifests.stdout).unwrap();
    let mut missing = Vec::new();
    for manifest in manifests.lines().filter(|path| *path != "Cargo.toml") {
        let text = std::fs::read_to_string(root.join(manifest)).unwrap();
        if !text.contains("[lints]\nworkspace = true") {
            missing.push(manifest.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "crates without `[lints] workspace = true`: {missing:?}"
    );
}

#[test]
fn no_build_output_is_committed() {
    let files = std::process::Command::new("git")
        .args(["ls-files"])
        .current_dir(workspace_root())
        .output()
        .expect("git lists the files");
    assert!(files.status.success());
    let files = String::from_utf8(files.stdout).unwrap();
    let outputs: Vec<&str> = files
        .lines()
        .filter(|path| {
            path.ends_with(".wasm")
                || path.starts_with("target/")
                || path.contains("/target/")
                || path.contains("node_modules/")
        })
        .collect();
    assert!(outputs.is_empty(), "build outputs committed: {outputs:?}");
}

/// Whether a line of code names `dependency`: as a path (`dependency::…`,
/// `::dependency::…`), in `use dependency;` or `use dependency as …`, or in
/// `extern crate dependency`.
fn names_crate(code: &str, dependency: &str) -> bool {
    let imports = [
        format!("use {dependency};"),
        format!("use {dependency} as "),
        format!("use ::{dependency}"),
        format!("extern crate {dependency}"),
    ];
    if imports.iter().any(|import| code.contains(import.as_str())) {
        return true;
    }
    let path = format!("{dependency}::");
    code.match_indices(&path).any(|(at, _)| {
        // `::lapin::…` is the crate too; `crate::lapin::…` a module of ours.
        let before = &code[..at];
        let before = before.strip_suffix("::").unwrap_or(before);
        let previous = before.chars().next_back();
        let leading_colons = before.len() < code[..at].len();
        !previous.is_some_and(|c| c.is_alphanumeric() || c == '_' || (c == ':' && !leading_colons))
    })
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}
