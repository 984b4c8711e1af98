//! A training sample's image: the inference [`ImageProcessor`] with augmentation around it.

use candle_core::Tensor;
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::augment::{AugmentConfig, R2d2Augment};
use crate::error::{Error, Result};
use crate::preprocess::image::{to_planes, Resample};
use crate::preprocess::{ImageProcessor, ResizeKind};
pub use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD};

/// Decoding to a normalised `[3, size, size]` tensor, with optional augmentation.
///
/// The image goes through the model's own [`ImageProcessor`] (its resize to a square,
/// aspect ratio ignored, then its mean and std), with two optional augmentations: R2D2's
/// training transform in place of the processor's resize, and colour jitter between the
/// resize and the normalisation. Colour jitter commutes with the resize except for the
/// non-linear hue rotation and clamping, and running it on the small image is much cheaper.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImagePipeline {
    /// Resize and normalisation, as at inference (square: the loader stacks
    /// `[n, 3, size, size]`).
    pub processor: ImageProcessor,
    /// R2D2's training transform in place of the processor's resize: a random resized crop
    /// (bicubic), a random horizontal flip and RandAugment, seeded per sample.
    pub r2d2: Option<R2d2Augment>,
    /// Colour augmentation, between the resize and the normalisation.
    pub augment: Option<AugmentConfig>,
}

impl ImagePipeline {
    /// Bilinear (PIL) square resize, ImageNet normalisation, no augmentation.
    pub fn new(size: usize) -> Self {
        Self::from_processor(ImageProcessor::square(
            size,
            ResizeKind::Pil(Resample::Bilinear),
            IMAGENET_MEAN,
            IMAGENET_STD,
        ))
    }

    /// The inference processor `p`, without augmentation.
    pub fn from_processor(p: ImageProcessor) -> Self {
        Self {
            processor: p,
            r2d2: None,
            augment: None,
        }
    }

    /// The side of the square output (0 when the processor is not square, which
    /// [`ImagePipeline::check`] refuses).
    pub fn size(&self) -> usize {
        let (h, w) = self.processor.size;
        if h == w {
            h
        } else {
            0
        }
    }

    /// Fails unless the output is a non-empty square and the augmentations are valid.
    pub fn check(&self) -> Result<()> {
        let (h, w) = self.processor.size;
        if h == 0 || h != w {
            return Err(Error::Config(format!(
                "the training image size must be a non-empty square, got {h}x{w}"
            )));
        }
        if let Some(a) = &self.augment {
            a.validate()?;
        }
        if let Some(a) = &self.r2d2 {
            a.validate()?;
        }
        Ok(())
    }

    /// With colour augmentation.
    pub fn with_augment(mut self, a: AugmentConfig) -> Self {
        self.augment = Some(a);
        self
    }

    /// With R2D2's original training augmentation ([`R2d2Augment::default`]) in place of
    /// the resize; the processor's mean, std and size are kept (use
    /// [`ImagePipeline::from_processor`] with the model's processor for R2D2's CLIP
    /// normalisation).
    pub fn with_r2d2_augment(mut self) -> Self {
        self.r2d2 = Some(R2d2Augment::default());
        self
    }

    /// Processes one decoded image into planar normalised f32 `[3·size·size]`; `rng` is
    /// used only when augmenting.
    pub fn process<R: Rng>(&self, img: &RgbImage, rng: &mut R) -> Result<Vec<f32>> {
        let mut planes = match &self.r2d2 {
            None => self.processor.resize_planes(img)?,
            Some(a) => to_planes(&a.apply(img, self.size() as u32, rng)?),
        };
        if let Some(a) = &self.augment {
            a.apply(&mut planes, rng);
        }
        self.processor.normalize_planes(&mut planes);
        Ok(planes)
    }

    /// [`ImagePipeline::process`] as a `[3, size, size]` tensor on the CPU.
    pub fn process_tensor<R: Rng>(&self, img: &RgbImage, rng: &mut R) -> Result<Tensor> {
        let s = self.size();
        Ok(Tensor::from_vec(
            self.process(img, rng)?,
            (3, s, s),
            &candle_core::Device::Cpu,
        )?)
    }
}
