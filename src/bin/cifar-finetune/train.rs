//! `cifar-finetune train --lambda X`: trains the head at one L2 strength on cached features
//! and writes a run directory. Also holds what `sweep` shares with it: the hyper-parameter
//! flags, the training progress display and the run itself.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use cifar_finetune::data::cifar::Split;
use cifar_finetune::features::{FeatureSet, Skipped};
use cifar_finetune::head::Activation;
use cifar_finetune::io::DirLock;
use cifar_finetune::rundir;
use cifar_finetune::rundir::{Select, Summary, TrainConfig};
use cifar_finetune::train::{self, Progress, RunOptions, SweepOutcome};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::source::{self, FeatureArgs, Normalize};

/// Parses a λ, refusing one that f32 (the precision of training) cannot hold: beyond its
/// range (it would become infinite), or so small that it becomes 0 or loses digits as a
/// subnormal. Signs and NaN pass, for the settings' validation to name.
pub fn parse_lambda(s: &str) -> Result<f32, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    let y = x as f32;
    if x.is_finite() && y.is_infinite() {
        return Err(format!(
            "{s} is beyond the largest λ training can hold (f32, about {:e})",
            f32::MAX
        ));
    }
    if x.is_finite() && (f64::from(y) - x).abs() > x.abs() * f64::from(f32::EPSILON) {
        return Err(format!(
            "{s} is too small for training's f32 arithmetic, which would make it {:e}; the \
             smallest λ it holds exactly enough is about {:e}",
            f64::from(y),
            f32::MIN_POSITIVE
        ));
    }
    Ok(y)
}

/// Train the head (Linear(2048, 32) → ReLU or nothing → Linear(32, 10)) at one L2 strength λ.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// L2 strength λ: the objective is cross-entropy + λ/2·(‖W1‖² + ‖W2‖²), the squared norms
    /// of the two weight matrices. Biases are not penalised.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = parse_lambda)]
    pub lambda: f32,
    #[command(flatten)]
    pub hyper: TrainArgs,
    #[command(flatten)]
    pub features: FeatureArgs,
}

/// A named set of settings for `--preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The course script `imagenet_finetune.py` exactly: no activation between the layers,
    /// dropout 0.5, `--normalize half`, a loss line every 20 mini-batches, batch 4, lr 0.001,
    /// momentum 0.9, 10 epochs, no L2 (λ = 0). Batch norm stays in evaluation mode (see the
    /// README).
    Original,
}

impl Preset {
    /// Its name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Original => "original",
        }
    }
}

/// How often the `[epoch, batch] loss: x` lines come without a preset.
pub const DEFAULT_REPORT_EVERY: usize = 2000;

/// The original script's `if i % 20 == 19: print(... running_loss / 20)`.
pub const ORIGINAL_REPORT_EVERY: usize = 20;

/// Hyper-parameters and run options shared by `train`, `sweep` and `run`. Unset flags take
/// the preset's value, or our defaults without a preset; flags given beside `--preset`
/// override it. The resolved values are what `config.json` records.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Start from a named set of settings (flags given beside it override it): `original` is
    /// the course script exactly (no activation, dropout 0.5, --normalize half,
    /// --report-every 20, batch 4, lr 0.001, momentum 0.9, 10 epochs, λ = 0).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Learning rate of SGD [default: 0.001].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// SGD momentum μ (PyTorch semantics: v ← μ·v + g, p ← p − lr·v; no dampening, no
    /// Nesterov) [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    pub momentum: Option<f32>,
    /// Mini-batch size [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Number of epochs per λ [default: 10].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Validate every N epochs (the last epoch is always validated).
    #[arg(long, default_value_t = 1)]
    pub val_every: usize,
    /// What picks the best epoch and the chosen λ on the validation split: `loss` (lowest
    /// cross-entropy) or `accuracy` (highest).
    #[arg(long, default_value = "loss")]
    pub select: Select,
    /// Seed of the head's initialisation, the shuffling and dropout (same seed, same numbers
    /// bit for bit).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Hidden width of the head.
    #[arg(long, default_value_t = 32)]
    pub hidden: usize,
    /// Activation between the head's two layers: `relu` (our default) or `none` (the
    /// original script's `fc2(dropout(fc1(x)))`, with --preset original).
    #[arg(long)]
    pub activation: Option<Activation>,
    /// Dropout probability on the hidden layer during training, as PyTorch's nn.Dropout
    /// (kept units scaled by 1/(1−p); nothing at evaluation) [default: 0, off; the original
    /// script, and --preset original, use 0.5].
    #[arg(long, allow_negative_numbers = true)]
    pub dropout: Option<f32>,
    /// Run directory [default: runs/<train|sweep>-<UTC date-time>].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from each λ's last completed epoch (same settings).
    #[arg(long, requires = "run_dir")]
    pub resume: bool,
    /// Print the mean loss of the last N mini-batches every N mini-batches when stdout is not
    /// a terminal, as `[epoch, batch] loss: x` lines [default: 2000; the original script, and
    /// --preset original, print every 20].
    #[arg(long)]
    pub report_every: Option<usize>,
    /// λs trained at the same time, one thread each [default: the number of CPU cores].
    /// Every λ is computed alone on its thread, so the results do not depend on this.
    #[arg(long)]
    pub jobs: Option<usize>,
}

impl TrainArgs {
    /// The library's configuration: the preset's (or our default) values, overridden by the
    /// flags given.
    pub fn config(&self) -> TrainConfig {
        let base = match self.preset {
            Some(Preset::Original) => TrainConfig::original(),
            None => TrainConfig::default(),
        };
        TrainConfig {
            lr: self.lr.unwrap_or(base.lr),
            momentum: self.momentum.unwrap_or(base.momentum),
            batch_size: self.batch_size.unwrap_or(base.batch_size),
            epochs: self.epochs.unwrap_or(base.epochs),
            val_every: self.val_every,
            select: self.select,
            seed: self.seed,
            hidden: self.hidden,
            dropout: self.dropout.unwrap_or(base.dropout),
            activation: self.activation.unwrap_or(base.activation),
        }
    }

    /// The interval of the `[epoch, batch] loss: x` lines.
    pub fn report_every(&self) -> usize {
        self.report_every.unwrap_or(match self.preset {
            Some(Preset::Original) => ORIGINAL_REPORT_EVERY,
            None => DEFAULT_REPORT_EVERY,
        })
    }

    /// The feature options with the preset's normalisation filled in where `--normalize`
    /// was not given.
    pub fn features(&self, features: &FeatureArgs) -> FeatureArgs {
        let mut f = features.clone();
        if f.normalize.is_none() {
            f.normalize = Some(match self.preset {
                Some(Preset::Original) => Normalize::Half,
                None => Normalize::Imagenet,
            });
        }
        f
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    run_lambdas(&[args.lambda], &args.hyper, &args.features, "train")
}

/// What `config.json` records under `options`: the preset and the settings that do not
/// change the numbers.
fn describe_options(hyper: &TrainArgs) -> serde_json::Value {
    serde_json::json!({
        "preset": hyper.preset.map(Preset::name),
        "report_every": hyper.report_every(),
    })
}

/// Validates the settings, loads the train/validation features and runs the sweep over
/// `lambdas` with a progress display; prints the summary.
pub fn run_lambdas(
    lambdas: &[f32],
    hyper: &TrainArgs,
    features: &FeatureArgs,
    kind: &str,
) -> anyhow::Result<()> {
    // Reject bad settings before the (possibly long) feature extraction.
    hyper.config().validate()?;
    rundir::validate_lambdas(lambdas)?;
    let features = &hyper.features(features);
    let run_dir = hyper
        .run_dir
        .clone()
        .unwrap_or_else(|| default_run_dir(kind));
    let loaded = source::load_many(features, &[Split::Train, Split::Val])?;
    let [train_set, val_set] = <[_; 2]>::try_from(loaded.sets)
        .map_err(|_| anyhow::anyhow!("expected the training and validation features"))?;
    let sets = (&train_set, &val_set, loaded.skipped.as_slice());
    if let Some((s, _lock)) = train_sets(sets, lambdas, hyper, features, &run_dir)? {
        println!(
            "evaluate it: cifar-finetune test --checkpoint {}",
            run_dir.join(&s.chosen_checkpoint).display()
        );
    }
    Ok(())
}

/// Runs the sweep over `lambdas` on features already loaded (train, validation, and the
/// images left out of them), with a progress display, into `run_dir`; prints the per-λ
/// table. Returns the summary with the run directory's lock, still held; `None` when the
/// sweep was stopped before the end.
pub fn train_sets(
    (train_set, val_set, skipped): (&FeatureSet, &FeatureSet, &[Skipped]),
    lambdas: &[f32],
    hyper: &TrainArgs,
    features: &FeatureArgs,
    run_dir: &Path,
) -> anyhow::Result<Option<(Summary, DirLock)>> {
    let cfg = hyper.config();
    let features = &hyper.features(features);
    let mut display = Display::new(hyper.report_every());
    let opts = RunOptions {
        resume: hyper.resume,
        report_every: display.interval(),
        source: serde_json::to_value(features.record())?,
        options: describe_options(hyper),
        jobs: hyper
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        wait_for_lock: features.wait_lock,
    };
    println!(
        "training on {} features, validating on {}; run directory {}",
        train_set.len(),
        val_set.len(),
        run_dir.display()
    );
    let outcome = train::sweep_holding(
        train_set,
        val_set,
        lambdas,
        &cfg,
        run_dir,
        &opts,
        &mut |p| display.update(p),
    );
    display.finish();
    // The run directory stays locked until the caller is done with it (`run` writes the
    // test results and the report there too).
    let (outcome, lock) =
        outcome.with_context(|| format!("training into run directory {}", run_dir.display()))?;
    if !skipped.is_empty() {
        let path = run_dir.join(SKIPPED_FILE);
        cifar_finetune::io::write_json(&path, &skipped)?;
        println!(
            "{} undecodable image(s) left out (--skip-bad), listed in {}",
            skipped.len(),
            path.display()
        );
    }
    match outcome {
        SweepOutcome::Stopped => {
            println!(
                "stopped; continue with --resume --run-dir {}",
                run_dir.display()
            );
            Ok(None)
        }
        SweepOutcome::Finished(s) => {
            println!();
            println!(
                "{:>10}  {:>10}  {:>13}  {:>14}  status",
                "λ", "best epoch", "val loss", "val accuracy"
            );
            for l in &s.lambdas {
                let status = if l.failed {
                    "FAILED (diverged)".to_string()
                } else if l.problems.is_empty() {
                    "ok".to_string()
                } else {
                    let kinds: Vec<&str> = l.problems.iter().map(|p| p.kind.label()).collect();
                    format!("WARNING: {}", kinds.join(", "))
                };
                println!(
                    "{:>10}  {:>10}  {:>13.4}  {:>12.2} %  {status}",
                    l.lambda,
                    l.best_epoch,
                    l.best_val_loss,
                    100.0 * l.best_val_accuracy
                );
            }
            if !s.warnings.is_empty() {
                println!();
                println!("WARNING: training did not go well:");
                for w in &s.warnings {
                    println!("  - {w}");
                }
                println!();
            }
            println!(
                "chosen on validation ({}): λ = {} → {}",
                s.select,
                s.chosen_lambda,
                run_dir.join(&s.chosen_checkpoint).display()
            );
            Ok(Some((s, lock)))
        }
    }
}

/// The run directory's list of images left out with --skip-bad.
pub const SKIPPED_FILE: &str = "skipped_images.json";

/// `runs/<kind>-YYYYMMDD-HHMMSS` in UTC.
pub fn default_run_dir(kind: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    Path::new("runs").join(format!(
        "{kind}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Training progress: on a terminal an indicatif bar per λ being trained (step, loss,
/// samples/s, time left); otherwise the original script's `[epoch, batch] loss: x` lines
/// every `report_every` mini-batches (prefixed with λ when a sweep has several). One line per
/// epoch either way.
struct Display {
    multi: Option<MultiProgress>,
    /// Bars of the λs in training: (λ's bits, epochs, bar).
    bars: Vec<(u32, usize, ProgressBar)>,
    report_every: usize,
    several: bool,
}

impl Display {
    fn new(report_every: usize) -> Display {
        Display {
            // Bars draw on stderr; the plain lines go to stdout: a bar only when both are
            // terminals, so `| tee log` gets the original's lines.
            multi: (std::io::stdout().is_terminal() && std::io::stderr().is_terminal())
                .then(MultiProgress::new),
            bars: Vec::new(),
            report_every,
            several: false,
        }
    }

    /// How often the library should report steps: often enough for a smooth bar, else at
    /// the plain-line interval.
    fn interval(&self) -> usize {
        if self.multi.is_some() {
            self.report_every.clamp(1, 100)
        } else {
            self.report_every
        }
    }

    fn update(&mut self, p: &Progress) -> ControlFlow<()> {
        match *p {
            Progress::Lambda {
                lambda,
                index,
                count,
                done_epochs,
                epochs,
                steps,
            } => {
                self.several = count > 1;
                let resumed = if done_epochs > 0 {
                    format!(" (resuming after epoch {done_epochs})")
                } else {
                    String::new()
                };
                self.println(&format!(
                    "λ = {lambda} ({}/{count}): {epochs} epochs of {steps} steps{resumed}",
                    index + 1
                ));
                if let Some(multi) = &self.multi
                    && done_epochs < epochs
                {
                    let bar = multi.add(ProgressBar::new(steps as u64));
                    if let Ok(style) = ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {pos}/{len} steps {msg} ({eta} left)",
                    ) {
                        bar.set_style(style.progress_chars("=> "));
                    }
                    bar.set_prefix(format!("λ = {lambda} epoch {}", done_epochs + 1));
                    self.bars.push((lambda.to_bits(), epochs, bar));
                }
            }
            Progress::Step {
                lambda,
                epoch,
                step,
                steps,
                loss,
                samples_per_sec,
            } => {
                if self.multi.is_some() {
                    if let Some((_, _, bar)) = self.bars.iter().find(|b| b.0 == lambda.to_bits()) {
                        bar.set_prefix(format!("λ = {lambda} epoch {epoch}"));
                        bar.set_position(step as u64);
                        bar.set_message(format!("loss {loss:.4}, {samples_per_sec:.0} samples/s"));
                    }
                } else if (self.report_every > 0 && step.is_multiple_of(self.report_every))
                    || step == steps
                {
                    // The original's line; also at an epoch's end that is not a multiple.
                    let who = if self.several {
                        format!("λ = {lambda} ")
                    } else {
                        String::new()
                    };
                    println!("{who}[{epoch}, {step:5}] loss: {loss:.3}");
                }
            }
            Progress::Epoch { row, best, seconds } => {
                let val = match (row.val_loss, row.val_accuracy) {
                    (Some(l), Some(a)) => format!(
                        ", val loss {l:.4}, val accuracy {:.2} %{}",
                        100.0 * a,
                        if best { " (best so far)" } else { "" }
                    ),
                    _ => String::new(),
                };
                self.println(&format!(
                    "λ = {} epoch {}: train loss {:.4}, penalty {:.4}{val} [{seconds:.1} s]",
                    row.lambda, row.epoch, row.train_loss, row.train_penalty
                ));
                if let Some(pos) = self.bars.iter().position(|b| b.0 == row.lambda.to_bits()) {
                    if row.epoch >= self.bars[pos].1 {
                        let (_, _, bar) = self.bars.remove(pos);
                        bar.finish_and_clear();
                    } else {
                        self.bars[pos].2.reset();
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn println(&self, line: &str) {
        match &self.multi {
            Some(multi) => multi.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn finish(&mut self) {
        for (_, _, bar) in self.bars.drain(..) {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
