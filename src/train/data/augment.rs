//! Image augmentation: the MoCo v2 colour pipeline on planar f32 images (BriVL), and
//! R2D2's geometric and photometric training augmentation on 8-bit images
//! ([`R2d2Augment`]).
//!
//! # Colour jitter (BriVL)
//!
//! BriVL's training code was never released; its models were trained MoCo-style, and this
//! module provides the MoCo v2 colour pipeline that family of recipes uses:
//! `RandomApply(ColorJitter(brightness, contrast, saturation, hue), p)` followed by
//! `RandomGrayscale(p)`. Each operation follows torchvision's tensor implementation
//! (`adjust_brightness`, `adjust_contrast` with the grayscale mean, `adjust_saturation`,
//! `adjust_hue` through HSV, ITU-R 601 grayscale weights, the four jitter operations in a
//! random order). All randomness comes from the generator passed in, which the data loader
//! seeds per sample from `(seed, epoch, index)`.

use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::preprocess::image::{resize_pil, Resample};

/// Colour augmentation parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    /// Brightness factor drawn from `[max(0, 1 − b), 1 + b]`.
    pub brightness: f32,
    /// Contrast factor drawn from `[max(0, 1 − c), 1 + c]`.
    pub contrast: f32,
    /// Saturation factor drawn from `[max(0, 1 − s), 1 + s]`.
    pub saturation: f32,
    /// Hue shift drawn from `[−h, h]` (at most 0.5).
    pub hue: f32,
    /// Probability that colour jitter is applied at all.
    pub jitter_p: f32,
    /// Probability of converting to (3-channel) grayscale.
    pub grayscale_p: f32,
}

impl Default for AugmentConfig {
    /// MoCo v2: `ColorJitter(0.4, 0.4, 0.4, 0.1)` with p = 0.8, grayscale with p = 0.2.
    fn default() -> Self {
        Self {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            jitter_p: 0.8,
            grayscale_p: 0.2,
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all (every probability zero).
    pub fn none() -> Self {
        Self {
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            jitter_p: 0.0,
            grayscale_p: 0.0,
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> crate::Result<()> {
        let ok = [self.brightness, self.contrast, self.saturation]
            .iter()
            .all(|x| x.is_finite() && *x >= 0.0)
            && (0.0..=0.5).contains(&self.hue)
            && (0.0..=1.0).contains(&self.jitter_p)
            && (0.0..=1.0).contains(&self.grayscale_p);
        if ok {
            Ok(())
        } else {
            Err(crate::Error::Config(format!(
                "invalid augmentation {self:?}"
            )))
        }
    }

    /// Applies the augmentation in place to a planar `[3, h, w]` image in `[0, 1]`.
    pub fn apply<R: Rng>(&self, planes: &mut [f32], rng: &mut R) {
        let jitter = self.jitter_p > 0.0 && rng.random::<f32>() < self.jitter_p;
        if jitter {
            // torchvision draws the order, then the four factors.
            let mut order = [0usize, 1, 2, 3];
            for i in (1..4).rev() {
                let j = rng.random_range(0..=(i as u64)) as usize;
                order.swap(i, j);
            }
            let factor = |rng: &mut R, x: f32| -> Option<f32> {
                (x > 0.0).then(|| rng.random_range((1.0 - x).max(0.0)..=(1.0 + x)))
            };
            let b = factor(rng, self.brightness);
            let c = factor(rng, self.contrast);
            let s = factor(rng, self.saturation);
            let h = (self.hue > 0.0).then(|| rng.random_range(-self.hue..=self.hue));
            for op in order {
                match (op, b, c, s, h) {
                    (0, Some(b), ..) => adjust_brightness(planes, b),
                    (1, _, Some(c), ..) => adjust_contrast(planes, c),
                    (2, _, _, Some(s), _) => adjust_saturation(planes, s),
                    (3, .., Some(h)) => adjust_hue(planes, h),
                    _ => {}
                }
            }
        }
        if self.grayscale_p > 0.0 && rng.random::<f32>() < self.grayscale_p {
            to_grayscale(planes);
        }
    }
}

fn split(planes: &mut [f32]) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let n = planes.len() / 3;
    let (r, gb) = planes.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    (r, g, b)
}

#[inline]
fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

/// `clamp(f · x, 0, 1)`.
pub fn adjust_brightness(planes: &mut [f32], f: f32) {
    for x in planes.iter_mut() {
        *x = (f * *x).clamp(0.0, 1.0);
    }
}

/// Blends with the mean of the grayscale image: `clamp(f · x + (1 − f) · mean, 0, 1)`.
pub fn adjust_contrast(planes: &mut [f32], f: f32) {
    let n = planes.len() / 3;
    if n == 0 {
        return;
    }
    let (r, g, b) = split(planes);
    let mean = (0..n).map(|i| gray(r[i], g[i], b[i]) as f64).sum::<f64>() / n as f64;
    let m = (1.0 - f) * mean as f32;
    for x in planes.iter_mut() {
        *x = (f * *x + m).clamp(0.0, 1.0);
    }
}

/// Blends each pixel with its grayscale value.
pub fn adjust_saturation(planes: &mut [f32], f: f32) {
    let n = planes.len() / 3;
    let (r, g, b) = split(planes);
    for i in 0..n {
        let l = (1.0 - f) * gray(r[i], g[i], b[i]);
        r[i] = (f * r[i] + l).clamp(0.0, 1.0);
        g[i] = (f * g[i] + l).clamp(0.0, 1.0);
        b[i] = (f * b[i] + l).clamp(0.0, 1.0);
    }
}

/// Rotates the hue by `h` turns (`h ∈ [−0.5, 0.5]`) through HSV, as torchvision does.
pub fn adjust_hue(planes: &mut [f32], h: f32) {
    let n = planes.len() / 3;
    let (r, g, b) = split(planes);
    for i in 0..n {
        let (hh, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        let hh = (hh + h).rem_euclid(1.0);
        let (nr, ng, nb) = hsv_to_rgb(hh, s, v);
        r[i] = nr;
        g[i] = ng;
        b[i] = nb;
    }
}

/// Replaces every channel by the grayscale value.
pub fn to_grayscale(planes: &mut [f32]) {
    let n = planes.len() / 3;
    let (r, g, b) = split(planes);
    for i in 0..n {
        let l = gray(r[i], g[i], b[i]);
        r[i] = l;
        g[i] = l;
        b[i] = l;
    }
}

/// torchvision's `_rgb2hsv` for one pixel; hue in `[0, 1)`.
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let div = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / div;
    let gc = (maxc - g) / div;
    let bc = (maxc - b) / div;
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    let h = (h / 6.0 + 1.0).rem_euclid(1.0);
    (h, s, maxc)
}

/// torchvision's `_hsv2rgb` for one pixel.
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let i = (i as i64).rem_euclid(6);
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

// ---------------------------------------------------------------------------------------
// R2D2's training augmentation
// ---------------------------------------------------------------------------------------

/// The grey that R2D2's geometric RandAugment ops fill uncovered pixels with.
pub const R2D2_FILL: [u8; 3] = [128, 128, 128];

/// The RandAugment operations R2D2 samples from, in its order.
pub const R2D2_OPS: [&str; 10] = [
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
];

/// R2D2's training augmentation, on 8-bit images before normalisation.
///
/// The official code (`data/__init__.py` and `data/matching_datasets.py` of
/// `yuxie11/R2D2`, which follow ALBEF/BLIP) trains with
///
/// ```text
/// RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=BICUBIC)
/// RandomHorizontalFlip()
/// RandomAugment(2, 5, isPIL=True, augs=['Identity', 'AutoContrast', 'Brightness',
///     'Sharpness', 'Equalize', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate'])
/// ToTensor(); Normalize(CLIP mean, CLIP std)
/// ```
///
/// [`R2d2Augment::apply`] does the first three: the crop box follows torchvision's
/// `RandomResizedCrop.get_params` ([`random_resized_crop_box`]), the crop is resized with
/// PIL's bicubic filter, the flip has probability 0.5, and RandAugment draws `num_ops`
/// operations from [`R2D2_OPS`] with replacement, applying each with probability `op_p`
/// at magnitude `magnitude` (of 10): enhance factor `m/10·1.8 + 0.1` (exactly 1, a
/// no-op, at R2D2's magnitude 5), shear `±m/10·0.3`, translation `±m/10·10` pixels,
/// rotation `±m/10·30°`, each sign a fair coin. Every op is computed like PIL on 8-bit
/// pixels ([`apply_op`]); the geometric ones are the original's OpenCV affine matrices
/// (about the origin, rotation about `(w/2, h/2)` in OpenCV's pixel-centre coordinates)
/// resampled like PIL's `transform(AFFINE, BILINEAR)` with the grey fill [`R2D2_FILL`].
///
/// The original's ops are ALBEF's OpenCV/NumPy re-implementations "with the same output
/// as PIL". Two differ from PIL beyond rounding, and PIL's definition is used here:
/// OpenCV's bilinear warp uses 5-bit fixed-point coordinates, and ALBEF's AutoContrast
/// negates an unsigned 8-bit minimum (`-low` wraps around), which turns a channel whose
/// minimum is above 0 white, where PIL stretches it to `0..=255`.
///
/// All randomness comes from the generator passed in, which the data loaders seed per
/// sample from `(seed, epoch, index)`: the same sample gets the same augmentation on every
/// run and after a resume.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct R2d2Augment {
    /// Range of the crop's area as a fraction of the image's.
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    pub ratio: [f64; 2],
    /// Probability of the horizontal flip.
    pub flip_p: f64,
    /// RandAugment operations drawn per image.
    pub num_ops: usize,
    /// RandAugment magnitude, `0..=10`.
    pub magnitude: f64,
    /// Probability that each drawn operation is applied.
    pub op_p: f64,
}

// The fields are validated finite numbers.
impl Eq for R2d2Augment {}

impl Default for R2d2Augment {
    /// R2D2's settings: scale `(0.5, 1)`, ratio `(3/4, 4/3)`, flip 0.5, 2 ops at
    /// magnitude 5 with probability 0.5.
    fn default() -> Self {
        Self {
            scale: [0.5, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip_p: 0.5,
            num_ops: 2,
            magnitude: 5.0,
            op_p: 0.5,
        }
    }
}

/// One RandAugment operation with its argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RandOp {
    Identity,
    /// PIL `ImageOps.autocontrast` (no cutoff).
    AutoContrast,
    /// PIL `ImageOps.equalize`.
    Equalize,
    /// PIL `ImageEnhance.Brightness(img).enhance(f)`.
    Brightness(f32),
    /// PIL `ImageEnhance.Sharpness(img).enhance(f)`.
    Sharpness(f32),
    /// `x' = x + f·y` (OpenCV matrix `[[1, f, 0], [0, 1, 0]]`).
    ShearX(f64),
    /// `y' = y + f·x`.
    ShearY(f64),
    /// Content moves `−d` pixels along x (OpenCV matrix `[[1, 0, −d], [0, 1, 0]]`).
    TranslateX(f64),
    TranslateY(f64),
    /// Degrees, counter-clockwise on screen, about `(w/2, h/2)` (OpenCV
    /// `getRotationMatrix2D`).
    Rotate(f64),
}

impl R2d2Augment {
    /// Checks the ranges.
    pub fn validate(&self) -> crate::Result<()> {
        let ok = self
            .scale
            .iter()
            .chain(&self.ratio)
            .all(|x| x.is_finite() && *x > 0.0)
            && self.scale[0] <= self.scale[1]
            && self.ratio[0] <= self.ratio[1]
            && (0.0..=1.0).contains(&self.flip_p)
            && (0.0..=1.0).contains(&self.op_p)
            && (0.0..=10.0).contains(&self.magnitude);
        if ok {
            Ok(())
        } else {
            Err(crate::Error::Config(format!(
                "invalid R2D2 augmentation {self:?}"
            )))
        }
    }

    /// Crops, resizes to `size`×`size`, flips and RandAugments `img`.
    pub fn apply<R: Rng>(&self, img: &RgbImage, size: u32, rng: &mut R) -> crate::Result<RgbImage> {
        self.validate()?;
        if img.width() == 0 || img.height() == 0 {
            return Err(crate::Error::InvalidArgument("an empty image".into()));
        }
        let (top, left, h, w) =
            random_resized_crop_box(img.width(), img.height(), self.scale, self.ratio, rng);
        let crop = image::imageops::crop_imm(img, left, top, w, h).to_image();
        let mut out = resize_pil(&crop, size, size, Resample::Bicubic)?;
        if rng.random::<f64>() < self.flip_p {
            out = hflip(&out);
        }
        for op in self.sample_ops(rng) {
            out = apply_op(&out, op);
        }
        Ok(out)
    }

    /// The RandAugment operations for one image, in order (those skipped by their
    /// probability left out).
    pub fn sample_ops<R: Rng>(&self, rng: &mut R) -> Vec<RandOp> {
        let level = self.magnitude / 10.0;
        let mut ops = Vec::with_capacity(self.num_ops);
        for _ in 0..self.num_ops {
            let k = rng.random_range(0..R2D2_OPS.len());
            if rng.random::<f64>() >= self.op_p {
                continue;
            }
            let enhance = (level * 1.8 + 0.1) as f32;
            let mut signed = |x: f64| if rng.random::<bool>() { -x } else { x };
            ops.push(match k {
                0 => RandOp::Identity,
                1 => RandOp::AutoContrast,
                2 => RandOp::Brightness(enhance),
                3 => RandOp::Sharpness(enhance),
                4 => RandOp::Equalize,
                5 => RandOp::ShearX(signed(level * 0.3)),
                6 => RandOp::ShearY(signed(level * 0.3)),
                7 => RandOp::TranslateX(signed(level * 10.0)),
                8 => RandOp::TranslateY(signed(level * 10.0)),
                _ => RandOp::Rotate(signed(level * 30.0)),
            });
        }
        ops
    }
}

/// torchvision's `RandomResizedCrop.get_params` for a `width`×`height` image:
/// `(top, left, height, width)` of the crop. Ten tries of an area fraction uniform in
/// `scale` and an aspect ratio log-uniform in `ratio` (sides rounded half to even, like
/// Python's `round`), the offsets uniform over the positions that fit; when no try fits,
/// the centre crop of the whole image clamped to the ratio range.
pub fn random_resized_crop_box<R: Rng>(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut R,
) -> (u32, u32, u32, u32) {
    let (fw, fh) = (width as f64, height as f64);
    let area = fw * fh;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target * aspect).sqrt().round_ties_even();
        let h = (target / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= fw && h > 0.0 && h <= fh {
            let (w, h) = (w as u32, h as u32);
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    let in_ratio = fw / fh;
    let (min_r, max_r) = (ratio[0].min(ratio[1]), ratio[0].max(ratio[1]));
    let (w, h) = if in_ratio < min_r {
        (
            width,
            ((fw / min_r).round_ties_even() as u32).clamp(1, height),
        )
    } else if in_ratio > max_r {
        (
            ((fh * max_r).round_ties_even() as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

fn uniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Applies one RandAugment operation (see [`RandOp`]).
pub fn apply_op(img: &RgbImage, op: RandOp) -> RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    match op {
        RandOp::Identity => img.clone(),
        RandOp::AutoContrast => autocontrast(img),
        RandOp::Equalize => equalize(img),
        RandOp::Brightness(f) => brightness(img, f),
        RandOp::Sharpness(f) => sharpness(img, f),
        RandOp::ShearX(f) => warp_cv(img, [[1.0, f, 0.0], [0.0, 1.0, 0.0]], R2D2_FILL),
        RandOp::ShearY(f) => warp_cv(img, [[1.0, 0.0, 0.0], [f, 1.0, 0.0]], R2D2_FILL),
        RandOp::TranslateX(d) => warp_cv(img, [[1.0, 0.0, -d], [0.0, 1.0, 0.0]], R2D2_FILL),
        RandOp::TranslateY(d) => warp_cv(img, [[1.0, 0.0, 0.0], [0.0, 1.0, -d]], R2D2_FILL),
        RandOp::Rotate(deg) => {
            let (s, c) = deg.to_radians().sin_cos();
            let (cx, cy) = (w / 2.0, h / 2.0);
            let m = [
                [c, s, (1.0 - c) * cx - s * cy],
                [-s, c, s * cx + (1.0 - c) * cy],
            ];
            warp_cv(img, m, R2D2_FILL)
        }
    }
}

/// Mirrors left to right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

fn map_channels(img: &RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for c in 0..3 {
            p.0[c] = luts[c][p.0[c] as usize];
        }
    }
    out
}

fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.pixels() {
        for c in 0..3 {
            h[c][p.0[c] as usize] += 1;
        }
    }
    h
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// PIL `ImageOps.autocontrast(img)`: each channel's range stretched to `0..=255`.
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let lo = h.iter().position(|&n| n > 0).unwrap_or(0);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(0);
        if hi <= lo {
            return identity_lut();
        }
        let scale = 255.0 / (hi - lo) as f64;
        let offset = -(lo as f64) * scale;
        std::array::from_fn(|i| ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8)
    });
    map_channels(img, &luts)
}

/// PIL `ImageOps.equalize(img)`: each channel's histogram equalised.
pub fn equalize(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let used: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
        if used.len() <= 1 {
            return identity_lut();
        }
        let total: u64 = used.iter().sum();
        let step = (total - used[used.len() - 1]) / 255;
        if step == 0 {
            return identity_lut();
        }
        let mut n = step / 2;
        std::array::from_fn(|i| {
            let v = (n / step).min(255) as u8;
            n += h[i];
            v
        })
    });
    map_channels(img, &luts)
}

/// PIL's `Image.blend(a, b, alpha)` on 8-bit channels (f32 arithmetic, truncated,
/// clipped when extrapolating).
fn blend(a: &RgbImage, b: &RgbImage, alpha: f32) -> RgbImage {
    let mut out = b.clone();
    for ((o, pa), pb) in out.pixels_mut().zip(a.pixels()).zip(b.pixels()) {
        for c in 0..3 {
            let x = pa.0[c] as i32;
            let y = pb.0[c] as i32;
            let t = x as f32 + alpha * (y - x) as f32;
            o.0[c] = if t <= 0.0 {
                0
            } else if t >= 255.0 {
                255
            } else {
                t as u8
            };
        }
    }
    out
}

/// PIL `ImageEnhance.Brightness(img).enhance(f)`: a blend with black.
pub fn brightness(img: &RgbImage, f: f32) -> RgbImage {
    let black = RgbImage::new(img.width(), img.height());
    blend(&black, img, f)
}

/// PIL `ImageEnhance.Sharpness(img).enhance(f)`: a blend with the image smoothed by
/// PIL's `SMOOTH` kernel (`[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`, border pixels kept).
pub fn sharpness(img: &RgbImage, f: f32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut smooth = img.clone();
    if w >= 3 && h >= 3 {
        let k: [f32; 9] = [1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0].map(|v: f32| v / 13.0);
        let src = img.as_raw();
        let at = |x: usize, y: usize, c: usize| src[(y * w + x) * 3 + c] as f32;
        let dst: &mut [u8] = &mut smooth;
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                for c in 0..3 {
                    // PIL's order: the row below with k[0..3], this row, the row above.
                    let row = |yy: usize, kk: &[f32]| {
                        at(x - 1, yy, c) * kk[0] + at(x, yy, c) * kk[1] + at(x + 1, yy, c) * kk[2]
                    };
                    let mut ss = 0.5f32;
                    ss += row(y + 1, &k[0..3]);
                    ss += row(y, &k[3..6]);
                    ss += row(y - 1, &k[6..9]);
                    dst[(y * w + x) * 3 + c] = if ss <= 0.0 {
                        0
                    } else if ss >= 255.0 {
                        255
                    } else {
                        ss as u8
                    };
                }
            }
        }
    }
    blend(&smooth, img, f)
}

/// Applies an OpenCV-style affine matrix `m` (source to destination, pixel centres at
/// integers) like PIL's `Image.transform(size, AFFINE, inverse, BILINEAR, fillcolor)`.
fn warp_cv(img: &RgbImage, m: [[f64; 3]; 2], fill: [u8; 3]) -> RgbImage {
    let [[a, b, tx], [c, d, ty]] = m;
    let det = a * d - b * c;
    if det == 0.0 || !det.is_finite() {
        return RgbImage::from_pixel(img.width(), img.height(), image::Rgb(fill));
    }
    // The inverse map in OpenCV coordinates, then moved to PIL's (centres at +0.5).
    let (ia, ib, ic, id) = (d / det, -b / det, -c / det, a / det);
    let (itx, ity) = (-(ia * tx + ib * ty), -(ic * tx + id * ty));
    let coeffs = [
        ia,
        ib,
        itx + 0.5 - (ia + ib) * 0.5,
        ic,
        id,
        ity + 0.5 - (ic + id) * 0.5,
    ];
    affine_bilinear(img, coeffs, fill)
}

/// PIL's `Image.transform(size, Image.AFFINE, data, Image.BILINEAR, fillcolor=fill)`:
/// output pixel `(x, y)` samples the input at `(a·x' + b·y' + c, d·x' + e·y' + f)` with
/// `x' = x + 0.5`, `y' = y + 0.5`, bilinearly between edge-clamped neighbours, truncated;
/// pixels whose sample point falls outside the input get `fill`.
pub fn affine_bilinear(img: &RgbImage, data: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let (wi, hi) = (w as i64, h as i64);
    let src = img.as_raw();
    let mut out = RgbImage::from_pixel(w, h, image::Rgb(fill));
    let dst: &mut [u8] = &mut out;
    let px = |x: i64, y: i64, c: usize| -> f64 {
        let x = x.clamp(0, wi - 1) as usize;
        let y = y.clamp(0, hi - 1) as usize;
        src[(y * w as usize + x) * 3 + c] as f64
    };
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xin = data[0] * xo + data[1] * yo + data[2];
            let yin = data[3] * xo + data[4] * yo + data[5];
            if !(xin >= 0.0 && xin < w as f64 && yin >= 0.0 && yin < h as f64) {
                continue;
            }
            let (xs, ys) = (xin - 0.5, yin - 0.5);
            let (x0, y0) = (xs.floor() as i64, ys.floor() as i64);
            let (dx, dy) = (xs - x0 as f64, ys - y0 as f64);
            let o = (y as usize * w as usize + x as usize) * 3;
            for c in 0..3 {
                let lerp = |a: f64, b: f64, t: f64| a + (b - a) * t;
                let v1 = lerp(px(x0, y0, c), px(x0 + 1, y0, c), dx);
                let v2 = if y0 + 1 >= 0 && y0 + 1 < hi {
                    lerp(px(x0, y0 + 1, c), px(x0 + 1, y0 + 1, c), dx)
                } else {
                    v1
                };
                dst[o + c] = lerp(v1, v2, dy) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::rng::derive_rng;

    #[test]
    fn hsv_round_trip() {
        for &(r, g, b) in &[
            (0.2f32, 0.4, 0.6),
            (0.9, 0.1, 0.1),
            (0.5, 0.5, 0.5),
            (0.0, 1.0, 0.3),
            (0.7, 0.7, 0.1),
        ] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!((r - r2).abs() < 1e-6 && (g - g2).abs() < 1e-6 && (b - b2).abs() < 1e-6);
        }
        // Pure red shifted by a third of a turn is pure green.
        let mut px = vec![1.0f32, 0.0, 0.0];
        adjust_hue(&mut px, 1.0 / 3.0);
        assert!((px[0]).abs() < 1e-6 && (px[1] - 1.0).abs() < 1e-6 && px[2].abs() < 1e-6);
    }

    #[test]
    fn ops_closed_form() {
        // Two pixels: planar r = [0.2, 0.8], g = [0.4, 0.6], b = [0.6, 0.1].
        let base = vec![0.2f32, 0.8, 0.4, 0.6, 0.6, 0.1];
        let mut x = base.clone();
        adjust_brightness(&mut x, 1.5);
        let want: Vec<f32> = base.iter().map(|b| (1.5 * b).clamp(0.0, 1.0)).collect();
        assert_eq!(x, want);
        assert_eq!(x[1], 1.0);
        let mut g = base.clone();
        to_grayscale(&mut g);
        let l0 = 0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6;
        assert!((g[0] - l0).abs() < 1e-7 && (g[2] - l0).abs() < 1e-7 && (g[4] - l0).abs() < 1e-7);
        let mut s = base.clone();
        adjust_saturation(&mut s, 0.0);
        assert_eq!(s, g);
        let mut c = base.clone();
        adjust_contrast(&mut c, 0.0);
        let l1 = 0.2989 * 0.8 + 0.587 * 0.6 + 0.114 * 0.1;
        let mean = (l0 + l1) / 2.0;
        assert!(c.iter().all(|v| (v - mean).abs() < 1e-6));
    }

    #[test]
    fn deterministic_per_rng() {
        let cfg = AugmentConfig {
            jitter_p: 1.0,
            grayscale_p: 0.5,
            ..Default::default()
        };
        let img: Vec<f32> = (0..3 * 16).map(|i| (i % 7) as f32 / 7.0).collect();
        let run = |seed| {
            let mut x = img.clone();
            cfg.apply(&mut x, &mut derive_rng(seed, &[2, 0, 5]));
            x
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert_ne!(run(1), img);
        let mut y = img.clone();
        AugmentConfig::none().apply(&mut y, &mut derive_rng(1, &[]));
        assert_eq!(y, img);
    }
}
