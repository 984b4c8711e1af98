//! Blocked top-k similarity search: the `k` best keys of every query by dot product,
//! without ever holding the full `[queries, keys]` score matrix.
//!
//! Queries go `QUERY_BLOCK` rows at a time against `KEY_BLOCK` keys at a time (one
//! `1024 × 8192` f32 block is 32 MB), and each row keeps a sorted list of its best `k`.
//! Ranking is by score, highest first; **ties keep the lower key index first**, and NaN
//! ranks below every number. For 30k images against 150k texts this holds 32 MB of scores
//! plus `k` candidates per query, where the dense matrix would take 18 GB.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Query rows per block.
pub const QUERY_BLOCK: usize = 1024;
/// Key rows per block.
pub const KEY_BLOCK: usize = 8192;

/// One candidate: a key index and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub index: usize,
    pub score: f32,
}

/// The sort key: NaN lowest, and −0 equal to +0 (so that they tie).
fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// Whether `a` ranks before `b`: higher score, then lower index (NaN lowest).
pub fn ranks_before(a: Hit, b: Hit) -> bool {
    match key(a.score).total_cmp(&key(b.score)) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => a.index < b.index,
    }
}

/// Sorts hits into rank order.
pub fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| {
        key(b.score)
            .total_cmp(&key(a.score))
            .then(a.index.cmp(&b.index))
    });
}

/// Inserts `h` into the sorted list `best` (at most `k` long).
fn offer(best: &mut Vec<Hit>, k: usize, h: Hit) {
    if best.len() == k {
        match best.last() {
            Some(&worst) if ranks_before(h, worst) => {
                best.pop();
            }
            _ => return,
        }
    }
    let pos = best.partition_point(|&b| ranks_before(b, h));
    best.insert(pos, h);
}

/// The `k` best keys of every query (rows of `queries` `[n, d]`) by dot product with the
/// rows of `keys` `[m, d]`, in rank order. `k` is capped at `m`.
pub fn top_k_dot(queries: &Tensor, keys: &Tensor, k: usize) -> Result<Vec<Vec<Hit>>> {
    top_k_dot_blocked(queries, keys, k, QUERY_BLOCK, KEY_BLOCK)
}

/// [`top_k_dot`] with explicit block sizes.
pub fn top_k_dot_blocked(
    queries: &Tensor,
    keys: &Tensor,
    k: usize,
    query_block: usize,
    key_block: usize,
) -> Result<Vec<Vec<Hit>>> {
    let (n, d) = queries.dims2()?;
    let (m, dk) = keys.dims2()?;
    if d != dk {
        return Err(Error::InvalidArgument(format!(
            "queries have dimension {d}, keys {dk}"
        )));
    }
    if k == 0 {
        return Err(Error::InvalidArgument("top-k needs k >= 1".into()));
    }
    let k = k.min(m);
    let q = queries.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let kt = keys.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (qb, kb) = (query_block.max(1), key_block.max(1));
    let mut out: Vec<Vec<Hit>> = Vec::with_capacity(n);
    let mut q0 = 0;
    while q0 < n {
        let qn = qb.min(n - q0);
        let qblock = q.narrow(0, q0, qn)?.contiguous()?;
        let mut best: Vec<Vec<Hit>> = vec![Vec::with_capacity(k + 1); qn];
        let mut k0 = 0;
        while k0 < m {
            let kn = kb.min(m - k0);
            let kblock = kt.narrow(0, k0, kn)?.contiguous()?;
            let s = qblock.matmul(&kblock.t()?)?.contiguous()?;
            let flat = s.flatten_all()?.to_vec1::<f32>()?;
            best.par_iter_mut()
                .zip(flat.par_chunks(kn))
                .for_each(|(b, row)| {
                    for (j, &score) in row.iter().enumerate() {
                        offer(
                            b,
                            k,
                            Hit {
                                index: k0 + j,
                                score,
                            },
                        );
                    }
                });
            k0 += kn;
        }
        out.extend(best);
        q0 += qn;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(q: &[Vec<f32>], keys: &[Vec<f32>], k: usize) -> Vec<Vec<usize>> {
        q.iter()
            .map(|row| {
                let mut hits: Vec<Hit> = keys
                    .iter()
                    .enumerate()
                    .map(|(j, kr)| Hit {
                        index: j,
                        score: row.iter().zip(kr).map(|(a, b)| a * b).sum(),
                    })
                    .collect();
                sort_hits(&mut hits);
                hits.into_iter().take(k).map(|h| h.index).collect()
            })
            .collect()
    }

    #[test]
    fn blocked_equals_dense_with_ties() {
        // Small integers, so that many scores tie exactly.
        let mut rng = 12345u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 33) % 3) as f32 - 1.0
        };
        let (n, m, d) = (37, 53, 4);
        let q: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| next()).collect()).collect();
        let keys: Vec<Vec<f32>> = (0..m).map(|_| (0..d).map(|_| next()).collect()).collect();
        let qt = Tensor::new(q.clone(), &Device::Cpu).unwrap();
        let kt = Tensor::new(keys.clone(), &Device::Cpu).unwrap();
        for (k, qb, kb) in [(5, 8, 7), (10, 1, 1), (60, 100, 100), (1, 5, 13)] {
            let got: Vec<Vec<usize>> = top_k_dot_blocked(&qt, &kt, k, qb, kb)
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(|h| h.index).collect())
                .collect();
            assert_eq!(got, dense(&q, &keys, k), "k {k} blocks {qb}x{kb}");
        }
    }

    #[test]
    fn nan_ranks_last() {
        let mut hits = vec![
            Hit {
                index: 0,
                score: f32::NAN,
            },
            Hit {
                index: 1,
                score: 0.5,
            },
            Hit {
                index: 2,
                score: 0.5,
            },
            Hit {
                index: 3,
                score: -1.0,
            },
        ];
        sort_hits(&mut hits);
        let order: Vec<usize> = hits.iter().map(|h| h.index).collect();
        assert_eq!(order, vec![1, 2, 3, 0]);
    }
}
