//! The dataset seam: a dataset other than CIFAR-10 — three classes, images of two sizes —
//! goes through feature extraction, training, checkpoints and evaluation, and its class
//! names and count flow to every stage.

use std::borrow::Cow;
use std::ops::ControlFlow;

use cifar_finetune::backbone::fast::Precision;
use cifar_finetune::backbone::resnet::ResNet50;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::Split;
use cifar_finetune::data::transform::Preprocess;
use cifar_finetune::data::{Dataset, Image, Part};
use cifar_finetune::evaluate;
use cifar_finetune::features::{self, CacheOptions, Extractor, FeatureSet, Fingerprint};
use cifar_finetune::rundir::{RunConfig, TrainConfig};
use cifar_finetune::train::{self, RunOptions, SweepOutcome};
use cifar_finetune::{Error, Result};

/// Three classes; each image is `(height, width, label)`, its pixels a function of its index.
#[derive(Debug)]
struct Shapes {
    classes: Vec<String>,
    sizes: Vec<(usize, usize)>,
    labels: Vec<u8>,
}

impl Shapes {
    fn new() -> Self {
        // Two sizes, not grouped: the extraction must split each batch into runs of one size.
        let sizes = [
            (32, 32),
            (32, 32),
            (24, 40),
            (32, 32),
            (24, 40),
            (24, 40),
            (32, 32),
        ];
        Shapes {
            classes: ["circle", "square", "triangle"].map(String::from).to_vec(),
            sizes: sizes.to_vec(),
            labels: vec![0, 2, 1, 1, 0, 2, 2],
        }
    }

    fn pixels(&self, index: usize) -> Vec<u8> {
        let (h, w) = self.sizes[index];
        (0..3 * h * w)
            .map(|k| ((k * 7 + index * 31) % 251) as u8)
            .collect()
    }
}

impl Dataset for Shapes {
    fn name(&self) -> &str {
        "shapes"
    }

    fn parts(&self) -> &[Part] {
        &[Part::Train]
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn fingerprint(&self, part: Part) -> Result<Vec<(String, String)>> {
        Ok(vec![(format!("shapes-{part}"), "5e".repeat(32))])
    }

    fn labels(&self, part: Part) -> Result<&[u8]> {
        match part {
            Part::Train => Ok(&self.labels),
            Part::Val | Part::Test => Err(Error::invalid("part", "shapes has only a train part")),
        }
    }

    fn image(&self, _part: Part, index: usize) -> Result<Image<'_>> {
        let (height, width) = self.sizes[index];
        Ok(Image {
            pixels: Cow::Owned(self.pixels(index)),
            height,
            width,
        })
    }
}

#[test]
fn features_of_another_dataset_carry_its_classes_and_mixed_sizes() {
    let shapes = Shapes::new();
    let sd = weights::synthetic_state_dict().unwrap();
    let model = ResNet50::from_state_dict(StateDict::from_tensors("synthetic", sd)).unwrap();
    let ex = Extractor::new(model, Preprocess::imagenet(32), "synthetic");
    let cache = tempfile::tempdir().unwrap();
    let opts = CacheOptions {
        batch_size: 4,
        shard_size: 5,
        ..CacheOptions::new(cache.path())
    };
    let set = features::cached_part(&ex, &shapes, Part::Train, None, &opts, &mut |_| {})
        .unwrap()
        .set;
    assert_eq!(set.classes, shapes.classes);
    assert_eq!(set.labels, shapes.labels);
    assert_eq!(set.len(), 7);
    // Each row equals the image extracted alone.
    for i in [0, 2, 6] {
        let (h, w) = shapes.sizes[i];
        let alone = ex.extract(&[shapes.pixels(i).as_slice()], h, w).unwrap();
        let row = set.row(i);
        let err = row
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs() / (b.abs() + 1e-3))
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "image {i}: relative error {err}");
    }
    // Read back from the cache, classes included.
    let again = features::cached_part(&ex, &shapes, Part::Train, None, &opts, &mut |_| {})
        .unwrap()
        .set;
    assert_eq!(again, set);
}

/// `n` samples of 3 well-separated Gaussian-ish blobs in `dim` dimensions.
fn blobs(n: usize, dim: usize, seed: usize, classes: &[String]) -> FeatureSet {
    let mut features = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = (i * 7 + seed) % classes.len();
        labels.push(c as u8);
        for k in 0..dim {
            let noise = (((i * 131 + k * 17 + seed * 7) % 97) as f32 / 97.0 - 0.5) * 0.6;
            features.push(if k % classes.len() == c { 2.0 } else { 0.0 } + noise);
        }
    }
    FeatureSet {
        features,
        labels,
        index: (0..n as u32).collect(),
        dim,
        extractor: Fingerprint {
            backbone: "synthetic".into(),
            weights_sha256: "00".into(),
            preprocess: "synthetic".into(),
            precision: Precision::F32,
        },
        classes: classes.to_vec(),
    }
}

#[test]
fn three_classes_flow_through_training_checkpoints_and_evaluation() {
    let classes: Vec<String> = ["circle", "square", "triangle"].map(String::from).to_vec();
    let (tr, va) = (blobs(120, 12, 1, &classes), blobs(45, 12, 2, &classes));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = TrainConfig {
        lr: 0.02,
        epochs: 3,
        seed: 3,
        ..TrainConfig::default()
    };
    let outcome = train::sweep(
        &tr,
        &va,
        &[0.0],
        &cfg,
        &dir,
        &RunOptions::default(),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let SweepOutcome::Finished(summary) = outcome else {
        panic!("the sweep stopped");
    };

    let config = RunConfig::read(&dir).unwrap();
    assert_eq!((config.classes, &config.class_names), (3, &classes));

    let ck = checkpoint::load(&dir.join(&summary.chosen_checkpoint)).unwrap();
    assert_eq!(ck.head.dims.classes, 3);
    assert_eq!(ck.meta.classes, classes);

    let eval = evaluate::evaluate(&ck, &va, Split::Val).unwrap();
    let m = &eval.metrics;
    assert_eq!(m.class_names, classes);
    assert_eq!(m.per_class_accuracy.len(), 3);
    assert_eq!(m.metrics.classes.len(), 3);
    assert_eq!(eval.probabilities.len(), 45 * 3);
    assert!(m.accuracy > 0.9, "accuracy {}", m.accuracy);

    // Features labelled with other classes are refused, naming both lists.
    let mut other = va.clone();
    other.classes[2] = "hexagon".into();
    let err = evaluate::evaluate(&ck, &other, Split::Val)
        .unwrap_err()
        .to_string();
    assert!(err.contains("triangle") && err.contains("hexagon"), "{err}");
    // Training and validation features must agree on the classes.
    let err = train::sweep(
        &tr,
        &other,
        &[0.0],
        &cfg,
        &tmp.path().join("other"),
        &RunOptions::default(),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hexagon"), "{err}");
}

/// A folder-like dataset whose images can be added, changed or made undecodable: image `i`
/// is `(seed, label)`, its 24×24 pixels a function of the seed; `bad` images fail to decode.
#[derive(Debug)]
struct Files {
    classes: Vec<String>,
    images: Vec<(usize, u8)>,
    labels: Vec<u8>,
    bad: Vec<usize>,
}

impl Files {
    fn new(images: Vec<(usize, u8)>, bad: Vec<usize>) -> Self {
        Files {
            classes: ["a", "b"].map(String::from).to_vec(),
            labels: images.iter().map(|&(_, l)| l).collect(),
            images,
            bad,
        }
    }

    fn path(index: usize) -> std::path::PathBuf {
        format!("root/img-{index:03}.jpg").into()
    }
}

impl Dataset for Files {
    fn name(&self) -> &str {
        "files"
    }

    fn parts(&self) -> &[Part] {
        &[Part::Train]
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn fingerprint(&self, _part: Part) -> Result<Vec<(String, String)>> {
        Ok(vec![("folder".into(), "root".into())])
    }

    fn labels(&self, _part: Part) -> Result<&[u8]> {
        Ok(&self.labels)
    }

    /// As a dataset of files does: the key of the file's bytes, which exist even when they
    /// do not decode.
    fn image_keys(&self, _part: Part) -> Result<Vec<u128>> {
        Ok(self
            .images
            .iter()
            .map(|&(seed, _)| xxhash_rust::xxh3::xxh3_128(&seed.to_le_bytes()))
            .collect())
    }

    fn image(&self, _part: Part, index: usize) -> Result<Image<'_>> {
        if self.bad.contains(&index) {
            return Err(Error::BadImage {
                path: Files::path(index),
                msg: "not a JPEG file: starts with 0x89 0x50".into(),
            });
        }
        let seed = self.images[index].0;
        Ok(Image {
            pixels: Cow::Owned((0..3 * 24 * 24).map(|k| ((k * seed) % 253) as u8).collect()),
            height: 24,
            width: 24,
        })
    }
}

fn tiny_extractor() -> Extractor {
    let sd = weights::synthetic_state_dict().unwrap();
    let model = ResNet50::from_state_dict(StateDict::from_tensors("synthetic", sd)).unwrap();
    Extractor::new(model, Preprocess::imagenet(24), "synthetic")
}

/// The features of `files` with shards of 3, and (computed, cached) as last reported.
fn extract_files(
    ex: &Extractor,
    files: &Files,
    cache: &std::path::Path,
    skip_bad: bool,
) -> (Result<features::PartFeatures>, (usize, usize)) {
    let opts = CacheOptions {
        batch_size: 2,
        shard_size: 3,
        skip_bad,
        ..CacheOptions::new(cache)
    };
    let mut last = (0, 0);
    let got = features::cached_part(ex, files, Part::Train, None, &opts, &mut |p| {
        last = (p.done - p.cached, p.cached)
    });
    (got, last)
}

#[test]
fn added_images_are_the_only_ones_extracted_and_a_changed_one_is_redone() {
    let ex = tiny_extractor();
    let cache = tempfile::tempdir().unwrap();
    let first = Files::new((1..=6).map(|s| (s, (s % 2) as u8)).collect(), vec![]);
    let (a, (computed, cached)) = extract_files(&ex, &first, cache.path(), false);
    let a = a.unwrap().set;
    assert_eq!((computed, cached), (6, 0));

    // Two files added, one sorting between the old ones: rows shift, nothing is redone.
    let mut images = first.images.clone();
    images.insert(2, (40, 1));
    images.push((41, 0));
    let grown = Files::new(images, vec![]);
    let (b, (computed, cached)) = extract_files(&ex, &grown, cache.path(), false);
    let b = b.unwrap().set;
    assert_eq!((computed, cached), (2, 6));
    assert_eq!(b.len(), 8);
    assert_eq!(b.row(0), a.row(0));
    assert_eq!(b.row(3), a.row(2), "the old third image moved to row 3");
    assert_eq!(b.labels, grown.labels);

    // A file whose content changed is extracted again; the others are not.
    let mut images = grown.images.clone();
    images[5].0 = 77;
    let changed = Files::new(images, vec![]);
    let (c, (computed, cached)) = extract_files(&ex, &changed, cache.path(), false);
    let c = c.unwrap().set;
    assert_eq!((computed, cached), (1, 7));
    assert_ne!(c.row(5), b.row(5));
    assert_eq!(c.row(4), b.row(4));
}

#[test]
fn undecodable_images_are_listed_or_skipped_never_dropped() {
    let ex = tiny_extractor();
    let cache = tempfile::tempdir().unwrap();
    let files = Files::new((1..=7).map(|s| (s, (s % 2) as u8)).collect(), vec![1, 4]);

    // By default: an error naming both files, after caching every good image.
    let (got, _) = extract_files(&ex, &files, cache.path(), false);
    let err = got.unwrap_err().to_string();
    assert!(
        err.contains("2 image(s)")
            && err.contains("root/img-001.jpg")
            && err.contains("root/img-004.jpg")
            && err.contains("0x89")
            && err.contains("--skip-bad"),
        "{err}"
    );

    // --skip-bad: the good images (from the cache), the bad ones listed with their rows.
    let (got, (computed, cached)) = extract_files(&ex, &files, cache.path(), true);
    let got = got.unwrap();
    // Nothing is extracted again: the 2 not from the cache are the bad ones, tried again.
    assert_eq!((computed, cached), (2, 5));
    assert_eq!(got.set.index, vec![0, 2, 3, 5, 6]);
    assert_eq!(
        got.set.labels,
        [0, 2, 3, 5, 6].map(|i| files.labels[i]).to_vec()
    );
    let skipped: Vec<(usize, String)> = got
        .skipped
        .iter()
        .map(|s| (s.index, s.path.display().to_string()))
        .collect();
    assert_eq!(
        skipped,
        vec![
            (1, "root/img-001.jpg".into()),
            (4, "root/img-004.jpg".into())
        ]
    );

    // Many bad files: the first 20 by name, then a count.
    let many = Files::new((101..=126).map(|s| (s, 0)).collect(), (0..25).collect());
    let (got, _) = extract_files(&ex, &many, cache.path(), false);
    let err = got.unwrap_err().to_string();
    assert!(
        err.contains("25 image(s)")
            && err.contains("root/img-019.jpg")
            && !err.contains("root/img-020.jpg")
            && err.contains("and 5 more"),
        "{err}"
    );
}
