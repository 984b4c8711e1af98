//! AdamW with parameter groups, freezing by name, and f32 master weights.
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor path) step for step:
//!
//! ```text
//! t      += 1                                  (per parameter, only when it has a gradient)
//! p      ← p · (1 − lr · wd)                   (decoupled weight decay, before Adam)
//! m      ← m + (g − m) · (1 − β₁)              (torch.lerp)
//! v      ← v · β₂ + (1 − β₂) · g²
//! denom  = √v / √(1 − β₂ᵗ) + ε                 (ε after the square root of v̂)
//! p      ← p − lr / (1 − β₁ᵗ) · m / denom
//! ```
//!
//! Parameters without a gradient in a step are left alone (no decay, no state change), as
//! in PyTorch. Frozen parameters are never given optimiser state.
//!
//! **Master weights.** A bf16 or f16 parameter gets an f32 master copy; `m`, `v` and the
//! update are f32, and after each step the master is rounded into the parameter. Updates
//! smaller than the half-precision spacing therefore accumulate instead of vanishing. f32
//! and f64 parameters are updated in their own precision with state of the same dtype.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::pattern::Patterns;
use super::trainer::lock_vars;
use crate::error::{Error, Result};

/// AdamW hyper-parameters (PyTorch defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// The base learning rate (the schedule multiplies it, groups scale it).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Weight decay for parameters that are decayed.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks every value: a learning rate in (0, 1], betas in [0, 1), a positive finite
    /// epsilon and a weight decay in [0, 10]. NaN, infinities and negative values are
    /// errors that name the option (they would export an all-NaN model or train upwards).
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, v: f64, ok: bool, range: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "optimizer {name} is {v}; it must be a finite number {range}"
                )))
            }
        };
        check("lr", self.lr, self.lr > 0.0 && self.lr <= 1.0, "in (0, 1]")?;
        check(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "in [0, 1)",
        )?;
        check(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "in [0, 1)",
        )?;
        check(
            "eps",
            self.eps,
            self.eps > 0.0 && self.eps < 1.0,
            "in (0, 1)",
        )?;
        check(
            "weight_decay",
            self.weight_decay,
            (0.0..=10.0).contains(&self.weight_decay),
            "in [0, 10]",
        )
    }
}

/// Name patterns whose parameters get no weight decay by default: biases, normalisation
/// weights (LayerNorm, BatchNorm `bn*`, `ln_*`, `*norm*`), and temperature / logit
/// parameters (`temp`, `logit_scale`, `logit_bias`) and SigLIP's MAP-head `probe`.
pub const DEFAULT_NO_DECAY: &[&str] = &[
    "*bias",
    "norm",
    "Norm",
    "ln_",
    "*.bn*",
    "bn*",
    "temp",
    "logit_scale",
    "logit_bias",
    "probe",
];

/// A named group of parameters with its own learning-rate multiplier and weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRule {
    /// The group's name in reports and checkpoints.
    pub name: String,
    /// Parameters matching any of these (see [`super::pattern`]) join the group; the first
    /// rule that matches wins.
    pub patterns: Vec<String>,
    /// Multiplier of the scheduled learning rate.
    #[serde(default = "one")]
    pub lr_scale: f64,
    /// Weight decay for the group's decayed parameters (default: the optimiser's). The
    /// no-decay rules still apply inside the group.
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

fn one() -> f64 {
    1.0
}

/// How parameters are split into frozen ones and optimiser groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ParamGroupConfig {
    /// When non-empty, only parameters matching one of these patterns train; all others
    /// are frozen.
    pub trainable: Vec<String>,
    /// Parameters matching these are frozen, even when `trainable` matches them.
    pub frozen: Vec<String>,
    /// Parameters matching these get no weight decay (default [`DEFAULT_NO_DECAY`]).
    pub no_decay: Vec<String>,
    /// Also exempt every tensor of rank 0 or 1 from weight decay (biases, norm scales,
    /// scalars), as timm and most CLIP recipes do. Default true.
    pub no_decay_rank_le1: bool,
    /// Extra groups with their own learning-rate multiplier; parameters matching none form
    /// the group `default`.
    pub groups: Vec<GroupRule>,
}

impl Default for ParamGroupConfig {
    fn default() -> Self {
        Self {
            trainable: Vec::new(),
            frozen: Vec::new(),
            no_decay: DEFAULT_NO_DECAY.iter().map(|s| s.to_string()).collect(),
            no_decay_rank_le1: true,
            groups: Vec::new(),
        }
    }
}

impl ParamGroupConfig {
    /// Only parameters matching these patterns train.
    pub fn with_trainable<S: Into<String>>(mut self, p: impl IntoIterator<Item = S>) -> Self {
        self.trainable.extend(p.into_iter().map(Into::into));
        self
    }

    /// Parameters matching these patterns are frozen.
    pub fn with_frozen<S: Into<String>>(mut self, p: impl IntoIterator<Item = S>) -> Self {
        self.frozen.extend(p.into_iter().map(Into::into));
        self
    }

    /// Adds a group with a learning-rate multiplier and optional weight decay.
    pub fn with_group<S: Into<String>>(
        mut self,
        name: &str,
        patterns: impl IntoIterator<Item = S>,
        lr_scale: f64,
        weight_decay: Option<f64>,
    ) -> Self {
        self.groups.push(GroupRule {
            name: name.to_string(),
            patterns: patterns.into_iter().map(Into::into).collect(),
            lr_scale,
            weight_decay,
        });
        self
    }
}

/// One trained parameter and its optimiser state.
#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    /// f32 copy for bf16/f16 parameters.
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    /// Number of updates this parameter received (PyTorch keeps it per parameter).
    t: u64,
}

/// A group's settings and members, for reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub name: String,
    pub lr_scale: f64,
    pub weight_decay: f64,
    /// Member parameter names.
    pub params: Vec<String>,
    /// Total number of elements.
    pub numel: usize,
}

#[derive(Debug)]
struct Group {
    name: String,
    lr_scale: f64,
    weight_decay: f64,
    /// Indices into `AdamW::params`.
    members: Vec<usize>,
}

/// Gradients for the optimiser's trained parameters, indexed like
/// [`AdamW::trained_names`]. `None` means "no gradient this step".
#[derive(Debug, Clone)]
pub struct Grads {
    pub(crate) grads: Vec<Option<Tensor>>,
}

impl Grads {
    /// Gradients by parameter name (others are `None`); fails on an unknown name or a
    /// shape that does not match.
    pub fn from_named(opt: &AdamW, named: &HashMap<String, Tensor>) -> Result<Self> {
        let mut grads = vec![None; opt.params.len()];
        for (name, g) in named {
            let i = opt.index_of(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "gradient for `{name}`, which is not a trained parameter"
                ))
            })?;
            if g.dims() != opt.params[i].var.dims() {
                return Err(Error::InvalidArgument(format!(
                    "gradient for `{name}` has shape {:?}, the parameter {:?}",
                    g.dims(),
                    opt.params[i].var.dims()
                )));
            }
            grads[i] = Some(g.clone());
        }
        Ok(Self { grads })
    }

    /// The gradient of the `i`-th trained parameter.
    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.grads.get(i).and_then(|g| g.as_ref())
    }

    /// The global L2 norm over all gradients, accumulated in f64 on the host (one
    /// device-to-host copy).
    pub fn global_norm(&self) -> Result<f64> {
        let mut sums = Vec::new();
        for g in self.grads.iter().flatten() {
            sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
        if sums.is_empty() {
            return Ok(0.0);
        }
        let v = Tensor::stack(&sums, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(v.iter().sum::<f64>().sqrt())
    }

    /// Multiplies every gradient by `s`.
    pub fn scale(&mut self, s: f64) -> Result<()> {
        for g in self.grads.iter_mut().flatten() {
            *g = g.affine(s, 0.0)?;
        }
        Ok(())
    }

    /// PyTorch's `clip_grad_norm_`: scales by `max_norm / (norm + 1e-6)` when that is below
    /// one. Returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            self.scale(coef)?;
        }
        Ok(norm)
    }
}

/// AdamW over named parameters with groups, freezing and master weights.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    lr: f64,
    params: Vec<Param>,
    groups: Vec<Group>,
    frozen: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    /// Use the in-place CPU kernels for f32 parameters (see [`AdamW::step`]).
    fused_cpu: bool,
}

fn state_dtype(d: DType) -> DType {
    match d {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

impl AdamW {
    /// Builds the optimiser over every float var of `vars` (sorted by name).
    pub fn from_varmap(
        vars: &VarMap,
        config: AdamWConfig,
        groups: &ParamGroupConfig,
    ) -> Result<Self> {
        let named: Vec<(String, Var)> = {
            let data = lock_vars(vars)?;
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        Self::new(named, config, groups)
    }

    /// Builds the optimiser over named vars. Names must be unique; order does not matter
    /// (parameters are kept sorted by name so that results never depend on hash order).
    pub fn new(
        vars: impl IntoIterator<Item = (String, Var)>,
        config: AdamWConfig,
        groups: &ParamGroupConfig,
    ) -> Result<Self> {
        config.validate()?;
        let trainable = Patterns::new(&groups.trainable)?;
        let frozen_p = Patterns::new(&groups.frozen)?;
        let no_decay = Patterns::new(&groups.no_decay)?;
        let rules = groups
            .groups
            .iter()
            .map(|r| {
                if r.name == "default" {
                    return Err(Error::Config("group name `default` is reserved".into()));
                }
                if !(r.lr_scale.is_finite() && r.lr_scale >= 0.0) {
                    return Err(Error::Config(format!(
                        "group `{}` has lr_scale {}",
                        r.name, r.lr_scale
                    )));
                }
                Ok((r, Patterns::new(&r.patterns)?))
            })
            .collect::<Result<Vec<_>>>()?;

        let mut sorted: BTreeMap<String, Var> = BTreeMap::new();
        for (name, var) in vars {
            if sorted.insert(name.clone(), var).is_some() {
                return Err(Error::Config(format!("parameter `{name}` listed twice")));
            }
        }

        let mut params = Vec::new();
        let mut frozen = Vec::new();
        // (group name, decayed?) → group index
        let mut group_index: BTreeMap<(usize, bool), usize> = BTreeMap::new();
        let mut out_groups: Vec<Group> = Vec::new();
        for (name, var) in sorted {
            let is_trainable = var.dtype().is_float()
                && (trainable.is_empty() || trainable.matches(&name))
                && !frozen_p.matches(&name);
            if !is_trainable {
                frozen.push((name, var));
                continue;
            }
            // rule index: 0 = default, i+1 = rules[i]
            let rule = rules
                .iter()
                .position(|(_, p)| p.matches(&name))
                .map(|i| i + 1)
                .unwrap_or(0);
            let decayed =
                !(no_decay.matches(&name) || (groups.no_decay_rank_le1 && var.rank() <= 1));
            let gi = *group_index.entry((rule, decayed)).or_insert_with(|| {
                let (base_name, lr_scale, wd) = match rule {
                    0 => ("default".to_string(), 1.0, config.weight_decay),
                    r => {
                        let (rule, _) = &rules[r - 1];
                        (
                            rule.name.clone(),
                            rule.lr_scale,
                            rule.weight_decay.unwrap_or(config.weight_decay),
                        )
                    }
                };
                out_groups.push(Group {
                    name: if decayed {
                        base_name
                    } else {
                        format!("{base_name}.no_decay")
                    },
                    lr_scale,
                    weight_decay: if decayed { wd } else { 0.0 },
                    members: Vec::new(),
                });
                out_groups.len() - 1
            });
            let sd = state_dtype(var.dtype());
            let master = match var.dtype() {
                DType::BF16 | DType::F16 => Some(var.as_detached_tensor().to_dtype(DType::F32)?),
                _ => None,
            };
            let m = Tensor::zeros(var.shape(), sd, var.device())?;
            let v = m.zeros_like()?;
            out_groups[gi].members.push(params.len());
            params.push(Param {
                name,
                var,
                master,
                m,
                v,
                t: 0,
            });
        }
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Ok(Self {
            lr: config.lr,
            config,
            params,
            groups: out_groups,
            frozen,
            index,
            fused_cpu: true,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The current (scheduled) base learning rate; group `g` uses `lr × g.lr_scale`.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the base learning rate for the next step.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Sets the learning-rate scale of the group `name` of [`ParamGroupConfig::with_group`]
    /// (its decayed and its `.no_decay` part), e.g. to start training a tower that was held
    /// at scale 0 for the first steps. Scales are not saved in checkpoints: a resumed run
    /// sets them again. Fails when no group has that name or the scale is negative.
    pub fn set_lr_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(Error::Config(format!("group `{name}`: lr scale {scale}")));
        }
        let no_decay = format!("{name}.no_decay");
        let mut found = false;
        for g in &mut self.groups {
            if g.name == name || g.name == no_decay {
                g.lr_scale = scale;
                found = true;
            }
        }
        if !found {
            let names: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
            return Err(Error::Config(format!(
                "no parameter group `{name}` (groups: {})",
                names.join(", ")
            )));
        }
        Ok(())
    }

    /// Names of the trained parameters, in the optimiser's order.
    pub fn trained_names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// The trained parameters, by name.
    pub fn trained(&self) -> Vec<(&str, &Var)> {
        self.params
            .iter()
            .map(|p| (p.name.as_str(), &p.var))
            .collect()
    }

    /// The frozen parameters, by name.
    pub fn frozen(&self) -> &[(String, Var)] {
        &self.frozen
    }

    /// Index of a trained parameter.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Whether `name` has optimiser state (is trained).
    pub fn has_state(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Number of updates parameter `name` received.
    pub fn param_steps(&self, name: &str) -> Option<u64> {
        self.index_of(name).map(|i| self.params[i].t)
    }

    /// The f32 master copy of a half-precision parameter.
    pub fn master(&self, name: &str) -> Option<&Tensor> {
        self.index_of(name)
            .and_then(|i| self.params[i].master.as_ref())
    }

    /// The first and second moments of a parameter.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.index_of(name)
            .map(|i| (&self.params[i].m, &self.params[i].v))
    }

    /// The groups with their members.
    pub fn groups(&self) -> Vec<GroupSummary> {
        self.groups
            .iter()
            .map(|g| GroupSummary {
                name: g.name.clone(),
                lr_scale: g.lr_scale,
                weight_decay: g.weight_decay,
                params: g
                    .members
                    .iter()
                    .map(|&i| self.params[i].name.clone())
                    .collect(),
                numel: g
                    .members
                    .iter()
                    .map(|&i| self.params[i].var.elem_count())
                    .sum(),
            })
            .collect()
    }

    /// Collects the trained parameters' gradients from a backward pass.
    pub fn collect_grads(&self, store: &candle_core::backprop::GradStore) -> Grads {
        Grads {
            grads: self
                .params
                .iter()
                .map(|p| store.get(p.var.as_tensor()).cloned())
                .collect(),
        }
    }

    /// An all-`None` gradient set of the right length.
    pub fn empty_grads(&self) -> Grads {
        Grads {
            grads: vec![None; self.params.len()],
        }
    }

    /// One AdamW update with the current learning rate.
    pub fn step(&mut self, grads: &Grads) -> Result<()> {
        if grads.grads.len() != self.params.len() {
            return Err(Error::InvalidArgument(format!(
                "{} gradients for {} parameters",
                grads.grads.len(),
                self.params.len()
            )));
        }
        let AdamWConfig {
            beta1, beta2, eps, ..
        } = self.config;
        for g in &self.groups {
            let lr = self.lr * g.lr_scale;
            for &i in &g.members {
                let Some(grad) = grads.grads[i].as_ref() else {
                    continue;
                };
                let p = &mut self.params[i];
                let sd = p.m.dtype();
                let grad = grad.to_dtype(sd)?;
                p.t += 1;
                let t = p.t as i32;
                if self.fused_cpu && fused_update_applies(p, &grad) {
                    fused_update(p, &grad, lr, g.weight_decay, &self.config)?;
                    continue;
                }
                let mut theta = match &p.master {
                    Some(m) => m.clone(),
                    None => p.var.as_detached_tensor(),
                };
                if g.weight_decay != 0.0 {
                    theta = theta.affine(1.0 - lr * g.weight_decay, 0.0)?;
                }
                let m = (&p.m + (grad.sub(&p.m)?.affine(1.0 - beta1, 0.0))?)?;
                let v = ((&p.v * beta2)? + grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;
                let bc1 = 1.0 - beta1.powi(t);
                let bc2 = 1.0 - beta2.powi(t);
                let step_size = lr / bc1;
                let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
                let theta = (theta - (m.div(&denom)? * step_size)?)?;
                p.m = m;
                p.v = v;
                match &mut p.master {
                    Some(master) => {
                        p.var.set(&theta.to_dtype(p.var.dtype())?)?;
                        *master = theta;
                    }
                    None => p.var.set(&theta)?,
                }
            }
        }
        Ok(())
    }

    /// The weights to save: the f32 master of half-precision trained parameters, the
    /// parameter itself otherwise, frozen parameters included. Tensors are fresh copies.
    pub fn weights(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            let t = match &p.master {
                Some(m) => m.copy()?,
                None => p.var.as_detached_tensor().copy()?,
            };
            out.insert(p.name.clone(), t);
        }
        for (name, var) in &self.frozen {
            out.insert(name.clone(), var.as_detached_tensor().copy()?);
        }
        Ok(out)
    }

    /// Restores weights saved by [`AdamW::weights`]: every parameter must be present with
    /// its shape. Masters are restored exactly; parameters get the value in their dtype.
    pub fn load_weights(&mut self, w: &BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
        let get = |name: &str, var: &Var| -> Result<Tensor> {
            let t = w.get(name).ok_or_else(|| Error::MissingTensor {
                source_name: origin.to_string(),
                key: name.to_string(),
                expected: var.dims().to_vec(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    source_name: origin.to_string(),
                    key: name.to_string(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            Ok(t.to_device(var.device())?)
        };
        for p in &mut self.params {
            let t = get(&p.name, &p.var)?;
            if let Some(master) = &mut p.master {
                *master = t.to_dtype(DType::F32)?;
            }
            p.var.set(&t.to_dtype(p.var.dtype())?)?;
        }
        for (name, var) in &self.frozen {
            let t = get(name, var)?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Optimiser state as tensors: `m.{name}`, `v.{name}` and `t.{name}` (an i64 scalar).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("m.{}", p.name), p.m.copy()?);
            out.insert(format!("v.{}", p.name), p.v.copy()?);
            out.insert(
                format!("t.{}", p.name),
                Tensor::new(p.t as i64, &candle_core::Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Restores state saved by [`AdamW::state_tensors`]; every trained parameter must have
    /// its `m`, `v` and `t`, and no state may belong to an untrained parameter.
    pub fn load_state_tensors(&mut self, s: &BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
        for key in s.keys() {
            let name = key
                .strip_prefix("m.")
                .or_else(|| key.strip_prefix("v."))
                .or_else(|| key.strip_prefix("t."))
                .unwrap_or(key);
            if !self.index.contains_key(name) {
                return Err(Error::StateMismatch(format!(
                    "{origin}: optimiser state `{key}` belongs to no trained parameter \
                     (did the freezing rules change?)"
                )));
            }
        }
        for p in &mut self.params {
            let take = |k: String| -> Result<&Tensor> {
                s.get(&k).ok_or_else(|| Error::MissingTensor {
                    source_name: origin.to_string(),
                    key: k,
                    expected: p.var.dims().to_vec(),
                })
            };
            let m = take(format!("m.{}", p.name))?;
            let v = take(format!("v.{}", p.name))?;
            let t = take(format!("t.{}", p.name))?;
            for (k, x) in [("m", m), ("v", v)] {
                if x.dims() != p.var.dims() {
                    return Err(Error::ShapeMismatch {
                        source_name: origin.to_string(),
                        key: format!("{k}.{}", p.name),
                        expected: p.var.dims().to_vec(),
                        found: x.dims().to_vec(),
                    });
                }
            }
            let sd = p.m.dtype();
            // Own copies: the update may run in place.
            p.m = m.to_dtype(sd)?.to_device(p.var.device())?.copy()?;
            p.v = v.to_dtype(sd)?.to_device(p.var.device())?.copy()?;
            p.t = t.to_dtype(DType::I64)?.to_scalar::<i64>()?.max(0) as u64;
        }
        Ok(())
    }
}

/// Whether [`fused_update`] applies: an f32 CPU parameter without a master copy, with
/// contiguous state and gradient.
fn fused_update_applies(p: &Param, grad: &Tensor) -> bool {
    let ok = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous();
    p.master.is_none()
        && ok(p.var.as_tensor())
        && ok(&p.m)
        && ok(&p.v)
        && ok(grad)
        && grad.elem_count() == p.m.elem_count()
}

/// Elements per parallel task of the update kernels.
const UPDATE_CHUNK: usize = 32 * 1024;

/// One AdamW update of an f32 CPU parameter in three parallel in-place passes (the
/// moments, then the parameter), with the formula of the composed path; the results
/// agree to rounding.
fn fused_update(p: &Param, grad: &Tensor, lr: f64, wd: f64, c: &AdamWConfig) -> Result<()> {
    let t = p.t as i32;
    p.m.inplace_op2(grad, &Moment::First(c.beta1 as f32))?;
    p.v.inplace_op2(grad, &Moment::Second(c.beta2 as f32))?;
    let update = ParamUpdate {
        decay: (1.0 - lr * wd) as f32,
        step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
        sqrt_bc2: (1.0 - c.beta2.powi(t)).sqrt() as f32,
        eps: c.eps as f32,
    };
    p.var.as_tensor().inplace_op3(&p.m, &p.v, &update)?;
    Ok(())
}

/// In place: `m ← m + (g − m)(1 − β₁)` or `v ← v·β₂ + (1 − β₂)·g²`.
enum Moment {
    First(f32),
    Second(f32),
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use crate::nn::kernels::{contiguous_f32, contiguous_f32_mut};
        use rayon::prelude::*;
        let state = contiguous_f32_mut(s, l, "adamw-moment")?;
        let g = contiguous_f32(gs, gl, "adamw-moment")?;
        if state.len() != g.len() {
            candle_core::bail!("adamw-moment: {} state values for {}", state.len(), g.len())
        }
        let chunks = state
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(g.par_chunks(UPDATE_CHUNK));
        match *self {
            Moment::First(beta1) => {
                let w = 1.0 - beta1;
                chunks.for_each(|(m, g)| {
                    for (m, &g) in m.iter_mut().zip(g) {
                        *m += (g - *m) * w;
                    }
                })
            }
            Moment::Second(beta2) => {
                let w = 1.0 - beta2;
                chunks.for_each(|(v, g)| {
                    for (v, &g) in v.iter_mut().zip(g) {
                        *v = *v * beta2 + g * g * w;
                    }
                })
            }
        }
        Ok(())
    }
}

/// In place: `θ ← θ·decay − step_size · m / (√v / √(1 − β₂ᵗ) + ε)`.
struct ParamUpdate {
    decay: f32,
    step_size: f32,
    sqrt_bc2: f32,
    eps: f32,
}

impl candle_core::InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
        ms: &candle_core::CpuStorage,
        ml: &candle_core::Layout,
        vs: &candle_core::CpuStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use crate::nn::kernels::{contiguous_f32, contiguous_f32_mut};
        use rayon::prelude::*;
        let theta = contiguous_f32_mut(s, l, "adamw-update")?;
        let m = contiguous_f32(ms, ml, "adamw-update")?;
        let v = contiguous_f32(vs, vl, "adamw-update")?;
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("adamw-update: mismatched state sizes")
        }
        let &ParamUpdate {
            decay,
            step_size,
            sqrt_bc2,
            eps,
        } = self;
        theta
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(m.par_chunks(UPDATE_CHUNK).zip(v.par_chunks(UPDATE_CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() / sqrt_bc2 + eps;
                    *p = *p * decay - m / denom * step_size;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(shape: &[usize], dtype: DType) -> Var {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| 0.1 + 0.01 * i as f32).collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    }

    #[test]
    fn groups_and_freezing() {
        let vars = vec![
            ("enc.layer.0.weight".to_string(), var(&[2, 2], DType::F32)),
            ("enc.layer.0.bias".to_string(), var(&[2], DType::F32)),
            ("enc.layer.1.weight".to_string(), var(&[2, 2], DType::F32)),
            (
                "enc.layer.1.norm1.weight".to_string(),
                var(&[2], DType::F32),
            ),
            ("head.weight".to_string(), var(&[2, 2], DType::F32)),
            ("logit_scale".to_string(), var(&[1], DType::F32)),
            (
                "blocks.0.bn1.running_mean".to_string(),
                var(&[2], DType::F32),
            ),
        ];
        let cfg = ParamGroupConfig::default()
            .with_trainable(["enc.layer.{1..1}.*", "head.*", "logit_scale"])
            .with_group("head", ["head.*"], 10.0, Some(0.5));
        let opt = AdamW::new(vars, AdamWConfig::default(), &cfg).unwrap();
        let groups = opt.groups();
        let by_name: HashMap<_, _> = groups.iter().map(|g| (g.name.as_str(), g)).collect();
        assert_eq!(by_name["default"].params, vec!["enc.layer.1.weight"]);
        assert_eq!(by_name["default"].weight_decay, 0.01);
        assert_eq!(
            by_name["default.no_decay"].params,
            vec!["enc.layer.1.norm1.weight", "logit_scale"]
        );
        assert_eq!(by_name["head"].lr_scale, 10.0);
        assert_eq!(by_name["head"].weight_decay, 0.5);
        let frozen: Vec<_> = opt.frozen().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            frozen,
            vec![
                "blocks.0.bn1.running_mean",
                "enc.layer.0.bias",
                "enc.layer.0.weight"
            ]
        );
        assert!(!opt.has_state("enc.layer.0.weight"));
        assert!(opt.has_state("head.weight"));
        let mut opt = opt;
        opt.set_lr_scale("head", 0.0).unwrap();
        assert!(opt
            .groups()
            .iter()
            .all(|g| g.name != "head" || g.lr_scale == 0.0));
        assert!(opt.set_lr_scale("tail", 1.0).is_err());
        assert!(opt.set_lr_scale("head", -1.0).is_err());
    }

    #[test]
    fn fused_update_matches_the_composed_one() {
        let build = |fused: bool| {
            let vars = vec![
                ("a.weight".to_string(), var(&[70, 1000], DType::F32)),
                ("a.bias".to_string(), var(&[1000], DType::F32)),
                ("b.weight".to_string(), var(&[3, 5], DType::F32)),
            ];
            let cfg = ParamGroupConfig::default().with_group("b", ["b.*"], 3.0, Some(0.5));
            let adam = AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.1,
                ..Default::default()
            };
            let mut opt = AdamW::new(vars, adam, &cfg).unwrap();
            opt.fused_cpu = fused;
            opt
        };
        let (mut fused, mut composed) = (build(true), build(false));
        for step in 0..3 {
            let grads: Vec<Option<Tensor>> = fused
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    // Leave one parameter without a gradient in one step.
                    (step != 1 || i != 2).then(|| {
                        let n = p.m.elem_count();
                        let g: Vec<f32> = (0..n)
                            .map(|j| ((j * 7 + step * 13 + i) % 23) as f32 / 11.0 - 1.0)
                            .collect();
                        Tensor::from_vec(g, p.m.shape(), &Device::Cpu).unwrap()
                    })
                })
                .collect();
            let grads = Grads { grads };
            fused.step(&grads).unwrap();
            composed.step(&grads).unwrap();
        }
        for (a, b) in fused.params.iter().zip(&composed.params) {
            assert_eq!(a.t, b.t, "{}", a.name);
            for (x, y) in [
                (a.var.as_tensor(), b.var.as_tensor()),
                (&a.m, &b.m),
                (&a.v, &b.v),
            ] {
                // Relative to the magnitude (the weights reach 700).
                let scale = (y.abs().unwrap() + 1.0).unwrap();
                let d = (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .div(&scale)
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(d < 1e-6, "{}: {d}", a.name);
            }
        }
        // The kernels applied (f32 CPU state), and the parameters moved.
        let p = &fused.params[fused.index_of("a.weight").unwrap()];
        assert!(fused_update_applies(p, &p.m.zeros_like().unwrap()));
        assert!(!fused_update_applies(p, &p.m.t().unwrap()));
        let before = var(&[70, 1000], DType::F32);
        let moved = (p.var.as_tensor() - before.as_tensor())
            .unwrap()
            .abs()
            .unwrap();
        let moved = moved.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 1e-3, "{moved}");
    }

    #[test]
    fn default_no_decay_names() {
        let p = Patterns::new(DEFAULT_NO_DECAY).unwrap();
        for n in [
            "textencoder.backbone.bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "imgencoder.backbone.blocks.3.0.bn1.weight",
            "imgencoder.backbone.bn2.weight",
            "bn1.weight",
            "vision_model.post_layernorm.weight",
            "vision_model.encoder.layers.0.layer_norm1.weight",
            "temp",
            "logit_scale",
            "logit_bias",
            "vision_model.head.probe",
            "x.ln_1.weight",
            "a.in_proj_bias",
        ] {
            assert!(p.matches(n), "{n} should not be decayed");
        }
        for n in [
            "imgencoder.backbone.blocks.3.0.conv_dw.weight",
            "encoder.layer.0.attention.self.query.weight",
            "embeddings.word_embeddings.weight",
        ] {
            assert!(!p.matches(n), "{n} should be decayed");
        }
    }
}
