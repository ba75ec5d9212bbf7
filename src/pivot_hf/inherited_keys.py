"""Every recipe key, decided: honoured (something acts on it) or refused by name before compute. None is ignored.

The recipes inherit the fields of TRL's `ModelConfig`, `ScriptArguments`, `SFTConfig`, `DPOConfig` and `GRPOConfig`
(and through them transformers' `TrainingArguments`), and add their own. `KEY_DECISIONS` is the one table that says,
for each field name, what pivot-hf does with it:

- `HONOURED`: the named component acts on it (transformers' Trainer, TRL's trainer or loss, or pivot-hf's code);
- `REFUSED`: a value other than the field's default is a `RecipeConfigError` naming the key and why, raised when the
  config is built (so before any weight or image is loaded); `example` is a value that is refused, for the test.

A key can be decided per config class (`"DPOConfig.label_smoothing_factor"`) where its fate differs between
trainers. A field that a new TRL or transformers release adds is *undecided*: `check_keys` refuses a non-default
value of it by name, and `tests/test_inherited_keys.py` fails until the field is entered here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, NamedTuple


HONOURED, REFUSED = "honoured", "refused"


class Decision(NamedTuple):
    status: str
    why: str
    example: Any = None  # a refused value (REFUSED only)


def _honoured(names: str, why: str) -> dict[str, Decision]:
    return {name: Decision(HONOURED, why) for name in names.split()}


def _refused(why: str, **examples) -> dict[str, Decision]:
    return {name: Decision(REFUSED, why, example) for name, example in examples.items()}


_TRAINER = "transformers' Trainer, which the Pivot trainers subclass without changing it"
_TRL = "TRL's trainer (the Pivot trainers subclass it)"
_LOSS = "TRL's loss of the trainer"
_OURS = "pivot-hf"
_VLLM = "only meaningful with `use_vllm`, which pivot-hf refuses (no vLLM path for a Pivot model)"

KEY_DECISIONS: dict[str, Decision] = {
    # ------------------------------------------------------------------------------------ transformers TrainingArguments
    **_honoured(
        "output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate lr_scheduler_type "
        "lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon "
        "gradient_accumulation_steps average_tokens_across_devices max_grad_norm bf16 fp16 bf16_full_eval "
        "fp16_full_eval tf32 activation_checkpointing activation_checkpointing_kwargs torch_compile "
        "torch_compile_backend torch_compile_mode use_cache neftune_noise_alpha torch_empty_cache_steps "
        "auto_find_batch_size logging_strategy logging_steps logging_first_step log_on_each_node "
        "logging_nan_inf_filter include_num_input_tokens_seen log_level log_level_replica disable_tqdm report_to "
        "run_name project trackio_space_id trackio_bucket_id trackio_static_space_id eval_strategy eval_steps "
        "eval_delay per_device_eval_batch_size prediction_loss_only eval_on_start eval_do_concat_batches "
        "eval_use_gather_object eval_accumulation_steps include_for_metrics batch_eval_metrics save_only_model "
        "save_strategy save_steps save_on_each_node save_total_limit enable_jit_checkpoint push_to_hub hub_token "
        "hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision load_best_model_at_end "
        "metric_for_best_model greater_is_better ignore_data_skip restore_callback_states_from_checkpoint "
        "full_determinism seed data_seed use_cpu accelerator_config dataloader_drop_last dataloader_num_workers "
        "dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor "
        "dataloader_multiprocessing_context dataloader_in_order remove_unused_columns label_names "
        "train_sampling_strategy length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb "
        "ddp_broadcast_buffers ddp_static_graph ddp_backend ddp_timeout debug skip_memory_metrics local_rank do_eval",
        _TRAINER,
    ),
    **_honoured(
        "gradient_checkpointing gradient_checkpointing_kwargs",
        "pivot-hf hands them to transformers' `activation_checkpointing(_kwargs)` (their new names), the Trainer acts",
    ),
    **_honoured("deepspeed fsdp fsdp_config", "transformers' Trainer / accelerate, after pivot-hf's config checks"),
    **_honoured("use_liger_kernel", "pivot-hf (Liger layer kernels on the LLM) on CUDA; refused without CUDA"),
    **_honoured("resume_from_checkpoint", "the recipes (`trainer.train(resume_from_checkpoint=...)`)"),
    **_honoured("do_train", "the recipes always train (True is what happens; False is never read)"),
    **_refused("GaLore/APOLLO parameter selection would replace the per-part LR groups", optim_target_modules=["x"]),
    **_refused("pivot-hf applies Liger's layer kernels itself, without a config", liger_kernel_config={"rms_norm": 1}),
    **_refused("context/tensor parallelism is not implemented for a Pivot model", parallelism_config={"tp_size": 2}),
    **_refused("the recipes train; nothing runs a prediction pass", do_predict=True),
    "label_smoothing_factor": Decision(HONOURED, "transformers' Trainer loss (SFT)"),
    "DPOConfig.label_smoothing_factor": Decision(
        REFUSED, "DPO's loss is TRL's, which ignores it; DPO's own smoothing key is `label_smoothing`", 0.1
    ),
    "GRPOConfig.label_smoothing_factor": Decision(REFUSED, "GRPO's loss is TRL's, which ignores it", 0.1),
    # ------------------------------------------------------------------------------------------------ TRL ModelConfig
    **_honoured("model_name_or_path model_revision dtype attn_implementation", "pivot_hf.trainer.load_model"),
    **_honoured(
        "use_peft lora_r lora_alpha lora_dropout lora_target_modules lora_modules_to_save use_rslora use_dora",
        "pivot_hf.trainer.adapters (TRL's get_peft_config, scoped to lora_target_parts; tests/test_peft.py)",
    ),
    **_honoured(
        "load_in_4bit load_in_8bit bnb_4bit_quant_type use_bnb_nested_quant bnb_4bit_quant_storage",
        "pivot_hf.trainer.load_model (TRL's get_quantization_config, bitsandbytes) on CUDA with use_peft; refused "
        "by name off CUDA, without use_peft, or (the bnb_4bit keys) without load_in_4bit",
    ),
    **_refused("a Pivot model trains as a causal LM (PEFT's CAUSAL_LM task)", lora_task_type="SEQ_CLS"),
    **_refused(
        "LoRA on raw parameters (MoE experts) is not scoped to Pivot's parts; use lora_target_modules",
        lora_target_parameters=["experts.down_proj"],
    ),
    # -------------------------------------------------------------------------------------------- TRL ScriptArguments
    "dataset_name": Decision(HONOURED, "pivot_hf.data (every supported source)"),
    "dataset_train_split": Decision(HONOURED, "pivot_hf.data (Hub ids and saved DatasetDicts)"),
    **_refused("the evaluation split is held out from the training rows (`eval_num_samples`)", dataset_test_split="x"),
    **_refused("dataset configurations are not read by the training data loader", dataset_config="x"),
    **_refused("the row checks and skips need a map-style dataset", dataset_streaming=True),
    **_refused("TRL's DDP bias-buffer workaround is not needed by Pivot models", ignore_bias_buffers=True),
    # ----------------------------------------------------------------------------------- TRL trainer configs (shared)
    **_refused("the Pivot trainers take an instantiated model (keys of the model config)", model_init_kwargs={"a": 1}),
    **_refused("a Pivot checkpoint never needs remote code", trust_remote_code=True),
    **_refused(
        "pivot_hf.data prepares the rows; TRL's dataset preparation (and its workers) is skipped for images",
        dataset_num_proc=2,
    ),
    **_refused("the processor's tokens are fixed by the checkpoint", pad_token="<x>", eos_token="<x>"),
    **_refused("pivot_hf.data pads the batches (padding-free pair packing in DPO)", pad_to_multiple_of=8),
    **_honoured("router_aux_loss_coef", _LOSS + " (mixture-of-experts LLMs only)"),
    **_honoured("disable_dropout activation_offloading shuffle_dataset", _TRL),
    **_honoured("sync_ref_model ref_model_mixup_alpha ref_model_sync_steps", _TRL + " (TRL refuses them under PEFT)"),
    **_honoured("max_length truncation_mode", _TRL + " and pivot-hf's data checks"),
    **_honoured("beta loss_type", _LOSS),
    # ---------------------------------------------------------------------------------------------------- SFTConfig
    **_honoured("completion_only_loss", _TRL + " (prompt/completion rows)"),
    **_refused("the chat template is the checkpoint's processor's", chat_template_path="x"),
    **_refused("pivot_hf.data builds image rows; there is no text field", dataset_text_field="x"),
    **_refused("pivot_hf.data prepares the rows itself", dataset_kwargs={"a": 1}),
    **_refused(
        "packing is not supported for vision data (TRL refuses it for image rows too)", packing=True, eval_packing=True
    ),
    **_refused("only meaningful with `packing`", packing_strategy="wrapped"),
    **_refused("use `sft_loss_on: assistant_turns` (works for any chat template)", assistant_only_loss=True),
    "padding_free": Decision(HONOURED, "DPO: pivot-hf's pair forward (packed pairs)"),
    "SFTConfig.padding_free": Decision(REFUSED, "TRL's padding-free SFT needs flash attention and text rows", True),
    # ---------------------------------------------------------------------------------------------------- DPOConfig
    **_honoured(
        "loss_weights ld_alpha f_divergence_type f_alpha_divergence_coef label_smoothing use_weighting discopop_tau",
        _LOSS,
    ),
    **_honoured("precompute_ref_log_probs precompute_ref_batch_size", "pivot-hf's reference cache (vision rows)"),
    # --------------------------------------------------------------------------------------------------- GRPOConfig
    **_honoured(
        "num_generations num_generations_eval max_completion_length generation_batch_size steps_per_generation "
        "temperature top_p top_k min_p generation_kwargs chat_template_kwargs repetition_penalty "
        "cache_implementation ds3_gather_for_generation cast_lm_head_to_fp32",
        _TRL + " (generation with transformers)",
    ),
    **_honoured(
        "num_iterations epsilon delta epsilon_high sapo_temperature_neg sapo_temperature_pos vespo_k_pos "
        "vespo_lambda_pos vespo_k_neg vespo_lambda_neg importance_sampling_level reward_weights "
        "multi_objective_aggregation scale_rewards mask_truncated_completions top_entropy_quantile entropy_coef "
        "use_adaptive_entropy entropy_coef_min entropy_coef_max entropy_coef_delta entropy_target "
        "off_policy_mask_threshold use_bias_correction_kl",
        _LOSS,
    ),
    **_honoured("log_completions log_multimodal num_completions_to_print log_unique_prompts", _TRL + " (logging)"),
    **_refused("completions are never pushed to the Hub from a training run", log_completions_hub_repo="x/y"),
    **_refused("no vLLM path for a Pivot model", use_vllm=True),
    **_refused(
        _VLLM,
        vllm_mode="server",
        vllm_model_impl="transformers",
        vllm_enable_sleep_mode=True,
        vllm_structured_outputs_regex="x",
        vllm_server_base_url="http://x",
        vllm_server_host="x",
        vllm_server_port=1,
        vllm_server_timeout=1.0,
        vllm_group_port=1,
        vllm_gpu_memory_utilization=0.5,
        vllm_max_model_length=8,
        vllm_tensor_parallel_size=2,
        vllm_importance_sampling_correction=False,
        vllm_importance_sampling_mode="token_mask",
        vllm_importance_sampling_clip_max=2.0,
        vllm_importance_sampling_clip_min=0.5,
        vllm_importance_sampling_cap=2.0,
    ),
    **_refused("tools are not passed by the recipes", max_tool_calling_iterations=2),
    **_refused(
        "transformers' paged / continuous-batching generation is not implemented for image inputs of a Pivot model",
        use_transformers_paged=True,
        use_transformers_continuous_batching=True,
        transformers_continuous_batching_config={"a": 1},
    ),
    # ------------------------------------------------------------------------------------------ pivot-hf's own fields
    **_honoured(
        "num_samples dataset_seed template image_folder variant new_distribution_ratio max_text_tokens sft_loss_on "
        "eval_num_samples max_solution_words",
        _OURS + " data (pivot_hf.data, pivot_hf.trainer.data_prep / grpo)",
    ),
    **_honoured(
        "vision_model_name_or_path text_model_name_or_path vision_feature_layer projector_type ref_model_name_or_path "
        "projector_init_from projector_reuse_layers freeze_reused_projector lora_target_parts use_kernels",
        _OURS + " model building (pivot_hf.trainer.model_loading, adapters)",
    ),
    **_honoured(
        "tunable_parts vision_tower_lr projector_lr check_tunable_parts_changed update_norm_memory_mib "
        "max_image_pixels",
        _OURS + " tunable parts, training monitor and image loading (trainer.tunable, callbacks, data)",
    ),
    **_honoured(
        "share_image_features share_prompt_prefix compact_lm_head ref_logps_cache_dir padding_free_row_tokens",
        _OURS + " fast DPO path (pivot_hf.trainer.fast_dpo)",
    ),
    **_honoured(
        "reward_funcs format_prompt length_reward_target length_reward_scale length_reward_unit",
        _OURS + " GRPO rewards (pivot_hf.trainer.grpo)",
    ),
}


def decision(cls, name: str) -> Decision | None:
    """The decision for field `name` of config class `cls` (a class-specific entry wins), or None if undecided."""
    for klass in cls.__mro__:
        found = KEY_DECISIONS.get(f"{klass.__name__}.{name}")
        if found is not None:
            return found
    return KEY_DECISIONS.get(name)


def undecided_fields(cls) -> list[str]:
    """Fields of dataclass `cls` that `KEY_DECISIONS` does not decide (a new TRL/transformers key)."""
    return [f.name for f in dataclasses.fields(cls) if decision(cls, f.name) is None]


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _is_default(value, default) -> bool:
    # TRL resolves an "auto" default in its `__post_init__` (pad_to_multiple_of: None off Neuron), so a TRL config
    # handed to a Pivot trainer (converted after that) holds the resolved value, which is still the default.
    if isinstance(default, str) and default == "auto" and value is None:
        return True
    try:
        return bool(value == default) or (value in (None, [], {}) and default in (None, [], {}))
    except Exception:  # e.g. tensors or objects without a boolean equality
        return False


_RESOLVED_DEFAULTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "pivot_resolved_defaults", default=None
)


@contextlib.contextmanager
def resolved_defaults(values: dict):
    """Within the block, `check_keys` also accepts each field at the value its TRL default resolved to (`values`):
    a TRL config converted after its own `__post_init__` ran still holds only the user's defaults."""
    token = _RESOLVED_DEFAULTS.set(dict(values))
    try:
        yield
    finally:
        _RESOLVED_DEFAULTS.reset(token)


def check_keys(config) -> None:
    """Refuse, by name, every refused or undecided field of `config` whose value is not the field's default.

    Called at the start of each recipe dataclass's `__post_init__`, before TRL or transformers fill in derived
    values. Raises `RecipeConfigError` listing all offending keys at once.
    """
    from .configs import RecipeConfigError

    problems = []
    cls = type(config)
    # Set while converting a TRL config that already ran its `__post_init__`: the values its defaults resolved to.
    resolved = _RESOLVED_DEFAULTS.get() or {}
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name, None)
        if not f.init or _is_default(value, _default(f)):
            continue
        if f.name in resolved and _is_default(value, resolved[f.name]):
            continue
        found = decision(cls, f.name)
        if found is None:
            problems.append(
                f"`{f.name}`: a key of {cls.__name__} that pivot-hf has not decided how to handle (new in the "
                "installed TRL/transformers?); leave it at its default or update pivot_hf.inherited_keys"
            )
        elif found.status == REFUSED:
            problems.append(f"`{f.name}`: not supported ({found.why})")
    if problems:
        raise RecipeConfigError(
            "Recipe keys that pivot-hf does not act on were set:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: remove them from the recipe / command line."
        )


__all__ = ["HONOURED", "KEY_DECISIONS", "REFUSED", "Decision", "check_keys", "decision", "undecided_fields"]
