//! `cifar-finetune train`, `sweep` and `test` end to end: fixture-sized CIFAR-10 files, a
//! synthetic ResNet-50 at image size 32, features extracted into the cache once, then the
//! run directory, the test evaluation and the errors a user can run into.

#[path = "common/cli_fixture.rs"]
mod cli_fixture;
#[path = "common/shared_dir.rs"]
mod shared_dir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use cli_fixture::{FIXTURE_FLAGS, cli_fixture_dir};

use cifar_finetune::evaluate::{self, TestMetrics};
use cifar_finetune::io::DirLock;
use cifar_finetune::rundir;
use cifar_finetune::rundir::Summary;

struct Setup {
    root: PathBuf,
    /// The run directory of a finished two-λ sweep.
    run: PathBuf,
    /// Its stdout.
    stdout: String,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let root = cli_fixture_dir("cli_train");
        let run = root.join("runs/sweep");
        let out = cli(
            &root,
            &[
                "sweep",
                "--lambdas",
                "0,0.01",
                "--epochs",
                "2",
                "--lr",
                "0.01",
                "--run-dir",
                run.to_str().unwrap(),
                "--jobs",
                "2",
            ],
        );
        assert!(out.status.success(), "sweep failed: {}", text(&out.stderr));
        Setup {
            root,
            run,
            stdout: text(&out.stdout),
        }
    })
}

/// Runs the binary in `root` with the fixture data, synthetic weights and small images.
fn cli(root: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
    cmd.current_dir(root).args(args);
    if args.first() != Some(&"--help") {
        cmd.args(FIXTURE_FLAGS);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected a failure");
    let err = text(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sweep_writes_a_complete_run_directory() {
    let s = setup();
    let record = rundir::load_run(&s.run).unwrap();
    assert_eq!(record.config.lambdas, vec![0.0, 0.01]);
    assert_eq!(record.config.n_train, 10);
    assert_eq!(record.config.n_val, 5);
    assert_eq!(record.config.train.lr, 0.01);
    assert!(
        record.config.extractor.weights_sha256.len() == 64,
        "{}",
        record.config.extractor
    );
    assert_eq!(record.config.source["image_size"], 32);
    assert_eq!(record.history.len(), 4);
    let summary = record.summary.unwrap();
    for l in &summary.lambdas {
        for f in [
            "best.safetensors",
            "best.json",
            "last.safetensors",
            "last.json",
        ] {
            assert!(s.run.join(&l.dir).join(f).is_file(), "{}/{f}", l.dir);
        }
    }
    // Plain progress lines when stdout is not a terminal: the original's format, per λ.
    assert!(s.stdout.contains("λ = 0 [1,     3] loss: "), "{}", s.stdout);
    assert!(
        s.stdout.contains("λ = 0.01 epoch 2: train loss"),
        "{}",
        s.stdout
    );
    assert!(
        s.stdout.contains("chosen on validation (loss): λ = "),
        "{}",
        s.stdout
    );
}

#[test]
fn test_prints_the_table_and_writes_metrics_and_predictions() {
    let s = setup();
    let summary = Summary::read(&s.run).unwrap();
    let ck = s.run.join(&summary.chosen_checkpoint);
    let out = cli(&s.root, &["test", "--checkpoint", ck.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in [
        "test split: 4 images",
        "airplane",
        "truck",
        "confusion matrix",
        "weighted avg",
    ] {
        assert!(
            stdout.contains(needle),
            "stdout lacks `{needle}`:\n{stdout}"
        );
    }
    let m = TestMetrics::read(&s.run.join("metrics.json")).unwrap();
    assert_eq!(m.count, 4);
    assert_eq!(m.lambda, summary.chosen_lambda);
    assert!(
        stdout.contains(&m.report),
        "the report is printed as written"
    );
    let (names, rows) = evaluate::read_predictions(&s.run.join("predictions.csv")).unwrap();
    assert_eq!(names.len(), 10);
    assert_eq!(rows.len(), 4);

    // --out puts the files elsewhere; the JSON sidecar's path works as the checkpoint.
    let out_dir = s.root.join("elsewhere");
    let out = cli(
        &s.root,
        &[
            "test",
            "--checkpoint",
            ck.with_extension("json").to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out_dir.join("metrics.json").is_file() && out_dir.join("predictions.csv").is_file());
}

#[test]
fn train_runs_one_lambda_and_refuses_to_overwrite_without_resume() {
    let s = setup();
    let run = s.root.join("runs/one");
    let args = [
        "train",
        "--lambda",
        "0.001",
        "--epochs",
        "1",
        "--run-dir",
        run.to_str().unwrap(),
    ];
    let out = cli(&s.root, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("[1,     3] loss: "),
        "{}",
        text(&out.stdout)
    );
    assert!(run.join("lambda_0.001/best.safetensors").is_file());
    let before = std::fs::read(run.join("history.csv")).unwrap();
    fails_with(&cli(&s.root, &args), &["--run-dir", "--resume"]);
    let mut resume = args.to_vec();
    resume.push("--resume");
    let out = cli(&s.root, &resume);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(run.join("history.csv")).unwrap(), before);
    let mut other = resume.clone();
    other.extend(["--lr", "0.5"]);
    fails_with(&cli(&s.root, &other), &["--resume", "train.lr"]);
}

#[test]
fn bad_settings_fail_clearly_and_write_nothing() {
    let s = setup();
    let run = s.root.join("runs/bad");
    let r = run.to_str().unwrap();
    fails_with(
        &cli(&s.root, &["train", "--lambda", "-1", "--run-dir", r]),
        &["--lambda", "negative"],
    );
    fails_with(
        &cli(&s.root, &["sweep", "--lambdas", "0,-0.5", "--run-dir", r]),
        &["--lambda", "-0.5"],
    );
    fails_with(
        &cli(&s.root, &["train", "--batch-size", "0", "--run-dir", r]),
        &["--batch-size"],
    );
    fails_with(
        &cli(&s.root, &["train", "--lr", "0", "--run-dir", r]),
        &["--lr"],
    );
    fails_with(
        &cli(&s.root, &["train", "--epochs", "0", "--run-dir", r]),
        &["--epochs"],
    );
    fails_with(
        &cli(&s.root, &["train", "--select", "f1", "--run-dir", r]),
        &["--select"],
    );
    assert!(!run.exists(), "nothing is written for invalid settings");
    let out = cli(&s.root, &["train", "--learning-rate", "0.1"]);
    assert_eq!(out.status.code(), Some(2));
    fails_with(&out, &["--learning-rate"]);
}

#[test]
fn test_refuses_other_features_and_names_missing_checkpoints() {
    let s = setup();
    let summary = Summary::read(&s.run).unwrap();
    let ck = s.run.join(&summary.chosen_checkpoint);
    // Features with another normalisation have another fingerprint.
    let out = cli(
        &s.root,
        &[
            "test",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--normalize",
            "half",
            "--out",
            "x",
        ],
    );
    fails_with(&out, &["fingerprint mismatch", "best.safetensors"]);
    assert!(!s.root.join("x/metrics.json").exists());
    let out = cli(
        &s.root,
        &["test", "--checkpoint", "nowhere/best.safetensors"],
    );
    fails_with(&out, &["nowhere/best.safetensors"]);
}

/// `test --checkpoint` alone scores the head on features made as its own were: the flags
/// left unset come from the checkpoint (precision, image size, normalisation) and its run's
/// config.json (data, weights, limit, split); a flag given still wins.
#[test]
fn test_takes_the_runs_settings_for_the_flags_it_is_not_given() {
    let s = setup();
    let run = s.root.join("runs/settings");
    let bin = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
        cmd.current_dir(&s.root);
        cmd
    };
    let out = bin()
        .args(["train", "--lambda", "0", "--epochs", "1", "--run-dir"])
        .arg(&run)
        .args([
            "--data",
            "data",
            "--weights",
            "resnet50.safetensors",
            "--offline",
        ])
        .args(["--cache-dir", "settings-cache"])
        .args([
            "--image-size",
            "40",
            "--normalize",
            "half",
            "--precision",
            "bf16",
        ])
        .args(["--limit", "30", "--val-count", "6", "--split-seed", "7"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ck = run.join("lambda_0/best.safetensors");

    for split in ["test", "val"] {
        let out = bin()
            .args(["test", "--split", split, "--checkpoint"])
            .arg(&ck)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(out.status.success(), "--split {split}: {err}");
        // Only what differs from the defaults is named.
        assert!(
            !err.contains("--data") && !err.contains("--dataset"),
            "{err}"
        );
        for flag in [
            "--weights resnet50.safetensors",
            "--cache-dir settings-cache",
            "--limit 30",
            "--val-count 6",
            "--split-seed 7",
            "--precision bf16",
            "--image-size 40",
            "--normalize half",
        ] {
            assert!(
                err.contains(flag),
                "--split {split}: `{flag}` not taken: {err}"
            );
        }
    }
    let m = TestMetrics::read(&run.join("metrics.json")).unwrap();
    let cfg = rundir::RunConfig::read(&run).unwrap();
    assert_eq!(m.extractor, cfg.extractor);
    let val = TestMetrics::read(&run.join("metrics-val.json")).unwrap();
    assert_eq!(val.count, 6);

    // A flag given is used as given: features of another size are refused.
    let out = bin()
        .args([
            "test",
            "--image-size",
            "32",
            "--out",
            "elsewhere",
            "--checkpoint",
        ])
        .arg(&ck)
        .output()
        .unwrap();
    fails_with(&out, &["fingerprint mismatch", "size=40"]);
    assert!(!text(&out.stderr).contains("--image-size 40"));
}

#[test]
fn help_says_biases_are_not_penalised() {
    for sub in ["train", "sweep"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        let help = text(&out.stdout);
        assert!(help.contains("Biases are not penalised"), "{sub}: {help}");
        for flag in [
            "--lr",
            "--momentum",
            "--batch-size",
            "--epochs",
            "--val-every",
            "--select",
            "--seed",
            "--resume",
            "--run-dir",
        ] {
            assert!(help.contains(flag), "{sub} --help lacks {flag}");
        }
    }
}

#[test]
fn a_run_directory_in_use_is_refused_or_waited_for_and_stale_temporaries_go() {
    let s = setup();
    let run = s.root.join("runs/locked");
    let r = run.to_str().unwrap();
    let sweep = ["sweep", "--lambdas", "0", "--epochs", "1", "--run-dir", r];
    // Another process (this test) holds the run directory: a sweep fails at once, naming it.
    let lock = DirLock::acquire(&run, "test", false).unwrap();
    let pid = format!("pid {}", std::process::id());
    fails_with(&cli(&s.root, &sweep), &[".lock", &pid]);
    assert!(!run.join("config.json").exists(), "nothing written");
    // So do `test` and `report` writing into it.
    let summary = Summary::read(&s.run).unwrap();
    let ck = s.run.join(&summary.chosen_checkpoint);
    fails_with(
        &cli(
            &s.root,
            &["test", "--checkpoint", ck.to_str().unwrap(), "--out", r],
        ),
        &[".lock", &pid],
    );
    assert!(!run.join("metrics.json").exists());
    let report = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .args(["report", "--run-dir", r])
        .output()
        .unwrap();
    fails_with(&report, &[".lock", &pid]);

    // With --wait-lock the sweep waits for the holder, then removes what a killed writer
    // left in the run directory and its λ directories.
    std::fs::create_dir_all(run.join("lambda_0")).unwrap();
    std::fs::write(run.join("lambda_0/.tmp-stale"), b"half a checkpoint").unwrap();
    std::fs::write(run.join(".tmp-stale"), b"half a config").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
    cmd.current_dir(&s.root)
        .args(sweep)
        .args(FIXTURE_FLAGS)
        .arg("--wait-lock");
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "did not wait for the lock"
    );
    assert!(!run.join("config.json").exists());
    drop(lock);
    assert!(child.wait().unwrap().success());
    assert!(run.join("lambda_0/best.safetensors").is_file());
    assert!(!run.join("lambda_0/.tmp-stale").exists());
    assert!(!run.join(".tmp-stale").exists());
}

/// λs are trained in f32: one beyond its range (shown as λ = inf) or too small for it (1e-50
/// silently 0, a subnormal losing digits) is refused by both flags, naming the value.
#[test]
fn lambdas_that_do_not_survive_f32_are_refused() {
    let parse = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
            .args(args)
            .args(["--offline", "--data", "no-such-dir"])
            .output()
            .unwrap()
    };
    for (args, value, why) in [
        (["sweep", "--lambdas", "0,1e40"], "1e40", "beyond"),
        (["sweep", "--lambdas", "1e-50,0.1"], "1e-50", "too small"),
        (["train", "--lambda", "1e-40"], "1e-40", "too small"),
        (["train", "--lambda", "-1e39"], "-1e39", "beyond"),
    ] {
        let out = parse(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        fails_with(&out, &[args[1], value, why]);
    }
    // Representable λs get past the parsing (and stop at the missing data).
    let out = parse(&["sweep", "--lambdas", "0,1e-30,3e38"]);
    fails_with(&out, &["no-such-dir"]);
}
