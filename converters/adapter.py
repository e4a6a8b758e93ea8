"""LoRA adapters in peft's format, and merging them into the base weights.

An exported LoRA actor is two things: the merged HF model (``W + alpha / r * B @ A`` in every
adapted weight: what transformers and vLLM load as a plain model) and, in its ``lora_adapter/``
folder, the adapters alone as peft saves them (``adapter_config.json`` +
``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained(base, path)`` puts on the
base HF model and vLLM serves as a LoRA. The adapters' names are the converter's
(`converters.mapping.lora_rules`), with peft's ``base_model.model.`` prefix added here.
"""

from __future__ import annotations

import functools
import json
import os

import torch

ADAPTER_DIR = "lora_adapter"
PEFT_PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_meta(lora) -> dict:
    """What a converter checkpoint records of its LoRA (`mcore_rl.json`'s ``lora``)."""
    return {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}


@functools.lru_cache(maxsize=8)
def base_fingerprint(hf_dir: str) -> str:
    """A digest of the HF model in `hf_dir` that a LoRA checkpoint records of its frozen base, so that
    adapters are never put on another model: its config.json, and of each safetensors file the name,
    size, header and 16 samples of 64 KiB spread over its data. Reads about 1 MiB a file, once per
    process and path (a run's base does not change under it: every checkpoint reuses the digest); a
    copy of the model elsewhere has the same digest."""
    import glob
    import hashlib

    h = hashlib.sha256()
    with open(os.path.join(hf_dir, "config.json"), "rb") as f:
        h.update(f.read())
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            head = int.from_bytes(f.read(8), "little")
            h.update(f.read(head))
            data = size - 8 - head
            for i in range(16):
                f.seek(8 + head + data * i // 16)
                h.update(f.read(min(1 << 16, data)))
    return h.hexdigest()[:32]


def check_base(meta_lora: dict, hf_dir: str, what: str) -> None:
    """Refuse to put a checkpoint's adapters (its `mcore_rl.json` ``lora``) on a base they were not
    trained on: `hf_dir` must have the fingerprint recorded at save."""
    want = meta_lora.get("base_fingerprint")
    if want is None or (got := base_fingerprint(hf_dir)) == want:
        return
    raise ValueError(f"{what}: its LoRA adapters were trained on the base model {meta_lora.get('base_model')} "
                     f"(fingerprint {want}), but {hf_dir} is another model (fingerprint {got}); "
                     f"give the base model the adapters were trained on")


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``weight + scaling * b @ a`` in fp32 (one addmm: one fp32 temporary of the weight), in
    `weight`'s dtype. The live sync (on each TP shard) and the offline export both merge here."""
    return torch.addmm(weight.float(), b.float(), a.float(), alpha=scaling).to(weight.dtype)


def write_adapter(out: str, tensors: dict[str, torch.Tensor], meta: dict, base_model: str) -> None:
    """`tensors` (peft names without the prefix) and their config into folder `out` (created)."""
    from safetensors.torch import save_file

    os.makedirs(out)
    save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(out, WEIGHTS),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": meta["rank"], "lora_alpha": meta["alpha"],
              "target_modules": sorted(meta["targets"]), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "base_model_name_or_path": base_model}
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
