//! Small file helpers shared by every stage: atomic writes, directory locks and checksums.
//!
//! Every file the tool writes goes through [`atomic_write`]: the bytes go to a temporary
//! file (`.tmp-*`) in the same directory, are flushed to disk, and only then renamed over the
//! target, so a crash or Ctrl-C leaves either the old file or the new one, never half of
//! one. A directory that a process writes into is held with a [`DirLock`], an advisory lock
//! that the operating system releases when the process ends however it ends, so `kill -9`
//! leaves nothing stale; the lock's holder then removes the temporaries that a killed writer
//! left behind ([`remove_stale_temporaries`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Writes a file atomically: `write` fills a temporary file next to `path`, which is then
/// synced and renamed onto `path`. Parent directories are created.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|e| Error::io("creating a temporary file in", dir, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(|e| Error::io("writing", path, e))?;
        w.flush().map_err(|e| Error::io("writing", path, e))?;
    }
    // tempfile creates 0600 files; what we write (reports, features) is meant to be shared
    // like any file the user creates.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io("setting permissions of", path, e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io("syncing", path, e))?;
    tmp.persist(path)
        .map_err(|e| Error::io("renaming into place", path, e.error))?;
    Ok(())
}

/// Prefix of [`atomic_write`]'s temporary files.
const TMP_PREFIX: &str = ".tmp-";

/// Name of the lock file a [`DirLock`] keeps in its directory.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive advisory lock on a directory, held until dropped or until the process ends.
///
/// The lock is taken on `<dir>/.lock` (`flock` on Unix), which then holds the holder's
/// process id, so that a refused process can say who holds it.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl DirLock {
    /// Locks `dir` (created if missing) for `what` (e.g. "training run"). If another process
    /// holds it: waits for it when `wait`, else fails at once with [`Error::Locked`] naming
    /// the holder's process id.
    pub fn acquire(dir: &Path, what: &str, wait: bool) -> Result<DirLock> {
        Self::acquire_file(dir, LOCK_FILE, what, wait, false)
    }

    /// Takes `<dir>/<file>` (created if missing), exclusively or `shared`: shared holders
    /// coexist with each other but not with an exclusive one. This is how the workers of a
    /// sharded extraction write into one cache part side by side (each shared on `.lock`
    /// and exclusive on its own file) while a plain writer, exclusive on `.lock`, knows
    /// it is alone. A refusal names the exclusive holder's process id when known.
    pub fn acquire_file(
        dir: &Path,
        file: &str,
        what: &str,
        wait: bool,
        shared: bool,
    ) -> Result<DirLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
        let path = dir.join(file);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("opening the lock file", &path, e))?;
        let attempt = if shared {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match attempt {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) if wait => {
                let locked = if shared {
                    file.lock_shared()
                } else {
                    file.lock()
                };
                locked.map_err(|e| Error::io("locking", &path, e))?;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(Error::Locked {
                    path,
                    what: what.to_string(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io("locking", &path, e));
            }
        }
        let mut lock = DirLock { file, path };
        // Shared holders leave the file alone: it names the last exclusive holder.
        if !shared {
            lock.record_holder()?;
        }
        Ok(lock)
    }

    /// Writes this process's id into the lock file (informative: the lock itself is the
    /// `flock`, not the content).
    fn record_holder(&mut self) -> Result<()> {
        let id = std::process::id().to_string();
        self.file
            .set_len(0)
            .and_then(|()| std::io::Seek::rewind(&mut self.file))
            .and_then(|()| self.file.write_all(id.as_bytes()))
            .map_err(|e| Error::io("writing", &self.path, e))
    }
}

/// Removes the temporary files that an interrupted [`atomic_write`] left in `dir` (not in
/// its subdirectories); returns how many. Call it only while holding `dir`'s [`DirLock`],
/// when no other process can be writing there.
pub fn remove_stale_temporaries(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("listing", dir, e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        let is_tmp = entry.file_name().to_string_lossy().starts_with(TMP_PREFIX);
        if is_tmp && entry.file_type().is_ok_and(|t| t.is_file()) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| Error::io("removing", &p, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// [`atomic_write`] for a byte buffer already in memory.
pub fn atomic_write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write(path, |w| w.write_all(bytes))
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::format(path, format!("cannot serialise JSON: {e}")))?;
    atomic_write_bytes(path, &bytes)
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// `safetensors::serialize` of `tensors` with `metadata`, its header written with sorted
/// keys: the crate writes the metadata map in hash order, which changes from one process to
/// the next, so equal contents would give files that differ byte for byte.
pub fn safetensors_bytes<S, V, I>(
    path: &Path,
    tensors: I,
    metadata: std::collections::HashMap<String, String>,
) -> Result<Vec<u8>>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    use std::collections::BTreeMap;
    let bad = |msg: String| Error::format(path, msg);
    let mut bytes =
        safetensors::serialize(tensors, Some(metadata)).map_err(|e| bad(e.to_string()))?;
    // The layout: header length (u64 LE), the JSON header padded to 8 bytes, the data.
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= bytes.len() - 8)
        .ok_or_else(|| bad("safetensors wrote no header".into()))?;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| bad(format!("header: {e}")))?;
    if let Some(meta) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> =
            serde_json::from_value(meta.take()).map_err(|e| bad(format!("metadata: {e}")))?;
        *meta = serde_json::to_value(sorted).map_err(|e| bad(format!("metadata: {e}")))?;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| bad(format!("header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() == n {
        // The same keys and values in another order: the header keeps its length, so it is
        // rewritten in place rather than copying the data (hundreds of MB for a feature set).
        bytes[8..8 + n].copy_from_slice(&json);
        return Ok(bytes);
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    out.extend(&bytes[8 + n..]);
    Ok(out)
}

/// The lowercase hex sha256 of a file's content, read in streaming fashion.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("reading", path, e))?;
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.txt");
        atomic_write_bytes(&p, b"one").unwrap();
        atomic_write_bytes(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.txt");
        atomic_write_bytes(&p, b"old").unwrap();
        let r = atomic_write(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("interrupted"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn sha256_of_known_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// The same tensors and metadata give the same bytes every time, and a file that
    /// safetensors reads back as written.
    #[test]
    fn safetensors_bytes_do_not_depend_on_hash_order() {
        use safetensors::tensor::{Dtype, SafeTensors, TensorView};
        let data: Vec<u8> = (0..24u8).collect();
        let labels = [3u8, 1, 2];
        let meta = || {
            (0..6)
                .map(|k| (format!("key{k}"), format!("value {k}")))
                .collect::<std::collections::HashMap<_, _>>()
        };
        let views = || {
            [
                ("x", TensorView::new(Dtype::F32, vec![2, 3], &data).unwrap()),
                ("y", TensorView::new(Dtype::U8, vec![3], &labels).unwrap()),
            ]
        };
        let write = || safetensors_bytes(Path::new("t.safetensors"), views(), meta()).unwrap();
        let first = write();
        for _ in 0..10 {
            assert_eq!(write(), first);
        }
        // The header was rewritten in place: the same length as safetensors' own.
        let plain = safetensors::serialize(views(), Some(meta())).unwrap();
        assert_eq!((first.len(), &first[..8]), (plain.len(), &plain[..8]));
        let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "the data starts 8-byte aligned");
        let (_, meta) = SafeTensors::read_metadata(&first).unwrap();
        let m = meta.metadata().as_ref().unwrap();
        assert_eq!((m.len(), m["key4"].as_str()), (6, "value 4"));
        let st = SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.tensor("x").unwrap().data(), &data[..]);
        assert_eq!(st.tensor("y").unwrap().shape(), &[3]);
        assert_eq!(st.tensor("y").unwrap().data(), &labels[..]);
    }
}
