"""The C kernel library built for one ISA, shared by the kernel test modules: every ISA compiles
once per session into the directory test_paged_attention.py builds into too."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from lightspeed.models import paged_attention
from lightspeed.models.paged_attention import BuildSpec, build_kernel


def build_isa_lib(isa: str, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The library for `isa` ("avx512", "avx2", "scalar"); skips the test without a compiler."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    kernel_dir = tmp_path_factory.getbasetemp() / "kernels"
    kernel_dir.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(paged_attention.CACHE_ENV, str(kernel_dir))
        return build_kernel(BuildSpec(isa=isa)).lib
