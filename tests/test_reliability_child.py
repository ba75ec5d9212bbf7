"""Child process of the kill-and-resume tests (tests/test_reliability_resume.py); it defines no tests.

`python tests/test_reliability_child.py launch <script.py> [args...]` runs a training script (a recipe) as `__main__`
after installing fault hooks chosen by environment variables, so that the recipe itself needs no test-only code:

- `PIVOT_TEST_KILL_BEFORE_OPTIMIZER_STEP=K`: SIGKILL the process during optimizer step K+1, after its backward pass
  (gradients computed, weights not yet updated): the middle of training, after checkpoint-K was written.
- `PIVOT_TEST_KILL_IN_SAVE=K`: SIGKILL the process inside the save of checkpoint-K, after the model weights were
  written and before the optimizer / scheduler / RNG / trainer state.
- `PIVOT_TEST_DUMP_BATCHES=path`: append the ids of every batch the trainer consumes (the data order) to `path`.

`python tests/test_reliability_child.py tiny --kind sft|dpo --model M --data D --output_dir O [...]` is a minimal
stand-in for `recipes/sft.py` / `recipes/dpo.py` (the same TRL trainer class with `AtomicCheckpointMixin` in front).
"""

import json
import os
import runpy
import signal
import sys


def _install_hooks() -> None:
    import transformers
    from transformers.trainer_callback import CallbackHandler

    kill_step = os.environ.get("PIVOT_TEST_KILL_BEFORE_OPTIMIZER_STEP")
    if kill_step:
        original = CallbackHandler.on_pre_optimizer_step

        def on_pre_optimizer_step(self, args, state, control):
            if state.global_step == int(kill_step):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, args, state, control)

        CallbackHandler.on_pre_optimizer_step = on_pre_optimizer_step

    kill_save = os.environ.get("PIVOT_TEST_KILL_IN_SAVE")
    if kill_save:
        original_opt = transformers.Trainer._save_optimizer_and_scheduler

        def _save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == int(kill_save):
                # The model file of this checkpoint is on disk by now; make sure, so the test is meaningful.
                assert any(n.endswith(".safetensors") for n in os.listdir(output_dir)), os.listdir(output_dir)
                os.kill(os.getpid(), signal.SIGKILL)
            return original_opt(self, output_dir)

        transformers.Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler

    dump = os.environ.get("PIVOT_TEST_DUMP_BATCHES")
    if dump:
        original_batches = transformers.Trainer.get_batch_samples

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n = original_batches(self, epoch_iterator, num_batches, device)
            with open(dump, "a", encoding="utf-8") as f:
                for batch in batches:
                    # Token ids say which rows (in which order) were used; the cached reference log-probs travel with
                    # the rows and must be the same after a resume.
                    entry = {"step": self.state.global_step}
                    for key in ("input_ids", "prompt_ids", "ref_chosen_logps", "ref_rejected_logps"):
                        if key in batch and hasattr(batch[key], "tolist"):
                            entry[key] = batch[key].tolist()
                    f.write(json.dumps(entry) + "\n")
            return batches, n

        transformers.Trainer.get_batch_samples = get_batch_samples


def _tiny(argv: list[str]) -> None:
    import argparse

    import trl

    from pivot_hf import PivotForConditionalGeneration, PivotProcessor
    from pivot_hf.data import load_pivot_dataset
    from pivot_hf.trainer.checkpointing import AtomicCheckpointMixin

    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["sft", "dpo"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--save_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None)
    parser.add_argument("--hub_token", default=None)
    args = parser.parse_args(argv)

    processor = PivotProcessor.from_pretrained(args.model)
    model = PivotForConditionalGeneration.from_pretrained(args.model)
    kind = "preference" if args.kind == "dpo" else "sft"
    dataset, _report = load_pivot_dataset(args.data, kind, num_samples=-1, tokenizer=processor.tokenizer)
    common = {
        "output_dir": args.output_dir,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "save_total_limit": args.save_total_limit,
        "logging_steps": 1,
        "seed": 42,
        "data_seed": 42,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "use_cpu": True,
        "max_length": None,
        "disable_tqdm": True,
        "resume_from_checkpoint": args.resume_from_checkpoint,
        "hub_token": args.hub_token,
    }
    if args.kind == "dpo":
        config = trl.DPOConfig(beta=0.1, **common)

        class Trainer(AtomicCheckpointMixin, trl.DPOTrainer):
            pass

    else:
        config = trl.SFTConfig(**common)

        class Trainer(AtomicCheckpointMixin, trl.SFTTrainer):
            pass

    trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(args.output_dir)


def main() -> None:
    mode, rest = sys.argv[1], sys.argv[2:]
    _install_hooks()
    if mode == "launch":
        script = rest[0]
        sys.argv = [script] + rest[1:]
        runpy.run_path(script, run_name="__main__")
    elif mode == "tiny":
        _tiny(rest)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
