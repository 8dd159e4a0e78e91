//! A reference for the head's training gradients: the δ-rule of the error-propagation half
//! of the assignment applied, in f64, to the classifier head of the main task. The tests
//! compare it with candle's autograd (`tests/backprop.rs`) and with the f32 head's own
//! gradients (`tests/head_backprop.rs`), so the two halves of the assignment check each other.

/// The error of a bad argument, naming it.
fn invalid(what: &str, msg: impl std::fmt::Display) -> String {
    format!("invalid {what}: {msg}")
}

/// The classifier head of the main task in `f64`: Linear(input→hidden) → ReLU →
/// Linear(hidden→classes), weights row-major `[out, in]` like PyTorch's `nn.Linear`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadParams {
    /// Input features d (2048 for ResNet-50).
    pub input: usize,
    /// Hidden units h (32 in the assignment).
    pub hidden: usize,
    /// Classes c (10 for CIFAR-10).
    pub classes: usize,
    /// W₁, `[hidden, input]`.
    pub w1: Vec<f64>,
    /// b₁, `[hidden]`.
    pub b1: Vec<f64>,
    /// W₂, `[classes, hidden]`.
    pub w2: Vec<f64>,
    /// b₂, `[classes]`.
    pub b2: Vec<f64>,
}

/// Derivatives of the head's objective, shaped like [`HeadParams`].
#[derive(Debug, Clone, PartialEq)]
pub struct HeadGradients {
    /// ∂E/∂W₁, `[hidden, input]`.
    pub w1: Vec<f64>,
    /// ∂E/∂b₁, `[hidden]`.
    pub b1: Vec<f64>,
    /// ∂E/∂W₂, `[classes, hidden]`.
    pub w2: Vec<f64>,
    /// ∂E/∂b₂, `[classes]`.
    pub b2: Vec<f64>,
}

/// The head's forward and backward pass on one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadBackprop {
    /// Mean cross-entropy over the batch.
    pub data_loss: f64,
    /// λ/2 (‖W₁‖² + ‖W₂‖²).
    pub penalty: f64,
    /// δ^(2) = ∂E/∂a^(2), the hidden layer's error signals, `[batch, hidden]`.
    pub delta_hidden: Vec<f64>,
    /// δ^(3) = (softmax(a^(3)) − onehot(label)) / batch, `[batch, classes]`.
    pub delta_output: Vec<f64>,
    /// ∂(data loss + penalty)/∂θ.
    pub grads: HeadGradients,
}

/// Forward and backward pass of the head on a batch `x` (`[batch, input]`, row-major) with
/// labels `y` (`[batch]`) and L2 strength `lambda`, by the δ-rule:
///
/// * δ^(3)_{nk} = (p_{nk} − 1[k = y_n]) / B,
/// * δ^(2)_{nj} = 1[a^(2)_{nj} > 0] Σ_k W₂_{kj} δ^(3)_{nk},
/// * ∂E/∂W₂_{kj} = Σ_n δ^(3)_{nk} z^(2)_{nj} + λ W₂_{kj}, ∂E/∂b₂_k = Σ_n δ^(3)_{nk},
/// * ∂E/∂W₁_{ji} = Σ_n δ^(2)_{nj} x_{ni} + λ W₁_{ji}, ∂E/∂b₁_j = Σ_n δ^(2)_{nj}.
pub fn head_backprop(
    p: &HeadParams,
    x: &[f64],
    y: &[usize],
    lambda: f64,
) -> Result<HeadBackprop, String> {
    let (d, h, c) = (p.input, p.hidden, p.classes);
    let batch = y.len();
    for (name, len, expected) in [
        ("head w1", p.w1.len(), h * d),
        ("head b1", p.b1.len(), h),
        ("head w2", p.w2.len(), c * h),
        ("head b2", p.b2.len(), c),
    ] {
        if len != expected {
            return Err(invalid(name, format!("{len} values, expected {expected}")));
        }
    }
    if d == 0 || h == 0 || c == 0 {
        return Err(invalid(
            "head sizes",
            format!("{d}→{h}→{c} has an empty layer"),
        ));
    }
    if batch == 0 {
        return Err(invalid("labels", "empty batch"));
    }
    if x.len() != batch * d {
        return Err(invalid(
            "features",
            format!(
                "{} values, expected {batch} × {d} for {batch} labels",
                x.len()
            ),
        ));
    }
    if let Some(n) = y.iter().position(|&label| label >= c) {
        return Err(invalid(
            "labels",
            format!("label {} of sample {n} is not below {c}", y[n]),
        ));
    }
    if !lambda.is_finite() || lambda < 0.0 {
        return Err(invalid(
            "lambda",
            format!("{lambda} is not a finite non-negative number"),
        ));
    }

    // Forward, keeping every activation.
    let mut a2 = vec![0.0; batch * h]; // [batch, hidden]
    linear_forward(&mut a2, x, &p.w1, Some(&p.b1), d, h);
    let mut z2 = vec![0.0; batch * h]; // [batch, hidden]
    relu_forward(&mut z2, &a2);
    let mut a3 = vec![0.0; batch * c]; // [batch, classes]
    linear_forward(&mut a3, &z2, &p.w2, Some(&p.b2), h, c);
    let mut probs = vec![0.0; batch * c]; // [batch, classes]
    let data_loss = softmax_cross_entropy_forward(&mut probs, &a3, y, c);
    let sum_sq = |w: &[f64]| w.iter().map(|v| v * v).sum::<f64>();
    let penalty = 0.5 * lambda * (sum_sq(&p.w1) + sum_sq(&p.w2));

    // Backward: the δ recurrences.
    let mut delta_output = vec![0.0; batch * c]; // [batch, classes]
    softmax_cross_entropy_backward(&mut delta_output, &probs, y, c);
    let mut grads = HeadGradients {
        w1: vec![0.0; h * d],
        b1: vec![0.0; h],
        w2: vec![0.0; c * h],
        b2: vec![0.0; c],
    };
    let mut dz2 = vec![0.0; batch * h]; // [batch, hidden], Σ_k W₂_{kj} δ^(3)_{nk}
    linear_backward(
        Some(&mut dz2),
        &mut grads.w2,
        Some(&mut grads.b2),
        &delta_output,
        &z2,
        &p.w2,
        h,
        c,
    );
    let mut delta_hidden = vec![0.0; batch * h]; // [batch, hidden]
    relu_backward(&mut delta_hidden, &a2, &dz2);
    // The input layer needs no δ: the features are fixed.
    linear_backward(
        None,
        &mut grads.w1,
        Some(&mut grads.b1),
        &delta_hidden,
        x,
        &p.w1,
        d,
        h,
    );

    // ∂/∂W of λ/2 ‖W‖² is λW; biases are not penalised.
    for (g, w) in grads
        .w1
        .iter_mut()
        .zip(&p.w1)
        .chain(grads.w2.iter_mut().zip(&p.w2))
    {
        *g += lambda * w;
    }
    Ok(HeadBackprop {
        data_loss,
        penalty,
        delta_hidden,
        delta_output,
        grads,
    })
}

// Layer primitives, forward/backward pairs over a batch (llm.c style), row-major; the
// linear pair is a copy of `backprop`'s, kept apart so that the reference stands alone.

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

/// z = max(a, 0), elementwise.
fn relu_forward(z: &mut [f64], a: &[f64]) {
    for (z_i, &a_i) in z.iter_mut().zip(a) {
        *z_i = a_i.max(0.0);
    }
}

/// δ = h'(a) · dz with h'(a) = 1 for a > 0 and 0 otherwise (PyTorch's choice at a = 0; candle
/// takes 1 there, which only matters for activations that are exactly zero).
fn relu_backward(da: &mut [f64], a: &[f64], dz: &[f64]) {
    for ((da_i, &a_i), &dz_i) in da.iter_mut().zip(a).zip(dz) {
        *da_i = if a_i > 0.0 { dz_i } else { 0.0 };
    }
}

/// Softmax cross-entropy averaged over the batch: probabilities p (written to `probs`) and
/// E = (1/B) Σ_n −ln `p[n, t_n]`, through log-sum-exp so large logits do not overflow.
fn softmax_cross_entropy_forward(
    probs: &mut [f64], // [batch, classes]
    logits: &[f64],    // [batch, classes]
    labels: &[usize],  // [batch]
    classes: usize,
) -> f64 {
    let batch = labels.len();
    let mut total = 0.0;
    for ((p_row, a_row), &label) in probs
        .chunks_exact_mut(classes)
        .zip(logits.chunks_exact(classes))
        .zip(labels)
    {
        let max = a_row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = a_row.iter().map(|a| (a - max).exp()).sum();
        let log_sum = max + sum.ln();
        for (p, a) in p_row.iter_mut().zip(a_row) {
            *p = (a - log_sum).exp();
        }
        total += log_sum - a_row[label];
    }
    total / batch as f64
}

/// `δ[n, k] = ∂E/∂a[n, k] = (p[n, k] − 1[k = t_n]) / B`.
fn softmax_cross_entropy_backward(
    delta: &mut [f64], // [batch, classes]
    probs: &[f64],     // [batch, classes]
    labels: &[usize],  // [batch]
    classes: usize,
) {
    let scale = 1.0 / labels.len() as f64;
    for ((d_row, p_row), &label) in delta
        .chunks_exact_mut(classes)
        .zip(probs.chunks_exact(classes))
        .zip(labels)
    {
        for (k, (d, p)) in d_row.iter_mut().zip(p_row).enumerate() {
            let onehot = if k == label { 1.0 } else { 0.0 };
            *d = (p - onehot) * scale;
        }
    }
}
