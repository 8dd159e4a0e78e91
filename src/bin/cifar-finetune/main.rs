//! The `cifar-finetune` command line: one subcommand per pipeline stage.
//!
//! This binary is the only place that prints or uses `anyhow`; each subcommand lives in
//! its own file beside this one and calls the library.

mod backprop;
mod download;
mod features;
mod predict;
mod progress;
mod report;
mod run;
mod source;
mod sweep;
mod test;
mod train;

use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Transfer learning on CIFAR-10, CIFAR-100 or your own image folders with a frozen, cached
/// torchvision ResNet backbone (ResNet-50 by default).
#[derive(Debug, Parser)]
#[command(name = "cifar-finetune", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one command: download, features, λ sweep, test evaluation, report.html.
    Run(run::Args),
    /// Download CIFAR-10 and a backbone's pretrained weights, verified, into the data directory.
    ///
    /// Every file is verified before it is moved into place: CIFAR-10 by its published md5;
    /// torchvision's .pth weights by sha256 — resnet50's v1 and v2 against their whole
    /// digest, every other one against the first 8 hex digits of its sha256, which its file
    /// name carries (e.g. resnet18-f37072fd.pth) and which is all torchvision itself checks
    /// (the whole digests are not published). The safetensors copies from Hugging Face have
    /// no digest pinned and are not verified; strict loading still checks every tensor name
    /// and shape.
    Download(download::Args),
    /// Extract (or read from the cache) backbone features into a safetensors file.
    Features(features::Args),
    /// Train the head at one L2 strength λ on cached features (writes a run directory).
    Train(train::Args),
    /// Train one head per λ (default 0,1e-4,1e-3,1e-2,1e-1) and choose λ on validation.
    Sweep(sweep::Args),
    /// Evaluate a checkpoint on the test split: metrics.json, predictions.csv and a table.
    ///
    /// The feature flags not given (dataset, data, weights, precision, image size, split…)
    /// are taken from the checkpoint and its run's config.json, and named on stderr.
    Test(test::Args),
    /// Draw the plots and write the self-contained report.html of a run directory.
    Report(report::Args),
    /// Classify your own PNG or JPEG images with a trained head (top classes and probabilities).
    Predict(predict::Args),
    /// Back-propagation by the δ-rule on a small network, checked against finite differences.
    Backprop(backprop::Args),
}

fn main() -> ExitCode {
    // The matches too: `test` takes from the checkpoint's run what its flags leave unset.
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let result: anyhow::Result<()> = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Download(args) => download::run(args),
        Command::Features(args) => features::run(args),
        Command::Backprop(args) => backprop::run(args),
        Command::Report(args) => report::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Train(args) => train::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Test(args) => {
            let test = matches.subcommand_matches("test");
            test::run(args, &|id| {
                test.and_then(|m| m.value_source(id))
                    .is_some_and(|s| s != ValueSource::DefaultValue)
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe(err.as_ref()));
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {}", describe(cause));
            }
            ExitCode::FAILURE
        }
    }
}

/// An error as the user should read it: the library names invalid settings by their field
/// names (`batch_size`), which become the flags that set them (`--batch-size`).
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    match err.downcast_ref::<cifar_finetune::Error>() {
        Some(cifar_finetune::Error::Invalid { what, msg }) => match flag_for(what) {
            // A run directory that holds a run is continued with --resume.
            Some("--run-dir") => format!("invalid --run-dir: {msg} (--resume continues it)"),
            Some(flag) => format!("invalid {flag}: {msg}"),
            None => err.to_string(),
        },
        _ => err.to_string(),
    }
}

/// The flag that sets a library setting, by the setting's field name.
fn flag_for(setting: &str) -> Option<&'static str> {
    Some(match setting {
        "lr" => "--lr",
        "momentum" => "--momentum",
        "activation" => "--activation",
        "hidden" => "--hidden",
        "dropout" => "--dropout",
        "batch_size" => "--batch-size",
        "epochs" => "--epochs",
        "val_every" => "--val-every",
        "select" => "--select",
        "lambda" | "lambdas" => "--lambda/--lambdas",
        "run_dir" => "--run-dir",
        "resume" => "--resume",
        "shard_size" => "--shard-size",
        "image size" => "--image-size",
        "explain" => "--explain",
        "sizes" => "--sizes",
        _ => return None,
    })
}
