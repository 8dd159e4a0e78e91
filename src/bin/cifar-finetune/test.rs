//! `cifar-finetune test --checkpoint FILE [--split val|test]`: scores a trained head on a
//! split and writes `metrics.json` and `predictions.csv` (test split) or
//! `metrics-val.json` and `predictions-val.csv` (validation split).

use std::path::PathBuf;

use anyhow::Context;
use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::Split;
use cifar_finetune::evaluate::{self, Evaluation};
use cifar_finetune::io::DirLock;
use cifar_finetune::report::plots::MANY_CLASSES;
use cifar_finetune::rundir;
use cifar_finetune::train;

use crate::source::{self, FeatureArgs, Normalize};

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
/// probabilities.
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

pub fn run(args: Args) -> anyhow::Result<()> {
    // Read the checkpoint before extracting anything: a wrong path fails at once.
    let ck = checkpoint::load(&args.checkpoint)?;
    // The head's backbone, unless --backbone or the --weights file says otherwise: then it
    // is refused at once, naming both, rather than after extracting every feature.
    let backbone =
        source::checkpoint_backbone(&ck, args.features.backbone, args.features.weights.as_ref())?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| evaluate::default_output_dir(&ck.path));
    // Another process writing this directory (a sweep, another test) must not interleave its
    // files with ours; taken before the (possibly long) extraction, so a refusal is at once.
    let _lock = DirLock::acquire(&out, "run directory", args.features.wait_lock)?;
    let mut features = args.features.clone();
    features.backbone = Some(backbone);
    if features.weights.is_none() {
        features.weights = source::checkpoint_weights(&ck);
    }
    if features.normalize.is_none() {
        // The normalisation the head's features were made with, read from its fingerprint.
        let half = FeatureArgs {
            normalize: Some(Normalize::Half),
            ..features.clone()
        }
        .preprocess()
        .fingerprint();
        features.normalize = Some(if ck.meta.extractor.preprocess == half {
            Normalize::Half
        } else {
            Normalize::Imagenet
        });
    }
    let set = if args.split == Split::Val {
        // The validation rows must be the run's: compare the split with its config.json.
        let [train_set, val_set] =
            <[_; 2]>::try_from(source::load_many(&features, &[Split::Train, Split::Val])?.sets)
                .map_err(|_| anyhow::anyhow!("expected the training and validation features"))?;
        let run_dir = evaluate::default_output_dir(&ck.path);
        if let Ok(cfg) = rundir::RunConfig::read(&run_dir)
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
