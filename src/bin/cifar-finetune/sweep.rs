//! `cifar-finetune sweep --lambdas 0,1e-4,1e-3,1e-2,1e-1`: one head per L2 strength, the
//! same initial weights and data order for each, the λ chosen on validation.

use crate::source::FeatureArgs;
use crate::train::{TrainArgs, run_lambdas};

/// The λs of a sweep; shared with `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct LambdaArgs {
    /// L2 strengths λ, comma-separated: each head minimises cross-entropy +
    /// λ/2·(‖W1‖² + ‖W2‖²) over its two weight matrices. Biases are not penalised.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1e-4,1e-3,1e-2,1e-1",
        allow_negative_numbers = true
    )]
    pub lambdas: Vec<f32>,
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
    run_lambdas(&args.lambdas.lambdas, &args.hyper, &args.features, "sweep")
}
