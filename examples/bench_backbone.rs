//! Times a ResNet backbone (ResNet-50 by default, `--backbone NAME` for the others) on a
//! fixed batch, for `bench/backbone.py`.
//!
//! Weights are the synthetic ones of `backbone::weights::synthetic_state_dict` (speed does
//! not depend on their values, and PyTorch can rebuild them bit for bit to check our
//! features). Images come from a raw little-endian f32 file `[batch, 3, size, size]` (NCHW,
//! already normalised), or are random when no file is given.
//!
//! Two ways to run it:
//!
//! ```text
//! # one-shot: warm up, time --runs passes, print a JSON summary and the profile (per layer
//! # kind, then per convolution shape)
//! cargo run --release --example bench_backbone -- --batch 16 --size 224 --runs 3
//! # server (what bench/backbone.py uses): reads `run`, `profile N`, `quit` lines on stdin,
//! # answers one JSON line each, so PyTorch and we can be timed interleaved in one session
//! cargo run --release --example bench_backbone -- --images x.f32 --batch 16 --size 224 --serve
//! ```

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::backbone::fast::{
    Algorithm, Bf16Blocking, FastResNet, LayerKind, Precision, Profile,
};
use cifar_finetune::backbone::resnet::ResNet;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::isa::{Isa, IsaKind};
use clap::Parser;

/// Benchmark of our ResNet backbone.
#[derive(Debug, Parser)]
struct Args {
    /// The torchvision ResNet: resnet18, resnet34, resnet50, resnet101, resnet152,
    /// wide_resnet50_2 or wide_resnet101_2.
    #[arg(long, default_value = "resnet50")]
    backbone: String,
    /// Raw f32 images `[batch, 3, size, size]` (little-endian, NCHW); random when absent.
    #[arg(long)]
    images: Option<PathBuf>,
    /// A torchvision weights file of the backbone (`.pth` or `.safetensors`) [default: the
    /// synthetic weights].
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Image side.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// `fast` (NHWC path) or `candle` (the reference implementation).
    #[arg(long, default_value = "fast")]
    implementation: String,
    /// f32 or bf16 (fast path only).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// The f32 3×3 stride-1 convolutions: `winograd` (F(4×4, 3×3) under 512 channels,
    /// F(2×2, 3×3) wider), `winograd2` (F(2×2, 3×3) everywhere) or `direct`.
    #[arg(long, default_value = "winograd")]
    algorithm: String,
    /// Kernel instruction set: avx512-bf16, avx512, avx2-fma, portable [default: best].
    #[arg(long)]
    isa: Option<String>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Slice budget of the first stages in MiB (`FastResNet::set_slice_bytes`; `inf`: no
    /// slicing, 0: one image per slice) [default: the library's, 8 for bf16, 16 for f32].
    #[arg(long)]
    slice_mib: Option<f64>,
    /// How the bf16 dataflow blocks its products, over the defaults (`Bf16Blocking`'s
    /// `key=value` list: `a=512K,rows=256,stream=8M`; `stream=inf` never streams).
    #[arg(long)]
    bf16_blocking: Option<String>,
    /// Timed passes in one-shot mode.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the features of the first pass here (raw f32 `[batch, feature_dim]`).
    #[arg(long)]
    features_out: Option<PathBuf>,
    /// Serve `run` / `profile N` / `quit` commands on stdin.
    #[arg(long)]
    serve: bool,
}

/// The network under test.
enum Net {
    Fast(Box<FastResNet>),
    Candle(ResNet),
}

impl Net {
    fn forward(
        &self,
        x: &[f32],
        a: &Args,
        profile: Option<&mut Profile>,
    ) -> anyhow::Result<Vec<f32>> {
        Ok(match (self, profile) {
            (Net::Fast(m), Some(p)) => m.forward_profiled(x, a.batch, a.size, a.size, p)?,
            (Net::Fast(m), None) => m.forward(x, a.batch, a.size, a.size)?,
            (Net::Candle(m), _) => {
                let t = Tensor::from_slice(x, (a.batch, 3, a.size, a.size), &Device::Cpu)?;
                m.forward(&t)?.flatten_all()?.to_vec1::<f32>()?
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Net::Fast(m) => format!(
                "fast NHWC {} ({} kernels{}, {} threads{})",
                m.precision(),
                m.isa().name(),
                match (m.precision(), m.native_bf16(), m.algorithm()) {
                    (Precision::Bf16, true, _) => ", native bf16",
                    (Precision::Bf16, false, _) => ", bf16 emulated in f32",
                    (_, _, Algorithm::Direct) => ", direct 3x3",
                    (_, _, Algorithm::Winograd2) => ", Winograd F(2x2) 3x3",
                    _ => "",
                },
                m.threads(),
                match m.precision() {
                    Precision::Bf16 => format!(", blocking {}", m.bf16_blocking()),
                    _ => String::new(),
                }
            ),
            Net::Candle(_) => "candle NCHW f32".to_string(),
        }
    }
}

fn parse_isa(name: &str) -> anyhow::Result<Isa> {
    let kind: IsaKind = name.parse().with_context(|| format!("--isa {name}"))?;
    Isa::new(kind).with_context(|| format!("--isa {name}: this CPU cannot run {kind} kernels"))
}

/// Peak resident memory of this process in MiB (Linux), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn profile_json(p: &Profile) -> serde_json::Value {
    let passes = p.passes.max(1) as f64;
    let kinds: Vec<serde_json::Value> = LayerKind::ALL
        .iter()
        .map(|&k| {
            serde_json::json!({
                "kind": k.name(),
                "seconds_per_pass": p.seconds(k) / passes,
                "gflop_per_pass": p.flops(k) / passes * 1e-9,
                "gflops": p.gflops(k),
            })
        })
        .collect();
    let shapes: Vec<serde_json::Value> = p
        .shapes()
        .iter()
        .map(|s| {
            serde_json::json!({
                "shape": s.shape,
                "layers": s.calls as f64 / passes,
                "seconds_per_pass": s.seconds / passes,
                "gflops": s.gflops(),
            })
        })
        .collect();
    serde_json::json!({
        "passes": p.passes,
        "total_seconds_per_pass": p.total_seconds() / passes,
        "pack_thread_seconds_per_pass": p.pack_thread_seconds / passes,
        "kinds": kinds,
        "shapes": shapes,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.batch * 3 * args.size * args.size;
    let images: Vec<f32> = match &args.images {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if bytes.len() != n * 4 {
                bail!(
                    "{}: {} bytes, expected {} for [{}, 3, {}, {}] f32",
                    path.display(),
                    bytes.len(),
                    n * 4,
                    args.batch,
                    args.size,
                    args.size
                );
            }
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        None => (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 * 4.0
                    - 2.0
            })
            .collect(),
    };

    let arch = Arch::by_name(&args.backbone)
        .with_context(|| format!("--backbone {}: not a torchvision ResNet", args.backbone))?;
    let build = Instant::now();
    let sd = match &args.weights {
        Some(path) => StateDict::read(path)?,
        None => StateDict::from_tensors("synthetic", weights::synthetic_state_dict_of(&arch)?),
    };
    let net = match args.implementation.as_str() {
        "fast" => {
            let precision: Precision = args.precision.parse()?;
            let isa = match &args.isa {
                Some(name) => parse_isa(name)?,
                None => Isa::detect(),
            };
            let algorithm: Algorithm = args.algorithm.parse()?;
            let mut m = FastResNet::with_algorithm(sd, &arch, precision, isa, algorithm)?;
            if let Some(t) = args.threads {
                m.set_threads(t)?;
            }
            if let Some(mib) = args.slice_mib {
                // `as` saturates: `inf` is usize::MAX, no slicing.
                m.set_slice_bytes((mib * (1u64 << 20) as f64) as usize);
            }
            if let Some(spec) = &args.bf16_blocking {
                let b: Bf16Blocking = spec
                    .parse()
                    .with_context(|| format!("--bf16-blocking {spec}"))?;
                m.set_bf16_blocking(b);
            }
            Net::Fast(Box::new(m))
        }
        "candle" => Net::Candle(ResNet::with_arch(sd, &arch)?),
        other => bail!("--implementation {other}: expected fast or candle"),
    };
    let build_s = build.elapsed().as_secs_f64();
    let rss_after_build = peak_rss_mib();

    // Warm-up: sizes the workspace and faults its pages in.
    let warm = Instant::now();
    let features = net.forward(&images, &args, None)?;
    let warm_s = warm.elapsed().as_secs_f64();
    if let Some(path) = &args.features_out {
        let bytes: Vec<u8> = features.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let ready = serde_json::json!({
        "ready": true,
        "backbone": arch.name,
        "implementation": net.describe(),
        "build_seconds": build_s,
        "peak_rss_mib_after_build": rss_after_build,
        "warmup_seconds": warm_s,
        "peak_rss_mib": peak_rss_mib(),
    });
    writeln!(out, "{ready}")?;
    out.flush()?;

    if args.serve {
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let mut words = line.split_whitespace();
            let reply = match words.next() {
                Some("run") => {
                    let t = Instant::now();
                    net.forward(&images, &args, None)?;
                    let s = t.elapsed().as_secs_f64();
                    serde_json::json!({"seconds": s, "images_per_second": args.batch as f64 / s})
                }
                Some("profile") => {
                    let passes: usize = words.next().unwrap_or("1").parse().context("profile N")?;
                    let mut p = Profile::default();
                    for _ in 0..passes {
                        net.forward(&images, &args, Some(&mut p))?;
                    }
                    profile_json(&p)
                }
                Some("quit") | None => break,
                Some(other) => serde_json::json!({"error": format!("unknown command {other}")}),
            };
            writeln!(out, "{reply}")?;
            out.flush()?;
        }
        writeln!(
            out,
            "{}",
            serde_json::json!({"peak_rss_mib": peak_rss_mib()})
        )?;
        return Ok(());
    }

    let mut times = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        net.forward(&images, &args, None)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    writeln!(
        out,
        "{}",
        serde_json::json!({
            "backbone": arch.name,
            "implementation": net.describe(),
            "batch": args.batch,
            "size": args.size,
            "seconds": times,
            "median_images_per_second": args.batch as f64 / median,
        })
    )?;
    if let Net::Fast(_) = net {
        let mut p = Profile::default();
        net.forward(&images, &args, Some(&mut p))?;
        writeln!(out, "{p:#}")?;
    }
    writeln!(
        out,
        "peak RSS: {:.0} MiB",
        peak_rss_mib().unwrap_or(f64::NAN)
    )?;
    Ok(())
}
