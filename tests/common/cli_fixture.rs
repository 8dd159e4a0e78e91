//! The directory the command-line tests run in: the CIFAR-10 binary fixtures under `data/`
//! and a synthetic ResNet-50 as `resnet50.safetensors`, with the flags that point at them.
//! Include it beside `shared_dir.rs`.

use std::path::{Path, PathBuf};

use cifar_finetune::backbone::weights;

use super::shared_dir::shared_dir;

/// Flags that make a feature-reading subcommand use the fixture directory: its data and
/// weights, small images, a 5-image validation split, no network.
pub const FIXTURE_FLAGS: [&str; 9] = [
    "--data",
    "data",
    "--weights",
    "resnet50.safetensors",
    "--image-size",
    "32",
    "--val-count",
    "5",
    "--offline",
];

/// `shared_dir(name)` filled with the fixture data and weights; call it once per process.
pub fn cli_fixture_dir(name: &str) -> PathBuf {
    let root = shared_dir(name);
    let data = root.join("data/cifar-10-batches-bin");
    std::fs::create_dir_all(&data).unwrap();
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar/cifar-10-batches-bin");
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, data.join(p.file_name().unwrap())).unwrap();
    }
    weights::write_safetensors(
        &weights::synthetic_state_dict().unwrap(),
        &root.join("resnet50.safetensors"),
    )
    .unwrap();
    root
}
