//! Where features come from, shared by every subcommand that needs them: the data and
//! weights (downloaded when missing), the preprocessing, and the feature cache.

use std::path::PathBuf;

use anyhow::Context;
use cifar_finetune::backbone::fast::Precision;
use cifar_finetune::data::Dataset;
use cifar_finetune::data::cifar::{self, Cifar10, Part, Split};
use cifar_finetune::data::transform::{DEFAULT_MAX_PIXELS, Preprocess};
use cifar_finetune::features::{self, CacheOptions, Extractor, FeatureSet};
use cifar_finetune::fetch::{self, DownloadOptions};
use cifar_finetune::isa::Avx512Bf16;

use crate::progress::Progress;

/// The normalisation applied after `ToTensor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Normalize {
    /// ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225): what the weights
    /// were trained with.
    Imagenet,
    /// mean = std = (0.5, 0.5, 0.5), as the original course script.
    Half,
}

/// The arithmetic of the backbone's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// f32 throughout: torchvision's features to float rounding.
    F32,
    /// bf16 operands with f32 accumulation: about twice as fast on CPUs with AVX512-BF16
    /// (emulated, at f32 speed, elsewhere); features within a cosine of 0.999 of f32.
    /// Cached apart from f32 features.
    Bf16,
}

/// Options that say which features to use; flattened into every subcommand that needs them.
#[derive(Debug, Clone, clap::Args)]
pub struct FeatureArgs {
    /// Data directory: holds (or receives) cifar-10-batches-bin/ (or the python version,
    /// cifar-10-batches-py/) and the weights.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// ResNet-50 weights, .pth (torch.save) or .safetensors with torchvision's key names.
    /// [default: <data>/resnet50-0676ba61.pth, torchvision's IMAGENET1K_V1, downloaded if
    /// missing]
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Feature cache directory [default: <data>/features-cache].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Shorter image side after resizing (torchvision's Resize(size), bilinear).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Refuse an image that resizing would make larger than this many pixels.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: usize,
    /// Normalisation after ToTensor [default: imagenet; half with --preset original; for
    /// `test`, the checkpoint's].
    #[arg(long, value_enum)]
    pub normalize: Option<Normalize>,
    /// Precision of the backbone's matrix products (part of the cache fingerprint).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// Images per backbone forward pass during extraction.
    #[arg(long, default_value_t = 16)]
    pub extract_batch_size: usize,
    /// Images per cache shard: the most an interrupted extraction loses.
    #[arg(long, default_value_t = 512)]
    pub shard_size: usize,
    /// When another process is extracting into the same cache, wait for it (then reuse
    /// what it computed) instead of stopping with an error.
    #[arg(long)]
    pub wait_lock: bool,
    /// Use only the first N images of each CIFAR-10 part (a quick trial).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Validation images held out of the training part
    /// [default: a tenth of the training images used, 5,000 of 50,000].
    #[arg(long)]
    pub val_count: Option<usize>,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Never download: fail if the data or weights are missing.
    #[arg(long)]
    pub offline: bool,
}

impl FeatureArgs {
    /// The normalisation in use: `--normalize`, or ImageNet's statistics.
    pub fn normalization(&self) -> Normalize {
        self.normalize.unwrap_or(Normalize::Imagenet)
    }

    /// The preprocessing these options describe.
    pub fn preprocess(&self) -> Preprocess {
        let preprocess = match self.normalization() {
            Normalize::Imagenet => Preprocess::imagenet(self.image_size),
            Normalize::Half => Preprocess::half(self.image_size),
        };
        Preprocess {
            max_pixels: self.max_pixels,
            ..preprocess
        }
    }

    /// The cache directory in use.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.data.join("features-cache"))
    }

    /// The weights file, downloaded first when it is the default one and missing.
    pub fn weights_path(&self) -> anyhow::Result<PathBuf> {
        match &self.weights {
            Some(p) if p.exists() => Ok(p.clone()),
            Some(p) => anyhow::bail!("--weights {}: no such file", p.display()),
            None => self
                .downloading(|opts| fetch::ensure_weights(&self.data, &fetch::RESNET50_V1, opts)),
        }
    }

    /// The dataset with the files of `parts` in place (downloaded if missing and allowed),
    /// every file of those parts read and validated: a bad file is reported before any
    /// extraction starts.
    pub fn dataset(&self, parts: &[Part]) -> anyhow::Result<Cifar10> {
        if parts
            .iter()
            .any(|&p| cifar::part_files(&self.data, p).is_err())
        {
            self.downloading(|opts| fetch::ensure_cifar(&self.data, opts))?;
        }
        let dataset = Cifar10::open(&self.data)?;
        for &part in parts {
            dataset.labels(part)?;
        }
        Ok(dataset)
    }

    /// Runs a download step with the options of these flags and a progress display.
    fn downloading<T>(
        &self,
        step: impl FnOnce(&DownloadOptions) -> cifar_finetune::Result<T>,
    ) -> anyhow::Result<T> {
        let (reporter, progress) = crate::download::progress_reporter();
        let mut opts = DownloadOptions::from_env();
        opts.offline = self.offline;
        opts.progress = Some(progress);
        let result = step(&opts);
        reporter.finish();
        Ok(result?)
    }

    /// The extractor (weights hashed; the network is loaded only if something is missing
    /// from the cache).
    pub fn extractor(&self) -> anyhow::Result<Extractor> {
        // Bad sizes fail here, before the weights are downloaded or hashed.
        self.preprocess()
            .validate()
            .context("--image-size / --max-pixels")?;
        let weights = self.weights_path()?;
        let precision = match self.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        };
        if precision == Precision::Bf16 && Avx512Bf16::new().is_none() {
            eprintln!(
                "note: this CPU lacks AVX512-BF16: bf16 is emulated (the same features up to \
                 summation order) at f32 speed"
            );
        }
        Ok(Extractor::load_with_precision(
            &weights,
            self.preprocess(),
            precision,
        )?)
    }
}

/// The features of one part of `dataset`, from the cache, extracting what it lacks.
pub fn load_part(
    args: &FeatureArgs,
    dataset: &dyn Dataset,
    extractor: &Extractor,
    part: Part,
) -> anyhow::Result<FeatureSet> {
    let opts = CacheOptions {
        dir: args.cache_dir(),
        batch_size: args.extract_batch_size,
        shard_size: args.shard_size,
        wait_for_lock: args.wait_lock,
        crash_after_shards: crash_after_shards()?,
    };
    let mut bar: Option<Progress> = None;
    let set = features::cached_part(extractor, dataset, part, args.limit, &opts, &mut |p| {
        let bar = bar.get_or_insert_with(|| {
            Progress::new(&format!("features ({part})"), "images", p.total as u64)
        });
        bar.update(p.done as u64, (p.done - p.cached) as u64);
    })
    .with_context(|| format!("extracting features of the {part} part"))?;
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(set)
}

/// The crash-recovery tests' hook: `CIFAR_FINETUNE_CRASH_AFTER_SHARDS=N` makes an extraction
/// abort the process, as `kill -9` would, right after writing its N-th new shard.
fn crash_after_shards() -> anyhow::Result<Option<usize>> {
    const VAR: &str = "CIFAR_FINETUNE_CRASH_AFTER_SHARDS";
    std::env::var_os(VAR)
        .map(|v| {
            v.to_str()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{VAR}={v:?} is not a number of shards"))
        })
        .transpose()
}

/// The rows of the training part that make up `split` (Train or Val).
pub fn split_rows(args: &FeatureArgs, n: usize, split: Split) -> anyhow::Result<Vec<usize>> {
    let val_count = args.val_count.unwrap_or(n / 10);
    let (train, val) = cifar::split_indices(n, val_count, args.split_seed)?;
    Ok(match split {
        Split::Train => train,
        Split::Val => val,
        Split::Test => (0..n).collect(),
    })
}

/// The features of each split asked for, in that order (the cache is read once per part).
pub fn load_many(args: &FeatureArgs, splits: &[Split]) -> anyhow::Result<Vec<FeatureSet>> {
    let mut parts: Vec<Part> = splits.iter().map(|s| s.part()).collect();
    parts.dedup();
    let dataset = args.dataset(&parts)?;
    let extractor = args.extractor()?;
    let mut train_part: Option<FeatureSet> = None;
    let mut out = Vec::with_capacity(splits.len());
    for &split in splits {
        let set = match split.part() {
            part @ (Part::Val | Part::Test) => load_part(args, &dataset, &extractor, part)?,
            Part::Train => {
                if train_part.is_none() {
                    train_part = Some(load_part(args, &dataset, &extractor, Part::Train)?);
                }
                let whole = train_part.as_ref().context("training part not loaded")?;
                whole.select(&split_rows(args, whole.len(), split)?)
            }
        };
        out.push(set);
    }
    Ok(out)
}

/// The features of one split.
pub fn load(args: &FeatureArgs, split: Split) -> anyhow::Result<FeatureSet> {
    load_many(args, &[split])?
        .pop()
        .context("no feature set returned")
}
