//! `cifar-finetune features`: extract (or read from the cache) backbone features and write
//! them to one safetensors file, readable from Python.

use std::path::PathBuf;

use cifar_finetune::data::cifar::{Part, Split};

use crate::source::{self, FeatureArgs};

/// Which images to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The training split (training part minus validation).
    Train,
    /// The validation split.
    Val,
    /// The test part.
    Test,
    /// Every image in dataset order: the training part, then the test part; `index` then
    /// counts over all of them (the test images from 50,000, or from N with --limit N).
    All,
}

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
    /// Output file.
    #[arg(long, default_value = "features.safetensors")]
    pub out: PathBuf,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    if let Some(b) = args.batch_size {
        args.source.extract_batch_size = b;
    }
    let src = &args.source;
    let set = match args.split {
        Which::Train => source::load(src, Split::Train)?,
        Which::Val => source::load(src, Split::Val)?,
        Which::Test => source::load(src, Split::Test)?,
        Which::All => {
            let dataset = src.dataset(&[Part::Train, Part::Test])?;
            let extractor = src.extractor()?;
            let mut all = source::load_part(src, &dataset, &extractor, Part::Train)?;
            let offset = all.len() as u32;
            let test = source::load_part(src, &dataset, &extractor, Part::Test)?;
            all.features.extend(test.features);
            all.labels.extend(test.labels);
            all.index.extend(test.index.iter().map(|i| i + offset));
            all
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
    Ok(())
}
