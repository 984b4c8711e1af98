//! Element-wise and normalisation ops that are correct for both inference and training.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` record no backward pass:
//! gradients silently stop at them. Each op here takes the fused kernel when no input
//! tracks gradients (inference, frozen towers) and an equivalent composition of
//! differentiable primitives otherwise, so training always gets true gradients and
//! inference keeps the fast path.
//!
//! On the CPU in `f32` most of these ops run the crate's own kernels (`nn::kernels`), in
//! training too: those have backward kernels of their own. This module only decides which
//! path a call takes.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::kernels::act::{self, FusedAct};
use super::kernels::{cpu_f32, cpu_f32_no_grad, norm, softmax};

/// Whether any of `ts` takes part in a gradient computation.
pub fn tracks_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Softmax over the last dimension, with a real backward when the input tracks gradients.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        if cpu_f32(&[xs]) && xs.rank() > 0 {
            return softmax::softmax_train(xs);
        }
        softmax_composed(xs)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// Max-stabilised softmax built from differentiable primitives.
pub fn softmax_composed(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Log-softmax over the last dimension (always differentiable).
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let diff = xs.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&lse)
}

/// Numerically stable `log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))`.
pub fn log_sigmoid(xs: &Tensor) -> Result<Tensor> {
    let zeros = xs.zeros_like()?;
    let neg_abs = xs.abs()?.neg()?;
    let log1p = (neg_abs.exp()? + 1.0)?.log()?;
    xs.minimum(&zeros)?.sub(&log1p)
}

/// Sigmoid with a real backward.
pub fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(xs)
}

/// L2-normalises along the last dimension (differentiable).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    // torch.nn.functional.normalize(eps=1e-12) divides by max(‖x‖, 1e-12). Clamping the
    // squared norm at 1e-24 instead gives the same values and the same backward for an
    // all-zero row (1/eps, finite), where sqrt'(0) = ∞ would make it NaN.
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::INFINITY)?
        .sqrt()?;
    xs.broadcast_div(&norm)
}

/// Checks a normalisation epsilon from a config: it must be finite and positive (a negative
/// or NaN one turns every output into NaN).
pub fn check_eps(what: &str, eps: f64) -> Result<()> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "invalid configuration: {what} epsilon is {eps}; it must be a positive finite number"
        )))
    }
}

/// Checks that every token id in `ids` indexes a row of an embedding table of `vocab`
/// rows: a tokenizer whose vocabulary is larger than the checkpoint's would otherwise fail
/// deep inside the lookup with an unnamed index error.
pub fn check_token_ids(ids: &Tensor, vocab: usize) -> Result<()> {
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let max = ids
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::I64)?
        .to_scalar::<i64>()?;
    if max < 0 || max as u64 >= vocab as u64 {
        candle_core::bail!(
            "token id {max} is beyond the model's vocabulary of {vocab} tokens (the tokenizer \
             does not match the checkpoint)"
        )
    }
    Ok(())
}

/// Layer normalisation over the last dimension with learned scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Builds from explicit tensors.
    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Loads `weight` and `bias` of size `dim`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        check_eps("layer norm", eps)?;
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// Loads the old BERT TF-style names `gamma`/`beta` when `weight`/`bias` are absent.
    pub fn new_bert(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if !vb.contains_tensor("weight") && vb.contains_tensor("gamma") {
            return Ok(Self {
                weight: vb.get(dim, "gamma")?,
                bias: vb.get(dim, "beta")?,
                eps,
            });
        }
        Self::new(dim, eps, vb)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        if tracks_grad(&[xs, w, b]) && cpu_f32(&[xs, w, b]) && xs.rank() > 0 {
            // Training on the CPU: fused forward and backward kernels.
            norm::layer_norm_train(xs, w, b, self.eps)
        } else if tracks_grad(&[xs, &self.weight, &self.bias])
            || !xs.is_contiguous()
            || xs.dtype() == DType::F64
        {
            layer_norm_composed(xs, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Layer norm built from differentiable primitives; statistics in f32 for half inputs.
pub fn layer_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let x = xs.to_dtype(internal)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Tanh-approximated GELU. For f32 tensors on the CPU this runs a parallel
/// kernel (candle's is scalar and single-threaded, about a fifth of a ViT's forward time);
/// its backward is the exact derivative. Other inputs use candle's op.
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[xs]) {
        act::act_train(xs, FusedAct::GeluTanh)
    } else {
        xs.gelu()
    }
}

/// `act(y + bias)` computed **in place in `y`**, for a freshly computed `y` that nothing
/// else refers to (a matmul output). Falls back to (differentiable) out-of-place ops when
/// `y` or `bias` tracks gradients, is not an f32 CPU tensor, or `act` has no kernel.
pub(crate) fn bias_act_into(
    y: Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
) -> Result<Tensor> {
    let in_place = |t: &Tensor| cpu_f32_no_grad(&[t]) && t.is_contiguous();
    let fits = in_place(&y)
        && bias.is_none_or(|b| {
            in_place(b) && b.rank() == 1 && y.dims().last() == Some(&b.dim(0).unwrap_or(0))
        });
    let Some(kernel_act) = fused_act(act).filter(|_| fits) else {
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        return match act {
            Some(a) => a.apply(&y),
            None => Ok(y),
        };
    };
    act::bias_act_inplace(&y, bias, kernel_act)?;
    Ok(y)
}

/// `softmax(scale · scores + bias)` over the last dimension, **in place in `scores`** when it
/// is a fresh f32 CPU tensor and nothing tracks gradients; otherwise the differentiable
/// composition.
pub(crate) fn scaled_softmax_into(
    scores: Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let fused = cpu_f32_no_grad(&[&scores])
        && scores.is_contiguous()
        && bias.is_none_or(|b| cpu_f32_no_grad(&[b]));
    if !fused {
        let s = (scores * scale)?;
        let s = match bias {
            Some(b) => s.broadcast_add(b)?,
            None => s,
        };
        return softmax_last_dim(&s);
    }
    softmax::scaled_softmax_inplace(&scores, bias, scale)?;
    Ok(scores)
}

/// Activation functions used by the supported checkpoints, with HF config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (`gelu` in HF configs, erf based).
    #[default]
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(alias = "gelu_new", alias = "gelu_fast")]
    GeluPytorchTanh,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    Relu,
    #[serde(alias = "swish")]
    Silu,
}

impl Activation {
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let train_kernel = match self {
            Activation::Gelu => Some(FusedAct::Gelu),
            Activation::QuickGelu => Some(FusedAct::QuickGelu),
            _ => None,
        };
        if let Some(k) = train_kernel.filter(|_| xs.track_op() && cpu_f32(&[xs])) {
            // Training on the CPU: one parallel pass each way.
            return act::act_train(xs, k);
        }
        match self {
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluPytorchTanh => gelu_tanh(xs),
            Activation::QuickGelu => xs.mul(&sigmoid(&(xs * 1.702)?)?),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
        }
    }
}

impl Activation {
    /// The kernels' version of this activation, `None` for SiLU (which has no fused kernel).
    pub(crate) fn fused(self) -> Option<FusedAct> {
        match self {
            Activation::Gelu => Some(FusedAct::Gelu),
            Activation::GeluPytorchTanh => Some(FusedAct::GeluTanh),
            Activation::QuickGelu => Some(FusedAct::QuickGelu),
            Activation::Relu => Some(FusedAct::Relu),
            Activation::Silu => None,
        }
    }
}

/// The kernels' activation for an optional `act`: `Some(None)` for none, `Some(Some(_))`
/// for one with a fused kernel, `None` when the kernels cannot apply `act`.
pub(crate) fn fused_act(act: Option<Activation>) -> Option<Option<FusedAct>> {
    match act {
        None => Some(None),
        Some(a) => a.fused().map(Some),
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs)
    }
}

/// Additive attention bias from a `[batch, keys]` 0/1 mask: 0 where attended, `neg`
/// where masked, shaped `[batch, 1, 1, keys]` for broadcasting over heads and queries.
pub fn key_padding_bias(mask: &Tensor, neg: f64, dtype: DType) -> Result<Tensor> {
    let (b, k) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    let bias = ((m.ones_like()? - m)? * neg)?;
    bias.to_dtype(dtype)?.reshape((b, 1, 1, k))
}

/// Cross-entropy with integer targets, averaged over the batch; `logits` is `[n, classes]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Cross-entropy against soft targets `[n, classes]` (rows sum to 1), batch mean.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    (logp * targets)?.sum(D::Minus1)?.mean_all()?.neg()
}

/// BatchNorm over `x` `[b, c, h, w]` with the batch's statistics, as in train mode:
/// `(x − mean) / sqrt(var + eps) · weight + bias` with the biased variance, gradients
/// flowing to `x` through the statistics and to `weight` and `bias`. Returns the output
/// and the batch mean and biased variance `[c]` (detached, for the running statistics).
///
/// On the CPU in f32 both passes are one kernel each (per-channel sums over planes, then a
/// per-plane map); elsewhere it is a composition of differentiable primitives.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let n = b * h * w;
    if cpu_f32(&[x]) && n > 0 {
        return norm::batch_norm_train(x, weight, bias, eps);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let sum = |t: &Tensor| -> Result<Tensor> { t.sum_keepdim(0)?.sum_keepdim(2)?.sum_keepdim(3) };
    let mean = (sum(&xf)? / n as f64)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = (sum(&centered.sqr()?)? / n as f64)?;
    let weight = weight.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
    let bias = bias.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
    let scale = weight.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let y = centered.broadcast_mul(&scale)?.broadcast_add(&bias)?;
    Ok((
        y.to_dtype(dtype)?,
        mean.detach().flatten_all()?,
        var.detach().flatten_all()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::max_diff;
    use candle_core::{Device, Var};

    /// Checks the gradient of `f(x)·w` (w fixed random weights) against central finite
    /// differences in f64.
    fn check_grad(name: &str, x0: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let w = Tensor::randn(0f64, 1.0, y.dims(), &dev).unwrap();
        let loss = (&y * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient reached the input"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let flat = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        let eval = |v: &[f64]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), x0.dims(), &dev).unwrap();
            (f(&t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let mut worst = 0f64;
        for i in 0..flat.len() {
            let mut p = flat.clone();
            p[i] += eps;
            let mut m = flat.clone();
            m[i] -= eps;
            let num = (eval(&p) - eval(&m)) / (2.0 * eps);
            worst = worst.max((num - g[i]).abs() / (1.0 + num.abs()));
        }
        assert!(
            worst < 1e-6,
            "{name}: analytic and numeric gradients differ by {worst}"
        );
    }

    fn input(shape: (usize, usize, usize)) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_grad("softmax", &input((2, 3, 5)), softmax_last_dim);
        check_grad("log_softmax", &input((2, 3, 5)), log_softmax_last_dim);
    }

    #[test]
    fn layer_norm_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(1f64, 0.2, 6, &dev).unwrap();
        let b0 = Tensor::randn(0f64, 0.2, 6, &dev).unwrap();
        let x0 = input((2, 3, 6));
        // With respect to the input...
        let ln = LayerNorm::from_tensors(w0.clone(), b0.clone(), 1e-5);
        check_grad("layer_norm dx", &x0, |x| ln.forward(x));
        // ...and to the scale and shift.
        check_grad("layer_norm dweight", &w0, |w| {
            LayerNorm::from_tensors(w.clone(), b0.clone(), 1e-5).forward(&x0)
        });
        check_grad("layer_norm dbias", &b0, |b| {
            LayerNorm::from_tensors(w0.clone(), b.clone(), 1e-5).forward(&x0)
        });
    }

    #[test]
    fn fused_and_composed_paths_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 7, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.2, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 16, &dev).unwrap();
        let fused = LayerNorm::from_tensors(w.clone(), b.clone(), 1e-6)
            .forward(&x)
            .unwrap();
        let composed = layer_norm_composed(&x, &w, &b, 1e-6).unwrap();
        let d = max_diff(&fused, &composed);
        assert!(d < 1e-5, "layer norm paths differ by {d}");
        let fused = softmax_last_dim(&x).unwrap();
        let composed = softmax_composed(&x).unwrap();
        let d = max_diff(&fused, &composed);
        assert!(d < 1e-6, "softmax paths differ by {d}");
    }

    #[test]
    fn training_path_is_taken_when_tracking() {
        // A Var input must produce a graph that reaches the weights: the fused kernels
        // would silently return no gradient.
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones(8, DType::F32, &dev).unwrap()).unwrap();
        let b = Var::zeros(8, DType::F32, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let ln = LayerNorm::from_tensors(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
        let y = softmax_last_dim(&ln.forward(&x).unwrap()).unwrap();
        let loss = y.narrow(1, 0, 1).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (n, v) in [("weight", &w), ("bias", &b)] {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            let s = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(s > 0.0, "zero gradient for {n}");
        }
    }

    #[test]
    fn activations_and_log_sigmoid_gradients() {
        for act in [
            Activation::Gelu,
            Activation::GeluPytorchTanh,
            Activation::QuickGelu,
            Activation::Silu,
        ] {
            check_grad(&format!("{act:?}"), &input((2, 2, 4)), |x| act.apply(x));
        }
        check_grad("log_sigmoid", &input((2, 2, 4)), log_sigmoid);
        check_grad("l2_normalize", &input((2, 2, 4)), l2_normalize);
        // An all-zero row normalises to zero with PyTorch's finite gradient, 1/eps.
        let v = Var::from_tensor(
            &Tensor::new(&[[0f32, 0.0, 0.0], [3.0, 4.0, 0.0]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = l2_normalize(v.as_tensor()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap()[1], [0.6, 0.8, 0.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(g.iter().flatten().all(|x| x.is_finite()), "{g:?}");
        assert_eq!(g[0], [1e12, 1e12, 1e12]);
        // log σ(x) stays finite far from zero.
        let x = Tensor::new(&[-200f32, -20.0, 0.0, 20.0, 200.0], &Device::Cpu).unwrap();
        let v = log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        assert!((v[0] + 200.0).abs() < 1e-3 && v[4].abs() < 1e-6);
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        use crate::nn::attention::scaled_dot_product_attention;
        let dev = Device::Cpu;
        let k = Tensor::randn(0f64, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let v = Tensor::randn(0f64, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 0, 0]], &dev).unwrap();
        let bias = key_padding_bias(&mask, -1e4, DType::F64).unwrap();
        let q0 = Tensor::randn(0f64, 1.0, (1, 2, 3, 4), &dev).unwrap();
        let q3 = q0.reshape((2, 3, 4)).unwrap();
        check_grad("attention dq", &q3, |q| {
            scaled_dot_product_attention(&q.reshape((1, 2, 3, 4))?, &k, &v, Some(&bias), 0.5)
        });
    }
}
