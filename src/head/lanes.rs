//! Layer 1 and the SGD update: the head's 8-lane kernels, generic over the instruction set.
//!
//! [`Lanes`] is eight f32 lanes with two implementations that perform the same IEEE
//! operations lane by lane — AVX2+FMA registers, reachable only with an [`Isa`] token that
//! proves the CPU has them, and a portable array — so results do not depend on which runs.

use super::{Head, HeadDims, HeadGrads, Workspace, backward_small, forward_small, penalty_value};

/// Eight f32 lanes. Both implementations perform the same IEEE operations lane by lane, so
/// results do not depend on which one runs.
trait Lanes: Copy {
    fn zero() -> Self;
    fn splat(v: f32) -> Self;
    fn load(a: &[f32; 8]) -> Self;
    fn store(self, a: &mut [f32; 8]);
    /// `a·b + c`, rounded once.
    fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// `a + b`, lane by lane.
    fn add(a: Self, b: Self) -> Self;
    /// `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`.
    fn hsum(self) -> f32;
    /// Each lane, or +0 where it is subnormal (or ±0): see [`flush`].
    fn flush(self) -> Self;
}

/// `v`, or +0 when `|v|` is below f32's smallest normal number: [`Lanes::flush`] on one value.
///
/// Momentum buffers pass through it. A hidden unit that no sample of a batch activates
/// (ReLU at zero) gets a zero gradient, so its velocity row decays by μ per step into the
/// subnormals, where `μ·v` rounds back to `v` for the smallest ones: it never reaches zero.
/// On Intel CPUs every multiply-add that reads or writes a subnormal takes a microcode assist
/// of ~150 cycles; four dead units of the default head (8,192 velocities) made a training
/// step 3× slower there (107 → 35 µs; AMD CPUs have no such penalty). A velocity this small
/// cannot move a weight: `lr·|v| < lr·2⁻¹²⁶` is below half an ulp of any weight above
/// `lr·2⁻¹⁰²`, so the weights stay what PyTorch, which keeps the subnormals, computes.
#[inline(always)]
fn flush(v: f32) -> f32 {
    if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v }
}

/// The portable lanes: plain arrays, `f32::mul_add` per lane.
#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl Lanes for Portable {
    #[inline(always)]
    fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Portable([v; 8])
    }
    #[inline(always)]
    fn load(a: &[f32; 8]) -> Self {
        Portable(*a)
    }
    #[inline(always)]
    fn store(self, a: &mut [f32; 8]) {
        *a = self.0;
    }
    #[inline(always)]
    fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], c.0[l])))
    }
    #[inline(always)]
    fn add(a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|l| a.0[l] + b.0[l]))
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        let v = self.0;
        let q = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
        (q[0] + q[2]) + (q[1] + q[3])
    }
    #[inline(always)]
    fn flush(self) -> Self {
        Portable(self.0.map(flush))
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    //! AVX2+FMA lanes and the entry points that instantiate the generic kernels with them.
    //!
    //! The lanes type `Avx` is private to this module, so only the `#[target_feature]`
    //! functions generated below ever instantiate a kernel with it, and those are reached only
    //! through the entry points, each of which takes an [`Avx2Fma`] token: proof, checked at
    //! run time when the token was made, that this CPU has AVX2 and FMA.

    use std::arch::x86_64::*;

    use super::{Head, HeadGrads, Lanes, Workspace};
    use crate::isa::Avx2Fma;

    #[derive(Clone, Copy)]
    struct Avx(__m256);

    // The SAFETY argument of every method: `Avx` is private to this module and only used
    // inside the `#[target_feature(enable = "avx2,fma")]` functions below, which run only
    // with an `Avx2Fma` token (see the module docs); the methods are always inlined into
    // them. Loads and stores go through `&[f32; 8]` (unaligned), so they are in bounds.
    impl Lanes for Avx {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: AVX is available (see above).
            Avx(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: AVX is available (see above).
            Avx(unsafe { _mm256_set1_ps(v) })
        }
        #[inline(always)]
        fn load(a: &[f32; 8]) -> Self {
            // SAFETY: AVX is available; `a` holds the 8 values read.
            Avx(unsafe { _mm256_loadu_ps(a.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, a: &mut [f32; 8]) {
            // SAFETY: AVX is available; `a` holds the 8 values written.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: FMA is available (see above).
            Avx(unsafe { _mm256_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        fn add(a: Self, b: Self) -> Self {
            // SAFETY: AVX is available (see above).
            Avx(unsafe { _mm256_add_ps(a.0, b.0) })
        }
        #[inline(always)]
        fn hsum(self) -> f32 {
            // SAFETY: AVX is available (see above).
            unsafe {
                let lo = _mm256_castps256_ps128(self.0);
                let hi = _mm256_extractf128_ps(self.0, 1);
                let q = _mm_add_ps(lo, hi); // [l0+l4, l1+l5, l2+l6, l3+l7]
                let r = _mm_add_ps(q, _mm_movehl_ps(q, q)); // [q0+q2, q1+q3, ..]
                _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps(r, r, 0b01)))
            }
        }
        #[inline(always)]
        fn flush(self) -> Self {
            // SAFETY: AVX is available (see above).
            unsafe {
                // |v| (sign bit cleared) < MIN_POSITIVE, ordered: NaN is kept, as by `flush`.
                let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0);
                let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(abs, _mm256_set1_ps(f32::MIN_POSITIVE));
                Avx(_mm256_andnot_ps(tiny, self.0))
            }
        }
    }

    /// `pub(super) fn $name(Avx2Fma, args) -> ret`: the generic kernel `$name` on AVX2 lanes,
    /// compiled with AVX2 and FMA enabled, callable only with the token.
    macro_rules! entry {
        ($name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
            #[allow(clippy::too_many_arguments)]
            pub(super) fn $name(_proof: Avx2Fma, $($arg: $ty),*) $(-> $ret)? {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn with_avx2($($arg: $ty),*) $(-> $ret)? {
                    super::$name::<Avx>($($arg),*)
                }
                // SAFETY: the `Avx2Fma` token proves this CPU has AVX2 and FMA.
                unsafe { with_avx2($($arg),*) }
            }
        };
    }

    entry!(forward(head: &Head, xs: &[&[f32]], mask: Option<&[f32]>, ws: &mut Workspace) -> f32);
    entry!(fused_step(
        head: &mut Head,
        vel: &mut HeadGrads,
        xs: &[&[f32]],
        y: &[u8],
        lambda: f32,
        mu: f32,
        lr: f32,
        mask: Option<&[f32]>,
        ws: &mut Workspace
    ) -> (f32, f32));
    entry!(loss_and_grad(
        head: &Head,
        xs: &[&[f32]],
        y: &[u8],
        lambda: f32,
        mask: Option<&[f32]>,
        ws: &mut Workspace,
        grads: &mut HeadGrads
    ) -> (f32, f32));
    entry!(sgd_all(head: &mut Head, vel: &mut HeadGrads, g: &HeadGrads, mu: f32, lr: f32));
    entry!(sumsq_rows(w: &[f32], row: usize) -> f32);
}

// The instruction set the kernels run with is `crate::isa`'s, shared with the backbone, chosen
// once per call site by `Isa::detect`: every x86-64 set it can name implies AVX2 and FMA,
// whose token selects the AVX2 lanes; otherwise the portable lanes run.
use crate::isa::Isa;

/// The head's kernels, dispatched on an [`Isa`].
pub(super) trait Kernels {
    fn forward(self, head: &Head, xs: &[&[f32]], mask: Option<&[f32]>, ws: &mut Workspace) -> f32;
    #[allow(clippy::too_many_arguments)]
    fn fused_step(
        self,
        head: &mut Head,
        vel: &mut HeadGrads,
        xs: &[&[f32]],
        y: &[u8],
        lambda: f32,
        mu: f32,
        lr: f32,
        mask: Option<&[f32]>,
        ws: &mut Workspace,
    ) -> (f32, f32);
    #[allow(clippy::too_many_arguments)]
    fn loss_and_grad(
        self,
        head: &Head,
        xs: &[&[f32]],
        y: &[u8],
        lambda: f32,
        mask: Option<&[f32]>,
        ws: &mut Workspace,
        grads: &mut HeadGrads,
    ) -> (f32, f32);
    fn sgd_all(self, head: &mut Head, vel: &mut HeadGrads, g: &HeadGrads, mu: f32, lr: f32);
    fn sumsq_rows(self, w: &[f32], row: usize) -> f32;
}

impl Kernels for Isa {
    fn forward(self, head: &Head, xs: &[&[f32]], mask: Option<&[f32]>, ws: &mut Workspace) -> f32 {
        match self.avx2_fma() {
            #[cfg(target_arch = "x86_64")]
            Some(t) => avx2::forward(t, head, xs, mask, ws),
            _ => forward::<Portable>(head, xs, mask, ws),
        }
    }

    fn fused_step(
        self,
        head: &mut Head,
        vel: &mut HeadGrads,
        xs: &[&[f32]],
        y: &[u8],
        lambda: f32,
        mu: f32,
        lr: f32,
        mask: Option<&[f32]>,
        ws: &mut Workspace,
    ) -> (f32, f32) {
        match self.avx2_fma() {
            #[cfg(target_arch = "x86_64")]
            Some(t) => avx2::fused_step(t, head, vel, xs, y, lambda, mu, lr, mask, ws),
            _ => fused_step::<Portable>(head, vel, xs, y, lambda, mu, lr, mask, ws),
        }
    }

    fn loss_and_grad(
        self,
        head: &Head,
        xs: &[&[f32]],
        y: &[u8],
        lambda: f32,
        mask: Option<&[f32]>,
        ws: &mut Workspace,
        grads: &mut HeadGrads,
    ) -> (f32, f32) {
        match self.avx2_fma() {
            #[cfg(target_arch = "x86_64")]
            Some(t) => avx2::loss_and_grad(t, head, xs, y, lambda, mask, ws, grads),
            _ => loss_and_grad::<Portable>(head, xs, y, lambda, mask, ws, grads),
        }
    }

    fn sgd_all(self, head: &mut Head, vel: &mut HeadGrads, g: &HeadGrads, mu: f32, lr: f32) {
        match self.avx2_fma() {
            #[cfg(target_arch = "x86_64")]
            Some(t) => avx2::sgd_all(t, head, vel, g, mu, lr),
            _ => sgd_all::<Portable>(head, vel, g, mu, lr),
        }
    }

    fn sumsq_rows(self, w: &[f32], row: usize) -> f32 {
        match self.avx2_fma() {
            #[cfg(target_arch = "x86_64")]
            Some(t) => avx2::sumsq_rows(t, w, row),
            _ => sumsq_rows::<Portable>(w, row),
        }
    }
}

/// `out[s] = Σ_i w[i]·x_s[i]` for 4 samples sharing each load of the weight row `w` (`[D]`;
/// each `x_s` is `[D]`), and `Σ_i w[i]²` on the side (the penalty needs it, and the loop has
/// arithmetic to spare). Fewer samples repeat one row and ignore the extra results.
///
/// The summation order, shared with [`row_sumsq`] and the same for every sample whatever its
/// position: two 8-lane accumulators take the even and the odd 8-element chunks (two chains
/// hide the multiply-add latency), they are added lane by lane, reduced by [`Lanes::hsum`],
/// and the tail `i ≥ 8·⌊D/8⌋` is added in order. The accumulators are named variables, not an
/// array, so that they stay in registers.
#[inline(always)]
fn dots4<L: Lanes>(w: &[f32], x: [&[f32]; 4]) -> ([f32; 4], f32) {
    let (wc, wt) = w.as_chunks::<8>();
    let n = wc.len();
    fn split(r: &[f32], n: usize) -> (&[[f32; 8]], &[f32]) {
        let (c, t) = r.as_chunks::<8>();
        (&c[..n], t)
    }
    let ((c0, t0), (c1, t1)) = (split(x[0], n), split(x[1], n));
    let ((c2, t2), (c3, t3)) = (split(x[2], n), split(x[3], n));
    let z = L::zero();
    let (mut e0, mut e1, mut e2, mut e3, mut qe) = (z, z, z, z, z);
    let (mut o0, mut o1, mut o2, mut o3, mut qo) = (z, z, z, z, z);
    let mut k = 0;
    while k + 1 < n {
        let wa = L::load(&wc[k]);
        let wb = L::load(&wc[k + 1]);
        qe = L::mul_add(wa, wa, qe);
        qo = L::mul_add(wb, wb, qo);
        e0 = L::mul_add(wa, L::load(&c0[k]), e0);
        e1 = L::mul_add(wa, L::load(&c1[k]), e1);
        e2 = L::mul_add(wa, L::load(&c2[k]), e2);
        e3 = L::mul_add(wa, L::load(&c3[k]), e3);
        o0 = L::mul_add(wb, L::load(&c0[k + 1]), o0);
        o1 = L::mul_add(wb, L::load(&c1[k + 1]), o1);
        o2 = L::mul_add(wb, L::load(&c2[k + 1]), o2);
        o3 = L::mul_add(wb, L::load(&c3[k + 1]), o3);
        k += 2;
    }
    if k < n {
        let wa = L::load(&wc[k]);
        qe = L::mul_add(wa, wa, qe);
        e0 = L::mul_add(wa, L::load(&c0[k]), e0);
        e1 = L::mul_add(wa, L::load(&c1[k]), e1);
        e2 = L::mul_add(wa, L::load(&c2[k]), e2);
        e3 = L::mul_add(wa, L::load(&c3[k]), e3);
    }
    let finish = |e: L, o: L, t: &[f32]| {
        let mut r = L::add(e, o).hsum();
        for (&wi, &xi) in wt.iter().zip(t) {
            r = wi.mul_add(xi, r);
        }
        r
    };
    let out = [
        finish(e0, o0, t0),
        finish(e1, o1, t1),
        finish(e2, o2, t2),
        finish(e3, o3, t3),
    ];
    let mut sq = L::add(qe, qo).hsum();
    for &wi in wt {
        sq = wi.mul_add(wi, sq);
    }
    (out, sq)
}

/// Layer 1 forward for a batch and then [`forward_small`]: `z1 [b, H] = x [b, D] · W1ᵀ + b1`.
/// Returns ‖W1‖², summed as [`sumsq_rows`] does.
#[inline(always)]
fn forward<L: Lanes>(head: &Head, xs: &[&[f32]], mask: Option<&[f32]>, ws: &mut Workspace) -> f32 {
    let HeadDims {
        input: d,
        hidden: h,
        ..
    } = head.dims;
    let mut s1 = 0.0f32;
    for (c, chunk) in xs.chunks(4).enumerate() {
        let base = c * 4;
        // A partial chunk repeats its first row; the extra results are dropped.
        let rows: [&[f32]; 4] = std::array::from_fn(|s| chunk.get(s).copied().unwrap_or(chunk[0]));
        for j in 0..h {
            let (r, sq) = dots4::<L>(&head.w1[j * d..(j + 1) * d], rows);
            let bias = head.b1[j];
            for (s, v) in r.iter().take(chunk.len()).enumerate() {
                ws.z1[(base + s) * h + j] = v + bias;
            }
            if c == 0 {
                s1 += sq;
            }
        }
    }
    forward_small(head, xs.len(), mask, ws);
    s1
}

/// Sum of squares of each `row`-long row of `w`, rows added in order; per row the order of
/// [`dots4`].
#[inline(always)]
fn sumsq_rows<L: Lanes>(w: &[f32], row: usize) -> f32 {
    let mut total = 0.0f32;
    for r in w.chunks_exact(row) {
        total += row_sumsq::<L>(r);
    }
    total
}

#[inline(always)]
fn row_sumsq<L: Lanes>(r: &[f32]) -> f32 {
    let (c, t) = r.as_chunks::<8>();
    let (mut even, mut odd) = (L::zero(), L::zero());
    let mut k = 0;
    while k + 1 < c.len() {
        let v0 = L::load(&c[k]);
        let v1 = L::load(&c[k + 1]);
        even = L::mul_add(v0, v0, even);
        odd = L::mul_add(v1, v1, odd);
        k += 2;
    }
    if k < c.len() {
        let v0 = L::load(&c[k]);
        even = L::mul_add(v0, v0, even);
    }
    let mut s = L::add(even, odd).hsum();
    for &v in t {
        s = v.mul_add(v, s);
    }
    s
}

/// `g = Σ_s dz[s]·x_s + λ·w` for one 8-lane chunk: the sum over samples in order, each a
/// fused multiply-add, then the penalty gradient. Shared by the fused and unfused paths.
#[inline(always)]
fn grad_lanes<L: Lanes>(dz: &[f32], xk: &[&[f32; 8]], lambda: f32, w: L) -> L {
    let mut g = L::zero();
    for (&d, x) in dz.iter().zip(xk) {
        g = L::mul_add(L::splat(d), L::load(x), g);
    }
    L::mul_add(L::splat(lambda), w, g)
}

/// The scalar twin of [`grad_lanes`] for the tail of a row.
#[inline(always)]
fn grad_scalar(dz: &[f32], xs: &[f32], lambda: f32, w: f32) -> f32 {
    let mut g = 0.0f32;
    for (&d, &x) in dz.iter().zip(xs) {
        g = d.mul_add(x, g);
    }
    lambda.mul_add(w, g)
}

/// The fused training step for `b ≤ 4` samples: forward, backward, and for `W1` gradient,
/// momentum and update row by row without storing the gradient. Returns (loss, penalty).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fused_step<L: Lanes>(
    head: &mut Head,
    vel: &mut HeadGrads,
    xs: &[&[f32]],
    y: &[u8],
    lambda: f32,
    mu: f32,
    lr: f32,
    mask: Option<&[f32]>,
    ws: &mut Workspace,
) -> (f32, f32) {
    let h = head.dims.hidden;
    let b = xs.len();
    // ‖W1‖² and ‖W2‖² before the update: the penalty of the weights the loss is computed with.
    let s1 = forward::<L>(head, xs, mask, ws);
    let loss = backward_small(head, y, lambda, mask, ws);
    let s2 = sumsq_rows::<L>(&head.w2, h);

    // W1 [H, D]: per row j, g = Σ_s dz1[s, j]·x_s + λ·w; v = μ·v + g; w = w − lr·v.
    let (w1, v1, dz1) = (&mut head.w1, &mut vel.w1, &ws.dz1[..b * h]);
    match *xs {
        [x0] => fused_w1::<L, 1>(w1, v1, dz1, [x0], h, lambda, mu, lr),
        [x0, x1] => fused_w1::<L, 2>(w1, v1, dz1, [x0, x1], h, lambda, mu, lr),
        [x0, x1, x2] => fused_w1::<L, 3>(w1, v1, dz1, [x0, x1, x2], h, lambda, mu, lr),
        [x0, x1, x2, x3] => fused_w1::<L, 4>(w1, v1, dz1, [x0, x1, x2, x3], h, lambda, mu, lr),
        // `Stepper::step` sends larger batches to the unfused path.
        _ => {}
    }
    // The small parameters through the same update kernel as `Sgd::step`.
    sgd_update::<L>(&mut head.b1, &mut vel.b1, &ws.gb1, mu, lr);
    sgd_update::<L>(&mut head.w2, &mut vel.w2, &ws.gw2, mu, lr);
    sgd_update::<L>(&mut head.b2, &mut vel.b2, &ws.gb2, mu, lr);
    (loss, penalty_value(lambda, s1, s2))
}

/// Gradient, momentum and update of `W1` (`[H, D]`, momentum `v1` alike) for `S ≤ 4` samples
/// `xs` (each `[D]`) with hidden deltas `dz1` (`[S, H]`), one weight row at a time so the
/// gradient never leaves registers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fused_w1<L: Lanes, const S: usize>(
    w1: &mut [f32],
    v1: &mut [f32],
    dz1: &[f32],
    xs: [&[f32]; S],
    h: usize,
    lambda: f32,
    mu: f32,
    lr: f32,
) {
    let d = w1.len() / h;
    let n8 = d / 8;
    let xc: [(&[[f32; 8]], &[f32]); S] = std::array::from_fn(|s| {
        let (c, t) = xs[s].as_chunks::<8>();
        (&c[..n8], t)
    });
    let (vmu, vneg_lr) = (L::splat(mu), L::splat(-lr));
    // Rows in reverse: the forward pass just read W1 from first to last row, so its last rows
    // are still in cache (the rows are independent, so the order changes no number).
    let rows = w1
        .chunks_exact_mut(d)
        .zip(v1.chunks_exact_mut(d))
        .enumerate()
        .rev();
    for (j, (w_row, v_row)) in rows {
        let dz: [f32; S] = std::array::from_fn(|s| dz1[s * h + j]);
        let (wc, wt) = w_row.as_chunks_mut::<8>();
        let (vc, vt) = v_row.as_chunks_mut::<8>();
        for (k, (wk, vk)) in wc.iter_mut().zip(vc.iter_mut()).enumerate() {
            let w = L::load(wk);
            let xk: [&[f32; 8]; S] = std::array::from_fn(|s| &xc[s].0[k]);
            let g = grad_lanes::<L>(&dz, &xk, lambda, w);
            let v = L::mul_add(vmu, L::load(vk), g).flush();
            v.store(vk);
            L::mul_add(vneg_lr, v, w).store(wk);
        }
        for (t, (wi, vi)) in wt.iter_mut().zip(vt.iter_mut()).enumerate() {
            let w = *wi;
            let xcol: [f32; S] = std::array::from_fn(|s| xc[s].1[t]);
            let g = grad_scalar(&dz, &xcol, lambda, w);
            let v = flush(mu.mul_add(*vi, g));
            *vi = v;
            *wi = (-lr).mul_add(v, w);
        }
    }
}

/// Forward and backward for any batch size, writing every gradient into `grads`.
/// Returns (loss, penalty).
#[inline(always)]
fn loss_and_grad<L: Lanes>(
    head: &Head,
    xs: &[&[f32]],
    y: &[u8],
    lambda: f32,
    mask: Option<&[f32]>,
    ws: &mut Workspace,
    grads: &mut HeadGrads,
) -> (f32, f32) {
    let HeadDims {
        input: d,
        hidden: h,
        ..
    } = head.dims;
    let b = xs.len();
    forward::<L>(head, xs, mask, ws);
    let loss = backward_small(head, y, lambda, mask, ws);
    let s1 = sumsq_rows::<L>(&head.w1, d);
    let s2 = sumsq_rows::<L>(&head.w2, h);
    // gW1 [H, D] = dz1ᵀ [H, b] · x [b, D] + λ·W1, each element's sum over samples in order.
    let n8 = d / 8;
    let mut dz = vec![0.0f32; b];
    let mut xk: Vec<&[f32; 8]> = Vec::with_capacity(b);
    let mut xcol = vec![0.0f32; b];
    for j in 0..h {
        for (s, v) in dz.iter_mut().enumerate() {
            *v = ws.dz1[s * h + j];
        }
        let w_row = &head.w1[j * d..(j + 1) * d];
        let g_row = &mut grads.w1[j * d..(j + 1) * d];
        let (wc, wt) = w_row.as_chunks::<8>();
        let (gc, gt) = g_row.as_chunks_mut::<8>();
        for (k, (wk, gk)) in wc.iter().zip(gc.iter_mut()).enumerate().take(n8) {
            xk.clear();
            xk.extend(xs.iter().map(|x| &x.as_chunks::<8>().0[k]));
            grad_lanes::<L>(&dz, &xk, lambda, L::load(wk)).store(gk);
        }
        for (t, (&w, g)) in wt.iter().zip(gt.iter_mut()).enumerate() {
            for (s, x) in xs.iter().enumerate() {
                xcol[s] = x[n8 * 8 + t];
            }
            *g = grad_scalar(&dz, &xcol, lambda, w);
        }
    }
    grads.b1.copy_from_slice(&ws.gb1);
    grads.w2.copy_from_slice(&ws.gw2);
    grads.b2.copy_from_slice(&ws.gb2);
    (loss, penalty_value(lambda, s1, s2))
}

/// `v ← μ·v + g; p ← p − lr·v`, elementwise, each a fused multiply-add; subnormal
/// velocities become zero ([`flush`]).
#[inline(always)]
fn sgd_update<L: Lanes>(p: &mut [f32], v: &mut [f32], g: &[f32], mu: f32, lr: f32) {
    let (pc, pt) = p.as_chunks_mut::<8>();
    let (vc, vt) = v.as_chunks_mut::<8>();
    let (gc, gt) = g.as_chunks::<8>();
    let (vmu, vneg_lr) = (L::splat(mu), L::splat(-lr));
    for ((pk, vk), gk) in pc.iter_mut().zip(vc.iter_mut()).zip(gc) {
        let vn = L::mul_add(vmu, L::load(vk), L::load(gk)).flush();
        vn.store(vk);
        L::mul_add(vneg_lr, vn, L::load(pk)).store(pk);
    }
    for ((pi, vi), &gi) in pt.iter_mut().zip(vt.iter_mut()).zip(gt) {
        let vn = flush(mu.mul_add(*vi, gi));
        *vi = vn;
        *pi = (-lr).mul_add(vn, *pi);
    }
}

#[inline(always)]
fn sgd_all<L: Lanes>(head: &mut Head, vel: &mut HeadGrads, g: &HeadGrads, mu: f32, lr: f32) {
    sgd_update::<L>(&mut head.w1, &mut vel.w1, &g.w1, mu, lr);
    sgd_update::<L>(&mut head.b1, &mut vel.b1, &g.b1, mu, lr);
    sgd_update::<L>(&mut head.w2, &mut vel.w2, &g.w2, mu, lr);
    sgd_update::<L>(&mut head.b2, &mut vel.b2, &g.b2, mu, lr);
}
