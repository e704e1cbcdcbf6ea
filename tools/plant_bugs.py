"""Plant one small, plausible bug at a time in the product code and check that the tests meant to catch it fail:
the numbers the README claims rest on these tests.

    python tools/plant_bugs.py                  # every bug: a markdown table, exit status 1 if one is not caught
    python tools/plant_bugs.py verdict-or cfg-rows-at-1  # only these bugs

Each bug is (name, file, old, new, tests): `old` occurs exactly once in `file` and becomes `new`, the tests run
(pytest, one thread, offline, no bytecode written), and the file gets its bytes and its mtime back, even on an
error or Ctrl-C. The named tests first run once on the clean tree: a test that fails there would catch nothing.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

R, O, S, T, E, W = (f"tests/test_{n}.py::" for n in ("reproduce", "objectives", "sample", "train", "evaluate",
                                                      "weights"))
BAR = R + "test_the_bar_is_half_of_plains_fd_at_at_most_ten_percent_worse_frechet"
SEEDS = R + "test_summary_is_the_mean_and_sample_std_over_seeds"
CFG = R + "test_cfg_check_measures_plain_and_the_lowest_fd_method_at_each_scale"
BEST = R + "test_the_cfg_check_takes_the_lowest_fd_that_meets_the_bar_else_the_lowest_fd_never_base_or_plain"
VAE = R + "test_vae_scaling_factor_gives_the_train_latents_unit_std"
FOLDER = R + "test_biased_folder_labels_its_share_of_each_digit_and_half_its_captions_name_the_digit"
CLAIMS = R + "test_each_method_fine_tunes_on_the_folder_it_claims"
SCENARIOS = R + "test_group_prompts_are_guided_toward_their_own_group_and_generic_ones_toward_uniform_draws"
MIXTURE = E + "test_mixture_moments_equal_the_moments_of_an_explicitly_drawn_mixture"
STEP = O + "test_indicator_guidance_step_is_its_formula_at_each_t_with_mixed_targets"
IW = O + "test_indicator_weighted_weights_each_image_by_its_clean_latents_posterior_at_t_0"
DRAW = S + "test_target_groups_are_drawn_per_image_from_the_shares"
BATCH = S + "test_guided_images_keep_their_own_targets_at_any_batch_size"
FILE = T + "test_sample_with_an_exported_indicator_file_equals_sampling_with_its_run"
SHARES = T + "test_sample_draws_the_targets_from_the_target_shares"
PI_HAT = T + "test_group_shares_count_the_labelled_images_only"
IND_LR = T + "test_indicator_lr_reaches_the_indicators_parameter_group"
RANKS = T + "test_each_rank_reads_its_own_shard_with_its_own_noise_seed"
STRICT = W + "test_missing_tensors_alone_and_unexpected_tensors_alone_are_named"
RECALL = R + "test_the_bar_also_keeps_every_groups_recall_at_nine_tenths_of_plains_and_the_worst_seed_is_shown"
HAND = E + "test_precision_and_recall_on_a_hand_computed_case"
PARTIAL = R + "test_a_number_not_every_seed_measured_says_over_how_many_and_one_seed_shows_no_spread"
PARTIAL_BAR = R + "test_a_recall_only_some_seeds_measured_does_not_meet_the_bar"
OFFSETS = "tests/test_guidance.py::test_decision_offsets_pick_the_asked_shares_and_never_a_group_of_share_zero"
AUTO = "tests/test_guidance.py::test_auto_scale_is_the_smallest_rung_that_meets_the_targets_and_every_try_is_recorded"
JUDGES = ("tests/test_attributes.py::"
          "test_the_colour_rule_is_exact_and_the_width_rule_reproduces_the_split_of_real_digits")
TERMS = "tests/test_attributes.py::test_two_indicators_add_their_guidance_terms"
CKPT = W + "test_a_checkpoint_missing_a_tensor_is_named_with_its_file"
ENOUGH = R + "test_the_attribute_experiment_samples_enough_images_to_measure_every_groups_recall"
NOISE_AWARE = O + "test_the_noise_aware_objectives_add_w_rec_times_their_mse_and_w_ind_times_their_class_balanced_ce"
CENTRED = O + "test_fit_clusters_finds_the_same_clusters_wherever_the_latents_sit"
ADD_UP = O + "test_micro_batches_of_partly_labelled_images_add_up_to_one_big_batch"
G = "tests/test_guidance.py::"
UNTIL = ("tests/test_guidance.py::"
         "test_the_calibration_batch_stops_at_the_x_t_of_the_step_where_denoise_decides_the_targets")
RENOISED = "tests/test_guidance.py::test_the_auto_scale_reads_each_final_latent_renoised_to_its_read_step_at_that_step"
REAL_AS_REAL = E + "test_per_group_precision_and_recall_take_the_real_images_as_real_and_the_generated_as_generated"
RAISED = G + "test_the_auto_scales_of_two_indicators_are_raised_until_they_meet_the_hit_rate_together"
VALIDATED_AGAIN = ("tests/test_run_faults.py::test_a_resume_that_validates_a_step_again_keeps_no_image_of_the_"
                   "attempt_that_crashed")
MOVED_BASE = "tests/test_run_faults.py::test_a_moved_base_model_is_mended_as_the_message_says"
CLOSED = G + "test_guidance_at_scale_1_by_the_exact_posterior_samples_the_exact_conditional"
NAN_LOSS = ("tests/test_run_faults.py::test_a_nan_loss_in_one_micro_batch_stops_an_fp16_run_as_it_stops_a_"
            "float32_one")
NOT_MEASURED = (T + "test_a_part_not_measured_in_a_micro_batch_is_logged_as_the_mean_of_the_micro_batches_"
                     "that_measured_it")
EVERY_GROUP = E + "test_overall_precision_and_recall_compare_with_the_real_images_of_every_group"
AT_THE_BAR = "tests/test_guidance.py::test_the_auto_scale_takes_a_rung_whose_hit_rate_is_exactly_the_bar"
V_EULER = S + "test_a_v_prediction_models_euler_run_through_denoise_equals_diffusers"
CONFIDENCE = E + "test_mean_confidence_is_the_classifiers_top_probability_over_all_its_classes"
READS_T = "tests/test_ddm.py::test_a_noise_aware_indicator_reads_its_timestep_as_sinusoidal_features_beside_the_latent"
SHARE_OF_T = "tests/test_guidance.py::test_the_auto_scale_reads_a_schedule_of_another_length_at_the_same_share_of_it"
UNLISTED = E + "test_images_a_sample_runs_record_does_not_list_are_refused_naming_one"
ONE_GROUP = "tests/test_data.py::test_an_image_listed_twice_with_two_groups_is_refused_naming_both_lines"

BUGS = [  # (name, file, old, new, tests)
    # the verdict and its statistics
    ("verdict-beats-plain-fd", "reproduce.py", 's["fd"] <= 0.5 * plain["fd"]', 's["fd"] <= plain["fd"]', [BAR]),
    ("verdict-or", "reproduce.py", 'and s["frechet_distance"] <= 1.1', 'or s["frechet_distance"] <= 1.1', [BAR]),
    ("verdict-frechet-1.25", "reproduce.py", '1.1 * plain["frechet_distance"]', '1.25 * plain["frechet_distance"]',
     [BAR]),
    ("verdict-strict-at-bar", "reproduce.py", 's["fd"] <= 0.5', 's["fd"] < 0.5', [BAR]),
    ("verdict-judges-base", "reproduce.py", 's["method"] in ("plain", "base")', 's["method"] == "plain"', [BAR]),
    ("std-population", "reproduce.py", "ddof=1", "ddof=0", [SEEDS]),
    ("mean-first-seed", "reproduce.py", "return float(np.mean(values)),", "return float(np.mean(values[:1])),",
     [SEEDS]),
    ("cfg-worst-as-best", "reproduce.py", "return min(tried", "return max(tried", [CFG, BEST]),
    ("cfg-best-fails-the-bar", "reproduce.py", 'tried = [s for s in tried if s["meets_goal"]] or tried',
     "tried = tried", [CFG, BEST]),
    ("cfg-best-may-be-base", "reproduce.py", 'if s["method"] not in ("base", "plain")]', 'if s["method"] != "plain"]',
     [CFG, BEST]),
    ("cfg-rows-at-1", "reproduce.py", "guidance=scale, generic_only=True", "guidance=1.0, generic_only=True", [CFG]),
    ("cfg-scale-dropped-in-sampling", "reproduce.py", "guidance=guidance or sizes.guidance",
     "guidance=sizes.guidance", [SCENARIOS]),
    # the reproduction's data
    ("vae-scale-std", "reproduce.py", "round(1.0 / z.std().item(), 5)", "round(z.std().item(), 5)", [VAE]),
    ("iw10-fully-labelled", "reproduce.py", "build_folder(f, args.counts, 1, method.labelled)",
     "build_folder(f, args.counts, 1)", [CLAIMS]),
    ("iw10-cache-key", "reproduce.py", 's = {"counts": args.counts, "labelled": method.labelled}',
     's = {"counts": args.counts}', [CLAIMS]),
    ("build-folder-drops-labelled", "reproduce.py", "prompt=caption_for(seed), seed=seed, labelled=labelled)",
     "prompt=caption_for(seed), seed=seed)", [FOLDER, CLAIMS]),
    ("digit-without-label", "data.py", "c[:max(1, round(labelled * len(c)))]", "c[:round(labelled * len(c))]",
     [FOLDER, CLAIMS]),
    ("no-caption-names-digit", "reproduce.py", "group_prompt(digit) if rng.random() < 0.5 else GENERIC_PROMPT",
     "GENERIC_PROMPT", [FOLDER]),
    ("caption-share-0.2", "reproduce.py", "rng.random() < 0.5", "rng.random() < 0.2", [FOLDER]),
    ("caption-names-label", "reproduce.py", 'f"{GENERIC_PROMPT} {WORDS[digit]}"', 'f"{GENERIC_PROMPT} {digit}"',
     [FOLDER]),
    ("group-prompts-random-targets", "reproduce.py", "if k is not None and not method.clusters:", "if False:",
     [SCENARIOS]),
    # the quality reference
    ("mixture-no-between-term", "evaluate.py", "return mu, second - torch.outer(mu, mu)",
     "return mu, sum(w * _moments(f, '')[1] for f, w in zip(features_by_group, weights))", [MIXTURE]),
    # the guidance step and its targets
    ("guidance-no-sqrt", "diffusion.py", "g.scale * float(1 - alphas_cumprod[t]) ** 0.5 *", "g.scale *", [STEP]),
    ("guidance-1-abar", "diffusion.py", "float(1 - alphas_cumprod[t]) ** 0.5 *", "float(1 - alphas_cumprod[t]) *",
     [STEP]),
    ("guidance-t0", "diffusion.py", "g.indicator, x_t, t, targets[j]", "g.indicator, x_t, 0, targets[j]", [STEP]),
    ("guidance-euler-state", "diffusion.py", "g.indicator, x_t, t, targets[j]", "g.indicator, x, t, targets[j]",
     [STEP]),
    ("guidance-pulls-away", "diffusion.py", "eps = eps - g.scale * float(", "eps = eps + g.scale * float(", [CLOSED]),
    ("guidance-sqrt-abar", "diffusion.py", "float(1 - alphas_cumprod[t]) ** 0.5 *", "float(alphas_cumprod[t]) ** 0.5 *",
     [CLOSED]),
    ("guidance-reads-euler-x", "diffusion.py", "g.indicator, x_t, t, targets[j]", "g.indicator, x, t, targets[j]",
     [CLOSED]),
    ("guidance-every-target", "diffusion.py", "log_p[torch.arange(len(x)), groups].sum()", "log_p[:, groups].sum()",
     [STEP]),
    ("targets-depend-on-batch", "guidance.py", 'derive_seed(s, *key))).item() for s in seeds])',
     'derive_seed(seeds[0], *key) + k)).item() for k, s in enumerate(seeds)])', [DRAW]),
    ("targets-all-same", "guidance.py", 'derive_seed(s, *key)', 'derive_seed(seeds[0], *key)', [DRAW]),
    ("targets-same-stream-per-indicator", "guidance.py", 'key = ("target",) if j == 0 else ("target", j)',
     'key = ("target",)',
     [G + "test_two_indicators_with_drawn_targets_draw_each_image_s_targets_independently"]),
    ("offsets-underflow", "guidance.py",
     "torch.logsumexp(((log_p - c) / temperature).log_softmax(1), 0) - math.log(len(log_p))",
     "((log_p - c) / temperature).softmax(1).mean(0).log()",
     [G + "test_decision_offsets_stay_finite_when_every_row_prefers_one_group_by_many_nats"]),
    ("offsets-at-one-temperature", "guidance.py", "<= 1 or not spread or", "<= len(log_p) or not spread or",
     [G + "test_decision_offsets_pick_the_asked_shares_when_the_posteriors_differ_by_hundredths_of_a_nat"]),
    ("auto-unchecked-group-silent", "guidance.py", "shares[k] > 0 and not (t == k).any()", "False",
     [G + "test_an_auto_scale_that_checked_no_image_of_a_group_says_so"]),
    ("target-group-twice-last-wins", "ddm.py", "once = len(items) == len(shares) == len(names)",
     "once = len(shares) == len(names)",
     [O + "test_a_bad_target_is_refused_naming_it"]),
    ("targets-ignore-shares", "guidance.py", "parse_target(spec, groups)", 'parse_target("uniform", groups)', [SHARES]),
    ("targets-first-rows-each-batch", "sample.py", "guides=[g.rows(rows) for g in guides]",
     "guides=[g.rows(slice(0, len(generators))) for g in guides]", [BATCH]),
    ("indicator-file-no-timestep", "loading.py", 'r["hidden"], r["timestep_dim"])', 'r["hidden"], 0)', [FILE]),
    # training with partial labels and on several processes
    ("pi-hat-unlabelled-as-0", "train.py", "self.data.groups.count(k)",
     "[max(g, 0) for g in self.data.groups].count(k)", [PI_HAT]),
    ("indicator-lr-ignored", "train.py", '"lr": args.indicator_lr or args.lr', '"lr": args.lr', [IND_LR]),
    ("iw-posterior-at-batch-t", "ddm.py", "(indicator(b.z0, torch.zeros_like(b.t))", "(indicator(b.z0, b.t)",
     [IW]),
    ("iw-posterior-under-equal-priors", "ddm.py", ".log_softmax(1) + b.group_shares.float().log()).softmax(1)",
     ".log_softmax(1)).softmax(1)", [IW, O + "test_indicator_weighted_gives_weight_one_where_its_indicator_cannot_tell_"
                                         "the_groups_apart"]),
    ("shard-ignores-rank", "train.py", "self.step_count * args.grad_accum, rank,",
     "self.step_count * args.grad_accum, 0,", [RANKS]),
    ("noise-seed-ignores-rank", "train.py", '"noise", self.step_count, micro, self.rank)',
     '"noise", self.step_count, micro, 0)', [RANKS]),
    # strict loading
    ("safetensors-by-suffix", "weights.py", 'return head[8:] == b"{"', 'return path.suffix == ".safetensors"',
     [W + "test_a_safetensors_file_whose_name_has_no_suffix_reads_as_one"]),
    ("stale-validation-images-kept", "rundir.py", "and int(validated) > step:",
     "and int(validated) < 0:", [VALIDATED_AGAIN]),
    ("moved-base-names-one-field", "rundir.py", "'base' \"\n               \"and in config.model\")",
     "'base'\")", [MOVED_BASE]),
    ("moved-base-run-trained-on", "rundir.py", "started is not None and model.is_dir():", "started is not None:",
     ["tests/test_run_faults.py::test_a_fine_tune_of_a_run_directory_that_trained_on_since_is_refused_naming_both_"
      "checkpoints"]),
    ("resume-threads-unchecked", "rundir.py", 'if started not in (None, resume["threads"]):', "if False:",
     [T + "test_a_resume_on_another_cpu_thread_count_is_recorded_and_warned_of"]),
    ("out-checked-only-before-loading", "sample.py", "for name in previous_outputs(out, args.overwrite, files):",
     "for name in []:", [S + "test_a_run_whose_out_another_run_wrote_into_while_it_loaded_is_refused_and_leaves_that_"
                                "run_whole"]),
    ("colon-group-names-read-as-attribute", "guidance.py", 'None if "=" in t and not any(attributes) else ', "",
     ["tests/test_attributes.py::test_a_target_of_groups_whose_names_hold_a_colon_is_a_spec_for_indicators_that_"
      "name_no_attribute"]),
    ("export-into-the-run", "train.py", "checkpoints.check_export(args.export, args.out or args.resume)",
     "checkpoints.check_export(args.export)",
     ["tests/test_run_faults.py::test_an_export_into_the_run_directory_is_refused_before_training"]),
    ("decide-step-of-sds-1000", "guidance.py", "at = -(-decide_at * n_train // diffusion.N_TRAIN_TIMESTEPS)",
     "at = decide_at", [G + "test_the_decide_step_is_the_same_share_of_a_schedule_of_any_length"]),
    ("report-says-801", "reproduce.py", "decided at t = {decided}", "decided at t = {DECIDE_AT}",
     [R + "test_the_report_names_the_step_the_guided_rows_decided_their_targets_at"]),
    ("first-build-judged-as-plain-folder", "evaluate.py", "        return why\n    gone =",
     "        return None\n    gone =", [E + "test_a_data_folder_whose_first_build_was_interrupted_is_refused"]),
    ("empty-weight-file-unnamed", "weights.py", "    if not head:  # what a failed download", "    if False:  # what a "
     "failed download", [W + "test_an_empty_weight_file_is_named_as_empty"]),
    ("strict-missing-only", "weights.py", "if missing or unexpected:", "if unexpected:", [STRICT, CKPT]),
    ("strict-unexpected-only", "weights.py", "if missing or unexpected:", "if missing:", [STRICT]),
    ("checkpoint-file-unnamed", "checkpoints.py", 'str(ckpt["path"] / file), assign=False)', "file, assign=False)",
     [CKPT]),
    # diversity, the worst seed, trajectory-aware targets, the auto scale, the attribute judges
    ("bar-ignores-recall", "reproduce.py", "and recall_kept(s, plain, groups))", ")", [RECALL]),
    ("worst-seed-is-the-best", "reproduce.py", '"fd_worst": max(', '"fd_worst": min(', [RECALL]),
    ("precision-recall-swapped", "evaluate.py", "return precision, recall", "return recall, precision", [HAND]),
    ("per-group-columns-count-other-classes", "evaluate.py", "torch.where(inside, labels, -1)", "labels",
     [E + "test_a_groups_precision_recall_and_frechet_are_of_the_images_whose_best_class_is_that_group"]),
    ("offsets-push-the-wrong-way", "guidance.py", "((log_p - c) / temperature)", "((log_p + c) / temperature)",
     [OFFSETS]),
    ("offsets-never-hotter", "guidance.py", "if soft_met else temperature * 4", "if soft_met else temperature / 4",
     [G + "test_decision_offsets_pick_the_asked_shares_when_the_indicator_is_sure_of_each_image_by_tens_of_nats"]),
    ("auto-takes-a-rung-too-high", "guidance.py", "float(AUTO_SCALES[h]) for h in high]",
     "float(AUTO_SCALES[min(h + 1, 11)]) for h in high]", [AUTO]),
    ("colour-rule-inverted", "evaluate.py", '"red", "green"),', '"green", "red"),', [JUDGES]),
    ("width-rule-inverted", "evaluate.py", "data.ink_mass(x) > self.threshold", "data.ink_mass(x) < self.threshold",
     [JUDGES]),
    ("only-the-last-guide", "diffusion.py", "for j, g in enumerate(guides):",
     "for j, g in list(enumerate(guides))[-1:]:", [TERMS]),
    ("spread-of-one-seed", "reproduce.py", "if n > 1 else", "if of > 1 else", [PARTIAL]),
    ("bar-on-some-seeds", "reproduce.py", ' and f"recall_{g}" not in s["partial"]', "", [PARTIAL_BAR]),
    ("attributes-too-few-for-recall", "reproduce.py", "attr_n: int = 300", "attr_n: int = 150", [ENOUGH]),
    # found surviving by a mutation pass over the core math (the tests named here were added for them)
    ("plain-indicator-weights-swapped", "ddm.py", "(b, indicator)\n    return hp.w_rec * rec + hp.w_ind * ind",
     "(b, indicator)\n    return hp.w_ind * rec + hp.w_rec * ind", [NOISE_AWARE]),
    ("iw-ce-without-w-ind", "ddm.py", 'hp.w_ind * ind, {"rec": rec, "ind": logged, **accuracies(logits, b.groups),\n',
     'ind, {"rec": rec, "ind": logged, **accuracies(logits, b.groups),\n', [NOISE_AWARE]),
    ("ce-over-the-batch-count", "ddm.py", "return total / (len(groups) * labelled_share), logged",
     "return total / keep.sum().clamp(min=1), logged", [ADD_UP]),
    ("dotdot-unchecked", "cli.py", 'return missing and f"{missing} does not exist',
     'return None and f"{missing} does not exist',
     [S + "test_an_out_through_a_missing_folder_and_dotdot_is_refused_before_it_can_overwrite"]),
    ("indicator-record-groups-unchecked", "loading.py",
     "and all(isinstance(g, str) for g in v) and len(set(v)) == len(v)),", "or True),",
     [G + "test_an_indicator_file_with_a_broken_record_is_refused_in_one_line_naming_it"]),
    ("calibration-seeds-from-seed", "guidance.py", "group_names=[n[\"groups\"] for n in names], **settings)",
     "group_names=[n[\"groups\"] for n in names], cal_seed=args.seed, **settings)",
     [G + "test_a_guided_image_is_the_same_for_its_prompt_and_seed_whatever_seed_the_run_starts_at"]),
    ("bacc-over-present-groups", "ddm.py", "if len(present) == logits.shape[1] else nan", "if len(present) else nan",
     [O + "test_balanced_accuracy_is_not_measured_on_a_batch_that_lacks_a_group"]),
    ("per-group-frechet-all-images", "evaluate.py", "float(np.mean([frechet_distance(f, r) for r, f in pairs]))",
     "frechet_distance(fake, real)", [E + "test_per_group_frechet_does_not_reward_a_group_for_having_more_images"]),
    ("attribute-texts-compared-raw", "evaluate.py", "[tuple(row) for row in tokenize(texts).tolist()]",
     "list(texts)", [E + "test_an_attributes_list_that_names_a_text_twice_is_refused_at_parse_time"]),
    ("attribute-texts-compared-folded", "evaluate.py", "[tuple(row) for row in tokenize(texts).tolist()]",
     '[" ".join(t.lower().split()) for t in texts]',
     [E + "test_attribute_texts_that_clip_reads_as_the_same_ids_are_refused_at_parse_time"]),
    ("decide-at-told-by-value", "guidance.py", '("--decide-at", "decide_at" in args)',
     '("--decide-at", vars(args).get("decide_at", DECIDE_AT) != DECIDE_AT)',
     [G + "test_a_decide_at_without_an_indicator_is_refused_naming_the_flag"]),
    ("nan-image-counted-in-its-call", "sample.py", "image {rows[e.image]}:", "image {e.image}:",
     [G + "test_a_non_finite_image_of_a_guided_run_of_several_prompts_is_named_by_its_number_in_the_run"]),
    ("single-file-vae-linear-attention", "vae.py", "cfg, sd = VAEConfig(), conv_attention(sd)", "cfg = VAEConfig()",
     ["tests/test_vae.py::test_full_size_single_file_and_folder_layouts_load_identical_weights"]),
    ("indicator-guidance-uncapped", "guidance.py", "cli.out_of_range(value, 0, SCALE_MAX)",
     "cli.out_of_range(value, 0, None)", [G + "test_the_cli_checks_auto_guidance_and_records_what_it_chose"]),
    ("unsaved-run-not-told", "rundir.py", "if run and not any(finished_name(p.name) for p in run_dir.iterdir()):",
     "if False:",
     ["tests/test_run_faults.py::test_out_at_a_run_that_saved_no_checkpoint_says_it_can_be_deleted_to_start_again"]),
    ("clip-score-prompts-at-once", "evaluate.py", "for i in range(0, len(unique), batch_size)])",
     "for i in range(0, len(unique), len(unique))])",
     [E + "test_clip_score_prompts_go_through_the_text_tower_batch_size_at_a_time"]),
    ("ce-unbalanced", "ddm.py", "balance = 1 / (len(b.group_shares) * b.group_shares.float())",
     "balance = torch.ones_like(b.group_shares.float())", [NOISE_AWARE]),
    ("clusters-pca-uncentred", "ddm.py", "    x = x - x.mean(0)\n", "", [CENTRED]),
    ("indicator-blind-to-t", "ddm.py", "timestep_embedding(t, self.timestep_dim)",
     "timestep_embedding(t * 0, self.timestep_dim)", [READS_T]),
    ("calibration-one-step-late", "diffusion.py", "if until is not None and t <= until:",
     "if until is not None and t < until:", [UNTIL]),
    ("auto-reads-at-t0", "guidance.py", "torch.full((len(z0),), t), alphas_cumprod), t)",
     "torch.full((len(z0),), t), alphas_cumprod), 0)", [RENOISED]),
    ("auto-reads-without-renoising", "guidance.py", "torch.full((len(z0),), t), alphas_cumprod), t)",
     "torch.full((len(z0),), 0), alphas_cumprod), t)", [RENOISED]),
    ("per-group-real-and-generated-swapped", "evaluate.py",
     "mean_pr(reference_features[groups[k]], feats[labels == k])",
     "mean_pr(feats[labels == k], reference_features[groups[k]])", [REAL_AS_REAL]),
    ("unmeasured-part-counted-as-0", "train.py", "torch.where(unmeasured, 0.0, value), ~unmeasured])",
     "torch.where(unmeasured, 0.0, value), torch.ones_like(value)])", [NOT_MEASURED]),
    ("nan-loss-left-unmeasured", "train.py", 'unmeasured = value.isnan() & (name != "loss")',
     "unmeasured = value.isnan()", [NAN_LOSS]),
    ("overall-diversity-against-one-group", "evaluate.py",
     "overall = mean_pr(torch.cat([reference_features[groups[k]] for k in order]), feats)",
     "overall = mean_pr(reference_features[groups[0]], feats)", [EVERY_GROUP]),
    ("auto-pair-never-raised", "guidance.py", "high = [r + u for r, u in zip(high, up)]", "break", [RAISED]),
    ("auto-hit-strictly-above-the-bar", "guidance.py", "if min(h) >= AUTO_HIT", "if min(h) > AUTO_HIT", [AT_THE_BAR]),
    ("v-to-eps-at-the-euler-state", "diffusion.py", "eps = eps_from_v(x_t, out, t, alphas_cumprod)",
     "eps = eps_from_v(x, out, t, alphas_cumprod)", [V_EULER]),
    ("confidence-over-the-groups-only", "evaluate.py", '"mean_confidence": probs.max(1).values.mean().item()',
     '"mean_confidence": group_logits.softmax(1).max(1).values.mean().item()', [CONFIDENCE]),
    # what the judge and the trainer read
    ("auto-reads-at-sd-t-on-any-schedule", "guidance.py", "t = AUTO_READ_AT * len(alphas_cumprod) // "
     "diffusion.N_TRAIN_TIMESTEPS", "t = AUTO_READ_AT", [SHARE_OF_T]),
    ("stray-images-judged-with-a-runs-own", "evaluate.py", "        sample_prompts(directory, paths)  #",
     "        pass  #", [UNLISTED]),
    ("an-image-of-two-groups-read", "data.py", "if earlier[1] != group:", "if False:", [ONE_GROUP]),
]


def pytest(tests):
    """pytest's exit status on these tests: 0 passed, 1 a test failed, anything else an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def planted(name, file, old, new, tests):
    """Whether the tests failed with the bug in place: "yes", "NO", or "error (exit status N)"."""
    path = ROOT / file
    original, stat = path.read_bytes(), path.stat()
    text = original.decode()
    try:
        path.write_text(text.replace(old, new))
        rc = pytest(tests)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return {0: "NO", 1: "yes"}.get(rc, f"error (exit status {rc})")


def main(names):
    bugs = [b for b in BUGS if not names or b[0] in names]
    unknown = set(names) - {b[0] for b in BUGS}
    if unknown:
        sys.exit(f"unknown bugs {sorted(unknown)}; choose from {', '.join(b[0] for b in BUGS)}")
    for name, file, old, _, _ in bugs:  # every bug plants where it means to, before anything runs
        count = (ROOT / file).read_text().count(old)
        if count != 1:
            sys.exit(f"{name}: {old!r} occurs {count} times in {file}, not once")
    tests = list(dict.fromkeys(t for b in bugs for t in b[4]))
    if pytest(tests) != 0:
        sys.exit(f"the tests fail on the clean tree: {' '.join(tests)}")
    rows = ["| bug | file: old -> new | caught by | failed |", "| --- | --- | --- | --- |"]
    t0, missed = time.time(), 0
    for name, file, old, new, tests in bugs:
        result = planted(name, file, old, new, tests)
        missed += result != "yes"
        old, new = (s.replace("\n", "\\n") for s in (old, new))  # one table row, even for a bug over two lines
        rows.append(f"| {name} | {file}: `{old}` -> `{new}` | {', '.join(t.split('::')[1] for t in tests)} | "
                    f"{result} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    print(f"\n{len(bugs) - missed} of {len(bugs)} bugs caught in {time.time() - t0:.0f}s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
