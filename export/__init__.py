"""ONNX export with `shrinkrt` custom ops (not built yet: see the open issues)."""
