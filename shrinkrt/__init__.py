"""ShrinkRT: compressed Llama-family LLMs for small NVIDIA GPUs.

Stages live in top-level folders of the repository and import as subpackages:
`shrinkrt.calib` (calib/), `shrinkrt.export` (export/), `shrinkrt.runtime` (runtime/),
`shrinkrt.evaluate` (evaluate/). See docs/ARCHITECTURE.md.
"""
__version__ = "0.1.0"
