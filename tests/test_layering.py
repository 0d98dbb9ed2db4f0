"""Package layering: the model can be used (and shipped) without the data pipeline."""

import subprocess
import sys


def test_importing_every_model_module_imports_nothing_from_data():
    code = ("import pkgutil, sys, importlib, oq2vl_jax.models as m\n"
            "for info in pkgutil.iter_modules(m.__path__): importlib.import_module(f'oq2vl_jax.models.{info.name}')\n"
            "bad = sorted(n for n in sys.modules if n.startswith('oq2vl_jax.data'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
