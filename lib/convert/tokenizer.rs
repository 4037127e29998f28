//! The tokenizer files of zero-to-fp32's Hugging Face directory output, so that AutoTokenizer
//! loads the directory as AutoModelForCausalLM does: copied from `--tokenizer`, else from what
//! the checkpoint records about where the run's model and tokens came from (a zerokit manifest's
//! training configuration: `init_from`, a local directory or a hub id in the local cache;
//! `model`, a config.json's directory; the tokenizer.json `prepare --tokenizer` recorded in the
//! dataset's meta.json, if its sha256 still matches). When none is known or present, the log says
//! which files were not copied and why.

use super::ConvertError;
use crate::data::HfTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What a tokenizer directory may hold that belongs with the model, in the order copied.
pub const FILES: [&str; 5] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json"];

/// A directory is a tokenizer's source only if AutoTokenizer can build a tokenizer from it: a
/// fast tokenizer's tokenizer.json or a SentencePiece tokenizer.model.
const CORE: [&str; 2] = ["tokenizer.json", "tokenizer.model"];

/// What will be copied, decided before anything is converted.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Copy `files` (source, name in the output) from `from` (for the log); `absent`: the files
    /// of [`FILES`] that the source does not have.
    Copy { from: String, files: Vec<(PathBuf, String)>, absent: Vec<&'static str> },
    /// Nothing to copy, and why.
    Nothing(String),
}

impl Plan {
    /// One line for the log, after the copy (or the dry run).
    pub fn describe(&self, done: bool) -> String {
        match self {
            Plan::Copy { from, files, absent } => {
                let names: Vec<&str> = files.iter().map(|(_, n)| n.as_str()).collect();
                let mut s = format!(
                    "tokenizer: {} {} from {from}",
                    if done { "copied" } else { "would copy" },
                    names.join(", ")
                );
                if !absent.is_empty() {
                    s.push_str(&format!(" (not there, so not copied: {})", absent.join(", ")));
                }
                s
            }
            Plan::Nothing(why) => {
                format!("tokenizer files not copied ({}): {why}; give --tokenizer PATH to add them", FILES.join(", "))
            }
        }
    }

    /// Copies the files into `dir` (the output's temporary directory), each atomically.
    pub fn copy_into(&self, dir: &Path) -> Result<(), ConvertError> {
        if let Plan::Copy { files, .. } = self {
            for (src, name) in files {
                let bytes =
                    std::fs::read(src).map_err(|e| ConvertError::Tokenizer(format!("{}: {e}", src.display())))?;
                crate::fsutil::write_atomic(&dir.join(name), &bytes)?;
            }
        }
        Ok(())
    }
}

/// The files of [`FILES`] in `dir`, or None when it has no tokenizer ([`CORE`]).
fn from_dir(dir: &Path, label: String) -> Option<Plan> {
    if !CORE.iter().any(|f| dir.join(f).is_file()) {
        return None;
    }
    let (present, absent): (Vec<&'static str>, Vec<&'static str>) = FILES.iter().partition(|f| dir.join(f).is_file());
    let files = present.into_iter().map(|f| (dir.join(f), f.to_string())).collect();
    Some(Plan::Copy { from: format!("{} ({label})", dir.display()), files, absent })
}

/// `--tokenizer PATH`: a directory holding a tokenizer (its [`FILES`] copied), or a
/// tokenizer.json file (copied as tokenizer.json). Checked now, so that a wrong path fails
/// before the conversion rather than after it.
pub fn explicit(path: &Path) -> Result<Plan, ConvertError> {
    let bad = |msg: &str| ConvertError::Tokenizer(format!("--tokenizer {}: {msg}", path.display()));
    if path.is_dir() {
        return from_dir(path, "--tokenizer".into())
            .ok_or_else(|| bad("holds neither tokenizer.json nor tokenizer.model"));
    }
    if !path.is_file() {
        return Err(bad("no such file or directory"));
    }
    // A file is a tokenizer.json: one the tokenizers library reads, or a clear error now.
    HfTokenizer::open(path).map_err(|e| ConvertError::Tokenizer(format!("--tokenizer: {e}")))?;
    let absent = FILES[1..].to_vec();
    Ok(Plan::Copy {
        from: format!("{} (--tokenizer)", path.display()),
        files: vec![(path.to_path_buf(), "tokenizer.json".into())],
        absent,
    })
}

/// The plan from what a zerokit checkpoint records of its run: `init_dir` (the manifest's
/// absolute model directory, carried over resumes) and the training configuration (the
/// manifest's `config`; None: a checkpoint that records none, as DeepSpeed's). The first of
/// init_dir (or, in checkpoints without it, init_from), model and the dataset's recorded
/// tokenizer that names a directory holding a tokenizer is the source.
pub fn recorded(run: Option<&Value>, init_dir: Option<&Path>) -> Plan {
    let Some(run) = run else {
        return Plan::Nothing("the checkpoint does not record which model or tokenizer the run started from".into());
    };
    let mut why = Vec::new();
    let text = |key: &str| run.get(key).and_then(Value::as_str);
    match (init_dir, text("init_from")) {
        (Some(dir), _) => {
            let label = format!("the run's init_from, {}", dir.display());
            if !dir.is_dir() {
                why.push(format!("{label}: not there any more"));
            } else if let Some(plan) = from_dir(dir, label.clone()) {
                return plan;
            } else {
                why.push(format!("{label}: holds no tokenizer.json or tokenizer.model"));
            }
        }
        (None, Some(from @ ("scratch" | "resume"))) => {
            why.push(format!("init_from = {from:?} names no model directory"))
        }
        (None, Some(from)) => {
            let dir = if Path::new(from).is_dir() {
                Ok(Some(PathBuf::from(from)))
            } else {
                crate::hub::resolve(from).map_err(|e| e.to_string())
            };
            match dir {
                Ok(Some(dir)) => match from_dir(&dir, format!("init_from = {from:?}")) {
                    Some(plan) => return plan,
                    None => why.push(format!("init_from {} holds no tokenizer.json or tokenizer.model", dir.display())),
                },
                Ok(None) => {
                    why.push(format!("init_from = {from:?} is not here (not a directory or a cached model id)"))
                }
                Err(e) => why.push(format!("init_from = {from:?}: {e}")),
            }
        }
        (None, None) => why.push("the run records no init_from".into()),
    }
    if let Some(model) = text("model") {
        // A config.json (or its directory) may sit with its tokenizer; a preset name is no path.
        let p = Path::new(model);
        let dir = if p.is_dir() { Some(p) } else { p.extension().filter(|e| *e == "json").and(p.parent()) };
        if let Some(plan) = dir.filter(|d| d.is_dir()).and_then(|d| from_dir(d, format!("model = {model:?}"))) {
            return plan;
        }
    }
    match text("dataset") {
        Some(dataset) => match dataset_tokenizer(Path::new(dataset)) {
            Ok(plan) => return plan,
            Err(e) => why.push(e),
        },
        None => why.push("the run records no dataset".into()),
    }
    Plan::Nothing(why.join("; "))
}

/// The directory of the tokenizer.json that DATASET/meta.json records (`prepare --tokenizer`),
/// if it is still there unchanged; else why not.
fn dataset_tokenizer(dataset: &Path) -> Result<Plan, String> {
    let meta_path = dataset.join("meta.json");
    let Ok(text) = std::fs::read_to_string(&meta_path) else {
        return Err(format!("dataset {}: no meta.json to name its tokenizer", dataset.display()));
    };
    let meta: Value = serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", meta_path.display()))?;
    let t = &meta["tokenizer"];
    let Some((file, sha256)) = t["path"].as_str().zip(t["sha256"].as_str()) else {
        let encoding = meta["encoding"].as_str().unwrap_or("?");
        return Err(format!(
            "dataset {} was tokenized with {encoding:?}, not a Hugging Face tokenizer.json",
            dataset.display()
        ));
    };
    let file = Path::new(file);
    match crate::fsutil::sha256_file(file) {
        Ok(have) if have == sha256 => {}
        Ok(_) => return Err(format!("{}: changed since the dataset was prepared (sha256 differs)", file.display())),
        Err(e) => return Err(format!("the dataset's tokenizer {}: {e}", file.display())),
    }
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let label = format!("the tokenizer of dataset {}", dataset.display());
    let alone = || Plan::Copy {
        from: format!("{} ({label})", file.display()),
        files: vec![(file.to_path_buf(), "tokenizer.json".into())],
        absent: FILES[1..].to_vec(),
    };
    // A tokenizer.json's directory's other files are of the same tokenizer; a file of another
    // name is copied alone.
    Ok(match file.file_name().and_then(|n| n.to_str()) {
        Some("tokenizer.json") => from_dir(dir, label.clone()).unwrap_or_else(alone),
        _ => alone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_a_tokenizer_is_no_source() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("tokenizer_config.json"), "{}").unwrap();
        assert_eq!(from_dir(tmp.path(), "x".into()), None);
        std::fs::write(tmp.path().join("tokenizer.model"), "spm").unwrap();
        let Some(Plan::Copy { files, absent, .. }) = from_dir(tmp.path(), "x".into()) else { panic!() };
        let names: Vec<&str> = files.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["tokenizer_config.json", "tokenizer.model"]);
        assert_eq!(absent, ["tokenizer.json", "special_tokens_map.json", "generation_config.json"]);
    }

    #[test]
    fn runs_that_record_no_source_say_why() {
        let tmp = tempfile::tempdir().unwrap();
        let run = serde_json::json!({"init_from": "scratch", "model": "gpt2", "dataset": tmp.path()});
        let Plan::Nothing(why) = recorded(Some(&run), None) else { panic!() };
        assert!(why.contains("init_from = \"scratch\"") && why.contains("no meta.json"), "{why}");
        let Plan::Nothing(why) = recorded(None, None) else { panic!() };
        assert!(why.contains("does not record"), "{why}");
        let err = explicit(&tmp.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("--tokenizer") && err.contains("nope"), "{err}");
        let err = explicit(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("neither tokenizer.json nor tokenizer.model"), "{err}");
    }

    #[test]
    fn a_datasets_recorded_tokenizer_is_copied_with_its_directory_only_while_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let (tok, data) = (tmp.path().join("tok"), tmp.path().join("data"));
        std::fs::create_dir_all(&tok).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let file = tok.join("tokenizer.json");
        std::fs::write(&file, r#"{"model": {}}"#).unwrap();
        std::fs::write(tok.join("tokenizer_config.json"), "{}").unwrap();
        let sha256 = crate::fsutil::sha256_file(&file).unwrap();
        let meta = serde_json::json!({"encoding": "tokenizer.json", "tokenizer": {"path": file, "sha256": sha256}});
        std::fs::write(data.join("meta.json"), meta.to_string()).unwrap();
        let run = serde_json::json!({"init_from": "scratch", "model": "llama-tiny", "dataset": data});
        let Plan::Copy { files, from, .. } = recorded(Some(&run), None) else {
            panic!("{:?}", recorded(Some(&run), None))
        };
        let names: Vec<&str> = files.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["tokenizer.json", "tokenizer_config.json"]);
        assert!(from.contains("the tokenizer of dataset"), "{from}");
        // Copied only as recorded: a changed file is named, not copied.
        std::fs::write(&file, r#"{"model": {"x": 1}}"#).unwrap();
        let Plan::Nothing(why) = recorded(Some(&run), None) else { panic!() };
        assert!(why.contains("sha256 differs") && why.contains("tokenizer.json"), "{why}");
        // A GPT-2 dataset names its encoding.
        std::fs::write(data.join("meta.json"), r#"{"encoding": "gpt2", "tokenizer": null}"#).unwrap();
        let Plan::Nothing(why) = recorded(Some(&run), None) else { panic!() };
        assert!(why.contains("tokenized with \"gpt2\""), "{why}");
    }
}
