//! One file over HTTP: resume with `Range`, verify while streaming, atomic rename, and a
//! failure that says what to do by hand.

use super::*;

/// One file to fetch, with everything its messages need.
pub(super) struct Target<'a> {
    /// What the file is, for the offline message.
    pub(super) what: String,
    pub(super) url: &'a str,
    pub(super) dest: &'a Path,
    pub(super) checksum: Option<&'a Checksum>,
    pub(super) size: Option<u64>,
    /// The manual steps appended to every error.
    pub(super) manual: &'a str,
}

/// The body of [`fetch`]: download, verify (retrying once from zero after a resume), rename.
pub(super) fn fetch_target(t: &Target<'_>, opts: &DownloadOptions) -> Result<()> {
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
                checksum.expectation(),
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
pub(super) fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
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
pub(super) enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
}

impl Hasher {
    pub(super) fn new(checksum: &Checksum) -> Self {
        match checksum {
            Checksum::Md5(_) => Hasher::Md5(Md5::new()),
            Checksum::Sha256(_) | Checksum::Sha256Prefix(_) => Hasher::Sha256(Sha256::new()),
        }
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    pub(super) fn finish(self) -> String {
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
pub(super) fn hash_file(
    path: &Path,
    checksum: &Checksum,
    opts: &DownloadOptions,
) -> Result<String> {
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
pub(super) struct ProgressReader<'a, R> {
    pub(super) inner: R,
    pub(super) stage: Stage,
    pub(super) file: &'a Path,
    pub(super) done: u64,
    pub(super) total: u64,
    pub(super) opts: &'a DownloadOptions,
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
