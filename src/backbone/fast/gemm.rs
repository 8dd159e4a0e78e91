//! Convolution as a packed matrix product with a fused epilogue, for NHWC activations.
//!
//! The classic GotoBLAS/BLIS decomposition (Goto & van de Geijn, "Anatomy of
//! High-Performance Matrix Multiplication", 2008): the output `C [M, N]` (M = pixels of the
//! batch, N = output channels) is computed in `MR × NR` tiles by a register-blocked
//! micro-kernel that streams a `KC`-long sliver of packed activations (`A`) and packed weights
//! (`B`).
//!
//! * `B` (weights) is packed once, at load time, into `NR`-column panels in the order the
//!   micro-kernel reads them, so nothing about the weights is redone per image.
//! * `A` is packed per `MC × KC` block straight from the NHWC activations, row-major: for a
//!   k×k convolution the packer copies the im2col rows' runs on the fly (an "implicit
//!   GEMM"), so no im2col matrix is ever materialised, and a 1×1 stride-1 one reads its
//!   input rows in place. The micro-kernels broadcast `A` from `MR` rows; BLIS's transposed
//!   `A` panels cost the packer a strided scalar store per value, 2× the packing time.
//! * The epilogue — folded-BN bias, the residual add of a bottleneck and the ReLU — is applied
//!   to the accumulators of the last `KC` block before they are stored: every activation is
//!   written once per layer.
//!
//! Micro-kernels are chosen at run time ([`crate::isa::Isa`]): AVX-512F (6×64) and AVX2 + FMA
//! (6×16) are one intrinsics macro instantiated per instruction set, with a plain-Rust 4×8
//! kernel as the portable fallback; the AVX-512 blockings are also tested on CPUs without
//! AVX-512, with their micro-kernels replaced by the same arithmetic in plain Rust.
//!
//! This module's [`conv`] is the f32 path; its `winograd` submodule runs the 3×3 stride-1
//! layers as 36 or 16 such products on Winograd-transformed tiles. bf16 runs the dataflow of
//! the `bf16` submodule ([`conv_bf16`]): bf16 activations in memory, row-major `A`,
//! whole-depth products, on AMX tiles (32×32), AVX512-BF16's `vdpbf16ps` (12×32, the same
//! macro as the f32 kernels), or, without either, the f32 kernels on operands rounded to
//! bf16. [`PackedB`] packs the weights
//! for all of them: f32, f32 rounded to bf16, or bf16 pairs (two consecutive k per 32-bit
//! word, the VNNI layout both bf16 instructions read).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::isa::Isa;
#[cfg(target_arch = "x86_64")]
use crate::isa::{AmxBf16, Avx2Fma, Avx512, Avx512Bf16};

mod bf16;
mod winograd;

pub use bf16::Blocking as Bf16Blocking;
pub(crate) use bf16::{Act, bf16_to_f32, conv as conv_bf16};
pub(crate) use winograd::{Buffers as WinogradBuffers, Tile as WinogradTile, Winograd};

/// The pointer type every micro-kernel takes: `steps` k-steps of `a` and packed `b` (f32
/// words; for bf16, each word holds two bf16 values of consecutive k), accumulated into the
/// tile at `c` (row stride `ldc`), finished by `ep`. `a` is `MR` rows `lda` apart: packed
/// rows, or a 1×1 convolution's NHWC input read in place. The AMX kernel writes its raw
/// tile whatever `ep` says: the bf16 dataflow finishes tiles itself.
pub(crate) type MicroFn = unsafe fn(
    steps: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    ep: &Epilogue,
);

/// The micro-kernel a [`Tiling`] runs. The x86-64 variants hold the token that proves this
/// CPU runs the kernel's instructions, so a `Kernel` (and hence a `Tiling`) cannot exist for
/// a kernel the CPU lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// Plain Rust, 4×8.
    Portable,
    /// AVX2 + FMA, 6×16.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2Fma),
    /// AVX-512F, 6×64.
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
    /// AVX512-BF16 `vdpbf16ps` on bf16 pairs, 12×32.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16(Avx512Bf16),
    /// AMX `tdpbf16ps` on tiles, 32×32.
    #[cfg(target_arch = "x86_64")]
    Amx(AmxBf16),
    /// Test stand-in for the AVX-512F f32 kernel: its blocking and arithmetic in plain
    /// Rust, so they run on any CPU.
    #[cfg(all(test, target_arch = "x86_64"))]
    EmulatedAvx512,
    /// Test stand-in for the AVX512-BF16 kernel: its blocking and `vdpbf16ps`'s arithmetic
    /// in plain Rust.
    #[cfg(all(test, target_arch = "x86_64"))]
    EmulatedDpbf16,
    /// Test stand-in for the AMX kernel: its blocking and `tdpbf16ps`'s arithmetic in plain
    /// Rust.
    #[cfg(test)]
    EmulatedAmx,
    /// A measuring instrument, not a kernel: AMX's blocking whose products cost nothing
    /// (each tile zeroed, as `tilezero` and `tilestored` leave it), for what the bf16
    /// dataflow costs beside the products on any CPU.
    #[cfg(test)]
    FreeProducts,
}

/// Blocking of one micro-kernel family, and how its operands are packed. The fields are
/// private: a `Tiling` only comes from [`Tiling::new`], whose [`Isa`] proves the CPU runs
/// its micro-kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tiling {
    /// Rows of the register tile.
    mr: usize,
    /// Columns of the register tile (a multiple of the vector width).
    nr: usize,
    /// Depth of one packed block of the f32 path, in k values (the bf16 dataflow reduces the
    /// whole depth in one call).
    kc: usize,
    /// Rows of one packed `A` block (a multiple of `mr`); sized to stay in L2.
    mc: usize,
    /// Operands are bf16 pairs (two consecutive k per 32-bit word), for `vdpbf16ps`.
    pairs: bool,
    /// Operands are f32 rounded to bf16 first (bf16 emulated by the f32 kernels).
    round: bool,
    /// Activations are bf16 in memory (the bf16 dataflow, `bf16::conv`), whatever the kernel.
    bf16_act: bool,
    /// The packed depth is a multiple of this many k values: 32 for AMX tiles (64 bytes of
    /// bf16), 2 for bf16 pairs, else 1.
    kalign: usize,
    /// The micro-kernel.
    kernel: Kernel,
    /// How the bf16 dataflow blocks its products (not the f32 path's `kc`/`mc`).
    bf16_blocking: Bf16Blocking,
}

impl Tiling {
    /// The blocking and micro-kernel for `isa`, with bf16 operands when `bf16`.
    pub fn new(isa: Isa, bf16: bool) -> Tiling {
        let kernel = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx(t) if bf16 => Kernel::Amx(t),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx(t) => Kernel::Avx512(t.avx512_bf16().avx512()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16(t) if bf16 => Kernel::Avx512Bf16(t),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16(t) => Kernel::Avx512(t.avx512()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(t) => Kernel::Avx512(t),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma(t) => Kernel::Avx2(t),
            _ => Kernel::Portable,
        };
        Tiling::for_kernel(kernel, bf16)
    }

    /// The blocking of `kernel`.
    fn for_kernel(kernel: Kernel, bf16: bool) -> Tiling {
        // KC sets one B sliver (KC × NR × 4 bytes): 16 KiB, half of a 32 KiB L1, for the
        // portable and AVX2 kernels; 32 KiB for AVX-512's, which ran ResNet-50 ~5 % faster
        // than 16 KiB on a Zen 4 (12×32 tiles; 3 A/B runs of 9–15 rounds; 64 KiB gained
        // nothing more, and doubling MC lost 5 %), and as fast as 64 KiB on an Ice Lake
        // (6×64). MC keeps the packed A block (MC × KC × 4 bytes) well inside a 512 KiB–1 MiB
        // L2. With bf16 pairs KC counts k values, two per word.
        //
        // AVX-512 f32 is 6×64 rather than 12×32: the same 24 accumulators, but 6 broadcasts
        // and 4 loads of B per step instead of 12 and 2. On an Ice Lake, whose two FMA units
        // wait on the loads, ResNet-50 ran 1.08–1.14× faster in f32 and 1.13× in emulated
        // bf16 (bench/README.md); `vdpbf16ps` stays 12×32, as fast as 6×64 on a Zen 4.
        let (mr, nr, kc, mc, pairs) = match kernel {
            Kernel::Portable => (4, 8, 256, 64, false),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(_) => (6, 16, 256, 96, false),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(_) => (6, 64, 128, 144, false),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16(_) => (12, 32, 256, 144, true),
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(_) => (32, 32, 256, 128, true),
            #[cfg(all(test, target_arch = "x86_64"))]
            Kernel::EmulatedAvx512 => (6, 64, 128, 144, false),
            #[cfg(all(test, target_arch = "x86_64"))]
            Kernel::EmulatedDpbf16 => (12, 32, 256, 144, true),
            #[cfg(test)]
            Kernel::EmulatedAmx | Kernel::FreeProducts => (32, 32, 256, 128, true),
        };
        let kalign = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(_) => 32,
            #[cfg(test)]
            Kernel::EmulatedAmx | Kernel::FreeProducts => 32,
            _ if pairs => 2,
            _ => 1,
        };
        Tiling {
            mr,
            nr,
            kc,
            mc,
            pairs,
            round: bf16 && !pairs,
            bf16_act: bf16,
            kalign,
            kernel,
            bf16_blocking: Bf16Blocking::default(),
        }
    }

    /// Configures AMX's tiles on this thread when the kernel is AMX's (released when the
    /// value is dropped); `None` for every other kernel.
    #[cfg(target_arch = "x86_64")]
    fn tile_session(&self) -> Option<bf16::amx::TileSession> {
        match self.kernel {
            // SAFETY: the `AmxBf16` token proves the CPU has AMX and Linux granted the tiles.
            Kernel::Amx(_) => Some(unsafe { bf16::amx::TileSession::start() }),
            _ => None,
        }
    }

    /// No AMX outside x86-64.
    #[cfg(not(target_arch = "x86_64"))]
    fn tile_session(&self) -> Option<()> {
        None
    }

    /// The micro-kernel of `self.kernel`. Calling it is sound on this CPU: the x86-64
    /// variants of [`Kernel`] hold the token proving their instructions are available.
    fn micro(&self) -> MicroFn {
        match self.kernel {
            Kernel::Portable => f32_portable,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(_) => x86::f32_avx2,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(_) => x86::f32_avx512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16(_) => x86::bf16_avx512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(_) => bf16::amx::amx_32x32,
            #[cfg(all(test, target_arch = "x86_64"))]
            Kernel::EmulatedAvx512 => tests::f32_6x64,
            #[cfg(all(test, target_arch = "x86_64"))]
            Kernel::EmulatedDpbf16 => tests::bf16_pairs_12x32,
            #[cfg(test)]
            Kernel::EmulatedAmx => bf16::tests::amx_32x32,
            #[cfg(test)]
            Kernel::FreeProducts => bf16::tests::free_32x32,
        }
    }

    /// The bf16 dataflow's epilogue compiled for this kernel's instruction set, with
    /// non-temporal stores when `stream` and the instruction set has them (AVX-512). Calling
    /// it is sound on this CPU, as for [`Tiling::micro`].
    fn store_bf16(&self, stream: bool) -> bf16::StoreFn {
        #[cfg(target_arch = "x86_64")]
        let avx512: bf16::StoreFn = if stream {
            bf16::x86::store_bf16_avx512::<true>
        } else {
            bf16::x86::store_bf16_avx512::<false>
        };
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512(_) | Kernel::Avx512Bf16(_) | Kernel::Amx(_) => avx512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(_) => bf16::x86::store_bf16_avx2,
            // The instrument stands in for AMX, whose CPUs have AVX-512.
            #[cfg(all(test, target_arch = "x86_64"))]
            Kernel::FreeProducts if std::arch::is_x86_feature_detected!("avx512f") => avx512,
            _ => {
                let _ = stream;
                bf16::store_bf16
            }
        }
    }

    /// True when activations are bf16 in memory (run with [`conv_bf16`], not [`conv`]).
    pub fn bf16_act(&self) -> bool {
        self.bf16_act
    }

    /// How the bf16 dataflow blocks its products.
    pub fn bf16_blocking(&self) -> Bf16Blocking {
        self.bf16_blocking
    }

    /// Sets [`Tiling::bf16_blocking`] (packed weights do not depend on it).
    pub fn set_bf16_blocking(&mut self, blocking: Bf16Blocking) {
        self.bf16_blocking = blocking;
    }

    /// True when the products run on bf16 pairs with `vdpbf16ps` (native bf16).
    pub fn pairs(&self) -> bool {
        self.pairs
    }

    /// log2 of k values per packed word: 1 for bf16 pairs, else 0.
    fn shift(&self) -> usize {
        usize::from(self.pairs)
    }
}

/// The AMX blocking with `tdpbf16ps` emulated in plain Rust, for tests on any CPU.
#[cfg(test)]
pub(crate) fn emulated_amx_tiling() -> Tiling {
    Tiling::for_kernel(Kernel::EmulatedAmx, true)
}

/// AMX's blocking with products that cost nothing ([`Kernel::FreeProducts`]).
#[cfg(test)]
pub(crate) fn free_products_tiling() -> Tiling {
    Tiling::for_kernel(Kernel::FreeProducts, true)
}

/// The `vdpbf16ps` blocking with the instruction emulated in plain Rust, for tests.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn emulated_dpbf16_tiling() -> Tiling {
    Tiling::for_kernel(Kernel::EmulatedDpbf16, true)
}

/// What to do with a tile's accumulators before storing them.
#[derive(Debug)]
pub(crate) struct Epilogue {
    /// Add the tile's current content (the partial sums of earlier k blocks).
    pub accumulate: bool,
    /// Per-column bias (folded batch norm), or null when this is not the last k block.
    pub bias: *const f32,
    /// Residual to add (row stride `ldr`), or null.
    pub residual: *const f32,
    /// Row stride of `residual`.
    pub ldr: usize,
    /// Clamp at zero after the bias and residual.
    pub relu: bool,
    /// Valid rows of the tile (≤ MR).
    pub rows: usize,
    /// Valid columns of the tile (≤ NR).
    pub cols: usize,
}

/// Finishes a tile: adds earlier partial sums, then (last k block only) bias, residual and
/// ReLU, and stores the valid part. Inlined into each micro-kernel so it is vectorised with
/// the kernel's instruction set.
#[inline(always)]
unsafe fn finish<const MR: usize, const NR: usize>(
    mut acc: [[f32; NR]; MR],
    c: *mut f32,
    ldc: usize,
    ep: &Epilogue,
) {
    let full = ep.rows == MR && ep.cols == NR;
    let (rows, cols) = if full { (MR, NR) } else { (ep.rows, ep.cols) };
    // SAFETY: (the whole function) the caller guarantees `c` (and `bias`, `residual` when not
    // null) address at least `rows` rows of `cols` valid values with the given strides.
    unsafe {
        if full {
            // Constant bounds: these loops become straight vector code.
            if ep.accumulate {
                for (i, row) in acc.iter_mut().enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v += *c.add(i * ldc + j);
                    }
                }
            }
            if !ep.bias.is_null() {
                for row in acc.iter_mut() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v += *ep.bias.add(j);
                    }
                }
                if !ep.residual.is_null() {
                    for (i, row) in acc.iter_mut().enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v += *ep.residual.add(i * ep.ldr + j);
                        }
                    }
                }
                if ep.relu {
                    for row in acc.iter_mut() {
                        for v in row.iter_mut() {
                            *v = v.max(0.0);
                        }
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    *c.add(i * ldc + j) = *v;
                }
            }
        } else {
            for (i, row) in acc.iter().enumerate().take(rows) {
                for (j, &a) in row.iter().enumerate().take(cols) {
                    let mut v = a;
                    if ep.accumulate {
                        v += *c.add(i * ldc + j);
                    }
                    if !ep.bias.is_null() {
                        v += *ep.bias.add(j);
                        if !ep.residual.is_null() {
                            v += *ep.residual.add(i * ep.ldr + j);
                        }
                        if ep.relu {
                            v = v.max(0.0);
                        }
                    }
                    *c.add(i * ldc + j) = v;
                }
            }
        }
    }
}

/// The f32 micro-kernel body: `acc[i][j] += a[i][p] · b[p][j]` over `steps` k-steps, `b`
/// packed `NR` values per step, `a` read from `MR` rows `lda` apart. With `FMA` the products
/// are fused multiply-adds (only where the target feature makes them single instructions).
#[inline(always)]
unsafe fn f32_body<const MR: usize, const NR: usize, const FMA: bool>(
    steps: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    ep: &Epilogue,
) {
    // SAFETY: forwarded from the caller.
    let acc = unsafe { f32_loop::<MR, NR, FMA>(steps, a, lda, b) };
    // SAFETY: forwarded from the caller.
    unsafe { finish::<MR, NR>(acc, c, ldc, ep) }
}

/// The accumulation loop of [`f32_body`].
#[inline(always)]
unsafe fn f32_loop<const MR: usize, const NR: usize, const FMA: bool>(
    steps: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..steps {
        // SAFETY: `b` holds `steps` steps of NR values; `a` holds MR rows of at least
        // `steps` values.
        let bp = unsafe { b.add(p * NR) };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: i < MR and p < steps, inside `a` as above.
            let av = unsafe { *a.add(i * lda + p) };
            for (j, v) in row.iter_mut().enumerate() {
                // SAFETY: j < NR, inside step p of `b`.
                let bv = unsafe { *bp.add(j) };
                *v = if FMA {
                    av.mul_add(bv, *v)
                } else {
                    *v + av * bv
                };
            }
        }
    }
    acc
}

/// Portable 4×8 f32 micro-kernel (separate multiply and add: without a target feature,
/// `mul_add` would be a slow library call).
///
/// # Safety
/// As [`MicroFn`], for a 4×8 tile.
unsafe fn f32_portable(
    steps: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    ep: &Epilogue,
) {
    // SAFETY: forwarded from the caller.
    unsafe { f32_body::<4, 8, false>(steps, a, lda, b, c, ldc, ep) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 micro-kernels, written with explicit intrinsics so they are fast at any
    //! optimisation level (the test profile builds this crate at opt-level 1, where LLVM does
    //! not vectorise). Rows are unrolled by the macro with literal indices, which lets even
    //! opt-level 1 keep every accumulator in a register. Each kernel is only reachable through
    //! a [`super::Tiling`] whose `Kernel` holds the token (`crate::isa`) proving its target
    //! features.

    use std::arch::x86_64::*;

    use super::{Epilogue, finish};

    /// f32 fused multiply-add on 256-bit vectors: `acc + a · b`.
    macro_rules! fma256 {
        ($acc:expr, $a:expr, $b:expr) => {
            _mm256_fmadd_ps($a, $b, $acc)
        };
    }

    /// f32 fused multiply-add on 512-bit vectors: `acc + a · b`.
    macro_rules! fma512 {
        ($acc:expr, $a:expr, $b:expr) => {
            _mm512_fmadd_ps($a, $b, $acc)
        };
    }

    /// bf16 pair dot product into f32: `acc + a.lo · b.lo + a.hi · b.hi` per 32-bit lane.
    macro_rules! dpbf16 {
        ($acc:expr, $a:expr, $b:expr) => {
            _mm512_dpbf16_ps(
                $acc,
                std::mem::transmute::<__m512, __m512bh>($a),
                std::mem::transmute::<__m512, __m512bh>($b),
            )
        };
    }

    /// `[$loadu(p), $loadu(p + lanes), …]`: one vector per listed index.
    macro_rules! load_vectors {
        ($loadu:ident, $p:expr, $lanes:expr, [$($v:literal),*]) => {
            [$($loadu($p.add($v * $lanes))),*]
        };
    }

    /// `acc[v] = mac(acc[v], a, b[v])` for every listed `v`.
    macro_rules! mac_row {
        ($mac:ident, $acc:expr, $a:expr, $b:expr, [$($v:literal),*]) => {
            $( $acc[$v] = $mac!($acc[$v], $a, $b[$v]); )*
        };
    }

    /// A micro-kernel of `rows` × (`vectors` vectors of `lanes`) accumulators. `mac` is the
    /// multiply-accumulate; the bf16 kernel only differs by it (and by `a`, `b` holding
    /// bf16 pairs, moved bit for bit by the f32 loads and broadcasts).
    macro_rules! simd_kernel {
        (
            $(#[$doc:meta])*
            $name:ident, $feat:literal, $V:ty, $lanes:literal, [$($r:literal),*],
            $vs:tt,
            $zero:ident, $splat:ident, $loadu:ident, $storeu:ident, $add:ident, $max:ident,
            $mac:ident
        ) => {
            $(#[$doc])*
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                steps: usize,
                a: *const f32,
                lda: usize,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                ep: &Epilogue,
            ) {
                const MR: usize = [$($r),*].len();
                const L: usize = $lanes;
                const NV: usize = $vs.len();
                const NR: usize = NV * L;
                let mut acc = [[$zero(); NV]; MR];
                // SAFETY: (the whole body) `b` holds `steps` steps of NR words (read with
                // unaligned loads: nothing relies on `PackedB`'s alignment); `a` holds MR
                // rows of `steps` words, `lda` apart; `c`, the bias and the residual cover
                // the tile as `ep` describes (see `MicroFn`); the CPU has the target
                // features (see the module docs).
                unsafe {
                    let mut bp = b;
                    let mut ap = a;
                    for _ in 0..steps {
                        let bv: [$V; NV] = load_vectors!($loadu, bp, L, $vs);
                        $(
                            let av = $splat(*ap.add($r * lda));
                            mac_row!($mac, acc[$r], av, bv, $vs);
                        )*
                        ap = ap.add(1);
                        bp = bp.add(NR);
                    }
                    if ep.rows == MR && ep.cols == NR {
                        // The epilogue on registers: earlier partial sums, bias, residual,
                        // ReLU, one store.
                        let zero = $zero();
                        $(
                            for (j, x) in acc[$r].into_iter().enumerate() {
                                let v = j * L;
                                let cp = c.add($r * ldc + v);
                                let mut x = x;
                                if ep.accumulate {
                                    x = $add(x, $loadu(cp));
                                }
                                if !ep.bias.is_null() {
                                    x = $add(x, $loadu(ep.bias.add(v)));
                                    if !ep.residual.is_null() {
                                        x = $add(x, $loadu(ep.residual.add($r * ep.ldr + v)));
                                    }
                                    if ep.relu {
                                        x = $max(x, zero);
                                    }
                                }
                                $storeu(cp, x);
                            }
                        )*
                    } else {
                        let mut out = [[0f32; NR]; MR];
                        $(
                            for (j, x) in acc[$r].into_iter().enumerate() {
                                $storeu(out[$r].as_mut_ptr().add(j * L), x);
                            }
                        )*
                        finish::<MR, NR>(out, c, ldc, ep);
                    }
                }
            }
        };
    }

    simd_kernel!(
        /// AVX2 + FMA f32 micro-kernel, 6×16: 12 ymm accumulators, 2 for B, 1 broadcast.
        ///
        /// # Safety
        /// The CPU supports AVX2 and FMA; pointers as for [`super::MicroFn`].
        f32_avx2, "avx2,fma", __m256, 8, [0, 1, 2, 3, 4, 5], [0, 1],
        _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps,
        _mm256_max_ps, fma256
    );

    simd_kernel!(
        /// AVX-512F f32 micro-kernel, 6×64: 24 zmm accumulators, 4 for B, 1 broadcast.
        ///
        /// # Safety
        /// The CPU supports AVX-512F; pointers as for [`super::MicroFn`].
        f32_avx512, "avx512f", __m512, 16, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3],
        _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps,
        _mm512_max_ps, fma512
    );

    simd_kernel!(
        /// AVX512-BF16 micro-kernel, 12×32: each packed word holds two bf16 of consecutive
        /// k, and `vdpbf16ps` adds both products of a pair to the f32 accumulator.
        ///
        /// # Safety
        /// The CPU supports AVX-512F and AVX512-BF16; pointers as for [`super::MicroFn`],
        /// with bf16-pair words.
        bf16_avx512, "avx512f,avx512bf16", __m512, 16, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1],
        _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps,
        _mm512_max_ps, dpbf16
    );
}

/// bf16 bits of `v`, rounded to nearest even (as `vcvtne2ps2bf16`; NaN stays a quiet NaN):
/// bit for bit `half::bf16::from_f32(v).to_bits()` (a test checks every high half-word), but
/// branch-free. `half` branches on the mantissa's rounding bits, which mispredicts on half
/// of all activations: packing them, emulated bf16 ran 2.3× longer in the packer (1.6 →
/// 3.7 thread-seconds per ResNet-50 pass of 16 images). The weights, packed once at load,
/// go through `half` itself.
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        // Keep NaN a (quiet) NaN rather than letting the rounding carry into infinity.
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` rounded to the nearest bf16, as an f32 (as [`bf16_bits`]): the tests' operands.
#[cfg(test)]
pub(crate) fn round_bf16(v: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(v)) << 16)
}

/// A heap buffer of f32 words whose start is aligned to 64 bytes (one cache line, one zmm).
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<f32>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` words.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::default();
        b.ensure(len);
        b
    }

    /// Grows to at least `len` words (contents are not preserved when it grows).
    pub fn ensure(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        self.raw = vec![0f32; len + 16];
        self.offset = self.raw.as_ptr().align_offset(64).min(15);
        self.len = len;
    }

    /// The aligned words.
    pub fn as_slice(&self) -> &[f32] {
        &self.raw[self.offset..self.offset + self.len]
    }

    /// The aligned words, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.raw[self.offset..self.offset + self.len]
    }

    /// The aligned words as twice as many bf16 bit patterns.
    pub fn as_bf16(&self) -> &[u16] {
        let words = self.as_slice();
        // SAFETY: the f32 words are initialised memory of 2·len u16 values, u16's alignment (2)
        // divides f32's, and every bit pattern is a valid u16; the borrow is carried over.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 2) }
    }

    /// The aligned words as twice as many bf16 bit patterns, writable.
    pub fn as_bf16_mut(&mut self) -> &mut [u16] {
        let words = self.as_mut_slice();
        // SAFETY: as for `as_bf16`; every u16 pattern written is a valid half of an f32 word.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 2) }
    }
}

/// A convolution's geometry (square kernels, as in ResNet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel side.
    pub ksize: usize,
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl ConvGeom {
    /// Depth of the matrix product: `ksize² · cin`, ordered (ky, kx, ci) with ci fastest,
    /// matching NHWC.
    pub fn k(&self) -> usize {
        self.ksize * self.ksize * self.cin
    }

    /// Output size along one axis of input size `n`.
    pub fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.pad).saturating_sub(self.ksize) / self.stride + 1
    }

    /// True for the 1×1, stride-1 case: `A` is the activation matrix itself.
    fn is_pointwise(&self) -> bool {
        self.ksize == 1 && self.stride == 1 && self.pad == 0
    }
}

/// Weights `[cout, cin, k, k]` (PyTorch's layout) packed for one [`Tiling`]:
/// `NR`-column panels of `B [k, cout]`, k-steps contiguous within a panel. It remembers the
/// tiling and geometry it was packed for, and [`conv`] refuses any other.
#[derive(Debug)]
pub(crate) struct PackedB {
    data: AlignedBuf,
    /// k padded to the packing granularity (even for bf16 pairs).
    kp: usize,
    panels: usize,
    tiling: Tiling,
    geom: ConvGeom,
}

impl PackedB {
    /// Packs `w` (`[cout, cin, k, k]`, row-major) for `t`. Errors when the geometry is
    /// degenerate (a zero size or stride) or `w` does not hold `cout · cin · k²` values.
    pub fn new(w: &[f32], g: &ConvGeom, t: &Tiling) -> Result<PackedB> {
        let k = g.k();
        if g.cin == 0 || g.cout == 0 || g.ksize == 0 || g.stride == 0 || w.len() != g.cout * k {
            return Err(Error::invalid(
                "convolution weights",
                format!("{} values for {g:?} (need {})", w.len(), g.cout * k),
            ));
        }
        let kp = k.next_multiple_of(t.kalign);
        let panels = g.cout.div_ceil(t.nr);
        let steps = kp >> t.shift();
        let mut data = AlignedBuf::zeroed(panels * steps * t.nr);
        let taps = g.ksize * g.ksize;
        // Element (k, co) of B, with k = tap · cin + ci.
        let at = |kk: usize, co: usize| -> f32 {
            if kk >= k || co >= g.cout {
                return 0.0;
            }
            let (tap, ci) = (kk / g.cin, kk % g.cin);
            w[(co * g.cin + ci) * taps + tap]
        };
        let out = data.as_mut_slice();
        for j in 0..panels {
            for s in 0..steps {
                for c in 0..t.nr {
                    let co = j * t.nr + c;
                    let bf16 = |v: f32| half::bf16::from_f32(v);
                    out[(j * steps + s) * t.nr + c] = if t.pairs {
                        // Even k in the low half: the same order `put` gives packed A.
                        let lo = u32::from(bf16(at(2 * s, co)).to_bits());
                        let hi = u32::from(bf16(at(2 * s + 1, co)).to_bits());
                        f32::from_bits(lo | (hi << 16))
                    } else if t.round {
                        bf16(at(s, co)).to_f32()
                    } else {
                        at(s, co)
                    };
                }
            }
        }
        Ok(PackedB {
            data,
            kp,
            panels,
            tiling: *t,
            geom: *g,
        })
    }

    /// The convolution these weights belong to.
    pub fn geom(&self) -> ConvGeom {
        self.geom
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.as_slice().len() * 4
    }
}

/// A channels-last (NHWC) activation `[batch, h, w, c]`, the input of a convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    /// `[batch, h, w, c]`, row-major.
    pub data: &'a [f32],
    /// Images.
    pub batch: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

/// Packs rows `[m, m + valid)` of the implicit im2col matrix of `src` under `g`, k
/// `[k0, k0 + kc)` (k past `g.k()` zero), row-major into `dst`: row `r` at `r · lda`. Rows
/// `[valid, mr)` are zero.
///
/// For a fixed kernel row `ky`, the k values `(kx, ci)` of one output pixel are contiguous
/// in NHWC memory wherever the input column is inside the image, so each row is copied as
/// at most three runs per `ky`: left padding, image, right padding.
///
/// # Safety
/// `dst` holds `mr` rows of `lda ≥ kc` words; `src` holds the whole activation.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_panel(
    src: &Source,
    g: &ConvGeom,
    (oh, ow): (usize, usize),
    m: usize,
    valid: usize,
    (k0, kc): (usize, usize),
    (mr, lda): (usize, usize),
    dst: *mut f32,
) {
    let k = g.k();
    let per_ky = g.ksize * g.cin;
    let (w, cin) = (src.w as isize, g.cin as isize);
    let base = src.data.as_ptr();
    // SAFETY: (every write and read below) r < mr and kk + run ≤ kc ≤ lda stay inside
    // `dst`; reads are at ((n·h + iy)·w + ix)·c + ci with iy, ix inside the image and ci < c.
    unsafe {
        let mut px = OutPixel::of_row(m, (oh, ow));
        for r in 0..mr {
            let row = dst.add(r * lda);
            if r >= valid {
                row.write_bytes(0, kc);
                continue;
            }
            if r > 0 {
                px.step((oh, ow));
            }
            let OutPixel { n, oy, ox } = px;
            // Input column at kx = 0, and the kx range that falls inside the image.
            let ix0 = (ox * g.stride) as isize - g.pad as isize;
            let kx_lo = (-ix0).clamp(0, g.ksize as isize);
            let kx_hi = (w - ix0).clamp(0, g.ksize as isize);
            let (lo, hi) = ((kx_lo * cin) as usize, (kx_hi * cin) as usize);
            let mut kk = 0;
            // The kernel row of k0 + kk and the offset inside it, stepped along with the runs.
            let (mut ky, mut within) = (k0 / per_ky, k0 % per_ky);
            while kk < kc {
                if k0 + kk >= k {
                    row.add(kk).write_bytes(0, kc - kk);
                    break;
                }
                let row_left = (per_ky - within).min(kc - kk);
                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                let inside = iy >= 0 && iy < src.h as isize;
                let run = if !inside || within >= hi {
                    row_left
                } else if within < lo {
                    (lo - within).min(row_left)
                } else {
                    (hi - within).min(row_left)
                };
                if inside && within >= lo && within < hi {
                    let off =
                        ((n as isize * src.h as isize + iy) * w + ix0) * cin + within as isize;
                    row.add(kk).copy_from_nonoverlapping(base.offset(off), run);
                } else {
                    row.add(kk).write_bytes(0, run);
                }
                kk += run;
                within += run;
                if within == per_ky {
                    (ky, within) = (ky + 1, 0);
                }
            }
        }
    }
}

/// The output pixel `[n, oy, ox]` of an im2col row, stepped along with the rows, so that a
/// packer divides once per block of rows rather than four times per row.
#[derive(Debug, Clone, Copy)]
struct OutPixel {
    n: usize,
    oy: usize,
    ox: usize,
}

impl OutPixel {
    /// The pixel of row `m` of an output of `oh × ow` pixels per image.
    fn of_row(m: usize, (oh, ow): (usize, usize)) -> OutPixel {
        let (n, rest) = (m / (oh * ow), m % (oh * ow));
        OutPixel {
            n,
            oy: rest / ow,
            ox: rest % ow,
        }
    }

    /// Moves to the next row's pixel.
    #[inline(always)]
    fn step(&mut self, (oh, ow): (usize, usize)) {
        self.ox += 1;
        if self.ox == ow {
            self.ox = 0;
            self.oy += 1;
            if self.oy == oh {
                self.oy = 0;
                self.n += 1;
            }
        }
    }
}

/// Packs the rows `[m0, m0 + rows)` × k `[k0, k0 + kc)` into `dst`, `lda` words per row,
/// zeroing the rows up to the next multiple of `t.mr`.
///
/// # Safety
/// `dst` holds `ceil(rows / mr) · mr · lda` words, `lda ≥ kc`; `src` matches `g`.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block(
    src: &Source,
    g: &ConvGeom,
    ohw: (usize, usize),
    (m0, rows): (usize, usize),
    (k0, kc): (usize, usize),
    (t, lda): (&Tiling, usize),
    dst: *mut f32,
) {
    for p in 0..rows.div_ceil(t.mr) {
        let valid = t.mr.min(rows - p * t.mr);
        // SAFETY: panel p < ceil(rows / mr) starts inside `dst` (see the contract).
        let (m, d) = (m0 + p * t.mr, unsafe { dst.add(p * t.mr * lda) });
        // SAFETY: forwarded from the caller; panel p lies inside `dst`.
        unsafe { pack_panel(src, g, ohw, m, valid, (k0, kc), (t.mr, lda), d) }
    }
}

/// A raw pointer that may cross into the worker threads.
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);
// SAFETY: tasks partition the output into disjoint tiles (see `conv`), so no two threads
// ever write the same element; the residual is only read; the scope joins every worker
// before the buffers are used again.
unsafe impl Send for SharedPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// The pointer (a method, so that a closure captures the whole `SharedPtr`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The threads that run the matrix products: one persistent pool, kept alive for the whole
/// life of the network, instead of threads spawned in every convolution.
#[derive(Debug)]
pub(crate) struct Workers {
    /// `threads` workers; `None` for one thread (the caller's).
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl Workers {
    /// A pool of `threads` workers (at least one).
    pub fn new(threads: usize) -> Result<Workers> {
        let threads = threads.max(1);
        let pool = (threads > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("backbone-gemm-{i}"))
                    .build()
                    .map_err(|e| {
                        Error::invalid(
                            "backbone threads",
                            format!("cannot start {threads} worker threads: {e}"),
                        )
                    })
            })
            .transpose()?;
        Ok(Workers { pool, threads })
    }

    /// The caller's thread alone.
    pub fn single() -> Workers {
        Workers {
            pool: None,
            threads: 1,
        }
    }

    /// Threads per matrix product.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(first, piece)` on consecutive pieces of `data`, one per worker, each made of
    /// whole chunks of `chunk` values; `first` is the index of the piece's first chunk.
    pub fn split<T: Send>(&self, data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        let chunk = chunk.max(1);
        let chunks = data.len() / chunk;
        let per = chunks.div_ceil(self.threads).max(1);
        match &self.pool {
            Some(pool) if chunks > per => pool.scope(|s| {
                for (i, piece) in data.chunks_mut(per * chunk).enumerate() {
                    let f = &f;
                    s.spawn(move |_| f(i * per, piece));
                }
            }),
            _ => f(0, data),
        }
    }

    /// Runs `work` once on each worker, each with its own element of `state` (one per
    /// thread), when `parallel`; else once, on the caller's thread, with the first.
    pub fn each<T: Send>(&self, state: &mut [T], parallel: bool, work: impl Fn(&mut T) + Sync) {
        let Some((first, rest)) = state.split_first_mut() else {
            return;
        };
        match &self.pool {
            Some(pool) if parallel => pool.scope(|s| {
                for one in rest.iter_mut() {
                    let work = &work;
                    s.spawn(move |_| work(one));
                }
                work(first);
            }),
            _ => work(first),
        }
    }

    /// Runs `f` on consecutive ranges of `0..n`, one per worker.
    pub fn ranges(&self, n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
        let per = n.div_ceil(self.threads).max(1);
        match &self.pool {
            Some(pool) if n > per => pool.scope(|s| {
                for start in (0..n).step_by(per) {
                    let f = &f;
                    s.spawn(move |_| f(start..(start + per).min(n)));
                }
            }),
            _ => f(0..n),
        }
    }
}

/// Refuses weights packed for another tiling than `t`, or a tiling of the other dataflow
/// (`bf16`: the bf16 one).
fn check_packing(b: &PackedB, t: &Tiling, bf16: bool) -> Result<()> {
    // The bf16 blocking is a setting of the run, which the packing does not depend on.
    let packed = Tiling {
        bf16_blocking: t.bf16_blocking,
        ..b.tiling
    };
    if packed == *t && t.bf16_act == bf16 {
        return Ok(());
    }
    Err(Error::invalid(
        "packed convolution weights",
        format!(
            "packed for a {}×{} tiling ({:?}), run with a {}×{} {} one ({:?})",
            b.tiling.mr,
            b.tiling.nr,
            b.tiling.kernel,
            t.mr,
            t.nr,
            if bf16 { "bf16" } else { "f32" },
            t.kernel
        ),
    ))
}

/// The lengths of a convolution's buffers, checked by [`check_buffers`].
struct Lens {
    input: usize,
    output: usize,
    bias: usize,
    residual: Option<usize>,
    scratch: usize,
}

/// Checks that a `[batch, h, w, c]` input of `len.input` values and the other buffers hold
/// what the convolution `g` needs on `threads` workers; returns the rows of the product,
/// M = batch · oh · ow. `what` names the convolution in the error (`""` or `"bf16 "`).
fn check_buffers(
    what: &str,
    g: &ConvGeom,
    (batch, h, w, c): (usize, usize, usize, usize),
    len: Lens,
    threads: usize,
) -> Result<usize> {
    let (oh, ow, n) = (g.out_len(h), g.out_len(w), g.cout);
    // Sizes that overflow cannot be held by any buffer: treat them as too large.
    let product = |v: &[usize]| v.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    let input_len = product(&[batch, h, w, c]).unwrap_or(usize::MAX);
    let out_len = product(&[batch, oh, ow, n]).unwrap_or(usize::MAX);
    if c != g.cin
        || len.input < input_len
        || len.output < out_len
        || len.bias < n
        || len.residual.is_some_and(|r| r < out_len)
        || len.scratch < threads
    {
        return Err(Error::invalid(
            "convolution buffers",
            format!(
                "input {} values of {c} channels, output {} (need {out_len}), bias {} (need \
                 {n}), {} packing buffers for {threads} threads, for a {k}×{k} {what}\
                 convolution {}→{n} on a [{batch}, {h}, {w}, {c}] batch",
                len.input,
                len.output,
                len.bias,
                len.scratch,
                g.cin,
                k = g.ksize,
            ),
        ));
    }
    // out_len = m · n did not overflow (it fits in the output), so neither does m.
    Ok(batch * oh * ow)
}

/// The tasks of one convolution: blocks of `mc` rows, each split into column ranges of
/// panels when rows are few, handed out in order to whichever worker asks.
struct Schedule {
    m: usize,
    mc: usize,
    panels: usize,
    nsplit: usize,
    per: usize,
    tasks: usize,
    next: AtomicUsize,
}

impl Schedule {
    /// The tasks of `m` rows in blocks of `mc` and `panels` column panels for `threads`.
    fn new(m: usize, mc: usize, panels: usize, threads: usize) -> Schedule {
        let mblocks = m.div_ceil(mc);
        // Enough tasks to keep every thread busy: split the columns too when rows are few
        // (the last stage at batch 1 has 49 rows).
        let want = threads * 4;
        let nsplit = if mblocks >= want {
            1
        } else {
            want.div_ceil(mblocks).min(panels)
        };
        Schedule {
            m,
            mc,
            panels,
            nsplit,
            per: panels.div_ceil(nsplit),
            tasks: mblocks * nsplit,
            next: AtomicUsize::new(0),
        }
    }

    /// The next task not yet taken: its first row, its rows, and its panels; `None` when
    /// every task is taken.
    fn take(&self) -> Option<(usize, usize, std::ops::Range<usize>)> {
        loop {
            let task = self.next.fetch_add(1, Ordering::Relaxed);
            if task >= self.tasks {
                return None;
            }
            let (mb, ns) = (task / self.nsplit, task % self.nsplit);
            let m0 = mb * self.mc;
            let (j0, j1) = (ns * self.per, ((ns + 1) * self.per).min(self.panels));
            if j0 < j1 {
                return Some((m0, self.mc.min(self.m - m0), j0..j1));
            }
        }
    }

    /// Runs `work` on every worker of `workers`, each with its own `scratch` buffer, until
    /// the tasks are taken (on the caller's thread alone when there is one task or thread).
    fn run(
        &self,
        workers: &Workers,
        scratch: &mut [AlignedBuf],
        work: impl Fn(&mut AlignedBuf) + Sync,
    ) {
        workers.each(scratch, self.tasks > 1, work);
    }
}

/// One f32 convolution: `out [M, cout] = epilogue(im2col(src) · B)`, M = batch · oh · ow,
/// with `bias` added, `residual [M, cout]` added when given, then ReLU when `relu`.
///
/// `t` is the f32 tiling the caller runs and must be the one `b` was packed for: a mismatch
/// (or any buffer too small for the geometry `b` was packed for) is an error, never a
/// kernel call. `scratch` holds at least one packing buffer per worker; `pack_ns`, when
/// given, accumulates the thread-time spent packing `A`.
///
/// Results do not depend on the number of workers: every output tile is computed by one
/// task, in the same order of k blocks, whichever thread takes it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    src: &Source,
    b: &PackedB,
    bias: &[f32],
    t: &Tiling,
    out: &mut [f32],
    residual: Option<&[f32]>,
    relu: bool,
    workers: &Workers,
    scratch: &mut [AlignedBuf],
    pack_ns: Option<&AtomicU64>,
) -> Result<()> {
    check_packing(b, t, false)?;
    let g = &b.geom;
    let (oh, ow) = (g.out_len(src.h), g.out_len(src.w));
    let n = g.cout;
    let threads = workers.threads;
    let lens = Lens {
        input: src.data.len(),
        output: out.len(),
        bias: bias.len(),
        residual: residual.map(<[f32]>::len),
        scratch: scratch.len(),
    };
    let m = check_buffers("", g, (src.batch, src.h, src.w, src.c), lens, threads)?;
    if m == 0 {
        return Ok(());
    }
    let scratch = &mut scratch[..threads];
    let micro = t.micro();
    let kp = b.kp;
    // A 1×1 stride-1 convolution reads its input rows in place; only a partial last tile of
    // rows is packed (zero-padded) so the kernel never reads past the activation.
    // (Packing those rows too, or reading them in place, ran equally fast on a Zen 4.)
    let direct = g.is_pointwise();
    // Packed rows are one cache line longer than `kc`, so that the MR rows a k-step reads
    // spread over L1's sets instead of sharing a few of them.
    let plda = t.kc + 16;
    let schedule = Schedule::new(m, t.mc, b.panels, threads);
    let cptr = SharedPtr(out.as_mut_ptr());
    let res = SharedPtr(residual.map_or(std::ptr::null(), |r| r.as_ptr()).cast_mut());
    let bdata = b.data.as_slice();
    for buf in scratch.iter_mut() {
        buf.ensure(t.mc * plda);
    }

    let work = |buf: &mut AlignedBuf| {
        let (cptr, res) = (cptr, res);
        let apack = buf.as_mut_slice().as_mut_ptr();
        while let Some((m0, rows, panels)) = schedule.take() {
            let full_panels = rows / t.mr;
            let mut k0 = 0;
            while k0 < kp {
                let kc = t.kc.min(kp - k0);
                let last = k0 + kc == kp;
                let steps = kc;
                let started = pack_ns.map(|_| std::time::Instant::now());
                // SAFETY: the buffer holds mc · kc words (ensured above), enough for
                // ceil(rows / mr) panels of kc values (rows ≤ mc, mc a multiple of mr);
                // `src` holds the whole activation of `g` (checked above).
                unsafe {
                    if !direct {
                        pack_block(src, g, (oh, ow), (m0, rows), (k0, kc), (t, plda), apack);
                    } else if !rows.is_multiple_of(t.mr) {
                        // Only the partial last panel, at the buffer's start.
                        let m_tail = m0 + full_panels * t.mr;
                        let tail = (m_tail, rows % t.mr);
                        pack_block(src, g, (oh, ow), tail, (k0, kc), (t, plda), apack);
                    }
                }
                if let (Some(acc), Some(s)) = (pack_ns, started) {
                    acc.fetch_add(s.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                for j in panels.clone() {
                    let bsl = &bdata[(j * kp + k0) * t.nr..];
                    let cols = t.nr.min(n - j * t.nr);
                    for p in 0..rows.div_ceil(t.mr) {
                        let r0 = m0 + p * t.mr;
                        // SAFETY: r0 < m, so the row offsets stay inside the input (direct)
                        // or the packed buffer (panel p, or the tail panel at 0).
                        let (a, lda) = unsafe {
                            if !direct {
                                (apack.add(p * t.mr * plda).cast_const(), plda)
                            } else if p < full_panels {
                                (src.data.as_ptr().add(r0 * g.cin + k0), g.cin)
                            } else {
                                (apack.cast_const(), plda)
                            }
                        };
                        let ep = Epilogue {
                            accumulate: k0 > 0,
                            bias: if last {
                                bias[j * t.nr..].as_ptr()
                            } else {
                                std::ptr::null()
                            },
                            residual: if res.0.is_null() {
                                std::ptr::null()
                            } else {
                                // SAFETY: r0 < m and j·nr < n, inside [M, n].
                                unsafe { res.0.add(r0 * n + j * t.nr).cast_const() }
                            },
                            ldr: n,
                            relu: relu && last,
                            rows: t.mr.min(m - r0),
                            cols,
                        };
                        // SAFETY: `micro` is `t`'s kernel, whose token proves this CPU has its
                        // target features; `b` was packed for `t` and `g` (checked above), so
                        // `a` holds `steps` steps of MR rows and the B sliver `steps` steps of
                        // NR words; the output tile [r0.., j·nr..] of rows × cols lies inside
                        // `out` (checked above) and belongs to this task alone.
                        unsafe {
                            micro(
                                steps,
                                a,
                                lda,
                                bsl.as_ptr(),
                                cptr.0.add(r0 * n + j * t.nr),
                                n,
                                &ep,
                            );
                        }
                    }
                }
                k0 += kc;
            }
        }
    };
    schedule.run(workers, scratch, work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::IsaKind;

    /// Direct convolution in f64 on NHWC input, PyTorch's weight layout.
    pub(super) fn reference(
        x: &[f32],
        (batch, h, w): (usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        g: &ConvGeom,
    ) -> Vec<f64> {
        let (oh, ow, ks) = (g.out_len(h), g.out_len(w), g.ksize);
        let mut out = vec![0f64; batch * oh * ow * g.cout];
        for n in 0..batch {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..g.cout {
                        let mut s = f64::from(bias[co]);
                        for ky in 0..ks {
                            for kx in 0..ks {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                for ci in 0..g.cin {
                                    let xv =
                                        x[((n * h + iy as usize) * w + ix as usize) * g.cin + ci];
                                    let wv = wt[((co * g.cin + ci) * ks + ky) * ks + kx];
                                    s += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        out[((n * oh + oy) * ow + ox) * g.cout + co] = s;
                    }
                }
            }
        }
        out
    }

    pub(super) fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Checks `t` against the direct convolution on odd sizes: partial row and column
    /// tiles, k not a multiple of KC, 2 or 32, padding and stride, images smaller than the
    /// kernel, several row blocks, 1×1 layers read in place (with and without a partial last
    /// panel); with and without the residual epilogue, on one and two threads. A bf16 tiling
    /// runs the bf16 dataflow ([`conv_bf16`]) on bf16-rounded values, with bf16 input (f32
    /// for the stem-like 3-channel cases) and output, to the error of the output's rounding.
    pub(super) fn check_tiling(t: &Tiling, label: &str) {
        let geom = |cin, cout, ksize, stride, pad| ConvGeom {
            cin,
            cout,
            ksize,
            stride,
            pad,
        };
        let cases = [
            (geom(5, 19, 3, 2, 1), (2, 9, 7)),
            (geom(6, 19, 3, 2, 1), (2, 9, 7)),
            (geom(300, 40, 1, 1, 0), (1, 5, 7)),
            (geom(64, 40, 1, 1, 0), (1, 5, 7)),
            (geom(3, 8, 7, 2, 3), (1, 11, 10)),
            (geom(3, 8, 7, 2, 3), (2, 2, 3)),
            (geom(16, 33, 1, 2, 0), (3, 5, 5)),
            // 180 rows: more than one MC block, packed and read in place.
            (geom(8, 36, 3, 1, 1), (2, 10, 9)),
            (geom(20, 36, 1, 1, 0), (2, 10, 9)),
            (geom(32, 36, 1, 1, 0), (2, 10, 9)),
            (geom(64, 64, 1, 1, 0), (1, 8, 8)),
            // Full 64-wide tiles over more than one KC block (their partial sums reloaded).
            (geom(300, 130, 1, 1, 0), (1, 3, 5)),
        ];
        let bf16 = t.bf16_act();
        let operand = |v: f32| if bf16 { round_bf16(v) } else { v };
        for (g, (batch, h, w)) in cases {
            let x: Vec<f32> = values(batch * h * w * g.cin, 1)
                .into_iter()
                .map(operand)
                .collect();
            let wt: Vec<f32> = values(g.cout * g.k(), 2).into_iter().map(operand).collect();
            let bias = values(g.cout, 3);
            let (oh, ow) = (g.out_len(h), g.out_len(w));
            let residual: Vec<f32> = values(batch * oh * ow * g.cout, 4)
                .into_iter()
                .map(operand)
                .collect();
            let (xb, rb): (Vec<u16>, Vec<u16>) = (
                x.iter().map(|&v| bf16_bits(v)).collect(),
                residual.iter().map(|&v| bf16_bits(v)).collect(),
            );
            let expect = reference(&x, (batch, h, w), &wt, &bias, &g);
            let b = PackedB::new(&wt, &g, t).unwrap();
            for (threads, res) in [(1, true), (2, true), (2, false)] {
                let workers = Workers::new(threads).unwrap();
                let mut scratch: Vec<AlignedBuf> =
                    (0..threads).map(|_| AlignedBuf::default()).collect();
                let s = &mut scratch;
                let out: Vec<f32> = if bf16 {
                    let (c, r) = (g.cin, res.then_some(rb.as_slice()));
                    let src = Act {
                        data: &xb,
                        batch,
                        h,
                        w,
                        c,
                    };
                    let mut out = vec![0xFFFFu16; expect.len()];
                    conv_bf16(&src, &b, &bias, t, &mut out, r, res, &workers, s, None).unwrap();
                    out.into_iter().map(bf16_to_f32).collect()
                } else {
                    let (c, r) = (g.cin, res.then_some(residual.as_slice()));
                    let src = Source {
                        data: &x,
                        batch,
                        h,
                        w,
                        c,
                    };
                    let mut out = vec![f32::NAN; expect.len()];
                    conv(&src, &b, &bias, t, &mut out, r, res, &workers, s, None).unwrap();
                    out
                };
                for (i, (&o, &e)) in out.iter().zip(&expect).enumerate() {
                    let e = if res {
                        (e + f64::from(residual[i])).max(0.0)
                    } else {
                        e
                    };
                    // f32 sums; bf16 output rounds once more (2⁻⁸ relative).
                    let tol =
                        1e-5 * (g.k() as f64).sqrt() + if bf16 { e.abs() / 256.0 } else { 0.0 };
                    assert!(
                        (f64::from(o) - e).abs() <= tol,
                        "{label} threads={threads} {g:?}: [{i}] {o} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn conv_matches_direct_convolution_on_every_available_isa() {
        let available = Isa::available();
        for kind in IsaKind::ALL {
            if !available.iter().any(|i| i.kind() == kind) {
                eprintln!("SKIPPED: this CPU lacks {kind}; its convolution kernels did not run");
            }
        }
        for isa in available {
            eprintln!("running the {isa} f32 convolution kernels natively");
            check_tiling(&Tiling::new(isa, false), isa.name());
            eprintln!(
                "running the {isa} bf16 dataflow {}",
                if isa.native_bf16() {
                    "natively"
                } else {
                    "(emulated on the f32 kernels)"
                }
            );
            check_tiling(&Tiling::new(isa, true), isa.name());
        }
    }

    /// The AVX-512 f32 body, compiled without target features.
    ///
    /// # Safety
    /// As [`MicroFn`], for a 6×64 tile.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn f32_6x64(
        steps: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        ep: &Epilogue,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { f32_body::<6, 64, false>(steps, a, lda, b, c, ldc, ep) }
    }

    /// `vdpbf16ps` in plain Rust, at the AVX-512 tile size: per 32-bit lane, the product of
    /// the high bf16 halves is added, then that of the low halves (Intel SDM's order; a
    /// product of two bf16 is exact in f32). Row-major `a` (`lda` words apart), as the bf16
    /// dataflow calls the real kernel.
    ///
    /// # Safety
    /// As [`MicroFn`], for a 12×32 tile of bf16-pair words.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn bf16_pairs_12x32(
        steps: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        ep: &Epilogue,
    ) {
        assert_ne!(lda, 0, "the bf16 dataflow passes rows");
        let hi = |w: f32| f32::from_bits(w.to_bits() & 0xFFFF_0000);
        let lo = |w: f32| f32::from_bits(w.to_bits() << 16);
        let mut acc = [[0f32; 32]; 12];
        for p in 0..steps {
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: `a` holds 12 rows of `steps` words, `lda` apart (see `MicroFn`).
                let av = unsafe { *a.add(i * lda + p) };
                for (j, v) in row.iter_mut().enumerate() {
                    // SAFETY: `b` holds `steps` packed steps of 32 words.
                    let bv = unsafe { *b.add(p * 32 + j) };
                    *v += hi(av) * hi(bv);
                    *v += lo(av) * lo(bv);
                }
            }
        }
        // SAFETY: `c` and the epilogue pointers cover the tile (see `MicroFn`).
        unsafe { finish::<12, 32>(acc, c, ldc, ep) }
    }

    /// The AVX-512 f32 blocking (6×64 tiles, its KC and MC) on any CPU: the micro-kernel is
    /// swapped for the same arithmetic in plain Rust, so everything but the instructions
    /// themselves is checked here.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_blocking_matches_direct_convolution_on_any_cpu() {
        let t = Tiling::for_kernel(Kernel::EmulatedAvx512, false);
        assert_eq!(
            (t.mr, t.nr, t.kc, t.mc, t.pairs, t.round),
            (6, 64, 128, 144, false, false)
        );
        if let Some(isa) = Avx512::new() {
            let real = Tiling::for_kernel(Kernel::Avx512(isa), false);
            assert_eq!(
                (real.mr, real.nr, real.kc, real.mc),
                (t.mr, t.nr, t.kc, t.mc)
            );
        }
        check_tiling(&t, "6x64 (emulated)");
        // The bf16-pair stand-in is the real kernel's blocking too.
        let dp = Tiling::for_kernel(Kernel::EmulatedDpbf16, true);
        if let Some(isa) = Avx512Bf16::new() {
            let real = Tiling::for_kernel(Kernel::Avx512Bf16(isa), true);
            assert_eq!((real.mr, real.nr, real.kalign), (dp.mr, dp.nr, dp.kalign));
        }
    }

    #[test]
    fn weights_packed_for_another_tiling_are_refused() {
        let g = ConvGeom {
            cin: 5,
            cout: 19,
            ksize: 3,
            stride: 1,
            pad: 1,
        };
        let wt = values(g.cout * g.k(), 2);
        let bias = values(g.cout, 3);
        let x = values(4 * 4 * g.cin, 1);
        let src = Source {
            data: &x,
            batch: 1,
            h: 4,
            w: 4,
            c: g.cin,
        };
        let workers = Workers::new(1).unwrap();
        let mut scratch = vec![AlignedBuf::default()];
        let mut out = vec![0f32; 16 * g.cout];
        let portable = Tiling::new(Isa::Portable, false);
        // Every pair of distinct tilings: other blockings (a 4×8-packed B read as 6×64
        // panels would make the kernel read and write out of bounds), or the same blocking
        // with other operands (f32 weights read as bf16, or bf16 pairs as f32).
        let mut tilings = vec![portable, Tiling::new(Isa::Portable, true)];
        #[cfg(target_arch = "x86_64")]
        tilings.extend([
            Tiling::for_kernel(Kernel::EmulatedAvx512, false),
            Tiling::for_kernel(Kernel::EmulatedDpbf16, true),
        ]);
        tilings.push(Tiling::for_kernel(Kernel::EmulatedAmx, true));
        for isa in Isa::available() {
            tilings.extend([Tiling::new(isa, false), Tiling::new(isa, true)]);
        }
        let xb: Vec<u16> = x.iter().map(|&v| bf16_bits(v)).collect();
        let mut out_bf16 = vec![0u16; 16 * g.cout];
        // Each tiling's own convolution: the f32 one, or the bf16 dataflow's.
        let mut run = |b: &PackedB, t: &Tiling| {
            if t.bf16_act() {
                let act = Act {
                    data: &xb,
                    batch: 1,
                    h: 4,
                    w: 4,
                    c: g.cin,
                };
                let (out, s) = (&mut out_bf16, &mut scratch);
                conv_bf16(&act, b, &bias, t, out, None, true, &workers, s, None)
            } else {
                conv(
                    &src,
                    b,
                    &bias,
                    t,
                    &mut out,
                    None,
                    true,
                    &workers,
                    &mut scratch,
                    None,
                )
            }
        };
        for packed_for in &tilings {
            let b = PackedB::new(&wt, &g, packed_for).unwrap();
            for run_with in tilings.iter().filter(|t| *t != packed_for) {
                let err = run(&b, run_with).unwrap_err().to_string();
                assert!(err.contains("packed for"), "{err}");
            }
            // The matching tiling runs.
            run(&b, packed_for).unwrap();
        }
        // A source that is not the geometry the weights were packed for is refused too.
        let b = PackedB::new(&wt, &g, &portable).unwrap();
        let wrong = Source { c: 4, ..src };
        let err = conv(
            &wrong,
            &b,
            &bias,
            &portable,
            &mut out,
            None,
            true,
            &workers,
            &mut scratch,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("5→19"), "{err}");
        // So is one whose sizes overflow: no buffer can hold it.
        let huge = Source {
            batch: usize::MAX / 8,
            ..src
        };
        assert!(
            conv(
                &huge,
                &b,
                &bias,
                &portable,
                &mut out,
                None,
                true,
                &workers,
                &mut scratch,
                None,
            )
            .is_err()
        );
        // Weights of the wrong size, and degenerate geometries, are refused at packing.
        assert!(PackedB::new(&wt[1..], &g, &portable).is_err());
        assert!(PackedB::new(&wt, &ConvGeom { stride: 0, ..g }, &portable).is_err());
    }

    /// The packer's branch-free bf16 rounding equals the `half` crate's (which rounds the
    /// weights) bit for bit, on every exponent, NaN and infinity, and on ties.
    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let mut x = 0x2545_F491u32;
        for high in 0..=0xFFFFu32 {
            // Every high half (every sign, exponent, NaN and infinity), with ties, their
            // neighbours and a few pseudo-random low halves.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            for low in [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, x & 0xFFFF, x >> 16] {
                let v = f32::from_bits(high << 16 | low);
                let reference = half::bf16::from_f32(v);
                assert_eq!(bf16_bits(v), reference.to_bits(), "{:#010x}", v.to_bits());
                assert_eq!(
                    round_bf16(v).to_bits(),
                    reference.to_f32().to_bits(),
                    "{:#010x}",
                    v.to_bits()
                );
            }
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5e-3).to_bits() & 0xFFFF, 0);
        assert!(round_bf16(f32::NAN).is_nan());
    }
}
