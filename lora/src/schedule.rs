//! Learning-rate schedules as transformers' `get_*_schedule_with_warmup`.

use serde::{Deserialize, Serialize};

/// Learning-rate schedule, as transformers' `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warm-up then linear decay to 0 (transformers' default).
    #[default]
    Linear,
    /// Linear warm-up then half a cosine to 0 (the reference recipe).
    Cosine,
    /// Constant.
    Constant,
    /// Linear warm-up then constant.
    ConstantWithWarmup,
}

impl Schedule {
    /// Parses `linear`, `cosine`, `constant`, `constant_with_warmup`.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            _ => return None,
        })
    }

    /// The multiplier of the base rate at optimizer step `step` (0-based: the first update
    /// uses `step = 0`, so with warm-up it has rate 0, exactly as transformers).
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let s = step as f64;
        let w = warmup as f64;
        if !matches!(self, Self::Constant) && step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0),
            Self::Cosine => {
                let progress = (s - w) / (total as f64 - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // get_cosine_schedule_with_warmup(opt, 10, 100): lambda(0)=0, lambda(5)=0.5,
        // lambda(10)=1, lambda(55)=0.5, lambda(100)=0.
        let c = Schedule::Cosine;
        assert_eq!(c.factor(0, 10, 100), 0.0);
        assert_eq!(c.factor(5, 10, 100), 0.5);
        assert_eq!(c.factor(10, 10, 100), 1.0);
        assert!((c.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(c.factor(100, 10, 100).abs() < 1e-12);
        let l = Schedule::Linear;
        assert_eq!(l.factor(55, 10, 100), 0.5);
        assert_eq!(Schedule::Constant.factor(0, 10, 100), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(2, 10, 100), 0.2);
    }
}
