//! Every torchvision ResNet — ResNet-18/34 (basic blocks), ResNet-50/101/152 (bottlenecks)
//! and the wide ResNet-50-2/101-2 — against torchvision, on the candle reference, on the
//! fast path's best kernels for this CPU and on its portable ones, f32 to 1e-4 relative;
//! bf16 within a cosine of 0.999 of f32.
//!
//! The weights are not fixtures (ResNet-152 is 230 MB, the wide ResNet-101-2 500 MB): every
//! element is a hash of (tensor name, element index) that `weights::synthetic_state_dict_of`
//! and `tools/gen_backbone_fixtures.py` compute bit for bit alike, so only torchvision's
//! features of two small 32×40 inputs are committed (`arch_<name>_32x40.f32`, a few KB each).
//! 32×40 keeps the test fast on a 2-core CI machine while every stage still sees more than
//! one pixel in each direction but the last, whose average pool sees 1×2.

#[path = "common/fixtures.rs"]
mod fixtures;

use candle_core::{Device, Tensor};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::backbone::fast::{FastResNet, Precision};
use cifar_finetune::backbone::resnet::ResNet;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::isa::Isa;
use fixtures::{max_rel_err, read_f32};

const N: usize = 2;
const H: usize = 32;
const W: usize = 40;

/// `[2, 3, 32, 40]`: `arch_inputs()` of the generator, multiples of 1/32 in [-1, 1) (exact in
/// f32), different along x and y and per channel.
fn inputs() -> Vec<f32> {
    let mut x = Vec::with_capacity(N * 3 * H * W);
    for n in 0..N {
        for c in 0..3 {
            for y in 0..H {
                for xx in 0..W {
                    let v = (n * 71 + c * 37 + y * 7 + xx * 3 + (xx * y) % 11 + (y * y) % 13) % 64;
                    x.push(v as f32 / 32.0 - 1.0);
                }
            }
        }
    }
    x
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `arch` built from the synthetic weights on every path equals torchvision's features.
fn check(arch: Arch) {
    let tensors = weights::synthetic_state_dict_of(&arch).unwrap();
    let sd = || StateDict::from_tensors(format!("synthetic {arch}"), tensors.clone());
    let expected = read_f32(&format!("arch_{}_32x40.f32", arch.name));
    let dim = arch.feature_dim();
    assert_eq!(expected.len(), N * dim, "{arch}: fixture size");
    let x = inputs();

    // The candle reference.
    let reference = ResNet::with_arch(sd(), &arch).unwrap();
    assert_eq!(reference.feature_dim(), dim);
    let got = reference
        .forward(&Tensor::from_slice(&x, (N, 3, H, W), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    drop(reference);
    let err = max_rel_err(&got, &expected);
    assert!(err < 1e-4, "{arch} candle: relative error {err}");

    // The fast path, f32, on this CPU's best kernels (both images in one batch) and on the
    // portable ones (the second image alone: scalar code in the opt-level-1 test build).
    let best = Isa::detect();
    let model = FastResNet::with_arch(sd(), &arch, Precision::F32, best).unwrap();
    assert_eq!(model.feature_dim(), dim);
    let f32_best = model.forward(&x, N, H, W).unwrap();
    drop(model);
    let err = max_rel_err(&f32_best, &expected);
    eprintln!("{arch} fast f32 on {best}: relative error {err:.2e}");
    assert!(
        err < 1e-4,
        "{arch} fast f32 on {best}: relative error {err}"
    );
    // The two inputs differ, so must their features: a broadcast bug cannot pass.
    assert!(
        max_rel_err(&f32_best[..dim], &f32_best[dim..]) > 1e-2,
        "{arch}"
    );
    let model = FastResNet::with_arch(sd(), &arch, Precision::F32, Isa::Portable).unwrap();
    let got = model.forward(&x[3 * H * W..], 1, H, W).unwrap();
    drop(model);
    let err = max_rel_err(&got, &expected[dim..]);
    eprintln!("{arch} fast f32 on portable: relative error {err:.2e}");
    assert!(
        err < 1e-4,
        "{arch} fast f32 on portable: relative error {err}"
    );

    // bf16 operands (emulated on the best f32 kernels where AVX512-BF16 is absent).
    let model = FastResNet::with_arch(sd(), &arch, Precision::Bf16, best).unwrap();
    let got = model.forward(&x, N, H, W).unwrap();
    for i in 0..N {
        let c = cosine(
            &got[i * dim..(i + 1) * dim],
            &f32_best[i * dim..(i + 1) * dim],
        );
        assert!(c >= 0.999, "{arch} bf16 image {i}: cosine {c} to f32");
    }
    assert_ne!(got, f32_best, "{arch}: bf16 gave exactly the f32 features");
}

#[test]
fn resnet18_matches_torchvision() {
    check(Arch::RESNET18);
}

#[test]
fn resnet34_matches_torchvision() {
    check(Arch::RESNET34);
}

#[test]
fn resnet50_matches_torchvision() {
    check(Arch::RESNET50);
}

#[test]
fn resnet101_matches_torchvision() {
    check(Arch::RESNET101);
}

#[test]
fn resnet152_matches_torchvision() {
    check(Arch::RESNET152);
}

#[test]
fn wide_resnet50_2_matches_torchvision() {
    check(Arch::WIDE_RESNET50_2);
}

#[test]
fn wide_resnet101_2_matches_torchvision() {
    check(Arch::WIDE_RESNET101_2);
}
