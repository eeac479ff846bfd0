"""Reference kernels of the multi-tensor statistics ops (bounded memory, float64 merging).

This is also what every device without compiled kernels runs, so it must not copy whole tensors
and must not be slow:

- On the CPU, a contiguous float16/bfloat16/float32 tensor with p = 2 or inf is reduced as rows
  of ROW (32K) elements, up to BLOCK_ROWS rows per op. p = 2: the squares are formed in float32
  once per block, and two reductions over them give each row's largest square (max |x| is its
  square root, exactly) and their sum by torch's cascade summation (measured within 1e-7
  relative of the exactly rounded norm; the test states 2e-7); p = inf: amax and amin per row.
  Rows are merged in float64 (see ``merge_scaled``); a row holding NaN/Inf, or whose amax^p
  leaves float32's safe range, is redone exactly in float64. Small tensors are batched, one
  zero-padded row each. About 1.4-3.5x ``torch._foreach_norm``'s time, with the day's load
  (README, Measured).
- Everything else (float64, other p, non-contiguous layouts, other devices) is walked in pieces
  of at most ``CHUNK`` elements, each cast into one reused float64 buffer (cache-sized, allocated
  once per call: fresh allocations page-fault and cost more than the math) and merged like
  shards.
"""
from __future__ import annotations

import bisect
import math

import torch

# 32K float64 = 256 KB: the buffer stays in the core's cache across the few ops per piece, and
# torch runs an op this small inline (its parallel grain is 32K), without waking other threads
# (on a loaded machine a parallel region on a small piece costs milliseconds of waiting).
CHUNK = 1 << 15
# A piece takes the quick path (one dot or sum, one aminmax) when amax^p stays at least this far
# above the float64 underflow range; the terms that underflow then weigh < 2^-90 of the sum.
_MIN_LOG2_AMAX_P = -960.0
# The float32 row path (see _row_parts) of a contiguous float16/bfloat16/float32 tensor and
# p in {1, 2, inf}: rows of ROW elements, up to BLOCK_ROWS rows per op (8M elements: a float16
# block's float32 cast is 32 MB). A row whose log2(amax^p) lies in this range keeps every term
# and the sum of 2^15 terms inside float32's normal range; others are redone exactly.
ROW = 1 << 15
BLOCK_ROWS = 64
_F32_SAFE_LOG2 = (-90.0, 100.0)


def _pieces(t: torch.Tensor, limit: int):
    """Views of `t` of at most `limit` elements that cover every element exactly once."""
    if t.numel() <= limit:
        if t.numel():
            yield t
        return
    if not t.is_contiguous():
        order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
        permuted = t.permute(order)
        if permuted.is_contiguous():  # a dense layout in another dim order: walk memory order
            t = permuted
    if t.is_contiguous():
        flat = t.view(-1)
        for b in range(0, flat.numel(), limit):
            yield flat[b:b + limit]
        return
    d = max(range(t.dim()), key=lambda k: t.size(k))
    row = t.numel() // t.size(d)
    step = max(1, limit // row)
    for b in range(0, t.size(d), step):
        yield from _pieces(t.narrow(d, b, min(step, t.size(d) - b)), limit)


_OWNER_INDEX: dict = {}  # (device, owners) -> the index tensor on that device


def _owner_index(owner: list[int], device: torch.device) -> torch.Tensor:
    """Which tensor each partial result belongs to, as an index tensor on `device`. An
    accelerator's is built once per layout: torch.tensor(list, device=...) copies from the host
    (a sync, which no CUDA graph capture can hold), and a training loop calls with one layout."""
    if device.type == "cpu":
        return torch.tensor(owner, dtype=torch.int64)
    key = (device, tuple(owner))
    index = _OWNER_INDEX.get(key)
    if index is None:
        if len(_OWNER_INDEX) >= 16:
            _OWNER_INDEX.pop(next(iter(_OWNER_INDEX)))
        index = _OWNER_INDEX[key] = torch.tensor(owner, dtype=torch.int64, device=device)
    return index


def merge_scaled(acc: torch.Tensor, amax: torch.Tensor, index: torch.Tensor, n: int, p: float):
    """Merges normalized partial sums: row k holds acc[k] = sum (|x| / amax[k])^p of one part of
    tensor index[k]; returns (acc, amax) of shape [n] with the same meaning for the whole tensors.
    Rescaling by (amax[k] / amax)^p <= 1 never overflows; what underflows weighs below 2^-1000."""
    dev = acc.device
    out_max = torch.zeros(n, dtype=torch.float64, device=dev).scatter_reduce_(0, index, amax, "amax")
    if math.isinf(p):
        out_acc = (out_max > 0).to(torch.float64)
    else:
        denom = torch.where(out_max[index] > 0, out_max[index], 1.0)
        w = (amax / denom).pow(p) if p != 1.0 else amax / denom
        out_acc = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, index, acc * w)
    return out_acc, out_max


def _host_list(t: torch.Tensor) -> list[float]:
    # CPU memory read through numpy: no Tensor-to-Python conversion (numpy has no bfloat16).
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().tolist()


def _row_blocks(t: torch.Tensor):
    """Contiguous `t` as 2-D blocks of rows of ROW elements (the last row shorter)."""
    flat = t.reshape(-1)
    n = flat.numel()
    full = n - n % ROW
    blocks = [flat[b:min(b + BLOCK_ROWS * ROW, full)].view(-1, ROW) for b in range(0, full, BLOCK_ROWS * ROW)]
    if n > full:
        blocks.append(flat[full:].view(1, -1))
    return blocks


def _small_blocks(tensors):
    """Tensors of fewer than ROW elements, one zero-padded row each (padding changes neither the
    sum of |x|^p nor max |x|), as blocks of at most BLOCK_ROWS * ROW elements: one copy op per
    block instead of several ops per tensor. Made one at a time, as they are read."""
    batch, width = [], 0
    for t in tensors:
        w = max(width, t.numel())
        if batch and w * (len(batch) + 1) > BLOCK_ROWS * ROW:
            yield torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
            batch, w = [], t.numel()
        batch.append(t.reshape(-1))
        width = w
    if batch:
        yield torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)



def _row_parts(blocks, p: float, buf: torch.Tensor):
    """(acc, amax, nan, inf) per row of the 2-D `blocks`, as float64/int64 tensors. p = 2: two
    reductions per block over the squares (formed in float32: exact for float16/bfloat16), their
    max and their sum, each parallelized by torch over the rows: one read of the input. The sum
    is torch's cascade summation of <= 2^15 terms (within ~1e-7 relative, below one float32 ulp
    of the norm) merged in float64; max |x| is the square root of the largest square, taken in
    float64 and rounded to float32, which gives |x| exactly while x * x is a normal float32 (the
    rounding of x * x moves the root by less than half an ulp of x). p = inf: amax and amin
    (NaN propagates), not the inf-norm, which torch does not vectorize (~15x slower). The row
    checks run once over all rows; a row with NaN/Inf, or whose largest square leaves float32's
    safe range, is redone exactly in float64 (a row of zeros, or of squares that underflow, is
    told apart by one amax/amin of its block)."""
    # Every allocation is made up front: the squares go into one buffer of the largest block,
    # the per-row results into two tensors. A fresh square per block, freed after it, was not
    # reused by the allocator once small results were allocated between them: peak memory grew
    # with the tensor (511 MB more for a 256 MB float16 gradient; 17 MB now).
    rows = sum(block.shape[0] for block in blocks)
    top = torch.empty(rows, dtype=torch.float32)
    sums = torch.empty(rows if not math.isinf(p) else 0, dtype=torch.float32)
    sq_buf = torch.empty(0 if math.isinf(p) else max(block.numel() for block in blocks), dtype=torch.float32)
    first = 0  # of this block's rows in top/sums
    for block in blocks:
        rows_here = slice(first, first + block.shape[0])
        if math.isinf(p):
            torch.maximum(torch.amax(block, dim=1), torch.amin(block, dim=1).neg_(), out=top[rows_here])
        else:
            sq = sq_buf[:block.numel()].view(block.shape)
            if block.dtype == torch.float32:
                torch.mul(block, block, out=sq)
            else:
                sq.copy_(block).square_()
            torch.amax(sq, dim=1, out=top[rows_here])
            torch.sum(sq, dim=1, out=sums[rows_here])
        first += block.shape[0]
    lo, hi = 2.0 ** _F32_SAFE_LOG2[0], 2.0 ** _F32_SAFE_LOG2[1]  # float32's safe range of squares
    if math.isinf(p):
        m = top.double()
        ok = torch.isfinite(top)  # a row of zeros included
        acc = (m > 0).double()
    else:
        # float64 sqrt rounded to float32, not torch's float32 sqrt, which is not correctly
        # rounded on every CPU build (1 ulp off |x| for some x here).
        m = top.double().sqrt_().float().double()
        ok = (top >= lo) & (top <= hi)  # a NaN fails both
        acc = torch.where(ok, sums.double() / torch.where(ok, m * m, 1.0), 0.0)
    amax = torch.where(ok, m, 0.0)
    nan = torch.zeros(top.numel(), dtype=torch.int64)
    inf = torch.zeros(top.numel(), dtype=torch.int64)
    bad = _host_list(torch.nonzero(~ok).view(-1))
    if bad:
        # Row k of the concatenation is row k - start of its block.
        starts = [0]
        for block in blocks:
            starts.append(starts[-1] + block.shape[0])
        # numpy views share the tensors' memory: writing them fills the redone rows in place.
        acc_h, amax_h, nan_h, inf_h = acc.numpy(), amax.numpy(), nan.numpy(), inf.numpy()
        block_amax, tops_host = {}, top.numpy()  # block_amax: per-row max |x| of a block, exact
        for k in bad:
            b = bisect.bisect_right(starts, k) - 1
            block, j = blocks[b], k - starts[b]
            if not math.isinf(p) and b not in block_amax and tops_host[k] < lo:
                block_amax[b] = _host_list(torch.maximum(torch.amax(block, dim=1), torch.amin(block, dim=1).neg_()))
            if b in block_amax and block_amax[b][j] == 0.0:
                continue  # a row of zeros: acc 0, amax 0
            x = buf[:block.shape[1]]
            x.copy_(block[j])
            exact = _host_list(torch.stack([t.double() for t in _exact_piece(x, p)]))
            acc_h[k], amax_h[k], nan_h[k], inf_h[k] = exact[0], exact[1], int(exact[2]), int(exact[3])
    return acc, amax, nan, inf


def _exact_piece(x: torch.Tensor, p: float):
    """(acc normalized by amax, amax, NaN count, Inf count) of one float64 piece, any values."""
    fin = torch.isfinite(x)
    nan = torch.isnan(x).sum()
    inf = (~fin).sum() - nan
    a = torch.where(fin, x.abs(), 0.0)
    m = a.max()
    if math.isinf(p):
        acc = (m > 0).to(torch.float64)
    else:
        r = a / torch.where(m > 0, m, 1.0)
        acc = r.sum() if p == 1.0 else (r * r).sum() if p == 2.0 else r.pow(p).sum()
    return acc, m, nan, inf


def _cpu_pieces(pieces, buf: torch.Tensor, p: float):
    """Per piece (acc normalized by amax, amax, NaN count, Inf count) as Python numbers: on the
    CPU, reading a result is free. Quick path: one cast into the buffer, one aminmax (NaN for any
    NaN, inf for any inf), one norm or sum; a piece where that is not exact is redone exactly.
    Results land in a small CPU tensor read through a numpy view of the same memory: reading CPU
    memory is not a device sync, and no Tensor-to-Python conversion runs per piece."""
    acc, amax, nan, inf = [], [], [], []
    slots = buf.new_zeros(6)
    view = slots.numpy()
    lo, hi, res = slots[0], slots[1], slots[2]
    for piece in pieces:
        x = buf[:piece.numel()].view(piece.shape)
        x.copy_(piece)
        torch.aminmax(x, out=(lo, hi))
        m = max(-float(view[0]), float(view[1]))
        lm = p * math.log2(m) if 0.0 < m < math.inf else 0.0
        if math.isfinite(m) and _MIN_LOG2_AMAX_P <= lm <= 1000.0:
            if m == 0.0:
                a = 0.0
            elif math.isinf(p):
                a = 1.0
            elif p == 2.0:
                torch.linalg.vector_norm(x, out=res)
                a = (float(view[2]) / m) ** 2
            elif p == 1.0:
                res.copy_(x.abs_().sum())
                a = float(view[2]) / m
            else:
                res.copy_(x.abs_().div_(m).pow_(p).sum())
                a = float(view[2])
            acc.append(a)
            amax.append(m)
            nan.append(0)
            inf.append(0)
        else:  # a NaN/Inf element, or x^p outside float64's range: scale by amax first
            r = _exact_piece(x.reshape(-1), p)
            torch.stack([r[0], r[1], r[2].double(), r[3].double()], out=slots[2:6])
            acc.append(float(view[2]))
            amax.append(float(view[3]))
            nan.append(int(view[4]))
            inf.append(int(view[5]))
    return acc, amax, nan, inf


_pool = None


def _cpu_pieces_parallel(pieces, size: int, p: float):
    """_cpu_pieces over contiguous groups of pieces, one group (and one buffer) per intra-op
    thread: each op on a piece is too small for torch to parallelize, and torch releases the GIL
    while it runs, so Python threads use the cores. Results come back in piece order."""
    global _pool
    workers = max(1, min(torch.get_num_threads(), len(pieces) // 8))
    if workers == 1:
        return _cpu_pieces(pieces, torch.empty(size, dtype=torch.float64), p)
    if _pool is None or _pool._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gradguard-ref")
    cuts = [len(pieces) * k // workers for k in range(workers + 1)]
    futures = [_pool.submit(_cpu_pieces, pieces[cuts[k]:cuts[k + 1]], torch.empty(size, dtype=torch.float64), p)
               for k in range(workers)]
    out = ([], [], [], [])
    for f in futures:
        for lst, part in zip(out, f.result()):
            lst.extend(part)
    return out


_OP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def multi_tensor_stats(tensors: list[torch.Tensor], norm_type: float):
    """Per tensor: acc = sum over finite elements of (|x| / amax)^p (0 when amax is 0; for
    p = inf, 1 when amax > 0), NaN count, Inf count, and amax, the largest finite |x|. Returns
    four tensors of shape [n] on tensors[0]'s device: float64, int64, int64, float64.
    """
    if len(tensors) == 0:
        raise ValueError("gradguard.multi_tensor_stats: `tensors` must not be empty")
    p = float(norm_type)
    if not p > 0.0:
        raise ValueError(f"gradguard.multi_tensor_stats: `norm_type` must be > 0, got {norm_type}")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(f"gradguard.multi_tensor_stats: tensors[{i}] is on {t.device} but tensors[0] is on "
                               f"{device}; every tensor of one call must be on the same device")
        if t.dtype != tensors[0].dtype:
            raise RuntimeError(f"gradguard.multi_tensor_stats: tensors[{i}] has dtype {t.dtype} but tensors[0] has "
                               f"{tensors[0].dtype}; group tensors by dtype before calling the op")
        if t.layout != torch.strided:
            raise RuntimeError(f"gradguard.multi_tensor_stats: tensors[{i}] is not a strided (dense) tensor; "
                               "pass the values of a sparse tensor instead")
    if tensors[0].dtype not in _OP_DTYPES:
        # As the C++ kernels: a complex tensor read as real here lost its imaginary part (a NaN
        # there went unseen).
        raise NotImplementedError(f"gradguard.multi_tensor_stats: dtype {tensors[0].dtype} is not supported; the op "
                                  "takes float16, bfloat16, float32 and float64 tensors")
    n = len(tensors)
    f64 = dict(dtype=torch.float64, device=device)
    rows = None
    row_owner = []
    if device.type == "cpu" and tensors[0].dtype != torch.float64 and p in (2.0, math.inf):
        # Contiguous float16/bfloat16/float32 tensors take the row path (the small ones batched,
        # one padded row each); the rest the pieces. One _row_parts call over the large tensors'
        # blocks and one per block of small ones: the row checks run once per call, not once
        # per tensor.
        big = [i for i, t in enumerate(tensors) if t.is_contiguous() and t.numel() >= ROW]
        small = [i for i, t in enumerate(tensors) if t.is_contiguous() and 0 < t.numel() < ROW]
        blocks = []
        for i in big:
            for block in _row_blocks(tensors[i].detach()):  # views: no copy
                blocks.append(block)
                row_owner += [i] * block.shape[0]
        buf = torch.empty(ROW, dtype=torch.float64)
        parts = [_row_parts(blocks, p, buf)] if blocks else []
        if small:
            # One padded block (at most BLOCK_ROWS * ROW elements) at a time: all of them at once
            # were a copy of every small tensor (272 MB more for 256 MB of 1,000-element
            # gradients, where the compiled kernel takes 3 MB).
            parts += [_row_parts([block], p, buf) for block in _small_blocks([tensors[i].detach() for i in small])]
            row_owner += small
        if parts:
            rows = parts[0] if len(parts) == 1 else tuple(torch.cat(c) for c in zip(*parts))
        done = set(row_owner)
        todo = [(i, t) for i, t in enumerate(tensors) if i not in done]
    else:
        todo = list(enumerate(tensors))
    pieces, owner = [], []
    for i, t in todo:
        for piece in _pieces(t.detach(), CHUNK):
            pieces.append(piece)
            owner.append(i)
    owner = row_owner + owner
    size = min(CHUNK, max((q.numel() for q in pieces), default=0))
    if device.type == "cpu":
        acc, amax, nan, inf = _cpu_pieces_parallel(pieces, size, p) if pieces else ([], [], [], [])
        acc, amax = torch.tensor(acc, **f64), torch.tensor(amax, **f64)
        nan = torch.tensor(nan, dtype=torch.int64, device=device)
        inf = torch.tensor(inf, dtype=torch.int64, device=device)
        if rows is not None:
            acc, amax, nan, inf = (torch.cat([r, q]) for r, q in zip(rows, (acc, amax, nan, inf)))
    else:
        # Reading anything back here would be a host sync: every piece takes the exact path,
        # and the results stay on the device.
        buf = torch.empty(size, **f64)
        res = []
        for piece in pieces:
            x = buf[:piece.numel()].view(piece.shape)
            x.copy_(piece)
            res.append(_exact_piece(x.reshape(-1), p))
        if res:
            acc, amax, nan, inf = (torch.stack([r[i] for r in res]) for i in range(4))
        else:
            acc = amax = torch.zeros(0, **f64)
            nan = inf = torch.zeros(0, dtype=torch.int64, device=device)
    index = _owner_index(owner, device)
    out_acc, out_max = merge_scaled(acc, amax, index, n, p)
    nan_count = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, index, nan)
    inf_count = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, index, inf)
    return out_acc, nan_count, inf_count, out_max


def check_scale_args(op: str, tensors, scale, *, autograd: bool = True) -> None:
    """What every kernel of the in-place scaling ops refuses, with the compiled kernels' messages
    and error types (the reference multiplied a tensor that requires grad through autograd, a
    scale of several elements element by element, a mixed-dtype list, and complex tensors; and
    the compiled CPU kernel zeroed a gradient scaled by a complex number). `autograd`: also refuse
    a tensor that requires grad while grad mode is on, and one whose elements alias each other
    (not in the fake kernels: the compiled graph's tensors are not the caller's)."""
    where = f"gradguard.{op}"
    if scale.numel() != 1:
        raise RuntimeError(f"{where}: `scale` must hold one element, got shape {list(scale.shape)}")
    if scale.is_complex():
        raise TypeError(f"{where}: `scale` must be real, got a {scale.dtype} tensor")
    grad_mode = autograd and torch.is_grad_enabled()
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            # A sparse tensor has no compiled kernel and came here, where torch's overlap or
            # is_contiguous check refused it without naming the layout (multi_tensor_stats' words).
            raise RuntimeError(f"{where}: tensors[{i}] is not a strided (dense) tensor ({t.layout}); pass the values "
                               "of a sparse tensor instead")
        if t.dtype != tensors[0].dtype:
            raise RuntimeError(f"{where}: tensors[{i}] has dtype {t.dtype} but tensors[0] has {tensors[0].dtype}")
        # Refused before anything is written (nan_to_num_/mul_ refused it at that tensor, after
        # the ones before it were scaled), with torch's message, as the compiled kernels do.
        if autograd and not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
            raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                               "single memory location. Please clone() the tensor before performing the operation.")
        if grad_mode and t.requires_grad:
            raise RuntimeError(f"{where}: tensors[{i}] requires grad, and an in-place scaling of it would not be "
                               "recorded by autograd (a leaf Variable that requires grad is being used in an in-place "
                               "operation); call it under torch.no_grad(), as optimizers and clip_grad_norm_ do")
    if tensors and tensors[0].dtype not in _OP_DTYPES:
        raise NotImplementedError(f"{where}: dtype {tensors[0].dtype} is not supported; the op takes float16, "
                                  "bfloat16, float32 and float64 tensors")


def zero_nonfinite_and_scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """In place: every non-finite element becomes 0, every other one is multiplied by `scale`."""
    _check_same_device("zero_nonfinite_and_scale_", tensors, scale)
    check_scale_args("zero_nonfinite_and_scale_", tensors, scale)
    if not tensors:
        return
    s = _op_math_scale(scale, tensors[0])  # one dtype and device for all (checked)
    for t in tensors:
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(s)


def _op_math_scale(scale: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`scale` rounded to the dtype the kernels multiply in (float64 for float64 tensors, else
    float32), as the compiled kernels round it. A float64 scale kept as it was made a 0-dim
    float32 tensor's product float64 (two 0-dim operands promote), rounded once, while every
    other tensor, and every kernel, multiplied by the float32 scale: a 1-ulp difference."""
    # 0-dim: the op takes any one-element scale, torch's _foreach_mul_ only a 0-dim one. A copy,
    # read before anything is written: a scale that is an element of one of the tensors counts
    # with the value it had, as in the compiled kernels (an alias of it changed under the loop,
    # or torch's op refused it).
    return scale.reshape(()).to(t.device, torch.float64 if t.dtype == torch.float64 else torch.float32, copy=True)


def _check_same_device(op: str, tensors, scale) -> None:
    # Meta tensors mixed with real ones would otherwise "succeed" without touching anything.
    for i, t in enumerate(tensors):
        if t.device != tensors[0].device:
            raise RuntimeError(f"gradguard.{op}: tensors[{i}] is on {t.device} but tensors[0] is on "
                               f"{tensors[0].device}; every tensor of one call must be on the same device")
    if tensors and scale.device.type == "meta" and tensors[0].device.type != "meta":
        raise RuntimeError(f"gradguard.{op}: `scale` is on {scale.device} but the tensors are on {tensors[0].device}")


def maybe_scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """In place: every tensor times `scale`; nothing is written when `scale` is exactly 1.

    On the CPU the check is free. On a GPU, reading `scale` would be a host sync, so there the
    reference always multiplies (x * 1 keeps every value, though float16/bfloat16 NaN payloads may
    come back canonicalized); the compiled CUDA kernel makes the check on the device.
    """
    _check_same_device("maybe_scale_", tensors, scale)
    check_scale_args("maybe_scale_", tensors, scale)
    if not tensors:
        return
    if scale.device.type == "cpu" and scale.item() == 1.0:
        return
    torch._foreach_mul_(tensors, _op_math_scale(scale, tensors[0]))
