//! Error propagation: the δ-rule of back-propagation, written out and verified.
//!
//! The first half of the assignment derives the error derivatives of a small regression network
//! by back-propagation (Bishop, *Pattern Recognition and Machine Learning*, §5.3; Rumelhart,
//! Hinton & Williams 1986). This module computes them with exactly those recurrences, in `f64`,
//! and checks them against central finite differences, so the derivation is executable.
//!
//! # The network and its notation
//!
//! Layers are numbered l = 1 … L. Layer 1 is the input x (its units have no activation
//! function: z^(1)_i = x_i). Layers 2 … L−1 are hidden, with the logistic activation
//! h(a) = σ(a) = 1 / (1 + e^(−a)); layer L is the output y with the identity activation.
//! The assignment's network is 3-4-4-1 ([`DEFAULT_SIZES`]).
//!
//! * a^(l)_j — the activation (weighted input) of unit j in layer l,
//! * z^(l)_j = h(a^(l)_j) — its output (z^(L)_j = a^(L)_j = y_j),
//! * w^(l)_{jk} — the weight from unit k of layer l to unit j of layer l+1, so w^(1) is a
//!   [n₂, n₁] = [4, 3] matrix,
//! * b^(l)_j — optional bias of unit j of layer l+1; it is the weight w^(l)_{j0} from a
//!   constant unit z^(l)_0 = 1, so every rule for weights holds for it with z = 1.
//!
//! Forward pass: a^(l+1)_j = Σ_k w^(l)_{jk} z^(l)_k (+ b^(l)_j), z^(l+1)_j = h(a^(l+1)_j).
//!
//! Error: E = ½ Σ_j (y_j − t_j)², which is ½(y − t)² for the single output of the assignment.
//!
//! # The δ-rule
//!
//! With δ^(l)_j = ∂E/∂a^(l)_j, the chain rule gives, for the 3-4-4-1 network (L = 4):
//!
//! * δ^(4)_1 = ∂E/∂a^(4)_1 = y − t, and ∂E/∂w^(3)_{1k} = δ^(4)_1 z^(3)_k
//! * δ^(3)_k = h'(a^(3)_k) w^(3)_{1k} δ^(4)_1, and ∂E/∂w^(2)_{kj} = δ^(3)_k z^(2)_j
//! * δ^(2)_j = h'(a^(2)_j) Σ_k w^(2)_{kj} δ^(3)_k, and ∂E/∂w^(1)_{ji} = δ^(2)_j x_i
//! * h'(a) = σ(a)(1 − σ(a)) = e^(−a) / (1 + e^(−a))²
//!
//! and in general, for any layer sizes:
//!
//! * δ^(L)_j = y_j − t_j (identity output, squared error),
//! * δ^(l)_j = h'(a^(l)_j) Σ_k w^(l)_{kj} δ^(l+1)_k for 1 < l < L,
//! * ∂E/∂w^(l)_{jk} = δ^(l+1)_j z^(l)_k (with z^(1) = x), and ∂E/∂b^(l)_j = δ^(l+1)_j.
//!
//! Each δ^(l) needs only δ^(l+1), so one backward sweep gives every derivative at the cost of
//! about one forward pass. The code pairs a forward and a backward function per layer type, in
//! the style of Karpathy's llm.c: `linear_forward`/`linear_backward` (the weighted sums and
//! their derivatives, including the sum Σ_k w^(l)_{kj} δ^(l+1)_k), `sigmoid_forward`/
//! `sigmoid_backward` (the factor h'(a)), and the loss pair that starts the recurrence.
//!
//! # Checking it
//!
//! [`Network::gradient_check`] compares every δ and every ∂E/∂w (and ∂E/∂b) with a central
//! difference of E (fourth order: (E(θ−2ε) − 8E(θ−ε) + 8E(θ+ε) − E(θ+2ε)) / 12ε); for δ^(l)_j the perturbed quantity is a^(l)_j itself,
//! propagated forward from layer l. See [`central_difference`] for the step and
//! [`relative_error`] for the error measure.
//!
//! # The head of the main task
//!
//! The tests apply the same δ equations, in f64, to the classifier head of the main task
//! (`tests/common/reference_head.rs`): Linear(d→h) → ReLU → Linear(h→c) with softmax
//! cross-entropy averaged over the batch and the L2 penalty λ/2 (‖W₁‖² + ‖W₂‖²) on the weight
//! matrices (not the biases). There the output δ is (softmax − one-hot) / batch size, and
//! h'(a) is the ReLU's step function. They check it against candle's autograd and against the
//! head's own training gradients, so the two halves of the assignment check each other.
//!
//! # Parameter files
//!
//! [`Problem::from_json_file`] reads a network, an input and a target from JSON:
//!
//! ```json
//! {
//!   "weights": [
//!     [[0.1, -0.2, 0.3], [0.4, 0.5, -0.6], [0.7, 0.8, 0.9], [-1.0, 1.1, 1.2]],
//!     [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2], [1.3, 1.4, 1.5, 1.6]],
//!     [[0.5, -0.5, 0.25, -0.25]]
//!   ],
//!   "biases": [[0.0, 0.1, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0], [0.5]],
//!   "x": [1.0, -2.0, 0.5],
//!   "t": [0.75]
//! }
//! ```
//!
//! * `weights` (required): one matrix per layer l = 1 … L−1; `weights[l-1]` is w^(l), a list
//!   of n_{l+1} rows of n_l numbers, `weights[l-1][j-1][k-1]` = w^(l)_{jk}. The layer sizes are
//!   read from these shapes.
//! * `biases` (optional): `biases[l-1][j-1]` = b^(l)_j, the bias of unit j of layer l+1.
//! * `x` (required): the n₁ inputs. `t` (required): the n_L targets, or one number when the
//!   network has one output.
//!
//! Unknown fields, wrong shapes, non-numbers and non-finite numbers (Python's `NaN` and
//! `Infinity`, or a literal like `1e999` that overflows) are rejected with an
//! [`Error::Format`] naming the field, e.g. `params.json: weights[1] has 3 rows, expected 4`.

use rand::Rng;
use serde::Serialize;

use crate::error::{Error, Result};

mod explain;
mod problem;

pub use problem::Problem;

/// The assignment's network: 3 inputs, two hidden layers of 4 logistic units, one output.
pub const DEFAULT_SIZES: [usize; 4] = [3, 4, 4, 1];

/// Smallest denominator of [`relative_error`], per unit of max(1, |E|).
///
/// A [`central_difference`] of E carries an absolute rounding error of about
/// 1.5 ε_mach |E| / step ≈ 5e-13 · |E|, whatever the size of the derivative. A derivative
/// much smaller than that (a saturated unit, an input near zero, a large E) cannot be checked
/// relatively, so the error is measured against REL_ERROR_FLOOR · max(1, |E|) instead, which
/// keeps the noise's share of the relative error near 5e-9.
pub const REL_ERROR_FLOOR: f64 = 1e-4;

// ---------------------------------------------------------------------------------------------
// Layer primitives, forward/backward pairs over a batch (llm.c style). Row-major throughout.
// ---------------------------------------------------------------------------------------------

/// `a[n, j] = Σ_k w[j, k] z[n, k] (+ b[j])`.
fn linear_forward(
    out: &mut [f64], // [batch, n_out]
    inp: &[f64],     // [batch, n_in]
    w: &[f64],       // [n_out, n_in]
    bias: Option<&[f64]>,
    n_in: usize,
    n_out: usize,
) {
    for (out_row, in_row) in out.chunks_exact_mut(n_out).zip(inp.chunks_exact(n_in)) {
        for (j, (o, w_row)) in out_row.iter_mut().zip(w.chunks_exact(n_in)).enumerate() {
            let mut sum = bias.map_or(0.0, |b| b[j]);
            for (w_jk, z_k) in w_row.iter().zip(in_row) {
                sum += w_jk * z_k;
            }
            *o = sum;
        }
    }
}

/// The backward pass of [`linear_forward`], accumulating like llm.c:
/// `dw[j, k] += Σ_n δ[n, j] z[n, k]`, `db[j] += Σ_n δ[n, j]`, and — the sum in the δ
/// recurrence — `dinp[n, k] += Σ_j w[j, k] δ[n, j]`.
#[allow(clippy::too_many_arguments)] // mirrors llm.c's explicit signatures; a struct would hide shapes
fn linear_backward(
    mut dinp: Option<&mut [f64]>, // [batch, n_in]
    dw: &mut [f64],               // [n_out, n_in]
    mut db: Option<&mut [f64]>,   // [n_out]
    dout: &[f64],                 // [batch, n_out], the δ of the layer above
    inp: &[f64],                  // [batch, n_in]
    w: &[f64],                    // [n_out, n_in]
    n_in: usize,
    n_out: usize,
) {
    for (n, (d_row, in_row)) in dout
        .chunks_exact(n_out)
        .zip(inp.chunks_exact(n_in))
        .enumerate()
    {
        for (j, &delta_j) in d_row.iter().enumerate() {
            let w_row = &w[j * n_in..(j + 1) * n_in];
            let dw_row = &mut dw[j * n_in..(j + 1) * n_in];
            for (dw_jk, z_k) in dw_row.iter_mut().zip(in_row) {
                *dw_jk += delta_j * z_k;
            }
            if let Some(db) = db.as_deref_mut() {
                db[j] += delta_j;
            }
            if let Some(dinp) = dinp.as_deref_mut() {
                let dinp_row = &mut dinp[n * n_in..(n + 1) * n_in];
                for (d_k, w_jk) in dinp_row.iter_mut().zip(w_row) {
                    *d_k += w_jk * delta_j;
                }
            }
        }
    }
}

/// The logistic function σ(a) = 1 / (1 + e^(−a)).
fn sigmoid(a: f64) -> f64 {
    1.0 / (1.0 + (-a).exp())
}

/// z = σ(a), elementwise.
fn sigmoid_forward(z: &mut [f64], a: &[f64]) {
    for (z_i, &a_i) in z.iter_mut().zip(a) {
        *z_i = sigmoid(a_i);
    }
}

/// δ = h'(a) · dz with h'(a) = σ(a)(1 − σ(a)) = z(1 − z), from the stored outputs z.
fn sigmoid_backward(da: &mut [f64], z: &[f64], dz: &[f64]) {
    for ((da_i, &z_i), &dz_i) in da.iter_mut().zip(z).zip(dz) {
        *da_i = z_i * (1.0 - z_i) * dz_i;
    }
}

/// E = ½ Σ_j (y_j − t_j)².
fn squared_error_forward(y: &[f64], t: &[f64]) -> f64 {
    0.5 * y.iter().zip(t).map(|(y, t)| (y - t) * (y - t)).sum::<f64>()
}

/// δ^(L)_j = ∂E/∂y_j = y_j − t_j (the output is the identity, so ∂E/∂a^(L) = ∂E/∂y).
fn squared_error_backward(delta: &mut [f64], y: &[f64], t: &[f64]) {
    for ((d, y), t) in delta.iter_mut().zip(y).zip(t) {
        *d = y - t;
    }
}

// ---------------------------------------------------------------------------------------------
// The regression network of the assignment.
// ---------------------------------------------------------------------------------------------

/// A fully-connected network: logistic hidden units, identity output, optional biases.
///
/// Layer l (1-based, as in the notation) has `sizes()[l-1]` units; `weights()[l-1]` is w^(l),
/// row-major `[n_{l+1}, n_l]`, so w^(l)_{jk} is `weights()[l-1][(j-1) * n_l + (k-1)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    sizes: Vec<usize>,
    weights: Vec<Vec<f64>>,
    biases: Option<Vec<Vec<f64>>>,
}

/// Everything the forward pass computes, stored for the backward pass and for printing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forward {
    /// `a[l-1]` = a^(l); for the input layer a^(1) = z^(1) = x.
    pub a: Vec<Vec<f64>>,
    /// `z[l-1]` = z^(l) = h(a^(l)); `z[L-1]` is the output y.
    pub z: Vec<Vec<f64>>,
    /// The error E = ½ Σ_j (y_j − t_j)².
    pub loss: f64,
}

impl Forward {
    /// The network's output y = z^(L).
    pub fn output(&self) -> &[f64] {
        self.z.last().map_or(&[], Vec::as_slice)
    }
}

/// Every δ and every error derivative of one backward pass.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gradients {
    /// `delta[l-1]` = δ^(l) = ∂E/∂a^(l) for l = 2 … L; `delta[0]` is empty (the inputs have no
    /// activation, and no weight needs their δ).
    pub delta: Vec<Vec<f64>>,
    /// `dw[l-1]` = ∂E/∂w^(l), row-major `[n_{l+1}, n_l]` like the weights.
    pub dw: Vec<Vec<f64>>,
    /// `db[l-1]` = ∂E/∂b^(l), when the network has biases.
    pub db: Option<Vec<Vec<f64>>>,
}

impl Network {
    /// A network with the given layer sizes, weights (`weights[l-1]` = w^(l), row-major
    /// `[n_{l+1}, n_l]`) and optional biases (`biases[l-1]` = b^(l), `[n_{l+1}]`).
    ///
    /// Rejects fewer than two layers, empty layers, wrong lengths and non-finite values.
    pub fn new(
        sizes: Vec<usize>,
        weights: Vec<Vec<f64>>,
        biases: Option<Vec<Vec<f64>>>,
    ) -> Result<Self> {
        check_sizes(&sizes)?;
        let layers = sizes.len() - 1;
        if weights.len() != layers {
            return Err(Error::invalid(
                "weights",
                format!(
                    "{} matrices for {} layers, expected {layers}",
                    weights.len(),
                    sizes.len()
                ),
            ));
        }
        for (l, w) in weights.iter().enumerate() {
            let expected = sizes[l + 1] * sizes[l];
            if w.len() != expected {
                return Err(Error::invalid(
                    format!("w^({})", l + 1),
                    format!(
                        "{} values, expected {} × {} = {expected}",
                        w.len(),
                        sizes[l + 1],
                        sizes[l]
                    ),
                ));
            }
            check_finite(w, || format!("w^({})", l + 1))?;
        }
        if let Some(biases) = &biases {
            if biases.len() != layers {
                return Err(Error::invalid(
                    "biases",
                    format!("{} vectors, expected {layers}", biases.len()),
                ));
            }
            for (l, b) in biases.iter().enumerate() {
                if b.len() != sizes[l + 1] {
                    return Err(Error::invalid(
                        format!("b^({})", l + 1),
                        format!("{} values, expected {}", b.len(), sizes[l + 1]),
                    ));
                }
                check_finite(b, || format!("b^({})", l + 1))?;
            }
        }
        Ok(Network {
            sizes,
            weights,
            biases,
        })
    }

    /// A network with weights (and biases, if asked) drawn uniformly from [−1, 1) by `rng`,
    /// layer by layer, each matrix row by row.
    pub fn random(sizes: &[usize], biases: bool, rng: &mut impl Rng) -> Result<Self> {
        check_sizes(sizes)?;
        let weights = sizes
            .windows(2)
            .map(|pair| uniform(rng, pair[0] * pair[1]))
            .collect();
        let biases = biases.then(|| sizes[1..].iter().map(|&n| uniform(rng, n)).collect());
        Network::new(sizes.to_vec(), weights, biases)
    }

    /// Units per layer, input first.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// `weights()[l-1]` = w^(l), row-major `[n_{l+1}, n_l]`.
    pub fn weights(&self) -> &[Vec<f64>] {
        &self.weights
    }

    /// `biases()[l-1]` = b^(l), when the network has biases.
    pub fn biases(&self) -> Option<&[Vec<f64>]> {
        self.biases.as_deref()
    }

    /// Runs the forward pass on input `x` (`[n₁]`) against target `t` (`[n_L]`), keeping every
    /// a^(l) and z^(l).
    pub fn forward(&self, x: &[f64], t: &[f64]) -> Result<Forward> {
        self.check_example(x, t)?;
        Ok(self.forward_from(0, x.to_vec(), t))
    }

    /// Runs the backward pass: δ^(L) = y − t, then δ^(l) = h'(a^(l)) Σ_k w^(l)_{kj} δ^(l+1)_k
    /// down to layer 2, with ∂E/∂w^(l)_{jk} = δ^(l+1)_j z^(l)_k on the way.
    ///
    /// `fwd` must come from [`Network::forward`] on this network with the same target `t`.
    pub fn backward(&self, fwd: &Forward, t: &[f64]) -> Result<Gradients> {
        let depth = self.sizes.len();
        let matches = fwd.z.len() == depth
            && fwd.a.len() == depth
            && fwd.z.iter().zip(&self.sizes).all(|(z, &n)| z.len() == n);
        if !matches {
            return Err(Error::invalid(
                "forward pass",
                format!("does not come from this {} network", self.sizes_label()),
            ));
        }
        self.check_example(&fwd.z[0], t)?;

        let mut delta = vec![Vec::new(); depth];
        let mut top = vec![0.0; self.sizes[depth - 1]];
        squared_error_backward(&mut top, fwd.output(), t);
        delta[depth - 1] = top;

        let mut dw: Vec<Vec<f64>> = self.weights.iter().map(|w| vec![0.0; w.len()]).collect();
        let mut db: Option<Vec<Vec<f64>>> = self
            .biases
            .as_ref()
            .map(|bs| bs.iter().map(|b| vec![0.0; b.len()]).collect());

        // Index i is layer i + 1: w^(i+1) = weights[i] maps layer i+1 to layer i+2, whose δ is
        // delta[i + 1].
        for i in (0..depth - 1).rev() {
            let (n_in, n_out) = (self.sizes[i], self.sizes[i + 1]);
            // Σ_k w^(l)_{kj} δ^(l+1)_k, needed only for hidden layers (i ≥ 1).
            let mut dz = (i > 0).then(|| vec![0.0; n_in]);
            linear_backward(
                dz.as_deref_mut(),
                &mut dw[i],
                db.as_mut().map(|db| db[i].as_mut_slice()),
                &delta[i + 1],
                &fwd.z[i],
                &self.weights[i],
                n_in,
                n_out,
            );
            if let Some(dz) = dz {
                let mut d = vec![0.0; n_in];
                sigmoid_backward(&mut d, &fwd.z[i], &dz);
                delta[i] = d;
            }
        }
        Ok(Gradients { delta, dw, db })
    }

    /// Compares every δ^(l)_j, ∂E/∂w^(l)_{jk} and ∂E/∂b^(l)_j with a central difference.
    /// Refuses networks of more than [`MAX_CHECKED_WEIGHTS`] weights and biases, whose check
    /// would run for minutes to hours.
    pub fn gradient_check(&self, x: &[f64], t: &[f64]) -> Result<GradientCheck> {
        let with_biases = self.biases.is_some();
        if let Some(n) =
            parameter_count(&self.sizes, with_biases).filter(|&n| n > MAX_CHECKED_WEIGHTS)
        {
            return Err(Error::invalid(
                "sizes",
                format!(
                    "{} has {n} {}; checking each by finite differences costs \
                     time ∝ their number squared, so at most {MAX_CHECKED_WEIGHTS} are checked: \
                     choose smaller layers",
                    sizes_label(&self.sizes),
                    if with_biases {
                        "weights and biases"
                    } else {
                        "weights"
                    }
                ),
            ));
        }
        let fwd = self.forward(x, t)?;
        let grads = self.backward(&fwd, t)?;
        let depth = self.sizes.len();

        // δ^(l)_j: perturb a^(l)_j and propagate from layer l. The input layer has no δ.
        let delta = (0..depth)
            .map(|i| {
                let a_i = if i == 0 { &[][..] } else { &fwd.a[i][..] };
                (0..a_i.len())
                    .map(|j| {
                        let numeric = central_difference(a_i[j], |v| {
                            let mut a = a_i.to_vec();
                            a[j] = v;
                            self.forward_from(i, a, t).loss
                        });
                        CheckEntry::new(grads.delta[i][j], numeric, fwd.loss)
                    })
                    .collect()
            })
            .collect();

        let mut probe = self.clone();
        let mut dw = Vec::with_capacity(depth - 1);
        for i in 0..depth - 1 {
            let entries = (0..self.weights[i].len())
                .map(|p| {
                    let numeric = central_difference(self.weights[i][p], |v| {
                        probe.weights[i][p] = v;
                        let loss = probe.forward_from(0, x.to_vec(), t).loss;
                        probe.weights[i][p] = self.weights[i][p];
                        loss
                    });
                    CheckEntry::new(grads.dw[i][p], numeric, fwd.loss)
                })
                .collect();
            dw.push(entries);
        }

        let db = match (&self.biases, &grads.db) {
            (Some(biases), Some(gdb)) => {
                let mut db = Vec::with_capacity(depth - 1);
                for i in 0..depth - 1 {
                    let entries = (0..biases[i].len())
                        .map(|j| {
                            let numeric = central_difference(biases[i][j], |v| {
                                if let Some(pb) = probe.biases.as_mut() {
                                    pb[i][j] = v;
                                }
                                let loss = probe.forward_from(0, x.to_vec(), t).loss;
                                if let Some(pb) = probe.biases.as_mut() {
                                    pb[i][j] = biases[i][j];
                                }
                                loss
                            });
                            CheckEntry::new(gdb[i][j], numeric, fwd.loss)
                        })
                        .collect();
                    db.push(entries);
                }
                Some(db)
            }
            _ => None,
        };
        Ok(GradientCheck { delta, dw, db })
    }

    /// The forward pass, every a and z, every δ and derivative beside its finite difference,
    /// named in the notation of the module docs (`δ^(3)_2`, `∂E/∂w^(2)_{12}`).
    pub fn report(&self, x: &[f64], t: &[f64]) -> Result<Report> {
        let fwd = self.forward(x, t)?;
        let check = self.gradient_check(x, t)?;
        let depth = self.sizes.len();
        // Two-digit unit numbers make "w_{112}" ambiguous; separate indices then.
        let sep = if self.sizes.iter().any(|&n| n > 9) {
            ","
        } else {
            ""
        };
        let mut entries = Vec::new();

        for (i, &x_i) in x.iter().enumerate() {
            entries.push(ReportEntry::value(
                format!("x_{}", i + 1),
                EntryKind::Input,
                1,
                i + 1,
                x_i,
            ));
        }
        for l in 2..=depth {
            for j in 0..self.sizes[l - 1] {
                let (a, z) = (fwd.a[l - 1][j], fwd.z[l - 1][j]);
                entries.push(ReportEntry::value(
                    format!("a^({l})_{}", j + 1),
                    EntryKind::Activation,
                    l,
                    j + 1,
                    a,
                ));
                entries.push(ReportEntry::value(
                    format!("z^({l})_{}", j + 1),
                    EntryKind::Output,
                    l,
                    j + 1,
                    z,
                ));
            }
        }
        for l in (2..=depth).rev() {
            for (j, c) in check.delta[l - 1].iter().enumerate() {
                entries.push(ReportEntry::checked(
                    format!("δ^({l})_{}", j + 1),
                    EntryKind::Delta,
                    l,
                    j + 1,
                    None,
                    c,
                ));
            }
        }
        for l in (1..depth).rev() {
            let n_in = self.sizes[l - 1];
            for (p, c) in check.dw[l - 1].iter().enumerate() {
                let (j, k) = (p / n_in + 1, p % n_in + 1);
                let name = format!("∂E/∂w^({l})_{{{j}{sep}{k}}}");
                entries.push(ReportEntry::checked(
                    name,
                    EntryKind::Weight,
                    l,
                    j,
                    Some(k),
                    c,
                ));
            }
            if let Some(db) = &check.db {
                for (j, c) in db[l - 1].iter().enumerate() {
                    let name = format!("∂E/∂b^({l})_{}", j + 1);
                    entries.push(ReportEntry::checked(
                        name,
                        EntryKind::Bias,
                        l,
                        j + 1,
                        None,
                        c,
                    ));
                }
            }
        }
        Ok(Report {
            sizes: self.sizes.clone(),
            biases: self.biases.is_some(),
            x: x.to_vec(),
            t: t.to_vec(),
            y: fwd.output().to_vec(),
            loss: fwd.loss,
            max_abs_error: check.max_abs_error(),
            max_rel_error: check.max_rel_error(),
            entries,
        })
    }

    /// "3-4-4-1".
    pub fn sizes_label(&self) -> String {
        sizes_label(&self.sizes)
    }

    fn check_example(&self, x: &[f64], t: &[f64]) -> Result<()> {
        let (n_in, n_out) = (self.sizes[0], self.sizes[self.sizes.len() - 1]);
        if x.len() != n_in {
            return Err(Error::invalid(
                "x",
                format!("{} values, expected {n_in} (layer 1)", x.len()),
            ));
        }
        if t.len() != n_out {
            return Err(Error::invalid(
                "t",
                format!("{} values, expected {n_out} (output layer)", t.len()),
            ));
        }
        check_finite(x, || "x".to_string())?;
        check_finite(t, || "t".to_string())
    }

    /// Forward pass from layer index `start` (layer start + 1) given its activations; layers
    /// below are left empty. Inputs are assumed checked.
    fn forward_from(&self, start: usize, a_start: Vec<f64>, t: &[f64]) -> Forward {
        let depth = self.sizes.len();
        let mut a = vec![Vec::new(); depth];
        let mut z = vec![Vec::new(); depth];
        z[start] = self.activate(start, &a_start);
        a[start] = a_start;
        for i in start + 1..depth {
            let mut a_i = vec![0.0; self.sizes[i]]; // [n_{i+1}]
            let bias = self.biases.as_ref().map(|b| b[i - 1].as_slice());
            linear_forward(
                &mut a_i,
                &z[i - 1],
                &self.weights[i - 1],
                bias,
                self.sizes[i - 1],
                self.sizes[i],
            );
            z[i] = self.activate(i, &a_i);
            a[i] = a_i;
        }
        let loss = squared_error_forward(&z[depth - 1], t);
        Forward { a, z, loss }
    }

    /// h for layer index i: identity for the input and output layers, logistic in between.
    fn activate(&self, i: usize, a: &[f64]) -> Vec<f64> {
        if i == 0 || i == self.sizes.len() - 1 {
            a.to_vec()
        } else {
            let mut z = vec![0.0; a.len()];
            sigmoid_forward(&mut z, a);
            z
        }
    }
}

fn check_sizes(sizes: &[usize]) -> Result<()> {
    if sizes.len() < 2 {
        return Err(Error::invalid(
            "sizes",
            format!(
                "{} layer(s); a network needs an input and an output layer",
                sizes.len()
            ),
        ));
    }
    if let Some(l) = sizes.iter().position(|&n| n == 0) {
        return Err(Error::invalid(
            "sizes",
            format!("layer {} has no units", l + 1),
        ));
    }
    // With biases, the most a network of these sizes can have.
    let weights = parameter_count(sizes, true);
    if weights.is_none_or(|w| w > MAX_WEIGHTS) {
        return Err(Error::invalid(
            "sizes",
            format!(
                "{} has up to {} weights and biases, more than the {MAX_WEIGHTS} this tool holds",
                sizes_label(sizes),
                weights.map_or("too many".to_string(), |w| w.to_string())
            ),
        ));
    }
    Ok(())
}

/// The most weights and biases a network may have (400 MB of f64).
pub const MAX_WEIGHTS: usize = 50_000_000;

/// The most weights and biases [`Network::gradient_check`] checks. Each of the N finite
/// differences runs the network (cost ∝ N), so the check costs ∝ N²: 20,000 take a few
/// seconds, a million would take hours.
pub const MAX_CHECKED_WEIGHTS: usize = 20_000;

/// Weights (plus biases, when `biases`) of a network with these layer sizes; `None` on
/// overflow.
fn parameter_count(sizes: &[usize], biases: bool) -> Option<usize> {
    sizes.windows(2).try_fold(0usize, |acc, pair| {
        acc.checked_add(pair[0].checked_mul(pair[1])?)?
            .checked_add(if biases { pair[1] } else { 0 })
    })
}

fn check_finite(values: &[f64], name: impl Fn() -> String) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(p) => Err(Error::invalid(
            name(),
            format!("value {} is {}", p + 1, values[p]),
        )),
        None => Ok(()),
    }
}

fn uniform(rng: &mut impl Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn sizes_label(sizes: &[usize]) -> String {
    sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("-")
}

// ---------------------------------------------------------------------------------------------
// Finite differences.
// ---------------------------------------------------------------------------------------------

/// The derivative of `f` at `theta` by the fourth-order central difference
/// (f(θ − 2ε) − 8 f(θ − ε) + 8 f(θ + ε) − f(θ + 2ε)) / 12ε.
///
/// The plain central difference (f(θ + ε) − f(θ − ε)) / 2ε has a truncation error of order ε²
/// f‴ and a rounding error of order ε_mach |f| / ε; at its best step (ε ≈ 6e-6) that leaves
/// absolute errors up to ~1e-9 on this module's networks, too coarse to show relative agreement
/// below 1e-7 for derivatives of order 1e-3. Taking the same symmetric differences at ε and 2ε
/// and cancelling the ε² term (Richardson extrapolation) leaves O(ε⁴) truncation, so a larger
/// step ε = ε_mach^(1/5) · max(1, |θ|) ≈ 7.4e-4 · max(1, |θ|) fits, and the rounding error
/// drops to ~1e-11.
pub fn central_difference(theta: f64, mut f: impl FnMut(f64) -> f64) -> f64 {
    let step = f64::EPSILON.powf(0.2) * theta.abs().max(1.0);
    // The step as actually represented after adding it to θ.
    let h = (theta + step) - theta;
    let (m2, m1, p1, p2) = (
        f(theta - 2.0 * h),
        f(theta - h),
        f(theta + h),
        f(theta + 2.0 * h),
    );
    (m2 - 8.0 * m1 + 8.0 * p1 - p2) / (12.0 * h)
}

/// |analytic − numeric| / max(|analytic|, |numeric|, [`REL_ERROR_FLOOR`] · max(1, |loss|)),
/// for a derivative of `loss` (the E that was differenced).
pub fn relative_error(analytic: f64, numeric: f64, loss: f64) -> f64 {
    let floor = REL_ERROR_FLOOR * loss.abs().max(1.0);
    let denominator = analytic.abs().max(numeric.abs()).max(floor);
    (analytic - numeric).abs() / denominator
}

/// One derivative beside its finite difference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CheckEntry {
    /// The value from the δ-rule.
    pub analytic: f64,
    /// The central difference.
    pub numeric: f64,
    /// |analytic − numeric|.
    pub abs_error: f64,
    /// [`relative_error`] of the two.
    pub rel_error: f64,
}

impl CheckEntry {
    /// Compares an analytic derivative of `loss` with its finite difference.
    pub fn new(analytic: f64, numeric: f64, loss: f64) -> Self {
        CheckEntry {
            analytic,
            numeric,
            abs_error: (analytic - numeric).abs(),
            rel_error: relative_error(analytic, numeric, loss),
        }
    }
}

/// Every derivative of [`Network::backward`] beside its finite difference, laid out like
/// [`Gradients`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GradientCheck {
    /// `delta[l-1][j-1]` checks δ^(l)_j; `delta[0]` is empty.
    pub delta: Vec<Vec<CheckEntry>>,
    /// `dw[l-1][(j-1) n_l + (k-1)]` checks ∂E/∂w^(l)_{jk}.
    pub dw: Vec<Vec<CheckEntry>>,
    /// `db[l-1][j-1]` checks ∂E/∂b^(l)_j, when the network has biases.
    pub db: Option<Vec<Vec<CheckEntry>>>,
}

impl GradientCheck {
    /// Every entry, δs first.
    pub fn entries(&self) -> impl Iterator<Item = &CheckEntry> {
        self.delta
            .iter()
            .chain(&self.dw)
            .chain(self.db.iter().flatten())
            .flatten()
    }

    /// The largest relative error of any entry; NaN if any entry's is (an overflowing
    /// network), so a failed check cannot hide.
    pub fn max_rel_error(&self) -> f64 {
        self.entries().map(|e| e.rel_error).fold(0.0, nan_max)
    }

    /// The largest absolute error of any entry; NaN if any entry's is.
    pub fn max_abs_error(&self) -> f64 {
        self.entries().map(|e| e.abs_error).fold(0.0, nan_max)
    }
}

/// max that propagates NaN (`f64::max` drops it).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// What a [`ReportEntry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An input x_i.
    Input,
    /// An activation a^(l)_j.
    Activation,
    /// A unit output z^(l)_j.
    Output,
    /// An error signal δ^(l)_j.
    Delta,
    /// A weight derivative ∂E/∂w^(l)_{jk}.
    Weight,
    /// A bias derivative ∂E/∂b^(l)_j.
    Bias,
}

/// One named quantity of a [`Report`]; derivatives carry their finite-difference check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportEntry {
    /// The quantity in the module's notation, e.g. `δ^(3)_2` or `∂E/∂w^(2)_{12}`.
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// The layer l (for weights and biases: the l of w^(l), b^(l)).
    pub layer: usize,
    /// The unit j (1-based).
    pub j: usize,
    /// The source unit k of a weight (1-based).
    pub k: Option<usize>,
    /// Its value (for derivatives: from the δ-rule).
    pub value: f64,
    /// The central difference, for derivatives.
    pub finite_difference: Option<f64>,
    /// |value − finite_difference|, for derivatives.
    pub abs_error: Option<f64>,
    /// [`relative_error`] of the two, for derivatives.
    pub rel_error: Option<f64>,
}

impl ReportEntry {
    fn value(name: String, kind: EntryKind, layer: usize, j: usize, value: f64) -> Self {
        ReportEntry {
            name,
            kind,
            layer,
            j,
            k: None,
            value,
            finite_difference: None,
            abs_error: None,
            rel_error: None,
        }
    }

    fn checked(
        name: String,
        kind: EntryKind,
        layer: usize,
        j: usize,
        k: Option<usize>,
        c: &CheckEntry,
    ) -> Self {
        ReportEntry {
            name,
            kind,
            layer,
            j,
            k,
            value: c.analytic,
            finite_difference: Some(c.numeric),
            abs_error: Some(c.abs_error),
            rel_error: Some(c.rel_error),
        }
    }
}

/// A full account of one example: forward pass, δs and derivatives with their checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Units per layer.
    pub sizes: Vec<usize>,
    /// Whether the network has biases.
    pub biases: bool,
    /// The input.
    pub x: Vec<f64>,
    /// The target.
    pub t: Vec<f64>,
    /// The output.
    pub y: Vec<f64>,
    /// E = ½ Σ_j (y_j − t_j)².
    pub loss: f64,
    /// The largest |analytic − numeric| of any derivative.
    pub max_abs_error: f64,
    /// The largest relative error of any derivative.
    pub max_rel_error: f64,
    /// Inputs, then a and z of layers 2 … L, then δ from the top down, then ∂E/∂w and ∂E/∂b
    /// from the top down (the order the backward pass produces them).
    pub entries: Vec<ReportEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn central_difference_is_accurate() {
        // The fourth-order stencil is exact for polynomials up to degree 4, so only rounding
        // is left: d/dθ θ⁴ at 2 is 32.
        let numeric = central_difference(2.0, |v| v * v * v * v);
        assert!((numeric - 32.0).abs() < 1e-9, "{numeric}");
        // On a function with all derivatives non-zero the O(ε⁴) truncation stays tiny.
        let numeric = central_difference(1.0, |v| (3.0 * v).exp());
        let exact = 3.0 * 3f64.exp();
        assert!(
            (numeric - exact).abs() / exact < 1e-10,
            "{numeric} vs {exact}"
        );
    }

    #[test]
    fn relative_error_uses_the_floor_for_tiny_values() {
        assert_eq!(relative_error(0.0, 0.0, 0.5), 0.0);
        assert!((relative_error(1e-9, 2e-9, 0.5) - 1e-9 / REL_ERROR_FLOOR).abs() < 1e-20);
        // The floor grows with the loss being differenced.
        assert!((relative_error(1e-9, 2e-9, 10.0) - 1e-10 / REL_ERROR_FLOOR).abs() < 1e-20);
        assert!((relative_error(2.0, 1.0, 0.5) - 0.5).abs() < 1e-15);
    }

    #[test]
    fn sigmoid_backward_matches_the_exponential_form() {
        for a in [-3.0, -0.5, 0.0, 0.7, 4.0] {
            let mut z = [0.0];
            sigmoid_forward(&mut z, &[a]);
            let mut d = [0.0];
            sigmoid_backward(&mut d, &z, &[1.0]);
            let e = f64::exp(-a);
            assert!((d[0] - e / ((1.0 + e) * (1.0 + e))).abs() < 1e-15);
        }
    }

    #[test]
    fn network_new_rejects_bad_shapes() {
        let err = Network::new(vec![2, 1], vec![vec![1.0]], None).unwrap_err();
        assert!(err.to_string().contains("w^(1)"), "{err}");
        let err = Network::new(vec![2], vec![], None).unwrap_err();
        assert!(err.to_string().contains("sizes"), "{err}");
        let err = Network::new(vec![1, 1], vec![vec![f64::NAN]], None).unwrap_err();
        assert!(err.to_string().contains("w^(1)"), "{err}");
    }
}
