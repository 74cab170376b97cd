"""Small utilities to read and edit a network's intermediate tensors with forward hooks.

What is here:
    get_module      the sub-module named ``name`` (``"model.layers.3.mlp.down_proj"``); KeyError if absent.
    get_parameter   the parameter named ``name`` (``"model.layers.3.mlp.down_proj.weight"``).
    Trace           context manager on one module: keeps its input and/or output, optionally edits the output,
                    optionally stops the forward pass right after it.
    TraceDict       the same on several modules at once (a dict name -> Trace).
    StopForward     the exception ``stop=True`` raises; ``Trace`` / ``TraceDict`` swallow it on exit.

Usage::

    with TraceDict(model, ["model.layers.2.mlp.down_proj"], retain_input=True, stop=True) as td:
        model(input_ids)          # stops after layer 2's down-projection
    keys = td["model.layers.2.mlp.down_proj"].input  # (B, T, d_ff)

Options of ``Trace`` (one line each):
    retain_input    keep the module's first positional input in ``.input``.
    retain_output   keep the module's output in ``.output`` (the first element when it is a tuple).
    edit_output     ``fn(output, name) -> output`` applied to the output (tensor, or the first tuple element).
    stop            raise ``StopForward`` after the module has run, to skip the rest of the network.
    detach          detach what is kept (default True); set False to keep the graph for gradients.

Hooks are removed when the context exits, also on errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

EditFn = Callable[[torch.Tensor, str], torch.Tensor]


class StopForward(Exception):
    """Raised by a ``Trace(stop=True)`` hook to end a forward pass early."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name``.

    Raises:
        KeyError: when the model has no such module.
    """
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"model has no module named {name!r}") from err


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Return the parameter called ``name``.

    Raises:
        KeyError: when the model has no such parameter.
    """
    try:
        return model.get_parameter(name)
    except AttributeError as err:
        raise KeyError(f"model has no parameter named {name!r}") from err


class Trace:
    """Hook one module for the duration of a ``with`` block (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.name = name
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        module = get_module(model, name)

        def hook(_mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if retain_input:
                x = args[0] if args else None
                self.input = x.detach() if (detach and x is not None) else x
            first = output[0] if isinstance(output, tuple) else output
            if edit_output is not None:
                first = edit_output(first, name)
                output = (first, *output[1:]) if isinstance(output, tuple) else first
            if retain_output:
                self.output = first.detach() if detach else first
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook)

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()


class TraceDict(dict):
    """``Trace`` on several modules; a dict ``name -> Trace``. Same options, applied to every module."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(names))
        for i, name in enumerate(names):
            self[name] = Trace(
                model,
                name,
                retain_input=retain_input,
                retain_output=retain_output,
                edit_output=edit_output,
                stop=stop and i == len(names) - 1,  # only the last module (in the order given) stops the pass
                detach=detach,
            )

    def __enter__(self) -> TraceDict:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        """Remove every hook."""
        for trace in self.values():
            trace.close()
