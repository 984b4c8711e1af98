//! R2D2 / PRD2 training objectives: parity of each loss and its gradients with the PyTorch
//! re-statement (`tests/fixtures/gen_r2d2_train.py`), gradient coverage per objective,
//! checkpointable teacher and queue, and a learning test on synthetic captioned images.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tuwen::checkpoint::{parameter_shapes, Loader, TensorSource};
use tuwen::models::r2d2::{JointConfig, R2d2, R2d2Config};
use tuwen::nn::{Activation, BertConfig, ClipVisionConfig};
use tuwen::preprocess::{ImageProcessor, TextProcessor, TextStyle};
use tuwen::train::dist::{Collective, LocalGroup};
use tuwen::train::r2d2::{
    fgr_loss, gcpr_loss, hard_negative_weights, image_keys, mask_text_tokens,
    sample_hard_negatives, sample_kept_tokens, tgd_loss, FeatureLoss, FeatureQueue, HardNegatives,
    R2d2Inputs, R2d2LossConfig, R2d2Objective, TeacherWorld, World,
};
use tuwen::train::rng::derive_rng;
use tuwen::train::{
    grad_coverage, synthetic, AdamWConfig, DataConfig, DataLoader, ImagePipeline, Objective,
    ParamGroupConfig, Schedule, StepCtx, Trainer, TrainerConfig,
};

use crate::common::test_device;
use crate::common::{fixture, get, load_st, max_abs_diff};

/// Relative tolerance of the loss and gradient parity checks.
const REL: f32 = 1e-4;

fn refs() -> HashMap<String, Tensor> {
    load_st(&fixture("r2d2_train/ref.safetensors"))
}

fn ref_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("r2d2_train/ref.json")).unwrap()).unwrap()
}

/// The tiny fixture's configuration (as in `r2d2.rs`).
fn tiny_config() -> R2d2Config {
    let vision = ClipVisionConfig {
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_channels: 3,
        image_size: 56,
        patch_size: 14,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    let text = BertConfig {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 256,
        ..BertConfig::chinese_roberta_wwm_ext()
    };
    R2d2Config {
        model_type: "r2d2".into(),
        vision_config: vision,
        text_config: text,
        joint_config: Some(JointConfig {
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 256,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
        }),
        embed_dim: 32,
        max_text_len: 64,
    }
}

/// The tiny fixture model with every weight a trainable var.
fn tiny_trainable() -> (R2d2, VarMap) {
    let src = TensorSource::open(&fixture("original/r2d2_tiny.pth"), Some("model")).unwrap();
    let (loader, vars) = Loader::new(src, "r2d2_tiny.pth").trainable().unwrap();
    let vb = loader.var_builder(DType::F32, &test_device());
    let net = R2d2::new(&tiny_config(), vb)
        .map_err(|e| loader.error(e))
        .unwrap();
    (net, vars)
}

struct Fixed {
    pixels: Tensor,
    ids: Tensor,
    mask: Tensor,
    keys: Vec<i64>,
}

fn fixed_batch(r: &HashMap<String, Tensor>) -> Fixed {
    Fixed {
        pixels: get(r, "pixel_values").clone(),
        ids: get(r, "input_ids").clone(),
        mask: get(r, "attention_mask").clone(),
        keys: get(r, "image_ids").to_vec1::<i64>().unwrap(),
    }
}

fn usize_vec(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

fn var(vars: &VarMap, name: &str) -> Var {
    vars.data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no var {name}"))
        .clone()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs_diff(a, b) / scale.max(1e-6)
}

/// Checks a loss value and the gradients of the fixture's chosen parameters.
fn check_loss_and_grads(name: &str, loss: &Tensor, vars: &VarMap, r: &HashMap<String, Tensor>) {
    let want = get(r, &format!("{name}.loss"));
    let got = loss.reshape(1).unwrap();
    let d = rel_diff(&got, want);
    println!(
        "{name}: loss {:.8} (torch {:.8}), rel diff {d:.2e}",
        got.to_vec1::<f32>().unwrap()[0],
        want.to_vec1::<f32>().unwrap()[0]
    );
    assert!(d <= REL, "{name}: loss rel diff {d}");
    let grads = loss.backward().unwrap();
    let mut worst = 0f32;
    for key in ref_json()["grad_keys"].as_array().unwrap() {
        let key = key.as_str().unwrap();
        let want = get(r, &format!("{name}.grad.{key}"));
        let v = var(vars, key);
        let got = match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => want.zeros_like().unwrap(),
        };
        let want_zero = want
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0;
        if want_zero {
            let m = got.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(
                m.to_scalar::<f32>().unwrap() < 1e-7,
                "{name}: {key} should get no gradient"
            );
            continue;
        }
        let d = rel_diff(&got, want);
        worst = worst.max(d);
        assert!(d <= REL, "{name}: gradient of {key}: rel diff {d}");
    }
    println!("{name}: worst gradient rel diff {worst:.2e}");
}

#[test]
fn gcpr_loss_and_gradients_match_pytorch() {
    let r = refs();
    let (net, vars) = tiny_trainable();
    let b = fixed_batch(&r);
    let (_, img) = net.encode_image(&b.pixels).unwrap();
    let (_, txt) = net.encode_text(&b.ids, &b.mask).unwrap();
    let world = World::local(&img, &txt, &b.keys).unwrap();
    let loss = gcpr_loss(&img, &txt, &b.keys, &world, &net.temp).unwrap();
    check_loss_and_grads("gcpr", &loss, &vars, &r);
}

#[test]
fn fgr_loss_with_given_negatives_matches_pytorch() {
    let r = refs();
    let (net, vars) = tiny_trainable();
    let b = fixed_batch(&r);
    let (tokens, img) = net.encode_image(&b.pixels).unwrap();
    let (states, txt) = net.encode_text(&b.ids, &b.mask).unwrap();
    let world = World::local(&img, &txt, &b.keys)
        .unwrap()
        .with_local_fgr(&tokens, &states, &b.mask);
    // The sampler's weights match too.
    let (w_i2t, w_t2i) = hard_negative_weights(&img, &txt, &b.keys, &world, &net.temp).unwrap();
    let d1 = max_abs_diff(&w_i2t, get(&r, "weights_i2t"));
    let d2 = max_abs_diff(&w_t2i, get(&r, "weights_t2i"));
    println!("hard-negative weights: max diff {d1:.2e} / {d2:.2e}");
    assert!(d1 < 1e-5 && d2 < 1e-5);
    let negs = HardNegatives {
        image_for_text: usize_vec(get(&r, "image_neg")),
        text_for_image: usize_vec(get(&r, "text_neg")),
    };
    let loss = fgr_loss(&net, &tokens, &states, &b.mask, &world, &negs, [1.0, 2.0]).unwrap();
    check_loss_and_grads("fgr", &loss, &vars, &r);

    // Bad negatives are named, not indexed out of bounds.
    let n = negs.image_for_text.len();
    let short = HardNegatives {
        image_for_text: negs.image_for_text[1..].to_vec(),
        text_for_image: negs.text_for_image.clone(),
    };
    let err = fgr_loss(&net, &tokens, &states, &b.mask, &world, &short, [1.0, 2.0]).unwrap_err();
    assert!(err.to_string().contains("negatives for a batch"), "{err}");
    let mut beyond = negs.clone();
    beyond.text_for_image[0] = n;
    let err = fgr_loss(&net, &tokens, &states, &b.mask, &world, &beyond, [1.0, 2.0]).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

/// Sets the objective's teacher to the student scaled by 0.98, through the checkpoint
/// path (`ExtraState::load_state`), as the fixture's teacher.
fn load_scaled_teacher(obj: &R2d2Objective, vars: &VarMap) {
    let mut m = BTreeMap::new();
    for (k, v) in vars.data().lock().unwrap().iter() {
        m.insert(format!("teacher.{k}"), (v.as_tensor() * 0.98).unwrap());
    }
    obj.extra_state().unwrap().load_state(&m).unwrap();
}

#[test]
fn tgd_loss_and_gradients_match_pytorch() {
    let r = refs();
    let (net, vars) = tiny_trainable();
    let b = fixed_batch(&r);
    let cfg = R2d2LossConfig {
        queue_size: 6,
        ..R2d2LossConfig::default()
    };
    let obj = R2d2Objective::new(cfg, &net, &vars).unwrap();
    load_scaled_teacher(&obj, &vars);
    let queue = FeatureQueue::from_parts(
        get(&r, "queue_image").clone(),
        get(&r, "queue_text").clone(),
        get(&r, "queue_ids").to_vec1::<i64>().unwrap(),
        0,
    )
    .unwrap();
    let (t_img, t_txt) = obj
        .teacher_features(&b.pixels, &b.ids, &b.mask)
        .unwrap()
        .unwrap();
    let d = max_abs_diff(&t_img, get(&r, "teacher_image_feat"))
        .max(max_abs_diff(&t_txt, get(&r, "teacher_text_feat")));
    println!("teacher features: max diff {d:.2e}");
    assert!(d < 1e-5);
    let (_, img) = net.encode_image(&b.pixels).unwrap();
    let (_, txt) = net.encode_text(&b.ids, &b.mask).unwrap();
    let alpha = ref_json()["alpha"].as_f64().unwrap();
    let loss = tgd_loss(
        &img,
        &txt,
        &t_img,
        &t_txt,
        &b.keys,
        TeacherWorld {
            image: &t_img,
            text: &t_txt,
            ids: &b.keys,
        },
        Some(&queue),
        &net.temp,
        alpha,
    )
    .unwrap();
    check_loss_and_grads("tgd", &loss, &vars, &r);
}

#[test]
fn fgd_loss_and_gradients_match_pytorch() {
    let r = refs();
    let b = fixed_batch(&r);
    let keep: Vec<Vec<usize>> = get(&r, "keep_tokens")
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|x| x as usize).collect())
        .collect();
    let masked = get(&r, "masked_input_ids");
    for (kind, name) in [
        (FeatureLoss::Cosine, "fgd_cosine"),
        (FeatureLoss::Mse, "fgd_mse"),
    ] {
        let (net, vars) = tiny_trainable();
        let cfg = R2d2LossConfig {
            feature_loss: kind,
            patch_drop_ratio: 0.25,
            ..R2d2LossConfig::default()
        };
        let obj = R2d2Objective::new(cfg, &net, &vars).unwrap();
        load_scaled_teacher(&obj, &vars);
        let x = R2d2Inputs {
            pixel_values: &b.pixels,
            input_ids: &b.ids,
            attention_mask: &b.mask,
            image_ids: &b.keys,
        };
        let loss = obj.fgd_with_masks(&x, masked, Some(&keep)).unwrap();
        check_loss_and_grads(name, &loss, &vars, &r);
    }
}

#[test]
fn samplers_respect_positives_and_are_seeded() {
    let r = refs();
    let (net, _) = tiny_trainable();
    let b = fixed_batch(&r);
    let (_, img) = net.encode_image(&b.pixels).unwrap();
    let (_, txt) = net.encode_text(&b.ids, &b.mask).unwrap();
    let world = World::local(&img, &txt, &b.keys).unwrap();
    let (w_i2t, w_t2i) = hard_negative_weights(&img, &txt, &b.keys, &world, &net.temp).unwrap();
    let mut seen = Vec::new();
    for seed in 0..50u64 {
        let a = sample_hard_negatives(&w_i2t, &w_t2i, 0, &mut derive_rng(seed, &[7])).unwrap();
        let again = sample_hard_negatives(&w_i2t, &w_t2i, 0, &mut derive_rng(seed, &[7])).unwrap();
        assert_eq!(a, again);
        for i in 0..4 {
            assert_ne!(b.keys[a.image_for_text[i]], b.keys[i]);
            assert_ne!(b.keys[a.text_for_image[i]], b.keys[i]);
        }
        seen.push(a);
    }
    assert!(
        seen.iter().any(|s| s != &seen[0]),
        "the sampler never varies"
    );
    // Text masking: never CLS, SEP or padding; about the configured ratio.
    let mut rng = derive_rng(3, &[1]);
    let masked = mask_text_tokens(&b.ids, &b.mask, 0.15, 103, &mut rng).unwrap();
    let (ids, m, mk) = (
        b.ids.to_vec2::<i64>().unwrap(),
        b.mask.to_vec2::<i64>().unwrap(),
        masked.to_vec2::<i64>().unwrap(),
    );
    let (mut eligible, mut hit) = (0, 0);
    for i in 0..ids.len() {
        let len = m[i].iter().filter(|&&x| x != 0).count();
        for j in 0..ids[i].len() {
            if j == 0 || j + 1 >= len {
                assert_eq!(ids[i][j], mk[i][j]);
            } else {
                eligible += 1;
                hit += usize::from(mk[i][j] == 103 && ids[i][j] != 103);
            }
        }
    }
    assert!(hit > 0 && hit < eligible / 2, "{hit} of {eligible} masked");
    let keep = sample_kept_tokens(3, 16, 0.25, &mut derive_rng(1, &[2]));
    for k in &keep {
        assert_eq!(k.len(), 13);
        assert_eq!(k[0], 0);
        assert!(k.windows(2).all(|w| w[0] < w[1]) && *k.last().unwrap() <= 16);
    }
    assert_ne!(keep[0], keep[1]);
}

// ---------------------------------------------------------------------------------------
// FGR negatives across data-parallel ranks
// ---------------------------------------------------------------------------------------

/// A global batch of 8 pairs: the fixture's 4 and 4 more (pixels scaled by −0.8, the
/// texts rotated by one, keys shifted by 1000).
fn global_fgr_batch() -> Fixed {
    let a = fixed_batch(&refs());
    let rot = Tensor::new(&[1u32, 2, 3, 0], &test_device()).unwrap();
    let cat = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0).unwrap();
    let mut keys = a.keys.clone();
    keys.extend(a.keys.iter().map(|k| k + 1000));
    Fixed {
        pixels: cat(&a.pixels, &(&a.pixels * -0.8).unwrap()),
        ids: cat(&a.ids, &a.ids.index_select(&rot, 0).unwrap()),
        mask: cat(&a.mask, &a.mask.index_select(&rot, 0).unwrap()),
        keys,
    }
}

/// Rank `rank`'s share of `g` among `world` ranks.
fn rank_share(g: &Fixed, rank: usize, world: usize) -> Fixed {
    let b = g.keys.len() / world;
    Fixed {
        pixels: g.pixels.narrow(0, rank * b, b).unwrap(),
        ids: g.ids.narrow(0, rank * b, b).unwrap(),
        mask: g.mask.narrow(0, rank * b, b).unwrap(),
        keys: g.keys[rank * b..(rank + 1) * b].to_vec(),
    }
}

fn fgr_only() -> R2d2LossConfig {
    R2d2LossConfig {
        gcpr_weight: 0.0,
        fgr_weight: 1.0,
        tgd_weight: 0.0,
        fgd_weight: 0.0,
        ..R2d2LossConfig::default()
    }
}

/// Each rank's FGR negatives (indices into the gathered batch) over `steps` steps of the
/// objective with 2 workers and run seed `seed`.
fn dp_fgr_negatives(seed: u64, steps: u64) -> Vec<Vec<HardNegatives>> {
    let g = global_fgr_batch();
    LocalGroup::run(2, |comm: Arc<dyn Collective>| {
        let (net, vars) = tiny_trainable();
        let obj = R2d2Objective::new(fgr_only(), &net, &vars)?.with_collective(comm.clone());
        let x = rank_share(&g, comm.rank(), 2);
        let inputs = R2d2Inputs {
            pixel_values: &x.pixels,
            input_ids: &x.ids,
            attention_mask: &x.mask,
            image_ids: &x.keys,
        };
        (0..steps)
            .map(|step| {
                let ctx = StepCtx {
                    step,
                    micro: 0,
                    n_micro: 1,
                    seed,
                    rank: 0,
                };
                let l = obj.loss(&inputs, &ctx)?;
                assert!(l.fgr.unwrap().is_finite());
                Ok(l.fgr_negatives.expect("FGR ran"))
            })
            .collect()
    })
    .unwrap()
}

/// With 2 workers, each rank draws its FGR negatives from the 8 pairs of both ranks
/// (never a positive, and some from the other rank), and the draws are fixed by the seed.
#[test]
fn fgr_negatives_are_drawn_from_every_rank_and_seeded() {
    let g = global_fgr_batch();
    let steps = 6;
    let a = dp_fgr_negatives(11, steps);
    let mut foreign = [0usize; 2];
    for (rank, per_step) in a.iter().enumerate() {
        assert_eq!(per_step.len(), steps as usize);
        for negs in per_step {
            for (i, (&img, &txt)) in negs
                .image_for_text
                .iter()
                .zip(&negs.text_for_image)
                .enumerate()
            {
                let own = rank * 4 + i;
                for j in [img, txt] {
                    assert!(j < 8, "index {j} outside the gathered batch");
                    assert_ne!(
                        g.keys[j], g.keys[own],
                        "rank {rank}: a positive as negative"
                    );
                    foreign[rank] += usize::from(j / 4 != rank);
                }
            }
        }
    }
    println!(
        "FGR negatives from the other rank: rank 0 {} / {}, rank 1 {} / {}",
        foreign[0],
        8 * steps,
        foreign[1],
        8 * steps
    );
    assert!(
        foreign[0] > 0 && foreign[1] > 0,
        "no negative came from the other rank: {foreign:?}"
    );
    // Deterministic per seed; another seed draws differently.
    assert_eq!(dp_fgr_negatives(11, steps), a);
    assert_ne!(dp_fgr_negatives(12, steps), a);
}

fn grads_by_name(vars: &VarMap, loss: &Tensor) -> BTreeMap<String, Tensor> {
    let store = loss.backward().unwrap();
    vars.data()
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| store.get(v.as_tensor()).map(|g| (k.clone(), g.clone())))
        .collect()
}

/// FGR over 2 workers of 4 pairs, with negatives fixed across the ranks, has the loss and
/// (ranks' gradients averaged, as the trainer does) the gradients of one worker over the
/// 8 pairs with the same negatives; the sampling weights of a rank's rows are the
/// single worker's rows.
#[test]
fn fgr_across_ranks_equals_one_worker_with_the_same_negatives() {
    let g = global_fgr_batch();
    // Global negatives, most from the other half of the batch.
    let negs = HardNegatives {
        image_for_text: (0..8).map(|i| (i + 4 + i % 3) % 8).collect(),
        text_for_image: (0..8).map(|i| (i + 5) % 8).collect(),
    };
    let (net, vars) = tiny_trainable();
    let (tokens, img) = net.encode_image(&g.pixels).unwrap();
    let (states, txt) = net.encode_text(&g.ids, &g.mask).unwrap();
    let world = World::local(&img, &txt, &g.keys)
        .unwrap()
        .with_local_fgr(&tokens, &states, &g.mask);
    let (w_i2t, w_t2i) = hard_negative_weights(&img, &txt, &g.keys, &world, &net.temp).unwrap();
    let single = fgr_loss(&net, &tokens, &states, &g.mask, &world, &negs, [1.0, 2.0]).unwrap();
    let single_loss = single.to_scalar::<f32>().unwrap();
    let single_grads = grads_by_name(&vars, &single);

    let ranks = LocalGroup::run(2, |comm: Arc<dyn Collective>| {
        let (net, vars) = tiny_trainable();
        let r = comm.rank();
        let x = rank_share(&g, r, 2);
        let (tokens, img) = net.encode_image(&x.pixels)?;
        let (states, txt) = net.encode_text(&x.ids, &x.mask)?;
        let fgr = Some((&tokens, &x.ids, &x.mask));
        let world = World::gather(&comm, &img, &txt, &x.keys, fgr)?;
        assert_eq!(world.ids, g.keys);
        assert_eq!(world.offset, 4 * r);
        let w = hard_negative_weights(&img, &txt, &x.keys, &world, &net.temp)?;
        let mine = HardNegatives {
            image_for_text: negs.image_for_text[4 * r..4 * r + 4].to_vec(),
            text_for_image: negs.text_for_image[4 * r..4 * r + 4].to_vec(),
        };
        let loss = fgr_loss(&net, &tokens, &states, &x.mask, &world, &mine, [1.0, 2.0])?;
        Ok((loss.to_scalar::<f32>()?, grads_by_name(&vars, &loss), w))
    })
    .unwrap();

    for (r, (_, _, (wi, wt))) in ranks.iter().enumerate() {
        let di = max_abs_diff(wi, &w_i2t.narrow(0, 4 * r, 4).unwrap());
        let dt = max_abs_diff(wt, &w_t2i.narrow(0, 4 * r, 4).unwrap());
        assert!(
            di < 1e-6 && dt < 1e-6,
            "rank {r}: weights differ by {di} / {dt}"
        );
    }
    let mean_loss = (ranks[0].0 + ranks[1].0) / 2.0;
    let dl = (mean_loss - single_loss).abs() / single_loss.abs();
    println!("FGR 2 ranks vs 1 worker: loss {mean_loss:.6} vs {single_loss:.6} (rel {dl:.2e})");
    assert!(dl < 1e-5, "loss rel diff {dl}");
    // Relative to each gradient's largest element, floored at 1e-3 of the largest
    // gradient element overall: attention key biases have gradient zero in exact
    // arithmetic (softmax ignores a constant shift) and hold rounding noise only.
    let abs_max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let global = single_grads.values().map(abs_max).fold(0f32, f32::max);
    let mut worst = (0f32, String::new());
    for (name, want) in &single_grads {
        let got: Vec<&Tensor> = ranks.iter().filter_map(|r| r.1.get(name)).collect();
        assert_eq!(got.len(), 2, "{name}: a rank has no gradient");
        let avg = ((got[0] + got[1]).unwrap() * 0.5).unwrap();
        let d = max_abs_diff(&avg, want) / abs_max(want).max(1e-3 * global);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    for r in &ranks {
        assert_eq!(r.1.len(), single_grads.len(), "gradient sets differ");
    }
    println!(
        "FGR 2 ranks vs 1 worker: {} gradients, worst rel diff {:.2e} ({})",
        single_grads.len(),
        worst.0,
        worst.1
    );
    assert!(
        worst.0 < 1e-4,
        "gradient of {} differs by {}",
        worst.1,
        worst.0
    );
}

/// PRD2's objectives (GCPR + TgD with its queue) over 2 and 4 workers sharing 8 pairs: the
/// ranks' mean loss and averaged gradients equal one worker's over all 8 pairs, for two
/// steps (the second one reads the queue the first filled), and every rank ends with the
/// single worker's queue. GCPR gathers the features with gradient, TgD the teacher's.
#[test]
fn prd2_objectives_across_ranks_equal_one_worker() {
    let g = global_fgr_batch();
    let cfg = R2d2LossConfig {
        gcpr_weight: 1.0,
        fgr_weight: 0.0,
        tgd_weight: 1.0,
        fgd_weight: 0.0,
        queue_size: 16,
        ..R2d2LossConfig::default()
    };
    type StepOut = (f32, BTreeMap<String, Tensor>);
    let run = |obj: &R2d2Objective, vars: &VarMap, x: &Fixed| -> Vec<StepOut> {
        let inputs = R2d2Inputs {
            pixel_values: &x.pixels,
            input_ids: &x.ids,
            attention_mask: &x.mask,
            image_ids: &x.keys,
        };
        (0..2)
            .map(|s| {
                let l = obj.loss(&inputs, &step_ctx(s)).unwrap();
                (
                    l.total.to_scalar::<f32>().unwrap(),
                    grads_by_name(vars, &l.total),
                )
            })
            .collect()
    };
    let (net, vars) = tiny_trainable();
    let obj = R2d2Objective::new(cfg.clone(), &net, &vars).unwrap();
    let single = run(&obj, &vars, &g);
    let single_queue = obj.queue().unwrap();
    let abs_max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for world in [2usize, 4] {
        let ranks = LocalGroup::run(world, |comm: Arc<dyn Collective>| {
            let (net, vars) = tiny_trainable();
            let obj = R2d2Objective::new(cfg.clone(), &net, &vars)?.with_collective(comm.clone());
            let x = rank_share(&g, comm.rank(), world);
            let out = run(&obj, &vars, &x);
            Ok((out, obj.queue()))
        })
        .unwrap();
        for (step, (want, want_grads)) in single.iter().enumerate() {
            let want = *want;
            let mean = ranks.iter().map(|r| r.0[step].0).sum::<f32>() / world as f32;
            let dl = (mean - want).abs() / want.abs();
            println!("PRD2 {world} ranks, step {step}: loss {mean:.6} vs {want:.6} (rel {dl:.2e})");
            assert!(dl < 1e-5, "{world} ranks, step {step}: loss rel diff {dl}");
            // Relative to each gradient's largest element, floored at 1e-3 of the largest
            // element overall (as in the FGR test: some biases hold rounding noise only).
            let global = want_grads.values().map(abs_max).fold(0f32, f32::max);
            let mut worst = (0f32, String::new());
            for (name, want) in want_grads {
                let got: Vec<&Tensor> =
                    ranks.iter().filter_map(|r| r.0[step].1.get(name)).collect();
                assert_eq!(got.len(), world, "{name}: a rank has no gradient");
                let mut sum = got[0].clone();
                for g in &got[1..] {
                    sum = (sum + *g).unwrap();
                }
                let avg = (sum / world as f64).unwrap();
                let d = max_abs_diff(&avg, want) / abs_max(want).max(1e-3 * global);
                if d > worst.0 {
                    worst = (d, name.clone());
                }
            }
            println!(
                "PRD2 {world} ranks, step {step}: worst gradient rel diff {:.2e} ({})",
                worst.0, worst.1
            );
            assert!(
                worst.0 < 1e-5,
                "{world} ranks, step {step}: {} differs by {}",
                worst.1,
                worst.0
            );
        }
        for (r, (_, q)) in ranks.iter().enumerate() {
            let q = q.as_ref().expect("a rank lost its queue");
            assert_eq!(q.ids, single_queue.ids, "rank {r}: queue keys");
            assert_eq!(q.ptr, single_queue.ptr, "rank {r}: queue pointer");
            let d = max_abs_diff(&q.image, &single_queue.image)
                .max(max_abs_diff(&q.text, &single_queue.text));
            assert!(
                d < 1e-6,
                "{world} ranks, rank {r}: queue features differ by {d}"
            );
        }
    }
}

fn step_ctx(step: u64) -> StepCtx {
    StepCtx::single(step, 11)
}

/// Every trainable parameter an objective reaches gets a non-zero, finite gradient, and
/// all four together reach every parameter.
#[test]
fn every_trainable_parameter_gets_a_gradient_under_each_objective() {
    let r = refs();
    let b = fixed_batch(&r);
    let x = R2d2Inputs {
        pixel_values: &b.pixels,
        input_ids: &b.ids,
        attention_mask: &b.mask,
        image_ids: &b.keys,
    };
    let towers = |n: &str| {
        n.starts_with("visual_encoder.")
            || n.starts_with("text_encoder.")
            || n.starts_with("vision_proj.")
            || n.starts_with("text_proj.")
    };
    let joint = |n: &str| {
        n.starts_with("text_joint_layer.")
            || n.starts_with("img_joint_layer.")
            || n.starts_with("img_joint_proj.")
            || n.starts_with("itm_head")
    };
    type Reaches = Box<dyn Fn(&str) -> bool>;
    let cases: Vec<(&str, [f64; 4], Reaches)> = vec![
        (
            "gcpr",
            [1.0, 0.0, 0.0, 0.0],
            Box::new(move |n| towers(n) || n == "temp"),
        ),
        (
            "fgr",
            [0.0, 1.0, 0.0, 0.0],
            Box::new(move |n| {
                joint(n) || n.starts_with("visual_encoder.") || n.starts_with("text_encoder.")
            }),
        ),
        (
            "tgd",
            [0.0, 0.0, 1.0, 0.0],
            Box::new(move |n| towers(n) || n == "temp"),
        ),
        ("fgd", [0.0, 0.0, 0.0, 1.0], Box::new(move |n| towers(n))),
        ("all", [1.0, 1.0, 1.0, 1.0], Box::new(|_| true)),
    ];
    for (name, w, expected) in cases {
        let (net, vars) = tiny_trainable();
        let cfg = R2d2LossConfig {
            gcpr_weight: w[0],
            fgr_weight: w[1],
            tgd_weight: w[2],
            fgd_weight: w[3],
            queue_size: 8,
            ..R2d2LossConfig::default()
        };
        let obj = R2d2Objective::new(cfg, &net, &vars).unwrap();
        let losses = obj.loss(&x, &step_ctx(0)).unwrap();
        let named: Vec<(String, Var)> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let store = losses.total.backward().unwrap();
        let cov = grad_coverage(&named, &store).unwrap();
        assert!(
            cov.non_finite.is_empty(),
            "{name}: non-finite {:?}",
            cov.non_finite
        );
        let lacking: Vec<&String> = cov
            .zero
            .iter()
            .chain(&cov.missing)
            .filter(|n| expected(n))
            .collect();
        assert!(lacking.is_empty(), "{name}: no gradient for {lacking:?}");
        let reached = cov.nonzero.iter().filter(|n| expected(n)).count();
        println!(
            "{name}: {reached} parameters reached, all non-zero (loss {:.4})",
            losses.total.to_scalar::<f32>().unwrap()
        );
        assert!(reached > 20);
    }
}

/// The EMA teacher follows the student, and teacher + queue survive a save/load.
#[test]
fn teacher_and_queue_are_checkpointed() {
    let r = refs();
    let b = fixed_batch(&r);
    let x = R2d2Inputs {
        pixel_values: &b.pixels,
        input_ids: &b.ids,
        attention_mask: &b.mask,
        image_ids: &b.keys,
    };
    let (net, vars) = tiny_trainable();
    let cfg = R2d2LossConfig {
        fgr_weight: 0.0,
        queue_size: 6,
        ..R2d2LossConfig::default()
    };
    let obj = R2d2Objective::new(cfg.clone(), &net, &vars).unwrap();
    load_scaled_teacher(&obj, &vars);
    obj.loss(&x, &step_ctx(0)).unwrap();
    // The EMA moved the scaled teacher 0.5% of the way back: t = 0.995·0.98·w + 0.005·w.
    let saved = obj.extra_state().unwrap().save_state().unwrap();
    let w = var(&vars, "text_proj.weight");
    let t = &saved["teacher.text_proj.weight"];
    let want = (w.as_tensor() * (0.995 * 0.98 + 0.005)).unwrap();
    assert!(max_abs_diff(t, &want) < 1e-6);
    // 4 rows enqueued at the start of a 6-row queue.
    let q = obj.queue().unwrap();
    assert_eq!(q.ptr, 4);
    assert_eq!(&q.ids[..4], b.keys.as_slice());
    assert_eq!(&q.ids[4..], &[-1, -1]);
    let (t_img, _) = obj
        .teacher_features(&b.pixels, &b.ids, &b.mask)
        .unwrap()
        .unwrap();
    assert!(max_abs_diff(&q.image.i(0..4).unwrap(), &t_img) < 1e-6);
    // A fresh objective restores both.
    let (net2, vars2) = tiny_trainable();
    let obj2 = R2d2Objective::new(cfg, &net2, &vars2).unwrap();
    obj2.extra_state().unwrap().load_state(&saved).unwrap();
    let again = obj2.extra_state().unwrap().save_state().unwrap();
    assert_eq!(saved.len(), again.len());
    for (k, v) in &saved {
        let d = max_abs_diff(
            &v.to_dtype(DType::F32).unwrap(),
            &again[k].to_dtype(DType::F32).unwrap(),
        );
        assert_eq!(d, 0.0, "{k}");
    }
    // The image keys of a batch: equal ids give equal keys, missing ids stay distinct.
    let k = image_keys(
        &[Some("a".into()), None, Some("a".into()), None],
        &[0, 1, 2, 3],
    );
    assert_eq!(k[0], k[2]);
    assert_ne!(k[1], k[3]);
    assert_ne!(k[0], k[1]);
}

#[test]
fn finetune_preset_is_the_official_recipe() {
    let c = R2d2LossConfig::finetune();
    assert_eq!(
        (c.gcpr_weight, c.fgr_weight, c.tgd_weight, c.fgd_weight),
        (1.0, 1.0, 0.0, 0.0)
    );
    assert!(c.freeze_vision);
    assert_eq!(c.fgr_class_weights, [1.0, 2.0]);
    let p = R2d2LossConfig::prd2();
    assert_eq!(
        (p.gcpr_weight, p.fgr_weight, p.tgd_weight, p.fgd_weight),
        (1.0, 0.0, 1.0, 0.0)
    );
    let t = tuwen::train::r2d2::finetune_trainer_config(10_000);
    assert_eq!(t.optimizer.lr, 1e-5);
    assert_eq!(t.optimizer.weight_decay, 0.05);
    assert_eq!(t.schedule, Schedule::warmup_cosine(500, 10_000, 0.0));
    assert!(t.groups.frozen.iter().any(|p| p == "visual_encoder.*"));
    // A PRD2 cannot train FGR.
    let mut cfg = tiny_config();
    cfg.model_type = "prd2".into();
    cfg.joint_config = None;
    let vm = VarMap::new();
    let net = R2d2::new(&cfg, random_vars(&cfg, &vm, 1)).unwrap();
    assert!(R2d2Objective::new(R2d2LossConfig::default(), &net, &vm).is_err());
    assert!(R2d2Objective::new(R2d2LossConfig::prd2(), &net, &vm).is_ok());
}

// ---------------------------------------------------------------------------------------
// Learning test

/// Fills `vm` with seeded random weights for `cfg` (matrices normal/sqrt(fan_in), tables
/// normal·0.02, norm scales 1, biases 0,
/// `temp` 0.07) and returns a var builder over it.
fn random_vars(cfg: &R2d2Config, vm: &VarMap, seed: u64) -> VarBuilder<'static> {
    let shapes = parameter_shapes(|vb| R2d2::new(cfg, vb)).unwrap();
    crate::common::fill_random_vars(vm, shapes, seed, &[("temp", 0.07)]);
    VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
}

/// Image→caption Recall@1 of `net` over the held-out loader's images against the class
/// captions (cosine of the dual encoder).
fn held_out_recall(
    net: &R2d2,
    images: &Tensor,
    labels: &[usize],
    captions: &tuwen::preprocess::TokenizedBatch,
) -> f64 {
    let (_, img) = net.encode_image(images).unwrap();
    let (_, txt) = net
        .encode_text(&captions.input_ids, &captions.attention_mask)
        .unwrap();
    crate::common::class_recall(&img, &txt, labels)
}

/// A tiny R2D2 from random init learns the synthetic coloured shapes with Chinese captions
/// (`tuwen::train::synthetic`, varied wording) through the data loader, with the official
/// objectives GCPR + FGR and the ViT trained too: held-out image→caption Recall@1 over the
/// 24 class captions reaches 0.9 (checked every 50 steps; a 1000-step cosine schedule, then
/// up to 400 more steps at its final learning rate, as the last few hundredths depend on the
/// rounding of the CPU's matrix kernels: AVX2 and AVX-512 take different paths).
#[test]
fn tiny_r2d2_learns_synthetic_captions() {
    let start = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let size = 32u32;
    let train_set = synthetic::write_shapes_dataset(
        &dir.path().join("train"),
        &synthetic::ShapesConfig {
            size,
            ..synthetic::ShapesConfig::new(2400, 0)
        },
    )
    .unwrap();
    let test_set = synthetic::write_shapes_dataset(
        &dir.path().join("test"),
        &synthetic::ShapesConfig {
            size,
            ..synthetic::ShapesConfig::new(240, 1)
        },
    )
    .unwrap();
    let cfg = R2d2Config {
        model_type: "r2d2".into(),
        vision_config: ClipVisionConfig {
            hidden_size: 48,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_channels: 3,
            image_size: size as usize,
            patch_size: 8,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        text_config: BertConfig {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 64,
            max_position_embeddings: 16,
            ..BertConfig::chinese_roberta_wwm_ext()
        },
        joint_config: Some(JointConfig {
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 64,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
        }),
        embed_dim: 32,
        max_text_len: 16,
    };
    let vm = VarMap::new();
    let vb = random_vars(&cfg, &vm, 5);
    let net = R2d2::new(&cfg, vb.clone()).unwrap();
    // The official objectives (GCPR + FGR), the ViT trained too.
    let loss_cfg = R2d2LossConfig {
        freeze_vision: false,
        ..R2d2LossConfig::finetune()
    };
    let obj = R2d2Objective::new(loss_cfg, &net, &vm).unwrap();
    let schedule_steps = 1000u64;
    let max_steps = 1400u64;
    let mut trainer = Trainer::from_varmap(
        &vm,
        TrainerConfig {
            optimizer: AdamWConfig {
                lr: 2e-3,
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            groups: ParamGroupConfig::default(),
            schedule: Schedule::warmup_cosine(30, schedule_steps, 0.05),
            max_grad_norm: Some(1.0),
            seed: 1,
            ..TrainerConfig::default()
        },
    )
    .unwrap();
    let tok = TextProcessor::from_file(
        &fixture("data/hfl-roberta-wwm-ext/tokenizer.json"),
        TextStyle::Bert,
        cfg.max_text_len,
    )
    .unwrap();
    let pipeline = ImagePipeline::from_processor(ImageProcessor::clip(size as usize));
    let mut train = DataLoader::new(
        train_set.manifest.clone(),
        DataConfig {
            pipeline,
            seed: 3,
            ..DataConfig::new(32, size as usize)
        },
    )
    .unwrap();
    let mut test = DataLoader::new(
        test_set.manifest.clone(),
        DataConfig {
            pipeline,
            shuffle: false,
            drop_last: false,
            ..DataConfig::new(240, size as usize)
        },
    )
    .unwrap();
    let test_images = test.next_batch().unwrap();
    assert_eq!(test_images.indices, (0..240).collect::<Vec<_>>());
    let captions = synthetic::class_captions();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let class_text = tok.encode_batch(&refs, &Device::Cpu).unwrap();
    let mut parts = (None, None);
    let mut r1 = 0.0;
    let mut steps = 0;
    while steps < max_steps {
        let batch = train.next_batch().unwrap();
        let text = {
            let c: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
            tok.encode_batch(&c, &Device::Cpu).unwrap()
        };
        let keys = image_keys(&batch.ids, &batch.indices);
        let report = trainer
            .step(std::slice::from_ref(&batch.images), |px, ctx| {
                let x = R2d2Inputs {
                    pixel_values: px,
                    input_ids: &text.input_ids,
                    attention_mask: &text.attention_mask,
                    image_ids: &keys,
                };
                let l = obj.loss(&x, ctx)?;
                parts = (l.gcpr, l.fgr);
                Ok(l.total)
            })
            .unwrap();
        steps += 1;
        if steps % 50 == 0 {
            r1 = held_out_recall(&net, &test_images.images, &test_set.labels, &class_text);
            println!(
                "step {steps}: loss {:.4} (gcpr, fgr) {parts:.4?} temp {:.4}, held-out R@1 {r1:.3}",
                report.loss,
                net.temp.to_scalar::<f32>().unwrap(),
            );
            if r1 >= 0.9 {
                break;
            }
        }
    }
    println!(
        "held-out i2t R@1 {r1:.3} after {steps} steps, {:.1}s",
        start.elapsed().as_secs_f64()
    );
    assert!(r1 >= 0.9, "R@1 {r1} after {steps} steps");
}
