//! `cifar-finetune predict`: classify your own PNG or JPEG images with a trained head.
//!
//! Each image goes through exactly the pipeline the head was trained on — the same backbone,
//! the same weights file (by sha256) and the same preprocessing (resize of the shorter side,
//! normalisation), all read from the checkpoint's features fingerprint — then the frozen
//! backbone and the head. A checkpoint whose fingerprint cannot be reproduced is refused
//! rather than applied to features it was not trained on.

use std::path::PathBuf;

use anyhow::{Context, bail};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::checkpoint;
use cifar_finetune::data::transform::{DEFAULT_MAX_PIXELS, Preprocess, load_image};
use cifar_finetune::features::{Extractor, FeatureSet, Fingerprint};
use cifar_finetune::metrics::top_classes;

use crate::source::{self, Normalize, WeightsArg, backbone_parser};

/// Classify PNG or JPEG images of any size with a trained head; prints the most probable
/// classes of each. The backbone weights and preprocessing must be those the head was trained
/// on: they are checked against the checkpoint's fingerprint.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Head checkpoint written by `train`/`sweep` (`…/best.safetensors`, or its `.json`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images to classify (PNG or JPEG, any size; grey and alpha are converted to RGB).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Print the K most probable classes of each image.
    #[arg(long, default_value_t = 3, value_name = "K")]
    pub top: usize,
    /// Data directory holding torchvision's weights (downloaded there when missing).
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// The backbone [default: the checkpoint's]; another than the checkpoint's is refused.
    #[arg(long, value_parser = backbone_parser(), value_name = "NAME")]
    pub backbone: Option<Arch>,
    /// The backbone's weights: the very ones the head's features came from. `v1` or `v2`:
    /// torchvision's IMAGENET1K_V1/_V2 of the checkpoint's backbone; or a file, .pth or
    /// .safetensors [default: torchvision's file the checkpoint names by its sha256, else v1].
    #[arg(long, value_name = "v1|v2|FILE")]
    pub weights: Option<WeightsArg>,
    /// Shorter image side after resizing [default: the checkpoint's].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Normalisation after ToTensor [default: the checkpoint's].
    #[arg(long, value_enum)]
    pub normalize: Option<Normalize>,
    /// Refuse an image that resizing would make larger than this many pixels (a very thin
    /// image becomes huge when its shorter side is scaled up).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: usize,
    /// Never download the weights: fail if they are missing.
    #[arg(long)]
    pub offline: bool,
}

/// The preprocessing whose fingerprint appears in the checkpoint's `extractor`: the size
/// and centre crop written there (or `--image-size`) with each normalisation allowed by
/// `--normalize`.
fn preprocess_for(extractor: &Fingerprint, args: &Args) -> anyhow::Result<Preprocess> {
    let (recorded_size, crop) = source::recorded_geometry(extractor);
    let size = args.image_size.or(recorded_size).unwrap_or(224);
    let with_crop = |p: Preprocess| match crop {
        Some(c) => p.with_center_crop(c),
        None => p,
    };
    let candidates: Vec<Preprocess> = match args.normalize {
        Some(Normalize::Imagenet) => vec![Preprocess::imagenet(size)],
        Some(Normalize::Half) => vec![Preprocess::half(size)],
        None => vec![Preprocess::imagenet(size), Preprocess::half(size)],
    }
    .into_iter()
    .map(with_crop)
    .collect();
    for p in &candidates {
        if extractor.preprocess == p.fingerprint() {
            return Ok(p.clone());
        }
    }
    bail!(
        "{}: the head was trained on features made with other preprocessing than \
         {} (image size {size}); its features fingerprint is `{extractor}`",
        args.checkpoint.display(),
        match args.normalize {
            Some(Normalize::Imagenet) => "--normalize imagenet",
            Some(Normalize::Half) => "--normalize half",
            None => "either normalisation",
        }
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.top == 0 {
        bail!("invalid --top: must be at least 1");
    }
    let ck = checkpoint::load(&args.checkpoint)?;
    // Every image is read before the (slow) backbone runs, so a bad path fails at once.
    let mut images = Vec::with_capacity(args.images.len());
    for path in &args.images {
        images.push(load_image(path)?);
    }
    let preprocess = Preprocess {
        max_pixels: args.max_pixels,
        ..preprocess_for(&ck.meta.extractor, &args)?
    };
    for (path, (_, h, w)) in args.images.iter().zip(&images) {
        preprocess
            .prepare(*h, *w)
            .with_context(|| format!("{} (--max-pixels {})", path.display(), args.max_pixels))?;
    }
    let arch = source::checkpoint_backbone(&ck, args.backbone, args.weights.as_ref())?;
    // Without --weights: torchvision's file the checkpoint's fingerprint names (v1 or v2),
    // else v1.
    let given = args
        .weights
        .clone()
        .or_else(|| source::checkpoint_weights(&ck));
    let weights = source::resolve_weights(&args.data, &arch, given.as_ref(), args.offline)?;
    // The checkpoint's precision too: bf16 features differ from f32 ones (slightly).
    let precision = ck.meta.extractor.precision;
    let extractor = Extractor::load_arch(&weights, &arch, preprocess, precision)?;
    if *extractor.fingerprint() != ck.meta.extractor {
        bail!(
            "{}: the head was trained on features from `{}`, but {} with this preprocessing \
             gives `{}`; pass the weights file it was trained with (--weights)",
            args.checkpoint.display(),
            ck.meta.extractor,
            weights.display(),
            extractor.fingerprint()
        );
    }

    let names = &ck.meta.classes;
    let k = args.top.min(names.len());
    // 12 columns as ever, more for a longer name (`large_man-made_outdoor_things`).
    let width = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .max(12);
    for (path, (chw, h, w)) in args.images.iter().zip(&images) {
        let features = extractor
            .extract(&[chw.as_slice()], *h, *w)
            .with_context(|| format!("extracting the features of {}", path.display()))?;
        let set = FeatureSet {
            features,
            labels: vec![0],
            index: vec![0],
            dim: extractor.feature_dim(),
            extractor: extractor.fingerprint().clone(),
            classes: names.clone(),
        };
        ck.check_features(&set)?;
        // [1, classes]
        let probabilities = ck.head.probabilities(&set.features)?;
        // As `test`, never print NaN as a probability: the head's outputs overflowed.
        if probabilities.iter().any(|p| !p.is_finite()) {
            bail!(
                "{}: the head's outputs are not finite on the features of {}, so it gives no \
                 probabilities",
                args.checkpoint.display(),
                path.display()
            );
        }
        println!("{} ({w}×{h})", path.display());
        for (rank, (class, p)) in top_classes(&probabilities, k).into_iter().enumerate() {
            println!(
                "  {}. {:<width$} {:>6.2}%",
                rank + 1,
                names[class],
                f64::from(p) * 100.0
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability_then_class() {
        let p = [0.1, 0.4, 0.1, 0.4];
        assert_eq!(top_classes(&p, 3), vec![(1, 0.4), (3, 0.4), (0, 0.1)]);
        assert_eq!(top_classes(&p, 10).len(), 4);
    }
}
