//! Winograd's minimal filtering F(m×m, 3×3) for the 3×3, stride-1 convolutions of the f32
//! dataflow (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016),
//! with m = 2 or 4 ([`Tile`]).
//!
//! Each m×m block of output pixels comes from the α×α input tile `d` around it (α = m + 2)
//! as `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: α² products per (input, output) channel pair instead
//! of the direct convolution's 9·m², 2.25× fewer for F(2×2), 4× for F(4×4). Over T tiles
//! that is
//! * an input transform writing `V[ξ] = (Bᵀ d B)[ξ]`, ξ ∈ 0..α², as α² matrices
//!   `[T, cin]`, channels contiguous as NHWC holds them;
//! * α² matrix products `M[ξ] = V[ξ] · U[ξ]` on the packed kernels of every other layer (the
//!   f32 [`conv`] as a 1×1 convolution), `U[ξ] = (G g Gᵀ)[ξ]` `[cin, cout]` transformed in
//!   f64 and packed once, at load;
//! * an output transform `Aᵀ M A` fused with the layer's epilogue: bias, residual, ReLU.
//!
//! Narrow layers run the three steps on blocks of tiles, each block on one worker while it
//! is in that core's cache; wide ones run each step over the whole layer ([`FUSED_BELOW`]).
//! The transforms are lane-by-lane multiply-adds, compiled for the kernel's vector width.
//!
//! F(2×2)'s coefficients are 0, ±1 and ±½, exact in binary: its results differ from the
//! direct convolution's by the rounding of a few more additions. F(4×4)'s transformed values
//! grow larger than the pixels they come from and round accordingly: per layer 5–7× the
//! direct product's error on the points chosen ([`Tile::F4`]), though over a whole network
//! the difference stays of the same order as F(2×2)'s (the tests print both; ResNet-18's
//! features at 224 px with F(4×4) on every layer: 4.8e-7 relative to PyTorch's, against
//! 3.2e-7). Layers under [`F4_BELOW`] channels take F(4×4) by default, wider ones F(2×2)
//! (`Algorithm::Winograd`); `Algorithm::Winograd2` is F(2×2) everywhere. bf16 keeps the
//! direct products: its operands' 8 bits would round the transformed values, and its native
//! kernels are fast already.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use super::{
    AlignedBuf, ConvGeom, Kernel, Lens, PackedB, SharedPtr, Source, Tiling, Workers, check_buffers,
    conv,
};
use crate::error::{Error, Result};

/// Channels transformed together: fixed-size arrays the compiler keeps in vector registers.
const LANES: usize = 16;

/// Layers with fewer input channels run fused, a block of tiles at a time on each worker:
/// input transform, α² products and output transform while the block is in cache. Wider
/// ones transform the whole layer, then run α² products over all its tiles: their weights
/// (`α² · cin · cout` values, 16 MiB at 512 channels for F(2×2)) would be read again for
/// every block.
/// Against the direct product on an Ice Lake (ResNet-50, batch 16, 224 px): 56×56×64 layers
/// ran 1.6× slower whole-layer (their transforms moved 4× the activations through memory),
/// 1.4× faster fused; 7×7×512 1.45× faster whole-layer, 1.1–1.2× fused; 14×14×256 1.5×
/// faster either way.
const FUSED_BELOW: usize = 256;

/// The bytes of one fused block's `V` and `M` together: in a core's L2 beside the weights
/// (on the Ice Lake, 256 KiB and 1 MiB ran the narrow layers slower).
const BLOCK_BYTES: usize = 512 << 10;

/// A 3×3, stride-1, pad-1 convolution's weights transformed to Winograd's domain and packed:
/// α² matrices `U[ξ]` `[cin, cout]`, each packed as a 1×1 convolution for the f32 kernels.
#[derive(Debug)]
pub(crate) struct Winograd {
    /// `U[ξ]`, ξ = α·row + column of the α×α transformed kernel.
    packed: Vec<PackedB>,
    /// The tiling the weights were transformed for.
    tile: Tile,
    /// Whether the layer runs fused, a block of tiles at a time ([`FUSED_BELOW`]).
    fused: bool,
    /// The 3×3 convolution these weights compute.
    geom: ConvGeom,
    /// `max(cin, cout)` zeros: the padding's input pixels and the products' (null) bias.
    zeros: Vec<f32>,
}

/// The first `lanes` values of `src` into `dst`: a whole vector copy when `lanes` is
/// [`LANES`] (every ResNet width), which the compiler inlines, unlike a copy of variable
/// length, which calls `memcpy`.
#[inline(always)]
fn load(dst: &mut Lanes, src: &[f32], lanes: usize) {
    if lanes == LANES {
        dst.0.copy_from_slice(&src[..LANES]);
    } else {
        dst.0[..lanes].copy_from_slice(&src[..lanes]);
    }
}

/// The first `lanes` values of `src` to `dst`, as [`load`].
///
/// # Safety
/// `dst` is valid for `lanes` writes.
#[inline(always)]
unsafe fn store(src: &Lanes, dst: *mut f32, lanes: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if lanes == LANES {
            dst.copy_from_nonoverlapping(src.0.as_ptr(), LANES);
        } else {
            dst.copy_from_nonoverlapping(src.0.as_ptr(), lanes);
        }
    }
}

/// The largest input tile, F(4×4, 3×3)'s 6×6: the size of the per-tile buffers.
const MAX_TILE: usize = 36;

/// Winograd's tiling F(m×m, 3×3): m×m output pixels from an α×α input tile, α = m + 2,
/// through α² products. Its three matrices come from the Toom-Cook construction on α − 1
/// points and ∞; the tests rebuild them from the points and check the code's below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tile {
    /// F(2×2, 3×3) on the points 0, 1, −1: α² = 16 products per 4 output pixels (2.25×
    /// fewer than direct), coefficients 0, ±1, ±½, exact in binary.
    F2,
    /// F(4×4, 3×3) on the points 0, 1, −1, ½, −2: 36 products per 16 output pixels (4×
    /// fewer than direct). Of the point sets tried it rounded least, half as much as Lavin
    /// and Gray's 0, ±1, ±2 (on choosing points: Barabasz et al., "Error analysis and
    /// improving the accuracy of Winograd convolution for deep neural networks", 2020);
    /// still 5–7× the direct product's rounding error per layer, where F(2×2) adds almost
    /// none.
    F4,
}

/// Layers with fewer input channels take F(4×4) by default ([`Tile::of`]), wider ones
/// F(2×2): F(4×4)'s weights take 36 · cin · cout values, 38 MiB at 512 channels. On an Ice
/// Lake (`winograd_layer_timings`, 2026-12-04), F(4×4) ran ResNet-50's 56×56×64 layers 1.2×
/// and its 28×28×128 ones 1.1× faster than F(2×2), its 14×14×256 ones alike (fused) and its
/// 7×7×512 ones 1.2× faster. Over the network, medians of 61 interleaved passes against
/// F(2×2) everywhere: this default ran ResNet-18 1.10×, ResNet-34 1.11× and ResNet-50 1.01×
/// as fast for 15 MiB more (ResNet-50); F(4×4) everywhere ran ResNet-50 1.08× as fast, within
/// the host's noise of that, for 67 MiB more, and would take ~650 MiB more for Wide
/// ResNet-101-2, most of it in layers of 512 channels and more.
const F4_BELOW: usize = 512;

impl Tile {
    /// The default tiling for `g`: F(4×4) under [`F4_BELOW`] input channels, else F(2×2).
    pub fn of(g: &ConvGeom) -> Tile {
        if g.cin < F4_BELOW { Tile::F4 } else { Tile::F2 }
    }

    /// Output pixels per tile side.
    pub fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// `G` (`α × 3`), which transforms a kernel axis: `u = G g`.
    fn g(self) -> &'static [[f64; 3]] {
        const THIRD: f64 = 1.0 / 3.0;
        match self {
            Tile::F2 => &[
                [1.0, 0.0, 0.0],
                [0.5, 0.5, 0.5],
                [0.5, -0.5, 0.5],
                [0.0, 0.0, 1.0],
            ],
            Tile::F4 => &[
                [1.0, 0.0, 0.0],
                [THIRD, THIRD, THIRD],
                [-THIRD, THIRD, -THIRD],
                [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
                [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
                [0.0, 0.0, 1.0],
            ],
        }
    }
}

/// [`LANES`] channels of one pixel.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Lanes([f32; LANES]);

impl Lanes {
    const ZERO: Lanes = Lanes([0.0; LANES]);
}

/// The per-tile transforms of one [`Tile`] along one axis, written out term by term (a
/// matrix product would multiply by its zeros); each value is rounded as the operations are
/// written, so results are the same bits at any vector width.
trait Transforms {
    /// Input pixels per tile side.
    const ALPHA: usize;
    /// Output pixels per tile side.
    const M: usize;
    /// `Bᵀ x` along one axis of an input tile (`ALPHA` values, the rest zeros).
    fn bt(x: [f32; 6]) -> [f32; 6];
    /// `Aᵀ x` along one axis of a product tile (`ALPHA` values in, `M` out).
    fn at(x: [f32; 6]) -> [f32; 4];
}

/// [`Tile::F2`]'s transforms.
struct F2;

impl Transforms for F2 {
    const ALPHA: usize = 4;
    const M: usize = 2;

    #[inline(always)]
    fn bt(x: [f32; 6]) -> [f32; 6] {
        [x[0] - x[2], x[1] + x[2], x[2] - x[1], x[1] - x[3], 0.0, 0.0]
    }

    #[inline(always)]
    fn at(x: [f32; 6]) -> [f32; 4] {
        [x[0] + x[1] + x[2], x[1] - x[2] - x[3], 0.0, 0.0]
    }
}

/// [`Tile::F4`]'s transforms.
struct F4;

impl Transforms for F4 {
    const ALPHA: usize = 6;
    const M: usize = 4;

    #[inline(always)]
    fn bt(x: [f32; 6]) -> [f32; 6] {
        // Bᵀ's rows: [1, −3/2, −2, 3/2, 1, 0], [0, −1, 1/2, 5/2, 1, 0], [0, 1, −5/2, 1/2, 1, 0],
        // [0, −2, −1, 2, 1, 0], [0, 1/2, −1, −1/2, 1, 0], [0, 1, −3/2, −2, 3/2, 1].
        [
            x[0] - x[1] * 1.5 - x[2] * 2.0 + x[3] * 1.5 + x[4],
            x[2] * 0.5 - x[1] + x[3] * 2.5 + x[4],
            x[1] - x[2] * 2.5 + x[3] * 0.5 + x[4],
            x[3] * 2.0 - x[1] * 2.0 - x[2] + x[4],
            x[1] * 0.5 - x[2] - x[3] * 0.5 + x[4],
            x[1] - x[2] * 1.5 - x[3] * 2.0 + x[4] * 1.5 + x[5],
        ]
    }

    #[inline(always)]
    fn at(x: [f32; 6]) -> [f32; 4] {
        // Aᵀ's rows: the points' powers 0 to 3 ((1, 1, 1, 1, 1), (0, 1, −1, 1/2, −2), …) and
        // ∞'s 1 in the last.
        [
            x[0] + x[1] + x[2] + x[3] + x[4],
            x[1] - x[2] + x[3] * 0.5 - x[4] * 2.0,
            x[1] + x[2] + x[3] * 0.25 + x[4] * 4.0,
            x[1] - x[2] + x[3] * 0.125 - x[4] * 8.0 + x[5],
        ]
    }
}

/// `Bᵀ d B`: `d` holds the tile's pixel (i, j) in row α·i + j, `v` gets `V[ξ]` in row
/// ξ = α·i + j. One loop over the lanes with scalar temporaries in fixed-size arrays, the
/// form the compiler unrolls and turns into whole-vector operations on registers (closures
/// or arrays of vectors made it spill and call `memcpy`).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn input_transform<T: Transforms>(d: &[Lanes; MAX_TILE], v: &mut [Lanes; MAX_TILE]) {
    let a = T::ALPHA;
    for l in 0..LANES {
        // Bᵀ d, down each column j of the tile: t[j][i].
        let mut t = [[0f32; 6]; 6];
        for j in 0..a {
            let mut column = [0f32; 6];
            for i in 0..a {
                column[i] = d[a * i + j].0[l];
            }
            t[j] = T::bt(column);
        }
        // · B, along each row i.
        for i in 0..a {
            let mut row = [0f32; 6];
            for j in 0..a {
                row[j] = t[j][i];
            }
            let row = T::bt(row);
            for j in 0..a {
                v[a * i + j].0[l] = row[j];
            }
        }
    }
}

/// `Aᵀ M A`: `p` holds `M[ξ]` in row ξ, `y` gets the output pixel (i, j) of the tile in row
/// m·i + j; written as [`input_transform`].
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn output_transform<T: Transforms>(p: &[Lanes; MAX_TILE], y: &mut [Lanes; 16]) {
    let (a, m) = (T::ALPHA, T::M);
    for l in 0..LANES {
        let mut t = [[0f32; 4]; 6];
        for j in 0..a {
            let mut column = [0f32; 6];
            for i in 0..a {
                column[i] = p[a * i + j].0[l];
            }
            t[j] = T::at(column);
        }
        for i in 0..m {
            let mut row = [0f32; 6];
            for j in 0..a {
                row[j] = t[j][i];
            }
            let row = T::at(row);
            for j in 0..m {
                y[m * i + j].0[l] = row[j];
            }
        }
    }
}

/// Where a layer's tiles are: T tiles of 2×2 output pixels, `th × tw` per image of `h × w`.
#[derive(Debug, Clone, Copy)]
struct Grid {
    tiles: usize,
    th: usize,
    tw: usize,
    h: usize,
    w: usize,
}

/// What the output transform adds and clamps: bias, residual, ReLU.
type Finish<'a> = (&'a [f32], Option<&'a [f32]>, bool);

/// Where the transformed tiles `range` of a layer are in a buffer of `V` or `M`: `ξ` after
/// `ξ` (each `rows` rows), tile `range.start` at row `first`.
#[derive(Debug, Clone)]
struct Rows {
    range: Range<usize>,
    rows: usize,
    first: usize,
}

impl Rows {
    /// The row of tile `tile` in matrix `xi`.
    #[inline(always)]
    fn of(&self, xi: usize, tile: usize) -> usize {
        xi * self.rows + self.first + (tile - self.range.start)
    }
}

/// The buffers of the Winograd layers: the whole layer's transformed input `V` and products
/// `M` (wide layers), or one block's per worker (narrow ones, [`FUSED_BELOW`]).
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    v: AlignedBuf,
    m: AlignedBuf,
    /// Per worker: a block's `V`, its `M`.
    blocks: Vec<[AlignedBuf; 2]>,
}

impl Winograd {
    /// Whether `g` is a convolution this module computes: 3×3, stride 1, padding 1.
    pub fn fits(g: &ConvGeom) -> bool {
        g.ksize == 3 && g.stride == 1 && g.pad == 1
    }

    /// Tiles per fused block: `V` and `M` of a block in [`BLOCK_BYTES`], a multiple of 12
    /// (whole 4- and 6-row panels).
    fn block_tiles(&self) -> usize {
        let bytes_per_tile = self.packed.len() * 4 * (self.geom.cin + self.geom.cout);
        (BLOCK_BYTES / bytes_per_tile / 12 * 12).max(12)
    }

    /// Transforms `w` (`[cout, cin, 3, 3]`, PyTorch's layout) for Winograd's `tile` and packs
    /// it for the f32 tiling `t`. Errors for another geometry, a bf16 tiling or a wrong number
    /// of weights.
    pub fn new(w: &[f32], g: &ConvGeom, t: &Tiling, tile: Tile) -> Result<Winograd> {
        if !Self::fits(g) || t.bf16_act() || w.len() != g.cout * g.k() {
            return Err(Error::invalid(
                "Winograd convolution weights",
                format!(
                    "{} values for {g:?} on a {} tiling (need a 3×3 stride-1 pad-1 f32 \
                     convolution, {} values)",
                    w.len(),
                    if t.bf16_act() { "bf16" } else { "f32" },
                    g.cout * g.k()
                ),
            ));
        }
        let (cin, cout, gm) = (g.cin, g.cout, tile.g());
        let a = gm.len();
        // `G v` for one axis of 3 taps (α values, the rest zeros).
        let g_axis = |v: [f64; 3]| -> [f64; 6] {
            let mut u = [0.0; 6];
            for (u, r) in u.iter_mut().zip(gm) {
                *u = r[0] * v[0] + r[1] * v[1] + r[2] * v[2];
            }
            u
        };
        // u[ξ][co · cin + ci]: each ξ is the weight of a 1×1 convolution cin → cout.
        let mut u = vec![vec![0f32; cout * cin]; a * a];
        for co in 0..cout {
            for ci in 0..cin {
                let k = &w[(co * cin + ci) * 9..][..9];
                let kernel = |ky: usize, kx: usize| f64::from(k[ky * 3 + kx]);
                // G g: the rows of the kernel, transformed down each column.
                let cols = [0, 1, 2].map(|kx| g_axis([0, 1, 2].map(|ky| kernel(ky, kx))));
                for (i, row) in u.chunks_mut(a).enumerate() {
                    // (G g) Gᵀ: row i transformed along the kernel's columns.
                    let t = g_axis([cols[0][i], cols[1][i], cols[2][i]]);
                    for (j, m) in row.iter_mut().enumerate() {
                        m[co * cin + ci] = t[j] as f32;
                    }
                }
            }
        }
        let pointwise = ConvGeom {
            ksize: 1,
            pad: 0,
            ..*g
        };
        Ok(Winograd {
            packed: u
                .iter()
                .map(|m| PackedB::new(m, &pointwise, t))
                .collect::<Result<_>>()?,
            tile,
            fused: g.cin < FUSED_BELOW,
            geom: *g,
            zeros: vec![0.0; cin.max(cout)],
        })
    }

    /// The 3×3 convolution computed.
    pub fn geom(&self) -> ConvGeom {
        self.geom
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.packed.iter().map(PackedB::bytes).sum::<usize>() + self.zeros.len() * 4
    }

    /// The Winograd tiling the weights were transformed for.
    pub fn tile(&self) -> Tile {
        self.tile
    }

    /// Tiles of a `[batch, h, w]` input: m×m output blocks, the last row and column of
    /// blocks partial where m does not divide the size.
    fn tiles(&self, batch: usize, h: usize, w: usize) -> (usize, usize, usize) {
        let m = self.tile.m();
        (
            batch * h.div_ceil(m) * w.div_ceil(m),
            h.div_ceil(m),
            w.div_ceil(m),
        )
    }

    /// The convolution of `src` into `out` (`[batch, h, w, cout]`): bias, then `residual`
    /// when given, then ReLU when `relu`, as [`conv`] computes it directly; `t` is the f32
    /// tiling the weights were packed for, `scratch` one packing buffer per worker, `bufs`
    /// grown as needed. Results do not depend on the number of workers or on the fusion.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &self,
        src: &Source,
        bias: &[f32],
        t: &Tiling,
        out: &mut [f32],
        residual: Option<&[f32]>,
        relu: bool,
        workers: &Workers,
        scratch: &mut [AlignedBuf],
        bufs: &mut Buffers,
        pack_ns: Option<&AtomicU64>,
    ) -> Result<()> {
        let g = &self.geom;
        let (batch, h, w) = (src.batch, src.h, src.w);
        let lens = Lens {
            input: src.data.len(),
            output: out.len(),
            bias: bias.len(),
            residual: residual.map(<[f32]>::len),
            scratch: scratch.len(),
        };
        // The same sizes as the direct convolution's (this one's output is the input's size).
        if check_buffers("Winograd ", g, (batch, h, w, src.c), lens, workers.threads)? == 0 {
            return Ok(());
        }
        let (tiles, th, tw) = self.tiles(batch, h, w);
        let grid = Grid {
            tiles,
            th,
            tw,
            h,
            w,
        };
        let scratch = &mut scratch[..workers.threads];
        let out = SharedPtr(out.as_mut_ptr());
        let ep = (bias, residual, relu);
        if self.fused {
            self.fused(src, &grid, ep, t, out, workers, scratch, &mut bufs.blocks)
        } else {
            self.whole(src, &grid, ep, t, out, workers, scratch, bufs, pack_ns)
        }
    }

    /// The whole layer's `V`, then each of the α² products over all its tiles, then the
    /// output transform (wide layers).
    #[allow(clippy::too_many_arguments)]
    fn whole(
        &self,
        src: &Source,
        grid: &Grid,
        ep: Finish,
        t: &Tiling,
        out: SharedPtr,
        workers: &Workers,
        scratch: &mut [AlignedBuf],
        bufs: &mut Buffers,
        pack_ns: Option<&AtomicU64>,
    ) -> Result<()> {
        let (cin, cout, tiles) = (self.geom.cin, self.geom.cout, grid.tiles);
        let a2 = self.packed.len();
        bufs.v.ensure(a2 * tiles * cin);
        bufs.m.ensure(a2 * tiles * cout);
        let rows = |range: Range<usize>| Rows {
            first: range.start,
            range,
            rows: tiles,
        };
        let vp = SharedPtr(bufs.v.as_mut_slice().as_mut_ptr());
        workers.ranges(tiles, |range| {
            // SAFETY: `v` holds α² · T · cin values (ensured above) and the ranges are
            // disjoint.
            unsafe { self.input(t, src, grid, &rows(range), vp.get()) };
        });
        let (vs, ms) = (bufs.v.as_slice(), bufs.m.as_mut_slice());
        self.products((vs, ms), tiles, t, workers, scratch, pack_ns)?;
        let ms = bufs.m.as_slice();
        workers.ranges(tiles, |range| {
            // SAFETY: `out` holds the [batch, h, w, cout] output (checked by `conv`) and
            // the ranges are disjoint.
            unsafe { self.output(t, ms, ep, grid, &rows(range), out.get()) };
        });
        Ok(())
    }

    /// The α² products `M[ξ] = V[ξ] · U[ξ]` of `rows` tiles: `vs` holds the `V[ξ]` one after
    /// the other (`[rows, cin]` each), `ms` gets the `M[ξ]` likewise (`[rows, cout]`).
    #[allow(clippy::too_many_arguments)]
    fn products(
        &self,
        (vs, ms): (&[f32], &mut [f32]),
        rows: usize,
        t: &Tiling,
        workers: &Workers,
        scratch: &mut [AlignedBuf],
        pack_ns: Option<&AtomicU64>,
    ) -> Result<()> {
        let (cin, cout) = (self.geom.cin, self.geom.cout);
        for (xi, b) in self.packed.iter().enumerate() {
            let a = Source {
                data: &vs[xi * rows * cin..][..rows * cin],
                batch: 1,
                h: rows,
                w: 1,
                c: cin,
            };
            let mo = &mut ms[xi * rows * cout..][..rows * cout];
            let zeros = &self.zeros[..cout];
            conv(&a, b, zeros, t, mo, None, false, workers, scratch, pack_ns)?;
        }
        Ok(())
    }

    /// Blocks of tiles handed out to the workers, each transformed, multiplied and
    /// transformed back in the worker's own buffers (narrow layers).
    #[allow(clippy::too_many_arguments)]
    fn fused(
        &self,
        src: &Source,
        grid: &Grid,
        ep: Finish,
        t: &Tiling,
        out: SharedPtr,
        workers: &Workers,
        scratch: &mut [AlignedBuf],
        blocks: &mut Vec<[AlignedBuf; 2]>,
    ) -> Result<()> {
        let (cin, cout, tiles) = (self.geom.cin, self.geom.cout, grid.tiles);
        let a2 = self.packed.len();
        let per = self.block_tiles();
        let count = tiles.div_ceil(per);
        blocks.resize_with(scratch.len(), Default::default);
        let mut state: Vec<_> = scratch.iter_mut().zip(blocks.iter_mut()).collect();
        let (next, failed) = (AtomicUsize::new(0), Mutex::new(None));
        workers.each(&mut state, count > 1, |(pack, [v, m])| {
            v.ensure(a2 * per * cin);
            m.ensure(a2 * per * cout);
            let one = Workers::single();
            loop {
                let block = next.fetch_add(1, Ordering::Relaxed);
                if block >= count {
                    return;
                }
                let range = block * per..((block + 1) * per).min(tiles);
                let n = range.len();
                let rows = Rows {
                    range,
                    rows: n,
                    first: 0,
                };
                // SAFETY: `v` holds α² · per ≥ α² · n rows of cin values (ensured above);
                // the block is this worker's alone.
                unsafe { self.input(t, src, grid, &rows, v.as_mut_slice().as_mut_ptr()) };
                let (vs, ms) = (v.as_slice(), m.as_mut_slice());
                let pack = std::slice::from_mut(&mut **pack);
                if let Err(e) = self.products((vs, ms), n, t, &one, pack, None) {
                    *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    return;
                }
                // SAFETY: `out` holds the [batch, h, w, cout] output (checked by `conv`);
                // the block's pixels are this worker's alone.
                unsafe { self.output(t, m.as_slice(), ep, grid, &rows, out.get()) };
            }
        });
        match failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`Winograd::input_tiles`] compiled for the widest vectors of `t`'s kernel (the
    /// transforms add and subtract lane by lane: the same bits at any width).
    ///
    /// # Safety
    /// As [`Winograd::input_tiles`].
    unsafe fn input(&self, t: &Tiling, src: &Source, grid: &Grid, rows: &Rows, v: *mut f32) {
        // SAFETY: (every call) forwarded from the caller; a kernel's token proves this CPU
        // runs its instruction set.
        unsafe {
            match t.kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512(_) => self.input_avx512(src, grid, rows, v),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2(_) => self.input_avx2(src, grid, rows, v),
                _ => self.input_tiles(src, grid, rows, v),
            }
        }
    }

    /// [`Winograd::output_tiles`] compiled for the widest vectors of `t`'s kernel.
    ///
    /// # Safety
    /// As [`Winograd::output_tiles`].
    unsafe fn output(
        &self,
        t: &Tiling,
        m: &[f32],
        ep: Finish,
        grid: &Grid,
        rows: &Rows,
        out: *mut f32,
    ) {
        // SAFETY: as in `input`.
        unsafe {
            match t.kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512(_) => self.output_avx512(m, ep, grid, rows, out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2(_) => self.output_avx2(m, ep, grid, rows, out),
                _ => self.output_tiles(m, ep, grid, rows, out),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn input_avx512(&self, src: &Source, grid: &Grid, rows: &Rows, v: *mut f32) {
        // SAFETY: forwarded.
        unsafe { self.input_tiles(src, grid, rows, v) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn input_avx2(&self, src: &Source, grid: &Grid, rows: &Rows, v: *mut f32) {
        // SAFETY: forwarded.
        unsafe { self.input_tiles(src, grid, rows, v) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn output_avx512(&self, m: &[f32], ep: Finish, grid: &Grid, rows: &Rows, out: *mut f32) {
        // SAFETY: forwarded.
        unsafe { self.output_tiles(m, ep, grid, rows, out) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn output_avx2(&self, m: &[f32], ep: Finish, grid: &Grid, rows: &Rows, out: *mut f32) {
        // SAFETY: forwarded.
        unsafe { self.output_tiles(m, ep, grid, rows, out) }
    }

    /// Writes `V[ξ]`'s rows of the tiles `range` of `src` into `v` (`[α², T, cin]`).
    ///
    /// # Safety
    /// `v` holds `α² · T · cin` values; no other thread writes the rows of these tiles.
    #[inline(always)]
    unsafe fn input_tiles(&self, src: &Source, grid: &Grid, rows: &Rows, v: *mut f32) {
        // SAFETY: (both) forwarded.
        unsafe {
            match self.tile {
                Tile::F2 => self.input_tiles_of::<F2>(src, grid, rows, v),
                Tile::F4 => self.input_tiles_of::<F4>(src, grid, rows, v),
            }
        }
    }

    /// [`Winograd::input_tiles`] for the transforms `T` (the weights' tile).
    ///
    /// # Safety
    /// As [`Winograd::input_tiles`].
    #[inline(always)]
    unsafe fn input_tiles_of<T: Transforms>(
        &self,
        src: &Source,
        grid: &Grid,
        rows: &Rows,
        v: *mut f32,
    ) {
        let Grid { th, tw, h, w, .. } = *grid;
        let (cin, a, m) = (self.geom.cin, T::ALPHA, T::M);
        let (mut d, mut t) = ([Lanes::ZERO; MAX_TILE], [Lanes::ZERO; MAX_TILE]);
        let mut pixels: [&[f32]; MAX_TILE] = [&self.zeros[..cin]; MAX_TILE];
        for tile in rows.range.clone() {
            let (n, ty, tx) = (tile / (th * tw), tile / tw % th, tile % tw);
            // The α² input pixels of the tile (zeros outside the image).
            for (p, px) in pixels.iter_mut().enumerate().take(a * a) {
                let (iy, ix) = ((m * ty + p / a) as isize - 1, (m * tx + p % a) as isize - 1);
                *px = if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                    &self.zeros[..cin]
                } else {
                    &src.data[((n * h + iy as usize) * w + ix as usize) * cin..][..cin]
                };
            }
            for c0 in (0..cin).step_by(LANES) {
                let lanes = LANES.min(cin - c0);
                for (row, px) in d.iter_mut().zip(&pixels).take(a * a) {
                    load(row, &px[c0..], lanes);
                }
                input_transform::<T>(&d, &mut t);
                for (xi, vals) in t.iter().enumerate().take(a * a) {
                    let at = rows.of(xi, tile) * cin + c0;
                    // SAFETY: ξ < α², tile < T and c0 + lanes ≤ cin: inside `v`.
                    unsafe { store(vals, v.add(at), lanes) };
                }
            }
        }
    }

    /// Writes the output pixels of the tiles `range` from the products `m` (`[α², T,
    /// cout]`) into `out` (`[batch, h, w, cout]`): `Aᵀ M A`, + bias, + residual, then ReLU
    /// when asked (`ep`).
    ///
    /// # Safety
    /// `out` holds the `[batch, h, w, cout]` output; no other thread writes these tiles'
    /// pixels; `bias` holds `cout` values, `residual` the whole output.
    #[inline(always)]
    unsafe fn output_tiles(&self, m: &[f32], ep: Finish, grid: &Grid, rows: &Rows, out: *mut f32) {
        // SAFETY: (both) forwarded.
        unsafe {
            match self.tile {
                Tile::F2 => self.output_tiles_of::<F2>(m, ep, grid, rows, out),
                Tile::F4 => self.output_tiles_of::<F4>(m, ep, grid, rows, out),
            }
        }
    }

    /// [`Winograd::output_tiles`] for the transforms `T` (the weights' tile).
    ///
    /// # Safety
    /// As [`Winograd::output_tiles`].
    #[inline(always)]
    unsafe fn output_tiles_of<T: Transforms>(
        &self,
        m: &[f32],
        (bias, residual, relu): Finish,
        grid: &Grid,
        rows: &Rows,
        out: *mut f32,
    ) {
        let Grid { th, tw, h, w, .. } = *grid;
        let (cout, a, mo) = (self.geom.cout, T::ALPHA, T::M);
        let (mut p, mut y) = ([Lanes::ZERO; MAX_TILE], [Lanes::ZERO; 16]);
        for tile in rows.range.clone() {
            let (n, ty, tx) = (tile / (th * tw), tile / tw % th, tile % tw);
            for c0 in (0..cout).step_by(LANES) {
                let lanes = LANES.min(cout - c0);
                for (xi, row) in p.iter_mut().enumerate().take(a * a) {
                    load(row, &m[rows.of(xi, tile) * cout + c0..], lanes);
                }
                output_transform::<T>(&p, &mut y);
                for (k, vals) in y.iter().enumerate().take(mo * mo) {
                    let (oy, ox) = (mo * ty + k / mo, mo * tx + k % mo);
                    if oy >= h || ox >= w {
                        continue;
                    }
                    let at = ((n * h + oy) * w + ox) * cout + c0;
                    let mut px = *vals;
                    for (v, b) in px.0.iter_mut().zip(&bias[c0..c0 + lanes]) {
                        *v += b;
                    }
                    if let Some(r) = residual {
                        for (v, r) in px.0.iter_mut().zip(&r[at..at + lanes]) {
                            *v += r;
                        }
                    }
                    if relu {
                        for v in &mut px.0 {
                            *v = v.max(0.0);
                        }
                    }
                    // SAFETY: the pixel (n, oy, ox) is inside the output and
                    // c0 + lanes ≤ cout.
                    unsafe { store(&px, out.add(at), lanes) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{reference, values};
    use super::*;
    use crate::isa::Isa;

    /// Toom-Cook's matrices for F(m, 3) on the finite `points` and ∞ (α = m + 2 of them):
    /// `Aᵀ` (m × α, the points' powers), `G` (α × 3, the powers over the Lagrange
    /// denominators) and `Bᵀ` (α × α, the coefficients of the Lagrange numerators), in f64.
    #[allow(clippy::type_complexity)]
    fn toom_cook(points: &[f64], m: usize) -> (Vec<Vec<f64>>, Vec<[f64; 3]>, Vec<Vec<f64>>) {
        let a = points.len() + 1;
        assert_eq!(a, m + 2);
        let at = (0..m)
            .map(|i| {
                let mut row: Vec<f64> = points.iter().map(|p| p.powi(i as i32)).collect();
                row.push(if i == m - 1 { 1.0 } else { 0.0 });
                row
            })
            .collect();
        // The coefficients (increasing powers, α of them) of ∏ (x − r) over `roots`.
        let poly = |roots: &mut dyn Iterator<Item = f64>| {
            let mut c = vec![0.0; a];
            c[0] = 1.0;
            for r in roots {
                for i in (0..a).rev() {
                    c[i] = if i > 0 { c[i - 1] } else { 0.0 } - r * c[i];
                }
            }
            c
        };
        let mut g = Vec::new();
        let mut bt = Vec::new();
        for (j, &p) in points.iter().enumerate() {
            let others = || points.iter().enumerate().filter(move |&(l, _)| l != j);
            let n: f64 = others().map(|(_, &q)| p - q).product();
            g.push([1.0 / n, p / n, p * p / n]);
            bt.push(poly(&mut others().map(|(_, &q)| q)));
        }
        g.push([0.0, 0.0, 1.0]);
        bt.push(poly(&mut points.iter().copied()));
        (at, g, bt)
    }

    /// The factor `c` with `row = c · of` (both nonzero in the same places), or a panic
    /// naming `what`.
    fn proportion(row: &[f64], of: &[f64], what: &str) -> f64 {
        let at = of.iter().position(|&x| x != 0.0).expect("a nonzero row");
        let c = row[at] / of[at];
        for (x, y) in row.iter().zip(of) {
            assert!(
                (x - c * y).abs() < 1e-12,
                "{what}: {row:?} is not a multiple of {of:?}"
            );
        }
        c
    }

    /// The written-out transforms are Toom-Cook's matrices for their points, up to the
    /// scaling every point's row of `Bᵀ`, `G` and column of `Aᵀ` may share (their factors
    /// multiplying to 1), and they compute a 3-tap correlation (`y[i] = Σ d[i + k] g[k]`)
    /// to f64 rounding.
    #[test]
    fn transforms_are_toom_cook_on_their_points() {
        fn check<T: Transforms>(tile: Tile, points: &[f64]) {
            let (a, m) = (T::ALPHA, T::M);
            assert_eq!((tile.g().len(), tile.m()), (a, m));
            let (at_tc, g_tc, bt_tc) = toom_cook(points, m);
            // The code's matrices, column k from the unit vector e_k; the padding is zero.
            let unit = |k: usize| std::array::from_fn(|i| if i == k { 1.0 } else { 0.0 });
            let (mut bt, mut at) = (vec![vec![0.0; a]; a], vec![vec![0.0; a]; m]);
            for k in 0..6 {
                let (b, y) = (T::bt(unit(k)), T::at(unit(k)));
                for (i, &x) in b.iter().enumerate() {
                    match (i < a && k < a, x) {
                        (true, x) => bt[i][k] = f64::from(x),
                        (false, 0.0) => {}
                        _ => panic!("{tile:?}: Bᵀ[{i}][{k}] = {x} in the padding"),
                    }
                }
                for (i, &x) in y.iter().enumerate() {
                    match (i < m && k < a, x) {
                        (true, x) => at[i][k] = f64::from(x),
                        (false, 0.0) => {}
                        _ => panic!("{tile:?}: Aᵀ[{i}][{k}] = {x} in the padding"),
                    }
                }
            }
            let g = tile.g();
            for j in 0..a {
                let s = proportion(&bt[j], &bt_tc[j], &format!("{tile:?} Bᵀ row {j}"));
                let t = proportion(&g[j], &g_tc[j], &format!("{tile:?} G row {j}"));
                let column = |m: &[Vec<f64>]| m.iter().map(|r| r[j]).collect::<Vec<_>>();
                let what = format!("{tile:?} Aᵀ column {j}");
                let r = proportion(&column(&at), &column(&at_tc), &what);
                assert!(
                    (s * t * r - 1.0).abs() < 1e-12,
                    "{tile:?} point {j}: {s}·{t}·{r}"
                );
            }
            // So the code's matrices compute the correlation.
            let d = &[0.3, -1.7, 2.2, 0.9, -0.4, 1.1][..a];
            let taps = [0.7, -1.3, 0.45];
            let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(x, y)| x * y).sum::<f64>();
            let u: Vec<f64> = g.iter().map(|r| dot(r, &taps)).collect();
            let v: Vec<f64> = bt.iter().map(|r| dot(r, d)).collect();
            let uv: Vec<f64> = u.iter().zip(&v).map(|(u, v)| u * v).collect();
            for (i, row) in at.iter().enumerate() {
                let (y, expect) = (dot(row, &uv), dot(&d[i..i + 3], &taps));
                assert!(
                    (y - expect).abs() < 1e-12,
                    "{tile:?} y[{i}] = {y} vs {expect}"
                );
            }
        }
        check::<F2>(Tile::F2, &[0.0, 1.0, -1.0]);
        check::<F4>(Tile::F4, &[0.0, 1.0, -1.0, 0.5, -2.0]);
    }

    /// Winograd against the direct convolution in f64 on odd and even sizes (partial tiles,
    /// images smaller than a tile, channels not a multiple of the lanes or the kernels'
    /// tiles), with and without the residual epilogue, on one and two threads, on every
    /// kernel this CPU runs, for both tilings.
    #[test]
    fn winograd_matches_direct_convolution_on_every_available_isa() {
        let cases = [
            (5, 19, (2, 9, 7)),
            (19, 70, (1, 7, 7)),
            (40, 8, (3, 1, 1)),
            (16, 33, (1, 2, 3)),
            (33, 64, (2, 6, 8)),
            // Fused blocks of 60 tiles for F(2×2), 24 for F(4×4): 98 and 32 tiles make two,
            // the second partial.
            (64, 64, (2, 14, 13)),
            // Wide enough for the whole-layer path.
            (FUSED_BELOW + 3, 21, (2, 5, 3)),
        ];
        for (isa, tile) in Isa::available()
            .into_iter()
            .flat_map(|isa| [(isa, Tile::F2), (isa, Tile::F4)])
        {
            let t = Tiling::new(isa, false);
            let mut worst = 0f64;
            for (cin, cout, (batch, h, w)) in cases {
                let g = ConvGeom {
                    cin,
                    cout,
                    ksize: 3,
                    stride: 1,
                    pad: 1,
                };
                let x = values(batch * h * w * cin, 1);
                let wt = values(cout * g.k(), 2);
                let bias = values(cout, 3);
                let residual = values(batch * h * w * cout, 4);
                let expect = reference(&x, (batch, h, w), &wt, &bias, &g);
                let wg = Winograd::new(&wt, &g, &t, tile).unwrap();
                for (threads, res) in [(1, true), (2, true), (2, false)] {
                    let workers = Workers::new(threads).unwrap();
                    let mut scratch: Vec<AlignedBuf> =
                        (0..threads).map(|_| AlignedBuf::default()).collect();
                    let src = Source {
                        data: &x,
                        batch,
                        h,
                        w,
                        c: cin,
                    };
                    let mut out = vec![f32::NAN; expect.len()];
                    let r = res.then_some(residual.as_slice());
                    let bufs = &mut Buffers::default();
                    wg.conv(
                        &src,
                        &bias,
                        &t,
                        &mut out,
                        r,
                        res,
                        &workers,
                        &mut scratch,
                        bufs,
                        None,
                    )
                    .unwrap();
                    for (i, (&o, &e)) in out.iter().zip(&expect).enumerate() {
                        let e = if res {
                            (e + f64::from(residual[i])).max(0.0)
                        } else {
                            e
                        };
                        // F(2×2): the direct kernels' tolerance (f32 sums of k terms);
                        // F(4×4) rounds its larger transformed values: 4× that.
                        let scale = if tile == Tile::F2 { 1e-5 } else { 4e-5 };
                        let err = (f64::from(o) - e).abs() / (g.k() as f64).sqrt();
                        worst = worst.max(err);
                        assert!(
                            err <= scale,
                            "{isa} {tile:?} threads={threads} {g:?} on [{batch}, {h}, {w}]: \
                             [{i}] {o} vs {e}"
                        );
                    }
                }
            }
            eprintln!("{isa} {tile:?}: largest error {worst:.2e} · √k");
        }
    }

    #[test]
    fn other_geometries_and_bf16_are_refused() {
        let isa = Isa::Portable;
        let g = ConvGeom {
            cin: 2,
            cout: 3,
            ksize: 3,
            stride: 2,
            pad: 1,
        };
        let w = values(3 * g.k(), 1);
        let (f2, f4) = (Tile::F2, Tile::F4);
        let err = Winograd::new(&w, &g, &Tiling::new(isa, false), f2).unwrap_err();
        assert!(err.to_string().contains("stride: 2"), "{err}");
        let g = ConvGeom { stride: 1, ..g };
        assert!(Winograd::new(&w, &g, &Tiling::new(isa, true), f4).is_err());
        assert!(Winograd::new(&w[1..], &g, &Tiling::new(isa, false), f4).is_err());
        let t = Tiling::new(isa, false);
        let wg = Winograd::new(&w, &g, &t, f4).unwrap();
        // Buffers too small for the geometry are an error naming it, never a kernel call.
        let x = values(4 * 5 * 2, 3);
        let src = Source {
            data: &x,
            batch: 1,
            h: 4,
            w: 5,
            c: 2,
        };
        let (workers, mut scratch) = (Workers::new(1).unwrap(), vec![AlignedBuf::default()]);
        let mut out = vec![0f32; 4 * 5 * 3 - 1];
        let bufs = &mut Buffers::default();
        let err = wg
            .conv(
                &src,
                &[0.0; 3],
                &t,
                &mut out,
                None,
                true,
                &workers,
                &mut scratch,
                bufs,
                None,
            )
            .unwrap_err();
        assert!(err.to_string().contains("Winograd"), "{err}");
    }
}

#[cfg(test)]
mod timings {
    use std::time::Instant;

    use super::super::tests::values;
    use super::*;
    use crate::isa::Isa;

    /// ResNet-50's 3×3 stride-1 layers at batch 16, 224 px, as the network runs them (the
    /// first two stages on slices of 5 and 10 images), timed on two threads: direct, then
    /// F(2×2) and F(4×4) each fused and over the whole layer, interleaved, median of 11.
    /// Tunes [`FUSED_BELOW`] and [`BLOCK_BYTES`], and says where F(4×4) pays:
    ///
    /// ```sh
    /// cargo test --release --lib winograd_layer_timings -- --ignored --nocapture
    /// ```
    #[test]
    #[ignore = "a measurement, not a check"]
    fn winograd_layer_timings() {
        let t = Tiling::new(Isa::detect(), false);
        let workers = Workers::new(2).unwrap();
        let mut scratch: Vec<AlignedBuf> = (0..2).map(|_| AlignedBuf::default()).collect();
        for (c, hw, batch) in [(64, 56, 5), (128, 28, 10), (256, 14, 16), (512, 7, 16)] {
            let g = ConvGeom {
                cin: c,
                cout: c,
                ksize: 3,
                stride: 1,
                pad: 1,
            };
            let x = values(batch * hw * hw * c, 1);
            let wt = values(c * g.k(), 2);
            let bias = values(c, 3);
            let src = Source {
                data: &x,
                batch,
                h: hw,
                w: hw,
                c,
            };
            let mut out = vec![0f32; x.len()];
            let direct = PackedB::new(&wt, &g, &t).unwrap();
            let mut contenders: Vec<(String, Option<Winograd>)> = vec![("direct".into(), None)];
            for (tile, fused) in [
                (Tile::F2, false),
                (Tile::F2, true),
                (Tile::F4, false),
                (Tile::F4, true),
            ] {
                let mut wg = Winograd::new(&wt, &g, &t, tile).unwrap();
                wg.fused = fused;
                let how = if fused { "fused" } else { "whole layer" };
                contenders.push((format!("{tile:?} {how}"), Some(wg)));
            }
            let mut times = vec![Vec::new(); contenders.len()];
            let mut bufs = Buffers::default();
            for round in 0..12 {
                for (i, (_, wg)) in contenders.iter().enumerate() {
                    let start = Instant::now();
                    match wg {
                        None => conv(
                            &src,
                            &direct,
                            &bias,
                            &t,
                            &mut out,
                            None,
                            true,
                            &workers,
                            &mut scratch,
                            None,
                        ),
                        Some(wg) => wg.conv(
                            &src,
                            &bias,
                            &t,
                            &mut out,
                            None,
                            true,
                            &workers,
                            &mut scratch,
                            &mut bufs,
                            None,
                        ),
                    }
                    .unwrap();
                    if round > 0 {
                        times[i].push(start.elapsed().as_secs_f64());
                    }
                }
            }
            println!("{hw}x{hw}x{c}, batch {batch}:");
            for ((name, _), mut t) in contenders.iter().zip(times) {
                t.sort_by(f64::total_cmp);
                let flops = 2.0 * (batch * hw * hw * c * g.k()) as f64;
                println!(
                    "  {name:24} {:8.3} ms  {:6.1} GFLOP/s direct-equivalent",
                    t[t.len() / 2] * 1e3,
                    flops / t[t.len() / 2] / 1e9
                );
            }
        }
    }
}
