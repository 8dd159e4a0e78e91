//! The fast NHWC backbone (`backbone::fast`) against torchvision's features (fixtures from
//! tools/gen_backbone_fixtures.py) and against the candle reference network, in f32 and bf16,
//! on the best kernels of this CPU and on the portable fallback.

#[path = "common/fixtures.rs"]
mod fixtures;

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::backbone::fast::{FastResNet, Precision};
use cifar_finetune::backbone::resnet::ResNet;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::data::transform::Preprocess;
use cifar_finetune::features::Extractor;
use cifar_finetune::isa::{Isa, IsaKind};
use fixtures::{fixture, max_rel_err, read_f32};

fn state_dict() -> StateDict {
    StateDict::from_tensors("synthetic", weights::synthetic_state_dict().unwrap())
}

fn fast(precision: Precision, isa: Isa) -> FastResNet {
    FastResNet::with_isa(state_dict(), precision, isa).unwrap()
}

/// The candle reference network, built once.
fn candle() -> &'static ResNet {
    static MODEL: OnceLock<ResNet> = OnceLock::new();
    MODEL.get_or_init(|| ResNet::from_state_dict(state_dict()).unwrap())
}

/// `kind`'s instruction set, or `None` after printing one line naming what is not tested.
fn native_or_skip(kind: IsaKind, what: &str) -> Option<Isa> {
    let isa = Isa::new(kind);
    if isa.is_none() {
        eprintln!("SKIPPED: this CPU lacks {kind}: {what} did not run");
    }
    isa
}

/// The three fixture images.
fn images() -> Vec<u8> {
    std::fs::read(fixture("images.u8")).unwrap()
}

/// Preprocessed `[n, 3, size, size]` batch of the fixture images `which`.
fn batch(pre: &Preprocess, which: &[usize]) -> Vec<f32> {
    let images = images();
    let per = 3 * pre.size * pre.size;
    let mut x = vec![0f32; which.len() * per];
    for (&i, out) in which.iter().zip(x.chunks_exact_mut(per)) {
        pre.apply(&images[i * 3072..(i + 1) * 3072], 32, 32, out)
            .unwrap();
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

/// The fixture preprocessings and torchvision's features for them; the 224 one only when
/// `with_224` (the portable kernels are scalar in the opt-level-1 test build: 64 px keeps
/// them fast while exercising the same code).
fn fixtures(with_224: bool) -> Vec<(Preprocess, &'static str)> {
    let mut v = vec![(Preprocess::half(64), "features_64_half.f32")];
    if with_224 {
        v.push((Preprocess::imagenet(224), "features_224.f32"));
    }
    v
}

/// f32 on `isa` equals torchvision to 1e-4 relative, for batches of 3 and 1.
fn check_f32_against_torchvision(isa: Isa, with_224: bool) {
    let model = fast(Precision::F32, isa);
    for (pre, name) in fixtures(with_224) {
        let expected = read_f32(name);
        let s = pre.size;
        let all = model.forward(&batch(&pre, &[0, 1, 2]), 3, s, s).unwrap();
        let err = max_rel_err(&all, &expected);
        assert!(err < 1e-4, "{isa:?} {name} batch 3: relative error {err}");
        let one = model.forward(&batch(&pre, &[1]), 1, s, s).unwrap();
        let err = max_rel_err(&one, &expected[2048..4096]);
        assert!(err < 1e-4, "{isa:?} {name} batch 1: relative error {err}");
        // The images differ, so must their features: a broadcast bug cannot pass.
        assert!(max_rel_err(&all[..2048], &all[2048..4096]) > 1e-2);
    }
}

#[test]
fn f32_matches_torchvision_on_the_best_kernels() {
    let isa = Isa::detect();
    eprintln!("fast backbone f32, 64 and 224 px: {isa} kernels, natively");
    check_f32_against_torchvision(isa, true);
}

#[test]
fn f32_matches_torchvision_on_every_native_kernel() {
    for kind in [IsaKind::Avx512, IsaKind::Avx2Fma] {
        if let Some(isa) = native_or_skip(kind, "its fast-backbone f32 test") {
            eprintln!("fast backbone f32, 64 px: {isa} kernels, natively");
            check_f32_against_torchvision(isa, false);
        }
    }
}

#[test]
fn f32_matches_torchvision_on_the_portable_fallback() {
    check_f32_against_torchvision(Isa::Portable, false);
}

#[test]
fn f32_matches_the_candle_path_on_odd_sizes_and_threads() {
    // A non-square 40×56 input (rows and columns down-sample differently) and batch 2.
    let pre = Preprocess::imagenet(40);
    let (h, w) = pre.output_hw(32, 45);
    assert_eq!((h, w), (40, 56));
    let n = 2;
    let x: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let reference = candle()
        .forward(&Tensor::from_slice(&x, (n, 3, h, w), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut model = fast(Precision::F32, Isa::detect());
    for threads in [1, 3] {
        model.set_threads(threads).unwrap();
        let ours = model.forward(&x, n, h, w).unwrap();
        let err = max_rel_err(&ours, &reference);
        assert!(
            err < 1e-5,
            "threads {threads}: relative error {err} against candle"
        );
    }
}

/// bf16 features agree with f32 (cosine ≥ 0.999 on every fixture image).
fn check_bf16_cosine(isa: Isa, with_224: bool) {
    let f32_model = fast(Precision::F32, Isa::detect());
    let bf16_model = fast(Precision::Bf16, isa);
    for (pre, _) in fixtures(with_224) {
        let s = pre.size;
        let x = batch(&pre, &[0, 1, 2]);
        let a = f32_model.forward(&x, 3, s, s).unwrap();
        let b = bf16_model.forward(&x, 3, s, s).unwrap();
        for i in 0..3 {
            let c = cosine(&a[i * 2048..(i + 1) * 2048], &b[i * 2048..(i + 1) * 2048]);
            assert!(c >= 0.999, "{isa:?} size {s} image {i}: cosine {c}");
        }
        // bf16 must actually round: identical features would mean f32 ran.
        assert_ne!(a, b, "{isa:?} size {s}: bf16 gave exactly the f32 features");
    }
}

#[test]
fn bf16_native_agrees_with_f32() {
    for kind in [IsaKind::Amx, IsaKind::Avx512Bf16] {
        if let Some(isa) = native_or_skip(kind, "its native bf16 network test") {
            eprintln!("fast backbone bf16: {isa} kernels, natively");
            check_bf16_cosine(isa, true);
        }
    }
}

#[test]
fn bf16_emulated_fallback_agrees_with_f32() {
    check_bf16_cosine(Isa::Portable, false);
    // The emulation on the best f32 kernels of this CPU (what `--precision bf16` runs
    // without AVX512-BF16).
    let emulated = match Isa::detect() {
        Isa::Amx(t) => Isa::Avx512(t.avx512_bf16().avx512()),
        Isa::Avx512Bf16(t) => Isa::Avx512(t.avx512()),
        other => other,
    };
    eprintln!("fast backbone bf16 emulated: {emulated} kernels, natively");
    check_bf16_cosine(emulated, true);
}

#[test]
fn bf16_native_equals_the_emulation() {
    for kind in [IsaKind::Amx, IsaKind::Avx512Bf16] {
        if let Some(isa) = native_or_skip(kind, "its native-equals-emulation test") {
            check_native_equals_emulation(isa);
        }
    }
}

fn check_native_equals_emulation(isa: Isa) {
    // Both see the same bf16-rounded operands and bf16 activations, and accumulate in f32:
    // only the order of the sums differs, and with it, rarely, a bf16 rounding.
    let pre = Preprocess::half(64);
    let x = batch(&pre, &[0, 1, 2]);
    let native = fast(Precision::Bf16, isa).forward(&x, 3, 64, 64).unwrap();
    let emulated = fast(Precision::Bf16, Isa::Portable)
        .forward(&x, 3, 64, 64)
        .unwrap();
    let err = max_rel_err(&native, &emulated);
    assert!(err < 2e-2, "{isa} vs emulated bf16: relative error {err}");
    for i in 0..3 {
        let c = cosine(&native[i * 2048..][..2048], &emulated[i * 2048..][..2048]);
        assert!(c >= 0.9999, "{isa} vs emulated bf16, image {i}: cosine {c}");
    }
}

#[test]
fn extractor_uses_the_fast_path_and_names_the_precision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet50.safetensors");
    weights::write_safetensors(&weights::synthetic_state_dict().unwrap(), &path).unwrap();
    let pre = Preprocess::half(64);
    let f32_ex = Extractor::load(&path, pre.clone()).unwrap();
    let bf16_ex = Extractor::load_with_precision(&path, pre.clone(), Precision::Bf16).unwrap();
    assert_eq!(f32_ex.fingerprint().precision, Precision::F32);
    assert_eq!(bf16_ex.fingerprint().precision, Precision::Bf16);
    assert!(
        bf16_ex
            .fingerprint()
            .to_string()
            .ends_with("; precision bf16-activations")
    );
    assert_eq!(bf16_ex.precision(), Precision::Bf16);
    let images = images();
    let imgs: Vec<&[u8]> = images.chunks_exact(3072).collect();
    let got = f32_ex.extract(&imgs, 32, 32).unwrap();
    let err = max_rel_err(&got, &read_f32("features_64_half.f32"));
    assert!(err < 1e-4, "extractor (fast f32): relative error {err}");
    let got16 = bf16_ex.extract(&imgs, 32, 32).unwrap();
    for i in 0..3 {
        let c = cosine(
            &got[i * 2048..(i + 1) * 2048],
            &got16[i * 2048..(i + 1) * 2048],
        );
        assert!(c >= 0.999, "extractor bf16 image {i}: cosine {c}");
    }
}

/// ResNet-18 (basic blocks, 512-d features) is data, not code: the candle reference and the
/// fast path built from `Arch::RESNET18` both equal torchvision's resnet18.
#[test]
fn resnet18_matches_torchvision_on_both_paths() {
    let arch = Arch::RESNET18;
    let sd = || {
        let tensors = weights::synthetic_state_dict_of(&arch).unwrap();
        StateDict::from_tensors("synthetic resnet18", tensors)
    };
    let pre = Preprocess::half(64);
    let x = batch(&pre, &[0, 1, 2]);
    let expected = read_f32("features_resnet18_64_half.f32");
    assert_eq!(expected.len(), 3 * 512);
    let reference = ResNet::with_arch(sd(), &arch).unwrap();
    assert_eq!(reference.feature_dim(), 512);
    let got = reference
        .forward(&Tensor::from_slice(&x, (3, 3, 64, 64), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let err = max_rel_err(&got, &expected);
    assert!(err < 1e-4, "candle resnet18: relative error {err}");
    for isa in [Isa::detect(), Isa::Portable] {
        let model = FastResNet::with_arch(sd(), &arch, Precision::F32, isa).unwrap();
        assert_eq!(model.feature_dim(), 512);
        let got = model.forward(&x, 3, 64, 64).unwrap();
        let err = max_rel_err(&got, &expected);
        assert!(err < 1e-4, "fast resnet18 on {isa}: relative error {err}");
        assert!(max_rel_err(&got[..512], &got[512..1024]) > 1e-2);
    }
    // ResNet-50 weights are not a ResNet-18: strict loading says which was expected.
    let err = FastResNet::with_arch(state_dict(), &arch, Precision::F32, Isa::Portable)
        .unwrap_err()
        .to_string();
    assert!(err.contains("resnet18"), "{err}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let model = fast(Precision::F32, Isa::Portable);
    let err = model.forward(&[0.0; 10], 1, 4, 4).unwrap_err().to_string();
    assert!(err.contains("[1, 3, 4, 4]"), "{err}");
    assert!(model.forward(&[], 0, 4, 4).is_err());
}
