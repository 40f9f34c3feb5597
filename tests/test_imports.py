"""The light layers stay light: importing them pulls in neither diffusers nor transformers."""

import subprocess
import sys


def test_light_layers_do_not_import_diffusers_or_transformers():
    code = (
        "import sys, lorakit, lorakit.core, lorakit.formats.safetensors_io, lorakit.arch, lorakit.ops.merge, "
        "lorakit.ops.resize, lorakit.cli.main; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
