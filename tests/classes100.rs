//! A hundred classes through every output: metrics against scikit-learn at 100 and 20
//! classes (`tools/gen_cifar100_fixtures.py`), then a 100-class run end to end on clustered
//! synthetic 2048-d features with CIFAR-100's class names — training, evaluation,
//! `metrics.json`, `predictions.csv` and `report.html` with its gallery read from a
//! CIFAR-100 directory — checked complete and readable: a row per class, a probability
//! column per class, a heat map without numbers, the confused pairs listed (siblings built
//! to be confused come first), accuracy far above chance.
//!
//! `CIFAR_FINETUNE_KEEP_TEST_OUTPUT=DIR` copies the run directory's report and plots to `DIR`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::{IMAGE_BYTES, Split};
use cifar_finetune::data::cifar100::RECORD_BYTES;
use cifar_finetune::evaluate;
use cifar_finetune::features::FeatureSet;
use cifar_finetune::metrics::Metrics;
use cifar_finetune::report::plots;
use cifar_finetune::report::{self, ReportOptions};
use cifar_finetune::rundir::TrainConfig;
use cifar_finetune::train::{self, RunOptions, SweepOutcome};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar100")
}

// ---------------------------------------------------------------------------------------
// Metrics at 100 and 20 classes against scikit-learn.

#[test]
fn metrics_report_and_confused_pairs_equal_sklearn_at_100_and_20_classes() {
    let text = std::fs::read_to_string(fixtures().join("metrics.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in ["fine", "coarse"] {
        let c = &fixture[case];
        let names: Vec<String> = serde_json::from_value(c["classes"].clone()).unwrap();
        let y_true: Vec<u8> = serde_json::from_value(c["y_true"].clone()).unwrap();
        let y_pred: Vec<u8> = serde_json::from_value(c["y_pred"].clone()).unwrap();
        let m = Metrics::from_predictions(&y_true, &y_pred, &names).unwrap();
        let confusion: Vec<Vec<u64>> = serde_json::from_value(c["confusion"].clone()).unwrap();
        assert_eq!(m.confusion, confusion, "{case}");
        let close = |what: &str, a: f64, b: &serde_json::Value| {
            let b = b.as_f64().unwrap();
            assert!(
                (a - b).abs() < 1e-12,
                "{case} {what}: ours {a}, sklearn {b}"
            );
        };
        for (k, cm) in m.classes.iter().enumerate() {
            close(&format!("precision[{k}]"), cm.precision, &c["precision"][k]);
            close(&format!("recall[{k}]"), cm.recall, &c["recall"][k]);
            close(&format!("f1[{k}]"), cm.f1, &c["f1"][k]);
            assert_eq!(cm.support, c["support"][k].as_u64().unwrap());
        }
        close("accuracy", m.accuracy, &c["accuracy"]);
        close("macro f1", m.macro_avg.f1, &c["macro"]["f1"]);
        close("weighted f1", m.weighted_avg.f1, &c["weighted"]["f1"]);
        assert_eq!(
            m.classification_report(2),
            c["report"].as_str().unwrap(),
            "{case}: the report text differs from sklearn's"
        );
        let pairs = m.most_confused(10);
        let want = c["most_confused"].as_array().unwrap();
        assert_eq!(pairs.len(), want.len(), "{case}");
        for (p, w) in pairs.iter().zip(want) {
            assert_eq!(p.true_class as u64, w["true"].as_u64().unwrap(), "{case}");
            assert_eq!(
                p.predicted as u64,
                w["predicted"].as_u64().unwrap(),
                "{case}"
            );
            assert_eq!(p.count, w["count"].as_u64().unwrap(), "{case}");
            close("share", p.share, &w["share"]);
        }
    }
}

#[test]
fn twenty_superclasses_keep_their_counts_and_long_names_in_class_order() {
    let text = std::fs::read_to_string(fixtures().join("metrics.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = &fixture["coarse"];
    let names: Vec<String> = serde_json::from_value(c["classes"].clone()).unwrap();
    let confusion: Vec<Vec<u64>> = serde_json::from_value(c["confusion"].clone()).unwrap();
    let heat = plots::confusion_heatmap(&confusion, &names).unwrap();
    if let Ok(dir) = std::env::var("CIFAR_FINETUNE_KEEP_TEST_OUTPUT") {
        std::fs::create_dir_all(&dir).unwrap();
        heat.write(Path::new(&dir)).unwrap();
    }
    let texts = svg_texts(&heat.svg);
    // Every cell's count, zeros included, and every name on both axes.
    let counts = texts.iter().filter(|t| t.parse::<u64>().is_ok()).count();
    assert_eq!(counts, 20 * 20);
    for name in &names {
        assert_eq!(texts.iter().filter(|t| *t == name).count(), 2, "{name}");
    }
    // The longest name, `large_omnivores_and_herbivores`, fits left of the grid: the
    // figure is wider than CIFAR-10's 900 px.
    assert!(
        heat.width > 900 && heat.height > 820,
        "{}×{}",
        heat.width,
        heat.height
    );
    let png = image::load_from_memory(&heat.png).unwrap();
    assert_eq!((png.width(), png.height()), (heat.width, heat.height));

    let bars = plots::per_class_accuracy(&confusion, &names).unwrap();
    let order: Vec<String> = svg_texts(&bars.svg)
        .into_iter()
        .filter(|t| names.contains(t))
        .collect();
    assert_eq!(order, names, "20 classes keep their order");
    assert_eq!(bars.title, "Accuracy per class (test set)");
}

// ---------------------------------------------------------------------------------------
// A 100-class run.

const DIM: usize = 2048;
const TRAIN_PER_CLASS: usize = 24;
const VAL_PER_CLASS: usize = 5;
const TEST_PER_CLASS: usize = 10;
const EXTRACTOR: &str =
    "resnet50-avgpool; weights sha256:0a0b0c0d; synthetic features; precision f32";

fn h32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// A deterministic value in [0, 1).
fn unit(a: u32, b: u32) -> f32 {
    h32(a.wrapping_mul(0x9e37_79b9) ^ h32(b)) as f32 / (u32::MAX as f32 + 1.0)
}

/// CIFAR-100's fine class names, from the fixture.
fn fine_names() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("cifar-100-binary/fine_label_names.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Class `k`'s centre, `[DIM]`, non-negative like pooled ReLU features. Classes 2j and
/// 2j+1 are siblings: the odd one is the even one moved a little, so the head confuses them
/// more than any other pair.
fn centre(k: usize) -> Vec<f32> {
    let base = k & !1;
    (0..DIM)
        .map(|d| {
            let mut v = 0.8 * unit(base as u32, d as u32);
            if k % 2 == 1 {
                v += 0.22 * (unit(1000 + k as u32, d as u32) - 0.5);
            }
            v.max(0.0)
        })
        .collect()
}

/// `per_class` samples of every class, class-major, each its centre plus noise.
fn feature_set(per_class: usize, tag: u32, classes: &[String]) -> FeatureSet {
    let centres: Vec<Vec<f32>> = (0..classes.len()).map(centre).collect();
    let n = per_class * classes.len();
    let mut features = Vec::with_capacity(n * DIM);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        // Interleaved classes, so a prefix has all of them.
        let k = i % classes.len();
        for (d, c) in centres[k].iter().enumerate() {
            let noise = unit(tag.wrapping_mul(7919) ^ i as u32, d as u32) - 0.5;
            features.push(c + 0.7 * noise);
        }
        labels.push(k as u8);
    }
    FeatureSet {
        features,
        labels,
        index: (0..n as u32).collect(),
        dim: DIM,
        extractor: EXTRACTOR.parse().unwrap(),
        classes: classes.to_vec(),
    }
}

/// A `cifar-100-binary/` whose test part has one image per test feature, with its label,
/// and the fixture's class-name files: what the report's gallery reads.
fn write_cifar100(dir: &Path, test_labels: &[u8]) {
    let bin = dir.join("cifar-100-binary");
    std::fs::create_dir_all(&bin).unwrap();
    for f in ["fine_label_names.txt", "coarse_label_names.txt"] {
        std::fs::copy(fixtures().join("cifar-100-binary").join(f), bin.join(f)).unwrap();
    }
    let mut raw = Vec::with_capacity(test_labels.len() * RECORD_BYTES);
    for (i, &fine) in test_labels.iter().enumerate() {
        // The coarse byte only has to be a valid superclass id here.
        raw.extend([fine / 5, fine]);
        raw.extend((0..IMAGE_BYTES).map(|j| ((j * 3 + i * 7 + fine as usize * 11) % 256) as u8));
    }
    std::fs::write(bin.join("test.bin"), raw).unwrap();
}

/// The text of every `<text>` element of an SVG.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let open = t.find('>')?;
            let close = t.find("</text>")?;
            Some(t[open + 1..close].trim().to_string())
        })
        .collect()
}

/// The cells of each `<tr>` of the table with `id` in `html`.
fn table_rows(html: &str, id: &str) -> Vec<Vec<String>> {
    let start = html
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id}"));
    let table = &html[start..start + html[start..].find("</table>").unwrap()];
    let body = &table[table.find("<tbody>").unwrap()..];
    body.split("<tr")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let open = cell.find('>').unwrap();
                    let close = cell.find("</td>").unwrap();
                    cell[open + 1..close].to_string()
                })
                .collect()
        })
        .collect()
}

fn keep(run: &Path) {
    if let Ok(dir) = std::env::var("CIFAR_FINETUNE_KEEP_TEST_OUTPUT") {
        let dest = Path::new(&dir);
        std::fs::create_dir_all(dest.join("plots")).unwrap();
        for entry in std::fs::read_dir(run.join("plots")).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dest.join("plots").join(p.file_name().unwrap())).unwrap();
        }
        for f in ["report.html", "metrics.json", "predictions.csv"] {
            std::fs::copy(run.join(f), dest.join(f)).unwrap();
        }
    }
}

#[test]
fn a_hundred_class_run_writes_complete_readable_outputs() {
    let names = fine_names();
    assert_eq!(names.len(), 100);
    let train_set = feature_set(TRAIN_PER_CLASS, 1, &names);
    let val_set = feature_set(VAL_PER_CLASS, 2, &names);
    let test_set = feature_set(TEST_PER_CLASS, 3, &names);
    let n_test = test_set.len();

    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_cifar100(&data, &test_set.labels);
    let run = root.path().join("run");
    let cfg = TrainConfig {
        epochs: 6,
        lr: 0.01,
        batch_size: 16,
        ..TrainConfig::default()
    };
    let opts = RunOptions {
        source: serde_json::json!({ "dataset": "cifar100", "data": data.display().to_string() }),
        ..RunOptions::default()
    };
    let outcome = train::sweep(
        &train_set,
        &val_set,
        &[1e-4],
        &cfg,
        &run,
        &opts,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let SweepOutcome::Finished(summary) = outcome else {
        panic!("the sweep stopped early");
    };
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    let ck = checkpoint::load(&run.join(&summary.chosen_checkpoint)).unwrap();
    assert_eq!(ck.meta.classes, names);
    assert_eq!(ck.head.dims.classes, 100);
    let eval = evaluate::evaluate(&ck, &test_set, Split::Test).unwrap();
    let (metrics_path, predictions_path) = evaluate::write_outputs(&eval, &run).unwrap();

    // Far above chance (1 %), short of perfect: the siblings are confused.
    let m = &eval.metrics;
    assert!(m.accuracy > 0.6, "accuracy {}", m.accuracy);
    assert!(m.accuracy < 1.0, "no mistakes: nothing to list as confused");
    let top5 = m.top5_accuracy.unwrap();
    assert!(top5 > m.accuracy && top5 > 0.9, "top-5 {top5}");

    // metrics.json: every class, the 100×100 matrix, the report with a line per class.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics_path).unwrap()).unwrap();
    assert_eq!(json["class_names"].as_array().unwrap().len(), 100);
    assert_eq!(json["per_class_accuracy"].as_array().unwrap().len(), 100);
    let confusion = json["metrics"]["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 100);
    assert!(confusion.iter().all(|r| r.as_array().unwrap().len() == 100));
    let total: u64 = confusion
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, n_test as u64);
    let report_text = json["report"].as_str().unwrap();
    for name in &names {
        assert!(
            report_text
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{name} "))),
            "no report line for {name}"
        );
    }

    // predictions.csv: index, true, predicted and a probability column per class, in order.
    let csv = std::fs::read_to_string(&predictions_path).unwrap();
    let mut lines = csv.lines().skip(1);
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header.len(), 3 + 100);
    assert_eq!(
        header[3..],
        names.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    let (read_names, rows) = evaluate::read_predictions(&predictions_path).unwrap();
    assert_eq!(read_names, names);
    assert_eq!(rows.len(), n_test);
    for r in &rows {
        assert_eq!(r.probabilities.len(), 100);
        let sum: f32 = r.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "row {}: {sum}", r.index);
    }

    // report.html.
    let out = report::write_run_report(&run, &ReportOptions::default()).unwrap();
    keep(&run);
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    let html = std::fs::read_to_string(&out.html).unwrap();
    assert!(html.contains("<h1>CIFAR-100 on frozen ResNet-50 features</h1>"));

    // A row per class, sorted by recall, worst first.
    let mut per_class = table_rows(&html, "per-class");
    assert_eq!(per_class.len(), 100 + 3);
    let averages: Vec<&str> = per_class[100..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(averages, ["accuracy", "macro avg", "weighted avg"]);
    per_class.truncate(100);
    let recalls: Vec<f64> = per_class.iter().map(|r| r[2].parse().unwrap()).collect();
    assert!(recalls.windows(2).all(|w| w[0] <= w[1]), "{recalls:?}");
    let mut listed: Vec<&str> = per_class.iter().map(|r| r[0].as_str()).collect();
    listed.sort_unstable();
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.sort_unstable();
    assert_eq!(listed, all);

    // The most confused pairs: ten, largest first, mostly the siblings built to be confused.
    let pairs = table_rows(&html, "confused");
    assert_eq!(pairs.len(), 10);
    let counts: Vec<u64> = pairs.iter().map(|r| r[3].parse().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    let index = |n: &str| names.iter().position(|x| x == n).unwrap();
    let siblings = pairs
        .iter()
        .filter(|r| index(&r[0]) ^ 1 == index(&r[2]))
        .count();
    assert!(
        siblings >= 7,
        "only {siblings} of the pairs are siblings: {pairs:?}"
    );
    let first = m.metrics.most_confused(1)[0];
    assert_eq!(pairs[0][0], names[first.true_class]);
    assert_eq!(pairs[0][4], format!("{:.2}%", first.share * 100.0));

    // The heat map: no count in any cell, every class named on both axes, shown at its own
    // size; no 100×100 table.
    let heat_svg = std::fs::read_to_string(run.join("plots/confusion_matrix.svg")).unwrap();
    let texts = svg_texts(&heat_svg);
    assert!(
        texts.iter().all(|t| t.parse::<u64>().is_err()),
        "a cell count is drawn: {texts:?}"
    );
    for name in &names {
        assert_eq!(
            texts.iter().filter(|t| *t == name).count(),
            2,
            "{name} is not on both axes"
        );
    }
    let heat = image::open(run.join("plots/confusion_matrix.png"))
        .unwrap()
        .to_rgb8();
    assert!(
        heat.width() > 1400 && heat.height() > 1400,
        "{:?}",
        heat.dimensions()
    );
    assert!(html.contains(&format!("max-width:none;width:{}px", heat.width() + 18)));
    assert!(!html.contains("<table class=\"cm\">"));
    assert!(html.contains("<code>metrics.confusion</code>"));

    // The per-class bars, worst first, a row per class.
    let bars_svg = std::fs::read_to_string(run.join("plots/per_class_accuracy.svg")).unwrap();
    let bar_texts = svg_texts(&bars_svg);
    assert!(bar_texts.iter().any(|t| t.contains("worst first")));
    let order: Vec<&String> = bar_texts.iter().filter(|t| names.contains(t)).collect();
    assert_eq!(order.len(), 100);
    assert_eq!(order[0], &per_class[0][0], "the worst class is not first");

    // The gallery, from the CIFAR-100 directory found by the class names.
    let items = html.split("<div class=\"item ").count() - 1;
    assert_eq!(items, report::DEFAULT_GALLERY_SIZE);
    assert!(html.contains("id=\"gallery\""));
}
