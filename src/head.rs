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

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
                "--activation",
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
    /// Rejects a zero width, naming it.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("input width", self.input),
            ("--hidden", self.hidden),
            ("classes", self.classes),
        ] {
            if v == 0 {
                return Err(Error::invalid(name, "must be at least 1"));
            }
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
            "--lambda",
            format!("{lambda} is not a finite number ≥ 0"),
        ))
    }
}

/// λ/2·(s1 + s2), the one formula both the fused step and [`Head::penalty`] use.
fn penalty_value(lambda: f32, s1: f32, s2: f32) -> f32 {
    0.5 * lambda * (s1 + s2)
}

/// SGD with momentum, as `torch.optim.SGD(params, lr, momentum)` with dampening 0 and no
/// Nesterov: for every parameter `v ← μ·v + g; p ← p − lr·v`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sgd {
    /// Learning rate (> 0).
    pub lr: f32,
    /// Momentum μ (0 ≤ μ < 1; 0 is plain SGD).
    pub momentum: f32,
    /// Momentum buffers `v`, shaped like the head (zero before the first step).
    pub velocity: HeadGrads,
}

impl Sgd {
    /// A fresh optimiser for a head of `dims`; rejects lr ≤ 0 and μ outside [0, 1).
    pub fn new(dims: HeadDims, lr: f32, momentum: f32) -> Result<Sgd> {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::invalid("--lr", format!("{lr} is not a number > 0")));
        }
        if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
            return Err(Error::invalid(
                "--momentum",
                format!("{momentum} is not in [0, 1)"),
            ));
        }
        Ok(Sgd {
            lr,
            momentum,
            velocity: HeadGrads::zeros(dims),
        })
    }

    /// One update of every parameter of `head` with gradients `grads`.
    pub fn step(&mut self, head: &mut Head, grads: &HeadGrads) -> Result<()> {
        head.check()?;
        grads.check(head.dims, "gradient")?;
        self.velocity.check(head.dims, "momentum buffer")?;
        Isa::detect().sgd_all(head, &mut self.velocity, grads, self.momentum, self.lr);
        Ok(())
    }
}

/// Reusable buffers for training steps: one allocation for a whole run.
///
/// [`Stepper::step`] is the fused training step the training loop uses: forward, backward and
/// the SGD update in one pass over `W1`, bit-identical to [`Head::loss_and_grad`] followed by
/// [`Sgd::step`] (a test checks it) but without writing the 2048×32 gradient to memory.
#[derive(Debug, Clone)]
pub struct Stepper {
    ws: Workspace,
    grads: HeadGrads,
    isa: Isa,
}

impl Stepper {
    /// Buffers for batches of up to `max_batch` samples of a head of `dims`.
    pub fn new(dims: HeadDims, max_batch: usize) -> Stepper {
        Stepper {
            ws: Workspace::new(dims, max_batch.max(1)),
            grads: HeadGrads::zeros(dims),
            isa: Isa::detect(),
        }
    }

    /// One training step on the batch `xs` (each `[D]`) with labels `y`, L2 strength `lambda`
    /// and an optional dropout mask `[b, H]` (each entry 0 or 1/(1−p), multiplied into the
    /// hidden activations). Returns (mean cross-entropy, penalty) before the update.
    pub fn step(
        &mut self,
        head: &mut Head,
        sgd: &mut Sgd,
        xs: &[&[f32]],
        y: &[u8],
        lambda: f32,
        dropout_mask: Option<&[f32]>,
    ) -> Result<(f32, f32)> {
        let d = head.dims;
        check_lambda(lambda)?;
        if xs.is_empty() {
            return Err(Error::invalid("batch", "is empty"));
        }
        if let Some(bad) = xs.iter().find(|r| r.len() != d.input) {
            return Err(Error::invalid(
                "features",
                format!("a row has {} values, expected {}", bad.len(), d.input),
            ));
        }
        head.check_labels(y, xs.len())?;
        if let Some(m) = dropout_mask {
            check_len("dropout", "mask", m.len(), xs.len() * d.hidden)?;
        }
        head.check()?;
        sgd.velocity.check(d, "momentum buffer")?;
        if self.ws.dims != d || self.grads.w1.len() != d.hidden * d.input {
            *self = Stepper::new(d, xs.len());
        }
        self.ws.ensure_batch(xs.len());
        let (mu, lr) = (sgd.momentum, sgd.lr);
        if xs.len() <= 4 {
            Ok(self.isa.fused_step(
                head,
                &mut sgd.velocity,
                xs,
                y,
                lambda,
                mu,
                lr,
                dropout_mask,
                &mut self.ws,
            ))
        } else {
            // Large batches: the unfused path (same arithmetic, see the module docs).
            let r = self.isa.loss_and_grad(
                head,
                xs,
                y,
                lambda,
                dropout_mask,
                &mut self.ws,
                &mut self.grads,
            );
            self.isa
                .sgd_all(head, &mut sgd.velocity, &self.grads, mu, lr);
            Ok(r)
        }
    }
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

// ------------------------------------------------------------------------------------------
// Layer 1 and the SGD update: 8-lane kernels, generic over the instruction set.
// ------------------------------------------------------------------------------------------

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
trait Kernels {
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
            let v = L::mul_add(vmu, L::load(vk), g);
            v.store(vk);
            L::mul_add(vneg_lr, v, w).store(wk);
        }
        for (t, (wi, vi)) in wt.iter_mut().zip(vt.iter_mut()).enumerate() {
            let w = *wi;
            let xcol: [f32; S] = std::array::from_fn(|s| xc[s].1[t]);
            let g = grad_scalar(&dz, &xcol, lambda, w);
            let v = mu.mul_add(*vi, g);
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

/// `v ← μ·v + g; p ← p − lr·v`, elementwise, each a fused multiply-add.
#[inline(always)]
fn sgd_update<L: Lanes>(p: &mut [f32], v: &mut [f32], g: &[f32], mu: f32, lr: f32) {
    let (pc, pt) = p.as_chunks_mut::<8>();
    let (vc, vt) = v.as_chunks_mut::<8>();
    let (gc, gt) = g.as_chunks::<8>();
    let (vmu, vneg_lr) = (L::splat(mu), L::splat(-lr));
    for ((pk, vk), gk) in pc.iter_mut().zip(vc.iter_mut()).zip(gc) {
        let vn = L::mul_add(vmu, L::load(vk), L::load(gk));
        vn.store(vk);
        L::mul_add(vneg_lr, vn, L::load(pk)).store(pk);
    }
    for ((pi, vi), &gi) in pt.iter_mut().zip(vt.iter_mut()).zip(gt) {
        let vn = mu.mul_add(*vi, gi);
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
