//! Fetching CIFAR-10 and torchvision's ResNet-50 weights: download, verify, resume, extract.
//!
//! The original PyTorch script gets its inputs from `CIFAR10(download=True)` and
//! `resnet50(pretrained=True)`. This module does the same job with more care:
//!
//! - **Streaming with resume.** Bytes go to `<file>.part` as they arrive; a later run sends
//!   `Range: bytes=<len>-` and continues. A server that ignores the range (answers `200`
//!   instead of `206`) makes us start the file again from zero, cleanly.
//! - **Verified before use.** The md5 (CIFAR-10, as published by its authors) or sha256
//!   (torchvision, whose file names embed the hash prefix) is computed while streaming; the
//!   final file appears only by an atomic rename once it matches. A mismatching download is
//!   set aside as `<file>.bad`; nothing the user already had is touched.
//! - **Safe extraction.** The tarball is unpacked into a temporary directory inside the data
//!   directory and moved into place by one rename. Entries with absolute paths or `..`
//!   components are refused, and so are all symbolic and hard links (the CIFAR-10 archive has
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

/// Directory that the CIFAR-10 binary archive unpacks to, inside the data directory.
pub const CIFAR10_BIN_DIR: &str = "cifar-10-batches-bin";

/// The files that a complete `cifar-10-batches-bin/` holds.
pub const CIFAR10_BIN_FILES: [&str; 7] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "batches.meta.txt",
];

/// Environment variable overriding [`DownloadOptions::cifar_base_url`].
pub const ENV_CIFAR_URL: &str = "CIFAR_FINETUNE_CIFAR_URL";
/// Environment variable overriding [`DownloadOptions::weights_base_url`].
pub const ENV_WEIGHTS_URL: &str = "CIFAR_FINETUNE_WEIGHTS_URL";
/// Environment variable overriding [`DownloadOptions::hf_base_url`].
pub const ENV_HF_URL: &str = "CIFAR_FINETUNE_HF_URL";

/// Default host of the CIFAR-10 archive (Alex Krizhevsky's page at the University of Toronto).
pub const DEFAULT_CIFAR_BASE_URL: &str = "https://www.cs.toronto.edu";
/// Default host of torchvision's pretrained weights.
pub const DEFAULT_WEIGHTS_BASE_URL: &str = "https://download.pytorch.org";
/// Default Hugging Face host.
pub const DEFAULT_HF_BASE_URL: &str = "https://huggingface.co";

/// Which configured base URL an [`Asset`] is fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// [`DownloadOptions::cifar_base_url`].
    Cifar,
    /// [`DownloadOptions::weights_base_url`].
    Weights,
    /// [`DownloadOptions::hf_base_url`].
    HuggingFace,
}

/// An expected digest, as lowercase hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// MD5, the digest the CIFAR-10 authors publish.
    Md5(&'static str),
    /// SHA-256; torchvision's file names embed its first 8 hex digits.
    Sha256(&'static str),
}

impl Checksum {
    /// The algorithm's name, as in messages: `"md5"` or `"sha256"`.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5",
            Checksum::Sha256(_) => "sha256",
        }
    }

    /// The expected digest in hex.
    pub fn expected(&self) -> &'static str {
        match self {
            Checksum::Md5(h) | Checksum::Sha256(h) => h,
        }
    }

    /// The coreutils command that prints this digest, for the manual steps.
    fn tool(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5sum",
            Checksum::Sha256(_) => "sha256sum",
        }
    }

    fn matches(&self, got: &str) -> bool {
        self.expected().eq_ignore_ascii_case(got)
    }
}

/// A file this tool knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Human-readable name, used in messages.
    pub name: &'static str,
    /// Name of the file inside the data directory.
    pub file_name: &'static str,
    /// Path on the server, appended to the base URL of [`Asset::source`].
    pub url_path: &'static str,
    /// Which base URL serves this asset.
    pub source: Source,
    /// Expected digest; `None` when no digest is pinned, and then nothing is verified (the
    /// messages say so).
    pub checksum: Option<Checksum>,
    /// Expected size in bytes, when known: a progress total before the server answers, and a
    /// bound on how much a server may send.
    pub size: Option<u64>,
}

impl Asset {
    /// The full URL of this asset under the base URLs of `opts`.
    pub fn url(&self, opts: &DownloadOptions) -> String {
        join_url(opts.base_url(self.source), self.url_path)
    }
}

/// CIFAR-10, binary version (the format `data::cifar` reads).
pub const CIFAR10_BINARY: Asset = Asset {
    name: "CIFAR-10 (binary version)",
    file_name: "cifar-10-binary.tar.gz",
    url_path: "/~kriz/cifar-10-binary.tar.gz",
    source: Source::Cifar,
    checksum: Some(Checksum::Md5("c32a1d4ab5d03f1284b67883e8d87530")),
    size: Some(170_052_171),
};

/// torchvision's ResNet-50 `IMAGENET1K_V1` weights: the original script's `pretrained=True`
/// and our default.
pub const RESNET50_V1: Asset = Asset {
    name: "ResNet-50 IMAGENET1K_V1 weights (torchvision)",
    file_name: "resnet50-0676ba61.pth",
    url_path: "/models/resnet50-0676ba61.pth",
    source: Source::Weights,
    checksum: Some(Checksum::Sha256(
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
    )),
    size: None,
};

/// torchvision's ResNet-50 `IMAGENET1K_V2` weights (the improved training recipe).
pub const RESNET50_V2: Asset = Asset {
    name: "ResNet-50 IMAGENET1K_V2 weights (torchvision)",
    file_name: "resnet50-11ad3fa6.pth",
    url_path: "/models/resnet50-11ad3fa6.pth",
    source: Source::Weights,
    checksum: Some(Checksum::Sha256(
        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
    )),
    size: None,
};

/// The `IMAGENET1K_V1` weights as safetensors, from Hugging Face's `timm/resnet50.tv_in1k`
/// (same tensor names as torchvision). No digest is pinned for this file, so it is not
/// verified; the strict weight loader still checks every tensor name and shape.
pub const RESNET50_V1_SAFETENSORS: Asset = Asset {
    name: "ResNet-50 IMAGENET1K_V1 weights as safetensors (timm/resnet50.tv_in1k)",
    file_name: "resnet50.tv_in1k.safetensors",
    url_path: "/timm/resnet50.tv_in1k/resolve/main/model.safetensors",
    source: Source::HuggingFace,
    checksum: None,
    size: None,
};

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
    /// Base URL of the CIFAR-10 archive (scheme and host, optionally a path prefix).
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
    let target = data_dir.join(CIFAR10_BIN_DIR);
    let url = asset.url(opts);
    let manual = manual_cifar(asset, &url, data_dir);

    if target.exists() {
        let missing = missing_cifar_files(&target);
        if missing.is_empty() {
            return Ok(target);
        }
        return Err(download_error(
            DownloadFailure::Conflict,
            format!(
                "{} exists but lacks {}; it was left untouched. Complete it, or move it away \
                 and run again to download CIFAR-10 afresh.",
                target.display(),
                missing.join(", ")
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
                        checksum.expected()
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
    let staged = staging.path().join(CIFAR10_BIN_DIR);
    let missing = missing_cifar_files(&staged);
    if !missing.is_empty() {
        return Err(download_error(
            DownloadFailure::Archive,
            format!(
                "{} does not hold {CIFAR10_BIN_DIR}/{}; nothing was moved into {}.",
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

/// Safely unpacks the gzip-compressed tarball `archive` into `target_dir`.
///
/// Everything is first unpacked into a temporary directory inside `target_dir`; only when
/// the whole archive succeeded are its top-level entries renamed into `target_dir`. Entries
/// with absolute paths or `..` components, symbolic links, hard links and special files are
/// refused; file permissions in the archive are ignored. A top-level entry that already
/// exists in `target_dir` is an error, raised before anything is moved.
pub fn extract_tar_gz(archive: &Path, target_dir: &Path) -> Result<()> {
    let staging = extract_to_staging(archive, target_dir, &DownloadOptions::default())?;
    let mut names = Vec::new();
    for entry in
        fs::read_dir(staging.path()).map_err(|e| Error::io("listing", staging.path(), e))?
    {
        let entry = entry.map_err(|e| Error::io("listing", staging.path(), e))?;
        let name = entry.file_name();
        let dest = target_dir.join(&name);
        if dest.symlink_metadata().is_ok() {
            return Err(Error::format(
                archive,
                format!(
                    "{} already exists; refusing to overwrite it with the archive's copy",
                    dest.display()
                ),
            ));
        }
        names.push(name);
    }
    for name in names {
        let dest = target_dir.join(&name);
        fs::rename(staging.path().join(&name), &dest)
            .map_err(|e| Error::io("moving into place", &dest, e))?;
    }
    Ok(())
}

/// One file to fetch, with everything its messages need.
struct Target<'a> {
    /// What the file is, for the offline message.
    what: String,
    url: &'a str,
    dest: &'a Path,
    checksum: Option<&'a Checksum>,
    size: Option<u64>,
    /// The manual steps appended to every error.
    manual: &'a str,
}

/// The body of [`fetch`]: download, verify (retrying once from zero after a resume), rename.
fn fetch_target(t: &Target<'_>, opts: &DownloadOptions) -> Result<()> {
    if opts.offline {
        return Err(download_error(
            DownloadFailure::Offline,
            format!(
                "{} is missing, and offline mode forbids downloading it from {}.",
                t.what, t.url
            ),
            t.manual,
        ));
    }
    let dir = parent_dir(t.dest);
    fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
    let part = with_suffix(t.dest, ".part");
    let bad = with_suffix(t.dest, ".bad");

    let mut retried_from_zero = false;
    loop {
        let (resumed_from, digest) = transfer(t, &part, opts)?;
        let (Some(checksum), Some(got)) = (t.checksum, digest) else {
            break;
        };
        if checksum.matches(&got) {
            break;
        }
        if resumed_from > 0 && !retried_from_zero {
            // The kept prefix may come from an older copy of the file: start from zero once.
            retried_from_zero = true;
            fs::remove_file(&part).map_err(|e| Error::io("removing", &part, e))?;
            continue;
        }
        fs::rename(&part, &bad).map_err(|e| Error::io("renaming", &bad, e))?;
        return Err(download_error(
            DownloadFailure::Checksum,
            format!(
                "checksum mismatch for {}: its {} is {got}, expected {}. The download was kept \
                 aside as {} (delete it at will){}.",
                t.url,
                checksum.algorithm(),
                checksum.expected(),
                bad.display(),
                if t.dest.exists() {
                    format!("; the existing {} was not touched", t.dest.display())
                } else {
                    String::new()
                }
            ),
            t.manual,
        ));
    }

    fs::rename(&part, t.dest).map_err(|e| Error::io("moving into place", t.dest, e))?;
    // A `.bad` from an earlier failed attempt is obsolete now that a good copy exists.
    if let Err(e) = fs::remove_file(&bad)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(Error::io("removing", &bad, e));
    }
    Ok(())
}

/// Brings `part` to the complete content of `t.url`, resuming what it already holds.
/// Returns the offset the transfer resumed from and the digest of the whole file (when a
/// checksum is expected).
fn transfer(t: &Target<'_>, part: &Path, opts: &DownloadOptions) -> Result<(u64, Option<String>)> {
    let mut offset = match fs::metadata(part) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io("reading metadata of", part, e)),
    };
    if let Some(size) = t.size {
        if offset > size {
            // Longer than the real file: it cannot be a prefix of it.
            fs::remove_file(part).map_err(|e| Error::io("removing", part, e))?;
            offset = 0;
        } else if offset == size && offset > 0 {
            // An earlier run received everything but stopped before the rename.
            let digest = t.checksum.map(|c| hash_file(part, c, opts)).transpose()?;
            return Ok((offset, digest));
        }
    }

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(opts.timeout))
        .timeout_recv_response(Some(opts.timeout))
        .timeout_per_read(Some(opts.timeout))
        // The digest is of the bytes as stored: ask for them untransformed.
        .accept_encoding("identity")
        .user_agent(concat!("cifar-finetune/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut request = agent.get(t.url);
    if offset > 0 {
        request = request.header("Range", format!("bytes={offset}-"));
    }
    let response = request.call().map_err(|e| {
        download_error(
            DownloadFailure::Network,
            format!("could not download {}: {e}.", t.url),
            t.manual,
        )
    })?;

    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_length = header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    let total = match status.as_u16() {
        206 => {
            let range = header("content-range").unwrap_or_default();
            match parse_content_range(&range) {
                Some((start, total)) if start == offset => {
                    total.or(content_length.map(|n| n + offset))
                }
                _ => {
                    // We cannot tell where these bytes belong: drop the partial file so that
                    // the next run starts cleanly.
                    fs::remove_file(part).map_err(|e| Error::io("removing", part, e))?;
                    return Err(download_error(
                        DownloadFailure::Protocol,
                        format!(
                            "{} answered a range request for bytes {offset}- with Content-Range \
                             {range:?}; the partial file was removed, run again to download from \
                             the start.",
                            t.url
                        ),
                        t.manual,
                    ));
                }
            }
        }
        200 => {
            // Either a fresh download or a server that ignores Range: the body is the whole
            // file, so the partial file is restarted from zero.
            offset = 0;
            content_length
        }
        416 if offset > 0 => {
            // Nothing left after `offset`: the partial file may already be complete.
            let digest = t.checksum.map(|c| hash_file(part, c, opts)).transpose()?;
            return Ok((offset, digest));
        }
        _ => {
            return Err(download_error(
                DownloadFailure::Http(status.as_u16()),
                format!(
                    "could not download {}: the server answered HTTP {}{}.",
                    t.url,
                    status.as_u16(),
                    status
                        .canonical_reason()
                        .map(|r| format!(" {r}"))
                        .unwrap_or_default()
                ),
                t.manual,
            ));
        }
    };
    if let Some(encoding) = header("content-encoding")
        && !encoding.eq_ignore_ascii_case("identity")
    {
        return Err(download_error(
            DownloadFailure::Protocol,
            format!(
                "{} was sent with Content-Encoding {encoding:?} although none was asked for; \
                 its bytes cannot be verified as sent.",
                t.url
            ),
            t.manual,
        ));
    }
    if let (Some(expected), Some(announced)) = (t.size, total)
        && expected != announced
    {
        return Err(download_error(
            DownloadFailure::Size,
            format!(
                "{} has {announced} bytes, but {expected} were expected: it is not the expected \
                 file (a proxy's error page, or another version). Nothing was downloaded.",
                t.url
            ),
            t.manual,
        ));
    }
    let total = total.or(t.size);

    // Hash what is already there, then append to it.
    let mut hasher = t.checksum.map(Hasher::new);
    if offset > 0
        && let Some(h) = hasher.as_mut()
    {
        hash_into(part, h, offset)?;
    }
    let mut file = if offset == 0 {
        File::create(part).map_err(|e| Error::io("creating", part, e))?
    } else {
        OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(|e| Error::io("opening", part, e))?
    };
    let resumed_from = offset;
    let mut done = offset;
    opts.report(Stage::Download, t.dest, done, total);

    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                file.sync_all().map_err(|e| Error::io("syncing", part, e))?;
                return Err(interrupted(t, part, done, total, &e.to_string()));
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| Error::io("writing", part, e))?;
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        done += n as u64;
        if let Some(limit) = total
            && done > limit
        {
            drop(file);
            fs::remove_file(part).map_err(|e| Error::io("removing", part, e))?;
            return Err(download_error(
                DownloadFailure::Size,
                format!(
                    "{} sent more than the {limit} bytes announced; the partial file was removed.",
                    t.url
                ),
                t.manual,
            ));
        }
        opts.report(Stage::Download, t.dest, done, total);
    }
    file.sync_all().map_err(|e| Error::io("syncing", part, e))?;
    drop(file);
    if let Some(total) = total
        && done < total
    {
        return Err(interrupted(
            t,
            part,
            done,
            Some(total),
            "the connection ended early",
        ));
    }
    Ok((resumed_from, hasher.map(Hasher::finish)))
}

/// The error for a transfer cut short: the `.part` stays for the next run.
fn interrupted(t: &Target<'_>, part: &Path, done: u64, total: Option<u64>, why: &str) -> Error {
    let of = total.map(|n| format!(" of {n}")).unwrap_or_default();
    download_error(
        DownloadFailure::Interrupted,
        format!(
            "the download of {} was interrupted after {done}{of} bytes ({why}). The partial \
             file {} is kept: run again to resume.",
            t.url,
            part.display()
        ),
        t.manual,
    )
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`) into `(START, TOTAL)`.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

/// A running md5 or sha256.
enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
}

impl Hasher {
    fn new(checksum: &Checksum) -> Self {
        match checksum {
            Checksum::Md5(_) => Hasher::Md5(Md5::new()),
            Checksum::Sha256(_) => Hasher::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Md5(h) => crate::io::hex(&h.finalize()),
            Hasher::Sha256(h) => crate::io::hex(&h.finalize()),
        }
    }
}

/// A sink for [`std::io::copy`]: hashing never fails.
impl Write for Hasher {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feeds the first `len` bytes of `path` to `hasher`.
fn hash_into(path: &Path, hasher: &mut Hasher, len: u64) -> Result<()> {
    let mut file = File::open(path)
        .map_err(|e| Error::io("opening", path, e))?
        .take(len);
    std::io::copy(&mut file, hasher).map_err(|e| Error::io("reading", path, e))?;
    Ok(())
}

/// The digest of a whole file, reporting [`Stage::Verify`] progress.
fn hash_file(path: &Path, checksum: &Checksum, opts: &DownloadOptions) -> Result<String> {
    let total = fs::metadata(path)
        .map_err(|e| Error::io("reading metadata of", path, e))?
        .len();
    let mut reader = ProgressReader {
        inner: File::open(path).map_err(|e| Error::io("opening", path, e))?,
        stage: Stage::Verify,
        file: path,
        done: 0,
        total,
        opts,
    };
    let mut hasher = Hasher::new(checksum);
    std::io::copy(&mut reader, &mut hasher).map_err(|e| Error::io("reading", path, e))?;
    Ok(hasher.finish())
}

/// A reader that reports how many bytes went through it.
struct ProgressReader<'a, R> {
    inner: R,
    stage: Stage,
    file: &'a Path,
    done: u64,
    total: u64,
    opts: &'a DownloadOptions,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.opts
            .report(self.stage, self.file, self.done, Some(self.total));
        Ok(n)
    }
}

/// Unpacks `archive` into a fresh temporary directory inside `parent`, refusing unsafe
/// entries. The directory (and all it holds) is removed when the returned guard drops.
fn extract_to_staging(
    archive: &Path,
    parent: &Path,
    opts: &DownloadOptions,
) -> Result<tempfile::TempDir> {
    fs::create_dir_all(parent).map_err(|e| Error::io("creating directory", parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(parent)
        .map_err(|e| Error::io("creating a temporary directory in", parent, e))?;
    let file = File::open(archive).map_err(|e| Error::io("opening", archive, e))?;
    let total = file
        .metadata()
        .map_err(|e| Error::io("reading metadata of", archive, e))?
        .len();
    let reader = ProgressReader {
        inner: std::io::BufReader::new(file),
        stage: Stage::Extract,
        file: archive,
        done: 0,
        total,
        opts,
    };
    unpack_safely(archive, reader, staging.path())?;
    Ok(staging)
}

/// Writes the regular files and directories of a `.tar.gz` stream under `root`, refusing
/// anything that could land outside it.
fn unpack_safely(archive: &Path, reader: impl Read, root: &Path) -> Result<()> {
    let corrupt = |e: std::io::Error| Error::format(archive, format!("not a valid .tar.gz: {e}"));
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let raw = entry.path().map_err(corrupt)?.into_owned();
        let shown = raw.display().to_string();
        let Some(relative) = contained_path(&raw) else {
            return Err(Error::format(
                archive,
                format!(
                    "entry {shown:?} has an absolute path or a `..` component and would land \
                     outside the target directory; refusing to extract"
                ),
            ));
        };
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(Error::format(
                archive,
                format!(
                    "entry {shown:?} is a {} link to {target:?}; links are refused",
                    if kind.is_symlink() {
                        "symbolic"
                    } else {
                        "hard"
                    }
                ),
            ));
        }
        let out = root.join(&relative);
        if kind.is_dir() {
            fs::create_dir_all(&out).map_err(|e| Error::io("creating directory", &out, e))?;
        } else if kind.is_file() || kind.is_contiguous() {
            if relative.as_os_str().is_empty() {
                return Err(Error::format(
                    archive,
                    format!("file entry {shown:?} has an empty path"),
                ));
            }
            let dir = parent_dir(&out);
            fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
            let mut file = File::create(&out).map_err(|e| Error::io("creating", &out, e))?;
            std::io::copy(&mut entry, &mut file).map_err(|e| {
                Error::format(archive, format!("reading entry {shown:?} failed: {e}"))
            })?;
        } else {
            return Err(Error::format(
                archive,
                format!(
                    "entry {shown:?} has unsupported type {kind:?}; only files and directories \
                     are extracted"
                ),
            ));
        }
    }
    // Read to the end of the gzip stream, so that its CRC and length are checked too.
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
    Ok(())
}

/// `path` without `.` components if it stays inside its root (no root, prefix or `..`).
fn contained_path(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The names in [`CIFAR10_BIN_FILES`] that are not files under `dir`.
fn missing_cifar_files(dir: &Path) -> Vec<&'static str> {
    CIFAR10_BIN_FILES
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

/// Manual steps for the CIFAR-10 archive: download, check, unpack, expected layout.
fn manual_cifar(asset: &Asset, url: &str, data_dir: &Path) -> String {
    let dir = data_dir.display();
    let size = asset
        .size
        .map(|n| format!(" ({n} bytes)"))
        .unwrap_or_default();
    format!(
        "To do it by hand:\n  1. download {url}{size}\n  2. {}\n  3. unpack it into {dir}: \
         tar -xzf {} -C {dir}\n     which must give\n       \
         {dir}/{CIFAR10_BIN_DIR}/data_batch_1.bin ... data_batch_5.bin\n       \
         {dir}/{CIFAR10_BIN_DIR}/test_batch.bin\n       \
         {dir}/{CIFAR10_BIN_DIR}/batches.meta.txt",
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
            c.expected(),
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
        assert!(sha.matches(&h.finish()));
    }
}
