"""The native batch-1 step (tradeoff_kernels/native_decode.c): build it, load it, call it, and its PyTorch reference.

Imports torch and the standard library only, never engine, voice or tui; nothing is compiled at import.

One call of `NativeDecoder.forward` runs T rows (a decode step, a speculative verify, a prompt chunk) through
every layer and the head: int4 layer weights, an int8 head, fp32 activations, the KV cache read and written in place. The C file
is compiled on first use with the machine's C compiler ($CC, else cc or gcc) into
$TRADEOFF_CACHE/native (else $XDG_CACHE_HOME/tradeoff/native, else ~/.cache/tradeoff/native), named by a hash
of the source, the compiler and its resolved flags, so a new compiler, CPU or source builds a new library.
The target is `-march=native` unless $TRADEOFF_NATIVE_MARCH names another (x86-64-v3 builds the AVX2 code
a Zen 3 runs, on any newer CPU). Without a compiler, or when the build or load fails, `available()` is False
and `why_unavailable()` says why.

Layouts (see the C file for more):
- `PackedQ4`: an int4 matrix [N, K], groups of 32 along K, w = d * q + m. qs uint8 [N, K/2] holds each group
  as 16 bytes in the GGUF Q4_1 order (byte j: element j in the low nibble, element j + 16 in the high one);
  d, m fp32 [N, K/32].
- `PackedQ8` (the head): an int8 matrix [N, K], groups of 32 along K, w = d * q with q in -127..127 (GGUF Q8_0's
  formula). qs int8 [N, K]; d fp32 [N, K/32]. `quantize_q8` of a Q8_0 tensor's dequantized values gives back
  its codes and scales exactly. The head's N rows are the vocabulary, or the subset a draft's head covers.
- KV cache: k, v fp32 [n_layers, 1, n_kv_heads, cache_len, head_dim] (a StaticKVCache's storage), contiguous.
- RoPE tables: cos, sin fp32 [max_pos, head_dim] in the rotate-half layout (pairs j, j + head_dim/2).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP = 32
MARCH_ENV = "TRADEOFF_NATIVE_MARCH"
SOURCE = Path(__file__).with_name("native_decode.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread")


class NativeUnavailable(RuntimeError):
    """The native library could not be built or loaded on this machine."""


# ---- packing ------------------------------------------------------------------------------------------


@dataclass
class PackedQ4:
    qs: Tensor  # uint8 [N, K/2]
    d: Tensor  # fp32 [N, K/32]
    m: Tensor  # fp32 [N, K/32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 2

    def unpack(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q uint8 [N, K] in 0..15, scale, lo): the codes it was packed from."""
        N, K = self.shape
        g = self.qs.view(N, K // GROUP, GROUP // 2)
        return torch.cat([g & 15, g >> 4], dim=-1).view(N, K), self.d, self.m

    def dequantize(self) -> Tensor:
        """The fp32 weight [N, K] it stands for."""
        q, d, m = self.unpack()
        N, K = self.shape
        return (q.view(N, K // GROUP, GROUP).float() * d[..., None] + m[..., None]).view(N, K)


def pack_q4(q: Tensor, scale: Tensor, lo: Tensor) -> PackedQ4:
    """Codes q [N, K] in 0..15 with scale, lo [N, K/32] (w = q * scale + lo, tradeoff_kernels.quantize_w4's output)."""
    N, K = q.shape
    if K % GROUP or scale.shape != (N, K // GROUP) or lo.shape != scale.shape:
        raise ValueError(f"q {tuple(q.shape)} needs K a multiple of {GROUP} and scale, lo of shape {(N, K // GROUP)}")
    g = q.to(torch.uint8).view(N, K // GROUP, GROUP)
    qs = g[..., : GROUP // 2] | (g[..., GROUP // 2 :] << 4)
    return PackedQ4(qs.reshape(N, K // 2).contiguous(), scale.float().contiguous(), lo.float().contiguous())


@dataclass
class PackedQ8:
    qs: Tensor  # int8 [N, K]
    d: Tensor  # fp32 [N, K/32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1]

    def dequantize(self) -> Tensor:
        """The fp32 weight [N, K] it stands for."""
        N, K = self.shape
        return (self.qs.view(N, K // GROUP, GROUP).float() * self.d[..., None]).view(N, K)


def quantize_q8(weight: Tensor) -> PackedQ8:
    """Symmetric int8 per group of 32 along K, chosen as GGUF Q8_0 chooses it: d = max|w| / 127, q = round(w / d).
    On the dequantized values of a Q8_0 tensor (w = d16 * q, d16 an fp16 scale, and |q| = 127 in every group that is
    not all zero) this is exact: max|w| / 127 is d16 again in fp32, and w / d16 is q."""
    N, K = weight.shape
    if K % GROUP:
        raise ValueError(f"weight {tuple(weight.shape)}: K must be a multiple of {GROUP}")
    w = weight.detach().to("cpu", torch.float32).reshape(N, K // GROUP, GROUP)
    d = w.abs().amax(dim=-1) / 127
    # ties round to even (Q8_0 rounds them away from zero): only exact halves differ, and a Q8_0 tensor has none
    q = torch.where(d[..., None] > 0, torch.round(w / d[..., None]), 0.0)  # an all-zero group: d = 0, codes 0
    return PackedQ8(q.to(torch.int8).view(N, K).contiguous(), d.contiguous())


# ---- the weights of one model -------------------------------------------------------------------------


@dataclass
class NativeLayer:
    attn_norm: Tensor  # [dim]
    qkv: PackedQ4  # [(n_heads + 2 n_kv_heads) head_dim, dim]: q heads, k heads, v heads (HF rotate-half rows)
    qkv_bias: Tensor | None  # [(n_heads + 2 n_kv_heads) head_dim] (Qwen2), else None
    o: PackedQ4  # [dim, n_heads head_dim]
    ffn_norm: Tensor  # [dim]
    gate_up: PackedQ4  # [2 ffn_dim, dim]: gate rows, then up rows
    down: PackedQ4  # [dim, ffn_dim]


@dataclass
class NativeWeights:
    layers: list[NativeLayer]
    norm: Tensor  # [dim], the final norm
    rope_cos: Tensor  # [max_pos, head_dim]
    rope_sin: Tensor
    head: PackedQ8  # [vocab, dim], or [N, dim] for a draft whose head covers N tokens
    n_heads: int
    n_kv_heads: int
    eps: float

    @property
    def dim(self) -> int:
        return self.norm.shape[0]

    @property
    def head_dim(self) -> int:
        return self.rope_cos.shape[1]

    @property
    def ffn_dim(self) -> int:
        return self.layers[0].down.shape[1]

    @property
    def vocab(self) -> int:
        return self.head.shape[0]


def reference_forward(w: NativeWeights, x: Tensor, start: int, k_cache: Tensor, v_cache: Tensor, n_logit_rows: int) -> Tensor:
    """The step in plain PyTorch, from its definition: x [T, dim] fp32 embeddings at positions start..start + T - 1
    -> logits [n_logit_rows, vocab] (the head's rows) of the last rows; writes the rows' k/v into the caches."""
    T, D, H, KV = x.shape[0], w.head_dim, w.n_heads, w.n_kv_heads
    L, S = len(w.layers), k_cache.shape[-2]
    kc, vc = k_cache.view(L, KV, S, D), v_cache.view(L, KV, S, D)
    end = start + T
    cos, sin = w.rope_cos[start:end, None], w.rope_sin[start:end, None]  # [T, 1, D]

    def rope(t: Tensor) -> Tensor:  # out[j] = x[j] cos[j] - x[j + D/2] sin[j]; out[j + D/2] = x[j + D/2] cos[..] + x[j] sin[..]
        return t * cos + torch.cat([-t[..., D // 2 :], t[..., : D // 2]], dim=-1) * sin

    def norm(t: Tensor, weight: Tensor) -> Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + w.eps) * weight

    mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start)  # row t sees keys 0..start + t
    h = x.float()
    for i, layer in enumerate(w.layers):
        qkv = norm(h, layer.attn_norm) @ layer.qkv.dequantize().T
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
        q, k, v = rope(q.view(T, H, D)), rope(k.view(T, KV, D)), v.view(T, KV, D)
        kc[i, :, start:end], vc[i, :, start:end] = k.transpose(0, 1), v.transpose(0, 1)
        keys = kc[i, :, :end].repeat_interleave(H // KV, dim=0)  # [H, end, D]: query head j reads kv head j // (H / KV)
        values = vc[i, :, :end].repeat_interleave(H // KV, dim=0)
        scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) * D**-0.5  # [H, T, end]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        att = (probs @ values).transpose(0, 1).reshape(T, H * D)
        h = h + att @ layer.o.dequantize().T
        gate, up = (norm(h, layer.ffn_norm) @ layer.gate_up.dequantize().T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ layer.down.dequantize().T
    return norm(h[T - n_logit_rows :], w.norm) @ w.head.dequantize().T


# ---- building and loading the library ------------------------------------------------------------------


def cache_folder() -> Path:
    """Where built libraries live: the engine's cache folder rule, plus /native."""
    if env := os.environ.get("TRADEOFF_CACHE"):
        return Path(env) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tradeoff" / "native"


def default_march() -> str:
    return os.environ.get(MARCH_ENV) or "native"


def build(march: str | None = None) -> Path:
    """The shared library for `march` (default: `default_march()`), compiled unless already in the cache folder."""
    march = march or default_march()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler found (install gcc or set $CC)")
    flags = [*FLAGS, f"-march={march}"]
    try:
        # -### prints the compiler's version and the flags -march resolves to (the CPU's features for "native")
        probe = subprocess.run([cc, *flags, "-###", "-E", "-x", "c", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cc} did not run: {e}") from e
    if probe.returncode:
        raise NativeUnavailable(f"{cc} rejects {' '.join(flags)}: {last_line(probe.stderr)}")
    key = hashlib.sha256(SOURCE.read_bytes() + probe.stderr.encode()).hexdigest()[:16]
    folder = cache_folder()
    path = folder / f"native_decode-{re.sub(r'[^A-Za-z0-9_.-]', '_', march)}-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise NativeUnavailable(f"{cc} failed to build {SOURCE.name}: {last_line(done.stderr)}")
        os.replace(tmp, path)  # atomic: a concurrent process sees no library or a whole one
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"building {SOURCE.name} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class _Q4(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p), ("n", ctypes.c_int32),
                ("k", ctypes.c_int32)]


class _Q8(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("n", ctypes.c_int32), ("k", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p),
                ("qkv", _Q4), ("o", _Q4), ("gate_up", _Q4), ("down", _Q4)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab", "max_pos")]
    _fields_ += [("eps", ctypes.c_float), ("norm", ctypes.c_void_p), ("rope_cos", ctypes.c_void_p),
                 ("rope_sin", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer)), ("head", _Q8)]


_loaded: dict[str, ctypes.CDLL | NativeUnavailable] = {}


def library(march: str | None = None) -> ctypes.CDLL:
    """The loaded library for `march` (built on first use); raises NativeUnavailable."""
    march = march or default_march()
    if march not in _loaded:
        try:
            lib = ctypes.CDLL(str(build(march)))
            lib.tradeoff_forward.restype = ctypes.c_int
            lib.tradeoff_forward.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_int]
            lib.tradeoff_head.restype = ctypes.c_int
            lib.tradeoff_head.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
            _loaded[march] = lib
        except NativeUnavailable as e:
            _loaded[march] = e
        except OSError as e:
            _loaded[march] = NativeUnavailable(f"loading the built library failed: {e}")
    result = _loaded[march]
    if isinstance(result, NativeUnavailable):
        raise result
    return result


def available() -> bool:
    return not why_unavailable()


def why_unavailable() -> str:
    """One line saying why the native step cannot run here; empty when it can."""
    try:
        library()
    except NativeUnavailable as e:
        return str(e)
    return ""


# ---- the decoder ----------------------------------------------------------------------------------------


class NativeDecoder:
    """The C step over one model's weights: the ctypes description is built once and the tensors it points to are
    kept alive here, so a step is one foreign call (which releases the GIL)."""

    def __init__(self, weights: NativeWeights, n_threads: int | None = None, march: str | None = None):
        self.weights = weights
        self.n_threads = n_threads or torch.get_num_threads()
        lib = library(march)
        self._forward, self._head = lib.tradeoff_forward, lib.tradeoff_head
        w = weights
        D, H, KV, dim = w.head_dim, w.n_heads, w.n_kv_heads, w.dim
        if not w.layers:
            raise ValueError("a model needs at least one layer")
        if H % KV or D % 2:
            raise ValueError(f"{H} heads over {KV} kv heads with head_dim {D}: need H a multiple of KV and an even head_dim")
        self._keep: list[Tensor] = []

        def f32(t: Tensor, shape: tuple[int, ...]) -> int:
            if tuple(t.shape) != shape:
                raise ValueError(f"expected shape {shape}, got {tuple(t.shape)}")
            t = t.detach().to("cpu", torch.float32).contiguous()
            self._keep.append(t)
            return t.data_ptr()

        def q4(p: PackedQ4, shape: tuple[int, int]) -> _Q4:
            N, K = shape
            if p.shape != shape or K % GROUP:
                raise ValueError(f"int4 matrix {p.shape}: expected {shape}, with K a multiple of {GROUP}")
            qs = p.qs.detach().to("cpu", torch.uint8).contiguous()
            self._keep.append(qs)
            return _Q4(qs.data_ptr(), f32(p.d, (N, K // GROUP)), f32(p.m, (N, K // GROUP)), N, K)

        def q8(p: PackedQ8, shape: tuple[int, int]) -> _Q8:
            N, K = shape
            if p.shape != shape or K % GROUP or p.qs.dtype != torch.int8:
                raise ValueError(f"int8 matrix {p.shape} ({p.qs.dtype}): expected {shape} int8, with K a multiple of {GROUP}")
            qs = p.qs.detach().cpu().contiguous()
            self._keep.append(qs)
            return _Q8(qs.data_ptr(), f32(p.d, (N, K // GROUP)), N, K)

        qkv_n, ffn = (H + 2 * KV) * D, w.ffn_dim
        layers = (_Layer * len(w.layers))()
        for c, layer in zip(layers, w.layers):
            c.attn_norm, c.ffn_norm = f32(layer.attn_norm, (dim,)), f32(layer.ffn_norm, (dim,))
            c.qkv_bias = f32(layer.qkv_bias, (qkv_n,)) if layer.qkv_bias is not None else None
            c.qkv, c.o = q4(layer.qkv, (qkv_n, dim)), q4(layer.o, (dim, H * D))
            c.gate_up, c.down = q4(layer.gate_up, (2 * ffn, dim)), q4(layer.down, (dim, ffn))
        max_pos = w.rope_cos.shape[0]
        self._layers = layers
        self._model = _Model(n_layers=len(w.layers), dim=dim, n_heads=H, n_kv_heads=KV, head_dim=D, ffn_dim=ffn,
                             vocab=w.vocab, max_pos=max_pos, eps=w.eps, norm=f32(w.norm, (dim,)),
                             rope_cos=f32(w.rope_cos, (max_pos, D)), rope_sin=f32(w.rope_sin, (max_pos, D)),
                             layers=layers, head=q8(w.head, (w.vocab, dim)))
        self._model_ref = ctypes.byref(self._model)

    def forward(self, x: Tensor, start: int, k_cache: Tensor, v_cache: Tensor, n_logit_rows: int) -> Tensor:
        """Same contract as `reference_forward` (x [T, dim] fp32 contiguous; caches fp32, contiguous, on the CPU)."""
        w = self.weights
        T = x.shape[0]
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.shape != (T, w.dim):
            raise ValueError(f"x must be a contiguous fp32 CPU tensor [T, {w.dim}], got {x.dtype} {tuple(x.shape)}")
        S = k_cache.shape[-2]
        shape = (len(w.layers), 1, w.n_kv_heads, S, w.head_dim)
        for c in (k_cache, v_cache):
            if c.dtype != torch.float32 or c.device.type != "cpu" or not c.is_contiguous() or c.shape != shape:
                raise ValueError(f"caches must be contiguous fp32 CPU tensors {shape}, got {c.dtype} {tuple(c.shape)}")
        if not (0 <= n_logit_rows <= T and 0 <= start and start + T <= min(S, w.rope_cos.shape[0])):
            raise ValueError(f"rows {start}..{start + T} (logits of {n_logit_rows}) do not fit the cache ({S}) or rope tables")
        logits = torch.empty(n_logit_rows, w.vocab)
        rc = self._forward(self._model_ref, x.data_ptr(), T, start, k_cache.data_ptr(), v_cache.data_ptr(), S,
                           logits.data_ptr(), n_logit_rows, self.n_threads)
        if rc:
            raise RuntimeError(f"native step failed (code {rc})")
        return logits

    def head(self, x: Tensor) -> Tensor:
        """The int8 head's fp32 logits [T, vocab] of final-normed rows x [T, dim] (fp32, contiguous, on the CPU)."""
        w = self.weights
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.dim() != 2 or x.shape[1] != w.dim:
            raise ValueError(f"x must be a contiguous fp32 CPU tensor [T, {w.dim}], got {x.dtype} {tuple(x.shape)}")
        logits = torch.empty(x.shape[0], w.vocab)
        if x.shape[0] and (rc := self._head(self._model_ref, x.data_ptr(), x.shape[0], logits.data_ptr(), self.n_threads)):
            raise RuntimeError(f"native head failed (code {rc})")
        return logits
