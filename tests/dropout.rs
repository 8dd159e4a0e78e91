//! Dropout as PyTorch's `nn.Dropout(p)`: in training each hidden unit is zeroed with
//! probability p and the kept ones scaled by 1/(1−p) (checked statistically, and through a
//! training step against an f64 reference with the same mask); in evaluation nothing is
//! applied. Seeded: the same seed and epoch give the same masks.

use std::ops::ControlFlow;

use cifar_finetune::checkpoint;
use cifar_finetune::features::FeatureSet;
use cifar_finetune::head::{Activation, Head, Sgd, Stepper};
use cifar_finetune::rundir::TrainConfig;
use cifar_finetune::train::{self, Dropout, RunOptions, SweepOutcome};

#[test]
fn mask_rate_and_scale_are_pytorchs() {
    let n = 200_000;
    for p in [0.5f32, 0.2, 0.9] {
        let mut mask = vec![f32::NAN; n];
        // Filled in pieces, as the training loop does batch by batch.
        let mut d = Dropout::new(3, 1, p);
        for chunk in mask.chunks_mut(4 * 32) {
            d.fill(chunk);
        }
        let keep = 1.0 / (1.0 - p);
        let dropped = mask.iter().filter(|&&v| v == 0.0).count();
        assert!(
            mask.iter().all(|&v| v == 0.0 || v == keep),
            "p = {p}: every factor is 0 or 1/(1−p) = {keep}"
        );
        // Binomial(n, p): the rate within 5 standard deviations.
        let rate = dropped as f64 / n as f64;
        let sigma = (f64::from(p) * (1.0 - f64::from(p)) / n as f64).sqrt();
        assert!(
            (rate - f64::from(p)).abs() < 5.0 * sigma,
            "p = {p}: dropped {rate}, expected {p} ± {sigma}"
        );
        // Inverted dropout keeps the expected activation: the mean factor is 1.
        let mean = mask.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let sd_mean = sigma * f64::from(keep);
        assert!(
            (mean - 1.0).abs() < 5.0 * sd_mean,
            "p = {p}: mean factor {mean}"
        );
        // Units are dropped independently: the rate among the units after a dropped one is p.
        let after_dropped: Vec<bool> = mask
            .windows(2)
            .filter(|w| w[0] == 0.0)
            .map(|w| w[1] == 0.0)
            .collect();
        let cond = after_dropped.iter().filter(|&&b| b).count() as f64 / after_dropped.len() as f64;
        let cond_sigma = (f64::from(p) * (1.0 - f64::from(p)) / after_dropped.len() as f64).sqrt();
        assert!(
            (cond - f64::from(p)).abs() < 5.0 * cond_sigma,
            "p = {p}: rate after a dropped unit {cond}"
        );
    }
}

#[test]
fn masks_are_seeded_per_epoch() {
    let mask = |seed, epoch| {
        let mut m = vec![0.0f32; 1000];
        Dropout::new(seed, epoch, 0.5).fill(&mut m);
        m
    };
    assert_eq!(mask(1, 2), mask(1, 2));
    assert_ne!(mask(1, 2), mask(1, 3));
    assert_ne!(mask(1, 2), mask(2, 2));
}

/// f64 cross-entropy of the head on one sample with hidden factors `m` (`[H]`).
fn reference_loss(head: &Head, x: &[f32], y: usize, m: &[f32]) -> f64 {
    let (d, h, c) = (head.dims.input, head.dims.hidden, head.dims.classes);
    let a: Vec<f64> = (0..h)
        .map(|j| {
            let z = (0..d)
                .map(|i| f64::from(head.w1[j * d + i]) * f64::from(x[i]))
                .sum::<f64>()
                + f64::from(head.b1[j]);
            let act = match head.activation {
                Activation::Relu => z.max(0.0),
                Activation::None => z,
            };
            act * f64::from(m[j])
        })
        .collect();
    let z2: Vec<f64> = (0..c)
        .map(|k| {
            (0..h)
                .map(|j| f64::from(head.w2[k * h + j]) * a[j])
                .sum::<f64>()
                + f64::from(head.b2[k])
        })
        .collect();
    let mx = z2.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    mx + z2.iter().map(|v| (v - mx).exp()).sum::<f64>().ln() - z2[y]
}

#[test]
fn a_training_step_applies_the_mask_after_the_activation() {
    for activation in [Activation::Relu, Activation::None] {
        let head = Head::init(24, 8, 10, 5)
            .unwrap()
            .with_activation(activation);
        let x: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let mut mask = vec![0.0f32; 8];
        Dropout::new(9, 1, 0.5).fill(&mut mask);
        assert!(mask.contains(&0.0) && mask.contains(&2.0), "{mask:?}");
        let want = reference_loss(&head, &x, 3, &mask);
        let mut trained = head.clone();
        let mut sgd = Sgd::new(head.dims, 0.01, 0.9).unwrap();
        let mut st = Stepper::new(head.dims, 1);
        let (loss, _) = st
            .step(&mut trained, &mut sgd, &[&x], &[3], 0.0, Some(&mask))
            .unwrap();
        assert!(
            (f64::from(loss) - want).abs() < 1e-5 * want.max(1.0),
            "{activation}: {loss} vs {want}"
        );
        // A dropped unit gets no gradient: its row of W1 and its bias do not move.
        for j in (0..8).filter(|&j| mask[j] == 0.0) {
            assert_eq!(
                trained.w1[j * 24..(j + 1) * 24],
                head.w1[j * 24..(j + 1) * 24]
            );
            assert_eq!(trained.b1[j], head.b1[j]);
        }
        // Without the mask the loss is the plain head's.
        let unmasked = reference_loss(&head, &x, 3, &[1.0; 8]);
        assert!((unmasked - want).abs() > 1e-4, "the mask changed nothing");
    }
}

fn blobs(n: usize, seed: u32) -> FeatureSet {
    let dim = 16;
    let h = |v: u32| {
        let mut x = v.wrapping_mul(0x9e37_79b9) ^ seed.wrapping_mul(0x85eb_ca6b);
        x ^= x >> 15;
        x = x.wrapping_mul(0x2c1b_3c6d);
        x ^= x >> 12;
        (x >> 8) as f32 / (1 << 24) as f32
    };
    let labels: Vec<u8> = (0..n as u32)
        .map(|i| (h(i * 31 + 7) * 10.0) as u8)
        .collect();
    let mut features = Vec::with_capacity(n * dim);
    for (r, &y) in labels.iter().enumerate() {
        for k in 0..dim {
            let bump = if k % 10 == y as usize { 1.5 } else { 0.0 };
            features.push(h((r * dim + k) as u32) + bump);
        }
    }
    FeatureSet {
        features,
        labels,
        index: (0..n as u32).collect(),
        dim,
        extractor: "synthetic-dropout-avgpool; weights sha256:00; synthetic; precision f32"
            .parse()
            .unwrap(),
        classes: cifar_finetune::data::cifar::class_names(),
    }
}

#[test]
fn evaluation_applies_no_dropout() {
    let (tr, va) = (blobs(200, 1), blobs(50, 2));
    let tmp = tempfile::tempdir().unwrap();
    let train_with = |dropout: f32, name: &str| {
        let cfg = TrainConfig {
            lr: 0.01,
            epochs: 2,
            hidden: 8,
            dropout,
            ..TrainConfig::default()
        };
        let dir = tmp.path().join(name);
        match train::sweep(
            &tr,
            &va,
            &[0.0],
            &cfg,
            &dir,
            &RunOptions::default(),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap()
        {
            SweepOutcome::Finished(s) => (dir, s),
            SweepOutcome::Stopped => panic!("stopped"),
        }
    };
    let (dir, summary) = train_with(0.5, "dropout");
    let (_, plain) = train_with(0.0, "plain");
    // Training used the masks: the same seed without dropout trains differently.
    assert_ne!(
        summary.lambdas[0].final_train_loss,
        plain.lambdas[0].final_train_loss
    );
    let ck = checkpoint::load(&dir.join(&summary.chosen_checkpoint)).unwrap();
    assert_eq!(ck.meta.config.dropout, 0.5);
    let head = &ck.head;
    // Evaluation is the plain function of the features: the f64 reference with every
    // factor 1, the same on every call, and what the validation loss was measured with.
    let p = head.predict(&va.features, &va.labels).unwrap();
    let again = head.predict(&va.features, &va.labels).unwrap();
    assert_eq!(p, again);
    let ones = vec![1.0f32; head.dims.hidden];
    let mut total = 0.0;
    for (r, &y) in va.labels.iter().enumerate() {
        let x = &va.features[r * 16..(r + 1) * 16];
        let want = reference_loss(head, x, y as usize, &ones);
        assert!(
            (f64::from(p.losses[r]) - want).abs() < 1e-4 * want.max(1.0),
            "row {r}: {} vs {want}",
            p.losses[r]
        );
        total += want;
    }
    let val_loss = summary.lambdas[0].best_val_loss;
    assert!((total / va.len() as f64 - val_loss).abs() < 1e-4 * val_loss.max(1.0));
}
