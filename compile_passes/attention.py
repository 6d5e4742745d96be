"""transformers' attention under torch.compile -> `chronicals::attention` (causal, by documents).

Two spellings are fused: masked scaled-dot-product attention (the sdpa path), and transformers'
eager attention (`eager_attention_forward`: the path of Gemma-2, whose soft-capped scores sdpa
cannot compute, of VaultGemma, and of any model loaded with attn_implementation="eager"):

    w = softmax(cap(q @ repeat_kv(k).transpose(2, 3) * scale) + mask, dim=-1)  [in fp32, cast back]
    out = dropout(w) @ repeat_kv(v),   cap(s) = c * tanh(s / c) with a logit softcap c (Gemma-2)

recognised from the softmax whose scores come from a q @ kT matmul: the scale as a mul or a div of
the scores or of q, the softcap's div-tanh-mul, the additive mask. Eager's softmax in fp32 (or in
the input dtype) becomes the kernels' fp32 softmax, at least as accurate; so do scores computed
from q and k upcast to fp32 (Flint). Attention sinks (gpt-oss, Flint, HunYuan-V4, MiMo-V2-Flash:
one learned logit per head) are eager attention whose softmax runs over cat([scores, sinks], -1),
less the row's max or not (a constant per row changes no softmax), and drops its last column:

    w = softmax(cat([scores, sinks.reshape(1, H, 1, 1).expand(B, H, S, 1)], -1))[..., :-1]

The sinks tensor reaches the cat through reshapes, unsqueezes, casts and one expand that keep
head h at index h: it becomes the fused op's `sinks` operand, and gets its gradient.

Under torch.compile, transformers never takes its eager shortcut of calling sdpa with
`is_causal=True` and no mask: while tracing it cannot look at the values of position_ids, so it
builds a dense (B, 1, S, S) mask (causal, and block-diagonal over packed documents; boolean for
sdpa, 0 / the dtype's minimum added to the scores for eager attention). With a mask, the fused
kernels cannot skip the tiles above the diagonal and must read the mask: every compiled decoder
pays for the whole S x S square.

The mask is a function of the graph's inputs. This pass proves what that function is, rather than
matching how one transformers version spells it: it runs the mask's subgraph on probe inputs (one
document per row; random packed documents; positions that do not start at 0) and requires it to
equal, on every probe, the causal mask of the documents that position_ids delimit (a maximal run of
consecutive positions, transformers' packed-sequence rule), with the sliding window the first probe
shows. Other inputs the mask reads get random values in each probe, so a mask that depends on them
(padding, custom masks) fails the proof and is rejected with the reason. What is proven is
rewritten to `chronicals::attention(q, k, v, position_ids | None, scale, window, softcap)`;
transformers' `repeat_kv` expansion of K/V for GQA is undone (the kernels share K/V heads).

Under dynamic shapes the probes run at the sizes Dynamo traced with (read without a guard); the
mask's subgraph is the same code at every size. Not fused, with the reason in the report:
dropout > 0 (in training), masks that are not causal-by-documents, dtypes or head dims no kernel
takes, value head dims above the query's (smaller ones, multi-head latent attention, get zero
channels); in eager attention also weights or scores used outside it (output_attentions), scores
changed by anything else (a position bias), sinks not one logit per head, and no mask (it has no
is_causal).
Inside a checkpointed layer or a layer region the mask is proven in the graph around it.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch.fx import Graph, GraphModule, Node

from chronicals import attention as packed_attention
from chronicals import reference
from chronicals.ops import attention as ops
from compile_passes._torch_api import BODY_OPERANDS, size_hint
from compile_passes.canonicalize import CASTS
from compile_passes.fusion import (
    Fusion,
    GraphFacts,
    is_call,
    literal_float,
    reject_node,
    val,
    walk_back,
)

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_SOFTMAX = aten.softmax.int
_MATMUL = aten.matmul.default
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_PROBES = 6
# Calls from chronicals' packed attention (its CPU/fp32 path runs sdpa with a mask it builds from
# cu_seq_lens) are recognised by their source file.
_PACKED_ATTENTION_SOURCE = f'File "{packed_attention.__file__}"'


def _is_candidate(node: Node) -> bool:
    return node.op == "call_function" and (
        node.target is _SDPA or (node.target is _SOFTMAX and _scores_matmul(node) is not None))


def _diagnose(node: Node) -> str:
    return "not examined (attention inside a nested graph other than a checkpointed layer or a layer region)"


@dataclasses.dataclass(frozen=True)
class _Attention:
    """One attention as the graph computes it, whichever way it is spelt."""

    q: Node
    k: Node
    v: Node
    mask: Node | None
    causal: bool
    scale: float | None
    """None: sdpa's default, head_dim ** -0.5."""
    softcap: float
    sinks: Node | None
    """(Hq,) sink logits, or None."""
    out: Node
    """The node whose value the fused op's output replaces."""
    nodes: tuple[Node, ...] = ()
    """The nodes that compute `out` from q, k, v and the mask, users first: erased with it."""


def _sdpa(node: Node) -> _Attention | str:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if args.get("dropout_p", 0.0):
        return f"attention dropout {args['dropout_p']} > 0"
    scale = args.get("scale")
    return _Attention(args["query"], args["key"], args["value"], args.get("attn_mask"),
                      bool(args.get("is_causal", False)),
                      None if scale is None else float(scale), 0.0, None, node)


# What eager attention does to the scores between q @ kT and the softmax: scale, soft-cap, mask.
_SCORE_STEPS = (aten.mul.Tensor, aten.div.Tensor, aten.tanh.default, aten.add.Tensor, *CASTS)


def _scores_matmul(softmax: Node) -> Node | None:
    """The 4-D q @ kT matmul that a softmax's scores come from through point-wise steps (and a
    concatenation with sink logits), or None (a softmax that is not attention's: a router's)."""
    x = softmax.args[0]
    while is_call(x, *CASTS):
        x = x.args[0]
    shift = _row_max_shift(x)
    if shift is not None:
        x = shift[0]
    sink = _sink_split(x)
    if sink is not None:
        x = sink[0]
    for _ in range(8):
        if not is_call(x, *_SCORE_STEPS):
            break
        x = x.args[0]
    if not is_call(x, _MATMUL):
        return None
    kt = x.args[1]
    while is_call(kt, *CASTS):
        kt = kt.args[0]
    if not (is_call(kt, aten.transpose.int) and isinstance(val(x), torch.Tensor)
            and val(x).dim() == 4 and {d % 4 for d in kt.args[1:]} == {2, 3}):
        return None
    return x


def _over_last_dim(dims: object, x: Node) -> bool:
    """A reduction's dim argument (an int or a one-element list) names x's last dim."""
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return isinstance(val(x), torch.Tensor) and dims in (-1, val(x).dim() - 1)


def _is_row_max(node: object, x: Node) -> list[Node] | None:
    """The nodes of x's max over its last dim (keepdim): max.dim's values or amax, else None."""
    if (is_call(node, operator.getitem) and node.args[1] == 0
            and is_call(node.args[0], aten.max.dim) and node.args[0].args[0] is x
            and _over_last_dim(node.args[0].args[1], x) and node.args[0].args[2:] == (True,)):
        return [node, node.args[0]]
    if (is_call(node, aten.amax.default) and node.args[0] is x
            and _over_last_dim(node.args[1], x) and node.args[2:] == (True,)):
        return [node]
    return None


def _row_max_shift(x: Node) -> tuple[Node, list[Node]] | None:
    """(y, the nodes of the shift: users first) when x is y - max(y, -1, keepdim) used by
    nothing else (gpt-oss's and MiMo's guard against bf16 overflow: a constant per row changes
    no softmax); else None."""
    if not (is_call(x, aten.sub.Tensor) and isinstance(x.args[0], Node)):
        return None
    y = x.args[0]
    row_max = _is_row_max(x.args[1], y)
    if row_max is None or set(y.users) != {x, row_max[-1]} or len(x.users) != 1:
        return None
    return y, [x, *row_max]


def _sink_split(x: Node) -> tuple[Node, Node, Node] | None:
    """(scores, the sink logits' (B, H, S, 1) operand, the concatenation) when x is cat([scores,
    sinks], -1); else None."""
    if not (is_call(x, aten.cat.default) and len(x.args[0]) == 2 and isinstance(val(x), torch.Tensor)
            and val(x).dim() == 4 and (x.args[1] if len(x.args) > 1 else 0) in (-1, 3)):
        return None
    return x.args[0][0], x.args[0][1], x


# Steps that move a per-head vector to the (B, H, S, 1) sink column, keeping head h at index h.
_SINK_STEPS = (*_RESHAPES, aten.unsqueeze.default, aten.expand.default, *CASTS)


def _sink_source(sink: Node, heads: int) -> tuple[Node, list[Node]] | str:
    """The (heads,)-element tensor that `sink` (cat's (B, H, S, 1) operand, or the (1, H, 1)
    subtrahend of Granite-SWA's sigmoid) broadcasts, and the nodes between (users first); or why
    it is not one logit per head."""
    why = "the sink logits are not one value per head broadcast over batch and queries"
    x, nodes = sink, []
    shape = _shape(val(sink)) if isinstance(val(sink), torch.Tensor) else ()
    if len(shape) < 3 or shape[1] != heads or shape[-1] != 1:
        return why
    while is_call(x, *_SINK_STEPS):
        nodes.append(x)
        x = x.args[0]
        if not isinstance(val(x), torch.Tensor):
            return why
        if x is not sink and val(x).numel() == heads:
            break
    value = val(x)
    if not (isinstance(value, torch.Tensor) and value.numel() == heads
            and value.is_floating_point()):
        return why
    # From x to `sink`: one dim of `heads` elements, every other dim 1 (order kept), up to an
    # expand, which broadcasts a value whose heads are its dim 1.
    for n in reversed(nodes):
        shape = _shape(val(n.args[0] if n.target is aten.expand.default else n))
        if heads > 1 and (heads not in shape or math.prod(shape) != heads
                          or (n.target is aten.expand.default and shape.index(heads) != 1)):
            return why
    return x, nodes


def _sink_scaled(out: Node, lse: Node, heads: int) -> tuple[Node, Node, list[Node]] | str:
    """Granite-SWA's spelling of sinks: out * sigmoid(logsumexp(scores) - sinks)[..., None]
    (the share of each query's softmax left after its head's sink logit joins the sum). The
    product, the sinks' source and the nodes between it and `out` (users first), or why not."""
    why = ("the attention scores' log-sum-exp is used other than to scale the output by "
           "sigmoid(lse - sink) (Granite-SWA's attention sinks)")
    (mul,) = out.users if len(out.users) == 1 else (None,)
    if not (is_call(mul, aten.mul.Tensor) and out in mul.args):
        return why
    factor = mul.args[1] if mul.args[0] is out else mul.args[0]
    if not isinstance(val(factor), torch.Tensor) or _shape(val(factor)) != (
            *_shape(val(out))[:3], 1):
        return why
    nodes = [mul]
    x = walk_back(factor, (aten.unsqueeze.default, *CASTS), nodes, single_use=True)
    if not (is_call(x, aten.sigmoid.default) and len(x.users) == 1):
        return why
    nodes.append(x)
    x = walk_back(x.args[0], CASTS, nodes, single_use=True)
    if not (is_call(x, aten.sub.Tensor) and len(x.users) == 1):
        return why
    nodes.append(x)
    first, sink = x.args
    first = walk_back(first, CASTS, nodes, single_use=True)
    if first is not lse or len(lse.users) != 1:
        return why
    nodes.append(lse)
    source = _sink_source(sink, heads)
    if isinstance(source, str):
        return source
    return mul, source[0], [*nodes, *source[1]]


def _scalar(node: object) -> tuple[Node, float] | None:
    """(x, f) for a node computing x * f, or x / f as f = 1 / divisor, with a Python number (or,
    under dynamic=True, the symbolic float of a module attribute Dynamo lifted to an input)."""
    if not is_call(node, aten.mul.Tensor, aten.div.Tensor):
        return None
    factor = val(node.args[1])
    f = literal_float(float(factor) if isinstance(factor, int) else factor)
    if not f:
        return None
    return node.args[0], f if node.target is aten.mul.Tensor else 1 / f


def _eager(softmax: Node) -> _Attention | str:
    """Read transformers' eager attention around its softmax (see the module docstring)."""
    if softmax.args[1] not in (-1, 3):
        return f"the softmax is over dim {softmax.args[1]}, not over the keys"
    # Back from the softmax to q @ kT, each step's node kept: casts (the kernels' scores and
    # softmax are fp32 whatever eager rounds them to), the mask, the softcap, the scale.
    scores = [softmax]

    def step(node: Node) -> Node:
        return walk_back(node, CASTS, scores)

    x, mask, softcap, scale, sinks = step(softmax.args[0]), None, 0.0, 1.0, None
    shared_ok = set()  # nodes whose several users are all the attention's (checked here)
    heads = _shape(val(softmax))[1]
    lse = next((u for u in x.users if is_call(u, aten.logsumexp.default)
                and _over_last_dim(u.args[1], u.args[0]) and not any(u.args[2:])
                and len(x.users) == 2), None)
    if lse is not None:  # Granite-SWA's sinks: checked once the output is found
        shared_ok.add(x)
    shift = _row_max_shift(x)
    if shift is not None:
        x, shift_nodes = shift
        scores += shift_nodes
        shared_ok.add(x)
    sink = _sink_split(x)
    if sink is not None:
        x, sink_column, cat = sink
        source = _sink_source(sink_column, heads)
        if isinstance(source, str):
            return source
        sinks, between = source
        scores += [cat, *between]
        x = step(x)
    if is_call(x, aten.add.Tensor) and isinstance(x.args[1], Node):
        scores.append(x)
        x, mask = step(x.args[0]), x.args[1]
    cap_out = _scalar(x)
    cap_in = (_scalar(cap_out[0].args[0])
              if cap_out and is_call(cap_out[0], aten.tanh.default) else None)
    if cap_in and cap_out[1] > 0 and math.isclose(cap_out[1] * cap_in[1], 1.0, rel_tol=1e-6):
        scores += [x, cap_out[0], cap_out[0].args[0]]
        x, softcap = step(cap_in[0]), cap_out[1]
    if _scalar(x):
        scores.append(x)
        x, scale = _scalar(x)
        x = step(x)
    if x is not _scores_matmul(softmax):
        return (f"the scores reach the softmax through {x.target}, which is not a scale, a "
                "softcap or an added mask (e.g. a position bias)")
    scores.append(x)
    q, kt = x.args
    scores.append(kt)
    while is_call(kt, *CASTS):  # autocast's, to the matmul's dtype: k is cast to q's (_rewrite)
        kt = kt.args[0]
        scores.append(kt)
    if _scalar(q):  # the scale applied to q before the matmul (erased only if it has no other use)
        scores.append(q)
        q, f = _scalar(q)
        scale *= f
    # On from the softmax to weights @ v: the sink's column dropped, casts and dropout.
    weights, w = [], softmax
    if sinks is not None:
        w = next(iter(softmax.users)) if len(softmax.users) == 1 else None
        if not _drops_last_column(w, softmax):
            return ("the softmax over the scores and the sink logits is used other than with "
                    "the sink's column dropped")
        weights.append(w)
    while len(w.users) == 1 and is_call(next(iter(w.users)), aten.dropout.default, *CASTS):
        w = next(iter(w.users))
        if w.target is aten.dropout.default and w.args[1] and w.args[2]:
            return f"attention dropout {w.args[1]} > 0 in training"
        weights.append(w)
    shared = next((n for n in (*scores[:scores.index(x) + 1], *weights)
                   if len(n.users) != 1 and n not in shared_ok), None)
    if shared in (softmax, *weights):
        return (f"the attention weights ({shared.target}) are also used outside the attention "
                "(e.g. returned with output_attentions), which the fused op does not compute")
    if shared is not None:
        return (f"the attention scores ({shared.target}) are also used outside the attention "
                "(e.g. for an attention sink), which the fused op does not compute")
    (out,) = w.users
    if not (is_call(out, _MATMUL) and out.args[0] is w):
        return "the attention weights are not multiplied with the values"
    product, scaled_by = out, []
    if lse is not None:
        scaled = _sink_scaled(out, lse, heads)
        if isinstance(scaled, str):
            return scaled
        if sinks is not None:
            return "attention sinks both in the softmax and in a scale of its output"
        out, sinks, scaled_by = scaled
    k = kt.args[0]
    q, k = _upcast_source(q, val(out).dtype), _upcast_source(k, val(out).dtype)
    if val(out).dtype != val(q).dtype:
        return f"the attention output is {val(out).dtype}, its query {val(q).dtype}"
    return _Attention(q, k, product.args[1], mask, False, scale, softcap, sinks, out,
                      (*scaled_by, product, *reversed(weights), *scores))


def _upcast_source(x: Node, dtype: torch.dtype) -> Node:
    """x's input when x only upcasts a `dtype` tensor to fp32 for the scores (Flint's
    query.float()): the kernels compute scores in fp32 from `dtype` operands. Else x."""
    if (is_call(x, *CASTS) and isinstance(val(x), torch.Tensor) and val(x).dtype == torch.float32
            and isinstance(val(x.args[0]), torch.Tensor) and val(x.args[0]).dtype == dtype):
        return x.args[0]
    return x


def _drops_last_column(w: Node | None, softmax: Node) -> bool:
    """w is softmax[..., :-1] (a slice of the last dim that ends one before its end)."""
    if not (is_call(w, aten.slice.Tensor) and w.args[0] is softmax):
        return False
    defaults = (0, None, None, 1)  # aten.slice.Tensor(x, dim, start, end, step)
    dim, start, end, step = (*w.args[1:], *defaults[len(w.args) - 1:])
    cols = _shape(val(softmax))[-1]
    return (dim in (-1, 3) and start in (0, None) and end in (-1, cols - 1)
            and step in (1, None))


def _unrepeated(kv: Node) -> Node:
    """K or V before transformers' repeat_kv: x[:, :, None].expand(B, Hk, n, S, D).reshape(B,
    Hk * n, S, D) -> x."""
    if not (isinstance(kv, Node) and kv.target in _RESHAPES):
        return kv
    expand = kv.args[0]
    if not (isinstance(expand, Node) and expand.target is aten.expand.default):
        return kv
    source = expand.args[0]
    while isinstance(source, Node) and source.target in (aten.unsqueeze.default,
                                                          aten.slice.Tensor):
        source = source.args[0]
    x, repeated, expanded = val(source), val(kv), val(expand)
    if not all(isinstance(t, torch.Tensor) for t in (x, repeated, expanded)):
        return kv
    if x.dim() != 4 or expanded.dim() != 5:
        return kv
    b, hk, s, d = _shape(x)
    n = _shape(expanded)[2]
    if _shape(expanded) != (b, hk, n, s, d) or _shape(repeated) != (b, hk * n, s, d):
        return kv
    return source


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    """The example shape Dynamo traced with (symbolic sizes read without a guard)."""
    return tuple(size_hint(s) for s in t.shape)


def _ancestors(node: Node) -> list[Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _subgraph(mask: Node) -> tuple[GraphModule, list[Node]] | str:
    """The mask's subgraph as a module of its placeholders, or why it cannot be run."""
    nodes = _ancestors(mask)
    graph, env, inputs, root = Graph(), {}, [], torch.nn.Module()
    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            inputs.append(n)
        elif n.op == "get_attr":
            # A constant tensor: transformers 5.17's eager mask is where(allowed, tensor(0.0), min).
            value = mask.graph.owning_module
            for name in n.target.split("."):
                value = getattr(value, name)
            if not isinstance(value, torch.Tensor):
                return f"the mask is computed from {n.target}, a {type(value).__name__}"
            setattr(root, n.name, value.clone())  # probes cannot change the model's
            env[n] = graph.get_attr(n.name)
        elif n.op == "call_function":
            # detach_ (of transformers 5.17's lifted constant) changes no value.
            impure = n.is_impure() and n.target is not aten.detach_.default
            if impure or torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()):
                return f"the mask is computed by {n.target}, which is random or mutates"
            env[n] = graph.node_copy(n, lambda a: env[a])
        else:
            return f"the mask is computed by a {n.op} node ({n.name})"
    graph.output(env[mask])
    return GraphModule(root, graph), inputs


def _probe_positions(shape: tuple[int, int], probe: int, gen: torch.Generator) -> torch.Tensor:
    """Position ids for probe i: 0, one document per row; 1, positions starting at 7; then random
    packed documents (some starting at random offsets)."""
    rows, seq = shape
    pos = torch.arange(seq).repeat(rows, 1)
    if probe == 0:
        return pos
    if probe == 1:
        return pos + 7
    for row in range(rows):
        cuts = torch.randint(1, max(seq, 2), (probe,), generator=gen).unique().tolist()
        start = 0
        for end in [*cuts, seq]:
            if end > start:
                offset = int(torch.randint(0, 3, (1,), generator=gen)) if probe % 2 else 0
                pos[row, start:end] = torch.arange(end - start) + offset
                start = end
    return pos


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    shape = _shape(t)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if t.is_floating_point():
        return torch.randn(shape, generator=gen).to(t.dtype)
    return torch.randint(0, 5, shape, generator=gen).to(t.dtype)


def _allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """A boolean or additive mask as 'key visible' booleans; None for other additive values."""
    if mask.dtype == torch.bool:
        return mask
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | blocked).all()):
        return None
    return mask == 0


def _window(allowed: torch.Tensor) -> int:
    """The sliding window of a one-document-per-row mask: keys visible to the last query."""
    seq = allowed.shape[-1]
    visible = int(allowed[..., -1, :].sum(-1).max())
    return 0 if visible >= seq else visible


def _prove(mask: Node, batch: int, seq: int) -> tuple[Node | None, int] | str:
    """(the position_ids node the mask is a function of, or None; window) or why not proven."""
    built = _subgraph(mask)
    if isinstance(built, str):
        return built
    module, inputs = built
    ints = [
        p for p in inputs
        if isinstance(val(p), torch.Tensor) and not val(p).is_floating_point()
        and val(p).dtype != torch.bool and val(p).dim() == 2
        and _shape(val(p)) in ((batch, seq), (1, seq))
    ]
    failures = []
    for positions in [None, *ints] if not ints else ints:
        why = _check_candidate(module, inputs, positions, batch, seq)
        if isinstance(why, int):
            return positions, why
        failures.append(why)
    return failures[0]


def _check_candidate(module: GraphModule, inputs: list[Node], positions: Node | None,
                     batch: int, seq: int) -> int | str:
    gen = torch.Generator().manual_seed(0)
    window = None
    for probe in range(_PROBES if positions is not None else 2):
        pos = None
        args = []
        for p in inputs:
            example = val(p)
            if p is positions:
                pos = _probe_positions(_shape(example), probe, gen).to(example.dtype)
                args.append(pos.to(example.device))
            elif isinstance(example, torch.Tensor):
                args.append(_random_like(example, gen).to(example.device))
            elif isinstance(example, torch.SymInt):
                args.append(size_hint(example))
            else:
                args.append(example)
        with torch.no_grad():
            got = module(*args)
        if not isinstance(got, torch.Tensor) or got.dim() != 4 or got.shape[-2:] != (seq, seq):
            return "the attention mask is not a (B, H, S, S) tensor"
        allowed = _allowed(got.cpu())
        if allowed is None:
            return "the additive mask holds values other than 0 and the dtype's minimum"
        if window is None:
            window = _window(allowed)
        expected = reference.attention_mask(pos, batch, seq, window, torch.device("cpu"))
        if not bool((allowed == expected).all()):
            others = ", ".join(p.name for p in inputs if p is not positions)
            return (
                "the mask is not causal within the documents of position_ids"
                + ("" if positions is None else f" ({positions.name})")
                + (f" for every value of the other graph inputs it reads ({others})"
                   if others else "")
            )
    return window


def _finalize(graph: torch.fx.Graph, facts: GraphFacts) -> None:
    regions: dict[GraphModule, list[Node]] = {}
    for node in list(graph.nodes):
        if _is_candidate(node):
            _rewrite(node, _Region())
        elif node.op == "call_function" and node.target in BODY_OPERANDS:
            regions.setdefault(getattr(graph.owning_module, node.args[0].target), []).append(node)
    # A layer region's body is shared by every layer's call: rewritten once, for all of them.
    for body, calls in regions.items():
        region = _Region(calls, body)
        for inner in list(body.graph.nodes):
            if _is_candidate(inner):
                _rewrite(inner, region)



class _Region:
    """Where an attention node sits: the top graph, or a body that one or more calls run (a
    checkpointed layer, or a layer region whose body all layers share), whose placeholders are
    the calls' operands. A mask is proven where it is computed, in the graph around the region;
    the masks the calls pass must be proven the same function of the same positions (at rows no
    longer than its window, a sliding-window mask is the causal one), which are then passed into
    the region as one more operand of every call."""

    def __init__(self, calls: list[Node] = (), body: GraphModule | None = None) -> None:
        self.calls, self.body = list(calls), body
        self.start = BODY_OPERANDS[self.calls[0].target] if self.calls else 0

    def _placeholders(self) -> list[Node]:
        return [n for n in self.body.graph.nodes if n.op == "placeholder"]

    def outer(self, node: Node) -> list[Node]:
        """The nodes of the enclosing graph that a body placeholder stands for, one for each
        different node the calls pass (Gemma-2's sliding and global layers pass two masks)."""
        if not self.calls or node.op != "placeholder":
            return [node]
        index = self.start + self._placeholders().index(node)
        return list(dict.fromkeys(call.args[index] for call in self.calls))

    def inner(self, node: Node | None) -> Node | None:
        """`node` of the enclosing graph as seen inside the region (added as an operand)."""
        if not self.calls or node is None:
            return node
        placeholders = self._placeholders()
        operands = list(self.calls[0].args[self.start:])
        if node in operands and all(c.args[self.start + operands.index(node)] is node
                                    for c in self.calls):
            return placeholders[operands.index(node)]
        with self.body.graph.inserting_after(placeholders[-1]):
            placeholder = self.body.graph.placeholder(f"{node.name}_positions")
        placeholder.meta.update(node.meta)
        for call in self.calls:
            call.args = (*call.args, node)
        return placeholder


def _rewrite(node: Node, region: _Region) -> None:
    """Fuse the attention that candidate `node` (sdpa, or eager attention's softmax) marks, or
    record why not."""
    if _PACKED_ATTENTION_SOURCE in (node.meta.get("stack_trace") or ""):
        return reject_node(node, f"{packed_attention.PACKED_ATTENTION}'s reference path: its mask comes from the "
                                 "packer's cu_seq_lens, already one block per document",
                           declined=True)
    attn = _sdpa(node) if node.target is _SDPA else _eager(node)
    if isinstance(attn, str):
        return reject_node(node, attn)
    q, k, v, mask = attn.q, attn.k, attn.v, attn.mask
    qv = val(q)
    if not all(isinstance(val(t), torch.Tensor) and val(t).dim() == 4 for t in (q, k, v)):
        return reject_node(node, "query, key and value are not all (B, H, S, D) tensors")
    batch, _, seq, head_dim = _shape(qv)
    if _shape(val(k))[2] != seq:
        return reject_node(node, "keys and queries cover different positions (a KV cache)")
    value_dim = _shape(val(v))[3]
    if value_dim > head_dim:
        return reject_node(node, f"value head dim {value_dim} exceeds the query's {head_dim}")
    k_source, v_source = _unrepeated(k), _unrepeated(v)
    if (k_source is k) == (v_source is v):  # both repeated by repeat_kv, or neither
        k, v = k_source, v_source
    why = ops.unsupported(qv, val(k))
    if why:
        return reject_node(node, why)
    if mask is None:
        if not attn.causal:
            return reject_node(node, "attention without a mask and not causal (not a decoder)")
        positions, window = None, 0
    elif attn.causal:
        return reject_node(node, "attention with both a mask and is_causal")
    else:
        proofs = list(dict.fromkeys(_prove(m, batch, seq) for m in region.outer(mask)))
        why = next((p for p in proofs if isinstance(p, str)), None)
        if why:
            return reject_node(node, why)
        if len(proofs) > 1:
            proven = "; ".join(f"window {w or 'none'}, positions {p.name if p else 'none'}"
                               for p, w in proofs)
            return reject_node(node, f"the layers' calls pass masks proven different ({proven})")
        positions, window = region.inner(proofs[0][0]), proofs[0][1]
    scale = head_dim ** -0.5 if attn.scale is None else attn.scale
    graph = node.graph
    with graph.inserting_before(attn.out):
        if val(k).dtype != qv.dtype:
            k = graph.call_function(aten.to.dtype, (k, qv.dtype))
        if value_dim < head_dim:
            # Multi-head latent attention (DeepSeek-V2/V3): q and k carry rotary channels that v
            # has not. V gets zero channels up to q's head dim and the output's are sliced off:
            # the same attention (the zero channels add nothing to dS), in every kernel.
            v = graph.call_function(aten.constant_pad_nd.default, (v, [0, head_dim - value_dim]))
        sinks = attn.sinks
        if sinks is not None and _shape(val(sinks)) != (qv.shape[1],):
            sinks = graph.call_function(aten.reshape.default, (sinks, [qv.shape[1]]))
        fused = graph.call_function(torch.ops.chronicals.attention.default,
                                    (q, k, v, positions, scale, window, attn.softcap, sinks))
        out = graph.call_function(operator.getitem, (fused, 0))
        if value_dim < head_dim:
            out = graph.call_function(aten.slice.Tensor, (out, 3, 0, value_dim))
    if "stack_trace" in node.meta:
        fused.meta["stack_trace"] = node.meta["stack_trace"]
    out.meta.update(attn.out.meta)
    attn.out.replace_all_uses_with(out)
    for n in attn.nodes or (attn.out,):
        if not n.users:
            graph.erase_node(n)
    return None


FUSION = Fusion(
    name="attention",
    register=lambda pattern_pass, dtypes: None,
    fused_ops=lambda: (torch.ops.chronicals.attention.default,),
    is_candidate=_is_candidate,
    diagnose=_diagnose,
    finalize=_finalize,
)
