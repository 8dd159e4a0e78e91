//! Cached backbone features: the one stage that runs the ResNet.
//!
//! The backbone is frozen, so an image's feature (2048-d for ResNet-50, the default; 512-d
//! for ResNet-18/34) never changes: [`cached_part`] computes it once per (backbone, weights,
//! preprocessing, precision, dataset files, image) and keeps it on disk. Everything
//! downstream — training, the λ sweep, evaluation — reads the cache.
//!
//! ## The cache on disk
//!
//! ```text
//! <cache_dir>/<part>-<key>/fingerprint.json          what the key stands for, in full
//! <cache_dir>/<part>-<key>/shard-000000-000512.safetensors   rows [0, 512) of the part
//! ```
//!
//! `key` is a sha256 over the [`Extractor`] fingerprint (backbone, weights sha256,
//! preprocessing, precision) and the sha256 of every dataset file of the part, so a cache
//! made from another backbone, weights, preprocessing or data is never used. Shards are written atomically (temporary
//! file + rename): an extraction killed at any point (Ctrl-C, `kill -9`) resumes from its last
//! complete shard. Each shard is validated before use — its extractor, its rows, its labels
//! against the dataset — and recomputed if it does not match.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::backbone::arch::Arch;
use crate::backbone::fast::{FastResNet, Precision};
use crate::backbone::resnet::ResNet;
use crate::data::transform::Preprocess;
use crate::data::{Dataset, Image, Part};
use crate::error::{CandleContext, Error, Result};
use crate::io::DirLock;

/// Feature width of ResNet-50, the default backbone, at its global average pool; an
/// extractor reports its own with [`Extractor::feature_dim`].
pub const FEATURE_DIM: usize = crate::backbone::resnet::FEATURE_DIM;

/// What produced a set of features: the backbone and where it is cut, the weights' sha256,
/// the preprocessing and the precision of the matrix products.
///
/// Feature files, cache directories, run configurations and checkpoints store it in its
/// text form, which is stable (cache keys hash it):
///
/// ```text
/// resnet50-avgpool; weights sha256:<64 hex>; <preprocessing>; precision f32
/// ```
///
/// where `<preprocessing>` is [`Preprocess::fingerprint`] and `resnet50` is the backbone's
/// torchvision name (`resnet18`, …, `wide_resnet101_2`: [`Arch::name`]). A head is only ever
/// applied to features with the same fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Fingerprint {
    /// The network, e.g. `resnet50`; always cut at its global average pool.
    pub backbone: String,
    /// Lowercase hex sha256 of the weights file (tests use other tags for synthetic weights).
    pub weights_sha256: String,
    /// The preprocessing, as [`Preprocess::fingerprint`] writes it.
    pub preprocess: String,
    /// The arithmetic of the backbone's matrix products.
    pub precision: Precision,
}

/// The text form's separator: the preprocessing text uses `;` without a space.
const FINGERPRINT_SEP: &str = "; ";

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-avgpool{FINGERPRINT_SEP}weights sha256:{}{FINGERPRINT_SEP}{}{FINGERPRINT_SEP}\
             precision {}",
            self.backbone, self.weights_sha256, self.preprocess, self.precision
        )
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid(
                "extractor fingerprint",
                format!(
                    "{text:?}: {why} (expected `<backbone>-avgpool; weights sha256:<hex>; <preprocessing>; precision <f32|bf16>`)"
                ),
            )
        };
        let parts: Vec<&str> = text.split(FINGERPRINT_SEP).collect();
        let [backbone, weights, preprocess, precision] = parts[..] else {
            return Err(bad("not four `; `-separated fields"));
        };
        let backbone = backbone
            .strip_suffix("-avgpool")
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("the backbone does not end in `-avgpool`"))?;
        let sha = weights
            .strip_prefix("weights sha256:")
            .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
            .ok_or_else(|| bad("no `weights sha256:<hex>`"))?;
        let precision = precision
            .strip_prefix("precision ")
            .ok_or_else(|| bad("no `precision`"))?
            .parse()
            .map_err(|e: Error| bad(&e.to_string()))?;
        Ok(Fingerprint {
            backbone: backbone.to_string(),
            weights_sha256: sha.to_string(),
            preprocess: preprocess.to_string(),
            precision,
        })
    }
}

impl Fingerprint {
    /// The backbone's architecture; `None` for a name this version does not know.
    pub fn arch(&self) -> Option<Arch> {
        Arch::by_name(&self.backbone)
    }
}

impl From<Fingerprint> for String {
    fn from(fp: Fingerprint) -> String {
        fp.to_string()
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = Error;

    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

/// The network behind an [`Extractor`].
#[derive(Debug)]
enum Backbone {
    /// The candle reference implementation (f32, NCHW).
    Candle(ResNet),
    /// The fast NHWC path ([`crate::backbone::fast`]), f32 or bf16 (boxed: it holds its
    /// workspace inline).
    Fast(Box<FastResNet>),
}

/// The frozen backbone with its preprocessing: CIFAR images in, features out.
///
/// The network itself is built on first use: when every feature is cached already, only
/// the weights' checksum is needed. [`Extractor::load_arch`] runs the fast path
/// ([`FastResNet`]) of any torchvision ResNet ([`Extractor::load`]: ResNet-50);
/// [`Extractor::new`] wraps the candle reference network. Both f32 paths agree with
/// torchvision to 1e-4 relative and share the fingerprint `precision f32`.
#[derive(Debug)]
pub struct Extractor {
    weights: Option<PathBuf>,
    arch: Arch,
    precision: Precision,
    model: std::sync::OnceLock<Backbone>,
    preprocess: Preprocess,
    fingerprint: Fingerprint,
}

impl Extractor {
    /// ResNet-50 weights: hashes the file for the fingerprint; the network (the fast path,
    /// f32) is loaded (strictly) on first use.
    pub fn load(weights: &Path, preprocess: Preprocess) -> Result<Self> {
        Self::load_with_precision(weights, preprocess, Precision::F32)
    }

    /// As [`Extractor::load`], with the matrix products in `precision`; the precision is
    /// part of the fingerprint, so f32 and bf16 features are cached apart.
    pub fn load_with_precision(
        weights: &Path,
        preprocess: Preprocess,
        precision: Precision,
    ) -> Result<Self> {
        Self::load_arch(weights, &Arch::default(), preprocess, precision)
    }

    /// The torchvision ResNet `arch` from `weights`, with the matrix products in
    /// `precision`. The file's tensor names and shapes are read at once (not its data): a
    /// file of another architecture is refused naming both. Then the file is hashed for
    /// the fingerprint, which names the backbone; the network is loaded (strictly) on first
    /// use.
    pub fn load_arch(
        weights: &Path,
        arch: &Arch,
        preprocess: Preprocess,
        precision: Precision,
    ) -> Result<Self> {
        crate::backbone::weights::check_arch(
            weights,
            crate::backbone::weights::read_arch(weights)?,
            arch,
        )?;
        let sha = crate::io::sha256_file(weights)?;
        let mut ex = Self::with_fingerprint(arch, preprocess, &sha, precision);
        ex.weights = Some(weights.to_path_buf());
        Ok(ex)
    }

    /// Wraps an already-built candle backbone whose weights file has sha256
    /// `weights_sha256`.
    pub fn new(model: ResNet, preprocess: Preprocess, weights_sha256: &str) -> Self {
        let ex = Self::with_fingerprint(model.arch(), preprocess, weights_sha256, Precision::F32);
        // A fresh OnceLock is empty, so this cannot fail.
        let _ = ex.model.set(Backbone::Candle(model));
        ex
    }

    /// Wraps an already-built fast backbone whose weights file has sha256
    /// `weights_sha256`; the fingerprint takes the model's precision.
    pub fn new_fast(model: FastResNet, preprocess: Preprocess, weights_sha256: &str) -> Self {
        let ex =
            Self::with_fingerprint(model.arch(), preprocess, weights_sha256, model.precision());
        // A fresh OnceLock is empty, so this cannot fail.
        let _ = ex.model.set(Backbone::Fast(Box::new(model)));
        ex
    }

    fn with_fingerprint(
        arch: &Arch,
        preprocess: Preprocess,
        weights_sha256: &str,
        precision: Precision,
    ) -> Self {
        let fingerprint = Fingerprint {
            // "resnet50" for the default: the keys of caches made before other backbones
            // existed are unchanged.
            backbone: arch.name.to_string(),
            weights_sha256: weights_sha256.to_string(),
            preprocess: preprocess.fingerprint(),
            precision,
        };
        Self {
            weights: None,
            arch: *arch,
            precision,
            model: std::sync::OnceLock::new(),
            preprocess,
            fingerprint,
        }
    }

    /// The network, loaded from the weights file on first call.
    fn model(&self) -> Result<&Backbone> {
        if let Some(m) = self.model.get() {
            return Ok(m);
        }
        let path = self
            .weights
            .as_deref()
            .ok_or_else(|| Error::invalid("extractor", "no weights to load"))?;
        let model = Backbone::Fast(Box::new(FastResNet::load_arch(
            path,
            &self.arch,
            self.precision,
        )?));
        Ok(self.model.get_or_init(|| model))
    }

    /// The precision of the backbone's matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The backbone's architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// Width of the features: 512 for ResNet-18/34, 2048 for the others.
    pub fn feature_dim(&self) -> usize {
        self.arch.feature_dim()
    }

    /// What produces these features: the backbone, the weights' sha256, the preprocessing
    /// and the precision. Stored with every feature file and checkpoint.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// The preprocessing applied before the backbone.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Features of a batch of images, each `[3, h, w]` u8 (R, G, B planes).
    /// Returns `[images.len(), feature_dim]` row-major.
    pub fn extract(&self, images: &[&[u8]], h: usize, w: usize) -> Result<Vec<f32>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let model = self.model()?;
        // The resize filters are computed once for the batch's image size.
        let prepared = self.preprocess.prepare(h, w)?;
        let (oh, ow) = prepared.output_hw();
        let per = prepared.output_len();
        // [b, 3, oh, ow]
        let mut input = vec![0f32; images.len() * per];
        for (img, out) in images.iter().zip(input.chunks_exact_mut(per)) {
            prepared.apply(img, out)?;
        }
        match model {
            // [b, feature_dim]
            Backbone::Fast(model) => model.forward(&input, images.len(), oh, ow),
            Backbone::Candle(model) => {
                let x = Tensor::from_vec(input, (images.len(), 3, oh, ow), &Device::Cpu)
                    .ctx("building the input batch")?;
                // [b, feature_dim]
                let f = model.forward(&x)?;
                f.flatten_all()
                    .and_then(|f| f.to_vec1::<f32>())
                    .ctx("reading features back")
            }
        }
    }
}

/// How [`cached_part`] reads and fills the cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Root directory of the cache.
    pub dir: PathBuf,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Images per shard file: the most work an interruption can lose.
    pub shard_size: usize,
    /// When another process is extracting into the same cache part: wait for it (and then
    /// use what it computed) instead of failing with [`Error::Locked`].
    pub wait_for_lock: bool,
    /// For crash-recovery tests only: abort the process (as `kill -9` would, no cleanup)
    /// right after writing this many new shards. `None` in normal use.
    pub crash_after_shards: Option<usize>,
}

/// Where an extraction stands, reported after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Images whose features are available (cached or computed).
    pub done: usize,
    /// Images wanted in all.
    pub total: usize,
    /// Of `done`, those found in the cache.
    pub cached: usize,
}

/// The features of the first `limit` images (all when `None`) of one part of `dataset`, in
/// dataset order, computing only the shards the cache lacks.
///
/// Every file of the part is read and validated before the first image is extracted.
pub fn cached_part(
    extractor: &Extractor,
    dataset: &dyn Dataset,
    part: Part,
    limit: Option<usize>,
    opts: &CacheOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<FeatureSet> {
    if opts.batch_size == 0 {
        return Err(Error::invalid("batch_size", "must be at least 1"));
    }
    if opts.shard_size == 0 {
        return Err(Error::invalid("shard_size", "must be at least 1"));
    }
    let labels = dataset.labels(part)?;
    let classes = dataset.classes().to_vec();
    let total = limit.map_or(labels.len(), |l| l.min(labels.len()));
    // The lock is taken for the first write (fingerprint.json or a shard): readers of a
    // complete cache never wait, and files appear by atomic rename, so a reader never sees
    // half of one.
    let (dir, mut lock) = cache_dir_for(extractor, dataset, part, opts)?;
    let dim = extractor.feature_dim();

    let mut set = FeatureSet {
        features: Vec::with_capacity(total * dim),
        labels: Vec::with_capacity(total),
        index: Vec::with_capacity(total),
        dim,
        extractor: extractor.fingerprint().clone(),
        classes: classes.clone(),
    };
    let mut cached = 0;
    let mut written = 0;
    for start in (0..total).step_by(opts.shard_size) {
        let end = start.saturating_add(opts.shard_size).min(total);
        let rows = end - start;
        let mut found = find_shard(&dir, start, end, extractor, &classes, labels);
        if found.is_none() && lock.is_none() {
            lock = Some(lock_part(&dir, opts)?);
            // Another process may have written it while this one waited.
            found = find_shard(&dir, start, end, extractor, &classes, labels);
        }
        let shard = match found {
            Some(shard) => {
                cached += rows;
                shard
            }
            None => {
                let mut features = Vec::with_capacity(rows * dim);
                for b in (start..end).step_by(opts.batch_size) {
                    let be = b.saturating_add(opts.batch_size).min(end);
                    let images = (b..be)
                        .map(|i| dataset.image(part, i))
                        .collect::<Result<Vec<_>>>()?;
                    features.extend(extract_images(extractor, &images)?);
                    progress(Progress {
                        done: be,
                        total,
                        cached,
                    });
                }
                if let Some((row, v)) = first_non_finite(&features, dim) {
                    return Err(Error::Numerical(format!(
                        "the backbone gave a non-finite feature ({v}) for image {} of the {part} \
                         part of {}; nothing was cached for rows {start}..{end}. Check the \
                         weights file",
                        start + row,
                        dataset.name()
                    )));
                }
                let shard = FeatureSet {
                    features,
                    labels: labels[start..end].to_vec(),
                    index: (start as u32..end as u32).collect(),
                    dim,
                    extractor: extractor.fingerprint().clone(),
                    classes: classes.clone(),
                };
                shard.write(&dir.join(shard_name(start, end)))?;
                remove_superseded(&dir, start, end)?;
                written += 1;
                if opts.crash_after_shards == Some(written) {
                    std::process::abort();
                }
                shard
            }
        };
        // A cached shard may be longer than needed (written by a run with a larger limit).
        set.features
            .extend_from_slice(&shard.features[..rows * dim]);
        set.labels.extend_from_slice(&shard.labels[..rows]);
        set.index.extend_from_slice(&shard.index[..rows]);
        progress(Progress {
            done: end,
            total,
            cached,
        });
    }
    Ok(set)
}

/// The first row of `features` (`[N, dim]`) holding a NaN or infinity, with that value.
fn first_non_finite(features: &[f32], dim: usize) -> Option<(usize, f32)> {
    let i = features.iter().position(|v| !v.is_finite())?;
    Some((i / dim.max(1), features[i]))
}

/// XXH3-64 of a feature file's three tensors, in a fixed order, as lowercase hex.
fn content_checksum(features: &[u8], labels: &[u8], index: &[u8]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [features, labels, index] {
        h.update(part);
    }
    format!("{:016x}", h.digest())
}

/// Features of `images`, `[images.len(), feature_dim]` row-major: one forward pass per run
/// of consecutive images of the same size.
fn extract_images(extractor: &Extractor, images: &[Image<'_>]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(images.len() * extractor.feature_dim());
    for run in images.chunk_by(|a, b| (a.height, a.width) == (b.height, b.width)) {
        let pixels: Vec<&[u8]> = run.iter().map(|im| im.pixels.as_ref()).collect();
        out.extend(extractor.extract(&pixels, run[0].height, run[0].width)?);
    }
    Ok(out)
}

/// What a cache directory's key stands for, kept beside the shards in `fingerprint.json`.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct CacheFingerprint {
    extractor: Fingerprint,
    part: String,
    /// (file name, sha256) of every dataset file of the part.
    files: Vec<(String, String)>,
}

/// The cache directory of one (extractor, part, dataset files) triple, created with its
/// `fingerprint.json` if new; an existing one must describe the same inputs.
///
/// Writing `fingerprint.json` takes the directory's lock, which is returned: every write
/// into a cache part happens under it, so the holder may remove stray temporaries.
fn cache_dir_for(
    extractor: &Extractor,
    dataset: &dyn Dataset,
    part: Part,
    opts: &CacheOptions,
) -> Result<(PathBuf, Option<DirLock>)> {
    // The file list identifies the dataset (and so its classes): the key of a CIFAR-10
    // cache is the same as before datasets other than CIFAR-10 existed.
    let fp = CacheFingerprint {
        extractor: extractor.fingerprint().clone(),
        part: part.to_string(),
        files: dataset.fingerprint(part)?,
    };
    let text = serde_json::to_string(&fp)
        .map_err(|e| Error::invalid("cache fingerprint", e.to_string()))?;
    let key = crate::io::hex(&Sha256::digest(text.as_bytes()));
    let dir = opts.dir.join(format!("{part}-{}", &key[..16]));
    let meta = dir.join("fingerprint.json");
    let mut lock = None;
    if !meta.exists() {
        lock = Some(lock_part(&dir, opts)?);
    }
    if meta.exists() {
        let existing: CacheFingerprint = crate::io::read_json(&meta)?;
        if existing != fp {
            return Err(Error::Fingerprint {
                path: meta,
                msg: "the cache directory describes other weights, preprocessing or data \
                      files; remove it"
                    .into(),
            });
        }
    } else {
        crate::io::write_json(&meta, &fp)?;
    }
    Ok((dir, lock))
}

/// Locks a cache part for writing and removes the temporaries a killed writer left there.
fn lock_part(dir: &Path, opts: &CacheOptions) -> Result<DirLock> {
    let lock = DirLock::acquire(dir, "feature cache part", opts.wait_for_lock)?;
    crate::io::remove_stale_temporaries(dir)?;
    Ok(lock)
}

fn shard_name(start: usize, end: usize) -> String {
    format!("shard-{start:06}-{end:06}.safetensors")
}

/// A valid cached shard starting at `start` that covers at least `[start, end)`.
fn find_shard(
    dir: &Path,
    start: usize,
    end: usize,
    extractor: &Extractor,
    classes: &[String],
    labels: &[u8],
) -> Option<FeatureSet> {
    let mut candidates = shard_ends(dir, start);
    // Prefer the shortest shard that covers the range: the least to read.
    candidates.sort_unstable();
    candidates
        .into_iter()
        .filter(|&e| e >= end && e <= labels.len())
        .find_map(|e| {
            let set = FeatureSet::read(&dir.join(shard_name(start, e))).ok()?;
            let valid = set.extractor == *extractor.fingerprint()
                && set.classes == classes
                && set.dim == extractor.feature_dim()
                && set.len() == e - start
                && set.labels == labels[start..e]
                && set.index.iter().copied().eq(start as u32..e as u32);
            valid.then_some(set)
        })
}

/// The `end`s of the shard files that start at `start`.
fn shard_ends(dir: &Path, start: usize) -> Vec<usize> {
    let prefix = format!("shard-{start:06}-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix(&prefix)?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()
        })
        .collect()
}

/// After writing `[start, end)`, removes the shorter shards at `start` it supersedes.
fn remove_superseded(dir: &Path, start: usize, end: usize) -> Result<()> {
    for e in shard_ends(dir, start).into_iter().filter(|&e| e < end) {
        let p = dir.join(shard_name(start, e));
        std::fs::remove_file(&p).map_err(|err| Error::io("removing", &p, err))?;
    }
    Ok(())
}

/// The metadata key of a feature file's content checksum.
const CHECKSUM_KEY: &str = "xxh3_64";

/// A set of backbone features with their labels, as stored on disk.
///
/// On disk (safetensors, readable from Python): `features` f32 `[N, dim]`, `labels` u8 `[N]`,
/// `index` i64 `[N]` (the image's index within its dataset part), and in the metadata the
/// `extractor` fingerprint (weights sha256 + preprocessing + precision), `classes`, the
/// class names as a JSON list (files written before it existed are CIFAR-10's), and
/// `xxh3_64`, the XXH3-64 of the three tensors' bytes in that order (hex), verified on every
/// read when present. Non-finite features are refused on read.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSet {
    /// Row-major `[N, dim]`.
    pub features: Vec<f32>,
    /// `[N]`, class ids, each below `classes.len()`.
    pub labels: Vec<u8>,
    /// `[N]`, each row's index within its dataset part (e.g. CIFAR-10's training batches).
    pub index: Vec<u32>,
    /// Width of one feature row.
    pub dim: usize,
    /// Fingerprint of what produced the features (weights, preprocessing, precision):
    /// checkpoints record it, and a head is only ever applied to features with the same one.
    pub extractor: Fingerprint,
    /// The dataset's class names in label order; the head's output size is their number.
    pub classes: Vec<String>,
}

impl FeatureSet {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i` of the feature matrix.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows at `rows` (positions in this set), in that order.
    pub fn select(&self, rows: &[usize]) -> FeatureSet {
        let mut features = Vec::with_capacity(rows.len() * self.dim);
        for &r in rows {
            features.extend_from_slice(self.row(r));
        }
        FeatureSet {
            features,
            labels: rows.iter().map(|&r| self.labels[r]).collect(),
            index: rows.iter().map(|&r| self.index[r]).collect(),
            dim: self.dim,
            extractor: self.extractor.clone(),
            classes: self.classes.clone(),
        }
    }

    /// Writes the set atomically as safetensors.
    pub fn write(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let n = self.len();
        let feat_bytes: Vec<u8> = self.features.iter().flat_map(|v| v.to_le_bytes()).collect();
        let index_bytes: Vec<u8> = self
            .index
            .iter()
            .flat_map(|&v| i64::from(v).to_le_bytes())
            .collect();
        let bad = |e: safetensors::SafeTensorError| Error::format(path, e.to_string());
        let views = [
            (
                "features",
                TensorView::new(Dtype::F32, vec![n, self.dim], &feat_bytes).map_err(bad)?,
            ),
            (
                "labels",
                TensorView::new(Dtype::U8, vec![n], &self.labels).map_err(bad)?,
            ),
            (
                "index",
                TensorView::new(Dtype::I64, vec![n], &index_bytes).map_err(bad)?,
            ),
        ];
        let classes = serde_json::to_string(&self.classes)
            .map_err(|e| Error::format(path, format!("class names: {e}")))?;
        let meta = std::collections::HashMap::from([
            ("extractor".to_string(), self.extractor.to_string()),
            ("classes".to_string(), classes),
            (
                CHECKSUM_KEY.to_string(),
                content_checksum(&feat_bytes, &self.labels, &index_bytes),
            ),
        ]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(bad)?;
        crate::io::atomic_write_bytes(path, &bytes)
    }

    /// Reads a set written by [`FeatureSet::write`], validating every shape and dtype.
    pub fn read(path: &Path) -> Result<FeatureSet> {
        use safetensors::tensor::Dtype;
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
        let extractor = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("extractor"))
            .ok_or_else(|| Error::format(path, "metadata has no `extractor` fingerprint"))?
            .parse::<Fingerprint>()
            .map_err(|e| Error::format(path, e.to_string()))?;
        let classes: Vec<String> = match meta.metadata().as_ref().and_then(|m| m.get("classes")) {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                Error::format(
                    path,
                    format!("metadata `classes` is not a list of names: {e}"),
                )
            })?,
            None => crate::data::cifar::class_names(),
        };
        if classes.is_empty() || classes.len() > 256 {
            return Err(Error::format(
                path,
                format!(
                    "metadata `classes` names {} classes (1 to 256 expected)",
                    classes.len()
                ),
            ));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
        let get = |name: &str, dtype: Dtype| {
            let t = st
                .tensor(name)
                .map_err(|_| Error::format(path, format!("missing tensor `{name}`")))?;
            if t.dtype() != dtype {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` is {:?}, expected {dtype:?}", t.dtype()),
                ));
            }
            Ok(t)
        };
        let f = get("features", Dtype::F32)?;
        let l = get("labels", Dtype::U8)?;
        let i = get("index", Dtype::I64)?;
        let [n, dim] = f.shape() else {
            return Err(Error::format(
                path,
                format!(
                    "tensor `features` has shape {:?}, expected [N, D]",
                    f.shape()
                ),
            ));
        };
        if l.shape() != [*n] || i.shape() != [*n] {
            return Err(Error::format(
                path,
                format!(
                    "tensors disagree on N: features {:?}, labels {:?}, index {:?}",
                    f.shape(),
                    l.shape(),
                    i.shape()
                ),
            ));
        }
        if let Some(want) = meta.metadata().as_ref().and_then(|m| m.get(CHECKSUM_KEY)) {
            let got = content_checksum(f.data(), l.data(), i.data());
            if got != *want {
                return Err(Error::format(
                    path,
                    format!(
                        "the content checksum is {got}, the file records {want}: the file is \
                         damaged"
                    ),
                ));
            }
        }
        let features: Vec<f32> = f
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some((row, v)) = first_non_finite(&features, *dim) {
            return Err(Error::format(
                path,
                format!("row {row} of tensor `features` holds a non-finite value ({v})"),
            ));
        }
        let labels = l.data().to_vec();
        if let Some(bad) = labels.iter().find(|&&y| usize::from(y) >= classes.len()) {
            return Err(Error::format(
                path,
                format!(
                    "label {bad} is not a class id (the file names {} classes)",
                    classes.len()
                ),
            ));
        }
        let index = i
            .data()
            .chunks_exact(8)
            .map(|c| {
                let v = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                u32::try_from(v)
                    .map_err(|_| Error::format(path, format!("tensor `index` holds {v}")))
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(FeatureSet {
            features,
            labels,
            index,
            dim: *dim,
            extractor,
            classes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_fingerprint() -> Fingerprint {
        Fingerprint {
            backbone: "resnet50".into(),
            weights_sha256: "0676ba61".into(),
            preprocess: Preprocess::imagenet(224).fingerprint(),
            precision: Precision::Bf16,
        }
    }

    #[test]
    fn fingerprint_text_form_is_stable_and_round_trips() {
        let fp = sample_fingerprint();
        let text = fp.to_string();
        // The form that caches, checkpoints and configs written before this type hold.
        assert_eq!(
            text,
            format!(
                "resnet50-avgpool; weights sha256:0676ba61; {}; precision bf16",
                Preprocess::imagenet(224).fingerprint()
            )
        );
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, serde_json::to_string(&text).unwrap());
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
        for bad in [
            "abc",
            "resnet50; weights sha256:00; x; precision f32",
            "resnet50-avgpool; weights md5:00; x; precision f32",
            "resnet50-avgpool; weights sha256:; x; precision f32",
            "resnet50-avgpool; weights sha256:00; x; precision f16",
        ] {
            let e = bad.parse::<Fingerprint>().unwrap_err().to_string();
            assert!(e.contains("fingerprint") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn write_read_round_trip_and_select() {
        let set = FeatureSet {
            features: (0..12).map(|v| v as f32 * 0.5).collect(),
            labels: vec![3, 9, 0],
            index: vec![7, 1, 4],
            dim: 4,
            extractor: sample_fingerprint(),
            classes: (0..10).map(|c| format!("class {c}")).collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        set.write(&p).unwrap();
        assert_eq!(FeatureSet::read(&p).unwrap(), set);
        let sub = set.select(&[2, 0]);
        assert_eq!(sub.labels, vec![0, 3]);
        assert_eq!(sub.index, vec![4, 7]);
        assert_eq!(sub.row(0), &[4.0, 4.5, 5.0, 5.5]);
    }
}
