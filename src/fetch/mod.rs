//! Fetching CIFAR-10, CIFAR-100 and torchvision's ResNet-50 weights: download, verify,
//! resume, extract.
//!
//! The original PyTorch script gets its inputs from `CIFAR10(download=True)` and
//! `resnet50(pretrained=True)`. This module does the same job with more care:
//!
//! - **Streaming with resume.** Bytes go to `<file>.part` as they arrive; a later run sends
//!   `Range: bytes=<len>-` and continues. A server that ignores the range (answers `200`
//!   instead of `206`) makes us start the file again from zero, cleanly.
//! - **Verified before use.** The md5 (CIFAR-10 and CIFAR-100, as published by their
//!   authors) or sha256 (torchvision, whose file names embed the hash prefix) is computed
//!   while streaming; the final file appears only by an atomic rename once it matches. A
//!   mismatching download is set aside as `<file>.bad`; nothing the user already had is
//!   touched.
//! - **Safe extraction.** The tarball is unpacked into a temporary directory inside the data
//!   directory and moved into place by one rename. Entries with absolute paths or `..`
//!   components are refused, and so are all symbolic and hard links (the CIFAR archives have
//!   none, so refusing them outright is simpler and safer than judging where they point).
//! - **Helpful failures.** Every network, HTTP, checksum or archive failure is an
//!   [`Error::Download`] that says what failed and gives the manual steps: the URL, the
//!   checksum and the directory layout to place the files in.
//!
//! Base URLs can be redirected to a mirror or a local test server, through
//! [`DownloadOptions`] or the `CIFAR_FINETUNE_*_URL` environment variables. The library never
//! prints: progress goes to an optional callback that the binary turns into a progress bar.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::error::{DownloadFailure, Error, Result};

mod assets;
mod extract;
mod http;

pub use assets::*;
pub use extract::extract_tar_gz;
use extract::extract_to_staging;
use http::{Target, fetch_target, hash_file};

/// What a [`Progress`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Receiving bytes from the network (`done` counts the bytes already in the file,
    /// including those of a resumed `.part`).
    Download,
    /// Computing the checksum of a file already on disk.
    Verify,
    /// Unpacking an archive (`done` counts compressed bytes read).
    Extract,
}

/// One progress report.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The current stage.
    pub stage: Stage,
    /// The file being written, verified or unpacked.
    pub file: &'a Path,
    /// Bytes done so far.
    pub done: u64,
    /// Total bytes, when known.
    pub total: Option<u64>,
}

/// Callback receiving progress reports; called often (once per buffer), so keep it cheap.
pub type ProgressFn = Box<dyn Fn(&Progress<'_>) + Send + Sync>;

/// Where to download from and how.
pub struct DownloadOptions {
    /// Base URL of the CIFAR-10 and CIFAR-100 archives (scheme and host, optionally a path
    /// prefix).
    pub cifar_base_url: String,
    /// Base URL of torchvision's weights.
    pub weights_base_url: String,
    /// Base URL of Hugging Face.
    pub hf_base_url: String,
    /// Forbid all network access: a missing file is an error naming it.
    pub offline: bool,
    /// Connect timeout, and the longest wait for the response or for any single read.
    pub timeout: Duration,
    /// Receives progress reports, if set.
    pub progress: Option<ProgressFn>,
}

impl Default for DownloadOptions {
    /// The real hosts, online, 30 s timeouts, no progress reports.
    fn default() -> Self {
        Self {
            cifar_base_url: DEFAULT_CIFAR_BASE_URL.to_owned(),
            weights_base_url: DEFAULT_WEIGHTS_BASE_URL.to_owned(),
            hf_base_url: DEFAULT_HF_BASE_URL.to_owned(),
            offline: false,
            timeout: Duration::from_secs(30),
            progress: None,
        }
    }
}

impl std::fmt::Debug for DownloadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownloadOptions")
            .field("cifar_base_url", &self.cifar_base_url)
            .field("weights_base_url", &self.weights_base_url)
            .field("hf_base_url", &self.hf_base_url)
            .field("offline", &self.offline)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl DownloadOptions {
    /// The defaults, with base URLs taken from [`ENV_CIFAR_URL`], [`ENV_WEIGHTS_URL`] and
    /// [`ENV_HF_URL`] where those are set and not empty.
    pub fn from_env() -> Self {
        let mut opts = Self::default();
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if let Some(url) = var(ENV_CIFAR_URL) {
            opts.cifar_base_url = url;
        }
        if let Some(url) = var(ENV_WEIGHTS_URL) {
            opts.weights_base_url = url;
        }
        if let Some(url) = var(ENV_HF_URL) {
            opts.hf_base_url = url;
        }
        opts
    }

    /// The base URL configured for `source`.
    pub fn base_url(&self, source: Source) -> &str {
        match source {
            Source::Cifar => &self.cifar_base_url,
            Source::Weights => &self.weights_base_url,
            Source::HuggingFace => &self.hf_base_url,
        }
    }

    fn report(&self, stage: Stage, file: &Path, done: u64, total: Option<u64>) {
        if let Some(progress) = &self.progress {
            progress(&Progress {
                stage,
                file,
                done,
                total,
            });
        }
    }
}

/// A dataset archive: the directory it unpacks to and the files that make that directory
/// complete.
struct Archive {
    /// The dataset's name in messages.
    dataset: &'static str,
    /// The directory the archive unpacks to, inside the data directory.
    dir: &'static str,
    /// The files a complete `dir` holds.
    files: &'static [&'static str],
    /// The layout as the manual steps show it, one line per entry under `dir/`.
    manual: &'static [&'static str],
}

const CIFAR10_ARCHIVE: Archive = Archive {
    dataset: "CIFAR-10",
    dir: CIFAR10_BIN_DIR,
    files: &CIFAR10_BIN_FILES,
    manual: &[
        "data_batch_1.bin ... data_batch_5.bin",
        "test_batch.bin",
        "batches.meta.txt",
    ],
};

const CIFAR100_ARCHIVE: Archive = Archive {
    dataset: "CIFAR-100",
    dir: CIFAR100_BIN_DIR,
    files: &CIFAR100_BIN_FILES,
    manual: &CIFAR100_BIN_FILES,
};

/// Makes sure `data_dir/cifar-10-batches-bin/` holds CIFAR-10 and returns its path.
///
/// If the directory is already complete nothing happens (and no network is used). Otherwise
/// the archive is downloaded (or an archive already in `data_dir` is re-verified), checked
/// against its md5, unpacked into a temporary directory inside `data_dir`, and moved into
/// place. The archive is kept next to it. A directory that exists but is incomplete is an
/// error and is left untouched.
pub fn ensure_cifar(data_dir: &Path, opts: &DownloadOptions) -> Result<PathBuf> {
    ensure_cifar_with(data_dir, &CIFAR10_BINARY, opts)
}

/// [`ensure_cifar`] for another description of the archive: a mirror's copy under another
/// path or digest, or a synthetic archive in tests. `asset` must unpack to
/// `cifar-10-batches-bin/` holding [`CIFAR10_BIN_FILES`].
pub fn ensure_cifar_with(
    data_dir: &Path,
    asset: &Asset,
    opts: &DownloadOptions,
) -> Result<PathBuf> {
    ensure_archive(data_dir, &CIFAR10_ARCHIVE, asset, opts)
}

/// Makes sure `data_dir/cifar-100-binary/` holds CIFAR-100 and returns its path, as
/// [`ensure_cifar`] does for CIFAR-10: downloaded (or an archive already there re-verified),
/// md5-checked, unpacked aside and moved into place; an incomplete directory is an error
/// and is left untouched.
pub fn ensure_cifar100(data_dir: &Path, opts: &DownloadOptions) -> Result<PathBuf> {
    ensure_cifar100_with(data_dir, &CIFAR100_BINARY, opts)
}

/// [`ensure_cifar100`] for another description of the archive (a mirror, a test archive).
/// `asset` must unpack to `cifar-100-binary/` holding [`CIFAR100_BIN_FILES`].
pub fn ensure_cifar100_with(
    data_dir: &Path,
    asset: &Asset,
    opts: &DownloadOptions,
) -> Result<PathBuf> {
    ensure_archive(data_dir, &CIFAR100_ARCHIVE, asset, opts)
}

/// Makes sure `data_dir/<archive.dir>` is complete, downloading, verifying and unpacking
/// `asset` when it is absent.
fn ensure_archive(
    data_dir: &Path,
    archive_of: &Archive,
    asset: &Asset,
    opts: &DownloadOptions,
) -> Result<PathBuf> {
    let dir_name = archive_of.dir;
    let target = data_dir.join(dir_name);
    let url = asset.url(opts);
    let manual = manual_archive(archive_of, asset, &url, data_dir);

    if target.exists() {
        let missing = missing_files(archive_of, &target);
        if missing.is_empty() {
            return Ok(target);
        }
        return Err(download_error(
            DownloadFailure::Conflict,
            format!(
                "{} exists but lacks {}; it was left untouched. Complete it, or move it away \
                 and run again to download {} afresh.",
                target.display(),
                missing.join(", "),
                archive_of.dataset
            ),
            &manual,
        ));
    }

    let archive = data_dir.join(asset.file_name);
    if archive.exists() {
        // An archive already here was put by the user or kept by an earlier run whose
        // extraction failed: check it again before unpacking anything from it.
        if let Some(checksum) = &asset.checksum {
            let got = hash_file(&archive, checksum, opts)?;
            if !checksum.matches(&got) {
                return Err(download_error(
                    DownloadFailure::Conflict,
                    format!(
                        "{} exists but its {} is {got}, not the expected {}; it was left \
                         untouched. Delete it and run again to download it afresh.",
                        archive.display(),
                        checksum.algorithm(),
                        checksum.expectation()
                    ),
                    &manual,
                ));
            }
        }
    } else {
        fetch_target(
            &Target {
                what: format!("{} ({})", asset.name, target.display()),
                url: &url,
                dest: &archive,
                checksum: asset.checksum.as_ref(),
                size: asset.size,
                manual: &manual,
            },
            opts,
        )?;
    }

    let staging = extract_to_staging(&archive, data_dir, opts).map_err(|e| {
        download_error(
            DownloadFailure::Archive,
            format!(
                "extracting {} failed: {e}. Nothing was moved into {}.",
                archive.display(),
                data_dir.display()
            ),
            &manual,
        )
    })?;
    let staged = staging.path().join(dir_name);
    let missing = missing_files(archive_of, &staged);
    if !missing.is_empty() {
        return Err(download_error(
            DownloadFailure::Archive,
            format!(
                "{} does not hold {dir_name}/{}; nothing was moved into {}.",
                archive.display(),
                missing.join(", "),
                data_dir.display()
            ),
            &manual,
        ));
    }
    fs::rename(&staged, &target).map_err(|e| Error::io("moving into place", &target, e))?;
    Ok(target)
}

/// Makes sure `data_dir/<asset.file_name>` exists and returns its path, downloading and
/// verifying it if missing. A file already present is used as it is (it was either verified
/// when downloaded or put there by the user).
pub fn ensure_weights(data_dir: &Path, asset: &Asset, opts: &DownloadOptions) -> Result<PathBuf> {
    let dest = data_dir.join(asset.file_name);
    if dest.is_file() {
        return Ok(dest);
    }
    let url = asset.url(opts);
    let manual = manual_file(asset.checksum.as_ref(), &url, &dest);
    fetch_target(
        &Target {
            what: format!("{} ({})", asset.name, dest.display()),
            url: &url,
            dest: &dest,
            checksum: asset.checksum.as_ref(),
            size: asset.size,
            manual: &manual,
        },
        opts,
    )?;
    Ok(dest)
}

/// Downloads `url` to `dest`.
///
/// Bytes stream into `dest.part`; an existing `.part` is resumed with an HTTP `Range`
/// request (a server answering `200` restarts the file from zero). Once complete, the
/// content is checked against `checksum` (if given) and renamed onto `dest`, replacing any
/// previous file only then. On a mismatch the download is kept aside as `dest.bad` and
/// `dest` is untouched; if the download had resumed a `.part`, it is first retried once
/// from zero, in case the file changed on the server.
pub fn fetch(
    url: &str,
    dest: &Path,
    checksum: Option<&Checksum>,
    opts: &DownloadOptions,
) -> Result<()> {
    let manual = manual_file(checksum, url, dest);
    fetch_target(
        &Target {
            what: dest.display().to_string(),
            url,
            dest,
            checksum,
            size: None,
            manual: &manual,
        },
        opts,
    )
}

/// The files of `archive` that are not files under `dir`.
fn missing_files(archive: &Archive, dir: &Path) -> Vec<&'static str> {
    archive
        .files
        .iter()
        .copied()
        .filter(|name| !dir.join(name).is_file())
        .collect()
}

/// An [`Error::Download`] whose message is `what` followed by the manual steps.
fn download_error(kind: DownloadFailure, what: String, manual: &str) -> Error {
    Error::Download {
        kind,
        msg: format!("{what}\n\n{manual}"),
        source: None,
    }
}

/// Manual steps for a dataset archive: download, check, unpack, expected layout.
fn manual_archive(archive: &Archive, asset: &Asset, url: &str, data_dir: &Path) -> String {
    let dir = data_dir.display();
    let size = asset
        .size
        .map(|n| format!(" ({n} bytes)"))
        .unwrap_or_default();
    let layout: String = archive
        .manual
        .iter()
        .map(|entry| format!("\n       {dir}/{}/{entry}", archive.dir))
        .collect();
    format!(
        "To do it by hand:\n  1. download {url}{size}\n  2. {}\n  3. unpack it into {dir}: \
         tar -xzf {} -C {dir}\n     which must give{layout}",
        check_step(asset.checksum.as_ref(), asset.file_name),
        asset.file_name,
    )
}

/// Manual steps for a single file: download, check, place.
fn manual_file(checksum: Option<&Checksum>, url: &str, dest: &Path) -> String {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dest.display().to_string());
    format!(
        "To do it by hand:\n  1. download {url}\n  2. {}\n  3. place it at {}",
        check_step(checksum, &name),
        dest.display()
    )
}

fn check_step(checksum: Option<&Checksum>, file_name: &str) -> String {
    match checksum {
        Some(c) => format!(
            "check that `{} {file_name}` prints {} ({})",
            c.tool(),
            c.expectation(),
            c.algorithm()
        ),
        None => format!(
            "no checksum is pinned for {file_name}, so it cannot be verified; compare its \
             sha256 with the one the download page lists"
        ),
    }
}

/// `base` and `path` joined with exactly one `/`.
fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// `path` with `suffix` appended to its file name (`x.tar.gz` → `x.tar.gz.part`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::extract::contained_path;
    use super::http::{Hasher, parse_content_range};
    use super::*;

    #[test]
    fn content_range_is_parsed() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes */200"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn only_contained_paths_pass() {
        assert_eq!(
            contained_path(Path::new("./a/b.bin")),
            Some(PathBuf::from("a/b.bin"))
        );
        assert_eq!(contained_path(Path::new("a/../../b")), None);
        assert_eq!(contained_path(Path::new("/etc/passwd")), None);
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(join_url("http://h/", "/x/y"), "http://h/x/y");
        assert_eq!(join_url("http://h/mirror", "x"), "http://h/mirror/x");
        let opts = DownloadOptions {
            weights_base_url: "http://127.0.0.1:9/".into(),
            ..DownloadOptions::default()
        };
        assert_eq!(
            RESNET50_V1.url(&opts),
            "http://127.0.0.1:9/models/resnet50-0676ba61.pth"
        );
        assert_eq!(
            CIFAR10_BINARY.url(&DownloadOptions::default()),
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
        );
        assert_eq!(
            CIFAR100_BINARY.url(&DownloadOptions::default()),
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
        );
    }

    #[test]
    fn checksums_of_known_content() {
        let mut md5 = Hasher::new(&Checksum::Md5(""));
        md5.update(b"abc");
        assert_eq!(md5.finish(), "900150983cd24fb0d6963f7d28e17f72");
        let sha =
            Checksum::Sha256("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD");
        let mut h = Hasher::new(&sha);
        h.update(b"abc");
        let got = h.finish();
        assert!(sha.matches(&got));
        // torchvision's 8-digit prefixes: the start of the digest, any case; nothing else.
        assert!(Checksum::Sha256Prefix("ba7816bf").matches(&got));
        assert!(Checksum::Sha256Prefix("BA7816BF").matches(&got));
        assert!(!Checksum::Sha256Prefix("a7816bf8").matches(&got));
        assert!(!Checksum::Sha256Prefix("").matches(&got));
        assert!(!Checksum::Sha256Prefix("ba7816bf").matches("ba78"));
        assert_eq!(
            Checksum::Sha256Prefix("ba7816bf").expectation(),
            "one starting with ba7816bf"
        );
    }

    #[test]
    fn every_architecture_has_its_pretrained_weights() {
        use crate::backbone::arch::Arch;
        for arch in Arch::ALL {
            let v1 = pretrained(arch.name, WeightsVersion::V1, WeightsFormat::Pth).unwrap();
            // torchvision's file names: <arch>-<first 8 hex digits of the sha256>.pth.
            let stem = v1.file_name.strip_suffix(".pth").unwrap();
            let (name, prefix) = stem.rsplit_once('-').unwrap();
            assert_eq!(name, arch.name);
            assert_eq!(prefix.len(), 8);
            let checksum = v1.checksum.unwrap();
            assert!(checksum.expected().starts_with(prefix), "{arch}");
            assert_eq!(v1.url_path, format!("/models/{}", v1.file_name));
            assert!(
                pretrained(arch.name, WeightsVersion::V1, WeightsFormat::Safetensors).is_some()
            );
            let has_v2 = arch.block == crate::backbone::arch::BlockKind::Bottleneck;
            assert_eq!(
                pretrained(arch.name, WeightsVersion::V2, WeightsFormat::Pth).is_some(),
                has_v2,
                "{arch}"
            );
        }
        // The whole digest where it is known, the prefix elsewhere.
        assert!(RESNET50_V1.checksum.unwrap().is_full());
        assert!(RESNET50_V2.checksum.unwrap().is_full());
        let r18 = pretrained("resnet18", WeightsVersion::V1, WeightsFormat::Pth).unwrap();
        assert_eq!(r18.checksum, Some(Checksum::Sha256Prefix("f37072fd")));
        assert_eq!(backbones_with(WeightsVersion::V2).len(), 5);
    }
}
