//! Datasets on the command line: an image folder without split directories goes through
//! `run` with a stratified split, a bad file stops the run naming it or is skipped with
//! `--skip-bad` and recorded; flags that do not fit the layout are refused; CIFAR-100's
//! coarse labels reach the features.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cifar_finetune::backbone::weights;

/// `root/<class>/<name>.png`: 3 classes, `per_class` images of two sizes each, the colour
/// coding the class so that the head can learn something.
fn write_folder(root: &Path, per_class: usize) {
    for (c, class) in ["cat", "dog", "eel"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let (w, h) = if i % 2 == 0 { (40, 30) } else { (33, 47) };
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let v = ((x * 7 + y * 3 + i as u32 * 11) % 64) as u8;
                let mut p = [v, v, v];
                p[c] = p[c].saturating_add(150);
                image::Rgb(p)
            });
            img.save(dir.join(format!("{class}_{i:02}.png"))).unwrap();
        }
    }
}

fn setup(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    let folder = tmp.path().join("images");
    write_folder(&folder, 10);
    weights::write_safetensors(
        &weights::synthetic_state_dict().unwrap(),
        &tmp.path().join("resnet50.safetensors"),
    )
    .unwrap();
    (tmp, folder)
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .current_dir(dir)
        .args(args)
        .args([
            "--folder",
            "images",
            "--data",
            "data",
            "--weights",
            "resnet50.safetensors",
            "--image-size",
            "36",
            "--crop",
            "32",
            "--offline",
        ])
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const RUN: [&str; 7] = [
    "run",
    "--epochs",
    "2",
    "--lambdas",
    "0,0.01",
    "--run-dir",
    "runs/r",
];

#[test]
fn a_folder_runs_end_to_end_and_a_bad_file_is_named_or_skipped() {
    let (tmp, folder) = setup("cli-folder");
    std::fs::write(
        folder.join("dog/broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a JPEG",
    )
    .unwrap();

    // By default: stop, naming the file and the way out.
    let out = cli(tmp.path(), &RUN);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("broken.jpg") && t.contains("--skip-bad"), "{t}");
    assert!(!tmp.path().join("runs/r/summary.json").exists());

    // --skip-bad: the run completes, the file is counted and recorded.
    let mut args = RUN.to_vec();
    args.push("--skip-bad");
    let out = cli(tmp.path(), &args);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("1 undecodable image(s)"), "{t}");
    let run = tmp.path().join("runs/r");
    let skipped: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("skipped_images.json")).unwrap()).unwrap();
    assert_eq!(skipped.as_array().unwrap().len(), 1);
    assert!(
        skipped[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("dog/broken.jpg")
    );
    // The configuration records the dataset and the split that was drawn.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["source"]["dataset"], "folder");
    assert_eq!(cfg["class_names"], serde_json::json!(["cat", "dog", "eel"]));
    // 30 good images: per class round(0.1·10) = 1 test, then round(0.1·9) = 1 validation.
    assert_eq!(
        (cfg["n_train"].as_u64(), cfg["n_val"].as_u64()),
        (Some(24), Some(3))
    );
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["count"], 3);
    assert!(run.join("report.html").exists());

    // `test` of the chosen head on the same folder: the test split again, the bad file
    // listed beside its metrics.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let chosen = run.join(summary["chosen_checkpoint"].as_str().unwrap());
    let out_dir = tmp.path().join("tested");
    let out = cli(
        tmp.path(),
        &[
            "test",
            "--checkpoint",
            chosen.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--skip-bad",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let listed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("skipped_images-test.json")).unwrap())
            .unwrap();
    assert!(
        listed[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("dog/broken.jpg")
    );
    let tested: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(tested["count"], 3);
    assert_eq!(tested["accuracy"], metrics["accuracy"]);
}

#[test]
fn flags_that_do_not_fit_the_layout_are_refused() {
    let (tmp, folder) = setup("cli-folder-flags");
    // A folder with its own val/ and test/.
    let split = tmp.path().join("split");
    for part in ["train", "val", "test"] {
        write_folder(&split.join(part), 2);
    }
    std::fs::rename(&folder, tmp.path().join("flat")).unwrap();
    std::fs::rename(&split, &folder).unwrap();
    let out = cli(
        tmp.path(),
        &["features", "--split", "val", "--val-fraction", "0.2"],
    );
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("own validation images"),
        "{t}"
    );
    let out = cli(
        tmp.path(),
        &["features", "--split", "test", "--test-fraction", "0.2"],
    );
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("own test images"),
        "{t}"
    );
    // The split layout works as it is.
    let out = cli(
        tmp.path(),
        &["features", "--split", "val", "--out", "val.safetensors"],
    );
    assert!(out.status.success(), "{}", text(&out));

    // --folder with another dataset.
    let out = cli(tmp.path(), &["features", "--dataset", "cifar10"]);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("--folder"), "{t}");
}

#[test]
fn cifar100_coarse_labels_reach_the_features() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("resnet50.safetensors");
    weights::write_safetensors(&weights::synthetic_state_dict().unwrap(), &weights).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar100");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("expected.json")).unwrap()).unwrap();
    let out_file = tmp.path().join("test.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .args(["features", "--dataset", "cifar100", "--labels", "coarse"])
        .args(["--split", "test", "--image-size", "32", "--offline"])
        .arg("--data")
        .arg(&fixtures)
        .arg("--weights")
        .arg(&weights)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let set = cifar_finetune::features::FeatureSet::read(&out_file).unwrap();
    assert_eq!(
        set.classes,
        expected["coarse_classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    );
    let want: Vec<u8> = expected["parts"]["test"]["coarse"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(set.labels, want);
    assert_eq!(set.dim, 2048);
}
