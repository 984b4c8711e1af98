//! Image inputs and resampling: decoding with limits, PIL-parity resizing, torch-parity
//! bilinear resizing of float images (with and without antialias), and normalisation.
//!
//! The processors that combine them are in [`super::processor`], region boxes in
//! [`super::boxes`]; both are re-exported here under their former paths.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, RgbImage};

use crate::error::{Error, Result};

pub use super::boxes::{boxes_from_json, inputs_with_box_files};
pub use super::processor::{NaFlexBatch, NaFlexProcessor};

/// The largest image, in pixels, that is decoded (about 16k × 16k). Larger files are
/// rejected with a clear error instead of exhausting memory.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 28;

/// The largest image file, in bytes, that is read (256 MiB). Larger files, and anything
/// that is not a regular file (a FIFO, a device, a directory), are refused before reading,
/// so a path can never make a read run forever or exhaust memory.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// The total pixels of the images being decoded and preprocessed at once, over all
/// threads (the size of one [`MAX_IMAGE_PIXELS`] image). A decode waits until its pixels
/// fit, unless nothing else is in flight, so peak memory does not grow with the thread
/// count; typical images (well under a megapixel) never wait.
pub const MAX_PIXELS_IN_FLIGHT: u64 = MAX_IMAGE_PIXELS;

static PIXELS_IN_FLIGHT: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
static PIXELS_RELEASED: std::sync::Condvar = std::sync::Condvar::new();

/// A share of [`MAX_PIXELS_IN_FLIGHT`], held while an image's pixels are alive; it is
/// given back when dropped.
#[derive(Debug)]
pub struct PixelPermit(u64);

impl PixelPermit {
    /// Waits until `pixels` more fit in the budget (or nothing else is in flight).
    pub fn acquire(pixels: u64) -> Self {
        let pixels = pixels.min(MAX_PIXELS_IN_FLIGHT);
        let mut used = PIXELS_IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + pixels > MAX_PIXELS_IN_FLIGHT {
            used = PIXELS_RELEASED
                .wait(used)
                .unwrap_or_else(|e| e.into_inner());
        }
        *used += pixels;
        PixelPermit(pixels)
    }

    /// The pixels this permit holds.
    pub fn pixels(&self) -> u64 {
        self.0
    }
}

impl Drop for PixelPermit {
    fn drop(&mut self) {
        let mut used = PIXELS_IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(self.0);
        PIXELS_RELEASED.notify_all();
    }
}

/// The pixels of all images in flight now (see [`MAX_PIXELS_IN_FLIGHT`]).
pub fn pixels_in_flight() -> u64 {
    *PIXELS_IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads an image file: a regular file of at most [`MAX_IMAGE_BYTES`].
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let origin = path.display().to_string();
    let bad = |reason: String| Error::Image {
        origin: origin.clone(),
        reason,
    };
    // Open first, then look at what was opened: a path swapped between a check and the
    // open cannot slip a FIFO or a device through. O_NONBLOCK keeps the open of a FIFO
    // from waiting for a writer.
    let file = open_nonblocking(path).map_err(|e| bad(format!("cannot open file: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("cannot read file metadata: {e}")))?;
    if !meta.is_file() {
        return Err(bad(format!(
            "not a regular file ({}); images are read from regular files only",
            file_kind(&meta)
        )));
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(bad(format!(
            "file is {} bytes, more than the {MAX_IMAGE_BYTES}-byte limit per image",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while it is read: never read past the limit.
    file.take(MAX_IMAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("cannot read file: {e}")))?;
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(bad(format!(
            "file grew past the {MAX_IMAGE_BYTES}-byte limit per image while it was read"
        )));
    }
    Ok(bytes)
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

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

    /// Decodes to 8-bit RGB, rejecting empty, corrupt, truncated and oversized images.
    pub fn decode_rgb(&self) -> Result<RgbImage> {
        Ok(self.decode_rgb_permit()?.0)
    }

    /// [`ImageInput::decode_rgb`], with the [`PixelPermit`] that holds the image's share of
    /// [`MAX_PIXELS_IN_FLIGHT`]: keep it while the pixels (or their resized copies) are in
    /// use, so that parallel preprocessing stays within the budget.
    pub fn decode_rgb_permit(&self) -> Result<(RgbImage, PixelPermit)> {
        let origin = self.origin();
        let (img, permit) = match &self.source {
            ImageSource::Path(p) => decode_bytes(&read_image_file(p)?, &origin)?,
            ImageSource::Bytes(b) => {
                if b.len() as u64 > MAX_IMAGE_BYTES {
                    return Err(Error::Image {
                        origin,
                        reason: format!(
                            "{} bytes, more than the {MAX_IMAGE_BYTES}-byte limit per image",
                            b.len()
                        ),
                    });
                }
                decode_bytes(b, &origin)?
            }
            ImageSource::Image(i) => {
                let permit = PixelPermit::acquire(i.width() as u64 * i.height() as u64);
                (i.clone(), permit)
            }
        };
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::Image {
                origin,
                reason: format!("image has zero size ({}x{})", img.width(), img.height()),
            });
        }
        Ok((img.to_rgb8(), permit))
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

fn decode_bytes(bytes: &[u8], origin: &str) -> Result<(DynamicImage, PixelPermit)> {
    let bad = |reason: String| Error::Image {
        origin: origin.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(bad("empty file".into()));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot detect format: {e}")))?;
    let format = reader.format();
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(format!("corrupt or unsupported image: {e}")))?;
    if w == 0 || h == 0 {
        return Err(bad(format!("image has zero size ({w}x{h})")));
    }
    if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(bad(format!(
            "image is too large ({w}x{h} pixels, limit {MAX_IMAGE_PIXELS})"
        )));
    }
    let permit = PixelPermit::acquire(w as u64 * h as u64);
    if format == Some(image::ImageFormat::Jpeg) {
        if let Some(img) = decode_jpeg_strict(bytes, origin)? {
            return Ok((img, permit));
        }
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot detect format: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| bad(format!("corrupt or unsupported image: {e}")))?;
    Ok((img, permit))
}

/// Decodes a JPEG with the decoder in strict mode, so that a file cut short is an error,
/// as in PIL (the lenient decoder fills the missing rows with grey). `Ok(None)`: strict
/// mode refused the file for another reason (a stray marker, say) that PIL only warns
/// about; the caller then decodes it leniently.
fn decode_jpeg_strict(bytes: &[u8], origin: &str) -> Result<Option<DynamicImage>> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    use zune_jpeg::errors::DecodeErrors;
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    match decoder.decode() {
        Ok(pixels) => {
            let Some((w, h)) = decoder.dimensions() else {
                return Ok(None);
            };
            let rgb = decoder
                .output_colorspace()
                .is_some_and(|c| c == ColorSpace::RGB);
            match RgbImage::from_raw(w as u32, h as u32, pixels) {
                Some(img) if rgb => Ok(Some(DynamicImage::ImageRgb8(img))),
                _ => Ok(None),
            }
        }
        Err(e) => {
            let truncated = matches!(e, DecodeErrors::ExhaustedData)
                || e.to_string().to_ascii_lowercase().contains("premature end");
            if truncated {
                Err(Error::Image {
                    origin: origin.to_string(),
                    reason: format!("truncated JPEG: the file ends before the image does ({e})"),
                })
            } else {
                Ok(None)
            }
        }
    }
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
    let mut data = to_planes(img);
    normalize_planes(&mut data, mean, std);
    Ok(Tensor::from_vec(data, (3, h, w), device)?)
}

/// Normalises planar `[3 · n]` floats in place: `(x − mean) / std` per channel.
pub fn normalize_planes(planes: &mut [f32], mean: [f32; 3], std: [f32; 3]) {
    let n = planes.len() / 3;
    for c in 0..3 {
        let (m, sd) = (mean[c], std[c]);
        for x in &mut planes[c * n..(c + 1) * n] {
            *x = (*x - m) / sd;
        }
    }
}

/// An RGB image as planar `[3 · h · w]` floats `x / 255` in `[0, 1]` (torchvision's
/// `ToTensor`).
pub fn to_planes(img: &RgbImage) -> Vec<f32> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = p.0[c] as f32 / 255.0;
        }
    }
    out
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
    let out = bilinear_no_antialias_planes(&src, (c, h, w), out_h, out_w)?;
    Ok(Tensor::from_vec(out, (c, out_h, out_w), x.device())?)
}

/// [`resize_bilinear_no_antialias`] on planar floats `src` of shape `(c, h, w)`.
pub fn bilinear_no_antialias_planes(
    src: &[f32],
    (c, h, w): (usize, usize, usize),
    out_h: usize,
    out_w: usize,
) -> Result<Vec<f32>> {
    if src.len() != c * h * w || h == 0 || w == 0 {
        return Err(Error::InvalidArgument(format!(
            "{} values are not a non-empty {c}x{h}x{w} image",
            src.len()
        )));
    }
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
    Ok(out)
}

/// Bilinear resize of a `[c, h, w]` f32 tensor with `align_corners=False` **and**
/// antialias (torch `interpolate(..., antialias=True)`, torchvision >= 0.17's tensor
/// `Resize`): the rows, then the columns, multiplied by [`aa_bilinear_weights`].
pub fn resize_bilinear_antialias(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, h, w) = x.dims3()?;
    let dev = x.device();
    let wy = Tensor::from_vec(aa_bilinear_weights(h, out_h), (out_h, h), dev)?;
    let wx = Tensor::from_vec(aa_bilinear_weights(w, out_w), (out_w, w), dev)?;
    let rows = x.broadcast_matmul(&wx.t()?)?; // [c, h, out_w]
    Ok(wy.broadcast_matmul(&rows)?) // [c, out_h, out_w]
}

/// Weights `[out, inp]` of PyTorch's antialiased bilinear interpolation
/// (`align_corners=False`): a triangle filter stretched by the downscale factor,
/// renormalised over the taps inside the input. They resize BriVL's images
/// ([`resize_bilinear_antialias`]) and the NaFlex position table.
pub fn aa_bilinear_weights(inp: usize, out: usize) -> Vec<f32> {
    let scale = inp as f64 / out as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut w = vec![0f32; out * inp];
    for i in 0..out {
        let center = scale * (i as f64 + 0.5);
        // The int64 casts in PyTorch truncate toward zero.
        let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
        let xmax = ((center + support + 0.5).trunc() as i64).min(inp as i64) as usize;
        let mut taps = Vec::with_capacity(xmax.saturating_sub(xmin));
        let mut total = 0.0f64;
        for j in xmin..xmax {
            let t = ((j as f64 - center + 0.5) * invscale).abs();
            let v = if t < 1.0 { 1.0 - t } else { 0.0 };
            total += v;
            taps.push((j, v));
        }
        for (j, v) in taps {
            w[i * inp + j] = if total != 0.0 {
                (v / total) as f32
            } else {
                0.0
            };
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aa_weights_rows_sum_to_one() {
        for (inp, out) in [(16, 5), (16, 16), (16, 40), (4, 3), (4, 9)] {
            let w = aa_bilinear_weights(inp, out);
            for r in 0..out {
                let s: f32 = w[r * inp..(r + 1) * inp].iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "{inp}->{out} row {r} sums to {s}");
            }
        }
        // Identity when sizes match.
        let w = aa_bilinear_weights(4, 4);
        for i in 0..4 {
            assert_eq!(w[i * 4 + i], 1.0);
        }
    }
}
