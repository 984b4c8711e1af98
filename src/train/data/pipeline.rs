//! Decoding a sample's image to a normalised tensor, with optional augmentation.

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::augment::{AugmentConfig, R2d2Augment};
use crate::error::Result;
use crate::preprocess::image::{resize_bilinear_no_antialias, resize_pil, Resample};

/// How an image becomes a square tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeKind {
    /// PIL-parity resize with the filter (antialiased when shrinking).
    Pil(Resample),
    /// Bilinear without antialias, `align_corners = False` (torch `interpolate`,
    /// torchvision's tensor `Resize` of old versions).
    BilinearNoAntialias,
    /// R2D2's training transform instead of a plain resize: a random resized crop
    /// (bicubic), a random horizontal flip and RandAugment, seeded per sample (see
    /// [`R2d2Augment`]).
    R2d2Train(R2d2Augment),
}

/// Decoding to a normalised `[3, size, size]` tensor, with optional augmentation.
///
/// The image is resized to a square (aspect ratio ignored, as BriVL does) first, then
/// augmented, then normalised. Colour jitter commutes with the resize except for the
/// non-linear hue rotation and clamping, and running it on the small image is much
/// cheaper.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImagePipeline {
    pub size: usize,
    pub resize: ResizeKind,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub augment: Option<AugmentConfig>,
}

/// ImageNet mean and standard deviation (BriVL).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl ImagePipeline {
    /// Bilinear (PIL) square resize, ImageNet normalisation, no augmentation.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            resize: ResizeKind::Pil(Resample::Bilinear),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            augment: None,
        }
    }

    /// The same resize and normalisation as an inference processor.
    pub fn from_fixed(p: &crate::preprocess::image::FixedProcessor) -> Self {
        Self {
            size: p.size,
            resize: ResizeKind::Pil(p.resample),
            mean: p.mean,
            std: p.std,
            augment: None,
        }
    }

    /// With augmentation.
    pub fn with_augment(mut self, a: AugmentConfig) -> Self {
        self.augment = Some(a);
        self
    }

    /// With R2D2's original training augmentation ([`R2d2Augment::default`]) in place of
    /// the resize; mean, std and size are kept (use [`ImagePipeline::from_fixed`] with the
    /// model's processor for R2D2's CLIP normalisation).
    pub fn with_r2d2_augment(mut self) -> Self {
        self.resize = ResizeKind::R2d2Train(R2d2Augment::default());
        self
    }

    /// Processes one decoded image into planar normalised f32 `[3·size·size]`; `rng` is
    /// used only when augmenting (colour jitter, or [`ResizeKind::R2d2Train`]).
    pub fn process<R: Rng>(&self, img: &RgbImage, rng: &mut R) -> Result<Vec<f32>> {
        let s = self.size;
        let mut planes = match self.resize {
            ResizeKind::Pil(filter) => {
                let r = resize_pil(img, s as u32, s as u32, filter)?;
                to_planes(&r)
            }
            ResizeKind::BilinearNoAntialias => {
                let t = Tensor::from_vec(
                    to_planes(img),
                    (3, img.height() as usize, img.width() as usize),
                    &Device::Cpu,
                )?;
                resize_bilinear_no_antialias(&t, s, s)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
            ResizeKind::R2d2Train(a) => to_planes(&a.apply(img, s as u32, rng)?),
        };
        if let Some(a) = &self.augment {
            a.apply(&mut planes, rng);
        }
        let n = s * s;
        for c in 0..3 {
            let (m, sd) = (self.mean[c], self.std[c]);
            for x in &mut planes[c * n..(c + 1) * n] {
                *x = (*x - m) / sd;
            }
        }
        Ok(planes)
    }
}

fn to_planes(img: &RgbImage) -> Vec<f32> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = p.0[c] as f32 / 255.0;
        }
    }
    out
}
