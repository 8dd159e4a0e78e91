//! Winograd's minimal filtering F(2×2, 3×3) for the 3×3, stride-1 convolutions of the f32
//! dataflow (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//!
//! Each 2×2 block of output pixels comes from the 4×4 input tile `d` around it as
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: 16 products per (input, output) channel pair instead of
//! the direct convolution's 36, 2.25× fewer. Over T tiles that is
//! * an input transform writing `V[ξ] = (Bᵀ d B)[ξ]`, ξ ∈ 0..16, as 16 matrices
//!   `[T, cin]`, channels contiguous as NHWC holds them;
//! * 16 matrix products `M[ξ] = V[ξ] · U[ξ]` on the packed kernels of every other layer (the
//!   f32 [`conv`] as a 1×1 convolution), `U[ξ] = (G g Gᵀ)[ξ]` `[cin, cout]` transformed in
//!   f64 and packed once, at load;
//! * an output transform `Aᵀ M A` fused with the layer's epilogue: bias, residual, ReLU.
//!
//! Narrow layers run the three steps on blocks of tiles, each block on one worker while it
//! is in that core's cache; wide ones run each step over the whole layer ([`FUSED_BELOW`]).
//! The transforms are lane-by-lane adds, compiled for the kernel's vector width.
//!
//! The transforms' coefficients are 0, ±1 and ±½, exact in binary: results differ from the
//! direct convolution's by the rounding of a few more additions (the tests bound it by the
//! same tolerance as the direct kernels'). bf16 keeps the direct products: its operands'
//! 8 bits would round the transformed values, and its native kernels are fast already.

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
/// input transform, 16 products and output transform while the block is in cache. Wider
/// ones transform the whole layer, then run 16 products over all its tiles: their weights
/// (`16 · cin · cout` values, 16 MiB at 512 channels) would be read again for every block.
/// Against the direct product on an Ice Lake (ResNet-50, batch 16, 224 px): 56×56×64 layers
/// ran 1.6× slower whole-layer (their transforms moved 4× the activations through memory),
/// 1.4× faster fused; 7×7×512 1.45× faster whole-layer, 1.1–1.2× fused; 14×14×256 1.5×
/// faster either way.
const FUSED_BELOW: usize = 256;

/// The bytes of one fused block's `V` and `M` together: in a core's L2 beside the weights
/// (on the Ice Lake, 256 KiB and 1 MiB ran the narrow layers slower).
const BLOCK_BYTES: usize = 512 << 10;

/// A 3×3, stride-1, pad-1 convolution's weights transformed to Winograd's domain and packed:
/// 16 matrices `U[ξ]` `[cin, cout]`, each packed as a 1×1 convolution for the f32 kernels.
#[derive(Debug)]
pub(crate) struct Winograd {
    /// `U[ξ]`, ξ = 4·row + column of the 4×4 transformed kernel.
    packed: Vec<PackedB>,
    /// The 3×3 convolution these weights compute.
    geom: ConvGeom,
    /// `max(cin, cout)` zeros: the padding's input pixels and the products' (null) bias.
    zeros: Vec<f32>,
}

/// `G v` for one axis of a 3-tap kernel: `[v₀, (v₀+v₁+v₂)/2, (v₀−v₁+v₂)/2, v₂]`.
fn g_axis(v: [f64; 3]) -> [f64; 4] {
    [
        v[0],
        (v[0] + v[1] + v[2]) / 2.0,
        (v[0] - v[1] + v[2]) / 2.0,
        v[2],
    ]
}

/// The first `lanes` values of `src` into `dst`: a whole vector copy when `lanes` is
/// [`LANES`] (every ResNet width), which the compiler inlines, unlike a copy of variable
/// length, which calls `memcpy`.
#[inline(always)]
fn load(dst: &mut [f32; LANES], src: &[f32], lanes: usize) {
    if lanes == LANES {
        dst.copy_from_slice(&src[..LANES]);
    } else {
        dst[..lanes].copy_from_slice(&src[..lanes]);
    }
}

/// The first `lanes` values of `src` to `dst`, as [`load`].
///
/// # Safety
/// `dst` is valid for `lanes` writes.
#[inline(always)]
unsafe fn store(src: &[f32; LANES], dst: *mut f32, lanes: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if lanes == LANES {
            dst.copy_from_nonoverlapping(src.as_ptr(), LANES);
        } else {
            dst.copy_from_nonoverlapping(src.as_ptr(), lanes);
        }
    }
}

/// `Bᵀ x` along one axis of an input tile: `[x₀−x₂, x₁+x₂, x₂−x₁, x₁−x₃]`.
#[inline(always)]
fn bt(x: [f32; 4]) -> [f32; 4] {
    [x[0] - x[2], x[1] + x[2], x[2] - x[1], x[1] - x[3]]
}

/// `Aᵀ x` along one axis of a product tile: `[x₀+x₁+x₂, x₁−x₂−x₃]`.
#[inline(always)]
fn at(x: [f32; 4]) -> [f32; 2] {
    [x[0] + x[1] + x[2], x[1] - x[2] - x[3]]
}

/// `Bᵀ d B` lane by lane: `d` holds the tile's pixel (i, j) in row 4·i + j, `v` gets `V[ξ]`
/// in row ξ = 4·i + j. One loop over the lanes with scalar temporaries, the form the
/// compiler turns into whole-vector operations on registers.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn input_transform(d: &[[f32; LANES]; 16], v: &mut [[f32; LANES]; 16]) {
    for l in 0..LANES {
        // Bᵀ d, down each column j of the tile: t[j][i].
        let t: [[f32; 4]; 4] =
            std::array::from_fn(|j| bt([d[j][l], d[4 + j][l], d[8 + j][l], d[12 + j][l]]));
        // · B, along each row i.
        for i in 0..4 {
            let row = bt([t[0][i], t[1][i], t[2][i], t[3][i]]);
            for j in 0..4 {
                v[4 * i + j][l] = row[j];
            }
        }
    }
}

/// `Aᵀ M A` lane by lane: `m` holds `M[ξ]` in row ξ, `y` gets the output pixel (i, j) of
/// the tile in row 2·i + j.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn output_transform(m: &[[f32; LANES]; 16], y: &mut [[f32; LANES]; 4]) {
    for l in 0..LANES {
        let t: [[f32; 2]; 4] =
            std::array::from_fn(|j| at([m[j][l], m[4 + j][l], m[8 + j][l], m[12 + j][l]]));
        for i in 0..2 {
            let row = at([t[0][i], t[1][i], t[2][i], t[3][i]]);
            for j in 0..2 {
                y[2 * i + j][l] = row[j];
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
        (BLOCK_BYTES / (16 * 4 * (self.geom.cin + self.geom.cout)) / 12 * 12).max(12)
    }

    /// Transforms and packs `w` (`[cout, cin, 3, 3]`, PyTorch's layout) for the f32 tiling
    /// `t`. Errors for another geometry, a bf16 tiling or a wrong number of weights.
    pub fn new(w: &[f32], g: &ConvGeom, t: &Tiling) -> Result<Winograd> {
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
        let (cin, cout) = (g.cin, g.cout);
        // u[ξ][co · cin + ci]: each ξ is the weight of a 1×1 convolution cin → cout.
        let mut u = vec![vec![0f32; cout * cin]; 16];
        for co in 0..cout {
            for ci in 0..cin {
                let k = &w[(co * cin + ci) * 9..][..9];
                let kernel = |ky: usize, kx: usize| f64::from(k[ky * 3 + kx]);
                // G g: the rows of the kernel, transformed down each column.
                let cols = [0, 1, 2].map(|kx| g_axis([0, 1, 2].map(|ky| kernel(ky, kx))));
                for (i, row) in u.chunks_mut(4).enumerate() {
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

    /// Tiles of a `[batch, h, w]` input: 2×2 output blocks, the last row and column of
    /// blocks partial for odd sizes.
    fn tiles(batch: usize, h: usize, w: usize) -> (usize, usize, usize) {
        (
            batch * h.div_ceil(2) * w.div_ceil(2),
            h.div_ceil(2),
            w.div_ceil(2),
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
        let (tiles, th, tw) = Self::tiles(batch, h, w);
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
        if g.cin < FUSED_BELOW {
            self.fused(src, &grid, ep, t, out, workers, scratch, &mut bufs.blocks)
        } else {
            self.whole(src, &grid, ep, t, out, workers, scratch, bufs, pack_ns)
        }
    }

    /// The whole layer's `V`, then each of the 16 products over all its tiles, then the
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
        bufs.v.ensure(16 * tiles * cin);
        bufs.m.ensure(16 * tiles * cout);
        let rows = |range: Range<usize>| Rows {
            first: range.start,
            range,
            rows: tiles,
        };
        let vp = SharedPtr(bufs.v.as_mut_slice().as_mut_ptr());
        workers.ranges(tiles, |range| {
            // SAFETY: `v` holds 16 · T · cin values (ensured above) and the ranges are
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

    /// The 16 products `M[ξ] = V[ξ] · U[ξ]` of `rows` tiles: `vs` holds the `V[ξ]` one after
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
        let per = self.block_tiles();
        let count = tiles.div_ceil(per);
        blocks.resize_with(scratch.len(), Default::default);
        let mut state: Vec<_> = scratch.iter_mut().zip(blocks.iter_mut()).collect();
        let (next, failed) = (AtomicUsize::new(0), Mutex::new(None));
        workers.each(&mut state, count > 1, |(pack, [v, m])| {
            v.ensure(16 * per * cin);
            m.ensure(16 * per * cout);
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
                // SAFETY: `v` holds 16 · per ≥ 16 · n rows of cin values (ensured above);
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

    /// Writes `V[ξ]`'s rows of the tiles `range` of `src` into `v` (`[16, T, cin]`).
    ///
    /// # Safety
    /// `v` holds `16 · T · cin` values; no other thread writes the rows of these tiles.
    #[inline(always)]
    unsafe fn input_tiles(&self, src: &Source, grid: &Grid, rows: &Rows, v: *mut f32) {
        let Grid { th, tw, h, w, .. } = *grid;
        let cin = self.geom.cin;
        let (mut d, mut t) = ([[0f32; LANES]; 16], [[0f32; LANES]; 16]);
        for tile in rows.range.clone() {
            let (n, ty, tx) = (tile / (th * tw), tile / tw % th, tile % tw);
            // The 16 input pixels of the tile (zeros outside the image).
            let pixels: [&[f32]; 16] = std::array::from_fn(|p| {
                let (iy, ix) = ((2 * ty + p / 4) as isize - 1, (2 * tx + p % 4) as isize - 1);
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                    &self.zeros[..cin]
                } else {
                    &src.data[((n * h + iy as usize) * w + ix as usize) * cin..][..cin]
                }
            });
            for c0 in (0..cin).step_by(LANES) {
                let lanes = LANES.min(cin - c0);
                for (row, px) in d.iter_mut().zip(&pixels) {
                    load(row, &px[c0..], lanes);
                }
                input_transform(&d, &mut t);
                for (xi, vals) in t.iter().enumerate() {
                    let at = rows.of(xi, tile) * cin + c0;
                    // SAFETY: ξ < 16, tile < T and c0 + lanes ≤ cin: inside `v`.
                    unsafe { store(vals, v.add(at), lanes) };
                }
            }
        }
    }

    /// Writes the output pixels of the tiles `range` from the products `m` (`[16, T,
    /// cout]`) into `out` (`[batch, h, w, cout]`): `Aᵀ M A`, + bias, + residual, then ReLU
    /// when asked (`ep`).
    ///
    /// # Safety
    /// `out` holds the `[batch, h, w, cout]` output; no other thread writes these tiles'
    /// pixels; `bias` holds `cout` values, `residual` the whole output.
    #[inline(always)]
    unsafe fn output_tiles(
        &self,
        m: &[f32],
        (bias, residual, relu): Finish,
        grid: &Grid,
        rows: &Rows,
        out: *mut f32,
    ) {
        let Grid { th, tw, h, w, .. } = *grid;
        let cout = self.geom.cout;
        let (mut p, mut y) = ([[0f32; LANES]; 16], [[0f32; LANES]; 4]);
        for tile in rows.range.clone() {
            let (n, ty, tx) = (tile / (th * tw), tile / tw % th, tile % tw);
            for c0 in (0..cout).step_by(LANES) {
                let lanes = LANES.min(cout - c0);
                for (xi, row) in p.iter_mut().enumerate() {
                    load(row, &m[rows.of(xi, tile) * cout + c0..], lanes);
                }
                output_transform(&p, &mut y);
                for (k, vals) in y.iter().enumerate() {
                    let (oy, ox) = (2 * ty + k / 2, 2 * tx + k % 2);
                    if oy >= h || ox >= w {
                        continue;
                    }
                    let at = ((n * h + oy) * w + ox) * cout + c0;
                    let mut px = *vals;
                    for (v, b) in px.iter_mut().zip(&bias[c0..c0 + lanes]) {
                        *v += b;
                    }
                    if let Some(r) = residual {
                        for (v, r) in px.iter_mut().zip(&r[at..at + lanes]) {
                            *v += r;
                        }
                    }
                    if relu {
                        for v in &mut px {
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

    /// Winograd against the direct convolution in f64 on odd and even sizes (partial tiles,
    /// images smaller than a tile, channels not a multiple of the lanes or the kernels'
    /// tiles), with and without the residual epilogue, on one and two threads, on every
    /// kernel this CPU runs.
    #[test]
    fn winograd_matches_direct_convolution_on_every_available_isa() {
        let cases = [
            (5, 19, (2, 9, 7)),
            (19, 70, (1, 7, 7)),
            (40, 8, (3, 1, 1)),
            (16, 33, (1, 2, 3)),
            (33, 64, (2, 6, 8)),
            // Fused blocks of 60 tiles: 98 tiles make two, the second partial.
            (64, 64, (2, 14, 13)),
            // Wide enough for the whole-layer path.
            (FUSED_BELOW + 3, 21, (2, 5, 3)),
        ];
        for isa in Isa::available() {
            let t = Tiling::new(isa, false);
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
                let wg = Winograd::new(&wt, &g, &t).unwrap();
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
                        // As the direct kernels' tolerance (f32 sums of k terms).
                        let tol = 1e-5 * (g.k() as f64).sqrt();
                        assert!(
                            (f64::from(o) - e).abs() <= tol,
                            "{isa} threads={threads} {g:?} on [{batch}, {h}, {w}]: [{i}] {o} \
                             vs {e}"
                        );
                    }
                }
            }
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
        let err = Winograd::new(&w, &g, &Tiling::new(isa, false)).unwrap_err();
        assert!(err.to_string().contains("stride: 2"), "{err}");
        let g = ConvGeom { stride: 1, ..g };
        assert!(Winograd::new(&w, &g, &Tiling::new(isa, true)).is_err());
        assert!(Winograd::new(&w[1..], &g, &Tiling::new(isa, false)).is_err());
        let t = Tiling::new(isa, false);
        let wg = Winograd::new(&w, &g, &t).unwrap();
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
