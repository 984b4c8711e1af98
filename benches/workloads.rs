//! The benchmark workloads shared by `compare.rs` (the side-by-side timing binary) and
//! `encoders.rs` (criterion): every encoder at its real size with random weights (timings
//! depend on shapes only). `compare_pytorch.py` builds the same shapes in PyTorch.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tuwen::checkpoint::random_var_builder;
use tuwen::models::brivl::{
    pad_boxes, prepare_boxes, BrivlConfig, BrivlImageEncoder, BrivlTextEncoder,
};
use tuwen::models::cnclip::{ChineseClip, ChineseClipConfig, DEFAULT_CONTEXT_LENGTH};
use tuwen::models::r2d2::{JointConfig, R2d2, R2d2Config, CROSS_MASK_VALUE};
use tuwen::models::siglip2::{Siglip, SiglipConfig};
use tuwen::nn::linear::linear;
use tuwen::nn::ops::{l2_normalize, softmax_last_dim};
use tuwen::nn::Activation;
use tuwen::nn::{Bert, BertConfig, ClipVisionConfig, ClipVisionTransformer};
use tuwen::train::brivl::{BrivlInputs, BrivlMoco, MocoConfig};
use tuwen::train::r2d2::{fgr_loss, gcpr_loss, HardNegatives, World};
use tuwen::train::siglip::sigmoid_loss;
use tuwen::train::Objective;
use tuwen::train::{AdamW, AdamWConfig, ParamGroupConfig, StepCtx};

/// One forward pass of a workload.
pub type Run = Box<dyn FnMut() -> candle_core::Result<()>>;

/// Every workload, in the order of the results table.
pub const WORKLOADS: &[&str] = &[
    "siglip2-b16-image",
    "siglip2-b16-text",
    "siglip2-b16-naflex-image",
    "r2d2-vitl14-image",
    "r2d2-bert-text",
    "r2d2-itm-rerank",
    "brivl-image",
    "brivl-text",
    "cnclip-b16-image",
    "cnclip-b16-text",
    "siglip-train-small",
    "r2d2-train-small",
    "brivl-train-small",
];

/// Text length of the R2D2 and SigLIP 2 text workloads.
pub const TEXT_LEN: usize = 64;
/// R2D2 ITM re-ranking: one image against this many candidate texts per query.
pub const RERANK_CANDIDATES: usize = 128;

/// Builds a workload for `batch` inputs (for `r2d2-itm-rerank`, `batch` queries of
/// [`RERANK_CANDIDATES`] pairs each) on the CPU in `f32`.
#[allow(dead_code)]
pub fn workload(name: &str, batch: usize) -> Result<Run, String> {
    workload_on(name, batch, &Device::Cpu, DType::F32)
}

/// [`workload`] on any device and in any float dtype (weights and inputs in `dtype`). Each
/// run ends with a device synchronisation, so that GPU timings cover the whole pass.
pub fn workload_on(name: &str, batch: usize, dev: &Device, dtype: DType) -> Result<Run, String> {
    let mut run = build(name, batch, dev, dtype)?;
    let dev = dev.clone();
    Ok(Box::new(move || {
        run()?;
        dev.synchronize()
    }))
}

fn build(name: &str, batch: usize, dev: &Device, dtype: DType) -> Result<Run, String> {
    let dev = dev.clone();
    let e = |e: candle_core::Error| e.to_string();
    let vb = random_var_builder(7, dtype, &dev);
    // Random float inputs in the workload's dtype.
    let randn = |shape: &[usize]| -> Result<Tensor, String> {
        Tensor::randn(0f32, 1.0, shape, &dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(e)
    };
    let siglip = |preset: &str| -> Result<Siglip, String> {
        let cfg = SiglipConfig::preset(preset).ok_or("preset")?;
        Siglip::new(&cfg, vb.clone()).map_err(e)
    };
    Ok(match name {
        "siglip2-b16-image" => {
            let m = siglip("siglip2-base-patch16-224")?;
            let px = randn(&[batch, 3, 224, 224])?;
            Box::new(move || m.get_image_features(&px).map(|_| ()))
        }
        "siglip2-b16-text" => {
            let m = siglip("siglip2-base-patch16-224")?;
            let ids = Tensor::ones((batch, TEXT_LEN), DType::U32, &dev).map_err(e)?;
            Box::new(move || m.get_text_features(&ids, None).map(|_| ()))
        }
        "siglip2-b16-naflex-image" => {
            let m = siglip("siglip2-base-patch16-naflex")?;
            let batch_ = tuwen::preprocess::NaFlexBatch {
                pixel_values: randn(&[batch, 256, 768])?,
                pixel_attention_mask: Tensor::ones((batch, 256), DType::U32, &dev).map_err(e)?,
                spatial_shapes: vec![(16, 16); batch],
            };
            Box::new(move || m.get_image_features_naflex(&batch_).map(|_| ()))
        }
        "r2d2-vitl14-image" => {
            // R2D2's image side: CLIP ViT-L/14 at 224 px, `vision_proj`, L2 norm.
            let vit = ClipVisionTransformer::new(
                &ClipVisionConfig::vit_l14_224(),
                vb.pp("visual_encoder"),
            )
            .map_err(e)?;
            let proj = linear(1024, 768, vb.pp("vision_proj")).map_err(e)?;
            let px = randn(&[batch, 3, 224, 224])?;
            Box::new(move || {
                let t = vit.forward(&px)?;
                l2_normalize(&proj.forward(&t.i((.., 0))?)?).map(|_| ())
            })
        }
        "r2d2-bert-text" => {
            // R2D2's text side: chinese-roberta-wwm-ext with the padding mask, `text_proj`.
            let bert = Bert::new(
                &BertConfig::chinese_roberta_wwm_ext(),
                vb.pp("text_encoder"),
            )
            .map_err(e)?;
            let proj = linear(768, 768, vb.pp("text_proj")).map_err(e)?;
            let ids = Tensor::ones((batch, TEXT_LEN), DType::U32, &dev).map_err(e)?;
            let mask = Tensor::ones((batch, TEXT_LEN), DType::U32, &dev).map_err(e)?;
            Box::new(move || {
                let h = bert.forward(&ids, None, Some(&mask))?;
                l2_normalize(&proj.forward(&h.i((.., 0))?)?).map(|_| ())
            })
        }
        "r2d2-itm-rerank" => {
            // The cross encoders and ITM heads of R2D2 ViT-L/14 (`R2d2::itm_scores_paired`)
            // on precomputed features: one image's 257 tokens against 128 texts.
            let j = JointConfig::default();
            let (vw, tw) = (1024, 768);
            let tj = Bert::new_without_embeddings(&j.bert(tw, vw), vb.pp("text_joint_layer"))
                .map_err(e)?;
            let ij = Bert::new_without_embeddings(&j.bert(tw, tw), vb.pp("img_joint_layer"))
                .map_err(e)?;
            let ij_proj = linear(vw, tw, vb.pp("img_joint_proj")).map_err(e)?;
            let head = linear(tw, 2, vb.pp("itm_head")).map_err(e)?;
            let head_i = linear(tw, 2, vb.pp("itm_head_i")).map_err(e)?;
            let n = batch * RERANK_CANDIDATES;
            let img = randn(&[batch, 1, 257, vw])?;
            let txt = randn(&[n, TEXT_LEN, tw])?;
            let mask = Tensor::ones((n, TEXT_LEN), DType::U32, &dev).map_err(e)?;
            Box::new(move || {
                // Per query, the image as a stride-0 broadcast over its candidates (as
                // `R2d2Encoder::itm_scores_from_tensors` passes it): the image projections
                // are computed once per query.
                for qi in 0..batch {
                    let img = img.i(qi)?.broadcast_as((RERANK_CANDIDATES, 257, vw))?;
                    let txt = txt.narrow(0, qi * RERANK_CANDIDATES, RERANK_CANDIDATES)?;
                    let mask = mask.narrow(0, qi * RERANK_CANDIDATES, RERANK_CANDIDATES)?;
                    // Only the [CLS] states are read, as in `R2d2::itm_logits`.
                    let ctx = Some((&img, None, CROSS_MASK_VALUE));
                    let t = tj.forward_embeds_cls(&txt, Some(&mask), ctx)?;
                    let q = ij_proj.forward(&img)?;
                    let ctx = Some((&txt, Some(&mask), CROSS_MASK_VALUE));
                    let i = ij.forward_embeds_cls(&q, None, ctx)?;
                    let pt = softmax_last_dim(&head.forward(&t.i((.., 0))?)?)?.i((.., 1))?;
                    let pi = softmax_last_dim(&head_i.forward(&i.i((.., 0))?)?)?.i((.., 1))?;
                    ((pt + pi)? * 0.5)?;
                }
                Ok(())
            })
        }
        "cnclip-b16-image" | "cnclip-b16-text" => {
            // Chinese-CLIP ViT-B/16: the image side (224 px, post_layernorm, projection, L2)
            // or the text side (RoBERTa-wwm-ext base, 52 tokens with the padding mask).
            let cfg = ChineseClipConfig::preset("chinese-clip-vit-base-patch16").ok_or("preset")?;
            let m = ChineseClip::new(&cfg, vb.clone()).map_err(e)?;
            if name.ends_with("image") {
                let px = randn(&[batch, 3, 224, 224])?;
                Box::new(move || l2_normalize(&m.image_features(&px)?).map(|_| ()))
            } else {
                let ids =
                    Tensor::ones((batch, DEFAULT_CONTEXT_LENGTH), DType::U32, &dev).map_err(e)?;
                let mask =
                    Tensor::ones((batch, DEFAULT_CONTEXT_LENGTH), DType::U32, &dev).map_err(e)?;
                Box::new(move || l2_normalize(&m.text_features(&ids, &mask)?).map(|_| ()))
            }
        }
        "brivl-image" => {
            // BriVL 1.0's image tower at 380 px: EfficientNet-b5 features, 37 boxes (a 6x6
            // grid plus the whole image), RoI grid pooling, 4 post-LN layers, imgFC.
            let cfg = BrivlConfig::preset("brivl-1.0").ok_or("preset")?;
            let m = BrivlImageEncoder::new(&cfg, vb.pp("imgencoder")).map_err(e)?;
            let (boxes, mask) = grid_boxes(&cfg, batch, &dev)?;
            let (boxes, mask) = (
                boxes.to_dtype(dtype).map_err(e)?,
                mask.to_dtype(dtype).map_err(e)?,
            );
            let px = randn(&[batch, 3, cfg.img_size, cfg.img_size])?;
            Box::new(move || l2_normalize(&m.forward(&px, &boxes, &mask)?).map(|_| ()))
        }
        "brivl-text" => {
            // BriVL 1.0's text tower: chinese-roberta-wwm-ext on 80 tokens, 4 post-LN layers,
            // textFC.
            let cfg = BrivlConfig::preset("brivl-1.0").ok_or("preset")?;
            let m = BrivlTextEncoder::new(&cfg, vb.pp("textencoder")).map_err(e)?;
            let ids = Tensor::ones((batch, cfg.max_text_len), DType::U32, &dev).map_err(e)?;
            let mask = Tensor::ones((batch, cfg.max_text_len), dtype, &dev).map_err(e)?;
            Box::new(move || l2_normalize(&m.forward(&ids, &mask)?).map(|_| ()))
        }
        "siglip-train-small" => train_siglip_small(batch)?,
        "r2d2-train-small" => train_r2d2_small(batch)?,
        "brivl-train-small" => train_brivl_small(batch)?,
        other => return Err(format!("unknown workload {other}")),
    })
}

/// BriVL's boxes for images without detector boxes, as `BrivlMoco::inputs` and the
/// encoders prepare them: the `BOX_GRID`² cells plus the whole image, for `batch` images,
/// with their mask.
fn grid_boxes(cfg: &BrivlConfig, batch: usize, dev: &Device) -> Result<(Tensor, Tensor), String> {
    let s = cfg.img_size as u32;
    let row = prepare_boxes(
        None,
        s,
        s,
        cfg.img_size,
        cfg.max_img_len,
        cfg.box_grid,
        "bench",
    )
    .map_err(|e| e.to_string())?;
    pad_boxes(&vec![row; batch], cfg.max_img_len, dev).map_err(|e| e.to_string())
}

/// Peak resident set size of this process in MiB (`VmHWM`), if the OS reports it.
#[allow(dead_code)]
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Training steps: small configs of each objective, every parameter a trainable var with
/// random values, one step = forward, backward and a tuwen AdamW update (defaults: lr 1e-3,
/// weight decay 0.01). `compare_pytorch.py` builds the same shapes in PyTorch.
fn trainable(vars: &VarMap) -> Result<(), String> {
    let data = vars.data().lock().map_err(|_| "var map lock")?;
    for (name, v) in data.iter() {
        let t = if name.ends_with("temp") {
            Tensor::full(0.07f32, v.shape(), v.device())
        } else {
            Tensor::randn(0f32, 0.02, v.shape(), v.device())
        }
        .map_err(|e| e.to_string())?;
        v.set(&t).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn adamw(vars: &VarMap) -> Result<AdamW, String> {
    AdamW::from_varmap(vars, AdamWConfig::default(), &ParamGroupConfig::default())
        .map_err(|e| e.to_string())
}

fn step(opt: &mut AdamW, loss: &Tensor) -> candle_core::Result<()> {
    let grads = opt.collect_grads(&loss.backward()?);
    opt.step(&grads)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Text length and image size of the small training configs.
pub const TRAIN_TEXT_LEN: usize = 32;
pub const TRAIN_IMAGE: usize = 224;

/// SigLIP sigmoid loss: B/16-style towers at width 256, 4 layers, 4 heads, MLP 1024,
/// 224 px, 32000-token vocabulary, 32 tokens (HF `SiglipModel(return_loss=True)`).
fn train_siglip_small(batch: usize) -> Result<Run, String> {
    let dev = Device::Cpu;
    let e = |e: candle_core::Error| e.to_string();
    let cfg: SiglipConfig = serde_json::from_value(serde_json::json!({
        "text_config": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 4, "num_attention_heads": 4,
            "max_position_embeddings": TRAIN_TEXT_LEN},
        "vision_config": {"hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": TRAIN_IMAGE,
            "patch_size": 16},
    }))
    .map_err(|e| e.to_string())?;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let m = Siglip::new(&cfg, vb).map_err(e)?;
    trainable(&vars)?;
    let mut opt = adamw(&vars)?;
    let px = Tensor::randn(0f32, 1.0, (batch, 3, TRAIN_IMAGE, TRAIN_IMAGE), &dev).map_err(e)?;
    let ids = Tensor::arange(0u32, (batch * TRAIN_TEXT_LEN) as u32, &dev)
        .and_then(|t| t.reshape((batch, TRAIN_TEXT_LEN)))
        .map_err(e)?;
    Ok(Box::new(move || {
        let img = l2_normalize(&m.get_image_features(&px)?)?;
        let txt = l2_normalize(&m.get_text_features(&ids, None)?)?;
        let (scale, bias) = m.logit_params();
        let loss = sigmoid_loss(&txt, &img, scale, bias, 0)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        step(&mut opt, &loss)
    }))
}

/// R2D2 pre-training (GCPR + FGR with fixed hard negatives, class weights [1, 2]): ViT
/// width 256, 4 layers, 4 heads, patch 14 at 224 px; BERT width 256, 4 layers, 4 heads,
/// 32 tokens; 2 joint layers per cross encoder; embeddings 128.
fn train_r2d2_small(batch: usize) -> Result<Run, String> {
    let dev = Device::Cpu;
    let e = |e: candle_core::Error| e.to_string();
    let vision = ClipVisionConfig {
        hidden_size: 256,
        intermediate_size: 1024,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_channels: 3,
        image_size: TRAIN_IMAGE,
        patch_size: 14,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    let text = BertConfig {
        hidden_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 1024,
        ..BertConfig::chinese_roberta_wwm_ext()
    };
    let cfg = R2d2Config {
        model_type: "r2d2".into(),
        vision_config: vision,
        text_config: text,
        joint_config: Some(JointConfig {
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 1024,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
        }),
        embed_dim: 128,
        max_text_len: TRAIN_TEXT_LEN,
    };
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let m = R2d2::new(&cfg, vb).map_err(e)?;
    trainable(&vars)?;
    let mut opt = adamw(&vars)?;
    let px = Tensor::randn(0f32, 1.0, (batch, 3, TRAIN_IMAGE, TRAIN_IMAGE), &dev).map_err(e)?;
    let ids = Tensor::arange(100u32, 100 + (batch * TRAIN_TEXT_LEN) as u32, &dev)
        .and_then(|t| t.reshape((batch, TRAIN_TEXT_LEN)))
        .map_err(e)?;
    let mask = Tensor::ones((batch, TRAIN_TEXT_LEN), DType::U32, &dev).map_err(e)?;
    let image_ids: Vec<i64> = (0..batch as i64).collect();
    // For text i the image i+1, for image i the text i+1 (never a positive when batch > 1).
    let negs = HardNegatives {
        image_for_text: (0..batch).map(|i| (i + 1) % batch).collect(),
        text_for_image: (0..batch).map(|i| (i + 1) % batch).collect(),
    };
    let te = |e: tuwen::Error| candle_core::Error::Msg(e.to_string());
    Ok(Box::new(move || {
        let (tokens, img) = m.encode_image(&px)?;
        let (states, txt) = m.encode_text(&ids, &mask)?;
        let world = World::local(&img, &txt, &image_ids)
            .map_err(te)?
            .with_local_fgr(&tokens, &states, &mask);
        let l1 = gcpr_loss(&img, &txt, &image_ids, &world, &m.temp).map_err(te)?;
        let l2 = fgr_loss(&m, &tokens, &states, &mask, &world, &negs, [1.0, 2.0]).map_err(te)?;
        step(&mut opt, &(l1 + l2)?)
    }))
}

/// Queue length of the BriVL MoCo workload (a multiple of both timed batches, 1 and 8).
pub const TRAIN_QUEUE: usize = 4096;

/// BriVL MoCo (`BrivlMoco`, as a custom loop without `Trainer` would drive it): timm
/// `tf_efficientnet_b0` at 224 px (1280 features, the embedding width), 37 boxes (a 6x6
/// grid plus the whole image) with the 4x4 RoI grid; BERT width 256, 4 layers, 4 heads,
/// MLP 1024, 32 tokens; BriVL's heads (4 + 4 post-LN layers, 4 heads, feed-forward 2048);
/// queues of 4096 keys. Fresh weights (`from_scratch`), the original's trainable set
/// (`default_trainable`: EfficientNet blocks 3-6, the last four BERT layers, every head),
/// BatchNorm on its running statistics. One step: momentum update of the key encoders, keys
/// without and queries with gradient, the MoCo loss, backward, AdamW, enqueue.
fn train_brivl_small(batch: usize) -> Result<Run, String> {
    let dev = Device::Cpu;
    let e = |e: candle_core::Error| e.to_string();
    let te = |e: tuwen::Error| e.to_string();
    let cfg = BrivlConfig {
        cnn: "tf_efficientnet_b0".into(),
        img_size: TRAIN_IMAGE,
        // The b0 `conv_head` width (`BrivlConfig::validate` checks it).
        img_feature_dim: 1280,
        text_feature_dim: 256,
        max_text_len: TRAIN_TEXT_LEN,
        queue_size: TRAIN_QUEUE,
        text_encoder: Some(BertConfig {
            hidden_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 1024,
            ..BertConfig::chinese_roberta_wwm_ext()
        }),
        ..BrivlConfig::preset("brivl-1.0").ok_or("preset")?
    };
    let moco_cfg = MocoConfig::for_model(&cfg).map_err(te)?;
    let moco = BrivlMoco::from_scratch(&cfg, moco_cfg, 7, &dev, DType::F32).map_err(te)?;
    let mut opt = AdamW::from_varmap(moco.vars(), AdamWConfig::default(), &moco.param_groups())
        .map_err(te)?;
    let (boxes, box_mask) = grid_boxes(&cfg, batch, &dev)?;
    let px = Tensor::randn(0f32, 1.0, (batch, 3, TRAIN_IMAGE, TRAIN_IMAGE), &dev).map_err(e)?;
    let ids = Tensor::arange(100u32, 100 + (batch * TRAIN_TEXT_LEN) as u32, &dev)
        .and_then(|t| t.reshape((batch, TRAIN_TEXT_LEN)))
        .map_err(e)?;
    let text_mask = Tensor::ones((batch, TRAIN_TEXT_LEN), DType::F32, &dev).map_err(e)?;
    let x = BrivlInputs::new(&px, &boxes, &box_mask, &ids, &text_mask).map_err(te)?;
    let tc = |e: tuwen::Error| candle_core::Error::Msg(e.to_string());
    let mut n = 0u64;
    Ok(Box::new(move || {
        let ctx = StepCtx::single(n, 0);
        n += 1;
        // Momentum update, queries, keys and the loss against the queues.
        let out = moco.loss(&x, &ctx).map_err(tc)?;
        step(&mut opt, &out.loss)?;
        // Enqueue the step's keys.
        moco.commit().map_err(tc)
    }))
}
