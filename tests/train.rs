//! The training loop, sweep, checkpoints and evaluation on synthetic features: class-dependent
//! Gaussian blobs, so a working head must learn them.

use std::ops::ControlFlow;
use std::path::Path;

use cifar_finetune::Error;
use cifar_finetune::backbone::fast::Precision;
use cifar_finetune::checkpoint::{self, CheckpointKind};
use cifar_finetune::data::cifar::{self, Split};
use cifar_finetune::evaluate::{self, TestMetrics};
use cifar_finetune::features::{FeatureSet, Fingerprint};
use cifar_finetune::io::DirLock;
use cifar_finetune::rundir;
use cifar_finetune::rundir::{Select, Summary, TrainConfig};
use cifar_finetune::train::{self, Progress, RunOptions, SweepOutcome};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// `n` samples of 10 Gaussian blobs in `dim` dimensions: class means N(0, 1), noise σ.
fn blobs(n: usize, dim: usize, sigma: f32, seed: u64, extractor: &str) -> FeatureSet {
    let mut means_rng = ChaCha8Rng::seed_from_u64(1234);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = |r: &mut ChaCha8Rng| {
        let u1 = ((r.next_u32() >> 8) as f32 + 0.5) / (1 << 24) as f32;
        let u2 = (r.next_u32() >> 8) as f32 / (1 << 24) as f32;
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    let means: Vec<f32> = (0..10 * dim).map(|_| normal(&mut means_rng)).collect();
    let mut features = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let c = (rng.next_u32() % 10) as usize;
        labels.push(c as u8);
        for k in 0..dim {
            // Non-negative like pooled ReLU features.
            features.push((means[c * dim + k] + sigma * normal(&mut rng)).max(0.0));
        }
    }
    FeatureSet {
        features,
        labels,
        index: (0..n as u32).collect(),
        dim,
        extractor: fp(extractor),
        classes: cifar::class_names(),
    }
}

/// A fingerprint for synthetic features, told apart by `tag`.
fn fp(tag: &str) -> Fingerprint {
    Fingerprint {
        backbone: tag.to_string(),
        weights_sha256: "00".to_string(),
        preprocess: "synthetic".to_string(),
        precision: Precision::F32,
    }
}

fn sets(dim: usize) -> (FeatureSet, FeatureSet) {
    (
        blobs(400, dim, 1.0, 1, "synthetic-blobs"),
        blobs(120, dim, 1.0, 2, "synthetic-blobs"),
    )
}

fn small_config() -> TrainConfig {
    TrainConfig {
        lr: 0.01,
        epochs: 3,
        seed: 7,
        ..TrainConfig::default()
    }
}

fn quiet() -> impl FnMut(&Progress) -> ControlFlow<()> {
    |_| ControlFlow::Continue(())
}

fn run(
    train: &FeatureSet,
    val: &FeatureSet,
    lambdas: &[f32],
    cfg: &TrainConfig,
    dir: &Path,
) -> cifar_finetune::Result<SweepOutcome> {
    train::sweep(
        train,
        val,
        lambdas,
        cfg,
        dir,
        &RunOptions::default(),
        &mut quiet(),
    )
}

fn finished(o: SweepOutcome) -> Summary {
    match o {
        SweepOutcome::Finished(s) => s,
        SweepOutcome::Stopped => panic!("the sweep stopped"),
    }
}

/// Every file under `dir`, relative path → bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn sweep_learns_and_writes_a_complete_run_directory() {
    let (tr, va) = sets(64);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let lambdas = [0.0, 1e-3, 1.0];
    let summary = finished(run(&tr, &va, &lambdas, &small_config(), &dir).unwrap());

    let record = rundir::load_run(&dir).unwrap();
    assert_eq!(record.config.lambdas, lambdas);
    assert_eq!(record.config.extractor, fp("synthetic-blobs"));
    assert_eq!(record.config.train.seed, 7);
    assert_eq!(record.config.n_train, 400);
    assert_eq!(record.history.len(), 9);
    assert_eq!(record.summary.as_ref(), Some(&summary));
    for (i, row) in record.history.iter().enumerate() {
        assert_eq!(row.lambda, lambdas[i / 3]);
        assert_eq!(row.epoch, i % 3 + 1);
        assert!(row.val_loss.is_some() && row.val_accuracy.is_some());
        assert!(row.train_loss.is_finite());
        if row.lambda == 0.0 {
            assert_eq!(row.train_penalty, 0.0);
        } else {
            assert!(row.train_penalty > 0.0);
        }
    }
    // The blobs are separable: the unpenalised head learns them, training loss falls.
    let l0: Vec<_> = record.history.iter().filter(|r| r.lambda == 0.0).collect();
    assert!(l0[2].train_loss < l0[0].train_loss);
    assert!(l0[2].val_accuracy.unwrap() > 0.9, "{:?}", l0[2]);
    // A strong penalty shrinks the weights: larger penalty, worse fit than λ = 0.
    let l1: Vec<_> = record.history.iter().filter(|r| r.lambda == 1.0).collect();
    assert!(l1[2].val_loss.unwrap() > l0[2].val_loss.unwrap());

    // The chosen λ has the lowest best validation loss.
    let best = summary
        .lambdas
        .iter()
        .min_by(|a, b| a.best_val_loss.total_cmp(&b.best_val_loss))
        .unwrap();
    assert_eq!(summary.chosen_lambda, best.lambda);
    assert_eq!(
        summary.chosen_checkpoint,
        format!("lambda_{}/best.safetensors", best.lambda)
    );
    for s in &summary.lambdas {
        let ck = checkpoint::load(&dir.join(&s.best_checkpoint)).unwrap();
        assert_eq!(ck.meta.kind, CheckpointKind::Best);
        assert_eq!(ck.meta.epoch, s.best_epoch);
        assert_eq!(ck.meta.extractor, fp("synthetic-blobs"));
        assert_eq!(ck.meta.metrics.val_loss, Some(s.best_val_loss));
        assert!(ck.momentum.is_none());
        // The sidecar says the same as the header.
        let side: checkpoint::CheckpointMeta =
            serde_json::from_slice(&std::fs::read(dir.join(&s.dir).join("best.json")).unwrap())
                .unwrap();
        assert_eq!(side, ck.meta);
        // The best checkpoint reproduces its recorded validation loss.
        let score = ck.head.score(&va.features, &va.labels).unwrap();
        assert_eq!(score.loss, s.best_val_loss);
        let last = checkpoint::load(&dir.join(&s.dir).join("last.safetensors")).unwrap();
        assert!(last.momentum.is_some());
        assert!(last.meta.state.as_ref().unwrap().finished);
    }
}

#[test]
fn same_seed_gives_bit_identical_runs_and_another_seed_does_not() {
    let (tr, va) = sets(2048);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        epochs: 2,
        dropout: 0.2,
        ..small_config()
    };
    let mut cfg_small = cfg.clone();
    cfg_small.epochs = 2;
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    let trs = tr.select(&(0..120).collect::<Vec<_>>());
    finished(run(&trs, &va, &[0.0, 0.01], &cfg_small, &a).unwrap());
    // Two λs on two threads: the same files, bit for bit.
    let two = RunOptions {
        jobs: 2,
        ..RunOptions::default()
    };
    finished(train::sweep(&trs, &va, &[0.0, 0.01], &cfg_small, &b, &two, &mut quiet()).unwrap());
    assert_eq!(snapshot(&a), snapshot(&b));
    let other = TrainConfig {
        seed: 8,
        ..cfg_small
    };
    finished(run(&trs, &va, &[0.0, 0.01], &other, &c).unwrap());
    let ha = std::fs::read(a.join("history.csv")).unwrap();
    let hc = std::fs::read(c.join("history.csv")).unwrap();
    assert_ne!(ha, hc);
}

#[test]
fn resumed_run_equals_an_uninterrupted_one() {
    let (tr, va) = sets(48);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        epochs: 4,
        dropout: 0.1,
        val_every: 2,
        ..small_config()
    };
    let lambdas = [0.0, 0.01, 0.1];
    let whole = tmp.path().join("whole");
    finished(run(&tr, &va, &lambdas, &cfg, &whole).unwrap());

    // Interrupt in the middle of λ = 0.01's third epoch (after 40 of its 100 steps).
    let parts = tmp.path().join("parts");
    let opts = RunOptions {
        report_every: 20,
        ..RunOptions::default()
    };
    let mut stop = |p: &Progress| match p {
        Progress::Step {
            lambda,
            epoch: 3,
            step: 40,
            ..
        } if *lambda == 0.01 => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    };
    let out = train::sweep(&tr, &va, &lambdas, &cfg, &parts, &opts, &mut stop).unwrap();
    assert_eq!(out, SweepOutcome::Stopped);
    let partial = rundir::read_history(&parts.join("history.csv")).unwrap();
    assert_eq!(partial.len(), 4 + 2, "λ=0 complete, λ=0.01 two epochs");
    assert!(!parts.join("summary.json").exists());

    // Without --resume the directory is refused, with it the run completes.
    let err = run(&tr, &va, &lambdas, &cfg, &parts).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { what, .. } if what == "run_dir"),
        "{err}"
    );
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let mut seen = Vec::new();
    let out = train::sweep(
        &tr,
        &va,
        &lambdas,
        &cfg,
        &parts,
        &resume,
        &mut |p: &Progress| {
            if let Progress::Lambda {
                lambda,
                done_epochs,
                ..
            } = p
            {
                seen.push((*lambda, *done_epochs));
            }
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    finished(out);
    assert_eq!(seen, vec![(0.0, 4), (0.01, 2), (0.1, 0)]);
    assert_eq!(snapshot(&whole), snapshot(&parts));
}

#[test]
fn parallel_sweep_stopped_and_resumed_equals_an_uninterrupted_one() {
    let (tr, va) = sets(40);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        epochs: 3,
        ..small_config()
    };
    let lambdas = [0.0, 0.01, 0.1, 1.0];
    let whole = tmp.path().join("whole");
    finished(run(&tr, &va, &lambdas, &cfg, &whole).unwrap());
    let parts = tmp.path().join("parts");
    let two = RunOptions {
        jobs: 2,
        report_every: 10,
        ..RunOptions::default()
    };
    let mut stop = |p: &Progress| match p {
        Progress::Step {
            lambda, epoch: 2, ..
        } if *lambda == 0.1 => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    };
    let out = train::sweep(&tr, &va, &lambdas, &cfg, &parts, &two, &mut stop).unwrap();
    assert_eq!(out, SweepOutcome::Stopped);
    let resume = RunOptions {
        resume: true,
        ..two
    };
    finished(train::sweep(&tr, &va, &lambdas, &cfg, &parts, &resume, &mut quiet()).unwrap());
    assert_eq!(snapshot(&whole), snapshot(&parts));
}

#[test]
fn resume_refuses_other_settings_or_features() {
    let (tr, va) = sets(16);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = TrainConfig {
        epochs: 1,
        ..small_config()
    };
    finished(run(&tr, &va, &[0.0], &cfg, &dir).unwrap());
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let other = TrainConfig {
        lr: 0.5,
        ..cfg.clone()
    };
    let err = train::sweep(&tr, &va, &[0.0], &other, &dir, &resume, &mut quiet()).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { what, msg } if what == "resume" && msg.contains("train.lr")),
        "{err}"
    );
    let mut tr2 = tr.clone();
    tr2.extractor = fp("other-weights");
    let mut va2 = va.clone();
    va2.extractor = fp("other-weights");
    let err = train::sweep(&tr2, &va2, &[0.0], &cfg, &dir, &resume, &mut quiet()).unwrap_err();
    assert!(matches!(err, Error::Fingerprint { .. }), "{err}");
    let err = train::sweep(
        &tr,
        &va,
        &[0.0],
        &cfg,
        &tmp.path().join("none"),
        &resume,
        &mut quiet(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { what, .. } if what == "resume"),
        "{err}"
    );
    // The finished run resumes to the same summary without training again.
    let mut trained = false;
    let out = train::sweep(
        &tr,
        &va,
        &[0.0],
        &cfg,
        &dir,
        &resume,
        &mut |p: &Progress| {
            trained |= matches!(p, Progress::Step { .. });
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert!(!trained);
    assert_eq!(finished(out), Summary::read(&dir).unwrap());
}

#[test]
fn divergence_stops_with_lambda_and_epoch_and_keeps_the_best_checkpoint() {
    // lr·λ = 2.2 makes the weights grow 1.2× per step: finite through epoch 1 (200 steps),
    // overflowing early in epoch 2.
    let tr = blobs(800, 8, 1.0, 3, "x");
    let va = blobs(50, 8, 1.0, 4, "x");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = TrainConfig {
        lr: 0.01,
        momentum: 0.0,
        epochs: 3,
        hidden: 4,
        ..TrainConfig::default()
    };
    let err = run(&tr, &va, &[220.0], &cfg, &dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Numerical(_)));
    assert!(msg.contains("λ = 220") && msg.contains("epoch 2"), "{msg}");
    assert!(msg.contains("best checkpoint so far (epoch 1)"), "{msg}");
    let best = checkpoint::load(&dir.join("lambda_220/best.safetensors")).unwrap();
    assert_eq!(best.meta.epoch, 1);
    assert_eq!(
        rundir::read_history(&dir.join("history.csv"))
            .unwrap()
            .len(),
        1
    );

    // The same on two threads beside a healthy λ: the diverging λ stops and is named, the
    // healthy one finishes and is chosen (tests/divergence.rs covers this in depth).
    let par = RunOptions {
        jobs: 2,
        ..RunOptions::default()
    };
    let summary = finished(
        train::sweep(
            &tr,
            &va,
            &[0.0, 220.0],
            &cfg,
            &tmp.path().join("par"),
            &par,
            &mut quiet(),
        )
        .unwrap(),
    );
    assert_eq!(summary.chosen_lambda, 0.0);
    let failed = &summary.lambdas[1];
    assert!(failed.failed);
    let msg = &failed.problems[0].message;
    assert!(msg.contains("λ = 220") && msg.contains("epoch 2"), "{msg}");

    // A huge learning rate diverges at once: no checkpoint to keep, and the error says so.
    let dir2 = tmp.path().join("run2");
    let wild = TrainConfig { lr: 1e30, ..cfg };
    let msg = run(&tr, &va, &[0.0], &wild, &dir2).unwrap_err().to_string();
    assert!(
        msg.contains("λ = 0, epoch 1") && msg.contains("no best checkpoint"),
        "{msg}"
    );
}

#[test]
fn bad_settings_are_named() {
    let (tr, va) = sets(8);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let base = small_config();
    let cases: Vec<(TrainConfig, Vec<f32>, &str)> = vec![
        (base.clone(), vec![-0.1], "lambdas"),
        (base.clone(), vec![f32::NAN], "lambdas"),
        (base.clone(), vec![0.1, 0.1], "lambdas"),
        (base.clone(), vec![], "lambdas"),
        (
            TrainConfig {
                batch_size: 0,
                ..base.clone()
            },
            vec![0.0],
            "batch_size",
        ),
        (
            TrainConfig {
                lr: 0.0,
                ..base.clone()
            },
            vec![0.0],
            "lr",
        ),
        (
            TrainConfig {
                lr: -1.0,
                ..base.clone()
            },
            vec![0.0],
            "lr",
        ),
        (
            TrainConfig {
                epochs: 0,
                ..base.clone()
            },
            vec![0.0],
            "epochs",
        ),
        (
            TrainConfig {
                val_every: 0,
                ..base.clone()
            },
            vec![0.0],
            "val_every",
        ),
        (
            TrainConfig {
                momentum: 1.0,
                ..base.clone()
            },
            vec![0.0],
            "momentum",
        ),
        (
            TrainConfig {
                dropout: 1.0,
                ..base.clone()
            },
            vec![0.0],
            "dropout",
        ),
        (
            TrainConfig {
                hidden: 0,
                ..base.clone()
            },
            vec![0.0],
            "hidden",
        ),
    ];
    for (cfg, lambdas, setting) in cases {
        let err = run(&tr, &va, &lambdas, &cfg, &dir).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { what, .. } if what == setting),
            "{setting}: got {err}"
        );
        assert!(!dir.exists(), "nothing is written for invalid settings");
    }
    let empty = tr.select(&[]);
    let err = run(&empty, &va, &[0.0], &base, &dir).unwrap_err();
    assert!(err.to_string().contains("training split"), "{err}");
    let err = run(&tr, &empty, &[0.0], &base, &dir).unwrap_err();
    assert!(err.to_string().contains("validation count"), "{err}");
    let mut other = va.clone();
    other.extractor = fp("else");
    let err = run(&tr, &other, &[0.0], &base, &dir).unwrap_err();
    assert!(err.to_string().contains("else"), "{err}");
}

#[test]
fn validation_every_n_epochs_and_selection_by_accuracy() {
    let (tr, va) = sets(32);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = TrainConfig {
        epochs: 5,
        val_every: 2,
        select: Select::Accuracy,
        ..small_config()
    };
    let summary = finished(run(&tr, &va, &[0.0, 0.5], &cfg, &dir).unwrap());
    let rows = rundir::read_history(&dir.join("history.csv")).unwrap();
    let validated: Vec<usize> = rows
        .iter()
        .filter(|r| r.lambda == 0.0 && r.val_loss.is_some())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(validated, vec![2, 4, 5], "every 2nd epoch and the last");
    let csv = std::fs::read_to_string(dir.join("history.csv")).unwrap();
    assert!(csv.starts_with("lambda,epoch,train_loss,train_penalty,val_loss,val_accuracy\n"));
    assert!(
        csv.lines().nth(1).unwrap().ends_with(",,"),
        "unvalidated epoch 1: empty cells"
    );
    for s in &summary.lambdas {
        let best_acc = rows
            .iter()
            .filter(|r| r.lambda == s.lambda)
            .filter_map(|r| r.val_accuracy)
            .fold(0.0, f64::max);
        assert_eq!(s.best_val_accuracy, best_acc);
    }
    let chosen = summary
        .lambdas
        .iter()
        .find(|s| s.lambda == summary.chosen_lambda)
        .unwrap();
    assert!(
        summary
            .lambdas
            .iter()
            .all(|s| s.best_val_accuracy <= chosen.best_val_accuracy)
    );
    assert_eq!("accuracy".parse::<Select>().unwrap(), Select::Accuracy);
    assert!("f1".parse::<Select>().is_err());
}

#[test]
fn evaluation_writes_metrics_and_predictions_and_refuses_other_features() {
    let (tr, va) = sets(32);
    let test = blobs(90, 32, 1.0, 5, "synthetic-blobs");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let summary = finished(run(&tr, &va, &[0.0], &small_config(), &dir).unwrap());
    let ck_path = dir.join(&summary.chosen_checkpoint);
    let ck = checkpoint::load(&ck_path).unwrap();
    let eval = evaluate::evaluate(&ck, &test, Split::Test).unwrap();
    let m = &eval.metrics;
    assert_eq!(m.count, 90);
    assert!(m.accuracy > 0.8, "accuracy {}", m.accuracy);
    let total: u64 = m.metrics.confusion.iter().flatten().sum();
    assert_eq!(total, 90);
    assert_eq!(m.class_names[0], "airplane");
    assert_eq!(m.per_class_accuracy.len(), 10);
    assert!(m.report.contains("weighted avg"));
    assert_eq!(evaluate::default_output_dir(&ck_path), dir);
    let (mp, pp) = evaluate::write_outputs(&eval, &dir).unwrap();
    assert_eq!(&TestMetrics::read(&mp).unwrap(), m);
    let (names, rows) = evaluate::read_predictions(&pp).unwrap();
    assert_eq!(names, m.class_names);
    assert_eq!(rows.len(), 90);
    let header = std::fs::read_to_string(&pp).unwrap();
    let digest = cifar_finetune::io::sha256_file(&ck_path).unwrap();
    assert_eq!(m.checkpoint_sha256.as_deref(), Some(digest.as_str()));
    assert!(header.starts_with(&format!(
        "# checkpoint sha256:{digest}\n\
         index,true,predicted,airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck\n"
    )));
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.index, test.index[i]);
        assert_eq!(r.true_class, test.labels[i]);
        assert_eq!(r.predicted, eval.predicted[i]);
        assert_eq!(r.probabilities, eval.probabilities[i * 10..(i + 1) * 10]);
        assert!((r.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let mean_loss = {
        let p = ck.head.predict(&test.features, &test.labels).unwrap();
        p.losses.iter().map(|&l| l as f64).sum::<f64>() / 90.0
    };
    assert_eq!(m.loss, mean_loss);

    let mut foreign = test.clone();
    foreign.extractor = fp("resnet50-v2");
    let err = evaluate::evaluate(&ck, &foreign, Split::Test).unwrap_err();
    assert!(
        matches!(&err, Error::Fingerprint { msg, .. } if msg.contains("resnet50-v2")),
        "{err}"
    );
    // The checkpoint is also found through its JSON sidecar's path.
    let via_json = checkpoint::load(&ck_path.with_extension("json")).unwrap();
    assert_eq!(via_json.head, ck.head);
}

#[test]
fn corrupt_checkpoints_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.safetensors");
    std::fs::write(&p, b"not a checkpoint").unwrap();
    let err = checkpoint::load(&p).unwrap_err();
    assert!(err.to_string().contains("x.safetensors"), "{err}");
    let err = checkpoint::load(&tmp.path().join("missing.safetensors")).unwrap_err();
    assert!(err.to_string().contains("missing.safetensors"), "{err}");
}

/// The activation is recorded in checkpoints and config.json and read back; a checkpoint
/// written before the field existed (no `activation` in its metadata) is read as ReLU.
#[test]
fn activation_is_recorded_and_old_checkpoints_read_as_relu() {
    use cifar_finetune::head::Activation;
    use safetensors::SafeTensors;

    let (tr, va) = sets(12);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("linear");
    let cfg = TrainConfig {
        activation: Activation::None,
        epochs: 1,
        ..small_config()
    };
    let s = finished(
        train::sweep(
            &tr,
            &va,
            &[0.0],
            &cfg,
            &dir,
            &RunOptions::default(),
            &mut quiet(),
        )
        .unwrap(),
    );
    assert_eq!(
        rundir::RunConfig::read(&dir).unwrap().train.activation,
        Activation::None
    );
    let path = dir.join(&s.chosen_checkpoint);
    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.head.activation, Activation::None);
    // The loaded head evaluates as it was trained (no ReLU): its score is the one recorded
    // at validation.
    let score = ck.head.score(&va.features, &va.labels).unwrap();
    assert_eq!(score.loss, s.lambdas[0].best_val_loss);

    // An old checkpoint: the same file with `activation` removed from its metadata.
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap()[checkpoint::META_KEY].clone();
    let mut json: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(json["config"]["activation"], "none");
    json["config"]
        .as_object_mut()
        .unwrap()
        .remove("activation")
        .unwrap();
    let old = dir.join("old.safetensors");
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .names()
        .into_iter()
        .map(|n| (n.to_string(), st.tensor(n).unwrap()))
        .collect();
    let bytes = safetensors::serialize(
        views,
        Some(std::collections::HashMap::from([(
            checkpoint::META_KEY.to_string(),
            json.to_string(),
        )])),
    )
    .unwrap();
    std::fs::write(&old, bytes).unwrap();
    let old_ck = checkpoint::load(&old).unwrap();
    assert_eq!(old_ck.head.activation, Activation::Relu);
    assert_eq!(old_ck.meta.config.activation, Activation::Relu);
    assert_eq!(old_ck.head.w1, ck.head.w1);
}

#[test]
fn extreme_sizes_are_bounded_or_refused_not_allocated() {
    let (tr, va) = sets(8);
    let tmp = tempfile::tempdir().unwrap();
    // A batch far larger than the data trains on the data (one batch per epoch): buffers are
    // sized by the data, so this neither aborts nor overflows.
    let huge_batch = TrainConfig {
        batch_size: usize::MAX,
        epochs: 1,
        ..small_config()
    };
    finished(run(&tr, &va, &[0.0], &huge_batch, &tmp.path().join("a")).unwrap());
    // A hidden width whose weights cannot be held is refused, naming the setting.
    for hidden in [usize::MAX, 1 << 40] {
        let cfg = TrainConfig {
            hidden,
            ..small_config()
        };
        let err = run(&tr, &va, &[0.0], &cfg, &tmp.path().join("b")).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { what, .. } if what == "hidden"),
            "{hidden}: {err}"
        );
    }
}

/// A checkpoint with a NaN or infinite value is refused on load, naming the tensor and the
/// index; a finite head whose outputs overflow on the features writes no metrics.
#[test]
fn non_finite_checkpoints_and_metrics_are_refused() {
    let (tr, va) = sets(12);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = TrainConfig {
        epochs: 1,
        ..small_config()
    };
    let s = finished(run(&tr, &va, &[0.0], &cfg, &dir).unwrap());
    let ck = checkpoint::load(&dir.join(&s.chosen_checkpoint)).unwrap();
    let bad = tmp.path().join("bad.safetensors");
    type Spoil = fn(&mut cifar_finetune::head::Head);
    let cases: [(&str, Spoil, &str); 3] = [
        ("fc.2.bias", |h| h.b2[3] = f32::INFINITY, "[3]"),
        ("fc.0.weight", |h| h.w1[12 + 5] = f32::NAN, "[1, 5]"),
        ("fc.2.weight", |h| h.w2[0] = f32::NEG_INFINITY, "[0, 0]"),
    ];
    for (name, spoil, at) in cases {
        let mut head = ck.head.clone();
        spoil(&mut head);
        checkpoint::save(&bad, &head, None, &ck.meta).unwrap();
        let err = checkpoint::load(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains(name) && err.contains(at),
            "{err}"
        );
    }

    // Finite, but so large that the logits' differences overflow: the loss is infinite.
    let mut head = ck.head.clone();
    for (c, b) in head.b2.iter_mut().enumerate() {
        *b = if c % 2 == 0 { 3e38 } else { -3e38 };
    }
    checkpoint::save(&bad, &head, None, &ck.meta).unwrap();
    let loaded = checkpoint::load(&bad).unwrap();
    let test = blobs(40, 12, 1.0, 5, "synthetic-blobs");
    let err = evaluate::evaluate(&loaded, &test, Split::Test).unwrap_err();
    assert!(
        matches!(&err, Error::Numerical(m) if m.contains("bad.safetensors") && m.contains("loss")),
        "{err}"
    );
}

/// `--resume` verifies the best checkpoint each λ's run state refers to: a missing one, or
/// one of another λ, is refused, never named in summary.json.
#[test]
fn resume_verifies_the_best_checkpoints_the_state_refers_to() {
    let (tr, va) = sets(12);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = TrainConfig {
        epochs: 2,
        ..small_config()
    };
    let lambdas = [0.0, 0.01];
    finished(run(&tr, &va, &lambdas, &cfg, &dir).unwrap());
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let resumed = || train::sweep(&tr, &va, &lambdas, &cfg, &dir, &resume, &mut quiet());
    let best = dir.join("lambda_0.01/best.safetensors");
    let kept = std::fs::read(&best).unwrap();

    std::fs::remove_file(&best).unwrap();
    std::fs::remove_file(dir.join("summary.json")).unwrap();
    let err = resumed().unwrap_err().to_string();
    assert!(
        err.contains("lambda_0.01/best.safetensors") && err.contains("missing"),
        "{err}"
    );
    assert!(!dir.join("summary.json").exists());

    // Another λ's best in its place.
    std::fs::copy(dir.join("lambda_0/best.safetensors"), &best).unwrap();
    let err = resumed().unwrap_err().to_string();
    assert!(
        err.contains("lambda_0.01/best.safetensors") && err.contains("λ = 0,"),
        "{err}"
    );

    // Put back, the run resumes (and has nothing left to train).
    std::fs::write(&best, kept).unwrap();
    let s = finished(resumed().unwrap());
    assert!(dir.join(&s.chosen_checkpoint).is_file());
}

/// `metrics.json` and `predictions.csv` both carry the checkpoint's digest: a pair from two
/// evaluations (a failed `test` leaving one file of an earlier model) is refused by the
/// report; files from before the digest existed are still read.
#[test]
fn a_metrics_and_predictions_pair_from_two_models_is_refused() {
    use cifar_finetune::report::{self, ReportOptions};
    let (tr, va) = sets(12);
    let test = blobs(30, 12, 1.0, 5, "synthetic-blobs");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = TrainConfig {
        epochs: 2,
        ..small_config()
    };
    finished(run(&tr, &va, &[0.0, 0.01], &cfg, &dir).unwrap());
    let evaluated = |lambda_dir: &str| {
        let ck = checkpoint::load(&dir.join(lambda_dir).join("best.safetensors")).unwrap();
        evaluate::evaluate(&ck, &test, Split::Test).unwrap()
    };
    let no_gallery = ReportOptions {
        gallery_size: 0,
        ..ReportOptions::default()
    };
    let (mp, pp) = evaluate::write_outputs(&evaluated("lambda_0"), &dir).unwrap();
    report::write_run_report(&dir, &no_gallery).unwrap();
    let first = std::fs::read(&pp).unwrap();

    // λ = 0.01's evaluation whose predictions.csv never arrived: metrics of one model beside
    // predictions of another.
    evaluate::write_outputs(&evaluated("lambda_0.01"), &dir).unwrap();
    std::fs::write(&pp, &first).unwrap();
    let err = report::write_run_report(&dir, &no_gallery)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("predictions.csv")
            && err.contains("metrics.json")
            && err.contains("different evaluations"),
        "{err}"
    );

    // A predictions.csv without digest (an older file) beside a metrics.json with one.
    let text = String::from_utf8(first.clone()).unwrap();
    let (digest_line, rest) = text.split_once('\n').unwrap();
    assert!(digest_line.starts_with(evaluate::DIGEST_PREFIX));
    std::fs::write(&pp, rest).unwrap();
    assert_eq!(evaluate::read_predictions(&pp).unwrap().1.len(), 30);
    assert!(report::write_run_report(&dir, &no_gallery).is_err());

    // Both from before digests existed: read as they are.
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    json.as_object_mut()
        .unwrap()
        .remove("checkpoint_sha256")
        .unwrap();
    std::fs::write(&mp, json.to_string()).unwrap();
    report::write_run_report(&dir, &no_gallery).unwrap();
}

/// `sweep_holding` hands over the run directory's lock still held: no other writer gets in
/// until the caller lets it go; `sweep` releases it as it returns.
#[test]
fn sweep_holding_keeps_the_run_directory_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let (tr, va) = sets(16);
    let cfg = TrainConfig {
        epochs: 1,
        ..small_config()
    };
    let dir = tmp.path().join("held");
    let (outcome, lock) = train::sweep_holding(
        &tr,
        &va,
        &[0.0],
        &cfg,
        &dir,
        &RunOptions::default(),
        &mut quiet(),
    )
    .unwrap();
    finished(outcome);
    let other = DirLock::acquire(&dir, "test", false);
    assert!(matches!(other, Err(Error::Locked { .. })), "{other:?}");
    drop(lock);
    DirLock::acquire(&dir, "test", false).unwrap();

    let dir = tmp.path().join("released");
    finished(run(&tr, &va, &[0.0], &cfg, &dir).unwrap());
    DirLock::acquire(&dir, "test", false).unwrap();
}
