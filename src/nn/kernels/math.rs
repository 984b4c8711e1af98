//! Scalar `f32` functions written without branches or library calls, so that the loops of
//! the kernels over them vectorise: one `exp`, `erf`, and the activations with their
//! derivatives.

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `e^x` for `x` in f32 (Cephes' `expf`: about 1 ulp), written without branches or library
/// calls so that loops over it vectorise. Inputs are clamped to `[-87.3, 88]`, where the
/// result stays a normal number.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Round to nearest by adding and subtracting 1.5 · 2^23.
    const ROUND: f32 = 12_582_912.0;
    // Comparisons rather than `clamp` (whose NaN rules keep loops from vectorising); a NaN
    // passes through both.
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.3 { -87.3 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The rounded `n` sits in the low mantissa bits of `shifted`: read it from there rather
    // than with `as i32`, whose saturating conversion does not vectorise.
    let ni = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// erf(x) (Abramowitz and Stegun 7.1.26, absolute error below 1.5e-7 plus rounding).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = 1.0 - p * exp(-a * a);
    e.copysign(x)
}

/// `tanh(√(2/π)(x + c·x³))` of the tanh GELU, as `1 − 2 / (exp(2z) + 1)`, exact at both
/// saturations.
#[inline(always)]
fn gelu_tanh_inner(x: f32) -> f32 {
    let z = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    1.0 - 2.0 / (exp(2.0 * z) + 1.0)
}

/// Tanh-approximated GELU.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + gelu_tanh_inner(x))
}

/// d/dx ½x(1+t) = ½(1+t) + ½x(1−t²)·√(2/π)(1+3c·x²), t = tanh(√(2/π)(x+c·x³)).
#[inline(always)]
pub(crate) fn gelu_tanh_grad(x: f32) -> f32 {
    let t = gelu_tanh_inner(x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
}

/// Exact (erf) GELU.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d/dx ½x(1 + erf(x/√2)) = ½(1 + erf(x/√2)) + x·φ(x).
#[inline(always)]
pub(crate) fn gelu_erf_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

/// `x · sigmoid(1.702 x)` (OpenAI CLIP).
#[inline(always)]
pub(crate) fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

/// `s + 1.702·x·s·(1 − s)` for `s = sigmoid(1.702 x)`.
#[inline(always)]
pub(crate) fn quick_gelu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-1.702 * x));
    s + 1.702 * x * s * (1.0 - s)
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + exp(-v))
}

/// `silu'(z) = s + z·s·(1 − s)` for `s = sigmoid(z)`.
#[inline(always)]
pub(crate) fn silu_grad(z: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-z));
    s + z * s * (1.0 - s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert!(silu(-200.0).abs() < 1e-30);
        assert_eq!(silu(200.0), 200.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
