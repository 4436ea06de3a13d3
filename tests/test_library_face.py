"""The library's public face: what `import eqx_mtp` loads and where names live."""

import importlib.metadata
import subprocess
import sys

import eqx_mtp

APPLICATION_ONLY = ("orbax", "grain", "tqdm", "matplotlib", "tokenizers")


def test_import_loads_no_application_dependency():
    # A fresh interpreter: this test process has imported the application already.
    code = (
        "import sys, eqx_mtp\n"
        f"heavy = {APPLICATION_ONLY!r}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "print(','.join(loaded))\n"
        "print('eqx_mtp.train' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["", "False"], out


def test_application_is_reached_as_a_subpackage():
    code = (
        "import sys, eqx_mtp\n"
        "step = eqx_mtp.train.train_step\n"
        "print('orbax' in {m.split('.')[0] for m in sys.modules})\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True"]


def test_version_is_the_installed_distributions():
    assert eqx_mtp.__version__ == importlib.metadata.version("eqx_mtp")


def test_subpackages_hold_their_families():
    assert {"Transformer", "TransformerBlock", "blockwise_attention"} <= set(
        dir(eqx_mtp.nn)
    )
    assert {"load_llama", "save_llama", "load_maxtext_mtp"} <= set(dir(eqx_mtp.interop))
    # One path per name: building blocks and formats are not also top-level.
    assert not hasattr(eqx_mtp, "Transformer")
    assert not hasattr(eqx_mtp, "load_llama")
    assert not hasattr(eqx_mtp, "decode")
