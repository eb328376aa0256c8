"""Every model from Flax NNX: the Linen model wrapped by `flax.nnx.bridge.ToNNX`, its parameters created already
sharded by their logical axis names, trainable with `nnx.Optimizer` and `nnx.jit`.

Flax NNX creates a variable that carries a sharding annotation sharded at once ("eager sharding"), which needs a mesh
and, for our logical names (``"embed"``, ``"mlp"``, ...), the rules that map them to mesh axes. Without them
``ToNNX(GPT(cfg), rngs=...).lazy_init(x)`` fails with "An auto mesh context or metadata is required". Turning
``flax_always_shard_variable`` off would hide the error by dropping the sharding; `LogicalSharding` supplies the
mesh and the rules instead (the same table train.py uses, with dims the mesh cannot split replicated, see
`training.parallel.fit_rules`)::

    from flax import nnx
    from flaxformer_lite import nnx as ffl_nnx

    sharding = ffl_nnx.logical_sharding(GPT(cfg), tokens)        # default mesh: every device on "data"
    with sharding:                                              # creating variables, and tracing the step
        model = ffl_nnx.to_nnx(GPT(cfg), tokens, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
        loss = train_step(model, optimizer, batch)              # an @nnx.jit function

Shape key: b batch, l length.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import Mesh

from .training.parallel import fit_rules, make_mesh


@dataclasses.dataclass
class LogicalSharding:
    """A mesh and the logical-axis rules for one model; a context manager that makes both current.

    Inside it, NNX variables with logical names are created sharded, and `nn.with_logical_constraint` on activations
    takes effect while a step is traced. Attributes: mesh, rules (logical name -> mesh axes), notes (one line per
    logical axis replicated because the mesh cannot split it evenly)."""

    mesh: Mesh
    rules: tuple
    notes: tuple[str, ...] = ()
    _open: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    def __enter__(self) -> "LogicalSharding":
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        self._open.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._open.pop().close()


def logical_sharding(model: nn.Module, *example_args, mesh: Mesh | None = None,
                     **example_kwargs) -> LogicalSharding:
    """The `LogicalSharding` for a Linen ``model`` called as ``model(*example_args, **example_kwargs)`` (e.g. tokens
    ``[b, l]``): the parameters' shapes decide which logical axes ``mesh`` can split (default mesh: every device on
    the ``data`` axis, `training.make_mesh`)."""
    mesh = make_mesh("data=-1") if mesh is None else mesh
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args, **example_kwargs)["params"])
    rules, notes = fit_rules(abstract, mesh)
    return LogicalSharding(mesh, rules, tuple(notes))


def to_nnx(model: nn.Module, *example_args, rngs: nnx.Rngs, **example_kwargs) -> Any:
    """A Linen ``model`` as an initialised NNX module (`nnx.bridge.ToNNX`), its parameters shaped by
    ``model(*example_args, **example_kwargs)`` and drawn from ``rngs``. Call it inside a `logical_sharding` context;
    the returned module is called like the Linen one (``module(tokens, deterministic=...)``) and its `nnx.Param`
    variables keep their logical names (``nnx.get_partition_spec``)."""
    if jax.sharding.get_abstract_mesh().empty or not nn.get_logical_axis_rules():
        raise ValueError("to_nnx needs a mesh and logical-axis rules to create sharded variables: call it inside "
                         "`with flaxformer_lite.nnx.logical_sharding(model, *example_args):`")
    return nnx.bridge.ToNNX(model, rngs=rngs).lazy_init(*example_args, **example_kwargs)
