//! The training engine: PyTorch parity of AdamW with groups, clipping and accumulation;
//! schedules; freezing and master weights; the non-finite guard; exact resume; crash-safe
//! checkpoints; the data loader.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::Rng;
use tuwen::train::augment::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, apply_op, hflip,
    random_resized_crop_box, to_grayscale, R2d2Augment, RandOp, R2D2_FILL, R2D2_OPS,
};
use tuwen::train::data::{ResizeKind, SkippedSample};
use tuwen::train::rng::derive_rng;
use tuwen::train::{
    AdamW, AdamWConfig, AugmentConfig, CheckpointManager, DataConfig, DataLoader, DataPosition,
    EmaPairs, EvalFn, ExtraState, Fit, Grads, Manifest, MetricsLog, ParamGroupConfig, Schedule,
    StepCtx, Trainer, TrainerConfig,
};

use crate::common::{fixture, get, load_st};

// ---------------------------------------------------------------- helpers

fn cpu() -> Device {
    Device::Cpu
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a − b| / max |b|` (the relative error of the tensor as a whole).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (f32s(a), f32s(b));
    let num = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    f32s(t).iter().map(|x| x.to_bits()).collect()
}

fn varmap_from(tensors: &[(String, Tensor)]) -> VarMap {
    let vm = VarMap::new();
    {
        let mut d = vm.data().lock().unwrap();
        for (k, t) in tensors {
            d.insert(k.clone(), Var::from_tensor(t).unwrap());
        }
    }
    vm
}

fn var_of(vm: &VarMap, name: &str) -> Var {
    vm.data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no var {name}"))
        .clone()
}

fn snapshot(vm: &VarMap) -> BTreeMap<String, Tensor> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor().copy().unwrap()))
        .collect()
}

fn assert_same_bits(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: names"
    );
    for (k, t) in a {
        assert_eq!(bits(t), bits(&b[k]), "{what}: `{k}` differs");
    }
}

const PARAMS: [&str; 7] = [
    "enc.fc.weight",
    "enc.fc.bias",
    "enc.norm.weight",
    "head.weight",
    "head.bias",
    "logit_scale",
    "frozen.weight",
];

struct Ref {
    t: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn reference() -> Ref {
    let t = load_st(&fixture("train/train_ref.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("train/train_ref.json")).unwrap())
            .unwrap();
    Ref { t, meta }
}

/// The configuration the fixture's torch optimiser was built with.
fn ref_config(r: &Ref) -> TrainerConfig {
    let c = &r.meta["config"];
    let s = &c["schedule"];
    TrainerConfig {
        optimizer: AdamWConfig {
            lr: c["lr"].as_f64().unwrap(),
            beta1: c["betas"][0].as_f64().unwrap(),
            beta2: c["betas"][1].as_f64().unwrap(),
            eps: c["eps"].as_f64().unwrap(),
            weight_decay: c["weight_decay"].as_f64().unwrap(),
        },
        groups: ParamGroupConfig::default()
            .with_frozen(["frozen.*"])
            .with_group(
                "head",
                ["head.*"],
                c["head_scale"].as_f64().unwrap(),
                Some(c["head_wd"].as_f64().unwrap()),
            ),
        schedule: Schedule::warmup_cosine(
            s["warmup"].as_u64().unwrap(),
            s["total"].as_u64().unwrap(),
            s["min_ratio"].as_f64().unwrap(),
        ),
        ..Default::default()
    }
}

fn init_vars(r: &Ref, case: &str) -> VarMap {
    let ts: Vec<(String, Tensor)> = PARAMS
        .iter()
        .map(|k| {
            (
                k.to_string(),
                get(&r.t, &format!("{case}.init.{k}")).clone(),
            )
        })
        .collect();
    varmap_from(&ts)
}

// ---------------------------------------------------------------- optimiser parity

#[test]
fn train_adamw_param_groups_match_torch() {
    let r = reference();
    let cfg = ref_config(&r);
    let vm = init_vars(&r, "opt");
    let mut opt = AdamW::from_varmap(&vm, cfg.optimizer, &cfg.groups).unwrap();

    // The groups are those the torch script built by the same rules.
    let ours: BTreeMap<String, Vec<String>> = opt
        .groups()
        .into_iter()
        .map(|g| (g.name, g.params))
        .collect();
    for g in r.meta["groups"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        let names: Vec<String> = g["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().into())
            .collect();
        assert_eq!(ours.get(name), Some(&names), "group {name}");
    }
    assert!(!opt.has_state("frozen.weight"));

    let lrs = r.meta["opt"]["lrs"].as_array().unwrap();
    let frozen0 = f32s(&var_of(&vm, "frozen.weight").as_detached_tensor());
    let mut worst = 0f64;
    for step in 0..5u64 {
        let lr = cfg.schedule.lr(cfg.optimizer.lr, step);
        let want_lr = lrs[step as usize].as_f64().unwrap();
        assert!(
            (lr - want_lr).abs() <= 1e-15,
            "schedule step {step}: {lr} vs {want_lr}"
        );
        opt.set_lr(lr);
        let mut named = HashMap::new();
        for k in PARAMS {
            if let Some(g) = r.t.get(&format!("opt.grad{step}.{k}")) {
                named.insert(k.to_string(), g.clone());
            }
        }
        opt.step(&Grads::from_named(&opt, &named).unwrap()).unwrap();
        for k in PARAMS {
            let want = get(&r.t, &format!("opt.step{step}.{k}"));
            let e = rel_err(&var_of(&vm, k).as_detached_tensor(), want);
            worst = worst.max(e);
            assert!(e <= 1e-6, "step {step} `{k}`: relative error {e:.3e}");
        }
    }
    println!("AdamW groups vs torch, 5 steps: max relative error {worst:.3e} (tolerance 1e-6)");
    assert_eq!(
        opt.param_steps("head.bias"),
        Some(4),
        "no update without a gradient"
    );
    assert_eq!(opt.param_steps("head.weight"), Some(5));
    assert_eq!(
        f32s(&var_of(&vm, "frozen.weight").as_detached_tensor()),
        frozen0
    );
}

/// The MLP case: grad accumulation over 2 micro-batches of 4 rows against torch's full
/// batch of 8, clipping by global norm, the schedule, groups and a frozen input matrix.
#[test]
fn train_trainer_accumulation_and_clipping_match_torch() {
    let r = reference();
    let mut cfg = ref_config(&r);
    cfg.grad_accum = 2;
    cfg.max_grad_norm = Some(r.meta["mlp"]["max_norm"].as_f64().unwrap());
    let vm = init_vars(&r, "mlp");
    let mut trainer = Trainer::from_varmap(&vm, cfg).unwrap();
    let p: HashMap<&str, Tensor> = PARAMS
        .iter()
        .map(|k| (*k, var_of(&vm, k).as_tensor().clone()))
        .collect();
    let frozen0 = f32s(&p["frozen.weight"]);
    let losses = r.meta["mlp"]["losses"].as_array().unwrap();
    let norms = r.meta["mlp"]["grad_norms"].as_array().unwrap();
    let (mut worst_p, mut worst_l, mut worst_n) = (0f64, 0f64, 0f64);
    for step in 0..3 {
        let x = get(&r.t, &format!("mlp.x{step}"));
        let y = get(&r.t, &format!("mlp.y{step}"));
        let micro: Vec<(Tensor, Tensor)> = (0..2)
            .map(|i| {
                (
                    x.narrow(0, 4 * i, 4).unwrap(),
                    y.narrow(0, 4 * i, 4).unwrap(),
                )
            })
            .collect();
        let report = trainer
            .step(&micro, |(x, y), _| {
                let h = x.matmul(&p["frozen.weight"])?;
                let h = h
                    .matmul(&p["enc.fc.weight"].t()?)?
                    .broadcast_add(&p["enc.fc.bias"])?;
                let h = h.tanh()?.broadcast_mul(&p["enc.norm.weight"])?;
                let out = h
                    .matmul(&p["head.weight"].t()?)?
                    .broadcast_add(&p["head.bias"])?;
                let out = out.broadcast_mul(&p["logit_scale"].exp()?)?;
                Ok((out - y)?.sqr()?.mean_all()?)
            })
            .unwrap();
        assert!(report.skipped.is_none());
        let want_loss = losses[step].as_f64().unwrap();
        let want_norm = norms[step].as_f64().unwrap();
        let el = (report.loss - want_loss).abs() / want_loss;
        let en = (report.grad_norm - want_norm).abs() / want_norm;
        worst_l = worst_l.max(el);
        worst_n = worst_n.max(en);
        assert!(
            el <= 1e-6,
            "step {step} loss {} vs torch {want_loss}",
            report.loss
        );
        assert!(
            en <= 1e-6,
            "step {step} grad norm {} vs torch {want_norm}",
            report.grad_norm
        );
        assert_eq!(report.clipped, want_norm > 0.5, "step {step} clipping");
        for k in PARAMS {
            let want = get(&r.t, &format!("mlp.step{step}.{k}"));
            let e = rel_err(&var_of(&vm, k).as_detached_tensor(), want);
            worst_p = worst_p.max(e);
            assert!(e <= 1e-6, "step {step} `{k}`: relative error {e:.3e}");
        }
    }
    println!(
        "trainer (accum 2x4, clip 0.5) vs torch batch 8, 3 steps: params {worst_p:.3e}, \
         loss {worst_l:.3e}, pre-clip grad norm {worst_n:.3e} (tolerance 1e-6)"
    );
    assert_eq!(f32s(&p["frozen.weight"]), frozen0, "frozen matrix changed");
}

// ---------------------------------------------------------------- accumulation, schedule

fn linear_problem(seed: u64) -> (Vec<(String, Tensor)>, Vec<Tensor>, Vec<Tensor>) {
    let mut rng = derive_rng(seed, &[]);
    let mut randn = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &cpu()).unwrap()
    };
    let vars = vec![
        ("w1".to_string(), randn(&[5, 6])),
        ("b1".to_string(), randn(&[6])),
        ("w2".to_string(), randn(&[6, 3])),
    ];
    let xs = (0..4).map(|_| randn(&[8, 5])).collect();
    let ys = (0..4).map(|_| randn(&[8, 3])).collect();
    (vars, xs, ys)
}

fn mlp(vm: &VarMap, x: &Tensor, y: &Tensor) -> tuwen::Result<Tensor> {
    let h = x
        .matmul(var_of(vm, "w1").as_tensor())?
        .broadcast_add(var_of(vm, "b1").as_tensor())?;
    let out = h.relu()?.matmul(var_of(vm, "w2").as_tensor())?;
    Ok((out - y)?.sqr()?.mean_all()?)
}

#[test]
fn train_grad_accumulation_equals_full_batch() {
    let (vars, xs, ys) = linear_problem(5);
    let base = TrainerConfig {
        optimizer: AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        },
        schedule: Schedule::warmup_cosine(1, 4, 0.0),
        max_grad_norm: Some(0.3),
        ..Default::default()
    };
    let (vm_a, vm_b) = (varmap_from(&vars), varmap_from(&vars));
    let mut a = Trainer::from_varmap(
        &vm_a,
        TrainerConfig {
            grad_accum: 2,
            ..base.clone()
        },
    )
    .unwrap();
    let mut b = Trainer::from_varmap(&vm_b, base).unwrap();
    let mut worst = 0f64;
    for step in 0..4 {
        let (x, y) = (&xs[step], &ys[step]);
        let halves: Vec<(Tensor, Tensor)> = (0..2)
            .map(|i| {
                (
                    x.narrow(0, 4 * i, 4).unwrap(),
                    y.narrow(0, 4 * i, 4).unwrap(),
                )
            })
            .collect();
        let ra = a.step(&halves, |(x, y), _| mlp(&vm_a, x, y)).unwrap();
        let rb = b
            .step(&[(x.clone(), y.clone())], |(x, y), _| mlp(&vm_b, x, y))
            .unwrap();
        assert_eq!(ra.samples, 8);
        assert!((ra.loss - rb.loss).abs() <= 1e-6 * rb.loss.abs());
        assert!((ra.grad_norm - rb.grad_norm).abs() <= 1e-6 * rb.grad_norm);
        for name in ["w1", "b1", "w2"] {
            let e = rel_err(
                &var_of(&vm_a, name).as_detached_tensor(),
                &var_of(&vm_b, name).as_detached_tensor(),
            );
            worst = worst.max(e);
            assert!(e <= 1e-6, "step {step} {name}: {e:.3e}");
        }
    }
    println!("accumulation 2x4 vs batch 8 over 4 steps: max relative error {worst:.3e}");
    // The comparison can fail: a sum-style (unscaled) micro loss doubles the gradient.
    let (vm_c, vm_d) = (varmap_from(&vars), varmap_from(&vars));
    let cfg = TrainerConfig::default();
    let mut c = Trainer::from_varmap(
        &vm_c,
        TrainerConfig {
            grad_accum: 2,
            ..cfg.clone()
        },
    )
    .unwrap();
    let mut d = Trainer::from_varmap(&vm_d, cfg).unwrap();
    let halves: Vec<(Tensor, Tensor)> = (0..2)
        .map(|i| {
            (
                xs[0].narrow(0, 4 * i, 4).unwrap(),
                ys[0].narrow(0, 4 * i, 4).unwrap(),
            )
        })
        .collect();
    let rc = c
        .step(&halves, |(x, y), _| Ok((mlp(&vm_c, x, y)? * 2.0)?))
        .unwrap();
    let rd = d
        .step(&[(xs[0].clone(), ys[0].clone())], |(x, y), _| {
            mlp(&vm_d, x, y)
        })
        .unwrap();
    assert!((rc.grad_norm / rd.grad_norm - 2.0).abs() < 1e-5);
}

#[test]
fn train_schedule_drives_the_step_lr() {
    let (vars, xs, ys) = linear_problem(6);
    let vm = varmap_from(&vars);
    let sched = Schedule::warmup_cosine(3, 10, 0.05);
    let mut t = Trainer::from_varmap(
        &vm,
        TrainerConfig {
            optimizer: AdamWConfig {
                lr: 2e-3,
                ..Default::default()
            },
            schedule: sched,
            ..Default::default()
        },
    )
    .unwrap();
    let mut lrs = Vec::new();
    for step in 0..12u64 {
        let i = (step % 4) as usize;
        let r = t
            .step(&[(xs[i].clone(), ys[i].clone())], |(x, y), _| {
                mlp(&vm, x, y)
            })
            .unwrap();
        let p = ((step as f64 - 3.0) / 7.0).clamp(0.0, 1.0);
        let want = if step < 3 {
            2e-3 * (step + 1) as f64 / 3.0
        } else {
            2e-3 * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        assert!(
            (r.lr - want).abs() <= 1e-15,
            "step {step}: {} vs {want}",
            r.lr
        );
        lrs.push(r.lr);
    }
    println!("warm-up 3 + cosine to 5% at 10: lrs {lrs:?}");
}

// ---------------------------------------------------------------- freezing, half precision

#[test]
fn train_frozen_vars_unchanged_and_stateless() {
    let (vars, xs, ys) = linear_problem(7);
    let vm = varmap_from(&vars);
    let mut t = Trainer::from_varmap(
        &vm,
        TrainerConfig {
            groups: ParamGroupConfig::default()
                .with_trainable(["w*"])
                .with_frozen(["w1"]),
            ..Default::default()
        },
    )
    .unwrap();
    let before = snapshot(&vm);
    for step in 0..3 {
        t.step(&[(xs[step].clone(), ys[step].clone())], |(x, y), _| {
            mlp(&vm, x, y)
        })
        .unwrap();
    }
    let after = snapshot(&vm);
    let opt = t.optimizer();
    assert_eq!(opt.trained_names(), vec!["w2"]);
    for frozen in ["w1", "b1"] {
        assert!(!opt.has_state(frozen) && opt.moments(frozen).is_none());
        assert_eq!(
            bits(&before[frozen]),
            bits(&after[frozen]),
            "{frozen} changed"
        );
    }
    assert_ne!(bits(&before["w2"]), bits(&after["w2"]));
    // Optimiser state holds exactly the trained parameter.
    let state = opt.state_tensors().unwrap();
    assert_eq!(
        state.keys().collect::<Vec<_>>(),
        vec!["m.w2", "t.w2", "v.w2"]
    );
    // No trainable var at all is a configuration error.
    let e = Trainer::from_varmap(
        &vm,
        TrainerConfig {
            groups: ParamGroupConfig::default().with_trainable(["nothing.*"]),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("no parameter is trainable"), "{e}");
}

#[test]
fn train_half_precision_keeps_f32_master_weights() {
    for dtype in [DType::BF16, DType::F16] {
        let init = Tensor::ones(16, DType::F32, &cpu()).unwrap();
        let vm_half = varmap_from(&[("w".into(), init.to_dtype(dtype).unwrap())]);
        let vm_f32 = varmap_from(&[("w".into(), init.clone())]);
        let cfg = TrainerConfig {
            optimizer: AdamWConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                ..Default::default()
            },
            groups: ParamGroupConfig {
                no_decay_rank_le1: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut th = Trainer::from_varmap(&vm_half, cfg.clone()).unwrap();
        let mut tf = Trainer::from_varmap(&vm_f32, cfg).unwrap();
        // loss = sum(w · 0.5): the gradient 0.5 is exact in every dtype.
        let loss = |vm: &VarMap| -> tuwen::Result<Tensor> {
            let w = var_of(vm, "w");
            Ok((w.as_tensor().to_dtype(DType::F32)? * 0.5)?.sum_all()?)
        };
        for _ in 0..40 {
            th.step(&[()], |_, _| loss(&vm_half)).unwrap();
            tf.step(&[()], |_, _| loss(&vm_f32)).unwrap();
        }
        let master = th.optimizer().master("w").expect("master copy").clone();
        let (m, v) = th.optimizer().moments("w").unwrap();
        assert_eq!(
            (master.dtype(), m.dtype(), v.dtype()),
            (DType::F32, DType::F32, DType::F32)
        );
        // The master follows the f32 run exactly; the var is the master rounded.
        let want = var_of(&vm_f32, "w").as_detached_tensor();
        assert_eq!(
            bits(&master),
            bits(&want),
            "{dtype:?} master differs from the f32 run"
        );
        let var = var_of(&vm_half, "w").as_detached_tensor();
        assert_eq!(var.dtype(), dtype);
        assert_eq!(f32s(&var), f32s(&master.to_dtype(dtype).unwrap()));
        let moved = 1.0 - f32s(&master)[0];
        println!(
            "{dtype:?}: master moved by {moved:.3e} after 40 steps of ~1e-4; var = {}",
            f32s(&var)[0]
        );
        assert!(moved > 3.9e-3 && moved < 4.1e-3);
        if dtype == DType::BF16 {
            // 1 − 0.004 is not representable in bf16 next to 1 (spacing 2^-8 below 1):
            // without a master, each 1e-4 update would round back to 1.
            let mut naive = Tensor::ones(16, DType::BF16, &cpu()).unwrap();
            for _ in 0..40 {
                naive = (naive - 1e-4).unwrap();
            }
            assert_eq!(
                f32s(&naive)[0],
                1.0,
                "the test premise: bf16 alone loses the updates"
            );
        }
        // The checkpoint weights are the f32 masters.
        let ck = th
            .checkpoint(None, BTreeMap::new(), serde_json::Value::Null)
            .unwrap();
        assert_eq!(ck.weights["w"].dtype(), DType::F32);
        assert_eq!(bits(&ck.weights["w"]), bits(&master));
    }
}

// ---------------------------------------------------------------- non-finite guard

#[test]
fn train_nan_loss_is_skipped_logged_and_stops_training() {
    let (vars, xs, ys) = linear_problem(8);
    let vm = varmap_from(&vars);
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::append(dir.path().join("metrics.jsonl")).unwrap();
    let mut t = Trainer::from_varmap(
        &vm,
        TrainerConfig {
            max_consecutive_skips: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let nan_steps = [3u64, 7];
    let mut last_good = snapshot(&vm);
    let mut err = None;
    for step in 0..20u64 {
        let i = (step % 4) as usize;
        let before = snapshot(&vm);
        let res = t.step(&[(xs[i].clone(), ys[i].clone())], |(x, y), ctx| {
            let l = mlp(&vm, x, y)?;
            if nan_steps.contains(&ctx.step) || ctx.step >= 12 {
                Ok((l * f64::NAN)?)
            } else if ctx.step == 9 {
                // A finite loss whose gradient is infinite: d√u/du at u = 0.
                let w = var_of(&vm, "w2");
                let u = (w.as_tensor() - w.as_detached_tensor())?.sqr()?.sum_all()?;
                Ok((l + u.sqrt()?)?)
            } else {
                Ok(l)
            }
        });
        match res {
            Ok(r) => {
                log.log_step(&r, 0, None).unwrap();
                let after = snapshot(&vm);
                if nan_steps.contains(&step) || step == 9 || step >= 12 {
                    let reason = r.skipped.clone().expect("step should be skipped");
                    println!("step {step} skipped: {reason}");
                    assert_same_bits(&before, &after, "skipped step");
                } else {
                    assert!(r.skipped.is_none(), "step {step}");
                    last_good = after;
                }
            }
            Err(e) => {
                err = Some((step, e));
                break;
            }
        }
    }
    let (step, e) = err.expect("training should stop");
    println!("stopped: {e}");
    assert_eq!(step, 14, "3 consecutive skips at 12, 13, 14");
    assert!(
        matches!(e, tuwen::Error::Diverged { skipped: 3, .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("3 consecutive steps skipped") && msg.contains("NaN"),
        "{msg}"
    );
    assert_same_bits(&last_good, &snapshot(&vm), "weights after the stop");
    for t in last_good.values() {
        assert!(f32s(t).iter().all(|x| x.is_finite()));
    }
    assert_eq!(t.counters().skipped_steps, 6);
    let recs = MetricsLog::read(dir.path().join("metrics.jsonl")).unwrap();
    let skips: Vec<u64> = recs
        .iter()
        .filter(|r| r["event"] == "skip")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skips, vec![3, 7, 9, 12, 13]);
    let inf = recs.iter().find(|r| r["step"] == 9).unwrap();
    assert!(
        inf["reason"].as_str().unwrap().contains("gradient norm is"),
        "{inf}"
    );
    assert_eq!(recs.iter().filter(|r| r["event"] == "step").count(), 9);
}

// ---------------------------------------------------------------- EMA, coverage

#[test]
fn train_ema_update_closed_form_and_half_shadow() {
    let s = Tensor::new(&[1f32, 2.0, -3.0], &cpu()).unwrap();
    let t0 = Tensor::new(&[0f32, 0.5, 1.0], &cpu()).unwrap();
    let vm = varmap_from(&[
        ("q.w".into(), s.clone()),
        ("k.w".into(), t0.clone()),
        ("q.h".into(), Tensor::ones(4, DType::BF16, &cpu()).unwrap()),
        ("k.h".into(), Tensor::zeros(4, DType::BF16, &cpu()).unwrap()),
    ]);
    tuwen::train::ema_update(&[var_of(&vm, "k.w")], &[var_of(&vm, "q.w")], 0.99).unwrap();
    let want: Vec<f32> = [0f32, 0.5, 1.0]
        .iter()
        .zip([1f32, 2.0, -3.0])
        .map(|(t, s)| (*t as f64 * 0.99 + s as f64 * 0.01) as f32)
        .collect();
    let got = f32s(&var_of(&vm, "k.w").as_detached_tensor());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-7, "{got:?} vs {want:?}");
    }
    let mut pairs = EmaPairs::by_prefix(&vm, "q.", "k.").unwrap();
    assert_eq!(pairs.len(), 2);
    pairs.copy_from_sources().unwrap();
    assert_eq!(f32s(&var_of(&vm, "k.w").as_detached_tensor()), f32s(&s));
    // Momentum 0.995 towards 0 from 1 for 100 steps: 0.995^100 = 0.6058; the bf16 target
    // follows its f32 shadow instead of stalling at 1 (1 − 0.005 rounds back to 1).
    var_of(&vm, "q.h")
        .set(&Tensor::zeros(4, DType::BF16, &cpu()).unwrap())
        .unwrap();
    for _ in 0..100 {
        pairs.update(0.995).unwrap();
    }
    let h = f32s(&var_of(&vm, "k.h").as_detached_tensor())[0];
    println!(
        "bf16 EMA target after 100 updates at 0.995: {h} (exact 0.995^100 = {})",
        0.995f64.powi(100)
    );
    assert!((h as f64 - 0.995f64.powi(100)).abs() < 4e-3);
    let st = pairs.state_tensors().unwrap();
    assert_eq!(st.keys().collect::<Vec<_>>(), vec!["ema_shadow.k.h"]);
    assert!(EmaPairs::by_prefix(&vm, "none.", "k.").is_err());
    assert!(tuwen::train::ema_update(&[var_of(&vm, "k.w")], &[var_of(&vm, "q.h")], 0.9).is_err());
}

#[test]
fn train_gradient_coverage_finds_untouched_params() {
    let vm = varmap_from(&[
        ("used".into(), Tensor::new(&[1f32, 2.0], &cpu()).unwrap()),
        ("cut".into(), Tensor::new(&[1f32, 2.0], &cpu()).unwrap()),
        ("zero".into(), Tensor::new(&[1f32, 2.0], &cpu()).unwrap()),
        ("unused".into(), Tensor::new(&[1f32], &cpu()).unwrap()),
    ]);
    let t = Trainer::from_varmap(&vm, TrainerConfig::default()).unwrap();
    let v = |n| var_of(&vm, n);
    let loss = (v("used").as_tensor().sqr().unwrap().sum_all().unwrap()
        + v("cut").as_tensor().detach().sum_all().unwrap()
        + v("zero")
            .as_tensor()
            .mul(&Tensor::zeros(2, DType::F32, &cpu()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let cov = t.gradient_coverage(&loss).unwrap();
    println!("coverage: {cov}");
    assert_eq!(cov.nonzero, vec!["used"]);
    assert_eq!(cov.zero, vec!["zero"]);
    assert_eq!(cov.missing, vec!["cut", "unused"]);
    let e = cov.ensure_complete().unwrap_err().to_string();
    assert!(e.contains("unused") && e.contains("cut"), "{e}");
    let full = t
        .gradient_coverage(&v("used").as_tensor().sum_all().unwrap())
        .unwrap();
    assert!(!full.is_complete());
}

// ---------------------------------------------------------------- data sets

/// Writes `n` small PNGs with captions, one missing file and one truncated JPEG, and a
/// JSONL manifest with relative paths. Returns the manifest path.
fn synthetic_dataset(dir: &Path, n: usize) -> PathBuf {
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).unwrap();
    let mut lines = Vec::new();
    for i in 0..n {
        let mut rng = derive_rng(1234, &[i as u64]);
        let base: [u8; 3] = [rng.random(), rng.random(), rng.random()];
        let img = image::RgbImage::from_fn(10, 8, |x, y| {
            image::Rgb([
                base[0].wrapping_add((x * 9) as u8),
                base[1].wrapping_add((y * 13) as u8),
                base[2].wrapping_add(((x + y) * 5) as u8),
            ])
        });
        img.save(img_dir.join(format!("{i}.png"))).unwrap();
        let line = if i % 5 == 0 {
            serde_json::json!({"image": format!("images/{i}.png"),
                "captions": [format!("第{i}张图 颜色{}", base[0]), format!("另一种说法 {i}")],
                "id": i})
        } else {
            serde_json::json!({"image": format!("images/{i}.png"),
                "caption": format!("第{i}张图 颜色{}", base[0]), "boxes": [[0, 0, 5, 4]]})
        };
        lines.push(line.to_string());
        if i == 3 {
            lines.push(
                serde_json::json!({"image": "images/missing.png", "caption": "不存在"}).to_string(),
            );
        }
        if i == 9 {
            lines.push(
                serde_json::json!({"image": "images/broken.jpg", "caption": "坏的"}).to_string(),
            );
        }
    }
    // A JPEG cut off in its entropy-coded data.
    let mut jpeg = Vec::new();
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 77])
    });
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&img)
        .unwrap();
    jpeg.truncate(jpeg.len() / 3);
    std::fs::write(img_dir.join("broken.jpg"), &jpeg).unwrap();
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn bad_indices(m: &Manifest) -> Vec<usize> {
    m.samples
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            let n = s.image.file_name().unwrap().to_string_lossy();
            n == "missing.png" || n == "broken.jpg"
        })
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn train_data_manifests_jsonl_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = synthetic_dataset(dir.path(), 6);
    let m = Manifest::open(&jsonl).unwrap();
    assert_eq!(m.len(), 7);
    assert_eq!(m.samples[0].image, dir.path().join("images/0.png"));
    assert_eq!(m.samples[0].captions.len(), 2);
    assert_eq!(m.samples[0].id.as_deref(), Some("0"));
    assert_eq!(m.samples[1].boxes, Some(vec![[0.0, 0.0, 5.0, 4.0]]));
    let sub = dir.path().join("csv");
    std::fs::create_dir_all(&sub).unwrap();
    let csv = sub.join("pairs.csv");
    std::fs::write(
        &csv,
        "id,image,caption\r\n7,../images/1.png,\"一只猫, 在\"\"沙发\"\"上\"\r\n8,/abs/x.jpg,\"两行\n说明\"\n",
    )
    .unwrap();
    let c = Manifest::open(&csv).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c.samples[0].image, sub.join("../images/1.png"));
    assert!(c.samples[0].image.exists());
    assert_eq!(
        c.samples[0].captions,
        vec!["一只猫, 在\"沙发\"上".to_string()]
    );
    assert_eq!(c.samples[0].id.as_deref(), Some("7"));
    assert_eq!(c.samples[1].image, PathBuf::from("/abs/x.jpg"));
    assert_eq!(c.samples[1].captions[0], "两行\n说明");
    // Errors name the file and line.
    let bad = sub.join("bad.csv");
    std::fs::write(&bad, "image,caption\na.png,ok\nb.png,too,many\n").unwrap();
    let e = Manifest::open(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.csv") && e.contains("line 3"), "{e}");
    std::fs::write(&bad, "file_name,text\n").unwrap();
    let e = Manifest::open(&bad).unwrap_err().to_string();
    assert!(e.contains("no image column"), "{e}");
    let badj = sub.join("bad.jsonl");
    std::fs::write(
        &badj,
        "{\"image\":\"a.png\",\"caption\":\"x\"}\n{\"image\":\"b.png\"}\n",
    )
    .unwrap();
    let e = Manifest::open(&badj).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
}

#[test]
fn train_data_shuffle_is_deterministic_per_seed_and_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::open(&synthetic_dataset(dir.path(), 30)).unwrap();
    let cfg = DataConfig {
        seed: 3,
        ..DataConfig::new(4, 6)
    };
    let a = DataLoader::new(m.clone(), cfg).unwrap();
    let b = DataLoader::new(m.clone(), cfg).unwrap();
    let c = DataLoader::new(m.clone(), DataConfig { seed: 4, ..cfg }).unwrap();
    assert_eq!(a.epoch_order(0), b.epoch_order(0));
    assert_eq!(a.epoch_order(5), b.epoch_order(5));
    assert_ne!(a.epoch_order(0), a.epoch_order(1));
    assert_ne!(a.epoch_order(0), c.epoch_order(0));
    let mut sorted = a.epoch_order(2);
    sorted.sort();
    assert_eq!(sorted, (0..m.len()).collect::<Vec<_>>());
    let plain = DataLoader::new(
        m.clone(),
        DataConfig {
            shuffle: false,
            ..cfg
        },
    )
    .unwrap();
    assert_eq!(plain.epoch_order(1), (0..m.len()).collect::<Vec<_>>());
    println!("epoch 0 order (seed 3): {:?}", &a.epoch_order(0)[..10]);
}

#[test]
fn train_data_skips_and_counts_corrupt_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::open(&synthetic_dataset(dir.path(), 12)).unwrap();
    let bad = bad_indices(&m);
    assert_eq!(bad.len(), 2);
    let mut dl = DataLoader::new(
        m.clone(),
        DataConfig {
            shuffle: false,
            drop_last: false,
            ..DataConfig::new(5, 6)
        },
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut skipped: Vec<SkippedSample> = Vec::new();
    while let Some(b) = dl.next_batch_in_epoch().unwrap() {
        assert_eq!(b.images.dims()[1..], [3, 6, 6]);
        assert_eq!(b.len(), b.indices.len());
        seen.extend(b.indices.clone());
        skipped.extend(b.skipped.clone());
    }
    // Every good sample once, in order; batches filled past the bad ones.
    let good: Vec<usize> = (0..m.len()).filter(|i| !bad.contains(i)).collect();
    assert_eq!(seen, good);
    assert_eq!(skipped.iter().map(|s| s.index).collect::<Vec<_>>(), bad);
    for s in &skipped {
        println!("skipped sample {}: {}", s.index, s.reason);
    }
    assert!(skipped[0].reason.contains("missing.png"));
    assert!(skipped[1].reason.contains("broken.jpg"));
    assert_eq!(
        dl.position(),
        DataPosition {
            epoch: 1,
            cursor: 0,
            skipped_total: 2,
            shard: None,
        }
    );
    // A manifest with nothing usable is an error, not a hang.
    let only_bad =
        Manifest::from_samples("bad", bad.iter().map(|&i| m.samples[i].clone()).collect());
    let mut dl = DataLoader::new(only_bad, DataConfig::new(1, 6)).unwrap();
    let e = dl.next_batch().unwrap_err().to_string();
    assert!(e.contains("no batch"), "{e}");
}

#[test]
fn train_data_resume_mid_epoch_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::open(&synthetic_dataset(dir.path(), 17)).unwrap();
    let cfg = DataConfig {
        seed: 9,
        pipeline: tuwen::train::ImagePipeline::new(6).with_augment(AugmentConfig::default()),
        ..DataConfig::new(4, 6)
    };
    let mut full = DataLoader::new(m.clone(), cfg).unwrap();
    let batches: Vec<_> = (0..12).map(|_| full.next_batch().unwrap()).collect();
    // Each epoch visits every good sample at most once (drop_last drops the tail).
    let bad = bad_indices(&m);
    for epoch in 0..2 {
        let mut idx: Vec<usize> = batches
            .iter()
            .filter(|b| b.epoch == epoch)
            .flat_map(|b| b.indices.clone())
            .collect();
        let n = idx.len();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), n, "a sample repeated within epoch {epoch}");
        assert!(idx.iter().all(|i| !bad.contains(i)));
        assert_eq!(n, 16, "epoch {epoch}: 17 good samples, 4 full batches");
    }
    for cut in [1usize, 3, 5, 6, 9] {
        let pos = batches[cut - 1].position_after;
        let mut resumed = DataLoader::new(m.clone(), cfg).unwrap();
        resumed.set_position(pos).unwrap();
        for b in &batches[cut..] {
            let r = resumed.next_batch().unwrap();
            assert_eq!(r.indices, b.indices, "resume after batch {cut}");
            assert_eq!(r.captions, b.captions);
            assert_eq!(bits(&r.images), bits(&b.images));
            assert_eq!(r.position_after, b.position_after);
        }
    }
    println!(
        "12 batches over {} epochs; positions {:?}",
        batches.last().unwrap().epoch + 1,
        batches
            .iter()
            .map(|b| (b.position_after.epoch, b.position_after.cursor))
            .collect::<Vec<_>>()
    );
}

#[test]
fn train_data_augmentation_is_deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::open(&synthetic_dataset(dir.path(), 6)).unwrap();
    let aug = AugmentConfig {
        jitter_p: 1.0,
        grayscale_p: 0.3,
        ..Default::default()
    };
    let mk = |seed| {
        let mut cfg = DataConfig {
            seed,
            ..DataConfig::new(2, 6)
        };
        cfg.pipeline = cfg.pipeline.with_augment(aug);
        DataLoader::new(m.clone(), cfg).unwrap()
    };
    let (a, b, c) = (mk(1), mk(1), mk(2));
    let plain = DataLoader::new(m.clone(), DataConfig::new(2, 6)).unwrap();
    let (x0, cap0) = a.load_sample(1, 0).unwrap();
    assert_eq!(x0, b.load_sample(1, 0).unwrap().0);
    assert_ne!(
        x0,
        a.load_sample(1, 1).unwrap().0,
        "another epoch, another augmentation"
    );
    assert_ne!(
        x0,
        c.load_sample(1, 0).unwrap().0,
        "another seed, another augmentation"
    );
    assert_ne!(x0, plain.load_sample(1, 0).unwrap().0);
    assert_eq!(cap0, m.samples[1].captions[0]);
    // Several captions: the choice is per (seed, epoch, index) and covers both.
    let picks: Vec<String> = (0..12).map(|e| a.load_sample(0, e).unwrap().1).collect();
    assert_eq!(
        picks,
        (0..12)
            .map(|e| b.load_sample(0, e).unwrap().1)
            .collect::<Vec<_>>()
    );
    assert!(picks.contains(&m.samples[0].captions[0]) && picks.contains(&m.samples[0].captions[1]));
    // The tensor-style resize is selectable.
    let mut cfg = DataConfig::new(2, 6);
    cfg.pipeline.processor.resize = ResizeKind::BilinearNoAntialias;
    let t = DataLoader::new(m.clone(), cfg).unwrap();
    assert_eq!(t.load_sample(1, 0).unwrap().0.len(), 3 * 36);
}

#[test]
fn train_augment_ops_match_torchvision() {
    let r = reference();
    let img = get(&r.t, "aug.img");
    let base = f32s(img);
    let a = &r.meta["aug"];
    type Op<'a> = Box<dyn Fn(&mut [f32]) + 'a>;
    let cases: Vec<(&str, Op)> = vec![
        (
            "brightness",
            Box::new(|x: &mut [f32]| {
                adjust_brightness(x, a["brightness"].as_f64().unwrap() as f32)
            }),
        ),
        (
            "contrast",
            Box::new(|x: &mut [f32]| adjust_contrast(x, a["contrast"].as_f64().unwrap() as f32)),
        ),
        (
            "saturation",
            Box::new(|x: &mut [f32]| {
                adjust_saturation(x, a["saturation"].as_f64().unwrap() as f32)
            }),
        ),
        (
            "hue",
            Box::new(|x: &mut [f32]| adjust_hue(x, a["hue"].as_f64().unwrap() as f32)),
        ),
        (
            "hue_neg",
            Box::new(|x: &mut [f32]| adjust_hue(x, a["hue_neg"].as_f64().unwrap() as f32)),
        ),
        ("grayscale", Box::new(|x: &mut [f32]| to_grayscale(x))),
    ];
    for (name, op) in cases {
        let mut x = base.clone();
        op(&mut x);
        let want = f32s(get(&r.t, &format!("aug.{name}")));
        let d = x
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("augment {name} vs torchvision: max abs diff {d:.2e}");
        assert!(d <= 2e-6, "{name}: {d}");
    }
}

// ---------------------------------------------------------------- resume

/// A tiny contrastive model: linear image and text projections, a learned temperature, a
/// MoCo-style queue of text features (extra state), an EMA copy of the image projection
/// (post-step hook), and dropout drawn from the step's RNG.
struct Queue {
    queue: Arc<Mutex<Tensor>>,
    ema: Arc<Mutex<EmaPairs>>,
}

impl ExtraState for Queue {
    fn save_state(&self) -> tuwen::Result<BTreeMap<String, Tensor>> {
        let mut m = self.ema.lock().unwrap().state_tensors()?;
        m.insert("queue".into(), self.queue.lock().unwrap().copy()?);
        Ok(m)
    }
    fn load_state(&mut self, t: &BTreeMap<String, Tensor>) -> tuwen::Result<()> {
        let q = t
            .get("queue")
            .ok_or_else(|| tuwen::Error::Training("no queue".into()))?;
        *self.queue.lock().unwrap() = q.clone();
        self.ema.lock().unwrap().load_state_tensors(t)
    }
}

fn text_features(captions: &[String]) -> Tensor {
    let mut v = vec![0f32; captions.len() * 16];
    for (i, c) in captions.iter().enumerate() {
        for ch in c.chars() {
            v[i * 16 + (ch as u32).wrapping_mul(2_654_435_761) as usize % 16] += 1.0;
        }
    }
    Tensor::from_vec(v, (captions.len(), 16), &cpu()).unwrap()
}

fn l2n(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

fn ce_diag(logits: &Tensor) -> candle_core::Result<Tensor> {
    let (b, n) = logits.dims2()?;
    let lsm = tuwen::nn::ops::log_softmax_last_dim(logits)?;
    let eye: Vec<f32> = (0..b * n)
        .map(|k| if k / n == k % n { 1.0 } else { 0.0 })
        .collect();
    let eye = Tensor::from_vec(eye, (b, n), logits.device())?;
    (lsm * eye)?.sum_all()?.affine(-1.0 / b as f64, 0.0)
}

struct RunResult {
    losses: Vec<(u64, f64)>,
    weights: BTreeMap<String, Tensor>,
    queue: Tensor,
    position: DataPosition,
    summary: tuwen::train::FitSummary,
}

fn contrastive_run(
    manifest: &Path,
    ckpt_dir: &Path,
    total: u64,
    resume: bool,
    init_seed: u64,
    prefetch: usize,
) -> RunResult {
    let mut rng = derive_rng(init_seed, &[5]);
    let mut randn = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, shape, &cpu()).unwrap()
    };
    let wi = randn(&[108, 8], 0.2);
    let bi = randn(&[8], 0.1);
    let vm = varmap_from(&[
        ("img.proj.weight".into(), wi.clone()),
        ("img.proj.bias".into(), bi.clone()),
        ("txt.proj.weight".into(), randn(&[16, 8], 0.5)),
        (
            "logit_scale".into(),
            Tensor::new(10f32.ln(), &cpu()).unwrap(),
        ),
        ("ema.img.proj.weight".into(), wi),
        ("ema.img.proj.bias".into(), bi),
    ]);
    let cfg = TrainerConfig {
        optimizer: AdamWConfig {
            lr: 5e-2,
            weight_decay: 0.05,
            ..Default::default()
        },
        groups: ParamGroupConfig::default().with_frozen(["ema.*"]),
        schedule: Schedule::warmup_cosine(3, 16, 0.1),
        grad_accum: 2,
        max_grad_norm: Some(1.0),
        seed: 11,
        ..Default::default()
    };
    let mut trainer = Trainer::from_varmap(&vm, cfg).unwrap();
    let ema = Arc::new(Mutex::new(
        EmaPairs::by_prefix(&vm, "img.", "ema.img.").unwrap(),
    ));
    let hook_ema = ema.clone();
    trainer.add_post_step_hook(move |_| hook_ema.lock().unwrap().update(0.9));
    let queue = Arc::new(Mutex::new(l2n(&randn(&[6, 8], 1.0)).unwrap()));
    let mut extra = Queue {
        queue: queue.clone(),
        ema,
    };
    let data_cfg = DataConfig {
        seed: 11,
        pipeline: tuwen::train::ImagePipeline::new(6).with_augment(AugmentConfig::default()),
        ..DataConfig::new(4, 6)
    };
    let mut loader = DataLoader::new(Manifest::open(manifest).unwrap(), data_cfg).unwrap();
    let mgr = CheckpointManager::new(ckpt_dir, 2).unwrap();
    let mut log = MetricsLog::append(ckpt_dir.join("metrics.jsonl")).unwrap();
    let v = |n: &str| var_of(&vm, n).as_tensor().clone();
    let (w_i, b_i, w_t, scale) = (
        v("img.proj.weight"),
        v("img.proj.bias"),
        v("txt.proj.weight"),
        v("logit_scale"),
    );
    let (e_w, e_b) = (v("ema.img.proj.weight"), v("ema.img.proj.bias"));
    let q = queue.clone();
    let loss_fn = |batch: &tuwen::train::Batch, ctx: &StepCtx| -> tuwen::Result<Tensor> {
        let b = batch.len();
        let x = batch.images.flatten_from(1)?;
        let mut drng = ctx.rng(100);
        let mask: Vec<f32> = (0..b * 8)
            .map(|_| {
                if drng.random::<f32>() < 0.9 {
                    1.0 / 0.9
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 8), &cpu())?;
        let fi = l2n(&(x.matmul(&w_i)?.broadcast_add(&b_i)? * mask)?)?;
        let ft = l2n(&text_features(&batch.captions).matmul(&w_t)?)?;
        let teacher = l2n(&x.matmul(&e_w)?.broadcast_add(&e_b)?)?.detach();
        let mut queue = q.lock().unwrap();
        let keys = Tensor::cat(&[&ft, &*queue], 0)?;
        let s = scale.exp()?;
        let i2t = fi.matmul(&keys.t()?)?.broadcast_mul(&s)?;
        let t2i = ft.matmul(&fi.t()?)?.broadcast_mul(&s)?;
        let distill = (fi - teacher)?.sqr()?.mean_all()?;
        let loss = ((ce_diag(&i2t)? + ce_diag(&t2i)?)? + (distill * 0.1)?)?;
        *queue = Tensor::cat(&[&ft.detach(), &*queue], 0)?.narrow(0, 0, 6)?;
        Ok(loss)
    };
    let summary = Fit::new(&mut trainer, &mut loader, total)
        .checkpoints(&mgr, 4)
        .resume(resume)
        .prefetch(prefetch)
        .log(&mut log, 1)
        .extra_state(&mut extra)
        .config(serde_json::json!({"test": "resume"}))
        .run(loss_fn)
        .unwrap();
    let q = queue.lock().unwrap().copy().unwrap();
    RunResult {
        losses: summary.losses.clone(),
        weights: snapshot(&vm),
        queue: q,
        position: loader.position(),
        summary,
    }
}

#[test]
fn train_resume_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = synthetic_dataset(&dir.path().join("data"), 22);
    let (k, total) = (8u64, 16u64);
    // The uninterrupted run loads on the training thread, the others prefetch: batches
    // must not depend on it.
    let a = contrastive_run(&manifest, &dir.path().join("a"), total, false, 1, 0);
    assert_eq!(a.losses.len(), total as usize);
    assert!(a.summary.skipped_samples > 0, "the bad samples were met");

    let b1 = contrastive_run(&manifest, &dir.path().join("b"), k, false, 1, 2);
    // A fresh process state: new vars (from another init, overwritten by the checkpoint),
    // trainer, loader and queue.
    let b2 = contrastive_run(&manifest, &dir.path().join("b"), total, true, 999, 3);
    let resumed = b2.summary.resumed_from.clone().expect("resumed");
    assert!(resumed.ends_with("step-000000008"), "{}", resumed.display());
    assert_eq!(b2.summary.start_step, k);
    let joined: Vec<(u64, f64)> = b1.losses.iter().chain(&b2.losses).cloned().collect();
    println!(
        "uninterrupted losses: {:?}",
        a.losses.iter().map(|(_, l)| *l).collect::<Vec<_>>()
    );
    println!(
        "resumed at step {k}:     {:?}",
        joined.iter().map(|(_, l)| *l).collect::<Vec<_>>()
    );
    assert_eq!(joined.len(), a.losses.len());
    for ((sa, la), (sb, lb)) in a.losses.iter().zip(&joined) {
        assert_eq!(sa, sb);
        assert_eq!(
            la.to_bits(),
            lb.to_bits(),
            "step {sa}: loss {la} vs resumed {lb}"
        );
    }
    assert_same_bits(&a.weights, &b2.weights, "final weights");
    assert_eq!(bits(&a.queue), bits(&b2.queue), "queue");
    assert_eq!(a.position, b2.position);
    // Losses fell: the run trains something.
    let first: f64 = a.losses[..4].iter().map(|x| x.1).sum();
    let last: f64 = a.losses[12..].iter().map(|x| x.1).sum();
    println!(
        "mean loss first 4 steps {:.4}, last 4 steps {:.4}",
        first / 4.0,
        last / 4.0
    );
    assert!(last < first);
    // The log of the resumed run says so; keep-last-2 kept steps 12 and 16.
    let recs = MetricsLog::read(dir.path().join("b/metrics.jsonl")).unwrap();
    assert!(recs
        .iter()
        .any(|r| r["event"] == "resume" && r["step"] == 8));
    let mgr = CheckpointManager::new(dir.path().join("b"), 2).unwrap();
    let steps: Vec<u64> = mgr.list().unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![12, 16]);
    assert_eq!(mgr.latest_pointer().as_deref(), Some("step-000000016"));
    // The weights file is a plain safetensors file under the model's names.
    let w = load_st(&mgr.latest().unwrap().unwrap().join("model.safetensors"));
    assert!(w.contains_key("img.proj.weight") && w.contains_key("ema.img.proj.weight"));
}

// ---------------------------------------------------------------- crash safety

fn tiny_trainer() -> (VarMap, Trainer) {
    let (vars, _, _) = linear_problem(12);
    let vm = varmap_from(&vars);
    let t = Trainer::from_varmap(&vm, TrainerConfig::default()).unwrap();
    (vm, t)
}

fn ck_at(t: &mut Trainer, vm: &VarMap, step: u64) -> tuwen::train::TrainCheckpoint {
    let (_, xs, ys) = linear_problem(12);
    while t.global_step() < step {
        let i = (t.global_step() % 4) as usize;
        t.step(&[(xs[i].clone(), ys[i].clone())], |(x, y), _| mlp(vm, x, y))
            .unwrap();
    }
    let extra = BTreeMap::from([(
        "queue_ptr".to_string(),
        Tensor::new(step as i64, &cpu()).unwrap(),
    )]);
    t.checkpoint(
        Some(DataPosition {
            epoch: 0,
            cursor: step as usize,
            skipped_total: 0,
            shard: None,
        }),
        extra,
        serde_json::Value::Null,
    )
    .unwrap()
}

#[test]
fn train_checkpoint_interrupted_write_keeps_previous() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, mut t) = tiny_trainer();
    let mut mgr = CheckpointManager::new(dir.path(), 3).unwrap();
    let c1 = ck_at(&mut t, &vm, 1);
    mgr.save(&c1).unwrap();

    // A full disk while writing the optimiser state of step 2.
    mgr.set_before_write(Some(Box::new(|p: &Path| {
        if p.ends_with("optimizer.safetensors") {
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            Ok(())
        }
    })));
    let c2 = ck_at(&mut t, &vm, 2);
    let e = mgr.save(&c2).unwrap_err().to_string();
    println!("interrupted save: {e}");
    assert!(
        e.contains("optimizer.safetensors") && e.contains("No space left"),
        "{e}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        !leftovers.iter().any(|n| n.starts_with(".tmp")),
        "{leftovers:?}"
    );
    let latest = mgr.latest().unwrap().unwrap();
    assert!(latest.ends_with("step-000000001"));
    let loaded = CheckpointManager::load(&latest).unwrap();
    assert_same_bits(&loaded.weights, &c1.weights, "step-1 weights");
    assert_eq!(loaded.meta.data.unwrap().cursor, 1);
    assert_eq!(loaded.extra["queue_ptr"].to_scalar::<i64>().unwrap(), 1);

    // The `latest` pointer cannot be updated: the step directory is complete and wins.
    mgr.set_before_write(Some(Box::new(|p: &Path| {
        if p.ends_with("latest") {
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            Ok(())
        }
    })));
    let e = mgr.save(&c2).unwrap_err().to_string();
    assert!(e.contains("latest"), "{e}");
    assert_eq!(mgr.latest_pointer().as_deref(), Some("step-000000001"));
    assert!(mgr.latest().unwrap().unwrap().ends_with("step-000000002"));
    mgr.set_before_write(None);

    // A crash mid-save leaves a temporary directory; a damaged step directory has a meta
    // whose sizes do not match; a copied one has no meta at all.
    // The temporary names its writer's pid: one of a process that has exited, so it is
    // provably stale (a live writer's temporary is never removed).
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let tmp = dir.path().join(format!(".tmp-step-000000003-{gone_pid}-2"));
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    let damaged = dir.path().join("step-000000004");
    std::fs::create_dir(&damaged).unwrap();
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "extra.safetensors",
        "meta.json",
    ] {
        std::fs::copy(dir.path().join("step-000000002").join(f), damaged.join(f)).unwrap();
    }
    let model = std::fs::read(damaged.join("model.safetensors")).unwrap();
    std::fs::write(damaged.join("model.safetensors"), &model[..model.len() / 2]).unwrap();
    std::fs::create_dir(dir.path().join("step-000000005")).unwrap();
    let latest = mgr.latest().unwrap().unwrap();
    assert!(latest.ends_with("step-000000002"), "{}", latest.display());
    assert!(!tmp.exists(), "temporary directory cleaned at load");
    let ck = mgr.load_latest().unwrap().unwrap();
    assert_eq!(ck.meta.step, 2);
    assert_same_bits(&ck.weights, &c2.weights, "step-2 weights");

    // A fresh trainer restores it exactly, optimiser state included.
    let (vm2, mut t2) = tiny_trainer();
    t2.restore(&ck).unwrap();
    assert_same_bits(&snapshot(&vm2), &snapshot(&vm), "restored weights");
    assert_eq!(t2.global_step(), 2);
    let (s1, s2) = (
        t.optimizer().state_tensors().unwrap(),
        t2.optimizer().state_tensors().unwrap(),
    );
    for (k, v) in &s1 {
        assert_eq!(bits(v), bits(&s2[k]), "{k}");
    }

    // Keep the last 3: steps 6..9 are saved, 1, 2 and 6 pruned.
    for step in [6u64, 7, 8, 9] {
        let c = ck_at(&mut t, &vm, step);
        mgr.save(&c).unwrap();
    }
    let steps: Vec<u64> = mgr.list().unwrap().iter().map(|(s, _)| *s).collect();
    println!("after saving 6..9 with keep-last-3: {steps:?}");
    assert_eq!(steps, vec![7, 8, 9]);
    assert!(!dir.path().join("step-000000001").exists());
    assert!(!dir.path().join("step-000000006").exists());
    assert_eq!(mgr.latest_pointer().as_deref(), Some("step-000000009"));
    // Saving a step again replaces it.
    let c9 = ck_at(&mut t, &vm, 9);
    mgr.save(&c9).unwrap();
    assert_eq!(mgr.list().unwrap().len(), 3);
    // A mismatching model is refused with the tensor's name.
    let other = varmap_from(&[(
        "w1".into(),
        Tensor::zeros((2, 2), DType::F32, &cpu()).unwrap(),
    )]);
    let mut t3 = Trainer::from_varmap(&other, TrainerConfig::default()).unwrap();
    let e = t3.restore(&ck).unwrap_err().to_string();
    assert!(e.contains("w1"), "{e}");
}

// ---------------------------------------------------------------- eval hook

#[test]
fn train_eval_hook_runs_every_n_steps() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = synthetic_dataset(&dir.path().join("data"), 10);
    let vm = varmap_from(&[(
        "w".into(),
        Tensor::ones((108, 2), DType::F32, &cpu()).unwrap(),
    )]);
    let mut trainer = Trainer::from_varmap(&vm, TrainerConfig::default()).unwrap();
    let mut loader =
        DataLoader::new(Manifest::open(&manifest).unwrap(), DataConfig::new(2, 6)).unwrap();
    let mut log = MetricsLog::append(dir.path().join("m.jsonl")).unwrap();
    let w = var_of(&vm, "w");
    let w2 = w.clone();
    let mut calls = Vec::new();
    let mut hook = EvalFn::new("heldout", 3, |steps| {
        calls.push(steps);
        let norm = w2.as_tensor().sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok(BTreeMap::from([
            ("R@1".to_string(), 0.5),
            ("w_norm".to_string(), norm),
        ]))
    });
    let summary = Fit::new(&mut trainer, &mut loader, 7)
        .log(&mut log, 2)
        .eval(&mut hook)
        .progress(true)
        .run(|b, _| {
            Ok(b.images
                .flatten_from(1)?
                .matmul(w.as_tensor())?
                .sqr()?
                .mean_all()?)
        })
        .unwrap();
    drop(hook);
    assert_eq!(calls, vec![3, 6]);
    assert_eq!(summary.evals.len(), 2);
    let recs = MetricsLog::read(dir.path().join("m.jsonl")).unwrap();
    let evals: Vec<_> = recs.iter().filter(|r| r["event"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    assert_eq!(evals[0]["metrics"]["R@1"], 0.5);
    let steps: Vec<u64> = recs
        .iter()
        .filter(|r| r["event"] == "step")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        vec![1, 3, 5],
        "every 2nd step (0-based indices 1, 3, 5)"
    );
    for r in recs.iter().filter(|r| r["event"] == "step") {
        for k in [
            "loss",
            "lr",
            "grad_norm",
            "samples_per_sec",
            "skipped_samples",
            "epoch",
        ] {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
    }
}

// ---------------------------------------------------------------- R2D2 augmentation

fn rgb_of(t: &Tensor) -> image::RgbImage {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3);
    let v: Vec<u8> = t.flatten_all().unwrap().to_vec1().unwrap();
    image::RgbImage::from_raw(w as u32, h as u32, v).unwrap()
}

/// `(largest difference, number of differing values)` between two 8-bit images.
fn u8_diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .fold((0, 0), |(m, n), (x, y)| {
            let d = x.abs_diff(*y);
            (m.max(d), n + (d > 0) as usize)
        })
}

#[test]
fn train_r2d2_augment_ops_match_pil() {
    let r = load_st(&fixture("augment/r2d2_ops.safetensors"));
    let src = rgb_of(get(&r, "src"));
    // Every op is computed like PIL in the same order of operations, so most outputs are
    // bit-exact. The rotations compare to 1 level: the fixture inverts the OpenCV matrix
    // with LAPACK, this crate in closed form, and an ulp of difference in the sample
    // position can move PIL's truncation of the bilinear value across an integer. The
    // bicubic crop-resize compares to 1 level too (the crate's PIL resize, whose own
    // tests allow that).
    let mut cases: Vec<(String, RandOp, u8)> = vec![
        ("autocontrast".into(), RandOp::AutoContrast, 0),
        ("equalize".into(), RandOp::Equalize, 0),
    ];
    for f in ["1.36", "0.55"] {
        let v: f32 = f.parse().unwrap();
        cases.push((format!("brightness_{f}"), RandOp::Brightness(v), 0));
    }
    for f in ["1.36", "0.3", "1.9"] {
        let v: f32 = f.parse().unwrap();
        cases.push((format!("sharpness_{f}"), RandOp::Sharpness(v), 0));
    }
    for f in ["0.15", "-0.21"] {
        let v: f64 = f.parse().unwrap();
        cases.push((format!("shear_x_{f}"), RandOp::ShearX(v), 0));
        cases.push((format!("shear_y_{f}"), RandOp::ShearY(v), 0));
    }
    for f in ["3.5", "-2.0"] {
        let v: f64 = f.parse().unwrap();
        cases.push((format!("translate_x_{f}"), RandOp::TranslateX(v), 0));
        cases.push((format!("translate_y_{f}"), RandOp::TranslateY(v), 0));
    }
    for f in ["21.0", "-14.0"] {
        let v: f64 = f.parse().unwrap();
        cases.push((format!("rotate_{f}"), RandOp::Rotate(v), 1));
    }
    for (name, op, tol) in &cases {
        let want = rgb_of(get(&r, name));
        let got = apply_op(&src, *op);
        let (max, n) = u8_diff(&got, &want);
        println!("{name}: max diff {max}, {n} values differ");
        assert!(max <= *tol, "{name}: max diff {max} ({n} values)");
        assert_ne!(got, src, "{name} changed the image");
    }
    assert_eq!(hflip(&src), rgb_of(get(&r, "hflip")));
    // The geometric ops fill uncovered pixels with R2D2's grey.
    let moved = apply_op(&src, RandOp::TranslateX(3.0));
    assert!(moved.pixels().rev().take(2).all(|p| p.0 == R2D2_FILL));
    // The crop and bicubic resize of RandomResizedCrop (top 2, left 3, 9×11, to 8×8).
    let crop = image::imageops::crop_imm(&src, 3, 2, 11, 9).to_image();
    let got = tuwen::preprocess::image::resize_pil(
        &crop,
        8,
        8,
        tuwen::preprocess::image::Resample::Bicubic,
    )
    .unwrap();
    let (max, n) = u8_diff(&got, &rgb_of(get(&r, "resized_crop")));
    println!("resized_crop: max diff {max}, {n} values differ");
    assert!(max <= 1);
}

#[test]
fn train_r2d2_resized_crop_box_follows_torchvision() {
    let r = load_st(&fixture("augment/r2d2_ops.safetensors"));
    let (scale, ratio) = ([0.5, 1.0], [3.0 / 4.0, 4.0 / 3.0]);
    // Images no try fits: torchvision's centre-crop fallback, box for box.
    let boxes = get(&r, "fallback_boxes").to_vec2::<i64>().unwrap();
    for b in &boxes {
        let (w, h) = (b[0] as u32, b[1] as u32);
        let want = (b[2] as u32, b[3] as u32, b[4] as u32, b[5] as u32);
        for seed in 0..5 {
            let mut rng = derive_rng(seed, &[1]);
            assert_eq!(
                random_resized_crop_box(w, h, scale, ratio, &mut rng),
                want,
                "{w}x{h}"
            );
        }
    }
    // Sampled boxes: inside the image, area and aspect ratio within the ranges up to
    // the rounding of each side, offsets uniform over the positions that fit.
    for (w, h) in [(40u32, 30u32), (300, 200), (17, 13), (64, 64)] {
        let (mut tops, mut lefts) = (Vec::new(), Vec::new());
        let mut areas = Vec::new();
        for seed in 0..400 {
            let mut rng = derive_rng(seed, &[w as u64, h as u64]);
            let (top, left, bh, bw) = random_resized_crop_box(w, h, scale, ratio, &mut rng);
            assert!(bw >= 1 && bh >= 1 && left + bw <= w && top + bh <= h);
            let (fw, fh) = (bw as f64, bh as f64);
            let area = (w * h) as f64;
            assert!(
                (fw + 0.5) * (fh + 0.5) >= scale[0] * area,
                "{w}x{h}: {bw}x{bh}"
            );
            assert!(
                (fw - 0.5) * (fh - 0.5) <= scale[1] * area,
                "{w}x{h}: {bw}x{bh}"
            );
            assert!((fw + 0.5) / (fh - 0.5) >= ratio[0] && (fw - 0.5) / (fh + 0.5) <= ratio[1]);
            tops.push((top, h - bh));
            lefts.push((left, w - bw));
            areas.push(fw * fh / area);
        }
        // Both ends of the offset ranges occur, and small and large crops.
        assert!(tops.iter().any(|&(t, _)| t == 0) && tops.iter().any(|&(t, m)| t == m && m > 0));
        assert!(lefts.iter().any(|&(l, _)| l == 0) && lefts.iter().any(|&(l, m)| l == m && m > 0));
        let lo = areas.iter().filter(|&&a| a < 0.65).count();
        let hi = areas.iter().filter(|&&a| a > 0.8).count();
        assert!(lo > 40 && hi > 0, "{w}x{h}: {lo} small, {hi} large crops");
    }
}

#[test]
fn train_r2d2_augment_is_deterministic_per_sample() {
    let aug = R2d2Augment::default();
    // RandAugment at R2D2's magnitude 5: 2 draws at p = 0.5, every op, enhance factor 1.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut applied = 0;
    let n = 4000;
    for seed in 0..n {
        let ops = aug.sample_ops(&mut derive_rng(seed, &[3]));
        applied += ops.len();
        for op in ops {
            match op {
                RandOp::Brightness(f) | RandOp::Sharpness(f) => assert_eq!(f, 1.0),
                RandOp::ShearX(v) | RandOp::ShearY(v) => assert_eq!(v.abs(), 0.15),
                RandOp::TranslateX(v) | RandOp::TranslateY(v) => assert_eq!(v.abs(), 5.0),
                RandOp::Rotate(v) => assert_eq!(v.abs(), 15.0),
                _ => {}
            }
            let name = format!("{op:?}");
            let key = name.split('(').next().unwrap().to_string();
            *counts.entry(key).or_default() += 1;
        }
    }
    let mean = applied as f64 / n as f64;
    assert!((mean - 1.0).abs() < 0.05, "{mean} ops per image");
    assert_eq!(counts.len(), R2D2_OPS.len(), "{counts:?}");
    for (k, c) in &counts {
        let share = *c as f64 / applied as f64;
        assert!((share - 0.1).abs() < 0.02, "{k}: {share}");
    }

    // Through a loader: per (seed, epoch, index), sized and normalised.
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::open(&synthetic_dataset(dir.path(), 6)).unwrap();
    let mk = |seed| {
        let mut cfg = DataConfig {
            seed,
            ..DataConfig::new(2, 8)
        };
        cfg.pipeline = cfg.pipeline.with_r2d2_augment();
        DataLoader::new(m.clone(), cfg).unwrap()
    };
    let (a, b, c) = (mk(1), mk(1), mk(2));
    let x0 = a.load_sample(1, 0).unwrap().0;
    assert_eq!(x0.len(), 3 * 64);
    assert_eq!(x0, b.load_sample(1, 0).unwrap().0);
    assert_ne!(x0, a.load_sample(1, 1).unwrap().0, "another epoch");
    assert_ne!(x0, c.load_sample(1, 0).unwrap().0, "another seed");
    // Invalid settings are refused when the loader is built.
    let mut cfg = DataConfig::new(2, 8);
    cfg.pipeline.r2d2 = Some(R2d2Augment {
        scale: [1.0, 0.5],
        ..R2d2Augment::default()
    });
    assert!(DataLoader::new(m.clone(), cfg).is_err());
    // The same augmentation by hand: crop box, flip and ops from one generator.
    let img = image::open(&m.samples[1].image).unwrap().to_rgb8();
    let mut rng = derive_rng(5, &[9]);
    let out = aug.apply(&img, 8, &mut rng).unwrap();
    assert_eq!(out.dimensions(), (8, 8));
    assert_eq!(out, aug.apply(&img, 8, &mut derive_rng(5, &[9])).unwrap());
}
