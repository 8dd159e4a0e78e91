//! The whole pipeline learns, in f32 and in bf16 alike: colour-coded synthetic classes in the
//! real CIFAR-10 binary format → fast backbone (synthetic ResNet-50 weights) → feature cache →
//! head training → test evaluation. A random-weight ResNet-50 still separates colours, so both
//! precisions must classify the held-out images perfectly, from features that agree to a
//! cosine of 0.999 or more.

use std::path::Path;

use cifar_finetune::backbone::fast::{FastResNet, Precision};
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::{self, Cifar10, Part, Split};
use cifar_finetune::data::transform::Preprocess;
use cifar_finetune::evaluate;
use cifar_finetune::features::{self, CacheOptions, Extractor, FeatureSet};
use cifar_finetune::rundir::TrainConfig;
use cifar_finetune::train::{self, RunOptions, SweepOutcome};

/// Records per training batch file (5 files) and in the test file.
const PER_FILE: usize = 20;

/// Class `c`'s image `i`: a class colour plus a per-image texture, R, G, B planes.
fn image(c: usize, i: usize) -> Vec<u8> {
    let base = [
        (c * 25) as i32,
        (250 - c * 25) as i32,
        ((c * 67) % 256) as i32,
    ];
    let mut px = Vec::with_capacity(cifar::IMAGE_BYTES);
    for (ch, b) in base.iter().enumerate() {
        for y in 0..32i32 {
            for x in 0..32i32 {
                let t = ((x * 7 + y * 13 + (i as i32) * 31 + ch as i32 * 5) % 41) - 20;
                px.push((b + t).clamp(0, 255) as u8);
            }
        }
    }
    px
}

fn write_dataset(dir: &Path) {
    let bin = dir.join(cifar::BIN_DIR);
    std::fs::create_dir_all(&bin).unwrap();
    let mut k = 0;
    let mut batch = |name: &str| {
        let mut bytes = Vec::new();
        for _ in 0..PER_FILE {
            let c = k % 10;
            bytes.push(c as u8);
            bytes.extend(image(c, k));
            k += 1;
        }
        std::fs::write(bin.join(name), bytes).unwrap();
    };
    for b in 1..=5 {
        batch(&format!("data_batch_{b}.bin"));
    }
    batch("test_batch.bin");
    std::fs::write(
        bin.join("batches.meta.txt"),
        cifar::CLASSES.join("\n") + "\n",
    )
    .unwrap();
}

struct Run {
    test_accuracy: f64,
    test_features: FeatureSet,
}

fn run(dir: &Path, precision: Precision) -> Run {
    let sd = StateDict::from_tensors("synthetic", weights::synthetic_state_dict().unwrap());
    let model = FastResNet::from_state_dict(sd, precision).unwrap();
    let ex = Extractor::new_fast(model, Preprocess::imagenet(32), "synthetic");
    assert_eq!(ex.fingerprint().precision, precision);
    let opts = CacheOptions {
        batch_size: 16,
        shard_size: 64,
        ..CacheOptions::new(dir.join("cache"))
    };
    let cifar = Cifar10::open(dir).unwrap();
    let part = |p| {
        features::cached_part(&ex, &cifar, p, None, &opts, &mut |_| {})
            .unwrap()
            .set
    };
    let whole = part(Part::Train);
    let test = part(Part::Test);
    let (tr, va) = cifar::split_indices(whole.len(), 20, 0).unwrap();
    let (train_set, val_set) = (whole.select(&tr), whole.select(&va));
    let cfg = TrainConfig {
        epochs: 40,
        lr: 1e-3,
        ..TrainConfig::default()
    };
    let run_dir = dir.join(format!("run-{precision}"));
    let outcome = train::sweep(
        &train_set,
        &val_set,
        &[0.0],
        &cfg,
        &run_dir,
        &RunOptions::default(),
        &mut |_| std::ops::ControlFlow::Continue(()),
    )
    .unwrap();
    let SweepOutcome::Finished(summary) = outcome else {
        panic!("the sweep stopped early")
    };
    let ck = checkpoint::load(&run_dir.join(&summary.chosen_checkpoint)).unwrap();
    let eval = evaluate::evaluate(&ck, &test, Split::Test).unwrap();
    Run {
        test_accuracy: eval.metrics.accuracy,
        test_features: test,
    }
}

#[test]
fn f32_and_bf16_features_train_heads_with_the_same_test_accuracy() {
    // Dropped (and removed) when the test ends.
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    let f32_run = run(dir.path(), Precision::F32);
    let bf16_run = run(dir.path(), Precision::Bf16);
    let (a, b) = (&f32_run.test_features, &bf16_run.test_features);
    assert_eq!(a.len(), PER_FILE);
    for i in 0..a.len() {
        let (x, y) = (a.row(i), b.row(i));
        let dot: f64 = x.iter().zip(y).map(|(p, q)| f64::from(p * q)).sum();
        let norm = |v: &[f32]| v.iter().map(|p| f64::from(p * p)).sum::<f64>().sqrt();
        let cosine = dot / (norm(x) * norm(y));
        assert!(cosine >= 0.999, "image {i}: cosine {cosine}");
    }
    assert_ne!(
        a.extractor, b.extractor,
        "the precision is part of the fingerprint"
    );
    assert_eq!(
        f32_run.test_accuracy, 1.0,
        "f32 pipeline did not learn the colours"
    );
    assert_eq!(bf16_run.test_accuracy, f32_run.test_accuracy);
}
