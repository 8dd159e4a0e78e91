//! Unpacking a CIFAR tarball safely: into a staging directory inside the target, every
//! entry checked to stay inside it, no links, and moved into place by one rename.

use super::http::ProgressReader;
use super::*;

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

/// Unpacks `archive` into a fresh temporary directory inside `parent`, refusing unsafe
/// entries. The directory (and all it holds) is removed when the returned guard drops.
pub(super) fn extract_to_staging(
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
pub(super) fn contained_path(path: &Path) -> Option<PathBuf> {
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
