"""Option types shared by the commands, checked before torch is imported."""

import click

# the names `runtime.model.load_model` takes for a dtype
DTYPES = click.Choice(["float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half"], case_sensitive=False)
