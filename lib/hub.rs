//! Hugging Face model ids (`meta-llama/Llama-3.2-1B`) resolved in the local hub cache, for
//! `train`'s `init_from` and `prepare --tokenizer` (issue 15). zerokit downloads nothing: a model
//! that is not in the cache is refused with the folder that was searched.
//!
//! The layout is the one huggingface_hub writes (its file_download and constants modules): the
//! cache root is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`; a model `ORG/NAME` lives in `models--ORG--NAME`, whose
//! `refs/main` holds the commit hash of the snapshot in `snapshots/<hash>/` (files there are
//! symlinks into `blobs/`, which reading follows).

use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HubError {
    #[error(
        "{id:?} is a Hugging Face model id, and it is not in the local hub cache: {why} (searched {searched}, \
         the cache root from {source_of_root}). zerokit downloads nothing: fetch it first (e.g. `hf download {id}`), \
         set HF_HUB_CACHE or HF_HOME to the cache that holds it, or give a local directory"
    )]
    NotCached { id: String, searched: PathBuf, source_of_root: &'static str, why: String },
}

/// The hub cache root and what it came from, read from the environment as huggingface_hub does.
pub fn cache_root() -> (PathBuf, &'static str) {
    cache_root_from(|k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from))
}

fn cache_root_from(var: impl Fn(&str) -> Option<PathBuf>) -> (PathBuf, &'static str) {
    if let Some(p) = var("HF_HUB_CACHE") {
        return (p, "HF_HUB_CACHE");
    }
    if let Some(p) = var("HF_HOME") {
        return (p.join("hub"), "HF_HOME");
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return (p.join("huggingface").join("hub"), "XDG_CACHE_HOME");
    }
    let home = var("HOME").unwrap_or_else(|| PathBuf::from("/"));
    (home.join(".cache").join("huggingface").join("hub"), "the default ~/.cache/huggingface/hub")
}

/// Whether `s` reads as a model id (`ORG/NAME`: one slash, both parts made of the characters
/// the Hub allows, neither `.` nor `..`) rather than a path. Callers ask only when no file or
/// directory of that name exists, so a relative path `data/model` that exists stays a path.
pub fn is_model_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

/// The snapshot directory of model `id` at the revision `refs/main` names, in the cache at
/// `root` (`source_of_root` says where that came from, for the error).
pub fn snapshot_in(root: &Path, source_of_root: &'static str, id: &str) -> Result<PathBuf, HubError> {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    let refs = repo.join("refs").join("main");
    let fail = |searched: &Path, why: String| HubError::NotCached {
        id: id.to_string(),
        searched: searched.to_path_buf(),
        source_of_root,
        why,
    };
    if !repo.is_dir() {
        return Err(fail(&repo, "no such folder".into()));
    }
    let rev = std::fs::read_to_string(&refs).map_err(|e| fail(&refs, format!("cannot read refs/main ({e})")))?;
    let rev = rev.trim();
    // A commit hash: anything else (a path, an empty file) is not a revision of this cache.
    if rev.is_empty() || !rev.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(fail(&refs, format!("refs/main holds {rev:?}, not a commit hash")));
    }
    let snap = repo.join("snapshots").join(rev);
    if !snap.is_dir() {
        return Err(fail(&snap, format!("refs/main names revision {rev}, whose snapshot folder is missing")));
    }
    Ok(snap)
}

/// The snapshot directory of model `id` in the local hub cache (see the module's text).
pub fn snapshot(id: &str) -> Result<PathBuf, HubError> {
    let (root, from) = cache_root();
    snapshot_in(&root, from, id)
}

/// `arg` as a local path: itself when it exists or does not read as a model id, else the
/// snapshot of that model in the hub cache (`Ok(None)`: not a model id, use it as given).
pub fn resolve(arg: &str) -> Result<Option<PathBuf>, HubError> {
    if Path::new(arg).exists() || !is_model_id(arg) {
        return Ok(None);
    }
    snapshot(arg).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_root_follows_huggingface_hubs_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| PathBuf::from(v))
        };
        let all = &[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/u")];
        assert_eq!(cache_root_from(env(all)), (PathBuf::from("/c"), "HF_HUB_CACHE"));
        assert_eq!(cache_root_from(env(&all[1..])), (PathBuf::from("/h/hub"), "HF_HOME"));
        assert_eq!(cache_root_from(env(&all[2..])), (PathBuf::from("/x/huggingface/hub"), "XDG_CACHE_HOME"));
        assert_eq!(cache_root_from(env(&all[3..])).0, PathBuf::from("/u/.cache/huggingface/hub"));
    }

    #[test]
    fn model_ids_and_paths() {
        for id in ["meta-llama/Llama-3.2-1B", "google/gemma-2-2b", "org_1/model.v2"] {
            assert!(is_model_id(id), "{id}");
        }
        for p in ["model", "/abs/path", "a/b/c", "./m", "../m", "a/", "/a", "a b/c", "org/.."] {
            assert!(!is_model_id(p), "{p}");
        }
    }
}
