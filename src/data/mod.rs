//! Getting images into tensors: the [`Dataset`] seam, the CIFAR-10 and CIFAR-100 readers,
//! image folders ([`folder`], decoding files as Pillow does in [`decode`]), the splits
//! ([`split`]) and the preprocessing (downloading is [`crate::fetch`]).
//!
//! Everything downstream of this module asks a [`Dataset`] for what it needs — the class
//! names, a part's labels and images, and a fingerprint of the part's files — and never
//! names a particular dataset: the class count flows from [`Dataset::classes`] into the
//! features, the head, the metrics and the report.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod cifar;
pub mod cifar100;
pub mod decode;
pub mod folder;
pub(crate) mod pickle;
pub mod split;
pub mod transform;

/// One of a dataset's own sets of files.
///
/// CIFAR has a training and a test part; an image folder may have all three (`train/`,
/// `val/`, `test/`) or only one, from which the others are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// The training images (CIFAR-10: `data_batch_1` … `data_batch_5`; CIFAR-100: `train`).
    Train,
    /// Validation images kept apart by the dataset itself (an image folder's `val/`).
    Val,
    /// The test images (CIFAR-10: `test_batch`; CIFAR-100: `test`).
    Test,
}

impl Part {
    /// The lowercase name, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Val => "val",
            Part::Test => "test",
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Part {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Part::Train),
            "val" => Ok(Part::Val),
            "test" => Ok(Part::Test),
            other => Err(Error::invalid(
                "part",
                format!("expected `train`, `val` or `test`, got `{other}`"),
            )),
        }
    }
}

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

    /// The parts this dataset has files for, in the order train, val, test.
    fn parts(&self) -> &[Part];

    /// The class names in label order (label `i` is `classes()[i]`); at most 256, as labels
    /// are stored in a byte.
    fn classes(&self) -> &[String];

    /// What identifies the content of `part`: (file name, sha256) of each of its files, in
    /// dataset order. A cache of the part's features is keyed by it. A dataset whose
    /// features are cached by [`Dataset::image_keys`] may name its source instead (an image
    /// folder: `("folder", <its directory>)`), so that adding files keeps the cache.
    fn fingerprint(&self, part: Part) -> Result<Vec<(String, String)>>;

    /// The label of every image of `part`, in dataset order; its length is the part's size.
    fn labels(&self, part: Part) -> Result<&[u8]>;

    /// Image `index` of `part`. An image that cannot be read or decoded is an
    /// [`Error::BadImage`] naming its file, so that callers can list or skip it.
    fn image(&self, part: Part, index: usize) -> Result<Image<'_>>;

    /// A 128-bit content key per image of `part`, in dataset order: equal keys mean equal
    /// features, so the feature cache stores features by key and extracts only the images
    /// whose key it lacks. The default hashes each image's size and pixels (XXH3-128);
    /// datasets of files hash the file's bytes instead, which needs no decoding.
    fn image_keys(&self, part: Part) -> Result<Vec<u128>> {
        let n = self.labels(part)?.len();
        (0..n)
            .map(|i| {
                let image = self.image(part, i)?;
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                h.update(&(image.height as u64).to_le_bytes());
                h.update(&(image.width as u64).to_le_bytes());
                h.update(&image.pixels);
                Ok(h.digest128())
            })
            .collect()
    }
}
