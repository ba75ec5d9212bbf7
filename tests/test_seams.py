"""pivot_hf extends transformers and TRL through their public doors and leaves nothing on objects the user owns.

- importing pivot_hf (and its trainers) changes no registered transformers function and installs no import finder;
- a fast-DPO `train()` / `evaluate()` (or one that raises) leaves the model with the attributes, attention
  implementation and outputs of a freshly loaded one;
- no code outside `pivot_hf/trainer/compat.py` assigns into a transformers / TRL / accelerate module or a private
  attribute of another object; `configs.py` imports neither torch nor the trainer package.
"""

import ast
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import TrainerCallback
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from pivot_hf import PivotForConditionalGeneration, PivotProcessor


REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "pivot_hf"
COMPAT = SRC / "trainer" / "compat.py"
WATCHED = ("transformers", "trl", "accelerate", "peft", "deepspeed")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------ import side effects
def test_importing_pivot_hf_changes_no_registered_attention_function():
    code = (
        "import sys\n"
        "from transformers.integrations.sdpa_attention import sdpa_attention_forward\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "before = dict(ALL_ATTENTION_FUNCTIONS.items())\n"
        "import pivot_hf, pivot_hf.trainer\n"
        "from pivot_hf.trainer.fast_dpo import PAIR_ATTENTION\n"
        "assert ALL_ATTENTION_FUNCTIONS['sdpa'] is sdpa_attention_forward\n"
        "after = dict(ALL_ATTENTION_FUNCTIONS.items())\n"
        "assert {k: v for k, v in after.items() if k != PAIR_ATTENTION} == before, 'a registered function changed'\n"
        "assert not any(type(f).__module__.startswith('pivot_hf') for f in sys.meta_path), 'an import finder'\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_configs_import_neither_torch_nor_the_trainer_package():
    tree = ast.parse((SRC / "configs.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert not {name for name in imported if name.split(".")[0] == "torch"}, imported
    assert not {name for name in imported if "trainer" in name.split(".")}, imported
    # And in a fresh process: building a training config pulls in no trainer module (no hidden cycle).
    code = (
        "import sys, tempfile\n"
        "from pivot_hf.configs import PivotDPOConfig, PivotSFTConfig\n"
        "PivotDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to='none', vision_tower_lr=1e-6)\n"
        "PivotSFTConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to='none')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('pivot_hf.trainer'))\n"
        "assert not loaded, loaded\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------- assignments into other libraries
def _imported_roots(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound by imports: those from the watched libraries, and those of other modules."""
    watched, other = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                (watched if alias.name.split(".")[0] in WATCHED else other).add(name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                name = alias.asname or alias.name
                (watched if node.module.split(".")[0] in WATCHED else other).add(name)
        elif isinstance(node, ast.Assign) and _is_dynamic_module(node.value):
            # A module reached at run time (`sys.modules.get(...)`, `importlib.import_module(...)`) counts as theirs.
            watched |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return watched, other


def _is_dynamic_module(value: ast.AST) -> bool:
    text = ast.unparse(value)
    return text.startswith(("sys.modules.get(", "sys.modules[", "importlib.import_module("))


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _foreign_private(target: ast.AST) -> bool:
    """A private attribute in the chain that is not directly on `self` / `cls` (`self._x` is ours; `self.accelerator._x`,
    `model._x` are another object's)."""
    node = target
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        parent = node.func if isinstance(node, ast.Call) else node.value
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(parent, ast.Name) and parent.id in ("self", "cls")):
                return True
        node = parent
    return False


def _private_getattr(value: ast.AST) -> bool:
    """`getattr(obj, "_name", ...)` on anything but `self` / `cls`."""
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "getattr"
        and len(value.args) >= 2
        and isinstance(value.args[1], ast.Constant)
        and _private(str(value.args[1].value))
        and not (isinstance(value.args[0], ast.Name) and value.args[0].id in ("self", "cls"))
    )


def _namespace_of(node: ast.AST) -> ast.AST | None:
    """`x` of `vars(x)` / `x.__dict__`, the objects whose namespace is written through a subscript or a method."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "vars" and node.args:
        return node.args[0]
    if isinstance(node, ast.Attribute) and node.attr == "__dict__":
        return node.value
    return None


def _is_self(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


# Methods that change the container they are called on.
_MUTATORS = {
    "append", "extend", "insert", "clear", "update", "pop", "popitem", "setdefault", "remove", "add", "discard",
    "__setitem__", "__delitem__", "sort", "reverse",
}  # fmt: skip
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module)


def seam_violations(path: Path, root: Path = REPO) -> list[str]:
    """Writes into another library's objects: assignments (`=`, `+=`, `del`, `setattr`, `object.__setattr__`,
    `type.__setattr__`, `vars(x)[...]`, `x.__dict__[...]`) and mutating calls (`.append`, `.update`, `.pop`, ...) into
    a watched library's module/object, into a private attribute of anything but `self` / `cls` (stdlib modules aside),
    into `vars(x)` / `x.__dict__` of anything but `self` / `cls`, or into a local name bound to such a private attribute
    (an alias, `models = accelerator._models; models.append(m)`; followed through `b = a`, annotated and `:=`
    bindings, per function, until the name is bound to something else)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    watched, other = _imported_roots(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def scope_of(node: ast.AST) -> ast.AST:
        node = parents.get(node)
        while node is not None and not isinstance(node, _SCOPES):
            node = parents.get(node)
        return node if node is not None else tree

    # Per scope, the bindings of each name in source order: (line, column, foreign?).
    bindings: dict[tuple[int, str], list[tuple[int, int, bool]]] = {}

    def is_alias(name: str, node: ast.AST) -> bool:
        entries = bindings.get((id(scope_of(node)), name), [])
        before = [e for e in entries if (e[0], e[1]) < (node.lineno, node.col_offset)]
        return bool(before) and before[-1][2]

    def foreign_value(value: ast.AST) -> bool:
        if isinstance(value, ast.Name):
            return is_alias(value.id, value)
        return (_foreign_private(value) or _private_getattr(value)) and _root(value) not in other

    binders = sorted(
        (n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.NamedExpr))),
        key=lambda n: (n.lineno, n.col_offset),
    )
    for node in binders:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if node.value is None:
            continue
        foreign = foreign_value(node.value)
        for target in targets:
            if isinstance(target, ast.Name):
                entry = (target.lineno, target.col_offset, foreign)
                bindings.setdefault((id(scope_of(node)), target.id), []).append(entry)
    found = []

    def report(target: ast.AST, lineno: int):
        found.append(f"{path.relative_to(root)}:{lineno}: {ast.unparse(target)}")

    def foreign(node: ast.AST, attribute: str | None = None) -> bool:
        """Writing into `node` (or its `attribute`, for `setattr`) writes into another library's object."""
        owner = _namespace_of(node.value) if isinstance(node, ast.Subscript) else _namespace_of(node)
        if owner is not None:
            return not _is_self(owner)
        base = _root(node)
        if base in watched or (base is not None and is_alias(base, node)):
            return True
        if base is None or base in other:
            return False
        if attribute is not None and _private(attribute):
            return not _is_self(node)
        return _foreign_private(node)

    def check(target: ast.AST, lineno: int, attribute: str | None = None):
        if not isinstance(target, (ast.Attribute, ast.Subscript, ast.Name)):
            return
        if isinstance(target, ast.Name) and attribute is None:
            return  # binding a local name
        if foreign(target, attribute):
            report(target, lineno)

    def check_container(container: ast.AST, lineno: int, shown: ast.AST):
        """A mutating method called on `container`."""
        if foreign(container):
            report(shown, lineno)

    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.Delete)):
            for target in node.targets:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    check(element, node.lineno)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            check(node.target, node.lineno)
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            setters = ("setattr", "delattr", "object.__setattr__", "object.__delattr__", "type.__setattr__")
            if func in setters and len(node.args) >= 2:
                obj, name = node.args[0], node.args[1]
                if isinstance(name, ast.Constant):
                    check(obj, node.lineno, attribute=str(name.value))
                elif _root(obj) in watched:  # a computed name on a watched module/object
                    report(obj, node.lineno)
                if func.startswith(("object.", "type.")) and not _is_self(obj):
                    report(obj, node.lineno)
            elif isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS:
                check_container(node.func.value, node.lineno, node.func)
    return list(dict.fromkeys(found))


def test_the_seam_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import trl.trainer.utils as trl_utils\n"
        "from transformers import AttentionInterface\n"
        "import sys\n"
        "trl_utils._use_triton = None\n"
        "AttentionInterface._global_mapping['sdpa'] = None\n"
        "setattr(model, '_hook', 1)\n"
        "model.config._attn_implementation = 'x'\n"
        "self._mine = 1\n"
        "sys._flag = 1\n"
        "model.pair_forward = None\n"
        "module = sys.modules.get(cls.__module__)\n"
        "module.create_model_from_path = None\n"
        "self.accelerator._models[:] = []\n"
        "prepared = getattr(self.accelerator, '_models', None)\n"
        "prepared[:] = []\n"
        "listed = accelerator._models\n"
        "listed.append(1)\n"
        "vars(model)['_x'] = 1\n"
        "model.__dict__['_y'] = 1\n"
        "vars(self)['_z'] = 1\n"
        "object.__setattr__(model, 'anything', 1)\n"
        "setattr(trl_utils, name, 1)\n"
        "self._own.value = 1\n"
        "accelerator._models.clear()\n"
        "vars(model).update(_x=1)\n"
        "model.config.__dict__.pop('x', None)\n"
        "again = prepared\n"
        "again[:] = []\n"
        "if (walrused := accelerator._models):\n"
        "    walrused.append(1)\n"
        "def elsewhere():\n"
        "    prepared = {}\n"  # another scope: not the alias above
        "    prepared['k'] = 1\n"
        "    cache = self._cache\n"
        "    cache[1] = 2\n"
        "    cache.update(x=1)\n"
        "    listed = []\n"
        "    listed.append(1)\n"
        "    vars(self).update(y=1)\n"
        "    self._items.append(1)\n",
        encoding="utf-8",
    )
    found = [line.split(": ", 1)[1] for line in seam_violations(sample, root=tmp_path)]
    assert sorted(found) == sorted(
        [
            "trl_utils._use_triton",
            "AttentionInterface._global_mapping['sdpa']",
            "model",  # setattr(model, '_hook', ...)
            "model.config._attn_implementation",
            "module.create_model_from_path",
            "self.accelerator._models[:]",
            "prepared[:]",
            "vars(model)['_x']",
            "model.__dict__['_y']",
            "model",  # object.__setattr__(model, ...)
            "trl_utils",  # setattr(trl_utils, name, ...)
            "listed.append",  # through an alias of accelerator._models
            "accelerator._models.clear",
            "vars(model).update",
            "model.config.__dict__.pop",
            "again[:]",  # an alias of an alias
            "walrused.append",
        ]
    )


def test_no_assignment_into_other_libraries_outside_the_compat_module():
    files = [p for folder in ("src", "recipes", "scripts") for p in sorted((REPO / folder).rglob("*.py"))]
    assert COMPAT in files
    violations = [v for path in files if path != COMPAT for v in seam_violations(path)]
    assert not violations, "assignments into other libraries' objects:\n" + "\n".join(violations)


# ------------------------------------------------------------------------------------------ a full fast-DPO run
def _rows(n=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        rows.append(
            {
                "images": [image],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Q{i}?"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat sitting."}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog running fast."}]}],
            }
        )
    return rows


def _module_attributes(model) -> dict[str, set[str]]:
    return {name: set(vars(module)) for name, module in model.named_modules()}


def _fresh(path, like=None):
    model = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def _pair_inputs(path) -> dict:
    """Two rows sharing image and prompt: the shape the paired forward takes."""
    processor = PivotProcessor.from_pretrained(path)
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_rows(1)))
    return {k: v for k, v in batch.items() if k != "completion_mask"}


def _assert_untouched(model, path, stock):
    """No attribute we added (the same per-module attributes as `stock`, the same model after a run of stock TRL, which
    adds its fused LM head, model tags, accelerate's mark and checkpointing), transformers' sdpa for every attention,
    and per-row outputs as a fresh model's."""
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    inputs = _pair_inputs(path)
    model.eval()
    with torch.no_grad():
        ours = model(**inputs, output_hidden_states=True, use_cache=False)
        theirs = _fresh(path, like=model).eval()(**inputs, output_hidden_states=True, use_cache=False)
        stock.eval()(**inputs, output_hidden_states=True, use_cache=False)  # transformers' own output-capture hooks
    assert ours.hidden_states is not None and len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    mine, stocks = _module_attributes(model), _module_attributes(stock)
    differ = {name: (mine[name] ^ stocks.get(name, set())) for name in mine if mine[name] != stocks.get(name)}
    assert mine.keys() == stocks.keys() and not differ, differ


_SHARED_KEYS = (
    "per_device_train_batch_size",
    "max_steps",
    "learning_rate",
    "use_cpu",
    "report_to",
    "save_strategy",
    "disable_tqdm",
    "gradient_checkpointing",
    "bf16",
)


class _FailOnStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise RuntimeError("stop here")


def test_fast_dpo_train_evaluate_and_failure_leave_the_model_untouched(tiny_pivot_factory, tmp_path):
    from pivot_hf.configs import PivotDPOConfig
    from pivot_hf.trainer import PivotDPOTrainer

    path = tiny_pivot_factory("siglip", "qwen2")
    processor = PivotProcessor.from_pretrained(path)
    config = PivotDPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        check_tunable_parts_changed=False,
    )
    assert config.padding_free and config.share_prompt_prefix  # the fast path with pair-block attention
    model = _fresh(path)
    ref = _fresh(path)
    trainer = PivotDPOTrainer(
        model,
        ref,
        args=config,
        train_dataset=Dataset.from_list(_rows(2)),
        eval_dataset=Dataset.from_list(_rows(2, seed=1)),
        processing_class=processor,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it really trained

    stock_config = DPOConfig(**{k: getattr(config, k) for k in _SHARED_KEYS}, output_dir=str(tmp_path / "stock"))
    stock_model, stock_ref = _fresh(path), _fresh(path)
    stock = DPOTrainer(
        stock_model,
        stock_ref,
        args=stock_config,
        train_dataset=Dataset.from_list(_rows(2)),
        processing_class=processor,
    )
    stock.train()
    _assert_untouched(model, path, stock_model)
    _assert_untouched(trainer.ref_model, path, stock.ref_model)
    # The case as a user meets it: the trained model and the checkpoint it saved give the same per-row outputs.
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = PivotForConditionalGeneration.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32).eval()
    inputs = _pair_inputs(path)
    with torch.no_grad():
        ours = model.eval()(**inputs, output_hidden_states=True, use_cache=False)
        theirs = reloaded(**inputs, output_hidden_states=True, use_cache=False)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    trainer.evaluate()
    _assert_untouched(model, path, stock_model)

    trainer.add_callback(_FailOnStep())
    trainer.args.max_steps = 2
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.train()
    _assert_untouched(model, path, stock_model)


@pytest.mark.parametrize("kind", ["dpo", "dpo-padded", "sft"])
def test_the_callers_config_is_left_as_given(kind, tiny_pivot_factory, tmp_path, monkeypatch):
    """What a trainer or TRL resolve on their config (TRL's `ddp_find_unused_parameters` for vision models, a
    tracker that is not installed dropped from `report_to`) stays on the trainer's copy, not the caller's object."""
    from pivot_hf.configs import PivotDPOConfig, PivotSFTConfig
    from pivot_hf.trainer import PivotDPOTrainer, PivotSFTTrainer
    from pivot_hf.trainer import callbacks as monitor

    monkeypatch.setattr(monitor, "is_trackio_available", lambda: False)
    path = tiny_pivot_factory("siglip", "qwen2")
    processor = PivotProcessor.from_pretrained(path)
    common = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=["trackio"], save_strategy="no")
    if kind == "sft":
        config = PivotSFTConfig(**common)
        rows = [{"images": r["images"], "messages": r["prompt"] + r["chosen"]} for r in _rows(2)]
        trainer_cls, extra = PivotSFTTrainer, {}
    else:
        config = PivotDPOConfig(**common, padding_free=kind == "dpo")
        rows, trainer_cls, extra = _rows(2), PivotDPOTrainer, {"ref_model": _fresh(path)}
    before = {k: copy.deepcopy(v) for k, v in vars(config).items() if k != "distributed_state"}
    trainer = trainer_cls(
        model=_fresh(path), args=config, train_dataset=Dataset.from_list(rows), processing_class=processor, **extra
    )
    assert trainer.args is not config and trainer.args.report_to == []
    # Containers are the trainer's own: an in-place edit (TRL sets `use_reentrant` in this dict under ZeRO-3 + PEFT)
    # does not reach the caller's.
    for name, value in vars(trainer.args).items():
        if isinstance(value, (dict, list)) and name in vars(config):
            assert value is not vars(config)[name], name
    after = {k: v for k, v in vars(config).items() if k != "distributed_state"}
    assert after == before, {
        k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)
    }


def test_every_private_method_a_trainer_overrides_is_guarded_at_import():
    """A private Trainer/TRL method we override is listed in `compat.OVERRIDDEN_TRAINER_METHODS`, which the compat
    module checks at import: a release that drops one fails loudly instead of never calling our override."""
    from pivot_hf.trainer import PivotDPOTrainer, PivotSFTTrainer
    from pivot_hf.trainer.compat import OVERRIDDEN_TRAINER_METHODS
    from pivot_hf.trainer.grpo import PivotGRPOTrainer

    overridden = set()
    for cls in (PivotDPOTrainer, PivotSFTTrainer, PivotGRPOTrainer):
        ours = [k for k in cls.__mro__ if k.__module__.startswith("pivot_hf")]
        theirs = [k for k in cls.__mro__ if not k.__module__.startswith("pivot_hf") and k is not object]
        for klass in ours:
            for name, value in vars(klass).items():
                if name.startswith("_") and not name.startswith("__") and callable(value):
                    if any(name in vars(parent) for parent in theirs):
                        overridden.add(name)
    assert overridden and overridden <= set(OVERRIDDEN_TRAINER_METHODS), overridden - set(OVERRIDDEN_TRAINER_METHODS)
