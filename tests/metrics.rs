//! Metrics against scikit-learn on a committed fixture (`tools/gen_head_fixtures.py`).

use cifar_finetune::metrics::{Metrics, classification_report, confusion_matrix};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    classes: Vec<String>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Avg {
    precision: f64,
    recall: f64,
    f1: f64,
}

#[derive(Deserialize)]
struct Case {
    y_true: Vec<u8>,
    y_pred: Vec<u8>,
    confusion: Vec<Vec<u64>>,
    precision: Vec<f64>,
    recall: Vec<f64>,
    f1: Vec<f64>,
    support: Vec<u64>,
    accuracy: f64,
    #[serde(rename = "macro")]
    macro_: Avg,
    weighted: Avg,
    report: String,
    report_digits4: String,
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string("tests/fixtures/head/metrics.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

fn close(what: &str, a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{what}: ours {a}, sklearn {b}");
}

#[test]
fn metrics_equal_sklearn() {
    let f = fixture();
    for (i, c) in f.cases.iter().enumerate() {
        let m = Metrics::from_predictions(&c.y_true, &c.y_pred, &f.classes).unwrap();
        assert_eq!(m.confusion, c.confusion, "case {i}: confusion matrix");
        assert_eq!(
            confusion_matrix(&c.y_true, &c.y_pred, 10).unwrap(),
            c.confusion
        );
        for (k, cm) in m.classes.iter().enumerate() {
            close(
                &format!("case {i} precision[{k}]"),
                cm.precision,
                c.precision[k],
            );
            close(&format!("case {i} recall[{k}]"), cm.recall, c.recall[k]);
            close(&format!("case {i} f1[{k}]"), cm.f1, c.f1[k]);
            assert_eq!(cm.support, c.support[k]);
            assert_eq!(cm.name, f.classes[k]);
        }
        close("accuracy", m.accuracy, c.accuracy);
        close("macro precision", m.macro_avg.precision, c.macro_.precision);
        close("macro recall", m.macro_avg.recall, c.macro_.recall);
        close("macro f1", m.macro_avg.f1, c.macro_.f1);
        close(
            "weighted precision",
            m.weighted_avg.precision,
            c.weighted.precision,
        );
        close("weighted recall", m.weighted_avg.recall, c.weighted.recall);
        close("weighted f1", m.weighted_avg.f1, c.weighted.f1);
        assert_eq!(m.total as usize, c.y_true.len());
    }
}

#[test]
fn report_string_equals_sklearn_exactly() {
    let f = fixture();
    for c in &f.cases {
        let ours = classification_report(&c.y_true, &c.y_pred, &f.classes, 2).unwrap();
        assert_eq!(ours, c.report, "\nours:\n{ours}\nsklearn:\n{}", c.report);
        let m = Metrics::from_predictions(&c.y_true, &c.y_pred, &f.classes).unwrap();
        assert_eq!(m.classification_report(4), c.report_digits4);
    }
}

#[test]
fn bad_input_is_rejected() {
    let names = ["a", "b"];
    assert!(Metrics::from_predictions(&[0, 1], &[0], &names).is_err());
    let err = Metrics::from_predictions(&[0, 2], &[0, 1], &names).unwrap_err();
    assert!(err.to_string().contains("outside the 2 classes"), "{err}");
    assert!(Metrics::from_predictions(&[], &[], &names).is_err());
    assert!(Metrics::from_confusion(vec![vec![1, 0]], &names).is_err());
}

#[test]
fn metrics_round_trip_through_json() {
    let f = fixture();
    let c = &f.cases[1];
    let m = Metrics::from_predictions(&c.y_true, &c.y_pred, &f.classes).unwrap();
    let text = serde_json::to_string(&m).unwrap();
    let back: Metrics = serde_json::from_str(&text).unwrap();
    assert_eq!(back, m);
}

#[derive(Deserialize)]
struct TopK {
    y_true: Vec<u8>,
    scores: Vec<Vec<f32>>,
    top_k: std::collections::BTreeMap<String, f64>,
}

/// Top-k accuracy equals scikit-learn's `top_k_accuracy_score`, ties included (a row of equal
/// scores, scores rounded to tenths): sklearn ranks equal scores by descending class index.
#[test]
fn top_k_accuracy_equals_sklearn() {
    let text = std::fs::read_to_string("tests/fixtures/head/top_k.json").unwrap();
    let f: TopK = serde_json::from_str(&text).unwrap();
    let flat: Vec<f32> = f.scores.iter().flatten().copied().collect();
    assert_eq!(f.top_k.len(), 10);
    for (k, want) in &f.top_k {
        let k: usize = k.parse().unwrap();
        let got = cifar_finetune::metrics::top_k_accuracy(&f.y_true, &flat, 10, k).unwrap();
        assert!(
            (got - want).abs() < 1e-12,
            "k = {k}: ours {got}, sklearn {want}"
        );
    }
    // Ties decide some hits: ranking equal scores by ascending index would change the result.
    let lowest_first = |k: usize| {
        f.y_true
            .iter()
            .zip(f.scores.iter())
            .filter(|&(&y, row)| {
                let s = row[y as usize];
                let ahead = row
                    .iter()
                    .enumerate()
                    .filter(|&(j, &v)| v > s || (v == s && j < y as usize))
                    .count();
                ahead < k
            })
            .count() as f64
            / f.y_true.len() as f64
    };
    assert!(
        (1..=10).any(|k| lowest_first(k) != f.top_k[&k.to_string()]),
        "the fixture does not exercise ties"
    );
}
