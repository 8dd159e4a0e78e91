//! Benchmark of head training on cached features (the Rust side of `bench/head/bench.py`).
//!
//! ```text
//! cargo build --release --example bench_head
//! target/release/examples/bench_head --features /tmp/bench_head_features.safetensors [--runs 5] [--sweep]
//! ```
//!
//! Reads a feature file in the cache's format (`FeatureSet`), takes the first 45,000 rows as
//! the training split and the next 5,000 as validation, and times:
//! * one epoch of the training loop at batch size 4 (shuffle + 11,250 fused SGD steps), the
//!   median of `--runs` runs;
//! * with `--sweep`, the default sweep `train::sweep` (λ ∈ {0, 1e-4, 1e-3, 1e-2, 1e-1},
//!   10 epochs, validation and checkpoints every epoch) into a temporary run directory.
//!
//! Prints one JSON object on stdout (the driver script parses it) and a summary on stderr.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use cifar_finetune::features::FeatureSet;
use cifar_finetune::head::{Head, Sgd, Stepper};
use cifar_finetune::rundir::TrainConfig;
use cifar_finetune::train::{self, RunOptions, SweepOutcome};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut features: Option<PathBuf> = None;
    let mut runs = 5usize;
    let mut do_sweep = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--features" => features = args.next().map(PathBuf::from),
            "--runs" => runs = args.next().ok_or("--runs needs a value")?.parse()?,
            "--sweep" => do_sweep = true,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let path = features.ok_or("--features FILE is required")?;
    let all = FeatureSet::read(&path)?;
    if all.len() < 50_000 {
        return Err(format!("{} has {} rows, need 50,000", path.display(), all.len()).into());
    }
    let train = all.select(&(0..45_000).collect::<Vec<_>>());
    let val = all.select(&(45_000..50_000).collect::<Vec<_>>());
    let cfg = TrainConfig::default();

    // One epoch: the loop of `train::fit` without validation or checkpoints.
    let mut epoch_secs = Vec::with_capacity(runs);
    let mut cpu_secs = Vec::with_capacity(runs);
    let mut last_loss = 0.0f64;
    for run in 0..runs {
        let mut head = Head::init(train.dim, cfg.hidden, train.classes.len(), run as u64)?;
        let mut sgd = Sgd::new(head.dims, cfg.lr, cfg.momentum)?;
        let mut stepper = Stepper::new(head.dims, cfg.batch_size);
        let mut order = permutation(train.len(), run as u64);
        // Diagnostics: BENCH_ROWS=N reuses N rows (cache-resident) to separate arithmetic
        // from the cost of fetching shuffled rows from memory.
        if let Some(n) = std::env::var("BENCH_ROWS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            order.iter_mut().for_each(|r| *r %= n.max(1));
        }
        let start = Instant::now();
        let cpu_start = thread_cpu_ns();
        let mut loss_sum = 0.0f64;
        let mut xs: Vec<&[f32]> = Vec::with_capacity(cfg.batch_size);
        let mut ys: Vec<u8> = Vec::with_capacity(cfg.batch_size);
        for batch in order.chunks(cfg.batch_size) {
            xs.clear();
            ys.clear();
            for &r in batch {
                xs.push(train.row(r));
                ys.push(train.labels[r]);
            }
            let (loss, _) = stepper.step(&mut head, &mut sgd, &xs, &ys, 0.0, None)?;
            loss_sum += f64::from(loss);
        }
        epoch_secs.push(start.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu_start, thread_cpu_ns()) {
            cpu_secs.push((b - a) as f64 * 1e-9);
        }
        last_loss = loss_sum / order.len().div_ceil(cfg.batch_size) as f64;
    }
    let epoch_median = median(&mut epoch_secs.clone());
    let epoch_min = epoch_secs.iter().cloned().fold(f64::INFINITY, f64::min);
    let cpu_median = median(&mut cpu_secs.clone());
    eprintln!(
        "ours: one epoch (45,000 samples, batch 4): median {epoch_median:.3} s (min {epoch_min:.3} s, \
         CPU time median {cpu_median:.3} s) over {runs} runs, {:.1} µs/step, mean loss {last_loss:.4}",
        epoch_median / 11_250.0 * 1e6
    );

    let mut sweep_secs = serde_json::Value::Null;
    if do_sweep {
        let dir = tempfile::tempdir()?;
        let lambdas = [0.0, 1e-4, 1e-3, 1e-2, 1e-1];
        // The CLI's default: one λ per core at a time.
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        let start = Instant::now();
        let out = train::sweep(
            &train,
            &val,
            &lambdas,
            &cfg,
            &dir.path().join("run"),
            &RunOptions {
                jobs,
                ..RunOptions::default()
            },
            &mut |_| ControlFlow::Continue(()),
        )?;
        let secs = start.elapsed().as_secs_f64();
        if let SweepOutcome::Finished(s) = out {
            eprintln!(
                "ours: default sweep (5 λ × 10 epochs, validation every epoch, {jobs} λs at a time): \
                 {secs:.2} s; chosen λ = {}",
                s.chosen_lambda
            );
        }
        sweep_secs = serde_json::json!(secs);
    }
    println!(
        "{}",
        serde_json::json!({
            "epoch_seconds": epoch_secs,
            "epoch_median": epoch_median,
            "epoch_min": epoch_min,
            "epoch_cpu_seconds": cpu_secs,
            "sweep_seconds": sweep_secs,
        })
    );
    Ok(())
}

/// This thread's CPU time in ns (Linux `/proc/thread-self/schedstat`), to tell our own cost
/// from time lost to other processes on a shared machine.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// A seeded Fisher–Yates permutation (splitmix64), the cost the training loop pays per epoch.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((u128::from(next()) * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}
