//! The sweep's randomness: one seed, ChaCha8 streams per purpose and epoch (the shuffle, the
//! dropout masks), so that every λ sees the same data order and resumption is exact.

use super::*;

/// Describes the random streams (stored in `last` checkpoints).
pub(super) const RNG_SCHEME: &str = "ChaCha8 seed_from_u64(seed); init stream 0, shuffle stream 2^32+epoch, \
                          dropout stream 2*2^32+epoch";
const STREAM_SHUFFLE: u64 = 1;
const STREAM_DROPOUT: u64 = 2;

pub(super) fn stream(seed: u64, purpose: u64, epoch: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((purpose << 32) | epoch as u64);
    rng
}

/// The dropout masks of one epoch, as `nn.Dropout(p)` in training mode: each hidden unit of
/// each sample is zeroed with probability `p` and otherwise scaled by 1/(1−p) ("inverted"
/// dropout, so the expected activation is unchanged and evaluation uses the head as it is,
/// with no mask and no rescaling). The draws come from the epoch's dropout stream of `seed`,
/// one uniform per unit in the order the units are used.
#[derive(Debug, Clone)]
pub struct Dropout {
    rng: ChaCha8Rng,
    p: f32,
    keep_scale: f32,
}

impl Dropout {
    /// The masks of epoch `epoch` (1-based) of a run seeded with `seed`, for probability `p`
    /// (in [0, 1), checked by [`TrainConfig::validate`]).
    pub fn new(seed: u64, epoch: usize, p: f32) -> Dropout {
        Dropout {
            rng: stream(seed, STREAM_DROPOUT, epoch),
            p,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    /// Fills `mask` (`[b, H]`) with the next units' factors: 0 (dropped) or 1/(1−p) (kept).
    pub fn fill(&mut self, mask: &mut [f32]) {
        for v in mask.iter_mut() {
            *v = if unit(&mut self.rng) < self.p {
                0.0
            } else {
                self.keep_scale
            };
        }
    }
}

/// A uniform f32 in [0, 1) from the top 24 bits of a word.
fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Resets `order` to 0..n and applies the Fisher–Yates shuffle of epoch `epoch`.
pub(super) fn shuffle(order: &mut [usize], seed: u64, epoch: usize) {
    for (i, v) in order.iter_mut().enumerate() {
        *v = i;
    }
    let mut rng = stream(seed, STREAM_SHUFFLE, epoch);
    for i in (1..order.len()).rev() {
        // Lemire's multiply-shift: uniform in 0..=i up to a bias below 2⁻³².
        let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
}
