//! Training that says when it failed: features and settings that make SGD diverge or collapse,
//! and what the sweep, `summary.json` and `report.html` then say.

use std::ops::ControlFlow;

use cifar_finetune::Error;
use cifar_finetune::features::FeatureSet;
use cifar_finetune::report::{self, ReportOptions};
use cifar_finetune::rundir;
use cifar_finetune::rundir::{ProblemKind, Summary, TrainConfig};
use cifar_finetune::train::{self, RunOptions, SweepOutcome};

/// `n` rows of `dim` features around `offset` (uniform spread `spread`), with a class-dependent
/// bump of `bump` so that a working head can learn them; deterministic.
fn features(n: usize, dim: usize, offset: f32, spread: f32, bump: f32, seed: u32) -> FeatureSet {
    let u = |v: u32| {
        let mut x = v.wrapping_mul(0x9e37_79b9) ^ seed.wrapping_mul(0x85eb_ca6b);
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^= x >> 16;
        (x >> 8) as f32 / (1 << 24) as f32
    };
    let labels: Vec<u8> = (0..n as u32)
        .map(|i| (u(1_000_003 + i) * 10.0) as u8)
        .collect();
    let mut x = Vec::with_capacity(n * dim);
    for (r, &y) in labels.iter().enumerate() {
        for k in 0..dim {
            let b = if k % 10 == y as usize { bump } else { 0.0 };
            x.push(offset + spread * u((r * dim + k) as u32) + b);
        }
    }
    FeatureSet {
        features: x,
        labels,
        index: (0..n as u32).collect(),
        dim,
        extractor: "synthetic-divergence-avgpool; weights sha256:00; synthetic; precision f32"
            .parse()
            .unwrap(),
        classes: cifar_finetune::data::cifar::class_names(),
    }
}

fn sweep(
    tr: &FeatureSet,
    va: &FeatureSet,
    lambdas: &[f32],
    cfg: &TrainConfig,
    dir: &std::path::Path,
) -> cifar_finetune::Result<Summary> {
    let opts = RunOptions {
        jobs: 2,
        ..RunOptions::default()
    };
    match train::sweep(tr, va, lambdas, cfg, dir, &opts, &mut |_| {
        ControlFlow::Continue(())
    })? {
        SweepOutcome::Finished(s) => Ok(s),
        SweepOutcome::Stopped => panic!("the sweep stopped"),
    }
}

fn cfg() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        hidden: 16,
        ..TrainConfig::default()
    }
}

/// Healthy features; λ·lr beyond the stability limit of SGD with momentum 0.9
/// (lr·λ < 2·(1 + μ) = 3.8) makes the weights blow up. The diverging λs stop and are named,
/// the healthy one is chosen, and the report says so at the top.
#[test]
fn diverging_lambdas_are_named_and_never_chosen() {
    let tr = features(400, 40, 0.0, 1.0, 1.0, 1);
    let va = features(100, 40, 0.0, 1.0, 1.0, 2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let s = sweep(&tr, &va, &[0.0, 5000.0, 20000.0], &cfg(), &dir).unwrap();
    assert_eq!(s.chosen_lambda, 0.0);
    assert!(!s.lambdas[0].failed, "{:?}", s.lambdas[0].problems);
    for l in &s.lambdas[1..] {
        assert!(l.failed, "λ = {} should have diverged", l.lambda);
        let p = &l.problems[0];
        assert_eq!(p.kind, ProblemKind::Diverged);
        let epoch = p.epoch.unwrap();
        assert!(
            p.message
                .contains(&format!("λ = {}, epoch {epoch}", l.lambda)),
            "{}",
            p.message
        );
    }
    // summary.json says it too, and reads back the same (NaNs of a λ without a validated
    // epoch included).
    let read = Summary::read(&dir).unwrap();
    assert_eq!(read.lambdas.len(), 3);
    assert_eq!(
        read.lambdas.iter().map(|l| l.failed).collect::<Vec<_>>(),
        [false, true, true]
    );
    assert_eq!(read.warnings, s.warnings);
    assert!(s.warnings.iter().any(|w| w.contains("λ = 5000")));
    assert!(s.warnings.iter().any(|w| w.contains("λ = 20000")));
    assert!(
        s.warnings
            .last()
            .unwrap()
            .contains("likely cause: for λ = 5000, λ = 20000 the L2 step lr·λ"),
        "{:?}",
        s.warnings
    );

    let out = report::write_run_report(
        &dir,
        &ReportOptions {
            gallery_size: 0,
            ..ReportOptions::default()
        },
    )
    .unwrap();
    let html = std::fs::read_to_string(out.html).unwrap();
    let warn = html.find("id=\"warnings\"").expect("no warning box");
    let cards = html.find("class=\"cards\"").unwrap();
    assert!(warn < cards, "the warning is not at the top");
    assert!(html.contains("the training did not go well"));
    assert!(html.contains("λ = 5000, epoch"));
    assert!(html.contains("failed: diverged"));
    assert!(html.contains("likely cause: for λ = 5000"));
}

/// When every λ fails there is nothing to choose: an error naming each λ.
#[test]
fn all_lambdas_failing_is_an_error_naming_each() {
    let tr = features(400, 40, 0.0, 1.0, 1.0, 1);
    let va = features(100, 40, 0.0, 1.0, 1.0, 2);
    let tmp = tempfile::tempdir().unwrap();
    let err = sweep(
        &tr,
        &va,
        &[5000.0, 20000.0],
        &cfg(),
        &tmp.path().join("run"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Numerical(_)), "{msg}");
    assert!(msg.contains("every λ failed"), "{msg}");
    assert!(
        msg.contains("λ = 5000, epoch") && msg.contains("λ = 20000, epoch"),
        "{msg}"
    );
    assert!(msg.contains("likely cause"), "{msg}");
    assert!(!tmp.path().join("run/summary.json").exists());
}

/// What a new user saw: features of magnitude ~200 (not normalised as the backbone's
/// features are) with the default lr 0.001. Every λ ends predicting one class or diverges;
/// now each says so, with the feature scale in the likely cause.
#[test]
fn large_features_are_reported_not_silently_collapsed() {
    let tr = features(400, 64, 180.0, 40.0, 5.0, 3);
    let va = features(100, 64, 180.0, 40.0, 5.0, 4);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let lambdas = [0.0, 1e-3, 1e-2];
    let s = sweep(&tr, &va, &lambdas, &cfg(), &dir).unwrap();
    for l in &s.lambdas {
        assert!(!l.failed);
        assert!(
            l.problems
                .iter()
                .any(|p| p.kind == ProblemKind::SingleClass),
            "λ = {}: {:?}",
            l.lambda,
            l.problems
        );
    }
    // The symptom as first seen: every λ at the same validation loss, now said in one line.
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("every λ reached the same validation loss")),
        "{:?}",
        s.warnings
    );
    let cause = s.warnings.last().unwrap();
    assert!(cause.contains("mean |x| = 200."), "{cause}");
    let html_path = report::write_run_report(
        &dir,
        &ReportOptions {
            gallery_size: 0,
            ..ReportOptions::default()
        },
    )
    .unwrap()
    .html;
    let html = std::fs::read_to_string(html_path).unwrap();
    assert!(html.contains("id=\"warnings\""));
    assert!(html.contains("predicts one class"));
}

/// Features so large that SGD at the default learning rate overflows whatever λ (with the
/// course script's linear head, which has no ReLU to die instead): every λ diverges, and the
/// error names each and points at the features' scale.
#[test]
fn features_that_make_sgd_diverge_fail_every_lambda_by_name() {
    let tr = features(400, 64, 5e5, 1e5, 1e4, 5);
    let va = features(100, 64, 5e5, 1e5, 1e4, 6);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let linear = TrainConfig {
        activation: cifar_finetune::head::Activation::None,
        ..cfg()
    };
    let err = sweep(&tr, &va, &[0.0, 1e-3], &linear, &dir).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("every λ failed"), "{msg}");
    assert!(
        msg.contains("λ = 0, epoch 1") && msg.contains("λ = 0.001, epoch 1"),
        "{msg}"
    );
    assert!(
        msg.contains("likely cause: the learning rate (--lr 0.001)"),
        "{msg}"
    );
    assert!(msg.contains("mean |x| = 5"), "{msg}");
    // history.csv is consistent (no row of an epoch that did not finish).
    assert!(
        rundir::read_history(&dir.join("history.csv"))
            .unwrap()
            .is_empty()
    );
}

/// A λ slightly beyond the stability limit on a short run: the weights grow every step but
/// stay finite, so nothing diverges — yet the training loss never falls below its first
/// epoch's, and that is reported.
#[test]
fn a_loss_that_never_falls_is_reported() {
    let tr = features(40, 40, 0.0, 1.0, 1.0, 7);
    let va = features(30, 40, 0.0, 1.0, 1.0, 8);
    let tmp = tempfile::tempdir().unwrap();
    let s = sweep(&tr, &va, &[0.0, 4500.0], &cfg(), &tmp.path().join("run")).unwrap();
    let grown = &s.lambdas[1];
    assert!(!grown.failed, "{:?}", grown.problems);
    let p = grown
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::LossNeverFell)
        .unwrap_or_else(|| panic!("{:?}", grown.problems));
    assert!(
        p.message
            .contains("λ = 4500: the training loss never fell below its first epoch's"),
        "{}",
        p.message
    );
    assert!(s.warnings.contains(&p.message));
    // λ = 0 learns: its loss falls, and it is the one chosen.
    assert!(
        !s.lambdas[0]
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::LossNeverFell)
    );
    assert_eq!(s.chosen_lambda, 0.0);
}
