//! The chunked ("state space dual") form of the `ssd` op (Dao & Gu 2024, arXiv:2405.21060, §6
//! and Listing 1; `../shared/reference/mixers.md` §2). Semantics and layout: [`super::ssd`].

use super::ssd::{check_shapes, groups_to_heads};
use candle_core::{DType, Result, Tensor};

/// mamba_ssm's and fla's Mamba2 chunk size.
pub const DEFAULT_CHUNK: usize = 256;

/// Chunked SSD. Same inputs and outputs as [`super::ssd::ssd_recurrent`]; T is zero-padded to a
/// multiple of the chunk Q = min(chunk, T) (padded tokens have dt = 0 and x = 0: they leave the
/// state unchanged and their outputs are dropped).
///
/// With a_t = dt_t·A (log-decay, ≤ 0), X_t = dt_t·x_t and, inside a chunk, the segment sums
/// `seg_ij = Σ_{j<k≤i} a_k` (so `seg_{Q−1,j}` is the decay from token j to the chunk's end and
/// `acum_i = Σ_{k≤i} a_k` the decay from the chunk's start):
/// 1. intra-chunk: `Y_diag = ((C Bᵀ) ⊙ L) X` with `L_ij = exp(seg_ij)` for j ≤ i, else 0;
/// 2. chunk states: `S_c = Σ_j exp(seg_{Q−1,j}) X_j B_jᵀ`;
/// 3. across chunks, sequentially: `S_in[c+1] = exp(acum_{Q−1})·S_in[c] + S_c`, S_in[0] = h_0;
/// 4. state to output: `Y_off_i = exp(acum_i)·S_in[c] C_i`; `Y = Y_diag + Y_off`.
///
/// Stability: the segment sums are formed as differences of in-chunk cumulative sums computed in
/// f64 (so `acum_i − acum_j` carries no cancellation error even when one token's decay is huge),
/// masked to the causal triangle *before* exp (entries above the diagonal, which may be large and
/// positive, never reach exp), and only then cast to the compute dtype and exponentiated. No
/// exp of a cumulative sum is ever taken as a ratio `exp(acum_i)/exp(acum_j)`.
///
/// Cost per token and head (multiply-adds): Q·N (C Bᵀ) + Q·P (mixing X) + 2·P·N (chunk state
/// and state-to-output) + P·N/Q (the chunk recurrence); element-wise work is not counted.
pub fn ssd_chunked(x: &Tensor, dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, s0: Option<&Tensor>, chunk: usize) -> Result<(Tensor, Tensor)> {
    check_shapes(x, dt, a, bm, cm, s0)?;
    if chunk == 0 {
        candle_core::bail!("ssd: chunk size must be at least 1");
    }
    let (b, t, h, p) = x.dims4()?;
    let n = bm.dim(3)?;
    let xdt = x.dtype();
    let ct = super::reduction_dtype(xdt);
    let dev = x.device();
    let s0 = match s0 {
        Some(s) => s.to_dtype(ct)?,
        None => Tensor::zeros((b, h, p, n), ct, dev)?,
    };
    if t == 0 {
        return Ok((x.clone(), s0));
    }
    let q = chunk.min(t);
    let nc = t.div_ceil(q);
    let pad = nc * q - t;
    let m = nc * b * h;
    // [B,T,H,X] → [Nc·B·H, Q, X] (chunk-major, so chunk c is rows c·B·H .. (c+1)·B·H).
    let to_chunks4 = |z: &Tensor| -> Result<Tensor> {
        let z = z.to_dtype(ct)?.pad_with_zeros(1, 0, pad)?;
        let d = z.dim(3)?;
        z.reshape((b, nc, q, h, d))?.permute((1, 0, 3, 2, 4))?.contiguous()?.reshape((m, q, d))
    };
    let dt = dt.to_dtype(ct)?.pad_with_zeros(1, 0, pad)?.reshape((b, nc, q, h))?.permute((1, 0, 3, 2))?.contiguous()?; // [Nc,B,H,Q]
    let la = dt.broadcast_mul(&a.to_dtype(ct)?.reshape((1, 1, h, 1))?)?.reshape((m, q))?; // a = dt·A
    let dt = dt.reshape((m, q))?;
    let xs = to_chunks4(x)?.broadcast_mul(&dt.unsqueeze(2)?)?; // X = dt·x  [M,Q,P]
    let bh = to_chunks4(&groups_to_heads(bm, h)?)?; // [M,Q,N]
    let ch = to_chunks4(&groups_to_heads(cm, h)?)?; // [M,Q,N]

    // Segment sums in f64: acum = cumsum(a), seg_ij = acum_i − acum_j, masked to j ≤ i.
    let f64dt = DType::F64;
    let tril = Tensor::tril2(q, f64dt, dev)?; // 1 for j ≤ i
    let acum = la.to_dtype(f64dt)?.matmul(&Tensor::triu2(q, f64dt, dev)?)?; // [M,Q]
    let seg = acum.unsqueeze(2)?.broadcast_sub(&acum.unsqueeze(1)?)?.broadcast_mul(&tril)?; // [M,Q,Q]
    let l = seg.to_dtype(ct)?.exp()?.broadcast_mul(&tril.to_dtype(ct)?)?; // L (0 above the diagonal)
    let to_end = seg.narrow(1, q - 1, 1)?.squeeze(1)?.to_dtype(ct)?.exp()?; // exp(seg_{Q−1,j})  [M,Q]
    let from_start = acum.to_dtype(ct)?.exp()?; // exp(acum_i)  [M,Q]
    let chunk_decay = acum.narrow(1, q - 1, 1)?.to_dtype(ct)?.exp()?.reshape((nc, b * h, 1, 1))?;

    // 1. intra-chunk.
    let y_diag = ch.matmul(&bh.transpose(1, 2)?.contiguous()?)?.mul(&l)?.matmul(&xs)?; // [M,Q,P]
    // 2. chunk states: (X ⊙ to_end)ᵀ B.
    let states = xs.broadcast_mul(&to_end.unsqueeze(2)?)?.transpose(1, 2)?.contiguous()?.matmul(&bh)?.reshape((nc, b * h, p, n))?;
    // 3. across chunks.
    let mut s = s0.reshape((b * h, p, n))?;
    let mut s_in = Vec::with_capacity(nc);
    for c in 0..nc {
        s_in.push(s.clone());
        s = (s.broadcast_mul(&chunk_decay.get(c)?)? + states.get(c)?)?;
    }
    let s_in = Tensor::stack(&s_in, 0)?.reshape((m, p, n))?;
    // 4. state to output.
    let y_off = ch.broadcast_mul(&from_start.unsqueeze(2)?)?.matmul(&s_in.transpose(1, 2)?.contiguous()?)?; // [M,Q,P]
    let y = (y_diag + y_off)?.reshape((nc, b, h, q, p))?.permute((1, 0, 3, 2, 4))?.reshape((b, nc * q, h, p))?;
    let y = y.narrow(1, 0, t)?.to_dtype(xdt)?;
    Ok((y, s.reshape((b, h, p, n))?))
}
