//! BERT encoder (HF `BertModel` names), with optional BLIP-style cross-attention layers.
//!
//! Every layer is post-LN: `LN(x + attn(x))`, optionally `LN(x + cross(x, ctx))`, then
//! `LN(x + ffn(x))`. The embeddings can be skipped entirely ([`Bert::forward_embeds`]), as the
//! R2D2 joint layers do with `encoder_embeds`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::attention::{AttentionNames, MultiHeadAttention};
use super::linear::{linear, Linear};
use super::ops::{key_padding_bias, Activation, LayerNorm};

/// The mask value HF BERT (transformers 4.x at the time of these checkpoints) and BLIP add
/// to masked self-attention scores.
pub const SELF_MASK_VALUE: f64 = -10000.0;

/// A BERT configuration, readable from an HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Width of the cross-attention context (BLIP's `encoder_width`); `None` for a plain
    /// encoder.
    #[serde(default)]
    pub encoder_width: Option<usize>,
}

fn default_vocab() -> usize {
    21128
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// `hfl/chinese-roberta-wwm-ext` (BERT-base, vocab 21128).
    pub fn chinese_roberta_wwm_ext() -> Self {
        Self {
            vocab_size: 21128,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            encoder_width: None,
        }
    }

    /// `hfl/chinese-roberta-wwm-ext-large` (BERT-large, vocab 21128).
    pub fn chinese_roberta_wwm_ext_large() -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            ..Self::chinese_roberta_wwm_ext()
        }
    }
}

/// Word, position and (optional) token-type embeddings followed by LayerNorm.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Option<Embedding>,
    norm: LayerNorm,
}

impl BertEmbeddings {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let token_type = if cfg.type_vocab_size > 0 {
            Some(candle_nn::embedding(
                cfg.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?)
        } else {
            None
        };
        Ok(Self {
            word: candle_nn::embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                cfg.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type,
            norm: LayerNorm::new_bert(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `input_ids` `[batch, len]`; token types default to zeros, as HF does.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        crate::nn::ops::check_token_ids(input_ids, self.word.embeddings().dim(0)?)?;
        let max_len = self.position.embeddings().dim(0)?;
        if len > max_len {
            candle_core::bail!("{len} tokens are more than the model's {max_len} positions")
        }
        let positions = Tensor::arange(0u32, len as u32, input_ids.device())?;
        let mut x = self
            .word
            .forward(input_ids)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        if let Some(tt) = &self.token_type {
            let t = match token_type_ids {
                Some(t) => tt.forward(t)?,
                None => {
                    let zero = Tensor::zeros(1, DType::U32, input_ids.device())?;
                    tt.forward(&zero)?
                }
            };
            x = x.broadcast_add(&t)?;
        }
        self.norm.forward(&x)
    }
}

/// Attention followed by `output.dense` and a residual LayerNorm.
#[derive(Debug, Clone)]
struct BertAttention {
    attn: MultiHeadAttention,
    norm: LayerNorm,
}

impl BertAttention {
    fn new(cfg: &BertConfig, kv_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: MultiHeadAttention::new(
                cfg.hidden_size,
                kv_dim,
                cfg.num_attention_heads,
                AttentionNames::BERT,
                vb.clone(),
            )?,
            norm: LayerNorm::new_bert(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("output").pp("LayerNorm"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
        self.norm
            .forward(&self.attn.forward_residual(x, ctx, bias, x)?)
    }
}

/// One post-LN BERT layer, with cross-attention when the config has an `encoder_width`.
#[derive(Debug, Clone)]
pub struct BertLayer {
    attention: BertAttention,
    cross: Option<BertAttention>,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    act: Activation,
}

impl BertLayer {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let cross = match cfg.encoder_width {
            Some(w) => Some(BertAttention::new(cfg, w, vb.pp("crossattention"))?),
            None => None,
        };
        Ok(Self {
            attention: BertAttention::new(cfg, cfg.hidden_size, vb.pp("attention"))?,
            cross,
            intermediate: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                vb.pp("intermediate").pp("dense"),
            )?,
            output: linear(
                cfg.intermediate_size,
                cfg.hidden_size,
                vb.pp("output").pp("dense"),
            )?,
            norm: LayerNorm::new_bert(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("output").pp("LayerNorm"),
            )?,
            act: cfg.hidden_act,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        self_bias: Option<&Tensor>,
        context: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<Tensor> {
        let x = self.attention.forward(x, None, self_bias)?;
        self.cross_and_mlp(x, context)
    }

    /// [`BertLayer::forward`] for the first position only (`[CLS]`): `[batch, 1, hidden]`,
    /// the first row of `forward`'s output. Every position is still a key and a value of the
    /// self-attention, but only the first is a query and goes through the cross-attention and
    /// the MLP; for a last layer whose `[CLS]` state is all that is read, this skips the rest
    /// of the layer's work (and of its backward pass).
    pub fn forward_first(
        &self,
        x: &Tensor,
        self_bias: Option<&Tensor>,
        context: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<Tensor> {
        let first = x.narrow(1, 0, 1)?;
        let x = self.attention.forward(&first, Some(x), self_bias)?;
        self.cross_and_mlp(x, context)
    }

    fn cross_and_mlp(
        &self,
        mut x: Tensor,
        context: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<Tensor> {
        if let (Some(cross), Some((ctx, ctx_bias))) = (&self.cross, context) {
            x = cross.forward(&x, Some(ctx), ctx_bias)?;
        }
        let h = self.intermediate.forward_act(&x, Some(self.act))?;
        self.norm.forward(&self.output.forward_residual(&h, &x)?)
    }
}

/// A BERT model: optional embeddings, `encoder.layer.{i}`, optional pooler (not used by the
/// supported models, loaded only when asked for).
#[derive(Debug, Clone)]
pub struct Bert {
    embeddings: Option<BertEmbeddings>,
    layers: Vec<BertLayer>,
    hidden_size: usize,
}

impl Bert {
    /// A full BERT (embeddings and encoder).
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, true, vb)
    }

    /// An encoder without embeddings, fed by [`Bert::forward_embeds`] (BLIP's
    /// `mode='multimodal'` with `encoder_embeds`).
    pub fn new_without_embeddings(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, false, vb)
    }

    fn build(cfg: &BertConfig, with_embeddings: bool, vb: VarBuilder) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            candle_core::bail!(
                "BERT hidden size {} is not divisible by {} heads",
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        let embeddings = if with_embeddings {
            Some(BertEmbeddings::new(cfg, vb.pp("embeddings"))?)
        } else {
            None
        };
        let vl = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::new(cfg, vl.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            hidden_size: cfg.hidden_size,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token ids `[batch, len]` to hidden states `[batch, len, hidden]`. With
    /// `attention_mask = None` every position attends to every other one, padding included
    /// (as BriVL calls its text BERT).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let emb = self.embeddings.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("this BERT was built without embeddings".into())
        })?;
        let x = emb.forward(input_ids, token_type_ids)?;
        self.forward_embeds(&x, attention_mask, None)
    }

    /// Runs the encoder on given embeddings `[batch, len, hidden]`.
    ///
    /// `attention_mask` is a 0/1 `[batch, len]` mask (additive −10000 where 0). `context` is
    /// `(states, mask)` for cross-attention; the cross mask is additive `(1−m)·cross_neg`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        context: Option<(&Tensor, Option<&Tensor>, f64)>,
    ) -> Result<Tensor> {
        self.encode(embeds, attention_mask, context, false)
    }

    /// The `[CLS]` state `[batch, 1, hidden]` of [`Bert::forward_embeds`]: the same numbers
    /// as its first row, with the last layer run for that row alone
    /// ([`BertLayer::forward_first`]).
    pub fn forward_embeds_cls(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        context: Option<(&Tensor, Option<&Tensor>, f64)>,
    ) -> Result<Tensor> {
        self.encode(embeds, attention_mask, context, true)
    }

    fn encode(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        context: Option<(&Tensor, Option<&Tensor>, f64)>,
        cls_only: bool,
    ) -> Result<Tensor> {
        let dtype = embeds.dtype();
        let self_bias = match attention_mask {
            Some(m) => Some(key_padding_bias(m, SELF_MASK_VALUE, dtype)?),
            None => None,
        };
        let ctx = match context {
            Some((states, mask, neg)) => {
                let bias = match mask {
                    Some(m) => Some(key_padding_bias(m, neg, dtype)?),
                    None => None,
                };
                Some((states.clone(), bias))
            }
            None => None,
        };
        let mut x = embeds.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let c = ctx.as_ref().map(|(s, b)| (s, b.as_ref()));
            x = if cls_only && i == last {
                layer.forward_first(&x, self_bias.as_ref(), c)?
            } else {
                layer.forward(&x, self_bias.as_ref(), c)?
            };
        }
        if cls_only && self.layers.is_empty() {
            x = x.narrow(1, 0, 1)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    use super::*;
    use crate::nn::test_util::{max_diff, randn};

    /// A cross-attending BERT without embeddings, every parameter a var with random values.
    fn joint_bert(layers: usize) -> (Bert, VarMap) {
        let cfg = BertConfig {
            hidden_size: 16,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            intermediate_size: 24,
            encoder_width: Some(12),
            ..BertConfig::chinese_roberta_wwm_ext()
        };
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let bert = Bert::new_without_embeddings(&cfg, vb).unwrap();
        for (i, v) in vars.data().lock().unwrap().values().enumerate() {
            let t = (randn(v.dims(), 100 + i as u64) * 0.5).unwrap();
            v.set(&t).unwrap();
        }
        (bert, vars)
    }

    #[test]
    fn cls_only_last_layer_matches_the_first_row_and_its_gradients() {
        let (b, l, lc) = (3, 7, 5);
        let x = randn(&[b, l, 16], 1);
        let ctx = randn(&[b, lc, 12], 2);
        let mask =
            Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 0., 0.], (1, l), &Device::Cpu).unwrap();
        let mask = mask.broadcast_as((b, l)).unwrap().contiguous().unwrap();
        let cmask = Tensor::from_vec(vec![1f32, 1., 1., 0., 0.], (1, lc), &Device::Cpu).unwrap();
        let cmask = cmask.broadcast_as((b, lc)).unwrap().contiguous().unwrap();
        for layers in [0, 1, 2] {
            let (bert, vars) = joint_bert(layers);
            let x = Var::from_tensor(&x).unwrap();
            let context = Some((&ctx, Some(&cmask), -10000.0));
            let full = bert
                .forward_embeds(&x, Some(&mask), context)
                .unwrap()
                .narrow(1, 0, 1)
                .unwrap();
            let cls = bert.forward_embeds_cls(&x, Some(&mask), context).unwrap();
            assert_eq!(cls.dims(), [b, 1, 16]);
            assert!(max_diff(&full, &cls) < 1e-5, "{layers} layers");
            // An empty sequence has no [CLS] position: an error, not a panic.
            let empty = Tensor::zeros((b, 0, 16), DType::F32, &Device::Cpu).unwrap();
            assert!(bert.forward_embeds_cls(&empty, None, context).is_err());
            // The same gradients for the input and every parameter (training path).
            let g = randn(&[b, 1, 16], 3);
            let gf = (&full * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&cls * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let data = vars.data().lock().unwrap();
            for (name, v) in data.iter().chain([(&"input".to_string(), &x)]) {
                let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(max_diff(a, c) < 1e-4, "{layers} layers, d{name}");
            }
        }
    }
}
