//! The classification head trained on cached backbone features, with its loss, a hand-written
//! backward pass and SGD with momentum.
//!
//! The original course script (`imagenet_finetune.py`) puts `fc1 = nn.Linear(2048, 32)`,
//! `nn.Dropout(p=0.5)` and `fc2 = nn.Linear(32, 10)` on ResNet-50, with forward
//! `fc2(dropout(fc1(x)))` — no activation between the two layers — and trains it with
//! `nn.CrossEntropyLoss` and `optim.SGD(lr=0.001, momentum=0.9)`. This module is that head,
//! with the hidden activation a choice ([`Activation`]): ReLU by default (our recommendation:
//! without it the two layers compose to one linear map of rank ≤ 32), or none, as the script:
//!
//! ```text
//!   x [b, D] ──Linear(D, H)──► z1 [b, H] ──act──► (dropout) a1 [b, H] ──Linear(H, C)──► z2 [b, C]
//!   act = ReLU or identity;  dropout as nn.Dropout: zero with probability p, scale kept units
//!   by 1/(1−p) in training, identity in evaluation
//!   loss = mean_b CE(z2, y) + λ/2 · (‖W1‖² + ‖W2‖²)        (biases are not penalised)
//! ```
//!
//! Forward and backward are written by hand in f32, as paired functions in the style of
//! Karpathy's llm.c, rather than with candle's autograd: a training step at batch size 4 is a
//! few hundred thousand multiply-adds, far below the cost of building a graph, and the
//! 2048×32 layer dominates, so its three passes (forward, gradient, SGD update) are fused
//! into cache-friendly loops over one weight row at a time.
//!
//! The module is in three files: this one (the head, its loss and the small scalar layer-2
//! pass), `lanes.rs` (layer 1 and the update on 8-lane vectors) and `sgd.rs` ([`Sgd`],
//! [`Stepper`]).
//!
//! ## Determinism
//!
//! The hot loops run on 8-lane vectors: AVX2+FMA when the CPU has them (detected at run time),
//! otherwise a portable 8-lane emulation that performs exactly the same IEEE operations
//! (`f32::mul_add` is a correctly rounded fused multiply-add everywhere) in the same order.
//! Every sum has a fixed order that does not depend on the batch a sample sits in, nothing is
//! threaded, so the same seed gives bit-identical results.
//!
//! ## PyTorch semantics
//!
//! * [`Head::init`] follows `nn.Linear.reset_parameters`: `kaiming_uniform_(a=√5)` for the
//!   weight, i.e. U(−1/√fan_in, 1/√fan_in), and the same bound for the bias.
//! * [`Sgd`] follows `torch.optim.SGD` with `momentum`, `dampening = 0`, `nesterov = False`:
//!   `v ← μ·v + g`, `p ← p − lr·v` (the first step's `v = g` is the same thing with `v` zeroed).
//!   The L2 term is not PyTorch's `weight_decay` but an explicit penalty whose gradient `λ·W` is
//!   added to `g`, which is numerically the same update but lets the penalty be logged.
//!   Velocities that decay into the subnormals are set to zero, which moves no weight above
//!   `lr·2⁻¹⁰²` but avoids Intel's ~150-cycle assists on subnormal arithmetic
//!   (see `lanes::flush`).

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod lanes;
mod sgd;

use crate::isa::Isa;
use lanes::Kernels;
pub use sgd::{Sgd, Stepper};

/// The most parameters a head may have (1 GiB of f32, ×3 with momentum and gradients):
/// a hidden width in the millions is a typo, not a model.
pub const MAX_PARAMETERS: usize = 1 << 28;

/// Hidden width of the original script's head.
pub const HIDDEN: usize = 32;

/// The activation between the head's two linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(0, z)`: our default; the hidden layer is then a real non-linearity.
    #[default]
    Relu,
    /// The identity, as the original course script (`fc2(dropout(fc1(x)))`): the head is a
    /// linear map of rank at most the hidden width.
    None,
}

impl Activation {
    /// The activation of a pre-activation value.
    #[inline]
    pub fn apply(self, z: f32) -> f32 {
        match self {
            Activation::Relu => z.max(0.0),
            Activation::None => z,
        }
    }

    /// Its derivative at `z` (ReLU's is taken as 0 at 0, as PyTorch does).
    #[inline]
    pub fn derivative(self, z: f32) -> f32 {
        match self {
            Activation::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::None => 1.0,
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Activation> {
        match s {
            "relu" => Ok(Activation::Relu),
            "none" => Ok(Activation::None),
            other => Err(Error::invalid(
                "activation",
                format!("`{other}` is neither `relu` nor `none`"),
            )),
        }
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Activation::Relu => "relu",
            Activation::None => "none",
        })
    }
}

/// The widths of the head's three layers of units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadDims {
    /// Feature width `D` (2048 for ResNet-50).
    pub input: usize,
    /// Hidden width `H` (32 in the original script).
    pub hidden: usize,
    /// Number of classes `C` (10).
    pub classes: usize,
}

impl HeadDims {
    /// Rejects a zero width, naming it, and a head too large to hold (more than
    /// [`MAX_PARAMETERS`], or sizes whose product overflows).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("input width", self.input),
            ("hidden", self.hidden),
            ("classes", self.classes),
        ] {
            if v == 0 {
                return Err(Error::invalid(name, "must be at least 1"));
            }
        }
        let (d, h, c) = (self.input, self.hidden, self.classes);
        let count = h
            .checked_mul(d)
            .and_then(|w1| w1.checked_add(h.checked_mul(c)?))
            .and_then(|w| w.checked_add(h)?.checked_add(c));
        if count.is_none_or(|n| n > MAX_PARAMETERS) {
            return Err(Error::invalid(
                "hidden",
                format!(
                    "a {d}→{h}→{c} head has {} parameters, more than the {MAX_PARAMETERS} \
                     allowed",
                    count.map_or("too many".to_string(), |n| n.to_string())
                ),
            ));
        }
        Ok(())
    }
}

/// The head's parameters, in PyTorch's layout (`weight` is `[out, in]`, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// First layer weight, `[H, D]`.
    pub w1: Vec<f32>,
    /// First layer bias, `[H]`.
    pub b1: Vec<f32>,
    /// Second layer weight, `[C, H]`.
    pub w2: Vec<f32>,
    /// Second layer bias, `[C]`.
    pub b2: Vec<f32>,
    /// Layer widths.
    pub dims: HeadDims,
    /// The activation between the layers ([`Activation::Relu`] unless set).
    pub activation: Activation,
}

/// Gradients (or momentum buffers) with the shapes of a [`Head`]'s parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadGrads {
    /// `[H, D]`.
    pub w1: Vec<f32>,
    /// `[H]`.
    pub b1: Vec<f32>,
    /// `[C, H]`.
    pub w2: Vec<f32>,
    /// `[C]`.
    pub b2: Vec<f32>,
}

impl HeadGrads {
    /// All zeros, shaped for `dims`.
    pub fn zeros(dims: HeadDims) -> HeadGrads {
        HeadGrads {
            w1: vec![0.0; dims.hidden * dims.input],
            b1: vec![0.0; dims.hidden],
            w2: vec![0.0; dims.classes * dims.hidden],
            b2: vec![0.0; dims.classes],
        }
    }

    /// Checks every buffer has the length `dims` implies; `what` names the buffers in errors.
    pub fn check(&self, dims: HeadDims, what: &str) -> Result<()> {
        check_len(what, "w1", self.w1.len(), dims.hidden * dims.input)?;
        check_len(what, "b1", self.b1.len(), dims.hidden)?;
        check_len(what, "w2", self.w2.len(), dims.classes * dims.hidden)?;
        check_len(what, "b2", self.b2.len(), dims.classes)
    }
}

fn check_len(what: &str, name: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("{what} `{name}`"),
            format!("has {got} values, expected {want}"),
        ))
    }
}

/// Loss and accuracy of a head over a labelled set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Mean cross-entropy (no penalty).
    pub loss: f64,
    /// Fraction of samples whose arg-max logit is the label.
    pub accuracy: f64,
    /// Number of correctly classified samples.
    pub correct: usize,
    /// Number of samples.
    pub count: usize,
}

/// Per-sample outputs of [`Head::predict`].
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// Softmax probabilities, `[N, C]`.
    pub probabilities: Vec<f32>,
    /// Arg-max class per sample (the first maximum on ties, as `torch.argmax`), `[N]`.
    pub predicted: Vec<u8>,
    /// Cross-entropy per sample, `[N]`.
    pub losses: Vec<f32>,
}

impl Head {
    /// A freshly initialised head, as `nn.Linear(input, hidden)` and `nn.Linear(hidden, classes)`
    /// initialise themselves: every weight and bias of a layer uniform in ±1/√fan_in.
    ///
    /// The draws come from ChaCha8 seeded with `seed`, weight then bias, layer 1 then layer 2,
    /// each value `(2u − 1)·bound` with `u` the top 24 bits of a 32-bit word (exact in f32).
    pub fn init(input: usize, hidden: usize, classes: usize, seed: u64) -> Result<Head> {
        let dims = HeadDims {
            input,
            hidden,
            classes,
        };
        dims.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n)
                .map(|_| {
                    let u = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
                    (2.0 * u - 1.0) * bound
                })
                .collect()
        };
        let w1 = uniform(hidden * input, input);
        let b1 = uniform(hidden, input);
        let w2 = uniform(classes * hidden, hidden);
        let b2 = uniform(classes, hidden);
        Ok(Head {
            w1,
            b1,
            w2,
            b2,
            dims,
            activation: Activation::Relu,
        })
    }

    /// The same head with the hidden activation `activation`.
    pub fn with_activation(mut self, activation: Activation) -> Head {
        self.activation = activation;
        self
    }

    /// Builds a head from given parameters, checking every length against `dims`.
    pub fn from_parts(
        dims: HeadDims,
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: Vec<f32>,
    ) -> Result<Head> {
        dims.validate()?;
        let head = Head {
            w1,
            b1,
            w2,
            b2,
            dims,
            activation: Activation::Relu,
        };
        head.check()?;
        Ok(head)
    }

    /// Checks the parameter lengths against `self.dims`.
    pub fn check(&self) -> Result<()> {
        let d = self.dims;
        check_len("head", "w1", self.w1.len(), d.hidden * d.input)?;
        check_len("head", "b1", self.b1.len(), d.hidden)?;
        check_len("head", "w2", self.w2.len(), d.classes * d.hidden)?;
        check_len("head", "b2", self.b2.len(), d.classes)
    }

    /// The L2 penalty λ/2·(‖W1‖² + ‖W2‖²) (biases excluded), summed in the same order as in
    /// training so the two agree bit for bit.
    pub fn penalty(&self, lambda: f32) -> f32 {
        let isa = Isa::detect();
        let s1 = isa.sumsq_rows(&self.w1, self.dims.input);
        let s2 = isa.sumsq_rows(&self.w2, self.dims.hidden);
        penalty_value(lambda, s1, s2)
    }

    /// Logits for `n` rows of features `x` (`[n, D]` row-major): `[n, C]`. No dropout.
    pub fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        let rows = self.rows(x)?;
        let d = self.dims;
        let mut out = vec![0.0; rows.len() * d.classes]; // [n, C]
        let mut ws = Workspace::new(d, 4);
        let isa = Isa::detect();
        for (chunk, o) in rows.chunks(4).zip(out.chunks_mut(4 * d.classes)) {
            isa.forward(self, chunk, None, &mut ws);
            o.copy_from_slice(&ws.z2[..chunk.len() * d.classes]);
        }
        Ok(out)
    }

    /// Softmax probabilities for `n` rows of features `x` (`[n, D]`): `[n, C]`.
    pub fn probabilities(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut z = self.logits(x)?; // [n, C]
        let mut p = vec![0.0; self.dims.classes];
        for row in z.chunks_mut(self.dims.classes) {
            softmax_xent(row, 0, &mut p);
            row.copy_from_slice(&p);
        }
        Ok(z)
    }

    /// Probabilities, arg-max predictions and per-sample cross-entropy for features `x`
    /// (`[n, D]`) with labels `y` (`[n]`).
    pub fn predict(&self, x: &[f32], y: &[u8]) -> Result<Predictions> {
        let rows = self.rows(x)?;
        self.check_labels(y, rows.len())?;
        let c = self.dims.classes;
        let mut out = Predictions {
            probabilities: vec![0.0; rows.len() * c],
            predicted: Vec::with_capacity(rows.len()),
            losses: Vec::with_capacity(rows.len()),
        };
        let mut ws = Workspace::new(self.dims, 4);
        let isa = Isa::detect();
        for ((chunk, ys), probs) in rows
            .chunks(4)
            .zip(y.chunks(4))
            .zip(out.probabilities.chunks_mut(4 * c))
        {
            isa.forward(self, chunk, None, &mut ws);
            for (s, &label) in ys.iter().enumerate() {
                let z = &ws.z2[s * c..(s + 1) * c]; // [C]
                out.predicted.push(argmax(z));
                out.losses.push(softmax_xent(
                    z,
                    label as usize,
                    &mut probs[s * c..(s + 1) * c],
                ));
            }
        }
        Ok(out)
    }

    /// Mean cross-entropy and accuracy over features `x` (`[n, D]`) with labels `y` (`[n]`).
    pub fn score(&self, x: &[f32], y: &[u8]) -> Result<Score> {
        let p = self.predict(x, y)?;
        let correct = p.predicted.iter().zip(y).filter(|(a, b)| a == b).count();
        let count = y.len();
        let loss = p.losses.iter().map(|&l| f64::from(l)).sum::<f64>() / count.max(1) as f64;
        Ok(Score {
            loss,
            accuracy: correct as f64 / count.max(1) as f64,
            correct,
            count,
        })
    }

    /// Mean cross-entropy over the batch, the penalty λ/2·(‖W1‖² + ‖W2‖²), and the gradient of
    /// their sum with respect to every parameter. `x` is `[b, D]` row-major, `y` is `[b]`.
    /// No dropout: this is the head as a function, for checking and for callers that run
    /// their own optimiser.
    pub fn loss_and_grad(&self, x: &[f32], y: &[u8], lambda: f32) -> Result<(f32, f32, HeadGrads)> {
        check_lambda(lambda)?;
        let rows = self.rows(x)?;
        if rows.is_empty() {
            return Err(Error::invalid("batch", "is empty"));
        }
        self.check_labels(y, rows.len())?;
        let mut ws = Workspace::new(self.dims, rows.len());
        let mut grads = HeadGrads::zeros(self.dims);
        let (loss, penalty) =
            Isa::detect().loss_and_grad(self, &rows, y, lambda, None, &mut ws, &mut grads);
        Ok((loss, penalty, grads))
    }

    /// Splits `[n, D]` features into row slices, checking the length.
    fn rows<'a>(&self, x: &'a [f32]) -> Result<Vec<&'a [f32]>> {
        let d = self.dims.input;
        if !x.len().is_multiple_of(d) {
            return Err(Error::invalid(
                "features",
                format!(
                    "{} values are not a whole number of rows of width {d}",
                    x.len()
                ),
            ));
        }
        Ok(x.chunks_exact(d).collect())
    }

    fn check_labels(&self, y: &[u8], n: usize) -> Result<()> {
        if y.len() != n {
            return Err(Error::invalid(
                "labels",
                format!("{} labels for {n} feature rows", y.len()),
            ));
        }
        if let Some(bad) = y.iter().find(|&&v| v as usize >= self.dims.classes) {
            return Err(Error::invalid(
                "labels",
                format!("label {bad} is not below the {} classes", self.dims.classes),
            ));
        }
        Ok(())
    }
}

fn check_lambda(lambda: f32) -> Result<()> {
    if lambda.is_finite() && lambda >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            "lambda",
            format!("{lambda} is not a finite number ≥ 0"),
        ))
    }
}

/// λ/2·(s1 + s2), the one formula both the fused step and [`Head::penalty`] use.
fn penalty_value(lambda: f32, s1: f32, s2: f32) -> f32 {
    0.5 * lambda * (s1 + s2)
}

/// Forward activations and small gradients of one batch.
#[derive(Debug, Clone)]
struct Workspace {
    dims: HeadDims,
    batch: usize,
    /// Pre-activations of the hidden layer, `[b, H]`.
    z1: Vec<f32>,
    /// Hidden activations after the activation (and dropout), `[b, H]`.
    a1: Vec<f32>,
    /// Logits, `[b, C]`.
    z2: Vec<f32>,
    /// Softmax probabilities, `[b, C]`.
    probs: Vec<f32>,
    /// ∂loss/∂z2, `[b, C]`.
    dz2: Vec<f32>,
    /// ∂loss/∂z1, `[b, H]`.
    dz1: Vec<f32>,
    /// ∂loss/∂W2 with the penalty term, `[C, H]`.
    gw2: Vec<f32>,
    /// ∂loss/∂b1, `[H]`.
    gb1: Vec<f32>,
    /// ∂loss/∂b2, `[C]`.
    gb2: Vec<f32>,
}

impl Workspace {
    fn new(dims: HeadDims, batch: usize) -> Workspace {
        let (h, c) = (dims.hidden, dims.classes);
        Workspace {
            dims,
            batch,
            z1: vec![0.0; batch * h],
            a1: vec![0.0; batch * h],
            z2: vec![0.0; batch * c],
            probs: vec![0.0; batch * c],
            dz2: vec![0.0; batch * c],
            dz1: vec![0.0; batch * h],
            gw2: vec![0.0; c * h],
            gb1: vec![0.0; h],
            gb2: vec![0.0; c],
        }
    }

    fn ensure_batch(&mut self, batch: usize) {
        if batch > self.batch {
            *self = Workspace::new(self.dims, batch);
        }
    }
}

/// Numerically stable softmax of `z` into `p` and the cross-entropy `−log p[y]`, computed as
/// `(max + ln Σ exp(z − max)) − z[y]` like PyTorch's `log_softmax`.
fn softmax_xent(z: &[f32], y: usize, p: &mut [f32]) -> f32 {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for (pi, &zi) in p.iter_mut().zip(z) {
        *pi = (zi - m).exp();
        sum += *pi;
    }
    for pi in p.iter_mut() {
        *pi /= sum;
    }
    (m + sum.ln()) - z[y]
}

/// Index of the first maximum (NaN never wins).
fn argmax(z: &[f32]) -> u8 {
    let mut best = 0;
    for (i, &v) in z.iter().enumerate() {
        if v > z[best] {
            best = i;
        }
    }
    best as u8
}

// ------------------------------------------------------------------------------------------
// Layer 2, softmax and cross-entropy: small, scalar, shared by every instruction set.
// ------------------------------------------------------------------------------------------

/// Layer 1's epilogue and layer 2 forward: `a1 = act(z1)·mask`, `z2 = a1·W2ᵀ + b2`.
fn forward_small(head: &Head, b: usize, mask: Option<&[f32]>, ws: &mut Workspace) {
    let HeadDims {
        hidden: h,
        classes: c,
        ..
    } = head.dims;
    let act = head.activation;
    // a1 [b, H]
    for (i, (a, &z)) in ws.a1[..b * h].iter_mut().zip(&ws.z1[..b * h]).enumerate() {
        let r = act.apply(z);
        *a = match mask {
            Some(m) => r * m[i],
            None => r,
        };
    }
    // z2 [b, C] = a1 [b, H] · W2ᵀ [H, C] + b2
    for s in 0..b {
        let a = &ws.a1[s * h..(s + 1) * h];
        for k in 0..c {
            let w = &head.w2[k * h..(k + 1) * h];
            let mut acc = 0.0f32;
            for (&ai, &wi) in a.iter().zip(w) {
                acc += ai * wi;
            }
            ws.z2[s * c + k] = acc + head.b2[k];
        }
    }
}

/// Loss and the backward pass down to ∂loss/∂z1; fills `dz2`, `gw2` (with λ·W2), `gb2`,
/// `dz1` and `gb1`. Returns the mean cross-entropy over the batch.
fn backward_small(
    head: &Head,
    y: &[u8],
    lambda: f32,
    mask: Option<&[f32]>,
    ws: &mut Workspace,
) -> f32 {
    let HeadDims {
        hidden: h,
        classes: c,
        ..
    } = head.dims;
    let b = y.len();
    let inv_b = 1.0 / b as f32;
    // CE per sample; dz2 = (softmax − onehot)/b  [b, C]
    let mut loss_sum = 0.0f32;
    for (s, &label) in y.iter().enumerate() {
        let range = s * c..(s + 1) * c;
        loss_sum += softmax_xent(
            &ws.z2[range.clone()],
            label as usize,
            &mut ws.probs[range.clone()],
        );
        for k in 0..c {
            let onehot = if k == label as usize { 1.0 } else { 0.0 };
            ws.dz2[s * c + k] = (ws.probs[s * c + k] - onehot) * inv_b;
        }
    }
    // gW2 [C, H] = dz2ᵀ [C, b] · a1 [b, H] + λ·W2;  gb2 [C] = Σ_b dz2. Every sum runs over
    // the samples in order; the loops are arranged so the innermost runs along contiguous rows.
    ws.gw2.fill(0.0);
    ws.gb2.fill(0.0);
    for s in 0..b {
        let a = &ws.a1[s * h..(s + 1) * h]; // [H]
        for k in 0..c {
            let d = ws.dz2[s * c + k];
            ws.gb2[k] += d;
            for (g, &av) in ws.gw2[k * h..(k + 1) * h].iter_mut().zip(a) {
                *g += d * av;
            }
        }
    }
    for (g, &w) in ws.gw2.iter_mut().zip(&head.w2) {
        *g += lambda * w;
    }
    // da1 [b, H] = dz2 [b, C] · W2 [C, H] (sum over classes in order);
    // dz1 = da1 · act'(z1) · mask;  gb1 = Σ_b dz1
    for s in 0..b {
        let da = &mut ws.dz1[s * h..(s + 1) * h]; // [H]
        da.fill(0.0);
        for k in 0..c {
            let d = ws.dz2[s * c + k];
            for (x, &w) in da.iter_mut().zip(&head.w2[k * h..(k + 1) * h]) {
                *x += d * w;
            }
        }
        for (j, x) in da.iter_mut().enumerate() {
            let i = s * h + j;
            let gate = head.activation.derivative(ws.z1[i]);
            let m = mask.map_or(1.0, |m| m[i]);
            *x = *x * gate * m;
        }
    }
    ws.gb1.fill(0.0);
    for s in 0..b {
        for (g, &d) in ws.gb1.iter_mut().zip(&ws.dz1[s * h..(s + 1) * h]) {
            *g += d;
        }
    }
    loss_sum * inv_b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = (0..n * d)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1 << 24) as f32 * 3.0 - 1.0)
            .collect();
        let y = (0..n).map(|_| (rng.next_u32() % 10) as u8).collect();
        (x, y)
    }

    /// Runs `steps` fused steps of batch `b` with `isa`, returning the head, momentum and
    /// every (loss, penalty).
    fn run_fused(isa: Isa, d: usize, b: usize, steps: usize) -> (Head, HeadGrads, Vec<(f32, f32)>) {
        let mut head = Head::init(d, 32, 10, 4).unwrap();
        let mut sgd = Sgd::new(head.dims, 0.05, 0.9).unwrap();
        let mut st = Stepper::new(head.dims, b);
        st.isa = isa;
        let (x, y) = data(steps * b, d, 8);
        let mask: Vec<f32> = (0..b * 32)
            .map(|i| if i.is_multiple_of(5) { 0.0 } else { 1.25 })
            .collect();
        let mut out = Vec::new();
        for s in 0..steps {
            let xs: Vec<&[f32]> = (0..b)
                .map(|r| &x[(s * b + r) * d..(s * b + r + 1) * d])
                .collect();
            let m = (s % 2 == 1).then_some(&mask[..]);
            out.push(
                st.step(&mut head, &mut sgd, &xs, &y[s * b..(s + 1) * b], 0.01, m)
                    .unwrap(),
            );
        }
        (head, sgd.velocity, out)
    }

    #[test]
    fn fused_step_is_bit_identical_to_loss_and_grad_plus_sgd() {
        for (d, b) in [(2048, 4), (37, 3), (2048, 1), (64, 2)] {
            let (x, y) = data(b, d, 1);
            let mut fused = Head::init(d, 32, 10, 2).unwrap();
            let mut split = fused.clone();
            let mut sgd_f = Sgd::new(fused.dims, 0.01, 0.9).unwrap();
            let mut sgd_s = sgd_f.clone();
            let mut st = Stepper::new(fused.dims, 4);
            let xs: Vec<&[f32]> = x.chunks(d).collect();
            for _ in 0..3 {
                let (l1, p1) = st.step(&mut fused, &mut sgd_f, &xs, &y, 0.1, None).unwrap();
                let (l2, p2, g) = split.loss_and_grad(&x, &y, 0.1).unwrap();
                sgd_s.step(&mut split, &g).unwrap();
                assert_eq!((l1.to_bits(), p1.to_bits()), (l2.to_bits(), p2.to_bits()));
                assert_eq!(fused, split, "d={d} b={b}");
                assert_eq!(sgd_f, sgd_s);
            }
            assert_eq!(
                split.penalty(0.1).to_bits(),
                Isa::detect()
                    .loss_and_grad(
                        &split,
                        &xs,
                        &y,
                        0.1,
                        None,
                        &mut Workspace::new(split.dims, b),
                        &mut HeadGrads::zeros(split.dims)
                    )
                    .1
                    .to_bits()
            );
        }
    }

    #[test]
    fn portable_and_native_kernels_agree_bit_for_bit() {
        let native = Isa::detect();
        if native == Isa::Portable {
            return; // nothing to compare on this CPU
        }
        for (d, b, steps) in [(2048, 4, 6), (45, 3, 5), (100, 7, 3)] {
            let a = run_fused(Isa::Portable, d, b, steps);
            let n = run_fused(native, d, b, steps);
            assert_eq!(a.0, n.0, "weights, d={d} b={b}");
            assert_eq!(a.1, n.1, "momentum, d={d} b={b}");
            let bits = |v: &[(f32, f32)]| {
                v.iter()
                    .map(|(l, p)| (l.to_bits(), p.to_bits()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&a.2), bits(&n.2), "losses, d={d} b={b}");
        }
    }

    #[test]
    fn decaying_velocities_reach_zero_not_the_subnormals() {
        // A dead hidden unit (bias far below zero) has zero gradients, so its velocity row
        // only decays; d = 11 runs both the 8-lane chunk and the scalar tail.
        let d = 11;
        let (x, y) = data(4, d, 5);
        let xs: Vec<&[f32]> = x.chunks(d).collect();
        for isa in [Isa::Portable, Isa::detect()] {
            let mut head = Head::init(d, 2, 10, 1).unwrap();
            head.b1[1] = -1e6;
            let w_dead = head.w1[d..].to_vec();
            let mut sgd = Sgd::new(head.dims, 0.01, 0.5).unwrap();
            // Velocities just above the normal range, both signs: three halvings later they
            // would be subnormal.
            for (i, v) in sgd.velocity.w1[d..].iter_mut().enumerate() {
                *v = if i % 2 == 0 { 1.5e-37 } else { -1.5e-37 };
            }
            sgd.velocity.b2[0] = 2e-38;
            let mut st = Stepper::new(head.dims, 4);
            st.isa = isa;
            let mut seen_tiny = false;
            for _ in 0..6 {
                st.step(&mut head, &mut sgd, &xs, &y, 0.0, None).unwrap();
                let v = &sgd.velocity.w1[d..];
                assert!(v.iter().all(|v| !v.is_subnormal()), "{isa:?}: {v:?}");
                seen_tiny |= v.iter().all(|v| v.abs() < 1e-37 && *v != 0.0);
            }
            assert!(
                seen_tiny,
                "the test never reached the smallest normal velocities"
            );
            assert!(sgd.velocity.w1[d..].iter().all(|&v| v == 0.0));
            // Moving by lr·v ≈ 1e-39 changed none of the dead unit's weights.
            assert_eq!(head.w1[d..], w_dead[..]);
            // The unfused update (Sgd::step, used for large batches) flushes alike.
            let mut g = HeadGrads::zeros(head.dims);
            g.b2[0] = 0.0;
            sgd.velocity.b2[0] = 2e-38;
            sgd.step(&mut head, &g).unwrap();
            assert_eq!(sgd.velocity.b2[0], 0.0);
        }
    }

    #[test]
    fn a_sample_gets_the_same_logits_in_any_batch() {
        let head = Head::init(70, 32, 10, 9).unwrap();
        let (x, _) = data(7, 70, 3);
        let all = head.logits(&x).unwrap();
        for s in 0..7 {
            let one = head.logits(&x[s * 70..(s + 1) * 70]).unwrap();
            assert_eq!(one, all[s * 10..(s + 1) * 10]);
        }
    }
}
