//! `cifar-finetune features`: extract (or read from the cache) backbone features and write
//! them to one safetensors file, readable from Python; or, as one worker of a job spread
//! over machines (`--shard-index I --num-shards N`), fill its share of a shared cache.

use std::path::PathBuf;

use anyhow::Context;
use cifar_finetune::data::Part;
use cifar_finetune::data::cifar::Split;
use cifar_finetune::features::{self, Work};

use crate::source::{self, FeatureArgs};

/// Which images to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The training split (training part minus validation).
    Train,
    /// The validation split.
    Val,
    /// The test split.
    Test,
    /// Every image in dataset order, part after part (train, val, test: those the dataset
    /// has); `index` then counts over all of them (CIFAR-10's test images from 50,000, or
    /// from N with --limit N).
    All,
}

/// Environment variables that give a worker's index in the job schedulers people run:
/// Slurm job arrays, Kubernetes Indexed Jobs.
const INDEX_VARS: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

/// Extract backbone features into a safetensors file (`features` f32 [N, D] with D = 2048,
/// or 512 for resnet18/34, `labels` u8 [N], `index` i64 [N]); fills the feature cache as it
/// goes, and resumes from it.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: FeatureArgs,
    /// Which images.
    #[arg(long, value_enum, default_value_t = Which::All)]
    pub split: Which,
    /// Images per backbone forward pass (same as --extract-batch-size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Output file (not written by a worker of a sharded job).
    #[arg(long, default_value = "features.safetensors")]
    pub out: PathBuf,
    /// Spread the extraction over N processes or machines sharing --cache-dir: this one
    /// computes every N-th chunk of --shard-size images, into the same cache files one
    /// process would write; the next train/run reads the cache whole.
    #[arg(long, value_name = "N")]
    pub num_shards: Option<usize>,
    /// This worker's index, 0..N [default: $SLURM_ARRAY_TASK_ID or $JOB_COMPLETION_INDEX].
    #[arg(long, value_name = "I", requires = "num_shards")]
    pub shard_index: Option<usize>,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    if let Some(b) = args.batch_size {
        args.source.extract_batch_size = b;
    }
    if let Some(count) = args.num_shards {
        return run_worker(&args, count);
    }
    let started = std::time::Instant::now();
    let src = &args.source;
    let split = match args.split {
        Which::Train => Some(Split::Train),
        Which::Val => Some(Split::Val),
        Which::Test => Some(Split::Test),
        Which::All => None,
    };
    let (set, backbone_seconds) = match split {
        Some(split) => {
            let loaded = source::load_many(src, &[split])?;
            let set = loaded
                .sets
                .into_iter()
                .next()
                .context("no feature set returned")?;
            (set, loaded.backbone_seconds)
        }
        None => {
            let dataset = src.dataset(&[Part::Train, Part::Test])?;
            // Every file is checked before the first image is extracted.
            for &part in dataset.parts() {
                dataset.labels(part)?;
            }
            let extractor = src.extractor()?;
            let mut all: Option<features::FeatureSet> = None;
            for &part in dataset.parts() {
                let set = source::load_part(src, dataset.as_ref(), &extractor, part)?.set;
                match &mut all {
                    None => all = Some(set),
                    Some(all) => {
                        let offset = all.index.iter().max().map_or(0, |&m| m + 1);
                        all.features.extend(set.features);
                        all.labels.extend(set.labels);
                        all.index.extend(set.index.iter().map(|i| i + offset));
                    }
                }
            }
            let set = all.context("the dataset has no parts")?;
            (set, extractor.backbone_seconds())
        }
    };
    set.write(&args.out)?;
    println!(
        "wrote {} features of {} images to {}\nextractor: {}",
        set.dim,
        set.len(),
        args.out.display(),
        set.extractor
    );
    report_time(started, backbone_seconds);
    Ok(())
}

/// Where the time went: the whole command, and the backbone's share of it.
fn report_time(started: std::time::Instant, backbone: f64) {
    let total = started.elapsed().as_secs_f64();
    println!(
        "time: {total:.1} s, of which the backbone {backbone:.1} s (decoding, resizing, \
         hashing and the cache: {:.1} s)",
        (total - backbone).max(0.0)
    );
}

/// One worker of a sharded extraction: fills its chunks of every part of the dataset.
fn run_worker(args: &Args, count: usize) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let index = match args.shard_index {
        Some(i) => i,
        None => INDEX_VARS
            .iter()
            .find_map(|v| std::env::var(v).ok().map(|value| (v, value)))
            .map(|(var, value)| {
                value
                    .trim()
                    .parse()
                    .with_context(|| format!("${var}={value:?} is not a worker index"))
            })
            .transpose()?
            .with_context(|| {
                format!(
                    "--num-shards {count} needs --shard-index, or ${} / ${} set by the scheduler",
                    INDEX_VARS[0], INDEX_VARS[1]
                )
            })?,
    };
    let work = Work::new(index, count).map_err(|e| anyhow::anyhow!("--shard-index: {e}"))?;
    if args.split != Which::All {
        anyhow::bail!("--num-shards fills the cache of every part: leave --split at all");
    }
    let src = &args.source;
    let dataset = src.dataset(&[Part::Train, Part::Test])?;
    for &part in dataset.parts() {
        dataset.labels(part)?;
    }
    let extractor = src.extractor()?;
    let opts = source::cache_options(src, work)?;
    for &part in dataset.parts() {
        let (mut update, bar) =
            source::progress_bar(format!("features ({part}, shard {index} of {count})"));
        let summary = features::fill_part(
            &extractor,
            dataset.as_ref(),
            part,
            src.limit,
            &opts,
            &mut update,
        );
        bar.finish();
        let summary = summary.with_context(|| format!("extracting the {part} part"))?;
        println!(
            "{part}: shard {index} of {count}: {} computed, {} already cached{}",
            summary.computed,
            summary.cached,
            if summary.skipped.is_empty() {
                String::new()
            } else {
                format!(", {} undecodable left out", summary.skipped.len())
            }
        );
    }
    println!(
        "cache: {} (complete when all {count} shards have run)",
        src.cache_dir().display()
    );
    report_time(started, extractor.backbone_seconds());
    Ok(())
}
