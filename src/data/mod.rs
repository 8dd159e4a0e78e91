//! Getting images into tensors: the [`Dataset`] seam, the CIFAR-10 readers, the seeded split
//! and the preprocessing (downloading is [`crate::fetch`]).
//!
//! Everything downstream of this module asks a [`Dataset`] for what it needs — the class
//! names, a part's labels and images, and a fingerprint of the part's files — and never
//! names a particular dataset: the class count flows from [`Dataset::classes`] into the
//! features, the head, the metrics and the report.

use std::borrow::Cow;

use crate::error::Result;

pub mod cifar;
pub(crate) mod pickle;
pub mod transform;

pub use cifar::Part;

/// One image: `[3, height, width]` bytes, the R, G and B planes, each row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image<'a> {
    /// The planes, `3 · height · width` bytes.
    pub pixels: Cow<'a, [u8]>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// A labelled image dataset in parts, as the feature extraction reads it.
///
/// Implementations read and validate a part's files on first use, so that a bad file is
/// reported before the first image is extracted, and keep what they need to hand out images
/// one at a time.
pub trait Dataset: std::fmt::Debug + Send + Sync {
    /// A short name for messages, e.g. `cifar10`.
    fn name(&self) -> &str;

    /// The class names in label order (label `i` is `classes()[i]`); at most 256, as labels
    /// are stored in a byte.
    fn classes(&self) -> &[String];

    /// What identifies the content of `part`: (file name, sha256) of each of its files, in
    /// dataset order. A cache of the part's features is keyed by it.
    fn fingerprint(&self, part: Part) -> Result<Vec<(String, String)>>;

    /// The label of every image of `part`, in dataset order; its length is the part's size.
    fn labels(&self, part: Part) -> Result<&[u8]>;

    /// Image `index` of `part`.
    fn image(&self, part: Part, index: usize) -> Result<Image<'_>>;
}
