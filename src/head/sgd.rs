//! SGD with momentum for the head, PyTorch's semantics, and the [`Stepper`] that runs one
//! fused training step (forward, backward, update) on the kernels of `super::lanes`.

use super::lanes::Kernels;
use super::{Head, HeadDims, HeadGrads, Workspace, check_lambda, check_len};
use crate::error::{Error, Result};
use crate::isa::Isa;
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
        dims.validate()?;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::invalid("lr", format!("{lr} is not a number > 0")));
        }
        if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
            return Err(Error::invalid(
                "momentum",
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
    /// The kernels' instruction set (the head's unit tests set it to compare them).
    pub(super) isa: Isa,
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
