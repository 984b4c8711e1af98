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

    /// [`PreNormLayer::forward`] for the last position only: `[batch, 1, hidden]`, the last
    /// row of `forward`'s output. Every position is still a key and a value, but only the
    /// last is a query and goes through the MLP (for a last layer pooled at the last token).
    pub fn forward_last(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let len = xs.dim(1)?;
        if len == 0 {
            candle_core::bail!("forward_last on an empty sequence")
        }
        let h = self.ln1.forward(xs)?;
        let last = xs.narrow(1, len - 1, 1)?;
        let xs = self
            .attn
            .forward_residual(&h.narrow(1, len - 1, 1)?, Some(&h), bias, &last)?;
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

    /// The last position `[batch, 1, hidden]` of [`PreNormEncoder::forward`], with the last
    /// layer run for that row alone ([`PreNormLayer::forward_last`]).
    pub fn forward_last(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let Some((last, rest)) = self.layers.split_last() else {
            let len = xs.dim(1)?;
            return xs.narrow(1, len.saturating_sub(1), 1);
        };
        let mut xs = xs.clone();
        for layer in rest {
            xs = layer.forward(&xs, bias)?;
        }
        last.forward_last(&xs, bias)
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    use super::*;
    use crate::nn::test_util::{max_diff, randn};

    #[test]
    fn last_row_only_last_layer_matches_the_last_row_and_its_gradients() {
        let d = LayerDims {
            hidden: 16,
            heads: 2,
            intermediate: 24,
            eps: 1e-6,
            act: Activation::GeluPytorchTanh,
        };
        let (b, l) = (3, 6);
        let mut mask = vec![0f32; b * l];
        mask[l + 4] = -1e4;
        let bias = Tensor::from_vec(mask, (b, 1, 1, l), &Device::Cpu).unwrap();
        for layers in [0, 1, 3] {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let enc = PreNormEncoder::new(&d, layers, vb).unwrap();
            for (i, v) in vars.data().lock().unwrap().values().enumerate() {
                v.set(&(randn(v.dims(), 10 + i as u64) * 0.5).unwrap())
                    .unwrap();
            }
            let x = Var::from_tensor(&randn(&[b, l, 16], 1)).unwrap();
            let full = enc
                .forward(&x, Some(&bias))
                .unwrap()
                .narrow(1, l - 1, 1)
                .unwrap();
            let last = enc.forward_last(&x, Some(&bias)).unwrap();
            assert_eq!(last.dims(), [b, 1, 16]);
            assert!(max_diff(&full, &last) < 1e-5, "{layers} layers");
            // An empty sequence has no last position: an error, not a panic.
            let empty = Tensor::zeros((b, 0, 16), DType::F32, &Device::Cpu).unwrap();
            assert!(enc.forward_last(&empty, None).is_err(), "{layers} layers");
            let g = randn(&[b, 1, 16], 2);
            let gf = (&full * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gl = (&last * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let data = vars.data().lock().unwrap();
            for (name, v) in data.iter().chain([(&"input".to_string(), &x)]) {
                let (a, c) = (gf.get(v).unwrap(), gl.get(v).unwrap());
                assert!(max_diff(a, c) < 1e-4, "{layers} layers, d{name}");
            }
        }
    }
}
