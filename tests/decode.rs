//! Image decoding against Pillow (fixtures from tools/gen_folder_fixtures.py): every file
//! decodes to exactly the bytes of `Image.open(f).convert("RGB")`, and every file Pillow
//! refuses is refused, as an `Error::BadImage` naming it.

use std::path::{Path, PathBuf};

use cifar_finetune::Error;
use cifar_finetune::data::decode::{self, DecodeLimits};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    file: String,
    mode: Option<String>,
    height: Option<usize>,
    width: Option<usize>,
    error: Option<String>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/folder/decode")
}

fn expected() -> Expected {
    serde_json::from_slice(&std::fs::read(dir().join("expected.json")).unwrap()).unwrap()
}

/// `[h, w, 3]` interleaved → `[3, h, w]` planar.
fn planar(hwc: &[u8], n: usize) -> Vec<u8> {
    (0..3)
        .flat_map(|c| (0..n).map(move |i| hwc[3 * i + c]))
        .collect()
}

/// Files Pillow decodes and we refuse, each with the words its message must contain: formats
/// outside torchvision's IMG_EXTENSIONS (Pillow opens a GIF whatever its name) and palette
/// TIFFs, which the `image` crate does not read.
const REFUSED: [(&str, &str); 2] = [
    ("gif_named.png", "GIF file"),
    ("tiff_palette.tif", "RGBPalette"),
];

#[test]
fn every_fixture_decodes_as_pillow_does() {
    let mut report = Vec::new();
    let cases = expected().cases;
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    for case in cases {
        let path = dir().join(&case.file);
        let got = decode::load(&path);
        if let Some((_, words)) = REFUSED.iter().find(|(f, _)| *f == case.file) {
            assert!(case.error.is_none(), "{}: Pillow now refuses it", case.file);
            match got {
                Err(e @ Error::BadImage { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&case.file) && msg.contains(words), "{msg}");
                }
                other => panic!("{}: expected a BadImage, got {other:?}", case.file),
            }
            continue;
        }
        match (&case.error, got) {
            (None, Ok(img)) => {
                let (h, w) = (case.height.unwrap(), case.width.unwrap());
                let want = planar(
                    &std::fs::read(dir().join(format!("{}.rgb", case.file))).unwrap(),
                    h * w,
                );
                if (img.height, img.width) != (h, w) {
                    report.push(format!(
                        "{}: {}×{} instead of {h}×{w}",
                        case.file, img.height, img.width
                    ));
                    continue;
                }
                let diff = img.pixels.iter().zip(&want).filter(|(a, b)| a != b).count();
                let max = img
                    .pixels
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                if diff != 0 {
                    report.push(format!(
                        "{} ({:?}): {diff} bytes differ, by up to {max}",
                        case.file, case.mode
                    ));
                }
            }
            (None, Err(e)) => {
                report.push(format!("{}: Pillow decodes it, we fail: {e}", case.file))
            }
            (Some(pil), Ok(_)) => {
                report.push(format!("{}: Pillow fails ({pil}), we decode it", case.file))
            }
            (Some(_), Err(e)) => {
                let msg = e.to_string();
                if !matches!(e, Error::BadImage { .. }) || !msg.contains(&case.file) {
                    report.push(format!(
                        "{}: not a BadImage naming the file: {msg}",
                        case.file
                    ));
                }
            }
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn absurd_sizes_are_refused_before_decoding() {
    for (file, dims) in [
        ("jpeg_bomb.jpg", "60000×60000"),
        ("png_bomb.png", "100000×100000"),
    ] {
        let e = decode::load(&dir().join(file)).unwrap_err().to_string();
        assert!(
            e.contains(file) && e.contains(dims) && e.contains("refused before decoding"),
            "{e}"
        );
    }
    // The limit is a setting: a 23×31 JPEG passes 713 pixels, not 712.
    let path = dir().join("jpeg_420.jpg");
    let bytes = std::fs::read(&path).unwrap();
    assert!(decode::decode(&bytes, &path, DecodeLimits { max_pixels: 713 }).is_ok());
    let e = decode::decode(&bytes, &path, DecodeLimits { max_pixels: 712 }).unwrap_err();
    assert!(e.to_string().contains("713 pixels"), "{e}");
    let path = dir().join("png_rgb16.png");
    let bytes = std::fs::read(&path).unwrap();
    assert!(decode::decode(&bytes, &path, DecodeLimits { max_pixels: 246 }).is_err());
    assert!(decode::decode(&bytes, &path, DecodeLimits { max_pixels: 247 }).is_ok());
}

#[test]
fn truncated_and_garbage_files_are_bad_images_with_reasons() {
    for (file, words) in [
        ("jpeg_truncated.jpg", "truncated"),
        ("jpeg_no_eoi.jpg", "truncated"),
        ("garbage.jpg", "not a JPEG, PNG"),
        ("empty.png", "empty"),
        ("png_truncated.png", "cannot decode as PNG"),
        ("ppm_truncated.ppm", "truncated"),
    ] {
        match decode::load(&dir().join(file)) {
            Err(e @ Error::BadImage { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(file) && msg.contains(words), "{msg}");
            }
            other => panic!("{file}: {other:?}"),
        }
    }
    let e = decode::load(&dir().join("no-such-file.png")).unwrap_err();
    assert!(matches!(e, Error::BadImage { .. }) && e.to_string().contains("no-such-file.png"));
}

#[test]
fn the_format_comes_from_the_content_not_the_name() {
    // A PNG named .jpg decodes as the PNG it is.
    let png = decode::load(&dir().join("png_named.jpg")).unwrap();
    assert_eq!((png.height, png.width), (13, 19));
    assert!(decode::has_image_extension(b"photo.JPG") && !decode::has_image_extension(b"a.gif"));
}
