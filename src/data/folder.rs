//! Your own images: torchvision's `ImageFolder` as a [`Dataset`].
//!
//! `ROOT/<class>/**/<image>`: the classes are the sorted names of ROOT's sub-directories
//! (torchvision's `find_classes`: `os.scandir`, directories only, symbolic links followed,
//! hidden ones included), and each class's images are the files under its directory whose
//! names end with one of [`IMG_EXTENSIONS`] in any case, in the order of torchvision's
//! `make_dataset`: `sorted(os.walk(class_dir, followlinks=True))` — directories ordered by
//! their whole path as a Python string, so `sub/` comes after `sub-a/` but its files before
//! `sub/deeper/` — and the files of each directory sorted by name. Python compares strings by
//! code point, with the bytes of a name that is not UTF-8 as the lone surrogates U+DC80 …
//! U+DCFF (`surrogateescape`); [`python_order`] reproduces that.
//!
//! When ROOT has a `train/` directory, it is a split layout: `train/`, `val/` (or `valid/`)
//! and `test/` are the parts [`Part::Train`], [`Part::Val`] and [`Part::Test`], each an
//! image folder with the classes of `train/`. Otherwise the whole of ROOT is
//! [`Part::Train`], from which callers draw validation and test images.
//!
//! Every problem torchvision would raise on is an error naming the directory — no class
//! folders, a class folder without images — and so are the ones that would only surface
//! later: a single class, a class of `val/` or `test/` that `train/` lacks (or the
//! reverse), two classes whose names differ only in case, more than 256 classes (labels are
//! bytes), a class name that is not UTF-8, a directory that cannot be read (`os.walk` would
//! skip it silently) and a symbolic-link loop (which `os.walk` would follow until the path
//! is too long). Nothing is decoded up front: [`Dataset::image`] reads and decodes one file
//! ([`decode`]), so memory is bounded by what the caller holds, and a bad file is an
//! [`Error::BadImage`] naming it. [`Dataset::image_keys`] hashes each file's bytes
//! (XXH3-128), streaming, several files at a time.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::decode::{self, DecodeLimits, IMG_EXTENSIONS, has_image_extension};
use super::{Dataset, Image, Part};
use crate::error::{Error, Result};

/// The most classes a dataset may have: labels are stored in a byte.
pub const MAX_CLASSES: usize = 256;

/// How deep directories may nest under a class folder (a guard against link cycles where
/// they cannot be detected).
const MAX_DEPTH: usize = 256;

/// The files and labels of one part, in torchvision's order.
#[derive(Debug, Clone)]
struct PartFiles {
    /// The part's directory, as found (under the canonical root).
    dir: PathBuf,
    files: Vec<PathBuf>,
    labels: Vec<u8>,
}

/// An image folder (see the module docs). [`ImageFolder::open`] lists the files; images are
/// decoded one at a time, on demand.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    parts: Vec<Part>,
    data: Vec<PartFiles>,
    limits: DecodeLimits,
}

impl ImageFolder {
    /// Lists the image folder at `root` (split or single layout), checking its structure.
    pub fn open(root: &Path) -> Result<Self> {
        let root =
            std::fs::canonicalize(root).map_err(|e| Error::io("opening image folder", root, e))?;
        if !root.is_dir() {
            return Err(Error::format(
                &root,
                "not a directory; expected an image folder (ROOT/<class>/<image>)",
            ));
        }
        let train = root.join("train");
        if !train.is_dir() {
            let (classes, files) = scan_part(&root, None)?;
            return Ok(ImageFolder {
                root: root.clone(),
                classes,
                parts: vec![Part::Train],
                data: vec![files],
                limits: DecodeLimits::default(),
            });
        }
        // Split layout: train/ and optionally val/ (or valid/) and test/, nothing else.
        let mut val = None;
        for entry in read_dir_sorted(&root)? {
            let name = entry.file_name().unwrap_or_default().to_owned();
            if !entry.is_dir() || name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            match name.to_str() {
                Some("train") | Some("test") => {}
                Some(v @ ("val" | "valid")) => {
                    if let Some(other) = val.replace(v.to_string()) {
                        return Err(Error::format(
                            &root,
                            format!("has both {other}/ and {v}/; keep one validation folder"),
                        ));
                    }
                }
                _ => {
                    return Err(Error::format(
                        &root,
                        format!(
                            "has train/, so it is read as a split layout (train/, val/ or valid/, \
                             test/), but it also has {}/; move it out, or point to a folder \
                             whose sub-directories are the classes",
                            name.to_string_lossy()
                        ),
                    ));
                }
            }
        }
        let (classes, train_files) = scan_part(&train, None)?;
        let mut parts = vec![Part::Train];
        let mut data = vec![train_files];
        for (part, dir) in [(Part::Val, val), (Part::Test, Some("test".to_string()))] {
            let Some(dir) = dir.map(|d| root.join(d)).filter(|d| d.is_dir()) else {
                continue;
            };
            let (_, files) = scan_part(&dir, Some((&classes, &train)))?;
            parts.push(part);
            data.push(files);
        }
        Ok(ImageFolder {
            root,
            classes,
            parts,
            data,
            limits: DecodeLimits::default(),
        })
    }

    /// The same folder decoding with other limits (the default is Pillow's
    /// decompression-bomb limit).
    pub fn with_limits(self, limits: DecodeLimits) -> Self {
        ImageFolder { limits, ..self }
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn part(&self, part: Part) -> Result<&PartFiles> {
        self.parts
            .iter()
            .position(|&p| p == part)
            .map(|i| &self.data[i])
            .ok_or_else(|| {
                Error::invalid(
                    "part",
                    format!(
                        "the image folder {} has no {part} part (it has {})",
                        self.root.display(),
                        self.parts
                            .iter()
                            .map(|p| p.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }

    /// The directory of `part`: ROOT itself in the single layout, else `ROOT/train` etc.
    pub fn dir(&self, part: Part) -> Result<&Path> {
        Ok(&self.part(part)?.dir)
    }

    /// Every image file of `part`, in dataset order (torchvision's `samples`).
    pub fn files(&self, part: Part) -> Result<&[PathBuf]> {
        Ok(&self.part(part)?.files)
    }

    /// The file of image `index` of `part`.
    pub fn path(&self, part: Part, index: usize) -> Result<&Path> {
        let files = self.files(part)?;
        files.get(index).map(PathBuf::as_path).ok_or_else(|| {
            Error::invalid(
                "image index",
                format!(
                    "{index} is out of range for the {part} part of {} images",
                    files.len()
                ),
            )
        })
    }

    /// The content key of image `index` of `part`: the XXH3-128 of the file's bytes. A file
    /// that cannot be read is an [`Error::BadImage`].
    pub fn file_key(&self, part: Part, index: usize) -> Result<u128> {
        hash_file(self.path(part, index)?)
    }
}

impl Dataset for ImageFolder {
    fn name(&self) -> &str {
        "folder"
    }

    fn parts(&self) -> &[Part] {
        &self.parts
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The part's directory, `("folder", <canonical root>/<part dir>)`, and not its file list:
    /// the feature cache keys features by each image's content ([`Dataset::image_keys`]), so
    /// adding images to a folder extracts only the new ones.
    fn fingerprint(&self, part: Part) -> Result<Vec<(String, String)>> {
        Ok(vec![(
            "folder".to_string(),
            self.dir(part)?.display().to_string(),
        )])
    }

    fn labels(&self, part: Part) -> Result<&[u8]> {
        Ok(&self.part(part)?.labels)
    }

    fn image(&self, part: Part, index: usize) -> Result<Image<'_>> {
        let path = self.path(part, index)?;
        check_regular_file(path)?;
        decode::load_with(path, self.limits)
    }

    /// A file that cannot be read gets a key that matches nothing, so that reading it is
    /// tried again at extraction, where it becomes an [`Error::BadImage`] that `--skip-bad`
    /// can skip, instead of failing the whole part here.
    fn image_keys(&self, part: Part) -> Result<Vec<u128>> {
        // A few files at a time, each streamed: memory is a buffer per worker.
        self.files(part)?
            .par_iter()
            .map(|p| match hash_file(p) {
                Err(Error::BadImage { .. }) => Ok(unmatched_key(p)),
                other => other,
            })
            .collect()
    }
}

/// Refuses what is not a regular file (a FIFO would block the reader forever, a broken link
/// cannot be opened) before opening it.
fn check_regular_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::BadImage {
            path: path.to_path_buf(),
            msg: "cannot read: not a regular file".into(),
        }),
        Err(e) => Err(Error::BadImage {
            path: path.to_path_buf(),
            msg: format!("cannot read: {e}"),
        }),
    }
}

/// A key no stored feature has: the path, the process and the time, hashed.
fn unmatched_key(path: &Path) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(b"unreadable\0");
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&now.to_le_bytes());
    h.digest128()
}

/// XXH3-128 of a file's bytes, read in 64 KiB pieces.
fn hash_file(path: &Path) -> Result<u128> {
    check_regular_file(path)?;
    let bad = |e: std::io::Error| Error::BadImage {
        path: path.to_path_buf(),
        msg: format!("cannot read: {e}"),
    };
    let mut file = std::fs::File::open(path).map_err(bad)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf).map_err(bad)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.digest128())
}

/// The sort key Python gives a file name: its code points, with each byte that is not part
/// of valid UTF-8 as the surrogate U+DC80 + (byte − 0x80) (`os.fsdecode`'s
/// `surrogateescape`). Sorting by it is `sorted()` on the names `os.walk` returns.
pub fn python_order(name: &[u8]) -> Vec<u32> {
    let mut key = Vec::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        key.extend(chunk.valid().chars().map(u32::from));
        key.extend(chunk.invalid().iter().map(|&b| 0xDC00 + u32::from(b)));
    }
    key
}

/// One directory entry: its path and whether it is a directory once links are followed
/// (`DirEntry.is_dir()`: false when the target cannot be reached).
struct Entry {
    path: PathBuf,
    dir: bool,
}

impl Entry {
    fn file_name(&self) -> Option<&OsStr> {
        self.path.file_name()
    }

    fn is_dir(&self) -> bool {
        self.dir
    }
}

/// The entries of `dir`, sorted as Python sorts their names.
fn read_dir_sorted(dir: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io("listing directory", dir, e))? {
        let e = e.map_err(|e| Error::io("listing directory", dir, e))?;
        let path = e.path();
        let is_dir = std::fs::metadata(&path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        entries.push(Entry { path, dir: is_dir });
    }
    entries
        .sort_by_cached_key(|e| python_order(e.file_name().unwrap_or_default().as_encoded_bytes()));
    Ok(entries)
}

/// `find_classes` + `make_dataset` on one part's directory. With `expected` (the train
/// part's classes and directory), the part must have exactly those classes.
fn scan_part(dir: &Path, expected: Option<(&[String], &Path)>) -> Result<(Vec<String>, PartFiles)> {
    let mut classes = Vec::new();
    for entry in read_dir_sorted(dir)?.into_iter().filter(Entry::is_dir) {
        let name = entry.file_name().unwrap_or_default();
        let Some(name) = name.to_str() else {
            return Err(Error::format(
                dir,
                format!(
                    "the class folder name {:?} is not valid UTF-8; rename it",
                    name.to_string_lossy()
                ),
            ));
        };
        classes.push(name.to_string());
    }
    // A val/ or test/ part is checked against train/'s classes (which passed the checks).
    match expected {
        None => check_classes(dir, &classes)?,
        Some((want, train)) => {
            let missing: Vec<&str> = want
                .iter()
                .filter(|c| !classes.contains(c))
                .map(String::as_str)
                .collect();
            let extra: Vec<&str> = classes
                .iter()
                .filter(|c| !want.contains(c))
                .map(String::as_str)
                .collect();
            let mut problems = Vec::new();
            if !extra.is_empty() {
                problems.push(format!(
                    "has classes that {} lacks: {}",
                    train.display(),
                    extra.join(", ")
                ));
            }
            if !missing.is_empty() {
                problems.push(format!(
                    "lacks classes of {}: {}",
                    train.display(),
                    missing.join(", ")
                ));
            }
            if !problems.is_empty() {
                return Err(Error::format(
                    dir,
                    problems.join("; ") + " (every part needs the same class folders)",
                ));
            }
        }
    }
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut empty = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let found = walk_class(&dir.join(class))?;
        if found.is_empty() {
            empty.push(class.as_str());
        }
        labels.extend(std::iter::repeat_n(label as u8, found.len()));
        files.extend(found);
    }
    if !empty.is_empty() {
        return Err(Error::format(
            dir,
            format!(
                "no image in the class folder(s) {} (torchvision's ImageFolder refuses an empty \
                 class too); supported extensions: {}",
                empty.join(", "),
                IMG_EXTENSIONS.join(", ")
            ),
        ));
    }
    Ok((
        classes,
        PartFiles {
            dir: dir.to_path_buf(),
            files,
            labels,
        },
    ))
}

/// The structural checks on a part's class names.
fn check_classes(dir: &Path, classes: &[String]) -> Result<()> {
    match classes.len() {
        0 => {
            return Err(Error::format(
                dir,
                "no class folders: an image folder holds one sub-directory per class \
                 (ROOT/<class>/<image>), or train/ (val/, test/) with those inside",
            ));
        }
        1 => {
            return Err(Error::format(
                dir,
                format!(
                    "only one class folder ({}): a classifier needs at least two",
                    classes[0]
                ),
            ));
        }
        n if n > MAX_CLASSES => {
            return Err(Error::format(
                dir,
                format!("{n} class folders, more than the {MAX_CLASSES} labels a byte can hold"),
            ));
        }
        _ => {}
    }
    let mut seen: Vec<(String, &str)> = Vec::with_capacity(classes.len());
    for c in classes {
        let lower = c.to_lowercase();
        if let Some((_, other)) = seen.iter().find(|(l, _)| *l == lower) {
            return Err(Error::format(
                dir,
                format!(
                    "the class folders {other} and {c} differ only in case; merge or rename one \
                     (they would be one folder on a case-insensitive file system)"
                ),
            ));
        }
        seen.push((lower, c));
    }
    Ok(())
}

/// The image files under one class directory in `sorted(os.walk(dir, followlinks=True))`
/// order, files of each directory sorted by name.
fn walk_class(class_dir: &Path) -> Result<Vec<PathBuf>> {
    // (the directory's path below the class folder as Python orders it, its image files)
    let mut roots: Vec<(Vec<u32>, Vec<PathBuf>)> = Vec::new();
    // (directory, path below the class folder as bytes, ancestors' identities)
    let mut stack: Vec<(PathBuf, Vec<u8>, Vec<DirId>)> =
        vec![(class_dir.to_path_buf(), Vec::new(), Vec::new())];
    while let Some((dir, rel, mut ancestors)) = stack.pop() {
        if let Some(id) = dir_id(&dir) {
            if ancestors.contains(&id) {
                return Err(Error::format(
                    &dir,
                    "a symbolic link loop: this directory contains itself (torchvision would walk \
                     it until the path is too long); remove the link",
                ));
            }
            ancestors.push(id);
        }
        if ancestors.len() > MAX_DEPTH {
            return Err(Error::format(
                &dir,
                format!("directories nest deeper than {MAX_DEPTH} levels"),
            ));
        }
        let mut images = Vec::new();
        for entry in read_dir_sorted(&dir)? {
            let name = entry
                .file_name()
                .unwrap_or_default()
                .as_encoded_bytes()
                .to_vec();
            if entry.is_dir() {
                let mut sub = rel.clone();
                sub.push(b'/');
                sub.extend_from_slice(&name);
                stack.push((entry.path, sub, ancestors.clone()));
            } else if has_image_extension(&name) {
                images.push(entry.path);
            }
        }
        roots.push((python_order(&rel), images));
    }
    roots.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(roots.into_iter().flat_map(|(_, files)| files).collect())
}

/// A directory's identity (device, inode), to detect link cycles.
#[derive(Clone, Copy, PartialEq, Eq)]
struct DirId(u64, u64);

#[cfg(unix)]
fn dir_id(dir: &Path) -> Option<DirId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| DirId(m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn dir_id(_dir: &Path) -> Option<DirId> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_order_is_code_points_with_surrogate_escapes() {
        assert!(python_order(b"Z") < python_order(b"a"));
        assert!(python_order(b"sub-a") < python_order(b"sub/x"));
        assert!(python_order(b"sub") < python_order(b"sub/x"));
        // U+00E9 < U+DCF5 (an undecodable byte) < U+1F600, although the UTF-8 bytes of the
        // emoji (F0 …) sort before F5.
        let e = "\u{e9}".as_bytes();
        let emoji = "\u{1f600}".as_bytes();
        assert!(python_order(e) < python_order(b"\xf5"));
        assert!(python_order(b"\xf5") < python_order(emoji));
        assert!(emoji < b"\xf5".as_slice());
        assert_eq!(python_order(b"a\xffb"), vec![0x61, 0xDCFF, 0x62]);
    }

    #[test]
    fn class_checks_name_the_problem() {
        let dir = Path::new("/data/x");
        let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        let e = check_classes(dir, &[]).unwrap_err().to_string();
        assert!(
            e.contains("/data/x") && e.contains("no class folders"),
            "{e}"
        );
        let e = check_classes(dir, &s(&["cat"])).unwrap_err().to_string();
        assert!(e.contains("only one class") && e.contains("cat"), "{e}");
        let e = check_classes(dir, &s(&["Cat", "dog", "cat"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Cat and cat differ only in case"), "{e}");
        let many: Vec<String> = (0..257).map(|i| format!("c{i:03}")).collect();
        let e = check_classes(dir, &many).unwrap_err().to_string();
        assert!(e.contains("257") && e.contains("256"), "{e}");
        assert!(check_classes(dir, &many[..256]).is_ok());
    }
}
