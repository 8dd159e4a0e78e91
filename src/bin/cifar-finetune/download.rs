//! `cifar-finetune download [cifar10] [cifar100]`: fetch CIFAR-10 (the default), CIFAR-100
//! and a backbone's pretrained weights (ResNet-50's by default) into the data directory,
//! verified, with a progress bar.
//!
//! The work is done by `cifar_finetune::fetch`; this file only maps flags onto
//! [`DownloadOptions`], draws progress (an indicatif bar on a terminal, plain log lines
//! otherwise) and prints where the files are. Other subcommands reuse [`progress_reporter`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::fetch::{
    self, Asset, Checksum, DownloadOptions, Progress, ProgressFn, Stage, WeightsFormat,
    WeightsVersion,
};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::source::backbone_parser;

/// Download CIFAR-10 or CIFAR-100 (binary versions) and a torchvision ResNet's pretrained
/// weights, verified (how: the `Download` command's help in main.rs).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The datasets to fetch [default: cifar10].
    #[arg(value_enum, value_name = "DATASET")]
    pub datasets: Vec<DatasetChoice>,

    /// Data directory: CIFAR-10 goes to DIR/cifar-10-batches-bin, CIFAR-100 to
    /// DIR/cifar-100-binary, the weights to DIR/<file>.
    #[arg(long, value_name = "DIR", default_value = "data")]
    pub data: PathBuf,

    /// The backbone whose weights to fetch.
    #[arg(long, value_parser = backbone_parser(), value_name = "NAME", default_value = "resnet50")]
    pub backbone: Arch,

    /// Which pretrained weights to fetch (v1 is the original script's `pretrained=True`).
    #[arg(long, value_enum, default_value_t = WeightsChoice::V1)]
    pub weights: WeightsChoice,

    /// Fetch no dataset, only the weights.
    #[arg(long, conflicts_with = "datasets")]
    pub no_cifar: bool,

    /// Base URL serving /~kriz/cifar-10-binary.tar.gz and /~kriz/cifar-100-binary.tar.gz
    /// (default https://www.cs.toronto.edu, or $CIFAR_FINETUNE_CIFAR_URL).
    #[arg(long, value_name = "URL")]
    pub cifar_url: Option<String>,

    /// Base URL serving /models/<backbone>-*.pth (default https://download.pytorch.org, or
    /// $CIFAR_FINETUNE_WEIGHTS_URL).
    #[arg(long, value_name = "URL")]
    pub weights_url: Option<String>,

    /// Base URL of Hugging Face, for --weights v1-safetensors and v2-safetensors (default
    /// https://huggingface.co, or $CIFAR_FINETUNE_HF_URL).
    #[arg(long, value_name = "URL")]
    pub hf_url: Option<String>,

    /// Never use the network: only check that the files are present, and say what is missing.
    #[arg(long)]
    pub offline: bool,
}

/// A dataset `download` can fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetChoice {
    /// CIFAR-10, binary version: cifar-10-binary.tar.gz → cifar-10-batches-bin/.
    Cifar10,
    /// CIFAR-100, binary version: cifar-100-binary.tar.gz → cifar-100-binary/ (fine and
    /// coarse labels).
    Cifar100,
}

impl DatasetChoice {
    /// Downloads (or checks) this dataset into `data`; returns its directory.
    fn ensure(self, data: &Path, opts: &DownloadOptions) -> cifar_finetune::Result<PathBuf> {
        match self {
            DatasetChoice::Cifar10 => fetch::ensure_cifar(data, opts),
            DatasetChoice::Cifar100 => fetch::ensure_cifar100(data, opts),
        }
    }

    /// The archive this dataset comes in.
    fn asset(self) -> &'static Asset {
        match self {
            DatasetChoice::Cifar10 => &fetch::CIFAR10_BINARY,
            DatasetChoice::Cifar100 => &fetch::CIFAR100_BINARY,
        }
    }

    /// How the summary line names the dataset and its files.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            DatasetChoice::Cifar10 => (
                "CIFAR-10:",
                "data_batch_1..5.bin, test_batch.bin, batches.meta.txt",
            ),
            DatasetChoice::Cifar100 => (
                "CIFAR-100:",
                "train.bin, test.bin, coarse_label_names.txt, fine_label_names.txt",
            ),
        }
    }
}

/// The pretrained weights to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsChoice {
    /// torchvision IMAGENET1K_V1 (the default), e.g. resnet50-0676ba61.pth (whole sha256
    /// checked), resnet18-f37072fd.pth (sha256 prefix checked).
    V1,
    /// torchvision IMAGENET1K_V2 (resnet50, resnet101, resnet152 and the wide ones only),
    /// e.g. resnet50-11ad3fa6.pth (whole sha256 checked), resnet101-cd907fc2.pth (sha256
    /// prefix checked).
    V2,
    /// The V1 weights as safetensors from Hugging Face (timm/<backbone>.tv_in1k; unverified).
    V1Safetensors,
    /// The V2 weights as safetensors from Hugging Face (timm/<backbone>.tv2_in1k;
    /// unverified).
    V2Safetensors,
    /// No weights.
    None,
}

impl WeightsChoice {
    /// The asset to fetch for `arch`: `None` for no weights, an error where torchvision has
    /// none of that version.
    pub fn asset(self, arch: &Arch) -> anyhow::Result<Option<&'static Asset>> {
        let (version, format) = match self {
            WeightsChoice::V1 => (WeightsVersion::V1, WeightsFormat::Pth),
            WeightsChoice::V2 => (WeightsVersion::V2, WeightsFormat::Pth),
            WeightsChoice::V1Safetensors => (WeightsVersion::V1, WeightsFormat::Safetensors),
            WeightsChoice::V2Safetensors => (WeightsVersion::V2, WeightsFormat::Safetensors),
            WeightsChoice::None => return Ok(None),
        };
        fetch::pretrained(arch.name, version, format)
            .with_context(|| {
                format!(
                    "--weights {}: torchvision has no {} weights for {arch} (only for {})",
                    self.name(),
                    version.torchvision_name(),
                    fetch::backbones_with(version).join(", ")
                )
            })
            .map(Some)
    }

    fn name(self) -> &'static str {
        match self {
            WeightsChoice::V1 => "v1",
            WeightsChoice::V2 => "v2",
            WeightsChoice::V1Safetensors => "v1-safetensors",
            WeightsChoice::V2Safetensors => "v2-safetensors",
            WeightsChoice::None => "none",
        }
    }
}

/// How a downloaded weights file was verified, for the summary line.
fn verification(asset: &Asset) -> &'static str {
    match asset.checksum {
        None => " (no checksum pinned: not verified)",
        Some(Checksum::Sha256Prefix(_)) => {
            " (sha256 prefix verified: torchvision publishes no whole digest)"
        }
        Some(_) => "",
    }
}

/// Runs `cifar-finetune download`.
pub fn run(args: Args) -> anyhow::Result<()> {
    // An impossible choice (v2 of resnet18) fails before any download.
    let weights = args.weights.asset(&args.backbone)?;
    let mut opts = DownloadOptions::from_env();
    if let Some(url) = args.cifar_url {
        opts.cifar_base_url = url;
    }
    if let Some(url) = args.weights_url {
        opts.weights_base_url = url;
    }
    if let Some(url) = args.hf_url {
        opts.hf_base_url = url;
    }
    opts.offline = args.offline;
    let (reporter, progress) = progress_reporter();
    opts.progress = Some(progress);

    // Try every requested file even when one fails, so that one run lists all that is missing.
    let mut failures = Vec::new();
    let mut found = Vec::new();
    let mut datasets: Vec<DatasetChoice> = Vec::new();
    for &d in &args.datasets {
        if !datasets.contains(&d) {
            datasets.push(d);
        }
    }
    if datasets.is_empty() && !args.no_cifar {
        datasets.push(DatasetChoice::Cifar10);
    }
    let mut archives = Vec::new();
    for &dataset in &datasets {
        match dataset.ensure(&args.data, &opts) {
            Ok(dir) => {
                let (name, files) = dataset.describe();
                found.push(format!("{name} {} ({files})", dir.display()));
                archives.push(args.data.join(dataset.asset().file_name));
            }
            Err(e) => failures.push(e.to_string()),
        }
        reporter.finish();
    }
    if let Some(asset) = weights {
        match fetch::ensure_weights(&args.data, asset, &opts) {
            Ok(path) => {
                found.push(format!(
                    "weights:  {} — {}{}",
                    path.display(),
                    asset.name,
                    verification(asset)
                ));
            }
            Err(e) => failures.push(e.to_string()),
        }
        reporter.finish();
    }

    for line in &found {
        println!("{line}");
    }
    for archive in archives.iter().filter(|a| a.is_file()) {
        println!(
            "(the archive {} is no longer needed and may be deleted)",
            archive.display()
        );
    }
    match failures.len() {
        0 => Ok(()),
        1 => bail!("{}", failures.remove(0)),
        n => bail!("{n} downloads failed:\n\n{}", failures.join("\n\n")),
    }
}

/// Handle on the progress display behind a [`ProgressFn`]: call [`Reporter::finish`] after
/// each library call so that the last bar is completed.
#[derive(Clone)]
pub struct Reporter(Arc<Mutex<Display>>);

impl Reporter {
    /// Completes the current bar or log sequence, if any.
    pub fn finish(&self) {
        if let Ok(mut display) = self.0.lock() {
            display.finish();
        }
    }
}

/// A progress callback for the download functions, drawing an indicatif bar on a terminal
/// and a log line every 10 % (or 10 s) otherwise, plus the handle that completes it.
pub fn progress_reporter() -> (Reporter, ProgressFn) {
    let display = Arc::new(Mutex::new(Display {
        terminal: std::io::stderr().is_terminal(),
        current: None,
    }));
    let reporter = Reporter(Arc::clone(&display));
    let callback: ProgressFn = Box::new(move |p: &Progress<'_>| {
        if let Ok(mut display) = display.lock() {
            display.update(p);
        }
    });
    (reporter, callback)
}

/// The state of the progress display.
struct Display {
    terminal: bool,
    current: Option<Current>,
}

/// The step being shown.
struct Current {
    stage: Stage,
    file: PathBuf,
    bar: Option<ProgressBar>,
    last_log: Instant,
    last_decile: u64,
    done: u64,
}

impl Display {
    fn update(&mut self, p: &Progress<'_>) {
        let same = self
            .current
            .as_ref()
            .is_some_and(|c| c.stage == p.stage && c.file == p.file);
        if !same {
            self.finish();
            self.start(p);
        }
        let Some(current) = self.current.as_mut() else {
            return;
        };
        current.done = p.done;
        if let Some(bar) = &current.bar {
            if let Some(total) = p.total {
                bar.set_length(total);
            }
            bar.set_position(p.done);
            return;
        }
        // Plain log lines: one per 10 % of a known total, else one every 10 s.
        let decile = p.total.filter(|&t| t > 0).map(|t| p.done * 10 / t);
        let due = match decile {
            Some(d) => d > current.last_decile,
            None => current.last_log.elapsed() >= Duration::from_secs(10),
        };
        if due {
            current.last_decile = decile.unwrap_or(0);
            current.last_log = Instant::now();
            eprintln!(
                "{} {}: {}",
                verb(p.stage),
                name(p.file),
                amount(p.done, p.total)
            );
        }
    }

    fn start(&mut self, p: &Progress<'_>) {
        let resuming = p.stage == Stage::Download && p.done > 0;
        let message = format!(
            "{} {}{}",
            verb(p.stage),
            name(p.file),
            if resuming {
                format!(" (resuming at {})", HumanBytes(p.done))
            } else {
                String::new()
            }
        );
        let bar = if self.terminal {
            let bar = match p.total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            bar.set_message(message);
            bar.set_position(p.done);
            bar.enable_steady_tick(Duration::from_millis(200));
            Some(bar)
        } else {
            eprintln!("{message}...");
            None
        };
        self.current = Some(Current {
            stage: p.stage,
            file: p.file.to_path_buf(),
            bar,
            last_log: Instant::now(),
            last_decile: p.total.filter(|&t| t > 0).map_or(0, |t| p.done * 10 / t),
            done: p.done,
        });
    }

    fn finish(&mut self) {
        if let Some(current) = self.current.take() {
            match current.bar {
                // `abandon` leaves the bar where it stands: full after a success, short of
                // the end after a failure, which the error message then explains.
                Some(bar) => bar.abandon(),
                None => eprintln!(
                    "{} {}: {} in all",
                    verb(current.stage),
                    name(&current.file),
                    HumanBytes(current.done)
                ),
            }
        }
    }
}

fn verb(stage: Stage) -> &'static str {
    match stage {
        Stage::Download => "downloading",
        Stage::Verify => "verifying",
        Stage::Extract => "extracting",
    }
}

fn name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn amount(done: u64, total: Option<u64>) -> String {
    match total {
        Some(t) if t > 0 => format!(
            "{}% ({} of {})",
            done * 100 / t,
            HumanBytes(done),
            HumanBytes(t)
        ),
        _ => HumanBytes(done).to_string(),
    }
}
