//! Colour augmentation on planar f32 images, with torchvision's semantics.
//!
//! BriVL's training code was never released; its models were trained MoCo-style, and this
//! module provides the MoCo v2 colour pipeline that family of recipes uses:
//! `RandomApply(ColorJitter(brightness, contrast, saturation, hue), p)` followed by
//! `RandomGrayscale(p)`. Each operation follows torchvision's tensor implementation
//! (`adjust_brightness`, `adjust_contrast` with the grayscale mean, `adjust_saturation`,
//! `adjust_hue` through HSV, ITU-R 601 grayscale weights, the four jitter operations in a
//! random order). All randomness comes from the generator passed in, which the data loader
//! seeds per sample from `(seed, epoch, index)`.

use rand::Rng;
use serde::{Deserialize, Serialize};

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
