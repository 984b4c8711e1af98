//! im2col for 3×3, padding-1 convolutions (CLIP's modified ResNet) on the CPU in `f32`,
//! with col2im as its backward. The product with the weights is [`super::gemm::conv1x1`].

use candle_core::{Result, Tensor};

use super::{contiguous_f32, with_f32};

/// im2col of a 3×3, padding-1 convolution with stride `stride` on the CPU in `f32`:
/// `[b, c, h, w]` to `[b, c·9, ho·wo]`, rows in the order of the flattened weight
/// `(channel, ky, kx)`, parallel over input planes. Its backward is col2im: each input
/// plane sums the nine rows it was copied to.
pub(crate) struct Im2Col3x3 {
    stride: usize,
}

impl Im2Col3x3 {
    pub(crate) fn new(stride: usize) -> Self {
        Self { stride }
    }

    /// The output height and width for an `h × w` input.
    pub(crate) fn out_dims(&self, h: usize, w: usize) -> (usize, usize) {
        ((h - 1) / self.stride + 1, (w - 1) / self.stride + 1)
    }

    /// Calls `f(input_range, output_range)` for each run of copied elements between one
    /// `h × w` input plane and its nine `ho × wo` tap rows: output columns `lo..hi` of output
    /// row `oy` of tap `(ky, kx)` read input row `oy·s + ky − 1`, columns `ox·s + kx − 1`
    /// (every `s`-th element of the input range).
    #[inline]
    fn for_each_run(
        &self,
        (h, w): (usize, usize),
        (ho, wo): (usize, usize),
        mut f: impl FnMut(std::ops::Range<usize>, std::ops::Range<usize>),
    ) {
        let s = self.stride;
        for ky in 0..3 {
            for kx in 0..3 {
                let tap = (ky * 3 + kx) * ho * wo;
                // Output columns whose input column `ox·s + kx − 1` is inside the plane.
                let lo = (1 - kx.min(1)).div_ceil(s);
                let hi = (w + 1 - kx).div_ceil(s).min(wo);
                if lo >= hi {
                    continue;
                }
                let ix0 = lo * s + kx - 1;
                let len = (hi - lo - 1) * s + 1;
                for oy in 0..ho {
                    let Some(iy) = (oy * s + ky).checked_sub(1).filter(|&r| r < h) else {
                        continue;
                    };
                    let i0 = iy * w + ix0;
                    let o0 = tap + oy * wo;
                    f(i0..i0 + len, o0 + lo..o0 + hi);
                }
            }
        }
    }
}

impl candle_core::CustomOp1 for Im2Col3x3 {
    fn name(&self) -> &'static str {
        "im2col-3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (b, c, h, w) = layout.shape().dims4()?;
        if h == 0 || w == 0 || self.stride == 0 {
            candle_core::bail!("im2col: empty {h}×{w} plane or stride {}", self.stride)
        }
        let src = contiguous_f32(storage, layout, "im2col")?;
        let (ho, wo) = self.out_dims(h, w);
        let plane = ho * wo;
        let s = self.stride;
        let mut cols = vec![0f32; b * c * 9 * plane];
        cols.par_chunks_mut(9 * plane)
            .zip(src.par_chunks(h * w))
            .for_each(|(dst, input)| {
                self.for_each_run((h, w), (ho, wo), |src_r, dst_r| {
                    if s == 1 {
                        dst[dst_r].copy_from_slice(&input[src_r]);
                    } else {
                        let src = input[src_r].iter().step_by(s);
                        dst[dst_r].iter_mut().zip(src).for_each(|(d, v)| *d = *v);
                    }
                })
            });
        Ok((candle_core::CpuStorage::F32(cols), (b, c * 9, plane).into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (b, c, h, w) = arg.dims4()?;
        let (ho, wo) = self.out_dims(h, w);
        let plane = ho * wo;
        let s = self.stride;
        let grad = grad.contiguous()?;
        let mut dx = vec![0f32; b * c * h * w];
        with_f32(&grad, "col2im", |g| {
            dx.par_chunks_mut(h * w)
                .zip(g.par_chunks(9 * plane))
                .for_each(|(dst, rows)| {
                    self.for_each_run((h, w), (ho, wo), |dst_r, src_r| {
                        let dst = dst[dst_r].iter_mut().step_by(s);
                        dst.zip(&rows[src_r]).for_each(|(d, v)| *d += *v);
                    })
                })
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, c, h, w), arg.device())?))
    }
}
