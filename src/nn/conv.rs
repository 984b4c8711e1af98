//! Convolutions that are right in both directions, and fast on the CPU.
//!
//! * [`conv3x3`]: a 3×3, padding-1 convolution. On the CPU in `f32` it is an im2col matrix
//!   times the weights (the crate's kernels, each with its backward), elsewhere candle's
//!   `conv2d`.
//! * [`avg_pool`]: PyTorch's `AvgPool2d(k)` with a backward that is right when `k` does not
//!   divide the map.
//!
//! 1×1 convolutions are matrix products (`kernels::gemm::conv1x1`).

use candle_core::{Result, Tensor};

use super::kernels::cpu_f32;
use super::kernels::gemm::conv1x1;
use super::kernels::im2col::Im2Col3x3;
use super::ops::tracks_grad;

/// 2-D average pooling with kernel and stride `k` (PyTorch's `AvgPool2d(k)`, floor). candle's
/// backward of the pool is right only when `k` divides the map, so a map it does not divide
/// is first cropped to the part the pool reads.
pub fn avg_pool(x: &Tensor, k: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (hk, wk) = (h / k * k, w / k * k);
    if hk == 0 || wk == 0 {
        candle_core::bail!("average pool {k}×{k} over a {h}×{w} map")
    }
    let x = if hk == h && wk == w {
        x.clone()
    } else {
        x.narrow(2, 0, hk)?.narrow(3, 0, wk)?
    };
    x.avg_pool2d(k)
}

/// A 3×3 convolution with padding 1 and stride `stride` of `x` `[b, c, h, w]` by `w`
/// `[o, c, 3, 3]`.
///
/// On the CPU in `f32` it is an im2col matrix `[b, c·9, ho·wo]` (`kernels::im2col::Im2Col3x3`, whose
/// backward is the matching col2im) times the flattened weight by the crate's 1×1 product
/// (`conv1x1`, with its own backward). At inference the matrix is built a few images at a
/// time, so it stays small. candle's CPU convolution and its backward (a transposed
/// convolution) are slower, and that backward is wrong for stride 2 when the height and
/// width differ in parity. Elsewhere candle's `conv2d`.
pub fn conv3x3(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    if !cpu_f32(&[x, w]) {
        return x.conv2d(w, 1, stride, 1, 1);
    }
    let (b, c, h, wd) = x.dims4()?;
    let (o, wc, kh, kw) = w.dims4()?;
    if wc != c || kh != 3 || kw != 3 || stride == 0 || h == 0 || wd == 0 {
        candle_core::bail!(
            "3×3 convolution: weight {:?} does not fit input {:?}",
            w.dims(),
            x.dims()
        )
    }
    let op = Im2Col3x3::new(stride);
    let (ho, wo) = op.out_dims(h, wd);
    let w2 = w.reshape((o, c * 9))?;
    let x = x.contiguous()?;
    if tracks_grad(&[&x, w]) {
        return conv1x1(&w2, &x.apply_op1(op)?)?.reshape((b, o, ho, wo));
    }
    // At most about 32 MiB of im2col matrix at a time.
    let per_image = c * 9 * ho * wo * std::mem::size_of::<f32>();
    let chunk = ((32usize << 20) / per_image.max(1)).clamp(1, b.max(1));
    let mut outs = Vec::with_capacity(b.div_ceil(chunk));
    for b0 in (0..b).step_by(chunk) {
        let nb = chunk.min(b - b0);
        let cols = x.narrow(0, b0, nb)?.apply_op1_no_bwd(&op)?;
        outs.push(conv1x1(&w2, &cols)?);
    }
    let y = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 0)?
    };
    y.reshape((b, o, ho, wo))
}
