//! Hugging Face Hub names for models, adapters and datasets, as transformers, PEFT and
//! `datasets.load_dataset` accept them.
//!
//! A name that is an existing local path is used as it is. Any other name of the Hub's form
//! (`owner/name` or `name`) is looked up on the Hub through the `hf-hub` crate and downloaded
//! into the Hugging Face cache (the `huggingface_hub` layout, `models--owner--name/snapshots/…`,
//! so files already fetched by Python are reused and the other way round). The environment is
//! read as `huggingface_hub` reads it:
//!
//! - `HF_HOME`: the cache is `$HF_HOME/hub` (default `~/.cache/huggingface/hub`);
//! - `HF_ENDPOINT`: the Hub's address (default `https://huggingface.co`);
//! - `HF_HUB_OFFLINE=1`: nothing is fetched; names resolve from the cache or fail, naming the
//!   missing file;
//! - `HF_TOKEN`, else `$HF_HOME/token`: sent for gated and private repositories.
//!
//! Downloads show a progress bar on a terminal and resume: an interrupted file continues from
//! its partial `.sync.part` blob on the next run.
//!
//! Models: `config.json`, the safetensors weights (every shard of
//! `model.safetensors.index.json`, else `model.safetensors`), and the tokenizer and generation
//! files when the repository has them. Adapters: `adapter_config.json` and
//! `adapter_model.safetensors`, plus tokenizer files when present. Datasets: the data files
//! `datasets` would take for the train split of a repository without a loading script: parquet,
//! JSON Lines or JSON files whose path names `train` (all data files when none does), parquet
//! first.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

/// What a name refers to; decides which files are fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// A model: config, weights, tokenizer.
    Model,
    /// A PEFT adapter: `adapter_config.json` and `adapter_model.safetensors`.
    Adapter,
    /// A dataset: its data files.
    Dataset,
}

impl RepoKind {
    fn noun(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Adapter => "adapter",
            RepoKind::Dataset => "dataset",
        }
    }

    fn repo_type(self) -> RepoType {
        match self {
            RepoKind::Model | RepoKind::Adapter => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        }
    }
}

/// Errors of Hub name resolution. Each names the flag and the name it was given.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Neither a local path nor a name of the Hub's form.
    #[error("{flag} {name}: no such local file or directory (and not a Hugging Face Hub name, which has the form owner/name)")]
    NotFound {
        /// The flag.
        flag: String,
        /// The value given.
        name: String,
    },
    /// The Hub answered with an error for the repository or one of its files.
    #[error("{flag} {name}: no local file or directory of that name, and fetching {kind} `{name}` from the Hugging Face Hub at {endpoint} failed: {detail}")]
    Fetch {
        /// The flag.
        flag: String,
        /// The value given.
        name: String,
        /// Model, adapter or dataset.
        kind: &'static str,
        /// The Hub's address.
        endpoint: String,
        /// What failed (file and HTTP status).
        detail: String,
    },
    /// `HF_HUB_OFFLINE` is set and the cache lacks a file.
    #[error("{flag} {name}: HF_HUB_OFFLINE is set and the {kind}'s {missing} is not in the cache {cache}; run once online or unset HF_HUB_OFFLINE")]
    Offline {
        /// The flag.
        flag: String,
        /// The value given.
        name: String,
        /// Model, adapter or dataset.
        kind: &'static str,
        /// The missing file.
        missing: String,
        /// The cache directory.
        cache: PathBuf,
    },
    /// The repository exists but lacks what the programs read.
    #[error("{flag} {name}: the Hugging Face Hub {kind} repository has {what}")]
    Unusable {
        /// The flag.
        flag: String,
        /// The value given.
        name: String,
        /// Model, adapter or dataset.
        kind: &'static str,
        /// What is missing or wrong.
        what: String,
    },
}

/// Whether `s` has the form of a Hub repository id: `name` or `owner/name`, each part of ASCII
/// letters, digits, `-`, `_` and `.`, not starting or ending with `-` or `.`, without `--` or `..`,
/// at most 96 characters (the Hub's rule).
pub fn is_repo_id(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    let mut parts = s.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), None, None) => part_ok(a),
        (Some(a), Some(b), None) => part_ok(a) && part_ok(b),
        _ => false,
    }
}

/// The Hub client and cache, configured from the environment.
pub struct Hub {
    cache: Cache,
    endpoint: String,
    offline: bool,
    token: Option<String>,
    progress: bool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("cache", self.cache.path())
            .field("endpoint", &self.endpoint)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "on" | "yes" | "true"
        )
    })
}

impl Hub {
    /// A Hub at `endpoint` (e.g. `https://huggingface.co`) with its cache in `cache_dir` (the
    /// `hub` directory of `HF_HOME`), online, without a token.
    pub fn new(cache_dir: impl Into<PathBuf>, endpoint: &str) -> Self {
        Hub {
            cache: Cache::new(cache_dir.into()),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            offline: false,
            token: None,
            progress: true,
        }
    }

    /// Reads `HF_HOME`, `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_TOKEN`.
    pub fn from_env() -> Self {
        let cache = Cache::from_env();
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| cache.token());
        Hub::new(cache.path().clone(), &endpoint)
            .with_offline(env_flag("HF_HUB_OFFLINE"))
            .with_token(token)
    }

    /// Resolves from the cache only (`HF_HUB_OFFLINE`).
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// The token sent to the Hub (`HF_TOKEN`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Shows or hides download progress bars (shown by default, on a terminal only).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// The cache directory (`$HF_HOME/hub`).
    pub fn cache_dir(&self) -> &Path {
        self.cache.path()
    }

    /// The Hub's address.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether `HF_HUB_OFFLINE` is set.
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// A local directory for a model or adapter: `name_or_path` itself when it exists, else the
    /// cache snapshot of the Hub repository of that name, fetched as needed. `flag` names the
    /// flag in errors.
    pub fn dir(&self, kind: RepoKind, flag: &str, name_or_path: &str) -> Result<PathBuf, HubError> {
        let local = Path::new(name_or_path);
        if local.exists() || !is_repo_id(name_or_path) {
            return Ok(local.to_path_buf());
        }
        let files = self.fetch(kind, flag, name_or_path)?;
        let first = files.first().ok_or_else(|| HubError::Unusable {
            flag: flag.into(),
            name: name_or_path.into(),
            kind: kind.noun(),
            what: "no files".into(),
        })?;
        // Every file of a snapshot lies under the snapshot directory; the first is a top-level
        // file (config.json / adapter_config.json).
        Ok(first
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| first.clone()))
    }

    /// Local data files for `name_or_path`: itself when it exists, else the data files of the
    /// Hub dataset repository of that name, fetched as needed.
    pub fn data_files(&self, flag: &str, name_or_path: &str) -> Result<Vec<PathBuf>, HubError> {
        let local = Path::new(name_or_path);
        if local.exists() {
            return Ok(vec![local.to_path_buf()]);
        }
        // A name ending like a data file is a local file that does not exist, not a dataset.
        let file_like = [".parquet", ".jsonl", ".json", ".csv", ".txt"]
            .iter()
            .any(|e| name_or_path.ends_with(e));
        if file_like || !is_repo_id(name_or_path) {
            return Err(HubError::NotFound {
                flag: flag.into(),
                name: name_or_path.into(),
            });
        }
        self.fetch(RepoKind::Dataset, flag, name_or_path)
    }

    /// Fetches (or finds in the cache) the files `kind` needs; the first is the repository's
    /// main file for models and adapters. When the Hub cannot be reached at all, a complete
    /// cached copy is used, as `huggingface_hub` does.
    fn fetch(&self, kind: RepoKind, flag: &str, name: &str) -> Result<Vec<PathBuf>, HubError> {
        let repo = Repo::new(name.to_string(), kind.repo_type());
        let cached = CacheSource {
            hub: self,
            repo: repo.clone(),
            kind,
            flag,
            name,
        };
        if self.offline {
            return self.files(&cached, kind, flag, name);
        }
        let api = self
            .api()
            .map_err(|e| self.fetch_error(kind, flag, name, None, e))?;
        let online = HubSource {
            hub: self,
            repo: api.repo(repo),
            kind,
            flag,
            name,
            unreachable: std::cell::Cell::new(false),
        };
        match self.files(&online, kind, flag, name) {
            Err(e) if online.unreachable.get() => {
                self.files(&cached, kind, flag, name).map_err(|_| e)
            }
            other => other,
        }
    }

    fn files(
        &self,
        source: &dyn Source,
        kind: RepoKind,
        flag: &str,
        name: &str,
    ) -> Result<Vec<PathBuf>, HubError> {
        let listing = source.list()?;
        let mut out = Vec::new();
        match kind {
            RepoKind::Model => {
                out.push(source.get("config.json")?);
                let weights = if listing.contains("model.safetensors.index.json") {
                    let index = source.get("model.safetensors.index.json")?;
                    shards_of_index(&index).map_err(|what| HubError::Unusable {
                        flag: flag.into(),
                        name: name.into(),
                        kind: kind.noun(),
                        what,
                    })?
                } else if listing.contains("model.safetensors") {
                    vec!["model.safetensors".to_string()]
                } else {
                    let top: Vec<String> = listing
                        .names()
                        .into_iter()
                        .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
                        .collect();
                    if top.is_empty() {
                        return Err(HubError::Unusable {
                            flag: flag.into(),
                            name: name.into(),
                            kind: kind.noun(),
                            what: "no safetensors weights (model.safetensors or an index); \
                                   PyTorch .bin checkpoints are not read"
                                .into(),
                        });
                    }
                    top
                };
                for w in &weights {
                    out.push(source.get(w)?);
                }
                for optional in OPTIONAL_MODEL_FILES {
                    if listing.contains(optional) {
                        out.push(source.get(optional)?);
                    }
                }
            }
            RepoKind::Adapter => {
                out.push(source.get("adapter_config.json")?);
                if !listing.contains("adapter_model.safetensors") {
                    return Err(HubError::Unusable {
                        flag: flag.into(),
                        name: name.into(),
                        kind: kind.noun(),
                        what: "no adapter_model.safetensors".into(),
                    });
                }
                out.push(source.get("adapter_model.safetensors")?);
                for optional in OPTIONAL_MODEL_FILES {
                    if listing.contains(optional) {
                        out.push(source.get(optional)?);
                    }
                }
            }
            RepoKind::Dataset => {
                let files = select_data_files(&listing.names());
                if files.is_empty() {
                    return Err(HubError::Unusable {
                        flag: flag.into(),
                        name: name.into(),
                        kind: kind.noun(),
                        what: "no parquet, JSON Lines or JSON data files".into(),
                    });
                }
                for f in &files {
                    out.push(source.get(f)?);
                }
            }
        }
        Ok(out)
    }

    fn api(&self) -> Result<Api, ApiError> {
        ApiBuilder::from_cache(self.cache.clone())
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(self.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_retries(3)
            .build()
    }

    fn fetch_error(
        &self,
        kind: RepoKind,
        flag: &str,
        name: &str,
        file: Option<&str>,
        e: ApiError,
    ) -> HubError {
        let detail = match &e {
            ApiError::RequestError(r) => match r.as_ref() {
                ureq::Error::Status(code, _) => format!(
                    "HTTP {code}{}",
                    match code {
                        401 | 403 => " (a gated or private repository: accept its terms on the Hub and set HF_TOKEN)",
                        404 => " (no such repository or file)",
                        _ => "",
                    }
                ),
                ureq::Error::Transport(t) => format!("the Hub cannot be reached ({t})"),
            },
            _ => e.to_string(),
        };
        HubError::Fetch {
            flag: flag.into(),
            name: name.into(),
            kind: kind.noun(),
            endpoint: self.endpoint.clone(),
            detail: match file {
                Some(f) => format!("{f}: {detail}"),
                None => detail,
            },
        }
    }
}

/// Tokenizer and generation files fetched with a model or adapter when the repository has them.
const OPTIONAL_MODEL_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// The file names of a repository.
struct Listing(Vec<String>);

impl Listing {
    fn contains(&self, f: &str) -> bool {
        self.0.iter().any(|x| x == f)
    }

    fn names(&self) -> Vec<String> {
        self.0.clone()
    }
}

/// Where files come from: the Hub (through the cache) or the cache alone.
trait Source {
    fn list(&self) -> Result<Listing, HubError>;
    fn get(&self, file: &str) -> Result<PathBuf, HubError>;
}

struct HubSource<'a> {
    hub: &'a Hub,
    repo: ApiRepo,
    kind: RepoKind,
    flag: &'a str,
    name: &'a str,
    /// Set when a request failed for want of a connection (not for an HTTP error).
    unreachable: std::cell::Cell<bool>,
}

impl HubSource<'_> {
    fn error(&self, file: Option<&str>, e: ApiError) -> HubError {
        if let ApiError::RequestError(r) = &e {
            if matches!(r.as_ref(), ureq::Error::Transport(_)) {
                self.unreachable.set(true);
            }
        }
        self.hub
            .fetch_error(self.kind, self.flag, self.name, file, e)
    }
}

impl Source for HubSource<'_> {
    fn list(&self) -> Result<Listing, HubError> {
        let info = self.repo.info().map_err(|e| self.error(None, e))?;
        Ok(Listing(
            info.siblings.into_iter().map(|s| s.rfilename).collect(),
        ))
    }

    fn get(&self, file: &str) -> Result<PathBuf, HubError> {
        self.repo.get(file).map_err(|e| self.error(Some(file), e))
    }
}

struct CacheSource<'a> {
    hub: &'a Hub,
    repo: Repo,
    kind: RepoKind,
    flag: &'a str,
    name: &'a str,
}

impl CacheSource<'_> {
    fn offline(&self, missing: &str) -> HubError {
        HubError::Offline {
            flag: self.flag.into(),
            name: self.name.into(),
            kind: self.kind.noun(),
            missing: missing.into(),
            cache: self.hub.cache.path().clone(),
        }
    }

    /// `snapshots/<commit>` of the cached revision (`refs/<revision>`).
    fn snapshot(&self) -> Result<PathBuf, HubError> {
        let folder = self.hub.cache.path().join(self.repo.folder_name());
        let commit = std::fs::read_to_string(folder.join("refs").join(self.repo.revision()))
            .map_err(|_| self.offline("snapshot"))?;
        let dir = folder.join("snapshots").join(commit.trim());
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(self.offline("snapshot"))
        }
    }
}

impl Source for CacheSource<'_> {
    fn list(&self) -> Result<Listing, HubError> {
        let root = self.snapshot()?;
        let mut names = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|_| self.offline("snapshot"))?;
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    names.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        names.sort();
        Ok(Listing(names))
    }

    fn get(&self, file: &str) -> Result<PathBuf, HubError> {
        self.hub
            .cache
            .repo(self.repo.clone())
            .get(file)
            .ok_or_else(|| self.offline(file))
    }
}

/// The shard file names of a `model.safetensors.index.json`, in order of first appearance.
fn shards_of_index(index: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| format!("an unreadable model.safetensors.index.json ({e})"))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("a model.safetensors.index.json that is not JSON ({e})"))?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or("a model.safetensors.index.json without a weight_map")?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| format!("a weight_map entry for {tensor} that is not a file name"))?;
        if f.contains("..") || f.starts_with('/') {
            return Err(format!(
                "a weight_map entry for {tensor} outside the repository: {f}"
            ));
        }
        if !shards.iter().any(|s| s == f) {
            shards.push(f.to_string());
        }
    }
    if shards.is_empty() {
        return Err("an empty weight_map".into());
    }
    Ok(shards)
}

/// The data files of a dataset repository for the train split: among parquet, `.jsonl` and
/// `.json` files outside hidden directories, those whose path names `train` (all of them when
/// none does); then only the most preferred format present (parquet, JSON Lines, JSON). Sorted.
pub fn select_data_files(names: &[String]) -> Vec<String> {
    let hidden = |f: &str| f.split('/').any(|p| p.starts_with('.'));
    let data: Vec<&String> = names
        .iter()
        .filter(|f| !hidden(f))
        .filter(|f| {
            let base = f.rsplit('/').next().unwrap_or(f);
            f.ends_with(".parquet")
                || f.ends_with(".jsonl")
                || (f.ends_with(".json")
                    && !matches!(
                        base,
                        "dataset_infos.json" | "dataset_info.json" | "state.json"
                    ))
        })
        .collect();
    let names_train = |f: &str| {
        f.split(['/', '-', '_', '.'])
            .any(|w| w.eq_ignore_ascii_case("train"))
    };
    let train: Vec<&String> = data.iter().copied().filter(|f| names_train(f)).collect();
    let pool = if train.is_empty() { data } else { train };
    for ext in [".parquet", ".jsonl", ".json"] {
        let mut chosen: Vec<String> = pool
            .iter()
            .filter(|f| f.ends_with(ext))
            .map(|f| f.to_string())
            .collect();
        if !chosen.is_empty() {
            chosen.sort();
            return chosen;
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in [
            "deepseek-ai/deepseek-moe-16b-base",
            "garage-bAInd/Open-Platypus",
            "gpt2",
            "a/b.c_d",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "a/b/c",
            "./x",
            "x/",
            "a/../b",
            "a--b/c",
            "-a/b",
            "a/b.",
            "has space/x",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn data_file_choice() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            select_data_files(&s(&[
                ".gitattributes",
                "README.md",
                "data/train-00000-of-00001-4fe2df04669d1669.parquet",
            ])),
            s(&["data/train-00000-of-00001-4fe2df04669d1669.parquet"])
        );
        assert_eq!(
            select_data_files(&s(&[
                "data/test-0.parquet",
                "data/train-1.parquet",
                "data/train-0.parquet",
                "train.jsonl",
            ])),
            s(&["data/train-0.parquet", "data/train-1.parquet"])
        );
        assert_eq!(
            select_data_files(&s(&[
                "a.jsonl",
                "b.json",
                "dataset_infos.json",
                ".x/c.parquet"
            ])),
            s(&["a.jsonl"])
        );
        assert!(select_data_files(&s(&["README.md", "script.py"])).is_empty());
    }
}
