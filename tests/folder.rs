//! Image folders against torchvision (fixtures from tools/gen_folder_fixtures.py): Resize +
//! CenterCrop bytes, `ImageFolder`'s classes and sample order, features end to end, and
//! the split layout and structural errors on folders built here.

use std::path::{Path, PathBuf};

use cifar_finetune::Error;
use cifar_finetune::backbone::resnet::ResNet50;
use cifar_finetune::backbone::weights::{self, StateDict};
use cifar_finetune::data::folder::ImageFolder;
use cifar_finetune::data::transform::{Preprocess, center_crop, resize_bilinear};
use cifar_finetune::data::{Dataset, Part};
use cifar_finetune::features::{self, CacheOptions, Extractor};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/folder")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `[h, w, 3]` interleaved → `[3, h, w]` planar.
fn planar(hwc: &[u8]) -> Vec<u8> {
    let n = hwc.len() / 3;
    (0..3)
        .flat_map(|c| (0..n).map(move |i| hwc[3 * i + c]))
        .collect()
}

#[derive(Deserialize)]
struct CropCases {
    cases: Vec<CropCase>,
}

#[derive(Deserialize)]
struct CropCase {
    input: String,
    output: String,
    height: usize,
    width: usize,
    resize: usize,
    crop: usize,
}

#[test]
fn resize_and_center_crop_equal_torchvision() {
    let dir = fixtures().join("resize_crop");
    let cases: CropCases = read_json(&dir.join("cases.json"));
    assert!(cases.cases.len() >= 8);
    let mut padded = 0;
    for case in &cases.cases {
        let (h, w) = (case.height, case.width);
        let src = planar(&std::fs::read(dir.join(&case.input)).unwrap());
        let want = planar(&std::fs::read(dir.join(&case.output)).unwrap());
        let pre = Preprocess::imagenet(case.resize).with_center_crop(case.crop);
        let (rh, rw) = pre.resized_hw(h, w);
        padded += usize::from(rh < case.crop || rw < case.crop);
        let resized = resize_bilinear(&src, h, w, rh, rw).unwrap();
        let got = center_crop(&resized, rh, rw, case.crop).unwrap();
        assert_eq!(
            got, want,
            "{h}×{w} → Resize({}) → CenterCrop({})",
            case.resize, case.crop
        );
        // The whole preprocessing gives the normalised floats of those bytes.
        assert_eq!(pre.output_hw(h, w), (case.crop, case.crop));
        let mut out = vec![0f32; want.len()];
        pre.apply(&src, h, w, &mut out).unwrap();
        let plane = case.crop * case.crop;
        for (i, (&o, &b)) in out.iter().zip(&want).enumerate() {
            let c = i / plane;
            let expect = (f32::from(b) / 255.0 - pre.mean[c]) / pre.std[c];
            assert_eq!(o, expect, "case {}: float {i}", case.input);
        }
    }
    assert!(padded >= 2, "only {padded} cases pad");
}

#[derive(Deserialize)]
struct Tree {
    classes: Vec<String>,
    samples: Vec<(String, u8)>,
}

fn relative(root: &Path, files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().to_str().unwrap().to_string())
        .collect()
}

#[test]
fn image_folder_features_equal_torchvision_end_to_end() {
    let tree: Tree = read_json(&fixtures().join("tree.json"));
    let folder = ImageFolder::open(&fixtures().join("tree")).unwrap();
    assert_eq!(folder.classes(), tree.classes.as_slice());
    assert_eq!(folder.parts(), &[Part::Train]);
    let root = folder.root().to_path_buf();
    let want_files: Vec<String> = tree.samples.iter().map(|s| s.0.clone()).collect();
    let want_labels: Vec<u8> = tree.samples.iter().map(|s| s.1).collect();
    assert_eq!(
        relative(&root, folder.files(Part::Train).unwrap()),
        want_files
    );
    assert_eq!(folder.labels(Part::Train).unwrap(), want_labels.as_slice());

    // The synthetic ResNet-50 of tools/gen_backbone_fixtures.py, Resize(40) + CenterCrop(32).
    let sd = weights::synthetic_state_dict().unwrap();
    let model = ResNet50::from_state_dict(StateDict::from_tensors("synthetic", sd)).unwrap();
    let ex = Extractor::new(
        model,
        Preprocess::imagenet(40).with_center_crop(32),
        "synthetic",
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = CacheOptions {
        batch_size: 4,
        shard_size: 6,
        ..CacheOptions::new(cache.path())
    };
    let set = features::cached_part(&ex, &folder, Part::Train, None, &opts, &mut |_| {})
        .unwrap()
        .set;
    let expected: Vec<f32> = std::fs::read(fixtures().join("tree_features.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(set.len(), want_files.len());
    assert_eq!(set.labels, want_labels);
    assert_eq!(set.classes, tree.classes);
    for (i, name) in want_files.iter().enumerate() {
        let want = &expected[i * 2048..(i + 1) * 2048];
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = set
            .row(i)
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err < 1e-4, "{name}: relative error {err}");
    }
    // Different images, different features: a row mix-up cannot pass.
    let d = set
        .row(0)
        .iter()
        .zip(set.row(1))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d > 1e-3);
}

#[derive(Deserialize)]
struct Order {
    files: Vec<String>,
    outside: Vec<String>,
    links: Vec<Link>,
    classes: Vec<String>,
    samples: Vec<(String, u8)>,
}

#[derive(Deserialize)]
struct Link {
    link: String,
    target: String,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[cfg(unix)]
fn os_path(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

#[cfg(unix)]
#[test]
fn sample_order_equals_torchvision_on_tricky_names() {
    use std::os::unix::ffi::OsStrExt;
    let order: Order = read_json(&fixtures().join("order.json"));
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    for f in order.files.iter().map(|f| root.join(os_path(&unhex(f)))) {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"").unwrap();
    }
    for f in order
        .outside
        .iter()
        .map(|f| tmp.path().join(os_path(&unhex(f))))
    {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"").unwrap();
    }
    for l in &order.links {
        std::os::unix::fs::symlink(
            os_path(&unhex(&l.target)),
            tmp.path().join(os_path(&unhex(&l.link))),
        )
        .unwrap();
    }
    let folder = ImageFolder::open(&root).unwrap();
    let classes: Vec<Vec<u8>> = order.classes.iter().map(|c| unhex(c)).collect();
    let ours: Vec<Vec<u8>> = folder
        .classes()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(ours, classes);
    let canon = folder.root().to_path_buf();
    let got: Vec<(Vec<u8>, u8)> = folder
        .files(Part::Train)
        .unwrap()
        .iter()
        .zip(folder.labels(Part::Train).unwrap())
        .map(|(f, &l)| {
            (
                f.strip_prefix(&canon)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
                l,
            )
        })
        .collect();
    let want: Vec<(Vec<u8>, u8)> = order.samples.iter().map(|(p, l)| (unhex(p), *l)).collect();
    let show = |v: &[(Vec<u8>, u8)]| {
        v.iter()
            .map(|(p, l)| format!("{} {l}", String::from_utf8_lossy(p)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        got,
        want,
        "ours:\n{}\n\ntorchvision:\n{}",
        show(&got),
        show(&want)
    );
}

/// A fixture image file's bytes.
fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("decode").join(name)).unwrap()
}

/// Writes `files` (path relative to `root` → fixture image name) under `root`.
fn build(root: &Path, files: &[(&str, &str)]) {
    for (rel, fixture) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, image_bytes(fixture)).unwrap();
    }
}

fn open_err(root: &Path) -> String {
    ImageFolder::open(root).unwrap_err().to_string()
}

#[test]
fn split_layout_has_a_part_per_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(
        root,
        &[
            ("train/cat/a.jpg", "jpeg_420.jpg"),
            ("train/cat/b.png", "png_rgb.png"),
            ("train/dog/c.bmp", "bmp_rgb.bmp"),
            ("valid/cat/d.webp", "webp_lossy.webp"),
            ("valid/dog/e.jpg", "jpeg_grey.jpg"),
            ("test/cat/f.tif", "tiff_rgb.tif"),
            ("test/dog/g.ppm", "ppm_rgb.ppm"),
            ("test/dog/h.ppm", "ppm_plain.ppm"),
        ],
    );
    std::fs::write(root.join("README.txt"), "notes").unwrap();
    std::fs::create_dir(root.join(".cache")).unwrap();
    let folder = ImageFolder::open(root).unwrap();
    assert_eq!(folder.parts(), &[Part::Train, Part::Val, Part::Test]);
    assert_eq!(folder.classes(), &["cat".to_string(), "dog".to_string()]);
    assert_eq!(folder.labels(Part::Train).unwrap(), &[0, 0, 1]);
    assert_eq!(folder.labels(Part::Val).unwrap(), &[0, 1]);
    assert_eq!(folder.labels(Part::Test).unwrap(), &[0, 1, 1]);
    let canon = std::fs::canonicalize(root).unwrap();
    assert_eq!(
        folder.path(Part::Val, 0).unwrap(),
        canon.join("valid/cat/d.webp")
    );
    assert!(
        folder
            .path(Part::Val, 2)
            .unwrap_err()
            .to_string()
            .contains("out of range")
    );
    for (part, dir) in [
        (Part::Train, "train"),
        (Part::Val, "valid"),
        (Part::Test, "test"),
    ] {
        assert_eq!(
            folder.fingerprint(part).unwrap(),
            vec![("folder".to_string(), canon.join(dir).display().to_string())]
        );
    }
    let img = folder.image(Part::Test, 2).unwrap();
    assert_eq!((img.height, img.width), (13, 19));

    // Without val/ or test/: only the parts present.
    std::fs::remove_dir_all(root.join("valid")).unwrap();
    let folder = ImageFolder::open(root).unwrap();
    assert_eq!(folder.parts(), &[Part::Train, Part::Test]);
    let e = folder.labels(Part::Val).unwrap_err().to_string();
    assert!(e.contains("no val part"), "{e}");
}

#[test]
fn split_layout_errors_name_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(
        root,
        &[
            ("train/cat/a.jpg", "jpeg_420.jpg"),
            ("train/dog/b.jpg", "jpeg_420.jpg"),
            ("val/cat/c.jpg", "jpeg_420.jpg"),
            ("val/dog/d.jpg", "jpeg_420.jpg"),
            ("val/fox/e.jpg", "jpeg_420.jpg"),
        ],
    );
    let e = open_err(root);
    assert!(e.contains("/val:") && e.contains("train lacks: fox"), "{e}");
    std::fs::remove_dir_all(root.join("val/fox")).unwrap();
    std::fs::remove_dir_all(root.join("val/dog")).unwrap();
    let e = open_err(root);
    assert!(e.contains("/val:") && e.contains("train: dog"), "{e}");
    build(
        root,
        &[
            ("val/dog/d.jpg", "jpeg_420.jpg"),
            ("test/cat/x.jpg", "jpeg_420.jpg"),
            ("test/dog/y.jpg", "jpeg_420.jpg"),
        ],
    );
    build(
        root,
        &[
            ("test/bird/z.jpg", "jpeg_420.jpg"),
            ("test/eel/z.jpg", "jpeg_420.jpg"),
        ],
    );
    let e = open_err(root);
    assert!(
        e.contains("/test:") && e.contains("train lacks: bird, eel"),
        "{e}"
    );
    std::fs::remove_dir_all(root.join("test")).unwrap();
    build(
        root,
        &[
            ("valid/cat/c.jpg", "jpeg_420.jpg"),
            ("valid/dog/d.jpg", "jpeg_420.jpg"),
        ],
    );
    let e = open_err(root);
    assert!(e.contains("both val/ and valid/"), "{e}");
    std::fs::remove_dir_all(root.join("valid")).unwrap();
    std::fs::create_dir(root.join("validation")).unwrap();
    let e = open_err(root);
    assert!(
        e.contains("validation/") && e.contains("split layout"),
        "{e}"
    );
    std::fs::remove_dir_all(root.join("validation")).unwrap();
    assert!(ImageFolder::open(root).is_ok());
}

#[test]
fn structural_errors_name_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    std::fs::create_dir(&root).unwrap();
    let e = open_err(&root);
    assert!(
        e.contains("photos") && e.contains("no class folders"),
        "{e}"
    );

    build(&root, &[("cat/a.jpg", "jpeg_420.jpg")]);
    let e = open_err(&root);
    assert!(e.contains("only one class folder (cat)"), "{e}");

    // A class with files, none an image: torchvision refuses it too.
    std::fs::create_dir_all(root.join("dog/sub")).unwrap();
    std::fs::write(root.join("dog/notes.txt"), "x").unwrap();
    std::fs::write(root.join("dog/sub/a.gif"), "x").unwrap();
    let e = open_err(&root);
    assert!(
        e.contains("no image in the class folder(s) dog") && e.contains(".webp"),
        "{e}"
    );

    build(
        &root,
        &[
            ("dog/sub/b.PNG", "png_rgb.png"),
            ("Cat/c.jpg", "jpeg_420.jpg"),
        ],
    );
    let e = open_err(&root);
    assert!(e.contains("Cat and cat differ only in case"), "{e}");
    std::fs::remove_dir_all(root.join("Cat")).unwrap();
    let folder = ImageFolder::open(&root).unwrap();
    assert_eq!(folder.labels(Part::Train).unwrap(), &[0, 1]);

    let e = ImageFolder::open(&tmp.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

#[cfg(unix)]
#[test]
fn links_loops_and_odd_names() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("r");
    build(
        &root,
        &[
            ("cat/a.jpg", "jpeg_420.jpg"),
            ("dog/sub/b.jpg", "jpeg_420.jpg"),
        ],
    );
    std::os::unix::fs::symlink("..", root.join("dog/sub/up")).unwrap();
    let e = open_err(&root);
    assert!(e.contains("symbolic link loop") && e.contains("up"), "{e}");
    std::fs::remove_file(root.join("dog/sub/up")).unwrap();

    let odd = root.join(std::ffi::OsStr::from_bytes(b"\xffbad"));
    std::fs::create_dir(&odd).unwrap();
    let e = open_err(&root);
    assert!(e.contains("not valid UTF-8"), "{e}");
    std::fs::remove_dir(&odd).unwrap();

    // A dangling link and a FIFO with an image name are listed (as torchvision lists them)
    // and are bad images, reported without blocking.
    std::os::unix::fs::symlink("nowhere.jpg", root.join("cat/dangling.jpg")).unwrap();
    let fifo = root.join("cat/pipe.png");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let folder = ImageFolder::open(&root).unwrap();
    let names = relative(folder.root(), folder.files(Part::Train).unwrap());
    assert_eq!(
        names,
        [
            "cat/a.jpg",
            "cat/dangling.jpg",
            "cat/pipe.png",
            "dog/sub/b.jpg"
        ]
    );
    for i in [1, 2] {
        match folder.image(Part::Train, i) {
            Err(e @ Error::BadImage { .. }) => assert!(e.to_string().contains(&names[i]), "{e}"),
            other => panic!("{}: {other:?}", names[i]),
        }
    }
    // Their keys match nothing, ever, so that extraction tries them (and --skip-bad can
    // skip them); the readable files' keys are stable.
    let (a, b) = (
        folder.image_keys(Part::Train).unwrap(),
        folder.image_keys(Part::Train).unwrap(),
    );
    assert_eq!(a.len(), 4);
    assert!(a[0] == b[0] && a[3] == b[3]);
    assert!(a[1] != b[1] && a[2] != b[2]);
}

#[test]
fn images_decode_on_demand_and_keys_hash_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    build(
        root,
        &[
            ("a/1.jpg", "jpeg_420.jpg"),
            ("a/2.jpg", "jpeg_420.jpg"),
            ("a/3.png", "png_truncated.png"),
            ("b/4.webp", "webp_lossless.webp"),
            ("b/5.jpg", "garbage.jpg"),
        ],
    );
    let folder = ImageFolder::open(root).unwrap();
    let img = folder.image(Part::Train, 0).unwrap();
    assert_eq!((img.height, img.width), (23, 31));
    for (i, name) in [(2, "3.png"), (4, "5.jpg")] {
        match folder.image(Part::Train, i) {
            Err(e @ Error::BadImage { .. }) => assert!(e.to_string().contains(name), "{e}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    let keys = folder.image_keys(Part::Train).unwrap();
    assert_eq!(keys.len(), 5);
    // Same bytes, same key; the key is the XXH3-128 of the file and nothing else.
    assert_eq!(keys[0], keys[1]);
    assert_ne!(keys[0], keys[3]);
    let bytes = image_bytes("webp_lossless.webp");
    assert_eq!(keys[3], xxhash_rust::xxh3::xxh3_128(&bytes));
    assert_eq!(folder.file_key(Part::Train, 3).unwrap(), keys[3]);

    // Adding an image changes the file list, not the fingerprint.
    let before = folder.fingerprint(Part::Train).unwrap();
    build(root, &[("b/6.bmp", "bmp_rgb.bmp")]);
    let again = ImageFolder::open(root).unwrap();
    assert_eq!(again.labels(Part::Train).unwrap().len(), 6);
    assert_eq!(again.fingerprint(Part::Train).unwrap(), before);
}
