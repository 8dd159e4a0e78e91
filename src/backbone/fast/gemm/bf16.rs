//! The bf16 dataflow: convolutions whose activations are bf16 NHWC in memory, in and out.
//!
//! Under [`super::super::Precision::Bf16`] every activation between layers is stored as bf16
//! (as PyTorch's CPU autocast does), which halves the memory traffic of the network and turns
//! the packing of `A` into copies: two consecutive channels of an NHWC bf16 activation are
//! already the bf16 pair that `vdpbf16ps` and AMX's `tdpbf16ps` take in one 32-bit word.
//!
//! * `A` is row-major — one im2col row of `kp` bf16 values per output pixel — which is the
//!   layout of an AMX tile (16 rows × 64 bytes) and of the broadcast reads of the
//!   AVX512-BF16 kernel alike. A 1×1 stride-1 convolution reads its input in place; the
//!   others copy runs of channels (at most three per kernel row: left padding, image, right
//!   padding).
//! * The whole depth `k` is reduced in one micro-kernel call, so the accumulators never leave
//!   f32 before the epilogue; the rows of an `A` block are sized to the depth to stay in L2.
//! * The micro-kernels only produce a raw f32 tile; one epilogue (bias, residual, ReLU and
//!   the rounding to bf16) serves them all.
//! * Without native bf16 the same dataflow runs on the f32 kernels: `A` is widened to f32 while
//!   packing (exact) and the weights are packed rounded to bf16, so every product is the
//!   product of two bf16 values, as on the native kernels; only the order of the f32 sums
//!   differs.
//!
//! The AMX micro-kernel (Intel SDM vol. 1 ch. 18, "Intel Advanced Matrix Extensions") keeps a
//! 32×32 f32 tile of `C` in four tile registers (`tmm0`–`tmm3`) and per 32-deep step loads two
//! `A` tiles (16 rows × 32 bf16 each) and two `B` tiles (16 pair rows × 16 columns) straight
//! from the packed weights, whose 32-column panels of bf16 pairs are exactly two VNNI-layout
//! tiles side by side. Rust has no stable AMX intrinsics (rust-lang/rust#126622), so it is
//! written with `asm!`, and a plain-Rust stand-in with the instruction's arithmetic tests its
//! blocking on any CPU.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    AlignedBuf, ConvGeom, Epilogue, Lens, OutPixel, PackedB, Schedule, Tiling, Workers, bf16_bits,
    check_buffers, check_packing,
};
use crate::error::{Error, Result};

/// How the bf16 dataflow blocks its products: runtime settings (not constants) so that a CPU
/// kind can be tuned in one benchmark run (`bench/backbone.py --bf16-blockings`). Every
/// output tile reduces the whole depth in one kernel call, so features do not depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// The bytes of `A` one block of rows may take (default 512 KiB: half of a 1–2 MiB L2,
    /// leaving room for the `B` panel being read).
    pub a_block_bytes: usize,
    /// Most rows in one block of `A` (default 256: shallow layers would otherwise make blocks
    /// so tall that there are too few tasks to share between threads). Rounded down to the
    /// kernel's tile rows, and never below them.
    pub max_block_rows: usize,
    /// The output size from which the epilogue writes with non-temporal stores, where the
    /// instruction set has them (default 8 MiB: an output this large, ResNet-50's first two
    /// stages at batch 16, does not stay in cache until the next layer reads it anyway, and a
    /// normal store would first read each line from memory). `usize::MAX`: never.
    pub stream_min_bytes: usize,
}

impl Default for Blocking {
    fn default() -> Self {
        Blocking {
            a_block_bytes: 512 << 10,
            max_block_rows: 256,
            stream_min_bytes: 8 << 20,
        }
    }
}

/// `512K`, `8M`, `1G`, `300` (bytes or rows), `inf`.
fn parse_size(key: &str, v: &str) -> Result<usize> {
    let bad = || {
        Error::invalid(
            "bf16 blocking",
            format!("{key}={v}: expected a count with an optional K, M or G suffix, or inf"),
        )
    };
    if v == "inf" {
        return Ok(usize::MAX);
    }
    let (digits, shift) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n: usize = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// `512K`, `8M`, or the count itself when it is not a whole number of KiB.
fn show_size(n: usize) -> String {
    match n {
        usize::MAX => "inf".into(),
        0 => "0".into(),
        n if n.is_multiple_of(1 << 20) => format!("{}M", n >> 20),
        n if n.is_multiple_of(1 << 10) => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

impl std::str::FromStr for Blocking {
    type Err = Error;

    /// Comma-separated `key=value` over the defaults: `a` (bytes of an `A` block), `rows`
    /// (most rows in one), `stream` (output bytes from which stores stream; `inf`: never),
    /// e.g. `a=256K,rows=128,stream=inf`.
    fn from_str(s: &str) -> Result<Self> {
        let mut b = Blocking::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, v) = item.split_once('=').ok_or_else(|| {
                Error::invalid("bf16 blocking", format!("`{item}` is not key=value"))
            })?;
            let key = key.trim();
            let field = match key {
                "a" => &mut b.a_block_bytes,
                "rows" => &mut b.max_block_rows,
                "stream" => &mut b.stream_min_bytes,
                other => {
                    return Err(Error::invalid(
                        "bf16 blocking",
                        format!("unknown key `{other}` (expected a, rows or stream)"),
                    ));
                }
            };
            *field = parse_size(key, v.trim())?;
        }
        Ok(b)
    }
}

impl std::fmt::Display for Blocking {
    /// The form its [`FromStr`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a={},rows={},stream={}",
            show_size(self.a_block_bytes),
            self.max_block_rows,
            show_size(self.stream_min_bytes)
        )
    }
}

/// A channels-last bf16 activation `[batch, h, w, c]`, the input of a bf16 convolution (the
/// network's f32 input too: rounded to bf16 once, as it is transposed to NHWC, it packs by
/// copies like every other layer's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Act<'a> {
    /// `[batch, h, w, c]` bf16 bit patterns, row-major.
    pub data: &'a [u16],
    /// Images.
    pub batch: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

/// f32 value of bf16 bits (exact).
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Copies the im2col rows `[m0, m0 + rows)` of `src` under `g` into `dst` (row-major, `kp`
/// values per row, k past `g.k()` zero). `dst` holds `rows · kp` values. Each run of input
/// values goes through `copy(to, from, len)`, which converts the first `len` values of
/// `from` into `to` and may write more of `to`: a run is copied before the rest of its row
/// is written, so whatever it wrote past its end is overwritten.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn im2col_rows<S: Copy, D: Copy>(
    src: &[S],
    (h, w): (usize, usize),
    g: &ConvGeom,
    (oh, ow): (usize, usize),
    (m0, rows): (usize, usize),
    kp: usize,
    dst: &mut [D],
    zero: D,
    copy: impl Fn(&mut [D], &[S], usize),
) {
    let (ks, cin) = (g.ksize, g.cin);
    let seg = ks * cin;
    let mut px = OutPixel::of_row(m0, (oh, ow));
    for row in dst.chunks_exact_mut(kp).take(rows) {
        let OutPixel { n, oy, ox } = px;
        let ix0 = (ox * g.stride) as isize - g.pad as isize;
        // The kx range inside the image.
        let kx_lo = (-ix0).clamp(0, ks as isize) as usize;
        let kx_hi = (w as isize - ix0).clamp(0, ks as isize) as usize;
        for ky in 0..ks {
            let at = ky * seg;
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            if iy < 0 || iy >= h as isize || kx_lo >= kx_hi {
                row[at..at + seg].fill(zero);
                continue;
            }
            let start = ((n * h + iy as usize) * w) as isize + ix0 + kx_lo as isize;
            let len = (kx_hi - kx_lo) * cin;
            copy(
                &mut row[at + kx_lo * cin..],
                &src[start as usize * cin..],
                len,
            );
            // Only the border pixels' windows reach into the padding.
            if kx_lo > 0 {
                row[at..at + kx_lo * cin].fill(zero);
            }
            if kx_hi < ks {
                row[at + kx_hi * cin..at + seg].fill(zero);
            }
        }
        row[ks * seg..].fill(zero);
        px.step((oh, ow));
    }
}

/// [`im2col_rows`]'s copy of bf16 runs: whole 16-byte blocks when both sides have room for
/// the last one, so that a short run (the stem's 21 values) is a few moves, not a loop.
#[inline(always)]
fn copy_bf16(to: &mut [u16], from: &[u16], len: usize) {
    let wide = len.next_multiple_of(8);
    if wide <= to.len() && wide <= from.len() {
        for (t, f) in to[..wide]
            .chunks_exact_mut(8)
            .zip(from[..wide].chunks_exact(8))
        {
            t.copy_from_slice(f);
        }
    } else {
        to[..len].copy_from_slice(&from[..len]);
    }
}

/// Packs rows `[m0, m0 + rows)` of the im2col matrix of `src` into `dst` (row-major, `kp`
/// values per row) and zeroes the rows up to `padded`: bf16 bits when `pairs` (the native
/// kernels' operands), f32 otherwise (the emulation's).
#[allow(clippy::too_many_arguments)]
fn pack_rows(
    src: &Act,
    g: &ConvGeom,
    ohw: (usize, usize),
    (m0, rows, padded): (usize, usize, usize),
    kp: usize,
    pairs: bool,
    dst: &mut AlignedBuf,
) {
    let (s, hw) = (src.data, (src.h, src.w));
    if pairs {
        let d = &mut dst.as_bf16_mut()[..padded * kp];
        im2col_rows(s, hw, g, ohw, (m0, rows), kp, d, 0, copy_bf16);
        d[rows * kp..].fill(0);
    } else {
        let d = &mut dst.as_mut_slice()[..padded * kp];
        let widen = |to: &mut [f32], from: &[u16], len: usize| {
            for (t, &f) in to[..len].iter_mut().zip(&from[..len]) {
                *t = bf16_to_f32(f);
            }
        };
        im2col_rows(s, hw, g, ohw, (m0, rows), kp, d, 0.0, widen);
        d[rows * kp..].fill(0.0);
    }
}

/// The type of [`store_bf16`] and its compilations for an instruction set.
pub(super) type StoreFn = unsafe fn(
    tile: &[f32],
    ldt: usize,
    dims: (usize, usize),
    out: *mut u16,
    ldo: usize,
    bias: *const f32,
    residual: *const u16,
    relu: bool,
);

/// The epilogue of the bf16 dataflow: `out = bf16(relu?(tile + bias + residual))` for the
/// valid `rows × cols` of a raw f32 `tile` (row stride `ldt`). Plain Rust, inlined into a
/// `#[target_feature]` copy for AVX2 (`x86`) so that it is vectorised, and the reference of
/// the AVX-512 one, written with intrinsics: with AMX a 32×32 tile of depth 64 takes ~128
/// cycles to compute, so a scalar epilogue would cost more than the product.
///
/// # Safety
/// `out` and `residual` (when not null) address `rows` rows of `cols` values, `ldo` apart;
/// `bias` holds `cols` values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn store_bf16(
    tile: &[f32],
    ldt: usize,
    (rows, cols): (usize, usize),
    out: *mut u16,
    ldo: usize,
    bias: *const f32,
    residual: *const u16,
    relu: bool,
) {
    for (i, trow) in tile.chunks(ldt).take(rows).enumerate() {
        // SAFETY: row i < rows of `cols` values, inside `out`, `residual` and `bias` (see the
        // contract); the slices end before the next row, so none overlaps another task's.
        let (orow, brow) = unsafe {
            (
                std::slice::from_raw_parts_mut(out.add(i * ldo), cols),
                std::slice::from_raw_parts(bias, cols),
            )
        };
        if residual.is_null() {
            for ((o, &t), &b) in orow.iter_mut().zip(&trow[..cols]).zip(brow) {
                let v = t + b;
                *o = bf16_bits(if relu { v.max(0.0) } else { v });
            }
        } else {
            // SAFETY: as for `orow`.
            let rrow = unsafe { std::slice::from_raw_parts(residual.add(i * ldo), cols) };
            for (((o, &t), &b), &r) in orow.iter_mut().zip(&trow[..cols]).zip(brow).zip(rrow) {
                let v = t + b + bf16_to_f32(r);
                *o = bf16_bits(if relu { v.max(0.0) } else { v });
            }
        }
    }
}

/// Asks for the cache lines of `rows` rows of bf16 values at `p`, `stride` values apart (a
/// hint: never faults, whatever the address).
#[inline(always)]
fn prefetch_rows(p: *const u16, rows: usize, stride: usize) {
    #[cfg(target_arch = "x86_64")]
    for r in 0..rows {
        // SAFETY: `prefetcht0` is SSE (baseline on x86-64) and only a hint: it neither
        // faults nor changes memory, even at an invalid address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(r * stride).cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, rows, stride);
}

/// A raw pointer to the bf16 output that may cross into the worker threads (see
/// [`super::SharedPtr`], whose argument applies: tasks own disjoint tiles).
#[derive(Clone, Copy)]
struct SharedOut(*mut u16);
// SAFETY: as for `SharedPtr`.
unsafe impl Send for SharedOut {}
// SAFETY: as for `SharedPtr`.
unsafe impl Sync for SharedOut {}

/// One convolution of the bf16 dataflow: `out [M, cout] = bf16(epilogue(im2col(src) · B))`,
/// M = batch · oh · ow, with `bias` added, `residual [M, cout]` (bf16) added when given, then
/// ReLU when `relu`.
///
/// `t` must be a bf16 tiling and the one `b` was packed for; buffers too small for the
/// geometry are an error, never a kernel call. `scratch` holds at least one packing buffer
/// per worker; `pack_ns`, when given, accumulates the thread-time spent packing `A`. Results
/// do not depend on the number of workers: each output tile is one kernel call over the whole
/// depth, whichever thread makes it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    src: &Act,
    b: &PackedB,
    bias: &[f32],
    t: &Tiling,
    out: &mut [u16],
    residual: Option<&[u16]>,
    relu: bool,
    workers: &Workers,
    scratch: &mut [AlignedBuf],
    pack_ns: Option<&AtomicU64>,
) -> Result<()> {
    check_packing(b, t, true)?;
    let g = &b.geom;
    let (oh, ow) = (g.out_len(src.h), g.out_len(src.w));
    let n = g.cout;
    let threads = workers.threads;
    let lens = Lens {
        input: src.data.len(),
        output: out.len(),
        bias: bias.len(),
        residual: residual.map(<[u16]>::len),
        scratch: scratch.len(),
    };
    let m = check_buffers("bf16 ", g, (src.batch, src.h, src.w, src.c), lens, threads)?;
    if m == 0 {
        return Ok(());
    }
    let (mr, nr, kp) = (t.mr, t.nr, b.kp);
    // Words of one packed row: bf16 pairs, or widened f32 values.
    let lda = if t.pairs { kp / 2 } else { kp };
    // A 1×1 stride-1 convolution on bf16 pairs reads its input rows in place when they are
    // exactly the packed rows (no k padding); a partial last tile of rows is still packed.
    let direct = (t.pairs && g.is_pointwise() && kp == g.cin).then_some(src.data);
    let blocking = t.bf16_blocking();
    // No block needs more rows than the layer has (a large setting would size the packing
    // buffers to it).
    let most = blocking.max_block_rows.min(m.next_multiple_of(mr)).max(mr);
    let mc = (blocking.a_block_bytes / (lda * 4)).clamp(mr, most) / mr * mr;
    let schedule = Schedule::new(m, mc, b.panels, threads);
    let optr = SharedOut(out.as_mut_ptr());
    let res = SharedOut(residual.map_or(std::ptr::null(), |r| r.as_ptr()).cast_mut());
    let scratch = &mut scratch[..threads];
    for buf in scratch.iter_mut() {
        buf.ensure(mc * lda);
    }
    let micro = t.micro();
    let stream = m * n * 2 >= blocking.stream_min_bytes;
    let store = t.store_bf16(stream);
    let bdata = b.data.as_slice();
    let steps = kp >> t.shift();

    let work = |buf: &mut AlignedBuf| {
        let (optr, res) = (optr, res);
        // The kernels write a whole raw tile (no epilogue: `bias` null).
        let raw = Epilogue {
            accumulate: false,
            bias: std::ptr::null(),
            residual: std::ptr::null(),
            ldr: 0,
            relu: false,
            rows: mr,
            cols: nr,
        };
        let mut tile = vec![0f32; mr * nr];
        let _tiles = t.tile_session();
        while let Some((m0, rows, panels)) = schedule.take() {
            let full_panels = rows / mr;
            let started = pack_ns.map(|_| std::time::Instant::now());
            match direct {
                None => pack_rows(
                    src,
                    g,
                    (oh, ow),
                    (m0, rows, rows.next_multiple_of(mr)),
                    kp,
                    t.pairs,
                    buf,
                ),
                Some(_) if !rows.is_multiple_of(mr) => {
                    // Only the partial last panel, at the buffer's start.
                    let tail = m0 + full_panels * mr;
                    pack_rows(src, g, (oh, ow), (tail, rows % mr, mr), kp, true, buf);
                }
                Some(_) => {}
            }
            if let (Some(acc), Some(s)) = (pack_ns, started) {
                acc.fetch_add(s.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            let packed = buf.as_slice().as_ptr();
            let tiles = rows.div_ceil(mr);
            for j in panels.clone() {
                let bsl = &bdata[j * steps * nr..];
                let cols = nr.min(n - j * nr);
                for p in 0..tiles {
                    let r0 = m0 + p * mr;
                    // The epilogue's rows are one cache line each, `n` values apart, which
                    // the hardware prefetchers do not foresee: with free products the 1×1
                    // layers took 1.5× as long waiting for these lines. Ask for the next
                    // tile's while this one is computed.
                    let next = if p + 1 < tiles {
                        Some((r0 + mr, j))
                    } else {
                        (j + 1 < panels.end).then_some((m0, j + 1))
                    };
                    if let Some((nr0, nj)) = next {
                        let at = nr0 * n + nj * nr;
                        let rows = mr.min(m - nr0);
                        if !stream {
                            prefetch_rows(optr.0.wrapping_add(at), rows, n);
                        }
                        if !res.0.is_null() {
                            prefetch_rows(res.0.wrapping_add(at), rows, n);
                        }
                    }
                    // SAFETY: r0 < m: rows of the input (direct) or of the packed buffer
                    // (panel p, or the tail panel at 0), each `lda` words long.
                    let a = unsafe {
                        match direct {
                            Some(d) if p < full_panels => d.as_ptr().add(r0 * g.cin).cast(),
                            Some(_) => packed,
                            None => packed.add(p * mr * lda),
                        }
                    };
                    // SAFETY: `micro` is `t`'s kernel, whose token proves this CPU runs it
                    // (and `_tiles` configured AMX's tiles for this thread); `a` holds `mr`
                    // rows of `steps` words `lda` apart, the B panel `steps` steps of `nr`
                    // words (`b` was packed for `t`), and `tile` `mr × nr` values.
                    unsafe { micro(steps, a, lda, bsl.as_ptr(), tile.as_mut_ptr(), nr, &raw) };
                    // SAFETY: `store` runs on this CPU (as `micro`); the tile [r0.., j·nr..]
                    // of valid rows × cols lies inside `out` (and `residual`, checked above)
                    // and belongs to this task alone; `bias` holds n ≥ j·nr + cols values.
                    unsafe {
                        store(
                            &tile,
                            nr,
                            (mr.min(m - r0), cols),
                            optr.0.add(r0 * n + j * nr),
                            n,
                            bias.as_ptr().add(j * nr),
                            if res.0.is_null() {
                                std::ptr::null()
                            } else {
                                res.0.add(r0 * n + j * nr).cast_const()
                            },
                            relu,
                        );
                    }
                }
            }
        }
        // Non-temporal stores are weakly ordered: fence them before this thread signals
        // that its tasks are done, after which other threads read the output.
        #[cfg(target_arch = "x86_64")]
        if stream {
            // SAFETY: `sfence` is SSE, baseline on x86-64.
            unsafe { std::arch::x86_64::_mm_sfence() }
        }
    };

    schedule.run(workers, scratch, work);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! [`super::store_bf16`] for AVX-512F (with intrinsics, and non-temporal stores for
    //! large outputs) and for AVX2 (compiled from the plain Rust), reached only through a
    //! [`super::Tiling`] whose kernel's token proves the instruction set.

    /// `pub(in super::super) unsafe fn $name`: the epilogue compiled with `$feat`.
    macro_rules! epilogue {
        ($(#[$doc:meta])* $name:ident, $feat:literal) => {
            $(#[$doc])*
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $feat)]
            pub(in super::super) unsafe fn $name(
                tile: &[f32],
                ldt: usize,
                dims: (usize, usize),
                out: *mut u16,
                ldo: usize,
                bias: *const f32,
                residual: *const u16,
                relu: bool,
            ) {
                // SAFETY: forwarded from the caller.
                unsafe { super::store_bf16(tile, ldt, dims, out, ldo, bias, residual, relu) }
            }
        };
    }

    epilogue!(
        /// [`super::store_bf16`] on 512-bit vectors, as the compiler vectorises it: the
        /// remainder of [`store_bf16_avx512`]'s rows.
        ///
        /// # Safety
        /// As `store_bf16`, on a CPU with AVX-512F.
        store_bf16_avx512_auto, "avx512f"
    );

    /// [`super::store_bf16`] on 512-bit vectors, 32 columns (a tile row of the AVX-512 and
    /// AMX kernels, one cache line of bf16) at a time; a row's last columns past a multiple
    /// of 32 as the compiler vectorises them. The same arithmetic, bit for bit:
    /// `(tile + bias) + residual`, `max(·, 0)` (0 for NaN, as `f32::max`), then
    /// [`super::super::bf16_bits`]'s rounding (a NaN kept quiet). With `STREAM` each whole,
    /// aligned line goes out with a non-temporal store, which does not read the line first:
    /// the caller issues `sfence` before another thread may read the output.
    ///
    /// # Safety
    /// As `store_bf16`, on a CPU with AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(in super::super) unsafe fn store_bf16_avx512<const STREAM: bool>(
        tile: &[f32],
        ldt: usize,
        (rows, cols): (usize, usize),
        out: *mut u16,
        ldo: usize,
        bias: *const f32,
        residual: *const u16,
        relu: bool,
    ) {
        use std::arch::x86_64::*;
        let (half, one, quiet) = (
            _mm512_set1_epi32(0x7FFF),
            _mm512_set1_epi32(1),
            _mm512_set1_epi32(0x0040_0000),
        );
        for (i, trow) in tile.chunks(ldt).take(rows).enumerate() {
            // SAFETY: row i < rows of `out` and `residual` (the contract).
            let (orow, rrow) = unsafe { (out.add(i * ldo), residual.wrapping_add(i * ldo)) };
            // 16 values from column `at`: the epilogue, then the bf16 bits in the upper
            // halves of the lanes.
            let round = |at: usize| {
                // SAFETY: columns at..at + 16 ≤ cols lie inside the tile row (the loop's
                // bound), `bias` and the residual row (the contract).
                unsafe {
                    let mut v = _mm512_add_ps(
                        _mm512_loadu_ps(trow.as_ptr().add(at)),
                        _mm512_loadu_ps(bias.add(at)),
                    );
                    if !residual.is_null() {
                        let r = _mm512_cvtepu16_epi32(_mm256_loadu_si256(rrow.add(at).cast()));
                        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(r)));
                    }
                    if relu {
                        v = _mm512_max_ps(v, _mm512_setzero_ps());
                    }
                    let b = _mm512_castps_si512(v);
                    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
                    let near = _mm512_add_epi32(_mm512_add_epi32(b, half), odd);
                    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                    let bits = _mm512_mask_blend_epi32(nan, near, _mm512_or_si512(b, quiet));
                    _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(bits))
                }
            };
            let mut c = 0;
            while c + 32 <= cols.min(trow.len()) {
                let (lo, hi) = (round(c), round(c + 16));
                // SAFETY: columns c..c + 32 ≤ cols of the output row (the contract).
                unsafe {
                    let line = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    let dst = orow.add(c).cast::<__m512i>();
                    if STREAM && dst.is_aligned() {
                        _mm512_stream_si512(dst, line);
                    } else {
                        _mm512_storeu_si512(dst, line);
                    }
                }
                c += 32;
            }
            if c < cols {
                // SAFETY: the row's columns c.. lie inside every operand, as above.
                unsafe {
                    let rest = (1, cols - c);
                    let (o, b, r) = (orow.add(c), bias.add(c), rrow.wrapping_add(c));
                    let r = if residual.is_null() { residual } else { r };
                    store_bf16_avx512_auto(&trow[c..], ldt, rest, o, ldo, b, r, relu);
                }
            }
        }
    }

    epilogue!(
        /// [`super::store_bf16`] on 256-bit vectors.
        ///
        /// # Safety
        /// As `store_bf16`, on a CPU with AVX2 and FMA.
        store_bf16_avx2, "avx2,fma"
    );
}

#[cfg(target_arch = "x86_64")]
pub(super) mod amx {
    //! The AMX micro-kernel and the per-thread tile configuration it runs under.

    use std::arch::asm;

    use super::Epilogue;

    /// The tile configuration (`ldtilecfg`'s 64-byte operand, palette 1): every tile used
    /// is 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        /// Bytes per row of each of the 16 possible tiles.
        colsb: [u16; 16],
        /// Rows of each tile.
        rows: [u8; 16],
    }

    /// AMX's tiles configured for [`amx_32x32`] on this thread, released on drop.
    #[derive(Debug)]
    pub(crate) struct TileSession(());

    impl TileSession {
        /// Loads the tile configuration: tmm0–tmm7 of 16 rows × 64 bytes.
        ///
        /// # Safety
        /// The CPU has AMX-TILE and Linux granted this process the tile state
        /// ([`crate::isa::AmxBf16`]).
        pub(crate) unsafe fn start() -> TileSession {
            let mut cfg = TileConfig {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            };
            cfg.colsb[..8].fill(64);
            cfg.rows[..8].fill(16);
            // SAFETY: `cfg` is a valid palette-1 configuration (64 bytes, aligned); AMX is
            // available (see the contract).
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
            }
            TileSession(())
        }
    }

    impl Drop for TileSession {
        fn drop(&mut self) {
            // SAFETY: a session exists only where `start`'s contract held: AMX is available.
            unsafe { asm!("tilerelease", options(nostack, nomem)) }
        }
    }

    /// AMX bf16 micro-kernel, 32×32: `C` in tmm0 (rows 0–15, columns 0–15), tmm1 (rows 0–15,
    /// columns 16–31), tmm2 and tmm3 (rows 16–31); per 16 pair-steps (32 k values) the two
    /// `A` tiles (tmm4, tmm5: 16 rows × 32 bf16, `lda` words apart) and the two halves of the
    /// `B` panel (tmm6, tmm7: 16 pair rows × 16 columns, 128 bytes apart), then four
    /// `tdpbf16ps`. Stores the raw 32×32 f32 tile at `c` (row stride `ldc` words); the
    /// epilogue is the caller's.
    ///
    /// # Safety
    /// A [`TileSession`] is active on this thread; `steps` is a multiple of 16; `a` holds 32
    /// rows of `steps` words `lda` apart; `b` holds `steps` rows of 32 words; `c` holds 32
    /// rows of 32 values `ldc` apart.
    pub(crate) unsafe fn amx_32x32(
        steps: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        _ep: &Epilogue,
    ) {
        let blocks = steps / 16;
        let (sa, sb, sc) = (lda * 4, 128usize, ldc * 4);
        // SAFETY: the tile loads read 16 rows × 64 bytes at strides inside `a` and `b`, and
        // the stores write 16 rows × 64 bytes inside `c` (see the contract); the loop runs
        // `blocks` ≥ 0 times, each advancing `a` by 64 bytes (32 bf16) and `b` by 16 pair
        // rows (2,048 bytes).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "test {n}, {n}",
                "jz 3f",
                "2:",
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm5, [{a1} + {sa} * 1]",
                "tileloadd tmm6, [{b0} + {sb} * 1]",
                "tileloadd tmm7, [{b0} + {sb} * 1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 2048",
                "dec {n}",
                "jnz 2b",
                "3:",
                "tilestored [{c0} + {sc} * 1], tmm0",
                "tilestored [{c0} + {sc} * 1 + 64], tmm1",
                "tilestored [{c1} + {sc} * 1], tmm2",
                "tilestored [{c1} + {sc} * 1 + 64], tmm3",
                n = inout(reg) blocks => _,
                a0 = inout(reg) a => _,
                a1 = inout(reg) a.cast::<u8>().add(16 * sa) => _,
                b0 = inout(reg) b => _,
                c0 = in(reg) c,
                c1 = in(reg) c.cast::<u8>().add(16 * sc),
                sa = in(reg) sa,
                sb = in(reg) sb,
                sc = in(reg) sc,
                options(nostack),
            );
        }
    }
}

/// The native bf16 kernels' machine code, run through a SIGILL emulator where AMX or
/// AVX512-BF16 is absent.
#[cfg(all(test, target_arch = "x86_64", target_os = "linux"))]
mod trap;

#[cfg(test)]
pub(super) mod tests {
    use super::super::Kernel;
    use super::super::tests::check_tiling;
    use super::*;
    use crate::isa::{Isa, IsaKind};

    /// `tdpbf16ps` in plain Rust at [`amx::amx_32x32`]'s tile size and operand layout: per
    /// output, per pair of k, the product of the low (even k) bf16 halves is added, then that
    /// of the high ones (the SDM's order; a product of two bf16 is exact in f32). Checks the
    /// real kernel's contract (`steps` a multiple of 16).
    ///
    /// # Safety
    /// As [`amx::amx_32x32`], without the tile session.
    pub(in super::super) unsafe fn amx_32x32(
        steps: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        _ep: &Epilogue,
    ) {
        assert!(steps.is_multiple_of(16), "AMX steps come in tiles of 16");
        let hi = |w: f32| f32::from_bits(w.to_bits() & 0xFFFF_0000);
        let lo = |w: f32| f32::from_bits(w.to_bits() << 16);
        for i in 0..32 {
            for j in 0..32 {
                let mut v = 0f32;
                for p in 0..steps {
                    // SAFETY: row i < 32 of `steps` words, step p < steps of 32 words.
                    let (av, bv) = unsafe { (*a.add(i * lda + p), *b.add(p * 32 + j)) };
                    v += lo(av) * lo(bv);
                    v += hi(av) * hi(bv);
                }
                // SAFETY: `c` holds 32 rows of 32 values `ldc` apart.
                unsafe { *c.add(i * ldc + j) = v };
            }
        }
    }

    /// [`amx::amx_32x32`] with its products skipped: the tile zeroed, as `tilezero` and
    /// `tilestored` leave it. A measuring instrument (what the dataflow costs beside the
    /// products), never a kernel to check.
    ///
    /// # Safety
    /// `c` holds 32 rows of 32 values `ldc` apart.
    pub(in super::super) unsafe fn free_32x32(
        _steps: usize,
        _a: *const f32,
        _lda: usize,
        _b: *const f32,
        c: *mut f32,
        ldc: usize,
        _ep: &Epilogue,
    ) {
        for i in 0..32 {
            // SAFETY: row i < 32 of 32 values (the contract).
            unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), 32) }.fill(0.0);
        }
    }

    /// `--bf16-blocking` specs: keys over the defaults, sizes with suffixes, `inf`, and
    /// errors that name the part at fault; `Display` writes what `from_str` reads.
    #[test]
    fn blocking_specs_parse_and_print() {
        let b: Blocking = "a=256K, rows=128,stream=inf".parse().unwrap();
        let want = Blocking {
            a_block_bytes: 256 << 10,
            max_block_rows: 128,
            stream_min_bytes: usize::MAX,
        };
        assert_eq!(b, want);
        assert_eq!(b.to_string(), "a=256K,rows=128,stream=inf");
        assert_eq!(Blocking::default().to_string(), "a=512K,rows=256,stream=8M");
        for b in [
            want,
            Blocking::default(),
            "a=1000,rows=7,stream=3G".parse().unwrap(),
        ] {
            assert_eq!(b.to_string().parse::<Blocking>().unwrap(), b);
        }
        assert_eq!("".parse::<Blocking>().unwrap(), Blocking::default());
        for (spec, names) in [
            ("a=12Q", "a=12Q"),
            ("rows", "`rows`"),
            ("cols=3", "`cols`"),
            ("stream=99999999999G", "stream=99999999999G"),
        ] {
            let err = spec.parse::<Blocking>().unwrap_err().to_string();
            assert!(
                err.contains(names) && err.contains("bf16 blocking"),
                "{spec}: {err}"
            );
        }
    }

    /// Blocks of one tile of rows, every output streamed, still compute the convolution.
    #[test]
    fn smallest_blocks_match_direct_convolution() {
        let mut t = Tiling::new(Isa::detect(), true);
        t.set_bf16_blocking("a=1,rows=1,stream=0".parse().unwrap());
        check_tiling(&t, "bf16, one tile of rows per block, streamed");
    }

    /// The AMX blocking (32×32 tiles, k padded to 32, whole-depth blocks) on any CPU, with
    /// `tdpbf16ps` replaced by its arithmetic in plain Rust; and the 12×32 `vdpbf16ps`
    /// blocking likewise.
    #[test]
    fn native_bf16_blockings_match_direct_convolution_on_any_cpu() {
        let amx = Tiling::for_kernel(Kernel::EmulatedAmx, true);
        assert_eq!((amx.mr, amx.nr, amx.kalign, amx.pairs), (32, 32, 32, true));
        check_tiling(&amx, "32x32 AMX (emulated)");
        let dp = Tiling::for_kernel(Kernel::EmulatedDpbf16, true);
        assert_eq!((dp.mr, dp.nr, dp.kalign, dp.pairs), (12, 32, 2, true));
        check_tiling(&dp, "12x32 vdpbf16ps (emulated)");
    }

    /// Runs [`amx::amx_32x32`], its tiles configured by an [`amx::TileSession`], against its
    /// stand-in on bf16 inputs whose products and sums are exact in f32 (small integers), at
    /// several depths and row strides, checking that it writes nothing outside its 32×32
    /// tile; returns the kernel calls made and the `tdpbf16ps` they ran.
    ///
    /// # Safety
    /// AMX instructions execute: natively, or under `trap`'s emulator.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn check_amx_kernel() -> (usize, usize) {
        let word = |i: usize, s: u32| {
            let lo = bf16_bits(((i as u32).wrapping_mul(2_654_435_761) ^ s) as f32 % 7.0 - 3.0);
            let hi = bf16_bits(((i as u32).wrapping_mul(40_503) ^ s) as f32 % 5.0 - 2.0);
            f32::from_bits(u32::from(lo) | u32::from(hi) << 16)
        };
        let raw = Epilogue {
            accumulate: false,
            bias: std::ptr::null(),
            residual: std::ptr::null(),
            ldr: 0,
            relu: false,
            rows: 32,
            cols: 32,
        };
        let mut products = 0;
        let cases = [(16, 16, 32), (48, 51, 40), (64, 64, 33), (0, 3, 32)];
        for (steps, lda, ldc) in cases {
            let a: Vec<f32> = (0..32 * lda).map(|i| word(i, 1)).collect();
            let b: Vec<f32> = (0..steps * 32).map(|i| word(i, 2)).collect();
            let sentinel = f32::from_bits(0x7FC0_1234);
            let (mut run, mut want) = (vec![sentinel; 32 * ldc], vec![sentinel; 32 * ldc]);
            // SAFETY: AMX instructions execute (the contract); the buffers hold what the
            // kernel asks: 32 rows of `steps` words `lda` apart, `steps` rows of 32 words, 32
            // rows of 32 values `ldc` apart.
            unsafe {
                let _tiles = amx::TileSession::start();
                amx::amx_32x32(
                    steps,
                    a.as_ptr(),
                    lda,
                    b.as_ptr(),
                    run.as_mut_ptr(),
                    ldc,
                    &raw,
                );
                amx_32x32(
                    steps,
                    a.as_ptr(),
                    lda,
                    b.as_ptr(),
                    want.as_mut_ptr(),
                    ldc,
                    &raw,
                );
            }
            let label = format!("steps {steps}, lda {lda}, ldc {ldc}");
            for (i, (r, w)) in run.iter().zip(&want).enumerate() {
                let (row, col) = (i / ldc, i % ldc);
                assert_eq!(r.to_bits(), w.to_bits(), "{label}: row {row}, column {col}");
            }
            products += 4 * steps / 16;
        }
        (cases.len(), products)
    }

    /// On a CPU with AMX the native kernel equals its stand-in exactly.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn native_amx_kernel_equals_its_stand_in() {
        if Isa::new(IsaKind::Amx).is_none() {
            eprintln!("SKIPPED: this CPU lacks AMX; the native AMX kernel test did not run");
            return;
        }
        // SAFETY: this CPU runs AMX, and Linux granted the tile state (the token exists).
        unsafe { check_amx_kernel() };
        eprintln!("ran the AMX kernel natively");
    }

    /// The AVX-512 epilogue writes the plain one's bits, with plain or non-temporal stores:
    /// on rounding ties to both sides, NaN (kept quiet without ReLU, 0 with it), infinities,
    /// −0, negative values, with and without a residual, over two whole lines and a partial
    /// third (71 columns), into an aligned output and one a value off (where streaming
    /// falls back to plain stores).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_epilogue_writes_the_plain_epilogues_bits() {
        if Isa::new(IsaKind::Avx512).is_none() {
            eprintln!("SKIPPED: this CPU lacks AVX-512F; the AVX-512 epilogue test did not run");
            return;
        }
        let (rows, ldt, cols) = (3, 80, 71);
        let special = [
            f32::from_bits(0x3F80_8000), // a tie, rounds down to even
            f32::from_bits(0x3F81_8000), // a tie, rounds up to even
            f32::from_bits(0x7FC1_2345), // a quiet NaN with a payload
            f32::from_bits(0x7F80_0001), // a signalling NaN
            f32::from_bits(0x7FFF_FFFF), // a NaN that rounding would carry into −0
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            -3.7e-39, // subnormal
        ];
        let tile: Vec<f32> = (0..rows * ldt)
            .map(|i| match i % 11 {
                0..9 => special[(i / 11) % special.len()],
                _ => (i as f32 * 0.731).sin() * 40.0,
            })
            .collect();
        let bias: Vec<f32> = (0..cols).map(|j| (j as f32 - 30.0) * 0.013).collect();
        let ldo = 96;
        let residual: Vec<u16> = (0..rows * ldo)
            .map(|i| bf16_bits(((i * 37 % 101) as f32 - 50.0) * 0.21))
            .collect();
        let mut cases = 0;
        for relu in [false, true] {
            for res in [None, Some(&residual)] {
                let r = res.map_or(std::ptr::null(), |r| r.as_ptr());
                let mut want = vec![0u16; rows * ldo];
                let w = want.as_mut_ptr();
                // SAFETY: `want` and `residual` hold rows × ldo ≥ cols values per row.
                unsafe { store_bf16(&tile, ldt, (rows, cols), w, ldo, bias.as_ptr(), r, relu) };
                let (plain, stream): (StoreFn, StoreFn) = (
                    x86::store_bf16_avx512::<false>,
                    x86::store_bf16_avx512::<true>,
                );
                for (store, offset) in [(plain, 0), (plain, 1), (stream, 0), (stream, 1)] {
                    let mut buf = AlignedBuf::default();
                    buf.ensure(rows * ldo + 32);
                    let got = &mut buf.as_bf16_mut()[offset..][..rows * ldo];
                    // SAFETY: AVX-512F is here (the token); operands as for `store_bf16`.
                    unsafe {
                        let o = got.as_mut_ptr();
                        store(&tile, ldt, (rows, cols), o, ldo, bias.as_ptr(), r, relu);
                        std::arch::x86_64::_mm_sfence();
                    }
                    assert_eq!(got, &want[..], "relu {relu}, residual {}", res.is_some());
                    cases += 1;
                }
                if !relu {
                    assert!(
                        want.iter().any(|&b| b & 0x7FC0 == 0x7FC0),
                        "NaN must be kept"
                    );
                }
            }
        }
        assert_eq!(cases, 16);
        eprintln!("ran the AVX-512 epilogue natively");
    }
}
