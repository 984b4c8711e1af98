//! Learning-rate schedules, evaluated per optimiser step.

use serde::{Deserialize, Serialize};

/// A learning-rate schedule: the factor applied to the base learning rate at each step.
///
/// `step` is the 0-based index of the optimiser update. During warm-up the factor rises
/// linearly as `(step + 1) / warmup_steps`, so the first update already moves the weights
/// and update `warmup_steps − 1` uses the full rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warm-up, then the base rate for ever.
    Constant { warmup_steps: u64 },
    /// Linear warm-up, then a half cosine from the base rate down to
    /// `min_lr_ratio × base` at `total_steps`, and that floor afterwards.
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant { warmup_steps: 0 }
    }
}

impl Schedule {
    /// The constant schedule without warm-up.
    pub fn constant() -> Self {
        Schedule::Constant { warmup_steps: 0 }
    }

    /// Linear warm-up then cosine decay to `min_lr_ratio` of the base rate.
    pub fn warmup_cosine(warmup_steps: u64, total_steps: u64, min_lr_ratio: f64) -> Self {
        Schedule::WarmupCosine {
            warmup_steps,
            total_steps,
            min_lr_ratio,
        }
    }

    /// The multiplier of the base learning rate at optimiser step `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        let warm = |w: u64| -> Option<f64> { (step < w).then(|| (step + 1) as f64 / w as f64) };
        match *self {
            Schedule::Constant { warmup_steps } => warm(warmup_steps).unwrap_or(1.0),
            Schedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => {
                if let Some(f) = warm(warmup_steps) {
                    return f;
                }
                let decay = total_steps.saturating_sub(warmup_steps);
                if decay == 0 {
                    return min_lr_ratio;
                }
                let progress = ((step - warmup_steps) as f64 / decay as f64).min(1.0);
                min_lr_ratio
                    + (1.0 - min_lr_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// The learning rate at `step` for base rate `base_lr`.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }

    /// Checks the parameters.
    pub fn validate(&self) -> crate::Result<()> {
        if let Schedule::WarmupCosine {
            min_lr_ratio,
            total_steps,
            warmup_steps,
        } = *self
        {
            if !(0.0..=1.0).contains(&min_lr_ratio) {
                return Err(crate::Error::Config(format!(
                    "schedule min_lr_ratio {min_lr_ratio} is outside [0, 1]"
                )));
            }
            if total_steps < warmup_steps {
                return Err(crate::Error::Config(format!(
                    "schedule total_steps {total_steps} < warmup_steps {warmup_steps}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    #[test]
    fn warmup_cosine_closed_form() {
        let s = Schedule::warmup_cosine(10, 110, 0.1);
        let base = 3e-4;
        for step in 0..10u64 {
            let want = base * (step + 1) as f64 / 10.0;
            assert!(
                (s.lr(base, step) - want).abs() <= 1e-15 * base,
                "warm-up step {step}"
            );
        }
        assert_eq!(s.lr(base, 10), base);
        for step in 10..=110u64 {
            let p = (step - 10) as f64 / 100.0;
            let want = base * (0.1 + 0.9 * 0.5 * (1.0 + (PI * p).cos()));
            let got = s.lr(base, step);
            assert!(
                (got - want).abs() <= 1e-15 * base,
                "step {step}: {got} vs {want}"
            );
        }
        // Half way the rate is the mean of base and floor.
        assert!((s.factor(60) - 0.55).abs() < 1e-12);
        assert!((s.factor(110) - 0.1).abs() < 1e-15);
        assert_eq!(s.factor(10_000), s.factor(110));
        // Monotone non-increasing after warm-up.
        for step in 10..200 {
            assert!(s.factor(step + 1) <= s.factor(step) + 1e-15);
        }
    }

    #[test]
    fn constant_and_edges() {
        let c = Schedule::Constant { warmup_steps: 4 };
        let f: Vec<f64> = (0..6).map(|s| c.factor(s)).collect();
        assert_eq!(f, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(Schedule::constant().factor(0), 1.0);
        let no_decay = Schedule::warmup_cosine(5, 5, 0.2);
        assert_eq!(no_decay.factor(5), 0.2);
        assert!(Schedule::warmup_cosine(10, 5, 0.0).validate().is_err());
        assert!(Schedule::warmup_cosine(0, 5, 1.5).validate().is_err());
        let json = serde_json::to_string(&Schedule::warmup_cosine(1, 2, 0.5)).unwrap();
        assert_eq!(
            serde_json::from_str::<Schedule>(&json).unwrap(),
            Schedule::warmup_cosine(1, 2, 0.5)
        );
    }
}
