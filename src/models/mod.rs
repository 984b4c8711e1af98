//! The model families and the [`DualEncoder`] trait they share.
//!
//! Each family's file holds its configuration (serde, with presets), its network and its
//! encoder (the [`DualEncoder`] implementation and loading). What is shared lives below:
//! finding and recognising checkpoints in [`crate::checkpoint`] (the [`Family`] tag
//! included), image and box preprocessing in [`crate::preprocess`], the blocks in
//! [`crate::nn`].

pub mod brivl;
pub mod cnclip;
pub mod r2d2;
pub mod siglip2;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::ops;
use crate::preprocess::ImageInput;

pub use crate::checkpoint::Family;

/// How similarity logits become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Independent sigmoid per image–text pair (SigLIP).
    Sigmoid,
    /// Softmax over the candidate texts of each image (contrastive models).
    Softmax,
}

/// An image–text dual encoder: embed images and texts into one space and score pairs.
///
/// Embeddings are L2-normalised `f32` tensors `[n, dim]` on the model's device, so the
/// cosine similarity of two embeddings is their dot product.
pub trait DualEncoder: Send + Sync {
    /// The model family.
    fn family(&self) -> Family;
    /// The device the model runs on.
    fn device(&self) -> &Device;
    /// The dtype of the weights.
    fn dtype(&self) -> DType;
    /// The width of the shared embedding space.
    fn embed_dim(&self) -> usize;
    /// Decodes, preprocesses and embeds one batch of images in one forward pass.
    fn embed_image_batch(&self, images: &[ImageInput]) -> Result<Tensor>;
    /// Tokenises and embeds one batch of texts in one forward pass. Texts longer than the
    /// model's maximum are truncated.
    fn embed_text_batch(&self, texts: &[&str]) -> Result<Tensor>;
    /// The most inputs [`DualEncoder::embed_images`] and [`DualEncoder::embed_texts`] put
    /// in one forward pass ([`LoadOptions::max_batch`]).
    fn max_batch(&self) -> usize {
        DEFAULT_MAX_BATCH
    }

    /// Decodes, preprocesses and embeds images, [`DualEncoder::max_batch`] at a time, so
    /// that peak memory does not grow with the number of images. An embedding that is not
    /// finite (NaN weights, say) is an error naming the image.
    fn embed_images(&self, images: &[ImageInput]) -> Result<Tensor> {
        chunked(images.len(), self.max_batch(), |r| {
            let e = self.embed_image_batch(&images[r.clone()])?;
            check_finite(&e, |i| format!("image {}", images[r.start + i].origin()))?;
            Ok(e)
        })
    }

    /// Tokenises and embeds texts, [`DualEncoder::max_batch`] at a time. Texts longer than
    /// the model's maximum are truncated. An embedding that is not finite is an error
    /// naming the text.
    fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        chunked(texts.len(), self.max_batch(), |r| {
            let e = self.embed_text_batch(&texts[r.clone()])?;
            check_finite(&e, |i| format!("text {:?}", short(texts[r.start + i])))?;
            Ok(e)
        })
    }
    /// Similarity logits `[n_images, n_texts]` from embeddings.
    fn logits(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor>;
    /// How logits become probabilities.
    fn scoring(&self) -> Scoring;

    /// Probabilities from logits: sigmoid per pair, or softmax over texts per image.
    fn probabilities(&self, logits: &Tensor) -> Result<Tensor> {
        let logits = logits.to_dtype(DType::F32)?;
        Ok(match self.scoring() {
            Scoring::Sigmoid => ops::sigmoid(&logits)?,
            Scoring::Softmax => ops::softmax_last_dim(&logits)?,
        })
    }

    /// The model's cross encoder (R2D2's ITM heads), for families and checkpoints that
    /// have one; `None` for the others (PRD2, SigLIP, BriVL).
    fn cross_encoder(&self) -> Option<&dyn CrossEncoder> {
        None
    }

    /// What loading found: tensors read, and checkpoint keys the model did not use.
    fn load_report(&self) -> &crate::checkpoint::LoadReport;

    /// Cross-encoder image–text matching scores `[n_images, n_texts]` in `[0, 1]`, for
    /// families that have a cross encoder (R2D2); `Ok(None)` for the others.
    fn itm_scores(&self, images: &[ImageInput], texts: &[&str]) -> Result<Option<Tensor>> {
        let _ = (images, texts);
        Ok(None)
    }

    /// Zero-shot classification: probabilities `[n_images, n_labels]` for `labels` filled
    /// into `template` (where `{}` stands for the label).
    fn classify(&self, images: &[ImageInput], labels: &[&str], template: &str) -> Result<Tensor> {
        if labels.is_empty() {
            return Err(Error::Text("no labels given".into()));
        }
        let prompts: Vec<String> = labels.iter().map(|l| fill_template(template, l)).collect();
        let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let img = self.embed_images(images)?;
        let txt = self.embed_texts(&refs)?;
        self.probabilities(&self.logits(&img, &txt)?)
    }
}

/// Runs `f` over `0..n` in ranges of at most `chunk` and concatenates the results along
/// the first dimension. `n = 0` calls `f(0..0)` once, so the callee reports an empty input
/// as it always has.
pub fn chunked(
    n: usize,
    chunk: usize,
    mut f: impl FnMut(std::ops::Range<usize>) -> Result<Tensor>,
) -> Result<Tensor> {
    let chunk = chunk.max(1);
    if n <= chunk {
        return f(0..n);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        parts.push(f(start..(start + chunk).min(n))?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Fails with [`Error::NonFinite`] on the first row of `embeds` `[n, d]` that holds a NaN
/// or an infinity; `name(i)` describes input `i`.
pub fn check_finite(embeds: &Tensor, name: impl Fn(usize) -> String) -> Result<()> {
    if embeds.rank() != 2 {
        return Ok(());
    }
    // One reduction on the device: a row's sum is finite unless the row holds NaN or inf
    // (or overflows, which is as unusable).
    let sums = embeds.to_dtype(DType::F32)?.sum(1)?.to_vec1::<f32>()?;
    match sums.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite(format!(
            "the embedding of {} is not finite (NaN or infinite weights or inputs; check the \
             checkpoint and the config's eps values)",
            name(i)
        ))),
    }
}

/// The first 40 characters of `s`, for messages.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// Embeddings plus the states a cross encoder reads: image tokens `[n, L, w]`, or text
/// hidden states `[n, T, w]` with their padding mask `[n, T]`.
#[derive(Debug, Clone)]
pub struct CrossFeatures {
    /// `[n, dim]` f32, L2-normalised.
    pub embeds: Tensor,
    pub states: Tensor,
    /// The text padding mask (texts only).
    pub mask: Option<Tensor>,
    /// Indices of texts truncated to the model's maximum length.
    pub truncated: Vec<usize>,
}

/// A cross encoder that scores aligned image–text pairs from their states (R2D2's ITM).
pub trait CrossEncoder: Send + Sync {
    /// Embeds images, keeping the tokens the cross encoder reads.
    fn image_features_kept(&self, images: &[ImageInput]) -> Result<CrossFeatures>;
    /// Embeds texts, keeping their hidden states and padding mask.
    fn text_features_kept(&self, texts: &[&str]) -> Result<CrossFeatures>;
    /// Match scores `[k]` in `[0, 1]` of aligned pairs: image states `[k, L, w]`, text
    /// states `[k, T, w]`, text mask `[k, T]`.
    fn pair_scores(
        &self,
        image_states: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor>;
}

/// The `[n_images, n_texts]` dot products of normalised embeddings (their cosines), in
/// the images' dtype.
pub fn cosine_matrix(image_embeds: &Tensor, text_embeds: &Tensor) -> candle_core::Result<Tensor> {
    image_embeds.matmul(&text_embeds.to_dtype(image_embeds.dtype())?.t()?)
}

/// Replaces `{}` in `template` with `label` (or appends the label if there is no `{}`).
pub fn fill_template(template: &str, label: &str) -> String {
    if template.contains("{}") {
        template.replace("{}", label)
    } else {
        format!("{template}{label}")
    }
}

/// The default [`LoadOptions::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 32;

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// For region-based models (BriVL): when an image comes without boxes, use an N×N grid
    /// of boxes plus the whole image (the Nature Communications model used 6). `None`
    /// uses the model's own default.
    pub box_grid: Option<usize>,
    /// On the CPU, apply [`crate::allocator::tune_allocator`] once the model is loaded (default true).
    pub tune_allocator: bool,
    /// Make checkpoint keys that the model does not use (and no ignore rule expects) an
    /// error instead of a [`crate::checkpoint::LoadReport`] entry (default false).
    pub strict: bool,
    /// The most images or texts one forward pass of `embed_images` / `embed_texts` takes;
    /// longer inputs are encoded in chunks of this size, so peak memory does not grow
    /// with the number of inputs (default 32, at least 1).
    pub max_batch: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            box_grid: None,
            tune_allocator: true,
            strict: false,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// Parses a dtype name: `f32`, `bf16`, `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Ok(DType::F16),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype `{other}` (use f32, bf16 or f16)"
        ))),
    }
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.to_ascii_lowercase();
    let (kind, idx) = match s.split_once(':') {
        Some((k, i)) => (
            k.to_string(),
            i.parse::<usize>()
                .map_err(|_| Error::InvalidArgument(format!("bad device index in `{s}`")))?,
        ),
        None => (s.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(idx)?),
        "metal" => Ok(Device::new_metal(idx)?),
        _ => Err(Error::InvalidArgument(format!(
            "unknown device `{s}` (use cpu, cuda[:N] or metal[:N])"
        ))),
    }
}
