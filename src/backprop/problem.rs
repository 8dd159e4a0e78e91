//! A network with its example — what `cifar-finetune backprop` runs on — and the parameter
//! files it is read from (schema in the [`super`] module docs).

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::Value;

use super::*;
use crate::error::{Error, Result};

/// A network with an input and a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The network.
    pub network: Network,
    /// The input x, `[n₁]`.
    pub x: Vec<f64>,
    /// The target t, `[n_L]`.
    pub t: Vec<f64>,
}

impl Problem {
    /// Random weights (uniform in [−1, 1)), optional biases, input and target, all from a
    /// ChaCha8 generator seeded with `seed` (so the same seed gives the same problem), drawn in
    /// that order.
    pub fn random(sizes: &[usize], biases: bool, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let network = Network::random(sizes, biases, &mut rng)?;
        let x = uniform(&mut rng, sizes[0]);
        let t = uniform(&mut rng, sizes[sizes.len() - 1]);
        Ok(Problem { network, x, t })
    }

    /// Reads a parameter file (schema in the module docs). When `sizes` is given the file's
    /// shapes must match it.
    pub fn from_json_file(path: &Path, sizes: Option<&[usize]>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        Problem::from_json_str(&text, path, sizes)
    }

    /// Parses a parameter file's content (a leading UTF-8 byte-order mark is allowed);
    /// `path` only names the file in errors.
    pub fn from_json_str(text: &str, path: &Path, sizes: Option<&[usize]>) -> Result<Self> {
        let bad = |msg: String| Error::format(path, msg);
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let marked = mark_non_finite(text);
        // serde would also read a struct from a list of its fields in order: refuse that.
        if !marked.trim_start().starts_with('{') && !marked.trim().is_empty() {
            return Err(bad(
                "the top level is not an object (expected one with the fields weights, x, t \
                 and optionally biases)"
                    .into(),
            ));
        }
        let mut de = serde_json::Deserializer::from_str(&marked);
        let file: ParamFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            // serde_json appends the position; the path names the field better.
            let position = format!(" at line {} column {}", inner.line(), inner.column());
            let full = inner.to_string();
            let msg = full.strip_suffix(&position).unwrap_or(&full);
            let path = e.path().to_string();
            match inner.classify() {
                serde_json::error::Category::Data
                    if path != "." && !msg.starts_with("unknown field") =>
                {
                    bad(format!("{path}: {msg}"))
                }
                serde_json::error::Category::Data => bad(msg.to_string()),
                _ => bad(format!("invalid JSON: {full}")),
            }
        })?;
        de.end().map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let unwrap = |v: Vec<Finite>| v.into_iter().map(|f| f.0).collect::<Vec<f64>>();
        let mats = file.weights;
        if mats.is_empty() {
            return Err(bad("weights is empty, expected at least one matrix".into()));
        }
        let mut rows_of = Vec::with_capacity(mats.len());
        for (l, m) in mats.into_iter().enumerate() {
            if m.is_empty() {
                return Err(bad(format!(
                    "weights[{l}] has no rows, expected at least one"
                )));
            }
            rows_of.push(m.into_iter().map(unwrap).collect::<Vec<_>>());
        }

        // Layer sizes: from --sizes, or read off the matrices.
        let inputs = rows_of[0].first().map_or(0, Vec::len);
        let inferred: Vec<usize> = std::iter::once(inputs)
            .chain(rows_of.iter().map(Vec::len))
            .collect();
        let sizes = match sizes {
            Some(s) => {
                check_sizes(s)?;
                if rows_of.len() != s.len() - 1 {
                    return Err(bad(format!(
                        "weights has {} matrices, expected {} for sizes {}",
                        rows_of.len(),
                        s.len() - 1,
                        sizes_label(s)
                    )));
                }
                s.to_vec()
            }
            None => inferred,
        };
        let mut weights = Vec::with_capacity(rows_of.len());
        for (l, rows) in rows_of.into_iter().enumerate() {
            let (n_in, n_out) = (sizes[l], sizes[l + 1]);
            if rows.len() != n_out {
                return Err(bad(format!(
                    "weights[{l}] has {} rows, expected {n_out} (one per unit of layer {})",
                    rows.len(),
                    l + 2
                )));
            }
            for (j, row) in rows.iter().enumerate() {
                if row.len() != n_in {
                    return Err(bad(format!(
                        "weights[{l}][{j}] has {} values, expected {n_in} (one per unit of layer {})",
                        row.len(),
                        l + 1
                    )));
                }
            }
            weights.push(rows.concat());
        }
        if sizes.contains(&0) {
            return Err(bad(format!(
                "a layer has no units (sizes {})",
                sizes_label(&sizes)
            )));
        }

        let biases = match file.biases {
            None => None,
            Some(list) => {
                if list.len() != weights.len() {
                    return Err(bad(format!(
                        "biases has {} vectors, expected {} (one per weight matrix)",
                        list.len(),
                        weights.len()
                    )));
                }
                let mut biases = Vec::with_capacity(list.len());
                for (l, b) in list.into_iter().enumerate() {
                    if b.len() != sizes[l + 1] {
                        return Err(bad(format!(
                            "biases[{l}] has {} values, expected {} (one per unit of layer {})",
                            b.len(),
                            sizes[l + 1],
                            l + 2
                        )));
                    }
                    biases.push(unwrap(b));
                }
                Some(biases)
            }
        };

        let x = unwrap(file.x);
        if x.len() != sizes[0] {
            return Err(bad(format!(
                "x has {} values, expected {} (layer 1)",
                x.len(),
                sizes[0]
            )));
        }
        let n_out = sizes[sizes.len() - 1];
        let t = match file.t {
            Targets::One(t) if n_out == 1 => vec![t.0],
            Targets::One(_) => {
                return Err(bad(format!(
                    "t is a number, expected a list of {n_out} numbers"
                )));
            }
            Targets::Many(t) => unwrap(t),
        };
        if t.len() != n_out {
            return Err(bad(format!(
                "t has {} values, expected {n_out} (output layer)",
                t.len()
            )));
        }

        let network = Network::new(sizes, weights, biases).map_err(|e| bad(e.to_string()))?;
        Ok(Problem { network, x, t })
    }

    /// The problem as a parameter file (schema in the module docs), nested rows and all.
    pub fn to_json(&self) -> Value {
        let sizes = self.network.sizes();
        let weights: Vec<Vec<Vec<f64>>> = self
            .network
            .weights()
            .iter()
            .zip(sizes)
            .map(|(w, &n_in)| w.chunks(n_in).map(<[f64]>::to_vec).collect())
            .collect();
        let mut obj = serde_json::Map::new();
        obj.insert("weights".into(), serde_json::json!(weights));
        if let Some(b) = self.network.biases() {
            obj.insert("biases".into(), serde_json::json!(b));
        }
        obj.insert("x".into(), serde_json::json!(self.x));
        obj.insert("t".into(), serde_json::json!(self.t));
        Value::Object(obj)
    }

    /// [`Network::report`] on this problem's example.
    pub fn report(&self) -> Result<Report> {
        self.network.report(&self.x, &self.t)
    }
}

/// A parameter file as written (schema in the module docs); shapes are checked after
/// parsing, where the layer sizes are known.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with the fields weights, x, t and optionally biases"
)]
struct ParamFile {
    weights: Vec<Vec<Vec<Finite>>>,
    #[serde(default)]
    biases: Option<Vec<Vec<Finite>>>,
    x: Vec<Finite>,
    t: Targets,
}

/// The targets: a list, or one number for a network with one output.
enum Targets {
    One(Finite),
    Many(Vec<Finite>),
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Targets;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a finite number or a list of them")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> std::result::Result<Targets, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(Targets::Many)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_f64(v).map(Targets::One)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_i64(v).map(Targets::One)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_u64(v).map(Targets::One)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_str(v).map(Targets::One)
            }
        }
        de.deserialize_any(V)
    }
}

/// A finite number. Non-finite tokens arrive as strings marked by [`mark_non_finite`], so
/// that the error names the field instead of a line and column.
struct Finite(f64);

impl<'de> Deserialize<'de> for Finite {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        de.deserialize_any(FiniteVisitor)
    }
}

struct FiniteVisitor;

impl serde::de::Visitor<'_> for FiniteVisitor {
    type Value = Finite;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a finite number")
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Finite, E> {
        if v.is_finite() {
            Ok(Finite(v))
        } else {
            Err(E::custom(format!("{v} is not a finite number")))
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Finite, E> {
        Ok(Finite(v as f64))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Finite, E> {
        Ok(Finite(v as f64))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Finite, E> {
        match v.strip_prefix(NON_FINITE_MARK) {
            Some(word) => Err(E::custom(format!("{word} is not a finite number"))),
            None => Err(E::invalid_type(serde::de::Unexpected::Str(v), &self)),
        }
    }
}

/// Prefix of the strings [`mark_non_finite`] puts in place of non-finite numbers; a raw
/// control character cannot occur in a JSON string, so no valid file collides with it by
/// accident.
const NON_FINITE_MARK: &str = "\u{1}non-finite:";

/// JSON has no NaN or infinity, but Python's `json.dump` writes `NaN`, `Infinity` and
/// `-Infinity`, and a literal like `1e999` overflows; serde_json rejects all of these with a
/// line and column only. To name the field instead, such tokens (outside strings) become
/// marked strings, which [`Finite`] reports as non-finite numbers.
fn mark_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.');
    let mut out = String::new();
    let mut copied = 0; // bytes of `text` already in `out`
    let mut replaced = false;
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c == '"' {
            // Skip the string, escapes included.
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
            continue;
        }
        if !is_word(c) {
            continue;
        }
        let mut end = start + c.len_utf8();
        while let Some(&(i, c)) = chars.peek() {
            if !is_word(c) {
                break;
            }
            end = i + c.len_utf8();
            chars.next();
        }
        let word = &text[start..end];
        let non_finite = match word.trim_start_matches(['+', '-']) {
            "NaN" | "nan" | "Infinity" | "inf" | "infinity" => true,
            _ => word.parse::<f64>().is_ok_and(|x| !x.is_finite()),
        };
        if non_finite {
            out.push_str(&text[copied..start]);
            out.push_str(&format!("\"\\u0001non-finite:{word}\""));
            copied = end;
            replaced = true;
        }
    }
    if !replaced {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}
