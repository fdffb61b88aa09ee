"""Quantization-aware training of the student (``distill --quantize int8``), on CPU, through PyTorch 2 export
quantization (torchao's ``prepare_qat_pt2e`` / ``convert_pt2e``).

The student is exported (``torch.export``, the batch dimension dynamic) with all its outputs (logits, pooled
features, stage outputs), so every method works: feature methods read the fake-quantized network's features.
:class:`Int8Quantizer` annotates every ``conv1d`` / ``conv2d`` / ``linear``: weights int8, symmetric, per output
channel; activations (the op's input, and the output of the op or of the BatchNorm / ReLU that follows it)
uint8, affine, per tensor; fake-quantized with moving-average observers during training, BatchNorms folded into
the preceding convolutions' weights as the QAT recipe does. (torchao's X86InductorQuantizer annotates the QAT
conv-BN pattern for conv2d only, so the 1-D networks of the bundled data would keep float convolutions.)

At the end the trained graph is converted (``convert_pt2e``: quantize / dequantize pairs around integer weights,
the int8 reference model) and evaluated: the run's ``final_test_acc`` is the converted int8 model's accuracy,
the fake-quantized accuracy per epoch stays in ``metrics.jsonl``. The converted program is saved as
``quantized.pt2`` (``torch.export.load`` reads it). The checkpoint keeps the float weights under
``model_state`` (a plain model of the student's architecture) and the whole QAT state (weights and observers)
under ``qat_state`` for ``--resume``.
"""

import copy

import torch
from torch import nn

from kdops.train.models.base import Outputs

MODES = ("int8",)
_QUANTIZED_OPS = ("conv1d", "conv2d", "linear")
_FOLLOWERS = ("batch_norm", "_native_batch_norm_legit", "relu", "relu_")


def _import():
    import logging

    quiet = logging.getLogger("torch.utils._pytree")  # torchao's import-time notice about an Enum it registers
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torchao.quantization.pt2e import (allow_exported_model_train_eval, move_exported_model_to_eval,
                                               move_exported_model_to_train)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
    except ImportError as e:
        raise ValueError("--quantize needs torchao (pip install torchao): %s" % e)
    finally:
        quiet.setLevel(level)
    return dict(allow=allow_exported_model_train_eval, to_eval=move_exported_model_to_eval,
                to_train=move_exported_model_to_train, convert=convert_pt2e, prepare=prepare_qat_pt2e,
                Annotation=QuantizationAnnotation, Spec=QuantizationSpec, Quantizer=Quantizer)


def _specs(ao):
    from torchao.quantization.pt2e import (FusedMovingAvgObsFakeQuantize,
                                           MovingAveragePerChannelMinMaxObserver)

    act = ao["Spec"](dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                     observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(eps=2 ** -12))
    weight = ao["Spec"](dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric,
                        ch_axis=0, observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                            observer=MovingAveragePerChannelMinMaxObserver, eps=2 ** -12))
    return act, weight


def _name(node):
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def make_quantizer():
    ao = _import()
    act, weight = _specs(ao)

    class Int8Quantizer(ao["Quantizer"]):
        """int8 weights (per channel, symmetric) and uint8 activations (per tensor) for every conv / linear."""

        def annotate(self, model):
            for node in model.graph.nodes:
                if node.op != "call_function" or _name(node) not in _QUANTIZED_OPS:
                    continue
                x, w = node.args[0], node.args[1]
                node.meta["quantization_annotation"] = ao["Annotation"](
                    input_qspec_map={x: act, w: weight}, _annotated=True)
                # the quantized output: after the BatchNorm and ReLU that follow (a fused pattern), else the op's
                last = node
                while len(last.users) == 1:
                    nxt = next(iter(last.users))
                    if nxt.op != "call_function" or _name(nxt) not in _FOLLOWERS:
                        break
                    last = nxt
                if last is node:
                    node.meta["quantization_annotation"].output_qspec = act
                else:
                    last.meta["quantization_annotation"] = ao["Annotation"](output_qspec=act, _annotated=True)
            return model

        def validate(self, model):
            pass

    return Int8Quantizer()


class _AllOutputs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x, features=True)
        return out.logits, out.pooled, list(out.stages), list(out.preact)


class QATStudent(nn.Module):
    """The student as a fake-quantized exported graph, with the trainer's interface: ``forward(x, features)``,
    and ``train()`` / ``eval()`` switching BatchNorm and the observers the way exported graphs need."""

    def __init__(self, model, example):
        super().__init__()
        ao = self._ao = _import()
        if example.shape[0] < 2:
            raise ValueError("--quantize: the example batch needs at least 2 samples")
        batch = torch.export.Dim("batch", min=2)
        model = copy.deepcopy(model).train()
        program = torch.export.export(_AllOutputs(model), (example,), dynamic_shapes=({0: batch},))
        self.graph = ao["prepare"](program.module(), make_quantizer())
        self._training = True

    def forward(self, x, features=False):
        logits, pooled, stages, preact = self.graph(x)
        out = Outputs(logits, pooled, list(stages), list(preact))
        return out if features else out.logits

    def train(self, mode=True):
        if mode != self._training:
            (self._ao["to_train"] if mode else self._ao["to_eval"])(self.graph)
            self._training = mode
        self.training = mode
        return self

    def float_state(self, template):
        """The float weights (and BN statistics) in the key layout of `template`, a plain model."""
        sd = self.graph.state_dict()
        out = {}
        for k, v in template.state_dict().items():
            key = "model." + k
            if key not in sd:
                raise ValueError("--quantize: the exported graph has no %s" % key)
            out[k] = sd[key].detach().clone()
        return out

    @torch.no_grad()
    def convert(self):
        """The int8 reference model: the trained graph with its fake quantization replaced by quantize /
        dequantize pairs and integer weights."""
        g = copy.deepcopy(self.graph)
        self._ao["to_eval"](g)
        return self._ao["convert"](g)


class Int8Model(nn.Module):
    """A converted graph with the trainer's evaluation interface (logits only)."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def forward(self, x, features=False):
        return self.graph(x)[0]

    def train(self, mode=True):  # nothing left to switch (BatchNorms are folded); exported graphs refuse it
        self.training = mode
        return self


def save(int8, example, path):
    """The converted program, any batch size, for ``torch.export.load(path).module()(x)`` -> (logits, pooled,
    stages, preact)."""
    program = torch.export.export(int8.graph, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)


def check(args, world, device):
    if args.quantize not in MODES:
        raise ValueError("--quantize must be one of %s, got %r" % (", ".join(MODES), args.quantize))
    if device.type != "cpu":
        raise ValueError("--quantize int8 trains on CPU (the int8 reference model is a CPU program): --device cpu")
    if world > 1:
        raise ValueError("--quantize runs in one process (no DDP)")
    if args.prune is not None:
        raise ValueError("--quantize and --prune: one compression at a time")
    _import()
