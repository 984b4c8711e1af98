//! A deterministic, resumable, parallel data loader.
//!
//! **Loader.** Each epoch visits the samples in a permutation derived from
//! `(seed, epoch)`. A batch is decoded and augmented in parallel with rayon; a sample whose
//! image is missing or corrupt is skipped and counted, and the batch is filled from the
//! following samples. Augmentation and the choice among several captions are seeded per
//! sample from `(seed, epoch, index)`, so batches do not depend on thread timing. The
//! position `(epoch, cursor)` after each batch is part of the batch and of a checkpoint:
//! restoring it continues with exactly the next sample.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::manifest::{data_err, Manifest};
use super::pipeline::ImagePipeline;
use crate::error::{Error, Result};
use crate::preprocess::ImageInput;
use crate::train::rng::{derive_rng, permutation, streams};
use crate::train::trainer::BatchInfo;

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

/// Anything the training loop ([`Fit`](crate::train::fit::Fit)) can draw batches from: the
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
        if config.batch_size == 0 || config.pipeline.size() == 0 {
            return Err(Error::Config(
                "batch size and image size must be positive".into(),
            ));
        }
        config.pipeline.check()?;
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
            self.config.pipeline.size(),
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
        let (img, _permit) = ImageInput::path(&sample.image).decode_rgb_permit()?;
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
