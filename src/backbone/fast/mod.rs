//! A fast CPU ResNet forward pass (ResNet-50 by default, any [`Arch`]): channels-last
//! activations, packed matrix products with fused epilogues, run-time-selected SIMD
//! micro-kernels, fp32 or bf16.
//!
//! The same network as [`super::resnet::ResNet`] (torchvision's layout, batch norm folded at
//! load by [`super::weights::StateDict::take_conv_bn`]) computed without candle, the way
//! oneDNN runs PyTorch's `channels_last` models:
//!
//! * activations are NHWC, so a 1×1 convolution is one matrix product `[pixels, cin] ·
//!   [cin, cout]` and a k×k convolution is one over an implicit im2col matrix gathered while
//!   packing (the private `gemm` module);
//! * weights are packed once, at load, in the micro-kernel's panel order;
//! * bias (the folded batch norm), the block's residual add and ReLU happen in the
//!   matrix product's epilogue, on registers, before the single store of each activation;
//! * the f32 3×3 stride-1 layers run Winograd's F(4×4, 3×3) or, from 512 channels,
//!   F(2×2, 3×3) (`gemm::winograd`): 36 or 16 matrix products on transformed tiles, 4× or
//!   2.25× fewer operations;
//! * the matrix products share one persistent pool of worker threads (rayon), whose tasks
//!   own disjoint output tiles, so results do not depend on the number of threads;
//! * every buffer lives in a workspace reused from batch to batch, so a forward pass neither
//!   allocates nor page-faults once warm;
//! * the first stages, whose activations are the largest, run on slices of the batch small
//!   enough for what one layer writes to stay in cache for the next to read (`Slicing`),
//!   the deeper ones on the whole batch, so each of their larger weights is read once;
//! * the preprocessed NCHW batch is transposed to NHWC once before the stem (3 channels: a
//!   negligible pass), so every convolution packs from one layout.
//!
//! [`Precision::Bf16`] runs the products on bf16 operands with f32 accumulation: AMX tiles
//! (`tdpbf16ps`) where the CPU has them and Linux grants them, else AVX512-BF16's
//! `vdpbf16ps`, else an exact emulation on the f32 kernels. Activations between layers are
//! stored as bf16 NHWC, as under PyTorch's CPU autocast; biases, residual adds and ReLU are
//! computed in f32 in the epilogue, which rounds once to bf16 on the store, and the global
//! average pool sums in f32.

#[allow(unsafe_code)]
mod gemm;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Tensor;

pub use gemm::Bf16Blocking;
use gemm::{Act, bf16_bits, bf16_to_f32};
use gemm::{
    AlignedBuf, ConvGeom, PackedB, Source, Tiling, Winograd, WinogradBuffers, WinogradTile, Workers,
};

use super::arch::{Arch, ConvSpec};
use super::weights::StateDict;
use crate::error::{CandleContext, Error, Result};
use crate::isa::Isa;

/// The most values one activation of the first stages may hold over a slice of the batch
/// ([`Slicing`]): 8 MiB of bf16, 16 MiB of f32, the same images per slice in both dataflows;
/// the later stages run on the whole batch once their activations fit. (f32's direct
/// products ran alike from 8 MiB to none on an Ice Lake; its Winograd layers want layer 3's
/// batch whole at batch 16: 15 ms a 14×14×256 layer, against 19 on slices of 3 images.)
const SLICE_VALUES: usize = 4 << 20;

/// The arithmetic of the backbone's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 throughout; agrees with torchvision to float rounding.
    #[default]
    F32,
    /// bf16 operands (8 significant bits) and bf16 activations between layers, f32
    /// accumulation; features agree with f32 to a cosine above 0.999. Fast where the CPU has
    /// AMX or AVX512-BF16 (2.2× f32 on a Zen 4); elsewhere emulated on the f32 kernels, at
    /// about f32's speed (1.1× f32's forward pass, the same whole extraction, on an AVX-512
    /// Ice Lake).
    Bf16,
}

impl Precision {
    /// The fastest precision of `isa`: bf16 where its products are native (AMX or
    /// AVX512-BF16), f32 where bf16 would be emulated: there bf16 gains little or no speed,
    /// and f32 keeps torchvision's features to float rounding.
    pub fn auto(isa: Isa) -> Precision {
        if isa.native_bf16() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// `"f32"` or `"bf16"`: the name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The name in feature fingerprints, which key the cache: `"bf16-activations"` for bf16
    /// since its activations between layers became bf16 (features cached by the earlier bf16,
    /// with f32 activations, named `"bf16"`, are not reused).
    pub fn fingerprint_name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16-activations",
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
            "bf16" | "bf16-activations" => Ok(Precision::Bf16),
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
    /// The blocks' 1×1 convolutions (a bottleneck's reduce and expand, epilogue included).
    Conv1x1,
    /// The blocks' 3×3 convolutions.
    Conv3x3,
    /// The projection shortcuts (1×1 convolutions, of stride 2 but in the first stage).
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
            LayerKind::Downsample => "downsample 1x1",
            LayerKind::AvgPool => "avgpool",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where the time of forward passes went, per [`LayerKind`] and per convolution shape
/// (wall-clock seconds and floating-point operations), accumulated over every profiled pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    seconds: [f64; 6],
    flops: [f64; 6],
    shapes: Vec<ShapeTime>,
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

    /// The rate of layers of `kind` in GFLOP/s (0 when none was timed).
    pub fn gflops(&self, kind: LayerKind) -> f64 {
        gflops(self.flops(kind), self.seconds(kind))
    }

    /// Seconds over every kind.
    pub fn total_seconds(&self) -> f64 {
        self.seconds.iter().sum()
    }

    /// The convolutions grouped by shape, in network order of each shape's first layer.
    pub fn shapes(&self) -> &[ShapeTime] {
        &self.shapes
    }

    fn add(&mut self, kind: LayerKind, seconds: f64, flops: f64) {
        self.seconds[kind.index()] += seconds;
        self.flops[kind.index()] += flops;
    }

    fn add_shape(&mut self, shape: String, calls: usize, seconds: f64, flops: f64) {
        let i = match self.shapes.iter().position(|s| s.shape == shape) {
            Some(i) => i,
            None => {
                self.shapes.push(ShapeTime {
                    shape,
                    calls: 0,
                    seconds: 0.0,
                    flops: 0.0,
                });
                self.shapes.len() - 1
            }
        };
        let s = &mut self.shapes[i];
        s.calls += calls;
        s.seconds += seconds;
        s.flops += flops;
    }
}

/// The convolutions of one shape in a [`Profile`]: layers with the same kind, input
/// `[h, w, c]`, output `[oh, ow, cout]` and residual (or none) do the same work, so that
/// their time per layer shows which shapes fall short of the kernel's rate (the 1×1 layers
/// with a shallow depth, for instance).
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeTime {
    /// `<kind> <h>x<w>x<c> -> <oh>x<ow>x<cout>`, and `+ residual` when the epilogue adds one.
    pub shape: String,
    /// Layers run, summed over the passes (layers of this shape per pass × passes).
    pub calls: usize,
    /// Wall-clock seconds, summed.
    pub seconds: f64,
    /// Floating-point operations, summed.
    pub flops: f64,
}

impl ShapeTime {
    /// The rate of these layers in GFLOP/s (0 when none was timed).
    pub fn gflops(&self) -> f64 {
        gflops(self.flops, self.seconds)
    }
}

/// `flops` over `seconds` in GFLOP/s, 0 for nothing timed.
fn gflops(flops: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        flops / seconds * 1e-9
    } else {
        0.0
    }
}

/// Per pass: seconds, share and GFLOP/s of each layer kind, then the packing's
/// thread-seconds; with `{:#}`, then the same per convolution shape, slowest first.
impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let passes = self.passes.max(1) as f64;
        let total = self.total_seconds() / passes;
        writeln!(
            f,
            "{:<18} {:>9} {:>7} {:>8}",
            "layer kind", "s/pass", "share", "GFLOP/s"
        )?;
        // The shares of an empty profile print as 0.
        let percent = |s: f64| if total > 0.0 { 100.0 * s / total } else { 0.0 };
        for k in LayerKind::ALL {
            let s = self.seconds(k) / passes;
            let (share, gflops) = (percent(s), self.gflops(k));
            writeln!(f, "{:<18} {s:>9.4} {share:>6.1}% {gflops:>8.1}", k.name())?;
        }
        write!(
            f,
            "packing (thread-seconds, inside the convolutions): {:.4}",
            self.pack_thread_seconds / passes
        )?;
        if f.alternate() {
            write!(
                f,
                "\n{:<46} {:>6} {:>9} {:>7} {:>8}",
                "convolution shape", "layers", "s/pass", "share", "GFLOP/s"
            )?;
            let mut shapes: Vec<&ShapeTime> = self.shapes.iter().collect();
            shapes.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
            for s in shapes {
                let per = s.seconds / passes;
                write!(
                    f,
                    "\n{:<46} {:>6} {per:>9.4} {:>6.1}% {:>8.1}",
                    s.shape,
                    s.calls as f64 / passes,
                    percent(per),
                    s.gflops()
                )?;
            }
        }
        Ok(())
    }
}

/// How the f32 dataflow computes its 3×3, stride-1 convolutions (ResNet-50: 13 of its 53
/// layers, a third of its direct arithmetic; ResNet-18 and -34: most of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Winograd's F(4×4, 3×3) on layers under 512 channels (4× fewer products than direct),
    /// F(2×2, 3×3) on wider ones (2.25× fewer, in a little under half F(4×4)'s weight
    /// memory): features within float rounding of the direct convolution's (the private
    /// `gemm::winograd` module).
    #[default]
    Winograd,
    /// Winograd's F(2×2, 3×3) on every layer: the least weight memory and rounding of the
    /// two tilings.
    Winograd2,
    /// The implicit-im2col matrix product every other layer runs.
    Direct,
}

impl FromStr for Algorithm {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "winograd" => Ok(Algorithm::Winograd),
            "winograd2" => Ok(Algorithm::Winograd2),
            "direct" => Ok(Algorithm::Direct),
            other => Err(Error::invalid(
                "convolution algorithm",
                format!("`{other}` is none of winograd, winograd2, direct"),
            )),
        }
    }
}

/// A convolution's weights, packed for the way its product is computed.
#[derive(Debug)]
enum Product {
    /// Packed for the implicit-im2col matrix product.
    Direct(PackedB),
    /// Transformed and packed for Winograd's F(2×2, 3×3) or F(4×4, 3×3) (f32 3×3 stride-1
    /// layers).
    Winograd(Winograd),
}

/// A convolution with its batch norm folded in, weights packed for the micro-kernel.
#[derive(Debug)]
struct Conv {
    product: Product,
    /// `[cout]`
    bias: Vec<f32>,
}

impl Conv {
    /// Loads `spec` for the kernels of `t`, with Winograd's algorithm where `algorithm`
    /// asks for it and the layer and dataflow allow it.
    fn load(sd: &mut StateDict, spec: &ConvSpec, t: &Tiling, algorithm: Algorithm) -> Result<Self> {
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
        let w = to_vec(&w, "weight")?;
        let tile = match algorithm {
            _ if t.bf16_act() || !Winograd::fits(&geom) => None,
            Algorithm::Winograd => Some(WinogradTile::of(&geom)),
            Algorithm::Winograd2 => Some(WinogradTile::F2),
            Algorithm::Direct => None,
        };
        Ok(Conv {
            product: match tile {
                Some(tile) => Product::Winograd(Winograd::new(&w, &geom, t, tile)?),
                None => Product::Direct(PackedB::new(&w, &geom, t)?),
            },
            bias: to_vec(&b, "bias")?,
        })
    }

    fn geom(&self) -> ConvGeom {
        match &self.product {
            Product::Direct(p) => p.geom(),
            Product::Winograd(w) => w.geom(),
        }
    }

    fn bytes(&self) -> usize {
        let weights = match &self.product {
            Product::Direct(p) => p.bytes(),
            Product::Winograd(w) => w.bytes(),
        };
        weights + self.bias.len() * 4
    }
}

/// A residual block, basic or bottleneck: `relu(main(x) + shortcut(x))`.
#[derive(Debug)]
struct Block {
    /// A ReLU follows every convolution but the last, which adds the shortcut (fused).
    main: Vec<Conv>,
    /// The strided 1×1 projection of the shortcut, or `None` for the input itself.
    downsample: Option<Conv>,
}

/// Buffers reused by every forward pass; they only ever grow.
#[derive(Debug, Default)]
struct Workspace {
    /// The activations the blocks pass along.
    acts: Acts,
    /// The input batch, transposed to NHWC.
    input: AlignedBuf,
    /// The output of the network's first blocks for the whole batch, gathered slice by slice
    /// when they run in slices ([`Slicing`]).
    gather: AlignedBuf,
    /// One packing buffer per worker thread.
    scratch: Vec<AlignedBuf>,
    /// The transformed inputs and the products of the Winograd layers.
    winograd: WinogradBuffers,
}

/// The activation buffers of a run of blocks.
#[derive(Debug, Default)]
struct Acts {
    /// The current block's input, `[batch, h, w, c]`.
    cur: AlignedBuf,
    /// The current block's output (then swapped with `cur`); also the stem's output.
    next: AlignedBuf,
    /// Outputs of the main path's inner convolutions, alternately (a bottleneck's 1×1
    /// reduce into the first, its 3×3 into the second).
    inner: [AlignedBuf; 2],
    /// Output of the projection shortcut.
    ds: AlignedBuf,
}

/// How a pass splits its batch: the stem, the max pool and the first `blocks` blocks run
/// on slices of `images` images, one slice after the other, and the rest of the network on
/// the whole batch. The first stages' activations are the largest (ResNet-50: 1.6 MB per
/// 56×56×256 bf16 image); a slice keeps what one layer writes in cache for the next to read
/// instead of sending it to memory and back, while the deeper layers, whose weights are
/// larger than their activations, still read each weight once per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slicing {
    blocks: usize,
    images: usize,
}

/// A ResNet up to its global average pool on the fast CPU path: images `[batch, 3, h, w]`
/// (NCHW, normalised) → features `[batch, feature_dim]`.
#[derive(Debug)]
pub struct FastResNet {
    arch: Arch,
    precision: Precision,
    isa: Isa,
    tiling: Tiling,
    algorithm: Algorithm,
    stem: Conv,
    blocks: Vec<Block>,
    workers: Workers,
    /// The most bytes an activation of the sliced first stages may take ([`Slicing`]).
    slice_bytes: usize,
    workspace: Mutex<Workspace>,
}

/// The name the default architecture's fast network had before the backbone seam.
pub type FastResNet50 = FastResNet;

impl FastResNet {
    /// Reads a torchvision ResNet-50 state dict (`.pth` or `.safetensors`) and builds the
    /// network for `precision` with the best kernels of this CPU.
    pub fn load(path: &Path, precision: Precision) -> Result<Self> {
        Self::from_state_dict(StateDict::read(path)?, precision)
    }

    /// Reads a torchvision `arch` state dict (`.pth` or `.safetensors`) and builds the
    /// network for `precision` with the best kernels of this CPU; a file of another
    /// architecture is refused naming both.
    pub fn load_arch(path: &Path, arch: &Arch, precision: Precision) -> Result<Self> {
        Self::with_arch(StateDict::read(path)?, arch, precision, Isa::detect())
    }

    /// Builds ResNet-50 from a state dict, strictly (as [`super::resnet::ResNet`]), for
    /// `precision` with the best kernels of this CPU ([`Isa::detect`]).
    pub fn from_state_dict(sd: StateDict, precision: Precision) -> Result<Self> {
        Self::with_isa(sd, precision, Isa::detect())
    }

    /// As [`FastResNet::from_state_dict`] with the kernels of `isa`, e.g.
    /// [`Isa::Portable`] to test the fallback.
    pub fn with_isa(sd: StateDict, precision: Precision, isa: Isa) -> Result<Self> {
        Self::with_arch(sd, &Arch::default(), precision, isa)
    }

    /// Builds `arch` from a state dict, strictly, for `precision` with the kernels of `isa`;
    /// tensors of another torchvision ResNet are refused naming both architectures.
    pub fn with_arch(sd: StateDict, arch: &Arch, precision: Precision, isa: Isa) -> Result<Self> {
        Self::with_algorithm(sd, arch, precision, isa, Algorithm::default())
    }

    /// As [`FastResNet::with_arch`], computing the f32 3×3 stride-1 convolutions with
    /// `algorithm` (bf16 runs them directly whatever it says).
    pub fn with_algorithm(
        sd: StateDict,
        arch: &Arch,
        precision: Precision,
        isa: Isa,
        algorithm: Algorithm,
    ) -> Result<Self> {
        let tiling = Tiling::new(isa, precision == Precision::Bf16);
        Self::with_tiling(sd, arch, precision, isa, (tiling, algorithm))
    }

    /// As [`FastResNet::with_algorithm`] with the blocking and kernel of `tiling`.
    fn with_tiling(
        mut sd: StateDict,
        arch: &Arch,
        precision: Precision,
        isa: Isa,
        (tiling, algorithm): (Tiling, Algorithm),
    ) -> Result<Self> {
        sd.expect_arch(arch)?;
        let t = &tiling;
        let stem = Conv::load(&mut sd, &arch.stem(), t, algorithm)?;
        let blocks = arch
            .blocks()
            .iter()
            .map(|b| {
                Ok(Block {
                    main: b
                        .main
                        .iter()
                        .map(|c| Conv::load(&mut sd, c, t, algorithm))
                        .collect::<Result<_>>()?,
                    downsample: b
                        .downsample
                        .as_ref()
                        .map(|d| Conv::load(&mut sd, d, t, algorithm))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        sd.finish()?;
        Ok(FastResNet {
            arch: *arch,
            precision,
            isa,
            tiling,
            algorithm,
            stem,
            blocks,
            workers: Workers::new(std::thread::available_parallelism().map_or(1, |n| n.get()))?,
            slice_bytes: SLICE_VALUES * if tiling.bf16_act() { 2 } else { 4 },
            workspace: Mutex::new(Workspace::default()),
        })
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// Width of the features.
    pub fn feature_dim(&self) -> usize {
        self.arch.feature_dim()
    }

    /// The precision of the matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The instruction set of the kernels in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// How the f32 3×3 stride-1 convolutions are computed (bf16 runs them directly).
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// True when bf16 runs on native AVX512-BF16 instructions rather than being emulated.
    pub fn native_bf16(&self) -> bool {
        self.tiling.pairs()
    }

    /// The most bytes one activation of the first stages may take over a slice of the batch
    /// (default 8 MiB under the bf16 dataflow, 16 MiB under f32's): those stages run slice by slice until their activations over the
    /// whole batch fit, so that one layer's output stays in cache for the next. Features do
    /// not depend on it.
    pub fn slice_bytes(&self) -> usize {
        self.slice_bytes
    }

    /// Sets [`FastResNet::slice_bytes`]; `usize::MAX` runs every layer on the whole batch,
    /// 0 every layer on slices of one image.
    pub fn set_slice_bytes(&mut self, bytes: usize) {
        self.slice_bytes = bytes;
    }

    /// How the bf16 dataflow blocks its products ([`Bf16Blocking`]; f32 ignores it).
    pub fn bf16_blocking(&self) -> Bf16Blocking {
        self.tiling.bf16_blocking()
    }

    /// Sets [`FastResNet::bf16_blocking`], for tuning a CPU kind; features do not depend on it.
    pub fn set_bf16_blocking(&mut self, blocking: Bf16Blocking) {
        self.tiling.set_bf16_blocking(blocking);
    }

    /// Worker threads per matrix product (default: the CPU's available parallelism).
    pub fn threads(&self) -> usize {
        self.workers.threads()
    }

    /// Sets the worker threads per matrix product (at least 1): a new pool, kept for every
    /// later pass. Errors if the threads cannot be started.
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        self.workers = Workers::new(threads)?;
        Ok(())
    }

    /// Bytes of packed weights.
    pub fn weight_bytes(&self) -> usize {
        self.stem.bytes()
            + self
                .blocks
                .iter()
                .flat_map(|b| b.main.iter().chain(&b.downsample))
                .map(Conv::bytes)
                .sum::<usize>()
    }

    /// Features of `batch` normalised images `x` (`[batch, 3, h, w]`, NCHW, row-major):
    /// `[batch, feature_dim]` row-major.
    pub fn forward(&self, x: &[f32], batch: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        self.run(x, batch, h, w, None)
    }

    /// As [`FastResNet::forward`], adding where the time went to `profile`.
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
        profile: Option<&mut Profile>,
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
        let slicing = self.slicing(batch, h, w);
        self.size_workspace(ws, batch, (h, w), slicing);
        let Workspace {
            acts,
            input,
            gather,
            scratch,
            winograd,
        } = ws;
        let pack_ns = AtomicU64::new(0);
        let mut pass = Pass {
            tiling: &self.tiling,
            workers: &self.workers,
            scratch,
            winograd,
            pack_ns: profile.is_some().then_some(&pack_ns),
            profile,
            counting: true,
        };

        // The first stages, slice by slice, each slice's output gathered into the batch's.
        let (first_blocks, rest) = self.blocks.split_at(slicing.blocks);
        let image = 3 * h * w;
        let mut shape = (0, 0, 0);
        for first in (0..batch).step_by(slicing.images) {
            let n = slicing.images.min(batch - first);
            // Each layer counts once per pass in the profile, however many slices it ran on.
            pass.counting = first == 0;
            let x = &x[first * image..][..n * image];
            shape = self.stem(&mut pass, x, n, (h, w), input, acts)?;
            shape = run_blocks(&mut pass, first_blocks, acts, n, shape)?;
            if slicing.images < batch {
                let len = n * shape.0 * shape.1 * shape.2;
                let at = first * shape.0 * shape.1 * shape.2;
                if self.tiling.bf16_act() {
                    gather.as_bf16_mut()[at..][..len].copy_from_slice(&acts.cur.as_bf16()[..len]);
                } else {
                    gather.as_mut_slice()[at..][..len].copy_from_slice(&acts.cur.as_slice()[..len]);
                }
            }
        }
        if slicing.images < batch {
            std::mem::swap(&mut acts.cur, gather);
        }
        pass.counting = true;
        let (hc, wc, cc) = run_blocks(&mut pass, rest, acts, batch, shape)?;

        // Global average pool: [b, hc, wc, c] -> [b, c]
        let mut features = vec![0f32; batch * cc];
        let bf16 = self.tiling.bf16_act();
        let cur = &acts.cur;
        pass.timed(LayerKind::AvgPool, 0.0, || {
            let dims = (batch, hc * wc, cc);
            if bf16 {
                avg_pool(cur.as_bf16(), dims, &mut features, bf16_to_f32);
            } else {
                avg_pool(cur.as_slice(), dims, &mut features, |v| v);
            }
            Ok(())
        })?;
        if let Some(p) = pass.profile {
            p.pack_thread_seconds += pack_ns.load(Ordering::Relaxed) as f64 * 1e-9;
            p.passes += 1;
        }
        Ok(features)
    }

    /// The stem and its max pool on `batch` images `x` (`[batch, 3, h, w]`, NCHW) into
    /// `acts.cur`; returns its shape `[h, w, c]`.
    fn stem(
        &self,
        pass: &mut Pass,
        x: &[f32],
        batch: usize,
        (h, w): (usize, usize),
        input: &mut AlignedBuf,
        acts: &mut Acts,
    ) -> Result<(usize, usize, usize)> {
        // Stem: [b, 3, h, w] (NCHW) -> [b, h1, w1, 64]. Its packer, like every other, reads
        // NHWC: transpose the small 3-channel input, rounding it to bf16 under the bf16
        // dataflow (once, rather than each of the ~12 times the stem's windows read a pixel).
        let len = batch * 3 * h * w;
        let bf16 = self.tiling.bf16_act();
        let workers = pass.workers;
        pass.timed(LayerKind::Stem, 0.0, || {
            if bf16 {
                workers.split(&mut input.as_bf16_mut()[..len], 3, |first, out| {
                    nchw_to_nhwc::<_, 3>(x, (h, w), (first, out), bf16_bits);
                });
            } else {
                workers.split(&mut input.as_mut_slice()[..len], 3, |first, out| {
                    nchw_to_nhwc::<_, 3>(x, (h, w), (first, out), |v| v);
                });
            }
            Ok(())
        })?;
        let Acts { cur, next, .. } = acts;
        let stem_in = nhwc(input, batch, (h, w, 3));
        let (h1, w1) = pass.apply(&self.stem, LayerKind::Stem, stem_in, next, None)?;
        // Max pool 3×3 / 2: [b, h1, w1, 64] -> [b, h2, w2, 64]
        let c1 = self.stem.geom().cout;
        pass.timed(LayerKind::MaxPool, 0.0, || {
            let dims = (h1, w1, c1);
            let len = batch * pool_len(h1) * pool_len(w1) * c1;
            if bf16 {
                let src = next.as_bf16();
                workers.split(&mut cur.as_bf16_mut()[..len], c1, |first, out| {
                    max_pool_bf16(src, dims, (first, out));
                });
            } else {
                let src = next.as_slice();
                workers.split(&mut cur.as_mut_slice()[..len], c1, |first, out| {
                    max_pool(src, dims, (first, out), f32::NEG_INFINITY, f32::max, |v| v);
                });
            }
            Ok(())
        })?;
        Ok((pool_len(h1), pool_len(w1), c1))
    }

    /// How a `[batch, 3, h, w]` pass is sliced: the leading blocks that write an activation
    /// of more than `slice_bytes` over the whole batch run (after the stem) on slices small
    /// enough for their largest activation to fit in `slice_bytes`.
    fn slicing(&self, batch: usize, h: usize, w: usize) -> Slicing {
        let whole = Slicing {
            blocks: self.blocks.len(),
            images: batch,
        };
        let bf16 = self.tiling.bf16_act();
        let bytes = |values: usize| values * if bf16 { 2 } else { 4 };
        let (stem, blocks) = self.largest_outputs(h, w);
        let (mut sliced, mut largest) = (0, stem);
        for v in blocks.take_while(|&v| bytes(batch * v) > self.slice_bytes) {
            (sliced, largest) = (sliced + 1, largest.max(v));
        }
        let slices = bytes(batch * largest).div_ceil(self.slice_bytes.max(1));
        let images = batch.div_ceil(slices.min(batch).max(1));
        if images >= batch {
            return whole;
        }
        Slicing {
            blocks: sliced,
            images,
        }
    }

    /// Per image, the largest activation the stem (with its max pool) writes, and the largest
    /// each block writes in turn, in values.
    fn largest_outputs(&self, h: usize, w: usize) -> (usize, impl Iterator<Item = usize>) {
        let g = self.stem.geom();
        let (h1, w1) = (g.out_len(h), g.out_len(w));
        let stem = h1 * w1 * g.cout;
        let (mut hc, mut wc) = (pool_len(h1), pool_len(w1));
        let blocks = self.blocks.iter().map(move |b| {
            let (mut ho, mut wo) = (hc, wc);
            let mut largest = 0;
            for conv in &b.main {
                let g = conv.geom();
                (ho, wo) = (g.out_len(ho), g.out_len(wo));
                largest = largest.max(ho * wo * g.cout);
            }
            if let Some(d) = &b.downsample {
                let g = d.geom();
                largest = largest.max(g.out_len(hc) * g.out_len(wc) * g.cout);
            }
            (hc, wc) = (ho, wo);
            largest
        });
        (stem, blocks)
    }

    /// Grows the workspace to what a `[batch, 3, h, w]` pass sliced as `slicing` needs.
    fn size_workspace(
        &self,
        ws: &mut Workspace,
        batch: usize,
        (h, w): (usize, usize),
        slicing: Slicing,
    ) {
        // The stem and the sliced blocks see a slice, the rest the whole batch.
        let images = |block: usize| {
            if block < slicing.blocks {
                slicing.images
            } else {
                batch
            }
        };
        let g = self.stem.geom();
        let (h1, w1) = (g.out_len(h), g.out_len(w));
        let (mut hc, mut wc, mut cc) = (pool_len(h1), pool_len(w1), g.cout);
        let mut act = slicing.images * h1 * w1 * g.cout;
        let (mut inner, mut ds) = ([0, 0], 0);
        // Values per image of the sliced blocks' output, gathered for the whole batch.
        let mut gathered = hc * wc * cc;
        for (k, b) in self.blocks.iter().enumerate() {
            if k == slicing.blocks {
                gathered = hc * wc * cc;
            }
            let (mut ho, mut wo) = (hc, wc);
            for (i, conv) in b.main.iter().enumerate() {
                let g = conv.geom();
                (ho, wo) = (g.out_len(ho), g.out_len(wo));
                let len = images(k) * ho * wo * g.cout;
                if i + 1 < b.main.len() {
                    inner[i % 2] = inner[i % 2].max(len);
                } else {
                    act = act.max(len);
                    cc = g.cout;
                }
            }
            if let Some(d) = &b.downsample {
                let g = d.geom();
                ds = ds.max(images(k) * g.out_len(hc) * g.out_len(wc) * g.cout);
            }
            (hc, wc) = (ho, wo);
        }
        if slicing.blocks == self.blocks.len() {
            gathered = hc * wc * cc;
        }
        // The gathered output of the sliced blocks becomes the next block's input (`cur`),
        // so it must hold every later activation as `cur` does, and `cur` every earlier one.
        let gather = if slicing.images < batch {
            act = act.max(batch * gathered);
            act
        } else {
            0
        };
        // f32 words: bf16 activations take half as many.
        let words = |len: usize| {
            if self.tiling.bf16_act() {
                len.div_ceil(2)
            } else {
                len
            }
        };
        ws.input.ensure(words(slicing.images * h * w * 3));
        ws.gather.ensure(words(gather));
        let acts = &mut ws.acts;
        acts.cur.ensure(words(act));
        acts.next.ensure(words(act));
        acts.inner[0].ensure(words(inner[0]));
        acts.inner[1].ensure(words(inner[1]));
        acts.ds.ensure(words(ds));
        ws.scratch
            .resize_with(self.workers.threads(), AlignedBuf::default);
    }
}

/// Runs `blocks` on the `[batch, h, w, c]` activation in `acts.cur`, leaving their output
/// there; returns its shape.
fn run_blocks(
    pass: &mut Pass,
    blocks: &[Block],
    acts: &mut Acts,
    batch: usize,
    mut shape: (usize, usize, usize),
) -> Result<(usize, usize, usize)> {
    let Acts {
        cur,
        next,
        inner,
        ds,
    } = acts;
    for block in blocks {
        let Some((last, inner_convs)) = block.main.split_last() else {
            continue;
        };
        // Main path but its last convolution, each with ReLU, alternating between the
        // two inner buffers: [b, h, w, c] -> [b, h', w', width]
        let mut y = shape;
        for (i, conv) in inner_convs.iter().enumerate() {
            let [a, b] = &mut *inner;
            let (out, prev) = if i % 2 == 0 { (a, &*b) } else { (b, &*a) };
            let data = if i == 0 { &*cur } else { prev };
            let (ho, wo) = pass.apply(conv, kind(conv), nhwc(data, batch, y), out, None)?;
            y = (ho, wo, conv.geom().cout);
        }
        // Shortcut: the block input itself, or its strided 1×1 projection.
        let residual: &AlignedBuf = match &block.downsample {
            Some(d) => {
                pass.apply(d, LayerKind::Downsample, nhwc(cur, batch, shape), ds, None)?;
                ds
            }
            None => cur,
        };
        // Last convolution + residual + ReLU, fused: [b, h', w', width] -> [b, h', w', out]
        let data = match inner_convs.len() {
            0 => &*cur,
            n => &inner[(n - 1) % 2],
        };
        let (ho, wo) = pass.apply(last, kind(last), nhwc(data, batch, y), next, Some(residual))?;
        std::mem::swap(cur, next);
        shape = (ho, wo, last.geom().cout);
    }
    Ok(shape)
}

/// A convolution's input: a `[batch, h, w, c]` activation in `buf`, of the pass's activation
/// type.
struct Input<'a> {
    buf: &'a AlignedBuf,
    batch: usize,
    shape: (usize, usize, usize),
}

/// The activation `[batch, h, w, c]` in `buf`.
fn nhwc(buf: &AlignedBuf, batch: usize, shape: (usize, usize, usize)) -> Input<'_> {
    Input { buf, batch, shape }
}

/// The profile kind of a main-path convolution.
fn kind(conv: &Conv) -> LayerKind {
    if conv.geom().ksize == 1 {
        LayerKind::Conv1x1
    } else {
        LayerKind::Conv3x3
    }
}

/// What one forward pass runs its layers with.
struct Pass<'a> {
    tiling: &'a Tiling,
    workers: &'a Workers,
    scratch: &'a mut [AlignedBuf],
    /// The Winograd layers' transformed inputs and products.
    winograd: &'a mut WinogradBuffers,
    /// Thread-nanoseconds spent packing, when profiling.
    pack_ns: Option<&'a AtomicU64>,
    profile: Option<&'a mut Profile>,
    /// Whether the layers run now count as layers of the pass in the profile's shapes (not
    /// on a slice after the first: [`Slicing`]).
    counting: bool,
}

impl Pass<'_> {
    /// Runs one convolution layer on `src` into `out`: bias, then `residual` when given,
    /// then ReLU (every layer but a projection shortcut has one). Returns the output's
    /// height and width. Under the bf16 dataflow `src`, `out` and `residual` hold bf16.
    fn apply(
        &mut self,
        layer: &Conv,
        kind: LayerKind,
        src: Input,
        out: &mut AlignedBuf,
        residual: Option<&AlignedBuf>,
    ) -> Result<(usize, usize)> {
        let g = layer.geom();
        let (batch, (h, w, c)) = (src.batch, src.shape);
        let (oh, ow) = (g.out_len(h), g.out_len(w));
        let flops = 2.0 * (batch * oh * ow * g.k() * g.cout) as f64;
        let relu = kind != LayerKind::Downsample;
        let start = Instant::now();
        let bias = &layer.bias[..];
        match (&layer.product, self.tiling.bf16_act()) {
            (Product::Direct(packed), true) => gemm::conv_bf16(
                &Act {
                    data: src.buf.as_bf16(),
                    batch,
                    h,
                    w,
                    c,
                },
                packed,
                bias,
                self.tiling,
                out.as_bf16_mut(),
                residual.map(AlignedBuf::as_bf16),
                relu,
                self.workers,
                self.scratch,
                self.pack_ns,
            )?,
            (product, false) => {
                let src = Source {
                    data: src.buf.as_slice(),
                    batch,
                    h,
                    w,
                    c,
                };
                let (out, residual) = (out.as_mut_slice(), residual.map(AlignedBuf::as_slice));
                let (workers, t) = (self.workers, self.tiling);
                match product {
                    Product::Direct(packed) => gemm::conv(
                        &src,
                        packed,
                        bias,
                        t,
                        out,
                        residual,
                        relu,
                        workers,
                        self.scratch,
                        self.pack_ns,
                    )?,
                    Product::Winograd(wg) => {
                        let bufs = &mut *self.winograd;
                        wg.conv(
                            &src,
                            bias,
                            t,
                            out,
                            residual,
                            relu,
                            workers,
                            self.scratch,
                            bufs,
                            self.pack_ns,
                        )?
                    }
                }
            }
            (Product::Winograd(_), true) => {
                return Err(Error::invalid(
                    "Winograd convolution",
                    "weights transformed for the f32 dataflow run on the bf16 one",
                ));
            }
        }
        if let Some(p) = self.profile.as_deref_mut() {
            let seconds = start.elapsed().as_secs_f64();
            p.add(kind, seconds, flops);
            let res = if residual.is_some() {
                " + residual"
            } else {
                ""
            };
            let algorithm = match &layer.product {
                Product::Winograd(w) if w.tile() == WinogradTile::F4 => " (winograd 4x4)",
                Product::Winograd(_) => " (winograd 2x2)",
                Product::Direct(_) => "",
            };
            let shape = format!(
                "{} {h}x{w}x{c} -> {oh}x{ow}x{}{res}{algorithm}",
                kind.name(),
                g.cout
            );
            p.add_shape(shape, usize::from(self.counting), seconds, flops);
        }
        Ok((oh, ow))
    }

    /// Runs `f`, adding its wall-clock time and `flops` to the profile under `kind`.
    fn timed(&mut self, kind: LayerKind, flops: f64, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let start = Instant::now();
        f()?;
        self.record(kind, start, flops);
        Ok(())
    }

    fn record(&mut self, kind: LayerKind, start: Instant, flops: f64) {
        if let Some(p) = self.profile.as_deref_mut() {
            p.add(kind, start.elapsed().as_secs_f64(), flops);
        }
    }
}

/// `[b, C, h, w]` → `[b, h, w, C]`, each value converted by `cvt`, for the output pixels
/// `first..` that `out` holds (whole pixels: the workers each take a piece).
fn nchw_to_nhwc<T: Copy + Default, const C: usize>(
    src: &[f32],
    (h, w): (usize, usize),
    (first, out): (usize, &mut [T]),
    cvt: impl Fn(f32) -> T,
) {
    // Runs of up to RUN pixels of one image: each channel's run converted from its plane
    // in one contiguous (vectorised) loop, then the runs interleaved.
    const RUN: usize = 64;
    let hw = h * w;
    let (mut n, mut i) = (first / hw, first % hw);
    let mut planes = [[T::default(); RUN]; C];
    let mut rest = out;
    while rest.len() >= C {
        let px = (rest.len() / C).min(RUN).min(hw - i);
        for (ch, plane) in planes.iter_mut().enumerate() {
            let from = &src[(n * C + ch) * hw + i..][..px];
            for (t, &v) in plane.iter_mut().zip(from) {
                *t = cvt(v);
            }
        }
        let (pixels, later) = rest.split_at_mut(px * C);
        for (p, dst) in pixels.chunks_exact_mut(C).enumerate() {
            for (ch, v) in dst.iter_mut().enumerate() {
                *v = planes[ch][p];
            }
        }
        rest = later;
        i += px;
        if i == hw {
            (n, i) = (n + 1, 0);
        }
    }
}

/// Output length of the 3×3, stride-2, padding-1 max pool.
fn pool_len(n: usize) -> usize {
    (n + 2 - 3) / 2 + 1
}

/// 3×3 max pool, stride 2, padding 1, on NHWC `src [b, h, w, c]` into the output pixels
/// `first..` of `dst [b, oh, ow, c]` that `out` holds (whole pixels; the workers each take a
/// run of them): each output starts at `neg_inf` (the padding, −∞ as in PyTorch: every
/// window holds at least one real pixel), takes `max(output, input)` over its window, and is
/// then mapped by `finish` (for bf16, back from the integer order `max` compares in).
fn max_pool<T: Copy>(
    src: &[T],
    (h, w, c): (usize, usize, usize),
    (first, out): (usize, &mut [T]),
    neg_inf: T,
    max: impl Fn(T, T) -> T,
    finish: impl Fn(T) -> T,
) {
    let (oh, ow) = (pool_len(h), pool_len(w));
    for (i, out) in (first..).zip(out.chunks_exact_mut(c)) {
        let (n, oy, ox) = (i / (oh * ow), (i / ow) % oh, i % ow);
        out.fill(neg_inf);
        for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
            for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                let row = &src[((n * h + iy) * w + ix) * c..][..c];
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = max(*o, v);
                }
            }
        }
        for o in out.iter_mut() {
            *o = finish(*o);
        }
    }
}

/// [`max_pool`] on bf16 bits, compared as the integers [`order`] maps them to, which sort as
/// the values do (−0 below +0; the stem's ReLU leaves no NaN): eight lanes per SSE2
/// instruction, where a comparison through f32 takes four (1.5× faster here).
fn max_pool_bf16(src: &[u16], dims: (usize, usize, usize), out: (usize, &mut [u16])) {
    let max = |o: u16, v: u16| (o as i16).max(order(v) as i16) as u16;
    max_pool(src, dims, out, order(0xFF80), max, order);
}

/// bf16 bits as a 16-bit integer that sorts as the value (as `i16`): negative values have
/// their magnitude bits flipped. Its own inverse.
#[inline(always)]
fn order(b: u16) -> u16 {
    b ^ (((b as i16) >> 15) as u16 & 0x7FFF)
}

/// Mean over the `hw` pixels of each image: NHWC `src [b, hw, c]` (values of type `T`, read
/// as f32 by `f32_of`) → `dst [b, c]`, summed in f32.
fn avg_pool<T: Copy>(
    src: &[T],
    (batch, hw, c): (usize, usize, usize),
    dst: &mut [f32],
    f32_of: impl Fn(T) -> f32,
) {
    for (n, out) in dst.chunks_exact_mut(c).enumerate().take(batch) {
        out.fill(0.0);
        for row in src[n * hw * c..(n + 1) * hw * c].chunks_exact(c) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += f32_of(v);
            }
        }
        let inv = 1.0 / hw as f32;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::weights;

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    }

    /// The synthetic ResNet-50's weights.
    pub(super) fn synthetic() -> StateDict {
        StateDict::from_tensors("synthetic", weights::synthetic_state_dict().unwrap())
    }

    /// Winograd's layers, both tilings, give the direct products' features to float
    /// rounding, in bottleneck blocks (ResNet-50) and basic ones (ResNet-18, whose second 3×3
    /// layer adds the residual), at odd map sizes too (5×5, 3×3 and 2×2 at 40 px: partial
    /// tiles) — and they do run.
    #[test]
    fn winograd_and_direct_features_agree() {
        let (n, s) = (2, 40);
        let x = images(n, s);
        for arch in [Arch::RESNET50, Arch::RESNET18] {
            let run = |algorithm| {
                let sd = weights::synthetic_state_dict_of(&arch).unwrap();
                let sd = StateDict::from_tensors("synthetic", sd);
                FastResNet::with_algorithm(sd, &arch, Precision::F32, Isa::detect(), algorithm)
                    .unwrap()
                    .forward(&x, n, s, s)
                    .unwrap()
            };
            let direct = run(Algorithm::Direct);
            let scale = direct.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The default (F(4×4) under 512 channels) and F(2×2) everywhere: each runs, and
            // the default's F(4×4) layers do.
            let both = [Algorithm::Winograd, Algorithm::Winograd2].map(|algorithm| {
                let got = run(algorithm);
                assert_ne!(got, direct, "{} {algorithm:?} must run", arch.name);
                let worst = got.iter().zip(&direct).map(|(w, d)| (w - d).abs() / scale);
                let worst = worst.fold(0f32, f32::max);
                eprintln!(
                    "{} {algorithm:?}: largest difference {worst:.2e} of the largest feature",
                    arch.name
                );
                assert!(worst <= 1e-5, "{} {algorithm:?}: {worst:e}", arch.name);
                got
            });
            assert_ne!(both[0], both[1], "{}: F(4×4) must run", arch.name);
        }
    }

    /// `n` NCHW images of `s`×`s`, a pattern without symmetry in [-1.5, 1.5].
    pub(super) fn images(n: usize, s: usize) -> Vec<f32> {
        (0..n * 3 * s * s)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5)
            .collect()
    }

    /// `order` sorts every bf16 but NaN as its value (−0 just below +0) and is its own
    /// inverse, so the bf16 max pool equals the f32 one on the same values, negative ones
    /// included (which the network, pooling after a ReLU, never gives it).
    #[test]
    fn bf16_max_pool_compares_as_the_values() {
        let mut all: Vec<u16> = (0..=u16::MAX)
            .filter(|&b| !bf16_to_f32(b).is_nan())
            .collect();
        assert!(all.iter().all(|&b| order(order(b)) == b));
        all.sort_by_key(|&b| order(b) as i16);
        for pair in all.windows(2) {
            let (a, b) = (bf16_to_f32(pair[0]), bf16_to_f32(pair[1]));
            let zeros = (pair[0], pair[1]) == (0x8000, 0);
            assert!(
                a < b || zeros,
                "{:#06x} sorts before {:#06x}",
                pair[0],
                pair[1]
            );
        }

        let dims = (5, 4, 3);
        let values: Vec<f32> = (0..2 * 5 * 4 * 3)
            .map(|i| bf16_to_f32(bf16_bits(((i * 37 % 23) as f32 - 19.0) * 0.37)))
            .collect();
        let mut want = vec![0f32; 2 * pool_len(5) * pool_len(4) * 3];
        max_pool(
            &values,
            dims,
            (0, &mut want),
            f32::NEG_INFINITY,
            f32::max,
            |v| v,
        );
        let bits: Vec<u16> = values.iter().map(|&v| bf16_bits(v)).collect();
        let mut got = vec![0u16; want.len()];
        // In three pieces, as three workers pool (12 output pixels: 4 each).
        let workers = Workers::new(3).unwrap();
        workers.split(&mut got, 3, |first, out| {
            max_pool_bf16(&bits, dims, (first, out))
        });
        let got: Vec<f32> = got.into_iter().map(bf16_to_f32).collect();
        assert_eq!(got, want);
        assert!(
            want.iter().any(|&v| v < 0.0),
            "the case must pool negative values"
        );
    }

    /// The profile's shapes account for every convolution of ResNet-50 — 53 per pass, the
    /// kinds' operations exactly — and tell apart the layers a kind lumps together.
    #[test]
    fn profile_groups_every_convolution_by_shape() {
        let (n, s) = (1, 32);
        let model =
            FastResNet::with_arch(synthetic(), &Arch::default(), Precision::F32, Isa::detect())
                .unwrap();
        let mut p = Profile::default();
        for _ in 0..2 {
            model
                .forward_profiled(&images(n, s), n, s, s, &mut p)
                .unwrap();
        }
        let calls: usize = p.shapes().iter().map(|s| s.calls).sum();
        assert_eq!(calls, 2 * 53);
        let conv_kinds = [
            LayerKind::Stem,
            LayerKind::Conv1x1,
            LayerKind::Conv3x3,
            LayerKind::Downsample,
        ];
        let kinds: f64 = conv_kinds.iter().map(|&k| p.flops(k)).sum();
        let shapes: f64 = p.shapes().iter().map(|s| s.flops).sum();
        assert_eq!(shapes, kinds);
        // At 32 px layer1 runs at 8×8: its expand layers add the residual, its reduce
        // layers do not; layer4 runs at 1×1.
        let find = |shape: &str| p.shapes().iter().find(|s| s.shape == shape);
        let expand = find("conv 1x1 8x8x64 -> 8x8x256 + residual").unwrap();
        assert_eq!(expand.calls, 2 * 3);
        assert_eq!(find("conv 1x1 8x8x256 -> 8x8x64").unwrap().calls, 2 * 2);
        assert_eq!(find("conv 1x1 1x1x2048 -> 1x1x512").unwrap().calls, 2 * 2);
        let table = format!("{p:#}");
        assert!(table.contains("convolution shape") && table.contains(&expand.shape));
        assert!(!format!("{p}").contains("convolution shape"));
        let empty = format!("{:#}", Profile::default());
        assert!(!empty.contains("NaN") && empty.contains("0.0%"), "{empty}");
    }

    /// The transpose to NHWC, in pieces that start and end anywhere: runs cut at image
    /// ends (35 pixels each) and at the piece's end, against the plain index formula.
    #[test]
    fn nchw_to_nhwc_in_pieces_matches_the_formula() {
        let (b, c, h, w) = (3, 3, 5, 7);
        let src: Vec<f32> = (0..b * c * h * w).map(|i| i as f32 * 0.5 - 7.0).collect();
        let want: Vec<f32> = (0..b * h * w * c)
            .map(|j| {
                let (p, ch) = (j / c, j % c);
                src[(p / (h * w) * c + ch) * h * w + p % (h * w)]
            })
            .collect();
        for cut in [0, 1, 34, 35, 36, 70, 104, 105] {
            let mut got = vec![f32::NAN; want.len()];
            let (head, tail) = got.split_at_mut(cut * c);
            nchw_to_nhwc::<_, 3>(&src, (h, w), (0, head), |v| v);
            nchw_to_nhwc::<_, 3>(&src, (h, w), (cut, tail), |v| v);
            assert_eq!(got, want, "cut at pixel {cut}");
        }
    }

    /// Slicing the first stages ([`Slicing`]) gives the same features bit for bit, with
    /// uneven slices too, and the profile still counts each layer once per pass.
    #[test]
    fn slices_of_the_batch_change_no_bit() {
        let (n, s) = (5, 32);
        let x = images(n, s);
        for precision in [Precision::F32, Precision::Bf16] {
            let mut model =
                FastResNet::with_arch(synthetic(), &Arch::default(), precision, Isa::detect())
                    .unwrap();
            let whole = model.forward(&x, n, s, s).unwrap();
            assert_eq!(
                model.slicing(n, s, s).images,
                n,
                "{precision}: the default budget holds it all"
            );
            // At 32 px layer1 writes 8×8×256 values per image, layer2 at most 8×8×128:
            // a budget of 5 × the latter slices layer1 alone, in slices of 3 and 2 images.
            let value = if precision == Precision::Bf16 { 2 } else { 4 };
            model.set_slice_bytes(n * 8 * 8 * 128 * value);
            let slicing = model.slicing(n, s, s);
            assert_eq!(
                slicing,
                Slicing {
                    blocks: 3,
                    images: 3
                },
                "{precision}"
            );
            let mut p = Profile::default();
            let sliced = model.forward_profiled(&x, n, s, s, &mut p).unwrap();
            assert!(sliced == whole, "{precision}: slicing changed the features");
            let calls: usize = p.shapes().iter().map(|s| s.calls).sum();
            assert_eq!(calls, 53, "{precision}");
            // 0: one image per slice, through every block.
            model.set_slice_bytes(0);
            let slicing = model.slicing(n, s, s);
            let all = Slicing {
                blocks: 16,
                images: 1,
            };
            assert_eq!(slicing, all, "{precision}");
            assert!(model.forward(&x, n, s, s).unwrap() == whole, "{precision}");
        }
        // Basic blocks (ResNet-18) too, one image per slice.
        let arch = Arch::RESNET18;
        let sd = StateDict::from_tensors(
            "synthetic",
            weights::synthetic_state_dict_of(&arch).unwrap(),
        );
        let mut model = FastResNet::with_arch(sd, &arch, Precision::F32, Isa::detect()).unwrap();
        let whole = model.forward(&x, n, s, s).unwrap();
        model.set_slice_bytes(0);
        assert_eq!(model.slicing(n, s, s).blocks, 8);
        assert!(model.forward(&x, n, s, s).unwrap() == whole, "resnet18");
    }

    /// The whole bf16 dataflow — the stem's input rounded to bf16, k padded to AMX's 32, bf16
    /// max pool, residuals and average pool — on the AMX and `vdpbf16ps` blockings with
    /// their instructions' arithmetic in plain Rust: features within cosine 0.999 of f32's.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_network_on_the_native_blockings_agrees_with_f32() {
        let arch = Arch::default();
        let (n, s) = (2, 48);
        let x = images(n, s);
        let f32_model =
            FastResNet::with_arch(synthetic(), &arch, Precision::F32, Isa::detect()).unwrap();
        let want = f32_model.forward(&x, n, s, s).unwrap();
        for tiling in [gemm::emulated_amx_tiling(), gemm::emulated_dpbf16_tiling()] {
            let model = FastResNet::with_tiling(
                synthetic(),
                &arch,
                Precision::Bf16,
                Isa::Portable,
                (tiling, Algorithm::Direct),
            )
            .unwrap();
            assert!(model.native_bf16());
            let got = model.forward(&x, n, s, s).unwrap();
            assert_ne!(got, want, "bf16 must round");
            for i in 0..n {
                let c = cosine(
                    &got[i * 2048..(i + 1) * 2048],
                    &want[i * 2048..(i + 1) * 2048],
                );
                assert!(c >= 0.999, "{tiling:?} image {i}: cosine {c}");
            }
        }
    }

    /// The bf16 blocking changes no bit of the features: blocks of one tile of rows with
    /// every output streamed, and blocks as large as the layer with none, against the
    /// defaults, on this CPU's bf16 kernel and the emulated AMX blocking.
    #[test]
    fn bf16_blocking_changes_no_feature() {
        let arch = Arch::default();
        let (n, s) = (2, 40);
        let x = images(n, s);
        let isa = Isa::detect();
        for tiling in [Tiling::new(isa, true), gemm::emulated_amx_tiling()] {
            let how = (tiling, Algorithm::Direct);
            let mut model =
                FastResNet::with_tiling(synthetic(), &arch, Precision::Bf16, isa, how).unwrap();
            assert_eq!(model.bf16_blocking(), Bf16Blocking::default());
            let want = model.forward(&x, n, s, s).unwrap();
            for spec in ["a=1,rows=1,stream=0", "a=1G,rows=1000000,stream=inf"] {
                model.set_bf16_blocking(spec.parse().unwrap());
                let got = model.forward(&x, n, s, s).unwrap();
                assert!(got == want, "{tiling:?} with {spec}: features differ");
            }
        }
    }

    /// A measurement, not a check (`cargo test --release --lib products_cost_nothing --
    /// --ignored --nocapture`): the bf16 dataflow on AMX's blocking with products that cost
    /// nothing — so packing, epilogues and pooling alone — at batch 16, 224 px. On any CPU
    /// its images/s bound what AMX can reach on a machine like it: where that bound is low,
    /// the AMX kernel is not what limits.
    #[test]
    #[ignore = "a measurement: run it with --release --ignored --nocapture"]
    fn bf16_dataflow_when_the_products_cost_nothing() {
        let (n, s, passes) = (16, 224, 5);
        let x = images(n, s);
        let t = gemm::free_products_tiling();
        let model = FastResNet::with_tiling(
            synthetic(),
            &Arch::default(),
            Precision::Bf16,
            Isa::Portable,
            (t, Algorithm::Direct),
        )
        .unwrap();
        model.forward(&x, n, s, s).unwrap();
        let mut profile = Profile::default();
        let mut secs: Vec<f64> = (0..passes)
            .map(|_| {
                let start = Instant::now();
                model.forward_profiled(&x, n, s, s, &mut profile).unwrap();
                start.elapsed().as_secs_f64()
            })
            .collect();
        secs.sort_by(f64::total_cmp);
        eprintln!(
            "bf16 dataflow, products free, {} threads: {:.1} images/s (median of {passes} passes \
             of {n})\n{profile:#}",
            model.threads(),
            n as f64 / secs[passes / 2]
        );
    }
}
