//! The report: plots read back as PNG and SVG, report.html from a real (synthetic-data) run
//! directory, no external URL in it, and headless Chromium rendering it offline.
//!
//! Environment:
//! * `CIFAR_FINETUNE_UPDATE_SNAPSHOTS=1` rewrites the SVG text snapshots in
//!   `tests/fixtures/report/` (review the diff);
//! * without `chromium` installed the Chromium test is skipped, except under `CI` (set by
//!   CI, whose `.ci/run` installs it), where its absence fails the test unless
//!   `CIFAR_FINETUNE_SKIP_CHROMIUM=1`;
//! * `CIFAR_FINETUNE_KEEP_TEST_OUTPUT=DIR` copies the generated run directory to `DIR` for
//!   inspection.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::prelude::{BASE64_STANDARD, Engine as _};

use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::{self, CLASSES, IMAGE_BYTES, SIDE, Split};
use cifar_finetune::evaluate;
use cifar_finetune::features::FeatureSet;
use cifar_finetune::report::plots::{self, Figure, LossKind};
use cifar_finetune::report::{self, ReportOptions};
use cifar_finetune::rundir;
use cifar_finetune::rundir::{HistoryRow, TrainConfig};
use cifar_finetune::train::{self, RunOptions, SweepOutcome};

const LAMBDAS: [f32; 5] = [0.0, 1e-4, 1e-3, 1e-2, 1e-1];

fn class_names() -> Vec<String> {
    CLASSES.iter().map(|s| s.to_string()).collect()
}

/// A deterministic history: 5 λ × 6 epochs, validation every other epoch.
fn history() -> Vec<HistoryRow> {
    let mut rows = Vec::new();
    for (k, &lambda) in LAMBDAS.iter().enumerate() {
        for epoch in 1..=6 {
            let t = 1.5 / (epoch as f64).sqrt() + 0.04 * k as f64;
            let validated = epoch % 2 == 0;
            rows.push(HistoryRow {
                lambda,
                epoch,
                train_loss: t,
                train_penalty: 0.001 * k as f64,
                val_loss: validated.then_some(t + 0.12 + 0.01 * epoch as f64),
                val_accuracy: validated.then_some(0.6 + 0.02 * k as f64 + 0.01 * epoch as f64),
            });
        }
    }
    rows
}

fn confusion() -> Vec<Vec<u64>> {
    (0..10)
        .map(|i| {
            (0..10)
                .map(|j| {
                    if i == j {
                        60 + 3 * i as u64
                    } else {
                        ((i * 7 + j * 3) % 9) as u64
                    }
                })
                .collect()
        })
        .collect()
}

/// The text of every `<text>` element of an SVG, in document order.
fn svg_texts(svg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find("<text") {
        let after = &rest[start..];
        let Some(open_end) = after.find('>') else {
            break;
        };
        let Some(close) = after.find("</text>") else {
            break;
        };
        let text = after[open_end + 1..close]
            .trim()
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
        out.push(text);
        rest = &after[close + 7..];
    }
    out
}

/// Compares the SVG's texts with `tests/fixtures/report/<name>.texts.txt`.
fn check_snapshot(fig: &Figure) {
    let texts = svg_texts(&fig.svg).join("\n") + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/report")
        .join(format!("{}.texts.txt", fig.name));
    if std::env::var("CIFAR_FINETUNE_UPDATE_SNAPSHOTS").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &texts).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with CIFAR_FINETUNE_UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        texts,
        want,
        "SVG text of {} differs from {} (CIFAR_FINETUNE_UPDATE_SNAPSHOTS=1 rewrites it)",
        fig.name,
        path.display()
    );
}

/// Decodes the PNG and checks its size and that it is a real picture: many distinct colours
/// (anti-aliased text and lines) and a fair share of non-white pixels.
fn check_png(fig: &Figure, width: u32, height: u32) {
    let img = image::load_from_memory_with_format(&fig.png, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("{}.png does not decode: {e}", fig.name))
        .to_rgb8();
    assert_eq!(img.dimensions(), (width, height), "{}.png size", fig.name);
    let mut colours = std::collections::HashSet::new();
    let mut ink = 0usize;
    for p in img.pixels() {
        colours.insert(p.0);
        if p.0 != [255, 255, 255] {
            ink += 1;
        }
    }
    assert!(
        colours.len() >= 20,
        "{}.png has only {} colours",
        fig.name,
        colours.len()
    );
    let share = ink as f64 / (width * height) as f64;
    assert!(
        share > 0.02,
        "{}.png is nearly blank ({:.2}% non-white)",
        fig.name,
        share * 100.0
    );
}

fn assert_contains_all(fig: &Figure, wanted: &[&str]) {
    let texts = svg_texts(&fig.svg);
    for w in wanted {
        assert!(
            texts.iter().any(|t| t == w),
            "{}.svg has no text `{w}`; it has {texts:?}",
            fig.name
        );
    }
}

#[test]
fn loss_curves_have_a_legend_entry_per_lambda() {
    let h = history();
    let train = plots::loss_curves(&h, LossKind::Train).unwrap();
    let val = plots::loss_curves(&h, LossKind::Val).unwrap();
    for (fig, desc) in [
        (&train, "training cross-entropy"),
        (&val, "validation cross-entropy"),
    ] {
        check_png(fig, 960, 600);
        assert_contains_all(
            fig,
            &[
                "epoch",
                desc,
                "λ = 0",
                "λ = 1e-4",
                "λ = 0.001",
                "λ = 0.01",
                "λ = 0.1",
            ],
        );
        check_snapshot(fig);
    }
    assert_eq!(train.title, "Training loss");
    // Validation only on even epochs: its x axis still runs over epochs.
    assert!(plots::loss_curves(&h[..1], LossKind::Val).is_err());
}

#[test]
fn error_bar_plot_puts_zero_on_its_own_tick() {
    let fig = plots::loss_error_bars(&history()).unwrap();
    check_png(&fig, 960, 600);
    assert_contains_all(
        &fig,
        &[
            "L2 strength λ (log scale; λ = 0 set apart on the left)",
            "cross-entropy",
            "training loss",
            "validation loss",
            "0",
            "1e-4",
            "0.001",
            "0.01",
            "0.1",
        ],
    );
    check_snapshot(&fig);
}

#[test]
fn accuracy_spread_across_seeds() {
    let runs: Vec<Vec<HistoryRow>> = (0..3)
        .map(|seed| {
            history()
                .into_iter()
                .map(|mut r| {
                    r.val_accuracy = r.val_accuracy.map(|a| a + 0.01 * seed as f64);
                    r
                })
                .collect()
        })
        .collect();
    let acc = report::final_accuracies(&runs);
    assert_eq!(acc.len(), 5);
    assert!(acc.iter().all(|a| a.accuracies.len() == 3));
    let fig = plots::accuracy_spread(&acc).unwrap();
    check_png(&fig, 960, 600);
    assert_contains_all(
        &fig,
        &[
            "Final validation accuracy over 3 seeds (mean ± std)",
            "validation accuracy",
            "mean ± std across seeds",
            "one seed",
        ],
    );
    check_snapshot(&fig);
    assert!(plots::accuracy_spread(&[]).is_err());
}

#[test]
fn confusion_heatmap_and_per_class_bars_name_every_class() {
    let names = class_names();
    let cm = confusion();
    let heat = plots::confusion_heatmap(&cm, &names).unwrap();
    check_png(&heat, 900, 820);
    let mut wanted: Vec<&str> = CLASSES.to_vec();
    wanted.extend(["predicted class", "true class", "60", "87"]);
    assert_contains_all(&heat, &wanted);
    check_snapshot(&heat);

    let bars = plots::per_class_accuracy(&cm, &names).unwrap();
    check_png(&bars, 900, 560);
    assert_contains_all(&bars, &CLASSES);
    check_snapshot(&bars);

    assert!(plots::confusion_heatmap(&cm[..3], &names).is_err());
}

#[test]
fn figures_are_written_as_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let fig = plots::loss_curves(&history(), LossKind::Train).unwrap();
    let [png, svg] = fig.write(dir.path()).unwrap();
    assert_eq!(png, dir.path().join("train_loss.png"));
    assert_eq!(std::fs::read(&png).unwrap(), fig.png);
    assert!(
        std::fs::read_to_string(&svg)
            .unwrap()
            .contains("Training loss")
    );
}

// ---------------------------------------------------------------------------------------
// A whole run directory, on synthetic CIFAR-format data and synthetic features.

fn h32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

fn unit(tag: u32, i: usize) -> f32 {
    h32(tag.wrapping_mul(0x9e37_79b9) ^ i as u32) as f32 / u32::MAX as f32
}

/// A class-coloured 32×32 image with a disc whose place depends on `i` (`[3, 32, 32]`).
fn synthetic_image(label: u8, i: usize) -> Vec<u8> {
    const COLOURS: [[u8; 3]; 10] = [
        [70, 130, 200],
        [200, 60, 60],
        [90, 160, 70],
        [230, 160, 60],
        [140, 100, 60],
        [180, 120, 200],
        [60, 170, 160],
        [120, 80, 40],
        [40, 80, 160],
        [100, 100, 100],
    ];
    let c = COLOURS[label as usize];
    let (cx, cy) = (8 + (i * 5) % 16, 8 + (i * 11) % 16);
    let mut img = vec![0u8; IMAGE_BYTES];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let d2 = (x as i32 - cx as i32).pow(2) + (y as i32 - cy as i32).pow(2);
            for ch in 0..3 {
                let base = c[ch] as i32 + (y as i32 - 16) * 2;
                let v = if d2 < 36 { 255 - c[ch] as i32 } else { base };
                img[ch * SIDE * SIDE + y * SIDE + x] = v.clamp(0, 255) as u8;
            }
        }
    }
    img
}

/// Writes a CIFAR-10 binary-version directory: tiny training batches and `n_test` test
/// images. Returns the test labels.
fn write_cifar(dir: &Path, n_test: usize) -> Vec<u8> {
    let bin = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = |label: u8, i: usize| {
        let mut r = vec![label];
        r.extend(synthetic_image(label, i));
        r
    };
    for b in 1..=5 {
        let bytes: Vec<u8> = (0..2).flat_map(|i| record((b + i) as u8 % 10, i)).collect();
        std::fs::write(bin.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let labels: Vec<u8> = (0..n_test).map(|i| (h32(i as u32) % 10) as u8).collect();
    let bytes: Vec<u8> = labels
        .iter()
        .enumerate()
        .flat_map(|(i, &l)| record(l, i))
        .collect();
    std::fs::write(bin.join("test_batch.bin"), bytes).unwrap();
    std::fs::write(bin.join("batches.meta.txt"), CLASSES.join("\n") + "\n").unwrap();
    labels
}

const DIM: usize = 16;
const EXTRACTOR: &str =
    "synthetic-report-avgpool; weights sha256:00ff00ff; synthetic features; precision f32";

/// Features that make the classes learnable but not perfectly: a one-hot of the label plus
/// noise.
fn feature_set(labels: &[u8], tag: u32) -> FeatureSet {
    let mut features = Vec::with_capacity(labels.len() * DIM);
    for (i, &l) in labels.iter().enumerate() {
        for d in 0..DIM {
            let signal = if d == l as usize { 1.5 } else { 0.0 };
            features.push(signal + 2.0 * (unit(tag + d as u32, i) - 0.5));
        }
    }
    FeatureSet {
        features,
        labels: labels.to_vec(),
        index: (0..labels.len() as u32).collect(),
        dim: DIM,
        extractor: EXTRACTOR.parse().unwrap(),
        classes: cifar::class_names(),
    }
}

/// A finished run directory (sweep, test evaluation) over synthetic data; returns
/// (data directory, run directory, number of test images).
fn make_run(root: &Path) -> (PathBuf, PathBuf, usize) {
    let data = root.join("data");
    let n_test = 150;
    let test_labels = write_cifar(&data, n_test);
    let train_labels: Vec<u8> = (0..200).map(|i| (h32(1000 + i) % 10) as u8).collect();
    let val_labels: Vec<u8> = (0..60).map(|i| (h32(5000 + i) % 10) as u8).collect();
    let train_set = feature_set(&train_labels, 1);
    let val_set = feature_set(&val_labels, 2);
    let test_set = feature_set(&test_labels, 3);
    let run = root.join("run");
    let cfg = TrainConfig {
        epochs: 4,
        lr: 0.01,
        ..TrainConfig::default()
    };
    let opts = RunOptions {
        source: serde_json::json!({ "data": data.display().to_string(), "limit": n_test }),
        ..RunOptions::default()
    };
    let outcome = train::sweep(
        &train_set,
        &val_set,
        &[0.0, 1e-3, 1e-1],
        &cfg,
        &run,
        &opts,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let SweepOutcome::Finished(summary) = outcome else {
        panic!("sweep did not finish");
    };
    let ck = checkpoint::load(&run.join(&summary.chosen_checkpoint)).unwrap();
    let eval = evaluate::evaluate(&ck, &test_set, Split::Test).unwrap();
    evaluate::write_outputs(&eval, &run).unwrap();
    (data, run, n_test)
}

fn keep(run: &Path) {
    if let Ok(dir) = std::env::var("CIFAR_FINETUNE_KEEP_TEST_OUTPUT") {
        let dest = Path::new(&dir);
        std::fs::create_dir_all(dest.join("plots")).unwrap();
        for entry in std::fs::read_dir(run.join("plots")).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dest.join("plots").join(p.file_name().unwrap())).unwrap();
        }
        std::fs::copy(run.join("report.html"), dest.join("report.html")).unwrap();
    }
}

/// Every external reference `html` makes: absolute URLs, protocol-relative `src`/`href`,
/// CSS imports and `url(...)` that is not `data:`.
fn external_references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    let lower = html.to_ascii_lowercase();
    for scheme in ["http://", "https://", "ftp://", "ws://", "wss://"] {
        for (i, _) in lower.match_indices(scheme) {
            found.push(html[i..(i + 60).min(html.len())].to_string());
        }
    }
    for attr in ["src=", "href=", "srcset=", "action=", "poster=", "data="] {
        for (i, _) in lower.match_indices(attr) {
            // Only real attributes: preceded by whitespace.
            if i == 0 || !lower.as_bytes()[i - 1].is_ascii_whitespace() {
                continue;
            }
            let value = lower[i + attr.len()..].trim_start_matches(['"', '\'']);
            if !value.starts_with("data:") {
                found.push(html[i..(i + 60).min(html.len())].to_string());
            }
        }
    }
    for (i, _) in lower.match_indices("url(") {
        let value = lower[i + 4..].trim_start_matches(['"', '\'', ' ']);
        if !value.starts_with("data:") {
            found.push(html[i..(i + 60).min(html.len())].to_string());
        }
    }
    for (i, _) in lower.match_indices("@import") {
        found.push(html[i..(i + 60).min(html.len())].to_string());
    }
    for tag in [
        "<script",
        "<iframe",
        "<object",
        "<embed",
        "<link rel=\"stylesheet",
    ] {
        for (i, _) in lower.match_indices(tag) {
            found.push(html[i..(i + 60).min(html.len())].to_string());
        }
    }
    found
}

#[test]
fn external_reference_scanner_catches_each_kind() {
    for bad in [
        "<img src=\"http://example.com/a.png\">",
        "<img src=\"//example.com/a.png\">",
        "<link href='style.css'>",
        "<style>@import 'x.css';</style>",
        "<div style=\"background:url(pic.png)\"></div>",
        "<script>1</script>",
    ] {
        assert!(!external_references(bad).is_empty(), "missed: {bad}");
    }
    assert!(external_references("<img src=\"data:image/png;base64,AAAA\">").is_empty());
}

#[test]
fn run_report_is_complete_and_self_contained() {
    let root = tempfile::tempdir().unwrap();
    let (data, run, n_test) = make_run(root.path());
    // A second seed of the same sweep (here: this run's history, shifted) adds the spread plot.
    let mut other_seed = rundir::read_history(&run.join("history.csv")).unwrap();
    for r in &mut other_seed {
        r.val_accuracy = r.val_accuracy.map(|a| a * 0.9);
    }
    let out = report::write_run_report(
        &run,
        &ReportOptions {
            data_dir: Some(data.clone()),
            seed_histories: vec![other_seed],
            ..ReportOptions::default()
        },
    )
    .unwrap();
    keep(&run);
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    for name in [
        "train_loss",
        "val_loss",
        "loss_error_bars",
        "accuracy_spread",
        "confusion_matrix",
        "per_class_accuracy",
    ] {
        for ext in ["png", "svg"] {
            let p = run.join("plots").join(format!("{name}.{ext}"));
            assert!(p.is_file(), "{} missing", p.display());
            assert!(out.plots.contains(&p));
        }
    }
    let html = std::fs::read_to_string(&out.html).unwrap();
    assert!(
        html.len() < 2_000_000,
        "report.html is {} bytes",
        html.len()
    );
    assert!(html.starts_with("<!DOCTYPE html>"));
    for section in [
        "id=\"lambda\"",
        "id=\"config\"",
        "id=\"training\"",
        "id=\"test\"",
        "id=\"gallery\"",
    ] {
        assert!(html.contains(section), "no {section}");
    }
    // Configuration and fingerprints.
    assert!(html.contains(EXTRACTOR));
    assert!(html.contains("<code>00ff00ff</code>"));
    assert!(html.contains("Final validation accuracy over 2 seeds"));
    // The classification report names every class; the gallery holds every test image (150 ≥
    // 100: bounded), misclassified first.
    for c in CLASSES {
        assert!(html.contains(&format!("<td>{c}</td>")), "no row for {c}");
    }
    let items: Vec<&str> = html.split("<div class=\"item ").skip(1).collect();
    assert_eq!(items.len(), report::DEFAULT_GALLERY_SIZE.min(n_test));
    let kinds: Vec<bool> = items.iter().map(|i| i.starts_with("wrong")).collect();
    let first_right = kinds.iter().position(|w| !w).unwrap_or(kinds.len());
    assert!(kinds[..first_right].iter().all(|&w| w));
    assert!(
        kinds[first_right..].iter().all(|&w| !w),
        "mistakes after correct ones"
    );
    assert!(first_right > 0, "the synthetic run should make mistakes");
    assert!(html.contains("image-rendering:pixelated"));
    assert_eq!(
        html.matches("data:image/png;base64,").count(),
        items.len(),
        "one PNG data URI per gallery image"
    );
    // Each gallery image decodes to the 32×32 image of that index.
    let first = items[0];
    let b64 = first
        .split("base64,")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap();
    let index: usize = first
        .split("test image ")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .parse()
        .unwrap();
    let png = BASE64_STANDARD.decode(b64).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (32, 32));
    let part = cifar_finetune::data::cifar::load_part(
        &data,
        cifar_finetune::data::cifar::Part::Test,
        None,
    )
    .unwrap();
    let chw = part.image(index);
    assert_eq!(img.get_pixel(5, 7).0[1], chw[SIDE * SIDE + 7 * SIDE + 5]);

    assert_eq!(external_references(&html), Vec::<String>::new());
}

#[test]
fn missing_test_outputs_and_images_are_noted_not_fatal() {
    let root = tempfile::tempdir().unwrap();
    let (_data, run, _) = make_run(root.path());
    // No data directory where config.json says: the gallery is left out with a note.
    std::fs::remove_dir_all(root.path().join("data")).unwrap();
    std::fs::remove_file(run.join("metrics.json")).unwrap();
    let out = report::write_run_report(&run, &ReportOptions::default()).unwrap();
    let notes = out.notes.join("\n");
    assert!(notes.contains("metrics.json"), "{notes}");
    assert!(notes.contains("not in"), "{notes}");
    let html = std::fs::read_to_string(&out.html).unwrap();
    assert!(!html.contains("id=\"gallery\""));
    assert!(!html.contains("id=\"test\""));
    assert!(html.contains("metrics.json"));
    // No run at all: a clear error naming the file.
    let err = report::write_run_report(root.path(), &ReportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn gallery_refuses_images_that_were_not_evaluated() {
    let root = tempfile::tempdir().unwrap();
    let (data, run, n_test) = make_run(root.path());
    // Other images under the same name: labels no longer match predictions.csv.
    let bin = data.join("cifar-10-batches-bin/test_batch.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    for i in 0..n_test {
        bytes[i * (1 + IMAGE_BYTES)] = (bytes[i * (1 + IMAGE_BYTES)] + 1) % 10;
    }
    std::fs::write(&bin, bytes).unwrap();
    let err = report::write_run_report(
        &run,
        &ReportOptions {
            data_dir: Some(data),
            ..ReportOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("not the images"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Headless Chromium.

fn find_chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// What headless Chromium did with a page.
struct Rendered {
    dom: String,
    /// `CONSOLE` lines of its log: console messages, CSP violations, failed loads.
    console: Vec<String>,
    /// URLs the page requested through the network stack (file:// and data: never go there).
    requests: Vec<String>,
}

fn render(chromium: &Path, page: &Path) -> Rendered {
    let tmp = tempfile::tempdir().unwrap();
    let net_log = tmp.path().join("net.json");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            // Nothing resolves: the browser's own background requests cannot leave the host.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!(
            "--user-data-dir={}",
            tmp.path().join("profile").display()
        ))
        .arg(format!("--log-net-log={}", net_log.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", chromium.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chromium failed ({}): {stderr}",
        out.status
    );
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&net_log).unwrap()).expect("net log is JSON");
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        .as_u64()
        .expect("net log names URL_REQUEST_START_JOB");
    let mut requests = Vec::new();
    for e in log["events"].as_array().unwrap() {
        if e["type"].as_u64() != Some(start_job) {
            continue;
        }
        let p = &e["params"];
        // The page's requests carry its (file://) site; the browser's own (update checks,
        // clock sync) do not and are not the page's doing.
        let from_page = ["network_isolation_key", "site_for_cookies"]
            .iter()
            .any(|k| p[k].as_str().is_some_and(|s| s.contains("file://")));
        if from_page {
            requests.push(p["url"].as_str().unwrap_or("?").to_string());
        }
    }
    Rendered {
        dom: String::from_utf8_lossy(&out.stdout).into_owned(),
        console,
        requests,
    }
}

#[test]
fn chromium_renders_the_report_offline_without_errors() {
    let Some(chromium) = find_chromium() else {
        // CI (which sets CI=true and installs Chromium) must run this test; elsewhere a
        // machine without Chromium skips it, saying so.
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        if !ci || std::env::var("CIFAR_FINETUNE_SKIP_CHROMIUM").as_deref() == Ok("1") {
            eprintln!(
                "skipped: no chromium installed (apt-get install -y chromium to run this test)"
            );
            return;
        }
        panic!(
            "headless Chromium is needed for this test: install Debian's `chromium` \
             (apt-get install -y chromium), point CHROMIUM at a binary, or set \
             CIFAR_FINETUNE_SKIP_CHROMIUM=1 to skip it"
        );
    };
    let root = tempfile::tempdir().unwrap();

    // The checker must see a bad page's request and console output, or it proves nothing.
    let bad = root.path().join("bad.html");
    std::fs::write(
        &bad,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>bad</title></head><body>\
         <img src=\"http://127.0.0.1:9/x.png\"><script>console.error('boom')</script>\
         </body></html>",
    )
    .unwrap();
    let r = render(&chromium, &bad);
    assert!(
        r.requests.iter().any(|u| u.contains("127.0.0.1:9")),
        "the net log check missed a request: {:?}",
        r.requests
    );
    assert!(
        r.console.iter().any(|l| l.contains("boom")),
        "the console check missed console.error: {:?}",
        r.console
    );

    let (data, run, _) = make_run(root.path());
    let out = report::write_run_report(
        &run,
        &ReportOptions {
            data_dir: Some(data),
            ..ReportOptions::default()
        },
    )
    .unwrap();
    let r = render(&chromium, &out.html);
    assert!(
        r.requests.is_empty(),
        "requests left the file: {:?}",
        r.requests
    );
    assert!(r.console.is_empty(), "console output: {:#?}", r.console);
    // It was really parsed and laid out: the sections and every gallery image are in the DOM.
    assert!(
        r.dom.contains("id=\"gallery\""),
        "{}",
        &r.dom[..r.dom.len().min(500)]
    );
    assert_eq!(r.dom.matches("class=\"thumb\"").count(), 100);
    assert!(r.dom.contains("<svg"));
}
