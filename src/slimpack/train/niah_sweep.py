"""The trainer's periodic needle sweep (`eval.niah_every_tokens`).

Every rank gathers the full weights (a collective); rank 0 loads them into a replica and runs a
smaller sweep than `slimpack eval niah` (eval.niah_samples prompts at each multiple of
eval.niah_length_step up to data.seq_len, eval.niah_protocol, the haystack from the held-out split),
writes RUN_DIR/eval/<niah dir>/step_NNNNNNNN.json (+ .png) as `slimpack eval niah` does for a
checkpoint, and returns a metrics record. Same samples, same haystack: on a checkpoint of the same
step, `slimpack eval niah --data <eval split> --samples N` gives the same report (tested).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from slimpack.eval.engines import slimpack_engine
from slimpack.eval.niah import (
    NiahConfig,
    build_samples,
    dataset_haystack,
    default_lengths,
    haystack_tokens,
    results_dir,
    run_niah,
    write_heatmap,
)
from slimpack.model.transformer import Transformer
from slimpack.storage import write_atomic
from slimpack.tokenize.tokenizer import Llama3Tokenizer
from slimpack.train.export import _strip_wrappers


def sweep_config(cfg: Any) -> NiahConfig:
    """The NIAH configuration a training config asks for."""
    niah = NiahConfig(lengths=(cfg.data.seq_len,), protocol=cfg.eval.niah_protocol, samples=cfg.eval.niah_samples)
    return dataclasses.replace(niah, lengths=default_lengths(cfg.data.seq_len, cfg.eval.niah_length_step,
                                                             protocol=niah.protocol))


class TrainingSweep:
    def __init__(self, cfg: Any, model_cfg: Any, device: Any, run_dir: Path, *, is_main: bool) -> None:
        self.cfg, self.model_cfg, self.device, self.is_main = cfg, model_cfg, device, is_main
        self.every = cfg.eval.niah_every_tokens
        self.niah = sweep_config(cfg)
        self.out = run_dir / "eval" / results_dir(self.niah.protocol, None)
        self._replica: Any = None
        if is_main:  # the haystack and the prompts' lengths are checked now, not after hours of training
            self._tok = Llama3Tokenizer()
            self._haystack = dataset_haystack(cfg.eval.path or cfg.data.path, self._tok.encoding.encode_ordinary,
                                              self._tok.decode, protocol=self.niah.protocol, split=cfg.eval.split,
                                              tokens=haystack_tokens(self.niah.lengths), cache_dir=cfg.data.cache_dir)
            for length in (min(self.niah.lengths), max(self.niah.lengths)):
                try:
                    build_samples(self._haystack, length, dataclasses.replace(self.niah, samples=1),
                                  self._tok.encoding.encode_ordinary, bos_id=self._tok.bos_id)
                except ValueError as err:
                    raise ValueError(f"eval.niah_every_tokens: {err} (raise eval.niah_length_step or "
                                     f"data.seq_len, or give eval.path a longer held-out split)") from None

    def due(self, tokens_before: int, tokens_after: int) -> bool:
        return self.every > 0 and tokens_after // self.every > tokens_before // self.every

    def run(self, model: Any, *, step: int, tokens: int) -> dict[str, Any] | None:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        if self._replica is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._replica = Transformer(self.model_cfg, attention_backend=self.cfg.model.attention_backend)
            self._replica.to(device=self.device, dtype=dtype).eval()
        self._replica.load_state_dict({_strip_wrappers(k): v for k, v in full.items()})
        tok = self._tok
        engine = slimpack_engine(self._replica, name=f"step {step}", train_length=self.cfg.data.seq_len,
                                 eos_ids=(tok.eos_id,))
        report = run_niah(engine.generate, tok.decode, tok.encoding.encode_ordinary, self._haystack, self.niah,
                          bos_id=tok.bos_id, eos_ids=(tok.eos_id,), model=f"step {step}")
        record = {**report.to_dict(), "step": step, "tokens": tokens}
        path = self.out / f"step_{step:08d}.json"
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
        write_heatmap(report, path.with_suffix(".png"))
        return {"kind": "niah", "step": step, "tokens": tokens, "niah_effective_length": report.effective_length,
                "niah_accuracy": {str(k): v for k, v in report.accuracy.items()},
                "niah_seconds": report.seconds,
                **{f"niah_acc_{k}": v for k, v in report.accuracy.items()}}
