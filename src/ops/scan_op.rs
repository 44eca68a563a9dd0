//! The CustomOp plumbing shared by the fused CPU scan kernels (`gdr_fused`, `ssd_fused`,
//! `rwkv7_fused`): each kernel is three packed f32/f64 inputs, a forward that returns
//! `[o | final state | checkpoints]` and a backward from the checkpoints and the gradient of
//! `[o | final state]`. [`ScanOp`] runs a [`ScanKernel`] as a candle `CustomOp3`: it dispatches on
//! the dtype, exposes `[o | final state]` and keeps the checkpoints in a [`Stash`]. It has no
//! `cuda_fwd`: each kernel's public entry point applies it only where its `supported(..)` check
//! (CPU, f32/f64) passes, and the `*_train` forms fall back to the composed chunked ops elsewhere.

use super::attn_fused::{contiguous, cpu_slice, Elem};
use super::cpu::Stash;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::marker::PhantomData;

/// One fused scan: sizes, forward and backward over plain slices.
pub(super) trait ScanKernel: Send + Sync + 'static {
    type Dims: Copy;
    /// The op name (errors and profiles).
    const NAME: &'static str;
    /// Sizes from the shapes of the first two inputs.
    fn dims(s1: &Shape, s2: &Shape) -> Result<Self::Dims>;
    /// Length of the exposed output `[o | final state]`.
    fn out_len(d: Self::Dims) -> usize;
    /// `[o | final state | checkpoints]` from the three inputs.
    fn forward<T: Elem>(d: Self::Dims, a: &[T], b: &[T], c: &[T]) -> Vec<T>;
    /// Gradients of the three inputs from the inputs, the checkpoints and the gradient of
    /// `[o | final state]`.
    fn backward<T: Elem>(d: Self::Dims, a: &[T], b: &[T], c: &[T], ck: &[T], grad: &[T]) -> (Vec<T>, Vec<T>, Vec<T>);
}

/// A [`ScanKernel`] as a candle op (CPU, f32/f64).
pub(super) struct ScanOp<K> {
    /// The state checkpoints of the forward (see [`Stash`]).
    ck: Stash,
    kernel: PhantomData<K>,
}

impl<K> Default for ScanOp<K> {
    fn default() -> Self {
        Self { ck: Stash::default(), kernel: PhantomData }
    }
}

impl<K: ScanKernel> ScanOp<K> {
    fn grads<T: Elem>(&self, d: K::Dims, a: &Tensor, b: &Tensor, c: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let guards: Vec<_> = [a, b, c, grad].iter().map(|t| t.storage_and_layout()).collect();
        let sl = guards.iter().map(|(st, l)| cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
        let (ga, gb, gc) = self.ck.with(|ck| K::backward(d, sl[0], sl[1], sl[2], ck, sl[3]))?;
        drop(sl);
        drop(guards);
        let dev = a.device();
        Ok((Tensor::from_vec(ga, a.shape(), dev)?, Tensor::from_vec(gb, b.shape(), dev)?, Tensor::from_vec(gc, c.shape(), dev)?))
    }
}

impl<K: ScanKernel> CustomOp3 for ScanOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = K::dims(l1.shape(), l2.shape())?;
        let keep = K::out_len(d);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => self.ck.keep_tail(K::forward(d, contiguous(a, l1)?, contiguous(b, l2)?, contiguous(c, l3)?), keep),
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => self.ck.keep_tail(K::forward(d, contiguous(a, l1)?, contiguous(b, l2)?, contiguous(c, l3)?), keep),
            _ => bail!("{}: inputs must all be f32 or all f64; got {:?}, {:?}, {:?}", K::NAME, s1.dtype(), s2.dtype(), s3.dtype()),
        };
        Ok((out, Shape::from(keep)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !a.device().is_cpu() {
            bail!("{}: CPU only, got inputs on {:?}", K::NAME, a.device().location());
        }
        let d = K::dims(a.shape(), b.shape())?;
        let grad = grad.contiguous()?;
        let (ga, gb, gc) = match a.dtype() {
            DType::F32 => self.grads::<f32>(d, a, b, c, &grad)?,
            DType::F64 => self.grads::<f64>(d, a, b, c, &grad)?,
            dt => bail!("{}: unsupported dtype {dt:?}", K::NAME),
        };
        Ok((Some(ga), Some(gb), Some(gc)))
    }
}
