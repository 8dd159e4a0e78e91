//! Where features come from, shared by every subcommand that needs them: the data, the
//! backbone and its weights (downloaded when missing), the preprocessing, and the feature
//! cache.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::backbone::fast::Precision;
use cifar_finetune::backbone::weights;
use cifar_finetune::checkpoint::Checkpoint;
use cifar_finetune::data::Dataset;
use cifar_finetune::data::cifar::{self, Cifar10, Part, Split};
use cifar_finetune::data::transform::{DEFAULT_MAX_PIXELS, Preprocess};
use cifar_finetune::features::{self, CacheOptions, Extractor, FeatureSet};
use cifar_finetune::fetch::{self, Asset, DownloadOptions, WeightsFormat, WeightsVersion};
use cifar_finetune::isa::Avx512Bf16;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

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

/// `--backbone`: one of torchvision's ResNets by its torchvision name, listed in `--help`.
pub fn backbone_parser() -> impl TypedValueParser<Value = Arch> {
    PossibleValuesParser::new(Arch::ALL.map(|a| {
        PossibleValue::new(a.name).help(format!("{}, {}-d features", a.describe(), a.feature_dim()))
    }))
    .try_map(|name| Arch::by_name(&name).ok_or_else(|| format!("unknown backbone `{name}`")))
}

/// `--weights`: torchvision's pretrained weights of the backbone, or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsArg {
    /// `v1` or `v2`: torchvision's `IMAGENET1K_V1`/`_V2` `.pth` of the chosen backbone,
    /// downloaded into the data directory when missing.
    Pretrained(WeightsVersion),
    /// Any other value: a weights file (`./v1` for a file of that name).
    File(PathBuf),
}

impl FromStr for WeightsArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "v1" => WeightsArg::Pretrained(WeightsVersion::V1),
            "v2" => WeightsArg::Pretrained(WeightsVersion::V2),
            path => WeightsArg::File(PathBuf::from(path)),
        })
    }
}

impl fmt::Display for WeightsArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsArg::Pretrained(v) => f.write_str(v.as_str()),
            WeightsArg::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// torchvision's `.pth` of `arch` in `version`, or an error saying which backbones have it.
pub fn pretrained_asset(arch: &Arch, version: WeightsVersion) -> anyhow::Result<&'static Asset> {
    fetch::pretrained(arch.name, version, WeightsFormat::Pth).with_context(|| {
        format!(
            "--weights {version}: torchvision has no {} weights for {arch} (only for {}); \
             use --weights v1 or a weights file",
            version.torchvision_name(),
            fetch::backbones_with(version).join(", ")
        )
    })
}

/// The weights file `weights` names for `arch` (default: v1), downloaded into `data` when
/// it is torchvision's and missing.
pub fn resolve_weights(
    data: &Path,
    arch: &Arch,
    weights: Option<&WeightsArg>,
    offline: bool,
) -> anyhow::Result<PathBuf> {
    let version = match weights {
        Some(WeightsArg::File(p)) if p.is_file() => return Ok(p.clone()),
        Some(WeightsArg::File(p)) => bail!("--weights {}: no such file", p.display()),
        Some(WeightsArg::Pretrained(v)) => *v,
        None => WeightsVersion::V1,
    };
    let asset = pretrained_asset(arch, version)?;
    let (reporter, progress) = crate::download::progress_reporter();
    let mut opts = DownloadOptions::from_env();
    opts.offline = offline;
    opts.progress = Some(progress);
    let result = fetch::ensure_weights(data, asset, &opts);
    reporter.finish();
    Ok(result?)
}

/// The backbone a checkpoint's head was trained on, checked against `--backbone` and against
/// the architecture of a weights file given with `--weights`: a mismatch is an error naming
/// both, before anything is extracted.
pub fn checkpoint_backbone(
    ck: &Checkpoint,
    backbone: Option<Arch>,
    weights: Option<&WeightsArg>,
) -> anyhow::Result<Arch> {
    let path = ck.path.display();
    let trained = ck.meta.extractor.arch().with_context(|| {
        format!(
            "{path}: the head was trained on features of `{}`, a backbone this version does \
             not know",
            ck.meta.backbone()
        )
    })?;
    if let Some(given) = backbone
        && given != trained
    {
        bail!(
            "{path}: the head was trained on {trained} features, but --backbone is {given}; \
             drop --backbone or pass --backbone {trained}"
        );
    }
    if let Some(WeightsArg::File(file)) = weights
        && file.is_file()
        && let Some(found) = weights::read_arch(file)?
        && found != trained
    {
        bail!(
            "{path}: the head was trained on {trained} features, but {} holds {found} \
             weights; pass the {trained} weights it was trained with (--weights)",
            file.display()
        );
    }
    Ok(trained)
}

/// torchvision's weights a checkpoint's features came from, recognised by the sha256 in its
/// fingerprint (the whole digest, or the 8-digit prefix torchvision names its files by):
/// what `test` and `predict` use when `--weights` is not given, so that a head trained on V2
/// features finds the V2 file. `None` when they are none of torchvision's `.pth` files.
pub fn checkpoint_weights(ck: &Checkpoint) -> Option<WeightsArg> {
    let sha = ck.meta.extractor.weights_sha256.to_ascii_lowercase();
    fetch::PRETRAINED
        .iter()
        .filter(|w| w.backbone == ck.meta.backbone() && w.format == WeightsFormat::Pth)
        .find(|w| {
            w.asset
                .checksum
                .is_some_and(|c| sha.starts_with(&c.expected().to_ascii_lowercase()))
        })
        .map(|w| WeightsArg::Pretrained(w.version))
}

/// Options that say which features to use; flattened into every subcommand that needs them.
#[derive(Debug, Clone, clap::Args)]
pub struct FeatureArgs {
    /// Data directory: holds (or receives) cifar-10-batches-bin/ (or the python version,
    /// cifar-10-batches-py/) and the weights.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// The frozen backbone, a torchvision ResNet: resnet18 extracts about 2.4× faster than
    /// resnet50 and resnet34 1.3× (512-d features); resnet101/152 and the wide ones are more
    /// accurate on ImageNet and 2.5-4× slower (2048-d) [default: resnet50; for `test`, the
    /// checkpoint's].
    #[arg(long, value_parser = backbone_parser(), value_name = "NAME")]
    pub backbone: Option<Arch>,
    /// The backbone's weights: `v1` (torchvision's IMAGENET1K_V1, the default; for `test`,
    /// the torchvision file the checkpoint names by its sha256) or `v2` (IMAGENET1K_V2:
    /// resnet50/101/152 and the wide ones), downloaded into <data> when missing; or a file,
    /// .pth (torch.save) or .safetensors with torchvision's key names (e.g. Hugging Face
    /// timm/<backbone>.tv_in1k). A file of another architecture than --backbone is refused.
    #[arg(long, value_name = "v1|v2|FILE")]
    pub weights: Option<WeightsArg>,
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

    /// The backbone in use: `--backbone`, or ResNet-50.
    pub fn arch(&self) -> Arch {
        self.backbone.unwrap_or_default()
    }

    /// The weights file, downloaded first when it is torchvision's and missing.
    pub fn weights_path(&self) -> anyhow::Result<PathBuf> {
        resolve_weights(
            &self.data,
            &self.arch(),
            self.weights.as_ref(),
            self.offline,
        )
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
        Ok(Extractor::load_arch(
            &weights,
            &self.arch(),
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
            Part::Test => load_part(args, &dataset, &extractor, Part::Test)?,
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
