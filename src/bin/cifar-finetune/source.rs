//! Where features come from, shared by every subcommand that needs them: the dataset, the
//! backbone and its weights (downloaded when missing), the preprocessing, the splits and the
//! feature cache.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::backbone::fast::Precision;
use cifar_finetune::backbone::weights;
use cifar_finetune::checkpoint::Checkpoint;
use cifar_finetune::data::cifar::{self, Cifar10, Split};
use cifar_finetune::data::cifar100::{self, Cifar100, LabelKind};
use cifar_finetune::data::folder::ImageFolder;
use cifar_finetune::data::split::{self, Holdout, SplitPlan, SplitSpec};
use cifar_finetune::data::transform::{DEFAULT_MAX_PIXELS, Preprocess};
use cifar_finetune::data::{Dataset, Part};
use cifar_finetune::features::{
    self, CacheOptions, Extractor, FeatureSet, Fingerprint, Skipped, Work,
};
use cifar_finetune::fetch::{self, Asset, DownloadOptions, WeightsFormat, WeightsVersion};
use cifar_finetune::isa::Isa;
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
    /// bf16 operands and activations with f32 accumulation: fast on CPUs with AMX or
    /// AVX512-BF16, emulated elsewhere (at about f32's speed); features within a cosine of
    /// 0.999 of f32. Cached apart from f32 features.
    Bf16,
    /// bf16 where this CPU runs it natively (AMX or AVX512-BF16), else f32: the fastest.
    /// The precision chosen is printed and is the one in the cache key.
    Auto,
}

/// The datasets the tool reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// CIFAR-10 (downloaded into --data when missing).
    Cifar10,
    /// CIFAR-100, fine or coarse labels (--labels; downloaded into --data when missing).
    Cifar100,
    /// Your own images, one folder per class (--folder), as torchvision's ImageFolder.
    Folder,
}

/// CIFAR-100's two label sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelsArg {
    /// The 100 classes.
    Fine,
    /// The 20 superclasses.
    Coarse,
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
    /// Data directory: holds (or receives) the CIFAR files (cifar-10-batches-bin/ or the
    /// python version, cifar-100-binary/ …), the weights and the feature cache.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// The images: cifar10, cifar100, or folder (your own: --folder DIR)
    /// [default: folder when --folder is given, else cifar10].
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// An image folder as torchvision's ImageFolder reads it: DIR/<class>/<images>, or
    /// DIR/train/<class>/…, with val/ (or valid/) and test/ beside it when you have them.
    /// Kept apart from --data so that no cache or weights file lands among the classes.
    #[arg(long, value_name = "DIR")]
    pub folder: Option<PathBuf>,
    /// CIFAR-100's labels: the 100 fine classes or the 20 coarse superclasses.
    #[arg(long, value_enum, default_value_t = LabelsArg::Fine)]
    pub labels: LabelsArg,
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
    /// Shorter image side after resizing (torchvision's Resize(size), bilinear)
    /// [default: 224 for CIFAR, 256 for folders].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Side of the centre crop after resizing (torchvision's CenterCrop), 0 for none
    /// [default: none for CIFAR, 224 for folders].
    #[arg(long, value_name = "N")]
    pub crop: Option<usize>,
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
    /// Use only the first N images of each part (a quick trial).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Validation images drawn from the training part, a plain seeded draw
    /// [default for CIFAR: a tenth of the training images used, 5,000 of 50,000].
    #[arg(long, conflicts_with = "val_fraction")]
    pub val_count: Option<usize>,
    /// Fraction of each class drawn from the training part for validation, stratified
    /// [default for folders without val/: 0.1].
    #[arg(long, value_name = "F")]
    pub val_fraction: Option<f64>,
    /// Fraction of each class drawn from the training part for testing, stratified, for a
    /// folder without test/ [default: 0.1]; drawn before validation.
    #[arg(long, value_name = "F")]
    pub test_fraction: Option<f64>,
    /// Seed of the drawn splits.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Leave out images that cannot be decoded (listed in the run directory) instead of
    /// stopping with the list of them.
    #[arg(long)]
    pub skip_bad: bool,
    /// Never download: fail if the data or weights are missing.
    #[arg(long)]
    pub offline: bool,
}

/// The feature cache's directory under the data directory, unless `--cache-dir` says
/// otherwise.
const CACHE_DIR: &str = "features-cache";

/// What a run's `config.json` records of the flags its features came from (its `source`):
/// written by `train`, `sweep` and `run`, read back by `test` for the flags its command line
/// leaves unset. Every field is optional when read, for runs made before it existed.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SourceRecord {
    /// `cifar10`, `cifar100`, `cifar100-coarse` or `folder`.
    pub dataset: Option<String>,
    pub folder: Option<PathBuf>,
    pub data: Option<PathBuf>,
    /// The feature cache directory in use.
    pub cache_dir: Option<PathBuf>,
    pub backbone: Option<String>,
    pub weights: Option<String>,
    pub image_size: Option<usize>,
    pub crop: Option<usize>,
    pub val_fraction: Option<f64>,
    pub test_fraction: Option<f64>,
    pub skip_bad: bool,
    /// `imagenet` or `half`.
    pub normalize: Option<String>,
    pub limit: Option<usize>,
    pub val_count: Option<usize>,
    pub split_seed: u64,
}

/// Every dataset choice, each with the label kind that names it apart.
const DATASETS: [(DatasetKind, LabelsArg); 4] = [
    (DatasetKind::Cifar10, LabelsArg::Fine),
    (DatasetKind::Cifar100, LabelsArg::Fine),
    (DatasetKind::Cifar100, LabelsArg::Coarse),
    (DatasetKind::Folder, LabelsArg::Fine),
];

/// A dataset's name as the run records it: `cifar10`, `cifar100`, `cifar100-coarse` or
/// `folder` (only CIFAR-100 has two kinds of labels).
fn dataset_name(kind: DatasetKind, labels: LabelsArg) -> &'static str {
    match (kind, labels) {
        (DatasetKind::Cifar10, _) => "cifar10",
        (DatasetKind::Cifar100, LabelsArg::Fine) => "cifar100",
        (DatasetKind::Cifar100, LabelsArg::Coarse) => "cifar100-coarse",
        (DatasetKind::Folder, _) => "folder",
    }
}

/// The resize (`size=`) and centre crop (`crop_size=`) a features fingerprint records.
pub fn recorded_geometry(extractor: &Fingerprint) -> (Option<usize>, Option<usize>) {
    let field = |key: &str| {
        extractor
            .preprocess
            .split(';')
            .find_map(|part| part.trim().strip_prefix(key))
            .and_then(|s| s.parse::<usize>().ok())
    };
    (field("size="), field("crop_size="))
}

impl FeatureArgs {
    /// These options as a run's `config.json` records them.
    pub fn record(&self) -> SourceRecord {
        SourceRecord {
            dataset: self.dataset_name().ok().map(str::to_string),
            folder: self.folder.clone(),
            data: Some(self.data.clone()),
            cache_dir: Some(self.cache_dir()),
            backbone: Some(self.arch().name.to_string()),
            weights: self.weights.as_ref().map(|w| w.to_string()),
            image_size: Some(self.resize()),
            crop: self.center_crop(),
            val_fraction: self.val_fraction,
            test_fraction: self.test_fraction,
            skip_bad: self.skip_bad,
            normalize: Some(format!("{:?}", self.normalization()).to_lowercase()),
            limit: self.limit,
            val_count: self.val_count,
            split_seed: self.split_seed,
        }
    }

    /// Takes the images, their splits, the weights and the cache from a run's record
    /// (dataset, folder, data and cache directories, weights, image limit, split options,
    /// --skip-bad), each group only where `given` says the command line left all of its
    /// flags unset; returns the flags taken, as they would be typed.
    pub fn adopt(
        &mut self,
        rec: &SourceRecord,
        given: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<Vec<String>> {
        let mut taken = Vec::new();
        if let Some(name) = rec.dataset.as_deref()
            && !["dataset", "folder", "labels"].iter().any(|id| given(id))
        {
            let (kind, labels) = DATASETS
                .into_iter()
                .find(|&(k, l)| dataset_name(k, l) == name)
                .with_context(|| format!("the dataset `{name}` is none this tool reads"))?;
            let before = self.dataset_name().ok();
            (self.dataset, self.labels) = (Some(kind), labels);
            if kind == DatasetKind::Folder {
                let dir = rec
                    .folder
                    .clone()
                    .context("the dataset is a folder, but no folder is recorded")?;
                taken.push(format!("--folder {}", dir.display()));
                self.folder = Some(dir);
            } else if before != Some(name) {
                taken.push(format!("--dataset {}", format!("{kind:?}").to_lowercase()));
                if labels == LabelsArg::Coarse {
                    taken.push("--labels coarse".into());
                }
            }
        }
        if !given("weights")
            && let Some(w) = &rec.weights
        {
            let Ok(weights) = w.parse::<WeightsArg>();
            self.weights = Some(weights);
            taken.push(format!("--weights {w}"));
        }
        if let Some(data) = rec
            .data
            .as_ref()
            .filter(|d| !given("data") && **d != self.data)
        {
            self.data = data.clone();
            taken.push(format!("--data {}", data.display()));
        }
        // A cache the run kept apart from its data directory; the default one follows --data.
        let default_cache = rec.data.as_ref().map(|d| d.join(CACHE_DIR));
        if let Some(dir) = rec.cache_dir.as_ref().filter(|d| {
            !given("cache_dir") && Some(*d) != default_cache.as_ref() && **d != self.cache_dir()
        }) {
            self.cache_dir = Some(dir.clone());
            taken.push(format!("--cache-dir {}", dir.display()));
        }
        if !given("limit")
            && let Some(n) = rec.limit
        {
            self.limit = Some(n);
            taken.push(format!("--limit {n}"));
        }
        // Two ways of drawing the validation images: taken together or not at all.
        if !given("val_count") && !given("val_fraction") {
            (self.val_count, self.val_fraction) = (rec.val_count, rec.val_fraction);
            taken.extend(rec.val_count.map(|n| format!("--val-count {n}")));
            taken.extend(rec.val_fraction.map(|f| format!("--val-fraction {f}")));
        }
        if !given("test_fraction")
            && let Some(f) = rec.test_fraction
        {
            self.test_fraction = Some(f);
            taken.push(format!("--test-fraction {f}"));
        }
        if !given("split_seed") && rec.split_seed != self.split_seed {
            self.split_seed = rec.split_seed;
            taken.push(format!("--split-seed {}", rec.split_seed));
        }
        if !given("skip_bad") && rec.skip_bad && !self.skip_bad {
            self.skip_bad = true;
            taken.push("--skip-bad".into());
        }
        Ok(taken)
    }

    /// Takes the precision, resize, centre crop and normalisation that a head's features
    /// fingerprint records, each where the command line left its flag unset; returns the
    /// flags taken, as they would be typed.
    pub fn adopt_extractor(
        &mut self,
        fp: &Fingerprint,
        given: &dyn Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut taken = Vec::new();
        let precision = match fp.precision {
            Precision::F32 => PrecisionArg::F32,
            Precision::Bf16 => PrecisionArg::Bf16,
        };
        if !given("precision") && precision != self.precision {
            self.precision = precision;
            taken.push(format!("--precision {}", fp.precision));
        }
        let (size, crop) = recorded_geometry(fp);
        if let Some(size) = size.filter(|&s| !given("image_size") && s != self.resize()) {
            self.image_size = Some(size);
            taken.push(format!("--image-size {size}"));
        }
        if !given("crop") && crop != self.center_crop() {
            self.crop = Some(crop.unwrap_or(0));
            taken.push(format!("--crop {}", crop.unwrap_or(0)));
        }
        if self.normalize.is_none() {
            let half = FeatureArgs {
                normalize: Some(Normalize::Half),
                ..self.clone()
            };
            self.normalize = Some(if fp.preprocess == half.preprocess().fingerprint() {
                taken.push("--normalize half".into());
                Normalize::Half
            } else {
                Normalize::Imagenet
            });
        }
        taken
    }

    /// The normalisation in use: `--normalize`, or ImageNet's statistics.
    pub fn normalization(&self) -> Normalize {
        self.normalize.unwrap_or(Normalize::Imagenet)
    }

    /// The dataset these options name.
    pub fn dataset_kind(&self) -> anyhow::Result<DatasetKind> {
        match (self.dataset, &self.folder) {
            (None | Some(DatasetKind::Folder), Some(_)) => Ok(DatasetKind::Folder),
            (Some(DatasetKind::Folder), None) => {
                anyhow::bail!("--dataset folder needs --folder DIR, the root of the class folders")
            }
            (Some(kind), Some(dir)) => anyhow::bail!(
                "--folder {} is for --dataset folder, not --dataset {kind:?}",
                dir.display()
            ),
            (Some(kind), None) => Ok(kind),
            (None, None) => Ok(DatasetKind::Cifar10),
        }
    }

    /// The dataset's name as the run records it: `cifar10`, `cifar100`, `cifar100-coarse`
    /// or `folder`.
    pub fn dataset_name(&self) -> anyhow::Result<&'static str> {
        Ok(dataset_name(self.dataset_kind()?, self.labels))
    }

    /// The shorter side after resizing: `--image-size`, or the dataset's default.
    pub fn resize(&self) -> usize {
        self.image_size.unwrap_or(match self.dataset_kind() {
            Ok(DatasetKind::Folder) => 256,
            _ => 224,
        })
    }

    /// The centre crop after resizing: `--crop` (0: none), or the dataset's default.
    pub fn center_crop(&self) -> Option<usize> {
        match self.crop {
            Some(0) => None,
            Some(n) => Some(n),
            None => matches!(self.dataset_kind(), Ok(DatasetKind::Folder)).then_some(224),
        }
    }

    /// The preprocessing these options describe.
    pub fn preprocess(&self) -> Preprocess {
        let size = self.resize();
        let mut preprocess = match self.normalization() {
            Normalize::Imagenet => Preprocess::imagenet(size),
            Normalize::Half => Preprocess::half(size),
        };
        if let Some(crop) = self.center_crop() {
            preprocess = preprocess.with_center_crop(crop);
        }
        Preprocess {
            max_pixels: self.max_pixels,
            ..preprocess
        }
    }

    /// The cache directory in use.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.data.join(CACHE_DIR))
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

    /// The dataset these options name, opened: its class names read and checked (CIFAR
    /// downloaded first when files of `parts` are missing and downloads are allowed).
    pub fn dataset(&self, parts: &[Part]) -> anyhow::Result<Box<dyn Dataset>> {
        match self.dataset_kind()? {
            DatasetKind::Cifar10 => {
                if parts
                    .iter()
                    .any(|&p| cifar::part_files(&self.data, p).is_err())
                {
                    self.downloading(|opts| fetch::ensure_cifar(&self.data, opts))?;
                }
                Ok(Box::new(Cifar10::open(&self.data)?))
            }
            DatasetKind::Cifar100 => {
                if parts
                    .iter()
                    .any(|&p| cifar100::part_files(&self.data, p).is_err())
                {
                    self.downloading(|opts| fetch::ensure_cifar100(&self.data, opts))?;
                }
                let labels = match self.labels {
                    LabelsArg::Fine => LabelKind::Fine,
                    LabelsArg::Coarse => LabelKind::Coarse,
                };
                Ok(Box::new(Cifar100::open(&self.data, labels)?))
            }
            DatasetKind::Folder => {
                let root = self
                    .folder
                    .as_deref()
                    .context("--dataset folder needs --folder")?;
                Ok(Box::new(
                    ImageFolder::open(root)
                        .with_context(|| format!("--folder {}", root.display()))?,
                ))
            }
        }
    }

    /// How the splits the dataset lacks are drawn, from the flags and the dataset's
    /// defaults; flags that ask to draw a split the dataset has are refused.
    pub fn split_spec(&self, dataset: &dyn Dataset) -> anyhow::Result<SplitSpec> {
        let parts = dataset.parts();
        let name = dataset.name();
        if parts.contains(&Part::Val) && (self.val_count.is_some() || self.val_fraction.is_some()) {
            anyhow::bail!(
                "{name} has its own validation images: --val-count / --val-fraction do not apply"
            );
        }
        if parts.contains(&Part::Test) && self.test_fraction.is_some() {
            anyhow::bail!("{name} has its own test images: --test-fraction does not apply");
        }
        let folder = self.dataset_kind()? == DatasetKind::Folder;
        let val = match (self.val_count, self.val_fraction) {
            (Some(n), _) => Holdout::Count(n),
            (None, Some(f)) => Holdout::Fraction(f),
            // CIFAR's historical default: a tenth of the training images, a plain draw.
            (None, None) if !folder => Holdout::Count(usize::MAX),
            (None, None) => Holdout::Fraction(0.1),
        };
        let test_fraction = self.test_fraction.unwrap_or(0.1);
        if let Holdout::Fraction(v) = val
            && !parts.contains(&Part::Test)
            && v + test_fraction >= 1.0
        {
            anyhow::bail!(
                "--val-fraction {v} and --test-fraction {test_fraction} leave no training images"
            );
        }
        Ok(SplitSpec {
            val,
            test_fraction,
            seed: self.split_seed,
        })
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
        let isa = Isa::detect();
        let precision = match self.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Auto => {
                let p = Precision::auto(isa);
                eprintln!("precision auto: {p} (best instruction set: {isa})");
                p
            }
        };
        if precision == Precision::Bf16 && !isa.native_bf16() {
            eprintln!(
                "note: this CPU has neither AMX nor AVX512-BF16: bf16 is emulated on the f32 \
                 kernels (the same features up to summation order), at about f32's speed"
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

/// The cache options of these flags, for worker `work`.
pub fn cache_options(args: &FeatureArgs, work: Work) -> anyhow::Result<CacheOptions> {
    Ok(CacheOptions {
        dir: args.cache_dir(),
        batch_size: args.extract_batch_size,
        shard_size: args.shard_size,
        wait_for_lock: args.wait_lock,
        work,
        skip_bad: args.skip_bad,
        crash_after_shards: crash_after_shards()?,
    })
}

/// A progress callback drawing one bar, created on the first report.
pub fn progress_bar(label: String) -> (impl FnMut(features::Progress), BarSlot) {
    let slot = BarSlot(std::rc::Rc::new(std::cell::RefCell::new(None)));
    let inner = slot.0.clone();
    let update = move |p: features::Progress| {
        let mut bar = inner.borrow_mut();
        let bar = bar.get_or_insert_with(|| Progress::new(&label, "images", p.total as u64));
        bar.update(p.done as u64, (p.done - p.cached) as u64);
    };
    (update, slot)
}

/// The bar of [`progress_bar`], finished when the work is done.
pub struct BarSlot(std::rc::Rc<std::cell::RefCell<Option<Progress>>>);

impl BarSlot {
    /// Finishes the bar, if one was drawn.
    pub fn finish(self) {
        if let Some(bar) = self.0.borrow_mut().take() {
            bar.finish();
        }
    }
}

/// The features of one part of `dataset`, from the cache, extracting what it lacks.
pub fn load_part(
    args: &FeatureArgs,
    dataset: &dyn Dataset,
    extractor: &Extractor,
    part: Part,
) -> anyhow::Result<features::PartFeatures> {
    let opts = cache_options(args, Work::ALL)?;
    let (mut update, bar) = progress_bar(format!("features ({part})"));
    let loaded = features::cached_part(extractor, dataset, part, args.limit, &opts, &mut update)
        .with_context(|| {
            format!(
                "extracting features of the {part} part of {}",
                dataset.name()
            )
        });
    bar.finish();
    let loaded = loaded?;
    if !loaded.skipped.is_empty() {
        eprintln!(
            "note: {} image(s) of the {part} part could not be decoded and were left out \
             (--skip-bad)",
            loaded.skipped.len()
        );
    }
    Ok(loaded)
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

/// The splits of `dataset` under these flags (`--limit` applied to the training part).
pub fn plan(args: &FeatureArgs, dataset: &dyn Dataset) -> anyhow::Result<SplitPlan> {
    let spec = args.split_spec(dataset)?;
    let labels = || -> cifar_finetune::Result<&[u8]> {
        let labels = dataset.labels(Part::Train)?;
        Ok(&labels[..args.limit.map_or(labels.len(), |l| l.min(labels.len()))])
    };
    let spec = match spec.val {
        // The CIFAR default: a tenth of the training images used.
        Holdout::Count(usize::MAX) => SplitSpec {
            val: Holdout::Count(labels()?.len() / 10),
            ..spec
        },
        _ => spec,
    };
    Ok(split::plan(dataset.parts(), labels, &spec)?)
}

/// Features of the splits asked for, and the images left out of them.
pub struct Loaded {
    /// One set per split asked for, in that order.
    pub sets: Vec<FeatureSet>,
    /// The images that could not be decoded (only with --skip-bad), over all parts read.
    pub skipped: Vec<Skipped>,
    /// Seconds spent in the backbone (nothing when every feature was cached).
    pub backbone_seconds: f64,
}

/// The features of each split asked for, in that order (each part is read once; every file
/// of the parts needed is validated before the first image is extracted).
pub fn load_many(args: &FeatureArgs, splits: &[Split]) -> anyhow::Result<Loaded> {
    // CIFAR's splits come from fixed parts: download only those.
    let cifar_parts: Vec<Part> = splits.iter().map(|s| s.part()).collect();
    let dataset = args.dataset(&cifar_parts)?;
    let plan = plan(args, dataset.as_ref())?;
    let parts = plan.parts(splits);
    for &part in &parts {
        dataset.labels(part)?;
    }
    let extractor = args.extractor()?;
    let mut loaded: Vec<(Part, FeatureSet)> = Vec::new();
    let mut skipped = Vec::new();
    for &part in &parts {
        let p = load_part(args, dataset.as_ref(), &extractor, part)?;
        skipped.extend(p.skipped);
        loaded.push((part, p.set));
    }
    let mut sets = Vec::with_capacity(splits.len());
    for &split in splits {
        let selection = plan.get(split);
        let whole = loaded
            .iter()
            .find(|(p, _)| *p == selection.part)
            .map(|(_, set)| set)
            .with_context(|| format!("the {} part was not loaded", selection.part))?;
        let set = match &selection.indices {
            None => whole.clone(),
            Some(indices) => {
                // Rows by image index: images left out (--skip-bad) have none.
                let row_of: std::collections::HashMap<u32, usize> = whole
                    .index
                    .iter()
                    .enumerate()
                    .map(|(r, &i)| (i, r))
                    .collect();
                let rows: Vec<usize> = indices
                    .iter()
                    .filter_map(|&i| u32::try_from(i).ok().and_then(|i| row_of.get(&i)).copied())
                    .collect();
                whole.select(&rows)
            }
        };
        if set.is_empty() {
            anyhow::bail!(
                "the {split} split of {} has no images{}",
                dataset.name(),
                if split == Split::Test {
                    " (pass --test-fraction to draw some from the training images)"
                } else {
                    ""
                }
            );
        }
        sets.push(set);
    }
    Ok(Loaded {
        sets,
        skipped,
        backbone_seconds: extractor.backbone_seconds(),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        features: FeatureArgs,
    }

    fn flags(args: &[&str]) -> FeatureArgs {
        Flags::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map(|f| f.features)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// What a run records is what `adopt` reads back, whatever the dataset; flags given
    /// keep their group.
    #[test]
    fn a_record_is_adopted_back_except_where_flags_are_given() {
        let none = |_: &str| false;
        for args in [
            &[
                "--dataset",
                "cifar100",
                "--labels",
                "coarse",
                "--limit",
                "9",
            ][..],
            &[
                "--folder",
                "imgs",
                "--test-fraction",
                "0.2",
                "--val-fraction",
                "0.3",
            ],
            &[
                "--data",
                "elsewhere",
                "--val-count",
                "4",
                "--split-seed",
                "3",
                "--skip-bad",
            ],
            &["--cache-dir", "features", "--limit", "7"],
        ] {
            let rec = flags(args).record();
            let json = serde_json::to_value(&rec).unwrap();
            let read: SourceRecord = serde_json::from_value(json).unwrap();
            let mut f = flags(&[]);
            f.adopt(&read, &none).unwrap();
            assert_eq!(
                serde_json::to_value(f.record()).unwrap(),
                serde_json::to_value(&rec).unwrap(),
                "{args:?}"
            );
        }
        // --folder given: the recorded CIFAR-100 is not taken, the rest is.
        let rec = flags(&["--dataset", "cifar100", "--val-count", "4"]).record();
        let mut f = flags(&["--folder", "mine", "--val-fraction", "0.5"]);
        let given = |id: &str| ["folder", "val_fraction"].contains(&id);
        assert_eq!(f.adopt(&rec, &given).unwrap(), Vec::<String>::new());
        assert_eq!(f.dataset_name().unwrap(), "folder");
        assert_eq!((f.val_count, f.val_fraction), (None, Some(0.5)));
        // An unknown dataset is an error, not CIFAR-10.
        let rec = SourceRecord {
            dataset: Some("mnist".into()),
            ..SourceRecord::default()
        };
        let err = flags(&[]).adopt(&rec, &none).unwrap_err().to_string();
        assert!(err.contains("mnist"), "{err}");
    }
}
