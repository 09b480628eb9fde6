"""A trained gpubp.Sequential out to ONNX and PyTorch, and a PyTorch MLP in to gpubp.

    gpubp.export.to_onnx(net, "model.onnx", probabilities=True)    # onnx, run by onnxruntime or any ONNX runtime
    module = gpubp.export.to_torch(net)                             # torch.nn.Sequential(Linear, ReLU, ...)
    net = gpubp.export.from_torch(module, backend="auto")           # and back

Each Dense layer is the same map in all three: Z = A_prev · Wᵀ + b, A = g(Z), with W of shape (out, in), which
is both nn.Linear's weight layout and ONNX Gemm's B with transB = 1. The activations map one to one:

    gpubp        ONNX                  torch.nn
    identity     (no node)             (no module; nn.Identity is accepted by from_torch)
    relu         Relu                  ReLU
    leaky_relu   LeakyRelu(alpha)      LeakyReLU(negative_slope)      (the layer's alpha, whatever it is; in
                 float64: Z · Where(Z > 0, 1, alpha), as LeakyRelu's alpha attribute is only a float32)
    sigmoid      Sigmoid               Sigmoid
    tanh         Tanh                  Tanh

The exported network computes in the model's dtype. A model trained with a reduced GEMM precision
(Sequential(precision="bf16"), ...) is exported with its float32 parameters, so the ONNX or torch outputs differ
from its net.predict by that precision's rounding.

onnx and torch are optional: each function imports its library when called and says how to install it.
"""
import numbers
import os

import numpy as np

from . import activations as acts

ONNX_OPSET = 17          # the default: supported by every onnxruntime of the last years
MIN_ONNX_OPSET = 11      # Gemm's bias input is optional from opset 11 (a layer with bias=False needs that)

_ONNX_ACTIVATIONS = {acts.RELU: "Relu", acts.LEAKY_RELU: "LeakyRelu", acts.SIGMOID: "Sigmoid", acts.TANH: "Tanh"}


def _check_net(net, what):
    from .network import Sequential
    if not isinstance(net, Sequential):
        raise TypeError(f"{what}: expected a gpubp.Sequential, got {type(net).__name__}")


def _import(module, extra):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for this ({exc}); install it with pip install gpubp[{extra}]") from None


# ---- ONNX ---------------------------------------------------------------------------------------------------------
def _scaling(value, name, width):
    """(mean, std) as two float64 arrays of `width`, std nonzero; None stays None."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name}: expected a pair (mean, std) of arrays of length {width}, got {type(value).__name__}")
    pair = []
    for part, label in zip(value, ("mean", "std")):
        try:
            a = np.asarray(part, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"{name} {label}: expected numbers, got {part!r}") from None
        if a.size == 1:
            a = np.full(width, a[0])
        if a.shape != (width,) or not np.isfinite(a).all():
            raise ValueError(f"{name} {label}: expected {width} finite numbers, got shape {a.shape}")
        pair.append(a)
    if np.any(pair[1] == 0):
        raise ValueError(f"{name} std: expected nonzero values, got a 0")
    return tuple(pair)


def to_onnx(net, path=None, *, opset=ONNX_OPSET, probabilities=False, input_scaling=None, output_scaling=None):
    """The network as an ONNX model (onnx.ModelProto), written to `path` when given; returns the model.

    Graph: input "X" (N, in) with N dynamic, in the network's dtype (float32 or float64); per layer one Gemm
    (A_prev · Wᵀ + b, transB = 1, W and b as initializers) and its activation node; output "Y" (N, out), what
    net.predict returns.
    probabilities=True: the output is "probabilities" instead: Softmax over the outputs for an identity output
    layer with several outputs (a softmax_ce network), Sigmoid for one identity output (a logit); a sigmoid
    output layer already gives probabilities and is kept as it is; other output activations are refused.
    input_scaling=(mean, std): the graph first computes (X − mean) / std (a standardisation fitted in training);
    output_scaling=(mean, std): the output becomes Y · std + mean (targets standardised in training).
    """
    _check_net(net, "to_onnx net")
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
        raise ValueError(f"opset: expected an integer, got {opset!r}")
    if not isinstance(probabilities, bool):
        raise TypeError(f"probabilities: expected True or False, got {probabilities!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path or None, got {type(path).__name__}")
    input_scaling = _scaling(input_scaling, "input_scaling", net.n_in)
    output_scaling = _scaling(output_scaling, "output_scaling", net.n_out)
    last = net.layers[-1]
    if probabilities and last.act not in (acts.IDENTITY, acts.SIGMOID):
        raise ValueError(f"probabilities=True: needs an identity (logits) or sigmoid output layer, got "
                         f"{last.activation!r}")
    if probabilities and output_scaling is not None:
        raise ValueError("output_scaling: not with probabilities=True (probabilities are not rescaled)")
    onnx = _import("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    newest = onnx.defs.onnx_opset_version()
    if not MIN_ONNX_OPSET <= opset <= newest:
        raise ValueError(f"opset: expected {MIN_ONNX_OPSET} to {newest} (this onnx's newest; Gemm's optional "
                         f"bias needs {MIN_ONNX_OPSET}), got {opset}")

    dtype = net.dtype
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    nodes, initializers = [], []

    def constant(name, value):
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, name, **attributes):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    current = "X"
    if input_scaling is not None:
        current = node("Sub", [current, constant("input_mean", input_scaling[0])], "input_centred")
        current = node("Div", [current, constant("input_std", input_scaling[1])], "input_scaled")
    for i, (layer, p) in enumerate(zip(net.layers, net.get_params())):
        inputs = [current, constant(f"dense{i}_W", p["W"])] + ([constant(f"dense{i}_b", p["b"])] if "b" in p else [])
        current = node("Gemm", inputs, f"dense{i}_gemm", transB=1)
        if layer.act == acts.LEAKY_RELU and dtype == np.float32:
            current = node("LeakyRelu", [current], f"dense{i}_leaky_relu", alpha=layer.alpha)
        elif layer.act == acts.LEAKY_RELU:
            # LeakyRelu's alpha attribute is a float32: a float64 model would lose alpha's low bits (1e-8
            # relative). Z · (Z > 0 ? 1 : alpha) with alpha as a float64 constant is exact, and is our reference.
            positive = node("Greater", [current, constant(f"dense{i}_zero", 0.0)], f"dense{i}_positive")
            slope = node("Where", [positive, constant(f"dense{i}_one", 1.0), constant(f"dense{i}_alpha", layer.alpha)],
                         f"dense{i}_slope")
            current = node("Mul", [current, slope], f"dense{i}_leaky_relu")
        elif layer.act != acts.IDENTITY:
            current = node(_ONNX_ACTIVATIONS[layer.act], [current], f"dense{i}_{layer.activation}")
    if output_scaling is not None:
        current = node("Mul", [current, constant("output_std", output_scaling[1])], "output_scaled")
        current = node("Add", [current, constant("output_mean", output_scaling[0])], "output_shifted")
    output = "Y"
    if probabilities:
        output = "probabilities"
        if last.act == acts.IDENTITY:
            current = node("Softmax" if net.n_out > 1 else "Sigmoid", [current], "probabilities_raw",
                           **({"axis": 1} if net.n_out > 1 else {}))
    nodes.append(helper.make_node("Identity", [current], [output], name="output"))

    graph = helper.make_graph(
        nodes, "gpubp_mlp",
        [helper.make_tensor_value_info("X", elem, ["N", net.n_in])],
        [helper.make_tensor_value_info(output, elem, ["N", net.n_out])],
        initializers)
    opsets = [helper.make_opsetid("", int(opset))]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="gpubp",
                              doc_string=f"gpubp MLP: {', '.join(map(repr, net.layers))}")
    # The oldest IR version that carries this opset: the widest range of runtimes can load the file.
    model.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


# ---- PyTorch ------------------------------------------------------------------------------------------------------
def _torch_activation(torch, layer):
    """The torch.nn module for a layer's activation; None for identity."""
    return {acts.IDENTITY: lambda: None, acts.RELU: torch.nn.ReLU, acts.SIGMOID: torch.nn.Sigmoid,
            acts.TANH: torch.nn.Tanh,
            acts.LEAKY_RELU: lambda: torch.nn.LeakyReLU(negative_slope=layer.alpha)}[layer.act]()


def to_torch(net):
    """torch.nn.Sequential of Linear (+ activation) modules holding copies of the network's parameters, in its
    dtype, on the CPU (move it with .to(device)). nn.Linear's weight is (out, in), as gpubp's W."""
    _check_net(net, "to_torch net")
    torch = _import("torch", "torch")
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[net.dtype]
    modules = []
    for layer, p in zip(net.layers, net.get_params()):
        linear = torch.nn.Linear(layer.n_in, layer.n_out, bias=layer.bias, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["W"])))
            if layer.bias:
                linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(p["b"])))
        modules.append(linear)
        activation = _torch_activation(torch, layer)
        if activation is not None:
            modules.append(activation)
    return torch.nn.Sequential(*modules)


def _flat_modules(torch, module):
    """The leaf modules of nested nn.Sequential containers, in order, with a readable position each."""
    if isinstance(module, torch.nn.Sequential):
        out = []
        for name, child in module.named_children():
            out.extend((f"{name}.{where}" if where else name, leaf) for where, leaf in _flat_modules(torch, child))
        return out
    return [("", module)]


def from_torch(module, backend="auto", dtype=None, seed=0, **sequential_kwargs):
    """A gpubp.Sequential with the parameters of `module`: an nn.Linear, or an nn.Sequential (nested ones are
    flattened) of nn.Linear layers each followed by at most one of ReLU, LeakyReLU, Sigmoid, Tanh (nn.Identity
    is skipped). Anything else is refused with a TypeError naming the module and its position, before any
    network is made. dtype: "float32" or "float64"; default the first Linear's (float16/bfloat16 need an
    explicit dtype). Other keyword arguments go to gpubp.Sequential (deterministic, ...)."""
    torch = _import("torch", "torch")
    from .layers import Dense
    from .network import Sequential
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch module: expected a torch.nn.Module, got {type(module).__name__}")
    activations = {torch.nn.ReLU: "relu", torch.nn.LeakyReLU: "leaky_relu", torch.nn.Sigmoid: "sigmoid",
                   torch.nn.Tanh: "tanh"}
    supported = "nn.Linear, each followed by at most one of nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh (or nn.Identity)"
    plan = []       # [linear, activation name, alpha]
    for where, leaf in _flat_modules(torch, module):
        label = f"{type(leaf).__name__}" + (f" at position {where}" if where else "")
        if type(leaf) is torch.nn.Identity:
            continue
        if type(leaf) is torch.nn.Linear:
            plan.append([leaf, "identity", acts.DEFAULT_ALPHA])
        elif type(leaf) in activations:
            if not plan:
                raise TypeError(f"from_torch: {label} comes before any nn.Linear; gpubp layers are {supported}")
            if plan[-1][1] != "identity":
                raise TypeError(f"from_torch: {label} follows another activation ({plan[-1][1]}); gpubp layers "
                                f"are {supported}")
            plan[-1][1] = activations[type(leaf)]
            if type(leaf) is torch.nn.LeakyReLU:
                plan[-1][2] = float(leaf.negative_slope)
        else:
            raise TypeError(f"from_torch: {label} is not supported; gpubp takes {supported}")
    if not plan:
        raise ValueError("from_torch: the module holds no nn.Linear layer")
    if dtype is None:
        dtype = {torch.float32: "float32", torch.float64: "float64"}.get(plan[0][0].weight.dtype)
        if dtype is None:
            raise ValueError(f"from_torch: the weights are {plan[0][0].weight.dtype}; pass dtype='float32' or "
                             "'float64'")
    layers = [Dense(linear.in_features, linear.out_features, activation, bias=linear.bias is not None, alpha=alpha)
              for linear, activation, alpha in plan]
    params = []
    for linear, _, _ in plan:
        p = {"W": linear.weight.detach().to("cpu", torch.float64).numpy()}
        if linear.bias is not None:
            p["b"] = linear.bias.detach().to("cpu", torch.float64).numpy()
        params.append(p)
    net = Sequential(*layers, backend=backend, dtype=dtype, seed=seed, **sequential_kwargs)
    net.set_params(params)
    return net
