"""The CUDA-only fast paths against their eager twins: torch.compile inside the online step, parallel streams
on the GPU, the per-position CUDA graph of parallel streams, the grouped per-sample fold (channels-last on CUDA) in
episodic TTT and parallel streams, and `tta adapt` end to end. Skipped without a GPU (CI has none); the
device suite's `smoke` stage runs them."""

import copy
import json

import pytest
import torch
from conftest import AtomicEverywhere, run_cli

from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.data.imageset import to_float_nchw
from tta_cli.engine.episodic import EpisodicConfig, EpisodicTTT
from tta_cli.engine.grouped import GroupedPerSampleModel
from tta_cli.engine.parallel_online import ParallelOnlineTTT
from tta_cli.engine.per_sample import adapt_streams_reference
from tta_cli.kernels import triton_conv
from tta_cli.models import build_model
from tta_cli.tasks import build_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    return build_model(ModelConfig(depth=8, groups=4), task).to("cuda", dtype), task


def uint8_images(count: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(4)
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, device="cuda", generator=generator)


def test_compiled_online_step_matches_eager_on_cuda():
    model, task = tiny()
    image = torch.rand(1, 3, 32, 32, device="cuda")
    logits = []
    for compiled in (False, True):
        config = OnlineConfig(copies=8, lr=0.01, amp=False, compile=compiled, cuda_graph=False)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator(device="cuda").manual_seed(1))
        logits.append(method.adapt(image))
    scale = logits[0].abs().max()
    assert ((logits[1] - logits[0]).abs().max() / scale) < 1e-2  # TF32 convolutions in different cuDNN algorithms


@pytest.mark.parametrize("per_sample", ["vmap", "grouped"])
def test_parallel_streams_on_cuda_equal_the_reference_in_float64(per_sample):
    model, task = tiny(torch.float64)
    images = uint8_images(7)
    streams = [torch.tensor([0, 1, 2], device="cuda"), torch.tensor([3, 4, 5, 6], device="cuda")]
    config = OnlineConfig(steps=1, lr=0.05, copies=3, amp=False, cuda_graph=False, per_sample=per_sample)
    generator = torch.Generator(device="cuda")
    method = ParallelOnlineTTT(copy.deepcopy(model), task, config, generator.manual_seed(8))
    assert isinstance(method.functions, GroupedPerSampleModel) == (per_sample == "grouped")
    batched = method.adapt_streams(images, streams)
    reference = adapt_streams_reference(copy.deepcopy(model), task, config, to_float_nchw(images), streams, generator.manual_seed(8))
    for got, expected in zip(batched, reference, strict=True):
        assert torch.allclose(got, expected, atol=1e-9)


@pytest.mark.parametrize("per_sample", ["vmap", "grouped"])
def test_parallel_streams_graph_adapts_every_sample(per_sample):
    model, task = tiny()
    images = uint8_images(40)
    streams = list(torch.arange(40, device="cuda").view(4, 10))
    config = OnlineConfig(steps=1, lr=0.05, copies=4, amp=False, cuda_graph=True, per_sample=per_sample)
    method = ParallelOnlineTTT(copy.deepcopy(model), task, config)  # default generator: the graph path
    adapted = method.adapt_streams(images, streams)
    assert [a.shape for a in adapted] == [(10, 10)] * 4 and all(a.isfinite().all() for a in adapted)
    assert method.counters()["updates"] == 40  # the warm-up's updates before capture were undone
    with torch.no_grad():
        source = model(images[streams[0][-1:]].permute(0, 3, 1, 2).float() / 255.0)
    assert not torch.allclose(adapted[0][-1:], source, atol=1e-5)  # ten updates in, the first stream has moved


def test_pipelined_sequence_on_cuda_equals_one_call_per_sample_and_its_graph_runs():
    model, task = tiny(torch.float64)
    images = torch.rand(6, 3, 32, 32, device="cuda", dtype=torch.float64)
    logits = []
    for pipeline in (False, True):
        config = OnlineConfig(copies=4, lr=0.05, amp=False, cuda_graph=False, pipeline=pipeline)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator(device="cuda").manual_seed(2))
        logits.append(method.adapt_sequence(images))
    assert torch.allclose(logits[1], logits[0], atol=1e-9)
    graphed = OnlineTTT(copy.deepcopy(model).float(), task, OnlineConfig(copies=4, lr=0.05, amp=False, pipeline=True), classes=10)
    out = graphed.adapt_sequence(images.float())  # default generator: the "update", "pipelined" and "predict" graphs
    assert out.shape == (6, 10) and out.isfinite().all() and graphed.counters()["updates"] == 6


def test_grouped_episodic_on_cuda_equals_vmap_in_float64():
    """The channels-last fold against vmap on the GPU's own kernels (the CPU tests cover NCHW and the maths)."""
    model, task = tiny(torch.float64)
    images = torch.rand(5, 3, 32, 32, device="cuda", dtype=torch.float64)
    logits = {}
    for per_sample in ("vmap", "grouped"):
        config = EpisodicConfig(steps=2, lr=0.05, copies=4, chunk=5, amp=False, momentum=0.9, skip_above=0.5, per_sample=per_sample)
        method = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator(device="cuda").manual_seed(3))
        logits[per_sample] = method.adapt(images)
        assert isinstance(method._functions, GroupedPerSampleModel) == (per_sample == "grouped")
        if per_sample == "grouped":
            assert method._functions.channels_last
    assert torch.allclose(logits["grouped"], logits["vmap"], atol=1e-9)


def test_grouped_episodic_compiled_bf16_runs_and_agrees_with_vmap():
    """The fast configuration (bf16 autocast, torch.compile, a padded last chunk): near vmap's answer, not equal
    (bf16 rounding in different kernels)."""
    model, task = tiny()
    images = torch.rand(12, 3, 32, 32, device="cuda")
    logits = {}
    for per_sample in ("vmap", "grouped"):
        config = EpisodicConfig(steps=2, lr=0.01, copies=8, chunk=8, amp=True, compile=True, per_sample=per_sample)
        logits[per_sample] = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator(device="cuda").manual_seed(3)).adapt(images)
    assert logits["grouped"].shape == (12, 10) and logits["grouped"].isfinite().all()
    scale = logits["vmap"].abs().max()
    assert ((logits["grouped"] - logits["vmap"]).abs().max() / scale) < 0.05


def test_tta_adapt_end_to_end_on_cuda_records_each_paths_precision(tiny_checkpoint, tmp_path):
    """The whole command on the GPU: ttt in bf16, the two corruptions' ttt-online streams side by side in bf16,
    source in fp32, every prediction finite (the runner would refuse the run otherwise)."""
    out = tmp_path / "adapt"
    result = run_cli([
        "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "gaussian_noise,fog", "--n", "20",
        "--method", "source,ttt,ttt-online", "--steps", "1", "--copies", "4", "--device", "cuda", "--set", "compile=false", "--out", out,
    ])
    assert result.exit_code == 0, result.output
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert {name: record["precision"] for name, record in methods.items()} == {
        "source": "float32", "ttt": "bf16 autocast", "ttt-online": "bf16 autocast"
    }
    assert methods["ttt-online"]["counters"]["updates"] == 40


@pytest.fixture
def exact_fp32():
    """fp32 convolutions without TF32, in torch and in the Triton kernels (which follow cuDNN's setting)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("shape", [(32, 16, 16, 32, 1), (32, 16, 32, 32, 2), (33, 32, 64, 16, 2), (32, 64, 64, 8, 1), (7, 3, 16, 32, 1)], ids=str)
def test_every_triton_tile_equals_cudnn_on_cuda(shape, exact_fp32):
    """Each compiled kernel at each tile the automatic choice may pick, against cuDNN (not through the choice,
    which could pick cuDNN itself and so compare it with itself)."""
    batch, cin, cout, size, stride = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, cin, size, size, device="cuda", generator=generator)
    w = torch.randn(cout, cin, 3, 3, device="cuda", generator=generator)
    dy = torch.randn(batch, cout, (size - 1) // stride + 1, (size - 1) // stride + 1, device="cuda", generator=generator)
    arguments = triton_conv.operation_arguments(x, w, dy, stride, 1)
    for operation, (_, triton_call, tiles) in triton_conv.CANDIDATES.items():
        expected = triton_conv.torch_reference(operation, arguments)  # cuDNN's (both gradients: its own two)
        results = triton_conv.run_side_by_side(triton_call, arguments[operation], list(tiles))  # the compiles overlap
        for tile, fast in zip(tiles, results, strict=True):
            assert not isinstance(fast, Exception), (operation, tile, fast)
            for got, want in zip(fast if operation == "grads" else (fast,), expected, strict=True):
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), (operation, tile)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_online_step_with_triton_convolutions_in_its_cuda_graph_follows_cudnn(amp, exact_fp32):
    """The compiled, graph-captured, pipelined one-stream step: Triton convolutions against cuDNN's, over a short
    stream (fp32 without TF32 close; bf16 in the same neighbourhood)."""
    model, task = tiny()
    images = torch.rand(12, 3, 32, 32, device="cuda")
    runs = []
    for kernels in ("torch", "triton"):
        torch.cuda.manual_seed(5)
        config = OnlineConfig(copies=8, lr=0.01, amp=amp, compile=True, cuda_graph=True, pipeline=True, conv_kernels=kernels)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10)
        runs.append(method.adapt_sequence(images).float())
        assert (type(method.model.encoder.stem).__name__ == "TritonConv2d") == (kernels == "triton")
    tolerance = 0.1 if amp else 1e-3
    assert torch.allclose(runs[1], runs[0], atol=tolerance * float(runs[0].abs().max()))


def test_triton_convolutions_choose_an_implementation_per_shape_and_reuse_it():
    x = torch.randn(8, 16, 16, 16, device="cuda", requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    before = len(triton_conv.choices())
    out = triton_conv.conv2d(x, w, 1, 1)
    torch.autograd.grad(out.square().sum(), (x, w))
    chosen = triton_conv.choices()
    assert len(chosen) == before + 4  # forward, both gradients at once against input and weight gradient: once each
    assert all(value in ("torch", "separate") or value.startswith("triton ") for value in chosen.values())
    triton_conv.conv2d(x, w, 1, 1)
    assert len(triton_conv.choices()) == before + 4


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_overlapped_prediction_in_its_cuda_graph_follows_the_plain_step(compiled, exact_fp32, monkeypatch):
    """adapt_overlapped on CUDA (each prediction on a side stream inside the next update's CUDA graph) against
    adapt's step graph (update, then predict): the same logits and weights over a short stream. Both draw their
    views from the default generator, reseeded after the graphs are captured. cuDNN deterministic: its atomic
    weight gradients otherwise differ run to run, by up to 2e-4 of the logits after 8 steps (failed 1 run in 2 on
    the H200 in the ninth session)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model, task = tiny()
    images = torch.rand(8, 1, 3, 32, 32, device="cuda")
    config = OnlineConfig(copies=8, lr=0.05, amp=False, compile=compiled, cuda_graph=True, conv_kernels="torch")
    plain = OnlineTTT(copy.deepcopy(model), task, config, classes=10)
    plain.prepare(images[0], ("step", "predict"))
    torch.cuda.manual_seed(7)
    expected = [plain.adapt(image).clone() for image in images]
    overlapped = OnlineTTT(copy.deepcopy(model), task, config, classes=10)
    overlapped.prepare(images[0], ("update", "overlapped", "predict"))
    torch.cuda.manual_seed(7)
    logits = [overlapped.adapt_overlapped(images[0], None)]
    logits += [overlapped.adapt_overlapped(image, earlier).clone() for earlier, image in zip(images[:-1], images[1:], strict=True)]
    logits = logits[1:] + [overlapped.predict(images[-1])]
    for got, want in zip(logits, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))
    assert torch.allclose(overlapped.weights.flat, plain.weights.flat, atol=1e-6)
    assert not torch.equal(overlapped.weights.flat, overlapped.source)


def test_atomic_launches_on_shared_zeroed_outputs_in_the_overlapped_graph_follow_cudnn(monkeypatch, exact_fp32):
    """Every convolution on an atomic launch, their zeroed outputs sliced from one fill per stream and call (the
    update's stream and the side stream's prediction), compiled and captured: the overlapped stream step against
    cuDNN's over a short stream."""
    monkeypatch.setattr(triton_conv, "_CHOSEN", AtomicEverywhere())
    model, task = tiny()
    images = torch.rand(8, 1, 3, 32, 32, device="cuda")
    runs = []
    for kernels in ("torch", "triton"):
        config = OnlineConfig(copies=8, lr=0.05, amp=False, compile=True, cuda_graph=True, conv_kernels=kernels)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10)
        method.prepare(images[0], ("update", "overlapped", "predict"))
        torch.cuda.manual_seed(7)
        logits = [method.adapt_overlapped(images[0], None)]
        logits += [method.adapt_overlapped(image, earlier).clone() for earlier, image in zip(images[:-1], images[1:], strict=True)]
        runs.append((torch.cat(logits[1:] + [method.predict(images[-1])]), method.weights.flat.clone()))
    assert {key[0] for key in method._calls["overlapped"].plan} == {"out", "dx", "dw"}  # every role was planned for
    (want, want_weights), (got, got_weights) = runs
    assert torch.allclose(got, want, atol=1e-3 * float(want.abs().max()))
    assert torch.allclose(got_weights, want_weights, atol=1e-4)
