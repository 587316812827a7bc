"""The decoder layers of a CPU serving forward in one native call (``kernels/csrc/forward.c``).

Why: with the native attention, RMSNorm and RoPE, a CPU forward of the small models was still
mostly dispatch. An AR step of the fixture (fp32, one thread) took 4.3 ms, of which its 25 matrix
products were about 1.1 ms: the rest was two dozen tensor operations a layer, each a few
microseconds of Python and ATen dispatch. The native forward runs every layer in C with the same
RMSNorm, RoPE and attention kernels. Its products are models.matmul's BLAS backends called from C,
padded and split as that module's probes decided for them, so a row's product depends on the row
alone: fp32 through triserve's own AVX-512 kernel (``fma32``) on the Python fast path's own packed
weights where the CPU has AVX-512, else through ``sgemm`` (what ``torch.mm`` runs) on its transposed
weights, bit for bit its products either way; bf16 through triserve's own kernels on the Python fast path's
own packed weights, AMX tiles (``amx``) where the CPU has them, AVX512-BF16 dot products
(``dpbf16``) where it has those, else through MKL's bf16 GEMM (``mkl_bf16``), not the oneDNN product
the Python layers then use (it has no C entry point), so that such a bf16 model's logits differ from
the Python layers' by bf16 roundings. SiLU uses its own exponential (float
rounding of ``F.silu``). Past the last layer's attention only the rows the step reads (its logit and
deferred rows) go on through the output product and the MLP: the others' keys and values have served
the attention and their outputs would be dropped (a draft reads the rows its verify will check, a
prefill chunk its last row). The final norm runs in the same call on those rows; embedding and the
head stay in Python.

Drafts in int8: with ``TriModeModel.int8_drafts`` on, the rows of speculative drafts (the adapter
rows) take every product of theirs, q/k/v and the head included, in int8 (``matmul.Int8``, AVX512-VNNI; of the
adapter-merged weight where adapted), where the CPU has the instructions and the kernel takes the
model's shapes (``drafts_in_int8``). A draft only proposes tokens; the verify rows, AR steps,
prefills and diffusion passes keep the model's products, so what a request emits does not change
(temperature 0: the AR tokens; above: the AR distribution, rejection sampling taking the drafts'
own probabilities), only how many drafted tokens are accepted. On a Zen 4 EPYC (bf16 products at
VDPBF16PS's peak) an int8 product is 1.6-1.8x cheaper at 8-32 rows (bench/RESULTS.md).

Which forwards: all of a model's serving forwards or none of them, decided from the model alone
(never the batch), so a row is computed the same way in every forward, which is what keeps
self-speculation exact. It serves when the fast path is on and the model is on the CPU, in fp32, or
in bf16 on a CPU that computes bf16 in hardware, its products all probe invariant on their BLAS
backend, it is not tensor-parallel, its heads suit the native attention and its RMSNorm width is
one whose native kernel gives the reference's bits; elsewhere the Python layers serve.
"""

from __future__ import annotations

import ctypes

import torch

import kernels
from kernels import cpu_attention, native
from kernels.rmsnorm import native_is_reference
from models import matmul
from models.batch import StepBatch
from models.kv_cache import PagedKVCache
from models.layers import identity

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _Product(ctypes.Structure):
    _fields_ = [("weight", _ptr), *((name, _i64) for name in ("n", "k", "min_rows", "max_rows", "kernel"))]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr)] + [
        (name, _Product)
        for name in ("qkv", "o", "gate_up", "down", "qkv_draft", "o_draft", "gate_up_draft", "down_draft")
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, _i64) for name in ("layers", "hidden", "hq", "hkv", "d", "intermediate")),
        ("eps", _f32), ("scale", _f32), ("dtype", ctypes.c_int), ("sgemm", _ptr), ("gemm_bf16", _ptr),
        ("threads", _i64), ("layer", ctypes.POINTER(_Layer)), ("final_norm", _ptr),
    ]  # fmt: skip


class _Step(ctypes.Structure):
    _fields_ = [
        ("x", _ptr), ("rows", _i64), ("cos", _ptr), ("sin", _ptr), ("qscale", _ptr),
        ("writes", _i64), ("write_rows", _ptr), ("write_slots", _ptr),
        ("segments", _i64), ("segment_table", _ptr), ("prefix_slots", _ptr), ("slot_stride", _i64),
        ("drafts", _i64), ("draft_rows", _ptr), ("k_cache", _ptr), ("v_cache", _ptr), ("cache_slots", _i64),
        ("reads", _i64), ("kept", _i64), ("read_rows", _ptr), ("kept_rows", _ptr), ("read_out", _ptr),
        ("kept_out", _ptr),
    ]  # fmt: skip


# the products each dtype's layers take (models.matmul's backends, preferred first), and the BLAS
# function C calls for the dtype where triserve's own kernels do not serve
BACKENDS = {torch.float32: ("fma32", "blas"), torch.bfloat16: ("amx", "dpbf16", "mkl_bf16")}
KERNELS = {"amx": 1, "dpbf16": 2, "fma32": 4}  # csrc/forward.c's codes of the packed kernels (0: BLAS)
INT8_KERNEL = 3  # csrc/forward.c's code of the int8 draft product
GEMM = {torch.float32: "sgemm_", torch.bfloat16: "cblas_gemm_bf16bf16f32"}


def _product(prepared: matmul.Prepared | None) -> _Product:
    """What C reads of a prepared product: BLAS's transposed fp32 copy [k, n], a packed kernel's packed
    weight, or MKL's bf16 weight [n, k]."""
    if prepared is None:
        return _Product()
    kernel = KERNELS.get(prepared.backend, 0)
    weight = "transposed" if prepared.backend == "blas" else "packed" if kernel else "weight"
    n, k = prepared.weight.shape  # the fused weight, whatever copy the backend multiplies
    return _Product(getattr(prepared.product, weight).data_ptr(), n, k, prepared.min_rows, prepared.max_rows, kernel)


class NativeDecoder:
    """One model's layers as the C forward reads them: the prepared weights' addresses and shapes,
    with the Prepared entries they belong to kept alive. Built by :func:`decoder_for`."""

    def __init__(self, model) -> None:
        config, layers = model.config, model.encoder.layers
        self.int8: list[matmul.Int8] = []  # the int8 draft products' packed weights, kept alive
        self.int8_drafts = model.int8_drafts and _int8_fits(model)
        head = model.diffusion_head.weight
        # with int8 drafts, a draft row's logits too (models/model.py's _logits)
        self.draft_head = matmul.Int8(head) if self.int8_drafts and native.int8_fits(*head.shape) else None
        self.dtype = model.dtype
        attn = layers[0].self_attn
        self.prepared: list[matmul.Prepared | None] = []
        structs = []
        for layer in layers:
            mlp, a = layer.mlp, layer.self_attn
            base = _base_weights(layer)
            gate_up = base[2]
            gate_up_loras = (mlp.lora.get("gate_proj"), mlp.lora.get("up_proj"))
            down_lora = mlp.lora.get("down_proj")
            merged = [
                None,
                None if a.lora is None else (a.lora.merged(a.o_proj.weight),),
                None if not any(gate_up_loras) else tuple(w if lo is None else lo.merged(w)
                                                          for w, lo in zip(gate_up, gate_up_loras)),
                None if down_lora is None else (down_lora.merged(mlp.down_proj.weight),),
            ]  # fmt: skip
            prepared = [self._prepare(w) for w in base]
            self.prepared += prepared
            if self.int8_drafts:  # every product of a draft row in int8, of the adapter-merged weight where adapted
                drafts = [self._int8(m if m is not None else b) for m, b in zip(merged, base)]
            else:
                adapted = [None if w is None else self._prepare(w) for w in merged]
                self.prepared += adapted
                drafts = [_product(p) for p in adapted]
            norms = (layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr())
            structs.append(_Layer(*norms, *(_product(p) for p in prepared), *drafts))
        self.layers = (_Layer * len(structs))(*structs)
        self.model = _Model(
            len(layers), config.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim, config.intermediate_size,
            config.rms_norm_eps, attn.scale, native.DTYPES[self.dtype], matmul.blas_function(GEMM[torch.float32]),
            matmul.blas_function(GEMM[torch.bfloat16]), torch.get_num_threads(), self.layers,
            model.encoder.norm.weight.data_ptr(),
        )  # fmt: skip

    def _prepare(self, weights: tuple[torch.Tensor, ...]) -> matmul.Prepared:
        # the Python fast path's own entry where its first choice has a C entry point (fp32: the fma32
        # kernel or BLAS; bf16: a packed kernel, where one takes the fused shape), so both share one
        # prepared copy; else MKL's bf16 GEMM
        if self.dtype == torch.float32 or matmul.packed_kernel(*_fused_shape(weights)):
            return matmul.prepared(weights)
        return matmul.prepared(weights, ("mkl_bf16",))

    def _int8(self, weights: tuple[torch.Tensor, ...]) -> _Product:
        product = matmul.Int8(matmul.fuse(weights))
        self.int8.append(product)
        return _Product(product.packed.data_ptr(), product.n, product.k, 1, matmul.PROBE_ROWS, INT8_KERNEL)

    @property
    def products_serve(self) -> bool:
        """Whether every product took one of its dtype's backends (the probes found it invariant)."""
        return all(p is None or p.backend in BACKENDS[self.dtype] for p in self.prepared)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qscale: torch.Tensor | None,
                 batch: StepBatch, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Run every layer on ``x`` [T, hidden] (contiguous, the model's dtype; used as scratch), writing the
        step's keys/values; return the final norm of its logit rows and of its deferred rows (None without)."""
        meta = batch.attention
        segments, table = meta.derived("native", lambda: cpu_attention.segments_and_slots(meta))
        write_rows, write_slots = native.int64(batch.write_rows), native.int64(batch.write_slots)
        drafts = native.int64(batch.adapter_rows)
        reads = native.int64(batch.logit_rows)
        kept = None if batch.deferred_rows is None else native.int64(batch.deferred_rows)
        hidden = x.new_empty((reads.numel(), x.shape[1]))
        deferred = None if kept is None else x.new_empty((kept.numel(), x.shape[1]))
        step = _Step(
            x.data_ptr(), x.shape[0], cos.data_ptr(), sin.data_ptr(), None if qscale is None else qscale.data_ptr(),
            write_rows.numel(), write_rows.data_ptr(), write_slots.data_ptr(),
            len(meta.segments), segments.data_ptr(), table.data_ptr(), table.shape[1],
            drafts.numel(), drafts.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[1],
            reads.numel(), 0 if kept is None else kept.numel(), reads.data_ptr(),
            None if kept is None else kept.data_ptr(), hidden.data_ptr(),
            None if deferred is None else deferred.data_ptr(),
        )  # fmt: skip
        status = native.library().decoder_forward(ctypes.byref(self.model), ctypes.byref(step))
        if status != 0:
            raise RuntimeError(f"native forward failed with status {status}")
        return hidden, deferred


def _weights(model) -> tuple[torch.Tensor, ...]:
    """What a NativeDecoder is built from: every layer parameter, draft-adapter factor, the final norm and
    the head (its int8 copy serves drafts' logits)."""
    out: list[torch.Tensor] = [model.encoder.norm.weight, model.diffusion_head.weight]
    for layer in model.encoder.layers:
        out += layer.parameters()
        loras = [layer.self_attn.lora, *layer.mlp.lora.values()]
        out += [t for lora in loras if lora is not None for t in (lora.a, lora.b)]
    return tuple(out)


def _adapters(model) -> tuple:
    """The first layer's draft adapters: adapters are attached to (or removed from) every layer at once,
    so these objects change whenever the model's adapter does."""
    first = model.encoder.layers[0]
    return first.self_attn.lora, *first.mlp.lora.values()


def _supported(model) -> bool:
    """Whether a CPU model's shape and dtype let the native forward serve it (weights' backends aside)."""
    config, layers = model.config, model.encoder.layers
    attn = layers[0].self_attn
    return (
        model.dtype in BACKENDS
        and (model.dtype == torch.float32 or matmul.cpu_has_fast_half())
        and matmul.blas_function(GEMM[model.dtype]) is not None
        and kernels.backend(model.device) == "torch"
        and native.library() is not None
        and all(layer.self_attn.reduce is identity and layer.mlp.reduce is identity for layer in layers)
        and cpu_attention.takes_heads(attn.num_heads, attn.num_kv_heads, attn.head_dim)
        and attn.head_dim <= native.MAX_HEAD
        and native_is_reference(config.hidden_size, model.dtype, config.rms_norm_eps)
    )


def _base_weights(layer) -> list[tuple[torch.Tensor, ...]]:
    """A layer's products as the native forward runs them, each the weights it fuses: q/k/v, o, gate/up,
    down."""
    a, mlp = layer.self_attn, layer.mlp
    qkv = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
    return [qkv, (a.o_proj.weight,), (mlp.gate_proj.weight, mlp.up_proj.weight), (mlp.down_proj.weight,)]


def _int8_fits(model) -> bool:
    """Whether the int8 kernel runs here and takes every product of the model's layers (all layers have
    the first one's shapes)."""
    return all(native.int8_fits(*_fused_shape(ws)) for ws in _base_weights(model.encoder.layers[0]))


def _fused_shape(weights: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """[outputs, inputs] of weights that read the same input, fused."""
    return sum(w.shape[0] for w in weights), weights[0].shape[1]


def drafts_in_int8(model) -> bool:
    """Whether the model's speculative drafts take the int8 products now: ``model.int8_drafts`` is on, the
    native forward serves the model and the int8 kernel runs here and takes its shapes."""
    decoder = decoder_for(model)
    return decoder is not None and decoder.int8_drafts


def _key(model, weights: tuple[torch.Tensor, ...]) -> tuple:
    """What a kept NativeDecoder holds for: its weights unchanged, the thread count and the adapters."""
    return matmul.fingerprint(weights), torch.get_num_threads(), _adapters(model)


def decoder_for(model) -> NativeDecoder | None:
    """The model's NativeDecoder where the native forward serves it (None: the Python forward serves),
    kept on the model and rebuilt when a weight or adapter factor changed (as models.matmul keeps its
    prepared weights), an adapter was attached or removed or the thread count changed. One is kept per
    setting of ``model.int8_drafts``, so that switching it back and forth (bench/tpf.py compares both in
    one process) does not pack the int8 copies again each time. Checking that costs about 20 us a
    forward, so models off the CPU, which it never serves, skip it."""
    if model.device.type != "cpu":
        return None
    kept = model.__dict__.setdefault("_native_decoders", {})  # int8_drafts -> (weights, key, decoder)
    entry = kept.get(model.int8_drafts)
    if entry is not None:
        weights, key, decoder = entry
        if key == _key(model, weights):
            return decoder
    weights = _weights(model)
    decoder = NativeDecoder(model) if _supported(model) else None
    if decoder is not None and not decoder.products_serve:
        decoder = None
    key = _key(model, weights)
    for setting in [setting for setting, (_, other, _) in kept.items() if other != key]:
        del kept[setting]  # built before a weight, adapter or thread count changed: not kept alive
    kept[model.int8_drafts] = (weights, key, decoder)
    return decoder
