"""Runtime: the formats every stage shares (config.py, op_contract.py, packing.py, kv_quant.py, graph_io.py), the
reference PyTorch model with its compressed modules and caches, model loading, generation, and the
backends over an export (ort_model.py, trt_model.py) with profiling. Layers: docs/ARCHITECTURE.md."""
