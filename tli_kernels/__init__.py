"""tli_kernels: Transformer Layer Injection for Hugging Face decoder LLMs.

Importing the package is cheap: no CUDA queries, no kernel compilation, no compiled extension
needed. Submodules:
  checkpoint  safetensors layout, SurgeryPlan, executors
  methods     upscaling methods (tli, dus, block-expansion, stack, passthrough, moe-upcycle)
  ops, reference, modules, integrations   Triton kernels and drop-in modules
  training    continued pretraining
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from tli_kernels import upscale_model` without importing torch when the package is imported.
    if name == "upscale_model":
        from tli_kernels.inmemory import upscale_model

        return upscale_model
    raise AttributeError(f"module 'tli_kernels' has no attribute {name!r}")
