//! Head checkpoints: the weights as safetensors plus a JSON sidecar, both written atomically.
//!
//! `best.safetensors` holds the head under the state-dict names of
//! `model.fc = nn.Sequential(nn.Linear(D, 32), <activation>, nn.Linear(32, 10))` —
//! `fc.0.weight` `[32, D]`, `fc.0.bias`, `fc.2.weight` `[10, 32]`, `fc.2.bias`, with D the
//! backbone's feature size (2048 for ResNet-50, 512 for ResNet-18/34) — so Python can load it
//! with `safetensors.torch.load_file` into the torchvision ResNet with that `fc`
//! (`nn.ReLU()` or, for `activation: none`, `nn.Identity()`, which has no parameters either;
//! the course script's own `fc1`/`fc2` are the same tensors under other names). The activation
//! is `config.activation` in the metadata; a checkpoint written before it existed has none and
//! is read as ReLU, which it was. A `last`
//! checkpoint also holds the SGD momentum buffers (`momentum.fc.0.weight`, …) and the training
//! state, which is what makes `--resume` exact.
//!
//! The metadata (λ, epoch, metrics, configuration and the features' `extractor` fingerprint,
//! which names the backbone: `resnet18-avgpool; …`; every checkpoint so far says `resnet50`
//! there, the only backbone before `--backbone`) is stored twice: inside the safetensors
//! header (key `cifar_finetune`, authoritative, so the one atomically written file is
//! self-contained) and as `<name>.json` beside it for people and report tools. A head is only
//! ever applied to features with the same fingerprint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::features::{FeatureSet, Fingerprint};
use crate::head::{Head, HeadDims, HeadGrads};
use crate::rundir::{HistoryRow, TrainConfig, TrainState};

/// Format tag written into every checkpoint.
pub const FORMAT: &str = "cifar-finetune head checkpoint v1";

/// Metadata key of the safetensors header that holds the [`CheckpointMeta`] JSON.
pub const META_KEY: &str = "cifar_finetune";

/// Tensor names, in PyTorch's `fc` state-dict order: W1, b1, W2, b2.
pub const TENSOR_NAMES: [&str; 4] = ["fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"];

/// Prefix of the momentum buffers' tensor names in a `last` checkpoint.
pub const MOMENTUM_PREFIX: &str = "momentum.";

/// Which checkpoint of a λ this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// The best epoch so far by the validation metric.
    Best,
    /// The latest epoch, with momentum and training state, for `--resume`.
    Last,
}

/// Everything a checkpoint records besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`FORMAT`].
    pub format: String,
    /// Best or last.
    pub kind: CheckpointKind,
    /// L2 strength the head was trained with.
    pub lambda: f32,
    /// Epochs completed when this head was saved (1-based epoch of the weights).
    pub epoch: usize,
    /// Layer widths.
    pub dims: HeadDims,
    /// Fingerprint of the features the head was trained on; its `backbone` is the network
    /// they came from ([`CheckpointMeta::backbone`]).
    pub extractor: Fingerprint,
    /// The class names in label order, one per output (checkpoints written before this
    /// field existed are CIFAR-10's).
    #[serde(default = "crate::data::cifar::class_names")]
    pub classes: Vec<String>,
    /// The training configuration.
    pub config: TrainConfig,
    /// The epoch's metrics (validation fields empty if it was not validated).
    pub metrics: HistoryRow,
    /// Only in `last` checkpoints: the state `--resume` continues from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TrainState>,
}

impl CheckpointMeta {
    /// The backbone the head's features came from, e.g. `resnet50` (torchvision's name).
    pub fn backbone(&self) -> &str {
        &self.extractor.backbone
    }
}

/// A loaded checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The head's weights.
    pub head: Head,
    /// SGD momentum buffers (only in `last` checkpoints).
    pub momentum: Option<HeadGrads>,
    /// The metadata.
    pub meta: CheckpointMeta,
    /// The safetensors file it was read from.
    pub path: PathBuf,
    /// The lowercase hex sha256 of that file's bytes as read (`None` for a checkpoint built
    /// in memory); results computed from the checkpoint carry it.
    pub sha256: Option<String>,
}

/// The JSON sidecar of a checkpoint: `best.safetensors` → `best.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// The tensors file of a checkpoint given either of its two paths (`best.json` →
/// `best.safetensors`).
pub fn tensors_path(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "json") {
        path.with_extension("safetensors")
    } else {
        path.to_path_buf()
    }
}

/// Writes `path` (safetensors, with the metadata in its header) and then its JSON sidecar,
/// each atomically. `momentum` is stored for `last` checkpoints.
pub fn save(
    path: &Path,
    head: &Head,
    momentum: Option<&HeadGrads>,
    meta: &CheckpointMeta,
) -> Result<()> {
    head.check()?;
    if meta.config.activation != head.activation {
        return Err(Error::invalid(
            "checkpoint metadata",
            format!(
                "activation `{}` differs from the head's `{}`",
                meta.config.activation, head.activation
            ),
        ));
    }
    if meta.dims != head.dims {
        return Err(Error::invalid(
            "checkpoint metadata",
            format!(
                "dims {:?} differ from the head's {:?}",
                meta.dims, head.dims
            ),
        ));
    }
    let d = head.dims;
    let shapes = [
        vec![d.hidden, d.input],
        vec![d.hidden],
        vec![d.classes, d.hidden],
        vec![d.classes],
    ];
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let params: [&[f32]; 4] = [&head.w1, &head.b1, &head.w2, &head.b2];
    for ((name, shape), data) in TENSOR_NAMES.iter().zip(&shapes).zip(params) {
        buffers.push((name.to_string(), shape.clone(), le_bytes(data)));
    }
    if let Some(m) = momentum {
        m.check(d, "momentum")?;
        let bufs: [&[f32]; 4] = [&m.w1, &m.b1, &m.w2, &m.b2];
        for ((name, shape), data) in TENSOR_NAMES.iter().zip(&shapes).zip(bufs) {
            buffers.push((
                format!("{MOMENTUM_PREFIX}{name}"),
                shape.clone(),
                le_bytes(data),
            ));
        }
    }
    let bad = |e: safetensors::SafeTensorError| Error::format(path, e.to_string());
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(bad)?;
    let json = serde_json::to_string(meta)
        .map_err(|e| Error::format(path, format!("cannot serialise metadata: {e}")))?;
    let header = HashMap::from([(META_KEY.to_string(), json)]);
    let bytes = safetensors::serialize(views, Some(header)).map_err(bad)?;
    crate::io::atomic_write_bytes(path, &bytes)?;
    crate::io::write_json(&sidecar_path(path), meta)
}

/// Reads a checkpoint from its `.safetensors` file (or its `.json` sidecar's path), checking
/// every tensor's presence, dtype and shape against the recorded dims.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let path = tensors_path(path);
    let path = path.as_path();
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading checkpoint", path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY).cloned())
        .ok_or_else(|| {
            Error::format(
                path,
                format!("no `{META_KEY}` metadata: not a cifar-finetune head checkpoint"),
            )
        })?;
    let meta: CheckpointMeta = serde_json::from_str(&json)
        .map_err(|e| Error::format(path, format!("invalid checkpoint metadata: {e}")))?;
    if meta.format != FORMAT {
        return Err(Error::format(
            path,
            format!("format `{}`, expected `{FORMAT}`", meta.format),
        ));
    }
    meta.dims.validate()?;
    if meta.classes.len() != meta.dims.classes {
        return Err(Error::format(
            path,
            format!(
                "the metadata names {} classes but the head has {} outputs",
                meta.classes.len(),
                meta.dims.classes
            ),
        ));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let d = meta.dims;
    let shapes = [
        vec![d.hidden, d.input],
        vec![d.hidden],
        vec![d.classes, d.hidden],
        vec![d.classes],
    ];
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| Error::Weights {
            path: path.to_path_buf(),
            msg: format!("missing tensor `{name}`"),
        })?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                ),
            });
        }
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // A NaN or infinite weight gives NaN metrics, or (behind a ReLU that zeroes it)
        // silently wrong ones: no head is usable with one.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let at = match shape {
                [_, cols] => format!("[{}, {}]", i / cols, i % cols),
                _ => format!("[{i}]"),
            };
            return Err(Error::Weights {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor `{name}` holds the non-finite value {} at {at}",
                    values[i]
                ),
            });
        }
        Ok(values)
    };
    let mut p = Vec::with_capacity(4);
    for (name, shape) in TENSOR_NAMES.iter().zip(&shapes) {
        p.push(read(name, shape)?);
    }
    let [w1, b1, w2, b2]: [Vec<f32>; 4] = p
        .try_into()
        .map_err(|_| Error::format(path, "expected four head tensors"))?;
    let head = Head::from_parts(d, w1, b1, w2, b2)?.with_activation(meta.config.activation);
    let momentum = if st.names().iter().any(|n| n.starts_with(MOMENTUM_PREFIX)) {
        let mut m = Vec::with_capacity(4);
        for (name, shape) in TENSOR_NAMES.iter().zip(&shapes) {
            m.push(read(&format!("{MOMENTUM_PREFIX}{name}"), shape)?);
        }
        let [w1, b1, w2, b2]: [Vec<f32>; 4] = m
            .try_into()
            .map_err(|_| Error::format(path, "expected four momentum tensors"))?;
        Some(HeadGrads { w1, b1, w2, b2 })
    } else {
        None
    };
    let known = 4 + if momentum.is_some() { 4 } else { 0 };
    if st.len() != known {
        let unexpected: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| {
                let base = n.strip_prefix(MOMENTUM_PREFIX).unwrap_or(n);
                !TENSOR_NAMES.contains(&base)
            })
            .map(|n| n.to_string())
            .collect();
        return Err(Error::Weights {
            path: path.to_path_buf(),
            msg: format!("unexpected tensors {unexpected:?}"),
        });
    }
    Ok(Checkpoint {
        head,
        momentum,
        meta,
        path: path.to_path_buf(),
        sha256: Some(crate::io::hex(&Sha256::digest(&bytes))),
    })
}

impl Checkpoint {
    /// Refuses features made by another extractor (backbone, weights, preprocessing,
    /// precision) or of another width than the head was trained on; another backbone is
    /// named as such.
    pub fn check_features(&self, features: &FeatureSet) -> Result<()> {
        if features.extractor.backbone != self.meta.extractor.backbone {
            return Err(Error::Fingerprint {
                path: self.path.clone(),
                msg: format!(
                    "the head was trained on {} features but these come from {}; extract \
                     with the {} weights it was trained with",
                    self.meta.backbone(),
                    features.extractor.backbone,
                    self.meta.backbone()
                ),
            });
        }
        if features.extractor != self.meta.extractor {
            return Err(Error::Fingerprint {
                path: self.path.clone(),
                msg: format!(
                    "the head was trained on features from `{}` but these come from `{}`; \
                     extract with the same weights and preprocessing",
                    self.meta.extractor, features.extractor
                ),
            });
        }
        if features.classes != self.meta.classes {
            return Err(Error::Fingerprint {
                path: self.path.clone(),
                msg: format!(
                    "the head was trained on the classes {:?}, these features are labelled \
                     with {:?}",
                    self.meta.classes, features.classes
                ),
            });
        }
        if features.dim != self.head.dims.input {
            return Err(Error::Fingerprint {
                path: self.path.clone(),
                msg: format!(
                    "the head takes {}-wide features, these are {}-wide",
                    self.head.dims.input, features.dim
                ),
            });
        }
        Ok(())
    }
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
