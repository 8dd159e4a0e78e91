//! # cifar-finetune
//!
//! Transfer learning on CIFAR-10, CIFAR-100 or your own image folders with a frozen,
//! ImageNet-pretrained torchvision ResNet (ResNet-50 by default), in Rust.
//!
//! ## The pipeline, stage by stage
//!
//! ```text
//!  fetch ──► data::Dataset (data::cifar, data::cifar100;            ──► data::transform
//!            data::folder: ImageFolder, files via data::decode)          (Resize, CenterCrop,
//!            (class names, labels, images, fingerprints, content keys)    ToTensor, Normalize)
//!                                                                              │
//!  backbone::weights (.pth / .safetensors, strict keys from backbone::arch) ──► backbone::fast
//!  (BN folded, frozen; NHWC GEMM kernels chosen by an isa token) ──► features (cached shards)
//!                                                                              │
//!                        ┌─────────────────────────────────────────────────────┘
//!                        ▼
//!    head (D→32→ReLU|none→C) + train (SGD momentum, L2 λ, validation, best checkpoint,
//!    λ sweep) ──► rundir (config.json, history.csv, summary.json) + checkpoint
//!                        │
//!                        ▼
//!    evaluate + metrics (test or validation split: loss, top-1/top-5, confusion matrix,
//!    classification report, probabilities)
//!                        │
//!                        ▼
//!    report (PNG/SVG plots, self-contained report.html)        backprop (error propagation, alone)
//! ```
//!
//! 1. [`fetch`] downloads the CIFAR-10 or CIFAR-100 archive and torchvision's weights,
//!    verifies their checksums, resumes and extracts safely.
//! 2. A [`data::Dataset`] — CIFAR-10 ([`data::cifar::Cifar10`]), CIFAR-100 with its fine or
//!    coarse labels ([`data::cifar100::Cifar100`]), binary or python version, or a folder of
//!    your own images ([`data::folder::ImageFolder`], torchvision's `ImageFolder`, files
//!    decoded to Pillow's pixels by [`data::decode`]) — hands out class names, labels,
//!    images, fingerprints and content keys; [`data::split`] draws the splits a dataset
//!    lacks; [`data::transform`] reproduces torchvision's `Resize` (Pillow's bilinear, bit for
//!    bit) → `CenterCrop` → `ToTensor` → `Normalize`. The class count flows from the dataset
//!    to every later stage.
//! 3. [`backbone::weights`] loads torchvision's state dict strictly (the key list comes from
//!    [`backbone::arch::Arch`]) and folds batch norm into the convolutions;
//!    [`backbone::fast`] runs the network up to the global average pool — channels-last,
//!    fused GEMM epilogues, f32 or bf16, on the kernels an [`isa::Isa`] token allows.
//!    [`backbone::resnet`] is the straightforward candle version it is checked against.
//! 4. [`features`] runs the frozen backbone once per image and caches the features by each
//!    image's content key in fingerprinted ([`features::Fingerprint`]), checksummed, locked,
//!    resumable shards — which N processes on N machines can fill side by side
//!    ([`features::Work`]). Only this stage ever runs the ResNet.
//! 5. [`head`] and [`train`] fit the small head on cached features, sweep the L2 strength λ
//!    and keep the best checkpoint by validation, writing a run directory ([`rundir`],
//!    [`checkpoint`]).
//! 6. [`evaluate`] and [`metrics`] score a checkpoint on the test (or validation) split.
//! 7. [`report`] draws the plots and writes `report.html`.
//!
//! [`backprop`] stands apart: the first half of the assignment, error propagation through a
//! small network by the δ-rule, verified against finite differences and written out as a
//! derivation.
//!
//! ## Seams
//!
//! Three types are where the tool grows: [`data::Dataset`] (another dataset is another
//! implementation), [`backbone::arch::Arch`] (another ResNet is another constant) and
//! [`isa::Isa`] (another instruction set is another token and kernel).
//!
//! Stages talk through types and files, never globals; [`error::Error`] names the file,
//! tensor or setting behind every failure, and [`io`] makes every write atomic and locks the
//! directories a process writes into.
//!
//! ## Unsafe code
//!
//! `unsafe` is denied everywhere (`[lints]` in `Cargo.toml`) except in the SIMD kernel
//! modules — the backbone's matrix products (`backbone::fast::gemm`) and the head's AVX2
//! lanes — and every unsafe block there states why it is sound (`// SAFETY:`). Those kernels
//! run only behind a token of [`isa`] that proves the CPU has their instructions.

pub mod backbone;
pub mod backprop;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod fetch;
pub mod head;
pub mod io;
pub mod isa;
pub mod metrics;
pub mod report;
pub mod rundir;
pub mod train;

pub use error::{Error, Result};
