//! Checks of the δ-rule module (`cifar_finetune::backprop`) against finite differences, a
//! hand computation, candle's autograd, and through the `cifar-finetune backprop` command.

#[path = "common/reference_head.rs"]
mod reference_head;

use std::path::Path;
use std::process::Command;

use candle_core::{D, Device, Tensor, Var};
use cifar_finetune::backprop::{Network, Problem, central_difference, relative_error};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reference_head::{HeadParams, head_backprop};

const FIXTURE: &str = "tests/fixtures/backprop/params_3441.json";

/// Elementwise |got − want| ≤ rel · max(|got|, |want|).
fn assert_rel_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= rel * g.abs().max(w.abs()),
            "{what}[{i}]: {g:e} vs {w:e} (relative error {:e})",
            err / g.abs().max(w.abs())
        );
    }
}

/// Normwise: max |got − want| ≤ rel · max |want|. For the head, where single entries cancel
/// to near zero (e.g. data gradient against λW: 3.757e-6 from terms of order 1e-3) and so carry
/// relative differences of ~2e-12 from a different summation order alone.
fn assert_norm_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: all zero");
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        err <= rel * scale,
        "{what}: max error {err:e} for max |value| {scale:e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Finite differences on many random networks.
// ---------------------------------------------------------------------------------------------

/// Random sizes (2–5 layers of 1–6 units), weights in [−2, 2], biases (used or not), input
/// and target in [−2, 2].
#[allow(clippy::type_complexity)]
fn random_problem() -> impl Strategy<
    Value = (
        Vec<usize>,
        Vec<Vec<f64>>,
        Vec<Vec<f64>>,
        bool,
        Vec<f64>,
        Vec<f64>,
    ),
> {
    (prop::collection::vec(1usize..=6, 2..=5), any::<bool>()).prop_flat_map(
        |(sizes, use_biases)| {
            let weights: Vec<_> = sizes
                .windows(2)
                .map(|p| prop::collection::vec(-2.0f64..2.0, p[0] * p[1]))
                .collect();
            let biases: Vec<_> = sizes[1..]
                .iter()
                .map(|&n| prop::collection::vec(-2.0f64..2.0, n))
                .collect();
            let x = prop::collection::vec(-2.0f64..2.0, sizes[0]);
            let t = prop::collection::vec(-2.0f64..2.0, sizes[sizes.len() - 1]);
            (Just(sizes), weights, biases, Just(use_biases), x, t)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_derivative_matches_finite_differences(
        (sizes, weights, biases, use_biases, x, t) in random_problem()
    ) {
        let net = Network::new(sizes, weights, use_biases.then_some(biases)).unwrap();
        let check = net.gradient_check(&x, &t).unwrap();
        let count = check.entries().count();
        let expected = net.sizes()[1..].iter().sum::<usize>() // δs
            + net.weights().iter().map(Vec::len).sum::<usize>()
            + if use_biases { net.sizes()[1..].iter().sum::<usize>() } else { 0 };
        prop_assert_eq!(count, expected);
        let worst = check.max_rel_error();
        prop_assert!(worst < 1e-7, "max relative error {:e} on {}", worst, net.sizes_label());
    }
}

#[test]
fn the_check_catches_a_wrong_derivative() {
    // The comparison has teeth: a derivative that is off by 1e-5 relative is flagged.
    let problem = Problem::random(&[3, 4, 4, 1], true, 11).unwrap();
    let net = &problem.network;
    let fwd = net.forward(&problem.x, &problem.t).unwrap();
    let grads = net.backward(&fwd, &problem.t).unwrap();
    let w = &net.weights()[0];
    let numeric = central_difference(w[5], |v| {
        let mut weights = net.weights().to_vec();
        weights[0][5] = v;
        let probe = Network::new(
            net.sizes().to_vec(),
            weights,
            net.biases().map(<[Vec<f64>]>::to_vec),
        )
        .unwrap();
        probe.forward(&problem.x, &problem.t).unwrap().loss
    });
    let loss = fwd.loss;
    assert!(relative_error(grads.dw[0][5], numeric, loss) < 1e-8);
    assert!(relative_error(grads.dw[0][5] * (1.0 + 1e-5), numeric, loss) > 5e-6);
}

// ---------------------------------------------------------------------------------------------
// The 3-4-4-1 network on fixed values, against a hand computation.
// ---------------------------------------------------------------------------------------------

const W1: [[f64; 3]; 4] = [
    [0.2, -0.4, 0.7],
    [-0.3, 0.5, 0.1],
    [0.6, 0.2, -0.8],
    [-0.1, -0.9, 0.4],
];
const W2: [[f64; 4]; 4] = [
    [0.3, -0.2, 0.5, 0.1],
    [-0.6, 0.4, 0.2, -0.3],
    [0.15, 0.25, -0.35, 0.45],
    [0.8, -0.5, -0.1, 0.2],
];
const W3: [f64; 4] = [0.9, -1.1, 0.6, 0.4];
const X: [f64; 3] = [1.0, -0.5, 2.0];
const T: f64 = 0.25;

fn fixed_network() -> Network {
    Network::new(
        vec![3, 4, 4, 1],
        vec![W1.concat(), W2.concat(), W3.to_vec()],
        None,
    )
    .unwrap()
}

#[test]
fn fixed_3441_network_matches_the_hand_computation() {
    // The scalar formulas of the issue, written out unit by unit.
    let sigma = |a: f64| 1.0 / (1.0 + (-a).exp());
    let h_prime = |a: f64| (-a).exp() / ((1.0 + (-a).exp()) * (1.0 + (-a).exp()));
    let a2: Vec<f64> = (0..4)
        .map(|j| W1[j][0] * X[0] + W1[j][1] * X[1] + W1[j][2] * X[2])
        .collect();
    let z2: Vec<f64> = a2.iter().map(|&a| sigma(a)).collect();
    let a3: Vec<f64> = (0..4)
        .map(|k| W2[k][0] * z2[0] + W2[k][1] * z2[1] + W2[k][2] * z2[2] + W2[k][3] * z2[3])
        .collect();
    let z3: Vec<f64> = a3.iter().map(|&a| sigma(a)).collect();
    let y = W3[0] * z3[0] + W3[1] * z3[1] + W3[2] * z3[2] + W3[3] * z3[3];
    // δ^(4)_1 = y − t
    let d4 = y - T;
    // δ^(3)_k = h'(a^(3)_k) w^(3)_{1k} δ^(4)_1
    let d3: Vec<f64> = (0..4).map(|k| h_prime(a3[k]) * W3[k] * d4).collect();
    // δ^(2)_j = h'(a^(2)_j) Σ_k w^(2)_{kj} δ^(3)_k
    let d2: Vec<f64> = (0..4)
        .map(|j| {
            h_prime(a2[j])
                * (W2[0][j] * d3[0] + W2[1][j] * d3[1] + W2[2][j] * d3[2] + W2[3][j] * d3[3])
        })
        .collect();
    // ∂E/∂w^(3)_{1k} = δ^(4)_1 z^(3)_k, ∂E/∂w^(2)_{kj} = δ^(3)_k z^(2)_j,
    // ∂E/∂w^(1)_{ji} = δ^(2)_j x_i
    let dw3: Vec<f64> = (0..4).map(|k| d4 * z3[k]).collect();
    let dw2: Vec<f64> = (0..16).map(|p| d3[p / 4] * z2[p % 4]).collect();
    let dw1: Vec<f64> = (0..12).map(|p| d2[p / 3] * X[p % 3]).collect();

    // The same δs, computed by hand in Python's float arithmetic from the formulas above
    // (`python3 tools/backprop_hand_values.py` prints them) and written down, so the
    // formulas in this test are checked too.
    let hand_d4 = 0.5057433013175983;
    let hand_d3 = [
        0.10987165351209625,
        -0.12983804848700198,
        0.07154508002314793,
        0.046190955738672844,
    ];
    let hand_d2 = [
        0.019300047125614395,
        -0.019186092702902297,
        -0.00012959559946297387,
        0.016689479383220237,
    ];
    assert_rel_close("hand δ^(4)", &[d4], &[hand_d4], 1e-13);
    assert_rel_close("hand δ^(3)", &d3, &hand_d3, 1e-13);
    assert_rel_close("hand δ^(2)", &d2, &hand_d2, 1e-12);

    let net = fixed_network();
    let fwd = net.forward(&X, &[T]).unwrap();
    let grads = net.backward(&fwd, &[T]).unwrap();
    assert_rel_close("a^(2)", &fwd.a[1], &a2, 1e-14);
    assert_rel_close("z^(3)", &fwd.z[2], &z3, 1e-14);
    assert_rel_close("y", fwd.output(), &[y], 1e-14);
    assert_rel_close("E", &[fwd.loss], &[0.1278881434138115], 1e-13);
    assert!(grads.delta[0].is_empty());
    assert_rel_close("δ^(4)", &grads.delta[3], &[hand_d4], 1e-12);
    assert_rel_close("δ^(3)", &grads.delta[2], &hand_d3, 1e-12);
    assert_rel_close("δ^(2)", &grads.delta[1], &hand_d2, 1e-12);
    assert_rel_close("∂E/∂w^(3)", &grads.dw[2], &dw3, 1e-12);
    assert_rel_close("∂E/∂w^(2)", &grads.dw[1], &dw2, 1e-12);
    assert_rel_close("∂E/∂w^(1)", &grads.dw[0], &dw1, 1e-12);
    assert!(grads.db.is_none());

    let check = net.gradient_check(&X, &[T]).unwrap();
    assert!(check.max_rel_error() < 1e-9, "{}", check.max_rel_error());
}

#[test]
fn the_fixture_file_is_the_fixed_network() {
    let problem = Problem::from_json_file(Path::new(FIXTURE), Some(&[3, 4, 4, 1])).unwrap();
    assert_eq!(problem.network, fixed_network());
    assert_eq!(problem.x, X);
    assert_eq!(problem.t, [T]);
}

// ---------------------------------------------------------------------------------------------
// candle's autograd on the same networks.
// ---------------------------------------------------------------------------------------------

fn tensor_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// E and its derivatives by candle's autograd.
struct Autograd {
    loss: f64,
    /// ∂E/∂w^(l) per layer.
    dw: Vec<Vec<f64>>,
    /// ∂E/∂b^(l) per layer (empty without biases).
    db: Vec<Vec<f64>>,
    /// δ^(l) for l = 2 … L.
    deltas: Vec<Vec<f64>>,
}

fn candle_gradients(net: &Network, x: &[f64], t: &[f64]) -> Autograd {
    let dev = Device::Cpu;
    let sizes = net.sizes();
    let depth = sizes.len();
    let ws: Vec<Var> = net
        .weights()
        .iter()
        .enumerate()
        .map(|(l, w)| Var::from_slice(w, (sizes[l + 1], sizes[l]), &dev).unwrap())
        .collect();
    let bs: Option<Vec<Var>> = net.biases().map(|bs| {
        bs.iter()
            .map(|b| Var::from_slice(b, (1, b.len()), &dev).unwrap())
            .collect()
    });
    // candle keeps gradients only for variables, so each activation gets a zero-valued
    // variable added to it: ∂E/∂probe = ∂E/∂a = δ.
    let probes: Vec<Var> = sizes[1..]
        .iter()
        .map(|&n| Var::zeros((1, n), candle_core::DType::F64, &dev).unwrap())
        .collect();
    let mut z = Tensor::from_slice(x, (1, sizes[0]), &dev).unwrap(); // [1, n_1]
    for l in 0..depth - 1 {
        let mut a = z.matmul(&ws[l].t().unwrap()).unwrap(); // [1, n_{l+2}]
        if let Some(bs) = &bs {
            a = (a + bs[l].as_tensor()).unwrap();
        }
        let a = (a + probes[l].as_tensor()).unwrap();
        z = if l + 2 == depth {
            a.clone()
        } else {
            (a.neg().unwrap().exp().unwrap() + 1.0)
                .unwrap()
                .recip()
                .unwrap()
        };
    }
    let target = Tensor::from_slice(t, (1, t.len()), &dev).unwrap();
    let loss = ((z - target).unwrap().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
    let grads = loss.backward().unwrap();
    let dw = ws
        .iter()
        .map(|w| tensor_vec(grads.get(w.as_tensor()).unwrap()))
        .collect();
    let db = bs.map_or(Vec::new(), |bs| {
        bs.iter()
            .map(|b| tensor_vec(grads.get(b.as_tensor()).unwrap()))
            .collect()
    });
    let deltas = probes
        .iter()
        .map(|p| tensor_vec(grads.get(p.as_tensor()).unwrap()))
        .collect();
    Autograd {
        loss: loss.to_scalar::<f64>().unwrap(),
        dw,
        db,
        deltas,
    }
}

#[test]
fn the_delta_rule_equals_candle_autograd() {
    let cases: [(&[usize], bool, u64); 5] = [
        (&[3, 4, 4, 1], false, 1),
        (&[3, 4, 4, 1], true, 2),
        (&[5, 7, 3, 6, 2], true, 3),
        (&[2, 1], false, 4),
        (&[12, 11, 10], true, 5),
    ];
    for (sizes, biases, seed) in cases {
        let p = Problem::random(sizes, biases, seed).unwrap();
        let fwd = p.network.forward(&p.x, &p.t).unwrap();
        let grads = p.network.backward(&fwd, &p.t).unwrap();
        let Autograd {
            loss,
            dw,
            db,
            deltas,
        } = candle_gradients(&p.network, &p.x, &p.t);
        let label = p.network.sizes_label();
        assert_rel_close(&format!("{label} E"), &[fwd.loss], &[loss], 1e-12);
        for l in 0..sizes.len() - 1 {
            assert_rel_close(
                &format!("{label} ∂E/∂w^({})", l + 1),
                &grads.dw[l],
                &dw[l],
                1e-12,
            );
            assert_rel_close(
                &format!("{label} δ^({})", l + 2),
                &grads.delta[l + 1],
                &deltas[l],
                1e-12,
            );
            if biases {
                let ours = &grads.db.as_ref().unwrap()[l];
                assert_rel_close(&format!("{label} ∂E/∂b^({})", l + 1), ours, &db[l], 1e-12);
            }
        }
    }
}

fn random_head(input: usize, hidden: usize, classes: usize, seed: u64) -> HeadParams {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |n: usize, scale: f64| -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    };
    // PyTorch's nn.Linear range, 1/√fan_in.
    let s1 = 1.0 / (input as f64).sqrt();
    let s2 = 1.0 / (hidden as f64).sqrt();
    HeadParams {
        input,
        hidden,
        classes,
        w1: draw(hidden * input, s1),
        b1: draw(hidden, s1),
        w2: draw(classes * hidden, s2),
        b2: draw(classes, s2),
    }
}

fn random_batch(batch: usize, input: usize, classes: usize, seed: u64) -> (Vec<f64>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Non-negative like post-ReLU, average-pooled ResNet features.
    let x = (0..batch * input)
        .map(|_| rng.random_range(0.0..2.0))
        .collect();
    let y = (0..batch).map(|_| rng.random_range(0..classes)).collect();
    (x, y)
}

#[test]
fn the_head_delta_rule_equals_candle_autograd() {
    for (input, hidden, classes, batch, lambda, seed) in [
        (2048, 32, 10, 6, 0.01, 7u64),
        (5, 4, 3, 9, 0.5, 8),
        (7, 3, 2, 1, 0.0, 9),
    ] {
        let p = random_head(input, hidden, classes, seed);
        let (x, y) = random_batch(batch, input, classes, seed + 100);
        let ours = head_backprop(&p, &x, &y, lambda).unwrap();

        let dev = Device::Cpu;
        let w1 = Var::from_slice(&p.w1, (hidden, input), &dev).unwrap();
        let b1 = Var::from_slice(&p.b1, (1, hidden), &dev).unwrap();
        let w2 = Var::from_slice(&p.w2, (classes, hidden), &dev).unwrap();
        let b2 = Var::from_slice(&p.b2, (1, classes), &dev).unwrap();
        let xt = Tensor::from_slice(&x, (batch, input), &dev).unwrap(); // [batch, input]
        // Zero variables added to the activations expose δ = ∂E/∂a (candle keeps gradients
        // only for variables).
        let probe2 = Var::zeros((batch, hidden), candle_core::DType::F64, &dev).unwrap();
        let probe3 = Var::zeros((batch, classes), candle_core::DType::F64, &dev).unwrap();
        let a2 = (xt
            .matmul(&w1.t().unwrap())
            .unwrap()
            .broadcast_add(b1.as_tensor())
            .unwrap()
            + probe2.as_tensor())
        .unwrap(); // [batch, hidden]
        let z2 = a2.relu().unwrap();
        let a3 = (z2
            .matmul(&w2.t().unwrap())
            .unwrap()
            .broadcast_add(b2.as_tensor())
            .unwrap()
            + probe3.as_tensor())
        .unwrap(); // [batch, classes]
        let logp = candle_nn::ops::log_softmax(&a3, D::Minus1).unwrap();
        let onehot: Vec<f64> = y
            .iter()
            .flat_map(|&label| (0..classes).map(move |k| if k == label { 1.0 } else { 0.0 }))
            .collect();
        let onehot = Tensor::from_slice(&onehot, (batch, classes), &dev).unwrap();
        let data = ((logp * onehot).unwrap().sum_all().unwrap() * (-1.0 / batch as f64)).unwrap();
        let penalty = ((w1.sqr().unwrap().sum_all().unwrap()
            + w2.sqr().unwrap().sum_all().unwrap())
        .unwrap()
            * (0.5 * lambda))
            .unwrap();
        let total = (&data + &penalty).unwrap();
        let grads = total.backward().unwrap();
        let g = |t: &Tensor| tensor_vec(grads.get(t).unwrap());

        let what = format!("head {input}→{hidden}→{classes}, batch {batch}, λ {lambda}");
        assert_rel_close(
            &format!("{what} data loss"),
            &[ours.data_loss],
            &[data.to_scalar::<f64>().unwrap()],
            1e-12,
        );
        if lambda > 0.0 {
            assert_rel_close(
                &format!("{what} penalty"),
                &[ours.penalty],
                &[penalty.to_scalar::<f64>().unwrap()],
                1e-12,
            );
        }
        assert_norm_close(
            &format!("{what} ∂E/∂W1"),
            &ours.grads.w1,
            &g(w1.as_tensor()),
            1e-12,
        );
        assert_norm_close(
            &format!("{what} ∂E/∂b1"),
            &ours.grads.b1,
            &g(b1.as_tensor()),
            1e-12,
        );
        assert_norm_close(
            &format!("{what} ∂E/∂W2"),
            &ours.grads.w2,
            &g(w2.as_tensor()),
            1e-12,
        );
        assert_norm_close(
            &format!("{what} ∂E/∂b2"),
            &ours.grads.b2,
            &g(b2.as_tensor()),
            1e-12,
        );
        assert_norm_close(
            &format!("{what} δ^(3)"),
            &ours.delta_output,
            &g(probe3.as_tensor()),
            1e-12,
        );
        assert_norm_close(
            &format!("{what} δ^(2)"),
            &ours.delta_hidden,
            &g(probe2.as_tensor()),
            1e-12,
        );
    }
}

#[test]
fn the_head_delta_rule_matches_finite_differences() {
    let (input, hidden, classes, batch, lambda) = (6, 5, 4, 7, 0.3);
    let p = random_head(input, hidden, classes, 21);
    let (x, y) = random_batch(batch, input, classes, 22);
    let ours = head_backprop(&p, &x, &y, lambda).unwrap();
    let total = |q: &HeadParams| {
        let r = head_backprop(q, &x, &y, lambda).unwrap();
        r.data_loss + r.penalty
    };
    type Field = fn(&mut HeadParams) -> &mut Vec<f64>;
    let fields: [(&str, Field, &Vec<f64>); 4] = [
        ("w1", |q| &mut q.w1, &ours.grads.w1),
        ("b1", |q| &mut q.b1, &ours.grads.b1),
        ("w2", |q| &mut q.w2, &ours.grads.w2),
        ("b2", |q| &mut q.b2, &ours.grads.b2),
    ];
    for (name, field, grad) in fields {
        let mut q = p.clone();
        for (i, &analytic) in grad.iter().enumerate() {
            let theta = field(&mut q)[i];
            let numeric = central_difference(theta, |v| {
                field(&mut q)[i] = v;
                let e = total(&q);
                field(&mut q)[i] = theta;
                e
            });
            let err = relative_error(analytic, numeric, ours.data_loss + ours.penalty);
            assert!(err < 1e-7, "{name}[{i}]: {analytic} vs {numeric} ({err:e})");
        }
    }
}

#[test]
fn head_backprop_rejects_bad_shapes() {
    let p = random_head(4, 3, 2, 1);
    let err = head_backprop(&p, &[0.0; 7], &[0, 1], 0.1).unwrap_err();
    assert!(err.to_string().contains("features"), "{err}");
    let err = head_backprop(&p, &[0.0; 8], &[0, 2], 0.1).unwrap_err();
    assert!(err.to_string().contains("labels"), "{err}");
    let err = head_backprop(&p, &[0.0; 8], &[0, 1], f64::NAN).unwrap_err();
    assert!(err.to_string().contains("lambda"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Parameter files.
// ---------------------------------------------------------------------------------------------

fn parse_err(text: &str, sizes: Option<&[usize]>) -> String {
    Problem::from_json_str(text, Path::new("params.json"), sizes)
        .unwrap_err()
        .to_string()
}

#[test]
fn params_round_trip_through_json() {
    for (sizes, biases, seed) in [
        (&[3usize, 4, 4, 1][..], false, 1),
        (&[2, 5, 3][..], true, 2),
    ] {
        let p = Problem::random(sizes, biases, seed).unwrap();
        let text = serde_json::to_string(&p.to_json()).unwrap();
        let back = Problem::from_json_str(&text, Path::new("p.json"), None).unwrap();
        assert_eq!(back, p);
    }
}

#[test]
fn malformed_params_name_the_field() {
    let good_w = "[[[1,2,3],[4,5,6],[7,8,9],[1,2,3]], [[1,2,3,4],[1,2,3,4],[1,2,3,4],[1,2,3,4]], [[1,2,3,4]]]";
    let ok = format!(r#"{{"weights": {good_w}, "x": [1,2,3], "t": [0.5]}}"#);
    assert!(Problem::from_json_str(&ok, Path::new("params.json"), Some(&[3, 4, 4, 1])).is_ok());

    let three_rows =
        "[[[1,2,3],[4,5,6],[7,8,9],[1,2,3]], [[1,2,3,4],[1,2,3,4],[1,2,3,4]], [[1,2,3,4]]]";
    let cases: Vec<(String, Option<&[usize]>, &str)> = vec![
        (
            format!(r#"{{"weights": {three_rows}, "x": [1,2,3], "t": 0.5}}"#),
            Some(&[3, 4, 4, 1]),
            "params.json: weights[1] has 3 rows, expected 4",
        ),
        (
            // Without --sizes the shapes are read off the matrices, so the next one disagrees.
            format!(r#"{{"weights": {three_rows}, "x": [1,2,3], "t": 0.5}}"#),
            None,
            "params.json: weights[2][0] has 4 values, expected 3",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,2,3], "t": 0.5}"#.into(),
            None,
            "params.json: x has 3 values, expected 2",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,2]}"#.into(),
            None,
            "params.json: missing field `t`",
        ),
        (
            r#"{"x": [1,2], "t": 1}"#.into(),
            None,
            "params.json: missing field `weights`",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,2], "t": 1, "bias": [[0,0],[0]]}"#
                .into(),
            None,
            "params.json: unknown field `bias`",
        ),
        (
            r#"{"weights": [[[1,2],[3,NaN]],[[1,2]]], "x": [1,2], "t": 1}"#.into(),
            None,
            "params.json: weights[0][1][1]: NaN is not a finite number",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,-Infinity], "t": 1}"#.into(),
            None,
            "params.json: x[1]: -Infinity is not a finite number",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,2], "t": 1e999}"#.into(),
            None,
            "params.json: t: 1e999 is not a finite number",
        ),
        (
            r#"{"weights": [[[1,2],[3,"4"]],[[1,2]]], "x": [1,2], "t": 1}"#.into(),
            None,
            r#"params.json: weights[0][1][1]: invalid type: string "4", expected a finite number"#,
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "biases": [[0,0]], "x": [1,2], "t": 1}"#.into(),
            None,
            "params.json: biases has 1 vectors, expected 2",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "biases": [[0,0],[0,1]], "x": [1,2], "t": 1}"#
                .into(),
            None,
            "params.json: biases[1] has 2 values, expected 1",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,2], "t": [1, 2]}"#.into(),
            None,
            "params.json: t has 2 values, expected 1",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,2], "t": 1}"#.into(),
            Some(&[2, 2, 2, 1]),
            "params.json: weights has 2 matrices, expected 3",
        ),
        (
            r#"{"weights": [[[1,2],[3,4]],[]], "x": [1,2], "t": 1}"#.into(),
            None,
            "params.json: weights[1] has no rows",
        ),
        (
            r#"[1, 2]"#.into(),
            None,
            "params.json: the top level is not an object",
        ),
        (r#"{"weights": "#.into(), None, "params.json: invalid JSON"),
    ];
    for (text, sizes, expected) in cases {
        let err = parse_err(&text, sizes);
        assert!(
            err.starts_with(expected),
            "for {text}\n got: {err}\nwant: {expected}…"
        );
    }
}

#[test]
fn a_utf8_byte_order_mark_is_accepted() {
    let text = "\u{feff}{\"weights\": [[[1,2],[3,4]],[[1,2]]], \"x\": [1,2], \"t\": 1}";
    let p = Problem::from_json_str(text, Path::new("bom.json"), None).unwrap();
    assert_eq!(p.x, [1.0, 2.0]);
}

#[test]
fn non_finite_words_inside_strings_are_left_alone() {
    // "NaN" inside a string is a string, not a number: reported as such.
    let err = parse_err(
        r#"{"weights": [[[1,2],[3,4]],[[1,2]]], "x": [1,"NaN"], "t": 1}"#,
        None,
    );
    assert!(err.contains(r#"x[1]: invalid type: string "NaN""#), "{err}");
}

#[test]
fn missing_params_file_names_the_file() {
    let err = Problem::from_json_file(Path::new("tests/fixtures/backprop/nope.json"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.json"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The command line.
// ---------------------------------------------------------------------------------------------

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .arg("backprop")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_prints_the_table() {
    let out = cli(&["--seed", "7"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "x_3",
        "a^(2)_4",
        "z^(3)_1",
        "δ^(4)_1",
        "δ^(2)_4",
        "∂E/∂w^(3)_{14}",
        "∂E/∂w^(1)_{43}",
    ] {
        assert!(stdout.contains(name), "{name} missing from\n{stdout}");
    }
    assert!(!stdout.contains("∂E/∂b"), "no biases asked for:\n{stdout}");
    // Same seed, same numbers.
    assert_eq!(cli(&["--seed", "7"]).stdout, stdout.as_bytes());
}

#[test]
fn cli_json_from_the_fixture() {
    let out = cli(&["--params", FIXTURE, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = v["report"]["entries"].as_array().unwrap();
    let delta4 = entries.iter().find(|e| e["name"] == "δ^(4)_1").unwrap();
    let value = delta4["value"].as_f64().unwrap();
    assert!((value - 0.5057433013175983).abs() < 1e-14, "{value}");
    assert!(delta4["finite_difference"].is_f64());
    assert!(delta4["rel_error"].as_f64().unwrap() < 1e-9);
    let weight = entries
        .iter()
        .find(|e| e["name"] == "∂E/∂w^(2)_{12}")
        .unwrap();
    assert_eq!(
        (
            weight["layer"].as_u64(),
            weight["j"].as_u64(),
            weight["k"].as_u64()
        ),
        (Some(2), Some(1), Some(2))
    );
    assert_eq!(v["report"]["sizes"], serde_json::json!([3, 4, 4, 1]));
    // The echoed parameters are a valid parameter file for the same problem.
    let again = Problem::from_json_str(&v["params"].to_string(), Path::new("echo"), None).unwrap();
    assert_eq!(again.network, fixed_network());
}

#[test]
fn cli_seed_with_biases_and_sizes() {
    let out = cli(&["--seed", "3", "--sizes", "2,3,2", "--biases", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["report"]["sizes"], serde_json::json!([2, 3, 2]));
    assert_eq!(v["report"]["biases"], true);
    let names: Vec<&str> = v["report"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"∂E/∂b^(1)_3") && names.contains(&"δ^(3)_2"),
        "{names:?}"
    );
}

#[test]
fn cli_reports_malformed_params() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("params.json");
    std::fs::write(
        &path,
        r#"{"weights": [[[1,2,3],[4,5,6],[7,8,9],[1,2,3]], [[1,2,3,4],[1,2,3,4],[1,2,3,4]], [[1,2,3,4]]], "x": [1,2,3], "t": 0.5}"#,
    )
    .unwrap();
    let out = cli(&["--params", path.to_str().unwrap(), "--sizes", "3,4,4,1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("params.json: weights[1] has 3 rows, expected 4"),
        "{stderr}"
    );
}

#[test]
fn cli_needs_a_source() {
    let out = cli(&[]);
    assert!(!out.status.success());
    let out = cli(&["--seed", "1", "--params", FIXTURE]);
    assert!(
        !out.status.success(),
        "--seed and --params together are ambiguous"
    );
}

#[test]
fn sizes_beyond_what_can_be_held_or_checked_are_refused_at_once() {
    // Holding it would take terabytes: refused before anything is allocated.
    let err = Problem::random(&[3, 100_000_000_000, 1], false, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3-100000000000-1") && err.contains("50000000"),
        "{err}"
    );
    // Overflowing the weight count is the same error, not a panic.
    let err = Problem::random(&[usize::MAX, usize::MAX, 1], false, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("too many"), "{err}");
    // It fits, but checking 40,000 weights would take minutes: refused with the limit.
    let p = Problem::random(&[3, 10_000, 1], false, 1).unwrap();
    let err = p.report().unwrap_err().to_string();
    assert!(
        err.contains("40000 weights") && err.contains("20000"),
        "{err}"
    );
}

/// `--biases` makes random biases for `--seed`; a `--params` file has its own biases or none,
/// so the combination is refused rather than `--biases` silently ignored.
#[test]
fn cli_refuses_biases_with_params() {
    let out = cli(&["--params", FIXTURE, "--biases"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--biases") && err.contains("--params"),
        "{err}"
    );
    assert!(cli(&["--params", FIXTURE]).status.success());
}
