//! Winograd's minimal filtering F(2×2, 3×3) for the 3×3, stride-1 convolutions of the f32
//! dataflow (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//!
//! Each 2×2 block of output pixels comes from the 4×4 input tile `d` around it as
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: 16 products per (input, output) channel pair instead of
//! the direct convolution's 36, 2.25× fewer. Over a layer of T tiles that is
//! * an input transform writing `V[ξ] = (Bᵀ d B)[ξ]`, ξ ∈ 0..16, as 16 matrices
//!   `[T, cin]`, channels contiguous as NHWC holds them;
//! * 16 matrix products `M[ξ] = V[ξ] · U[ξ]` on the packed kernels of every other layer (the
//!   f32 [`conv`] as a 1×1 convolution), `U[ξ] = (G g Gᵀ)[ξ]` `[cin, cout]` transformed in
//!   f64 and packed once, at load;
//! * an output transform `Aᵀ M A` fused with the layer's epilogue: bias, residual, ReLU.
//!
//! The transforms' coefficients are 0, ±1 and ±½, exact in binary: results differ from the
//! direct convolution's by the rounding of a few more additions (the tests bound it by the
//! same tolerance as the direct kernels'). bf16 keeps the direct products: its operands'
//! 8 bits would round the transformed values, and its native kernels are fast already.

use std::ops::Range;
use std::sync::atomic::AtomicU64;

use super::{
    AlignedBuf, ConvGeom, Kernel, Lens, PackedB, SharedPtr, Source, Tiling, Workers, check_buffers,
    conv,
};
use crate::error::{Error, Result};

/// Channels transformed together: fixed-size arrays the compiler keeps in vector registers.
const LANES: usize = 16;

/// The fewest input channels for which Winograd pays. Its transforms move 4× the layer's
/// input and output through memory, and its 16 products of depth `cin` run the kernels less
/// well than one of depth 9 · `cin`; on an Ice Lake (batch 16, 224 px) it took ResNet-50's
/// 14×14×256 layers from 21 to 15 ms and its 7×7×512 from 20 to 17, but its 56×56×64 from
/// 22 to 35 and its 28×28×128 from 19 to 23.
const MIN_CHANNELS: usize = 256;

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

/// `Bᵀ v` for one axis of an input tile: `[v₀−v₂, v₁+v₂, v₂−v₁, v₁−v₃]`, lane by lane.
#[inline(always)]
fn b_axis(v: [&[f32; LANES]; 4]) -> [[f32; LANES]; 4] {
    let mut out = [[0f32; LANES]; 4];
    for l in 0..LANES {
        out[0][l] = v[0][l] - v[2][l];
        out[1][l] = v[1][l] + v[2][l];
        out[2][l] = v[2][l] - v[1][l];
        out[3][l] = v[1][l] - v[3][l];
    }
    out
}

/// `Aᵀ v` for one axis of a product tile: `[v₀+v₁+v₂, v₁−v₂−v₃]`, lane by lane.
#[inline(always)]
fn a_axis(v: [&[f32; LANES]; 4]) -> [[f32; LANES]; 2] {
    let mut out = [[0f32; LANES]; 2];
    for l in 0..LANES {
        out[0][l] = v[0][l] + v[1][l] + v[2][l];
        out[1][l] = v[1][l] - v[2][l] - v[3][l];
    }
    out
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

impl Winograd {
    /// Whether `g` is a convolution this module computes: 3×3, stride 1, padding 1.
    pub fn fits(g: &ConvGeom) -> bool {
        g.ksize == 3 && g.stride == 1 && g.pad == 1
    }

    /// Whether `g` fits and is wide enough for Winograd to be faster than the direct
    /// product ([`MIN_CHANNELS`]).
    pub fn pays(g: &ConvGeom) -> bool {
        Self::fits(g) && g.cin >= MIN_CHANNELS
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

    /// The values of the transformed input `V` and of the products `M` over a
    /// `[batch, h, w]` input: the lengths of the buffers [`Winograd::conv`] takes.
    pub fn buffer_lens(&self, batch: usize, h: usize, w: usize) -> (usize, usize) {
        let (t, ..) = Self::tiles(batch, h, w);
        (16 * t * self.geom.cin, 16 * t * self.geom.cout)
    }

    /// The convolution of `src` into `out` (`[batch, h, w, cout]`): bias, then `residual`
    /// when given, then ReLU when `relu`, as [`conv`] computes it directly. `v` and `m` hold
    /// at least [`Winograd::buffer_lens`] values; `t` is the f32 tiling the weights were
    /// packed for. Results do not depend on the number of workers.
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
        (v, m): (&mut AlignedBuf, &mut AlignedBuf),
        pack_ns: Option<&AtomicU64>,
    ) -> Result<()> {
        let g = &self.geom;
        let (batch, h, w) = (src.batch, src.h, src.w);
        let (cin, cout) = (g.cin, g.cout);
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
        let (vlen, mlen) = self.buffer_lens(batch, h, w);
        v.ensure(vlen);
        m.ensure(mlen);
        let (tiles, th, tw) = Self::tiles(batch, h, w);
        let grid = Grid {
            tiles,
            th,
            tw,
            h,
            w,
        };

        // V[ξ] = (Bᵀ d B)[ξ]: [T, cin] each.
        let vp = SharedPtr(v.as_mut_slice().as_mut_ptr());
        workers.ranges(tiles, |range| {
            // SAFETY: `v` holds 16 · T · cin values (ensured above) and the ranges are
            // disjoint.
            unsafe { self.input(t, src, &grid, range, vp.get()) };
        });

        // M[ξ] = V[ξ] · U[ξ]: [T, cout] each, on the packed kernels.
        let (vs, ms) = (v.as_slice(), m.as_mut_slice());
        for (xi, b) in self.packed.iter().enumerate() {
            let a = Source {
                data: &vs[xi * tiles * cin..][..tiles * cin],
                batch: 1,
                h: tiles,
                w: 1,
                c: cin,
            };
            let mo = &mut ms[xi * tiles * cout..][..tiles * cout];
            let zeros = &self.zeros[..cout];
            conv(&a, b, zeros, t, mo, None, false, workers, scratch, pack_ns)?;
        }

        // Y = Aᵀ M A, + bias, + residual, ReLU: the 2×2 output pixels of each tile.
        let ms = m.as_slice();
        let op = SharedPtr(out.as_mut_ptr());
        let ep = (bias, residual, relu);
        workers.ranges(tiles, |range| {
            // SAFETY: `out` holds the [batch, h, w, cout] output (checked above) and the
            // ranges are disjoint.
            unsafe { self.output(t, ms, ep, &grid, range, op.get()) };
        });
        Ok(())
    }

    /// [`Winograd::input_tiles`] compiled for the widest vectors of `t`'s kernel (the
    /// transforms add and subtract lane by lane: the same bits at any width).
    ///
    /// # Safety
    /// As [`Winograd::input_tiles`].
    unsafe fn input(
        &self,
        t: &Tiling,
        src: &Source,
        grid: &Grid,
        range: Range<usize>,
        v: *mut f32,
    ) {
        // SAFETY: (every call) forwarded from the caller; a kernel's token proves this CPU
        // runs its instruction set.
        unsafe {
            match t.kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512(_) => self.input_avx512(src, grid, range, v),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2(_) => self.input_avx2(src, grid, range, v),
                _ => self.input_tiles(src, grid, range, v),
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
        ep: (&[f32], Option<&[f32]>, bool),
        grid: &Grid,
        range: Range<usize>,
        out: *mut f32,
    ) {
        // SAFETY: as in `input`.
        unsafe {
            match t.kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512(_) => self.output_avx512(m, ep, grid, range, out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2(_) => self.output_avx2(m, ep, grid, range, out),
                _ => self.output_tiles(m, ep, grid, range, out),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn input_avx512(&self, src: &Source, grid: &Grid, range: Range<usize>, v: *mut f32) {
        // SAFETY: forwarded.
        unsafe { self.input_tiles(src, grid, range, v) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn input_avx2(&self, src: &Source, grid: &Grid, range: Range<usize>, v: *mut f32) {
        // SAFETY: forwarded.
        unsafe { self.input_tiles(src, grid, range, v) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn output_avx512(
        &self,
        m: &[f32],
        ep: (&[f32], Option<&[f32]>, bool),
        grid: &Grid,
        range: Range<usize>,
        out: *mut f32,
    ) {
        // SAFETY: forwarded.
        unsafe { self.output_tiles(m, ep, grid, range, out) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn output_avx2(
        &self,
        m: &[f32],
        ep: (&[f32], Option<&[f32]>, bool),
        grid: &Grid,
        range: Range<usize>,
        out: *mut f32,
    ) {
        // SAFETY: forwarded.
        unsafe { self.output_tiles(m, ep, grid, range, out) }
    }

    /// Writes `V[ξ]`'s rows of the tiles `range` of `src` into `v` (`[16, T, cin]`).
    ///
    /// # Safety
    /// `v` holds `16 · T · cin` values; no other thread writes the rows of these tiles.
    #[inline(always)]
    unsafe fn input_tiles(&self, src: &Source, grid: &Grid, range: Range<usize>, v: *mut f32) {
        let Grid {
            tiles,
            th,
            tw,
            h,
            w,
        } = *grid;
        let cin = self.geom.cin;
        let mut d = [[0f32; LANES]; 16];
        for tile in range {
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
                    row[..lanes].copy_from_slice(&px[c0..c0 + lanes]);
                }
                // Bᵀ d: down each column of the tile, then · B along each row.
                let cols: [[[f32; LANES]; 4]; 4] =
                    std::array::from_fn(|j| b_axis([&d[j], &d[4 + j], &d[8 + j], &d[12 + j]]));
                let rows: [[[f32; LANES]; 4]; 4] = std::array::from_fn(|i| {
                    b_axis([&cols[0][i], &cols[1][i], &cols[2][i], &cols[3][i]])
                });
                for (i, row) in rows.iter().enumerate() {
                    for (j, vals) in row.iter().enumerate() {
                        let at = ((4 * i + j) * tiles + tile) * cin + c0;
                        // SAFETY: ξ < 16, tile < T and c0 + lanes ≤ cin: inside `v`.
                        unsafe { v.add(at).copy_from_nonoverlapping(vals.as_ptr(), lanes) };
                    }
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
        (bias, residual, relu): (&[f32], Option<&[f32]>, bool),
        grid: &Grid,
        range: Range<usize>,
        out: *mut f32,
    ) {
        let Grid {
            tiles,
            th,
            tw,
            h,
            w,
        } = *grid;
        let cout = self.geom.cout;
        let mut p = [[0f32; LANES]; 16];
        for tile in range {
            let (n, ty, tx) = (tile / (th * tw), tile / tw % th, tile % tw);
            for c0 in (0..cout).step_by(LANES) {
                let lanes = LANES.min(cout - c0);
                for (xi, row) in p.iter_mut().enumerate() {
                    row[..lanes].copy_from_slice(&m[(xi * tiles + tile) * cout + c0..][..lanes]);
                }
                // Aᵀ M down each column, then · A along each row.
                let cols: [[[f32; LANES]; 2]; 4] =
                    std::array::from_fn(|j| a_axis([&p[j], &p[4 + j], &p[8 + j], &p[12 + j]]));
                let rows: [[[f32; LANES]; 2]; 2] = std::array::from_fn(|i| {
                    a_axis([&cols[0][i], &cols[1][i], &cols[2][i], &cols[3][i]])
                });
                for (i, row) in rows.iter().enumerate() {
                    for (j, vals) in row.iter().enumerate() {
                        let (oy, ox) = (2 * ty + i, 2 * tx + j);
                        if oy >= h || ox >= w {
                            continue;
                        }
                        let at = ((n * h + oy) * w + ox) * cout + c0;
                        let mut y = [0f32; LANES];
                        for l in 0..lanes {
                            y[l] = vals[l] + bias[c0 + l];
                        }
                        if let Some(r) = residual {
                            for l in 0..lanes {
                                y[l] += r[at + l];
                            }
                        }
                        if relu {
                            for y in &mut y[..lanes] {
                                *y = y.max(0.0);
                            }
                        }
                        // SAFETY: the pixel (n, oy, ox) is inside the output and
                        // c0 + lanes ≤ cout.
                        unsafe { out.add(at).copy_from_nonoverlapping(y.as_ptr(), lanes) };
                    }
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
                    let (mut v, mut m) = (AlignedBuf::default(), AlignedBuf::default());
                    let src = Source {
                        data: &x,
                        batch,
                        h,
                        w,
                        c: cin,
                    };
                    let mut out = vec![f32::NAN; expect.len()];
                    let r = res.then_some(residual.as_slice());
                    let bufs = (&mut v, &mut m);
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
        let (mut v, mut m) = (AlignedBuf::default(), AlignedBuf::default());
        let mut out = vec![0f32; 4 * 5 * 3 - 1];
        let bufs = (&mut v, &mut m);
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
