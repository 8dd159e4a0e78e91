//! # cifar-finetune
//!
//! Transfer learning on CIFAR-10 with a frozen, ImageNet-pretrained ResNet-50, in Rust.
//!
//! ## The pipeline, stage by stage
//!
//! ```text
//!  download ──► data::cifar (binary / python batches) ──► data::transform (resize 224, normalise)
//!                                                              │
//!  backbone::weights (.pth / .safetensors) ──► backbone::resnet (BN folded, frozen) ──► features
//!                                                                                        │
//!                        ┌───────────────────────────────────────────────────────────────┘
//!                        ▼
//!    head (2048→32→ReLU|none→10) + train (SGD momentum, L2 λ, validation, best checkpoint, λ sweep)
//!                        │
//!                        ▼
//!    evaluate (test split: loss, accuracy, confusion matrix, classification report, probabilities)
//!                        │
//!                        ▼
//!    report (PNG/SVG plots, self-contained report.html)        backprop (error propagation, alone)
//! ```
//!
//! 1. [`fetch`] fetches the CIFAR-10 archive and torchvision's weights, verifies
//!    their checksums and extracts safely.
//! 2. [`data::cifar`] reads CIFAR-10 (binary or python version) and makes the seeded
//!    train/validation split; [`data::transform`] reproduces torchvision's
//!    `Resize(224)` (PIL bilinear) → `ToTensor` → `Normalize` exactly.
//! 3. [`backbone::weights`] loads torchvision's ResNet-50 state dict strictly and folds batch
//!    norm into the convolutions; [`backbone::fast`] runs it up to the global average pool
//!    (channels-last, fused GEMM epilogues, f32 or bf16), and [`backbone::resnet`] is the
//!    straightforward candle version it is checked against.
//! 4. [`features`] runs the frozen backbone once per image and caches the 2048-d features in
//!    fingerprinted, resumable shards. Only this stage ever runs the ResNet.
//! 5. [`head`], [`train`] and [`checkpoint`] fit the small head on cached features, sweep the
//!    L2 strength λ and keep the best checkpoint by validation.
//! 6. [`evaluate`] and [`metrics`] score a checkpoint on the test split — the only stage that
//!    reads it.
//! 7. [`report`] draws the plots and writes `report.html`.
//!
//! [`backprop`] stands apart: the first half of the assignment, error propagation through a
//! small network by the δ-rule, verified against finite differences.
//!
//! Stages talk through types and files, never globals; [`error::Error`] names the file, tensor
//! or flag behind every failure, and [`io`] makes every write atomic.
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
