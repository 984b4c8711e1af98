//! Image inputs and preprocessing: decoding with limits, PIL-parity resampling,
//! normalisation, and the SigLIP 2 NaFlex processor.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, RgbImage};

use crate::error::{Error, Result};

/// The largest image, in pixels, that is decoded (about 16k × 16k). Larger files are
/// rejected with a clear error instead of exhausting memory.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 28;

/// Where an image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Path(PathBuf),
    Bytes(Vec<u8>),
    Image(DynamicImage),
}

/// An image plus, for BriVL, optional region boxes `[x1, y1, x2, y2]` in original pixels.
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub source: ImageSource,
    pub boxes: Option<Vec<[f32; 4]>>,
}

impl ImageInput {
    pub fn path(p: impl AsRef<Path>) -> Self {
        Self {
            source: ImageSource::Path(p.as_ref().to_path_buf()),
            boxes: None,
        }
    }

    pub fn bytes(b: impl Into<Vec<u8>>) -> Self {
        Self {
            source: ImageSource::Bytes(b.into()),
            boxes: None,
        }
    }

    pub fn image(img: DynamicImage) -> Self {
        Self {
            source: ImageSource::Image(img),
            boxes: None,
        }
    }

    /// Attaches region boxes `[x1, y1, x2, y2]` in original-image pixels.
    pub fn with_boxes(mut self, boxes: Vec<[f32; 4]>) -> Self {
        self.boxes = Some(boxes);
        self
    }

    /// A short description for error messages.
    pub fn origin(&self) -> String {
        match &self.source {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Bytes(b) => format!("<{} bytes>", b.len()),
            ImageSource::Image(i) => format!("<image {}x{}>", i.width(), i.height()),
        }
    }

    /// Decodes to 8-bit RGB, rejecting empty, corrupt and oversized images.
    pub fn decode_rgb(&self) -> Result<RgbImage> {
        let origin = self.origin();
        let img = match &self.source {
            ImageSource::Path(p) => {
                let bytes = std::fs::read(p).map_err(|e| Error::Image {
                    origin: origin.clone(),
                    reason: format!("cannot read file: {e}"),
                })?;
                decode_bytes(&bytes, &origin)?
            }
            ImageSource::Bytes(b) => decode_bytes(b, &origin)?,
            ImageSource::Image(i) => i.clone(),
        };
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::Image {
                origin,
                reason: format!("image has zero size ({}x{})", img.width(), img.height()),
            });
        }
        Ok(img.to_rgb8())
    }
}

impl From<&Path> for ImageInput {
    fn from(p: &Path) -> Self {
        ImageInput::path(p)
    }
}

impl From<DynamicImage> for ImageInput {
    fn from(i: DynamicImage) -> Self {
        ImageInput::image(i)
    }
}

fn decode_bytes(bytes: &[u8], origin: &str) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::Image {
            origin: origin.to_string(),
            reason: "empty file".into(),
        });
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image {
            origin: origin.to_string(),
            reason: format!("cannot detect format: {e}"),
        })?;
    let (w, h) = reader.into_dimensions().map_err(|e| Error::Image {
        origin: origin.to_string(),
        reason: format!("corrupt or unsupported image: {e}"),
    })?;
    if w == 0 || h == 0 {
        return Err(Error::Image {
            origin: origin.to_string(),
            reason: format!("image has zero size ({w}x{h})"),
        });
    }
    if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(Error::Image {
            origin: origin.to_string(),
            reason: format!("image is too large ({w}x{h} pixels, limit {MAX_IMAGE_PIXELS})"),
        });
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image {
            origin: origin.to_string(),
            reason: format!("cannot detect format: {e}"),
        })?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    reader.decode().map_err(|e| Error::Image {
        origin: origin.to_string(),
        reason: format!("corrupt or unsupported image: {e}"),
    })
}

/// Reads region boxes for one image from a JSON file: either a list of `[x1, y1, x2, y2]`
/// or an object with a `bbox` list (the format of BriVL's example `jsonl` lines).
pub fn boxes_from_json(path: &Path) -> Result<Vec<[f32; 4]>> {
    let origin = path.display().to_string();
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {origin}"), e))?;
    let v: serde_json::Value = serde_json::from_str(&s).map_err(|e| Error::parse(&origin, e))?;
    let list = match &v {
        serde_json::Value::Array(_) => &v,
        serde_json::Value::Object(o) => o
            .get("bbox")
            .ok_or_else(|| Error::parse(&origin, "object has no `bbox` field"))?,
        _ => {
            return Err(Error::parse(
                &origin,
                "expected a list of boxes or an object with `bbox`",
            ))
        }
    };
    let rows = list
        .as_array()
        .ok_or_else(|| Error::parse(&origin, "`bbox` is not a list"))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let nums: Vec<f32> = r
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_f64().map(|f| f as f32))
                        .collect()
                })
                .unwrap_or_default();
            match nums.as_slice() {
                [a, b, c, d] => Ok([*a, *b, *c, *d]),
                _ => Err(Error::parse(
                    &origin,
                    format!("box {i} is not four numbers: {r}"),
                )),
            }
        })
        .collect()
}

/// Image inputs from paths, each with the boxes of the JSON file at the same position in
/// `box_files` (see [`boxes_from_json`]); `box_files` is either empty or one per image.
pub fn inputs_with_box_files(paths: &[PathBuf], box_files: &[PathBuf]) -> Result<Vec<ImageInput>> {
    if !box_files.is_empty() && box_files.len() != paths.len() {
        return Err(Error::InvalidArgument(format!(
            "{} box files for {} images: give one per image",
            box_files.len(),
            paths.len()
        )));
    }
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let input = ImageInput::path(p);
            match box_files.get(i) {
                Some(b) => Ok(input.with_boxes(boxes_from_json(b)?)),
                None => Ok(input),
            }
        })
        .collect()
}

/// Resampling filters, named as in PIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    /// PIL `BILINEAR` (antialiased when downscaling, like PIL).
    Bilinear,
    /// PIL `BICUBIC` (a = −0.5, antialiased when downscaling).
    Bicubic,
}

/// Resizes an RGB image to `width × height` exactly as PIL's `Image.resize` does with the
/// given filter (separable convolution whose support grows with the downscale factor, 8-bit
/// intermediate results).
pub fn resize_pil(img: &RgbImage, width: u32, height: u32, filter: Resample) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot resize to {width}x{height}"
        )));
    }
    if img.width() == width && img.height() == height {
        return Ok(img.clone());
    }
    // PIL resamples horizontally first, then vertically, rounding and clipping to 8 bits in
    // between; fast_image_resize does the vertical pass first. With bicubic's overshoot the
    // clipped intermediate depends on the order (up to 6 levels apart on a 500×333 → 56×56
    // JPEG), so run the passes separately in PIL's order.
    if img.width() != width && img.height() != height {
        let tmp = resize_one_pass(img, width, img.height(), filter)?;
        return resize_one_pass(&tmp, width, height, filter);
    }
    resize_one_pass(img, width, height, filter)
}

/// One fast_image_resize call (a single pass when only one dimension changes).
fn resize_one_pass(img: &RgbImage, width: u32, height: u32, filter: Resample) -> Result<RgbImage> {
    let src = FirImage::from_vec_u8(
        img.width(),
        img.height(),
        img.as_raw().clone(),
        PixelType::U8x3,
    )
    .map_err(|e| Error::Image {
        origin: "resize".into(),
        reason: e.to_string(),
    })?;
    let mut dst = FirImage::new(width, height, PixelType::U8x3);
    let alg = ResizeAlg::Convolution(match filter {
        Resample::Bilinear => FilterType::Bilinear,
        Resample::Bicubic => FilterType::CatmullRom,
    });
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg))
        .map_err(|e| Error::Image {
            origin: "resize".into(),
            reason: e.to_string(),
        })?;
    RgbImage::from_raw(width, height, dst.into_vec()).ok_or_else(|| Error::Image {
        origin: "resize".into(),
        reason: "resized buffer has the wrong size".into(),
    })
}

/// Converts to a `[3, h, w]` f32 tensor with `(x/255 − mean)/std` per channel.
pub fn to_tensor_normalized(
    img: &RgbImage,
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = (p.0[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    Ok(Tensor::from_vec(data, (3, h, w), device)?)
}

/// Bilinear resize of a `[c, h, w]` f32 tensor with `align_corners=False` and **no**
/// antialias, as `torch.nn.functional.interpolate` (and torchvision 0.9.1's tensor
/// `Resize`) does.
pub fn resize_bilinear_no_antialias(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (c, h, w) = x.dims3()?;
    let src = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let coords = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        let scale = inp as f64 / out as f64;
        (0..out)
            .map(|i| {
                let s = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                (i0, i1, (s - i0 as f64) as f32)
            })
            .collect()
    };
    let ys = coords(out_h, h);
    let xs = coords(out_w, w);
    let mut out = vec![0f32; c * out_h * out_w];
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for (oy, &(y0, y1, ly)) in ys.iter().enumerate() {
            for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
                let top = plane[y0 * w + x0] * (1.0 - lx) + plane[y0 * w + x1] * lx;
                let bot = plane[y1 * w + x0] * (1.0 - lx) + plane[y1 * w + x1] * lx;
                out[ch * out_h * out_w + oy * out_w + ox] = top * (1.0 - ly) + bot * ly;
            }
        }
    }
    Ok(Tensor::from_vec(out, (c, out_h, out_w), x.device())?)
}

/// Fixed-size preprocessing: resize to `size × size` (no crop), rescale, normalise.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FixedProcessor {
    pub size: usize,
    pub resample: Resample,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl FixedProcessor {
    /// SigLIP 2 fixed resolution: bilinear, mean = std = 0.5.
    pub fn siglip2(size: usize) -> Self {
        Self {
            size,
            resample: Resample::Bilinear,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// CLIP-style (R2D2): bicubic, CLIP mean and std.
    pub fn clip(size: usize) -> Self {
        Self {
            size,
            resample: Resample::Bicubic,
            // OpenAI CLIP's constants, as written in every processor config (f32-rounded).
            mean: [0.481_454_67, 0.457_827_5, 0.408_210_72],
            std: [0.268_629_55, 0.261_302_6, 0.275_777_1],
        }
    }

    /// One image to `[3, size, size]`.
    pub fn process(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let s = self.size as u32;
        let resized = resize_pil(img, s, s, self.resample)?;
        to_tensor_normalized(&resized, self.mean, self.std, device)
    }

    /// A batch to `[n, 3, size, size]`, decoding and resizing in parallel.
    pub fn process_batch(&self, images: &[ImageInput], device: &Device) -> Result<Tensor> {
        use rayon::prelude::*;
        if images.is_empty() {
            return Err(Error::InvalidArgument("empty image batch".into()));
        }
        let ts = images
            .par_iter()
            .map(|i| self.process(&i.decode_rgb()?, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&ts, 0)?.to_device(device)?)
    }
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
            mean: [0.5; 3],
            std: [0.5; 3],
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
        let (th, tw) = self.target_size(img.height() as usize, img.width() as usize);
        let resized = resize_pil(img, tw as u32, th as u32, self.resample)?;
        let p = self.patch_size;
        let (rows, cols) = (th / p, tw / p);
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

    /// A batch of images of any aspect ratios, padded to `max_num_patches`.
    pub fn process_batch(&self, images: &[ImageInput], device: &Device) -> Result<NaFlexBatch> {
        use rayon::prelude::*;
        if images.is_empty() {
            return Err(Error::InvalidArgument("empty image batch".into()));
        }
        let parts = images
            .par_iter()
            .map(|i| self.patchify(&i.decode_rgb()?))
            .collect::<Result<Vec<_>>>()?;
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
