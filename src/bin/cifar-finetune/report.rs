//! `cifar-finetune report`: (re)build the plots and the self-contained `report.html` of a run
//! directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cifar_finetune::io::DirLock;
use cifar_finetune::report::{self, DEFAULT_GALLERY_SIZE, ReportOptions};

/// Draw the plots (PNG and SVG, under <run-dir>/plots/) and write <run-dir>/report.html: one
/// self-contained file with the configuration, the plots, the test metrics and a gallery of
/// test images. Uses config.json and history.csv, and summary.json, metrics.json and
/// predictions.csv when they exist.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run directory written by `train`/`sweep` (and `test`, for the test section).
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Data directory holding CIFAR-10, for the gallery's test images
    /// [default: the one recorded in config.json].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Test images in the gallery, misclassified first (0: no gallery).
    #[arg(long, default_value_t = DEFAULT_GALLERY_SIZE)]
    pub gallery: usize,
    /// Run directories of the same sweep trained with other seeds (comma-separated): adds the
    /// plot of the final validation accuracy's mean ± std across seeds, per λ
    /// [default: those `run --repeats` left under <run-dir>/repeats/].
    #[arg(long, value_delimiter = ',')]
    pub seed_runs: Vec<PathBuf>,
    /// When another process is writing into the run directory, wait for it instead of
    /// stopping with an error.
    #[arg(long)]
    pub wait_lock: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let seed_runs = if args.seed_runs.is_empty() {
        repeat_runs(&args.run_dir)?
    } else {
        args.seed_runs.clone()
    };
    let mut seed_histories = Vec::with_capacity(seed_runs.len());
    for dir in &seed_runs {
        let history = cifar_finetune::rundir::read_history(&dir.join("history.csv"))
            .with_context(|| format!("reading the seed run {}", dir.display()))?;
        seed_histories.push(history);
    }
    let opts = ReportOptions {
        dataset: None,
        data_dir: args.data,
        gallery_size: args.gallery,
        seed_histories,
    };
    let _lock = DirLock::acquire(&args.run_dir, "run directory", args.wait_lock)?;
    let out = report::write_run_report(&args.run_dir, &opts)
        .with_context(|| format!("writing the report of {}", args.run_dir.display()))?;
    for note in &out.notes {
        eprintln!("note: {note}");
    }
    println!(
        "wrote {} plot files under {}",
        out.plots.len(),
        args.run_dir.join(report::PLOTS_DIR).display()
    );
    println!("report: {}", out.html.display());
    Ok(())
}

/// The run directories `run --repeats` made inside `run_dir`, in order of seed.
fn repeat_runs(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = run_dir.join(crate::run::REPEATS_DIR);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut runs: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let seed = e
                .file_name()
                .to_str()?
                .strip_prefix("seed-")?
                .parse()
                .ok()?;
            Some((seed, e.path()))
        })
        .collect();
    runs.sort();
    Ok(runs.into_iter().map(|(_, p)| p).collect())
}
