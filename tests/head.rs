//! The head's maths: gradients against finite differences and PyTorch, the SGD update
//! against a hand computation, and a few hundred training steps against PyTorch's losses
//! (fixture from `tools/gen_head_fixtures.py`).

use cifar_finetune::Error;
use cifar_finetune::head::{Activation, Head, HeadDims, HeadGrads, Sgd, Stepper};
use serde::Deserialize;

// ---------- inputs regenerated from an integer hash, as tools/gen_head_fixtures.py does ----------

fn h32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

fn uniform(tag: u32, i: usize) -> f64 {
    let h = h32(h32(tag) ^ i as u32);
    ((h >> 8) as f64 / (1u32 << 24) as f64) * 2.0 - 1.0
}

fn label(n: usize, classes: usize) -> u8 {
    (h32(h32(6) ^ n as u32) % classes as u32) as u8
}

fn features(n: usize, dim: usize, classes: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(n * dim);
    for r in 0..n {
        let y = label(r, classes) as usize;
        for i in 0..dim {
            let bump = if i % classes == y { 0.3 } else { 0.0 };
            x.push((0.5 * uniform(1, r * dim + i) + bump) as f32);
        }
    }
    x
}

fn hashed_head(dims: HeadDims) -> Head {
    let s1 = 1.0 / (dims.input as f64).sqrt();
    let s2 = 1.0 / (dims.hidden as f64).sqrt();
    let make = |tag, n, s: f64| {
        (0..n)
            .map(|k| (uniform(tag, k) * s) as f32)
            .collect::<Vec<_>>()
    };
    Head::from_parts(
        dims,
        make(2, dims.hidden * dims.input, s1),
        make(3, dims.hidden, s1),
        make(4, dims.classes * dims.hidden, s2),
        make(5, dims.classes, s2),
    )
    .unwrap()
}

// ---------- an f64 reference of the objective ----------

fn objective_f64(head: &Head, x: &[f32], y: &[u8], lambda: f64) -> f64 {
    let HeadDims {
        input: d,
        hidden: h,
        classes: c,
    } = head.dims;
    let b = y.len();
    let mut total = 0.0;
    for s in 0..b {
        let a: Vec<f64> = (0..h)
            .map(|j| {
                let z: f64 = (0..d)
                    .map(|i| head.w1[j * d + i] as f64 * x[s * d + i] as f64)
                    .sum::<f64>()
                    + head.b1[j] as f64;
                z.max(0.0)
            })
            .collect();
        let z2: Vec<f64> = (0..c)
            .map(|k| {
                (0..h)
                    .map(|j| head.w2[k * h + j] as f64 * a[j])
                    .sum::<f64>()
                    + head.b2[k] as f64
            })
            .collect();
        let m = z2.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z2.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - z2[y[s] as usize];
    }
    let sq = |w: &[f32]| w.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    total / b as f64 + lambda / 2.0 * (sq(&head.w1) + sq(&head.w2))
}

/// Central difference of the f64 objective in parameter `which`[`k`], perturbing the f32
/// parameter by ±eps (eps chosen so that it is exact in f32 around the value).
fn central_difference(
    head: &Head,
    x: &[f32],
    y: &[u8],
    lambda: f64,
    which: usize,
    k: usize,
) -> f64 {
    let eps = 1e-3f32;
    let mut plus = head.clone();
    let mut minus = head.clone();
    let (p, m) = match which {
        0 => (&mut plus.w1[k], &mut minus.w1[k]),
        1 => (&mut plus.b1[k], &mut minus.b1[k]),
        2 => (&mut plus.w2[k], &mut minus.w2[k]),
        _ => (&mut plus.b2[k], &mut minus.b2[k]),
    };
    *p += eps;
    *m -= eps;
    let step = (*p as f64) - (*m as f64);
    (objective_f64(&plus, x, y, lambda) - objective_f64(&minus, x, y, lambda)) / step
}

fn grad_slices(g: &HeadGrads) -> [&[f32]; 4] {
    [&g.w1, &g.b1, &g.w2, &g.b2]
}

fn check_finite_differences(dims: HeadDims, b: usize, lambda: f32, w1_stride: usize) {
    let head = Head::init(dims.input, dims.hidden, dims.classes, 11).unwrap();
    // Features with a spread comparable to ResNet features; labels cover several classes.
    let x: Vec<f32> = (0..b * dims.input)
        .map(|i| (uniform(9, i) * 2.0) as f32)
        .collect();
    let y: Vec<u8> = (0..b).map(|s| (s * 3 % dims.classes) as u8).collect();
    let (loss, penalty, grads) = head.loss_and_grad(&x, &y, lambda).unwrap();
    let reference = objective_f64(&head, &x, &y, lambda as f64);
    assert!(
        ((loss + penalty) as f64 - reference).abs() < 1e-5 * reference.abs().max(1.0),
        "objective {loss} + {penalty} vs f64 {reference}"
    );
    for (which, g) in grad_slices(&grads).into_iter().enumerate() {
        let stride = if which == 0 { w1_stride } else { 1 };
        for k in (0..g.len()).step_by(stride) {
            let fd = central_difference(&head, &x, &y, lambda as f64, which, k);
            let err = (g[k] as f64 - fd).abs() / (fd.abs() + 1e-3);
            assert!(
                err < 2e-3,
                "parameter {which}[{k}]: analytic {} vs central difference {fd}",
                g[k]
            );
        }
    }
}

#[test]
fn gradients_equal_central_differences_small_odd_dims() {
    // D = 13 exercises the vector kernels' scalar tails; batch 3 a partial chunk.
    check_finite_differences(
        HeadDims {
            input: 13,
            hidden: 5,
            classes: 4,
        },
        3,
        0.3,
        1,
    );
}

#[test]
fn gradients_equal_central_differences_full_width() {
    check_finite_differences(
        HeadDims {
            input: 2048,
            hidden: 32,
            classes: 10,
        },
        4,
        0.01,
        331,
    );
}

#[test]
fn gradients_equal_central_differences_large_batch() {
    check_finite_differences(
        HeadDims {
            input: 40,
            hidden: 6,
            classes: 10,
        },
        9,
        0.0,
        1,
    );
}

// ---------- SGD with momentum ----------

#[test]
fn sgd_momentum_steps_equal_hand_computation() {
    // Values chosen so every intermediate is exact in binary floating point.
    let dims = HeadDims {
        input: 2,
        hidden: 1,
        classes: 1,
    };
    let mut head =
        Head::from_parts(dims, vec![1.0, -2.0], vec![0.5], vec![4.0], vec![0.0]).unwrap();
    let mut sgd = Sgd::new(dims, 0.5, 0.5).unwrap();
    let g1 = HeadGrads {
        w1: vec![0.25, 1.0],
        b1: vec![-1.0],
        w2: vec![2.0],
        b2: vec![0.0],
    };
    sgd.step(&mut head, &g1).unwrap();
    // First step: v = g; p = p − lr·g.
    assert_eq!(sgd.velocity.w1, vec![0.25, 1.0]);
    assert_eq!(head.w1, vec![0.875, -2.5]);
    assert_eq!(head.b1, vec![1.0]);
    assert_eq!(head.w2, vec![3.0]);
    let g2 = HeadGrads {
        w1: vec![1.0, -1.0],
        b1: vec![0.5],
        w2: vec![0.0],
        b2: vec![1.0],
    };
    sgd.step(&mut head, &g2).unwrap();
    // v = 0.5·v + g: [1.125, -0.5]; p = p − 0.5·v: [0.3125, -2.25].
    assert_eq!(sgd.velocity.w1, vec![1.125, -0.5]);
    assert_eq!(head.w1, vec![0.3125, -2.25]);
    // b1: v = 0.5·(−1) + 0.5 = 0, p unchanged at 1.0.
    assert_eq!(head.b1, vec![1.0]);
    // w2: v = 0.5·2 + 0 = 1, p = 3 − 0.5 = 2.5.
    assert_eq!(head.w2, vec![2.5]);
    assert_eq!(head.b2, vec![-0.5]);
}

#[test]
fn sgd_with_script_defaults_matches_the_formula() {
    let dims = HeadDims {
        input: 19,
        hidden: 3,
        classes: 2,
    };
    let mut head = Head::init(19, 3, 2, 5).unwrap();
    let start = head.clone();
    let mut sgd = Sgd::new(dims, 0.001, 0.9).unwrap();
    let mut v = vec![0.0f64; start.w1.len()];
    let mut p: Vec<f64> = start.w1.iter().map(|&w| w as f64).collect();
    for t in 0..3 {
        let g = HeadGrads {
            w1: (0..start.w1.len())
                .map(|k| uniform(20 + t, k) as f32)
                .collect(),
            ..HeadGrads::zeros(dims)
        };
        sgd.step(&mut head, &g).unwrap();
        for k in 0..p.len() {
            v[k] = 0.9 * v[k] + g.w1[k] as f64;
            p[k] -= 0.001 * v[k];
        }
    }
    for (a, b) in head.w1.iter().zip(&p) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }
}

// ---------- PyTorch fixtures ----------

#[derive(Deserialize)]
struct Trajectory {
    /// `relu` (our default head) or `none` (the course script's linear head).
    #[serde(default)]
    activation: Activation,
    dims: HeadDims,
    n: usize,
    lr: f32,
    momentum: f32,
    lambda: f32,
    check: Check,
    order: Vec<Vec<usize>>,
    losses: Vec<f32>,
    penalties: Vec<f32>,
    #[serde(rename = "final")]
    final_: Final,
    grad_batch: GradBatch,
}

#[derive(Deserialize)]
struct Check {
    x_sum: f64,
    x_first: Vec<f32>,
    labels: Vec<u8>,
    w1_init_sum: f64,
}

#[derive(Deserialize)]
struct Final {
    w1_sum: f64,
    w1_abs_sum: f64,
    w1_first: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

#[derive(Deserialize)]
struct GradBatch {
    rows: Vec<usize>,
    lambda: f32,
    loss: f32,
    penalty: f32,
    w1_row_sums: Vec<f64>,
    w1_first: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

fn trajectory() -> Trajectory {
    trajectory_file("sgd_trajectory.json")
}

fn trajectory_file(name: &str) -> Trajectory {
    let text = std::fs::read_to_string(format!("tests/fixtures/head/{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{k}]: ours {g}, PyTorch {w}"
        );
    }
}

/// The fixture's inputs, regenerated; checked against the sums PyTorch saw.
fn fixture_inputs(t: &Trajectory) -> (Vec<f32>, Vec<u8>, Head) {
    let x = features(t.n, t.dims.input, t.dims.classes);
    let y: Vec<u8> = (0..t.n).map(|r| label(r, t.dims.classes)).collect();
    let head = hashed_head(t.dims).with_activation(t.activation);
    assert_eq!(y, t.check.labels, "labels regenerated differently");
    assert_eq!(
        &x[..8],
        &t.check.x_first[..],
        "features regenerated differently"
    );
    let x_sum: f64 = x.iter().map(|&v| v as f64).sum();
    assert!((x_sum - t.check.x_sum).abs() < 1e-6 * t.check.x_sum.abs());
    let w_sum: f64 = head.w1.iter().map(|&v| v as f64).sum();
    assert!((w_sum - t.check.w1_init_sum).abs() < 1e-9);
    (x, y, head)
}

#[test]
fn gradients_equal_pytorch_on_an_odd_batch() {
    check_odd_batch_gradients(&trajectory());
}

#[test]
fn linear_head_gradients_equal_pytorch_on_an_odd_batch() {
    let t = trajectory_file("sgd_trajectory_linear.json");
    assert_eq!(t.activation, Activation::None);
    check_odd_batch_gradients(&t);
}

fn check_odd_batch_gradients(t: &Trajectory) {
    let (x, y, head) = fixture_inputs(t);
    let g = &t.grad_batch;
    let d = t.dims.input;
    let xb: Vec<f32> = g
        .rows
        .iter()
        .flat_map(|&r| x[r * d..(r + 1) * d].to_vec())
        .collect();
    let yb: Vec<u8> = g.rows.iter().map(|&r| y[r]).collect();
    let (loss, penalty, grads) = head.loss_and_grad(&xb, &yb, g.lambda).unwrap();
    assert!((loss - g.loss).abs() < 1e-5, "loss {loss} vs {}", g.loss);
    assert!(
        (penalty - g.penalty).abs() < 1e-5,
        "penalty {penalty} vs {}",
        g.penalty
    );
    assert_close("gb1", &grads.b1, &g.b1, 1e-5);
    assert_close("gw2", &grads.w2, &g.w2, 1e-5);
    assert_close("gb2", &grads.b2, &g.b2, 1e-5);
    assert_close("gw1[..16]", &grads.w1[..16], &g.w1_first, 1e-5);
    for (j, want) in g.w1_row_sums.iter().enumerate() {
        let got: f64 = grads.w1[j * d..(j + 1) * d].iter().map(|&v| v as f64).sum();
        assert!((got - want).abs() < 1e-4, "gw1 row {j} sum {got} vs {want}");
    }
}

#[test]
fn few_hundred_sgd_steps_equal_pytorch_losses() {
    check_sgd_trajectory(&trajectory());
}

/// The course script's head: Linear → Linear, no activation, dropout off, λ = 0.
#[test]
fn linear_head_sgd_steps_equal_pytorch_losses() {
    let t = trajectory_file("sgd_trajectory_linear.json");
    assert_eq!((t.activation, t.lambda), (Activation::None, 0.0));
    check_sgd_trajectory(&t);
}

fn check_sgd_trajectory(t: &Trajectory) {
    assert!(t.losses.len() >= 300);
    let (x, y, mut head) = fixture_inputs(t);
    let d = t.dims.input;
    let mut sgd = Sgd::new(t.dims, t.lr, t.momentum).unwrap();
    let mut stepper = Stepper::new(t.dims, 4);
    for (step, batch) in t.order.iter().enumerate() {
        let xs: Vec<&[f32]> = batch.iter().map(|&r| &x[r * d..(r + 1) * d]).collect();
        let yb: Vec<u8> = batch.iter().map(|&r| y[r]).collect();
        let (loss, penalty) = stepper
            .step(&mut head, &mut sgd, &xs, &yb, t.lambda, None)
            .unwrap();
        assert!(
            (loss - t.losses[step]).abs() < 1e-5,
            "step {step}: loss {loss}, PyTorch {}",
            t.losses[step]
        );
        assert!(
            (penalty - t.penalties[step]).abs() < 1e-5,
            "step {step}: penalty {penalty}, PyTorch {}",
            t.penalties[step]
        );
    }
    let f = &t.final_;
    assert_close("b1", &head.b1, &f.b1, 1e-5);
    assert_close("w2", &head.w2, &f.w2, 1e-5);
    assert_close("b2", &head.b2, &f.b2, 1e-5);
    assert_close("w1[..16]", &head.w1[..16], &f.w1_first, 1e-5);
    let sum: f64 = head.w1.iter().map(|&v| v as f64).sum();
    let abs: f64 = head.w1.iter().map(|&v| (v as f64).abs()).sum();
    assert!(
        (sum - f.w1_sum).abs() < 1e-3,
        "w1 sum {sum} vs {}",
        f.w1_sum
    );
    assert!(
        (abs - f.w1_abs_sum).abs() < 1e-3,
        "w1 |sum| {abs} vs {}",
        f.w1_abs_sum
    );
}

// ---------- initialisation and bad input ----------

#[test]
fn init_is_seeded_and_within_pytorch_bounds() {
    let a = Head::init(2048, 32, 10, 1).unwrap();
    assert_eq!(a, Head::init(2048, 32, 10, 1).unwrap());
    assert_ne!(a.w1, Head::init(2048, 32, 10, 2).unwrap().w1);
    let b1 = 1.0 / 2048f32.sqrt();
    let b2 = 1.0 / 32f32.sqrt();
    assert!(a.w1.iter().chain(&a.b1).all(|v| v.abs() <= b1));
    assert!(a.w2.iter().chain(&a.b2).all(|v| v.abs() <= b2));
    // Uniform on ±bound: mean ≈ 0, mean |w| ≈ bound/2, extremes near the bounds.
    let n = a.w1.len() as f32;
    let mean = a.w1.iter().sum::<f32>() / n;
    let mean_abs = a.w1.iter().map(|v| v.abs()).sum::<f32>() / n;
    assert!(mean.abs() < 0.01 * b1);
    assert!((mean_abs / b1 - 0.5).abs() < 0.01);
    assert!(a.w1.iter().cloned().fold(0.0, f32::max) > 0.999 * b1);
}

#[test]
fn bad_input_is_named() {
    let head = Head::init(8, 4, 3, 0).unwrap();
    let x = vec![0.5f32; 16];
    let err = head.loss_and_grad(&x, &[0, 1], -1.0).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { what, .. } if what == "lambda"),
        "{err}"
    );
    let err = head.loss_and_grad(&x, &[0, 3], 0.0).unwrap_err();
    assert!(err.to_string().contains("label 3"), "{err}");
    let err = head.loss_and_grad(&x[..15], &[0, 1], 0.0).unwrap_err();
    assert!(err.to_string().contains("width 8"), "{err}");
    let err = head.loss_and_grad(&x, &[0], 0.0).unwrap_err();
    assert!(err.to_string().contains("1 labels for 2"), "{err}");
    let dims = head.dims;
    assert!(matches!(Sgd::new(dims, 0.0, 0.9), Err(Error::Invalid { what, .. }) if what == "lr"));
    assert!(
        matches!(Sgd::new(dims, 0.1, 1.0), Err(Error::Invalid { what, .. }) if what == "momentum")
    );
    assert!(Head::init(8, 0, 3, 0).is_err());
    let err = Head::from_parts(
        dims,
        vec![0.0; 31],
        vec![0.0; 4],
        vec![0.0; 12],
        vec![0.0; 3],
    )
    .unwrap_err();
    assert!(err.to_string().contains("w1"), "{err}");
}

#[test]
fn probabilities_sum_to_one_and_predict_agrees_with_logits() {
    let head = Head::init(24, 8, 10, 3).unwrap();
    let x: Vec<f32> = (0..7 * 24).map(|i| uniform(30, i) as f32).collect();
    let y: Vec<u8> = (0..7).map(|i| (i % 10) as u8).collect();
    let z = head.logits(&x).unwrap();
    let p = head.probabilities(&x).unwrap();
    let pred = head.predict(&x, &y).unwrap();
    assert_eq!(pred.probabilities, p);
    for s in 0..7 {
        let row = &p[s * 10..(s + 1) * 10];
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let zrow = &z[s * 10..(s + 1) * 10];
        let best = (0..10).fold(0, |b, k| if zrow[k] > zrow[b] { k } else { b });
        assert_eq!(pred.predicted[s] as usize, best);
        assert!((pred.losses[s] + row[y[s] as usize].ln()).abs() < 1e-5);
    }
    // The batched loss of loss_and_grad is the mean of the per-sample losses.
    let (loss, _, _) = head.loss_and_grad(&x, &y, 0.0).unwrap();
    let mean = pred.losses.iter().sum::<f32>() / 7.0;
    assert!((loss - mean).abs() < 1e-6);
    let score = head.score(&x, &y).unwrap();
    assert_eq!(score.count, 7);
    assert!((score.loss - mean as f64).abs() < 1e-6);
}
