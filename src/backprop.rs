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

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

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
    pub fn gradient_check(&self, x: &[f64], t: &[f64]) -> Result<GradientCheck> {
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
    Ok(())
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

// ---------------------------------------------------------------------------------------------
// A network with its example: what `cifar-finetune backprop` runs on.
// ---------------------------------------------------------------------------------------------

/// A network with an input and a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The network.
    pub network: Network,
    /// The input x, `[n₁]`.
    pub x: Vec<f64>,
    /// The target t, `[n_L]`.
    pub t: Vec<f64>,
}

impl Problem {
    /// Random weights (uniform in [−1, 1)), optional biases, input and target, all from a
    /// ChaCha8 generator seeded with `seed` (so the same seed gives the same problem), drawn in
    /// that order.
    pub fn random(sizes: &[usize], biases: bool, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let network = Network::random(sizes, biases, &mut rng)?;
        let x = uniform(&mut rng, sizes[0]);
        let t = uniform(&mut rng, sizes[sizes.len() - 1]);
        Ok(Problem { network, x, t })
    }

    /// Reads a parameter file (schema in the module docs). When `sizes` is given the file's
    /// shapes must match it.
    pub fn from_json_file(path: &Path, sizes: Option<&[usize]>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        Problem::from_json_str(&text, path, sizes)
    }

    /// Parses a parameter file's content (a leading UTF-8 byte-order mark is allowed);
    /// `path` only names the file in errors.
    pub fn from_json_str(text: &str, path: &Path, sizes: Option<&[usize]>) -> Result<Self> {
        let bad = |msg: String| Error::format(path, msg);
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let marked = mark_non_finite(text);
        // serde would also read a struct from a list of its fields in order: refuse that.
        if !marked.trim_start().starts_with('{') && !marked.trim().is_empty() {
            return Err(bad(
                "the top level is not an object (expected one with the fields weights, x, t \
                 and optionally biases)"
                    .into(),
            ));
        }
        let mut de = serde_json::Deserializer::from_str(&marked);
        let file: ParamFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            // serde_json appends the position; the path names the field better.
            let position = format!(" at line {} column {}", inner.line(), inner.column());
            let full = inner.to_string();
            let msg = full.strip_suffix(&position).unwrap_or(&full);
            let path = e.path().to_string();
            match inner.classify() {
                serde_json::error::Category::Data
                    if path != "." && !msg.starts_with("unknown field") =>
                {
                    bad(format!("{path}: {msg}"))
                }
                serde_json::error::Category::Data => bad(msg.to_string()),
                _ => bad(format!("invalid JSON: {full}")),
            }
        })?;
        de.end().map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let unwrap = |v: Vec<Finite>| v.into_iter().map(|f| f.0).collect::<Vec<f64>>();
        let mats = file.weights;
        if mats.is_empty() {
            return Err(bad("weights is empty, expected at least one matrix".into()));
        }
        let mut rows_of = Vec::with_capacity(mats.len());
        for (l, m) in mats.into_iter().enumerate() {
            if m.is_empty() {
                return Err(bad(format!(
                    "weights[{l}] has no rows, expected at least one"
                )));
            }
            rows_of.push(m.into_iter().map(unwrap).collect::<Vec<_>>());
        }

        // Layer sizes: from --sizes, or read off the matrices.
        let inputs = rows_of[0].first().map_or(0, Vec::len);
        let inferred: Vec<usize> = std::iter::once(inputs)
            .chain(rows_of.iter().map(Vec::len))
            .collect();
        let sizes = match sizes {
            Some(s) => {
                check_sizes(s)?;
                if rows_of.len() != s.len() - 1 {
                    return Err(bad(format!(
                        "weights has {} matrices, expected {} for sizes {}",
                        rows_of.len(),
                        s.len() - 1,
                        sizes_label(s)
                    )));
                }
                s.to_vec()
            }
            None => inferred,
        };
        let mut weights = Vec::with_capacity(rows_of.len());
        for (l, rows) in rows_of.into_iter().enumerate() {
            let (n_in, n_out) = (sizes[l], sizes[l + 1]);
            if rows.len() != n_out {
                return Err(bad(format!(
                    "weights[{l}] has {} rows, expected {n_out} (one per unit of layer {})",
                    rows.len(),
                    l + 2
                )));
            }
            for (j, row) in rows.iter().enumerate() {
                if row.len() != n_in {
                    return Err(bad(format!(
                        "weights[{l}][{j}] has {} values, expected {n_in} (one per unit of layer {})",
                        row.len(),
                        l + 1
                    )));
                }
            }
            weights.push(rows.concat());
        }
        if sizes.contains(&0) {
            return Err(bad(format!(
                "a layer has no units (sizes {})",
                sizes_label(&sizes)
            )));
        }

        let biases = match file.biases {
            None => None,
            Some(list) => {
                if list.len() != weights.len() {
                    return Err(bad(format!(
                        "biases has {} vectors, expected {} (one per weight matrix)",
                        list.len(),
                        weights.len()
                    )));
                }
                let mut biases = Vec::with_capacity(list.len());
                for (l, b) in list.into_iter().enumerate() {
                    if b.len() != sizes[l + 1] {
                        return Err(bad(format!(
                            "biases[{l}] has {} values, expected {} (one per unit of layer {})",
                            b.len(),
                            sizes[l + 1],
                            l + 2
                        )));
                    }
                    biases.push(unwrap(b));
                }
                Some(biases)
            }
        };

        let x = unwrap(file.x);
        if x.len() != sizes[0] {
            return Err(bad(format!(
                "x has {} values, expected {} (layer 1)",
                x.len(),
                sizes[0]
            )));
        }
        let n_out = sizes[sizes.len() - 1];
        let t = match file.t {
            Targets::One(t) if n_out == 1 => vec![t.0],
            Targets::One(_) => {
                return Err(bad(format!(
                    "t is a number, expected a list of {n_out} numbers"
                )));
            }
            Targets::Many(t) => unwrap(t),
        };
        if t.len() != n_out {
            return Err(bad(format!(
                "t has {} values, expected {n_out} (output layer)",
                t.len()
            )));
        }

        let network = Network::new(sizes, weights, biases).map_err(|e| bad(e.to_string()))?;
        Ok(Problem { network, x, t })
    }

    /// The problem as a parameter file (schema in the module docs), nested rows and all.
    pub fn to_json(&self) -> Value {
        let sizes = self.network.sizes();
        let weights: Vec<Vec<Vec<f64>>> = self
            .network
            .weights()
            .iter()
            .zip(sizes)
            .map(|(w, &n_in)| w.chunks(n_in).map(<[f64]>::to_vec).collect())
            .collect();
        let mut obj = serde_json::Map::new();
        obj.insert("weights".into(), serde_json::json!(weights));
        if let Some(b) = self.network.biases() {
            obj.insert("biases".into(), serde_json::json!(b));
        }
        obj.insert("x".into(), serde_json::json!(self.x));
        obj.insert("t".into(), serde_json::json!(self.t));
        Value::Object(obj)
    }

    /// [`Network::report`] on this problem's example.
    pub fn report(&self) -> Result<Report> {
        self.network.report(&self.x, &self.t)
    }
}

/// A number as the explanation prints it: at most 10 significant digits, plain decimals from
/// 1e-4 to 1e6 (trailing zeros dropped), scientific notation otherwise; negative numbers in
/// parentheses so that products read unambiguously. `tools/gen_backprop_explain.py` mirrors it.
fn explain_num(x: f64) -> String {
    let body = if x == 0.0 {
        "0".to_string()
    } else if (1e-4..1e6).contains(&x.abs()) {
        let digits_before = x.abs().log10().floor() as i32 + 1;
        let decimals = (10 - digits_before).max(0) as usize;
        let s = format!("{x:.decimals$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        if s == "-0" { "0".to_string() } else { s }
    } else {
        let s = format!("{x:.9e}");
        match s.split_once('e') {
            Some((m, e)) => {
                let m = if m.contains('.') {
                    m.trim_end_matches('0').trim_end_matches('.')
                } else {
                    m
                };
                format!("{m}e{e}")
            }
            None => s,
        }
    };
    if x < 0.0 && body != "0" {
        format!("({body})")
    } else {
        body
    }
}

/// The finite-difference line under each derived quantity.
fn explain_check(out: &mut String, e: &CheckEntry) {
    use std::fmt::Write as _;
    let rel = if e.rel_error < 1e-8 {
        "below 1e-8".to_string()
    } else {
        format!("{:.1e}", e.rel_error)
    };
    let _ = writeln!(
        out,
        "   finite difference: {} (relative error {rel})",
        explain_num(e.numeric)
    );
}

impl Problem {
    /// Part 1 of the assignment as a derivation a student can read: for the 3-4-4-1 network
    /// without biases (the assignment's), the forward pass and then each quantity the
    /// assignment asks for — δ^(4)_1, ∂E/∂w^(3)_{12}, δ^(3)_1, ∂E/∂w^(2)_{11}, δ^(2)_1,
    /// ∂E/∂w^(1)_{11} — as its symbolic formula with the chain of factors written out, the
    /// same formula with this problem's numbers, its value, and its finite-difference check.
    /// `source` says where the parameters came from (first line). The text, not only its
    /// numbers, is compared with `tools/gen_backprop_explain.py`'s in the tests.
    pub fn explain(&self, source: &str) -> Result<String> {
        use std::fmt::Write as _;
        let net = &self.network;
        if net.sizes() != DEFAULT_SIZES || net.biases().is_some() {
            return Err(Error::invalid(
                "--explain",
                format!(
                    "follows the assignment's 3-4-4-1 network without biases; this one is {}{}",
                    net.sizes_label(),
                    if net.biases().is_some() {
                        " with biases"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let (x, t) = (&self.x, self.t[0]);
        let fwd = net.forward(x, &self.t)?;
        let grads = net.backward(&fwd, &self.t)?;
        let check = net.gradient_check(x, &self.t)?;
        let w = net.weights();
        // w^(l)_{jk}, 1-based as in the notation.
        let wv = |l: usize, j: usize, k: usize| w[l - 1][(j - 1) * net.sizes()[l - 1] + (k - 1)];
        let a = |l: usize, j: usize| fwd.a[l - 1][j - 1];
        let z = |l: usize, j: usize| fwd.z[l - 1][j - 1];
        let hp = |l: usize, j: usize| z(l, j) * (1.0 - z(l, j));
        let d = |l: usize, j: usize| grads.delta[l - 1][j - 1];
        let n = explain_num;
        let mut o = String::new();

        let _ = writeln!(
            o,
            "Error propagation in the assignment's 3-4-4-1 network, step by step ({source})"
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Notation (the assignment's): x_1, x_2, x_3 are the inputs; a^(l)_j is the activation of unit j"
        );
        let _ = writeln!(
            o,
            "of layer l and z^(l)_j = h(a^(l)_j) its output; w^(l)_{{jk}} is the weight from unit k of layer l"
        );
        let _ = writeln!(
            o,
            "to unit j of layer l+1; h(a) = 1/(1 + e^(-a)) in the hidden layers 2 and 3, the identity at the"
        );
        let _ = writeln!(
            o,
            "output, so y = a^(4)_1; E = 1/2 (y - t)^2; δ^(l)_j = ∂E/∂a^(l)_j."
        );
        let _ = writeln!(
            o,
            "Corrected from the seed's report: a^(2)_1 has three input terms, not a fourth w^(1)_{{14}} x_4 (there are three inputs), and δ^(4)_1 = (2/2)(a^(4)_1 - t) needs its parentheses."
        );
        let _ = writeln!(o);

        let _ = writeln!(o, "Forward pass");
        let _ = writeln!(
            o,
            "   x = ({}, {}, {}), t = {}",
            n(x[0]),
            n(x[1]),
            n(x[2]),
            n(t)
        );
        let _ = writeln!(
            o,
            "   a^(2)_j = w^(1)_{{j1}} x_1 + w^(1)_{{j2}} x_2 + w^(1)_{{j3}} x_3,   z^(2)_j = h(a^(2)_j)"
        );
        for j in 1..=4 {
            let _ = writeln!(
                o,
                "   a^(2)_{j} = {} × {} + {} × {} + {} × {} = {},   z^(2)_{j} = {}",
                n(wv(1, j, 1)),
                n(x[0]),
                n(wv(1, j, 2)),
                n(x[1]),
                n(wv(1, j, 3)),
                n(x[2]),
                n(a(2, j)),
                n(z(2, j))
            );
        }
        let _ = writeln!(
            o,
            "   a^(3)_j = w^(2)_{{j1}} z^(2)_1 + w^(2)_{{j2}} z^(2)_2 + w^(2)_{{j3}} z^(2)_3 + w^(2)_{{j4}} z^(2)_4,   z^(3)_j = h(a^(3)_j)"
        );
        for j in 1..=4 {
            let _ = writeln!(
                o,
                "   a^(3)_{j} = {},   z^(3)_{j} = {}",
                n(a(3, j)),
                n(z(3, j))
            );
        }
        let _ = writeln!(
            o,
            "   y = a^(4)_1 = w^(3)_{{11}} z^(3)_1 + w^(3)_{{12}} z^(3)_2 + w^(3)_{{13}} z^(3)_3 + w^(3)_{{14}} z^(3)_4 = {}",
            n(a(4, 1))
        );
        let _ = writeln!(
            o,
            "   E = 1/2 (y - t)^2 = 1/2 ({} - {})^2 = {}",
            n(a(4, 1)),
            n(t),
            n(fwd.loss)
        );
        let _ = writeln!(o);

        // 1. δ^(4)_1
        let _ = writeln!(o, "1. δ^(4)_1 = ∂E/∂a^(4)_1");
        let _ = writeln!(
            o,
            "   E = 1/2 (a^(4)_1 - t)^2 because y = a^(4)_1 (identity output), so"
        );
        let _ = writeln!(o, "   δ^(4)_1 = (2/2)(a^(4)_1 - t) = a^(4)_1 - t");
        let _ = writeln!(o, "           = {} - {} = {}", n(a(4, 1)), n(t), n(d(4, 1)));
        explain_check(&mut o, &check.delta[3][0]);
        let _ = writeln!(o);

        // 2. ∂E/∂w^(3)_{12}
        let _ = writeln!(o, "2. ∂E/∂w^(3)_{{12}}");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(4)_1 · ∂a^(4)_1/∂w^(3)_{{12}} = δ^(4)_1 z^(3)_2   (of the four terms of a^(4)_1 only w^(3)_{{12}} z^(3)_2 holds w^(3)_{{12}})"
        );
        let _ = writeln!(
            o,
            "   = {} × {} = {}",
            n(d(4, 1)),
            n(z(3, 2)),
            n(grads.dw[2][1])
        );
        explain_check(&mut o, &check.dw[2][1]);
        let _ = writeln!(o);

        // 3. δ^(3)_1
        let _ = writeln!(o, "3. δ^(3)_1 = ∂E/∂a^(3)_1");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(4)_1 · ∂a^(4)_1/∂z^(3)_1 · ∂z^(3)_1/∂a^(3)_1 = δ^(4)_1 w^(3)_{{11}} h'(a^(3)_1)"
        );
        let _ = writeln!(
            o,
            "   h'(a) = e^(-a)/(1 + e^(-a))^2 = h(a)(1 - h(a)), so h'(a^(3)_1) = z^(3)_1 (1 - z^(3)_1) = {} × (1 - {}) = {}",
            n(z(3, 1)),
            n(z(3, 1)),
            n(hp(3, 1))
        );
        let _ = writeln!(
            o,
            "   = {} × {} × {} = {}",
            n(d(4, 1)),
            n(wv(3, 1, 1)),
            n(hp(3, 1)),
            n(d(3, 1))
        );
        explain_check(&mut o, &check.delta[2][0]);
        let _ = writeln!(o);

        // 4. ∂E/∂w^(2)_{11}
        let _ = writeln!(o, "4. ∂E/∂w^(2)_{{11}}");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(3)_1 · ∂a^(3)_1/∂w^(2)_{{11}} = δ^(3)_1 z^(2)_1   (a^(3)_1 = w^(2)_{{11}} z^(2)_1 + w^(2)_{{12}} z^(2)_2 + w^(2)_{{13}} z^(2)_3 + w^(2)_{{14}} z^(2)_4)"
        );
        let _ = writeln!(
            o,
            "   = {} × {} = {}",
            n(d(3, 1)),
            n(z(2, 1)),
            n(grads.dw[1][0])
        );
        explain_check(&mut o, &check.dw[1][0]);
        let _ = writeln!(o);

        // 5. δ^(2)_1
        let _ = writeln!(o, "5. δ^(2)_1 = ∂E/∂a^(2)_1");
        let _ = writeln!(
            o,
            "   a^(2)_1 reaches E through z^(2)_1 and every a^(3)_k (k = 1, ..., 4), so the chain rule sums over k:"
        );
        let _ = writeln!(
            o,
            "   = Σ_k ∂E/∂a^(3)_k · ∂a^(3)_k/∂a^(2)_1 = [δ^(3)_1 w^(2)_{{11}} + δ^(3)_2 w^(2)_{{21}} + δ^(3)_3 w^(2)_{{31}} + δ^(3)_4 w^(2)_{{41}}] h'(a^(2)_1)"
        );
        let _ = writeln!(
            o,
            "   with δ^(3)_k = δ^(4)_1 w^(3)_{{1k}} h'(a^(3)_k) = δ^(4)_1 w^(3)_{{1k}} z^(3)_k (1 - z^(3)_k):"
        );
        for k in 1..=4 {
            let _ = writeln!(
                o,
                "     δ^(3)_{k} = {} × {} × {} = {}",
                n(d(4, 1)),
                n(wv(3, 1, k)),
                n(hp(3, k)),
                n(d(3, k))
            );
        }
        let _ = writeln!(
            o,
            "   and h'(a^(2)_1) = z^(2)_1 (1 - z^(2)_1) = {} × (1 - {}) = {}",
            n(z(2, 1)),
            n(z(2, 1)),
            n(hp(2, 1))
        );
        let _ = writeln!(
            o,
            "   = [{} × {} + {} × {} + {} × {} + {} × {}] × {} = {}",
            n(d(3, 1)),
            n(wv(2, 1, 1)),
            n(d(3, 2)),
            n(wv(2, 2, 1)),
            n(d(3, 3)),
            n(wv(2, 3, 1)),
            n(d(3, 4)),
            n(wv(2, 4, 1)),
            n(hp(2, 1)),
            n(d(2, 1))
        );
        explain_check(&mut o, &check.delta[1][0]);
        let _ = writeln!(o);

        // 6. ∂E/∂w^(1)_{11}
        let _ = writeln!(o, "6. ∂E/∂w^(1)_{{11}}");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(2)_1 · ∂a^(2)_1/∂w^(1)_{{11}} = δ^(2)_1 x_1   (a^(2)_1 = w^(1)_{{11}} x_1 + w^(1)_{{12}} x_2 + w^(1)_{{13}} x_3)"
        );
        let _ = writeln!(
            o,
            "   = {} × {} = {}",
            n(d(2, 1)),
            n(x[0]),
            n(grads.dw[0][0])
        );
        explain_check(&mut o, &check.dw[0][0]);
        Ok(o)
    }
}

/// A parameter file as written (schema in the module docs); shapes are checked after
/// parsing, where the layer sizes are known.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with the fields weights, x, t and optionally biases"
)]
struct ParamFile {
    weights: Vec<Vec<Vec<Finite>>>,
    #[serde(default)]
    biases: Option<Vec<Vec<Finite>>>,
    x: Vec<Finite>,
    t: Targets,
}

/// The targets: a list, or one number for a network with one output.
enum Targets {
    One(Finite),
    Many(Vec<Finite>),
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Targets;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a finite number or a list of them")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> std::result::Result<Targets, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(Targets::Many)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_f64(v).map(Targets::One)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_i64(v).map(Targets::One)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_u64(v).map(Targets::One)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Targets, E> {
                FiniteVisitor.visit_str(v).map(Targets::One)
            }
        }
        de.deserialize_any(V)
    }
}

/// A finite number. Non-finite tokens arrive as strings marked by [`mark_non_finite`], so
/// that the error names the field instead of a line and column.
struct Finite(f64);

impl<'de> Deserialize<'de> for Finite {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        de.deserialize_any(FiniteVisitor)
    }
}

struct FiniteVisitor;

impl serde::de::Visitor<'_> for FiniteVisitor {
    type Value = Finite;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a finite number")
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Finite, E> {
        if v.is_finite() {
            Ok(Finite(v))
        } else {
            Err(E::custom(format!("{v} is not a finite number")))
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Finite, E> {
        Ok(Finite(v as f64))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Finite, E> {
        Ok(Finite(v as f64))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Finite, E> {
        match v.strip_prefix(NON_FINITE_MARK) {
            Some(word) => Err(E::custom(format!("{word} is not a finite number"))),
            None => Err(E::invalid_type(serde::de::Unexpected::Str(v), &self)),
        }
    }
}

/// Prefix of the strings [`mark_non_finite`] puts in place of non-finite numbers; a raw
/// control character cannot occur in a JSON string, so no valid file collides with it by
/// accident.
const NON_FINITE_MARK: &str = "\u{1}non-finite:";

/// JSON has no NaN or infinity, but Python's `json.dump` writes `NaN`, `Infinity` and
/// `-Infinity`, and a literal like `1e999` overflows; serde_json rejects all of these with a
/// line and column only. To name the field instead, such tokens (outside strings) become
/// marked strings, which [`Finite`] reports as non-finite numbers.
fn mark_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.');
    let mut out = String::new();
    let mut copied = 0; // bytes of `text` already in `out`
    let mut replaced = false;
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c == '"' {
            // Skip the string, escapes included.
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
            continue;
        }
        if !is_word(c) {
            continue;
        }
        let mut end = start + c.len_utf8();
        while let Some(&(i, c)) = chars.peek() {
            if !is_word(c) {
                break;
            }
            end = i + c.len_utf8();
            chars.next();
        }
        let word = &text[start..end];
        let non_finite = match word.trim_start_matches(['+', '-']) {
            "NaN" | "nan" | "Infinity" | "inf" | "infinity" => true,
            _ => word.parse::<f64>().is_ok_and(|x| !x.is_finite()),
        };
        if non_finite {
            out.push_str(&text[copied..start]);
            out.push_str(&format!("\"\\u0001non-finite:{word}\""));
            copied = end;
            replaced = true;
        }
    }
    if !replaced {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
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
