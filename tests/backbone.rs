//! The ResNet-50 backbone against torchvision (fixtures from tools/gen_backbone_fixtures.py),
//! strict weight loading from both real formats, and the architecture a file holds
//! (another ResNet than the one asked for is refused naming both).

#[path = "common/fixtures.rs"]
mod fixtures;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cifar_finetune::backbone::arch::Arch;
use cifar_finetune::backbone::fast::{FastResNet, Precision};
use cifar_finetune::backbone::resnet::ResNet;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::data::transform::Preprocess;
use cifar_finetune::features::Extractor;
use fixtures::{fixture, max_rel_err, read_f32};

fn synthetic_model() -> ResNet {
    let sd = weights::synthetic_state_dict().unwrap();
    ResNet::from_state_dict(StateDict::from_tensors("synthetic", sd)).unwrap()
}

#[test]
fn features_match_torchvision_end_to_end() {
    let images = std::fs::read(fixture("images.u8")).unwrap();
    let imgs: Vec<&[u8]> = images.chunks_exact(3 * 32 * 32).collect();
    assert_eq!(imgs.len(), 3);
    let model = synthetic_model();
    for (pre, name) in [
        (Preprocess::imagenet(224), "features_224.f32"),
        (Preprocess::half(64), "features_64_half.f32"),
    ] {
        let expected = read_f32(name);
        let ex = Extractor::new(model.clone(), pre, "synthetic");
        // Batched and one at a time must agree with torchvision alike.
        let batched = ex.extract(&imgs, 32, 32).unwrap();
        let err = max_rel_err(&batched, &expected);
        assert!(err < 1e-4, "{name}: relative error {err}");
        let single = ex.extract(&imgs[2..], 32, 32).unwrap();
        let err = max_rel_err(&single, &expected[2 * 2048..]);
        assert!(err < 1e-4, "{name} (single image): relative error {err}");
        // The images differ, so must their features: a broadcast bug cannot pass.
        assert!(max_rel_err(&batched[..2048], &batched[2048..4096]) > 1e-2);
    }
}

#[test]
fn fingerprint_names_weights_preprocessing_and_precision() {
    let ex = Extractor::new(synthetic_model(), Preprocess::imagenet(224), "abc123");
    let fp = ex.fingerprint();
    assert_eq!(fp.weights_sha256, "abc123");
    assert_eq!(fp.preprocess, Preprocess::imagenet(224).fingerprint());
    assert_eq!(fp.precision, Precision::F32);
    let other = Extractor::new(synthetic_model(), Preprocess::half(224), "abc123");
    assert_ne!(fp, other.fingerprint());
}

fn tiny_expected() -> Vec<f32> {
    // tiny.pth holds conv1.weight[:2, :, :2, :3] of the synthetic weights.
    let full = weights::synthetic_values("conv1.weight", &[64, 3, 7, 7]);
    let mut v = Vec::new();
    for o in 0..2 {
        for i in 0..3 {
            for y in 0..2 {
                for x in 0..3 {
                    v.push(full[((o * 3 + i) * 7 + y) * 7 + x]);
                }
            }
        }
    }
    v
}

#[test]
fn reads_torch_save_zip_pth_with_int64_counter() {
    let mut sd = StateDict::read(&fixture("tiny.pth")).unwrap();
    let w = sd.take("conv1.weight", &[2, 3, 2, 3]).unwrap();
    assert_eq!(
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        tiny_expected()
    );
    let mean = sd.take("bn1.running_mean", &[5]).unwrap();
    assert_eq!(
        mean.to_vec1::<f32>().unwrap(),
        weights::synthetic_values("bn1.running_mean", &[5])
    );
    // fc.* and num_batches_tracked are ignored on purpose: finishing succeeds.
    sd.finish().unwrap();
}

#[test]
fn reads_safetensors() {
    let mut sd = StateDict::read(&fixture("tiny.safetensors")).unwrap();
    let w = sd.take("conv1.weight", &[2, 3, 2, 3]).unwrap();
    assert_eq!(
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        tiny_expected()
    );
    let b = sd.take("fc.bias", &[7]).unwrap();
    assert_eq!(b.to_vec1::<f32>().unwrap()[6], 0.5);
}

#[test]
fn full_model_round_trips_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet50.safetensors");
    weights::write_safetensors(&weights::synthetic_state_dict().unwrap(), &path).unwrap();
    let loaded = ResNet::load(&path).unwrap();
    let x = Tensor::ones((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let a = loaded
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = synthetic_model()
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

fn load_err(sd: HashMap<String, Tensor>) -> String {
    ResNet::from_state_dict(StateDict::from_tensors("w.pth", sd))
        .unwrap_err()
        .to_string()
}

#[test]
fn strict_loading_names_the_key() {
    let mut sd = weights::synthetic_state_dict().unwrap();
    sd.remove("layer3.4.bn2.running_var");
    let err = load_err(sd);
    assert!(err.contains("w.pth"), "{err}");
    assert!(
        err.contains("missing tensor `layer3.4.bn2.running_var`"),
        "{err}"
    );

    let mut sd = weights::synthetic_state_dict().unwrap();
    sd.insert(
        "layer5.0.conv1.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load_err(sd);
    assert!(
        err.contains("unexpected tensor `layer5.0.conv1.weight`"),
        "{err}"
    );

    // A ResNet-18/34 has 3×3 convolutions where ResNet-50 has 1×1: the wrong model.
    let mut sd = weights::synthetic_state_dict().unwrap();
    sd.insert(
        "layer1.0.conv1.weight".into(),
        Tensor::zeros((64, 64, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load_err(sd);
    assert!(
        err.contains("`layer1.0.conv1.weight` has shape [64, 64, 3, 3], expected [64, 64, 1, 1]"),
        "{err}"
    );

    let mut sd = weights::synthetic_state_dict().unwrap();
    sd.insert(
        "bn1.running_var".into(),
        Tensor::new(&[f32::NAN; 64], &Device::Cpu).unwrap(),
    );
    let err = load_err(sd);
    assert!(err.contains("`bn1.running_var` holds NaN"), "{err}");
}

#[test]
fn wrong_model_file_is_rejected() {
    // tiny.pth has real names but is not a whole ResNet-50.
    let err = ResNet::load(&fixture("tiny.pth")).unwrap_err().to_string();
    assert!(err.contains("tiny.pth"), "{err}");
    assert!(err.contains("conv1.weight"), "{err}");
}

#[test]
fn truncated_or_corrupt_weights_give_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("tiny.pth")).unwrap();
    for (name, content) in [
        ("truncated.pth", bytes[..bytes.len() * 2 / 3].to_vec()),
        ("garbage.pth", b"this is not a weights file at all".to_vec()),
        ("empty.pth", Vec::new()),
        ("corrupt.pth", {
            // Zero the pickle (the zip's first entry, data.pkl, starts near byte 64).
            let mut b = bytes.clone();
            b[80..400].fill(0);
            b
        }),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let result = StateDict::read(&p).and_then(|mut sd| {
            sd.take("conv1.weight", &[2, 3, 2, 3])?;
            sd.take("bn1.running_mean", &[5])?;
            Ok(())
        });
        let err = result.expect_err(name).to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
    let st = std::fs::read(fixture("tiny.safetensors")).unwrap();
    let p = dir.path().join("truncated.safetensors");
    std::fs::write(&p, &st[..st.len() - 10]).unwrap();
    let err = StateDict::read(&p).unwrap_err().to_string();
    assert!(
        err.contains("truncated.safetensors") && err.contains("safetensors"),
        "{err}"
    );
}

/// Batch-norm statistics that PyTorch could not have produced, or that would make its output
/// NaN, are refused when loading, naming the tensor, in both implementations.
#[test]
fn invalid_batch_norm_statistics_are_refused() {
    let with = |changes: &[(&str, usize, f32)]| {
        let mut sd = weights::synthetic_state_dict().unwrap();
        for &(key, index, value) in changes {
            let t = &sd[key];
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[index] = value;
            let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            sd.insert(key.to_string(), t);
        }
        sd
    };
    let sd = with(&[("layer2.1.bn3.running_var", 7, -0.25)]);
    let err = load_err(sd.clone());
    assert!(
        err.contains("`layer2.1.bn3.running_var`")
            && err.contains("negative variance -0.25")
            && err.contains("index 7"),
        "{err}"
    );
    let err = FastResNet::from_state_dict(StateDict::from_tensors("w.pth", sd), Precision::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`layer2.1.bn3.running_var`"), "{err}");

    // Tiny: -ε < σ² < 0 still gives σ² + ε > 0, but is no variance.
    let err = load_err(with(&[("bn1.running_var", 0, -1e-9)]));
    assert!(err.contains("`bn1.running_var`"), "{err}");

    let err = load_err(with(&[("layer4.2.conv3.weight", 5, f32::INFINITY)]));
    assert!(
        err.contains("`layer4.2.conv3.weight` holds NaN or infinite") && err.contains("index 5"),
        "{err}"
    );

    // Finite, but γ/√(σ²+ε) overflows f32 once folded into the weights.
    let err = load_err(with(&[
        ("layer1.0.bn1.weight", 2, 3e38),
        ("layer1.0.bn1.running_var", 2, 0.0),
    ]));
    assert!(
        err.contains("folding `layer1.0.bn1` into `layer1.0.conv1` overflows"),
        "{err}"
    );
}

/// A strided tensor is refused naming its key and saying how to fix it; a tensor of a dtype
/// candle cannot read (int32) is named with its storage type.
#[test]
fn pth_tensors_that_cannot_be_read_are_named() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/backbone");
    let err = StateDict::read(&dir.join("noncontiguous.pth"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`conv1.weight`") && err.contains(".contiguous()"),
        "{err}"
    );
    // No backtrace in the message, whatever RUST_BACKTRACE says.
    assert!(err.lines().count() <= 2, "{err}");

    let mut sd = StateDict::read(&dir.join("int32.pth")).unwrap();
    let err = sd.take("conv1.weight", &[2, 3]).unwrap_err().to_string();
    assert!(
        err.contains("`conv1.weight`") && err.contains("IntStorage"),
        "{err}"
    );
}

/// A state dict of another torchvision ResNet than the one asked for is refused naming both
/// — in memory on both paths, and from a file's names and shapes alone before the extractor
/// hashes it (`resnet101_shapes.pth`: resnet101's keys and shapes without its data).
#[test]
fn another_resnet_is_refused_naming_both() {
    let sd = || {
        StateDict::from_tensors(
            "resnet101.pth",
            weights::synthetic_state_dict_of(&Arch::RESNET101).unwrap(),
        )
    };
    assert_eq!(sd().infer_arch(), Some(Arch::RESNET101));
    let candle = ResNet::from_state_dict(sd()).unwrap_err().to_string();
    let fast = FastResNet::from_state_dict(sd(), Precision::F32)
        .unwrap_err()
        .to_string();
    for err in [candle, fast] {
        assert!(
            err.contains("resnet101.pth")
                && err.contains("holds a torchvision resnet101 state dict")
                && err.contains("not the resnet50 asked for")
                && err.contains("--backbone resnet101"),
            "{err}"
        );
    }

    let file = fixture("resnet101_shapes.pth");
    assert_eq!(weights::read_arch(&file).unwrap(), Some(Arch::RESNET101));
    let err = Extractor::load(&file, Preprocess::imagenet(32))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("resnet101_shapes.pth")
            && err.contains("resnet101")
            && err.contains("not the resnet50"),
        "{err}"
    );
    Extractor::load_arch(
        &file,
        &Arch::RESNET101,
        Preprocess::imagenet(32),
        Precision::F32,
    )
    .unwrap();
    // Not a whole ResNet: no architecture, strict loading says what is missing.
    assert_eq!(weights::read_arch(&fixture("tiny.pth")).unwrap(), None);
    assert_eq!(
        weights::read_arch(&fixture("tiny.safetensors")).unwrap(),
        None
    );
}

/// timm's safetensors (`timm/resnet18.tv_in1k`: torchvision's names, no
/// `num_batches_tracked`) are recognised from their header and give torchvision's features;
/// the fingerprint names the backbone, and ResNet-50's is what it always was.
#[test]
fn timm_safetensors_of_another_resnet_load_by_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mut sd = weights::synthetic_state_dict_of(&Arch::RESNET18).unwrap();
    sd.retain(|k, _| !k.ends_with("num_batches_tracked"));
    weights::write_safetensors(&sd, &path).unwrap();
    assert_eq!(weights::read_arch(&path).unwrap(), Some(Arch::RESNET18));

    let pre = Preprocess::half(64);
    let ex = Extractor::load_arch(&path, &Arch::RESNET18, pre.clone(), Precision::F32).unwrap();
    assert_eq!(ex.feature_dim(), 512);
    assert_eq!(ex.arch(), &Arch::RESNET18);
    let sha = cifar_finetune::io::sha256_file(&path).unwrap();
    assert_eq!(
        ex.fingerprint().to_string(),
        format!(
            "resnet18-avgpool; weights sha256:{sha}; {}; precision f32",
            pre.fingerprint()
        )
    );
    assert_eq!(ex.fingerprint().arch(), Some(Arch::RESNET18));
    let images = std::fs::read(fixture("images.u8")).unwrap();
    let imgs: Vec<&[u8]> = images.chunks_exact(3 * 32 * 32).collect();
    let got = ex.extract(&imgs, 32, 32).unwrap();
    let err = max_rel_err(&got, &read_f32("features_resnet18_64_half.f32"));
    assert!(
        err < 1e-4,
        "resnet18 from safetensors: relative error {err}"
    );

    // Given as the default ResNet-50, it is refused at once, naming both.
    let err = Extractor::load(&path, pre.clone()).unwrap_err().to_string();
    assert!(
        err.contains("holds a torchvision resnet18") && err.contains("not the resnet50"),
        "{err}"
    );

    // ResNet-50's fingerprint, and so every cache key made before --backbone, is unchanged.
    let r50 = dir.path().join("resnet50.safetensors");
    weights::write_safetensors(&weights::synthetic_state_dict().unwrap(), &r50).unwrap();
    let a = Extractor::load(&r50, pre.clone()).unwrap();
    let b = Extractor::load_arch(&r50, &Arch::RESNET50, pre.clone(), Precision::F32).unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    let sha = cifar_finetune::io::sha256_file(&r50).unwrap();
    assert_eq!(
        a.fingerprint().to_string(),
        format!(
            "resnet50-avgpool; weights sha256:{sha}; {}; precision f32",
            pre.fingerprint()
        )
    );
    assert_eq!(a.feature_dim(), 2048);
}

/// torchvision's IMAGENET1K_V1 wide ResNet files hold float16 tensors (HalfStorage): they
/// are read and widened to f32 exactly.
#[test]
fn reads_float16_pth() {
    let mut sd = StateDict::read(&fixture("tiny_f16.pth")).unwrap();
    let w = sd.take("conv1.weight", &[2, 3, 2, 3]).unwrap();
    let want: Vec<f32> = tiny_expected()
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    let mean = sd.take("bn1.running_mean", &[5]).unwrap();
    let want: Vec<f32> = weights::synthetic_values("bn1.running_mean", &[5])
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(mean.to_vec1::<f32>().unwrap(), want);
    sd.finish().unwrap();
}
