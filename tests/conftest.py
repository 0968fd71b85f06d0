"""Test setup: the JAX CPU backend with 8 host devices, set before jax initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each test module's compiled programs when it ends: XLA:CPU maps a few hundred memory regions per
    executable, and one process running the whole suite otherwise reaches the kernel's 65530-map limit
    (vm.max_map_count) and aborts inside a compile."""
    yield
    jax.clear_caches()
