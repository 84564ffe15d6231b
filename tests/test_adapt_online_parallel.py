"""Parallel online TTT over independent streams equals adapting each stream on its own."""

import copy

import pytest
import torch

from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.data.imageset import to_float_nchw
from tta_cli.engine.grouped import GroupedPerSampleModel
from tta_cli.engine.parallel_online import ParallelOnlineTTT
from tta_cli.engine.per_sample import adapt_streams_reference
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.tasks import build_task


def tiny(task_name="rotation"):
    torch.manual_seed(0)
    task = build_task(TaskConfig(name=task_name, patch_size=4))
    return build_model(ModelConfig(depth=8, groups=4), task).to(torch.float64), task


def uint8_images(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("per_sample", ["vmap", "grouped"])  # grouped folds the rotation models only; masked keeps vmap
@pytest.mark.parametrize(
    "task_name,momentum,skip_above",
    [("rotation", 0.0, None), ("rotation", 0.9, None), ("rotation", 0.0, 0.3), ("masked", 0.0, None), ("masked", 0.9, None)],
)  # the confidence gate (skip_above) needs the rotation task
def test_parallel_streams_equal_the_reference(task_name, momentum, skip_above, per_sample):
    model, task = tiny(task_name)
    images = uint8_images(9)
    streams = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8])]  # ragged: shorter streams stop early
    config = OnlineConfig(steps=2, lr=0.05, copies=3, momentum=momentum, skip_above=skip_above, amp=False, per_sample=per_sample)
    method = ParallelOnlineTTT(copy.deepcopy(model), task, config, torch.Generator().manual_seed(8))
    assert isinstance(method.functions, GroupedPerSampleModel) == (per_sample == "grouped" and task_name == "rotation")
    batched = method.adapt_streams(images, streams)
    reference = adapt_streams_reference(copy.deepcopy(model), task, config, to_float_nchw(images), streams, torch.Generator().manual_seed(8))
    for got, expected, stream in zip(batched, reference, streams, strict=True):
        assert got.shape == (len(stream), 10)
        assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)
    counts = method.counters()  # every step of every real sample is taken or skipped; ended streams count for nothing
    assert counts["updates"] + counts["skipped"] == config.steps * 9
    assert (counts["skipped"] == 0) == (skip_above is None)


def test_one_parallel_stream_is_the_online_method():
    model, task = tiny()
    images = uint8_images(5)
    config = OnlineConfig(steps=1, lr=0.05, copies=4, amp=False)
    parallel = ParallelOnlineTTT(copy.deepcopy(model), task, config, torch.Generator().manual_seed(3))
    [batched] = parallel.adapt_streams(images, [torch.arange(5)])
    online = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(3))
    sequential = torch.cat([online.adapt(images[i : i + 1].permute(0, 3, 1, 2).double() / 255.0) for i in range(5)])
    assert torch.allclose(batched, sequential, atol=1e-10)
    assert parallel.counters()["updates"] == 5


def test_parallel_streams_leave_the_source_model_alone_and_adapt():
    model, task = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = uint8_images(6)
    config = OnlineConfig(lr=0.1, copies=2, amp=False)
    method = ParallelOnlineTTT(model, task, config, torch.Generator().manual_seed(1), max_streams=2)
    adapted = method.adapt_streams(images, [torch.arange(3), torch.arange(3, 6), torch.tensor([5, 4])])  # 2 groups of streams
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        source = model(images[[2]].permute(0, 3, 1, 2).double() / 255.0)
    assert not torch.allclose(adapted[0][-1:], source, atol=1e-6)  # three updates in, the stream has moved
    assert [len(a) for a in adapted] == [3, 3, 2]


def test_unknown_per_sample_is_a_user_error():
    model, task = tiny()
    with pytest.raises(TTAError, match="per_sample"):
        ParallelOnlineTTT(model, task, OnlineConfig(per_sample="loops"))


@pytest.mark.parametrize(("amp", "one_stream", "side_by_side"), [(None, False, True), (True, True, True), (False, False, False)])
def test_tta_adapt_picks_each_paths_precision_unless_told(amp, one_stream, side_by_side):
    """By default one stream runs fp32 and streams side by side bf16 (what measured fastest for each on the H200);
    `--set amp=...` forces one choice on both."""
    from tta_cli.adapt.methods import build_method
    from tta_cli.config import AdaptSettings

    model, task = tiny()
    method = build_method("ttt-online", model, task, AdaptSettings(amp=amp, streams=2), classes=10, device=torch.device("cpu"))
    assert method.online.config.amp is one_stream and method.parallel.config.amp is side_by_side
    assert method.precision() == method.precision(side_by_side=True) == "float64"  # bf16 autocast happens on CUDA only
    method.device = torch.device("cuda")  # what the results file would say on CUDA (nothing runs there)
    assert method.precision() == ("bf16 autocast" if one_stream else "float64")
    assert method.precision(side_by_side=True) == ("bf16 autocast" if side_by_side else "float64")
