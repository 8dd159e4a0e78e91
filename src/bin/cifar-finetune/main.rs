//! The `cifar-finetune` command line: one subcommand per pipeline stage.
//!
//! This binary is the only place that prints or uses `anyhow`; each subcommand lives in
//! its own file beside this one and calls the library.

mod backprop;
mod download;
mod features;
mod progress;
mod source;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Transfer learning on CIFAR-10 with a frozen, cached ResNet-50 backbone.
#[derive(Debug, Parser)]
#[command(name = "cifar-finetune", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download CIFAR-10 and the pretrained ResNet-50 weights, verified, into the data directory.
    Download(download::Args),
    /// Extract (or read from the cache) ResNet-50 features into a safetensors file.
    Features(features::Args),
    /// Back-propagation by the δ-rule on a small network, checked against finite differences.
    Backprop(backprop::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Download(args) => download::run(args),
        Command::Features(args) => features::run(args),
        Command::Backprop(args) => backprop::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
