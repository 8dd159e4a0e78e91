//! The backbone fixtures of `tools/gen_backbone_fixtures.py` and how they are compared, shared
//! by the backbone tests (`tests/backbone.rs`, `tests/fast_backbone.rs`,
//! `tests/arch_parity.rs`), which include this file on its own (`#[path]`) so the other test
//! crates do not compile it.

use std::path::{Path, PathBuf};

/// `tests/fixtures/backbone/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/backbone")
        .join(name)
}

/// A fixture of raw little-endian f32 values.
pub fn read_f32(name: &str) -> Vec<f32> {
    std::fs::read(fixture(name))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Largest |ours − theirs| relative to the largest |theirs|.
pub fn max_rel_err(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}
