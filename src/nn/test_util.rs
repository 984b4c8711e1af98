//! Helpers shared by the unit tests of the building blocks.

use candle_core::{Device, Tensor};

/// A seeded tensor of uniform values in `[-1, 1)`.
pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product::<usize>();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest absolute difference of two tensors of the same shape.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The gradients of `Σ a·p` and of `Σ b·p` for one seeded random probe `p`: two
/// computations of the same values compared through their backward passes.
pub(crate) fn probe_grads(
    a: &Tensor,
    b: &Tensor,
    seed: u64,
) -> (
    candle_core::backprop::GradStore,
    candle_core::backprop::GradStore,
) {
    let probe = randn(a.dims(), seed);
    let grads = |t: &Tensor| (t * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    (grads(a), grads(b))
}

/// The gradients of `Σ y ⊙ g`.
pub(crate) fn grads_of(y: &Tensor, g: &Tensor) -> candle_core::backprop::GradStore {
    (y * g).unwrap().sum_all().unwrap().backward().unwrap()
}
