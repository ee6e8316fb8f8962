//! Plugin operations on a running server (PROTOCOL.md §8, DESIGN.md "Hot
//! reload"): the plugins folder is watched, uploads and rollbacks go through
//! the same load-validate-swap path, previous versions are kept.
//!
//! The folder is the source of truth across restarts: an upload or rollback
//! writes the `.wasm` there (atomically) after it validated, so the watcher
//! that sees the write finds the version already serving and does nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::plugin::{
    LoadError, LoadedPlugin, PluginRegistry, PluginRuntime, StatsSnapshot, content_hash,
};
use crate::protocol::rfc3339;

/// Previous versions kept per plugin for rollback.
const KEPT_VERSIONS: usize = 3;
/// Quiet time after the last change to a file before it is loaded, so that
/// a copy in progress is not read half-written.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Why an operation on a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// The name is not usable as a plugin (file) name.
    #[error("invalid plugin name `{0}`: use 1-64 chars of [A-Za-z0-9_-]")]
    BadName(String),
    /// The new version did not load; the old one keeps serving.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// No such plugin is loaded.
    #[error("plugin `{0}` is not loaded")]
    NotLoaded(String),
    /// No earlier version to go back to.
    #[error("plugin `{0}` has no previous version")]
    NoPreviousVersion(String),
    /// The plugins folder could not be written.
    #[error("cannot write the plugins folder: {0}")]
    Io(String),
}

/// One version of a plugin, with its bytes (for rollback).
#[derive(Clone)]
struct Version {
    plugin: Arc<LoadedPlugin>,
    wasm: Arc<Vec<u8>>,
    loaded_at: SystemTime,
}

#[derive(Default)]
struct Slot {
    current: Option<Version>,
    previous: VecDeque<Version>,
    last_error: Option<(String, SystemTime)>,
    failed_loads: u64,
}

/// What the admin API reports about a plugin.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginReport {
    /// The operator's name (file stem).
    pub name: String,
    /// `serving`, `failed` (never loaded) or `unloaded`.
    pub status: &'static str,
    /// The serving version, when one serves.
    pub current: Option<VersionReport>,
    /// Versions available to roll back to, newest first.
    pub previous: Vec<VersionReport>,
    /// The last load failure.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<String>,
    /// Loads that failed since start.
    pub failed_loads: u64,
}

/// One version in a [`PluginReport`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionReport {
    /// `name@version`.
    pub label: String,
    /// The declared version.
    pub version: String,
    /// The declared name.
    pub declared_name: String,
    /// Hex SHA-256 of the `.wasm`.
    pub sha256: String,
    /// The plugin contract it was built for: `0.1` or `0.2`.
    pub contract: &'static str,
    /// Event names it handles.
    pub subscriptions: Vec<String>,
    /// When it was loaded.
    pub loaded_at: String,
    /// Its configuration (JSON text).
    pub config: String,
    /// Its counters.
    pub counters: StatsSnapshot,
    /// Whether its calls run off the async workers now (slower).
    pub off_workers: bool,
}

impl Version {
    fn report(&self) -> VersionReport {
        let plugin = &self.plugin;
        VersionReport {
            label: plugin.label().to_string(),
            version: plugin.info().version.clone(),
            declared_name: plugin.info().name.clone(),
            sha256: plugin.content_hash().to_owned(),
            contract: plugin.contract(),
            subscriptions: plugin.subscriptions().to_vec(),
            loaded_at: rfc3339(self.loaded_at),
            config: plugin.config().to_owned(),
            counters: plugin.stats().snapshot(),
            off_workers: plugin.runs_off_workers(),
        }
    }
}

/// Whether `name` can name a plugin (and its file).
pub fn is_valid_plugin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Loads, swaps, unloads and rolls back plugins.
pub struct PluginManager {
    runtime: Arc<PluginRuntime>,
    registry: Arc<PluginRegistry>,
    dir: PathBuf,
    configs: Mutex<BTreeMap<String, String>>,
    slots: Mutex<HashMap<String, Slot>>,
    /// One operation at a time: a watcher event and an upload for the same
    /// plugin must not interleave.
    operation: tokio::sync::Mutex<()>,
    failed_loads: std::sync::atomic::AtomicU64,
}

impl PluginManager {
    /// A manager of the plugins in `dir`, configured by `configs` (plugin
    /// name → JSON).
    pub fn new(
        runtime: Arc<PluginRuntime>,
        registry: Arc<PluginRegistry>,
        dir: PathBuf,
        configs: BTreeMap<String, String>,
    ) -> Self {
        Self {
            runtime,
            registry,
            dir,
            configs: Mutex::new(configs),
            slots: Mutex::new(HashMap::new()),
            operation: tokio::sync::Mutex::new(()),
            failed_loads: Default::default(),
        }
    }

    /// The runtime (for cache statistics).
    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    /// Loads failed since start, over all plugins.
    pub fn failed_loads(&self) -> u64 {
        self.failed_loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    fn config_of(&self, name: &str) -> String {
        let configs = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        configs
            .get(name)
            .cloned()
            .unwrap_or_else(|| "{}".to_owned())
    }

    fn with_slots<R>(&self, f: impl FnOnce(&mut HashMap<String, Slot>) -> R) -> R {
        f(&mut self.slots.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Loads every `*.wasm` of the folder (at start).
    pub async fn load_all(&self) {
        for name in wasm_names(&self.dir) {
            self.sync_file(&name).await;
        }
    }

    /// Brings plugin `name` in line with its file: loads a new or changed
    /// file, unloads a removed one. A file that does not load leaves the
    /// serving version in place and is reported.
    pub async fn sync_file(&self, name: &str) {
        let _guard = self.operation.lock().await;
        let path = self.path_of(name);
        match tokio::fs::read(&path).await {
            Ok(wasm) => {
                let config = self.config_of(name);
                if self.is_current(name, &wasm, &config) {
                    return;
                }
                if let Err(err) = self.load_and_swap(name, Arc::new(wasm), config).await {
                    tracing::error!(
                        plugin = name,
                        "{} not loaded, previous version keeps serving: {err}",
                        path.display()
                    );
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if self.unload(name) {
                    tracing::info!(plugin = name, "plugin file removed: unloaded");
                }
            }
            Err(err) => tracing::error!(plugin = name, "cannot read {}: {err}", path.display()),
        }
    }

    fn is_current(&self, name: &str, wasm: &[u8], config: &str) -> bool {
        let hash = content_hash(wasm);
        self.with_slots(|slots| {
            slots
                .get(name)
                .and_then(|slot| slot.current.as_ref())
                .is_some_and(|current| {
                    current.plugin.content_hash() == hash && current.plugin.config() == config
                })
        })
    }

    /// Compiles and validates, then swaps atomically; the replaced version
    /// is kept for rollback.
    async fn load_and_swap(
        &self,
        name: &str,
        wasm: Arc<Vec<u8>>,
        config: String,
    ) -> Result<Arc<LoadedPlugin>, LoadError> {
        let started = std::time::Instant::now();
        let loaded = self
            .runtime
            .load_blocking(name.to_owned(), Arc::clone(&wasm), config)
            .await;
        let plugin = match loaded {
            Ok(plugin) => Arc::new(plugin),
            Err(err) => {
                self.failed_loads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.with_slots(|slots| {
                    let slot = slots.entry(name.to_owned()).or_default();
                    slot.last_error = Some((err.to_string(), SystemTime::now()));
                    slot.failed_loads += 1;
                });
                return Err(err);
            }
        };
        self.install(
            name,
            Version {
                plugin: Arc::clone(&plugin),
                wasm,
                loaded_at: SystemTime::now(),
            },
        );
        tracing::info!(plugin = %plugin.label(), sha256 = plugin.content_hash(), subscriptions = ?plugin.subscriptions(), load_ms = started.elapsed().as_millis(), "plugin serving");
        Ok(plugin)
    }

    fn install(&self, name: &str, version: Version) {
        self.registry.install_shared(Arc::clone(&version.plugin));
        self.with_slots(|slots| {
            let slot = slots.entry(name.to_owned()).or_default();
            if let Some(replaced) = slot.current.replace(version) {
                slot.previous.push_front(replaced);
                slot.previous.truncate(KEPT_VERSIONS);
            }
            slot.last_error = None;
        });
    }

    fn unload(&self, name: &str) -> bool {
        let removed = self.registry.remove(name).is_some();
        self.with_slots(|slots| {
            if let Some(slot) = slots.get_mut(name)
                && let Some(current) = slot.current.take()
            {
                slot.previous.push_front(current);
                slot.previous.truncate(KEPT_VERSIONS);
            }
        });
        removed
    }

    /// Validates and installs an uploaded version, then writes it to the
    /// folder. An invalid upload changes nothing.
    pub async fn upload(&self, name: &str, wasm: Vec<u8>) -> Result<PluginReport, OperationError> {
        if !is_valid_plugin_name(name) {
            return Err(OperationError::BadName(name.to_owned()));
        }
        let _guard = self.operation.lock().await;
        let config = self.config_of(name);
        let wasm = Arc::new(wasm);
        if !self.is_current(name, &wasm, &config) {
            self.load_and_swap(name, Arc::clone(&wasm), config).await?;
        }
        write_atomically(&self.path_of(name), &wasm).await?;
        Ok(self.report(name).expect("just installed"))
    }

    /// Unloads a plugin and removes its file; its events are then unknown.
    pub async fn delete(&self, name: &str) -> Result<(), OperationError> {
        let _guard = self.operation.lock().await;
        if !self.unload(name) {
            return Err(OperationError::NotLoaded(name.to_owned()));
        }
        match tokio::fs::remove_file(self.path_of(name)).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(OperationError::Io(err.to_string())),
        }
    }

    /// Puts the previous version back in service (and in the folder).
    pub async fn rollback(&self, name: &str) -> Result<PluginReport, OperationError> {
        let _guard = self.operation.lock().await;
        let previous = self
            .with_slots(|slots| {
                slots
                    .get_mut(name)
                    .and_then(|slot| slot.previous.pop_front())
            })
            .ok_or_else(|| OperationError::NoPreviousVersion(name.to_owned()))?;
        let wasm = Arc::clone(&previous.wasm);
        let config = self.config_of(name);
        if previous.plugin.config() == config {
            // The old version is still compiled and its pool warm: reuse it.
            // Installing moves the version rolled back from onto `previous`.
            self.install(
                name,
                Version {
                    loaded_at: SystemTime::now(),
                    ..previous
                },
            );
        } else {
            self.load_and_swap(name, Arc::clone(&wasm), config).await?;
        }
        write_atomically(&self.path_of(name), &wasm).await?;
        tracing::info!(plugin = name, "rolled back");
        Ok(self.report(name).expect("just installed"))
    }

    /// Applies new plugin configurations: plugins whose configuration
    /// changed are reloaded with it.
    pub async fn set_configs(&self, configs: BTreeMap<String, String>) {
        let changed: Vec<String> = {
            let mut current = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
            let names: Vec<String> = current.keys().chain(configs.keys()).cloned().collect();
            let changed = names
                .into_iter()
                .filter(|name| current.get(name) != configs.get(name))
                .collect();
            *current = configs;
            changed
        };
        for name in changed {
            tracing::info!(plugin = %name, "configuration changed: reloading");
            self.sync_file(&name).await;
        }
    }

    /// A report of one plugin.
    pub fn report(&self, name: &str) -> Option<PluginReport> {
        self.with_slots(|slots| slots.get(name).map(|slot| report(name, slot)))
    }

    /// Reports of every plugin seen, by name.
    pub fn reports(&self) -> Vec<PluginReport> {
        let mut reports: Vec<_> = self.with_slots(|slots| {
            slots
                .iter()
                .map(|(name, slot)| report(name, slot))
                .collect()
        });
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        reports
    }
}

fn report(name: &str, slot: &Slot) -> PluginReport {
    PluginReport {
        name: name.to_owned(),
        status: match (&slot.current, slot.previous.is_empty()) {
            (Some(_), _) => "serving",
            (None, false) => "unloaded",
            (None, true) => "failed",
        },
        current: slot.current.as_ref().map(Version::report),
        previous: slot.previous.iter().map(Version::report).collect(),
        last_error: slot.last_error.as_ref().map(|(error, _)| error.clone()),
        last_error_at: slot.last_error.as_ref().map(|(_, at)| rfc3339(*at)),
        failed_loads: slot.failed_loads,
    }
}

/// Writes through a temporary file and a rename, so that the watcher never
/// sees a half-written plugin from us.
async fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), OperationError> {
    let io = |err: std::io::Error| OperationError::Io(err.to_string());
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
    }
    let temporary = path.with_extension(format!("wasm.{}.tmp", std::process::id()));
    tokio::fs::write(&temporary, bytes).await.map_err(io)?;
    tokio::fs::rename(&temporary, path).await.map_err(io)
}

/// Plugin names (file stems) of the `*.wasm` files in `dir`.
fn wasm_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        tracing::warn!(dir = %dir.display(), "plugins folder not readable: no plugins loaded");
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| plugin_name(&entry.path()))
        .collect();
    names.sort();
    names
}

/// The plugin a path names: `<dir>/<name>.wasm` with a valid name.
fn plugin_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    let name = path.file_stem()?.to_str()?;
    is_valid_plugin_name(name).then(|| name.to_owned())
}

/// A running watch of the plugins folder; dropping it ends the watch.
#[derive(Debug)]
pub struct FolderWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Watches the plugins folder (and the config file, if any) and keeps the
/// manager in step, until the returned watch is dropped.
pub fn watch(
    manager: Arc<PluginManager>,
    config_file: Option<PathBuf>,
) -> notify::Result<FolderWatch> {
    let (changes, mut changed) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
        {
            for path in event.paths {
                let _ = changes.send(path);
            }
        }
    })?;
    std::fs::create_dir_all(&manager.dir).ok();
    watcher.watch(&manager.dir, RecursiveMode::NonRecursive)?;
    if let Some(file) = &config_file
        && let Some(parent) = file.parent()
    {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        watcher.watch(parent, RecursiveMode::NonRecursive)?;
    }
    let config_name = config_file
        .as_ref()
        .and_then(|file| file.file_name().map(ToOwned::to_owned));

    tokio::spawn(async move {
        while let Some(first) = changed.recv().await {
            // Debounce: gather changes until the folder is quiet.
            let mut paths = vec![first];
            while let Ok(Some(path)) = tokio::time::timeout(DEBOUNCE, changed.recv()).await {
                paths.push(path);
            }
            let mut names: Vec<String> = paths
                .iter()
                .filter(|path| path.parent() == Some(manager.dir.as_path()))
                .filter_map(|path| plugin_name(path))
                .collect();
            names.sort();
            names.dedup();
            let config_changed = config_name
                .as_ref()
                .is_some_and(|config| paths.iter().any(|path| path.file_name() == Some(config)));
            if config_changed && let Some(file) = &config_file {
                match crate::config::Settings::from_file(file)
                    .and_then(|settings| crate::config::plugin_configs(&settings))
                {
                    Ok(configs) => manager.set_configs(configs).await,
                    Err(err) => tracing::error!("config file not reloaded: {err}"),
                }
            }
            for name in names {
                manager.sync_file(&name).await;
            }
        }
    });
    Ok(FolderWatch { _watcher: watcher })
}
