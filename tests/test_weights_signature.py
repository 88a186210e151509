"""Weights signatures: the same weights in another dtype match, retrained weights do not, unreadable weights are
not checked; and how generation settings compare them."""

import copy

import pytest
import torch

from vidaccel.offline_planner.trajectories import setting_differences
from vidaccel.offline_planner.weights_signature import signature_difference, weights_signature, weights_signatures


def reference_transformer():
    """The shipped reference model's transformer: trained weights, whose RMS values are not all alike."""
    from diffusers import WanTransformer3DModel

    from vidaccel.reference.pipeline import reference_asset_dir

    return WanTransformer3DModel.from_pretrained(reference_asset_dir() / "transformer").eval()


@pytest.mark.parametrize("model", ["tiny", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_to_half_precision_keeps_the_signature(tiny_pipelines, model, dtype):
    transformer = tiny_pipelines["wan"].transformer if model == "tiny" else reference_transformer()
    measured = weights_signature(transformer)
    assert len(measured) == 16
    cast = weights_signature(copy.deepcopy(transformer).to(dtype))
    assert [name for name, _ in cast] == [name for name, _ in measured]
    assert cast != measured  # the cast moved the RMS values...
    assert signature_difference(measured, cast) is None  # ...by far less than retraining would


def test_a_changed_sampled_parameter_is_found_and_named(tiny_pipelines, perturb_weights):
    transformer = tiny_pipelines["wan"].transformer
    before = weights_signature(transformer)
    name = before[len(before) // 2][0]
    perturb_weights(transformer, name, 1.05)
    after = weights_signature(transformer)
    difference = signature_difference(before, after)
    assert difference is not None and difference.startswith(f"RMS of {name} is ")
    assert [pair for pair in after if pair[0] != name] == [pair for pair in before if pair[0] != name]


def grid_module(count=40, small_last=True):
    """Parameters p00, p01, ... of 32x32 elements whose RMS is their index + 1, then an empty and a small one."""
    module = torch.nn.Module()
    for index in range(count):
        module.register_parameter(f"p{index:02d}", torch.nn.Parameter(torch.full((32, 32), index + 1.0)))
    module.register_parameter("empty", torch.nn.Parameter(torch.empty(0)))
    if small_last:
        module.register_parameter("bias", torch.nn.Parameter(torch.ones(8)))
    return module


def test_parameters_are_sampled_evenly_from_the_first_to_the_last():
    signature = weights_signature(grid_module())
    indices = [round(k * 39 / 15) for k in range(16)]  # 13k/5 is never halfway between integers
    assert signature == [[f"p{index:02d}", float(index + 1)] for index in indices]
    assert [name for name, _ in weights_signature(grid_module(), count=3)] == ["p00", "p20", "p39"]
    assert len(weights_signature(grid_module(5), count=16)) == 5  # fewer parameters than asked: all of them


def test_small_parameters_are_sampled_only_without_larger_ones_and_integer_ones_never():
    small_only = torch.nn.Module()
    small_only.weight = torch.nn.Parameter(torch.full((4,), 2.0))
    small_only.empty = torch.nn.Parameter(torch.empty(0, 3))
    small_only.bias = torch.nn.Parameter(torch.full((3,), 3.0))
    small_only.quantized = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.uint8), requires_grad=False)
    assert weights_signature(small_only) == [["weight", 2.0], ["bias", 3.0]]  # never the empty or integer one
    assert weights_signature(torch.nn.Module()) == []
    with pytest.raises(ValueError, match="count must be an integer >= 2"):
        weights_signature(small_only, count=1)


def test_values_are_rounded_to_six_significant_digits():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.full((64, 64), 0.123456789, dtype=torch.float64))
    assert weights_signature(module) == [["weight", 0.123457]]


def test_a_whole_pipeline_is_read_from_the_device_at_once(tiny_pipelines, monkeypatch):
    pipe = tiny_pipelines["wan2.2"]
    each = [weights_signature(pipe.transformer), weights_signature(pipe.transformer_2)]
    assert each[0] != each[1]
    transfers = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda tensor: transfers.append(tensor.shape) or original(tensor))
    monkeypatch.setattr(torch.Tensor, "item", lambda tensor: pytest.fail("one sync per value"))
    assert weights_signatures([pipe.transformer, pipe.transformer_2]) == each
    assert transfers == [(32,)]  # 16 values of each transformer in one transfer


def test_meta_weights_have_no_signature_and_are_not_checked(tiny_pipelines):
    transformer = tiny_pipelines["wan"].transformer
    assert weights_signature(copy.deepcopy(transformer).to("meta")) is None
    partly = grid_module()
    partly.p39 = torch.nn.Parameter(torch.empty(32, 32, device="meta"))  # one sampled parameter offloaded
    assert weights_signature(partly) is None
    assert weights_signatures([partly, grid_module(3)]) == [None, [["p00", 1.0], ["p01", 2.0], ["p02", 3.0]]]
    real = weights_signature(transformer)
    assert signature_difference(None, real) is None and signature_difference(real, None) is None
    assert setting_differences({"weights_signatures": [None]}, {"weights_signatures": [real]}) == []


def test_signature_difference_tolerates_casts_but_not_retraining():
    ours = [["a.weight", 0.5], ["b.weight", 0.0], ["c.weight", 2.0]]
    assert signature_difference(ours, [list(pair) for pair in ours]) is None
    assert signature_difference(ours, [["a.weight", 0.5 * (1 + 9e-4)], ["b.weight", 0.0], ["c.weight", 2.0]]) is None
    assert signature_difference(ours, [["a.weight", 0.5], ["b.weight", 0.0], ["c.weight", 2.0 * 1.002]]) == (
        "RMS of c.weight is 2 vs 2.004")
    assert signature_difference(ours, [["a.weight", 0.5], ["b.weight", 1e-9], ["c.weight", 2.0]]) == (
        "RMS of b.weight is 0 vs 1e-09")
    assert signature_difference(ours, ours, rel_tol=0) is None
    assert signature_difference(ours, [["a.weight", 0.5], ["x.weight", 0.0], ["c.weight", 2.0]]) == (
        "different parameters: 'b.weight' vs 'x.weight' at sampled parameter 2")
    assert signature_difference(ours, ours[:2]) == "different parameters: 'c.weight' vs none at sampled parameter 3"


def test_settings_compare_signatures_with_a_tolerance_and_everything_else_exactly():
    signature = [["a.weight", 0.5], ["b.weight", 0.25]]
    setting = {"device": "cuda", "dtypes": ["bfloat16"], "weights_signatures": [signature]}
    on_cpu = {"device": "cpu", "dtypes": ["bfloat16"], "weights_signatures": [[["a.weight", 0.5000001],
                                                                              ["b.weight", 0.25]]]}
    assert setting_differences(setting, on_cpu) == ["device: 'cuda' vs 'cpu'"]
    assert setting_differences(setting, on_cpu, ignore=["device"]) == []
    retrained = {**setting, "weights_signatures": [[["a.weight", 0.5], ["b.weight", 0.3]]]}
    assert setting_differences(setting, retrained) == [
        "weights_signatures: other weights in transformer 1 (RMS of b.weight is 0.25 vs 0.3)"]
    assert setting_differences(setting, {**setting, "weights_signatures": [signature, signature]}) == [
        "weights_signatures: signatures of 1 vs 2 transformers"]
    # Trajectories and checkpoints written before signatures existed have no key: compatible on it
    older = {key: value for key, value in setting.items() if key != "weights_signatures"}
    assert setting_differences(setting, older) == [] and setting_differences(older, retrained) == []
    assert setting_differences(older, {**older, "dtypes": ["float32"]}) == [
        "dtypes: ['bfloat16'] vs ['float32']"]
