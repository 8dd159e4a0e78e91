//! `cifar-finetune predict`: a user's own images through the same weights and preprocessing
//! as the head's training features, and clear errors for bad input.

#[path = "common/shared_dir.rs"]
mod shared_dir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use shared_dir::shared_dir;

use cifar_finetune::backbone::weights;
use cifar_finetune::checkpoint::{self, CheckpointKind, CheckpointMeta};
use cifar_finetune::data::cifar::CLASSES;
use cifar_finetune::data::transform::{Preprocess, load_image};
use cifar_finetune::features::{Extractor, Fingerprint};
use cifar_finetune::head::Head;
use cifar_finetune::rundir::{HistoryRow, TrainConfig};

/// A temporary directory with a full synthetic ResNet-50 (`resnet50.safetensors`), a head
/// checkpoint trained (nominally) on its features at image size 32 with ImageNet
/// normalisation (`best.safetensors`), and test images. Made once per test binary.
fn setup() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shared_dir("predict");
        let p = dir.as_path();
        let w = p.join("resnet50.safetensors");
        weights::write_safetensors(&weights::synthetic_state_dict().unwrap(), &w).unwrap();
        let ex = Extractor::load(&w, Preprocess::imagenet(32)).unwrap();
        write_checkpoint(&p.join("best.safetensors"), ex.fingerprint(), 1.0);
        // The same head, claiming features from other weights.
        let mut other = ex.fingerprint().clone();
        other.weights_sha256.insert_str(0, "0000");
        write_checkpoint(&p.join("other.safetensors"), &other, 1.0);
        // Finite weights so large that the head's outputs overflow.
        write_checkpoint(&p.join("huge.safetensors"), ex.fingerprint(), 1e37);

        // A landscape PNG, a portrait JPEG, a grey PNG; and a text file posing as a PNG.
        let png = image::RgbImage::from_fn(50, 37, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
        });
        png.save(p.join("landscape.png")).unwrap();
        let jpg = image::RgbImage::from_fn(40, 64, |x, y| {
            image::Rgb([200 - (y * 2) as u8, (x * 4) as u8, 90])
        });
        jpg.save(p.join("portrait.jpg")).unwrap();
        image::GrayImage::from_fn(33, 33, |x, _| image::Luma([(x * 7) as u8]))
            .save(p.join("grey.png"))
            .unwrap();
        std::fs::write(p.join("notes.png"), "not an image").unwrap();
        dir
    })
}

/// A head of random weights times `scale`.
fn write_checkpoint(path: &Path, extractor: &Fingerprint, scale: f32) {
    let mut head = Head::init(2048, 32, 10, 11).unwrap();
    for w in head.w1.iter_mut().chain(&mut head.w2) {
        *w *= scale;
    }
    let meta = CheckpointMeta {
        format: checkpoint::FORMAT.to_string(),
        kind: CheckpointKind::Best,
        lambda: 0.001,
        epoch: 3,
        dims: head.dims,
        extractor: extractor.clone(),
        classes: cifar_finetune::data::cifar::class_names(),
        config: TrainConfig::default(),
        metrics: HistoryRow {
            lambda: 0.001,
            epoch: 3,
            train_loss: 1.0,
            train_penalty: 0.01,
            val_loss: Some(1.1),
            val_accuracy: Some(0.6),
        },
        state: None,
    };
    checkpoint::save(path, &head, None, &meta).unwrap();
}

fn predict(args: &[&str]) -> Output {
    let dir = setup();
    Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .current_dir(dir)
        .arg("predict")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The probabilities the library gives for one image file.
fn expected(path: &Path) -> Vec<f32> {
    let dir = setup();
    let ex = Extractor::load(&dir.join("resnet50.safetensors"), Preprocess::imagenet(32)).unwrap();
    let ck = checkpoint::load(&dir.join("best.safetensors")).unwrap();
    let (chw, h, w) = load_image(path).unwrap();
    let f = ex.extract(&[&chw], h, w).unwrap();
    ck.head.probabilities(&f).unwrap()
}

#[test]
fn prints_the_top_classes_of_each_image() {
    let out = predict(&[
        "--checkpoint",
        "best.safetensors",
        "--weights",
        "resnet50.safetensors",
        "--top",
        "2",
        "landscape.png",
        "portrait.jpg",
        "grey.png",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{}", stdout, text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 9, "{stdout}");
    assert_eq!(lines[0], "landscape.png (50×37)");
    assert_eq!(lines[3], "portrait.jpg (40×64)");
    assert_eq!(lines[6], "grey.png (33×33)");
    for (block, file) in ["landscape.png", "portrait.jpg", "grey.png"]
        .iter()
        .enumerate()
    {
        let probs = expected(&setup().join(file));
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let mut order: Vec<usize> = (0..10).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        for rank in 0..2 {
            let c = order[rank];
            let want = format!(
                "  {}. {:<12} {:>6.2}%",
                rank + 1,
                CLASSES[c],
                probs[c] as f64 * 100.0
            );
            assert_eq!(lines[block * 3 + 1 + rank], want, "{file}");
        }
    }
}

#[test]
fn default_top_is_three_and_too_large_a_k_shows_every_class() {
    let out = predict(&[
        "--checkpoint",
        "best.safetensors",
        "--weights",
        "resnet50.safetensors",
        "landscape.png",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 4);
    let out = predict(&[
        "--checkpoint",
        "best.json",
        "--weights",
        "resnet50.safetensors",
        "--top",
        "50",
        "landscape.png",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 11);
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = predict(args);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "should fail: {args:?}\n{}",
        text(&out.stdout)
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks `{n}`: {stderr}");
    }
}

#[test]
fn overflowing_outputs_give_no_probabilities() {
    fails_with(
        &[
            "--checkpoint",
            "huge.safetensors",
            "--weights",
            "resnet50.safetensors",
            "--offline",
            "landscape.png",
        ],
        &["huge.safetensors", "landscape.png", "not finite"],
    );
}

#[test]
fn a_missing_image_is_named() {
    fails_with(
        &[
            "--checkpoint",
            "best.safetensors",
            "--weights",
            "resnet50.safetensors",
            "landscape.png",
            "no-such-photo.jpg",
        ],
        &["no-such-photo.jpg"],
    );
}

#[test]
fn an_undecodable_image_is_named() {
    fails_with(
        &[
            "--checkpoint",
            "best.safetensors",
            "--weights",
            "resnet50.safetensors",
            "notes.png",
        ],
        &["notes.png", "cannot decode"],
    );
}

#[test]
fn other_weights_or_preprocessing_are_refused() {
    fails_with(
        &[
            "--checkpoint",
            "other.safetensors",
            "--weights",
            "resnet50.safetensors",
            "landscape.png",
        ],
        &["other.safetensors", "--weights"],
    );
    fails_with(
        &[
            "--checkpoint",
            "best.safetensors",
            "--weights",
            "resnet50.safetensors",
            "--normalize",
            "half",
            "landscape.png",
        ],
        &["best.safetensors", "preprocessing"],
    );
    fails_with(
        &[
            "--checkpoint",
            "best.safetensors",
            "--weights",
            "resnet50.safetensors",
            "--image-size",
            "64",
            "landscape.png",
        ],
        &["preprocessing", "image size 64"],
    );
}

#[test]
fn bad_flags_and_checkpoints_are_named() {
    fails_with(
        &[
            "--checkpoint",
            "best.safetensors",
            "--weights",
            "resnet50.safetensors",
            "--top",
            "0",
            "landscape.png",
        ],
        &["--top"],
    );
    fails_with(
        &[
            "--checkpoint",
            "missing.safetensors",
            "--weights",
            "resnet50.safetensors",
            "landscape.png",
        ],
        &["missing.safetensors"],
    );
    fails_with(
        &[
            "--checkpoint",
            "best.safetensors",
            "--weights",
            "nowhere.pth",
            "landscape.png",
        ],
        &["nowhere.pth"],
    );
    fails_with(&["--checkpoint", "best.safetensors"], &["IMAGE"]);
}

#[test]
fn a_very_thin_image_is_refused_before_it_can_exhaust_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let thin = tmp.path().join("thin.png");
    image::RgbImage::from_fn(4000, 1, |x, _| image::Rgb([x as u8, 0, 0]))
        .save(&thin)
        .unwrap();
    let out = predict(&[
        "--checkpoint",
        "best.safetensors",
        "--weights",
        "resnet50.safetensors",
        thin.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    // At the checkpoint's image size 32, the 1×4000 image would become 32×128000.
    assert!(
        err.contains("thin.png") && err.contains("32×128000") && err.contains("--max-pixels"),
        "{err}"
    );
}
