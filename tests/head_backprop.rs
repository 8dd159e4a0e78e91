//! The two halves of the assignment check each other: the δ-rule of `head_backprop` (tests/common/reference_head.rs)
//! (f64, written from the δ equations) against the training gradients of `head::Head`
//! (f32, fused and vectorised for speed), on the same parameters and batches.

#[path = "common/reference_head.rs"]
mod reference_head;

use cifar_finetune::head::Head;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reference_head::{HeadParams, head_backprop};

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// f32 agreement: every entry within 1e-4 relative, or within 1e-5 of the tensor's largest
/// entry for entries that cancel to near zero (a 2048-term f32 sum carries ~1e-6 relative
/// rounding of its terms' magnitude, and the sign of a near-zero entry is all it keeps).
fn assert_f32_close(what: &str, train: &[f32], delta_rule: &[f64]) {
    assert_eq!(train.len(), delta_rule.len(), "{what}: lengths");
    let scale = delta_rule.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: all zero");
    let mut worst = 0.0f64;
    for (i, (&t, &d)) in train.iter().zip(delta_rule).enumerate() {
        let err = (f64::from(t) - d).abs();
        let allowed = 1e-4 * d.abs() + 1e-5 * scale;
        assert!(
            err <= allowed,
            "{what}[{i}]: head {t:e} vs δ-rule {d:e} (max |{what}| {scale:e})"
        );
        worst = worst.max(err / scale);
    }
    assert!(worst < 1e-5, "{what}: normwise error {worst:e}");
}

#[test]
fn delta_rule_equals_the_heads_training_gradients() {
    let (input, hidden, classes) = (2048, 32, 10);
    for (seed, batch, lambda) in [
        (1u64, 4usize, 0.01f32),
        (2, 7, 0.3),
        (3, 1, 0.001),
        (4, 16, 0.05),
    ] {
        let head = Head::init(input, hidden, classes, seed).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1000);
        // Non-negative and sparse-ish, like average-pooled post-ReLU ResNet features.
        let x: Vec<f32> = (0..batch * input)
            .map(|_| {
                let v: f32 = rng.random_range(-1.0..2.0);
                v.max(0.0)
            })
            .collect();
        let y: Vec<u8> = (0..batch)
            .map(|_| rng.random_range(0..classes as u8))
            .collect();

        let (data_loss, penalty, grads) = head.loss_and_grad(&x, &y, lambda).unwrap();

        let params = HeadParams {
            input,
            hidden,
            classes,
            w1: widen(&head.w1),
            b1: widen(&head.b1),
            w2: widen(&head.w2),
            b2: widen(&head.b2),
        };
        let labels: Vec<usize> = y.iter().map(|&l| usize::from(l)).collect();
        let ours = head_backprop(&params, &widen(&x), &labels, f64::from(lambda)).unwrap();

        let what = format!("seed {seed}, batch {batch}, λ {lambda}");
        let rel = |a: f32, b: f64| (f64::from(a) - b).abs() / b.abs();
        assert!(
            rel(data_loss, ours.data_loss) < 1e-5,
            "{what}: data loss {data_loss} vs {}",
            ours.data_loss
        );
        assert!(
            rel(penalty, ours.penalty) < 1e-5,
            "{what}: penalty {penalty} vs {}",
            ours.penalty
        );
        assert_f32_close(&format!("{what}: ∂E/∂W1"), &grads.w1, &ours.grads.w1);
        assert_f32_close(&format!("{what}: ∂E/∂b1"), &grads.b1, &ours.grads.b1);
        assert_f32_close(&format!("{what}: ∂E/∂W2"), &grads.w2, &ours.grads.w2);
        assert_f32_close(&format!("{what}: ∂E/∂b2"), &grads.b2, &ours.grads.b2);
    }
}

#[test]
fn the_comparison_sees_a_missing_penalty_gradient() {
    // With λ large enough to matter, leaving λW out of one side must fail the tolerance.
    let head = Head::init(2048, 32, 10, 9).unwrap();
    let x = vec![0.5f32; 2 * 2048];
    let y = [3u8, 7];
    let lambda = 0.3;
    let (_, _, grads) = head.loss_and_grad(&x, &y, lambda).unwrap();
    let params = HeadParams {
        input: 2048,
        hidden: 32,
        classes: 10,
        w1: widen(&head.w1),
        b1: widen(&head.b1),
        w2: widen(&head.w2),
        b2: widen(&head.b2),
    };
    let without = head_backprop(&params, &widen(&x), &[3, 7], 0.0).unwrap();
    let result = std::panic::catch_unwind(|| assert_f32_close("W2", &grads.w2, &without.grads.w2));
    assert!(result.is_err());
}
