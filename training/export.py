"""Export a consolidated Hugging Face model folder (config.json, model.safetensors, tokenizer).

ZeRO-3 partitions are gathered with DeepSpeed's consolidated state dict; ZeRO 0-2 keep full
weights on every rank. The export is written to a temp folder and renamed into place, and a
model with non-finite weights is never exported.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lmpipe.chat_template import CHAT_TEMPLATE
from lmpipe.errors import LmpipeError


def export(engine, run: Path, data, resolved: dict, rank: int, dist, step: int) -> Path | None:
    import torch

    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank calls it
    else:
        state = engine.module.state_dict() if rank == 0 else None
    out = run / "export"
    if rank == 0:
        if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
            raise LmpipeError(f"the model has non-finite weights at step {step}: not exporting it")
        write(state, out, data, resolved, step)
    dist.barrier()
    return out if rank == 0 else None


def write(state: dict, out: Path, data, resolved: dict, step: int) -> None:
    from transformers import PreTrainedTokenizerFast

    from lmpipe import config as cfglib
    from training import recipes

    man = data.manifest
    mcfg = cfglib.build(recipes.ModelConfig, resolved["model"])
    model = recipes.build_model(mcfg, man["tokenizer"]["vocab_size"], man["tokenizer"]["eos_id"])
    state = {k: v.detach().to("cpu", dtype=next(iter(model.parameters())).dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if mcfg.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise LmpipeError(f"export: state dict does not fit the model (missing {missing}, unexpected {unexpected})")
    model.config.use_cache = True  # training turns the KV cache off; inference wants it
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok_path = tmp / "tokenizer.json"
    tok_path.write_bytes(data.store.get_bytes(man["tokenizer"]["path"]))
    eos = _eos_token(man, tok_path)
    PreTrainedTokenizerFast(tokenizer_file=str(tok_path), eos_token=eos, bos_token=eos, pad_token=eos,
                            model_max_length=mcfg.max_position_embeddings,
                            chat_template=CHAT_TEMPLATE).save_pretrained(tmp)
    # save_pretrained re-serializes tokenizer.json; keep the original bytes, so its sha256 is the
    # one in the shard manifest (evaluation compares tokenizers by it)
    tok_path.write_bytes(data.store.get_bytes(man["tokenizer"]["path"]))
    (tmp / "lmpipe.json").write_text(json.dumps({
        "step": step, "shards": data.store.uri, "tokenizer_sha256": man["tokenizer"]["sha256"],
        "seq_len": man["seq_len"], "recipe": resolved["recipe"], "model": resolved["model"],
        "exported_at": time.time()}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _eos_token(man: dict, tok_path: Path) -> str:
    from tokenizers import Tokenizer

    token = Tokenizer.from_file(str(tok_path)).id_to_token(man["tokenizer"]["eos_id"])
    if token is None:
        raise LmpipeError("export: the manifest's eos_id is not in the tokenizer")
    return token
