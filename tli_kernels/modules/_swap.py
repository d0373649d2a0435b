"""Instance-only patching: give one module a subclass of its own class that puts a tli mixin first.

Why a subclass per instance rather than a wrapper module or a patched transformers class: the module
object stays where it was (state-dict keys, forward hooks, gradient checkpointing, `isinstance` checks
such as transformers' output capturing all keep working), nothing global changes, and undoing is one
assignment. The subclasses are cached per (mixin, class), so torch.compile sees stable types.
"""

from __future__ import annotations

import inspect

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}


def is_patched(module: nn.Module) -> bool:
    return getattr(type(module), "_tli_original_class", None) is not None


def swap_in(module: nn.Module, mixin: type) -> type:
    """Make `module` an instance of `mixin` + its class; returns the original class."""
    original = type(module)
    if is_patched(module):
        raise RuntimeError(f"{original.__name__} is already patched by tli_kernels")
    key = (mixin, original)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(
            f"Tli{original.__name__}",
            (mixin, original),
            {
                "__module__": mixin.__module__,
                "_tli_original_class": original,
                # Looked up once here rather than in forward, where torch.compile would trace inspect.
                "_tli_cache_kwarg": cache_kwarg(original),
                # Llama-style blocks pass use_cache=... to their attention, Gemma-style ones only what they got.
                "_tli_takes_use_cache": "use_cache" in inspect.signature(original.forward).parameters,
            },
        )
    module.__class__ = _SUBCLASSES[key]
    return original


def swap_out(module: nn.Module) -> None:
    """Give `module` back its original class (no-op when it is not patched)."""
    original = getattr(type(module), "_tli_original_class", None)
    if original is not None:
        module.__class__ = original


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_tli_original_class", None) or type(module)


def cache_kwarg(hf_class: type) -> str:
    """The name under which this transformers class's forward takes the KV cache: `cache` in recent
    transformers 5.x, `past_key_values` before (later accepted with a deprecation warning)."""
    params = inspect.signature(hf_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
