//! Mixture-of-experts feed-forward (DeepSeekMoE / Switch / GShard; `../shared/reference/mixers.md` §8).
//!
//! `y = Σ_shared FFN_s(x) + Σ_{i ∈ TopK} g_i · FFN_i(x)` with SwiGLU experts.
//!
//! **Routing.** Router logits `ℓ = x·W_r` (`[d, E]`, computed in f32/f64). Scores are
//! `softmax(ℓ)` (Switch, DeepSeek-V2) or `sigmoid(ℓ)` (DeepSeek-V3). The K experts are chosen by
//! `score + b` where `b` is the auxiliary-loss-free selection bias (zero unless
//! `balance.bias_update_rate > 0`; it never enters the gate values, as `original_scores` in
//! DeepSeek-V3 `inference/model.py::Gate.forward`). Gates are the selected *unbiased* scores,
//! divided by their sum when `normalize_top_k` (default for sigmoid), times `route_scale`. Ties go
//! to the lower expert index.
//!
//! **Capacity.** With `capacity_factor = c` each expert keeps at most `ceil(c·N·K/E)` of the
//! micro-batch's N tokens; slots are granted in rank-major order (every token's first choice
//! before any second choice, as GShard) and then token order; a dropped slot contributes nothing
//! (the token keeps its residual path). Without it routing is dropless.
//!
//! **Dispatch (efficient form).** The kept (token, expert) slots are grouped by expert; each
//! expert gathers only its tokens (`index_select`), runs its SwiGLU on them, and the outputs are
//! concatenated in expert order plus one zero row. The combine is a single gather of that matrix
//! by each slot's position (dropped slots point at the zero row), reshaped `[N, K, d]`, weighted by
//! the gates and summed over K. Every op here has an exact candle backward (`index_select`'s is
//! `index_add`; no `scatter_add`, whose backward is wrong in candle 0.11). Expert compute is
//! proportional to N·K, not N·E. (Backward: each expert's `index_select` adds its rows into the
//! running input gradient — candle's `index_add` copies that `[N, d]` tensor — so the backward
//! moves O(E·N·d) memory besides the O(N·K·d·h) expert FLOPs; negligible for E ≲ 6h.)
//! [`Moe::forward_dense_reference`] computes every expert on
//! every token with a dense `[N, E]` gate matrix; tests compare the two, values and gradients.
//!
//! **Balancing losses** (returned, added to the training loss by the caller):
//! - Switch/GShard auxiliary loss `α·E·Σ_i f_i·P_i`, `f_i` = fraction of routed slots (selected,
//!   before drops) given to expert i (no gradient), `P_i` = mean over tokens of the full
//!   probability of expert i (softmax; for sigmoid scores the per-token normalized scores
//!   `s_i/Σ_j s_j`, as DeepSeek-V3's balance loss). Statistics per micro-batch, per sequence
//!   (mean over sequences of the per-sequence loss) or global batch (f from counts accumulated
//!   over the optimizer step's micro-batches so far, as Megatron's `global_aux_loss`, reset by
//!   [`Moe::begin_step`]). Equals α at perfect balance.
//! - Router z-loss (ST-MoE, Zoph et al. 2022): `coef · mean_t logsumexp(ℓ_t)²`.
//! - Auxiliary-loss-free update (DeepSeek-V3; Wang et al. arXiv:2408.15664), after each step,
//!   from the whole step's selection counts: `b_i += γ·sign(mean load − load_i)`.

use crate::ops::moe_experts::{moe_experts, SlotPlan};
use super::ffn::Ffn;
use super::params::ParamBuilder;
use crate::config::model::FfnKind;
use crate::config::moe::{BalanceStats, MoeSpec, RouterScore};
use crate::ops::reduction_dtype;
use crate::ops::softmax::softmax_last_dim;
use candle_core::{DType, Result, Tensor, Var, D};
use std::sync::Mutex;

/// A layer's feed-forward: dense or mixture of experts.
pub enum FeedForward {
    Dense(Ffn),
    Moe(Moe),
}

/// Routing statistics of one MoE forward (plain numbers, no graph).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteStats {
    /// Routed slots selected per expert (before capacity drops).
    pub selected: Vec<f64>,
    /// Slots dropped by the capacity limit.
    pub dropped: usize,
    /// All routed slots (N·K).
    pub slots: usize,
    /// Value of the auxiliary loss term (coefficient included; 0 when off).
    pub aux_loss: f64,
    /// Value of the z-loss term (coefficient included; 0 when off).
    pub z_loss: f64,
}

/// Output of one MoE forward.
pub struct MoeOutput {
    pub y: Tensor,
    /// Auxiliary balance loss + z-loss (scalar, coefficients included), when any is on.
    pub loss: Option<Tensor>,
    pub stats: RouteStats,
}

struct Expert {
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

impl Expert {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::swiglu::swiglu(&x.matmul(&self.w_gate)?, &x.matmul(&self.w_up)?)?.matmul(&self.w_down)
    }
}

/// The routing decision for a micro-batch (plain indices).
struct Routing {
    /// Selected experts, `[N·K]` row-major (token, rank).
    chosen: Vec<u32>,
    /// Per expert, the tokens it processes (kept slots), in token order.
    tokens: Vec<Vec<u32>>,
    /// Per slot (token, rank): row in the concatenated expert outputs, or `kept` (the zero row).
    pos: Vec<u32>,
    kept: usize,
    selected: Vec<f64>,
}

pub struct Moe {
    pub spec: MoeSpec,
    d: usize,
    hidden: usize,
    router: Tensor,
    bias: Option<Var>,
    experts: Vec<Expert>,
    shared: Option<Ffn>,
    /// (selection counts, micro-batches) accumulated since [`Moe::begin_step`] (global-batch stats).
    running: Mutex<(Vec<f64>, usize)>,
}

impl Moe {
    /// Parameters: `router` `[d, E]`, `experts.<i>.{w_gate,w_up,w_down}`, `shared.*` (one fused
    /// SwiGLU of width num_shared·h, identical to the sum of the shared experts) and, with the
    /// bias update on, the buffer `router_bias` `[E]`.
    pub fn new(spec: &MoeSpec, d: usize, hidden: usize, std: f64, out_std: f64, pb: &mut ParamBuilder) -> Result<Self> {
        let e = spec.num_experts;
        let router = pb.normal("router", &[d, e], std)?;
        let bias = if spec.balance.bias_update_rate > 0.0 { Some(pb.buffer("router_bias", &[e], 0.0)?) } else { None };
        let mut experts = Vec::with_capacity(e);
        for i in 0..e {
            let mut p = pb.pp(format!("experts.{i}"));
            experts.push(Expert {
                w_gate: p.normal("w_gate", &[d, hidden], std)?,
                w_up: p.normal("w_up", &[d, hidden], std)?,
                w_down: p.normal("w_down", &[hidden, d], out_std)?,
            });
        }
        let shared = match spec.num_shared_experts {
            0 => None,
            s => Some(Ffn::new(FfnKind::Swiglu, d, s * hidden, std, out_std, &mut pb.pp("shared"))?),
        };
        Ok(Self { spec: spec.clone(), d, hidden, router, bias, experts, shared, running: Mutex::new((vec![0.0; e], 0)) })
    }

    /// Forward FLOPs per token: router 2·d·E + K routed experts + shared experts (6·d·h each).
    pub fn flops_per_token(&self) -> f64 {
        let expert = 6.0 * (self.d * self.hidden) as f64;
        2.0 * (self.d * self.spec.num_experts) as f64 + (self.spec.top_k + self.spec.num_shared_experts) as f64 * expert
    }

    /// Parameters used per token: router + K routed + shared experts.
    pub fn active_params(&self) -> usize {
        self.d * self.spec.num_experts + (self.spec.top_k + self.spec.num_shared_experts) * 3 * self.d * self.hidden
    }

    /// All parameters (the selection-bias buffer excluded).
    pub fn total_params(&self) -> usize {
        self.d * self.spec.num_experts + (self.spec.num_experts + self.spec.num_shared_experts) * 3 * self.d * self.hidden
    }

    /// Starts a new optimizer step (resets the global-batch counts).
    pub fn begin_step(&self) {
        let mut r = self.running.lock().expect("moe stats lock");
        r.0.iter_mut().for_each(|c| *c = 0.0);
        r.1 = 0;
    }

    /// The auxiliary-loss-free update from one step's selection counts per expert.
    pub fn update_bias(&self, selected: &[f64]) -> Result<()> {
        let Some(bias) = &self.bias else { return Ok(()) };
        let mean = selected.iter().sum::<f64>() / selected.len() as f64;
        let g = self.spec.balance.bias_update_rate;
        let step: Vec<f64> = selected.iter().map(|&c| g * sign(mean - c)).collect();
        let delta = Tensor::from_vec(step, selected.len(), bias.device())?.to_dtype(bias.dtype())?;
        bias.set(&(bias.as_tensor().detach() + delta)?)
    }

    /// The current selection bias (zeros when the update is off).
    pub fn selection_bias(&self) -> Result<Vec<f64>> {
        match &self.bias {
            Some(b) => b.as_tensor().to_dtype(DType::F64)?.to_vec1(),
            None => Ok(vec![0.0; self.spec.num_experts]),
        }
    }

    /// Router logits `[N, E]` (reduction dtype) and scores.
    fn scores(&self, x2: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = x2.matmul(&self.router)?;
        let logits = logits.to_dtype(reduction_dtype(logits.dtype()))?;
        let scores = match self.spec.score {
            RouterScore::Softmax => softmax_last_dim(&logits)?,
            RouterScore::Sigmoid => (logits.neg()?.exp()? + 1.0)?.recip()?,
        };
        Ok((logits, scores))
    }

    /// Top-K selection by score + bias, then capacity.
    fn route(&self, scores: &Tensor) -> Result<Routing> {
        let (n, e) = scores.dims2()?;
        let k = self.spec.top_k;
        let bias = self.selection_bias()?;
        let s: Vec<f64> = scores.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let mut chosen = Vec::with_capacity(n * k);
        let mut order: Vec<usize> = (0..e).collect();
        for t in 0..n {
            let row = &s[t * e..(t + 1) * e];
            order.sort_by(|&a, &b| (row[b] + bias[b]).total_cmp(&(row[a] + bias[a])).then(a.cmp(&b)));
            chosen.extend(order[..k].iter().map(|&i| i as u32));
        }
        let mut selected = vec![0.0; e];
        chosen.iter().for_each(|&c| selected[c as usize] += 1.0);
        let cap = self.spec.capacity_factor.map(|c| (c * (n * k) as f64 / e as f64).ceil() as usize).unwrap_or(usize::MAX);
        let mut keep = vec![false; n * k];
        let mut count = vec![0usize; e];
        for r in 0..k {
            for t in 0..n {
                let c = chosen[t * k + r] as usize;
                if count[c] < cap {
                    count[c] += 1;
                    keep[t * k + r] = true;
                }
            }
        }
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); e];
        for t in 0..n {
            for r in 0..k {
                if keep[t * k + r] {
                    tokens[chosen[t * k + r] as usize].push(t as u32);
                }
            }
        }
        let mut start = vec![0usize; e];
        let mut acc = 0;
        for (i, tk) in tokens.iter().enumerate() {
            start[i] = acc;
            acc += tk.len();
        }
        let kept = acc;
        // Each expert's token list is in token order, so slots are visited in the same order.
        let mut next = start.clone();
        let mut pos = vec![kept as u32; n * k];
        for t in 0..n {
            for r in 0..k {
                if keep[t * k + r] {
                    let c = chosen[t * k + r] as usize;
                    pos[t * k + r] = next[c] as u32;
                    next[c] += 1;
                }
            }
        }
        Ok(Routing { chosen, tokens, pos, kept, selected })
    }

    /// Gates `[N, K]` (reduction dtype) of the chosen experts.
    fn gates(&self, scores: &Tensor, chosen: &[u32]) -> Result<Tensor> {
        let (n, e) = scores.dims2()?;
        let k = self.spec.top_k;
        let flat: Vec<u32> = chosen.iter().enumerate().map(|(j, &c)| (j / k * e) as u32 + c).collect();
        let idx = Tensor::from_vec(flat, n * k, scores.device())?;
        let mut g = scores.flatten_all()?.index_select(&idx, 0)?.reshape((n, k))?;
        if self.spec.normalizes() {
            g = g.broadcast_div(&g.sum_keepdim(1)?)?;
        }
        if self.spec.route_scale != 1.0 {
            g = (g * self.spec.route_scale)?;
        }
        Ok(g)
    }

    /// x `[B, T, d]` → `[B, T, d]` plus balancing losses and routing statistics.
    pub fn forward(&self, x: &Tensor) -> Result<MoeOutput> {
        let (b, t, d) = x.dims3()?;
        let n = b * t;
        let x2 = x.reshape((n, d))?;
        let (logits, scores) = self.scores(&x2)?;
        let r = self.route(&scores)?;
        let gates = self.gates(&scores, &r.chosen)?.to_dtype(x.dtype())?;
        // The routed experts as one fused node on CPU (ops::moe_experts): grouped projections per
        // expert, combined with the gates.
        let k = self.spec.top_k;
        let kept = r.kept;
        let plan = SlotPlan { tokens: r.tokens, pos: r.pos };
        let ws = |f: fn(&Expert) -> &Tensor| self.experts.iter().map(|e| f(e).clone()).collect::<Vec<_>>();
        let mut y = moe_experts(&x2, &gates, &ws(|e| &e.w_gate), &ws(|e| &e.w_up), &ws(|e| &e.w_down), &plan)?;
        if let Some(s) = &self.shared {
            y = (y + s.forward(&x2.reshape((1, n, d))?)?.reshape((n, d))?)?;
        }
        let (loss, aux_v, z_v) = self.balance_losses(&logits, &scores, &r.selected, b, &r.chosen)?;
        let stats = RouteStats { selected: r.selected, dropped: n * k - kept, slots: n * k, aux_loss: aux_v, z_loss: z_v };
        Ok(MoeOutput { y: y.reshape((b, t, d))?, loss, stats })
    }

    /// Reference form: every expert on every token, combined with a dense `[N, E]` gate matrix
    /// (zero for unselected or dropped slots). Same routing, so the same function.
    pub fn forward_dense_reference(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (n, e, k) = (b * t, self.spec.num_experts, self.spec.top_k);
        let x2 = x.reshape((n, d))?;
        let (_, scores) = self.scores(&x2)?;
        let r = self.route(&scores)?;
        let gates = self.gates(&scores, &r.chosen)?.to_dtype(x.dtype())?;
        let mut onehot = vec![0f64; n * k * e];
        for j in 0..n * k {
            if (r.pos[j] as usize) < r.kept {
                onehot[j * e + r.chosen[j] as usize] = 1.0;
            }
        }
        let onehot = Tensor::from_vec(onehot, (n, k, e), x.device())?.to_dtype(x.dtype())?;
        let dense = onehot.broadcast_mul(&gates.unsqueeze(2)?)?.sum(1)?; // [N, E]
        let mut y = x2.zeros_like()?;
        for (i, ex) in self.experts.iter().enumerate() {
            y = (y + ex.forward(&x2)?.broadcast_mul(&dense.narrow(1, i, 1)?)?)?;
        }
        if let Some(s) = &self.shared {
            y = (y + s.forward(&x2.reshape((1, n, d))?)?.reshape((n, d))?)?;
        }
        y.reshape((b, t, d))
    }

    /// Auxiliary balance loss and z-loss (scalar sum, coefficients included) and their values.
    fn balance_losses(&self, logits: &Tensor, scores: &Tensor, selected: &[f64], b: usize, chosen: &[u32]) -> Result<(Option<Tensor>, f64, f64)> {
        let (n, e) = scores.dims2()?;
        let k = self.spec.top_k;
        let dev = scores.device();
        let dt = scores.dtype();
        let mut terms: Vec<Tensor> = Vec::new();
        let (mut aux_v, mut z_v) = (0.0, 0.0);
        let coef = self.spec.balance.aux_loss_coef;
        if coef > 0.0 {
            // p: full distribution over experts per token.
            let p = match self.spec.score {
                RouterScore::Softmax => scores.clone(),
                RouterScore::Sigmoid => scores.broadcast_div(&scores.sum_keepdim(1)?)?,
            };
            let aux = match self.spec.balance.stats {
                BalanceStats::MicroBatch | BalanceStats::GlobalBatch => {
                    let (counts, tokens) = if self.spec.balance.stats == BalanceStats::GlobalBatch {
                        let mut run = self.running.lock().expect("moe stats lock");
                        run.0.iter_mut().zip(selected).for_each(|(a, s)| *a += s);
                        run.1 += 1;
                        (run.0.iter().map(|c| c / run.1 as f64).collect(), n as f64)
                    } else {
                        // The whole micro-batch's counts and tokens when it runs as concurrent
                        // shards (`model::collective`); this shard's mean of p below is weighted
                        // by its share of the tokens, so the shards' terms add up to this one.
                        let mut v = selected.to_vec();
                        v.push(n as f64);
                        let mut all = super::collective::all_sum(&v)?;
                        let tokens = all.pop().expect("token count");
                        (all, tokens)
                    };
                    let f = Tensor::from_vec(counts.iter().map(|c| c / (tokens * k as f64)).collect::<Vec<_>>(), e, dev)?.to_dtype(dt)?;
                    (p.mean(0)? * f)?.sum_all()?
                }
                BalanceStats::Sequence => {
                    let t = n / b;
                    let mut f = vec![0f64; b * e];
                    for (j, &c) in chosen.iter().enumerate() {
                        f[(j / k / t) * e + c as usize] += 1.0 / (t * k) as f64;
                    }
                    let f = Tensor::from_vec(f, (b, e), dev)?.to_dtype(dt)?;
                    (p.reshape((b, t, e))?.mean(1)? * f)?.sum_all()?.affine(1.0 / b as f64, 0.0)?
                }
            };
            let aux = aux.affine(coef * e as f64, 0.0)?;
            aux_v = aux.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            terms.push(aux);
        }
        if self.spec.z_loss_coef > 0.0 {
            let m = logits.max_keepdim(D::Minus1)?.detach();
            let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?;
            let z = lse.sqr()?.mean_all()?.affine(self.spec.z_loss_coef, 0.0)?;
            z_v = z.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            terms.push(z);
        }
        let loss = match terms.len() {
            0 => None,
            _ => Some(terms.into_iter().reduce(|a, b| (a + b).expect("same shape")).expect("non-empty")),
        };
        Ok((loss, aux_v, z_v))
    }
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl FeedForward {
    /// The feed-forward of layer `i` of a model: MoE when `moe` is set and `i` is past its
    /// dense layers.
    pub fn new(spec: &crate::config::model::ModelSpec, i: usize, std: f64, out_std: f64, pb: &mut ParamBuilder) -> Result<Self> {
        let d = spec.d_model;
        let dense = spec.ffn.hidden(d);
        match &spec.moe {
            Some(m) if i >= m.first_dense_layers => Ok(Self::Moe(Moe::new(m, d, m.expert_hidden(dense), std, out_std, pb)?)),
            _ => Ok(Self::Dense(Ffn::new_at(spec.ffn.kind, d, dense, std, out_std, (i, spec.n_layers), pb)?)),
        }
    }

    /// x `[B, T, d]` → output and, for MoE, its balancing loss and statistics.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Option<(Option<Tensor>, RouteStats)>)> {
        match self {
            Self::Dense(f) => Ok((f.forward(x)?, None)),
            Self::Moe(m) => {
                let o = m.forward(x)?;
                Ok((o.y, Some((o.loss, o.stats))))
            }
        }
    }

    pub fn flops_per_token(&self) -> f64 {
        match self {
            Self::Dense(f) => f.flops_per_token(),
            Self::Moe(m) => m.flops_per_token(),
        }
    }

    pub fn as_moe(&self) -> Option<&Moe> {
        match self {
            Self::Moe(m) => Some(m),
            Self::Dense(_) => None,
        }
    }
}
