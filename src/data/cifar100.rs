//! CIFAR-100: 100 classes (fine labels) grouped into 20 superclasses (coarse labels), read
//! by the CIFAR-10 readers of [`crate::data::cifar`].
//!
//! CIFAR-100 (Krizhevsky, 2009, <https://www.cs.toronto.edu/~kriz/cifar.html>) has the
//! same 32×32 images and the same two layouts as CIFAR-10, with one training and one test
//! file and two labels per image:
//!
//! - the **binary version**, `cifar-100-binary/`: `train.bin` (50,000 images) and
//!   `test.bin` (10,000), each a run of 3,074-byte records — the coarse label byte, the fine
//!   label byte, then the R, G and B planes —, plus `coarse_label_names.txt` and
//!   `fine_label_names.txt`, one class name per line;
//! - the **python version**, `cifar-100-python/` (torchvision's `CIFAR100(download=True)`):
//!   `train` and `test`, pickled dicts with `b'data'` (`uint8` `[N, 3072]`),
//!   `b'fine_labels'` and `b'coarse_labels'` (lists of ints), and `meta`, a pickled dict
//!   with `b'fine_label_names'` and `b'coarse_label_names'`.
//!
//! [`Cifar100::open`] chooses the labels ([`LabelKind::Fine`]: 100 classes, or
//! [`LabelKind::Coarse`]: 20 superclasses); the class names come from the dataset's own
//! name files and must number 100 or 20. Both labels of every record read are checked.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::data::cifar::{
    self, CifarPart, IMAGE_BYTES, LabelField, Layout, Parts, Spec, locate_spec,
};
use crate::data::{Dataset, Image, Part};
use crate::error::{Error, Result};

/// Directory name of the binary version.
pub const BIN_DIR: &str = "cifar-100-binary";

/// Directory name of the python version.
pub const PY_DIR: &str = "cifar-100-python";

/// Bytes of one binary-version record: the coarse and the fine label byte, then the image.
pub const RECORD_BYTES: usize = 2 + IMAGE_BYTES;

/// Number of fine classes.
pub const FINE_CLASSES: usize = 100;

/// Number of coarse classes (superclasses).
pub const COARSE_CLASSES: usize = 20;

/// Which of CIFAR-100's two labels a dataset hands out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelKind {
    /// The 100 classes (`fine_labels`).
    #[default]
    Fine,
    /// The 20 superclasses (`coarse_labels`).
    Coarse,
}

impl LabelKind {
    /// The lowercase name, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            LabelKind::Fine => "fine",
            LabelKind::Coarse => "coarse",
        }
    }

    /// The number of classes of this kind (100 or 20).
    pub fn classes(self) -> usize {
        self.field().classes
    }

    /// The position of this label among a record's label bytes (coarse first).
    fn index(self) -> usize {
        match self {
            LabelKind::Coarse => 0,
            LabelKind::Fine => 1,
        }
    }

    fn field(self) -> &'static LabelField {
        &SPEC.labels[self.index()]
    }
}

impl fmt::Display for LabelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LabelKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fine" => Ok(LabelKind::Fine),
            "coarse" => Ok(LabelKind::Coarse),
            other => Err(Error::invalid(
                "labels",
                format!("expected `fine` or `coarse`, got `{other}`"),
            )),
        }
    }
}

/// CIFAR-100's files: one training and one test file; coarse then fine label per image.
pub(crate) static SPEC: Spec = Spec {
    name: "CIFAR-100",
    bin_dir: BIN_DIR,
    py_dir: PY_DIR,
    train: &["train"],
    test: &["test"],
    py_meta: "meta",
    labels: &[
        LabelField {
            name: "coarse label",
            what: "CIFAR-100 coarse class id",
            key: "coarse_labels",
            names_txt: "coarse_label_names.txt",
            names_key: "coarse_label_names",
            classes: COARSE_CLASSES,
        },
        LabelField {
            name: "fine label",
            what: "CIFAR-100 fine class id",
            key: "fine_labels",
            names_txt: "fine_label_names.txt",
            names_key: "fine_label_names",
            classes: FINE_CLASSES,
        },
    ],
    layout_help: "expected a directory containing cifar-100-binary/ (train.bin, test.bin, \
        coarse_label_names.txt, fine_label_names.txt) or cifar-100-python/ (train, test, \
        meta), or one of those directories itself",
};

/// Finds the CIFAR-100 files under `data_dir`: it may contain `cifar-100-binary/` or
/// `cifar-100-python/` (the binary version is preferred when both exist), or be one of
/// those directories itself.
pub fn locate(data_dir: &Path) -> Result<Layout> {
    locate_spec(data_dir, &SPEC)
}

/// The batch file of `part` under `data_dir` (`train.bin` / `test.bin`, or `train` /
/// `test`), as a one-element list; errors name a missing file and the expected layout.
pub fn part_files(data_dir: &Path, part: Part) -> Result<Vec<PathBuf>> {
    cifar::part_files_spec(data_dir, &SPEC, part)
}

/// Reads the first `limit` images (all when `None`) of `part` with the `labels` chosen, in
/// dataset order. Both labels of every record read are checked; class names are not read.
pub fn load_part(
    data_dir: &Path,
    part: Part,
    labels: LabelKind,
    limit: Option<usize>,
) -> Result<CifarPart> {
    cifar::load_part_spec(data_dir, &SPEC, part, labels.index(), true, limit)
}

/// The class names of `labels` in label order, from `fine_label_names.txt` /
/// `coarse_label_names.txt` or the python version's `meta`. Errors when the file is missing,
/// or its names are not exactly 100 (20) distinct, non-empty names.
pub fn class_names(data_dir: &Path, labels: LabelKind) -> Result<Vec<String>> {
    let layout = locate(data_dir)?;
    let field = labels.field();
    let Some((path, names)) = cifar::read_class_names(&layout, field)? else {
        return Err(Error::format(
            layout.names_path(field),
            format!(
                "the CIFAR-100 {labels} class names are missing: the {} version needs this \
                 file in {}",
                match layout.format {
                    cifar::Format::Binary => "binary",
                    cifar::Format::Python => "python",
                },
                layout.dir.display()
            ),
        ));
    };
    let expected = field.classes;
    if names.len() != expected {
        return Err(Error::format(
            &path,
            format!(
                "holds {} {labels} class names; CIFAR-100 has {expected}",
                names.len()
            ),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(Error::format(
                &path,
                format!("{labels} class name {i} is empty"),
            ));
        }
        if let Some(j) = names[..i].iter().position(|n| n == name) {
            return Err(Error::format(
                &path,
                format!("{labels} class names {j} and {i} are both `{name}`"),
            ));
        }
    }
    Ok(names)
}

/// CIFAR-100 under a data directory, as a [`Dataset`] with the fine (100 classes) or
/// coarse (20 superclasses) labels. Each part is read on first use — its batch file, both
/// labels of every record checked — and kept in memory (150 MB for the training part).
#[derive(Debug)]
pub struct Cifar100 {
    labels: LabelKind,
    classes: Vec<String>,
    parts: Parts,
}

impl Cifar100 {
    /// CIFAR-100 in `data_dir` (laid out as [`locate`] accepts), handing out `labels`. The
    /// class names are read and checked now; the batch files of a part when it is first
    /// used.
    pub fn open(data_dir: &Path, labels: LabelKind) -> Result<Self> {
        Ok(Self {
            labels,
            classes: class_names(data_dir, labels)?,
            parts: Parts::new(data_dir, &SPEC, labels.index()),
        })
    }

    /// The labels this dataset hands out.
    pub fn label_kind(&self) -> LabelKind {
        self.labels
    }

    /// The whole of `part`, read on first use.
    pub fn part(&self, part: Part) -> Result<&CifarPart> {
        self.parts.part(part)
    }
}

impl Dataset for Cifar100 {
    /// `cifar100` (fine labels) or `cifar100-coarse`.
    fn name(&self) -> &str {
        match self.labels {
            LabelKind::Fine => "cifar100",
            LabelKind::Coarse => "cifar100-coarse",
        }
    }

    fn parts(&self) -> &[Part] {
        &[Part::Train, Part::Test]
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The batch file of `part` with its sha256. The same for both label kinds: the files,
    /// and so the images and their features, are the same.
    fn fingerprint(&self, part: Part) -> Result<Vec<(String, String)>> {
        self.parts.fingerprint(part)
    }

    fn labels(&self, part: Part) -> Result<&[u8]> {
        self.parts.labels(part)
    }

    fn image(&self, part: Part, index: usize) -> Result<Image<'_>> {
        self.parts.image(part, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_kinds_round_trip_and_know_their_class_counts() {
        for k in [LabelKind::Fine, LabelKind::Coarse] {
            assert_eq!(k.to_string().parse::<LabelKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        assert_eq!(LabelKind::Fine.classes(), 100);
        assert_eq!(LabelKind::Coarse.classes(), 20);
        assert_eq!(SPEC.record_bytes(), RECORD_BYTES);
        let e = "superclass".parse::<LabelKind>().unwrap_err().to_string();
        assert!(e.contains("superclass") && e.contains("labels"), "{e}");
    }
}
