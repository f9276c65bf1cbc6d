"""A cached DiT step is capturable by CUDA graphs (needs a GPU; every test skips without one).

A forward that synchronises with the host (tests/test_host_sync.py checks that on any machine) fails
inside a capture, so these tests are the end-to-end check on a GPU: each step of a cached sampling run
captured as a graph and replayed, and torch.compile(mode="reduce-overhead"), which records CUDA graphs
itself and silently falls back to running without them when a graph cannot be captured.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import harmonica as hc
from harmonica.sampling import sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS, BLOCKS = 4, 2


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=BLOCKS, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    return model.eval().requires_grad_(False).cuda()


def mixed_schedule() -> hc.Schedule:
    """Every plan action: compute, store, read, read for the last time."""
    mask = torch.ones(STEPS, BLOCKS, 2, dtype=torch.bool)
    mask[1, 0, 0] = mask[2, 0, 0] = False
    mask[3, 1, 1] = False
    return hc.Schedule(mask)


def run_steps(model, inputs, labels, capture: bool):
    """The transformer forwards of one driven sampling run on fixed inputs: each step's output
    computed eagerly, or captured as a CUDA graph per step (one memory pool, captured in order, so
    the slots step t stores are the ones step t+1's graph reads) and then replayed."""
    state = hc.get_cache_state(model)
    scheduler = DDIMScheduler()
    x_in = torch.empty_like(inputs[0])
    t_in = torch.empty(inputs[0].shape[0], dtype=torch.long, device="cuda")
    pool = torch.cuda.graph_pool_handle()
    graphs, outputs = [], []
    with torch.no_grad(), state.driven_by(scheduler):
        scheduler.set_timesteps(STEPS, device="cuda")  # begins the run
        for step, t in enumerate(scheduler.timesteps):
            x_in.copy_(inputs[step])
            t_in.fill_(int(t))
            if capture:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(x_in, timestep=t_in, class_labels=labels, return_dict=False)[0]
                graphs.append(graph)
            else:
                out = model(x_in, timestep=t_in, class_labels=labels, return_dict=False)[0]
            outputs.append(out if capture else out.clone())
            scheduler.step(out[:, :4], t, inputs[step])  # ends the step
    if not capture:
        return outputs
    replayed = []
    for step, (graph, t) in enumerate(zip(graphs, scheduler.timesteps)):
        x_in.copy_(inputs[step])
        t_in.fill_(int(t))
        graph.replay()
        replayed.append(outputs[step].clone())
    return replayed


def test_each_cached_step_replays_as_a_cuda_graph():
    model = tiny_dit()
    hc.enable_cache(model, mixed_schedule())
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(2, 4, 8, 8, generator=g, device="cuda") for _ in range(STEPS)]
    labels = torch.tensor([3, 1000], device="cuda")
    eager = run_steps(model, inputs, labels, capture=False)  # also the warm-up a capture needs
    replayed = run_steps(model, inputs, labels, capture=True)
    for step, (got, want) in enumerate(zip(replayed, eager)):
        # The same ops on the same inputs; cuBLAS may still pick another algorithm inside a capture
        # (its workspace is the graph's), so float32 precision, not bit equality.
        torch.testing.assert_close(got, want, msg=lambda m, step=step: f"step {step}: {m}")


def test_cached_sampling_under_reduce_overhead_records_cuda_graphs():
    from torch._dynamo.utils import counters

    model = tiny_dit()
    hc.enable_cache(model, mixed_schedule())
    labels = torch.tensor([3], device="cuda")
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, 1000)}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).cuda()

    def run(transformer):
        return sample(transformer, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                      guidance_scale=2.0, progress=False)

    eager = run(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=STEPS + 2):
        for _ in range(3):  # cudagraph trees warm up, record, then replay
            got = run(compiled)
    assert counters["inductor"]["cudagraph_skips"] == 0, "torch.compile ran some cached steps without CUDA graphs"
    # Inductor's fused kernels round float32 in another order than eager's: compare norm-wise, at a
    # few float32 roundings per layer over 4 steps of 2 blocks.
    assert float((got - eager).norm() / eager.norm()) < 1e-4


# Last in this module: a capture that fails can leave the stream's capture state behind for the tests
# after it in the same process.
def test_per_sample_step_replays_as_a_cuda_graph():
    model = tiny_dit()
    hc.enable_cache(model, mixed_schedule())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    labels = torch.tensor([3, 1000], device="cuda")
    first, second = torch.tensor([999, 999], device="cuda"), torch.tensor([900, 999], device="cuda")

    def forward(timestep):
        return model(x, timestep=timestep, class_labels=labels, return_dict=False)[0]

    def fill_slots(serving):
        serving.steps = [0, 0]
        forward(first)
        serving.steps = [1, 0]  # sample 0 reuses block 0's attn, sample 1 computes it

    with torch.no_grad():
        with hc.per_sample(model) as serving:
            fill_slots(serving)
            eager = forward(second).clone()  # also the warm-up: the rows' index is built (once) here
        with hc.per_sample(model) as serving:
            fill_slots(serving)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(second)
            graph.replay()
    torch.testing.assert_close(out, eager)
