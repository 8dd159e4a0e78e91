//! `cifar-finetune run` end to end on fixture-sized data and a synthetic ResNet-50: every
//! file of the run directory exists and parses.

use std::path::Path;
use std::process::Command;

use cifar_finetune::backbone::weights;
use cifar_finetune::evaluate::{self, TestMetrics};
use cifar_finetune::rundir;
use cifar_finetune::rundir::{RunConfig, Summary};

#[test]
fn run_writes_a_complete_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let weights_file = root.join("resnet50.safetensors");
    weights::write_safetensors(&weights::synthetic_state_dict().unwrap(), &weights_file).unwrap();
    let run_dir = root.join("run");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar");
    let out = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .arg("run")
        .arg("--data")
        .arg(&data)
        .arg("--weights")
        .arg(&weights_file)
        .arg("--cache-dir")
        .arg(root.join("cache"))
        .arg("--run-dir")
        .arg(&run_dir)
        .args(["--offline", "--image-size", "32", "--val-count", "5"])
        .args([
            "--lambdas",
            "0,0.01",
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--repeats",
            "2",
        ])
        .args(["--gallery", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed:\n{stdout}\n{stderr}");
    let report = run_dir.join("report.html");
    assert!(
        stdout.contains(&format!("report: {}", report.display())),
        "{stdout}"
    );

    let config = RunConfig::read(&run_dir).unwrap();
    assert_eq!(config.lambdas, vec![0.0, 0.01]);
    assert_eq!((config.n_train, config.n_val), (10, 5));
    assert!(
        config.extractor.weights_sha256.len() == 64,
        "{}",
        config.extractor
    );

    let history = rundir::read_history(&run_dir.join("history.csv")).unwrap();
    assert_eq!(history.len(), 2 * 3);
    let summary = Summary::read(&run_dir).unwrap();
    assert!(run_dir.join(&summary.chosen_checkpoint).exists());
    for l in &summary.lambdas {
        assert!(
            run_dir.join(&l.best_checkpoint).exists(),
            "{}",
            l.best_checkpoint
        );
    }

    // The test split was evaluated with the chosen checkpoint.
    let metrics = TestMetrics::read(&run_dir.join("metrics.json")).unwrap();
    assert_eq!(metrics.count, 4);
    assert_eq!(metrics.lambda, summary.chosen_lambda);
    let (classes, rows) = evaluate::read_predictions(&run_dir.join("predictions.csv")).unwrap();
    assert_eq!(classes.len(), 10);
    assert_eq!(rows.len(), 4);

    // The second seed's sweep, and the plots including the spread across seeds.
    let repeat = rundir::read_history(&run_dir.join("repeats/seed-1/history.csv")).unwrap();
    assert_eq!(repeat.len(), history.len());
    assert_ne!(repeat, history, "another seed must give other numbers");
    let plots: Vec<String> = std::fs::read_dir(run_dir.join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for ext in ["png", "svg"] {
        let n = plots.iter().filter(|p| p.ends_with(ext)).count();
        assert!(n >= 6, "{n} {ext} plots: {plots:?}");
    }
    for p in &plots {
        let bytes = std::fs::read(run_dir.join("plots").join(p)).unwrap();
        if p.ends_with(".png") {
            image::load_from_memory(&bytes).unwrap();
        } else {
            assert!(String::from_utf8(bytes).unwrap().contains("<svg"));
        }
    }

    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") || html.starts_with("<!doctype html>"));
    assert!(html.contains("airplane") && html.contains("truck"));
    assert!(!html.contains("http://") && !html.contains("https://"));
}

#[test]
fn run_rejects_bad_settings_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, flag) in [
        (&["--repeats", "0"][..], "--repeats"),
        (&["--lambdas", "0,-1"][..], "--lambda"),
        (&["--batch-size", "0"][..], "--batch-size"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
            .arg("run")
            .arg("--data")
            .arg(tmp.path().join("nothing-here"))
            .arg("--offline")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
        assert!(!tmp.path().join("nothing-here").exists());
    }
}
