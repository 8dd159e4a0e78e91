//! Training the head on cached features: a [`sweep`] over λs, each λ trained by one `fit`
//! loop, writing a run directory.
//!
//! This is the original script's training loop (`for epoch in range(10): for data in
//! trainloader: … optimizer.step()`), on cached features instead of images, with what the
//! script lacked: a validation split, the L2 penalty λ/2·(‖W1‖² + ‖W2‖²) swept over several λ,
//! the best checkpoint by validation, and exact resumption.
//!
//! The run directory it writes is described in [`crate::rundir`].
//!
//! ## Randomness
//!
//! One seed drives everything through ChaCha8 streams: the head's initialisation (stream 0,
//! see [`Head::init`]), the shuffle of epoch `e` (stream `2³²·1 + e`) and the dropout masks
//! of epoch `e` (stream `2³²·2 + e`). Every λ of a sweep starts from the same weights and sees
//! the same data order, so their differences are due to λ alone; and the state of the random
//! streams at an epoch boundary is the epoch number, which makes resumption exact.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

mod checks;
mod random;

pub use checks::split_digest;
use checks::{check_sets, compare_configs};
pub use random::Dropout;
use random::{RNG_SCHEME, shuffle};

use crate::checkpoint::{self, CheckpointKind, CheckpointMeta};
use crate::error::{Error, Result};
use crate::features::FeatureSet;
use crate::head::{Head, HeadDims, Sgd, Stepper};
use crate::io::DirLock;
use crate::rundir::{
    BestSoFar, HistoryRow, LambdaSummary, Problem, ProblemKind, RUN_FORMAT, RunConfig, Select,
    Summary, TrainConfig, TrainState, lambda_dir_name, validate_lambdas, write_history,
};

/// What the training loop reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// A λ starts (or resumes after `done_epochs`).
    Lambda {
        /// The λ.
        lambda: f32,
        /// Its position in the sweep, 0-based.
        index: usize,
        /// Number of λs.
        count: usize,
        /// Epochs already done (resume).
        done_epochs: usize,
        /// Epochs per λ.
        epochs: usize,
        /// Steps per epoch.
        steps: usize,
    },
    /// Every `report_every` steps and at the end of each epoch.
    Step {
        /// The λ.
        lambda: f32,
        /// Epoch, 1-based.
        epoch: usize,
        /// Steps done in this epoch.
        step: usize,
        /// Steps per epoch.
        steps: usize,
        /// Mean training loss over the steps since the last report (the original script's
        /// `running_loss / 20` when reporting every 20 steps).
        loss: f64,
        /// Training throughput of this epoch so far.
        samples_per_sec: f64,
    },
    /// An epoch finished (and was validated if `val_loss` is present).
    Epoch {
        /// The history row.
        row: HistoryRow,
        /// True when this epoch became the λ's best checkpoint.
        best: bool,
        /// Wall time of the epoch including validation and saving.
        seconds: f64,
    },
}

/// Options of a sweep that do not change its numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// Continue the run in `run_dir` from each λ's last checkpoint.
    pub resume: bool,
    /// Report [`Progress::Step`] every this many steps (0: only at epoch ends).
    pub report_every: usize,
    /// Caller's description of the features' source, stored in `config.json`.
    pub source: serde_json::Value,
    /// Caller's description of settings that do not change the numbers (preset, report
    /// interval), stored in `config.json` as `options`.
    pub options: serde_json::Value,
    /// How many λs train at the same time, one thread each (each λ is independent and
    /// single-threaded, so the results are the same bit for bit whatever this is).
    pub jobs: usize,
    /// When another process holds the run directory, wait for it instead of failing at once.
    pub wait_for_lock: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            resume: false,
            report_every: 2000,
            source: serde_json::Value::Null,
            options: serde_json::Value::Null,
            jobs: 1,
            wait_for_lock: false,
        }
    }
}

/// How a sweep ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SweepOutcome {
    /// Every λ trained; `summary.json` written.
    Finished(Summary),
    /// The progress callback asked to stop; the run directory holds every completed epoch and
    /// `--resume` continues it.
    Stopped,
}

/// The progress callback: return `ControlFlow::Break(())` to stop after saving what is done.
pub type ProgressFn<'a> = dyn FnMut(&Progress) -> ControlFlow<()> + 'a;

/// Trains one head per λ on `train`, validates on `val`, and writes the run directory
/// described in the module docs. With `opts.resume`, continues the run already in `run_dir`
/// (whose configuration and features must match).
pub fn sweep(
    train: &FeatureSet,
    val: &FeatureSet,
    lambdas: &[f32],
    cfg: &TrainConfig,
    run_dir: &Path,
    opts: &RunOptions,
    progress: &mut ProgressFn,
) -> Result<SweepOutcome> {
    Ok(sweep_holding(train, val, lambdas, cfg, run_dir, opts, progress)?.0)
}

/// As [`sweep`], handing over the run directory's lock, held since before the sweep began:
/// a caller that writes more into the directory (the test results, a report) keeps it so
/// that no other process can write there in between.
pub fn sweep_holding(
    train: &FeatureSet,
    val: &FeatureSet,
    lambdas: &[f32],
    cfg: &TrainConfig,
    run_dir: &Path,
    opts: &RunOptions,
    progress: &mut ProgressFn,
) -> Result<(SweepOutcome, DirLock)> {
    cfg.validate()?;
    validate_lambdas(lambdas)?;
    check_sets(train, val)?;
    // A head too large to hold is refused before anything is written.
    HeadDims {
        input: train.dim,
        hidden: cfg.hidden,
        classes: train.classes.len(),
    }
    .validate()?;
    let config = RunConfig {
        format: RUN_FORMAT.to_string(),
        train: cfg.clone(),
        lambdas: lambdas.to_vec(),
        extractor: train.extractor.clone(),
        feature_dim: train.dim,
        classes: train.classes.len(),
        class_names: train.classes.clone(),
        n_train: train.len(),
        n_val: val.len(),
        split_digest: split_digest(train, val),
        source: opts.source.clone(),
        options: opts.options.clone(),
    };
    let config_path = run_dir.join("config.json");
    if opts.resume && !config_path.exists() {
        return Err(Error::invalid(
            "resume",
            format!(
                "{} holds no run to resume (no config.json)",
                run_dir.display()
            ),
        ));
    }
    // Two processes writing one run directory would mix their checkpoints silently: hold it
    // for the whole sweep. Then no other writer can be alive, so any temporary file left
    // there (by a killed process) is stale.
    let lock = DirLock::acquire(run_dir, "training run", opts.wait_for_lock)?;
    remove_run_temporaries(run_dir)?;
    if config_path.exists() {
        if !opts.resume {
            return Err(Error::invalid(
                "run_dir",
                format!(
                    "{} already holds a run; resume it, or choose another run directory",
                    run_dir.display()
                ),
            ));
        }
        let old = RunConfig::read(run_dir)?;
        compare_configs(&config_path, &old, &config)?;
    } else {
        crate::io::write_json(&config_path, &config)?;
    }

    let history = History {
        path: run_dir.join("history.csv"),
        slots: Mutex::new(vec![Vec::new(); lambdas.len()]),
    };
    let ctx = |index: usize| LambdaCtx {
        run_dir,
        lambda: lambdas[index],
        index,
        count: lambdas.len(),
        cfg,
        resume: opts.resume,
        report_every: opts.report_every,
    };
    let jobs = opts.jobs.clamp(1, lambdas.len());
    let mut results: Vec<Option<Result<ControlFlow<(), LambdaSummary>>>> =
        (0..lambdas.len()).map(|_| None).collect();
    if jobs == 1 {
        for (index, slot) in results.iter_mut().enumerate() {
            let r = fit(&ctx(index), train, val, &history, progress);
            let stop = !matches!(r, Ok(ControlFlow::Continue(_)));
            *slot = Some(r);
            if stop {
                break;
            }
        }
    } else {
        run_parallel(
            jobs,
            &mut results,
            &|index, report| fit(&ctx(index), train, val, &history, report),
            progress,
        );
    }
    // An error (the first in λ order) wins over a stop, which wins over success.
    if let Some(i) = results.iter().position(|r| matches!(r, Some(Err(_)))) {
        if let Some(Some(Err(e))) = results.into_iter().nth(i) {
            return Err(e);
        }
        return Ok((SweepOutcome::Stopped, lock));
    }
    let mut summaries = Vec::with_capacity(lambdas.len());
    for r in results {
        match r {
            Some(Ok(ControlFlow::Continue(s))) => summaries.push(s),
            _ => return Ok((SweepOutcome::Stopped, lock)),
        }
    }
    history.write()?;
    if summaries.iter().all(|s| s.failed) {
        let each: Vec<&str> = summaries
            .iter()
            .flat_map(|s| &s.problems)
            .filter(|p| p.kind == ProblemKind::Diverged)
            .map(|p| p.message.as_str())
            .collect();
        let prefix = if summaries.len() > 1 {
            "every λ failed, so none can be chosen: "
        } else {
            ""
        };
        return Err(Error::Numerical(format!(
            "{prefix}{}; {}",
            each.join("; "),
            likely_cause(train, cfg, &summaries)
        )));
    }
    let chosen = choose(cfg.select, &summaries)?;
    let mut warnings: Vec<String> = summaries
        .iter()
        .flat_map(|s| &s.problems)
        .map(|p| p.message.clone())
        .collect();
    let healthy: Vec<&LambdaSummary> = summaries.iter().filter(|s| !s.failed).collect();
    if healthy.len() > 1
        && healthy
            .iter()
            .all(|s| s.best_val_loss == healthy[0].best_val_loss)
    {
        warnings.push(format!(
            "every λ reached the same validation loss ({}): the L2 strength made no difference, \
             which usually means the heads learned nothing",
            healthy[0].best_val_loss
        ));
    }
    if !warnings.is_empty() {
        warnings.push(likely_cause(train, cfg, &summaries));
    }
    let summary = Summary {
        select: cfg.select,
        chosen_lambda: chosen.lambda,
        chosen_checkpoint: chosen.best_checkpoint.clone(),
        lambdas: summaries,
        warnings,
    };
    crate::io::write_json(&run_dir.join("summary.json"), &summary)?;
    Ok((SweepOutcome::Finished(summary), lock))
}

/// Removes the temporary files an interrupted write left in `run_dir` and in its λ
/// directories (`lambda_*`); the caller holds the run directory's lock.
fn remove_run_temporaries(run_dir: &Path) -> Result<()> {
    crate::io::remove_stale_temporaries(run_dir)?;
    let entries = std::fs::read_dir(run_dir).map_err(|e| Error::io("listing", run_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", run_dir, e))?;
        let is_lambda = entry.file_name().to_string_lossy().starts_with("lambda_");
        if is_lambda && entry.file_type().is_ok_and(|t| t.is_dir()) {
            crate::io::remove_stale_temporaries(&entry.path())?;
        }
    }
    Ok(())
}

/// Checks that the best checkpoint a `last` checkpoint's state refers to exists, loads, and
/// is epoch `epoch` of λ `lambda`.
fn verify_best(best_path: &Path, last_path: &Path, lambda: f32, epoch: usize) -> Result<()> {
    if !best_path.exists() {
        return Err(Error::format(
            best_path,
            format!(
                "missing, but the run state in {} says epoch {epoch} of λ = {lambda} is the \
                 best: this run directory cannot be resumed (start a new one)",
                last_path.display()
            ),
        ));
    }
    let best = checkpoint::load(best_path)?;
    if best.meta.lambda.to_bits() != lambda.to_bits() || best.meta.epoch != epoch {
        return Err(Error::Fingerprint {
            path: best_path.to_path_buf(),
            msg: format!(
                "holds epoch {} of λ = {}, but the run state in {} says the best is epoch \
                 {epoch} of λ = {lambda}",
                best.meta.epoch,
                best.meta.lambda,
                last_path.display()
            ),
        });
    }
    Ok(())
}

/// Which λ of a sweep is being fitted, and where.
struct LambdaCtx<'a> {
    run_dir: &'a Path,
    lambda: f32,
    index: usize,
    count: usize,
    cfg: &'a TrainConfig,
    resume: bool,
    report_every: usize,
}

/// Trains one λ for the configured epochs (or the rest of them on resume), keeping its rows
/// in `history` and rewriting `history.csv` and the checkpoints after every epoch.
fn fit(
    ctx: &LambdaCtx,
    train: &FeatureSet,
    val: &FeatureSet,
    history: &History,
    progress: &mut ProgressFn,
) -> Result<ControlFlow<(), LambdaSummary>> {
    let cfg = ctx.cfg;
    let lambda = ctx.lambda;
    let dir_name = lambda_dir_name(lambda);
    let dir = ctx.run_dir.join(&dir_name);
    let best_path = dir.join("best.safetensors");
    let last_path = dir.join("last.safetensors");
    let dims = HeadDims {
        input: train.dim,
        hidden: cfg.hidden,
        classes: train.classes.len(),
    };

    // Start fresh, or from the last completed epoch.
    let mut head;
    let mut sgd = Sgd::new(dims, cfg.lr, cfg.momentum)?;
    let mut state;
    if ctx.resume && last_path.exists() {
        let ck = checkpoint::load(&last_path)?;
        ck.check_features(train)?;
        let st = ck.meta.state.clone().ok_or_else(|| {
            Error::format(&last_path, "a `last` checkpoint without training state")
        })?;
        if ck.meta.lambda.to_bits() != lambda.to_bits() || ck.meta.dims != dims {
            return Err(Error::Fingerprint {
                path: last_path.clone(),
                msg: format!(
                    "holds λ = {} with dims {:?}, expected λ = {lambda} with {dims:?}",
                    ck.meta.lambda, ck.meta.dims
                ),
            });
        }
        sgd.velocity = ck.momentum.ok_or_else(|| {
            Error::format(&last_path, "a `last` checkpoint without momentum buffers")
        })?;
        // The state names a best epoch: its checkpoint must be there and be that epoch, or
        // summary.json would end up naming a file that is missing or another run's.
        if let Some(best) = &st.best {
            verify_best(&best_path, &last_path, lambda, best.epoch)?;
        }
        head = ck.head;
        state = st;
    } else {
        head = Head::init(dims.input, dims.hidden, dims.classes, cfg.seed)?
            .with_activation(cfg.activation);
        state = TrainState {
            history: Vec::new(),
            best: None,
            finished: false,
            rng: RNG_SCHEME.to_string(),
        };
    }
    let done = state.history.len();
    history.set(ctx.index, &state.history)?;
    let n = train.len();
    let steps = n.div_ceil(cfg.batch_size);
    if let ControlFlow::Break(()) = progress(&Progress::Lambda {
        lambda,
        index: ctx.index,
        count: ctx.count,
        done_epochs: done,
        epochs: cfg.epochs,
        steps,
    }) {
        return Ok(ControlFlow::Break(()));
    }

    // Buffers are sized by the largest batch there can be, not by the setting, which may be
    // far larger than the data.
    let max_batch = cfg.batch_size.min(n);
    let mut stepper = Stepper::new(dims, max_batch);
    let mut mask = vec![0.0f32; max_batch * dims.hidden]; // [b, H]
    let mut order: Vec<usize> = (0..n).collect();
    for epoch in done + 1..=cfg.epochs {
        let started = Instant::now();
        shuffle(&mut order, cfg.seed, epoch);
        let mut dropout = Dropout::new(cfg.seed, epoch, cfg.dropout);
        let (mut loss_sum, mut pen_sum) = (0.0f64, 0.0f64);
        let (mut window_loss, mut window_steps) = (0.0f64, 0usize);
        let mut xs: Vec<&[f32]> = Vec::with_capacity(max_batch);
        let mut ys: Vec<u8> = Vec::with_capacity(max_batch);
        for (step, batch) in order.chunks(cfg.batch_size).enumerate() {
            xs.clear();
            ys.clear();
            for &r in batch {
                xs.push(train.row(r));
                ys.push(train.labels[r]);
            }
            let m = if cfg.dropout > 0.0 {
                let m = &mut mask[..batch.len() * dims.hidden];
                dropout.fill(m);
                Some(&m[..])
            } else {
                None
            };
            let (loss, penalty) = stepper.step(&mut head, &mut sgd, &xs, &ys, lambda, m)?;
            if !(loss.is_finite() && penalty.is_finite()) {
                let what = format!(
                    "the training loss became non-finite at step {} (cross-entropy {loss}, penalty {penalty})",
                    step + 1
                );
                let failure = diverged(lambda, epoch, &what, &state, &best_path);
                return finish_lambda(ctx, &dir_name, &state, Some(failure), val, history);
            }
            let b = batch.len() as f64;
            loss_sum += f64::from(loss) * b;
            pen_sum += f64::from(penalty) * b;
            window_loss += f64::from(loss);
            window_steps += 1;
            let last_step = step + 1 == steps;
            if (ctx.report_every > 0 && (step + 1).is_multiple_of(ctx.report_every)) || last_step {
                let secs = started.elapsed().as_secs_f64();
                let done_samples = (step + 1).saturating_mul(cfg.batch_size).min(n);
                let flow = progress(&Progress::Step {
                    lambda,
                    epoch,
                    step: step + 1,
                    steps,
                    loss: window_loss / window_steps as f64,
                    samples_per_sec: done_samples as f64 / secs.max(1e-9),
                });
                window_loss = 0.0;
                window_steps = 0;
                if flow.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
        let mut row = HistoryRow {
            lambda,
            epoch,
            train_loss: loss_sum / n as f64,
            train_penalty: pen_sum / n as f64,
            val_loss: None,
            val_accuracy: None,
        };
        let mut improved = false;
        if epoch.is_multiple_of(cfg.val_every) || epoch == cfg.epochs {
            let score = head.score(&val.features, &val.labels)?;
            if !score.loss.is_finite() {
                let what = format!("the validation loss is {}", score.loss);
                let failure = diverged(lambda, epoch, &what, &state, &best_path);
                return finish_lambda(ctx, &dir_name, &state, Some(failure), val, history);
            }
            row.val_loss = Some(score.loss);
            row.val_accuracy = Some(score.accuracy);
            if cfg
                .select
                .improves(score.loss, score.accuracy, state.best.as_ref())
            {
                improved = true;
                state.best = Some(BestSoFar {
                    epoch,
                    val_loss: score.loss,
                    val_accuracy: score.accuracy,
                });
                let meta = meta(
                    CheckpointKind::Best,
                    &head,
                    lambda,
                    epoch,
                    train,
                    cfg,
                    row,
                    None,
                );
                checkpoint::save(&best_path, &head, None, &meta)?;
            }
        }
        state.history.push(row);
        state.finished = epoch == cfg.epochs;
        let meta = meta(
            CheckpointKind::Last,
            &head,
            lambda,
            epoch,
            train,
            cfg,
            row,
            Some(state.clone()),
        );
        checkpoint::save(&last_path, &head, Some(&sgd.velocity), &meta)?;
        history.set(ctx.index, &state.history)?;
        let flow = progress(&Progress::Epoch {
            row,
            best: improved,
            seconds: started.elapsed().as_secs_f64(),
        });
        if flow.is_break() && epoch < cfg.epochs {
            return Ok(ControlFlow::Break(()));
        }
    }
    if state.best.is_none() {
        return Err(Error::Numerical(format!(
            "λ = {lambda}: no epoch was validated, so there is no best checkpoint"
        )));
    }
    finish_lambda(ctx, &dir_name, &state, None, val, history)
}

/// The summary of a λ that finished, or stopped on `failure` (a divergence): its best epoch
/// and every problem found — the divergence, a best checkpoint that predicts a single class
/// on the validation split, a training loss that never fell below the first epoch's.
fn finish_lambda(
    ctx: &LambdaCtx,
    dir_name: &str,
    state: &TrainState,
    failure: Option<Error>,
    val: &FeatureSet,
    history: &History,
) -> Result<ControlFlow<(), LambdaSummary>> {
    let lambda = ctx.lambda;
    history.set(ctx.index, &state.history)?;
    let mut problems = Vec::new();
    let failed = failure.is_some();
    if let Some(e) = failure {
        let epoch = state.history.len() + 1;
        problems.push(Problem {
            kind: ProblemKind::Diverged,
            epoch: Some(epoch),
            message: match e {
                Error::Numerical(m) => m,
                other => other.to_string(),
            },
        });
    }
    if let Some(best) = &state.best {
        let path = ctx.run_dir.join(dir_name).join("best.safetensors");
        let ck = checkpoint::load(&path)?;
        let predicted = ck.head.predict(&val.features, &val.labels)?.predicted;
        // Below two images per class a healthy head can predict one class by chance.
        if let Some(&first) = predicted.first()
            && predicted.len() >= SINGLE_CLASS_MIN_IMAGES_PER_CLASS * val.classes.len()
            && predicted.iter().all(|&p| p == first)
        {
            let name = val.classes.get(first as usize).map_or("?", String::as_str);
            problems.push(Problem {
                kind: ProblemKind::SingleClass,
                epoch: Some(best.epoch),
                message: format!(
                    "λ = {lambda}: the best checkpoint (epoch {}) predicts one class, {first} \
                     ({name}), for all {} validation images: the head has collapsed",
                    best.epoch,
                    predicted.len()
                ),
            });
        }
    }
    if let Some((first, rest)) = state.history.split_first()
        && !rest.is_empty()
        && rest.iter().all(|r| r.train_loss >= first.train_loss)
    {
        problems.push(Problem {
            kind: ProblemKind::LossNeverFell,
            epoch: None,
            message: format!(
                "λ = {lambda}: the training loss never fell below its first epoch's ({:.4}) \
                 in {} epochs",
                first.train_loss,
                state.history.len()
            ),
        });
    }
    let best = state.best;
    Ok(ControlFlow::Continue(LambdaSummary {
        lambda,
        best_checkpoint: if best.is_some() {
            format!("{dir_name}/best.safetensors")
        } else {
            String::new()
        },
        dir: dir_name.to_string(),
        best_epoch: best.map_or(0, |b| b.epoch),
        best_val_loss: best.map_or(f64::NAN, |b| b.val_loss),
        best_val_accuracy: best.map_or(f64::NAN, |b| b.val_accuracy),
        final_train_loss: state.history.last().map_or(f64::NAN, |r| r.train_loss),
        epochs: state.history.len(),
        failed,
        problems,
    }))
}

/// The fewest validation images per class on which a head predicting a single class is
/// reported.
pub const SINGLE_CLASS_MIN_IMAGES_PER_CLASS: usize = 2;

/// The sentence that follows a list of problems: what usually causes them, with the numbers
/// that let a reader judge (λ·lr against the stability limit of SGD with momentum on the
/// penalty, else the learning rate and the scale of the features).
fn likely_cause(train: &FeatureSet, cfg: &TrainConfig, summaries: &[LambdaSummary]) -> String {
    // On the penalty alone the update is w ← w − lr·λ·w with momentum μ, which converges
    // only while lr·λ < 2(1 + μ).
    let limit = 2.0 * (1.0 + f64::from(cfg.momentum));
    let too_strong: Vec<String> = summaries
        .iter()
        .filter(|s| s.failed && f64::from(cfg.lr) * f64::from(s.lambda) >= limit)
        .map(|s| format!("λ = {}", s.lambda))
        .collect();
    if !too_strong.is_empty() {
        return format!(
            "likely cause: for {} the L2 step lr·λ is beyond 2(1 + momentum) = {limit:.2}, where SGD \
             makes the weights grow instead of shrink: use a smaller λ or --lr",
            too_strong.join(", ")
        );
    }
    let n = train.features.len().max(1);
    let mean_abs = train
        .features
        .iter()
        .map(|&v| f64::from(v.abs()))
        .sum::<f64>()
        / n as f64;
    format!(
        "likely cause: the learning rate (--lr {}) is too high for the scale of the features \
         (mean |x| = {mean_abs:.3} over the training features; ImageNet-normalised ResNet-50 \
         features average about 0.4): try a smaller --lr, or check how the features were \
         made (--normalize)",
        cfg.lr
    )
}

/// The rows of every λ, in λ order, and the `history.csv` they are written to.
struct History {
    path: PathBuf,
    slots: Mutex<Vec<Vec<HistoryRow>>>,
}

impl History {
    /// Replaces λ `index`'s rows and rewrites the file (under the lock, so concurrent λs
    /// never interleave writes).
    fn set(&self, index: usize, rows: &[HistoryRow]) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots[index] = rows.to_vec();
        let all: Vec<HistoryRow> = slots.iter().flatten().copied().collect();
        write_history(&self.path, &all)
    }

    fn write(&self) -> Result<()> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let all: Vec<HistoryRow> = slots.iter().flatten().copied().collect();
        write_history(&self.path, &all)
    }
}

type LambdaResult = Result<ControlFlow<(), LambdaSummary>>;

/// Runs `fit_one(index, report)` for every λ index on `jobs` threads, taking the λs in order.
/// Progress events are passed to `progress` on this thread; when it breaks, or a λ fails,
/// the workers stop at their next report and take no new λ.
fn run_parallel(
    jobs: usize,
    results: &mut [Option<LambdaResult>],
    fit_one: &(dyn Fn(usize, &mut ProgressFn) -> LambdaResult + Sync),
    progress: &mut ProgressFn,
) {
    let count = results.len();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Option<Progress>, Option<LambdaResult>)>();
        for _ in 0..jobs {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            scope.spawn(move || {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= count || stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut report = |p: &Progress| {
                        if stop.load(Ordering::SeqCst) {
                            return ControlFlow::Break(());
                        }
                        // The receiver lives until every worker is done.
                        let _ = tx.send((index, Some(*p), None));
                        ControlFlow::Continue(())
                    };
                    let r = fit_one(index, &mut report);
                    if !matches!(r, Ok(ControlFlow::Continue(_))) {
                        stop.store(true, Ordering::SeqCst);
                    }
                    let _ = tx.send((index, None, Some(r)));
                }
            });
        }
        drop(tx);
        for (index, event, result) in rx {
            if let Some(e) = event
                && !stop.load(Ordering::SeqCst)
                && progress(&e).is_break()
            {
                stop.store(true, Ordering::SeqCst);
            }
            if let Some(r) = result {
                results[index] = Some(r);
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
fn meta(
    kind: CheckpointKind,
    head: &Head,
    lambda: f32,
    epoch: usize,
    train: &FeatureSet,
    cfg: &TrainConfig,
    metrics: HistoryRow,
    state: Option<TrainState>,
) -> CheckpointMeta {
    CheckpointMeta {
        format: checkpoint::FORMAT.to_string(),
        kind,
        lambda,
        epoch,
        dims: head.dims,
        extractor: train.extractor.clone(),
        classes: train.classes.clone(),
        config: cfg.clone(),
        metrics,
        state,
    }
}

/// The error for a non-finite loss: names λ, the epoch and what happened, and says which
/// checkpoint survives.
fn diverged(lambda: f32, epoch: usize, what: &str, state: &TrainState, best_path: &Path) -> Error {
    let kept = match &state.best {
        Some(b) => format!(
            "the best checkpoint so far (epoch {}) is kept at {}",
            b.epoch,
            best_path.display()
        ),
        None => "no epoch had been validated yet, so there is no best checkpoint".to_string(),
    };
    Error::Numerical(format!(
        "λ = {lambda}, epoch {epoch}: {what}; the training diverged (try a smaller learning rate); {kept}"
    ))
}

/// Picks the λ whose best epoch is best by `select` (the first on ties), among the λs that
/// did not fail.
fn choose(select: Select, summaries: &[LambdaSummary]) -> Result<&LambdaSummary> {
    let mut best: Option<&LambdaSummary> = None;
    for s in summaries.iter().filter(|s| !s.failed) {
        let better = match best {
            None => true,
            Some(b) => match select {
                Select::Loss => s.best_val_loss < b.best_val_loss,
                Select::Accuracy => s.best_val_accuracy > b.best_val_accuracy,
            },
        };
        if better {
            best = Some(s);
        }
    }
    best.ok_or_else(|| Error::invalid("lambdas", "no λ was trained"))
}

#[cfg(test)]
mod tests {
    use super::checks::first_difference;
    use super::*;

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a = vec![0; 1000];
        let mut b = vec![0; 1000];
        shuffle(&mut a, 3, 1);
        shuffle(&mut b, 3, 1);
        assert_eq!(a, b);
        shuffle(&mut b, 3, 2);
        assert_ne!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        // Not the identity, and every position moves about as often as chance says.
        let fixed = a.iter().enumerate().filter(|(i, v)| i == *v).count();
        assert!(fixed < 10, "{fixed} fixed points");
    }

    #[test]
    fn first_difference_names_nested_fields() {
        let a = serde_json::json!({"train": {"lr": 0.1, "epochs": 3}, "lambdas": [0.0]});
        let b = serde_json::json!({"train": {"lr": 0.1, "epochs": 4}, "lambdas": [0.0]});
        assert_eq!(
            first_difference("", &a, &b).as_deref(),
            Some("train.epochs")
        );
        assert_eq!(first_difference("", &a, &a), None);
    }
}
