//! `sockets-host plugin new NAME`: a plugin crate that builds and tests as
//! made. In the workspace's `plugins/` it is a member (the workspace,
//! `scripts/build-plugins.sh` and the tests find `plugins/*` by
//! themselves); anywhere else it is a crate of its own on this checkout's
//! SDK.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::NewArgs;

const LIB_RS: &str = include_str!("../../templates/plugin/lib.rs");
const WORKSPACE_MANIFEST: &str = include_str!("../../templates/plugin/Cargo.toml.workspace");
const STANDALONE_MANIFEST: &str = include_str!("../../templates/plugin/Cargo.toml.standalone");
/// Longest plugin name: it names the crate, the file and the events.
const MAX_NAME_CHARS: usize = 40;

/// Why a name cannot be a plugin's.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
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
    if valid {
        Ok(())
    } else {
        Err(NameError::Invalid(name.to_owned()))
    }
}

/// `offline_notify` → `OfflineNotify`.
fn type_name(name: &str) -> String {
    name.split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
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

/// Writes the crate; says what it made and what to run next.
pub fn run(args: &NewArgs, out: &mut impl Write) -> anyhow::Result<()> {
    validate_name(&args.name)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let folder = args
        .dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let crate_dir = folder.join(&args.name);
    if crate_dir.exists() {
        bail!(
            "{} exists already: choose another name",
            crate_dir.display()
        );
    }
    let workspace = workspace_of(&folder);
    let manifest = match &workspace {
        Some(_) => WORKSPACE_MANIFEST.to_owned(),
        None => {
            let sdk = checkout().join("sdk").canonicalize().with_context(|| {
                format!(
                    "the SDK of the checkout this binary was built from ({}) is gone",
                    checkout().join("sdk").display()
                )
            })?;
            STANDALONE_MANIFEST.replace("{{sdk}}", &sdk.display().to_string())
        }
    };
    let fill = |template: &str| {
        template
            .replace("{{name}}", &args.name)
            .replace("{{type}}", &type_name(&args.name))
    };
    std::fs::create_dir_all(crate_dir.join("src"))
        .with_context(|| format!("cannot create {}", crate_dir.display()))?;
    std::fs::write(crate_dir.join("Cargo.toml"), fill(&manifest))?;
    std::fs::write(crate_dir.join("src/lib.rs"), fill(LIB_RS))?;
    if workspace.is_none() {
        // The checkout's toolchain (with the wasm32-wasip2 target) and its
        // dependency versions, which it is tested with; cargo drops the
        // lock's entries this crate does not use.
        for file in ["rust-toolchain.toml", "Cargo.lock"] {
            std::fs::copy(checkout().join(file), crate_dir.join(file))
                .with_context(|| format!("cannot copy the checkout's {file}"))?;
        }
    }

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
            "next, in {}:\n  cargo test -p {name}                 # its native tests\n  \
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
    fn type_names_are_camel_case() {
        assert_eq!(type_name("offline_notify"), "OfflineNotify");
        assert_eq!(type_name("typing"), "Typing");
        assert_eq!(type_name("presence2"), "Presence2");
    }
}
