"""The vLLM-named API of moecomm.vllm_ar without a GPU: every function of vLLM's custom
all-reduce lifecycle exists and forwards to its CustomAllReduce method."""

import inspect

from moecomm import constants, vllm_ar

NAMES = {  # vLLM / FlashInfer name -> CustomAllReduce method
    "vllm_register_buffer": "register_buffer",
    "vllm_all_reduce": "all_reduce",
    "vllm_get_graph_buffer_ipc_meta": "get_graph_buffer_ipc_meta",
    "vllm_register_graph_buffers": "register_graph_buffers",
    "vllm_dispose": "close",
}


def test_meta_size_is_the_flag_region():
    assert vllm_ar.vllm_meta_size() == vllm_ar.meta_size() == \
        2 * constants.AR_MAX_BLOCKS * constants.AR_MAX_RANKS * 8  # u64 flags


def test_every_vllm_function_forwards():
    calls = []

    class Fake:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k)) or name

    for fn, method in NAMES.items():
        params = list(inspect.signature(getattr(vllm_ar, fn)).parameters)
        assert params[0] == "fa"
        args = [object() for _ in params[1:]]
        getattr(vllm_ar, fn)(Fake(), *args)
        assert calls[-1][0] == method and list(calls[-1][1]) == args, fn
    assert set(vllm_ar.__all__) >= set(NAMES) | {"vllm_init_custom_ar", "vllm_meta_size"}
