import gc
import os
import shutil
import tempfile

# Before JAX is imported anywhere: 8 simulated CPU devices for the multi-device tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the whole run, made by the first process that
# loads this file (pytest's controller) and inherited by its xdist workers and by every
# job the tests start as a subprocess: the jobs compile the same train step again and
# again. Compiled programs are keyed by their HLO and JAX's version, so a hit is the
# same program.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="eqx_mtp_xla_")
    os.environ["EQX_MTP_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_enable_checks", False)

# Every new shape recompiles: few, quick examples, no deadline.
settings.register_profile("eqx_mtp", max_examples=15, deadline=None)
settings.load_profile("eqx_mtp")


# The contributor's quick tier is `pytest -m "not slow"`: these files are marked slow
# whole, besides the tests marked one by one (multi-process runs, the benchmark smoke
# run). Each runs the training job end to end, a docs page, or the loss on 8 simulated
# devices: the full suite (CI) runs them.
SLOW_FILES = {
    "test_train.py",
    "test_init_from.py",
    "test_generate_cli.py",
    "test_generate_text.py",
    "test_text_job.py",
    "test_export.py",
    "test_curricula.py",
    "test_own_loop.py",
    "test_frozen_trunk.py",
    "test_docs_examples.py",
    "test_sharded_loss.py",
    "test_multiprocess.py",
}


# The files that take longest, longest first (seconds on CI's 2 cores, measured with
# `--durations`). Workers take whole files (`--dist loadfile`) in collection order, so
# these go first and the many short files fill in at the end; in alphabetical order a
# long file started last kept one worker busy for minutes while the other idled. The
# benchmark smoke run is two files, its halves, first: each worker starts with one.
LONGEST_FIRST = (
    "test_benchmarks_quick_a.py",
    "test_benchmarks_quick_b.py",
    "test_train.py",
    "test_preemption.py",
    "test_docs_examples.py",
    "test_multiprocess.py",
    "test_sharded_loss.py",
    "test_loss.py",
    "test_blockwise.py",
    "test_decode.py",
    "test_frozen_trunk.py",
    "test_records.py",
    "test_curricula.py",
    "test_text_job.py",
    "test_learning_benchmark.py",
    "test_generate_text.py",
    "test_export.py",
)


def pytest_configure(config):
    # pytest-xdist (3.6 and later) reorders `--dist loadfile`'s files by their number
    # of tests, most first, unless told not to: the long files of one or two tests
    # (the benchmark smoke run, the multi-process jobs) then started last, one
    # worker running them alone while the other had finished.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: the tests of a file keep their order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call."""
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: next(keys)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory of 30 small `.py` documents for the training job."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "lambda", "x", "y", "(", ")"]
    for i in range(30):
        text = " ".join(rng.choice(words, size=rng.integers(5, 40)))
        (root / f"doc{i:02d}.py").write_text(text + "\n")
    return str(root)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module.

    The suite compiles hundreds of programs in one process on 8 simulated devices,
    and CI once died of a segmentation fault inside XLA's compiler late in the run
    (a test that passes alone); keeping the process small is the cheap precaution.
    Modules share few programs, so little is compiled twice.
    """
    yield
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config):
    if os.environ.get("EQX_MTP_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
