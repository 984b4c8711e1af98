//! Manifests and a deterministic, resumable, parallel data loader.
//!
//! **Manifests.** JSONL, one object per line:
//! `{"image": "img/1.jpg", "caption": "…"}` or `"captions": ["…", "…"]`, with optional
//! `"boxes": [[x1, y1, x2, y2], …]` (original-image pixels) and `"id"` (string or number).
//! CSV with a header row naming an `image` column (or `image_path`, `path`, `file`) and a
//! `caption` column (or `text`, `title`), optionally `id`; fields may be quoted with `"`
//! (doubled inside), and quoted fields may span lines. Relative image paths are resolved
//! against the manifest's directory. A malformed line is an error naming file and line.
//!
//! **Loader.** Each epoch visits the samples in a permutation derived from
//! `(seed, epoch)`. A batch is decoded and augmented in parallel with rayon; a sample whose
//! image is missing or corrupt is skipped and counted, and the batch is filled from the
//! following samples. Augmentation and the choice among several captions are seeded per
//! sample from `(seed, epoch, index)`, so batches do not depend on thread timing. The
//! position `(epoch, cursor)` after each batch is part of the batch and of a checkpoint:
//! restoring it continues with exactly the next sample.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::augment::{AugmentConfig, R2d2Augment};
use super::rng::{derive_rng, permutation, streams};
use super::trainer::BatchInfo;
use crate::error::{Error, Result};
use crate::preprocess::image::{resize_bilinear_no_antialias, resize_pil, Resample};
use crate::preprocess::ImageInput;

/// One image–text pair (or image with several captions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The image file (absolute, or relative to the working directory).
    pub image: PathBuf,
    /// At least one caption.
    pub captions: Vec<String>,
    /// Region boxes `[x1, y1, x2, y2]` in original-image pixels.
    pub boxes: Option<Vec<[f32; 4]>>,
    /// An identifier (pairs with the same id are positives for multi-positive losses).
    pub id: Option<String>,
}

/// A list of samples read from a manifest file.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Where it was read from (for messages).
    pub origin: String,
    pub samples: Vec<Sample>,
}

fn data_err(origin: &str, line: Option<usize>, reason: impl Into<String>) -> Error {
    Error::Data {
        origin: origin.to_string(),
        line,
        reason: reason.into(),
    }
}

impl Manifest {
    /// Reads a manifest by extension: `.jsonl`/`.json`/`.ndjson` or `.csv`.
    pub fn open(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
        {
            Some(e) if e == "jsonl" || e == "ndjson" || e == "json" => Self::from_jsonl(path),
            Some(e) if e == "csv" => Self::from_csv(path),
            _ => Err(data_err(
                &path.display().to_string(),
                None,
                "unknown manifest extension (expected .jsonl or .csv)",
            )),
        }
    }

    /// Samples given directly.
    pub fn from_samples(origin: impl Into<String>, samples: Vec<Sample>) -> Self {
        Self {
            origin: origin.into(),
            samples,
        }
    }

    fn read(path: &Path) -> Result<(String, PathBuf, String)> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading manifest {origin}"), e))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok((origin, base, text))
    }

    /// Reads a JSONL manifest.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let (origin, base, text) = Self::read(path)?;
        Self::parse_jsonl(&text, &origin, &base)
    }

    /// Parses JSONL text; relative image paths are joined to `base`.
    pub fn parse_jsonl(text: &str, origin: &str, base: &Path) -> Result<Self> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| data_err(origin, Some(lineno), format!("invalid JSON: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| data_err(origin, Some(lineno), "expected a JSON object"))?;
            let err = |r: &str| data_err(origin, Some(lineno), r);
            let image = obj
                .get("image")
                .and_then(|x| x.as_str())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| err("missing string field `image`"))?;
            let captions = match (obj.get("caption"), obj.get("captions")) {
                (Some(c), None) => vec![c
                    .as_str()
                    .ok_or_else(|| err("`caption` is not a string"))?
                    .to_string()],
                (None, Some(cs)) => cs
                    .as_array()
                    .ok_or_else(|| err("`captions` is not a list"))?
                    .iter()
                    .map(|c| c.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| err("`captions` holds a non-string"))?,
                (Some(_), Some(_)) => return Err(err("both `caption` and `captions` given")),
                (None, None) => return Err(err("missing `caption` or `captions`")),
            };
            if captions.is_empty() {
                return Err(err("`captions` is empty"));
            }
            let boxes = match obj.get("boxes") {
                None | Some(serde_json::Value::Null) => None,
                Some(b) => Some(parse_boxes(b).map_err(|r| err(&r))?),
            };
            let id = match obj.get("id") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(_) => return Err(err("`id` must be a string or a number")),
            };
            samples.push(Sample {
                image: resolve(base, image),
                captions,
                boxes,
                id,
            });
        }
        if samples.is_empty() {
            return Err(data_err(origin, None, "the manifest has no samples"));
        }
        Ok(Self {
            origin: origin.to_string(),
            samples,
        })
    }

    /// Reads a CSV manifest (header required).
    pub fn from_csv(path: &Path) -> Result<Self> {
        let (origin, base, text) = Self::read(path)?;
        Self::parse_csv(&text, &origin, &base)
    }

    /// Parses CSV text; relative image paths are joined to `base`.
    pub fn parse_csv(text: &str, origin: &str, base: &Path) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let records =
            parse_csv_records(text).map_err(|(line, r)| data_err(origin, Some(line), r))?;
        let mut it = records.into_iter();
        let (_, header) = it
            .next()
            .ok_or_else(|| data_err(origin, None, "empty CSV (a header row is required)"))?;
        let header: Vec<String> = header
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        let col = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
        let image_col =
            col(&["image", "image_path", "path", "file", "filepath"]).ok_or_else(|| {
                data_err(
                    origin,
                    Some(1),
                    format!("no image column in header {header:?} (expected `image`)"),
                )
            })?;
        let caption_col = col(&["caption", "text", "title"]).ok_or_else(|| {
            data_err(
                origin,
                Some(1),
                format!("no caption column in header {header:?} (expected `caption`)"),
            )
        })?;
        let id_col = col(&["id"]);
        let mut samples = Vec::new();
        for (line, rec) in it {
            if rec.len() == 1 && rec[0].is_empty() {
                continue;
            }
            if rec.len() != header.len() {
                return Err(data_err(
                    origin,
                    Some(line),
                    format!("{} fields, the header has {}", rec.len(), header.len()),
                ));
            }
            let image = rec[image_col].trim();
            if image.is_empty() {
                return Err(data_err(origin, Some(line), "empty image path"));
            }
            samples.push(Sample {
                image: resolve(base, image),
                captions: vec![rec[caption_col].clone()],
                boxes: None,
                id: id_col.map(|c| rec[c].clone()).filter(|s| !s.is_empty()),
            });
        }
        if samples.is_empty() {
            return Err(data_err(origin, None, "the manifest has no samples"));
        }
        Ok(Self {
            origin: origin.to_string(),
            samples,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub(crate) fn parse_boxes(v: &serde_json::Value) -> std::result::Result<Vec<[f32; 4]>, String> {
    let rows = v.as_array().ok_or("`boxes` is not a list")?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let nums: Option<Vec<f32>> = r
                .as_array()
                .map(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                .unwrap_or(None);
            match nums.as_deref() {
                Some([a, b, c, d]) => Ok([*a, *b, *c, *d]),
                _ => Err(format!("box {i} is not four numbers: {r}")),
            }
        })
        .collect()
}

/// RFC 4180 records with the 1-based line each starts on.
#[allow(clippy::type_complexity)]
fn parse_csv_records(
    text: &str,
) -> std::result::Result<Vec<(usize, Vec<String>)>, (usize, String)> {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut quoted_field = false;
    let mut line = 1usize;
    let mut rec_line = 1usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c)
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !quoted_field => {
                in_quotes = true;
                quoted_field = true;
            }
            '"' => return Err((line, "stray quote inside an unquoted field".into())),
            ',' => {
                fields.push(std::mem::take(&mut field));
                quoted_field = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                out.push((rec_line, std::mem::take(&mut fields)));
                quoted_field = false;
                line += 1;
                rec_line = line;
            }
            _ if quoted_field => {
                return Err((line, "characters after a closing quote".into()));
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err((rec_line, "unterminated quoted field".into()));
    }
    if !field.is_empty() || !fields.is_empty() || quoted_field {
        fields.push(field);
        out.push((rec_line, fields));
    }
    Ok(out)
}

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

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    pub batch_size: usize,
    /// Shuffle each epoch (a permutation from `(seed, epoch)`).
    pub shuffle: bool,
    /// Drop an epoch's last, incomplete batch (keeps the batch size constant, which
    /// contrastive losses want).
    pub drop_last: bool,
    pub seed: u64,
    pub pipeline: ImagePipeline,
}

impl DataConfig {
    /// Shuffled, drop-last batches of `batch_size` at `image_size`, seed 0, no
    /// augmentation.
    pub fn new(batch_size: usize, image_size: usize) -> Self {
        Self {
            batch_size,
            shuffle: true,
            drop_last: true,
            seed: 0,
            pipeline: ImagePipeline::new(image_size),
        }
    }
}

/// Where the loader is: the next sample is the `cursor`-th of epoch `epoch`'s order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub cursor: usize,
    /// Samples skipped since the start of the run.
    pub skipped_total: u64,
    /// Where a [`WebDatasetLoader`](super::webdataset::WebDatasetLoader) is within the
    /// epoch's shard order; `None` for the manifest [`DataLoader`] (and in checkpoints
    /// written before shards existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardCursor>,
}

/// A position inside one epoch of a WebDataset stream (see
/// [`webdataset`](super::webdataset)): the next sample is the `offset`-th that shard
/// `shard` of this rank's epoch order yields (after its in-shard shuffle). The layout
/// fields let a resume reject a position that belongs to another rank or shard list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCursor {
    /// Index into this rank's shard order for the epoch.
    pub shard: usize,
    /// Samples (usable or skipped) already consumed from that shard.
    pub offset: usize,
    /// The rank and world size the position was taken on.
    pub rank: usize,
    pub world_size: usize,
    /// The number of shards in the whole list.
    pub num_shards: usize,
}

/// Anything the training loop ([`Fit`](super::fit::Fit)) can draw batches from: the
/// manifest [`DataLoader`] or the streaming
/// [`WebDatasetLoader`](super::webdataset::WebDatasetLoader).
pub trait BatchSource: Send {
    /// The next full batch (moving on to the next epoch when one ends).
    fn next_batch(&mut self) -> Result<Batch>;
    /// The position of the next sample.
    fn position(&self) -> DataPosition;
    /// Continues from `pos` (from a checkpoint).
    fn set_position(&mut self, pos: DataPosition) -> Result<()>;
}

impl BatchSource for DataLoader {
    fn next_batch(&mut self) -> Result<Batch> {
        DataLoader::next_batch(self)
    }

    fn position(&self) -> DataPosition {
        DataLoader::position(self)
    }

    fn set_position(&mut self, pos: DataPosition) -> Result<()> {
        DataLoader::set_position(self, pos)
    }
}

/// A sample that could not be used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedSample {
    /// Index in the manifest.
    pub index: usize,
    pub image: PathBuf,
    pub reason: String,
}

/// A batch of decoded, augmented images and their captions.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[n, 3, size, size]` f32 on the CPU.
    pub images: Tensor,
    /// One caption per image (chosen per `(seed, epoch, index)` when there are several).
    pub captions: Vec<String>,
    /// Manifest indices.
    pub indices: Vec<usize>,
    pub ids: Vec<Option<String>>,
    /// Boxes in original-image pixels.
    pub boxes: Vec<Option<Vec<[f32; 4]>>>,
    /// Original `(width, height)` of each image (to scale the boxes).
    pub image_sizes: Vec<(u32, u32)>,
    pub epoch: u64,
    /// The loader's position after this batch (store it in a checkpoint).
    pub position_after: DataPosition,
    /// Samples skipped while filling this batch.
    pub skipped: Vec<SkippedSample>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }
}

/// One decoded, augmented sample on its way into a [`Batch`].
pub(crate) struct Decoded {
    pub index: usize,
    pub pixels: Vec<f32>,
    pub caption: String,
    pub id: Option<String>,
    pub boxes: Option<Vec<[f32; 4]>>,
    pub size: (u32, u32),
}

impl Batch {
    /// Stacks decoded `[3, size, size]` samples into a batch.
    pub(crate) fn assemble(
        items: Vec<Decoded>,
        size: usize,
        epoch: u64,
        position_after: DataPosition,
        skipped: Vec<SkippedSample>,
    ) -> Result<Self> {
        let count = items.len();
        let mut pixels = Vec::with_capacity(count * 3 * size * size);
        let mut captions = Vec::with_capacity(count);
        let mut indices = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        let mut boxes = Vec::with_capacity(count);
        let mut image_sizes = Vec::with_capacity(count);
        for d in items {
            pixels.extend_from_slice(&d.pixels);
            captions.push(d.caption);
            indices.push(d.index);
            ids.push(d.id);
            boxes.push(d.boxes);
            image_sizes.push(d.size);
        }
        Ok(Self {
            images: Tensor::from_vec(pixels, (count, 3, size, size), &Device::Cpu)?,
            captions,
            indices,
            ids,
            boxes,
            image_sizes,
            epoch,
            position_after,
            skipped,
        })
    }
}

impl BatchInfo for Batch {
    fn num_samples(&self) -> usize {
        self.len()
    }
}

struct Loaded {
    index: usize,
    pixels: Vec<f32>,
    caption: String,
    size: (u32, u32),
}

/// The loader (see the module docs).
#[derive(Debug)]
pub struct DataLoader {
    manifest: Arc<Manifest>,
    config: DataConfig,
    pos: DataPosition,
    order: Option<(u64, Arc<Vec<usize>>)>,
}

impl DataLoader {
    pub fn new(manifest: Manifest, config: DataConfig) -> Result<Self> {
        if manifest.is_empty() {
            return Err(data_err(
                &manifest.origin,
                None,
                "the manifest has no samples",
            ));
        }
        if config.batch_size == 0 || config.pipeline.size == 0 {
            return Err(Error::Config(
                "batch size and image size must be positive".into(),
            ));
        }
        if let Some(a) = &config.pipeline.augment {
            a.validate()?;
        }
        if let super::data::ResizeKind::R2d2Train(a) = &config.pipeline.resize {
            a.validate()?;
        }
        Ok(Self {
            manifest: Arc::new(manifest),
            config,
            pos: DataPosition::default(),
            order: None,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    /// The position of the next sample.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Continues from `pos` (from a checkpoint).
    pub fn set_position(&mut self, pos: DataPosition) -> Result<()> {
        if pos.shard.is_some() {
            return Err(data_err(
                &self.manifest.origin,
                None,
                "the position comes from a WebDataset shard loader, not a manifest",
            ));
        }
        if pos.cursor > self.manifest.len() {
            return Err(data_err(
                &self.manifest.origin,
                None,
                format!(
                    "position cursor {} is beyond the manifest's {} samples (did the manifest change?)",
                    pos.cursor,
                    self.manifest.len()
                ),
            ));
        }
        self.pos = pos;
        Ok(())
    }

    /// The order in which epoch `epoch` visits the manifest.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        if self.config.shuffle {
            permutation(self.manifest.len(), self.config.seed, epoch)
        } else {
            (0..self.manifest.len()).collect()
        }
    }

    fn order(&mut self, epoch: u64) -> Arc<Vec<usize>> {
        match &self.order {
            Some((e, o)) if *e == epoch => o.clone(),
            _ => {
                let o = Arc::new(self.epoch_order(epoch));
                self.order = Some((epoch, o.clone()));
                o
            }
        }
    }

    /// Decodes and processes sample `index` as epoch `epoch` would.
    pub fn load_sample(&self, index: usize, epoch: u64) -> Result<(Vec<f32>, String)> {
        let l = load_one(&self.manifest, &self.config, index, epoch)?;
        Ok((l.pixels, l.caption))
    }

    /// The next full batch, moving on to the next epoch when one ends. Fails only when a
    /// whole epoch yields no batch (every sample unusable, or fewer usable samples than a
    /// batch with `drop_last`).
    pub fn next_batch(&mut self) -> Result<Batch> {
        loop {
            let epoch = self.pos.epoch;
            let whole_epoch = self.pos.cursor == 0;
            if let Some(b) = self.next_batch_in_epoch()? {
                return Ok(b);
            }
            if whole_epoch {
                return Err(data_err(
                    &self.manifest.origin,
                    None,
                    format!(
                        "epoch {epoch} yielded no batch of {}: too few usable samples \
                         ({} skipped in total so far)",
                        self.config.batch_size, self.pos.skipped_total
                    ),
                ));
            }
            // The tail of an epoch was too short: go on with the next epoch.
        }
    }

    /// The next batch of the current epoch, or `None` when the epoch is over (the
    /// position then moves to the start of the next epoch; a position whose cursor is at
    /// the end of the order means "this epoch is exhausted"). With `drop_last` off, the
    /// epoch's last batch may be smaller. Use it with `shuffle: false` for evaluation.
    pub fn next_batch_in_epoch(&mut self) -> Result<Option<Batch>> {
        let epoch = self.pos.epoch;
        let order = self.order(epoch);
        let n = order.len();
        let bs = self.config.batch_size;
        let mut cursor = self.pos.cursor;
        let mut got: Vec<Loaded> = Vec::with_capacity(bs);
        let mut skipped = Vec::new();
        while got.len() < bs && cursor < n {
            let end = (cursor + bs - got.len()).min(n);
            let manifest = &self.manifest;
            let cfg = &self.config;
            let results: Vec<(usize, Result<Loaded>)> = order[cursor..end]
                .par_iter()
                .map(|&i| (i, load_one(manifest, cfg, i, epoch)))
                .collect();
            for (i, r) in results {
                match r {
                    Ok(l) => got.push(l),
                    Err(e) => skipped.push(SkippedSample {
                        index: i,
                        image: self.manifest.samples[i].image.clone(),
                        reason: e.to_string(),
                    }),
                }
            }
            cursor = end;
        }
        self.pos.skipped_total += skipped.len() as u64;
        let full = got.len() == bs;
        if !(full || (!got.is_empty() && !self.config.drop_last)) {
            // The epoch is over (nothing left, or a tail too short to keep).
            self.pos.epoch += 1;
            self.pos.cursor = 0;
            return Ok(None);
        }
        // A batch that reaches the end leaves the cursor at `n`: the next call reports the
        // end of the epoch, then moves on.
        self.pos.cursor = cursor;
        let items = got
            .into_iter()
            .map(|l| {
                let sample = &self.manifest.samples[l.index];
                Decoded {
                    index: l.index,
                    pixels: l.pixels,
                    caption: l.caption,
                    id: sample.id.clone(),
                    boxes: sample.boxes.clone(),
                    size: l.size,
                }
            })
            .collect();
        Ok(Some(Batch::assemble(
            items,
            self.config.pipeline.size,
            epoch,
            self.pos,
            skipped,
        )?))
    }
}

fn load_one(manifest: &Manifest, cfg: &DataConfig, index: usize, epoch: u64) -> Result<Loaded> {
    let sample = manifest
        .samples
        .get(index)
        .ok_or_else(|| Error::InvalidArgument(format!("sample index {index} out of range")))?;
    // A decoder bug on a hostile file must not bring training down: treat a panic like
    // any other unusable sample.
    let work = std::panic::AssertUnwindSafe(|| -> Result<Loaded> {
        let img = ImageInput::path(&sample.image).decode_rgb()?;
        let mut rng = derive_rng(cfg.seed, &[streams::AUGMENT, epoch, index as u64]);
        let pixels = cfg.pipeline.process(&img, &mut rng)?;
        let caption = if sample.captions.len() == 1 {
            sample.captions[0].clone()
        } else {
            let mut r = derive_rng(cfg.seed, &[streams::CAPTION, epoch, index as u64]);
            sample.captions[r.random_range(0..sample.captions.len() as u64) as usize].clone()
        };
        Ok(Loaded {
            index,
            pixels,
            caption,
            size: (img.width(), img.height()),
        })
    });
    match std::panic::catch_unwind(work) {
        Ok(r) => r,
        Err(_) => Err(Error::Image {
            origin: sample.image.display().to_string(),
            reason: "the decoder panicked".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_records() {
        let t =
            "image,caption\na.jpg,\"hello, \"\"world\"\"\"\r\nb.jpg,\"two\nlines\"\n\nc.jpg,plain";
        let r = parse_csv_records(t).unwrap();
        assert_eq!(r[0], (1, vec!["image".into(), "caption".into()]));
        assert_eq!(r[1], (2, vec!["a.jpg".into(), "hello, \"world\"".into()]));
        assert_eq!(r[2], (3, vec!["b.jpg".into(), "two\nlines".into()]));
        assert_eq!(r[3], (5, vec!["".to_string()]));
        assert_eq!(r[4], (6, vec!["c.jpg".into(), "plain".into()]));
        assert_eq!(parse_csv_records("a,\"b").unwrap_err().0, 1);
        assert!(parse_csv_records("a,b\"c\n").is_err());
        assert!(parse_csv_records("a,\"b\"c\n").is_err());
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let base = Path::new("/data");
        let ok = Manifest::parse_jsonl(
            "{\"image\":\"a.jpg\",\"caption\":\"x\",\"id\":3}\n\n{\"image\":\"/abs/b.jpg\",\"captions\":[\"y\",\"z\"],\"boxes\":[[1,2,3,4]]}\n",
            "m.jsonl",
            base,
        )
        .unwrap();
        assert_eq!(ok.samples[0].image, PathBuf::from("/data/a.jpg"));
        assert_eq!(ok.samples[0].id.as_deref(), Some("3"));
        assert_eq!(ok.samples[1].image, PathBuf::from("/abs/b.jpg"));
        assert_eq!(ok.samples[1].boxes, Some(vec![[1.0, 2.0, 3.0, 4.0]]));
        for (bad, want) in [
            (
                "{\"image\":\"a\",\"caption\":\"x\"}\n{\"caption\":\"x\"}",
                "line 2",
            ),
            ("{\"image\":\"a\"}", "line 1"),
            ("not json", "line 1"),
            ("{\"image\":\"a\",\"captions\":[]}", "empty"),
            (
                "{\"image\":\"a\",\"caption\":\"x\",\"boxes\":[[1,2,3]]}",
                "box 0",
            ),
        ] {
            let e = Manifest::parse_jsonl(bad, "m.jsonl", base)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
