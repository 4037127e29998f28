//! Tags and `latest` under a checkpoint root, zerokit's and DeepSpeed's alike: a root holds one
//! directory per save (a tag) and a `latest` file naming the newest complete one. This is the one
//! place that reads `latest` and turns a (root, --tag) pair into a tag directory, for `train`,
//! `zero-to-fp32` and `ckpt`.
//!
//! `latest` is untrusted input: it must name a tag *inside its own root*. An absolute path or a
//! `../other-run/step_N` would make a tool silently read (or, on resume, continue) another run,
//! so anything but a plain directory name is refused. Every error says what is wrong with
//! `latest` and lists the tags that are there, so the user can pass one with `--tag`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{root}: no tag {tag:?} here ({})", listing(.available))]
    NoSuchTag { root: PathBuf, tag: String, available: Vec<String> },
    #[error("{path}: {what} ({})", listing(.available))]
    BadLatest { path: PathBuf, what: String, available: Vec<String> },
    #[error(
        "{root}: not a checkpoint tag, and no `latest` file names a tag under it ({}); pass --tag to choose one",
        listing(.available)
    )]
    NoLatest { root: PathBuf, available: Vec<String> },
}

fn listing(tags: &[String]) -> String {
    if tags.is_empty() {
        "no tags here".to_string()
    } else {
        format!("tags here: {}", tags.join(", "))
    }
}

/// A name that stays inside its root: one visible path component. Hidden names are a save in
/// progress (`.step_N.partial`) or a tag being retired, never a tag.
pub fn valid_tag_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name.trim() == name
}

/// Orders tag names by their trailing number (global_step9 before global_step10).
pub fn tag_order(name: &str) -> (String, u64, String) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, num) = name.split_at(name.len() - digits);
    (stem.to_string(), num.parse().unwrap_or(0), name.to_string())
}

/// The visible subdirectories of `root` that `is_tag` accepts, in step order.
pub fn list_tags(root: &Path, is_tag: &dyn Fn(&Path) -> bool) -> Result<Vec<String>, TagError> {
    let io_err = |source| TagError::Io { path: root.to_path_buf(), source };
    let mut tags = Vec::new();
    for e in fs::read_dir(root).map_err(io_err)? {
        let e = e.map_err(io_err)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if valid_tag_name(&name) && e.path().is_dir() && is_tag(&e.path()) {
            tags.push(name);
        }
    }
    tags.sort_by_key(|t| tag_order(t));
    Ok(tags)
}

/// What a root's `latest` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Latest {
    /// No such file.
    Missing,
    /// A valid tag name (whether that tag exists is the caller's question).
    Names(String),
    /// Present but unusable; the text says why ("is empty", "is a directory, not a file", ...).
    Bad(String),
}

/// Reads `root/latest`. Only I/O failures other than "not found" are errors.
pub fn read_latest(root: &Path) -> Result<Latest, TagError> {
    let path = root.join("latest");
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Latest::Missing),
        Err(source) => return Err(TagError::Io { path, source }),
    };
    if meta.is_dir() {
        return Ok(Latest::Bad("is a directory, not the file naming the newest tag".into()));
    }
    if meta.len() > 4096 {
        return Ok(Latest::Bad(format!("is {} bytes long, not a tag name", meta.len())));
    }
    let bytes = fs::read(&path).map_err(|source| TagError::Io { path: path.clone(), source })?;
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(Latest::Bad("is not text".into()));
    };
    let name = text.trim();
    Ok(if name.is_empty() {
        Latest::Bad("is empty".into())
    } else if !valid_tag_name(name) {
        Latest::Bad(format!("names {name:?}, which is not a tag of this root (a directory name inside it, no path)"))
    } else {
        Latest::Names(name.to_string())
    })
}

/// The tag directory that `--tag` (when given) or `latest` names under `root`. `is_tag` says
/// whether a directory is a complete tag of the caller's format(s).
pub fn resolve(root: &Path, tag: Option<&str>, is_tag: &dyn Fn(&Path) -> bool) -> Result<PathBuf, TagError> {
    if let Some(t) = tag {
        let dir = root.join(t);
        if valid_tag_name(t) && dir.is_dir() && is_tag(&dir) {
            return Ok(dir);
        }
        return Err(TagError::NoSuchTag { root: root.into(), tag: t.into(), available: list_tags(root, is_tag)? });
    }
    let what = match read_latest(root)? {
        Latest::Missing => return Err(TagError::NoLatest { root: root.into(), available: list_tags(root, is_tag)? }),
        Latest::Bad(what) => what,
        Latest::Names(name) => {
            let dir = root.join(&name);
            if dir.is_dir() && is_tag(&dir) {
                return Ok(dir);
            }
            if dir.is_dir() {
                format!("names tag {name:?}, which is not a complete checkpoint")
            } else {
                format!("names tag {name:?}, which does not exist")
            }
        }
    };
    Err(TagError::BadLatest { path: root.join("latest"), what, available: list_tags(root, is_tag)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_manifest(d: &Path) -> bool {
        d.join("manifest.json").is_file()
    }

    #[test]
    fn latest_must_name_a_complete_tag_inside_its_root() {
        let other = tempfile::tempdir().unwrap();
        fs::create_dir(other.path().join("step_9")).unwrap();
        fs::write(other.path().join("step_9/manifest.json"), "{}").unwrap();
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for t in ["step_10", "step_2"] {
            fs::create_dir(root.join(t)).unwrap();
            fs::write(root.join(t).join("manifest.json"), "{}").unwrap();
        }
        fs::create_dir(root.join("step_11")).unwrap(); // incomplete
        let err = |latest: &str| {
            fs::write(root.join("latest"), latest).unwrap();
            resolve(root, None, &has_manifest).unwrap_err().to_string()
        };
        let abs = other.path().join("step_9").display().to_string();
        for (latest, says) in [
            (abs.as_str(), "not a tag of this root"),
            ("../step_9", "not a tag of this root"),
            ("", "is empty"),
            ("  \n", "is empty"),
            ("step_3", "names tag \"step_3\", which does not exist"),
            ("step_11", "not a complete checkpoint"),
            (".step_12.partial", "not a tag of this root"),
        ] {
            let e = err(latest);
            assert!(e.contains(says) && e.contains("tags here: step_2, step_10"), "{latest:?}: {e}");
        }
        fs::write(root.join("latest"), "step_10\n").unwrap();
        assert_eq!(resolve(root, None, &has_manifest).unwrap(), root.join("step_10"));
        assert_eq!(resolve(root, Some("step_2"), &has_manifest).unwrap(), root.join("step_2"));
        let e = resolve(root, Some("../x"), &has_manifest).unwrap_err().to_string();
        assert!(e.contains("no tag \"../x\"") && e.contains("step_10"), "{e}");
        fs::remove_file(root.join("latest")).unwrap();
        fs::create_dir(root.join("latest")).unwrap();
        let e = resolve(root, None, &has_manifest).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        fs::remove_dir(root.join("latest")).unwrap();
        let e = resolve(root, None, &has_manifest).unwrap_err().to_string();
        assert!(e.contains("no `latest` file") && e.contains("tags here: step_2, step_10"), "{e}");
    }

    #[test]
    fn tags_sort_by_their_step() {
        let mut v = vec!["global_step10", "global_step9", "global_step100", "best"];
        v.sort_by_key(|t| tag_order(t));
        assert_eq!(v, ["best", "global_step9", "global_step10", "global_step100"]);
    }
}
