//! CIFAR-10 readers (binary and python versions) and the seeded train/validation split.
//!
//! CIFAR-10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009,
//! <https://www.cs.toronto.edu/~kriz/cifar.html>) ships in two layouts that hold the same
//! 60,000 images:
//!
//! - the **binary version**, `cifar-10-batches-bin/`: `data_batch_1.bin` … `data_batch_5.bin`
//!   and `test_batch.bin`, each a run of 3,073-byte records (1 label byte, then the R, G and B
//!   planes of a 32×32 image, row-major), plus `batches.meta.txt` with the class names;
//! - the **python version**, `cifar-10-batches-py/`, the one torchvision's
//!   `CIFAR10(download=True)` leaves behind: `data_batch_1` … `data_batch_5`, `test_batch`
//!   and `batches.meta`, each a pickled dict whose `b'data'` is a numpy `uint8` array
//!   `[N, 3072]` in the same R, G, B plane order and whose `b'labels'` is a list of ints.
//!
//! Both decode to a [`CifarPart`]: images `[n, 3, 32, 32]` and labels, in dataset order. The
//! pickles are read by a small, safe reader (`data::pickle`) that
//! executes nothing: it knows the handful of opcodes and the few numpy constructors such
//! files use, and rejects everything else with an error naming the file.
//!
//! The readers are shared with CIFAR-100 ([`crate::data::cifar100`]), whose files differ
//! only in names and in carrying two labels per image: a `Spec` describes each dataset's
//! files, and the readers take it as a parameter.
//!
//! The 50,000 training images are split into train and validation by [`split_indices`]
//! (seeded Fisher–Yates over ChaCha8, identical on every platform); the test part is read
//! only by evaluation.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use crate::data::Part;
use crate::data::{Dataset, Image, pickle};
use crate::error::{Error, Result};

/// CIFAR-10's class names, in label order (label `i` is `CLASSES[i]`).
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// [`CLASSES`] as owned strings.
pub fn class_names() -> Vec<String> {
    CLASSES.iter().map(|c| c.to_string()).collect()
}

/// Height and width of a CIFAR-10 image.
pub const SIDE: usize = 32;

/// Bytes of one image: 3 channel planes of 32×32.
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;

/// Bytes of one binary-version record: the label byte then the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// Default size of the validation split carved out of the 50,000 training images.
pub const DEFAULT_VAL_COUNT: usize = 5000;

/// Directory name of the binary version.
pub const BIN_DIR: &str = "cifar-10-batches-bin";

/// Directory name of the python version.
pub const PY_DIR: &str = "cifar-10-batches-py";

/// One CIFAR distribution's file names and record layout. The readers of this module are
/// shared by CIFAR-10 ([`CIFAR10`]) and CIFAR-100 (`data::cifar100`), which differ only in
/// what this describes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    /// The dataset's name in messages, e.g. `CIFAR-10`.
    pub(crate) name: &'static str,
    /// Directory of the binary version.
    pub(crate) bin_dir: &'static str,
    /// Directory of the python version.
    pub(crate) py_dir: &'static str,
    /// Batch file stems of the training part, in dataset order (binary files add `.bin`).
    pub(crate) train: &'static [&'static str],
    /// Batch file stems of the test part.
    pub(crate) test: &'static [&'static str],
    /// The python version's pickle of class names.
    pub(crate) py_meta: &'static str,
    /// The labels of each image, in the order of a binary record's leading label bytes.
    pub(crate) labels: &'static [LabelField],
    /// The expected layout, spelled out for error messages.
    pub(crate) layout_help: &'static str,
}

/// One label every image of a CIFAR distribution carries (CIFAR-100 has two: coarse, fine).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LabelField {
    /// The label in messages: `label`, `fine label`.
    pub(crate) name: &'static str,
    /// What a valid value is, in messages: `CIFAR-10 class id`.
    pub(crate) what: &'static str,
    /// The python batch's list of these labels.
    pub(crate) key: &'static str,
    /// The binary version's file of class names, one per line.
    pub(crate) names_txt: &'static str,
    /// The python meta pickle's list of class names.
    pub(crate) names_key: &'static str,
    /// Number of classes: valid labels are `0..classes`.
    pub(crate) classes: usize,
}

impl Spec {
    /// Bytes of one binary-version record: the label bytes, then the image.
    pub(crate) fn record_bytes(&self) -> usize {
        self.labels.len() + IMAGE_BYTES
    }

    /// Batch file stems of `part`, in dataset order; CIFAR has no validation files.
    fn stems(&self, part: Part) -> &'static [&'static str] {
        match part {
            Part::Train => self.train,
            Part::Val => &[],
            Part::Test => self.test,
        }
    }
}

/// CIFAR-10's files: five training batches and a test batch, one label per image.
pub(crate) static CIFAR10: Spec = Spec {
    name: "CIFAR-10",
    bin_dir: BIN_DIR,
    py_dir: PY_DIR,
    train: &[
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
    ],
    test: &["test_batch"],
    py_meta: "batches.meta",
    labels: &[LabelField {
        name: "label",
        what: "CIFAR-10 class id",
        key: "labels",
        names_txt: "batches.meta.txt",
        names_key: "label_names",
        classes: CLASSES.len(),
    }],
    layout_help: "expected a directory containing cifar-10-batches-bin/ \
        (data_batch_1.bin … data_batch_5.bin, test_batch.bin) or cifar-10-batches-py/ \
        (data_batch_1 … data_batch_5, test_batch), or one of those directories itself",
};

/// What a user asks for: train and val are a seeded split of [`Part::Train`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training images left after the validation images are taken out.
    Train,
    /// The validation images, drawn from the training part by [`split_indices`].
    Val,
    /// The test part; only evaluation reads it.
    Test,
}

impl Split {
    /// The CIFAR-10 part this split is drawn from.
    pub fn part(self) -> Part {
        match self {
            Split::Train | Split::Val => Part::Train,
            Split::Test => Part::Test,
        }
    }

    /// The lowercase name, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "val" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(Error::invalid(
                "split",
                format!("expected `train`, `val` or `test`, got `{other}`"),
            )),
        }
    }
}

/// Which of the two distributions (binary or python version) a CIFAR directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `cifar-10-batches-bin/` (`cifar-100-binary/`): raw records, label bytes then pixels.
    Binary,
    /// `cifar-10-batches-py/` (`cifar-100-python/`): pickled dicts with numpy arrays.
    Python,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Binary => "binary",
            Format::Python => "python",
        }
    }
}

/// Where the batch files of a data directory are, and in which format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The directory holding the batch files themselves.
    pub dir: PathBuf,
    /// The format of those files.
    pub format: Format,
    /// Which CIFAR these files are.
    spec: &'static Spec,
}

impl Layout {
    /// The batch files of `part` in this layout, in dataset order (existence not checked).
    pub fn batch_paths(&self, part: Part) -> Vec<PathBuf> {
        self.spec
            .stems(part)
            .iter()
            .map(|stem| match self.format {
                Format::Binary => self.dir.join(format!("{stem}.bin")),
                Format::Python => self.dir.join(stem),
            })
            .collect()
    }

    /// The class-name file of this layout (CIFAR-10: `batches.meta.txt` or `batches.meta`).
    pub fn meta_path(&self) -> PathBuf {
        self.names_path(&self.spec.labels[0])
    }

    /// The file holding the class names of `field`: the binary version's text file, or
    /// the python version's meta pickle.
    pub(crate) fn names_path(&self, field: &LabelField) -> PathBuf {
        match self.format {
            Format::Binary => self.dir.join(field.names_txt),
            Format::Python => self.dir.join(self.spec.py_meta),
        }
    }
}

/// Finds the CIFAR-10 files under `data_dir`.
///
/// `data_dir` may contain `cifar-10-batches-bin/` or `cifar-10-batches-py/` (the binary
/// version is preferred when both exist), or be one of those directories itself.
pub fn locate(data_dir: &Path) -> Result<Layout> {
    locate_spec(data_dir, &CIFAR10)
}

/// [`locate`] for any CIFAR distribution.
pub(crate) fn locate_spec(data_dir: &Path, spec: &'static Spec) -> Result<Layout> {
    let layout = |dir: PathBuf, format| Layout { dir, format, spec };
    if !data_dir.is_dir() {
        return Err(Error::format(
            data_dir,
            format!(
                "{} data directory does not exist or is not a directory; {}",
                spec.name, spec.layout_help
            ),
        ));
    }
    let bin = data_dir.join(spec.bin_dir);
    if bin.is_dir() {
        return Ok(layout(bin, Format::Binary));
    }
    let py = data_dir.join(spec.py_dir);
    if py.is_dir() {
        return Ok(layout(py, Format::Python));
    }
    // The directory itself may be one of the two: recognise it by name or by content (the
    // first training and the test batch, the python meta file).
    let name = data_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let has = |f: &str| data_dir.join(f).is_file();
    let firsts = [spec.train[0], spec.test[0]];
    if name == spec.bin_dir || firsts.iter().any(|s| has(&format!("{s}.bin"))) {
        return Ok(layout(data_dir.to_path_buf(), Format::Binary));
    }
    if name == spec.py_dir || firsts.iter().any(|s| has(s)) || has(spec.py_meta) {
        return Ok(layout(data_dir.to_path_buf(), Format::Python));
    }
    Err(Error::format(
        data_dir,
        format!("no {} data found; {}", spec.name, spec.layout_help),
    ))
}

/// The batch files of `part` under `data_dir`, in dataset order.
///
/// Errors name the first missing file and the expected layout.
pub fn part_files(data_dir: &Path, part: Part) -> Result<Vec<PathBuf>> {
    part_files_spec(data_dir, &CIFAR10, part)
}

/// [`part_files`] for any CIFAR distribution.
pub(crate) fn part_files_spec(
    data_dir: &Path,
    spec: &'static Spec,
    part: Part,
) -> Result<Vec<PathBuf>> {
    if spec.stems(part).is_empty() {
        return Err(no_such_part(spec, part));
    }
    let layout = locate_spec(data_dir, spec)?;
    let paths = layout.batch_paths(part);
    for p in &paths {
        if !p.is_file() {
            let names: Vec<String> = paths
                .iter()
                .filter_map(|q| q.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            return Err(Error::format(
                p,
                format!(
                    "{} batch file is missing: the {} part of the {} version needs {} in {}",
                    spec.name,
                    part,
                    layout.format.as_str(),
                    names.join(", "),
                    layout.dir.display()
                ),
            ));
        }
    }
    Ok(paths)
}

/// The error for a part a CIFAR dataset does not have (its validation images are drawn
/// from the training part).
fn no_such_part(spec: &Spec, part: Part) -> Error {
    Error::invalid(
        "part",
        format!(
            "{} has no {part} files: only train and test (validation images are drawn from train)",
            spec.name
        ),
    )
}

/// The training and test parts of a CIFAR directory, each read on first use — all of its
/// batch files, every label checked — and kept in memory (150 MB for a training part), so
/// that images are handed out without copying; labels asked for before any image are read
/// and kept alone. [`Cifar10`] and `Cifar100` are this plus their class names.
#[derive(Debug)]
pub(crate) struct Parts {
    data_dir: PathBuf,
    spec: &'static Spec,
    /// The label kept: an index into `spec.labels`.
    field: usize,
    /// The training and the test part, once read.
    parts: [OnceLock<CifarPart>; 2],
    /// Their labels alone, when they were asked for before the images.
    labels: [OnceLock<CifarPart>; 2],
}

impl Parts {
    pub(crate) fn new(data_dir: &Path, spec: &'static Spec, field: usize) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            spec,
            field,
            parts: Default::default(),
            labels: Default::default(),
        }
    }

    /// The slot of `part` in `parts` or `labels`.
    fn slot(&self, part: Part) -> Result<usize> {
        match part {
            Part::Train => Ok(0),
            Part::Test => Ok(1),
            Part::Val => Err(no_such_part(self.spec, part)),
        }
    }

    /// The whole of `part`, read on first use.
    pub(crate) fn part(&self, part: Part) -> Result<&CifarPart> {
        let slot = &self.parts[self.slot(part)?];
        if let Some(p) = slot.get() {
            return Ok(p);
        }
        let loaded = load_part_spec(&self.data_dir, self.spec, part, self.field, true, None)?;
        Ok(slot.get_or_init(|| loaded))
    }

    /// [`Dataset::labels`]: the labels of `part`, without keeping its images when they have
    /// not been read yet (a split plan, or features all in the cache, need only the labels:
    /// 50,000 bytes where the images are 150 MB).
    pub(crate) fn labels(&self, part: Part) -> Result<&[u8]> {
        let i = self.slot(part)?;
        if let Some(p) = self.parts[i].get() {
            return Ok(&p.labels);
        }
        if let Some(p) = self.labels[i].get() {
            return Ok(&p.labels);
        }
        let loaded = load_part_spec(&self.data_dir, self.spec, part, self.field, false, None)?;
        Ok(&self.labels[i].get_or_init(|| loaded).labels)
    }

    /// [`Dataset::fingerprint`]: the name and sha256 of each batch file of `part`.
    pub(crate) fn fingerprint(&self, part: Part) -> Result<Vec<(String, String)>> {
        part_files_spec(&self.data_dir, self.spec, part)?
            .iter()
            .map(|f| {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok((name, crate::io::sha256_file(f)?))
            })
            .collect()
    }

    /// [`Dataset::image`]: image `index` of `part`, borrowed.
    pub(crate) fn image(&self, part: Part, index: usize) -> Result<Image<'_>> {
        let p = self.part(part)?;
        if index >= p.len() {
            return Err(Error::invalid(
                "image index",
                format!(
                    "{index} is out of range for the {part} part of {} images",
                    p.len()
                ),
            ));
        }
        Ok(Image {
            pixels: Cow::Borrowed(p.image(index)),
            height: SIDE,
            width: SIDE,
        })
    }
}

/// CIFAR-10 under a data directory, as a [`Dataset`]: each part is read on first use — all
/// of its batch files, every label checked — and kept in memory (150 MB for the training
/// part), so that images are handed out without copying; its labels alone when no image
/// has been asked for (a split plan, features all cached).
#[derive(Debug)]
pub struct Cifar10 {
    classes: Vec<String>,
    parts: Parts,
}

impl Cifar10 {
    /// CIFAR-10 in `data_dir` (laid out as [`locate`] accepts). The class-name file is
    /// checked now; the batch files of a part when it is first used.
    pub fn open(data_dir: &Path) -> Result<Self> {
        check_meta(&locate(data_dir)?)?;
        Ok(Self {
            classes: class_names(),
            parts: Parts::new(data_dir, &CIFAR10, 0),
        })
    }

    /// The whole of `part`, read on first use.
    pub fn part(&self, part: Part) -> Result<&CifarPart> {
        self.parts.part(part)
    }
}

impl Dataset for Cifar10 {
    fn name(&self) -> &str {
        "cifar10"
    }

    fn parts(&self) -> &[Part] {
        &[Part::Train, Part::Test]
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

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

/// Images and labels of (a prefix of) one CIFAR part, in dataset order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CifarPart {
    /// `[n, 3, 32, 32]`: per image the R, G and B planes, each row-major.
    pub images: Vec<u8>,
    /// `[n]`, class ids (CIFAR-10: 0..=9, see [`CLASSES`]; CIFAR-100: the fine or coarse
    /// label chosen).
    pub labels: Vec<u8>,
    /// The batch files read, in order.
    pub files: Vec<PathBuf>,
}

impl CifarPart {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` as `[3, 32, 32]` bytes. Panics if `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// The images at `indices` (positions in this part), in that order.
    ///
    /// Errors if an index is out of range.
    pub fn select(&self, indices: &[usize]) -> Result<CifarPart> {
        let mut images = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::invalid(
                    "image index",
                    format!("{i} is out of range for a part of {} images", self.len()),
                ));
            }
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Ok(CifarPart {
            images,
            labels,
            files: self.files.clone(),
        })
    }
}

/// Reads the first `limit` images (all when `None`) of `part`, in dataset order.
///
/// Only the batch files needed for `limit` images are opened. The class-name file
/// (`batches.meta.txt` / `batches.meta`) is checked when present.
pub fn load_part(data_dir: &Path, part: Part, limit: Option<usize>) -> Result<CifarPart> {
    check_meta(&locate(data_dir)?)?;
    load_part_spec(data_dir, &CIFAR10, part, 0, true, limit)
}

/// [`load_part`] for any CIFAR distribution, keeping label `field` (an index into
/// `spec.labels`; every label of every record read is checked), and the images only when
/// `images` is set. Class names are not read.
pub(crate) fn load_part_spec(
    data_dir: &Path,
    spec: &'static Spec,
    part: Part,
    field: usize,
    images: bool,
    limit: Option<usize>,
) -> Result<CifarPart> {
    let layout = locate_spec(data_dir, spec)?;
    let paths = part_files_spec(data_dir, spec, part)?;
    let mut out = CifarPart {
        images: Vec::new(),
        labels: Vec::new(),
        files: Vec::new(),
    };
    for path in paths {
        let remaining = match limit {
            Some(l) if out.len() >= l => break,
            Some(l) => Some(l - out.len()),
            None => None,
        };
        let (keep, out) = ((field, images), &mut out);
        match layout.format {
            Format::Binary => read_binary_batch(&path, spec, keep, remaining, out)?,
            Format::Python => read_python_batch(&path, spec, keep, remaining, out)?,
        }
        out.files.push(path);
    }
    Ok(out)
}

/// Records read from a binary batch file at a time (3 MB of CIFAR-10).
const READ_RECORDS: usize = 1024;

/// Appends up to `max` records of a binary batch file to `out`, keeping label `field` and,
/// if `images`, the pixels.
fn read_binary_batch(
    path: &Path,
    spec: &Spec,
    (field, images): (usize, bool),
    max: Option<usize>,
    out: &mut CifarPart,
) -> Result<()> {
    let record_bytes = spec.record_bytes();
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("reading the size of", path, e))?
        .len();
    if len == 0 {
        return Err(Error::format(
            path,
            format!(
                "{} binary batch file is empty (expected {record_bytes}-byte records)",
                spec.name
            ),
        ));
    }
    let rem = len % record_bytes as u64;
    if rem != 0 {
        let label_bytes = match spec.labels.len() {
            1 => "1 label byte".to_string(),
            n => format!("{n} label bytes"),
        };
        return Err(Error::format(
            path,
            format!(
                "{} binary batch file is truncated or not a batch file: its length {len} \
                 bytes is not a multiple of the {record_bytes}-byte record ({label_bytes} + \
                 {IMAGE_BYTES} pixel bytes): {} whole records and {rem} bytes left over",
                spec.name,
                len / record_bytes as u64
            ),
        ));
    }
    let count = usize::try_from(len / record_bytes as u64)
        .map_err(|_| Error::format(path, format!("file of {len} bytes is too large")))?;
    let take = max.map_or(count, |m| m.min(count));
    out.images
        .reserve(if images { take * IMAGE_BYTES } else { 0 });
    out.labels.reserve(take);
    let n_labels = spec.labels.len();
    // Read a few MB at a time: the pixels are copied out anyway (or not kept at all), so
    // the whole file need not be in memory at once.
    let mut buf = vec![0u8; take.min(READ_RECORDS) * record_bytes];
    let mut reader = (&file).take((take * record_bytes) as u64);
    for start in (0..take).step_by(READ_RECORDS) {
        let chunk = &mut buf[..(take - start).min(READ_RECORDS) * record_bytes];
        reader
            .read_exact(chunk)
            .map_err(|e| Error::io("reading", path, e))?;
        for (j, record) in chunk.chunks_exact(record_bytes).enumerate() {
            for (f, &label) in spec.labels.iter().zip(&record[..n_labels]) {
                check_label(path, f, start + j, i64::from(label))?;
            }
            out.labels.push(record[field]);
            if images {
                out.images.extend_from_slice(&record[n_labels..]);
            }
        }
    }
    Ok(())
}

/// Errors unless `label` is a class id of `field`, naming the file and the record.
fn check_label(path: &Path, field: &LabelField, record: usize, label: i64) -> Result<()> {
    if (0..field.classes as i64).contains(&label) {
        Ok(())
    } else {
        Err(Error::format(
            path,
            format!(
                "record {record}: {} {label} is not a {} (expected 0..={})",
                field.name,
                field.what,
                field.classes - 1
            ),
        ))
    }
}

/// Appends up to `max` images of a python-version batch file to `out`, keeping label
/// `field` and, if `images`, the pixels.
fn read_python_batch(
    path: &Path,
    spec: &Spec,
    (field, images): (usize, bool),
    max: Option<usize>,
    out: &mut CifarPart,
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let bad = |msg: String| {
        Error::format(
            path,
            format!(
                "not a valid {} python batch (pickled dict): {msg}",
                spec.name
            ),
        )
    };
    let root = pickle::parse(&bytes).map_err(bad)?;
    let data = root
        .dict_get("data")
        .map_err(bad)?
        .ok_or_else(|| bad("the dict has no `data` entry".into()))?;
    let (shape, pixels) = data
        .as_u8_array()
        .map_err(|m| bad(format!("`data`: {m}")))?;
    if shape.len() != 2 || shape[1] != IMAGE_BYTES {
        return Err(bad(format!(
            "`data` has shape {shape:?}, expected [N, {IMAGE_BYTES}]"
        )));
    }
    let take = max.map_or(shape[0], |m| m.min(shape[0]));
    let mut kept = Vec::new();
    for (f, label_field) in spec.labels.iter().enumerate() {
        let key = label_field.key;
        let labels = root
            .dict_get(key)
            .map_err(bad)?
            .ok_or_else(|| bad(format!("the dict has no `{key}` entry")))?
            .as_int_list()
            .map_err(|m| bad(format!("`{key}`: {m}")))?;
        if labels.len() != shape[0] {
            return Err(bad(format!(
                "`data` has {} images but `{key}` has {} entries",
                shape[0],
                labels.len()
            )));
        }
        for (i, &label) in labels[..take].iter().enumerate() {
            check_label(path, label_field, i, label)?;
        }
        if f == field {
            kept = labels;
        }
    }
    // In range 0..classes (≤ 256) after the checks, so the narrowing is exact.
    out.labels.extend(kept[..take].iter().map(|&l| l as u8));
    if images {
        out.images.extend_from_slice(&pixels[..take * IMAGE_BYTES]);
    }
    Ok(())
}

/// The class names of label `field` in the layout's names file, with that file; `None`
/// when the file does not exist.
pub(crate) fn read_class_names(
    layout: &Layout,
    field: &LabelField,
) -> Result<Option<(PathBuf, Vec<String>)>> {
    let path = layout.names_path(field);
    if !path.is_file() {
        return Ok(None);
    }
    let names: Vec<String> = match layout.format {
        Format::Binary => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        }
        Format::Python => {
            let bytes = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bad = |msg: String| {
                Error::format(
                    &path,
                    format!("not a valid {} {file} pickle: {msg}", layout.spec.name),
                )
            };
            let root = pickle::parse(&bytes).map_err(bad)?;
            let key = field.names_key;
            root.dict_get(key)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("the dict has no `{key}` entry")))?
                .as_text_list()
                .map_err(|m| bad(format!("`{key}`: {m}")))?
        }
    };
    Ok(Some((path, names)))
}

/// Checks the class names in a CIFAR-10 layout's meta file, when there is one.
fn check_meta(layout: &Layout) -> Result<()> {
    let Some((path, names)) = read_class_names(layout, &CIFAR10.labels[0])? else {
        return Ok(());
    };
    if names != CLASSES {
        return Err(Error::format(
            &path,
            format!(
                "class names {names:?} differ from CIFAR-10's {CLASSES:?}; this is not \
                 CIFAR-10 (CIFAR-100 belongs in cifar-100-binary/ or cifar-100-python/)"
            ),
        ));
    }
    Ok(())
}

/// Splits `0..n` into (train, validation) index lists, each sorted ascending.
///
/// The permutation is a Fisher–Yates shuffle driven by `ChaCha8Rng::seed_from_u64(seed)`,
/// drawing each swap position as a `u64` so that the split is the same on every platform;
/// the first `val_count` positions of the permutation form the validation set.
pub fn split_indices(n: usize, val_count: usize, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if val_count > n {
        return Err(Error::invalid(
            "validation count",
            format!("{val_count} validation images requested but only {n} training images"),
        ));
    }
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i as u64) as usize;
        perm.swap(i, j);
    }
    let mut val = perm[..val_count].to_vec();
    let mut train = perm[val_count..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((train, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_part_names_round_trip() {
        for s in [Split::Train, Split::Val, Split::Test] {
            assert_eq!(s.to_string().parse::<Split>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(Split::Val.part(), Part::Train);
        assert_eq!(Split::Test.part(), Part::Test);
        for p in [Part::Train, Part::Test] {
            assert_eq!(p.to_string().parse::<Part>().unwrap(), p);
        }
        let e = "validation".parse::<Split>().unwrap_err().to_string();
        assert!(e.contains("validation") && e.contains("split"), "{e}");
    }

    #[test]
    fn split_sizes_and_errors() {
        let (t, v) = split_indices(10, 3, 1).unwrap();
        assert_eq!((t.len(), v.len()), (7, 3));
        let (t, v) = split_indices(0, 0, 1).unwrap();
        assert!(t.is_empty() && v.is_empty());
        let (t, v) = split_indices(5, 5, 1).unwrap();
        assert!(t.is_empty() && v == vec![0, 1, 2, 3, 4]);
        assert!(split_indices(5, 6, 1).is_err());
    }

    /// Labels asked for first are read without the images (binary and python batches
    /// alike), equal those of the whole part, and give way to it once images are read.
    #[test]
    fn labels_alone_keep_no_images() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar");
        for dir in ["cifar-10-batches-bin", "cifar-10-batches-py"] {
            let data = tempfile::tempdir().unwrap();
            let to = data.path().join(dir);
            std::fs::create_dir(&to).unwrap();
            for e in std::fs::read_dir(fixtures.join(dir)).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
            }
            let whole = load_part(data.path(), Part::Train, None).unwrap();
            let cifar = Cifar10::open(data.path()).unwrap();
            assert_eq!(cifar.labels(Part::Train).unwrap(), whole.labels, "{dir}");
            let alone = cifar.parts.labels[0].get().unwrap();
            assert!(alone.images.is_empty() && cifar.parts.parts[0].get().is_none());
            assert_eq!(alone.files, whole.files, "{dir}");
            // Images are read whole when first needed; the labels then come from them.
            let last = whole.len() - 1;
            assert_eq!(
                *cifar.image(Part::Train, last).unwrap().pixels,
                *whole.image(last)
            );
            assert_eq!(cifar.labels(Part::Train).unwrap(), whole.labels, "{dir}");
            assert!(cifar.parts.parts[0].get().is_some());
            // The test part is untouched.
            assert!(cifar.parts.labels[1].get().is_none() && cifar.parts.parts[1].get().is_none());
        }
    }

    /// A batch read in several chunks gives every record, and names a bad label by its
    /// record number in the file.
    #[test]
    fn large_batches_are_read_in_chunks() {
        let n = 2 * READ_RECORDS + 100;
        let record = |i: usize| {
            let mut r = vec![(i % 10) as u8];
            r.extend((0..IMAGE_BYTES).map(|p| (i * 7 + p) as u8));
            r
        };
        let data = tempfile::tempdir().unwrap();
        let bin = data.path().join(BIN_DIR);
        std::fs::create_dir(&bin).unwrap();
        let mut bytes: Vec<u8> = (0..n).flat_map(record).collect();
        std::fs::write(bin.join("test_batch.bin"), &bytes).unwrap();
        for limit in [None, Some(READ_RECORDS + 1)] {
            let part = load_part(data.path(), Part::Test, limit).unwrap();
            let want = limit.unwrap_or(n);
            assert_eq!(part.len(), want);
            for i in [0, READ_RECORDS - 1, READ_RECORDS, want - 1] {
                assert_eq!(part.labels[i], (i % 10) as u8);
                assert_eq!(part.image(i), &record(i)[1..]);
            }
        }
        let bad = READ_RECORDS + 5;
        bytes[bad * (IMAGE_BYTES + 1)] = 10;
        std::fs::write(bin.join("test_batch.bin"), &bytes).unwrap();
        let err = load_part(data.path(), Part::Test, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("record {bad}:")), "{err}");
    }
}
