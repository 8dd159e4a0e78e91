//! The feature cache: reuse, validation, fingerprints, and resuming a killed extraction.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cifar_finetune::backbone::resnet::ResNet50;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::data::cifar::{Cifar10, Part};
use cifar_finetune::data::transform::Preprocess;
use cifar_finetune::features::{self, CacheOptions, Extractor, FeatureSet, Progress, Shard};
use cifar_finetune::io::DirLock;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar")
}

fn cifar10() -> Cifar10 {
    Cifar10::open(&data_dir()).unwrap()
}

/// A full synthetic ResNet-50 weights file in `dir`.
fn write_weights(dir: &Path) -> PathBuf {
    let path = dir.join("resnet50.safetensors");
    let sd = weights::synthetic_state_dict().unwrap();
    weights::write_safetensors(&sd, &path).unwrap();
    path
}

fn extractor(pre: Preprocess) -> Extractor {
    let sd = weights::synthetic_state_dict().unwrap();
    let model = ResNet50::from_state_dict(StateDict::from_tensors("synthetic", sd)).unwrap();
    Extractor::new(model, pre, "synthetic")
}

fn extract(
    ex: &Extractor,
    cache: &Path,
    limit: Option<usize>,
    shard_size: usize,
) -> (FeatureSet, Progress) {
    let opts = CacheOptions {
        batch_size: 2,
        shard_size,
        ..CacheOptions::new(cache)
    };
    let mut last = None;
    let set = features::cached_part(ex, &cifar10(), Part::Train, limit, &opts, &mut |p| {
        last = Some(p)
    })
    .unwrap()
    .set;
    (set, last.unwrap())
}

fn shard_files(cache: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

#[test]
fn second_run_reads_everything_from_the_cache() {
    let ex = extractor(Preprocess::imagenet(32));
    let cache = tempfile::tempdir().unwrap();
    let (a, p) = extract(&ex, cache.path(), None, 4);
    assert_eq!(p.cached, 0);
    assert_eq!(p.done, a.len());
    assert!(a.len() >= 10, "fixture should have a few records per batch");
    assert_eq!(a.index, (0..a.len() as u32).collect::<Vec<_>>());
    let (b, p) = extract(&ex, cache.path(), None, 4);
    assert_eq!(p.cached, b.len());
    assert!(a == b);
    // The same rows straight from the backbone, without any cache.
    let data = cifar_finetune::data::cifar::load_part(&data_dir(), Part::Train, None).unwrap();
    let direct = ex.extract(&[data.image(0), data.image(7)], 32, 32).unwrap();
    assert!(&direct[..2048] == a.row(0));
    assert!(&direct[2048..] == a.row(7));
    assert_eq!(a.labels, data.labels);
}

#[test]
fn limit_then_more_extracts_only_the_new_images() {
    let ex = extractor(Preprocess::imagenet(32));
    let cache = tempfile::tempdir().unwrap();
    let (small, p) = extract(&ex, cache.path(), Some(5), 4);
    assert_eq!((small.len(), p.cached), (5, 0));
    // Shards by chunk of 4 rows: {0..4}, {4}.
    assert_eq!(shard_files(cache.path()).len(), 2);
    let (full, p) = extract(&ex, cache.path(), None, 4);
    // Rows 0..5 are reused as they are; the chunk [4, 8) computes only 5, 6 and 7.
    assert_eq!(p.cached, 5);
    assert!(full.features[..5 * 2048] == small.features[..]);
    let shards: Vec<Shard> = shard_files(cache.path())
        .iter()
        .map(|p| Shard::read(p).unwrap())
        .collect();
    let mut sizes: Vec<usize> = shards.iter().map(|s| s.keys.len()).collect();
    sizes.sort_unstable();
    let chunks_after = (full.len() - 8).div_ceil(4);
    assert_eq!(sizes.len(), 3 + chunks_after, "{sizes:?}");
    assert!(sizes.contains(&1) && sizes.contains(&3), "{sizes:?}");
    // Every shard is named by its keys.
    for (shard, path) in shards.iter().zip(shard_files(cache.path())) {
        assert_eq!(
            path.file_name().unwrap().to_string_lossy(),
            shard.file_name()
        );
    }
    // A smaller limit afterwards reads what is there.
    let (again, p) = extract(&ex, cache.path(), Some(6), 4);
    assert_eq!(p.cached, 6);
    assert!(again.features[..] == full.features[..6 * 2048]);
}

#[test]
fn other_preprocessing_never_uses_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let (a, _) = extract(
        &extractor(Preprocess::imagenet(32)),
        cache.path(),
        Some(4),
        4,
    );
    let (b, p) = extract(&extractor(Preprocess::half(32)), cache.path(), Some(4), 4);
    assert_eq!(p.cached, 0);
    assert_ne!(a.features, b.features);
    assert_ne!(a.extractor, b.extractor);
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 2);
}

#[test]
fn damaged_shards_are_recomputed_not_used() {
    let ex = extractor(Preprocess::imagenet(32));
    let cache = tempfile::tempdir().unwrap();
    let (good, _) = extract(&ex, cache.path(), Some(8), 4);
    let shards = shard_files(cache.path());
    assert_eq!(shards.len(), 2);
    // A truncated shard, and a shard of another extractor (its metadata rewritten, the
    // header keeping its length).
    let bytes = std::fs::read(&shards[0]).unwrap();
    std::fs::write(&shards[0], &bytes[..bytes.len() / 2]).unwrap();
    let mut shard = Shard::read(&shards[1]).unwrap();
    shard.extractor.weights_sha256 = "0ther".into();
    shard.write(&shards[1]).unwrap();
    let (again, p) = extract(&ex, cache.path(), Some(8), 4);
    assert_eq!(p.cached, 0);
    assert!(again == good);
    // Both were rewritten, under their own names.
    assert_eq!(shard_files(cache.path()), shards);
    for p in &shards {
        assert_eq!(Shard::read(p).unwrap().extractor, *ex.fingerprint());
    }
}

#[test]
fn a_tampered_fingerprint_file_is_an_error() {
    let ex = extractor(Preprocess::imagenet(32));
    let cache = tempfile::tempdir().unwrap();
    extract(&ex, cache.path(), Some(2), 4);
    let dir = std::fs::read_dir(cache.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let fp = dir.join("fingerprint.json");
    let text = std::fs::read_to_string(&fp)
        .unwrap()
        .replace("synthetic", "other");
    std::fs::write(&fp, text).unwrap();
    let opts = CacheOptions {
        batch_size: 2,
        shard_size: 4,
        ..CacheOptions::new(cache.path())
    };
    let err = features::cached_part(&ex, &cifar10(), Part::Train, Some(2), &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fingerprint.json") && err.contains("fingerprint mismatch"),
        "{err}"
    );
}

fn features_cmd(weights: &Path, cache: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
    cmd.arg("features")
        .arg("--data")
        .arg(data_dir())
        .arg("--weights")
        .arg(weights)
        .arg("--cache-dir")
        .arg(cache)
        .args([
            "--offline",
            "--split",
            "all",
            "--shard-size",
            "1",
            "--batch-size",
            "1",
        ])
        .args(["--image-size", "160"])
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn killed_extraction_resumes_to_identical_features() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = write_weights(tmp.path());
    // Uninterrupted reference.
    let out_ref = tmp.path().join("ref.safetensors");
    let status = features_cmd(&weights, &tmp.path().join("cache-ref"), &out_ref)
        .status()
        .unwrap();
    assert!(status.success());

    // Abort (as kill -9 would) right after the third new shard, then run again.
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out.safetensors");
    let status = features_cmd(&weights, &cache, &out)
        .env("CIFAR_FINETUNE_CRASH_AFTER_SHARDS", "3")
        .status()
        .unwrap();
    assert!(!status.success(), "the crash hook did not fire");
    assert_eq!(shard_files(&cache).len(), 3);
    assert!(!out.exists());
    let before: Vec<(PathBuf, std::time::SystemTime)> = shard_files(&cache)
        .into_iter()
        .map(|p| {
            let t = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, t)
        })
        .collect();
    // No temporary file is ever taken for a shard.
    for (p, _) in &before {
        Shard::read(p).unwrap();
    }

    let output = features_cmd(&weights, &cache, &out).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The shards written before the kill were reused, not recomputed.
    for (p, t) in &before {
        assert_eq!(
            std::fs::metadata(p).unwrap().modified().unwrap(),
            *t,
            "{}",
            p.display()
        );
    }
    let a = FeatureSet::read(&out_ref).unwrap();
    let b = FeatureSet::read(&out).unwrap();
    assert!(a == b, "resumed features differ from the uninterrupted run");
    // --split all: the training part then the test part, `index` counting over both.
    assert_eq!(b.index, (0..b.len() as u32).collect::<Vec<_>>());
    assert_eq!(b.dim, 2048);
}

#[test]
fn missing_weights_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .args(["features", "--offline", "--weights"])
        .arg(tmp.path().join("nope.pth"))
        .arg("--data")
        .arg(data_dir())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("nope.pth"), "{err}");
}

/// A copy of the CIFAR-10 fixtures in `dir`, binary version only.
fn copy_cifar(dir: &Path) -> PathBuf {
    let src = data_dir().join("cifar-10-batches-bin");
    let dst = dir.join("data/cifar-10-batches-bin");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dir.join("data")
}

fn features_on(data: &Path, weights: &Path, cache: &Path, split: &str) -> std::process::Output {
    features_on_cmd(data, weights, cache, split)
        .output()
        .unwrap()
}

fn features_on_cmd(data: &Path, weights: &Path, cache: &Path, split: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cifar-finetune"));
    cmd.args([
        "features",
        "--offline",
        "--image-size",
        "32",
        "--split",
        split,
    ])
    .arg("--data")
    .arg(data)
    .arg("--weights")
    .arg(weights)
    .arg("--cache-dir")
    .arg(cache)
    .arg("--out")
    .arg(cache.with_extension("out.safetensors"));
    cmd
}

#[test]
fn a_command_needs_only_its_parts_and_checks_them_before_extracting() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = write_weights(tmp.path());
    let data = copy_cifar(tmp.path());
    let bin = data.join("cifar-10-batches-bin");

    // The test part is not needed for the training split.
    std::fs::rename(
        bin.join("test_batch.bin"),
        tmp.path().join("test_batch.bin"),
    )
    .unwrap();
    let cache = tmp.path().join("cache-train");
    let out = features_on(&data, &weights, &cache, "train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A bad label in the test part is reported before any training image is extracted.
    let mut test = std::fs::read(tmp.path().join("test_batch.bin")).unwrap();
    test[3073] = 10; // the second record's label
    std::fs::write(bin.join("test_batch.bin"), &test).unwrap();
    let cache = tmp.path().join("cache-all");
    let out = features_on(&data, &weights, &cache, "all");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("test_batch.bin") && err.contains("record 1") && err.contains("label 10"),
        "{err}"
    );
    assert!(!cache.exists() || shard_files(&cache).is_empty());
}

/// The byte range of tensor `name`'s data in a safetensors file.
fn tensor_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let at = |k: usize| 8 + n + off[k].as_u64().unwrap() as usize;
    at(0)..at(1)
}

#[test]
fn corrupt_feature_values_are_caught_and_recomputed() {
    let ex = extractor(Preprocess::imagenet(32));
    let cache = tempfile::tempdir().unwrap();
    let (good, _) = extract(&ex, cache.path(), Some(4), 4);
    let shard = shard_files(cache.path())[0].clone();
    let original = std::fs::read(&shard).unwrap();
    // A non-zero feature of row 1, so that zeroing it is a change.
    let col = good.row(1).iter().position(|&v| v != 0.0).unwrap();
    let at = tensor_range(&original, "features").start + 4 * (2048 + col);
    for (what, value) in [
        ("a flipped byte", None),
        ("zero", Some(0f32)),
        ("3e38", Some(3e38)),
        ("NaN", Some(f32::NAN)),
    ] {
        let mut bytes = original.clone();
        match value {
            None => bytes[at + 1] ^= 0x5a,
            Some(v) => bytes[at..at + 4].copy_from_slice(&v.to_le_bytes()),
        }
        std::fs::write(&shard, &bytes).unwrap();
        let err = Shard::read(&shard).unwrap_err().to_string();
        assert!(
            err.contains("checksum") && err.contains("damaged"),
            "{what}: {err}"
        );
        let (again, p) = extract(&ex, cache.path(), Some(4), 4);
        assert_eq!(p.cached, 0, "{what}: the damaged shard was used");
        assert!(again == good, "{what}: recomputed features differ");
    }
    // A NaN under a matching checksum (a file rewritten by another tool) is refused too,
    // naming the row.
    let mut set = Shard::read(&shard).unwrap();
    set.features[2048 + col] = f32::NAN;
    set.write(&shard).unwrap();
    let err = Shard::read(&shard).unwrap_err().to_string();
    assert!(err.contains("row 1") && err.contains("NaN"), "{err}");
    let (again, p) = extract(&ex, cache.path(), Some(4), 4);
    assert!(p.cached == 0 && again == good);
}

#[test]
fn a_cache_part_being_written_is_locked_and_stale_temporaries_go() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = write_weights(tmp.path());
    let cache = tmp.path().join("cache");
    let first = features_on(&data_dir(), &weights, &cache, "train");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let part = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("train-")
        })
        .unwrap();

    let remove_a_shard = || {
        let shard = shard_files(&cache).pop().unwrap();
        std::fs::remove_file(shard).unwrap();
    };
    // Another process holds the part: reading what is cached needs no lock...
    let lock = DirLock::acquire(&part, "test", false).unwrap();
    let out = features_on(&data_dir(), &weights, &cache, "train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...but writing is refused at once, naming the holder.
    remove_a_shard();
    let out = features_on(&data_dir(), &weights, &cache, "train");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(".lock") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );

    // With --wait-lock it waits for the holder, then removes what a killed writer left.
    std::fs::write(part.join(".tmp-stale"), b"half a shard").unwrap();
    let before = shard_files(&cache).len();
    let mut child = features_on_cmd(&data_dir(), &weights, &cache, "train")
        .arg("--wait-lock")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "did not wait for the lock"
    );
    drop(lock);
    assert!(child.wait().unwrap().success());
    assert!(!part.join(".tmp-stale").exists());
    assert_eq!(shard_files(&cache).len(), before + 1);
}

#[test]
fn batch_and_shard_sizes_beyond_the_data_are_bounded_by_it() {
    let ex = extractor(Preprocess::imagenet(32));
    let cache = tempfile::tempdir().unwrap();
    let opts = CacheOptions {
        batch_size: usize::MAX,
        shard_size: usize::MAX,
        ..CacheOptions::new(cache.path())
    };
    let set = features::cached_part(&ex, &cifar10(), Part::Train, Some(3), &opts, &mut |_| {})
        .unwrap()
        .set;
    assert_eq!(set.len(), 3);
    assert_eq!(shard_files(cache.path()).len(), 1);
}

/// `features` as worker `index` of `count` (None: one plain run writing `out`).
fn worker_cmd(weights: &Path, cache: &Path, shard: Option<(usize, usize)>) -> Command {
    let mut cmd = features_on_cmd(&data_dir(), weights, cache, "all");
    cmd.args(["--shard-size", "3", "--batch-size", "2"]);
    if let Some((index, count)) = shard {
        cmd.arg("--num-shards").arg(count.to_string());
        // Worker 1 finds its index where a Kubernetes Indexed Job puts it.
        if index == 1 {
            cmd.env("JOB_COMPLETION_INDEX", "1");
        } else {
            cmd.arg("--shard-index").arg(index.to_string());
        }
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Every file of a cache directory (locks excepted), by path relative to it, with the
/// XXH3 of its bytes.
fn cache_files(cache: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    for part in std::fs::read_dir(cache).unwrap() {
        let part = part.unwrap().path();
        for f in std::fs::read_dir(&part).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with(".lock") {
                let rel = f.strip_prefix(cache).unwrap().to_path_buf();
                let bytes = std::fs::read(&f).unwrap();
                files.push((rel, xxhash_rust::xxh3::xxh3_64(&bytes)));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn three_workers_fill_the_cache_one_process_would() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = write_weights(tmp.path());
    let single = tmp.path().join("single");
    let out = worker_cmd(&weights, &single, None).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Three workers at once, as three machines of a job array would run.
    let shared = tmp.path().join("shared");
    let children: Vec<_> = (0..3)
        .map(|i| worker_cmd(&weights, &shared, Some((i, 3))).spawn().unwrap())
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "worker {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("shard {i} of 3")), "{stdout}");
    }
    assert_eq!(
        cache_files(&shared),
        cache_files(&single),
        "the workers' cache differs from one run's"
    );
    // The next command reads it whole, computing nothing.
    let out = worker_cmd(&weights, &shared, None).output().unwrap();
    assert!(out.status.success());
    let a = FeatureSet::read(&single.with_extension("out.safetensors")).unwrap();
    let b = FeatureSet::read(&shared.with_extension("out.safetensors")).unwrap();
    assert!(a == b);
    assert_eq!(cache_files(&shared), cache_files(&single));

    // A worker index out of range is refused, naming the flag.
    let out = worker_cmd(&weights, &shared, Some((3, 3)))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--shard-index"),
        "{err}"
    );
}
