use cifar_finetune::backprop::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn loss(net: &Network, w: &[Vec<f64>], x: &[f64], t: &[f64]) -> f64 {
    let n = Network::new(
        net.sizes().to_vec(),
        w.to_vec(),
        net.biases().map(|b| b.to_vec()),
    )
    .unwrap();
    n.forward(x, t).unwrap().loss
}

#[test]
fn scratch() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let floors = [1e-8, 1e-6, 1e-5, 1e-4, 1e-3];
    let mut worst3 = [0.0f64; 5];
    let mut worst5 = [0.0f64; 5];
    let mut maxabs3: f64 = 0.0;
    let mut maxabs5: f64 = 0.0;
    for _ in 0..300 {
        let depth = rng.random_range(2..=5);
        let sizes: Vec<usize> = (0..depth).map(|_| rng.random_range(1..=6)).collect();
        let scale = rng.random_range(0.1..3.0);
        let p = Problem::random(&sizes, rng.random_bool(0.5), rng.random()).unwrap();
        let w: Vec<Vec<f64>> = p
            .network
            .weights()
            .iter()
            .map(|w| w.iter().map(|v| v * scale).collect())
            .collect();
        let net = Network::new(
            sizes.clone(),
            w.clone(),
            p.network.biases().map(|b| b.to_vec()),
        )
        .unwrap();
        let x: Vec<f64> = p.x.iter().map(|v| v * 2.0).collect();
        let t: Vec<f64> = p.t.iter().map(|v| v * 2.0).collect();
        let f = net.forward(&x, &t).unwrap();
        let g = net.backward(&f, &t).unwrap();
        for i in 0..w.len() {
            for q in 0..w[i].len() {
                let th = w[i][q];
                let mut ev = |v: f64| {
                    let mut w2 = w.clone();
                    w2[i][q] = v;
                    loss(&net, &w2, &x, &t)
                };
                let h3 = f64::EPSILON.cbrt() * th.abs().max(1.0);
                let n3 = (ev(th + h3) - ev(th - h3)) / (2.0 * h3);
                let h5 = f64::EPSILON.powf(0.2) * th.abs().max(1.0);
                let n5 = (ev(th - 2.0 * h5) - 8.0 * ev(th - h5) + 8.0 * ev(th + h5)
                    - ev(th + 2.0 * h5))
                    / (12.0 * h5);
                let a = g.dw[i][q];
                maxabs3 = maxabs3.max((a - n3).abs());
                maxabs5 = maxabs5.max((a - n5).abs());
                for (fi, fl) in floors.iter().enumerate() {
                    worst3[fi] = worst3[fi].max((a - n3).abs() / a.abs().max(n3.abs()).max(*fl));
                    worst5[fi] = worst5[fi].max((a - n5).abs() / a.abs().max(n5.abs()).max(*fl));
                }
            }
        }
    }
    println!("3pt maxabs {maxabs3:e} worst {worst3:?}");
    println!("5pt maxabs {maxabs5:e} worst {worst5:?}");
}
