//! `--backbone` end to end: a synthetic ResNet-18 (512-d features) through `sweep`, the
//! checkpoints, `test`, `report` and `predict`, and the errors when a backbone, a weights
//! file and a checkpoint disagree — each naming both sides, before anything is extracted.

#[path = "common/cli_fixture.rs"]
mod cli_fixture;
#[path = "common/shared_dir.rs"]
mod shared_dir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use cli_fixture::{FIXTURE_FLAGS, cli_fixture_dir};

use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::backbone::weights;
use cifar_finetune::checkpoint;
use cifar_finetune::evaluate::TestMetrics;
use cifar_finetune::rundir::{self, Summary};

struct Setup {
    root: PathBuf,
    /// A finished one-λ sweep on ResNet-18 features.
    run: PathBuf,
    /// Its chosen checkpoint.
    checkpoint: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let root = cli_fixture_dir("cli_backbone");
        weights::write_safetensors(
            &weights::synthetic_state_dict_of(&Arch::RESNET18).unwrap(),
            &root.join("resnet18.safetensors"),
        )
        .unwrap();
        let run = root.join("runs/r18");
        let out = cli(
            &root,
            "resnet18.safetensors",
            &[
                "sweep",
                "--backbone",
                "resnet18",
                "--lambdas",
                "0.001",
                "--epochs",
                "1",
                "--run-dir",
                run.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "sweep failed: {}", text(&out.stderr));
        let summary = Summary::read(&run).unwrap();
        let checkpoint = run.join(&summary.chosen_checkpoint);
        Setup {
            root,
            run,
            checkpoint,
        }
    })
}

/// Runs the binary in `root` with the fixture data and flags, `weights` as `--weights`.
fn cli(root: &Path, weights: &str, args: &[&str]) -> Output {
    let mut flags: Vec<&str> = FIXTURE_FLAGS.to_vec();
    let at = flags.iter().position(|f| *f == "--weights").unwrap();
    flags[at + 1] = weights;
    Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .current_dir(root)
        .args(args)
        .args(flags)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected a failure:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn resnet18_features_are_512_wide_through_head_checkpoint_test_and_report() {
    let s = setup();
    let record = rundir::load_run(&s.run).unwrap();
    assert_eq!(record.config.feature_dim, 512);
    assert_eq!(record.config.extractor.backbone, "resnet18");
    assert_eq!(record.config.source["backbone"], "resnet18");
    let ck = checkpoint::load(&s.checkpoint).unwrap();
    assert_eq!(ck.head.dims.input, 512);
    assert_eq!(ck.meta.backbone(), "resnet18");
    // The sidecar says so too, for people.
    let sidecar = std::fs::read_to_string(checkpoint::sidecar_path(&s.checkpoint)).unwrap();
    assert!(
        sidecar.contains("resnet18-avgpool; weights sha256:"),
        "{sidecar}"
    );

    // `test` takes the checkpoint's backbone without being told.
    let out = cli(
        &s.root,
        "resnet18.safetensors",
        &["test", "--checkpoint", s.checkpoint.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m = TestMetrics::read(&s.run.join("metrics.json")).unwrap();
    assert_eq!(m.count, 4);

    let out = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .args(["report", "--gallery", "0", "--run-dir"])
        .arg(&s.run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(s.run.join("report.html")).unwrap();
    assert!(html.contains("CIFAR-10 on frozen ResNet-18 features"));
    assert!(html.contains("512 → 32 → ReLU → 10"), "the head's widths");
}

#[test]
fn test_refuses_another_backbone_or_its_weights_naming_both() {
    let s = setup();
    let ck = s.checkpoint.to_str().unwrap();
    let out = cli(
        &s.root,
        "resnet50.safetensors",
        &["test", "--checkpoint", ck, "--out", "x"],
    );
    fails_with(
        &out,
        &[
            "trained on resnet18 features",
            "resnet50.safetensors holds resnet50 weights",
        ],
    );
    let out = cli(
        &s.root,
        "resnet18.safetensors",
        &[
            "test",
            "--checkpoint",
            ck,
            "--backbone",
            "resnet50",
            "--out",
            "x",
        ],
    );
    fails_with(
        &out,
        &["trained on resnet18 features", "--backbone is resnet50"],
    );
    assert!(!s.root.join("x").exists());
}

#[test]
fn weights_of_another_architecture_are_refused_naming_both() {
    let s = setup();
    // A resnet18 file where --backbone (default resnet50) asks for another.
    let out = cli(
        &s.root,
        "resnet18.safetensors",
        &["features", "--split", "test", "--out", "f.safetensors"],
    );
    fails_with(
        &out,
        &[
            "resnet18.safetensors",
            "holds a torchvision resnet18 state dict",
            "not the resnet50 asked for",
            "--backbone resnet18",
        ],
    );
    // torchvision's resnet101 names and shapes in a .pth, given as resnet50.
    let r101 =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/backbone/resnet101_shapes.pth");
    let out = cli(
        &s.root,
        r101.to_str().unwrap(),
        &["features", "--split", "test", "--out", "f.safetensors"],
    );
    fails_with(&out, &["resnet101", "not the resnet50 asked for"]);
    // v2 of a backbone torchvision has no v2 of, before any download.
    let out = cli(
        &s.root,
        "v2",
        &["features", "--backbone", "resnet34", "--split", "test"],
    );
    fails_with(&out, &["no IMAGENET1K_V2 weights for resnet34"]);
    assert!(!s.root.join("f.safetensors").exists());
}

#[test]
fn predict_uses_the_checkpoints_backbone_and_refuses_another() {
    let s = setup();
    let img = s.root.join("landscape.png");
    image::RgbImage::from_fn(50, 37, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
    })
    .save(&img)
    .unwrap();
    let predict = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
            .current_dir(&s.root)
            .args(["predict", "--offline", "--checkpoint"])
            .arg(&s.checkpoint)
            .args(extra)
            .arg(&img)
            .output()
            .unwrap()
    };
    let out = predict(&["--weights", "resnet18.safetensors", "--top", "10"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 11, "{stdout}");
    assert!(stdout.contains("landscape.png (50×37)"), "{stdout}");

    let out = predict(&["--weights", "resnet50.safetensors"]);
    fails_with(
        &out,
        &[
            "trained on resnet18 features",
            "resnet50.safetensors holds resnet50 weights",
        ],
    );
    let out = predict(&[
        "--weights",
        "resnet18.safetensors",
        "--backbone",
        "resnet34",
    ]);
    fails_with(
        &out,
        &["trained on resnet18 features", "--backbone is resnet34"],
    );
    // Without --weights: the checkpoint's backbone's v1, which offline mode cannot fetch.
    let out = predict(&[]);
    fails_with(&out, &["resnet18-f37072fd.pth", "offline"]);
}

/// Without `--weights`, `predict` and `test` take torchvision's file that the checkpoint's
/// fingerprint names by its sha256 — here resnet101's V2, `resnet101-cd907fc2.pth` — which
/// offline mode then reports missing (no 170 MB file in a test).
#[test]
fn the_checkpoints_weights_are_found_by_their_sha256() {
    let s = setup();
    let mut ck = checkpoint::load(&s.checkpoint).unwrap();
    ck.meta.extractor.backbone = "resnet101".into();
    ck.meta.extractor.weights_sha256 = format!("cd907fc2{}", "0".repeat(56));
    let head = cifar_finetune::head::Head::init(2048, 32, 10, 3).unwrap();
    ck.meta.dims = head.dims;
    let path = s.root.join("r101-v2.safetensors");
    checkpoint::save(&path, &head, None, &ck.meta).unwrap();
    let img = s.root.join("tiny.png");
    image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 7]))
        .save(&img)
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .current_dir(&s.root)
        .args([
            "predict",
            "--offline",
            "--checkpoint",
            "r101-v2.safetensors",
        ])
        .arg(&img)
        .output()
        .unwrap();
    fails_with(&out, &["resnet101-cd907fc2.pth", "offline"]);
    let test = |weights: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
        cmd.current_dir(&s.root)
            .args(["test", "--checkpoint", "r101-v2.safetensors", "--out", "y"])
            .args(["--data", "data", "--image-size", "32", "--offline"]);
        if let Some(w) = weights {
            cmd.args(["--weights", w]);
        }
        cmd.output().unwrap()
    };
    fails_with(&test(None), &["resnet101-cd907fc2.pth", "offline"]);
    // --weights given wins over the checkpoint's file.
    fails_with(&test(Some("v1")), &["resnet101-63fe2227.pth", "offline"]);
}
