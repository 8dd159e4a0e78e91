//! `fetch` and `cifar-finetune download` against an HTTP server the tests start on
//! 127.0.0.1, serving small synthetic files under the real paths: a clean download, a
//! checksum mismatch, a cut connection that the next run resumes, a server ignoring Range, a
//! 404, a server that is down, archives with escaping entries, a truncated archive and
//! offline mode; CIFAR-100's archive (the committed fixture files, packed in the real
//! layout) downloads, verifies and unpacks, and a wrong md5 is refused. No test reaches the
//! internet.
//!
//! The real checksums cannot match synthetic files, so the library tests describe the files
//! with their own [`Asset`]s (the real constants with the digest replaced), and the CLI tests
//! check the failure paths, where the real digests apply.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cifar_finetune::Error;
use cifar_finetune::data::Dataset;
use cifar_finetune::data::cifar::{self, CLASSES, Part};
use cifar_finetune::data::cifar100::{self, Cifar100, LabelKind};
use cifar_finetune::error::DownloadFailure;
use cifar_finetune::fetch::{
    self, Asset, CIFAR10_BINARY, CIFAR100_BINARY, Checksum, DownloadOptions, RESNET50_V1, Stage,
    WeightsFormat, WeightsVersion,
};
use common::http_server::{TestServer, closed_port_url};
use md5::Md5;
use sha2::{Digest, Sha256};

const CIFAR_PATH: &str = "/~kriz/cifar-10-binary.tar.gz";
const CIFAR100_PATH: &str = "/~kriz/cifar-100-binary.tar.gz";
const WEIGHTS_PATH: &str = "/models/resnet50-0676ba61.pth";
const RECORDS_PER_BATCH: usize = 3;

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn md5_hex(bytes: &[u8]) -> String {
    cifar_finetune::io::hex(&Md5::digest(bytes))
}

fn sha256_hex(bytes: &[u8]) -> String {
    cifar_finetune::io::hex(&Sha256::digest(bytes))
}

/// Batch `b` of the synthetic dataset: label `(3b + i) % 10`, pixels an asymmetric pattern.
fn batch_bytes(b: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..RECORDS_PER_BATCH {
        out.push(((3 * b + i) % 10) as u8);
        out.extend((0..cifar::IMAGE_BYTES).map(|j| ((j * 7 + i * 31 + b * 17) % 251) as u8));
    }
    out
}

/// The files of `cifar-10-batches-bin/`, in the real layout.
fn cifar_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|b| (format!("data_batch_{b}.bin"), batch_bytes(b)))
        .collect();
    files.push(("test_batch.bin".into(), batch_bytes(0)));
    files.push((
        "batches.meta.txt".into(),
        format!("{}\n\n", CLASSES.join("\n")).into_bytes(),
    ));
    files
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn append_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).unwrap();
}

/// Appends an entry whose name and link name are written byte for byte, bypassing the tar
/// crate's own refusal of `..` and absolute paths: what a hostile archive would hold.
fn append_raw(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(kind);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// A `.tar.gz` holding `dir/` and `files` in it, optionally followed by extra entries.
fn tarball_with(
    dir: &str,
    files: Vec<(String, Vec<u8>)>,
    extra: impl FnOnce(&mut tar::Builder<Vec<u8>>),
) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Directory);
    b.append_data(&mut header, format!("{dir}/"), std::io::empty())
        .unwrap();
    for (name, data) in files {
        append_file(&mut b, &format!("{dir}/{name}"), &data);
    }
    extra(&mut b);
    gzip(&b.into_inner().unwrap())
}

/// A `.tar.gz` in the real CIFAR-10 layout, optionally followed by extra entries.
fn cifar_tarball_with(extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    tarball_with("cifar-10-batches-bin", cifar_files(), extra)
}

fn cifar_tarball() -> Vec<u8> {
    cifar_tarball_with(|_| {})
}

/// The real CIFAR-10 asset, with the digest and size of `archive`.
fn cifar_asset(archive: &[u8]) -> Asset {
    Asset {
        checksum: Some(Checksum::Md5(leak(md5_hex(archive)))),
        size: Some(archive.len() as u64),
        ..CIFAR10_BINARY
    }
}

/// The files of `cifar-100-binary/`: the committed fixture (tools/gen_cifar100_fixtures.py).
fn cifar100_files() -> Vec<(String, Vec<u8>)> {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar100/cifar-100-binary");
    fetch::CIFAR100_BIN_FILES
        .iter()
        .map(|name| (name.to_string(), std::fs::read(dir.join(name)).unwrap()))
        .collect()
}

/// A `.tar.gz` in the real CIFAR-100 binary layout.
fn cifar100_tarball() -> Vec<u8> {
    tarball_with("cifar-100-binary", cifar100_files(), |_| {})
}

/// The real CIFAR-100 asset, with the digest and size of `archive`.
fn cifar100_asset(archive: &[u8]) -> Asset {
    Asset {
        checksum: Some(Checksum::Md5(leak(md5_hex(archive)))),
        size: Some(archive.len() as u64),
        ..CIFAR100_BINARY
    }
}

/// A small stand-in for the weights file, with no repeating period that could hide an
/// off-by-one in resumption.
fn weights_bytes() -> Vec<u8> {
    (0..300_000u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The real V1 weights asset, with the digest of `bytes`.
fn weights_asset(bytes: &[u8]) -> Asset {
    Asset {
        checksum: Some(Checksum::Sha256(leak(sha256_hex(bytes)))),
        ..RESNET50_V1
    }
}

fn options(base: &str) -> DownloadOptions {
    DownloadOptions {
        cifar_base_url: base.to_owned(),
        weights_base_url: base.to_owned(),
        hf_base_url: base.to_owned(),
        timeout: Duration::from_secs(5),
        ..DownloadOptions::default()
    }
}

/// Every path under `dir`, relative and sorted, with file contents, to compare trees.
fn tree(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Option<Vec<u8>>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.push((rel, None));
                walk(root, &path, out);
            } else {
                out.push((rel, Some(std::fs::read(&path).unwrap())));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn names(dir: &Path) -> Vec<String> {
    tree(dir)
        .into_iter()
        .map(|(p, _)| p.display().to_string())
        .collect()
}

fn message(err: Error) -> String {
    match &err {
        Error::Download { .. } => err.to_string(),
        other => panic!("expected Error::Download, got {other:?}"),
    }
}

/// The message of a download error of the given kind (callers can match on the kind).
fn message_of(want: DownloadFailure, err: Error) -> String {
    match &err {
        Error::Download { kind, .. } => {
            assert_eq!(*kind, want, "{err}");
            err.to_string()
        }
        other => panic!("expected Error::Download, got {other:?}"),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "{part:?} missing from message:\n{msg}");
    }
}

#[test]
fn clean_download_extracts_a_readable_dataset_and_the_weights() {
    let archive = cifar_tarball();
    let weights = weights_bytes();
    let server = TestServer::start();
    server.serve(CIFAR_PATH, archive.clone());
    server.serve(WEIGHTS_PATH, weights.clone());
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut opts = options(&server.url());
    let sink = Arc::clone(&events);
    opts.progress = Some(Box::new(move |p: &fetch::Progress<'_>| {
        sink.lock().unwrap().push((p.stage, p.done, p.total));
    }));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    let bin = fetch::ensure_cifar_with(&data, &cifar_asset(&archive), &opts).unwrap();
    assert_eq!(bin, data.join("cifar-10-batches-bin"));
    for (name, bytes) in cifar_files() {
        assert_eq!(std::fs::read(bin.join(&name)).unwrap(), bytes, "{name}");
    }
    let train = cifar::load_part(&data, Part::Train, None).unwrap();
    assert_eq!(train.len(), 5 * RECORDS_PER_BATCH);
    assert_eq!(train.labels[..3], [3, 4, 5]);
    // Image 4 is the second record of data_batch_2.
    let record = &batch_bytes(2)[cifar::RECORD_BYTES..2 * cifar::RECORD_BYTES];
    assert!(train.image(4) == &record[1..], "image 4 differs");
    let test = cifar::load_part(&data, Part::Test, None).unwrap();
    assert_eq!(test.labels, [0, 1, 2]);

    let w = fetch::ensure_weights(&data, &weights_asset(&weights), &opts).unwrap();
    assert_eq!(w, data.join("resnet50-0676ba61.pth"));
    assert_eq!(std::fs::read(&w).unwrap(), weights);

    // Nothing but the results: no .part, no staging directory; the archive is kept.
    let mut expected = vec![
        "cifar-10-batches-bin".to_string(),
        "cifar-10-binary.tar.gz".to_string(),
        "resnet50-0676ba61.pth".to_string(),
    ];
    expected.extend(
        cifar_files()
            .into_iter()
            .map(|(n, _)| format!("cifar-10-batches-bin/{n}")),
    );
    expected.sort();
    assert_eq!(names(&data), expected);

    let events = events.lock().unwrap().clone();
    let total = archive.len() as u64;
    assert!(events.contains(&(Stage::Download, total, Some(total))));
    assert!(events.contains(&(Stage::Extract, total, Some(total))));
    let w_len = weights.len() as u64;
    assert_eq!(
        events.last(),
        Some(&(Stage::Download, w_len, Some(w_len))),
        "the weights' progress ends at their full length"
    );

    // Present files are used as they are: no more requests.
    assert_eq!(server.requests().len(), 2);
    fetch::ensure_cifar_with(&data, &cifar_asset(&archive), &opts).unwrap();
    fetch::ensure_weights(&data, &weights_asset(&weights), &opts).unwrap();
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn checksum_mismatch_is_refused_and_touches_nothing() {
    let archive = cifar_tarball();
    let server = TestServer::start();
    server.serve(CIFAR_PATH, archive.clone());
    server.serve(WEIGHTS_PATH, weights_bytes());
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("notes.txt"), b"the user's own file").unwrap();

    let expected = md5_hex(b"another archive");
    let asset = Asset {
        checksum: Some(Checksum::Md5(leak(expected.clone()))),
        ..cifar_asset(&archive)
    };
    let msg = message_of(
        DownloadFailure::Checksum,
        fetch::ensure_cifar_with(&data, &asset, &opts).unwrap_err(),
    );
    let url = format!("{}{CIFAR_PATH}", server.url());
    assert_contains(
        &msg,
        &[
            "checksum mismatch",
            &md5_hex(&archive),
            &expected,
            &url,
            "md5sum cifar-10-binary.tar.gz",
            "cifar-10-batches-bin/data_batch_1.bin",
            "cifar-10-batches-bin/test_batch.bin",
            "cifar-10-binary.tar.gz.bad",
        ],
    );
    // Nothing extracted, nothing left to be used: only the user's file and the set-aside copy.
    assert_eq!(names(&data), ["cifar-10-binary.tar.gz.bad", "notes.txt"]);
    assert_eq!(
        std::fs::read(data.join("notes.txt")).unwrap(),
        b"the user's own file"
    );

    // `fetch` onto a file the user already has: the mismatch leaves it as it was.
    let dest = data.join("resnet50-0676ba61.pth");
    std::fs::write(&dest, b"user's weights").unwrap();
    let wrong = Checksum::Sha256(leak(sha256_hex(b"something else")));
    let msg = message(
        fetch::fetch(
            &format!("{}{WEIGHTS_PATH}", server.url()),
            &dest,
            Some(&wrong),
            &opts,
        )
        .unwrap_err(),
    );
    assert_contains(&msg, &["checksum mismatch", "sha256", "was not touched"]);
    assert_eq!(std::fs::read(&dest).unwrap(), b"user's weights");
    assert!(!data.join("resnet50-0676ba61.pth.part").exists());
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let weights = weights_bytes();
    let server = TestServer::start();
    server.serve(WEIGHTS_PATH, weights.clone());
    server.cut_next(WEIGHTS_PATH, 100_000);
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();
    let asset = weights_asset(&weights);

    let msg = message_of(
        DownloadFailure::Interrupted,
        fetch::ensure_weights(tmp.path(), &asset, &opts).unwrap_err(),
    );
    assert_contains(&msg, &["interrupted", "resume", WEIGHTS_PATH, "sha256sum"]);
    let part = tmp.path().join("resnet50-0676ba61.pth.part");
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept <= 100_000, "kept {kept} bytes");
    assert_eq!(std::fs::read(&part).unwrap(), weights[..kept as usize]);
    assert!(!tmp.path().join("resnet50-0676ba61.pth").exists());

    let path = fetch::ensure_weights(tmp.path(), &asset, &opts).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), weights);
    assert!(!part.exists());
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].range, None);
    assert_eq!(requests[1].range, Some(format!("bytes={kept}-")));
}

#[test]
fn an_interrupted_cifar_download_resumes_and_extracts() {
    let archive = cifar_tarball();
    let server = TestServer::start();
    server.serve(CIFAR_PATH, archive.clone());
    server.cut_next(CIFAR_PATH, archive.len() / 2);
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();
    let asset = cifar_asset(&archive);

    fetch::ensure_cifar_with(tmp.path(), &asset, &opts).unwrap_err();
    assert_eq!(names(tmp.path()), ["cifar-10-binary.tar.gz.part"]);
    let bin = fetch::ensure_cifar_with(tmp.path(), &asset, &opts).unwrap();
    assert_eq!(
        std::fs::read(bin.join("data_batch_3.bin")).unwrap(),
        batch_bytes(3)
    );
    let range = server.requests()[1].range.clone().unwrap();
    assert!(
        range.starts_with("bytes=") && range != "bytes=0-",
        "{range}"
    );
}

#[test]
fn a_server_ignoring_range_restarts_the_file_cleanly() {
    let weights = weights_bytes();
    let server = TestServer::start();
    server.serve(WEIGHTS_PATH, weights.clone());
    server.ignore_range(true);
    server.cut_next(WEIGHTS_PATH, 50_000);
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();
    let asset = weights_asset(&weights);

    fetch::ensure_weights(tmp.path(), &asset, &opts).unwrap_err();
    let path = fetch::ensure_weights(tmp.path(), &asset, &opts).unwrap();
    // Had the 200 body been appended to the kept prefix, the file would be too long.
    assert_eq!(std::fs::read(path).unwrap(), weights);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].range.is_some());
    assert_eq!(names(tmp.path()), ["resnet50-0676ba61.pth"]);
}

#[test]
fn a_stale_partial_file_is_downloaded_again_from_zero() {
    let weights = weights_bytes();
    let server = TestServer::start();
    server.serve(WEIGHTS_PATH, weights.clone());
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();
    // A prefix of some other file (say, an older version on the server).
    std::fs::write(tmp.path().join("resnet50-0676ba61.pth.part"), [0xAB; 1000]).unwrap();

    let path = fetch::ensure_weights(tmp.path(), &weights_asset(&weights), &opts).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), weights);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].range.as_deref(), Some("bytes=1000-"));
    assert_eq!(requests[1].range, None);
    assert_eq!(names(tmp.path()), ["resnet50-0676ba61.pth"]);
}

#[test]
fn not_found_names_the_status_the_url_and_the_manual_steps() {
    let server = TestServer::start();
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();

    let msg = message_of(
        DownloadFailure::Http(404),
        fetch::ensure_weights(tmp.path(), &RESNET50_V1, &opts).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[
            "HTTP 404",
            &format!("{}{WEIGHTS_PATH}", server.url()),
            "sha256sum resnet50-0676ba61.pth",
            "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
            "place it at",
        ],
    );
    let msg = message_of(
        DownloadFailure::Http(404),
        fetch::ensure_cifar(tmp.path(), &opts).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[
            "HTTP 404",
            &format!("{}{CIFAR_PATH}", server.url()),
            "c32a1d4ab5d03f1284b67883e8d87530",
            "170052171 bytes",
            "cifar-10-batches-bin/data_batch_1.bin",
        ],
    );
    assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
}

#[test]
fn a_server_that_is_down_gives_the_url_and_the_manual_steps() {
    let base = closed_port_url();
    let opts = options(&base);
    let tmp = tempfile::tempdir().unwrap();

    let msg = message_of(
        DownloadFailure::Network,
        fetch::ensure_cifar(tmp.path(), &opts).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[
            "could not download",
            &format!("{base}{CIFAR_PATH}"),
            "md5sum cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
            "cifar-10-batches-bin/batches.meta.txt",
        ],
    );
    let msg = message_of(
        DownloadFailure::Network,
        fetch::ensure_weights(tmp.path(), &RESNET50_V1, &opts).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[&format!("{base}{WEIGHTS_PATH}"), "resnet50-0676ba61.pth"],
    );
    assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
}

/// Archives that try to write outside the target directory.
fn hostile_archives(outside: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let absolute = outside.join("absolute.txt").display().to_string();
    vec![
        (
            "parent",
            cifar_tarball_with(|b| {
                append_raw(b, "../evil.txt", tar::EntryType::Regular, None, b"evil")
            }),
        ),
        (
            "nested parent",
            cifar_tarball_with(|b| {
                append_raw(
                    b,
                    "cifar-10-batches-bin/../../evil.txt",
                    tar::EntryType::Regular,
                    None,
                    b"evil",
                )
            }),
        ),
        (
            "absolute",
            cifar_tarball_with(|b| {
                append_raw(b, &absolute, tar::EntryType::Regular, None, b"evil")
            }),
        ),
        (
            // The classic: a link out, then a file written through it.
            "symlink",
            cifar_tarball_with(|b| {
                append_raw(
                    b,
                    "cifar-10-batches-bin/escape",
                    tar::EntryType::Symlink,
                    Some("../../outside"),
                    b"",
                );
                append_raw(
                    b,
                    "cifar-10-batches-bin/escape/through-link.txt",
                    tar::EntryType::Regular,
                    None,
                    b"evil",
                );
            }),
        ),
        (
            "hard link",
            cifar_tarball_with(|b| {
                append_raw(
                    b,
                    "cifar-10-batches-bin/passwd",
                    tar::EntryType::Link,
                    Some("/etc/passwd"),
                    b"",
                )
            }),
        ),
    ]
}

#[test]
fn archives_with_escaping_entries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let data = tmp.path().join("work/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("keep.txt"), b"keep").unwrap();

    for (kind, archive) in hostile_archives(&outside) {
        // Directly.
        let path = tmp.path().join("hostile.tar.gz");
        std::fs::write(&path, &archive).unwrap();
        let before = tree(&data);
        let err = fetch::extract_tar_gz(&path, &data).unwrap_err();
        assert!(err.to_string().contains("refus"), "{kind}: {err}");
        assert_eq!(tree(&data), before, "{kind}: target changed");

        // Through `ensure_cifar_with`, served with a matching checksum.
        let server = TestServer::start();
        server.serve(CIFAR_PATH, archive.clone());
        let msg = message_of(
            DownloadFailure::Archive,
            fetch::ensure_cifar_with(&data, &cifar_asset(&archive), &options(&server.url()))
                .unwrap_err(),
        );
        assert_contains(
            &msg,
            &[
                "extracting",
                "refus",
                "cifar-10-batches-bin/data_batch_1.bin",
            ],
        );
        // The verified archive stays for inspection; nothing else appeared.
        assert_eq!(
            names(&data),
            ["cifar-10-binary.tar.gz", "keep.txt"],
            "{kind}"
        );
        std::fs::remove_file(data.join("cifar-10-binary.tar.gz")).unwrap();

        assert!(names(&outside).is_empty(), "{kind}: wrote outside");
        assert!(!tmp.path().join("evil.txt").exists(), "{kind}");
        assert!(!tmp.path().join("work/evil.txt").exists(), "{kind}");
    }
}

#[test]
fn a_truncated_archive_leaves_nothing_half_extracted() {
    let whole = cifar_tarball();
    let archive = whole[..whole.len() * 2 / 3].to_vec();
    let server = TestServer::start();
    server.serve(CIFAR_PATH, archive.clone());
    let tmp = tempfile::tempdir().unwrap();

    let msg = message_of(
        DownloadFailure::Archive,
        fetch::ensure_cifar_with(tmp.path(), &cifar_asset(&archive), &options(&server.url()))
            .unwrap_err(),
    );
    assert_contains(
        &msg,
        &["extracting", "cifar-10-binary.tar.gz", "data_batch_1.bin"],
    );
    assert_eq!(names(tmp.path()), ["cifar-10-binary.tar.gz"]);
}

#[test]
fn an_archive_already_present_is_verified_before_use() {
    let archive = cifar_tarball();
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start();
    let opts = options(&server.url());

    // A good archive put there by hand is unpacked without any network.
    std::fs::write(tmp.path().join("cifar-10-binary.tar.gz"), &archive).unwrap();
    fetch::ensure_cifar_with(tmp.path(), &cifar_asset(&archive), &opts).unwrap();
    assert!(server.requests().is_empty());

    // A damaged one is reported and left alone.
    let other = tempfile::tempdir().unwrap();
    let mut damaged = archive.clone();
    damaged[100] ^= 0xFF;
    std::fs::write(other.path().join("cifar-10-binary.tar.gz"), &damaged).unwrap();
    let msg = message_of(
        DownloadFailure::Conflict,
        fetch::ensure_cifar_with(other.path(), &cifar_asset(&archive), &opts).unwrap_err(),
    );
    assert_contains(&msg, &["exists but its md5", "left untouched"]);
    assert_eq!(
        std::fs::read(other.path().join("cifar-10-binary.tar.gz")).unwrap(),
        damaged
    );
    assert_eq!(names(other.path()), ["cifar-10-binary.tar.gz"]);
    assert!(server.requests().is_empty());
}

#[test]
fn an_incomplete_dataset_directory_is_left_alone() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("data_batch_1.bin"), batch_bytes(1)).unwrap();
    let before = tree(tmp.path());

    let msg = message_of(
        DownloadFailure::Conflict,
        fetch::ensure_cifar(tmp.path(), &options(&server.url())).unwrap_err(),
    );
    assert_contains(&msg, &["lacks", "data_batch_2.bin", "test_batch.bin"]);
    assert_eq!(tree(tmp.path()), before);
    assert!(server.requests().is_empty());
}

/// Writes a complete (synthetic) dataset directory and a weights file into `data`.
fn place_everything(data: &Path) {
    let bin = data.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, bytes) in cifar_files() {
        std::fs::write(bin.join(name), bytes).unwrap();
    }
    std::fs::write(data.join("resnet50-0676ba61.pth"), weights_bytes()).unwrap();
}

#[test]
fn offline_mode_says_what_is_missing_and_uses_no_network() {
    let server = TestServer::start();
    server.serve(CIFAR_PATH, cifar_tarball());
    server.serve(WEIGHTS_PATH, weights_bytes());
    let mut opts = options(&server.url());
    opts.offline = true;
    let tmp = tempfile::tempdir().unwrap();

    let msg = message_of(
        DownloadFailure::Offline,
        fetch::ensure_cifar(tmp.path(), &opts).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[
            "offline",
            "cifar-10-batches-bin",
            &format!("{}{CIFAR_PATH}", server.url()),
            "c32a1d4ab5d03f1284b67883e8d87530",
        ],
    );
    let msg = message_of(
        DownloadFailure::Offline,
        fetch::ensure_weights(tmp.path(), &RESNET50_V1, &opts).unwrap_err(),
    );
    assert_contains(
        &msg,
        &["offline", "resnet50-0676ba61.pth", "0676ba61b6795bbe"],
    );
    assert!(server.requests().is_empty());
    assert!(names(tmp.path()).is_empty());

    // With the files present, offline mode is no obstacle.
    place_everything(tmp.path());
    fetch::ensure_cifar(tmp.path(), &opts).unwrap();
    fetch::ensure_weights(tmp.path(), &RESNET50_V1, &opts).unwrap();
    assert!(server.requests().is_empty());
}

#[test]
fn cifar100_downloads_verifies_and_unpacks_to_a_readable_dataset() {
    let archive = cifar100_tarball();
    let server = TestServer::start();
    server.serve(CIFAR100_PATH, archive.clone());
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    let bin = fetch::ensure_cifar100_with(&data, &cifar100_asset(&archive), &opts).unwrap();
    assert_eq!(bin, data.join("cifar-100-binary"));
    for (name, bytes) in cifar100_files() {
        assert_eq!(std::fs::read(bin.join(&name)).unwrap(), bytes, "{name}");
    }
    let mut expected = vec![
        "cifar-100-binary".to_string(),
        "cifar-100-binary.tar.gz".to_string(),
    ];
    expected.extend(
        fetch::CIFAR100_BIN_FILES
            .iter()
            .map(|n| format!("cifar-100-binary/{n}")),
    );
    expected.sort();
    let mut got = names(&data);
    got.sort();
    assert_eq!(got, expected);

    // What was unpacked is CIFAR-100 as the reader sees it, fine and coarse.
    let fine = Cifar100::open(&data, LabelKind::Fine).unwrap();
    assert_eq!(fine.classes().len(), 100);
    assert_eq!(fine.labels(Part::Test).unwrap(), [1, 98, 85, 64]);
    let coarse = cifar100::load_part(&data, Part::Train, LabelKind::Coarse, None).unwrap();
    assert_eq!(coarse.len(), 6);

    // Complete: no more requests, even with the real (unmatchable) digest.
    fetch::ensure_cifar100(&data, &opts).unwrap();
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn cifar100_with_a_wrong_md5_is_refused_and_nothing_unpacked() {
    let archive = cifar100_tarball();
    let server = TestServer::start();
    server.serve(CIFAR100_PATH, archive.clone());
    let tmp = tempfile::tempdir().unwrap();
    let expected = md5_hex(b"another archive");
    let asset = Asset {
        checksum: Some(Checksum::Md5(leak(expected.clone()))),
        ..cifar100_asset(&archive)
    };
    let msg = message_of(
        DownloadFailure::Checksum,
        fetch::ensure_cifar100_with(tmp.path(), &asset, &options(&server.url())).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[
            "checksum mismatch",
            &md5_hex(&archive),
            &expected,
            &format!("{}{CIFAR100_PATH}", server.url()),
            "md5sum cifar-100-binary.tar.gz",
            "cifar-100-binary/train.bin",
            "cifar-100-binary/fine_label_names.txt",
        ],
    );
    assert_eq!(names(tmp.path()), ["cifar-100-binary.tar.gz.bad"]);

    // The real asset names the published md5 and size in its manual steps.
    let server = TestServer::start();
    let msg = message_of(
        DownloadFailure::Http(404),
        fetch::ensure_cifar100(tmp.path(), &options(&server.url())).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[
            "HTTP 404",
            "03b5dce01913d631647c71ecec9e9cb8",
            "168513733 bytes",
            "cifar-100-binary/coarse_label_names.txt",
        ],
    );

    // An incomplete directory is left alone.
    let dir = tmp.path().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("train.bin"), b"x").unwrap();
    let msg = message_of(
        DownloadFailure::Conflict,
        fetch::ensure_cifar100(tmp.path(), &options(&server.url())).unwrap_err(),
    );
    assert_contains(&msg, &["lacks test.bin", "download CIFAR-100 afresh"]);
    assert_eq!(std::fs::read(dir.join("train.bin")).unwrap(), b"x");
}

fn cli() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
    for var in [
        fetch::ENV_CIFAR_URL,
        fetch::ENV_WEIGHTS_URL,
        fetch::ENV_HF_URL,
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn cli_download_refuses_a_wrong_archive_with_manual_steps() {
    // The binary pins the real size and md5, which the synthetic archive cannot match: the
    // announced length already gives it away, before any byte is stored.
    let server = TestServer::start();
    server.serve(CIFAR_PATH, cifar_tarball());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    let out = cli()
        .args(["download", "--weights", "none", "--data"])
        .arg(&data)
        .args(["--cifar-url", &server.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_contains(
        &stderr,
        &[
            &format!("{}{CIFAR_PATH}", server.url()),
            "170052171 were expected",
            "Nothing was downloaded",
            "md5sum cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
            "cifar-10-batches-bin/data_batch_1.bin",
        ],
    );
    assert_eq!(server.requests().len(), 1);
    assert!(names(&data).is_empty(), "{:?}", names(&data));
}

#[test]
fn cli_download_offline_lists_everything_missing() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = cli()
        .args(["download", "--offline", "--data"])
        .arg(tmp.path())
        .env(fetch::ENV_WEIGHTS_URL, server.url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_contains(
        &stderr,
        &[
            "2 downloads failed",
            "cifar-10-batches-bin",
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            // The environment variable moved the weights' URL.
            &format!("{}{WEIGHTS_PATH}", server.url()),
        ],
    );
    assert!(server.requests().is_empty());
}

#[test]
fn cli_download_with_everything_present_says_where_it_is() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().unwrap();
    place_everything(tmp.path());
    let out = cli()
        .args(["download", "--data"])
        .arg(tmp.path())
        .args(["--cifar-url", &server.url(), "--weights-url", &server.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_contains(
        &stdout,
        &[
            &tmp.path()
                .join("cifar-10-batches-bin")
                .display()
                .to_string(),
            &tmp.path()
                .join("resnet50-0676ba61.pth")
                .display()
                .to_string(),
        ],
    );
    assert!(server.requests().is_empty());
}

#[test]
fn cli_download_cifar100_fetches_cifar100_only() {
    // The real size and md5 cannot match the synthetic archive: refused before any byte is
    // stored, naming CIFAR-100's archive and layout; CIFAR-10 was not asked for.
    let server = TestServer::start();
    server.serve(CIFAR100_PATH, cifar100_tarball());
    server.serve(CIFAR_PATH, cifar_tarball());
    let tmp = tempfile::tempdir().unwrap();
    let out = cli()
        .args(["download", "cifar100", "--weights", "none", "--data"])
        .arg(tmp.path())
        .args(["--cifar-url", &server.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_contains(
        &stderr,
        &[
            &format!("{}{CIFAR100_PATH}", server.url()),
            "168513733 were expected",
            "03b5dce01913d631647c71ecec9e9cb8",
            "cifar-100-binary/train.bin",
        ],
    );
    assert!(!stderr.contains("cifar-10-binary"), "{stderr}");
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, CIFAR100_PATH);

    // Both datasets present: both reported, no request.
    let server = TestServer::start();
    place_everything(tmp.path());
    let dir = tmp.path().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in cifar100_files() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let out = cli()
        .args([
            "download",
            "cifar10",
            "cifar100",
            "--weights",
            "none",
            "--data",
        ])
        .arg(tmp.path())
        .args(["--cifar-url", &server.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_contains(
        &stdout,
        &[
            &format!(
                "CIFAR-10: {}",
                tmp.path().join("cifar-10-batches-bin").display()
            ),
            &format!("CIFAR-100: {}", dir.display()),
            "fine_label_names.txt",
        ],
    );
    assert!(server.requests().is_empty());
}

/// torchvision's weights other than ResNet-50's are verified by the sha256 prefix their
/// names carry: a file whose digest starts so is accepted, any other is set aside, with the
/// prefix in the message and the manual steps.
#[test]
fn a_sha256_prefix_is_verified() {
    let real = fetch::pretrained("resnet18", WeightsVersion::V1, WeightsFormat::Pth).unwrap();
    assert_eq!(real.file_name, "resnet18-f37072fd.pth");
    let path = real.url_path;
    let weights = weights_bytes();
    let server = TestServer::start();
    server.serve(path, weights.clone());
    let opts = options(&server.url());
    let tmp = tempfile::tempdir().unwrap();

    // The prefix of these bytes' digest in place of torchvision's.
    let prefix = leak(sha256_hex(&weights)[..8].to_string());
    let good = Asset {
        checksum: Some(Checksum::Sha256Prefix(prefix)),
        ..*real
    };
    let got = fetch::ensure_weights(tmp.path(), &good, &opts).unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), weights);
    std::fs::remove_file(&got).unwrap();

    // The real prefix cannot match these bytes.
    let msg = message_of(
        DownloadFailure::Checksum,
        fetch::ensure_weights(tmp.path(), real, &opts).unwrap_err(),
    );
    assert_contains(
        &msg,
        &[
            "checksum mismatch",
            &sha256_hex(&weights),
            "expected one starting with f37072fd",
            "`sha256sum resnet18-f37072fd.pth` prints one starting with f37072fd",
            "resnet18-f37072fd.pth.bad",
        ],
    );
    assert_eq!(names(tmp.path()), ["resnet18-f37072fd.pth.bad"]);
}

/// `download --backbone` fetches that backbone's file, verified by its prefix; a version
/// torchvision does not have is refused before any request.
#[test]
fn cli_download_of_another_backbone_checks_its_prefix() {
    let server = TestServer::start();
    server.serve("/models/resnet101-cd907fc2.pth", weights_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let out = cli()
        .args(["download", "--no-cifar", "--backbone", "resnet101"])
        .args(["--weights", "v2", "--data"])
        .arg(tmp.path())
        .args(["--weights-url", &server.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_contains(
        &stderr,
        &[
            &format!("{}/models/resnet101-cd907fc2.pth", server.url()),
            "checksum mismatch",
            "expected one starting with cd907fc2",
        ],
    );
    assert_eq!(names(tmp.path()), ["resnet101-cd907fc2.pth.bad"]);

    let out = cli()
        .args(["download", "--no-cifar", "--backbone", "resnet34"])
        .args(["--weights", "v2", "--data"])
        .arg(tmp.path())
        .args(["--weights-url", &server.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_contains(
        &stderr,
        &["no IMAGENET1K_V2 weights for resnet34", "resnet101"],
    );
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn cli_download_help_says_what_is_verified_how() {
    let out = cli().args(["download", "--help"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_contains(
        &stdout,
        &[
            "resnet50's v1 and v2 against their whole digest",
            "first 8 hex digits of its sha256",
            "are not verified",
            "wide_resnet101_2",
        ],
    );
}
