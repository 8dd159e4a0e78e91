//! PBM/PGM/PPM (`P1` … `P6`) exactly as Pillow's `PpmImagePlugin` reads them.
//!
//! Pillow's rules, which other decoders do not share: header tokens of at most 10 bytes
//! separated by whitespace, with `#` comments anywhere in the header (even inside a token);
//! a `maxval` other than 255 rescales each sample to `round(v / maxval · out_max)` in floating
//! point with Python's round-half-to-even (`out_max` 255, or 65535 for a grey image with
//! `maxval` > 255, which opens in mode `I` and converts to RGB by clipping at 255); raw samples
//! past `maxval` are clipped, plain ones are an error; a raw 16-bit grey image (`maxval`
//! 65535) is read as is (`I;16B`).

use std::borrow::Cow;
use std::path::Path;

use super::{DecodeLimits, Format, bad, check_size};
use crate::data::Image;
use crate::error::Result;

/// `b_whitespace` of PpmImagePlugin (Python's `bytes.split()` splits on the same set).
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Pillow's mode for each magic number we read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// `1`: black and white, one byte per pixel once unpacked.
    Bit,
    /// `L` (or `I` when `maxval` > 255).
    Grey,
    /// `RGB`.
    Rgb,
}

/// A cursor over the header, reading tokens as `PpmImageFile._read_token` does.
struct Header<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Header<'_> {
    fn next(&mut self) -> Option<u8> {
        let c = self.bytes.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn token(&mut self) -> std::result::Result<Vec<u8>, String> {
        let mut token = Vec::new();
        while token.len() <= 10 {
            let Some(c) = self.next() else { break };
            if is_space(c) {
                if token.is_empty() {
                    continue;
                }
                break;
            }
            if c == b'#' {
                // Up to and including the next CR or LF (or the end of the file).
                while let Some(c) = self.next() {
                    if c == b'\r' || c == b'\n' {
                        break;
                    }
                }
                continue;
            }
            token.push(c);
        }
        if token.is_empty() {
            return Err("the header ends early".into());
        }
        if token.len() > 10 {
            return Err(format!(
                "a header token is too long: {}",
                String::from_utf8_lossy(&token)
            ));
        }
        Ok(token)
    }
}

/// A header number (Python's `int` of the token; we take plain decimal digits).
fn number(token: &[u8], what: &str) -> std::result::Result<u64, String> {
    std::str::from_utf8(token)
        .ok()
        .filter(|t| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| {
            format!(
                "the {what} `{}` is not a number",
                String::from_utf8_lossy(token)
            )
        })
}

/// Decodes a `P1` … `P6` file; see the module docs.
pub(super) fn decode(bytes: &[u8], path: &Path, limits: DecodeLimits) -> Result<Image<'static>> {
    let fail = |msg: String| bad(path, format!("cannot decode as PPM/PGM: {msg}"));
    // `_read_magic`: up to 6 bytes, ending at whitespace.
    let magic_len = bytes
        .iter()
        .take(6)
        .position(|&c| is_space(c))
        .unwrap_or(bytes.len().min(6));
    let (mode, plain) = match &bytes[..magic_len] {
        b"P1" => (Mode::Bit, true),
        b"P2" => (Mode::Grey, true),
        b"P3" => (Mode::Rgb, true),
        b"P4" => (Mode::Bit, false),
        b"P5" => (Mode::Grey, false),
        b"P6" => (Mode::Rgb, false),
        other => {
            return Err(fail(format!(
                "unsupported variant `{}` (only P1 to P6 are read)",
                String::from_utf8_lossy(other)
            )));
        }
    };
    let mut header = Header {
        bytes,
        pos: (magic_len + 1).min(bytes.len()),
    };
    let width = header
        .token()
        .map_err(&fail)
        .and_then(|t| number(&t, "width").map_err(&fail))?;
    let height = header
        .token()
        .map_err(&fail)
        .and_then(|t| number(&t, "height").map_err(&fail))?;
    let maxval = if mode == Mode::Bit {
        1
    } else {
        let m = header
            .token()
            .map_err(&fail)
            .and_then(|t| number(&t, "maxval").map_err(&fail))?;
        if !(1..65536).contains(&m) {
            return Err(fail(format!("maxval {m} is not between 1 and 65535")));
        }
        m
    };
    let n = check_size(path, Format::Pnm, width, height, limits)?;
    let (w, h) = (width as usize, height as usize);
    let data = &bytes[header.pos..];
    let bands = if mode == Mode::Rgb { 3 } else { 1 };
    // Grey with maxval > 255 is Pillow's mode `I` (0..65535), clipped at 255 into RGB.
    let out_max: f64 = if mode == Mode::Grey && maxval > 255 {
        65535.0
    } else {
        255.0
    };
    let scale = |v: u64| -> u64 { ((v as f64 / maxval as f64) * out_max).round_ties_even() as u64 };
    let truncated = || fail("the file is truncated (fewer samples than the header says)".into());
    // [n · bands] samples in Pillow's mode, clipped at 255 as every conversion of these modes
    // to RGB does (`1` and `L` never exceed it; `I` is clipped).
    let clip = |v: u64| v.min(255) as u8;
    let samples: Vec<u8> = if plain && mode == Mode::Bit {
        let chars: Vec<u8> = strip_comments(data)
            .into_iter()
            .filter(|c| !is_space(*c))
            .collect();
        if let Some(c) = chars.iter().find(|c| !matches!(c, b'0' | b'1')) {
            return Err(fail(format!(
                "`{}` is not a bitmap sample (0 or 1)",
                *c as char
            )));
        }
        if chars.len() < n {
            return Err(truncated());
        }
        // "1" is black.
        chars[..n]
            .iter()
            .map(|&c| if c == b'1' { 0 } else { 255 })
            .collect()
    } else if plain {
        let text = strip_comments(data);
        let mut out = Vec::with_capacity(n * bands);
        for token in text.split(|c| is_space(*c)).filter(|t| !t.is_empty()) {
            if out.len() == n * bands {
                break;
            }
            if token.len() > 10 {
                return Err(fail(format!(
                    "the sample `{}` is too long",
                    String::from_utf8_lossy(token)
                )));
            }
            let v = number(token, "sample").map_err(&fail)?;
            if v > maxval {
                return Err(fail(format!(
                    "the sample {v} is larger than maxval {maxval}"
                )));
            }
            out.push(clip(scale(v)));
        }
        if out.len() < n * bands {
            return Err(truncated());
        }
        out
    } else if mode == Mode::Bit {
        // Raw bitmap rows, padded to a byte, set bits black (`1;I`).
        let row = w.div_ceil(8);
        if data.len() < row * h {
            return Err(truncated());
        }
        let mut out = Vec::with_capacity(n);
        for y in 0..h {
            for x in 0..w {
                let bit = data[y * row + x / 8] >> (7 - x % 8) & 1;
                out.push(if bit == 1 { 0 } else { 255 });
            }
        }
        out
    } else {
        let wide = maxval > 255;
        let size = if wide { 2 } else { 1 };
        if data.len() < n * bands * size {
            return Err(truncated());
        }
        let raw = |i: usize| -> u64 {
            if wide {
                u64::from(u16::from_be_bytes([data[2 * i], data[2 * i + 1]]))
            } else {
                u64::from(data[i])
            }
        };
        (0..n * bands)
            .map(|i| {
                let v = raw(i);
                clip(match (maxval, mode) {
                    (255, _) => v,
                    // `I;16B`: the 16-bit value itself.
                    (65535, Mode::Grey) => v,
                    _ => scale(v).min(out_max as u64),
                })
            })
            .collect()
    };
    // To RGB: `1` and `L` replicate, `I` clips at 255.
    let mut planar = vec![0u8; 3 * n];
    for c in 0..3 {
        let band = if bands == 3 { c } else { 0 };
        for (i, out) in planar[c * n..(c + 1) * n].iter_mut().enumerate() {
            *out = samples[i * bands + band];
        }
    }
    Ok(Image {
        pixels: Cow::Owned(planar),
        height: h,
        width: w,
    })
}

/// The data with each `#` comment removed up to and including its CR or LF
/// (`PpmPlainDecoder._ignore_comments`).
fn strip_comments(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'#' {
            while i < data.len() && data[i] != b'\n' && data[i] != b'\r' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}
