//! Streamed, batched encoding of an evaluation set.
//!
//! Images are read and decoded on a background thread (in parallel with rayon) one batch
//! ahead of the model, through a channel that holds at most one decoded batch: the model
//! never waits on the disk or the decoder once the first batch is ready, and no more than
//! three batches of decoded pixels exist at once. Texts are tokenised by the model.
//!
//! Embeddings come back as one `[n, dim]` f32 tensor on the CPU. With a cross encoder the
//! states it reads are kept as well (see [`Encoded`]).

use std::sync::mpsc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::data::ImageRef;
use super::Progress;
use crate::error::{Error, Result};
use crate::models::{CrossEncoder, DualEncoder};
use crate::preprocess::ImageInput;

/// Embeddings of images or texts, plus what a cross encoder needs to re-rank them. Every
/// tensor is on the CPU.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[n, d]` f32, L2-normalised.
    pub embeds: Tensor,
    /// Image tokens `[n, L, vw]` or text hidden states `[n, T, tw]`, when kept.
    pub states: Option<Tensor>,
    /// Text padding mask `[n, T]` (texts only), when kept.
    pub mask: Option<Tensor>,
    /// Indices of texts that were truncated to the model's maximum length.
    pub truncated: Vec<usize>,
}

impl Encoded {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.embeds.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Concatenates batches, shifting the truncated indices.
    pub fn cat(parts: &[Encoded]) -> Result<Encoded> {
        if parts.is_empty() {
            return Err(Error::InvalidArgument("nothing to concatenate".into()));
        }
        let embeds = Tensor::cat(&parts.iter().map(|p| &p.embeds).collect::<Vec<_>>(), 0)?;
        let all = |f: fn(&Encoded) -> Option<&Tensor>| -> Result<Option<Tensor>> {
            let ts: Option<Vec<&Tensor>> = parts.iter().map(f).collect();
            Ok(match ts {
                Some(ts) => Some(Tensor::cat(&ts, 0)?),
                None => None,
            })
        };
        let states = all(|p| p.states.as_ref())?;
        let mask = all(|p| p.mask.as_ref())?;
        let mut truncated = Vec::new();
        let mut offset = 0;
        for p in parts {
            truncated.extend(p.truncated.iter().map(|i| i + offset));
            offset += p.len();
        }
        Ok(Encoded {
            embeds,
            states,
            mask,
            truncated,
        })
    }

    /// The embeddings of the rows `keep` (in that order).
    pub fn select(&self, keep: &[usize]) -> Result<Encoded> {
        let idx = Tensor::from_vec(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            keep.len(),
            &Device::Cpu,
        )?;
        let pick = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match t {
                Some(t) => Some(t.index_select(&idx, 0)?),
                None => None,
            })
        };
        Ok(Encoded {
            embeds: self.embeds.index_select(&idx, 0)?,
            states: pick(&self.states)?,
            mask: pick(&self.mask)?,
            truncated: keep
                .iter()
                .enumerate()
                .filter(|(_, i)| self.truncated.contains(i))
                .map(|(j, _)| j)
                .collect(),
        })
    }
}

/// Settings of the encoders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    pub image_batch_size: usize,
    pub text_batch_size: usize,
    /// Keep the cross encoder's inputs (for re-ranking and matching).
    pub keep_states: bool,
    /// Skip images that cannot be read or decoded (reported in
    /// [`EncodedImages::skipped`]) instead of failing.
    pub skip_bad: bool,
    /// Show progress bars on standard error (with the `progress` feature).
    pub progress: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            image_batch_size: 32,
            text_batch_size: 256,
            keep_states: false,
            skip_bad: false,
            progress: false,
        }
    }
}

/// Encoded images and which ones were skipped.
#[derive(Debug, Clone)]
pub struct EncodedImages {
    /// One row per image that was kept, in dataset order.
    pub encoded: Encoded,
    /// Dataset indices of the kept rows.
    pub kept: Vec<usize>,
    /// Dataset indices and reasons of the images skipped with `skip_bad`.
    pub skipped: Vec<(usize, String)>,
}

fn to_cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

fn cross_of(model: &dyn DualEncoder) -> Result<&dyn CrossEncoder> {
    model.cross_encoder().ok_or_else(|| {
        Error::Config(format!(
            "the {} model has no cross encoder (re-ranking and ITM matching need R2D2)",
            model.family()
        ))
    })
}

/// Embeds one batch of decoded images.
fn encode_image_batch(
    model: &dyn DualEncoder,
    batch: &[ImageInput],
    keep: bool,
) -> Result<Encoded> {
    if keep {
        let f = cross_of(model)?.image_features_kept(batch)?;
        Ok(Encoded {
            embeds: to_cpu_f32(&f.embeds)?,
            states: Some(f.states.to_device(&Device::Cpu)?),
            mask: None,
            truncated: Vec::new(),
        })
    } else {
        Ok(Encoded {
            embeds: to_cpu_f32(&model.embed_images(batch)?)?,
            states: None,
            mask: None,
            truncated: Vec::new(),
        })
    }
}

/// Embeds one batch of texts.
pub fn encode_text_batch(model: &dyn DualEncoder, texts: &[&str], keep: bool) -> Result<Encoded> {
    if keep {
        let f = cross_of(model)?.text_features_kept(texts)?;
        Ok(Encoded {
            embeds: to_cpu_f32(&f.embeds)?,
            states: Some(f.states.to_device(&Device::Cpu)?),
            mask: f.mask.map(|m| m.to_device(&Device::Cpu)).transpose()?,
            truncated: f.truncated,
        })
    } else {
        Ok(Encoded {
            embeds: to_cpu_f32(&model.embed_texts(texts)?)?,
            states: None,
            mask: None,
            truncated: Vec::new(),
        })
    }
}

/// Embeds texts `text_batch_size` at a time.
pub fn encode_texts(
    model: &dyn DualEncoder,
    texts: &[&str],
    opts: &EncodeOptions,
) -> Result<Encoded> {
    if texts.is_empty() {
        return Err(Error::Text("empty list of texts".into()));
    }
    if opts.keep_states {
        cross_of(model)?;
    }
    let bar = Progress::new(texts.len(), "texts", opts.progress);
    let mut parts = Vec::new();
    for chunk in texts.chunks(opts.text_batch_size.max(1)) {
        parts.push(encode_text_batch(model, chunk, opts.keep_states)?);
        bar.inc(chunk.len());
    }
    Encoded::cat(&parts)
}

/// Reads, decodes and embeds images `image_batch_size` at a time, decoding the next batch
/// on a background thread while the model runs (see the module docs). `boxes[i]`, where
/// given, are attached to image `i` (BriVL).
pub fn encode_images(
    model: &dyn DualEncoder,
    images: &[ImageRef],
    boxes: &[Option<Vec<[f32; 4]>>],
    opts: &EncodeOptions,
) -> Result<EncodedImages> {
    if images.is_empty() {
        return Err(Error::InvalidArgument("no images to encode".into()));
    }
    if opts.keep_states {
        cross_of(model)?;
    }
    let bs = opts.image_batch_size.max(1);
    let bar = Progress::new(images.len(), "images", opts.progress);
    let (tx, rx) = mpsc::sync_channel::<(usize, Vec<Result<ImageInput>>)>(1);
    std::thread::scope(|s| -> Result<EncodedImages> {
        s.spawn(move || {
            for (b, chunk) in images.chunks(bs).enumerate() {
                let start = b * bs;
                let decoded: Vec<Result<ImageInput>> = chunk
                    .par_iter()
                    .enumerate()
                    .map(|(j, r)| {
                        let input = r.load()?;
                        Ok(match boxes.get(start + j).and_then(Option::as_ref) {
                            Some(b) => input.with_boxes(b.clone()),
                            None => input,
                        })
                    })
                    .collect();
                if tx.send((start, decoded)).is_err() {
                    // The consumer stopped (an error): stop decoding.
                    return;
                }
            }
        });
        let mut parts = Vec::new();
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        for (start, decoded) in rx {
            let n = decoded.len();
            let mut batch = Vec::with_capacity(n);
            for (j, d) in decoded.into_iter().enumerate() {
                match d {
                    Ok(input) => {
                        batch.push(input);
                        kept.push(start + j);
                    }
                    Err(e) if opts.skip_bad => skipped.push((start + j, e.to_string())),
                    Err(e) => return Err(e),
                }
            }
            if !batch.is_empty() {
                parts.push(encode_image_batch(model, &batch, opts.keep_states)?);
            }
            bar.inc(n);
        }
        if parts.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "none of the {} images could be read",
                images.len()
            )));
        }
        Ok(EncodedImages {
            encoded: Encoded::cat(&parts)?,
            kept,
            skipped,
        })
    })
}
