//! Cached backbone features: the one stage that runs the ResNet.
//!
//! The backbone is frozen, so an image's feature (2048-d for ResNet-50, the default; 512-d
//! for ResNet-18/34) never changes: [`cached_part`] computes it once per (backbone, weights,
//! preprocessing, precision, image content) and keeps it on disk. Everything downstream —
//! training, the λ sweep, evaluation — reads the cache.
//!
//! ## The cache on disk
//!
//! ```text
//! <cache_dir>/<part>-<key>/fingerprint.json                what the key stands for, in full
//! <cache_dir>/<part>-<key>/shard-<xxh3 of its keys>.safetensors   features by content key
//! ```
//!
//! `key` is a sha256 over the [`Extractor`] fingerprint (backbone, weights sha256,
//! preprocessing, precision), the part and its source ([`Dataset::fingerprint`]: the sha256 of each
//! CIFAR batch file; an image folder's path), so a cache made from other weights or
//! preprocessing is never used. Inside, features are stored by each image's 128-bit
//! content key ([`Dataset::image_keys`]: a hash of the file's bytes, or of the pixels), not
//! by row: images added to a folder are the only ones extracted, a changed file is
//! extracted again, and rows may move freely.
//!
//! The part's rows are cut into chunks of `shard_size`; each chunk's missing images are
//! extracted and written as one shard, named by its keys, atomically (temporary file +
//! rename), so an extraction killed at any point (Ctrl-C, `kill -9`) resumes from its last
//! complete shard, and N workers that each take every N-th chunk ([`Work`]) write the very
//! files one process would. Each shard is validated before use — its checksum, extractor
//! and width, finite values — and recomputed if it fails.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;
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
            self.backbone,
            self.weights_sha256,
            self.preprocess,
            self.precision.fingerprint_name()
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
                    "{text:?}: {why} (expected `<backbone>-avgpool; weights sha256:<hex>; <preprocessing>; precision <f32|bf16-activations>`)"
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
    /// Nanoseconds spent in the network's forward passes, loading included: what the
    /// command line reports against the whole job's time.
    backbone_nanos: std::sync::atomic::AtomicU64,
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
            backbone_nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Seconds spent in the backbone so far (loading the network and its forward passes),
    /// over every call of this extractor.
    pub fn backbone_seconds(&self) -> f64 {
        self.backbone_nanos
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            * 1e-9
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
        let images: Vec<Image<'_>> = images
            .iter()
            .map(|&pixels| Image {
                pixels: std::borrow::Cow::Borrowed(pixels),
                height: h,
                width: w,
            })
            .collect();
        self.extract_images(&images)
    }

    /// Features of a batch of images of any sizes: each is preprocessed on its own, then the
    /// backbone runs once per run of consecutive inputs of the same preprocessed size (one
    /// run when the preprocessing crops to a fixed size). Returns `[images.len(),
    /// feature_dim]` row-major.
    pub fn extract_images(&self, images: &[Image<'_>]) -> Result<Vec<f32>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let started = std::time::Instant::now();
        let model = self.model()?;
        let mut spent = started.elapsed();
        let mut out = Vec::with_capacity(images.len() * self.feature_dim());
        // The resize filters are computed once per run of images of one input size; the
        // images are preprocessed in parallel (photos of any size cost milliseconds each).
        let runs: Vec<&[Image<'_>]> = images
            .chunk_by(|a, b| (a.height, a.width) == (b.height, b.width))
            .collect();
        // Per image: its input `[3, oh, ow]` and (oh, ow).
        type Input = (Vec<f32>, (usize, usize));
        let inputs: Vec<Vec<Input>> = runs
            .par_iter()
            .map(|run| {
                let prepared = self.preprocess.prepare(run[0].height, run[0].width)?;
                run.par_iter()
                    .map(|image| {
                        // [3, oh, ow]
                        let mut input = vec![0f32; prepared.output_len()];
                        prepared.apply(&image.pixels, &mut input)?;
                        Ok((input, prepared.output_hw()))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let inputs: Vec<Input> = inputs.into_iter().flatten().collect();
        let forward = std::time::Instant::now();
        for run in inputs.chunk_by(|a, b| a.1 == b.1) {
            let (oh, ow) = run[0].1;
            // [b, 3, oh, ow]
            let input: Vec<f32> = run.iter().flat_map(|(x, _)| x.iter().copied()).collect();
            match model {
                // [b, feature_dim]
                Backbone::Fast(model) => out.extend(model.forward(&input, run.len(), oh, ow)?),
                Backbone::Candle(model) => {
                    let x = Tensor::from_vec(input, (run.len(), 3, oh, ow), &Device::Cpu)
                        .ctx("building the input batch")?;
                    // [b, feature_dim]
                    let f = model.forward(&x)?;
                    out.extend(
                        f.flatten_all()
                            .and_then(|f| f.to_vec1::<f32>())
                            .ctx("reading features back")?,
                    );
                }
            }
        }
        spent += forward.elapsed();
        let nanos = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
        self.backbone_nanos
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }
}

/// Which chunks of a part one process extracts: the part's rows are cut into chunks of
/// [`CacheOptions::shard_size`] rows, and worker `index` of `count` takes chunk `k` when
/// `k % count == index`. The chunks — and so the shard files — are the same whoever
/// computes them, so `count` workers on `count` machines (a Slurm job array, a Kubernetes
/// Indexed Job) fill a shared cache with the very files one process would write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// This worker, `0..count`.
    pub index: usize,
    /// How many workers share the part.
    pub count: usize,
}

impl Work {
    /// One process does everything.
    pub const ALL: Work = Work { index: 0, count: 1 };

    /// Worker `index` of `count`; errors unless `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Work> {
        if count == 0 {
            return Err(Error::invalid("num_shards", "must be at least 1"));
        }
        if index >= count {
            return Err(Error::invalid(
                "shard_index",
                format!("{index} is not below the number of shards, {count}"),
            ));
        }
        Ok(Work { index, count })
    }

    /// Whether this worker computes chunk `k`.
    fn takes(&self, chunk: usize) -> bool {
        chunk % self.count == self.index
    }

    /// The lock file a worker of a sharded job holds alone, beside the shared `.lock`.
    fn lock_file(&self) -> String {
        format!(".lock-{}-of-{}", self.index, self.count)
    }
}

/// How [`cached_part`] reads and fills the cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Root directory of the cache.
    pub dir: PathBuf,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Rows per chunk, each written as one shard: the most work an interruption can lose.
    pub shard_size: usize,
    /// When another process is extracting into the same cache part: wait for it (and then
    /// use what it computed) instead of failing with [`Error::Locked`].
    pub wait_for_lock: bool,
    /// The chunks this process extracts ([`Work::ALL`] unless the job is spread over
    /// several processes).
    pub work: Work,
    /// Leave out images that cannot be decoded (listed in [`PartFeatures::skipped`])
    /// instead of failing with the list of them.
    pub skip_bad: bool,
    /// For crash-recovery tests only: abort the process (as `kill -9` would, no cleanup)
    /// right after writing this many new shards. `None` in normal use.
    pub crash_after_shards: Option<usize>,
}

impl CacheOptions {
    /// The cache in `dir` with the defaults of the command line: batches of 16, shards of
    /// 512, no waiting, one worker, bad images an error.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CacheOptions {
            dir: dir.into(),
            batch_size: 16,
            shard_size: 512,
            wait_for_lock: false,
            work: Work::ALL,
            skip_bad: false,
            crash_after_shards: None,
        }
    }
}

/// Where an extraction stands, reported after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Images whose features are available (cached or computed), or skipped.
    pub done: usize,
    /// Images this process is to provide (all of the part, or its chunks of it).
    pub total: usize,
    /// Of `done`, those found in the cache.
    pub cached: usize,
}

/// An image left out because it cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// The part it belongs to.
    pub part: Part,
    /// Its row in the part.
    pub index: usize,
    /// Its file.
    pub path: PathBuf,
    /// Why it was left out.
    pub reason: String,
}

/// The features of a part, and the images left out of them.
#[derive(Debug, Clone)]
pub struct PartFeatures {
    /// One row per usable image, in dataset order (`index` holds each row's image index).
    pub set: FeatureSet,
    /// The images that could not be decoded (empty unless [`CacheOptions::skip_bad`]).
    pub skipped: Vec<Skipped>,
}

/// What [`fill_part`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FillSummary {
    /// Images of this worker's chunks found in the cache.
    pub cached: usize,
    /// Images whose features were computed now.
    pub computed: usize,
    /// Images that could not be decoded.
    pub skipped: Vec<Skipped>,
}

/// The most bad files an error lists by name before it gives a count of the rest.
const BAD_FILES_NAMED: usize = 20;

/// The features of the first `limit` images (all when `None`) of one part of `dataset`, in
/// dataset order, computing only those the cache lacks (see [`fill_part`]).
pub fn cached_part(
    extractor: &Extractor,
    dataset: &dyn Dataset,
    part: Part,
    limit: Option<usize>,
    opts: &CacheOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PartFeatures> {
    let mut cache = PartCache::open(extractor, dataset, part, limit, opts)?;
    let summary = cache.fill(progress)?;
    cache.assemble(summary.skipped)
}

/// Computes the features this worker's chunks ([`CacheOptions::work`]) lack in the cache of
/// one part, without reading them back: the step a sharded job runs on each machine.
///
/// Bad images are collected, not fatal, until the end: then, unless
/// [`CacheOptions::skip_bad`], the error lists them (every good image's features are
/// cached by then).
pub fn fill_part(
    extractor: &Extractor,
    dataset: &dyn Dataset,
    part: Part,
    limit: Option<usize>,
    opts: &CacheOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<FillSummary> {
    PartCache::open(extractor, dataset, part, limit, opts)?.fill(progress)
}

/// The cache of one part while it is being filled: the shards found so far, indexed by
/// content key, and the lock once something has to be written.
struct PartCache<'a> {
    extractor: &'a Extractor,
    dataset: &'a dyn Dataset,
    part: Part,
    opts: &'a CacheOptions,
    dir: PathBuf,
    /// The content key of each of the first `total` images.
    keys: Vec<u128>,
    /// The shards read, and where each key's features are: (shard, row).
    shards: Vec<Shard>,
    found: HashMap<u128, (usize, usize)>,
    /// Shard files already read (valid or not), so a rescan reads only new ones.
    seen: HashSet<PathBuf>,
    locks: Vec<DirLock>,
}

impl<'a> PartCache<'a> {
    fn open(
        extractor: &'a Extractor,
        dataset: &'a dyn Dataset,
        part: Part,
        limit: Option<usize>,
        opts: &'a CacheOptions,
    ) -> Result<Self> {
        if opts.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        if opts.shard_size == 0 {
            return Err(Error::invalid("shard_size", "must be at least 1"));
        }
        Work::new(opts.work.index, opts.work.count)?;
        let mut keys = dataset.image_keys(part)?;
        keys.truncate(limit.unwrap_or(usize::MAX));
        let mut cache = PartCache {
            extractor,
            dataset,
            part,
            opts,
            dir: PathBuf::new(),
            keys,
            shards: Vec::new(),
            found: HashMap::new(),
            seen: HashSet::new(),
            locks: Vec::new(),
        };
        cache.dir = cache.part_dir()?;
        cache.scan();
        Ok(cache)
    }

    /// The part's cache directory, created with its `fingerprint.json` if new (under the
    /// lock); an existing one must describe the same extractor and data source.
    fn part_dir(&mut self) -> Result<PathBuf> {
        let fp = CacheFingerprint {
            extractor: self.extractor.fingerprint().clone(),
            part: self.part.to_string(),
            files: self.dataset.fingerprint(self.part)?,
            layout: CACHE_LAYOUT.to_string(),
        };
        let text = serde_json::to_string(&fp)
            .map_err(|e| Error::invalid("cache fingerprint", e.to_string()))?;
        let key = crate::io::hex(&Sha256::digest(text.as_bytes()));
        let dir = self.opts.dir.join(format!("{}-{}", self.part, &key[..16]));
        let meta = dir.join("fingerprint.json");
        if !meta.exists() {
            self.lock(&dir)?;
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
        Ok(dir)
    }

    /// Takes the locks a writer needs, once: exclusive on `.lock` for a single worker, who
    /// then removes stale temporaries; for a worker of a sharded job, shared on `.lock`
    /// (its siblings write beside it) and exclusive on its own lock file.
    fn lock(&mut self, dir: &Path) -> Result<()> {
        if !self.locks.is_empty() {
            return Ok(());
        }
        let (wait, what) = (self.opts.wait_for_lock, "feature cache part");
        if self.opts.work == Work::ALL {
            self.locks.push(DirLock::acquire(dir, what, wait)?);
            crate::io::remove_stale_temporaries(dir)?;
        } else {
            self.locks.push(DirLock::acquire_file(
                dir,
                crate::io::LOCK_FILE,
                what,
                wait,
                true,
            )?);
            let own = self.opts.work.lock_file();
            self.locks
                .push(DirLock::acquire_file(dir, &own, what, wait, false)?);
        }
        Ok(())
    }

    /// Reads the shard files not read yet; a damaged or foreign one is skipped (its images
    /// are then recomputed and the file rewritten).
    fn scan(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".safetensors"))
            })
            .filter(|p| !self.seen.contains(p))
            .collect();
        paths.sort();
        for path in paths {
            self.seen.insert(path.clone());
            let Ok(shard) = Shard::read(&path) else {
                continue;
            };
            if shard.extractor != *self.extractor.fingerprint()
                || shard.dim != self.extractor.feature_dim()
            {
                continue;
            }
            self.add(shard);
        }
    }

    fn add(&mut self, shard: Shard) {
        let s = self.shards.len();
        for (row, &key) in shard.keys.iter().enumerate() {
            self.found.entry(key).or_insert((s, row));
        }
        self.shards.push(shard);
    }

    /// The rows of chunk `k`.
    fn chunk(&self, k: usize) -> std::ops::Range<usize> {
        let start = k.saturating_mul(self.opts.shard_size);
        start
            ..start
                .saturating_add(self.opts.shard_size)
                .min(self.keys.len())
    }

    /// The rows of `rows` whose features the cache lacks, each key once.
    fn missing(&self, rows: std::ops::Range<usize>) -> Vec<usize> {
        let mut wanted = HashSet::new();
        rows.filter(|&i| !self.found.contains_key(&self.keys[i]) && wanted.insert(self.keys[i]))
            .collect()
    }

    /// Extracts what this worker's chunks lack (see [`fill_part`]).
    fn fill(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<FillSummary> {
        let n = self.keys.len();
        let chunks: Vec<usize> = (0..n.div_ceil(self.opts.shard_size))
            .filter(|&k| self.opts.work.takes(k))
            .collect();
        let total: usize = chunks.iter().map(|&k| self.chunk(k).len()).sum();
        let mut summary = FillSummary::default();
        let mut done = 0;
        let mut written = 0;
        for k in chunks {
            let rows = self.chunk(k);
            let mut missing = self.missing(rows.clone());
            if !missing.is_empty() && self.locks.is_empty() {
                let dir = self.dir.clone();
                self.lock(&dir)?;
                // Another process may have written them while this one waited.
                self.scan();
                missing = self.missing(rows.clone());
            }
            summary.cached += rows.len() - missing.len();
            // Rows of this chunk available (cached) or tried (extracted or skipped).
            let mut chunk_done = rows.len() - missing.len();
            let mut keys = Vec::with_capacity(missing.len());
            let mut features = Vec::with_capacity(missing.len() * self.extractor.feature_dim());
            for batch in missing.chunks(self.opts.batch_size) {
                let (good, bad) = self.decode(batch)?;
                summary.skipped.extend(bad);
                let images: Vec<Image<'_>> = good.iter().map(|(_, im)| im.clone()).collect();
                let f = self.extractor.extract_images(&images)?;
                let dim = self.extractor.feature_dim();
                if let Some((row, v)) = first_non_finite(&f, dim) {
                    return Err(Error::Numerical(format!(
                        "the backbone gave a non-finite feature ({v}) for image {} of the {} \
                         part of {}; it was not cached. Check the weights file",
                        good[row].0,
                        self.part,
                        self.dataset.name()
                    )));
                }
                keys.extend(good.iter().map(|&(i, _)| self.keys[i]));
                features.extend(f);
                summary.computed += good.len();
                chunk_done += batch.len();
                progress(Progress {
                    done: done + chunk_done,
                    total,
                    cached: summary.cached,
                });
            }
            done += rows.len();
            if !keys.is_empty() {
                let shard = Shard {
                    keys,
                    features,
                    dim: self.extractor.feature_dim(),
                    extractor: self.extractor.fingerprint().clone(),
                };
                let path = self.dir.join(shard.file_name());
                shard.write(&path)?;
                self.seen.insert(path);
                self.add(shard);
                written += 1;
                if self.opts.crash_after_shards == Some(written) {
                    std::process::abort();
                }
            }
            progress(Progress {
                done,
                total,
                cached: summary.cached,
            });
        }
        if !summary.skipped.is_empty() && !self.opts.skip_bad {
            return Err(bad_images_error(self.dataset.name(), &summary.skipped));
        }
        Ok(summary)
    }

    /// Decodes the images at `rows` in parallel: the usable ones with their row, and the
    /// ones that cannot be decoded.
    #[allow(clippy::type_complexity)]
    fn decode(&self, rows: &[usize]) -> Result<(Vec<(usize, Image<'a>)>, Vec<Skipped>)> {
        let decoded: Vec<(usize, Result<Image<'a>>)> = rows
            .par_iter()
            .map(|&i| (i, self.dataset.image(self.part, i)))
            .collect();
        let mut good = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        for (i, result) in decoded {
            match result {
                Ok(image) => good.push((i, image)),
                Err(Error::BadImage { path, msg }) => bad.push(Skipped {
                    part: self.part,
                    index: i,
                    path,
                    reason: msg,
                }),
                Err(e) => return Err(e),
            }
        }
        Ok((good, bad))
    }

    /// Every image's features from the cache, leaving out `skipped`; errors if any other
    /// is missing (a sharded job not finished yet).
    fn assemble(&self, skipped: Vec<Skipped>) -> Result<PartFeatures> {
        let dim = self.extractor.feature_dim();
        let left_out: HashSet<usize> = skipped.iter().map(|s| s.index).collect();
        let labels = self.dataset.labels(self.part)?;
        let n = self.keys.len() - left_out.len();
        let mut set = FeatureSet {
            features: Vec::with_capacity(n * dim),
            labels: Vec::with_capacity(n),
            index: Vec::with_capacity(n),
            dim,
            extractor: self.extractor.fingerprint().clone(),
            classes: self.dataset.classes().to_vec(),
        };
        for (i, key) in self.keys.iter().enumerate() {
            if left_out.contains(&i) {
                continue;
            }
            let &(s, row) = self.found.get(key).ok_or_else(|| {
                Error::invalid(
                    "feature cache",
                    format!(
                        "{}: image {i} of the {} part has no features yet (the other workers \
                         of a sharded extraction have not finished?)",
                        self.dir.display(),
                        self.part
                    ),
                )
            })?;
            set.features.extend_from_slice(self.shards[s].row(row));
            set.labels.push(labels[i]);
            set.index.push(u32::try_from(i).map_err(|_| {
                Error::invalid(
                    "image index",
                    format!("{i} does not fit the cache's u32 index"),
                )
            })?);
        }
        Ok(PartFeatures { set, skipped })
    }
}

/// The error for images that cannot be decoded: the first [`BAD_FILES_NAMED`] by path, then
/// a count of the rest.
fn bad_images_error(dataset: &str, bad: &[Skipped]) -> Error {
    let mut msg = format!(
        "{} image(s) of {dataset} cannot be decoded (the features of every other image are \
         cached; pass --skip-bad to leave these out):",
        bad.len()
    );
    for s in bad.iter().take(BAD_FILES_NAMED) {
        msg.push_str(&format!("\n  {}: {}", s.path.display(), s.reason));
    }
    if bad.len() > BAD_FILES_NAMED {
        msg.push_str(&format!("\n  … and {} more", bad.len() - BAD_FILES_NAMED));
    }
    Error::invalid("images", msg)
}

/// The first row of `features` (`[N, dim]`) holding a NaN or infinity, with that value.
fn first_non_finite(features: &[f32], dim: usize) -> Option<(usize, f32)> {
    let i = features.iter().position(|v| !v.is_finite())?;
    Some((i / dim.max(1), features[i]))
}

/// XXH3-64 of a file's tensors' bytes, in a fixed order, as lowercase hex.
fn content_checksum(tensors: &[&[u8]]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in tensors {
        h.update(part);
    }
    format!("{:016x}", h.digest())
}

/// The cache layout's version, part of every directory key: directories of an older layout
/// (shards by row range) are never read.
const CACHE_LAYOUT: &str = "content-keys-1";

/// What a cache directory's key stands for, kept beside the shards in `fingerprint.json`.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct CacheFingerprint {
    extractor: Fingerprint,
    part: String,
    /// What identifies the part's source ([`Dataset::fingerprint`]).
    files: Vec<(String, String)>,
    layout: String,
}

/// One shard of a cache part: features by content key.
///
/// On disk (safetensors): `features` f32 `[M, dim]`, `keys` u8 `[M, 16]` (each image's
/// 128-bit content key, little-endian), and one metadata entry, `shard`, a JSON object with
/// the `extractor` fingerprint and `xxh3_64` over both tensors, verified on every read. Its
/// name is derived from its keys, and its bytes from its content alone (one metadata entry:
/// safetensors writes several in hash-map order), so whoever computes the same chunk writes
/// the same file, byte for byte.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// `[M]`, each row's content key ([`Dataset::image_keys`]).
    pub keys: Vec<u128>,
    /// Row-major `[M, dim]`.
    pub features: Vec<f32>,
    /// Width of one feature row.
    pub dim: usize,
    /// What produced the features.
    pub extractor: Fingerprint,
}

impl Shard {
    /// Row `i` of the feature matrix.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    fn key_bytes(&self) -> Vec<u8> {
        self.keys.iter().flat_map(|k| k.to_le_bytes()).collect()
    }

    /// The file name the cache gives this shard: `shard-<XXH3-64 of its keys>.safetensors`.
    pub fn file_name(&self) -> String {
        let digest = xxhash_rust::xxh3::xxh3_64(&self.key_bytes());
        format!("shard-{digest:016x}.safetensors")
    }

    /// Writes the shard atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let feat_bytes: Vec<u8> = self.features.iter().flat_map(|v| v.to_le_bytes()).collect();
        let key_bytes = self.key_bytes();
        let bad = |e: safetensors::SafeTensorError| Error::format(path, e.to_string());
        let views = [
            (
                "features",
                TensorView::new(Dtype::F32, vec![self.keys.len(), self.dim], &feat_bytes)
                    .map_err(bad)?,
            ),
            (
                "keys",
                TensorView::new(Dtype::U8, vec![self.keys.len(), 16], &key_bytes).map_err(bad)?,
            ),
        ];
        let meta = ShardMeta {
            extractor: self.extractor.clone(),
            xxh3_64: content_checksum(&[&feat_bytes, &key_bytes]),
        };
        let meta = serde_json::to_string(&meta)
            .map_err(|e| Error::format(path, format!("shard metadata: {e}")))?;
        let meta = HashMap::from([(SHARD_META_KEY.to_string(), meta)]);
        let bytes = crate::io::safetensors_bytes(path, views, meta)?;
        crate::io::atomic_write_bytes(path, &bytes)
    }

    /// Reads a shard, verifying its checksum and refusing non-finite features.
    pub fn read(path: &Path) -> Result<Shard> {
        use safetensors::tensor::Dtype;
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
        let meta: ShardMeta = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(SHARD_META_KEY))
            .ok_or_else(|| Error::format(path, format!("metadata has no `{SHARD_META_KEY}`")))
            .and_then(|text| {
                serde_json::from_str(text)
                    .map_err(|e| Error::format(path, format!("metadata `{SHARD_META_KEY}`: {e}")))
            })?;
        let extractor = meta.extractor;
        let f = tensor_of(&st, path, "features", Dtype::F32)?;
        let k = tensor_of(&st, path, "keys", Dtype::U8)?;
        let (&[m, dim], &[km, 16]) = (f.shape(), k.shape()) else {
            return Err(Error::format(
                path,
                format!(
                    "tensors `features` {:?} and `keys` {:?}: expected [M, D] and [M, 16]",
                    f.shape(),
                    k.shape()
                ),
            ));
        };
        if m != km {
            return Err(Error::format(
                path,
                format!("{m} feature rows but {km} keys"),
            ));
        }
        let want = meta.xxh3_64;
        let got = content_checksum(&[f.data(), k.data()]);
        if got != want {
            return Err(Error::format(
                path,
                format!(
                    "the content checksum is {got}, the file records {want}: the file is damaged"
                ),
            ));
        }
        let features = f32s(f.data());
        if let Some((row, v)) = first_non_finite(&features, dim) {
            return Err(Error::format(
                path,
                format!("row {row} of tensor `features` holds a non-finite value ({v})"),
            ));
        }
        let keys = k
            .data()
            .chunks_exact(16)
            .map(|c| {
                let mut b = [0u8; 16];
                b.copy_from_slice(c);
                u128::from_le_bytes(b)
            })
            .collect();
        Ok(Shard {
            keys,
            features,
            dim,
            extractor,
        })
    }
}

/// The metadata key of a [`Shard`].
const SHARD_META_KEY: &str = "shard";

/// What a [`Shard`]'s metadata holds.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardMeta {
    extractor: Fingerprint,
    xxh3_64: String,
}

/// Tensor `name` of a safetensors file, which must have `dtype`.
fn tensor_of<'a>(
    st: &'a safetensors::SafeTensors<'a>,
    path: &Path,
    name: &str,
    dtype: safetensors::tensor::Dtype,
) -> Result<safetensors::tensor::TensorView<'a>> {
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
}

/// Little-endian f32s.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
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
        let meta = HashMap::from([
            ("extractor".to_string(), self.extractor.to_string()),
            ("classes".to_string(), classes),
            (
                CHECKSUM_KEY.to_string(),
                content_checksum(&[&feat_bytes, &self.labels, &index_bytes]),
            ),
        ]);
        let bytes = crate::io::safetensors_bytes(path, views, meta)?;
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
        let get = |name: &str, dtype: Dtype| tensor_of(&st, path, name, dtype);
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
            let got = content_checksum(&[f.data(), l.data(), i.data()]);
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
        let features = f32s(f.data());
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
        // The form caches, checkpoints and configs hold. bf16 is `bf16-activations` since
        // its activations became bf16, so caches of the older bf16 are not reused; the older
        // name still parses, so its checkpoints still load.
        let form = |p: &str| {
            format!(
                "resnet50-avgpool; weights sha256:0676ba61; {}; precision {p}",
                Preprocess::imagenet(224).fingerprint()
            )
        };
        assert_eq!(text, form("bf16-activations"));
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(form("bf16").parse::<Fingerprint>().unwrap(), fp);
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
