//! `cifar-finetune run`: the whole job in one command — data and weights (downloaded when
//! missing), features (cached), the λ sweep, the λ chosen on validation evaluated on the test
//! split, and the report.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cifar_finetune::checkpoint;
use cifar_finetune::data::cifar::Split;
use cifar_finetune::evaluate;
use cifar_finetune::report::{self, DEFAULT_GALLERY_SIZE, ReportOptions};
use cifar_finetune::rundir;

use crate::source::{self, FeatureArgs};
use crate::sweep::LambdaArgs;
use crate::train::{TrainArgs, default_run_dir, train_sets};

/// Where `--repeats` puts the sweeps with the other seeds, inside the run directory.
pub const REPEATS_DIR: &str = "repeats";

/// Run everything: download what is missing, extract (or reuse) the features, sweep λ,
/// evaluate the λ chosen on validation on the test split, and write report.html.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub lambdas: LambdaArgs,
    /// Sweep K times with seeds seed, seed+1, …: the report then shows the spread of the final
    /// validation accuracy across seeds per λ (the chosen λ and the test use the first seed).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Test images in the report's gallery, misclassified first.
    #[arg(long, default_value_t = DEFAULT_GALLERY_SIZE)]
    pub gallery: usize,
    #[command(flatten)]
    pub hyper: TrainArgs,
    #[command(flatten)]
    pub features: FeatureArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.repeats == 0 {
        anyhow::bail!("invalid --repeats: must be at least 1");
    }
    args.hyper.config().validate()?;
    let lambdas = &args.lambdas.resolve(&args.hyper);
    rundir::validate_lambdas(lambdas)?;
    let features = args.hyper.features(&args.features);
    let run_dir = args
        .hyper
        .run_dir
        .clone()
        .unwrap_or_else(|| default_run_dir("run"));

    let loaded = source::load_many(&features, &[Split::Train, Split::Val, Split::Test])?;
    let [train_set, val_set, test_set] = <[_; 3]>::try_from(loaded.sets)
        .map_err(|_| anyhow::anyhow!("expected the training, validation and test features"))?;
    let sets = (&train_set, &val_set, loaded.skipped.as_slice());

    // The run directory stays locked from the sweep to the report.
    let Some((summary, _lock)) = train_sets(sets, lambdas, &args.hyper, &features, &run_dir)?
    else {
        return Ok(());
    };

    let mut seed_histories = Vec::new();
    for k in 1..args.repeats {
        let mut hyper = args.hyper.clone();
        hyper.seed = args.hyper.seed + k as u64;
        let dir = repeat_dir(&run_dir, hyper.seed);
        println!(
            "\nrepeat {}/{} with seed {}",
            k + 1,
            args.repeats,
            hyper.seed
        );
        if train_sets(sets, lambdas, &hyper, &features, &dir)?.is_none() {
            return Ok(());
        }
        seed_histories.push(rundir::read_history(&dir.join("history.csv"))?);
    }

    let chosen = run_dir.join(&summary.chosen_checkpoint);
    let ck = checkpoint::load(&chosen)?;
    let eval = evaluate::evaluate(&ck, &test_set, Split::Test)?;
    evaluate::write_outputs(&eval, &run_dir)
        .with_context(|| format!("writing the test results into {}", run_dir.display()))?;
    let m = &eval.metrics;
    println!(
        "\ntest split with λ = {} (chosen on validation with seed {}): {} images, \
         loss {:.4}, accuracy {:.2} %",
        summary.chosen_lambda,
        args.hyper.seed,
        m.count,
        m.loss,
        100.0 * m.accuracy
    );

    let out = report::write_run_report(
        &run_dir,
        &ReportOptions {
            dataset: None,
            data_dir: Some(features.data.clone()),
            gallery_size: args.gallery,
            seed_histories,
        },
    )
    .with_context(|| format!("writing the report of {}", run_dir.display()))?;
    for note in &out.notes {
        eprintln!("note: {note}");
    }
    println!("report: {}", out.html.display());
    Ok(())
}

/// The run directory of the repeat with `seed`.
pub fn repeat_dir(run_dir: &Path, seed: u64) -> PathBuf {
    run_dir.join(REPEATS_DIR).join(format!("seed-{seed}"))
}
