"""extensions/decode_attention.py — 第十节 KV Cache: one decode step's attention as a split-KV Triton kernel.

At batch 1 a decode step's attention reads one query token against the static KV cache (fast_decode.py): a few MB a
layer, which the GPU reads in about a microsecond. transformers' sdpa path runs it as PyTorch's SDPA (cuDNN's kernel
on an H100, tiled for long queries) after a kernel that turns the boolean mask into the additive bias SDPA takes,
once a layer. Here each program takes one query head over one range of cache slots (its running max, sum of
exponentials and weighted sum of values: the online softmax), and a second kernel joins the ranges of each head (or,
in a compiled step with JOIN_IN_GRAPH, the same sums written in torch, which inductor compiles with the kernels around
them); the mask is read as transformers builds it (boolean, once a step; MASK_ONCE keeps a compiled step from writing
it again for each layer); on Hopper both kernels are programmatic dependent launches (PDL). Those three are on,
together with kernel_4bit.INDUCTOR_OPTIONS' one-pass norms: measured so as one change, faster end to end
(benchmarks/README.md). Grouped-query attention reads a key/value head for each group of query heads. Prefill (more
than one query token) stays transformers' sdpa path.

  python extensions/fast_decode.py --model random:llama-2-7b --backend hf --attention triton    # one GPU

fast_decode.py's --attention triton registers it with transformers (AttentionInterface, and sdpa's mask builder
under the same name) and sets it on the model after the reference is taken, so the engine is checked against the
model's own attention like any other change. Measured: benchmarks/README.md.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_wait: programmatic dependent launch)

NAME = "ds_bnb_decode"              # the name it is registered under with transformers
SLOTS_PER_PROGRAM = 64              # cache slots a program of split_kv() takes (and reads in one step)


@triton.jit
def split_kv(q_ptr, k_ptr, v_ptr, keep_ptr, part_ptr, stat_ptr, L, scale, q_sb, q_sh, keep_sb, keep_sl,
             HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr, RANGES: tl.constexpr,
             MASKED: tl.constexpr, PDL: tl.constexpr = False):
    """One query head's attention over one range of SLOTS cache slots (grid: batch x heads, ranges): the range's
    unnormalised sum of values and its softmax statistics (max score, sum of exponentials) at [bh, r]. k and v:
    [B, HEADS // GROUP, L, D], contiguous; keep: nonzero where a slot is attended (MASKED), else every slot is."""
    if PDL:                                  # launched early: wait for the kernels before it (the cache's update),
        tl.extra.cuda.gdc_wait()             # then let the one after it launch early too
        tl.extra.cuda.gdc_launch_dependents()
    bh, r = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * q_sb + h * q_sh + d).to(tl.float32) * scale
    pos = r * SLOTS + tl.arange(0, SLOTS)
    ok = pos < L
    if MASKED:
        ok &= tl.load(keep_ptr + b * keep_sb + pos * keep_sl, mask=pos < L, other=0) != 0
    kv = (bh // GROUP) * L * D + pos[:, None] * D + d[None, :]       # (b, h // GROUP): the head's key/value head
    k = tl.load(k_ptr + kv, mask=(pos < L)[:, None], other=0.0).to(tl.float32)
    score = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))
    m = tl.max(score, 0)
    p = tl.exp(score - tl.where(m == float("-inf"), 0.0, m))        # a range with nothing attended: all 0
    v = tl.load(v_ptr + kv, mask=(pos < L)[:, None], other=0.0).to(tl.float32)
    tl.store(part_ptr + (bh * RANGES + r) * D + d, tl.sum(p[:, None] * v, 0))
    tl.store(stat_ptr + (bh * RANGES + r) * 2, m)
    tl.store(stat_ptr + (bh * RANGES + r) * 2 + 1, tl.sum(p, 0))


@triton.jit
def combine(part_ptr, stat_ptr, o_ptr, RANGES: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
            PDL: tl.constexpr = False):
    """One head's ranges joined, CHUNK ranges at a time: each range's sums rescaled to the largest max, the values'
    sum over the exponentials' (grid: batch x heads); the output [B, 1, HEADS, D] in the query's dtype."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    d = tl.arange(0, D)
    big = tl.full((), float("-inf"), tl.float32)
    for start in tl.static_range(0, RANGES, CHUNK):                  # the largest max over every range
        r = start + tl.arange(0, CHUNK)
        big = tl.maximum(big, tl.max(tl.load(stat_ptr + (bh * RANGES + r) * 2, mask=r < RANGES,
                                             other=float("-inf")), 0))
    acc = tl.zeros((D,), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in tl.static_range(0, RANGES, CHUNK):
        r = start + tl.arange(0, CHUNK)
        m = tl.load(stat_ptr + (bh * RANGES + r) * 2, mask=r < RANGES, other=float("-inf"))
        s = tl.load(stat_ptr + (bh * RANGES + r) * 2 + 1, mask=r < RANGES, other=0.0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big))        # a range with nothing attended weighs 0
        part = tl.load(part_ptr + (bh * RANGES + r)[:, None] * D + d[None, :], mask=(r < RANGES)[:, None], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
        total += tl.sum(s * w, 0)
    tl.store(o_ptr + bh * D + d, (acc / total).to(o_ptr.dtype.element_ty))


# Both kernels launched as programmatic dependent launches on Hopper and later (PDL: True; each starts while the
# kernel before it ends and waits in gdc_wait() before its first read, as kernel_4bit.py's matvec, and past that wait
# lets the kernel after it launch early too) or plainly (False). On: part of the one change measured faster end to end
# (the module docstring); alone it shortened the profiled step a little (benchmarks/profile_decode.py).
PDL = True


@functools.cache
def launch(device) -> dict:
    """The kernels' launch options on `device`: PDL's where it is on and the GPU has it (sm_90 and later)."""
    if PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return {"PDL": True, "launch_pdl": True}
    return {}


def split(q, k, v, keep, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """split_kv() over every range of the cache: (part [B * H, ranges, D], stat [B * H, ranges, 2]), fp32."""
    B, H, _, D = q.shape
    KV, L = k.shape[1], k.shape[2]
    ranges = triton.cdiv(L, SLOTS_PER_PROGRAM)
    part = torch.empty(B * H, ranges, D, device=q.device, dtype=torch.float32)
    stat = torch.empty(B * H, ranges, 2, device=q.device, dtype=torch.float32)
    keep_ = keep if keep is not None else q
    # (a mask of one batch row is every row's)
    keep_strides = (keep.stride(0) if keep.shape[0] > 1 else 0, keep.stride(3)) if keep is not None else (0, 0)
    split_kv[(B * H, ranges)](q, k, v, keep_, part, stat, L, scale, q.stride(0), q.stride(1), *keep_strides,
                              HEADS=H, GROUP=H // KV, D=D, SLOTS=SLOTS_PER_PROGRAM, RANGES=ranges,
                              MASKED=keep is not None, **launch(q.device))
    return part, stat


@torch.library.custom_op("ds_bnb_infer::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, over the kept slots) v for one query token: q [B, H, 1, D] (any strides), k and v
    [B, KV, L, D] contiguous (H a multiple of KV), keep [B, 1, 1, L] boolean or None (every slot) -> [B, 1, H, D],
    contiguous: the layout transformers' attention functions return. A custom op: torch.compile keeps it whole in
    the compiled step (the cache's update before it, in order), and a CUDA graph captures its two launches."""
    B, H, _, D = q.shape
    part, stat = split(q, k, v, keep, scale)
    out = torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    ranges = part.shape[1]
    combine[(B * H,)](part, stat, out, RANGES=ranges, CHUNK=min(32, triton.next_power_of_2(ranges)), D=D,
                      **launch(q.device))
    return out


@decode_attention.register_fake
def _(q, k, v, keep, scale):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


@torch.library.custom_op("ds_bnb_infer::decode_attention_ranges", mutates_args=())
def decode_attention_ranges(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_attention()'s first kernel alone (split()): each range's sums and statistics, for join() in torch."""
    return split(q, k, v, keep, scale)


@decode_attention_ranges.register_fake
def _(q, k, v, keep, scale):
    ranges = triton.cdiv(k.shape[2], SLOTS_PER_PROGRAM)
    return (q.new_empty(q.shape[0] * q.shape[1], ranges, q.shape[3], dtype=torch.float32),
            q.new_empty(q.shape[0] * q.shape[1], ranges, 2, dtype=torch.float32))


def join(part, stat, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """combine() in torch: the ranges' sums rescaled to the largest max and divided by the exponentials' sum ->
    [B, 1, H, D] in `dtype`. Written for a compiled step, where inductor compiles it with the kernels around it (the
    division goes into o_proj's layout of x, kernel_4bit.py; benchmarks/profile_decode.py shows the rest)."""
    m, s = stat.unbind(-1)
    big = m.amax(1, keepdim=True)
    w = torch.where(m == float("-inf"), 0.0, torch.exp(m - big))          # a range with nothing attended weighs 0
    out = (part * w[..., None]).sum(1) / (s * w).sum(1)[:, None]
    return out.view(batch, 1, -1, part.shape[-1]).to(dtype)


# A compiled step joins the ranges in torch (JOIN_IN_GRAPH: True; join()) or with combine() (False). Both give the
# same values within fp32 rounding (tests/test_decode_attention.py); outside a compiled step combine() always does.
# On as part of the one change measured (the module docstring), though inductor folded only the division into
# o_proj's layout and made the largest max and the weights kernels of their own: launches a layer more, not one
# fewer (profile_decode.py). Whether the step is faster without it is the next measurement (benchmarks/README.md).
JOIN_IN_GRAPH = True


# A compiled step reads the mask that transformers built once for the step (MASK_ONCE: True), or the mask computed
# again for each layer (False). The mask is a pointwise result of one input (the cache positions), which inductor
# recomputes wherever it is read rather than keep: as each layer's kernel takes it, that is a kernel a layer writing
# the same mask (profile_decode.py on a GPU: one of ~1 us a layer). With MASK_ONCE it goes through keep_once(), an
# op inductor keeps whole, so one result is what every layer reads. The same values either way; on as part of the
# one change measured (the module docstring).
MASK_ONCE = True


@torch.library.custom_op("ds_bnb_infer::keep_once", mutates_args=())
def keep_once(keep: torch.Tensor) -> torch.Tensor:
    """The mask, copied: a custom op, which a compiled step computes once however many layers read its result."""
    return keep.clone()


@keep_once.register_fake
def _(keep):
    return torch.empty_like(keep)


def step_mask(*args, **kwargs):
    """transformers' sdpa mask (sdpa_mask, as its sdpa path builds it), through keep_once() in a compiled step when
    MASK_ONCE."""
    from transformers.masking_utils import sdpa_mask
    mask = sdpa_mask(*args, **kwargs)
    return keep_once(mask) if MASK_ONCE and isinstance(mask, torch.Tensor) and torch.compiler.is_compiling() else mask


@torch.compiler.assume_constant_result
def interpreted() -> bool:
    """Does Triton run kernels in its interpreter (its own setting; a constant to torch.compile's tracing)?"""
    return triton.knobs.runtime.interpret


def fits(query, key, value, mask) -> bool:
    """Can decode_attention() take this call: one query token on a GPU (or on a CPU under Triton's interpreter, the
    tests), a contiguous cache, a power-of-two head size, a boolean mask of one row a batch row (or none)?"""
    d = query.shape[-1]
    on_device = query.is_cuda or interpreted()
    return (query.shape[2] == 1 and on_device and key.is_contiguous() and value.is_contiguous()
            and d == triton.next_power_of_2(d) and query.shape[1] % key.shape[1] == 0
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, query.shape[0])
                                  and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == key.shape[2])))


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention function signature: decode_attention() for a decode step that fits(), transformers'
    sdpa_attention_forward otherwise (prefill, and anything else)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if dropout == 0.0 and not kwargs.get("output_attentions") and fits(query, key, value, attention_mask):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if JOIN_IN_GRAPH and torch.compiler.is_compiling():
            part, stat = decode_attention_ranges(query, key, value, attention_mask, scale)
            return join(part, stat, query.shape[0], query.dtype), None
        return decode_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@functools.cache
def register() -> str:
    """Register attention_forward with transformers under NAME, with the mask that its sdpa path builds; the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, step_mask)
    return NAME


def use(model) -> str | None:
    """Set the model's attention to this file's; None, or why it cannot (a model off transformers' sdpa path, or
    whose head size is not a power of two: fits() would send every step back to sdpa)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return "it replaces transformers' sdpa attention, which this model does not use"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != triton.next_power_of_2(head_dim):
        return f"its kernel takes heads of a power-of-two size, and this model's are {head_dim}"
    config._attn_implementation = register()
    return None
