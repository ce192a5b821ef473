import struct

import pytest
import xxhash

from lightspeed.kv_hashing import (
    HASH_SEED,
    compute_block_hashes,
    compute_prompt_seq_hashes,
    compute_seq_hashes,
    extend_seq_hashes,
    lora_seed,
    next_seq_hash,
)


def _local(tokens: list[int], seed: int = 1337) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(tokens)}I", *tokens), seed)


def _chain(parent: int, local: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, local), 1337)


def test_local_hashes_match_hand_computed_vectors() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert compute_block_hashes(tokens, 4) == [_local([1, 2, 3, 4]), _local([5, 6, 7, 8])]


def test_known_constant_vector() -> None:
    # Pinned so an accidental change of byte layout or seed is caught even if helpers drift.
    assert HASH_SEED == 1337
    assert compute_block_hashes([0, 1, 2, 3], 4) == [
        xxhash.xxh3_64_intdigest(bytes([0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]), 1337)
    ]


def test_partial_trailing_block_is_not_hashed() -> None:
    assert compute_block_hashes([1, 2, 3], 4) == []
    assert len(compute_block_hashes(list(range(11)), 4)) == 2
    assert compute_block_hashes(list(range(12)), 4)[:2] == compute_block_hashes(list(range(11)), 4)


def test_large_token_ids_are_u32() -> None:
    assert compute_block_hashes([2**32 - 1, 70000], 2) == [_local([2**32 - 1, 70000])]


def test_seq_hashes_chain_with_le_u64() -> None:
    local = compute_block_hashes(list(range(12)), 4)
    seq = compute_seq_hashes(local)
    assert seq[0] == local[0]
    assert seq[1] == _chain(seq[0], local[1])
    assert seq[2] == _chain(seq[1], local[2])
    assert next_seq_hash(seq[1], local[2]) == seq[2]
    assert compute_seq_hashes(local[1:], parent_seq_hash=seq[0]) == seq[1:]
    assert compute_seq_hashes([]) == []


def test_lora_seed_wraps_and_changes_local_hashes() -> None:
    expected = (1337 + xxhash.xxh3_64_intdigest(b"my-adapter")) % 2**64
    assert lora_seed("my-adapter") == expected
    assert lora_seed(None) == 1337
    tokens = [7, 8, 9, 10]
    base = compute_block_hashes(tokens, 4)
    lora = compute_block_hashes(tokens, 4, lora_name="my-adapter")
    assert lora == [_local(tokens, expected)]
    assert lora != base
    assert compute_block_hashes(tokens, 4, lora_name="other") != lora


def test_same_tokens_different_prefix_give_different_seq_hashes() -> None:
    a = compute_seq_hashes(compute_block_hashes([1, 1, 2, 2], 2))
    b = compute_seq_hashes(compute_block_hashes([3, 3, 2, 2], 2))
    assert a[1] != b[1]


def test_extend_seq_hashes_is_incremental() -> None:
    tokens = list(range(5))
    seq: list[int] = []
    local: list[int] = []
    assert extend_seq_hashes(tokens, 4, seq, local) == 1
    for t in range(5, 13):
        tokens.append(t)
        extend_seq_hashes(tokens, 4, seq, local)
    assert local == compute_block_hashes(list(range(13)), 4)
    assert seq == compute_seq_hashes(local)
    assert extend_seq_hashes(tokens, 4, seq, local) == 0


def test_extend_seq_hashes_with_lora() -> None:
    seq: list[int] = []
    local: list[int] = []
    extend_seq_hashes([1, 2, 3, 4], 2, seq, local, lora_name="x")
    assert local == compute_block_hashes([1, 2, 3, 4], 2, lora_name="x")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        compute_block_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        extend_seq_hashes([1, 2], 1, [1], [])


@pytest.mark.parametrize("num_tokens", [0, 3, 64, 65, 200, 8192, 8200])
@pytest.mark.parametrize("block_size", [1, 4, 64])
@pytest.mark.parametrize("lora_name", [None, "my-adapter"])
def test_compute_prompt_seq_hashes_matches_two_step_path(
    num_tokens: int, block_size: int, lora_name: str | None
) -> None:
    tokens = [(i * 2654435761) % 2**32 for i in range(num_tokens)]  # deterministic, full u32 range
    expected = compute_seq_hashes(compute_block_hashes(tokens, block_size, lora_name))
    assert compute_prompt_seq_hashes(tokens, block_size, lora_name) == expected
    assert compute_prompt_seq_hashes(tuple(tokens), block_size, lora_name) == expected


def test_compute_prompt_seq_hashes_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        compute_prompt_seq_hashes([1, 2, 3], 0)


def _dynamo_python() -> str | None:
    """The dev environment's Dynamo venv (bench/setup_dynamo.sh), or one named by DYNAMO_PYTHON."""
    import os
    from pathlib import Path

    candidates = [
        os.environ.get("DYNAMO_PYTHON", ""),
        str(Path(__file__).parents[3] / "bench/.work/dynamo-venv/bin/python"),
    ]
    return next((c for c in candidates if c and Path(c).exists()), None)


def test_local_hashes_match_dynamo_runtime() -> None:
    """Cross-check against ai-dynamo-runtime's own `compute_block_hash_for_seq` when installed."""
    import json
    import subprocess

    import pytest

    from lightspeed.kv_hashing import compute_block_hashes

    python = _dynamo_python()
    if python is None:
        pytest.skip("ai-dynamo-runtime is not installed (bash bench/setup_dynamo.sh)")
    cases = [
        (list(range(64)), 32, None),
        ([7, 2**32 - 1, 0, 5] * 50, 16, None),
        (list(range(1000, 1300)), 64, "my-adapter"),
        ([3] * 17, 4, "x"),
    ]
    script = (
        "import json,sys\nfrom dynamo.llm import compute_block_hash_for_seq as f\n"
        "print(json.dumps([f(t, b, lora_name=l) for t, b, l in json.load(sys.stdin)]))"
    )
    out = subprocess.run(
        [python, "-c", script], input=json.dumps(cases), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    theirs = json.loads(out)
    assert theirs == [compute_block_hashes(t, b, lora_name=lora) for t, b, lora in cases]
