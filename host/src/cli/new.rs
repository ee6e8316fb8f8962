//! `sockets-host plugin new NAME`: a plugin crate that builds and tests as
//! made. In the workspace's `plugins/` it is a member (the workspace,
//! `scripts/build-plugins.sh` and the tests find `plugins/*` by
//! themselves); anywhere else it is a crate of its own on this checkout's
//! SDK.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::NewArgs;

const LIB_RS: &str = include_str!("../../templates/plugin/lib.rs");
const WORKSPACE_MANIFEST: &str = include_str!("../../templates/plugin/Cargo.toml.workspace");
const STANDALONE_MANIFEST: &str = include_str!("../../templates/plugin/Cargo.toml.standalone");
/// Longest plugin name: it names the crate, the file and the events.
const MAX_NAME_CHARS: usize = 40;
/// Names a plugin crate cannot take: Rust's own crates and keywords, the
/// workspace's packages and the plugin's dependencies (the tests' plugins
/// under `tests/plugins/` are checked as found).
const RESERVED: &[&str] = &[
    "std",
    "core",
    "alloc",
    "proc_macro",
    "test",
    "self",
    "super",
    "crate",
    "sockets_host",
    "sockets_sdk",
    "sockets_tests",
    "loadgen",
    "serde",
    "serde_json",
    "wit_bindgen",
];

/// Why a name cannot be a plugin's.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Taken by a crate the plugin's would clash with.
    #[error(
        "`{0}` is taken (a Rust, workspace or dependency crate, or a test plugin): choose another name"
    )]
    Taken(String),
    /// Not `lowercase_words_with_underscores`.
    #[error(
        "`{0}` is not a plugin name: lowercase letters and digits in words joined by `_`, \
         starting with a letter, at most {MAX_NAME_CHARS} characters (e.g. `offline_notify`): \
         it names the crate, the built `.wasm` and the plugin alike"
    )]
    Invalid(String),
}

/// Checks a plugin name: `offline_notify`, `typing`, `presence2`. No `-`:
/// cargo would name the component `offline_notify.wasm` for a crate
/// `offline-notify`, and the host names a plugin after its file.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let valid = name.len() <= MAX_NAME_CHARS
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.split('_').all(|word| {
            !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
    if !valid {
        return Err(NameError::Invalid(name.to_owned()));
    }
    let test_plugin = checkout()
        .join("tests/plugins")
        .join(name.replace('_', "-"))
        .exists()
        || checkout().join("tests/plugins").join(name).exists();
    if RESERVED.contains(&name) || is_keyword(name) || test_plugin {
        return Err(NameError::Taken(name.to_owned()));
    }
    Ok(())
}

/// Rust's keywords, which cannot name a crate.
fn is_keyword(name: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "dyn", "else", "enum", "extern",
        "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod", "move",
        "mut", "pub", "ref", "return", "static", "struct", "trait", "true", "type", "unsafe",
        "use", "where", "while", "abstract", "become", "box", "do", "final", "macro", "override",
        "priv", "try", "typeof", "unsized", "virtual", "yield",
    ];
    KEYWORDS.contains(&name)
}

/// `offline_notify` → `OfflineNotifyPlugin` (the suffix keeps it apart from
/// the template's own names: `ping` would otherwise clash with `Ping`).
fn type_name(name: &str) -> String {
    let mut type_name: String = name
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    type_name.push_str("Plugin");
    type_name
}

/// The workspace root above the working directory whose `plugins/` is
/// where a plugin goes by default.
fn enclosing_workspace() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .find_map(|dir| workspace_of(&dir.join("plugins")))
}

/// The checkout this binary was built from.
fn checkout() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The host's workspace whose `plugins/` folder is `folder`, if it is one.
fn workspace_of(folder: &Path) -> Option<PathBuf> {
    let root = folder.parent()?;
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).ok()?;
    (folder.file_name()? == "plugins"
        && manifest.contains("[workspace]")
        && manifest.contains("\"plugins/*\"")
        && root.join("sdk/Cargo.toml").is_file())
    .then(|| root.to_path_buf())
}

/// The manifest and source of plugin `name`: in a workspace, or a crate
/// of its own on the checkout's SDK at `sdk`.
fn files(name: &str, sdk: Option<&Path>) -> (String, String) {
    let manifest = match sdk {
        None => WORKSPACE_MANIFEST.to_owned(),
        // A TOML string, whatever the path holds.
        Some(sdk) => STANDALONE_MANIFEST.replace(
            "\"{{sdk}}\"",
            &toml::Value::String(sdk.display().to_string()).to_string(),
        ),
    };
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{type}}", &type_name(name))
    };
    (fill(&manifest), fill(LIB_RS))
}

/// Writes the crate; says what it made and what to run next.
pub fn run(args: &NewArgs, out: &mut impl Write) -> anyhow::Result<()> {
    validate_name(&args.name)?;
    let folder = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.canonicalize()
                .with_context(|| format!("cannot resolve {}", dir.display()))?
        }
        None => enclosing_workspace()
            .map(|root| root.join("plugins"))
            .context(
                "not inside the sockets-host checkout: run this in it, or say where with --dir",
            )?,
    };
    let workspace = workspace_of(&folder);
    let sdk = match &workspace {
        Some(_) => None,
        None => Some(checkout().join("sdk").canonicalize().with_context(|| {
            format!(
                "the SDK of the checkout this binary was built from ({}) is gone",
                checkout().join("sdk").display()
            )
        })?),
    };
    let crate_dir = folder.join(&args.name);
    // Fails if it exists: nothing of another crate is overwritten.
    std::fs::create_dir(&crate_dir).with_context(|| {
        format!(
            "cannot create {} (does it exist already? choose another name)",
            crate_dir.display()
        )
    })?;
    let written = write_crate(&crate_dir, &args.name, sdk.as_deref());
    if written.is_err() {
        // No half-made crate: the workspace would fail to load it.
        let _ = std::fs::remove_dir_all(&crate_dir);
    }
    written?;

    let file = format!("{}.wasm", args.name);
    writeln!(
        out,
        "created plugin `{}` in {}",
        args.name,
        crate_dir.display()
    )?;
    match &workspace {
        Some(root) => writeln!(
            out,
            "next, in {}:\n  cargo test -p {name}                 # its native tests (and Cargo.lock learns it: commit both)\n  \
             scripts/build-plugins.sh             # every plugins/* into target/plugins/wasm32-wasip2/release\n  \
             cargo run -p sockets-host -- plugin check target/plugins/wasm32-wasip2/release/{file} \\\n      \
             --event {name}.ping --data '{{\"text\":\"hi\"}}' --user s_1",
            root.display(),
            name = args.name,
        )?,
        None => writeln!(
            out,
            "next, in {dir}:\n  cargo test                           # its native tests\n  \
             cargo build --release --target wasm32-wasip2\n  \
             sockets-host plugin check target/wasm32-wasip2/release/{file} \\\n      \
             --event {name}.ping --data '{{\"text\":\"hi\"}}' --user s_1",
            dir = crate_dir.display(),
            name = args.name,
        )?,
    }
    writeln!(
        out,
        "then copy {file} into the server's plugins folder, or PUT it to /admin/plugins/{name} \
         (docs/plugins.md)",
        name = args.name,
    )?;
    Ok(())
}

fn write_crate(crate_dir: &Path, name: &str, sdk: Option<&Path>) -> anyhow::Result<()> {
    let (manifest, source) = files(name, sdk);
    let write = |path: PathBuf, text: &str| {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    std::fs::create_dir(crate_dir.join("src"))
        .with_context(|| format!("cannot create {}/src", crate_dir.display()))?;
    write(crate_dir.join("Cargo.toml"), &manifest)?;
    write(crate_dir.join("src/lib.rs"), &source)?;
    if sdk.is_some() {
        // The checkout's toolchain (with the wasm32-wasip2 target) and its
        // dependency versions, which it is tested with; cargo drops the
        // lock's entries this crate does not use.
        for file in ["rust-toolchain.toml", "Cargo.lock"] {
            std::fs::copy(checkout().join(file), crate_dir.join(file))
                .with_context(|| format!("cannot copy the checkout's {file}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercase_words_joined_by_underscores() {
        for good in ["typing", "offline_notify", "presence2", "a_b_c"] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Typing",
            "2fast",
            "_x",
            "x_",
            "a__b",
            "a-b",
            "a.b",
            "../x",
            "x/y",
            "a_very_long_name_that_goes_on_and_on_and_on",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_checkouts_plugins_folder_is_a_workspace_and_others_are_not() {
        let root = checkout().canonicalize().unwrap();
        assert_eq!(workspace_of(&root.join("plugins")), Some(root.clone()));
        assert_eq!(workspace_of(&root.join("sdk")), None);
        assert_eq!(workspace_of(&std::env::temp_dir()), None);
    }

    #[test]
    fn taken_names_are_refused() {
        for taken in [
            "std",
            "serde_json",
            "sockets_sdk",
            "loadgen",
            "chat_v2",
            "whois",
            "fn",
        ] {
            assert_eq!(
                validate_name(taken),
                Err(NameError::Taken(taken.into())),
                "{taken}"
            );
        }
    }

    #[test]
    fn type_names_are_camel_case() {
        assert_eq!(type_name("offline_notify"), "OfflineNotifyPlugin");
        assert_eq!(type_name("ping"), "PingPlugin");
        assert_eq!(type_name("presence2"), "Presence2Plugin");
    }

    #[test]
    fn a_workspace_member_uses_only_what_the_workspace_declares() {
        let (manifest, source) = files("offline_notify", None);
        assert!(!manifest.contains("{{") && !source.contains("{{"));
        let manifest: toml::Table = toml::from_str(&manifest).unwrap();
        let root: toml::Table =
            toml::from_str(&std::fs::read_to_string(checkout().join("Cargo.toml")).unwrap())
                .unwrap();
        let workspace = &root["workspace"];
        for (key, value) in manifest["package"].as_table().unwrap() {
            if value.get("workspace").is_some() {
                assert!(workspace["package"].get(key).is_some(), "package.{key}");
            }
        }
        for name in manifest["dependencies"].as_table().unwrap().keys() {
            assert!(workspace["dependencies"].get(name).is_some(), "{name}");
        }
        assert_eq!(manifest["lints"]["workspace"].as_bool(), Some(true));
    }

    #[test]
    fn a_standalone_manifest_holds_any_sdk_path() {
        let odd = Path::new("/tmp/a \"quoted\" \\ path/sdk");
        let (manifest, _) = files("greeter", Some(odd));
        let manifest: toml::Table = toml::from_str(&manifest).unwrap();
        assert_eq!(
            manifest["dependencies"]["sockets-sdk"]["path"].as_str(),
            Some(odd.to_str().unwrap())
        );
    }

    /// The made source is formatted as `cargo fmt --check` wants it, even
    /// with the longest name (CI checks every workspace member).
    #[test]
    fn the_made_source_is_formatted_at_any_name_length() {
        for name in [
            "a",
            "offline_notify",
            "a_plugin_name_of_forty_characters_exactl",
        ] {
            assert_eq!(validate_name(name), Ok(()), "{name}");
            let (_, source) = files(name, None);
            // A file: from stdin, `--check` reports nothing.
            let file =
                std::env::temp_dir().join(format!("plugin-new-{}-{name}.rs", std::process::id()));
            std::fs::write(&file, source).unwrap();
            let output = std::process::Command::new("rustfmt")
                .args(["--edition", "2024", "--check"])
                .arg(&file)
                .output()
                .expect("rustfmt (rustup component add rustfmt)");
            let _ = std::fs::remove_file(&file);
            assert!(
                output.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
    }
}
