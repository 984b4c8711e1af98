//! Image processors: decoded images to normalised pixel tensors.
//!
//! * [`ImageProcessor`] resizes to a fixed size (no crop) with a [`ResizeKind`] and
//!   normalises with a mean and std per channel. It serves every fixed-resolution model:
//!   SigLIP 2 ([`ImageProcessor::siglip2`]), R2D2 / PRD2 ([`ImageProcessor::clip`]) and
//!   BriVL ([`ImageProcessor::brivl`]). Its stages ([`ImageProcessor::resize_planes`],
//!   [`ImageProcessor::normalize_planes`]) are public so that a training pipeline can
//!   augment between them.
//!   (`train::ImagePipeline` wraps it, with R2D2's transform and colour jitter.)
//! * [`NaFlexProcessor`] is SigLIP 2 NaFlex's aspect-preserving patchifier.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::image::{
    bilinear_no_antialias_planes, normalize_planes, resize_bilinear_antialias, resize_pil,
    to_planes, ImageInput, Resample,
};
use crate::error::{Error, Result};

/// ImageNet mean per channel (BriVL).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation per channel (BriVL).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// OpenAI CLIP's mean, as written in every processor config (f32-rounded; R2D2).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_67, 0.457_827_5, 0.408_210_72];
/// OpenAI CLIP's standard deviation (R2D2).
pub const CLIP_STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];
/// SigLIP's mean: pixels are scaled to [−1, 1].
pub const SIGLIP_MEAN: [f32; 3] = [0.5; 3];
/// SigLIP's standard deviation.
pub const SIGLIP_STD: [f32; 3] = [0.5; 3];

/// How an image is resized to the processor's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeKind {
    /// PIL `Image.resize` on the 8-bit image with the filter (antialiased when shrinking;
    /// [`resize_pil`]): SigLIP, R2D2.
    Pil(Resample),
    /// Bilinear on the `[0, 1]` float image, `align_corners=False`, **no** antialias
    /// (torch `interpolate`, torchvision 0.9.1's tensor `Resize`; BriVL's pinned version).
    BilinearNoAntialias,
    /// The same with antialias (torchvision >= 0.17's tensor `Resize`; how BriVL's
    /// reference fixtures were made).
    BilinearAntialias,
}

/// Fixed-size preprocessing: resize to `size` (no crop), rescale to `[0, 1]`, normalise
/// `(x − mean) / std` per channel, as planar `[3, height, width]` f32.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessor {
    /// `(height, width)` of the output.
    pub size: (usize, usize),
    pub resize: ResizeKind,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// When set, the image is first resized (aspect kept, with [`ImageProcessor::resize`])
    /// so that its shorter side is this long, then center-cropped to `size` (HF's
    /// `{"shortest_edge": …}` with `do_center_crop`); when `None`, it is resized to `size`.
    #[serde(default)]
    pub shortest_edge: Option<usize>,
}

impl ImageProcessor {
    /// A processor to `size = (height, width)`.
    pub fn new(size: (usize, usize), resize: ResizeKind, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self {
            size,
            resize,
            mean,
            std,
            shortest_edge: None,
        }
    }

    /// A processor to `size × size`.
    pub fn square(size: usize, resize: ResizeKind, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self::new((size, size), resize, mean, std)
    }

    /// SigLIP 2 fixed resolution: PIL bilinear, mean = std = 0.5.
    pub fn siglip2(size: usize) -> Self {
        Self::square(
            size,
            ResizeKind::Pil(Resample::Bilinear),
            SIGLIP_MEAN,
            SIGLIP_STD,
        )
    }

    /// CLIP-style (R2D2): PIL bicubic, CLIP mean and std.
    pub fn clip(size: usize) -> Self {
        Self::square(
            size,
            ResizeKind::Pil(Resample::Bicubic),
            CLIP_MEAN,
            CLIP_STD,
        )
    }

    /// BriVL: bilinear on the float image without antialias (torchvision 0.9.1), ImageNet
    /// mean and std.
    pub fn brivl(size: usize) -> Self {
        Self::square(
            size,
            ResizeKind::BilinearNoAntialias,
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
    }

    /// The same processor with another resize.
    pub fn with_resize(mut self, resize: ResizeKind) -> Self {
        self.resize = resize;
        self
    }

    /// The resized image as planar `[3 · height · width]` floats in `[0, 1]`, before
    /// normalisation (where a training pipeline augments).
    pub fn resize_planes(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let (h, w) = self.size;
        if h == 0 || w == 0 {
            return Err(Error::InvalidArgument(format!("cannot resize to {w}x{h}")));
        }
        if let Some(edge) = self.shortest_edge {
            return self.resize_shortest_edge_and_crop(img, edge);
        }
        let src = (3, img.height() as usize, img.width() as usize);
        match self.resize {
            ResizeKind::Pil(filter) => Ok(to_planes(&resize_pil(img, w as u32, h as u32, filter)?)),
            ResizeKind::BilinearNoAntialias => {
                bilinear_no_antialias_planes(&to_planes(img), src, h, w)
            }
            ResizeKind::BilinearAntialias => {
                let x = Tensor::from_vec(to_planes(img), src, &Device::Cpu)?;
                Ok(resize_bilinear_antialias(&x, h, w)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            }
        }
    }

    /// HF's `resize(size={"shortest_edge": edge})` then `center_crop(size)`: the shorter
    /// side becomes `edge` and the longer `⌊edge · long / short⌋`, then the central
    /// `size` window is kept (top-left at `⌊(dim − crop) / 2⌋`).
    fn resize_shortest_edge_and_crop(&self, img: &RgbImage, edge: usize) -> Result<Vec<f32>> {
        let (ch, cw) = self.size;
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        if edge == 0 || iw == 0 || ih == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot resize a {iw}x{ih} image to a shortest edge of {edge}"
            )));
        }
        let (rh, rw) = if iw <= ih {
            (edge * ih / iw, edge)
        } else {
            (edge, edge * iw / ih)
        };
        if rh < ch || rw < cw {
            return Err(Error::InvalidArgument(format!(
                "a shortest edge of {edge} is smaller than the {cw}x{ch} crop"
            )));
        }
        let inner = ImageProcessor {
            size: (rh, rw),
            shortest_edge: None,
            ..*self
        };
        let planes = inner.resize_planes(img)?;
        let (top, left) = ((rh - ch) / 2, (rw - cw) / 2);
        let mut out = Vec::with_capacity(3 * ch * cw);
        for c in 0..3 {
            let plane = &planes[c * rh * rw..(c + 1) * rh * rw];
            for y in top..top + ch {
                out.extend_from_slice(&plane[y * rw + left..y * rw + left + cw]);
            }
        }
        Ok(out)
    }

    /// Normalises planar `[3 · n]` floats in place: `(x − mean) / std` per channel.
    pub fn normalize_planes(&self, planes: &mut [f32]) {
        normalize_planes(planes, self.mean, self.std);
    }

    /// One decoded image to normalised planar `[3 · height · width]` floats.
    pub fn process_planes(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let mut planes = self.resize_planes(img)?;
        self.normalize_planes(&mut planes);
        Ok(planes)
    }

    /// One decoded image to `[3, height, width]` on the CPU.
    pub fn process_rgb(&self, img: &RgbImage) -> Result<Tensor> {
        let (h, w) = self.size;
        Ok(Tensor::from_vec(
            self.process_planes(img)?,
            (3, h, w),
            &Device::Cpu,
        )?)
    }

    /// A batch to `[n, 3, height, width]` on `device`, decoding and resizing in parallel.
    pub fn process_batch(&self, images: &[ImageInput], device: &Device) -> Result<Tensor> {
        let ts = map_decoded(images, |_, img| self.process_rgb(&img))?;
        Ok(Tensor::stack(&ts, 0)?.to_device(device)?)
    }
}

/// Decodes every input and maps it (with the decoded image) through `f`, in parallel and
/// in order; an empty batch is an error.
pub fn map_decoded<T: Send>(
    images: &[ImageInput],
    f: impl Fn(&ImageInput, RgbImage) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    use rayon::prelude::*;
    if images.is_empty() {
        return Err(Error::InvalidArgument("empty image batch".into()));
    }
    images
        .par_iter()
        .map(|input| {
            // The permit holds the image's pixels in the in-flight budget until `f` is done
            // with them.
            let (img, _permit) = input.decode_rgb_permit()?;
            f(input, img)
        })
        .collect()
}

/// The largest `max_num_patches` a NaFlex processor accepts (a 4096 × 4096 image at patch
/// size 16): a larger value would upscale every image and allocate without bound.
pub const MAX_NUM_PATCHES: usize = 65_536;

/// The `max_num_patches` of a model directory's `preprocessor_config.json` (SigLIP 2
/// NaFlex), if the file gives one. A value that is not an integer in
/// `1..=`[`MAX_NUM_PATCHES`], or a file that is not JSON, is an [`Error::Config`] naming the
/// file.
pub fn read_max_num_patches(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join("preprocessor_config.json");
    let s = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let v: serde_json::Value =
        serde_json::from_str(&s).map_err(|e| Error::parse(path.display().to_string(), e))?;
    let Some(n) = v.get("max_num_patches") else {
        return Ok(None);
    };
    let n = n
        .as_u64()
        .filter(|&n| n >= 1 && n <= MAX_NUM_PATCHES as u64)
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: max_num_patches is {n}; it must be an integer from 1 to {MAX_NUM_PATCHES}",
                path.display()
            ))
        })?;
    Ok(Some(n as usize))
}

/// The SigLIP 2 NaFlex processor: aspect-preserving resize to at most `max_num_patches`
/// patches, rescale to [−1, 1], patchify in (row, col, channel) order and zero-pad.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NaFlexProcessor {
    pub patch_size: usize,
    pub max_num_patches: usize,
    pub resample: Resample,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A padded NaFlex batch.
#[derive(Debug, Clone)]
pub struct NaFlexBatch {
    /// `[n, max_num_patches, 3·p·p]`.
    pub pixel_values: Tensor,
    /// `[n, max_num_patches]`, 1 for real patches.
    pub pixel_attention_mask: Tensor,
    /// `(rows, cols)` of patches per image.
    pub spatial_shapes: Vec<(usize, usize)>,
}

impl NaFlexProcessor {
    pub fn new(patch_size: usize, max_num_patches: usize) -> Self {
        Self {
            patch_size,
            max_num_patches,
            resample: Resample::Bilinear,
            mean: SIGLIP_MEAN,
            std: SIGLIP_STD,
        }
    }

    /// The largest aspect-preserving `(height, width)` in pixels, multiples of the patch
    /// size, with at most `max_num_patches` patches (HF's binary search over the scale).
    pub fn target_size(&self, height: usize, width: usize) -> (usize, usize) {
        let p = self.patch_size as f64;
        let scaled = |scale: f64, size: usize| -> usize {
            let s = size as f64 * scale;
            let s = (s / p).ceil() * p;
            s.max(p) as usize
        };
        let eps = 1e-5;
        let (mut lo, mut hi) = (eps / 10.0, 100.0f64);
        while hi - lo >= eps {
            let scale = (lo + hi) / 2.0;
            let th = scaled(scale, height);
            let tw = scaled(scale, width);
            let n = (th / self.patch_size) * (tw / self.patch_size);
            if n <= self.max_num_patches {
                lo = scale;
            } else {
                hi = scale;
            }
        }
        (scaled(lo, height), scaled(lo, width))
    }

    /// One image to its patches `[rows·cols, 3·p·p]` and `(rows, cols)`.
    pub fn patchify(&self, img: &RgbImage) -> Result<(Vec<f32>, (usize, usize))> {
        self.validate()?;
        let (th, tw) = self.target_size(img.height() as usize, img.width() as usize);
        let resized = resize_pil(img, tw as u32, th as u32, self.resample)?;
        let p = self.patch_size;
        let (rows, cols) = (th / p, tw / p);
        if rows * cols > self.max_num_patches {
            return Err(Error::Image {
                origin: format!("<image {}x{}>", img.width(), img.height()),
                reason: format!(
                    "its aspect ratio needs {rows}x{cols} patches, more than max_num_patches {}",
                    self.max_num_patches
                ),
            });
        }
        let dim = 3 * p * p;
        let mut out = vec![0f32; rows * cols * dim];
        for r in 0..rows {
            for c in 0..cols {
                let base = (r * cols + c) * dim;
                for dy in 0..p {
                    for dx in 0..p {
                        let px = resized.get_pixel((c * p + dx) as u32, (r * p + dy) as u32);
                        for ch in 0..3 {
                            let v = (px.0[ch] as f32 / 255.0 - self.mean[ch]) / self.std[ch];
                            out[base + (dy * p + dx) * 3 + ch] = v;
                        }
                    }
                }
            }
        }
        Ok((out, (rows, cols)))
    }

    /// Checks the patch size (1 to 64) and `max_num_patches` (1 to [`MAX_NUM_PATCHES`]).
    pub fn validate(&self) -> Result<()> {
        if !(1..=64).contains(&self.patch_size) {
            return Err(Error::Config(format!(
                "NaFlex patch_size is {}; it must be from 1 to 64",
                self.patch_size
            )));
        }
        if !(1..=MAX_NUM_PATCHES).contains(&self.max_num_patches) {
            return Err(Error::Config(format!(
                "NaFlex max_num_patches is {}; it must be from 1 to {MAX_NUM_PATCHES}",
                self.max_num_patches
            )));
        }
        Ok(())
    }

    /// A batch of images of any aspect ratios, padded to `max_num_patches`.
    pub fn process_batch(&self, images: &[ImageInput], device: &Device) -> Result<NaFlexBatch> {
        self.validate()?;
        let parts = map_decoded(images, |_, img| self.patchify(&img))?;
        let n = parts.len();
        let (m, dim) = (self.max_num_patches, 3 * self.patch_size * self.patch_size);
        let mut pixels = vec![0f32; n * m * dim];
        let mut mask = vec![0u32; n * m];
        let mut shapes = Vec::with_capacity(n);
        for (i, (patches, (rows, cols))) in parts.into_iter().enumerate() {
            let np = rows * cols;
            pixels[i * m * dim..i * m * dim + np * dim].copy_from_slice(&patches);
            mask[i * m..i * m + np].iter_mut().for_each(|v| *v = 1);
            shapes.push((rows, cols));
        }
        Ok(NaFlexBatch {
            pixel_values: Tensor::from_vec(pixels, (n, m, dim), device)?,
            pixel_attention_mask: Tensor::from_vec(mask, (n, m), device)?,
            spatial_shapes: shapes,
        })
    }
}
