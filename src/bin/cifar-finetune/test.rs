//! `cifar-finetune test --checkpoint FILE [--split val|test]`: scores a trained head on a
//! split and writes `metrics.json` and `predictions.csv` (test split) or
//! `metrics-val.json` and `predictions-val.csv` (validation split).

use std::path::{Path, PathBuf};

use anyhow::Context;
use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::Split;
use cifar_finetune::evaluate::{self, Evaluation};
use cifar_finetune::io::DirLock;
use cifar_finetune::report::plots::MANY_CLASSES;
use cifar_finetune::rundir::RunConfig;
use cifar_finetune::train;

use crate::source::{self, FeatureArgs, SourceRecord};

/// `test` or `val` (the training split is what the head was fitted on: not a test).
fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "test" => Ok(Split::Test),
        "val" => Ok(Split::Val),
        other => Err(format!("`{other}` is neither `test` nor `val`")),
    }
}

/// Evaluate a checkpoint on the test (or validation) split: loss, top-1 and top-5 accuracy,
/// per-class accuracy, confusion matrix, classification report, and every image's class
/// probabilities. The feature flags not given are taken from the checkpoint and its run's
/// config.json, so `--checkpoint` alone scores the head on features made as its own were.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The checkpoint: a `best.safetensors` of a run (or its `best.json` sidecar).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The split to score: `test` (writes metrics.json, predictions.csv) or `val`, the
    /// validation images held out of the training part with --val-count/--split-seed
    /// (writes metrics-val.json, predictions-val.csv).
    #[arg(long, default_value = "test", value_parser = parse_split)]
    pub split: Split,
    /// Directory for metrics.json and predictions.csv [default: the checkpoint's run
    /// directory].
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub features: FeatureArgs,
}

/// Runs `test`. `given` says whether the command line set a flag (by its field name): the
/// flags it leaves unset are taken from the checkpoint (backbone, weights, precision,
/// preprocessing) and its run's `config.json` (dataset, data directory, image limit, split
/// options), so that the head is scored on features made as its own were.
pub fn run(args: Args, given: &dyn Fn(&str) -> bool) -> anyhow::Result<()> {
    // Read the checkpoint before extracting anything: a wrong path fails at once.
    let ck = checkpoint::load(&args.checkpoint)?;
    let run_dir = evaluate::default_output_dir(&ck.path);
    let config = run_config(&run_dir);
    let mut features = args.features.clone();
    let mut taken = Vec::new();
    if let Some(cfg) = &config {
        let path = run_dir.join("config.json");
        let rec: SourceRecord = serde_json::from_value(cfg.source.clone())
            .with_context(|| format!("{}: `source`", path.display()))?;
        taken = features
            .adopt(&rec, given)
            .with_context(|| format!("{}: `source`", path.display()))?;
    }
    // The head's backbone, unless --backbone or the --weights file says otherwise: then it
    // is refused at once, naming both, rather than after extracting every feature.
    let backbone = source::checkpoint_backbone(&ck, features.backbone, features.weights.as_ref())?;
    features.backbone = Some(backbone);
    if features.weights.is_none() {
        features.weights = source::checkpoint_weights(&ck);
    }
    let out = args.out.clone().unwrap_or_else(|| run_dir.clone());
    // Another process writing this directory (a sweep, another test) must not interleave its
    // files with ours; taken before the (possibly long) extraction, so a refusal is at once.
    let _lock = DirLock::acquire(&out, "run directory", features.wait_lock)?;
    taken.extend(features.adopt_extractor(&ck.meta.extractor, given));
    if !taken.is_empty() {
        eprintln!("as the head was trained: {}", taken.join(" "));
    }
    let set = if args.split == Split::Val {
        // The validation rows must be the run's: compare the split with its config.json.
        let [train_set, val_set] =
            <[_; 2]>::try_from(source::load_many(&features, &[Split::Train, Split::Val])?.sets)
                .map_err(|_| anyhow::anyhow!("expected the training and validation features"))?;
        if let Some(cfg) = &config
            && cfg.split_digest != train::split_digest(&train_set, &val_set)
        {
            anyhow::bail!(
                "--split val: these validation images are not those of the run in {} \
                 (pass the --val-count, --split-seed and --limit it was trained with: {})",
                run_dir.display(),
                cfg.source
            );
        }
        val_set
    } else {
        let loaded = source::load_many(&features, &[args.split])?;
        if !loaded.skipped.is_empty() {
            // Beside the metrics they leave out of the count.
            let path = out.join(format!("skipped_images-{}.json", args.split));
            cifar_finetune::io::write_json(&path, &loaded.skipped)?;
            println!(
                "{} undecodable image(s) left out (--skip-bad), listed in {}",
                loaded.skipped.len(),
                path.display()
            );
        }
        loaded
            .sets
            .into_iter()
            .next()
            .context("no feature set returned")?
    };
    let eval = evaluate::evaluate(&ck, &set, args.split)?;
    let (metrics, predictions) = evaluate::write_outputs(&eval, &out)
        .with_context(|| format!("writing the results into {}", out.display()))?;
    print_table(&eval);
    println!();
    println!("wrote {}", metrics.display());
    println!("wrote {}", predictions.display());
    Ok(())
}

/// The run's `config.json`, when the checkpoint lies in a run directory and it can be read
/// (a note says why not, when it cannot).
fn run_config(run_dir: &Path) -> Option<RunConfig> {
    let path = run_dir.join("config.json");
    if !path.exists() {
        return None;
    }
    RunConfig::read(run_dir)
        .inspect_err(|e| {
            eprintln!(
                "note: {} is unreadable ({e}); the flags given are used as they are",
                path.display()
            );
        })
        .ok()
}

fn print_table(eval: &Evaluation) {
    let m = &eval.metrics;
    println!(
        "checkpoint {} (λ = {}, epoch {})",
        m.checkpoint.display(),
        m.lambda,
        m.epoch
    );
    println!(
        "{} split: {} images, loss {:.4}, accuracy {:.2} %, top-5 accuracy {}",
        m.split,
        m.count,
        m.loss,
        100.0 * m.accuracy,
        m.top5_accuracy
            .map_or("n/a".to_string(), |a| format!("{:.2} %", 100.0 * a))
    );
    println!();
    let width = m
        .class_names
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let many = m.class_names.len() > MANY_CLASSES;
    println!(
        "{:<width$}  {:>9}  {:>15}{}",
        "class",
        "accuracy",
        "correct / total",
        if many { "  (worst first)" } else { "" }
    );
    let order: Vec<usize> = if many {
        m.metrics.classes_by_recall()
    } else {
        (0..m.class_names.len()).collect()
    };
    for c in order {
        let name = &m.class_names[c];
        let row = &m.metrics.confusion[c];
        let total: u64 = row.iter().sum();
        println!(
            "{name:<width$}  {:>7.2} %  {:>7} / {}",
            100.0 * m.per_class_accuracy[c],
            row[c],
            total
        );
    }
    println!();
    if many {
        // A 100-column matrix does not fit a terminal: what it would show, in a list.
        println!("most confused classes (the whole confusion matrix is in metrics.json)");
        for p in m.metrics.most_confused(10) {
            println!(
                "{:>width$} → {:<width$}  {:>5} images  {:>6.2} % of the class",
                m.class_names[p.true_class],
                m.class_names[p.predicted],
                p.count,
                100.0 * p.share
            );
        }
    } else {
        println!("confusion matrix (rows: true class, columns: predicted class)");
        let short: Vec<String> = m
            .class_names
            .iter()
            .map(|n| n.chars().take(5).collect())
            .collect();
        let mut header = format!("{:<width$}", "");
        for s in &short {
            header.push_str(&format!(" {s:>5}"));
        }
        println!("{header}");
        for (c, name) in m.class_names.iter().enumerate() {
            let mut line = format!("{name:<width$}");
            for v in &m.metrics.confusion[c] {
                line.push_str(&format!(" {v:>5}"));
            }
            println!("{line}");
        }
    }
    println!();
    println!("classification report");
    print!("{}", m.report);
}
