"""`FastDPOMixin`: the trainer side of fast PIVOT DPO: the paired forward around the trainer's own forwards, pair-block
attention selected while a run lasts, compact LM-head scoring, the reference log-prob cache for vision datasets."""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset

from ...data.images import dataset_images_digest
from ..compat import compact_lm_head_scoring, release_prepared_model
from .collator import _RefLogpsCollator
from .forward import pair_attention_selected, paired_forward
from .reference_cache import (
    REF_CACHE_VERSION,
    REF_COLUMNS,
    _describe_stale_caches,
    _same_weights,
    dataset_fingerprint,
    reference_identity,
)


logger = logging.getLogger(__name__)


def _refuse_iterable(dataset) -> None:
    if isinstance(dataset, IterableDataset):
        # TRL's own words for text data, before any compute.
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style Dataset or "
            "set `precompute_ref_log_probs=False`."
        )


def _is_vision_dataset(dataset) -> bool:
    """TRL's rule: the first row has an `image` or `images` key."""
    if dataset is None:
        return False
    sample = next(iter(dataset))
    return "image" in sample or "images" in sample


class FastDPOMixin:
    """Mixed into `PivotDPOTrainer` ahead of `trl.DPOTrainer`: shared images, shared prefixes, cached references.

    Takes `trl.DPOTrainer`'s arguments by keyword. TRL's `padding_free` (which TRL's DPO turns off with a warning) and,
    for vision datasets, `precompute_ref_log_probs` (which TRL refuses for them) are implemented here: TRL's constructor
    gets a copy of `args` with those two off, and the trainer's `args` carries the caller's values again afterwards
    (the caller's object is never modified). TRL's guards for precompute that the copy hides (sync_ref_model,
    IterableDataset) are run here, with TRL's words.
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        want_cache = bool(getattr(args, "precompute_ref_log_probs", False))
        vision_cache = want_cache and _is_vision_dataset(train_dataset)
        self._vision_precompute = vision_cache
        self._ref_logps_cached = False
        self._reference_is_policy = False
        padding_free = bool(getattr(args, "padding_free", False))
        # Set before TRL's constructor, which runs reference forwards itself for text data with precompute.
        self._pair_options = {
            "share_image": bool(getattr(args, "share_image_features", True)),
            "share_prefix": bool(getattr(args, "share_prompt_prefix", True)),
            "padding_free": padding_free,
            "max_row_tokens": getattr(args, "padding_free_row_tokens", None),
        }
        trl_args = args
        if vision_cache or padding_free:
            trl_args = copy.copy(args)
            trl_args.padding_free = False
        if vision_cache:
            trl_args.precompute_ref_log_probs = False
            _refuse_iterable(train_dataset)
            if getattr(args, "sync_ref_model", False):
                raise ValueError(
                    "You cannot use `sync_ref_model=True` together with `precompute_ref_log_probs=True`. "
                    "`precompute_ref_log_probs=True` assumes a fixed reference model, but with `sync_ref_model=True` "
                    "the reference model is periodically updated during training, making any precomputed reference "
                    "log-probs stale. Set `precompute_ref_log_probs=False` or disable `sync_ref_model`."
                )
            uses_peft = kwargs.get("peft_config") is not None or is_peft_model(model)
            if ref_model is None and isinstance(model, torch.nn.Module) and not uses_peft:
                # No reference given: the policy before its first step is the reference. A private copy (instead of
                # TRL reloading `name_or_path`, which a freshly composed model may not have) lives only until the
                # cache is written.
                from ..model_loading import refuse_copy_under_zero3

                refuse_copy_under_zero3(model, "the policy, as the reference for `precompute_ref_log_probs`,")
                ref_model = copy.deepcopy(model).requires_grad_(False).eval()
            # Under PEFT the adapter-disabled policy is the reference (no copy): the cache pass disables them.
            self._reference_is_policy = uses_peft or (
                isinstance(model, torch.nn.Module)
                and isinstance(ref_model, torch.nn.Module)
                and _same_weights(model, ref_model)
            )
            # The reference's identity is taken now, before DeepSpeed / FSDP prepare (shard) it.
            self._ref_identity = reference_identity(ref_model if ref_model is not None else model, processing_class)
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=trl_args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if trl_args is not args:
            # TRL's own adjustments to its copy (DDP unused parameters, ...) stay; the two hidden keys come back.
            self.args.padding_free = args.padding_free
            self.args.precompute_ref_log_probs = args.precompute_ref_log_probs
        if vision_cache:
            with self._pair_attention():
                self._cache_reference_log_probs()

    # ------------------------------------------------------------------------------------------ paired forwards
    @contextlib.contextmanager
    def _paired_forwards(self):
        """The pair forward on the policy and the live reference (if any) for the scope of one of our forwards."""
        with contextlib.ExitStack() as stack:
            for model in (self.model, self.ref_model):
                if model is not None:
                    stack.enter_context(paired_forward(model, **self._pair_options))
            yield

    def _pair_attention(self):
        """Pair-block attention selected for the policy and the reference while a run lasts (see `forward`)."""
        if not self._pair_options["padding_free"]:
            return contextlib.nullcontext()
        return pair_attention_selected(*(m for m in (self.model, self.ref_model) if m is not None))

    # ------------------------------------------------------------------------------------------ loss / head
    def _compact_head(self):
        return compact_lm_head_scoring(bool(getattr(self.args, "compact_lm_head", True)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # With `return_outputs` (logits for `compute_metrics`), TRL runs an extra plain forward whose logits include
        # padding positions; the pair path leaves those at 0, so it stands aside for that call.
        paired = self._paired_forwards() if not return_outputs else contextlib.nullcontext()
        with self._compact_head(), paired:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    def compute_ref_log_probs(self, model, inputs):
        with self._compact_head(), self._paired_forwards():
            return super().compute_ref_log_probs(model, inputs)

    # ------------------------------------------------------------------------------------------ evaluate / predict
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # Selected for the whole run, not per forward: checkpointed layers recompute attention in the backward.
        with self._pair_attention():
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        eval_dataset = self._with_reference_columns(eval_dataset, "eval")
        with self._pair_attention():
            return super().evaluate(
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        test_dataset = self._with_reference_columns(test_dataset, "test")
        with self._pair_attention():
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _with_reference_columns(self, dataset, name: str):
        """A dataset handed to `evaluate`/`predict` after vision precompute, with its reference log-probs.

        The reference was freed after the cache pass; before any training step the policy still is the reference
        (when it was built from it, or has the same weights), after one it is not: then the dataset must come with
        the trainer (`eval_dataset=`) or the run must keep a live reference, as TRL says for text data.
        """
        if not getattr(self, "_ref_logps_cached", False) or dataset is None or isinstance(dataset, str):
            return dataset
        if isinstance(dataset, dict):
            return {key: self._with_reference_columns(ds, key) for key, ds in dataset.items()}
        _refuse_iterable(dataset)
        if all(column in (dataset.column_names or []) for column in REF_COLUMNS):
            return dataset
        step = self.state.global_step
        # Under PEFT the adapter-disabled policy stays the reference at every step.
        policy_is_reference = self._reference_is_policy and (step == 0 or is_peft_model(self.model))
        if self.ref_model is None and not policy_is_reference:
            why = f"training has started (step {step})" if step else "the reference has other weights than the policy"
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to `evaluate()`/`predict()`: with "
                "`precompute_ref_log_probs=True` on vision data the reference model is freed once its log-probs are "
                f"cached, and the policy cannot stand in for it ({why}). Provide this dataset as `eval_dataset` at "
                "initialization, or set `precompute_ref_log_probs=False` to keep a live reference."
            )
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        return self._cached_ref_logps(dataset, name, batch_size, self._ref_identity)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if getattr(self, "_ref_logps_cached", False) and self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *REF_COLUMNS]))

    # ------------------------------------------------------------------------------------------ reference cache
    def ref_logps_cache_dir(self) -> Path:
        folder = getattr(self.args, "ref_logps_cache_dir", None)
        return Path(folder) if folder else Path(self.args.output_dir) / "ref_logps"

    def _reference_identity(self) -> dict:
        identity = getattr(self, "_ref_identity", None)
        if identity is None:
            model = self.ref_model if self.ref_model is not None else self.model
            identity = reference_identity(self.accelerator.unwrap_model(model), self.processing_class)
        return identity

    def _cache_reference_log_probs(self):
        identity = self._reference_identity()
        self._ref_identity = identity  # `evaluate`/`predict` datasets are keyed the same way
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        self.train_dataset = self._cached_ref_logps(self.train_dataset, "train", batch_size, identity)
        if self.eval_dataset is not None:
            eval_bs = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    name: self._cached_ref_logps(ds, name, eval_bs, identity) for name, ds in self.eval_dataset.items()
                }
            else:
                self.eval_dataset = self._cached_ref_logps(self.eval_dataset, "eval", eval_bs, identity)
        self._ref_logps_cached = True
        self.precompute_ref_logps = True  # TRL's own switch: `_compute_loss` reads the cached columns
        if not isinstance(self.data_collator, _RefLogpsCollator):
            self.data_collator = _RefLogpsCollator(self.data_collator)
        # The reference is never needed again: free it before the optimizer and activations take the memory. TRL
        # prepared it with `accelerator.prepare_model`, which keeps every prepared model in the accelerator's list
        # of models (for `free_memory` and saving): that reference is dropped too, or the model would stay alive
        # through training (3.4 GiB at the paper's shape on CPU). Only the reference leaves the list.
        reference, self.ref_model = self.ref_model, None
        if reference is not None:
            release_prepared_model(self.accelerator, reference)
        del reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _cache_key(self, dataset, name: str, identity: dict) -> tuple[str, dict]:
        args = self.args
        payload = {
            "version": REF_CACHE_VERSION,
            "dataset": dataset_fingerprint(dataset),
            "rows": len(dataset),
            # The pixels, not only the paths: images replaced in place must not reuse reference log-probs.
            "images": dataset_images_digest(dataset),
            "reference": identity,
            "max_length": args.max_length,
            "truncation": {
                field_name: getattr(args, field_name, None)
                for field_name in ("max_prompt_length", "max_completion_length", "truncation_mode", "padding_free")
            },
            "ld_alpha": getattr(args, "ld_alpha", None),
            "use_logits_to_keep": getattr(args, "use_logits_to_keep", None),
            "split": name,
        }
        payload = json.loads(json.dumps(payload, sort_keys=True, default=str))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24], payload

    def _cached_ref_logps(self, dataset, name: str, batch_size: int, identity: dict):
        from accelerate.utils import broadcast_object_list
        from safetensors.torch import load_file, save_file

        key, payload = self._cache_key(dataset, name, identity)
        folder = self.ref_logps_cache_dir()
        # Rank 0 decides (key and whether the file exists) and every rank follows: ranks that saw the file system at
        # different moments, or hashed differently, must not split into "reuse" and "recompute".
        decision = [key, (folder / f"{name}-{key}.safetensors").exists()]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision, from_process=0)
        key, exists = decision
        path = folder / f"{name}-{key}.safetensors"
        if exists:
            if self.accelerator.is_main_process:
                logger.info(
                    "Reference log-probs (%s): reusing the cache %s (key %s, nothing changed).", name, path, key
                )
        else:
            if self.accelerator.is_main_process:
                logger.info(
                    "Reference log-probs (%s): no cache for key %s in %s; computing them. %s",
                    name,
                    key,
                    folder,
                    _describe_stale_caches(folder, name, payload),
                )
            chosen, rejected = self._run_reference_pass(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(
                    {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}, str(tmp), metadata={"key": key}
                )
                os.replace(tmp, path)  # atomic: a run killed mid-write never leaves a half cache behind
                meta = {**payload, "key": key, "file": path.name, "num_rows": int(chosen.numel())}
                path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            self.accelerator.wait_for_everyone()
        tensors = load_file(str(path))
        chosen, rejected = tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]
        if chosen.numel() != len(dataset):
            raise ValueError(
                f"Cached reference log-probs {path} hold {chosen.numel()} rows, dataset has {len(dataset)}."
            )
        for column in REF_COLUMNS:
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        return dataset.add_column("ref_rejected_logps", rejected.tolist())

    @torch.no_grad()
    def _run_reference_pass(self, dataset, name: str, batch_size: int):
        from accelerate.utils import tqdm
        from torch.utils.data import DataLoader

        collator = (
            self.data_collator.inner if isinstance(self.data_collator, _RefLogpsCollator) else self.data_collator
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collator,
            shuffle=False,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare(loader)
        model = self.ref_model if self.ref_model is not None else self.model
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        try:
            for batch in tqdm(
                loader, desc=f"Reference log-probs ({name})", disable=bool(os.environ.get("TQDM_DISABLE", ""))
            ):
                c, r = self.compute_ref_log_probs(model, batch)
                c, r = self.accelerator.gather_for_metrics((c, r))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(chosen), torch.cat(rejected)
