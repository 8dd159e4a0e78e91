//! The run directory: what training writes and everything downstream reads.
//!
//! ```text
//! <run-dir>/config.json              RunConfig: hyper-parameters, seeds, λs, features' fingerprint
//! <run-dir>/history.csv              lambda,epoch,train_loss,train_penalty,val_loss,val_accuracy
//! <run-dir>/lambda_<λ>/best.safetensors + best.json   best epoch by validation (see checkpoint)
//! <run-dir>/lambda_<λ>/last.safetensors + last.json   latest epoch, momentum, state for --resume
//! <run-dir>/summary.json             Summary: per-λ best epochs and the λ chosen on validation
//! ```
//!
//! Every file is rewritten atomically after every epoch, so an interrupted run leaves a
//! consistent directory that `--resume` continues from its last completed epoch.
//!
//! The formats are defined here, apart from the training loop ([`crate::train`]) that
//! writes them and the checkpoint files ([`crate::checkpoint`]) that embed some of them, so
//! that readers (the report, `test`, `--resume`) depend on the formats alone.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::features::Fingerprint;
use crate::head::Activation;

/// Format tag of `config.json`.
pub const RUN_FORMAT: &str = "cifar-finetune run v1";

/// Header of `history.csv`.
pub const HISTORY_HEADER: &str = "lambda,epoch,train_loss,train_penalty,val_loss,val_accuracy";

/// How the best epoch (and the chosen λ) is selected on the validation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// Lowest validation cross-entropy.
    #[default]
    Loss,
    /// Highest validation accuracy.
    Accuracy,
}

impl Select {
    /// True when `(loss, accuracy)` is strictly better than `best` (earlier wins ties).
    pub fn improves(self, loss: f64, accuracy: f64, best: Option<&BestSoFar>) -> bool {
        match best {
            None => true,
            Some(b) => match self {
                Select::Loss => loss < b.val_loss,
                Select::Accuracy => accuracy > b.val_accuracy,
            },
        }
    }
}

impl FromStr for Select {
    type Err = Error;
    fn from_str(s: &str) -> Result<Select> {
        match s {
            "loss" => Ok(Select::Loss),
            "accuracy" => Ok(Select::Accuracy),
            other => Err(Error::invalid(
                "select",
                format!("`{other}` is neither `loss` nor `accuracy`"),
            )),
        }
    }
}

impl fmt::Display for Select {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Select::Loss => "loss",
            Select::Accuracy => "accuracy",
        })
    }
}

/// Hyper-parameters of one training run (the same for every λ of a sweep).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Learning rate (script: 0.001).
    pub lr: f32,
    /// SGD momentum (script: 0.9).
    pub momentum: f32,
    /// Mini-batch size (script: 4).
    pub batch_size: usize,
    /// Number of epochs (script: 10).
    pub epochs: usize,
    /// Validate every this many epochs (the last epoch is always validated).
    pub val_every: usize,
    /// Metric that picks the best epoch and the chosen λ.
    pub select: Select,
    /// Seed of the initialisation, shuffling and dropout.
    pub seed: u64,
    /// Hidden width (script: 32).
    pub hidden: usize,
    /// Dropout probability on the hidden layer during training, as `nn.Dropout(p)` (0 = off,
    /// our default; the original script uses 0.5).
    pub dropout: f32,
    /// The activation between the head's layers (ReLU by default; the original script has
    /// none). Absent from runs made before it existed, which were all ReLU.
    #[serde(default)]
    pub activation: Activation,
}

impl Default for TrainConfig {
    /// Our recommended settings: the original script's optimiser (lr 0.001, momentum 0.9,
    /// batch 4, 10 epochs, hidden 32) with a ReLU head and no dropout. [`TrainConfig::original`]
    /// is the script exactly.
    fn default() -> Self {
        TrainConfig {
            lr: 0.001,
            momentum: 0.9,
            batch_size: 4,
            epochs: 10,
            val_every: 1,
            select: Select::Loss,
            seed: 0,
            hidden: 32,
            dropout: 0.0,
            activation: Activation::Relu,
        }
    }
}

impl TrainConfig {
    /// The original course script's settings: no activation between the layers, dropout 0.5,
    /// lr 0.001, momentum 0.9, batch 4, 10 epochs, hidden 32 (and no L2: λ = 0, which is the
    /// sweep's business, not this struct's).
    pub fn original() -> TrainConfig {
        TrainConfig {
            dropout: 0.5,
            activation: Activation::None,
            ..TrainConfig::default()
        }
    }

    /// Rejects impossible values, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid(
                "lr",
                format!("{} is not a number > 0", self.lr),
            ));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(Error::invalid(
                "momentum",
                format!("{} is not in [0, 1)", self.momentum),
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        if self.epochs == 0 {
            return Err(Error::invalid("epochs", "must be at least 1"));
        }
        if self.val_every == 0 {
            return Err(Error::invalid("val_every", "must be at least 1"));
        }
        if self.hidden == 0 {
            return Err(Error::invalid("hidden", "must be at least 1"));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(Error::invalid(
                "dropout",
                format!("{} is not a probability in [0, 1)", self.dropout),
            ));
        }
        Ok(())
    }
}

/// Checks a list of L2 strengths: at least one, each finite and ≥ 0, no repeats.
pub fn validate_lambdas(lambdas: &[f32]) -> Result<()> {
    const WHAT: &str = "lambdas";
    if lambdas.is_empty() {
        return Err(Error::invalid(WHAT, "no λ given"));
    }
    for (i, &l) in lambdas.iter().enumerate() {
        if !(l.is_finite() && l >= 0.0) {
            return Err(Error::invalid(
                WHAT,
                format!("λ = {l} is not a finite number ≥ 0 (the L2 strength cannot be negative)"),
            ));
        }
        if lambdas[..i].contains(&l) {
            return Err(Error::invalid(WHAT, format!("λ = {l} is given twice")));
        }
    }
    Ok(())
}

/// `config.json`: everything that determines a run's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// [`RUN_FORMAT`].
    pub format: String,
    /// Hyper-parameters.
    pub train: TrainConfig,
    /// The λs, in training order.
    pub lambdas: Vec<f32>,
    /// Fingerprint of the features (weights, preprocessing, precision), verbatim.
    pub extractor: Fingerprint,
    /// Feature width.
    pub feature_dim: usize,
    /// Number of classes.
    pub classes: usize,
    /// The class names in label order (runs made before this field existed are CIFAR-10's).
    #[serde(default = "crate::data::cifar::class_names")]
    pub class_names: Vec<String>,
    /// Training samples.
    pub n_train: usize,
    /// Validation samples.
    pub n_val: usize,
    /// sha256 of the training and validation image indices and labels: the split itself.
    pub split_digest: String,
    /// Where the features came from (data directory, weights, split options…), as the caller
    /// describes it; informative only (`--resume` compares everything else).
    pub source: serde_json::Value,
    /// Settings that do not change the numbers (the preset named, the interval of the loss
    /// lines), as the caller describes them; informative only, like `source`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub options: serde_json::Value,
}

impl RunConfig {
    /// Reads `<run_dir>/config.json`.
    pub fn read(run_dir: &Path) -> Result<RunConfig> {
        crate::io::read_json(&run_dir.join("config.json"))
    }
}

/// One row of `history.csv`: one λ after one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    /// L2 strength.
    pub lambda: f32,
    /// Epoch, 1-based.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's training samples, as they were trained on.
    pub train_loss: f64,
    /// Mean penalty λ/2·(‖W1‖²+‖W2‖²) over the epoch's steps (sample-weighted).
    pub train_penalty: f64,
    /// Validation cross-entropy after the epoch (absent when not validated).
    pub val_loss: Option<f64>,
    /// Validation accuracy after the epoch, 0..1 (absent when not validated).
    pub val_accuracy: Option<f64>,
}

/// Writes `history.csv` atomically (empty cells for epochs that were not validated).
pub fn write_history(path: &Path, rows: &[HistoryRow]) -> Result<()> {
    let mut text = String::from(HISTORY_HEADER);
    text.push('\n');
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in rows {
        text.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.lambda,
            r.epoch,
            r.train_loss,
            r.train_penalty,
            opt(r.val_loss),
            opt(r.val_accuracy)
        ));
    }
    crate::io::atomic_write_bytes(path, text.as_bytes())
}

/// Parses a `history.csv` written by [`write_history`], naming the line of any error.
pub fn read_history(path: &Path) -> Result<Vec<HistoryRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let mut lines = text.lines();
    if lines.next() != Some(HISTORY_HEADER) {
        return Err(Error::format(
            path,
            format!("the first line is not `{HISTORY_HEADER}`"),
        ));
    }
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| Error::format(path, format!("line {}: {what}: `{line}`", i + 2));
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != 6 {
            return Err(bad("expected 6 fields"));
        }
        let f = |s: &str, name: &str| s.parse::<f64>().map_err(|_| bad(name));
        let opt = |s: &str, name: &str| {
            if s.is_empty() {
                Ok(None)
            } else {
                f(s, name).map(Some)
            }
        };
        rows.push(HistoryRow {
            lambda: cells[0].parse().map_err(|_| bad("lambda"))?,
            epoch: cells[1].parse().map_err(|_| bad("epoch"))?,
            train_loss: f(cells[2], "train_loss")?,
            train_penalty: f(cells[3], "train_penalty")?,
            val_loss: opt(cells[4], "val_loss")?,
            val_accuracy: opt(cells[5], "val_accuracy")?,
        });
    }
    Ok(rows)
}

/// What a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The training or validation loss became NaN or infinite: the λ stopped there and is
    /// never chosen.
    Diverged,
    /// The best checkpoint predicts one class for every validation image.
    SingleClass,
    /// No epoch's training loss fell below the first epoch's.
    LossNeverFell,
}

impl ProblemKind {
    /// A short label for tables: `diverged`, `single class`, `loss never fell`.
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::Diverged => "diverged",
            ProblemKind::SingleClass => "single class",
            ProblemKind::LossNeverFell => "loss never fell",
        }
    }
}

/// Something wrong with how one λ trained, found while or after training it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// What it is.
    pub kind: ProblemKind,
    /// The epoch it concerns, when one does.
    pub epoch: Option<usize>,
    /// One sentence for people, naming λ.
    pub message: String,
}

/// The outcome of one λ in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LambdaSummary {
    /// L2 strength.
    pub lambda: f32,
    /// Its directory, relative to the run directory (`lambda_0.001`).
    pub dir: String,
    /// Its best checkpoint, relative to the run directory (empty when a failed λ never
    /// reached a validated epoch).
    pub best_checkpoint: String,
    /// Best epoch by the selection metric (0: none).
    pub best_epoch: usize,
    /// Validation loss at the best epoch (NaN, `null` in JSON, when there is none).
    #[serde(deserialize_with = "f64_or_nan")]
    pub best_val_loss: f64,
    /// Validation accuracy at the best epoch (NaN, `null` in JSON, when there is none).
    #[serde(deserialize_with = "f64_or_nan")]
    pub best_val_accuracy: f64,
    /// Training loss of the last completed epoch (NaN, `null` in JSON, when there is none).
    #[serde(deserialize_with = "f64_or_nan")]
    pub final_train_loss: f64,
    /// Epochs completed.
    pub epochs: usize,
    /// True when the training diverged (NaN or infinite loss): the λ stopped early and is
    /// never chosen.
    #[serde(default)]
    pub failed: bool,
    /// What went wrong, if anything (see [`ProblemKind`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// `summary.json`: the λ chosen on validation and every λ's best epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The selection metric.
    pub select: Select,
    /// The chosen λ: the best of the per-λ best epochs among the λs that did not fail
    /// (first in order on ties).
    pub chosen_lambda: f32,
    /// The chosen λ's best checkpoint, relative to the run directory.
    pub chosen_checkpoint: String,
    /// One entry per λ, in training order.
    pub lambdas: Vec<LambdaSummary>,
    /// Every λ's problems in one list, then the likely cause; empty when training went well.
    /// The terminal summary and the top of `report.html` show these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Reads a number that serde_json wrote as `null` because it was NaN.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Summary {
    /// Reads `<run_dir>/summary.json`.
    pub fn read(run_dir: &Path) -> Result<Summary> {
        crate::io::read_json(&run_dir.join("summary.json"))
    }
}

/// A run directory as report tools need it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// `config.json`.
    pub config: RunConfig,
    /// `history.csv`.
    pub history: Vec<HistoryRow>,
    /// `summary.json`, absent while the run is unfinished.
    pub summary: Option<Summary>,
}

/// Loads `config.json`, `history.csv` and (when present) `summary.json` of a run directory.
pub fn load_run(run_dir: &Path) -> Result<RunRecord> {
    let summary_path = run_dir.join("summary.json");
    Ok(RunRecord {
        config: RunConfig::read(run_dir)?,
        history: read_history(&run_dir.join("history.csv"))?,
        summary: if summary_path.exists() {
            Some(crate::io::read_json(&summary_path)?)
        } else {
            None
        },
    })
}

/// Directory name of a λ inside a run directory: `lambda_0.001` (shortest round-trip form).
pub fn lambda_dir_name(lambda: f32) -> String {
    format!("lambda_{lambda}")
}

/// Where a λ's checkpoints live in a run directory.
pub fn lambda_dir(run_dir: &Path, lambda: f32) -> PathBuf {
    run_dir.join(lambda_dir_name(lambda))
}

/// The best epoch seen so far for one λ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestSoFar {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Validation loss at that epoch.
    pub val_loss: f64,
    /// Validation accuracy at that epoch (0..1).
    pub val_accuracy: f64,
}

/// Training state saved in a `last` checkpoint: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// History rows of this λ so far (one per completed epoch).
    pub history: Vec<HistoryRow>,
    /// Best validated epoch so far, if any.
    pub best: Option<BestSoFar>,
    /// True once every epoch of this λ has run.
    pub finished: bool,
    /// How the per-epoch random streams derive from the seed (documentation for readers; the
    /// shuffle and dropout of epoch `e` depend only on `(seed, e)`, so the epoch count is the
    /// whole RNG state).
    pub rng: String,
}
