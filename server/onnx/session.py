"""An ONNX Runtime session over an exported decoder graph (see `server.onnx.graph`).

Holds the session and the graph's shapes; `step` runs one call with numpy inputs and
returns the last-token logits and the present KV arrays. No scheduling here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def pick_providers(name: str = "auto") -> list[str]:
    """CUDA where onnxruntime-gpu provides it (and it was asked for or `auto`), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ValueError("onnx provider cuda is not available (install onnxruntime-gpu); "
                             f"available: {', '.join(available)}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if name != "auto":
        raise ValueError(f"onnx provider {name!r} is not one of auto, cpu, cuda")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxDecoderSession:
    def __init__(self, path: Path | str, *, threads: int = 0, provider: str = "auto") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.providers = pick_providers(provider)
        self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers)
        inputs = self.session.get_inputs()
        self.past_names = [i.name for i in inputs[3:]]
        self.num_layers = len(self.past_names) // 2
        _, self.num_kv_heads, _, self.head_dim = inputs[3].shape
        self.vocab_size = int(self.session.get_outputs()[0].shape[1])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.nbytes = sum(f.stat().st_size for f in self.path.parent.iterdir() if f.is_file())

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids, position_ids [B, S]; attention_mask [B, P + S]; past 2L x [B, KV, P, D]
        -> logits [B, V], presents 2L x [B, KV, P + S, D]."""
        feed = {"input_ids": input_ids, "position_ids": position_ids,
                "attention_mask": attention_mask}
        feed.update(zip(self.past_names, past, strict=True))
        out = self.session.run(self.output_names, feed)
        return out[0], out[1:]

    def greedy(self, prompt: list[int], n: int,
               forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
        """n greedy tokens (no EOS stop) and the logits [n, V] that chose them. With
        `forced`, those tokens are fed instead of the chosen ones (teacher forcing), so
        every step sees the reference context."""
        past = self.empty_past()
        ids = np.array([prompt], np.int64)
        pos = np.arange(len(prompt), dtype=np.int64)[None]
        tokens, logits = [], []
        for i in range(n):
            mask = np.ones((1, past[0].shape[2] + ids.shape[1]), np.int64)
            row, past = self.step(ids, pos, mask, past)
            logits.append(row[0])
            tokens.append(int(row[0].argmax()))
            ids = np.array([[tokens[-1] if forced is None else forced[i]]], np.int64)
            pos = np.array([[pos[0, -1] + 1]], np.int64)
        return tokens, np.stack(logits)
