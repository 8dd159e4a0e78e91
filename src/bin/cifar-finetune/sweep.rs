//! `cifar-finetune sweep --lambdas 0,1e-4,1e-3,1e-2,1e-1`: one head per L2 strength, the
//! same initial weights and data order for each, the λ chosen on validation.

use crate::source::FeatureArgs;
use crate::train::{Preset, TrainArgs, parse_lambda, run_lambdas};

/// The λs of a sweep; shared with `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct LambdaArgs {
    /// L2 strengths λ, comma-separated: each head minimises cross-entropy +
    /// λ/2·(‖W1‖² + ‖W2‖²) over its two weight matrices. Biases are not penalised
    /// [default: 0,1e-4,1e-3,1e-2,1e-1; 0 with --preset original, which has no L2].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true, value_parser = parse_lambda)]
    pub lambdas: Option<Vec<f32>>,
}

/// The default sweep.
pub const DEFAULT_LAMBDAS: [f32; 5] = [0.0, 1e-4, 1e-3, 1e-2, 1e-1];

impl LambdaArgs {
    /// The λs: those given, else the preset's (λ = 0 for the original script), else
    /// [`DEFAULT_LAMBDAS`].
    pub fn resolve(&self, hyper: &TrainArgs) -> Vec<f32> {
        match (&self.lambdas, hyper.preset) {
            (Some(l), _) => l.clone(),
            (None, Some(Preset::Original)) => vec![0.0],
            (None, None) => DEFAULT_LAMBDAS.to_vec(),
        }
    }
}

/// Train one head per L2 strength λ and choose λ on the validation split.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub lambdas: LambdaArgs,
    #[command(flatten)]
    pub hyper: TrainArgs,
    #[command(flatten)]
    pub features: FeatureArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let lambdas = args.lambdas.resolve(&args.hyper);
    run_lambdas(&lambdas, &args.hyper, &args.features, "sweep")
}
