//! A fast CPU ResNet-50 forward pass: channels-last activations, packed matrix products with
//! fused epilogues, run-time-selected SIMD micro-kernels, fp32 or bf16.
//!
//! The same network as [`super::resnet::ResNet50`] (torchvision's layout, batch norm folded at
//! load by [`super::weights::StateDict::take_conv_bn`]) computed without candle, the way
//! oneDNN runs PyTorch's `channels_last` models:
//!
//! * activations are NHWC, so a 1×1 convolution is one matrix product `[pixels, cin] ·
//!   [cin, cout]` and a k×k convolution is one over an implicit im2col matrix gathered while
//!   packing (the private `gemm` module);
//! * weights are packed once, at load, in the micro-kernel's panel order;
//! * bias (the folded batch norm), the bottleneck's residual add and ReLU happen in the
//!   matrix product's epilogue, on registers, before the single store of each activation;
//! * every buffer lives in a workspace reused from batch to batch, so a forward pass neither
//!   allocates nor page-faults once warm;
//! * the preprocessed NCHW batch is transposed to NHWC once before the stem (3 channels: a
//!   negligible pass), so every convolution packs from one layout.
//!
//! [`Precision::Bf16`] runs the products on bf16 operands with f32 accumulation (AVX512-BF16's
//! `vdpbf16ps` where available, an exact emulation elsewhere); activations between layers,
//! biases, the epilogue and the pooling stay f32, as under PyTorch's CPU autocast.

mod gemm;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Tensor;

pub use gemm::Isa;
use gemm::{AlignedBuf, ConvGeom, PackedB, Source, Tiling};

use super::weights::{ConvSpec, EXPANSION, StateDict, resnet50_blocks, stem_spec};
use crate::error::{CandleContext, Error, Result};

/// Width of the features: the channels of the last stage.
pub const FEATURE_DIM: usize = 512 * EXPANSION;

/// The arithmetic of the backbone's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 throughout; agrees with torchvision to float rounding.
    #[default]
    F32,
    /// bf16 operands (8 significant bits), f32 accumulation; features agree with f32 to a
    /// cosine above 0.999, and are about twice as fast where AVX512-BF16 exists.
    Bf16,
}

impl Precision {
    /// `"f32"` or `"bf16"`: the name used in fingerprints and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::invalid(
                "precision",
                format!("`{other}` is neither f32 nor bf16"),
            )),
        }
    }
}

/// The kinds of layer a [`Profile`] reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// The 7×7 stride-2 convolution on the image (with its bias and ReLU).
    Stem,
    /// The 3×3 stride-2 max pool after the stem.
    MaxPool,
    /// The bottlenecks' 1×1 convolutions (reduce and expand, epilogue included).
    Conv1x1,
    /// The bottlenecks' 3×3 convolutions.
    Conv3x3,
    /// The projection shortcuts (strided 1×1 convolutions).
    Downsample,
    /// The global average pool.
    AvgPool,
}

impl LayerKind {
    /// Every kind, in network order.
    pub const ALL: [LayerKind; 6] = [
        LayerKind::Stem,
        LayerKind::MaxPool,
        LayerKind::Conv1x1,
        LayerKind::Conv3x3,
        LayerKind::Downsample,
        LayerKind::AvgPool,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Stem => "stem 7x7",
            LayerKind::MaxPool => "maxpool",
            LayerKind::Conv1x1 => "conv 1x1",
            LayerKind::Conv3x3 => "conv 3x3",
            LayerKind::Downsample => "downsample 1x1/2",
            LayerKind::AvgPool => "avgpool",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where the time of forward passes went, per [`LayerKind`] (wall-clock seconds and
/// floating-point operations), accumulated over every profiled pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    seconds: [f64; 6],
    flops: [f64; 6],
    /// Thread-seconds spent packing activations (im2col gathers included), summed over the
    /// worker threads; part of the convolution times.
    pub pack_thread_seconds: f64,
    /// Forward passes accumulated.
    pub passes: usize,
}

impl Profile {
    /// Wall-clock seconds spent in layers of `kind`.
    pub fn seconds(&self, kind: LayerKind) -> f64 {
        self.seconds[kind.index()]
    }

    /// Floating-point operations (2 per multiply-add) of layers of `kind`.
    pub fn flops(&self, kind: LayerKind) -> f64 {
        self.flops[kind.index()]
    }

    /// Seconds over every kind.
    pub fn total_seconds(&self) -> f64 {
        self.seconds.iter().sum()
    }

    fn add(&mut self, kind: LayerKind, seconds: f64, flops: f64) {
        self.seconds[kind.index()] += seconds;
        self.flops[kind.index()] += flops;
    }
}

/// A convolution with its batch norm folded in, weights packed for the micro-kernel.
#[derive(Debug)]
struct Conv {
    geom: ConvGeom,
    packed: PackedB,
    /// `[cout]`
    bias: Vec<f32>,
}

impl Conv {
    fn load(sd: &mut StateDict, spec: &ConvSpec, t: &Tiling) -> Result<Self> {
        let (w, b) = sd.take_conv_bn(spec)?;
        let ConvSpec {
            conv,
            shape,
            stride,
            ..
        } = spec;
        let to_vec = |t: &Tensor, what: &str| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .ctx(format!("reading the folded {what} of `{conv}`"))
        };
        let geom = ConvGeom {
            cout: shape[0],
            cin: shape[1],
            ksize: shape[2],
            stride: *stride,
            pad: shape[2] / 2,
        };
        Ok(Conv {
            geom,
            packed: PackedB::new(&to_vec(&w, "weight")?, &geom, t),
            bias: to_vec(&b, "bias")?,
        })
    }
}

/// A bottleneck: 1×1 reduce, 3×3 (carrying the stride), 1×1 expand + shortcut.
#[derive(Debug)]
struct Block {
    conv1: Conv,
    conv2: Conv,
    conv3: Conv,
    downsample: Option<Conv>,
}

/// Buffers reused by every forward pass; they only ever grow.
#[derive(Debug, Default)]
struct Workspace {
    /// The current block's input, `[batch, h, w, c]`.
    cur: AlignedBuf,
    /// The current block's output (then swapped with `cur`); also the stem's output.
    next: AlignedBuf,
    /// Output of the 1×1 reduce.
    t1: AlignedBuf,
    /// Output of the 3×3.
    t2: AlignedBuf,
    /// Output of the projection shortcut.
    ds: AlignedBuf,
    /// The input batch, transposed to NHWC.
    input: AlignedBuf,
    /// One packing buffer per thread.
    scratch: Vec<AlignedBuf>,
}

/// ResNet-50 up to its global average pool on the fast CPU path: images `[batch, 3, h, w]`
/// (NCHW, normalised) → features `[batch, 2048]`.
#[derive(Debug)]
pub struct FastResNet50 {
    precision: Precision,
    isa: Isa,
    tiling: Tiling,
    stem: Conv,
    blocks: Vec<Block>,
    threads: usize,
    workspace: Mutex<Workspace>,
}

impl FastResNet50 {
    /// Reads a torchvision state dict (`.pth` or `.safetensors`) and builds the network for
    /// `precision` with the best kernels of this CPU.
    pub fn load(path: &Path, precision: Precision) -> Result<Self> {
        Self::from_state_dict(StateDict::read(path)?, precision)
    }

    /// Builds the network from a state dict, strictly (as [`super::resnet::ResNet50`]), for
    /// `precision` with the best kernels of this CPU ([`Isa::detect`]).
    pub fn from_state_dict(sd: StateDict, precision: Precision) -> Result<Self> {
        Self::with_isa(sd, precision, Isa::detect())
    }

    /// As [`FastResNet50::from_state_dict`] with the kernels of `isa`, e.g.
    /// [`Isa::Portable`] to test the fallback. Errors if this CPU cannot run them.
    pub fn with_isa(mut sd: StateDict, precision: Precision, isa: Isa) -> Result<Self> {
        if !isa.is_available() {
            return Err(Error::invalid(
                "kernel instruction set",
                format!("this CPU cannot run {} kernels", isa.name()),
            ));
        }
        let tiling = Tiling::new(isa, precision == Precision::Bf16);
        let t = &tiling;
        let stem = Conv::load(&mut sd, &stem_spec(), t)?;
        let blocks = resnet50_blocks()
            .iter()
            .map(|b| {
                Ok(Block {
                    conv1: Conv::load(&mut sd, &b.conv1, t)?,
                    conv2: Conv::load(&mut sd, &b.conv2, t)?,
                    conv3: Conv::load(&mut sd, &b.conv3, t)?,
                    downsample: b
                        .downsample
                        .as_ref()
                        .map(|d| Conv::load(&mut sd, d, t))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        sd.finish()?;
        Ok(FastResNet50 {
            precision,
            isa,
            tiling,
            stem,
            blocks,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            workspace: Mutex::new(Workspace::default()),
        })
    }

    /// The precision of the matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The instruction set of the kernels in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// True when bf16 runs on native AVX512-BF16 instructions rather than being emulated.
    pub fn native_bf16(&self) -> bool {
        self.tiling.pairs
    }

    /// Worker threads per matrix product (default: the CPU's available parallelism).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Sets the worker threads per matrix product (at least 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Bytes of packed weights.
    pub fn weight_bytes(&self) -> usize {
        let conv = |c: &Conv| c.packed.bytes() + c.bias.len() * 4;
        conv(&self.stem)
            + self
                .blocks
                .iter()
                .map(|b| {
                    conv(&b.conv1)
                        + conv(&b.conv2)
                        + conv(&b.conv3)
                        + b.downsample.as_ref().map_or(0, conv)
                })
                .sum::<usize>()
    }

    /// Features of `batch` normalised images `x` (`[batch, 3, h, w]`, NCHW, row-major):
    /// `[batch, 2048]` row-major.
    pub fn forward(&self, x: &[f32], batch: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        self.run(x, batch, h, w, None)
    }

    /// As [`FastResNet50::forward`], adding where the time went to `profile`.
    pub fn forward_profiled(
        &self,
        x: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        profile: &mut Profile,
    ) -> Result<Vec<f32>> {
        self.run(x, batch, h, w, Some(profile))
    }

    fn run(
        &self,
        x: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        mut profile: Option<&mut Profile>,
    ) -> Result<Vec<f32>> {
        if batch == 0 || h == 0 || w == 0 || x.len() != batch * 3 * h * w {
            return Err(Error::invalid(
                "backbone input",
                format!(
                    "{} values for a [{batch}, 3, {h}, {w}] batch (need {}, all sizes ≥ 1)",
                    x.len(),
                    batch * 3 * h * w
                ),
            ));
        }
        // A panic in an earlier pass leaves only scratch contents behind: reuse the buffers.
        let mut guard = self
            .workspace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ws = &mut *guard;
        self.size_workspace(ws, batch, h, w);
        let Workspace {
            input,
            cur,
            next,
            t1,
            t2,
            ds,
            scratch,
        } = ws;
        let pack_ns = AtomicU64::new(0);
        let pack = profile.as_ref().map(|_| &pack_ns);
        let t = &self.tiling;
        let conv_flops = |c: &Conv, m: usize| 2.0 * (m * c.geom.k() * c.geom.cout) as f64;

        // Stem: [b, 3, h, w] (NCHW) -> [b, h1, w1, 64]
        let g = self.stem.geom;
        let (h1, w1) = (g.out_len(h), g.out_len(w));
        // The stem's packer, like every other, reads NHWC: transpose the small 3-channel input.
        nchw_to_nhwc(x, (batch, 3, h, w), input.as_mut_slice());
        let src = Source {
            data: &input.as_slice()[..batch * h * w * 3],
            batch,
            h,
            w,
            c: 3,
        };
        timed(
            &mut profile,
            LayerKind::Stem,
            conv_flops(&self.stem, batch * h1 * w1),
            || {
                gemm::conv(
                    &src,
                    &g,
                    &self.stem.packed,
                    &self.stem.bias,
                    t,
                    next.as_mut_slice(),
                    None,
                    true,
                    scratch,
                    pack,
                )
            },
        )?;
        // Max pool 3×3 / 2: [b, h1, w1, 64] -> [b, h2, w2, 64]
        let (h2, w2) = (pool_len(h1), pool_len(w1));
        timed(&mut profile, LayerKind::MaxPool, 0.0, || {
            max_pool(next.as_slice(), (batch, h1, w1, 64), cur.as_mut_slice());
            Ok(())
        })?;

        let (mut hc, mut wc, mut cc) = (h2, w2, 64);
        for block in &self.blocks {
            let (g1, g2, g3) = (block.conv1.geom, block.conv2.geom, block.conv3.geom);
            let m_in = batch * hc * wc;
            let (ho, wo) = (g2.out_len(hc), g2.out_len(wc));
            let m_out = batch * ho * wo;
            let cur_src = Source {
                data: cur.as_slice(),
                batch,
                h: hc,
                w: wc,
                c: cc,
            };
            // 1×1 reduce: [b, hc, wc, cc] -> [b, hc, wc, width]
            timed(
                &mut profile,
                LayerKind::Conv1x1,
                conv_flops(&block.conv1, m_in),
                || {
                    let c = &block.conv1;
                    gemm::conv(
                        &cur_src,
                        &g1,
                        &c.packed,
                        &c.bias,
                        t,
                        t1.as_mut_slice(),
                        None,
                        true,
                        scratch,
                        pack,
                    )
                },
            )?;
            // 3×3 (stride s): [b, hc, wc, width] -> [b, ho, wo, width]
            let t1_src = Source {
                data: t1.as_slice(),
                batch,
                h: hc,
                w: wc,
                c: g1.cout,
            };
            timed(
                &mut profile,
                LayerKind::Conv3x3,
                conv_flops(&block.conv2, m_out),
                || {
                    let c = &block.conv2;
                    gemm::conv(
                        &t1_src,
                        &g2,
                        &c.packed,
                        &c.bias,
                        t,
                        t2.as_mut_slice(),
                        None,
                        true,
                        scratch,
                        pack,
                    )
                },
            )?;
            // Shortcut: the block input itself, or its strided 1×1 projection [b, ho, wo, out].
            let residual: &[f32] = match &block.downsample {
                Some(d) => {
                    timed(
                        &mut profile,
                        LayerKind::Downsample,
                        conv_flops(d, m_out),
                        || {
                            gemm::conv(
                                &cur_src,
                                &d.geom,
                                &d.packed,
                                &d.bias,
                                t,
                                ds.as_mut_slice(),
                                None,
                                false,
                                scratch,
                                pack,
                            )
                        },
                    )?;
                    ds.as_slice()
                }
                None => cur.as_slice(),
            };
            // 1×1 expand + residual + ReLU, fused: [b, ho, wo, width] -> [b, ho, wo, out]
            let t2_src = Source {
                data: t2.as_slice(),
                batch,
                h: ho,
                w: wo,
                c: g2.cout,
            };
            timed(
                &mut profile,
                LayerKind::Conv1x1,
                conv_flops(&block.conv3, m_out),
                || {
                    let c = &block.conv3;
                    gemm::conv(
                        &t2_src,
                        &g3,
                        &c.packed,
                        &c.bias,
                        t,
                        next.as_mut_slice(),
                        Some(&residual[..m_out * g3.cout]),
                        true,
                        scratch,
                        pack,
                    )
                },
            )?;
            std::mem::swap(cur, next);
            (hc, wc, cc) = (ho, wo, g3.cout);
        }

        // Global average pool: [b, hc, wc, 2048] -> [b, 2048]
        let mut features = vec![0f32; batch * cc];
        timed(&mut profile, LayerKind::AvgPool, 0.0, || {
            avg_pool(cur.as_slice(), (batch, hc * wc, cc), &mut features);
            Ok(())
        })?;
        if let Some(p) = profile {
            p.pack_thread_seconds += pack_ns.load(Ordering::Relaxed) as f64 * 1e-9;
            p.passes += 1;
        }
        Ok(features)
    }

    /// Grows the workspace to what a `[batch, 3, h, w]` pass needs.
    fn size_workspace(&self, ws: &mut Workspace, batch: usize, h: usize, w: usize) {
        let g = self.stem.geom;
        let (h1, w1) = (g.out_len(h), g.out_len(w));
        let (mut hc, mut wc) = (pool_len(h1), pool_len(w1));
        let mut act = batch * h1 * w1 * g.cout;
        let (mut t1, mut t2, mut ds) = (0, 0, 0);
        for b in &self.blocks {
            let g2 = b.conv2.geom;
            let (ho, wo) = (g2.out_len(hc), g2.out_len(wc));
            t1 = t1.max(batch * hc * wc * b.conv1.geom.cout);
            t2 = t2.max(batch * ho * wo * g2.cout);
            act = act.max(batch * ho * wo * b.conv3.geom.cout);
            if let Some(d) = &b.downsample {
                ds = ds.max(batch * ho * wo * d.geom.cout);
            }
            (hc, wc) = (ho, wo);
        }
        ws.input.ensure(batch * h * w * 3);
        ws.cur.ensure(act);
        ws.next.ensure(act);
        ws.t1.ensure(t1);
        ws.t2.ensure(t2);
        ws.ds.ensure(ds);
        ws.scratch.resize_with(self.threads, AlignedBuf::default);
    }
}

/// Runs `f`, adding its wall-clock time and `flops` to `profile` under `kind`.
fn timed(
    profile: &mut Option<&mut Profile>,
    kind: LayerKind,
    flops: f64,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    f()?;
    if let Some(p) = profile.as_deref_mut() {
        p.add(kind, start.elapsed().as_secs_f64(), flops);
    }
    Ok(())
}

/// `[b, c, h, w]` → `[b, h, w, c]`.
fn nchw_to_nhwc(src: &[f32], (batch, c, h, w): (usize, usize, usize, usize), dst: &mut [f32]) {
    for n in 0..batch {
        for ch in 0..c {
            let plane = &src[(n * c + ch) * h * w..][..h * w];
            for (i, &v) in plane.iter().enumerate() {
                dst[(n * h * w + i) * c + ch] = v;
            }
        }
    }
}

/// Output length of the 3×3, stride-2, padding-1 max pool.
fn pool_len(n: usize) -> usize {
    (n + 2 - 3) / 2 + 1
}

/// 3×3 max pool, stride 2, padding 1, on NHWC `src [b, h, w, c]` into `dst [b, oh, ow, c]`.
/// Padding is −∞ as in PyTorch: every window holds at least one real pixel.
fn max_pool(src: &[f32], (batch, h, w, c): (usize, usize, usize, usize), dst: &mut [f32]) {
    let (oh, ow) = (pool_len(h), pool_len(w));
    for (i, out) in dst[..batch * oh * ow * c].chunks_exact_mut(c).enumerate() {
        let (n, oy, ox) = (i / (oh * ow), (i / ow) % oh, i % ow);
        out.fill(f32::NEG_INFINITY);
        for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
            for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                let row = &src[((n * h + iy) * w + ix) * c..][..c];
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = o.max(v);
                }
            }
        }
    }
}

/// Mean over the `hw` pixels of each image: NHWC `src [b, hw, c]` → `dst [b, c]`.
fn avg_pool(src: &[f32], (batch, hw, c): (usize, usize, usize), dst: &mut [f32]) {
    for (n, out) in dst.chunks_exact_mut(c).enumerate().take(batch) {
        out.fill(0.0);
        for row in src[n * hw * c..(n + 1) * hw * c].chunks_exact(c) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        let inv = 1.0 / hw as f32;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}
