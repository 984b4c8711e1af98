//! The HF `CLIPVisionTransformer` tower (OpenAI CLIP's ViT), as used by R2D2 and PRD2.
//!
//! `pixel_values` `[b, c, s, s]` go through
//!
//! 1. a `p×p` stride-`p` conv **without bias** (`embeddings.patch_embedding.weight`
//!    `[d, c, p, p]`), computed here as one matmul over `(c, dy, dx)`-ordered patches;
//! 2. the learned `embeddings.class_embedding` `[d]` prepended as token 0;
//! 3. the learned `embeddings.position_embedding.weight` `[(s/p)² + 1, d]` added;
//! 4. `pre_layrnorm` (HF's spelling);
//! 5. a pre-LN encoder (`encoder.layers.N.*`, HF CLIP names, no attention mask).
//!
//! The result is HF's `last_hidden_state`. HF then applies `post_layernorm` to the CLS
//! token only, for `pooler_output`; R2D2 never uses it, so it is loaded only on request
//! ([`ClipVisionTransformer::new_with_post_layernorm`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::ops::{Activation, LayerNorm};
use super::transformer::{LayerDims, PreNormEncoder};

fn default_channels() -> usize {
    3
}
fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

/// HF `CLIPVisionConfig` (the fields the network needs, with HF names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// OpenAI CLIP ViT-L/14 at 224 px (1024 wide, 24 layers, 16 heads).
    pub fn vit_l14_224() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// OpenAI CLIP ViT-B/16 at 224 px (768 wide, 12 layers, 12 heads).
    pub fn vit_b16_224() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            patch_size: 16,
            ..Self::vit_l14_224()
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Tokens per image: the patches plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Checks the dimensions are usable.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "image size {} is not a multiple of patch size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "vision width {} is not divisible by {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// HF `CLIPVisionTransformer`: embeddings, `pre_layrnorm`, pre-LN encoder.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    /// `[d, c·p·p]`, the conv kernel flattened in `(c, dy, dx)` order.
    patch_weight: Tensor,
    /// `[d]`.
    class_embedding: Tensor,
    /// `[positions, d]`.
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: PreNormEncoder,
    post_layernorm: Option<LayerNorm>,
    cfg: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// Loads the tower without `post_layernorm` (R2D2 does not use it).
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, false, vb)
    }

    /// Loads the tower including `post_layernorm`, for [`Self::pooled`].
    pub fn new_with_post_layernorm(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, true, vb)
    }

    fn build(cfg: &ClipVisionConfig, with_post: bool, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let weight = emb.get((d, c, p, p), "patch_embedding.weight")?;
        let dims = LayerDims {
            hidden: d,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        let post_layernorm = if with_post {
            Some(LayerNorm::new(
                d,
                cfg.layer_norm_eps,
                vb.pp("post_layernorm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            patch_weight: weight.reshape((d, c * p * p))?,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.get((cfg.num_positions(), d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: PreNormEncoder::new(&dims, cfg.num_hidden_layers, vb.pp("encoder"))?,
            post_layernorm,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// The token embeddings before `pre_layrnorm`: `[b, positions, d]`.
    pub fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let (s, p) = (self.cfg.image_size, self.cfg.patch_size);
        if c != self.cfg.num_channels || h != s || w != s {
            candle_core::bail!(
                "pixel_values shape {:?} does not match the model's input [_, {}, {s}, {s}]",
                pixel_values.dims(),
                self.cfg.num_channels
            )
        }
        let g = s / p;
        let d = self.cfg.hidden_size;
        let patches = pixel_values
            .to_dtype(self.patch_weight.dtype())?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, c * p * p))?;
        let x = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        x.broadcast_add(&self.position_embedding)
    }

    /// HF's `last_hidden_state`: `[b, positions, d]`, token 0 is the class token. No
    /// `post_layernorm`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embeddings(pixel_values)?;
        let x = self.pre_layrnorm.forward(&x)?;
        self.encoder.forward(&x, None)
    }

    /// [`Self::forward`] over a subset of the tokens: image `i` keeps the tokens `keep[i]`
    /// (indices into the `positions` embeddings, 0 the class token; every list the same
    /// length) before `pre_layrnorm`. This is the patch-dropped input of feature-guided
    /// distillation.
    pub fn forward_kept(&self, pixel_values: &Tensor, keep: &[Vec<usize>]) -> Result<Tensor> {
        let x = self.embeddings(pixel_values)?;
        if keep.len() != x.dim(0)? {
            candle_core::bail!("{} kept-token lists for {} images", keep.len(), x.dim(0)?)
        }
        let rows = keep
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let k: Vec<u32> = k.iter().map(|&j| j as u32).collect();
                x.get(i)?
                    .index_select(&Tensor::new(k.as_slice(), x.device())?, 0)
            })
            .collect::<Result<Vec<_>>>()?;
        let x = self.pre_layrnorm.forward(&Tensor::stack(&rows, 0)?)?;
        self.encoder.forward(&x, None)
    }

    /// HF's `pooler_output`: `post_layernorm` of the class token of `last_hidden_state`.
    /// Fails if the tower was built without `post_layernorm`.
    pub fn pooled(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        let ln = self.post_layernorm.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("this vision tower was built without post_layernorm".into())
        })?;
        ln.forward(&last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?)
    }
}
