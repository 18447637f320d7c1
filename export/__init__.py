"""ONNX export: the decoder graph with the `shrinkrt` custom ops and their reference bodies
(llama.py, ops.py), the ort-cpu lowering (ort_cpu.py), the artifact directory (artifact.py), its
validation (validate.py) and TensorRT engine builds (trt_build.py)."""
