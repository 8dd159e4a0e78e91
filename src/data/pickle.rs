//! A minimal, safe reader for the pickles of CIFAR-10's python version.
//!
//! Python's pickle format is a small stack machine (see CPython's `Lib/pickletools.py`).
//! This reader implements only the opcodes that CIFAR-10 batches use — those written by
//! Python 2's `cPickle` (protocol 2, byte strings as `BINSTRING`) and by Python 3 with
//! protocols 2 to 5 — and never imports or calls anything: `GLOBAL` names are checked
//! against a fixed list (numpy's array and dtype reconstructors, `_codecs.encode` for
//! bytes in protocol 2) and `REDUCE`/`BUILD` interpret those few constructors directly.
//! Containers may not nest beyond what such files need, so no cycle or deep recursion can
//! be built. Byte strings decode as bytes, like `pickle.load(f, encoding="bytes")`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Deepest tuple nesting accepted (CIFAR pickles need 3).
const MAX_TUPLE_DEPTH: u32 = 16;

/// A decoded pickle value.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A float (its value is never needed).
    Float,
    Bytes(Rc<Vec<u8>>),
    Str(Rc<str>),
    /// Items and nesting depth.
    Tuple(Rc<[Value]>, u32),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Dtype(Rc<str>),
    Array(Rc<RefCell<Array>>),
}

/// The callables the reader knows, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Global {
    /// `numpy.core.multiarray._reconstruct` (numpy 1) / `numpy._core.multiarray._reconstruct`.
    Reconstruct,
    /// `numpy.ndarray`.
    Ndarray,
    /// `numpy.dtype`.
    Dtype,
    /// `numpy._core.numeric._frombuffer` (numpy ≥ 1.20 with pickle protocol 5).
    FromBuffer,
    /// `_codecs.encode`: how Python 3 writes `bytes` in protocol 2.
    CodecsEncode,
    /// `bytes` itself (`__builtin__.bytes`): an empty `bytes` in protocol 2.
    Bytes,
}

/// A numpy array under construction (`_reconstruct` then `BUILD`) or complete.
#[derive(Debug)]
pub(crate) struct Array {
    shape: Vec<usize>,
    data: Option<Rc<Vec<u8>>>,
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Bytes(_) => "bytes",
            Value::Str(_) => "str",
            Value::Tuple(..) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Dtype(_) => "numpy dtype",
            Value::Array(_) => "numpy array",
        }
    }

    fn text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_owned),
            _ => None,
        }
    }

    fn as_index(&self) -> Result<usize, String> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!(
                "expected a non-negative int, found {}",
                other.kind()
            )),
        }
    }

    fn tuple_depth(&self) -> u32 {
        match self {
            Value::Tuple(_, d) => *d,
            _ => 0,
        }
    }

    /// The entry of a dict whose key is the text `key` (as `str` or `bytes`).
    pub(crate) fn dict_get(&self, key: &str) -> Result<Option<Value>, String> {
        let Value::Dict(items) = self else {
            return Err(format!("expected a dict at the top, found {}", self.kind()));
        };
        Ok(items
            .borrow()
            .iter()
            .find(|(k, _)| k.text().as_deref() == Some(key))
            .map(|(_, v)| v.clone()))
    }

    /// Shape and bytes of a complete `uint8` numpy array.
    pub(crate) fn as_u8_array(&self) -> Result<(Vec<usize>, Rc<Vec<u8>>), String> {
        let Value::Array(a) = self else {
            return Err(format!("expected a numpy array, found {}", self.kind()));
        };
        let a = a.borrow();
        let data = a
            .data
            .clone()
            .ok_or("numpy array was never given its content (no BUILD)")?;
        Ok((a.shape.clone(), data))
    }

    /// The ints of a list (or tuple) of ints.
    pub(crate) fn as_int_list(&self) -> Result<Vec<i64>, String> {
        let items: Vec<Value> = match self {
            Value::List(l) => l.borrow().clone(),
            Value::Tuple(t, _) => t.to_vec(),
            other => return Err(format!("expected a list of ints, found {}", other.kind())),
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Int(x) => Ok(*x),
                Value::Bool(b) => Ok(i64::from(*b)),
                other => Err(format!("item {i} is a {}, not an int", other.kind())),
            })
            .collect()
    }

    /// The texts of a list of `str` or UTF-8 `bytes`.
    pub(crate) fn as_text_list(&self) -> Result<Vec<String>, String> {
        let Value::List(l) = self else {
            return Err(format!("expected a list of names, found {}", self.kind()));
        };
        l.borrow()
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.text()
                    .ok_or_else(|| format!("item {i} is a {}, not a name", v.kind()))
            })
            .collect()
    }
}

/// Maps a `module name` pair to a known callable, or errors naming it.
fn resolve_global(module: &str, name: &str) -> Result<Global, String> {
    Ok(match (module, name) {
        ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => Global::Reconstruct,
        ("numpy", "ndarray") => Global::Ndarray,
        ("numpy", "dtype") => Global::Dtype,
        ("numpy.core.numeric" | "numpy._core.numeric", "_frombuffer") => Global::FromBuffer,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("__builtin__" | "builtins", "bytes") => Global::Bytes,
        _ => {
            return Err(format!(
                "refers to `{module}.{name}`, which a CIFAR-10 batch never contains \
                 (only numpy arrays, lists and dicts are accepted)"
            ));
        }
    })
}

/// Reads the input byte by byte, with errors for running off the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated: needs {n} more bytes at byte {} but only {left} remain",
                self.pos
            ));
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u64, String> {
        Ok(u64::from(u16::from_le_bytes(self.le()?)))
    }

    fn u32(&mut self) -> Result<u64, String> {
        Ok(u64::from(u32::from_le_bytes(self.le()?)))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.le()?))
    }

    /// A newline-terminated ASCII line (text opcodes), without the newline.
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated: unterminated line at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| format!("non-text line at byte {}", self.pos))?;
        self.pos += end + 1;
        Ok(s)
    }
}

/// The unpickling machine's state.
struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

impl Machine {
    fn pop(&mut self) -> Result<Value, String> {
        // A mark above the top means the stack is empty at this level.
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (pop past a MARK)".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (no object above the MARK)".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(m))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let v = self
            .stack
            .last()
            .ok_or("memoize with an empty stack")?
            .clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("memo key {key} used before it was set"))?;
        self.push(v);
        Ok(())
    }
}

fn tuple(items: Vec<Value>) -> Result<Value, String> {
    let mut depth = 0;
    for v in &items {
        if matches!(v, Value::List(_) | Value::Dict(_)) {
            return Err("a tuple holds a list or dict, which CIFAR-10 batches never do".into());
        }
        depth = depth.max(v.tuple_depth());
    }
    if depth + 1 > MAX_TUPLE_DEPTH {
        return Err("tuples nested too deeply".into());
    }
    Ok(Value::Tuple(items.into(), depth + 1))
}

fn list_append(list: &Value, items: Vec<Value>) -> Result<(), String> {
    let Value::List(l) = list else {
        return Err(format!("APPEND to a {}, not a list", list.kind()));
    };
    if items
        .iter()
        .any(|v| matches!(v, Value::List(_) | Value::Dict(_)))
    {
        return Err("a list holds a list or dict, which CIFAR-10 batches never do".into());
    }
    l.borrow_mut().extend(items);
    Ok(())
}

fn dict_set(dict: &Value, items: Vec<Value>) -> Result<(), String> {
    let Value::Dict(d) = dict else {
        return Err(format!("SETITEM on a {}, not a dict", dict.kind()));
    };
    if !items.len().is_multiple_of(2) {
        return Err("SETITEMS with an odd number of items".into());
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if matches!(v, Value::Dict(_)) || !matches!(k, Value::Bytes(_) | Value::Str(_)) {
            return Err(format!(
                "dict entry {} → {} is not what a CIFAR-10 batch holds",
                k.kind(),
                v.kind()
            ));
        }
        d.push((k, v));
    }
    Ok(())
}

/// Interprets `callable(*args)` for the known callables.
fn reduce(callable: &Value, args: &Value) -> Result<Value, String> {
    let Value::Global(g) = callable else {
        return Err(format!(
            "REDUCE calls a {}, not a known global",
            callable.kind()
        ));
    };
    let Value::Tuple(args, _) = args else {
        return Err(format!(
            "REDUCE arguments are a {}, not a tuple",
            args.kind()
        ));
    };
    match (g, &args[..]) {
        (Global::Reconstruct, [Value::Global(Global::Ndarray), _shape, _typecode]) => {
            Ok(Value::Array(Rc::new(RefCell::new(Array {
                shape: Vec::new(),
                data: None,
            }))))
        }
        (Global::Dtype, [descr, ..]) => {
            let d = descr.text().ok_or("numpy dtype without a type code")?;
            Ok(Value::Dtype(d.into()))
        }
        (Global::CodecsEncode, [Value::Str(s), enc]) => {
            let enc = enc.text().unwrap_or_default();
            if enc != "latin1" && enc != "latin-1" {
                return Err(format!(
                    "_codecs.encode with encoding `{enc}`, expected latin1"
                ));
            }
            let bytes = s
                .chars()
                .map(|c| u8::try_from(u32::from(c)).map_err(|_| "non-latin1 character"))
                .collect::<Result<Vec<u8>, _>>()?;
            Ok(Value::Bytes(Rc::new(bytes)))
        }
        (Global::Bytes, []) => Ok(Value::Bytes(Rc::new(Vec::new()))),
        (Global::FromBuffer, [buf, dtype, shape, order]) => {
            let Value::Bytes(data) = buf else {
                return Err(format!("_frombuffer of a {}, not a buffer", buf.kind()));
            };
            let shape = shape_of(shape)?;
            if order.text().as_deref() != Some("C") && shape.iter().filter(|&&d| d > 1).count() > 1
            {
                return Err("numpy array in Fortran order; expected C order".into());
            }
            Ok(Value::Array(Rc::new(RefCell::new(complete_array(
                shape,
                dtype,
                data.clone(),
            )?))))
        }
        (g, a) => Err(format!("unexpected call {g:?} with {} arguments", a.len())),
    }
}

fn shape_of(v: &Value) -> Result<Vec<usize>, String> {
    match v {
        Value::Tuple(t, _) => t.iter().map(Value::as_index).collect(),
        other => Err(format!("array shape is a {}, not a tuple", other.kind())),
    }
}

/// Checks that `data` is a `uint8` array of `shape`.
fn complete_array(shape: Vec<usize>, dtype: &Value, data: Rc<Vec<u8>>) -> Result<Array, String> {
    let Value::Dtype(descr) = dtype else {
        return Err(format!(
            "array dtype is a {}, not a numpy dtype",
            dtype.kind()
        ));
    };
    if !matches!(&**descr, "u1" | "|u1" | "uint8" | "B") {
        return Err(format!("array dtype is `{descr}`, expected uint8 (`u1`)"));
    }
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("array shape overflows")?;
    if n != data.len() {
        return Err(format!(
            "array of shape {shape:?} ({n} elements) holds {} bytes: truncated or corrupt",
            data.len()
        ));
    }
    Ok(Array {
        shape,
        data: Some(data),
    })
}

/// Applies a `BUILD` state to `obj` (numpy's `__setstate__` for arrays and dtypes).
fn build(obj: &Value, state: &Value) -> Result<(), String> {
    match obj {
        // A dtype's state (byte order, field names, …) does not matter for uint8.
        Value::Dtype(_) => Ok(()),
        Value::Array(a) => {
            let Value::Tuple(st, _) = state else {
                return Err(format!("array state is a {}, not a tuple", state.kind()));
            };
            // (version, shape, dtype, is_fortran, data), or the same without version.
            let st = match &st[..] {
                [_version, rest @ ..] if st.len() == 5 => rest,
                rest => rest,
            };
            let [shape, dtype, fortran, data] = st else {
                return Err(format!(
                    "array state has {} items, expected 4 or 5",
                    st.len()
                ));
            };
            let shape = shape_of(shape)?;
            let fortran = matches!(fortran, Value::Bool(true) | Value::Int(1));
            if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
                return Err("numpy array in Fortran order; expected C order".into());
            }
            let Value::Bytes(data) = data else {
                return Err(format!("array content is a {}, not bytes", data.kind()));
            };
            let mut a = a.borrow_mut();
            if a.data.is_some() {
                return Err("numpy array built twice".into());
            }
            *a = complete_array(shape, dtype, data.clone())?;
            Ok(())
        }
        other => Err(format!(
            "BUILD on a {}, which is not a numpy object",
            other.kind()
        )),
    }
}

/// Parses a whole pickle and returns its value.
pub(crate) fn parse(bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let mut m = Machine {
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    loop {
        let at = r.pos;
        let op = r
            .u8()
            .map_err(|_| "truncated: ends before the STOP opcode".to_string())?;
        let step = run_op(op, &mut r, &mut m);
        match step {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("{e} (opcode 0x{op:02x} at byte {at})")),
        }
    }
    if r.pos != bytes.len() {
        return Err(format!(
            "{} bytes of trailing data after the STOP opcode",
            bytes.len() - r.pos
        ));
    }
    if !m.marks.is_empty() || m.stack.len() != 1 {
        return Err("the stack is not a single value at STOP".into());
    }
    m.stack.pop().ok_or_else(|| "empty stack at STOP".into())
}

fn bytes_value(b: &[u8]) -> Value {
    Value::Bytes(Rc::new(b.to_vec()))
}

fn str_value(b: &[u8]) -> Result<Value, String> {
    let s = std::str::from_utf8(b).map_err(|_| "invalid UTF-8 in a string")?;
    Ok(Value::Str(s.into()))
}

/// Runs one opcode; `Ok(true)` at STOP.
fn run_op(op: u8, r: &mut Reader<'_>, m: &mut Machine) -> Result<bool, String> {
    match op {
        // PROTO
        0x80 => {
            let p = r.u8()?;
            if p > 5 {
                return Err(format!("pickle protocol {p} is newer than 5"));
            }
        }
        // FRAME: a length hint only.
        0x95 => {
            r.u64()?;
        }
        b'.' => return Ok(true),
        b'(' => m.marks.push(m.stack.len()),
        b'0' => {
            m.pop()?;
        }
        b'N' => m.push(Value::None),
        0x88 => m.push(Value::Bool(true)),
        0x89 => m.push(Value::Bool(false)),
        // INT (text; protocol 0/1 booleans are `I00` / `I01`).
        b'I' => {
            let line = r.line()?;
            let v = match line {
                "00" => Value::Bool(false),
                "01" => Value::Bool(true),
                s => Value::Int(s.parse().map_err(|_| format!("bad INT `{s}`"))?),
            };
            m.push(v);
        }
        b'J' => m.push(Value::Int(i64::from(i32::from_le_bytes(r.le()?)))),
        b'K' => m.push(Value::Int(i64::from(r.u8()?))),
        b'M' => m.push(Value::Int(r.u16()? as i64)),
        // LONG1: little-endian two's complement of n bytes.
        0x8a => {
            let n = r.u8()?;
            if n > 8 {
                return Err(format!("integer of {n} bytes is too large"));
            }
            let b = r.take(u64::from(n))?;
            let mut v: i64 = 0;
            for (i, &byte) in b.iter().enumerate() {
                v |= i64::from(byte) << (8 * i);
            }
            if n > 0 && n < 8 && b[n as usize - 1] & 0x80 != 0 {
                v -= 1i64 << (8 * n);
            }
            m.push(Value::Int(v));
        }
        b'G' => {
            r.take(8)?;
            m.push(Value::Float);
        }
        // SHORT_BINSTRING / BINSTRING: Python 2 `str`, read as bytes.
        b'U' => {
            let n = r.u8()?;
            let b = r.take(u64::from(n))?;
            m.push(bytes_value(b));
        }
        b'T' => {
            let n = i32::from_le_bytes(r.le()?);
            let n = u64::try_from(n).map_err(|_| "negative string length")?;
            let b = r.take(n)?;
            m.push(bytes_value(b));
        }
        // SHORT_BINBYTES / BINBYTES / BINBYTES8 / BYTEARRAY8
        b'C' => {
            let n = r.u8()?;
            let b = r.take(u64::from(n))?;
            m.push(bytes_value(b));
        }
        b'B' => {
            let n = r.u32()?;
            let b = r.take(n)?;
            m.push(bytes_value(b));
        }
        0x8e | 0x96 => {
            let n = r.u64()?;
            let b = r.take(n)?;
            m.push(bytes_value(b));
        }
        // SHORT_BINUNICODE / BINUNICODE / BINUNICODE8
        0x8c => {
            let n = r.u8()?;
            let v = str_value(r.take(u64::from(n))?)?;
            m.push(v);
        }
        b'X' => {
            let n = r.u32()?;
            let v = str_value(r.take(n)?)?;
            m.push(v);
        }
        0x8d => {
            let n = r.u64()?;
            let v = str_value(r.take(n)?)?;
            m.push(v);
        }
        b')' => m.push(tuple(Vec::new())?),
        b't' => {
            let items = m.pop_mark()?;
            m.push(tuple(items)?);
        }
        0x85..=0x87 => {
            let n = usize::from(op - 0x84);
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(m.pop()?);
            }
            items.reverse();
            m.push(tuple(items)?);
        }
        b']' => m.push(Value::List(Rc::default())),
        b'l' => {
            let items = m.pop_mark()?;
            let list = Value::List(Rc::default());
            list_append(&list, items)?;
            m.push(list);
        }
        b'a' => {
            let v = m.pop()?;
            list_append(m.top()?, vec![v])?;
        }
        b'e' => {
            let items = m.pop_mark()?;
            list_append(m.top()?, items)?;
        }
        b'}' => m.push(Value::Dict(Rc::default())),
        b'd' => {
            let items = m.pop_mark()?;
            let dict = Value::Dict(Rc::default());
            dict_set(&dict, items)?;
            m.push(dict);
        }
        b's' => {
            let v = m.pop()?;
            let k = m.pop()?;
            dict_set(m.top()?, vec![k, v])?;
        }
        b'u' => {
            let items = m.pop_mark()?;
            dict_set(m.top()?, items)?;
        }
        // GLOBAL: "module\nname\n"
        b'c' => {
            let module = r.line()?;
            let name = r.line()?;
            m.push(Value::Global(resolve_global(module, name)?));
        }
        // STACK_GLOBAL
        0x93 => {
            let name = m.pop()?;
            let module = m.pop()?;
            match (module, name) {
                (Value::Str(module), Value::Str(name)) => {
                    m.push(Value::Global(resolve_global(&module, &name)?));
                }
                _ => return Err("STACK_GLOBAL without two strings".into()),
            }
        }
        b'R' => {
            let args = m.pop()?;
            let callable = m.pop()?;
            m.push(reduce(&callable, &args)?);
        }
        b'b' => {
            let state = m.pop()?;
            build(m.top()?, &state)?;
        }
        b'q' => {
            let k = u64::from(r.u8()?);
            m.memo_put(k)?;
        }
        b'r' => {
            let k = r.u32()?;
            m.memo_put(k)?;
        }
        0x94 => {
            let k = m.memo.len() as u64;
            m.memo_put(k)?;
        }
        b'h' => {
            let k = u64::from(r.u8()?);
            m.memo_get(k)?;
        }
        b'j' => {
            let k = r.u32()?;
            m.memo_get(k)?;
        }
        // READONLY_BUFFER: marks the buffer on top read-only; nothing to do here.
        0x98 => {
            m.top()?;
        }
        0x97 => {
            return Err(
                "out-of-band buffer (NEXT_BUFFER): the array data is not in the file".into(),
            );
        }
        other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_globals() {
        // pickle.dumps(os.system, protocol=2) starts like this.
        let e = parse(b"\x80\x02cposix\nsystem\nq\x00.").unwrap_err();
        assert!(e.contains("posix.system"), "{e}");
    }

    #[test]
    fn reads_small_values() {
        // pickle.dumps({'a': [1, -2, 300, 70000, True]}, protocol=2)
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01J\x70\x11\x01\x00\x88es.";
        let v = parse(p).unwrap();
        let list = v.dict_get("a").unwrap().unwrap();
        assert_eq!(list.as_int_list().unwrap(), vec![1, -2, 300, 70000, 1]);
    }

    #[test]
    fn long1_is_signed() {
        // LONG1 of 2 bytes 0xff 0xff = -1; of 1 byte 0x80 = -128; of 2 bytes 0x80 0x00 = 128
        let v = parse(b"\x80\x02(\x8a\x02\xff\xff\x8a\x01\x80\x8a\x02\x80\x00l.").unwrap();
        assert_eq!(v.as_int_list().unwrap(), vec![-1, -128, 128]);
    }

    #[test]
    fn rejects_self_nesting_and_truncation() {
        // A list appended to itself: ] q0 h0 a .
        let e = parse(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(e.contains("list or dict"), "{e}");
        let e = parse(b"\x80\x02X\xff\x00\x00\x00ab").unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let e = parse(b"\x80\x02N").unwrap_err();
        assert!(e.contains("STOP"), "{e}");
    }
}
