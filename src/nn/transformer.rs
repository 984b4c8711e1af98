//! Transformer layers shared by the models.
//!
//! * [`PreNormLayer`]: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`: HF CLIP and SigLIP.
//! * [`PostNormLayer`]: `ln1(x + attn(x))`, then `ln2(x + mlp(x))`: PyTorch's default
//!   `nn.TransformerEncoderLayer` (BriVL's heads). BERT's post-LN layers live in
//!   [`super::bert`].

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{AttentionNames, MultiHeadAttention};
use super::linear::{linear, Linear};
use super::ops::{Activation, LayerNorm};

/// A two-layer MLP with an activation in between.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(
        dim: usize,
        hidden: usize,
        act: Activation,
        names: (&str, &str),
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, hidden, vb.pp(names.0))?,
            fc2: linear(hidden, dim, vb.pp(names.1))?,
            act,
        })
    }
}

impl Mlp {
    /// `residual + self.forward(xs)`, the residual added in `fc2`'s output pass (see
    /// [`Linear::forward_residual`]).
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward_residual(&self.fc1.forward_act(xs, Some(self.act))?, residual)
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_act(xs, Some(self.act))?)
    }
}

/// Dimensions of a transformer encoder.
#[derive(Debug, Clone, Copy)]
pub struct LayerDims {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub eps: f64,
    pub act: Activation,
}

/// A pre-LN layer with HF CLIP/SigLIP names: `layer_norm1`, `self_attn.{q,k,v,out}_proj`,
/// `layer_norm2`, `mlp.fc1`, `mlp.fc2`.
#[derive(Debug, Clone)]
pub struct PreNormLayer {
    ln1: LayerNorm,
    attn: MultiHeadAttention,
    ln2: LayerNorm,
    mlp: Mlp,
}

impl PreNormLayer {
    pub fn new(d: &LayerDims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(d.hidden, d.eps, vb.pp("layer_norm1"))?,
            attn: MultiHeadAttention::new(
                d.hidden,
                d.hidden,
                d.heads,
                AttentionNames::CLIP,
                vb.pp("self_attn"),
            )?,
            ln2: LayerNorm::new(d.hidden, d.eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(
                d.hidden,
                d.intermediate,
                d.act,
                ("fc1", "fc2"),
                vb.pp("mlp"),
            )?,
        })
    }

    /// `bias` is an additive attention mask (see [`super::ops::key_padding_bias`]).
    pub fn forward(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let xs = self
            .attn
            .forward_residual(&self.ln1.forward(xs)?, None, bias, xs)?;
        self.mlp.forward_residual(&self.ln2.forward(&xs)?, &xs)
    }
}

/// A stack of [`PreNormLayer`]s under `layers.{i}`.
#[derive(Debug, Clone)]
pub struct PreNormEncoder {
    layers: Vec<PreNormLayer>,
}

impl PreNormEncoder {
    pub fn new(d: &LayerDims, num_layers: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..num_layers)
            .map(|i| PreNormLayer::new(d, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, bias)?;
        }
        Ok(xs)
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// PyTorch `nn.TransformerEncoderLayer` with `norm_first=False` (post-LN): `self_attn`
/// (packed `in_proj`), `linear1`, `linear2`, `norm1`, `norm2`.
#[derive(Debug, Clone)]
pub struct PostNormLayer {
    attn: MultiHeadAttention,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    act: Activation,
}

impl PostNormLayer {
    pub fn new(d: &LayerDims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: MultiHeadAttention::new_packed(d.hidden, d.heads, vb.pp("self_attn"))?,
            linear1: linear(d.hidden, d.intermediate, vb.pp("linear1"))?,
            linear2: linear(d.intermediate, d.hidden, vb.pp("linear2"))?,
            norm1: LayerNorm::new(d.hidden, d.eps, vb.pp("norm1"))?,
            norm2: LayerNorm::new(d.hidden, d.eps, vb.pp("norm2"))?,
            act: d.act,
        })
    }

    pub fn forward(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let xs = self
            .norm1
            .forward(&self.attn.forward_residual(xs, None, bias, xs)?)?;
        let h = self.linear1.forward_act(&xs, Some(self.act))?;
        self.norm2.forward(&self.linear2.forward_residual(&h, &xs)?)
    }
}
