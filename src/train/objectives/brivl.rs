//! BriVL continued pre-training: cross-modal MoCo with momentum encoders and two negative
//! queues, as in the released model code (BAAI-WuDao/BriVL, `VL_model.forward`).
//!
//! Per optimiser step:
//! 1. the momentum (key) encoders move towards the query encoders,
//!    `k ← m·k + (1 − m)·q` with `m = MOMENTUM` (0.99), **before** the keys are computed;
//! 2. queries `q_img`, `q_txt` come from the query encoders (with gradient), keys `k_img`,
//!    `k_txt` from the key encoders (without); all four are L2-normalised;
//! 3. image→text logits are `[q_img·k_txt, q_img·text_queue] / T` and text→image logits
//!    `[q_txt·k_img, q_txt·img_queue] / T` (`T = TEMPERATURE`, 0.07), the positive at
//!    index 0; the loss is `−Σ log_softmax` over the positive entries divided by the batch,
//!    for both directions, summed;
//! 4. after the step the keys are enqueued at the queue pointers (each queue is
//!    `[dim, K]`, `K = QUEUE_SIZE`, which must be a multiple of the global batch).
//!
//! The **multi-positive** variant ([`MocoConfig::multi_positive`]) also counts as
//! positives the queue entries that are among the `TOPK` most similar to the key in *both*
//! queues (text key vs text queue and image key vs image queue), as the original's
//! `multi_label` branch does.
//!
//! **What trains.** [`default_trainable`] is the original's rule: EfficientNet
//! `blocks.3`–`blocks.6`, the last four BERT layers (8–11 for base, 20–23 for large) and
//! every head (`learnable.*`). Frozen tensors are constants for autograd (see
//! [`Loader::trainable_matching`]), so backward passes never run through the frozen
//! bottom of either tower. The key encoders share the query's frozen tensors unless the
//! checkpoint brings its own `imgencoder_mom.*` / `textencoder_mom.*`, in which case those
//! are loaded and every key parameter follows the momentum rule, exactly as the original.
//!
//! **Modes.** BatchNorm uses its running statistics and no dropout is applied (inference
//! mode) in both encoders. The original trained in PyTorch's training mode, where BN uses
//! per-batch statistics; that is why it shuffled batches across GPUs for the key encoder,
//! which is not needed here.
//!
//! The queues, pointers and key-encoder weights are checkpointed through
//! [`BrivlMoco::moco_state`] (an [`ExtraState`]); [`BrivlMoco::export`] writes a checkpoint (query and `_mom` encoders,
//! `config.json`) that the inference API loads.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{scalar, LossTerms, Objective};
use crate::checkpoint::{self, is_buffer, LoadReport, Loader, TensorSource};
use crate::error::{Error, Result};
use crate::models::brivl::{pad_boxes, prepare_boxes, Brivl, BrivlConfig, IGNORED_KEYS};
use crate::nn::ops;
use crate::preprocess::{ImageProcessor, TextProcessor, TextStyle};
use crate::train::data::{Batch, ImagePipeline};
use crate::train::dist::Collective;
use crate::train::fit::ExtraState;
use crate::train::optim::ParamGroupConfig;
use crate::train::pattern::Patterns;
use crate::train::rng::{derive_rng, standard_normal};
use crate::train::trainer::{lock_vars, StepCtx, Trainer};
use crate::train::AugmentConfig;

/// Key prefixes of the momentum encoders in a BriVL checkpoint.
const MOM: [(&str, &str); 2] = [
    ("imgencoder.", "imgencoder_mom."),
    ("textencoder.", "textencoder_mom."),
];

/// The MoCo objective's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MocoConfig {
    /// Queue length `K`; a multiple of the global batch (batch × accumulation × workers).
    pub queue_size: usize,
    /// Momentum `m` of the key encoders.
    pub momentum: f64,
    /// Softmax temperature `T`.
    pub temperature: f64,
    /// Count top-k queue neighbours shared by both modalities as extra positives.
    #[serde(default)]
    pub multi_positive: bool,
    /// `k` of the multi-positive variant.
    #[serde(default = "one")]
    pub topk: usize,
    /// Name patterns of the trained tensors (see [`default_trainable`]).
    pub trainable: Vec<String>,
    /// Seed of the initial random queues.
    #[serde(default)]
    pub seed: u64,
    /// The backbone's BatchNorm statistics while training.
    #[serde(default)]
    pub batch_norm: BatchNormMode,
}

/// Which statistics the image backbone's BatchNorm uses while training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchNormMode {
    /// The checkpoint's running statistics, as constants (frozen BN, inference mode): the
    /// usual choice for continued pre-training from published weights with small batches,
    /// and the mode in which data-parallel workers take exactly one worker's step.
    #[default]
    Running,
    /// Each batch's statistics, with the running ones updated by momentum (PyTorch's train
    /// mode), in the query and the key encoder; evaluation switches back to the running
    /// statistics. Needed to train from random initialisation. The statistics are per
    /// worker (no synchronised BN).
    Batch,
}

fn one() -> usize {
    1
}

impl MocoConfig {
    /// The original's settings for a model: `QUEUE_SIZE`, `MOMENTUM`, `TEMPERATURE`,
    /// `TOPK` from its config, single positive, [`default_trainable`].
    pub fn for_model(cfg: &BrivlConfig) -> Result<Self> {
        Ok(Self {
            queue_size: cfg.queue_size,
            momentum: cfg.momentum,
            temperature: cfg.temperature,
            multi_positive: false,
            topk: cfg.topk.max(1),
            trainable: default_trainable(cfg)?,
            seed: 0,
            batch_norm: BatchNormMode::Running,
        })
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if self.queue_size == 0 {
            return Err(Error::Config("MoCo queue_size must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::Config(format!(
                "MoCo momentum {} must lie in [0, 1]",
                self.momentum
            )));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::Config(format!(
                "MoCo temperature {} must be positive",
                self.temperature
            )));
        }
        if self.multi_positive && (self.topk == 0 || self.topk > self.queue_size) {
            return Err(Error::Config(format!(
                "MoCo topk {} must lie in 1..={}",
                self.topk, self.queue_size
            )));
        }
        if self.trainable.is_empty() {
            return Err(Error::Config(
                "MoCo trainable patterns are empty: nothing would train".into(),
            ));
        }
        Ok(())
    }
}

/// The original's trainable set: EfficientNet `blocks.3`–`blocks.6`, the last four BERT
/// layers (8–11 of BERT-base, 20–23 of BERT-large) and both towers' heads.
pub fn default_trainable(cfg: &BrivlConfig) -> Result<Vec<String>> {
    let layers = cfg.bert_config()?.num_hidden_layers;
    let mut out = vec![
        "imgencoder.backbone.blocks.{3..6}.*".to_string(),
        "imgencoder.learnable.*".to_string(),
        "textencoder.learnable.*".to_string(),
    ];
    if layers > 0 {
        out.push(format!(
            "textencoder.backbone.bert.encoder.layer.{{{}..{}}}.*",
            layers.saturating_sub(4),
            layers - 1
        ));
    }
    Ok(out)
}

/// Every tensor trains (training from scratch).
pub fn all_trainable() -> Vec<String> {
    vec!["imgencoder.*".into(), "textencoder.*".into()]
}

/// The two negative queues, `[dim, K]` each (the original's `img_queue` / `text_queue`
/// buffers), and their write pointers.
#[derive(Debug, Clone)]
pub struct MocoQueues {
    pub image: Tensor,
    pub text: Tensor,
    pub image_ptr: usize,
    pub text_ptr: usize,
}

impl MocoQueues {
    /// Random unit columns, as the original initialises them (`randn` normalised over the
    /// feature dimension), from a seeded generator.
    pub fn random(dim: usize, k: usize, seed: u64, device: &Device) -> Result<Self> {
        let make = |stream: u64| -> Result<Tensor> {
            let mut rng = derive_rng(seed, &[0x4d4f_434f, stream]);
            let data: Vec<f32> = (0..dim * k).map(|_| standard_normal(&mut rng)).collect();
            let t = Tensor::from_vec(data, (dim, k), device)?;
            let norm = t.sqr()?.sum_keepdim(0)?.sqrt()?;
            Ok(t.broadcast_div(&norm)?)
        };
        Ok(Self {
            image: make(0)?,
            text: make(1)?,
            image_ptr: 0,
            text_ptr: 0,
        })
    }

    /// Queue length `K`.
    pub fn len(&self) -> usize {
        self.image.dims().get(1).copied().unwrap_or(0)
    }

    /// Whether the queues have no column.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the columns at the pointers by `image_keys` / `text_keys` `[n, dim]` and
    /// advances the pointers, as the original's `_dequeue_and_enqueue`.
    pub fn enqueue(&mut self, image_keys: &Tensor, text_keys: &Tensor) -> Result<()> {
        let (image, ip) = enqueue_one(&self.image, self.image_ptr, image_keys, "image")?;
        let (text, tp) = enqueue_one(&self.text, self.text_ptr, text_keys, "text")?;
        (self.image, self.image_ptr, self.text, self.text_ptr) = (image, ip, text, tp);
        Ok(())
    }

    /// The queues as the original's buffer names: `img_queue`, `text_queue` (f32
    /// `[dim, K]`) and `img_queue_ptr`, `text_queue_ptr` (i64 `[1]`).
    pub fn to_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let ptr = |p: usize| Tensor::new(&[p as i64], &Device::Cpu);
        Ok(BTreeMap::from([
            ("img_queue".to_string(), self.image.copy()?),
            ("text_queue".to_string(), self.text.copy()?),
            ("img_queue_ptr".to_string(), ptr(self.image_ptr)?),
            ("text_queue_ptr".to_string(), ptr(self.text_ptr)?),
        ]))
    }

    /// Restores [`MocoQueues::to_tensors`]; the queues must be `[dim, k]`.
    pub fn from_tensors(
        t: &BTreeMap<String, Tensor>,
        dim: usize,
        k: usize,
        device: &Device,
        origin: &str,
    ) -> Result<Self> {
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let x = t.get(name).ok_or_else(|| Error::MissingTensor {
                source_name: origin.to_string(),
                key: name.to_string(),
                expected: shape.to_vec(),
            })?;
            if x.dims() != shape {
                return Err(Error::ShapeMismatch {
                    source_name: origin.to_string(),
                    key: name.to_string(),
                    expected: shape.to_vec(),
                    found: x.dims().to_vec(),
                });
            }
            Ok(x.clone())
        };
        let ptr = |name: &str| -> Result<usize> {
            let v = get(name, &[1])?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0];
            if v < 0 || v as usize >= k {
                return Err(Error::Checkpoint {
                    path: origin.into(),
                    reason: format!("{name} = {v} lies outside the queue of {k}"),
                });
            }
            Ok(v as usize)
        };
        Ok(Self {
            image: get("img_queue", &[dim, k])?
                .to_dtype(DType::F32)?
                .to_device(device)?,
            text: get("text_queue", &[dim, k])?
                .to_dtype(DType::F32)?
                .to_device(device)?,
            image_ptr: ptr("img_queue_ptr")?,
            text_ptr: ptr("text_queue_ptr")?,
        })
    }
}

fn enqueue_one(queue: &Tensor, ptr: usize, keys: &Tensor, what: &str) -> Result<(Tensor, usize)> {
    let (dim, k) = queue.dims2()?;
    let (n, d) = keys.dims2()?;
    if d != dim {
        return Err(Error::InvalidArgument(format!(
            "{what} keys have {d} features, the queue {dim}"
        )));
    }
    if n == 0 || !k.is_multiple_of(n) {
        return Err(Error::Config(format!(
            "the MoCo queue size {k} must be a multiple of the global batch (keys per step), \
             which is {n}; choose QUEUE_SIZE accordingly"
        )));
    }
    let cols = keys.to_dtype(DType::F32)?.t()?.contiguous()?;
    let q = queue.slice_assign(&[0..dim, ptr..ptr + n], &cols)?;
    Ok((q, (ptr + n) % k))
}

/// The MoCo loss and its two parts.
#[derive(Debug, Clone)]
pub struct MocoLoss {
    /// `i2t + t2i`.
    pub loss: Tensor,
    pub i2t: Tensor,
    pub t2i: Tensor,
}

/// The cross-modal MoCo loss of normalised queries and keys `[b, dim]` against the
/// queues; `extra_positives` `[b, K]` (0/1) marks queue entries that count as positives.
pub fn moco_loss(
    q_img: &Tensor,
    q_txt: &Tensor,
    k_img: &Tensor,
    k_txt: &Tensor,
    queues: &MocoQueues,
    temperature: f64,
    extra_positives: Option<&Tensor>,
) -> Result<MocoLoss> {
    let b = q_img.dims2()?.0;
    let dev = q_img.device();
    let k = queues.len();
    let positives = match extra_positives {
        Some(m) => Tensor::cat(
            &[
                Tensor::ones((b, 1), DType::F32, dev)?,
                m.to_dtype(DType::F32)?.to_device(dev)?,
            ],
            1,
        )?,
        None => Tensor::cat(
            &[
                Tensor::ones((b, 1), DType::F32, dev)?,
                Tensor::zeros((b, k), DType::F32, dev)?,
            ],
            1,
        )?,
    };
    let direction = |q: &Tensor, key: &Tensor, queue: &Tensor| -> Result<Tensor> {
        let q = q.to_dtype(DType::F32)?;
        let pos = (&q * key.to_dtype(DType::F32)?)?.sum_keepdim(1)?;
        let neg = q.matmul(&queue.to_device(dev)?)?;
        let logits = (Tensor::cat(&[pos, neg], 1)? / temperature)?;
        let logp = ops::log_softmax_last_dim(&logits)?;
        Ok(((logp * &positives)?.sum_all()?.neg()? / b as f64)?)
    };
    let i2t = direction(q_img, k_txt, &queues.text)?;
    let t2i = direction(q_txt, k_img, &queues.image)?;
    Ok(MocoLoss {
        loss: (&t2i + &i2t)?,
        i2t,
        t2i,
    })
}

/// The multi-positive mask `[b, K]`: queue entries among the `topk` most similar to the
/// text key in the text queue **and** to the image key in the image queue.
pub fn topk_positives(
    k_img: &Tensor,
    k_txt: &Tensor,
    queues: &MocoQueues,
    topk: usize,
) -> Result<Tensor> {
    let dev = k_img.device().clone();
    let top = |key: &Tensor, queue: &Tensor| -> Result<Vec<Vec<usize>>> {
        let sims = key
            .to_dtype(DType::F32)?
            .matmul(&queue.to_device(&dev)?)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        Ok(sims
            .iter()
            .map(|row| {
                let mut idx: Vec<usize> = (0..row.len()).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                idx.truncate(topk);
                idx
            })
            .collect())
    };
    let t = top(k_txt, &queues.text)?;
    let i = top(k_img, &queues.image)?;
    let k = queues.len();
    let mut mask = vec![0f32; t.len() * k];
    for (r, (ti, ii)) in t.iter().zip(&i).enumerate() {
        for j in ti.iter().filter(|j| ii.contains(j)) {
            mask[r * k + j] = 1.0;
        }
    }
    Ok(Tensor::from_vec(mask, (t.len(), k), &dev)?)
}

/// One training step's model inputs.
#[derive(Debug, Clone)]
pub struct BrivlInputs {
    /// `[b, 3, s, s]`.
    pub pixel_values: Tensor,
    /// `[b, MAX_IMG_LEN, 4]` in model pixels, the whole-image box included.
    pub boxes: Tensor,
    /// `[b, MAX_IMG_LEN]` 0/1.
    pub box_mask: Tensor,
    /// `[b, MAX_TEXT_LEN]` token ids.
    pub input_ids: Tensor,
    /// `[b, MAX_TEXT_LEN]` 0/1 for real tokens.
    pub text_mask: Tensor,
}

impl crate::train::trainer::BatchInfo for BrivlInputs {
    fn num_samples(&self) -> usize {
        self.pixel_values.dims().first().copied().unwrap_or(0)
    }
}

impl BrivlInputs {
    /// Inputs from tensors as the fixtures and the inference API hold them: boxes and
    /// masks of any numeric dtype, integer token ids.
    pub fn new(
        pixel_values: &Tensor,
        boxes: &Tensor,
        box_mask: &Tensor,
        input_ids: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Self> {
        let b = pixel_values.dims4()?.0;
        for (what, t) in [
            ("boxes", boxes),
            ("box_mask", box_mask),
            ("input_ids", input_ids),
            ("text_mask", text_mask),
        ] {
            if t.dims().first() != Some(&b) {
                return Err(Error::InvalidArgument(format!(
                    "{what} {:?} does not match a batch of {b} images",
                    t.dims()
                )));
            }
        }
        Ok(Self {
            pixel_values: pixel_values.clone(),
            boxes: boxes.to_dtype(DType::F32)?,
            box_mask: box_mask.to_dtype(DType::F32)?,
            input_ids: input_ids.to_dtype(DType::U32)?,
            text_mask: text_mask.to_dtype(DType::F32)?,
        })
    }
}

/// The key encoders and the queues, shared with the post-step hook.
struct MocoState {
    /// Key-encoder tensors under the query's names (`imgencoder.…`); f32.
    params: BTreeMap<String, Tensor>,
    /// Names the momentum update moves (the others are the query's own frozen tensors).
    moving: Vec<String>,
    model: Option<Brivl>,
    /// BatchNorm with batch statistics in the key encoder.
    bn_training: bool,
    queues: MocoQueues,
    /// Keys of the current step, enqueued when the step succeeds.
    pending: Vec<(Tensor, Tensor)>,
    /// Data-parallel group: keys of all ranks are enqueued.
    comm: Option<Arc<dyn Collective>>,
}

/// BriVL with momentum encoders and queues: the MoCo objective.
pub struct BrivlMoco {
    /// The query network, built on [`BrivlMoco::vars`].
    pub model: Brivl,
    vars: VarMap,
    cfg: BrivlConfig,
    moco: MocoConfig,
    trainable: Patterns,
    text: Option<TextProcessor>,
    box_grid: usize,
    device: Device,
    dtype: DType,
    state: Arc<Mutex<MocoState>>,
    report: LoadReport,
}

impl std::fmt::Debug for BrivlMoco {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrivlMoco")
            .field("moco", &self.moco)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish()
    }
}

fn lock(state: &Mutex<MocoState>) -> Result<MutexGuard<'_, MocoState>> {
    state.lock().map_err(|_| Error::LockPoisoned("MoCo state"))
}

fn mom_name(name: &str) -> String {
    for (q, k) in MOM {
        if let Some(rest) = name.strip_prefix(q) {
            return format!("{k}{rest}");
        }
    }
    name.to_string()
}

impl BrivlMoco {
    /// Builds the query encoders (trainable per `moco.trainable`) and the key encoders
    /// from a BriVL checkpoint source: the key encoders load `*_mom` tensors when the
    /// source has them and start as copies of the query encoders otherwise. The queues
    /// start random (seed `moco.seed`).
    pub fn from_source(
        cfg: &BrivlConfig,
        moco: MocoConfig,
        source: TensorSource,
        source_name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        cfg.validate()?;
        moco.validate()?;
        let trainable = Patterns::new(&moco.trainable)?;
        let has_mom = source
            .shapes()
            .keys()
            .any(|k| k.starts_with("imgencoder_mom.") || k.starts_with("textencoder_mom."));
        // Key tensors come from the same file; read them before the loader takes it.
        let mut mom: HashMap<String, Tensor> = HashMap::new();
        if has_mom {
            for name in source.shapes().into_keys() {
                if name.starts_with("imgencoder_mom.") || name.starts_with("textencoder_mom.") {
                    if let Some(t) = source.load(&name)? {
                        mom.insert(name, t);
                    }
                }
            }
        }
        let (loader, vars) =
            Loader::new(source, source_name).trainable_matching(trainable.clone())?;
        let vb = loader.var_builder(dtype, device);
        let model = Brivl::new(cfg, vb).map_err(|e| loader.error(e))?;
        let report = loader.finish(IGNORED_KEYS);
        let named = var_tensors(&vars)?;
        let matched = named.keys().filter(|n| trainable.matches(n)).count();
        if matched == 0 {
            return Err(Error::Config(format!(
                "no BriVL tensor matches the trainable patterns {:?}",
                moco.trainable
            )));
        }
        let mut params = BTreeMap::new();
        let mut moving = Vec::new();
        for (name, q) in &named {
            let tracked = !is_buffer(name) && trainable.matches(name);
            let key = if has_mom {
                let mn = mom_name(name);
                let t = mom.remove(&mn).ok_or_else(|| Error::MissingTensor {
                    source_name: source_name.to_string(),
                    key: mn.clone(),
                    expected: q.dims().to_vec(),
                })?;
                if t.dims() != q.dims() {
                    return Err(Error::ShapeMismatch {
                        source_name: source_name.to_string(),
                        key: mn,
                        expected: q.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                if !is_buffer(name) {
                    moving.push(name.clone());
                }
                t.to_dtype(DType::F32)?.to_device(device)?
            } else if tracked {
                moving.push(name.clone());
                q.to_dtype(DType::F32)?.copy()?
            } else if is_buffer(name) {
                // The key encoder's own statistics (they move in batch-statistics mode).
                q.to_dtype(DType::F32)?.copy()?
            } else {
                // Frozen and identical in both encoders: share it.
                q.clone()
            };
            params.insert(name.clone(), key);
        }
        let text_dim = cfg.img_feature_dim;
        let queues = MocoQueues::random(text_dim, moco.queue_size, moco.seed, device)?;
        let state = MocoState {
            params,
            moving,
            model: None,
            bn_training: moco.batch_norm == BatchNormMode::Batch,
            queues,
            pending: Vec::new(),
            comm: None,
        };
        let this = Self {
            model,
            vars,
            cfg: cfg.clone(),
            box_grid: cfg.box_grid,
            moco,
            trainable,
            text: None,
            device: device.clone(),
            dtype,
            state: Arc::new(Mutex::new(state)),
            report,
        };
        this.model
            .set_batch_norm_training(this.moco.batch_norm == BatchNormMode::Batch);
        this.rebuild_key()?;
        Ok(this)
    }

    /// Opens a BriVL checkpoint file (`.pth` or `.safetensors`) and builds from it.
    pub fn from_checkpoint(
        cfg: &BrivlConfig,
        moco: MocoConfig,
        path: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let source = crate::models::brivl::open_checkpoint(path)?;
        Self::from_source(
            cfg,
            moco,
            source,
            &path.display().to_string(),
            device,
            dtype,
        )
    }

    /// Freshly initialised weights (training from scratch): see [`random_init`].
    pub fn from_scratch(
        cfg: &BrivlConfig,
        moco: MocoConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let source = random_init(cfg, seed)?;
        Self::from_source(cfg, moco, source, "random init", device, dtype)
    }

    /// Uses this tokenizer for [`BrivlMoco::inputs`] (BERT style, `MAX_TEXT_LEN`).
    pub fn with_tokenizer(mut self, tokenizer: &Path) -> Result<Self> {
        self.text = Some(TextProcessor::from_file(
            tokenizer,
            TextStyle::Bert,
            self.cfg.max_text_len,
        )?);
        Ok(self)
    }

    /// Data-parallel training: the keys of every rank are gathered and enqueued (in rank
    /// order) on every rank, so the queues stay identical; `QUEUE_SIZE` must then be a
    /// multiple of batch × accumulation × world size. Give the same group to
    /// [`Trainer::set_collective`].
    pub fn with_collective(self, comm: Arc<dyn Collective>) -> Result<Self> {
        lock(&self.state)?.comm = Some(comm);
        Ok(self)
    }

    /// The `N × N` box grid for images without boxes (default: the config's `BOX_GRID`).
    pub fn with_box_grid(mut self, grid: usize) -> Self {
        self.box_grid = grid;
        self
    }

    pub fn config(&self) -> &BrivlConfig {
        &self.cfg
    }

    pub fn moco_config(&self) -> &MocoConfig {
        &self.moco
    }

    /// Every query tensor (trained or not) as a var; give it to [`Trainer::from_varmap`]
    /// with [`Objective::param_groups`].
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    /// Keys the checkpoint had that the model did not read.
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    /// Whether a query tensor trains.
    pub fn is_trainable(&self, name: &str) -> bool {
        !is_buffer(name) && self.trainable.matches(name)
    }

    /// The training image pipeline of the original: square resize without antialias
    /// (torchvision 0.9.1), ImageNet normalisation, and colour jitter + grayscale.
    pub fn image_pipeline(&self, augment: Option<AugmentConfig>) -> ImagePipeline {
        ImagePipeline {
            augment,
            ..ImagePipeline::from_processor(ImageProcessor::brivl(self.cfg.img_size))
        }
    }

    /// Tokenises the captions and prepares the boxes of a loader batch.
    pub fn inputs(&self, batch: &Batch) -> Result<BrivlInputs> {
        let text = self.text.as_ref().ok_or_else(|| Error::Tokenizer {
            origin: "BrivlMoco".into(),
            reason: "no tokenizer: call with_tokenizer first".into(),
        })?;
        if batch.is_empty() {
            return Err(Error::InvalidArgument("empty batch".into()));
        }
        let cfg = &self.cfg;
        let mut rows = Vec::with_capacity(batch.len());
        for (i, (b, &(w, h))) in batch.boxes.iter().zip(&batch.image_sizes).enumerate() {
            let origin = format!("sample {}", batch.indices.get(i).copied().unwrap_or(i));
            rows.push(prepare_boxes(
                b.as_deref(),
                w,
                h,
                cfg.img_size,
                cfg.max_img_len,
                self.box_grid,
                &origin,
            )?);
        }
        let (boxes, box_mask) = pad_boxes(&rows, cfg.max_img_len, &self.device)?;
        let texts: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
        let tok = text.encode_batch(&texts, &self.device)?;
        Ok(BrivlInputs {
            pixel_values: batch.images.to_device(&self.device)?.to_dtype(self.dtype)?,
            boxes,
            box_mask,
            input_ids: tok.input_ids,
            text_mask: tok.attention_mask.to_dtype(DType::F32)?,
        })
    }

    fn rebuild_key(&self) -> Result<()> {
        rebuild_key(&self.state, &self.cfg, self.dtype, &self.device)
    }

    /// The momentum update `k ← m·k + (1 − m)·q` of every moving key tensor.
    pub fn momentum_update(&self) -> Result<()> {
        let named = var_tensors(&self.vars)?;
        let m = self.moco.momentum;
        {
            let mut st = lock(&self.state)?;
            let moving = st.moving.clone();
            for name in moving {
                let q = named
                    .get(&name)
                    .ok_or_else(|| Error::Training(format!("query tensor {name} disappeared")))?;
                let k = st
                    .params
                    .get(&name)
                    .ok_or_else(|| Error::Training(format!("key tensor {name} disappeared")))?;
                let new = ((k * m)? + (q.to_dtype(DType::F32)? * (1.0 - m))?)?;
                st.params.insert(name, new);
            }
        }
        self.rebuild_key()
    }

    /// Normalised query embeddings (with gradient).
    pub fn query_embeds(&self, x: &BrivlInputs) -> Result<(Tensor, Tensor)> {
        embeds(&self.model, x, self.dtype)
    }

    /// Normalised key embeddings (without gradient).
    pub fn key_embeds(&self, x: &BrivlInputs) -> Result<(Tensor, Tensor)> {
        let st = lock(&self.state)?;
        let key = st
            .model
            .as_ref()
            .ok_or_else(|| Error::Training("the key encoder is not built".into()))?;
        let (img, txt) = embeds(key, x, self.dtype)?;
        Ok((img.detach(), txt.detach()))
    }

    /// Enqueues the keys of the last step (what the post-step hook does).
    pub fn commit(&self) -> Result<()> {
        commit(&self.state)
    }

    /// Registers the enqueue as a post-step hook of `trainer` (it runs only after steps
    /// that updated the weights).
    pub fn attach(&self, trainer: &mut Trainer) {
        let state = self.state.clone();
        trainer.add_post_step_hook(move |_| commit(&state));
    }

    /// A copy of the queues.
    pub fn queues(&self) -> Result<MocoQueues> {
        Ok(lock(&self.state)?.queues.clone())
    }

    /// Replaces the queues (e.g. to start from given ones); they must be `[dim, K]`.
    pub fn set_queues(&self, q: MocoQueues) -> Result<()> {
        let want = [self.cfg.img_feature_dim, self.moco.queue_size];
        for (name, t) in [("image", &q.image), ("text", &q.text)] {
            if t.dims() != want {
                return Err(Error::ShapeMismatch {
                    source_name: "MoCo queues".into(),
                    key: name.into(),
                    expected: want.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
        }
        lock(&self.state)?.queues = q;
        Ok(())
    }

    /// The key encoders' tensors under the checkpoint names (`imgencoder_mom.…`).
    pub fn key_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let st = lock(&self.state)?;
        let mut out = BTreeMap::new();
        for (k, v) in &st.params {
            out.insert(mom_name(k), v.to_dtype(DType::F32)?.copy()?);
        }
        Ok(out)
    }

    /// The query encoders' tensors (trained ones included) under the checkpoint names.
    pub fn query_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, v) in var_tensors(&self.vars)? {
            out.insert(k, v.to_dtype(DType::F32)?.copy()?);
        }
        Ok(out)
    }

    /// Writes `dir/model.safetensors` (query and `_mom` encoders, the layout of the
    /// published `learnable` dict) and `dir/config.json` atomically; with `tokenizer` it is
    /// copied to `dir/tokenizer.json`. `BrivlEncoder::from_path(dir)` (and so the
    /// `zero_shot` and `embed` examples) loads the result. The config's `BOX_GRID` is the
    /// grid used in training.
    pub fn export(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut all = self.query_tensors()?;
        all.extend(self.key_tensors()?);
        checkpoint::save_safetensors(&all, None, &dir.join("model.safetensors"))?;
        // The box grid used in training becomes the exported model's default.
        let cfg = BrivlConfig {
            box_grid: self.box_grid,
            ..self.cfg.clone()
        };
        let json = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Serialize {
            what: "the BriVL config".into(),
            reason: e.to_string(),
        })?;
        checkpoint::write_atomic(&dir.join("config.json"), &json)?;
        if let Some(t) = tokenizer {
            let bytes =
                std::fs::read(t).map_err(|e| Error::io(format!("reading {}", t.display()), e))?;
            checkpoint::write_atomic(&dir.join("tokenizer.json"), &bytes)?;
        }
        Ok(())
    }
}

fn rebuild_key(
    state: &Mutex<MocoState>,
    cfg: &BrivlConfig,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    let mut st = lock(state)?;
    let map: HashMap<String, Tensor> = st
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let vb = VarBuilder::from_tensors(map, dtype, device);
    let model = Brivl::new(cfg, vb)?;
    model.set_batch_norm_training(st.bn_training);
    st.model = Some(model);
    Ok(())
}

fn embeds(model: &Brivl, x: &BrivlInputs, dtype: DType) -> Result<(Tensor, Tensor)> {
    let img = model.image_embeds(
        &x.pixel_values.to_dtype(dtype)?,
        &x.boxes,
        &x.box_mask.to_dtype(dtype)?,
    )?;
    let txt = model.text_embeds(&x.input_ids, &x.text_mask.to_dtype(dtype)?)?;
    Ok((img.to_dtype(DType::F32)?, txt.to_dtype(DType::F32)?))
}

fn commit(state: &Mutex<MocoState>) -> Result<()> {
    let mut st = lock(state)?;
    if st.pending.is_empty() {
        return Ok(());
    }
    let (imgs, txts): (Vec<Tensor>, Vec<Tensor>) = st.pending.drain(..).unzip();
    let mut ki = Tensor::cat(&imgs, 0)?;
    let mut kt = Tensor::cat(&txts, 0)?;
    if let Some(c) = &st.comm {
        if c.world_size() > 1 {
            ki = c.all_gather(&ki.contiguous()?)?;
            kt = c.all_gather(&kt.contiguous()?)?;
        }
    }
    st.queues.enqueue(&ki, &kt)
}

fn var_tensors(vars: &VarMap) -> Result<BTreeMap<String, Tensor>> {
    let data = lock_vars(vars)?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect())
}

/// The MoCo state a training checkpoint keeps (queues, pointers, the moving key-encoder
/// tensors), as an [`ExtraState`] for [`crate::train::Fit::extra_state`]; from
/// [`BrivlMoco::moco_state`]. It shares the state with the objective, so the objective
/// can keep computing losses while the loop holds this.
pub struct MocoExtraState {
    state: Arc<Mutex<MocoState>>,
    cfg: BrivlConfig,
    queue_size: usize,
    device: Device,
    dtype: DType,
}

impl BrivlMoco {
    /// The checkpointable MoCo state (see [`MocoExtraState`]); also what
    /// [`Objective::extra_state`] returns.
    pub fn moco_state(&self) -> MocoExtraState {
        MocoExtraState {
            state: self.state.clone(),
            cfg: self.cfg.clone(),
            queue_size: self.moco.queue_size,
            device: self.device.clone(),
            dtype: self.dtype,
        }
    }
}

impl LossTerms for MocoLoss {
    fn total(&self) -> &Tensor {
        &self.loss
    }

    fn terms(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(vec![
            ("i2t", scalar(&self.i2t)?),
            ("t2i", scalar(&self.t2i)?),
        ])
    }
}

impl Objective for BrivlMoco {
    type Inputs<'a> = BrivlInputs;
    type Losses = MocoLoss;

    /// The loss of one micro-batch inside a [`Trainer`] step. The first micro-batch of a
    /// step runs the momentum update; keys wait until the step succeeds (see
    /// [`BrivlMoco::attach`]), so a skipped step enqueues nothing.
    fn loss(&self, x: &BrivlInputs, ctx: &StepCtx) -> Result<MocoLoss> {
        let b = x.pixel_values.dims4()?.0;
        let world = lock(&self.state)?
            .comm
            .as_ref()
            .map_or(1, |c| c.world_size());
        let global = b * ctx.n_micro * world;
        if !self.moco.queue_size.is_multiple_of(global) {
            return Err(Error::Config(format!(
                "the MoCo queue size {} must be a multiple of the global batch (batch {b} × \
                 {} micro-batches × {world} workers = {global})",
                self.moco.queue_size, ctx.n_micro
            )));
        }
        if ctx.micro == 0 {
            {
                let mut st = lock(&self.state)?;
                st.pending.clear();
            }
            self.momentum_update()?;
        }
        let (q_img, q_txt) = self.query_embeds(x)?;
        let (k_img, k_txt) = self.key_embeds(x)?;
        let mut st = lock(&self.state)?;
        let positives = if self.moco.multi_positive {
            Some(topk_positives(&k_img, &k_txt, &st.queues, self.moco.topk)?)
        } else {
            None
        };
        let out = moco_loss(
            &q_img,
            &q_txt,
            &k_img,
            &k_txt,
            &st.queues,
            self.moco.temperature,
            positives.as_ref(),
        )?;
        st.pending.push((k_img, k_txt));
        Ok(out)
    }

    fn extra_state(&self) -> Option<Box<dyn ExtraState + '_>> {
        Some(Box::new(self.moco_state()))
    }

    /// The optimiser's groups: the trainable patterns, with the default no-decay rules.
    fn param_groups(&self) -> ParamGroupConfig {
        ParamGroupConfig::default().with_trainable(self.moco.trainable.iter().cloned())
    }
}

impl ExtraState for MocoExtraState {
    fn save_state(&self) -> Result<BTreeMap<String, Tensor>> {
        let st = lock(&self.state)?;
        let mut out = st.queues.to_tensors()?;
        for name in &st.moving {
            if let Some(t) = st.params.get(name) {
                out.insert(mom_name(name), t.copy()?);
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, t: &BTreeMap<String, Tensor>) -> Result<()> {
        let origin = "MoCo state in the checkpoint";
        {
            let mut st = lock(&self.state)?;
            st.queues = MocoQueues::from_tensors(
                t,
                self.cfg.img_feature_dim,
                self.queue_size,
                &self.device,
                origin,
            )?;
            let moving = st.moving.clone();
            for name in moving {
                let key = mom_name(&name);
                let old = st.params.get(&name).map(|p| p.dims().to_vec());
                let x = t.get(&key).ok_or_else(|| Error::MissingTensor {
                    source_name: origin.into(),
                    key: key.clone(),
                    expected: old.clone().unwrap_or_default(),
                })?;
                if old.as_deref() != Some(x.dims()) {
                    return Err(Error::ShapeMismatch {
                        source_name: origin.into(),
                        key,
                        expected: old.unwrap_or_default(),
                        found: x.dims().to_vec(),
                    });
                }
                st.params
                    .insert(name, x.to_dtype(DType::F32)?.to_device(&self.device)?);
            }
            st.pending.clear();
        }
        rebuild_key(&self.state, &self.cfg, self.dtype, &self.device)
    }
}

/// Whether a bias gets PyTorch's default `U(±1/√fan_in)` init: those of the heads' plain
/// `nn.Linear` / `nn.Conv2d` layers (`max_pool`, `imgFC`, `textFC`, the encoder layers'
/// `linear1` / `linear2`). BERT, attention projections and norms start at zero.
fn default_bias_init(name: &str) -> bool {
    name.contains(".learnable.") && !name.contains("self_attn") && !name.contains("norm")
}

fn shapes_fan_in(bias: &str, fan_ins: &HashMap<String, usize>) -> usize {
    let weight = format!("{}weight", bias.trim_end_matches("bias"));
    fan_ins.get(&weight).copied().unwrap_or(1)
}

/// Fresh weights for a BriVL of config `cfg` (training from scratch), seeded: convolutions
/// `N(0, 2 / fan_out)` (timm's EfficientNet init), linear and attention weights uniform
/// in `±1/√fan_in` (PyTorch's default), the heads' biases likewise, embeddings
/// `N(0, 0.02)` (BERT), normalisation scales 1, other biases and shifts 0, BN running
/// statistics 0 and 1.
pub fn random_init(cfg: &BrivlConfig, seed: u64) -> Result<TensorSource> {
    let shapes = checkpoint::parameter_shapes(|vb| Brivl::new(cfg, vb))?;
    // fan-in of each weight, to initialise its bias.
    let fan_ins: HashMap<String, usize> = shapes
        .iter()
        .filter(|(_, s)| s.len() >= 2)
        .map(|(n, s)| (n.clone(), s[1..].iter().product()))
        .collect();
    let mut rng = derive_rng(seed, &[0x494e_4954]);
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let rank1 = shape.len() <= 1;
        let data: Vec<f32> = if name.ends_with("running_var") {
            vec![1.0; n]
        } else if name.ends_with("running_mean")
            || (name.ends_with("bias") && !default_bias_init(&name))
        {
            vec![0.0; n]
        } else if name.ends_with("bias") {
            // PyTorch's default for Linear / Conv2d biases: U(±1/√fan_in).
            let fan_in = shapes_fan_in(&name, &fan_ins);
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        } else if rank1 {
            // Norm scales (LayerNorm, BatchNorm weight).
            vec![1.0; n]
        } else if name.contains("embeddings") {
            (0..n).map(|_| 0.02 * standard_normal(&mut rng)).collect()
        } else if shape.len() == 4 {
            // [out, in/groups, kh, kw]; depthwise convs have in/groups = 1.
            let fan_out = shape[0] * shape[2] * shape[3] / if shape[1] == 1 { shape[0] } else { 1 };
            let std = (2.0 / fan_out.max(1) as f64).sqrt() as f32;
            (0..n).map(|_| std * standard_normal(&mut rng)).collect()
        } else {
            let fan_in = shape[1..].iter().product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(TensorSource::Map(out))
}
