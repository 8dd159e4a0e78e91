//! The course script's settings (`--preset original`), the activation flag and evaluating the
//! validation split (`test --split val`), end to end through the binary: fixture-sized
//! CIFAR-10 files and a synthetic ResNet-50 at image size 32, as tests/cli_train.rs.

#[path = "common/cli_fixture.rs"]
mod cli_fixture;
#[path = "common/shared_dir.rs"]
mod shared_dir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use cli_fixture::{FIXTURE_FLAGS, cli_fixture_dir};

use cifar_finetune::checkpoint;
use cifar_finetune::data::transform::Preprocess;
use cifar_finetune::evaluate::{self, TestMetrics};
use cifar_finetune::head::Activation;
use cifar_finetune::metrics::{Metrics, top_k_accuracy};
use cifar_finetune::rundir;
use cifar_finetune::rundir::{RunConfig, Summary};

struct Setup {
    root: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let root = cli_fixture_dir("preset");
        Setup { root }
    })
}

/// Runs the binary in the setup's directory with the fixture data and synthetic weights.
fn cli(args: &[&str]) -> Output {
    run_ok(args, true)
}

/// `report`, which takes no feature flags.
fn report(dir: &Path) {
    run_ok(
        &[
            "report",
            "--run-dir",
            dir.to_str().unwrap(),
            "--gallery",
            "0",
        ],
        false,
    );
}

fn run_ok(args: &[&str], feature_flags: bool) -> Output {
    let root = &setup().root;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
    cmd.current_dir(root).args(args);
    if feature_flags {
        // The tests run at once, and the first ones all fill the shared cache.
        cmd.args(FIXTURE_FLAGS).arg("--wait-lock");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_dir(name: &str) -> PathBuf {
    setup().root.join("runs").join(name)
}

/// The course script, setting by setting.
fn assert_original(cfg: &RunConfig, lr: f32) {
    let t = &cfg.train;
    assert_eq!(
        t.activation,
        Activation::None,
        "no activation between fc1 and fc2"
    );
    assert_eq!(t.dropout, 0.5, "nn.Dropout(p=0.5)");
    assert_eq!(t.batch_size, 4, "DataLoader(batch_size=4)");
    assert_eq!(t.lr, lr);
    assert_eq!(t.momentum, 0.9, "SGD(momentum=0.9)");
    assert_eq!(t.epochs, 10, "10 epochs");
    assert_eq!(t.hidden, 32, "Linear(2048, 32)");
    assert_eq!(cfg.lambdas, vec![0.0], "no L2");
    assert_eq!(
        cfg.source["normalize"], "half",
        "Normalize((0.5,)*3, (0.5,)*3)"
    );
    assert_eq!(
        cfg.source["image_size"], 32,
        "the explicit --image-size of this test"
    );
    assert_eq!(
        cfg.extractor.preprocess,
        Preprocess::half(32).fingerprint(),
        "{}",
        cfg.extractor
    );
    assert_eq!(cfg.options["preset"], "original");
    assert_eq!(
        cfg.options["report_every"], 20,
        "the mean loss of 20 mini-batches"
    );
}

#[test]
fn preset_original_is_the_course_script() {
    let dir = run_dir("original");
    let out = cli(&[
        "sweep",
        "--preset",
        "original",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    let cfg = RunConfig::read(&dir).unwrap();
    assert_original(&cfg, 0.001);
    // The raw JSON, field by field, as a reader of config.json sees it.
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let t = &raw["train"];
    assert_eq!(t["activation"], "none");
    assert_eq!(t["dropout"], 0.5);
    assert_eq!(t["batch_size"], 4);
    assert_eq!(t["lr"], 0.001);
    assert_eq!(t["momentum"], 0.9);
    assert_eq!(t["epochs"], 10);
    assert_eq!(raw["lambdas"], serde_json::json!([0.0]));
    // The checkpoint records the activation, and test/report read it back.
    let summary = Summary::read(&dir).unwrap();
    let ck = checkpoint::load(&dir.join(&summary.chosen_checkpoint)).unwrap();
    assert_eq!(ck.head.activation, Activation::None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[10,     3] loss: "), "{stdout}");
    // `test` finds the half normalisation in the checkpoint without being told.
    cli(&[
        "test",
        "--checkpoint",
        dir.join(&summary.chosen_checkpoint).to_str().unwrap(),
    ]);
    let m = TestMetrics::read(&dir.join("metrics.json")).unwrap();
    assert_eq!(m.extractor, cfg.extractor);
    report(&dir);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        html.contains("→ 32 → no activation → 10, dropout 0.5"),
        "head row"
    );
    assert!(
        html.contains("<td>option: preset</td><td><code>original</code></td>"),
        "preset row"
    );
}

#[test]
fn flags_given_with_the_preset_override_only_themselves() {
    let dir = run_dir("original-lr");
    cli(&[
        "train",
        "--preset",
        "original",
        "--lr",
        "0.01",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    let cfg = RunConfig::read(&dir).unwrap();
    assert_original(&cfg, 0.01);
}

#[test]
fn without_a_preset_the_defaults_are_ours() {
    let dir = run_dir("defaults");
    cli(&["train", "--epochs", "1", "--run-dir", dir.to_str().unwrap()]);
    let cfg = RunConfig::read(&dir).unwrap();
    assert_eq!(cfg.train.activation, Activation::Relu);
    assert_eq!(cfg.train.dropout, 0.0);
    assert_eq!(cfg.train.lr, 0.001);
    assert_eq!(cfg.train.batch_size, 4);
    assert_eq!(cfg.source["normalize"], "imagenet");
    assert_eq!(cfg.options["preset"], serde_json::Value::Null);
    assert_eq!(cfg.options["report_every"], 2000);
    let dir2 = run_dir("linear");
    cli(&[
        "train",
        "--epochs",
        "1",
        "--activation",
        "none",
        "--run-dir",
        dir2.to_str().unwrap(),
    ]);
    let cfg2 = RunConfig::read(&dir2).unwrap();
    assert_eq!(cfg2.train.activation, Activation::None);
    assert_eq!(cfg2.source["normalize"], "imagenet");
}

/// `test --split val` scores exactly the run's validation rows; its metrics are those of the
/// sklearn-checked functions (tests/metrics.rs) on predictions-val.csv, and top-5 is
/// `top_k_accuracy_score`'s (checked against sklearn there too).
#[test]
fn test_split_val_scores_the_validation_rows() {
    let dir = run_dir("val");
    cli(&[
        "sweep",
        "--lambdas",
        "0,0.01",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    let summary = Summary::read(&dir).unwrap();
    let ck_path = dir.join(&summary.chosen_checkpoint);
    let out = cli(&[
        "test",
        "--checkpoint",
        ck_path.to_str().unwrap(),
        "--split",
        "val",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("val split: 5 images"), "{stdout}");
    assert!(stdout.contains("top-5 accuracy"), "{stdout}");
    let m = TestMetrics::read(&dir.join("metrics-val.json")).unwrap();
    assert_eq!(m.split.as_str(), "val");
    assert_eq!(m.count, 5);
    let (_, rows) = evaluate::read_predictions(&dir.join("predictions-val.csv")).unwrap();
    // The validation rows of the split the run was trained with.
    let (_, val_idx) = cifar_finetune::data::cifar::split_indices(15, 5, 0).unwrap();
    let mut idx: Vec<u32> = rows.iter().map(|r| r.index).collect();
    idx.sort();
    let mut want: Vec<u32> = val_idx.iter().map(|&i| i as u32).collect();
    want.sort();
    assert_eq!(idx, want);
    // The validation loss and accuracy are those the sweep chose the checkpoint by.
    let best = summary
        .lambdas
        .iter()
        .find(|l| l.lambda == summary.chosen_lambda)
        .unwrap();
    assert!(
        (m.loss - best.best_val_loss).abs() < 1e-6,
        "{} vs {}",
        m.loss,
        best.best_val_loss
    );
    assert_eq!(m.accuracy, best.best_val_accuracy);
    let y: Vec<u8> = rows.iter().map(|r| r.true_class).collect();
    let pred: Vec<u8> = rows.iter().map(|r| r.predicted).collect();
    let recomputed = Metrics::from_predictions(&y, &pred, &m.class_names).unwrap();
    assert_eq!(recomputed, m.metrics);
    let probs: Vec<f32> = rows.iter().flat_map(|r| r.probabilities.clone()).collect();
    assert_eq!(
        m.top5_accuracy,
        Some(top_k_accuracy(&y, &probs, 10, 5).unwrap())
    );
    // The test split's files are untouched by it, and the report shows both.
    assert!(!dir.join("metrics.json").exists());
    report(&dir);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("id=\"validation\""), "no validation section");
    assert!(html.contains("metrics-val.json"));
    // A different split than the run's is refused rather than scored.
    let wrong = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .current_dir(&setup().root)
        .args([
            "test",
            "--checkpoint",
            ck_path.to_str().unwrap(),
            "--split",
            "val",
        ])
        .args([
            "--data",
            "data",
            "--weights",
            "resnet50.safetensors",
            "--image-size",
            "32",
        ])
        .args(["--val-count", "4", "--offline"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("--val-count"), "{err}");
    let _ = rundir::load_run(&dir).unwrap();
}

/// The terminal summary of a sweep where one λ diverges: its status, the warning block and
/// the likely cause; the run still ends well, on the λ that did not fail.
#[test]
fn terminal_summary_names_failed_lambdas() {
    let dir = run_dir("diverging");
    let out = cli(&[
        "sweep",
        "--lambdas",
        "0,1e6",
        "--epochs",
        "3",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAILED (diverged)"), "{stdout}");
    assert!(
        stdout.contains("WARNING: training did not go well"),
        "{stdout}"
    );
    assert!(stdout.contains("- λ = 1000000, epoch "), "{stdout}");
    assert!(
        stdout.contains("likely cause: for λ = 1000000 the L2 step lr·λ"),
        "{stdout}"
    );
    assert!(
        stdout.contains("chosen on validation (loss): λ = 0 "),
        "{stdout}"
    );
    report(&dir);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("id=\"warnings\""));
}

// ---------- the validation split's metrics against scikit-learn's ----------

fn h32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

fn uniform(tag: u32, i: usize) -> f64 {
    let h = h32(h32(tag) ^ i as u32);
    ((h >> 8) as f64 / (1u32 << 24) as f64) * 2.0 - 1.0
}

#[derive(serde::Deserialize)]
struct EvalFixture {
    n: usize,
    y_true: Vec<u8>,
    y_pred: Vec<u8>,
    loss: f64,
    accuracy: f64,
    top5: f64,
    confusion: Vec<Vec<u64>>,
    precision: Vec<f64>,
    recall: Vec<f64>,
    f1: Vec<f64>,
    support: Vec<u64>,
    report: String,
}

/// What `test --split val` writes (metrics-val.json) equals scikit-learn's metrics of the
/// same head on the same validation rows (`tools/gen_head_fixtures.py`, eval_val.json):
/// accuracy, top-5 (`top_k_accuracy_score`), confusion matrix, precision, recall, F1,
/// support and the classification report text.
#[test]
fn validation_metrics_equal_sklearns() {
    use cifar_finetune::checkpoint::{Checkpoint, CheckpointKind, CheckpointMeta};
    use cifar_finetune::data::cifar::Split;
    use cifar_finetune::features::FeatureSet;
    use cifar_finetune::head::{Head, HeadDims};
    use cifar_finetune::rundir::{HistoryRow, TrainConfig};

    let text = std::fs::read_to_string("tests/fixtures/head/eval_val.json").unwrap();
    let f: EvalFixture = serde_json::from_str(&text).unwrap();
    let (dim, hidden, classes) = (16, 8, 10);
    let labels: Vec<u8> = (0..f.n)
        .map(|r| (h32(h32(12) ^ r as u32) % 10) as u8)
        .collect();
    assert_eq!(labels, f.y_true, "labels regenerated differently");
    let mut features = Vec::with_capacity(f.n * dim);
    for (r, &y) in labels.iter().enumerate() {
        for i in 0..dim {
            let bump = if i % classes == y as usize { 1.0 } else { 0.0 };
            features.push((uniform(11, r * dim + i) + bump) as f32);
        }
    }
    let make = |tag, n| (0..n).map(|k| (uniform(tag, k) * 0.5) as f32).collect();
    let synthetic_eval = cifar_finetune::features::Fingerprint {
        backbone: "synthetic-eval".into(),
        weights_sha256: "00".into(),
        preprocess: "synthetic".into(),
        precision: cifar_finetune::backbone::fast::Precision::F32,
    };
    let dims = HeadDims {
        input: dim,
        hidden,
        classes,
    };
    let head = Head::from_parts(
        dims,
        make(13, hidden * dim),
        make(14, hidden),
        make(15, classes * hidden),
        make(16, classes),
    )
    .unwrap();
    let set = FeatureSet {
        features,
        labels,
        index: (0..f.n as u32).collect(),
        dim,
        extractor: synthetic_eval.clone(),
        classes: cifar_finetune::data::cifar::class_names(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint {
        head,
        momentum: None,
        meta: CheckpointMeta {
            format: checkpoint::FORMAT.to_string(),
            kind: CheckpointKind::Best,
            lambda: 0.0,
            epoch: 1,
            dims,
            extractor: synthetic_eval,
            classes: cifar_finetune::data::cifar::class_names(),
            config: TrainConfig::default(),
            metrics: HistoryRow {
                lambda: 0.0,
                epoch: 1,
                train_loss: 0.0,
                train_penalty: 0.0,
                val_loss: None,
                val_accuracy: None,
            },
            state: None,
        },
        path: tmp.path().join("best.safetensors"),
        sha256: None,
    };
    let eval = evaluate::evaluate(&ck, &set, Split::Val).unwrap();
    let (metrics_path, predictions_path) = evaluate::write_outputs(&eval, tmp.path()).unwrap();
    assert!(metrics_path.ends_with("metrics-val.json"));
    assert!(predictions_path.ends_with("predictions-val.csv"));
    let m = TestMetrics::read(&metrics_path).unwrap();
    assert_eq!(eval.predicted, f.y_pred);
    assert!((m.loss - f.loss).abs() < 1e-5, "{} vs {}", m.loss, f.loss);
    assert_eq!(m.accuracy, f.accuracy);
    assert_eq!(m.top5_accuracy, Some(f.top5));
    assert_eq!(m.metrics.confusion, f.confusion);
    for (c, cm) in m.metrics.classes.iter().enumerate() {
        assert!(
            (cm.precision - f.precision[c]).abs() < 1e-12,
            "precision {c}"
        );
        assert!((cm.recall - f.recall[c]).abs() < 1e-12, "recall {c}");
        assert!((cm.f1 - f.f1[c]).abs() < 1e-12, "f1 {c}");
        assert_eq!(cm.support, f.support[c]);
    }
    assert_eq!(m.report, f.report);
}
