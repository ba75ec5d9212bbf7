"""Safe loading audit and safety helpers.

Static audits parse every Python file under `src/` and `recipes/` (AST, so multi-line calls are handled):
no pickle-family imports, `torch.load` only with `weights_only=True`, YAML only through a SafeLoader, no
`np.load(allow_pickle=True)`, no `trust_remote_code=True` passed when loading. Dynamic checks: the folders the project
publishes (a Pivot checkpoint, an exported encoder) hold only safe file types, token redaction works on logs and files,
and path confinement refuses escapes. The end-to-end token check of a real training run is in
test_reliability_resume.py (it reuses those runs).
"""

import ast
import io
import logging
import os
from pathlib import Path

import pytest

from pivot_hf.safety import (
    REDACTED,
    PathEscapesRoot,
    SecretRedactingFilter,
    assert_no_pickle_files,
    confine_path,
    find_pickle_files,
    find_secrets_in_tree,
    install_secret_redaction,
    redact_file,
    redact_secrets,
    unpublishable_files,
)


ROOT = Path(__file__).resolve().parents[1]
AUDITED = [p for d in ("src", "recipes") for p in sorted((ROOT / d).rglob("*.py")) if "egg-info" not in str(p)]
FAKE = "hf_FAKEabcdefghijklmnopqrstuvwxyz0123"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _audit(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT)
    # Loader classes defined in this file that derive from a safe loader (e.g. one adding a custom tag).
    safe_loaders = set(SAFE_YAML_LOADERS)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_dotted(b).split(".")[-1] in safe_loaders for b in node.bases):
            safe_loaders.add(node.name)
    problems = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            problems.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" or name.endswith(".torch.load"):
                if not _is_true(_kw(node, "weights_only")):
                    problems.append(f"{where} torch.load without weights_only=True")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).split(".")[-1] not in safe_loaders:
                    problems.append(f"{where} {name} without a SafeLoader (use yaml.safe_load)")
            elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                problems.append(f"{where} {name}")
            elif name.endswith(("np.load", "numpy.load")) and _is_true(_kw(node, "allow_pickle")):
                problems.append(f"{where} np.load(allow_pickle=True)")
            elif name.endswith(("read_pickle", "pickle.loads", "pickle.load")):
                problems.append(f"{where} {name}")
            # `_refused(..., trust_remote_code=True)` in pivot_hf/inherited_keys.py is the decision that REFUSES the
            # key, naming the value a user would set; it loads nothing.
            if _is_true(_kw(node, "trust_remote_code")) and name != "_refused":
                problems.append(f"{where} {name}(trust_remote_code=True)")
    return problems


def test_audit_finds_what_it_should(tmp_path):
    """The audit itself: each forbidden pattern is caught, the safe spellings are not."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nyaml.load(open('f'))\n"
        "yaml.load(open('f'), Loader=yaml.Loader)\nyaml.full_load('a')\nnp.load('a', allow_pickle=True)\n"
        "AutoModel.from_pretrained('x',\n    trust_remote_code=True)\n"
    )
    good = tmp_path / "good.py"
    good.write_text(
        "import torch, yaml, numpy as np\nclass L(yaml.SafeLoader):\n    pass\n"
        "torch.load('x', map_location='cpu', weights_only=True)\nyaml.safe_load('a')\n"
        "yaml.load('a', Loader=L)\nyaml.load('a', Loader=yaml.SafeLoader)\nnp.load('a', allow_pickle=False)\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert len(_audit(bad)) == 9, _audit(bad)
        assert _audit(good) == []
    finally:
        ROOT = saved


def test_source_and_recipes_load_safely():
    assert AUDITED, "nothing to audit"
    problems = [p for path in AUDITED for p in _audit(path)]
    assert problems == [], "unsafe loading:\n" + "\n".join(problems)


def test_no_pickle_files_shipped_in_the_package():
    assert find_pickle_files(str(ROOT / "src" / "pivot_hf"), exclude_dirs=("__pycache__",)) == []


# ---------------------------------------------------------------------------------------------- published folders


def test_pivot_checkpoint_and_exported_encoder_are_safe_formats(tiny_pivot_factory, tmp_path):
    from pivot_hf.export import export_encoder

    checkpoint = tiny_pivot_factory("siglip", "qwen2")
    assert unpublishable_files(checkpoint) == []
    assert_no_pickle_files(checkpoint)
    encoder = export_encoder(checkpoint, tmp_path / "encoder", verify=False)
    assert unpublishable_files(encoder) == []
    assert_no_pickle_files(encoder)
    # The exported encoder is a stock transformers folder: no remote code, no auto_map pointing at it.
    assert not list(Path(encoder).rglob("*.py"))
    assert "auto_map" not in (Path(encoder) / "config.json").read_text()


def test_pickle_detection_by_name_and_content(tmp_path):
    import torch

    torch.save({"a": torch.zeros(1)}, tmp_path / "weights.safetensors.bak")  # zip container, misleading name
    (tmp_path / "args.bin").write_bytes(b"x")
    (tmp_path / "ok.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "opt.pt").write_bytes(b"\x80\x04K\x01.")
    found = find_pickle_files(str(tmp_path))
    assert found == ["args.bin", os.path.join("sub", "opt.pt"), "weights.safetensors.bak"]
    assert find_pickle_files(str(tmp_path), exclude_dirs=("sub",)) == ["args.bin", "weights.safetensors.bak"]
    with pytest.raises(ValueError, match="pickle files"):
        assert_no_pickle_files(str(tmp_path))


# ------------------------------------------------------------------------------------------------- token scrubbing


def test_redact_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "not-an-hf-shaped-secret-123")
    text = f"token={FAKE} other=not-an-hf-shaped-secret-123 hf_hub_download hf_device_map"
    out = redact_secrets(text)
    assert FAKE not in out and "not-an-hf-shaped-secret-123" not in out
    assert out.count(REDACTED) == 2
    assert "hf_hub_download hf_device_map" in out  # identifiers are not tokens
    monkeypatch.setenv("HF_TOKEN", "1")  # too short to be redacted by value
    assert redact_secrets("step 1 of 10") == "step 1 of 10"


def test_logging_filter_redacts_messages_args_and_tracebacks(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretRedactingFilter())
    log = logging.getLogger("pivot_hf.tests.redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("token %s in args", FAKE)
        log.warning(f"token {FAKE} in message")
        try:
            raise RuntimeError(f"bad token {FAKE}")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert FAKE not in text and text.count(REDACTED) == 3 and "RuntimeError" in text


def test_install_secret_redaction_covers_library_loggers(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_default_handler()
    installed = install_secret_redaction()
    assert installed in logging.getLogger("transformers").filters
    for handler in logging.getLogger("transformers").handlers + logging.getLogger().handlers:
        assert installed in handler.filters
    assert install_secret_redaction() is installed  # idempotent


def test_redact_file_and_find_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE)
    card = tmp_path / "README.md"
    card.write_text(f"pushed with {FAKE}\n")
    (tmp_path / "clean.json").write_text("{}")
    assert find_secrets_in_tree(str(tmp_path)) == [str(card)]
    assert redact_file(str(card)) and not redact_file(str(tmp_path / "clean.json"))
    assert find_secrets_in_tree(str(tmp_path)) == []


def test_training_args_json_redacts_hub_token(tmp_path):
    """What the trainer mixin writes instead of the pickled training_args.bin carries no token."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), hub_token=FAKE, report_to="none", use_cpu=True)
    assert FAKE not in redact_secrets(args.to_json_string())


# --------------------------------------------------------------------------------------------------------- paths


def test_confine_path(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("s")
    os.symlink(tmp_path / "secret.txt", root / "link.jpg")
    assert confine_path(str(root), "sub/a.jpg") == os.path.realpath(root / "sub" / "a.jpg")
    assert confine_path(str(root), "sub/../sub/a.jpg").endswith("a.jpg")
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "link.jpg", "sub/../../secret.txt", "", "a\x00b"):
        with pytest.raises(PathEscapesRoot):
            confine_path(str(root), bad)


def test_data_layer_confines_image_paths(tmp_path):
    """The data layer's own resolver agrees: every escape is a counted skip, never a read."""
    from pivot_hf.data import resolve_image_path

    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "outside.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "outside.jpg", root / "link.jpg")
    for rel in ("../outside.jpg", str(tmp_path / "outside.jpg"), "link.jpg"):
        assert resolve_image_path(str(root), rel) == (None, "path_escapes_root")
