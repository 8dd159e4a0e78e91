//! Strict loading of torchvision's ResNet state dicts, and batch-norm folding.
//!
//! Reads the two formats torchvision's weights come in: `.pth` files written by `torch.save`
//! (the zip format, e.g. `resnet50-0676ba61.pth` for IMAGENET1K_V1 and `resnet50-11ad3fa6.pth`
//! for IMAGENET1K_V2) and `.safetensors` (e.g. Hugging Face `timm/resnet50.tv_in1k`, which
//! uses the same key names). Loading is strict, against the key list of an
//! [`Arch`]: every tensor of the file is either used or knowingly ignored (`fc.*`, the classifier we cut off, and `*.num_batches_tracked`), every
//! shape is checked, and an error names the missing or unexpected key or the wrong shape.
//!
//! [`synthetic_state_dict`] builds deterministic weights (a hash of each element's index) that
//! `tools/gen_backbone_fixtures.py` reproduces bit for bit in PyTorch, for golden tests and
//! benchmarks without the real 100 MB file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::arch::{Arch, ConvSpec};
use crate::error::{CandleContext, Error, Result};

/// candle's error without the backtrace it carries when `RUST_BACKTRACE` is set: a message
/// about a file, not thirty lines of stack.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e,
    }
}

/// The storage class (`FloatStorage`, `IntStorage`, …) of every tensor of a torch.save zip,
/// by key, read from its pickle; `None` when the file is not such a zip.
fn pth_storage_classes(path: &Path) -> Option<HashMap<String, String>> {
    use candle_core::pickle::{Object, Stack};
    fn storage_class(v: &Object) -> Option<String> {
        match v {
            Object::Class { class_name, .. } if class_name.ends_with("Storage") => {
                Some(class_name.clone())
            }
            Object::Tuple(items) | Object::List(items) => items.iter().find_map(storage_class),
            Object::Reduce { callable, args } | Object::Build { callable, args } => {
                storage_class(callable).or_else(|| storage_class(args))
            }
            Object::PersistentLoad(o) => storage_class(o),
            _ => None,
        }
    }
    fn collect(obj: &Object, out: &mut HashMap<String, String>) {
        match obj {
            Object::Dict(pairs) => {
                for (k, v) in pairs {
                    match (k, storage_class(v)) {
                        (Object::Unicode(k), Some(class)) => {
                            out.insert(k.clone(), class);
                        }
                        _ => collect(v, out),
                    }
                }
            }
            Object::Tuple(items) | Object::List(items) => {
                items.iter().for_each(|o| collect(o, out));
            }
            Object::Reduce { callable, args } | Object::Build { callable, args } => {
                collect(callable, out);
                collect(args, out);
            }
            Object::PersistentLoad(o) => collect(o, out),
            _ => {}
        }
    }
    let file = std::fs::File::open(path).ok()?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).ok()?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))?
        .into_owned();
    let pickle = zip.by_name(&name).ok()?;
    let mut stack = Stack::empty();
    stack.read_loop(&mut std::io::BufReader::new(pickle)).ok()?;
    let mut out = HashMap::new();
    collect(&stack.finalize().ok()?, &mut out);
    Some(out)
}

/// Every tensor of a torch.save zip, read one by one so that an error names its key.
fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let pth = candle_core::pickle::PthTensors::new(path, None).map_err(|e| {
        let e = without_backtrace(e);
        weights_err(path, format!("cannot read as a torch.save zip (.pth): {e}"))
    })?;
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        match pth.get(name) {
            Ok(Some(t)) => tensors.push((name.clone(), t)),
            Ok(None) => {}
            Err(e) => {
                let e = without_backtrace(e);
                let hint = if e.to_string().contains("non-contiguous") {
                    "; save the state dict with contiguous tensors \
                     (`{k: v.contiguous() for k, v in sd.items()}`)"
                } else {
                    ""
                };
                return Err(weights_err(
                    path,
                    format!("cannot read tensor `{name}`: {e}{hint}"),
                ));
            }
        }
    }
    Ok(tensors)
}

/// Batch-norm epsilon of torchvision's ResNet.
pub const BN_EPS: f64 = 1e-5;
/// True for keys that a backbone checkpoint may hold and we deliberately do not use.
fn is_ignored(key: &str) -> bool {
    key.starts_with("fc.") || key.ends_with(".num_batches_tracked")
}

/// The tensors of a weights file, consumed one by one as the network is built.
#[derive(Debug)]
pub struct StateDict {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// The architecture being loaded, for error messages.
    arch: Arch,
}

impl StateDict {
    /// Reads a `.pth` (zip format) or `.safetensors` file, recognised by its content.
    pub fn read(path: &Path) -> Result<Self> {
        let tensors: Vec<(String, Tensor)> = match format_of(path)? {
            // candle's pickle reader can panic on malformed input (found by tests/fuzz.rs: a
            // LONG1 of more than 8 bytes overflows a shift); a bad file must be an error.
            Format::Pth => std::panic::catch_unwind(|| read_pth(path)).map_err(|_| {
                weights_err(
                    path,
                    "cannot read as a torch.save zip (.pth): its pickle is malformed",
                )
            })??,
            Format::Safetensors => candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| {
                    let e = without_backtrace(e);
                    weights_err(path, format!("cannot read as safetensors: {e}"))
                })?
                .into_iter()
                .collect(),
        };
        if tensors.is_empty() {
            return Err(weights_err(path, "holds no tensors"));
        }
        Ok(Self::from_tensors(path, tensors.into_iter().collect()))
    }

    /// Wraps tensors already in memory; `path` is only used in error messages.
    pub fn from_tensors(path: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            path: path.into(),
            tensors,
            arch: Arch::default(),
        }
    }

    /// Names `arch` as the architecture these tensors should hold (ResNet-50 unless set),
    /// for error messages; an error naming both when the keys and shapes describe another
    /// torchvision ResNet ([`Arch::infer`]). Keys that describe none are left to strict
    /// loading, which names the first key that is wrong.
    pub fn expect_arch(&mut self, arch: &Arch) -> Result<()> {
        self.arch = *arch;
        check_arch(&self.path, self.infer_arch(), arch)
    }

    /// The architecture the tensors describe, if they describe one ([`Arch::infer`]).
    pub fn infer_arch(&self) -> Option<Arch> {
        Arch::infer(self.tensors.iter().map(|(k, t)| (k.as_str(), t.dims())))
    }

    /// The file the tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes tensor `key`, checking its shape, as f32 on the CPU.
    pub fn take(&mut self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(key).ok_or_else(|| {
            // candle skips .pth tensors of storage types it cannot read: name the type.
            let class = std::panic::catch_unwind(|| pth_storage_classes(&self.path))
                .ok()
                .flatten()
                .and_then(|mut classes| classes.remove(key));
            match class {
                Some(class) => weights_err(
                    &self.path,
                    format!(
                        "tensor `{key}` is stored as {class}, which cannot be read; save it as \
                         float (`{{k: v.float() for k, v in sd.items()}}`)"
                    ),
                ),
                None => weights_err(
                    &self.path,
                    format!(
                        "missing tensor `{key}` (expected shape {shape:?}); is this a \
                         torchvision {} state dict?",
                        self.arch
                    ),
                ),
            }
        })?;
        if t.dims() != shape {
            return Err(weights_err(
                &self.path,
                format!(
                    "tensor `{key}` has shape {:?}, expected {shape:?} ({})",
                    t.dims(),
                    self.arch
                ),
            ));
        }
        let t = t
            .to_dtype(DType::F32)
            .ctx(format!("converting `{key}` to f32"))?;
        let values = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .ctx(format!("reading `{key}`"))?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(weights_err(
                &self.path,
                format!(
                    "tensor `{key}` holds NaN or infinite values (the first, {}, at flat \
                     index {i})",
                    values[i]
                ),
            ));
        }
        Ok(t)
    }

    /// Checks that every remaining tensor is one we ignore on purpose.
    pub fn finish(self) -> Result<()> {
        let mut unexpected: Vec<&String> = self.tensors.keys().filter(|k| !is_ignored(k)).collect();
        unexpected.sort();
        match unexpected.as_slice() {
            [] => Ok(()),
            [first, ..] => Err(weights_err(
                &self.path,
                format!(
                    "unexpected tensor `{first}` ({} unexpected in all); not a torchvision \
                     {} state dict",
                    unexpected.len(),
                    self.arch
                ),
            )),
        }
    }

    /// Takes a convolution and the batch norm that follows it and folds them into one
    /// convolution with bias: `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`.
    /// Returns `(weight [out, in, k, k], bias [out])`.
    pub fn take_conv_bn(&mut self, spec: &ConvSpec) -> Result<(Tensor, Tensor)> {
        let ConvSpec {
            conv, bn, shape, ..
        } = spec;
        let w = self.take(&format!("{conv}.weight"), shape)?;
        let c = [shape[0]];
        let gamma = self.take(&format!("{bn}.weight"), &c)?;
        let beta = self.take(&format!("{bn}.bias"), &c)?;
        let mean = self.take(&format!("{bn}.running_mean"), &c)?;
        let var_key = format!("{bn}.running_var");
        let var = self.take(&var_key, &c)?;
        // A variance is never negative; PyTorch's batch norm would give NaN where σ² + ε < 0,
        // and a small negative σ² would give finite but wrong features here.
        let vars = var.to_vec1::<f32>().ctx(format!("reading `{var_key}`"))?;
        if let Some(i) = vars.iter().position(|&v| v < 0.0) {
            return Err(weights_err(
                &self.path,
                format!(
                    "tensor `{var_key}` holds the negative variance {} at index {i}: not a \
                     valid batch-norm running variance",
                    vars[i]
                ),
            ));
        }
        let (w, b) =
            fold_bn(&w, &gamma, &beta, &mean, &var).ctx(format!("folding `{bn}` into `{conv}`"))?;
        for (what, t) in [("weight", &w), ("bias", &b)] {
            let finite = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .ctx(format!("reading the folded `{conv}`"))?
                .iter()
                .all(|v| v.is_finite());
            if !finite {
                return Err(weights_err(
                    &self.path,
                    format!(
                        "folding `{bn}` into `{conv}` overflows f32 in its {what}: `{bn}.weight` \
                         is too large for `{var_key}`"
                    ),
                ));
            }
        }
        Ok((w, b))
    }
}

/// The two file formats weights come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// A torch.save zip.
    Pth,
    /// safetensors: an 8-byte header length, then the JSON header.
    Safetensors,
}

/// The format of a weights file, from its first bytes.
fn format_of(path: &Path) -> Result<Format> {
    use std::io::Read;
    let mut magic = [0u8; 9];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut got = 0;
    while got < magic.len() {
        let n = f
            .read(&mut magic[got..])
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < magic.len() {
        return Err(weights_err(path, "file is too short to hold any weights"));
    }
    if magic.starts_with(b"PK\x03\x04") {
        Ok(Format::Pth)
    } else if magic[8] == b'{' {
        Ok(Format::Safetensors)
    } else {
        Err(weights_err(
            path,
            "neither a zip-format .pth (torch.save) nor a .safetensors file; \
             a legacy .pth can be re-saved with torch.save(torch.load(f), f2)",
        ))
    }
}

/// The largest safetensors header [`read_arch`] reads (the format's own limit is 100 MB;
/// a ResNet's is a few tens of KB).
const MAX_HEADER: u64 = 100_000_000;

/// The architecture of a weights file, from its tensor names and shapes only — the
/// safetensors header or the `.pth` pickle, not the hundreds of megabytes of data — so that
/// a file of the wrong model is refused at once. `None` when the keys describe no
/// torchvision ResNet; an error when the file cannot be read as either format.
pub fn read_arch(path: &Path) -> Result<Option<Arch>> {
    let shapes: Vec<(String, Vec<usize>)> = match format_of(path)? {
        Format::Pth => {
            let infos = std::panic::catch_unwind(|| {
                candle_core::pickle::read_pth_tensor_info(path, false, None)
            })
            .map_err(|_| {
                weights_err(
                    path,
                    "cannot read as a torch.save zip (.pth): its pickle is malformed",
                )
            })?
            .map_err(|e| {
                let e = without_backtrace(e);
                weights_err(path, format!("cannot read as a torch.save zip (.pth): {e}"))
            })?;
            infos
                .into_iter()
                .map(|i| (i.name, i.layout.shape().dims().to_vec()))
                .collect()
        }
        Format::Safetensors => safetensors_shapes(path)?,
    };
    Ok(Arch::infer(
        shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
    ))
}

/// Tensor names and shapes from a safetensors header.
fn safetensors_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let bad = |why: String| weights_err(path, format!("cannot read as safetensors: {why}"));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| Error::io("reading", path, e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(bad(format!("a header of {len} bytes")));
    }
    let mut header = Vec::new();
    f.take(len)
        .read_to_end(&mut header)
        .map_err(|e| Error::io("reading", path, e))?;
    if header.len() as u64 != len {
        return Err(bad(format!("the file ends within its {len}-byte header")));
    }
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    Ok(json
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .filter_map(|(k, v)| {
            let shape = v
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()?;
            Some((k, shape))
        })
        .collect())
}

/// An error naming both architectures when `found` (inferred from a file) is not `want`.
pub fn check_arch(path: &Path, found: Option<Arch>, want: &Arch) -> Result<()> {
    match found {
        Some(found) if found != *want => Err(weights_err(
            path,
            format!(
                "holds a torchvision {found} state dict ({}), not the {want} asked for ({}); \
                 choose the backbone that matches the file (--backbone {found}) or the {want} \
                 weights",
                found.describe(),
                want.describe()
            ),
        )),
        _ => Ok(()),
    }
}

fn weights_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Folds eval-mode batch norm into the preceding bias-free convolution.
/// `w` is `[out, in, k, k]`, the others `[out]`; returns `(w', b')`.
pub fn fold_bn(
    w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    // The scale is computed in f64: it multiplies every weight, so its rounding matters most.
    let scale = (gamma.to_dtype(DType::F64)? / (var.to_dtype(DType::F64)? + BN_EPS)?.sqrt()?)?;
    let bias = (beta.to_dtype(DType::F64)? - (mean.to_dtype(DType::F64)? * &scale)?)?;
    let out = w.dim(0)?;
    let w = w
        .to_dtype(DType::F64)?
        .broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
    Ok((w.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?))
}

/// FNV-1a (32-bit) of a tensor name: the per-tensor seed of [`synthetic_state_dict`].
fn fnv1a32(name: &str) -> u32 {
    name.bytes().fold(0x811C_9DC5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// splitmix64's output function.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic values for tensor `name` of `shape`, identical to
/// `synthetic()` in `tools/gen_backbone_fixtures.py`: element `i` draws
/// `u = top 24 bits of splitmix64(fnv1a32(name) << 32 | i) / 2²⁴`, then batch-norm γ and
/// running variance are `0.5 + u`, biases and running means `0.1·(2u − 1)`, and
/// convolution weights `√(3/fan_in)·(2u − 1)` (variance 1/fan_in).
pub fn synthetic_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let seed = u64::from(fnv1a32(name)) << 32;
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let fan_in: usize = shape.iter().skip(1).product();
    let conv_scale = (3.0f64 / fan_in.max(1) as f64).sqrt() as f32;
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(seed | i) >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
            match leaf {
                "running_var" => 0.5 + u,
                "weight" if shape.len() == 1 => 0.5 + u,
                "bias" | "running_mean" => (2.0 * u - 1.0) * 0.1,
                _ => (2.0 * u - 1.0) * conv_scale,
            }
        })
        .collect()
}

/// A complete torchvision ResNet-50 state dict (classifier and `num_batches_tracked`
/// included, as in a real file) with [`synthetic_values`]: for tests and benchmarks.
pub fn synthetic_state_dict() -> Result<HashMap<String, Tensor>> {
    synthetic_state_dict_of(&Arch::RESNET50)
}

/// As [`synthetic_state_dict`], for any architecture.
pub fn synthetic_state_dict_of(arch: &Arch) -> Result<HashMap<String, Tensor>> {
    let mut keys = arch.keys();
    keys.push(("fc.weight".into(), vec![1000, arch.feature_dim()]));
    keys.push(("fc.bias".into(), vec![1000]));
    let mut map = HashMap::new();
    for (key, shape) in keys {
        let t = Tensor::from_vec(
            synthetic_values(&key, &shape),
            shape.as_slice(),
            &Device::Cpu,
        )
        .ctx(format!("building synthetic `{key}`"))?;
        if let Some(bn) = key.strip_suffix(".running_var") {
            let counter = Tensor::new(0i64, &Device::Cpu).ctx("num_batches_tracked")?;
            map.insert(format!("{bn}.num_batches_tracked"), counter);
        }
        map.insert(key, t);
    }
    Ok(map)
}

/// Writes tensors as a `.safetensors` file, atomically.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| Error::format(path, format!("cannot serialise safetensors: {e}")))?;
    crate::io::atomic_write_bytes(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_values_are_deterministic_and_in_range() {
        let a = synthetic_values("layer1.0.conv1.weight", &[64, 64, 1, 1]);
        assert_eq!(
            a,
            synthetic_values("layer1.0.conv1.weight", &[64, 64, 1, 1])
        );
        let bound = (3.0f32 / 64.0).sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));
        let var = synthetic_values("bn1.running_var", &[64]);
        assert!(var.iter().all(|v| (0.5..1.5).contains(v)));
        assert_ne!(var, synthetic_values("bn2.running_var", &[64]));
    }

    #[test]
    fn fold_matches_batch_norm() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[[[2.0f32]]], [[[-1.0]]]], &dev).unwrap();
        let gamma = Tensor::new(&[1.5f32, 0.5], &dev).unwrap();
        let beta = Tensor::new(&[0.1f32, -0.2], &dev).unwrap();
        let mean = Tensor::new(&[0.3f32, 0.4], &dev).unwrap();
        let var = Tensor::new(&[4.0f32, 0.25], &dev).unwrap();
        let (w2, b2) = fold_bn(&w, &gamma, &beta, &mean, &var).unwrap();
        // x = 1: conv gives [2, -1]; BN gives γ(x−μ)/√(σ²+ε)+β.
        for (c, conv) in [2.0f64, -1.0].iter().enumerate() {
            let g = [1.5, 0.5][c];
            let expected =
                g * (conv - [0.3, 0.4][c]) / ([4.0, 0.25][c] + BN_EPS).sqrt() + [0.1, -0.2][c];
            let wf = w2.flatten_all().unwrap().to_vec1::<f32>().unwrap()[c];
            let bf = b2.to_vec1::<f32>().unwrap()[c];
            assert!((f64::from(wf + bf) - expected).abs() < 1e-6);
        }
    }
}
