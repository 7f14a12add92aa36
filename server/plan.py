"""Read a loaded Keras model into an execution plan that stays exact under padding.

The plan is the model's layer graph in topological order, with every unidirectional recurrent layer
swapped for a *state-passing* twin (same weights, `return_sequences=True, return_state=True,
stateful=False`). Running it on a post-padded batch with the true lengths gives, for each row, what
the model gives for that sequence alone:

* a causal stack never looks ahead, so padding after a row's end cannot reach its real steps;
* recurrent layers get the length mask, so their final state is the state at the last real step;
* a recurrent layer that returned one vector per sequence now returns one per step; the layers
  after it run on every step's vector (flattened into the batch axis), and the sequence-level
  answer is read at `length - 1`. The same per-step values are the answers for each prefix.

Stacks with `Bidirectional` or `go_backwards` are exact under a mask but not causal: they run in
*natural* mode (original layers, mask given) and cannot stream. Any layer we cannot prove exact
turns the plan into *equal-length* mode: the original model on batches of one length only.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from rnnserve.server.errors import InvalidInput


class Mode(enum.Enum):
    CAUSAL = "causal"  # state-passing; streams; mixed lengths share batches
    NATURAL = "natural"  # exact under a mask, not causal; mixed lengths, no streaming
    EQUAL_LENGTH = "equal_length"  # unproven layers: batch equal lengths only


class Role(enum.Enum):
    RECURRENT = "recurrent"  # causal recurrent layer, replaced by its state-passing twin
    MASKED_RECURRENT = "masked_recurrent"  # Bidirectional / go_backwards: called with the mask
    STEPWISE = "stepwise"  # acts on each timestep on its own
    SAMPLEWISE = "samplewise"  # acts on one sequence-level vector (after a collapse)


class Time(enum.Enum):
    """Where a tensor's time axis stands, in the original model."""

    TEMPORAL = "temporal"  # [B, T, ...]
    COLLAPSED = "collapsed"  # [B, ...]: one value per sequence
    OPAQUE = "opaque"  # produced by a layer we do not understand


# Layers that act on each timestep on their own when their axis argument avoids the time axis.
_STEPWISE: tuple[type[Any], ...] = (
    keras.layers.Dense,
    keras.layers.Activation,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.LayerNormalization,
    keras.layers.BatchNormalization,
    keras.layers.UnitNormalization,
    keras.layers.Normalization,
    keras.layers.Rescaling,
    keras.layers.Identity,
    keras.layers.Masking,
    keras.layers.Embedding,
    keras.layers.TimeDistributed,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
)
_RECURRENT_CELLS: tuple[type[Any], ...] = (
    keras.layers.LSTMCell,
    keras.layers.GRUCell,
    keras.layers.SimpleRNNCell,
)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    per_step: bool  # one row per timestep (many-to-many) or one per sequence
    shape: tuple[int, ...]  # trailing shape of one row
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateSpec:
    layer: str
    sizes: tuple[int, ...]  # one entry per state tensor (h, or h and c)


@dataclass
class PlanStep:
    layer: Any  # the keras layer to call (a state-passing twin for RECURRENT)
    original: Any  # the model's own layer, for its mask rules
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    role: Role
    input_shape: tuple[Any, ...]  # of the (first) input, as the original model saw it
    merge: bool  # takes a list of tensors
    takes_mask: bool
    state_start: int = 0
    state_count: int = 0


@dataclass
class Plan:
    mode: Mode
    input_key: int
    step_shape: tuple[int, ...]  # one timestep: (D,) or () for token ids
    input_dtype: str  # "float32" or "int32"
    fixed_length: int | None
    vocab_size: int | None  # token-id models: ids must be below it
    outputs: tuple[OutputSpec, ...]
    output_keys: tuple[int, ...]
    steps: list[PlanStep] = field(default_factory=list)
    states: tuple[StateSpec, ...] = ()
    notes: tuple[str, ...] = ()
    model: Any = None  # the original model, called directly in EQUAL_LENGTH mode

    @property
    def can_stream(self) -> bool:
        return self.mode is Mode.CAUSAL

    @property
    def mixed_lengths(self) -> bool:
        return self.mode is not Mode.EQUAL_LENGTH

    @property
    def state_sizes(self) -> list[int]:
        return [size for spec in self.states for size in spec.sizes]


class _Unsupported(Exception):
    """A layer or wiring the exact planner does not cover; the model falls back."""


def _axes(layer: Any) -> list[int]:
    axis = getattr(layer, "axis", -1)
    if isinstance(axis, int):
        return [axis]
    return [int(a) for a in axis]


def _avoids_time_axis(layer: Any, rank: int) -> bool:
    """True if every axis the layer mixes over is a feature axis of a [B, T, ...] tensor."""
    if not hasattr(layer, "axis"):
        return True
    return all((a % rank) >= 2 for a in _axes(layer))


def _recurrent_kind(layer: Any) -> Role:
    if isinstance(layer, keras.layers.Bidirectional):
        for inner in (layer.forward_layer, layer.backward_layer):
            if type(inner.cell) not in _RECURRENT_CELLS:
                raise _Unsupported(f"Bidirectional over {type(inner.cell).__name__}")
        return Role.MASKED_RECURRENT
    if type(layer.cell) not in _RECURRENT_CELLS:
        raise _Unsupported(f"recurrent cell {type(layer.cell).__name__}")
    if layer.go_backwards and layer.return_sequences:
        # Its outputs come in reverse time order, so padding at the end lands at their front.
        raise _Unsupported(f"layer {layer.name} returns a sequence backwards (go_backwards)")
    return Role.MASKED_RECURRENT if layer.go_backwards else Role.RECURRENT


def _state_sizes(layer: Any) -> tuple[int, ...]:
    size = layer.cell.state_size
    return tuple(int(s) for s in size) if isinstance(size, list | tuple) else (int(size),)


def _copy_with(layer: Any, input_shape: tuple[Any, ...], **overrides: Any) -> Any:
    """The same layer with the same weights, rebuilt from its config with `overrides`."""
    config = layer.get_config()
    config.update(overrides)
    copy = type(layer).from_config(config)
    copy.build((None, None, *input_shape[2:]))
    copy.set_weights(layer.get_weights())
    return copy


def _accepts(layer: Any, name: str) -> bool:
    return name in inspect.signature(layer.call).parameters


def _graph(model: Any) -> Any:
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    if graph is None or not hasattr(graph, "_nodes_by_depth"):
        raise InvalidInput("only Sequential and Functional Keras models are supported")
    return graph


def _positional_tensors(node: Any) -> list[Any]:
    return [a for a in keras.tree.flatten(node.arguments.args) if isinstance(a, keras.KerasTensor)]


def _ordered_nodes(graph: Any) -> list[Any]:
    """The layer calls that compute the outputs, inputs first.

    Keras records the ops that compute masks (`not_equal`, `any`) as graph nodes too; walking back
    from the outputs along positional arguments leaves them out, since we compute masks ourselves.
    """
    needed: set[int] = set()
    pending = list(graph.outputs)
    while pending:
        operation, node_index, _ = pending.pop()._keras_history
        node = operation._inbound_nodes[node_index]
        if id(node) not in needed:
            needed.add(id(node))
            pending.extend(_positional_tensors(node))
    return [
        node
        for depth in sorted(graph._nodes_by_depth, reverse=True)
        for node in graph._nodes_by_depth[depth]
        if id(node) in needed and node.operation and not node.is_input
    ]


def _node_inputs(node: Any) -> tuple[list[Any], bool]:
    """The node's input tensors and whether they come as one list (merge layers)."""
    args, kwargs = node.arguments.args, node.arguments.kwargs
    for key, value in kwargs.items():
        tensors = [v for v in keras.tree.flatten(value) if isinstance(v, keras.KerasTensor)]
        # Keras records the mask it propagated from the inputs as `mask=`; we recompute those
        # by the same rules. A mask the model computes itself and passes in (`mask=...`) is
        # one we would drop: such a layer is not proven exact. (The self-check's random
        # probes need not hit the values such a mask depends on.)
        if key == "mask" and _propagated(value, args):
            continue
        if tensors:
            raise _Unsupported(f"layer {node.operation.name} takes tensor argument {key!r}")
    if len(args) != 1:
        raise _Unsupported(f"layer {node.operation.name} takes {len(args)} positional inputs")
    arg = args[0]
    if isinstance(arg, keras.KerasTensor):
        return [arg], False
    if isinstance(arg, list | tuple) and all(isinstance(a, keras.KerasTensor) for a in arg):
        return list(arg), True
    raise _Unsupported(f"layer {node.operation.name} takes a nested input")


def _propagated(mask: Any, args: Any) -> bool:
    """Whether `mask` is the one Keras propagates with the positional inputs. In a model as
    built, it is that very tensor; in a model loaded from a file, the recorded mask ops and
    the ones recomputed while rebuilding are separate copies: compared op by op."""
    masks = keras.tree.flatten(mask)
    inputs = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)]
    if len(masks) != len(inputs):
        return False
    return all(
        _same_computation(m, getattr(t, "_keras_mask", None)) if m is not None else True
        for m, t in zip(masks, inputs, strict=True)
    )


def _same_computation(a: Any, b: Any, depth: int = 16) -> bool:
    """Whether two symbolic tensors are computed by the same ops (configs equal up to their
    names) from the same tensors."""
    if a is b:
        return True
    if not (isinstance(a, keras.KerasTensor) and isinstance(b, keras.KerasTensor)) or not depth:
        return False
    (op_a, node_a, out_a), (op_b, node_b, out_b) = a._keras_history, b._keras_history
    if type(op_a) is not type(op_b) or out_a != out_b or _config(op_a) != _config(op_b):
        return False
    parts = []
    for op, index in ((op_a, node_a), (op_b, node_b)):
        arguments = op._inbound_nodes[index].arguments
        parts.append(keras.tree.flatten((arguments.args, arguments.kwargs)))
    if len(parts[0]) != len(parts[1]):
        return False
    for x, y in zip(*parts, strict=True):
        if isinstance(x, keras.KerasTensor) or isinstance(y, keras.KerasTensor):
            if not _same_computation(x, y, depth - 1):
                return False
        elif not _same_value(x, y):
            return False
    return True


def _same_value(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    try:
        return bool(np.all(np.equal(x, y)))  # arrays too
    except Exception:  # values numpy does not compare
        return bool(x == y)


def _config(op: Any) -> dict[str, Any]:
    try:
        config = dict(op.get_config())
    except Exception:  # an op that does not describe itself: never taken as equal
        return {"unknown": id(op)}
    config.pop("name", None)
    return config


def _output_names(graph: Any) -> list[str]:
    names: list[str] = []
    for name in graph.output_names:
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}_{n}"
        names.append(unique)
    return names


def build_plan(model: Any, *, allow_code: bool = False, equal_length_because: str = "") -> Plan:
    """Plan `model` for serving; raises InvalidInput for models the server cannot serve at all.

    `equal_length_because` forces the equal-length plan, giving the reason (a failed self-check).
    """
    graph = _graph(model)
    if len(graph.inputs) != 1:
        raise InvalidInput(f"models with one input are supported, this one has {len(graph.inputs)}")
    (inp,) = graph.inputs
    shape = tuple(inp.shape)
    if len(shape) < 2:
        raise InvalidInput(f"input must be [batch, time, ...], the model's is {shape}")
    dtype = "int32" if np.issubdtype(np.dtype(inp.dtype), np.integer) else "float32"
    step_shape = tuple(int(d) if d is not None else -1 for d in shape[2:])
    if -1 in step_shape:
        raise InvalidInput(
            f"every dimension after time must be fixed, the model's input is {shape}"
        )
    fixed_length = int(shape[1]) if shape[1] is not None else None
    names = _output_names(graph)
    nodes = _ordered_nodes(graph)
    for node in nodes:
        if isinstance(node.operation, keras.layers.Lambda) and not allow_code:
            raise InvalidInput(
                f"layer {node.operation.name!r} is a Lambda layer (arbitrary code); "
                "start the server with --allow-code to serve it"
            )
    embeddings = [n.operation for n in nodes if isinstance(n.operation, keras.layers.Embedding)]
    # Every id must fit every Embedding it meets (out of range, XLA would clamp it silently).
    vocab_size = (
        min(int(e.input_dim) for e in embeddings) if dtype == "int32" and embeddings else None
    )
    base = dict(
        input_key=id(inp),
        vocab_size=vocab_size,
        step_shape=step_shape,
        input_dtype=dtype,
        fixed_length=fixed_length,
        output_keys=tuple(id(t) for t in graph.outputs),
    )
    try:
        if equal_length_because:
            raise _Unsupported(equal_length_because)
        return _exact_plan(graph, nodes, names, base)
    except _Unsupported as why:
        return _equal_length_plan(model, graph, names, base, str(why))


def _output_spec(name: str, tensor: Any, time: Time) -> OutputSpec:
    per_step = time is Time.TEMPORAL
    trailing = tuple(tensor.shape[2:] if per_step else tensor.shape[1:])
    return OutputSpec(name=name, per_step=per_step, shape=tuple(int(d or 0) for d in trailing))


def _exact_plan(graph: Any, nodes: Sequence[Any], names: list[str], base: dict[str, Any]) -> Plan:
    time: dict[int, Time] = {base["input_key"]: Time.TEMPORAL}
    steps: list[PlanStep] = []
    states: list[StateSpec] = []
    causal = True
    for node in nodes:
        layer = node.operation
        tensors, merge = _node_inputs(node)
        in_time = {time[id(t)] for t in tensors}
        if len(in_time) != 1:
            raise _Unsupported(f"layer {layer.name} mixes per-step and per-sequence inputs")
        (t_in,) = in_time
        if isinstance(layer, keras.layers.RNN | keras.layers.Bidirectional):
            if t_in is not Time.TEMPORAL:
                raise _Unsupported(f"recurrent layer {layer.name} runs over a non-sequence input")
            role = _recurrent_kind(layer)
            returns_sequences = bool(layer.return_sequences)
            if getattr(layer, "return_state", False):
                raise _Unsupported(f"layer {layer.name} returns its state as a model tensor")
            t_out = Time.TEMPORAL if returns_sequences else Time.COLLAPSED
            if role is Role.MASKED_RECURRENT:
                causal = False
        elif isinstance(layer, _STEPWISE):
            role = Role.STEPWISE if t_in is Time.TEMPORAL else Role.SAMPLEWISE
            rank = len(tensors[0].shape)
            if role is Role.STEPWISE and not _avoids_time_axis(layer, rank):
                raise _Unsupported(f"layer {layer.name} ({type(layer).__name__}) mixes timesteps")
            if isinstance(layer, keras.layers.TimeDistributed) and _accepts(layer.layer, "mask"):
                raise _Unsupported(f"TimeDistributed {layer.name} wraps a layer that takes a mask")
            if isinstance(layer, keras.layers.Embedding) and id(tensors[0]) != base["input_key"]:
                raise _Unsupported(f"Embedding {layer.name} is not applied to the model input")
            t_out = t_in
        else:
            raise _Unsupported(f"layer {layer.name} ({type(layer).__name__}) is not proven exact")
        step = PlanStep(
            layer=layer,
            original=layer,
            inputs=tuple(id(t) for t in tensors),
            outputs=tuple(id(t) for t in node.outputs),
            role=role,
            input_shape=tuple(tensors[0].shape),
            merge=merge,
            takes_mask=_accepts(layer, "mask"),
        )
        if role is Role.RECURRENT:
            sizes = _state_sizes(layer)
            step.state_start = sum(len(s.sizes) for s in states)
            step.state_count = len(sizes)
            states.append(StateSpec(layer=layer.name, sizes=sizes))
        steps.append(step)
        for out in node.outputs:
            time[id(out)] = t_out
    outputs = tuple(
        _output_spec(n, t, time[id(t)]) for n, t in zip(names, graph.outputs, strict=True)
    )
    if causal:
        for step in steps:
            if step.role is Role.RECURRENT:  # the state-passing twin
                step.layer = _copy_with(
                    step.original,
                    step.input_shape,
                    return_sequences=True,
                    return_state=True,
                    stateful=False,
                    unroll=False,
                )
        return Plan(mode=Mode.CAUSAL, steps=steps, states=tuple(states), outputs=outputs, **base)
    for step in steps:
        if step.role is Role.RECURRENT:  # a forward layer in a non-causal stack: mask, no state
            step.role = Role.MASKED_RECURRENT
        if getattr(step.original, "stateful", False):
            if isinstance(step.original, keras.layers.Bidirectional):
                raise InvalidInput(
                    f"stateful Bidirectional layer {step.original.name} cannot serve"
                )
            step.layer = _copy_with(step.original, step.input_shape, stateful=False)
    note = "not causal (Bidirectional or go_backwards): exact with padding, cannot stream"
    return Plan(mode=Mode.NATURAL, steps=steps, outputs=outputs, notes=(note,), **base)


def _equal_length_plan(
    model: Any, graph: Any, names: list[str], base: dict[str, Any], why: str
) -> Plan:
    for layer in model._flatten_layers(include_self=False, recursive=True):  # nested ones too
        if getattr(layer, "stateful", False):
            raise InvalidInput(
                f"layer {layer.name} is stateful and the model holds a layer the server "
                f"cannot run exactly under padding ({why}); re-save it with stateful=False"
            )
    per_step = _follows_input_length(model, graph, base)
    outputs = tuple(
        _output_spec(name, tensor, Time.TEMPORAL if step else Time.OPAQUE)
        for name, tensor, step in zip(names, graph.outputs, per_step, strict=True)
    )
    note = f"batches equal lengths only: {why}"
    if base["fixed_length"] is not None:
        note += f"; sequences are zero-padded to the model's fixed length {base['fixed_length']}"
    return Plan(mode=Mode.EQUAL_LENGTH, outputs=outputs, notes=(note,), model=model, **base)


def _follows_input_length(model: Any, graph: Any, base: dict[str, Any]) -> list[bool]:
    """Which outputs have one row per input timestep, so that trimming them to a sequence's
    length is right. Without a proof of which axis is time, only an output whose second axis
    is the input's length is (an UpSampling1D or a Reshape makes it longer: returned whole)."""
    rank_ok = [len(t.shape) >= 3 for t in graph.outputs]
    if base["fixed_length"] is not None:
        fixed = base["fixed_length"]
        return [ok and t.shape[1] == fixed for ok, t in zip(rank_ok, graph.outputs, strict=True)]
    follows = rank_ok
    for length in (7, 11):  # two, so that no output matches by chance
        probe = keras.KerasTensor((1, length, *base["step_shape"]), dtype=base["input_dtype"])
        try:
            specs = keras.tree.flatten(model.compute_output_spec(probe))
        except Exception:  # a layer without shape inference: trim nothing
            return [False] * len(follows)
        follows = [f and s.shape[1] == length for f, s in zip(follows, specs, strict=True)]
    return follows
