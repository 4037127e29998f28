//! The pickle inside a `torch.save` file, parsed into plain data ([`Value`]); it is never
//! executed. Classes it names (torch, DeepSpeed, argparse, enums) become inert
//! [`Value::Object`]s, except the handful whose meaning we need (tensors, parameters, ordered
//! dicts, `torch.Size`, bytes). Tensors become [`TensorRef`]s: views of storage entries that
//! [`torch_zip`](super::torch_zip) locates in the archive. The parser is hardened against hostile
//! input: bounded nesting, a work budget against shared-reference blow-up, capped quotes.

use crate::formats::dtype::DType;
use std::collections::HashMap;

/// A tensor as the pickle describes it: a strided view of a storage entry in the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage_key: String,
    pub dtype: DType,
    /// Elements in the storage (bytes for an untyped storage).
    pub storage_numel: u64,
    /// In elements.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

impl TensorRef {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1u64;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect *= d;
        }
        true
    }
}

/// Plain data decoded from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A class or function named by the pickle (never imported or called).
    Global {
        module: String,
        name: String,
    },
    /// An instance of a class we do not interpret: what built it, and the state it was given.
    Object {
        module: String,
        name: String,
        args: Vec<Value>,
        state: Option<Box<Value>>,
        items: Vec<(Value, Value)>,
    },
    Storage {
        key: String,
        dtype: DType,
        numel: u64,
    },
    Tensor(TensorRef),
    /// Internal: a mutable container during parsing; never present in a finished value.
    Ref(usize),
}

impl Value {
    /// Looks up a string key in a dict (or a dict-like object's items).
    pub fn get(&self, key: &str) -> Option<&Value> {
        let items = match self {
            Value::Dict(items) => items,
            Value::Object { items, .. } => items,
            _ => return None,
        };
        items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v)
    }

    pub fn dict_items(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) => Some(items),
            Value::Object { items, .. } if !items.is_empty() => Some(items),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }

    /// An integer, also through the wrappers that carry one: an `enum.IntEnum` member such as
    /// DeepSpeed's `ZeroStageEnum.gradients` is pickled as a call `ZeroStageEnum(2)`.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            Value::Object { args, .. } if args.len() == 1 => args[0].as_int(),
            _ => None,
        }
    }

    /// A number, integer or float (through [`as_int`](Self::as_int)'s wrappers).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            _ => self.as_int().map(|i| i as f64),
        }
    }

    /// A key of a dict, or an attribute of a pickled object (kept in the state it was built
    /// with, e.g. DeepSpeed's `DynamicLossScaler.cur_scale`).
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.get(key).or_else(|| match self {
            Value::Object { state: Some(s), .. } => s.get(key),
            _ => None,
        })
    }

    /// A shape: `torch.Size` (decoded as a tuple), a list or tuple of ints.
    pub fn as_shape(&self) -> Option<Vec<u64>> {
        self.as_seq()?.iter().map(|d| d.as_int().and_then(|i| u64::try_from(i).ok())).collect()
    }
}

/// A pickle virtual machine that only builds data. Containers live in an arena and are
/// referenced from the stack and memo, because pickles fill a container after memoizing it; so
/// does anything memoized or duplicated, so that sharing a value costs nothing until the result
/// is built. Building it ([`resolve`](Self::resolve)) copies every shared value where it is used:
/// a pickle a few bytes long can share its way to an exponential size, so that copying is
/// bounded by a budget proportional to the pickle's length, and nesting by [`MAX_DEPTH`].
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    arena: Vec<Value>,
    /// Values built by `resolve` so far, and the most it may build.
    work: std::cell::Cell<usize>,
    budget: usize,
}

type PResult<T> = Result<T, (usize, String)>;

const MAX_DEPTH: usize = 512;

/// The values a pickle may expand to: a fixed allowance plus this many per byte. Real torch
/// pickles share little (tensors named twice, repeated strings): every DeepSpeed fixture builds
/// fewer values than it has bytes.
const BUDGET_BASE: usize = 1 << 20;
const BUDGET_PER_BYTE: usize = 32;

/// At most this much of a value is quoted in an error message.
const QUOTE: usize = 160;

/// A value's `Debug` form, cut at [`QUOTE`] bytes: the value may be large or deeply nested.
fn quote(v: &Value) -> String {
    struct Capped(String);
    impl std::fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            if self.0.len() + s.len() > QUOTE {
                let room = QUOTE - self.0.len();
                let cut = (0..=room).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                self.0.push_str(&s[..cut]);
                return Err(std::fmt::Error);
            }
            self.0.push_str(s);
            Ok(())
        }
    }
    let mut out = Capped(String::new());
    if std::fmt::write(&mut out, format_args!("{v:?}")).is_err() {
        out.0.push_str("...");
    }
    out.0
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: vec![],
            marks: vec![],
            memo: HashMap::new(),
            arena: vec![],
            work: std::cell::Cell::new(0),
            budget: BUDGET_BASE.saturating_add(BUDGET_PER_BYTE.saturating_mul(data.len())),
        }
    }

    fn err<T>(&self, what: impl Into<String>) -> PResult<T> {
        Err((self.pos, what.into()))
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        match self.data.get(self.pos..self.pos.saturating_add(n)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => self.err("unexpected end of data (truncated)"),
        }
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or((self.pos, "unterminated line".to_string()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&self, b: &[u8]) -> PResult<String> {
        String::from_utf8(b.to_vec()).map_err(|_| (self.pos, "invalid UTF-8 in string".to_string()))
    }

    fn pop(&mut self) -> PResult<Value> {
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    /// The top of the stack, moved into the arena if it is not there yet, so that it can be
    /// shared (memoized, duplicated) by reference.
    fn top_shared(&mut self) -> PResult<Value> {
        let pos = self.pos;
        let top = self.stack.last_mut().ok_or((pos, "stack underflow".to_string()))?;
        if !matches!(top, Value::Ref(_)) {
            let v = std::mem::replace(top, Value::Ref(self.arena.len()));
            self.arena.push(v);
        }
        Ok(self.stack.last().expect("checked above").clone())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = match self.marks.pop() {
            Some(m) => m,
            None => return self.err("no MARK on the stack"),
        };
        if m > self.stack.len() {
            return self.err("MARK above the stack");
        }
        Ok(self.stack.split_off(m))
    }

    fn alloc(&mut self, v: Value) -> Value {
        self.arena.push(v);
        Value::Ref(self.arena.len() - 1)
    }

    fn top_mut(&mut self) -> PResult<&mut Value> {
        let pos = self.pos;
        match self.stack.last() {
            Some(&Value::Ref(i)) => Ok(&mut self.arena[i]),
            Some(_) => Err((pos, "expected a container on the stack".to_string())),
            None => Err((pos, "stack underflow".to_string())),
        }
    }

    fn run(mut self) -> PResult<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.err(format!("unknown pickle protocol {proto}"));
                    }
                }
                b'.' => {
                    let v = self.pop()?;
                    return self.resolve(v, 0);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return self.err(format!("integer of {n} bytes is too large"));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xFFu8; 8] } else { [0u8; 8] };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b'I' => {
                    // Text protocol integers; "00"/"01" are False/True.
                    let l = self.line()?;
                    let v = match l.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.parse().map_err(|_| (self.pos, format!("bad INT {s:?}")))?),
                    };
                    self.stack.push(v);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.stack.push(Value::Str(s));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Str(String::from_utf8_lossy(b).into_owned()));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Str(String::from_utf8_lossy(b).into_owned()));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b']' => {
                    let v = self.alloc(Value::List(vec![]));
                    self.stack.push(v);
                }
                b'}' => {
                    let v = self.alloc(Value::Dict(vec![]));
                    self.stack.push(v);
                }
                // Tuples go to the arena too: nested directly, a few bytes per level could nest them
                // deeper than the stack can drop.
                b')' => {
                    let v = self.alloc(Value::Tuple(vec![]));
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Value::Tuple(items));
                    self.stack.push(v);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return self.err("stack underflow in TUPLE");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.alloc(Value::Tuple(items));
                    self.stack.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Value::List(items));
                    self.stack.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let v = self.alloc(Value::Dict(pairs));
                    self.stack.push(v);
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.set_items(pairs)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop_resolved()?;
                    let module = self.pop_resolved()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => self.stack.push(Value::Global { module, name }),
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let pos = self.pos;
                    if let Some(&Value::Ref(i)) = self.stack.last() {
                        if let Value::Object { state: s, .. } = &mut self.arena[i] {
                            *s = Some(Box::new(state));
                        }
                    } else if self.stack.is_empty() {
                        return Err((pos, "BUILD on an empty stack".into()));
                    }
                    // BUILD on anything else (a tensor's hooks, say) carries nothing we need.
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top_shared()?;
                    self.stack.push(v);
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.take(8)?;
                }
                _ => return self.err(format!("unknown opcode 0x{op:02x}")),
            }
        }
    }

    fn pairs(&self, items: Vec<Value>) -> PResult<Vec<(Value, Value)>> {
        if items.len() % 2 != 0 {
            return self.err("odd number of items for a dict");
        }
        let mut it = items.into_iter();
        let mut out = vec![];
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn append(&mut self, items: Vec<Value>) -> PResult<()> {
        let pos = self.pos;
        match self.top_mut()? {
            Value::List(v) => v.extend(items),
            // A list subclass or set-like object: keep the items with the object.
            Value::Object { args, .. } => args.extend(items),
            _ => return Err((pos, "APPEND to a non-list".into())),
        }
        Ok(())
    }

    fn set_items(&mut self, pairs: Vec<(Value, Value)>) -> PResult<()> {
        let pos = self.pos;
        match self.top_mut()? {
            Value::Dict(d) => d.extend(pairs),
            Value::Object { items, .. } => items.extend(pairs),
            _ => return Err((pos, "SETITEM on a non-dict".into())),
        }
        Ok(())
    }

    fn memo_put(&mut self, i: u32) -> PResult<()> {
        let v = self.top_shared()?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> PResult<()> {
        match self.memo.get(&i) {
            Some(v) => {
                let v = v.clone();
                self.stack.push(v);
                Ok(())
            }
            None => self.err(format!("memo entry {i} read before it was written")),
        }
    }

    /// The `('storage', <storage class>, key, location, numel)` persistent ids torch writes.
    fn persistent(&mut self, pid: Value) -> PResult<Value> {
        let pid = self.resolve(pid, 0)?;
        let items = match &pid {
            Value::Tuple(items) if items.len() >= 5 => items,
            _ => return self.err(format!("unexpected persistent id {}", quote(&pid))),
        };
        if items[0].as_str() != Some("storage") {
            return self.err(format!("unexpected persistent id kind {}", quote(&items[0])));
        }
        let dtype = match &items[1] {
            Value::Global { name, .. } => DType::from_storage_class(name),
            // torch >= 2.1 may name a dtype object instead of a typed storage class.
            Value::Object { name, .. } => DType::from_storage_class(name),
            _ => None,
        };
        let dtype = match dtype {
            Some(d) => d,
            None => return self.err(format!("unsupported storage type {}", quote(&items[1]))),
        };
        let key = match &items[2] {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            other => return self.err(format!("bad storage key {}", quote(other))),
        };
        let numel = match items[4].as_int() {
            Some(n) if n >= 0 => n as u64,
            _ => return self.err("bad storage size"),
        };
        Ok(Value::Storage { key, dtype, numel })
    }

    fn reduce(&mut self, callable: Value, args: Value) -> PResult<Value> {
        let (module, name) = match self.resolve(callable, 0)? {
            Value::Global { module, name } => (module, name),
            other => return self.err(format!("call of a non-global {}", quote(&other))),
        };
        let args = self.resolve(args, 0)?;
        let args = match args {
            Value::Tuple(a) => a,
            other => return self.err(format!("call arguments are not a tuple: {}", quote(&other))),
        };
        Ok(match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_tensor_v3") => {
                self.rebuild_tensor(&args)?
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => t,
                _ => return self.err("_rebuild_parameter without a tensor"),
            },
            // Tensors and parameters saved with extra Python state (DeepSpeed's ds_id, ...):
            // (rebuild function, type, its arguments, state); only the tensor matters.
            ("torch._tensor", "_rebuild_from_type_v2") => {
                let mut it = args.into_iter();
                match (it.next(), it.next(), it.next()) {
                    (Some(func @ Value::Global { .. }), Some(_), Some(inner @ Value::Tuple(_))) => {
                        self.reduce(func, inner)?
                    }
                    _ => return self.err("malformed _rebuild_from_type_v2 arguments"),
                }
            }
            ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                let mut pairs = vec![];
                if let Some(Value::List(kvs)) = args.first() {
                    for kv in kvs {
                        if let Value::Tuple(p) = kv {
                            if p.len() == 2 {
                                pairs.push((p[0].clone(), p[1].clone()));
                            }
                        }
                    }
                }
                self.alloc(Value::Dict(pairs))
            }
            ("torch", "Size") => match args.into_iter().next() {
                Some(Value::Tuple(d)) | Some(Value::List(d)) => Value::Tuple(d),
                _ => Value::Tuple(vec![]),
            },
            // Protocol 2 spells bytes as _codecs.encode(latin-1 text, 'latin1').
            ("_codecs", "encode") => match args.first() {
                Some(Value::Str(s)) => Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()),
                _ => Value::Bytes(vec![]),
            },
            _ => self.alloc(Value::Object { module, name, args, state: None, items: vec![] }),
        })
    }

    fn rebuild_tensor(&self, args: &[Value]) -> PResult<Value> {
        let (key, dtype, storage_numel) = match args.first() {
            Some(Value::Storage { key, dtype, numel }) => (key.clone(), *dtype, *numel),
            _ => return self.err("_rebuild_tensor without a storage"),
        };
        let offset = args.get(1).and_then(Value::as_int).filter(|&o| o >= 0);
        let shape = args.get(2).and_then(Value::as_shape);
        let stride = args.get(3).and_then(Value::as_shape);
        // Element counts (and the partial products a contiguity check forms) must fit in 64 bits.
        let countable = |s: &[u64]| s.iter().try_fold(1u64, |a, &d| a.checked_mul(d.max(1))).is_some();
        match (offset, shape, stride) {
            (Some(_), Some(shape), Some(_)) if !countable(&shape) => {
                self.err(format!("tensor shape {shape:?} has more elements than 64 bits count"))
            }
            (Some(offset), Some(shape), Some(stride)) if shape.len() == stride.len() => Ok(Value::Tensor(TensorRef {
                storage_key: key,
                dtype,
                storage_numel,
                offset: offset as u64,
                shape,
                stride,
            })),
            _ => self.err("malformed _rebuild_tensor arguments"),
        }
    }

    fn pop_resolved(&mut self) -> PResult<Value> {
        let v = self.pop()?;
        self.resolve(v, 0)
    }

    /// Replaces arena references by their (finished) contents, within the budget.
    fn resolve(&self, v: Value, depth: usize) -> PResult<Value> {
        if depth > MAX_DEPTH {
            return self.err("nesting too deep (cyclic pickle?)");
        }
        let size = match &v {
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 0,
        };
        let work = self.work.get().saturating_add(1 + size / 32);
        if work > self.budget {
            return self.err(format!(
                "the pickle expands to more than {} values (a value shared too many times?)",
                self.budget
            ));
        }
        self.work.set(work);
        let d = depth + 1;
        Ok(match v {
            Value::Ref(i) => self.resolve(self.arena[i].clone(), d)?,
            Value::List(v) => Value::List(v.into_iter().map(|x| self.resolve(x, d)).collect::<PResult<_>>()?),
            Value::Tuple(v) => Value::Tuple(v.into_iter().map(|x| self.resolve(x, d)).collect::<PResult<_>>()?),
            Value::Dict(v) => Value::Dict(
                v.into_iter().map(|(k, x)| Ok((self.resolve(k, d)?, self.resolve(x, d)?))).collect::<PResult<_>>()?,
            ),
            Value::Object { module, name, args, state, items } => Value::Object {
                module,
                name,
                args: args.into_iter().map(|x| self.resolve(x, d)).collect::<PResult<_>>()?,
                state: match state {
                    Some(s) => Some(Box::new(self.resolve(*s, d)?)),
                    None => None,
                },
                items: items
                    .into_iter()
                    .map(|(k, x)| Ok((self.resolve(k, d)?, self.resolve(x, d)?)))
                    .collect::<PResult<_>>()?,
            },
            other => other,
        })
    }
}

/// Parses a bare pickle (tests and tools).
pub fn parse_pickle(data: &[u8]) -> Result<Value, (usize, String)> {
    Unpickler::new(data).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memoized_dict_filled_later_is_seen_through_memo() {
        // {'a': [1, 2], 'b': <same list>} built as: EMPTY_DICT PUT0 MARK 'a' EMPTY_LIST PUT1
        // MARK 1 2 APPENDS 'b' GET1 SETITEMS STOP
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01K\x02eX\x01\x00\x00\x00bh\x01u.";
        let v = parse_pickle(p).unwrap();
        let l = Value::List(vec![Value::Int(1), Value::Int(2)]);
        assert_eq!(v.get("a"), Some(&l));
        assert_eq!(v.get("b"), Some(&l));
    }

    #[test]
    fn enum_members_read_as_ints_and_long1_signs() {
        // ZeroStageEnum(2) and LONG1 -1
        let p = b"\x80\x02cdeepspeed.runtime.zero.config\nZeroStageEnum\nK\x02\x85R\x8a\x01\xff\x86.";
        let v = parse_pickle(p).unwrap();
        let t = v.as_seq().unwrap();
        assert_eq!(t[0].as_int(), Some(2));
        assert_eq!(t[1], Value::Int(-1));
    }

    #[test]
    fn truncation_and_garbage_are_errors_not_panics() {
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01K\x02eX\x01\x00\x00\x00bh\x01u.";
        for n in 0..p.len() {
            assert!(parse_pickle(&p[..n]).is_err(), "prefix of {n} bytes parsed");
        }
        assert!(parse_pickle(b"\x80\x02h\x07.").is_err());
        assert!(parse_pickle(b"\x80\x02\xff").is_err());
        assert!(parse_pickle(b"\x80\x09N.").is_err());
    }

    /// List k holds list k-1 twice, by memo reference: 7 bytes a level, 2^k values built.
    #[test]
    fn shared_references_cannot_expand_without_bound() {
        let mut p = b"\x80\x02]q\x00".to_vec();
        for k in 1..64u8 {
            p.extend_from_slice(&[b'(', b'h', k - 1, b'h', k - 1, b'l', b'q', k]);
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        let (_, what) = parse_pickle(&p).unwrap_err();
        assert!(what.contains("expands to more than"), "{what}");
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
        // The same with DUP instead of the memo.
        let mut p = b"\x80\x02]".to_vec();
        for _ in 0..64 {
            p.extend_from_slice(b"2\x86");
        }
        p.push(b'.');
        assert!(parse_pickle(&p).unwrap_err().1.contains("expands to more than"));
    }

    /// A million tuples nested one byte a level: an error, not a stack overflow on the way (the
    /// nesting is never built directly) or when dropped.
    #[test]
    fn deep_nesting_is_an_error() {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let (_, what) = parse_pickle(&p).unwrap_err();
        assert!(what.contains("nesting too deep"), "{what}");
        // As the callable or the arguments of a call, which error messages quote.
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.extend_from_slice(b")R.");
        assert!(parse_pickle(&p).is_err());
    }

    /// BUILD and memoizing on a large value built by a call (torch.Size of a long list) cost
    /// nothing per operation: they used to copy the whole value each time.
    #[test]
    fn operations_on_a_large_value_do_not_copy_it() {
        let mut p = b"\x80\x02ctorch\nSize\n](".to_vec();
        for _ in 0..100_000 {
            p.extend_from_slice(b"K\x01");
        }
        p.extend_from_slice(b"e\x85R");
        for _ in 0..100_000 {
            p.extend_from_slice(b"Nb");
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        let v = parse_pickle(&p).unwrap();
        assert_eq!(v.as_shape().map(|s| s.len()), Some(100_000));
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }

    #[test]
    fn tensor_shapes_must_be_countable() {
        // _rebuild_tensor_v2(storage, 0, (2^40, 2^40), (1, 1), False, OrderedDict())
        let mut p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00".to_vec();
        p.extend_from_slice(b"\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x06\x00\x00\x00\x00\x00\x01\x86K\x01K\x01\x86\x89ccollections\nOrderedDict\n)RtR.");
        let (_, what) = parse_pickle(&p).unwrap_err();
        assert!(what.contains("more elements than 64 bits count"), "{what}");
    }
}
