//! CIFAR-100 readers against the fixtures of `tools/gen_cifar100_fixtures.py`: the binary and
//! the python version give the same images and labels, fine and coarse, equal to what the
//! generator recorded (and torchvision read back); bad files are refused naming the file and
//! the record.

use std::path::{Path, PathBuf};

use cifar_finetune::data::Dataset;
use cifar_finetune::data::cifar::{CifarPart, IMAGE_BYTES, Part};
use cifar_finetune::data::cifar100::{self, Cifar100, LabelKind, RECORD_BYTES};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar100")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn bytes(v: &serde_json::Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u8::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn kind_key(kind: LabelKind) -> &'static str {
    match kind {
        LabelKind::Fine => "fine",
        LabelKind::Coarse => "coarse",
    }
}

fn sha256s(part: &CifarPart) -> Vec<String> {
    (0..part.len())
        .map(|i| cifar_finetune::io::hex(&Sha256::digest(part.image(i))))
        .collect()
}

/// A temporary data directory holding a copy of one fixture version (`binary`/`python`).
fn temp_copy(version: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("cifar-100-{version}");
    let dir = tmp.path().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join(&name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn err_text<T: std::fmt::Debug>(r: cifar_finetune::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn both_versions_give_the_generators_images_and_labels() {
    let want = expected();
    let bin = fixtures().join("cifar-100-binary");
    let py = fixtures().join("cifar-100-python");
    for part in [Part::Train, Part::Test] {
        let w = &want["parts"][part.as_str()];
        for kind in [LabelKind::Fine, LabelKind::Coarse] {
            let b = cifar100::load_part(&bin, part, kind, None).unwrap();
            let p = cifar100::load_part(&py, part, kind, None).unwrap();
            assert_eq!(b.labels, bytes(&w[kind_key(kind)]), "{part} {kind} binary");
            assert_eq!(p.labels, b.labels, "{part} {kind} python");
            assert_eq!(p.images, b.images, "{part} {kind}: the images differ");
            assert_eq!(sha256s(&b), strings(&w["image_sha256"]), "{part} {kind}");
            assert_eq!(b.images.len(), b.len() * IMAGE_BYTES);
        }
    }
    // The parent directory holds both: the binary version is preferred.
    let layout = cifar100::locate(&fixtures()).unwrap();
    assert_eq!(layout.dir, bin);
    // The images are not the labels' neighbours: the first test image starts 2 bytes into
    // its record, after the coarse and the fine label.
    let raw = std::fs::read(bin.join("test.bin")).unwrap();
    assert_eq!(raw.len(), 4 * RECORD_BYTES);
    let test = cifar100::load_part(&bin, Part::Test, LabelKind::Fine, Some(1)).unwrap();
    assert_eq!(test.image(0), &raw[2..RECORD_BYTES]);
    assert_eq!(
        (raw[0], raw[1]),
        (1, 1),
        "aquarium_fish is in the fish superclass"
    );
}

#[test]
fn the_dataset_names_its_labels_and_reads_class_names_from_the_files() {
    let want = expected();
    for dir in ["cifar-100-binary", "cifar-100-python"] {
        let dir = fixtures().join(dir);
        let fine = Cifar100::open(&dir, LabelKind::Fine).unwrap();
        assert_eq!(fine.name(), "cifar100");
        assert_eq!(fine.label_kind(), LabelKind::Fine);
        assert_eq!(fine.classes(), strings(&want["fine_classes"]));
        assert_eq!(fine.classes()[99], "worm");
        assert_eq!(fine.parts(), [Part::Train, Part::Test]);
        assert_eq!(
            fine.labels(Part::Train).unwrap(),
            bytes(&want["parts"]["train"]["fine"])
        );
        let coarse = Cifar100::open(&dir, LabelKind::Coarse).unwrap();
        assert_eq!(coarse.name(), "cifar100-coarse");
        assert_eq!(coarse.classes(), strings(&want["coarse_classes"]));
        assert_eq!(coarse.classes().len(), 20);
        assert_eq!(
            coarse.labels(Part::Test).unwrap(),
            bytes(&want["parts"]["test"]["coarse"])
        );
        // The same images under either label.
        for i in 0..4 {
            assert_eq!(
                fine.image(Part::Test, i).unwrap(),
                coarse.image(Part::Test, i).unwrap()
            );
        }
        let image = fine.image(Part::Test, 3).unwrap();
        assert_eq!((image.height, image.width), (32, 32));
        assert!(fine.image(Part::Test, 4).is_err());
        let e = err_text(fine.labels(Part::Val));
        assert!(e.contains("CIFAR-100 has no val files"), "{e}");
        // One file per part, the same for both label kinds.
        let fp = fine.fingerprint(Part::Train).unwrap();
        assert_eq!(fp.len(), 1);
        assert!(fp[0].0 == "train.bin" || fp[0].0 == "train", "{fp:?}");
        assert_eq!(fp, coarse.fingerprint(Part::Train).unwrap());
        assert_eq!(
            fine.image_keys(Part::Test).unwrap(),
            coarse.image_keys(Part::Test).unwrap()
        );
    }
}

#[test]
fn a_limit_reads_a_prefix() {
    let bin = fixtures().join("cifar-100-binary");
    let all = cifar100::load_part(&bin, Part::Train, LabelKind::Fine, None).unwrap();
    let two = cifar100::load_part(&bin, Part::Train, LabelKind::Fine, Some(2)).unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two.labels, all.labels[..2]);
    assert_eq!(two.images, all.images[..2 * IMAGE_BYTES]);
    let py = fixtures().join("cifar-100-python");
    let three = cifar100::load_part(&py, Part::Train, LabelKind::Coarse, Some(3)).unwrap();
    assert_eq!(three.images, all.images[..3 * IMAGE_BYTES]);
}

#[test]
fn labels_out_of_range_are_refused_naming_the_file_and_record() {
    // Fine label byte of record 2 (the second byte of its record).
    let (tmp, dir) = temp_copy("binary");
    let path = dir.join("train.bin");
    let mut raw = std::fs::read(&path).unwrap();
    raw[2 * RECORD_BYTES + 1] = 100;
    std::fs::write(&path, &raw).unwrap();
    for kind in [LabelKind::Fine, LabelKind::Coarse] {
        // Both labels are checked whichever is kept: the file is damaged either way.
        let e = err_text(cifar100::load_part(tmp.path(), Part::Train, kind, None));
        assert!(
            e.contains("train.bin") && e.contains("record 2") && e.contains("fine label 100"),
            "{e}"
        );
        assert!(e.contains("0..=99"), "{e}");
    }
    // A coarse label of 20.
    let (tmp, dir) = temp_copy("binary");
    let path = dir.join("test.bin");
    let mut raw = std::fs::read(&path).unwrap();
    raw[3 * RECORD_BYTES] = 20;
    std::fs::write(&path, &raw).unwrap();
    let e = err_text(cifar100::load_part(
        tmp.path(),
        Part::Test,
        LabelKind::Fine,
        None,
    ));
    assert!(
        e.contains("test.bin") && e.contains("record 3") && e.contains("coarse label 20"),
        "{e}"
    );
    assert!(e.contains("0..=19"), "{e}");

    // In a pickle: the test fine labels 1, 98, 85, 64 are `K 1 K 98 K 85 K 64` in an
    // APPENDS.
    let (tmp, dir) = temp_copy("python");
    let path = dir.join("test");
    let mut raw = std::fs::read(&path).unwrap();
    let at = find(&raw, b"(K\x01KbKUK@e").expect("fine label list in the fixture");
    raw[at + 4] = 100;
    std::fs::write(&path, &raw).unwrap();
    let e = err_text(cifar100::load_part(
        tmp.path(),
        Part::Test,
        LabelKind::Fine,
        None,
    ));
    assert!(
        e.contains("test") && e.contains("record 1") && e.contains("fine label 100"),
        "{e}"
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn damaged_files_are_refused_naming_them() {
    // A truncated binary file.
    let (tmp, dir) = temp_copy("binary");
    let path = dir.join("train.bin");
    let raw = std::fs::read(&path).unwrap();
    std::fs::write(&path, &raw[..raw.len() - 10]).unwrap();
    let e = err_text(cifar100::load_part(
        tmp.path(),
        Part::Train,
        LabelKind::Fine,
        None,
    ));
    assert!(e.contains("train.bin") && e.contains("truncated"), "{e}");
    assert!(
        e.contains("3074-byte record (2 label bytes + 3072 pixel bytes)"),
        "{e}"
    );
    assert!(
        e.contains("5 whole records and 3064 bytes left over"),
        "{e}"
    );

    // A missing test file; training still reads.
    let (tmp, dir) = temp_copy("binary");
    std::fs::remove_file(dir.join("test.bin")).unwrap();
    let e = err_text(cifar100::load_part(
        tmp.path(),
        Part::Test,
        LabelKind::Fine,
        None,
    ));
    assert!(e.contains("test.bin") && e.contains("missing"), "{e}");
    assert_eq!(
        cifar100::load_part(tmp.path(), Part::Train, LabelKind::Fine, None)
            .unwrap()
            .len(),
        6
    );

    // A pickle without its coarse labels: the key renamed.
    let (tmp, dir) = temp_copy("python");
    let path = dir.join("train");
    let mut raw = std::fs::read(&path).unwrap();
    let at = find(&raw, b"coarse_labels").unwrap();
    raw[at..at + 6].copy_from_slice(b"COARSE");
    std::fs::write(&path, &raw).unwrap();
    let e = err_text(cifar100::load_part(
        tmp.path(),
        Part::Train,
        LabelKind::Fine,
        None,
    ));
    assert!(
        e.contains("train") && e.contains("no `coarse_labels` entry"),
        "{e}"
    );
    assert!(e.contains("not a valid CIFAR-100 python batch"), "{e}");

    // CIFAR-10 is not CIFAR-100.
    let cifar10 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar");
    let e = err_text(cifar100::locate(&cifar10));
    assert!(
        e.contains("no CIFAR-100 data found") && e.contains("cifar-100-binary/"),
        "{e}"
    );
}

#[test]
fn class_name_files_must_hold_100_or_20_distinct_names() {
    let (tmp, dir) = temp_copy("binary");
    let path = dir.join("fine_label_names.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut names: Vec<&str> = text.lines().collect();
    names.pop();
    std::fs::write(&path, names.join("\n")).unwrap();
    let e = err_text(Cifar100::open(tmp.path(), LabelKind::Fine));
    assert!(
        e.contains("fine_label_names.txt") && e.contains("holds 99 fine class names"),
        "{e}"
    );
    assert!(e.contains("CIFAR-100 has 100"), "{e}");
    // The coarse names are another file, still fine.
    assert_eq!(
        Cifar100::open(tmp.path(), LabelKind::Coarse)
            .unwrap()
            .classes()
            .len(),
        20
    );

    let (tmp, dir) = temp_copy("binary");
    let path = dir.join("coarse_label_names.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("vehicles_2", "vehicles_1")).unwrap();
    let e = err_text(Cifar100::open(tmp.path(), LabelKind::Coarse));
    assert!(
        e.contains("coarse_label_names.txt") && e.contains("names 18 and 19 are both `vehicles_1`"),
        "{e}"
    );

    let (tmp, dir) = temp_copy("binary");
    std::fs::remove_file(dir.join("coarse_label_names.txt")).unwrap();
    let e = err_text(Cifar100::open(tmp.path(), LabelKind::Coarse));
    assert!(
        e.contains("coarse_label_names.txt") && e.contains("missing"),
        "{e}"
    );

    // The python meta: one fine name too many would need a new pickle; a renamed key is
    // enough to show the file and the key are named.
    let (tmp, dir) = temp_copy("python");
    let path = dir.join("meta");
    let mut raw = std::fs::read(&path).unwrap();
    let at = find(&raw, b"coarse_label_names").unwrap();
    raw[at] = b'C';
    std::fs::write(&path, &raw).unwrap();
    let e = err_text(Cifar100::open(tmp.path(), LabelKind::Coarse));
    assert!(
        e.contains("meta") && e.contains("no `coarse_label_names` entry"),
        "{e}"
    );
    assert!(Cifar100::open(tmp.path(), LabelKind::Fine).is_ok());
}
