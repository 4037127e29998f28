//! Configuration files as users already keep them, read into one table of zerokit keys: TOML
//! (zerokit's own), YAML (the same keys, with an optional nested `deepspeed:` block) and
//! nanoGPT's `config/*.py` files (`key = literal` lines, nanoGPT's key names and values), plus
//! DeepSpeed configs read as DeepSpeed reads them: Hjson, so `//` and `#` comments and trailing
//! commas are fine. The caller checks every key and value (same keys, same errors).

use super::ConfigError;
use std::path::{Path, PathBuf};

/// What a configuration file holds: its zerokit keys (values not yet checked), and the DeepSpeed
/// config it names or embeds, if any (the file it came from, for messages, and its contents).
#[derive(Debug, Default)]
pub struct ConfigFile {
    pub table: toml::Table,
    pub deepspeed: Option<(PathBuf, serde_json::Value)>,
}

fn parse_err(path: &Path, msg: impl Into<String>) -> ConfigError {
    ConfigError::Parse { path: path.into(), msg: msg.into() }
}

pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Io { path: path.into(), source: e })
}

/// Reads `path` by its extension: `.yaml`/`.yml`, `.py`, anything else as TOML.
pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = read_text(path)?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => yaml(path, &text),
        Some("py") => nanogpt(path, &text),
        _ => {
            let table = text.parse::<toml::Table>().map_err(|e| parse_err(path, e.to_string()))?;
            Ok(ConfigFile { table, deepspeed: None })
        }
    }
}

/// A DeepSpeed config file as DeepSpeed 0.19 loads it (`hjson.load`, duplicate keys refused).
pub fn deepspeed(path: &Path) -> Result<serde_json::Value, ConfigError> {
    parse_deepspeed(path, &read_text(path)?)
}

/// The text of a DeepSpeed config file, as `deepspeed`.
pub fn parse_deepspeed(path: &Path, text: &str) -> Result<serde_json::Value, ConfigError> {
    let Strict(v) = deser_hjson::from_str(text).map_err(|e| parse_err(path, hjson_message(e)))?;
    Ok(v)
}

/// The parser's error as a sentence with its line and column.
fn hjson_message(e: deser_hjson::Error) -> String {
    use deser_hjson::Error as E;
    match e {
        E::Syntax { line, col, code, at } => {
            format!("invalid JSON/Hjson at line {line} column {col}: {code:?} before {:?}", at.trim_end())
        }
        E::Serde { line, col, message } => format!("line {line} column {col}: {message}"),
        other => format!("invalid JSON/Hjson: {other}"),
    }
}

/// A serde_json::Value that refuses an object holding a key twice: DeepSpeed's loader refuses
/// such files, while serde_json's own map would keep the last value without a word.
struct Strict(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(out.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(out.into())
    }
}

// ---------------------------------------------------------------------------------------------
// YAML

fn yaml(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| parse_err(path, format!("invalid YAML: {e}")))?;
    let serde_yaml_ng::Value::Mapping(map) = doc else {
        return Err(parse_err(path, "expected a mapping of keys to values at the top level"));
    };
    let mut out = ConfigFile::default();
    for (k, v) in map {
        let key = match k {
            serde_yaml_ng::Value::String(s) => s,
            other => return Err(parse_err(path, format!("key {other:?} is not a string"))),
        };
        if key == "deepspeed" {
            // A nested block is the DeepSpeed config itself; a string names its file.
            out.deepspeed = Some(match v {
                serde_yaml_ng::Value::String(file) => {
                    let file = relative_to(path, &file);
                    (file.clone(), deepspeed(&file)?)
                }
                block => (
                    path.to_path_buf(),
                    serde_json::to_value(block).map_err(|e| parse_err(path, format!("deepspeed: {e}")))?,
                ),
            });
            continue;
        }
        let value = yaml_to_toml(&v).map_err(|msg| parse_err(path, format!("`{key}`: {msg}")))?;
        out.table.insert(key, value);
    }
    Ok(out)
}

fn yaml_to_toml(v: &serde_yaml_ng::Value) -> Result<toml::Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Bool(b) => toml::Value::Boolean(*b),
        Y::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().ok_or("a number out of range")?),
        },
        Y::String(s) => toml::Value::String(s.clone()),
        Y::Sequence(items) => toml::Value::Array(items.iter().map(yaml_to_toml).collect::<Result<_, _>>()?),
        Y::Mapping(m) => {
            let mut t = toml::Table::new();
            for (k, v) in m {
                let k = k.as_str().ok_or_else(|| format!("key {k:?} is not a string"))?;
                t.insert(k.to_string(), yaml_to_toml(v)?);
            }
            toml::Value::Table(t)
        }
        Y::Null => return Err("has no value (null)".into()),
        Y::Tagged(t) => return Err(format!("tagged value !{} is not supported", t.tag)),
    })
}

/// A path named inside a configuration file: as given when it exists from the working directory
/// (nanoGPT runs from its repository root), else next to the file that names it.
fn relative_to(config: &Path, named: &str) -> PathBuf {
    let p = PathBuf::from(named);
    if p.is_absolute() || p.exists() {
        return p;
    }
    config.parent().map(|d| d.join(&p)).filter(|q| q.exists()).unwrap_or(p)
}

// ---------------------------------------------------------------------------------------------
// nanoGPT config/*.py

/// nanoGPT keys that zerokit accepts and does not use, and why (logged once per run).
const NANOGPT_IGNORED: &[(&str, &str)] = &[
    ("wandb_log", "wandb is not used: metrics go to OUT_DIR/metrics.jsonl"),
    ("wandb_project", "wandb is not used"),
    ("wandb_run_name", "wandb is not used"),
    ("compile", "zerokit runs its own kernels; there is nothing to torch.compile"),
    ("backend", "zerokit uses NCCL on GPUs and its own CPU backend"),
];

/// nanoGPT's train.py reads `config/*.py` with `exec`: lines of `key = value`. zerokit reads the
/// same lines without executing anything: Python literals (strings, numbers, True/False) and
/// arithmetic on numbers (`5 * 8`), nanoGPT's names and values (dtype 'bfloat16', dataset
/// 'shakespeare' for data/shakespeare), and `deepspeed_config = 'ds_config.json'`.
fn nanogpt(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    let mut out = ConfigFile::default();
    for (n, raw) in text.lines().enumerate() {
        let at = |msg: String| parse_err(path, format!("line {}: {msg}", n + 1));
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=').filter(|(k, _)| is_identifier(k.trim())) else {
            return Err(at(format!(
                "{line:?} is not a `key = value` line (zerokit reads such lines; it does not run Python)"
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        let value = py_literal(value).map_err(|e| at(format!("`{key}` = {value}: {e}")))?;
        match (key, value) {
            ("deepspeed_config", toml::Value::String(file)) => {
                let file = relative_to(path, &file);
                out.deepspeed = Some((file.clone(), deepspeed(&file)?));
            }
            ("dtype", toml::Value::String(d)) => {
                let d = match d.as_str() {
                    "float32" => "fp32",
                    "bfloat16" => "bf16",
                    "float16" => "fp16",
                    other => other,
                };
                out.table.insert("dtype".into(), d.into());
            }
            ("dataset", toml::Value::String(d)) if !d.contains('/') => {
                // nanoGPT: data_dir = os.path.join('data', dataset)
                out.table.insert("dataset".into(), format!("data/{d}").into());
            }
            ("dropout", v) if v.as_float().or(v.as_integer().map(|i| i as f64)) != Some(0.0) => {
                return Err(at(format!("dropout = {v}: zerokit's GPT-2 trains without dropout; set dropout = 0.0")));
            }
            ("bias", v) if v.as_bool() != Some(true) => {
                return Err(at(format!("bias = {v}: zerokit's GPT-2 has biases, as GPT-2 does; set bias = True")));
            }
            ("eval_only", v) if v.as_bool() != Some(false) => {
                return Err(at(format!("eval_only = {v}: not supported; evaluate with `train` and eval_interval")));
            }
            ("dropout" | "bias" | "eval_only", _) => {}
            (k, _) if NANOGPT_IGNORED.iter().any(|(i, _)| *i == k) => {
                let why = NANOGPT_IGNORED.iter().find(|(i, _)| *i == k).map(|(_, w)| *w).unwrap_or_default();
                tracing::info!("{}: `{k}` ignored ({why})", path.display());
            }
            (k, v) => {
                out.table.insert(k.to_string(), v);
            }
        }
    }
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// The line without a `#` comment (a `#` inside a string stays).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(_), '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (Some(q), c) if c == q && !escaped => quote = None,
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

/// A Python literal: a string, True/False, or numbers joined by + - * / // with parentheses.
fn py_literal(s: &str) -> Result<toml::Value, String> {
    match s {
        "True" => return Ok(toml::Value::Boolean(true)),
        "False" => return Ok(toml::Value::Boolean(false)),
        "None" => return Err("None has no zerokit equivalent; leave the key out".into()),
        _ => {}
    }
    if let Some(q) = s.chars().next().filter(|c| *c == '\'' || *c == '"') {
        return py_string(s, q).map(toml::Value::String);
    }
    let mut p = Arith { s: s.as_bytes(), i: 0 };
    let v = p.expr()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err("not a Python literal zerokit can read (a string, a number, True or False)".into());
    }
    Ok(match v {
        Num::Int(i) => toml::Value::Integer(i),
        Num::Float(f) => toml::Value::Float(f),
    })
}

fn py_string(s: &str, q: char) -> Result<String, String> {
    let inner = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)).ok_or("an unterminated string")?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == q {
            return Err("a string with an unescaped quote inside".into());
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(e @ ('\\' | '\'' | '"')) => out.push(e),
            Some(e) => {
                out.push('\\');
                out.push(e);
            }
            None => return Err("a string ending in a backslash".into()),
        }
    }
    Ok(out)
}

#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

/// Python's arithmetic on int and float literals: precedence, ints that stay ints under + - * //,
/// true division giving a float.
struct Arith<'a> {
    s: &'a [u8],
    i: usize,
}

impl Arith<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        if self.s[self.i..].starts_with(tok.as_bytes()) {
            self.i += tok.len();
            true
        } else {
            false
        }
    }
    fn expr(&mut self) -> Result<Num, String> {
        let mut v = self.term()?;
        loop {
            let add = if self.eat("+") {
                true
            } else if self.eat("-") {
                false
            } else {
                return Ok(v);
            };
            let r = self.term()?;
            v = match (v, r) {
                (Num::Int(a), Num::Int(b)) => {
                    Num::Int(if add { a.checked_add(b) } else { a.checked_sub(b) }.ok_or("overflow")?)
                }
                (a, b) => Num::Float(if add { a.f() + b.f() } else { a.f() - b.f() }),
            };
        }
    }
    fn term(&mut self) -> Result<Num, String> {
        let mut v = self.factor()?;
        loop {
            let op = if self.eat("//") {
                "//"
            } else if self.eat("*") {
                "*"
            } else if self.eat("/") {
                "/"
            } else {
                return Ok(v);
            };
            let r = self.factor()?;
            if op != "*" && r.f() == 0.0 {
                return Err("division by zero".into());
            }
            v = match (op, v, r) {
                ("*", Num::Int(a), Num::Int(b)) => Num::Int(a.checked_mul(b).ok_or("overflow")?),
                ("*", a, b) => Num::Float(a.f() * b.f()),
                ("//", Num::Int(a), Num::Int(b)) => {
                    Num::Int(a.div_euclid(b) - i64::from(b < 0 && a.rem_euclid(b) != 0))
                }
                ("//", a, b) => Num::Float((a.f() / b.f()).floor()),
                (_, a, b) => Num::Float(a.f() / b.f()),
            };
        }
    }
    fn factor(&mut self) -> Result<Num, String> {
        if self.eat("-") {
            return Ok(match self.factor()? {
                Num::Int(i) => Num::Int(-i),
                Num::Float(f) => Num::Float(-f),
            });
        }
        if self.eat("+") {
            return self.factor();
        }
        if self.eat("(") {
            let v = self.expr()?;
            return if self.eat(")") { Ok(v) } else { Err("a `(` without its `)`".into()) };
        }
        self.skip_ws();
        let start = self.i;
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'_') {
            // An exponent's sign belongs to the number (6e-4).
            self.i += 1;
            if matches!(self.s.get(self.i - 1), Some(b'e' | b'E')) && matches!(self.s.get(self.i), Some(b'-' | b'+')) {
                self.i += 1;
            }
        }
        let tok = std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default().replace('_', "");
        if tok.is_empty() {
            return Err("not a Python literal zerokit can read (a string, a number, True or False)".into());
        }
        if let Ok(i) = tok.parse::<i64>() {
            return Ok(Num::Int(i));
        }
        match tok.parse::<f64>() {
            Ok(f) if f.is_finite() && !tok.chars().any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') => {
                Ok(Num::Float(f))
            }
            _ => Err(format!("{tok:?} is not a number (zerokit reads literals; it does not run Python)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_read_as_python_does() {
        let cases: &[(&str, toml::Value)] = &[
            ("5 * 8", 40.into()),
            ("6e-4", 6e-4.into()),
            ("1e-1", 0.1.into()),
            ("600_000", 600000.into()),
            ("'bfloat16'", "bfloat16".into()),
            ("\"a'b\"", "a'b".into()),
            ("True", true.into()),
            ("-3 // 2", (-2).into()),
            ("7 / 2", 3.5.into()),
            ("(1 + 2) * 3", 9.into()),
            ("2 - -1", 3.into()),
        ];
        for (text, want) in cases {
            assert_eq!(py_literal(text).as_ref(), Ok(want), "{text}");
        }
        for bad in ["os.environ['X']", "[1, 2]", "'open", "1 / 0", "None", "inf", "1 +"] {
            assert!(py_literal(bad).is_err(), "{bad}");
        }
        assert_eq!(strip_comment("x = 'a#b' # note"), "x = 'a#b' ");
    }
}
