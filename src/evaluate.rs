//! Scoring a checkpoint on held-out features (the test split): loss, accuracy, per-class
//! accuracy, the confusion matrix, the classification report and every image's class
//! probabilities — the original script's "Accuracy of the network on the 10000 test images"
//! and per-class accuracies, plus what a report needs.
//!
//! Any split can be scored (`test --split val|test`). [`write_outputs`] writes, atomically,
//! for the test split (for another split `S`, `metrics-S.json` and `predictions-S.csv`, see
//! [`output_names`]):
//! * `metrics.json` ([`TestMetrics`]): the numbers (top-1 and, as scikit-learn's
//!   `top_k_accuracy_score`, top-5 accuracy), the confusion matrix (rows true class, columns
//!   predicted), the sklearn-format report, and which checkpoint/features they are for;
//! * `predictions.csv`: `index,true,predicted,<class 0 name>,…,<class C−1 name>` — the
//!   image's index within its dataset part, the true and predicted class ids, and the C
//!   softmax probabilities (one column per class, whatever C is), after a first line
//!   `# checkpoint sha256:<hex>` naming the checkpoint file, as `metrics.json` does:
//!   [`check_pair`] refuses a pair from two evaluations. A class name holding a comma or a
//!   quote is quoted as RFC 4180 does. [`read_predictions`] parses it back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::data::cifar::Split;
use crate::error::{Error, Result};
use crate::features::{FeatureSet, Fingerprint};
use crate::metrics::{Metrics, top_k_accuracy};

/// Format tag of `metrics.json`.
pub const METRICS_FORMAT: &str = "cifar-finetune test metrics v1";

/// The evaluation of a head on one split.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// What `metrics.json` holds.
    pub metrics: TestMetrics,
    /// Each image's index within its dataset part, `[N]`.
    pub index: Vec<u32>,
    /// True classes, `[N]`.
    pub labels: Vec<u8>,
    /// Predicted classes (arg-max), `[N]`.
    pub predicted: Vec<u8>,
    /// Softmax probabilities, `[N, C]` row-major.
    pub probabilities: Vec<f32>,
}

/// `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestMetrics {
    /// [`METRICS_FORMAT`].
    pub format: String,
    /// The split scored.
    pub split: Split,
    /// The checkpoint file scored.
    pub checkpoint: PathBuf,
    /// The sha256 of the checkpoint file as scored, also in `predictions.csv`'s first line,
    /// so that a `metrics.json` and a `predictions.csv` of different evaluations are told
    /// apart; absent from files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_sha256: Option<String>,
    /// Its λ.
    pub lambda: f32,
    /// Its epoch.
    pub epoch: usize,
    /// Fingerprint of the features (equal to the checkpoint's).
    pub extractor: Fingerprint,
    /// Number of images.
    pub count: usize,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified correctly.
    pub accuracy: f64,
    /// Fraction whose true class is among the 5 most probable (scikit-learn's
    /// `top_k_accuracy_score`, k = 5); absent from files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5_accuracy: Option<f64>,
    /// Class names, in label order.
    pub class_names: Vec<String>,
    /// Per-class accuracy (fraction of each class's images classified correctly).
    pub per_class_accuracy: Vec<f64>,
    /// Confusion matrix, precision/recall/F1/support, averages.
    pub metrics: Metrics,
    /// The classification report as scikit-learn prints it (digits = 2).
    pub report: String,
}

impl TestMetrics {
    /// Reads a `metrics.json`.
    pub fn read(path: &Path) -> Result<TestMetrics> {
        crate::io::read_json(path)
    }
}

/// Scores `checkpoint` on `features` (from `split`); refuses features from another extractor.
pub fn evaluate(
    checkpoint: &Checkpoint,
    features: &FeatureSet,
    split: Split,
) -> Result<Evaluation> {
    checkpoint.check_features(features)?;
    if features.is_empty() {
        return Err(Error::invalid(
            format!("{split} split"),
            "has no samples to evaluate (check the image limit)",
        ));
    }
    let head = &checkpoint.head;
    let p = head.predict(&features.features, &features.labels)?;
    let names = checkpoint.meta.classes.clone();
    let metrics = Metrics::from_predictions(&features.labels, &p.predicted, &names)?;
    let count = features.len();
    let loss = p.losses.iter().map(|&l| f64::from(l)).sum::<f64>() / count as f64;
    let top5 = top_k_accuracy(&features.labels, &p.probabilities, head.dims.classes, 5)?;
    // Never report NaN as a result (JSON would even write it as null): a non-finite loss
    // means the head's output overflowed on these features.
    if !(loss.is_finite() && metrics.accuracy.is_finite() && top5.is_finite()) {
        return Err(Error::Numerical(format!(
            "{}: on the {split} split the loss is {loss}, the accuracy {} and the top-5 \
             accuracy {top5}: the head's outputs are not finite on these features, so no \
             metrics are written",
            checkpoint.path.display(),
            metrics.accuracy
        )));
    }
    let test = TestMetrics {
        format: METRICS_FORMAT.to_string(),
        split,
        checkpoint: checkpoint.path.clone(),
        checkpoint_sha256: checkpoint.sha256.clone(),
        lambda: checkpoint.meta.lambda,
        epoch: checkpoint.meta.epoch,
        extractor: features.extractor.clone(),
        count,
        loss,
        accuracy: metrics.accuracy,
        top5_accuracy: Some(top5),
        class_names: names,
        per_class_accuracy: metrics.classes.iter().map(|c| c.recall).collect(),
        report: metrics.classification_report(2),
        metrics,
    };
    Ok(Evaluation {
        metrics: test,
        index: features.index.clone(),
        labels: features.labels.clone(),
        predicted: p.predicted,
        probabilities: p.probabilities,
    })
}

/// The file names of a split's results: `metrics.json` and `predictions.csv` for the test
/// split (what the report's test section reads), `metrics-<split>.json` and
/// `predictions-<split>.csv` for the others, so evaluating the validation split never
/// overwrites the test results.
pub fn output_names(split: Split) -> (String, String) {
    match split {
        Split::Test => ("metrics.json".into(), "predictions.csv".into()),
        other => (
            format!("metrics-{other}.json"),
            format!("predictions-{other}.csv"),
        ),
    }
}

/// Writes the split's metrics and predictions ([`output_names`]) into `dir`; returns their
/// paths.
pub fn write_outputs(eval: &Evaluation, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (m, p) = output_names(eval.metrics.split);
    let metrics_path = dir.join(m);
    let predictions_path = dir.join(p);
    crate::io::write_json(&metrics_path, &eval.metrics)?;
    let c = eval.metrics.class_names.len();
    let mut text = String::new();
    if let Some(digest) = &eval.metrics.checkpoint_sha256 {
        text.push_str(&format!("{DIGEST_PREFIX}{digest}\n"));
    }
    text.push_str("index,true,predicted");
    for name in &eval.metrics.class_names {
        text.push(',');
        text.push_str(&csv_field(name));
    }
    text.push('\n');
    for (i, probs) in eval.probabilities.chunks(c).enumerate() {
        text.push_str(&format!(
            "{},{},{}",
            eval.index[i], eval.labels[i], eval.predicted[i]
        ));
        for p in probs {
            text.push_str(&format!(",{p}"));
        }
        text.push('\n');
    }
    crate::io::atomic_write_bytes(&predictions_path, text.as_bytes())?;
    Ok((metrics_path, predictions_path))
}

/// Start of `predictions.csv`'s optional first line, `# checkpoint sha256:<hex>`.
pub const DIGEST_PREFIX: &str = "# checkpoint sha256:";

/// Refuses a `metrics.json` and a `predictions.csv` that come from different evaluations
/// (their checkpoint digests differ, or only one has one): a failed or interrupted `test`
/// can leave one file of the pair from an earlier model. Two files written before digests
/// existed are accepted.
pub fn check_pair(
    metrics: &TestMetrics,
    metrics_path: &Path,
    predictions_path: &Path,
) -> Result<()> {
    let predicted = read_predictions_digest(predictions_path)?;
    if metrics.checkpoint_sha256 == predicted {
        return Ok(());
    }
    let show = |d: &Option<String>| {
        d.as_deref().map_or("no digest".to_string(), |d| {
            format!("checkpoint sha256 {d}")
        })
    };
    Err(Error::Fingerprint {
        path: predictions_path.to_path_buf(),
        msg: format!(
            "has {}, but {} has {}: the two files come from different evaluations; run \
             `test` again to write both",
            show(&predicted),
            metrics_path.display(),
            show(&metrics.checkpoint_sha256)
        ),
    })
}

/// The checkpoint digest in a `predictions.csv`'s first line, `None` when it has none.
pub fn read_predictions_digest(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    Ok(text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(DIGEST_PREFIX))
        .map(|d| d.trim().to_string()))
}

/// One row of `predictions.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionRow {
    /// The image's index within its dataset part.
    pub index: u32,
    /// True class id.
    pub true_class: u8,
    /// Predicted class id.
    pub predicted: u8,
    /// Softmax probability of each class.
    pub probabilities: Vec<f32>,
}

/// Parses a `predictions.csv` written by [`write_outputs`]; returns the class names of its
/// header and the rows.
pub fn read_predictions(path: &Path) -> Result<(Vec<String>, Vec<PredictionRow>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let mut lines = text.lines().peekable();
    // The checkpoint's digest, in files written since it existed.
    let skipped = usize::from(lines.next_if(|l| l.starts_with(DIGEST_PREFIX)).is_some());
    let header = lines
        .next()
        .ok_or_else(|| Error::format(path, "empty file"))?;
    let cols = csv_split(header);
    if cols.len() < 4 || cols[..3] != ["index", "true", "predicted"] {
        return Err(Error::format(
            path,
            "the header is not `index,true,predicted,<class names>`",
        ));
    }
    let names: Vec<String> = cols[3..].to_vec();
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let bad = |what: &str| Error::format(path, format!("line {}: {what}", i + 2 + skipped));
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != cols.len() {
            return Err(bad(&format!(
                "{} fields, expected {}",
                cells.len(),
                cols.len()
            )));
        }
        let class = |s: &str| -> Result<u8> {
            let v: u8 = s.parse().map_err(|_| bad("a class id is not a number"))?;
            if (v as usize) < names.len() {
                Ok(v)
            } else {
                Err(bad("a class id is out of range"))
            }
        };
        rows.push(PredictionRow {
            index: cells[0]
                .parse()
                .map_err(|_| bad("the index is not a number"))?,
            true_class: class(cells[1])?,
            predicted: class(cells[2])?,
            probabilities: cells[3..]
                .iter()
                .map(|s| s.parse().map_err(|_| bad("a probability is not a number")))
                .collect::<Result<_>>()?,
        });
    }
    Ok((names, rows))
}

/// A CSV field as RFC 4180 writes it: in double quotes, inner quotes doubled, when it holds
/// a comma, a quote or a line break; as it is otherwise.
fn csv_field(field: &str) -> std::borrow::Cow<'_, str> {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\"")).into()
    } else {
        field.into()
    }
}

/// The fields of one CSV line written with [`csv_field`].
fn csv_split(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Where `test` writes by default: the run directory of a checkpoint inside
/// `<run>/lambda_<λ>/`, i.e. its grandparent when that holds `config.json`, else the
/// checkpoint's own directory.
pub fn default_output_dir(checkpoint: &Path) -> PathBuf {
    let dir = checkpoint
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match dir.parent() {
        Some(run) if run.join("config.json").exists() => run.to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_round_trip() {
        let names = ["plain", "a,b", "say \"hi\"", "", "x\"", "\"lead"];
        let line = names
            .iter()
            .map(|n| csv_field(n).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            line,
            "plain,\"a,b\",\"say \"\"hi\"\"\",,\"x\"\"\",\"\"\"lead\""
        );
        assert_eq!(csv_split(&line), names);
        assert_eq!(
            csv_split("index,true,predicted"),
            ["index", "true", "predicted"]
        );
    }
}
