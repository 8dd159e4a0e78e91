//! Reports a person wants to look at: the plots of a run and one self-contained `report.html`.
//!
//! * [`plots`] draws every figure as PNG and SVG with an embedded font: the training and
//!   validation losses against epoch (one line per λ), the original report's error-bar plot
//!   (mean ± std over the epochs against λ on a log axis), the spread of the final validation
//!   accuracy across seeds, the confusion matrix as a heat map and per-class accuracy bars.
//! * [`html`] writes `report.html`: inline CSS and SVG, images as `data:` URIs, no network
//!   resource of any kind, so the file can be mailed, archived or opened offline.
//! * [`write_run_report`] (re)builds both from a run directory.
//!
//! Any number of classes: the class names come from the run's files, and beyond
//! [`plots::MANY_CLASSES`] the heat map drops its numbers, the per-class views are sorted
//! worst first and the most confused pairs are listed (see [`html`]).

pub mod html;
pub mod plots;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::data::cifar::{self, Cifar10};
use crate::data::cifar100::{self, Cifar100, LabelKind};
use crate::data::folder::ImageFolder;
use crate::data::{Dataset, Part};
use crate::error::Result;
use crate::evaluate::TestMetrics;
use crate::rundir::HistoryRow;

use self::plots::LossKind;

/// Default number of test images in the gallery: enough to see the typical mistakes, few
/// enough to keep `report.html` near half a megabyte.
pub const DEFAULT_GALLERY_SIZE: usize = 100;

/// Where the plots go inside a run directory.
pub const PLOTS_DIR: &str = "plots";

/// What [`write_run_report`] should use besides the run directory itself.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// The dataset whose test part `predictions.csv` indexes, for the gallery's images.
    /// When `None`, it is looked for in the data directory: CIFAR-10 or CIFAR-100 (fine or
    /// coarse), whichever has the run's class names.
    pub dataset: Option<Arc<dyn Dataset>>,
    /// Data directory holding the dataset, for the gallery's images. When `None`, the
    /// `data` (or `data_dir`) entry of `config.json`'s `source` is used if present.
    pub data_dir: Option<PathBuf>,
    /// Test images in the gallery (0: no gallery).
    pub gallery_size: usize,
    /// Histories of the same sweep run with other seeds (`--repeats`): with this run's own
    /// history they make the accuracy-spread plot. Empty: no such plot.
    pub seed_histories: Vec<Vec<HistoryRow>>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            dataset: None,
            data_dir: None,
            gallery_size: DEFAULT_GALLERY_SIZE,
            seed_histories: Vec::new(),
        }
    }
}

/// What [`write_run_report`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportOutput {
    /// `<run_dir>/report.html`.
    pub html: PathBuf,
    /// Every plot file (PNG and SVG) under `<run_dir>/plots/`.
    pub plots: Vec<PathBuf>,
    /// What was left out and why (e.g. no `metrics.json` yet, test images not found); also
    /// shown in the report itself.
    pub notes: Vec<String>,
}

/// (Re)builds the plots (`<run_dir>/plots/*.png|svg`) and `<run_dir>/report.html` from a run
/// directory: `config.json` and `history.csv` are required; `summary.json`, `metrics.json` and
/// `predictions.csv` (written by the sweep and the test evaluation) are used when present, and
/// their absence is noted in the report.
pub fn write_run_report(run_dir: &Path, opts: &ReportOptions) -> Result<ReportOutput> {
    let run = crate::rundir::load_run(run_dir)?;
    let mut notes = Vec::new();
    if run.summary.is_none() {
        notes.push("No summary.json: the sweep has not finished, so no λ is chosen yet.".into());
    }

    let mut training_figures = Vec::new();
    if run.history.is_empty() {
        notes.push("history.csv has no epoch yet: no training plots.".into());
    } else {
        training_figures.push(plots::loss_curves(&run.history, LossKind::Train)?);
        if run.history.iter().any(|r| r.val_loss.is_some()) {
            training_figures.push(plots::loss_curves(&run.history, LossKind::Val)?);
        }
        training_figures.push(plots::loss_error_bars(&run.history)?);
    }
    if !opts.seed_histories.is_empty() {
        let mut runs = vec![run.history.clone()];
        runs.extend(opts.seed_histories.iter().cloned());
        training_figures.push(plots::accuracy_spread(&final_accuracies(&runs))?);
    }

    let metrics_path = run_dir.join("metrics.json");
    let test = if metrics_path.exists() {
        let m = TestMetrics::read(&metrics_path)?;
        let predictions_path = run_dir.join("predictions.csv");
        if predictions_path.exists() {
            crate::evaluate::check_pair(&m, &metrics_path, &predictions_path)?;
        }
        Some(m)
    } else {
        notes.push("No metrics.json: the chosen checkpoint has not been tested yet.".into());
        None
    };
    let val_path = run_dir.join(crate::evaluate::output_names(crate::data::cifar::Split::Val).0);
    let val = if val_path.exists() {
        Some(TestMetrics::read(&val_path)?)
    } else {
        None
    };
    let mut test_figures = Vec::new();
    if let Some(t) = &test {
        test_figures.push(plots::confusion_heatmap(
            &t.metrics.confusion,
            &t.class_names,
        )?);
        test_figures.push(plots::per_class_accuracy(
            &t.metrics.confusion,
            &t.class_names,
        )?);
    }

    let (gallery, counts) = gallery_for_run(run_dir, &run.config, opts, &mut notes)?;

    let plots_dir = run_dir.join(PLOTS_DIR);
    let mut plot_files = Vec::new();
    for f in training_figures.iter().chain(&test_figures) {
        plot_files.extend(f.write(&plots_dir)?);
    }
    let run_name = run_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| run_dir.display().to_string());
    let page = html::Page {
        run_name: &run_name,
        config: &run.config,
        summary: run.summary.as_ref(),
        test: test.as_ref(),
        val: val.as_ref(),
        training_figures: &training_figures,
        test_figures: &test_figures,
        gallery: &gallery,
        gallery_counts: counts,
        notes: &notes,
    };
    let html_path = run_dir.join("report.html");
    crate::io::atomic_write_bytes(&html_path, html::render(&page).as_bytes())?;
    Ok(ReportOutput {
        html: html_path,
        plots: plot_files,
        notes,
    })
}

/// The gallery's images and the (misclassified, total) counts of the test predictions.
type Gallery = (Vec<html::GalleryItem>, Option<(usize, usize)>);

/// The gallery of a run, or none with a note saying why.
fn gallery_for_run(
    run_dir: &Path,
    config: &crate::rundir::RunConfig,
    opts: &ReportOptions,
    notes: &mut Vec<String>,
) -> Result<Gallery> {
    if opts.gallery_size == 0 {
        return Ok((Vec::new(), None));
    }
    let predictions_path = run_dir.join("predictions.csv");
    if !predictions_path.exists() {
        notes.push("No predictions.csv: no gallery of test images.".into());
        return Ok((Vec::new(), None));
    }
    let (_, rows) = crate::evaluate::read_predictions(&predictions_path)?;
    let wrong = rows.iter().filter(|r| r.predicted != r.true_class).count();
    let counts = Some((wrong, rows.len()));
    let dataset = match &opts.dataset {
        Some(d) => Arc::clone(d),
        None if config.source.get("dataset").and_then(|v| v.as_str()) == Some("folder") => {
            let Some(root) = config.source.get("folder").and_then(|v| v.as_str()) else {
                notes.push("config.json names no image folder: no gallery of test images.".into());
                return Ok((Vec::new(), counts));
            };
            match ImageFolder::open(Path::new(root)) {
                Ok(d) => Arc::new(d),
                Err(e) => {
                    notes.push(format!("No gallery: {e}"));
                    return Ok((Vec::new(), counts));
                }
            }
        }
        None => {
            let from_config = ["data", "data_dir"]
                .iter()
                .find_map(|k| config.source.get(k).and_then(|v| v.as_str()))
                .map(PathBuf::from);
            let Some(data_dir) = opts.data_dir.clone().or(from_config) else {
                notes.push(
                    "No data directory given or recorded in config.json: no gallery of test \
                     images."
                        .into(),
                );
                return Ok((Vec::new(), counts));
            };
            match find_dataset(&data_dir, &config.class_names) {
                Ok(d) => d,
                Err(note) => {
                    notes.push(note);
                    return Ok((Vec::new(), counts));
                }
            }
        }
    };
    let selected = html::select_gallery(&rows, opts.gallery_size);
    // A dataset without test files had its test split drawn from its training part, which
    // the rows of predictions.csv then index.
    let part = if dataset.parts().contains(&Part::Test) {
        Part::Test
    } else {
        Part::Train
    };
    let items = html::gallery_items(&rows, &selected, dataset.as_ref(), part)?;
    Ok((items, counts))
}

/// The dataset in `data_dir` with the class names `classes` — CIFAR-10, or CIFAR-100 with
/// the fine or coarse labels — whose test files are there; else a note saying why there is
/// no gallery.
fn find_dataset(
    data_dir: &Path,
    classes: &[String],
) -> std::result::Result<Arc<dyn Dataset>, String> {
    let missing = |name: &str| {
        format!(
            "The {name} test images are not in {}: no gallery (pass the data directory).",
            data_dir.display()
        )
    };
    if classes == cifar::class_names() {
        if cifar::part_files(data_dir, Part::Test).is_err() {
            return Err(missing("CIFAR-10"));
        }
        return Cifar10::open(data_dir)
            .map(|d| Arc::new(d) as Arc<dyn Dataset>)
            .map_err(|e| format!("No gallery: {e}"));
    }
    let kind = [LabelKind::Fine, LabelKind::Coarse]
        .into_iter()
        .find(|k| k.classes() == classes.len());
    if let Some(kind) = kind {
        if cifar100::part_files(data_dir, Part::Test).is_err() {
            return Err(missing("CIFAR-100"));
        }
        return match Cifar100::open(data_dir, kind) {
            Ok(d) if d.classes() == classes => Ok(Arc::new(d)),
            Ok(_) => Err(format!(
                "The CIFAR-100 {kind} class names in {} are not the run's: no gallery.",
                data_dir.display()
            )),
            Err(e) => Err(format!("No gallery: {e}")),
        };
    }
    Err(format!(
        "No gallery: the run's {} classes are neither CIFAR-10's nor CIFAR-100's, and no \
         dataset was given for its test images.",
        classes.len()
    ))
}

/// The final validation accuracies of one λ across K seeds (one run per seed).
#[derive(Debug, Clone, PartialEq)]
pub struct LambdaAccuracies {
    /// L2 strength.
    pub lambda: f32,
    /// One final validation accuracy (0..1) per seed.
    pub accuracies: Vec<f64>,
}

/// The final validation accuracy of every λ in each of several runs (typically the same sweep
/// with K seeds): per λ, the accuracy of the last validated epoch of each run, λs ascending.
/// A run that lacks a λ, or never validated it, contributes nothing to it.
pub fn final_accuracies(runs: &[Vec<HistoryRow>]) -> Vec<LambdaAccuracies> {
    let mut out: Vec<LambdaAccuracies> = Vec::new();
    for history in runs {
        for (lambda, rows) in by_lambda(history) {
            let last = rows
                .iter()
                .filter(|r| r.val_accuracy.is_some())
                .max_by_key(|r| r.epoch)
                .and_then(|r| r.val_accuracy);
            let Some(acc) = last else { continue };
            match out.iter_mut().find(|a| a.lambda == lambda) {
                Some(entry) => entry.accuracies.push(acc),
                None => out.push(LambdaAccuracies {
                    lambda,
                    accuracies: vec![acc],
                }),
            }
        }
    }
    out.sort_by(|a, b| a.lambda.total_cmp(&b.lambda));
    out
}

/// λ as people write it: `0`, `0.001`, `0.5`, `1e-4`, `2.5e-5` (the shortest form that
/// round-trips the f32).
pub fn fmt_lambda(lambda: f32) -> String {
    let a = lambda.abs();
    if lambda == 0.0 {
        "0".to_string()
    } else if (1e-3..1e4).contains(&a) {
        format!("{lambda}")
    } else {
        format!("{lambda:e}")
    }
}

/// Mean and standard deviation with `ddof` delta degrees of freedom (0: population, numpy's
/// default; 1: sample). `None` for no values; a std of 0 when there are too few for `ddof`.
pub fn mean_std(values: &[f64], ddof: usize) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    let std = if values.len() > ddof {
        (ss / (n - ddof as f64)).sqrt()
    } else {
        0.0
    };
    Some((mean, std))
}

/// The rows of each λ, λs ascending, rows in file order.
fn by_lambda(history: &[HistoryRow]) -> Vec<(f32, Vec<&HistoryRow>)> {
    let mut groups: Vec<(f32, Vec<&HistoryRow>)> = Vec::new();
    for r in history {
        match groups.iter_mut().find(|g| g.0 == r.lambda) {
            Some(g) => g.1.push(r),
            None => groups.push((r.lambda, vec![r])),
        }
    }
    groups.sort_by(|a, b| a.0.total_cmp(&b.0));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(lambda: f32, epoch: usize, val_accuracy: Option<f64>) -> HistoryRow {
        HistoryRow {
            lambda,
            epoch,
            train_loss: 1.0,
            train_penalty: 0.0,
            val_loss: val_accuracy.map(|a| 1.0 - a),
            val_accuracy,
        }
    }

    #[test]
    fn lambda_formats() {
        assert_eq!(fmt_lambda(0.0), "0");
        assert_eq!(fmt_lambda(1e-4), "1e-4");
        assert_eq!(fmt_lambda(0.001), "0.001");
        assert_eq!(fmt_lambda(0.1), "0.1");
        assert_eq!(fmt_lambda(2.5e-5), "2.5e-5");
        assert_eq!(fmt_lambda(3.0), "3");
    }

    #[test]
    fn mean_and_std_match_numpy() {
        // numpy: np.mean([1,2,4]) = 2.3333, np.std(.., ddof=0) = 1.2472, ddof=1: 1.5275
        let (m, s0) = mean_std(&[1.0, 2.0, 4.0], 0).unwrap();
        let (_, s1) = mean_std(&[1.0, 2.0, 4.0], 1).unwrap();
        assert!((m - 7.0 / 3.0).abs() < 1e-12);
        assert!((s0 - 1.247219128924647).abs() < 1e-12);
        assert!((s1 - 1.5275252316519468).abs() < 1e-12);
        assert_eq!(mean_std(&[5.0], 1), Some((5.0, 0.0)));
        assert_eq!(mean_std(&[], 0), None);
    }

    #[test]
    fn final_accuracies_take_the_last_validated_epoch_of_each_run() {
        let seed0 = vec![
            row(0.1, 1, Some(0.5)),
            row(0.1, 2, Some(0.6)),
            row(0.0, 1, Some(0.7)),
            row(0.0, 2, None),
        ];
        let seed1 = vec![row(0.1, 1, Some(0.4)), row(0.1, 2, Some(0.65))];
        let acc = final_accuracies(&[seed0, seed1]);
        assert_eq!(
            acc,
            vec![
                LambdaAccuracies {
                    lambda: 0.0,
                    accuracies: vec![0.7]
                },
                LambdaAccuracies {
                    lambda: 0.1,
                    accuracies: vec![0.6, 0.65]
                },
            ]
        );
    }
}
