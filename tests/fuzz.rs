//! Byte-mutation fuzzing of every reader of untrusted files, driven by proptest.
//!
//! Each target starts from real files — the committed fixtures for the formats others write
//! (CIFAR-10 and CIFAR-100 binary and python batches, torch.save `.pth`, `.safetensors`,
//! backprop parameter files, image files of every format an image folder may hold), and files
//! our own writers produce for ours (feature shards,
//! checkpoints, `history.csv`, `predictions.csv`) — and feeds the reader mutated copies:
//! flipped bits, overwritten, inserted, deleted and duplicated bytes, truncations. A reader
//! may accept or refuse a mutated file, but must never panic, hang or abort.
//!
//! The inputs are a fixed pseudo-random stream and the number of cases per target is bounded,
//! so that CI is reproducible and the whole file runs in well under a minute;
//! `FUZZ_CASES=N FUZZ_SEED=S` runs more or other ones. Proptest shrinks a failing input to a
//! minimal one, which then becomes a regression test.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use cifar_finetune::backbone::fast::Precision;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::backprop::Problem;
use cifar_finetune::data::cifar::{self, Part, Split};
use cifar_finetune::data::decode::{self, DecodeLimits};
use cifar_finetune::features::{FeatureSet, Fingerprint, Shard};
use cifar_finetune::rundir;
use cifar_finetune::rundir::TrainConfig;
use cifar_finetune::train::{self, RunOptions};
use cifar_finetune::{checkpoint, evaluate};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One edit of a byte string; positions are taken modulo the current length.
#[derive(Debug, Clone)]
enum Edit {
    FlipBits(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(p, m)| Edit::FlipBits(p, m)),
        3 => (any::<usize>(), prop_oneof![Just(0u8), Just(0xff), Just(b'{'), Just(b'"'), any::<u8>()])
            .prop_map(|(p, b)| Edit::Set(p, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, v)| Edit::Insert(p, v)),
        1 => (any::<usize>(), 1..64usize).prop_map(|(p, n)| Edit::Delete(p, n)),
        1 => (any::<usize>(), 1..64usize).prop_map(|(p, n)| Edit::Duplicate(p, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let at = |p: usize, b: &Vec<u8>| if b.is_empty() { 0 } else { p % b.len() };
        match e {
            Edit::FlipBits(p, m) if !b.is_empty() => {
                let i = at(*p, &b);
                b[i] ^= m;
            }
            Edit::Set(p, v) if !b.is_empty() => {
                let i = at(*p, &b);
                b[i] = *v;
            }
            Edit::Insert(p, v) => {
                let i = at(*p, &b);
                b.splice(i..i, v.iter().copied());
            }
            Edit::Delete(p, n) => {
                let i = at(*p, &b);
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Edit::Duplicate(p, n) => {
                let i = at(*p, &b);
                let chunk: Vec<u8> = b[i..(i + n).min(b.len())].to_vec();
                b.splice(i..i, chunk);
            }
            Edit::Truncate(p) => {
                let i = at(*p, &b);
                b.truncate(i);
            }
            _ => {}
        }
    }
    b
}

fn cases(default: u32) -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Feeds `read` mutated copies of each seed, written to `path` (the reader sees a real
/// file); fails on the first panic.
fn fuzz(name: &str, seeds: &[Vec<u8>], path: &Path, default_cases: u32, read: impl Fn(&Path)) {
    let n = cases(default_cases);
    let config = Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    };
    // A fixed stream of inputs, so that CI is reproducible; FUZZ_SEED picks another.
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let strategy = (0..seeds.len(), prop::collection::vec(edit(), 1..5));
    let result = runner.run(&strategy, |(s, edits)| {
        std::fs::write(path, apply(&seeds[s], &edits)).unwrap();
        read(path);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: a mutated input made the reader panic: {e}");
    }
    eprintln!("fuzz {name}: {n} mutated inputs, no panic");
}

fn read_all(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn image_files() {
    let dir = fixtures().join("folder/decode");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.ends_with(".rgb") && !name.ends_with(".json") && !name.contains("bomb")
        })
        .collect();
    names.sort();
    let seeds = read_all(&names);
    assert!(seeds.len() >= 50);
    let tmp = tempfile::tempdir().unwrap();
    // A mutated size field must not make a case allocate hundreds of megabytes.
    let limits = DecodeLimits {
        max_pixels: 1 << 20,
    };
    fuzz(
        "image files",
        &seeds,
        &tmp.path().join("image"),
        3000,
        |p| {
            let bytes = std::fs::read(p).unwrap();
            if let Ok(img) = decode::decode(&bytes, p, limits) {
                assert_eq!(img.pixels.len(), 3 * img.height * img.width);
            }
        },
    );
}

#[test]
fn cifar_binary_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("cifar/cifar-10-batches-bin");
    std::fs::copy(src.join("batches.meta.txt"), dir.join("batches.meta.txt")).unwrap();
    let seeds = read_all(&[src.join("test_batch.bin"), src.join("data_batch_1.bin")]);
    fuzz(
        "cifar binary",
        &seeds,
        &dir.join("test_batch.bin"),
        1500,
        |_| {
            let _ = cifar::load_part(tmp.path(), Part::Test, None);
        },
    );
}

#[test]
fn cifar_python_batches_and_the_pickle_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-py");
    std::fs::create_dir_all(&dir).unwrap();
    let variants = fixtures().join("cifar/pickle-variants");
    let mut seeds = read_all(
        &(2..=5)
            .map(|p| variants.join(format!("test_batch.protocol{p}")))
            .collect::<Vec<_>>(),
    );
    seeds.push(std::fs::read(fixtures().join("cifar/cifar-10-batches-py/test_batch")).unwrap());
    fuzz(
        "cifar python",
        &seeds,
        &dir.join("test_batch"),
        1500,
        |_| {
            let _ = cifar::load_part(tmp.path(), Part::Test, None);
        },
    );
    // The class-name pickle goes through the same reader.
    let meta = read_all(&[fixtures().join("cifar/cifar-10-batches-py/batches.meta")]);
    std::fs::copy(
        fixtures().join("cifar/cifar-10-batches-py/test_batch"),
        dir.join("test_batch"),
    )
    .unwrap();
    fuzz(
        "cifar batches.meta",
        &meta,
        &dir.join("batches.meta"),
        800,
        |_| {
            let _ = cifar::load_part(tmp.path(), Part::Test, None);
        },
    );
}

#[test]
fn cifar100_batches_and_class_names() {
    use cifar_finetune::data::cifar100::{self, Cifar100, LabelKind};

    // The readers are CIFAR-10's; these reach their two-label paths and the name checks.
    for version in ["binary", "python"] {
        let tmp = tempfile::tempdir().unwrap();
        let name = format!("cifar-100-{version}");
        let dir = tmp.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixtures().join("cifar100").join(&name);
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let (batch, names) = match version {
            "binary" => ("test.bin", "fine_label_names.txt"),
            _ => ("test", "meta"),
        };
        let seeds = read_all(&[src.join(batch)]);
        fuzz(
            &format!("cifar-100 {version}"),
            &seeds,
            &dir.join(batch),
            600,
            |_| {
                let _ = cifar100::load_part(tmp.path(), Part::Test, LabelKind::Fine, None);
            },
        );
        std::fs::copy(src.join(batch), dir.join(batch)).unwrap();
        let seeds = read_all(&[src.join(names)]);
        fuzz(
            &format!("cifar-100 {version} class names"),
            &seeds,
            &dir.join(names),
            400,
            |_| {
                let _ = Cifar100::open(tmp.path(), LabelKind::Fine);
            },
        );
    }
}

#[test]
fn weights_pth_and_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let pth = read_all(&[
        fixtures().join("backbone/tiny.pth"),
        fixtures().join("backbone/tiny_f16.pth"),
    ]);
    fuzz("weights .pth", &pth, &tmp.path().join("w.pth"), 1500, |p| {
        let _ = weights::read_arch(p);
        let _ = StateDict::read(p);
    });
    // A whole ResNet's names and shapes (no data): the architecture reader only, which reads
    // the pickle and never a tensor's data.
    let shapes = read_all(&[fixtures().join("backbone/resnet101_shapes.pth")]);
    fuzz(
        "weights .pth names and shapes",
        &shapes,
        &tmp.path().join("shapes.pth"),
        300,
        |p| {
            let _ = weights::read_arch(p);
        },
    );
    let st = read_all(&[fixtures().join("backbone/tiny.safetensors")]);
    fuzz(
        "weights .safetensors",
        &st,
        &tmp.path().join("w.safetensors"),
        300,
        |p| {
            let _ = weights::read_arch(p);
            let _ = StateDict::read(p);
        },
    );
}

#[test]
fn backprop_parameter_files() {
    let tmp = tempfile::tempdir().unwrap();
    let seeds = read_all(&[fixtures().join("backprop/params_3441.json")]);
    fuzz(
        "backprop json",
        &seeds,
        &tmp.path().join("p.json"),
        1500,
        |p| {
            let _ = Problem::from_json_file(p, None);
            let _ = Problem::from_json_file(p, Some(&[3, 4, 4, 1]));
        },
    );
}

/// A small finished run (history.csv, checkpoints) and a test evaluation (predictions.csv),
/// written by our own writers.
fn our_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let classes = cifar::class_names();
    let set = |n: usize, seed: usize| {
        let dim = 8;
        let labels: Vec<u8> = (0..n).map(|i| ((i * 3 + seed) % 10) as u8).collect();
        let features = (0..n * dim)
            .map(|k| {
                let (i, d) = (k / dim, k % dim);
                let signal = if d == labels[i] as usize % dim {
                    1.0
                } else {
                    0.0
                };
                signal + ((k * 37 + seed) % 11) as f32 / 20.0
            })
            .collect();
        FeatureSet {
            features,
            labels,
            index: (0..n as u32).collect(),
            dim,
            extractor: Fingerprint {
                backbone: "fuzz".into(),
                weights_sha256: "00".into(),
                preprocess: "none".into(),
                precision: Precision::F32,
            },
            classes: classes.clone(),
        }
    };
    let (tr, va) = (set(40, 1), set(20, 2));
    let run = dir.join("run");
    let cfg = TrainConfig {
        epochs: 2,
        hidden: 4,
        ..TrainConfig::default()
    };
    train::sweep(
        &tr,
        &va,
        &[0.0],
        &cfg,
        &run,
        &RunOptions::default(),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let summary = rundir::Summary::read(&run).unwrap();
    let best = run.join(&summary.chosen_checkpoint);
    let ck = checkpoint::load(&best).unwrap();
    let eval = evaluate::evaluate(&ck, &va, Split::Val).unwrap();
    let (_, predictions) = evaluate::write_outputs(&eval, dir).unwrap();
    let shard = dir.join("features.safetensors");
    va.write(&shard).unwrap();
    (run.join("history.csv"), best, predictions, shard)
}

/// A feature-cache shard as the cache writes it.
fn cache_shard(dir: &Path, set: &FeatureSet) -> PathBuf {
    let shard = Shard {
        keys: (0..set.len() as u128)
            .map(|k| k * 0x9e37_79b9_7f4a_7c15)
            .collect(),
        features: set.features.clone(),
        dim: set.dim,
        extractor: set.extractor.clone(),
    };
    let path = dir.join(shard.file_name());
    shard.write(&path).unwrap();
    path
}

#[test]
fn our_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (history, best, predictions, shard) = our_files(tmp.path());
    let work = tmp.path().join("fuzz");
    std::fs::create_dir_all(&work).unwrap();
    fuzz(
        "history.csv",
        &read_all(&[history]),
        &work.join("history.csv"),
        1500,
        |p| {
            let _ = rundir::read_history(p);
        },
    );
    fuzz(
        "predictions.csv",
        &read_all(&[predictions]),
        &work.join("predictions.csv"),
        400,
        |p| {
            let _ = evaluate::read_predictions(p);
        },
    );
    fuzz(
        "feature file",
        &read_all(std::slice::from_ref(&shard)),
        &work.join("s.safetensors"),
        300,
        |p| {
            let _ = FeatureSet::read(p);
        },
    );
    let cached = cache_shard(tmp.path(), &FeatureSet::read(&shard).unwrap());
    fuzz(
        "feature cache shard",
        &read_all(&[cached]),
        &work.join("c.safetensors"),
        300,
        |p| {
            let _ = Shard::read(p);
        },
    );
    // A checkpoint is a safetensors file whose header carries JSON metadata.
    let ck = read_all(&[best]);
    fuzz(
        "checkpoint",
        &ck,
        &work.join("best.safetensors"),
        300,
        |p| {
            let _ = checkpoint::load(p);
        },
    );
}

/// Inputs the fuzzer found, kept as regression tests.
mod regressions {
    use super::*;

    /// A LONG1 opcode whose length byte was set to 138 made candle's pickle reader overflow
    /// a shift (a panic in debug builds); it must be an error naming the file.
    #[test]
    fn a_pth_whose_pickle_has_an_overlong_long1_is_an_error() {
        let seed = std::fs::read(fixtures().join("backbone/tiny.pth")).unwrap();
        let bytes = apply(&seed, &[Edit::Set(7011470838330496089, 138)]);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bad.pth");
        std::fs::write(&path, bytes).unwrap();
        let err = StateDict::read(&path).unwrap_err().to_string();
        // With overflow checks (the test profile) candle's pickle reader panics on the shift
        // and the panic becomes "malformed"; without them (--release) the shift wraps, the
        // pickle reads on and the zip's CRC check refuses the entry. Either way an error
        // that names the file and the format.
        assert!(
            err.contains("bad.pth")
                && err.contains("torch.save zip")
                && (err.contains("malformed") || err.contains("checksum")),
            "{err}"
        );
        // Reading only the names and shapes goes through the same pickle.
        let err = weights::read_arch(&path).unwrap_err().to_string();
        assert!(err.contains("bad.pth"), "{err}");
    }
}
