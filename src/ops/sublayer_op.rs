//! The candle CustomOp shared by the fused pre-norm sublayers (`ffn_fused`, `attn_sublayer`,
//! `mamba2_sublayer`, `gdn_sublayer`): each takes `(x, packed parameters)`, returns a tensor
//! shaped like x, keeps what its backward needs in a [`Stash`] and returns the gradients of both
//! inputs. A sublayer implements [`SublayerKernel`]; [`SublayerOp`] does the dtype dispatch, the
//! slices of the CPU storages and the device check once for all of them.

use super::attn_fused::{contiguous, cpu_slice, Elem};
use super::cpu::Stash;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// One fused sublayer's kernels, over contiguous slices (f32 or f64).
pub(super) trait SublayerKernel: Send + Sync + 'static {
    const NAME: &'static str;
    /// Errors unless x's and the packed parameters' layouts fit the sublayer.
    fn check(&self, x: &Layout, p: &Layout) -> Result<()>;
    /// Where the forward keeps its buffers for the backward.
    fn stash(&self) -> &Stash;
    /// The output (shaped like x); stashes what the backward reads.
    fn forward<T: Elem>(&self, x: &[T], p: &[T]) -> Result<Vec<T>>;
    /// `(dx, dp)` from the inputs, the stashed buffers (in the order they were put) and dy.
    fn backward<T: Elem>(&self, x: &[T], p: &[T], saved: &[&[T]], dy: &[T]) -> Result<(Vec<T>, Vec<T>)>;
}

/// The op: `x.apply_op2(&p, SublayerOp(kernel))`.
pub(super) struct SublayerOp<K>(pub K);

impl<K: SublayerKernel> SublayerOp<K> {
    fn grads<T: Elem>(&self, x: &Tensor, p: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let guards: Vec<_> = [x, p, dy].iter().map(|t| t.storage_and_layout()).collect();
        let sl = guards.iter().map(|(st, l)| cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
        let (dx, dp) = self.0.stash().with_parts(|s| self.0.backward(sl[0], sl[1], s, sl[2]))??;
        drop(sl);
        drop(guards);
        Ok((Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dp, p.shape(), p.device())?))
    }
}

impl<K: SublayerKernel> CustomOp2 for SublayerOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.check(l1, l2)?;
        let y = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(p)) => CpuStorage::F32(self.0.forward(contiguous(x, l1)?, contiguous(p, l2)?)?),
            (CpuStorage::F64(x), CpuStorage::F64(p)) => CpuStorage::F64(self.0.forward(contiguous(x, l1)?, contiguous(p, l2)?)?),
            _ => bail!("{}: inputs must both be f32 or both f64; got {:?}, {:?}", K::NAME, s1.dtype(), s2.dtype()),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.device().is_cpu() {
            bail!("{}: CPU only, got inputs on {:?}", K::NAME, x.device().location());
        }
        let dy = dy.contiguous()?;
        let (dx, dp) = match x.dtype() {
            DType::F32 => self.grads::<f32>(x, p, &dy)?,
            DType::F64 => self.grads::<f64>(x, p, &dy)?,
            dt => bail!("{}: unsupported dtype {dt:?}", K::NAME),
        };
        Ok((Some(dx), Some(dp)))
    }
}
