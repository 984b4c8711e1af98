//! PyTorch's `affine_grid` and bilinear `grid_sample` (zero padding, `align_corners=False`),
//! the pieces of BriVL's RoI grid pooling.
//!
//! `grid_sample` is written as a product with a sampling matrix: every output point takes at
//! most four input pixels with bilinear weights, and pixels outside the input contribute zero.
//! The matrix is computed from the grid's values, so the result is differentiable with
//! respect to the **input** (the feature map, whose backbone trains) and treats the grid as a
//! constant, as BriVL does (its boxes are detached).

use candle_core::{DType, Device, Result, Tensor};

/// The normalised coordinates `-1 + (2i + 1)/n` of `n` pixel centres
/// (`align_corners=False`), as `torch.linspace(-1, 1, n) * (n - 1) / n` computes them in f32.
fn base_coords(n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![0.0];
    }
    let step = 2.0f32 / (n as f32 - 1.0);
    (0..n)
        .map(|i| {
            // torch.linspace fills the first half from the start and the second from the end.
            let v = if i < n / 2 {
                -1.0 + step * i as f32
            } else {
                1.0 - step * (n - 1 - i) as f32
            };
            v * (n as f32 - 1.0) / n as f32
        })
        .collect()
}

/// `torch.nn.functional.affine_grid(theta, (n, c, out_h, out_w), align_corners=False)`:
/// `theta` `[n, 2, 3]` to a sampling grid `[n, out_h, out_w, 2]` of `(x, y)` in `[-1, 1]`
/// coordinates. Differentiable with respect to `theta`.
pub fn affine_grid(theta: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, r, c) = theta.dims3()?;
    if r != 2 || c != 3 {
        candle_core::bail!(
            "affine_grid expects theta [n, 2, 3], got {:?}",
            theta.dims()
        )
    }
    let xs = base_coords(out_w);
    let ys = base_coords(out_h);
    let mut base = Vec::with_capacity(out_h * out_w * 3);
    for &y in &ys {
        for &x in &xs {
            base.extend_from_slice(&[x, y, 1.0]);
        }
    }
    let base =
        Tensor::from_vec(base, (1, out_h * out_w, 3), theta.device())?.to_dtype(theta.dtype())?;
    base.broadcast_matmul(&theta.transpose(1, 2)?)?
        .reshape((n, out_h, out_w, 2))
}

/// Bilinear sampling weights of one point: up to four `(flat input index, weight)` pairs,
/// with PyTorch's `align_corners=False` unnormalisation and zero padding (taps outside the
/// input are dropped).
pub fn bilinear_taps(x: f32, y: f32, h: usize, w: usize) -> [(usize, f32); 4] {
    let mut out = [(0usize, 0f32); 4];
    if !x.is_finite() || !y.is_finite() {
        return out;
    }
    let ix = ((x + 1.0) * w as f32 - 1.0) / 2.0;
    let iy = ((y + 1.0) * h as f32 - 1.0) / 2.0;
    let x0 = ix.floor();
    let y0 = iy.floor();
    let tx = ix - x0;
    let ty = iy - y0;
    let corners = [
        (x0, y0, (1.0 - tx) * (1.0 - ty)),
        (x0 + 1.0, y0, tx * (1.0 - ty)),
        (x0, y0 + 1.0, (1.0 - tx) * ty),
        (x0 + 1.0, y0 + 1.0, tx * ty),
    ];
    for (slot, &(cx, cy, wt)) in out.iter_mut().zip(corners.iter()) {
        if cx >= 0.0 && cy >= 0.0 && cx < w as f32 && cy < h as f32 {
            *slot = (cy as usize * w + cx as usize, wt);
        }
    }
    out
}

/// The sampling matrices `[n, out_h·out_w, h·w]` of a grid `[n, out_h, out_w, 2]` over an
/// `h × w` input, in `dtype` on `device`. Row `p` holds the bilinear weights of output
/// point `p`.
pub fn sampling_matrix(
    grid: &Tensor,
    h: usize,
    w: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let (n, gh, gw, two) = grid.dims4()?;
    if two != 2 {
        candle_core::bail!("grid must be [n, h, w, 2], got {:?}", grid.dims())
    }
    let g = grid.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let rows = gh * gw;
    let mut m = vec![0f32; n * rows * h * w];
    for (p, xy) in g.chunks_exact(2).enumerate() {
        let row = &mut m[p * h * w..(p + 1) * h * w];
        for (idx, wt) in bilinear_taps(xy[0], xy[1], h, w) {
            row[idx] += wt;
        }
    }
    Tensor::from_vec(m, (n, rows, h * w), device)?.to_dtype(dtype)
}

/// `torch.nn.functional.grid_sample(input, grid, mode='bilinear', padding_mode='zeros',
/// align_corners=False)`: `input` `[n, c, h, w]`, `grid` `[n, out_h, out_w, 2]` to
/// `[n, c, out_h, out_w]`. Differentiable with respect to `input`; the grid is a constant.
pub fn grid_sample(input: &Tensor, grid: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = input.dims4()?;
    let (gn, gh, gw, _) = grid.dims4()?;
    if gn != n {
        candle_core::bail!("grid batch {gn} differs from input batch {n}")
    }
    let m = sampling_matrix(grid, h, w, input.dtype(), input.device())?;
    input
        .reshape((n, c, h * w))?
        .matmul(&m.transpose(1, 2)?.contiguous()?)?
        .reshape((n, c, gh, gw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_theta_reproduces_the_input() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24.0, &dev)?.reshape((1, 2, 3, 4))?;
        let theta = Tensor::new(&[[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0]]], &dev)?;
        let grid = affine_grid(&theta, 3, 4)?;
        let y = grid_sample(&x, &grid)?;
        let d = (y - &x)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn taps_outside_are_zero() {
        // x = -1 maps to pixel -0.5: half the weight falls outside.
        let taps = bilinear_taps(-1.0, 0.0, 4, 4);
        let total: f32 = taps.iter().map(|t| t.1).sum();
        assert!((total - 0.5).abs() < 1e-6, "{total}");
        let far = bilinear_taps(5.0, 5.0, 4, 4);
        assert!(far.iter().all(|t| t.1 == 0.0));
    }
}
