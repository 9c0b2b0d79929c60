"""Convert the released DeepSeek-V3.2 checkpoint (HF safetensors) into an Orbax checkpoint that
`dsv32_jax.load_model` restores directly (see `dsv32_jax.checkpoint.orbax_layout` for the layout).

    from convert import convert_checkpoint, verify_checkpoint
    convert_checkpoint("/data/DeepSeek-V3.2", "/data/dsv32-orbax")          # fp8, lossless
    verify_checkpoint("/data/dsv32-orbax", "/data/DeepSeek-V3.2", sample=0.05)

Command line: `dsv32 convert HF_DIR OUT_DIR [--weights fp8|bf16] [--include-mtp] [--workers N]`
and `dsv32 convert --verify OUT_DIR HF_DIR` (or `python -m convert ...`).
"""

from convert.plan import ConvertError
from convert.run import convert_checkpoint
from convert.verify import VerifyError, verify_checkpoint

__all__ = ["ConvertError", "VerifyError", "convert_checkpoint", "verify_checkpoint"]
