"""Reference networks and checkpoint containers of the TSM authors' code and of mmaction2, for tests only.

Written here, NOT with tsmtrain, modelled on the real sources (read at mit-han-lab/temporal-shift-module
HEAD, open-mmlab/mmaction2 1.x HEAD 4d6c934, open-mmlab/mmengine HEAD); each part names the file it
mirrors. They let the loader of model-zoo checkpoints be tested against networks it did not build.

Key layouts (``C`` = classes, ``T`` = segments)
===============================================

Official TSM (``ops/models.py`` TSN, saved by ``main.py``)
    Container ``{'epoch': int, 'arch': 'resnet50'|'resnet18'|'mobilenetv2', 'state_dict',
    'optimizer': SGD.state_dict() (8 param groups of get_optim_policies, each with 'lr_mult',
    'decay_mult', 'name'; state 'momentum_buffer'), 'best_prec1': float}``; plain types only, so it
    loads with ``weights_only=True``. T, shift_div, is_shift are NOT in the file: only in its name
    (``TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50.pth``; TSN:
    ``TSM_kinetics_RGB_resnet50_avg_segment5_e50.pth``; ``_tpool`` / ``_nl`` / ``_dense`` suffixes).
    Every key starts with ``module.`` (nn.DataParallel).
    ResNet: ``module.base_model.<torchvision key>`` without ``fc``; TSM wraps ``conv1`` of every block
    (resnet18/50) so ``module.base_model.layer1.0.conv1.net.weight`` (TSN: ``...layer1.0.conv1.weight``);
    ``bn1``, ``conv2``, ``conv3``, ``downsample.0``/``.1`` unchanged. Head ``module.new_fc.{weight,bias}``
    (C, 512|2048); with dropout 0 there is no new_fc and the head is ``module.base_model.fc.*``.
    Counts: resnet50 320 keys, resnet18 122 (same as torchvision's incl. num_batches_tracked).
    MobileNetV2 (``archs/mobilenet_v2.py``): ``module.base_model.features.0.{0,1}`` (conv 3->32 s2, bn),
    ``features.1.conv.{0,1,3,4}`` (expand 1: dw, bn, pw, bn), ``features.2..17.conv.{0,1,3,4,6,7}``
    (pw, bn, dw, bn, pw-linear, bn), ``features.18.{0,1}`` (1x1 320->1280, bn), head ``module.new_fc``
    (C, 1280); ``base_model.classifier`` is Dropout (no keys). TSM: blocks with 8 layers and a residual
    (features 3,5,6,8,9,10,12,13,15,16) have ``conv.0.net.weight``. test_models.py also renames
    ``base_model.classifier.*`` to ``new_fc.*``.
    Shift (``ops/temporal_shift.py``): x (N*T, C, H, W); fold = C // shift_div; channels [0, fold) take
    frame t+1, [fold, 2 fold) take frame t-1, zeros at the ends, the rest unchanged.
    Input (N, T*3, H, W), normalised with ImageNet mean/std on 0..1; logits = mean over T of new_fc.

mmaction2 1.x Recognizer2D (saved by mmengine ``Runner.save_checkpoint``)
    state_dict (no ``module.``): ResNet/ResNetTSM (``backbones/resnet.py``, ``resnet_tsm.py``) uses
    ConvModule (children ``conv``, ``bn``, ``activate``): ``backbone.conv1.conv.weight``,
    ``backbone.conv1.bn.*``, ``backbone.layerI.J.convK.conv.weight`` / ``.convK.bn.*``,
    ``backbone.layerI.J.downsample.conv.weight`` / ``.downsample.bn.*``; TSM wraps ``convK.conv`` of
    conv1: ``backbone.layer1.0.conv1.conv.net.weight`` (the bn stays ``backbone.layer1.0.conv1.bn.*``).
    MobileNetV2TSM (``mobilenet_v2.py``, ``mobilenet_v2_tsm.py``): ``backbone.conv1.{conv,bn}``,
    ``backbone.layer{1..7}.J.conv.K.{conv,bn}`` (2 ConvModules when expand 1, else 3),
    ``backbone.conv2.{conv,bn}`` (320->1280); TSM wraps the whole ConvModule conv[0] of residual
    expand-6 blocks: ``backbone.layer2.1.conv.0.net.conv.weight`` and ``...conv.0.net.bn.*`` (10 blocks).
    Head ``cls_head.fc_cls.{weight,bias}`` (TSMHead for TSM, TSNHead for TSN). ``data_preprocessor.mean``
    / ``.std`` are non-persistent buffers: absent from a 1.x state_dict (publish_model.py deletes them
    if present; ``with_preprocessor_buffers=True`` adds them as older files may have).
    T and shift_div are only in ``meta['cfg']`` (config text: ``num_segments=8``, ``shift_div=8``).
    Container ``{'meta': {'epoch', 'iter', 'cfg': str, 'seed', 'experiment_name', 'time',
    'mmengine_version', 'dataset_meta'}, 'state_dict', 'message_hub': {'log_scalars', 'runtime_info',
    'resumed_keys'}, 'optimizer', 'param_schedulers': [dict, ...]}``. A real training file pickles
    ``mmengine.logging.history_buffer.HistoryBuffer`` (with numpy arrays) and MultiStepLR's
    ``collections.Counter``: ``weights_only=True`` refuses it. ``tools/deployment/publish_model.py``
    keeps only ``meta`` and ``state_dict`` (plain ``torch.save``, new zip format) -- the zoo's files.
    Zoo names: ``tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb_20220831-64d69186.pth``
    (1x1x8 = clip_len x frame_interval x num_clips: T = 8); also
    ``tsm_imagenet-pretrained-mobilenetv2_8xb16-1x1x8-100e_kinetics400-rgb_20230414-401127fd.pth``,
    ``tsn_imagenet-pretrained-r50_8xb32-1x1x3-100e_kinetics400-rgb_20220906-cd10898e.pth`` (configs README). mmaction2 0.x files (mmcv runner) hold the
    same state_dict keys in ``{'meta': {'env_info', 'seed', 'config_name', 'work_dir', 'epoch', 'iter',
    'mmcv_version', 'time'}, 'state_dict'[, 'optimizer']}``: no config text (see mmaction2_checkpoint_0x).
    Input of the backbone: (N*T, 3, H, W) normalised (the data_preprocessor normalises 0..255 with
    mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375)); logits = cls_head output (N, C).

timm resnet50: the same keys and shapes as torchvision's resnet50 (timm ``models/resnet.py``: conv1,
    bn1, layerI.J.convK/bnK, downsample.0/.1 via ``downsample_conv``, fc; its act/aa/se/drop_block
    have no parameters).
"""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import types

import torch
import torchvision
from torch import nn

OFFICIAL_ARCHS = ("resnet18", "resnet50", "mobilenetv2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- temporal-shift-module: ops/temporal_shift.py ---------------------------------------------

class TemporalShift(nn.Module):
    """The official TemporalShift (in-place False): shift the input, then run ``net``."""

    def __init__(self, net: nn.Module, n_segment: int = 3, n_div: int = 8):
        super().__init__()
        self.net = net
        self.n_segment = n_segment
        self.fold_div = n_div

    def forward(self, x):
        return self.net(self.shift(x, self.n_segment, fold_div=self.fold_div))

    @staticmethod
    def shift(x: torch.Tensor, n_segment: int, fold_div: int = 3) -> torch.Tensor:
        """(N*T, C, H, W) -> same shape; the official zeros_like + slice form."""
        nt, c, h, w = x.size()
        x = x.view(nt // n_segment, n_segment, c, h, w)
        fold = c // fold_div
        out = torch.zeros_like(x)
        out[:, :-1, :fold] = x[:, 1:, :fold]  # shift left
        out[:, 1:, fold: 2 * fold] = x[:, :-1, fold: 2 * fold]  # shift right
        out[:, :, 2 * fold:] = x[:, :, 2 * fold:]
        return out.view(nt, c, h, w)


def _make_blockres_shift(net: nn.Module, n_segment: int, n_div: int) -> None:
    """ops/temporal_shift.py make_temporal_shift(place='blockres'): wrap conv1 of each block."""
    n_round = 2 if len(list(net.layer3.children())) >= 23 else 1
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for i, b in enumerate(getattr(net, name).children()):
            if i % n_round == 0:
                b.conv1 = TemporalShift(b.conv1, n_segment=n_segment, n_div=n_div)


# --- temporal-shift-module: archs/mobilenet_v2.py ---------------------------------------------

def _conv_bn(inp, oup, stride, k=3):
    return nn.Sequential(nn.Conv2d(inp, oup, k, stride, k // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """archs/mobilenet_v2.py InvertedResidual: ``conv`` of 5 layers (expand 1) or 8."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
                                               nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))  # t, c, n, s (both repositories)


class OfficialMobileNetV2(nn.Module):
    """archs/mobilenet_v2.py MobileNetV2 (width 1): features 0..18, classifier, mean-pool forward."""

    def __init__(self, n_class: int = 1000):
        super().__init__()
        features, cin = [_conv_bn(3, 32, 2)], 32
        for t, c, n, s in MBV2_SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, expand_ratio=t))
                cin = c
        features.append(_conv_bn(cin, 1280, 1, k=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(1280, n_class)
        for m in self.modules():  # _initialize_weights
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x):
        return self.classifier(self.features(x).mean(3).mean(2))


# --- temporal-shift-module: ops/models.py (TSN), ops/basic_ops.py (consensus) -----------------

class OfficialTSN(nn.Module):
    """ops/models.py TSN for RGB, avg consensus, blockres shift, no non-local, no temporal pool."""

    def __init__(self, arch, num_class, num_segments, is_shift, shift_div=8, dropout=0.5):
        super().__init__()
        if arch not in OFFICIAL_ARCHS:
            raise ValueError(f"official_tsn: arch {arch!r} is not one of {OFFICIAL_ARCHS}")
        self.num_segments, self.is_shift, self.shift_div, self.dropout = num_segments, is_shift, shift_div, dropout
        self.arch = arch
        if arch.startswith("resnet"):  # _prepare_base_model
            self.base_model = getattr(torchvision.models, arch)(weights=None)
            if is_shift:
                _make_blockres_shift(self.base_model, num_segments, shift_div)
            self.base_model.last_layer_name = "fc"
            self.base_model.avgpool = nn.AdaptiveAvgPool2d(1)
        else:
            self.base_model = OfficialMobileNetV2()
            self.base_model.last_layer_name = "classifier"
            self.base_model.avgpool = nn.AdaptiveAvgPool2d(1)  # set, unused by its forward
            if is_shift:
                for m in self.base_model.modules():
                    if isinstance(m, InvertedResidual) and len(m.conv) == 8 and m.use_res_connect:
                        m.conv[0] = TemporalShift(m.conv[0], n_segment=num_segments, n_div=shift_div)
        name = self.base_model.last_layer_name  # _prepare_tsn
        feature_dim = getattr(self.base_model, name).in_features
        if dropout == 0:
            setattr(self.base_model, name, nn.Linear(feature_dim, num_class))
            self.new_fc = None
            fc = getattr(self.base_model, name)
        else:
            setattr(self.base_model, name, nn.Dropout(p=dropout))
            self.new_fc = fc = nn.Linear(feature_dim, num_class)
        nn.init.normal_(fc.weight, 0, 0.001)
        nn.init.constant_(fc.bias, 0)

    def forward(self, input):
        """(N, T*3, H, W) normalised -> (N, num_class): mean over T of per-segment scores."""
        base_out = self.base_model(input.view((-1, 3) + input.size()[-2:]))
        if self.dropout > 0:
            base_out = self.new_fc(base_out)
        base_out = base_out.view((-1, self.num_segments) + base_out.size()[1:])
        return base_out.mean(dim=1, keepdim=True).squeeze(1)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm affine/statistics and Linear layers random values (in place), so that logits
    of a freshly built network depend on every tensor; convolutions keep their random init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.8 + 0.4 * torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def official_tsn(arch: str, num_class: int, num_segments: int, is_shift: bool, shift_div: int = 8,
                 dropout: float = 0.5, seed: int = 0, randomize: bool = True) -> OfficialTSN:
    """The official TSN/TSM model (ops/models.py) in eval mode, built with ``seed`` (the global RNG
    is left as it was); ``randomize`` gives BN statistics and the classifier random values (see
    :func:`randomize_`) instead of the official init (BN 1/0, fc std 0.001)."""
    model = _seeded(seed, lambda: OfficialTSN(arch, num_class, num_segments, is_shift, shift_div, dropout))
    if randomize:
        randomize_(model, seed)
    return model.eval()


def official_logits(model: OfficialTSN, clips: torch.Tensor) -> torch.Tensor:
    """Clips (N, T, 3, H, W), normalised -> logits (N, C) as the official model gives them."""
    n, t, c, h, w = clips.shape
    with torch.no_grad():
        return model(clips.reshape(n, t * c, h, w))


def _official_policies(model: OfficialTSN, fc_lr5: bool = True) -> list[dict]:
    """ops/models.py get_optim_policies with partial BN (main.py's defaults: only the first BN)."""
    groups = {k: [] for k in ("first_conv_weight", "first_conv_bias", "normal_weight", "normal_bias",
                              "BN scale/shift", "custom_ops", "lr5_weight", "lr10_bias")}
    conv_cnt = bn_cnt = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            conv_cnt += 1
            pre = "first_conv" if conv_cnt == 1 else "normal"
            groups[pre + "_weight"].append(m.weight)
            if m.bias is not None:
                groups[pre + "_bias"].append(m.bias)
        elif isinstance(m, nn.Linear):
            groups["lr5_weight" if fc_lr5 else "normal_weight"].append(m.weight)
            groups["lr10_bias" if fc_lr5 else "normal_bias"].append(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            bn_cnt += 1
            if bn_cnt == 1:
                groups["BN scale/shift"].extend(m.parameters())
    mult = {"first_conv_weight": (1, 1), "first_conv_bias": (2, 0), "normal_weight": (1, 1),
            "normal_bias": (2, 0), "BN scale/shift": (1, 0), "custom_ops": (1, 1), "lr5_weight": (5, 1),
            "lr10_bias": (10, 0)}
    return [{"params": p, "lr_mult": mult[k][0], "decay_mult": mult[k][1], "name": k} for k, p in groups.items()]


def _stepped_optimizer_state(model: nn.Module, make_optimizer) -> dict:
    """A real optimizer's state_dict after one step with random gradients, taken on a copy of
    ``model`` so that the model itself is not changed."""
    import copy

    twin = copy.deepcopy(model)
    opt = make_optimizer(twin)
    g = torch.Generator().manual_seed(1)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = 1e-3 * torch.randn(p.shape, generator=g)
    opt.step()
    return opt.state_dict()


def official_checkpoint(model: OfficialTSN, path, arch: str | None = None, epoch: int = 50,
                        best_prec1: float = 74.1, with_optimizer: bool = True) -> dict:
    """Save ``model`` as main.py's save_checkpoint does (DataParallel keys ``module.``, SGD over the
    get_optim_policies groups after one step) with torch.save to ``path``; returns the dict saved.
    The optimizer's momentum doubles the file (resnet50: 188 MB); ``with_optimizer=False`` leaves
    the 'optimizer' entry out for smaller test files (whether the published zoo files kept it is
    not known here: test_models.py reads only 'state_dict')."""
    def make(twin):
        return torch.optim.SGD(_official_policies(twin), 0.01, momentum=0.9, weight_decay=5e-4)

    state = {
        "epoch": epoch,
        "arch": arch or model.arch,
        "state_dict": torch.nn.DataParallel(model).state_dict(),
        "optimizer": _stepped_optimizer_state(model, make) if with_optimizer else None,
        "best_prec1": best_prec1,
    }
    if not with_optimizer:
        del state["optimizer"]
    torch.save(state, path)
    return state


def official_file_name(arch: str, num_segments: int, is_shift: bool, shift_div: int = 8, dataset: str = "kinetics",
                       epochs: int = 50, suffix: str = "") -> str:
    """main.py's store_name + '.pth', e.g. TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50.pth."""
    full = arch + (f"_shift{shift_div}_blockres" if is_shift else "")
    return "_".join(["TSM", dataset, "RGB", full, "avg", f"segment{num_segments}", f"e{epochs}"]) + suffix + ".pth"


# --- mmcv: cnn/bricks/conv_module.py (ConvModule: conv, norm 'bn', act 'activate') ---------------

class ConvModule(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, act: type | None = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)  # bias='auto'
        self.bn = nn.BatchNorm2d(cout)
        if act is not None:
            self.activate = act(inplace=True)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.activate(x) if hasattr(self, "activate") else x


# --- mmaction2: models/backbones/resnet_tsm.py TemporalShift ---------------------------------

class MMTemporalShift(nn.Module):
    """mmaction2's TemporalShift (attributes net, num_segments, shift_div; cat-based shift)."""

    def __init__(self, net, num_segments=3, shift_div=8):
        super().__init__()
        self.net, self.num_segments, self.shift_div = net, num_segments, shift_div

    def forward(self, x):
        return self.net(self.shift(x, self.num_segments, self.shift_div))

    @staticmethod
    def shift(x, num_segments, shift_div=3):
        n, c, h, w = x.size()
        x = x.view(-1, num_segments, c, h * w)
        fold = c // shift_div
        left, mid, right = x[:, :, :fold], x[:, :, fold:2 * fold], x[:, :, 2 * fold:]
        left = torch.cat((left[:, 1:], (left - left)[:, :1]), 1)
        mid = torch.cat(((mid - mid)[:, :1], mid[:, :-1]), 1)
        return torch.cat((left, mid, right), 2).view(n, c, h, w)


# --- mmaction2: models/backbones/resnet.py ------------------------------------------------------

class MMBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = ConvModule(inplanes, planes, 3, stride, 1)
        self.conv2 = ConvModule(planes, planes, 3, 1, 1, act=None)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class MMBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):  # style 'pytorch': stride on conv2
        super().__init__()
        self.conv1 = ConvModule(inplanes, planes, 1, 1, 0)
        self.conv2 = ConvModule(planes, planes, 3, stride, 1)
        self.conv3 = ConvModule(planes, planes * 4, 1, 1, 0, act=None)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class MMResNet(nn.Module):
    """resnet.py ResNet (pytorch style, out_indices (3,)) + resnet_tsm.py ResNetTSM blockres shift."""

    arch_settings = {18: (MMBasicBlock, (2, 2, 2, 2)), 50: (MMBottleneck, (3, 4, 6, 3))}

    def __init__(self, depth, num_segments=8, is_shift=True, shift_div=8):
        super().__init__()
        block, stages = self.arch_settings[depth]
        self.num_segments, self.is_shift, self.shift_div = num_segments, is_shift, shift_div
        self.conv1 = ConvModule(3, 64, 7, 2, 3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, n in enumerate(stages):
            planes, stride = 64 * 2 ** i, 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes * block.expansion:  # make_res_layer
                down = ConvModule(inplanes, planes * block.expansion, 1, stride, 0, act=None)
            layers = [block(inplanes, planes, stride, down)]
            inplanes = planes * block.expansion
            layers += [block(inplanes, planes) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.feat_dim = inplanes
        if is_shift:  # ResNetTSM.make_temporal_shift, 'blockres'
            n_round = 2 if len(self.layer3) >= 23 else 1
            for name in ("layer1", "layer2", "layer3", "layer4"):
                for i, b in enumerate(getattr(self, name)):
                    if i % n_round == 0:
                        b.conv1.conv = MMTemporalShift(b.conv1.conv, num_segments, shift_div)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --- mmaction2: models/backbones/mobilenet_v2.py, mobilenet_v2_tsm.py -------------------------

class MMInvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = int(round(cin * expand_ratio))
        layers = [] if expand_ratio == 1 else [ConvModule(cin, hidden, 1, act=nn.ReLU6)]
        layers += [ConvModule(hidden, hidden, 3, stride, 1, groups=hidden, act=nn.ReLU6),
                   ConvModule(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MMMobileNetV2(nn.Module):
    """MobileNetV2 (widen 1, out_indices (7,)) + MobileNetV2TSM shift on ``len(conv) == 3`` residual blocks."""

    def __init__(self, num_segments=8, is_shift=True, shift_div=8):
        super().__init__()
        self.num_segments, self.is_shift, self.shift_div = num_segments, is_shift, shift_div
        self.conv1 = ConvModule(3, 32, 3, 2, 1, act=nn.ReLU6)
        cin, self.layers = 32, []
        for i, (t, c, n, s) in enumerate(MBV2_SETTING):
            blocks = []
            for j in range(n):
                blocks.append(MMInvertedResidual(cin, c, s if j == 0 else 1, t))
                cin = c
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.layers.append(f"layer{i + 1}")
        self.conv2 = ConvModule(cin, 1280, 1, 1, 0, act=nn.ReLU6)
        self.layers.append("conv2")
        self.feat_dim = 1280
        if is_shift:
            for m in self.modules():
                if isinstance(m, MMInvertedResidual) and len(m.conv) == 3 and m.use_res_connect:
                    m.conv[0] = MMTemporalShift(m.conv[0], num_segments, shift_div)

    def forward(self, x):
        x = self.conv1(x)
        for name in self.layers:
            x = getattr(self, name)(x)
        return x


# --- mmaction2: models/heads/tsm_head.py, tsn_head.py, base.py (AvgConsensus) -----------------

class MMHead(nn.Module):
    """TSMHead (``is_shift``: fc per segment, then mean over num_segments) or TSNHead (mean of the
    pooled features over the segments, then fc). Only ``fc_cls`` has parameters."""

    def __init__(self, num_classes, in_channels, num_segments, tsm: bool, dropout_ratio=0.5):
        super().__init__()
        self.tsm, self.num_segments = tsm, num_segments
        self.dropout = nn.Dropout(p=dropout_ratio) if dropout_ratio else None
        self.fc_cls = nn.Linear(in_channels, num_classes)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x, num_segs):
        x = self.avg_pool(x)
        if self.tsm:
            x = torch.flatten(x, 1)
            x = x if self.dropout is None else self.dropout(x)
            score = self.fc_cls(x)
            return score.view((-1, self.num_segments) + score.size()[1:]).mean(1)
        x = x.reshape((-1, num_segs) + x.shape[1:]).mean(1)
        x = x if self.dropout is None else self.dropout(x)
        return self.fc_cls(x.view(x.size(0), -1))


class MMDataPreprocessor(nn.Module):
    """data_preprocessors/data_preprocessor.py ActionDataPreprocessor: mean/std non-persistent."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1), False)
        self.register_buffer("std", torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1), False)


class MMRecognizer2D(nn.Module):
    """recognizers/recognizer2d.py: inputs (N, T, C, H, W) -> backbone on (N*T, C, H, W) -> cls_head."""

    def __init__(self, arch, num_classes, num_segments, is_shift, shift_div=8):
        super().__init__()
        self.arch = arch
        self.data_preprocessor = MMDataPreprocessor()
        if arch == "mobilenetv2":
            self.backbone = MMMobileNetV2(num_segments, is_shift, shift_div)
        elif arch in ("resnet18", "resnet50"):
            self.backbone = MMResNet(int(arch[6:]), num_segments, is_shift, shift_div)
        else:
            raise ValueError(f"mmaction2_recognizer: arch {arch!r} is not resnet18, resnet50 or mobilenetv2")
        self.cls_head = MMHead(num_classes, self.backbone.feat_dim, num_segments, tsm=is_shift,
                               dropout_ratio=0.5 if is_shift else 0.4)
        for m in self.backbone.modules():  # ResNet.init_weights: kaiming_init (fan_out, normal)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, inputs):
        num_segs = inputs.shape[1]
        return self.cls_head(self.backbone(inputs.reshape((-1,) + inputs.shape[2:])), num_segs)


def mmaction2_recognizer(arch: str, num_classes: int, num_segments: int, is_shift: bool, shift_div: int = 8,
                         seed: int = 0, randomize: bool = True) -> MMRecognizer2D:
    """An mmaction2 1.x Recognizer2D (ResNetTSM/ResNet or MobileNetV2TSM + TSMHead/TSNHead), eval mode."""
    model = _seeded(seed, lambda: MMRecognizer2D(arch, num_classes, num_segments, is_shift, shift_div))
    if randomize:
        randomize_(model, seed)
    return model.eval()


def mmaction2_logits(model: MMRecognizer2D, clips: torch.Tensor, raw: bool = False) -> torch.Tensor:
    """Clips (N, T, 3, H, W) -> cls_head scores (N, C). ``raw``: clips are 0..255 and go through the
    data_preprocessor's normalisation first; otherwise they are already normalised."""
    with torch.no_grad():
        if raw:
            clips = (clips - model.data_preprocessor.mean) / model.data_preprocessor.std
        return model(clips)


def mmaction2_config_text(model: MMRecognizer2D) -> str:
    """A config text like the runner's ``cfg.pretty_text`` for this recognizer (configs/_base_/models)."""
    bb, head = model.backbone, model.cls_head
    if model.arch == "mobilenetv2":
        backbone = (f"type='MobileNetV2TSM', shift_div={bb.shift_div}, num_segments={bb.num_segments}, "
                    f"is_shift={bb.is_shift}, pretrained='mmcls://mobilenet_v2'")
    elif bb.is_shift:
        backbone = (f"type='ResNetTSM', pretrained='torchvision://{model.arch}', depth={model.arch[6:]}, "
                    f"norm_eval=False, shift_div={bb.shift_div}, num_segments={bb.num_segments}")
    else:
        backbone = f"type='ResNet', pretrained='torchvision://{model.arch}', depth={model.arch[6:]}, norm_eval=False"
    head_type = "TSMHead" if head.tsm else "TSNHead"
    segs = f"num_segments={head.num_segments}, " if head.tsm else ""
    return (
        "default_scope = 'mmaction'\n"
        "model = dict(\n"
        "    type='Recognizer2D',\n"
        f"    backbone=dict({backbone}),\n"
        f"    cls_head=dict(type='{head_type}', {segs}num_classes={head.fc_cls.out_features}, "
        f"in_channels={head.fc_cls.in_features}, spatial_type='avg', "
        f"consensus=dict(type='AvgConsensus', dim=1), dropout_ratio={head.dropout.p if head.dropout else 0}, "
        "init_std=0.001, "
        f"is_shift={head.tsm}, average_clips='prob'),\n"
        "    data_preprocessor=dict(type='ActionDataPreprocessor', mean=[123.675, 116.28, 103.53], "
        "std=[58.395, 57.12, 57.375], format_shape='NCHW'),\n"
        "    train_cfg=None,\n    test_cfg=None)\n"
        "optim_wrapper = dict(constructor='TSMOptimWrapperConstructor', paramwise_cfg=dict(fc_lr5=True), "
        "optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001), "
        "clip_grad=dict(max_norm=20, norm_type=2))\n"
        "train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=50, val_begin=1, val_interval=1)\n"
    )


# --- a stand-in for mmengine.logging.history_buffer.HistoryBuffer ------------------------------

class HistoryBuffer:
    """mmengine/logging/history_buffer.py HistoryBuffer's pickled state: max_length and numpy
    _log_history / _count_history. Its module is set to mmengine's, see :func:`fake_mmengine`."""

    def __init__(self, log_history=(), count_history=(), max_length=1000000):
        import numpy as np

        self.max_length = max_length
        self._log_history = np.array(log_history)
        self._count_history = np.array(count_history)


HistoryBuffer.__module__ = "mmengine.logging.history_buffer"


@contextlib.contextmanager
def fake_mmengine():
    """Make ``mmengine.logging.history_buffer.HistoryBuffer`` importable (our stand-in) while the
    block runs, unless the real mmengine is installed; removes only the modules it added."""
    added = []
    try:
        import mmengine.logging.history_buffer  # noqa: F401
    except ImportError:
        for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        sys.modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
        sys.modules["mmengine"].logging = sys.modules["mmengine.logging"]
        sys.modules["mmengine.logging"].history_buffer = sys.modules["mmengine.logging.history_buffer"]
    try:
        yield
    finally:
        for name in reversed(added):
            del sys.modules[name]


def _history(values, with_objects):
    counts = [1] * len(values)
    if with_objects:
        return HistoryBuffer(values, counts)
    return {"log_history": list(values), "count_history": counts, "max_length": 1000000}


def mmaction2_checkpoint(model: MMRecognizer2D, path, epoch: int = 50, iters_per_epoch: int = 100,
                         with_objects: bool = False, with_preprocessor_buffers: bool = False,
                         seed: int = 0) -> dict:
    """Save ``model`` as mmengine's Runner.save_checkpoint does after epoch ``epoch`` (by_epoch).

    ``with_objects``: message_hub scalars are HistoryBuffer instances (numpy inside) and
    MultiStepLR's milestones a collections.Counter, as in a real training file (which then needs
    weights_only=False and mmengine to load); otherwise plain dicts/lists in their place.
    ``with_preprocessor_buffers``: add ``data_preprocessor.mean/std`` to state_dict (older files).
    Returns the dict saved."""
    state_dict = model.state_dict()
    if with_preprocessor_buffers:
        state_dict["data_preprocessor.mean"] = model.data_preprocessor.mean.clone()
        state_dict["data_preprocessor.std"] = model.data_preprocessor.std.clone()
    cfg = mmaction2_config_text(model)
    name = "tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb"
    meta = {"epoch": epoch, "iter": epoch * iters_per_epoch, "cfg": cfg, "seed": seed,
            "experiment_name": f"{name}_20220831_081233", "time": "20220831_101500",
            "mmengine_version": "0.10.4", "dataset_meta": {}}
    log_scalars = collections.OrderedDict(
        (k, _history(v, with_objects)) for k, v in (
            ("train/lr", [0.02, 0.002]), ("train/loss", [1.9, 1.7]), ("train/loss_cls", [1.9, 1.7]),
            ("train/top1_acc", [0.5, 0.6]), ("train/top5_acc", [0.8, 0.9]), ("train/time", [0.4, 0.41]),
            ("train/data_time", [0.01, 0.02]), ("train/grad_norm", [3.2, 2.9])))
    runtime_info = collections.OrderedDict(
        cfg=cfg, seed=seed, experiment_name=meta["experiment_name"], dataset_meta={}, epoch=epoch,
        iter=epoch * iters_per_epoch, max_epochs=50, max_iters=50 * iters_per_epoch,
        best_score=0.731, best_ckpt=f"work_dirs/{name}/best_acc_top1_epoch_{epoch}.pth",
        last_ckpt=f"work_dirs/{name}/epoch_{epoch}.pth")
    resumed = collections.OrderedDict((k, True) for k in list(log_scalars) + list(runtime_info))

    def make(twin):
        return torch.optim.SGD(twin.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)

    base_values = [0.02]
    common = {"param_name": "lr", "by_epoch": True, "base_values": base_values, "last_step": epoch,
              "_global_step": epoch, "verbose": False, "_last_value": [0.0002]}
    milestones = collections.Counter([25, 45]) if with_objects else {25: 1, 45: 1}
    schedulers = [  # mmengine/optim/scheduler: state_dict() = __dict__ without 'optimizer'
        {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 4, "begin": 0, "end": 5, **common},
        {"milestones": milestones, "gamma": 0.1, "begin": 0, "end": 50, **common},
    ]
    ckpt = {"meta": meta, "state_dict": state_dict,
            "message_hub": {"log_scalars": log_scalars, "runtime_info": runtime_info, "resumed_keys": resumed},
            "optimizer": _stepped_optimizer_state(model, make), "param_schedulers": schedulers}
    if with_objects:
        with fake_mmengine():
            torch.save(ckpt, path)
    else:
        torch.save(ckpt, path)
    return ckpt


def mmaction2_published(model: MMRecognizer2D, path, epoch: int = 50) -> dict:
    """What tools/deployment/publish_model.py leaves of a runner checkpoint: ``meta`` and
    ``state_dict`` (message_hub, optimizer, param_schedulers and data_preprocessor.mean/std
    removed), saved with plain torch.save. (It then renames the file to
    ``<name>_<YYYYMMDD>-<sha256[:8]>.pth``; the caller picks ``path``.) Returns the dict saved."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = mmaction2_checkpoint(model, os.path.join(tmp, "epoch.pth"), epoch=epoch,
                                    with_preprocessor_buffers=True)
    for k in ("message_hub", "optimizer", "param_schedulers"):
        ckpt.pop(k, None)
    for k in ("data_preprocessor.mean", "data_preprocessor.std"):
        ckpt["state_dict"].pop(k, None)
    torch.save(ckpt, path)
    return ckpt


def mmaction2_checkpoint_0x(model: MMRecognizer2D, path, epoch: int = 50, published: bool = True) -> dict:
    """An mmaction2 0.x file (mmcv runner, v0.24.1 tools/train.py + tools/deployment/publish_model.py):
    ``{'meta': {'env_info', 'seed', 'config_name', 'work_dir', 'epoch', 'iter', 'mmcv_version',
    'time'}, 'state_dict', 'optimizer'}``; published drops 'optimizer' (plain torch.save). The same
    state_dict keys as 1.x; no config text, so T and shift_div are only in the file name
    (``tsm_r50_1x1x8_50e_kinetics400_rgb_20200607-af7fb746.pth``: 1x1x8 = clip_len x interval x T)."""
    meta = {"env_info": "sys.platform: linux\nPython: 3.7.7\nPyTorch: 1.5.0", "seed": None,
            "config_name": "tsm_r50_1x1x8_50e_kinetics400_rgb.py", "work_dir": "tsm_r50_1x1x8_50e_kinetics400_rgb",
            "epoch": epoch, "iter": epoch * 100, "mmcv_version": "1.7.0", "time": "Sun Jun  7 10:07:30 2020"}
    ckpt = {"meta": meta, "state_dict": model.state_dict()}
    if not published:
        ckpt["optimizer"] = _stepped_optimizer_state(
            model, lambda twin: torch.optim.SGD(twin.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4))
    torch.save(ckpt, path)
    return ckpt


def timm_resnet50_state_dict(seed: int = 0) -> dict:
    """A timm ``resnet50`` state_dict: timm's ResNet names its tensors exactly as torchvision's
    (conv1, bn1, layerI.J.{conv,bn}{1,2,3}, downsample.0/.1, fc), so this is torchvision's
    resnet50 state_dict built with ``seed``."""
    return _seeded(seed, lambda: torchvision.models.resnet50(weights=None)).state_dict()
