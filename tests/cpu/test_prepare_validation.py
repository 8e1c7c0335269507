"""The v-collectives and prepare/finalize without a GPU: every argument error is raised
before any launch, and the launches that do happen carry the right layout (rows, regions,
items, grids), with the device boundary replaced by fakes."""

from types import SimpleNamespace

import numpy as np
import pytest

collectives = pytest.importorskip("moecomm.collectives", reason="CuPy is not installed")
ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import kernel_args, op, quant  # noqa: E402
from moecomm.moe import alltoall as a2a  # noqa: E402
from moecomm.moe import prepare_finalize as pf  # noqa: E402
from moecomm.tensors import DeviceArray, check_meta  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


class Arr:
    """A device array as the fakes see it."""

    def __init__(self, shape, dtype, ptr=1 << 20, read_only=False):
        self.shape, self.dtype, self.ptr = tuple(shape), np.dtype(dtype), ptr
        self.read_only = read_only  # as a DLPack export flagged read-only
        self.itemsize = self.dtype.itemsize
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.itemsize
        self.data = SimpleNamespace(ptr=ptr)

    def reshape(self, *shape):
        return Arr(shape, self.dtype, self.ptr, self.read_only)


def fake_import(x, name, *, dtype=None, shape=None, ndim=None, device=None, stream=None,
                writable=False):
    if not isinstance(x, Arr):
        raise TypeError(f"{name}: expected an array with __dlpack__, got {type(x).__name__}")
    if writable and x.read_only:
        raise ValueError(f"{name}: the array is read-only")
    check_meta(x.shape, x.dtype, name, dtype=dtype, shape=shape, ndim=ndim)
    return DeviceArray(x.ptr, x.shape, x.dtype, x)


class FakeLauncher:
    """Records launches; its args are the real ctypes struct."""

    launched: list = []

    def __init__(self, kernel, args, *, pdl=False):
        self.kernel = kernel
        self.args = args() if isinstance(args, type) else args

    def __call__(self, grid, block, stream, shared_mem=0, cluster=1):
        FakeLauncher.launched.append((self.kernel, grid, block, self.args))


class FakeGroup:
    def __init__(self, size=2, rank=0, spans_nodes=False):
        self.size, self.rank, self.local_rank, self.spans_nodes = size, rank, rank, spans_nodes
        self.checked = []

    def allgather(self, value):
        return [value] * self.size

    def check_uniform(self, what, value):
        self.checked.append(what)


@pytest.fixture
def fakes(monkeypatch):
    FakeLauncher.launched = []
    for mod in (collectives, pf):
        monkeypatch.setattr(mod, "import_array", fake_import)
        monkeypatch.setattr(mod, "stream_handle", lambda s=None: 0)
        monkeypatch.setattr(mod, "Launcher", FakeLauncher)
        monkeypatch.setattr(mod, "empty", lambda shape, dtype, stream=None: Arr(shape, dtype, 1 << 24))
    monkeypatch.setattr(pf, "as_array", lambda x, name, **kw: x)
    # Op.usable re-selects the op's device (0 here): no CUDA runtime on this host.
    monkeypatch.setattr(op, "_runtime", SimpleNamespace(getDevice=lambda: 0,
                                                        setDevice=lambda d: None))
    monkeypatch.setattr(pf, "get_kernel", lambda source, name: name)
    return FakeLauncher.launched


def workspace(world=2, rank=0, max_bytes=1 << 20, ipc=True, config=None):
    """A workspace over fakes; by default without the Lamport path (lamport_max_bytes=0),
    so the pipelined launches are what the layout tests see."""
    config = collectives.VCollectiveConfig(lamport_max_bytes=0) if config is None else config
    ws = collectives.VCollectiveWorkspace.__new__(collectives.VCollectiveWorkspace)
    ws.group, ws.world, ws.rank, ws.device_id = FakeGroup(world, rank), world, rank, 0
    ws.max_bytes, ws.config, ws.ipc, ws._prepared, ws.sms = max_bytes, config, ipc, {}, 132
    ws.lamport_slot = collectives.lamport_slot_bytes(max_bytes, config.lamport_limit(), world)
    ws.kernel_workspace = kernel_args.VcWorkspace(rank=rank, world=world)
    ws.lamport_workspace = kernel_args.ArWorkspace(rank=rank, world=world,
                                                   lamport_slot=ws.lamport_slot)
    ws._gather_kernel = "vc_all_gatherv"
    ws._gather_lamport = "vc_all_gatherv_lamport"
    ws._scatter_kernels = {d: f"vc_reduce_scatterv_{s}" for d, s in collectives._SUFFIX.items()}
    ws._scatter_lamport = {d: f"vc_reduce_scatterv_lamport_{s}"
                           for d, s in collectives._SUFFIX.items()}
    ws._open(None)
    return ws


# ---------------------------------------------------------------- v-collectives
def test_all_gatherv_launch_layout(fakes):
    ws = workspace(world=3, rank=1)
    xs = [Arr((5, 8), np.float32), Arr((5, 8), np.int32), Arr((5, 7), np.uint8)]
    outs = ws.all_gatherv(xs, [2, 5, 0])
    assert [o.shape for o in outs] == [(7, 8), (7, 8), (7, 7)]
    ((kernel, grid, block, a),) = fakes
    assert kernel == "vc_all_gatherv" and block == 512 and grid == 1
    assert list(a.rows[:3]) == [2, 5, 0] and a.num_tensors == 3
    assert list(a.row_bytes[:3]) == [32, 32, 7]
    assert list(a.region_off[:3]) == [0, 256, 512]      # 7 rows x 32 B, each region 256-aligned
    assert a.item_bytes == 32 << 10 and a.item_bytes % 16 == 0
    assert [a.src[i] for i in range(3)] == [x.ptr for x in xs]
    ws.all_gatherv(xs, [2, 5, 0])                       # prepared once, launched again
    assert len(fakes) == 2 and len(ws._prepared) == 1


def test_all_gatherv_large_share_raises_item_size(fakes):
    ws = workspace(max_bytes=1 << 40)
    ws.all_gatherv([Arr((1 << 20, 1 << 12), np.uint8)], [1 << 20, 1 << 20])
    ((_, grid, _, a),) = fakes
    assert grid == 132
    share = -(-(1 << 32) // grid)
    assert a.item_bytes % 16 == 0 and -(-share // a.item_bytes) <= collectives._MAX_ITEMS


def test_all_gatherv_items_of_every_tensor_fit_a_flag():
    """A flag counts a block's items over every tensor in 16 bits: with the smallest
    items and the most tensors, their sum stays below 2^16 (it reached 8 x 60000)."""
    config = collectives.VCollectiveConfig(item_bytes=16)
    for share in (16, 1 << 20, 1 << 30):
        item = config.items(share * 132, 132)
        assert collectives.VC_MAX_TENSORS * -(-share // item) < 1 << 16, (share, item)


def test_all_gatherv_errors_before_launch(fakes):
    ws = workspace()
    x = Arr((3, 8), np.float32)
    with pytest.raises(ValueError, match="3 row counts for a group of 2"):
        ws.all_gatherv([x], [3, 1, 1])
    with pytest.raises(ValueError, match=r"xs\[0\]: shape \(3, 8\), expected \[sizes\[0\]=2"):
        ws.all_gatherv([x], [2, 3])
    with pytest.raises(ValueError, match="negative"):
        ws.all_gatherv([x], [3, -1])
    with pytest.raises(TypeError, match="expected a list"):
        ws.all_gatherv(x, [3, 3])
    with pytest.raises(ValueError, match="1 to 8"):
        ws.all_gatherv([], [3, 3])
    with pytest.raises(ValueError, match=r"outs\[0\]: shape"):
        ws.all_gatherv([x], [3, 3], outs=[Arr((5, 8), np.float32)])
    with pytest.raises(TypeError, match=r"outs\[0\]: dtype"):
        ws.all_gatherv([x], [3, 3], outs=[Arr((6, 8), np.int32)])
    with pytest.raises(ValueError, match="max_bytes"):
        ws.all_gatherv([Arr((3, 1 << 20), np.float32)], [3, 3])
    with pytest.raises(TypeError, match="__dlpack__"):
        ws.all_gatherv([np.zeros((3, 8))], [3, 3])
    with pytest.raises(ValueError, match=r"^outs\[0\]: the array is read-only"):
        ws.all_gatherv([x], [3, 3], outs=[Arr((6, 8), np.float32, read_only=True)])
    assert fakes == []
    ws.all_gatherv([Arr((3, 8), np.float32, read_only=True)], [3, 3])  # inputs may be


def test_lamport_crossover_model_and_override():
    c = collectives.lamport_crossover()
    assert 1 << 20 <= c <= 16 << 20           # a few MB received per rank (measured)
    assert collectives.VCollectiveConfig().lamport_limit() == c
    assert collectives.VCollectiveConfig(lamport_max_bytes=4096).lamport_limit() == 4096
    assert collectives.VCollectiveConfig(lamport_max_bytes=0).lamport_limit() == 0
    with pytest.raises(ValueError, match="lamport_max_bytes"):
        collectives.VCollectiveConfig(lamport_max_bytes=-1)
    with pytest.raises(ValueError, match="at most"):
        collectives.VCollectiveConfig(lamport_max_bytes=1 << 40)
    assert collectives.received_bytes(1000, 2) == 500 and collectives.received_bytes(1000, 1) == 0


def test_lamport_stream_and_slot_bytes():
    lg = collectives.lamport_gather_bytes
    assert lg([0, 0], [32]) == 0
    assert lg([1], [1]) == 512                 # one padded vector: one line
    assert lg([31], [16]) == 512 and lg([32], [16]) == 1024     # 31 payload vectors a line
    assert lg([3, 1], [7, 16]) == 512          # ceil(21/16) + 3 vectors
    assert lg([31], [16, 1]) == 1024           # 31 + 2 vectors
    assert lg([2, 40], [4, 100]) == 512 * -(-(10 + 250) // 31)  # the largest rank
    slot = collectives.lamport_slot_bytes
    assert slot(1 << 30, 0, 2) == 0            # no Lamport path
    s2 = slot(1 << 30, 100_000, 2)             # a rank's whole stream may be 2x the average
    assert s2 % 256 == 0 and s2 >= lg([200_000], [1]) and s2 >= lg([25_000], [1] * 8)
    assert slot(4096, 100_000, 2) < s2         # capped by max_bytes
    assert slot(4096, 100_000, 2) >= lg([4096], [1])
    assert slot(1 << 30, 100_000, 1) >= lg([100_000], [1])
    # every slot starts with the arrival vector, so a stream that fills it exactly does not fit
    header = collectives.VC_LAMPORT_HEADER_BYTES
    assert header == 16 and slot(1 << 30, 100_000, 1) >= header + lg([100_000], [1])


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_all_gatherv_takes_lamport_below_crossover(fakes, rank):
    cfg = collectives.VCollectiveConfig(lamport_max_bytes=64 << 10)
    ws = workspace(world=3, rank=rank, max_bytes=4 << 20, config=cfg)
    xs = [Arr((5, 8), np.int32), Arr((5, 7), np.uint8)]
    ws.all_gatherv(xs, [5, 5, 5])                   # 15 x 39 B: far below
    ((kernel, grid, block, a),) = fakes
    assert kernel == "vc_all_gatherv_lamport" and block == 512
    assert a.lamport.lamport_slot == ws.lamport_slot and a.lamport.world == 3
    assert list(a.rows[:3]) == [5, 5, 5] and list(a.row_bytes[:2]) == [32, 7]
    lines = 3 * -(-(10 + 3) // 31)                  # every rank's stream, a warp per line
    assert grid == max(1, -(-lines // 16))
    # received bytes per rank just above the limit: the pipelined kernel, on every rank
    n = (64 << 10) * 3 // 2 // 3 // 64 + 2          # rows per rank of 64 B
    ws.all_gatherv([Arr((n, 64), np.uint8)], [n] * 3)
    assert collectives.received_bytes(3 * n * 64, 3) > 64 << 10
    assert fakes[-1][0] == "vc_all_gatherv"
    n -= 2                                          # just below: Lamport again
    assert collectives.received_bytes(3 * n * 64, 3) <= 64 << 10
    ws.all_gatherv([Arr((n, 64), np.uint8)], [n] * 3)
    assert fakes[-1][0] == "vc_all_gatherv_lamport"
    assert ws.gather_path([n] * 3, [64]) == "lamport"
    assert ws.gather_path([n + 2] * 3, [64]) == "pipelined"
    assert workspace(ipc=False).gather_path([1, 1], [4]) == "nccl"


def test_lamport_path_needs_the_slot(fakes):
    # slots hold every call within the limit and max_bytes by construction; a slot smaller
    # than a call's stream (the safety net) sends it down the pipelined path
    cfg = collectives.VCollectiveConfig(lamport_max_bytes=1 << 20)
    ws = workspace(world=2, rank=0, max_bytes=1 << 20, config=cfg)
    rows = 1024 // 16 * 31 // 32 + 1                # a stream of 3 lines: 1536 bytes
    ws.all_gatherv([Arr((rows, 16), np.uint8)], [rows, 0])
    assert fakes[-1][0] == "vc_all_gatherv_lamport"
    ws.lamport_slot, ws._prepared = 1024, {}
    ws.all_gatherv([Arr((rows, 16), np.uint8)], [rows, 0])
    assert fakes[-1][0] == "vc_all_gatherv"
    off = workspace(world=2, rank=0, config=collectives.VCollectiveConfig(lamport_max_bytes=0))
    assert off.lamport_slot == 0
    off.all_gatherv([Arr((1, 16), np.uint8)], [1, 1])
    assert fakes[-1][0] == "vc_all_gatherv"


def test_reduce_scatterv_path_choice(fakes):
    ws = workspace(world=2, rank=1, max_bytes=32 << 20, config=collectives.VCollectiveConfig())
    x = Arr((7, 64), BF16)
    ws.reduce_scatterv(x, [3, 4])
    kernel, grid, block, a = fakes[-1]
    assert kernel == "vc_reduce_scatterv_lamport_bf16" and grid == 1 and block == 512
    assert a.lamport.lamport_slot == ws.lamport_slot and a.row_bytes == 128
    rows = collectives.lamport_crossover() // 1024 + 1  # received rows x 1 KiB > crossover
    ws.reduce_scatterv(Arr((2 * rows, 256), np.float32), [rows, rows])
    assert fakes[-1][0] == "vc_reduce_scatterv_fp32"
    rows -= 1
    ws.reduce_scatterv(Arr((2 * rows, 256), np.float32), [rows, rows])
    assert fakes[-1][0] == "vc_reduce_scatterv_lamport_fp32"
    assert fakes[-1][1] == min(132, -(-2 * rows * 1024 // (16 * 512)))
    assert ws.scatter_path([rows, rows], 1024) == "lamport"
    assert ws.scatter_path([rows + 1, rows + 1], 1024) == "pipelined"
    assert workspace(ipc=False).scatter_path([1, 1], 16) == "nccl"


def test_reduce_scatterv_launch_and_errors(fakes):
    ws = workspace(world=2, rank=1)
    x = Arr((7, 64), BF16)
    out = ws.reduce_scatterv(x, [3, 4])
    assert out.shape == (4, 64)
    ((kernel, grid, _, a),) = fakes
    assert kernel == "vc_reduce_scatterv_bf16" and list(a.rows[:2]) == [3, 4]
    assert a.row_bytes == 128 and a.in_ == x.ptr
    with pytest.raises(ValueError, match=r"expected sum\(sizes\)=8 rows"):
        ws.reduce_scatterv(x, [4, 4])
    with pytest.raises(TypeError, match="dtype int32 is not supported"):
        ws.reduce_scatterv(Arr((7, 64), np.int32), [3, 4])
    with pytest.raises(ValueError, match="multiple of 16"):
        ws.reduce_scatterv(Arr((7, 3), np.float32), [3, 4])
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        ws.reduce_scatterv(Arr((7, 64), BF16, ptr=(1 << 20) + 4), [3, 4])
    with pytest.raises(ValueError, match="out: shape"):
        ws.reduce_scatterv(x, [3, 4], out=Arr((3, 64), BF16))
    with pytest.raises(ValueError, match="^out: the array is read-only"):
        ws.reduce_scatterv(x, [3, 4], out=Arr((4, 64), BF16, read_only=True))
    with pytest.raises(ValueError, match="max_bytes"):
        ws.reduce_scatterv(Arr((7, 1 << 18), np.float32), [3, 4])
    assert len(fakes) == 1


def test_debug_mode_compares_across_ranks(fakes, monkeypatch):
    monkeypatch.setattr(collectives._group, "DEBUG", True)
    ws = workspace()
    ws.all_gatherv([Arr((3, 8), np.float32)], [3, 3])
    ws.reduce_scatterv(Arr((6, 8), np.float32), [3, 3])
    assert len(ws.group.checked) == 2


# ---------------------------------------------------------------- prepare / finalize
class FakeQuant:
    def __init__(self):
        self.calls = []

    def quantize(self, x, quant_dtype, **kw):
        self.calls.append((quant_dtype, kw))
        return kw["out"], kw.get("scale_out")

    def nvfp4_block_scale_interleave(self, sf, *, out=None, stream=None):
        self.calls.append(("interleave", sf.shape))
        return out

    block_group_size = staticmethod(quant.block_group_size)  # a pure check


def allgather(fakes, monkeypatch, world=2, rank=0):
    q = FakeQuant()
    monkeypatch.setattr(pf, "_quant", lambda: q)
    obj = pf.FlashInferAllGatherMoEPrepareAndFinalize.__new__(
        pf.FlashInferAllGatherMoEPrepareAndFinalize)
    obj.use_dp, obj.num_dispatchers_, obj.group = True, 1, FakeGroup(world, rank)
    obj.local_tokens = obj.local_sizes = None
    obj.device_id, obj._buffers, obj._launchers, obj._closed = 0, {}, {}, False
    obj.workspace, obj._owns_workspace = workspace(world, rank), False
    return obj, q


def inputs(T=4, H=128, k=8, dtype=BF16):
    return Arr((T, H), dtype), Arr((T, k), np.float32, 2 << 20), Arr((T, k), np.int32, 3 << 20)


def test_allgather_prepare_nvfp4_plumbing(fakes, monkeypatch):
    obj, q = allgather(fakes, monkeypatch)
    a1, w, ids = inputs()
    gs = Arr((1,), np.float32)
    res = obj.prepare(a1, w, ids, 256, None, False, pf.FusedMoEQuantConfig("nvfp4", a1_gscale=gs),
                      sizes=[4, 6])
    (kind, kw), (inter, shape) = q.calls
    assert kind == "nvfp4" and kw["is_fp4_scale_swizzled"] is False
    assert kw["out"].shape == (4, 64) and kw["scale_out"].shape == (4, 8)
    assert inter == "interleave" and shape == (10, 8)
    ((kernel, _, _, a),) = fakes
    assert kernel == "vc_all_gatherv" and a.num_tensors == 4
    assert list(a.row_bytes[:4]) == [32, 32, 64, 8]
    assert res.a1q.shape == (10, 64) and res.topk_ids.shape == (10, 8)
    assert res.a1q_scale.shape == (128 * 8,)             # 10 rows padded to 128, 8 columns
    assert obj.local_sizes == (4, 6)


def test_allgather_fp8_static_scale_stays_local(fakes, monkeypatch):
    obj, q = allgather(fakes, monkeypatch)
    a1, w, ids = inputs()
    s = Arr((1,), np.float32)
    obj.prepare(a1, w, ids, 256, None, False, pf.FusedMoEQuantConfig("fp8", a1_gscale=s),
                sizes=[4, 4])
    ((kind, kw),) = q.calls
    assert kw["scale"] is s and kw["scale_out"] is None and not kw["per_act_token_quant"]
    assert fakes[0][3].num_tensors == 3
    q.calls.clear()
    obj.prepare(a1, w, ids, 256, None, False,
                pf.FusedMoEQuantConfig("fp8", block_shape=(1, 64)), sizes=[4, 4])
    ((kind, kw),) = q.calls
    assert kw["scale"] is None and kw["scale_out"].shape == (4, 2)
    assert fakes[1][3].num_tensors == 4


def test_prepare_errors_before_launch(fakes, monkeypatch):
    obj, q = allgather(fakes, monkeypatch, rank=1)
    a1, w, ids = inputs()
    none = pf.FusedMoEQuantConfig(None)
    gs = Arr((1,), np.float32)
    cases = [
        (dict(sizes=[4, 5]), ValueError, r"sizes\[1\]=5, but a1 has 4 tokens"),
        (dict(sizes=[4]), ValueError, "1 row counts for a group of 2"),
        (dict(topk_ids=Arr((4, 8), np.int64)), TypeError, "topk_ids: dtype int64"),
        (dict(topk_ids=Arr((3, 8), np.int32)), ValueError, "topk_ids: shape"),
        (dict(topk_weights=Arr((4, 8), np.float16)), TypeError, "topk_weights: dtype float16"),
        (dict(topk_weights=Arr((4, 2), np.float32)), ValueError, "topk_weights: shape"),
        (dict(a1=Arr((4, 128), np.int32)), TypeError, "a1: dtype int32"),
        (dict(apply=True), ValueError, "top_k == 1"),
        (dict(expert_map=Arr((3,), np.int32)), ValueError, "expert_map: shape"),
        (dict(a1=Arr((4, 72), BF16), qc=pf.FusedMoEQuantConfig("nvfp4", a1_gscale=gs)),
         ValueError, "not a multiple of 16"),
        (dict(qc="nvfp4"), TypeError, "FusedMoEQuantConfig"),
        (dict(num_experts=0), ValueError, "num_experts must be >= 1"),
    ]
    for change, error, message in cases:
        args = dict(a1=a1, topk_weights=w, topk_ids=ids, num_experts=256, expert_map=None,
                    apply=False, qc=none, sizes=[4, 4])
        args.update(change)
        with pytest.raises(error, match=message):
            obj.prepare(args["a1"], args["topk_weights"], args["topk_ids"], args["num_experts"],
                        args["expert_map"], args["apply"], args["qc"], sizes=args["sizes"])
    with pytest.raises(RuntimeError, match="needs a prepare first"):
        obj.finalize(Arr((4, 128), BF16), Arr((8, 128), BF16), w, ids, False)
    with pytest.raises(ValueError, match="weighted and reduced"):
        obj.finalize(Arr((4, 128), BF16), Arr((8, 128), BF16), w, ids, False, "contiguous")
    assert fakes == [] and q.calls == []


def test_router_weight_launch(fakes, monkeypatch):
    obj, _ = allgather(fakes, monkeypatch)
    a1, w, ids = inputs(k=1)
    obj.prepare(a1, w, ids, 256, None, True, pf.FusedMoEQuantConfig(None), sizes=[4, 4])
    (kernel, _, _, a), (gather, *_) = fakes
    assert kernel == "scale_rows_bf16" and (a.x, a.w, a.tokens, a.cols) == (a1.ptr, w.ptr, 4, 128)
    assert gather == "vc_all_gatherv"
    # a1 is scaled in place: refused where its export is read-only, accepted unscaled
    fakes.clear()
    a1.read_only = True
    with pytest.raises(ValueError, match="^a1: the array is read-only"):
        obj.prepare(a1, w, ids, 256, None, True, pf.FusedMoEQuantConfig(None), sizes=[4, 4])
    assert fakes == []
    obj.prepare(a1, w, ids, 256, None, False, pf.FusedMoEQuantConfig(None), sizes=[4, 4])
    assert [f[0] for f in fakes] == ["vc_all_gatherv"]


@pytest.mark.parametrize("qc, rows", [
    (pf.FusedMoEQuantConfig(None), [4, 4, 256]),
    (pf.FusedMoEQuantConfig("nvfp4", a1_gscale=Arr((1,), np.float32)), [4, 4, 64, 8]),
    (pf.FusedMoEQuantConfig("fp8", block_shape=(1, 64)), [4, 4, 128, 8]),
    (pf.FusedMoEQuantConfig("fp8", per_act_token_quant=True), [4, 4, 128, 4]),
    (pf.FusedMoEQuantConfig("fp8", a1_gscale=Arr((1,), np.float32)), [4, 4, 128])])
def test_allgather_refusals_before_a1_is_scaled(fakes, monkeypatch, qc, rows):
    """An exchange past the workspace, and a block shape that does not divide the hidden
    size, are refused before a1 is scaled in place (top_k 1) or quantized; the rows the
    check assumes are those the exchange then gathers."""
    obj, q = allgather(fakes, monkeypatch)
    a1, w, ids = inputs(k=1)
    room = obj.workspace.max_bytes // sum(rows)
    with pytest.raises(ValueError, match="exceeds the workspace's max_bytes"):
        obj.prepare(a1, w, ids, 256, None, True, qc, sizes=[4, room])
    assert fakes == [] and q.calls == []
    obj.prepare(a1, w, ids, 256, None, True, qc, sizes=[4, 4])
    (gather,) = [a for k, _, _, a in fakes if k == "vc_all_gatherv"]
    assert list(gather.row_bytes[:gather.num_tensors]) == rows
    fakes.clear()
    q.calls.clear()
    if qc.block_shape is not None:
        # what the quantizer would refuse: a group size that does not divide the hidden
        # size or is not a multiple of 16, a block shape of one entry
        for shape, msg in (((1, 48), r"quant_config.block_shape=\(1, 48\): the group size "
                                     "G=48 must be a multiple of 16 that divides K=128"),
                           ((1, 8), "G=8 must be a multiple of 16"),
                           ((128,), r"block_shape=\(128,\): expected \[rows, G\]")):
            with pytest.raises(ValueError, match=msg):
                obj.prepare(a1, w, ids, 256, None, True,
                            pf.FusedMoEQuantConfig("fp8", block_shape=shape), sizes=[4, 4])
        assert fakes == [] and q.calls == []
    if qc.quant_dtype is not None:  # a scale of two elements, an unaligned a1
        bad = pf.FusedMoEQuantConfig(qc.quant_dtype, a1_gscale=Arr((2,), np.float32))
        with pytest.raises(ValueError, match="a1_gscale: expected a one-element"):
            obj.prepare(a1, w, ids, 256, None, True, bad, sizes=[4, 4])
        with pytest.raises(ValueError, match="a1: address .* not 16-byte aligned"):
            obj.prepare(Arr(a1.shape, a1.dtype, a1.ptr + 2), w, ids, 256, None, True, qc,
                        sizes=[4, 4])
        assert fakes == [] and q.calls == []


def test_alltoall_refusals(fakes, monkeypatch):
    obj = pf.FlashInferAllToAllMoEPrepareAndFinalize.__new__(
        pf.FlashInferAllToAllMoEPrepareAndFinalize)
    obj.use_dp, obj.num_dispatchers_, obj.group = True, 1, FakeGroup(2, 0)
    obj.device_id, obj._buffers, obj._launchers, obj._closed = 0, {}, {}, False
    obj.num_experts, obj.top_k, obj.max_num_tokens, obj.experts_per_rank = 256, 8, 16, 128
    obj.all2all_manager, obj.workspace, obj.alltoall_info = None, None, None
    a1, w, ids = inputs()
    gs = Arr((1,), np.float32)
    with pytest.raises(ValueError, match="FP8 takes the all-gather path"):
        obj.prepare(a1, w, ids, 256, None, False, pf.FusedMoEQuantConfig("fp8", a1_gscale=gs))
    with pytest.raises(ValueError, match="the exchange was made for 256"):
        obj.prepare(a1, w, ids, 128, None, False, pf.FusedMoEQuantConfig(None))
    with pytest.raises(ValueError, match="top_k=4, the exchange was made for 8"):
        obj.prepare(a1, Arr((4, 4), np.float32), Arr((4, 4), np.int32), 256, None, False,
                    pf.FusedMoEQuantConfig(None))
    with pytest.raises(ValueError, match="exceed max_num_tokens=16"):
        big = inputs(T=17)
        obj.prepare(*big, 256, None, False, pf.FusedMoEQuantConfig(None))
    with pytest.raises(ValueError, match="multiple of 64"):
        obj.prepare(Arr((4, 80), BF16), w, ids, 256, None, False,
                    pf.FusedMoEQuantConfig("nvfp4", a1_gscale=gs))
    with pytest.raises(RuntimeError, match="needs a prepare first"):
        obj.finalize(Arr((4, 128), BF16), Arr((8, 128), BF16), w, ids, False)
    with pytest.raises(ValueError, match="1 to 7 arrays"):
        obj.dispatch(ids, [a1] * 8, sizes=[4, 4])
    with pytest.raises(ValueError, match=r"tensors\[1\]: shape \(3, 128\), expected \[T=4"):
        obj.dispatch(ids, [a1, Arr((3, 128), BF16)], sizes=[4, 4])
    with pytest.raises(ValueError, match="multiples of 4 bytes"):
        obj.dispatch(ids, [Arr((4, 3), np.uint8)], sizes=[4, 4])
    with pytest.raises(ValueError, match="expert_map: shape"):
        obj.dispatch(ids, [a1], sizes=[4, 4], expert_map=Arr((128,), np.int32))
    with pytest.raises(ValueError, match=r"sizes\[0\]=5"):
        obj.dispatch(ids, [a1], sizes=[5, 4])
    obj.use_dp = False
    with pytest.raises(RuntimeError, match="needs use_dp=True"):
        obj.dispatch(ids, [a1], sizes=[4, 4])
    assert fakes == []


class RecordingCollectives:
    """The NCCL-path VCollectiveWorkspace as the all-to-all-v path calls it."""

    def __init__(self):
        self.calls = []

    def all_gatherv(self, xs, sizes, *, outs=None, stream=None):
        self.calls.append(("all_gatherv", [x.shape for x in xs], tuple(sizes),
                           [o.shape for o in outs]))
        return outs

    def reduce_scatterv(self, x, sizes, *, out=None, stream=None):
        self.calls.append(("reduce_scatterv", x.shape, tuple(sizes), out.shape))
        return out

    def check_gather(self, sizes, row_bytes):
        self.checked = (tuple(sizes), list(row_bytes))


def alltoall_over_fakes(group, manager, workspace):
    """An all-to-all-v prepare/finalize (256 experts, top-8, 16 tokens) over the given
    fakes: ``manager`` inside a node, ``workspace`` across nodes."""
    obj = pf.FlashInferAllToAllMoEPrepareAndFinalize.__new__(
        pf.FlashInferAllToAllMoEPrepareAndFinalize)
    obj.use_dp, obj.num_dispatchers_, obj.group = True, 1, group
    obj.device_id, obj._buffers, obj._launchers, obj._closed = 0, {}, {}, False
    obj.num_experts, obj.top_k, obj.max_num_tokens, obj.experts_per_rank = 256, 8, 16, 128
    obj.all2all_manager, obj.workspace, obj.alltoall_info = manager, workspace, None
    return obj


def test_alltoall_across_nodes_wiring(fakes, monkeypatch):
    """The path across nodes: all-gather of the four tensors, the plan and the row take on
    the gathered ids, interleave; finalize puts rows back and reduce-scatters."""
    q = FakeQuant()
    monkeypatch.setattr(pf, "_quant", lambda: q)
    obj = alltoall_over_fakes(FakeGroup(2, 1, spans_nodes=True), None, RecordingCollectives())
    a1, w, ids = inputs(T=5)
    gs = Arr((1,), np.float32)
    res = obj.prepare(a1, w, ids, 256, Arr((256,), np.int32), False,
                      pf.FusedMoEQuantConfig("nvfp4", a1_gscale=gs), sizes=[3, 5])
    (gather,) = [c for c in obj.workspace.calls if c[0] == "all_gatherv"]
    assert gather[1] == [(5, 64), (5, 8), (5, 8), (5, 8)] and gather[2] == (3, 5)
    assert gather[3] == [(8, 64), (8, 8), (8, 8), (8, 8)]
    kernels = [k for k, *_ in fakes]
    assert kernels == ["a2a_plan", "a2a_take_rows", "map_expert_ids"]
    (_, grid, block, plan), (_, _, _, take), (_, _, _, emap) = fakes
    assert (grid, block) == (2, 1024)                    # one block per source rank
    assert list(plan.rows[:2]) == [3, 5] and (plan.rank, plan.runtime_max) == (1, 5)
    assert (plan.top_k, plan.num_experts, plan.experts_per_rank) == (8, 256, 128)
    assert (take.n_rows, take.num_payloads, take.id_payload) == (10, 4, 3)
    assert (take.lo, take.hi) == (128, 256)
    assert list(take.row_bytes[:4]) == [64, 8, 32, 32]
    assert emap.n == 10 * 8 and emap.num_experts == 256
    assert res.a1q.shape == (10, 64) and res.topk_ids.shape == (10, 8)
    assert q.calls[-1] == ("interleave", (10, 8))
    out = Arr((5, 128), BF16)
    obj.finalize(out, Arr((10, 128), BF16), w, ids, False)
    (_, _, _, put) = fakes[-1]
    assert fakes[-1][0] == "a2a_put_rows" and (put.total, put.row_bytes) == (8, 256)
    assert put.inv == plan.inv
    assert obj.workspace.calls[-1] == ("reduce_scatterv", (8, 128), (3, 5), (5, 128))
    with pytest.raises(ValueError, match="fused_expert_output: shape"):
        obj.finalize(out, Arr((9, 128), BF16), w, ids, False)


def test_alltoall_across_nodes_plan_takes_every_rank(fakes, monkeypatch):
    """More ranks than an IPC v-collective serves (16): the plan kernel gets every rank's
    token count (its argument holds A2A_PLAN_MAX_RANKS), one block per source rank."""
    monkeypatch.setattr(pf, "_quant", lambda: FakeQuant())
    obj = alltoall_over_fakes(FakeGroup(32, 5, spans_nodes=True), None, RecordingCollectives())
    obj.experts_per_rank = 8
    sizes = [(3 * r) % 7 for r in range(32)]
    a1, w, ids = inputs(T=sizes[5])
    obj.prepare(a1, w, ids, 256, None, False, pf.FusedMoEQuantConfig(None), sizes=sizes)
    (plan,) = [(grid, a) for k, grid, _, a in fakes if k == "a2a_plan"]
    assert plan[0] == 32 and list(plan[1].rows[:32]) == sizes
    assert (plan[1].rank, plan[1].runtime_max) == (5, 6)


def test_alltoall_across_nodes_finalize_keeps_the_plan(fakes, monkeypatch):
    """finalize puts rows back with the map prepare's plan wrote, even when the buffer
    cache is dropped in between (it holds at most 64 arrays; ragged sizes fill it with new
    shapes): a map looked up again would be a new, unwritten array (on 2 x H200 that read
    garbage rows or faulted)."""
    q = FakeQuant()
    monkeypatch.setattr(pf, "_quant", lambda: q)
    ptrs = iter(range(1 << 24, 1 << 40, 1 << 20))  # a new address per allocation
    monkeypatch.setattr(pf, "empty", lambda shape, dtype, stream=None: Arr(shape, dtype, next(ptrs)))
    obj = alltoall_over_fakes(FakeGroup(2, 1, spans_nodes=True), None, RecordingCollectives())
    a1, w, ids = inputs(T=5)
    obj.prepare(a1, w, ids, 256, None, False, pf.FusedMoEQuantConfig(None), sizes=[3, 5])
    (plan,) = [a for k, _, _, a in fakes if k == "a2a_plan"]
    for i in range(70):  # arrays of earlier calls' shapes: the next new shape drops them all
        obj._buffers[("old", (i,), np.dtype(np.uint8))] = Arr((i,), np.uint8)
    obj.finalize(Arr((5, 128), BF16), Arr((10, 128), BF16), w, ids, False)
    assert fakes[-1][0] == "a2a_put_rows" and len(obj._buffers) < 70
    assert fakes[-1][3].inv == plan.inv


def test_alltoall_across_nodes_combine_refuses_before_any_launch(fakes, monkeypatch):
    """The cross-node combine checks ``out`` before it puts rows back, and refuses after
    close()."""
    monkeypatch.setattr(pf, "_quant", lambda: FakeQuant())
    obj = alltoall_over_fakes(FakeGroup(2, 1, spans_nodes=True), None, RecordingCollectives())
    a1, w, ids = inputs(T=5)
    obj.prepare(a1, w, ids, 256, None, False, pf.FusedMoEQuantConfig(None), sizes=[3, 5])
    fakes.clear()
    rows = Arr((10, 128), BF16)
    with pytest.raises(ValueError, match=r"out: shape \(4, 128\)"):
        obj.combine(rows, Arr((4, 128), BF16))
    with pytest.raises(ValueError, match="out: address .* not 16-byte aligned"):
        obj.combine(rows, Arr((5, 128), BF16, (1 << 20) + 4))
    assert fakes == [] and obj.workspace.calls[-1][0] == "all_gatherv"
    obj._closed = True
    with pytest.raises(RuntimeError, match="is closed"):
        obj.combine(rows, Arr((5, 128), BF16))
    assert fakes == []


class RecordingMoeAlltoAll:
    """MoeAlltoAll as the all-to-all-v path calls it inside a node."""

    def __init__(self, ep, workspace_bytes=1 << 30):
        self.ep, self.calls, self.phase = ep, [], op.Phase.IDLE
        self.workspace_bytes, self.planned = workspace_bytes, None

    def dispatch_plan(self, rmax, row_bytes):
        """The real plan and size check, against ``workspace_bytes``."""
        self.planned = (rmax, list(row_bytes))
        plan = a2a.plan_dispatch(self.ep, rmax, row_bytes)
        if plan.combine_off > self.workspace_bytes:
            raise ValueError(f"input_payloads: {plan.combine_off} workspace bytes needed")
        return plan

    def dispatch(self, ids, payloads, rmax, invalid_token_expert_id=None,
                 expert_id_payload_index=None, stream=None):
        self.calls.append(("dispatch", ids, [p.shape for p in payloads], rmax,
                           invalid_token_expert_id, expert_id_payload_index))
        self.phase = op.Phase.DISPATCHED
        return [Arr((self.ep, rmax, *p.shape[1:]), p.dtype) for p in payloads]

    def combine(self, payload, rmax, stream=None, *, out=None):
        self.calls.append(("combine", payload.shape, rmax, out))
        self.phase = op.Phase.IDLE
        return out


def test_alltoall_inside_a_node_rides_on_moe_alltoall(fakes, monkeypatch):
    q = FakeQuant()
    monkeypatch.setattr(pf, "_quant", lambda: q)
    obj = alltoall_over_fakes(FakeGroup(2, 0), RecordingMoeAlltoAll(2), None)
    a1, w, ids = inputs(T=6)
    res = obj.prepare(a1, w, ids, 256, None, False,
                      pf.FusedMoEQuantConfig("nvfp4", a1_gscale=Arr((1,), np.float32)),
                      sizes=[6, 2])
    (call,) = obj.all2all_manager.calls
    assert call[0] == "dispatch" and call[1] is ids and call[3] == 6
    assert call[2] == [(6, 64), (6, 8), (6, 8), (6, 8)]   # a1q, sf (linear), weights, ids
    assert call[4:] == (-1, 3)                           # ids sanitised per target
    assert res.a1q.shape == (12, 64) and res.topk_ids.shape == (12, 8)
    assert res.topk_weights.shape == (12, 8) and q.calls[-1] == ("interleave", (12, 8))
    assert fakes == []                                    # no expert_map: no renumbering
    out = Arr((6, 128), BF16)
    obj.finalize(out, Arr((12, 128), BF16), w, ids, False)
    assert obj.all2all_manager.calls[-1] == ("combine", (2, 6, 128), 6, out)


def test_alltoall_refuses_before_any_launch(fakes, monkeypatch):
    """What the exchange would refuse is refused before a1 is scaled in place (top_k 1,
    apply_router_weight_on_input) or anything is quantized: another rank's tokens past
    max_num_tokens, a second prepare before finalize."""
    q = FakeQuant()
    monkeypatch.setattr(pf, "_quant", lambda: q)
    obj = alltoall_over_fakes(FakeGroup(2, 0), RecordingMoeAlltoAll(2), None)
    obj.top_k = 1
    a1, w, ids = inputs(T=6, k=1)
    qc = pf.FusedMoEQuantConfig(None)
    with pytest.raises(ValueError, match="17 tokens on rank 1 exceed max_num_tokens=16"):
        obj.prepare(a1, w, ids, 256, None, True, qc, sizes=[6, 17])
    assert fakes == [] and q.calls == [] and obj.all2all_manager.calls == []
    obj.prepare(a1, w, ids, 256, None, True, qc, sizes=[6, 2])
    launched = len(fakes)
    with pytest.raises(RuntimeError, match="called twice without finalize"):
        obj.prepare(a1, w, ids, 256, None, True, qc, sizes=[6, 2])
    assert len(fakes) == launched and len(obj.all2all_manager.calls) == 1
