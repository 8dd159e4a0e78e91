//! `cifar-finetune backprop`: error propagation through a small network by the δ-rule,
//! every quantity printed beside its finite-difference check (see `cifar_finetune::backprop`).

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use cifar_finetune::backprop::{DEFAULT_SIZES, EntryKind, Problem, REL_ERROR_FLOOR, Report};

const AFTER_HELP: &str = "\
Notation: layer 1 is the input x, a^(l)_j the activation and z^(l)_j = h(a^(l)_j) the output of
unit j of layer l, w^(l)_{jk} the weight from unit k of layer l to unit j of layer l+1, b^(l)_j
the bias of unit j of layer l+1, δ^(l)_j = ∂E/∂a^(l)_j, E = ½ Σ_j (y_j − t_j)².

--params FILE.json schema (unknown fields are rejected):
  {
    \"weights\": [W1, W2, ...],  required; W_l = w^(l) as a list of n_{l+1} rows of n_l numbers,
                                weights[l-1][j-1][k-1] = w^(l)_{jk}; sizes are read from these
    \"biases\":  [b1, b2, ...],  optional; biases[l-1][j-1] = b^(l)_j
    \"x\":       [x_1, ...],     required; n_1 inputs
    \"t\":       [t_1, ...]      required; n_L targets (or one number for one output)
  }
Example (3-2-1): {\"weights\": [[[0.1,0.2,0.3],[-0.4,0.5,0.6]], [[0.7,-0.8]]], \"x\": [1,2,3], \"t\": 0.5}
`--seed N --json` prints such a file under \"params\".";

/// Back-propagation by the δ-rule, checked against central finite differences.
#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("source").required(true).args(["seed", "params"])),
    after_long_help = AFTER_HELP
)]
pub struct Args {
    /// Random weights (uniform in [-1, 1)), input and target from this seed (deterministic).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Read weights, optional biases, input x and target t from this JSON file (see --help).
    #[arg(long, value_name = "FILE.json")]
    params: Option<PathBuf>,
    /// Layer sizes, input first [default with --seed: 3,4,4,1; with --params: the file's].
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    sizes: Option<Vec<usize>>,
    /// With --seed: give every layer biases as well (a --params file has biases or not).
    #[arg(long, requires = "seed", conflicts_with = "params")]
    biases: bool,
    /// Print the same report as JSON instead of a table.
    #[arg(long, conflicts_with = "explain")]
    json: bool,
    /// Part 1 of the assignment as a derivation: each quantity it asks for (δ^(4)_1,
    /// ∂E/∂w^(3)_{12}, δ^(3)_1, ∂E/∂w^(2)_{11}, δ^(2)_1, ∂E/∂w^(1)_{11}) as its formula with
    /// the chain of factors written out, the numbers put in, and a finite-difference check.
    /// Needs the assignment's 3-4-4-1 network without biases.
    #[arg(long)]
    explain: bool,
    /// Exit with an error when any derivative's relative error exceeds this.
    #[arg(long, default_value_t = 1e-6, value_name = "REL")]
    tolerance: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !(args.tolerance.is_finite() && args.tolerance > 0.0) {
        bail!("--tolerance {} is not a positive number", args.tolerance);
    }
    let (problem, source) = match (&args.params, args.seed) {
        (Some(path), _) => (
            Problem::from_json_file(path, args.sizes.as_deref())?,
            format!("parameters from {}", path.display()),
        ),
        (None, Some(seed)) => {
            let sizes = args.sizes.as_deref().unwrap_or(&DEFAULT_SIZES);
            let problem = Problem::random(sizes, args.biases, seed)
                .with_context(|| format!("--sizes {}", args.sizes_text()))?;
            (problem, format!("random parameters, seed {seed}"))
        }
        (None, None) => bail!("give --seed N or --params FILE.json"),
    };
    let report = problem.report()?;

    if args.explain {
        emit(&problem.explain(&source)?)?;
    } else if args.json {
        let out = serde_json::json!({
            "source": source,
            "params": problem.to_json(),
            "tolerance": args.tolerance,
            "rel_error_floor": REL_ERROR_FLOOR,
            "report": report,
        });
        emit(&(serde_json::to_string_pretty(&out)? + "\n"))?;
    } else {
        emit(&table(&report, &source)?)?;
    }

    if report.max_rel_error.is_nan() || report.max_rel_error > args.tolerance {
        bail!(
            "gradient check failed: largest relative error {:.2e} is not within --tolerance {:.1e}",
            report.max_rel_error,
            args.tolerance
        );
    }
    Ok(())
}

impl Args {
    fn sizes_text(&self) -> String {
        let sizes = self.sizes.as_deref().unwrap_or(&DEFAULT_SIZES);
        sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The report as an aligned table, one quantity per line.
fn table(report: &Report, source: &str) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    let sizes: Vec<String> = report.sizes.iter().map(usize::to_string).collect();
    let biases = if report.biases {
        "with biases"
    } else {
        "no biases"
    };
    writeln!(
        out,
        "Back-propagation through a {} network (logistic hidden units, identity output, {biases}); {source}",
        sizes.join("-")
    )?;
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.10}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        out,
        "y = [{}], t = [{}], E = ½ Σ (y − t)² = {}",
        list(&report.y),
        list(&report.t),
        sci(report.loss, 12, false)
    )?;
    writeln!(out)?;

    let width = report
        .entries
        .iter()
        .map(|e| e.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(8);
    writeln!(
        out,
        "{:<width$}  {:>20}  {:>20}  {:>10}",
        "quantity", "value (δ-rule)", "finite difference", "rel. error"
    )?;
    writeln!(out, "{}", "─".repeat(width + 2 + 20 + 2 + 20 + 2 + 10))?;
    let mut previous = None;
    for e in &report.entries {
        // A blank line between groups (inputs, forward pass, δs, each layer's derivatives).
        let group = match e.kind {
            EntryKind::Input => (0, 0),
            EntryKind::Activation | EntryKind::Output => (1, e.layer),
            EntryKind::Delta => (2, 0),
            EntryKind::Weight | EntryKind::Bias => (3, e.layer),
        };
        if previous.is_some_and(|p| p != group) {
            writeln!(out)?;
        }
        previous = Some(group);
        match (e.finite_difference, e.rel_error) {
            (Some(fd), Some(rel)) => writeln!(
                out,
                "{:<width$}  {:>20}  {:>20}  {:>10}",
                e.name,
                sci(e.value, 12, true),
                sci(fd, 12, true),
                sci(rel, 2, false)
            )?,
            _ => writeln!(out, "{:<width$}  {:>20}", e.name, sci(e.value, 12, true))?,
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "largest relative error {:.2e}, largest absolute error {:.2e} \
         (relative to max(|value|, |finite difference|, {REL_ERROR_FLOOR:e} · max(1, E)))",
        report.max_rel_error, report.max_abs_error
    )?;
    Ok(out)
}

/// Writes to stdout; a closed pipe (`… | head`) ends the output quietly instead of panicking.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to stdout"),
    }
}

/// Scientific notation with a signed two-digit exponent (`+1.5e-03`), so columns line up.
fn sci(x: f64, precision: usize, sign: bool) -> String {
    let s = if sign {
        format!("{x:+.precision$e}")
    } else {
        format!("{x:.precision$e}")
    };
    match s.split_once('e').map(|(m, e)| (m, e.parse::<i32>())) {
        Some((mantissa, Ok(exp))) => format!("{mantissa}e{exp:+03}"),
        _ => s,
    }
}
