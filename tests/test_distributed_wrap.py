"""Sharding readiness without a GPU: accelerate's own FSDP2 wrap-policy check for every tower family, and a
feature-layer mechanism that shares no mutable state between calls (threads, `nn.DataParallel` replicas) and never
runs the blocks above the feature layer, the final norm or the pooling head."""

import threading

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

from pivot_hf import PivotForConditionalGeneration
from pivot_hf.modeling_pivot import encode_images, find_encoder_layers, resolve_feature_layer
from pivot_hf.testing import real_shape_pivot_config


# The families PIVOT is applied to; `siglip_dual` / `clip` towers come from dual encoders whose text classes used to
# leak into `_no_split_modules`.
TINY_FAMILIES = ("siglip", "siglip_dual", "siglip2_naflex", "clip", "dinov2", "dinov2_registers", "vit", "vit_mae")
# Real shapes on the meta device: SigLIP2 fixed resolution is a `siglip_vision_model` checkpoint.
REAL_TOWERS = ("siglip2-so400m-patch16-384", "siglip-so400m-patch14-384", "clip-vit-large-patch14-336")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wrapped_modules(model) -> list[str]:
    """The modules accelerate's FSDP2 preparation would `fully_shard` one by one (the root aside), by the very check
    `fsdp2_prepare_model` runs: `set_auto_wrap_policy` then `fsdp2_prepare_auto_wrap_policy`."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert policy is not None
    return [name for name, module in model.named_modules() if name and policy(module)]


def _assert_blocks_wrapped(model):
    wrapped = _wrapped_modules(model)
    # Every block of the tower, also those above the feature layer (their weights are sharded like the rest).
    # `_modules`: iterating a cut block list yields only the blocks that run.
    tower_blocks = [
        f"model.vision_tower.{n}"
        for n, m in model.vision_tower.named_modules()
        if m in set(find_encoder_layers(model.vision_tower)[2]._modules.values())
    ]
    decoder = [
        f"model.language_model.{n}"
        for n, m in model.language_model.named_modules()
        if m in set(find_encoder_layers(model.language_model)[2])
    ]
    assert tower_blocks and decoder
    assert wrapped == tower_blocks + decoder, wrapped
    present = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) <= present, model._no_split_modules


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fsdp2_wrap_policy_finds_every_class_for_tiny_family(family, tiny_pivot_factory):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory(family))
    _assert_blocks_wrapped(model)


@pytest.mark.parametrize("tower", REAL_TOWERS)
def test_fsdp2_wrap_policy_at_real_shape(tower):
    config = real_shape_pivot_config(tower, "Qwen2.5-1.5B-Instruct")
    with torch.device("meta"):
        model = PivotForConditionalGeneration(config)
    _assert_blocks_wrapped(model)
    block = "CLIPEncoderLayer" if tower.startswith("clip") else "SiglipEncoderLayer"
    assert sorted(model._no_split_modules) == sorted([block, "Qwen2DecoderLayer"])


def _hidden_state_reference(tower, pixel_values, layer, num_prefix, **kwargs):
    """The tower's own `output_hidden_states` at `layer`, prefix tokens dropped: what the features must equal."""
    with torch.no_grad():
        out = tower(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
    index = resolve_feature_layer(layer, len(find_encoder_layers(tower)[2]))
    return out.hidden_states[index][:, num_prefix:]


def test_two_threads_sharing_a_model_get_correct_features(tiny_pivot_factory):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip")).eval()
    tower = model.vision_tower
    # Two threads ask for different feature layers at the same time: with a block list swapped on the shared module
    # one thread would run the other's depth (or find no blocks at all).
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    expected = {layer: _hidden_state_reference(tower, pixels, layer, 0) for layer in (-2, 1)}
    results, errors = {-2: [], 1: []}, []
    barrier = threading.Barrier(2)

    def work(layer):
        try:
            barrier.wait()
            for _ in range(100):
                with torch.no_grad():
                    feats = encode_images(tower, pixels, layer)
                results[layer].append(torch.equal(feats, expected[layer]))
        except Exception as error:  # noqa: BLE001 - reported below with its type
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(layer,)) for layer in (-2, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert sum(results[-2]) == 100 and sum(results[1]) == 100, {k: sum(v) for k, v in results.items()}
    assert len(find_encoder_layers(tower)[2]) == tower.config.num_hidden_layers  # the shared model is unchanged


@pytest.mark.parametrize("family", ["siglip", "siglip2_naflex", "clip", "dinov2", "vit", "vit_mae"])
def test_blocks_above_the_feature_layer_final_norm_and_head_never_run(family, tiny_pivot_factory):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory(family)).eval()
    tower = model.vision_tower
    _, _, layers = find_encoder_layers(tower)
    calls = {}
    skipped = {f"block{len(layers) - 1}": layers[-1]}
    for name, module in tower.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("post_layernorm", "layernorm", "head", "pooler"):
            skipped[name] = module
    assert len(skipped) >= 2, f"{family}: no final norm found"
    ran = {f"block{i}": layers[i] for i in range(len(layers) - 1)}
    # A final norm or head of a cut tower is still called but passes its input through: count real computation only.
    hooks = [
        m.register_forward_hook(
            lambda mod, a, o, n=n: (
                None
                if a and (o is a[0] or getattr(o, "last_hidden_state", None) is a[0])
                else calls.__setitem__(n, calls.get(n, 0) + 1)
            )
        )
        for n, m in {**skipped, **ran}.items()
    ]
    if family == "siglip2_naflex":
        inputs = {
            "pixel_values": torch.randn(1, 16, 3 * 64),
            "pixel_attention_mask": torch.ones(1, 16, dtype=torch.long),
            "spatial_shapes": torch.tensor([[4, 4]]),
        }
    else:
        inputs = {"pixel_values": torch.randn(1, 3, 32, 32)}
    with torch.no_grad():
        model.get_vision_features(**inputs, vision_feature_layer=-2)
    for hook in hooks:
        hook.remove()
    assert not any(name in calls for name in skipped), calls
    assert all(calls.get(name) == 1 for name in ran), calls


def test_reference_copy_of_a_zero3_partitioned_policy_is_refused(tiny_pivot_factory, fixtures_dir, tmp_path):
    """With `precompute_ref_log_probs` and no `ref_model`, the reference is a deep copy of the policy: under ZeRO-3
    that copies empty shards. DeepSpeed marks partitioned parameters with `ds_id`; the copy must be refused with the
    fix, as the explicit reference loader refuses it."""
    from pivot_hf import PivotProcessor
    from pivot_hf.configs import PivotDPOConfig, RecipeConfigError
    from pivot_hf.data import load_pivot_dataset
    from pivot_hf.trainer import PivotDPOTrainer

    path = tiny_pivot_factory("siglip")
    model = PivotForConditionalGeneration.from_pretrained(path)
    processor = PivotProcessor.from_pretrained(path)
    dataset, _ = load_pivot_dataset(str(fixtures_dir / "mmpr-mini"), "preference", tokenizer=processor.tokenizer)
    for index, param in enumerate(model.parameters()):
        param.ds_id = index  # what deepspeed.zero.Init leaves on every partitioned parameter
    args = PivotDPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, report_to="none", use_cpu=True)
    with pytest.raises(RecipeConfigError, match="ZeRO-3.*model_name_or_path"):
        PivotDPOTrainer(model, None, args=args, train_dataset=dataset, processing_class=processor)


def _cpu_replica(module: torch.nn.Module) -> torch.nn.Module:
    """What `torch.nn.parallel.replicate` builds for one device (its `_replicate_for_data_parallel` shallow copies,
    sharing hooks, with parameters set as plain tensors), without the CUDA broadcast it needs."""
    replicas = {m: m._replicate_for_data_parallel() for m in module.modules()}
    for original, replica in replicas.items():
        for name, child in original._modules.items():
            replica._modules[name] = replicas[child] if child is not None else None
        for name, param in original._parameters.items():
            if param is not None:
                setattr(replica, name, param.view_as(param))  # a non-leaf tensor, as the broadcast copy is
    return replicas[module]


def test_data_parallel_is_refused_with_the_fix(tiny_pivot_factory):
    """`nn.DataParallel` replicas (what the Trainer runs with several visible GPUs and no launcher) hold their weights
    as plain tensors, on which transformers' own `PreTrainedModel.dtype` fails mid-forward (StopIteration): a Pivot
    model refuses them up front, naming the launchers that work."""
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip")).eval()
    replica = _cpu_replica(model)
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"DataParallel.*accelerate launch --num_processes N"):
        replica.get_vision_features(pixels)
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES"):
        replica(input_ids=torch.tensor([[1, 2]]), pixel_values=pixels)
    model.get_vision_features(pixels)  # the model itself is unaffected


@pytest.mark.parametrize("patch", ["device_map_hook", "hook_removed", "module_compile"])
def test_features_follow_the_view_when_the_tower_forward_is_patched_per_instance(patch, tiny_pivot_factory):
    """accelerate's device-map / offload hooks replace `forward` on the instance with a partial bound to the module
    (and `remove_hook_from_module` leaves a bound `forward` behind); `module.compile()` stores a compiled call bound
    to the module. In the per-call view those must run the view (feature layer, no final norm), not the full tower."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip")).eval()
    tower = model.vision_tower
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = {layer: _hidden_state_reference(tower, pixels, layer, 0) for layer in (-2, 1)}
    inner = find_encoder_layers(tower)[0]  # the blocks' owner, on the view's path: a device map hooks it too
    if patch == "module_compile":
        tower.compile(backend="eager")
    else:
        for module in (tower, inner):
            add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
        if patch == "hook_removed":
            for module in (tower, inner):
                remove_hook_from_module(module)
    for layer in (-2, 1):
        with torch.no_grad():
            feats = model.get_vision_features(pixels, vision_feature_layer=layer)
        torch.testing.assert_close(feats, expected[layer], rtol=0, atol=0)
