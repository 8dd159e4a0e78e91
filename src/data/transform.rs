//! torchvision's `Resize(size)` → optional `CenterCrop(crop)` → `ToTensor()` →
//! `Normalize(mean, std)`, bit for bit.
//!
//! The original PyTorch script feeds CIFAR-10's 32×32 PIL images through
//! `transforms.Resize(224)`, which on a PIL image calls Pillow's `Image.resize` with the
//! bilinear filter. Pillow's resampler (`src/libImaging/Resample.c`) is not textbook
//! bilinear interpolation: it is a separable convolution with a triangle filter whose
//! support widens with the downscaling factor (so it antialiases), computed in two passes
//! (horizontal, then vertical) with the filter weights normalised, converted to fixed point
//! (22 fractional bits) and the sums rounded and clipped to `u8` after *each* pass. A pass
//! whose size does not change is skipped. [`Resizer`] reproduces all of that exactly, so
//! the resized bytes equal Pillow's; `ToTensor` (`v / 255` in f32) and `Normalize`
//! (`(x - mean) / std` in f32) are then a per-channel table over the 256 byte values, giving
//! torchvision's floats exactly.
//!
//! Images are planar `[3, h, w]` bytes (R, G, B planes, row-major), as CIFAR-10 stores them;
//! Pillow resamples each channel independently, so planar order changes nothing.
//!
//! Images of other sizes (an image folder's photos) take torchvision's evaluation transform,
//! `Resize(256)` then `CenterCrop(224)` ([`Preprocess::with_center_crop`]): the crop's offsets
//! are `round((h − crop) / 2)` with Python's round-half-to-even, and a crop larger than the
//! resized image pads it with zeros first, `(crop − h) // 2` above and the rest below
//! (torchvision 0.29's `F.center_crop` on a PIL image).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Fractional bits of Pillow's fixed-point filter weights (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The preprocessing of one image: resize the shorter side to `size`, optionally crop the
/// centre, scale to `[0, 1]`, normalise per channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Target length of the shorter side (torchvision's `Resize(size)` with an int).
    pub size: usize,
    /// The side of the square centre crop taken after resizing (torchvision's
    /// `CenterCrop(crop)`), or none. Absent from the fingerprint when `None`, so CIFAR's
    /// cache keys do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<usize>,
    /// Per-channel mean subtracted after scaling to `[0, 1]` (R, G, B).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean (R, G, B).
    pub std: [f32; 3],
    /// The most pixels a resized image may have ([`DEFAULT_MAX_PIXELS`] unless raised). A
    /// very thin image resized so that its shorter side is `size` becomes huge — torchvision
    /// would make the same huge tensor — so past this limit it is refused instead of
    /// exhausting memory. Not part of the fingerprint: it changes no output.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: usize,
}

/// The default of [`Preprocess::max_pixels`]: 2000×2000, a 48 MB input, far beyond any
/// image the backbone is meant for.
pub const DEFAULT_MAX_PIXELS: usize = 4_000_000;

fn default_max_pixels() -> usize {
    DEFAULT_MAX_PIXELS
}

impl Preprocess {
    /// ImageNet channel means, as in torchvision's pretrained-model recipes.
    pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    /// ImageNet channel standard deviations, as in torchvision's pretrained-model recipes.
    pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

    /// The ImageNet normalisation the backbone was trained with (the default).
    pub fn imagenet(size: usize) -> Self {
        Preprocess {
            size,
            crop: None,
            mean: Self::IMAGENET_MEAN,
            std: Self::IMAGENET_STD,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// mean = std = 0.5 per channel, as in the original script.
    pub fn half(size: usize) -> Self {
        Preprocess {
            size,
            crop: None,
            mean: [0.5; 3],
            std: [0.5; 3],
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// The same with a square centre crop of side `crop` after the resize: torchvision's
    /// evaluation transform is `Preprocess::imagenet(256).with_center_crop(224)`.
    pub fn with_center_crop(self, crop: usize) -> Self {
        Preprocess {
            crop: Some(crop),
            ..self
        }
    }

    /// Output `(height, width)` for an `h`×`w` input: the crop's when there is one, else
    /// [`Preprocess::resized_hw`].
    pub fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        match self.crop {
            Some(c) if h > 0 && w > 0 => (c, c),
            _ => self.resized_hw(h, w),
        }
    }

    /// `(height, width)` after the resize, as torchvision's `Resize(int)`: the shorter side
    /// becomes `size`, the longer `int(size * long / short)`.
    pub fn resized_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        if short == 0 {
            return (0, 0);
        }
        // Python's `int(a * b / c)`: a correctly rounded true division, then truncation
        // (the product in f64 is exact below 2^53, and saturates rather than overflows).
        let new_long = ((self.size as f64 * long as f64) / short as f64) as usize;
        if w <= h {
            (new_long, self.size)
        } else {
            (self.size, new_long)
        }
    }

    /// Checks that the settings can be applied: a positive size and crop, finite means and
    /// positive, finite standard deviations.
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(Error::invalid("image size", "must be at least 1"));
        }
        if let Some(crop) = self.crop {
            if crop == 0 {
                return Err(Error::invalid("crop", "must be at least 1"));
            }
            if crop.saturating_mul(crop) > self.max_pixels {
                return Err(Error::invalid(
                    "crop",
                    format!(
                        "{crop} makes every image {crop}×{crop} pixels, more than the limit of {} \
                         pixels",
                        self.max_pixels
                    ),
                ));
            }
        }
        if self.size.saturating_mul(self.size) > self.max_pixels {
            return Err(Error::invalid(
                "image size",
                format!(
                    "{0} makes every image at least {0}×{0} pixels, more than the limit of {1} \
                     pixels",
                    self.size, self.max_pixels
                ),
            ));
        }
        for (m, s) in self.mean.iter().zip(&self.std) {
            if !m.is_finite() {
                return Err(Error::invalid(
                    "mean",
                    format!("{:?} is not finite", self.mean),
                ));
            }
            if !(s.is_finite() && *s > 0.0) {
                return Err(Error::invalid(
                    "std",
                    format!("{:?} must be positive and finite", self.std),
                ));
            }
        }
        Ok(())
    }

    /// Precomputes everything needed for `h`×`w` inputs: resize weights and the
    /// byte → float table. Reuse the result for many images of the same size.
    pub fn prepare(&self, h: usize, w: usize) -> Result<Prepared> {
        self.validate()?;
        if h == 0 || w == 0 {
            return Err(Error::invalid(
                "image size",
                format!("cannot preprocess an empty {h}×{w} image"),
            ));
        }
        let (oh, ow) = self.resized_hw(h, w);
        if oh.saturating_mul(ow) > self.max_pixels {
            return Err(Error::invalid(
                "image",
                format!(
                    "a {h}×{w} image resized so that its shorter side is {} becomes {oh}×{ow}, \
                     {} pixels, more than the limit of {} (torchvision would make the same huge \
                     tensor); crop it, or raise the limit",
                    self.size,
                    oh.saturating_mul(ow),
                    self.max_pixels
                ),
            ));
        }
        let resizer = Resizer::new(h, w, oh, ow)?;
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                // Exactly torchvision's f32 operations: ToTensor's `div(255)`, then
                // Normalize's `sub_(mean).div_(std)`.
                *out = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        let crop = self.crop.map(|c| CenterCrop::new(oh, ow, c, c));
        Ok(Prepared {
            resizer,
            crop,
            table,
        })
    }

    /// `[3, h, w]` bytes → `[3, oh, ow]` floats (Resize → CenterCrop → ToTensor →
    /// Normalize), where `(oh, ow) = self.output_hw(h, w)`. Errors on wrong buffer lengths.
    pub fn apply(&self, chw: &[u8], h: usize, w: usize, out: &mut [f32]) -> Result<()> {
        self.prepare(h, w)?.apply(chw, out)
    }

    /// Stable text naming everything that determines the output: resize rule,
    /// interpolation, size, crop, mean and std. Used in cache keys. Without a crop the text is
    /// the one written before crops existed.
    pub fn fingerprint(&self) -> String {
        let crop = match self.crop {
            Some(c) => format!("crop=center(torchvision.CenterCrop(int),pad-zero);crop_size={c};"),
            None => String::new(),
        };
        format!(
            "resize=shorter-side(torchvision.Resize(int));interp=pil-bilinear-antialias-fixed22;\
             size={};{crop}to_tensor=div255-f32;mean={:?};std={:?}",
            self.size, self.mean, self.std
        )
    }
}

/// torchvision's `CenterCrop` of an `h`×`w` image to `ch`×`cw`, as the window's top-left
/// corner in the image (negative where the image is padded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CenterCrop {
    h: usize,
    w: usize,
    ch: usize,
    cw: usize,
    top: isize,
    left: isize,
}

impl CenterCrop {
    /// The crop of `ch`×`cw` out of an `h`×`w` image, as torchvision 0.29's `center_crop`:
    /// pad with zeros when the crop is larger — `(c − h) // 2` before, `(c − h + 1) // 2`
    /// after — then cut at `int(round((h' − c) / 2.0))`, Python rounding halves to even.
    pub fn new(h: usize, w: usize, ch: usize, cw: usize) -> CenterCrop {
        let axis = |size: usize, crop: usize| -> isize {
            let (pad_before, padded) = if crop > size {
                ((crop - size) / 2, crop)
            } else {
                (0, size)
            };
            // round((padded - crop) / 2.0), ties to even.
            let d = padded - crop;
            let offset = if d.is_multiple_of(2) || (d / 2).is_multiple_of(2) {
                d / 2
            } else {
                d / 2 + 1
            };
            offset as isize - pad_before as isize
        };
        CenterCrop {
            h,
            w,
            ch,
            cw,
            top: axis(h, ch),
            left: axis(w, cw),
        }
    }

    /// The window's top-left corner in the image: `(top, left)`, negative where padded.
    pub fn offsets(&self) -> (isize, isize) {
        (self.top, self.left)
    }

    /// `[3, h, w]` → `[3, ch, cw]`, zeros where the window leaves the image. Errors on wrong
    /// lengths.
    pub fn apply(&self, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let (h, w, ch, cw) = (self.h, self.w, self.ch, self.cw);
        if src.len() != 3 * h * w || dst.len() != 3 * ch * cw {
            return Err(Error::invalid(
                "crop buffers",
                format!(
                    "expected 3×{h}×{w} → 3×{ch}×{cw} bytes, got {} → {}",
                    src.len(),
                    dst.len()
                ),
            ));
        }
        // The columns of each output row that fall inside the image.
        let x0 = (-self.left).clamp(0, cw as isize) as usize;
        let x1 = (w as isize - self.left).clamp(0, cw as isize) as usize;
        for c in 0..3 {
            for y in 0..ch {
                let out = &mut dst[(c * ch + y) * cw..(c * ch + y + 1) * cw];
                let sy = y as isize + self.top;
                if sy < 0 || sy >= h as isize || x0 >= x1 {
                    out.fill(0);
                    continue;
                }
                let row = (c * h + sy as usize) * w;
                let sx0 = (x0 as isize + self.left) as usize;
                out[..x0].fill(0);
                out[x0..x1].copy_from_slice(&src[row + sx0..row + sx0 + (x1 - x0)]);
                out[x1..].fill(0);
            }
        }
        Ok(())
    }
}

/// `[3, h, w]` → `[3, crop, crop]`: torchvision's `CenterCrop(crop)` on the RGB image (see
/// [`CenterCrop::new`]). Errors when `src.len() != 3 * h * w`.
pub fn center_crop(src: &[u8], h: usize, w: usize, crop: usize) -> Result<Vec<u8>> {
    let mut dst = vec![0u8; 3 * crop * crop];
    CenterCrop::new(h, w, crop, crop).apply(src, &mut dst)?;
    Ok(dst)
}

/// A [`Preprocess`] made ready for one input size (see [`Preprocess::prepare`]).
#[derive(Clone, Debug)]
pub struct Prepared {
    resizer: Resizer,
    /// The centre crop after the resize, if any.
    crop: Option<CenterCrop>,
    /// `[3][256]`: the normalised float of each byte value, per channel.
    table: [[f32; 256]; 3],
}

impl Prepared {
    /// Input `(height, width)`.
    pub fn input_hw(&self) -> (usize, usize) {
        (self.resizer.h, self.resizer.w)
    }

    /// Output `(height, width)`: the crop's, or the resized image's.
    pub fn output_hw(&self) -> (usize, usize) {
        match &self.crop {
            Some(c) => (c.ch, c.cw),
            None => (self.resizer.oh, self.resizer.ow),
        }
    }

    /// Floats per output image: `3 * oh * ow`.
    pub fn output_len(&self) -> usize {
        let (oh, ow) = self.output_hw();
        3 * oh * ow
    }

    /// `[3, h, w]` bytes → `[3, oh, ow]` floats. Errors on wrong buffer lengths.
    pub fn apply(&self, chw: &[u8], out: &mut [f32]) -> Result<()> {
        let (oh, ow) = self.output_hw();
        if out.len() != self.output_len() {
            return Err(Error::invalid(
                "preprocess output buffer",
                format!(
                    "expected 3×{oh}×{ow} = {} floats, got {}",
                    self.output_len(),
                    out.len()
                ),
            ));
        }
        // [3, resized h, resized w]
        let mut resized = vec![0u8; 3 * self.resizer.oh * self.resizer.ow];
        self.resizer.resize_into(chw, &mut resized)?;
        if let Some(crop) = &self.crop {
            // [3, oh, ow]
            let mut cropped = vec![0u8; self.output_len()];
            crop.apply(&resized, &mut cropped)?;
            resized = cropped;
        }
        let plane = oh * ow;
        for c in 0..3 {
            let table = &self.table[c];
            let src = &resized[c * plane..(c + 1) * plane];
            for (o, &v) in out[c * plane..(c + 1) * plane].iter_mut().zip(src) {
                *o = table[usize::from(v)];
            }
        }
        Ok(())
    }
}

/// Fixed-point filter weights of one resampling pass (one axis).
#[derive(Clone, Debug)]
struct Pass {
    /// Per output position: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `[out, ksize]` weights with `PRECISION_BITS` fractional bits; taps past the count are 0.
    weights: Vec<i32>,
    /// Row stride of `weights`.
    ksize: usize,
}

impl Pass {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter over
    /// the whole input (box `[0, in_size)`).
    fn bilinear(in_size: usize, out_size: usize) -> Pass {
        // Pillow computes `in1 - in0` in single precision, then divides in double.
        let scale = f64::from(in_size as f32 - 0.0f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        // The triangle filter has support 1; downscaling stretches it.
        let support = filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = 0.0 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's `(int)` truncates toward zero; a negative start is clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin).min(ksize);
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(count) {
                let w = triangle(((x + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[xx * ksize..(xx + 1) * ksize];
            for (x, out) in row.iter_mut().enumerate().take(count) {
                let w = if ww != 0.0 { k[x] / ww } else { k[x] };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *out = if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            bounds.push((xmin, count));
        }
        Pass {
            bounds,
            weights,
            ksize,
        }
    }

    fn taps(&self, o: usize) -> (usize, &[i32]) {
        let (start, count) = self.bounds[o];
        (start, &self.weights[o * self.ksize..o * self.ksize + count])
    }
}

/// Pillow's `bilinear_filter`: the triangle `max(0, 1 - |x|)`.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Pillow's `clip8`: drop the fractional bits (arithmetic shift) and saturate to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's bilinear resize of `[3, h, w]` bytes to `[3, oh, ow]`, precomputed for one
/// pair of sizes.
#[derive(Clone, Debug)]
pub struct Resizer {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// The horizontal pass, when the width changes.
    horizontal: Option<Pass>,
    /// The vertical pass, when the height changes.
    vertical: Option<Pass>,
    /// Input rows the vertical pass reads (all rows when there is no vertical pass).
    rows: (usize, usize),
}

impl Resizer {
    /// Precomputes the weights for `h`×`w` → `oh`×`ow`. Errors on zero sizes.
    pub fn new(h: usize, w: usize, oh: usize, ow: usize) -> Result<Resizer> {
        if h == 0 || w == 0 || oh == 0 || ow == 0 {
            return Err(Error::invalid(
                "resize",
                format!("cannot resize {h}×{w} to {oh}×{ow}: sizes must be positive"),
            ));
        }
        // Pillow always computes the vertical weights, and uses their first and last rows
        // to limit the horizontal pass to the rows the vertical pass reads.
        let vertical = Pass::bilinear(h, oh);
        let first = vertical.bounds[0].0;
        let (last_start, last_count) = vertical.bounds[oh - 1];
        let rows = if oh != h {
            (first, last_start + last_count)
        } else {
            (0, h)
        };
        Ok(Resizer {
            h,
            w,
            oh,
            ow,
            horizontal: (ow != w).then(|| Pass::bilinear(w, ow)),
            vertical: (oh != h).then_some(vertical),
            rows,
        })
    }

    /// Resizes `src` (`[3, h, w]`) into `dst` (`[3, oh, ow]`). Errors on wrong lengths.
    pub fn resize_into(&self, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let (h, w, oh, ow) = (self.h, self.w, self.oh, self.ow);
        if src.len() != 3 * h * w {
            return Err(Error::invalid(
                "image buffer",
                format!(
                    "expected 3×{h}×{w} = {} bytes, got {}",
                    3 * h * w,
                    src.len()
                ),
            ));
        }
        if dst.len() != 3 * oh * ow {
            return Err(Error::invalid(
                "resize output buffer",
                format!(
                    "expected 3×{oh}×{ow} = {} bytes, got {}",
                    3 * oh * ow,
                    dst.len()
                ),
            ));
        }
        match (&self.horizontal, &self.vertical) {
            (None, None) => dst.copy_from_slice(src),
            (Some(hp), None) => horizontal_pass(hp, src, h, w, ow, (0, h), dst),
            (None, Some(vp)) => vertical_pass(vp, src, h, w, 0, oh, dst),
            (Some(hp), Some(vp)) => {
                let (first, last) = self.rows;
                // [3, last - first, ow]: the horizontally resized rows the vertical pass reads.
                let mut tmp = vec![0u8; 3 * (last - first) * ow];
                horizontal_pass(hp, src, h, w, ow, self.rows, &mut tmp);
                vertical_pass(vp, &tmp, last - first, ow, first, oh, dst);
            }
        }
        Ok(())
    }
}

/// Horizontal pass over input rows `rows.0..rows.1` of each plane: `[3, h, w]` →
/// `[3, rows.1 - rows.0, ow]`.
fn horizontal_pass(
    pass: &Pass,
    src: &[u8],
    h: usize,
    w: usize,
    ow: usize,
    rows: (usize, usize),
    dst: &mut [u8],
) {
    let nrows = rows.1 - rows.0;
    for c in 0..3 {
        for (r, y) in (rows.0..rows.1).enumerate() {
            let line = &src[(c * h + y) * w..(c * h + y + 1) * w];
            let out = &mut dst[(c * nrows + r) * ow..(c * nrows + r + 1) * ow];
            for (xx, o) in out.iter_mut().enumerate() {
                let (start, k) = pass.taps(xx);
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (&px, &kx) in line[start..start + k.len()].iter().zip(k) {
                    acc += i32::from(px) * kx;
                }
                *o = clip8(acc);
            }
        }
    }
}

/// Vertical pass: `[3, h, w]` → `[3, oh, w]`, where the pass's row bounds are shifted down
/// by `offset` (the first row kept by the horizontal pass).
fn vertical_pass(
    pass: &Pass,
    src: &[u8],
    h: usize,
    w: usize,
    offset: usize,
    oh: usize,
    dst: &mut [u8],
) {
    // [w]: one output row's sums. Integer sums are exact, so accumulating row by row gives
    // Pillow's per-pixel result while letting the inner loop vectorise.
    let mut acc = vec![0i32; w];
    for c in 0..3 {
        let plane = &src[c * h * w..(c + 1) * h * w];
        for yy in 0..oh {
            let (start, k) = pass.taps(yy);
            acc.fill(1 << (PRECISION_BITS - 1));
            for (t, &ky) in k.iter().enumerate() {
                let y = start + t - offset;
                for (a, &px) in acc.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                    *a += i32::from(px) * ky;
                }
            }
            let out = &mut dst[(c * oh + yy) * w..(c * oh + yy + 1) * w];
            for (o, &a) in out.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    }
}

/// `[3, h, w]` → `[3, oh, ow]`, bit-identical to Pillow's
/// `Image.resize((ow, oh), Image.BILINEAR)` on the RGB image. Errors when a size is zero or
/// `src.len() != 3 * h * w`. (To resize many images of one size, build a [`Resizer`] once.)
pub fn resize_bilinear(src: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Result<Vec<u8>> {
    let mut dst = vec![0u8; 3 * oh * ow];
    Resizer::new(h, w, oh, ow)?.resize_into(src, &mut dst)?;
    Ok(dst)
}

/// Reads an image file of any size as RGB: `([3, h, w] bytes, h, w)`, exactly the pixels of
/// Pillow's `Image.open(f).convert("RGB")` (see [`super::decode`]: JPEG, PNG, BMP, PPM/PGM,
/// TIFF, WebP). A file that cannot be read or decoded is an [`Error::BadImage`] naming it.
pub fn load_image(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let img = super::decode::load(path)?;
    Ok((img.pixels.into_owned(), img.height, img.width))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_follows_torchvision() {
        let p = Preprocess::imagenet(224);
        assert_eq!(p.output_hw(32, 32), (224, 224));
        // Portrait: width is the shorter side; int(224 * 50 / 37) = 302.
        assert_eq!(p.output_hw(50, 37), (302, 224));
        assert_eq!(p.output_hw(37, 50), (224, 302));
        assert_eq!(Preprocess::half(24).output_hw(37, 50), (24, 32));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(32, 224), (224, 32), (50, 23), (7, 7), (3, 1)] {
            let p = Pass::bilinear(i, o);
            for oo in 0..o {
                let s: i32 = p.taps(oo).1.iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= 4,
                    "{i}->{o} at {oo}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 3 * 5 * 9];
        let out = resize_bilinear(&src, 5, 9, 13, 4).unwrap();
        assert_eq!(out.len(), 3 * 13 * 4);
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn same_size_is_a_copy_and_bad_lengths_error() {
        let src: Vec<u8> = (0..3 * 4 * 6).map(|i| (i * 7) as u8).collect();
        assert_eq!(resize_bilinear(&src, 4, 6, 4, 6).unwrap(), src);
        assert!(resize_bilinear(&src, 4, 5, 8, 8).is_err());
        let p = Preprocess::imagenet(8);
        let mut out = vec![0f32; 3 * 8 * 12];
        assert!(p.apply(&src, 4, 6, &mut out).is_ok());
        let e = p.apply(&src[1..], 4, 6, &mut out).unwrap_err().to_string();
        assert!(e.contains("image buffer") && e.contains("71"), "{e}");
        let e = p.apply(&src, 4, 6, &mut out[1..]).unwrap_err().to_string();
        assert!(e.contains("output buffer"), "{e}");
    }

    #[test]
    fn fingerprint_names_every_setting() {
        let a = Preprocess::imagenet(224).fingerprint();
        assert!(
            a.contains("size=224") && a.contains("0.485") && a.contains("0.229"),
            "{a}"
        );
        assert_ne!(a, Preprocess::half(224).fingerprint());
        assert_ne!(a, Preprocess::imagenet(160).fingerprint());
    }

    #[test]
    fn fingerprint_without_a_crop_is_unchanged_and_a_crop_changes_it() {
        // The text CIFAR feature caches were keyed with before crops existed.
        assert_eq!(
            Preprocess::imagenet(224).fingerprint(),
            "resize=shorter-side(torchvision.Resize(int));interp=pil-bilinear-antialias-fixed22;\
             size=224;to_tensor=div255-f32;mean=[0.485, 0.456, 0.406];std=[0.229, 0.224, 0.225]"
        );
        let cropped = Preprocess::imagenet(256)
            .with_center_crop(224)
            .fingerprint();
        assert!(
            cropped.contains("crop_size=224") && cropped.contains("size=256"),
            "{cropped}"
        );
        assert_ne!(cropped, Preprocess::imagenet(256).fingerprint());
        assert_ne!(
            cropped,
            Preprocess::imagenet(256)
                .with_center_crop(225)
                .fingerprint()
        );
        // Serialised configurations without a crop keep their old form.
        let json = serde_json::to_string(&Preprocess::imagenet(224)).unwrap();
        assert!(!json.contains("crop"), "{json}");
        let back: Preprocess = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Preprocess::imagenet(224));
    }

    #[test]
    fn center_crop_offsets_round_half_to_even_and_pad() {
        // (h, w, crop) → (top, left), from torchvision's formulas by hand.
        for ((h, w, c), want) in [
            ((10, 10, 4), (3, 3)),
            // (11 − 4) / 2 = 3.5 → 4; (9 − 4) / 2 = 2.5 → 2.
            ((11, 9, 4), (4, 2)),
            // 0.5 → 0; 1.5 → 2.
            ((5, 7, 4), (0, 2)),
            // Larger crop: pad (6 − 3) // 2 = 1 before, 2 after; no cut.
            ((3, 8, 6), (-1, 1)),
            ((8, 2, 5), (2, -1)),
            ((4, 4, 4), (0, 0)),
        ] {
            assert_eq!(CenterCrop::new(h, w, c, c).offsets(), want, "{h}×{w} → {c}");
        }
        // A 2×3 image cropped to 4: one row of zeros above and one below ((4 − 2) // 2 and
        // (4 − 2 + 1) // 2), no column before and one after ((4 − 3) // 2 = 0, then 1).
        let src: Vec<u8> = (1..=18).collect();
        let out = center_crop(&src, 2, 3, 4).unwrap();
        assert_eq!(
            &out[..16],
            &[0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 0, 0, 0, 0]
        );
        assert_eq!(&out[16..24], &[0, 0, 0, 0, 7, 8, 9, 0]);
        assert!(center_crop(&src[1..], 2, 3, 4).is_err());
    }

    #[test]
    fn crop_sets_the_output_size_and_is_validated() {
        let p = Preprocess::imagenet(16).with_center_crop(12);
        assert_eq!(p.output_hw(20, 40), (12, 12));
        assert_eq!(p.resized_hw(20, 40), (16, 32));
        let prepared = p.prepare(20, 40).unwrap();
        assert_eq!(prepared.output_hw(), (12, 12));
        assert_eq!(prepared.output_len(), 3 * 12 * 12);
        let e = Preprocess::imagenet(16)
            .with_center_crop(0)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("crop"), "{e}");
        let e = Preprocess::imagenet(16)
            .with_center_crop(5000)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("5000"), "{e}");
    }

    #[test]
    fn invalid_settings_error() {
        let mut p = Preprocess::half(0);
        assert!(p.prepare(32, 32).is_err());
        p.size = 4;
        p.std[1] = 0.0;
        let e = p.prepare(32, 32).unwrap_err().to_string();
        assert!(e.contains("std"), "{e}");
    }

    #[test]
    fn sizes_past_the_pixel_limit_are_refused_before_allocating() {
        // An image size whose square alone passes the limit.
        let e = Preprocess::imagenet(100_000)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("100000") && e.contains("4000000"), "{e}");
        // A thin image: 4000×1 at 224 would be 896000×224.
        let p = Preprocess::imagenet(224);
        assert_eq!(p.output_hw(4000, 1), (896_000, 224));
        let e = p.prepare(4000, 1).unwrap_err().to_string();
        assert!(e.contains("4000×1") && e.contains("896000×224"), "{e}");
        // Raising the limit lets it through; ordinary images never meet it.
        let raised = Preprocess {
            max_pixels: 896_000 * 224,
            ..p.clone()
        };
        assert!(raised.prepare(4000, 1).is_ok());
        assert!(p.prepare(375, 500).is_ok());
        // No overflow in the resize arithmetic for absurd inputs.
        assert!(p.prepare(usize::MAX / 2, 1).is_err());
    }
}
