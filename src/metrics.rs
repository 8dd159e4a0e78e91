//! Classification metrics from labels alone (no tensors): confusion matrix, per-class
//! accuracy, precision, recall, F1 and support, their macro and weighted averages,
//! scikit-learn's `classification_report` text, and the most confused pairs of classes
//! (what a reader of a 100-class confusion matrix looks for).
//!
//! Definitions follow scikit-learn 1.x (`precision_recall_fscore_support` with
//! `zero_division="warn"`, i.e. 0/0 counts as 0): precision = tp / predicted,
//! recall = tp / support, F1 = 2·tp / (support + predicted); the macro average is the plain
//! mean over classes, the weighted average weights each class by its support. A test compares
//! all of them, and the report string, with scikit-learn's on a committed fixture.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The metrics of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Class name.
    pub name: String,
    /// tp / (tp + fp); 0 when the class is never predicted.
    pub precision: f64,
    /// tp / support; 0 when the class never occurs. This is also the per-class accuracy of
    /// the original script ("Accuracy of plane: 60 %").
    pub recall: f64,
    /// 2·tp / (support + predicted); 0 when both are 0.
    pub f1: f64,
    /// Number of samples of this class.
    pub support: u64,
}

/// Precision, recall and F1 averaged over classes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Averages {
    /// Averaged precision.
    pub precision: f64,
    /// Averaged recall.
    pub recall: f64,
    /// Averaged F1.
    pub f1: f64,
    /// Total number of samples.
    pub support: u64,
}

/// All metrics of a set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Confusion matrix `[classes][classes]`: rows are true classes, columns predicted ones.
    pub confusion: Vec<Vec<u64>>,
    /// Per-class metrics, in class order.
    pub classes: Vec<ClassMetrics>,
    /// Fraction of all samples classified correctly.
    pub accuracy: f64,
    /// Unweighted mean over classes.
    pub macro_avg: Averages,
    /// Mean over classes weighted by support.
    pub weighted_avg: Averages,
    /// Number of samples.
    pub total: u64,
}

/// One off-diagonal cell of a confusion matrix: images of one class predicted as another.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConfusedPair {
    /// The true class id.
    pub true_class: usize,
    /// The class predicted instead.
    pub predicted: usize,
    /// How many images of `true_class` were predicted as `predicted`.
    pub count: u64,
    /// `count` over the number of images of `true_class`.
    pub share: f64,
}

/// The confusion matrix of `y_true` against `y_pred` over `classes` classes (rows true,
/// columns predicted).
pub fn confusion_matrix(y_true: &[u8], y_pred: &[u8], classes: usize) -> Result<Vec<Vec<u64>>> {
    if y_true.len() != y_pred.len() {
        return Err(Error::invalid(
            "predictions",
            format!(
                "{} true labels but {} predictions",
                y_true.len(),
                y_pred.len()
            ),
        ));
    }
    let mut m = vec![vec![0u64; classes]; classes];
    for (&t, &p) in y_true.iter().zip(y_pred) {
        let (t, p) = (t as usize, p as usize);
        if t >= classes || p >= classes {
            return Err(Error::invalid(
                "labels",
                format!("label pair ({t}, {p}) is outside the {classes} classes"),
            ));
        }
        m[t][p] += 1;
    }
    Ok(m)
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 { 0.0 } else { num / den }
}

impl Metrics {
    /// Metrics of predictions `y_pred` against `y_true`, with one name per class.
    pub fn from_predictions<S: AsRef<str>>(
        y_true: &[u8],
        y_pred: &[u8],
        names: &[S],
    ) -> Result<Metrics> {
        Metrics::from_confusion(confusion_matrix(y_true, y_pred, names.len())?, names)
    }

    /// Metrics of a confusion matrix (rows true, columns predicted), one name per class.
    pub fn from_confusion<S: AsRef<str>>(confusion: Vec<Vec<u64>>, names: &[S]) -> Result<Metrics> {
        let k = names.len();
        if k == 0 || confusion.len() != k || confusion.iter().any(|r| r.len() != k) {
            return Err(Error::invalid(
                "confusion matrix",
                format!("is not {k}×{k} for {k} class names"),
            ));
        }
        let total: u64 = confusion.iter().flatten().sum();
        if total == 0 {
            return Err(Error::invalid("predictions", "there are none to score"));
        }
        let correct: u64 = (0..k).map(|i| confusion[i][i]).sum();
        let mut classes = Vec::with_capacity(k);
        for (c, name) in names.iter().enumerate() {
            let tp = confusion[c][c] as f64;
            let support: u64 = confusion[c].iter().sum();
            let predicted: u64 = confusion.iter().map(|r| r[c]).sum();
            classes.push(ClassMetrics {
                name: name.as_ref().to_string(),
                precision: ratio(tp, predicted as f64),
                recall: ratio(tp, support as f64),
                f1: ratio(2.0 * tp, support as f64 + predicted as f64),
                support,
            });
        }
        let mean = |f: fn(&ClassMetrics) -> f64| classes.iter().map(f).sum::<f64>() / k as f64;
        let weighted = |f: fn(&ClassMetrics) -> f64| {
            classes.iter().map(|c| f(c) * c.support as f64).sum::<f64>() / total as f64
        };
        let macro_avg = Averages {
            precision: mean(|c| c.precision),
            recall: mean(|c| c.recall),
            f1: mean(|c| c.f1),
            support: total,
        };
        let weighted_avg = Averages {
            precision: weighted(|c| c.precision),
            recall: weighted(|c| c.recall),
            f1: weighted(|c| c.f1),
            support: total,
        };
        Ok(Metrics {
            confusion,
            classes,
            accuracy: correct as f64 / total as f64,
            macro_avg,
            weighted_avg,
            total,
        })
    }

    /// The `k` most confused pairs: the largest off-diagonal cells (true class → predicted
    /// class), most images first, ties in (true, predicted) order; only cells with at least
    /// one image.
    pub fn most_confused(&self, k: usize) -> Vec<ConfusedPair> {
        let mut pairs: Vec<ConfusedPair> = Vec::new();
        for (t, row) in self.confusion.iter().enumerate() {
            let total: u64 = row.iter().sum();
            for (p, &count) in row.iter().enumerate() {
                if p != t && count > 0 {
                    pairs.push(ConfusedPair {
                        true_class: t,
                        predicted: p,
                        count,
                        share: count as f64 / total as f64,
                    });
                }
            }
        }
        // Stable: equal counts keep their (true, predicted) order.
        pairs.sort_by_key(|p| std::cmp::Reverse(p.count));
        pairs.truncate(k);
        pairs
    }

    /// Class ids ordered by recall (per-class accuracy), worst first; equal recalls in class
    /// order.
    pub fn classes_by_recall(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.classes.len()).collect();
        order.sort_by(|&a, &b| self.classes[a].recall.total_cmp(&self.classes[b].recall));
        order
    }

    /// The report exactly as scikit-learn's `classification_report(y_true, y_pred,
    /// labels=range(k), target_names=names, digits=digits)` prints it (sklearn's default
    /// is `digits=2`).
    pub fn classification_report(&self, digits: usize) -> String {
        const LAST: &str = "weighted avg";
        let name_width = self
            .classes
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0);
        let width = name_width.max(LAST.len()).max(digits);
        let mut out = format!(
            "{:>width$}  {:>9} {:>9} {:>9} {:>9}\n\n",
            "", "precision", "recall", "f1-score", "support"
        );
        let row = |name: &str, p: f64, r: f64, f: f64, s: u64| {
            format!("{name:>width$}  {p:>9.digits$} {r:>9.digits$} {f:>9.digits$} {s:>9}\n")
        };
        for c in &self.classes {
            out += &row(&c.name, c.precision, c.recall, c.f1, c.support);
        }
        out.push('\n');
        out += &format!(
            "{:>width$}  {:>9} {:>9} {:>9.digits$} {:>9}\n",
            "accuracy", "", "", self.accuracy, self.total
        );
        let m = &self.macro_avg;
        out += &row("macro avg", m.precision, m.recall, m.f1, m.support);
        let w = &self.weighted_avg;
        out += &row(LAST, w.precision, w.recall, w.f1, w.support);
        out
    }
}

/// [`Metrics::classification_report`] straight from labels.
pub fn classification_report<S: AsRef<str>>(
    y_true: &[u8],
    y_pred: &[u8],
    names: &[S],
    digits: usize,
) -> Result<String> {
    Ok(Metrics::from_predictions(y_true, y_pred, names)?.classification_report(digits))
}

/// The `k` largest of one sample's `probabilities` with their class ids, most probable first
/// (the lower id first on ties, as [`top_k_accuracy`] ranks them).
pub fn top_classes(probabilities: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<(usize, f32)> = probabilities.iter().copied().enumerate().collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    order.truncate(k);
    order
}

/// Top-k accuracy as scikit-learn's `top_k_accuracy_score(y_true, y_score, k=k)` computes it:
/// a sample counts when its true class is among the `k` classes ranked first by score. The
/// ranking is sklearn's (`argsort(kind="mergesort")` reversed), so among equal scores the
/// higher class index ranks first. `scores` is `[N, classes]` row-major; `k ≥ classes` gives 1.
pub fn top_k_accuracy(y_true: &[u8], scores: &[f32], classes: usize, k: usize) -> Result<f64> {
    if classes == 0 || scores.len() != y_true.len() * classes {
        return Err(Error::invalid(
            "scores",
            format!(
                "{} values for {} samples of {classes} classes",
                scores.len(),
                y_true.len()
            ),
        ));
    }
    if k == 0 {
        return Err(Error::invalid("k", "top-k accuracy needs k ≥ 1"));
    }
    if y_true.is_empty() {
        return Err(Error::invalid("labels", "no samples"));
    }
    let mut hits = 0usize;
    for (&y, row) in y_true.iter().zip(scores.chunks_exact(classes)) {
        let y = y as usize;
        if y >= classes {
            return Err(Error::invalid(
                "labels",
                format!("label {y} is not below the {classes} classes"),
            ));
        }
        let s = row[y];
        // Classes ranked before y: higher scores, and equal scores at higher indices.
        let ahead = row
            .iter()
            .enumerate()
            .filter(|&(j, &v)| v > s || (v == s && j > y))
            .count();
        if ahead < k {
            hits += 1;
        }
    }
    Ok(hits as f64 / y_true.len() as f64)
}
