//! `cifar-finetune test --checkpoint FILE`: scores a trained head on the test split and
//! writes `metrics.json` and `predictions.csv`.

use std::path::PathBuf;

use anyhow::Context;
use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::Split;
use cifar_finetune::evaluate::{self, Evaluation};

use crate::source::{self, FeatureArgs};

/// Evaluate a checkpoint on the test split: loss, accuracy, per-class accuracy, confusion
/// matrix, classification report, and every image's class probabilities.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The checkpoint: a `best.safetensors` of a run (or its `best.json` sidecar).
    #[arg(long)]
    pub checkpoint: PathBuf,
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
    let test = source::load(&args.features, Split::Test)?;
    let eval = evaluate::evaluate(&ck, &test, Split::Test)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| evaluate::default_output_dir(&ck.path));
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
        "{} split: {} images, loss {:.4}, accuracy {:.2} %",
        m.split,
        m.count,
        m.loss,
        100.0 * m.accuracy
    );
    println!();
    let width = m
        .class_names
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$}  {:>9}  {:>15}",
        "class", "accuracy", "correct / total"
    );
    for (c, name) in m.class_names.iter().enumerate() {
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
    println!();
    println!("classification report");
    print!("{}", m.report);
}
