//! Learning-rate schedules, all with linear warmup from 0 over `warmup_steps`:
//! constant; cosine to `min_lr_ratio`·peak (Loshchilov & Hutter 2017); WSD — warmup, stable,
//! decay over the last `cooldown_fraction` of the steps, linear or 1−sqrt shaped
//! (Hägele et al. 2024, arXiv:2405.18392).

use crate::config::train::{Cooldown, ScheduleKind, ScheduleSpec};

/// LR multiplier (of the peak) for optimizer step `step` (0-based) of `total` steps.
pub fn lr_factor(s: &ScheduleSpec, step: usize, total: usize) -> f64 {
    let w = s.warmup_steps;
    if step < w {
        return (step + 1) as f64 / w as f64;
    }
    let floor = s.min_lr_ratio;
    match s.kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Cosine => {
            let span = total.saturating_sub(w).max(1);
            let p = ((step - w) as f64 / span as f64).min(1.0);
            floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
        ScheduleKind::Wsd => {
            let cool = ((s.cooldown_fraction * total as f64).round() as usize).min(total.saturating_sub(w));
            let start = total - cool;
            if step < start || cool == 0 {
                return 1.0;
            }
            // Progress through the cooldown, reaching 1 at the last step.
            let p = ((step - start + 1) as f64 / cool as f64).min(1.0);
            let shape = match s.cooldown {
                Cooldown::Linear => 1.0 - p,
                Cooldown::Sqrt => 1.0 - p.sqrt(),
            };
            floor + (1.0 - floor) * shape
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ScheduleKind) -> ScheduleSpec {
        ScheduleSpec { kind, warmup_steps: 10, min_lr_ratio: 0.1, cooldown_fraction: 0.2, cooldown: Cooldown::Linear }
    }

    #[test]
    fn warmup_is_linear_and_reaches_peak() {
        let s = spec(ScheduleKind::Constant);
        assert!((lr_factor(&s, 0, 100) - 0.1).abs() < 1e-12);
        assert!((lr_factor(&s, 4, 100) - 0.5).abs() < 1e-12);
        assert_eq!(lr_factor(&s, 9, 100), 1.0);
        assert_eq!(lr_factor(&s, 50, 100), 1.0);
    }

    #[test]
    fn cosine_ends_at_floor_and_is_monotone() {
        let s = spec(ScheduleKind::Cosine);
        assert!((lr_factor(&s, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_factor(&s, 60, 110) - 0.55).abs() < 1e-12);
        assert!((lr_factor(&s, 110, 110) - 0.1).abs() < 1e-12);
        for i in 10..109 {
            assert!(lr_factor(&s, i + 1, 110) <= lr_factor(&s, i, 110));
        }
    }

    #[test]
    fn wsd_is_flat_then_cools_down() {
        let mut s = spec(ScheduleKind::Wsd);
        // 100 steps, cooldown = last 20 (steps 80..99).
        assert_eq!(lr_factor(&s, 79, 100), 1.0);
        assert!((lr_factor(&s, 89, 100) - (0.1 + 0.9 * 0.5)).abs() < 1e-12);
        assert!((lr_factor(&s, 99, 100) - 0.1).abs() < 1e-12);
        s.cooldown = Cooldown::Sqrt;
        assert!((lr_factor(&s, 89, 100) - (0.1 + 0.9 * (1.0 - 0.5f64.sqrt()))).abs() < 1e-12);
        assert!((lr_factor(&s, 99, 100) - 0.1).abs() < 1e-12);
    }
}
