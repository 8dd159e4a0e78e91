//! Image files → the RGB pixels torchvision's loader sees, bit for bit.
//!
//! torchvision's `ImageFolder` loads each file with `Image.open(f).convert("RGB")`. Pillow
//! decides the format by the file's first bytes (never its extension), decodes JPEG with
//! libjpeg-turbo (the ISLOW inverse DCT and "fancy" upsampling, its defaults) and converts
//! every mode to RGB by its own rules. [`decode`] does the same, for the formats of
//! torchvision's `IMG_EXTENSIONS`:
//!
//! | format | decoder | Pillow's mode → RGB |
//! | --- | --- | --- |
//! | JPEG | libjpeg-turbo 3.1 (TurboJPEG API, the `turbojpeg` crate) | `L` replicated; `CMYK` as `CMYK;I` (Adobe's inverted convention, always), then R = C·K/255 rounded as Pillow's `MULDIV255` |
//! | PNG | `image` (png) | palette → its colours (transparency ignored); `1`/2/4-bit grey scaled to 0–255; `LA`, `RGBA` lose alpha (not composited); 16-bit grey (`I;16`) clipped to 255; 16-bit RGB(A) and grey+alpha keep the high byte |
//! | BMP, PPM/PGM, TIFF, WebP | `image` | as PNG; 16-bit PGM (`I`) clipped |
//!
//! EXIF orientation is not applied (Pillow's `open` does not). libjpeg warnings that Pillow
//! ignores (corrupt entropy-coded data, extraneous bytes before the final marker) are ignored
//! alike, with libjpeg's own recovery; a JPEG that ends before its EOI marker is refused, as
//! Pillow refuses it ("image file is truncated"). Every failure is [`Error::BadImage`] naming
//! the file; nothing panics, and libjpeg never gets to call `exit()` (TurboJPEG returns its
//! errors). The dimensions are read from the header and checked against
//! [`DecodeLimits::max_pixels`] before any pixel buffer is allocated, so a decompression bomb
//! (a small file claiming 60000×60000 pixels) is refused up front.
//!
//! Known differences from Pillow, all refused with a message rather than decoded differently:
//! GIF and other formats outside `IMG_EXTENSIONS` (Pillow would open a GIF named `.jpg`);
//! a JPEG whose *header* draws a libjpeg warning (junk bytes between header markers, an
//! unknown JFIF revision), which TurboJPEG reports as an error before decoding. Tested bit for
//! bit against Pillow 13 by `tests/decode.rs` on the fixtures of
//! `tools/gen_folder_fixtures.py`.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use image::{ColorType, ImageDecoder, ImageFormat};

use super::Image;
use crate::error::{Error, Result};

mod pnm;

/// torchvision's `IMG_EXTENSIONS`: the files `ImageFolder` lists (compared case-insensitively
/// with the end of the file name).
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// Whether `name` ends with one of [`IMG_EXTENSIONS`], ignoring ASCII case — torchvision's
/// `filename.lower().endswith(IMG_EXTENSIONS)` (no other character lowercases to one of
/// these ASCII letters, so the two agree on every name). A file named just `.jpg` counts.
pub fn has_image_extension(name: &[u8]) -> bool {
    IMG_EXTENSIONS.iter().any(|ext| {
        name.len() >= ext.len()
            && name[name.len() - ext.len()..].eq_ignore_ascii_case(ext.as_bytes())
    })
}

/// Pillow's `MAX_IMAGE_PIXELS` (1024 · 1024 · 1024 / 4 / 3): past it Pillow warns of a
/// possible decompression bomb (and refuses at twice as many).
pub const DEFAULT_MAX_PIXELS: u64 = 1024 * 1024 * 1024 / 4 / 3;

/// Bounds on what a file may make [`decode`] allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The most pixels (width · height) an image may have; checked on the header, before the
    /// pixels are allocated. [`DEFAULT_MAX_PIXELS`] by default.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// An image file format, as recognised by its first bytes (Pillow's `_accept` tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `FF D8 FF`.
    Jpeg,
    /// The 8-byte PNG signature.
    Png,
    /// `BM`.
    Bmp,
    /// `P1` … `P6` (PBM, PGM, PPM, plain or raw).
    Pnm,
    /// `II*\0` or `MM\0*`.
    Tiff,
    /// `RIFF` … `WEBP`.
    WebP,
}

impl Format {
    /// The format of a file starting with `head`, if it is one we decode.
    pub fn sniff(head: &[u8]) -> Option<Format> {
        if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Format::Jpeg)
        } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Format::Png)
        } else if head.starts_with(b"BM") {
            Some(Format::Bmp)
        } else if head.len() >= 2 && head[0] == b'P' && (b'1'..=b'6').contains(&head[1]) {
            Some(Format::Pnm)
        } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
            Some(Format::Tiff)
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some(Format::WebP)
        } else {
            None
        }
    }

    /// The usual name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Bmp => "BMP",
            Format::Pnm => "PPM/PGM",
            Format::Tiff => "TIFF",
            Format::WebP => "WebP",
        }
    }
}

/// Reads and decodes the image file at `path` with the default limits; see [`decode`].
pub fn load(path: &Path) -> Result<Image<'static>> {
    load_with(path, DecodeLimits::default())
}

/// Reads and decodes the image file at `path`; a file that cannot be read is an
/// [`Error::BadImage`] too.
pub fn load_with(path: &Path, limits: DecodeLimits) -> Result<Image<'static>> {
    let bytes = std::fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    decode(&bytes, path, limits)
}

/// Decodes the bytes of an image file (`path` only names it in errors) into planar
/// `[3, h, w]` R, G, B bytes equal to Pillow's `Image.open(f).convert("RGB")`.
pub fn decode(bytes: &[u8], path: &Path, limits: DecodeLimits) -> Result<Image<'static>> {
    let Some(format) = Format::sniff(bytes) else {
        return Err(bad(path, unknown_format(bytes)));
    };
    match format {
        Format::Jpeg => decode_jpeg(bytes, path, limits),
        Format::Png => decode_with_image(bytes, path, limits, format, ImageFormat::Png),
        Format::Bmp => decode_with_image(bytes, path, limits, format, ImageFormat::Bmp),
        Format::Pnm => pnm::decode(bytes, path, limits),
        Format::Tiff => decode_with_image(bytes, path, limits, format, ImageFormat::Tiff),
        Format::WebP => decode_with_image(bytes, path, limits, format, ImageFormat::WebP),
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadImage {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The message for a file no decoder claims, naming what it looks like when we can tell.
fn unknown_format(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "cannot decode: the file is empty".into();
    }
    let other = if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("GIF")
    } else if bytes.len() >= 12 && &bytes[4..12] == b"ftypavif" {
        Some("AVIF")
    } else if bytes.starts_with(b"\0\0\0\x0cjP  ") || bytes.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        Some("JPEG 2000")
    } else {
        None
    };
    match other {
        Some(name) => format!(
            "cannot decode: a {name} file, not one of the formats of torchvision's IMG_EXTENSIONS \
             (JPEG, PNG, BMP, PPM/PGM, TIFF, WebP); convert it"
        ),
        None => "cannot decode: not a JPEG, PNG, BMP, PPM/PGM, TIFF or WebP file (unrecognised \
                 first bytes)"
            .into(),
    }
}

/// Checks `w`×`h` against the limits before anything of that size is allocated.
fn check_size(path: &Path, format: Format, w: u64, h: u64, limits: DecodeLimits) -> Result<usize> {
    if w == 0 || h == 0 {
        return Err(bad(
            path,
            format!("cannot decode as {}: the image is {w}×{h}", format.name()),
        ));
    }
    let pixels = w.saturating_mul(h);
    if pixels > limits.max_pixels {
        return Err(bad(
            path,
            format!(
                "the {} header says {w}×{h} = {pixels} pixels, more than the limit of {} \
                 (Pillow's decompression-bomb limit); refused before decoding",
                format.name(),
                limits.max_pixels
            ),
        ));
    }
    usize::try_from(pixels).map_err(|_| bad(path, format!("{w}×{h} pixels do not fit in memory")))
}

/// libjpeg's warnings that Pillow ignores: the decoder recovers and the image is complete.
/// (Pillow installs no warning handler; TurboJPEG reports the first warning as an error.)
fn is_ignored_jpeg_warning(msg: &str) -> bool {
    [
        "Corrupt JPEG data",
        "Inconsistent progression sequence",
        "Invalid SOS parameters for sequential JPEG",
    ]
    .iter()
    .any(|w| msg.starts_with(w))
}

fn decode_jpeg(bytes: &[u8], path: &Path, limits: DecodeLimits) -> Result<Image<'static>> {
    let jpeg_err = |e: turbojpeg::Error| bad(path, format!("cannot decode as JPEG: {e}"));
    let mut d = turbojpeg::Decompressor::new().map_err(jpeg_err)?;
    // Junk bytes between header markers draw a libjpeg warning, which TurboJPEG reports as an
    // error before decoding; libjpeg (and so Pillow) skips them, so decode the file without
    // them, which is the same decode without the warning.
    let cleaned;
    let mut bytes = bytes;
    let header = match d.read_header(bytes) {
        Ok(header) => header,
        Err(turbojpeg::Error::TurboJpegError(msg))
            if msg.contains("extraneous bytes before marker") =>
        {
            cleaned = without_header_junk(bytes)
                .ok_or_else(|| bad(path, format!("cannot decode as JPEG: {msg}")))?;
            bytes = &cleaned;
            d.read_header(bytes).map_err(jpeg_err)?
        }
        Err(e) => return Err(jpeg_err(e)),
    };
    let (w, h) = (header.width, header.height);
    let n = check_size(path, Format::Jpeg, w as u64, h as u64, limits)?;
    // Pillow's mode follows the component count: 1 → L, 3 → RGB, 4 → CMYK. TurboJPEG expands
    // grey to RGB by replication, as `convert("RGB")` does; CMYK is converted below.
    let cmyk = matches!(
        header.colorspace,
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
    );
    let (format, channels) = if cmyk {
        (turbojpeg::PixelFormat::CMYK, 4)
    } else {
        (turbojpeg::PixelFormat::RGB, 3)
    };
    let mut pixels = vec![0u8; n * channels];
    let out = turbojpeg::Image {
        pixels: pixels.as_mut_slice(),
        width: w,
        pitch: w * channels,
        height: h,
        format,
    };
    match d.decompress(bytes, out) {
        Ok(()) => {}
        Err(turbojpeg::Error::TurboJpegError(msg))
            if is_ignored_jpeg_warning(&msg) && has_eoi_after_scan(bytes) => {}
        Err(turbojpeg::Error::TurboJpegError(msg))
            if msg.starts_with("Premature end of JPEG file") =>
        {
            return Err(bad(
                path,
                "cannot decode as JPEG: the file is truncated (it ends before the end-of-image \
                 marker; Pillow refuses it too)",
            ));
        }
        Err(e) => return Err(jpeg_err(e)),
    }
    let planar = if cmyk {
        // Pillow reads libjpeg's CMYK as `CMYK;I` (inverted, Adobe's convention) and converts
        // with R = MULDIV255(255 − C', 255 − K') = MULDIV255(C, K) on libjpeg's values.
        planar_from(n, |i| {
            let k = pixels[4 * i + 3];
            [0, 1, 2].map(|c| muldiv255(pixels[4 * i + c], k))
        })
    } else {
        planar_from(n, |i| [pixels[3 * i], pixels[3 * i + 1], pixels[3 * i + 2]])
    };
    Ok(Image {
        pixels: Cow::Owned(planar),
        height: h,
        width: w,
    })
}

/// The JPEG without the bytes libjpeg's `next_marker` discards between the markers before
/// the first scan (anything up to an `FF`, and `FF 00` pairs); the scan and what follows are
/// kept as they are. `None` when the markers cannot be followed to a start of scan.
fn without_header_junk(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..2]);
    let mut i = 2;
    loop {
        while *bytes.get(i)? != 0xFF {
            i += 1;
        }
        // Fill bytes: the last FF of a run starts the marker.
        while *bytes.get(i + 1)? == 0xFF {
            i += 1;
        }
        match bytes[i + 1] {
            // A stuffed zero is discarded too.
            0x00 => i += 2,
            // Start of scan: the rest is entropy-coded data and later markers.
            0xDA => {
                out.extend_from_slice(&bytes[i..]);
                return Some(out);
            }
            // Markers without a length.
            0x01 | 0xD0..=0xD8 => {
                out.extend_from_slice(&bytes[i..i + 2]);
                i += 2;
            }
            _ => {
                let len = usize::from(u16::from_be_bytes([*bytes.get(i + 2)?, *bytes.get(i + 3)?]));
                let end = i.checked_add(2 + len).filter(|&e| e <= bytes.len())?;
                out.extend_from_slice(&bytes[i..end]);
                i = end;
            }
        }
    }
}

/// Pillow's `MULDIV255(a, b)`: a·b/255 rounded, in integers.
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = u32::from(a) * u32::from(b) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Whether an end-of-image marker follows the first start-of-scan: without one the file was
/// cut short, whatever warning libjpeg reported first. (In entropy-coded data `FF` is
/// followed only by `00` or a marker, so `FF D9` there is the marker.)
fn has_eoi_after_scan(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

fn decode_with_image(
    bytes: &[u8],
    path: &Path,
    limits: DecodeLimits,
    format: Format,
    image_format: ImageFormat,
) -> Result<Image<'static>> {
    let decode_err =
        |e: image::ImageError| bad(path, format!("cannot decode as {}: {e}", format.name()));
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image_format);
    let mut image_limits = image::Limits::default();
    // The decoded buffer (up to 8 bytes a pixel for 16-bit RGBA) plus the decoder's own.
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(image_limits);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let (w, h) = decoder.dimensions();
    let n = check_size(path, format, u64::from(w), u64::from(h), limits)?;
    let color = decoder.color_type();
    let total = usize::try_from(decoder.total_bytes())
        .map_err(|_| bad(path, "the decoded image does not fit in memory"))?;
    let mut native = vec![0u8; total];
    decoder.read_image(&mut native).map_err(decode_err)?;
    let planar = to_planar_rgb(&native, n, color).ok_or_else(|| {
        bad(
            path,
            format!(
                "cannot decode as {}: unsupported pixel type {color:?}",
                format.name()
            ),
        )
    })?;
    Ok(Image {
        pixels: Cow::Owned(planar),
        height: h as usize,
        width: w as usize,
    })
}

/// The decoder's interleaved pixels → planar RGB by Pillow's `convert("RGB")` of the mode
/// Pillow would have opened the file in. `None` for pixel types we do not convert.
fn to_planar_rgb(native: &[u8], n: usize, color: ColorType) -> Option<Vec<u8>> {
    if native.len() < n * color.bytes_per_pixel() as usize {
        return None;
    }
    let u16_at = |i: usize| u16::from_ne_bytes([native[2 * i], native[2 * i + 1]]);
    let high = |i: usize| (u16_at(i) >> 8) as u8;
    Some(match color {
        ColorType::L8 => planar_from(n, |i| [native[i]; 3]),
        ColorType::La8 => planar_from(n, |i| [native[2 * i]; 3]),
        ColorType::Rgb8 => {
            planar_from(n, |i| [native[3 * i], native[3 * i + 1], native[3 * i + 2]])
        }
        ColorType::Rgba8 => {
            planar_from(n, |i| [native[4 * i], native[4 * i + 1], native[4 * i + 2]])
        }
        // 16-bit grey: Pillow's `I;16` (PNG, TIFF), which converts to RGB by clipping at 255,
        // not by scaling.
        ColorType::L16 => planar_from(n, |i| [u16_at(i).min(255) as u8; 3]),
        // 16-bit grey + alpha opens as RGBA (`LA;16B`) and 16-bit RGB(A) as RGB(A): the high
        // byte of each sample.
        ColorType::La16 => planar_from(n, |i| [high(2 * i); 3]),
        ColorType::Rgb16 => planar_from(n, |i| [high(3 * i), high(3 * i + 1), high(3 * i + 2)]),
        ColorType::Rgba16 => planar_from(n, |i| [high(4 * i), high(4 * i + 1), high(4 * i + 2)]),
        _ => return None,
    })
}

/// `[3, n]` planar bytes from each pixel's `[r, g, b]`.
fn planar_from(n: usize, pixel: impl Fn(usize) -> [u8; 3]) -> Vec<u8> {
    let mut planar = vec![0u8; 3 * n];
    let (r, rest) = planar.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for i in 0..n {
        [r[i], g[i], b[i]] = pixel(i);
    }
    planar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_match_torchvision_case_insensitively() {
        for name in [
            "a.jpg", "B.JPEG", "c.Png", "x.tiff", "y.TIF", ".jpg", "z.webp", "p.pgm",
        ] {
            assert!(has_image_extension(name.as_bytes()), "{name}");
        }
        for name in ["a.gif", "b.jpg.bak", "jpg", "c.txt", "d.jpe", "e.tiff~"] {
            assert!(!has_image_extension(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn formats_are_sniffed_by_content() {
        assert_eq!(Format::sniff(b"\xff\xd8\xff\xe0rest"), Some(Format::Jpeg));
        assert_eq!(Format::sniff(b"\x89PNG\r\n\x1a\nrest"), Some(Format::Png));
        assert_eq!(Format::sniff(b"BMxx"), Some(Format::Bmp));
        assert_eq!(Format::sniff(b"P6\n"), Some(Format::Pnm));
        assert_eq!(Format::sniff(b"P7\n"), None);
        assert_eq!(Format::sniff(b"II*\0"), Some(Format::Tiff));
        assert_eq!(Format::sniff(b"MM\0*"), Some(Format::Tiff));
        assert_eq!(Format::sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Format::WebP));
        assert_eq!(Format::sniff(b"RIFF\0\0\0\0WAVE"), None);
        assert_eq!(Format::sniff(b"GIF89a"), None);
        assert_eq!(Format::sniff(b""), None);
    }

    #[test]
    fn muldiv255_rounds_as_pillow() {
        for a in 0..=255u32 {
            for b in 0..=255u32 {
                let exact = (a * b) as f64 / 255.0;
                let got = f64::from(muldiv255(a as u8, b as u8));
                assert!(
                    (got - exact).abs() <= 0.5 + 1e-9,
                    "{a}·{b}: {got} vs {exact}"
                );
            }
        }
        assert_eq!(muldiv255(255, 255), 255);
        assert_eq!(muldiv255(0, 255), 0);
    }
}
